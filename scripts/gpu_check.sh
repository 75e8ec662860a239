#!/usr/bin/env bash
# One short GPU check (<= 8 minutes) for a machine with one NVIDIA GPU and JAX with CUDA installed:
#   1. the parity and generation tests on the GPU (tiny fixtures, committed in tests/fixtures);
#   2. the decode benchmark at batch 1 and 64 in bf16 with MBU / MFU (scripts/bench_gpu.py).
# Usage: bash scripts/gpu_check.sh [OUT_DIR]     (results: OUT_DIR/gpu_bench.json, OUT_DIR/gpu_tests.log)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/jinfer-gpu}}"
mkdir -p "$out"
python3 -c "import jax; assert jax.default_backend() == 'gpu', jax.devices(); print(jax.devices())" || exit 1
python3 -m pip install -q --no-deps -e . >/dev/null 2>&1 || true
export JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_parity.py tests/test_generate.py \
    tests/test_models.py -k "not shard" 2>&1 | tee "$out/gpu_tests.log" | tail -5
tests=${PIPESTATUS[0]}
timeout 240 python3 scripts/bench_gpu.py --batches 1,64 --json "$out/gpu_bench.json"
bench=$?
echo "tests exit $tests, bench exit $bench"
exit $(( tests != 0 || bench != 0 ))
