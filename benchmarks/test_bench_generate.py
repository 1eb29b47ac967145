"""pytest wrapper of the generate family suite (harness.pytest_family: one test per case); environment as in
benchmarks/test_bench_dvae.py."""

from . import generate, harness

SETTINGS = generate.settings_from_env()
CASES = generate.cases(SETTINGS["device"], smoke=SETTINGS["smoke"], quick=SETTINGS["quick"])
suite, test_generate = harness.pytest_family(generate, SETTINGS, CASES)
