//! The instance index: one row per stored SOP instance, written only by
//! the group-commit writer ([`group_commit`]), read by cases and tools.

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::audit::{NewEvent, event, insert_event};
use super::{Db, DbError, format_time};
use crate::clock::Clock;

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

/// An instance's UID and spool path, as read back.
#[derive(sqlx::FromRow)]
struct InstancePath {
    sop_instance_uid: String,
    path: String,
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

/// The one writer of instance rows ([`group_commit`]), owned by whoever
/// runs ingest: started with [`InstanceWriter::start`], fed through cloned
/// [`InstanceQueue`]s, stopped with [`InstanceWriter::shutdown`] once no
/// association is left to answer.
pub struct InstanceWriter {
    queue: InstanceQueue,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl InstanceWriter {
    /// Start the writer; each row is stamped `received_at` by `clock`.
    pub fn start(db: &Db, clock: Clock) -> Self {
        let (inserts, queue) = mpsc::channel(GROUP_COMMIT_MAX);
        let stop = CancellationToken::new();
        let task = tokio::spawn(group_commit(db.clone(), clock, queue, stop.clone()));
        InstanceWriter {
            queue: InstanceQueue { inserts },
            stop,
            task,
        }
    }

    /// A handle for one more producer (ingest, a tool).
    pub fn queue(&self) -> InstanceQueue {
        self.queue.clone()
    }

    /// As [`InstanceQueue::insert`].
    pub async fn insert(&self, row: &InstanceRow) -> Result<Inserted, DbError> {
        self.queue.insert(row).await
    }

    /// Commit and answer every row already queued, refuse new ones
    /// ([`DbError::WriterGone`]), and wait for the writer to end.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Where producers queue instance rows for the [`InstanceWriter`].
#[derive(Clone, Debug)]
pub struct InstanceQueue {
    inserts: mpsc::Sender<PendingInsert>,
}

impl InstanceQueue {
    /// Index a stored instance and log `instance_stored`, committed (and,
    /// with synchronous=FULL, flushed) before this returns; a SOP Instance
    /// UID already indexed is reported, not overwritten.
    ///
    /// Rows from concurrent associations are committed together (see
    /// [`group_commit`]): one transaction and one WAL flush for all the
    /// instances waiting at that moment instead of one each.
    pub async fn insert(&self, row: &InstanceRow) -> Result<Inserted, DbError> {
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
}

impl Db {
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
        let rows: Vec<InstancePath> =
            sqlx::query_as("SELECT sop_instance_uid, path FROM instances ORDER BY received_at")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.sop_instance_uid, r.path))
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
///
/// `stop` closes the queue: the rows already in it are still committed and
/// answered, later sends fail, and the writer ends once it is empty.
async fn group_commit(
    db: Db,
    clock: Clock,
    mut queue: mpsc::Receiver<PendingInsert>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(GROUP_COMMIT_MAX);
    let mut stopping = false;
    loop {
        let received = tokio::select! {
            // recv_many is cancel-safe: nothing is lost to the other branch.
            n = queue.recv_many(&mut batch, GROUP_COMMIT_MAX) => n,
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                queue.close();
                continue;
            }
        };
        if received == 0 {
            return;
        }
        let rows: Vec<&InstanceRow> = batch.iter().map(|p| &p.row).collect();
        match insert_instances(&db, &clock, &rows).await {
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
                    let r = insert_instances(&db, &clock, &[&p.row])
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
    db: &Db,
    clock: &Clock,
    rows: &[&InstanceRow],
) -> Result<Vec<Inserted>, DbError> {
    // Insert first (ON CONFLICT DO NOTHING, SQLite >= 3.24 and PostgreSQL
    // alike): a transaction that starts by writing takes the write lock at
    // once, where a read-then-write one can fail with SQLITE_BUSY when
    // another process writes.
    let mut tx = db.pool.begin().await?;
    let mut results = Vec::with_capacity(rows.len());
    for row in rows {
        let now = format_time(clock.now());
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
        .bind(&now)
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
        insert_event(&mut tx, &db.node, &e, &now).await?;
        results.push(Inserted::New);
    }
    tx.commit().await?;
    Ok(results)
}
