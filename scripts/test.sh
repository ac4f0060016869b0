#!/usr/bin/env bash
# The test command: every unit and integration test, with the folders of the
# third-party DICOM test files (pip packages pydicom and pydicom-data).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${HER2MAP_PYDICOM_DIR:-}" ]; then
    HER2MAP_PYDICOM_DIR=$(python3 -c 'import os, pydicom; print(os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files"))' 2>/dev/null || true)
fi
export HER2MAP_PYDICOM_DIR
cargo test --all-targets "$@"
