//! Result objects of the node: a TID 1500 Structured Report per target study, one
//! RGB Secondary Capture heatmap per model input image, a Grayscale Softcopy
//! Presentation State per source image (the ROI drawn on the radiologist's own
//! image) and a summary "report card" Secondary Capture per target study (see
//! `docs/report.md`).
//!
//! The entry point is [`build_outputs`]; it is pure (no I/O, no logging of PHI) and
//! deterministic: the same [`ReportInput`] always yields the same objects and UIDs.
//!
//! Submodules: [`sr`] (the SR document, PS3.3 §A.35.13 Comprehensive 3D SR IOD /
//! §A.35.2 Enhanced SR IOD, PS3.16 TID 1500), [`sc`] (PS3.3 §A.8.1 Secondary Capture
//! Image IOD), [`gsps`] (PS3.3 §A.33.1 Grayscale Softcopy Presentation State IOD),
//! [`summary`] (the report card, an SC), [`roi_groups`] (the SR's TID 1410 groups),
//! [`colormap`], [`font`], [`uid`], [`codes`] and the data set helpers in [`ds`].

mod kind;
pub use kind::{OutputKind, UnknownOutputKind};
pub mod codes;
pub mod colormap;
pub mod ds;
pub mod font;
pub mod gsps;
pub mod roi_groups;
pub mod sc;
pub mod sr;
pub mod summary;
pub mod uid;

use std::collections::BTreeMap;

use serde::Deserialize;
use time::OffsetDateTime;

/// Series Number of the SR series the node creates.
pub const SR_SERIES_NUMBER: u16 = 9901;
/// Series Number of the heatmap series the node creates.
pub const SC_SERIES_NUMBER: u16 = 9902;
/// Series Number of the summary ("report card") series.
pub const SUMMARY_SERIES_NUMBER: u16 = 9903;
/// Series Number of the presentation state series.
pub const GSPS_SERIES_NUMBER: u16 = 9904;
/// Series Description of the summary series.
pub const SUMMARY_SERIES_DESCRIPTION: &str = "HER2 MAP summary (research)";
/// Series Description of the presentation state series.
pub const GSPS_SERIES_DESCRIPTION: &str = "HER2 MAP region of interest (research)";
/// Series Description of the SR series.
pub const SR_SERIES_DESCRIPTION: &str = "HER2 MAP report (research)";
/// Series Description of an amended SR series.
pub const SR_SERIES_DESCRIPTION_AMENDED: &str = "HER2 MAP report (research, amended)";
/// Series Description of the heatmap series.
pub const SC_SERIES_DESCRIPTION: &str = "HER2 MAP heatmaps (research)";
/// Transfer syntax of every output (Explicit VR Little Endian).
pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
/// Comprehensive 3D SR Storage.
pub const COMPREHENSIVE_3D_SR: &str = "1.2.840.10008.5.1.4.1.1.88.34";
/// Enhanced SR Storage.
pub const ENHANCED_SR: &str = "1.2.840.10008.5.1.4.1.1.88.22";
/// Secondary Capture Image Storage.
pub const SECONDARY_CAPTURE: &str = "1.2.840.10008.5.1.4.1.1.7";
/// Grayscale Softcopy Presentation State Storage.
pub const GRAYSCALE_SOFTCOPY_PS: &str = "1.2.840.10008.5.1.4.1.1.11.1";

/// An output the `[report] outputs` setting can switch on or off.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OutputChoice {
    /// The TID 1500 SR.
    Sr,
    /// One heatmap SC per model input image.
    Heatmaps,
    /// One summary "report card" SC per target study.
    Summary,
    /// One GSPS per source image with the ROI outline.
    Gsps,
}

/// Which studies receive an SR.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StudyPolicy {
    /// One SR in every study that contributed an instance (default).
    #[default]
    Each,
    /// One SR, in the most recent contributing study (Study Date/Time, then UID).
    Latest,
}

/// SR Storage SOP Class of the report.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SrClass {
    /// Comprehensive 3D SR (default; the IOD TID 1500 is defined for).
    #[default]
    Comprehensive3d,
    /// Enhanced SR, for viewers or archives that do not accept Comprehensive 3D SR.
    /// The content tree is identical (it uses no SCOORD3D and no by-reference
    /// relationships).
    Enhanced,
}

/// The `[report]` settings.
#[derive(Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReportSettings {
    /// P(HER2-positive) at or above which the SR codes HER2 as Positive.
    pub threshold: f32,
    /// Which studies receive an SR.
    pub studies: StudyPolicy,
    /// Institution Name (0008,0080) of the outputs; empty = omitted.
    pub institution_name: String,
    /// Station Name and Device Observer Name.
    pub device_name: String,
    /// Manufacturer (0008,0070) and Device Observer Manufacturer.
    pub manufacturer: String,
    /// UID root for generated UIDs; `None` = `2.25.` UUID-derived UIDs.
    pub uid_root: Option<String>,
    /// SHA-256 (hex) of weights that are verified checkpoints.
    pub verified_weights_sha256: Vec<String>,
    /// SR Storage SOP Class.
    pub sr_class: SrClass,
    /// Which outputs are made (all four by default).
    pub outputs: Vec<OutputChoice>,
}

impl ReportSettings {
    /// Whether `choice` is among the outputs to make.
    pub fn makes(&self, choice: OutputChoice) -> bool {
        self.outputs.contains(&choice)
    }
}

impl Default for ReportSettings {
    fn default() -> Self {
        ReportSettings {
            threshold: 0.5,
            studies: StudyPolicy::Each,
            institution_name: String::new(),
            device_name: "HER2MAP".to_string(),
            manufacturer: "her2map".to_string(),
            uid_root: None,
            verified_weights_sha256: Vec::new(),
            sr_class: SrClass::Comprehensive3d,
            outputs: vec![
                OutputChoice::Sr,
                OutputChoice::Heatmaps,
                OutputChoice::Summary,
                OutputChoice::Gsps,
            ],
        }
    }
}

/// Patient and study attributes of a source study, copied into the outputs placed
/// in that study. Empty strings are written as zero-length (Type 2) elements;
/// malformed dates/times are written empty rather than invalid.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StudyAttributes {
    pub patient_name: String,
    pub patient_id: String,
    pub issuer_of_patient_id: Option<String>,
    pub patient_birth_date: String,
    pub patient_sex: String,
    pub study_date: String,
    pub study_time: String,
    pub accession_number: String,
    pub referring_physician_name: String,
    pub study_id: String,
    pub study_description: Option<String>,
}

/// One instance the model used.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceInstance {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    /// Modality (0008,0060) of the source: "MG", "US", "MR".
    pub modality: String,
    /// "L" / "R" when known.
    pub laterality: Option<String>,
    /// "CC" / "MLO" for mammography.
    pub view: Option<String>,
    /// 1-based frame number for multi-frame sources.
    pub frame: Option<u32>,
    pub study: StudyAttributes,
}

/// Per-branch probabilities of HER2-positive.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BranchScores {
    pub us: Option<f32>,
    pub mri: Option<f32>,
    pub mg: Option<f32>,
}

/// What the model said.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelResult {
    pub model_name: String,
    pub model_version: String,
    pub weights_sha256: String,
    /// The device the model ran on and its name ("cuda:0 (NVIDIA H200)",
    /// "cpu (AMD EPYC 7B13)"); empty when unknown.
    pub device: String,
    /// Demo (non-clinical) weights.
    pub demo: bool,
    /// Fused P(HER2-positive).
    pub prob: f32,
    pub branch_probs: BranchScores,
    pub modalities_used: Vec<String>,
    pub modalities_missing: Vec<String>,
    /// (modality, ROI provider) pairs.
    pub roi_methods: Vec<(String, String)>,
    /// "L" | "R" | None (unknown).
    pub lesion_side: Option<String>,
    /// Free-text notes, each written as a Comment in the SR.
    pub notes: Vec<String>,
}

/// The region of interest the model used on one source image (frame), in that
/// image's pixel space: (column, row) with the top-left corner of the top-left
/// pixel at (0, 0), as SCOORD (PS3.3 §C.18.6.1) and GSPS PIXEL units
/// (§C.10.5.1.2) read them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Roi {
    /// Closed polygon (the first point is not repeated), at least 3 points.
    pub points: Vec<(f32, f32)>,
    /// Rows and Columns of the source image.
    pub image_rows: u32,
    pub image_cols: u32,
    /// The ROI provider that placed it ("us-region", "mg-blob", ...).
    pub method: String,
    /// The source's first VOI window (centre, width), for the presentation state.
    pub window: Option<(f64, f64)>,
    /// The source is MONOCHROME1 (the presentation state then inverts).
    pub monochrome1: bool,
}

impl Roi {
    /// An axis-aligned rectangle (x0, y0, x1, y1) as a 4-point polygon.
    pub fn rectangle(x0: f32, y0: f32, x1: f32, y1: f32) -> Vec<(f32, f32)> {
        vec![(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    }
}

/// One CAM heatmap, already on the grid of `base`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Heatmap {
    pub source: SourceInstance,
    /// Grayscale, windowed as the model input saw it, `rows * cols`.
    pub base: Vec<u8>,
    /// Class-1 CAM, `rows * cols`, >= 0.
    pub cam: Vec<f32>,
    pub rows: u32,
    pub cols: u32,
    /// e.g. "MG L CC" or "MR slice 42".
    pub label: String,
    /// The ROI the model used on the source image, when known: drawn in the SR
    /// (SCOORD) and the presentation state.
    pub roi: Option<Roi>,
}

/// An earlier output this result amends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PriorOutput {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub series_instance_uid: String,
    pub study_instance_uid: String,
}

/// Everything [`build_outputs`] needs.
#[derive(Clone, Debug)]
pub struct ReportInput<'a> {
    /// Internal case identifier (never written into the objects; it seeds the UIDs).
    pub case_id: &'a str,
    pub result: &'a ModelResult,
    pub evidence: &'a [SourceInstance],
    pub heatmaps: &'a [Heatmap],
    /// Earlier SRs this one amends (empty for a first result).
    pub predecessors: &'a [PriorOutput],
    pub settings: &'a ReportSettings,
    pub now: OffsetDateTime,
}

/// One DICOM object to send.
#[derive(Clone, Debug)]
pub struct OutputObject {
    pub kind: OutputKind,
    pub study_instance_uid: String,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub object: dicom_object::DefaultDicomObject,
}

/// Why outputs could not be built. Messages carry no PHI (UIDs and counts only).
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("invalid report input: {0}")]
    InvalidInput(String),
    #[error("invalid UID root: {0}")]
    InvalidUidRoot(String),
    #[error("no evidence instances: a report needs at least one source instance")]
    NoEvidence,
    #[error("could not build DICOM object: {0}")]
    Dicom(String),
}

/// How the weights are qualified on every output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightsStatus {
    Verified,
    Demo,
    Unverified,
}

impl WeightsStatus {
    /// The legend / SR wording, `None` for verified weights.
    pub fn banner(self) -> Option<&'static str> {
        match self {
            WeightsStatus::Verified => None,
            WeightsStatus::Demo => Some("DEMO WEIGHTS"),
            WeightsStatus::Unverified => Some("UNVERIFIED WEIGHTS"),
        }
    }
}

/// Demo when `result.demo`; otherwise verified only if the SHA-256 is configured
/// (case-insensitive hex comparison).
pub fn weights_status(result: &ModelResult, settings: &ReportSettings) -> WeightsStatus {
    if result.demo {
        return WeightsStatus::Demo;
    }
    let sha = result.weights_sha256.trim().to_ascii_lowercase();
    if !sha.is_empty()
        && settings
            .verified_weights_sha256
            .iter()
            .any(|v| v.trim().to_ascii_lowercase() == sha)
    {
        WeightsStatus::Verified
    } else {
        WeightsStatus::Unverified
    }
}

/// Shared, validated view of the input used by the SR and SC builders.
pub(crate) struct Prepared<'a> {
    pub input: &'a ReportInput<'a>,
    /// Evidence ∪ heatmap sources, deduplicated by (SOP Instance UID, frame).
    pub instances: Vec<&'a SourceInstance>,
    /// Revision key of this result (see `docs/report.md`).
    pub revision: String,
    pub weights: WeightsStatus,
    /// Study attributes per study UID (first instance of each study wins).
    pub studies: BTreeMap<&'a str, &'a StudyAttributes>,
}

impl<'a> Prepared<'a> {
    pub fn uid(&self, kind: &str, study: &str, index: usize) -> Result<String, ReportError> {
        uid::derive_uid(
            self.input.settings.uid_root.as_deref(),
            &[
                self.input.case_id,
                &self.revision,
                kind,
                study,
                &index.to_string(),
            ],
        )
    }

    /// Whether this result amends earlier ones.
    pub fn amended(&self) -> bool {
        !self.input.predecessors.is_empty()
    }
}

fn check_uid(what: &str, v: &str) -> Result<(), ReportError> {
    // Strict: no padding or whitespace, so UIDs compare equal wherever they are used.
    if uid::is_valid_uid(v) {
        Ok(())
    } else {
        Err(ReportError::InvalidInput(format!(
            "{what} is not a valid UID"
        )))
    }
}

fn check_prob(what: &str, p: f32) -> Result<(), ReportError> {
    if p.is_finite() && (0.0..=1.0).contains(&p) {
        Ok(())
    } else {
        Err(ReportError::InvalidInput(format!(
            "{what} must be a probability in [0, 1]"
        )))
    }
}

fn check_instance(what: &str, s: &SourceInstance) -> Result<(), ReportError> {
    check_uid(&format!("{what} SOP Class UID"), &s.sop_class_uid)?;
    check_uid(&format!("{what} SOP Instance UID"), &s.sop_instance_uid)?;
    check_uid(&format!("{what} Study Instance UID"), &s.study_instance_uid)?;
    check_uid(
        &format!("{what} Series Instance UID"),
        &s.series_instance_uid,
    )?;
    if s.frame == Some(0) {
        return Err(ReportError::InvalidInput(format!(
            "{what} frame numbers are 1-based"
        )));
    }
    Ok(())
}

fn prepare<'a>(input: &'a ReportInput<'a>) -> Result<Prepared<'a>, ReportError> {
    validate(input)?;
    let instances = instances_used(input);
    if instances.is_empty() {
        return Err(ReportError::NoEvidence);
    }
    let mut studies = BTreeMap::new();
    for i in &instances {
        studies
            .entry(i.study_instance_uid.as_str())
            .or_insert(&i.study);
    }
    Ok(Prepared {
        revision: revision_key(input, &instances),
        input,
        instances,
        weights: weights_status(input.result, input.settings),
        studies,
    })
}

/// Reject settings, probabilities, UIDs and heatmap shapes the objects could
/// not carry.
fn validate(input: &ReportInput) -> Result<(), ReportError> {
    let s = input.settings;
    if let Some(root) = &s.uid_root {
        uid::validate_root(root)?;
    }
    if !(s.threshold.is_finite() && s.threshold > 0.0 && s.threshold <= 1.0) {
        return Err(ReportError::InvalidInput(
            "threshold must be in (0, 1]".into(),
        ));
    }
    let r = input.result;
    check_prob("prob", r.prob)?;
    for (name, p) in [
        ("us", r.branch_probs.us),
        ("mri", r.branch_probs.mri),
        ("mg", r.branch_probs.mg),
    ] {
        if let Some(p) = p {
            check_prob(&format!("branch probability {name}"), p)?;
        }
    }
    for (i, e) in input.evidence.iter().enumerate() {
        check_instance(&format!("evidence[{i}]"), e)?;
    }
    for (i, h) in input.heatmaps.iter().enumerate() {
        check_heatmap(i, h)?;
    }
    for (i, p) in input.predecessors.iter().enumerate() {
        check_uid(&format!("predecessor[{i}] SOP Class UID"), &p.sop_class_uid)?;
        check_uid(
            &format!("predecessor[{i}] SOP Instance UID"),
            &p.sop_instance_uid,
        )?;
        check_uid(
            &format!("predecessor[{i}] Series Instance UID"),
            &p.series_instance_uid,
        )?;
        check_uid(
            &format!("predecessor[{i}] Study Instance UID"),
            &p.study_instance_uid,
        )?;
    }
    Ok(())
}

fn check_heatmap(i: usize, h: &Heatmap) -> Result<(), ReportError> {
    check_instance(&format!("heatmap[{i}] source"), &h.source)?;
    let n = (h.rows as usize).saturating_mul(h.cols as usize);
    if h.rows == 0 || h.cols == 0 || h.rows > sc::MAX_IMAGE_ROWS || h.cols > u16::MAX as u32 {
        return Err(ReportError::InvalidInput(format!(
            "heatmap[{i}] has unsupported size {}x{}",
            h.rows, h.cols
        )));
    }
    if h.base.len() != n || h.cam.len() != n {
        return Err(ReportError::InvalidInput(format!(
            "heatmap[{i}]: base ({}) and cam ({}) must both have rows*cols = {n} values",
            h.base.len(),
            h.cam.len()
        )));
    }
    if let Some(roi) = &h.roi {
        let finite = roi
            .points
            .iter()
            .all(|(x, y)| x.is_finite() && y.is_finite());
        if roi.points.len() < 3
            || !finite
            || roi.image_rows == 0
            || roi.image_cols == 0
            || roi.image_rows > u16::MAX as u32
            || roi.image_cols > u16::MAX as u32
        {
            return Err(ReportError::InvalidInput(format!(
                "heatmap[{i}]: the ROI needs 3+ finite points on a non-empty image"
            )));
        }
    }
    Ok(())
}

/// Evidence ∪ heatmap sources, deduplicated by (SOP Instance UID, frame), in
/// input order.
fn instances_used<'a>(input: &'a ReportInput<'a>) -> Vec<&'a SourceInstance> {
    let mut instances: Vec<&SourceInstance> = Vec::new();
    for inst in input
        .evidence
        .iter()
        .chain(input.heatmaps.iter().map(|h| &h.source))
    {
        if !instances
            .iter()
            .any(|i| i.sop_instance_uid == inst.sop_instance_uid && i.frame == inst.frame)
        {
            instances.push(inst);
        }
    }
    instances
}

/// Revision key: what makes this result differ from another result of the case.
fn revision_key(input: &ReportInput, instances: &[&SourceInstance]) -> String {
    let (r, s) = (input.result, input.settings);
    let mut ev: Vec<String> = instances
        .iter()
        .map(|i| format!("{}#{}", i.sop_instance_uid, i.frame.unwrap_or(0)))
        .collect();
    ev.sort();
    ev.dedup();
    let mut pred: Vec<&str> = input
        .predecessors
        .iter()
        .map(|p| p.sop_instance_uid.as_str())
        .collect();
    pred.sort();
    pred.dedup();
    let threshold = format!("{:.4}", s.threshold);
    let demo = r.demo.to_string();
    let evs = ev.join(",");
    let preds = pred.join(",");
    format!(
        "rev-{}",
        uid::short_digest(&[
            &r.model_name,
            &r.model_version,
            &r.weights_sha256.to_ascii_lowercase(),
            &demo,
            &threshold,
            &evs,
            &preds
        ])
    )
}

/// Build every output object of one result that `[report] outputs` asks for: the
/// SR(s) first, then one heatmap SC per entry of `input.heatmaps`, the summary
/// card(s), then one presentation state per heatmap source with an ROI.
pub fn build_outputs(input: &ReportInput) -> Result<Vec<OutputObject>, ReportError> {
    let prep = prepare(input)?;
    let s = input.settings;
    let mut out = Vec::new();
    if s.makes(OutputChoice::Sr) {
        out.extend(sr::build_srs(&prep)?);
    }
    if s.makes(OutputChoice::Heatmaps) {
        out.extend(sc::build_heatmaps(&prep)?);
    }
    if s.makes(OutputChoice::Summary) {
        out.extend(summary::build_summaries(&prep)?);
    }
    if s.makes(OutputChoice::Gsps) {
        out.extend(gsps::build_presentation_states(&prep)?);
    }
    Ok(out)
}

/// SOP Instance UID of heatmap `i` (numbered within its study, as
/// [`sc::build_heatmaps`] numbers them), for the SR's references to it.
pub(crate) fn heatmap_uid(prep: &Prepared, i: usize) -> Result<String, ReportError> {
    let heatmaps = prep.input.heatmaps;
    let study = heatmaps[i].source.study_instance_uid.trim();
    let index = heatmaps[..i]
        .iter()
        .filter(|x| x.source.study_instance_uid.trim() == study)
        .count();
    prep.uid("sc", study, index)
}

/// Format a DICOM DA/TM pair from `now` (in its own offset).
pub(crate) fn da_tm(now: OffsetDateTime) -> (String, String, String) {
    let d = format!(
        "{:04}{:02}{:02}",
        now.year(),
        u8::from(now.month()),
        now.day()
    );
    let t = format!("{:02}{:02}{:02}", now.hour(), now.minute(), now.second());
    let off = now.offset();
    let total = off.whole_minutes();
    let sign = if total < 0 { '-' } else { '+' };
    let tz = format!(
        "{sign}{:02}{:02}",
        total.unsigned_abs() / 60,
        total.unsigned_abs() % 60
    );
    (d, t, tz)
}

/// Wrap a data set into a file object with Explicit VR LE meta.
pub(crate) fn finish(obj: ds::Obj) -> Result<dicom_object::DefaultDicomObject, ReportError> {
    let class_uid = uid::derive_uid(None, &["her2map", "implementation-class-uid"])?;
    obj.with_meta(
        dicom_object::meta::FileMetaTableBuilder::new()
            .transfer_syntax(EXPLICIT_VR_LE)
            .implementation_class_uid(class_uid)
            .implementation_version_name(concat!("HER2MAP_", env!("CARGO_PKG_VERSION"))),
    )
    .map_err(|e| ReportError::Dicom(e.to_string()))
}

/// Patient (PS3.3 §C.7.1.1) and General Study (§C.7.2.1) modules, copied from the
/// source study.
pub(crate) fn put_patient_study(obj: &mut ds::Obj, study_uid: &str, a: &StudyAttributes) {
    use dicom_core::VR;
    use dicom_dictionary_std::tags;
    ds::put_str(obj, tags::PATIENT_NAME, VR::PN, &a.patient_name);
    ds::put_str(obj, tags::PATIENT_ID, VR::LO, &a.patient_id);
    if let Some(issuer) = a
        .issuer_of_patient_id
        .as_deref()
        .filter(|s| !s.trim().is_empty())
    {
        ds::put_str(obj, tags::ISSUER_OF_PATIENT_ID, VR::LO, issuer);
    }
    ds::put_date(obj, tags::PATIENT_BIRTH_DATE, &a.patient_birth_date);
    let sex = a.patient_sex.trim().to_ascii_uppercase();
    ds::put_str(
        obj,
        tags::PATIENT_SEX,
        VR::CS,
        if matches!(sex.as_str(), "M" | "F" | "O") {
            &sex
        } else {
            ""
        },
    );
    ds::put_str(obj, tags::STUDY_INSTANCE_UID, VR::UI, study_uid);
    ds::put_date(obj, tags::STUDY_DATE, &a.study_date);
    ds::put_time(obj, tags::STUDY_TIME, &a.study_time);
    ds::put_str(
        obj,
        tags::REFERRING_PHYSICIAN_NAME,
        VR::PN,
        &a.referring_physician_name,
    );
    ds::put_str(obj, tags::STUDY_ID, VR::SH, &a.study_id);
    ds::put_str(obj, tags::ACCESSION_NUMBER, VR::SH, &a.accession_number);
    if let Some(d) = a
        .study_description
        .as_deref()
        .filter(|s| !s.trim().is_empty())
    {
        ds::put_str(obj, tags::STUDY_DESCRIPTION, VR::LO, d);
    }
}

/// The series attributes both output kinds share: General Series
/// (PS3.3 §C.7.3.1) for the heatmaps, SR Document Series (§C.17.1) for the SR.
pub(crate) fn put_series(
    obj: &mut ds::Obj,
    modality: &str,
    series_uid: &str,
    number: u16,
    date: &str,
    time: &str,
    description: &str,
) {
    use dicom_core::VR;
    use dicom_dictionary_std::tags;
    ds::put_str(obj, tags::MODALITY, VR::CS, modality);
    ds::put_str(obj, tags::SERIES_INSTANCE_UID, VR::UI, series_uid);
    ds::put_str(obj, tags::SERIES_NUMBER, VR::IS, &number.to_string());
    ds::put_str(obj, tags::SERIES_DATE, VR::DA, date);
    ds::put_str(obj, tags::SERIES_TIME, VR::TM, time);
    ds::put_str(obj, tags::SERIES_DESCRIPTION, VR::LO, description);
}

/// General Equipment module (PS3.3 §C.7.5.1): the node as the equipment.
pub(crate) fn put_equipment(obj: &mut ds::Obj, settings: &ReportSettings, result: &ModelResult) {
    use dicom_core::VR;
    use dicom_dictionary_std::tags;
    ds::put_str(obj, tags::MANUFACTURER, VR::LO, &settings.manufacturer);
    if !settings.institution_name.trim().is_empty() {
        ds::put_str(
            obj,
            tags::INSTITUTION_NAME,
            VR::LO,
            &settings.institution_name,
        );
    }
    if !settings.device_name.trim().is_empty() {
        ds::put_str(obj, tags::STATION_NAME, VR::SH, &settings.device_name);
    }
    ds::put_str(
        obj,
        tags::MANUFACTURER_MODEL_NAME,
        VR::LO,
        &model_label(result),
    );
    let node = format!("her2map {}", env!("CARGO_PKG_VERSION"));
    let model = format!(
        "{} {}",
        result.model_name.trim(),
        result.model_version.trim()
    );
    ds::put_strs(obj, tags::SOFTWARE_VERSIONS, VR::LO, &[&node, model.trim()]);
}

/// A probability as the images print it, in percent like the SR's NUMs
/// ("73.0 %"): one unit wherever the radiologist reads the result.
pub(crate) fn percent(p: f32) -> String {
    format!("{:.1} %", p * 100.0)
}

/// "HER2 MAP 1.0" style label of the model (name + version).
pub(crate) fn model_label(result: &ModelResult) -> String {
    let name = if result.model_name.trim().is_empty() {
        "HER2 MAP"
    } else {
        result.model_name.trim()
    };
    format!("{name} {}", result.model_version.trim())
        .trim()
        .to_string()
}

/// SOP Common module (PS3.3 §C.12.1) basics; Specific Character Set is set by
/// [`set_charset`] once the data set is complete.
pub(crate) fn put_sop_common(obj: &mut ds::Obj, class: &str, inst: &str, now: OffsetDateTime) {
    use dicom_core::VR;
    use dicom_dictionary_std::tags;
    let (d, t, tz) = da_tm(now);
    ds::put_str(obj, tags::SOP_CLASS_UID, VR::UI, class);
    ds::put_str(obj, tags::SOP_INSTANCE_UID, VR::UI, inst);
    ds::put_str(obj, tags::INSTANCE_CREATION_DATE, VR::DA, &d);
    ds::put_str(obj, tags::INSTANCE_CREATION_TIME, VR::TM, &t);
    ds::put_str(obj, tags::TIMEZONE_OFFSET_FROM_UTC, VR::SH, &tz);
}

/// Declare ISO_IR 192 (UTF-8) when any text is not ASCII.
pub(crate) fn set_charset(obj: &mut ds::Obj) {
    use dicom_core::VR;
    use dicom_dictionary_std::tags;
    if ds::needs_utf8(obj) {
        ds::put_str(obj, tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192");
    }
}
