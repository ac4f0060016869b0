//! The pre-association stage of a connection (issue #19): from TCP accept to
//! a complete A-ASSOCIATE-RQ. Connections in this stage are counted apart
//! from associations, with their own caps (all of them, and per remote
//! address), and each one lives at most the ARTIM time (PS3.8 9.1.5: the
//! acceptor starts the ARTIM timer when the transport connection opens and
//! closes it when no A-ASSOCIATE-RQ arrives in time). Connections cut here are
//! audited through a rate limit (`crate::audit_limit::AuditLimit`) so that a flood cannot fill the
//! audit log. It knows nothing of DIMSE, AE titles or the association limit.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Audit reason of a connection closed because its A-ASSOCIATE-RQ did not
/// arrive (or its TLS handshake did not complete) within the ARTIM time.
pub const ARTIM_TIMEOUT: &str = "artim_timeout";
/// Audit reason of a connection closed at accept because a pre-association
/// cap was reached.
pub const CONNECTION_LIMIT: &str = "connection_limit";

/// The pre-association limits of the SCP (`[dicom]` artim_timeout_secs,
/// max_pending_connections, max_pending_per_address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// ARTIM: the time from TCP accept to a complete A-ASSOCIATE-RQ,
    /// the TLS handshake included on the TLS port.
    pub artim_timeout: Duration,
    /// Connections without an association yet, on both ports together.
    pub max_pending: usize,
    /// Of those, from one remote address.
    pub max_pending_per_address: usize,
}

impl Default for ConnectionLimits {
    /// DCMTK's ARTIM default (10 s) and the caps of `conf/default.toml`.
    fn default() -> Self {
        ConnectionLimits {
            artim_timeout: Duration::from_secs(10),
            max_pending: 64,
            max_pending_per_address: 32,
        }
    }
}

#[derive(Default)]
struct Counts {
    total: usize,
    /// Pending connections from addresses that are no listed peer's host.
    unknown: usize,
    per_address: HashMap<IpAddr, usize>,
}

/// The pending-connection counters and the policy that admits a new one.
///
/// Policy: at most `max_pending` connections wait for their A-ASSOCIATE-RQ,
/// at most `max_pending_per_address` of them from one address. When any
/// `[[dicom.peers]]` entry is bound to a `host`, connections from other
/// addresses may hold only half of `max_pending` (at least one): the other
/// half stays for the listed hosts, which a flood from unknown hosts cannot
/// take. Peers listed without a host are unknown here (their address is not
/// known before they speak).
pub(super) struct Admission {
    limits: ConnectionLimits,
    known: HashSet<IpAddr>,
    counts: Mutex<Counts>,
}

/// One admitted pending connection; dropping it frees its place.
pub(super) struct Pending {
    admission: Arc<Admission>,
    ip: IpAddr,
    known: bool,
}

impl Admission {
    pub(super) fn new(limits: ConnectionLimits, known: impl IntoIterator<Item = IpAddr>) -> Self {
        Admission {
            limits,
            known: known
                .into_iter()
                .map(super::connection::canonical_ip)
                .collect(),
            counts: Mutex::default(),
        }
    }

    pub(super) fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    /// The share of `max_pending` that addresses of no listed host may use.
    fn unknown_cap(&self) -> usize {
        if self.known.is_empty() {
            self.limits.max_pending
        } else {
            (self.limits.max_pending / 2).max(1)
        }
    }

    /// Admit a new connection from `ip`, or `None` when a cap is reached.
    pub(super) fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Pending> {
        let ip = super::connection::canonical_ip(ip);
        let known = self.known.contains(&ip);
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let from_ip = counts.per_address.get(&ip).copied().unwrap_or(0);
        if counts.total >= self.limits.max_pending
            || from_ip >= self.limits.max_pending_per_address
            || (!known && counts.unknown >= self.unknown_cap())
        {
            return None;
        }
        counts.total += 1;
        counts.unknown += usize::from(!known);
        *counts.per_address.entry(ip).or_default() += 1;
        Some(Pending {
            admission: self.clone(),
            ip,
            known,
        })
    }

    /// Connections waiting for their A-ASSOCIATE-RQ now.
    #[cfg(test)]
    fn pending(&self) -> usize {
        self.counts.lock().map(|c| c.total).unwrap_or(0)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut counts = self
            .admission
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        counts.total -= 1;
        counts.unknown -= usize::from(!self.known);
        if let Some(n) = counts.per_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.per_address.remove(&self.ip);
            }
        }
    }
}

/// Largest A-ASSOCIATE-RQ waited for in the kernel's buffer; a longer one
/// (thousands of presentation contexts) is read by dicom-ul under the same
/// deadline, with its association slot taken before it is complete.
const PEEK_LIMIT: usize = 64 * 1024;
/// PS3.8 9.3.1: PDU type (1), reserved (1), PDU length (4).
const PDU_HEADER: usize = 6;

/// Wait, without consuming a byte, until the first PDU of a plain
/// connection is in the socket's buffer (or the peer closed, or it is not
/// an A-ASSOCIATE-RQ, or it is too long to wait for): dicom-ul then reads
/// and answers it at once. The caller bounds the wait with the ARTIM time.
pub(super) async fn first_pdu_ready(socket: &TcpStream) {
    let mut buf = vec![0u8; PDU_HEADER];
    // The whole PDU's length, once its header is in.
    let mut want = None;
    let mut pause = Duration::from_millis(2);
    loop {
        // Returns at once while bytes wait (it reads none of them).
        let n = match socket.peek(&mut buf).await {
            // Closed with nothing sent: dicom-ul reports it as before.
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if n >= PDU_HEADER && want.is_none() {
            let length = u32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]]) as usize;
            if buf[0] != 0x01 || length > PEEK_LIMIT - PDU_HEADER {
                return;
            }
            want = Some(PDU_HEADER + length);
            buf.resize(PDU_HEADER + length, 0);
        }
        if want.is_some_and(|w| n >= w) {
            return;
        }
        // Closed mid-PDU (EPOLLRDHUP): dicom-ul reports it as before.
        match socket.ready(Interest::READABLE).await {
            Ok(ready) if !ready.is_read_closed() => {}
            _ => return,
        }
        // Readiness stays set while unread bytes wait, so poll the rest of
        // a PDU that comes in pieces, more slowly the longer it takes.
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Close a plain connection that ARTIM cut: read what it sent first (none
/// of it was consumed while waiting), so that the close is a FIN rather
/// than a TCP reset, and close our side.
pub(super) async fn close_unanswered(mut socket: TcpStream) {
    use tokio::io::AsyncWriteExt;
    let mut sink = [0u8; 4096];
    let mut total = 0;
    while total < PEEK_LIMIT {
        match socket.try_read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
    let _ = tokio::time::timeout(Duration::from_millis(100), socket.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_pending: usize, per_address: usize) -> ConnectionLimits {
        ConnectionLimits {
            artim_timeout: Duration::from_secs(1),
            max_pending,
            max_pending_per_address: per_address,
        }
    }

    #[test]
    fn caps_per_address_in_all_and_reserved_for_listed_hosts() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let pacs: IpAddr = "10.0.0.9".parse().unwrap();
        let open = Arc::new(Admission::new(limits(4, 3), []));
        let held: Vec<_> = (0..3).map(|_| open.admit(a).unwrap()).collect();
        assert!(open.admit(a).is_none(), "per-address cap");
        let other = open.admit(b).unwrap();
        assert!(open.admit(b).is_none(), "total cap");
        drop(held);
        assert_eq!(open.pending(), 1);
        drop(other);
        assert_eq!(open.pending(), 0);

        let reserved = Arc::new(Admission::new(limits(4, 4), [pacs]));
        let unknown: Vec<_> = (0..2).map(|_| reserved.admit(a).unwrap()).collect();
        assert!(reserved.admit(b).is_none(), "unknown hosts hold half");
        let listed: Vec<_> = (0..2).map(|_| reserved.admit(pacs).unwrap()).collect();
        assert!(reserved.admit(pacs).is_none(), "total cap");
        drop((unknown, listed));
        assert_eq!(reserved.pending(), 0);
    }
}
