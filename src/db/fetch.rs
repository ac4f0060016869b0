//! Query/retrieve of what a case lacks (issue 17): the fetches planned per
//! case revision and trigger (`fetches`, claimed with a lease like a case
//! run so that one node of several does each), and the attempt at each
//! source (`fetch_attempts`, each with its audit events).

use sqlx::{AssertSqlSafe, Row};
use time::OffsetDateTime;

use super::audit::{NewEvent, insert_event};
use super::{Db, DbError, format_time};

/// Fetch audit event names.
pub mod fetch_event {
    /// A C-FIND / QIDO-RS at one level: source, level, matches, rejected.
    pub const FETCH_QUERY: &str = "fetch_query";
    /// A C-MOVE / C-GET / WADO-RS: source, method, series requested,
    /// instances received, sub-operation counts, status.
    pub const FETCH_RETRIEVE: &str = "fetch_retrieve";
    /// One source's attempt for a case ended (ok, partial, nothing, failed,
    /// skipped), with what it matched and delivered.
    pub const FETCH_ATTEMPT: &str = "fetch_attempt";
}

/// A fetch claimed by this node.
#[derive(Debug, Clone)]
pub struct FetchJob {
    pub id: String,
    pub case_id: String,
    pub revision: i64,
    pub trigger: String,
}

/// One source's attempt, as recorded.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FetchAttempt {
    pub fetch_id: String,
    pub case_id: String,
    pub patient_key: String,
    pub source: String,
    pub started_at: String,
    pub finished_at: String,
    pub status: String,
    pub matches: i64,
    pub series_requested: i64,
    pub instances_received: i64,
    pub detail: String,
}

const PENDING: &str = "pending";
const RUNNING: &str = "running";
const DONE: &str = "done";

impl Db {
    /// Plan a fetch for the case's revision and trigger, once: whether this
    /// call planned it (a second call, or another node's, does nothing).
    pub async fn plan_fetch(
        &self,
        case_id: &str,
        revision: i64,
        trigger: &str,
        now: OffsetDateTime,
    ) -> Result<bool, DbError> {
        // Read first: the assembler asks every round, and a write would take
        // the lock ingest needs.
        if self.fetch_planned(case_id, revision, trigger).await? {
            return Ok(false);
        }
        let now = format_time(now);
        let id = format!("{:016x}", rand::random::<u64>());
        let n = sqlx::query(
            "INSERT INTO fetches (id, case_id, revision, trigger_name, state, created_at, \
             updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6) \
             ON CONFLICT (case_id, revision, trigger_name) DO NOTHING",
        )
        .bind(&id)
        .bind(case_id)
        .bind(revision)
        .bind(trigger)
        .bind(PENDING)
        .bind(&now)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Whether the case's revision has a fetch for this trigger (any state).
    pub async fn fetch_planned(
        &self,
        case_id: &str,
        revision: i64,
        trigger: &str,
    ) -> Result<bool, DbError> {
        let row = sqlx::query(
            "SELECT id FROM fetches WHERE case_id = $1 AND revision = $2 AND trigger_name = $3",
        )
        .bind(case_id)
        .bind(revision)
        .bind(trigger)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// Claim the oldest pending fetch (or one whose node's lease expired)
    /// for this node until `lease_until`.
    pub async fn claim_fetch(
        &self,
        lease_until: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<Option<FetchJob>, DbError> {
        let now = format_time(now);
        let row = sqlx::query(AssertSqlSafe(format!(
            "UPDATE fetches SET state = $1, claimed_by = $2, lease_until = $3, updated_at = $4 \
             WHERE id = (SELECT id FROM fetches WHERE state = $5 OR (state = $1 AND \
             lease_until < $4) ORDER BY created_at, id LIMIT 1{}) \
             AND (state = $5 OR (state = $1 AND lease_until < $4)) \
             RETURNING id, case_id, revision, trigger_name",
            self.skip_locked()
        )))
        .bind(RUNNING)
        .bind(&*self.node)
        .bind(format_time(lease_until))
        .bind(&now)
        .bind(PENDING)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        Ok(Some(FetchJob {
            id: row.try_get("id")?,
            case_id: row.try_get("case_id")?,
            revision: row.try_get("revision")?,
            trigger: row.try_get("trigger_name")?,
        }))
    }

    /// After a restart: this node's running fetches did not finish; they
    /// are pending again (rather than waiting out their lease).
    pub async fn requeue_own_fetches(&self, now: OffsetDateTime) -> Result<u64, DbError> {
        Ok(sqlx::query(
            "UPDATE fetches SET state = $1, claimed_by = '', lease_until = '', updated_at = $2 \
             WHERE state = $3 AND claimed_by = $4",
        )
        .bind(PENDING)
        .bind(format_time(now))
        .bind(RUNNING)
        .bind(&*self.node)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Renew this node's claim on a running fetch and say which sources it
    /// is querying now.
    pub async fn renew_fetch(
        &self,
        id: &str,
        sources: &str,
        lease_until: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE fetches SET sources = $1, lease_until = $2, updated_at = $3 \
             WHERE id = $4 AND claimed_by = $5 AND state = $6",
        )
        .bind(sources)
        .bind(format_time(lease_until))
        .bind(format_time(now))
        .bind(id)
        .bind(&*self.node)
        .bind(RUNNING)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The fetch is over (whatever the sources did): the case goes on.
    pub async fn finish_fetch(
        &self,
        id: &str,
        outcome: &str,
        now: OffsetDateTime,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE fetches SET state = $1, outcome = $2, sources = '', lease_until = '', \
             updated_at = $3 WHERE id = $4",
        )
        .bind(DONE)
        .bind(outcome)
        .bind(format_time(now))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The sources a fetch of this case is querying now ("" while it waits
    /// to be claimed), when one is pending or running under a live lease.
    /// `now`: only a running fetch whose lease is live counts (`None`:
    /// any running one, for views without the node's clock).
    pub async fn active_fetch(
        &self,
        case_id: &str,
        now: Option<OffsetDateTime>,
    ) -> Result<Option<String>, DbError> {
        let row = sqlx::query(
            "SELECT sources FROM fetches WHERE case_id = $1 AND \
             (state = $2 OR (state = $3 AND lease_until >= $4)) \
             ORDER BY created_at LIMIT 1",
        )
        .bind(case_id)
        .bind(PENDING)
        .bind(RUNNING)
        .bind(now.map(format_time).unwrap_or_default())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.try_get("sources")).transpose()?)
    }

    /// When this patient was last queried at this source (attempts that
    /// were skipped do not count), as stored.
    pub async fn last_fetch_query(
        &self,
        patient_key: &str,
        source: &str,
    ) -> Result<Option<String>, DbError> {
        let row = sqlx::query(
            "SELECT MAX(started_at) AS t FROM fetch_attempts \
             WHERE patient_key = $1 AND source = $2 AND status <> 'skipped'",
        )
        .bind(patient_key)
        .bind(source)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("t")?)
    }

    /// Record one source's attempt and its audit event in one transaction.
    pub async fn record_fetch_attempt(
        &self,
        a: &FetchAttempt,
        event_detail: serde_json::Value,
        now: OffsetDateTime,
    ) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO fetch_attempts (fetch_id, case_id, patient_key, source, started_at, \
             finished_at, status, matches, series_requested, instances_received, detail) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (fetch_id, source) DO UPDATE SET finished_at = excluded.finished_at, \
             status = excluded.status, matches = excluded.matches, \
             series_requested = excluded.series_requested, \
             instances_received = excluded.instances_received, detail = excluded.detail",
        )
        .bind(&a.fetch_id)
        .bind(&a.case_id)
        .bind(&a.patient_key)
        .bind(&a.source)
        .bind(&a.started_at)
        .bind(&a.finished_at)
        .bind(&a.status)
        .bind(a.matches)
        .bind(a.series_requested)
        .bind(a.instances_received)
        .bind(&a.detail)
        .execute(&mut *tx)
        .await?;
        insert_event(
            &mut tx,
            &self.node,
            &NewEvent {
                event: fetch_event::FETCH_ATTEMPT,
                case_id: Some(&a.case_id),
                patient_key: Some(&a.patient_key),
                detail: Some(event_detail),
                ..Default::default()
            },
            &format_time(now),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A case's fetch attempts, oldest first.
    pub async fn fetch_attempts(&self, case_id: &str) -> Result<Vec<FetchAttempt>, DbError> {
        let rows = sqlx::query(
            "SELECT fetch_id, case_id, patient_key, source, started_at, finished_at, status, \
             matches, series_requested, instances_received, detail FROM fetch_attempts \
             WHERE case_id = $1 ORDER BY started_at, source",
        )
        .bind(case_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(FetchAttempt {
                    fetch_id: r.try_get("fetch_id")?,
                    case_id: r.try_get("case_id")?,
                    patient_key: r.try_get("patient_key")?,
                    source: r.try_get("source")?,
                    started_at: r.try_get("started_at")?,
                    finished_at: r.try_get("finished_at")?,
                    status: r.try_get("status")?,
                    matches: r.try_get("matches")?,
                    series_requested: r.try_get("series_requested")?,
                    instances_received: r.try_get("instances_received")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }

    /// How many indexed instances these series hold (what a retrieve
    /// delivered, whatever the PACS's counts say).
    pub async fn series_instance_count(&self, series_uids: &[String]) -> Result<i64, DbError> {
        let mut n = 0;
        for uid in series_uids {
            let row =
                sqlx::query("SELECT COUNT(*) AS n FROM instances WHERE series_instance_uid = $1")
                    .bind(uid)
                    .fetch_one(&self.pool)
                    .await?;
            n += row.try_get::<i64, _>("n")?;
        }
        Ok(n)
    }
}
