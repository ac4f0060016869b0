//! The case assembler: one task that assigns stored instances to patient
//! cases, drives every case timer from the database (so a restart rebuilds
//! them), and hands ready cases to the inference queue with backpressure.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::rules::{self, CaseRules, Decision};
use crate::db::{Assignment, CaseRow, Db, DbError, format_time, parse_time};

/// Case states, as stored.
pub mod state {
    pub const COLLECTING: &str = "collecting";
    pub const READY: &str = "ready";
    pub const QUEUED: &str = "queued";
    pub const RUNNING: &str = "running";
    pub const HELD: &str = "held";
    pub const DONE: &str = "done";
    pub const FAILED: &str = "failed";
}

/// How instances of one patient are recognised (`cases.patient_key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PatientKeyMode {
    /// Patient ID + Issuer of Patient ID (the default).
    IdIssuer,
    /// Patient ID alone, for sites whose PACS sends no issuer consistently.
    Id,
}

/// The time source of every case timer. The system clock is wall time at
/// start plus tokio's monotonic clock since; tests use a manual clock they
/// advance by hand (sqlx's pool timeouts do not survive
/// `tokio::time::pause`, so the database cannot run under a paused runtime).
#[derive(Debug, Clone)]
pub enum Clock {
    System {
        wall0: OffsetDateTime,
        t0: tokio::time::Instant,
    },
    Manual(Arc<std::sync::Mutex<OffsetDateTime>>),
}

impl Clock {
    pub fn new() -> Self {
        Clock::System {
            wall0: OffsetDateTime::now_utc(),
            t0: tokio::time::Instant::now(),
        }
    }
    /// A clock that stands still until [`Clock::advance`].
    pub fn manual(start: OffsetDateTime) -> Self {
        Clock::Manual(Arc::new(std::sync::Mutex::new(start)))
    }
    pub fn now(&self) -> OffsetDateTime {
        match self {
            Clock::System { wall0, t0 } => *wall0 + (tokio::time::Instant::now() - *t0),
            Clock::Manual(t) => *t.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }
    /// Move a manual clock forward (no effect on the system clock).
    pub fn advance(&self, by: Duration) {
        if let Clock::Manual(t) = self {
            let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
            *t += by;
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// A case handed to the inference side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseJob {
    pub case_id: String,
    pub revision: i64,
}

pub struct Assembler {
    db: Db,
    rules: CaseRules,
    key: PatientKeyMode,
    window_days: i64,
    clock: Clock,
    /// Told the id of each complete case that waits for its stable age, so
    /// that its imaging can start before it is ready.
    prepare_hints: Option<mpsc::Sender<String>>,
}

/// The longest the task sleeps without looking at the database, so that
/// operator commands (`her2map cases run|hold|release`) take effect.
const POLL: Duration = Duration::from_secs(2);
/// A burst of stored instances is assigned in one round once ingest has been
/// quiet this long (or [`COALESCE_MAX`] after the first), the way Orthanc's
/// stable-age monitor polls instead of reacting to every instance: a round
/// per instance re-reads the whole case and competes with ingest for the
/// database's write lock (it halved ingest throughput).
const QUIET: Duration = Duration::from_millis(50);
const COALESCE_MAX: Duration = Duration::from_secs(1);
/// A complete case's imaging starts early (see `Assembler::with_prepare_hints`)
/// once no instance of it arrived for this long.
const PREPARE_QUIET: Duration = Duration::from_secs(1);

fn study_day(date: &str) -> Option<time::Date> {
    let fmt = time::macros::format_description!("[year][month][day]");
    time::Date::parse(date.trim(), &fmt).ok()
}

/// Widen a case's study-date range by `date`; `None` when the result would
/// span more than `window_days` (the instance opens a new case).
pub(crate) fn widen(
    oldest: &str,
    newest: &str,
    date: &str,
    window_days: i64,
) -> Option<(String, String)> {
    let Some(d) = study_day(date) else {
        // No usable Study Date: join the patient's case as it is.
        return Some((oldest.to_string(), newest.to_string()));
    };
    let (lo, hi) = match (study_day(oldest), study_day(newest)) {
        (Some(lo), Some(hi)) => (lo.min(d), hi.max(d)),
        _ => (d, d),
    };
    if (hi - lo).whole_days() > window_days {
        return None;
    }
    let fmt = time::macros::format_description!("[year][month][day]");
    Some((lo.format(&fmt).ok()?, hi.format(&fmt).ok()?))
}

impl Assembler {
    pub fn new(
        db: Db,
        rules: CaseRules,
        key: PatientKeyMode,
        window_days: i64,
        clock: Clock,
    ) -> Self {
        Assembler {
            db,
            rules,
            key,
            window_days,
            clock,
            prepare_hints: None,
        }
    }

    /// Send the id of every complete case waiting for its stable age (once
    /// no instance of it arrived for `PREPARE_QUIET`) to
    /// `hints` (never blocking: a full channel drops the hint, the next
    /// round sends it again).
    pub fn with_prepare_hints(mut self, hints: mpsc::Sender<String>) -> Self {
        self.prepare_hints = Some(hints);
        self
    }

    pub fn rules(&self) -> &CaseRules {
        &self.rules
    }

    fn now(&self) -> (OffsetDateTime, String) {
        let t = self.clock.now();
        (t, format_time(t))
    }

    /// Put every unassigned stored instance into its patient's case. Each
    /// batch is decided in memory (a case opened or reopened for one
    /// instance is seen by the next) and recorded in one transaction.
    pub async fn assign(&self) -> Result<usize, DbError> {
        let mut assigned = 0;
        loop {
            let batch = self.db.unassigned_instances(500).await?;
            if batch.is_empty() {
                return Ok(assigned);
            }
            let (_, now) = self.now();
            let mut cases: HashMap<String, Vec<CaseRow>> = HashMap::new();
            let mut steps = Vec::with_capacity(batch.len());
            for inst in &batch {
                let key = match self.key {
                    PatientKeyMode::IdIssuer => &inst.patient_key,
                    PatientKeyMode::Id => &inst.patient_id_key,
                };
                if !cases.contains_key(key) {
                    let known = self.db.cases_of_patient(key).await?;
                    cases.insert(key.clone(), known);
                }
                let patient_cases = cases.get_mut(key).expect("inserted above");
                let target = patient_cases.iter_mut().find_map(|c| {
                    widen(
                        &c.oldest_study_date,
                        &c.newest_study_date,
                        &inst.study_date,
                        self.window_days,
                    )
                    .map(|range| (c, range))
                });
                match target {
                    Some((case, (oldest, newest))) => {
                        let reopen = matches!(case.state.as_str(), state::DONE | state::FAILED)
                            .then_some("late arrival: reopened");
                        if reopen.is_some() {
                            info!(case = %case.id, "late instance reopened the case");
                        }
                        steps.push(Assignment::Add {
                            case_id: case.id.clone(),
                            from_state: case.state.clone(),
                            sop_instance_uid: inst.sop_instance_uid.clone(),
                            oldest: oldest.clone(),
                            newest: newest.clone(),
                            reopen,
                        });
                        if reopen.is_some() {
                            case.state = state::COLLECTING.to_string();
                        }
                        case.oldest_study_date = oldest;
                        case.newest_study_date = newest;
                    }
                    None => {
                        let id = format!("{:016x}", rand::random::<u64>());
                        info!(case = %id, patient = %key, "case opened");
                        steps.push(Assignment::Open {
                            case_id: id.clone(),
                            patient_key: key.clone(),
                            sop_instance_uid: inst.sop_instance_uid.clone(),
                            study_date: inst.study_date.clone(),
                        });
                        // Newest first, as `cases_of_patient` orders them.
                        patient_cases.insert(
                            0,
                            CaseRow {
                                id,
                                patient_key: key.clone(),
                                state: state::COLLECTING.to_string(),
                                oldest_study_date: inst.study_date.clone(),
                                newest_study_date: inst.study_date.clone(),
                                ..Default::default()
                            },
                        );
                    }
                }
            }
            self.db.assign_instances(&steps, &now).await?;
            assigned += batch.len();
        }
    }

    /// Apply the rules to every collecting case; returns the earliest future
    /// instant at which a decision may change.
    pub async fn evaluate(&self) -> Result<Option<OffsetDateTime>, DbError> {
        let (now, now_s) = self.now();
        let mut next: Option<OffsetDateTime> = None;
        for case in self.db.cases_in_states(&[state::COLLECTING]).await? {
            let members = self.db.case_members(&case.id).await?;
            let c = rules::completeness(&members, &self.rules);
            let first = parse_time(&case.first_instance_at).unwrap_or(now);
            let last = parse_time(&case.last_instance_at).unwrap_or(now);
            match rules::decide(&c, first, last, now, &self.rules) {
                Decision::Wait { until, reason } => {
                    if c.missing.is_empty()
                        && let Some(hints) = &self.prepare_hints
                    {
                        // Not while the patient's instances still stream in:
                        // each would make the preparation stale.
                        let quiet_at = last + PREPARE_QUIET;
                        if now >= quiet_at {
                            let _ = hints.try_send(case.id.clone());
                        } else if quiet_at < until {
                            next = Some(next.map_or(quiet_at, |n: OffsetDateTime| n.min(quiet_at)));
                        }
                    }
                    if reason != case.reason {
                        // Keep the waiting reason current for `her2map cases`.
                        self.db
                            .transition_case(
                                &case.id,
                                state::COLLECTING,
                                state::COLLECTING,
                                &reason,
                                &now_s,
                            )
                            .await?;
                    }
                    next = Some(next.map_or(until, |n: OffsetDateTime| n.min(until)));
                }
                Decision::Ready { reason } => {
                    self.db
                        .transition_case(&case.id, state::COLLECTING, state::READY, &reason, &now_s)
                        .await?;
                    info!(case = %case.id, %reason, "case ready");
                }
                Decision::Hold { reason } => {
                    self.db
                        .transition_case(&case.id, state::COLLECTING, state::HELD, &reason, &now_s)
                        .await?;
                    warn!(case = %case.id, %reason, "case held");
                }
            }
        }
        Ok(next)
    }

    /// After a restart: cases that were queued or running did not finish,
    /// so they are ready again (the outputs' UIDs are deterministic, so a
    /// rerun never duplicates at the destination).
    pub async fn recover(&self) -> Result<usize, DbError> {
        let (_, now) = self.now();
        let mut n = 0;
        for case in self
            .db
            .cases_in_states(&[state::QUEUED, state::RUNNING])
            .await?
        {
            if self
                .db
                .transition_case(
                    &case.id,
                    &case.state,
                    state::READY,
                    "node restarted: queued again",
                    &now,
                )
                .await?
            {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Hand ready cases to the queue; waits (with the assembler, never with
    /// ingest) while the queue is full.
    pub async fn dispatch(
        &self,
        queue: &mpsc::Sender<CaseJob>,
        shutdown: &CancellationToken,
    ) -> Result<usize, DbError> {
        let mut n = 0;
        for case in self.db.cases_in_states(&[state::READY]).await? {
            let permit = tokio::select! {
                p = queue.reserve() => match p {
                    Ok(p) => p,
                    Err(_) => return Ok(n),
                },
                _ = shutdown.cancelled() => return Ok(n),
            };
            let (_, now) = self.now();
            if self
                .db
                .transition_case(
                    &case.id,
                    state::READY,
                    state::QUEUED,
                    "queued for inference",
                    &now,
                )
                .await?
            {
                permit.send(CaseJob {
                    case_id: case.id.clone(),
                    revision: case.revision,
                });
                n += 1;
            }
        }
        Ok(n)
    }

    /// One round: assign, evaluate, dispatch. Returns the next deadline.
    pub async fn round(
        &self,
        queue: &mpsc::Sender<CaseJob>,
        shutdown: &CancellationToken,
    ) -> Result<Option<OffsetDateTime>, DbError> {
        self.assign().await?;
        let next = self.evaluate().await?;
        self.dispatch(queue, shutdown).await?;
        Ok(next)
    }

    /// The assembler task: wakes on each stored instance, on the earliest
    /// case deadline, and every few seconds for operator commands.
    pub async fn run(
        self,
        wake: Arc<Notify>,
        queue: mpsc::Sender<CaseJob>,
        shutdown: CancellationToken,
    ) {
        if let Err(e) = self.recover().await {
            error!(error = %e, "case recovery failed");
        }
        loop {
            // Register interest before the round, so that an instance stored
            // during the round still wakes the next one.
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next = match self.round(&queue, &shutdown).await {
                Ok(next) => next,
                Err(e) => {
                    error!(error = %e, "case assembly round failed");
                    None
                }
            };
            let mut sleep = POLL;
            if let Some(at) = next {
                let until = at - self.clock.now();
                if until.is_positive() {
                    sleep = sleep.min(until.unsigned_abs());
                } else {
                    sleep = Duration::ZERO;
                }
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(sleep) => continue,
                _ = shutdown.cancelled() => return,
            }
            let give_up = tokio::time::Instant::now() + COALESCE_MAX;
            loop {
                let more = wake.notified();
                tokio::select! {
                    _ = more => {
                        if tokio::time::Instant::now() >= give_up {
                            break;
                        }
                    }
                    _ = tokio::time::sleep(QUIET) => break,
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    }
}

/// A case as operators see it (`her2map cases`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaseView {
    #[serde(flatten)]
    pub case: CaseRow,
    pub present: Vec<&'static str>,
    pub missing: Vec<String>,
    pub lesion_side: Option<String>,
    pub instances: usize,
    /// When the case runs if nothing else arrives (collecting cases only).
    pub ready_at: Option<String>,
    /// When it runs partial / is held at the latest.
    pub max_wait_at: Option<String>,
}

/// Describe every case for the operator.
pub async fn describe_cases(db: &Db, rules: &CaseRules) -> Result<Vec<CaseView>, DbError> {
    let mut out = Vec::new();
    for case in db.all_cases().await? {
        let members = db.case_members(&case.id).await?;
        let c = rules::completeness(&members, rules);
        let collecting = case.state == state::COLLECTING;
        let first = parse_time(&case.first_instance_at);
        let last = parse_time(&case.last_instance_at);
        out.push(CaseView {
            present: c.usable.iter().map(|m| m.as_str()).collect(),
            missing: c
                .missing
                .iter()
                .map(|(m, what)| format!("{} ({what})", m.as_str()))
                .collect(),
            lesion_side: c.lesion_side.clone(),
            instances: members.len(),
            ready_at: (collecting && c.missing.is_empty())
                .then(|| last.map(|t| format_time(t + rules.stable_age)))
                .flatten(),
            max_wait_at: collecting
                .then(|| first.map(|t| format_time(t + rules.max_wait)))
                .flatten(),
            case,
        });
    }
    Ok(out)
}

/// Operator actions on a case; each is a recorded transition.
pub async fn operator_action(db: &Db, id: &str, action: &str) -> Result<String, String> {
    let case = db
        .case(id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no case {id}"))?;
    let now = crate::db::now();
    let (to, allowed): (&str, &[&str]) = match action {
        "run" => (
            state::READY,
            &[state::COLLECTING, state::HELD, state::FAILED, state::DONE],
        ),
        "hold" => (
            state::HELD,
            &[state::COLLECTING, state::READY, state::FAILED],
        ),
        "release" => (state::COLLECTING, &[state::HELD]),
        other => return Err(format!("unknown action {other}")),
    };
    if !allowed.contains(&case.state.as_str()) {
        return Err(format!("case {id} is {}: cannot {action}", case.state));
    }
    let reason = format!("operator: {action}");
    let moved = db
        .transition_case(id, &case.state, to, &reason, &now)
        .await
        .map_err(|e| e.to_string())?;
    if moved {
        Ok(format!("case {id}: {} -> {to}", case.state))
    } else {
        Err(format!("case {id} changed state meanwhile; try again"))
    }
}
