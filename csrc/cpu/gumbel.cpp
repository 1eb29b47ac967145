// placeholder: the C++ CPU implementations of the Gumbel-softmax family register here.
#include <torch/library.h>
