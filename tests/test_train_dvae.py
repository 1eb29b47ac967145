"""python -m dalle_fast.train_dvae: learning, exact resume, DDP, atomic checkpoints, the loader, bad arguments.

Models here are tiny (n_hid 8, 16 codes, 32x32 images -> 4x4 tokens) so the whole file runs in seconds.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dalle_fast import train_dvae as T
from dalle_fast import training
from dalle_fast.nn import DiscreteVAE

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--group-count", "4", "--n-hid", "8", "--vocab-size", "16", "--n-init", "8", "--n-blk-per-group", "1",
        "--image-size", "32", "--synthetic-length", "64", "--log-every", "1000", "--grid-images", "4",
        "--eval-images", "16", "--check-images", "8"]  # fmt: skip


def args_for(tmp_path, *extra, name="run"):
    return T.build_parser().parse_args([*TINY, "--out", str(tmp_path / name), "--device", "cpu", *extra])


def params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_tensors(a, b, what):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, what
        assert torch.equal(a, b), f"{what}: differs (max |diff| {(a.double() - b.double()).abs().max():.3g})"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{what}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            assert_same_tensors(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{what}[{i}]")
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


def test_short_run_learns_and_uses_more_codes(tmp_path):
    # the official codebook init here: with 16 codes and 60 steps it shows the rise most clearly
    args = args_for(tmp_path, "--steps", "60", "--batch-size", "8", "--lr", "3e-3", "--grid-every", "0",
                    "--ckpt-every", "0", "--codebook-std", "0")  # fmt: skip
    res = T.train(args, stream=open(os.devnull, "w"))
    h = res["history"]
    assert len(h) == 60 and res["step"] == 60
    assert res["eval"]["images"] == 16 and 1 <= res["eval"]["codes"] <= 16 and 0 < res["eval"]["mse"] < 1
    check = res["eval"]["check"]
    assert set(check) == {"recon", "true"} and set(res["eval"]["check_ema"]) == set(check["recon"])
    assert set(check["recon"]) == {"count", "shape", "colour", "position", "all"}
    assert all(0 <= v <= 1 for v in [*check["recon"].values(), *res["eval"]["check_ema"].values()])
    assert check["true"]["count"] == 1.0 and check["true"]["all"] >= 0.5  # data.check reads true renders back

    def mean(key, part):
        return sum(r[key] for r in part) / len(part)

    first, last = h[:8], h[-8:]
    assert mean("nll", last) < mean("nll", first) - 0.1, (mean("nll", first), mean("nll", last))
    assert mean("ppl", last) > mean("ppl", first) * 1.5, (mean("ppl", first), mean("ppl", last))
    assert mean("codes", last) > mean("codes", first)
    # the schedules reached their ends: tau 1 -> 1/16 over the run, beta 0 -> 6.6 over its first tenth
    assert h[0]["tau"] == 1.0 and h[0]["beta"] == 0.0 and abs(h[-1]["tau"] - 1 / 16) < 1e-3
    assert h[-1]["beta"] == pytest.approx(6.6)
    out = tmp_path / "run"
    assert (out / "dvae.pt").is_file() and (out / "recon_000060.png").is_file()
    assert (out / "recon_000060.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "phases, cut",
    [
        (["--steps", "6"], 3),
        (["--steps", "3", "--decoder-steps", "3"], 2),
        (["--steps", "3", "--decoder-steps", "3"], 4),
    ],
    ids=["elb", "cut-before-decoder-steps", "cut-in-decoder-steps"],
)
def test_resume_is_bit_exact(tmp_path, phases, cut):
    common = [*phases, "--batch-size", "4", "--ckpt-every", "0", "--grid-every", "0", "--pixel-noise", "0.05"]
    whole = T.train(args_for(tmp_path, *common, name="whole"), stream=open(os.devnull, "w"))
    part = T.train(args_for(tmp_path, *common, "--stop-after", str(cut), name="cut"), stream=open(os.devnull, "w"))
    assert part["step"] == cut
    mid = training.load_checkpoint(tmp_path / "cut" / "dvae.pt")
    assert mid["step"] == cut
    resumed = T.train(args_for(tmp_path, *common, "--resume", "auto", name="cut"), stream=open(os.devnull, "w"))
    assert resumed["step"] == 6
    a = training.load_checkpoint(tmp_path / "whole" / "dvae.pt")
    b = training.load_checkpoint(tmp_path / "cut" / "dvae.pt")
    assert a["step"] == b["step"] == 6
    for key in ("model", "optimizer", "ema", "scaler"):
        assert_same_tensors(a[key], b[key], key)
    assert_same_tensors(params(whole["model"]), params(resumed["model"]), "live model")
    # the losses of the resumed steps are the uninterrupted run's
    assert [r["loss"] for r in whole["history"][cut:]] == [r["loss"] for r in resumed["history"]]


def test_decoder_steps_fit_the_decoder_to_fixed_codes(tmp_path):
    common = ["--steps", "6", "--batch-size", "8", "--ckpt-every", "0", "--grid-every", "0", "--pixel-noise", "0.05"]
    elb = T.train(args_for(tmp_path, *common, name="elb"), stream=open(os.devnull, "w"))
    both = T.train(args_for(tmp_path, *common, "--decoder-steps", "30", "--decoder-lr", "3e-3", name="both"),
                   stream=open(os.devnull, "w"))  # fmt: skip
    h = both["history"]
    assert both["step"] == 36 and len(h) == 36
    assert [r["loss"] for r in h[:6]] == [r["loss"] for r in elb["history"]]  # the ELB steps are unchanged
    assert not any(r.get("decoder") for r in h[:6]) and all(r["decoder"] for r in h[6:])
    assert h[6]["lr"] == pytest.approx(3e-3) and h[-1]["lr"] == pytest.approx(training.cosine(29, 30, 3e-3, 3e-3 / 20))
    a = training.load_checkpoint(tmp_path / "elb" / "dvae.pt")
    b = training.load_checkpoint(tmp_path / "both" / "dvae.pt")
    enc = [k for k in a["model"] if k.startswith("encoder.")]
    dec = [k for k in a["model"] if k.startswith("decoder.")]
    assert enc and dec
    for k in enc:  # the encoder, raw and averaged, is the EMA encoder of step 6, bit for bit
        assert torch.equal(b["model"][k], a["ema"]["shadow"][k]), k
        assert torch.equal(b["ema"]["shadow"][k], a["ema"]["shadow"][k]), k
    assert any(not torch.equal(b["model"][k], a["ema"]["shadow"][k]) for k in dec)
    # AdamW: the encoder's moments are those of the 6 ELB steps, the decoder's were restarted for the 30 decoder steps
    n_enc = sum(1 for k, _ in both["model"].named_parameters() if k.startswith("encoder."))
    counts = [int(b["optimizer"]["state"][i]["step"]) for i in sorted(b["optimizer"]["state"])]
    assert counts == [6] * n_enc + [30] * (len(counts) - n_enc) and len(counts) > n_enc
    # so the raw and the EMA weights tokenize alike, and the decoder fits the argmax codes better than before
    x = T.fetch(T.make_dataset(args_for(tmp_path, *common)), list(range(16)), 0)
    before = T.load_dvae(tmp_path / "elb" / "dvae.pt")
    raw, avg = T.load_dvae(tmp_path / "both" / "dvae.pt", ema=False), T.load_dvae(tmp_path / "both" / "dvae.pt")
    assert torch.equal(raw.get_codebook_indices(x), avg.get_codebook_indices(x))
    assert torch.equal(before.get_codebook_indices(x), avg.get_codebook_indices(x))
    with torch.no_grad():
        loss_before, loss_after = (float(T.decoder_objective(m, x, "logit-laplace")) for m in (before, raw))
    assert loss_after < loss_before - 0.05, (loss_before, loss_after)


def test_atomic_checkpoint_survives_a_crash_while_saving(tmp_path, monkeypatch):
    real_save = torch.save

    def crashing_save(obj, f, *a, **kw):
        if isinstance(obj, dict) and obj.get("step") == 4:
            f.write(b"half a checkpoint")
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", crashing_save)
    args = args_for(tmp_path, "--steps", "6", "--batch-size", "4", "--ckpt-every", "2", "--grid-every", "0")
    with pytest.raises(OSError, match="simulated"):
        T.train(args, stream=open(os.devnull, "w"))
    monkeypatch.setattr(torch, "save", real_save)
    out = tmp_path / "run"
    assert sorted(os.listdir(out)) == ["dvae.pt"]  # no temporary file left behind
    ckpt = training.load_checkpoint(out / "dvae.pt")
    assert ckpt["step"] == 2 and ckpt["format"] == T.FORMAT
    res = T.train(args_for(tmp_path, "--steps", "6", "--batch-size", "4", "--ckpt-every", "2", "--grid-every", "0",
                           "--resume", "auto"), stream=open(os.devnull, "w"))  # fmt: skip
    assert res["step"] == 6 and len(res["history"]) == 4


def test_image_folder_run(tmp_path):
    from dalle_fast.masks import write_png

    folder = tmp_path / "images" / "sub"
    folder.mkdir(parents=True)
    for i in range(3):  # non-square, larger than the training size: cropped and resized by data.ImageFolder
        write_png(str(folder / f"{i}.png"), (torch.rand(40, 48, 3) * 255).to(torch.uint8))
    args = args_for(tmp_path, "--data", str(tmp_path / "images"), "--steps", "2", "--batch-size", "2")
    res = T.train(args, stream=open(os.devnull, "w"))
    assert res["step"] == 2 and res["eval"]["images"] == 3
    assert T.load_dvae(tmp_path / "run" / "dvae.pt").image_size == 32


def test_load_dvae(tmp_path):
    args = args_for(tmp_path, "--steps", "3", "--batch-size", "4", "--grid-every", "0")
    res = T.train(args, stream=open(os.devnull, "w"))
    path = tmp_path / "run" / "dvae.pt"
    raw = T.load_dvae(path, ema=False)
    avg = T.load_dvae(path)
    assert isinstance(avg, DiscreteVAE) and not avg.training and avg.image_size == 32 and avg.vocab_size == 16
    assert_same_tensors(params(raw), params(res["model"]), "raw weights")
    ckpt = training.load_checkpoint(path)
    assert_same_tensors({k: v for k, v in params(avg).items()}, ckpt["ema"]["shadow"], "EMA weights")
    x = torch.rand(2, 3, 32, 32)
    codes = avg.get_codebook_indices(x)
    assert codes.shape == (2, 4, 4) and avg.decode(codes).shape == (2, 3, 32, 32)
    bad = tmp_path / "other.pt"
    training.atomic_save({"format": "dalle_fast.dalle/1"}, bad)
    with pytest.raises(ValueError, match="format"):
        T.load_dvae(bad)


def test_add_pixel_noise():
    x = torch.rand(2, 3, 8, 8)
    x[0] = 0.0
    x[1, 0] = 1.0
    a, b = T.add_pixel_noise(x, 1 / 64, seed=7), T.add_pixel_noise(x, 1 / 64, seed=7)
    assert torch.equal(a, b) and not torch.equal(a, T.add_pixel_noise(x, 1 / 64, seed=8))  # a function of the seed
    assert (a >= x).all() and (a <= (x + 1 / 64).clamp(max=1)).all() and a.max() <= 1
    assert (a[0] > 0).float().mean() > 0.99 and (a[1, 0] == 1).all()  # black lifted, white clipped
    assert T.add_pixel_noise(x, 0.0, seed=7) is x


def test_recon_mse_objective(tmp_path):
    args = args_for(tmp_path, "--steps", "3", "--batch-size", "4", "--grid-every", "0", "--recon", "mse")
    res = T.train(args, stream=open(os.devnull, "w"))
    assert res["step"] == 3 and all(0 < r["loss"] < 1 for r in res["history"])  # squared error, beta 0 early on
    model, x = res["model"], torch.rand(2, 3, 32, 32)
    out = model(x, tau=1.0, beta=2.0, seed=1)
    assert T.objective(out, x, "logit-laplace", 2.0) is out.loss
    from dalle_fast.nn.dvae import map_pixels

    want = ((out.stats[:, :3].sigmoid() - map_pixels(x)) ** 2).mean() + 2.0 * (16 / (3 * 32 * 32)) * out.kl
    assert torch.allclose(T.objective(out, x, "mse", 2.0), want)


def test_object_weight(tmp_path):
    # pixel_weights: object_weight within OBJECT_MARGIN (2) pixels of a non-black pixel, 1 elsewhere
    x = torch.rand(3, 3, 32, 32) * 0.05  # dark, below the 0.1 threshold
    x[0, 1, 5, 7] = 0.8
    x[2, :, 20:23, 9:11] = 0.6
    x[1, 0, 31, 0] = 0.3
    w = T.pixel_weights(x, 5.0)
    assert T.pixel_weights(x, 1.0) is None and w.shape == (3, 1, 32, 32)
    want = torch.ones(3, 1, 32, 32)
    want[0, 0, 3:8, 5:10] = want[2, 0, 18:25, 7:13] = want[1, 0, 29:, :3] = 5.0
    assert torch.equal(w, want)

    # the weighted objective is sum(w * nll) / (C * sum(w)) + the KL term, against an fp64 eager sum
    from dalle_fast import reference
    from dalle_fast.nn.dvae import map_pixels

    args = args_for(tmp_path, "--steps", "2", "--batch-size", "4", "--grid-every", "0", "--object-weight", "4")
    res = T.train(args, stream=open(os.devnull, "w"))
    assert res["step"] == 2 and all(math.isfinite(r["loss"]) for r in res["history"])
    model = res["model"]
    xs = T.fetch(T.make_dataset(args), range(3), 0).transpose(2, 3) * 0.9 + 0.05  # nothing exactly 0 or 1
    xs = xs.transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous
    assert not xs.is_contiguous()
    out = model(xs, tau=0.7, beta=1.5, seed=3)
    w = T.pixel_weights(xs, 4.0)
    st = out.stats.double()
    nll = reference.logit_laplace_nll(map_pixels(xs.double()), st[:, :3], st[:, 3:], "none")
    kl = 1.5 * (16 / (3 * 32 * 32)) * out.kl.double()
    want = (nll * w.double()).sum() / (3 * w.double().sum()) + kl
    got = T.objective(out, xs, "logit-laplace", 1.5, w)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got.double(), out.loss.double(), rtol=1e-3)  # the weights do change the loss
    mse = ((out.stats[:, :3].double().sigmoid() - map_pixels(xs.double())) ** 2 * w.double()).sum() / (3 * w.sum())
    assert torch.allclose(T.objective(out, xs, "mse", 1.5, w).double(), mse + kl, rtol=1e-5, atol=1e-7)
    # gradients: the weighted decoder objective against the same fp64 sum, through the decoder's parameters
    p = next(iter(model.decoder.parameters()))
    g = torch.autograd.grad(T.decoder_objective(model, xs, "logit-laplace", w), p)[0]
    stats = model.decode_stats(model.get_codebook_indices(xs))
    n64 = reference.logit_laplace_nll(map_pixels(xs.double()), stats[:, :3].double(), stats[:, 3:].double(), "none")
    g64 = torch.autograd.grad((n64 * w.double()).sum() / (3 * w.double().sum()), p)[0]
    assert torch.allclose(g, g64.float(), rtol=1e-4, atol=1e-7)


class _Identity(torch.nn.Module):
    """A stand-in dVAE whose argmax reconstruction is the image itself (codes are the images)."""

    def get_codebook_indices(self, x):
        return x

    def decode(self, c):
        return c


def test_check_accuracy():
    args = T.build_parser().parse_args(["--image-size", "32", "--seed", "3"])
    images, scenes = T.check_set(args, 12)
    assert images.shape == (12, 3, 32, 32) and len(scenes) == 12 and all(s.held_out for s in scenes)
    perfect = T.check_accuracy(_Identity(), images, scenes, batch_size=5)
    assert perfect["recon"] == perfect["true"] and perfect["true"]["count"] == 1.0

    class Black(_Identity):
        def decode(self, c):
            return torch.zeros_like(c)

    black = T.check_accuracy(Black(), images, scenes)
    assert black["recon"] == dict.fromkeys(("count", "shape", "colour", "position", "all"), 0.0)


def test_code_usage():
    logits = torch.full((2, 8, 2, 2), -5.0)
    for i in range(8):  # each of the 8 codes wins at exactly one position
        logits[i // 4, i, (i % 4) // 2, i % 2] = 5.0
    assert T.code_usage(logits) == (pytest.approx(8.0), 8)
    logits = torch.zeros(3, 8, 2, 2)
    logits[:, 5] = 1.0
    assert T.code_usage(logits) == (pytest.approx(1.0), 1)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--steps", "-3"], "--steps: expected an integer > 0, got -3"),
        (["--batch-size", "0"], "--batch-size: expected an integer > 0, got 0"),
        (["--image-size", "36", "--group-count", "4"], "--image-size: expected a positive multiple of 8"),
        (["--image-size", "30"], "--image-size: expected a positive multiple of 4"),
        (["--image-size", "16"], "--image-size: the synthetic data set needs at least 24 pixels"),
        (["--data", "/no/such/folder"], "--data: expected 'synthetic' or an existing image folder"),
        (["--resume", "/no/such/file.pt"], "--resume: expected 'auto' or a checkpoint file"),
        (["--lr", "-1"], "--lr: expected a finite number > 0"),
        (["--pixel-noise", "-0.1"], "--pixel-noise: expected a number in \\[0, 1\\], got -0.1"),
        (["--pixel-noise", "nan"], "--pixel-noise: expected a number in \\[0, 1\\], got nan"),
        (["--check-images", "-1"], "--check-images: expected an integer >= 0, got -1"),
        (["--ema-decay", "1.5"], "--ema-decay: expected a number in \\[0, 1\\)"),
        (["--decoder-steps", "-1"], "--decoder-steps: expected an integer >= 0, got -1"),
        (["--decoder-lr", "0"], "--decoder-lr: expected a finite number > 0, got 0"),
        (["--object-weight", "-2"], "--object-weight: expected a finite number > 0, got -2"),
        (["--amp", "on", "--device", "cpu"], "--amp on: fp16 loss scaling needs a CUDA device"),
    ],
)
def test_bad_arguments(argv, match, capsys, tmp_path):
    assert T.main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "train_dvae: error:" in err
    import re

    assert re.search(match, err), err
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        T.check_args(T.build_parser().parse_args(argv))
    assert not (tmp_path / "x").exists()


def test_ddp_two_processes_cpu(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent("""
        import json, os, sys
        import torch
        from dalle_fast import train_dvae as T
        args = T.build_parser().parse_args(sys.argv[1:])
        res = T.train(args, stream=open(os.devnull, "w"))
        rank = os.environ["RANK"]
        torch.save(res["model"].state_dict(), os.path.join(sys.argv[-1], f"rank{rank}.pt"))
        if rank == "0":
            json.dump(res["history"], open(os.path.join(sys.argv[-1], "history.json"), "w"))
    """)
    )
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           *TINY, "--steps", "30", "--decoder-steps", "4", "--batch-size", "4", "--lr", "3e-3", "--grid-every", "0",
           "--ckpt-every", "0", "--device", "cpu", "--threads", "1", "--out", str(out)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert_same_tensors(r0, r1, "rank 0 vs rank 1 parameters")
    h = json.loads((out / "history.json").read_text())
    assert len(h) == 34 and all(r.get("decoder") for r in h[30:])  # the decoder steps average over ranks too
    assert sum(r["nll"] for r in h[25:30]) / 5 < sum(r["nll"] for r in h[:5]) / 5 - 0.05
    assert sorted(os.listdir(out)) == ["dvae.pt", "history.json", "rank0.pt", "rank1.pt", "recon_000034.png"]
    # the two ranks drew different batches: a single process with the doubled batch is a different run
    ckpt = training.load_checkpoint(out / "dvae.pt")
    assert ckpt["step"] == 34
