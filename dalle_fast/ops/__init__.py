"""The public functional API of dalle_fast: dalle_fast.ops.<name>.

This package is the only place that knows backends: launchers, custom-op registration, fakes, autograd and
dispatch. Every function takes `backend=None | "triton" | "cuda" | "cpp" | "eager"`.
"""

from .._dispatch import BACKENDS, BackendUnavailable, use_backend
from .attention import sparse_attention
from .gumbel import available_backends, gumbel_argmax, gumbel_noise, gumbel_softmax

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "available_backends",
    "gumbel_argmax",
    "gumbel_noise",
    "gumbel_softmax",
    "sparse_attention",
    "use_backend",
]

from .dvae import categorical_kl_uniform, gumbel_quantize, logit_laplace_nll  # noqa: E402

__all__ += ["categorical_kl_uniform", "gumbel_quantize", "logit_laplace_nll"]
