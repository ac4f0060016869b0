#!/usr/bin/env bash
# The CUDA toolkit for `--features cuda` builds, as exports for eval:
#   eval "$(scripts/cuda-env.sh)"
# A toolkit on PATH (a GPU machine's /usr/local/cuda) is used as it is.
# Otherwise PyPI's CUDA 13 wheels go into a virtual environment outside the
# clone (HER2MAP_CUDA_VENV, default /var/tmp/her2map-cuda-venv; ~1.2 GB,
# installed once): nvcc, nvvm, crt, cccl and the runtime (all one version:
# nvvm 13.5 with nvcc 13.0 fails in ptxas), and the libraries the link
# needs (cublas, curand, nvrtc; the driver's libcuda is not on PyPI). The
# wheels ship versioned names only (libcublas.so.13), so a folder of
# unversioned links goes on LIBRARY_PATH for the linker.
# Also: CUDA_COMPUTE_CAP (default 90, H100/H200) so that kernels build for
# the target without a GPU to ask, and CUDARC_CUDA_VERSION=13040 (cudarc
# 0.19.10 knows CUDA up to 13.4). Idempotent.
set -euo pipefail
echo "export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}"
if command -v nvcc >/dev/null 2>&1 && [ -z "${HER2MAP_CUDA_VENV:-}" ]; then
    ver="$(nvcc --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')"
    # shellcheck disable=SC2086
    set -- $ver
    if [ "${1:-0}" -gt 13 ] || { [ "${1:-0}" = 13 ] && [ "${2:-0}" -gt 4 ]; }; then
        echo "export CUDARC_CUDA_VERSION=13040"
    fi
    exit 0
fi
VENV="${HER2MAP_CUDA_VENV:-/var/tmp/her2map-cuda-venv}"
CUDA_WHEELS_VERSION=13.5.37
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV" >&2
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check \
    "nvidia-cuda-nvcc==$CUDA_WHEELS_VERSION" "nvidia-nvvm==$CUDA_WHEELS_VERSION" \
    "nvidia-cuda-crt==$CUDA_WHEELS_VERSION" "nvidia-cuda-runtime==$CUDA_WHEELS_VERSION" \
    nvidia-cuda-cccl nvidia-cublas nvidia-curand nvidia-cuda-nvrtc >&2
CU="$(ls -d "$VENV"/lib/python3*/site-packages/nvidia/cu13)"
LINKS="$VENV/link"
mkdir -p "$LINKS"
for lib in "$CU"/lib/lib*.so.*; do
    base="$(basename "$lib")"
    ln -sf "$lib" "$LINKS/${base%%.so.*}.so"
done
echo "export PATH=\"$CU/bin:\$PATH\" CUDA_ROOT=\"$CU\" CUDA_PATH=\"$CU\" CUDARC_CUDA_VERSION=13040"
echo "export LIBRARY_PATH=\"$LINKS\${LIBRARY_PATH:+:\$LIBRARY_PATH}\" LD_LIBRARY_PATH=\"$CU/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
