//! The node's own C-STORE / C-ECHO SCU (PS3.4 B.2, A.4), used by
//! `her2map send`, `her2map echo` and the outbox, over TCP or DICOM TLS
//! (PS3.15 B.9). Data sets are streamed from any `AsyncRead` as encoded,
//! never re-encoded.

use std::sync::Arc;
use std::time::Duration;

use dicom_ul::association::client::{
    AsyncClientAssociation, AsyncTlsStream, ClientAssociationOptions,
};
use dicom_ul::pdu::{
    AssociationRJResult, PDataValue, PDataValueType, Pdu, PresentationContextResultReason,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::command;
use super::server::DimseStatus;
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
        let mut builder = ClientAssociationOptions::new()
            .calling_ae_title(options.calling_ae.clone())
            .called_ae_title(options.called_ae.clone())
            .max_pdu_length(options.max_pdu)
            .read_timeout(options.timeout)
            .write_timeout(options.timeout)
            .connection_timeout(options.timeout);
        for (abstract_syntax, ts) in contexts {
            builder = builder.with_presentation_context(abstract_syntax.clone(), vec![ts.clone()]);
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
