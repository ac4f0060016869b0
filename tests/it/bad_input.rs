//! Bad input: every hand-made input of test-data/bad/ (listed with its
//! expected answer in corpus.json) is sent to the real node, which must give
//! that answer, leave no temporary file and no row behind (unless the input
//! is a valid instance after all), record the association, and keep serving
//! C-ECHO and C-STORE afterwards.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use dicom_ul::pdu::{
    AssociationRQ, PDataValue, PDataValueType, Pdu, PresentationContextProposed, UserVariableItem,
    write_pdu,
};
use her2map::dimse::command;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MR: &str = "1.2.840.10008.5.1.4.1.1.4";
const VERIFICATION: &str = "1.2.840.10008.1.1";
const IMPLICIT: &str = "1.2.840.10008.1.2";
const EXPLICIT: &str = "1.2.840.10008.1.2.1";
const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";

#[derive(Debug, Deserialize)]
struct Entry {
    file: String,
    kind: String,
    what: String,
    expect: Vec<String>,
    /// Close our sending side after the input (the peer goes away).
    #[serde(default)]
    eof: bool,
    /// Keep the connection open and silent after the input (the node's read
    /// timeout must end it).
    #[serde(default)]
    hold_open: bool,
    /// dimse-command: data set file sent after the command, and the context.
    dataset: Option<String>,
    pc: Option<u8>,
    /// dimse-store: what the C-STORE-RQ names, and the transfer syntax.
    sop_class: Option<String>,
    sop_instance: Option<String>,
    ts: Option<String>,
    /// A valid instance after all: one row more.
    #[serde(default)]
    stored: bool,
}

fn corpus_dir() -> PathBuf {
    test_data("bad")
}

fn load_corpus() -> Vec<Entry> {
    let text = std::fs::read_to_string(corpus_dir().join("corpus.json")).expect("corpus.json");
    serde_json::from_str(&text).expect("corpus.json parses")
}

fn pdu_bytes(pdu: &Pdu) -> Vec<u8> {
    let mut out = Vec::new();
    write_pdu(&mut out, pdu).expect("encode PDU");
    out
}

/// The A-ASSOCIATE-RQ of the DIMSE-level inputs: the same contexts as
/// make_corpus.py's standard_contexts().
fn association_rq() -> Vec<u8> {
    let pc = |id, abstract_syntax: &str, ts: &str| PresentationContextProposed {
        id,
        abstract_syntax: abstract_syntax.into(),
        transfer_syntaxes: vec![ts.into()],
    };
    pdu_bytes(&Pdu::AssociationRQ(AssociationRQ {
        protocol_version: 1,
        calling_ae_title: "BADSCU".into(),
        called_ae_title: "HER2MAP".into(),
        application_context_name: "1.2.840.10008.3.1.1.1".into(),
        presentation_contexts: vec![
            pc(1, MR, EXPLICIT),
            pc(3, MR, JPEG_BASELINE),
            pc(5, MR, IMPLICIT),
            pc(7, VERIFICATION, IMPLICIT),
        ],
        user_variables: vec![UserVariableItem::MaxLength(16384)],
    }))
}

/// P-DATA-TF PDUs carrying `data` in fragments of at most 16 KB.
fn pdata(pc: u8, value_type: PDataValueType, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let chunks: Vec<&[u8]> = if data.is_empty() {
        vec![data]
    } else {
        data.chunks(16_000).collect()
    };
    let n = chunks.len();
    for (i, chunk) in chunks.into_iter().enumerate() {
        out.extend(pdu_bytes(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc,
                value_type: value_type.clone(),
                is_last: i + 1 == n,
                data: chunk.to_vec(),
            }],
        }));
    }
    out
}

/// The whole byte stream of one input.
fn input_bytes(entry: &Entry) -> Vec<u8> {
    let file = std::fs::read(corpus_dir().join(&entry.file)).expect("corpus file");
    let release = pdu_bytes(&Pdu::ReleaseRQ);
    match entry.kind.as_str() {
        "raw" => file,
        "dimse-command" => {
            let pc = entry.pc.expect("pc");
            let mut out = association_rq();
            out.extend(pdata(pc, PDataValueType::Command, &file));
            if let Some(ds) = &entry.dataset {
                let ds = std::fs::read(corpus_dir().join(ds)).expect("data set file");
                out.extend(pdata(pc, PDataValueType::Data, &ds));
            }
            out.extend(release);
            out
        }
        "dimse-store" => {
            let pc = match entry.ts.as_deref() {
                Some(EXPLICIT) => 1,
                Some(JPEG_BASELINE) => 3,
                Some(IMPLICIT) => 5,
                other => panic!("{}: no context for transfer syntax {other:?}", entry.file),
            };
            let cmd = command::store_request(
                1,
                entry.sop_class.as_deref().expect("sop_class"),
                entry.sop_instance.as_deref().expect("sop_instance"),
            )
            .expect("C-STORE-RQ");
            let mut out = association_rq();
            out.extend(pdata(pc, PDataValueType::Command, &cmd));
            out.extend(pdata(pc, PDataValueType::Data, &file));
            out.extend(release);
            out
        }
        other => panic!("{}: unknown kind {other}", entry.file),
    }
}

/// Describe the PDUs the node sent, read straight from the wire (PS3.8
/// 9.3): "ac" / "ac(ID=REASON,...)", "rj(RESULT,SOURCE,REASON)",
/// "abort(SOURCE,REASON)", "rp", "status=0xNNNN", and "garbled ..." for
/// anything that does not parse.
fn describe(buf: &[u8]) -> (Vec<String>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() >= at + 6 {
        let ty = buf[at];
        let len = u32::from_be_bytes(buf[at + 2..at + 6].try_into().unwrap()) as usize;
        if buf.len() < at + 6 + len {
            break;
        }
        let body = &buf[at + 6..at + 6 + len];
        at += 6 + len;
        out.push(match ty {
            0x02 => describe_ac(body),
            0x03 if len >= 4 => format!("rj({},{},{})", body[1], body[2], body[3]),
            0x04 => describe_pdata(body),
            0x06 => "rp".to_string(),
            0x07 if len >= 4 => format!("abort({},{})", body[2], body[3]),
            _ => format!("garbled PDU type {ty:#04x} length {len}"),
        });
    }
    (out, at)
}

fn describe_ac(body: &[u8]) -> String {
    if body.len() < 68 {
        return "garbled AC".into();
    }
    let mut refused = Vec::new();
    let mut at = 68;
    while body.len() >= at + 4 {
        let ty = body[at];
        let len = u16::from_be_bytes([body[at + 2], body[at + 3]]) as usize;
        if ty == 0x21 && len >= 4 && body.len() >= at + 8 {
            let (id, reason) = (body[at + 4], body[at + 6]);
            if reason != 0 {
                refused.push(format!("{id}={reason}"));
            }
        }
        at += 4 + len;
    }
    if refused.is_empty() {
        "ac".into()
    } else {
        format!("ac({})", refused.join(","))
    }
}

fn describe_pdata(body: &[u8]) -> String {
    // The node answers with one whole command PDV.
    if body.len() < 6 {
        return "garbled P-DATA".into();
    }
    let len = u32::from_be_bytes(body[0..4].try_into().unwrap()) as usize;
    if len < 2 || body.len() < 4 + len || body[5] & 0x03 != 0x03 {
        return "garbled P-DATA".into();
    }
    match command::response_status(&body[6..4 + len]) {
        Ok((status, comment)) => {
            if let Some(c) = comment {
                eprintln!("  error comment: {c}");
            }
            format!("status={status:#06X}").replace("0X", "0x")
        }
        Err(e) => format!("garbled response: {e}"),
    }
}

/// Connect, write the input, read what the node answers until it closes the
/// connection (or 15 s pass: "no close").
async fn exchange(addr: &str, entry: &Entry, bytes: &[u8]) -> Vec<String> {
    let socket = TcpStream::connect(addr).await.expect("connect");
    socket.set_nodelay(true).unwrap();
    let (mut rd, mut wr) = socket.into_split();
    // Write while reading: the node may stop reading early (an abort).
    let bytes = bytes.to_vec();
    let eof = entry.eof;
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&bytes).await;
        if eof {
            let _ = wr.shutdown().await;
        }
        // Keep the write half (and so the connection) open until dropped.
        tokio::time::sleep(Duration::from_secs(20)).await;
        drop(wr);
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut end = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rd.read(&mut chunk)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => {
                end = Some(format!("read error: {e}"));
                break;
            }
            Err(_) => {
                end = Some("no close".into());
                break;
            }
        }
    }
    writer.abort();
    let (mut answers, used) = describe(&buf);
    if used < buf.len() {
        answers.push(format!("{} trailing bytes", buf.len() - used));
    }
    answers.extend(end);
    answers
}

/// Association outcomes recorded so far (one per connection).
async fn association_events(app: &TestApp) -> usize {
    let mut n = 0;
    for name in ["association_rejected", "association_closed"] {
        n += app.db.events(0, Some(name), 100_000).await.unwrap().len();
    }
    n
}

async fn settle<F, Fut>(mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn is_sanitised(relative: &str) -> bool {
    let parts: Vec<&str> = relative.split('/').collect();
    parts.len() == 3
        && parts.iter().enumerate().all(|(i, p)| {
            let p = if i == 2 {
                p.strip_suffix(".dcm").unwrap_or("")
            } else {
                p
            };
            !p.is_empty()
                && p.len() <= 64
                && p.bytes().all(|b| b.is_ascii_digit() || b == b'.')
                && !p.contains("..")
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn every_bad_input_gets_its_answer_and_the_node_keeps_serving() {
    let corpus = load_corpus();
    assert!(corpus.len() >= 40, "corpus holds {} inputs", corpus.len());
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(dir.path());
    // Inputs that stop mid-PDU wait for the read timeout.
    settings.dicom.read_timeout_secs = 2;
    let app = spawn_app_with(settings).await;
    let addr = app.address();

    // BAD_INPUT_ONLY=substring runs only the matching inputs (debugging).
    let only = std::env::var("BAD_INPUT_ONLY").unwrap_or_default();
    let mut failures = Vec::new();
    let mut run = 0;
    for entry in corpus.iter().filter(|e| e.file.contains(&only)) {
        run += 1;
        assert!(
            !(entry.hold_open && entry.eof),
            "{}: hold_open and eof",
            entry.file
        );
        let bytes = input_bytes(entry);
        let rows_before = app.db.instance_count().await.unwrap();
        let events_before = association_events(&app).await;
        let answers = exchange(&addr, entry, &bytes).await;
        eprintln!("{}: {answers:?}", entry.file);
        let name = format!("{} ({})", entry.file, entry.what);
        if answers != entry.expect {
            failures.push(format!(
                "{name}: answered {answers:?}, expected {:?}",
                entry.expect
            ));
        }
        // The node records the association's end (or its rejection) once.
        let recorded = settle(|| async { association_events(&app).await > events_before }).await;
        if !recorded {
            failures.push(format!("{name}: no association event recorded"));
        }
        if !settle(|| async { app.temp_files() == 0 }).await {
            let left: Vec<_> = std::fs::read_dir(app.spool().join("tmp"))
                .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
                .unwrap_or_default();
            failures.push(format!("{name}: temporary files left behind: {left:?}"));
        }
        let rows = app.db.instance_count().await.unwrap();
        let expected = rows_before + i64::from(entry.stored);
        if rows != expected {
            failures.push(format!(
                "{name}: {rows} rows, expected {expected} (stored: {})",
                entry.stored
            ));
        }
    }

    // Refused instances are counted by the modality their SOP Class names
    // (the data set of a refused one may never have been read).
    let mut text = String::new();
    her2map::metrics::METRICS.render(&mut text);
    let failed_mr = text
        .lines()
        .filter(|l| l.starts_with("her2map_instances_received_total{outcome=\"failed\""))
        .filter(|l| l.contains("modality=\"MR\""))
        .count();
    if failed_mr == 0 {
        failures.push(format!(
            "no failed MR instance counted by modality:\n{text}"
        ));
    }

    // Stored paths are sanitised UIDs inside the spool, whatever the UIDs held.
    for (uid, relative) in app.db.instance_paths().await.unwrap() {
        if !is_sanitised(&relative) {
            failures.push(format!("{uid:?} stored at unsanitised path {relative}"));
        }
        if !app.spool().join(&relative).is_file() {
            failures.push(format!("{uid:?}: file {relative} missing"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures in {run} inputs:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // After all of it, the node still serves C-ECHO and C-STORE.
    let scu = her2map::dimse::client::ClientOptions {
        calling_ae: "AFTERBAD".into(),
        called_ae: "HER2MAP".into(),
        ..Default::default()
    };
    let status = her2map::dimse::client::echo(&addr, &scu).await.unwrap();
    assert_eq!(status.code, 0);
    let rows_before = app.db.instance_count().await.unwrap();
    let mr = test_data("dicom/MR_small.dcm");
    let results = her2map::send::send_files(&addr, &scu, &[mr], |_| {})
        .await
        .unwrap();
    assert!(results[0].ok(), "{results:?}");
    assert_eq!(app.db.instance_count().await.unwrap(), rows_before + 1);
    assert_eq!(app.temp_files(), 0);
    app.stop().await;
}

/// The corpus and its README agree: every input has a row in the table.
#[test]
fn readme_lists_every_input() {
    let readme = std::fs::read_to_string(corpus_dir().join("README.md")).expect("README.md");
    let missing: Vec<String> = load_corpus()
        .into_iter()
        .filter(|e| !readme.contains(&format!("`{}`", e.file)))
        .map(|e| e.file)
        .collect();
    assert!(missing.is_empty(), "not in README.md: {missing:?}");
    for e in load_corpus() {
        assert!(
            Path::new(&corpus_dir().join(&e.file)).is_file(),
            "{} missing",
            e.file
        );
    }
}

/// Inputs the fuzzers flagged (test-data/bad/fuzz-artifacts/, named after
/// their target): each decodes, or fails to, quickly and without panicking.
#[test]
fn fuzz_artifacts_decode_without_panic() {
    let dir = corpus_dir().join("fuzz-artifacts");
    for entry in std::fs::read_dir(&dir).expect("fuzz-artifacts") {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let started = Instant::now();
        if name.starts_with("pdu_command") {
            let mut rest = &data[..];
            while let Ok(Some(pdu)) = dicom_ul::pdu::read_pdu(&mut rest, 65536, true) {
                if let Pdu::PData { data } = pdu {
                    for pdv in data {
                        let _ = command::Command::decode(&pdv.data);
                    }
                }
            }
            let _ = command::Command::decode(&data);
        } else if let Some((_, dataset)) = data.split_first() {
            let mut file = her2map::part10::encode_header(MR, "1.2.3.4", EXPLICIT, "FUZZ").unwrap();
            file.extend_from_slice(dataset);
            let _ = her2map::ingest::parse_header_bytes(&file);
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{name} took too long"
        );
    }
}
