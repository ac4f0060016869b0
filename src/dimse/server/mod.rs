//! The Storage SCP's association handling on dicom-ul (PS3.8 upper layer,
//! PS3.7 DIMSE): the accept loop, access control, association limits, and the
//! C-ECHO / C-STORE message exchange. It hands each instance's bytes to a
//! [`StoreService`] as they arrive and never touches disk or database itself.
//!
//! Optionally a second listener speaks DICOM TLS (PS3.15 B.9): each of its
//! connections completes a TLS handshake first, then gets exactly the same
//! association handling (access control, limit, audit, exchange), which is
//! generic over the stream.
//!
//! A connection goes through three stages, one submodule each: admission
//! (pending-connection caps and the ARTIM timer, PS3.8 9.1.5), its opening
//! (TLS, A-ASSOCIATE-RQ, access control, association slot) and the exchange.
//! `max_associations` counts established associations only.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::command::status;
use crate::audit_limit::{AuditLimit, Limited, WINDOW as CUT_WINDOW};
use admission::Admission;
use connection::{Transport, serve_connection};

mod admission;
mod connection;
mod exchange;

pub use admission::{ARTIM_TIMEOUT, CONNECTION_LIMIT, ConnectionLimits};
pub use connection::new_association_id;

/// How the SCP negotiates and whom it lets in.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub ae_title: String,
    pub max_pdu: u32,
    pub max_associations: usize,
    pub accept_any_storage: bool,
    pub accept_any_called_ae: bool,
    pub read_timeout: Duration,
    /// Allowed calling AE titles, each with the addresses it may come from
    /// (empty: any address). An empty list allows every calling AE.
    pub peers: Vec<(String, Vec<IpAddr>)>,
}

/// One established association, as the service sees it.
#[derive(Debug, Clone)]
pub struct AssociationInfo {
    pub id: String,
    pub calling_ae: String,
    pub called_ae: String,
    pub peer: SocketAddr,
}

/// What the peer asks to store, from the C-STORE-RQ and its presentation
/// context.
#[derive(Debug, Clone)]
pub struct StoreRequest {
    pub message_id: u16,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax: String,
}

/// A DIMSE status with its optional Error Comment (PS3.7 C.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DimseStatus {
    pub code: u16,
    pub comment: Option<String>,
}

impl DimseStatus {
    pub const SUCCESS: DimseStatus = DimseStatus {
        code: status::SUCCESS,
        comment: None,
    };
    pub fn failure(code: u16, comment: impl Into<String>) -> Self {
        DimseStatus {
            code,
            comment: Some(comment.into()),
        }
    }
}

/// Counters of one association, reported when it closes.
#[derive(Debug, Clone, Default)]
pub struct AssociationStats {
    pub stored: u64,
    pub failed: u64,
    pub bytes: u64,
}

/// The business side of the SCP: where association events and instance bytes
/// go. Implemented by `ingest`; a failure of the service becomes a DIMSE
/// status, never a dropped association.
pub trait StoreService: Send + Sync + 'static {
    type Sink: InstanceSink;

    fn association_opened(&self, info: &AssociationInfo) -> impl Future<Output = ()> + Send;
    fn association_rejected(
        &self,
        peer: SocketAddr,
        calling_ae: &str,
        called_ae: &str,
        reason: &str,
    ) -> impl Future<Output = ()> + Send;
    fn association_closed(
        &self,
        info: &AssociationInfo,
        outcome: &str,
        stats: &AssociationStats,
    ) -> impl Future<Output = ()> + Send;
    /// Open a sink for one instance; an error is answered as the status.
    fn begin(
        &self,
        info: &AssociationInfo,
        request: &StoreRequest,
    ) -> impl Future<Output = Result<Self::Sink, DimseStatus>> + Send;
}

/// Receives the data set of one C-STORE, fragment by fragment.
pub trait InstanceSink: Send {
    /// The next PDV payload of the data set (owned: the sink keeps it
    /// without a copy).
    fn write(&mut self, bytes: Vec<u8>) -> impl Future<Output = Result<(), DimseStatus>> + Send;
    /// The last fragment arrived: make the instance durable and say how it went.
    fn finish(self) -> impl Future<Output = DimseStatus> + Send;
    /// The association ended mid-instance: leave nothing behind.
    fn abort(self) -> impl Future<Output = ()> + Send;
}

/// Whether the SCP's accept loops are running: set when [`Server::run`]
/// starts accepting, cleared when it stops (a readiness check reads it).
#[derive(Clone, Debug, Default)]
pub struct Listening(Arc<std::sync::atomic::AtomicBool>);

impl Listening {
    pub fn is_up(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
    fn set(&self, up: bool) {
        self.0.store(up, std::sync::atomic::Ordering::Release);
    }
}

/// The bound SCP, ready to serve.
pub struct Server<S: StoreService> {
    listening: Listening,
    listener: TcpListener,
    /// The DICOM TLS listener and its rustls configuration, when enabled.
    tls: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
    config: ServerConfig,
    service: S,
    limits: ConnectionLimits,
}

/// What every connection task of a running server shares.
struct Shared<S> {
    config: ServerConfig,
    service: S,
    /// Established associations (`max_associations`), both ports together.
    slots: Arc<Semaphore>,
    admission: Arc<Admission>,
    cuts: AuditLimit,
}

impl<S: StoreService> Shared<S> {
    /// Audit a connection cut before it became an association, through the
    /// rate limit (the AE titles are not known yet).
    async fn cut(&self, reason: &'static str, peer: SocketAddr) {
        let events = self.cuts.note(reason, peer);
        if events.is_empty() {
            debug!(%peer, reason, "connection cut (audit rate-limited)");
        }
        self.audit_cuts(events).await;
    }

    async fn audit_cuts(&self, events: Vec<Limited>) {
        for (peer, reason) in events {
            warn!(%peer, %reason, "connection cut before association");
            self.service
                .association_rejected(peer, "", "", &reason)
                .await;
        }
    }
}

impl<S: StoreService> Server<S> {
    pub async fn bind(addr: &str, config: ServerConfig, service: S) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Server {
            listening: Listening::default(),
            listener,
            tls: None,
            config,
            service,
            limits: ConnectionLimits::default(),
        })
    }

    /// The pre-association limits (ARTIM, pending-connection caps); the
    /// defaults of [`ConnectionLimits`] otherwise.
    pub fn connection_limits(mut self, limits: ConnectionLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Also listen for DICOM TLS on `addr`; its associations share the
    /// association limit, access control and service of the plain port.
    pub async fn bind_tls(
        mut self,
        addr: &str,
        tls: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<Self> {
        self.tls = Some((TcpListener::bind(addr).await?, tls));
        Ok(self)
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A handle that says whether this server is accepting.
    pub fn listening(&self) -> Listening {
        self.listening.clone()
    }

    /// The address of the DICOM TLS listener, when there is one.
    pub fn tls_local_addr(&self) -> std::io::Result<Option<SocketAddr>> {
        self.tls.as_ref().map(|(l, _)| l.local_addr()).transpose()
    }

    /// Accept associations until `shutdown` fires, then wait for the ones in
    /// flight: each finishes the instance it is receiving, then is aborted.
    pub async fn run(self, shutdown: CancellationToken) {
        let known = self
            .config
            .peers
            .iter()
            .flat_map(|(_, hosts)| hosts.clone());
        let admission = Arc::new(Admission::new(self.limits, known.collect::<Vec<_>>()));
        let shared = Arc::new(Shared {
            slots: Arc::new(Semaphore::new(self.config.max_associations)),
            config: self.config,
            service: self.service,
            admission,
            cuts: AuditLimit::new(),
        });
        let tracker = TaskTracker::new();
        let plain = accept_loop(
            &shared,
            &self.listener,
            Transport::Plain,
            &tracker,
            &shutdown,
        );
        let summaries = audit_summaries(&shared, &shutdown);
        self.listening.set(true);
        match &self.tls {
            Some((listener, tls)) => {
                let transport = Transport::Tls(tls.clone());
                let secure = accept_loop(&shared, listener, transport, &tracker, &shutdown);
                tokio::join!(plain, secure, summaries);
            }
            None => {
                tokio::join!(plain, summaries);
            }
        }
        self.listening.set(false);
        tracker.close();
        tracker.wait().await;
        shared.audit_cuts(shared.cuts.flush(true)).await;
    }
}

/// Every [`CUT_WINDOW`], the summary events of cut connections that were
/// not audited one by one.
async fn audit_summaries<S: StoreService>(shared: &Shared<S>, shutdown: &CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CUT_WINDOW) => {}
            _ = shutdown.cancelled() => return,
        }
        shared.audit_cuts(shared.cuts.flush(false)).await;
    }
}

async fn accept_loop<S: StoreService>(
    shared: &Arc<Shared<S>>,
    listener: &TcpListener,
    transport: Transport,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.cancelled() => break,
        };
        let (socket, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let Some(pending) = shared.admission.admit(peer.ip()) else {
            // Closed at once, before a byte is read: a flood of connections
            // costs a descriptor for microseconds, not an association slot.
            drop(socket);
            tracker.spawn(async move { shared.cut(admission::CONNECTION_LIMIT, peer).await });
            continue;
        };
        // Nagle's algorithm stalls every small response by ~40 ms.
        let _ = socket.set_nodelay(true);
        let shutdown = shutdown.clone();
        let transport = transport.clone();
        tracker.spawn(async move {
            serve_connection(socket, peer, transport, &shared, shutdown, pending).await
        });
    }
}
