#!/usr/bin/env bash
# The CPU benchmarks of the README in one run (~5 minutes on 2 cores; run with nothing else
# on the machine): the fused ops vs their references, then the sampler and the training step
# vs the reference loop in fp32 and with bf16 autocast on both sides. Raw logs and
# pytest-benchmark JSON go to benchmarks/results/cpu_bench-<date>*. Usage: bash benchmarks/cpu_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
LOG="benchmarks/results/cpu_bench-$(date +%Y%m%d-%H%M%S).log"
exec > >(tee "$LOG") 2>&1
status=0
run() { echo; echo "=== $* ($(date +%T))"; "$@" || status=1; }

lscpu | grep -E "^Model name|^CPU\(s\)" || true
python -c "import torch; print('torch', torch.__version__, 'threads', torch.get_num_threads())"
run python -m pytest -q -s -p no:cacheprovider benchmarks/test_bench_ops.py --benchmark-json="${LOG%.log}-ops.json"
run env ADDP_BENCH_PRECISION=fp32 python -m pytest -q -s -p no:cacheprovider benchmarks/test_bench_e2e.py \
  --benchmark-json="${LOG%.log}-e2e-fp32.json"
run env ADDP_BENCH_PRECISION=bf16 python -m pytest -q -s -p no:cacheprovider benchmarks/test_bench_e2e.py \
  --benchmark-json="${LOG%.log}-e2e-bf16.json"
echo; echo "=== done, status $status, log $LOG"
exit $status
