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

# Scaled matmul family (DESIGN section 6).
from .matmul import scale_filter, scaled_linear, scaled_matmul  # noqa: E402

__all__ += ["scale_filter", "scaled_linear", "scaled_matmul"]
