"""python -m dalle_fast.demo end to end at toy sizes: trains both stages, generates for held-out captions, writes
the grid and the per-caption report, prints the three accuracies (generated, dVAE reconstructions, true renders).
The accuracy of such a toy run is not the demo's figure (the README's is): this checks the pipeline."""

import pytest
import torch

from dalle_fast import data, demo, training

pytestmark = pytest.mark.usefixtures("one_thread")

TOY = ["--dvae-steps", "4", "--dvae-decoder-steps", "3", "--dalle-steps", "4", "--captions", "3", "--samples", "2",
       "--dvae-args", "--threads 1 --synthetic-length 48 --batch-size 8 --ckpt-every 0 --grid-every 0",
       "--dalle-args", "--data-length 48 --batch-size 8 --layers 1 --text-len 24 --quiet"]  # fmt: skip


def test_demo_trains_generates_and_scores(tmp_path, capsys):
    out = tmp_path / "demo"
    torch.set_num_threads(2)  # the one_thread fixture restores the caller's after the test
    assert demo.main(["--out", str(out), *TOY]) == 0
    assert torch.get_num_threads() == 2  # the dVAE's --threads 1 does not hold for the transformer and after
    printed = capsys.readouterr().out
    assert training.load_checkpoint(out / "dvae" / "dvae.pt")["step"] == 4 + 3  # the ELB, then the decoder steps
    for k in ("generated", "dvae", "true"):
        assert f"  {k:<9} all " in printed
    grid = data.read_png(out / "zero_shot.png")
    assert tuple(grid.shape) == (3 * 34 + 2, 2 * 34 + 2, 3)  # 3 captions x 2 samples of 32x32
    lines = (out / "zero_shot.txt").read_text().splitlines()
    assert len(lines) == 3 and all(("ok" in ln or "miss" in ln) for ln in lines)
    test = data.SyntheticShapes("test", 3, 32, seed=0)
    assert [ln.split(None, 2)[2].split("  {")[0] for ln in lines] == [test.scene(i).caption for i in range(3)]
    # evaluating the same checkpoints again gives the same report (seeded generation)
    assert demo.main(["--out", str(out), "--skip-training", *TOY]) == 0
    assert (out / "zero_shot.txt").read_text().splitlines() == lines
    assert "the best by the likelihood reranker checked (guidance scale 2)" in capsys.readouterr().out.replace(
        "\n", " "
    )
    # the other reranker, unguided
    assert (
        demo.main(["--out", str(out), "--skip-training", *TOY, "--rerank", "contrastive", "--guidance-scale", "1"]) == 0
    )
    assert "the best by the contrastive reranker checked (guidance scale 1)" in capsys.readouterr().out.replace(
        "\n", " "
    )


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path), "--captions", "0"])
    assert "--captions: expected an integer >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path), "--dvae-decoder-steps", "-2"])
    assert "--dvae-decoder-steps: expected an integer >= 0, got -2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path), "--guidance-scale", "-1"])
    assert "--guidance-scale: expected a finite number >= 0 (1: off), got -1.0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="rerank_by: expected one of"):
        demo.evaluate("x", "y", captions=1, samples=1, seed=0, top_k=None, temperature=1.0, rerank_by="clip")


class _Exited:
    """What demo._launch returns, for a train_dvae process that has already exited with `rc`."""

    def __init__(self, rc):
        self.returncode = rc

    def poll(self):
        return self.returncode

    wait = poll

    def kill(self):
        raise AssertionError("an exited process is not killed")


def test_recipe_sets_the_stage_flags(tmp_path, monkeypatch):
    import os

    from dalle_fast import train_dalle, train_dvae

    seen = {}  # what the stages' own parsers make of the argv the demo hands them (so every flag must be theirs)

    def stage(name, parser, rc):
        return lambda argv: seen.__setitem__(name, parser().parse_args(argv)) or rc

    def launch(argv, log):  # one of --dvae-seeds' processes: parsed, then "failed" (1 stops the demo there)
        args = train_dvae.build_parser().parse_args(argv)
        seen[f"dvae seed {args.seed}"] = args
        return _Exited(1)

    monkeypatch.setattr(train_dvae, "main", stage("dvae", train_dvae.build_parser, 0))
    monkeypatch.setattr(train_dalle, "main", stage("dalle", train_dalle.parser, 1))  # 1 stops the demo there
    monkeypatch.setattr(demo, "_launch", launch)

    with pytest.raises(SystemExit, match="the dVAE training failed: seed 3 .*; seed 4 "):
        demo.main(["--out", str(tmp_path), "--recipe", "accurate", "--dvae-args", "--threads 2"])
    for seed in (3, 4):  # the recipe's two dVAEs, each with the recipe's flags and its own seed and --out
        dvae = seen.pop(f"dvae seed {seed}")
        assert (dvae.steps, dvae.decoder_steps, dvae.seed, dvae.object_weight) == (12000, 4000, seed, 8.0)
        assert dvae.threads == 2  # the caller's flag comes after the recipe's --threads 1, so it wins
        assert dvae.out == os.path.join(str(tmp_path), "dvae_seeds", f"seed{seed}")
    assert not seen
    with pytest.raises(SystemExit, match="the transformer training failed"):
        demo.main(["--out", str(tmp_path), "--recipe", "accurate", "--dvae-seeds", "1"])
    dvae, dalle = seen.pop("dvae"), seen.pop("dalle")
    assert (dvae.steps, dvae.decoder_steps, dvae.seed, dvae.object_weight, dvae.threads) == (12000, 4000, 3, 8.0, 1)
    assert (dalle.steps, dalle.data_length, dalle.seed, dalle.text_dropout) == (12000, 40000, 0, 0.1)
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path), "--dalle-steps", "7"])  # the quick recipe, one step count overridden
    assert (seen["dvae"].steps, seen["dvae"].seed, seen["dvae"].object_weight) == (8000, 0, 1.0)
    assert (seen["dalle"].steps, seen["dalle"].seed, seen["dalle"].data_length) == (7, 0, 10000)
    seen.clear()
    with pytest.raises(SystemExit):  # no --threads among the flags: the cores are shared out
        demo.main(["--out", str(tmp_path), "--dvae-seeds", "3", "--seed", "5"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert sorted(seen) == ["dvae seed 5", "dvae seed 6", "dvae seed 7"]
    assert {a.threads for a in seen.values()} == {max(1, cores // 3)}
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path), "--recipe", "slow"])
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path), "--dvae-seeds", "0"])


def test_dvae_seeds_keeps_the_best_checked(tmp_path, monkeypatch, capsys):
    """--dvae-seeds 2 trains two dVAEs in two processes and keeps the one dvae_check reads best: here the second
    seed's (the check is replaced so that the choice is known; the real one is checked below)."""
    out = tmp_path / "demo"
    real_check = demo.dvae_check
    checks = {}

    def check(path):
        checks[path] = real_check(path)
        return dict(checks[path], all=0.5 if "seed1" in path else 0.25)

    monkeypatch.setattr(demo, "dvae_check", check)
    assert demo.main(["--out", str(out), *TOY, "--dvae-seeds", "2", "--captions", "1"]) == 0
    printed = capsys.readouterr().out
    assert "training 2 dVAEs side by side (seeds 0, 1;" in printed
    assert "dVAE seed 1: data.check of 200 fresh training-split scenes (EMA weights): all 0.500" in printed
    assert printed.count("<- kept") == 1 and "all 0.500 (" in printed.split("<- kept")[0].splitlines()[-1]
    kept, cand = (
        training.load_checkpoint(p) for p in (out / "dvae" / "dvae.pt", out / "dvae_seeds" / "seed1" / "dvae.pt")
    )
    assert kept["args"]["seed"] == 1 and kept["step"] == 4 + 3
    torch.testing.assert_close((kept["model"], kept["ema"]), (cand["model"], cand["ema"]), rtol=0, atol=0)
    assert "train_dvae: 7 steps in" in (out / "dvae_seeds" / "seed0.log").read_text()
    for c in checks.values():  # the real check: fractions of the 200 scenes, over the five attributes
        assert set(c) == {"count", "shape", "colour", "position", "all"}
        n = demo.SELECT_SCENES
        assert all(abs(v * n - round(v * n)) < 1e-6 and 0 <= v <= 1 for v in c.values())
        assert c["all"] <= min(c[a] for a in ("count", "shape", "colour", "position"))
    assert len(checks) == 2


def test_dvae_seeds_names_the_failed_seed(tmp_path, monkeypatch):
    import subprocess
    import sys

    real_launch = demo._launch

    def launch(argv, log):  # seed 8 exits at once with status 3; seed 7 trains (and is waited for)
        if argv[argv.index("--seed") + 1] == "8":
            return subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"], stdout=log, stderr=log)
        return real_launch(argv, log)

    monkeypatch.setattr(demo, "_launch", launch)
    with pytest.raises(SystemExit, match=r"the dVAE training failed: seed 8 \(exit status 3; .*seed8.log\)$"):
        demo.main(["--out", str(tmp_path), *TOY, "--dvae-seeds", "2", "--seed", "7"])
    assert "train_dvae: 7 steps in" in (tmp_path / "dvae_seeds" / "seed7.log").read_text()
