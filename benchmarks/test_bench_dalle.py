"""pytest wrapper of the dalle family suite (a DALL-E transformer training step): `pytest benchmarks/` runs it and
writes benchmarks/results/<machine>-dalle[-smoke].json and .txt (harness.pytest_family: one test per case).
Environment: DALLE_FAST_BENCH_SMOKE=1 (tiny shapes, one repeat: CI), DALLE_FAST_BENCH_DEVICE=cpu|cuda,
DALLE_FAST_BENCH_QUICK=1, DALLE_FAST_BENCH_REPEATS=n, DALLE_FAST_BENCH_TIME_BUDGET=seconds,
DALLE_FAST_BENCH_OUT=folder.
"""

from . import dalle, harness

SETTINGS = dalle.settings_from_env()
CASES = dalle.cases(SETTINGS["device"], smoke=SETTINGS["smoke"], quick=SETTINGS["quick"])
suite, test_dalle = harness.pytest_family(dalle, SETTINGS, CASES)
