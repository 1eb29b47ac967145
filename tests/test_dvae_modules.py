"""The dVAE modules: parity with OpenAI's `dall-e` package, the safe loader, DiscreteVAE and its losses, bad input."""

import math
import os
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES
from tolerances import assert_close

import dalle_fast.nn as dn
from dalle_fast import reference as R

try:  # a test-only dependency that scripts/install.sh installs: its absence must fail, never skip
    import dall_e
except ImportError as e:
    raise ImportError("the official dVAE package is needed: pip install --no-deps dall-e attrs requests") from e


pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops (conftest.one_thread)


# (encoder and decoder settings shared by both, decoder's n_init, input height x width)
SETTINGS = [
    (dict(n_hid=64, n_blk_per_group=1, vocab_size=512), 8, (16, 16)),
    (dict(n_hid=64, n_blk_per_group=2, input_channels=1, vocab_size=600), 24, (8, 24)),
    (dict(n_hid=68, n_blk_per_group=3, input_channels=4, vocab_size=513), 9, (8, 8)),
    (dict(), 128, (8, 8)),  # the official defaults: 53.8 M + 43.8 M parameters
]
IDS = ["small", "one-channel", "odd-widths", "official-size"]


def _enc_kwargs(kw):
    return {k: v for k, v in kw.items() if k != "output_channels"}


def _dec_kwargs(kw, n_init):
    out = {k: v for k, v in kw.items() if k != "input_channels"}
    if "input_channels" in kw:
        out["output_channels"] = kw["input_channels"]
    return dict(out, n_init=n_init)


def _official_pair(kw, n_init, device="cpu"):
    dev = torch.device(device)
    return (
        dall_e.Encoder(**_enc_kwargs(kw), device=dev),
        dall_e.Decoder(**_dec_kwargs(kw, n_init), device=dev),
    )


def _one_hots(batch, vocab, h, w, device="cpu"):
    idx = torch.randint(0, vocab, (batch, h, w), device=device)
    return idx, F.one_hot(idx, vocab).permute(0, 3, 1, 2).float()


# Official parity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kw,n_init,hw", SETTINGS, ids=IDS)
def test_official_parity(kw, n_init, hw, device):
    off_enc, off_dec = _official_pair(kw, n_init, device)
    # Random biases too: the official init leaves them zero, which would hide a misplaced bias.
    with torch.no_grad():
        for p in list(off_enc.parameters()) + list(off_dec.parameters()):
            if p.dim() == 1:
                p.normal_(std=0.1)
    enc = dn.Encoder(4, **_enc_kwargs(kw), device=device)
    dec = dn.Decoder(4, **_dec_kwargs(kw, n_init), device=device)
    enc.load_state_dict(off_enc.state_dict(), strict=True)
    dec.load_state_dict(off_dec.state_dict(), strict=True)
    # ...and the other way: the same names and shapes, nothing more.
    off_enc.load_state_dict(enc.state_dict(), strict=True)
    off_dec.load_state_dict(dec.state_dict(), strict=True)

    channels = kw.get("input_channels", 3)
    x = dall_e.map_pixels(torch.rand(2, channels, *hw, device=device))
    vocab = kw.get("vocab_size", 8192)
    _, z = _one_hots(2, vocab, hw[0] // 8, hw[1] // 8, device)
    with torch.no_grad():
        want_logits, got_logits = off_enc(x), enc(x)
        want_stats, got_stats = off_dec(z), dec(z)
    # fp32 on CPU; on CUDA both run the official fp16 pattern (fp32 logits, fp16 decoder output).
    assert got_logits.dtype == want_logits.dtype == torch.float32
    assert got_stats.dtype == want_stats.dtype
    assert got_stats.shape == (2, 2 * channels, *hw)
    assert_close(got_logits, want_logits, dtype=torch.float32 if device == "cpu" else torch.float16)
    assert_close(got_stats, want_stats)


def test_default_parameter_counts():
    enc, dec = dn.Encoder(device="meta"), dn.Decoder(device="meta")
    n_enc = sum(p.numel() for p in enc.parameters())
    n_dec = sum(p.numel() for p in dec.parameters())
    assert round(n_enc / 1e6, 2) == 53.79 and round(n_dec / 1e6, 2) == 43.83
    assert dec.codebook.w.shape == (128, 8192, 1, 1)


def test_official_init_and_requires_grad():
    enc = dn.Encoder(n_hid=8, n_blk_per_group=1, vocab_size=16)
    w = enc.blocks.input.w
    assert w.requires_grad and enc.blocks.input.b.abs().sum() == 0
    assert abs(w.std().item() - 1 / math.sqrt(3 * 49)) < 0.2 / math.sqrt(3 * 49)
    frozen = dn.Decoder(n_init=8, n_hid=8, vocab_size=16, requires_grad=False)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_group_count_generalises():
    enc = dn.Encoder(group_count=3, n_hid=8, n_blk_per_group=1, vocab_size=32)
    dec = dn.Decoder(group_count=3, n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=32)
    vae = dn.DiscreteVAE(enc, dec)
    assert vae.downsample_factor == 4
    x = torch.rand(1, 3, 12, 8)
    assert vae.encode(x).shape == (1, 32, 3, 2)
    assert vae.decode(vae.get_codebook_indices(x)).shape == (1, 3, 12, 8)


def test_map_unmap_pixels():
    x = torch.rand(2, 3, 5, 7)
    m = dn.map_pixels(x)
    torch.testing.assert_close(m, dall_e.map_pixels(x))
    assert 0.1 <= m.min() and m.max() <= 0.9
    torch.testing.assert_close(dn.unmap_pixels(m), x)
    torch.testing.assert_close(dn.unmap_pixels(m), dall_e.unmap_pixels(m))
    assert dn.unmap_pixels(torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)).flatten().tolist() == [0.0, 1.0]  # clamped
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        dn.map_pixels(torch.rand(3, 5, 7))
    with pytest.raises(TypeError, match="x: expected a floating-point tensor, got torch.uint8"):
        dn.map_pixels(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


# The loader --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_loader_reads_official_pickles(tmp_path, zip_format):
    kw, n_init, hw = SETTINGS[1]
    off_enc, off_dec = _official_pair(kw, n_init)
    enc_path, dec_path = tmp_path / "encoder.pkl", tmp_path / "decoder.pkl"
    torch.save(off_enc, enc_path, _use_new_zipfile_serialization=zip_format)
    torch.save(off_dec, dec_path, _use_new_zipfile_serialization=zip_format)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        vae = dn.load_openai_dvae(enc_path, dec_path)
    assert isinstance(vae, dn.DiscreteVAE) and vae.encoder.n_blk_per_group == 2 and vae.decoder.n_init == n_init
    assert vae.channels == 1 and vae.vocab_size == 600
    x = dall_e.map_pixels(torch.rand(2, 1, *hw))
    idx, z = _one_hots(2, 600, hw[0] // 8, hw[1] // 8)
    with torch.no_grad():
        assert torch.equal(vae.encoder(x), off_enc(x))
        assert torch.equal(vae.decoder(z), off_dec(z))
        torch.testing.assert_close(vae.decode_stats(idx), off_dec(z), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="encoder_path: .* holds a decoder"):
        dn.load_openai_dvae(dec_path, enc_path)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_loader_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    # A torch.save'd file whose pickle calls os.system, in both formats, and a bare pickle.
    for i, zip_format in enumerate([True, False]):
        path = tmp_path / f"evil{i}.pkl"
        torch.save({"model": _Payload(marker)}, path, _use_new_zipfile_serialization=zip_format)
        with pytest.raises(dn.UnsafePickleError, match=r"refusing to load global (posix|os)\.system"):
            dn.load_openai_module(path)
    path = tmp_path / "bare.pkl"
    path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    with pytest.raises(dn.UnsafePickleError, match="refusing to load global"):
        dn.load_openai_module(path)
    assert not marker.exists()

    # An allowed module class called (REDUCE) instead of rebuilt (NEWOBJ + BUILD): its stand-in refuses.
    path.write_bytes(b"\x80\x02cdall_e.encoder\nEncoder\n)R.")
    with pytest.raises(dn.UnsafePickleError, match="dall_e.encoder.Encoder: the checkpoint calls the module class"):
        dn.load_openai_module(path)

    # An official module carrying a hook: the hook's function is not on the list.
    kw, n_init, _ = SETTINGS[0]
    off_enc, _ = _official_pair(kw, n_init)
    off_enc.register_forward_hook(print)
    path = tmp_path / "hooked.pkl"
    torch.save(off_enc, path)
    with pytest.raises(dn.UnsafePickleError, match="refusing to load global builtins.print"):
        dn.load_openai_module(path)

    # A module the official files never contain.
    path = tmp_path / "linear.pkl"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(dn.UnsafePickleError, match="torch.nn.modules.linear.Linear"):
        dn.load_openai_module(path)

    # Allowed globals in the wrong shape: a state dict instead of a module.
    path = tmp_path / "state_dict.pkl"
    torch.save(off_enc.state_dict(), path)
    with pytest.raises(dn.UnsafePickleError, match="expected a pickled dall_e Encoder or Decoder, got OrderedDict"):
        dn.load_openai_module(path)

    # A TorchScript archive (torch.load would hand it to torch.jit.load).
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, the files still exist
        torch.jit.save(torch.jit.script(torch.nn.ReLU()), path)
    with pytest.raises(dn.UnsafePickleError, match="TorchScript"):
        dn.load_openai_module(path)

    with pytest.raises(FileNotFoundError, match="path: no such file"):
        dn.load_openai_module(tmp_path / "missing.pkl")


def test_loader_refuses_a_tampered_architecture(tmp_path):
    kw, n_init, _ = SETTINGS[0]
    off_enc, _ = _official_pair(kw, n_init)
    off_enc.blocks.group_1.pool = off_enc.blocks.output.relu  # a ReLU where the max-pool belongs
    path = tmp_path / "tampered.pkl"
    torch.save(off_enc, path)
    with pytest.raises(dn.UnsafePickleError, match="module tree differs"):
        dn.load_openai_module(path)


# DiscreteVAE and the reference losses ------------------------------------------------------------------


def _tiny_vae(vocab=32, channels=3):
    enc = dn.Encoder(n_hid=8, n_blk_per_group=1, input_channels=channels, vocab_size=vocab)
    dec = dn.Decoder(n_init=8, n_hid=8, n_blk_per_group=1, output_channels=channels, vocab_size=vocab)
    return dn.DiscreteVAE(enc, dec)


@pytest.mark.parametrize("hard", [False, True])
def test_discrete_vae_forward_matches_the_reference_composition(hard):
    vae = _tiny_vae()
    x = torch.rand(2, 3, 16, 24)
    tau, beta, seed = 0.7, 2.5, 1234
    out = vae(x, tau=tau, beta=beta, seed=seed, hard=hard)
    out.loss.backward()
    got_grads = [p.grad.clone() for p in vae.parameters()]
    vae.zero_grad()

    xm = dn.map_pixels(x)
    logits = vae.encoder(xm)
    cb = vae.decoder.codebook
    h = R.gumbel_quantize(logits, cb.w, cb.b, tau=tau, hard=hard, seed=seed)
    stats = vae.decoder.forward_embedded(h)
    nll = R.logit_laplace_nll(xm, stats[:, :3], stats[:, 3:])
    kl = R.categorical_kl_uniform(logits)
    loss = nll + beta * kl * (2 * 3) / (3 * 16 * 24)  # 2x3 code positions per 16x24x3 subpixels
    loss.backward()
    assert_close(out.logits, logits)
    assert_close(out.stats, stats)
    assert_close(out.kl, kl)
    assert_close(out.recon_nll, nll)
    assert_close(out.loss, loss)
    for got, p in zip(got_grads, vae.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)
    # The KL term is the categorical KL of the encoder logits, normalised as the paper's beta / 192 at 256^2.
    assert out.logits.shape == (2, 32, 2, 3) and out.stats.shape == (2, 6, 16, 24)


def test_gumbel_quantize_reference():
    logits = torch.randn(2, 37, 3, 5, dtype=torch.float64)
    weight = torch.randn(11, 37, 1, 1, dtype=torch.float64)
    bias = torch.randn(11, dtype=torch.float64)
    for hard in (False, True):
        got = R.gumbel_quantize(logits, weight, bias, tau=0.5, hard=hard, seed=9, offset=3)
        y = R.gumbel_softmax(logits, 0.5, hard, 1, 9, 3)
        torch.testing.assert_close(got, F.conv2d(y, weight, bias))
        torch.testing.assert_close(
            got, R.gumbel_quantize(logits, weight[:, :, 0, 0], bias, tau=0.5, hard=hard, seed=9, offset=3)
        )
    # The wrapper DiscreteVAE uses equals the reference on the default backend (fp32).
    from dalle_fast.nn.dvae import _gumbel_quantize

    lf, wf, bf = logits.float(), weight.float(), bias.float()
    assert_close(_gumbel_quantize(lf, wf, bf, tau=0.5, hard=False, seed=9, offset=3),
                 R.gumbel_quantize(lf, wf, bf, tau=0.5, hard=False, seed=9, offset=3), scale=10)  # fmt: skip
    assert R.gumbel_quantize(logits, weight, None, tau=1.0, hard=True, seed=1).shape == (2, 11, 3, 5)


def test_logit_laplace_nll_reference():
    x = torch.rand(4, 3, 5, 6, dtype=torch.float64) * 0.8 + 0.1
    mu, log_b = torch.randn_like(x), torch.randn_like(x) * 0.5
    got = R.logit_laplace_nll(x, mu, log_b, reduction="none")
    laplace = torch.distributions.Laplace(mu, log_b.exp())
    want = -laplace.log_prob(torch.logit(x)) + torch.log(x * (1 - x))  # change of variables y = logit(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(R.logit_laplace_nll(x, mu, log_b), want.mean())
    torch.testing.assert_close(R.logit_laplace_nll(x, mu, log_b, reduction="sum"), want.sum())
    assert R.logit_laplace_nll(x.float(), mu.float(), log_b.float()).dtype == torch.float32
    # A density on (0, 1): it integrates to 1.
    grid = torch.linspace(1e-7, 1 - 1e-7, 400001, dtype=torch.float64)
    dens = torch.exp(-R.logit_laplace_nll(grid, torch.full_like(grid, 0.3), torch.full_like(grid, -1.0), "none"))
    assert abs(torch.trapezoid(dens, grid).item() - 1) < 1e-3
    with pytest.raises(ValueError, match="reduction: expected one of"):
        R.logit_laplace_nll(x, mu, log_b, reduction="avg")


def test_categorical_kl_uniform_reference():
    logits = torch.randn(3, 17, 4, 2, dtype=torch.float64) * 3
    got = R.categorical_kl_uniform(logits, dim=1, reduction="none")
    q = torch.distributions.Categorical(logits=logits.movedim(1, -1))
    u = torch.distributions.Categorical(logits=torch.zeros_like(logits.movedim(1, -1)))
    want = torch.distributions.kl_divergence(q, u)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(R.categorical_kl_uniform(logits), want.mean())
    torch.testing.assert_close(R.categorical_kl_uniform(logits, 1, "sum"), want.sum())
    torch.testing.assert_close(R.categorical_kl_uniform(logits.movedim(1, -1), dim=-1, reduction="none"), want)
    assert R.categorical_kl_uniform(torch.zeros(2, 9, 3)).abs().item() < 1e-6  # uniform: no divergence


def test_codebook_indices_and_decode():
    vae = _tiny_vae(vocab=40)
    x = torch.rand(2, 3, 16, 8)
    idx = vae.get_codebook_indices(x)
    assert idx.dtype == torch.int64 and idx.shape == (2, 2, 1)
    assert torch.equal(idx, vae.encode(x).argmax(1))
    with torch.no_grad():
        stats = vae.decoder(F.one_hot(idx, 40).permute(0, 3, 1, 2).float())
    torch.testing.assert_close(vae.decode_stats(idx), stats, rtol=1e-5, atol=1e-6)
    img = vae.decode(idx.int())
    torch.testing.assert_close(img, dn.unmap_pixels(torch.sigmoid(stats[:, :3])), rtol=1e-5, atol=1e-6)
    assert 0 <= img.min() and img.max() <= 1


# Bad input ---------------------------------------------------------------------------------------------


def test_bad_input():
    vae = _tiny_vae()
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="x: expected 3 channels, got 4"):
        vae(torch.rand(1, 4, 16, 16), tau=1.0, beta=1.0)
    with pytest.raises(ValueError, match="x: expected 3 channels, got 1"):
        vae.encoder(torch.rand(1, 1, 16, 16))
    with pytest.raises(TypeError, match="x: expected a floating-point tensor, got torch.uint8"):
        vae.encode((x * 255).to(torch.uint8))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got ndarray"):
        vae.encode(x.numpy())
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        vae.encode(x[0])
    for bad, what in [
        (float("nan"), "1 non-finite and 0"),
        (float("inf"), "1 non-finite and 0"),
        (1.5, "0 non-finite and 1"),
    ]:
        y = x.clone()
        y[0, 1, 2, 3] = bad
        with pytest.raises(ValueError, match=f"x: expected finite pixel values in \\[0, 1\\], found {what}"):
            vae(y, tau=1.0, beta=1.0)
    with pytest.raises(ValueError, match="x: expected height and width divisible by 8, got 12x16"):
        vae.encode(torch.rand(1, 3, 12, 16))
    with pytest.raises(ValueError, match="x: expected height and width divisible by 8, got 16x20"):
        vae.encoder(torch.rand(1, 3, 16, 20))
    with pytest.raises(ValueError, match="z: expected 32 channels"):
        vae.decoder(torch.rand(1, 31, 2, 2))
    with pytest.raises(ValueError, match="beta: expected a finite number >= 0, got -1"):
        vae(x, tau=1.0, beta=-1)
    with pytest.raises(ValueError, match="tau: expected a finite number > 0"):
        vae(x, tau=0.0, beta=1.0)
    with pytest.raises(ValueError, match=r"indices: expected values in \[0, 32\), got \[0, 32\]"):
        vae.decode(torch.tensor([[[0, 32]]]))
    with pytest.raises(TypeError, match="indices: expected an integer tensor, got torch.float32"):
        vae.decode(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="indices: expected a 3-D"):
        vae.decode(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="n_hid: expected an integer >= 4 and a multiple of 4, got 6"):
        dn.Encoder(n_hid=6)
    with pytest.raises(ValueError, match="vocab_size: expected an integer >= 2, got 1"):
        dn.Decoder(vocab_size=1)
    enc = dn.Encoder(n_hid=8, n_blk_per_group=1, vocab_size=32)
    with pytest.raises(ValueError, match="vocab_size: encoder has 32, decoder 16"):
        dn.DiscreteVAE(enc, dn.Decoder(n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=16))
    with pytest.raises(ValueError, match="channels: encoder takes 3, decoder makes 1"):
        dn.DiscreteVAE(enc, dn.Decoder(n_init=8, n_hid=8, n_blk_per_group=1, output_channels=1, vocab_size=32))
    with pytest.raises(TypeError, match="expected a dalle_fast.nn.Encoder and Decoder"):
        dn.DiscreteVAE(enc, torch.nn.Identity())
