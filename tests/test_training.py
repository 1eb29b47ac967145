"""The shared training utilities: schedules, step sampler, EMA, RNG state, atomic checkpoints."""

import os
import random

import pytest
import torch

from dalle_fast import training


def test_cosine_endpoints_and_monotone():
    vals = [training.cosine(s, 100, 1.0, 1 / 16) for s in range(0, 130, 5)]
    assert vals[0] == 1.0 and vals[-1] == pytest.approx(1 / 16)
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert training.cosine(50, 100, 0.0, 6.6) == pytest.approx(3.3)
    w = [training.warmup_cosine(s, warmup=10, total=100, peak=1e-3) for s in range(100)]
    assert w[9] == pytest.approx(1e-3) and w[0] == pytest.approx(1e-4) and w[-1] < 1e-5


def test_step_seed_is_pure_and_distinct():
    assert training.step_seed(3, 7) == training.step_seed(3, 7)
    seeds = {training.step_seed(3, s, r) for s in range(50) for r in range(2)}
    assert len(seeds) == 100 and all(0 <= s < 2**63 for s in seeds)


def test_step_sampler_covers_each_epoch_and_splits_ranks():
    n, b, w = 23, 3, 2
    samplers = [training.StepSampler(n, b, seed=5, rank=r, world_size=w) for r in range(w)]
    stream = [i for s in range(12) for r in range(w) for i in samplers[r].indices(s)]
    for e in range(len(stream) // n):
        assert sorted(stream[e * n : (e + 1) * n]) == list(range(n))
    fresh = training.StepSampler(n, b, seed=5, rank=1, world_size=w)
    assert fresh.indices(9) == samplers[1].indices(9)  # a pure function of the step: resume needs nothing else
    assert training.StepSampler(n, b, seed=6).indices(0) != training.StepSampler(n, b, seed=5).indices(0)


def test_ema_tracks_and_round_trips():
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    ema = training.EMA(m, decay=0.9)
    target = torch.randn(3, 4)
    for _ in range(200):
        with torch.no_grad():
            m.weight.copy_(target)
        ema.update(m)
    torch.testing.assert_close(ema.shadow["weight"], target, atol=1e-6, rtol=0)
    avg = ema.averaged(m)
    torch.testing.assert_close(avg.weight, target, atol=1e-6, rtol=0)
    other = training.EMA(torch.nn.Linear(4, 3), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 200 and other.decay == 0.9
    torch.testing.assert_close(other.shadow["bias"], ema.shadow["bias"])
    with pytest.raises(ValueError, match="decay"):
        training.EMA(m, decay=1.0)


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1)
    torch.manual_seed(1)
    path = tmp_path / "rng.pt"
    training.atomic_save({"format": "test", "rng": training.rng_state()}, path)
    a = (random.random(), torch.rand(3))
    training.set_rng_state(training.load_checkpoint(path)["rng"])
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_atomic_save_keeps_the_previous_file_when_saving_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    training.atomic_save({"format": "test", "w": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("crash during save")

    with pytest.raises(RuntimeError, match="crash during save"):
        training.atomic_save({"format": "test", "bad": Unpicklable()}, path)
    assert torch.equal(training.load_checkpoint(path)["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file"):
        training.load_checkpoint(tmp_path / "missing.pt")
    torch.save({"w": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a dalle_fast checkpoint"):
        training.load_checkpoint(tmp_path / "other.pt")


def test_progress_writes_lines_when_not_a_terminal():
    import io

    s = io.StringIO()
    p = training.Progress(25, every=10, stream=s)
    for step in range(25):
        p.update(step, loss=0.5, codes=3)
    lines = s.getvalue().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("[####################] 25/25 loss 0.5 | codes 3")


def test_progress_rate_when_only_some_steps_are_reported(monkeypatch):
    """A caller that reports every 10th step of a run resumed at step 20: the rate counts all steps since then."""
    import io

    clock = iter([100.0, 110.0, 120.0])  # construction, then one update at each report
    monkeypatch.setattr(training.time, "perf_counter", lambda: next(clock))
    s = io.StringIO()
    p = training.Progress(60, every=10, stream=s, start=20)
    p.update(29, loss=1.0)
    p.update(39, loss=1.0)
    first, second = s.getvalue().splitlines()
    assert "| 1.00 it/s eta 0m30s" in first and "| 1.00 it/s eta 0m20s" in second
