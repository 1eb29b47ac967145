"""python -m dalle_fast.train_dalle: the training command of the DALL-E transformer, on CPU.

Loss falls in a short run; the codes are cached; checkpoints are self-contained (load_dalle); resume makes the
very next step of an uninterrupted run (bit-exact, fp32); 2-process CPU DDP with and without PowerSGD; the
float16 per-resblock scaler path runs (also in 2-process DDP with PowerSGD), and a planted overflow goes through
clipping and AdamW as a skipped step that backs off only its block; seeded BPE dropout; bad input. (The model
itself — masks, loss weighting, backend parity, checkpointing — is tested in test_dalle_model.py.)
"""

import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DEVICES

from dalle_fast import train_dalle, training
from dalle_fast.nn import DALLE
from dalle_fast.nn.dvae import Decoder, DiscreteVAE, Encoder
from dalle_fast.text import TextTokenizer, shapes_captions

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_tiny_dvae(path, *, seed=0, vocab=32, image_size=32) -> str:
    """A freshly initialised small dVAE (32x32 images -> 4x4 codes over `vocab`) in train_dvae's checkpoint format
    (what train_dalle reads: format, flat model config, model, EMA, args with the image size)."""
    torch.manual_seed(seed)
    config = dict(group_count=4, n_hid=8, n_blk_per_group=1, vocab_size=vocab, n_init=8, channels=3)
    enc = Encoder(4, 8, 1, 3, vocab)
    dec = Decoder(4, 8, 8, 1, 3, vocab)
    model = DiscreteVAE(enc, dec)
    ema = training.EMA(model).state_dict()
    ckpt = {"format": "dalle_fast.dvae/1", "config": config, "model": model.state_dict(), "ema": ema,
            "args": {"image_size": image_size}}  # fmt: skip
    training.atomic_save(ckpt, path)
    return str(path)


@pytest.fixture(scope="module")
def dvae(tmp_path_factory):
    return save_tiny_dvae(tmp_path_factory.mktemp("dvae") / "dvae.pt")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("codes"))


def args_for(dvae, cache, out, *extra) -> list[str]:
    """A tiny run: 32x32 images (4x4 codes), 10 text tokens, 2 layers of 2 heads of 32."""
    return ["--dvae", dvae, "--cache-dir", cache, "--out", str(out), "--data-length", "96",
            "--text-len", "10", "--text-vocab", "300", "--layers", "2", "--heads", "2", "--head-dim", "32",
            "--batch-size", "8", "--warmup", "3", "--lr", "3e-3", "--final-lr", "3e-4", "--log-every", "1",
            "--device", "cpu", "--quiet", *extra]  # fmt: skip


def run(argv):
    return train_dalle.train(train_dalle.parser().parse_args(argv))


# Seeded BPE dropout --------------------------------------------------------------------------------------


def test_seeded_bpe_dropout_is_the_library_encoding_without_dropout_and_reproducible():
    captions = shapes_captions(300, split="train")
    tok = TextTokenizer.train(captions, vocab_size=300, text_len=10, dropout=0.3)
    bpe = train_dalle.SeededBPEDropout(tok)
    odd = captions[:50] + ["A Red  SQUARE in the top-left!", "zebra über café", ""]
    assert torch.equal(bpe.encode(odd), tok.encode(odd))  # no rng: exactly the library's encoding
    a = bpe.encode(captions[:64], random.Random(1))
    assert torch.equal(a, bpe.encode(captions[:64], random.Random(1)))
    assert not torch.equal(a, tok.encode(captions[:64]))  # dropout splits some words
    for caption in captions[:64]:  # dropout only splits tokens: the bytes are the same
        assert bpe._tk.decode(bpe.tokenize(caption, random.Random(2))) == caption


# Training ------------------------------------------------------------------------------------------------


def test_loss_falls_codes_are_cached_and_the_checkpoint_is_self_contained(dvae, cache, tmp_path, monkeypatch):
    out = tmp_path / "dalle.pt"
    res = run(args_for(dvae, cache, out, "--steps", "40"))
    losses = [h[1] for h in res["history"]]
    assert len(losses) == 40 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    ckpt = training.load_checkpoint(out)
    assert ckpt["format"] == "dalle_fast.dalle/1" and ckpt["step"] == 40 and ckpt["scaler"] is None
    assert ckpt["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.96)
    model, tok = train_dalle.load_dalle(out)
    assert isinstance(model, DALLE) and not model.training
    c = model.config
    assert (c.text_len, c.grid_h, c.grid_w, c.image_vocab, c.text_vocab) == (10, 4, 4, 32, tok.text_vocab)
    assert all(torch.equal(p, ckpt["ema"]["shadow"][k]) for k, p in model.state_dict().items())  # EMA weights
    raw, _ = train_dalle.load_dalle(out, ema=False)
    assert all(torch.equal(p, ckpt["model"][k]) for k, p in raw.state_dict().items())
    codes = torch.randint(0, c.image_vocab, (2, c.image_len))
    text = tok.encode(["a red circle in the top", "a blue cross above a green square"])
    with torch.no_grad():
        assert torch.isfinite(model(text, codes).loss)

    # a second run reads the cached codes: the dVAE is never loaded
    monkeypatch.setattr(train_dalle, "read_dvae", lambda *a, **k: pytest.fail("re-encoded despite the cache"))
    assert run(args_for(dvae, cache, tmp_path / "again.pt", "--steps", "1"))["cache"] == res["cache"]


def _state(path):
    ckpt = training.load_checkpoint(path)
    return ckpt["model"], ckpt["optimizer"]["state"], ckpt["ema"]["shadow"], ckpt["step"]


def test_resume_makes_the_same_next_step_bit_exact(dvae, cache, tmp_path):
    # the schedule of a 6-step run; stopped after 3 steps, resumed for the 4th, against 4 steps in one go
    straight, part = tmp_path / "straight.pt", tmp_path / "part.pt"
    drop = ("--bpe-dropout", "0.3", "--text-dropout", "0.5")
    run(args_for(dvae, cache, straight, "--steps", "6", "--stop-at", "4", *drop))
    run(args_for(dvae, cache, part, "--steps", "6", "--stop-at", "3", *drop))
    assert _state(part)[3] == 3
    res = run(args_for(dvae, cache, part, "--steps", "6", "--stop-at", "4", *drop, "--resume"))
    assert res["start"] == 3
    (ma, oa, ea, sa), (mb, ob, eb, sb) = _state(straight), _state(part)
    assert sa == sb == 4
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])


WORKER = textwrap.dedent(
    """
    import json, os, sys, torch
    from dalle_fast import train_dalle
    out, ports, runs = sys.argv[1], sys.argv[2].split(","), json.loads(sys.argv[3])
    results = []
    for port, argv in zip(ports, runs):  # one process pair for both runs: imports cost more than training here
        os.environ["MASTER_PORT"] = port
        res = train_dalle.train(train_dalle.parser().parse_args(argv))
        params = {k: v.detach().cpu() for k, v in res["model"].state_dict().items()}  # this rank's final weights
        results.append({"history": res["history"], "params": params})
    torch.save(results, out)
    """
)


def test_two_process_ddp_with_and_without_powersgd(dvae, cache, tmp_path):
    run(args_for(dvae, cache, tmp_path / "warm.pt", "--steps", "1"))  # the codes are cached before the ranks start
    runs = [args_for(dvae, cache, tmp_path / f"ddp{r}.pt", "--steps", "14", "--powersgd-rank", str(r),
                     "--powersgd-start", "2", "--device", "cpu") for r in (0, 1)]  # fmt: skip
    # and float16 with the per-resblock scaler (flags OR-ed over ranks) under PowerSGD
    runs.append(args_for(dvae, cache, tmp_path / "ddp16.pt", "--steps", "8", "--powersgd-rank", "1",
                         "--powersgd-start", "2", "--dtype", "float16", "--backend", "cpp"))  # fmt: skip
    base = 29500 + random.Random().randrange(2000)
    ports = f"{base},{base + 1},{base + 2}"
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   OMP_NUM_THREADS="1")  # fmt: skip
        cmd = [sys.executable, "-c", WORKER, str(tmp_path / f"rank{rank}.pt"), ports, json.dumps(runs)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = [p.communicate(timeout=240)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for i, powersgd in enumerate((0, 1)):
        r0, r1 = ranks[0][i], ranks[1][i]
        assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"]), powersgd  # replicas equal
        losses = [h[1] for h in r0["history"]]
        assert [h[1] for h in r1["history"]] == losses  # logged losses are the mean over ranks
        assert all(v == v and abs(v) < 1e3 for v in losses)
        assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3, (powersgd, losses)
        ckpt = training.load_checkpoint(tmp_path / f"ddp{powersgd}.pt")
        assert all(torch.equal(ckpt["model"][k], r0["params"][k]) for k in r0["params"])
    a, b = ranks[0][0]["params"], ranks[0][1]["params"]
    assert not all(torch.equal(a[k], b[k]) for k in a)  # PowerSGD's compressed gradients differ from all-reduce
    r0, r1 = ranks[0][2], ranks[1][2]
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])
    assert all(torch.isfinite(v).all() for v in r0["params"].values())
    scaler = training.load_checkpoint(tmp_path / "ddp16.pt")["scaler"]
    assert scaler["replicas"] == 2 and torch.all(scaler["scales"] > 2 * 2.0**13)  # M = 2 replicas, all steps finite


# float16 with the per-resblock scaler --------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_float16_scaler_path_trains_and_resumes(dvae, cache, tmp_path, device):
    out = tmp_path / "fp16.pt"
    on = ["--device", device, "--backend", "cpp" if device == "cpu" else "auto"]
    res = run(args_for(dvae, cache, out, "--steps", "8", "--dtype", "float16", *on))
    assert all(v == v for h in res["history"] for v in h[1:]) and res["skipped"] == 0
    ckpt = training.load_checkpoint(out)
    assert ckpt["compute_dtype"] == "float16" and ckpt["scaler"]["step"] == 8
    assert torch.all(ckpt["scaler"]["scales"] > 2.0**13)  # 8 finite steps: every scale grew
    res = run(args_for(dvae, cache, out, "--steps", "9", "--dtype", "float16", *on, "--resume"))
    assert res["start"] == 8 and training.load_checkpoint(out)["scaler"]["step"] == 9
    model, _ = train_dalle.load_dalle(out)
    assert model.compute_dtype == torch.float32


@pytest.mark.parametrize("backend", ["cpp", "eager"])
def test_planted_overflow_skips_the_step_and_backs_off_its_block(backend):
    from dalle_fast.nn import DALLEConfig

    c = DALLEConfig.tiny(n_layers=2, n_heads=2, head_dim=32, text_len=6, text_vocab=40, grid_h=3, grid_w=4,
                         image_vocab=11)  # fmt: skip
    model, scaler = train_dalle.build_model(c, torch.float16, device="cpu", backend=backend)
    opt = torch.optim.AdamW(train_dalle.param_groups(model, 4.5e-2), lr=1e-2, betas=(0.9, 0.96), eps=1e-8)
    text = torch.randint(0, c.text_vocab, (3, c.text_len))
    image = torch.randint(0, c.image_vocab, (3, c.image_len))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    init = scaler.scales.clone()
    block = 2  # the attention resblock of layer 2

    def plant(module, inputs, output):  # an overflow inside the block: its qkv output's gradient becomes inf
        output.register_hook(lambda g: g * float("inf"))

    handle = model.blocks[block].block.qkv.register_forward_hook(plant)
    model(text, image).loss.backward()
    handle.remove()
    assert not train_dalle.optimizer_step(model, opt, scaler, clip=4.0, world=1)  # skipped, through clipping
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not opt.state  # AdamW never stepped: no moments polluted by the overflow
    assert torch.allclose(scaler.scales[block], init[block] / 2**0.5)
    others = [i for i in range(2 * c.n_layers) if i != block]
    assert torch.equal(scaler.scales[others], init[others] * scaler.growth_factor)
    opt.zero_grad(set_to_none=True)
    model(text, image).loss.backward()
    assert train_dalle.optimizer_step(model, opt, scaler, clip=4.0, world=1)  # training continues
    assert not all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_drop_captions_replaces_whole_captions_by_the_pads():
    text = torch.randint(0, 50, (400, 7))
    pads = torch.arange(60, 67)
    out = train_dalle.drop_captions(text, pads, 0.25, random.Random(3))
    dropped = (out == pads).all(1)
    assert torch.equal(out[~dropped], text[~dropped])  # the others untouched
    assert 60 < int(dropped.sum()) < 140  # ~100 of 400 (binomial sd 8.7)
    assert torch.equal(out, train_dalle.drop_captions(text, pads, 0.25, random.Random(3)))  # a function of the rng
    assert torch.equal(train_dalle.drop_captions(text, pads, 0.0, random.Random(3)), text)


def test_weight_decay_spares_gains_biases_and_embeddings():
    from dalle_fast.nn import DALLEConfig

    model = DALLE(DALLEConfig.tiny(n_layers=1))
    decay, no_decay = train_dalle.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = sorted(names[id(p)] for p in decay["params"])
    assert "head.weight" in decayed and all(n.endswith("weight") and "emb" not in n for n in decayed)
    assert len(decayed) == 5  # qkv, attention out_proj, fc, MLP out_proj, head
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# Bad input -----------------------------------------------------------------------------------------------


def test_bad_input(dvae, cache, tmp_path, capsys):
    def error(*extra, base=True):
        argv = args_for(dvae, cache, tmp_path / "bad.pt", *extra) if base else list(extra)
        assert train_dalle.main(argv) == 2
        return capsys.readouterr().err

    assert "--dvae" in error("--dvae", str(tmp_path / "missing.pt"))
    assert "--bpe-dropout" in error("--bpe-dropout", "1.5")
    assert "--text-dropout: expected a probability in [0, 1), got 1.0" in error("--text-dropout", "1.0")
    assert "--stop-at" in error("--steps", "4", "--stop-at", "5")
    assert "--image-size" in error("--image-size", "16")
    assert "--image-size" in error("--dvae", save_tiny_dvae(tmp_path / "nosize.pt", image_size=None))
    assert "--resume" in error("--resume", str(tmp_path / "none.pt"))
    run(args_for(dvae, cache, tmp_path / "small.pt", "--steps", "1"))
    assert "other data" in error("--resume", str(tmp_path / "small.pt"), "--data-length", "97")
    assert "dalle_fast.dalle/1" in error("--resume", dvae)
    with pytest.raises(SystemExit):
        train_dalle.main(["--steps", "3"])  # --dvae is required (argparse exits)
    with pytest.raises(ValueError, match="dalle_fast.dalle/1"):
        train_dalle.load_dalle(dvae)
    with pytest.raises(ValueError, match="dalle_fast.dvae/1"):
        train_dalle.read_dvae(tmp_path / "small.pt")
    with pytest.raises(FileNotFoundError, match="no file"):
        train_dalle.load_dalle(tmp_path / "nothing.pt")
