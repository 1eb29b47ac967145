"""The harness itself: memory accounting, interpreter refusal, ratios, file naming (fast, CPU only)."""

import json

import pytest
import torch

from . import gumbel, harness


def test_cpu_peak_extra_counts_live_allocations():
    n = 16 << 20  # 64 MiB of fp32: above glibc's mmap threshold, so RSS sees it too

    def fn():
        a = torch.ones(n)
        b = a + 1  # a and b live together: 32 MB
        del a
        c = b * 2  # b and c: 32 MB
        return c

    fn()
    harness.cpu_peak_extra(fn)  # the profiler's first session loads libraries
    m = harness.cpu_peak_extra(fn)
    assert 8 * n <= m["peak_extra_bytes"] < 8 * n + (1 << 20)
    if "peak_extra_bytes_rss" in m:  # within a tenth of the profiler's figure
        assert abs(m["peak_extra_bytes_rss"] - m["peak_extra_bytes"]) < 0.1 * m["peak_extra_bytes"]


def test_refuses_under_triton_interpreter(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(harness.InterpreterRefused):
        harness.Suite("x", "cpu", out_dir=tmp_path)
    with pytest.raises(harness.InterpreterRefused):
        harness.time_calls(lambda: None, torch.device("cpu"), 0, 1)


def test_suite_ratios_and_file(tmp_path):
    s = harness.Suite("demo", "cpu", smoke=True, out_dir=tmp_path)
    x = torch.randn(1 << 16)
    common = dict(op="demo", dtype=torch.float32, shape=(1 << 16,), mode="fwd", variant={"k": 1})
    for backend, f in (("torch", lambda: (x * 2).exp()), ("torch.compile", lambda: x.exp()), ("fast", lambda: x * 2)):
        s.measure(backend=backend, make=lambda f=f: f, nbytes=8 << 16, flops=1 << 16, **common)
    s.measure(backend="broken", make=lambda: 1 / 0, nbytes=1, flops=1, **common)
    s.skip(backend="slow", reason="too slow", **common)
    res = s.finish()
    assert res["json"].name.startswith("cpu-") and res["json"].name.endswith("-demo-smoke.json")
    doc = json.loads(res["json"].read_text())
    recs = {r["backend"]: r for r in doc["records"]}
    assert recs["torch"]["speedup_vs_torch"] == 1.0
    fast, comp = recs["fast"], recs["torch.compile"]
    assert fast["speedup_vs_compile"] == pytest.approx(comp["median_s"] / fast["median_s"])
    assert recs["broken"]["status"] == "error" and "ZeroDivisionError" in recs["broken"]["reason"]
    assert recs["slow"]["status"] == "skipped"
    assert doc["machine"]["kind"] == "cpu" and doc["machine"]["torch"] == torch.__version__
    assert "ERROR" in res["text"] and "SKIPPED" in res["text"]


def test_time_budget_records_skips(tmp_path):
    s = harness.Suite("demo", "cpu", smoke=True, out_dir=tmp_path, time_budget_s=-1)
    r = s.measure(
        op="demo",
        backend="torch",
        dtype=torch.float32,
        shape=(1,),
        mode="fwd",
        variant={},
        make=lambda: lambda: None,
        nbytes=1,
        flops=1,
    )
    assert r["status"] == "skipped" and r["reason"] == "time budget spent"


def test_gumbel_minimum_bytes():
    n = 8 * 8192 * 32 * 32
    assert gumbel.cost("gumbel_softmax", "fwd", gumbel.DVAE_SHAPE, torch.float32, dim=1)[0] == 2 * 4 * n
    assert gumbel.cost("gumbel_softmax", "bwd", gumbel.DVAE_SHAPE, torch.float16, dim=1)[0] == 3 * 2 * n
    assert gumbel.cost("gumbel_softmax", "fwd+bwd", gumbel.DVAE_SHAPE, torch.float32, dim=1)[0] == 5 * 4 * n
    assert gumbel.cost("gumbel_argmax", "fwd", (8192, 8192), torch.bfloat16, dim=-1)[0] == 2 * 8192 * 8192 + 8 * 8192


def test_gumbel_goal_rows():
    recs = [
        {
            "status": "ok",
            "op": "gumbel_softmax",
            "backend": "cpp",
            "mode": "fwd+bwd",
            "dtype": "float32",
            "shape": [2, 3],
            "variant": {"hard": False},
            "speedup_vs_torch": 4.0,
            "speedup_vs_compile": 1.2,
            "memory_vs_torch": 0.4,
        }
    ]
    rows = {r["goal"]: r for r in gumbel.goals(recs, "cpu")}
    assert rows["cpp fwd+bwd speed-up vs torch eager"]["status"] == "PASS"
    assert rows["cpp fwd+bwd speed-up vs torch.compile"]["status"] == "MISS"
    assert rows["cpp fwd+bwd peak extra memory / torch eager's"]["status"] == "PASS"
    assert all(r["status"] == "N/A" for r in gumbel.goals([], "gpu"))
