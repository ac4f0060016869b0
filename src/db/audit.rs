//! The audit log: association rows and the append-only `events` table.
//! Every other table family appends its events through [`insert_event`],
//! inside its own transaction.

use serde::Serialize;
use sqlx::Row;

use time::OffsetDateTime;

use super::{Db, DbError, format_time};

/// Audit event names: stable, snake_case, documented in the README.
pub mod event {
    pub const ASSOCIATION_OPENED: &str = "association_opened";
    pub const ASSOCIATION_REJECTED: &str = "association_rejected";
    pub const ASSOCIATION_CLOSED: &str = "association_closed";
    pub const INSTANCE_STORED: &str = "instance_stored";
    pub const INSTANCE_DUPLICATE: &str = "instance_duplicate";
    pub const INSTANCE_FAILED: &str = "instance_failed";
    pub const NODE_STARTED: &str = "node_started";
    pub const NODE_STOPPED: &str = "node_stopped";
    /// An operator action through the console or API, with the user's name.
    pub const OPERATOR_ACTION: &str = "operator_action";
    /// A console or API request with a missing or wrong token.
    pub const HTTP_AUTH_FAILED: &str = "http_auth_failed";
    /// An HTTP connection closed before it made a request: its TLS
    /// handshake or its headers did not arrive in `[http]
    /// header_timeout_secs`, or the handshake failed (rate-limited).
    pub const HTTP_CONNECTION_CUT: &str = "http_connection_cut";
}

/// One line of the audit log.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent {
    pub seq: i64,
    pub time: String,
    pub event: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub association_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sop_instance_uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub study_instance_uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub case_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
    /// The node that wrote it (`[node] id`); absent on events written
    /// before nodes were named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// An `events` row, read by column name.
fn audit_event(r: &sqlx::any::AnyRow) -> Result<AuditEvent, DbError> {
    let detail: Option<String> = r.try_get("detail")?;
    Ok(AuditEvent {
        seq: r.try_get("seq")?,
        time: r.try_get("time")?,
        event: r.try_get("event")?,
        association_id: r.try_get("association_id")?,
        sop_instance_uid: r.try_get("sop_instance_uid")?,
        study_instance_uid: r.try_get("study_instance_uid")?,
        patient_key: r.try_get("patient_key")?,
        case_id: r.try_get("case_id")?,
        status: r.try_get("status")?,
        // Stored as JSON text (portable); an unreadable detail is dropped.
        detail: detail.and_then(|d| serde_json::from_str(&d).ok()),
        node: r.try_get("node")?,
    })
}

/// Which audit events to read ([`Db::events_filtered`]); absent fields
/// do not filter. Times compare as stored (RFC 3339 UTC).
#[derive(Debug, Default, Clone)]
pub struct EventFilter {
    pub event: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub case_id: Option<String>,
    pub association_id: Option<String>,
    /// Only the events this node (`[node] id`) wrote.
    pub node: Option<String>,
    /// Only events after this sequence number (keyset paging).
    pub after_seq: i64,
    pub limit: i64,
}

/// One association row, as the console lists them.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AssociationRow {
    pub id: String,
    pub calling_ae: String,
    pub called_ae: String,
    pub peer: String,
    pub opened_at: String,
    pub closed_at: Option<String>,
    pub outcome: Option<String>,
    pub stored: i64,
    pub failed: i64,
    pub bytes: i64,
}

/// An event to append; absent identifiers are NULL.
#[derive(Debug, Default, Clone)]
pub struct NewEvent<'a> {
    pub event: &'a str,
    pub association_id: Option<&'a str>,
    pub sop_instance_uid: Option<&'a str>,
    pub study_instance_uid: Option<&'a str>,
    pub patient_key: Option<&'a str>,
    pub case_id: Option<&'a str>,
    pub status: Option<u16>,
    pub detail: Option<serde_json::Value>,
}

const INSERT_EVENT: &str = "INSERT INTO events (time, event, association_id, sop_instance_uid, \
     study_instance_uid, patient_key, status, detail, case_id, node) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";

impl Db {
    /// Append one audit event, stamped `now`.
    pub async fn record(&self, e: NewEvent<'_>, now: OffsetDateTime) -> Result<(), DbError> {
        bind_event(sqlx::query(INSERT_EVENT), &self.node, &e, &format_time(now))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn association_opened(
        &self,
        id: &str,
        calling_ae: &str,
        called_ae: &str,
        peer: &str,
        now: OffsetDateTime,
    ) -> Result<(), DbError> {
        let now = format_time(now);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO associations (id, calling_ae, called_ae, peer, opened_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(calling_ae)
        .bind(called_ae)
        .bind(peer)
        .bind(&now)
        .execute(&mut *tx)
        .await?;
        let e = NewEvent {
            event: event::ASSOCIATION_OPENED,
            association_id: Some(id),
            detail: Some(serde_json::json!({
                "calling_ae": calling_ae, "called_ae": called_ae, "peer": peer
            })),
            ..Default::default()
        };
        insert_event(&mut tx, &self.node, &e, &now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A refused association (or a connection cut before it became one):
    /// a closed row of the associations list, outcome "rejected: REASON",
    /// and its `association_rejected` event, together.
    pub async fn association_rejected(
        &self,
        id: &str,
        calling_ae: &str,
        called_ae: &str,
        peer: &str,
        reason: &str,
        now: OffsetDateTime,
    ) -> Result<(), DbError> {
        let now = format_time(now);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO associations (id, calling_ae, called_ae, peer, opened_at, closed_at, outcome) \
             VALUES ($1, $2, $3, $4, $5, $5, $6)",
        )
        .bind(id)
        .bind(calling_ae)
        .bind(called_ae)
        .bind(peer)
        .bind(&now)
        .bind(format!("rejected: {reason}"))
        .execute(&mut *tx)
        .await?;
        let e = NewEvent {
            event: event::ASSOCIATION_REJECTED,
            association_id: Some(id),
            detail: Some(serde_json::json!({
                "peer": peer, "calling_ae": calling_ae, "called_ae": called_ae, "reason": reason,
            })),
            ..Default::default()
        };
        insert_event(&mut tx, &self.node, &e, &now).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn association_closed(
        &self,
        id: &str,
        outcome: &str,
        stored: u64,
        failed: u64,
        bytes: u64,
        now: OffsetDateTime,
    ) -> Result<(), DbError> {
        let now = format_time(now);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE associations SET closed_at = $1, outcome = $2, stored = $3, failed = $4, \
             bytes = $5 WHERE id = $6",
        )
        .bind(&now)
        .bind(outcome)
        .bind(stored as i64)
        .bind(failed as i64)
        .bind(bytes as i64)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let e = NewEvent {
            event: event::ASSOCIATION_CLOSED,
            association_id: Some(id),
            detail: Some(serde_json::json!({
                "outcome": outcome, "stored": stored, "failed": failed, "bytes": bytes
            })),
            ..Default::default()
        };
        insert_event(&mut tx, &self.node, &e, &now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Audit events after `after_seq`, oldest first; `event` filters by name.
    pub async fn events(
        &self,
        after_seq: i64,
        event: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AuditEvent>, DbError> {
        self.events_filtered(&EventFilter {
            event: event.map(str::to_string),
            after_seq,
            limit,
            ..Default::default()
        })
        .await
    }
}

impl Db {
    /// Audit events matching `f`, oldest first.
    pub async fn events_filtered(&self, f: &EventFilter) -> Result<Vec<AuditEvent>, DbError> {
        let rows = sqlx::query(
            "SELECT seq, time, event, association_id, sop_instance_uid, study_instance_uid, \
             patient_key, status, detail, case_id, node FROM events \
             WHERE seq > $1 AND ($2 IS NULL OR event = $2) AND ($3 IS NULL OR time >= $3) \
             AND ($4 IS NULL OR time < $4) AND ($5 IS NULL OR case_id = $5) \
             AND ($6 IS NULL OR association_id = $6) AND ($7 IS NULL OR node = $7) \
             ORDER BY seq LIMIT $8",
        )
        .bind(f.after_seq)
        .bind(f.event.as_deref())
        .bind(f.since.as_deref())
        .bind(f.until.as_deref())
        .bind(f.case_id.as_deref())
        .bind(f.association_id.as_deref())
        .bind(f.node.as_deref())
        .bind(f.limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(audit_event).collect()
    }

    /// The newest `limit` events named `event`, newest first (the
    /// dashboard's recent failures; `events_filtered` pages oldest first).
    pub async fn recent_events(&self, event: &str, limit: i64) -> Result<Vec<AuditEvent>, DbError> {
        let rows = sqlx::query(
            "SELECT seq, time, event, association_id, sop_instance_uid, study_instance_uid, \
             patient_key, status, detail, case_id, node FROM events \
             WHERE event = $1 ORDER BY seq DESC LIMIT $2",
        )
        .bind(event)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(audit_event).collect()
    }

    /// How many events of each name since `since` (the dashboard's 24 h).
    pub async fn event_counts_since(&self, since: &str) -> Result<Vec<(String, i64)>, DbError> {
        Ok(sqlx::query_as(
            "SELECT event, COUNT(*) FROM events WHERE time >= $1 GROUP BY event ORDER BY event",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Associations, newest first.
    pub async fn recent_associations(
        &self,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<AssociationRow>, DbError> {
        Ok(sqlx::query_as(
            "SELECT id, calling_ae, called_ae, peer, opened_at, closed_at, outcome, stored, \
             failed, bytes FROM associations ORDER BY opened_at DESC, id LIMIT $1 OFFSET $2",
        )
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.pool)
        .await?)
    }
}

/// Append an audit event inside the caller's transaction, so the event
/// and the change it records commit together.
pub(super) async fn insert_event(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    node: &str,
    e: &NewEvent<'_>,
    now: &str,
) -> Result<(), DbError> {
    bind_event(sqlx::query(INSERT_EVENT), node, e, now)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn bind_event<'q>(
    q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    node: &str,
    e: &NewEvent<'q>,
    now: &str,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    q.bind(now.to_owned())
        .bind(e.event)
        .bind(e.association_id)
        .bind(e.sop_instance_uid)
        .bind(e.study_instance_uid)
        .bind(e.patient_key)
        .bind(e.status.map(i64::from))
        .bind(e.detail.as_ref().map(|d| d.to_string()))
        .bind(e.case_id)
        .bind(node.to_owned())
}
