//! The message exchange of one established association (PS3.7 DIMSE over
//! PS3.8 P-DATA): C-ECHO and C-STORE answered, instance fragments handed to
//! the [`StoreService`]'s sink as they arrive, every other command refused
//! with a status. It owns the association's state between PDUs and nothing
//! of its opening or of the listeners.

use std::time::Duration;

use dicom_ul::association::server::AsyncServerAssociation;
use dicom_ul::pdu::{
    AbortRQServiceProviderReason, AbortRQSource, PDataValue, PDataValueType, Pdu,
    PresentationContextResultReason,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{
    AssociationInfo, AssociationStats, DimseStatus, InstanceSink, ServerConfig, StoreRequest,
    StoreService,
};
use crate::dimse::command::{self, Command, field, status};
use crate::dimse::sop;

/// After an A-ABORT: close our side and read (and drop) what the peer still
/// sends for a moment, up to 1 MiB, so that closing a socket with unread
/// bytes does not send a TCP reset, which can destroy the A-ABORT before
/// the peer reads it (PS3.8 9.1.6: the provider waits for the peer to close).
pub(super) async fn close_gracefully<T: AsyncRead + AsyncWrite + Unpin>(stream: &mut T) {
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

pub(super) struct Exchange<'a, S: StoreService, T> {
    pub(super) assoc: &'a mut AsyncServerAssociation<T>,
    pub(super) service: &'a S,
    pub(super) info: &'a AssociationInfo,
    pub(super) stats: &'a mut AssociationStats,
    pub(super) config: &'a ServerConfig,
}

impl<S: StoreService, T> Exchange<'_, S, T>
where
    T: AsyncRead + AsyncWrite + Unpin + Send,
{
    pub(super) async fn run(mut self, shutdown: CancellationToken) -> &'static str {
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
