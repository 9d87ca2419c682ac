#!/usr/bin/env bash
# Builds addp._C with its CUDA sources (sm_90) in a scratch copy of the tracked files and
# checks that the CUDA kernels are in the library. Nothing built here runs: there is no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null; then
  echo "CUDA build: skipped (no nvcc on PATH)"
  exit 0
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
git ls-files -z | xargs -0 cp -P --parents -t "$scratch"
start=$(date +%s)
(cd "$scratch" && ADDP_BUILD_CUDA=1 ADDP_CUDA_ARCHS="${ADDP_CUDA_ARCHS:-9.0}" \
  python setup.py -q build_ext --inplace >build.log 2>&1) || { tail -40 "$scratch/build.log"; exit 1; }
lib=$(ls "$scratch"/addp/_C*.so)
symbols=$(nm -C "$lib")
for kernel in sample_kernel select_kernel; do
  grep -q "$kernel" <<<"$symbols" || { echo "CUDA build: $kernel missing from $lib"; exit 1; }
done
echo "CUDA build (nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), arch ${ADDP_CUDA_ARCHS:-9.0}): ok in $(( $(date +%s) - start )) s"
