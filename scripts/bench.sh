#!/usr/bin/env bash
# Installs (scripts/install.sh) and runs the benchmark suite on this machine's device; JSON and a text
# summary land in benchmarks/results/ (see benchmarks/README.md). DALLE_FAST_BENCH_SMOKE=1: tiny shapes,
# one repeat (CI). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python -m pytest benchmarks -q -p no:cacheprovider "$@"
