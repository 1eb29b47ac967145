"""pytest wrapper of the matmul family suite: `pytest benchmarks/` runs it and writes the JSON and summary.

One test per case (every backend of the device and the peers measured side by side); the module fixture
writes benchmarks/results/<machine>-matmul[-smoke].json and .txt when the module ends and prints the summary.
Environment: DALLE_FAST_BENCH_SMOKE=1 (tiny shapes, one repeat: CI), DALLE_FAST_BENCH_DEVICE=cpu|cuda,
DALLE_FAST_BENCH_QUICK=1, DALLE_FAST_BENCH_REPEATS=n, DALLE_FAST_BENCH_TIME_BUDGET=seconds,
DALLE_FAST_BENCH_OUT=folder. A backend that raises fails its case's test; a missed goal does not.
"""

import contextlib

import pytest

from . import harness, matmul

SETTINGS = matmul.settings_from_env()
CASES = matmul.cases(SETTINGS["device"], smoke=SETTINGS["smoke"], quick=SETTINGS["quick"])


@pytest.fixture(scope="module")
def suite(request):
    if harness.interpreter_active():
        pytest.skip("TRITON_INTERPRET is set: runs under the Triton interpreter are never timed")
    if SETTINGS["device"].type == "cuda":
        import torch

        if not torch.cuda.is_available():
            pytest.skip("DALLE_FAST_BENCH_DEVICE=cuda but no CUDA device is visible")
    s = matmul.new_suite(SETTINGS)
    yield s
    res = s.finish(matmul.goals)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print("\n" + res["text"] + f"wrote {res['json']} and {res['summary']}", flush=True)


@pytest.mark.parametrize("case", CASES, ids=[matmul.case_id(c) for c in CASES])
def test_matmul(suite, case):
    recs = matmul.run_case(suite, case)
    errors = [f"{r['backend']}: {r['reason']}" for r in recs if r["status"] == "error"]
    assert not errors, "; ".join(errors)
    assert any(r["status"] == "ok" for r in recs) or all(r.get("reason") == "time budget spent" for r in recs)
