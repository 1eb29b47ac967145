"""Launchers of the Triton Gumbel-softmax kernels (kernels/gumbel.py), mirroring the C++ schemas of csrc/ops.cpp:

    noise(like, shape, seed, offset) -> Tensor
    softmax_fwd(logits, tau, hard, dim, seed, offset) -> Tensor
    softmax_bwd(grad, logits, tau, dim, seed, offset) -> Tensor
    argmax(logits, dim, seed, offset) -> Tensor

seed is the 64-bit Philox key as a signed int64 (values >= 2**63 as their two's complement), dim is already
normalised to [0, ndim), offset >= 0. Outputs are contiguous in the logical shape. Launch configurations
come from a fixed table (`_reduction_config`): no autotuning, so the interpreter (TRITON_INTERPRET=1, CPU
tensors) runs exactly what the GPU runs. Nothing happens at import beyond defining functions: triton is
imported on first use, and no device is queried.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_GRAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# Largest K reduced in one tile (one read of the logits); past it the kernels make two passes. Set by the
# sm_90 register budget (scripts/triton_aot_check.py): a soft forward or backward tile of 16384 spills.
ONE_PASS_MAX_FWD = 8192
ONE_PASS_MAX_BWD = 8192
ONE_PASS_MAX_ARGMAX = 16384  # argmax keeps fewer values live
ONE_PASS_MAX_HARD = 8192  # the hard forward at 16384 leaves 8 bytes on the stack with triton 3.9
# Elements per tile of the column layout and of the small-K row layout.
_TILE_ELEMS = 2048
# Column layout: shrink the inner tile (down to 16 columns) until there are this many programs.
_MIN_PROGRAMS = 1024


def _kernels():
    from dalle_fast.kernels import gumbel  # triton is imported here, on first launch

    return gumbel


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ----------------------------------------------------------------------------------------------------
# Argument checks: each names the argument, what was expected and what came.
# ----------------------------------------------------------------------------------------------------


def _check_tensor(op: str, name: str, t, dtypes) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name}: expected dtype {names}, got {t.dtype}")
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and _interpreting():
        return
    raise ValueError(
        f"{op}: {name}: expected a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1), got device {t.device}"
    )


def _check_int(op: str, name: str, v, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{op}: {name}: expected an int, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ValueError(f"{op}: {name}: expected an int in [{lo}, {hi}], got {v}")
    return int(v)


def _check_common(op: str, logits: torch.Tensor, dim, seed, offset) -> tuple[int, int, int]:
    if logits.dim() < 1:
        raise ValueError(f"{op}: logits: expected at least 1 dimension, got a 0-dim tensor")
    dim = _check_int(op, "dim", dim, 0, logits.dim() - 1)
    seed = _check_int(op, "seed", seed, _INT64_MIN, _INT64_MAX)
    numel = logits.numel()
    offset = _check_int(op, "offset", offset, 0, _INT64_MAX)
    if offset > _INT64_MAX - numel:
        raise ValueError(f"{op}: offset: offset + numel must stay below 2**63, got offset {offset} and numel {numel}")
    return dim, seed, offset


def _check_tau(op: str, tau) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"{op}: tau: expected a float, got {type(tau).__name__}")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"{op}: tau: expected a finite value > 0, got {tau}")
    return float(tau)


# ----------------------------------------------------------------------------------------------------
# Launch configuration table
# ----------------------------------------------------------------------------------------------------


class ReductionConfig(NamedTuple):
    col: bool  # column layout (inner > 1): tile [BLOCK_M k, BLOCK_N inner]; else [BLOCK_M rows, BLOCK_N k]
    one_pass: bool
    aligned: bool  # every tile row starts at an element number divisible by 4: all Philox lanes used
    block_m: int
    block_n: int
    num_warps: int
    grid: int


def _warps(tile: int) -> int:
    # About 8 to 16 fp32 elements a thread: the Philox rounds keep many values live per element.
    return 4 if tile <= 512 else 8 if tile <= 2048 else 16


def _reduction_config(outer: int, K: int, inner: int, offset: int, one_pass_max: int) -> ReductionConfig:
    """The fixed launch table of the fwd / bwd / argmax kernels for the view [outer, K, inner]."""
    if inner == 1:
        aligned = offset % 4 == 0 and (K % 4 == 0 or outer == 1)
        if not aligned:  # a Philox call per element keeps more values live: half the one-pass tile (sm_90 spills)
            one_pass_max //= 2
        if K <= one_pass_max:
            block_n = max(4, _next_pow2(K))
            block_m = max(1, min(_next_pow2(outer), _TILE_ELEMS // block_n))  # several short rows a program
            one_pass = True
        else:
            block_n, block_m, one_pass = 4096, 1, False
        grid = -(-outer // block_m)
        return ReductionConfig(False, one_pass, aligned, block_m, block_n, _warps(block_m * block_n), grid)
    block_n = max(4, min(64, _next_pow2(inner)))
    while block_n > 16 and outer * -(-inner // block_n) < _MIN_PROGRAMS:
        block_n //= 2
    if _next_pow2(K) * block_n <= one_pass_max // 2:
        block_m, one_pass = _next_pow2(K), True
    else:
        block_m, one_pass = max(1, _TILE_ELEMS // block_n), False
    aligned = offset % 4 == 0 and inner % 4 == 0
    grid = outer * -(-inner // block_n)
    return ReductionConfig(True, one_pass, aligned, block_m, block_n, _warps(block_m * block_n), grid)


def _noise_config(numel: int, offset: int) -> tuple[int, int, bool, int, int]:
    block_n = 1024
    block_m = 4
    grid = -(-numel // (block_m * block_n))
    aligned = offset % 4 == 0
    return block_m, block_n, aligned, 4 if aligned else 8, grid  # unaligned: a Philox call per element


def _view3(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, int, int, int]:
    """x as [outer, K, inner] around dim (a view whenever strides allow), like launch.h's reduction_view."""
    outer = math.prod(x.shape[:dim])
    inner = math.prod(x.shape[dim + 1 :])
    K = x.shape[dim]
    return x.reshape(outer, K, inner), outer, K, inner


# ----------------------------------------------------------------------------------------------------
# The four launchers
# ----------------------------------------------------------------------------------------------------


def noise(like: torch.Tensor, shape: list[int], seed: int, offset: int) -> torch.Tensor:
    """Gumbel noise of logical shape `shape` (contiguous, like's dtype and device), element numbers offset + i."""
    op = "gumbel_noise"
    _check_tensor(op, "like", like, _FLOAT_DTYPES)
    if not isinstance(shape, (list, tuple, torch.Size)):
        raise TypeError(f"{op}: shape: expected a list of ints, got {type(shape).__name__}")
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ValueError(f"{op}: shape: expected non-negative ints, got {list(shape)}")
    seed = _check_int(op, "seed", seed, _INT64_MIN, _INT64_MAX)
    offset = _check_int(op, "offset", offset, 0, _INT64_MAX)
    numel = math.prod(shape)
    if offset > _INT64_MAX - numel:
        raise ValueError(f"{op}: offset: offset + numel must stay below 2**63, got offset {offset} and numel {numel}")
    out = torch.empty(tuple(shape), dtype=like.dtype, device=like.device)
    if numel == 0:
        return out
    block_m, block_n, aligned, num_warps, grid = _noise_config(numel, offset)
    _kernels()._gumbel_noise_kernel[(grid,)](
        out, numel, seed, offset, BLOCK_M=block_m, BLOCK_N=block_n, ALIGNED=aligned, num_warps=num_warps
    )
    return out


def softmax_fwd(logits: torch.Tensor, tau: float, hard: bool, dim: int, seed: int, offset: int) -> torch.Tensor:
    """softmax((logits + g) / tau, dim) (hard: one-hot of argmax(logits + g)), logits' dtype, contiguous."""
    op = "gumbel_softmax_fwd"
    _check_tensor(op, "logits", logits, _FLOAT_DTYPES)
    tau = _check_tau(op, tau)
    if not isinstance(hard, bool):
        raise TypeError(f"{op}: hard: expected a bool, got {type(hard).__name__}")
    dim, seed, offset = _check_common(op, logits, dim, seed, offset)
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if logits.numel() == 0:
        return out
    x, outer, K, inner = _view3(logits, dim)
    cfg = _reduction_config(outer, K, inner, offset, ONE_PASS_MAX_HARD if hard else ONE_PASS_MAX_FWD)
    _kernels()._gumbel_softmax_fwd_kernel[(cfg.grid,)](
        x, out,
        x.stride(0), x.stride(1), x.stride(2),
        outer, K, inner,
        seed, offset, 1.0 / tau,
        HARD=hard, COL=cfg.col, ONE_PASS=cfg.one_pass, ALIGNED=cfg.aligned,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
    )  # fmt: skip
    return out


def softmax_bwd(grad: torch.Tensor, logits: torch.Tensor, tau: float, dim: int, seed: int, offset: int) -> torch.Tensor:
    """(1/tau) * y * (grad - sum(grad * y, dim)) with y recomputed from logits and seed; logits' dtype, contiguous."""
    op = "gumbel_softmax_bwd"
    _check_tensor(op, "logits", logits, _FLOAT_DTYPES)
    _check_tensor(op, "grad", grad, _GRAD_DTYPES)
    if grad.shape != logits.shape:
        raise ValueError(f"{op}: grad: expected the shape of logits {tuple(logits.shape)}, got {tuple(grad.shape)}")
    if grad.device != logits.device:
        raise ValueError(f"{op}: grad: expected the device of logits ({logits.device}), got {grad.device}")
    tau = _check_tau(op, tau)
    dim, seed, offset = _check_common(op, logits, dim, seed, offset)
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if logits.numel() == 0:
        return out
    x, outer, K, inner = _view3(logits, dim)
    dy = grad.reshape(outer, K, inner)
    cfg = _reduction_config(outer, K, inner, offset, ONE_PASS_MAX_BWD)
    _kernels()._gumbel_softmax_bwd_kernel[(cfg.grid,)](
        dy, x, out,
        dy.stride(0), dy.stride(1), dy.stride(2),
        x.stride(0), x.stride(1), x.stride(2),
        outer, K, inner,
        seed, offset, 1.0 / tau,
        COL=cfg.col, ONE_PASS=cfg.one_pass, ALIGNED=cfg.aligned,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
    )  # fmt: skip
    return out


def argmax(logits: torch.Tensor, dim: int, seed: int, offset: int) -> torch.Tensor:
    """argmax(logits + g, dim) as int64 with dim removed (torch.argmax order), contiguous."""
    op = "gumbel_argmax"
    _check_tensor(op, "logits", logits, _FLOAT_DTYPES)
    dim, seed, offset = _check_common(op, logits, dim, seed, offset)
    out_shape = logits.shape[:dim] + logits.shape[dim + 1 :]
    out = torch.empty(out_shape, dtype=torch.int64, device=logits.device)
    if out.numel() == 0:
        return out
    if logits.shape[dim] == 0:
        raise ValueError(
            f"{op}: logits: expected a non-empty dim {dim} (argmax of nothing), got shape {tuple(logits.shape)}"
        )
    x, outer, K, inner = _view3(logits, dim)
    cfg = _reduction_config(outer, K, inner, offset, ONE_PASS_MAX_ARGMAX)
    _kernels()._gumbel_argmax_kernel[(cfg.grid,)](
        x, out,
        x.stride(0), x.stride(1), x.stride(2),
        outer, K, inner,
        seed, offset,
        COL=cfg.col, ONE_PASS=cfg.one_pass, ALIGNED=cfg.aligned,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
    )  # fmt: skip
    return out
