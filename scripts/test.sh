#!/usr/bin/env bash
# The test command: every unit and integration test, with the folders of the
# third-party DICOM test files (pip packages pydicom and pydicom-data).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${HER2MAP_PYDICOM_DIR:-}" ] || [ -z "${HER2MAP_PYDICOM_DATA_DIR:-}" ]; then
    eval "$(sh scripts/pydicom-paths.sh)"
fi
export HER2MAP_PYDICOM_DIR HER2MAP_PYDICOM_DATA_DIR
# The multi-node tests (tests/it/multinode.rs) need a PostgreSQL: without
# one given, a throwaway server (scripts/postgres.sh), stopped at the end.
if [ -z "${HER2MAP_MULTINODE_PG_URL:-}" ]; then
    eval "$(scripts/postgres.sh start)"
    trap 'scripts/postgres.sh stop "$HER2MAP_TEST_PG_DIR"' EXIT
    export HER2MAP_MULTINODE_PG_URL="$HER2MAP_TEST_PG_URL"
    unset HER2MAP_TEST_PG_URL
fi
cargo test "$@"
