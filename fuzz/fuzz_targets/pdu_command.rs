//! The SCP's receive path: bytes off the wire through dicom-ul's PDU reader
//! (strict, the node's default maximum PDU length, as the server reads), and
//! every command PDV through the node's command-set decoder.
#![no_main]

use dicom_ul::pdu::{PDataValueType, Pdu, read_pdu};
use her2map::dimse::command::Command;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while !rest.is_empty() {
        let before = rest.len();
        match read_pdu(&mut rest, 65536, true) {
            Ok(Some(Pdu::PData { data })) => {
                for pdv in data {
                    if pdv.value_type == PDataValueType::Command {
                        let _ = Command::decode(&pdv.data);
                    }
                }
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
        if rest.len() == before {
            break;
        }
    }
    // The command decoder on the raw bytes too (a whole command set).
    let _ = Command::decode(data);
});
