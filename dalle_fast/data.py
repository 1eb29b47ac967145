"""Data sets: synthetic captioned shapes (generated on the fly, with an attribute checker) and image folders.

Synthetic shapes
----------------
An image holds one or two objects on a black background. An object has a shape (square, circle, triangle,
diamond, cross), a colour (red, green, blue, yellow, magenta, cyan) and a cell of a 3x3 grid (its
position); its size and its offset inside the cell vary a little. Two objects stand in a relation, the
second object's cell being in the same column (above / below) or the same row (to the left of / to the
right of) as the first's. Captions follow one grammar:

    caption  := "a " object " in the " position             (one object)
              | "a " object " " relation " a " object       (two objects)
    object   := colour " " shape
    relation := "above" | "below" | "to the left of" | "to the right of"
    position := "top left" | "top" | "top right" | "left" | "center" | "right"
              | "bottom left" | "bottom" | "bottom right"

The split holds out five (colour, shape) combinations from training: HELD_OUT = red square, green circle,
blue triangle, yellow diamond, magenta cross. No object of a "train" scene has one of them; every "test"
scene has at least one (so a text-to-image model is tested on combinations it never saw, each made of a
colour and a shape it did see). Scene i of a split is a pure function of (seed, split, i): the data set
needs no files and is the same on every machine.

`read_objects(image)` reads shape, colour and cell back from an image (for scoring generated images) and
`check(image, caption_or_scene)` compares them with what a caption asks for; on true renders of 32x32 and
larger every attribute is read correctly (tested at >= 98%).

Image folders
-------------
`ImageFolder(root, image_size)` yields every image below root with the paper's augmentation (App. A.2,
Listing 1: a random square crop of the shorter side, resized to t in [9/8, 12/8] x image_size with area
interpolation, then a random image_size crop) or a deterministic center crop. PNG files are decoded
here (8-bit and 16-bit, grey, RGB, palette, with or without alpha, not interlaced); other formats need
Pillow (`pip install pillow`), which is used when installed and is not a dependency.
"""

import math
import os
import random
import re
import struct
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SHAPES = ("square", "circle", "triangle", "diamond", "cross")
COLOURS = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
    "magenta": (0.85, 0.25, 0.85),
    "cyan": (0.15, 0.80, 0.85),
}
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
RELATIONS = ("above", "below", "to the left of", "to the right of")
HELD_OUT = frozenset(
    {("red", "square"), ("green", "circle"), ("blue", "triangle"), ("yellow", "diamond"), ("magenta", "cross")}
)
SPLITS = ("train", "test", "all")
GRID = 3

# The extent of each shape around its centre, in units of its radius r: (x_min, x_max, y_min, y_max).
_EXTENT = {
    "square": (-0.85, 0.85, -0.85, 0.85),
    "circle": (-1.0, 1.0, -1.0, 1.0),
    "triangle": (-1.0, 1.0, -1.0, 0.8),
    "diamond": (-1.0, 1.0, -1.0, 1.0),
    "cross": (-1.0, 1.0, -1.0, 1.0),
}


@dataclass(frozen=True)
class Obj:
    """One object: what a caption says (shape, colour, cell = row * 3 + column) and how it is drawn
    (centre offset from the cell's centre and radius, as fractions of the cell size)."""

    shape: str
    colour: str
    cell: int
    dx: float = 0.0
    dy: float = 0.0
    radius: float = 0.36

    @property
    def row(self) -> int:
        return self.cell // GRID

    @property
    def column(self) -> int:
        return self.cell % GRID

    @property
    def words(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One or two objects; with two, `relation` holds between objects[0] and objects[1]."""

    objects: tuple[Obj, ...]
    relation: str | None = None

    @property
    def caption(self) -> str:
        if len(self.objects) == 1:
            return f"a {self.objects[0].words} in the {POSITIONS[self.objects[0].cell]}"
        a, b = self.objects
        return f"a {a.words} {self.relation} a {b.words}"

    @property
    def held_out(self) -> bool:
        return any((o.colour, o.shape) in HELD_OUT for o in self.objects)


def relation_holds(a_cell: int, b_cell: int, relation: str) -> bool:
    """Whether an object in cell a_cell is `relation` an object in cell b_cell (same column / same row)."""
    (ar, ac), (br, bc) = divmod(a_cell, GRID), divmod(b_cell, GRID)
    if relation == "above":
        return ac == bc and ar < br
    if relation == "below":
        return ac == bc and ar > br
    if relation == "to the left of":
        return ar == br and ac < bc
    if relation == "to the right of":
        return ar == br and ac > bc
    raise ValueError(f"relation: expected one of {RELATIONS}, got {relation!r}")


# Scenes --------------------------------------------------------------------------------------------------


def _random_obj(rng: random.Random, cell: int) -> Obj:
    radius = rng.uniform(0.30, 0.42)
    slack = max(0.0, 0.5 - radius - 0.06)  # keeps the shape inside its cell, with a margin
    return Obj(
        shape=rng.choice(SHAPES),
        colour=rng.choice(sorted(COLOURS)),
        cell=cell,
        dx=rng.uniform(-slack, slack),
        dy=rng.uniform(-slack, slack),
        radius=radius,
    )


def random_scene(rng: random.Random, split: str = "all", max_objects: int = 2) -> Scene:
    """A scene drawn from rng, redrawn until it belongs to `split` (train: no held-out combination;
    test: at least one; all: anything)."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if max_objects not in (1, 2):
        raise ValueError(f"max_objects: expected 1 or 2, got {max_objects!r}")
    while True:
        if max_objects == 1 or rng.random() < 0.5:
            scene = Scene((_random_obj(rng, rng.randrange(GRID * GRID)),))
        else:
            relation = rng.choice(RELATIONS)
            pairs = [(a, b) for a in range(GRID * GRID) for b in range(GRID * GRID) if relation_holds(a, b, relation)]
            a, b = rng.choice(pairs)
            scene = Scene((_random_obj(rng, a), _random_obj(rng, b)), relation)
        if split == "all" or scene.held_out == (split == "test"):
            return scene


# Rendering -----------------------------------------------------------------------------------------------


def _shape_mask(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: float) -> torch.Tensor:
    """Pixels (offsets dx, dy from the centre, y down) inside a shape of radius r."""
    if shape == "square":
        return (dx.abs() <= 0.85 * r) & (dy.abs() <= 0.85 * r)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "triangle":  # apex up, base at 0.8 r below the centre
        return (dy <= 0.8 * r) & (dx.abs() <= (dy + r) / 1.8)
    if shape == "diamond":
        return dx.abs() + dy.abs() <= r
    if shape == "cross":
        return ((dx.abs() <= r / 3) & (dy.abs() <= r)) | ((dy.abs() <= r / 3) & (dx.abs() <= r))
    raise ValueError(f"shape: expected one of {SHAPES}, got {shape!r}")


def _pixel_grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.arange(size, dtype=torch.float32) + 0.5
    return c.view(1, size), c.view(size, 1)  # x [1, S], y [S, 1]


def render(scene: Scene, image_size: int = 64) -> torch.Tensor:
    """float32 [3, image_size, image_size] in [0, 1]."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 24:
        raise ValueError(f"image_size: expected an integer >= 24, got {image_size!r}")
    img = torch.zeros(3, image_size, image_size)
    x, y = _pixel_grid(image_size)
    cell = image_size / GRID
    for o in scene.objects:
        cx, cy = (o.column + 0.5 + o.dx) * cell, (o.row + 0.5 + o.dy) * cell
        mask = _shape_mask(o.shape, x - cx, y - cy, o.radius * cell)
        img[:, mask] = torch.tensor(COLOURS[o.colour]).view(3, 1)
    return img


class SyntheticShapes(torch.utils.data.Dataset):
    """`length` captioned scenes of one split, generated on the fly: item i -> (image [3, S, S] float32 in
    [0, 1], caption). Item i is a pure function of (seed, split, i)."""

    def __init__(self, split: str = "train", length: int = 10000, image_size: int = 64, *, seed: int = 0,
                 max_objects: int = 2):  # fmt: skip
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ValueError(f"length: expected an integer >= 0, got {length!r}")
        render(Scene(()), image_size)  # validates image_size
        if max_objects not in (1, 2):
            raise ValueError(f"max_objects: expected 1 or 2, got {max_objects!r}")
        self.split, self.length, self.image_size, self.seed, self.max_objects = (
            split, length, image_size, int(seed), max_objects)  # fmt: skip

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        if not -self.length <= index < self.length:
            raise IndexError(f"index: expected an integer in [0, {self.length}), got {index}")
        index %= self.length
        return random_scene(random.Random(f"dalle_fast.shapes/{self.seed}/{self.split}/{index}"), self.split,
                            self.max_objects)  # fmt: skip

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        scene = self.scene(index)
        return render(scene, self.image_size), scene.caption


# Reading an image back -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detected:
    shape: str
    colour: str
    cell: int
    pixels: int


def _classify_shape(mask: torch.Tensor, cell: float) -> str:
    """The shape whose drawing overlaps the mask best (IoU). Each shape's drawing is fitted to the mask's
    bounding box, then refined: centre +-0.75 px, radius +-1 px, kept within the radii the data set draws
    (0.30-0.42 of a cell, a little wider). At small sizes a drawing snaps to whole pixels, so the box alone
    misjudges where it was and how large, and without the radius range a small diamond's pixels are also
    a circle of a radius never drawn."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    x0, x1 = xs.min().item(), xs.max().item() + 1.0
    y0, y1 = ys.min().item(), ys.max().item() + 1.0
    shift = torch.linspace(-0.75, 0.75, 7)
    ddx, ddy, ddr = (t.reshape(-1, 1, 1) for t in torch.meshgrid(shift, shift, torch.linspace(-1, 1, 9), indexing="ij"))
    bx, by = 0.5 * (x0 + x1), 0.5 * (y0 + y1)  # the box's centre
    fits = {}
    for shape in SHAPES:
        ex0, ex1, ey0, ey1 = _EXTENT[shape]
        r = 0.5 * ((x1 - x0) / (ex1 - ex0) + (y1 - y0) / (ey1 - ey0))
        r = (r + ddr).clamp(0.28 * cell, 0.44 * cell)
        fits[shape] = r, bx - 0.5 * (ex0 + ex1) * r + ddx, by - 0.5 * (ey0 + ey1) * r + ddy
    # Only the window every candidate drawing fits in (centres within 0.85 px + 0.1 r of the box's centre).
    reach = 1.1 * max(f[0].max().item() for f in fits.values()) + 2
    xa, xb = max(0, int(min(x0, bx - reach))), min(mask.shape[1], int(max(x1, bx + reach)) + 1)
    ya, yb = max(0, int(min(y0, by - reach))), min(mask.shape[0], int(max(y1, by + reach)) + 1)
    mask = mask[ya:yb, xa:xb]
    x = torch.arange(xa, xb, dtype=torch.float32).view(1, -1) + 0.5
    y = torch.arange(ya, yb, dtype=torch.float32).view(-1, 1) + 0.5
    best, best_iou = SHAPES[0], -1.0
    for shape, (r, cx, cy) in fits.items():
        templates = _shape_mask(shape, x - cx, y - cy, r)
        iou = (templates & mask).sum((1, 2)) / (templates | mask).sum((1, 2)).clamp_min(1)
        top = iou.max().item()
        if top > best_iou:
            best, best_iou = shape, top
    return best


def read_objects(image: torch.Tensor, *, threshold: float = 0.35, min_fraction: float = 0.04) -> list[Detected]:
    """The objects in an image [3, S, S] (values in [0, 1]): per grid cell, the pixels brighter than
    `threshold` (max over channels) form the cell's object when they cover at least `min_fraction` of it;
    its colour is the nearest palette colour to their median, its shape the best-fitting drawing."""
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image: expected a [3, height, width] tensor, got {got}")
    image = image.detach().float().cpu()
    _, hgt, wid = image.shape
    fg = image.amax(0) > threshold
    palette = torch.tensor(list(COLOURS.values()))
    names = list(COLOURS)
    found = []
    for cell in range(GRID * GRID):
        r, c = divmod(cell, GRID)
        ys = slice(round(r * hgt / GRID), round((r + 1) * hgt / GRID))
        xs = slice(round(c * wid / GRID), round((c + 1) * wid / GRID))
        mask = fg[ys, xs]
        n = int(mask.sum())
        if n < min_fraction * mask.numel():
            continue
        rgb = image[:, ys, xs][:, mask].median(dim=1).values
        colour = names[int(((palette - rgb) ** 2).sum(1).argmin())]
        found.append(Detected(_classify_shape(mask, hgt / GRID), colour, cell, n))
    return found


_CAPTION_ONE = re.compile(r"^a (\w+) (\w+) in the (.+)$")
_CAPTION_TWO = re.compile(r"^a (\w+) (\w+) (above|below|to the left of|to the right of) a (\w+) (\w+)$")


def parse_caption(caption: str) -> Scene:
    """The scene a caption of the grammar asks for (two-object scenes: cells unknown, set to -1)."""
    text = caption.strip().lower()
    m2 = _CAPTION_TWO.match(text)
    m1 = None if m2 else _CAPTION_ONE.match(text)
    if m2:
        c1, s1, rel, c2, s2 = m2.groups()
        objs, relation = (Obj(s1, c1, -1), Obj(s2, c2, -1)), rel
    elif m1 and m1.group(3) in POSITIONS:
        objs, relation = (Obj(m1.group(2), m1.group(1), POSITIONS.index(m1.group(3))),), None
    else:
        raise ValueError(f"caption: not in the synthetic shapes grammar: {caption!r}")
    for o in objs:
        if o.shape not in SHAPES or o.colour not in COLOURS:
            raise ValueError(f"caption: unknown colour or shape {o.words!r} in {caption!r}")
    return Scene(objs, relation)


def caption_variants(caption: str, attributes=("shape", "colour", "position")) -> list[str]:
    """The captions that differ from `caption` in one word of the given attributes: each object's shape or colour
    replaced by every other one; "position": a one-object caption's position by every other one, a two-object
    caption's relation by every other one. Negatives for a contrastive reranker (nn.decoding.contrastive_scorer)."""
    unknown = set(attributes) - {"shape", "colour", "position"}
    if unknown:
        raise ValueError(f"attributes: expected some of ('shape', 'colour', 'position'), got {sorted(unknown)}")
    scene = parse_caption(caption)
    out = []
    for i, o in enumerate(scene.objects):
        changed = []
        if "shape" in attributes:
            changed += [Obj(s, o.colour, o.cell) for s in SHAPES if s != o.shape]
        if "colour" in attributes:
            changed += [Obj(o.shape, c, o.cell) for c in sorted(COLOURS) if c != o.colour]
        if "position" in attributes and scene.relation is None:
            changed += [Obj(o.shape, o.colour, p) for p in range(GRID * GRID) if p != o.cell]
        for new in changed:
            objects = scene.objects[:i] + (new,) + scene.objects[i + 1 :]
            out.append(Scene(objects, scene.relation).caption)
    if "position" in attributes and scene.relation is not None:
        out += [Scene(scene.objects, r).caption for r in RELATIONS if r != scene.relation]
    return out


def check(image: torch.Tensor, target: "Scene | str") -> dict[str, bool]:
    """Does the image show what the caption (or scene) says? Per attribute and overall:
    count (as many objects as asked), shape, colour, position (the cell for one object, the relation for
    two; objects are matched to the caption's by shape and colour), and all."""
    scene = parse_caption(target) if isinstance(target, str) else target
    found = read_objects(image)
    out = dict(count=len(found) == len(scene.objects), shape=False, colour=False, position=False)
    if out["count"] and len(found) == 1:
        (want,), (got,) = scene.objects, found
        out.update(shape=got.shape == want.shape, colour=got.colour == want.colour, position=got.cell == want.cell)
    elif out["count"]:
        a, b = scene.objects
        for first, second in ((found[0], found[1]), (found[1], found[0])):
            shape = first.shape == a.shape and second.shape == b.shape
            colour = first.colour == a.colour and second.colour == b.colour
            position = relation_holds(first.cell, second.cell, scene.relation)
            score = shape + colour + position
            if score > out["shape"] + out["colour"] + out["position"]:
                out.update(shape=shape, colour=colour, position=position)
    out["all"] = all(out.values())
    return out


# Image folders -------------------------------------------------------------------------------------------


def _unfilter_png(raw: bytes, height: int, stride: int, bpp: int):
    import numpy as np

    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int32)
    for i in range(height):
        kind, line = rows[i, 0], rows[i, 1:].astype(np.int32)
        if kind == 0:
            cur = line
        elif kind == 1:  # Sub: a running sum per byte lane
            cur = np.concatenate([np.cumsum(line[j::bpp]) for j in range(bpp)])
            order = np.concatenate([np.arange(j, stride, bpp) for j in range(bpp)])
            cur = cur[np.argsort(order)] % 256
        elif kind == 2:
            cur = (line + prev) % 256
        elif kind in (3, 4):
            cur = line.copy()
            for x in range(0, stride, bpp):
                left = cur[x - bpp : x] if x else np.zeros(bpp, dtype=np.int32)
                up = prev[x : x + bpp]
                if kind == 3:
                    pred = (left + up) // 2
                else:
                    ul = prev[x - bpp : x] if x else np.zeros(bpp, dtype=np.int32)
                    p = left + up - ul
                    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - ul)
                    pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, ul))
                cur[x : x + bpp] = (cur[x : x + bpp] + pred) % 256
        else:
            raise ValueError(f"png: unknown filter type {kind}")
        out[i] = cur
        prev = cur.astype(np.int32)
    return out


def read_png(path) -> torch.Tensor:
    """uint8 [H, W, 3] from a PNG file (no imaging library needed; alpha is dropped, grey is repeated)."""
    import numpy as np

    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"png: {path}: not a PNG file")
    pos, idat, palette, header = 8, [], None, None
    while pos < len(data):
        (length,), tag = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if tag == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif tag == b"PLTE":
            palette = np.frombuffer(body, dtype=np.uint8).reshape(-1, 3)
        elif tag == b"IDAT":
            idat.append(body)
        elif tag == b"IEND":
            break
    if header is None:
        raise ValueError(f"png: {path}: no IHDR chunk")
    width, height, depth, colour_type, _, _, interlace = header
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour_type)
    if channels is None or depth not in (8, 16) or (colour_type == 3 and depth != 8) or interlace:
        raise ValueError(
            f"png: {path}: unsupported (bit depth {depth}, colour type {colour_type}, interlace {interlace}); "
            f"install Pillow to read it"
        )
    nbytes = depth // 8
    px = _unfilter_png(zlib.decompress(b"".join(idat)), height, width * channels * nbytes, channels * nbytes)
    px = px.reshape(height, width, channels, nbytes)[..., 0]  # 16-bit: the high byte
    if colour_type == 3:
        if palette is None:
            raise ValueError(f"png: {path}: palette image without PLTE")
        px = palette[px[..., 0]]
    elif channels in (1, 2):
        px = np.repeat(px[..., :1], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(px[..., :3]))


def read_image(path) -> torch.Tensor:
    """uint8 [H, W, 3]: PNG decoded here, anything else by Pillow when it is installed."""
    if str(path).lower().endswith(".png"):
        return read_png(path)
    try:
        from PIL import Image
    except ImportError:
        raise ImportError(
            f"reading {os.path.basename(str(path))!r} needs Pillow (pip install pillow); only PNG is decoded without it"
        ) from None
    import numpy as np

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy())


def image_grid(images: torch.Tensor, *, ncol: int | None = None, pad: int = 2) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] -> one uint8 [rows, cols, 3] picture, ncol images per row (default: about
    square), separated by `pad` grey pixels; write it with `write_png`."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a [N, 3, H, W] tensor with N >= 1, got {got}")
    n, _, h, w = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    out = torch.full((3, nrow * (h + pad) + pad, ncol * (w + pad) + pad), 0.5)
    for i, img in enumerate(images.detach().float().cpu().clamp(0, 1)):
        r, c = divmod(i, ncol)
        out[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    return (out * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()


def write_png(path, rgb: torch.Tensor) -> None:
    """Write uint8 [H, W, 3] as an 8-bit RGB PNG (no imaging library needed)."""
    from .masks import write_png as _write

    _write(os.fspath(path), rgb)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """[3, s, s] float -> [3, size, size]: area averaging when shrinking (as Listing 1), bilinear otherwise."""
    mode = "area" if size <= img.shape[-1] else "bilinear"
    kw = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(img[None], size=(size, size), mode=mode, **kw)[0].clamp(0, 1)


class ImageFolder(torch.utils.data.Dataset):
    """Every image below `root` (sorted paths) -> float32 [3, image_size, image_size] in [0, 1].

    augment=True: the paper's Listing 1 (random square crop of the shorter side, resize to t ~ U[9/8, 12/8]
    x image_size, random image_size crop), drawn from (seed, epoch, index) so that runs are repeatable
    (set_epoch changes the draw); augment=False: the central square, resized.
    """

    def __init__(self, root, image_size: int = 64, *, augment: bool = True, seed: int = 0,
                 extensions=IMAGE_EXTENSIONS):  # fmt: skip
        if not os.path.isdir(root):
            raise FileNotFoundError(f"root: not a directory: {root!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size: expected an integer >= 8, got {image_size!r}")
        exts = tuple(e.lower() for e in extensions)
        self.paths = sorted(
            os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.lower().endswith(exts)
        )
        if not self.paths:
            raise ValueError(f"root: no images ({', '.join(exts)}) below {root!r}")
        self.image_size, self.augment, self.seed, self.epoch = image_size, augment, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        img = read_image(self.paths[index]).permute(2, 0, 1).float() / 255
        _, h, w = img.shape
        s, size = min(h, w), self.image_size
        if not self.augment:
            top, left = (h - s) // 2, (w - s) // 2
            return _resize(img[:, top : top + s, left : left + s], size)
        rng = random.Random(f"dalle_fast.images/{self.seed}/{self.epoch}/{index}")
        top, left = rng.randint(0, h - s), rng.randint(0, w - s)
        t = math.floor(rng.uniform(9 / 8, 12 / 8) * size)
        img = _resize(img[:, top : top + s, left : left + s], t)
        top, left = rng.randint(0, t - size), rng.randint(0, t - size)
        return img[:, top : top + size, left : left + size].contiguous()
