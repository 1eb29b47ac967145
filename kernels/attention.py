"""Triton kernels of the block-sparse DALL-E attention (DESIGN section 4): a FlashAttention-2 style forward
and backward that visit only the tiles of a precomputed tile layout. @triton.jit code only; launchers,
validation and the configuration table live in dalle_fast/ops/_triton_attention.py.

Math (one batch b and head h; s_ij = scale * q_i . k_j, M the layer's mask):
    forward    P_ij = exp(s_ij - lse_i) where M_ij, else 0;  lse_i = log sum_{j: M_ij} exp(s_ij)
               out_i = sum_j P_ij v_j
    backward   delta_i = sum_d dO_id out_id                    (_sparse_attention_bwd_preprocess_kernel)
               dV_j = sum_i P_ij dO_i                           (_sparse_attention_bwd_dkdv_kernel)
               dP_ij = dO_i . v_j;  dS_ij = P_ij (dP_ij - delta_i)
               dK_j = scale * sum_i dS_ij q_i                   (_sparse_attention_bwd_dkdv_kernel)
               dQ_i = scale * sum_j dS_ij k_j                   (_sparse_attention_bwd_dq_kernel)
    Scores are kept in base 2 (s * log2(e), exp2), as FlashAttention's Triton kernels do; lse is stored in the
    natural log. Accumulation is fp32; for fp16/bf16 inputs P and dS are rounded to the input dtype before the
    second GEMM (tensor-core inputs), as flash attention does. fp32 inputs use input_precision="ieee".

Positions. The kernels walk a *processing order* (dalle_fast/masks.py): raster order for every kind but column
(KIND == 2), whose image part is taken column by column, where the mask is block-diagonal. Processing
position p in [0, n_rows) lives at memory row r = processing_row(p) of q, k, v, out and the gradients; it is
present when p < n_rows and r < seq_len (a prefix of the layout), and absent rows are never loaded, stored or
counted. Query tile i = processing positions [i * BLOCK_M, (i + 1) * BLOCK_M), key tile j likewise with
BLOCK_N.

Tile layout (int32 CSR arrays, dalle_fast.masks.TileLayout): kv_index[kv_indptr[i] : kv_indptr[i + 1]] are the
key tiles query tile i visits (ascending), kv_partial[same] = 1 where the element mask must be applied; q_*
the same per key tile. A tile with partial == 0 has every pair allowed and every row present: it runs with
no element mask at all (loads keep their bounds masks, which cost nothing there).

Tensors: q, k, v, dO, out [B, H, L, D] with any strides (stride_*b, stride_*h, stride_*l, stride_*d);
out, dq, dk, dv written through the same kind of strides (the launchers allocate [B, L, H, D]);
lse, delta [B, H, L] fp32 contiguous. Batch and head come from program_id(1) = b * H + h. Row and batch
offsets are int64 (b * stride_b passes 2**31 for large batches).
"""

import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------------
# The mask in processing positions (mirrors csrc/include/dalle_fast/attention.h)
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _divmod(x, d):
    """(x // d, x % d) for x >= 0 with one division (integer division by a runtime value is a long instruction
    sequence on the GPU; these run on [M] / [N] position vectors, never on whole tiles)."""
    quot = x // d
    return quot, x - quot * d


@triton.jit
def _processing_row(p, text_len, grid_h, grid_w, KIND: tl.constexpr):
    """Memory (raster) row of processing position p: identity except for column layers, whose image part is
    stored raster-major but processed column-major (i = p - text_len: row i % grid_h, column i // grid_h)."""
    if KIND == 2:
        col, row = _divmod(tl.maximum(p - text_len, 0), grid_h)
        return tl.where(p < text_len, p, text_len + row * grid_w + col)
    else:
        return p


@triton.jit
def _present(p, r, n_rows, seq_len):
    """Position p (memory row r) exists: inside the processing order and inside the sequence."""
    return (p < n_rows) & (r < seq_len)


@triton.jit
def _raster_allowed(rq, rk, text_len, grid_h, grid_w, half, KIND: tl.constexpr, TORUS: tl.constexpr):
    """attention.h's raster_allowed: causal; text keys allowed to every later query; between image positions
    (i = r - text_len, row i // grid_w, column i % grid_w) the rule of the kind. rq and rk broadcast (e.g.
    [M, 1] and [1, N]): the divisions run on the vectors, the comparisons on the tile. Image indices are
    clamped at 0: a text query (rq < text_len) never meets an image key causally, so the image rule only
    matters where both indices are >= 0."""
    ok = rk <= rq
    if KIND != 0:
        iq = tl.maximum(rq - text_len, 0)
        ik = tl.maximum(rk - text_len, 0)
        if KIND == 1:
            image = iq - ik <= grid_w
        elif KIND == 2:
            image = (iq % grid_w) == (ik % grid_w)
        else:
            row_q, col_q = _divmod(iq, grid_w)
            row_k, col_k = _divmod(ik, grid_w)
            dr = tl.abs(row_q - row_k)
            dc = tl.abs(col_q - col_k)
            if TORUS:
                dr = tl.minimum(dr, grid_h - dr)
                dc = tl.minimum(dc, grid_w - dc)
            image = (dr <= half) & (dc <= half)
        ok = ok & ((rk < text_len) | image)
    return ok


@triton.jit
def _processing_allowed(
    pq, pk, n_rows, seq_len, text_len, grid_h, grid_w, half, KIND: tl.constexpr, TORUS: tl.constexpr
):
    """attention.h's processing_allowed(m, pq, pk) for broadcastable position tensors, plus p < n_rows (the
    C++ loops stop at n_rows; a tile's ragged end reaches past it, where processing_row would wrap)."""
    rq = _processing_row(pq, text_len, grid_h, grid_w, KIND)
    rk = _processing_row(pk, text_len, grid_h, grid_w, KIND)
    ok = _present(pq, rq, n_rows, seq_len) & _present(pk, rk, n_rows, seq_len)
    return ok & _raster_allowed(rq, rk, text_len, grid_h, grid_w, half, KIND, TORUS)


@triton.jit
def _load_rows(base, rows, ok, stride_l, stride_d, HEAD_DIM: tl.constexpr):
    """[len(rows), HEAD_DIM] rows of one (b, h) slice, zero where not ok; rows int32 (offsets made int64)."""
    d = tl.arange(0, HEAD_DIM)
    ptrs = base + rows.to(tl.int64)[:, None] * stride_l + d[None, :] * stride_d
    return tl.load(ptrs, mask=ok[:, None], other=0.0)


@triton.jit
def _store_rows(base, rows, ok, stride_l, stride_d, x, HEAD_DIM: tl.constexpr):
    d = tl.arange(0, HEAD_DIM)
    ptrs = base + rows.to(tl.int64)[:, None] * stride_l + d[None, :] * stride_d
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=ok[:, None])


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _sparse_attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    kv_indptr_ptr,
    kv_index_ptr,
    kv_partial_ptr,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_ol,
    stride_od,
    H,
    seq_len,
    n_rows,
    text_len,
    grid_h,
    grid_w,
    half,
    qk_scale,
    KIND: tl.constexpr,
    TORUS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Forward of one query tile of one (b, h): out and lse of its present rows.

    Grid: (cdiv(n_rows, BLOCK_M), B * H); program p0 takes query tile n_q_tiles - 1 - p0, so that the tiles that
    visit the most key tiles (the last ones: causal masks) start first and the light text tiles fill the tail.
    q_ptr, k_ptr, v_ptr: [B, H, L, D] fp16/bf16/fp32, any strides. out_ptr: [B, H, L, D] in q's dtype (strides
    of the launcher's [B, L, H, D] allocation). lse_ptr: [B, H, L] fp32 contiguous. kv_indptr_ptr
    [n_q_tiles + 1], kv_index_ptr / kv_partial_ptr [n_visits]: int32 tile layout. H: heads; seq_len: L;
    n_rows: processing positions; text_len, grid_h, grid_w, half (conv kernel // 2): the mask; qk_scale:
    scale * log2(e). KIND 0 full / 1 row / 2 column / 3 conv, TORUS (conv only).

    For each visited key tile j (ascending), with s = qk_scale * q k_j^T ([BLOCK_M, BLOCK_N], fp32; -inf where
    the tile is partial and the element mask forbids the pair), the online softmax in base 2:
        m' = max(m, rowmax s);  c = m' if finite else 0;  p = exp2(s - c);  alpha = exp2(m - c)
        l = alpha l + rowsum p;  acc = alpha acc + p v_j;  m = m'
    (c makes a row that has met only masked keys so far give p = 0 and alpha = 0 instead of NaN.) Then
    out = acc / l and lse = (m + log2 l) ln 2; a row without allowed keys (never a present row: each sees
    itself) would get lse = -inf.
    """
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh

    pq = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rq = _processing_row(pq, text_len, grid_h, grid_w, KIND)
    q_ok = _present(pq, rq, n_rows, seq_len)
    q = _load_rows(q_base, rq, q_ok, stride_ql, stride_qd, HEAD_DIM)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    start = tl.load(kv_indptr_ptr + tile)
    end = tl.load(kv_indptr_ptr + tile + 1)
    for t in range(start, end):
        j = tl.load(kv_index_ptr + t)
        partial = tl.load(kv_partial_ptr + t)
        pk = j * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = _processing_row(pk, text_len, grid_h, grid_w, KIND)
        k_ok = _present(pk, rk, n_rows, seq_len)
        k = _load_rows(k_base, rk, k_ok, stride_kl, stride_kd, HEAD_DIM)
        v = _load_rows(v_base, rk, k_ok, stride_vl, stride_vd, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        if partial != 0:
            allowed = _processing_allowed(
                pq[:, None], pk[None, :], n_rows, seq_len, text_len, grid_h, grid_w, half, KIND, TORUS
            )
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        m_i = m_new

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * _LN2, float("-inf"))
    out_base = out_ptr + b * stride_ob + h * stride_oh
    _store_rows(out_base, rq, q_ok, stride_ol, stride_od, out, HEAD_DIM)
    tl.store(lse_ptr + bh.to(tl.int64) * seq_len + rq, lse, mask=q_ok)


# ----------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _sparse_attention_bwd_preprocess_kernel(
    out_ptr,
    do_ptr,
    delta_ptr,
    stride_ob,
    stride_oh,
    stride_ol,
    stride_od,
    stride_dob,
    stride_doh,
    stride_dol,
    stride_dod,
    H,
    seq_len,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta[b, h, r] = sum_d dO[b, h, r, d] * out[b, h, r, d] in fp32, for BLOCK_M memory rows r.

    Grid: (cdiv(L, BLOCK_M), B * H). out_ptr, do_ptr: [B, H, L, D], any strides, fp16/bf16/fp32 (each its own
    dtype). delta_ptr: [B, H, L] fp32 contiguous. It is the row term of dS = P (dP - delta): sum_j P_ij dP_ij
    = dO_i . sum_j P_ij v_j = dO_i . out_i.
    """
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = r < seq_len
    o = _load_rows(out_ptr + b * stride_ob + h * stride_oh, r, ok, stride_ol, stride_od, HEAD_DIM)
    do = _load_rows(do_ptr + b * stride_dob + h * stride_doh, r, ok, stride_dol, stride_dod, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + bh.to(tl.int64) * seq_len + r, delta, mask=ok)


@triton.jit
def _sparse_attention_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    q_indptr_ptr,
    q_index_ptr,
    q_partial_ptr,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dol,
    stride_dod,
    stride_dkb,
    stride_dkh,
    stride_dkl,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvl,
    stride_dvd,
    H,
    seq_len,
    n_rows,
    text_len,
    grid_h,
    grid_w,
    half,
    qk_scale,
    scale,
    KIND: tl.constexpr,
    TORUS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SUB_M: tl.constexpr,
):
    """dK and dV of one key tile of one (b, h), over the query tiles that visit it (no atomics: deterministic).

    Grid: (cdiv(n_rows, BLOCK_N), B * H).
    q/k/v/do_ptr: [B, H, L, D] any strides, one dtype (the launcher casts dO to q's);
    lse_ptr (forward), delta_ptr (preprocess): [B, H, L] fp32 contiguous; dk_ptr, dv_ptr: [B, H, L, D] in q's
    dtype (strides of [B, L, H, D] allocations); q_indptr_ptr [n_k_tiles + 1], q_index_ptr / q_partial_ptr:
    int32 tile layout. qk_scale = scale * log2(e); the rest as in the forward.

    Each visited query tile is taken in BLOCK_M // SUB_M chunks of SUB_M rows (one flat loop, so the pipeliner
    sees one body), in the transposed form of FlashAttention-2's Triton kernel:
        P^T = exp2(qk_scale k q^T - log2(e) lse)    [BLOCK_N, SUB_M], 0 where masked (partial tiles only)
        dV += P^T dO;  dP^T = v dO^T;  dS^T = P^T (dP^T - delta);  dK += dS^T q
    and finally dK *= scale.
    """
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_dob + h * stride_doh
    lse_base = lse_ptr + bh.to(tl.int64) * seq_len
    delta_base = delta_ptr + bh.to(tl.int64) * seq_len

    pk = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = _processing_row(pk, text_len, grid_h, grid_w, KIND)
    k_ok = _present(pk, rk, n_rows, seq_len)
    k = _load_rows(k_ptr + b * stride_kb + h * stride_kh, rk, k_ok, stride_kl, stride_kd, HEAD_DIM)
    v = _load_rows(v_ptr + b * stride_vb + h * stride_vh, rk, k_ok, stride_vl, stride_vd, HEAD_DIM)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    N_SUB: tl.constexpr = BLOCK_M // SUB_M
    start = tl.load(q_indptr_ptr + tile)
    end = tl.load(q_indptr_ptr + tile + 1)
    for u in range(start * N_SUB, end * N_SUB):
        t = u // N_SUB
        i = tl.load(q_index_ptr + t)
        partial = tl.load(q_partial_ptr + t)
        pq = i * BLOCK_M + (u % N_SUB) * SUB_M + tl.arange(0, SUB_M)
        rq = _processing_row(pq, text_len, grid_h, grid_w, KIND)
        q_ok = _present(pq, rq, n_rows, seq_len)
        q = _load_rows(q_base, rq, q_ok, stride_ql, stride_qd, HEAD_DIM)
        do = _load_rows(do_base, rq, q_ok, stride_dol, stride_dod, HEAD_DIM)
        lse2 = tl.load(lse_base + rq, mask=q_ok, other=0.0) * _LOG2E
        delta = tl.load(delta_base + rq, mask=q_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision="ieee")
        p_t = tl.exp2(s_t * qk_scale - lse2[None, :])
        if partial != 0:
            allowed = _processing_allowed(
                pq[None, :], pk[:, None], n_rows, seq_len, text_len, grid_h, grid_w, half, KIND, TORUS
            )
            p_t = tl.where(allowed, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision="ieee")
        dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision="ieee")

    _store_rows(dk_ptr + b * stride_dkb + h * stride_dkh, rk, k_ok, stride_dkl, stride_dkd, dk * scale, HEAD_DIM)
    _store_rows(dv_ptr + b * stride_dvb + h * stride_dvh, rk, k_ok, stride_dvl, stride_dvd, dv, HEAD_DIM)


@triton.jit
def _sparse_attention_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    kv_indptr_ptr,
    kv_index_ptr,
    kv_partial_ptr,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dol,
    stride_dod,
    stride_dqb,
    stride_dqh,
    stride_dql,
    stride_dqd,
    H,
    seq_len,
    n_rows,
    text_len,
    grid_h,
    grid_w,
    half,
    qk_scale,
    scale,
    KIND: tl.constexpr,
    TORUS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SUB_N: tl.constexpr,
):
    """dQ of one query tile of one (b, h), over the key tiles it visits (the forward's walk, recomputing P).

    Grid: (cdiv(n_rows, BLOCK_M), B * H), query tiles in reverse as in the forward (heaviest first; the dK/dV
    grid's natural order is already heaviest first: early key tiles are seen by every later query tile).
    Arguments as in _sparse_attention_bwd_dkdv_kernel, with dq_ptr
    [B, H, L, D] in q's dtype and the forward's kv_* layout. Each key tile is taken in BLOCK_N // SUB_N chunks
    of SUB_N keys (one flat loop):
        P = exp2(qk_scale q k^T - log2(e) lse)    [BLOCK_M, SUB_N], 0 where masked (partial tiles only)
        dP = dO v^T;  dS = P (dP - delta);  dQ += dS k
    and finally dQ *= scale.
    """
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh

    pq = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rq = _processing_row(pq, text_len, grid_h, grid_w, KIND)
    q_ok = _present(pq, rq, n_rows, seq_len)
    q = _load_rows(q_ptr + b * stride_qb + h * stride_qh, rq, q_ok, stride_ql, stride_qd, HEAD_DIM)
    do = _load_rows(do_ptr + b * stride_dob + h * stride_doh, rq, q_ok, stride_dol, stride_dod, HEAD_DIM)
    lse2 = tl.load(lse_ptr + bh.to(tl.int64) * seq_len + rq, mask=q_ok, other=0.0) * _LOG2E
    delta = tl.load(delta_ptr + bh.to(tl.int64) * seq_len + rq, mask=q_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    N_SUB: tl.constexpr = BLOCK_N // SUB_N
    start = tl.load(kv_indptr_ptr + tile)
    end = tl.load(kv_indptr_ptr + tile + 1)
    for u in range(start * N_SUB, end * N_SUB):
        t = u // N_SUB
        j = tl.load(kv_index_ptr + t)
        partial = tl.load(kv_partial_ptr + t)
        pk = j * BLOCK_N + (u % N_SUB) * SUB_N + tl.arange(0, SUB_N)
        rk = _processing_row(pk, text_len, grid_h, grid_w, KIND)
        k_ok = _present(pk, rk, n_rows, seq_len)
        k = _load_rows(k_base, rk, k_ok, stride_kl, stride_kd, HEAD_DIM)
        v = _load_rows(v_base, rk, k_ok, stride_vl, stride_vd, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        p = tl.exp2(s * qk_scale - lse2[:, None])
        if partial != 0:
            allowed = _processing_allowed(
                pq[:, None], pk[None, :], n_rows, seq_len, text_len, grid_h, grid_w, half, KIND, TORUS
            )
            p = tl.where(allowed, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision="ieee")

    _store_rows(dq_ptr + b * stride_dqb + h * stride_dqh, rq, q_ok, stride_dql, stride_dqd, dq * scale, HEAD_DIM)
