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
mod mg;
mod mri;
mod palette;
pub mod resize;
pub mod roi;
pub mod select;
mod us;

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dicom_object::OpenFileOptions;
use rayon::prelude::*;
use serde::Deserialize;

pub use crate::modality::{Modality, ModalitySet};
pub use crate::side::{LesionSide, SideBasis, SideSetting};
pub use clinical::ClinicalSource;
pub use decode::{DecodeError, GrayImage, VoiWindowChoice};
pub use roi::{PatientBox, PixelBox, RoiProvider};
pub use select::{InstanceMeta, Laterality, MgView, read_instance_meta};

use mri::MrDecodeCache;
use roi::DicomAnnotationRoi;
use select::Kind;

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
pub(super) fn shared_base(img: &GrayImage, s: &ImagingSettings) -> Option<Arc<HeatmapBase>> {
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

impl Selection {
    /// The selection of one frame of a 2-D image: `crop` of frame `frame`
    /// of `img` (as decoded from `m`) resized to the input plane.
    pub(super) fn planar(
        modality: Modality,
        role: String,
        m: &InstanceMeta,
        img: &GrayImage,
        (frame, crop): (u32, [f64; 4]),
        roi_provider: &str,
        heatmap_base: Option<Arc<HeatmapBase>>,
    ) -> Selection {
        Selection {
            modality,
            role,
            study_instance_uid: m.study_uid.clone(),
            series_instance_uid: m.series_uid.clone(),
            sop_instance_uids: vec![m.sop_instance.clone()],
            geometry: SourceGeometry::Planar {
                cols: img.width,
                rows: img.height,
                frame,
                crop,
            },
            roi_provider: roi_provider.into(),
            heatmap_base,
        }
    }
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

pub(super) fn open_full(path: &Path) -> Result<dicom_object::DefaultDicomObject, String> {
    catch_unwind(AssertUnwindSafe(|| OpenFileOptions::new().open_file(path)))
        .map_err(|_| "reader panicked".to_string())?
        .map_err(|e| format!("cannot read DICOM file: {e}"))
}

pub(super) fn inst_err(m: &InstanceMeta, msg: impl Into<String>) -> InstanceError {
    InstanceError {
        file: m.path.clone(),
        sop_instance_uid: Some(m.sop_instance.clone()),
        message: msg.into(),
    }
}

/// Decode one frame to display grayscale, catching panics.
pub(super) fn load_gray(
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
            mri::prepare_mri(&index.metas, settings, grid, side, ann, mr_cache)
        },
        || {
            rayon::join(
                || mg::prepare_mg(&index.metas, settings, grid, side, annotations.as_ref()),
                || us::prepare_us(&index.metas, settings, grid, side),
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

pub(super) type Part<T> = (Option<T>, Vec<Selection>, Vec<InstanceError>, Vec<String>);

pub(super) fn clamp01(mut v: Vec<f32>) -> Vec<f32> {
    for x in v.iter_mut() {
        *x = if x.is_finite() {
            x.clamp(0.0, 1.0)
        } else {
            0.0
        };
    }
    v
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
}
