//! The only module with SQL, split by table family: the audit log
//! (associations, events: `audit`), the instance index and its group-commit
//! writer (`instances`), cases (`cases`), outputs with their outbox
//! (`outbox`), the leases with which nodes claim work (`leases`) and the
//! query/retrieve of what a case lacks (`fetch`); the
//! stored vocabularies (case and delivery states) are enums in `state`.
//! This file owns the connection, the backend choice, the error type and
//! the stored time format. Nothing outside `db` writes SQL. Every write
//! takes its time from the caller (the node's `Clock`) and is stamped with
//! the node that wrote it ([`Db::with_node`]); the instance writer is
//! started and stopped by its owner ([`InstanceWriter`]); the file's
//! permissions belong to the storage layout.
//!
//! Two backends, one code path: SQLite (the embedded default, one node) and
//! PostgreSQL (several nodes on one database). The pool is sqlx's `Any`
//! driver with runtime queries, chosen over an enum of two typed pools or a
//! generic `Db<DB>` because the SQL is already portable (`$n` placeholders,
//! `ON CONFLICT`, `RETURNING`, text times, no backend types), so one text
//! and one function per query serve both, and no query is compiled per
//! backend (the `query!` macros would need a database or offline data for
//! each). The price: `Any` converts each row to its own value type (a few
//! per cent of a query's cost here), and it cannot read SQLite's BOOLEAN
//! column type, so `us_doppler` is read as 0/1. SQL that must differ is
//! chosen by [`Backend`]: the migrations (`migrations/` for SQLite,
//! `migrations/postgres/` for PostgreSQL, the same versions) and the
//! row-locking clause of the claims (`leases`).

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::AnyPool;
use sqlx::AssertSqlSafe;
use sqlx::ConnectOptions;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::sqlite::SqliteConnectOptions;

mod audit;
mod cases;
mod fetch;
mod instances;
mod leases;
mod outbox;
mod state;

pub use audit::{AssociationRow, AuditEvent, EventFilter, NewEvent, event};
pub use cases::{Assignment, CaseFilter, CaseMember, CaseRow, UnassignedInstance, case_event};
pub use fetch::{FetchAttempt, FetchJob, fetch_event};
pub use instances::{Inserted, InstanceQueue, InstanceRow, InstanceWriter};
pub use leases::ASSEMBLER_ROLE;
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

/// The engine behind a [`Db`]: the SQL is the same text on both except
/// where a backend needs its own (the migrations, `FOR UPDATE SKIP LOCKED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The embedded default, for one node.
    Sqlite,
    /// The engine for several nodes sharing one database.
    Postgres,
}

impl Backend {
    /// The backend a database URL names.
    pub fn of(url: &str) -> Option<Backend> {
        if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }
}

#[derive(Clone, Debug)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
    /// The SQLite file, for whoever lays out storage (permissions).
    file: Option<Arc<Path>>,
    /// The node that writes through this handle: stamped on every audit
    /// event (`events.node`).
    node: Arc<str>,
}

/// SQLite's migrations are `migrations/` (as landed); PostgreSQL's are
/// `migrations/postgres/`, the same versions in its dialect. A new
/// migration is added to both.
static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

impl Db {
    /// Open (creating when missing) and migrate. SQLite runs in WAL mode with
    /// synchronous=FULL: a committed row survives power loss, which is what a
    /// C-STORE Success promises. PostgreSQL commits are durable by default
    /// (synchronous_commit on).
    pub async fn connect(url: &str) -> Result<Self, DbError> {
        Self::connect_with(url, Duration::from_secs(10)).await
    }

    /// As [`Db::connect`], waiting at most `busy_timeout` for a lock held by
    /// another connection before a write fails (and the C-STORE with it);
    /// on PostgreSQL it is the `lock_timeout`.
    pub async fn connect_with(url: &str, busy_timeout: Duration) -> Result<Self, DbError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of(url).ok_or_else(|| {
            DbError::Batch(format!(
                "database.url must start with sqlite: or postgres:, not {:?}",
                url.split(':').next().unwrap_or("")
            ))
        })?;
        let busy_ms = busy_timeout.as_millis().min(i32::MAX as u128) as u64;
        let (any_url, file) = match backend {
            Backend::Sqlite => {
                let options = SqliteConnectOptions::from_str(url)?.create_if_missing(true);
                let file = std::path::PathBuf::from(options.get_filename());
                if let Some(parent) = file.parent() {
                    let _ = std::fs::create_dir_all(parent);
                }
                (options.to_url_lossy().to_string(), Some(file))
            }
            Backend::Postgres => (url.to_string(), None),
        };
        let options = AnyConnectOptions::from_str(&any_url)?;
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5).max(busy_timeout))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    for pragma in session_settings(backend, busy_ms) {
                        sqlx::query(AssertSqlSafe(pragma))
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        match backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&pool).await?,
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&pool).await?,
        }
        let file = file.filter(|f| f.exists()).map(Arc::from);
        Ok(Db {
            pool,
            backend,
            file,
            node: Arc::from(default_node_id().as_str()),
        })
    }

    /// The same database, writing as node `id` (audit events, leases).
    pub fn with_node(mut self, id: &str) -> Self {
        self.node = Arc::from(id);
        self
    }

    /// The node this handle writes as.
    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn backend(&self) -> Backend {
        self.backend
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

    /// SQLite: make this the only node on the file, for as long as the
    /// returned lock file stays open (an exclusive lock on
    /// `<database>.node-lock`). A second node on the same file is refused:
    /// SQLite cannot be shared between machines (a shared filesystem does
    /// not carry its locks safely), and several nodes need PostgreSQL. The
    /// CLI's commands do not take the lock. PostgreSQL: nothing to hold.
    pub fn lock_single_node(&self) -> Result<Option<std::fs::File>, DbError> {
        let Some(file) = &self.file else {
            return Ok(None);
        };
        let mut name = file.as_os_str().to_owned();
        name.push(".node-lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&name)
            .map_err(|e| DbError::Batch(format!("opening {}: {e}", Path::new(&name).display())))?;
        match lock.try_lock() {
            Ok(()) => Ok(Some(lock)),
            Err(std::fs::TryLockError::WouldBlock) => Err(DbError::Batch(format!(
                "another her2map node is already running on the SQLite database {}: \
                 SQLite serves one node only; to run several nodes, give each \
                 [database] url = \"postgres://...\" (README, \"Deployment\")",
                file.display()
            ))),
            Err(std::fs::TryLockError::Error(e)) => Err(DbError::Batch(format!(
                "locking {}: {e}",
                Path::new(&name).display()
            ))),
        }
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// What each new connection sets: for SQLite the journal, durability and
/// lock wait (`SqliteConnectOptions` cannot travel through the `Any`
/// driver's URL, so they are pragmas); for PostgreSQL the lock wait.
fn session_settings(backend: Backend, busy_ms: u64) -> Vec<String> {
    match backend {
        Backend::Sqlite => vec![
            "PRAGMA journal_mode = WAL".into(),
            "PRAGMA synchronous = FULL".into(),
            "PRAGMA foreign_keys = ON".into(),
            format!("PRAGMA busy_timeout = {busy_ms}"),
        ],
        Backend::Postgres => vec![format!("SET lock_timeout = {busy_ms}")],
    }
}

/// The default node id: the host name (`/etc/hostname`, `$HOSTNAME`), or
/// `node` when neither is known.
pub fn default_node_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_string())
}
