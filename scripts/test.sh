#!/usr/bin/env bash
# Installs (scripts/install.sh) and runs the test suite on CPU: C++ kernels natively, Triton kernels under
# TRITON_INTERPRET=1 (tests/conftest.py switches it on). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
