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

use dicom_ul::association::server::AsyncServerAssociation;
use dicom_ul::association::server::{AccessControl, ServerAssociationOptions};
use dicom_ul::pdu::{
    AbortRQServiceProviderReason, AbortRQSource, AssociationRJ, AssociationRJResult,
    AssociationRJServiceProviderPresentationReason, AssociationRJServiceUserReason,
    AssociationRJSource, PDataValue, PDataValueType, Pdu, PresentationContextResultReason,
    UserIdentity,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::command::{self, Command, field, status};
use super::sop;

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
        let plain = self.accept_loop(&self.listener, None, &tracker, &shutdown);
        match &self.tls {
            Some((listener, tls)) => {
                let secure = self.accept_loop(listener, Some(tls), &tracker, &shutdown);
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
        tls: Option<&Arc<rustls::ServerConfig>>,
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
            let permit = self.slots.clone().try_acquire_owned().ok();
            let shutdown = shutdown.clone();
            let tls = tls.cloned();
            tracker.spawn(async move {
                match (tls, permit) {
                    (None, Some(slot)) => {
                        serve(socket, peer, &config, &*service, shutdown, slot).await
                    }
                    (None, None) => reject_over_limit(socket, peer, &*service).await,
                    (Some(tls), Some(slot)) => {
                        serve_tls(socket, peer, tls, &config, &*service, shutdown, slot).await
                    }
                    (Some(tls), None) => reject_over_limit_tls(socket, peer, tls, &*service).await,
                }
            });
        }
    }
}

/// PS3.8 9.3.4: an association beyond the configured limit gets
/// A-ASSOCIATE-RJ transient, source service-provider (presentation),
/// reason "local-limit-exceeded", so the peer retries later.
async fn reject_over_limit<S: StoreService, T: AsyncRead + AsyncWrite + Unpin>(
    mut socket: T,
    peer: SocketAddr,
    service: &S,
) {
    use tokio::io::AsyncWriteExt;
    let mut buf = bytes::BytesMut::with_capacity(16 * 1024);
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        dicom_ul::association::read_pdu_from_wire_async(&mut socket, &mut buf, 64 * 1024, false),
    )
    .await;
    let (calling, called) = match read {
        Ok(Ok(Pdu::AssociationRQ(rq))) => (rq.calling_ae_title, rq.called_ae_title),
        _ => (String::new(), String::new()),
    };
    let rj = Pdu::AssociationRJ(AssociationRJ {
        result: AssociationRJResult::Transient,
        source: AssociationRJSource::ServiceProviderPresentation(
            AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
        ),
    });
    let mut out = Vec::new();
    if dicom_ul::pdu::write_pdu(&mut out, &rj).is_ok() {
        let _ = socket.write_all(&out).await;
    }
    let _ = socket.shutdown().await;
    warn!(%peer, "association rejected: local limit of concurrent associations exceeded");
    service
        .association_rejected(peer, calling.trim(), called.trim(), "local limit exceeded")
        .await;
}

/// Access control for one incoming connection: the called AE title and the
/// calling AE allow list with its optional host binding (PS3.8 9.3.4 reasons
/// 3 and 7).
struct PeerPolicy<'a> {
    config: &'a ServerConfig,
    peer_ip: IpAddr,
    /// The AE titles of the request, kept for the audit log of a rejection
    /// (dicom-ul does not hand them back with the error).
    seen: Arc<std::sync::Mutex<(String, String)>>,
}

impl AccessControl for PeerPolicy<'_> {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        if let Ok(mut seen) = self.seen.lock() {
            *seen = (
                calling_ae_title.trim().to_string(),
                called_ae_title.trim().to_string(),
            );
        }
        if !self.config.accept_any_called_ae && called_ae_title.trim() != this_ae_title.trim() {
            return Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized);
        }
        if self.config.peers.is_empty() {
            return Ok(());
        }
        let calling = calling_ae_title.trim();
        let known = self.config.peers.iter().any(|(ae, hosts)| {
            ae == calling && (hosts.is_empty() || hosts.contains(&canonical_ip(self.peer_ip)))
        });
        if known {
            Ok(())
        } else {
            Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized)
        }
    }
}

/// Map IPv4-mapped IPv6 addresses to IPv4 so that `host = "127.0.0.1"`
/// matches a dual-stack listener's peers.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn association_options<'a>(
    config: &'a ServerConfig,
    peer_ip: IpAddr,
    seen: Arc<std::sync::Mutex<(String, String)>>,
) -> ServerAssociationOptions<'a, PeerPolicy<'a>, dicom_ul::association::server::DefaultNegotiation>
{
    let mut options = ServerAssociationOptions::new()
        .ae_access_control(PeerPolicy {
            config,
            peer_ip,
            seen,
        })
        .ae_title(config.ae_title.clone())
        .max_pdu_length(config.max_pdu)
        .strict(true)
        .read_timeout(config.read_timeout)
        .write_timeout(config.read_timeout)
        .with_abstract_syntax(sop::VERIFICATION);
    for (uid, _) in sop::STORAGE_SOP_CLASSES {
        options = options.with_abstract_syntax(*uid);
    }
    for (uid, _) in sop::TRANSFER_SYNTAXES {
        options = options.with_transfer_syntax(*uid);
    }
    if config.accept_any_storage {
        options = options.promiscuous(true);
    }
    options
}

fn new_association_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// The same over-limit answer on the TLS port, after the handshake.
async fn reject_over_limit_tls<S: StoreService>(
    socket: TcpStream,
    peer: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    service: &S,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
        Ok(Ok(stream)) => reject_over_limit(stream, peer, service).await,
        Ok(Err(e)) => {
            let reason = format!("TLS handshake failed: {e}");
            warn!(%peer, %reason, "association rejected");
            service.association_rejected(peer, "", "", &reason).await;
        }
        Err(_) => {
            let reason = "TLS handshake timed out";
            warn!(%peer, %reason, "association rejected");
            service.association_rejected(peer, "", "", reason).await;
        }
    }
}

/// How long a TLS peer may take to complete its handshake (dicom-ul's own
/// read timeout only starts with the A-ASSOCIATE-RQ).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serve one plain TCP connection from A-ASSOCIATE-RQ to release or abort.
async fn serve<S: StoreService>(
    socket: TcpStream,
    peer: SocketAddr,
    config: &ServerConfig,
    service: &S,
    shutdown: CancellationToken,
    slot: OwnedSemaphorePermit,
) {
    let seen = Arc::new(std::sync::Mutex::new((String::new(), String::new())));
    let options = association_options(config, peer.ip(), seen.clone());
    // dicom-ul drops the connection without a word when the first PDU does
    // not parse (or exceeds the maximum length); keep a second handle on the
    // socket to answer that with an A-ABORT (PS3.8 9.3.8, state table AA-1).
    let (socket, spare) = match with_spare_handle(socket) {
        Ok(pair) => pair,
        Err(e) => {
            warn!(%peer, error = %e, "connection could not be set up");
            return;
        }
    };
    let assoc = match options.establish_async(socket).await {
        Ok(a) => {
            drop(spare);
            a
        }
        Err(e) => {
            let reason = describe_establish_error(&e);
            let (calling, called) = seen.lock().map(|s| s.clone()).unwrap_or_default();
            if malformed_first_pdu(&e) {
                abort_and_close(spare).await;
            }
            // The slot is free once the peer has its answer, not after our
            // bookkeeping.
            drop(slot);
            warn!(%peer, %reason, "association rejected");
            service
                .association_rejected(peer, &calling, &called, &reason)
                .await;
            return;
        }
    };
    serve_association(assoc, peer, config, service, shutdown, slot).await;
}

/// Serve one DICOM TLS connection: TLS handshake (client certificate
/// verified when the configuration asks for one), A-ASSOCIATE-RQ with the
/// same access control as the plain port, then the same exchange. A failed
/// handshake is an `association_rejected` with its reason.
async fn serve_tls<S: StoreService>(
    socket: TcpStream,
    peer: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    config: &ServerConfig,
    service: &S,
    shutdown: CancellationToken,
    slot: OwnedSemaphorePermit,
) {
    let seen = Arc::new(std::sync::Mutex::new((String::new(), String::new())));
    let options = association_options(config, peer.ip(), seen.clone()).tls_config(tls);
    // The stream belongs to dicom-ul until the association is established,
    // so an undecodable first PDU is answered by closing the connection
    // (no A-ABORT on this port).
    let deadline = TLS_HANDSHAKE_TIMEOUT + config.read_timeout;
    let result = match tokio::time::timeout(deadline, options.establish_tls_async(socket)).await {
        Ok(Ok(assoc)) => Ok(assoc),
        Ok(Err(e)) => Err(describe_tls_establish_error(&e)),
        Err(_) => Err("TLS handshake or association request timed out".to_string()),
    };
    match result {
        Ok(assoc) => serve_association(assoc, peer, config, service, shutdown, slot).await,
        Err(reason) => {
            drop(slot);
            let (calling, called) = seen.lock().map(|s| s.clone()).unwrap_or_default();
            warn!(%peer, %reason, "association rejected");
            service
                .association_rejected(peer, &calling, &called, &reason)
                .await;
        }
    }
}

fn describe_tls_establish_error(e: &dicom_ul::association::Error) -> String {
    use dicom_ul::association::Error;
    match e {
        Error::TlsHandshake { source, .. } => format!("TLS handshake failed: {source}"),
        Error::TlsConnection { source, .. } => format!("TLS handshake failed: {source}"),
        other => describe_establish_error(other),
    }
}

/// An established association, on either port, until release or abort.
async fn serve_association<S: StoreService, T>(
    mut assoc: AsyncServerAssociation<T>,
    peer: SocketAddr,
    config: &ServerConfig,
    service: &S,
    shutdown: CancellationToken,
    slot: OwnedSemaphorePermit,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send,
{
    let info = AssociationInfo {
        id: new_association_id(),
        calling_ae: dicom_ul::association::Association::peer_ae_title(&assoc)
            .trim()
            .to_string(),
        called_ae: assoc.called_ae_title().trim().to_string(),
        peer,
    };
    info!(association = %info.id, calling_ae = %info.calling_ae, %peer, "association opened");
    service.association_opened(&info).await;
    let mut stats = AssociationStats::default();
    let outcome = Exchange {
        assoc: &mut assoc,
        service,
        info: &info,
        stats: &mut stats,
        config,
    }
    .run(shutdown)
    .await;
    drop(assoc);
    drop(slot);
    info!(association = %info.id, outcome, stored = stats.stored, failed = stats.failed, "association closed");
    service.association_closed(&info, outcome, &stats).await;
}

/// The socket, and a duplicate of its descriptor for the error path.
fn with_spare_handle(socket: TcpStream) -> std::io::Result<(TcpStream, std::net::TcpStream)> {
    let std = socket.into_std()?;
    let spare = std.try_clone()?;
    Ok((TcpStream::from_std(std)?, spare))
}

/// The A-ASSOCIATE-RQ (or what came instead) could not be decoded: not a
/// network error, a timeout or a closed connection (the state table closes
/// those silently), and not a PDU dicom-ul already answered.
fn malformed_first_pdu(e: &dicom_ul::association::Error) -> bool {
    use dicom_ul::association::Error;
    matches!(e, Error::ReceivePdu { source, .. }
        if !matches!(source, dicom_ul::pdu::ReadError::ReadPdu { .. }))
}

/// Send A-ABORT (service provider, invalid PDU parameter) on the spare
/// handle of a connection whose first PDU did not decode, and close it.
async fn abort_and_close(spare: std::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let Ok(mut socket) = TcpStream::from_std(spare) else {
        return;
    };
    let abort = Pdu::AbortRQ {
        source: AbortRQSource::ServiceProvider(AbortRQServiceProviderReason::InvalidPduParameter),
    };
    let mut out = Vec::new();
    if dicom_ul::pdu::write_pdu(&mut out, &abort).is_ok()
        && tokio::time::timeout(Duration::from_secs(2), socket.write_all(&out))
            .await
            .is_ok_and(|r| r.is_ok())
    {
        close_gracefully(&mut socket).await;
    }
}

/// After an A-ABORT: close our side and read (and drop) what the peer still
/// sends for a moment, up to 1 MiB, so that closing a socket with unread
/// bytes does not send a TCP reset, which can destroy the A-ABORT before
/// the peer reads it (PS3.8 9.1.6: the provider waits for the peer to close).
async fn close_gracefully<T: AsyncRead + AsyncWrite + Unpin>(stream: &mut T) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let drain = async {
        stream.shutdown().await?;
        let mut sink = vec![0u8; 16 * 1024];
        let mut total = 0usize;
        while total < (1 << 20) {
            match stream.read(&mut sink).await? {
                0 => break,
                n => total += n,
            }
        }
        std::io::Result::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
}

fn describe_establish_error(e: &dicom_ul::association::Error) -> String {
    use dicom_ul::association::Error;
    match e {
        Error::Rejected { association_rj, .. } => match &association_rj.source {
            AssociationRJSource::ServiceUser(r) => r.to_string(),
            AssociationRJSource::ServiceProviderASCE(r) => r.to_string(),
            AssociationRJSource::ServiceProviderPresentation(r) => r.to_string(),
        },
        other => other.to_string(),
    }
}

/// The message state of an association between PDUs.
enum InFlight<K> {
    Idle,
    Command {
        pc_id: u8,
        bytes: Vec<u8>,
    },
    /// Data set fragments of a C-STORE go to the sink (or are discarded after
    /// a failure, so the response can still be sent at the end).
    Store {
        pc_id: u8,
        command: Command,
        sink: Option<K>,
        failure: Option<DimseStatus>,
        bytes: u64,
    },
    /// A data set that follows a command the node does not serve.
    Discard {
        pc_id: u8,
        command: Command,
    },
}

/// A command set larger than this is not a DIMSE command (they are a few
/// hundred bytes): abort rather than buffer it.
const MAX_COMMAND_BYTES: usize = 64 * 1024;

struct Exchange<'a, S: StoreService, T> {
    assoc: &'a mut AsyncServerAssociation<T>,
    service: &'a S,
    info: &'a AssociationInfo,
    stats: &'a mut AssociationStats,
    config: &'a ServerConfig,
}

impl<S: StoreService, T> Exchange<'_, S, T>
where
    T: AsyncRead + AsyncWrite + Unpin + Send,
{
    async fn run(mut self, shutdown: CancellationToken) -> &'static str {
        let mut state: InFlight<S::Sink> = InFlight::Idle;
        loop {
            let idle = matches!(state, InFlight::Idle);
            let pdu = tokio::select! {
                r = self.assoc.receive() => r,
                _ = shutdown.cancelled(), if idle => {
                    self.abort(AbortRQServiceProviderReason::ReasonNotSpecified).await;
                    return "aborted: node shutting down";
                }
            };
            let outcome = match pdu {
                Ok(Pdu::PData { data }) => {
                    let mut result = Ok(());
                    for pdv in data {
                        result = self.on_pdv(&mut state, pdv).await;
                        if result.is_err() {
                            break;
                        }
                    }
                    match result {
                        Ok(()) => continue,
                        Err(reason) => {
                            self.abort(AbortRQServiceProviderReason::UnexpectedPdu)
                                .await;
                            Some(reason)
                        }
                    }
                }
                Ok(Pdu::ReleaseRQ) => {
                    let mid_message = !matches!(state, InFlight::Idle);
                    let _ = self.assoc.send(&Pdu::ReleaseRP).await;
                    Some(if mid_message {
                        "released mid-message"
                    } else {
                        "released"
                    })
                }
                Ok(Pdu::AbortRQ { .. }) => Some("aborted by peer"),
                Ok(other) => {
                    debug!(association = %self.info.id, pdu = %other.short_description(), "unexpected PDU");
                    self.abort(AbortRQServiceProviderReason::UnexpectedPdu)
                        .await;
                    Some("aborted: unexpected PDU")
                }
                Err(e) => {
                    debug!(association = %self.info.id, error = %e, "receive failed");
                    let reason = classify_receive_error(&e);
                    if reason != "connection closed" {
                        self.abort(AbortRQServiceProviderReason::InvalidPduParameter)
                            .await;
                    }
                    Some(reason)
                }
            };
            if let InFlight::Store {
                sink: Some(sink), ..
            } = state
            {
                // Never leave a partial instance behind (issue: aborted mid-transfer).
                sink.abort().await;
                self.stats.failed += 1;
            }
            return outcome.unwrap_or("closed");
        }
    }

    async fn abort(&mut self, reason: AbortRQServiceProviderReason) {
        let sent = self
            .assoc
            .send(&Pdu::AbortRQ {
                source: AbortRQSource::ServiceProvider(reason),
            })
            .await;
        if sent.is_ok() {
            close_gracefully(self.assoc.inner_stream()).await;
        }
    }

    /// Handle one presentation data value. An `Err` aborts the association.
    async fn on_pdv(
        &mut self,
        state: &mut InFlight<S::Sink>,
        pdv: PDataValue,
    ) -> Result<(), &'static str> {
        match pdv.value_type {
            PDataValueType::Command => {
                // A command in the middle of a data set leaves the state as
                // it is, so that the caller discards the partial instance.
                let (pc_id, mut bytes) = match state {
                    InFlight::Idle => (pdv.presentation_context_id, Vec::new()),
                    InFlight::Command { pc_id, bytes } if *pc_id == pdv.presentation_context_id => {
                        (*pc_id, std::mem::take(bytes))
                    }
                    _ => return Err("aborted: command fragment out of sequence"),
                };
                *state = InFlight::Idle;
                bytes.extend_from_slice(&pdv.data);
                if bytes.len() > MAX_COMMAND_BYTES {
                    return Err("aborted: command set too large");
                }
                if pdv.is_last {
                    *state = self.on_command(pc_id, &bytes).await?;
                } else {
                    *state = InFlight::Command { pc_id, bytes };
                }
                Ok(())
            }
            PDataValueType::Data => match state {
                InFlight::Store {
                    pc_id,
                    sink,
                    failure,
                    bytes,
                    ..
                } if *pc_id == pdv.presentation_context_id => {
                    *bytes += pdv.data.len() as u64;
                    if failure.is_none()
                        && let Some(s) = sink.as_mut()
                        && let Err(status) = s.write(pdv.data).await
                    {
                        *failure = Some(status);
                        if let Some(s) = sink.take() {
                            s.abort().await;
                        }
                    }
                    if pdv.is_last {
                        let InFlight::Store {
                            pc_id,
                            command,
                            sink,
                            failure,
                            bytes,
                        } = std::mem::replace(state, InFlight::Idle)
                        else {
                            unreachable!("matched above")
                        };
                        let status = match (failure, sink) {
                            (Some(f), _) => f,
                            (None, Some(sink)) => sink.finish().await,
                            (None, None) => DimseStatus::failure(
                                status::OUT_OF_RESOURCES,
                                "instance could not be received",
                            ),
                        };
                        if status.code == status::SUCCESS {
                            self.stats.stored += 1;
                            self.stats.bytes += bytes;
                        } else {
                            self.stats.failed += 1;
                        }
                        self.respond(pc_id, &command, field::C_STORE_RSP, &status)
                            .await?;
                    }
                    Ok(())
                }
                InFlight::Discard { pc_id, .. } if *pc_id == pdv.presentation_context_id => {
                    if pdv.is_last {
                        let InFlight::Discard { pc_id, command } =
                            std::mem::replace(state, InFlight::Idle)
                        else {
                            unreachable!("matched above")
                        };
                        let status = DimseStatus::failure(
                            status::UNRECOGNIZED_OPERATION,
                            "this node serves C-ECHO and C-STORE only",
                        );
                        self.respond(pc_id, &command, command.command_field | 0x8000, &status)
                            .await?;
                    }
                    Ok(())
                }
                _ => Err("aborted: data fragment without a command"),
            },
        }
    }

    /// A whole command set arrived: answer it or get ready for its data set.
    async fn on_command(
        &mut self,
        pc_id: u8,
        bytes: &[u8],
    ) -> Result<InFlight<S::Sink>, &'static str> {
        let command = match Command::decode(bytes) {
            Ok(c) => c,
            Err(e) => {
                warn!(association = %self.info.id, error = %e, "undecodable command set");
                return Err("aborted: undecodable command set");
            }
        };
        let Some(pc) = self
            .assoc
            .presentation_contexts()
            .iter()
            .find(|pc| pc.id == pc_id && pc.reason == PresentationContextResultReason::Acceptance)
            .cloned()
        else {
            return Err("aborted: message on a presentation context that was not accepted");
        };
        match command.command_field {
            field::C_ECHO_RQ if !command.has_data_set => {
                self.respond(pc_id, &command, field::C_ECHO_RSP, &DimseStatus::SUCCESS)
                    .await?;
                Ok(InFlight::Idle)
            }
            field::C_STORE_RQ if command.has_data_set => {
                let request = StoreRequest {
                    message_id: command.message_id,
                    sop_class_uid: command.affected_sop_class_uid.clone(),
                    sop_instance_uid: command.affected_sop_instance_uid.clone(),
                    transfer_syntax: command::trim_uid(&pc.transfer_syntax).to_string(),
                };
                let (sink, failure) = if command.affected_sop_instance_uid.is_empty() {
                    (
                        None,
                        Some(DimseStatus::failure(
                            status::MISTYPED_ARGUMENT,
                            "C-STORE-RQ lacks Affected SOP Instance UID",
                        )),
                    )
                } else if command.affected_sop_class_uid.is_empty() {
                    (
                        None,
                        Some(DimseStatus::failure(
                            status::MISTYPED_ARGUMENT,
                            "C-STORE-RQ lacks Affected SOP Class UID",
                        )),
                    )
                } else if command::trim_uid(&pc.abstract_syntax) != command.affected_sop_class_uid
                    && !(self.config.accept_any_storage
                        && sop::is_storage_class(&command.affected_sop_class_uid))
                {
                    // PS3.7 C.5.9: the SOP class must be the context's.
                    (
                        None,
                        Some(DimseStatus::failure(
                            status::SOP_CLASS_NOT_SUPPORTED,
                            "SOP class differs from the presentation context",
                        )),
                    )
                } else {
                    match self.service.begin(self.info, &request).await {
                        Ok(sink) => (Some(sink), None),
                        Err(status) => (None, Some(status)),
                    }
                };
                Ok(InFlight::Store {
                    pc_id,
                    command,
                    sink,
                    failure,
                    bytes: 0,
                })
            }
            _ if command.has_data_set => Ok(InFlight::Discard { pc_id, command }),
            _ => {
                let status = DimseStatus::failure(
                    status::UNRECOGNIZED_OPERATION,
                    "this node serves C-ECHO and C-STORE only",
                );
                self.respond(pc_id, &command, command.command_field | 0x8000, &status)
                    .await?;
                Ok(InFlight::Idle)
            }
        }
    }

    async fn respond(
        &mut self,
        pc_id: u8,
        request: &Command,
        response_field: u16,
        status: &DimseStatus,
    ) -> Result<(), &'static str> {
        let bytes = command::response(
            request,
            response_field,
            status.code,
            status.comment.as_deref(),
        )
        .map_err(|_| "aborted: response could not be encoded")?;
        self.assoc
            .send(&Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: pc_id,
                    value_type: PDataValueType::Command,
                    is_last: true,
                    data: bytes,
                }],
            })
            .await
            .map_err(|_| "connection lost while responding")
    }
}

fn classify_receive_error(e: &dicom_ul::association::Error) -> &'static str {
    let text = e.to_string().to_ascii_lowercase();
    let source = format!("{e:?}").to_ascii_lowercase();
    if source.contains("connectionclosed") || text.contains("connection closed") {
        "connection closed"
    } else if source.contains("timeout") || text.contains("timed out") {
        "aborted: read timeout"
    } else if source.contains("pdutoolarge") || source.contains("too large") {
        "aborted: PDU larger than negotiated maximum"
    } else {
        "aborted: malformed PDU"
    }
}
