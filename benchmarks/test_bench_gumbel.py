"""pytest wrapper of the gumbel family suite: `pytest benchmarks/` runs it and writes
benchmarks/results/<machine>-gumbel[-smoke].json and .txt (harness.pytest_family: one test per case).
Environment: DALLE_FAST_BENCH_SMOKE=1 (tiny shapes, one repeat: CI), DALLE_FAST_BENCH_DEVICE=cpu|cuda,
DALLE_FAST_BENCH_QUICK=1, DALLE_FAST_BENCH_CPU_BATCH=B, DALLE_FAST_BENCH_REPEATS=n,
DALLE_FAST_BENCH_TIME_BUDGET=seconds, DALLE_FAST_BENCH_OUT=folder.
"""

from . import gumbel, harness

SETTINGS = gumbel.settings_from_env()
CASES = gumbel.cases(
    SETTINGS["device"], smoke=SETTINGS["smoke"], quick=SETTINGS["quick"], cpu_batch=SETTINGS["cpu_batch"]
)
suite, test_gumbel = harness.pytest_family(gumbel, SETTINGS, CASES)
