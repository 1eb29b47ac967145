"""pytest wrapper of the loss head family suite: `pytest benchmarks/` runs it and writes
benchmarks/results/<machine>-loss[-smoke].json and .txt (harness.pytest_family: one test per case).
Environment: DALLE_FAST_BENCH_SMOKE=1 (tiny shapes, one repeat: CI), DALLE_FAST_BENCH_DEVICE=cpu|cuda,
DALLE_FAST_BENCH_QUICK=1, DALLE_FAST_BENCH_REPEATS=n, DALLE_FAST_BENCH_TIME_BUDGET=seconds,
DALLE_FAST_BENCH_OUT=folder.
"""

from . import harness, loss

SETTINGS = loss.settings_from_env()
CASES = loss.cases(SETTINGS["device"], smoke=SETTINGS["smoke"], quick=SETTINGS["quick"])
suite, test_loss = harness.pytest_family(loss, SETTINGS, CASES)
