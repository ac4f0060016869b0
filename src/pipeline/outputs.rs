//! The outputs of one case revision on disk: each object written durably
//! under `outputs/<case>/r<revision>/` before any row names it for delivery.

use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use dicom_object::DefaultDicomObject;
use rayon::prelude::*;

use super::PipelineError;
use crate::db::OutputRow;
use crate::durable;
use crate::report::OutputKind;

/// Write the outputs of one case revision durably: each file under a
/// temporary name, fdatasync'd and renamed (in parallel), then their folder
/// fsync'd once, before any is queued for delivery.
pub(super) fn write_outputs(
    data_dir: &Path,
    case_id: &str,
    revision: i64,
    written: Vec<(OutputKind, DefaultDicomObject)>,
) -> Result<Vec<OutputRow>, PipelineError> {
    let rel_dir = PathBuf::from("outputs")
        .join(crate::spool::sanitise_uid(case_id).replace("2.25.", "c"))
        .join(format!("r{revision}"));
    let dir = data_dir.join(&rel_dir);
    std::fs::create_dir_all(&dir)?;
    let rows = written
        .into_par_iter()
        .map(|(kind, obj)| -> Result<OutputRow, PipelineError> {
            let text = |tag| -> String {
                obj.get(tag)
                    .and_then(|e| e.to_str().ok())
                    .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
                    .unwrap_or_default()
            };
            let sop = text(tags::SOP_INSTANCE_UID);
            let rel = rel_dir.join(format!("{}.dcm", crate::spool::sanitise_uid(&sop)));
            let abs = data_dir.join(&rel);
            durable::write_file_synced(&abs, |tmp| {
                obj.write_to_file(tmp).map_err(std::io::Error::other)
            })?;
            Ok(OutputRow {
                sop_instance_uid: sop,
                case_id: case_id.to_string(),
                revision,
                kind,
                sop_class_uid: text(tags::SOP_CLASS_UID),
                study_instance_uid: text(tags::STUDY_INSTANCE_UID),
                series_instance_uid: text(tags::SERIES_INSTANCE_UID),
                path: rel.to_string_lossy().into_owned(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // The folder, and the folders above it that this case may have created:
    // `r<revision>`, the case's folder, `outputs/` and the data folder that
    // holds `outputs/`. The data folder too: `outputs/` is made by the first
    // case run, after the spool fsync'd the data folder at start-up, so
    // without this its entry (and with it every output) could be lost by a
    // power cut while the rows naming the outputs survive, and the outbox
    // dead-letters them as missing files (found by tests/it/powercut.rs).
    durable::sync_dir_and_parents(&dir, 3)?;
    Ok(rows)
}
