//! The Storage SCP's association handling on dicom-ul (PS3.8 upper layer,
//! PS3.7 DIMSE): the accept loop, access control, association limits, and the
//! C-ECHO / C-STORE message exchange. It hands each instance's bytes to a
//! [`StoreService`] as they arrive and never touches disk or database itself.
//!
//! Optionally a second listener speaks DICOM TLS (PS3.15 B.9): each of its
//! connections completes a TLS handshake first, then gets exactly the same
//! association handling (access control, limit, audit, exchange), which is
//! generic over the stream.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::command::status;
use connection::{Transport, serve_connection};

mod connection;
mod exchange;

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

/// The bound SCP, ready to serve.
pub struct Server<S: StoreService> {
    listener: TcpListener,
    /// The DICOM TLS listener and its rustls configuration, when enabled.
    tls: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
    config: Arc<ServerConfig>,
    service: Arc<S>,
    slots: Arc<Semaphore>,
}

impl<S: StoreService> Server<S> {
    pub async fn bind(addr: &str, config: ServerConfig, service: S) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let slots = Arc::new(Semaphore::new(config.max_associations));
        Ok(Server {
            listener,
            tls: None,
            config: Arc::new(config),
            service: Arc::new(service),
            slots,
        })
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

    /// The address of the DICOM TLS listener, when there is one.
    pub fn tls_local_addr(&self) -> std::io::Result<Option<SocketAddr>> {
        self.tls.as_ref().map(|(l, _)| l.local_addr()).transpose()
    }

    /// Accept associations until `shutdown` fires, then wait for the ones in
    /// flight: each finishes the instance it is receiving, then is aborted.
    pub async fn run(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let plain = self.accept_loop(&self.listener, Transport::Plain, &tracker, &shutdown);
        match &self.tls {
            Some((listener, tls)) => {
                let transport = Transport::Tls(tls.clone());
                let secure = self.accept_loop(listener, transport, &tracker, &shutdown);
                tokio::join!(plain, secure);
            }
            None => plain.await,
        }
        tracker.close();
        tracker.wait().await;
    }

    async fn accept_loop(
        &self,
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
            // Nagle's algorithm stalls every small response by ~40 ms.
            let _ = socket.set_nodelay(true);
            let config = self.config.clone();
            let service = self.service.clone();
            let slot = self.slots.clone().try_acquire_owned().ok();
            let shutdown = shutdown.clone();
            let transport = transport.clone();
            tracker.spawn(async move {
                serve_connection(socket, peer, transport, &config, &*service, shutdown, slot).await
            });
        }
    }
}
