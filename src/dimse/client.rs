//! The node's own C-STORE / C-ECHO SCU (PS3.4 B.2, A.4), used by
//! `her2map send`, `her2map echo` and the outbox, over TCP or DICOM TLS
//! (PS3.15 B.9). Data sets are streamed from any `AsyncRead` as encoded,
//! never re-encoded.

use std::sync::Arc;
use std::time::Duration;

use dicom_object::InMemDicomObject;
use dicom_ul::association::client::{
    AsyncClientAssociation, AsyncTlsStream, ClientAssociationOptions,
};
use dicom_ul::pdu::{
    AssociationRJResult, PDataValue, PDataValueType, Pdu, PresentationContextResultReason,
    UserVariableItem,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::command;
use super::server::{
    AssociationInfo, AssociationStats, DimseStatus, InstanceSink, StoreRequest, StoreService,
};
use super::sop;

/// Who the SCU says it is and whom it calls.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub calling_ae: String,
    pub called_ae: String,
    pub max_pdu: u32,
    pub timeout: Duration,
    /// DICOM TLS instead of plain TCP.
    pub tls: Option<ClientTls>,
}

/// The TLS side of an association: the rustls configuration (whom to trust,
/// the node's certificate if any) and the name the peer's certificate must
/// carry.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: String,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            calling_ae: "HER2MAP".into(),
            called_ae: "ANY-SCP".into(),
            max_pdu: 65536,
            timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("could not connect: {0}")]
    Connect(String),
    /// A-ASSOCIATE-RJ; `permanent` per PS3.8 9.3.4 result 1.
    #[error("association rejected ({}): {reason}", if *permanent { "permanent" } else { "transient" })]
    Rejected { permanent: bool, reason: String },
    #[error("no presentation context accepted for {0}")]
    NoContext(String),
    #[error("association failed: {0}")]
    Protocol(String),
    #[error("timed out: {0}")]
    Timeout(String),
}

impl ClientError {
    /// Whether trying again later may succeed (outbox retry policy).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Rejected { permanent, .. } => !permanent,
            ClientError::NoContext(_) => false,
            _ => true,
        }
    }
}

/// An open association to a Storage SCP.
pub struct ScuAssociation {
    assoc: Link,
    next_message_id: u16,
    timeout: Duration,
}

/// The association over either transport; every use goes through
/// [`on_link!`], so the DIMSE code below is written once. (Boxed: the TLS
/// one holds over a kilobyte of rustls state, the plain one a fifth of it.)
enum Link {
    Plain(Box<AsyncClientAssociation<TcpStream>>),
    Tls(Box<AsyncClientAssociation<AsyncTlsStream>>),
}

/// Run the same code on the association whatever its transport.
macro_rules! on_link {
    ($link:expr, $a:ident => $body:expr) => {
        match $link {
            Link::Plain($a) => $body,
            Link::Tls($a) => $body,
        }
    };
}

fn map_establish_error(e: dicom_ul::association::Error) -> ClientError {
    use dicom_ul::association::Error;
    match e {
        Error::Rejected { association_rj, .. } => ClientError::Rejected {
            permanent: association_rj.result == AssociationRJResult::Permanent,
            reason: format!("{:?}", association_rj.source),
        },
        Error::NoAcceptedPresentationContexts { .. } => {
            ClientError::NoContext("any proposed SOP class".into())
        }
        Error::Connect { source, .. } => ClientError::Connect(source.to_string()),
        other => ClientError::Protocol(other.to_string()),
    }
}

impl ScuAssociation {
    /// Request an association proposing one presentation context per
    /// (abstract syntax, transfer syntax) pair.
    pub async fn connect(
        addr: &str,
        options: &ClientOptions,
        contexts: &[(String, String)],
    ) -> Result<Self, ClientError> {
        let proposals: Vec<(String, Vec<String>)> = contexts
            .iter()
            .map(|(a, t)| (a.clone(), vec![t.clone()]))
            .collect();
        Self::connect_with(addr, options, &proposals, &[]).await
    }

    /// Request an association proposing one presentation context per
    /// abstract syntax with its transfer syntaxes in order of preference,
    /// and offering the SCP role for the SOP classes in `scp_roles` (the
    /// SCP/SCU Role Selection sub-items of PS3.7 D.3.3.4: C-GET's C-STORE
    /// sub-operations come back on this association).
    pub async fn connect_with(
        addr: &str,
        options: &ClientOptions,
        contexts: &[(String, Vec<String>)],
        scp_roles: &[String],
    ) -> Result<Self, ClientError> {
        let mut builder = ClientAssociationOptions::new()
            .calling_ae_title(options.calling_ae.clone())
            .called_ae_title(options.called_ae.clone())
            .max_pdu_length(options.max_pdu)
            .read_timeout(options.timeout)
            .write_timeout(options.timeout)
            .connection_timeout(options.timeout);
        for (abstract_syntax, ts) in contexts {
            builder = builder.with_presentation_context(abstract_syntax.clone(), ts.clone());
        }
        for class in scp_roles {
            // SCU role 0, SCP role 1: the node only stores what it gets.
            builder = builder.with_role_selection(class.clone(), false, true);
        }
        let establish = async {
            Ok(match &options.tls {
                None => {
                    let mut a = builder.establish_async(addr).await?;
                    // Nagle's algorithm would stall each small command by ~40 ms.
                    let _ = a.inner_stream().set_nodelay(true);
                    Link::Plain(Box::new(a))
                }
                Some(tls) => {
                    let mut a = builder
                        .tls_config(tls.config.clone())
                        .server_name(&tls.server_name)
                        .establish_tls_async(addr)
                        .await?;
                    let _ = a.inner_stream().get_ref().0.set_nodelay(true);
                    Link::Tls(Box::new(a))
                }
            })
        };
        let assoc = tokio::time::timeout(options.timeout, establish)
            .await
            .map_err(|_| ClientError::Timeout("association request".into()))?
            .map_err(map_establish_error)?;
        Ok(ScuAssociation {
            assoc,
            next_message_id: 1,
            timeout: options.timeout,
        })
    }

    /// The accepted presentation context for this SOP class and transfer syntax.
    pub fn context_for(&self, sop_class: &str, transfer_syntax: &str) -> Option<u8> {
        on_link!(&self.assoc, a => a.presentation_contexts())
            .iter()
            .find(|pc| {
                pc.reason == PresentationContextResultReason::Acceptance
                    && command::trim_uid(&pc.abstract_syntax) == sop_class
                    && command::trim_uid(&pc.transfer_syntax) == transfer_syntax
            })
            .map(|pc| pc.id)
    }

    fn message_id(&mut self) -> u16 {
        let id = self.next_message_id;
        self.next_message_id = self.next_message_id.wrapping_add(1).max(1);
        id
    }

    /// C-ECHO on an association that proposed Verification.
    pub async fn echo(&mut self) -> Result<DimseStatus, ClientError> {
        let pc_id = self
            .context_for(sop::VERIFICATION, sop::IMPLICIT_VR_LE)
            .ok_or_else(|| ClientError::NoContext("Verification".into()))?;
        let id = self.message_id();
        let cmd = command::echo_request(id).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.send_command(pc_id, cmd).await?;
        self.read_response().await
    }

    /// C-STORE one instance whose encoded data set is read from `dataset`.
    pub async fn store<R: AsyncRead + Unpin>(
        &mut self,
        pc_id: u8,
        sop_class: &str,
        sop_instance: &str,
        dataset: &mut R,
    ) -> Result<DimseStatus, ClientError> {
        let id = self.message_id();
        let cmd = command::store_request(id, sop_class, sop_instance)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.send_command(pc_id, cmd).await?;
        let timeout = self.timeout;
        let send = async { on_link!(&mut self.assoc, a => send_dataset(a, pc_id, dataset).await) };
        tokio::time::timeout(timeout * 10, send)
            .await
            .map_err(|_| ClientError::Timeout("sending data set".into()))?
            .map_err(|e| ClientError::Protocol(format!("sending data set: {e}")))?;
        self.read_response().await
    }

    async fn send_command(&mut self, pc_id: u8, data: Vec<u8>) -> Result<(), ClientError> {
        let pdu = Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc_id,
                value_type: PDataValueType::Command,
                is_last: true,
                data,
            }],
        };
        on_link!(&mut self.assoc, a => a.send(&pdu).await)
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    async fn read_response(&mut self) -> Result<DimseStatus, ClientError> {
        let mut bytes = Vec::new();
        loop {
            let receive = async { on_link!(&mut self.assoc, a => a.receive().await) };
            let pdu = tokio::time::timeout(self.timeout, receive)
                .await
                .map_err(|_| ClientError::Timeout("waiting for the response".into()))?
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            match pdu {
                Pdu::PData { data } => {
                    for pdv in data {
                        if pdv.value_type == PDataValueType::Command {
                            bytes.extend_from_slice(&pdv.data);
                            if pdv.is_last {
                                let (code, comment) = command::response_status(&bytes)
                                    .map_err(|e| ClientError::Protocol(e.to_string()))?;
                                return Ok(DimseStatus { code, comment });
                            }
                        }
                    }
                }
                Pdu::AbortRQ { source } => {
                    return Err(ClientError::Protocol(format!(
                        "aborted by peer: {source:?}"
                    )));
                }
                other => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected PDU {}",
                        other.short_description()
                    )));
                }
            }
        }
    }

    /// A-RELEASE (PS3.8 7.2); errors are ignored: the work is done.
    pub async fn release(self) {
        let release = async { on_link!(self.assoc, a => a.release().await) };
        let _ = tokio::time::timeout(self.timeout, release).await;
    }

    /// A-ABORT.
    pub async fn abort(self) {
        let _ = on_link!(self.assoc, a => a.abort().await);
    }
}

/// Stream one data set as P-DATA fragments of the peer's maximum PDU size.
async fn send_dataset<S, R>(
    assoc: &mut AsyncClientAssociation<S>,
    pc_id: u8,
    dataset: &mut R,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    R: AsyncRead + Unpin,
{
    let mut writer = assoc.send_pdata(pc_id);
    tokio::io::copy(dataset, &mut writer).await?;
    // Always finish explicitly: the writer's Drop would block.
    writer.finish().await
}

/// C-ECHO a peer on a fresh association.
pub async fn echo(addr: &str, options: &ClientOptions) -> Result<DimseStatus, ClientError> {
    let contexts = [(
        sop::VERIFICATION.to_string(),
        sop::IMPLICIT_VR_LE.to_string(),
    )];
    let mut assoc = ScuAssociation::connect(addr, options, &contexts).await?;
    let status = assoc.echo().await;
    assoc.release().await;
    status
}

// ---------------------------------------------------------------------------
// Query/Retrieve SCU (PS3.4 Annex C): C-FIND, C-MOVE, and C-GET with the
// storage SCP role on the same association.
// ---------------------------------------------------------------------------

/// The most bytes one Identifier (a C-FIND match) may hold: they are a few
/// hundred; more is not a query response.
const MAX_IDENTIFIER_BYTES: usize = 1 << 20;

/// What a C-FIND returned (PS3.4 C.4.1.1.4).
#[derive(Debug, Clone)]
pub struct FindOutcome {
    /// The final status (Success, Cancel, or a failure).
    pub status: DimseStatus,
    /// The Identifiers of the Pending responses, as the peer sent them:
    /// the caller validates them (a PACS may answer beyond the keys).
    pub matches: Vec<InMemDicomObject>,
    /// `max_matches` was reached and the query cancelled (C-CANCEL).
    pub truncated: bool,
    /// Pending responses whose Identifier did not parse (skipped).
    pub unreadable: usize,
}

impl FindOutcome {
    /// The query ended as it should: Success, or Cancel (FE00, "matching
    /// terminated due to Cancel request", PS3.4 C.4.1.1.4) after the
    /// C-CANCEL this side sent at `max_matches`. Which of the two comes is
    /// a race the SCP decides: whether it saw the cancel before its last
    /// match.
    pub fn completed(&self) -> bool {
        self.status.code == command::status::SUCCESS
            || (self.truncated && self.status.code == command::status::CANCEL)
    }
}

/// What a C-MOVE or C-GET did (PS3.4 C.4.2.1.5, C.4.3.1.5).
#[derive(Debug, Clone, Default)]
pub struct RetrieveOutcome {
    pub status: DimseStatus,
    /// Sub-operation counts of the final response (else of the last
    /// Pending one); absent ones are 0.
    pub completed: u32,
    pub failed: u32,
    pub warning: u32,
    /// Failed SOP Instance UID List (0008,0058) of the final response.
    pub failed_instances: Vec<String>,
    /// C-GET: instances received on this association and stored (Success),
    /// and those refused.
    pub received: u64,
    pub received_failed: u64,
    /// A C-CANCEL was sent (a response timed out).
    pub cancelled: bool,
}

impl Default for DimseStatus {
    fn default() -> Self {
        DimseStatus::SUCCESS
    }
}

/// How a retrieve ended, from its final status and counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetrieveResult {
    /// 0000: every sub-operation succeeded.
    Success,
    /// B000 or failures/warnings among the sub-operations: partial.
    Partial,
    /// FE00 after a C-CANCEL.
    Cancelled,
    /// A7xx, A801 (move destination unknown), A900, Cxxx...
    Failed,
}

impl RetrieveOutcome {
    pub fn result(&self) -> RetrieveResult {
        match self.status.code {
            command::status::SUCCESS if self.failed == 0 && self.warning == 0 => {
                RetrieveResult::Success
            }
            command::status::SUCCESS | command::status::SUB_OPERATIONS_WARNING => {
                RetrieveResult::Partial
            }
            command::status::CANCEL => RetrieveResult::Cancelled,
            c if (c & 0xF000) == 0xB000 => RetrieveResult::Partial,
            _ => RetrieveResult::Failed,
        }
    }
}

/// A [`StoreService`] for operations that expect no C-STORE on their
/// association (C-FIND, C-MOVE): any that comes is refused.
pub struct NoStore;

/// Never made: [`NoStore::begin`] always refuses.
pub struct NoSink;

impl StoreService for NoStore {
    type Sink = NoSink;
    async fn association_opened(&self, _: &AssociationInfo) {}
    async fn association_rejected(&self, _: std::net::SocketAddr, _: &str, _: &str, _: &str) {}
    async fn association_closed(&self, _: &AssociationInfo, _: &str, _: &AssociationStats) {}
    async fn begin(&self, _: &AssociationInfo, _: &StoreRequest) -> Result<NoSink, DimseStatus> {
        Err(DimseStatus::failure(
            command::status::SOP_CLASS_NOT_SUPPORTED,
            "no storage on this association",
        ))
    }
}

impl InstanceSink for NoSink {
    async fn write(&mut self, _: Vec<u8>) -> Result<(), DimseStatus> {
        Ok(())
    }
    async fn finish(self) -> DimseStatus {
        DimseStatus::SUCCESS
    }
    async fn abort(self) {}
}

/// The receive state of one Q/R operation between PDVs.
enum Rx<K> {
    Idle,
    Command {
        pc_id: u8,
        bytes: Vec<u8>,
    },
    /// The Identifier of a response.
    Identifier {
        pc_id: u8,
        response: command::Response,
        bytes: Vec<u8>,
    },
    /// A C-STORE sub-operation of a C-GET.
    Store {
        pc_id: u8,
        command: command::Command,
        sink: Option<K>,
        failure: Option<DimseStatus>,
    },
}

/// What the loop gathered of one operation.
#[derive(Default)]
struct Gathered {
    last: command::Response,
    final_identifier: Option<InMemDicomObject>,
    matches: Vec<InMemDicomObject>,
    unreadable: usize,
    truncated: bool,
    cancelled: bool,
    received: u64,
    received_failed: u64,
    counts: (u32, u32, u32),
}

/// Where the loop is in the operation.
enum Step {
    More,
    Done,
}

impl ScuAssociation {
    /// The peer's address (for the records of a C-GET's stored instances).
    pub fn peer_addr(&mut self) -> Option<std::net::SocketAddr> {
        match &mut self.assoc {
            Link::Plain(a) => a.inner_stream().peer_addr().ok(),
            Link::Tls(a) => a.inner_stream().get_ref().0.peer_addr().ok(),
        }
    }

    /// Whether the acceptor granted the node the SCP role for `sop_class`
    /// (PS3.7 D.3.3.4: without a returned item, the requestor is SCU only).
    pub fn scp_role_granted(&self, sop_class: &str) -> bool {
        on_link!(&self.assoc, a => a.user_variables())
            .iter()
            .any(|uv| match uv {
                UserVariableItem::ScuScpRoleSelectionSubItem(uid, roles) => {
                    command::trim_uid(uid) == sop_class && roles.scp
                }
                _ => false,
            })
    }

    /// An accepted presentation context for `sop_class`, with its transfer
    /// syntax.
    fn any_context_for(&self, sop_class: &str) -> Option<(u8, String)> {
        on_link!(&self.assoc, a => a.presentation_contexts())
            .iter()
            .find(|pc| {
                pc.reason == PresentationContextResultReason::Acceptance
                    && command::trim_uid(&pc.abstract_syntax) == sop_class
            })
            .map(|pc| (pc.id, command::trim_uid(&pc.transfer_syntax).to_string()))
    }

    fn context_by_id(&self, pc_id: u8) -> Option<(String, String)> {
        on_link!(&self.assoc, a => a.presentation_contexts())
            .iter()
            .find(|pc| pc.id == pc_id && pc.reason == PresentationContextResultReason::Acceptance)
            .map(|pc| {
                (
                    command::trim_uid(&pc.abstract_syntax).to_string(),
                    command::trim_uid(&pc.transfer_syntax).to_string(),
                )
            })
    }

    /// C-FIND (PS3.4 C.4.1) with `identifier` as the keys: the Identifiers
    /// of the Pending responses, at most `max_matches` (then C-CANCEL).
    pub async fn find(
        &mut self,
        sop_class: &str,
        identifier: &InMemDicomObject,
        max_matches: usize,
    ) -> Result<FindOutcome, ClientError> {
        let g = self
            .operate(
                command::field::C_FIND_RQ,
                sop_class,
                None,
                identifier,
                None::<(&NoStore, &AssociationInfo)>,
                max_matches,
            )
            .await?;
        Ok(FindOutcome {
            status: DimseStatus {
                code: g.last.status,
                comment: g.last.error_comment,
            },
            matches: g.matches,
            truncated: g.truncated,
            unreadable: g.unreadable,
        })
    }

    /// C-MOVE (PS3.4 C.4.2) of what `identifier` names to the AE
    /// `destination` (the PACS opens its own association to it).
    pub async fn move_to(
        &mut self,
        sop_class: &str,
        destination: &str,
        identifier: &InMemDicomObject,
    ) -> Result<RetrieveOutcome, ClientError> {
        let g = self
            .operate(
                command::field::C_MOVE_RQ,
                sop_class,
                Some(destination),
                identifier,
                None::<(&NoStore, &AssociationInfo)>,
                0,
            )
            .await?;
        Ok(retrieve_outcome(g))
    }

    /// C-GET (PS3.4 C.4.3): the PACS sends the instances back on this
    /// association as C-STORE sub-operations, each fed to `service` (as
    /// from the peer `info`) and answered with the status it gives.
    pub async fn get<S: StoreService>(
        &mut self,
        sop_class: &str,
        identifier: &InMemDicomObject,
        service: &S,
        info: &AssociationInfo,
    ) -> Result<RetrieveOutcome, ClientError> {
        let g = self
            .operate(
                command::field::C_GET_RQ,
                sop_class,
                None,
                identifier,
                Some((service, info)),
                0,
            )
            .await?;
        Ok(retrieve_outcome(g))
    }

    /// Send the request and its Identifier, then read responses (and C-GET's
    /// C-STORE sub-operations) until the final one. A response that does not
    /// come within the timeout gets one C-CANCEL (PS3.7 9.3.2.3) and another
    /// timeout, then the operation fails (the caller aborts).
    async fn operate<S: StoreService>(
        &mut self,
        field: u16,
        sop_class: &str,
        move_destination: Option<&str>,
        identifier: &InMemDicomObject,
        store: Option<(&S, &AssociationInfo)>,
        max_matches: usize,
    ) -> Result<Gathered, ClientError> {
        use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
        use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
        let (pc_id, ts_uid) = self
            .any_context_for(sop_class)
            .ok_or_else(|| ClientError::NoContext(sop_class.to_string()))?;
        let ts = TransferSyntaxRegistry
            .get(&ts_uid)
            .ok_or_else(|| ClientError::Protocol(format!("transfer syntax {ts_uid} unknown")))?;
        let mut id_bytes = Vec::new();
        identifier
            .write_dataset_with_ts(&mut id_bytes, ts)
            .map_err(|e| ClientError::Protocol(format!("identifier: {e}")))?;
        let message_id = self.message_id();
        let cmd = command::query_request(field, message_id, sop_class, move_destination)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.send_command(pc_id, cmd).await?;
        let timeout = self.timeout;
        let send = async {
            on_link!(&mut self.assoc, a => send_dataset(a, pc_id, &mut &id_bytes[..]).await)
        };
        tokio::time::timeout(timeout, send)
            .await
            .map_err(|_| ClientError::Timeout("sending the identifier".into()))?
            .map_err(|e| ClientError::Protocol(format!("sending the identifier: {e}")))?;

        let mut state: Rx<S::Sink> = Rx::Idle;
        let mut g = Gathered::default();
        let result = self
            .receive_operation(
                &mut state,
                &mut g,
                pc_id,
                message_id,
                ts,
                store,
                max_matches,
            )
            .await;
        if let Rx::Store {
            sink: Some(sink), ..
        } = state
        {
            // Never leave a partial instance behind.
            sink.abort().await;
        }
        result.map(|()| g)
    }

    #[allow(clippy::too_many_arguments)]
    async fn receive_operation<S: StoreService>(
        &mut self,
        state: &mut Rx<S::Sink>,
        g: &mut Gathered,
        pc_id: u8,
        message_id: u16,
        ts: &dicom_encoding::TransferSyntax,
        store: Option<(&S, &AssociationInfo)>,
        max_matches: usize,
    ) -> Result<(), ClientError> {
        loop {
            let receive = async { on_link!(&mut self.assoc, a => a.receive().await) };
            let pdu = match tokio::time::timeout(self.timeout, receive).await {
                Err(_) if !g.cancelled && matches!(state, Rx::Idle) => {
                    self.cancel(pc_id, message_id).await?;
                    g.cancelled = true;
                    continue;
                }
                Err(_) => {
                    return Err(ClientError::Timeout(if g.cancelled {
                        "no final response after C-CANCEL".into()
                    } else {
                        "waiting for a response".into()
                    }));
                }
                Ok(r) => r.map_err(|e| ClientError::Protocol(e.to_string()))?,
            };
            let data = match pdu {
                Pdu::PData { data } => data,
                Pdu::AbortRQ { source } => {
                    return Err(ClientError::Protocol(format!(
                        "aborted by peer: {source:?}"
                    )));
                }
                other => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected PDU {}",
                        other.short_description()
                    )));
                }
            };
            for pdv in data {
                if let Step::Done = self
                    .on_operation_pdv(state, g, pdv, pc_id, message_id, ts, store, max_matches)
                    .await?
                {
                    return Ok(());
                }
            }
        }
    }

    async fn cancel(&mut self, pc_id: u8, message_id: u16) -> Result<(), ClientError> {
        let cmd = command::cancel_request(message_id)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.send_command(pc_id, cmd).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn on_operation_pdv<S: StoreService>(
        &mut self,
        state: &mut Rx<S::Sink>,
        g: &mut Gathered,
        pdv: PDataValue,
        op_pc: u8,
        message_id: u16,
        ts: &dicom_encoding::TransferSyntax,
        store: Option<(&S, &AssociationInfo)>,
        max_matches: usize,
    ) -> Result<Step, ClientError> {
        let proto = |m: &str| ClientError::Protocol(m.to_string());
        match pdv.value_type {
            PDataValueType::Command => {
                let (pc_id, mut bytes) = match std::mem::replace(state, Rx::Idle) {
                    Rx::Idle => (pdv.presentation_context_id, Vec::new()),
                    Rx::Command { pc_id, bytes } if pc_id == pdv.presentation_context_id => {
                        (pc_id, bytes)
                    }
                    other => {
                        *state = other;
                        return Err(proto("command fragment out of sequence"));
                    }
                };
                bytes.extend_from_slice(&pdv.data);
                if bytes.len() > MAX_IDENTIFIER_BYTES {
                    return Err(proto("command set too large"));
                }
                if !pdv.is_last {
                    *state = Rx::Command { pc_id, bytes };
                    return Ok(Step::More);
                }
                let field = command::command_field(&bytes).map_err(|e| proto(&e.to_string()))?;
                if field == command::field::C_STORE_RQ {
                    let cmd =
                        command::Command::decode(&bytes).map_err(|e| proto(&e.to_string()))?;
                    return self.begin_store(state, pc_id, cmd, store).await;
                }
                let response =
                    command::Response::decode(&bytes).map_err(|e| proto(&e.to_string()))?;
                if response.message_id_being_responded_to != message_id {
                    return Err(proto("response to another message"));
                }
                if response.has_data_set {
                    *state = Rx::Identifier {
                        pc_id,
                        response,
                        bytes: Vec::new(),
                    };
                    return Ok(Step::More);
                }
                self.on_response(g, response, None, op_pc, message_id, max_matches)
                    .await
            }
            PDataValueType::Data => match state {
                Rx::Identifier { pc_id, bytes, .. } if *pc_id == pdv.presentation_context_id => {
                    bytes.extend_from_slice(&pdv.data);
                    if bytes.len() > MAX_IDENTIFIER_BYTES {
                        return Err(proto("identifier too large"));
                    }
                    if !pdv.is_last {
                        return Ok(Step::More);
                    }
                    let Rx::Identifier {
                        response, bytes, ..
                    } = std::mem::replace(state, Rx::Idle)
                    else {
                        unreachable!("matched above")
                    };
                    let identifier = InMemDicomObject::read_dataset_with_ts(&bytes[..], ts).ok();
                    if identifier.is_none() {
                        g.unreadable += 1;
                    }
                    self.on_response(g, response, identifier, op_pc, message_id, max_matches)
                        .await
                }
                Rx::Store {
                    pc_id,
                    sink,
                    failure,
                    ..
                } if *pc_id == pdv.presentation_context_id => {
                    if failure.is_none()
                        && let Some(s) = sink.as_mut()
                        && let Err(status) = s.write(pdv.data).await
                    {
                        *failure = Some(status);
                        if let Some(s) = sink.take() {
                            s.abort().await;
                        }
                    }
                    if !pdv.is_last {
                        return Ok(Step::More);
                    }
                    let Rx::Store {
                        pc_id,
                        command,
                        sink,
                        failure,
                    } = std::mem::replace(state, Rx::Idle)
                    else {
                        unreachable!("matched above")
                    };
                    let status = match (failure, sink) {
                        (Some(f), _) => f,
                        (None, Some(sink)) => sink.finish().await,
                        (None, None) => DimseStatus::failure(
                            command::status::OUT_OF_RESOURCES,
                            "instance could not be received",
                        ),
                    };
                    if status.code == command::status::SUCCESS {
                        g.received += 1;
                    } else {
                        g.received_failed += 1;
                    }
                    self.respond_store(pc_id, &command, &status).await?;
                    Ok(Step::More)
                }
                _ => Err(proto("data fragment without a command")),
            },
        }
    }

    /// A C-STORE-RQ of a C-GET sub-operation arrived: open a sink for it,
    /// or note why it is refused (the response goes after its data set).
    async fn begin_store<S: StoreService>(
        &mut self,
        state: &mut Rx<S::Sink>,
        pc_id: u8,
        command: command::Command,
        store: Option<(&S, &AssociationInfo)>,
    ) -> Result<Step, ClientError> {
        let refuse = |code, text: &str| (None, Some(DimseStatus::failure(code, text)));
        let (sink, failure) = match (self.context_by_id(pc_id), store) {
            (None, _) => {
                return Err(ClientError::Protocol(
                    "C-STORE on a presentation context that was not accepted".into(),
                ));
            }
            (Some(_), None) => refuse(
                command::status::SOP_CLASS_NOT_SUPPORTED,
                "no storage on this association",
            ),
            (Some((abstract_syntax, ts)), Some((service, info))) => {
                if command.affected_sop_instance_uid.is_empty()
                    || command.affected_sop_class_uid.is_empty()
                {
                    refuse(
                        command::status::MISTYPED_ARGUMENT,
                        "C-STORE-RQ lacks its Affected SOP Class/Instance UID",
                    )
                } else if abstract_syntax != command.affected_sop_class_uid {
                    // PS3.7 C.5.9: the SOP class must be the context's.
                    refuse(
                        command::status::SOP_CLASS_NOT_SUPPORTED,
                        "SOP class differs from the presentation context",
                    )
                } else {
                    let request = StoreRequest {
                        message_id: command.message_id,
                        sop_class_uid: command.affected_sop_class_uid.clone(),
                        sop_instance_uid: command.affected_sop_instance_uid.clone(),
                        transfer_syntax: ts,
                    };
                    match service.begin(info, &request).await {
                        Ok(sink) => (Some(sink), None),
                        Err(status) => (None, Some(status)),
                    }
                }
            }
        };
        if !command.has_data_set {
            let status = failure.unwrap_or_else(|| {
                DimseStatus::failure(
                    command::status::MISTYPED_ARGUMENT,
                    "C-STORE-RQ without a data set",
                )
            });
            if let Some(s) = sink {
                s.abort().await;
            }
            self.respond_store(pc_id, &command, &status).await?;
            return Ok(Step::More);
        }
        *state = Rx::Store {
            pc_id,
            command,
            sink,
            failure,
        };
        Ok(Step::More)
    }

    async fn respond_store(
        &mut self,
        pc_id: u8,
        request: &command::Command,
        status: &DimseStatus,
    ) -> Result<(), ClientError> {
        let bytes = command::response(
            request,
            command::field::C_STORE_RSP,
            status.code,
            status.comment.as_deref(),
        )
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.send_command(pc_id, bytes).await
    }

    /// One response of the operation: a Pending one adds its match or its
    /// counts; the final one ends the operation.
    async fn on_response(
        &mut self,
        g: &mut Gathered,
        response: command::Response,
        identifier: Option<InMemDicomObject>,
        op_pc: u8,
        message_id: u16,
        max_matches: usize,
    ) -> Result<Step, ClientError> {
        let counts = (
            response.completed.map(u32::from),
            response.failed.map(u32::from),
            response.warning.map(u32::from),
        );
        g.counts = (
            counts.0.unwrap_or(g.counts.0),
            counts.1.unwrap_or(g.counts.1),
            counts.2.unwrap_or(g.counts.2),
        );
        if command::is_pending(response.status) {
            if response.command_field == command::field::C_FIND_RSP
                && let Some(obj) = identifier
            {
                if g.matches.len() < max_matches {
                    g.matches.push(obj);
                } else if !g.truncated {
                    g.truncated = true;
                    if !g.cancelled {
                        self.cancel(op_pc, message_id).await?;
                        g.cancelled = true;
                    }
                }
            }
            g.last = response;
            return Ok(Step::More);
        }
        g.final_identifier = identifier;
        g.last = response;
        Ok(Step::Done)
    }
}

fn retrieve_outcome(g: Gathered) -> RetrieveOutcome {
    let failed_instances = g
        .final_identifier
        .as_ref()
        .and_then(|o| o.get(dicom_dictionary_std::tags::FAILED_SOP_INSTANCE_UID_LIST))
        .and_then(|e| e.to_multi_str().ok())
        .map(|v| {
            v.iter()
                .map(|s| command::trim_uid(s.trim()).to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    RetrieveOutcome {
        status: DimseStatus {
            code: g.last.status,
            comment: g.last.error_comment,
        },
        completed: g.counts.0,
        failed: g.counts.1,
        warning: g.counts.2,
        failed_instances,
        received: g.received,
        received_failed: g.received_failed,
        cancelled: g.cancelled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(code: u16, truncated: bool) -> FindOutcome {
        FindOutcome {
            status: DimseStatus {
                code,
                comment: None,
            },
            matches: Vec::new(),
            truncated,
            unreadable: 0,
        }
    }

    #[test]
    fn a_cancel_answers_our_own_c_cancel_only() {
        assert!(outcome(command::status::SUCCESS, false).completed());
        assert!(outcome(command::status::SUCCESS, true).completed());
        // The SCP saw our C-CANCEL before its last match.
        assert!(outcome(command::status::CANCEL, true).completed());
        // A cancel nobody asked for, and failures, are not completions.
        assert!(!outcome(command::status::CANCEL, false).completed());
        assert!(!outcome(0xA700, false).completed());
        assert!(!outcome(0xC000, true).completed());
    }
}
