"""The public functional API of dalle_fast: dalle_fast.ops.<name>.

This package is the only place that knows backends: launchers, custom-op registration, fakes, autograd and
dispatch. Every function takes `backend=None | "triton" | "cuda" | "cpp" | "eager"`.
"""

from .._dispatch import BACKENDS, BackendUnavailable, use_backend
from .._dispatch import requested_backend as _requested_backend
from . import decode as _decode
from . import dvae as _dvae
from . import fused_step as _fused_step
from . import gumbel as _gumbel
from . import loss as _loss
from . import matmul as _matmul
from . import sampling as _sampling
from .attention import sparse_attention
from .decode import bind_decode_attention, sparse_decode_attention
from .dvae import categorical_kl_uniform, gumbel_quantize, logit_laplace_nll
from .fused_step import DecodeBlock, DecodeHead, bind_decode_step, decode_step
from .gumbel import gumbel_argmax, gumbel_noise, gumbel_softmax
from .loss import linear_cross_entropy
from .matmul import bind_linear, scale_filter, scaled_linear, scaled_matmul
from .sampling import sample

# The family that answers available_backends for each public op (each knows which kernels serve its ops).
_FAMILY = {
    **dict.fromkeys(("gumbel_noise", "gumbel_softmax", "gumbel_argmax"), _gumbel),
    **dict.fromkeys(("gumbel_quantize", "logit_laplace_nll", "categorical_kl_uniform"), _dvae),
    **dict.fromkeys(("scaled_matmul", "scaled_linear", "scale_filter"), _matmul),
    # every decode kernel backend serves the same head sizes and dtypes: the device decides
    "sparse_decode_attention": _decode,
    "decode_step": _fused_step,  # a whole decoding step of the transformer (CPU: cpp; eager everywhere)
    "sample": _sampling,  # temperature, top-k, top-p and Gumbel-max in one kernel
    "linear_cross_entropy": _loss,
}


def requested_backend() -> str | None:
    """The backend named by the innermost use_backend() context or by DALLE_FAST_BACKEND (None: automatic)."""
    return _requested_backend(None)[0]


def available_backends(op_name: str, device) -> list[str]:
    """The backends that can serve the public op `op_name` on `device`, in BACKENDS order. sparse_attention
    also depends on the head size and dtype: ask dalle_fast.ops.attention.available_backends(q)."""
    if op_name not in _FAMILY:
        names = sorted(_FAMILY)
        raise ValueError(f"op_name: expected one of {names}, got {op_name!r}")
    return _FAMILY[op_name].available_backends(op_name, device)


__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "DecodeBlock",
    "DecodeHead",
    "available_backends",
    "bind_decode_attention",
    "bind_decode_step",
    "bind_linear",
    "categorical_kl_uniform",
    "decode_step",
    "gumbel_argmax",
    "gumbel_noise",
    "gumbel_quantize",
    "gumbel_softmax",
    "linear_cross_entropy",
    "logit_laplace_nll",
    "requested_backend",
    "sample",
    "scale_filter",
    "scaled_linear",
    "scaled_matmul",
    "sparse_attention",
    "sparse_decode_attention",
    "use_backend",
]
