//! The rate limit of audit events that a peer can cause at will (connections
//! cut before they became associations or requests, failed sign-ins): per
//! reason, the first [`EVENTS_PER_WINDOW`] of each [`WINDOW`] are audited one
//! by one, the rest counted and audited as one summary event, so that a
//! flood cannot fill the audit log (issue 19). Shared by the DICOM listener
//! and the HTTP server; it holds only counts, in memory.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many events per reason are audited one by one in each [`WINDOW`].
pub const EVENTS_PER_WINDOW: u32 = 20;
pub const WINDOW: Duration = Duration::from_secs(60);

/// One reason's audit window.
struct Window {
    start: Instant,
    logged: u32,
    suppressed: u64,
    last_peer: Option<SocketAddr>,
}

/// The per-reason windows.
pub struct AuditLimit {
    windows: Mutex<HashMap<&'static str, Window>>,
}

/// An audit event to write: the peer and the reason (or the summary text).
pub type Limited = (SocketAddr, String);

impl Default for AuditLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl AuditLimit {
    pub fn new() -> Self {
        AuditLimit {
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// It happened once more: the events to audit now (none, this one, and
    /// the summary of the window it closes).
    pub fn note(&self, reason: &'static str, peer: SocketAddr) -> Vec<Limited> {
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let mut events = Vec::new();
        let window = windows.entry(reason).or_insert_with(|| Window {
            start: now,
            logged: 0,
            suppressed: 0,
            last_peer: None,
        });
        if now.duration_since(window.start) >= WINDOW {
            events.extend(summary(reason, window));
            *window = Window {
                start: now,
                logged: 0,
                suppressed: 0,
                last_peer: None,
            };
        }
        if window.logged < EVENTS_PER_WINDOW {
            window.logged += 1;
            events.push((peer, reason.to_string()));
        } else {
            window.suppressed += 1;
            window.last_peer = Some(peer);
        }
        events
    }

    /// The summaries of windows that are over (all of them when `all`, at
    /// shutdown); their counts start again.
    pub fn flush(&self, all: bool) -> Vec<Limited> {
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let mut events = Vec::new();
        for (reason, window) in windows.iter_mut() {
            if all || now.duration_since(window.start) >= WINDOW {
                events.extend(summary(reason, window));
                window.suppressed = 0;
                window.last_peer = None;
            }
        }
        windows.retain(|_, w| !all && now.duration_since(w.start) < WINDOW);
        events
    }
}

fn summary(reason: &str, window: &Window) -> Option<Limited> {
    let peer = window.last_peer?;
    (window.suppressed > 0).then(|| {
        (
            peer,
            format!(
                "{reason}: {} more within {} s, not audited one by one",
                window.suppressed,
                WINDOW.as_secs()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audits_a_few_then_a_summary() {
        let log = AuditLimit::new();
        let peer: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        let mut events = 0;
        for _ in 0..100 {
            events += log.note("artim_timeout", peer).len();
            events += log.note("connection_limit", peer).len();
        }
        assert_eq!(events, 2 * EVENTS_PER_WINDOW as usize);
        assert!(log.flush(false).is_empty(), "the window is not over");
        let summaries = log.flush(true);
        assert_eq!(summaries.len(), 2);
        assert!(summaries.iter().all(|(_, r)| r.contains("80 more")));
        assert!(log.flush(true).is_empty());
    }
}
