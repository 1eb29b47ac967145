"""Launchers of the Triton scaled matmul kernels (kernels/matmul.py), mirroring the C++ schemas of csrc/ops.cpp:

    scaled_matmul(a, b, bias, alpha, scale, filter_nonfinite) -> (out, flag)
    scale_filter(x, alpha, scale, invert, filter_nonfinite, dtype) -> (out, flag)

Launch configurations come from an explicit table per GPU architecture (`CONFIGS`, keyed by the device's
compute capability and the operand dtype; `config_for` picks the entry). Under the interpreter
(TRITON_INTERPRET=1, CPU tensors) a small fixed tile is used. On a GPU, DALLE_FAST_MATMUL_AUTOTUNE=1 times
the architecture's candidate list (`CANDIDATES`) once per (device, dtype, shape) with CUDA events and keeps
the fastest; the default is the table's entry, so results never depend on timing. Nothing happens at import
beyond defining functions: triton is imported on first launch and no device is queried before it.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOW = (torch.float16, torch.bfloat16)


class MatmulConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


# Per architecture (compute capability major) and operand class ("low": fp16/bf16 on tensor cores, "fp32":
# exact fp32 FMA dot). sm_90 (H100/H200): 128x128 tiles with a 64-deep K step feed wgmma; 3 stages keep the
# shared-memory ring at 96 KiB (fp16). fp32 "ieee" dots do not use tensor cores: smaller tiles keep
# registers below the spill point (scripts/triton_aot_check.py checks every entry for sm_90).
CONFIGS: dict[int, dict[str, MatmulConfig]] = {
    9: {"low": MatmulConfig(128, 128, 64, 8, 8, 3), "fp32": MatmulConfig(64, 64, 32, 8, 8, 2)},
    8: {"low": MatmulConfig(128, 128, 32, 8, 4, 4), "fp32": MatmulConfig(64, 64, 32, 8, 4, 3)},
}
DEFAULT_CONFIG = {"low": MatmulConfig(64, 64, 32, 8, 4, 2), "fp32": MatmulConfig(32, 32, 32, 8, 4, 2)}
# The interpreter runs each program's tile with numpy: few, mid-sized tiles are fastest.
INTERPRETER_CONFIG = MatmulConfig(32, 32, 32, 4, 4, 1)
# Candidates timed by the optional GPU autotune (sm_90 first; other archs use their table entry and these).
CANDIDATES: dict[int, dict[str, list[MatmulConfig]]] = {
    9: {
        # 128x256, 256x128 (8 warps) and 128x128 on 4 warps with 4 stages spill on sm_90 (AOT check): not listed.
        "low": [MatmulConfig(128, 128, 64, 8, 8, 3), MatmulConfig(64, 128, 64, 8, 4, 4)],
        "fp32": [MatmulConfig(64, 64, 32, 8, 8, 2), MatmulConfig(128, 64, 32, 8, 8, 2)],
    },
}
SCALE_FILTER_BLOCK = 2048
SCALE_FILTER_WARPS = 8
_AUTOTUNED: dict[tuple, MatmulConfig] = {}


def _kernels():
    from dalle_fast.kernels import matmul  # triton is imported here, on first launch

    return matmul


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def operand_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "low"


def config_for(capability: tuple[int, int] | None, dtype: torch.dtype) -> MatmulConfig:
    """The table's configuration for a device of `capability` (None: the interpreter) and operand dtype."""
    if capability is None:
        return INTERPRETER_CONFIG
    return CONFIGS.get(capability[0], DEFAULT_CONFIG)[operand_class(dtype)]


# ----------------------------------------------------------------------------------------------------
# Argument checks: each names the argument, what was expected and what came.
# ----------------------------------------------------------------------------------------------------


def _check_tensor(op: str, name: str, t, dtypes=_KERNEL_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name}: expected dtype {names}, got {t.dtype}")
    if t.device.type == "cuda" or (t.device.type == "cpu" and _interpreting()):
        return
    raise ValueError(
        f"{op}: {name}: expected a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1), got device {t.device}"
    )


def _check_scale(op: str, scale, device: torch.device) -> None:
    if scale is None:
        return
    _check_tensor(op, "scale", scale, (torch.float32,))
    if scale.numel() != 1 or scale.dim() > 1:
        raise ValueError(
            f"{op}: scale: expected a 0-dim (or one-element) float32 tensor, got shape {tuple(scale.shape)}"
        )
    if scale.device != device:
        raise ValueError(f"{op}: scale: expected a tensor on {device}, got {scale.device}")


def _check_alpha(op: str, alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"{op}: alpha: expected a float, got {type(alpha).__name__}")
    return float(alpha)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------


def _launch_matmul(a2, b, bias, scale, out2, flag, alpha, filter_nonfinite, prescale, cfg: MatmulConfig):
    M, K = a2.shape
    N = b.shape[1]
    grid = (triton_cdiv(M, cfg.block_m) * triton_cdiv(N, cfg.block_n),)
    dot_f32 = _interpreting() and b.dtype == torch.bfloat16  # bf16 arithmetic is wrong in the interpreter
    # The largest element offset each pointer tile can reach (strides may be 0 or negative-free views).
    reach = max(
        (M - 1) * abs(a2.stride(0)) + (K - 1) * abs(a2.stride(1)) + cfg.block_m * abs(a2.stride(0)),
        (K - 1) * abs(b.stride(0)) + (N - 1) * abs(b.stride(1)) + cfg.block_k * abs(b.stride(0)) * 2,
        (M - 1) * abs(out2.stride(0)) + (N - 1) * abs(out2.stride(1)),
    )
    int64 = reach + cfg.block_m * cfg.block_n >= 2**31
    _kernels()._scaled_matmul_fwd_kernel[grid](
        a2, b, bias if bias is not None else out2, scale if scale is not None else flag, out2, flag,
        a2.stride(0), a2.stride(1), b.stride(0), b.stride(1), out2.stride(0), out2.stride(1),
        M, N, K,
        alpha,
        HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, FILTER=filter_nonfinite, PRESCALE_A=prescale,
        IEEE=b.dtype == torch.float32, DOT_F32=dot_f32, INT64=int64,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _autotuned(a2, b, bias, scale, out2, flag, alpha, filter_nonfinite, prescale, cap) -> MatmulConfig:
    """The fastest of CANDIDATES for this (device, dtype, shape), timed once with CUDA events (opt-in)."""
    M, K = a2.shape
    key = (a2.device.index, cap, b.dtype, a2.dtype, M, K, b.shape[1], bias is not None, filter_nonfinite)
    if key not in _AUTOTUNED:
        cands = CANDIDATES.get(cap[0], {}).get(operand_class(b.dtype)) or [config_for(cap, b.dtype)]
        best, best_t = None, math.inf
        for cfg in cands:
            try:
                for _ in range(2):
                    _launch_matmul(a2, b, bias, scale, out2, flag, alpha, filter_nonfinite, prescale, cfg)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(5):
                    _launch_matmul(a2, b, bias, scale, out2, flag, alpha, filter_nonfinite, prescale, cfg)
                end.record()
                end.synchronize()
                t = start.elapsed_time(end)
            except Exception:  # a candidate that does not fit this GPU (shared memory) is skipped
                continue
            if t < best_t:
                best, best_t = cfg, t
        flag.zero_()
        _AUTOTUNED[key] = best or config_for(cap, b.dtype)
    return _AUTOTUNED[key]


def scaled_matmul(a, b, bias, alpha, scale, filter_nonfinite):
    """(out, flag): out = alpha * scale * (a @ b) + bias, contiguous [..., M, N]; flag int32 [1]."""
    op = "scaled_matmul"
    _check_tensor(op, "a", a)
    _check_tensor(op, "b", b)
    prescale = a.dtype == torch.float32 and b.dtype in _LOW
    if not prescale and a.dtype != b.dtype:
        raise TypeError(
            f"{op}: b: expected the dtype of a (or float16/bfloat16 with a float32 a), got a {a.dtype} and b {b.dtype}"
        )
    if a.dim() < 2:
        raise ValueError(f"{op}: a: expected [..., M, K] (at least 2 dims), got shape {tuple(a.shape)}")
    if b.dim() != 2:
        raise ValueError(f"{op}: b: expected [K, N], got shape {tuple(b.shape)}")
    K, N = a.shape[-1], b.shape[1]
    if b.shape[0] != K:
        raise ValueError(f"{op}: b: expected {K} rows (a's last dim), got shape {tuple(b.shape)}")
    if b.device != a.device:
        raise ValueError(f"{op}: b: expected a tensor on {a.device}, got {b.device}")
    out_dtype = b.dtype
    if bias is not None:
        _check_tensor(op, "bias", bias, (out_dtype, torch.float32))
        if bias.shape != (N,):
            raise ValueError(f"{op}: bias: expected shape [{N}], got {list(bias.shape)}")
        if bias.device != a.device:
            raise ValueError(f"{op}: bias: expected a tensor on {a.device}, got {bias.device}")
    _check_scale(op, scale, a.device)
    alpha = _check_alpha(op, alpha)
    if not isinstance(filter_nonfinite, bool):
        raise TypeError(f"{op}: filter_nonfinite: expected a bool, got {type(filter_nonfinite).__name__}")
    out = torch.empty((*a.shape[:-1], N), dtype=out_dtype, device=a.device)
    flag = torch.zeros(1, dtype=torch.int32, device=a.device)
    if out.numel() == 0:
        return out, flag
    rows = out.numel() // N
    out2 = out.view(rows, N)
    a2 = a.reshape(rows, K)  # a view whenever the batch dims allow
    if K == 0:  # nothing to accumulate: the epilogue alone, through the same kernel on a zero-width a
        a2 = torch.zeros((rows, 1), dtype=a.dtype, device=a.device)
        b = torch.zeros((1, N), dtype=b.dtype, device=b.device)
    scale = scale.reshape(()) if scale is not None else None
    bias = bias.contiguous() if bias is not None else None  # the kernel reads bias with unit stride
    if a.device.type == "cpu":
        cfg = INTERPRETER_CONFIG
    else:
        cap = torch.cuda.get_device_capability(a.device)
        if os.environ.get("DALLE_FAST_MATMUL_AUTOTUNE", "0") == "1":
            cfg = _autotuned(a2, b, bias, scale, out2, flag, alpha, filter_nonfinite, prescale, cap)
        else:
            cfg = config_for(cap, b.dtype)
    _launch_matmul(a2, b, bias, scale, out2, flag, alpha, filter_nonfinite, prescale, cfg)
    return out, flag


def scale_filter(x, alpha, scale, invert, filter_nonfinite, dtype):
    """(out, flag): out = x * s (x / s with invert) rounded to dtype, contiguous; flag int32 [1]."""
    op = "scale_filter"
    _check_tensor(op, "x", x)
    if dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{op}: dtype: expected float16, bfloat16 or float32, got {dtype}")
    _check_scale(op, scale, x.device)
    alpha = _check_alpha(op, alpha)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    flag = torch.zeros(1, dtype=torch.int32, device=x.device)
    n = x.numel()
    if n == 0:
        return out, flag
    xc = x.contiguous()
    grid = (triton_cdiv(n, SCALE_FILTER_BLOCK),)
    _kernels()._scale_filter_kernel[grid](
        xc, scale.reshape(()) if scale is not None else flag, out, flag,
        n,
        alpha,
        HAS_SCALE=scale is not None, INVERT=bool(invert), FILTER=bool(filter_nonfinite), BLOCK=SCALE_FILTER_BLOCK,
        num_warps=SCALE_FILTER_WARPS,
    )  # fmt: skip
    return out, flag
