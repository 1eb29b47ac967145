"""The DALL-E transformer (dalle_fast.nn.DALLE) and its loss head (dalle_fast.ops.linear_cross_entropy), on CPU.

Masks: a position's outputs do not change when a token it must not see changes, per layer kind and through the
whole model; loss weighting and normalisation against a hand computation; the chunked loss head against the
dense composition (loss, gradients, what backward keeps); the paper-size model built on the meta device;
activation checkpointing.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE_BACKENDS, KERNEL_DEVICE_BACKENDS
from tolerances import assert_close

from dalle_fast import masks, ops
from dalle_fast.amp import PerResblockGradScaler
from dalle_fast.nn import DALLE, DALLEConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops (conftest.one_thread)


def small_config(**overrides) -> DALLEConfig:
    """A non-square grid (so rows and columns cannot be confused), odd text length, small everything."""
    base = dict(n_layers=1, n_heads=2, head_dim=16, text_len=5, text_vocab=23, grid_h=5, grid_w=4, image_vocab=19,
                conv_kernel=3, loss_chunk=7)  # fmt: skip
    return DALLEConfig(**{**base, **overrides})


def randomize_(model: DALLE) -> DALLE:
    """Parameters of O(1) effect (the default init's 0.02 would make differences tiny); fresh, never zeros."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name:
                p.normal_(0, p.shape[1] ** -0.5)
            elif "emb" in name:
                p.normal_(0, 1)
            elif name.endswith("weight"):  # norm gains
                p.normal_(1, 0.2)
            else:
                p.normal_(0, 0.2)
    return model


def random_tokens(c: DALLEConfig, batch: int, *, n_pads: int = 2):
    """text [B, T] with the last n_pads positions padded (pad j = text_vocab + j), image codes [B, H*W]."""
    text = torch.randint(0, c.text_vocab, (batch, c.text_len))
    pos = torch.arange(c.text_len)
    text = torch.where(pos >= c.text_len - n_pads, c.text_vocab + pos, text)
    image = torch.randint(0, c.image_vocab, (batch, c.image_len))
    return text, image


def position_outputs(model: DALLE, text, image_prefix) -> list[torch.Tensor]:
    """Per input position, its logits (text positions: text vocabulary; from the last text position on: image)."""
    tl, il = model.logits(text, image_prefix)
    return [tl[:, q] for q in range(tl.shape[1])] + [il[:, q] for q in range(il.shape[1])]


def dependence(model: DALLE) -> torch.Tensor:
    """bool [L-1, L-1]: changed[q, k] = changing input token k changes the outputs of position q. One batch:
    row 0 the base sequence, row 1 + k the base with token k replaced."""
    c = model.config
    n = c.seq_len - 1
    text, image = random_tokens(c, 1)
    text, image = text.repeat(n + 1, 1), image[:, :-1].repeat(n + 1, 1)
    for k in range(n):
        if k < c.text_len:  # another real token (a pad becomes a real token, a token another one)
            text[1 + k, k] = (text[0, k] + 1) % c.text_vocab
        else:
            image[1 + k, k - c.text_len] = (image[0, k - c.text_len] + 1) % c.image_vocab
    with torch.no_grad():
        outs = position_outputs(model, text, image)
    changed = torch.zeros(n, n, dtype=torch.bool)
    for q, o in enumerate(outs):
        diff = (o[1:] - o[:1]).abs().amax(dim=1)  # [n] over the perturbed token k
        # Unseen tokens change nothing (exactly 0 on CPU in fp32; 1e-6 relative leaves room for other BLAS);
        # a seen one changes the outputs by far more, even several layers away (>= 1e-5 relative here).
        changed[q] = diff > 1e-6 * o.abs().max()
    return changed


def reach(c: DALLEConfig) -> torch.Tensor:
    """bool [L-1, L-1]: which inputs can influence which outputs through the layer stack (residuals included)."""
    n = c.seq_len - 1
    r = torch.eye(n, dtype=torch.bool)
    for kind in c.kinds:
        m = masks.dense_mask(kind, c.text_len, c.grid_h, c.grid_w, kernel=c.conv_kernel)[:n, :n]
        r = (m.double() @ r.double()) > 0
    return r


# Schedule and presets ------------------------------------------------------------------------------------


def test_presets():
    v1, mid, tiny = DALLEConfig.dalle_v1(), DALLEConfig.mid(), DALLEConfig.tiny()
    assert (v1.n_layers, v1.n_heads, v1.head_dim, v1.d_model) == (64, 62, 64, 3968)
    assert (v1.text_len, v1.text_vocab, v1.grid_h, v1.grid_w, v1.image_vocab) == (256, 16384, 32, 32, 8192)
    assert (v1.conv_kernel, v1.conv_variant, v1.seq_len) == (11, "clipped", 1280)
    assert (v1.text_loss_weight, v1.image_loss_weight) == (1 / 8, 7 / 8)
    assert (mid.n_layers, mid.n_heads, mid.head_dim, mid.d_model, mid.seq_len) == (24, 16, 64, 1024, 1280)
    assert (tiny.n_layers, tiny.d_model, tiny.text_len, tiny.grid_h, tiny.grid_w) == (4, 128, 16, 8, 8)
    assert tiny.image_vocab in (64, 128)
    assert DALLEConfig.from_dict(small_config(layer_kinds=("conv",)).to_dict()) == small_config(layer_kinds=("conv",))
    assert DALLEConfig.tiny(n_layers=2).n_layers == 2


def test_layer_kinds_follow_the_paper_schedule():
    model = DALLE(DALLEConfig.tiny(n_layers=9), backend="eager")
    assert model.layer_kinds == masks.layer_schedule(9)
    assert model.layer_kinds == ["row", "column", "row", "row", "row", "column", "row", "row", "conv"]
    assert len(model.blocks) == 18  # an attention and an MLP resblock per layer
    custom = DALLE(small_config(n_layers=2, layer_kinds=("full", "column")))
    assert custom.layer_kinds == ["full", "column"]


def test_every_attention_call_uses_its_layer_kind(monkeypatch):
    c = DALLEConfig.tiny(n_layers=6)
    model = DALLE(c, backend="eager")
    seen = []
    real = ops.sparse_attention

    def spy(q, k, v, **kw):
        assert q.shape == (1, c.n_heads, c.seq_len - 1, c.head_dim)  # the model reads T + H*W - 1 positions
        seen.append((kw["kind"], kw["text_len"], kw["grid_size"], kw["kernel"], kw["conv_variant"], kw["backend"]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(ops, "sparse_attention", spy)
    text, image = random_tokens(c, 1)
    model(text, image)
    grid = (c.grid_h, c.grid_w)
    assert seen == [(k, c.text_len, grid, c.conv_kernel, "clipped", "eager") for k in masks.layer_schedule(6)]


def test_dalle_v1_on_meta_allocates_nothing():
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    before = rss()
    model = DALLE(DALLEConfig.dalle_v1(), device="meta")
    grown = rss() - before
    assert grown < 256 * 2**20, f"building on meta grew the process by {grown / 2**20:.0f} MiB"
    params = list(model.parameters())
    assert all(p.device.type == "meta" for p in params)
    n = sum(p.numel() for p in params)
    c = model.config
    assert 12.0e9 < n < 12.5e9, n  # the paper's 12B: 12 d^2 L = 12.09B in the resblocks, embeddings and head
    assert sum(p.numel() for blk in model.blocks for p in blk.parameters()) == pytest.approx(12 * 3968**2 * 64, 1e-3)
    assert model.head.weight.shape == (c.text_vocab + c.text_len + c.image_vocab, 3968)
    assert model.text_emb.weight.shape == (16384 + 256, 3968)
    assert all(p.dtype == torch.float32 for p in params)  # fp32 masters; compute dtype is chosen per resblock
    assert model.layer_kinds.count("row") == 47 and model.layer_kinds.count("column") == 16
    assert model.layer_kinds[-1] == "conv"


# What a position may see ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["row", "column", "conv", "full"])
def test_one_layer_sees_exactly_its_mask(kind):
    c = small_config(layer_kinds=(kind,))
    model = randomize_(DALLE(c, backend="eager"))
    n = c.seq_len - 1
    expected = masks.dense_mask(kind, c.text_len, c.grid_h, c.grid_w, kernel=c.conv_kernel)[:n, :n]
    got = dependence(model)
    assert torch.equal(got, expected), f"{kind}: differs at (query, key) {(got != expected).nonzero().tolist()[:8]}"


@pytest.mark.parametrize("kinds", [None, ("column", "conv", "conv")])
def test_whole_model_sees_the_closure_of_its_schedule(kinds):
    # None: the paper's schedule for 2 layers (row, conv). (Row then column already reaches every earlier token.)
    n_layers = 2 if kinds is None else len(kinds)
    c = small_config(n_layers=n_layers, layer_kinds=kinds, grid_h=6, grid_w=5, conv_kernel=3)
    model = randomize_(DALLE(c, backend="eager"))
    expected = reach(c)
    n = expected.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    assert (causal & ~expected).sum() > 100  # the check means something: many earlier tokens are out of reach
    got = dependence(model)
    assert torch.equal(got, expected), f"differs at (query, key) {(got != expected).nonzero().tolist()[:8]}"


# Loss ----------------------------------------------------------------------------------------------------


def hand_loss(model: DALLE, text, image, wt=1 / 8, wi=7 / 8):
    """The loss from dense logits: -log softmax at each target, summed per kind, divided by the token counts."""
    c = model.config
    tl, il = model.logits(text, image[:, :-1])
    t_nll = -(tl.log_softmax(-1).gather(-1, text[:, 1:, None])).sum()
    i_nll = -(il.log_softmax(-1).gather(-1, image[:, :, None])).sum()
    b = text.shape[0]
    t_loss, i_loss = t_nll / (b * (c.text_len - 1)), i_nll / (b * c.image_len)
    return wt * t_loss + wi * i_loss, t_loss, i_loss


@pytest.mark.parametrize("weights", [None, (0.3, 0.5)])
def test_loss_against_hand_computation(weights):
    over = {} if weights is None else {"text_loss_weight": weights[0], "image_loss_weight": weights[1]}
    c = small_config(n_layers=2, **over)
    model = randomize_(DALLE(c, backend="eager"))
    text, image = random_tokens(c, 3)
    out = model(text, image)
    expected = hand_loss(model, text, image, *(weights or (1 / 8, 7 / 8)))
    for got, want in zip(out, expected):
        assert_close(got, want, torch.float32)
    params = [p for p in model.parameters()]
    g = torch.autograd.grad(out.loss, params)
    g_hand = torch.autograd.grad(expected[0], params)
    for a, b in zip(g, g_hand):
        assert_close(a, b, torch.float32, scale=10)
    # normalisation: a batch of copies has the same per-token losses
    doubled = model(text.repeat(2, 1), image.repeat(2, 1))
    for a, b in zip(doubled, out):
        assert_close(a, b, torch.float32)


def test_pads_are_predicted_and_the_last_text_position_predicts_the_first_image_token():
    c = small_config()
    model = randomize_(DALLE(c, backend="eager"))
    text, image = random_tokens(c, 2, n_pads=3)
    tl, il = model.logits(text, image[:, :-1])
    assert tl.shape == (2, c.text_len - 1, c.text_vocab + c.text_len) and tl.dtype == torch.float32
    assert il.shape == (2, c.image_len, c.image_vocab) and il.dtype == torch.float32
    # changing only the first image token changes only the image loss
    other = image.clone()
    other[:, 0] = (other[:, 0] + 1) % c.image_vocab
    a, b = model(text, image), model(text, other)
    assert torch.equal(a.text_loss, b.text_loss) and not torch.equal(a.image_loss, b.image_loss)
    # changing the last pad (a target of the text loss) changes the text loss only
    other = text.clone()
    other[:, -1] = 0
    a, b = model(text, image), model(other, image)
    assert not torch.equal(a.text_loss, b.text_loss)


# The chunked loss head -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk", [1, 7, 37, 100])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_cross_entropy_matches_dense(dtype, chunk, bias):
    n, d, v = 37, 24, 53
    x = torch.randn(d, n, dtype=dtype).t().requires_grad_()  # non-contiguous
    w = torch.randn(v, d, dtype=dtype).requires_grad_()
    b = torch.randn(v, dtype=dtype).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,))
    inputs = [x, w] + ([b] if bias else [])
    got = ops.linear_cross_entropy(x, w, b, t, chunk_size=chunk)
    want = F.cross_entropy(F.linear(x, w, b), t, reduction="sum")
    assert got.dtype == dtype
    assert_close(got, want, dtype, scale=10)
    g_got = torch.autograd.grad(got * 1.7, inputs)
    g_want = torch.autograd.grad(want * 1.7, inputs)
    for a, e in zip(g_got, g_want):
        assert_close(a, e, dtype, scale=10)
    with torch.no_grad():
        assert_close(ops.linear_cross_entropy(x, w, b, t, chunk_size=chunk), want, dtype, scale=10)


def _saved_bytes(fn, inputs) -> int:
    """Bytes of the tensors autograd saves for backward during fn(), not counting the inputs' own storage."""
    own = {t.untyped_storage().data_ptr() for t in inputs}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


def test_linear_cross_entropy_saves_less_than_dense():
    n, d, v = 512, 16, 300
    x = torch.randn(n, d, requires_grad=True)
    w = torch.randn(v, d, requires_grad=True)
    b = torch.randn(v, requires_grad=True)
    t = torch.randint(0, v, (n,))
    chunked = _saved_bytes(lambda: ops.linear_cross_entropy(x, w, b, t, chunk_size=64), (x, w, b, t))
    dense = _saved_bytes(lambda: F.cross_entropy(F.linear(x, w, b), t, reduction="sum"), (x, w, b, t))
    assert dense >= n * v * 4  # the [N, V] fp32 log-softmax
    assert chunked <= (n * d + v * d + v) * 4  # the gradients of x, w and b: the inputs' sizes
    assert chunked < dense / 4


def test_linear_cross_entropy_bad_input():
    x, w, t = torch.randn(5, 4), torch.randn(3, 4), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match="target: expected class ids in \\[0, 3\\), got 3"):
        ops.linear_cross_entropy(x, w, None, torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match="target: expected an int64 tensor \\[5\\]"):
        ops.linear_cross_entropy(x, w, None, t.int())
    with pytest.raises(ValueError, match="weight: expected a tensor \\[V, 4\\]"):
        ops.linear_cross_entropy(x, torch.randn(3, 5), None, t)
    with pytest.raises(ValueError, match="bias: expected a tensor \\[3\\]"):
        ops.linear_cross_entropy(x, w, torch.randn(4), t)
    with pytest.raises(TypeError, match="x: expected float16, bfloat16, float32 or float64, got torch.int32"):
        ops.linear_cross_entropy(x.int(), w.int(), None, t)
    with pytest.raises(TypeError, match="weight: expected x's dtype"):
        ops.linear_cross_entropy(x, w.double(), None, t)
    with pytest.raises(ValueError, match="chunk_size: expected an int >= 1, got 0"):
        ops.linear_cross_entropy(x, w, None, t, chunk_size=0)
    with pytest.raises(ops.BackendUnavailable, match="kernels take float16, bfloat16 or float32"):
        ops.linear_cross_entropy(x.double(), w.double(), None, t, backend="cpp")


# Backends ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_backends_give_the_eager_loss_and_gradients(device, backend):
    # fp32 where the backend serves it (cpu, triton); the cuda kernels run fp16 / bf16 only: bf16 there.
    dtype = torch.bfloat16 if backend == "cuda" else torch.float32
    c = DALLEConfig.tiny(n_layers=3)  # head size 32: the kernels' sizes; row, column, conv
    torch.manual_seed(0)
    ref = randomize_(DALLE(c, compute_dtype=dtype, backend="eager")).to(device)
    model = DALLE(c, compute_dtype=dtype, backend=backend).to(device)
    model.load_state_dict(ref.state_dict())
    text, image = (t.to(device) for t in random_tokens(c, 2, n_pads=5))
    results = []
    for m in (ref, model):
        out = m(text, image)
        out.loss.backward()
        results.append((out, [p.grad for p in m.parameters()]))
    (want, g_want), (got, g_got) = results
    if dtype == torch.float32:
        for a, b in zip(got, want):
            assert_close(a, b, torch.float32, scale=10)
        for a, b in zip(g_got, g_want):
            assert_close(a, b, torch.float32, scale=100)
    else:
        assert abs(got.loss.item() - want.loss.item()) < 1e-2 * want.loss.item()
        for a, b in zip(g_got, g_want):
            assert (a - b).norm() <= 5e-2 * b.norm() + 1e-6


@pytest.mark.parametrize("device,backend", [(d, b) for d, b in KERNEL_DEVICE_BACKENDS if b != "triton"])
def test_compiles_as_one_graph(device, backend):
    # aot_eager: graph capture and the autograd graph (the registered ops are opaque) without codegen time.
    dtype = torch.bfloat16 if backend == "cuda" else torch.float32
    c = DALLEConfig.tiny(n_layers=2)
    model = randomize_(DALLE(c, compute_dtype=dtype, backend=backend)).to(device)
    text, image = (t.to(device) for t in random_tokens(c, 2))
    want = model(text, image)
    g_want = torch.autograd.grad(want.loss, list(model.parameters()))
    got = torch.compile(model, backend="aot_eager", fullgraph=True)(text, image)
    g_got = torch.autograd.grad(got.loss, list(model.parameters()))
    for a, b in zip(got, want):
        assert_close(a, b, torch.float32, scale=10)
    for a, b in zip(g_got, g_want):
        assert_close(a, b, torch.float32, scale=100)


# Checkpointing, precision, bad input ---------------------------------------------------------------------


def test_checkpointing_gives_identical_results():
    c = small_config(n_layers=3)
    model = randomize_(DALLE(c, backend="eager"))
    text, image = random_tokens(c, 2)
    results = []
    for ckpt in (False, True):
        model.checkpoint = ckpt
        model.zero_grad(set_to_none=True)
        out = model(text, image)
        out.loss.backward()
        results.append((out, [p.grad.clone() for p in model.parameters()]))
    (a, ga), (b, gb) = results
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_backend_reaches_every_op():
    model = DALLE(small_config(n_layers=2), backend="eager")
    model.backend = "cpp"
    holders = [m for m in model.modules() if hasattr(m, "backend") and m is not model]
    assert holders and all(m.backend == "cpp" for m in holders)


def test_float64_compute_runs_in_float64():
    c = small_config()
    model = randomize_(DALLE(c, compute_dtype=torch.float64, backend="eager"))
    text, image = random_tokens(c, 1)
    dtypes = []
    handle = model.blocks[0].block.qkv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    out = model(text, image)
    handle.remove()
    assert dtypes == [torch.float64] and out.loss.dtype == torch.float32 and math.isfinite(out.loss.item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_resblocks_keep_fp32_stream_and_parameters(dtype):
    c = small_config(n_layers=2)
    ref = randomize_(DALLE(c, backend="eager"))
    model = DALLE(c, compute_dtype=dtype, backend="eager")
    model.load_state_dict(ref.state_dict())
    text, image = random_tokens(c, 2)
    seen = {}
    hooks = [
        model.blocks[0].register_forward_hook(lambda m, i, o: seen.update(stream=o.dtype)),
        model.blocks[0].block.qkv.register_forward_hook(lambda m, i, o: seen.update(inside=o.dtype)),
    ]
    out = model(text, image)
    for h in hooks:
        h.remove()
    assert seen == {"stream": torch.float32, "inside": dtype}
    assert out.loss.dtype == torch.float32
    want = ref(text, image)
    assert abs(out.loss.item() - want.loss.item()) < 5e-2 * abs(want.loss.item())
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
        assert bool(torch.isfinite(p.grad).all()), name


def test_model_bad_input():
    c = small_config()
    model = DALLE(c, backend="eager")
    text, image = random_tokens(c, 2)
    with pytest.raises(ValueError, match=f"text: expected an int64 tensor \\[B, {c.text_len}\\]"):
        model(text[:, :-1], image)
    with pytest.raises(TypeError, match="text: expected int64 token ids, got torch.int32"):
        model(text.int(), image)
    bad = text.clone()
    bad[1, 1] = c.text_vocab + 3  # the pad of position 3 at position 1
    with pytest.raises(ValueError, match=f"got {c.text_vocab + 3} at batch 1, position 1 \\(its pad is"):
        model(bad, image)
    bad = text.clone()
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="text: expected token ids in"):
        model(bad, image)
    bad = image.clone()
    bad[0, 3] = c.image_vocab
    with pytest.raises(ValueError, match=f"image: expected codes in \\[0, {c.image_vocab}\\), got {c.image_vocab}"):
        model(text, bad)
    with pytest.raises(ValueError, match="image: expected all 20 codes"):
        model(text, image[:, :-1])
    with pytest.raises(ValueError, match="text's batch size 2"):
        model(text, image[:1])
    with pytest.raises(TypeError, match="image: expected an int64 tensor"):
        model(text, image.float())
    model(text, image.view(2, c.grid_h, c.grid_w))  # the grid form is accepted
    with pytest.raises(ValueError, match="n <= 19"):
        model.logits(text, image)
    with pytest.raises(ValueError, match="DALLEConfig: text_len: expected an int >= 2"):
        small_config(text_len=1)
    with pytest.raises(ValueError, match="DALLEConfig: conv_kernel: expected an odd int"):
        small_config(conv_kernel=4)
    with pytest.raises(ValueError, match="DALLEConfig: layer_kinds: expected None or 1 kinds"):
        small_config(layer_kinds=("row", "row"))
    with pytest.raises(TypeError, match="compute_dtype: expected float16"):
        DALLE(c, compute_dtype=torch.int8)
    with pytest.raises(TypeError, match="config: expected a DALLEConfig"):
        DALLE(dataclasses.asdict(c))


# Per-resblock gradient scaling -------------------------------------------------------------------------


def _scaled_pair(c, compute_dtype=torch.float32, checkpoint=False, backend="eager", device="cpu"):
    ref = randomize_(DALLE(c, compute_dtype=compute_dtype, backend="eager"))
    scaler = PerResblockGradScaler(2 * c.n_layers, device=device)
    model = DALLE(c, compute_dtype=compute_dtype, scaler=scaler, backend=backend, checkpoint=checkpoint).to(device)
    model.load_state_dict(ref.state_dict())
    return ref, model, scaler


def test_scaler_gradients_are_the_unscaled_ones():
    c = small_config(n_layers=2)
    ref, model, scaler = _scaled_pair(c)
    assert len(scaler._blocks) == 2 * c.n_layers  # one scale per attention and per MLP resblock
    text, image = random_tokens(c, 2)
    ref(text, image).loss.backward()
    out = model(text, image)
    out.loss.backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.unscale_(opt)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, torch.float32, scale=10)  # scales are powers of two: equal up to rounding
    assert scaler.step(opt)


def test_scaler_with_checkpointing_gives_identical_results():
    c = small_config(n_layers=2)
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)  # the same parameters and tokens for both
        _, model, scaler = _scaled_pair(c, torch.float16, checkpoint=ckpt)
        text, image = random_tokens(c, 2)
        model(text, image).loss.backward()
        results.append(([p.grad.clone() for p in model.parameters()], scaler.found_inf.clone()))
    (ga, fa), (gb, fb) = results
    assert all(torch.equal(x, y) for x, y in zip(ga, gb)) and torch.equal(fa, fb)


@pytest.mark.parametrize("device,backend", [(d, b) for d, b in DEVICE_BACKENDS if b != "triton"])
def test_scaler_skips_a_planted_overflow_and_recovers(device, backend):
    # (triton: covered by the backend parity test; its interpreter is slow)
    c = DALLEConfig.tiny(n_layers=2)
    _, model, scaler = _scaled_pair(c, torch.float16, backend=backend, device=device)
    text, image = (t.to(device) for t in random_tokens(c, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    init = scaler.scales.clone()
    target = model.blocks[3].block.fc  # the MLP resblock of layer 2

    def plant(module, inputs, output):
        output.register_hook(lambda g: g * float("inf"))

    handle = target.register_forward_hook(plant)
    model(text, image).loss.backward()
    handle.remove()
    assert not scaler.step(opt)  # skipped
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert scaler.scales[3] == init[3] * scaler.backoff_factor
    others = [i for i in range(4) if i != 3]
    assert torch.equal(scaler.scales[others], init[others] * scaler.growth_factor)  # filtered: no other block hit
    opt.zero_grad()
    model(text, image).loss.backward()
    assert scaler.step(opt)  # the next step applies
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
