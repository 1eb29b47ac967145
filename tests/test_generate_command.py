"""python -m dalle_fast.generate end to end: a tiny dVAE checkpoint, a few train_dalle steps, then the command
writes a PNG grid of the decoded samples (one row per caption); over-long captions and bad flags are refused."""

import pytest
import torch
from test_train_dalle import args_for, run, save_tiny_dvae

from dalle_fast import data, generate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    dvae = save_tiny_dvae(root / "dvae.pt")
    out = root / "dalle.pt"
    run(args_for(dvae, str(root / "codes"), out, "--steps", "4", "--save-every", "4", "--text-len", "24"))
    return str(out), dvae


def test_generate_writes_a_grid_of_decoded_samples(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    out = tmp_path / "grid.png"
    rc = generate.main(["a red circle in the top left", "a blue square in the center", "--checkpoint", ckpt,
                        "--out", str(out), "--num-samples", "3", "--top-k", "4", "--seed", "1", "--rerank",
                        "--device", "cpu"])  # fmt: skip
    assert rc == 0
    grid = data.read_png(out)
    # 2 rows x 3 images of 32x32 with 2-pixel gaps
    assert tuple(grid.shape) == (2 * 34 + 2, 3 * 34 + 2, 3)
    assert "2 caption(s) x 3 samples" in capsys.readouterr().out
    again = tmp_path / "again.png"
    argv = ["a red circle in the top left", "a blue square in the center", "--checkpoint", ckpt, "--out", str(again),
            "--num-samples", "3", "--top-k", "4", "--seed", "1", "--rerank", "--device", "cpu"]  # fmt: skip
    assert generate.main(argv) == 0
    assert torch.equal(data.read_png(again), grid)  # the same seed, the same images


def _tiles(grid, rows, cols, size=32, pad=2):
    return [[grid[pad + r * (size + pad) :][:size, pad + c * (size + pad) :][:, :size] for c in range(cols)]
            for r in range(rows)]  # fmt: skip


def test_guided_samples_and_the_contrastive_reranker(checkpoint, tmp_path):
    """--rerank contrastive only reorders each row's samples (the same seed and guidance give the same images)."""
    ckpt, _ = checkpoint
    captions = ["a red circle above a blue square", "something else"]  # the second: no grammar, empty caption only
    common = ["--checkpoint", ckpt, "--num-samples", "4", "--seed", "2", "--guidance-scale", "2", "--device", "cpu"]
    assert generate.main([*captions, *common, "--out", str(tmp_path / "plain.png")]) == 0
    assert generate.main([*captions, *common, "--out", str(tmp_path / "ranked.png"), "--rerank", "contrastive"]) == 0
    plain, ranked = (_tiles(data.read_png(tmp_path / f), 2, 4) for f in ("plain.png", "ranked.png"))
    for row_a, row_b in zip(plain, ranked):
        key = lambda t: t.flatten().tolist()  # noqa: E731
        assert sorted(map(key, row_a)) == sorted(map(key, row_b))


def test_the_dvae_can_be_named_and_bad_input_is_refused(checkpoint, tmp_path, capsys):
    ckpt, dvae = checkpoint
    out = tmp_path / "one.png"
    assert generate.main(["a green cross in the top", "--checkpoint", ckpt, "--dvae", dvae, "--out", str(out),
                          "--num-samples", "1", "--device", "cpu"]) == 0  # fmt: skip
    with pytest.raises(SystemExit):
        generate.main(["a red circle above a blue square " * 4, "--checkpoint", ckpt, "--out", str(out)])
    assert "the model reads at most" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate.main(["a red circle", "--checkpoint", ckpt, "--out", str(out), "--num-samples", "0"])
    assert "--num-samples: expected an integer >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate.main(["a red circle", "--checkpoint", ckpt, "--out", str(out), "--guidance-scale", "nan"])
    assert "--guidance-scale: expected a finite number >= 0 (1: off), got nan" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no file"):
        generate.main(["a red circle", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(out)])
