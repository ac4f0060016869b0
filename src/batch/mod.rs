//! `her2map batch`: the node's imaging and inference over a hospital's past
//! cases, read from folders instead of received — for site validation
//! (`her2map evaluate`). Grouping ([`scan`]) follows the node's case rules;
//! each case runs through the pipeline's own stages (imaging, the batched
//! request, the engine); the results go to a CSV and a JSON lines file
//! ([`results`]). Owns no stage's logic and touches no database.
//!
//! Throughput and memory: `jobs` imaging workers feed a channel of `jobs`
//! slots that the one engine drains, so the next cases are imaged while
//! the current one is inferred, and at most `2 × jobs + 1` cases are held
//! in memory whatever the size of the batch.

pub mod csv;
pub mod results;
pub mod scan;

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::Instant;

use serde::Serialize;

use crate::config::Settings;
use crate::imaging::{self, InputGrid, Modality, PreparedCase};
use crate::inference::{EngineHandle, InferResponse};
use crate::pipeline::{self, PipelineError};
use results::Row;
use scan::BatchCase;

/// What `her2map batch` was asked to do.
#[derive(Debug, Clone)]
pub struct BatchOptions {
    pub inputs: Vec<PathBuf>,
    /// The results CSV; the detail goes beside it as `.jsonl`.
    pub out: PathBuf,
    /// Imaging workers (cases imaged at once).
    pub jobs: usize,
    /// Leave Patient ID and accession numbers out of the results.
    pub no_phi: bool,
    pub weights: PathBuf,
    pub device: String,
    /// Draw a progress bar (only drawn on a terminal).
    pub progress: bool,
}

/// What a batch did, and where its time went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BatchSummary {
    pub cases: usize,
    /// Already in the results with the same inputs and weights.
    pub skipped: usize,
    pub done: usize,
    pub failed: usize,
    pub unreadable_files: usize,
    pub weights_sha256: String,
    /// Reading every file's header and grouping, once; loading the weights.
    pub scan_ms: f64,
    pub load_ms: f64,
    /// Summed over cases: imaging (decode, selection, resampling) on the
    /// workers (overlapping inference, so the sums can exceed the wall
    /// time), inference on the engine, writing the rows.
    pub imaging_ms: f64,
    pub inference_ms: f64,
    pub writing_ms: f64,
    pub wall_ms: f64,
    pub cases_per_minute: f64,
    /// Peak resident set size of the process (VmHWM), kB; 0 where unknown.
    pub peak_rss_kb: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("{0}")]
    Model(#[from] crate::model::ModelError),
    #[error("results file: {0}")]
    Io(#[from] std::io::Error),
    #[error("no DICOM instance found under the given folders")]
    Empty,
}

/// A case after imaging, on its way to the engine.
struct Imaged {
    case: BatchCase,
    prepared: std::thread::Result<Vec<PreparedCase>>,
    imaging_ms: f64,
}

/// Run the batch (blocking: call it off any async runtime).
pub fn run_batch(opts: &BatchOptions, settings: &Settings) -> Result<BatchSummary, BatchError> {
    let t0 = Instant::now();
    let (cases, unreadable) = scan::scan(
        &opts.inputs,
        settings.cases.patient_key,
        settings.cases.window_days,
    );
    if !unreadable.is_empty() {
        // Paths can carry names (folders named after patients): they go to
        // a file beside the results, not to the log.
        let list = results::unreadable_path(&opts.out);
        results::write_unreadable(&list, &unreadable)?;
        tracing::warn!(files = unreadable.len(), list = %list.display(), "files that are not readable DICOM instances were skipped");
    }
    if cases.is_empty() {
        return Err(BatchError::Empty);
    }
    let scan_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t_load = Instant::now();
    let engine = crate::inference::Engine::start(&opts.weights, &opts.device, Default::default())?;
    let load_ms = t_load.elapsed().as_secs_f64() * 1e3;
    let grid = pipeline::input_grid(engine.config());
    let ctx = Context {
        opts,
        settings,
        grid,
        engine,
    };
    let (todo, kept) = ctx.resume(cases)?;
    let mut summary = BatchSummary {
        cases: todo.len() + kept.len(),
        skipped: kept.len(),
        unreadable_files: unreadable.len(),
        weights_sha256: ctx.engine.weights_sha256().to_string(),
        scan_ms,
        load_ms,
        ..Default::default()
    };
    let mut writer = results::Writer::start(&opts.out, &kept)?;
    let bar = progress_bar(opts.progress, todo.len());
    ctx.run_all(todo, |imaged| {
        let (row, detail, infer_ms) = ctx.finish_case(imaged);
        let t = Instant::now();
        writer.append(&row, &detail)?;
        summary.writing_ms += t.elapsed().as_secs_f64() * 1e3;
        summary.inference_ms += infer_ms;
        summary.imaging_ms += detail["times"]["imaging_ms"].as_f64().unwrap_or(0.0);
        if row.get("error").is_empty() {
            summary.done += 1;
        } else {
            summary.failed += 1;
        }
        bar.inc(1);
        Ok(())
    })?;
    bar.finish_and_clear();
    summary.wall_ms = t0.elapsed().as_secs_f64() * 1e3;
    let ran = summary.done + summary.failed;
    summary.cases_per_minute = ran as f64 / (summary.wall_ms / 60_000.0).max(1e-9);
    summary.peak_rss_kb = peak_rss_kb();
    Ok(summary)
}

fn progress_bar(enabled: bool, len: usize) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    // indicatif draws on stderr only when it is a terminal.
    let bar = indicatif::ProgressBar::new(len as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {pos}/{len} cases  {per_sec}  ETA {eta}  {msg}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Peak resident set size (Linux: VmHWM of /proc/self/status), kB.
pub fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

struct Context<'a> {
    opts: &'a BatchOptions,
    settings: &'a Settings,
    grid: InputGrid,
    engine: EngineHandle,
}

impl Context<'_> {
    /// The digest a row must carry to be kept on a rerun: the case's files,
    /// the imaging settings and the threshold.
    fn inputs_digest(&self, case: &BatchCase) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(case.files_digest.as_bytes());
        h.update(format!("{:?}", self.settings.imaging).as_bytes());
        h.update(self.settings.report.threshold.to_le_bytes());
        hex::encode(h.finalize())
    }

    /// Split the cases into those to run and the rows (with their detail
    /// lines) kept from an earlier run: same case, inputs and weights, and
    /// no error (a failed case is tried again).
    #[allow(clippy::type_complexity)]
    fn resume(
        &self,
        cases: Vec<BatchCase>,
    ) -> Result<(Vec<BatchCase>, Vec<(Row, Option<String>)>), BatchError> {
        let old = results::read_rows(&self.opts.out)?;
        let mut details = results::read_details(&results::jsonl_path(&self.opts.out))?;
        let weights = self.engine.weights_sha256();
        let mut todo = Vec::new();
        let mut kept = Vec::new();
        for case in cases {
            let digest = self.inputs_digest(&case);
            let done = old.iter().find(|r| {
                r.get("case_id") == case.case_id
                    && r.get("inputs_sha256") == digest
                    && r.get("weights_sha256") == weights
                    && r.get("error").is_empty()
            });
            match done {
                Some(row) => kept.push((row.clone(), details.remove(&case.case_id))),
                None => todo.push(case),
            }
        }
        Ok((todo, kept))
    }

    /// Image on `jobs` workers and hand each imaged case to `sink` on this
    /// thread (the engine's client), in the order imaging finishes.
    fn run_all(
        &self,
        todo: Vec<BatchCase>,
        mut sink: impl FnMut(Imaged) -> Result<(), BatchError>,
    ) -> Result<(), BatchError> {
        let jobs = self.opts.jobs.max(1);
        let queue = Mutex::new(todo.into_iter());
        let (tx, rx) = mpsc::sync_channel::<Imaged>(jobs);
        std::thread::scope(|s| {
            for _ in 0..jobs {
                let tx = tx.clone();
                let queue = &queue;
                s.spawn(move || {
                    loop {
                        let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
                        let Some(case) = next else { return };
                        if tx.send(self.image(case)).is_err() {
                            return; // the consumer stopped
                        }
                    }
                });
            }
            drop(tx);
            let mut result = Ok(());
            for imaged in rx.iter() {
                if let Err(e) = sink(imaged) {
                    result = Err(e);
                    break;
                }
            }
            if result.is_err() {
                // Let the workers see the closed channel.
                queue
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .by_ref()
                    .for_each(drop);
            }
            drop(rx);
            result
        })
    }

    fn image(&self, case: BatchCase) -> Imaged {
        let t = Instant::now();
        let prepared = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            imaging::prepare_case_sides(&case.files, &self.settings.imaging, self.grid)
        }));
        Imaged {
            case,
            prepared,
            imaging_ms: t.elapsed().as_secs_f64() * 1e3,
        }
    }

    /// Inference of an imaged case and its row and detail line; a failure
    /// is the row's `error`. Returns the inference milliseconds too.
    fn finish_case(&self, imaged: Imaged) -> (Row, serde_json::Value, f64) {
        let Imaged {
            case,
            prepared,
            imaging_ms,
        } = imaged;
        let mut row = self.base_row(&case);
        let mut detail = serde_json::json!({
            "case_id": case.case_id,
            "files": case.files.len(),
            "study_dates": [case.study_dates.0, case.study_dates.1],
        });
        let t = Instant::now();
        let outcome = match prepared {
            Ok(all) => self.infer(all),
            Err(_) => Err((PipelineError::Other("imaging panicked".into()), Vec::new())),
        };
        let infer_ms = t.elapsed().as_secs_f64() * 1e3;
        detail["times"] = serde_json::json!({ "imaging_ms": imaging_ms, "inference_ms": infer_ms });
        match outcome {
            Ok((prepared, response, errors)) => {
                fill_result(
                    &mut row,
                    &prepared,
                    &response,
                    self.settings.report.threshold,
                );
                detail["instance_errors"] = errors.into();
                detail["sides"] = prepared
                    .iter()
                    .zip(&response.samples)
                    .map(|(p, s)| {
                        let mut side = pipeline::folder::side_json(p, s);
                        if self.opts.no_phi {
                            // Paths can carry names: the instance instead.
                            side["errors"] = p.errors.iter().map(|e| self.error_text(e)).collect();
                        }
                        side
                    })
                    .collect::<Vec<_>>()
                    .into();
            }
            Err((e, errors)) => {
                row.set("status", "failed");
                row.set("error", e.to_string());
                detail["instance_errors"] = errors.into();
            }
        }
        for c in results::COLUMNS {
            detail[c] = row.get(c).into();
        }
        (row, detail, infer_ms)
    }

    /// A per-instance error as the detail states it: with its file, or with
    /// `--no-phi` its SOP Instance UID (paths can carry names), as the
    /// node's audit events do.
    fn error_text(&self, e: &imaging::InstanceError) -> String {
        if self.opts.no_phi {
            format!(
                "{}: {}",
                e.sop_instance_uid.as_deref().unwrap_or("?"),
                e.message
            )
        } else {
            format!("{}: {}", e.file.display(), e.message)
        }
    }

    fn base_row(&self, case: &BatchCase) -> Row {
        let mut row = Row::default();
        row.set("case_id", &case.case_id);
        row.set("patient_key", &case.patient_key);
        if !self.opts.no_phi {
            row.set("patient_id", &case.patient_id);
            row.set("accession_numbers", case.accession_numbers.join(";"));
        }
        row.set(
            "study_dates",
            format!("{}-{}", case.study_dates.0, case.study_dates.1),
        );
        row.set("instances", case.files.len().to_string());
        row.set("threshold", self.settings.report.threshold.to_string());
        row.set("weights_sha256", self.engine.weights_sha256());
        row.set("inputs_sha256", self.inputs_digest(case));
        row
    }

    /// The pipeline's stages after imaging: the usable sides, the request,
    /// the engine. The instance errors go with the result either way.
    #[allow(clippy::type_complexity)]
    fn infer(
        &self,
        all: Vec<PreparedCase>,
    ) -> Result<(Vec<PreparedCase>, InferResponse, Vec<String>), (PipelineError, Vec<String>)> {
        let errors: Vec<String> = all
            .iter()
            .flat_map(|p| p.errors.iter())
            .map(|e| self.error_text(e))
            .collect();
        let prepared = pipeline::usable_sides(all);
        if prepared.is_empty() {
            let why = if errors.is_empty() {
                "no image could be selected".to_string()
            } else {
                errors.join("; ")
            };
            return Err((PipelineError::NoInput(why), errors));
        }
        let run = || -> Result<InferResponse, PipelineError> {
            let request = pipeline::request::build_request(&prepared, self.grid)?;
            Ok(self.engine.infer_blocking(request)?)
        };
        match run() {
            Ok(response) => Ok((prepared, response, errors)),
            Err(e) => Err((e, errors)),
        }
    }
}

/// The result columns of a row. With both sides run (lesion side unknown),
/// the row is the side with the higher probability and `lesion_side` says
/// `unknown`; the detail line has both.
fn fill_result(row: &mut Row, prepared: &[PreparedCase], response: &InferResponse, threshold: f32) {
    let Some((i, best)) = response
        .samples
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.prob.total_cmp(&b.1.prob))
    else {
        return;
    };
    let p = &prepared[i];
    let side = match (prepared.len(), p.lesion_side.side) {
        (1, Some(imaging::Laterality::Left)) => "L",
        (1, Some(imaging::Laterality::Right)) => "R",
        _ => "unknown",
    };
    let have = p.modalities();
    let names = |ms: Vec<Modality>| ms.iter().map(|m| m.as_str()).collect::<Vec<_>>().join("+");
    row.set("lesion_side", side);
    row.set("modalities_used", names(have.present().collect()));
    row.set("modalities_missing", names(have.absent().collect()));
    row.set("prob", best.prob.to_string());
    for m in [Modality::MG, Modality::US, Modality::MR] {
        let v = best.branch_probs[m.branch()]
            .map(|v| v.to_string())
            .unwrap_or_default();
        row.set(&format!("prob_{}", m.key()), v);
    }
    let positive = best.prob >= threshold;
    row.set("status", if positive { "positive" } else { "negative" });
}
