#!/usr/bin/env bash
# The GPU check as one run that fits a time budget: correctness first, then timings.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--budget SECONDS] [--dry-run] [--with-compile]
#
#   --out DIR        where the log, summary.tsv and the pytest-benchmark JSON go
#                    (default $HOME/addp-gpu-check-<date>-<time>, outside the source tree)
#   --budget S       wall-clock seconds for the whole run (default 420)
#   --dry-run        the same steps on the CPU at tiny shapes: a rehearsal of the run
#   --with-compile   add the torch.compile steps (minutes of compilation each)
#
# Every step gets min(its cap, time left - margin) seconds and is stopped with SIGINT, so
# pytest still prints its summary and writes its JSON. Each step appends one line to
# summary.tsv as it ends. Exit status: 0 when every step ran and passed, 1 otherwise,
# 2 on bad arguments.
set -uo pipefail
cd "$(dirname "$0")/.."

usage="usage: bash benchmarks/gpu_check.sh [--out DIR] [--budget SECONDS] [--dry-run] [--with-compile]"
fail() { echo "error: $*" >&2; exit 2; }
RESULTS_DIR="" BUDGET=420 DRY=0 COMPILE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || fail "--out needs a folder"; RESULTS_DIR="$2"; shift 2 ;;
    --budget) [ $# -ge 2 ] || fail "--budget needs a number of seconds"; BUDGET="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --with-compile) COMPILE=1; shift ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) fail "unknown argument '$1'; $usage" ;;
  esac
done
[[ "$BUDGET" =~ ^[0-9]+$ ]] || fail "--budget must be a whole number of seconds, got '$BUDGET'"

MARGIN=15  # seconds kept for the last summary line and the log
# caps in seconds: environment, build, GPU tests (the correctness part), then the timings
CAP_ENV=30 CAP_BUILD=150 CAP_TESTS=180 CAP_OPS=60 CAP_E2E=150 CAP_BREAKDOWN=120 CAP_VQ=120 CAP_E2E_COMPILE=240
CORRECTNESS=$(( CAP_ENV + CAP_BUILD + CAP_TESTS + MARGIN ))
[ "$BUDGET" -ge "$CORRECTNESS" ] || \
  fail "--budget $BUDGET is too small for the correctness steps (they may take up to $CORRECTNESS s)"

RESULTS_DIR="${RESULTS_DIR:-$HOME/addp-gpu-check-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$RESULTS_DIR" 2>/dev/null && [ -w "$RESULTS_DIR" ] && touch "$RESULTS_DIR/.write-test" 2>/dev/null || \
  fail "cannot write to the output folder '$RESULTS_DIR'"
rm -f "$RESULTS_DIR/.write-test"
RESULTS_DIR="$(cd "$RESULTS_DIR" && pwd)"

PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
START=$(date +%s)
if [ "$DRY" = 1 ]; then
  # tiny shapes on the CPU; the GPU-only tests report themselves as skipped
  export CUDA_VISIBLE_DEVICES="" ADDP_BENCH_PRESET=small ADDP_BENCH_PRECISION=fp32 ADDP_BENCH_BATCH=2 \
    ADDP_BENCH_STEPS=2 ADDP_BENCH_ROUNDS=1 ADDP_BUILD_CUDA=0
  OPS_SHAPE=(--B 2 --L 16 --K 32 --D 8 --iters 3)
else
  export ADDP_BENCH_PRESET=base ADDP_BENCH_PRECISION=bf16 ADDP_BENCH_ROUNDS=3 ADDP_BUILD_CUDA=1
  OPS_SHAPE=(--B 64 --L 256 --K 1024 --D 256 --iters 20)
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

# step NAME CAP COMMAND...: run COMMAND for at most min(CAP, time left - MARGIN) seconds
step() {
  local name="$1" cap="$2"; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) - MARGIN ))
  local limit=$(( cap < left ? cap : left ))
  echo; echo "=== $name (limit ${limit} s, $(date +%T))"
  if [ "$limit" -lt 5 ]; then
    printf '%s\tnot run\t-\t0\t%s\tno time left in the budget\n' "$name" "$limit" >> "$RESULTS_DIR/summary.tsv"
    status=1; return
  fi
  local t0; t0=$(date +%s)
  # SIGINT reaches the whole step (timeout signals its process group): pytest then prints its
  # summary and writes its JSON before it exits
  timeout -s INT -k 20 "$limit" bash -c '"$@"' step "$@"
  local rc=$?
  local took=$(( $(date +%s) - t0 )) state=ok
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then state="stopped at limit"; status=1
  elif [ "$rc" != 0 ]; then state=failed; status=1; fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$state" "$rc" "$took" "$limit" "$*" >> "$RESULTS_DIR/summary.tsv"
}

environment() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  echo "cores $(nproc); nvcc: $(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
  "$PY" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("triton", "timm", "pytest_benchmark", "xformers", "torch_fidelity", "safetensors", "sklearn"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "present"))
    except ImportError:
        print(name, "missing")
EOF
}

build() {
  local so; so=$("$PY" -c "import addp._C as c; print(c.__file__)" 2>/dev/null)
  if [ "$DRY" = 1 ] && [ -n "$so" ] && [ -z "$(find csrc setup.py -newer "$so" 2>/dev/null)" ]; then
    echo "addp._C is newer than every source: not rebuilt ($so)"  # the rehearsal's CPU-only build
  else
    "$PY" setup.py -q build_ext --inplace 2>&1 | tail -20
  fi
  "$PY" -c "import addp.ops as o; print('compiled ops loaded:', o.has_compiled_ops(), o.backends('cuda'))
assert o.has_compiled_ops()"
}

bench() {  # one benchmark file with its pytest-benchmark JSON; extra arguments go to pytest
  local name="$1"; shift
  "$PY" -m pytest -q -s -p no:cacheprovider -rs --benchmark-json="$RESULTS_DIR/$name.json" "$@"
}

export -f environment build bench
export RESULTS_DIR PY DRY

main() {
  status=0
  printf 'step\tstatus\texit\tseconds\tlimit\tcommand\n' > "$RESULTS_DIR/summary.tsv"
  echo "gpu_check: budget $BUDGET s, dry run $DRY, compile $COMPILE, output $RESULTS_DIR, commit $(git rev-parse --short HEAD 2>/dev/null)"
  step environment "$CAP_ENV" environment
  step build "$CAP_BUILD" build
  step gpu-tests "$CAP_TESTS" "$PY" -m pytest -q -rs -p no:cacheprovider -m cuda tests \
    --junitxml="$RESULTS_DIR/gpu-tests.xml"
  step ops "$CAP_OPS" "$PY" benchmarks/gpu_bench.py "${OPS_SHAPE[@]}"
  step e2e-eager "$CAP_E2E" bench e2e-eager benchmarks/test_bench_e2e.py -k "eager"
  step breakdown "$CAP_BREAKDOWN" bench breakdown benchmarks/test_bench_breakdown.py
  if [ "$COMPILE" = 1 ]; then
    step vq-compile "$CAP_VQ" bench vq benchmarks/test_bench_vq.py
    step e2e-compile "$CAP_E2E_COMPILE" bench e2e-compile benchmarks/test_bench_e2e.py -k compile
  fi
  echo; echo "=== summary ($(( $(date +%s) - START )) s of $BUDGET s)"
  column -t -s $'\t' "$RESULTS_DIR/summary.tsv" 2>/dev/null || cat "$RESULTS_DIR/summary.tsv"
  echo "exit status $status; log, summary.tsv and JSON in $RESULTS_DIR"
  return $status
}

main 2>&1 | tee "$RESULTS_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
