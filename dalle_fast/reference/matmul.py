"""Eager oracles of the scaled matmul family (DESIGN section 6): fp32 math (fp64 for fp64 inputs).

    scaled_matmul(a, b, bias, alpha, scale, filter_nonfinite) -> (out, flag)
        out = s * (a @ b) + bias with s = alpha * scale (fp32), rounded to the output dtype
    scale_filter(x, alpha, scale, invert, filter_nonfinite, dtype) -> (out, flag)
        out = x * s (or x / s with invert), rounded to `dtype`

Filter: with filter_nonfinite, every element that is not finite in the output dtype (NaN, +-inf, or a value
that overflows the output dtype when rounded) is written as 0, and `flag` (int32, shape [1]) is 1 if any
was; without the filter the flag is 0 and nothing is checked.

Mixed precision of scaled_matmul: a and b share a dtype (fp16, bf16, fp32; the oracle also takes fp64), or
a is fp32 and b fp16/bf16. In the mixed case `a` is multiplied by s in fp32 and rounded to b's dtype before
the product (s rides on a as it is read, so small values of a that s lifts survive the rounding: the
backward of an fp16 block reading its fp32 entering gradient); the output then has b's dtype. Otherwise the
product accumulates in fp32 and s multiplies the accumulator.
"""

import torch

_LOW = (torch.float16, torch.bfloat16)


def _effective_scale(alpha: float, scale, device) -> torch.Tensor:
    """alpha * scale as a 0-dim fp32 tensor on `device` (never read on the host)."""
    s = torch.tensor(float(alpha), dtype=torch.float32, device=device)
    if scale is not None:
        s = s * scale.to(device=device, dtype=torch.float32).reshape(())
    return s


def _filter(y: torch.Tensor, filter_nonfinite: bool) -> tuple[torch.Tensor, torch.Tensor]:
    flag = torch.zeros(1, dtype=torch.int32, device=y.device)
    if not filter_nonfinite:
        return y, flag
    bad = ~torch.isfinite(y)
    flag = bad.any().to(torch.int32).reshape(1)
    return torch.where(bad, torch.zeros((), dtype=y.dtype, device=y.device), y), flag


def scaled_matmul(a, b, bias=None, alpha=1.0, scale=None, filter_nonfinite=False):
    """(out, flag): out = alpha * scale * (a @ b) + bias in fp32 math, a [..., M, K], b [K, N], bias [N]."""
    s = _effective_scale(alpha, scale, a.device)
    mixed = a.dtype == torch.float32 and b.dtype in _LOW
    out_dtype = b.dtype if mixed else a.dtype
    math_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    if mixed:
        a = (a.float() * s).to(b.dtype)
        s = torch.ones((), dtype=torch.float32, device=a.device)
    acc = torch.matmul(a.to(math_dtype), b.to(math_dtype))
    y = acc * s.to(math_dtype)
    if bias is not None:
        y = y + bias.to(math_dtype)
    return _filter(y.to(out_dtype), filter_nonfinite)


def scale_filter(x, alpha=1.0, scale=None, invert=False, filter_nonfinite=False, dtype=None):
    """(out, flag): out = x * s (x / s with invert), s = alpha * scale, fp32 math, rounded to dtype."""
    s = _effective_scale(alpha, scale, x.device)
    math_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(math_dtype)
    y = xf / s.to(math_dtype) if invert else xf * s.to(math_dtype)
    return _filter(y.to(dtype or x.dtype), filter_nonfinite)
