//! The node's one time source: every timer and every row the database
//! stamps takes its time from a [`Clock`] passed in, so that tests can drive
//! time by hand and nothing reads the system clock behind their back.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

/// The time source of every case timer and every stamped row. The system clock is wall time at
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
