//! Outputs and the outbox (issue 6): the objects the node made and one
//! delivery row per object x destination.

use serde::Serialize;
use sqlx::AssertSqlSafe;

use super::audit::{NewEvent, insert_event};
use time::OffsetDateTime;

use super::{Db, DbError, DeliveryState, format_time, parse_time};
use crate::report::OutputKind;

/// Outbox audit event names.
pub mod outbox_event {
    pub const OUTPUT_CREATED: &str = "output_created";
    pub const DELIVERY_ATTEMPTED: &str = "delivery_attempted";
    pub const DELIVERY_SENT: &str = "delivery_sent";
    pub const DELIVERY_DEAD: &str = "delivery_dead_letter";
    pub const DELIVERY_RETRY_REQUESTED: &str = "delivery_retry_requested";
}

/// One object the node made.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutputRow {
    pub sop_instance_uid: String,
    pub case_id: String,
    pub revision: i64,
    #[sqlx(try_from = "String")]
    pub kind: OutputKind,
    pub sop_class_uid: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub path: String,
}

/// One object x destination delivery.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub sop_instance_uid: String,
    pub destination: String,
    #[sqlx(try_from = "String")]
    pub state: DeliveryState,
    pub attempts: i64,
    pub last_status: String,
    pub next_attempt_at: String,
    pub created_at: String,
    pub updated_at: String,
    /// The node sending it right now ('' when none: `leases`).
    pub claimed_by: String,
    pub case_id: String,
    #[sqlx(try_from = "String")]
    pub kind: OutputKind,
    pub path: String,
}

pub(super) const OUTBOX_COLUMNS: &str = "o.id, o.sop_instance_uid, o.destination, o.state, o.attempts, \
     o.last_status, o.next_attempt_at, o.created_at, o.updated_at, o.claimed_by, p.case_id, p.kind, \
     p.path";

impl Db {
    /// Record an output and queue it for each destination, in one
    /// transaction. Recording the same SOP Instance UID again (a rerun after
    /// a crash) changes nothing: the same object is delivered once.
    pub async fn add_output(
        &self,
        out: &OutputRow,
        destinations: &[String],
        now: OffsetDateTime,
    ) -> Result<bool, DbError> {
        let now = format_time(now);
        let mut tx = self.pool.begin().await?;
        let new = sqlx::query(
            "INSERT INTO outputs (sop_instance_uid, case_id, revision, kind, sop_class_uid, \
             study_instance_uid, series_instance_uid, path, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (sop_instance_uid) DO NOTHING",
        )
        .bind(&out.sop_instance_uid)
        .bind(&out.case_id)
        .bind(out.revision)
        .bind(out.kind.as_str())
        .bind(&out.sop_class_uid)
        .bind(&out.study_instance_uid)
        .bind(&out.series_instance_uid)
        .bind(&out.path)
        .bind(&now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if new {
            for dest in destinations {
                sqlx::query(
                    "INSERT INTO outbox (sop_instance_uid, destination, state, next_attempt_at, \
                     created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (sop_instance_uid, destination) DO NOTHING",
                )
                .bind(&out.sop_instance_uid)
                .bind(dest)
                .bind(DeliveryState::Pending.as_str())
                .bind(&now)
                .bind(&now)
                .bind(&now)
                .execute(&mut *tx)
                .await?;
            }
            let e = NewEvent {
                event: outbox_event::OUTPUT_CREATED,
                sop_instance_uid: Some(&out.sop_instance_uid),
                study_instance_uid: Some(&out.study_instance_uid),
                case_id: Some(&out.case_id),
                detail: Some(serde_json::json!({
                    "kind": out.kind.as_str(), "revision": out.revision, "path": out.path,
                    "sop_class_uid": out.sop_class_uid, "destinations": destinations,
                })),
                ..Default::default()
            };
            insert_event(&mut tx, &self.node, &e, &now).await?;
        }
        tx.commit().await?;
        Ok(new)
    }

    /// Outputs of a case (all revisions), oldest first.
    pub async fn case_outputs(&self, case_id: &str) -> Result<Vec<OutputRow>, DbError> {
        Ok(sqlx::query_as(
            "SELECT sop_instance_uid, case_id, revision, kind, sop_class_uid, study_instance_uid, \
             series_instance_uid, path FROM outputs WHERE case_id = $1 \
             ORDER BY created_at, sop_instance_uid",
        )
        .bind(case_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Pending deliveries due at `now`, oldest first.
    pub async fn due_deliveries(
        &self,
        now: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<OutboxRow>, DbError> {
        let rows = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {OUTBOX_COLUMNS} FROM outbox o JOIN outputs p \
             ON p.sop_instance_uid = o.sop_instance_uid \
             WHERE o.state = $1 AND o.next_attempt_at <= $2 ORDER BY o.id LIMIT $3"
        )))
        .bind(DeliveryState::Pending.as_str())
        .bind(format_time(now))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// The earliest pending attempt time, if any.
    pub async fn next_delivery_at(&self) -> Result<Option<OffsetDateTime>, DbError> {
        let next: Option<String> =
            sqlx::query_scalar("SELECT MIN(next_attempt_at) FROM outbox WHERE state = $1")
                .bind(DeliveryState::Pending.as_str())
                .fetch_one(&self.pool)
                .await?;
        Ok(next.as_deref().and_then(parse_time))
    }

    pub async fn outbox(&self) -> Result<Vec<OutboxRow>, DbError> {
        let rows = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {OUTBOX_COLUMNS} FROM outbox o JOIN outputs p \
             ON p.sop_instance_uid = o.sop_instance_uid ORDER BY o.id"
        )))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Outbox rows matching the filters, by id; `case_id` gives one case's.
    pub async fn outbox_filtered(
        &self,
        state: Option<DeliveryState>,
        destination: Option<&str>,
        case_id: Option<&str>,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<OutboxRow>, DbError> {
        let rows = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {OUTBOX_COLUMNS} FROM outbox o JOIN outputs p \
             ON p.sop_instance_uid = o.sop_instance_uid \
             WHERE ($1 IS NULL OR o.state = $1) AND ($2 IS NULL OR o.destination = $2) \
             AND ($3 IS NULL OR p.case_id = $3) ORDER BY o.id LIMIT $4 OFFSET $5"
        )))
        .bind(state.map(|s| s.as_str()))
        .bind(destination)
        .bind(case_id)
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Deliveries per destination and state (the metrics' outbox gauge).
    pub async fn outbox_state_counts(&self) -> Result<Vec<(String, DeliveryState, i64)>, DbError> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT destination, state, COUNT(*) FROM outbox GROUP BY destination, state \
             ORDER BY destination, state",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(d, s, n)| s.parse().ok().map(|s| (d, s, n)))
            .collect())
    }

    /// Record one delivery attempt: sent, pending (retry at
    /// `next_attempt_at`) or dead.
    pub async fn record_delivery(
        &self,
        row: &OutboxRow,
        state: DeliveryState,
        status: &str,
        next_attempt_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<(), DbError> {
        let (next_attempt_at, now) = (format_time(next_attempt_at), format_time(now));
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE outbox SET state = $1, attempts = attempts + 1, last_status = $2, \
             next_attempt_at = $3, updated_at = $4, claimed_by = '', lease_until = '' \
             WHERE id = $5",
        )
        .bind(state.as_str())
        .bind(status)
        .bind(&next_attempt_at)
        .bind(&now)
        .bind(row.id)
        .execute(&mut *tx)
        .await?;
        let event = match state {
            DeliveryState::Sent => outbox_event::DELIVERY_SENT,
            DeliveryState::Dead => outbox_event::DELIVERY_DEAD,
            DeliveryState::Pending => outbox_event::DELIVERY_ATTEMPTED,
        };
        let e = NewEvent {
            event,
            sop_instance_uid: Some(&row.sop_instance_uid),
            case_id: Some(&row.case_id),
            detail: Some(serde_json::json!({
                "destination": row.destination, "attempt": row.attempts + 1,
                "status": status, "next_attempt_at": (state == DeliveryState::Pending).then_some(next_attempt_at),
            })),
            ..Default::default()
        };
        insert_event(&mut tx, &self.node, &e, &now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Operator retry: a dead (or pending) row becomes due now.
    pub async fn retry_delivery(&self, id: i64, now: OffsetDateTime) -> Result<bool, DbError> {
        let now = format_time(now);
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE outbox SET state = $1, next_attempt_at = $2, updated_at = $3 \
             WHERE id = $4 AND state IN ($5, $6)",
        )
        .bind(DeliveryState::Pending.as_str())
        .bind(&now)
        .bind(&now)
        .bind(id)
        .bind(DeliveryState::Dead.as_str())
        .bind(DeliveryState::Pending.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 1 {
            let e = NewEvent {
                event: outbox_event::DELIVERY_RETRY_REQUESTED,
                detail: Some(serde_json::json!({ "outbox_id": id })),
                ..Default::default()
            };
            insert_event(&mut tx, &self.node, &e, &now).await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }
}
