"""Triton kernels of the dVAE's fused ops (DESIGN sections 3, 5, 8): gumbel_quantize (forward, logits
gradient, codebook gradient), logit_laplace_nll (forward, backward), categorical_kl_uniform (forward,
backward). @triton.jit code only; launchers live in dalle_fast/ops/_triton_dvae.py.

gumbel_quantize. logits seen as [B, K, S] (S = H * W; strides arbitrary), codebook W [C, K], out [B, C, S]
contiguous. Logits element (b, k, s) has element number offset + (b * K + k) * S + s, so a tile of codes
k (rows) by consecutive pixels s (columns) has rows of consecutive element numbers: the noise comes from
kernels/gumbel.py's _gumbel_tile (all four Philox lanes when ALIGNED). With z = (x + g) / tau:
    forward  per pixel an online softmax over K chunks: m = running max, s = running sum of e^(z - m), and
             acc[c] = running sum_k W[c, k] e^(z_k - m) (a tl.dot per chunk, rescaled when m grows);
             out = acc / s + bias, lse = m + ln s. hard: out = W[:, argmax_k (x + g)] + bias (and lse).
    backward y_k = e^(z_k - lse) (recomputed), G = W^T dout (tl.dot), t = sum_k y_k G_k,
             dx = (1/tau) y (G - t)                 (_gumbel_quantize_bwd_dx_kernel: two passes over K)
             dW[c, k] = sum_pixels dout[c] y_k      (_gumbel_quantize_bwd_dw_kernel: a program owns a
             [BLOCK_C, BLOCK_K] block of dW and walks every pixel: deterministic, no atomics; hard: y is
             the one-hot of the saved argmax).
The relaxed one-hots only ever exist as [BLOCK_K, BLOCK_S] register tiles.

Losses: see dalle_fast/reference/dvae.py and csrc/include/dalle_fast/dvae.h for the formulas.
"""

import triton
import triton.language as tl

from .gumbel import _argmax_combine, _argmax_tile, _gumbel_tile, _tile_coords, _to_output

_INT32_MAX = tl.constexpr(2147483647)
_LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------------
# gumbel_quantize
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _scores(x_ptr, stride_xb, stride_xk, stride_xs, b, k, s0, s, mask, K, S, seed, off, inv_tau,
            BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, ALIGNED: tl.constexpr):  # fmt: skip
    """v = x + g (-inf outside the mask) and z = v * inv_tau of the [BLOCK_K, BLOCK_S] tile (k rows, s columns)."""
    x = tl.load(x_ptr + b * stride_xb + k[:, None] * stride_xk + s[None, :] * stride_xs, mask=mask, other=0.0)
    base = (b * K + k) * S + s0
    g = _gumbel_tile(seed, off + base, BLOCK_K, BLOCK_S, ALIGNED)
    v = tl.where(mask, x.to(tl.float32) + g, float("-inf"))
    return v, v * inv_tau


@triton.jit(do_not_specialize=["seed", "offset"])
def _gumbel_quantize_fwd_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    lse_ptr,
    idx_ptr,
    stride_xb,
    stride_xk,
    stride_xs,
    stride_wc,
    stride_wk,
    B,
    K,
    S,
    C,
    seed,
    offset,
    inv_tau,
    HAS_BIAS: tl.constexpr,
    HARD: tl.constexpr,
    ALIGNED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Fused Gumbel-softmax + codebook 1x1 convolution, forward.

    One program: image b, pixels s0 .. s0 + BLOCK_S, channels c0 .. c0 + BLOCK_C, all K codes in chunks of
    BLOCK_K. Grid: (B * cdiv(S, BLOCK_S), cdiv(C, BLOCK_C)).
    x_ptr: logits [B, K, S] (strides stride_xb, stride_xk, stride_xs), fp16/bf16/fp32. w_ptr: codebook [C, K]
    (strides stride_wc, stride_wk), any float. bias_ptr: [C] (HAS_BIAS). out_ptr: [B, C, S] contiguous,
    logits' dtype. lse_ptr: [B, S] fp32 (written by the programs of channel block 0). idx_ptr: [B, S] int64
    (HARD only). seed: int64 Philox key; offset: element number of logits[0, 0, 0]; inv_tau = 1 / tau.
    Forward: z = (x + g) * inv_tau; out[c, s] = sum_k W[c, k] softmax_k(z)[k, s] + bias[c]; lse = logsumexp_k z.
    HARD: out[c, s] = W[c, argmax_k (x + g)] + bias[c] (torch.argmax order), lse as above.
    Backward: _gumbel_quantize_bwd_dx_kernel and _gumbel_quantize_bwd_dw_kernel.
    """
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_sblk = tl.cdiv(S, BLOCK_S)
    b = (pid // n_sblk).to(tl.int64)
    s0 = (pid % n_sblk).to(tl.int64) * BLOCK_S
    s = s0 + tl.arange(0, BLOCK_S)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    s_mask = s < S
    c_mask = c < C
    off = offset.to(tl.int64)
    neg_inf = float("-inf")
    m = tl.full([BLOCK_S], neg_inf, tl.float32)
    den = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    best_v = tl.full([BLOCK_S], neg_inf, tl.float32)
    best_i = tl.full([BLOCK_S], _INT32_MAX, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_mask = k < K
        mask = k_mask[:, None] & s_mask[None, :]
        v, z = _scores(x_ptr, stride_xb, stride_xk, stride_xs, b, k, s0, s, mask, K, S, seed, off, inv_tau,
                       BLOCK_K, BLOCK_S, ALIGNED)  # fmt: skip
        m_new = tl.maximum(m, tl.max(z, 0))
        m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe[None, :])
        den = den * alpha + tl.sum(e, 0)
        m = m_new
        if HARD:
            kk = (k[:, None] + tl.zeros([BLOCK_K, BLOCK_S], tl.int64)).to(tl.int32)
            cv, ci = _argmax_tile(v, kk, 0)
            best_v, best_i = _argmax_combine(best_v, best_i, cv, ci)
        else:
            w = tl.load(w_ptr + c[:, None] * stride_wc + k[None, :] * stride_wk,
                        mask=c_mask[:, None] & k_mask[None, :], other=0.0)  # fmt: skip
            acc = acc * alpha[None, :] + tl.dot(w.to(tl.float32), e, input_precision=PRECISION)
    m_safe = tl.where(m == neg_inf, 0.0, m)
    out_mask = c_mask[:, None] & s_mask[None, :]
    if HARD:
        y = tl.load(w_ptr + c[:, None] * stride_wc + best_i.to(tl.int64)[None, :] * stride_wk, mask=out_mask, other=0.0)
        y = y.to(tl.float32)
    else:
        y = acc * (1.0 / den)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + (b * C + c[:, None]) * S + s[None, :], _to_output(y, out_ptr), mask=out_mask)
    if pid_c == 0:
        tl.store(lse_ptr + b * S + s, m_safe + tl.log(den), mask=s_mask)
        if HARD:
            tl.store(idx_ptr + b * S + s, best_i.to(tl.int64), mask=s_mask)


@triton.jit
def _codebook_grad_tile(w_ptr, stride_wc, stride_wk, dout_ptr, b, k, k_mask, s, s_mask, S, C,
                        PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
                        BLOCK_C: tl.constexpr):  # fmt: skip
    """G[k, s] = sum_c W[c, k] dout[b, c, s] over all C (chunks of BLOCK_C); dout fp32 [B, C, S] contiguous."""
    G = tl.zeros([BLOCK_K, BLOCK_S], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        wt = tl.load(w_ptr + c[None, :] * stride_wc + k[:, None] * stride_wk,
                     mask=k_mask[:, None] & c_mask[None, :], other=0.0)  # fmt: skip
        d = tl.load(dout_ptr + (b * C + c[:, None]) * S + s[None, :], mask=c_mask[:, None] & s_mask[None, :], other=0.0)
        G += tl.dot(wt.to(tl.float32), d, input_precision=PRECISION)
    return G


@triton.jit(do_not_specialize=["seed", "offset"])
def _gumbel_quantize_bwd_dx_kernel(
    x_ptr,
    w_ptr,
    dout_ptr,
    lse_ptr,
    dx_ptr,
    stride_xb,
    stride_xk,
    stride_xs,
    stride_wc,
    stride_wk,
    B,
    K,
    S,
    C,
    seed,
    offset,
    inv_tau,
    ALIGNED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Logits gradient of gumbel_quantize (soft; also the straight-through gradient of hard mode).

    One program: image b, pixels s0 .. s0 + BLOCK_S, all K (two passes of BLOCK_K chunks).
    Grid: (B * cdiv(S, BLOCK_S),).
    x_ptr, w_ptr, strides, seed, offset, inv_tau: as in the forward. dout_ptr: [B, C, S] fp32 contiguous.
    lse_ptr: [B, S] fp32 from the forward. dx_ptr: [B, K, S] contiguous, logits' dtype.
    y = exp(z - lse); G = W^T dout; t = sum_k y G (pass 1); dx = inv_tau * y * (G - t) (pass 2).
    """
    pid = tl.program_id(0)
    n_sblk = tl.cdiv(S, BLOCK_S)
    b = (pid // n_sblk).to(tl.int64)
    s0 = (pid % n_sblk).to(tl.int64) * BLOCK_S
    s = s0 + tl.arange(0, BLOCK_S)
    s_mask = s < S
    off = offset.to(tl.int64)
    lse = tl.load(lse_ptr + b * S + s, mask=s_mask, other=0.0)
    t = tl.zeros([BLOCK_S], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_mask = k < K
        mask = k_mask[:, None] & s_mask[None, :]
        _, z = _scores(x_ptr, stride_xb, stride_xk, stride_xs, b, k, s0, s, mask, K, S, seed, off, inv_tau,
                       BLOCK_K, BLOCK_S, ALIGNED)  # fmt: skip
        y = tl.exp(z - lse[None, :])
        G = _codebook_grad_tile(w_ptr, stride_wc, stride_wk, dout_ptr, b, k, k_mask, s, s_mask, S, C,
                                PRECISION, BLOCK_K, BLOCK_S, BLOCK_C)  # fmt: skip
        t += tl.sum(tl.where(mask, y * G, 0.0), 0)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_mask = k < K
        mask = k_mask[:, None] & s_mask[None, :]
        _, z = _scores(x_ptr, stride_xb, stride_xk, stride_xs, b, k, s0, s, mask, K, S, seed, off, inv_tau,
                       BLOCK_K, BLOCK_S, ALIGNED)  # fmt: skip
        y = tl.exp(z - lse[None, :])
        G = _codebook_grad_tile(w_ptr, stride_wc, stride_wk, dout_ptr, b, k, k_mask, s, s_mask, S, C,
                                PRECISION, BLOCK_K, BLOCK_S, BLOCK_C)  # fmt: skip
        dx = inv_tau * y * (G - t[None, :])
        tl.store(dx_ptr + (b * K + k[:, None]) * S + s[None, :], _to_output(dx, dx_ptr), mask=mask)


@triton.jit(do_not_specialize=["seed", "offset"])
def _gumbel_quantize_bwd_dw_kernel(
    x_ptr,
    dout_ptr,
    lse_ptr,
    idx_ptr,
    dw_ptr,
    stride_xb,
    stride_xk,
    stride_xs,
    B,
    K,
    S,
    C,
    seed,
    offset,
    inv_tau,
    HARD: tl.constexpr,
    ALIGNED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Codebook gradient of gumbel_quantize: dW[c, k] = sum_{b, s} dout[b, c, s] y[b, k, s].

    One program: dW[c0 .. c0 + BLOCK_C, k0 .. k0 + BLOCK_K], walking every image and every BLOCK_S pixels.
    Grid: (cdiv(C, BLOCK_C), cdiv(K, BLOCK_K)).
    x_ptr, strides, seed, offset, inv_tau: as in the forward. dout_ptr: [B, C, S] fp32 contiguous. lse_ptr:
    [B, S] fp32. idx_ptr: [B, S] int64 (HARD). dw_ptr: [C, K] fp32 contiguous.
    y = exp(z - lse) (soft) or one_hot(idx) (HARD: the forward's value; straight-through).
    """
    pid_c = tl.program_id(0)
    pid_k = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    c_mask = c < C
    k_mask = k < K
    off = offset.to(tl.int64)
    acc = tl.zeros([BLOCK_C, BLOCK_K], tl.float32)
    for bi in range(0, B):
        b = tl.full([], 0, tl.int64) + bi
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
            s_mask = s < S
            mask = k_mask[:, None] & s_mask[None, :]
            if HARD:
                idx = tl.load(idx_ptr + b * S + s, mask=s_mask, other=-1)
                y = tl.where(mask & (k[:, None] == idx[None, :]), 1.0, 0.0)
            else:
                lse = tl.load(lse_ptr + b * S + s, mask=s_mask, other=0.0)
                _, z = _scores(x_ptr, stride_xb, stride_xk, stride_xs, b, k, s0, s, mask, K, S, seed, off, inv_tau,
                               BLOCK_K, BLOCK_S, ALIGNED)  # fmt: skip
                y = tl.where(mask, tl.exp(z - lse[None, :]), 0.0)
            d = tl.load(dout_ptr + (b * C + c[:, None]) * S + s[None, :], mask=c_mask[:, None] & s_mask[None, :],
                        other=0.0)  # fmt: skip
            acc += tl.dot(d, tl.trans(y), input_precision=PRECISION)
    tl.store(dw_ptr + c[:, None] * K + k[None, :], acc, mask=c_mask[:, None] & k_mask[None, :])


# ----------------------------------------------------------------------------------------------------
# logit_laplace_nll
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _nll_terms(x, mu, lb):
    """(nll, d, ib, lx, l1x) in fp32: d = logit(x) - mu, ib = exp(-lb)."""
    lx = tl.log(x)
    l1x = tl.log(1.0 - x)
    ib = tl.exp(-lb)
    d = (lx - l1x) - mu
    return tl.abs(d) * ib + lb + lx + l1x + _LN2, d, ib


@triton.jit
def _logit_laplace_nll_fwd_kernel(x_ptr, mu_ptr, lb_ptr, out_ptr, N, REDUCE: tl.constexpr, BLOCK: tl.constexpr):
    """One program: BLOCK consecutive elements of the flat, contiguous x, mu, log_b (fp16/bf16/fp32).
    Grid: (cdiv(N, BLOCK),). REDUCE False: out_ptr [N] fp32 gets the elementwise nll; True: out_ptr
    [grid] fp32 gets each program's partial sum (the launcher adds them up in fp64).
    nll = |logit(x) - mu| exp(-lb) + lb + ln x + ln(1 - x) + ln 2 (fp32).
    Backward: _logit_laplace_nll_bwd_kernel.
    """
    pid = tl.program_id(0)
    i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < N
    x = tl.load(x_ptr + i, mask=mask, other=0.5).to(tl.float32)
    mu = tl.load(mu_ptr + i, mask=mask, other=0.0).to(tl.float32)
    lb = tl.load(lb_ptr + i, mask=mask, other=0.0).to(tl.float32)
    nll, _, _ = _nll_terms(x, mu, lb)
    if REDUCE:
        tl.store(out_ptr + pid, tl.sum(tl.where(mask, nll, 0.0), 0))
    else:
        tl.store(out_ptr + i, nll, mask=mask)


@triton.jit
def _logit_laplace_nll_bwd_kernel(g_ptr, x_ptr, mu_ptr, lb_ptr, dx_ptr, dmu_ptr, dlb_ptr, N, g_scale,
                                  G_SCALAR: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """One program: BLOCK consecutive elements. Grid: (cdiv(N, BLOCK),).
    g_ptr: fp32 [N] incoming gradient, or [1] (G_SCALAR: the reduced loss's, times g_scale: 1/N for mean).
    dx, dmu, dlb: [N] contiguous in the inputs' dtype.
    d = logit(x) - mu: dmu = -g sgn(d) e^-lb, dlb = g (1 - |d| e^-lb),
    dx = g (sgn(d) e^-lb (1/x + 1/(1 - x)) + 1/x - 1/(1 - x)).
    """
    pid = tl.program_id(0)
    i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < N
    x = tl.load(x_ptr + i, mask=mask, other=0.5).to(tl.float32)
    mu = tl.load(mu_ptr + i, mask=mask, other=0.0).to(tl.float32)
    lb = tl.load(lb_ptr + i, mask=mask, other=0.0).to(tl.float32)
    if G_SCALAR:
        g = tl.load(g_ptr) * g_scale
    else:
        g = tl.load(g_ptr + i, mask=mask, other=0.0)
    _, d, ib = _nll_terms(x, mu, lb)
    sg = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, d))
    inv_x = 1.0 / x
    inv_1mx = 1.0 / (1.0 - x)
    tl.store(dmu_ptr + i, _to_output(-g * sg * ib, dmu_ptr), mask=mask)
    tl.store(dlb_ptr + i, _to_output(g * (1.0 - tl.abs(d) * ib), dlb_ptr), mask=mask)
    tl.store(dx_ptr + i, _to_output(g * (sg * ib * (inv_x + inv_1mx) + inv_x - inv_1mx), dx_ptr), mask=mask)


# ----------------------------------------------------------------------------------------------------
# categorical_kl_uniform: the [outer, K, inner] layouts of kernels/gumbel.py (_tile_coords)
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _categorical_kl_fwd_kernel(
    x_ptr,
    stats_ptr,
    stride_xo,
    stride_xk,
    stride_xi,
    outer,
    K,
    inner,
    COL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Per-row statistics of softmax over K of the [outer, K, inner] view, one online pass.

    One program: BLOCK_M rows (COL=False, inner == 1) or one o and BLOCK_N inner columns (COL=True), all K.
    Grid: (cdiv(outer, BLOCK_M),) or (outer * cdiv(inner, BLOCK_N),).
    x_ptr: logits (strides stride_xo, stride_xk, stride_xi), fp16/bf16/fp32. stats_ptr: [2, outer * inner]
    fp32 contiguous: row r = o * inner + i gets lse = m + ln s at [0, r] and negent = sum q ln q = u / s - ln s
    at [1, r], where m = max l, s = sum e^(l - m), u = sum e^(l - m) (l - m) (rescaled online as m grows).
    The launcher forms kl = negent + ln K. Backward: _categorical_kl_bwd_kernel.
    """
    RED: tl.constexpr = 0 if COL else 1
    if COL:
        NS: tl.constexpr = BLOCK_N
        STEP: tl.constexpr = BLOCK_M
    else:
        NS: tl.constexpr = BLOCK_M
        STEP: tl.constexpr = BLOCK_N
    pid = tl.program_id(0)
    neg_inf = float("-inf")
    m = tl.full([NS], neg_inf, tl.float32)
    s = tl.zeros([NS], tl.float32)
    u = tl.zeros([NS], tl.float32)
    for k0 in range(0, K, STEP):
        o, k, i, mask, _ = _tile_coords(pid, k0, outer, K, inner, COL, BLOCK_M, BLOCK_N)
        x = tl.load(x_ptr + o * stride_xo + k * stride_xk + i * stride_xi, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x, neg_inf)
        m_new = tl.maximum(m, tl.max(x, RED))
        m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
        shift = tl.where(m == neg_inf, 0.0, m - m_safe)
        alpha = tl.exp(shift)
        alpha = tl.where(m == neg_inf, 0.0, alpha)
        d = x - tl.expand_dims(m_safe, RED)
        e = tl.exp(d)
        u = alpha * (u + s * shift) + tl.sum(tl.where(mask, e * d, 0.0), RED)
        s = s * alpha + tl.sum(e, RED)
        m = m_new
    m_safe = tl.where(m == neg_inf, 0.0, m)
    log_s = tl.log(s)
    if COL:
        n_iblk = tl.cdiv(inner, BLOCK_N)
        iv = (pid % n_iblk).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = (pid // n_iblk).to(tl.int64) * inner + iv
        rmask = iv < inner
    else:
        r = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = r < outer
    R = outer.to(tl.int64) * inner
    tl.store(stats_ptr + r, m_safe + log_s, mask=rmask)
    tl.store(stats_ptr + R + r, u / s - log_s, mask=rmask)


@triton.jit
def _categorical_kl_bwd_kernel(
    x_ptr,
    stats_ptr,
    g_ptr,
    dx_ptr,
    stride_xo,
    stride_xk,
    stride_xi,
    outer,
    K,
    inner,
    COL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Logits gradient of the KL: dx_k = g q_k ((l_k - lse) - negent), q = exp(l - lse), one pass.

    One program and grid as in _categorical_kl_fwd_kernel. stats_ptr: the forward's [2, rows] fp32.
    g_ptr: [rows] fp32 per-row incoming gradient. dx_ptr: [outer, K, inner] contiguous, logits' dtype.
    """
    RED: tl.constexpr = 0 if COL else 1
    if COL:
        STEP: tl.constexpr = BLOCK_M
    else:
        STEP: tl.constexpr = BLOCK_N
    pid = tl.program_id(0)
    R = outer.to(tl.int64) * inner
    if COL:
        n_iblk = tl.cdiv(inner, BLOCK_N)
        iv = (pid % n_iblk).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = (pid // n_iblk).to(tl.int64) * inner + iv
        rmask = iv < inner
    else:
        r = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = r < outer
    lse = tl.expand_dims(tl.load(stats_ptr + r, mask=rmask, other=0.0), RED)
    neg = tl.expand_dims(tl.load(stats_ptr + R + r, mask=rmask, other=0.0), RED)
    g = tl.expand_dims(tl.load(g_ptr + r, mask=rmask, other=0.0), RED)
    for k0 in range(0, K, STEP):
        o, k, i, mask, _ = _tile_coords(pid, k0, outer, K, inner, COL, BLOCK_M, BLOCK_N)
        x = tl.load(x_ptr + o * stride_xo + k * stride_xk + i * stride_xi, mask=mask, other=0.0).to(tl.float32)
        d = x - lse
        dx = g * tl.exp(d) * (d - neg)
        tl.store(dx_ptr + (o * K + k) * inner + i, _to_output(dx, dx_ptr), mask=mask)
