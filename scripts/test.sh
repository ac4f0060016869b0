#!/usr/bin/env bash
# The test command: every unit and integration test, with the folders of the
# third-party DICOM test files (pip packages pydicom and pydicom-data).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${HER2MAP_PYDICOM_DIR:-}" ] || [ -z "${HER2MAP_PYDICOM_DATA_DIR:-}" ]; then
    eval "$(sh scripts/pydicom-paths.sh)"
fi
export HER2MAP_PYDICOM_DIR HER2MAP_PYDICOM_DATA_DIR
cargo test "$@"
