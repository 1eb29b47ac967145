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


def test_recipe_sets_the_stage_flags(tmp_path, monkeypatch):
    from dalle_fast import train_dalle, train_dvae

    seen = {}  # what the stages' own parsers make of the argv the demo hands them (so every flag must be theirs)

    def stage(name, parser, rc):
        return lambda argv: seen.__setitem__(name, parser().parse_args(argv)) or rc

    monkeypatch.setattr(train_dvae, "main", stage("dvae", train_dvae.build_parser, 0))
    monkeypatch.setattr(train_dalle, "main", stage("dalle", train_dalle.parser, 1))  # 1 stops the demo there

    with pytest.raises(SystemExit, match="the transformer training failed"):
        demo.main(["--out", str(tmp_path), "--recipe", "accurate", "--dvae-args", "--threads 2"])
    dvae, dalle = seen["dvae"], seen["dalle"]
    assert (dvae.steps, dvae.decoder_steps, dvae.seed, dvae.object_weight) == (12000, 4000, 3, 8.0)
    assert dvae.threads == 2  # the caller's flag comes after the recipe's --threads 1, so it wins
    assert (dalle.steps, dalle.data_length, dalle.seed, dalle.text_dropout) == (12000, 40000, 0, 0.1)
    seen.clear()
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path), "--dalle-steps", "7"])  # the quick recipe, one step count overridden
    assert (seen["dvae"].steps, seen["dvae"].seed, seen["dvae"].object_weight) == (8000, 0, 1.0)
    assert (seen["dalle"].steps, seen["dalle"].seed, seen["dalle"].data_length) == (7, 0, 10000)
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path), "--recipe", "slow"])
