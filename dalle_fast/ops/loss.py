"""Fused (chunked) linear + cross-entropy: the transformer's loss head (issue 6).

linear_cross_entropy(x, weight, bias, target) = sum_i CE(x_i @ weight^T + bias, target_i), without ever holding
the [N, V] logits for the backward pass. The rows are processed in chunks of `chunk_size`: per chunk the fp32
logits, their log-sum-exp, the loss and the gradient of the loss with respect to the logits are computed,
and that gradient is folded at once into dx (rows of the chunk), dweight and dbias. What backward keeps is
dx [N, d], dweight [V, d] and dbias [V] (tensors of the inputs' sizes); backward only multiplies them by the
incoming gradient of the loss (a scalar). The live extra memory is one chunk's logits, [chunk_size, V].

    z_i = x_i W^T + b,  lse_i = logsumexp(z_i),  loss = sum_i (lse_i - z_i[t_i])
    d loss / d z_i = softmax(z_i) - onehot(t_i) =: G_i
    dx_i = G_i @ W,  dweight = sum_i G_i^T x_i,  dbias = sum_i G_i

How one call travels (as the other families): the public function validates, picks a backend and calls
    cpp / cuda  torch.ops.dalle_fast.linear_cross_entropy          schema in csrc/ops.cpp; chunk loop in
                csrc/include/dalle_fast/loss_chunks.h, fused row pass in csrc/cpu/loss.cpp, csrc/cuda/loss.cu
    triton      torch.ops.dalle_fast.triton_linear_cross_entropy  custom op around ops/_triton_loss.py
                (GEMMs on kernels/matmul.py, row pass kernels/loss.py)
    eager       the chunked composition below (torch ops), differentiable through a torch.autograd.Function
Per chunk the kernel backends run the logits GEMM, ONE fused row pass (bias, log-sum-exp, loss, and G written
over the logits in place) and the two gradient GEMMs; the registered op owns the logits buffer, so it stays
functional: (loss, dx, dweight, dbias) out, nothing mutated. Its registered autograd saves dx, dweight and
dbias and scales them by the incoming gradient.

Precision: the logits, the row pass and the accumulation of dweight / dbias are fp32 for every input dtype;
fp16 / bf16 inputs give an fp32 loss (a sum over many rows overflows fp16), gradients in the inputs' dtypes.
fp64 runs on the eager backend only (for tests).

Reference: the dense composition F.cross_entropy(F.linear(x, weight, bias), target, reduction="sum"), which
keeps the [N, V] log-softmax for backward.
"""

import torch

from .. import _dispatch, _extension

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
OPS = ("linear_cross_entropy",)


# The registered ops: fake and autograd, shared by the C++ op and the Triton custom op -------------------


def _fake(x, weight, bias, target, chunk_size, grad_x, grad_weight, grad_bias):
    loss = x.new_empty((), dtype=torch.float32)
    dx = x.new_empty(x.shape) if grad_x else x.new_empty((0,))
    dw = weight.new_empty(weight.shape) if grad_weight else weight.new_empty((0,))
    db = x.new_empty((weight.shape[0],)) if grad_bias and bias is not None else x.new_empty((0,))
    return loss, dx, dw, db


def _setup_context(ctx, inputs, output):
    _loss, dx, dw, db = output
    ctx.save_for_backward(dx, dw, db)
    ctx.mark_non_differentiable(dx, dw, db)


def _backward(ctx, grad, _gdx, _gdw, _gdb):
    dx, dw, db = ctx.saved_tensors
    need = ctx.needs_input_grad

    # A gradient the op did not compute is a 1-D [0] placeholder (dx and dweight are 2-D when computed, dbias
    # has V >= 1 elements). A 0-dim fp32 grad keeps t's dtype (dimensioned tensors win type promotion).
    computed = (dx.dim() == 2, dw.dim() == 2, db.numel() > 0)
    out = [t * grad if need[i] and computed[i] else None for i, t in enumerate((dx, dw, db))]
    return (*out, None, None, None, None, None)


def _register(name: str) -> None:
    torch.library.register_fake(f"dalle_fast::{name}")(_fake)
    torch.library.register_autograd(f"dalle_fast::{name}", _backward, setup_context=_setup_context)


if _extension.load() is not None:  # otherwise the schema does not exist; the dispatcher reports load_error
    _register("linear_cross_entropy")


@torch.library.custom_op("dalle_fast::triton_linear_cross_entropy", mutates_args=())
def _triton_linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    chunk_size: int,
    grad_x: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import _triton_loss  # triton is imported on first use, not at package import

    return _triton_loss.linear_cross_entropy(x, weight, bias, target, chunk_size, grad_x, grad_weight, grad_bias)


_register("triton_linear_cross_entropy")


def registered_ops(backend: str) -> dict[str, object]:
    """The registered op behind each name for a kernel backend (for opcheck and tests)."""
    return _dispatch.registered_ops(OPS, backend)


def _reasons_for(device: torch.device, dtype: torch.dtype):
    def reasons(backend: str) -> list[str]:
        why = _dispatch.backend_reasons("linear_cross_entropy", backend, device)
        if backend != "eager" and dtype not in KERNEL_DTYPES:
            why = why + [f"its kernels take float16, bfloat16 or float32, got {dtype}"]
        return why

    return reasons


def available_backends(op_name: str, device) -> list[str]:
    """Backends that can serve "linear_cross_entropy" on `device` (kernel backends: fp16, bf16, fp32)."""
    if op_name != "linear_cross_entropy":
        raise ValueError(f"op_name: expected 'linear_cross_entropy', got {op_name!r}")
    device = torch.device(device)
    return [b for b in _dispatch.BACKENDS if not _dispatch.backend_reasons("linear_cross_entropy", b, device)]


# The eager backend: the chunked composition in torch ops -------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _chunks(x, weight, bias, target, chunk_size, grads: tuple[bool, bool, bool]):
    """(loss, dx, dweight, dbias): the summed loss and, for the inputs flagged in `grads`, its gradients."""
    n = x.shape[0]
    need_x, need_w, need_b = grads
    need_b = need_b and bias is not None
    cd = _compute_dtype(x.dtype)
    w = weight.to(cd)
    b = None if bias is None else bias.to(cd)
    loss = torch.zeros((), dtype=cd, device=x.device)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None
    dw = torch.zeros_like(w) if need_w else None
    db = torch.zeros_like(b) if need_b else None
    for start in range(0, n, chunk_size):
        xc, tc = x[start : start + chunk_size].to(cd), target[start : start + chunk_size]
        logits = xc @ w.t() if b is None else torch.addmm(b, xc, w.t())
        lse = torch.logsumexp(logits, dim=1)
        loss += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
        if not (need_x or need_w or need_b):
            continue
        g = logits.sub_(lse[:, None]).exp_()  # softmax, in place: the chunk's logits are not needed any more
        g[torch.arange(g.shape[0], device=g.device), tc] -= 1
        if need_x:
            dx[start : start + chunk_size] = g @ w
        if need_w:
            dw.addmm_(g.t(), xc)
        if need_b:
            db += g.sum(0)
    dw = None if dw is None else dw.to(weight.dtype)
    db = None if db is None else db.to(bias.dtype)
    return loss, dx, dw, db


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and the gradients; backward scales the stored gradients (module doc)."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, chunk_size):
        need = tuple(ctx.needs_input_grad[:3])
        loss, dx, dw, db = _chunks(x, weight, bias, target, chunk_size, need)
        ctx.save_for_backward(dx, dw, db)
        return loss

    @staticmethod
    def backward(ctx, grad):
        dx, dw, db = ctx.saved_tensors
        return (
            None if dx is None else dx * grad,
            None if dw is None else dw * grad,
            None if db is None else db * grad,
            None,
            None,
        )


# Public API ----------------------------------------------------------------------------------------------


def linear_cross_entropy(x, weight, bias=None, target=None, *, chunk_size: int = 1024, backend=None):
    """sum_i cross_entropy(x_i @ weight^T + bias, target_i) without materialising the [N, V] logits for
    backward (see the module doc). Returns a 0-dim tensor: x's dtype for fp32 / fp64, fp32 for fp16 / bf16 x;
    divide by the token count for a mean.

    x: [N, d] float16, bfloat16, float32 or float64 (fp64: eager only), any strides; weight: [V, d] and bias: [V]
    (or None) of x's dtype and device; target: int64 [N] with values in [0, V); chunk_size: rows per chunk (the
    peak extra memory is chunk_size x V fp32 logits). Differentiable in x, weight and bias.
    backend: None (automatic: cpp on CPU, cuda on GPU), "cpp", "cuda", "triton" or "eager" (module doc).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"linear_cross_entropy: x: expected a 2-D tensor [N, d], got {_describe(x)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"linear_cross_entropy: x: expected float16, bfloat16, float32 or float64, got {x.dtype}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: weight: expected a tensor [V, {x.shape[1]}] (V classes, d of x), "
            f"got {_describe(weight)}"
        )
    if weight.shape[0] < 1:
        raise ValueError("linear_cross_entropy: weight: expected at least one class (row), got 0")
    tensors = [("weight", weight)]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"linear_cross_entropy: bias: expected a tensor [{weight.shape[0]}], got {_describe(bias)}"
            )
        tensors.append(("bias", bias))
    for name, t in tensors:
        if t.dtype != x.dtype:
            raise TypeError(f"linear_cross_entropy: {name}: expected x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"linear_cross_entropy: {name}: expected x's device {x.device}, got {t.device}")
    if not isinstance(target, torch.Tensor) or target.dtype != torch.int64 or tuple(target.shape) != (x.shape[0],):
        raise ValueError(
            f"linear_cross_entropy: target: expected an int64 tensor [{x.shape[0]}], got {_describe(target)}"
        )
    if target.device != x.device:
        raise ValueError(f"linear_cross_entropy: target: expected x's device {x.device}, got {target.device}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size: expected an int >= 1, got {chunk_size!r}")
    name = _dispatch.select("linear_cross_entropy", x.device, backend, _reasons_for(x.device, x.dtype))
    if target.numel() and not torch.compiler.is_compiling() and x.device.type != "meta":
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= weight.shape[0]:
            bad = lo if lo < 0 else hi
            raise ValueError(f"linear_cross_entropy: target: expected class ids in [0, {weight.shape[0]}), got {bad}")
    grad = torch.is_grad_enabled()
    need = (grad and x.requires_grad, grad and weight.requires_grad, grad and bias is not None and bias.requires_grad)
    if name == "eager":
        if not any(need):
            return _chunks(x, weight, bias, target, chunk_size, (False, False, False))[0]
        return _LinearCrossEntropy.apply(x, weight, bias, target, chunk_size)
    op = registered_ops(name)["linear_cross_entropy"]
    return op(x, weight, bias, target, chunk_size, *need)[0]


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__
