#!/usr/bin/env bash
# The wheels the device lacks, for its Python 3.12 on manylinux x86_64 with torch 2.11.0,
# into .whl/ (ignored by git; the device call carries it), checked before anything travels.
#
#   bash benchmarks/device_wheels.sh
#
# The device image has torch, transformers, huggingface_hub, safetensors, tokenizers,
# accelerate, numpy and pillow (its description, 2026-11-29); it lacks diffusers and
# xformers. xformers 0.0.35 is a small wheel that needs torch>=2.10, so it fits torch
# 2.11; its earlier builds pin torch exactly (0.0.34: torch==2.10.0, 110 MB) and do not.
# imageio-ffmpeg is left out: the GPU run encodes no video.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
rm -rf .whl
mkdir .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest .whl \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    diffusers==0.42.1 xformers==0.0.35
"$PYTHON" -m benchmarks.check_wheels .whl --torch 2.11.0 --python 3.12 --limit-mib 64
