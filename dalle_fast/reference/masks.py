"""DALL-E attention masks (DESIGN section 4) as plain torch predicates: the oracle every kernel is checked by.

Positions: T text positions, then an H x W image grid in raster order. allowed(q, k) is True when query q may
attend key k. Everything is causal; text queries see earlier text; image queries see all text plus the image
keys their kind allows:
    full     every earlier image position
    row      i_q - i_k <= W (the previous W image positions in raster order, and itself)
    column   the same column (earlier rows, and itself)
    conv     |row_q - row_k| <= kernel // 2 and |col_q - col_k| <= kernel // 2; variant "torus" measures the
             distances modulo H and W
(i = position - T is the image index, row = i // W, col = i % W.)
"""

import torch

KIND_IDS = {"full": 0, "row": 1, "column": 2, "conv": 3}
CONV_VARIANTS = ("clipped", "torus")


def allowed(kind: str, text_len: int, grid_h: int, grid_w: int, q, k, *, kernel: int = 11, conv_variant="clipped"):
    """The mask at raster positions q and k (int64 tensors that broadcast against each other)."""
    causal = k <= q
    iq, ik = q - text_len, k - text_len
    if kind == "full":
        image = torch.ones_like(causal)
    elif kind == "row":
        image = iq - ik <= grid_w
    elif kind == "column":
        image = iq % grid_w == ik % grid_w
    elif kind == "conv":
        half = kernel // 2
        dr = (iq // grid_w - ik // grid_w).abs()
        dc = (iq % grid_w - ik % grid_w).abs()
        if conv_variant == "torus":
            dr = torch.minimum(dr, grid_h - dr)
            dc = torch.minimum(dc, grid_w - dc)
        image = (dr <= half) & (dc <= half)
    else:
        raise ValueError(f"kind: expected one of {', '.join(map(repr, KIND_IDS))}, got {kind!r}")
    # A text key is allowed to every later query; image rules apply only between image positions.
    return causal & ((k < text_len) | image)


def dense_mask(kind, text_len, grid_h, grid_w, *, kernel=11, conv_variant="clipped", seq_len=None, device=None):
    """bool [L, L] (L = seq_len, default text_len + grid_h * grid_w): M[q, k] = query q may attend key k."""
    n = text_len + grid_h * grid_w if seq_len is None else seq_len
    pos = torch.arange(n, device=device)
    return allowed(kind, text_len, grid_h, grid_w, pos[:, None], pos[None, :], kernel=kernel, conv_variant=conv_variant)


def sparse_attention(q, k, v, *, kind, text_len, grid_size, kernel=11, conv_variant="clipped", scale=None):
    """softmax(q k^T * scale, masked by dense_mask) v in fp32 math (fp64 stays fp64), result in q's dtype.

    q, k, v: [B, H, L, D] with L <= text_len + grid_h * grid_w; grid_size = (grid_h, grid_w)."""
    grid_h, grid_w = grid_size
    seq_len, head_dim = q.shape[-2], q.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    math_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask = dense_mask(
        kind, text_len, grid_h, grid_w, kernel=kernel, conv_variant=conv_variant, seq_len=seq_len, device=q.device
    )
    s = torch.matmul(q.to(math_dtype), k.to(math_dtype).transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.matmul(p, v.to(math_dtype)).to(q.dtype)
