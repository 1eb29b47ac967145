"""dalle_fast.data: the synthetic shapes (determinism, split, grammar, checker accuracy) and image folders."""

import struct
import zlib

import numpy as np
import pytest
import torch

from dalle_fast import data as D

pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops (conftest.one_thread)


# Synthetic shapes --------------------------------------------------------------------------------------


def test_deterministic():
    a, b = D.SyntheticShapes("train", 50, 64, seed=3), D.SyntheticShapes("train", 50, 64, seed=3)
    for i in (0, 7, 49, -1):
        (ia, ca), (ib, cb) = a[i], b[i]
        assert torch.equal(ia, ib) and ca == cb
    assert a.scene(49) == a.scene(-1)
    # Another seed or split gives other scenes; the item does not depend on the length of the data set.
    other = D.SyntheticShapes("train", 50, 64, seed=4)
    assert sum(a.scene(i) != other.scene(i) for i in range(20)) >= 18
    assert D.SyntheticShapes("train", 10, 64, seed=3).scene(5) == a.scene(5)
    img, cap = a[0]
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert D.SyntheticShapes("all", 3, 256)[0][0].shape == (3, 256, 256)
    # Pinned: scene 0 of the train split at seed 0 (a change here changes every data set).
    assert D.SyntheticShapes("train", 1).scene(0).caption == "a cyan cross to the right of a magenta triangle"


def test_split_holds_out_combinations():
    train, test = D.SyntheticShapes("train", 300, seed=0), D.SyntheticShapes("test", 300, seed=0)
    train_pairs = {(o.colour, o.shape) for i in range(len(train)) for o in train.scene(i).objects}
    assert not train_pairs & D.HELD_OUT
    assert all(test.scene(i).held_out for i in range(len(test)))
    # Every colour and every shape is still seen in training, only not in those combinations.
    assert {c for c, _ in train_pairs} == set(D.COLOURS) and {s for _, s in train_pairs} == set(D.SHAPES)
    assert len(train_pairs) == len(D.COLOURS) * len(D.SHAPES) - len(D.HELD_OUT)
    everything = D.SyntheticShapes("all", 400, seed=0)
    counts = [len(everything.scene(i).objects) for i in range(len(everything))]
    assert 0.35 < counts.count(1) / len(counts) < 0.65
    assert {everything.scene(i).relation for i in range(len(everything))} == set(D.RELATIONS) | {None}


def test_captions_follow_the_grammar():
    ds = D.SyntheticShapes("all", 200, seed=5)
    for i in range(len(ds)):
        scene = ds.scene(i)
        parsed = D.parse_caption(scene.caption)
        assert [(o.shape, o.colour) for o in parsed.objects] == [(o.shape, o.colour) for o in scene.objects]
        assert parsed.relation == scene.relation
        if scene.relation:
            assert D.relation_holds(scene.objects[0].cell, scene.objects[1].cell, scene.relation)
        else:
            assert parsed.objects[0].cell == scene.objects[0].cell
    assert D.parse_caption("a red circle in the top left").objects[0].cell == 0
    with pytest.raises(ValueError, match="caption: not in the synthetic shapes grammar"):
        D.parse_caption("a red circle somewhere")
    with pytest.raises(ValueError, match="unknown colour or shape 'purple circle'"):
        D.parse_caption("a purple circle above a red square")


@pytest.mark.parametrize("caption", ["a red circle in the top left", "a blue square above a green cross"])
def test_caption_variants_differ_in_one_word(caption):
    scene = D.parse_caption(caption)
    one = scene.relation is None
    variants = D.caption_variants(caption)
    # per object 4 other shapes and 5 other colours; then 8 other positions (one object) or 3 other relations
    assert len(variants) == len(set(variants)) == (17 if one else 2 * 9 + 3)
    for v in variants:
        other = D.parse_caption(v)
        words = [w for o in other.objects for w in (o.shape, o.colour, o.cell)] + [other.relation]
        want = [w for o in scene.objects for w in (o.shape, o.colour, o.cell)] + [scene.relation]
        assert sum(a != b for a, b in zip(words, want)) == 1, v
    assert len(D.caption_variants(caption, ("shape",))) == len(scene.objects) * 4
    assert len(D.caption_variants(caption, ("colour", "position"))) == (5 + 8 if one else 2 * 5 + 3)
    with pytest.raises(ValueError, match=r"attributes: expected some of .*got \['size'\]"):
        D.caption_variants(caption, ("shape", "size"))
    with pytest.raises(ValueError, match="caption: not in the synthetic shapes grammar"):
        D.caption_variants("a red circle somewhere")


@pytest.mark.parametrize("size,n", [(32, 300), (64, 300), (96, 60), (256, 20)])
def test_checker_reads_true_renders(size, n):
    ds = D.SyntheticShapes("all", n, size, seed=11)
    attrs = {"shape": 0, "colour": 0, "position": 0, "count": 0, "all": 0}
    for i in range(n):
        img, caption = ds[i]
        result = D.check(img, caption)
        for k in attrs:
            attrs[k] += result[k]
        assert D.check(img, ds.scene(i))["all"] == result["all"]
    accuracy = {k: v / n for k, v in attrs.items()}
    assert min(accuracy.values()) >= 0.98, accuracy


@pytest.mark.parametrize("size", [32, 64])
def test_checker_notices_wrong_images(size):
    scene = D.Scene((D.Obj("circle", "red", 4),))
    img = D.render(scene, size)
    assert D.check(img, "a red circle in the center")["all"]
    assert D.check(img, "a blue circle in the center") == dict(count=True, shape=True, colour=False, position=True,
                                                               all=False)  # fmt: skip
    assert not D.check(img, "a red square in the center")["shape"]
    assert not D.check(img, "a red circle in the top left")["position"]
    assert not D.check(img, "a red circle above a red square")["count"]
    assert not D.check(torch.zeros(3, size, size), "a red circle in the center")["all"]
    two = D.Scene((D.Obj("square", "green", 1), D.Obj("cross", "cyan", 7)), "above")
    img = D.render(two, size)
    assert D.check(img, "a green square above a cyan cross")["all"]
    assert D.check(img, "a cyan cross below a green square")["all"]
    assert not D.check(img, "a green square below a cyan cross")["position"]
    with pytest.raises(ValueError, match="image: expected a \\[3, height, width\\] tensor"):
        D.read_objects(torch.zeros(64, 64))


def test_bad_arguments():
    with pytest.raises(ValueError, match="split: expected one of"):
        D.SyntheticShapes("val")
    with pytest.raises(ValueError, match="image_size: expected an integer >= 24, got 16"):
        D.SyntheticShapes("train", 10, 16)
    with pytest.raises(ValueError, match="max_objects: expected 1 or 2"):
        D.SyntheticShapes("train", 10, max_objects=3)
    with pytest.raises(IndexError, match="index: expected an integer in \\[0, 10\\)"):
        D.SyntheticShapes("train", 10)[10]


# Image folders -----------------------------------------------------------------------------------------


def _png(path, px: np.ndarray, colour_type: int, palette=None, depth=8):
    """A PNG whose rows use filter types 0, 1, 2, 3, 4 in turn (a test encoder for the decoder)."""
    h, w = px.shape[:2]
    raw = px.astype(">u2").tobytes() if depth == 16 else px.astype(np.uint8).tobytes()
    bpp = (px.shape[2] if px.ndim == 3 else 1) * depth // 8
    stride = len(raw) // h
    rows = [np.frombuffer(raw[i * stride : (i + 1) * stride], dtype=np.uint8).astype(np.int32) for i in range(h)]
    out = b""
    for i, line in enumerate(rows):
        kind = i % 5
        prev = rows[i - 1] if i else np.zeros(stride, dtype=np.int32)
        left = np.concatenate([np.zeros(bpp, dtype=np.int32), line[:-bpp]])
        ul = np.concatenate([np.zeros(bpp, dtype=np.int32), prev[:-bpp]])
        if kind == 0:
            pred = np.zeros_like(line)
        elif kind == 1:
            pred = left
        elif kind == 2:
            pred = prev
        elif kind == 3:
            pred = (left + prev) // 2
        else:
            p = left + prev - ul
            pa, pb, pc = np.abs(p - left), np.abs(p - prev), np.abs(p - ul)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, ul))
        out += bytes([kind]) + ((line - pred) % 256).astype(np.uint8).tobytes()

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    body = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour_type, 0, 0, 0))
    if palette is not None:
        body += chunk(b"PLTE", palette.astype(np.uint8).tobytes())
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + chunk(b"IDAT", zlib.compress(out)) + chunk(b"IEND", b""))


def test_read_png_all_filters_and_colour_types(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (11, 7, 3), dtype=np.uint8)
    _png(tmp_path / "rgb.png", rgb, 2)
    assert np.array_equal(D.read_png(tmp_path / "rgb.png").numpy(), rgb)
    rgba = rng.integers(0, 256, (6, 9, 4), dtype=np.uint8)
    _png(tmp_path / "rgba.png", rgba, 6)
    assert np.array_equal(D.read_png(tmp_path / "rgba.png").numpy(), rgba[..., :3])
    grey = rng.integers(0, 256, (5, 8), dtype=np.uint8)
    _png(tmp_path / "grey.png", grey, 0)
    assert np.array_equal(D.read_png(tmp_path / "grey.png").numpy(), np.repeat(grey[..., None], 3, 2))
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    idx = rng.integers(0, 16, (7, 6), dtype=np.uint8)
    _png(tmp_path / "pal.png", idx, 3, palette)
    assert np.array_equal(D.read_png(tmp_path / "pal.png").numpy(), palette[idx])
    deep = rng.integers(0, 65536, (5, 4, 3), dtype=np.uint16)
    _png(tmp_path / "deep.png", deep, 2, depth=16)
    assert np.array_equal(D.read_png(tmp_path / "deep.png").numpy(), (deep >> 8).astype(np.uint8))
    (tmp_path / "fake.png").write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="not a PNG file"):
        D.read_png(tmp_path / "fake.png")


def test_image_folder(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "sub").mkdir()
    _png(tmp_path / "a.png", rng.integers(0, 256, (40, 30, 3), dtype=np.uint8), 2)
    _png(tmp_path / "sub" / "b.png", rng.integers(0, 256, (16, 50, 3), dtype=np.uint8), 2)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = D.ImageFolder(tmp_path, 24, seed=2)
    assert len(ds) == 2 and ds.paths[1].endswith("b.png")
    for i in range(2):
        x = ds[i]
        assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert torch.equal(x, D.ImageFolder(tmp_path, 24, seed=2)[i])  # repeatable
    ds.set_epoch(1)
    assert not torch.equal(ds[0], D.ImageFolder(tmp_path, 24, seed=2)[0])  # another draw per epoch
    # augment=False: the central square, resized (30x30 -> 15x15 by 2x2 area averaging).
    plain = D.ImageFolder(tmp_path, 15, augment=False)
    img = D.read_png(tmp_path / "a.png").permute(2, 0, 1).float() / 255
    want = img[:, 5:35, :].reshape(3, 15, 2, 15, 2).mean((2, 4))
    torch.testing.assert_close(plain[0], want)
    with pytest.raises(ValueError, match="root: no images"):
        D.ImageFolder(tmp_path / "sub", 8, extensions=(".jpg",))
    with pytest.raises(FileNotFoundError, match="root: not a directory"):
        D.ImageFolder(tmp_path / "missing")


def test_non_png_needs_pillow(tmp_path):
    try:
        import PIL  # noqa: F401
    except ImportError:
        (tmp_path / "x.jpg").write_bytes(b"\xff\xd8\xff")
        with pytest.raises(ImportError, match="needs Pillow"):
            D.read_image(tmp_path / "x.jpg")
    else:
        pytest.skip("Pillow is installed: JPEG files are read by it")
