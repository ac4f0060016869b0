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
# http_api: credentials (0 none, 1 viewer, 2 operator, 3 wrong), method
# (0 GET, 1 POST), Content-Type (0 none, 1 JSON, 2 multipart/related), then
# the target (relative: under /api/v1/), a newline and the body.
mkdir -p seeds/http_api
http_seed() { printf "$1" > "seeds/http_api/$2.bin"; }
http_seed '\x01\x00\x00status\n' status
http_seed '\x01\x00\x00cases?state=collecting&limit=5&offset=0&patient=P%%2A\n' cases_filter
http_seed '\x01\x00\x00audit?event=case_result&since=2026-01-01T00:00:00Z&until=2027-01-01T00:00:00Z&case=c1&association=1&limit=10\n' audit_filter
http_seed '\x01\x00\x00cases/..%%2F..%%2Fetc/outputs/1.2.3/png\n' case_png
http_seed '\x02\x01\x01cases/c1/actions\n{"action":"run"}' case_action
http_seed '\x02\x01\x01cases/c1/actions\n{"action":"hold","reason":"\\u0000"}' case_action_nul
http_seed '\x02\x01\x01outbox/1/retry\n{}' retry
http_seed '\x02\x01\x02/dicom-web/studies\n--B\r\nContent-Type: application/dicom\r\n\r\nDICM\r\n--B--\r\n' stow
http_seed '\x00\x01\x03/login\ntoken=abc&next=%%2Fcases' login
http_seed '\x01\x00\x00/cases/c1\n' page_case
http_seed '\x00\x00\x00/ready\n' ready
http_seed '\x03\x00\x00/metrics\n' metrics
ls seeds/* | wc -l
