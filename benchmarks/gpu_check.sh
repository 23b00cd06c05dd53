#!/usr/bin/env bash
# The GPU check, in two stages that each fit one call of a lent GPU (15 minutes of device
# time for a whole issue, start-up included; one call runs 10 minutes at most):
#
#   STAGE=1 bash benchmarks/gpu_check.sh   # <= 5 min: build, GPU-only tests at small shapes,
#                                          #  one benchmark point per op (N = 4096, V = 128256)
#   STAGE=2 bash benchmarks/gpu_check.sh   # <= 9.5 min: the whole suite, the full sweep of row
#                                          #  ops (4 vocabularies, torch.compile too), fused-linear
#
# Nothing here may waste the GPU's time:
# - CUDA_HOME is the real toolkit's, read from nvcc itself (`nvcc -v` prints TOP=...): the
#   nvcc on PATH may be a wrapper script that execs the toolkit's, and torch would then
#   guess CUDA_HOME from the wrapper's folder and fail on cuda_runtime.h.
# - The CUDA extension is built for this GPU's architecture only. If that build fails, the
#   C++ CPU extension is built alone and every later step still runs (Triton backend,
#   eager, torch.compile and Liger-Kernel rows of the benchmark); the failure is in the log.
#   Stage 2 reuses stage 1's build where the sources and torch have not changed.
# - Every step has its own timeout and writes its results under $OUT as it goes, so a
#   call cut short still brings back what was done (at most 8 files come back per call:
#   each stage writes stage<N>.log, stage<N>_tests.log and its benchmarks' csv/json).
# - Python packages the machine lacks are carried as wheels in .whl/ (`make gpu-wheels`,
#   on a machine with network: Liger-Kernel and Cut-Cross-Entropy, pure-Python wheels)
#   and installed from there, offline, before anything else.
#
# Environment: STAGE (1 or 2, default 1), OUT (default benchmarks/results/gpu), PYTHON
# (default python3), STAGE_SECONDS (the stage's whole budget; default 290 / 570), BUILD_SECONDS
# (the build's timeout, default 200),
# UNLEARN_EXT_FORCE_CUDA_BUILD_FAILURE=1 (test the fallback: the CUDA build is made to fail).
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${STAGE:-1}
case "$STAGE" in 1 | 2) ;; *) echo "gpu_check: STAGE must be 1 or 2, not '$STAGE'" >&2; exit 2 ;; esac
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LOG="$OUT/stage$STAGE.log"
TESTLOG="$OUT/stage${STAGE}_tests.log"
: > "$LOG"
: > "$TESTLOG"
export PYTHONUNBUFFERED=1
DEADLINE=$(( $(date +%s) + ${STAGE_SECONDS:-$([ "$STAGE" = 1 ] && echo 290 || echo 570)} ))
left() { echo $(( DEADLINE - $(date +%s) )); }
# at_most N: N seconds, or what is left of the stage less 10 s (never under 20).
at_most() { local l=$(( $(left) - 10 )); l=$(( l < $1 ? l : $1 )); echo $(( l > 20 ? l : 20 )); }
say() { echo "== [stage $STAGE, $(left) s left] $*" | tee -a "$LOG"; }
status=0

# ---- environment -----------------------------------------------------------------------
say "machine: $(nvidia-smi -L 2>/dev/null | head -1 || echo 'no nvidia-smi'); $(nproc) cores; python $($PY -c 'import sys; print(sys.version.split()[0])')"
if [ -z "${CUDA_HOME:-}" ]; then
  NVCC_BIN=$(command -v nvcc || { test -x /usr/local/cuda/bin/nvcc && echo /usr/local/cuda/bin/nvcc; } || true)
  if [ -n "$NVCC_BIN" ]; then
    # TOP= is the toolkit's root as nvcc sees it; else the folder of its INCLUDES, less
    # include/ (and targets/<arch>/); else the resolved binary's parent folder.
    top=$("$NVCC_BIN" -v -x cu -E /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
    if [ -z "$top" ]; then
      inc=$("$NVCC_BIN" -v -x cu -E /dev/null -o /dev/null 2>&1 | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -1)
      [ -n "$inc" ] && top=$(echo "$inc" | sed -e 's#/include/*$##' -e 's#/targets/[^/]*$##')
    fi
    [ -z "$top" ] && top=$(dirname "$(dirname "$(readlink -f "$NVCC_BIN")")")
    [ -n "$top" ] && [ -f "$top/bin/nvcc" ] && export CUDA_HOME=$(readlink -f "$top")
  fi
fi
say "CUDA_HOME=${CUDA_HOME:-none found} (nvcc: ${NVCC_BIN:-${CUDA_HOME:-?}/bin/nvcc})"

if compgen -G ".whl/*.whl" > /dev/null; then
  say "installing the carried wheels into /tmp/site: $(cd .whl && echo *.whl)"
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl >> "$LOG" 2>&1; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    say "the wheels did not install (see above); the comparison rows will say 'not importable'"
  fi
else
  say "no .whl/ wheels carried: Liger-Kernel and Cut-Cross-Entropy rows will say 'not importable' (make gpu-wheels)"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# ---- build -----------------------------------------------------------------------------
# The stamp: the sources' and torch's fingerprint of the last good build in this tree.
fingerprint() {
  { cat setup.py $(find csrc -type f | sort); $PY -c "import torch; print(torch.__version__, torch.version.cuda)"; } \
    | sha256sum | cut -c1-16
}
STAMP=build/gpu_check.stamp
ARCH=$($PY -c "import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else None; print(f'{c[0]}.{c[1]}' if c else '9.0')" 2>/dev/null || echo 9.0)
build() {  # build CUDA_MODE: build_ext in place, the log appended to $LOG
  local mode=$1 force=${UNLEARN_EXT_FORCE_CUDA_BUILD_FAILURE:-0}
  local extra=()
  # The forced failure: an nvcc flag that does not exist, so the real nvcc rejects the build.
  [ "$mode" = 1 ] && [ "$force" = 1 ] && extra=(NVCC_APPEND_FLAGS=--forced-failure-of-gpu-check)
  env "${extra[@]}" UNLEARN_EXT_BUILD_CUDA=$mode TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    timeout "$(at_most ${BUILD_SECONDS:-200})" $PY setup.py build_ext --inplace >> "$LOG" 2>&1
}
fp=$(fingerprint)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$fp" ] && $PY -c "import unlearn_ext._C_cuda" 2>/dev/null; then
  say "build: unchanged since the last good CUDA build in this tree, not rebuilt"
else
  say "build: C++ and CUDA extensions for sm_${ARCH/./} (UNLEARN_EXT_BUILD_CUDA=1)"
  if build 1; then
    mkdir -p build && echo "$fp" > "$STAMP"
    say "build: done"
  else
    status=1
    grep -E "error|Error" "$LOG" | tail -8 | sed 's/^/   | /' | tee -a "$LOG"
    say "build: the CUDA build FAILED (above; whole log in $LOG): building the CPU extension alone and going on"
    rm -f "$STAMP" unlearn_ext/_C_cuda*.so
    build 0 || say "build: the CPU extension failed too: the cpu backend is missing, going on"
  fi
fi
$PY -c "import torch, unlearn_ext as ue
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'
print(f'torch {torch.__version__} (CUDA {torch.version.cuda}); {dev}')
for name, s in ue.backends().items(): print(f'  backend {name}: {s!r}')" 2>&1 | tee -a "$LOG"

# ---- tests -----------------------------------------------------------------------------
WORKERS=$($PY -c "import xdist" 2>/dev/null && echo "-n ${GPU_CHECK_WORKERS:-8}")
run_tests() {  # run_tests SECONDS DESCRIPTION PYTEST-ARGS...
  local seconds=$1 what=$2; shift 2
  say "tests: $what (at most $seconds s)"
  echo "==== $what: pytest $*" >> "$TESTLOG"
  timeout "$seconds" $PY -m pytest -q -rs -p no:cacheprovider "$@" >> "$TESTLOG" 2>&1
  local rc=$?
  [ $rc = 124 ] && say "tests: $what cut at $seconds s"
  tail -3 "$TESTLOG" | tee -a "$LOG"
  return $rc
}
# The ops' own files, on the GPU backends only (their ids end in -cuda), at small shapes.
GPU_IDS="cuda-cuda or triton-cuda or torch-cuda"
OP_FILES="tests/test_token_logprob.py tests/test_cross_entropy.py tests/test_forward_kl.py tests/test_reverse_kl.py tests/test_rkld.py tests/test_undial.py"
if [ "$STAGE" = 1 ]; then
  run_tests "$(at_most 60)" "CUDA kernels (tests/test_cuda_kernels.py, not slow)" \
    -m "not slow" tests/test_cuda_kernels.py || status=1
  run_tests "$(at_most 90)" "row ops on the GPU backends + Triton's own tests" $WORKERS \
    -m "not slow" -k "$GPU_IDS" $OP_FILES tests/test_triton_kernels.py || status=1
  run_tests "$(at_most 40)" "no host sync, CUDA graph capture (tests/test_no_host_sync.py, GPU cases)" \
    -k "gpu" tests/test_no_host_sync.py || status=1
else
  run_tests "$(at_most 240)" "the whole suite (slow tests too: a GPU has the memory)" $WORKERS \
    --durations=10 tests || status=1
fi

# ---- benchmarks ------------------------------------------------------------------------
bench() {  # bench SECONDS NAME ARGS...: bench_gpu_ops.py into $OUT/<NAME>.{csv,json,log}
  local seconds=$1 name=$2; shift 2
  say "benchmark $name: bench_gpu_ops.py $* (at most $seconds s)"
  timeout "$seconds" $PY benchmarks/bench_gpu_ops.py --out "$OUT" --name "$name" \
    --time-budget $(( seconds - 20 )) "$@" 2>&1 | tee -a "$LOG" | tail -12
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
}
if [ "$STAGE" = 1 ]; then
  bench "$(at_most 150)" stage1_ops --rows 4096 --vocab 128256 --impls cuda,triton,eager,liger --repeats 5
else
  bench "$(at_most 200)" stage2_ops
  say "benchmark fused-linear: bench_fused_linear.py --device cuda"
  timeout "$(at_most 120)" $PY benchmarks/bench_fused_linear.py --device cuda --out "$OUT" --json stage2_fused_linear.json 2>&1 \
    | tee -a "$LOG" | tail -20 || status=1
fi

say "done (exit status $status; results in $OUT)"
exit $status
