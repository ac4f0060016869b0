//! The early preparation: imaging of a complete case started while it waits
//! for its stable age, kept for the run when its files are still the same
//! (see [`Speculation`]); and the imaging job itself, on the blocking pool.

use std::path::PathBuf;
use std::time::Instant;

use tracing::{debug, warn};

use super::{Pipeline, PipelineError};
use crate::imaging::{self, InputGrid, PreparedCase};

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

impl Pipeline {
    /// The files imaging reads for a case: every member, in received order.
    pub(super) fn member_files(&self, members: &[crate::db::CaseMember]) -> Vec<PathBuf> {
        let spool = self.data_dir.join("spool");
        members.iter().map(|m| spool.join(&m.path)).collect()
    }

    pub(super) fn grid(&self) -> InputGrid {
        super::input_grid(self.engine.config())
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
    pub(super) async fn speculate(&self, case_id: &str) {
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
    pub(super) async fn prepared(
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
}
