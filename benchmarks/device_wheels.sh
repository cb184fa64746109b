#!/usr/bin/env bash
# The wheels the device lacks (benchmarks/device_wheels.txt), for its Python 3.12 on manylinux x86_64
# with torch 2.11.0, into .whl/ (ignored by git; the device call carries it), checked before anything
# travels: every requirement of every wheel must be met by the image (benchmarks/device_image.txt) or
# another wheel. imageio-ffmpeg is not among them: the GPU run encodes no video, and nothing it
# imports needs it.
#
#   bash benchmarks/device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
rm -rf .whl
mkdir .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest .whl \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -r benchmarks/device_wheels.txt
"$PYTHON" -m benchmarks.check_wheels .whl --limit-mib 48
