#!/usr/bin/env bash
# The CPU benchmarks in one run (long: the official 256 px layout runs 20-step generations at
# batch 2; run with nothing else on the machine): the fused ops vs their references; the VQ
# decoder/encoder speed steps vs the plain decoder; the per-part breakdown of a generation and
# a training step at the official layout; the CPU malloc settings vs glibc's defaults; then the
# sampler and the training step vs the reference loop (small presets and the official layout),
# in fp32 on both sides and at each side's device default (and, for training, ours in bf16);
# each side at its defaults in processes of its own (malloc settings included); last, the
# compile time of the trainer's --compile step over counts of reliable tokens. Raw logs
# and pytest-benchmark JSON go to benchmarks/results/cpu_bench-<date>*.
# Usage: bash benchmarks/cpu_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
LOG="benchmarks/results/cpu_bench-$(date +%Y%m%d-%H%M%S).log"
exec > >(tee "$LOG") 2>&1
status=0
run() { echo; echo "=== $* ($(date +%T))"; "$@" || status=1; }

lscpu | grep -E "^Model name|^CPU\(s\)" || true
echo "bf16 ISA: $(lscpu | grep -o "avx512_bf16\|amx_bf16" | sort -u | tr "\n" " ")"
python -c "import torch; print('torch', torch.__version__, 'threads', torch.get_num_threads())"
run python -m pytest -q -s -p no:cacheprovider benchmarks/test_bench_ops.py --benchmark-json="${LOG%.log}-ops.json"
run python -m pytest -q -s -p no:cacheprovider benchmarks/test_bench_vq.py
run python -m pytest -q -s -p no:cacheprovider benchmarks/test_bench_breakdown.py
run python -m pytest -q -s -p no:cacheprovider benchmarks/test_bench_allocator.py
run env ADDP_BENCH_PRECISION=fp32,default python -m pytest -q -s -p no:cacheprovider benchmarks/test_bench_e2e.py \
  -k generation --benchmark-json="${LOG%.log}-e2e-generation.json"
# training's --precision auto is fp32 on a CPU: bf16-ours adds ours in bf16 vs the reference's default
run env ADDP_BENCH_PRECISION=fp32,default,bf16-ours python -m pytest -q -s -p no:cacheprovider \
  benchmarks/test_bench_e2e.py -k training --benchmark-json="${LOG%.log}-e2e-training.json"
run python -m pytest -q -s -p no:cacheprovider benchmarks/test_bench_defaults.py
run python -m pytest -q -s -p no:cacheprovider benchmarks/test_bench_compile.py
echo; echo "=== done, status $status, log $LOG"
exit $status
