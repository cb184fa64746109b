#!/usr/bin/env bash
# The GPU run for a device session (one 80 GB H100 or one H200, no network), in under 8 minutes:
# random weights at the real Wan shapes, sections in order of value, each under its own
# time limit, every row written to $OUT/gpu_results.json and .md as it is measured.
#
#   bash benchmarks/gpu.sh              # on the GPU machine: see docs/benchmarks.md, "The GPU benchmark"
#   bash benchmarks/gpu.sh --rehearse   # every section on this CPU at tiny shapes, then the accounting
#                                       # of the real run at real shapes on meta (the tests run it)
#
# The device image has torch but not diffusers or xformers: benchmarks/device_wheels.sh puts
# the wheels it lacks in .whl/ (ignored by git), which the device call carries along.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export OUT=${OUT:-$PWD/gpu-results} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
rehearse=0
for arg in "$@"; do [ "$arg" = "--rehearse" ] && rehearse=1; done
if [ "$rehearse" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
timeout 470 "$PYTHON" -m benchmarks.gpu_step "$@" || echo "gpu_step.py stopped (exit $?); the results so far are in $OUT"
# Context parallelism: two CPU processes with gloo in the rehearsal, every GPU on a machine with several.
if [ "$rehearse" = 1 ]; then
    timeout 120 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 \
        -m benchmarks.gpu_parallel --model tiny --frames 9 --repeats 1
else
    gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || echo 0)
    if [ "$gpus" -gt 1 ]; then
        timeout 300 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$gpus" -m benchmarks.gpu_parallel
    fi
fi
