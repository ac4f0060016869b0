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
use crate::clock::Clock;
use crate::db::{ASSEMBLER_ROLE, Assignment, CaseRow, CaseState, Db, DbError, parse_time};
use crate::worker::{Timing, run_worker};

/// How instances of one patient are recognised (`cases.patient_key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PatientKeyMode {
    /// Patient ID + Issuer of Patient ID (the default).
    IdIssuer,
    /// Patient ID alone, for sites whose PACS sends no issuer consistently.
    Id,
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
    /// How long a claim on a case run lasts unrenewed ([`CASE_LEASE`]).
    case_lease: Duration,
    /// Most cases this node claims ahead of the one it runs (waiting in its
    /// queue); `None`: as many as the queue holds.
    claim_ahead: Option<usize>,
    /// When to plan fetches from `[[sources]]` (none configured: `None`).
    fetch: Option<FetchPlan>,
}

/// When the assembler plans a fetch of what a case lacks (`[fetch]`): the
/// fetch worker (`crate::fetch`) runs it, and the case waits for it,
/// "fetching from SOURCE", before it runs or times out with a modality
/// missing, and until the fetch ends even once what it brought so far
/// completes the case.
#[derive(Debug, Clone, Copy)]
pub struct FetchPlan {
    /// When the case opens (is first seen collecting) with one missing.
    pub on_open: bool,
    /// This long before the case's max wait, with one still missing.
    pub before_run: Option<Duration>,
}

/// Trigger names of planned fetches, as `fetches.trigger_name` stores them.
pub const FETCH_ON_OPEN: &str = "on_open";
pub const FETCH_BEFORE_RUN: &str = "before_run";

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
/// How long the assembler role is held without renewal (each round renews
/// it): a dead node's role passes to another node after this.
const ROLE_LEASE: Duration = Duration::from_secs(10);
/// How long a node's claim on a case run lasts without renewal; the
/// heartbeat renews it every third of that while the case is queued or
/// running, and another node takes the case over once it expires.
pub const CASE_LEASE: Duration = Duration::from_secs(30);

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
            case_lease: CASE_LEASE,
            claim_ahead: None,
            fetch: None,
        }
    }

    /// Plan fetches of what cases lack (see [`FetchPlan`]).
    pub fn with_fetch(mut self, plan: FetchPlan) -> Self {
        self.fetch = Some(plan);
        self
    }

    /// Plan the fetches due for a collecting case that lacks a required
    /// modality; the sources a fetch of it is busy with ("" while queued),
    /// if one is. `next` learns when the before-run fetch is due.
    async fn fetching(
        &self,
        case: &CaseRow,
        first: OffsetDateTime,
        now: OffsetDateTime,
        next: &mut Option<OffsetDateTime>,
    ) -> Result<Option<String>, DbError> {
        let Some(plan) = self.fetch else {
            return Ok(None);
        };
        // Once the first burst has landed (a study still streaming in would
        // be asked for what is on its way).
        let quiet = parse_time(&case.last_instance_at).is_none_or(|l| now >= l + PREPARE_QUIET);
        if plan.on_open
            && quiet
            && self
                .db
                .plan_fetch(&case.id, case.revision, FETCH_ON_OPEN, now)
                .await?
        {
            info!(case = %case.id, "fetch planned: case opened with a modality missing");
        }
        if let Some(ahead) = plan.before_run {
            // Never before the middle of the wait: a short max wait does
            // not query twice at once.
            let due = first + self.rules.max_wait - ahead.min(self.rules.max_wait / 2);
            if now >= due {
                if self
                    .db
                    .plan_fetch(&case.id, case.revision, FETCH_BEFORE_RUN, now)
                    .await?
                {
                    info!(case = %case.id, "fetch planned: max wait near with a modality missing");
                }
            } else {
                *next = Some(next.map_or(due, |n: OffsetDateTime| n.min(due)));
            }
        }
        self.db.active_fetch(&case.id, Some(now)).await
    }

    /// Claim at most `n` cases ahead of the running one: with several
    /// nodes, a node that took a whole backlog into its queue would leave
    /// the others idle, so each takes the next case only when it is nearly
    /// free and the backlog spreads over the nodes.
    pub fn with_claim_ahead(mut self, n: usize) -> Self {
        self.claim_ahead = Some(n.max(1));
        self
    }

    /// Claims on case runs last `lease` unrenewed (`[node] lease_secs`):
    /// how long a dead node's case waits before another takes it over. The
    /// assembler role lasts at most as long.
    pub fn with_case_lease(mut self, lease: Duration) -> Self {
        self.case_lease = lease.max(Duration::from_secs(1));
        self
    }

    fn role_lease(&self) -> Duration {
        ROLE_LEASE.min(self.case_lease)
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

    /// Put every unassigned stored instance into its patient's case. Each
    /// batch is decided in memory (a case opened or reopened for one
    /// instance is seen by the next) and recorded in one transaction.
    ///
    /// Several nodes: only the holder of the assembler role assigns (and
    /// each round's transaction commits only while it still holds it), so
    /// the decisions for one patient are never taken on two nodes at once.
    pub async fn assign(&self) -> Result<usize, DbError> {
        let mut assigned = 0;
        loop {
            if !self
                .db
                .hold_role(ASSEMBLER_ROLE, self.role_lease(), self.clock.now())
                .await?
            {
                return Ok(assigned);
            }
            let batch = self.db.unassigned_instances(500).await?;
            if batch.is_empty() {
                return Ok(assigned);
            }
            let now = self.clock.now();
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
                        let reopen = matches!(case.state, CaseState::Done | CaseState::Failed)
                            .then_some("late arrival: reopened");
                        if reopen.is_some() {
                            info!(case = %case.id, "late instance reopened the case");
                        }
                        steps.push(Assignment::Add {
                            case_id: case.id.clone(),
                            from_state: case.state,
                            sop_instance_uid: inst.sop_instance_uid.clone(),
                            oldest: oldest.clone(),
                            newest: newest.clone(),
                            reopen,
                        });
                        if reopen.is_some() {
                            case.state = CaseState::Collecting;
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
                                state: CaseState::Collecting,
                                oldest_study_date: inst.study_date.clone(),
                                newest_study_date: inst.study_date.clone(),
                                ..Default::default()
                            },
                        );
                    }
                }
            }
            if !self
                .db
                .assign_instances_as(&steps, Some(ASSEMBLER_ROLE), now)
                .await?
            {
                // The role passed to another node while this one decided.
                return Ok(assigned);
            }
            assigned += batch.len();
        }
    }

    /// Apply the rules to every collecting case; returns the earliest future
    /// instant at which a decision may change.
    pub async fn evaluate(&self) -> Result<Option<OffsetDateTime>, DbError> {
        let now = self.clock.now();
        let mut next: Option<OffsetDateTime> = None;
        for case in self.db.cases_in_states(&[CaseState::Collecting]).await? {
            let members = self.db.case_members(&case.id).await?;
            let c = rules::completeness(&members, &self.rules);
            let first = parse_time(&case.first_instance_at).unwrap_or(now);
            let last = parse_time(&case.last_instance_at).unwrap_or(now);
            let mut decision = rules::decide(&c, first, last, now, &self.rules);
            // A fetch still streaming holds the case even once nothing is
            // missing: its series arrive one retrieve after another, and a
            // gap longer than the stable age between them would otherwise
            // run the case on half a volume.
            let active = if !c.missing.is_empty() {
                self.fetching(&case, first, now, &mut next).await?
            } else if self.fetch.is_some() {
                self.db.active_fetch(&case.id, Some(now)).await?
            } else {
                None
            };
            if let Some(sources) = active {
                // What a source may still deliver is worth the wait: the
                // fetch is bounded by its lease (`[fetch] source_timeout_secs`).
                let what = rules::fetch_reason(&sources);
                decision = match decision {
                    Decision::Wait { until, reason } => Decision::Wait {
                        until: until.min(now + POLL),
                        reason: format!("{what}; {reason}"),
                    },
                    Decision::Ready { .. } | Decision::Hold { .. } => Decision::Wait {
                        until: now + POLL,
                        reason: format!("{what}; max wait reached"),
                    },
                };
            }
            match decision {
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
                                CaseState::Collecting,
                                CaseState::Collecting,
                                &reason,
                                now,
                            )
                            .await?;
                    }
                    next = Some(next.map_or(until, |n: OffsetDateTime| n.min(until)));
                }
                Decision::Ready { reason } => {
                    self.db
                        .transition_case(
                            &case.id,
                            CaseState::Collecting,
                            CaseState::Ready,
                            &reason,
                            now,
                        )
                        .await?;
                    info!(case = %case.id, %reason, "case ready");
                }
                Decision::Hold { reason } => {
                    self.db
                        .transition_case(
                            &case.id,
                            CaseState::Collecting,
                            CaseState::Held,
                            &reason,
                            now,
                        )
                        .await?;
                    warn!(case = %case.id, %reason, "case held");
                }
            }
        }
        Ok(next)
    }

    /// After a restart: cases this node had queued or running did not
    /// finish, so they are ready again (the outputs' UIDs are
    /// deterministic, so a rerun never duplicates at the destination).
    pub async fn recover(&self) -> Result<usize, DbError> {
        self.requeue_orphans(true).await
    }

    /// Make ready again the cases whose claim no live node holds: with
    /// `own`, this node's (after a restart); always, those of nodes whose
    /// lease expired (takeover).
    async fn requeue_orphans(&self, own: bool) -> Result<usize, DbError> {
        let now = self.clock.now();
        let mut n = 0;
        for (id, state, by) in self.db.orphaned_cases(own, now).await? {
            let reason = if by == self.db.node() || by.is_empty() {
                "node restarted: queued again".to_string()
            } else {
                format!("lease of node {by} expired: queued again")
            };
            if self
                .db
                .transition_case(&id, state, CaseState::Ready, &reason, now)
                .await?
            {
                warn!(case = %id, %reason, "case taken over");
                n += 1;
            }
        }
        Ok(n)
    }

    /// Claim ready cases for this node and hand them to the queue; waits
    /// (with the assembler, never with ingest) while the queue is full.
    /// Every node dispatches: a case is claimed by exactly one
    /// ([`Db::claim_ready_case`]) with a lease the heartbeat renews.
    pub async fn dispatch(
        &self,
        queue: &mpsc::Sender<CaseJob>,
        shutdown: &CancellationToken,
    ) -> Result<usize, DbError> {
        let mut n = 0;
        if self
            .db
            .cases_in_states(&[CaseState::Ready])
            .await?
            .is_empty()
        {
            return Ok(n);
        }
        loop {
            let waiting = queue.max_capacity() - queue.capacity();
            let room = match self.claim_ahead {
                Some(ahead) if waiting >= ahead => return Ok(n),
                Some(ahead) => (ahead - waiting).min(queue.capacity()),
                None => queue.capacity(),
            };
            if room == 0 {
                // Full: wait for a slot (with the assembler, never ingest).
                tokio::select! {
                    p = queue.reserve() => match p {
                        Ok(p) => drop(p),
                        Err(_) => return Ok(n),
                    },
                    _ = shutdown.cancelled() => return Ok(n),
                }
                continue;
            }
            // Claim what there is room for, then queue it all at once: the
            // pipeline gathers the cases queued together into one wave
            // (one batch on a GPU), and each claim is a database write that
            // would spread them apart.
            let mut claimed = Vec::with_capacity(room);
            while claimed.len() < room {
                let now = self.clock.now();
                match self.db.claim_ready_case(now + self.case_lease, now).await? {
                    Some((case_id, revision)) => claimed.push(CaseJob { case_id, revision }),
                    None => break,
                }
            }
            let last = claimed.len() < room;
            for job in claimed {
                // Room was counted and only this task sends: no wait.
                if queue.send(job).await.is_err() {
                    return Ok(n);
                }
                n += 1;
            }
            if last {
                return Ok(n);
            }
        }
    }

    /// One round: on the node holding the assembler role, take over
    /// expired claims, assign and evaluate; on every node, dispatch.
    /// Returns the next deadline.
    pub async fn round(
        &self,
        queue: &mpsc::Sender<CaseJob>,
        shutdown: &CancellationToken,
    ) -> Result<Option<OffsetDateTime>, DbError> {
        let mut next = None;
        if self
            .db
            .hold_role(ASSEMBLER_ROLE, self.role_lease(), self.clock.now())
            .await?
        {
            self.requeue_orphans(false).await?;
            self.assign().await?;
            next = self.evaluate().await?;
        }
        self.dispatch(queue, shutdown).await?;
        Ok(next)
    }

    /// Renew this node's case claims every third of their lease until
    /// `shutdown`, so that a long run keeps its case.
    async fn heartbeat(db: Db, clock: Clock, lease: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(lease / 3) => {}
                _ = shutdown.cancelled() => return,
            }
            if let Err(e) = db.renew_case_claims(clock.now() + lease).await {
                warn!(error = %e, "renewing case leases failed");
            }
        }
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
        let heartbeat = tokio::spawn(Self::heartbeat(
            self.db.clone(),
            self.clock.clone(),
            self.case_lease,
            shutdown.clone(),
        ));
        let timing = Timing {
            poll: POLL,
            coalesce: Some((QUIET, COALESCE_MAX)),
        };
        let (this, queue, stop) = (&self, &queue, &shutdown);
        run_worker(
            wake,
            timing,
            &self.clock,
            shutdown.clone(),
            move || async move {
                match this.round(queue, stop).await {
                    Ok(next) => next,
                    Err(e) => {
                        error!(error = %e, "case assembly round failed");
                        None
                    }
                }
            },
        )
        .await;
        let _ = heartbeat.await;
        // Hand the role on at once rather than after its lease.
        if let Err(e) = self.db.release_role(ASSEMBLER_ROLE).await {
            warn!(error = %e, "releasing the assembler role failed");
        }
    }
}
