#!/usr/bin/env bash
# GPU benchmark for a device session (one H200, no network): random weights at the real
# Wan2.1 shapes, finishing in under 8 minutes. Run from the repository root:
#
#   bash benchmarks/gpu.sh [--no-compile] [--repeats N]
#
# With several GPUs it then times context-parallel scaling (benchmarks/gpu_parallel.py).
#
# The device image has torch but not diffusers. Carry the wheels it lacks in .whl/ (ignored
# by git), made on the developer machine with:
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#       diffusers==0.42.1 imageio-ffmpeg==0.8.1 ftfy==6.3.1 xformers==0.0.35
#
# (xformers only where its wheel matches the device's torch; without it the table simply
# has no xformers rows.)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 470 python3 benchmarks/gpu_step.py "$@"
# Context-parallel scaling, on a machine with several GPUs (14B 720p, 81 frames).
gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || echo 0)
if [ "$gpus" -gt 1 ]; then
    timeout 600 python3 -m torch.distributed.run --standalone --nproc-per-node "$gpus" benchmarks/gpu_parallel.py
fi
