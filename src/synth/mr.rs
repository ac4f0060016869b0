//! The synthetic DCE-MRI study: both breasts, one pre-contrast and n−1
//! post-contrast phases, the lesion enhancing after contrast; written as one
//! classic MR Image file per slice and phase, or as one Enhanced MR Image.
//! Owns the MR pixels and attributes only.

use std::path::{Path, PathBuf};

use dicom_core::{PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::dataset::{
    Common, StudyInfo, Uids, base, el, mkdir, pixel_module_u16, seq, texture, write,
};
use super::{Lesion, SynthError, SynthOptions, SynthStudy};
use crate::imaging::Laterality;

const SOP_MR: &str = "1.2.840.10008.5.1.4.1.1.4";
const SOP_ENHANCED_MR: &str = "1.2.840.10008.5.1.4.1.1.4.1";

/// One MR slice job: written path and bytes, or the pixels (enhanced mode).
type MrWritten = (Option<PathBuf>, u64, Vec<u16>);

/// The acquisition grid and the synthetic anatomy in patient coordinates
/// (mm, LPS).
#[derive(Clone, Copy)]
struct Volume {
    /// Rows = columns of every slice.
    n: usize,
    slices: usize,
    /// Slice spacing and thickness (mm).
    dz: f64,
    /// Pixel spacing (mm).
    ps: f64,
    /// Centre of the first voxel.
    x0: f64,
    y0: f64,
    z0: f64,
    /// Chest wall plane y = yc; the breasts are hemi-ellipsoids anterior (−y)
    /// of it with semi-axes (ba, bb, bc).
    yc: f64,
    ba: f64,
    bb: f64,
    bc: f64,
    /// Lesion centre.
    lesion: [f64; 3],
}

impl Volume {
    fn new(full_size: bool, lesion: &Lesion) -> Self {
        let (n, slices, fov, dz) = if full_size {
            (512usize, 160usize, 340.0, 1.0)
        } else {
            (64, 24, 256.0, 4.0)
        };
        let ps = fov / n as f64;
        let yc = 30.0;
        let (ba, bb, bc) = (70.0, 95.0, (slices as f64 * dz / 2.0 - 4.0).min(60.0));
        let centre = [
            breast_x(lesion.side) + lesion.off_a * ba,
            yc - lesion.depth * bb,
            lesion.off_b * bc,
        ];
        Volume {
            n,
            slices,
            dz,
            ps,
            x0: -fov / 2.0 + ps / 2.0,
            y0: -fov / 2.0 + ps / 2.0,
            z0: -(slices as f64 - 1.0) * dz / 2.0,
            yc,
            ba,
            bb,
            bc,
            lesion: centre,
        }
    }

    /// Position of slice `k` along z.
    fn z(&self, k: usize) -> f64 {
        self.z0 + k as f64 * self.dz
    }
}

/// x of a breast's centre: the patient's left is +x in LPS.
fn breast_x(l: Laterality) -> f64 {
    if l == Laterality::Left { 85.0 } else { -85.0 }
}

/// The UIDs of the classic files: one series per phase, one SOP Instance UID
/// per phase and slice.
struct SeriesUids {
    series: Vec<String>,
    slices: Vec<Vec<String>>,
}

/// Write the MR study into `d`; returns it with the lesion centre (mm, LPS).
pub(super) fn write_study(
    d: &Path,
    opts: &SynthOptions,
    lesion: &Lesion,
    uids: &mut Uids,
) -> Result<(SynthStudy, [f64; 3]), SynthError> {
    mkdir(d)?;
    let c = Common::new(
        opts,
        uids,
        StudyInfo {
            date: "20240302",
            time: "080000",
            accession: "SYNMR1",
            description: "MR BREAST DCE",
            modality: "MR",
        },
    );
    let vol = Volume::new(opts.full_size, lesion);
    let phases = opts.mr_phases;
    let ids = SeriesUids {
        series: (0..phases).map(|_| uids.next()).collect(),
        slices: (0..phases)
            .map(|_| (0..vol.slices).map(|_| uids.next()).collect())
            .collect(),
    };
    let jobs: Vec<(usize, usize)> = (0..phases)
        .flat_map(|p| (0..vol.slices).map(move |k| (p, k)))
        .collect();
    let results: Vec<Result<MrWritten, SynthError>> = jobs
        .par_iter()
        .map(|&(p, k)| write_slice(d, &c, &ids, vol, lesion, p, k))
        .collect();
    let mut files = Vec::new();
    let mut bytes = 0;
    let mut frames_px = Vec::new();
    for r in results {
        let (p, b, px) = r?;
        files.extend(p);
        bytes += b;
        frames_px.push(px);
    }
    if opts.mr_enhanced {
        let sop = uids.next();
        let o = enhanced(&c, &sop, &ids.series[0], vol, &jobs, frames_px.concat());
        let path = d.join("MR_enhanced_dce.dcm");
        bytes += write(o, &path)?;
        files.push(path);
    }
    let study = SynthStudy {
        name: "MR".into(),
        study_instance_uid: c.study_uid.clone(),
        files,
        bytes,
    };
    Ok((study, vol.lesion))
}

/// Slice `k` of phase `p`: written as a classic MR Image, or (enhanced mode)
/// only its pixels returned, to become a frame.
fn write_slice(
    d: &Path,
    c: &Common<'_>,
    ids: &SeriesUids,
    vol: Volume,
    lesion: &Lesion,
    p: usize,
    k: usize,
) -> Result<MrWritten, SynthError> {
    let opts = c.opts;
    let px = pixels(opts.seed, vol, lesion, p, k);
    let mut o = base(
        c,
        SOP_MR,
        &ids.slices[p][k],
        &ids.series[p],
        p as i32 + 1,
        k as i32 + 1,
    );
    // Both breasts in one acquisition: Laterality (Type 2C,
    // PS3.3 C.7.3.1) present and empty.
    o.put(el(tags::LATERALITY, VR::CS, ""));
    put_slice_attributes(&mut o, vol, opts.mr_phases, p, k);
    if opts.mr_enhanced {
        return Ok((None, 0, px));
    }
    pixel_module_u16(&mut o, vol.n, vol.n, 12, px);
    let path = d.join(format!("MR_p{p}_s{k:03}.dcm"));
    let bytes = write(o, &path)?;
    Ok((Some(path), bytes, Vec::new()))
}

/// 12-bit pixels of slice `k` in phase `p`: body behind the chest wall,
/// textured breasts brightening a little per phase, the lesion enhancing.
fn pixels(seed: u64, vol: Volume, lesion: &Lesion, p: usize, k: usize) -> Vec<u16> {
    let Volume {
        n,
        ps,
        x0,
        y0,
        yc,
        ba,
        bb,
        bc,
        lesion: centre,
        ..
    } = vol;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (0x3000_0000 + (p * 10_000 + k) as u64));
    let z = vol.z(k);
    let enh_lesion = if p == 0 {
        0.0
    } else {
        1300.0 * (1.0 - (-(p as f64) / 1.2).exp())
    };
    let mut px = vec![0u16; n * n];
    for r in 0..n {
        let y = y0 + r as f64 * ps;
        for col in 0..n {
            let x = x0 + col as f64 * ps;
            let mut v = 20.0;
            if y > yc {
                v = 180.0 + 10.0 * p as f64; // chest wall / body
            } else {
                for l in [Laterality::Left, Laterality::Right] {
                    let e = ((x - breast_x(l)) / ba).powi(2)
                        + ((y - yc) / bb).powi(2)
                        + (z / bc).powi(2);
                    if e <= 1.0 {
                        v = 260.0 + 60.0 * texture(x, y + z, 1.0) + 25.0 * p as f64;
                    }
                }
            }
            let dd = ((x - centre[0]).powi(2) + (y - centre[1]).powi(2) + (z - centre[2]).powi(2))
                .sqrt();
            if dd < lesion.radius_mm {
                v = 270.0 + enh_lesion;
            }
            v += rng.random_range(-12.0..12.0);
            px[r * n + col] = v.clamp(0.0, 4095.0) as u16;
        }
    }
    px
}

/// MR Image module (PS3.3 C.8.3.1), Image Plane and the DCE timing of one
/// classic slice.
fn put_slice_attributes(o: &mut InMemDicomObject, vol: Volume, phases: usize, p: usize, k: usize) {
    let Volume { dz, ps, x0, y0, .. } = vol;
    let z = vol.z(k);
    let t = 80000 + 100 * p; // 08:00:00 + p minutes
    let tm = format!("{:02}{:02}{:02}", t / 10000, (t / 100) % 100, 0);
    let desc = if p == 0 {
        "DCE pre".to_string()
    } else {
        format!("DCE post {p}")
    };
    for e in [
        el(tags::IMAGE_TYPE, VR::CS, "ORIGINAL\\PRIMARY\\M\\ND"),
        el(tags::SERIES_DESCRIPTION, VR::LO, desc),
        el(tags::SERIES_DATE, VR::DA, "20240302"),
        el(tags::SERIES_TIME, VR::TM, tm.as_str()),
        el(tags::ACQUISITION_DATE, VR::DA, "20240302"),
        el(tags::ACQUISITION_TIME, VR::TM, tm.as_str()),
        el(tags::SCANNING_SEQUENCE, VR::CS, "GR"),
        el(tags::SEQUENCE_VARIANT, VR::CS, "SP"),
        el(tags::SCAN_OPTIONS, VR::CS, "FS"),
        el(tags::MR_ACQUISITION_TYPE, VR::CS, "3D"),
        el(tags::REPETITION_TIME, VR::DS, "4.5"),
        el(tags::ECHO_TIME, VR::DS, "1.8"),
        el(tags::ECHO_TRAIN_LENGTH, VR::IS, "1"),
        el(tags::SLICE_THICKNESS, VR::DS, format!("{dz}")),
        el(tags::SPACING_BETWEEN_SLICES, VR::DS, format!("{dz}")),
        el(
            tags::TEMPORAL_POSITION_IDENTIFIER,
            VR::IS,
            (p + 1).to_string(),
        ),
        el(
            tags::NUMBER_OF_TEMPORAL_POSITIONS,
            VR::IS,
            phases.to_string(),
        ),
        el(tags::PATIENT_POSITION, VR::CS, "FFP"),
        el(
            tags::IMAGE_POSITION_PATIENT,
            VR::DS,
            format!("{:.3}\\{:.3}\\{:.3}", x0, y0, z),
        ),
        el(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, "1\\0\\0\\0\\1\\0"),
        el(tags::SLICE_LOCATION, VR::DS, format!("{z:.3}")),
        el(tags::PIXEL_SPACING, VR::DS, format!("{ps:.5}\\{ps:.5}")),
        el(tags::WINDOW_CENTER, VR::DS, "600"),
        el(tags::WINDOW_WIDTH, VR::DS, "1400"),
    ] {
        o.put(e);
    }
    if p > 0 {
        o.put(el(tags::CONTRAST_BOLUS_AGENT, VR::LO, "Gadobutrol"));
    }
}

/// One Enhanced MR Image (PS3.3 A.36.2) holding every phase: the geometry
/// and time point of each frame live in the per-frame functional groups
/// (C.7.6.16), phases by Temporal Position Index. `jobs` gives the (phase,
/// slice) of each frame of `pixels`, in order.
fn enhanced(
    c: &Common<'_>,
    sop: &str,
    series_uid: &str,
    vol: Volume,
    jobs: &[(usize, usize)],
    pixels: Vec<u16>,
) -> InMemDicomObject {
    let phases = c.opts.mr_phases;
    let mut o = base(c, SOP_ENHANCED_MR, sop, series_uid, 1, 1);
    o.remove_element(tags::INSTANCE_NUMBER);
    for e in [
        el(tags::IMAGE_TYPE, VR::CS, "ORIGINAL\\PRIMARY\\VOLUME\\NONE"),
        el(tags::SERIES_DESCRIPTION, VR::LO, "DCE dynamic"),
        el(tags::INSTANCE_NUMBER, VR::IS, "1"),
        el(tags::CONTENT_TIME, VR::TM, "080000"),
        el(tags::ACQUISITION_DATE_TIME, VR::DT, "20240302080000"),
        el(
            tags::NUMBER_OF_FRAMES,
            VR::IS,
            (phases * vol.slices).to_string(),
        ),
        el(tags::CONTRAST_BOLUS_AGENT, VR::LO, "Gadobutrol"),
        el(
            tags::NUMBER_OF_TEMPORAL_POSITIONS,
            VR::IS,
            phases.to_string(),
        ),
    ] {
        o.put(e);
    }
    let per_frame: Vec<InMemDicomObject> = jobs
        .iter()
        .map(|&(p, k)| per_frame_group(vol, p, k))
        .collect();
    o.put(seq(
        tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE,
        vec![shared_groups(vol)],
    ));
    o.put(seq(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, per_frame));
    pixel_module_u16(&mut o, vol.n, vol.n, 12, pixels);
    o
}

/// Shared Functional Groups: pixel measures, orientation, pixel value
/// transformation and VOI LUT, the same for every frame.
fn shared_groups(vol: Volume) -> InMemDicomObject {
    let Volume { ps, dz, .. } = vol;
    InMemDicomObject::from_element_iter([
        seq(
            tags::PIXEL_MEASURES_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([
                el(tags::PIXEL_SPACING, VR::DS, format!("{ps:.5}\\{ps:.5}")),
                el(tags::SLICE_THICKNESS, VR::DS, format!("{dz}")),
            ])],
        ),
        seq(
            tags::PLANE_ORIENTATION_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([el(
                tags::IMAGE_ORIENTATION_PATIENT,
                VR::DS,
                "1\\0\\0\\0\\1\\0",
            )])],
        ),
        seq(
            tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([
                el(tags::RESCALE_INTERCEPT, VR::DS, "0"),
                el(tags::RESCALE_SLOPE, VR::DS, "1"),
                el(tags::RESCALE_TYPE, VR::LO, "US"),
            ])],
        ),
        seq(
            tags::FRAME_VOILUT_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([
                el(tags::WINDOW_CENTER, VR::DS, "600"),
                el(tags::WINDOW_WIDTH, VR::DS, "1400"),
            ])],
        ),
    ])
}

/// Per-frame Functional Groups of slice `k` in phase `p`: its position and
/// its time point (Temporal Position Index) and place in the stack.
fn per_frame_group(vol: Volume, p: usize, k: usize) -> InMemDicomObject {
    let Volume { x0, y0, .. } = vol;
    let z = vol.z(k);
    InMemDicomObject::from_element_iter([
        seq(
            tags::PLANE_POSITION_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([el(
                tags::IMAGE_POSITION_PATIENT,
                VR::DS,
                format!("{x0:.3}\\{y0:.3}\\{z:.3}"),
            )])],
        ),
        seq(
            tags::FRAME_CONTENT_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([
                el(
                    tags::FRAME_ACQUISITION_DATE_TIME,
                    VR::DT,
                    format!("2024030208{:02}00", p),
                ),
                el(
                    tags::TEMPORAL_POSITION_INDEX,
                    VR::UL,
                    PrimitiveValue::from((p + 1) as u32),
                ),
                el(tags::STACK_ID, VR::SH, "1"),
                el(
                    tags::IN_STACK_POSITION_NUMBER,
                    VR::UL,
                    PrimitiveValue::from((k + 1) as u32),
                ),
            ])],
        ),
    ])
}
