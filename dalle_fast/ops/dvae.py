"""The dVAE's fused ops: gumbel_quantize, logit_laplace_nll, categorical_kl_uniform (DESIGN sections 2, 3, 5).

How one call travels (as in dalle_fast.ops.gumbel): the public function validates its arguments, decides
the seed, picks a backend and calls that backend's registered op:
    cpp / cuda  torch.ops.dalle_fast.<op>            schemas in csrc/ops.cpp, kernels in csrc/cpu/dvae.cpp,
                                                     csrc/cuda/dvae.cu (per-element math: dalle_fast/dvae.h)
    triton      torch.ops.dalle_fast.triton_<op>     custom ops around dalle_fast.ops._triton_dvae
    eager       dalle_fast.reference                 plain torch, differentiable by autograd

gumbel_quantize never materialises the [B, K, *spatial] relaxed one-hots: the forward saves for backward
the logits, the codebook and two [B, S] per-pixel tensors (the logsumexp of the scores, and the argmax in
hard mode); the backward recomputes the noise and the softmax from them. The losses save their inputs
(the KL also its [2, rows] per-row statistics).
"""

import math
import numbers

import torch

from .. import _dispatch, _extension, reference
from .gumbel import EAGER_DTYPES, KERNEL_DTYPES, _check_offset, _check_seed, _check_tau, _signed

OPS = (
    "gumbel_quantize_fwd",
    "gumbel_quantize_bwd",
    "logit_laplace_nll_fwd",
    "logit_laplace_nll_bwd",
    "categorical_kl_uniform_fwd",
    "categorical_kl_uniform_bwd",
)
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


# Fakes, shared by the C++ ops and the Triton custom ops -------------------------------------------------


def _quantize_fwd_fake(logits, weight, bias, tau, hard, seed, offset):
    B, S = logits.shape[0], math.prod(logits.shape[2:])
    out = logits.new_empty((logits.shape[0], weight.shape[0], *logits.shape[2:]))
    lse = logits.new_empty((B, S), dtype=torch.float32)
    idx = logits.new_empty((B, S) if hard else (0, 0), dtype=torch.int64)
    return out, lse, idx


def _quantize_bwd_fake(grad, logits, weight, lse, idx, tau, hard, seed, offset):
    return logits.new_empty(logits.shape), weight.new_empty(weight.shape)


def _nll_fwd_fake(x, mu, log_b, reduction):
    return x.new_empty(x.shape if reduction == 0 else (), dtype=torch.float32)


def _nll_bwd_fake(grad, x, mu, log_b, reduction):
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.shape)


def _kl_fwd_fake(logits, dim, reduction):
    shape = list(logits.shape)
    K = shape.pop(dim)
    del K
    out = logits.new_empty(shape if reduction == 0 else (), dtype=torch.float32)
    return out, logits.new_empty((2, math.prod(shape)), dtype=torch.float32)


def _kl_bwd_fake(grad, logits, stats, dim, reduction):
    return logits.new_empty(logits.shape)


_fakes = {
    "gumbel_quantize_fwd": _quantize_fwd_fake,
    "gumbel_quantize_bwd": _quantize_bwd_fake,
    "logit_laplace_nll_fwd": _nll_fwd_fake,
    "logit_laplace_nll_bwd": _nll_bwd_fake,
    "categorical_kl_uniform_fwd": _kl_fwd_fake,
    "categorical_kl_uniform_bwd": _kl_bwd_fake,
}


# Autograd ------------------------------------------------------------------------------------------------


def _quantize_setup(ctx, inputs, output):
    logits, weight, bias, tau, hard, seed, offset = inputs
    _out, lse, idx = output
    ctx.save_for_backward(logits, weight, lse, idx)
    ctx.args = (tau, hard, seed, offset)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(lse, idx)


def _make_quantize_backward(bwd_op):
    def backward(ctx, grad, _grad_lse, _grad_idx):
        logits, weight, lse, idx = ctx.saved_tensors
        dlogits, dweight = bwd_op(grad, logits, weight, lse, idx, *ctx.args)
        dbias = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dims = [0] + list(range(2, grad.dim()))
            dbias = grad.float().sum(dims).to(ctx.bias_dtype)
        return dlogits, dweight, dbias, None, None, None, None

    return backward


def _nll_setup(ctx, inputs, output):
    x, mu, log_b, reduction = inputs
    ctx.save_for_backward(x, mu, log_b)
    ctx.reduction = reduction


def _make_nll_backward(bwd_op):
    def backward(ctx, grad):
        x, mu, log_b = ctx.saved_tensors
        dx, dmu, dlb = bwd_op(grad, x, mu, log_b, ctx.reduction)
        return dx, dmu, dlb, None

    return backward


def _kl_setup(ctx, inputs, output):
    logits, dim, reduction = inputs
    _kl, stats = output
    ctx.save_for_backward(logits, stats)
    ctx.args = (dim, reduction)
    ctx.mark_non_differentiable(stats)


def _make_kl_backward(bwd_op):
    def backward(ctx, grad, _grad_stats):
        logits, stats = ctx.saved_tensors
        return bwd_op(grad, logits, stats, *ctx.args), None, None

    return backward


def _register_fakes_and_autograd(prefix: str) -> None:
    for name, fake in _fakes.items():
        torch.library.register_fake(f"dalle_fast::{prefix}{name}")(fake)
    ns = torch.ops.dalle_fast
    for fwd, backward, setup in (
        ("gumbel_quantize", _make_quantize_backward, _quantize_setup),
        ("logit_laplace_nll", _make_nll_backward, _nll_setup),
        ("categorical_kl_uniform", _make_kl_backward, _kl_setup),
    ):
        bwd = getattr(ns, f"{prefix}{fwd}_bwd")
        torch.library.register_autograd(f"dalle_fast::{prefix}{fwd}_fwd", backward(bwd), setup_context=setup)


if _extension.load() is not None:  # otherwise the schemas do not exist; the dispatcher reports load_error
    _register_fakes_and_autograd("")


# The Triton ops: launchers in _triton_dvae, imported on first use -----------------------------------------


def _launchers():
    from . import _triton_dvae

    return _triton_dvae


@torch.library.custom_op("dalle_fast::triton_gumbel_quantize_fwd", mutates_args=())
def _triton_quantize_fwd(
    logits: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tau: float,
    hard: bool,
    seed: int,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launchers().quantize_fwd(logits, weight, bias, tau, hard, seed, offset)


@torch.library.custom_op("dalle_fast::triton_gumbel_quantize_bwd", mutates_args=())
def _triton_quantize_bwd(
    grad: torch.Tensor,
    logits: torch.Tensor,
    weight: torch.Tensor,
    lse: torch.Tensor,
    idx: torch.Tensor,
    tau: float,
    hard: bool,
    seed: int,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launchers().quantize_bwd(grad, logits, weight, lse, idx, tau, hard, seed, offset)


@torch.library.custom_op("dalle_fast::triton_logit_laplace_nll_fwd", mutates_args=())
def _triton_nll_fwd(x: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor, reduction: int) -> torch.Tensor:
    return _launchers().nll_fwd(x, mu, log_b, reduction)


@torch.library.custom_op("dalle_fast::triton_logit_laplace_nll_bwd", mutates_args=())
def _triton_nll_bwd(
    grad: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor, reduction: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launchers().nll_bwd(grad, x, mu, log_b, reduction)


@torch.library.custom_op("dalle_fast::triton_categorical_kl_uniform_fwd", mutates_args=())
def _triton_kl_fwd(logits: torch.Tensor, dim: int, reduction: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _launchers().kl_fwd(logits, dim, reduction)


@torch.library.custom_op("dalle_fast::triton_categorical_kl_uniform_bwd", mutates_args=())
def _triton_kl_bwd(
    grad: torch.Tensor, logits: torch.Tensor, stats: torch.Tensor, dim: int, reduction: int
) -> torch.Tensor:
    return _launchers().kl_bwd(grad, logits, stats, dim, reduction)


_register_fakes_and_autograd("triton_")


def registered_ops(backend: str) -> dict[str, object]:
    """The registered op behind each name for a kernel backend (for opcheck and tests)."""
    return _dispatch.registered_ops(OPS, backend)


# Validation ----------------------------------------------------------------------------------------------


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in EAGER_DTYPES:
        raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_same_device(t, name: str, device: torch.device, ref_name: str) -> None:
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of {ref_name}), got {t.device}")


def _check_reduction(reduction) -> int:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of 'mean', 'sum', 'none', got {reduction!r}")
    return REDUCTIONS[reduction]


def _reasons_for(op: str, device: torch.device, dtypes):
    def reasons(backend: str) -> list[str]:
        why = _dispatch.backend_reasons(op, backend, device)
        if backend != "eager":
            bad = sorted({str(d) for d in dtypes if d not in KERNEL_DTYPES})
            if bad:
                why = why + [f"its kernels take float16, bfloat16 or float32, got {', '.join(bad)}"]
        return why

    return reasons


def available_backends(op_name: str, device) -> list[str]:
    """Backends that can serve `op_name` ("gumbel_quantize", "logit_laplace_nll", "categorical_kl_uniform")."""
    names = ("gumbel_quantize", "logit_laplace_nll", "categorical_kl_uniform")
    if op_name not in names:
        raise ValueError(f"op_name: expected one of {list(names)}, got {op_name!r}")
    device = torch.device(device)
    return [b for b in _dispatch.BACKENDS if not _dispatch.backend_reasons(f"{op_name}_fwd", b, device)]


# Public API ----------------------------------------------------------------------------------------------


def gumbel_quantize(logits, weight, bias=None, *, tau=1.0, hard=False, seed=None, offset=0, backend=None):
    """conv1x1(gumbel_softmax(logits, tau, hard, dim=1, seed=seed, offset=offset), weight, bias), fused.

    logits [B, K, *spatial] (codes on dim 1), weight [C, K] or the conv weight [C, K, 1, 1], bias [C] or None
    -> [B, C, *spatial] in the dtype of logits. The noise of logits element (b, k, ...) is the one
    gumbel_softmax adds (element number offset + its row-major index), so the result equals the unfused
    composition to float rounding. An online softmax over K feeds the codebook product directly: the
    [B, K, *spatial] relaxed one-hots are never materialised, forward or backward (the backward recomputes
    them from the logits and the seed). hard=True: the forward uses the one-hot of the argmax (a column of
    weight), the backward the soft gradient (straight-through), like gumbel_softmax. seed=None draws a seed.
    """
    _check_tensor(logits, "logits")
    if logits.dim() < 2:
        raise ValueError(f"logits: expected [B, K, *spatial] (at least 2 dims), got shape {tuple(logits.shape)}")
    _check_tensor(weight, "weight")
    K = logits.shape[1]
    if weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1):
        weight = weight.reshape(weight.shape[0], weight.shape[1])
    if weight.dim() != 2:
        raise ValueError(f"weight: expected [C, K] or [C, K, 1, 1], got shape {tuple(weight.shape)}")
    if weight.shape[1] != K:
        raise ValueError(
            f"weight: expected K = {K} input channels (logits.shape[1], the codes), got shape {tuple(weight.shape)}"
        )
    _check_same_device(weight, "weight", logits.device, "logits")
    dtypes = [logits.dtype, weight.dtype]
    if bias is not None:
        _check_tensor(bias, "bias")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias: expected shape ({weight.shape[0]},) (weight.shape[0]), got {tuple(bias.shape)}")
        _check_same_device(bias, "bias", logits.device, "logits")
        dtypes.append(bias.dtype)
    tau = _check_tau(tau)
    if not isinstance(hard, bool):
        raise TypeError(f"hard: expected a bool, got {type(hard).__name__}")
    seed = _check_seed(seed)
    offset = _check_offset(offset, logits.numel())
    device = logits.device
    name = _dispatch.select("gumbel_quantize", device, backend, _reasons_for("gumbel_quantize_fwd", device, dtypes))
    if name == "eager":
        return reference.gumbel_quantize(logits, weight, bias, tau=tau, hard=hard, seed=seed, offset=offset)
    fwd = registered_ops(name)["gumbel_quantize_fwd"]
    out, _lse, _idx = fwd(logits, weight, bias, tau, hard, _signed(seed), offset)
    return out


def logit_laplace_nll(x, mu, log_b, *, reduction="mean", backend=None):
    """-ln f(x | mu, b), b = exp(log_b), of the logit-Laplace density (paper App. A.3) for x in (0, 1):
        |logit(x) - mu| exp(-log_b) + log_b + ln x + ln(1 - x) + ln 2,
    elementwise (the three tensors broadcast), then reduced: "mean" (per subpixel), "sum" or "none".
    fp32 result (fp64 on the eager backend for fp64 inputs); one pass forward and one backward.
    """
    _check_tensor(x, "x")
    _check_tensor(mu, "mu")
    _check_tensor(log_b, "log_b")
    _check_same_device(mu, "mu", x.device, "x")
    _check_same_device(log_b, "log_b", x.device, "x")
    r = _check_reduction(reduction)
    try:
        shape = torch.broadcast_shapes(x.shape, mu.shape, log_b.shape)
    except RuntimeError as e:
        raise ValueError(
            f"x, mu, log_b: expected broadcastable shapes, got {tuple(x.shape)}, {tuple(mu.shape)}, "
            f"{tuple(log_b.shape)}"
        ) from e
    device = x.device
    dtypes = [x.dtype, mu.dtype, log_b.dtype]
    name = _dispatch.select("logit_laplace_nll", device, backend, _reasons_for("logit_laplace_nll_fwd", device, dtypes))
    if name == "eager":
        return reference.logit_laplace_nll(x, mu, log_b, reduction)
    dt = torch.promote_types(torch.promote_types(x.dtype, mu.dtype), log_b.dtype)
    x, mu, log_b = (t.to(dt).expand(shape) for t in (x, mu, log_b))
    return registered_ops(name)["logit_laplace_nll_fwd"](x, mu, log_b, r)


def categorical_kl_uniform(logits, dim=1, *, reduction="mean", backend=None):
    """KL(softmax(logits, dim) || uniform over the K = logits.shape[dim] codes) = sum_k q_k ln q_k + ln K.

    reduction: "mean" over the other positions (per code position), "sum", or "none" (logits' shape without
    dim). fp32 result (fp64 on the eager backend for fp64 logits); one pass forward and one backward.
    """
    _check_tensor(logits, "logits")
    if logits.dim() == 0:
        raise ValueError("logits: expected at least 1 dimension, got a 0-dim tensor")
    ndim = logits.dim()
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not -ndim <= dim < ndim:
        raise IndexError(f"dim: expected an integer in [{-ndim}, {ndim - 1}] for a {ndim}-dim tensor, got {dim!r}")
    dim = int(dim) % ndim
    r = _check_reduction(reduction)
    if logits.shape[dim] == 0:
        raise ValueError(f"logits: expected at least one code on dim {dim}, got shape {tuple(logits.shape)}")
    device = logits.device
    name = _dispatch.select(
        "categorical_kl_uniform", device, backend, _reasons_for("categorical_kl_uniform_fwd", device, [logits.dtype])
    )
    if name == "eager":
        return reference.categorical_kl_uniform(logits, dim, reduction)
    kl, _stats = registered_ops(name)["categorical_kl_uniform_fwd"](logits, dim, r)
    return kl
