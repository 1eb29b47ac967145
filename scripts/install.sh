#!/usr/bin/env bash
# Installs everything dalle_fast needs into ./.venv (created if missing) and builds dalle_fast._C.
#   torch 2.14.1: a CUDA build, so that the CUDA sources compile and link even without a GPU
#   DALLE_FAST_CUDA: auto by default; CI sets 1 so a CUDA compile error fails the build
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip "setuptools>=64" wheel
.venv/bin/python -m pip install -q "torch==${DALLE_FAST_TORCH:-2.14.1}" numpy ninja pytest pytest-benchmark scipy ruff tokenizers
# Test-only: the official dVAE (pip package dall-e) for the parity and loader tests; --no-deps, since it
# pins torchvision, Pillow, blobfile and mypy, none of which those tests use.
.venv/bin/python -m pip install -q --no-deps dall-e && .venv/bin/python -m pip install -q attrs requests
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
# The build (minutes with the CUDA sources) is skipped when the built extension is newer than every source and
# was built with the same settings: test.sh and bench.sh call this script again after CI's first install.
# DALLE_FAST_REBUILD=1 forces it.
stamp=.venv/.dalle_fast_build
want="DALLE_FAST_CUDA=${DALLE_FAST_CUDA:-auto} TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
so=$(ls dalle_fast/_C*.so 2>/dev/null | head -n 1 || true)
if [ "${DALLE_FAST_REBUILD:-0}" != 1 ] && [ -n "$so" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
    && [ -z "$(find csrc setup.py -newer "$so" -print -quit)" ]; then
    echo "dalle_fast._C is up to date ($want): not rebuilt (DALLE_FAST_REBUILD=1 forces a build)"
else
    rm -f "$stamp"
    .venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
    echo "$want" > "$stamp"
fi
.venv/bin/python - <<'PY'
import dalle_fast, torch, triton
if dalle_fast.extension_error:
    raise SystemExit(f"dalle_fast._C failed to load: {dalle_fast.extension_error}")
print(f"dalle_fast {dalle_fast.__version__}: torch {torch.__version__}, triton {triton.__version__}, "
      f"CUDA kernels: {torch._C._dispatch_has_kernel_for_dispatch_key('dalle_fast::gumbel_softmax_fwd', 'CUDA')}")
PY
