//! Reliable delivery of result objects: a persisted queue (one row per object
//! x destination) drained by one worker with the destination's transport
//! (the node's own C-STORE SCU, or STOW-RS for a DICOMweb destination),
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
use crate::dicomweb::{DicomWebClient, DicomWebError, StowResponse};
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

/// How a destination is reached, built once at start.
enum Transport {
    /// C-STORE, with its TLS when configured.
    Dimse(Option<ClientTls>),
    /// STOW-RS (PS3.18 10.5).
    DicomWeb(DicomWebClient),
}

/// Most bytes of result files in one STOW-RS request.
const STOW_REQUEST_BYTES: usize = 64 << 20;

pub struct Outbox {
    db: Db,
    data_dir: PathBuf,
    /// Each destination with its transport.
    destinations: Vec<(DestinationSettings, Transport)>,
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
                if let Some(web) = &d.dicomweb {
                    // The token file, variable and CA are read now.
                    let client = DicomWebClient::new(web).map_err(|e| TlsError {
                        key: "destinations.dicomweb",
                        message: e.to_string(),
                    })?;
                    return Ok((d, Transport::DicomWeb(client)));
                }
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
                Ok((d, Transport::Dimse(tls)))
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
            let Some((dest, transport)) = self.destinations.iter().find(|(d, _)| d.name() == name)
            else {
                for row in &rows {
                    self.record(row, Verdict::Dead, "destination no longer configured")
                        .await?;
                }
                continue;
            };
            let tls = match transport {
                Transport::Dimse(tls) => tls,
                Transport::DicomWeb(client) => {
                    self.deliver_stow(client, &rows).await?;
                    continue;
                }
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

    /// Deliver rows to a DICOMweb destination by STOW-RS, in requests of
    /// at most [`STOW_REQUEST_BYTES`]: a 4xx (409 included) is permanent,
    /// with the service's failure reasons recorded; 5xx and no answer are
    /// retried; per instance, a 202's Failed SOP Sequence decides by its
    /// Failure Reason as a C-STORE status would (0xA7xx retried).
    async fn deliver_stow(
        &self,
        client: &DicomWebClient,
        rows: &[OutboxRow],
    ) -> Result<(), DbError> {
        let mut batch: Vec<(&OutboxRow, Vec<u8>)> = Vec::new();
        let mut bytes = 0usize;
        for row in rows {
            match tokio::fs::read(self.data_dir.join(&row.path)).await {
                Ok(file) => {
                    if !batch.is_empty() && bytes + file.len() > STOW_REQUEST_BYTES {
                        self.stow_batch(client, std::mem::take(&mut batch)).await?;
                        bytes = 0;
                    }
                    bytes += file.len();
                    batch.push((row, file));
                }
                Err(e) => {
                    self.record(row, Verdict::Dead, &format!("file {}: {e}", row.path))
                        .await?;
                }
            }
        }
        if !batch.is_empty() {
            self.stow_batch(client, batch).await?;
        }
        Ok(())
    }

    async fn stow_batch(
        &self,
        client: &DicomWebClient,
        batch: Vec<(&OutboxRow, Vec<u8>)>,
    ) -> Result<(), DbError> {
        let (rows, files): (Vec<&OutboxRow>, Vec<Vec<u8>>) = batch.into_iter().unzip();
        let answer = client.store(None, files).await;
        for row in rows {
            let (verdict, status) = stow_verdict(&answer, &row.sop_instance_uid);
            self.record(row, verdict, &status).await?;
        }
        Ok(())
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

/// What a STOW-RS answer means for one of the instances it carried.
fn stow_verdict(answer: &Result<StowResponse, DicomWebError>, uid: &str) -> (Verdict, String) {
    match answer {
        Ok(r) => match r.failed.iter().find(|f| f.sop_instance_uid == uid) {
            Some(f) => {
                let code = f
                    .reason
                    .unwrap_or(crate::dimse::command::status::CANNOT_UNDERSTAND);
                (
                    classify_status(code),
                    format!("STOW-RS {}: failure reason {code:#06X}", r.status),
                )
            }
            None => {
                let warning = r
                    .stored
                    .iter()
                    .find(|s| s.sop_instance_uid == uid)
                    .and_then(|s| s.warning)
                    .map(|w| format!(", warning {w:#06X}"))
                    .unwrap_or_default();
                (Verdict::Sent, format!("STOW-RS {}{warning}", r.status))
            }
        },
        Err(e) if e.is_transient() => (Verdict::Retry, e.to_string()),
        Err(e) => (Verdict::Dead, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stow_answers_split_into_sent_retry_and_dead_letter() {
        use crate::dicomweb::StowFailed;
        let partial = Ok(StowResponse {
            status: 202,
            failed: vec![
                StowFailed {
                    sop_instance_uid: "1.1".into(),
                    reason: Some(0xC000),
                    ..Default::default()
                },
                StowFailed {
                    sop_instance_uid: "1.2".into(),
                    reason: Some(0xA700),
                    ..Default::default()
                },
            ],
            ..Default::default()
        });
        assert_eq!(stow_verdict(&partial, "1.1").0, Verdict::Dead);
        assert_eq!(stow_verdict(&partial, "1.2").0, Verdict::Retry);
        assert_eq!(stow_verdict(&partial, "1.3").0, Verdict::Sent);
        let status = |status| {
            Err(DicomWebError::Status {
                status,
                url: "u".into(),
                reason: "r".into(),
            })
        };
        let (v, text) = stow_verdict(&status(409), "1.1");
        assert_eq!(v, Verdict::Dead);
        assert!(text.contains("409") && text.contains('r'), "{text}");
        assert_eq!(stow_verdict(&status(404), "1.1").0, Verdict::Dead);
        assert_eq!(stow_verdict(&status(503), "1.1").0, Verdict::Retry);
    }

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
