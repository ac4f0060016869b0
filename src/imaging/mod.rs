//! Imaging: everything between the stored instances of one patient and the
//! HER2 MAP model's input tensors — header indexing, lesion side, view /
//! image / DCE-phase selection, pixel decoding with the DICOM LUT pipeline,
//! ROI, resampling and intensity scaling. Decisions are written down in
//! docs/imaging.md; the input contract is MODEL.md "Inputs".
//!
//! Entry points: [`prepare_case`] (one case, never guesses the side) and
//! [`prepare_case_sides`] (both sides when the lesion side is unknown).

pub use crate::attrs;
pub mod clinical;
pub mod decode;
pub mod resize;
pub mod roi;
pub mod select;

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dicom_object::OpenFileOptions;
use rayon::prelude::*;
use regex::Regex;
use serde::Deserialize;

pub use crate::modality::{Modality, ModalitySet};
pub use crate::side::{LesionSide, SideBasis, SideSetting};
pub use clinical::ClinicalSource;
pub use decode::{DecodeError, GrayImage, VoiWindowChoice};
pub use roi::{PatientBox, PixelBox, RoiProvider};
pub use select::{InstanceMeta, Laterality, MgView, read_instance_meta};

use resize::Grid3;
use roi::{CentredRoi, DicomAnnotationRoi, EnhancementRoi, MgBlobRoi, PlanarTarget, VolumeTarget};
use select::{Kind, Stack};

/// Which frame of a multi-frame ultrasound (cine) image to use.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UsFrameRule {
    /// Representative Frame Number (0028,6010) when present, else the
    /// middle frame (index ⌊n/2⌋, 0-based). Default.
    #[default]
    RepresentativeOrMiddle,
    First,
    Middle,
    /// This 0-based frame, clamped to the last frame.
    Index(u32),
}

/// Settings of the imaging stage (`[imaging]` in the node's configuration).
#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct ImagingSettings {
    /// Lesion side when no ultrasound laterality decides it:
    /// "left" | "right" | "unknown" (default "unknown": never guess).
    pub lesion_side: SideSetting,
    /// Post-contrast phase fed to the model, 1-based among the post-contrast
    /// phases (default 2, the reference's "P2"). When fewer exist, the last
    /// one is used and a note says so.
    pub mri_post_contrast_phase: usize,
    /// Regexes on Series Description marking a pre-contrast phase.
    pub mri_pre_patterns: Vec<String>,
    /// Regexes on Series Description marking a post-contrast phase (never
    /// taken as pre-contrast).
    pub mri_post_patterns: Vec<String>,
    /// Percentiles (0–100) of the cropped, resampled MRI volume mapped to
    /// −1 and +1 (values outside are clipped). Default 0.5 and 99.5.
    pub mri_percentile_low: f32,
    pub mri_percentile_high: f32,
    /// MRI crop cube side = max(longest ROI extent × margin, minimum), mm.
    pub mri_roi_margin: f64,
    pub mri_min_crop_mm: f64,
    /// Cube side when only the centred fallback ROI is available, mm.
    pub mri_fallback_crop_mm: f64,
    /// MG tumour crop square side = max(longest ROI side × margin, minimum
    /// in mm (needs pixel spacing), else minimum fraction of the shorter
    /// image side).
    pub mg_roi_margin: f64,
    pub mg_min_crop_mm: f64,
    pub mg_min_crop_fraction: f64,
    /// Square side for the centred fallback, as a fraction of the shorter side.
    pub mg_fallback_crop_fraction: f64,
    /// Ultrasound cine frame rule.
    pub us_frame: UsFrameRule,
    /// Skip ultrasound frames whose colour pixels exceed `us_colour_fraction`
    /// (colour Doppler overlays), besides those flagged in the header.
    pub us_skip_colour: bool,
    pub us_colour_fraction: f32,
    /// Crop ultrasound to its B-mode tissue region (Sequence of Ultrasound
    /// Regions) when present.
    pub us_crop_to_region: bool,
    /// Window choice when several Window Center/Width values exist.
    pub voi_window: VoiWindowChoice,
    /// Use ROIs from GSPS / SR objects of the patient.
    pub roi_from_dicom_objects: bool,
    /// Use image-derived ROIs (MRI subtraction, MG blob) before the centred crop.
    pub roi_image_derived: bool,
    /// The five clinical covariates, in the model's order.
    pub clinical: [ClinicalSource; 5],
}

impl Default for ImagingSettings {
    fn default() -> Self {
        ImagingSettings {
            lesion_side: SideSetting::Unknown,
            mri_post_contrast_phase: 2,
            mri_pre_patterns: vec![
                r"(?i)\bpre\b".into(),
                r"(?i)pre[-_ ]?(contrast|kontrast|gd|cm)".into(),
                r"(?i)\bnati(ve|v)\b".into(),
                r"(?i)\bph(ase)?[ _-]?0\b".into(),
            ],
            mri_post_patterns: vec![
                r"(?i)\bpost\b".into(),
                r"(?i)post[-_ ]?(contrast|gd|cm)".into(),
                r"(?i)\bsub".into(),
            ],
            mri_percentile_low: 0.5,
            mri_percentile_high: 99.5,
            mri_roi_margin: 2.0,
            mri_min_crop_mm: 64.0,
            mri_fallback_crop_mm: 128.0,
            mg_roi_margin: 2.0,
            mg_min_crop_mm: 40.0,
            mg_min_crop_fraction: 0.15,
            mg_fallback_crop_fraction: 0.5,
            us_frame: UsFrameRule::RepresentativeOrMiddle,
            us_skip_colour: true,
            us_colour_fraction: 0.05,
            us_crop_to_region: true,
            voi_window: VoiWindowChoice::First,
            roi_from_dicom_objects: true,
            roi_image_derived: true,
            clinical: [
                ClinicalSource::attribute("PatientAge"),
                ClinicalSource::default(),
                ClinicalSource::default(),
                ClinicalSource::default(),
                ClinicalSource::default(),
            ],
        }
    }
}

/// Side lengths of the model's input grids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputGrid {
    /// MRI cube side (96 for the reference model).
    pub mri: usize,
    /// US/MG image side (256 for the reference model).
    pub image: usize,
}

impl Default for InputGrid {
    fn default() -> Self {
        InputGrid {
            mri: 96,
            image: 256,
        }
    }
}

/// MRI input: `shape` = (z, y, x), `data.len()` = product, values in [−1, 1].
#[derive(Clone, Debug)]
pub struct Volume {
    pub shape: [usize; 3],
    pub data: Vec<f32>,
}

/// US input: `size × size`, values in [0, 1].
#[derive(Clone, Debug)]
pub struct Plane {
    pub size: usize,
    pub data: Vec<f32>,
}

/// MG input: 4 × `size × size`, channel order CC, MLO, CC crop, MLO crop.
#[derive(Clone, Debug)]
pub struct Planes4 {
    pub size: usize,
    pub data: Vec<f32>,
}

/// Where an input came from, enough to map a CAM on the input grid back
/// onto the source image(s).
#[derive(Clone, Debug)]
pub enum SourceGeometry {
    /// A 2-D input: `crop` (x0, y0, x1, y1 in source pixels, exclusive ends)
    /// of frame `frame` (0-based) of a `cols × rows` image was resized
    /// (bilinear, Pillow-like) to the input grid.
    Planar {
        cols: usize,
        rows: usize,
        frame: u32,
        crop: [f64; 4],
    },
    /// The MRI input: a cube of side `box_side_mm` centred on `box_center_mm`
    /// (patient LPS), axes aligned with the patient: input index (k, j, i) ↦
    /// `box_center_mm + ((i+0.5)/n − 0.5)·side·x̂ + ((j+0.5)/n − 0.5)·side·ŷ
    /// + ((k+0.5)/n − 0.5)·side·ẑ` (x̂ = patient left, ŷ = posterior,
    /// ẑ = superior). The source stack (slice list in `Selection`) has
    /// voxel (s, r, c) at `origin + c·spacing[2]·row_dir + r·spacing[1]·col_dir
    /// + s·spacing[0]·normal`.
    Volume {
        slices: usize,
        rows: usize,
        cols: usize,
        frames: Vec<u32>,
        origin: [f64; 3],
        row_dir: [f64; 3],
        col_dir: [f64; 3],
        normal: [f64; 3],
        spacing: [f64; 3],
        box_center_mm: [f64; 3],
        box_side_mm: f64,
    },
}

/// Heatmap backgrounds are at most this many pixels on their longer side:
/// enough to read in a viewer, without a 40 MB colour copy of every
/// full-field mammogram.
pub const HEATMAP_MAX_SIDE: usize = 1024;

/// A source frame as its heatmap shows it: display greyscale in [0, 1] with
/// the first VOI window, shrunk (Pillow bilinear) to at most
/// [`HEATMAP_MAX_SIDE`] on its longer side; `scale` = base pixels per source
/// pixel (1.0 when not shrunk).
#[derive(Clone)]
pub struct HeatmapBase {
    pub image: GrayImage,
    pub scale: f64,
}

impl std::fmt::Debug for HeatmapBase {
    // The pixels would swamp any debug print of a selection.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HeatmapBase({}x{}, scale {})",
            self.image.width, self.image.height, self.scale
        )
    }
}

/// The heatmap background of a decoded frame (see [`HeatmapBase`]).
pub fn heatmap_base(g: &GrayImage) -> HeatmapBase {
    let longer = g.width.max(g.height);
    if longer <= HEATMAP_MAX_SIDE {
        return HeatmapBase {
            image: g.clone(),
            scale: 1.0,
        };
    }
    let scale = HEATMAP_MAX_SIDE as f64 / longer as f64;
    let (w, h) = (
        ((g.width as f64 * scale).round() as usize).max(1),
        ((g.height as f64 * scale).round() as usize).max(1),
    );
    HeatmapBase {
        image: resize::resize_bilinear(g, w, h),
        scale,
    }
}

/// The heatmap background of an image imaging has decoded anyway, so that
/// reporting need not open and decode the source again: only when that
/// decode used the first window, as heatmaps do.
fn shared_base(img: &GrayImage, s: &ImagingSettings) -> Option<Arc<HeatmapBase>> {
    (s.voi_window == VoiWindowChoice::First).then(|| Arc::new(heatmap_base(img)))
}

/// One chosen input and its provenance.
#[derive(Clone, Debug)]
pub struct Selection {
    pub modality: Modality,
    /// "CC", "MLO", "CC crop", "MLO crop", "US", "MR post-contrast 2",
    /// "MR pre-contrast (subtraction)".
    pub role: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    /// SOP Instance UIDs used (for MR, the slices in stack order).
    pub sop_instance_uids: Vec<String>,
    pub geometry: SourceGeometry,
    /// ROI provider that placed the crop ("whole-image", "us-region",
    /// "dicom-annotation", "mri-enhancement", "mg-blob", "centred").
    pub roi_provider: String,
    /// The heatmap background of the source frame, kept from the decode
    /// done here (MG whole views and the US image, with the first VOI
    /// window); `None` where the reporting step decodes it itself (MR
    /// slices, chosen only after inference; crops; other windows).
    pub heatmap_base: Option<Arc<HeatmapBase>>,
}

/// A per-instance problem, recorded for the case; preparation goes on.
#[derive(Clone, Debug)]
pub struct InstanceError {
    pub file: PathBuf,
    pub sop_instance_uid: Option<String>,
    pub message: String,
}

/// The model inputs of one case and how they were obtained.
#[derive(Clone, Debug)]
pub struct PreparedCase {
    pub mri: Option<Volume>,
    pub us: Option<Plane>,
    pub mg: Option<Planes4>,
    pub clinical: [f32; 5],
    pub clinical_missing: [bool; 5],
    pub lesion_side: LesionSide,
    pub selections: Vec<Selection>,
    /// The header of every instance a selection names, by SOP Instance UID,
    /// as read here: reporting cites and draws on them without opening the
    /// files again, and with the laterality and view imaging decided.
    pub sources: HashMap<String, Arc<InstanceMeta>>,
    pub errors: Vec<InstanceError>,
    pub notes: Vec<String>,
}

impl PreparedCase {
    /// The modalities this side has an input of.
    pub fn modalities(&self) -> ModalitySet {
        ModalitySet::default()
            .with(Modality::US, self.us.is_some())
            .with(Modality::MR, self.mri.is_some())
            .with(Modality::MG, self.mg.is_some())
    }
}

/// Prepare one case. Never panics; per-instance failures go to `errors`.
/// When the lesion side is unknown (no usable US laterality and
/// `lesion_side = "unknown"`), MG is left out (it needs a side) and a note
/// says so; use [`prepare_case_sides`] to get both sides.
pub fn prepare_case(
    files: &[PathBuf],
    settings: &ImagingSettings,
    grid: InputGrid,
) -> PreparedCase {
    let index = build_index(files);
    prepare_from_index(&index, settings, grid, None, None)
}

/// Like [`prepare_case`], but when the lesion side is unknown returns two
/// cases, left then right, each with `basis = BothSidesRun` and a note; with a
/// known side returns one case. Headers are read once, and the MRI phases
/// decoded once.
pub fn prepare_case_sides(
    files: &[PathBuf],
    settings: &ImagingSettings,
    grid: InputGrid,
) -> Vec<PreparedCase> {
    let index = build_index(files);
    let decided = decide_side(&index.metas, settings.lesion_side);
    if decided.side.is_some() {
        return vec![prepare_from_index(
            &index,
            settings,
            grid,
            Some(decided),
            None,
        )];
    }
    // The MRI decode is the same for both runs: done once.
    let mr_cache = MrDecodeCache::default();
    [Laterality::Left, Laterality::Right]
        .into_iter()
        .map(|s| {
            let side = LesionSide {
                side: Some(s),
                basis: SideBasis::BothSidesRun,
                detail: format!(
                    "lesion side unknown ({}); this is the {s:?} run of two",
                    decided.detail
                ),
            };
            prepare_from_index(&index, settings, grid, Some(side), Some(&mr_cache))
        })
        .collect()
}

struct Index {
    metas: Vec<InstanceMeta>,
    errors: Vec<InstanceError>,
    notes: Vec<String>,
}

fn build_index(files: &[PathBuf]) -> Index {
    let results: Vec<(PathBuf, Result<InstanceMeta, String>)> = files
        .par_iter()
        .map(|p| {
            let r = catch_unwind(AssertUnwindSafe(|| read_instance_meta(p)))
                .unwrap_or_else(|_| Err("header reader panicked".into()));
            (p.clone(), r)
        })
        .collect();
    let mut metas = Vec::new();
    let mut errors = Vec::new();
    let mut other = 0;
    for (p, r) in results {
        match r {
            Ok(m) => {
                if m.kind == Kind::Other {
                    other += 1;
                }
                metas.push(m);
            }
            Err(e) => errors.push(InstanceError {
                file: p,
                sop_instance_uid: None,
                message: e,
            }),
        }
    }
    let mut notes = Vec::new();
    if other > 0 {
        notes.push(format!("{other} instance(s) of other modalities ignored"));
    }
    metas.sort_by(|a, b| a.path.cmp(&b.path));
    Index {
        metas,
        errors,
        notes,
    }
}

/// The lesion side of these instances, by the one rule ([`crate::side`]).
fn decide_side(metas: &[InstanceMeta], configured: SideSetting) -> LesionSide {
    crate::side::lesion_side(
        metas.iter().map(|m| crate::side::SideEvidence {
            kind: m.kind,
            laterality: m.laterality,
            doppler: select::us_flagged_doppler(m),
        }),
        configured,
    )
}

fn open_full(path: &Path) -> Result<dicom_object::DefaultDicomObject, String> {
    catch_unwind(AssertUnwindSafe(|| OpenFileOptions::new().open_file(path)))
        .map_err(|_| "reader panicked".to_string())?
        .map_err(|e| format!("cannot read DICOM file: {e}"))
}

fn inst_err(m: &InstanceMeta, msg: impl Into<String>) -> InstanceError {
    InstanceError {
        file: m.path.clone(),
        sop_instance_uid: Some(m.sop_instance.clone()),
        message: msg.into(),
    }
}

/// Decode one frame to display grayscale, catching panics.
fn load_gray(
    m: &InstanceMeta,
    frame: u32,
    settings: &ImagingSettings,
) -> Result<GrayImage, InstanceError> {
    let obj = open_full(&m.path).map_err(|e| inst_err(m, e))?;
    catch_unwind(AssertUnwindSafe(|| {
        decode::decode_gray(&obj, frame, settings.voi_window)
    }))
    .map_err(|_| inst_err(m, "decoder panicked"))?
    .map_err(|e| inst_err(m, format!("frame {frame}: {e}")))
}

fn prepare_from_index(
    index: &Index,
    settings: &ImagingSettings,
    grid: InputGrid,
    forced: Option<LesionSide>,
    mr_cache: Option<&MrDecodeCache>,
) -> PreparedCase {
    let mut notes = index.notes.clone();
    let mut errors = index.errors.clone();
    let lesion_side = forced.unwrap_or_else(|| decide_side(&index.metas, settings.lesion_side));
    if lesion_side.side.is_none() {
        notes.push(format!(
            "lesion side unknown: {}; MG not prepared and MRI ROI searched on both sides (use prepare_case_sides to run both sides)",
            lesion_side.detail
        ));
    }
    let headers = || {
        let order = |k: Kind| match k {
            Kind::Image(Modality::MG) => 0,
            Kind::Image(Modality::US) => 1,
            Kind::Image(Modality::MR) => 2,
            _ => 3,
        };
        let mut v: Vec<&InstanceMeta> = index.metas.iter().collect();
        v.sort_by_key(|m| order(m.kind));
        v
    };
    let hs = headers();
    let (clinical, clinical_missing, cnotes) =
        clinical::map_clinical(&settings.clinical, hs.iter().map(|m| &m.header));
    notes.extend(cnotes);

    let annotations = if settings.roi_from_dicom_objects {
        Some(DicomAnnotationRoi::from_index(&index.metas))
    } else {
        None
    };
    let side = lesion_side.side;
    let (
        (mri, mri_sel, mri_err, mri_notes),
        ((mg, mg_sel, mg_err, mg_notes), (us, us_sel, us_err, us_notes)),
    ) = rayon::join(
        || {
            let ann = annotations.as_ref();
            prepare_mri(&index.metas, settings, grid, side, ann, mr_cache)
        },
        || {
            rayon::join(
                || prepare_mg(&index.metas, settings, grid, side, annotations.as_ref()),
                || prepare_us(&index.metas, settings, grid, side),
            )
        },
    );
    let mut selections = Vec::new();
    for (sel, err, n) in [
        (mg_sel, mg_err, mg_notes),
        (us_sel, us_err, us_notes),
        (mri_sel, mri_err, mri_notes),
    ] {
        selections.extend(sel);
        errors.extend(err);
        notes.extend(n);
    }
    let mut by_uid: HashMap<&str, &InstanceMeta> = HashMap::new();
    for m in &index.metas {
        by_uid.entry(m.sop_instance.as_str()).or_insert(m);
    }
    let sources = selections
        .iter()
        .flat_map(|s| &s.sop_instance_uids)
        .filter_map(|uid| Some((uid.clone(), Arc::new((*by_uid.get(uid.as_str())?).clone()))))
        .collect();
    PreparedCase {
        mri,
        us,
        mg,
        clinical,
        clinical_missing,
        lesion_side,
        selections,
        sources,
        errors,
        notes,
    }
}

type Part<T> = (Option<T>, Vec<Selection>, Vec<InstanceError>, Vec<String>);

// ------------------------------------------------------------------ US ----

fn us_frame(m: &InstanceMeta, rule: UsFrameRule) -> u32 {
    let n = m.frames.max(1);
    match rule {
        UsFrameRule::First => 0,
        UsFrameRule::Middle => n / 2,
        UsFrameRule::Index(i) => i.min(n - 1),
        UsFrameRule::RepresentativeOrMiddle => m
            .representative_frame
            .map(|f| (f - 1).min(n - 1))
            .unwrap_or(n / 2),
    }
}

fn prepare_us(
    metas: &[InstanceMeta],
    s: &ImagingSettings,
    grid: InputGrid,
    side: Option<Laterality>,
) -> Part<Plane> {
    let (mut errors, mut notes) = (Vec::new(), Vec::new());
    let flagged = metas
        .iter()
        .filter(|m| m.kind == Kind::Image(Modality::US) && select::us_flagged_doppler(m))
        .count();
    if flagged > 0 {
        notes.push(format!(
            "US: {flagged} Doppler/colour-flagged instance(s) skipped"
        ));
    }
    let cands = select::us_candidates(metas, side);
    if cands.is_empty() {
        if metas.iter().any(|m| m.kind == Kind::Image(Modality::US)) {
            notes.push("US: no B-mode image of the lesion side".into());
        }
        return (None, vec![], errors, notes);
    }
    for m in cands {
        let frame = us_frame(m, s.us_frame);
        let obj = match open_full(&m.path) {
            Ok(o) => o,
            Err(e) => {
                errors.push(inst_err(m, e));
                continue;
            }
        };
        let result = catch_unwind(AssertUnwindSafe(
            || -> Result<(GrayImage, f32), DecodeError> {
                let colour = if s.us_skip_colour {
                    decode::chroma_fraction(&decode::decode_rgb(&obj, frame)?, 0.15)
                } else {
                    0.0
                };
                Ok((decode::decode_gray(&obj, frame, s.voi_window)?, colour))
            },
        ));
        let (img, colour) = match result {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                errors.push(inst_err(m, format!("frame {frame}: {e}")));
                continue;
            }
            Err(_) => {
                errors.push(inst_err(m, "decoder panicked"));
                continue;
            }
        };
        if colour > s.us_colour_fraction {
            notes.push(format!(
                "US: frame {frame} of an instance skipped as colour-dominant ({:.0}% coloured pixels)",
                colour * 100.0
            ));
            continue;
        }
        let (crop, provider) = match select::us_tissue_region(m).filter(|_| s.us_crop_to_region) {
            Some((x0, y0, x1, y1)) => ([x0 as f64, y0 as f64, x1 as f64, y1 as f64], "us-region"),
            None => (
                [0.0, 0.0, img.width as f64, img.height as f64],
                "whole-image",
            ),
        };
        let out = resize::resize_box(
            &img,
            (crop[0], crop[1], crop[2], crop[3]),
            grid.image,
            grid.image,
        );
        if m.frames > 1 {
            notes.push(format!(
                "US: cine with {} frames, frame {frame} (0-based) used",
                m.frames
            ));
        }
        let sel = Selection {
            modality: Modality::US,
            role: "US".into(),
            study_instance_uid: m.study_uid.clone(),
            series_instance_uid: m.series_uid.clone(),
            sop_instance_uids: vec![m.sop_instance.clone()],
            geometry: SourceGeometry::Planar {
                cols: img.width,
                rows: img.height,
                frame,
                crop,
            },
            roi_provider: provider.into(),
            heatmap_base: shared_base(&img, s),
        };
        return (
            Some(Plane {
                size: grid.image,
                data: clamp01(out.data),
            }),
            vec![sel],
            errors,
            notes,
        );
    }
    notes.push("US: no decodable B-mode image".into());
    (None, vec![], errors, notes)
}

fn clamp01(mut v: Vec<f32>) -> Vec<f32> {
    for x in v.iter_mut() {
        *x = if x.is_finite() {
            x.clamp(0.0, 1.0)
        } else {
            0.0
        };
    }
    v
}

// ------------------------------------------------------------------ MG ----

fn prepare_mg(
    metas: &[InstanceMeta],
    s: &ImagingSettings,
    grid: InputGrid,
    side: Option<Laterality>,
    ann: Option<&DicomAnnotationRoi>,
) -> Part<Planes4> {
    let (mut errors, mut notes) = (Vec::new(), Vec::new());
    let Some(side) = side else {
        return (None, vec![], errors, notes);
    };
    if !metas.iter().any(|m| m.kind == Kind::Image(Modality::MG)) {
        return (None, vec![], errors, notes);
    }
    let picks = select::select_mg(metas, side);
    let decoded: Vec<Option<(&InstanceMeta, Result<GrayImage, InstanceError>)>> = picks
        .par_iter()
        .map(|p| p.as_ref().map(|p| (p.meta, load_gray(p.meta, 0, s))))
        .collect();
    for p in picks.iter().flatten() {
        notes.extend(p.note.clone());
    }
    let mut views = Vec::new();
    for (i, d) in decoded.into_iter().enumerate() {
        let name = if i == 0 { "CC" } else { "MLO" };
        match d {
            None => notes.push(format!("MG: no {name} view of side {}", side.code())),
            Some((_, Err(e))) => errors.push(e),
            Some((m, Ok(img))) => views.push((name, m, img)),
        }
    }
    if views.len() < 2 {
        notes.push("MG: both CC and MLO of the lesion side are needed; MG input left out".into());
        return (None, vec![], errors, notes);
    }
    let n = grid.image;
    let mut data = vec![0f32; 4 * n * n];
    let mut sels = Vec::new();
    let mut providers: Vec<&dyn RoiProvider> = Vec::new();
    if let Some(a) = ann {
        providers.push(a);
    }
    if s.roi_image_derived {
        providers.push(&MgBlobRoi);
    }
    // The views are independent (resizes, ROI search, heatmap base): one
    // rayon task each, assembled in view order below.
    let per_view = |(name, m, img): &(&str, &InstanceMeta, GrayImage)| {
        let whole = clamp01(resize::resize_bilinear(img, n, n).data);
        let whole_sel = Selection {
            modality: Modality::MG,
            role: name.to_string(),
            study_instance_uid: m.study_uid.clone(),
            series_instance_uid: m.series_uid.clone(),
            sop_instance_uids: vec![m.sop_instance.clone()],
            geometry: SourceGeometry::Planar {
                cols: img.width,
                rows: img.height,
                frame: 0,
                crop: [0.0, 0.0, img.width as f64, img.height as f64],
            },
            roi_provider: "whole-image".into(),
            heatmap_base: shared_base(img, s),
        };
        let target = PlanarTarget {
            sop_instance_uid: &m.sop_instance,
            frame: 0,
            image: img,
            pixel_spacing_mm: m.pixel_spacing_mm,
        };
        let found = providers
            .iter()
            .find_map(|p| p.planar(&target).map(|b| (p.name(), b)));
        let shorter = img.width.min(img.height) as f64;
        let (provider, crop) = match found {
            Some((pname, b)) => {
                let min_side = match m.pixel_spacing_mm {
                    Some(sp) => s.mg_min_crop_mm / sp,
                    None => s.mg_min_crop_fraction * shorter,
                };
                let side_px = ((b.x1 - b.x0).max(b.y1 - b.y0) * s.mg_roi_margin).max(min_side);
                (
                    pname,
                    square_crop(b.center(), side_px, img.width, img.height),
                )
            }
            None => {
                let b = CentredRoi.planar(&target).unwrap_or(PixelBox {
                    x0: img.width as f64 / 2.0,
                    y0: img.height as f64 / 2.0,
                    x1: img.width as f64 / 2.0,
                    y1: img.height as f64 / 2.0,
                });
                (
                    "centred",
                    square_crop(
                        b.center(),
                        s.mg_fallback_crop_fraction * shorter,
                        img.width,
                        img.height,
                    ),
                )
            }
        };
        let out = resize::resize_box(img, (crop[0], crop[1], crop[2], crop[3]), n, n);
        let crop_sel = Selection {
            modality: Modality::MG,
            role: format!("{name} crop"),
            study_instance_uid: m.study_uid.clone(),
            series_instance_uid: m.series_uid.clone(),
            sop_instance_uids: vec![m.sop_instance.clone()],
            geometry: SourceGeometry::Planar {
                cols: img.width,
                rows: img.height,
                frame: 0,
                crop,
            },
            roi_provider: provider.into(),
            heatmap_base: None,
        };
        (whole, whole_sel, clamp01(out.data), crop_sel)
    };
    let made: Vec<_> = views.par_iter().map(per_view).collect();
    for (c, (whole, whole_sel, crop, crop_sel)) in made.into_iter().enumerate() {
        data[c * n * n..(c + 1) * n * n].copy_from_slice(&whole);
        data[(c + 2) * n * n..(c + 3) * n * n].copy_from_slice(&crop);
        sels.push(whole_sel);
        sels.push(crop_sel);
    }
    (Some(Planes4 { size: n, data }), sels, errors, notes)
}

/// A square of `side` pixels centred at `c`, shifted (not shrunk) to stay
/// inside the image; shrunk only when larger than the image.
fn square_crop(c: (f64, f64), side: f64, w: usize, h: usize) -> [f64; 4] {
    let side = side.min(w.min(h) as f64).max(1.0);
    let place = |c: f64, n: f64| -> (f64, f64) {
        let lo = (c - side / 2.0).clamp(0.0, (n - side).max(0.0));
        (lo, lo + side)
    };
    let (x0, x1) = place(c.0, w as f64);
    let (y0, y1) = place(c.1, h as f64);
    [x0.round(), y0.round(), x1.round(), y1.round()]
}

// ------------------------------------------------------------------ MR ----

/// One file and the (frame, destination) pairs decoded from it.
type FileFrames<'a, T> = (&'a Path, Vec<(u32, T)>);

/// Decode every slice of a stack in parallel and hand each slice's modality
/// values to `put` with that slice's `slots` entry (one per slice, in stack
/// order: e.g. its disjoint part of an output buffer).
fn decode_stack<T: Send>(
    st: &Stack,
    slots: Vec<T>,
    put: impl Fn(T, &[f32]) + Sync,
) -> Result<(), InstanceError> {
    let (ny, nx) = (st.rows, st.cols);
    // Group slices by file so that a multi-frame (Enhanced MR) instance is
    // opened once.
    let mut groups: Vec<FileFrames<'_, T>> = Vec::new();
    let mut by_path: std::collections::HashMap<&Path, usize> = std::collections::HashMap::new();
    for (sl, slot) in st.slices.iter().zip(slots) {
        let g = *by_path.entry(sl.path.as_path()).or_insert_with(|| {
            groups.push((sl.path.as_path(), Vec::new()));
            groups.len() - 1
        });
        groups[g].1.push((sl.frame, slot));
    }
    groups
        .into_par_iter()
        .try_for_each(|(path, frames)| -> Result<(), InstanceError> {
            let sop = st
                .slices
                .iter()
                .find(|s| s.path == path)
                .map(|s| s.sop_instance.clone());
            let err = |msg: String| InstanceError {
                file: path.to_path_buf(),
                sop_instance_uid: sop.clone(),
                message: msg,
            };
            let obj = open_full(path).map_err(err)?;
            frames.into_par_iter().try_for_each(|(frame, slot)| {
                let img = catch_unwind(AssertUnwindSafe(|| decode::decode_modality(&obj, frame)))
                    .map_err(|_| err("decoder panicked".into()))?
                    .map_err(|e| err(format!("frame {frame}: {e}")))?;
                if img.width != nx || img.height != ny {
                    return Err(err("slice size differs from the stack".into()));
                }
                put(slot, &img.data);
                Ok(())
            })
        })
}

/// Decode the slices of a stack into a (slice, row, col) grid of modality
/// values, in parallel, writing straight into the grid buffer.
/// The decoded MR phases of a case, kept between the two runs of an
/// unknown lesion side: the decode does not depend on the side, only the
/// ROI does. Used only for those two runs, so that a known side never holds
/// the decode longer than its own MRI preparation.
#[derive(Default)]
struct MrDecodeCache(std::sync::Mutex<Option<MrDecoded>>);

#[derive(Clone)]
struct MrDecoded {
    /// The stacks decoded: the paths of their slices.
    key: (Vec<PathBuf>, Option<Vec<PathBuf>>),
    post: Arc<Grid3>,
    pre: Option<Result<Arc<Grid3>, InstanceError>>,
}

/// Decode the chosen phase and pool the pre-contrast one against it, or
/// take both from `cache` when an earlier run decoded the same stacks.
fn decode_mr(
    stack: &Stack,
    pre_stack: Option<&Stack>,
    cache: Option<&MrDecodeCache>,
) -> Result<MrDecoded, InstanceError> {
    let paths = |st: &Stack| st.slices.iter().map(|s| s.path.clone()).collect::<Vec<_>>();
    let key = (paths(stack), pre_stack.map(paths));
    // The second run takes the decode out: nothing holds it after that.
    let cached = cache
        .and_then(|c| c.0.lock().ok())
        .and_then(|mut held| held.take_if(|d| d.key == key));
    if let Some(d) = cached {
        return Ok(d);
    }
    let post = Arc::new(load_stack(stack)?);
    let pre = pre_stack.map(|p| load_pooled_subtraction(p, &post).map(Arc::new));
    let decoded = MrDecoded { key, post, pre };
    if let Some(mut held) = cache.and_then(|c| c.0.lock().ok()) {
        *held = Some(decoded.clone());
    }
    Ok(decoded)
}

fn load_stack(st: &Stack) -> Result<Grid3, InstanceError> {
    let (nz, ny, nx) = (st.slices.len(), st.rows, st.cols);
    let mut data = vec![0f32; nz * ny * nx];
    decode_stack(st, data.chunks_mut(ny * nx).collect(), |dst, v| {
        dst.copy_from_slice(v)
    })?;
    Ok(Grid3 {
        shape: [nz, ny, nx],
        data,
    })
}

/// The pre-contrast phase as the enhancement ROI needs it: post − pre pooled
/// in-plane (`roi::pool_slice`), slice by slice as each pre slice is
/// decoded, so the pre phase is never held at full resolution.
fn load_pooled_subtraction(st: &Stack, post: &Grid3) -> Result<Grid3, InstanceError> {
    let [nz, ny, nx] = post.shape;
    let (f, py, px) = roi::pool_grid(ny, nx);
    let mut data = vec![0f32; nz * py * px];
    let slots = data
        .chunks_mut(py * px)
        .zip(post.data.chunks(ny * nx))
        .collect();
    decode_stack(st, slots, |(plane, post), pre| {
        roi::pool_slice(post, Some(pre), nx, f, px, plane)
    })?;
    Ok(Grid3 {
        shape: [nz, py, px],
        data,
    })
}

fn prepare_mri(
    metas: &[InstanceMeta],
    s: &ImagingSettings,
    grid: InputGrid,
    side: Option<Laterality>,
    ann: Option<&DicomAnnotationRoi>,
    cache: Option<&MrDecodeCache>,
) -> Part<Volume> {
    let (mut errors, mut notes) = (Vec::new(), Vec::new());
    let no_geom = metas
        .iter()
        .filter(|m| {
            m.kind == Kind::Image(Modality::MR)
                && m.geom.is_none()
                && !m.frame_geoms.iter().any(|g| g.0.is_some())
        })
        .count();
    if no_geom > 0 {
        notes.push(format!(
            "MR: {no_geom} instance(s) without Image Position/Orientation ignored"
        ));
    }
    let phases = select::mr_phases(metas);
    if phases.is_empty() {
        return (None, vec![], errors, notes);
    }
    let compile = |pats: &[String], notes: &mut Vec<String>| -> Vec<Regex> {
        pats.iter()
            .filter_map(|p| match Regex::new(p) {
                Ok(r) => Some(r),
                Err(e) => {
                    notes.push(format!("MR: invalid series-description pattern {p:?}: {e}"));
                    None
                }
            })
            .collect()
    };
    let pre_pats = compile(&s.mri_pre_patterns, &mut notes);
    let post_pats = compile(&s.mri_post_patterns, &mut notes);
    let dce = select::detect_dce(phases, &pre_pats, &post_pats);
    notes.extend(dce.notes.iter().cloned());
    if dce.post.is_empty() {
        notes.push(format!("MR: no post-contrast phase ({})", dce.rule));
        return (None, vec![], errors, notes);
    }
    let want = s.mri_post_contrast_phase.max(1);
    let idx = want.min(dce.post.len()) - 1;
    if idx + 1 != want {
        notes.push(format!(
            "MR: post-contrast phase {want} requested, only {} present; phase {} used",
            dce.post.len(),
            idx + 1
        ));
    }
    notes.push(format!(
        "MR: pre-contrast by {}; {} post-contrast phase(s); post-contrast phase {} used",
        dce.rule,
        dce.post.len(),
        idx + 1
    ));
    let post_phase = &dce.post[idx];
    let Some(stack) = select::stack_phase(post_phase) else {
        notes.push("MR: chosen phase has no usable slice geometry".into());
        return (None, vec![], errors, notes);
    };
    notes.extend(stack.notes.iter().cloned());
    let pre_stack = dce.pre.as_ref().and_then(select::stack_phase);
    // Subtraction needs the same voxel grid; otherwise skip the pre phase
    // entirely (never decoded).
    let pre_stack = pre_stack.filter(|p| {
        let same = p.slices.len() == stack.slices.len()
            && p.rows == stack.rows
            && p.cols == stack.cols
            && (0..3).all(|a| (p.origin[a] - stack.origin[a]).abs() < 1.0);
        if !same {
            notes
                .push("MR: pre-contrast grid differs from the chosen phase; no subtraction".into());
        }
        same
    });
    // Only two phases are ever decoded, and only the chosen one is held at
    // full resolution (memory: see docs/imaging.md); the pre phase is pooled
    // against it as it is decoded, so it comes second.
    let (post, pre) = match decode_mr(&stack, pre_stack.as_ref(), cache) {
        Ok(d) => (d.post, d.pre),
        Err(e) => {
            errors.push(e);
            notes.push("MR: chosen phase could not be decoded; MRI input left out".into());
            return (None, vec![], errors, notes);
        }
    };
    let pre = match pre {
        Some(Ok(g)) => Some(g),
        Some(Err(e)) => {
            errors.push(e);
            notes.push("MR: pre-contrast phase could not be decoded; no subtraction".into());
            None
        }
        None => None,
    };
    let target = VolumeTarget {
        stack: &stack,
        post: &post,
        pooled_subtraction: pre.as_deref(),
        side,
    };
    let mut providers: Vec<&dyn RoiProvider> = Vec::new();
    if let Some(a) = ann {
        providers.push(a);
    }
    if s.roi_image_derived {
        providers.push(&EnhancementRoi);
    }
    let found = providers
        .iter()
        .find_map(|p| p.volume(&target).map(|b| (p.name(), b)));
    let (provider, center, side_mm) = match found {
        Some((name, b)) => {
            let e = b.extent();
            let longest = e[0].max(e[1]).max(e[2]);
            (
                name,
                b.center(),
                (longest * s.mri_roi_margin).max(s.mri_min_crop_mm),
            )
        }
        None => {
            let b = CentredRoi.volume(&target).unwrap_or(PatientBox {
                min: [0.0; 3],
                max: [0.0; 3],
            });
            ("centred", b.center(), s.mri_fallback_crop_mm)
        }
    };
    let n = grid.mri;
    let mut data = vec![0f32; n * n * n];
    data.par_chunks_mut(n * n)
        .enumerate()
        .for_each(|(k, plane)| {
            let off = |i: usize| ((i as f64 + 0.5) / n as f64 - 0.5) * side_mm;
            for j in 0..n {
                for i in 0..n {
                    let p = [center[0] + off(i), center[1] + off(j), center[2] + off(k)];
                    let v = stack.to_voxel(p);
                    plane[j * n + i] = post.sample(v[0], v[1], v[2]);
                }
            }
        });
    // Freed here unless the other side's run will take them from the cache.
    drop(pre);
    drop(post);
    scale_percentiles(&mut data, s.mri_percentile_low, s.mri_percentile_high);
    let mut sels = vec![Selection {
        modality: Modality::MR,
        role: format!("MR post-contrast {}", idx + 1),
        study_instance_uid: post_phase.study_uid.clone(),
        series_instance_uid: post_phase.series_uid.clone(),
        sop_instance_uids: stack
            .slices
            .iter()
            .map(|s| s.sop_instance.clone())
            .collect(),
        geometry: SourceGeometry::Volume {
            slices: stack.slices.len(),
            rows: stack.rows,
            cols: stack.cols,
            frames: stack.slices.iter().map(|s| s.frame).collect(),
            origin: stack.origin,
            row_dir: stack.row_dir,
            col_dir: stack.col_dir,
            normal: stack.normal,
            spacing: stack.spacing,
            box_center_mm: center,
            box_side_mm: side_mm,
        },
        roi_provider: provider.into(),
        heatmap_base: None,
    }];
    if let (Some(p), Some(pst)) = (&dce.pre, &pre_stack) {
        sels.push(Selection {
            modality: Modality::MR,
            role: "MR pre-contrast (subtraction)".into(),
            study_instance_uid: p.study_uid.clone(),
            series_instance_uid: p.series_uid.clone(),
            sop_instance_uids: pst.slices.iter().map(|s| s.sop_instance.clone()).collect(),
            geometry: SourceGeometry::Volume {
                slices: pst.slices.len(),
                rows: pst.rows,
                cols: pst.cols,
                frames: pst.slices.iter().map(|s| s.frame).collect(),
                origin: pst.origin,
                row_dir: pst.row_dir,
                col_dir: pst.col_dir,
                normal: pst.normal,
                spacing: pst.spacing,
                box_center_mm: center,
                box_side_mm: side_mm,
            },
            roi_provider: provider.into(),
            heatmap_base: None,
        });
    }
    (
        Some(Volume {
            shape: [n, n, n],
            data,
        }),
        sels,
        errors,
        notes,
    )
}

/// Percentile rule: v ↦ 2·(clip(v, p_lo, p_hi) − p_lo)/(p_hi − p_lo) − 1
/// with p_lo/p_hi the given percentiles of the volume (nearest-rank); a flat
/// volume becomes all −1.
pub fn scale_percentiles(data: &mut [f32], lo_pct: f32, hi_pct: f32) {
    if data.is_empty() {
        return;
    }
    let mut tmp: Vec<f32> = data
        .iter()
        .map(|v| if v.is_finite() { *v } else { 0.0 })
        .collect();
    let rank = |p: f32| {
        (((p.clamp(0.0, 100.0) / 100.0) * (tmp.len() - 1) as f32).round() as usize)
            .min(tmp.len() - 1)
    };
    let (rl, rh) = (rank(lo_pct), rank(hi_pct));
    let lo = *tmp.select_nth_unstable_by(rl, f32::total_cmp).1;
    let hi = *tmp.select_nth_unstable_by(rh, f32::total_cmp).1;
    let range = hi - lo;
    for v in data.iter_mut() {
        let x = if v.is_finite() { *v } else { lo };
        *v = if range > 0.0 {
            2.0 * ((x.clamp(lo, hi) - lo) / range) - 1.0
        } else {
            -1.0
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_map_to_unit_range() {
        let mut v: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        scale_percentiles(&mut v, 0.5, 99.5);
        assert_eq!(v[0], -1.0);
        assert_eq!(v[999], 1.0);
        assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)));
    }

    #[test]
    fn crop_stays_inside() {
        assert_eq!(
            square_crop((5.0, 5.0), 20.0, 100, 50),
            [0.0, 0.0, 20.0, 20.0]
        );
        assert_eq!(
            square_crop((99.0, 49.0), 20.0, 100, 50),
            [80.0, 30.0, 100.0, 50.0]
        );
        assert_eq!(
            square_crop((50.0, 25.0), 80.0, 100, 50),
            [25.0, 0.0, 75.0, 50.0]
        );
    }
}
