"""Triton kernel of the loss head's fused row pass (ops.linear_cross_entropy). @triton.jit code only; the
launcher and the chunk loop live in dalle_fast/ops/_triton_loss.py (the GEMMs there run on
kernels/matmul.py's _scaled_matmul_fwd_kernel).

_cross_entropy_rows_kernel: one program per row i of a chunk's logits, the fp32 accumulator acc [c, V] of
x_c @ W^T (row stride stride_am, unit column stride), walking V in BLOCK_V steps:
    z_j = acc_j + b_j                                  (HAS_BIAS)
    m, s: per lane online max and sum of exp(z - m), merged across lanes at the end; lse = m + log s
    loss_i = lse - z_t                                 (NaN when t is outside [0, V): never used as an index)
    WRITE_GRAD: acc_j <- exp(z_j - lse) - [j == t]     (softmax minus one-hot, over the logits in place)
Two reads of the row and one write; math in fp32 (csrc/include/dalle_fast/loss.h writes the same formulas).
Grid: (c,). Row offsets are int64 (c * V can pass 2**31).
Backward: none of its own; the gradients are this kernel's G fed to the gradient GEMMs (see the launcher).
"""

import triton
import triton.language as tl


@triton.jit
def _cross_entropy_rows_kernel(
    acc_ptr, bias_ptr, target_ptr, loss_ptr,
    stride_am,
    V,
    HAS_BIAS: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    base = acc_ptr + row.to(tl.int64) * stride_am
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        mask = cols < V
        z = tl.load(base + cols, mask=mask, other=float("-inf"))
        if HAS_BIAS:
            z = z + tl.load(bias_ptr + cols, mask=mask, other=0.0)
        m_new = tl.maximum(m, z)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.exp(z - shift)
        m = m_new
    mx = tl.max(m, axis=0)
    shift = tl.where(mx == float("-inf"), 0.0, mx)
    total = tl.sum(s * tl.exp(m - shift), axis=0)
    lse = shift + tl.log(total)

    t = tl.load(target_ptr + row)
    ok = (t >= 0) & (t < V)
    t_safe = tl.where(ok, t, 0)
    z_t = tl.load(base + t_safe)
    if HAS_BIAS:
        z_t = z_t + tl.load(bias_ptr + t_safe)
    tl.store(loss_ptr + row, tl.where(ok, lse - z_t, float("nan")))

    if WRITE_GRAD:
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            mask = cols < V
            z = tl.load(base + cols, mask=mask, other=0.0)
            if HAS_BIAS:
                z = z + tl.load(bias_ptr + cols, mask=mask, other=0.0)
            p = tl.exp(z - lse)
            g = tl.where(cols == t, p - 1.0, p)
            tl.store(base + cols, g, mask=mask)
