#!/usr/bin/env bash
# Seed corpora from test-data/bad (and MR_small.dcm) into fuzz/seeds/.
set -euo pipefail
cd "$(dirname "$0")"
rm -rf seeds && mkdir -p seeds/pdu_command seeds/ingest_dataset seeds/multipart_related
# multipart_related: first line the Content-Type, then the body.
printf 'multipart/related; type="application/dicom"; boundary=B\n--B\r\nContent-Type: application/dicom\r\n\r\nDICM\r\n--B\r\nContent-Type: application/dicom\r\n\r\n\r\n--B--\r\n' > seeds/multipart_related/two_parts.bin
printf 'multipart/related; boundary="q \\"x"\npreamble\n--q "x\nContent-Type: text/plain\n\nbody\n--q "x--\nepilogue' > seeds/multipart_related/quoted_lf.bin
printf 'multipart/related; boundary=B\n--B\r\nContent-Type: application/dicom\r\n\r\ntruncated' > seeds/multipart_related/truncated.bin
for f in ../test-data/bad/raw_*.bin ../test-data/bad/cmd_*.bin; do
    cp "$f" seeds/pdu_command/
done
# ingest_dataset: first byte 1 = Explicit VR Little Endian.
for f in ../test-data/bad/ds_*.bin; do
    { printf '\x01'; cat "$f"; } > "seeds/ingest_dataset/$(basename "$f")"
done
python3 - <<'PY'
import pydicom, pydicom.filebase
from pydicom.filewriter import write_dataset
ds = pydicom.dcmread("../test-data/dicom/MR_small.dcm")
for sel, implicit in ((0, True), (1, False)):
    fp = pydicom.filebase.DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    open(f"seeds/ingest_dataset/mr_small_{sel}.bin", "wb").write(bytes([sel]) + fp.getvalue())
PY
ls seeds/* | wc -l
