"""Launcher of the Triton loss head (kernels/loss.py), mirroring the C++ schema of csrc/ops.cpp:

    linear_cross_entropy(x, weight, bias, target, chunk_size, grad_x, grad_weight, grad_bias)
        -> (loss fp32 0-dim, dx, dweight, dbias)

Per chunk of rows, all on our Triton kernels:
    acc = x_c @ W^T            kernels/matmul.py _scaled_matmul_fwd_kernel, fp32 output (fp16/bf16 operands on
                               tensor cores, fp32 "ieee" dots for fp32), into the op-owned [chunk, V] buffer
    row pass                   kernels/loss.py: bias, log-sum-exp, loss, G = softmax - onehot over acc in place
    dx_c = G @ W               the matmul kernel with PRESCALE_A: G (fp32) is rounded to W's dtype as it is
                               loaded (fp16/bf16), the product accumulates in fp32, dx_c is written in x's dtype
    dW += G^T @ x_c            the same kernel into fp32 (the first chunk straight into the fp32 accumulator,
                               later chunks into a [V, d] scratch that is added: the kernel has no C += mode)
    db += colsum(G)            torch's sum over the chunk (fp32)
Configurations: LOSS_CONFIGS on sm_90, else the matmul launcher's table (INTERPRETER_CONFIG, 64-wide tiles, under
TRITON_INTERPRET=1: the interpreter pays per program); the row pass
uses ROW_BLOCK / ROW_WARPS (scripts/triton_aot_check.py compiles them for sm_90).
"""

from __future__ import annotations

import os

import torch

from . import _triton_matmul as _mm

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ROW_BLOCK = 2048
ROW_WARPS = 8
INTERPRETER_ROW_BLOCK = 256
INTERPRETER_CONFIG = _mm.MatmulConfig(64, 64, 64, 4, 4, 1)  # few, larger tiles: the interpreter pays per program


def _kernels():
    from dalle_fast.kernels import loss  # triton is imported here, on first launch

    return loss


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(x, weight, bias, target, chunk_size) -> None:
    op = "linear_cross_entropy"
    for name, t in (("x", x), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        _mm._check_tensor(op, name, t)
    if x.dim() != 2:
        raise ValueError(f"{op}: x: expected a 2-D tensor [N, d], got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.shape[0] < 1:
        raise ValueError(f"{op}: weight: expected [V, {x.shape[1]}] with V >= 1, got shape {tuple(weight.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name}: expected x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name}: expected x's device {x.device}, got {t.device}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: bias: expected shape [{weight.shape[0]}], got {list(bias.shape)}")
    if not isinstance(target, torch.Tensor) or target.dtype != torch.int64 or tuple(target.shape) != (x.shape[0],):
        got = f"{target.dtype} of shape {tuple(target.shape)}" if isinstance(target, torch.Tensor) else type(target)
        raise ValueError(f"{op}: target: expected an int64 tensor [{x.shape[0]}], got {got}")
    if target.device != x.device:
        raise ValueError(f"{op}: target: expected x's device {x.device}, got {target.device}")
    if chunk_size < 1:
        raise ValueError(f"{op}: chunk_size: expected >= 1, got {chunk_size}")


# The GEMMs' configurations. The matmul family's sm_90 fp16/bf16 entry (128x128x64, 8 warps, 3 stages) spills on
# sm_90 with the strides the loss head feeds it (W^T and G^T: the K-contiguous operand on the other side, and
# the fp32 G rounded as it is loaded), so the loss head has its own entry there (scripts/triton_aot_check.py).
LOSS_CONFIGS: dict[int, dict[str, _mm.MatmulConfig]] = {
    9: {"low": _mm.MatmulConfig(128, 64, 64, 8, 8, 3), "fp32": _mm.CONFIGS[9]["fp32"]},
}


def config_for(capability: tuple[int, int] | None, dtype: torch.dtype) -> _mm.MatmulConfig:
    """The GEMM configuration for a device of `capability` (None: the interpreter) and operand dtype."""
    if capability is None:
        return INTERPRETER_CONFIG
    own = LOSS_CONFIGS.get(capability[0])
    return own[_mm.operand_class(dtype)] if own else _mm.config_for(capability, dtype)


def _config(device: torch.device, dtype: torch.dtype) -> _mm.MatmulConfig:
    return config_for(None if device.type == "cpu" else torch.cuda.get_device_capability(device), dtype)


def _matmul_into(a, b, out, cfg, flag) -> None:
    """out = a @ b (a fp32 with b fp16/bf16: a rounded to b's dtype as loaded), no scale, bias or filter."""
    prescale = a.dtype == torch.float32 and b.dtype != torch.float32
    _mm._launch_matmul(a, b, None, None, out, flag, 1.0, False, prescale, cfg)


def rows(acc, bias32, target, loss, write_grad: bool) -> None:
    """The fused row pass over acc [c, V] fp32 (unit column stride), in place (kernels/loss.py)."""
    c, V = acc.shape
    if c == 0:
        return
    block = INTERPRETER_ROW_BLOCK if _interpreting() else ROW_BLOCK
    _kernels()._cross_entropy_rows_kernel[(c,)](
        acc, bias32 if bias32 is not None else acc, target, loss,
        acc.stride(0),
        V,
        HAS_BIAS=bias32 is not None, WRITE_GRAD=write_grad, BLOCK_V=block,
        num_warps=ROW_WARPS,
    )  # fmt: skip


def linear_cross_entropy(x, weight, bias, target, chunk_size, grad_x, grad_weight, grad_bias):
    _check(x, weight, bias, target, chunk_size)
    N, d = x.shape
    V = weight.shape[0]
    grad_bias = grad_bias and bias is not None
    any_grad = grad_x or grad_weight or grad_bias
    dev = x.device
    cfg = _config(dev, x.dtype)
    flag = torch.zeros(1, dtype=torch.int32, device=dev)
    bias32 = bias.float().contiguous() if bias is not None else None
    tgt = target.contiguous()
    loss_rows = torch.empty(N, dtype=torch.float32, device=dev)
    dx = torch.empty((N, d), dtype=x.dtype, device=dev) if grad_x else x.new_empty((0,))
    dw32 = torch.zeros((V, d), dtype=torch.float32, device=dev) if grad_weight else None
    db32 = torch.zeros(V, dtype=torch.float32, device=dev) if grad_bias else None
    scratch = None
    acc_buf = torch.empty((min(chunk_size, max(N, 1)), V), dtype=torch.float32, device=dev)
    wt = weight.t()
    for start in range(0, N, chunk_size):
        c = min(chunk_size, N - start)
        xc = x[start : start + c]
        acc = acc_buf[:c]
        if d == 0:
            acc.zero_()
        else:
            _matmul_into(xc, wt, acc, cfg, flag)
        rows(acc, bias32, tgt[start : start + c], loss_rows[start : start + c], any_grad)
        if grad_x and d:
            _matmul_into(acc, weight, dx[start : start + c], cfg, flag)
        elif grad_x:
            dx[start : start + c].zero_()
        if grad_weight and d:
            if start == 0:
                _matmul_into(acc.t(), xc, dw32, cfg, flag)
            else:
                if scratch is None:
                    scratch = torch.empty_like(dw32)
                _matmul_into(acc.t(), xc, scratch, cfg, flag)
                dw32 += scratch
        if grad_bias:
            db32 += acc.sum(0)
    loss = loss_rows.sum()
    dw = dw32.to(weight.dtype) if grad_weight else weight.new_empty((0,))
    db = db32.to(bias.dtype) if grad_bias else x.new_empty((0,))
    return loss, dx, dw, db
