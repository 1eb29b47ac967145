"""pytest wrapper of the dvae family suite: `pytest benchmarks/` runs it and writes the JSON and summary.

One test per case (every backend of the device and both peers measured side by side); the module fixture
writes benchmarks/results/<machine>-dvae[-smoke].json and .txt when the module ends and prints the summary.
Environment: DALLE_FAST_BENCH_SMOKE=1 (tiny shapes, one repeat: CI), DALLE_FAST_BENCH_DEVICE=cpu|cuda,
DALLE_FAST_BENCH_QUICK=1, DALLE_FAST_BENCH_REPEATS=n,
DALLE_FAST_BENCH_TIME_BUDGET=seconds, DALLE_FAST_BENCH_OUT=folder.
A backend that raises fails its case's test; a missed performance goal does not fail anything (it is
printed as MISS in the summary).
"""

import contextlib

import pytest

from . import dvae, harness

SETTINGS = dvae.settings_from_env()
CASES = dvae.cases(SETTINGS["device"], smoke=SETTINGS["smoke"], quick=SETTINGS["quick"])


@pytest.fixture(scope="module")
def suite(request):
    if harness.interpreter_active():
        pytest.skip("TRITON_INTERPRET is set: runs under the Triton interpreter are never timed")
    if SETTINGS["device"].type == "cuda":
        import torch

        if not torch.cuda.is_available():
            pytest.skip("DALLE_FAST_BENCH_DEVICE=cuda but no CUDA device is visible")
    s = dvae.new_suite(SETTINGS)
    yield s
    res = s.finish(dvae.goals)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print("\n" + res["text"] + f"wrote {res['json']} and {res['summary']}", flush=True)


@pytest.mark.parametrize("case", CASES, ids=[dvae.case_id(c) for c in CASES])
def test_dvae(suite, case):
    recs = dvae.run_case(suite, case)
    errors = [f"{r['backend']}: {r['reason']}" for r in recs if r["status"] == "error"]
    assert not errors, "; ".join(errors)
    assert any(r["status"] == "ok" for r in recs) or all(r.get("reason") == "time budget spent" for r in recs)
