"""Triton kernels of the scaled matmul family (DESIGN sections 6 and 8). @triton.jit code only; launchers
live in dalle_fast/ops/_triton_matmul.py.

_scaled_matmul_fwd_kernel: out = s * (a @ b) + bias, s = alpha * scale[0] (scale read on the device), with the
scale, the bias, the rounding to the output dtype, the non-finite filter and the flag fused in the epilogue.
    a [M, K] (the launcher flattens a batched a to rows), b [K, N], bias [N], out [M, N], any strides.
    One program computes a BLOCK_M x BLOCK_N tile of out: it walks K in steps of BLOCK_K, accumulating
    tl.dot(a_tile, b_tile) in fp32 (input_precision="ieee" for fp32 inputs: exact fp32 parity, no TF32), then
        y = acc * s + bias        (two roundings, as csrc/include/dalle_fast/epilogue.h)
        r = y rounded to out's dtype
        FILTER: r not finite in out's dtype -> 0, and the flag word is set to 1 (a plain store of 1 by every
                program that saw one: no atomics, any order gives the same result)
    PRESCALE_A (a fp32, b fp16/bf16): each a tile is multiplied by s in fp32 and rounded to b's dtype as it
    is loaded, and the epilogue does not scale: s rides on a (the backward of an fp16 block reading its fp32
    entering gradient, DESIGN section 6). INT64: 64-bit element offsets, set by the launcher only when an
    offset can pass 2**31 (32-bit index math keeps the sm_90 tiles free of spills). DOT_F32: the tiles
    are widened to fp32 before tl.dot (bf16 under the interpreter, whose bf16 arithmetic is wrong).
    Grid: cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N) programs in GROUP_M-row swizzled order (programs that run
    together share b's column tiles in L2).
    Backward (autograd in dalle_fast/ops/matmul.py, on this same kernel): da = s * (g @ b^T),
    db = s * (a^T @ g) (a flattened to rows), dbias = sum of g over rows.

_scale_filter_kernel: out = x * s (x / s with INVERT, IEEE division), rounded to out's dtype, filtered and
flagged the same way; BLOCK elements a program, x and out contiguous.
"""

import triton
import triton.language as tl


@triton.jit
def _finite(v):
    """Whether fp32 v is finite (not NaN, not +-inf)."""
    return (v == v) & (tl.abs(v) < float("inf"))


@triton.jit
def _scaled_matmul_fwd_kernel(
    a_ptr, b_ptr, bias_ptr, scale_ptr, out_ptr, flag_ptr,
    stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on,
    M, N, K,
    alpha,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, FILTER: tl.constexpr, PRESCALE_A: tl.constexpr,
    IEEE: tl.constexpr, DOT_F32: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    group = pid // width
    first_m = group * GROUP_M
    group_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_m
    pid_n = (pid % width) // group_m

    s = alpha
    if HAS_SCALE:
        s = s * tl.load(scale_ptr).to(tl.float32)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if INT64:  # element offsets past 2**31 (the launcher decides): 64-bit index math, more registers
        a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k.to(tl.int64)[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k.to(tl.int64)[:, None] * stride_bk + offs_n.to(tl.int64)[None, :] * stride_bn
    else:
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if PRESCALE_A:
            a = (a.to(tl.float32) * s).to(b.dtype)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE or DOT_F32:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if PRESCALE_A:
        y = acc
    else:
        y = acc * s
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        y = y + bias[None, :]
    r = y.to(out_ptr.dtype.element_ty)
    mask = mask_m[:, None] & mask_n[None, :]
    if FILTER:
        ok = _finite(r.to(tl.float32))
        r = tl.where(ok, r, tl.zeros_like(r))
        nbad = tl.sum(tl.sum((mask & ~ok).to(tl.int32), axis=1), axis=0)
        if nbad > 0:
            tl.store(flag_ptr, 1)
    if INT64:
        out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n.to(tl.int64)[None, :] * stride_on
    else:
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, r, mask=mask)


@triton.jit
def _scale_filter_kernel(
    x_ptr, scale_ptr, out_ptr, flag_ptr,
    n,
    alpha,
    HAS_SCALE: tl.constexpr, INVERT: tl.constexpr, FILTER: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    s = alpha
    if HAS_SCALE:
        s = s * tl.load(scale_ptr).to(tl.float32)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if INVERT:
        y = tl.math.div_rn(x, tl.zeros_like(x) + s)
    else:
        y = x * s
    r = y.to(out_ptr.dtype.element_ty)
    if FILTER:
        ok = _finite(r.to(tl.float32))
        r = tl.where(ok, r, tl.zeros_like(r))
        nbad = tl.sum((mask & ~ok).to(tl.int32), axis=0)
        if nbad > 0:
            tl.store(flag_ptr, 1)
    tl.store(out_ptr + offs, r, mask=mask)
