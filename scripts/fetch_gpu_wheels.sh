#!/usr/bin/env bash
# Download, here (with network), the wheels the GPU machine lacks, for its Python 3.12 x86-64, into .whl/
# (ignored by git). scripts/gpu_check.sh installs whatever .whl/ holds into /tmp/site; name .whl in the
# device call's carry list. Keep one version per package: two stop the whole install there.
#
#   scripts/fetch_gpu_wheels.sh [NAME[==VERSION] ...]
#
# Default: what the benchmark suite and the tests import beyond torch/triton/numpy: pytest-benchmark and
# py-cpuinfo (the harness reads the CPU model through it when /proc/cpuinfo says nothing). The H200 image
# already has both, and scipy, pytest, numpy (/work/.library/device/KINDS.md, 2026-11): carrying them only
# pins the versions. Dependencies are not followed (--no-deps): name each missing one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PKGS=("$@")
[ ${#PKGS[@]} -eq 0 ] && PKGS=(pytest-benchmark py-cpuinfo)
mkdir -p .whl
grep -qx '/.whl/' .gitignore 2>/dev/null || grep -qx '/.whl/' .git/info/exclude 2>/dev/null \
  || echo '/.whl/' >> "$(git rev-parse --git-common-dir)/info/exclude"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
for spec in "${PKGS[@]}"; do
  name=${spec%%[=<>!~]*}
  norm=$(echo "$name" | tr 'A-Z-' 'a-z_')
  rm -f .whl/"$norm"-*.whl .whl/"$name"-*.whl  # one version of each
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$spec"
done
ls -la .whl
du -sh .whl | awk '{print "total " $1 " (the device call carries at most 64 MiB with the tree)"}'
