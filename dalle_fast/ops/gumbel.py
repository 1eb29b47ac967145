"""Gumbel-softmax family: gumbel_noise, gumbel_softmax, gumbel_argmax (DESIGN sections 2 and 3).

How one call travels: the public function validates its arguments, decides the seed (seed=None draws one
here, so forward and backward see the same noise), picks a backend (dalle_fast._dispatch) and calls that
backend's registered op:
    cpp / cuda  torch.ops.dalle_fast.<op>            C++ schemas in csrc/ops.cpp, kernels in csrc/cpu, csrc/cuda
    triton      torch.ops.dalle_fast.triton_<op>     torch.library.custom_op around dalle_fast.ops._triton_gumbel
    eager       dalle_fast.reference                 plain torch, differentiable by autograd
Every registered op has a fake (meta) implementation, and the softmax ops a registered autograd whose
backward recomputes the softmax from the logits and the seed: the logits are the only tensor saved.
"""

import math
import numbers

import torch

from .. import _dispatch, _extension, reference

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
EAGER_DTYPES = KERNEL_DTYPES + (torch.float64,)
OPS = ("gumbel_noise", "gumbel_softmax_fwd", "gumbel_softmax_bwd", "gumbel_argmax")


# Fakes, shared by the C++ ops and the Triton custom ops -------------------------------------------------


def _noise_fake(like, shape, seed, offset):
    return like.new_empty(shape)


def _softmax_fwd_fake(logits, tau, hard, dim, seed, offset):
    return logits.new_empty(logits.shape)


def _softmax_bwd_fake(grad, logits, tau, dim, seed, offset):
    if grad.shape != logits.shape or grad.device != logits.device:
        raise ValueError(
            f"gumbel_softmax_bwd: grad: expected shape {tuple(logits.shape)} on {logits.device}, "
            f"got {tuple(grad.shape)} on {grad.device}"
        )
    return logits.new_empty(logits.shape)


def _argmax_fake(logits, dim, seed, offset):
    shape = list(logits.shape)
    del shape[dim]
    return logits.new_empty(shape, dtype=torch.int64)


# Autograd, shared: both forward ops take (logits, tau, hard, dim, seed, offset) -------------------------


def _setup_context(ctx, inputs, output):
    logits, tau, _hard, dim, seed, offset = inputs
    ctx.save_for_backward(logits)
    ctx.args = (tau, dim, seed, offset)


def _make_backward(bwd_op):
    def backward(ctx, grad):
        (logits,) = ctx.saved_tensors
        return bwd_op(grad, logits, *ctx.args), None, None, None, None, None

    return backward


# The C++ ops (cpp and cuda backends) ---------------------------------------------------------------------

_fakes = {
    "gumbel_noise": _noise_fake,
    "gumbel_softmax_fwd": _softmax_fwd_fake,
    "gumbel_softmax_bwd": _softmax_bwd_fake,
    "gumbel_argmax": _argmax_fake,
}


def _register_fakes_and_autograd(prefix: str) -> None:
    """Fakes for dalle_fast::<prefix><op>, and the forward's autograd through its backward op."""
    for name, fake in _fakes.items():
        torch.library.register_fake(f"dalle_fast::{prefix}{name}")(fake)
    bwd = getattr(torch.ops.dalle_fast, f"{prefix}gumbel_softmax_bwd")
    torch.library.register_autograd(
        f"dalle_fast::{prefix}gumbel_softmax_fwd", _make_backward(bwd), setup_context=_setup_context
    )


if _extension.load() is not None:  # otherwise the schemas do not exist; the dispatcher reports load_error
    _register_fakes_and_autograd("")


# The Triton ops: launchers in _triton_gumbel, imported on first use (no triton import at package import) --


def _launchers():
    from . import _triton_gumbel

    return _triton_gumbel


@torch.library.custom_op("dalle_fast::triton_gumbel_noise", mutates_args=())
def _triton_noise(like: torch.Tensor, shape: list[int], seed: int, offset: int) -> torch.Tensor:
    return _launchers().noise(like, shape, seed, offset)


@torch.library.custom_op("dalle_fast::triton_gumbel_softmax_fwd", mutates_args=())
def _triton_softmax_fwd(logits: torch.Tensor, tau: float, hard: bool, dim: int, seed: int, offset: int) -> torch.Tensor:
    return _launchers().softmax_fwd(logits, tau, hard, dim, seed, offset)


@torch.library.custom_op("dalle_fast::triton_gumbel_softmax_bwd", mutates_args=())
def _triton_softmax_bwd(
    grad: torch.Tensor, logits: torch.Tensor, tau: float, dim: int, seed: int, offset: int
) -> torch.Tensor:
    return _launchers().softmax_bwd(grad, logits, tau, dim, seed, offset)


@torch.library.custom_op("dalle_fast::triton_gumbel_argmax", mutates_args=())
def _triton_argmax(logits: torch.Tensor, dim: int, seed: int, offset: int) -> torch.Tensor:
    return _launchers().argmax(logits, dim, seed, offset)


_register_fakes_and_autograd("triton_")


def registered_ops(backend: str) -> dict[str, object]:
    """The registered op behind each name for a kernel backend (for opcheck and tests)."""
    return _dispatch.registered_ops(OPS, backend)


# Validation ----------------------------------------------------------------------------------------------


def _signed(seed: int) -> int:
    """The int64 form of a 64-bit seed, as the registered ops take it."""
    return seed - 2**64 if seed >= 2**63 else seed


def _check_seed(seed, allow_none: bool = True) -> int:
    if seed is None and allow_none:
        # Drawn here, from torch's default CPU generator: torch.manual_seed makes runs reproducible.
        return int(torch.empty((), dtype=torch.int64).random_())
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed: expected {'None or ' if allow_none else ''}an integer in [0, 2**64), got {seed!r}")
    return int(seed)


def _check_offset(offset, numel: int) -> int:
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or offset < 0:
        raise ValueError(f"offset: expected an integer >= 0, got {offset!r}")
    if int(offset) + numel > 2**63:
        raise ValueError(f"offset: offset + numel must be at most 2**63, got offset={offset} for {numel} elements")
    return int(offset)


def _check_logits(logits, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in EAGER_DTYPES:
        raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.dim() == 0:
        raise ValueError(f"{name}: expected at least 1 dimension, got a 0-dim tensor")


def _check_dim(dim, ndim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not -ndim <= dim < ndim:
        raise IndexError(f"dim: expected an integer in [{-ndim}, {ndim - 1}] for a {ndim}-dim tensor, got {dim!r}")
    return int(dim) % ndim


def _check_tau(tau) -> float:
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau: expected a finite number > 0, got {tau!r}")
    return float(tau)


def _reasons_for(op: str, device: torch.device, dtype: torch.dtype):
    """reasons(backend) for one call: the backend's own reasons plus the dtypes its kernels take."""

    def reasons(backend: str) -> list[str]:
        why = _dispatch.backend_reasons(op, backend, device)
        if backend != "eager" and dtype not in KERNEL_DTYPES:
            why = why + [f"its kernels take float16, bfloat16 or float32, got {dtype}"]
        return why

    return reasons


def available_backends(op_name: str, device) -> list[str]:
    """Backends that can serve `op_name` ("gumbel_softmax", "gumbel_argmax", "gumbel_noise") on `device`."""
    ops = {"gumbel_noise": "gumbel_noise", "gumbel_softmax": "gumbel_softmax_fwd", "gumbel_argmax": "gumbel_argmax"}
    if op_name not in ops:
        raise ValueError(f"op_name: expected one of {sorted(ops)}, got {op_name!r}")
    device = torch.device(device)
    return [b for b in _dispatch.BACKENDS if not _dispatch.backend_reasons(ops[op_name], b, device)]


# Public API ----------------------------------------------------------------------------------------------


def gumbel_noise(shape, *, seed: int, offset: int = 0, device=None, dtype=torch.float32, backend=None):
    """The Gumbel noise every backend adds (DESIGN section 3), of logical shape `shape`.

    Element number n = offset + i (i = row-major index in `shape`) takes lane n % 4 of Philox4x32-10 keyed by
    `seed` at counter n // 4; the uniform u is triton's uint_to_uniform_float, and
    g = -log(max(-log(max(u, 2**-32)), 2**-24)), so g is always finite, in [-3.0993, 16.6355].
    Computed in fp32 (fp64 logs on the eager backend when dtype=torch.float64), returned in `dtype`.
    """
    if isinstance(shape, torch.Size | list | tuple):
        shape = [int(s) for s in shape]
    else:
        raise TypeError(f"shape: expected a sequence of ints, got {type(shape).__name__}")
    if any(s < 0 for s in shape):
        raise ValueError(f"shape: expected non-negative sizes, got {shape}")
    if dtype not in EAGER_DTYPES:
        raise TypeError(f"dtype: expected float16, bfloat16, float32 or float64, got {dtype}")
    device = torch.device("cpu") if device is None else torch.device(device)
    seed = _check_seed(seed, allow_none=False)
    offset = _check_offset(offset, math.prod(shape))
    name = _dispatch.select("gumbel_noise", device, backend, _reasons_for("gumbel_noise", device, dtype))
    if name == "eager":
        return reference.gumbel_noise(shape, seed, offset, device=device, dtype=dtype)
    like = torch.empty(0, device=device, dtype=dtype)
    return registered_ops(name)["gumbel_noise"](like, shape, _signed(seed), offset)


def gumbel_softmax(logits, tau=1.0, hard=False, dim=-1, *, seed=None, offset=0, backend=None):
    """softmax((logits + g) / tau, dim) with g = gumbel_noise(logits.shape, seed=seed, offset=offset).

    The semantics of torch.nn.functional.gumbel_softmax: hard=True returns the one-hot of the argmax in the
    forward pass and the soft gradient in the backward pass (straight-through). Math in fp32, output in the
    dtype of `logits`. The backward recomputes the softmax from the logits and the seed, so nothing but the
    logits is kept for it. seed=None draws a seed in [0, 2**63) from torch's default generator.
    """
    _check_logits(logits)
    tau = _check_tau(tau)
    if not isinstance(hard, bool):
        raise TypeError(f"hard: expected a bool, got {type(hard).__name__}")
    dim = _check_dim(dim, logits.dim())
    seed = _check_seed(seed)
    offset = _check_offset(offset, logits.numel())
    device = logits.device
    name = _dispatch.select("gumbel_softmax", device, backend, _reasons_for("gumbel_softmax_fwd", device, logits.dtype))
    if name == "eager":
        return reference.gumbel_softmax(logits, tau, hard, dim, seed, offset)
    return registered_ops(name)["gumbel_softmax_fwd"](logits, tau, hard, dim, _signed(seed), offset)


def gumbel_argmax(logits, dim=-1, *, seed=None, offset=0, backend=None):
    """argmax(logits + g, dim), int64: a sample from softmax(logits) along dim (Gumbel-max), forward only.

    For the same seed and offset it is the argmax of gumbel_softmax (tau does not move the argmax); sample at
    temperature T by passing logits / T. Ties go to the first index and NaN counts as the maximum, as in
    torch.argmax.
    """
    _check_logits(logits)
    dim = _check_dim(dim, logits.dim())
    if logits.shape[dim] == 0:
        raise ValueError(f"logits: expected a non-empty dim {dim} for the argmax, got shape {tuple(logits.shape)}")
    seed = _check_seed(seed)
    offset = _check_offset(offset, logits.numel())
    device = logits.device
    name = _dispatch.select("gumbel_argmax", device, backend, _reasons_for("gumbel_argmax", device, logits.dtype))
    if name == "eager":
        return reference.gumbel_argmax(logits, dim, seed, offset)
    return registered_ops(name)["gumbel_argmax"](logits, dim, _signed(seed), offset)
