//! Synthetic patient generator (`her2map synth DIR`): a mammography, an
//! ultrasound and a DCE-MRI study of one made-up patient, with a visible
//! lesion in the same breast in all three (enhancing after contrast in MRI).
//! Files are Explicit VR Little Endian with a proper file meta group
//! (PS3.10 7.1). Deterministic for a given seed. Not real anatomy: the shapes
//! exist to exercise selection, decoding, ROI and resampling.
//!
//! This module owns the options, the summary and the shared lesion
//! placement; one builder per modality writes its study ([`mg`], [`us`],
//! [`mr`]) from the blocks in [`dataset`]. Nothing here reads the node's
//! database or configuration.

mod dataset;
mod mg;
mod mr;
mod us;

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::imaging::Laterality;

use dataset::{Uids, mkdir};

/// Options of the generator.
#[derive(Clone, Debug)]
pub struct SynthOptions {
    /// Clinical sizes (MG 3328×4084, MR 6 × 160 slices of 512², US 800×600)
    /// instead of the small default (MG 208×256, MR 6 × 24 of 64², US 160×120).
    pub full_size: bool,
    pub seed: u64,
    pub patient_name: String,
    pub patient_id: String,
    pub issuer_of_patient_id: String,
    pub birth_date: String,
    /// Age at the studies, DICOM AS ("054Y").
    pub patient_age: String,
    /// Breast with the lesion.
    pub lesion_side: Laterality,
    /// Number of DCE phases (1 pre + n−1 post), at least 2.
    pub mr_phases: usize,
    /// Also write a GSPS that circles the lesion on the lesion-side CC view.
    pub with_annotation: bool,
    /// Write the DCE-MRI as one Enhanced MR Image (all phases as frames, per-
    /// frame functional groups) instead of one classic MR file per slice.
    pub mr_enhanced: bool,
    /// Write laterality on the ultrasound images (off: side must come from
    /// configuration).
    pub us_laterality: bool,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            full_size: false,
            seed: 42,
            patient_name: "SYNTHETIC^PATIENT".into(),
            patient_id: "SYN0001".into(),
            issuer_of_patient_id: "HER2MAP-SYNTH".into(),
            birth_date: "19700101".into(),
            patient_age: "054Y".into(),
            lesion_side: Laterality::Right,
            mr_phases: 6,
            with_annotation: false,
            mr_enhanced: false,
            us_laterality: true,
        }
    }
}

/// Files written for one study.
#[derive(Clone, Debug)]
pub struct SynthStudy {
    pub name: String,
    pub study_instance_uid: String,
    pub files: Vec<PathBuf>,
    pub bytes: u64,
}

/// What was written.
#[derive(Clone, Debug)]
pub struct SynthSummary {
    pub studies: Vec<SynthStudy>,
    pub lesion_side: Laterality,
    /// "issuer/patient id", the key the case assembler groups by.
    pub patient_key: String,
    /// Lesion centre in MRI patient coordinates (mm, LPS) and radius (mm).
    pub mr_lesion_center_mm: [f64; 3],
    pub lesion_radius_mm: f64,
    /// Lesion centre in the lesion-side CC / MLO mammograms (column, row).
    pub mg_lesion_px: [(f64, f64); 2],
    pub total_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("cannot create {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write DICOM file {path}: {message}")]
    Dicom { path: PathBuf, message: String },
    #[error("invalid option: {0}")]
    Options(String),
}

/// Where the lesion sits, in breast-relative terms shared by all modalities.
#[derive(Clone, Copy, Debug)]
struct Lesion {
    /// Breast with the lesion.
    side: Laterality,
    /// Depth from the chest wall (fraction of the breast's depth).
    depth: f64,
    /// Lateral offset (fraction).
    off_a: f64,
    /// Vertical offset (fraction).
    off_b: f64,
    radius_mm: f64,
}

impl Lesion {
    /// The placement drawn from the seed (its own stream, apart from the UIDs).
    fn place(opts: &SynthOptions) -> Self {
        let mut geo = ChaCha8Rng::seed_from_u64(opts.seed ^ 0x5EED_0002);
        let depth: f64 = geo.random_range(0.35..0.55);
        let off_a: f64 = geo.random_range(-0.25..0.25);
        let off_b: f64 = geo.random_range(-0.25..0.25);
        Lesion {
            side: opts.lesion_side,
            depth,
            off_a,
            off_b,
            radius_mm: 11.0,
        }
    }
}

/// Paths and total size of the files a study's jobs wrote, in job order.
fn collect_written(
    results: Vec<Result<(PathBuf, u64), SynthError>>,
) -> Result<(Vec<PathBuf>, u64), SynthError> {
    let mut files = Vec::new();
    let mut bytes = 0;
    for r in results {
        let (p, b) = r?;
        files.push(p);
        bytes += b;
    }
    Ok((files, bytes))
}

/// Write the synthetic patient under `dir` (sub-folders MG/, US/, MR/).
pub fn write_synthetic_patient(
    dir: &Path,
    opts: &SynthOptions,
) -> Result<SynthSummary, SynthError> {
    if opts.mr_phases < 2 {
        return Err(SynthError::Options("mr_phases must be at least 2".into()));
    }
    mkdir(dir)?;
    // One UID stream for the whole patient, drawn study by study in this order.
    let mut uids = Uids::new(opts.seed);
    let lesion = Lesion::place(opts);
    let (mg_study, mg_lesion_px) = mg::write_study(&dir.join("MG"), opts, &lesion, &mut uids)?;
    let us_study = us::write_study(&dir.join("US"), opts, &lesion, &mut uids)?;
    let (mr_study, mr_lesion_center_mm) =
        mr::write_study(&dir.join("MR"), opts, &lesion, &mut uids)?;
    let studies = vec![mg_study, us_study, mr_study];
    let total_bytes = studies.iter().map(|s| s.bytes).sum();
    Ok(SynthSummary {
        studies,
        lesion_side: lesion.side,
        patient_key: format!("{}/{}", opts.issuer_of_patient_id, opts.patient_id),
        mr_lesion_center_mm,
        lesion_radius_mm: lesion.radius_mm,
        mg_lesion_px,
        total_bytes,
    })
}
