//! The only module with SQL, split by table family: the audit log
//! (associations, events: `audit`), the instance index and its group-commit
//! writer (`instances`), cases (`cases`) and outputs with their outbox
//! (`outbox`); the stored vocabularies (case and delivery states) are enums
//! in `state`. This file owns the connection, the error type and the stored
//! time format. Queries are runtime-checked, rows are read by column name,
//! states are bound as parameters, and the SQL is portable with `$n`
//! placeholders so the same text runs on PostgreSQL. Nothing outside `db`
//! writes SQL. Every write takes its time from the caller (the node's
//! `Clock`); the instance writer is started and stopped by its owner
//! ([`InstanceWriter`]); the file's permissions belong to the storage layout.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

mod audit;
mod cases;
mod instances;
mod outbox;
mod state;

pub use audit::{AssociationRow, AuditEvent, EventFilter, NewEvent, event};
pub use cases::{Assignment, CaseMember, CaseRow, UnassignedInstance, case_event};
pub use instances::{Inserted, InstanceQueue, InstanceRow, InstanceWriter};
pub use outbox::{OutboxRow, OutputRow, outbox_event};
pub use state::{CaseState, DeliveryState, UnknownName};

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

/// Format an instant as the database stores it: RFC 3339 UTC with
/// milliseconds, which sorts lexicographically.
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

#[derive(Clone, Debug)]
pub struct Db {
    pool: SqlitePool,
    /// The SQLite file, for whoever lays out storage (permissions).
    file: Option<Arc<Path>>,
}

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
        let file = Path::new(options.get_filename());
        let file = file.exists().then(|| Arc::from(file));
        Ok(Db { pool, file })
    }

    /// The database file, when the database is one (SQLite on disk): it
    /// holds PHI, and the storage layout makes it owner-only.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The database answers (readiness).
    pub async fn ping(&self) -> Result<(), DbError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
