"""Fused (chunked) linear + cross-entropy: the transformer's loss head (issue 6).

linear_cross_entropy(x, weight, bias, target) = sum_i CE(x_i @ weight^T + bias, target_i), without ever holding
the [N, V] logits for the backward pass. The rows are processed in chunks of `chunk_size`: per chunk the fp32
logits, their log-sum-exp, the loss and the gradient of the loss with respect to the logits are computed,
and that gradient is folded at once into dx (rows of the chunk), dweight and dbias. What backward keeps is
dx [N, d], dweight [V, d] and dbias [V] (tensors of the inputs' sizes); backward only multiplies them by the
incoming gradient of the loss (a scalar). The live extra memory is one chunk's logits, [chunk_size, V].

    d loss / d logits_i = softmax(logits_i) - onehot(target_i)
    dx_i = (d loss / d logits_i) @ weight,  dweight = sum_i (d loss / d logits_i)^T x_i,  dbias = sum_i (...)

Implemented with eager torch ops (one GEMM for the logits and two for the gradients per chunk, in the
inputs' precision, fp32 or fp64). A kernel version that fuses the log-sum-exp and the softmax-minus-one-hot
into the GEMM epilogues (and runs the logits GEMM on tensor cores) is future work; until then every backend
name but "eager" is refused (no silent fallback): callers pass backend="eager" or None.

Reference: the dense composition F.cross_entropy(F.linear(x, weight, bias), target, reduction="sum"), which
keeps the [N, V] log-softmax for backward.
"""

import torch

from .._dispatch import select

DTYPES = (torch.float32, torch.float64)


def _reasons(backend: str) -> list[str]:
    if backend == "eager":
        return []
    return [f"linear_cross_entropy has no {backend} kernel yet (the chunked eager composition serves every device)"]


def _chunks(x, weight, bias, target, chunk_size, grads: tuple[bool, bool, bool]):
    """(loss, dx, dweight, dbias): the summed loss and, for the inputs flagged in `grads`, its gradients."""
    n = x.shape[0]
    need_x, need_w, need_b = grads
    loss = torch.zeros((), dtype=x.dtype, device=x.device)
    dx = torch.empty_like(x) if need_x else None
    dw = torch.zeros_like(weight) if need_w else None
    db = torch.zeros_like(bias) if need_b else None
    for start in range(0, n, chunk_size):
        xc, tc = x[start : start + chunk_size], target[start : start + chunk_size]
        logits = xc @ weight.t() if bias is None else torch.addmm(bias, xc, weight.t())
        lse = torch.logsumexp(logits, dim=1)
        loss += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
        if not (need_x or need_w or need_b):
            continue
        g = logits.sub_(lse[:, None]).exp_()  # softmax, in place: the chunk's logits are not needed any more
        g[torch.arange(g.shape[0], device=g.device), tc] -= 1
        if need_x:
            torch.mm(g, weight, out=dx[start : start + chunk_size])
        if need_w:
            dw.addmm_(g.t(), xc)
        if need_b:
            db += g.sum(0)
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


def linear_cross_entropy(x, weight, bias=None, target=None, *, chunk_size: int = 1024, backend=None):
    """sum_i cross_entropy(x_i @ weight^T + bias, target_i) without materialising the [N, V] logits for
    backward (see the module doc). Returns a 0-dim tensor of x's dtype; divide by the token count for a mean.

    x: [N, d] float32 or float64 (any strides); weight: [V, d] and bias: [V] (or None) of x's dtype and device;
    target: int64 [N] with values in [0, V); chunk_size: rows per chunk (the peak extra memory is
    chunk_size x V logits). Differentiable in x, weight and bias. backend: None or "eager" (module doc).
    """
    select("linear_cross_entropy", getattr(x, "device", torch.device("cpu")), backend, _reasons)
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"linear_cross_entropy: x: expected a 2-D tensor [N, d], got {_describe(x)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"linear_cross_entropy: x: expected float32 or float64, got {x.dtype}")
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
    if target.numel() and not torch.compiler.is_compiling():
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= weight.shape[0]:
            bad = lo if lo < 0 else hi
            raise ValueError(f"linear_cross_entropy: target: expected class ids in [0, {weight.shape[0]}), got {bad}")
    if not torch.is_grad_enabled():
        return _chunks(x, weight, bias, target, chunk_size, (False, False, False))[0]
    return _LinearCrossEntropy.apply(x, weight, bias, target, chunk_size)


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__
