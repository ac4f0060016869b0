//! DIMSE command sets (PS3.7 Section 9 and Annex E): encoding, decoding and
//! the status codes the node answers with.

use dicom_core::{DataElement, PrimitiveValue, Tag, VR, dicom_value};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;

/// Command Field values (PS3.7 E.1-1).
pub mod field {
    pub const C_STORE_RQ: u16 = 0x0001;
    pub const C_STORE_RSP: u16 = 0x8001;
    pub const C_ECHO_RQ: u16 = 0x0030;
    pub const C_ECHO_RSP: u16 = 0x8030;
    pub const C_GET_RQ: u16 = 0x0010;
    pub const C_GET_RSP: u16 = 0x8010;
    pub const C_FIND_RQ: u16 = 0x0020;
    pub const C_FIND_RSP: u16 = 0x8020;
    pub const C_MOVE_RQ: u16 = 0x0021;
    pub const C_MOVE_RSP: u16 = 0x8021;
    pub const C_CANCEL_RQ: u16 = 0x0FFF;
}

/// Command Data Set Type value meaning "no data set" (PS3.7 E.1-1).
pub const NO_DATA_SET: u16 = 0x0101;

/// DIMSE status codes used by the node (PS3.7 Annex C, PS3.4 B.2.3).
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    /// Refused: out of resources (PS3.4 B.2.3): disk or database trouble.
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Error: data set does not match SOP class (PS3.4 B.2.3); used as well
    /// when the data set's SOP Class/Instance UID differ from the command's.
    pub const DATA_SET_DOES_NOT_MATCH: u16 = 0xA900;
    /// Error: cannot understand (PS3.4 B.2.3): the data set does not parse.
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    /// SOP class not supported (PS3.7 C.5.9) on a negotiated context.
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    /// Unrecognized operation (PS3.7 C.5.10).
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
    /// Mistyped argument (PS3.7 C.5.13): a required command element is absent.
    pub const MISTYPED_ARGUMENT: u16 = 0x0212;
    /// Pending (PS3.4 C.4.1.1.4, C.4.2.1.5): a match or a sub-operation
    /// report follows; the operation goes on.
    pub const PENDING: u16 = 0xFF00;
    /// Pending, some Optional Keys not supported (PS3.4 C.4.1.1.4).
    pub const PENDING_WARNING: u16 = 0xFF01;
    /// Cancelled by a C-CANCEL (PS3.4 C.4.1.1.4).
    pub const CANCEL: u16 = 0xFE00;
    /// Sub-operations complete, one or more failures or warnings
    /// (PS3.4 C.4.2.1.5, C.4.3.1.5).
    pub const SUB_OPERATIONS_WARNING: u16 = 0xB000;
}

/// Whether a status is Pending (PS3.7 C.1: FF00, FF01).
pub fn is_pending(status: u16) -> bool {
    status == status::PENDING || status == status::PENDING_WARNING
}

/// A decoded command set: the elements the node reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Command {
    pub command_field: u16,
    pub message_id: u16,
    pub affected_sop_class_uid: String,
    pub affected_sop_instance_uid: String,
    pub has_data_set: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("command set does not parse: {0}")]
    Parse(String),
    #[error("command set lacks required element {0}")]
    Missing(&'static str),
    #[error("command set could not be encoded: {0}")]
    Encode(String),
}

/// Trim the padding a UID may carry on the wire (PS3.5 9.1: NUL; some peers
/// pad with spaces).
pub fn trim_uid(uid: &str) -> &str {
    uid.trim_end_matches(['\0', ' '])
}

impl Command {
    /// Decode a command set (always Implicit VR Little Endian, PS3.7 6.3.1).
    pub fn decode(bytes: &[u8]) -> Result<Self, CommandError> {
        let elements = CommandElements::read(bytes)?;
        let uint = |tag: Tag, name| elements.us(tag).ok_or(CommandError::Missing(name));
        let command_field = uint(tags::COMMAND_FIELD, "CommandField (0000,0100)")?;
        let message_id = uint(tags::MESSAGE_ID, "MessageID (0000,0110)")?;
        let data_set_type = uint(
            tags::COMMAND_DATA_SET_TYPE,
            "CommandDataSetType (0000,0800)",
        )?;
        let uid = |tag| {
            elements
                .text(tag)
                .map(|s| trim_uid(&s).to_string())
                .unwrap_or_default()
        };
        Ok(Command {
            command_field,
            message_id,
            affected_sop_class_uid: uid(tags::AFFECTED_SOP_CLASS_UID),
            affected_sop_instance_uid: uid(tags::AFFECTED_SOP_INSTANCE_UID),
            has_data_set: data_set_type != NO_DATA_SET,
        })
    }
}

/// The elements of a command set, walked in place (PS3.7 6.3.1: Implicit VR
/// Little Endian, group 0000 only, defined lengths). Each element must be in
/// group 0000 and end inside the buffer; group 0000 holds no sequence, so no
/// nesting can recurse. The node reads a handful of US and string values, so
/// it builds no data set object: dicom-object's reader ends a data set on an
/// end-of-input error whose backtrace it captures, a stack unwind per command.
struct CommandElements<'a>(Vec<(u16, &'a [u8])>);

impl<'a> CommandElements<'a> {
    fn read(bytes: &'a [u8]) -> Result<Self, CommandError> {
        let mut elements = Vec::with_capacity(8);
        let mut at = 0usize;
        while at < bytes.len() {
            let Some(header) = bytes.get(at..at + 8) else {
                return Err(CommandError::Parse(format!(
                    "truncated element header at byte {at}"
                )));
            };
            let group = u16::from_le_bytes([header[0], header[1]]);
            let element = u16::from_le_bytes([header[2], header[3]]);
            let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
            if group != 0x0000 {
                return Err(CommandError::Parse(format!(
                    "element ({group:04X},{element:04X}) outside group 0000"
                )));
            }
            if len == u32::MAX {
                return Err(CommandError::Parse(format!(
                    "element (0000,{element:04X}) of undefined length"
                )));
            }
            match (at + 8).checked_add(len as usize) {
                Some(end) if end <= bytes.len() => {
                    elements.push((element, &bytes[at + 8..end]));
                    at = end;
                }
                _ => {
                    return Err(CommandError::Parse(format!(
                        "element (0000,{element:04X}) of {len} bytes runs past the end"
                    )));
                }
            }
        }
        Ok(CommandElements(elements))
    }

    /// The value of an element (the last one, should a peer repeat it).
    fn value(&self, tag: Tag) -> Option<&'a [u8]> {
        self.0
            .iter()
            .rev()
            .find(|(e, _)| tag.group() == 0 && *e == tag.element())
            .map(|(_, v)| *v)
    }

    /// A US value (its first, should it hold several).
    fn us(&self, tag: Tag) -> Option<u16> {
        match self.value(tag)? {
            [lo, hi, ..] => Some(u16::from_le_bytes([*lo, *hi])),
            _ => None,
        }
    }

    /// A string value (UI, AE, LO): the default repertoire, trailing padding
    /// removed.
    fn text(&self, tag: Tag) -> Option<String> {
        let v = self.value(tag)?;
        let s = String::from_utf8_lossy(v);
        Some(s.trim_end_matches(['\0', ' ']).to_string())
    }
}

fn encode(obj: &InMemDicomObject) -> Result<Vec<u8>, CommandError> {
    let mut out = Vec::with_capacity(256);
    obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .map_err(|e| CommandError::Encode(e.to_string()))?;
    Ok(out)
}

/// A response command (C-STORE-RSP, C-ECHO-RSP, ...) for a request.
pub fn response(
    request: &Command,
    response_field: u16,
    status: u16,
    error_comment: Option<&str>,
) -> Result<Vec<u8>, CommandError> {
    let mut elements = vec![
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(request.affected_sop_class_uid.as_str()),
        ),
        DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            dicom_value!(U16, [response_field]),
        ),
        DataElement::new(
            tags::MESSAGE_ID_BEING_RESPONDED_TO,
            VR::US,
            dicom_value!(U16, [request.message_id]),
        ),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            dicom_value!(U16, [NO_DATA_SET]),
        ),
        DataElement::new(tags::STATUS, VR::US, dicom_value!(U16, [status])),
    ];
    if !request.affected_sop_instance_uid.is_empty() {
        elements.push(DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(request.affected_sop_instance_uid.as_str()),
        ));
    }
    if let Some(comment) = error_comment {
        // PS3.7 C.4: Error Comment is LO, at most 64 characters.
        let comment: String = comment
            .chars()
            .filter(|c| c.is_ascii() && *c != '\\')
            .take(64)
            .collect();
        elements.push(DataElement::new(
            tags::ERROR_COMMENT,
            VR::LO,
            PrimitiveValue::from(comment),
        ));
    }
    encode(&InMemDicomObject::command_from_element_iter(elements))
}

/// A C-ECHO-RQ command set.
pub fn echo_request(message_id: u16) -> Result<Vec<u8>, CommandError> {
    encode(&InMemDicomObject::command_from_element_iter([
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(super::sop::VERIFICATION),
        ),
        DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            dicom_value!(U16, [field::C_ECHO_RQ]),
        ),
        DataElement::new(tags::MESSAGE_ID, VR::US, dicom_value!(U16, [message_id])),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            dicom_value!(U16, [NO_DATA_SET]),
        ),
    ]))
}

/// A C-STORE-RQ command set (PS3.7 9.3.1.1), medium priority.
pub fn store_request(
    message_id: u16,
    sop_class_uid: &str,
    sop_instance_uid: &str,
) -> Result<Vec<u8>, CommandError> {
    encode(&InMemDicomObject::command_from_element_iter([
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(sop_class_uid),
        ),
        DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            dicom_value!(U16, [field::C_STORE_RQ]),
        ),
        DataElement::new(tags::MESSAGE_ID, VR::US, dicom_value!(U16, [message_id])),
        DataElement::new(tags::PRIORITY, VR::US, dicom_value!(U16, [0x0000])),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            dicom_value!(U16, [0x0000]),
        ),
        DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(sop_instance_uid),
        ),
    ]))
}

/// A response command set of a C-FIND, C-MOVE or C-GET (PS3.7 9.3.2.2,
/// 9.3.4.2, 9.3.3.2) or of a C-STORE/C-ECHO: the elements the SCU reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    pub command_field: u16,
    pub message_id_being_responded_to: u16,
    pub status: u16,
    pub error_comment: Option<String>,
    pub has_data_set: bool,
    /// Number of Remaining / Completed / Failed / Warning Sub-operations
    /// (0000,1020-1023): C-MOVE and C-GET only, each optional.
    pub remaining: Option<u16>,
    pub completed: Option<u16>,
    pub failed: Option<u16>,
    pub warning: Option<u16>,
}

impl Response {
    pub fn decode(bytes: &[u8]) -> Result<Self, CommandError> {
        let elements = CommandElements::read(bytes)?;
        let command_field = elements
            .us(tags::COMMAND_FIELD)
            .ok_or(CommandError::Missing("CommandField (0000,0100)"))?;
        let status = elements
            .us(tags::STATUS)
            .ok_or(CommandError::Missing("Status (0000,0900)"))?;
        Ok(Response {
            command_field,
            message_id_being_responded_to: elements
                .us(tags::MESSAGE_ID_BEING_RESPONDED_TO)
                .unwrap_or_default(),
            status,
            error_comment: elements
                .text(tags::ERROR_COMMENT)
                .map(|s| s.trim().to_string()),
            has_data_set: elements
                .us(tags::COMMAND_DATA_SET_TYPE)
                .is_some_and(|t| t != NO_DATA_SET),
            remaining: elements.us(tags::NUMBER_OF_REMAINING_SUBOPERATIONS),
            completed: elements.us(tags::NUMBER_OF_COMPLETED_SUBOPERATIONS),
            failed: elements.us(tags::NUMBER_OF_FAILED_SUBOPERATIONS),
            warning: elements.us(tags::NUMBER_OF_WARNING_SUBOPERATIONS),
        })
    }
}

/// The field of a command set without decoding the rest (requests and
/// responses share it), to tell an incoming C-STORE-RQ from a response.
pub fn command_field(bytes: &[u8]) -> Result<u16, CommandError> {
    CommandElements::read(bytes)?
        .us(tags::COMMAND_FIELD)
        .ok_or(CommandError::Missing("CommandField (0000,0100)"))
}

/// A C-FIND-RQ, C-MOVE-RQ or C-GET-RQ command set (PS3.7 9.3.2.1, 9.3.4.1,
/// 9.3.3.1), medium priority, with an Identifier following. `move_destination`
/// is the C-MOVE's Move Destination AE title (required there, absent
/// otherwise).
pub fn query_request(
    command_field: u16,
    message_id: u16,
    sop_class_uid: &str,
    move_destination: Option<&str>,
) -> Result<Vec<u8>, CommandError> {
    let mut elements = vec![
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(sop_class_uid),
        ),
        DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            dicom_value!(U16, [command_field]),
        ),
        DataElement::new(tags::MESSAGE_ID, VR::US, dicom_value!(U16, [message_id])),
        DataElement::new(tags::PRIORITY, VR::US, dicom_value!(U16, [0x0000])),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            dicom_value!(U16, [0x0000]),
        ),
    ];
    if let Some(ae) = move_destination {
        elements.push(DataElement::new(
            tags::MOVE_DESTINATION,
            VR::AE,
            PrimitiveValue::from(ae.trim()),
        ));
    }
    encode(&InMemDicomObject::command_from_element_iter(elements))
}

/// A C-CANCEL-RQ for the operation with `message_id` (PS3.7 9.3.2.3).
pub fn cancel_request(message_id: u16) -> Result<Vec<u8>, CommandError> {
    encode(&InMemDicomObject::command_from_element_iter([
        DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            dicom_value!(U16, [field::C_CANCEL_RQ]),
        ),
        DataElement::new(
            tags::MESSAGE_ID_BEING_RESPONDED_TO,
            VR::US,
            dicom_value!(U16, [message_id]),
        ),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            dicom_value!(U16, [NO_DATA_SET]),
        ),
    ]))
}

/// Read the status (and error comment) of a response command set.
pub fn response_status(bytes: &[u8]) -> Result<(u16, Option<String>), CommandError> {
    let elements = CommandElements::read(bytes)?;
    let status = elements
        .us(tags::STATUS)
        .ok_or(CommandError::Missing("Status (0000,0900)"))?;
    let comment = elements
        .text(tags::ERROR_COMMENT)
        .map(|s| s.trim().to_string());
    Ok((status, comment))
}

/// Whether a status is a warning (PS3.7 C.1: 0001, Bxxx) or success: both
/// mean the peer keeps the instance.
pub fn is_success_or_warning(status: u16) -> bool {
    status == status::SUCCESS || status == 0x0001 || (status & 0xF000) == 0xB000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_request_round_trips() {
        let bytes = store_request(7, "1.2.3", "4.5.6").unwrap();
        let cmd = Command::decode(&bytes).unwrap();
        assert_eq!(cmd.command_field, field::C_STORE_RQ);
        assert_eq!(cmd.message_id, 7);
        assert_eq!(cmd.affected_sop_class_uid, "1.2.3");
        assert_eq!(cmd.affected_sop_instance_uid, "4.5.6");
        assert!(cmd.has_data_set);
        let rsp = response(
            &cmd,
            field::C_STORE_RSP,
            status::OUT_OF_RESOURCES,
            Some("disk full"),
        )
        .unwrap();
        assert_eq!(
            response_status(&rsp).unwrap(),
            (status::OUT_OF_RESOURCES, Some("disk full".to_string()))
        );
    }

    #[test]
    fn query_requests_and_responses_round_trip() {
        let rq = query_request(
            field::C_MOVE_RQ,
            9,
            "1.2.840.10008.5.1.4.1.2.2.2",
            Some("NODE"),
        )
        .unwrap();
        let cmd = Command::decode(&rq).unwrap();
        assert_eq!(cmd.command_field, field::C_MOVE_RQ);
        assert!(cmd.has_data_set);
        assert_eq!(command_field(&rq).unwrap(), field::C_MOVE_RQ);
        let rsp = response(&cmd, field::C_MOVE_RSP, status::PENDING, None).unwrap();
        let r = Response::decode(&rsp).unwrap();
        assert_eq!(r.message_id_being_responded_to, 9);
        assert!(is_pending(r.status));
        assert!(!r.has_data_set);
        assert_eq!(r.completed, None);
        let cancel = cancel_request(9).unwrap();
        assert_eq!(command_field(&cancel).unwrap(), field::C_CANCEL_RQ);
    }

    #[test]
    fn missing_elements_are_named() {
        let obj = InMemDicomObject::command_from_element_iter([DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            dicom_value!(U16, [field::C_ECHO_RQ]),
        )]);
        let err = Command::decode(&encode(&obj).unwrap()).unwrap_err();
        assert!(err.to_string().contains("MessageID"), "{err}");
    }

    #[test]
    fn nested_or_foreign_or_overlong_elements_are_refused_before_parsing() {
        let echo = echo_request(1).unwrap();
        // Thousands of nested items of undefined length in an unknown element.
        let mut nested = echo.clone();
        for _ in 0..5000 {
            nested.extend_from_slice(&[0, 0, 0, 0x50, 0xFF, 0xFF, 0xFF, 0xFF]);
            nested.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        }
        let err = Command::decode(&nested).unwrap_err();
        assert!(err.to_string().contains("undefined length"), "{err}");
        let mut foreign = echo.clone();
        foreign.extend_from_slice(&[0x08, 0, 0x15, 0x11, 0, 0, 0, 0]);
        let err = Command::decode(&foreign).unwrap_err();
        assert!(err.to_string().contains("outside group 0000"), "{err}");
        let mut overlong = echo.clone();
        overlong.extend_from_slice(&[0, 0, 0, 0x40, 0xF0, 0xFF, 0xFF, 0xFF, b'x', b'x']);
        let err = Command::decode(&overlong).unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
        assert!(Command::decode(&echo[..echo.len() - 3]).is_err());
        assert_eq!(
            Command::decode(&echo).unwrap().command_field,
            field::C_ECHO_RQ
        );
    }
}
