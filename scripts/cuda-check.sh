#!/usr/bin/env bash
# Compile check of the CUDA build (`--features cuda`) on a machine without a
# GPU: nvcc from PyPI's CUDA 13 wheels in a virtual environment, kernels
# built for compute capability 9.0 (H100/H200; no GPU to ask), cudarc told
# the toolkit version it knows (0.19.10 knows CUDA up to 13.4; the wheels
# are 13.5). Linking is not checked: it needs the driver's libcuda.
# Its own target folder: the first run builds candle's kernels with nvcc
# (about 20 minutes on 2 cores), later runs take a minute or two.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${HER2MAP_CUDA_VENV:-/var/tmp/her2map-cuda-venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check \
    nvidia-cuda-nvcc==13.5.37 nvidia-nvvm==13.5.37 nvidia-cuda-crt==13.5.37 \
    nvidia-cuda-runtime==13.5.37 nvidia-cuda-cccl
CU="$(ls -d "$VENV"/lib/python3*/site-packages/nvidia/cu13)"
export PATH="$CU/bin:$PATH" CUDA_ROOT="$CU" CUDA_PATH="$CU"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDARC_CUDA_VERSION=13040
export CARGO_TARGET_DIR="${HER2MAP_CUDA_TARGET_DIR:-/var/tmp/her2map-cuda-target}"
cargo check --features cuda --lib --bins
