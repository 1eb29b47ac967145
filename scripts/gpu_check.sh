#!/usr/bin/env bash
# One prepared GPU check for the H200 device machine (torch 2.11, triton 3.6, nvcc 13.0, Python 3.12, 16 cores,
# no network). Fits one call of at most 8 minutes on a fresh machine; everything it finds lands in $OUT.
#
#   scripts/gpu_check.sh [--family NAME]... [--quick] [--budget SECONDS] [--no-build] [--no-tests]
#                        [--no-sanitizer] [--no-bench] [--dry-run]
#
# Stages, each timed, each failure recorded, the script always goes on to the next and to the summary:
#   env        machine, driver, versions, commit                                     -> summary.txt
#   wheels     pip install .whl/*.whl into /tmp/site (only if .whl/ holds wheels)    -> build.log
#   build      pip install --no-build-isolation --no-deps -e . (DALLE_FAST_CUDA=1, sm_90, MAX_JOBS=16)
#                                                                                    -> build.log
#   tests      DALLE_FAST_TEST_DEVICES=cuda pytest tests (no failure tolerated)      -> tests.log
#   sanitizer  compute-sanitizer memcheck on scripts/sanitize_ops.py, if present     -> sanitizer.log
#   bench      python3 -m benchmarks.<family> --device cuda for each family          -> bench.log, JSON
# Exit status: 0 when every stage that ran passed (a stage skipped for want of a GPU or time is not a
# failure, but is listed), 1 otherwise. Without a GPU the CUDA stages are skipped with that reason and the
# benchmark runs in smoke mode on the CPU, to exercise the plumbing (use OUT=/tmp/out locally).
#
# Files back from the device tool are limited (8 files, 2 folders deep), so $OUT holds: summary.txt,
# build.log, tests.log, sanitizer.log, bench.log and one JSON per family (packed into bench-results.tar when
# that would pass 8 files). The family's text summary is inside summary.txt.
#
# Device tool call (from the repo root, with .whl carried if it exists):
#   run(command="bash scripts/gpu_check.sh --family gumbel", carry=[".whl"], timeout_s=540)

set -u
START=$(date +%s)
FAMILIES=()
QUICK=0
BUDGET=450          # seconds for the whole script; the call limit is 8 min, keep margin for start and transfer
RESERVE=25          # seconds always kept for writing the summary
DO_BUILD=1 DO_TESTS=1 DO_SAN=1 DO_BENCH=1 DRY=0
PYTHON=${PYTHON:-python3}

while [ $# -gt 0 ]; do
  case "$1" in
    --family) FAMILIES+=("$2"); shift 2 ;;
    --family=*) FAMILIES+=("${1#--family=}"); shift ;;
    --quick) QUICK=1; shift ;;
    --budget) BUDGET=$2; shift 2 ;;
    --no-build) DO_BUILD=0; shift ;;
    --no-tests) DO_TESTS=0; shift ;;
    --no-sanitizer) DO_SAN=0; shift ;;
    --no-bench) DO_BENCH=0; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
OUT=${OUT:-$ROOT/.gpu-out}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
STAGES=$OUT/.stages
: > "$STAGES"
FAILED=0
export PYTHONUNBUFFERED=1

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# Usable seconds for a stage: min(cap, time left - reserve); empty when under `need`.
stage_limit() {
  local cap=$1 need=$2 l
  l=$(( $(left) - RESERVE ))
  [ "$l" -gt "$cap" ] && l=$cap
  [ "$l" -ge "$need" ] && echo "$l"
}
record() {  # stage status seconds note
  printf '%-13s %-5s %5ss  %s\n' "$1" "$2" "$3" "$4" >> "$STAGES"
  echo "== stage $1: $2 ($3 s) $4"
  [ "$2" = FAIL ] && FAILED=1
  return 0
}
# run_stage NAME CAP NEED LOG cmd...: runs cmd under `timeout`, records PASS/FAIL/SKIP.
run_stage() {
  local name=$1 cap=$2 need=$3 log=$4; shift 4
  local lim t0 rc
  lim=$(stage_limit "$cap" "$need")
  if [ -z "$lim" ]; then record "$name" SKIP 0 "time budget: $(left) s left, needs $need"; return 0; fi
  if [ "$DRY" = 1 ]; then record "$name" DRY 0 "would run (limit ${lim}s): $*"; return 0; fi
  echo "== stage $name (limit ${lim}s): $*" | tee -a "$log"
  t0=$(date +%s)
  timeout -s TERM -k 20 "$lim" "$@" >> "$log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then record "$name" PASS "$dt" "";
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then record "$name" FAIL "$dt" "timed out after ${lim}s (see $(basename "$log"))";
  else record "$name" FAIL "$dt" "exit $rc (see $(basename "$log"))"; fi
  return 0
}

# ---------------------------------------------------------------------------------------------- env
HAVE_GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then HAVE_GPU=1; fi
{
  echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) budget ${BUDGET}s quick=$QUICK dry=$DRY"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain --untracked-files=no 2>/dev/null | wc -l) modified files"
  echo "host: $(uname -srm), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
  if [ $HAVE_GPU = 1 ]; then nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader; else echo "GPU: none visible (nvidia-smi missing or no device): CUDA stages are skipped"; fi
  command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -2 | head -1
  "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda, "| cuda available", torch.cuda.is_available())' 2>&1
  "$PYTHON" -c 'import triton; print("triton", triton.__version__)' 2>&1 | tail -1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
record env PASS 0 ""

# ------------------------------------------------------------------------------------------- wheels
if compgen -G ".whl/*.whl" > /dev/null; then
  if [ "$DRY" = 1 ]; then record wheels DRY 0 "would install $(ls .whl/*.whl | wc -l) wheels into /tmp/site"
  elif "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >> "$OUT/build.log" 2>&1; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    record wheels PASS 0 "$(ls .whl/*.whl | wc -l) wheels"
  else record wheels FAIL 0 "pip install of .whl/*.whl failed (see build.log)"; fi
else
  record wheels SKIP 0 "no .whl/ wheels carried"
fi

# --------------------------------------------------------------------------------------------- families
EXPLICIT=1
if [ ${#FAMILIES[@]} -eq 0 ]; then
  EXPLICIT=0
  read -r -a FAMILIES <<< "$("$PYTHON" -c 'from benchmarks.families import FAMILIES; print(*FAMILIES)' 2>/dev/null || echo gumbel)"
fi
echo "families: ${FAMILIES[*]}"
FAM_ARGS=()
for f in "${FAMILIES[@]}"; do FAM_ARGS+=(--family "$f"); done

# ---------------------------------------------------------------------------------------------- build
if [ $DO_BUILD = 0 ]; then record build SKIP 0 "--no-build"
elif [ $HAVE_GPU = 0 ]; then record build SKIP 0 "no GPU: the CUDA build is not attempted (build here with pip install -e .)"
else
  run_stage build 300 60 "$OUT/build.log" \
    env TORCH_CUDA_ARCH_LIST=9.0 DALLE_FAST_CUDA=1 MAX_JOBS=16 \
    "$PYTHON" -m pip install --no-build-isolation --no-deps --no-cache-dir -v -e .
  [ $DRY = 0 ] && "$PYTHON" -c 'import dalle_fast, torch; dalle_fast.load(); print("dalle_fast._C:", dalle_fast.load_error or "loaded"); print("cuda kernels registered:", dalle_fast.has_kernel("gumbel_softmax_fwd", "CUDA"))' >> "$OUT/build.log" 2>&1
fi

# ---------------------------------------------------------------------------------------------- tests
TEST_PATHS=(tests)
if [ "$EXPLICIT" = 1 ]; then  # an explicit --family narrows the tests to tests/test_<family>*.py and tests/test_*_<family>*.py when they exist
  sel=()
  for f in "${FAMILIES[@]}"; do for p in tests/test_"$f"*.py tests/test_*_"$f"*.py; do [ -e "$p" ] && sel+=("$p"); done; done
  for f in "${FAMILIES[@]}"; do [ "$f" = matmul ] && [ -e tests/test_amp.py ] && sel+=(tests/test_amp.py); done  # amp rides on matmul
  [ ${#sel[@]} -gt 0 ] && TEST_PATHS=("${sel[@]}")
fi
if [ $DO_TESTS = 0 ]; then record tests SKIP 0 "--no-tests"
elif [ $HAVE_GPU = 0 ]; then record tests SKIP 0 "no GPU"
elif [ ! -d tests ]; then record tests FAIL 0 "no tests/ folder"
else
  tcap=200; [ $QUICK = 1 ] && tcap=120
  run_stage tests $tcap 30 "$OUT/tests.log" \
    env DALLE_FAST_TEST_DEVICES=cuda \
    "$PYTHON" -m pytest "${TEST_PATHS[@]}" -q -rfEs -p no:cacheprovider --durations=15
fi

# ------------------------------------------------------------------------------------------ sanitizer
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ $DO_SAN = 0 ]; then record sanitizer SKIP 0 "--no-sanitizer"
elif [ $HAVE_GPU = 0 ]; then record sanitizer SKIP 0 "no GPU"
elif [ -z "$SAN" ]; then record sanitizer SKIP 0 "compute-sanitizer not found"
else
  scap=120; [ $QUICK = 1 ] && scap=80
  run_stage sanitizer $scap 40 "$OUT/sanitizer.log" \
    env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --error-exitcode 86 --print-limit 50 \
    "$PYTHON" scripts/sanitize_ops.py "${FAM_ARGS[@]}"
  if grep -q "Device not supported" "$OUT/sanitizer.log" 2>/dev/null; then
    sed -i '$d' "$STAGES"; FAILED=0; grep -q ' FAIL ' "$STAGES" && FAILED=1
    record sanitizer SKIP 0 "compute-sanitizer refused the device (gVisor machine?)"
  fi
fi

# ---------------------------------------------------------------------------------------------- bench
BENCH_ARGS=(--device cuda --out "$OUT")
[ $HAVE_GPU = 0 ] && BENCH_ARGS=(--device cpu --smoke --out "$OUT")
[ $QUICK = 1 ] && BENCH_ARGS+=(--quick)
if [ $DO_BENCH = 0 ]; then record bench SKIP 0 "--no-bench"
else
  [ $HAVE_GPU = 0 ] && echo "no GPU: benchmarks run in smoke mode on the CPU (plumbing only)"
  nf=${#FAMILIES[@]}
  i=0
  for f in "${FAMILIES[@]}"; do
    i=$((i + 1))
    # split what is left between the remaining families; the runner stops starting cases 15 s before
    share=$(( ($(left) - RESERVE) / (nf - i + 1) ))
    run_stage "bench:$f" "$share" 45 "$OUT/bench.log" \
      env TORCHINDUCTOR_COMPILE_THREADS=16 \
      "$PYTHON" -m "benchmarks.$f" "${BENCH_ARGS[@]}" --time-budget $(( share > 30 ? share - 20 : 10 ))
  done
fi

# -------------------------------------------------------------------------------------------- summary
{
  cat "$OUT/env.txt"
  echo
  echo "stages (total $(( $(date +%s) - START )) s of ${BUDGET}):"
  cat "$STAGES"
  for t in "$OUT"/*.txt; do
    case "$(basename "$t")" in summary.txt|env.txt) continue ;; esac
    echo; echo "---- $(basename "$t")"; cat "$t"; rm -f "$t"
  done
  while read -r name status _; do
    [ "$status" = FAIL ] || continue
    log=$OUT/${name%%:*}.log
    [ -f "$log" ] && { echo; echo "---- last 60 lines of $(basename "$log") (stage $name failed)"; tail -n 60 "$log"; }
  done < "$STAGES"
  echo
  [ $FAILED = 0 ] && echo "RESULT: PASS (every stage that ran passed)" || echo "RESULT: FAIL"
} > "$SUMMARY"
rm -f "$OUT/env.txt" "$STAGES"
n=$(find "$OUT" -maxdepth 1 -type f | wc -l)
if [ "$n" -gt 8 ]; then
  (cd "$OUT" && tar cf bench-results.tar ./*.json && rm -f ./*.json)
fi
cat "$SUMMARY"
exit $FAILED
