//! Work claimed with leases, so that several nodes on one database never do
//! the same work twice and take over each other's when one dies: named
//! cluster-wide roles (`leases`: the case assembler), case runs
//! (`cases.claimed_by`/`lease_until`) and deliveries (the same columns of
//! `outbox`). A lease is a time in the stored format; it is renewed while
//! the work goes on and may be taken by any node once it is in the past (the
//! nodes' clocks must agree to well within a lease: NTP).
//!
//! PostgreSQL claims with `SELECT ... FOR UPDATE SKIP LOCKED`, so nodes
//! claiming at once take different rows instead of queueing on one; SQLite
//! has one writer at a time, so the same statement without the locking
//! clause is already exclusive.

use std::time::Duration;

use sqlx::{AssertSqlSafe, Row};
use time::OffsetDateTime;

use super::cases::insert_transition;
use super::outbox::OUTBOX_COLUMNS;
use super::{Backend, CaseState, Db, DbError, DeliveryState, OutboxRow, format_time};

/// The role of the node that assigns instances to cases and decides them.
pub const ASSEMBLER_ROLE: &str = "case_assembler";

impl Db {
    /// `FOR UPDATE SKIP LOCKED` where the backend has row locks.
    pub(super) fn skip_locked(&self) -> &'static str {
        match self.backend {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        }
    }

    /// Take or renew the named role until `now + ttl`; whether this node
    /// holds it now. Another node's unexpired lease is left alone.
    pub async fn hold_role(
        &self,
        name: &str,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<bool, DbError> {
        let n = sqlx::query(
            "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
             expires_at = excluded.expires_at \
             WHERE leases.holder = excluded.holder OR leases.expires_at < $4",
        )
        .bind(name)
        .bind(&*self.node)
        .bind(format_time(now + ttl))
        .bind(format_time(now))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Give the role up (shutdown), so another node need not wait it out.
    pub async fn release_role(&self, name: &str) -> Result<(), DbError> {
        sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(&*self.node)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Claim the oldest ready case for this node until `lease_until`,
    /// moving it to `queued`: (case id, revision), or `None` when no case is
    /// ready (or every ready one is being claimed by another node).
    pub async fn claim_ready_case(
        &self,
        lease_until: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<Option<(String, i64)>, DbError> {
        let now = format_time(now);
        let reason = "queued for inference";
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(AssertSqlSafe(format!(
            "UPDATE cases SET state = $1, reason = $2, updated_at = $3, claimed_by = $4, \
             lease_until = $5 WHERE id = (SELECT id FROM cases WHERE state = $6 \
             ORDER BY opened_at, id LIMIT 1{}) AND state = $6 RETURNING id, revision",
            self.skip_locked()
        )))
        .bind(CaseState::Queued.as_str())
        .bind(reason)
        .bind(&now)
        .bind(&*self.node)
        .bind(format_time(lease_until))
        .bind(CaseState::Ready.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let (id, revision): (String, i64) = (row.try_get("id")?, row.try_get("revision")?);
        insert_transition(
            &mut tx,
            &self.node,
            &id,
            CaseState::Ready,
            CaseState::Queued,
            reason,
            &now,
        )
        .await?;
        tx.commit().await?;
        Ok(Some((id, revision)))
    }

    /// Renew this node's leases on the cases it has queued or running.
    pub async fn renew_case_claims(&self, lease_until: OffsetDateTime) -> Result<u64, DbError> {
        Ok(sqlx::query(
            "UPDATE cases SET lease_until = $1 WHERE claimed_by = $2 AND state IN ($3, $4)",
        )
        .bind(format_time(lease_until))
        .bind(&*self.node)
        .bind(CaseState::Queued.as_str())
        .bind(CaseState::Running.as_str())
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Queued or running cases whose run nobody holds: claimed by a node
    /// whose lease ran out (it died, or rows from before leases), and, with
    /// `own`, every one claimed by this node (it restarted: whatever it
    /// ran is gone). A live node never takes its own claims back.
    /// `(id, state, claimed_by)`.
    pub async fn orphaned_cases(
        &self,
        own: bool,
        now: OffsetDateTime,
    ) -> Result<Vec<(String, CaseState, String)>, DbError> {
        let rows = sqlx::query(
            "SELECT id, state, claimed_by FROM cases WHERE state IN ($1, $2) \
             AND ((claimed_by <> $3 AND lease_until < $4) OR (claimed_by = $3 AND $5)) \
             ORDER BY opened_at",
        )
        .bind(CaseState::Queued.as_str())
        .bind(CaseState::Running.as_str())
        .bind(&*self.node)
        .bind(format_time(now))
        .bind(own)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let state: String = r.try_get("state")?;
                let state = state
                    .parse()
                    .map_err(|e| DbError::Sql(sqlx::Error::Decode(Box::new(e))))?;
                Ok((r.try_get("id")?, state, r.try_get("claimed_by")?))
            })
            .collect()
    }

    /// Claim up to `limit` due deliveries for this node until `lease_until`
    /// (rows another node holds under a live lease are skipped), oldest
    /// first; [`Db::record_delivery`] releases each.
    pub async fn claim_due_deliveries(
        &self,
        lease_until: OffsetDateTime,
        now: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<OutboxRow>, DbError> {
        let (now, lease) = (format_time(now), format_time(lease_until));
        let mut tx = self.pool.begin().await?;
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE outbox SET claimed_by = $1, lease_until = $2 WHERE id IN \
             (SELECT id FROM outbox WHERE state = $3 AND next_attempt_at <= $4 \
             AND (claimed_by = '' OR claimed_by = $1 OR lease_until < $4) \
             ORDER BY id LIMIT $5{})",
            self.skip_locked()
        )))
        .bind(&*self.node)
        .bind(&lease)
        .bind(DeliveryState::Pending.as_str())
        .bind(&now)
        .bind(limit)
        .execute(&mut *tx)
        .await?;
        let rows = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {OUTBOX_COLUMNS} FROM outbox o JOIN outputs p \
             ON p.sop_instance_uid = o.sop_instance_uid \
             WHERE o.claimed_by = $1 AND o.lease_until = $2 AND o.state = $3 ORDER BY o.id"
        )))
        .bind(&*self.node)
        .bind(&lease)
        .bind(DeliveryState::Pending.as_str())
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows)
    }

    /// Inside an assembly transaction: whether this node still holds
    /// `role` (checked and row-locked in the same transaction, so a node
    /// that lost the role while it worked commits nothing).
    pub(super) async fn still_holds(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        role: &str,
        now: &str,
    ) -> Result<bool, DbError> {
        let n = sqlx::query(
            "UPDATE leases SET holder = holder WHERE name = $1 AND holder = $2 AND expires_at >= $3",
        )
        .bind(role)
        .bind(&*self.node)
        .bind(now)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        Ok(n == 1)
    }
}
