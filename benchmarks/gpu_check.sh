#!/usr/bin/env bash
# One command for a GPU machine: builds the C++ and CUDA extensions, runs the whole test
# suite (the CUDA backend joins every shared test, and tests/test_cuda_kernels.py runs),
# benchmarks the row ops (benchmarks/bench_gpu_ops.py), then the fused-linear losses, and
# the end-to-end step benchmark where that script exists. Everything lands in
# ${OUT:-benchmarks/results}; a short table is printed last.
#
#   bash benchmarks/gpu_check.sh
#   OUT=/tmp/out GPU_CHECK_SECONDS=1800 bash benchmarks/gpu_check.sh     # more time, fuller runs
#
# It fits a 10-minute call: GPU_CHECK_SECONDS (default 560) is shared out between the
# steps, the row-op benchmark stops starting new cases when its share is spent (what it
# skipped is listed), and the later benchmarks get what is left. Python packages the
# machine lacks (Liger-Kernel, for the comparison) can be carried as wheels in .whl/,
# downloaded beforehand on a machine with network:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl liger-kernel
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LOG="$OUT/gpu_check.log"
: > "$LOG"
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-560} ))
left() { echo $(( DEADLINE - $(date +%s) )); }
share() { local s=$(( $(left) * $1 / $2 )); echo $(( s > 30 ? s : 30 )); }  # seconds: that share of what is left, at least 30
say() { echo "== [$(left) s left] $*" | tee -a "$LOG"; }
status=0

if compgen -G ".whl/*.whl" > /dev/null; then
  say "installing the carried wheels: $(cd .whl && echo *.whl)"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$LOG" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

say "building the extensions (UNLEARN_EXT_BUILD_CUDA=1)"
if ! UNLEARN_EXT_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    $PY -m pip install -e . --no-build-isolation --no-deps >> "$LOG" 2>&1; then
  tail -40 "$LOG"
  echo "gpu_check: the build failed (full log: $LOG)"
  exit 1
fi
$PY -c "import torch, unlearn_ext as ue; print(torch.cuda.get_device_name(), torch.__version__); print(ue.backends())" \
  2>&1 | tee -a "$LOG"

# Tests: the CUDA-only file first (it must not be cut short), then the whole suite.
WORKERS=$($PY -c "import xdist" 2>/dev/null && echo "-n ${GPU_CHECK_WORKERS:-8}")
say "tests/test_cuda_kernels.py"
timeout "$(share 1 3)" $PY -m pytest -q -rs -p no:cacheprovider tests/test_cuda_kernels.py 2>&1 | tee -a "$LOG" \
  | tail -15 || status=1
say "the whole test suite ($WORKERS)"
timeout "$(share 1 2)" $PY -m pytest -q -p no:cacheprovider -m "not slow" $WORKERS --durations=10 tests \
  --ignore=tests/test_cuda_kernels.py 2>&1 | tee -a "$LOG" | tail -25 || status=1

# Benchmarks: the row ops get two thirds of what is left, the optional ones the rest.
BENCH_SECONDS=$(share 2 3)
say "benchmarks/bench_gpu_ops.py (budget ${BENCH_SECONDS} s)"
$PY benchmarks/bench_gpu_ops.py --out "$OUT" --time-budget "$BENCH_SECONDS" > "$OUT/bench_gpu_ops.log" 2>&1 \
  || status=1
cat "$OUT/bench_gpu_ops.log" >> "$LOG"

say "benchmarks/bench_fused_linear.py --device cuda"
timeout "$(share 1 2)" $PY benchmarks/bench_fused_linear.py --device cuda --out "$OUT/fused_linear" 2>&1 \
  | tee -a "$LOG" | tail -20 || status=1
if [ -f benchmarks/bench_e2e_step.py ]; then
  say "benchmarks/bench_e2e_step.py --device cuda"
  timeout "$(share 9 10)" $PY benchmarks/bench_e2e_step.py --device cuda --out "$OUT/e2e" 2>&1 \
    | tee -a "$LOG" | tail -20 || status=1
fi

say "done (exit status $status; everything is in $OUT)"
sed -n '/^# summary/,$p' "$OUT/bench_gpu_ops.log"
exit $status
