"""Cached decoding (dalle_fast.nn.decoding / DALLE.generate) against full recomputation, on every backend.

The cache is checked three ways: teacher-forced logits of every step equal the dense logits of the training
path (within the backend's tolerance); greedy decoding (top_k=1) gives exactly the tokens of uncached full
recomputation and of the dense cache, and each token is the argmax of the full model's logits for the
prefix decoded so far; sampling is a pure function of the seed. Also: image priming, reranking, progress,
bad input.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE_BACKENDS
from test_dalle_model import random_tokens, randomize_, small_config
from tolerances import assert_close

from dalle_fast import ops
from dalle_fast.nn import DALLE, decoding

pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(device, backend, **overrides):
    # D = 32: the smallest head size every kernel backend serves; three layers: row, column, conv. Triton on CPU
    # runs under its interpreter (one program at a time): a 3 x 4 grid keeps it quick.
    if backend == "triton" and device == "cpu":
        overrides = {"grid_h": 3, **overrides}
    c = small_config(n_layers=3, head_dim=32, **overrides)
    return randomize_(DALLE(c, backend=backend, device=device)).eval()


# the torus variant differs only in the key ranges: once per backend outside the interpreter
CASES = [(d, b, v) for d, b in DEVICE_BACKENDS for v in ("clipped", "torus") if (d, b, v) != ("cpu", "triton", "torus")]


@pytest.mark.parametrize("device,backend,conv_variant", CASES)
def test_teacher_forced_step_logits_equal_the_full_model(device, backend, conv_variant):
    m = make_model(device, backend, conv_variant=conv_variant)
    c = m.config
    assert m.layer_kinds == ["row", "column", "conv"]
    text, image = (t.to(device) for t in random_tokens(c, 2))
    with torch.no_grad():
        full = m.logits(text, image[:, :-1])[1]  # [B, H*W, V]: logits for image tokens 0 .. H*W-1
        dec = decoding._Decoder(m, 2, "sparse", device)
        steps = [dec.prefill(text, image[:, :0])]
        for i in range(c.image_len - 1):
            steps.append(dec.step(image[:, i], i))
    assert_close(torch.stack(steps, 1), full, dtype=torch.float32)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_greedy_cached_decoding_equals_full_recomputation(device, backend):
    m = make_model(device, backend)
    c = m.config
    text, _ = (t.to(device) for t in random_tokens(c, 2))
    cached = m.generate(text, num_samples=2, top_k=1, seed=0)
    assert cached.shape == (2, 2, c.grid_h, c.grid_w) and cached.dtype == torch.int64
    if backend != "triton" or device != "cpu":  # (under the interpreter the argmax check below is the same test)
        assert torch.equal(cached, m.generate(text, num_samples=2, top_k=1, seed=0, cache="none"))
        assert torch.equal(cached, m.generate(text, num_samples=2, top_k=1, seed=0, cache="dense"))
    # greedy: every token is the argmax of the full model given the tokens before it (by induction, exactly what
    # uncached recomputation decodes)
    codes = cached[:, 0].flatten(1)
    with torch.no_grad():
        full = m.logits(text, codes[:, :-1])[1]
    assert torch.equal(full.argmax(-1), codes)


def test_same_seed_same_images_and_backends_agree():
    m = make_model("cpu", None)
    text, _ = random_tokens(m.config, 1)
    runs = {b: m.generate(text[0], num_samples=3, seed=11, backend=b) for b in ("cpp", "eager")}
    assert runs["cpp"].shape == (3, m.config.grid_h, m.config.grid_w)
    assert torch.equal(runs["cpp"], runs["eager"])  # fp32 CPU backends: the same images for the same seed
    assert torch.equal(runs["cpp"], m.generate(text[0], num_samples=3, seed=11, backend="cpp"))
    other = m.generate(text[0], num_samples=3, seed=12, backend="cpp")
    assert not torch.equal(other, runs["cpp"])
    assert not torch.equal(runs["cpp"][0], runs["cpp"][1])  # each sample draws its own noise


def test_seed_none_follows_torch_manual_seed():
    m = make_model("cpu", "cpp")
    text, _ = random_tokens(m.config, 1)
    torch.manual_seed(3)
    a = m.generate(text, num_samples=2)
    torch.manual_seed(3)
    assert torch.equal(a, m.generate(text, num_samples=2))


@pytest.mark.parametrize("rows", [1, 3])
def test_image_prefix_is_kept_and_continued_like_the_model(rows):
    m = make_model("cpu", "cpp")
    c = m.config
    text, image = random_tokens(c, 2)
    prefix = image[:, : rows * c.grid_w].view(2, rows, c.grid_w)
    out = m.generate(text, top_k=1, image_prefix=prefix)
    codes = out[:, 0].flatten(1)
    assert torch.equal(codes[:, : rows * c.grid_w], prefix.flatten(1))
    with torch.no_grad():
        full = m.logits(text, codes[:, :-1])[1]
    assert torch.equal(full.argmax(-1)[:, rows * c.grid_w :], codes[:, rows * c.grid_w :])
    # a flat prefix of any length works too, and a [T] caption with an unbatched prefix
    flat = m.generate(text[0], top_k=1, image_prefix=image[0, :5])
    assert torch.equal(flat[0].flatten()[:5], image[0, :5])


def test_temperature_and_filters_reach_the_sampler(monkeypatch):
    m = make_model("cpu", "cpp")
    seen = []
    real = decoding.ops.sample

    def spy(logits, **kw):
        seen.append(kw)
        return real(logits, **kw)

    monkeypatch.setattr(decoding.ops, "sample", spy)
    text, _ = random_tokens(m.config, 1)
    m.generate(text, num_samples=2, temperature=0.7, top_k=5, top_p=0.9, seed=4)
    assert len(seen) == m.config.image_len
    n = 2 * m.config.image_vocab
    assert [kw["offset"] for kw in seen] == [i * n for i in range(m.config.image_len)]  # fresh noise every step
    assert all(kw["temperature"] == 0.7 and kw["top_k"] == 5 and kw["top_p"] == 0.9 and kw["seed"] == 4 for kw in seen)


def test_progress_callback_and_bar(capsys):
    m = make_model("cpu", "cpp")
    text, _ = random_tokens(m.config, 1)
    calls = []
    m.generate(text, progress=lambda done, total: calls.append((done, total)), image_prefix=text.new_zeros(1, 4))
    n = m.config.image_len - 4
    assert calls == [(i + 1, n) for i in range(n)]
    m.generate(text, progress=True)
    assert f"{m.config.image_len}/{m.config.image_len}" in capsys.readouterr().err


def test_rerank_orders_by_the_models_likelihood():
    m = make_model("cpu", "cpp")
    c = m.config
    text, _ = random_tokens(c, 1)
    samples = m.generate(text[0], num_samples=4, seed=2)
    ranked, scores = decoding.rerank(m, text[0], samples)
    with torch.no_grad():
        logits = m.logits(text.expand(4, -1), samples.flatten(1)[:, :-1])[1].double()
    ll = -F.cross_entropy(logits.flatten(0, 1), samples.flatten(), reduction="none").view(4, -1).sum(1)
    order = torch.argsort(ll, descending=True)
    assert torch.equal(ranked, samples[order])
    assert_close(scores.double(), ll[order], dtype=torch.float32)
    # a pluggable scorer: e.g. prefer images with many code-0 tokens
    ranked2, s2 = decoding.rerank(m, text[0], samples, scorer=lambda t, s: (s == 0).flatten(1).sum(1).float())
    assert torch.all(s2[:-1] >= s2[1:])
    with pytest.raises(ValueError, match="scorer: expected scores of shape"):
        decoding.rerank(m, text[0], samples, scorer=lambda t, s: torch.zeros(3))
    with pytest.raises(ValueError, match="samples: expected codes"):
        decoding.rerank(m, text[0], samples.flatten(1))


def _guided_reference(m, text, scale, steps, *, seed=None, greedy=True):
    """Classifier-free guidance by full recomputation, fp64 logits: each step u + scale * (c - u) from the model's
    logits after the caption (c) and after the empty caption (u); greedy (argmax) or ops.sample at the decoder's
    offsets."""
    b, v = text.shape[0], m.config.image_vocab
    null = decoding.null_text(m, b, text.device)
    codes = torch.zeros(b, 0, dtype=torch.int64, device=text.device)
    with torch.no_grad():
        for i in range(steps):
            cond = m.logits(text, codes)[1][:, -1].double()
            uncond = m.logits(null, codes)[1][:, -1].double()
            logits = uncond + scale * (cond - uncond)
            if greedy:
                tok = logits.argmax(-1)
            else:
                tok = ops.sample(logits.float(), seed=seed, offset=i * b * v)
            codes = torch.cat([codes, tok[:, None]], 1)
    return codes


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_guided_greedy_decoding_equals_full_recomputation(device, backend):
    m = make_model(device, backend)
    c = m.config
    text, _ = (t.to(device) for t in random_tokens(c, 3))
    ref = _guided_reference(m, text, 2.5, c.image_len)
    for cache in ("sparse", "none"):
        out = m.generate(text, top_k=1, seed=0, guidance_scale=2.5, cache=cache)
        assert torch.equal(out.flatten(1), ref), cache
    # the scale matters: the unguided argmax differs somewhere on these random weights
    assert not torch.equal(m.generate(text, top_k=1, seed=0).flatten(1), ref)


def test_guided_sampling_follows_the_guided_logits():
    """Sampled (not greedy) guided decoding draws from u + s (c - u) with the decoder's noise offsets; scale 0
    samples the empty caption's images (the unconditional model), scale 1 is the plain decoder."""
    m = make_model("cpu", "eager")
    c = m.config
    text, _ = random_tokens(c, 2)
    for scale in (0.0, 3.0):
        out = m.generate(text, seed=7, guidance_scale=scale)
        assert torch.equal(out.flatten(1), _guided_reference(m, text, scale, c.image_len, seed=7, greedy=False))
    assert torch.equal(m.generate(text, seed=7, guidance_scale=1.0), m.generate(text, seed=7))
    null = decoding.null_text(m, 2)
    assert torch.equal(m.generate(text, seed=7, guidance_scale=0.0), m.generate(null, seed=7))


def test_contrastive_scorer_is_the_captions_posterior():
    m = make_model("cpu", "cpp")
    c = m.config
    text, _ = random_tokens(c, 4)
    caption, negatives = text[0], text[1:]
    samples = m.generate(caption, num_samples=5, seed=3)

    def ll(t):
        with torch.no_grad():
            logits = m.logits(t.expand(5, -1), samples.flatten(1)[:, :-1])[1].double()
        return -F.cross_entropy(logits.flatten(0, 1), samples.flatten(), reduction="none").view(5, -1).sum(1)

    every = torch.stack([ll(t) for t in text])  # [1 + K, S]: the caption first
    want = every[0] - torch.logsumexp(every, 0)
    ranked, scores = decoding.rerank(m, caption, samples, scorer=decoding.contrastive_scorer(m, negatives))
    order = torch.argsort(want, descending=True)
    assert_close(scores.double(), want[order], dtype=torch.float32)
    assert torch.equal(ranked, samples[order]) and bool((scores <= 0).all())
    # negatives from a callable of the caption's tokens
    got = decoding.contrastive_scorer(m, lambda t: negatives if torch.equal(t, caption) else None)(
        caption.expand(5, -1), samples
    )
    assert_close(got.double(), want, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"negatives: expected caption tokens \[K >= 1, 5\], got \(2, 3\)"):
        decoding.contrastive_scorer(m, negatives[:2, :3])(caption.expand(5, -1), samples)


def test_bad_input():
    m = make_model("cpu", "cpp")
    c = m.config
    text, image = random_tokens(c, 1)
    with pytest.raises(ValueError, match="num_samples: expected an integer >= 1, got 0"):
        m.generate(text, num_samples=0)
    with pytest.raises(ValueError, match="temperature: expected a finite number > 0"):
        m.generate(text, temperature=0.0)
    with pytest.raises(ValueError, match="cache: expected one of"):
        m.generate(text, cache="full")
    with pytest.raises(ValueError, match=r"text: expected an int64 tensor \[B, 5\]"):
        m.generate(text[:, :3])
    bad = text.clone()
    bad[0, 1] = c.text_vocab + 3  # the pad of position 3, at position 1: not a valid token there
    with pytest.raises(ValueError, match="text: expected token ids in"):
        m.generate(bad)
    with pytest.raises(ValueError, match="image_prefix: expected"):
        m.generate(text, image_prefix=image)  # all H*W codes: nothing left to generate
    with pytest.raises(ValueError, match="image: expected codes in"):
        m.generate(text, image_prefix=image[:, :3] + c.image_vocab)
    with pytest.raises(TypeError, match="text_tokens: expected an int64 tensor"):
        m.generate([1, 2, 3])
    for bad in (-1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match=f"guidance_scale: expected a finite number >= 0 .*got {bad!r}"):
            m.generate(text, guidance_scale=bad)


def test_fp16_model_decodes_with_the_cache_in_fp16():
    """A float16-compute model (the cache holds fp16 keys/values) still matches its own full recomputation."""
    m = make_model("cpu", "eager")
    m16 = DALLE(dataclasses.replace(m.config), compute_dtype=torch.float16, backend="eager").eval()
    m16.load_state_dict(m.state_dict())
    text, _ = random_tokens(m.config, 1)
    a = m16.generate(text, top_k=1, seed=0)
    b = m16.generate(text, top_k=1, seed=0, cache="none")
    # fp16 rounding may flip a near-tie; the sequences must agree up to the first difference at least 90%
    agree = (a == b).float().mean()
    assert agree > 0.9
