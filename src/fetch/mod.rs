//! Query/retrieve of what a case lacks (issue 17): the worker that runs the
//! fetches the case assembler plans (when a case opens, and before it runs
//! or times out with a required modality missing), one source at a time
//! per source and all sources at once, off the network path. Each source is
//! asked for the patient's studies (study level, then series level), its
//! answers are validated on the identifiers ([`select`]), and only the
//! series that could complete the case are retrieved (C-MOVE to the node's
//! own AE, C-GET, or WADO-RS: [`dimse`], [`dicomweb`]); what arrives goes
//! through ingest like any C-STORE. A source that is down, refuses or fails only records its
//! attempt: the case goes on with what it has.
//!
//! Several nodes: a fetch is a row claimed with a lease (`db::fetch`), so
//! one node does it; the limit of retrieves per source is per node.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use regex::Regex;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::cases::{CaseRules, PatientKeyMode, rules};
use crate::clock::Clock;
use crate::config::{FetchSettings, SourceSettings};
use crate::db::{Db, FetchAttempt, FetchJob, NewEvent, fetch_event, format_time, parse_time};
use crate::dimse::client::ClientTls;
use crate::ingest::Ingest;
use crate::modality::Modality;

mod dicomweb;
mod dimse;
pub mod select;

use select::{CaseScope, Patient};

/// The longest the worker sleeps without looking for planned fetches.
const POLL: Duration = Duration::from_secs(1);

/// One configured source, ready to use.
pub struct Source {
    pub settings: SourceSettings,
    pub name: String,
    tls: Option<ClientTls>,
    /// Retrieves at once from this source (on this node).
    permits: Arc<Semaphore>,
    timeout: Duration,
}

/// Everything a fetch needs, shared by its tasks.
pub struct Fetcher {
    db: Db,
    clock: Clock,
    ingest: Ingest,
    spool_dir: PathBuf,
    settings: FetchSettings,
    sources: Vec<Arc<Source>>,
    rules: CaseRules,
    key_mode: PatientKeyMode,
    window_days: i64,
    /// The node's AE title (C-GET's called AE) and C-MOVE's destination.
    node_ae: String,
    move_destination: String,
    pre_patterns: Vec<Regex>,
    post_patterns: Vec<Regex>,
    /// The assembler's wake-up: a finished fetch lets a waiting case go on.
    assembler_wake: Arc<Notify>,
    lease: Duration,
}

/// What [`Fetcher::new`] is built from.
pub struct FetcherParts {
    pub db: Db,
    pub clock: Clock,
    pub ingest: Ingest,
    pub spool_dir: PathBuf,
    pub settings: FetchSettings,
    pub sources: Vec<SourceSettings>,
    pub rules: CaseRules,
    pub key_mode: PatientKeyMode,
    pub window_days: i64,
    pub node_ae: String,
    pub pre_patterns: Vec<String>,
    pub post_patterns: Vec<String>,
    pub assembler_wake: Arc<Notify>,
}

/// The outcome of one source's attempt.
#[derive(Debug, Clone, Default)]
struct Outcome {
    status: &'static str,
    matches: i64,
    series_requested: i64,
    instances_received: i64,
    reason: String,
}

impl Outcome {
    fn failed(reason: impl Into<String>) -> Outcome {
        Outcome {
            status: "failed",
            reason: reason.into(),
            ..Default::default()
        }
    }

    /// The series the source holds could not complete the case.
    fn nothing(matches: i64, studies: usize, series: usize) -> Outcome {
        Outcome {
            status: "nothing",
            matches,
            reason: format!("{studies} studies, {series} series: none could complete the case"),
            ..Default::default()
        }
    }

    /// After the retrieves: ok when no series had a problem, else partial
    /// or failed by whether anything arrived.
    fn retrieved(matches: i64, requested: usize, received: i64, problems: &[String]) -> Outcome {
        Outcome {
            status: match (problems.is_empty(), received) {
                (true, _) => "ok",
                (false, 0) => "failed",
                (false, _) => "partial",
            },
            matches,
            series_requested: requested as i64,
            instances_received: received,
            reason: problems.join("; "),
        }
    }
}

/// The facts of the case a source attempt works from.
pub(crate) struct Want {
    pub case_id: String,
    pub patient_key: String,
    pub scope: CaseScope,
    pub missing: Vec<Modality>,
    pub held_series: BTreeSet<String>,
}

impl Fetcher {
    pub fn new(p: FetcherParts) -> anyhow::Result<Self> {
        let compile = |pats: &[String]| -> anyhow::Result<Vec<Regex>> {
            pats.iter()
                .map(|s| Regex::new(s).map_err(|e| anyhow::anyhow!("pattern {s:?}: {e}")))
                .collect()
        };
        let mut sources = Vec::new();
        for s in p.sources {
            let tls = s
                .tls
                .as_ref()
                .map(|t| crate::dimse::tls::client_tls(t, &s.host, &crate::dimse::tls::SOURCE_KEYS))
                .transpose()?;
            let n = if s.max_retrieves == 0 {
                p.settings.max_retrieves_per_source
            } else {
                s.max_retrieves
            };
            let timeout = Duration::from_secs(if s.timeout_secs == 0 {
                p.settings.timeout_secs
            } else {
                s.timeout_secs
            });
            sources.push(Arc::new(Source {
                name: s.name(),
                settings: s,
                tls,
                permits: Arc::new(Semaphore::new(n.max(1))),
                timeout,
            }));
        }
        let move_destination = if p.settings.move_destination.trim().is_empty() {
            p.node_ae.clone()
        } else {
            p.settings.move_destination.trim().to_string()
        };
        // A fetch holds its case for at most a source's whole time, plus
        // the bookkeeping.
        let lease = Duration::from_secs(p.settings.source_timeout_secs + 30);
        Ok(Fetcher {
            db: p.db,
            clock: p.clock,
            ingest: p.ingest,
            spool_dir: p.spool_dir,
            pre_patterns: compile(&p.pre_patterns)?,
            post_patterns: compile(&p.post_patterns)?,
            settings: p.settings,
            sources,
            rules: p.rules,
            key_mode: p.key_mode,
            window_days: p.window_days,
            node_ae: p.node_ae,
            move_destination,
            assembler_wake: p.assembler_wake,
            lease,
        })
    }

    /// Claim and run planned fetches until `shutdown`; each runs as its own
    /// task, so a slow source never holds up another case.
    pub async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        match this.db.requeue_own_fetches(this.clock.now()).await {
            Ok(0) => {}
            Ok(n) => info!(
                fetches = n,
                "unfinished fetches queued again after a restart"
            ),
            Err(e) => error!(error = %e, "requeueing unfinished fetches failed"),
        }
        let tracker = TaskTracker::new();
        loop {
            loop {
                let now = this.clock.now();
                let job = match this.db.claim_fetch(now + this.lease, now).await {
                    Ok(Some(job)) => job,
                    Ok(None) => break,
                    Err(e) => {
                        error!(error = %e, "claiming a fetch failed");
                        break;
                    }
                };
                let (t, stop) = (this.clone(), shutdown.clone());
                tracker.spawn(async move {
                    tokio::select! {
                        _ = t.run_job(&job) => {}
                        // The claim lapses and another node (or this one
                        // after its restart) takes the fetch over.
                        _ = stop.cancelled() => {}
                    }
                });
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        tracker.close();
        tracker.wait().await;
    }

    async fn run_job(self: &Arc<Self>, job: &FetchJob) {
        let outcome = match self.want(job).await {
            Ok(Some(want)) => self.run_sources(job, Arc::new(want)).await,
            Ok(None) => "nothing missing".to_string(),
            Err(e) => {
                warn!(case = %job.case_id, error = %e, "fetch could not start");
                format!("not started: {e}")
            }
        };
        if let Err(e) = self
            .db
            .finish_fetch(&job.id, &outcome, self.clock.now())
            .await
        {
            error!(fetch = %job.id, error = %e, "finishing a fetch failed");
        }
        info!(case = %job.case_id, trigger = %job.trigger, %outcome, "fetch done");
        self.assembler_wake.notify_waiters();
    }

    /// What the case lacks and whose it is; `None` when it lacks nothing.
    async fn want(&self, job: &FetchJob) -> anyhow::Result<Option<Want>> {
        let case = self
            .db
            .case(&job.case_id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no such case"))?;
        let members = self.db.case_members(&job.case_id).await?;
        let c = rules::completeness(&members, &self.rules);
        let missing: Vec<Modality> = c.missing.iter().map(|(m, _)| *m).collect();
        if missing.is_empty() {
            return Ok(None);
        }
        let first = members
            .first()
            .ok_or_else(|| anyhow::anyhow!("the case has no instance"))?;
        let path = self.spool_dir.join(&first.path);
        let patient = tokio::task::spawn_blocking(move || read_patient(&path)).await??;
        Ok(Some(Want {
            case_id: job.case_id.clone(),
            patient_key: case.patient_key.clone(),
            scope: CaseScope {
                patient,
                key_mode: self.key_mode,
                oldest: case.oldest_study_date.clone(),
                newest: case.newest_study_date.clone(),
                window_days: self.window_days,
            },
            missing,
            held_series: members
                .iter()
                .map(|m| m.series_instance_uid.clone())
                .collect(),
        }))
    }

    /// Every source at once; a summary of what each did.
    async fn run_sources(self: &Arc<Self>, job: &FetchJob, want: Arc<Want>) -> String {
        let names: Vec<String> = self.sources.iter().map(|s| s.name.clone()).collect();
        let now = self.clock.now();
        if let Err(e) = self
            .db
            .renew_fetch(&job.id, &names.join(", "), now + self.lease, now)
            .await
        {
            warn!(error = %e, "recording the fetch's sources failed");
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (i, source) in self.sources.iter().enumerate() {
            let (this, source, job, want) =
                (self.clone(), source.clone(), job.clone(), want.clone());
            tasks.spawn(async move { (i, this.attempt(&source, &job, &want).await) });
        }
        let mut statuses = vec!["failed"; names.len()];
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok((i, o)) => statuses[i] = o.status,
                Err(e) => error!(error = %e, "a fetch attempt task failed"),
            }
        }
        names
            .iter()
            .zip(statuses)
            .map(|(n, s)| format!("{n}: {s}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// One source: skipped when it was asked about this patient too
    /// recently, bounded by `source_timeout_secs`, recorded whatever happens.
    async fn attempt(&self, source: &Source, job: &FetchJob, want: &Want) -> Outcome {
        let started = self.clock.now();
        let outcome = match self.too_recent(source, want).await {
            Some(reason) => Outcome {
                status: "skipped",
                reason,
                ..Default::default()
            },
            None => {
                let limit = Duration::from_secs(self.settings.source_timeout_secs);
                let run = async {
                    let _permit = source.permits.acquire().await;
                    if source.settings.dicomweb.is_some() {
                        dicomweb::attempt(self, source, want).await
                    } else {
                        dimse::attempt(self, source, want).await
                    }
                };
                match tokio::time::timeout(limit, run).await {
                    Ok(o) => o,
                    Err(_) => {
                        Outcome::failed(format!("source_timeout_secs ({}) passed", limit.as_secs()))
                    }
                }
            }
        };
        let now = self.clock.now();
        let attempt = FetchAttempt {
            fetch_id: job.id.clone(),
            case_id: want.case_id.clone(),
            patient_key: want.patient_key.clone(),
            source: source.name.clone(),
            started_at: format_time(started),
            finished_at: format_time(now),
            status: outcome.status.to_string(),
            matches: outcome.matches,
            series_requested: outcome.series_requested,
            instances_received: outcome.instances_received,
            detail: outcome.reason.clone(),
        };
        let detail = serde_json::json!({
            "source": source.name,
            "trigger": job.trigger,
            "status": outcome.status,
            "matches": outcome.matches,
            "series_requested": outcome.series_requested,
            "instances_received": outcome.instances_received,
            "reason": outcome.reason,
            "missing": want.missing.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
        });
        if let Err(e) = self.db.record_fetch_attempt(&attempt, detail, now).await {
            error!(error = %e, "recording a fetch attempt failed");
        }
        if outcome.status == "failed" {
            warn!(source = %source.name, case = %want.case_id, reason = %outcome.reason, "fetch from source failed");
        }
        outcome
    }

    async fn too_recent(&self, source: &Source, want: &Want) -> Option<String> {
        let min = time::Duration::seconds(self.settings.min_query_interval_secs as i64);
        let last = match self
            .db
            .last_fetch_query(&want.patient_key, &source.name)
            .await
        {
            Ok(l) => l,
            Err(e) => return Some(format!("database: {e}")),
        };
        let last = last.as_deref().and_then(parse_time)?;
        (self.clock.now() - last < min).then(|| {
            format!(
                "patient queried at this source less than {} s ago",
                self.settings.min_query_interval_secs
            )
        })
    }

    /// Append one audit event of the fetch.
    pub(crate) async fn audit(&self, want: &Want, event: &str, detail: serde_json::Value) {
        let e = NewEvent {
            event,
            case_id: Some(&want.case_id),
            patient_key: Some(&want.patient_key),
            detail: Some(detail),
            ..Default::default()
        };
        if let Err(err) = self.db.record(e, self.clock.now()).await {
            error!(error = %err, "audit event could not be recorded");
        }
    }
}

/// The Patient ID and Issuer of Patient ID of a spooled instance (the
/// database keeps only their hash).
fn read_patient(path: &std::path::Path) -> anyhow::Result<Patient> {
    use dicom_dictionary_std::tags;
    let obj = dicom_object::OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(path)
        .map_err(|e| anyhow::anyhow!("reading the case's instance: {e}"))?;
    let text = |tag| {
        obj.get(tag)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).trim().to_string())
            .unwrap_or_default()
    };
    let id = text(tags::PATIENT_ID);
    if id.is_empty() {
        anyhow::bail!("the case's instances carry no Patient ID: nothing to query by");
    }
    Ok(Patient {
        id,
        issuer: text(tags::ISSUER_OF_PATIENT_ID),
    })
}

/// The audit event names, for the README and the tests.
pub use fetch_event::{FETCH_ATTEMPT, FETCH_QUERY, FETCH_RETRIEVE};
