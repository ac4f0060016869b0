#!/usr/bin/env python3
"""Compare the outputs of two `her2map demo --out DIR` runs.

Case ids are random per run, so the outputs' UIDs (derived from the case id)
and their creation/content date and time differ between any two runs. This
script pairs the objects by what they are about (SOP class, referenced source
instance, series) and compares everything else: every other element of the
data set, the pixel data, the SR content tree with its derived UIDs numbered
in order of appearance, and the decoded pixels of each PNG. Exit status 0
when both runs made the same outputs.

Usage: compare-demo-outputs.py RUN_A RUN_B
"""
import hashlib
import re
import sys
from pathlib import Path

import pydicom
from PIL import Image

DERIVED = re.compile(r"^2\.25\.\d+$")
VOLATILE = {"InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime",
            "DateTime", "Date", "Time", "SeriesDate", "SeriesTime", "ObservationDateTime", "AcquisitionDateTime", "DateOfSecondaryCapture", "TimeOfSecondaryCapture"}


def normalise(ds, uids):
    out = []
    for el in ds:
        if el.keyword in VOLATILE:
            continue
        if el.VR == "SQ":
            out.append((el.keyword, [normalise(item, uids) for item in el.value]))
            continue
        v = el.value
        if el.VR == "UI" and isinstance(v, str) and DERIVED.match(v) and el.keyword != "ImplementationClassUID":
            v = uids.setdefault(v, f"uid#{len(uids)}")
        if isinstance(v, bytes):
            v = hashlib.sha256(v).hexdigest()
        out.append((el.keyword, str(v)))
    return out


def describe(path):
    ds = pydicom.dcmread(path)
    ref = ""
    for key in ("SourceImageSequence", "ReferencedImageSequence"):
        if key in ds and len(ds[key].value):
            ref = ds[key][0].ReferencedSOPInstanceUID
            break
    if not ref and "ReferencedSeriesSequence" in ds:  # a presentation state
        ref = ds.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID
    key = (ds.SOPClassUID, ds.StudyInstanceUID, ref, str(ds.get("ReferencedFrameNumber", "")))
    uids = {}
    body = normalise(ds, uids)
    png = path.with_suffix(".png")
    pixels = None
    if png.exists():
        im = Image.open(png)
        pixels = (im.size, im.mode, hashlib.sha256(im.tobytes()).hexdigest())
    return key, (body, pixels)


def load(run):
    objs = {}
    for p in sorted(Path(run, "outputs").glob("*.dcm")):
        k, v = describe(p)
        if k in objs:
            sys.exit(f"{run}: two outputs about {k}")
        objs[k] = (p.name, v)
    return objs


a, b = load(sys.argv[1]), load(sys.argv[2])
bad = 0
if a.keys() != b.keys():
    print("different sets of outputs:", sorted(set(a) ^ set(b)))
    bad += 1
for k in sorted(set(a) & set(b)):
    (na, va), (nb, vb) = a[k], b[k]
    if va != vb:
        bad += 1
        print(f"DIFFERENT: {na} vs {nb}")
        for (ea, eb) in zip(va[0], vb[0]):
            if ea != eb:
                print("   ", str(ea)[:200], "\n != ", str(eb)[:200])
                break
        if va[1] != vb[1]:
            print("    PNG differs")
    else:
        print(f"same: {na} ~ {nb}")
print(f"{len(a)} vs {len(b)} objects, {bad} difference(s)")
sys.exit(1 if bad else 0)
