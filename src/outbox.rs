//! Reliable delivery of result objects: a persisted queue (one row per object
//! x destination) drained by one worker with the node's own C-STORE SCU,
//! retrying transient failures with exponential backoff and moving permanent
//! ones to a dead-letter state at once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{ClientTlsSettings, ConfigError};
use crate::db::{Db, DbError, OutboxRow, format_time, parse_time};
use crate::dimse::client::{ClientOptions, ClientTls};
use crate::send::send_files;

/// `[[destinations]]`: where results go.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DestinationSettings {
    pub ae_title: String,
    pub host: String,
    pub port: u16,
    /// Output kinds this destination receives ("sr", "sc", "gsps"; the summary
    /// card is an "sc"); all when absent.
    #[serde(default)]
    pub outputs: Option<Vec<String>>,
    /// DICOM TLS to this destination; plain TCP when absent.
    #[serde(default)]
    pub tls: Option<ClientTlsSettings>,
}

impl DestinationSettings {
    /// The stable name of a destination in the outbox table.
    pub fn name(&self) -> String {
        format!("{}@{}:{}", self.ae_title.trim(), self.host, self.port)
    }
    pub fn wants(&self, kind: &str) -> bool {
        self.outputs
            .as_ref()
            .is_none_or(|kinds| kinds.iter().any(|k| k.eq_ignore_ascii_case(kind)))
    }
}

/// The names of the destinations an output of `kind` goes to.
pub fn destinations_for(destinations: &[DestinationSettings], kind: &str) -> Vec<String> {
    destinations
        .iter()
        .filter(|d| d.wants(kind))
        .map(DestinationSettings::name)
        .collect()
}

/// `[outbox]`: retry policy and timeouts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxSettings {
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    pub max_attempts: i64,
    pub timeout_secs: u64,
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

pub struct Outbox {
    db: Db,
    data_dir: PathBuf,
    /// Each destination with its TLS, built once at start.
    destinations: Vec<(DestinationSettings, Option<ClientTls>)>,
    settings: OutboxSettings,
    calling_ae: String,
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
    ) -> Result<Self, ConfigError> {
        let destinations = destinations
            .into_iter()
            .map(|d| {
                let tls = d
                    .tls
                    .as_ref()
                    .map(|t| crate::tls::client_tls(t, &d.host, &crate::tls::DESTINATION_KEYS))
                    .transpose()?;
                Ok((d, tls))
            })
            .collect::<Result<_, ConfigError>>()?;
        Ok(Outbox {
            db,
            data_dir,
            destinations,
            settings,
            calling_ae,
        })
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
        let now = time::OffsetDateTime::now_utc();
        let exhausted = row.attempts + 1 >= self.settings.max_attempts;
        let (state, next) = match verdict {
            Verdict::Sent => ("sent", format_time(now)),
            Verdict::Dead => ("dead", format_time(now)),
            Verdict::Retry if exhausted => ("dead", format_time(now)),
            Verdict::Retry => ("pending", format_time(now + self.backoff(row.attempts))),
        };
        match state {
            "sent" => {
                info!(destination = %row.destination, case = %row.case_id, "output delivered")
            }
            "dead" => {
                warn!(destination = %row.destination, case = %row.case_id, %status, "delivery dead-lettered")
            }
            _ => {
                warn!(destination = %row.destination, case = %row.case_id, %status, retry_at = %next, "delivery failed; will retry")
            }
        }
        self.db.record_delivery(row, state, status, &next).await
    }

    /// Try every due delivery once; returns how many rows were attempted.
    pub async fn deliver_due(&self) -> Result<usize, DbError> {
        let due = self.db.due_deliveries(&crate::db::now(), 500).await?;
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
                                // Association trouble mid-batch: try again.
                                None if r.error.as_deref().is_some_and(|e| {
                                    e.starts_with("association") || e.starts_with("not sent")
                                }) =>
                                {
                                    (Verdict::Retry, r.error.clone().unwrap_or_default())
                                }
                                // The file itself is unusable (missing, not DICOM).
                                None => (Verdict::Dead, r.error.clone().unwrap_or_default()),
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
        loop {
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Err(e) = self.deliver_due().await {
                error!(error = %e, "delivery round failed");
            }
            let mut sleep = Duration::from_secs(2);
            if let Ok(Some(next)) = self.db.next_delivery_at().await
                && let Some(at) = parse_time(&next)
            {
                let until = at - time::OffsetDateTime::now_utc();
                sleep = if until.is_positive() {
                    sleep.min(until.unsigned_abs())
                } else {
                    Duration::ZERO
                };
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(sleep) => {}
                _ = shutdown.cancelled() => return,
            }
        }
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
}
