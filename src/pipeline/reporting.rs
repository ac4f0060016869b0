//! Report assembly for one case revision: per side, the model result as the
//! SR states it, the evidence (every source instance, from the headers
//! imaging read) and the heatmaps, built into DICOM objects by `report`.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use dicom_dictionary_std::tags;
use dicom_object::DefaultDicomObject;

use super::{ModelIdentity, PipelineError, SideResult, heatmap};
use crate::imaging::{self, Modality, PreparedCase};
use crate::inference::InferResponse;
use crate::report::{self, OutputKind, ReportSettings};

/// Everything the reporting step needs, moved onto the blocking pool.
pub(super) struct ReportJob {
    pub(super) case_id: String,
    pub(super) revision: i64,
    pub(super) identity: ModelIdentity,
    pub(super) settings: ReportSettings,
    pub(super) predecessors: Vec<report::PriorOutput>,
    /// When the objects are made (the node's clock): their content date/time.
    pub(super) now: time::OffsetDateTime,
}

type Built = (Vec<SideResult>, Vec<(OutputKind, DefaultDicomObject)>);

impl ReportJob {
    pub(super) fn build(
        &self,
        prepared: &[PreparedCase],
        response: &InferResponse,
    ) -> Result<Built, PipelineError> {
        let mut results = Vec::new();
        let mut written = Vec::new();
        for (i, p) in prepared.iter().enumerate() {
            let (r, outputs) = self.report_side(p, response, i)?;
            results.push(r);
            written.extend(outputs);
        }
        Ok((results, written))
    }

    fn report_side(
        &self,
        p: &PreparedCase,
        response: &InferResponse,
        sample: usize,
    ) -> Result<(SideResult, Vec<(OutputKind, DefaultDicomObject)>), PipelineError> {
        let (case_id, revision, predecessors) =
            (&self.case_id, self.revision, &self.predecessors[..]);
        let scores = &response.samples[sample];
        let have = p.modalities();
        let used: Vec<String> = have.present().map(|m| m.as_str().to_string()).collect();
        let missing: Vec<String> = have.absent().map(|m| m.as_str().to_string()).collect();
        let side = p.lesion_side.side.map(|s| match s {
            imaging::Laterality::Left => "L".to_string(),
            imaging::Laterality::Right => "R".to_string(),
        });
        // The ROI method of a modality is that of its tumour crop where it
        // has one (MG), else of its single input.
        let mut roi_methods: Vec<(String, String)> = Vec::new();
        for s in &p.selections {
            let m = s.modality.as_str();
            match roi_methods.iter_mut().find(|(k, _)| k == m) {
                Some(entry) if s.role.contains("crop") => entry.1 = s.roi_provider.clone(),
                Some(_) => {}
                None => roi_methods.push((m.to_string(), s.roi_provider.clone())),
            }
        }
        let mut notes = p.notes.clone();
        notes.push(format!("lesion side: {}", p.lesion_side.detail));
        let result = report::ModelResult {
            model_name: self.identity.name.clone(),
            model_version: self.identity.version.clone(),
            weights_sha256: response.weights_sha256.clone(),
            device: format!("{} ({})", response.device, response.device_name),
            demo: self.identity.demo,
            prob: scores.prob,
            branch_probs: report::BranchScores {
                us: scores.branch_probs[Modality::US.branch()],
                mri: scores.branch_probs[Modality::MR.branch()],
                mg: scores.branch_probs[Modality::MG.branch()],
            },
            modalities_used: used.clone(),
            modalities_missing: missing.clone(),
            roi_methods: roi_methods.clone(),
            lesion_side: side.clone(),
            notes,
        };

        // Evidence: every instance the inputs came from, in selection
        // order, from the headers imaging read.
        let mut seen = HashSet::new();
        let uids: Vec<&String> = p
            .selections
            .iter()
            .flat_map(|s| s.sop_instance_uids.iter())
            .filter(|uid| p.sources.contains_key(*uid) && seen.insert(*uid))
            .collect();
        let headers: HashMap<String, Header> = uids
            .iter()
            .map(|uid| ((*uid).clone(), Header::of(&p.sources[*uid])))
            .collect();
        let evidence: Vec<report::SourceInstance> =
            uids.iter().map(|uid| headers[*uid].source(None)).collect();
        let heatmaps = heatmap::heatmaps(p, response, sample, &headers);
        let settings = &self.settings;
        let input = report::ReportInput {
            case_id: &format!("{case_id}/r{revision}/{}", side.as_deref().unwrap_or("U")),
            result: &result,
            evidence: &evidence,
            heatmaps: &heatmaps,
            predecessors,
            settings,
            now: self.now,
        };
        let outputs = report::build_outputs(&input)?;
        let side_result = SideResult {
            lesion_side: side,
            prob: scores.prob,
            positive: scores.prob >= self.settings.threshold,
            branch_probs: Modality::MODEL_ORDER
                .map(|m| (m.key(), scores.branch_probs[m.branch()]))
                .into(),
            modalities_used: used,
            modalities_missing: missing,
            roi_methods,
            outputs: outputs.len(),
        };
        Ok((
            side_result,
            outputs.into_iter().map(|o| (o.kind, o.object)).collect(),
        ))
    }
}

/// What the outputs need of a source instance.
pub(super) struct Header {
    pub(super) path: PathBuf,
    pub(super) sop_class_uid: String,
    pub(super) sop_instance_uid: String,
    pub(super) study_instance_uid: String,
    pub(super) series_instance_uid: String,
    pub(super) modality: String,
    pub(super) laterality: Option<String>,
    pub(super) view: Option<String>,
    pub(super) study: report::StudyAttributes,
    /// Rows and Columns of the source image.
    pub(super) rows: u32,
    pub(super) cols: u32,
    /// First VOI window (centre, width), for the presentation state.
    pub(super) window: Option<(f64, f64)>,
    pub(super) monochrome1: bool,
}

impl Header {
    /// What the outputs cite of an instance, from the header imaging read
    /// (its laterality and view are the ones imaging used).
    pub(super) fn of(m: &imaging::InstanceMeta) -> Header {
        let o = &m.header;
        let text = |tag| imaging::attrs::text(o, tag).unwrap_or_default();
        let opt = |tag| imaging::attrs::text(o, tag);
        let first = |tag| imaging::attrs::floats(o, tag).first().copied();
        let int = |tag| first(tag).map_or(0, |v| v as u32);
        Header {
            rows: int(tags::ROWS),
            cols: int(tags::COLUMNS),
            window: first(tags::WINDOW_CENTER).zip(first(tags::WINDOW_WIDTH)),
            monochrome1: opt(tags::PHOTOMETRIC_INTERPRETATION)
                .is_some_and(|p| p.trim() == "MONOCHROME1"),
            path: m.path.clone(),
            sop_class_uid: m.sop_class.clone(),
            sop_instance_uid: m.sop_instance.clone(),
            study_instance_uid: m.study_uid.clone(),
            series_instance_uid: m.series_uid.clone(),
            modality: m.modality.clone(),
            laterality: m.laterality.map(|l| l.code().to_string()),
            view: m.view.map(|v| v.code().to_string()),
            study: report::StudyAttributes {
                patient_name: text(tags::PATIENT_NAME),
                patient_id: text(tags::PATIENT_ID),
                issuer_of_patient_id: opt(tags::ISSUER_OF_PATIENT_ID),
                patient_birth_date: text(tags::PATIENT_BIRTH_DATE),
                patient_sex: text(tags::PATIENT_SEX),
                study_date: text(tags::STUDY_DATE),
                study_time: text(tags::STUDY_TIME),
                accession_number: text(tags::ACCESSION_NUMBER),
                referring_physician_name: text(tags::REFERRING_PHYSICIAN_NAME),
                study_id: text(tags::STUDY_ID),
                study_description: opt(tags::STUDY_DESCRIPTION),
            },
        }
    }

    pub(super) fn source(&self, frame: Option<u32>) -> report::SourceInstance {
        report::SourceInstance {
            sop_class_uid: self.sop_class_uid.clone(),
            sop_instance_uid: self.sop_instance_uid.clone(),
            study_instance_uid: self.study_instance_uid.clone(),
            series_instance_uid: self.series_instance_uid.clone(),
            modality: self.modality.clone(),
            laterality: self.laterality.clone(),
            view: self.view.clone(),
            frame,
            study: self.study.clone(),
        }
    }
}
