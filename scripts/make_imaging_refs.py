#!/usr/bin/env python3
"""Regenerates test-data/imaging/ reference arrays (see the README there).

Requires: pip install pillow numpy pydicom pydicom-data
Run from the repository root: python3 scripts/make_imaging_refs.py
"""
import json
import os
import sys

import numpy as np
import PIL
from PIL import Image
import pydicom
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, convert_color_space

OUT = os.path.join("test-data", "imaging")
os.makedirs(OUT, exist_ok=True)
PD = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")
import data_store  # pydicom-data
PDD = os.path.join(os.path.dirname(data_store.__file__), "data")


# ---------------------------------------------------------------- resize
def pattern(w, h):
    """Same formula as tests/imaging_resize.rs::pattern (exact in f32)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    v = ((x * 37 + y * 91 + x * y * 7) % 251).astype(np.float64) / 250.0
    return v.astype(np.float32)


resize_cases = [((160, 120), (64, 48)), ((160, 120), (37, 29)), ((61, 47), (150, 130)), ((61, 47), (256, 256)), ((300, 40), (256, 256))]
for (iw, ih), (ow, oh) in resize_cases:
    img = Image.fromarray(pattern(iw, ih), mode="F")
    out = np.asarray(img.resize((ow, oh), Image.BILINEAR), dtype="<f4")
    out.tofile(os.path.join(OUT, f"resize_{iw}x{ih}_to_{ow}x{oh}.f32"))


# ---------------------------------------------------------------- decode
def luma_pil(rgb8):
    """PIL convert('L') on 8-bit RGB, as float in [0,1]."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb8, dtype=np.uint8), "RGB").convert("L"), dtype=np.float64) / 255.0


refs = {}


def add(name, pkg, fname, kind, arr, step, frame=0, tol=None, note=""):
    a = np.asarray(arr, dtype=np.float64)
    sub = a[::step, ::step]
    refs[name] = {
        "package": pkg,
        "file": fname,
        "frame": frame,
        "kind": kind,
        "step": step,
        "rows": int(sub.shape[0]),
        "cols": int(sub.shape[1]),
        "tolerance": tol,
        "how": note,
        "values": [round(float(v), 6) for v in sub.ravel()],
    }


def read(pkg, f):
    return pydicom.dcmread(os.path.join(PD if pkg == "pydicom" else PDD, f))


# Lossless MR in six transfer syntaxes share MR_small.dcm's pixels.
ds = read("pydicom", "MR_small.dcm")
add("mr_small", "pydicom", "MR_small.dcm", "modality", apply_modality_lut(ds.pixel_array, ds), 1, tol=0.0,
    note="pydicom pixel_array + apply_modality_lut")

# RGB ultrasound → PIL "L".
ds = read("pydicom-data", "US1_UNCR.dcm")
add("us1_rgb", "pydicom-data", "US1_UNCR.dcm", "gray", luma_pil(ds.pixel_array), 4, tol=0.6 / 255,
    note="pydicom pixel_array (RGB) → PIL convert('L') / 255")

# YBR_FULL and YBR_FULL_422 native → RGB (pydicom convert_color_space, uint8) → PIL "L".
for name, f in [("ybr_full", "SC_ybr_full_uncompressed.dcm")]:
    ds = read("pydicom-data", f)
    rgb = ds.pixel_array  # pydicom 3 converts YBR_FULL to RGB (uint8) by default
    add(name, "pydicom-data", f, "gray", luma_pil(rgb), 1, tol=1.6 / 255,
        note="pydicom 3 pixel_array (YBR_FULL converted to RGB, uint8) → PIL convert('L') / 255")
ds = read("pydicom", "SC_ybr_full_422_uncompressed.dcm")
arr = ds.pixel_array  # pydicom 3 converts YBR to RGB by default
if ds.PhotometricInterpretation.startswith("YBR") and not getattr(ds, "_pixel_array_opts", {}).get("as_rgb", True):
    arr = convert_color_space(arr, "YBR_FULL", "RGB")
add("ybr_full_422", "pydicom", "SC_ybr_full_422_uncompressed.dcm", "gray", luma_pil(arr), 1, tol=1.6 / 255,
    note="pydicom 3 pixel_array (YBR_FULL_422 expanded and converted to RGB, uint8) → PIL convert('L') / 255")

# Palette colour, 8-bit and 16-bit indices.
ds = read("pydicom-data", "OBXXXX1A.dcm")
rgb = apply_color_lut(ds.pixel_array, ds)
bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
if rgb.dtype != np.uint8:
    rgb8 = (rgb.astype(np.float64) / (2 ** bits - 1) * 255).round().astype(np.uint8)
else:
    rgb8 = rgb
add("palette8", "pydicom-data", "OBXXXX1A.dcm", "gray", luma_pil(rgb8), 8, tol=1.1 / 255,
    note=f"pydicom apply_color_lut (LUT {bits} bits) → 8-bit → PIL convert('L') / 255")
ds = read("pydicom-data", "gdcm-US-ALOKA-16.dcm")
rgb = apply_color_lut(ds.pixel_array, ds).astype(np.float64)
bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
rgbn = rgb / (2 ** bits - 1)
l = rgbn[..., 0] * 0.299 + rgbn[..., 1] * 0.587 + rgbn[..., 2] * 0.114
add("palette16", "pydicom-data", "gdcm-US-ALOKA-16.dcm", "gray", l, 8, tol=1e-4,
    note=f"pydicom apply_color_lut (16-bit indices, LUT {bits} bits) / (2^bits-1) → numpy ITU-R 601-2 luma (Pillow has no 16-bit RGB)")

# MONOCHROME1 with a window: VOI LINEAR then inversion.
ds = read("pydicom-data", "RG3_UNCR.dcm")
m = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
wc = float(ds.WindowCenter if not isinstance(ds.WindowCenter, pydicom.multival.MultiValue) else ds.WindowCenter[0])
ww = float(ds.WindowWidth if not isinstance(ds.WindowWidth, pydicom.multival.MultiValue) else ds.WindowWidth[0])
v = np.clip((m - (wc - 0.5)) / (ww - 1) + 0.5, 0, 1)
add("mono1_window", "pydicom-data", "RG3_UNCR.dcm", "gray", 1.0 - v, 16, tol=1e-4,
    note="apply_modality_lut, then PS3.3 C.11.2.1.2.1 LINEAR window (first), then 1-v for MONOCHROME1 (numpy)")

# Modality LUT Sequence and VOI LUT Sequence.
ds = read("pydicom-data", "mlut_18.dcm")
add("modality_lut_seq", "pydicom-data", "mlut_18.dcm", "modality", apply_modality_lut(ds.pixel_array, ds), 8, tol=0.0,
    note="pydicom apply_modality_lut (Modality LUT Sequence)")
ds = read("pydicom-data", "vlut_04.dcm")
item = ds.VOILUTSequence[0]
bits = int(item.LUTDescriptor[2])
add("voi_lut_seq", "pydicom-data", "vlut_04.dcm", "gray", apply_voi_lut(ds.pixel_array, ds).astype(np.float64) / (2 ** bits - 1), 8,
    tol=1e-5, note=f"pydicom apply_voi_lut (VOI LUT Sequence) / (2^{bits}-1)")

# Deflated explicit VR little endian.
ds = read("pydicom", "image_dfl.dcm")
add("deflate", "pydicom", "image_dfl.dcm", "modality", apply_modality_lut(ds.pixel_array, ds), 8, tol=0.0,
    note="pydicom pixel_array (deflated transfer syntax)")

# Enhanced MR (per-frame functional groups), frame 3.
ds = read("pydicom-data", "emri_small.dcm")
add("emri_frame3", "pydicom-data", "emri_small.dcm", "modality", ds.pixel_array[3], 1, frame=3, tol=0.0,
    note="pydicom pixel_array[3] (no rescale in this file)")

with open(os.path.join(OUT, "decode_refs.json"), "w") as f:
    json.dump({"generated_with": {"pydicom": pydicom.__version__, "numpy": np.__version__, "pillow": PIL.__version__},
               "refs": refs}, f, separators=(",", ":"))
print("ok", {k: v["rows"] * v["cols"] for k, v in refs.items()})
