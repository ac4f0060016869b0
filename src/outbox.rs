//! Reliable delivery of result objects: a persisted queue (one row per object
//! x destination) drained by one worker with the node's own C-STORE SCU,
//! retrying transient failures with exponential backoff and moving permanent
//! ones to a dead-letter state at once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

// The settings live in config (a leaf); re-exported where they were.
use crate::clock::Clock;
pub use crate::config::{DestinationSettings, OutboxSettings};
use crate::db::{Db, DbError, DeliveryState, OutboxRow, format_time};
use crate::dimse::client::{ClientOptions, ClientTls};
use crate::dimse::tls::TlsError;
use crate::report::OutputKind;
use crate::send::{SendFailure, send_files};
use crate::worker::{Timing, run_worker};

/// The names of the destinations an output of `kind` goes to.
pub fn destinations_for(destinations: &[DestinationSettings], kind: OutputKind) -> Vec<String> {
    destinations
        .iter()
        .filter(|d| d.wants(kind.filter_name()))
        .map(DestinationSettings::name)
        .collect()
}

/// What one attempt means for a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Sent,
    Retry,
    Dead,
}

/// PS3.7 C / PS3.4 B.2.3: 0xA7xx (out of resources) and failures of the
/// association itself are worth retrying; 0xA9xx, 0xCxxx and the 0x01xx/
/// 0x02xx protocol errors will fail the same way again.
fn classify_status(code: u16) -> Verdict {
    if crate::dimse::command::is_success_or_warning(code) {
        Verdict::Sent
    } else if code & 0xFF00 == 0xA700 {
        Verdict::Retry
    } else {
        Verdict::Dead
    }
}

/// A file the peer gave no status for: association trouble mid-batch is
/// worth retrying; a file that is unusable (missing, not DICOM) or that the
/// peer accepts no context for will fail the same way again.
fn classify_failure(failure: &SendFailure) -> Verdict {
    match failure {
        SendFailure::Association(_) | SendFailure::NotSent => Verdict::Retry,
        SendFailure::File(_) | SendFailure::NoContext { .. } => Verdict::Dead,
    }
}

/// The longest the worker sleeps without looking (operator retries).
const POLL: Duration = Duration::from_secs(2);
/// How long a node holds the deliveries it claimed: a node that dies
/// mid-delivery leaves them to another node after this.
const DELIVERY_LEASE: Duration = Duration::from_secs(300);
/// Most deliveries claimed (and sent) in one round.
const DELIVERY_BATCH: i64 = 32;

pub struct Outbox {
    db: Db,
    data_dir: PathBuf,
    /// Each destination with its TLS, built once at start.
    destinations: Vec<(DestinationSettings, Option<ClientTls>)>,
    settings: OutboxSettings,
    calling_ae: String,
    clock: Clock,
    /// How long this node's claim on a delivery lasts.
    lease: Duration,
}

impl Outbox {
    /// Fails on a destination's unusable TLS files, naming the key, so that
    /// the node does not start to find out at its first result.
    pub fn new(
        db: Db,
        data_dir: PathBuf,
        destinations: Vec<DestinationSettings>,
        settings: OutboxSettings,
        calling_ae: String,
    ) -> Result<Self, TlsError> {
        let destinations = destinations
            .into_iter()
            .map(|d| {
                let tls = d
                    .tls
                    .as_ref()
                    .map(|t| {
                        crate::dimse::tls::client_tls(
                            t,
                            &d.host,
                            &crate::dimse::tls::DESTINATION_KEYS,
                        )
                    })
                    .transpose()?;
                Ok((d, tls))
            })
            .collect::<Result<_, TlsError>>()?;
        Ok(Outbox {
            db,
            data_dir,
            destinations,
            settings,
            calling_ae,
            clock: Clock::new(),
            lease: DELIVERY_LEASE,
        })
    }

    /// Deliveries claimed by this node last `lease` (`[node] lease_secs`,
    /// at least a send's timeout): how long a dead node's deliveries wait
    /// before another node sends them.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_secs(
            self.settings.timeout_secs.saturating_mul(2),
        ));
        self
    }

    /// Take time from the node's clock (a fresh system clock otherwise).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    fn backoff(&self, attempts_so_far: i64) -> Duration {
        let exp = attempts_so_far.clamp(0, 30) as u32;
        let ms = self
            .settings
            .retry_base_ms
            .saturating_mul(1u64 << exp)
            .min(self.settings.retry_max_ms);
        Duration::from_millis(ms)
    }

    async fn record(&self, row: &OutboxRow, verdict: Verdict, status: &str) -> Result<(), DbError> {
        let now = self.clock.now();
        let exhausted = row.attempts + 1 >= self.settings.max_attempts;
        let (state, next) = match verdict {
            Verdict::Sent => (DeliveryState::Sent, now),
            Verdict::Dead => (DeliveryState::Dead, now),
            Verdict::Retry if exhausted => (DeliveryState::Dead, now),
            Verdict::Retry => (DeliveryState::Pending, now + self.backoff(row.attempts)),
        };
        match state {
            DeliveryState::Sent => {
                info!(destination = %row.destination, case = %row.case_id, "output delivered")
            }
            DeliveryState::Dead => {
                warn!(destination = %row.destination, case = %row.case_id, %status, "delivery dead-lettered")
            }
            DeliveryState::Pending => {
                warn!(destination = %row.destination, case = %row.case_id, %status, retry_at = %format_time(next), "delivery failed; will retry")
            }
        }
        self.db
            .record_delivery(row, state, status, next, now)
            .await?;
        self.count(row, state, now).await;
        Ok(())
    }

    /// The delivery metrics: the attempt's outcome and, once sent, the time
    /// since the case's last instance arrived.
    async fn count(&self, row: &OutboxRow, state: DeliveryState, now: time::OffsetDateTime) {
        let m = &crate::metrics::METRICS;
        let outcome = match state {
            DeliveryState::Sent => "sent",
            DeliveryState::Dead => "dead",
            DeliveryState::Pending => "retry",
        };
        m.delivery_attempts.inc(&[&row.destination, outcome]);
        if state == DeliveryState::Sent
            && let Ok(Some(case)) = self.db.case(&row.case_id).await
            && let Some(last) = crate::db::parse_time(&case.last_instance_at)
        {
            m.delivery_latency_seconds
                .observe_secs(&[], (now - last).as_seconds_f64());
        }
    }

    /// Try every due delivery once; returns how many rows were attempted.
    pub async fn deliver_due(&self) -> Result<usize, DbError> {
        // Claimed with a lease (several nodes never send the same row at
        // once; a dead node's rows are taken over once it expires), in
        // small batches so that each is sent well within its lease.
        let now = self.clock.now();
        let due = self
            .db
            .claim_due_deliveries(now + self.lease, now, DELIVERY_BATCH)
            .await?;
        let mut by_dest: BTreeMap<String, Vec<OutboxRow>> = BTreeMap::new();
        for row in due {
            by_dest
                .entry(row.destination.clone())
                .or_default()
                .push(row);
        }
        let mut attempted = 0;
        for (name, rows) in by_dest {
            attempted += rows.len();
            let Some((dest, tls)) = self.destinations.iter().find(|(d, _)| d.name() == name) else {
                for row in &rows {
                    self.record(row, Verdict::Dead, "destination no longer configured")
                        .await?;
                }
                continue;
            };
            let options = ClientOptions {
                calling_ae: self.calling_ae.clone(),
                called_ae: dest.ae_title.trim().to_string(),
                timeout: Duration::from_secs(self.settings.timeout_secs),
                tls: tls.clone(),
                ..Default::default()
            };
            let paths: Vec<PathBuf> = rows.iter().map(|r| self.data_dir.join(&r.path)).collect();
            let addr = format!("{}:{}", dest.host, dest.port);
            match send_files(&addr, &options, &paths, |_| {}).await {
                Ok(results) => {
                    for (row, path) in rows.iter().zip(&paths) {
                        let result = results.iter().find(|r| &r.path == path);
                        let (verdict, status) = match result {
                            Some(r) => match r.status {
                                Some(code) => (
                                    classify_status(code),
                                    format!("{code:#06X} {}", r.error.as_deref().unwrap_or(""))
                                        .trim()
                                        .to_string(),
                                ),
                                None => (
                                    r.failure.as_ref().map_or(Verdict::Dead, classify_failure),
                                    r.error.clone().unwrap_or_default(),
                                ),
                            },
                            None => (Verdict::Retry, "not attempted".into()),
                        };
                        self.record(row, verdict, &status).await?;
                    }
                }
                Err(e) => {
                    let verdict = if e.is_transient() {
                        Verdict::Retry
                    } else {
                        Verdict::Dead
                    };
                    for row in &rows {
                        self.record(row, verdict, &e.to_string()).await?;
                    }
                }
            }
        }
        Ok(attempted)
    }

    /// The delivery worker: wakes when outputs are queued, when the earliest
    /// retry is due, and every few seconds for operator retries.
    pub async fn run(self, wake: Arc<Notify>, shutdown: CancellationToken) {
        let timing = Timing {
            poll: POLL,
            coalesce: None,
        };
        let this = &self;
        run_worker(wake, timing, &self.clock, shutdown, move || async move {
            if let Err(e) = this.deliver_due().await {
                error!(error = %e, "delivery round failed");
            }
            this.db.next_delivery_at().await.ok().flatten()
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_split_into_retry_and_dead_letter() {
        assert_eq!(classify_status(0x0000), Verdict::Sent);
        assert_eq!(classify_status(0xB000), Verdict::Sent);
        assert_eq!(classify_status(0xA700), Verdict::Retry);
        assert_eq!(classify_status(0xA7FF), Verdict::Retry);
        assert_eq!(classify_status(0xA900), Verdict::Dead);
        assert_eq!(classify_status(0xC000), Verdict::Dead);
        assert_eq!(classify_status(0x0122), Verdict::Dead);
    }

    #[test]
    fn files_without_a_status_retry_only_for_association_trouble() {
        let retry = [
            SendFailure::Association("reset".into()),
            SendFailure::NotSent,
        ];
        assert!(retry.iter().all(|f| classify_failure(f) == Verdict::Retry));
        let no_context = SendFailure::NoContext {
            sop_class_uid: "1.2".into(),
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
        };
        let dead = [SendFailure::File("missing".into()), no_context];
        assert!(dead.iter().all(|f| classify_failure(f) == Verdict::Dead));
    }
}
