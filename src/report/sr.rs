//! The Structured Report: PS3.16 TID 1500 "Measurement Report" in a Comprehensive 3D
//! SR (PS3.3 §A.35.13) or, when configured, an Enhanced SR (§A.35.2) document.
//!
//! Content tree (relationship, value type, concept):
//!
//! ```text
//! CONTAINER (126000, DCM, "Imaging Measurement Report")          TID 1500, root
//!  HAS CONCEPT MOD CODE (121049, DCM, "Language of Content Item and Descendants")
//!  HAS OBS CONTEXT  CODE (121005, DCM, "Observer Type") = (121007, DCM, "Device")  TID 1002
//!  HAS OBS CONTEXT  UIDREF/TEXT 121012..121015 device observer                      TID 1004
//!  HAS CONCEPT MOD CODE (121058, DCM, "Procedure reported") 1-n
//!  CONTAINS CONTAINER (111028, DCM, "Image Library")                              TID 1600
//!   CONTAINS CONTAINER (126200, DCM, "Image Library Group") per source series
//!    HAS ACQ CONTEXT CODE Modality, DATE Study Date                               TID 1602
//!    CONTAINS IMAGE (each instance used) + HAS ACQ CONTEXT Image Laterality / Image View
//!  CONTAINS CONTAINER (126010, DCM, "Imaging Measurements")
//!   CONTAINS CONTAINER (125007, DCM, "Measurement Group") per source image    TID 1410
//!    the index lesion on that image (see `roi_groups`; own study's images first):
//!    HAS OBS CONTEXT TEXT Tracking Identifier, UIDREF Tracking Unique Identifier
//!    CONTAINS CODE Finding = (254837009, SCT, "Malignant neoplasm of breast")
//!    HAS CONCEPT MOD CODE Finding Site = Breast (+ HAS CONCEPT MOD Laterality)
//!    HAS CONCEPT MOD TEXT Algorithm Name / Version / Parameters                   TID 4019
//!    CONTAINS SCOORD Image Region, SELECTED FROM the source image
//!    CONTAINS NUM P(HER2-positive) in percent, unit (%, UCUM, "percent")         TID 300
//!    CONTAINS NUM per-branch probabilities
//!    CONTAINS CODE (48676-1, LN, "HER2 [Interpretation] in Tissue") = Positive | Negative
//!    CONTAINS CODE modality used / missing, TEXT ROI method per modality
//!    CONTAINS IMAGE Illustration of ROI = the heatmap SC
//!   or, when no source image has an ROI, one TID 1501 group with the same
//!   items but the SCOORD and the illustration
//!  CONTAINS CONTAINER (C0034375, UMLS, "Qualitative Evaluations")
//!   CONTAINS TEXT (121106, DCM, "Comment") research-use disclaimer, weights status,
//!                 amendment notice, model notes
//! ```

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;

use super::codes::{self, Code};
use super::ds::{self, InstanceRef, Obj};
use super::{
    COMPREHENSIVE_3D_SR, ENHANCED_SR, ModelResult, OutputKind, OutputObject, Prepared, ReportError,
    ReportSettings, SR_SERIES_DESCRIPTION, SR_SERIES_DESCRIPTION_AMENDED, SR_SERIES_NUMBER,
    SourceInstance, SrClass, StudyPolicy, WeightsStatus,
};

/// Relationship types (PS3.3 §C.17.3.2.4).
pub(crate) const CONTAINS: &str = "CONTAINS";
pub(crate) const HAS_OBS_CONTEXT: &str = "HAS OBS CONTEXT";
pub(crate) const HAS_CONCEPT_MOD: &str = "HAS CONCEPT MOD";
const HAS_ACQ_CONTEXT: &str = "HAS ACQ CONTEXT";
pub(crate) const SELECTED_FROM: &str = "SELECTED FROM";

/// Value of a content item.
#[derive(Clone, Debug)]
pub(crate) enum Value {
    Container,
    Text(String),
    Code(Code),
    Num(f64, Code),
    UidRef(String),
    Image {
        class: String,
        inst: String,
        frame: Option<u32>,
    },
    Date(String),
    /// Spatial coordinates in image pixels (PS3.3 §C.18.6): Graphic Type and
    /// (column, row) pairs.
    Scoord {
        graphic_type: &'static str,
        data: Vec<f32>,
    },
}

/// A content item and its children (by-value relationships only).
#[derive(Clone, Debug)]
pub(crate) struct Item {
    pub(crate) rel: &'static str,
    pub(crate) name: Option<Code>,
    pub(crate) value: Value,
    pub(crate) children: Vec<Item>,
}

impl Item {
    pub(crate) fn new(rel: &'static str, name: Option<Code>, value: Value) -> Self {
        Item {
            rel,
            name,
            value,
            children: Vec::new(),
        }
    }
    pub(crate) fn container(rel: &'static str, name: Code) -> Self {
        Item::new(rel, Some(name), Value::Container)
    }
    pub(crate) fn text(rel: &'static str, name: Code, t: impl Into<String>) -> Self {
        Item::new(rel, Some(name), Value::Text(t.into()))
    }
    pub(crate) fn code(rel: &'static str, name: Code, v: Code) -> Self {
        Item::new(rel, Some(name), Value::Code(v))
    }
    /// A probability (0..=1) as a NUM in percent (see `codes::UCUM_PERCENT`).
    pub(crate) fn percent(name: Code, probability: f64) -> Self {
        Item::new(
            CONTAINS,
            Some(name),
            Value::Num(probability * 100.0, codes::UCUM_PERCENT),
        )
    }
    pub(crate) fn with(mut self, child: Item) -> Self {
        self.children.push(child);
        self
    }

    /// Write the item's own attributes (not the relationship) into `o`.
    fn write_value(&self, o: &mut Obj) {
        let vt = match &self.value {
            Value::Container => "CONTAINER",
            Value::Text(_) => "TEXT",
            Value::Code(_) => "CODE",
            Value::Num(..) => "NUM",
            Value::UidRef(_) => "UIDREF",
            Value::Image { .. } => "IMAGE",
            Value::Date(_) => "DATE",
            Value::Scoord { .. } => "SCOORD",
        };
        ds::put_str(o, tags::VALUE_TYPE, VR::CS, vt);
        if let Some(name) = &self.name {
            ds::put_code_seq(o, tags::CONCEPT_NAME_CODE_SEQUENCE, name);
        }
        match &self.value {
            Value::Container => ds::put_str(o, tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE"),
            Value::Text(t) => ds::put_str(o, tags::TEXT_VALUE, VR::UT, t),
            Value::Code(c) => ds::put_code_seq(o, tags::CONCEPT_CODE_SEQUENCE, c),
            Value::Num(v, unit) => {
                let mut mv = Obj::new_empty();
                ds::put_code_seq(&mut mv, tags::MEASUREMENT_UNITS_CODE_SEQUENCE, unit);
                ds::put_str(&mut mv, tags::NUMERIC_VALUE, VR::DS, &format_ds(*v));
                ds::put_seq(o, tags::MEASURED_VALUE_SEQUENCE, vec![mv]);
            }
            Value::UidRef(u) => ds::put_str(o, tags::UID, VR::UI, u),
            Value::Image { class, inst, frame } => {
                let mut r = Obj::new_empty();
                ds::put_str(&mut r, tags::REFERENCED_SOP_CLASS_UID, VR::UI, class);
                ds::put_str(&mut r, tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, inst);
                if let Some(f) = frame {
                    ds::put_str(
                        &mut r,
                        tags::REFERENCED_FRAME_NUMBER,
                        VR::IS,
                        &f.to_string(),
                    );
                }
                ds::put_seq(o, tags::REFERENCED_SOP_SEQUENCE, vec![r]);
            }
            Value::Date(d) => ds::put_str(o, tags::DATE, VR::DA, d),
            Value::Scoord { graphic_type, data } => {
                ds::put_str(o, tags::GRAPHIC_TYPE, VR::CS, graphic_type);
                o.put(DataElement::new(
                    tags::GRAPHIC_DATA,
                    VR::FL,
                    PrimitiveValue::F32(data.clone().into()),
                ));
            }
        }
        if !self.children.is_empty() {
            let items = self.children.iter().map(Item::to_child_obj).collect();
            ds::put_seq(o, tags::CONTENT_SEQUENCE, items);
        }
    }

    fn to_child_obj(&self) -> Obj {
        let mut o = Obj::new_empty();
        ds::put_str(&mut o, tags::RELATIONSHIP_TYPE, VR::CS, self.rel);
        self.write_value(&mut o);
        o
    }
}

/// DS value of at most 16 characters.
/// A NUM value as DS: four decimals (the model's probabilities are f32, so
/// a percentage has about five significant digits; more would print the
/// f32 → f64 noise, "73.000002").
fn format_ds(v: f64) -> String {
    let v = if v.is_finite() { v } else { 0.0 };
    let s = format!("{v:.4}");
    if s.len() <= 16 { s } else { format!("{v:.6e}") }
}

/// Studies that receive an SR, per policy, in a stable order.
pub(crate) fn target_studies<'a>(prep: &Prepared<'a>) -> Vec<&'a str> {
    let all: Vec<&str> = prep.studies.keys().copied().collect();
    match prep.input.settings.studies {
        StudyPolicy::Each => all,
        StudyPolicy::Latest => {
            let key = |uid: &&&str| {
                let a = prep.studies[**uid];
                let d = if ds::is_da(&a.study_date) {
                    a.study_date.trim().to_string()
                } else {
                    String::new()
                };
                let t = if ds::is_tm(&a.study_time) {
                    format!("{:0<13}", a.study_time.trim())
                } else {
                    String::new()
                };
                (d, t, uid.to_string())
            };
            all.iter()
                .max_by_key(key)
                .map(|s| vec![*s])
                .unwrap_or_default()
        }
    }
}

/// Build the content tree (root item with its children), TID 1500 in the
/// order of its rows.
fn content_tree(prep: &Prepared, study: &str) -> Result<Item, ReportError> {
    let mut root = Item::container("", codes::IMAGING_MEASUREMENT_REPORT);
    root.children.push(Item::code(
        HAS_CONCEPT_MOD,
        codes::LANGUAGE_OF_CONTENT,
        codes::ENGLISH_US,
    ));
    root.children.extend(observer_context(prep)?);
    root.children.extend(procedures_reported(prep));
    root.children.push(image_library(prep));
    // The index lesion on each source image (TID 1410, with its region);
    // without any region, one TID 1501 group. Never both: OHIF fails on an
    // SR whose Imaging Measurements mix groups without SCOORD with others
    // (see `roi_groups`).
    let mut measurements = Item::container(CONTAINS, codes::IMAGING_MEASUREMENTS);
    measurements.children = super::roi_groups::roi_groups(prep, study)?;
    if measurements.children.is_empty() {
        measurements.children.push(measurement_group(prep)?);
    }
    root.children.push(measurements);
    root.children.push(qualitative_evaluations(prep));
    Ok(root)
}

/// TID 1001/1002/1004: the node is the (device) observer.
fn observer_context(prep: &Prepared) -> Result<Vec<Item>, ReportError> {
    let s = prep.input.settings;
    let device_uid =
        super::uid::derive_uid(s.uid_root.as_deref(), &["device-observer", &s.device_name])?;
    let mut items = vec![
        Item::code(HAS_OBS_CONTEXT, codes::OBSERVER_TYPE, codes::DEVICE),
        Item::new(
            HAS_OBS_CONTEXT,
            Some(codes::DEVICE_OBSERVER_UID),
            Value::UidRef(device_uid),
        ),
    ];
    if !s.device_name.trim().is_empty() {
        items.push(Item::text(
            HAS_OBS_CONTEXT,
            codes::DEVICE_OBSERVER_NAME,
            s.device_name.trim(),
        ));
    }
    if !s.manufacturer.trim().is_empty() {
        items.push(Item::text(
            HAS_OBS_CONTEXT,
            codes::DEVICE_OBSERVER_MANUFACTURER,
            s.manufacturer.trim(),
        ));
    }
    items.push(Item::text(
        HAS_OBS_CONTEXT,
        codes::DEVICE_OBSERVER_MODEL_NAME,
        super::model_label(prep.input.result),
    ));
    Ok(items)
}

/// Procedure reported: one per modality of the instances used.
fn procedures_reported(prep: &Prepared) -> Vec<Item> {
    let mut procs: Vec<Code> = Vec::new();
    for i in &prep.instances {
        let c = codes::procedure_code(&i.modality);
        if !procs.contains(&c) {
            procs.push(c);
        }
    }
    procs
        .into_iter()
        .map(|c| Item::code(HAS_CONCEPT_MOD, codes::PROCEDURE_REPORTED, c))
        .collect()
}

/// TID 1600 Image Library: one group per source series (TID 1602 context:
/// modality, study date), each instance used with its laterality and view.
fn image_library(prep: &Prepared) -> Item {
    let mut library = Item::container(CONTAINS, codes::IMAGE_LIBRARY);
    let mut groups: Vec<(&str, &str, Item)> = Vec::new();
    for inst in &prep.instances {
        let idx = match groups.iter().position(|(st, se, _)| {
            *st == inst.study_instance_uid && *se == inst.series_instance_uid
        }) {
            Some(i) => i,
            None => {
                groups.push((
                    &inst.study_instance_uid,
                    &inst.series_instance_uid,
                    library_group(inst),
                ));
                groups.len() - 1
            }
        };
        groups[idx].2.children.push(library_image(inst));
    }
    library
        .children
        .extend(groups.into_iter().map(|(_, _, g)| g));
    library
}

/// An Image Library Group with the acquisition context of `inst`'s series.
fn library_group(inst: &SourceInstance) -> Item {
    let mut g = Item::container(CONTAINS, codes::IMAGE_LIBRARY_GROUP);
    if let Some(m) = codes::modality_code(&inst.modality) {
        g.children
            .push(Item::code(HAS_ACQ_CONTEXT, codes::MODALITY, m));
    }
    if ds::is_da(&inst.study.study_date) {
        g.children.push(Item::new(
            HAS_ACQ_CONTEXT,
            Some(codes::STUDY_DATE),
            Value::Date(inst.study.study_date.trim().to_string()),
        ));
    }
    g
}

/// The IMAGE item of one instance (and frame) used.
fn library_image(inst: &SourceInstance) -> Item {
    let mut img = Item::new(
        CONTAINS,
        None,
        Value::Image {
            class: inst.sop_class_uid.trim().to_string(),
            inst: inst.sop_instance_uid.trim().to_string(),
            frame: inst.frame,
        },
    );
    if let Some(l) = inst.laterality.as_deref().and_then(codes::laterality_code) {
        img.children
            .push(Item::code(HAS_ACQ_CONTEXT, codes::IMAGE_LATERALITY, l));
    }
    if let Some(v) = inst.view.as_deref().and_then(codes::view_code) {
        img.children
            .push(Item::code(HAS_ACQ_CONTEXT, codes::IMAGE_VIEW, v));
    }
    img
}

/// TID 1501 Measurement Group of the index lesion.
fn measurement_group(prep: &Prepared) -> Result<Item, ReportError> {
    let input = prep.input;
    let r = input.result;
    let tracking_uid = super::uid::derive_uid(
        input.settings.uid_root.as_deref(),
        &[input.case_id, "tracking-uid"],
    )?;
    let mut group = lesion_group(
        "HER2 MAP index lesion".into(),
        tracking_uid,
        r.lesion_side.as_deref(),
    );
    group.children.extend(algorithm_identification(prep));
    group.children.extend(probabilities(r));
    group.children.extend(interpretation(prep));
    Ok(group)
}

/// Lower-case SHA-256 of the weights, empty when unknown.
fn weights_sha(r: &ModelResult) -> String {
    r.weights_sha256.trim().to_ascii_lowercase()
}

/// TID 4019 Algorithm Identification: name, version and parameters (weights,
/// their status, the decision threshold, the CAM target).
pub(crate) fn algorithm_identification(prep: &Prepared) -> Vec<Item> {
    let r = prep.input.result;
    let algo_name = if r.model_name.trim().is_empty() {
        "HER2 MAP"
    } else {
        r.model_name.trim()
    };
    let algo_version = if r.model_version.trim().is_empty() {
        "unknown"
    } else {
        r.model_version.trim()
    };
    let mut items = vec![
        Item::text(HAS_CONCEPT_MOD, codes::ALGORITHM_NAME, algo_name),
        Item::text(HAS_CONCEPT_MOD, codes::ALGORITHM_VERSION, algo_version),
    ];
    let sha = weights_sha(r);
    let params = [
        format!(
            "weights SHA-256: {}",
            if sha.is_empty() { "unknown" } else { &sha }
        ),
        format!(
            "weights status: {}",
            match prep.weights {
                WeightsStatus::Verified => "verified checkpoint",
                WeightsStatus::Demo => "DEMO WEIGHTS",
                WeightsStatus::Unverified => "UNVERIFIED WEIGHTS",
            }
        ),
        format!(
            "decision threshold: HER2-positive if P >= {:.2}",
            prep.input.settings.threshold
        ),
        "CAM target class: 1 (HER2-positive)".to_string(),
    ];
    let device = (!r.device.trim().is_empty()).then(|| format!("device: {}", r.device.trim()));
    items.extend(
        params
            .into_iter()
            .chain(device)
            .map(|p| Item::text(HAS_CONCEPT_MOD, codes::ALGORITHM_PARAMETERS, p)),
    );
    items
}

/// TID 300 measurements: the fused P(HER2-positive), then each branch's.
pub(crate) fn probabilities(r: &ModelResult) -> Vec<Item> {
    let mut items = vec![Item::percent(codes::P_HER2_PROBABILITY, r.prob as f64)];
    for (code, p) in [
        (codes::P_HER2_PROBABILITY_MG, r.branch_probs.mg),
        (codes::P_HER2_PROBABILITY_US, r.branch_probs.us),
        (codes::P_HER2_PROBABILITY_MR, r.branch_probs.mri),
    ] {
        if let Some(p) = p {
            items.push(Item::percent(code, p as f64));
        }
    }
    items
}

/// The qualitative evaluation: HER2 Positive / Negative at the threshold,
/// the modalities used and missing, and the ROI method per modality.
pub(crate) fn interpretation(prep: &Prepared) -> Vec<Item> {
    let r = prep.input.result;
    let status = if r.prob >= prep.input.settings.threshold {
        codes::POSITIVE
    } else {
        codes::NEGATIVE
    };
    let mut items = vec![Item::code(CONTAINS, codes::HER2_INTERPRETATION, status)];
    for (concept, list) in [
        (codes::P_MODALITY_USED, &r.modalities_used),
        (codes::P_MODALITY_MISSING, &r.modalities_missing),
    ] {
        for m in list {
            match codes::modality_code(m) {
                Some(c) => items.push(Item::code(CONTAINS, concept, c)),
                None if !m.trim().is_empty() => items.push(Item::text(CONTAINS, concept, m.trim())),
                None => {}
            }
        }
    }
    for (m, provider) in &r.roi_methods {
        items.push(Item::text(
            CONTAINS,
            codes::P_ROI_METHOD,
            format!("{}: {}", codes::normalize_modality(m), provider.trim()),
        ));
    }
    items
}

/// Qualitative Evaluations: the research-use disclaimer, the weights status,
/// the amendment notice, an unknown lesion side and the model's notes, each
/// as a Comment.
fn qualitative_evaluations(prep: &Prepared) -> Item {
    let r = prep.input.result;
    let s = prep.input.settings;
    let mut qual = Item::container(CONTAINS, codes::QUALITATIVE_EVALUATIONS);
    let comment = |t: String| Item::text(CONTAINS, codes::COMMENT, t);
    qual.children.push(comment(format!(
        "NOT FOR DIAGNOSTIC USE. Research model output of {} (HER2 status predicted from imaging, \
         P(HER2-positive) = {:.3}, {} at threshold {:.2}); it is not a pathology result and must \
         not be used for diagnosis or treatment decisions.",
        super::model_label(r),
        r.prob,
        if r.prob >= s.threshold {
            "positive"
        } else {
            "negative"
        },
        s.threshold
    )));
    match prep.weights {
        WeightsStatus::Verified => {}
        WeightsStatus::Demo => qual.children.push(comment(
            "DEMO WEIGHTS: this result was produced with demonstration weights and has no clinical meaning."
                .to_string(),
        )),
        WeightsStatus::Unverified => {
            let sha = weights_sha(r);
            qual.children.push(comment(format!(
                "UNVERIFIED WEIGHTS: the model weights (SHA-256 {}) are not a configured verified checkpoint.",
                if sha.is_empty() { "unknown" } else { &sha }
            )))
        }
    }
    if prep.amended() {
        qual.children.push(comment(
            "AMENDED RESULT: this report replaces the earlier HER2 MAP report(s) listed in the \
             Predecessor Documents Sequence; the earlier result is superseded."
                .to_string(),
        ));
    }
    if r.lesion_side
        .as_deref()
        .and_then(codes::laterality_letter)
        .is_none()
    {
        qual.children
            .push(comment("Lesion side: unknown.".to_string()));
    }
    for n in r.notes.iter().filter(|n| !n.trim().is_empty()) {
        qual.children.push(comment(n.trim().to_string()));
    }
    qual
}

/// Build the SR document(s) of a result, one per target study. They say the
/// same, but each lists the measurement groups of its own study's images
/// first (the group a viewer's SR viewport opens on, `roi_groups`), so they
/// are not Identical Documents (PS3.3 §C.17.2.2: same content) and do not
/// claim to be.
pub(crate) fn build_srs(prep: &Prepared) -> Result<Vec<OutputObject>, ReportError> {
    let class = match prep.input.settings.sr_class {
        SrClass::Comprehensive3d => COMPREHENSIVE_3D_SR,
        SrClass::Enhanced => ENHANCED_SR,
    };
    let mut out = Vec::new();
    for study in target_studies(prep) {
        let me = InstanceRef {
            study_instance_uid: study.to_string(),
            series_instance_uid: prep.uid("sr-series", study, 0)?,
            sop_class_uid: class.to_string(),
            sop_instance_uid: prep.uid("sr", study, 0)?,
        };
        let tree = content_tree(prep, study)?;
        out.push(OutputObject {
            kind: OutputKind::Sr,
            study_instance_uid: study.to_string(),
            sop_class_uid: class.to_string(),
            sop_instance_uid: me.sop_instance_uid.clone(),
            object: super::finish(sr_document(prep, &tree, &me)?)?,
        });
    }
    Ok(out)
}

/// The SR data set placed in study `me.study_instance_uid`.
fn sr_document(prep: &Prepared, tree: &Item, me: &InstanceRef) -> Result<Obj, ReportError> {
    let input = prep.input;
    let s = input.settings;
    let study = me.study_instance_uid.as_str();
    let (d, t, _) = super::da_tm(input.now);
    let mut o = Obj::new_empty();
    super::put_sop_common(&mut o, &me.sop_class_uid, &me.sop_instance_uid, input.now);
    super::put_patient_study(&mut o, study, prep.studies[study]);

    // SR Document Series module (PS3.3 §C.17.1).
    super::put_series(
        &mut o,
        "SR",
        &me.series_instance_uid,
        SR_SERIES_NUMBER,
        &d,
        &t,
        if prep.amended() {
            SR_SERIES_DESCRIPTION_AMENDED
        } else {
            SR_SERIES_DESCRIPTION
        },
    );
    ds::put_seq(
        &mut o,
        tags::REFERENCED_PERFORMED_PROCEDURE_STEP_SEQUENCE,
        Vec::new(),
    );

    super::put_equipment(&mut o, s, input.result);

    // SR Document General module (PS3.3 §C.17.2).
    ds::put_str(&mut o, tags::INSTANCE_NUMBER, VR::IS, "1");
    ds::put_str(&mut o, tags::COMPLETION_FLAG, VR::CS, "COMPLETE");
    ds::put_str(&mut o, tags::VERIFICATION_FLAG, VR::CS, "UNVERIFIED");
    ds::put_str(&mut o, tags::CONTENT_DATE, VR::DA, &d);
    ds::put_str(&mut o, tags::CONTENT_TIME, VR::TM, &t);
    ds::put_seq(&mut o, tags::PERFORMED_PROCEDURE_CODE_SEQUENCE, Vec::new());
    put_evidence(&mut o, prep, study)?;
    if prep.amended() {
        put_predecessors(&mut o, prep, study);
    }
    // SR Document Content module (PS3.3 §C.17.3): the root content item.
    tree.write_value(&mut o);
    put_template_and_coding_scheme(&mut o, s);
    super::set_charset(&mut o);
    Ok(o)
}

/// Current Requested Procedure Evidence: the instances of this study (all of
/// them when none is); Pertinent Other Evidence: those of the other studies.
fn put_evidence(o: &mut Obj, prep: &Prepared, study: &str) -> Result<(), ReportError> {
    let refs: Vec<InstanceRef> = prep
        .instances
        .iter()
        .map(|i| InstanceRef {
            study_instance_uid: i.study_instance_uid.trim().to_string(),
            series_instance_uid: i.series_instance_uid.trim().to_string(),
            sop_class_uid: i.sop_class_uid.trim().to_string(),
            sop_instance_uid: i.sop_instance_uid.trim().to_string(),
        })
        .collect();
    let (current, other): (Vec<InstanceRef>, Vec<InstanceRef>) = refs
        .into_iter()
        .partition(|r| r.study_instance_uid == study);
    let (current, mut other) = if current.is_empty() {
        (other, Vec::new())
    } else {
        (current, other)
    };
    // The heatmaps the ROI groups show (PS3.3 §C.17.2.3: every instance the
    // content tree references is listed in one of the evidence sequences).
    other.extend(super::roi_groups::referenced_heatmaps(prep)?);
    ds::put_seq(
        o,
        tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE,
        ds::hierarchical_refs(&current),
    );
    if !other.is_empty() {
        ds::put_seq(
            o,
            tags::PERTINENT_OTHER_EVIDENCE_SEQUENCE,
            ds::hierarchical_refs(&other),
        );
    }
    Ok(())
}

/// Predecessor Documents: the amended SRs of this study, or all of them when
/// none was in this study.
fn put_predecessors(o: &mut Obj, prep: &Prepared, study: &str) {
    let preds: Vec<InstanceRef> = prep
        .input
        .predecessors
        .iter()
        .map(|p| InstanceRef {
            study_instance_uid: p.study_instance_uid.trim().to_string(),
            series_instance_uid: p.series_instance_uid.trim().to_string(),
            sop_class_uid: p.sop_class_uid.trim().to_string(),
            sop_instance_uid: p.sop_instance_uid.trim().to_string(),
        })
        .collect();
    let same: Vec<InstanceRef> = preds
        .iter()
        .filter(|p| p.study_instance_uid == study)
        .cloned()
        .collect();
    let chosen = if same.is_empty() { preds } else { same };
    ds::put_seq(
        o,
        tags::PREDECESSOR_DOCUMENTS_SEQUENCE,
        ds::hierarchical_refs(&chosen),
    );
}

/// Content Template Sequence (DCMR TID 1500) and the Coding Scheme
/// Identification Sequence for the private scheme (PS3.3 §C.12.1).
fn put_template_and_coding_scheme(o: &mut Obj, s: &ReportSettings) {
    let mut tpl = Obj::new_empty();
    ds::put_str(&mut tpl, tags::MAPPING_RESOURCE, VR::CS, "DCMR");
    ds::put_str(
        &mut tpl,
        tags::MAPPING_RESOURCE_UID,
        VR::UI,
        "1.2.840.10008.8.1.1",
    );
    ds::put_str(&mut tpl, tags::TEMPLATE_IDENTIFIER, VR::CS, "1500");
    ds::put_seq(o, tags::CONTENT_TEMPLATE_SEQUENCE, vec![tpl]);

    let mut cs = Obj::new_empty();
    ds::put_str(
        &mut cs,
        tags::CODING_SCHEME_DESIGNATOR,
        VR::SH,
        codes::PRIVATE_SCHEME,
    );
    ds::put_str(
        &mut cs,
        tags::CODING_SCHEME_NAME,
        VR::ST,
        codes::PRIVATE_SCHEME_NAME,
    );
    if !s.manufacturer.trim().is_empty() {
        ds::put_str(
            &mut cs,
            tags::CODING_SCHEME_RESPONSIBLE_ORGANIZATION,
            VR::ST,
            s.manufacturer.trim(),
        );
    }
    ds::put_seq(o, tags::CODING_SCHEME_IDENTIFICATION_SEQUENCE, vec![cs]);
}

/// A TID 1500 Measurement Group (TID 1410/1411 form) on the breast lesion:
/// its Tracking Identifier and Tracking Unique Identifier (what viewers key
/// a measurement on, OHIF included), the finding and the finding site with
/// the laterality when known.
pub(super) fn lesion_group(
    tracking_id: String,
    tracking_uid: String,
    laterality: Option<&str>,
) -> Item {
    let mut group = Item::container(CONTAINS, codes::MEASUREMENT_GROUP)
        .with(Item::text(
            HAS_OBS_CONTEXT,
            codes::TRACKING_IDENTIFIER,
            tracking_id,
        ))
        .with(Item::new(
            HAS_OBS_CONTEXT,
            Some(codes::TRACKING_UNIQUE_IDENTIFIER),
            Value::UidRef(tracking_uid),
        ))
        .with(Item::code(
            CONTAINS,
            codes::FINDING,
            codes::MALIGNANT_NEOPLASM_OF_BREAST,
        ));
    let mut site = Item::code(HAS_CONCEPT_MOD, codes::FINDING_SITE, codes::BREAST);
    if let Some(l) = laterality.and_then(codes::laterality_code) {
        site.children
            .push(Item::code(HAS_CONCEPT_MOD, codes::LATERALITY, l));
    }
    group.children.push(site);
    group
}
