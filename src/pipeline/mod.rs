//! The node's main job for one ready case: stored instances → imaging →
//! inference engine → SR + heatmaps → outbox. Runs off the network path; the
//! cases queued together (at most the engine's `max_batch`, 1 on the CPU)
//! run at once, so that their requests can share a forward pass on a GPU.
//! Imaging runs on the blocking pool (rayon inside), inference on the
//! engine's own thread. Every step is an audit event carrying the case id.
//!
//! The stages, each a module: [`prepare`] (imaging, and its early run during
//! the stable age), [`request`] (the batched model input), the engine
//! (`crate::inference`), [`reporting`] and [`heatmap`] (the objects of each
//! side), [`outputs`] (durable files). [`folder`] runs the same stages for
//! `her2map infer DIR`. This module orchestrates; it holds no stage's logic.

pub(crate) mod folder;
mod heatmap;
mod outputs;
mod prepare;
mod reporting;
pub(crate) mod request;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::join_all;

use serde::Serialize;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::cases::{CaseJob, CaseState};
use crate::db::{CaseRow, Db, NewEvent, OutputRow};
use crate::imaging::{ImagingSettings, InputGrid, PreparedCase};
use crate::inference::{EngineHandle, InferRequest, InferResponse};
use crate::model::MapConfig;
use crate::report::{self, OutputKind, ReportSettings};

pub use folder::infer_dicom_folder;
pub use prepare::Speculation;
use reporting::ReportJob;

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
/// How long the first case of a wave waits for others when batches can
/// hold more than one: the cases of one assembler round are claimed one by
/// one (a database write each). Small beside a case's imaging.
pub const WAVE_GATHER: std::time::Duration = std::time::Duration::from_millis(250);

/// A case imaged and ready for the engine.
struct Imaged {
    case: CaseRow,
    prepared: Vec<PreparedCase>,
    errors: Vec<String>,
    times: StageTimes,
    digest: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StageTimes {
    pub imaging_ms: f64,
    pub inference_ms: f64,
    pub reporting_ms: f64,
}

impl StageTimes {
    /// Into the stage-duration metric.
    fn observe(&self) {
        let m = &crate::metrics::METRICS.stage_seconds;
        m.observe_secs(&["imaging"], self.imaging_ms / 1e3);
        m.observe_secs(&["inference"], self.inference_ms / 1e3);
        m.observe_secs(&["reporting"], self.reporting_ms / 1e3);
    }
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

impl Pipeline {
    /// Take cases from the queue (and preparation hints) until shutdown: a
    /// wave of the cases queued now (and within [`WAVE_GATHER`] of the
    /// first), at most the engine's `max_batch`, runs at once and ends
    /// before the next (or shutdown) is looked at. With `max_batch = 1` (the
    /// CPU) a wave is one case and nothing waits.
    pub async fn run(mut self, mut jobs: mpsc::Receiver<CaseJob>, shutdown: CancellationToken) {
        let mut hints = self.prepare_hints.take();
        let wave_max = self.engine.max_batch().max(1);
        loop {
            tokio::select! {
                j = jobs.recv() => match j {
                    Some(first) => {
                        let mut wave = vec![first];
                        // The cases one assembler round readies arrive one
                        // claim after another: wait a moment for them.
                        let until = tokio::time::Instant::now() + WAVE_GATHER;
                        while wave.len() < wave_max {
                            match tokio::time::timeout_at(until, jobs.recv()).await {
                                Ok(Some(job)) => wave.push(job),
                                _ => break,
                            }
                        }
                        self.process(&wave).await;
                    }
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

    /// Run a wave of cases: each starts and is imaged on its own, their
    /// requests go to the engine together (so that they can share a
    /// forward pass), and each is reported on its own. A failure ends that
    /// case in `failed` with the reason; the others go on.
    pub async fn process(&self, jobs: &[CaseJob]) {
        let started = join_all(jobs.iter().map(|job| self.start(job))).await;
        let (ready, requests): (Vec<Imaged>, Vec<_>) = started.into_iter().flatten().unzip();
        if ready.is_empty() {
            return;
        }
        let t = Instant::now();
        let responses = self.engine.infer_many(requests).await;
        let inference_ms = t.elapsed().as_secs_f64() * 1e3;
        join_all(
            ready
                .into_iter()
                .zip(responses)
                .map(|(mut case, response)| async move {
                    case.times.inference_ms = inference_ms;
                    let id = case.case.id.clone();
                    let done = match response {
                        Ok(r) => self.complete(case, r).await,
                        Err(e) => Err(e.into()),
                    };
                    if let Err(e) = done {
                        self.fail(&id, e).await;
                    }
                }),
        )
        .await;
    }

    /// Claim the queued case, image it and build its request; `None` when
    /// it is not to run (held meanwhile, failed, or an amendment that
    /// changes nothing).
    async fn start(&self, job: &CaseJob) -> Option<(Imaged, InferRequest)> {
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
            Ok(false) => return None, // held or changed by an operator meanwhile
            Err(e) => {
                error!(case = %job.case_id, error = %e, "case could not start");
                return None;
            }
        }
        match self.image_case(job).await {
            Ok(imaged) => imaged,
            Err(e) => {
                self.fail(&job.case_id, e).await;
                None
            }
        }
    }

    /// End a running case in `failed`, with the reason as its event.
    async fn fail(&self, case_id: &str, e: PipelineError) {
        warn!(case = %case_id, error = %e, "case failed");
        let reason = e.to_string();
        self.audit(
            case_id,
            event::CASE_FAILED,
            serde_json::json!({ "reason": reason }),
        )
        .await;
        let _ = self
            .db
            .transition_case(
                case_id,
                CaseState::Running,
                CaseState::Failed,
                &reason,
                self.clock.now(),
            )
            .await;
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

    /// The stages before inference: imaging and the amendment check; the
    /// case's request for the engine (every side, both when the side is
    /// unknown, in one request).
    async fn image_case(
        &self,
        job: &CaseJob,
    ) -> Result<Option<(Imaged, InferRequest)>, PipelineError> {
        let case = self
            .db
            .case(&job.case_id)
            .await?
            .ok_or_else(|| PipelineError::Other("case vanished".into()))?;
        let mut times = StageTimes::default();
        let (prepared, errors) = self.image(&case, &mut times).await?;

        // The amendment check: a rerun that selects the same inputs makes no
        // new result.
        let digest = request::inputs_digest(&prepared);
        if case.revision > 0 && digest == case.inputs_digest {
            let reason = "late instances did not change the selected inputs: no new result";
            self.db
                .transition_case(
                    &case.id,
                    CaseState::Running,
                    CaseState::Done,
                    reason,
                    self.clock.now(),
                )
                .await?;
            return Ok(None);
        }
        let request = request::build_request(&prepared, self.grid())?;
        let imaged = Imaged {
            case,
            prepared,
            errors,
            times,
            digest,
        };
        Ok(Some((imaged, request)))
    }

    /// The stages after inference: its event, reporting, the result and the
    /// case's next state.
    async fn complete(&self, c: Imaged, response: InferResponse) -> Result<(), PipelineError> {
        let Imaged {
            case,
            prepared,
            errors,
            mut times,
            digest,
        } = c;
        self.audit(
            &case.id,
            event::CASE_INFERENCE_DONE,
            serde_json::json!({
                "ms": times.inference_ms,
                "compute_ms": response.compute_ms,
                "probs": response.samples.iter().map(|s| s.prob).collect::<Vec<_>>(),
                "weights_sha256": response.weights_sha256,
                "device": response.device,
                "device_name": response.device_name,
                "batch_requests": response.batch_requests,
            }),
        )
        .await;
        let t = Instant::now();
        let (results, rows) = self.report(&case, prepared, response).await?;
        times.reporting_ms = t.elapsed().as_secs_f64() * 1e3;
        times.observe();
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
        self.finish(&case, &results, rows.len()).await
    }

    /// Imaging (perhaps done already during the stable age), its audit event,
    /// and the sides that have at least one input; with the per-instance
    /// errors as the events state them.
    async fn image(
        &self,
        case: &CaseRow,
        times: &mut StageTimes,
    ) -> Result<(Vec<PreparedCase>, Vec<String>), PipelineError> {
        let files = self.member_files(&self.db.case_members(&case.id).await?);
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
                "flags": prepared.iter().map(|p| p.modalities()).collect::<Vec<_>>(),
                "errors": errors,
                "notes": prepared.iter().flat_map(|p| p.notes.clone()).collect::<Vec<_>>(),
            }),
        )
        .await;
        let prepared = usable_sides(prepared);
        if prepared.is_empty() {
            return Err(PipelineError::NoInput(if errors.is_empty() {
                "no image could be selected".into()
            } else {
                errors.join("; ")
            }));
        }
        Ok((prepared, errors))
    }

    /// Reporting: SR + heatmaps per side (file reads and pixel work on the
    /// blocking pool), written durably, then queued for every destination.
    async fn report(
        &self,
        case: &CaseRow,
        prepared: Vec<PreparedCase>,
        response: InferResponse,
    ) -> Result<(Vec<SideResult>, Vec<OutputRow>), PipelineError> {
        let job = ReportJob {
            case_id: case.id.clone(),
            revision: case.revision,
            identity: self.identity.clone(),
            settings: self.report.clone(),
            predecessors: self.predecessors(&case.id, case.revision).await?,
            now: self.clock.now(),
        };
        let (results, written) =
            tokio::task::spawn_blocking(move || job.build(&prepared, &response))
                .await
                .map_err(|e| PipelineError::Other(e.to_string()))??;
        let (data_dir, case_id, revision) = (self.data_dir.clone(), case.id.clone(), case.revision);
        let rows = tokio::task::spawn_blocking(move || {
            outputs::write_outputs(&data_dir, &case_id, revision, written)
        })
        .await
        .map_err(|e| PipelineError::Other(e.to_string()))??;
        for row in &rows {
            let dests = crate::outbox::destinations_for(&self.destinations, row.kind);
            self.db.add_output(row, &dests, self.clock.now()).await?;
        }
        self.outbox_wake.notify_waiters();
        Ok((results, rows))
    }

    /// The case's next state: done, or reopened when instances arrived while
    /// it ran.
    async fn finish(
        &self,
        case: &CaseRow,
        results: &[SideResult],
        objects: usize,
    ) -> Result<(), PipelineError> {
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
        info!(case = %case.id, %summary, outputs = objects, "case result");
        let now = self.clock.now();
        let latest = self.db.case(&case.id).await?.map(|c| c.last_instance_at);
        if latest.as_deref() != Some(case.last_instance_at.as_str()) {
            self.db
                .reopen_case(
                    &case.id,
                    CaseState::Running,
                    "instances arrived while the case ran",
                    now,
                )
                .await?;
        } else {
            let reason = format!("result: {summary}; {objects} objects queued");
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

/// The model's input grid (MODEL.md "Inputs"): from the loaded checkpoint.
pub(crate) fn input_grid(cfg: &MapConfig) -> InputGrid {
    InputGrid {
        mri: cfg.mri.img_size,
        image: cfg.us.img_size,
    }
}

/// The sides that have at least one modality's input: only those run.
pub(crate) fn usable_sides(prepared: Vec<PreparedCase>) -> Vec<PreparedCase> {
    prepared
        .into_iter()
        .filter(|p| !p.modalities().is_empty())
        .collect()
}
