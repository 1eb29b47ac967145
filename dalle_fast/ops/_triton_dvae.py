"""Launchers of the Triton dVAE kernels (kernels/dvae.py), mirroring the C++ schemas of csrc/ops.cpp:

    quantize_fwd(logits, weight, bias, tau, hard, seed, offset) -> (out, lse, idx)
    quantize_bwd(grad, logits, weight, lse, idx, tau, hard, seed, offset) -> (dlogits, dweight)
    nll_fwd(x, mu, log_b, reduction) -> Tensor;  nll_bwd(grad, x, mu, log_b, reduction) -> (dx, dmu, dlog_b)
    kl_fwd(logits, dim, reduction) -> (kl, stats);  kl_bwd(grad, logits, stats, dim, reduction) -> dlogits

reduction: 0 none, 1 mean, 2 sum. Launch configurations come from fixed tables (`quantize_config`,
`kl_config`, NLL_BLOCK): no autotuning, so the interpreter runs exactly what the GPU runs. fp32 logits use
tl.dot with input_precision="ieee" (the fp32 parity DESIGN section 8 promises) unless torch's
cudnn.allow_tf32 switch (what F.conv2d of the unfused composition follows) is on for a GPU tensor;
fp16 / bf16 logits "tf32"; the codebook gradient always "ieee".
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from ._triton_gumbel import _check_int, _check_tau, _check_tensor, _next_pow2

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_GRAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
NLL_BLOCK = 1024


def _kernels():
    from dalle_fast.kernels import dvae  # triton is imported here, on first launch

    return dvae


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_reduction(op: str, reduction) -> int:
    if isinstance(reduction, bool) or reduction not in (0, 1, 2):
        raise ValueError(f"{op}: reduction: expected 0 (none), 1 (mean) or 2 (sum), got {reduction!r}")
    return int(reduction)


# ----------------------------------------------------------------------------------------------------
# gumbel_quantize
# ----------------------------------------------------------------------------------------------------


class QuantizeConfig(NamedTuple):
    block_k: int
    block_s: int
    block_c: int
    num_warps: int


def quantize_config(kernel: str, K: int, S: int, C: int) -> QuantizeConfig:
    """The fixed launch table of the three gumbel_quantize kernels ("fwd", "dx", "dw").

    Sized by scripts/triton_aot_check.py on sm_90 (fp32 ieee dots, 8 warps): the largest tiles that do not
    spill at the GPU benchmark shape (K=8192, S=1024, C=128): fwd [16 codes x 32 pixels] feeding a
    [128 x 32] accumulator (one channel block for the 128-dim codebook: the noise is made once), dx
    [16 codes x 32 pixels] with 64-channel chunks of G = W^T dout, dw [128 channels x 32 codes] over
    16-pixel chunks. Smaller problems shrink the tiles to their sizes (at least 16, what tl.dot needs) and
    run on 4 warps.
    """
    if kernel == "fwd":
        bk, bs, bc = 16, min(32, max(16, _next_pow2(S))), min(128, max(16, _next_pow2(C)))
    elif kernel == "dx":
        bk, bs, bc = 16, min(32, max(16, _next_pow2(S))), min(64, max(16, _next_pow2(C)))
    elif kernel == "dw":
        bk, bs, bc = min(32, max(16, _next_pow2(K))), 16, min(128, max(16, _next_pow2(C)))
    else:
        raise ValueError(f"kernel: expected 'fwd', 'dx' or 'dw', got {kernel!r}")
    big = bc * (bk if kernel == "dw" else bs)  # the accumulator tile
    return QuantizeConfig(bk, bs, bc, 8 if big >= 2048 else 4)  # small tiles on 8 warps get 64 registers and spill


def _precision(logits: torch.Tensor) -> str:
    """tl.dot precision of the codebook products. fp32 logits follow torch.backends.cudnn.allow_tf32, the
    switch of the unfused composition's own convolution: TF32 on a GPU where it is on (torch's default),
    exact "ieee" where it is off and in the interpreter (the fp32 parity tests turn it off)."""
    if logits.dtype == torch.float32:
        return "tf32" if logits.is_cuda and torch.backends.cudnn.allow_tf32 else "ieee"
    return "tf32"


def _check_quantize(op: str, logits, weight, tau, seed, offset):
    _check_tensor(op, "logits", logits, _FLOAT_DTYPES)
    _check_tensor(op, "weight", weight, _FLOAT_DTYPES)
    if logits.dim() < 2:
        raise ValueError(f"{op}: logits: expected [B, K, *spatial] (at least 2 dims), got {tuple(logits.shape)}")
    if weight.dim() != 2 or weight.shape[1] != logits.shape[1]:
        raise ValueError(
            f"{op}: weight: expected [C, {logits.shape[1]}] (K = logits.shape[1]), got {tuple(weight.shape)}"
        )
    if weight.device != logits.device:
        raise ValueError(f"{op}: weight: expected the device of logits ({logits.device}), got {weight.device}")
    tau = _check_tau(op, tau)
    seed = _check_int(op, "seed", seed, _INT64_MIN, _INT64_MAX)
    offset = _check_int(op, "offset", offset, 0, _INT64_MAX)
    if offset > _INT64_MAX - logits.numel():
        raise ValueError(f"{op}: offset: offset + numel must stay below 2**63, got offset {offset}")
    B, K, S = logits.shape[0], logits.shape[1], math.prod(logits.shape[2:])
    return tau, seed, offset, B, K, S, weight.shape[0]


def quantize_fwd(logits, weight, bias, tau, hard, seed, offset):
    op = "gumbel_quantize_fwd"
    tau, seed, offset, B, K, S, C = _check_quantize(op, logits, weight, tau, seed, offset)
    if not isinstance(hard, bool):
        raise TypeError(f"{op}: hard: expected a bool, got {type(hard).__name__}")
    if bias is not None:
        _check_tensor(op, "bias", bias, _FLOAT_DTYPES)
        if tuple(bias.shape) != (C,) or bias.device != logits.device:
            raise ValueError(f"{op}: bias: expected shape ({C},) on {logits.device}, got {tuple(bias.shape)}")
    dev = logits.device
    out = torch.empty((B, C, *logits.shape[2:]), dtype=logits.dtype, device=dev)
    lse = torch.empty((B, S), dtype=torch.float32, device=dev)
    idx = torch.empty((B, S) if hard else (0, 0), dtype=torch.int64, device=dev)
    if out.numel() == 0:
        return out, lse, idx
    if K == 0:
        out.copy_((bias if bias is not None else torch.zeros(C, device=dev)).view(1, C, *([1] * (logits.dim() - 2))))
        lse.fill_(float("-inf"))
        return out, lse, idx
    x = logits.reshape(B, K, S)
    bias = bias.contiguous() if bias is not None else None
    cfg = quantize_config("fwd", K, S, C)
    grid = (B * triton_cdiv(S, cfg.block_s), triton_cdiv(C, cfg.block_c))
    _kernels()._gumbel_quantize_fwd_kernel[grid](
        x, weight, bias if bias is not None else lse, out, lse, idx,
        x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1),
        B, K, S, C, seed, offset, 1.0 / tau,
        HAS_BIAS=bias is not None, HARD=hard, ALIGNED=offset % 4 == 0 and S % 4 == 0,
        PRECISION=_precision(logits),
        BLOCK_K=cfg.block_k, BLOCK_S=cfg.block_s, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
    )  # fmt: skip
    return out, lse, idx


def quantize_bwd(grad, logits, weight, lse, idx, tau, hard, seed, offset):
    op = "gumbel_quantize_bwd"
    tau, seed, offset, B, K, S, C = _check_quantize(op, logits, weight, tau, seed, offset)
    _check_tensor(op, "grad", grad, _GRAD_DTYPES)
    if tuple(grad.shape) != (B, C, *logits.shape[2:]) or grad.device != logits.device:
        raise ValueError(f"{op}: grad: expected shape {(B, C, *logits.shape[2:])} on {logits.device}, got "
                         f"{tuple(grad.shape)} on {grad.device}")  # fmt: skip
    if lse.dtype != torch.float32 or lse.numel() != B * S:
        raise ValueError(f"{op}: lse: expected fp32 [{B}, {S}], got {lse.dtype} {tuple(lse.shape)}")
    if hard and (idx.dtype != torch.int64 or idx.numel() != B * S):
        raise ValueError(f"{op}: idx: expected int64 [{B}, {S}] in hard mode, got {idx.dtype} {tuple(idx.shape)}")
    dx = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if logits.numel() == 0 or C == 0:
        return dx.zero_(), torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    x = logits.reshape(B, K, S)
    dout = grad.to(torch.float32).reshape(B, C, S).contiguous()
    lse = lse.reshape(B, S).contiguous()
    idx = idx.reshape(B, S).contiguous() if hard else lse
    aligned = offset % 4 == 0 and S % 4 == 0
    prec = _precision(logits)
    k = _kernels()
    cfg = quantize_config("dx", K, S, C)
    k._gumbel_quantize_bwd_dx_kernel[(B * triton_cdiv(S, cfg.block_s),)](
        x, weight, dout, lse, dx,
        x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1),
        B, K, S, C, seed, offset, 1.0 / tau,
        ALIGNED=aligned, PRECISION=prec,
        BLOCK_K=cfg.block_k, BLOCK_S=cfg.block_s, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
    )  # fmt: skip
    dw = torch.empty((C, K), dtype=torch.float32, device=logits.device)
    cfg = quantize_config("dw", K, S, C)
    k._gumbel_quantize_bwd_dw_kernel[(triton_cdiv(C, cfg.block_c), triton_cdiv(K, cfg.block_k))](
        x, dout, lse, idx, dw,
        x.stride(0), x.stride(1), x.stride(2),
        B, K, S, C, seed, offset, 1.0 / tau,
        HARD=hard, ALIGNED=aligned, PRECISION="ieee",  # dW is an fp32 sum over every pixel: exact products
        BLOCK_K=cfg.block_k, BLOCK_S=cfg.block_s, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
    )  # fmt: skip
    return dx, dw.to(weight.dtype)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------------
# logit_laplace_nll
# ----------------------------------------------------------------------------------------------------


def _check_triple(op, x, mu, log_b):
    for name, t in (("x", x), ("mu", mu), ("log_b", log_b)):
        _check_tensor(op, name, t, _FLOAT_DTYPES)
    if not (mu.dtype == log_b.dtype == x.dtype):
        raise TypeError(f"{op}: mu, log_b: expected the dtype of x ({x.dtype}), got {mu.dtype} and {log_b.dtype}")
    if not (mu.shape == log_b.shape == x.shape):
        raise ValueError(f"{op}: mu, log_b: expected the shape of x {tuple(x.shape)}, got {tuple(mu.shape)} and "
                         f"{tuple(log_b.shape)}")  # fmt: skip
    if not (mu.device == log_b.device == x.device):
        raise ValueError(f"{op}: mu, log_b: expected tensors on the device of x ({x.device})")


def nll_fwd(x, mu, log_b, reduction):
    op = "logit_laplace_nll_fwd"
    _check_triple(op, x, mu, log_b)
    reduction = _check_reduction(op, reduction)
    n = x.numel()
    xc, mc, bc = x.contiguous(), mu.contiguous(), log_b.contiguous()
    grid = (max(1, triton_cdiv(n, NLL_BLOCK)),)
    if reduction == 0:
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        if n:
            _kernels()._logit_laplace_nll_fwd_kernel[grid](xc, mc, bc, out, n, REDUCE=False, BLOCK=NLL_BLOCK)
        return out
    partial = torch.zeros(grid[0], dtype=torch.float32, device=x.device)
    if n:
        _kernels()._logit_laplace_nll_fwd_kernel[grid](xc, mc, bc, partial, n, REDUCE=True, BLOCK=NLL_BLOCK)
    total = partial.double().sum()
    if reduction == 1:
        total = total / n
    return total.float()


def nll_bwd(grad, x, mu, log_b, reduction):
    op = "logit_laplace_nll_bwd"
    _check_triple(op, x, mu, log_b)
    reduction = _check_reduction(op, reduction)
    _check_tensor(op, "grad", grad, _GRAD_DTYPES)
    n = x.numel()
    if reduction == 0 and grad.shape != x.shape:
        raise ValueError(f"{op}: grad: expected the shape of x {tuple(x.shape)}, got {tuple(grad.shape)}")
    if reduction != 0 and grad.numel() != 1:
        raise ValueError(f"{op}: grad: expected a scalar for a reduced loss, got shape {tuple(grad.shape)}")
    xc, mc, bc = x.contiguous(), mu.contiguous(), log_b.contiguous()
    g = grad.to(torch.float32).contiguous().reshape(-1)
    dx, dmu, dlb = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(3))
    if n:
        _kernels()._logit_laplace_nll_bwd_kernel[(triton_cdiv(n, NLL_BLOCK),)](
            g, xc, mc, bc, dx, dmu, dlb, n, 1.0 / n if reduction == 1 else 1.0,
            G_SCALAR=reduction != 0, BLOCK=NLL_BLOCK,
        )  # fmt: skip
    return dx, dmu, dlb


# ----------------------------------------------------------------------------------------------------
# categorical_kl_uniform
# ----------------------------------------------------------------------------------------------------


class KLConfig(NamedTuple):
    col: bool
    block_m: int
    block_n: int
    num_warps: int
    grid: int


def kl_config(outer: int, K: int, inner: int) -> KLConfig:
    """Fixed table: column layout (inner > 1) [BLOCK_M codes, BLOCK_N columns]; else [BLOCK_M rows, BLOCK_N codes]."""
    if inner > 1:
        bn = min(64, max(4, _next_pow2(inner)))
        bm = min(max(1, _next_pow2(K)), max(1, 4096 // bn))
        return KLConfig(True, bm, bn, 4 if bm * bn <= 1024 else 8, outer * triton_cdiv(inner, bn))
    bn = min(max(4, _next_pow2(K)), 2048)
    bm = max(1, min(_next_pow2(outer), 2048 // bn))
    return KLConfig(False, bm, bn, 4 if bm * bn <= 1024 else 8, triton_cdiv(outer, bm))


def _view3(x, dim):
    outer = math.prod(x.shape[:dim])
    inner = math.prod(x.shape[dim + 1 :])
    K = x.shape[dim]
    return x.reshape(outer, K, inner), outer, K, inner


def _check_kl(op, logits, dim, reduction):
    _check_tensor(op, "logits", logits, _FLOAT_DTYPES)
    if logits.dim() < 1:
        raise ValueError(f"{op}: logits: expected at least 1 dimension, got a 0-dim tensor")
    dim = _check_int(op, "dim", dim, 0, logits.dim() - 1)
    return dim, _check_reduction(op, reduction)


def kl_fwd(logits, dim, reduction):
    op = "categorical_kl_uniform_fwd"
    dim, reduction = _check_kl(op, logits, dim, reduction)
    x, outer, K, inner = _view3(logits, dim)
    R = outer * inner
    stats = torch.empty((2, R), dtype=torch.float32, device=logits.device)
    if R and K:
        cfg = kl_config(outer, K, inner)
        _kernels()._categorical_kl_fwd_kernel[(cfg.grid,)](
            x, stats, x.stride(0), x.stride(1), x.stride(2), outer, K, inner,
            COL=cfg.col, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
        )  # fmt: skip
    else:
        stats.fill_(float("nan"))
    shape = list(logits.shape)
    del shape[dim]
    kl = (stats[1] + math.log(K) if K else stats[1].clone()).reshape(shape)
    if reduction == 0:
        return kl, stats
    return (kl.mean() if reduction == 1 else kl.sum()), stats


def kl_bwd(grad, logits, stats, dim, reduction):
    op = "categorical_kl_uniform_bwd"
    dim, reduction = _check_kl(op, logits, dim, reduction)
    _check_tensor(op, "grad", grad, _GRAD_DTYPES)
    x, outer, K, inner = _view3(logits, dim)
    R = outer * inner
    if stats.dtype != torch.float32 or stats.numel() != 2 * R:
        raise ValueError(f"{op}: stats: expected fp32 [2, {R}], got {stats.dtype} {tuple(stats.shape)}")
    if (reduction == 0 and grad.numel() != R) or (reduction != 0 and grad.numel() != 1):
        raise ValueError(f"{op}: grad: expected {R if reduction == 0 else 1} elements, got shape {tuple(grad.shape)}")
    g = grad.to(torch.float32).reshape(-1)
    if reduction == 1:
        g = g / R
    g = g.expand(R).contiguous()
    dx = torch.empty((outer, K, inner), dtype=logits.dtype, device=logits.device)
    if dx.numel():
        cfg = kl_config(outer, K, inner)
        _kernels()._categorical_kl_bwd_kernel[(cfg.grid,)](
            x, stats.contiguous(), g, dx, x.stride(0), x.stride(1), x.stride(2), outer, K, inner,
            COL=cfg.col, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
        )  # fmt: skip
    return dx.view(logits.shape)
