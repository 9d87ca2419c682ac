#!/usr/bin/env bash
# Every GPU check in one script, ~8-10 minutes on one GPU (no internet needed), the most
# important first so that a run cut short still reports them:
#   1. builds addp._C with the CUDA sources (pip, no build isolation, no deps);
#   2. parity tests: Triton kernels on CUDA (tests/test_kernels_triton.py), the CUDA C++
#      unmasking kernel (tests/test_ops_unmask.py), the CPU ops, the CUDA-graph sampler
#      (graph replay == eager, bitwise) and the attention backends;
#   3. end to end, eager, at ADDP ViT-B/16, 256 px, bf16, batch 64, 20 steps: generation (CUDA
#      graph vs the reference loop and vs our eager sampler) and the training step (with FLOPs
#      and MFU) vs the reference loop (benchmarks/test_bench_e2e.py);
#   4. every op vs its reference at the ViT-B/256 shapes (B=64 L=256 K=1024 D=256) with a
#      device-to-device copy bandwidth baseline (benchmarks/gpu_bench.py);
#   5. end to end again with torch.compile (compilation makes it the slowest part).
# The raw log goes to benchmarks/results/gpu_check-<date>.log. Usage: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
LOG="benchmarks/results/gpu_check-$(date +%Y%m%d-%H%M%S).log"
exec > >(tee "$LOG") 2>&1
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

step "build addp._C with CUDA kernels"
ADDP_BUILD_CUDA="${ADDP_BUILD_CUDA:-1}" timeout 240 pip install --no-build-isolation --no-deps -q -e . || status=1
python -c "import addp.ops as o; print('compiled ops loaded:', o.has_compiled_ops())" || status=1

step "parity tests (Triton and CUDA on the GPU, CPU kernels)"
timeout 150 python -m pytest -q tests/test_kernels_triton.py tests/test_ops.py tests/test_ops_unmask.py \
  tests/test_ops_loss.py || status=1
timeout 90 python -m pytest -q -rs tests/test_cuda_graph.py tests/test_models.py -k "graph or attention" || status=1

step "end to end, eager: ADDP ViT-B/16 256 px, bf16, B=64, T=20 vs the reference loop"
ADDP_BENCH_PRESET=base timeout 180 python -m pytest -q -s benchmarks/test_bench_e2e.py -k "not compile" \
  --benchmark-json="${LOG%.log}-e2e-eager.json" || status=1

step "op benchmarks at ViT-B/256 shapes"
timeout 90 python benchmarks/gpu_bench.py --B 64 --L 256 --K 1024 --D 256 || status=1

step "end to end, compiled (slowest: compilation first)"
ADDP_BENCH_PRESET=base timeout 240 python -m pytest -q -s benchmarks/test_bench_e2e.py -k "compile" \
  --benchmark-json="${LOG%.log}-e2e-compile.json" || status=1

step "done: exit status $status; log in $LOG"
exit $status
