"""Launchers of the Triton sparse-attention kernels (kernels/attention.py), mirroring the C++ schemas of csrc/ops.cpp:

    sparse_attention_fwd(q, k, v, kv_indptr, kv_index, kv_partial, kind, text_len, grid_h, grid_w, kernel, torus,
                         scale, block_m, block_n) -> (out, lse)
    sparse_attention_bwd(grad_out, q, k, v, out, lse, kv_*, q_*, kind, ..., block_m, block_n) -> (dq, dk, dv)

q, k, v (and grad_out, out) are [B, H, L, D] with any strides; out, dq, dk, dv are allocated [B, L, H, D] and
returned as [B, H, L, D] views (a transformer merges the heads back with a free view); lse is [B, H, L] fp32.
The tile layout (dalle_fast.masks.tile_layout for block_m x block_n) comes in as int32 CSR arrays.

Launch configurations come from a fixed table (`CONFIGS`, per head size and dtype): no autotuning, so the
interpreter (TRITON_INTERPRET=1, CPU tensors) runs exactly what the GPU runs, and scripts/triton_aot_check.py
compiles every entry for sm_90 and fails on register spills. Nothing happens at import beyond defining
functions: triton is imported on first launch, and no device is queried.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import NamedTuple

import torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_GRAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HEAD_DIMS = (32, 64, 128)
KINDS = ("full", "row", "column", "conv")  # kind ids 0..3, as dalle_fast.masks.KINDS
_LOG2E = 1.4426950408889634
_MAX_GRID_Y = 65535  # B * H rides on grid axis 1


class AttentionConfig(NamedTuple):
    """One row of the launch table. block_m x block_n is the tile of the layout (queries x keys), shared by the
    forward and both backward kernels; the backward kernels may take a visited tile in sub-chunks (fewer live
    registers) without changing the layout."""

    block_m: int
    block_n: int
    fwd_warps: int
    fwd_stages: int
    dkdv_sub_m: int  # query rows per step of the dK/dV loop (divides block_m)
    dkdv_warps: int
    dkdv_stages: int
    dq_sub_n: int  # keys per step of the dQ loop (divides block_n)
    dq_warps: int
    dq_stages: int
    pre_rows: int  # rows per program of the delta preprocess
    pre_warps: int


# The launch table, for sm_90 (H100/H200).
#
# Tiles. FlashAttention-style Triton kernels (the Triton tutorial 06-fused-attention, FA2's flash_attn_triton) use
# 128 x 64 or 128 x 128 forward tiles for dense attention on Hopper. Our masks are sparse: at the paper's shape
# (T=256, 32x32 grid, L=1279) the computed pairs over the allowed pairs are, for 64x64 / 128x64 / 128x128 tiles,
# row 1.31 / 1.52 / 1.70, column 1.18 / 1.42 / 1.42, conv 1.56 / 1.75 / 1.89, full 1.05 / 1.10 / 1.10
# (dalle_fast.masks.tile_layout). 64 x 64 wastes 15-25% fewer tile FLOPs than 128 x 64 on the sparse kinds, a
# 64-row tile is exactly one wgmma M (64 rows per warpgroup of 4 warps), and at B=8, H=16 it still launches
# 2560 forward programs for 132 SMs. Every head size keeps 64 x 64 for fp16/bf16. fp32 (the parity path: ieee
# dots run on FMA units, not tensor cores, with operands held in registers) keeps the same tiles, so that fp32
# and fp16 runs visit identical layouts, and buys its registers with warps and smaller chunks.
#
# Warps and stages. Forward: 4 warps (one warpgroup) per 64-row tile, 3 stages (the tutorial autotunes 2-4 on
# Hopper; at D = 128: Q 16 KiB + 3 x (K + V) 96 KiB = 112 KiB of shared memory, two programs per SM).
# Backward: the tutorial's backward runs 4 warps and takes the long side in small chunks (BLOCK_M1 = 32 queries
# against 128 keys for dK/dV, BLOCK_N2 = 32 keys against 128 queries for dQ); here dK/dV take 32-query chunks of
# a visited tile and dQ whole 64-key tiles up to D = 64. At D = 128 the dK and dV accumulators alone are
# 2 x 64 x 128 fp32 = 128 registers a thread at 4 warps, so D = 128 takes 32-row chunks, 8 warps, 2 stages.
# The fp32 rows were picked by compiling the candidates (FMA dots spilled at 4 warps and at 32- or 64-row chunks
# for several kinds). Every entry is spill-free for sm_90 on triton 3.6, 3.8 and 3.9:
# scripts/triton_aot_check.py --filter attention.
def _half(bm, bn, fwd, dkdv, dq, pre):
    return AttentionConfig(bm, bn, *fwd, *dkdv, *dq, *pre)


_HALF_CONFIGS = {
    # D: (block_m, block_n, (fwd warps, stages), (dkdv sub_m, warps, stages), (dq sub_n, warps, stages), (rows, warps))
    32: _half(64, 64, (4, 3), (32, 4, 3), (64, 4, 3), (128, 4)),
    64: _half(64, 64, (4, 3), (32, 4, 3), (64, 4, 3), (128, 4)),
    128: _half(64, 64, (4, 3), (32, 8, 2), (32, 8, 2), (64, 4)),
}
_FP32_CONFIGS = {
    32: _half(64, 64, (8, 2), (32, 8, 1), (32, 8, 2), (64, 4)),
    64: _half(64, 64, (4, 2), (16, 8, 2), (16, 8, 2), (64, 4)),
    128: _half(64, 64, (8, 2), (16, 8, 2), (16, 8, 2), (32, 4)),
}
CONFIGS: dict[tuple[int, torch.dtype], AttentionConfig] = {
    **{(d, torch.float16): c for d, c in _HALF_CONFIGS.items()},
    **{(d, torch.bfloat16): c for d, c in _HALF_CONFIGS.items()},
    **{(d, torch.float32): c for d, c in _FP32_CONFIGS.items()},
}


def config(head_dim: int, dtype: torch.dtype) -> AttentionConfig:
    """The launch table's row for this head size and dtype."""
    try:
        return CONFIGS[(head_dim, dtype)]
    except KeyError:
        raise ValueError(
            f"sparse_attention (triton): expected a head size in {HEAD_DIMS} and a dtype in float16, bfloat16, "
            f"float32, got head size {head_dim} and {dtype}"
        ) from None


def block_sizes(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(block_m, block_n): the tile of the layout the Triton kernels use for this head size and dtype."""
    c = config(head_dim, dtype)
    return c.block_m, c.block_n


def launch_config(head_dim: int, dtype: torch.dtype, block_m: int, block_n: int) -> AttentionConfig:
    """The table's row adapted to the tile actually launched (the tests pass 16 x 16 tiles): sub-chunks never
    exceed the tile, and tiles under 64 rows (below one wgmma M) take 2 warps (a 16-row tile is 2 mma.sync M
    blocks; with 4 warps ptxas left an 8-byte spill in the fp32 D=128 column dQ kernel)."""
    c = config(head_dim, dtype)
    if (block_m, block_n) == (c.block_m, c.block_n):
        return c

    def warps(w, rows):
        return min(w, 2) if rows < 64 else w

    sub_m, sub_n = min(c.dkdv_sub_m, block_m), min(c.dq_sub_n, block_n)
    return c._replace(
        block_m=block_m, block_n=block_n, fwd_warps=warps(c.fwd_warps, block_m),
        dkdv_sub_m=sub_m, dkdv_warps=warps(c.dkdv_warps, block_n),
        dq_sub_n=sub_n, dq_warps=warps(c.dq_warps, block_m),
    )  # fmt: skip


def _kernels():
    from dalle_fast.kernels import attention  # triton is imported here, on first launch

    return attention


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------------
# Argument checks: each names the argument, what was expected and what came.
# ----------------------------------------------------------------------------------------------------


def _check_device(op: str, name: str, t: torch.Tensor) -> None:
    if t.device.type == "cuda" or (t.device.type == "cpu" and _interpreting()):
        return
    raise ValueError(
        f"{op}: {name}: expected a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1), got device {t.device}"
    )


def _check_int(op: str, name: str, v, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{op}: {name}: expected an int, got {type(v).__name__}")
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{op}: {name}: expected an int in [{lo}, {'inf' if hi is None else hi}], got {v}")
    return int(v)


def _check_qkv(op: str, q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name}: expected 4 dimensions [B, H, L, D], got shape {tuple(t.shape)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"{op}: q: expected dtype float16, bfloat16 or float32, got {q.dtype}")
    _check_device(op, "q", q)
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"{op}: q: expected a head size (dim 3) in {HEAD_DIMS}, got {q.shape[-1]}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{op}: {name}: expected the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name}: expected q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name}: expected q's device {q.device}, got {t.device}")


def _check_mask(op, q, kind, text_len, grid_h, grid_w, kernel, torus, scale) -> tuple[int, float]:
    """Validate the mask description against q; returns (n_rows, scale)."""
    kind = _check_int(op, "kind", kind, 0, len(KINDS) - 1)
    text_len = _check_int(op, "text_len", text_len, 0)
    grid_h = _check_int(op, "grid_h", grid_h, 1)
    grid_w = _check_int(op, "grid_w", grid_w, 1)
    kernel = _check_int(op, "kernel", kernel, 1)
    if kernel % 2 == 0:
        raise ValueError(f"{op}: kernel: expected an odd int >= 1, got {kernel}")
    if not isinstance(torus, bool):
        raise TypeError(f"{op}: torus: expected a bool, got {type(torus).__name__}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{op}: scale: expected a finite float, got {scale!r}")
    full = text_len + grid_h * grid_w
    seq_len = q.shape[2]
    if seq_len > full:
        raise ValueError(
            f"{op}: q: expected a sequence length L <= text_len + grid_h * grid_w = {full} (dim 2 of [B, H, L, D]), "
            f"got {seq_len}"
        )
    n_rows = full if (kind == KINDS.index("column") and seq_len > text_len) else seq_len
    return n_rows, float(scale)


def _check_blocks(op: str, block_m, block_n) -> None:
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        _check_int(op, name, b, 16, 256)
        if b & (b - 1):
            raise ValueError(f"{op}: {name}: expected a power of two in [16, 256] (the kernels' tiles), got {b}")


def _check_csr(op: str, prefix: str, q: torch.Tensor, indptr, index, partial, n_tiles: int, tile: str) -> None:
    for suffix, t in (("indptr", indptr), ("index", index), ("partial", partial)):
        name = f"{prefix}_{suffix}"
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int32 or t.dim() != 1:
            raise TypeError(f"{op}: {name}: expected a 1-D int32 tensor, got {t.dtype} of shape {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name}: expected q's device {q.device}, got {t.device}")
    if indptr.numel() != n_tiles + 1:
        raise ValueError(
            f"{op}: {prefix}_indptr: expected {n_tiles + 1} entries (ceil(n_rows / {tile}) + 1), got {indptr.numel()}"
        )
    if index.numel() != partial.numel():
        raise ValueError(
            f"{op}: {prefix}_partial: expected as many entries as {prefix}_index ({index.numel()}), "
            f"got {partial.numel()}"
        )


def _check_like(op: str, name: str, t, q: torch.Tensor, dtypes) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.shape != q.shape:
        raise ValueError(f"{op}: {name}: expected the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {name}: expected dtype {', '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{op}: {name}: expected q's device {q.device}, got {t.device}")


def _grid_y(op: str, q: torch.Tensor) -> int:
    bh = q.shape[0] * q.shape[1]
    if bh > _MAX_GRID_Y:
        raise ValueError(f"{op}: q: expected B * H <= {_MAX_GRID_Y} (grid axis 1), got {bh}")
    return bh


def _on_device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _interpreter_bf16(q: torch.Tensor) -> bool:
    """bf16 arithmetic (tl.dot included) is wrong under the Triton interpreter: there, bf16 calls run the fp32
    kernels on fp32 copies and round the results to bf16 (on the GPU, bf16 runs natively)."""
    return q.dtype == torch.bfloat16 and q.device.type == "cpu" and _interpreting()


def _blhd_empty(q: torch.Tensor) -> torch.Tensor:
    """Memory [B, L, H, D] viewed as [B, H, L, D]."""
    b, h, n, d = q.shape
    return torch.empty(b, n, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------------
# The two launchers
# ----------------------------------------------------------------------------------------------------


def sparse_attention_fwd(q, k, v, kv_indptr, kv_index, kv_partial, kind, text_len, grid_h, grid_w, kernel, torus,
                         scale, block_m, block_n):  # fmt: skip
    """out = softmax(scale q k^T masked) v and lse (natural, fp32) over the tiles of the layout."""
    op = "sparse_attention_fwd"
    _check_qkv(op, q, k, v)
    n_rows, scale = _check_mask(op, q, kind, text_len, grid_h, grid_w, kernel, torus, scale)
    _check_blocks(op, block_m, block_n)
    B, H, L, D = q.shape
    out = _blhd_empty(q)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    if B * H == 0 or L == 0:
        return out, lse
    if _interpreter_bf16(q):
        out32, lse = sparse_attention_fwd(q.float(), k.float(), v.float(), kv_indptr, kv_index, kv_partial, kind,
                                          text_len, grid_h, grid_w, kernel, torus, scale, block_m, block_n)  # fmt: skip
        return out.copy_(out32), lse
    n_q_tiles = _cdiv(n_rows, block_m)
    _check_csr(op, "kv", q, kv_indptr, kv_index, kv_partial, n_q_tiles, "block_m")
    grid = (n_q_tiles, _grid_y(op, q))
    c = launch_config(D, q.dtype, block_m, block_n)
    with _on_device(q):
        _kernels()._sparse_attention_fwd_kernel[grid](
            q, k, v, out, lse, kv_indptr, kv_index, kv_partial,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            H, L, n_rows, text_len, grid_h, grid_w, kernel // 2, scale * _LOG2E,
            KIND=kind, TORUS=bool(torus) and kind == KINDS.index("conv"), HEAD_DIM=D,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=c.fwd_warps, num_stages=c.fwd_stages,
        )  # fmt: skip
    return out, lse


def sparse_attention_bwd(grad_out, q, k, v, out, lse, kv_indptr, kv_index, kv_partial, q_indptr, q_index, q_partial,
                         kind, text_len, grid_h, grid_w, kernel, torus, scale, block_m, block_n):  # fmt: skip
    """(dq, dk, dv) of the forward above, FlashAttention-2 style: delta, then dK/dV per key tile, then dQ per
    query tile (two passes, no atomics: deterministic)."""
    op = "sparse_attention_bwd"
    _check_qkv(op, q, k, v)
    _check_like(op, "grad_out", grad_out, q, _GRAD_DTYPES)
    _check_like(op, "out", out, q, (q.dtype,))
    n_rows, scale = _check_mask(op, q, kind, text_len, grid_h, grid_w, kernel, torus, scale)
    _check_blocks(op, block_m, block_n)
    B, H, L, D = q.shape
    if not isinstance(lse, torch.Tensor):
        raise TypeError(f"{op}: lse: expected a torch.Tensor, got {type(lse).__name__}")
    if lse.shape != (B, H, L) or lse.dtype != torch.float32 or lse.device != q.device:
        raise ValueError(
            f"{op}: lse: expected a float32 tensor of shape {(B, H, L)} on {q.device}, "
            f"got {lse.dtype} of shape {tuple(lse.shape)} on {lse.device}"
        )
    dq, dk, dv = _blhd_empty(q), _blhd_empty(q), _blhd_empty(q)
    if B * H == 0 or L == 0:
        return dq, dk, dv
    if _interpreter_bf16(q):
        grads = sparse_attention_bwd(grad_out.float(), q.float(), k.float(), v.float(), out.float(), lse, kv_indptr,
                                     kv_index, kv_partial, q_indptr, q_index, q_partial, kind, text_len, grid_h,
                                     grid_w, kernel, torus, scale, block_m, block_n)  # fmt: skip
        return tuple(g.copy_(g32) for g, g32 in zip((dq, dk, dv), grads))
    n_q_tiles, n_k_tiles = _cdiv(n_rows, block_m), _cdiv(n_rows, block_n)
    _check_csr(op, "kv", q, kv_indptr, kv_index, kv_partial, n_q_tiles, "block_m")
    _check_csr(op, "q", q, q_indptr, q_index, q_partial, n_k_tiles, "block_n")
    bh = _grid_y(op, q)
    grad_out = grad_out.to(q.dtype)  # the GEMMs take one input dtype (a no-op from autograd)
    lse = lse.contiguous()
    delta = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    c = launch_config(D, q.dtype, block_m, block_n)
    kern = _kernels()
    mask_args = (H, L, n_rows, text_len, grid_h, grid_w, kernel // 2, scale * _LOG2E, scale)
    consts = dict(KIND=kind, TORUS=bool(torus) and kind == KINDS.index("conv"), HEAD_DIM=D, BLOCK_M=block_m,
                  BLOCK_N=block_n)  # fmt: skip
    with _on_device(q):
        kern._sparse_attention_bwd_preprocess_kernel[(_cdiv(L, c.pre_rows), bh)](
            out, grad_out, delta, *out.stride(), *grad_out.stride(), H, L,
            HEAD_DIM=D, BLOCK_M=c.pre_rows, num_warps=c.pre_warps,
        )  # fmt: skip
        kern._sparse_attention_bwd_dkdv_kernel[(n_k_tiles, bh)](
            q, k, v, grad_out, lse, delta, dk, dv, q_indptr, q_index, q_partial,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
            *mask_args, **consts, SUB_M=c.dkdv_sub_m, num_warps=c.dkdv_warps, num_stages=c.dkdv_stages,
        )  # fmt: skip
        kern._sparse_attention_bwd_dq_kernel[(n_q_tiles, bh)](
            q, k, v, grad_out, lse, delta, dq, kv_indptr, kv_index, kv_partial,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
            *mask_args, **consts, SUB_N=c.dq_sub_n, num_warps=c.dq_warps, num_stages=c.dq_stages,
        )  # fmt: skip
    return dq, dk, dv
