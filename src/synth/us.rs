//! The synthetic ultrasound study: a colour Doppler image (which selection
//! must skip), three B-mode images and a five-frame cine, each with one
//! Sequence of Ultrasound Regions item. Owns the US pixels and attributes only.

use std::path::{Path, PathBuf};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::dataset::{
    Common, StudyInfo, Uids, base, el, mkdir, pixel_module_u8, seq, texture, write,
};
use super::{Lesion, SynthError, SynthOptions, SynthStudy, collect_written};

const SOP_US: &str = "1.2.840.10008.5.1.4.1.1.6.1";
const SOP_US_MF: &str = "1.2.840.10008.5.1.4.1.1.3.1";

/// Image size, and the tissue region inside it.
#[derive(Clone, Copy)]
struct Grid {
    rows: usize,
    cols: usize,
    /// Tissue region (x0, y0, x1, y1), inclusive.
    region: (usize, usize, usize, usize),
}

impl Grid {
    fn new(full_size: bool) -> Self {
        let (rows, cols) = if full_size {
            (600usize, 800usize)
        } else {
            (120, 160)
        };
        // Tissue region leaves a 5 % border (where scanners burn in text).
        let region = (
            cols / 20,
            rows / 20,
            cols - cols / 20 - 1,
            rows - rows / 20 - 1,
        );
        Grid { rows, cols, region }
    }
}

/// One image to write: instance number, kind, frames, SOP Instance UID.
type Job = (i32, &'static str, usize, String);

/// Write the US study into `d`.
pub(super) fn write_study(
    d: &Path,
    opts: &SynthOptions,
    lesion: &Lesion,
    uids: &mut Uids,
) -> Result<SynthStudy, SynthError> {
    mkdir(d)?;
    let c = Common::new(
        opts,
        uids,
        StudyInfo {
            date: "20240301",
            time: "100000",
            accession: "SYNUS1",
            description: "US BREAST",
            modality: "US",
        },
    );
    let series_uid = uids.next();
    let grid = Grid::new(opts.full_size);
    // 1 = colour Doppler (skipped), 2..4 B-mode, 5 cine of 5 frames.
    let jobs: Vec<Job> = vec![
        (1, "doppler", 1, uids.next()),
        (2, "bmode", 1, uids.next()),
        (3, "bmode", 1, uids.next()),
        (4, "bmode", 1, uids.next()),
        (5, "cine", 5, uids.next()),
    ];
    let results: Vec<Result<(PathBuf, u64), SynthError>> = jobs
        .par_iter()
        .map(|job| write_image(d, &c, &series_uid, grid, lesion, job))
        .collect();
    let (files, bytes) = collect_written(results)?;
    Ok(SynthStudy {
        name: "US".into(),
        study_instance_uid: c.study_uid.clone(),
        files,
        bytes,
    })
}

fn write_image(
    d: &Path,
    c: &Common<'_>,
    series_uid: &str,
    grid: Grid,
    lesion: &Lesion,
    (n, kind, frames, sop): &Job,
) -> Result<(PathBuf, u64), SynthError> {
    let opts = c.opts;
    let spp = if *kind == "doppler" { 3 } else { 1 };
    let px = pixels(opts.seed, grid, lesion, *n, spp, *frames);
    let sop_class = if *frames > 1 { SOP_US_MF } else { SOP_US };
    let mut o = base(c, sop_class, sop, series_uid, 1, *n);
    if opts.us_laterality {
        // Image Laterality only: Laterality (0020,0060) is for
        // series without it (PS3.3 C.7.3.1, Type 2C).
        o.put(el(tags::IMAGE_LATERALITY, VR::CS, lesion.side.code()));
    }
    o.put(el(tags::PATIENT_ORIENTATION, VR::CS, ""));
    o.put(el(tags::ACQUISITION_TIME, VR::TM, format!("1000{:02}", n)));
    o.put(seq(
        tags::SEQUENCE_OF_ULTRASOUND_REGIONS,
        vec![region_item(grid)],
    ));
    pixel_module_u8(&mut o, grid.rows, grid.cols, spp as u16, *frames, px);
    let path = d.join(format!("US_{n:02}_{kind}.dcm"));
    let bytes = write(o, &path)?;
    Ok((path, bytes))
}

/// Speckled tissue with a hypoechoic mass (drifting down through a cine's
/// frames); with `spp` 3, a colour Doppler box in the middle.
fn pixels(seed: u64, grid: Grid, lesion: &Lesion, n: i32, spp: usize, frames: usize) -> Vec<u8> {
    let Grid {
        rows,
        cols,
        region: (rx0, ry0, rx1, ry1),
    } = grid;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (0x2000 + n as u64));
    let (lcx, lcy) = (
        cols as f64 * (0.5 + 0.5 * lesion.off_a),
        rows as f64 * (0.35 + 0.4 * lesion.depth),
    );
    let (la, lb) = (cols as f64 * 0.09, rows as f64 * 0.08);
    let mut px = Vec::with_capacity(rows * cols * spp * frames);
    for f in 0..frames {
        let shift = f as f64 * 1.5;
        for y in 0..rows {
            for x in 0..cols {
                let (xf, yf) = (x as f64, y as f64);
                let inside = x >= rx0 && x <= rx1 && y >= ry0 && y <= ry1;
                let mut v = if inside {
                    let layer =
                        70.0 + 40.0 * (yf / rows as f64) + 30.0 * texture(xf, yf + shift, 2.0);
                    // Speckle: exponential-like multiplicative noise.
                    let s: f64 = rng.random_range(0.02f64..1.0);
                    layer * (-s.ln()).min(3.0)
                } else {
                    0.0
                };
                let dd = ((xf - lcx) / la).powi(2) + ((yf - lcy - shift) / lb).powi(2);
                if inside && dd < 1.0 {
                    v = 15.0 + rng.random_range(0.0..20.0); // hypoechoic mass
                }
                let v = v.clamp(0.0, 255.0) as u8;
                if spp == 3 {
                    let colour = inside
                        && (xf - cols as f64 * 0.5).abs() < cols as f64 * 0.2
                        && (yf - rows as f64 * 0.5).abs() < rows as f64 * 0.2
                        && rng.random_bool(0.7);
                    if colour {
                        px.extend_from_slice(&[220, 30, 40]);
                    } else {
                        px.extend_from_slice(&[v, v, v]);
                    }
                } else {
                    px.push(v);
                }
            }
        }
    }
    px
}

/// The one ultrasound region (PS3.3 C.8.5.5): the tissue area, 2D tissue
/// data, 0.005 cm per pixel.
fn region_item(grid: Grid) -> InMemDicomObject {
    let (rx0, ry0, rx1, ry1) = grid.region;
    InMemDicomObject::from_element_iter([
        el(
            tags::REGION_SPATIAL_FORMAT,
            VR::US,
            PrimitiveValue::from(1u16),
        ),
        el(tags::REGION_DATA_TYPE, VR::US, PrimitiveValue::from(1u16)),
        el(tags::REGION_FLAGS, VR::UL, PrimitiveValue::from(0u32)),
        el(
            tags::REGION_LOCATION_MIN_X0,
            VR::UL,
            PrimitiveValue::from(rx0 as u32),
        ),
        el(
            tags::REGION_LOCATION_MIN_Y0,
            VR::UL,
            PrimitiveValue::from(ry0 as u32),
        ),
        el(
            tags::REGION_LOCATION_MAX_X1,
            VR::UL,
            PrimitiveValue::from(rx1 as u32),
        ),
        el(
            tags::REGION_LOCATION_MAX_Y1,
            VR::UL,
            PrimitiveValue::from(ry1 as u32),
        ),
        el(
            tags::PHYSICAL_UNITS_X_DIRECTION,
            VR::US,
            PrimitiveValue::from(3u16),
        ),
        el(
            tags::PHYSICAL_UNITS_Y_DIRECTION,
            VR::US,
            PrimitiveValue::from(3u16),
        ),
        DataElement::new(
            tags::PHYSICAL_DELTA_X,
            VR::FD,
            PrimitiveValue::F64((&[0.005f64][..]).into()),
        ),
        DataElement::new(
            tags::PHYSICAL_DELTA_Y,
            VR::FD,
            PrimitiveValue::F64((&[0.005f64][..]).into()),
        ),
    ])
}
