//! Ingest's header parse, on a file laid out as the spool writes it: the
//! node's own preamble and file meta group, then the received data set. The
//! first input byte picks the negotiated transfer syntax.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

const SYNTAXES: [&str; 4] = [
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
];

fn headers() -> &'static Vec<Vec<u8>> {
    static HEADERS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    HEADERS.get_or_init(|| {
        SYNTAXES
            .iter()
            .map(|ts| {
                her2map::part10::encode_header("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4", ts, "FUZZ")
                    .expect("header")
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, dataset)) = data.split_first() else {
        return;
    };
    let mut file = headers()[usize::from(selector) % SYNTAXES.len()].clone();
    file.extend_from_slice(dataset);
    let _ = her2map::ingest::parse_header_bytes(&file);
});
