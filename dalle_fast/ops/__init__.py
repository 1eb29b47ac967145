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

from . import dvae as _dvae_ops  # noqa: E402
from . import gumbel as _gumbel_ops  # noqa: E402


def available_backends(op_name: str, device) -> list[str]:  # noqa: F811 - extends gumbel's to the dVAE ops
    """Backends that can serve `op_name` (any public op of the gumbel and dVAE families) on `device`."""
    if op_name in ("gumbel_quantize", "logit_laplace_nll", "categorical_kl_uniform"):
        return _dvae_ops.available_backends(op_name, device)
    return _gumbel_ops.available_backends(op_name, device)


# Scaled matmul family (issue 4, DESIGN section 6).
from . import matmul as _matmul_ops  # noqa: E402
from .matmul import scale_filter, scaled_linear, scaled_matmul  # noqa: E402

__all__ += ["scale_filter", "scaled_linear", "scaled_matmul"]
_available_backends_before_matmul = available_backends


def available_backends(op_name: str, device) -> list[str]:  # noqa: F811 - extends it to the scaled matmul ops
    """Backends that can serve `op_name` (any public op of the gumbel, dVAE and scaled matmul families)."""
    if op_name in ("scaled_matmul", "scaled_linear", "scale_filter"):
        return _matmul_ops.available_backends(op_name, device)
    return _available_backends_before_matmul(op_name, device)


# The transformer's loss head (issue 6).
from .loss import linear_cross_entropy  # noqa: E402

__all__ += ["linear_cross_entropy"]
_available_backends_before_loss = available_backends


def available_backends(op_name: str, device) -> list[str]:  # noqa: F811 - extends it to the loss head
    """Backends that can serve `op_name` (any public op of dalle_fast.ops, the loss head included)."""
    if op_name == "linear_cross_entropy":
        return ["eager"]  # its kernels are future work (ops/loss.py)
    return _available_backends_before_loss(op_name, device)
