//! Decoding of real third-party DICOM files shipped by the pip packages
//! `pydicom` (data/test_files) and `pydicom-data` (data_store/data).
//! Point the tests at them with `eval "$(scripts/pydicom-paths.sh)"`.
//! Missing variables make these tests FAIL (never silently pass).
use std::path::PathBuf;

use dicom_object::OpenFileOptions;
use her2map::imaging::decode::{decode_gray, decode_modality};
use her2map::imaging::{GrayImage, ImagingSettings, InputGrid, VoiWindowChoice, prepare_case};
use serde_json::Value;

fn dir(var: &str) -> PathBuf {
    let v = std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: these tests need the DICOM files of `pip install pydicom pydicom-data`; \
             run `eval \"$(scripts/pydicom-paths.sh)\"` first"
        )
    });
    let p = PathBuf::from(v);
    assert!(p.is_dir(), "{var}={} is not a directory", p.display());
    p
}
fn pd(f: &str) -> PathBuf {
    dir("HER2MAP_PYDICOM_DIR").join(f)
}
fn pdd(f: &str) -> PathBuf {
    dir("HER2MAP_PYDICOM_DATA_DIR").join(f)
}
fn open(p: &PathBuf) -> dicom_object::DefaultDicomObject {
    OpenFileOptions::new()
        .open_file(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
fn modality(p: PathBuf, frame: u32) -> GrayImage {
    decode_modality(&open(&p), frame).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
fn gray(p: PathBuf, frame: u32) -> GrayImage {
    decode_gray(&open(&p), frame, VoiWindowChoice::First)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn refs() -> Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/test-data/imaging/decode_refs.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Compare an image with a committed reference (subsampled by `step`).
fn check_ref(name: &str, img: &GrayImage) {
    let r = refs();
    let r = &r["refs"][name];
    let step = r["step"].as_u64().unwrap() as usize;
    let (rows, cols) = (
        r["rows"].as_u64().unwrap() as usize,
        r["cols"].as_u64().unwrap() as usize,
    );
    let tol = r["tolerance"].as_f64().unwrap_or(0.0) as f32;
    let values: Vec<f32> = r["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(img.height.div_ceil(step), rows, "{name} rows");
    assert_eq!(img.width.div_ceil(step), cols, "{name} cols");
    let mut max = 0f32;
    for y in 0..rows {
        for x in 0..cols {
            let d = (img.get(x * step, y * step) - values[y * cols + x]).abs();
            max = max.max(d);
        }
    }
    // Reference values are rounded to 6 decimals in the JSON.
    assert!(
        max <= tol + 2e-6 * values.iter().fold(1f32, |a, v| a.max(v.abs())),
        "{name}: max abs diff {max} > {tol}"
    );
}

fn max_diff(a: &GrayImage, b: &GrayImage) -> f32 {
    assert_eq!((a.width, a.height), (b.width, b.height));
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
fn mean_diff(a: &GrayImage, b: &GrayImage) -> f32 {
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y).abs())
        .sum::<f32>()
        / a.data.len() as f32
}

#[test]
fn mr_small_all_lossless_syntaxes_identical() {
    let base = modality(pd("MR_small.dcm"), 0);
    check_ref("mr_small", &base);
    for f in [
        "MR_small_implicit.dcm",         // Implicit VR LE
        "MR_small_bigendian.dcm",        // Explicit VR BE
        "MR_small_expb.dcm",             // Explicit VR BE
        "MR_small_RLE.dcm",              // RLE Lossless
        "MR_small_jp2klossless.dcm",     // JPEG 2000 lossless
        "MR_small_jpeg_ls_lossless.dcm", // JPEG-LS lossless
        "MR_small_padded.dcm",
    ] {
        assert!(modality(pd(f), 0).data == base.data, "{} differs", "{f}");
    }
}

#[test]
fn lossless_and_lossy_jpeg2000_real_images() {
    // MR 1024² 12-bit and CR MONOCHROME1 1760², uncompressed vs J2K lossless.
    assert!(
        modality(pdd("MR2_J2KR.dcm"), 0).data == modality(pdd("MR2_UNCR.dcm"), 0).data,
        "MR2_J2KR"
    );
    assert!(
        modality(pdd("RG3_J2KR.dcm"), 0).data == modality(pdd("RG3_UNCR.dcm"), 0).data,
        "RG3_J2KR"
    );
    // Lossy J2K against its own uncompressed twin (the *_UNCI file).
    let (a, b) = (gray(pdd("MR2_J2KI.dcm"), 0), gray(pdd("MR2_UNCI.dcm"), 0));
    assert!(
        mean_diff(&a, &b) < 0.01,
        "MR2 lossy mean diff {}",
        mean_diff(&a, &b)
    );
    // Enhanced MR multi-frame in every syntax, frame by frame.
    for f in 0..10 {
        let base = modality(pdd("emri_small.dcm"), f);
        if f == 3 {
            check_ref("emri_frame3", &base);
        }
        for v in [
            "emri_small_RLE.dcm",
            "emri_small_big_endian.dcm",
            "emri_small_jpeg_2k_lossless.dcm",
            "emri_small_jpeg_ls_lossless.dcm",
        ] {
            assert!(
                modality(pdd(v), f).data == base.data,
                "{} differs",
                "{v} frame {f}"
            );
        }
    }
}

#[test]
fn colour_ultrasound_to_luma_like_pillow() {
    let rgb = gray(pdd("US1_UNCR.dcm"), 0);
    check_ref("us1_rgb", &rgb);
    // YBR_RCT in JPEG 2000 lossless: identical to the RGB original.
    let rct = gray(pdd("US1_J2KR.dcm"), 0);
    assert!(
        max_diff(&rct, &rgb) < 1e-6,
        "US1_J2KR vs UNCR {}",
        max_diff(&rct, &rgb)
    );
    // YBR_ICT lossy: close.
    let ict = gray(pdd("US1_J2KI.dcm"), 0);
    assert!(
        mean_diff(&ict, &rgb) < 0.02,
        "US1_J2KI mean diff {}",
        mean_diff(&ict, &rgb)
    );
    check_ref("ybr_full", &gray(pdd("SC_ybr_full_uncompressed.dcm"), 0));
    check_ref(
        "ybr_full_422",
        &gray(pd("SC_ybr_full_422_uncompressed.dcm"), 0),
    );
    check_ref("palette8", &gray(pdd("OBXXXX1A.dcm"), 0));
    check_ref("palette16", &gray(pdd("gdcm-US-ALOKA-16.dcm"), 0));
    // Same palette image in RLE, big endian and 2-frame variants.
    let p = gray(pdd("OBXXXX1A.dcm"), 0);
    for v in [
        "OBXXXX1A_rle.dcm",
        "OBXXXX1A_expb.dcm",
        "OBXXXX1A_2frame.dcm",
        "OBXXXX1A_rle_2frame.dcm",
    ] {
        assert!(gray(pdd(v), 0).data == p.data, "{} differs", "{v}");
    }
    // JPEG baseline YBR_FULL_422, 30-frame ultrasound cine: decodes, and the
    // RGB planar-configuration pair agrees.
    let cine = gray(pd("examples_ybr_color.dcm"), 15);
    assert_eq!((cine.width, cine.height), (320, 240));
    assert!(
        gray(pdd("color-pl.dcm"), 0).data == gray(pdd("color-px.dcm"), 0).data,
        "color-pl vs color-px"
    );
    // JPEG baseline RGB → luma close to the uncompressed original.
    let (j, u) = (
        gray(pdd("SC_rgb_dcmtk_ebcys2_dcmd.dcm"), 0),
        gray(pdd("SC_rgb.dcm"), 0),
    );
    assert!(
        mean_diff(&j, &u) < 0.03,
        "JPEG baseline RGB mean diff {}",
        mean_diff(&j, &u)
    );
}

#[test]
fn luts_monochrome1_deflate() {
    check_ref("mono1_window", &gray(pdd("RG3_UNCR.dcm"), 0));
    check_ref("modality_lut_seq", &modality(pdd("mlut_18.dcm"), 0));
    check_ref("voi_lut_seq", &gray(pdd("vlut_04.dcm"), 0));
    check_ref("deflate", &modality(pd("image_dfl.dcm"), 0));
    // Two windows (C 450/200, W 790/443): "first" = "widest" = window 0,
    // window 1 is narrower, so more pixels saturate.
    let f = pdd("MR-SIEMENS-DICOM-WithOverlays.dcm");
    let first = decode_gray(&open(&f), 0, VoiWindowChoice::First).unwrap();
    let widest = decode_gray(&open(&f), 0, VoiWindowChoice::Widest).unwrap();
    let second = decode_gray(&open(&f), 0, VoiWindowChoice::Index(1)).unwrap();
    assert!(first.data == widest.data, "widest should be window 0");
    let sat = |g: &GrayImage| g.data.iter().filter(|v| **v >= 1.0).count();
    assert!(sat(&second) > sat(&first), "window 1 should saturate more");
    // JPEG lossless (process 14 SV1), 8 and 16 bit; JPEG-LS near-lossless.
    let ll = modality(pdd("JPGLosslessP14SV1_1s_1f_8b.dcm"), 0);
    assert_eq!((ll.width, ll.height), (1024, 768));
    let ll16 = modality(pdd("JPEG-LL.dcm"), 0);
    assert_eq!((ll16.width, ll16.height), (256, 1024));
    let nl = modality(pd("JPEGLSNearLossless_16.dcm"), 0);
    assert_eq!((nl.width, nl.height), (10, 50));
}

#[test]
fn corrupt_and_unsupported_are_errors_not_panics() {
    // Truncated native pixel data.
    let r = std::panic::catch_unwind(|| {
        OpenFileOptions::new()
            .open_file(pd("MR_truncated.dcm"))
            .map(|o| decode_modality(&o, 0).is_err())
    });
    assert!(
        matches!(r, Ok(Ok(true)) | Ok(Err(_))),
        "MR_truncated must fail cleanly"
    );
    // JPEG 2000 file cut short: every frame decodes or fails cleanly.
    let o = open(&pdd("emri_small_jpeg_2k_lossless_too_short.dcm"));
    for f in 0..10 {
        let _ = decode_modality(&o, f);
    }
    // Corrupted codestreams (JPEG 2000, JPEG-LS, RLE, JPEG baseline) and a
    // truncated native file, written to a temp dir: errors, never panics.
    let tmp = tempfile::tempdir().unwrap();
    for (src, cut) in [
        (pd("MR_small_jp2klossless.dcm"), false),
        (pd("MR_small_jpeg_ls_lossless.dcm"), false),
        (pd("MR_small_RLE.dcm"), false),
        (pdd("SC_rgb_dcmtk_ebcys2_dcmd.dcm"), false),
        (pd("MR_small.dcm"), true),
    ] {
        let mut bytes = std::fs::read(&src).unwrap();
        let n = bytes.len();
        if cut {
            bytes.truncate(n - 3000);
        } else {
            // Overwrite the middle of the compressed data with garbage.
            for b in &mut bytes[n - n / 3..n - n / 3 + 400] {
                *b = 0xA5;
            }
        }
        let p = tmp.path().join(src.file_name().unwrap());
        std::fs::write(&p, &bytes).unwrap();
        let r = std::panic::catch_unwind(|| {
            OpenFileOptions::new()
                .open_file(&p)
                .map(|o| decode_gray(&o, 0, VoiWindowChoice::First).is_ok())
        });
        assert!(r.is_ok(), "{} panicked", p.display());
        if cut {
            assert!(
                !matches!(r, Ok(Ok(true))),
                "truncated native data must not decode"
            );
        }
    }
    // 12-bit JPEG extended: a clear error or a decode, never a panic.
    let o = open(&pd("JPGExtended.dcm"));
    let _ = decode_gray(&o, 0, VoiWindowChoice::First);
    // Through prepare_case: errors are recorded per instance, no panic.
    let files = vec![
        pd("MR_truncated.dcm"),
        pdd("emri_small_jpeg_2k_lossless_too_short.dcm"),
        pdd("JPGLosslessP14SV1_1s_1f_8b.dcm"),
    ];
    let case = prepare_case(
        &files,
        &ImagingSettings::default(),
        InputGrid { mri: 16, image: 32 },
    );
    assert!(
        case.us.is_some(),
        "the JPEG lossless US is a usable B-mode image: {:?}",
        case.errors
    );
    assert!(!case.errors.is_empty());
}

#[test]
fn segmentation_roi_from_real_seg() {
    // liver.dcm: BINARY SEG, 3 frames of 512², each deriving from one CT image.
    let meta = her2map::imaging::read_instance_meta(&pdd("liver.dcm")).unwrap();
    let roi = her2map::imaging::roi::DicomAnnotationRoi::from_index(&[meta]);
    assert_eq!(roi.len(), 3);
    // Frame 0 (pydicom: rows 145..=366, columns 79..=350).
    let b = roi
        .planar_box("1.2.392.200103.20080913.113635.2.2009.6.22.21.43.10.23433.1")
        .unwrap();
    assert_eq!((b.x0, b.y0, b.x1, b.y1), (79.0, 145.0, 351.0, 367.0));
}
