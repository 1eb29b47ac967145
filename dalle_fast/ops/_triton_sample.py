"""Launcher of the Triton sampling kernel (kernels/sample.py), mirroring the C++ schema of csrc/ops.cpp:

    sample(logits, temperature, top_k, top_p, seed, offset) -> Tensor   int64 [*logits.shape[:-1]]

top_k: 0 for none, else in [1, V] (the wrapper clamps top_k >= V to none); top_p: 1.0 for none, else in (0, 1).
seed is the 64-bit Philox key as a signed int64, offset >= 0. Invalid rows (NaN, +inf, all -inf) come back
as -1 (the wrapper raises on CPU). Short rows share a program, long rows get one each; launch configurations
come from a fixed table (`sample_config`), no autotuning, so the interpreter runs exactly what the GPU runs.
Nothing happens at import beyond defining functions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._triton_gumbel import _FLOAT_DTYPES, _INT64_MAX, _INT64_MIN, _check_int, _check_tensor, _next_pow2

# Largest row kept in registers (one read of the logits); longer rows are re-read in chunks of CHUNK.
# Set by the sm_90 register budget (scripts/triton_aot_check.py). Unaligned rows draw one Philox call per
# element, which keeps more values live: half the tile.
ONE_CHUNK_MAX = 8192
CHUNK = 4096


# Elements of one program's tile when short rows share a program (BLOCK_R rows of BLOCK_V).
TILE_ELEMS = 2048


class SampleConfig(NamedTuple):
    one_chunk: bool
    aligned: bool  # every row starts at an element number divisible by 4: all Philox lanes used
    block_r: int
    block_v: int
    num_warps: int
    grid: int


def sample_config(R: int, V: int, offset: int) -> SampleConfig:
    """The fixed launch table of _sample_kernel for R rows of V categories."""
    aligned = offset % 4 == 0 and (V % 4 == 0 or R == 1)
    one_max = ONE_CHUNK_MAX if aligned else ONE_CHUNK_MAX // 2
    if V <= one_max:
        block_v, one_chunk = max(16, _next_pow2(V)), True
        block_r = max(1, min(_next_pow2(R), TILE_ELEMS // block_v))
    else:
        block_v, one_chunk, block_r = CHUNK, False, 1
    tile = block_r * block_v
    num_warps = 4 if tile <= 512 else 8 if tile <= 2048 else 16  # (sm_90 AOT: no spill or stack in any config)
    return SampleConfig(one_chunk, aligned, block_r, block_v, num_warps, -(-R // block_r))


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, seed: int, offset: int) -> torch.Tensor:
    op = "sample"
    _check_tensor(op, "logits", logits, _FLOAT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(
            f"{op}: logits: expected at least 1 dimension and a non-empty last dim, got {tuple(logits.shape)}"
        )
    V = logits.shape[-1]
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"{op}: temperature: expected a finite value > 0, got {temperature}")
    top_k = _check_int(op, "top_k", top_k, 0, V)
    if not 0 < top_p <= 1:
        raise ValueError(f"{op}: top_p: expected a value in (0, 1], got {top_p}")
    seed = _check_int(op, "seed", seed, _INT64_MIN, _INT64_MAX)
    offset = _check_int(op, "offset", offset, 0, _INT64_MAX - logits.numel())
    out = torch.empty(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    R = out.numel()
    if R == 0:
        return out
    x = logits.reshape(R, V)  # a view whenever the leading dims allow; else one copy
    cfg = sample_config(R, V, offset)
    from dalle_fast.kernels import sample as kernels  # triton is imported here, on first launch

    kernels._sample_kernel[(cfg.grid,)](
        x, out,
        x.stride(0), x.stride(1),
        R, V, seed, offset,
        float(temperature), max(top_k, 1), float(top_p),
        USE_K=0 < top_k < V, USE_P=top_p < 1.0, ONE_CHUNK=cfg.one_chunk, ALIGNED=cfg.aligned,
        BLOCK_R=cfg.block_r, BLOCK_V=cfg.block_v, num_warps=cfg.num_warps,
    )  # fmt: skip
    return out
