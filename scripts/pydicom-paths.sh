#!/bin/sh
# Prints the export lines that point the imaging tests at the third-party
# DICOM files shipped by the pip packages `pydicom` and `pydicom-data`:
#   pip install pydicom pydicom-data
#   eval "$(scripts/pydicom-paths.sh)" && cargo test
set -e
python3 - <<'PY'
import os
import pydicom
print("export HER2MAP_PYDICOM_DIR=" + os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files"))
try:
    import data_store  # the import name of the pydicom-data package
    print("export HER2MAP_PYDICOM_DATA_DIR=" + os.path.join(os.path.dirname(data_store.__file__), "data"))
except ImportError:
    import sys
    print("echo 'pydicom-data is not installed: pip install pydicom-data' >&2")
PY
