"""decode_step: one decoding step of the whole transformer in one call (cpp), against the op-by-op eager step in
fp64 on the same weights, for every mask kind, both cache modes, positions in the text, at the first image
token, at row starts and ends and at the last position; the cache rows it writes; the packed weights; GELU's
erf at the extremes; non-contiguous inputs; DALLE.generate using it; bad input.
"""

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close

from dalle_fast import ops
from dalle_fast.ops import fused_step

pytestmark = pytest.mark.usefixtures("one_thread")

# (kinds of the attention layers, conv_variant, kernel, text_len, (grid_h, grid_w))
LAYOUTS = [
    (("row", "column", "conv"), "clipped", 3, 5, (5, 7)),
    (("full", "conv"), "torus", 3, 4, (4, 6)),
    (("conv",), "torus", 5, 0, (4, 4)),  # the window covers the grid; no text
]
LAYOUT_IDS = ["row-column-conv3", "full-torus3", "torus5-notext"]


def _blocks(kinds, d, hidden, vocab, dtype=torch.float32):
    """Attention + MLP per kind, fresh weights of O(1) effect, never zeros."""

    def lin(n, k):
        return torch.randn(n, k, dtype=dtype) * k**-0.5, torch.randn(n, dtype=dtype) * 0.2

    def norm():
        return torch.randn(d, dtype=dtype) * 0.2 + 1, torch.randn(d, dtype=dtype) * 0.2

    blocks = []
    for kind in kinds:
        blocks.append(ops.DecodeBlock(kind, *norm(), 1e-5, *lin(3 * d, d), *lin(d, d)))
        blocks.append(ops.DecodeBlock(None, *norm(), 1e-5, *lin(hidden, d), *lin(d, hidden)))
    head = ops.DecodeHead(*norm(), 1e-5, *lin(vocab, d))
    return blocks, head


def _as(blocks, head, dtype):
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return [ops.DecodeBlock(*map(cast, b)) for b in blocks], ops.DecodeHead(*map(cast, head))


def _positions(text_len, grid):
    gh, gw = grid
    last = text_len + gh * gw - 1
    ps = {max(text_len - 1, 0), text_len, text_len + gw - 1, text_len + gw, text_len + 2 * gw - 1, last}
    ps.add(int(torch.randint(0, last + 1, ())))
    return sorted(ps)


def _caches(n_attn, b, lmax, h, dh, dtype):
    return [torch.randn(b, lmax, h, dh, dtype=dtype) for _ in range(n_attn)], [
        torch.randn(b, lmax, h, dh, dtype=dtype) for _ in range(n_attn)
    ]


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
@pytest.mark.parametrize("kinds,variant,kernel,text_len,grid", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("batch", [1, 6])
def test_cpp_equals_the_fp64_op_by_op_step(kinds, variant, kernel, text_len, grid, dense, batch):
    h, dh, hidden, vocab = 2, 32, 80, 37  # hidden, vocab: not multiples of the kernel's 16-column panels
    d = h * dh
    blocks, head = _blocks(kinds, d, hidden, vocab)
    lmax = text_len + grid[0] * grid[1]
    kw = {"n_heads": h, "text_len": text_len, "grid_size": grid, "kernel": kernel, "conv_variant": variant}
    for pos in _positions(text_len, grid):
        kc, vc = _caches(len(kinds), batch, lmax, h, dh, torch.float32)
        k64, v64 = [c.double() for c in kc], [c.double() for c in vc]
        for c in kc + vc:  # rows after the position: never read (dense included: it reads up to the position)
            c[:, pos + 1 :] = float("nan")
        x = torch.randn(batch, d)
        got = ops.decode_step(x, pos, blocks, head, kc, vc, dense=dense, backend="cpp", **kw)
        b64, h64 = _as(blocks, head, torch.float64)
        want = ops.decode_step(x.double(), pos, b64, h64, k64, v64, backend="eager", **kw)
        assert got.shape == (batch, vocab) and got.dtype == torch.float32
        assert_close(got, want, dtype=torch.float32, scale=10)
        for mine, ref in zip(kc + vc, k64 + v64):  # the row written at the position, nothing else touched
            assert_close(mine[:, pos], ref[:, pos], dtype=torch.float32)
            assert mine[:, pos + 1 :].isnan().all()


def test_fp32_eager_and_cpp_agree_on_the_caches_and_logits():
    blocks, head = _blocks(("row", "column"), 64, 256, 19)
    kw = {"n_heads": 2, "text_len": 3, "grid_size": (3, 5)}
    kc, vc = _caches(2, 3, 17, 2, 32, torch.float32)
    kc2, vc2 = [c.clone() for c in kc], [c.clone() for c in vc]
    x = torch.randn(3, 64)
    a = ops.decode_step(x, 12, blocks, head, kc, vc, backend="cpp", **kw)
    b = ops.decode_step(x, 12, blocks, head, kc2, vc2, backend="eager", **kw)
    assert_close(a, b, scale=10)
    for c1, c2 in zip(kc + vc, kc2 + vc2):
        assert_close(c1, c2)


def test_non_contiguous_inputs():
    blocks, head = _blocks(("row",), 64, 128, 21)
    # weights as transposed views, a strided x, caches sliced out of a longer buffer
    blocks = [b._replace(in_weight=b.in_weight.t().contiguous().t(), out_weight=b.out_weight.t().contiguous().t())
              for b in blocks]  # fmt: skip
    assert not blocks[0].in_weight.is_contiguous()
    kw = {"n_heads": 2, "text_len": 2, "grid_size": (3, 3)}
    big = [torch.randn(2, 15, 2, 32) for _ in range(2)]
    kc, vc = [big[0][:, 2:13]], [big[1][:, 2:13]]
    assert not kc[0].is_contiguous()
    x = torch.randn(2, 128)[:, ::2]
    ref_k, ref_v = [kc[0].clone()], [vc[0].clone()]
    got = ops.decode_step(x, 9, blocks, head, kc, vc, backend="cpp", **kw)
    want = ops.decode_step(x.contiguous(), 9, blocks, head, ref_k, ref_v, backend="eager", **kw)
    assert_close(got, want, scale=10)
    assert_close(kc[0], ref_k[0])


def test_pack_weight_layout():
    w = torch.randn(37, 5)
    p = fused_step.pack_weight(w)
    assert p.shape == (3, 5, 16)
    for n in range(37):
        assert torch.equal(p[n // 16, :, n % 16], w[n])
    assert (p[2, :, 5:] == 0).all()


def test_gelu_matches_torch_over_the_range():
    # one MLP whose fc and out are the identity and whose norm gain is 8: the step's GELU sees values from about
    # -14 to 14 (past the erf approximation's clamp at 4 / sqrt(1/2)), the head reads x + gelu(8 norm(x))
    d = 32
    eye, zero = torch.eye(d), torch.zeros(d)
    blocks = [ops.DecodeBlock(None, torch.full((d,), 8.0), zero, 1e-5, eye, zero, eye, zero)]
    head = ops.DecodeHead(torch.ones(d), zero, 1e-5, eye, zero)
    x = torch.randn(31, d) * torch.linspace(0.1, 3, 31)[:, None]
    got = ops.decode_step(x, 0, blocks, head, [], [], backend="cpp", n_heads=1, text_len=1, grid_size=1)
    h = 8 * F.layer_norm(x.double(), (d,), eps=1e-5)
    assert h.min() < -8 and h.max() > 8
    want = F.layer_norm(x.double() + F.gelu(h), (d,), eps=1e-5)
    assert_close(got, want, dtype=torch.float32, scale=4)


def test_generate_runs_the_fused_step_and_matches_the_op_by_op_step(monkeypatch):
    from test_dalle_model import random_tokens, randomize_, small_config

    from dalle_fast.nn import DALLE, decoding

    m = randomize_(DALLE(small_config(n_layers=3, head_dim=32), device="cpu")).eval()
    c = m.config
    text, image = random_tokens(c, 3)
    with torch.no_grad():
        dec = decoding._Decoder(m, 3, "sparse", torch.device("cpu"))
        dec.prefill(text, image[:, :2])
        fused = dec.step(image[:, 2], 2)
        assert dec.fused is not None
        monkeypatch.setattr(decoding, "FUSE_CPU_STEP", False)
        plain = decoding._Decoder(m, 3, "sparse", torch.device("cpu"))
        plain.prefill(text, image[:, :2])
        op_by_op = plain.step(image[:, 2], 2)
        assert plain.fused is None
    assert_close(fused, op_by_op, scale=10)
    a = m.generate(text, top_k=1)
    monkeypatch.setattr(decoding, "FUSE_CPU_STEP", True)
    assert torch.equal(a, m.generate(text, top_k=1))


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_generate_keeps_the_op_by_op_step_for_other_backends(backend, monkeypatch):
    from test_dalle_model import random_tokens, randomize_, small_config

    from dalle_fast.nn import DALLE, decoding

    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    m = randomize_(DALLE(small_config(n_layers=1, head_dim=32, grid_h=2), backend=backend, device="cpu")).eval()
    text, image = random_tokens(m.config, 1)
    with torch.no_grad():
        dec = decoding._Decoder(m, 1, "sparse", torch.device("cpu"))
        dec.prefill(text, image[:, :1])
        dec.step(image[:, 1], 1)
    assert dec.fused is None


def test_bad_input():
    blocks, head = _blocks(("row",), 64, 128, 21)
    kc, vc = _caches(1, 2, 11, 2, 32, torch.float32)
    kw = {"n_heads": 2, "text_len": 2, "grid_size": (3, 3)}
    x = torch.randn(2, 64)
    with pytest.raises(TypeError, match="blocks: expected a sequence of DecodeBlock"):
        ops.decode_step(x, 3, [tuple(blocks[0])], head, kc, vc, **kw)
    with pytest.raises(TypeError, match="head: expected a DecodeHead"):
        ops.decode_step(x, 3, blocks, tuple(head), kc, vc, **kw)
    bad = [blocks[0]._replace(in_weight=torch.randn(3 * 64, 65)), blocks[1]]
    with pytest.raises(ValueError, match=r"blocks\[0\].in_weight: expected shape \(192, 64\), got \(192, 65\)"):
        ops.decode_step(x, 3, bad, head, kc, vc, **kw)
    bad = [blocks[0]._replace(out_bias=blocks[0].out_bias.double()), blocks[1]]
    with pytest.raises(TypeError, match=r"blocks\[0\].out_bias: expected .*float32, got torch.float64"):
        ops.decode_step(x, 3, bad, head, kc, vc, **kw)
    with pytest.raises(ValueError, match=r"blocks\[0\].norm_eps: expected a finite float > 0, got 0"):
        ops.decode_step(x, 3, [blocks[0]._replace(norm_eps=0), blocks[1]], head, kc, vc, **kw)
    with pytest.raises(ValueError, match="kind"):
        ops.decode_step(x, 3, [blocks[0]._replace(kind="diagonal"), blocks[1]], head, kc, vc, **kw)
    with pytest.raises(ValueError, match=r"k_caches: expected a list of 1 caches \(one per attention block\), got 2"):
        ops.decode_step(x, 3, blocks, head, kc * 2, vc, **kw)
    with pytest.raises(ValueError, match=r"v_caches\[0\]: expected a tensor \[B, Lmax, H, D\] with H, D = 2, 32"):
        ops.decode_step(x, 3, blocks, head, kc, [vc[0].transpose(1, 2)], **kw)
    with pytest.raises(ValueError, match=r"Lmax <= text_len \+ grid_h \* grid_w = 11, got 12"):
        k12, v12 = _caches(1, 2, 12, 2, 32, torch.float32)
        ops.decode_step(x, 3, blocks, head, k12, v12, **kw)
    with pytest.raises(ValueError, match=r"position: expected 0 <= position < Lmax = 11, got 11"):
        ops.decode_step(x, 11, blocks, head, kc, vc, **kw)
    with pytest.raises(TypeError, match="position: expected an int, got Tensor"):
        ops.decode_step(x, torch.tensor(3), blocks, head, kc, vc, **kw)
    with pytest.raises(ValueError, match=r"x: expected a torch.float32 tensor \[B, 64\] on cpu, got torch.float64"):
        ops.decode_step(x.double(), 3, blocks, head, kc, vc, **kw)
    with pytest.raises(ValueError, match="x: expected the caches' batch 2 rows, got 3"):
        ops.decode_step(torch.randn(3, 64), 3, blocks, head, kc, vc, **kw)
    with pytest.raises(ValueError, match="n_heads: expected a positive divisor of d_model = 64, got 3"):
        ops.decode_step(x, 3, blocks, head, kc, vc, **{**kw, "n_heads": 3})
    b16, h16 = _as(blocks, head, torch.float16)
    k16, v16 = [c.half() for c in kc], [c.half() for c in vc]
    with pytest.raises(ops.BackendUnavailable, match="the cpp kernel takes float32, got torch.float16"):
        ops.decode_step(x.half(), 3, b16, h16, k16, v16, backend="cpp", **kw)
    with pytest.raises(ops.BackendUnavailable, match="decode_step has no cuda kernel"):
        ops.decode_step(x, 3, blocks, head, kc, vc, backend="cuda", **kw)
    w = blocks[0].in_weight.requires_grad_()
    with pytest.raises(RuntimeError, match="decode_step has no backward"):
        ops.decode_step(x, 3, [blocks[0]._replace(in_weight=w), blocks[1]], head, kc, vc, **kw)


def test_the_kernel_checks_what_it_reads():
    # the registered op called directly, past the Python checks: its own messages name the argument
    blocks, head = _blocks(("row",), 64, 128, 21)
    kc, vc = _caches(1, 2, 11, 2, 32, torch.float32)
    f = ops.bind_decode_step(blocks, head, kc, vc, n_heads=2, text_len=2, grid_size=(3, 3), backend="cpp")
    f(torch.randn(2, 64), 4)  # fine
    op = torch.ops.dalle_fast.decode_step
    params = [torch.zeros(1)] * 16
    with pytest.raises(RuntimeError, match="decode_step: params: expected 6 per block and 4 for the head = 16"):
        op(torch.randn(2, 64), params[:15], kc, vc, 4, [1, -1], [1e-5] * 3, 2, 2, 3, 3, 11, False, False)
    with pytest.raises(RuntimeError, match=r"decode_step: block 0: expected norm gain and bias of 64 elements"):
        op(torch.randn(2, 64), params, kc, vc, 4, [1, -1], [1e-5] * 3, 2, 2, 3, 3, 11, False, False)


def test_opcheck_schema_and_fake():
    blocks, head = _blocks(("row",), 64, 128, 21)
    kc, vc = _caches(1, 2, 11, 2, 32, torch.float32)
    pack = fused_step.pack_weight
    params = [t for b in blocks for t in (b.norm_weight, b.norm_bias, pack(b.in_weight), b.in_bias, pack(b.out_weight),
                                          b.out_bias)]  # fmt: skip
    params += [head.norm_weight, head.norm_bias, pack(head.weight), head.bias]
    args = (torch.randn(2, 64), params, kc, vc, 4, [1, -1], [1e-5] * 3, 2, 2, 3, 3, 11, False, False)
    torch.library.opcheck(torch.ops.dalle_fast.decode_step.default, args, test_utils=("test_schema", "test_faketensor"))
