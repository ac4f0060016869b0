//! The only module with SQL: the audit log (associations, events) and the
//! instance index, on sqlx. Queries are runtime-checked and written in
//! portable SQL with `$n` placeholders so the same text runs on PostgreSQL.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, Row, SqlitePool};
use tokio::sync::{mpsc, oneshot};

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
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database: the instance writer has stopped")]
    WriterGone,
    /// A group commit failed for a reason not of one row's making.
    #[error("{0}")]
    Batch(String),
}

/// The current time as the audit log stores it: RFC 3339 UTC with
/// milliseconds, which sorts lexicographically.
pub fn now() -> String {
    format_time(time::OffsetDateTime::now_utc())
}

/// Format an instant as the database stores it.
pub fn format_time(t: time::OffsetDateTime) -> String {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.to_offset(time::UtcOffset::UTC)
        .format(&fmt)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Parse a stored instant.
pub fn parse_time(s: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

/// One received instance, as indexed.
#[derive(Debug, Clone)]
pub struct InstanceRow {
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub patient_key: String,
    pub modality: String,
    pub study_date: String,
    pub transfer_syntax: String,
    pub size_bytes: u64,
    pub path: String,
    pub association_id: String,
    pub calling_ae: String,
    pub patient_id_key: String,
    pub laterality: String,
    pub view: String,
    pub series_description: String,
    pub image_type: String,
    /// An ultrasound image that is Doppler / colour flow.
    pub us_doppler: bool,
}

/// What happened to an insert.
#[derive(Debug, PartialEq, Eq)]
pub enum Inserted {
    New,
    /// The SOP Instance UID is already indexed (kept, with its path).
    Duplicate {
        existing_path: String,
    },
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

#[derive(Clone, Debug)]
pub struct Db {
    pool: SqlitePool,
    /// The queue of [`group_commit`], the one writer of instance rows.
    inserts: mpsc::Sender<PendingInsert>,
}

const INSERT_EVENT: &str = "INSERT INTO events (time, event, association_id, sop_instance_uid, \
     study_instance_uid, patient_key, status, detail, case_id) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";

impl Db {
    /// Open (creating when missing) and migrate. SQLite runs in WAL mode with
    /// synchronous=FULL: a committed row survives power loss, which is what a
    /// C-STORE Success promises.
    pub async fn connect(url: &str) -> Result<Self, DbError> {
        Self::connect_with(url, Duration::from_secs(10)).await
    }

    /// As [`Db::connect`], waiting at most `busy_timeout` for a lock held by
    /// another connection before a write fails (and the C-STORE with it).
    pub async fn connect_with(url: &str, busy_timeout: Duration) -> Result<Self, DbError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(busy_timeout)
            .foreign_keys(true);
        if let Some(parent) = Path::new(options.get_filename()).parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        // The database holds PHI: owner-only, whatever the umask.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let file = Path::new(options.get_filename());
            if file.exists() {
                let _ = std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600));
            }
        }
        let (inserts, queue) = mpsc::channel(GROUP_COMMIT_MAX);
        tokio::spawn(group_commit(pool.clone(), queue));
        Ok(Db { pool, inserts })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Append one audit event.
    pub async fn record(&self, e: NewEvent<'_>) -> Result<(), DbError> {
        bind_event(sqlx::query(INSERT_EVENT), &e)
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
    ) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO associations (id, calling_ae, called_ae, peer, opened_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(calling_ae)
        .bind(called_ae)
        .bind(peer)
        .bind(now())
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
        insert_event(&mut tx, &e).await?;
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
    ) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE associations SET closed_at = $1, outcome = $2, stored = $3, failed = $4, \
             bytes = $5 WHERE id = $6",
        )
        .bind(now())
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
        insert_event(&mut tx, &e).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Index a stored instance and log `instance_stored`, committed (and,
    /// with synchronous=FULL, flushed) before this returns; a SOP Instance
    /// UID already indexed is reported, not overwritten.
    ///
    /// Rows from concurrent associations are committed together (see
    /// [`group_commit`]): one transaction and one WAL flush for all the
    /// instances waiting at that moment instead of one each.
    pub async fn insert_instance(&self, row: &InstanceRow) -> Result<Inserted, DbError> {
        let (done, result) = oneshot::channel();
        let pending = PendingInsert {
            row: row.clone(),
            done,
        };
        if self.inserts.send(pending).await.is_err() {
            return Err(DbError::WriterGone);
        }
        result.await.unwrap_or(Err(DbError::WriterGone))
    }

    /// The spool path of an indexed instance.
    pub async fn instance_path(&self, sop_instance_uid: &str) -> Result<Option<String>, DbError> {
        Ok(
            sqlx::query_scalar("SELECT path FROM instances WHERE sop_instance_uid = $1")
                .bind(sop_instance_uid)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    pub async fn instance_count(&self) -> Result<i64, DbError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM instances")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Every indexed instance's UID and path, for checks and tools.
    pub async fn instance_paths(&self) -> Result<Vec<(String, String)>, DbError> {
        let rows = sqlx::query("SELECT sop_instance_uid, path FROM instances ORDER BY received_at")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1)))
            .collect())
    }

    /// Audit events after `after_seq`, oldest first; `event` filters by name.
    pub async fn events(
        &self,
        after_seq: i64,
        event: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AuditEvent>, DbError> {
        let rows = sqlx::query(
            "SELECT seq, time, event, association_id, sop_instance_uid, study_instance_uid, \
             patient_key, status, detail, case_id FROM events \
             WHERE seq > $1 AND ($2 IS NULL OR event = $2) ORDER BY seq LIMIT $3",
        )
        .bind(after_seq)
        .bind(event)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| AuditEvent {
                seq: r.get(0),
                time: r.get(1),
                event: r.get(2),
                association_id: r.get(3),
                sop_instance_uid: r.get(4),
                study_instance_uid: r.get(5),
                patient_key: r.get(6),
                status: r.get(7),
                detail: r
                    .get::<Option<String>, _>(8)
                    .and_then(|d| serde_json::from_str(&d).ok()),
                case_id: r.get(9),
            })
            .collect())
    }
}

/// An instance row waiting for the group commit, and whom to answer.
struct PendingInsert {
    row: InstanceRow,
    done: oneshot::Sender<Result<Inserted, DbError>>,
}

/// Most rows in one group commit: bounds the transaction (and so how long
/// it holds the write lock) whatever the number of associations.
const GROUP_COMMIT_MAX: usize = 64;

/// The instance writer: takes every row waiting, commits them in one
/// transaction, answers each. With one association this is one row per
/// commit, as before; with several, the rows that arrived while the last
/// commit was flushing share the next flush (group commit, as PostgreSQL's
/// WAL writer and InnoDB do), and the associations stop taking turns at
/// SQLite's write lock. A failed batch of several rows is retried row by
/// row when a row broke a constraint, so one bad row fails only its own
/// C-STORE.
async fn group_commit(pool: SqlitePool, mut queue: mpsc::Receiver<PendingInsert>) {
    let mut batch = Vec::with_capacity(GROUP_COMMIT_MAX);
    while queue.recv_many(&mut batch, GROUP_COMMIT_MAX).await > 0 {
        let rows: Vec<&InstanceRow> = batch.iter().map(|p| &p.row).collect();
        match insert_instances(&pool, &rows).await {
            Ok(results) => {
                for (p, r) in batch.drain(..).zip(results) {
                    let _ = p.done.send(Ok(r));
                }
            }
            Err(e) if batch.len() == 1 => {
                let p = batch.remove(0);
                let _ = p.done.send(Err(e));
            }
            Err(e) if violates_constraint(&e) => {
                // One row's own fault: isolate it.
                for p in batch.drain(..) {
                    let r = insert_instances(&pool, &[&p.row])
                        .await
                        .map(|mut one| one.remove(0));
                    let _ = p.done.send(r);
                }
            }
            Err(e) => {
                // The database's fault (locked, full, gone): every row of the
                // batch fails now, rather than each waiting out its own
                // busy timeout, and each peer will resend.
                let message = e.to_string();
                for p in batch.drain(..) {
                    let _ = p.done.send(Err(DbError::Batch(message.clone())));
                }
            }
        }
    }
}

/// A constraint violation is the fault of the row that broke it.
fn violates_constraint(e: &DbError) -> bool {
    matches!(e, DbError::Sql(sqlx::Error::Database(d)) if d.kind() != sqlx::error::ErrorKind::Other)
}

/// Insert rows and their `instance_stored` events in one transaction.
async fn insert_instances(
    pool: &SqlitePool,
    rows: &[&InstanceRow],
) -> Result<Vec<Inserted>, DbError> {
    // Insert first (ON CONFLICT DO NOTHING, SQLite >= 3.24 and PostgreSQL
    // alike): a transaction that starts by writing takes the write lock at
    // once, where a read-then-write one can fail with SQLITE_BUSY when
    // another process writes.
    let mut tx = pool.begin().await?;
    let mut results = Vec::with_capacity(rows.len());
    for row in rows {
        let inserted = sqlx::query(
            "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid, \
             series_instance_uid, patient_key, modality, study_date, transfer_syntax, size_bytes, \
             path, received_at, association_id, calling_ae, patient_id_key, laterality, view, \
             series_description, image_type, us_doppler) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, \
             $19) \
             ON CONFLICT (sop_instance_uid) DO NOTHING",
        )
        .bind(&row.sop_instance_uid)
        .bind(&row.sop_class_uid)
        .bind(&row.study_instance_uid)
        .bind(&row.series_instance_uid)
        .bind(&row.patient_key)
        .bind(&row.modality)
        .bind(&row.study_date)
        .bind(&row.transfer_syntax)
        .bind(row.size_bytes as i64)
        .bind(&row.path)
        .bind(now())
        .bind(&row.association_id)
        .bind(&row.calling_ae)
        .bind(&row.patient_id_key)
        .bind(&row.laterality)
        .bind(&row.view)
        .bind(&row.series_description)
        .bind(&row.image_type)
        .bind(row.us_doppler)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            // Indexed before, or earlier in this very batch.
            let existing_path: Option<String> =
                sqlx::query_scalar("SELECT path FROM instances WHERE sop_instance_uid = $1")
                    .bind(&row.sop_instance_uid)
                    .fetch_optional(&mut *tx)
                    .await?;
            results.push(Inserted::Duplicate {
                existing_path: existing_path.unwrap_or_default(),
            });
            continue;
        }
        let e = NewEvent {
            event: event::INSTANCE_STORED,
            association_id: Some(&row.association_id),
            sop_instance_uid: Some(&row.sop_instance_uid),
            study_instance_uid: Some(&row.study_instance_uid),
            patient_key: Some(&row.patient_key),
            status: Some(0),
            detail: Some(serde_json::json!({
                "sop_class_uid": row.sop_class_uid,
                "modality": row.modality,
                "transfer_syntax": row.transfer_syntax,
                "size_bytes": row.size_bytes,
                "path": row.path,
            })),
            ..Default::default()
        };
        insert_event(&mut tx, &e).await?;
        results.push(Inserted::New);
    }
    tx.commit().await?;
    Ok(results)
}

/// Append an audit event inside the caller's transaction, so the event
/// and the change it records commit together.
async fn insert_event(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    e: &NewEvent<'_>,
) -> Result<(), DbError> {
    bind_event(sqlx::query(INSERT_EVENT), e)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn bind_event<'q>(
    q: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    e: &NewEvent<'q>,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    q.bind(now())
        .bind(e.event)
        .bind(e.association_id)
        .bind(e.sop_instance_uid)
        .bind(e.study_instance_uid)
        .bind(e.patient_key)
        .bind(e.status.map(i64::from))
        .bind(e.detail.as_ref().map(|d| d.to_string()))
        .bind(e.case_id)
}

// ---------------------------------------------------------------------------
// Cases (issue 5): rows, membership and state transitions.

/// Case audit event names.
pub mod case_event {
    pub const CASE_OPENED: &str = "case_opened";
    pub const CASE_STATE_CHANGED: &str = "case_state_changed";
}

/// An instance not yet assigned to a case.
#[derive(Debug, Clone)]
pub struct UnassignedInstance {
    pub sop_instance_uid: String,
    pub patient_key: String,
    pub patient_id_key: String,
    pub study_date: String,
}

/// One step of a case-assignment round ([`Db::assign_instances`]).
#[derive(Debug, Clone)]
pub enum Assignment {
    /// Open a new case with this instance.
    Open {
        case_id: String,
        patient_key: String,
        sop_instance_uid: String,
        study_date: String,
    },
    /// Add the instance to a case (in `from_state`), widening its study
    /// dates to `oldest..newest`; `reopen` makes a finished case collect
    /// again as a new revision, with this reason.
    Add {
        case_id: String,
        from_state: String,
        sop_instance_uid: String,
        oldest: String,
        newest: String,
        reopen: Option<&'static str>,
    },
}

/// One case row.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CaseRow {
    pub id: String,
    pub patient_key: String,
    pub state: String,
    pub revision: i64,
    pub reason: String,
    pub opened_at: String,
    pub first_instance_at: String,
    pub last_instance_at: String,
    pub oldest_study_date: String,
    pub newest_study_date: String,
    pub inputs_digest: String,
    pub updated_at: String,
}

/// What the completeness rules read of a case member.
#[derive(Debug, Clone)]
pub struct CaseMember {
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub modality: String,
    pub laterality: String,
    pub view: String,
    pub series_description: String,
    pub image_type: String,
    pub path: String,
    /// An ultrasound image that is Doppler / colour flow.
    pub us_doppler: bool,
}

const CASE_COLUMNS: &str = "id, patient_key, state, revision, reason, opened_at, \
     first_instance_at, last_instance_at, oldest_study_date, newest_study_date, inputs_digest, \
     updated_at";

fn case_row(r: sqlx::sqlite::SqliteRow) -> CaseRow {
    CaseRow {
        id: r.get(0),
        patient_key: r.get(1),
        state: r.get(2),
        revision: r.get(3),
        reason: r.get(4),
        opened_at: r.get(5),
        first_instance_at: r.get(6),
        last_instance_at: r.get(7),
        oldest_study_date: r.get(8),
        newest_study_date: r.get(9),
        inputs_digest: r.get(10),
        updated_at: r.get(11),
    }
}

impl Db {
    /// Stored instances that belong to no case yet, oldest first.
    pub async fn unassigned_instances(
        &self,
        limit: i64,
    ) -> Result<Vec<UnassignedInstance>, DbError> {
        let rows = sqlx::query(
            "SELECT i.sop_instance_uid, i.patient_key, i.patient_id_key, i.study_date \
             FROM instances i LEFT JOIN case_instances c ON c.sop_instance_uid = i.sop_instance_uid \
             WHERE c.case_id IS NULL ORDER BY i.received_at LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| UnassignedInstance {
                sop_instance_uid: r.get(0),
                patient_key: r.get(1),
                patient_id_key: r.get(2),
                study_date: r.get(3),
            })
            .collect())
    }

    pub async fn cases_of_patient(&self, patient_key: &str) -> Result<Vec<CaseRow>, DbError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {CASE_COLUMNS} FROM cases WHERE patient_key = $1 ORDER BY opened_at DESC"
        )))
        .bind(patient_key)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(case_row).collect())
    }

    pub async fn cases_in_states(&self, states: &[&str]) -> Result<Vec<CaseRow>, DbError> {
        let mut all = Vec::new();
        for state in states {
            let rows = sqlx::query(AssertSqlSafe(format!(
                "SELECT {CASE_COLUMNS} FROM cases WHERE state = $1 ORDER BY opened_at"
            )))
            .bind(*state)
            .fetch_all(&self.pool)
            .await?;
            all.extend(rows.into_iter().map(case_row));
        }
        Ok(all)
    }

    pub async fn all_cases(&self) -> Result<Vec<CaseRow>, DbError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {CASE_COLUMNS} FROM cases ORDER BY opened_at"
        )))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(case_row).collect())
    }

    pub async fn case(&self, id: &str) -> Result<Option<CaseRow>, DbError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {CASE_COLUMNS} FROM cases WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(case_row))
    }

    /// Record a round of case assignment in one transaction (one commit,
    /// not one per instance: the assembler assigns a burst of instances at
    /// once while ingest competes for the same write lock).
    pub async fn assign_instances(&self, steps: &[Assignment], now: &str) -> Result<(), DbError> {
        if steps.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for step in steps {
            match step {
                Assignment::Open {
                    case_id,
                    patient_key,
                    sop_instance_uid,
                    study_date,
                } => {
                    open_case(
                        &mut tx,
                        case_id,
                        patient_key,
                        sop_instance_uid,
                        study_date,
                        now,
                    )
                    .await?
                }
                Assignment::Add {
                    case_id,
                    from_state,
                    sop_instance_uid,
                    oldest,
                    newest,
                    reopen,
                } => {
                    add_to_case(
                        &mut tx,
                        case_id,
                        from_state,
                        sop_instance_uid,
                        (oldest, newest),
                        now,
                        *reopen,
                    )
                    .await?
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Move a case from `from` to `to` if it is still in `from`; returns
    /// whether it moved. The transition and an audit event are recorded.
    pub async fn transition_case(
        &self,
        id: &str,
        from: &str,
        to: &str,
        reason: &str,
        now: &str,
    ) -> Result<bool, DbError> {
        let mut tx = self.pool.begin().await?;
        let moved = sqlx::query(
            "UPDATE cases SET state = $1, reason = $2, updated_at = $3 WHERE id = $4 AND state = $5",
        )
        .bind(to)
        .bind(reason)
        .bind(now)
        .bind(id)
        .bind(from)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if moved == 0 {
            return Ok(false);
        }
        insert_transition(&mut tx, id, from, to, reason, now).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Reopen a case as a new revision (instances arrived while it ran).
    pub async fn reopen_case(
        &self,
        id: &str,
        from: &str,
        reason: &str,
        now: &str,
    ) -> Result<bool, DbError> {
        let mut tx = self.pool.begin().await?;
        let moved = sqlx::query(
            "UPDATE cases SET state = 'collecting', revision = revision + 1, reason = $1, \
             first_instance_at = $2, updated_at = $3 WHERE id = $4 AND state = $5",
        )
        .bind(reason)
        .bind(now)
        .bind(now)
        .bind(id)
        .bind(from)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if moved == 0 {
            return Ok(false);
        }
        insert_transition(&mut tx, id, from, "collecting", reason, now).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Record the inputs a run used (the amendment check compares them).
    pub async fn set_case_inputs(&self, id: &str, digest: &str) -> Result<(), DbError> {
        sqlx::query("UPDATE cases SET inputs_digest = $1 WHERE id = $2")
            .bind(digest)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn case_members(&self, id: &str) -> Result<Vec<CaseMember>, DbError> {
        let rows = sqlx::query(
            "SELECT i.sop_instance_uid, i.sop_class_uid, i.study_instance_uid, \
             i.series_instance_uid, i.modality, i.laterality, i.view, i.series_description, \
             i.image_type, i.path, i.us_doppler FROM case_instances c \
             JOIN instances i ON i.sop_instance_uid = c.sop_instance_uid \
             WHERE c.case_id = $1 ORDER BY i.received_at",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| CaseMember {
                sop_instance_uid: r.get(0),
                sop_class_uid: r.get(1),
                study_instance_uid: r.get(2),
                series_instance_uid: r.get(3),
                modality: r.get(4),
                laterality: r.get(5),
                view: r.get(6),
                series_description: r.get(7),
                image_type: r.get(8),
                path: r.get(9),
                us_doppler: r.get(10),
            })
            .collect())
    }

    /// A case's transitions, oldest first: (time, from, to, reason).
    pub async fn case_transitions(
        &self,
        id: &str,
    ) -> Result<Vec<(String, String, String, String)>, DbError> {
        let rows = sqlx::query(
            "SELECT time, from_state, to_state, reason FROM case_transitions \
             WHERE case_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
    }
}

/// Open a new case holding its first instance.
async fn open_case(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    id: &str,
    patient_key: &str,
    sop_instance_uid: &str,
    study_date: &str,
    now: &str,
) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO cases (id, patient_key, state, revision, reason, opened_at, \
         first_instance_at, last_instance_at, oldest_study_date, newest_study_date, updated_at) \
         VALUES ($1, $2, 'collecting', 0, 'first instance', $3, $4, $5, $6, $7, $8)",
    )
    .bind(id)
    .bind(patient_key)
    .bind(now)
    .bind(now)
    .bind(now)
    .bind(study_date)
    .bind(study_date)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO case_instances (case_id, sop_instance_uid, added_at) VALUES ($1, $2, $3)",
    )
    .bind(id)
    .bind(sop_instance_uid)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    let e = NewEvent {
        event: case_event::CASE_OPENED,
        sop_instance_uid: Some(sop_instance_uid),
        patient_key: Some(patient_key),
        case_id: Some(id),
        ..Default::default()
    };
    insert_event(tx, &e).await
}

/// Add an instance to an existing case, widening its study-date range;
/// `reopen` moves a finished case back to collecting as a new revision.
async fn add_to_case(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    case_id: &str,
    from_state: &str,
    sop_instance_uid: &str,
    (oldest, newest): (&str, &str),
    now: &str,
    reopen: Option<&str>,
) -> Result<(), DbError> {
    let added = sqlx::query(
        "INSERT INTO case_instances (case_id, sop_instance_uid, added_at) VALUES ($1, $2, $3) \
         ON CONFLICT (case_id, sop_instance_uid) DO NOTHING",
    )
    .bind(case_id)
    .bind(sop_instance_uid)
    .bind(now)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if added == 0 {
        return Ok(());
    }
    sqlx::query(
        "UPDATE cases SET last_instance_at = $1, oldest_study_date = $2, \
         newest_study_date = $3, updated_at = $4 WHERE id = $5",
    )
    .bind(now)
    .bind(oldest)
    .bind(newest)
    .bind(now)
    .bind(case_id)
    .execute(&mut **tx)
    .await?;
    if let Some(reason) = reopen {
        sqlx::query(
            "UPDATE cases SET state = 'collecting', revision = revision + 1, reason = $1, \
             first_instance_at = $2 WHERE id = $3",
        )
        .bind(reason)
        .bind(now)
        .bind(case_id)
        .execute(&mut **tx)
        .await?;
        insert_transition(tx, case_id, from_state, "collecting", reason, now).await?;
    }
    Ok(())
}

async fn insert_transition(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    id: &str,
    from: &str,
    to: &str,
    reason: &str,
    now: &str,
) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO case_transitions (case_id, time, from_state, to_state, reason) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(now)
    .bind(from)
    .bind(to)
    .bind(reason)
    .execute(&mut **tx)
    .await?;
    let e = NewEvent {
        event: case_event::CASE_STATE_CHANGED,
        case_id: Some(id),
        detail: Some(serde_json::json!({ "from": from, "to": to, "reason": reason })),
        ..Default::default()
    };
    insert_event(tx, &e).await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Outputs and the outbox (issue 6).

/// Outbox audit event names.
pub mod outbox_event {
    pub const OUTPUT_CREATED: &str = "output_created";
    pub const DELIVERY_ATTEMPTED: &str = "delivery_attempted";
    pub const DELIVERY_SENT: &str = "delivery_sent";
    pub const DELIVERY_DEAD: &str = "delivery_dead_letter";
    pub const DELIVERY_RETRY_REQUESTED: &str = "delivery_retry_requested";
}

/// One object the node made.
#[derive(Debug, Clone)]
pub struct OutputRow {
    pub sop_instance_uid: String,
    pub case_id: String,
    pub revision: i64,
    pub kind: String,
    pub sop_class_uid: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub path: String,
}

/// One object x destination delivery.
#[derive(Debug, Clone, Serialize)]
pub struct OutboxRow {
    pub id: i64,
    pub sop_instance_uid: String,
    pub destination: String,
    pub state: String,
    pub attempts: i64,
    pub last_status: String,
    pub next_attempt_at: String,
    pub created_at: String,
    pub updated_at: String,
    pub case_id: String,
    pub kind: String,
    pub path: String,
}

const OUTBOX_COLUMNS: &str = "o.id, o.sop_instance_uid, o.destination, o.state, o.attempts, \
     o.last_status, o.next_attempt_at, o.created_at, o.updated_at, p.case_id, p.kind, p.path";

fn outbox_row(r: sqlx::sqlite::SqliteRow) -> OutboxRow {
    OutboxRow {
        id: r.get(0),
        sop_instance_uid: r.get(1),
        destination: r.get(2),
        state: r.get(3),
        attempts: r.get(4),
        last_status: r.get(5),
        next_attempt_at: r.get(6),
        created_at: r.get(7),
        updated_at: r.get(8),
        case_id: r.get(9),
        kind: r.get(10),
        path: r.get(11),
    }
}

impl Db {
    /// Record an output and queue it for each destination, in one
    /// transaction. Recording the same SOP Instance UID again (a rerun after
    /// a crash) changes nothing: the same object is delivered once.
    pub async fn add_output(
        &self,
        out: &OutputRow,
        destinations: &[String],
    ) -> Result<bool, DbError> {
        let now = now();
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
        .bind(&out.kind)
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
                     created_at, updated_at) VALUES ($1, $2, 'pending', $3, $4, $5) \
                     ON CONFLICT (sop_instance_uid, destination) DO NOTHING",
                )
                .bind(&out.sop_instance_uid)
                .bind(dest)
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
                    "kind": out.kind, "revision": out.revision, "path": out.path,
                    "sop_class_uid": out.sop_class_uid, "destinations": destinations,
                })),
                ..Default::default()
            };
            insert_event(&mut tx, &e).await?;
        }
        tx.commit().await?;
        Ok(new)
    }

    /// Outputs of a case (all revisions), oldest first.
    pub async fn case_outputs(&self, case_id: &str) -> Result<Vec<OutputRow>, DbError> {
        let rows = sqlx::query(
            "SELECT sop_instance_uid, case_id, revision, kind, sop_class_uid, study_instance_uid, \
             series_instance_uid, path FROM outputs WHERE case_id = $1 \
             ORDER BY created_at, sop_instance_uid",
        )
        .bind(case_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| OutputRow {
                sop_instance_uid: r.get(0),
                case_id: r.get(1),
                revision: r.get(2),
                kind: r.get(3),
                sop_class_uid: r.get(4),
                study_instance_uid: r.get(5),
                series_instance_uid: r.get(6),
                path: r.get(7),
            })
            .collect())
    }

    /// Pending deliveries due at `now`, oldest first.
    pub async fn due_deliveries(&self, now: &str, limit: i64) -> Result<Vec<OutboxRow>, DbError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {OUTBOX_COLUMNS} FROM outbox o JOIN outputs p \
             ON p.sop_instance_uid = o.sop_instance_uid \
             WHERE o.state = 'pending' AND o.next_attempt_at <= $1 ORDER BY o.id LIMIT $2"
        )))
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(outbox_row).collect())
    }

    /// The earliest pending attempt time, if any.
    pub async fn next_delivery_at(&self) -> Result<Option<String>, DbError> {
        Ok(
            sqlx::query_scalar("SELECT MIN(next_attempt_at) FROM outbox WHERE state = 'pending'")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    pub async fn outbox(&self) -> Result<Vec<OutboxRow>, DbError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {OUTBOX_COLUMNS} FROM outbox o JOIN outputs p \
             ON p.sop_instance_uid = o.sop_instance_uid ORDER BY o.id"
        )))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(outbox_row).collect())
    }

    /// Record one delivery attempt: `state` is 'sent', 'pending' (retry at
    /// `next_attempt_at`) or 'dead'.
    pub async fn record_delivery(
        &self,
        row: &OutboxRow,
        state: &str,
        status: &str,
        next_attempt_at: &str,
    ) -> Result<(), DbError> {
        let now = now();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE outbox SET state = $1, attempts = attempts + 1, last_status = $2, \
             next_attempt_at = $3, updated_at = $4 WHERE id = $5",
        )
        .bind(state)
        .bind(status)
        .bind(next_attempt_at)
        .bind(&now)
        .bind(row.id)
        .execute(&mut *tx)
        .await?;
        let event = match state {
            "sent" => outbox_event::DELIVERY_SENT,
            "dead" => outbox_event::DELIVERY_DEAD,
            _ => outbox_event::DELIVERY_ATTEMPTED,
        };
        let e = NewEvent {
            event,
            sop_instance_uid: Some(&row.sop_instance_uid),
            case_id: Some(&row.case_id),
            detail: Some(serde_json::json!({
                "destination": row.destination, "attempt": row.attempts + 1,
                "status": status, "next_attempt_at": (state == "pending").then_some(next_attempt_at),
            })),
            ..Default::default()
        };
        insert_event(&mut tx, &e).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Operator retry: a dead (or pending) row becomes due now.
    pub async fn retry_delivery(&self, id: i64) -> Result<bool, DbError> {
        let now = now();
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE outbox SET state = 'pending', next_attempt_at = $1, updated_at = $2 \
             WHERE id = $3 AND state IN ('dead', 'pending')",
        )
        .bind(&now)
        .bind(&now)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 1 {
            let e = NewEvent {
                event: outbox_event::DELIVERY_RETRY_REQUESTED,
                detail: Some(serde_json::json!({ "outbox_id": id })),
                ..Default::default()
            };
            insert_event(&mut tx, &e).await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }
}
