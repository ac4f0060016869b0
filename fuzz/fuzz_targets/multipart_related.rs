//! DICOMweb bodies (STOW-RS in, WADO-RS answers): the first line of the
//! input is the Content-Type header, the rest the body, through
//! `her2map::dicomweb::multipart` as the STOW-RS route reads them (boundary
//! from the header, bounded parse, part types checked). Whatever parses is
//! rebuilt with a fresh boundary and must parse back to the same contents.
#![no_main]

use bytes::Bytes;
use her2map::dicomweb::multipart::{self, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let header = String::from_utf8_lossy(&data[..split]);
    let body = Bytes::copy_from_slice(data.get(split + 1..).unwrap_or(&[]));
    let limits = Limits {
        max_parts: 64,
        max_bytes: 1 << 20,
    };
    let boundary = multipart::boundary_of(&header).unwrap_or_else(|_| "B".to_string());
    let Ok(parts) = multipart::parse(&body, &boundary, &limits) else {
        return;
    };
    let _ = multipart::require_type(&parts, "application/dicom");
    for p in &parts {
        let _ = p.content_type();
    }
    let fresh = multipart::new_boundary();
    let rebuilt: Vec<(&str, &[u8])> = parts.iter().map(|p| ("a/b", &p.body[..])).collect();
    let again = multipart::build(&rebuilt, &fresh);
    let back = multipart::parse(&Bytes::from(again), &fresh, &Limits::default())
        .expect("a built body parses");
    assert_eq!(back.len(), parts.len());
    for (a, b) in back.iter().zip(&parts) {
        assert_eq!(a.body, b.body);
    }
});
