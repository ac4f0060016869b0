//! One connection of either listener, from TCP accept to the end of its
//! association: the transport's opening (TLS handshake on the TLS port),
//! the A-ASSOCIATE-RQ with access control and the association limit, then
//! the exchange. Plain and TLS connections share this one path; only
//! `open_plain` / `open_tls` know which is which (dicom-ul establishes an
//! association on a `TcpStream` only, so the opening cannot be generic),
//! and everything after it is generic over the stream. It never touches
//! disk or SQL: every outcome goes to the [`StoreService`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use dicom_ul::association::server::AsyncServerAssociation;
use dicom_ul::association::server::{AccessControl, ServerAssociationOptions};
use dicom_ul::pdu::{
    AbortRQServiceProviderReason, AbortRQSource, AssociationRJ, AssociationRJResult,
    AssociationRJServiceProviderPresentationReason, AssociationRJServiceUserReason,
    AssociationRJSource, Pdu, UserIdentity,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::admission::{ARTIM_TIMEOUT, Pending, close_unanswered, first_pdu_ready};
use super::exchange::{Exchange, close_gracefully};
use super::{AssociationInfo, AssociationStats, ServerConfig, Shared, StoreService};
use crate::dimse::sop;

/// The AE titles of a request, kept for the audit log of a rejection
/// (dicom-ul does not hand them back with the error).
type Seen = Arc<std::sync::Mutex<(String, String)>>;

/// How a listener carries DICOM: plain TCP, or DICOM TLS (PS3.15 B.9).
#[derive(Clone)]
pub(super) enum Transport {
    Plain,
    Tls(Arc<rustls::ServerConfig>),
}

/// What became of a connection before any DIMSE message, on either
/// transport (`T` is its stream once opened).
enum Opening<T> {
    /// A-ASSOCIATE-AC sent: serve it, holding its association slot.
    Established(AsyncServerAssociation<T>, OwnedSemaphorePermit),
    /// No association slot: answer the request on this stream with
    /// A-ASSOCIATE-RJ "local limit exceeded".
    OverLimit(T),
    /// Turned away (already answered, or closed), with the audit reason.
    Rejected(String),
    /// Closed by the node before an association: ARTIM expired.
    Cut(&'static str),
    /// Could not even be set up: logged, nothing to audit.
    Dropped,
}

/// Serve one admitted connection to its end. `pending` is its place among
/// the connections without an association; it is given up once the
/// A-ASSOCIATE-RQ has arrived.
pub(super) async fn serve_connection<S: StoreService>(
    socket: TcpStream,
    peer: SocketAddr,
    transport: Transport,
    shared: &Shared<S>,
    shutdown: CancellationToken,
    pending: Pending,
) {
    let seen = Seen::default();
    // PS3.8 9.1.5: ARTIM runs from the transport connection to a complete
    // A-ASSOCIATE-RQ. dicom-ul's read timeout bounded that wait before
    // ARTIM existed; the shorter of the two still does.
    let limit = shared.admission.limits().artim_timeout;
    let deadline = Instant::now() + limit.min(shared.config.read_timeout);
    match transport {
        Transport::Plain => {
            let opening = open_plain(socket, peer, shared, &seen, deadline, pending).await;
            conclude(opening, &seen, peer, shared, shutdown).await
        }
        Transport::Tls(tls) => {
            let opening = open_tls(socket, peer, tls, shared, &seen, deadline, pending).await;
            conclude(opening, &seen, peer, shared, shutdown).await
        }
    }
}

/// The same for both transports once the connection is opened.
async fn conclude<S: StoreService, T>(
    opening: Opening<T>,
    seen: &Seen,
    peer: SocketAddr,
    shared: &Shared<S>,
    shutdown: CancellationToken,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (config, service) = (&shared.config, &shared.service);
    match opening {
        Opening::Established(assoc, slot) => {
            serve_association(assoc, peer, config, service, shutdown, slot).await
        }
        Opening::OverLimit(stream) => reject_over_limit(stream, peer, service).await,
        Opening::Rejected(reason) => {
            // The slot is free once the peer has its answer (it was dropped
            // with the opening), not after our bookkeeping.
            let (calling, called) = seen.lock().map(|s| s.clone()).unwrap_or_default();
            warn!(%peer, %reason, "association rejected");
            service
                .association_rejected(peer, &calling, &called, &reason)
                .await;
        }
        Opening::Cut(reason) => shared.cut(reason, peer).await,
        Opening::Dropped => {}
    }
}

/// A plain TCP connection: wait (ARTIM) for the whole A-ASSOCIATE-RQ
/// without reading it, take an association slot only then, and let dicom-ul
/// read and answer it.
async fn open_plain<S: StoreService>(
    socket: TcpStream,
    peer: SocketAddr,
    shared: &Shared<S>,
    seen: &Seen,
    deadline: Instant,
    pending: Pending,
) -> Opening<TcpStream> {
    if timeout_at(deadline, first_pdu_ready(&socket))
        .await
        .is_err()
    {
        close_unanswered(socket).await;
        return Opening::Cut(ARTIM_TIMEOUT);
    }
    let slot = shared.slots.clone().try_acquire_owned().ok();
    drop(pending);
    let Some(slot) = slot else {
        return Opening::OverLimit(socket);
    };
    let options = association_options(&shared.config, peer.ip(), seen.clone(), None);
    // dicom-ul drops the connection without a word when the first PDU does
    // not parse (or exceeds the maximum length); keep a second handle on the
    // socket to answer that with an A-ABORT (PS3.8 9.3.8, state table AA-1).
    let (socket, spare) = match with_spare_handle(socket) {
        Ok(pair) => pair,
        Err(e) => {
            warn!(%peer, error = %e, "connection could not be set up");
            return Opening::Dropped;
        }
    };
    match timeout_at(deadline, options.establish_async(socket)).await {
        Err(_) => Opening::Cut(ARTIM_TIMEOUT),
        Ok(Ok(assoc)) => {
            drop(spare);
            Opening::Established(assoc, slot)
        }
        Ok(Err(e)) => {
            if malformed_first_pdu(&e) {
                abort_and_close(spare).await;
            }
            Opening::Rejected(describe_establish_error(&e))
        }
    }
}

/// A DICOM TLS connection: TLS handshake (client certificate verified when
/// the configuration asks for one), then the A-ASSOCIATE-RQ with the same
/// access control as the plain port, all within ARTIM. A failed handshake
/// is a rejection with its reason. The stream belongs to dicom-ul until the
/// association is established, so an undecodable first PDU is answered by
/// closing the connection (no A-ABORT on this port), and the association
/// slot is taken by the access control, once the request is complete.
async fn open_tls<S: StoreService>(
    socket: TcpStream,
    peer: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    shared: &Shared<S>,
    seen: &Seen,
    deadline: Instant,
    pending: Pending,
) -> Opening<tokio_rustls::server::TlsStream<TcpStream>> {
    if shared.slots.available_permits() == 0 {
        // The over-limit answer goes out after the handshake.
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        return match timeout_at(deadline, acceptor.accept(socket)).await {
            Ok(Ok(stream)) => Opening::OverLimit(stream),
            Ok(Err(e)) => Opening::Rejected(format!("TLS handshake failed: {e}")),
            Err(_) => Opening::Cut(ARTIM_TIMEOUT),
        };
    }
    let claim = SlotClaim {
        slots: shared.slots.clone(),
        taken: Default::default(),
    };
    let taken = claim.taken.clone();
    let options =
        association_options(&shared.config, peer.ip(), seen.clone(), Some(claim)).tls_config(tls);
    let established = timeout_at(deadline, options.establish_tls_async(socket)).await;
    drop(pending);
    let slot = taken.lock().ok().and_then(|mut t| t.take());
    match (established, slot) {
        (Err(_), _) => Opening::Cut(ARTIM_TIMEOUT),
        (Ok(Err(e)), _) => Opening::Rejected(describe_tls_establish_error(&e)),
        (Ok(Ok(assoc)), Some(slot)) => Opening::Established(assoc, slot),
        (Ok(Ok(assoc)), None) => {
            // The last slot went to another association between the check
            // above and this request: the A-ASSOCIATE-AC is out, so abort.
            let _ = assoc.abort().await;
            Opening::Rejected("local limit exceeded".into())
        }
    }
}

/// An association slot taken by the access control when it accepts a
/// request (TLS port: the request is not visible to the node before).
struct SlotClaim {
    slots: Arc<Semaphore>,
    taken: Arc<std::sync::Mutex<Option<OwnedSemaphorePermit>>>,
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
    seen: Seen,
    claim: Option<SlotClaim>,
}

impl AccessControl for PeerPolicy<'_> {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        let verdict = self.verdict(this_ae_title, calling_ae_title, called_ae_title);
        if verdict.is_ok()
            && let Some(claim) = &self.claim
            && let Ok(mut taken) = claim.taken.lock()
        {
            *taken = claim.slots.clone().try_acquire_owned().ok();
        }
        verdict
    }
}

impl PeerPolicy<'_> {
    fn verdict(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
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
pub(super) fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn association_options<'a>(
    config: &'a ServerConfig,
    peer_ip: IpAddr,
    seen: Seen,
    claim: Option<SlotClaim>,
) -> ServerAssociationOptions<'a, PeerPolicy<'a>, dicom_ul::association::server::DefaultNegotiation>
{
    let mut options = ServerAssociationOptions::new()
        .ae_access_control(PeerPolicy {
            config,
            peer_ip,
            seen,
            claim,
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

/// A new association's id (the audit's `association_id`).
pub fn new_association_id() -> String {
    format!("{:016x}", rand::random::<u64>())
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
