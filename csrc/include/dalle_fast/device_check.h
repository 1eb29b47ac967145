// DF_DEVICE_CHECK(cond): a device-side assertion of the CUDA kernels, compiled in only with -DDALLE_FAST_DEBUG
// (the GPU check's debug build): prints the file, line, condition, block and thread, then traps.
#pragma once

#include <cstdio>

#ifdef DALLE_FAST_DEBUG
#define DF_DEVICE_CHECK(cond)                                                                                  \
  do {                                                                                                         \
    if (!(cond)) {                                                                                             \
      printf("dalle_fast %s:%d: device check failed: %s (block %d,%d thread %d,%d)\n", __FILE__, __LINE__,   \
             #cond, (int)blockIdx.x, (int)blockIdx.y, (int)threadIdx.x, (int)threadIdx.y);                     \
      __trap();                                                                                                \
    }                                                                                                          \
  } while (0)
#else
#define DF_DEVICE_CHECK(cond) \
  do {                        \
  } while (0)
#endif
