"""Triton kernel of sparse_decode_attention (dalle_fast/ops/decode.py): attention of a few new queries to a KV
cache through only the keys their DALL-E mask row allows. @triton.jit code only; the launcher and its
configuration table live in dalle_fast/ops/_triton_decode.py.

Math (one batch b, head h, query at raster position p; s_j = scale * q . k_j over the allowed keys j):
    out = sum_j softmax(s)_j v_j
computed as an online softmax in base 2 (s * log2(e), exp2) over the key ranges of p, BLOCK_T keys at a time
for the text prefix and BLOCK_I keys at a time for the image ranges: per block,
    m' = max(m, max s);  alpha = exp2(m - m');  p = exp2(s - m');  l = alpha l + sum p;  acc = alpha acc + p V
(m starts at -inf, where alpha = exp2(-inf) = 0; a block always holds at least one allowed key, so m' is
finite). The ranges (slot s of p: keys start + t * step, t < count) are _key_range below, the arithmetic of
decode_key_range in csrc/include/dalle_fast/attention.h and key_range in dalle_fast/reference/decode.py:
slot 0 the text prefix; slot 1 the image keys of full / row / column layers; conv slots 1 + 2 r + c the window
row r's column part c. The query is a vector: scores are a broadcast multiply and a row sum (no tl.dot), exact
fp32 on every device.

The position p0 of the first query comes from pos_ptr (a 0-dim int64 tensor: a CUDA graph replays the step after
the position is updated in place) when POS_FROM_PTR, else from the scalar `position`. A position outside
[0, lmax - n_q] reads nothing and writes NaN.
"""

import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _key_range(p, row, col, slot, text_len, grid_h, grid_w, half, KIND: tl.constexpr, TORUS: tl.constexpr):
    """(start, count, step) of range `slot` of the query at raster position p, image row `row` and column `col`
    (count 0: empty). No integer division here (it runs once per slot): the caller divides once per query."""
    text_count = tl.where(p < text_len, p + 1, text_len)
    i = tl.maximum(p - text_len, 0)
    step = 1
    if KIND == 0:  # full
        start = text_len
        count = i + 1
    elif KIND == 1:  # row
        first = tl.maximum(i - grid_w, 0)
        start = text_len + first
        count = i - first + 1
    elif KIND == 2:  # column
        start = text_len + col
        count = row + 1
        step = grid_w
    else:  # conv: window row r, column part c
        r = (slot - 1) // 2
        c = (slot - 1) - 2 * r
        if TORUS:
            all_rows = 2 * half + 1 >= grid_h
            wrapped = row - half + r  # in (-grid_h, 2 grid_h) when the window does not cover every row
            wrapped = tl.where(wrapped < 0, wrapped + grid_h, tl.where(wrapped >= grid_h, wrapped - grid_h, wrapped))
            krow = tl.where(all_rows, r, wrapped)
            valid = krow <= row
            all_cols = 2 * half + 1 >= grid_w
            left_wrap = col - half < 0
            right_wrap = col + half >= grid_w
            lo0 = tl.where(all_cols, 0, tl.maximum(col - half, 0))
            hi0 = tl.where(all_cols, grid_w - 1, col + half)
            lo1 = tl.where(left_wrap, col - half + grid_w, 0)
            hi1 = tl.where(left_wrap, grid_w - 1, col + half - grid_w)
            valid = valid & ((c == 0) | (~all_cols & (left_wrap | right_wrap)))
            lo = tl.where(c == 0, lo0, lo1)
            hi = tl.where(c == 0, hi0, hi1)
        else:
            krow = row - half + r
            valid = (krow >= 0) & (c == 0)
            lo = tl.maximum(col - half, 0)
            hi = col + half
        hi = tl.minimum(hi, tl.where(krow == row, col, grid_w - 1))
        start = text_len + krow * grid_w + lo
        count = tl.where(valid & (hi >= lo), hi - lo + 1, 0)
    if KIND != 3:
        count = tl.where(slot == 1, count, 0)
    count = tl.where(p >= text_len, count, 0)
    start = tl.where(slot == 0, 0, start)
    count = tl.where(slot == 0, text_count, count)
    step = tl.where(slot == 0, 1, step)
    return start, count, step


@triton.jit
def _attend_range(q, m, l_sum, acc, k_base, v_base, start, count, step, stride_kl, stride_kd, stride_vl, stride_vd,
                  HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """The online-softmax state (m, l_sum, acc) after the `count` keys start + t * step (base-2 scores)."""
    d = tl.arange(0, HEAD_DIM)
    for j0 in range(0, count, BLOCK):
        offs = j0 + tl.arange(0, BLOCK)
        ok = offs < count
        keys = (start + offs * step).to(tl.int64)
        k = tl.load(k_base + keys[:, None] * stride_kl + d[None, :] * stride_kd, mask=ok[:, None], other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new)
        l_sum = l_sum * alpha + tl.sum(p, axis=0)
        v = tl.load(v_base + keys[:, None] * stride_vl + d[None, :] * stride_vd, mask=ok[:, None], other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m = m_new
    return m, l_sum, acc


@triton.jit
def _sparse_decode_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    pos_ptr,
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
    n_q,
    lmax,
    position,
    text_len,
    grid_h,
    grid_w,
    half,
    n_slots,
    qk_scale,
    KIND: tl.constexpr,
    TORUS: tl.constexpr,
    POS_FROM_PTR: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """out[b, h, t] for query t of (b, h): grid (n_q, B * H).

    q_ptr [B, H, n_q, D], k_ptr / v_ptr [B, H, lmax, D] (any strides), out_ptr [B, H, n_q, D] in q's dtype (the
    launcher's [B, n_q, H, D] allocation); pos_ptr a 0-dim int64 (read when POS_FROM_PTR). qk_scale = scale *
    log2(e); half = conv kernel // 2; n_slots = the mask's range slots (attention.h decode_slot_count)."""
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if POS_FROM_PTR:
        p0 = tl.load(pos_ptr).to(tl.int32)
    else:
        p0 = position
    in_range = (p0 >= 0) & (p0 <= lmax - n_q)
    p = p0 + t
    i = tl.maximum(p - text_len, 0)
    row = i // grid_w
    col = i - row * grid_w
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + t.to(tl.int64) * stride_ql + d * stride_qd)
    q = q.to(tl.float32) * qk_scale
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    m = tl.full([], float("-inf"), tl.float32)
    l_sum = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    # the text prefix in BLOCK_T tiles
    start, count, step = _key_range(p, row, col, 0, text_len, grid_h, grid_w, half, KIND, TORUS)
    count = tl.where(in_range, count, 0)
    m, l_sum, acc = _attend_range(q, m, l_sum, acc, k_base, v_base, start, count, step, stride_kl, stride_kd,
                                  stride_vl, stride_vd, HEAD_DIM, BLOCK_T)  # fmt: skip
    # the image ranges in BLOCK_I tiles
    for slot in range(1, n_slots):
        start, count, step = _key_range(p, row, col, slot, text_len, grid_h, grid_w, half, KIND, TORUS)
        count = tl.where(in_range, count, 0)
        m, l_sum, acc = _attend_range(q, m, l_sum, acc, k_base, v_base, start, count, step, stride_kl, stride_kd,
                                      stride_vl, stride_vd, HEAD_DIM, BLOCK_I)  # fmt: skip
    # approximate division (2 ulp): the IEEE one calls a slow-path subroutine with a stack frame on sm_90
    out = tl.fdiv(acc, l_sum)  # l_sum == 0 only out of range: NaN
    o_ptrs = out_ptr + b * stride_ob + h * stride_oh + t.to(tl.int64) * stride_ol + d * stride_od
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty))
