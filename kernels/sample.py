"""Triton kernel of dalle_fast.ops.sample: temperature, top-k and top-p filtering and Gumbel-max in one
program per row (@triton.jit code only; the launcher is dalle_fast/ops/_triton_sample.py).

Math (fp32), for one row x[0..V) of the [R, V] view of the logits, element numbers offset + r * V + j:
    z_j = x_j / temperature (IEEE round-to-nearest division, as the eager reference and the C++ kernels)
    key_j = the order-preserving uint32 of z_j (negative: ~bits; non-negative: bits | 2**31; +-0 -> 2**31),
            so z_i >= z_j  <=>  key_i >= key_j for every non-NaN pair.
    top-k: Tk = the largest T with count(key >= T) >= k, built bit by bit from bit 31 down (32 counts);
           Tk is the key of the k-th largest z, and key >= Tk keeps the ties at it.
    top-p: e_j = exp(z_j - max z) on the entries kept by top-k (0 elsewhere), S = sum e;
           Tp = the largest T with sum(e_j : key_j >= T) >= top_p * S (32 masked sums, same bit walk):
           the smallest set of the largest entries with mass >= top_p, ties at its last value kept.
    out = argmax over kept j of (z_j + g_j) (first index on ties), g the Gumbel noise of DESIGN section 3.
    A row with a NaN or +inf z, or with every z = -inf, gets out = -1 (checked by the wrapper on CPU).
No threshold search needs a sort: each bit of the threshold is one reduction over the row, which stays in
registers when V <= BLOCK_V (ONE_CHUNK; short rows share a program, BLOCK_R of them), and is re-read in
chunks of BLOCK_V (from L1/L2) otherwise.
"""

import triton
import triton.language as tl

from .gumbel import _gumbel_tile

_INT32_MAX = tl.constexpr(2147483647)


@triton.jit
def _sample_load(x_ptr, rows, rmask, stride_xr, stride_xv, V, v0, temperature, BLOCK_V: tl.constexpr):
    """z [BLOCK_R, BLOCK_V] (fp32; -inf outside the row), key (uint32; 0 outside), in-range mask, column index."""
    j = v0 + tl.arange(0, BLOCK_V)[None, :]
    valid = rmask[:, None] & (j < V)
    x = tl.load(x_ptr + rows[:, None] * stride_xr + j.to(tl.int64) * stride_xv, mask=valid, other=0.0)
    z = tl.math.div_rn(x.to(tl.float32), temperature)  # IEEE division, as torch and C++ ('/' is approximate on GPU)
    bits = z.to(tl.uint32, bitcast=True)
    key = tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)  # (~ overflows in the interpreter)
    key = tl.where(z == 0.0, 0x80000000, key)
    key = tl.where(valid, key, 0)
    z = tl.where(valid, z, float("-inf"))
    return z, key, valid, j


@triton.jit
def _candidate(T, i):
    """Step i of the bit walk: T with bit 31 - i set (T: [BLOCK_R] uint32)."""
    return T | (tl.full([1], 1, tl.uint32) << (31 - i))


@triton.jit(do_not_specialize=["seed", "offset", "k", "V", "R"])
def _sample_kernel(
    x_ptr,
    out_ptr,
    stride_xr,
    stride_xv,
    R,
    V,
    seed,
    offset,
    temperature,
    k,
    top_p,
    USE_K: tl.constexpr,
    USE_P: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program samples BLOCK_R rows: out[r] = the filtered Gumbel-max of x[r, :] (math in the module doc).

    Grid: (cdiv(R, BLOCK_R),). x_ptr: logits [R, V] with strides (stride_xr, stride_xv), fp16/bf16/fp32.
    out_ptr: [R] int64. seed: int64 Philox key; offset: element number of x[0, 0]. temperature: > 0.
    k: top_k in [1, V] (USE_K). top_p: in (0, 1) (USE_P). ONE_CHUNK: V <= BLOCK_V, the tile [BLOCK_R, BLOCK_V]
    stays in registers; otherwise (BLOCK_R = 1) every pass re-reads the row in chunks of BLOCK_V.
    ALIGNED: every row starts at an element number divisible by 4 (all Philox lanes used).
    No backward (integer output).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    base = offset.to(tl.int64) + rows * V  # [BLOCK_R] element number of each row's first entry
    neg_inf = float("-inf")
    if ONE_CHUNK:
        z, key, valid, j = _sample_load(x_ptr, rows, rmask, stride_xr, stride_xv, V, 0, temperature, BLOCK_V)
        m = tl.max(z, 1)
        nan = tl.max(tl.where(z != z, 1, 0), 1)
    else:
        m = tl.full([BLOCK_R], neg_inf, tl.float32)
        nan = tl.zeros([BLOCK_R], tl.int32)
        for v0 in range(0, V, BLOCK_V):
            z, key, valid, j = _sample_load(x_ptr, rows, rmask, stride_xr, stride_xv, V, v0, temperature, BLOCK_V)
            m = tl.maximum(m, tl.max(z, 1))
            nan = tl.maximum(nan, tl.max(tl.where(z != z, 1, 0), 1))
    bad = (nan > 0) | (m == float("inf")) | (m == neg_inf)
    m_safe = tl.where(bad, 0.0, m)
    T = tl.zeros([BLOCK_R], tl.uint32)
    if USE_K:  # T = the largest key with count(key >= T) >= k
        for i in range(32):
            cand = _candidate(T, i)
            if ONE_CHUNK:
                c = tl.sum(tl.where(key >= cand[:, None], 1, 0), 1)
            else:
                c = tl.zeros([BLOCK_R], tl.int32)
                for v0 in range(0, V, BLOCK_V):
                    z, key, _, _ = _sample_load(x_ptr, rows, rmask, stride_xr, stride_xv, V, v0, temperature, BLOCK_V)
                    c += tl.sum(tl.where(key >= cand[:, None], 1, 0), 1)
            T = tl.where(c >= k, cand, T)
    if USE_P:  # T = the largest key with mass(key >= T) >= top_p * S, over the top-k set (key >= Tk)
        Tk = T
        if ONE_CHUNK:
            e = tl.where(key >= Tk[:, None], tl.exp(z - m_safe[:, None]), 0.0)
            S = tl.sum(e, 1)
        else:
            S = tl.zeros([BLOCK_R], tl.float32)
            for v0 in range(0, V, BLOCK_V):
                z, key, valid, j = _sample_load(x_ptr, rows, rmask, stride_xr, stride_xv, V, v0, temperature, BLOCK_V)
                S += tl.sum(tl.where(key >= Tk[:, None], tl.exp(z - m_safe[:, None]), 0.0), 1)
        target = top_p * S
        T = tl.zeros([BLOCK_R], tl.uint32)
        for i in range(32):
            cand = _candidate(T, i)
            if ONE_CHUNK:
                s = tl.sum(tl.where(key >= cand[:, None], e, 0.0), 1)
            else:
                s = tl.zeros([BLOCK_R], tl.float32)
                for v0 in range(0, V, BLOCK_V):
                    z, key, _, _ = _sample_load(x_ptr, rows, rmask, stride_xr, stride_xv, V, v0, temperature, BLOCK_V)
                    e = tl.where(key >= Tk[:, None], tl.exp(z - m_safe[:, None]), 0.0)
                    s += tl.sum(tl.where(key >= cand[:, None], e, 0.0), 1)
            T = tl.where(s >= target, cand, T)
    if ONE_CHUNK:
        g = _gumbel_tile(seed, base, BLOCK_R, BLOCK_V, ALIGNED)
        v = tl.where(valid & (key >= T[:, None]), z + g, neg_inf)
        best = tl.max(v, 1)
        idx = tl.min(tl.where(v == best[:, None], j, _INT32_MAX), 1)
    else:
        best = tl.full([BLOCK_R], neg_inf, tl.float32)
        idx = tl.full([BLOCK_R], _INT32_MAX, tl.int32)
        for v0 in range(0, V, BLOCK_V):
            z, key, valid, j = _sample_load(x_ptr, rows, rmask, stride_xr, stride_xv, V, v0, temperature, BLOCK_V)
            g = _gumbel_tile(seed, base + v0, BLOCK_R, BLOCK_V, ALIGNED)
            v = tl.where(valid & (key >= T[:, None]), z + g, neg_inf)
            cb = tl.max(v, 1)
            ci = tl.min(tl.where(v == cb[:, None], j, _INT32_MAX), 1)
            take = cb > best  # chunks in order: an equal later maximum loses (first index)
            idx = tl.where(take, ci, idx)
            best = tl.where(take, cb, best)
    tl.store(out_ptr + rows, tl.where(bad, -1, idx.to(tl.int64)), mask=rmask)
