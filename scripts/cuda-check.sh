#!/usr/bin/env bash
# Compile check of the CUDA build (`--features cuda`) on a machine without a
# GPU, as CI runs it: the library, the binary, the tests and the benches
# type-check against candle's CUDA backend, and candle's kernels build with
# nvcc for compute capability $CUDA_COMPUTE_CAP (default 90). The toolkit:
# scripts/cuda-env.sh. Linking is not checked here: it needs the driver's
# libcuda, which only a GPU machine has (scripts/gpu-check.sh links).
# Its own target folder (HER2MAP_CUDA_TARGET_DIR), outside the clone: the
# first run builds candle's kernels with nvcc (about 20 minutes on 2
# cores), later runs only what changed. The kernels are built by
# candle-kernels' build script, whose output depends on the profile and
# CUDA_COMPUTE_CAP: keep both fixed, or the ~20 minutes come again.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/cuda-env.sh)"
export CARGO_TARGET_DIR="${HER2MAP_CUDA_TARGET_DIR:-/var/tmp/her2map-cuda-target}"
cargo check --features cuda --all-targets
