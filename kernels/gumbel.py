"""Triton kernels of the Gumbel-softmax family (DESIGN sections 3 and 8): noise, fused forward (soft and
hard), fused backward and Gumbel-max sampling. @triton.jit code only; launchers live in
dalle_fast/ops/_triton_gumbel.py.

Layout. The logits are seen as [outer, K, inner] around the reduction dim (reduction_view:
x.reshape(outer, K, inner)), with arbitrary strides. Element (o, k, i) has logical index
(o * K + k) * inner + i and element number n = offset + that index. Two program layouts, chosen by the
constexpr COL:

- COL=False ("row", inner == 1): a program owns BLOCK_M consecutive rows o and walks K in chunks of
  BLOCK_N; its tile is [BLOCK_M rows, BLOCK_N k] and reduces over axis 1.
- COL=True ("column", inner > 1, e.g. the dVAE's [B, 8192, H*W] with dim=1): a program owns one o and
  BLOCK_N consecutive inner columns and walks K in chunks of BLOCK_M; its tile is [BLOCK_M k, BLOCK_N i]
  (coalesced along inner) and reduces over axis 0.

In both layouts axis 1 of a tile runs over consecutive element numbers, so each tile row is
base + arange(BLOCK_N) and the noise uses all four Philox lanes per counter when every base is a multiple
of 4 (constexpr ALIGNED; the launcher decides). With ONE_PASS the whole reduction fits one tile: load,
reduce, write. Otherwise a first loop keeps online statistics and a second loop recomputes and writes.

Random stream: g(n) = gumbel_from_uint32(lane n % 4 of philox4x32_10(seed, counter n // 4)), with
    u = (int32(bits) < 0 ? ~int32(bits) : int32(bits)) * 4.6566127342e-10     (fp32)
    t = max(-log(max(u, 2**-32)), 2**-24);   g = -log(t)
exactly as csrc/include/dalle_fast/math.h and dalle_fast/reference/philox.py.

Integer scalars seed and offset are never specialised (do_not_specialize): their Triton type follows the
value (i32 or i64), and both are widened to int64 before use.
"""

import triton
import triton.language as tl

_UINT_TO_UNIFORM_SCALE = tl.constexpr(4.6566127342e-10)
_GUMBEL_U_MIN = tl.constexpr(2.3283064365386963e-10)  # 2**-32
_GUMBEL_T_MIN = tl.constexpr(5.9604644775390625e-08)  # 2**-24
_INT32_MAX = tl.constexpr(2147483647)


# ----------------------------------------------------------------------------------------------------
# Per-element math (mirrors csrc/include/dalle_fast/math.h)
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _uniform_from_uint32(bits):
    """triton's uint_to_uniform_float written out: int32 bitcast, x < 0 -> ~x, times 4.6566127342e-10 (fp32)."""
    x = bits.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * _UINT_TO_UNIFORM_SCALE


@triton.jit
def _gumbel_from_uniform(u):
    """Guarded -log(-log(u)) in fp32: never infinite, never NaN (range [-3.0993, 16.6355]).

    tl.log lowers to the full-precision __nv_logf on NVIDIA: the large noise values come from u near 1,
    where an approximate log would lose all relative accuracy of -log(u).
    """
    t = tl.maximum(-tl.log(tl.maximum(u, _GUMBEL_U_MIN)), _GUMBEL_T_MIN)
    return -tl.log(t)


@triton.jit
def _gumbel(seed, counter):
    """The noise of the four element numbers 4 * counter + 0..3 (one Philox call each counter)."""
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    g0 = _gumbel_from_uniform(_uniform_from_uint32(r0))
    g1 = _gumbel_from_uniform(_uniform_from_uint32(r1))
    g2 = _gumbel_from_uniform(_uniform_from_uint32(r2))
    g3 = _gumbel_from_uniform(_uniform_from_uint32(r3))
    return g0, g1, g2, g3


@triton.jit
def _gumbel_tile(seed, base, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr):
    """Noise [BLOCK_M, BLOCK_N] of the element numbers base[:, None] + arange(BLOCK_N)[None, :].

    base: [BLOCK_M] int64, >= 0. ALIGNED (every base % 4 == 0, BLOCK_N % 4 == 0): one Philox call per quad,
    the four lanes interleaved back so that element 4q + l gets lane l. Otherwise one call per element and
    a lane select (ragged layouts only).
    """
    if ALIGNED:
        counter = (base >> 2)[:, None] + tl.arange(0, BLOCK_N // 4)[None, :]
        g0, g1, g2, g3 = _gumbel(seed, counter)
        # join(join(g0, g2), join(g1, g3))[m, q, j, i] = g_(2j+i); row-major flattening of (q, j, i) is 4q + 2j + i.
        g = tl.reshape(tl.join(tl.join(g0, g2), tl.join(g1, g3)), [BLOCK_M, BLOCK_N])
    else:
        n = base[:, None] + tl.arange(0, BLOCK_N)[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, n >> 2)
        lane = n & 3
        bits = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
        g = _gumbel_from_uniform(_uniform_from_uint32(bits))
    return g


@triton.jit
def _argmax_combine(v1, i1, v2, i2):
    """torch.argmax's order: larger value wins, NaN beats everything, the first index wins ties (and NaN ties)."""
    nan1 = v1 != v1
    nan2 = v2 != v2
    first = i1 < i2
    take1 = (v1 > v2) | ((v1 == v2) & first) | (nan1 & (~nan2 | first))
    return tl.where(take1, v1, v2), tl.where(take1, i1, i2)


@triton.jit
def _argmax_tile(v, kk, RED: tl.constexpr):
    """(value, index) of torch.argmax of tile v along axis RED; kk: the int32 k index of each element.

    Built from plain max / min reductions rather than a tuple tl.reduce: the same order as _argmax_combine
    (first NaN if any, else the first maximum), and far faster under the interpreter.
    """
    is_nan = v != v
    has_nan = tl.max(is_nan.to(tl.int32), RED) > 0
    m = tl.max(tl.where(is_nan, float("-inf"), v), RED)
    hit = tl.where(tl.expand_dims(has_nan, RED), is_nan, v == tl.expand_dims(m, RED))
    idx = tl.min(tl.where(hit, kk, _INT32_MAX), RED)
    return tl.where(has_nan, float("nan"), m), idx


@triton.jit
def _to_output(y, ptr):
    """fp32 y converted to ptr's element type, rounding to nearest even on every backend.

    The interpreter truncates fp32 -> bf16 where the GPU rounds: rounding the bits first makes the
    conversion exact, so both give the same bf16.
    """
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True)
    return y.to(ptr.dtype.element_ty)


# ----------------------------------------------------------------------------------------------------
# Tile addressing shared by the kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _tile_coords(pid, k0, outer, K, inner, COL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Coordinates of one tile of program `pid` at reduction start k0.

    Returns (o, k, i, mask, base): o, k, i int64 broadcastable to [BLOCK_M, BLOCK_N]; mask [BLOCK_M, BLOCK_N];
    base [BLOCK_M] int64 = logical index of each tile row's first element (add `offset` for element numbers).
    """
    am = tl.arange(0, BLOCK_M)
    an = tl.arange(0, BLOCK_N)
    if COL:
        n_iblk = tl.cdiv(inner, BLOCK_N)
        o = (pid // n_iblk).to(tl.int64)
        i0 = (pid % n_iblk).to(tl.int64) * BLOCK_N
        k1 = k0 + am  # [BLOCK_M]
        i1 = i0 + an  # [BLOCK_N]
        mask = (k1 < K)[:, None] & (i1 < inner)[None, :]
        base = (o * K + k1) * inner + i0
        o2 = o
        k2 = k1[:, None].to(tl.int64)
        i2 = i1[None, :]
    else:
        rows = pid.to(tl.int64) * BLOCK_M + am  # [BLOCK_M]
        k1 = k0 + an  # [BLOCK_N]
        mask = (rows < outer)[:, None] & (k1 < K)[None, :]
        base = rows * K + k0
        o2 = rows[:, None]
        k2 = k1[None, :].to(tl.int64)
        i2 = 0
    return o2, k2, i2, mask, base


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed", "offset"])
def _gumbel_noise_kernel(
    out_ptr,
    numel,
    seed,
    offset,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Gumbel noise of a contiguous tensor: out[i] = g(offset + i), fp32 math, stored in out's dtype.

    One program writes BLOCK_M * BLOCK_N consecutive elements, as a [BLOCK_M, BLOCK_N] tile whose rows are
    consecutive runs of BLOCK_N element numbers (so ALIGNED, i.e. offset % 4 == 0, uses every Philox lane).
    Grid: (cdiv(numel, BLOCK_M * BLOCK_N),).
    out_ptr: [numel] contiguous, fp16/bf16/fp32. numel: int. seed: int64 Philox key (two's complement).
    offset: element number of out[0], >= 0.
    Math: g(n) = -log(max(-log(max(u(n), 2**-32)), 2**-24)), u(n) the uniform of lane n % 4 of
    philox(seed, n // 4). No backward (noise is not differentiable).
    """
    pid = tl.program_id(0).to(tl.int64)
    start = pid * (BLOCK_M * BLOCK_N)
    rows = start + tl.arange(0, BLOCK_M).to(tl.int64) * BLOCK_N  # [BLOCK_M]
    g = _gumbel_tile(seed, offset.to(tl.int64) + rows, BLOCK_M, BLOCK_N, ALIGNED)
    idx = rows[:, None] + tl.arange(0, BLOCK_N)[None, :]
    tl.store(out_ptr + idx, _to_output(g, out_ptr), mask=idx < numel)


@triton.jit(do_not_specialize=["seed", "offset"])
def _gumbel_softmax_fwd_kernel(
    x_ptr,
    y_ptr,
    stride_xo,
    stride_xk,
    stride_xi,
    outer,
    K,
    inner,
    seed,
    offset,
    inv_tau,
    HARD: tl.constexpr,
    COL: tl.constexpr,
    ONE_PASS: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Fused Gumbel-softmax forward over K of the [outer, K, inner] view.

    One program: BLOCK_M rows (COL=False, inner == 1) or one o and BLOCK_N inner columns (COL=True), over all K.
    Grid: (cdiv(outer, BLOCK_M),) for rows; (outer * cdiv(inner, BLOCK_N),) for columns.
    x_ptr: logits [outer, K, inner] with strides (stride_xo, stride_xk, stride_xi), fp16/bf16/fp32.
    y_ptr: output [outer, K, inner] contiguous, logits' dtype. seed: int64 Philox key; offset: element
    number of logical element 0; inv_tau: 1 / tau (fp32).
    Forward (fp32): z_k = (x_k + g_k) * inv_tau, y_k = exp(z_k - max z) / sum_j exp(z_j - max z).
    HARD: y = one_hot(argmax_k (x_k + g_k)) (first index on ties, NaN wins), written without a softmax.
    Backward (see _gumbel_softmax_bwd_kernel): dx = inv_tau * y * (dy - sum_k dy_k y_k), also the
    straight-through gradient of HARD.
    """
    RED: tl.constexpr = 0 if COL else 1
    pid = tl.program_id(0)
    off = offset.to(tl.int64)
    neg_inf = float("-inf")
    if ONE_PASS:
        o, k, i, mask, base = _tile_coords(pid, 0, outer, K, inner, COL, BLOCK_M, BLOCK_N)
        x = tl.load(x_ptr + o * stride_xo + k * stride_xk + i * stride_xi, mask=mask, other=0.0).to(tl.float32)
        v = tl.where(mask, x + _gumbel_tile(seed, off + base, BLOCK_M, BLOCK_N, ALIGNED), neg_inf)
        y_off = (o * K + k) * inner + i
        if HARD:
            kk = (k + tl.zeros([BLOCK_M, BLOCK_N], tl.int64)).to(tl.int32)
            _, best = _argmax_tile(v, kk, RED)
            y = tl.where(kk == tl.expand_dims(best, RED), 1.0, 0.0)
        else:
            z = v * inv_tau
            m = tl.max(z, RED)
            m = tl.where(m == neg_inf, 0.0, m)  # an all -inf row gives 0/0 = NaN like torch, not a NaN max
            e = tl.exp(z - tl.expand_dims(m, RED))
            y = e * tl.expand_dims(1.0 / tl.sum(e, RED), RED)
        tl.store(y_ptr + y_off, _to_output(y, y_ptr), mask=mask)
    else:
        # Pass 1: online statistics over K (argmax for HARD; max and sum for soft).
        if COL:
            S: tl.constexpr = BLOCK_N
        else:
            S: tl.constexpr = BLOCK_M
        m = tl.full([S], neg_inf, tl.float32)
        s = tl.zeros([S], tl.float32)
        best_v = tl.full([S], neg_inf, tl.float32)
        best_i = tl.full([S], _INT32_MAX, tl.int32)
        if COL:
            STEP: tl.constexpr = BLOCK_M
        else:
            STEP: tl.constexpr = BLOCK_N
        for k0 in range(0, K, STEP):
            o, k, i, mask, base = _tile_coords(pid, k0, outer, K, inner, COL, BLOCK_M, BLOCK_N)
            x = tl.load(x_ptr + o * stride_xo + k * stride_xk + i * stride_xi, mask=mask, other=0.0).to(tl.float32)
            v = tl.where(mask, x + _gumbel_tile(seed, off + base, BLOCK_M, BLOCK_N, ALIGNED), neg_inf)
            if HARD:
                kk = (k + tl.zeros([BLOCK_M, BLOCK_N], tl.int64)).to(tl.int32)
                cv, ci = _argmax_tile(v, kk, RED)
                best_v, best_i = _argmax_combine(best_v, best_i, cv, ci)
            else:
                z = v * inv_tau
                m_new = tl.maximum(m, tl.max(z, RED))
                m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
                s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - tl.expand_dims(m_safe, RED)), RED)
                m = m_new
        if not HARD:
            m = tl.where(m == neg_inf, 0.0, m)
            r = 1.0 / s
        # Pass 2: write (recomputing the noise: cheaper than a round trip through memory).
        for k0 in range(0, K, STEP):
            o, k, i, mask, base = _tile_coords(pid, k0, outer, K, inner, COL, BLOCK_M, BLOCK_N)
            y_off = (o * K + k) * inner + i
            if HARD:
                kk = (k + tl.zeros([BLOCK_M, BLOCK_N], tl.int64)).to(tl.int32)
                y = tl.where(kk == tl.expand_dims(best_i, RED), 1.0, 0.0)
            else:
                x = tl.load(x_ptr + o * stride_xo + k * stride_xk + i * stride_xi, mask=mask, other=0.0)
                x = x.to(tl.float32)
                z = tl.where(mask, (x + _gumbel_tile(seed, off + base, BLOCK_M, BLOCK_N, ALIGNED)) * inv_tau, neg_inf)
                y = tl.exp(z - tl.expand_dims(m, RED)) * tl.expand_dims(r, RED)
            tl.store(y_ptr + y_off, _to_output(y, y_ptr), mask=mask)


@triton.jit(do_not_specialize=["seed", "offset"])
def _gumbel_softmax_bwd_kernel(
    dy_ptr,
    x_ptr,
    dx_ptr,
    stride_dyo,
    stride_dyk,
    stride_dyi,
    stride_xo,
    stride_xk,
    stride_xi,
    outer,
    K,
    inner,
    seed,
    offset,
    inv_tau,
    COL: tl.constexpr,
    ONE_PASS: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Fused Gumbel-softmax backward over K of the [outer, K, inner] view, recomputing y from the logits.

    One program and grid as in _gumbel_softmax_fwd_kernel.
    dy_ptr: incoming gradient [outer, K, inner], strides (stride_dyo, stride_dyk, stride_dyi), any float dtype.
    x_ptr: logits [outer, K, inner], strides (stride_xo, stride_xk, stride_xi), fp16/bf16/fp32.
    dx_ptr: output [outer, K, inner] contiguous, logits' dtype. seed, offset, inv_tau as in the forward.
    Forward: y = softmax((x + g) * inv_tau) over K.
    Backward (fp32): m = max z, s = sum exp(z - m), t = sum dy * exp(z - m) (one online pass), then
    dx = inv_tau * e / s * (dy - t / s) with e = exp(z - m), i.e. inv_tau * y * (dy - sum(dy * y)).
    """
    RED: tl.constexpr = 0 if COL else 1
    pid = tl.program_id(0)
    off = offset.to(tl.int64)
    neg_inf = float("-inf")
    if ONE_PASS:
        o, k, i, mask, base = _tile_coords(pid, 0, outer, K, inner, COL, BLOCK_M, BLOCK_N)
        x = tl.load(x_ptr + o * stride_xo + k * stride_xk + i * stride_xi, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + o * stride_dyo + k * stride_dyk + i * stride_dyi, mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        z = tl.where(mask, (x + _gumbel_tile(seed, off + base, BLOCK_M, BLOCK_N, ALIGNED)) * inv_tau, neg_inf)
        m = tl.max(z, RED)
        m = tl.where(m == neg_inf, 0.0, m)
        e = tl.exp(z - tl.expand_dims(m, RED))
        r = 1.0 / tl.sum(e, RED)
        c = tl.sum(dy * e, RED) * r
        dx = (inv_tau * e * tl.expand_dims(r, RED)) * (dy - tl.expand_dims(c, RED))
        tl.store(dx_ptr + (o * K + k) * inner + i, _to_output(dx, dx_ptr), mask=mask)
    else:
        if COL:
            S: tl.constexpr = BLOCK_N
            STEP: tl.constexpr = BLOCK_M
        else:
            S: tl.constexpr = BLOCK_M
            STEP: tl.constexpr = BLOCK_N
        m = tl.full([S], neg_inf, tl.float32)
        s = tl.zeros([S], tl.float32)
        t = tl.zeros([S], tl.float32)
        for k0 in range(0, K, STEP):
            o, k, i, mask, base = _tile_coords(pid, k0, outer, K, inner, COL, BLOCK_M, BLOCK_N)
            x = tl.load(x_ptr + o * stride_xo + k * stride_xk + i * stride_xi, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + o * stride_dyo + k * stride_dyk + i * stride_dyi, mask=mask, other=0.0)
            dy = dy.to(tl.float32)
            z = tl.where(mask, (x + _gumbel_tile(seed, off + base, BLOCK_M, BLOCK_N, ALIGNED)) * inv_tau, neg_inf)
            m_new = tl.maximum(m, tl.max(z, RED))
            m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            e = tl.exp(z - tl.expand_dims(m_safe, RED))
            s = s * alpha + tl.sum(e, RED)
            t = t * alpha + tl.sum(dy * e, RED)
            m = m_new
        m = tl.where(m == neg_inf, 0.0, m)
        r = 1.0 / s
        c = t * r
        for k0 in range(0, K, STEP):
            o, k, i, mask, base = _tile_coords(pid, k0, outer, K, inner, COL, BLOCK_M, BLOCK_N)
            x = tl.load(x_ptr + o * stride_xo + k * stride_xk + i * stride_xi, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + o * stride_dyo + k * stride_dyk + i * stride_dyi, mask=mask, other=0.0)
            dy = dy.to(tl.float32)
            z = tl.where(mask, (x + _gumbel_tile(seed, off + base, BLOCK_M, BLOCK_N, ALIGNED)) * inv_tau, neg_inf)
            e = tl.exp(z - tl.expand_dims(m, RED))
            dx = (inv_tau * e * tl.expand_dims(r, RED)) * (dy - tl.expand_dims(c, RED))
            tl.store(dx_ptr + (o * K + k) * inner + i, _to_output(dx, dx_ptr), mask=mask)


@triton.jit(do_not_specialize=["seed", "offset"])
def _gumbel_argmax_kernel(
    x_ptr,
    out_ptr,
    stride_xo,
    stride_xk,
    stride_xi,
    outer,
    K,
    inner,
    seed,
    offset,
    COL: tl.constexpr,
    ONE_PASS: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Gumbel-max sampling: out[o, i] = argmax_k (x[o, k, i] + g), int64, torch.argmax order (first index on
    ties, NaN counts as the maximum and the first NaN wins).

    One program and grid as in _gumbel_softmax_fwd_kernel.
    x_ptr: logits [outer, K, inner], strides (stride_xo, stride_xk, stride_xi), fp16/bf16/fp32.
    out_ptr: [outer, inner] contiguous int64. seed, offset as in the forward.
    Forward: a sample of softmax(x) along K (Gumbel-max). No backward (integer output).
    """
    RED: tl.constexpr = 0 if COL else 1
    pid = tl.program_id(0)
    off = offset.to(tl.int64)
    neg_inf = float("-inf")
    if COL:
        S: tl.constexpr = BLOCK_N
        STEP: tl.constexpr = BLOCK_M
    else:
        S: tl.constexpr = BLOCK_M
        STEP: tl.constexpr = BLOCK_N
    if ONE_PASS:
        o, k, i, mask, base = _tile_coords(pid, 0, outer, K, inner, COL, BLOCK_M, BLOCK_N)
        x = tl.load(x_ptr + o * stride_xo + k * stride_xk + i * stride_xi, mask=mask, other=0.0).to(tl.float32)
        v = tl.where(mask, x + _gumbel_tile(seed, off + base, BLOCK_M, BLOCK_N, ALIGNED), neg_inf)
        kk = (k + tl.zeros([BLOCK_M, BLOCK_N], tl.int64)).to(tl.int32)
        _, best_i = _argmax_tile(v, kk, RED)
    else:
        best_v = tl.full([S], neg_inf, tl.float32)
        best_i = tl.full([S], _INT32_MAX, tl.int32)
        for k0 in range(0, K, STEP):
            o, k, i, mask, base = _tile_coords(pid, k0, outer, K, inner, COL, BLOCK_M, BLOCK_N)
            x = tl.load(x_ptr + o * stride_xo + k * stride_xk + i * stride_xi, mask=mask, other=0.0).to(tl.float32)
            v = tl.where(mask, x + _gumbel_tile(seed, off + base, BLOCK_M, BLOCK_N, ALIGNED), neg_inf)
            kk = (k + tl.zeros([BLOCK_M, BLOCK_N], tl.int64)).to(tl.int32)
            cv, ci = _argmax_tile(v, kk, RED)
            best_v, best_i = _argmax_combine(best_v, best_i, cv, ci)
    # Output coordinates: the tile's non-reduced axis.
    if COL:
        n_iblk = tl.cdiv(inner, BLOCK_N)
        i_vec = (pid % n_iblk).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        out_off = (pid // n_iblk).to(tl.int64) * inner + i_vec
        out_mask = i_vec < inner
    else:
        rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        out_off = rows
        out_mask = rows < outer
    tl.store(out_ptr + out_off, best_i.to(tl.int64), mask=out_mask)
