//! The node's main job for one ready case: stored instances → imaging →
//! inference engine → SR + heatmaps → outbox. Runs off the network path, one
//! case at a time (the engine serialises inference anyway); imaging runs on
//! the blocking pool (rayon inside), inference on the engine's own thread.
//! Every step is an audit event carrying the case id.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use dicom_dictionary_std::tags;
use dicom_object::DefaultDicomObject;
use rayon::prelude::*;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::cases::{CaseJob, CaseState};
use crate::db::{Db, NewEvent, OutputRow};
use crate::imaging::{self, ImagingSettings, InputGrid, PreparedCase, SelModality, SourceGeometry};
use crate::inference::{EngineHandle, InferRequest, InferResponse, TensorData};
use crate::report::{self, OutputKind, ReportSettings};

/// Pipeline audit event names.
pub mod event {
    pub const CASE_IMAGING_DONE: &str = "case_imaging_done";
    pub const CASE_INFERENCE_DONE: &str = "case_inference_done";
    pub const CASE_RESULT: &str = "case_result";
    pub const CASE_FAILED: &str = "case_failed";
}

/// What the outputs say made them.
#[derive(Debug, Clone)]
pub struct ModelIdentity {
    pub name: String,
    pub version: String,
    pub demo: bool,
}

/// Milliseconds per stage of one case.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StageTimes {
    pub imaging_ms: f64,
    pub inference_ms: f64,
    pub reporting_ms: f64,
}

/// The result of one side of a case, as recorded in the `case_result` event.
#[derive(Debug, Clone, Serialize)]
pub struct SideResult {
    pub lesion_side: Option<String>,
    pub prob: f32,
    pub positive: bool,
    pub branch_probs: BTreeMap<&'static str, Option<f32>>,
    pub modalities_used: Vec<String>,
    pub modalities_missing: Vec<String>,
    pub roi_methods: Vec<(String, String)>,
    pub outputs: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{0}")]
    Db(#[from] crate::db::DbError),
    #[error("no usable modality: {0}")]
    NoInput(String),
    #[error("inference: {0}")]
    Model(#[from] crate::model::ModelError),
    #[error("report: {0}")]
    Report(#[from] report::ReportError),
    #[error("writing outputs: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

pub struct Pipeline {
    pub db: Db,
    /// The node's clock: stamps every transition, event and output.
    pub clock: crate::clock::Clock,
    pub data_dir: PathBuf,
    pub engine: EngineHandle,
    pub imaging: ImagingSettings,
    pub report: ReportSettings,
    pub identity: ModelIdentity,
    pub destinations: Vec<crate::outbox::DestinationSettings>,
    pub outbox_wake: Arc<Notify>,
    /// Case ids whose inputs are complete and that only wait for their
    /// stable age (from the assembler): their imaging starts now.
    pub prepare_hints: Option<mpsc::Receiver<String>>,
    pub speculation: Speculation,
}

/// Imaging started while a complete case waits for its stable age, so that
/// when it becomes ready only inference and reporting remain. Imaging is a
/// pure function of the case's files (the spool never rewrites a stored
/// instance) and the settings, so the result serves the run when the files
/// are exactly the same; any instance added since makes the run prepare
/// afresh. One case at a time: a hint while one is being prepared waits
/// for the next round, which bounds the memory to one preparation.
#[derive(Default)]
pub struct Speculation(std::sync::Mutex<Option<Speculative>>);

struct Speculative {
    files: Vec<PathBuf>,
    handle: tokio::task::JoinHandle<(Vec<PreparedCase>, f64)>,
}

fn modality_name(m: usize) -> &'static str {
    ["US", "MR", "MG"][m]
}

impl Pipeline {
    /// Take cases from the queue (and preparation hints) until shutdown.
    pub async fn run(mut self, mut jobs: mpsc::Receiver<CaseJob>, shutdown: CancellationToken) {
        let mut hints = self.prepare_hints.take();
        loop {
            tokio::select! {
                j = jobs.recv() => match j {
                    Some(job) => self.process(&job).await,
                    None => return,
                },
                Some(case_id) = async {
                    match hints.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => self.speculate(&case_id).await,
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// The files imaging reads for a case: every member, in received order.
    fn member_files(&self, members: &[crate::db::CaseMember]) -> Vec<PathBuf> {
        let spool = self.data_dir.join("spool");
        members.iter().map(|m| spool.join(&m.path)).collect()
    }

    fn grid(&self) -> InputGrid {
        let cfg = self.engine.config();
        InputGrid {
            mri: cfg.mri.img_size,
            image: cfg.us.img_size,
        }
    }

    /// Imaging on the blocking pool; the output carries its own duration.
    fn imaging_job(
        &self,
        files: Vec<PathBuf>,
    ) -> tokio::task::JoinHandle<(Vec<PreparedCase>, f64)> {
        let (settings, grid) = (self.imaging.clone(), self.grid());
        tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let prepared = imaging::prepare_case_sides(&files, &settings, grid);
            (prepared, t.elapsed().as_secs_f64() * 1e3)
        })
    }

    /// Start preparing a complete case's inputs (see [`Speculation`]).
    async fn speculate(&self, case_id: &str) {
        let files = match self.db.case_members(case_id).await {
            Ok(members) => self.member_files(&members),
            Err(e) => {
                warn!(case = %case_id, error = %e, "inputs could not be prepared early");
                return;
            }
        };
        let mut slot = self.speculation.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(current) = slot.as_ref()
            && (current.files == files || !current.handle.is_finished())
        {
            return;
        }
        debug!(case = %case_id, "preparing inputs during the stable age");
        *slot = Some(Speculative {
            handle: self.imaging_job(files.clone()),
            files,
        });
    }

    /// The prepared inputs of `files`: the early preparation when it was of
    /// exactly these files (waiting for it if it still runs), else a fresh
    /// one. Returns the inputs, the milliseconds this call waited, the
    /// milliseconds the preparation itself took, and whether it was early.
    async fn prepared(
        &self,
        files: Vec<PathBuf>,
    ) -> Result<(Vec<PreparedCase>, f64, f64, bool), PipelineError> {
        let t = Instant::now();
        let taken = self
            .speculation
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let (handle, early) = match taken {
            Some(s) if s.files == files => (s.handle, true),
            other => {
                // An early preparation of other files (the case changed, or
                // another case went first) is let finish and dropped: one
                // preparation at a time keeps the memory bound.
                if let Some(s) = other {
                    let _ = s.handle.await;
                }
                (self.imaging_job(files), false)
            }
        };
        let (prepared, compute_ms) = handle
            .await
            .map_err(|e| PipelineError::Other(e.to_string()))?;
        Ok((prepared, t.elapsed().as_secs_f64() * 1e3, compute_ms, early))
    }

    /// Run one case; failures end the case in `failed` with the reason.
    pub async fn process(&self, job: &CaseJob) {
        let now = self.clock.now();
        match self
            .db
            .transition_case(
                &job.case_id,
                CaseState::Queued,
                CaseState::Running,
                "imaging and inference",
                now,
            )
            .await
        {
            Ok(true) => {}
            Ok(false) => return, // held or changed by an operator meanwhile
            Err(e) => {
                error!(case = %job.case_id, error = %e, "case could not start");
                return;
            }
        }
        if let Err(e) = self.run_case(job).await {
            warn!(case = %job.case_id, error = %e, "case failed");
            let reason = e.to_string();
            self.audit(
                &job.case_id,
                event::CASE_FAILED,
                serde_json::json!({ "reason": reason }),
            )
            .await;
            let _ = self
                .db
                .transition_case(
                    &job.case_id,
                    CaseState::Running,
                    CaseState::Failed,
                    &reason,
                    self.clock.now(),
                )
                .await;
        }
    }

    async fn audit(&self, case_id: &str, name: &str, detail: serde_json::Value) {
        let e = NewEvent {
            event: name,
            case_id: Some(case_id),
            detail: Some(detail),
            ..Default::default()
        };
        if let Err(err) = self.db.record(e, self.clock.now()).await {
            error!(error = %err, "audit event could not be recorded");
        }
    }

    async fn run_case(&self, job: &CaseJob) -> Result<(), PipelineError> {
        let case = self
            .db
            .case(&job.case_id)
            .await?
            .ok_or_else(|| PipelineError::Other("case vanished".into()))?;
        let seen_last = case.last_instance_at.clone();
        let members = self.db.case_members(&case.id).await?;
        let files = self.member_files(&members);
        let mut times = StageTimes::default();

        // Imaging, off the async workers (perhaps already done during the
        // stable age).
        let grid = self.grid();
        let instances = files.len();
        let (prepared, waited_ms, imaging_compute_ms, early) = self.prepared(files).await?;
        times.imaging_ms = waited_ms;
        let errors: Vec<String> = prepared
            .iter()
            .flat_map(|p| p.errors.iter())
            .map(|e| {
                format!(
                    "{}: {}",
                    e.sop_instance_uid.as_deref().unwrap_or("?"),
                    e.message
                )
            })
            .collect();
        self.audit(
            &case.id,
            event::CASE_IMAGING_DONE,
            serde_json::json!({
                "ms": times.imaging_ms,
                "compute_ms": imaging_compute_ms,
                "prepared_during_stable_age": early,
                "instances": instances,
                "sides": prepared.len(),
                "flags": prepared.iter().map(|p| p.modality_flags()).collect::<Vec<_>>(),
                "errors": errors,
                "notes": prepared.iter().flat_map(|p| p.notes.clone()).collect::<Vec<_>>(),
            }),
        )
        .await;
        let prepared: Vec<PreparedCase> = prepared
            .into_iter()
            .filter(|p| p.modality_flags().iter().any(|f| *f))
            .collect();
        if prepared.is_empty() {
            return Err(PipelineError::NoInput(if errors.is_empty() {
                "no image could be selected".into()
            } else {
                errors.join("; ")
            }));
        }

        // The amendment check: a rerun that selects the same inputs makes no
        // new result.
        let digest = inputs_digest(&prepared);
        if case.revision > 0 && digest == case.inputs_digest {
            self.db
                .transition_case(
                    &case.id,
                    CaseState::Running,
                    CaseState::Done,
                    "late instances did not change the selected inputs: no new result",
                    self.clock.now(),
                )
                .await?;
            return Ok(());
        }

        // Inference: both sides (when the side is unknown) in one batch.
        let request = build_request(&prepared, grid)?;
        let t = Instant::now();
        let response = self.engine.infer(request).await?;
        times.inference_ms = t.elapsed().as_secs_f64() * 1e3;
        self.audit(
            &case.id,
            event::CASE_INFERENCE_DONE,
            serde_json::json!({
                "ms": times.inference_ms,
                "compute_ms": response.compute_ms,
                "probs": response.samples.iter().map(|s| s.prob).collect::<Vec<_>>(),
                "weights_sha256": response.weights_sha256,
            }),
        )
        .await;

        // Reporting: SR + heatmaps per side (file reads and pixel work on the
        // blocking pool), written durably, queued.
        let t = Instant::now();
        let predecessors = self.predecessors(&case.id, case.revision).await?;
        let job = ReportJob {
            case_id: case.id.clone(),
            revision: case.revision,
            identity: self.identity.clone(),
            settings: self.report.clone(),
            predecessors,
        };
        let (results, written) =
            tokio::task::spawn_blocking(move || job.build(&prepared, &response))
                .await
                .map_err(|e| PipelineError::Other(e.to_string()))??;
        let (data_dir, case_id, revision) = (self.data_dir.clone(), case.id.clone(), case.revision);
        let rows = tokio::task::spawn_blocking(move || {
            write_outputs(&data_dir, &case_id, revision, written)
        })
        .await
        .map_err(|e| PipelineError::Other(e.to_string()))??;
        for row in &rows {
            let dests = crate::outbox::destinations_for(&self.destinations, row.kind);
            self.db.add_output(row, &dests, self.clock.now()).await?;
        }
        self.outbox_wake.notify_waiters();
        times.reporting_ms = t.elapsed().as_secs_f64() * 1e3;
        self.db.set_case_inputs(&case.id, &digest).await?;
        self.audit(
            &case.id,
            event::CASE_RESULT,
            serde_json::json!({
                "revision": case.revision,
                "sides": results,
                "times": times,
                "model": self.identity.name, "model_version": self.identity.version,
                "weights_sha256": self.engine.weights_sha256(), "demo": self.identity.demo,
                "errors": errors,
            }),
        )
        .await;
        let summary = results
            .iter()
            .map(|r| {
                format!(
                    "side {}: P(HER2+)={:.3}",
                    r.lesion_side.as_deref().unwrap_or("?"),
                    r.prob
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        info!(case = %case.id, %summary, outputs = rows.len(), "case result");

        // Instances that arrived while the case ran reopen it.
        let now = self.clock.now();
        let latest = self.db.case(&case.id).await?.map(|c| c.last_instance_at);
        if latest.as_deref() != Some(seen_last.as_str()) {
            self.db
                .reopen_case(
                    &case.id,
                    CaseState::Running,
                    "instances arrived while the case ran",
                    now,
                )
                .await?;
        } else {
            let reason = format!("result: {summary}; {} objects queued", rows.len());
            self.db
                .transition_case(&case.id, CaseState::Running, CaseState::Done, &reason, now)
                .await?;
        }
        Ok(())
    }

    /// Earlier SRs of this case: the new one amends them.
    async fn predecessors(
        &self,
        case_id: &str,
        revision: i64,
    ) -> Result<Vec<report::PriorOutput>, PipelineError> {
        Ok(self
            .db
            .case_outputs(case_id)
            .await?
            .into_iter()
            .filter(|o| o.kind == OutputKind::Sr && o.revision < revision)
            .map(|o| report::PriorOutput {
                sop_class_uid: o.sop_class_uid,
                sop_instance_uid: o.sop_instance_uid,
                series_instance_uid: o.series_instance_uid,
                study_instance_uid: o.study_instance_uid,
            })
            .collect())
    }
}

/// Write the outputs of one case revision durably: each file under a
/// temporary name, fdatasync'd and renamed (in parallel), then their folder
/// fsync'd once, before any is queued for delivery.
fn write_outputs(
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
            let tmp = abs.with_extension("part");
            obj.write_to_file(&tmp).map_err(std::io::Error::other)?;
            std::fs::File::open(&tmp)?.sync_data()?;
            std::fs::rename(&tmp, &abs)?;
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
    // The folder, and the folders above it that this case may have created.
    for d in dir.ancestors().take(3) {
        std::fs::File::open(d)?.sync_all()?;
    }
    Ok(rows)
}

/// Everything the reporting step needs, moved onto the blocking pool.
struct ReportJob {
    case_id: String,
    revision: i64,
    identity: ModelIdentity,
    settings: ReportSettings,
    predecessors: Vec<report::PriorOutput>,
}

type Built = (Vec<SideResult>, Vec<(OutputKind, DefaultDicomObject)>);

impl ReportJob {
    fn build(
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
        let flags = p.modality_flags();
        let used: Vec<String> = (0..3)
            .filter(|&m| flags[m])
            .map(|m| modality_name(m).to_string())
            .collect();
        let missing: Vec<String> = (0..3)
            .filter(|&m| !flags[m])
            .map(|m| modality_name(m).to_string())
            .collect();
        let side = p.lesion_side.side.map(|s| match s {
            imaging::Laterality::Left => "L".to_string(),
            imaging::Laterality::Right => "R".to_string(),
        });
        // The ROI method of a modality is that of its tumour crop where it
        // has one (MG), else of its single input.
        let mut roi_methods: Vec<(String, String)> = Vec::new();
        for s in &p.selections {
            let m = match s.modality {
                SelModality::Mg => "MG",
                SelModality::Us => "US",
                SelModality::Mr => "MR",
            };
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
            demo: self.identity.demo,
            prob: scores.prob,
            branch_probs: report::BranchScores {
                us: scores.branch_probs[0],
                mri: scores.branch_probs[1],
                mg: scores.branch_probs[2],
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
        let heatmaps = self.heatmaps(p, response, sample, &headers);
        let settings = &self.settings;
        let input = report::ReportInput {
            case_id: &format!("{case_id}/r{revision}/{}", side.as_deref().unwrap_or("U")),
            result: &result,
            evidence: &evidence,
            heatmaps: &heatmaps,
            predecessors,
            settings,
            now: time::OffsetDateTime::now_utc(),
        };
        let outputs = report::build_outputs(&input)?;
        let side_result = SideResult {
            lesion_side: side,
            prob: scores.prob,
            positive: scores.prob >= self.settings.threshold,
            branch_probs: BTreeMap::from([
                ("us", scores.branch_probs[0]),
                ("mri", scores.branch_probs[1]),
                ("mg", scores.branch_probs[2]),
            ]),
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

    /// The heatmap images of one side: MG CC and MLO whole views, the US
    /// image, and the MRI axial slices through the CAM peak.
    fn heatmaps(
        &self,
        p: &PreparedCase,
        response: &InferResponse,
        sample: usize,
        headers: &HashMap<String, Header>,
    ) -> Vec<report::Heatmap> {
        // One heatmap job per selection, decoded and blended in parallel.
        let made: Vec<Vec<report::Heatmap>> = p
            .selections
            .par_iter()
            .map(|s| {
                let branch = match s.modality {
                    SelModality::Us => 0,
                    SelModality::Mr => 1,
                    SelModality::Mg => 2,
                };
                // The crops share the CAM of their whole views; the
                // pre-contrast phase only served the subtraction.
                if s.role.contains("crop") || s.role.contains("pre-contrast") {
                    return Vec::new();
                }
                let Some(cams) = &response.cams[branch] else {
                    return Vec::new();
                };
                let made = match &s.geometry {
                    SourceGeometry::Planar { frame, crop, .. } => s
                        .sop_instance_uids
                        .first()
                        .and_then(|uid| headers.get(uid))
                        .map(|h| {
                            planar_heatmap(h, s, *frame, *crop, &cams.input, sample)
                                .map(|hm| vec![hm])
                        })
                        .unwrap_or_else(|| Ok(Vec::new())),
                    SourceGeometry::Volume { .. } => mri_heatmaps(s, headers, &cams.input, sample),
                };
                made.unwrap_or_else(|e| {
                    warn!(role = %s.role, error = %e, "heatmap skipped");
                    Vec::new()
                })
            })
            .collect();
        made.into_iter().flatten().collect()
    }
}

/// SHA-256 over the sorted SOP Instance UIDs each side's inputs came from.
fn inputs_digest(prepared: &[PreparedCase]) -> String {
    let mut h = Sha256::new();
    for p in prepared {
        let mut uids: Vec<&str> = p
            .selections
            .iter()
            .flat_map(|s| s.sop_instance_uids.iter().map(String::as_str))
            .collect();
        uids.sort_unstable();
        for u in uids {
            h.update(u.as_bytes());
            h.update(b"\n");
        }
        h.update(b"--\n");
    }
    hex::encode(h.finalize())
}

/// One batch of the prepared sides; an absent modality of a side is zeros
/// with its flag 0 (the model skips a branch no sample has).
fn build_request(
    prepared: &[PreparedCase],
    grid: InputGrid,
) -> Result<InferRequest, PipelineError> {
    let b = prepared.len();
    let (d, s) = (grid.mri, grid.image);
    let any = |m: usize| prepared.iter().any(|p| p.modality_flags()[m]);
    let stack = |len: usize, get: &dyn Fn(&PreparedCase) -> Option<&Vec<f32>>| {
        let mut data = Vec::with_capacity(b * len);
        for p in prepared {
            match get(p) {
                Some(v) if v.len() == len => data.extend_from_slice(v),
                _ => data.extend(std::iter::repeat_n(0.0, len)),
            }
        }
        data
    };
    let us = any(0)
        .then(|| {
            TensorData::new(
                vec![b, 1, s, s],
                stack(s * s, &|p| p.us.as_ref().map(|x| &x.data)),
            )
        })
        .transpose()?;
    let mri = any(1)
        .then(|| {
            TensorData::new(
                vec![b, 1, d, d, d],
                stack(d * d * d, &|p| p.mri.as_ref().map(|x| &x.data)),
            )
        })
        .transpose()?;
    let mg = any(2)
        .then(|| {
            TensorData::new(
                vec![b, 4, s, s],
                stack(4 * s * s, &|p| p.mg.as_ref().map(|x| &x.data)),
            )
        })
        .transpose()?;
    let clinical = TensorData::new(
        vec![b, 5],
        prepared.iter().flat_map(|p| p.clinical).collect(),
    )?;
    Ok(InferRequest {
        mri,
        us,
        mg,
        clinical,
        flags: prepared.iter().map(|p| p.modality_flags()).collect(),
        want_cams: true,
    })
}

/// What the outputs need of a source instance.
struct Header {
    path: PathBuf,
    sop_class_uid: String,
    sop_instance_uid: String,
    study_instance_uid: String,
    series_instance_uid: String,
    modality: String,
    laterality: Option<String>,
    view: Option<String>,
    study: report::StudyAttributes,
}

impl Header {
    /// What the outputs cite of an instance, from the header imaging read
    /// (its laterality and view are the ones imaging used).
    fn of(m: &imaging::InstanceMeta) -> Header {
        let o = &m.header;
        let text = |tag| imaging::attrs::text(o, tag).unwrap_or_default();
        let opt = |tag| imaging::attrs::text(o, tag);
        Header {
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

    fn source(&self, frame: Option<u32>) -> report::SourceInstance {
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

/// The heatmap background of a source frame: the one imaging kept from its
/// own decode when there is one, else the frame decoded here (first window,
/// shrunk the same way: `imaging::heatmap_base`).
fn base_image<'a>(
    path: &Path,
    frame: u32,
    kept: Option<&'a imaging::HeatmapBase>,
) -> Result<std::borrow::Cow<'a, imaging::HeatmapBase>, String> {
    if let Some(b) = kept {
        return Ok(std::borrow::Cow::Borrowed(b));
    }
    let obj = dicom_object::open_file(path).map_err(|e| e.to_string())?;
    let g = imaging::decode::decode_gray(&obj, frame, imaging::VoiWindowChoice::First)
        .map_err(|e| e.to_string())?;
    Ok(std::borrow::Cow::Owned(imaging::heatmap_base(&g)))
}

fn to_u8(g: &imaging::decode::GrayImage) -> Vec<u8> {
    g.data
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect()
}

fn planar_heatmap(
    h: &Header,
    s: &imaging::Selection,
    frame: u32,
    crop: [f64; 4],
    cams: &TensorData,
    sample: usize,
) -> Result<report::Heatmap, String> {
    let base = base_image(&h.path, frame, s.heatmap_base.as_deref())?;
    let (g, scale) = (&base.image, base.scale);
    let role = s.role.as_str();
    let (cr, cc) = (
        cams.shape[cams.shape.len() - 2],
        cams.shape[cams.shape.len() - 1],
    );
    let n = cr * cc;
    let cam = cams
        .data
        .get(sample * n..(sample + 1) * n)
        .ok_or("CAM batch shorter than the request")?;
    let [x0, y0, x1, y1] = crop;
    let bx = report::sc::CropBox {
        top: (y0 * scale) as f32,
        left: (x0 * scale) as f32,
        height: ((y1 - y0) * scale) as f32,
        width: ((x1 - x0) * scale) as f32,
    };
    let cam = report::sc::cam_to_base_grid(
        cam,
        cr as u32,
        cc as u32,
        bx,
        g.height as u32,
        g.width as u32,
    )
    .map_err(|e| e.to_string())?;
    let label = format!(
        "{} {} {}",
        h.modality,
        h.laterality.as_deref().unwrap_or(""),
        if role == "US" { "" } else { role }
    );
    Ok(report::Heatmap {
        source: h.source((frame > 0).then_some(frame + 1)),
        base: to_u8(g),
        cam,
        rows: g.height as u32,
        cols: g.width as u32,
        label: label.split_whitespace().collect::<Vec<_>>().join(" "),
    })
}

/// MRI heatmaps: the axial source slices through the CAM peak (the peak
/// slice and its neighbours two slices away), the CAM volume sampled at each
/// source pixel's patient position.
fn mri_heatmaps(
    s: &imaging::Selection,
    headers: &HashMap<String, Header>,
    cams: &TensorData,
    sample: usize,
) -> Result<Vec<report::Heatmap>, String> {
    let SourceGeometry::Volume {
        slices,
        frames,
        origin,
        row_dir,
        col_dir,
        normal,
        spacing,
        box_center_mm,
        box_side_mm,
        ..
    } = &s.geometry
    else {
        return Ok(Vec::new());
    };
    let n = cams.shape[cams.shape.len() - 1];
    let vol = cams
        .data
        .get(sample * n * n * n..(sample + 1) * n * n * n)
        .ok_or("CAM batch shorter than the request")?;
    // Peak of the CAM in input index space (k, j, i) → patient mm.
    let (peak, _) =
        vol.iter().enumerate().fold(
            (0usize, f32::MIN),
            |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc },
        );
    let (pk, pj, pi) = (peak / (n * n), (peak / n) % n, peak % n);
    let axis = |idx: usize| ((idx as f64 + 0.5) / n as f64 - 0.5) * box_side_mm;
    let p = [
        box_center_mm[0] + axis(pi),
        box_center_mm[1] + axis(pj),
        box_center_mm[2] + axis(pk),
    ];
    let rel = [p[0] - origin[0], p[1] - origin[1], p[2] - origin[2]];
    let dot = |a: &[f64; 3], b: &[f64; 3]| a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
    let peak_slice = (dot(&rel, normal) / spacing[0])
        .round()
        .clamp(0.0, (*slices - 1) as f64) as usize;
    let mut chosen = vec![peak_slice];
    if peak_slice >= 2 {
        chosen.insert(0, peak_slice - 2);
    }
    if peak_slice + 2 < *slices {
        chosen.push(peak_slice + 2);
    }
    let sample_cam = |q: [f64; 3]| -> f32 {
        // Patient point → continuous input index, trilinear.
        let f = |c: usize| ((q[c] - box_center_mm[c]) / box_side_mm + 0.5) * n as f64 - 0.5;
        let (x, y, z) = (f(0), f(1), f(2));
        if x < -0.5
            || y < -0.5
            || z < -0.5
            || x > n as f64 - 0.5
            || y > n as f64 - 0.5
            || z > n as f64 - 0.5
        {
            return 0.0;
        }
        let cl = |v: f64| v.clamp(0.0, (n - 1) as f64);
        let (x, y, z) = (cl(x), cl(y), cl(z));
        let (x0, y0, z0) = (x.floor() as usize, y.floor() as usize, z.floor() as usize);
        let (x1, y1, z1) = (
            (x0 + 1).min(n - 1),
            (y0 + 1).min(n - 1),
            (z0 + 1).min(n - 1),
        );
        let (fx, fy, fz) = (
            (x - x0 as f64) as f32,
            (y - y0 as f64) as f32,
            (z - z0 as f64) as f32,
        );
        let at = |k: usize, j: usize, i: usize| vol[(k * n + j) * n + i];
        let lerp = |a: f32, b: f32, t: f32| a + (b - a) * t;
        let c00 = lerp(at(z0, y0, x0), at(z0, y0, x1), fx);
        let c01 = lerp(at(z0, y1, x0), at(z0, y1, x1), fx);
        let c10 = lerp(at(z1, y0, x0), at(z1, y0, x1), fx);
        let c11 = lerp(at(z1, y1, x0), at(z1, y1, x1), fx);
        lerp(lerp(c00, c01, fy), lerp(c10, c11, fy), fz)
    };
    let mut out = Vec::new();
    for sl in chosen {
        let Some(uid) = s.sop_instance_uids.get(sl) else {
            continue;
        };
        let Some(h) = headers.get(uid) else { continue };
        let frame = frames.get(sl).copied().unwrap_or(0);
        let base = base_image(&h.path, frame, None)?;
        let (g, scale) = (&base.image, base.scale);
        let mut cam = Vec::with_capacity(g.width * g.height);
        for r in 0..g.height {
            for c in 0..g.width {
                let (sr, sc) = (r as f64 / scale, c as f64 / scale);
                let mut q = *origin;
                for a in 0..3 {
                    q[a] += sc * spacing[2] * row_dir[a]
                        + sr * spacing[1] * col_dir[a]
                        + sl as f64 * spacing[0] * normal[a];
                }
                cam.push(sample_cam(q));
            }
        }
        out.push(report::Heatmap {
            source: h.source((frame > 0).then_some(frame + 1)),
            base: to_u8(g),
            cam,
            rows: g.height as u32,
            cols: g.width as u32,
            label: format!("MR slice {}", sl + 1),
        });
    }
    Ok(out)
}

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
    let engine = crate::inference::Engine::start(weights, device, 1)?;
    let cfg = engine.config();
    let grid = InputGrid {
        mri: cfg.mri.img_size,
        image: cfg.us.img_size,
    };
    let files = crate::send::collect_files(&[dir.to_path_buf()]);
    let prepared: Vec<PreparedCase> = imaging::prepare_case_sides(&files, imaging_settings, grid)
        .into_iter()
        .filter(|p| p.modality_flags().iter().any(|f| *f))
        .collect();
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
        .map(|(p, s)| {
            serde_json::json!({
                "lesion_side": p.lesion_side.side.map(|s| format!("{s:?}")),
                "lesion_side_basis": p.lesion_side.detail,
                "flags": { "us": p.modality_flags()[0], "mri": p.modality_flags()[1], "mg": p.modality_flags()[2] },
                "prob": s.prob,
                "logits": s.logits,
                "branch_probs": { "us": s.branch_probs[0], "mri": s.branch_probs[1], "mg": s.branch_probs[2] },
                "selections": p.selections.iter().map(|sel| serde_json::json!({
                    "modality": format!("{:?}", sel.modality),
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
        })
        .collect();
    Ok(serde_json::json!({
        "weights_sha256": response.weights_sha256,
        "grid": { "mri": grid.mri, "image": grid.image },
        "compute_ms": response.compute_ms,
        "sides": sides,
    }))
}

/// Write a request's tensors in the fixtures' safetensors layout; an absent
/// branch is left out (replay it with its flag 0).
fn dump_inputs(request: &InferRequest, path: &Path) -> Result<(), PipelineError> {
    let entries = [
        ("input.mri", request.mri.as_ref()),
        ("input.us", request.us.as_ref()),
        ("input.mg", request.mg.as_ref()),
        ("input.clinical", Some(&request.clinical)),
    ];
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = entries
        .into_iter()
        .filter_map(|(k, t)| t.map(|t| (k, t)))
        .map(|(k, t)| {
            (
                k.to_string(),
                t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                t.shape.clone(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(k, data, shape)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|v| (k.clone(), v))
                .map_err(|e| PipelineError::Other(e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| PipelineError::Other(e.to_string()))
}
