"""Cached decoding attention, eager: the keys one query reads as a few index ranges, and the attention of new
queries to a KV cache through exactly those keys (dalle_fast.ops.sparse_decode_attention's eager backend).

key_ranges mirrors decode_key_range of csrc/include/dalle_fast/attention.h slot for slot (the C++ and CUDA
kernels use that header, the Triton kernel kernels/decode.py the same arithmetic): for the query at raster
position p, slot s is a range (start, count, step) of keys start + t * step, t < count. The ranges are
disjoint and their union is row p of dense_mask (tests/test_decode_attention.py checks this for every kind):
    slot 0    the text prefix 0 .. min(p, T - 1)
    full      slot 1: the image positions T .. p
    row       slot 1: T + max(0, i - W) .. p  (the previous W image positions and p itself)
    column    slot 1: T + col, T + col + W, ..., p  (step W)
    conv      slots 1 + 2 r + c: window row r, column part c (two parts where a torus window wraps a border);
              on the query's own row the keys stop at its column (causal)
(i = p - T, row = i // W, col = i % W.) The slot count depends on the mask only, not on p.
"""

import torch


def slot_count(kind: str, grid_h: int, kernel: int = 11, conv_variant: str = "clipped") -> int:
    """Number of range slots of every query of this mask (attention.h decode_slot_count)."""
    return 1 + 2 * window_rows(kind, grid_h, kernel, conv_variant) if kind == "conv" else 2


def window_rows(kind: str, grid_h: int, kernel: int = 11, conv_variant: str = "clipped") -> int:
    """Image rows a conv window spans at or before the query's row (attention.h decode_window_rows)."""
    if kind != "conv":
        return 0
    half = kernel // 2
    if conv_variant != "torus":
        return half + 1
    return min(2 * half + 1, grid_h)


def key_range(kind, text_len, grid_h, grid_w, p, slot, *, kernel=11, conv_variant="clipped") -> tuple[int, int, int]:
    """(start, count, step) of range `slot` of the query at raster position p (count 0: an empty slot)."""
    empty = (0, 0, 1)
    if slot == 0:
        return (0, p + 1 if p < text_len else text_len, 1)
    if p < text_len:
        return empty
    i = p - text_len
    row, col = divmod(i, grid_w)
    if kind == "full":
        return (text_len, i + 1, 1) if slot == 1 else empty
    if kind == "row":
        first = max(i - grid_w, 0)
        return (text_len + first, i - first + 1, 1) if slot == 1 else empty
    if kind == "column":
        return (text_len + col, row + 1, grid_w) if slot == 1 else empty
    h = kernel // 2
    r, c = divmod(slot - 1, 2)
    torus = conv_variant == "torus"
    if not torus:
        krow = row - h + r
        if krow < 0:
            return empty
    elif 2 * h + 1 >= grid_h:
        krow = r
    else:
        krow = (row - h + r) % grid_h
    if krow > row:
        return empty
    last = col if krow == row else grid_w - 1
    if not torus or 2 * h + 1 >= grid_w:
        if c == 1:
            return empty
        lo, hi = (max(col - h, 0), col + h) if not torus else (0, grid_w - 1)
    elif c == 0:
        lo, hi = max(col - h, 0), col + h
    elif col - h < 0:
        lo, hi = col - h + grid_w, grid_w - 1
    elif col + h >= grid_w:
        lo, hi = 0, col + h - grid_w
    else:
        return empty
    hi = min(hi, last)
    return (text_len + krow * grid_w + lo, hi - lo + 1 if hi >= lo else 0, 1)


def key_ranges(kind, text_len, grid_h, grid_w, p, *, kernel=11, conv_variant="clipped") -> list[tuple[int, int, int]]:
    """Every slot's range for the query at raster position p (empty slots included)."""
    n = slot_count(kind, grid_h, kernel, conv_variant)
    return [key_range(kind, text_len, grid_h, grid_w, p, s, kernel=kernel, conv_variant=conv_variant) for s in range(n)]


def allowed_keys(kind, text_len, grid_h, grid_w, p, *, kernel=11, conv_variant="clipped", device=None) -> torch.Tensor:
    """int64 raster positions of the keys the query at p reads, range by range (not sorted)."""
    ranges = key_ranges(kind, text_len, grid_h, grid_w, p, kernel=kernel, conv_variant=conv_variant)
    parts = [torch.arange(count, device=device) * step + start for start, count, step in ranges if count]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)


def sparse_decode_attention(
    q, k_cache, v_cache, *, kind, position: int, text_len, grid_size, kernel=11, conv_variant="clipped", scale=None
):
    """softmax(q k^T * scale) v over the allowed keys of each query, gathered from the caches (fp32 math, fp64
    stays fp64), in q's dtype. q [B, H, n, D] at positions position .. position + n - 1; caches [B, H, Lmax, D];
    only the allowed keys are read (the tail past position + n - 1 may hold anything)."""
    grid_h, grid_w = grid_size
    n, head_dim = q.shape[-2], q.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    math_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(q.shape, dtype=math_dtype, device=q.device)
    for t in range(n):
        keys = allowed_keys(
            kind, text_len, grid_h, grid_w, position + t, kernel=kernel, conv_variant=conv_variant, device=q.device
        )
        k = k_cache.index_select(2, keys).to(math_dtype)
        v = v_cache.index_select(2, keys).to(math_dtype)
        s = torch.matmul(q[:, :, t : t + 1].to(math_dtype), k.transpose(-1, -2)) * scale
        out[:, :, t : t + 1] = torch.matmul(torch.softmax(s, dim=-1), v)
    return out.to(q.dtype)


def decode_step(x, blocks, head, k_caches, v_caches, position: int, *, n_heads, text_len, grid_size, kernel=11,
                conv_variant="clipped"):  # fmt: skip
    """One decoding step of a pre-norm transformer, op by op (dalle_fast.ops.decode_step's eager backend; math
    in x's dtype). x [B, d]: the residual stream of the token at raster position `position`. blocks: (kind,
    norm_weight, norm_bias, norm_eps, in_weight, in_bias, out_weight, out_bias) each, kind a mask kind for an
    attention layer (in = the qkv projection; k and v written into row `position` of its cache [B, Lmax, H, D],
    then the query attends the allowed keys) or None for an MLP (in = fc, GELU). head: (norm_weight, norm_bias,
    norm_eps, weight, bias). Returns the logits [B, V]."""
    f = torch.nn.functional
    b, d = x.shape
    layer = 0
    for kind, g, gb, eps, w_in, b_in, w_out, b_out in blocks:
        a = f.linear(f.layer_norm(x, (d,), g, gb, eps), w_in, b_in)
        if kind is None:
            y = f.linear(f.gelu(a), w_out, b_out)
        else:
            q, k, v = a.view(b, 3, n_heads, d // n_heads).unbind(1)
            kc, vc = k_caches[layer], v_caches[layer]
            kc[:, position] = k
            vc[:, position] = v
            o = sparse_decode_attention(q[:, :, None], kc.transpose(1, 2), vc.transpose(1, 2), kind=kind,
                                        position=position, text_len=text_len, grid_size=grid_size, kernel=kernel,
                                        conv_variant=conv_variant)  # fmt: skip
            y = f.linear(o.reshape(b, d), w_out, b_out)
            layer += 1
        x = x + y
    g, gb, eps, w, bias = head
    return f.linear(f.layer_norm(x, (d,), g, gb, eps), w, bias)
