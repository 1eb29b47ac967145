"""Launcher of the Triton decoding-attention kernel (kernels/decode.py), mirroring the C++ schema of csrc/ops.cpp:

    sparse_decode_attention(q, k_cache, v_cache, position_tensor, position, kind, text_len, grid_h, grid_w, kernel,
                            torus, scale) -> out

q [B, H, n, D], caches [B, H, Lmax, D] with any strides; out is allocated [B, n, H, D] and returned as a
[B, H, n, D] view. One program per (query, b * h). Launch configurations come from a fixed table (CONFIGS: per
kind the image tile, per head size the warps): no autotuning, so the interpreter (TRITON_INTERPRET=1, CPU
tensors) runs exactly what the GPU runs, and scripts/triton_aot_check.py compiles every entry for sm_90.
Nothing happens at import beyond defining functions: triton is imported on first launch.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import NamedTuple

import torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (32, 64, 128)
KINDS = ("full", "row", "column", "conv")
_LOG2E = 1.4426950408889634
_MAX_GRID_Y = 65535  # B * H rides on grid axis 1
_OP = "sparse_decode_attention (triton)"


class DecodeConfig(NamedTuple):
    block_t: int  # keys per tile of the text prefix
    block_i: int  # keys per tile of an image range
    num_warps: int


# Tiles. The text prefix is one long contiguous range (T = 256 at the paper's layout): 64-key tiles, four for
# T = 256. Image ranges per kind at the paper's 32 x 32 grid: full up to 1024 keys (64-key tiles); row 33 keys
# (one 64-key tile; 32 would take two); column up to 32 keys (32); conv at most 11 keys per window row (16:
# a 64-key tile would be 80% masked lanes). Warps: a [64, D] fp32 tile of K (and of V) over 4 warps is
# 16 / 32 / 64 registers a thread at D = 32 / 64 / 128. ptxas (triton 3.8, sm_90) spilled two registers to
# the stack (8 or 16 bytes, at 48-72 registers) in some D = 32 kernels at 2 and 4 warps and in the fp32 D = 64
# full kernel at 4; 1 warp for D = 32 conv, 2 for the other D = 32 kinds and 8 for full at D = 64 compile
# without (scripts/triton_aot_check.py --filter decode).
_IMAGE_TILE = {0: 64, 1: 64, 2: 32, 3: 16}


def _warps(kind: int, d: int) -> int:
    if d == 32:
        return 1 if kind == 3 else 2
    return 8 if (kind, d) == (0, 64) else 4


CONFIGS: dict[tuple[int, int], DecodeConfig] = {
    (kind, d): DecodeConfig(64, _IMAGE_TILE[kind], _warps(kind, d)) for kind in range(len(KINDS)) for d in HEAD_DIMS
}


def config(kind: int, head_dim: int) -> DecodeConfig:
    try:
        return CONFIGS[(kind, head_dim)]
    except KeyError:
        msg = f"{_OP}: expected a kind id in 0..3 and a head size in {HEAD_DIMS}, got {kind}, {head_dim}"
        raise ValueError(msg) from None


def slot_count(kind: int, grid_h: int, kernel: int, torus: bool) -> int:
    """attention.h decode_slot_count."""
    if kind != 3:
        return 2
    half = kernel // 2
    rows = min(2 * half + 1, grid_h) if torus else half + 1
    return 1 + 2 * rows


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(q, k_cache, v_cache, position_tensor, position, kind, text_len, grid_h, grid_w, kernel, torus, scale):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{_OP}: {name}: expected 4 dimensions [B, H, L, D], got shape {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{_OP}: {name}: expected q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{_OP}: {name}: expected q's device {q.device}, got {t.device}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"{_OP}: q: expected float16, bfloat16 or float32, got {q.dtype}")
    if not (q.device.type == "cuda" or (q.device.type == "cpu" and _interpreting())):
        raise ValueError(f"{_OP}: q: expected a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1), got {q.device}")
    b, h, n, d = q.shape
    if d not in HEAD_DIMS:
        raise ValueError(f"{_OP}: q: expected a head size (dim 3) in {HEAD_DIMS}, got {d}")
    if k_cache.shape != v_cache.shape or (k_cache.shape[0], k_cache.shape[1], k_cache.shape[3]) != (b, h, d):
        raise ValueError(
            f"{_OP}: k_cache, v_cache: expected [B, H, Lmax, D] with q's B, H, D = ({b}, {h}, {d}), got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if kind not in range(len(KINDS)):
        raise ValueError(f"{_OP}: kind: expected 0 (full), 1 (row), 2 (column) or 3 (conv), got {kind}")
    if text_len < 0 or grid_h < 1 or grid_w < 1 or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"{_OP}: expected text_len >= 0, a grid >= 1 x 1 and an odd kernel, got "
                         f"{text_len}, {grid_h} x {grid_w}, {kernel}")  # fmt: skip
    if not math.isfinite(scale):
        raise ValueError(f"{_OP}: scale: expected a finite float, got {scale!r}")
    lmax = k_cache.shape[2]
    if lmax > text_len + grid_h * grid_w:
        raise ValueError(f"{_OP}: k_cache: expected Lmax <= text_len + grid_h * grid_w, got {lmax}")
    if position_tensor is not None:
        if position_tensor.numel() != 1 or position_tensor.dtype != torch.int64 or position_tensor.device != q.device:
            raise ValueError(
                f"{_OP}: position: expected a 0-dim int64 tensor on {q.device}, got {position_tensor.dtype} of shape "
                f"{tuple(position_tensor.shape)} on {position_tensor.device}"
            )
    elif not 0 <= position <= lmax - n:
        raise ValueError(f"{_OP}: position: expected 0 <= position and position + n <= Lmax = {lmax}, got {position}")
    if b * h > _MAX_GRID_Y:
        raise ValueError(f"{_OP}: q: expected B * H <= {_MAX_GRID_Y} (grid axis 1), got {b * h}")


def sparse_decode_attention(q, k_cache, v_cache, position_tensor, position, kind, text_len, grid_h, grid_w, kernel,
                            torus, scale):  # fmt: skip
    """softmax(scale q k^T) v over the keys each query's mask row allows; see the module docstring."""
    _check(q, k_cache, v_cache, position_tensor, position, kind, text_len, grid_h, grid_w, kernel, torus, scale)
    b, h, n, d = q.shape
    out = torch.empty(b, n, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)
    if b * h * n == 0:
        return out
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        # bf16 arithmetic is wrong under the interpreter: run fp32 copies there (the GPU runs bf16 natively).
        out32 = sparse_decode_attention(q.float(), k_cache.float(), v_cache.float(), position_tensor, position, kind,
                                        text_len, grid_h, grid_w, kernel, torus, scale)  # fmt: skip
        return out.copy_(out32)
    if position_tensor is not None and q.device.type == "cpu":  # the interpreter: check the value too
        p = int(position_tensor)
        if not 0 <= p <= k_cache.shape[2] - n:
            raise ValueError(
                f"{_OP}: position: expected 0 <= position and position + n <= Lmax = {k_cache.shape[2]}, got {p}"
            )
    torus = bool(torus) and kind == 3
    c = config(kind, d)
    from dalle_fast.kernels import decode as kern  # triton is imported here, on first launch

    pos_ptr = position_tensor if position_tensor is not None else q
    on_device = torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        kern._sparse_decode_attention_kernel[(n, b * h)](
            q, k_cache, v_cache, out, pos_ptr,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
            h, n, k_cache.shape[2], int(position), text_len, grid_h, grid_w, kernel // 2,
            slot_count(kind, grid_h, kernel, torus), float(scale) * _LOG2E,
            KIND=kind, TORUS=torus, POS_FROM_PTR=position_tensor is not None, HEAD_DIM=d,
            BLOCK_T=c.block_t, BLOCK_I=c.block_i, num_warps=c.num_warps,
        )  # fmt: skip
    return out
