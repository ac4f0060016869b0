//! Pillow parity of the bilinear resize (see test-data/imaging/README.md).
use her2map::imaging::GrayImage;
use her2map::imaging::resize::resize_bilinear;

/// Same formula as scripts/make_imaging_refs.py::pattern.
fn pattern(w: usize, h: usize) -> GrayImage {
    let mut data = Vec::with_capacity(w * h);
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            data.push((((x * 37 + y * 91 + x * y * 7) % 251) as f64 / 250.0) as f32);
        }
    }
    GrayImage {
        width: w,
        height: h,
        data,
    }
}

/// Tolerance: Pillow accumulates in double and stores f32 after each pass,
/// as we do; remaining differences are rounding of the f32 intermediate.
const TOL: f32 = 1e-5;

#[test]
fn bilinear_matches_pillow() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/test-data/imaging");
    for ((iw, ih), (ow, oh)) in [
        ((160, 120), (64, 48)),
        ((160, 120), (37, 29)),
        ((61, 47), (150, 130)),
        ((61, 47), (256, 256)),
        ((300, 40), (256, 256)),
    ] {
        let path = format!("{root}/resize_{iw}x{ih}_to_{ow}x{oh}.f32");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let expected: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let got = resize_bilinear(&pattern(iw, ih), ow, oh);
        assert_eq!(got.data.len(), expected.len());
        let max = got
            .data
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(max <= TOL, "{iw}x{ih} → {ow}x{oh}: max abs diff {max}");
    }
}
