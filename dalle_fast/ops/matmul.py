"""Scaled matmul family: scaled_matmul, scaled_linear, scale_filter (DESIGN sections 2, 6 and 8).

How one call travels: the public function validates its arguments, splits `scale` into the registered ops'
(alpha: float, scale: 0-dim fp32 device tensor or None) pair, picks a backend (dalle_fast._dispatch) and
calls that backend's registered op:
    cpp / cuda  torch.ops.dalle_fast.<op>            C++ schemas in csrc/ops.cpp, kernels in csrc/cpu, csrc/cuda
    triton      torch.ops.dalle_fast.triton_<op>     torch.library.custom_op around dalle_fast.ops._triton_matmul
    eager       dalle_fast.reference                 plain torch, differentiable by autograd
The registered ops are functional and return the non-finite flag (int32 [1]); the public functions OR it
into the caller's `nonfinite_flag` tensor. Every registered op has a fake and a registered autograd whose
backward runs on the same op of the same backend:
    scaled_matmul   out = s * (a @ b) + bias:   da = s * (g @ b^T),  db = s * (a^T @ g),  dbias = sum g
    scale_filter    out = x * s (x / s):        dx = g * s (g / s)
The filter is not differentiated (a filtered element passes its gradient as if it had not been filtered),
and the scale tensor gets no gradient.
"""

import contextlib
import numbers

import torch

from .. import _dispatch, _extension, reference

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
EAGER_DTYPES = KERNEL_DTYPES + (torch.float64,)
_LOW = (torch.float16, torch.bfloat16)
OPS = ("scaled_matmul", "scale_filter")


# Fakes, shared by the C++ ops and the Triton custom ops -------------------------------------------------


def _matmul_fake(a, b, bias, alpha, scale, filter_nonfinite):
    if a.dim() < 2 or b.dim() != 2 or a.shape[-1] != b.shape[0]:
        raise ValueError(
            f"scaled_matmul: expected a [..., M, K] and b [K, N], got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    out = a.new_empty((*a.shape[:-1], b.shape[1]), dtype=b.dtype)
    return out, a.new_empty((1,), dtype=torch.int32)


def _scale_filter_fake(x, alpha, scale, invert, filter_nonfinite, dtype):
    return x.new_empty(x.shape, dtype=dtype), x.new_empty((1,), dtype=torch.int32)


# Autograd, shared: the backward runs on the same registered op ------------------------------------------


def _matmul_setup_context(ctx, inputs, output):
    a, b, bias, alpha, scale, _filter = inputs
    ctx.save_for_backward(a, b, scale)
    ctx.alpha = alpha
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _make_matmul_backward(op):
    def backward(ctx, grad, _grad_flag):
        a, b, scale = ctx.saved_tensors
        da = db = dbias = None
        if grad is None:
            return None, None, None, None, None, None
        if ctx.needs_input_grad[0]:
            da = op(grad, b.t(), None, ctx.alpha, scale, False)[0].to(a.dtype)
        if ctx.needs_input_grad[1]:
            db = op(a.flatten(0, -2).t(), grad.flatten(0, -2), None, ctx.alpha, scale, False)[0].to(b.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = grad.flatten(0, -2).sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return da, db, dbias, None, None, None

    return backward


def _scale_filter_setup_context(ctx, inputs, output):
    x, alpha, scale, invert, _filter, _dtype = inputs
    ctx.save_for_backward(scale)
    ctx.alpha, ctx.invert, ctx.x_dtype = alpha, invert, x.dtype


def _make_scale_filter_backward(op):
    def backward(ctx, grad, _grad_flag):
        (scale,) = ctx.saved_tensors
        dx = None
        if grad is not None and ctx.needs_input_grad[0]:
            dx = op(grad, ctx.alpha, scale, ctx.invert, False, ctx.x_dtype)[0]
        return dx, None, None, None, None, None

    return backward


def _register_fakes_and_autograd(prefix: str) -> None:
    """Fakes for dalle_fast::<prefix><op>, and each op's autograd through the same op."""
    mm = getattr(torch.ops.dalle_fast, f"{prefix}scaled_matmul")
    sf = getattr(torch.ops.dalle_fast, f"{prefix}scale_filter")
    torch.library.register_fake(f"dalle_fast::{prefix}scaled_matmul")(_matmul_fake)
    torch.library.register_fake(f"dalle_fast::{prefix}scale_filter")(_scale_filter_fake)
    torch.library.register_autograd(
        f"dalle_fast::{prefix}scaled_matmul", _make_matmul_backward(mm), setup_context=_matmul_setup_context
    )
    torch.library.register_autograd(
        f"dalle_fast::{prefix}scale_filter", _make_scale_filter_backward(sf), setup_context=_scale_filter_setup_context
    )


if _extension.load() is not None:  # otherwise the schemas do not exist; the dispatcher reports load_error
    _register_fakes_and_autograd("")


# The Triton ops: launchers in _triton_matmul, imported on first use (no triton import at package import) --


def _launchers():
    from . import _triton_matmul

    return _triton_matmul


@torch.library.custom_op("dalle_fast::triton_scaled_matmul", mutates_args=())
def _triton_scaled_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None,
    alpha: float,
    scale: torch.Tensor | None,
    filter_nonfinite: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launchers().scaled_matmul(a, b, bias, alpha, scale, filter_nonfinite)


@torch.library.custom_op("dalle_fast::triton_scale_filter", mutates_args=())
def _triton_scale_filter(
    x: torch.Tensor, alpha: float, scale: torch.Tensor | None, invert: bool, filter_nonfinite: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launchers().scale_filter(x, alpha, scale, invert, filter_nonfinite, dtype)


_register_fakes_and_autograd("triton_")


def registered_ops(backend: str) -> dict[str, object]:
    """The registered op behind each name for a kernel backend (for opcheck and tests)."""
    return _dispatch.registered_ops(OPS, backend)


def _op(backend: str, name: str):
    return registered_ops(backend)[name]


# Validation ----------------------------------------------------------------------------------------------


def _check_tensor(t, name: str, dtypes=EAGER_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected {names}, got {t.dtype}")


def _split_scale(scale, device: torch.device, name: str = "scale") -> tuple[float, torch.Tensor | None]:
    """A float or a 0-dim fp32 tensor on `device` -> the registered ops' (alpha, scale tensor)."""
    if isinstance(scale, torch.Tensor):
        if scale.dtype != torch.float32 or scale.numel() != 1 or scale.dim() > 1:
            raise TypeError(
                f"{name}: expected a float or a 0-dim float32 tensor, got a {scale.dtype} tensor of shape "
                f"{tuple(scale.shape)}"
            )
        if scale.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} (read there, no host sync), got {scale.device}")
        return 1.0, scale.reshape(())
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name}: expected a float or a 0-dim float32 tensor, got {type(scale).__name__}")
    return float(scale), None


def _check_flag(flag, device: torch.device) -> None:
    if flag is None:
        return
    if not isinstance(flag, torch.Tensor) or flag.dtype != torch.int32 or flag.numel() != 1:
        what = (
            f"a {flag.dtype} tensor of shape {tuple(flag.shape)}"
            if isinstance(flag, torch.Tensor)
            else type(flag).__name__
        )
        raise TypeError(f"nonfinite_flag: expected a one-element int32 tensor, got {what}")
    if flag.device != device:
        raise ValueError(f"nonfinite_flag: expected a tensor on {device}, got {flag.device}")


def _or_flag(nonfinite_flag, flag) -> None:
    if nonfinite_flag is not None:
        nonfinite_flag.view(1).bitwise_or_(flag)


def _reasons_for(op: str, device: torch.device, dtypes: tuple[torch.dtype, ...]):
    def reasons(backend: str) -> list[str]:
        why = _dispatch.backend_reasons(op, backend, device)
        bad = [d for d in dtypes if d not in KERNEL_DTYPES]
        if backend != "eager" and bad:
            why = why + [f"its kernels take float16, bfloat16 or float32, got {bad[0]}"]
        return why

    return reasons


def _check_matmul_args(a, b, bias) -> torch.dtype:
    """The output dtype; raises for anything the op does not take."""
    _check_tensor(a, "a")
    _check_tensor(b, "b")
    mixed = a.dtype == torch.float32 and b.dtype in _LOW
    if a.dtype != b.dtype and not mixed:
        raise TypeError(
            f"b: expected the dtype of a (or float16/bfloat16 with a float32 a), got a {a.dtype}, b {b.dtype}"
        )
    if a.dim() < 2:
        raise ValueError(f"a: expected [..., M, K] (at least 2 dims), got shape {tuple(a.shape)}")
    if b.dim() != 2:
        raise ValueError(f"b: expected [K, N] (2 dims), got shape {tuple(b.shape)}")
    if b.shape[0] != a.shape[-1]:
        raise ValueError(f"b: expected {a.shape[-1]} rows (a's last dim), got shape {tuple(b.shape)}")
    if b.device != a.device:
        raise ValueError(f"b: expected a tensor on {a.device}, got {b.device}")
    out_dtype = b.dtype
    if bias is not None:
        _check_tensor(bias, "bias", (out_dtype, torch.float32))
        if bias.dim() != 1 or bias.shape[0] != b.shape[1]:
            raise ValueError(f"bias: expected shape [{b.shape[1]}], got {list(bias.shape)}")
        if bias.device != a.device:
            raise ValueError(f"bias: expected a tensor on {a.device}, got {bias.device}")
    return out_dtype


def available_backends(op_name: str, device) -> list[str]:
    """Backends that can serve `op_name` ("scaled_matmul", "scaled_linear", "scale_filter") on `device`."""
    ops = {"scaled_matmul": "scaled_matmul", "scaled_linear": "scaled_matmul", "scale_filter": "scale_filter"}
    if op_name not in ops:
        raise ValueError(f"op_name: expected one of {sorted(ops)}, got {op_name!r}")
    device = torch.device(device)
    return [b for b in _dispatch.BACKENDS if not _dispatch.backend_reasons(ops[op_name], b, device)]


# Public API ----------------------------------------------------------------------------------------------


def scaled_matmul(a, b, bias=None, *, scale=1.0, filter_nonfinite=False, nonfinite_flag=None, backend=None):
    """scale * (a @ b) + bias with fp32 accumulation, in the input dtype, the epilogue fused into the GEMM.

    a [..., M, K] (batched), b [K, N], bias [N] (a's dtype or fp32). a and b share a dtype (fp16, bf16, fp32;
    fp64 on the eager backend), or a is fp32 and b fp16/bf16: then a is multiplied by the scale and rounded
    to b's dtype as it is read, and the result has b's dtype. `scale` is a float or a 0-dim fp32 tensor on
    a's device (read on the device: no host sync, no recompile when its value changes).
    filter_nonfinite=True writes every element that is not finite in the output dtype as 0 and, when
    `nonfinite_flag` (a one-element int32 tensor on a's device) is given, ORs 1 into it if there was any.
    Differentiable in a, b and bias (the backward runs on the same kernels).
    """
    out_dtype = _check_matmul_args(a, b, bias)
    alpha, scale_t = _split_scale(scale, a.device)
    if not isinstance(filter_nonfinite, bool):
        raise TypeError(f"filter_nonfinite: expected a bool, got {type(filter_nonfinite).__name__}")
    _check_flag(nonfinite_flag, a.device)
    del out_dtype
    name = _dispatch.select(
        "scaled_matmul", a.device, backend, _reasons_for("scaled_matmul", a.device, (a.dtype, b.dtype))
    )
    if name == "eager":
        out, flag = reference.scaled_matmul(a, b, bias, alpha, scale_t, filter_nonfinite)
    else:
        out, flag = _op(name, "scaled_matmul")(a, b, bias, alpha, scale_t, filter_nonfinite)
    _or_flag(nonfinite_flag, flag)
    return out


def scale_filter(x, scale=1.0, *, invert=False, filter_nonfinite=False, nonfinite_flag=None, dtype=None, backend=None):
    """x * scale (x / scale with invert=True) in fp32 math, rounded to `dtype` (default x's), in one pass.

    With filter_nonfinite=True every element that is not finite in `dtype` is written as 0 and, when
    `nonfinite_flag` is given, 1 is ORed into it if there was any. This is the block-entry pass of the
    per-resblock gradient scaling (unscale, filter and flag the gradient leaving a block, cast to fp32) and
    the scaled cast at the block's exit (DESIGN section 6). Differentiable in x.
    """
    _check_tensor(x, "x")
    dtype = x.dtype if dtype is None else dtype
    if dtype not in EAGER_DTYPES:
        raise TypeError(f"dtype: expected float16, bfloat16, float32 or float64, got {dtype}")
    alpha, scale_t = _split_scale(scale, x.device)
    for flag_name, v in (("invert", invert), ("filter_nonfinite", filter_nonfinite)):
        if not isinstance(v, bool):
            raise TypeError(f"{flag_name}: expected a bool, got {type(v).__name__}")
    _check_flag(nonfinite_flag, x.device)
    name = _dispatch.select("scale_filter", x.device, backend, _reasons_for("scale_filter", x.device, (x.dtype, dtype)))
    if name == "eager":
        out, flag = reference.scale_filter(x, alpha, scale_t, invert, filter_nonfinite, dtype)
    else:
        out, flag = _op(name, "scale_filter")(x, alpha, scale_t, invert, filter_nonfinite, dtype)
    _or_flag(nonfinite_flag, flag)
    return out


# The linear layer ----------------------------------------------------------------------------------------


def _linear_forward(x, w, bias, out_dtype, backend):
    """x @ w^T + bias on the backend's scaled_matmul (w already in x's dtype), cast to out_dtype."""
    b = bias if bias is None or bias.dtype in (x.dtype, torch.float32) else bias.to(x.dtype)
    if backend == "eager":
        y, _ = reference.scaled_matmul(x, w.t(), b, 1.0, None, False)
    else:
        # differentiated by the caller: skip the op's own autograd layer (eagerly; dynamo traces the plain call)
        guard = contextlib.nullcontext() if torch.compiler.is_compiling() else torch._C._AutoDispatchBelowAutograd()
        with guard:
            y, _ = _op(backend, "scaled_matmul")(x, w.t(), b, 1.0, None, False)
    if out_dtype is not None and out_dtype != y.dtype:
        y = y.to(out_dtype)
    return y


def bind_linear(x, weight, bias=None, *, backend=None):
    """`f(x)`: the inference forward of scaled_linear(x, weight, bias) for inputs like x (same dtype, device,
    feature size), checked and resolved once, here: the backend chosen, the weight rounded to x's dtype once
    (a copy in that dtype while f lives, when the weight is stored in another), no autograd node. For decoding
    loops, whose per-step products are small enough that scaled_linear's checks cost more than they do."""
    _check_tensor(x, "x")
    _check_tensor(weight, "weight")
    if x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight: expected [out_features, {x.shape[-1] if x.dim() else '?'}] for x of shape "
                         f"{tuple(x.shape)}, got {tuple(weight.shape)}")  # fmt: skip
    if weight.device != x.device:
        raise ValueError(f"weight: expected a tensor on {x.device}, got {weight.device}")
    if bias is not None:
        _check_tensor(bias, "bias")
        if bias.shape != (weight.shape[0],) or bias.device != x.device:
            raise ValueError(f"bias: expected shape [{weight.shape[0]}] on {x.device}, got {list(bias.shape)} on "
                             f"{bias.device}")  # fmt: skip
    name = _dispatch.select("scaled_linear", x.device, backend, _reasons_for("scaled_matmul", x.device, (x.dtype,)))
    wt = weight.detach().to(x.dtype).t()
    b = None if bias is None else bias.detach()
    if b is not None and b.dtype not in (x.dtype, torch.float32):
        b = b.to(x.dtype)
    if name == "eager":
        return lambda x: reference.scaled_matmul(x, wt, b, 1.0, None, False)[0]
    op = _op(name, "scaled_matmul").default  # the overload itself: no overload resolution per call
    # the caller runs without autograd (inference): skip the op's autograd layer as _linear_forward does
    return lambda x: op(x, wt, b, 1.0, None, False)[0]


class _ScaledLinearFn(torch.autograd.Function):
    """y = x @ W^T + b on scaled_matmul; the backward's three products carry grad_scale (see scaled_linear)."""

    @staticmethod
    def forward(ctx, x, weight, bias, grad_scale, out_dtype, backend):
        w = weight.to(x.dtype)
        y = _linear_forward(x, w, bias, out_dtype, backend)
        ctx.save_for_backward(x, w, grad_scale)
        ctx.backend = backend
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, w, gs = ctx.saved_tensors
        backend = ctx.backend

        def mm(a, b):
            if backend == "eager":
                return reference.scaled_matmul(a, b, None, 1.0, gs, False)[0]
            return _op(backend, "scaled_matmul")(a, b, None, 1.0, gs, False)[0]

        if grad.dtype != x.dtype and grad.dtype != torch.float32:
            grad = grad.float()  # e.g. a bf16 grad of an fp16 layer: let the fp32 path scale and round it
        g2 = grad.flatten(0, -2)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = mm(grad, w).to(x.dtype)  # s * (g @ W): the entering scale as the GEMM's scale
        if ctx.needs_input_grad[1]:
            dw = mm(g2.t(), x.flatten(0, -2)).to(ctx.dtypes[0])
        if ctx.dtypes[1] is not None and ctx.needs_input_grad[2]:
            db = g2.sum(0, dtype=torch.float32)
            if gs is not None:
                db = db * gs
            db = db.to(ctx.dtypes[1])
        return dx, dw, db, None, None, None


def scaled_linear(x, weight, bias=None, *, grad_scale=None, out_dtype=None, backend=None):
    """x @ weight^T + bias on scaled_matmul (nn.functional.linear's layout), computed in x's dtype.

    weight [out, in] and bias [out] may be fp32 master parameters: they are cast to x's dtype for the product
    (bias is added in fp32) and their gradients come back in their own dtype. `out_dtype` (e.g. float32 at
    the exit of an fp16 block) casts the output, so the backward receives the gradient in that dtype.

    grad_scale (a float or 0-dim fp32 device tensor, default none) multiplies the gradient arriving at the
    output before the three backward products, dx = s * (g @ W), dW = s * (g^T @ x), db = s * sum(g), as the
    scale of those GEMMs: with an fp32 gradient (out_dtype=float32) and an fp16 layer it rides on g as the
    kernel reads it, so small gradients are lifted before their rounding to fp16 (DESIGN section 6: the
    gradient entering a resblock is multiplied by the block's scale in the output projection's backward).
    The forward does not depend on grad_scale.
    """
    _check_tensor(x, "x")
    _check_tensor(weight, "weight")
    if x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"weight: expected [out_features, {x.shape[-1] if x.dim() else '?'}] for x of shape {tuple(x.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    if weight.device != x.device:
        raise ValueError(f"weight: expected a tensor on {x.device}, got {weight.device}")
    if bias is not None:
        _check_tensor(bias, "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias: expected shape [{weight.shape[0]}], got {list(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias: expected a tensor on {x.device}, got {bias.device}")
    gs = None
    if grad_scale is not None:
        alpha, gs = _split_scale(grad_scale, x.device, "grad_scale")
        if gs is None:
            gs = torch.tensor(alpha, dtype=torch.float32, device=x.device)
    if out_dtype is not None and out_dtype not in EAGER_DTYPES:
        raise TypeError(f"out_dtype: expected a floating dtype, got {out_dtype}")
    squeeze = x.dim() == 1
    x2 = x.unsqueeze(0) if squeeze else x
    name = _dispatch.select("scaled_linear", x.device, backend, _reasons_for("scaled_matmul", x.device, (x.dtype,)))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        y = _ScaledLinearFn.apply(x2, weight, bias, gs, out_dtype, name)
    else:  # inference (e.g. each decoding step): the same forward without an autograd node
        y = _linear_forward(x2, weight.to(x.dtype), bias, out_dtype, name)
    return y.squeeze(0) if squeeze else y
