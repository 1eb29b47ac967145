"""DALL-E attention masks (DESIGN section 4): dense masks, FlexAttention mask_mods, the paper's layer schedule,
and the tile layouts the sparse-attention kernels walk.

The sequence is T text positions followed by an H x W image grid in raster order. Every mask is causal; text
queries attend earlier text; image queries attend every text key plus the image keys of their layer's kind
(full, row, column or conv; see dalle_fast.reference.masks for the exact rules).

Kernels work in a *processing order* of the positions. It is the raster order for every kind but `column`,
whose image part is taken column by column (the paper's transpose): in that order a column layer is
block-diagonal (blocks of H image positions), so a query tile meets one or two image key tiles instead of
all of them. Processing position p maps to the raster row `processing_row(p)`; positions whose raster row is
at or past the sequence length (a prefix of the layout, as training feeds 1279 of 1280 positions) are absent.

Render a mask and its tile layout to PNG (dalle_fast/mask_picture.py):

    python -m dalle_fast.mask_picture --kind conv --text-len 16 --grid 8 8 --block 16 --out conv.png
"""

import dataclasses
import functools
import struct
import zlib

import torch

from .reference import masks as _ref
from .reference.masks import CONV_VARIANTS, KIND_IDS

KINDS = tuple(KIND_IDS)
EMPTY, PARTIAL, FULL = 0, 1, 2  # tile classes


def check_mask_args(kind, text_len, grid_h, grid_w, kernel=11, conv_variant="clipped", where="masks") -> None:
    """Raise a clear error for a bad mask description."""

    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    if kind not in KIND_IDS:
        raise ValueError(f"{where}: kind: expected one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    if not is_int(text_len) or text_len < 0:
        raise ValueError(f"{where}: text_len: expected an int >= 0, got {text_len!r}")
    for name, x in (("grid_h", grid_h), ("grid_w", grid_w)):
        if not is_int(x) or x < 1:
            raise ValueError(f"{where}: {name}: expected an int >= 1, got {x!r}")
    if not is_int(kernel) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"{where}: kernel: expected an odd int >= 1, got {kernel!r}")
    if conv_variant not in CONV_VARIANTS:
        raise ValueError(
            f"{where}: conv_variant: expected one of {', '.join(map(repr, CONV_VARIANTS))}, got {conv_variant!r}"
        )


def dense_mask(kind, text_len, grid_h, grid_w, *, kernel=11, conv_variant="clipped", device=None) -> torch.Tensor:
    """bool [L, L], L = text_len + grid_h * grid_w: M[q, k] is True when query q may attend key k."""
    check_mask_args(kind, text_len, grid_h, grid_w, kernel, conv_variant, "dense_mask")
    return _ref.dense_mask(kind, text_len, grid_h, grid_w, kernel=kernel, conv_variant=conv_variant, device=device)


def mask_mod(kind, text_len, grid_h, grid_w, *, kernel=11, conv_variant="clipped"):
    """A FlexAttention mask_mod (b, h, q_idx, kv_idx) -> bool equal to dense_mask (same arguments)."""
    check_mask_args(kind, text_len, grid_h, grid_w, kernel, conv_variant, "mask_mod")

    def dalle_mask(b, h, q_idx, kv_idx):
        return _ref.allowed(kind, text_len, grid_h, grid_w, q_idx, kv_idx, kernel=kernel, conv_variant=conv_variant)

    dalle_mask.__name__ = f"dalle_{kind}_mask"
    return dalle_mask


def layer_schedule(n_layers: int) -> list[str]:
    """The paper's kinds for layers 1..n (App. B.1): the last is conv; layer i < n is column when
    (i - 2) % 4 == 0, otherwise row. For 64 layers: 47 row, 16 column, 1 conv."""
    if not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers < 1:
        raise ValueError(f"layer_schedule: n_layers: expected an int >= 1, got {n_layers!r}")
    return ["conv" if i == n_layers else "column" if (i - 2) % 4 == 0 else "row" for i in range(1, n_layers + 1)]


# Processing order ----------------------------------------------------------------------------------------


def processing_length(kind: str, text_len: int, grid_h: int, grid_w: int, seq_len: int) -> int:
    """Number of processing positions: the sequence length, or the whole layout for column layers (whose
    absent positions are scattered through the column-major order)."""
    return text_len + grid_h * grid_w if kind == "column" and seq_len > text_len else seq_len


def processing_row(kind: str, text_len: int, grid_h: int, grid_w: int, p: torch.Tensor) -> torch.Tensor:
    """Raster position of processing position p (int64 tensor)."""
    if kind != "column":
        return p
    i = p - text_len
    return torch.where(p < text_len, p, text_len + (i % grid_h) * grid_w + i // grid_h)


# Tile layouts --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TileLayout:
    """Which (query tile, key tile) pairs of the processing order a kernel visits.

    classes[i, j] is EMPTY (skipped), PARTIAL (the element mask is applied) or FULL (no mask needed: every pair
    is allowed and present) for query tile i (processing positions [i*block_m, (i+1)*block_m)) and key tile j.
    Two compressed forms for the kernels, int32 on `device`, key tiles ascending:
        kv_indptr [n_q_tiles + 1], kv_index, kv_partial   per query tile, the key tiles it visits (forward, dQ)
        q_indptr [n_k_tiles + 1], q_index, q_partial      per key tile, the query tiles that visit it (dK, dV)
    """

    kind: str
    text_len: int
    grid_h: int
    grid_w: int
    kernel: int
    conv_variant: str
    seq_len: int
    block_m: int
    block_n: int
    n_rows: int
    classes: torch.Tensor
    kv_indptr: torch.Tensor
    kv_index: torch.Tensor
    kv_partial: torch.Tensor
    q_indptr: torch.Tensor
    q_index: torch.Tensor
    q_partial: torch.Tensor

    @property
    def computed_fraction(self) -> float:
        """Fraction of the n_q_tiles x n_k_tiles tiles a kernel computes."""
        return (self.classes != EMPTY).float().mean().item()

    def computed_pairs(self) -> int:
        """Query-key pairs in the computed tiles (what the kernels' FLOPs are counted on)."""
        return int((self.classes != EMPTY).sum()) * self.block_m * self.block_n

    def allowed_pairs(self) -> int:
        """Query-key pairs the mask allows (the minimum work), counted without an [L, L] tensor."""
        return int(_tile_counts(self)[1])


def _tile_counts(layout: TileLayout):
    """(classes, allowed pairs) evaluated one query tile at a time: no [L, L] tensor."""
    kind, t, gh, gw = layout.kind, layout.text_len, layout.grid_h, layout.grid_w
    n, bm, bn = layout.n_rows, layout.block_m, layout.block_n
    n_qt, n_kt = -(-n // bm), -(-n // bn)
    keys = torch.arange(n_kt * bn)
    key_rows = processing_row(kind, t, gh, gw, keys)
    key_ok = (keys < n) & (key_rows < layout.seq_len)
    classes = torch.empty(n_qt, n_kt, dtype=torch.int8)
    pairs = 0
    for i in range(n_qt):
        qs = torch.arange(i * bm, (i + 1) * bm)
        q_rows = processing_row(kind, t, gh, gw, qs)
        q_ok = (qs < n) & (q_rows < layout.seq_len)
        ok = _ref.allowed(kind, t, gh, gw, q_rows[:, None], key_rows[None, :], kernel=layout.kernel,
                          conv_variant=layout.conv_variant)  # fmt: skip
        ok &= q_ok[:, None] & key_ok[None, :]
        pairs += int(ok.sum())
        per_tile = ok.view(bm, n_kt, bn)
        classes[i] = torch.where(per_tile.all(2).all(0), FULL, torch.where(per_tile.any(2).any(0), PARTIAL, EMPTY))
    return classes, pairs


def _csr(classes: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    nonempty = classes != EMPTY
    counts = nonempty.sum(1)
    indptr = torch.zeros(classes.shape[0] + 1, dtype=torch.int32)
    indptr[1:] = counts.cumsum(0)
    rows, cols = nonempty.nonzero(as_tuple=True)  # row-major: key tiles ascending within a row
    partial = (classes[rows, cols] == PARTIAL).to(torch.int32)
    return indptr.to(device), cols.to(torch.int32).to(device), partial.to(device)


@functools.lru_cache(maxsize=256)
def _tile_layout(kind, text_len, grid_h, grid_w, kernel, conv_variant, seq_len, block_m, block_n, device):
    n_rows = processing_length(kind, text_len, grid_h, grid_w, seq_len)
    base = dict(kind=kind, text_len=text_len, grid_h=grid_h, grid_w=grid_w, kernel=kernel, n_rows=n_rows,
                conv_variant=conv_variant, seq_len=seq_len, block_m=block_m, block_n=block_n)  # fmt: skip
    empty = torch.zeros(0, dtype=torch.int32)
    stub = TileLayout(**base, classes=empty, kv_indptr=empty, kv_index=empty, kv_partial=empty,
                      q_indptr=empty, q_index=empty, q_partial=empty)  # fmt: skip
    classes, _ = _tile_counts(stub)
    kv = _csr(classes, device)
    q = _csr(classes.t(), device)
    return dataclasses.replace(stub, classes=classes, kv_indptr=kv[0], kv_index=kv[1], kv_partial=kv[2],
                               q_indptr=q[0], q_index=q[1], q_partial=q[2])  # fmt: skip


def tile_layout(
    kind, text_len, grid_h, grid_w, *, block_m, block_n, seq_len=None, kernel=11, conv_variant="clipped", device="cpu"
) -> TileLayout:
    """The tile layout of a mask for blocks of block_m queries by block_n keys (cached per argument set)."""
    check_mask_args(kind, text_len, grid_h, grid_w, kernel, conv_variant, "tile_layout")
    full_len = text_len + grid_h * grid_w
    seq_len = full_len if seq_len is None else seq_len
    if not isinstance(seq_len, int) or not 1 <= seq_len <= full_len:
        raise ValueError(f"tile_layout: seq_len: expected an int in [1, {full_len}], got {seq_len!r}")
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if not isinstance(b, int) or b < 1:
            raise ValueError(f"tile_layout: {name}: expected an int >= 1, got {b!r}")
    if kind != "conv":  # the kernel size and variant only matter to conv layers: share their layouts
        kernel, conv_variant = 11, "clipped"
    return _tile_layout(kind, text_len, grid_h, grid_w, kernel, conv_variant, seq_len, block_m, block_n,
                        str(torch.device(device)))  # fmt: skip


# Pictures ------------------------------------------------------------------------------------------------


def write_png(path: str, rgb: torch.Tensor) -> None:
    """Write uint8 [H, W, 3] as a PNG (no imaging library needed)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + bytes(rgb[y].flatten().tolist()) for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def render(kind, text_len, grid_h, grid_w, *, block=16, kernel=11, conv_variant="clipped", pixel=2) -> torch.Tensor:
    """uint8 [H, W, 3] picture: left, the mask in raster order (white: may attend; text rows and columns
    tinted); right, the mask in processing order over its tile layout (blue: full tiles, computed without the
    element mask; partial tiles: white where allowed, grey where masked; black: skipped tiles)."""
    dense = dense_mask(kind, text_len, grid_h, grid_w, kernel=kernel, conv_variant=conv_variant)
    n = dense.shape[0]
    lay = tile_layout(kind, text_len, grid_h, grid_w, block_m=block, block_n=block, kernel=kernel,
                      conv_variant=conv_variant)  # fmt: skip
    rows = processing_row(kind, text_len, grid_h, grid_w, torch.arange(lay.n_rows))
    left = torch.zeros(n, n, 3, dtype=torch.uint8)
    text = torch.zeros(n, n, dtype=torch.bool)
    text[:text_len, :] = True
    text[:, :text_len] = True
    left[~dense & text] = torch.tensor([40, 40, 70], dtype=torch.uint8)
    left[dense] = torch.tensor([255, 255, 255], dtype=torch.uint8)
    cls = lay.classes.repeat_interleave(block, 0).repeat_interleave(block, 1)[: lay.n_rows, : lay.n_rows]
    right = torch.zeros(lay.n_rows, lay.n_rows, 3, dtype=torch.uint8)
    proc = dense[rows][:, rows] if kind == "column" else dense
    right[cls == PARTIAL] = torch.tensor([90, 90, 90], dtype=torch.uint8)
    right[proc & (cls == PARTIAL)] = torch.tensor([255, 255, 255], dtype=torch.uint8)
    right[cls == FULL] = torch.tensor([150, 190, 255], dtype=torch.uint8)
    gap = torch.full((n, 8, 3), 255, dtype=torch.uint8)
    pic = torch.cat([left, gap, right], dim=1)
    return pic.repeat_interleave(pixel, 0).repeat_interleave(pixel, 1)
