#!/usr/bin/env bash
# Every GPU check in one script (no internet needed), the most important first so that a run
# cut short still reports them; each step has its own time limit and the last one gets what is
# left of ADDP_GPU_BUDGET_S (default 570 s), so the whole run takes under ten minutes:
#   1. builds addp._C with the CUDA sources (pip, no build isolation, no deps);
#   2. parity tests: Triton kernels on CUDA (tests/ops/test_kernels_triton.py), the CUDA C++
#      unmasking kernel (tests/ops/test_ops_unmask.py), the CPU ops, the CUDA-graph sampler
#      (graph replay == eager, bitwise) and the attention backends;
#   3. end to end, eager, at the official layout (ADDP ViT-B/16 + MAGE VQGAN + MAGE ViT-B,
#      256 px, 16x16 tokens), bf16 on both sides, batch 64, 20 steps: generation (CUDA graph vs
#      the reference loop and vs our eager sampler) and the training step (with FLOPs and MFU)
#      vs the reference loop (benchmarks/test_bench_e2e.py);
#   4. the per-part time of a generation step and a training step at that layout, fp32 vs bf16
#      (benchmarks/test_bench_breakdown.py), and the VQ decoder/encoder variants vs the plain
#      decoder (benchmarks/test_bench_vq.py: channels-last, bf16, torch.compile);
#   5. every op vs its reference at the ViT-B/256 shapes (B=64 L=256 K=1024 D=256) with a
#      device-to-device copy bandwidth baseline (benchmarks/gpu_bench.py);
#   6. end to end again with torch.compile (compilation makes it the slowest part).
# The raw log and the pytest-benchmark JSON go to $ADDP_RESULTS_DIR (default
# benchmarks/results/), written as the run goes. Usage: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${ADDP_RESULTS_DIR:-benchmarks/results}"
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check-$(date +%Y%m%d-%H%M%S).log"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"  # python3 is there on every Linux image; `python` not always
exec > >(tee "$LOG") 2>&1
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

step "build addp._C with CUDA kernels"
ADDP_BUILD_CUDA="${ADDP_BUILD_CUDA:-1}" timeout 150 "$PY" -m pip install --no-build-isolation --no-deps -q -e . || status=1
"$PY" -c "import addp.ops as o; print('compiled ops loaded:', o.has_compiled_ops())" || status=1

step "parity tests (Triton and CUDA on the GPU, CPU kernels)"
timeout 100 "$PY" -m pytest -q tests/ops/test_kernels_triton.py tests/ops/test_ops.py tests/ops/test_ops_unmask.py \
  tests/ops/test_ops_loss.py || status=1
timeout 60 "$PY" -m pytest -q -rs tests/sampling/test_cuda_graph.py tests/models/test_models.py -k "graph or attention" || status=1

step "end to end, eager: ADDP ViT-B/16 256 px, bf16, B=64, T=20 vs the reference loop"
ADDP_BENCH_PRESET=base ADDP_BENCH_PRECISION=bf16 timeout 120 "$PY" -m pytest -q -s benchmarks/test_bench_e2e.py -k "not compile" \
  --benchmark-json="${LOG%.log}-e2e-eager.json" || status=1

step "where the time goes at ViT-B/16 256 px, B=64: generation and training step parts, fp32 vs bf16"
ADDP_BENCH_PRESET=base ADDP_BENCH_ROUNDS=5 timeout 60 "$PY" -m pytest -q -s benchmarks/test_bench_breakdown.py || status=1

step "VQ decoder/encoder at MAGE's VQGAN (ch=128), 256 px, B=64: channels-last, bf16, compiled vs plain"
ADDP_BENCH_ROUNDS=5 timeout 120 "$PY" -m pytest -q -s benchmarks/test_bench_vq.py || status=1

step "op benchmarks at ViT-B/256 shapes"
timeout 60 "$PY" benchmarks/gpu_bench.py --B 64 --L 256 --K 1024 --D 256 || status=1

step "end to end, compiled (slowest: compilation first)"
left=$(( ${ADDP_GPU_BUDGET_S:-570} - SECONDS )); left=$(( left > 30 ? left : 30 ))
ADDP_BENCH_PRESET=base ADDP_BENCH_PRECISION=bf16 timeout "$left" "$PY" -m pytest -q -s benchmarks/test_bench_e2e.py -k "compile" \
  --benchmark-json="${LOG%.log}-e2e-compile.json" || status=1

step "done: exit status $status; log in $LOG"
exit $status
