"""sparse_decode_attention: every backend against the dense-mask oracle, the key ranges against dense_mask, and the
op's contract (position as int or tensor, strided caches whose unread tail is NaN, equality with the training op's
row, no autograd, fakes, torch.compile, bad input).

Errors are judged by DESIGN section 8's rule for attention: against an fp64 oracle (softmax over the row of
dense_mask, computed on the clean cache), at most twice the error of eager PyTorch in the precision under test,
plus a floor.
"""

import os

import pytest
import torch
from conftest import DEVICE_BACKENDS, KERNEL_DEVICE_BACKENDS
from tolerances import ELEMENTWISE, assert_within_eager_error

from dalle_fast import ops
from dalle_fast.ops import decode as decode_ops
from dalle_fast.reference import decode as ref_decode
from dalle_fast.reference import dense_mask

pytestmark = pytest.mark.usefixtures("one_thread")
device_backends = pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
kernel_backends = pytest.mark.parametrize("device,backend", KERNEL_DEVICE_BACKENDS)

# (kind, conv_variant, kernel, text_len, (grid_h, grid_w))
MASKS = [
    ("full", "clipped", 11, 5, (5, 7)),
    ("row", "clipped", 11, 5, (5, 7)),
    ("column", "clipped", 11, 5, (5, 7)),
    ("conv", "clipped", 3, 5, (5, 7)),
    ("conv", "torus", 3, 5, (5, 7)),
    ("conv", "torus", 5, 0, (4, 4)),  # the window covers the whole grid; no text
]
MASK_IDS = [f"{k}-{v}{kern}-T{t}-{g[0]}x{g[1]}" for k, v, kern, t, g in MASKS]


def _positions(text_len, grid, n, interpreter=False):
    """In the text, the first image token, row starts and ends, the last position, a random one (under the
    Triton interpreter, which runs every program in Python: the text, a row end and the last position)."""
    gh, gw = grid
    full = text_len + gh * gw
    if interpreter:
        ps = {max(text_len - 2, 0), text_len + 2 * gw - 1, full - n}
    else:
        ps = {0, max(text_len - 2, 0), text_len, text_len + gw, text_len + 2 * gw - 1, full - n}
        ps.add(int(torch.randint(0, full - n + 1, ())))
    return sorted(p for p in ps if 0 <= p <= full - n)


def _caches(b, h, lmax, d, dtype, device, tail_from):
    """k, v [B, H, Lmax, D] viewed from [B, Lmax, H, D] storage (the model's cache), rows >= tail_from NaN; and
    clean copies for the oracle."""
    clean = [torch.randn(b, lmax, h, d, device=device).to(dtype).transpose(1, 2) for _ in range(2)]
    dirty = [c.clone(memory_format=torch.preserve_format) for c in clean]
    for x in dirty:
        x[:, :, tail_from:] = float("nan")
    assert dirty[0].stride(-1) == 1 and (h == 1 or not dirty[0].is_contiguous())
    return dirty, clean


def _oracle(q, k, v, kind, variant, kernel, text_len, grid, position, scale=None):
    """fp64 dense-mask attention of the queries at position .. position + n - 1 over the clean cache, and eager
    PyTorch's result in the inputs' precision (for the error bound)."""
    n, lmax, d = q.shape[2], k.shape[2], q.shape[3]
    scale = d**-0.5 if scale is None else scale
    mask = dense_mask(kind, text_len, *grid, kernel=kernel, conv_variant=variant, device=q.device)
    mask = mask[position : position + n, :lmax]

    def attend(q, k, v):
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        return torch.matmul(torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1), v)

    return attend(q.double(), k.double(), v.double()), attend(q, k, v)


def _run_case(device, backend, mask, n, d, dtype, b=1, h=3, as_tensor=None, lmax=None):
    kind, variant, kernel, text_len, grid = mask
    full = text_len + grid[0] * grid[1]
    lmax = full if lmax is None else lmax
    interpreter = backend == "triton" and device == "cpu"
    for i, p in enumerate(_positions(text_len, grid, n, interpreter)):
        if p + n > lmax:
            continue
        q = torch.randn(b, h, n, d, device=device).to(dtype)
        (k, v), (kc, vc) = _caches(b, h, lmax, d, dtype, device, p + n)
        use_tensor = (i % 2 == 1) if as_tensor is None else as_tensor
        pos = torch.tensor(p, device=device) if use_tensor else p
        kw = dict(kind=kind, text_len=text_len, grid_size=grid, kernel=kernel, conv_variant=variant)
        out = ops.sparse_decode_attention(q, k, v, position=pos, **kw, backend=backend)
        assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
        oracle, eager = _oracle(q, kc, vc, kind, variant, kernel, text_len, grid, p)
        assert torch.isfinite(out.float()).all(), f"position {p}: non-finite output (a NaN key was read?)"
        assert_within_eager_error(out, oracle, eager, dtype)


# Key ranges -------------------------------------------------------------------------------------------------


def _check_ranges(kind, variant, kernel, text_len, grid, positions):
    m = dense_mask(kind, text_len, *grid, kernel=kernel, conv_variant=variant)
    n_slots = ref_decode.slot_count(kind, grid[0], kernel, variant)
    for p in positions:
        ranges = ref_decode.key_ranges(kind, text_len, *grid, p, kernel=kernel, conv_variant=variant)
        assert len(ranges) == n_slots
        keys = ref_decode.allowed_keys(kind, text_len, *grid, p, kernel=kernel, conv_variant=variant)
        assert keys.numel() == keys.unique().numel(), f"p={p}: a key is read twice: {ranges}"
        row = torch.zeros(m.shape[1], dtype=torch.bool)
        row[keys] = True
        assert torch.equal(row, m[p]), f"p={p}: ranges {ranges} differ from the mask row"


@pytest.mark.parametrize(
    "kind,variant,kernel",
    [("full", "clipped", 11), ("row", "clipped", 11), ("column", "clipped", 11)]
    + [("conv", v, kern) for v in ("clipped", "torus") for kern in (1, 3, 5, 7)],
)
@pytest.mark.parametrize("text_len,grid", [(0, (4, 4)), (5, (5, 7)), (3, (7, 5)), (2, (1, 6)), (4, (6, 1))])
def test_key_ranges_small(kind, variant, kernel, text_len, grid):
    _check_ranges(kind, variant, kernel, text_len, grid, range(text_len + grid[0] * grid[1]))


@pytest.mark.parametrize(
    "kind,variant,kernel",
    [("full", "clipped", 11), ("row", "clipped", 11), ("column", "clipped", 11), ("conv", "clipped", 11),
     ("conv", "torus", 11), ("conv", "torus", 13)],
)  # fmt: skip
def test_key_ranges_paper_grid(kind, variant, kernel):
    """T = 256, 32 x 32: text positions, every row start and end, and random image positions."""
    t, g = 256, (32, 32)
    ps = {0, 100, 255} | {t + r * 32 for r in range(32)} | {t + r * 32 + 31 for r in range(32)}
    ps |= set(torch.randint(t, t + 1024, (40,)).tolist())
    _check_ranges(kind, variant, kernel, t, g, sorted(ps))


def test_key_ranges_read_only_the_allowed_count():
    """At the paper's layout a row layer's last query reads T + 33 keys, a conv (11x11 clipped) one at most T + 61."""
    for kind, most in (("row", 256 + 33), ("conv", 256 + 61), ("column", 256 + 32)):
        counts = [
            sum(c for _, c, _ in ref_decode.key_ranges(kind, 256, 32, 32, p)) for p in range(256, 1280, 7)
        ]  # fmt: skip
        assert max(counts) == most or (kind == "conv" and max(counts) <= most)


# Parity -----------------------------------------------------------------------------------------------------


@device_backends
@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("n", [1, 3])
def test_parity(device, backend, mask, n):
    _run_case(device, backend, mask, n, 32, torch.float32)


@device_backends
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask", [MASKS[1], MASKS[4]], ids=[MASK_IDS[1], MASK_IDS[4]])
def test_parity_half_precision(device, backend, dtype, mask):
    _run_case(device, backend, mask, 1, 64, dtype, b=3, h=1)


@device_backends
@pytest.mark.parametrize("d,dtype", [(64, torch.float32), (128, torch.float16)])
def test_parity_head_dims(device, backend, d, dtype):
    _run_case(device, backend, MASKS[3], 3, d, dtype, b=1, h=1)


@device_backends
def test_parity_prefix_cache(device, backend):
    """Lmax below the full layout (a cache sized to what is generated so far)."""
    _run_case(device, backend, MASKS[2], 1, 32, torch.float32, lmax=27)


@device_backends
def test_every_position(device, backend):
    """Every position of a small grid, every kind: the ranges of the C++ header / the Triton kernel / the eager
    mirror, each against the dense mask's rows (one call per position, n = 1)."""
    if backend == "triton" and device == "cpu":
        masks_ = [MASKS[4]]  # the interpreter is slow: the torus conv ranges, the most intricate
    else:
        masks_ = MASKS
    for kind, variant, kernel, t, grid in masks_:
        full = t + grid[0] * grid[1]
        q = torch.randn(1, 1, full, 32, device=device)
        k, v = torch.randn(2, 1, 1, full, 32, device=device)
        kw = dict(kind=kind, text_len=t, grid_size=grid, kernel=kernel, conv_variant=variant)
        oracle = ref_decode_dense(q, k, v, kind, variant, kernel, t, grid)
        for p in range(full):
            out = ops.sparse_decode_attention(q[:, :, p : p + 1], k, v, position=p, **kw, backend=backend)
            torch.testing.assert_close(out.double(), oracle[:, :, p : p + 1], rtol=1e-5, atol=2e-6)


def ref_decode_dense(q, k, v, kind, variant, kernel, t, grid):
    mask = dense_mask(kind, t, *grid, kernel=kernel, conv_variant=variant, device=q.device)
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.matmul(torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1), v.double())


@device_backends
@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_equals_training_row(device, backend, kind):
    """The decode output at p equals row p of the training op (ops.sparse_attention on the prefix 0..p+n-1), fp32."""
    t, grid, n = 5, (5, 7), 3
    for p in (t - 1, t + 8, t + 31):
        q, k, v = (torch.randn(1, 3, p + n, 32, device=device) for _ in range(3))
        kw = dict(kind=kind, text_len=t, grid_size=grid, kernel=3)
        train = ops.sparse_attention(q, k, v, **kw, backend="cpp" if device == "cpu" else "triton")
        out = ops.sparse_decode_attention(q[:, :, p:], k, v, position=p, **kw, backend=backend)
        rtol, atol = ELEMENTWISE[torch.float32]
        torch.testing.assert_close(out, train[:, :, p:], rtol=rtol, atol=atol)


@kernel_backends
def test_output_layout(device, backend):
    """out is [B, H, n, D] over [B, n, H, D] memory: a transformer merges the heads with a free view."""
    q = torch.randn(2, 3, 2, 32, device=device)
    k, v = torch.randn(2, 2, 3, 40, 32, device=device)
    out = ops.sparse_decode_attention(q, k, v, kind="row", position=30, text_len=4, grid_size=6, backend=backend)
    assert out.transpose(1, 2).is_contiguous()


@kernel_backends
def test_position_tensor_updated_in_place(device, backend):
    """The same position tensor, updated in place between calls (what a CUDA graph replay does), is re-read."""
    q = torch.randn(1, 3, 1, 32, device=device)
    k, v = torch.randn(2, 1, 3, 41, 32, device=device)
    kw = dict(kind="conv", text_len=5, grid_size=6, kernel=5, backend=backend)
    pos = torch.tensor(10, device=device)
    first = ops.sparse_decode_attention(q, k, v, position=pos, **kw)
    pos.fill_(33)
    second = ops.sparse_decode_attention(q, k, v, position=pos, **kw)
    torch.testing.assert_close(first, ops.sparse_decode_attention(q, k, v, position=10, **kw))
    torch.testing.assert_close(second, ops.sparse_decode_attention(q, k, v, position=33, **kw))
    assert not torch.equal(first, second)


# Registration -----------------------------------------------------------------------------------------------


def _op_args(device, position_tensor):
    q = torch.randn(1, 3, 2, 32, device=device)
    k, v = torch.randn(2, 1, 3, 41, 32, device=device)
    pos = torch.tensor(20, device=device) if position_tensor else None
    return (q, k, v, pos, 0 if position_tensor else 20, 3, 5, 6, 6, 3, True, 32**-0.5)


@kernel_backends
@pytest.mark.parametrize("position_tensor", [False, True])
def test_opcheck(device, backend, position_tensor):
    op = torch.ops.dalle_fast.sparse_decode_attention
    if backend == "triton":
        op = torch.ops.dalle_fast.triton_sparse_decode_attention
    torch.library.opcheck(op, _op_args(device, position_tensor))


@kernel_backends
def test_torch_compile(device, backend):
    q = torch.randn(1, 3, 1, 32, device=device)
    k, v = torch.randn(2, 1, 3, 41, 32, device=device)
    pos = torch.tensor(17, device=device)

    def step(q, k, v, pos):
        out = ops.sparse_decode_attention(q, k, v, kind="row", position=pos, text_len=5, grid_size=6, backend=backend)
        return out * 2

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(q, k, v, pos), step(q, k, v, pos))
    pos.fill_(30)
    torch.testing.assert_close(compiled(q, k, v, pos), step(q, k, v, pos))


@device_backends
@pytest.mark.parametrize("mask", [MASKS[1], MASKS[3]], ids=[MASK_IDS[1], MASK_IDS[3]])
def test_bound_equals_op(device, backend, mask):
    """bind_decode_attention (decoding's per-step call) gives exactly the op's output at every position, with
    an int or a tensor position, on fresh queries and caches of the bound shapes."""
    kind, variant, kernel, text_len, grid = mask
    lmax = text_len + grid[0] * grid[1]
    kw = dict(kind=kind, text_len=text_len, grid_size=grid, kernel=kernel, conv_variant=variant)
    q = torch.randn(2, 3, 1, 32, device=device)
    (k, v), _ = _caches(2, 3, lmax, 32, torch.float32, device, lmax)
    f = ops.bind_decode_attention(q, k, v, **kw, backend=backend)
    interpreter = backend == "triton" and device == "cpu"
    for i, p in enumerate(_positions(text_len, grid, 1, interpreter)):
        q = torch.randn(2, 3, 1, 32, device=device)
        (k, v), _ = _caches(2, 3, lmax, 32, torch.float32, device, p + 1)
        pos = torch.tensor(p, device=device) if i % 2 else p
        want = ops.sparse_decode_attention(q, k, v, position=pos, **kw, backend=backend)
        torch.testing.assert_close(f(q, k, v, pos), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"position: expected 0 <= position and position \+ n <= Lmax"):
        f(q, k, v, lmax)


def test_bind_bad_arguments():
    q, k, v, kw = _good()
    kw.pop("position")
    with pytest.raises(ValueError, match="kind: expected one of"):
        ops.bind_decode_attention(q, k, v, **(kw | dict(kind="diagonal")))
    with pytest.raises(TypeError, match="v_cache: expected q's dtype torch.float32, got torch.float16"):
        ops.bind_decode_attention(q, k, v.half(), **kw)
    with pytest.raises(ValueError, match="scale: expected a finite float"):
        ops.bind_decode_attention(q, k, v, **kw, scale=float("nan"))
    with pytest.raises(ops.BackendUnavailable, match=r"head sizes \(32, 64, 128\), got 48"):
        q48, k48 = torch.randn(1, 2, 1, 48), torch.randn(1, 2, 41, 48)
        ops.bind_decode_attention(q48, k48, k48, **kw, backend="cpp")


# Bad input --------------------------------------------------------------------------------------------------


def _good():
    q = torch.randn(1, 2, 1, 32)
    k, v = torch.randn(2, 1, 2, 41, 32)
    return q, k, v, dict(kind="row", position=20, text_len=5, grid_size=6)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(kind="diagonal"), ValueError, "kind: expected one of"),
        (dict(kernel=4), ValueError, "kernel: expected an odd int"),
        (dict(conv_variant="wrap"), ValueError, "conv_variant: expected one of"),
        (dict(grid_size=(4, 0)), ValueError, "grid_w: expected an int >= 1"),
        (dict(text_len=2), ValueError, r"Lmax \(dim 2\) <= text_len \+ grid_h \* grid_w = 38, got 41"),
        (dict(position=-1), ValueError, r"position: expected 0 <= position and position \+ n <= Lmax .*got -1"),
        (dict(position=41), ValueError, r"position: expected 0 <= position .*Lmax = 41\), got 41"),
        (dict(position=2.0), TypeError, "position: expected an int or a 0-dim int64 tensor, got float"),
        (dict(position=torch.tensor([3])), TypeError, r"position: expected .* 0-dim int64 tensor, got .*\(1,\)"),
        (dict(position=torch.tensor(3, dtype=torch.int32)), TypeError, "got a torch.int32 tensor"),
        (dict(position=torch.tensor(3, device="meta")), ValueError, "position: expected a tensor on q's device cpu"),
        (dict(scale=float("inf")), ValueError, "scale: expected a finite float"),
        (dict(backend="gpu"), ValueError, "backend: expected one of"),
    ],
)
def test_bad_arguments(change, exc, match):
    q, k, v, kw = _good()
    with pytest.raises(exc, match=match):
        ops.sparse_decode_attention(q, k, v, **(kw | change))


@pytest.mark.parametrize("backend", ["cpp", "triton", "eager"])
def test_bad_position_tensor_value(backend):
    """A CPU position tensor out of range: the backends that read it raise (on CUDA the kernels write NaN)."""
    q, k, v, kw = _good()
    with pytest.raises((ValueError, RuntimeError), match="position: expected 0 <= position"):
        ops.sparse_decode_attention(q, k, v, **(kw | dict(position=torch.tensor(41))), backend=backend)


def test_bad_tensors():
    q, k, v, kw = _good()
    with pytest.raises(ValueError, match=r"k_cache: expected \[B, H, Lmax, D\] with q's B, H, D = \(1, 2, 32\)"):
        ops.sparse_decode_attention(q, k[:, :1], v, **kw)
    with pytest.raises(ValueError, match=r"v_cache: expected the shape of k_cache \(1, 2, 41, 32\)"):
        ops.sparse_decode_attention(q, k, v[:, :, :40], **kw)
    with pytest.raises(TypeError, match="v_cache: expected q's dtype torch.float32, got torch.float16"):
        ops.sparse_decode_attention(q, k, v.half(), **kw)
    with pytest.raises(ValueError, match=r"q: expected 4 dimensions \[B, H, L, D\], got shape \(2, 1, 32\)"):
        ops.sparse_decode_attention(q[0], k, v, **kw)
    with pytest.raises(TypeError, match="q: expected float16, bfloat16, float32 or float64, got torch.int64"):
        ops.sparse_decode_attention(q.long(), k.long(), v.long(), **kw)
    with pytest.raises(ValueError, match="k_cache: expected q's device cpu, got meta"):
        ops.sparse_decode_attention(q, k.to("meta"), v, **kw)
    with pytest.raises(ops.BackendUnavailable, match=r"head sizes \(32, 64, 128\), got 48"):
        q48, k48 = torch.randn(1, 2, 1, 48), torch.randn(1, 2, 41, 48)
        ops.sparse_decode_attention(q48, k48, k48, **kw, backend="cpp")
    with pytest.raises(RuntimeError, match="requires grad, but decoding attention has no backward"):
        ops.sparse_decode_attention(q.requires_grad_(), k, v, **kw)
    with torch.no_grad():  # fine without grad mode
        ops.sparse_decode_attention(q, k, v, **kw)


def test_eager_serves_fp64_and_any_head_size():
    q = torch.randn(1, 2, 1, 48, dtype=torch.float64)
    k, v = torch.randn(2, 1, 2, 41, 48, dtype=torch.float64)
    out = ops.sparse_decode_attention(q, k, v, kind="conv", position=40, text_len=5, grid_size=6)
    assert out.dtype == torch.float64
    oracle, _ = _oracle(q, k, v, "conv", "clipped", 11, 5, (6, 6), 40)
    torch.testing.assert_close(out, oracle, rtol=1e-12, atol=1e-12)


def test_available_backends():
    q = torch.empty(1, 1, 1, 64)
    assert "cpp" in decode_ops.available_backends(q) and "eager" in decode_ops.available_backends(q)
    assert decode_ops.available_backends(torch.empty(1, 1, 1, 48)) == ["eager"]
    interpreter = os.environ.get("TRITON_INTERPRET") == "1"  # conftest sets it unless the run is on cuda
    expected = ["triton", "cpp", "eager"] if interpreter else ["cpp", "eager"]
    assert ops.available_backends("sparse_decode_attention", "cpu") == expected
