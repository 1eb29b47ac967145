"""DALL-E attention masks: golden vectors, FlexAttention's view of our mask_mod, the layer schedule, tile layouts
and the pictures."""

import json
import pathlib
import zlib

import pytest
import torch

from dalle_fast import mask_picture, masks

VECTORS = pathlib.Path(__file__).resolve().parent / "vectors" / "masks.json"
SHARED_VECTORS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "vectors" / "masks.json"


def _golden():
    with open(VECTORS) as f:
        return json.load(f)


def _case_id(c):
    return f"{c['kind']}-{c['conv_variant']}-k{c['kernel']}-T{c['text_len']}-{c['grid_h']}x{c['grid_w']}"


@pytest.mark.skipif(not SHARED_VECTORS.exists(), reason="no ../shared beside this checkout")
def test_vectors_are_the_shared_ones():
    assert VECTORS.read_bytes() == SHARED_VECTORS.read_bytes()


@pytest.mark.parametrize("case", _golden()["cases"], ids=_case_id)
def test_dense_mask_golden(case):
    got = masks.dense_mask(case["kind"], case["text_len"], case["grid_h"], case["grid_w"], kernel=case["kernel"],
                           conv_variant=case["conv_variant"])  # fmt: skip
    want = torch.tensor([[ch == "1" for ch in row] for row in case["mask"]])
    assert got.dtype == torch.bool and torch.equal(got, want)


FLEX_CASES = [
    ("full", 6, 4, 4, 11, "clipped"),
    ("row", 5, 5, 7, 11, "clipped"),
    ("column", 0, 6, 5, 11, "clipped"),
    ("conv", 7, 6, 8, 5, "clipped"),
    ("conv", 3, 7, 6, 3, "torus"),
    ("row", 256, 32, 32, 11, "clipped"),
    ("conv", 256, 32, 32, 11, "clipped"),
]


@pytest.mark.parametrize("kind,t,gh,gw,kernel,variant", FLEX_CASES)
def test_mask_mod_equals_dense_mask_under_flex(kind, t, gh, gw, kernel, variant):
    from torch.nn.attention.flex_attention import create_mask

    n = t + gh * gw
    mod = masks.mask_mod(kind, t, gh, gw, kernel=kernel, conv_variant=variant)
    got = create_mask(mod, 1, 1, n, n, device="cpu")[0, 0]
    assert torch.equal(got, masks.dense_mask(kind, t, gh, gw, kernel=kernel, conv_variant=variant))


def test_masks_are_causal_and_see_text():
    for kind in masks.KINDS:
        m = masks.dense_mask(kind, 5, 4, 6, kernel=3)
        assert not m.triu(1).any(), kind
        assert m.diagonal().all(), kind
        assert m[5:, :5].all(), kind  # image queries see every text key
        assert torch.equal(m[:5, :5], torch.ones(5, 5, dtype=torch.bool).tril()), kind


def test_key_counts_at_the_paper_shape():
    """Image keys of the last image query: row W+1 = 33, column H = 32, clipped 11x11 conv 6x6 = 36 (causal
    half of the window at the corner); the most any query sees under conv is 61 (5 rows x 11 + 6)."""
    counts = {}
    for kind in ("row", "column", "conv"):
        m = masks.dense_mask(kind, 256, 32, 32)
        counts[kind] = m[256:, 256:].sum(1)
    assert counts["row"].max() == 33 and counts["column"].max() == 32 and counts["conv"].max() == 61
    assert counts["row"][-1] == 33 and counts["column"][-1] == 32 and counts["conv"][-1] == 36


def test_layer_schedule():
    golden = _golden()["layer_schedule_64"]
    sched = masks.layer_schedule(64)
    assert sched == golden
    assert (sched.count("row"), sched.count("column"), sched.count("conv")) == (47, 16, 1)
    assert masks.layer_schedule(1) == ["conv"]
    assert masks.layer_schedule(3) == ["row", "column", "conv"]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="n_layers: expected an int >= 1"):
            masks.layer_schedule(bad)


@pytest.mark.parametrize("kind", masks.KINDS)
def test_processing_order(kind):
    p = torch.arange(5 + 4 * 6)
    rows = masks.processing_row(kind, 5, 4, 6, p)
    assert torch.equal(rows.sort().values, p)
    if kind == "column":  # column-major image order: every H consecutive positions share a column
        image = rows[5:] - 5
        assert torch.equal(image % 6, torch.arange(6).repeat_interleave(4))
    else:
        assert torch.equal(rows, p)


LAYOUTS = [
    (kind, t, gh, gw, n, bm, bn, kernel, variant)
    for kind in masks.KINDS
    for (t, gh, gw) in ((0, 4, 6), (5, 5, 7), (16, 8, 8))
    for cut in (0, 3)
    for (bm, bn) in ((4, 4), (8, 16), (5, 3))
    for (kernel, variant) in ((3, "clipped"),) + (((5, "torus"),) if kind == "conv" else ())
    for n in (t + gh * gw - cut,)
]


@pytest.mark.parametrize("kind,t,gh,gw,n,bm,bn,kernel,variant", LAYOUTS)
def test_tile_layout_matches_dense_mask(kind, t, gh, gw, n, bm, bn, kernel, variant):
    lay = masks.tile_layout(kind, t, gh, gw, block_m=bm, block_n=bn, seq_len=n, kernel=kernel, conv_variant=variant)
    dense = masks.dense_mask(kind, t, gh, gw, kernel=kernel, conv_variant=variant)[:n, :n]
    # The mask in processing order, absent positions padded out, cut into tiles.
    rows = masks.processing_row(kind, t, gh, gw, torch.arange(lay.n_rows))
    present = rows < n
    proc = torch.zeros(lay.n_rows, lay.n_rows, dtype=torch.bool)
    r = rows.clamp(max=n - 1)
    proc[:] = dense[r][:, r] & present[:, None] & present[None, :]
    n_qt, n_kt = -(-lay.n_rows // bm), -(-lay.n_rows // bn)
    padded = torch.zeros(n_qt * bm, n_kt * bn, dtype=torch.bool)
    padded[: lay.n_rows, : lay.n_rows] = proc
    inside = torch.zeros_like(padded)
    inside[: lay.n_rows, : lay.n_rows] = present[:, None] & present[None, :]
    tiles = padded.view(n_qt, bm, n_kt, bn)
    any_, all_ = tiles.any(3).any(1), (tiles & inside.view(n_qt, bm, n_kt, bn)).all(3).all(1)
    want = torch.where(all_, masks.FULL, torch.where(any_, masks.PARTIAL, masks.EMPTY)).to(torch.int8)
    assert torch.equal(lay.classes, want)
    assert lay.allowed_pairs() == int(dense.sum())
    # The compressed forms list exactly the non-empty tiles, ascending, with their partial flags.
    for indptr, index, partial, cls in (
        (lay.kv_indptr, lay.kv_index, lay.kv_partial, lay.classes),
        (lay.q_indptr, lay.q_index, lay.q_partial, lay.classes.t()),
    ):
        assert indptr.dtype == index.dtype == partial.dtype == torch.int32
        assert indptr.numel() == cls.shape[0] + 1 and indptr[-1] == index.numel() == partial.numel()
        for i in range(cls.shape[0]):
            cols = index[indptr[i] : indptr[i + 1]].long()
            assert torch.equal(cols, (cls[i] != masks.EMPTY).nonzero().flatten())
            assert torch.equal(partial[indptr[i] : indptr[i + 1]].bool(), cls[i, cols] == masks.PARTIAL)


def test_tile_layout_skips_most_tiles_at_the_paper_shape():
    fractions = {}
    for kind in masks.KINDS:
        lay = masks.tile_layout(kind, 256, 32, 32, block_m=64, block_n=64, seq_len=1279)
        fractions[kind] = lay.computed_fraction
        assert lay.computed_pairs() >= lay.allowed_pairs()
    assert fractions["full"] > 0.5
    assert fractions["column"] < 0.25 and fractions["row"] < 0.3 and fractions["conv"] < 0.35, fractions


def test_tile_layout_is_cached_per_device():
    a = masks.tile_layout("row", 5, 4, 4, block_m=8, block_n=8)
    assert masks.tile_layout("row", 5, 4, 4, block_m=8, block_n=8, device="cpu") is a
    assert masks.tile_layout("row", 5, 4, 4, block_m=8, block_n=8, kernel=3) is a  # kernel: conv only
    assert masks.tile_layout("row", 5, 4, 4, block_m=8, block_n=4) is not a


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kind="diag"), "kind: expected one of"),
        (dict(text_len=-2), "text_len: expected an int >= 0"),
        (dict(grid_h=0), "grid_h: expected an int >= 1"),
        (dict(kernel=6), "kernel: expected an odd int >= 1"),
        (dict(conv_variant="wrap"), "conv_variant: expected one of"),
        (dict(seq_len=22), r"seq_len: expected an int in \[1, 21\]"),
        (dict(block_m=0), "block_m: expected an int >= 1"),
    ],
)
def test_tile_layout_bad_input(kwargs, match):
    args = dict(kind="conv", text_len=5, grid_h=4, grid_w=4, block_m=8, block_n=8) | kwargs
    with pytest.raises(ValueError, match=match):
        masks.tile_layout(args.pop("kind"), args.pop("text_len"), args.pop("grid_h"), args.pop("grid_w"), **args)


def test_mask_functions_check_arguments():
    with pytest.raises(ValueError, match="dense_mask: kind"):
        masks.dense_mask("diagonal", 1, 2, 2)
    with pytest.raises(ValueError, match="mask_mod: kernel: expected an odd int"):
        masks.mask_mod("conv", 1, 2, 2, kernel=0)


def test_render_png(tmp_path):
    out = tmp_path / "column.png"
    argv = ["--kind", "column", "--text-len", "8", "--grid", "6", "6", "--block", "8", "--out", str(out)]
    assert mask_picture.main(argv) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (2 * (44 + 8 + 44), 2 * 44)
    # The pixels decode back to the mask: the left half is white exactly where the mask allows.
    idat = data[data.index(b"IDAT") + 4 : data.index(b"IEND") - 8]
    raw = zlib.decompress(idat)
    stride = 1 + 3 * width
    pic = torch.tensor(list(raw)).view(height, stride)[:, 1:].view(height, width, 3)
    white = (pic[::2, : 2 * 44 : 2] == 255).all(-1)
    assert torch.equal(white, masks.dense_mask("column", 8, 6, 6))
