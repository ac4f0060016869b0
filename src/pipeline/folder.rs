//! `her2map infer --model W DIR`: one patient's folder through the same
//! stages as a case of the node (imaging, the batched request, the engine),
//! without the database, the report or the outbox.

use std::collections::BTreeMap;
use std::path::Path;

use super::request::{build_request, dump_inputs};
use super::{PipelineError, input_grid, usable_sides};
use crate::imaging::{self, ImagingSettings, Modality, PreparedCase};
use crate::inference::SampleResult;

/// `her2map infer --model W DIR`: build the case from the DICOM files under
/// `dir` (one patient, any layout), run it, and describe what was chosen.
/// With `dump`, the exact input tensors are written as safetensors
/// (`input.mri`, `input.us`, `input.mg`, `input.clinical`) for `--inputs`.
pub fn infer_dicom_folder(
    weights: &Path,
    device: &str,
    dir: &Path,
    imaging_settings: &ImagingSettings,
    dump: Option<&Path>,
) -> Result<serde_json::Value, PipelineError> {
    let engine = crate::inference::Engine::start(weights, device, Default::default())?;
    let grid = input_grid(engine.config());
    let files = crate::send::collect_files(&[dir.to_path_buf()]);
    let prepared = usable_sides(imaging::prepare_case_sides(&files, imaging_settings, grid));
    if prepared.is_empty() {
        return Err(PipelineError::NoInput(format!(
            "no usable image under {}",
            dir.display()
        )));
    }
    let request = build_request(&prepared, grid)?;
    if let Some(path) = dump {
        dump_inputs(&request, path)?;
    }
    let response = engine.infer_blocking(request)?;
    let sides: Vec<serde_json::Value> = prepared
        .iter()
        .zip(&response.samples)
        .map(|(p, s)| side_json(p, s))
        .collect();
    Ok(serde_json::json!({
        "weights_sha256": response.weights_sha256,
        "grid": { "mri": grid.mri, "image": grid.image },
        "compute_ms": response.compute_ms,
        "sides": sides,
    }))
}

/// One side's result as `her2map infer DIR` prints it (and `her2map batch`
/// records it in its JSON lines): the side, the inputs chosen and why, the
/// scores.
pub(crate) fn side_json(p: &PreparedCase, s: &SampleResult) -> serde_json::Value {
    serde_json::json!({
        "lesion_side": p.lesion_side.side.map(|s| format!("{s:?}")),
        "lesion_side_basis": p.lesion_side.detail,
        "flags": Modality::MODEL_ORDER.map(|m| (m.key(), p.modalities().contains(m))).into_iter().collect::<BTreeMap<_, _>>(),
        "prob": s.prob,
        "logits": s.logits,
        "branch_probs": Modality::MODEL_ORDER.map(|m| (m.key(), s.branch_probs[m.branch()])).into_iter().collect::<BTreeMap<_, _>>(),
        "selections": p.selections.iter().map(|sel| serde_json::json!({
            "modality": sel.modality.as_str(),
            "role": sel.role,
            "roi_provider": sel.roi_provider,
            "study_instance_uid": sel.study_instance_uid,
            "series_instance_uid": sel.series_instance_uid,
            "instances": sel.sop_instance_uids.len(),
            "first_instance": sel.sop_instance_uids.first(),
        })).collect::<Vec<_>>(),
        "clinical": p.clinical,
        "clinical_missing": p.clinical_missing,
        "errors": p.errors.iter().map(|e| format!("{}: {}", e.file.display(), e.message)).collect::<Vec<_>>(),
        "notes": p.notes,
    })
}
