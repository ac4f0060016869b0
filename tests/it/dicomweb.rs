//! DICOMweb in and out, with real peers: Orthanc with Debian's
//! `orthanc-dicomweb` plugin as the STOW-RS destination of the node's
//! results and as a STOW-RS client of the node, a plain HTTP client
//! (reqwest, bodies written by hand) and the node's own DICOMweb client.
//! STOW-RS in must store through ingest (durable, indexed, deduplicated),
//! answer with the standard response, refuse what it must with the right
//! failure entries and keep nothing partial; STOW-RS out must dead-letter
//! 4xx answers with their reason and retry a destination that is down.
//!
//! Needs Orthanc, its DICOMweb plugin and curl: without them the tests fail.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::orthanc::*;
use common::*;
use dicom_dictionary_std::tags;
use her2map::config::{DicomWebEndpoint, HttpRole, HttpUser};
use her2map::db::{CaseState, Db, DeliveryState, OutputRow};
use her2map::dicomweb::{DicomWebClient, json_string};
use her2map::dimse::client::ClientOptions;
use her2map::outbox::{DestinationSettings, Outbox, OutboxSettings};
use her2map::part10::Part10Header;
use her2map::report::OutputKind;
use her2map::send::{collect_files, send_files};
use reqwest::StatusCode;
use serde_json::Value;

fn study(name: &str) -> Vec<PathBuf> {
    collect_files(&[test_data(&format!("synth-patient/{name}"))])
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect()
}

fn attr(path: &Path, tag: dicom_core::Tag) -> String {
    let obj = dicom_object::open_file(path).unwrap();
    obj.element(tag)
        .ok()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        .unwrap_or_default()
}

async fn wait_until<F, Fut>(what: &str, secs: u64, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn web_destination(url: String, token_file: Option<PathBuf>) -> DestinationSettings {
    DestinationSettings {
        ae_title: String::new(),
        host: String::new(),
        port: 0,
        dicomweb: Some(DicomWebEndpoint {
            url,
            bearer_token_file: token_file,
            timeout_secs: 30,
            ..Default::default()
        }),
        outputs: None,
        tls: None,
    }
}

/// Users of a test node: (stow token, viewer token, operator token).
struct Tokens {
    stow: String,
    viewer: String,
    operator: String,
}

fn with_users(s: &mut her2map::config::Settings) -> Tokens {
    let mut user = |name: &str, role| {
        let (token, digest) = her2map::http::auth::new_token();
        s.http.users.push(HttpUser {
            name: name.into(),
            role,
            token_sha256: digest,
        });
        token
    };
    Tokens {
        stow: user("pacs", HttpRole::Stow),
        viewer: user("vera", HttpRole::Viewer),
        operator: user("olga", HttpRole::Operator),
    }
}

fn scu() -> ClientOptions {
    ClientOptions {
        calling_ae: "MODALITY".into(),
        called_ae: "HER2MAP".into(),
        ..Default::default()
    }
}

/// The synthetic patient C-STOREd to the node: its results reach Orthanc's
/// DICOMweb server by STOW-RS and are found there, by Orthanc's REST API
/// and by the node's own client (QIDO-RS, WADO-RS).
#[tokio::test(flavor = "multi_thread")]
async fn results_are_delivered_to_orthanc_by_stow_rs() {
    let dir = tempfile::tempdir().unwrap();
    let (plugins, dicomweb) = dicomweb_plugin();
    let orthanc = tokio::task::block_in_place(|| {
        Orthanc::start_with(
            dir.path(),
            free_port(),
            free_port(),
            serde_json::json!({ "Plugins": plugins, "DicomWeb": dicomweb }),
        )
    });
    let mut settings = test_settings(&dir.path().join("node"));
    settings.cases.stable_age_secs = 2;
    settings.destinations = vec![web_destination(orthanc.url("/dicom-web/"), None)];
    let node = spawn_app_with(settings).await;
    for piece in ["MG", "US", "MR"] {
        let results = send_files(&node.address(), &scu(), &study(piece), |_| {})
            .await
            .unwrap();
        assert!(results.iter().all(|r| r.ok()), "{piece}: {results:?}");
    }
    wait_until("the results to be delivered by STOW-RS", 150, || async {
        let cases = node.db.all_cases().await.unwrap();
        assert!(
            cases.iter().all(|c| c.state != CaseState::Failed),
            "{cases:?}"
        );
        let rows = node.db.outbox().await.unwrap();
        assert!(
            rows.iter().all(|r| r.state != DeliveryState::Dead),
            "{rows:?}"
        );
        cases.iter().any(|c| c.state == CaseState::Done)
            && !rows.is_empty()
            && rows.iter().all(|r| r.state == DeliveryState::Sent)
    })
    .await;
    let rows = node.db.outbox().await.unwrap();
    assert!(
        rows.iter().all(|r| r.last_status.starts_with("STOW-RS 200")
            && r.destination == orthanc.url("/dicom-web")),
        "{rows:?}"
    );
    let case_id = node.db.all_cases().await.unwrap()[0].id.clone();
    let outputs = node.db.case_outputs(&case_id).await.unwrap();
    assert!(outputs.iter().any(|o| o.kind == OutputKind::Sr));
    for o in &outputs {
        assert!(
            tokio::task::block_in_place(|| orthanc.lookup_instance(&o.sop_instance_uid)).is_some(),
            "{:?} {} not in Orthanc",
            o.kind,
            o.sop_instance_uid
        );
    }

    // The node's DICOMweb client against Orthanc: QIDO-RS at study and
    // series level, WADO-RS of the SR series (what query/retrieve uses).
    let client = DicomWebClient::new(&DicomWebEndpoint {
        url: orthanc.url("/dicom-web"),
        timeout_secs: 30,
        ..Default::default()
    })
    .unwrap();
    let mg = &study("MG")[0];
    let patient_id = attr(mg, tags::PATIENT_ID);
    let studies = client
        .search("studies", &[("PatientID", patient_id.as_str())])
        .await
        .unwrap();
    let sr = outputs.iter().find(|o| o.kind == OutputKind::Sr).unwrap();
    assert!(
        studies
            .iter()
            .any(|s| json_string(s, "0020000D").as_deref() == Some(sr.study_instance_uid.as_str())),
        "{studies:?}"
    );
    let series = client
        .search(&format!("studies/{}/series", sr.study_instance_uid), &[])
        .await
        .unwrap();
    assert!(
        series.iter().any(|s| json_string(s, "0020000E").as_deref()
            == Some(sr.series_instance_uid.as_str())
            && json_string(s, "00080060").as_deref() == Some("SR")),
        "{series:?}"
    );
    let none = client
        .search("studies", &[("PatientID", "NO-SUCH-PATIENT")])
        .await
        .unwrap();
    assert!(none.is_empty(), "{none:?}");
    let files = client
        .retrieve_series(&sr.study_instance_uid, &sr.series_instance_uid)
        .await
        .unwrap();
    let uids: Vec<String> = files
        .iter()
        .map(|f| Part10Header::from_bytes(f).unwrap().sop_instance_uid)
        .collect();
    assert!(uids.contains(&sr.sop_instance_uid), "{uids:?}");
    let missing = client
        .retrieve_series(&sr.study_instance_uid, "1.2.3.4.5.6.7")
        .await
        .unwrap_err();
    assert!(
        missing.is_permanent() && missing.status() == Some(404),
        "{missing}"
    );
    node.stop().await;
}

/// Queue `files` (Part 10, under `data_dir`) as outputs for `destinations`.
async fn queue(db: &Db, data_dir: &Path, files: &[PathBuf], destinations: &[String]) {
    for (i, path) in files.iter().enumerate() {
        let h = Part10Header::read(path).unwrap_or(Part10Header {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.7".into(),
            sop_instance_uid: format!("2.25.99{i}{}", std::process::id()),
            transfer_syntax: String::new(),
            dataset_offset: 0,
            dataset_len: 0,
        });
        let row = OutputRow {
            sop_instance_uid: h.sop_instance_uid,
            case_id: "case-1".into(),
            revision: 0,
            kind: OutputKind::HeatmapSc,
            sop_class_uid: h.sop_class_uid,
            study_instance_uid: "1.2.3".into(),
            series_instance_uid: "1.2.3.4".into(),
            path: path
                .strip_prefix(data_dir)
                .unwrap()
                .to_string_lossy()
                .into_owned(),
        };
        assert!(
            db.add_output(&row, destinations, time::OffsetDateTime::now_utc())
                .await
                .unwrap()
        );
    }
}

/// A wrong URL path (Orthanc: 404) dead-letters at once with its reason;
/// a destination that is down is retried and gets everything once it is
/// up (another node's STOW-RS, with a bearer token from a file); an answer
/// of 409 (every instance refused) dead-letters with the failure reasons.
#[tokio::test(flavor = "multi_thread")]
async fn stow_rs_destinations_dead_letter_4xx_and_retry_when_down() {
    let dir = tempfile::tempdir().unwrap();
    let (plugins, dicomweb) = dicomweb_plugin();
    let orthanc = tokio::task::block_in_place(|| {
        Orthanc::start_with(
            dir.path(),
            free_port(),
            free_port(),
            serde_json::json!({ "Plugins": plugins, "DicomWeb": dicomweb }),
        )
    });
    let data = dir.path().join("sender");
    let out_dir = data.join("outputs");
    std::fs::create_dir_all(&out_dir).unwrap();
    let good = mr_variants(&out_dir, 3, "stowout");
    let garbage = out_dir.join("garbage.dcm");
    std::fs::write(&garbage, b"this is not a DICOM file at all").unwrap();

    let port = free_port();
    let mut receiver_settings = test_settings(&dir.path().join("receiver"));
    receiver_settings.http.port = port;
    let tokens = with_users(&mut receiver_settings);
    let token_file = dir.path().join("receiver.token");
    std::fs::write(&token_file, format!("{}\n", tokens.stow)).unwrap();

    let wrong = web_destination(orthanc.url("/no-such-root/"), None);
    let down = web_destination(
        format!("http://127.0.0.1:{port}/dicom-web"),
        Some(token_file.clone()),
    );
    // The same node by another name: only the garbage goes there.
    let refusing = web_destination(
        format!("http://localhost:{port}/dicom-web"),
        Some(token_file),
    );
    let db = Db::connect(&test_database_url(&data, "her2map.db"))
        .await
        .unwrap();
    queue(&db, &data, &good, &[wrong.name(), down.name()]).await;
    queue(
        &db,
        &data,
        std::slice::from_ref(&garbage),
        &[refusing.name()],
    )
    .await;
    let outbox = Outbox::new(
        db.clone(),
        data.clone(),
        vec![wrong.clone(), down.clone(), refusing.clone()],
        OutboxSettings {
            retry_base_ms: 50,
            retry_max_ms: 500,
            max_attempts: 50,
            timeout_secs: 10,
        },
        "HER2MAP".into(),
    )
    .unwrap();

    // A token file that is not there stops the node at start, named.
    let broken = web_destination(
        "http://127.0.0.1:1/dicom-web".into(),
        Some(dir.path().join("no-such-token")),
    );
    let err = Outbox::new(
        db.clone(),
        data.clone(),
        vec![broken],
        OutboxSettings {
            retry_base_ms: 50,
            retry_max_ms: 500,
            max_attempts: 50,
            timeout_secs: 10,
        },
        "HER2MAP".into(),
    )
    .err()
    .expect("a missing token file is refused")
    .to_string();
    assert!(
        err.contains("destinations.dicomweb") && err.contains("no-such-token"),
        "{err}"
    );

    assert_eq!(outbox.deliver_due().await.unwrap(), 7);
    let rows = db.outbox().await.unwrap();
    for r in rows.iter().filter(|r| r.destination == wrong.name()) {
        assert_eq!(r.state, DeliveryState::Dead, "{r:?}");
        assert!(r.last_status.contains("HTTP 404"), "{r:?}");
    }
    for r in rows.iter().filter(|r| r.destination != wrong.name()) {
        assert_eq!(r.state, DeliveryState::Pending, "{r:?}");
        assert_eq!(r.attempts, 1, "{r:?}");
        assert!(r.last_status.contains("could not connect"), "{r:?}");
    }

    // The destination comes up: a node with STOW-RS on that port.
    let receiver = spawn_app_with(receiver_settings).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(600)).await;
        outbox.deliver_due().await.unwrap();
        let rows = db.outbox().await.unwrap();
        if rows.iter().all(|r| r.state != DeliveryState::Pending) {
            break;
        }
        assert!(Instant::now() < deadline, "still pending: {rows:?}");
    }
    let rows = db.outbox().await.unwrap();
    for r in rows.iter().filter(|r| r.destination == down.name()) {
        assert_eq!(r.state, DeliveryState::Sent, "{r:?}");
        assert!(r.attempts >= 2, "{r:?}");
    }
    let refused: Vec<_> = rows
        .iter()
        .filter(|r| r.destination == refusing.name())
        .collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].state, DeliveryState::Dead, "{:?}", refused[0]);
    assert!(
        refused[0].last_status.contains("HTTP 409")
            && refused[0].last_status.contains("failure reason 0xC000"),
        "{:?}",
        refused[0]
    );
    assert_eq!(receiver.db.instance_count().await.unwrap(), 3);
    receiver.stop().await;
}

/// Orthanc's DICOMweb client (`/dicom-web/servers/{name}/stow`, the node
/// configured in `DicomWeb.Servers` with a bearer token) posts the whole
/// patient to the node: every instance is stored, a second post stores
/// nothing twice, and the patient makes a case that runs.
#[tokio::test(flavor = "multi_thread")]
async fn orthanc_stows_the_patient_to_the_node_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir.path().join("node"));
    settings.cases.stable_age_secs = 2;
    let tokens = with_users(&mut settings);
    let node = spawn_app_with(settings).await;
    let http = node.http_addr.expect("HTTP enabled");
    let (plugins, mut dicomweb) = dicomweb_plugin();
    dicomweb["Servers"] = serde_json::json!({
        "her2map": {
            "Url": format!("http://127.0.0.1:{}/dicom-web/", http.port()),
            "HttpHeaders": { "Authorization": format!("Bearer {}", tokens.stow) }
        }
    });
    let orthanc = tokio::task::block_in_place(|| {
        Orthanc::start_with(
            dir.path(),
            free_port(),
            free_port(),
            serde_json::json!({ "Plugins": plugins, "DicomWeb": dicomweb }),
        )
    });
    let to_orthanc = ClientOptions {
        calling_ae: "MODALITY".into(),
        called_ae: ORTHANC_AET.into(),
        ..Default::default()
    };
    let mut sent = 0;
    for piece in ["MG", "US", "MR"] {
        let files = study(piece);
        let results = send_files(
            &format!("127.0.0.1:{}", orthanc.dicom),
            &to_orthanc,
            &files,
            |_| {},
        )
        .await
        .unwrap();
        assert!(results.iter().all(|r| r.ok()), "{piece}: {results:?}");
        sent += files.len();
    }
    let studies: Vec<String> = serde_json::from_slice::<Value>(&orthanc.get("/studies"))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(studies.len(), 3);
    let body = serde_json::json!({ "Resources": studies }).to_string();
    let stow = || {
        tokio::task::block_in_place(|| {
            orthanc.request("/dicom-web/servers/her2map/stow", Some(&body))
        })
    };
    stow().unwrap_or_else(|e| panic!("Orthanc's STOW-RS to the node: {e}\n{}", orthanc.log_text()));
    assert_eq!(node.db.instance_count().await.unwrap() as usize, sent);
    // (Counted at once: the answer came after every instance was indexed.)

    // Posted again: nothing is stored twice.
    stow().unwrap_or_else(|e| panic!("second STOW-RS: {e}"));
    assert_eq!(node.db.instance_count().await.unwrap() as usize, sent);
    let duplicates = wait_events(&node.db, "instance_duplicate", sent).await;
    assert_eq!(duplicates.len(), sent);
    let dcm_files = walk_dcm(&node.spool());
    assert_eq!(dcm_files, sent, "one file per instance in the spool");

    wait_until("the STOW-RS patient's case to run", 150, || async {
        let cases = node.db.all_cases().await.unwrap();
        assert!(
            cases.iter().all(|c| c.state != CaseState::Failed),
            "{cases:?}"
        );
        cases.len() == 1 && cases[0].state == CaseState::Done
    })
    .await;
    node.stop().await;
}

fn walk_dcm(dir: &Path) -> usize {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file() && e.path().extension().is_some_and(|x| x == "dcm"))
        .count()
}

/// A multipart/related body written by hand (not by the node's builder).
fn body(boundary: &str, parts: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = b"preamble to ignore\r\n".to_vec();
    for (ct, bytes) in parts {
        out.extend_from_slice(format!("--{boundary}\r\nContent-Type: {ct}\r\n\r\n").as_bytes());
        out.extend_from_slice(bytes);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

const CT: &str = "multipart/related; type=\"application/dicom\"; boundary=\"b0und:ary\"";
const B: &str = "b0und:ary";

/// `(status, content type, JSON body)` of a POST.
async fn post(
    url: &str,
    token: Option<&str>,
    ct: &str,
    body: Vec<u8>,
) -> (StatusCode, String, Value) {
    let mut req = reqwest::Client::new()
        .post(url)
        .header("content-type", ct)
        .header("accept", "application/dicom+json")
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let json = r.json().await.unwrap_or(Value::Null);
    (status, ct, json)
}

fn failures(v: &Value) -> Vec<(Option<String>, Option<String>)> {
    v["00081198"]["Value"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| (json_string(i, "00081155"), json_string(i, "00081197")))
                .collect()
        })
        .unwrap_or_default()
}

fn stored(v: &Value) -> Vec<String> {
    v["00081199"]["Value"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| json_string(i, "00081155"))
                .collect()
        })
        .unwrap_or_default()
}

/// A plain HTTP client: who may post, the media types, malformed bodies,
/// parts that are not DICOM, instances without SOP UIDs or of another
/// study: the right codes and failure entries, and nothing partial kept;
/// good instances stored once however often they are posted. Then the
/// node's own DICOMweb client against the node.
#[tokio::test(flavor = "multi_thread")]
async fn stow_rs_in_refuses_what_it_must_and_keeps_nothing_partial() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir.path().join("node"));
    let tokens = with_users(&mut settings);
    // STOW-RS has its own body limit, above the API's 64 KiB.
    assert_eq!(settings.http.max_body_bytes, 65536);
    settings.http.stow_max_body_bytes = 150_000;
    // One request at a time: the others wait for their turn.
    settings.http.stow_concurrency = 1;
    let node = spawn_app_with(settings).await;
    let base = format!("http://{}", node.http_addr.unwrap());
    let url = format!("{base}/dicom-web/studies");
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let mr = mr_variants(&files, 3, "stowin");
    let bytes: Vec<Vec<u8>> = mr.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let uid = |p: &Path| attr(p, tags::SOP_INSTANCE_UID);
    let study_uid = attr(&mr[0], tags::STUDY_INSTANCE_UID);

    // Who may post.
    let one = body(B, &[("application/dicom", &bytes[0])]);
    let (code, _, _) = post(&url, None, CT, one.clone()).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let (code, _, _) = post(&url, Some("not-a-token"), CT, one.clone()).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let (code, _, v) = post(&url, Some(&tokens.viewer), CT, one.clone()).await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{v}");
    // A STOW-RS account reads nothing.
    let r = reqwest::Client::new()
        .get(format!("{base}/api/v1/status"))
        .bearer_auth(&tokens.stow)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // Media types and malformed bodies: nothing stored.
    let (code, _, _) = post(
        &url,
        Some(&tokens.stow),
        "application/dicom",
        bytes[0].clone(),
    )
    .await;
    assert_eq!(code, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let xml = "multipart/related; type=\"application/dicom+xml\"; boundary=x";
    let (code, _, _) = post(&url, Some(&tokens.stow), xml, one.clone()).await;
    assert_eq!(code, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (code, _, _) = post(
        &url,
        Some(&tokens.stow),
        "multipart/related; type=\"application/dicom\"",
        one.clone(),
    )
    .await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "no boundary");
    let mut truncated = body(
        B,
        &[
            ("application/dicom", &bytes[0]),
            ("application/dicom", &bytes[1]),
        ],
    );
    truncated.truncate(truncated.len() - 40);
    let (code, _, v) = post(&url, Some(&tokens.stow), CT, truncated).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["message"].as_str().unwrap().contains("truncated"), "{v}");
    let (code, _, _) = post(&url, Some(&tokens.stow), CT, b"no parts here".to_vec()).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_eq!(node.db.instance_count().await.unwrap(), 0);

    // Every part refused: 409, one failure entry each, nothing kept.
    let mut no_uids = dicom_object::open_file(&mr[2]).unwrap();
    no_uids.remove_element(tags::SOP_INSTANCE_UID);
    no_uids.remove_element(tags::SOP_CLASS_UID);
    let mut no_uids_bytes = Vec::new();
    no_uids.write_all(&mut no_uids_bytes).unwrap();
    let mut not_storage = dicom_object::open_file(&mr[2]).unwrap();
    not_storage.put(dicom_core::DataElement::new(
        tags::SOP_CLASS_UID,
        dicom_core::VR::UI,
        dicom_core::PrimitiveValue::from("1.2.3.4.5"),
    ));
    not_storage.update_meta(|m| m.media_storage_sop_class_uid = "1.2.3.4.5".into());
    let mut not_storage_bytes = Vec::new();
    not_storage.write_all(&mut not_storage_bytes).unwrap();
    // A meta element claiming 4 GB: refused, not allocated.
    let mut hostile = vec![0u8; 128];
    hostile.extend_from_slice(b"DICM\x02\x00\x00\x00UL\x04\x00\xc8\x00\x00\x00");
    hostile.extend_from_slice(b"\x02\x00\x01\x00OB\x00\x00\xf0\xff\xff\xff");
    hostile.extend_from_slice(&[0u8; 64]);
    let all_bad = body(
        B,
        &[
            ("application/dicom", b"DICM? no: plain text"),
            ("application/dicom", &no_uids_bytes),
            ("text/plain", b"hello"),
            ("application/dicom", &not_storage_bytes),
            ("application/dicom", &hostile),
        ],
    );
    let (code, ct, v) = post(&url, Some(&tokens.stow), CT, all_bad).await;
    assert_eq!(code, StatusCode::CONFLICT, "{v}");
    assert!(ct.starts_with("application/dicom+json"), "{ct}");
    let f = failures(&v);
    assert_eq!(f.len(), 5, "{v}");
    assert_eq!(f[4], (None, Some("49152".to_string())), "{v}");
    assert!(
        f[..3]
            .iter()
            .all(|(_, reason)| reason.as_deref() == Some("49152")),
        "0xC000: {v}"
    );
    // Not a storage SOP class: 0x0122, named.
    assert_eq!(f[3], (Some(uid(&mr[2])), Some("290".to_string())), "{v}");
    assert!(stored(&v).is_empty());
    // Another study than the URL's: 0xA900.
    let other = format!("{url}/1.2.3.4.5.999");
    let (code, _, v) = post(&other, Some(&tokens.stow), CT, one.clone()).await;
    assert_eq!(code, StatusCode::CONFLICT, "{v}");
    assert_eq!(
        failures(&v),
        vec![(Some(uid(&mr[0])), Some("43264".to_string()))]
    );
    assert_eq!(node.db.instance_count().await.unwrap(), 0);
    assert_eq!(walk_dcm(&node.spool()), 0, "nothing partial in the spool");
    assert_eq!(node.temp_files(), 0, "no temporary file left");
    let failed = wait_events(&node.db, "instance_failed", 6).await;
    assert_eq!(failed.len(), 6, "every refusal audited once: {failed:?}");

    // Some good, some bad: 202; the good one stored and answered with its
    // Retrieve URL.
    let mixed = body(
        B,
        &[
            ("application/dicom", &bytes[0]),
            ("application/dicom", b"junk"),
        ],
    );
    let (code, _, v) = post(&format!("{url}/{study_uid}"), Some(&tokens.stow), CT, mixed).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{v}");
    assert_eq!(stored(&v), vec![uid(&mr[0])]);
    assert_eq!(failures(&v).len(), 1);
    let item = &v["00081199"]["Value"][0];
    let retrieve = json_string(item, "00081190").unwrap();
    assert!(
        retrieve.ends_with(&format!(
            "/dicom-web/studies/{study_uid}/series/{}/instances/{}",
            attr(&mr[0], tags::SERIES_INSTANCE_UID),
            uid(&mr[0])
        )),
        "{retrieve}"
    );
    assert!(
        json_string(&v, "00081190")
            .unwrap()
            .ends_with(&format!("/studies/{study_uid}"))
    );
    assert_eq!(node.db.instance_count().await.unwrap(), 1);

    // All good, posted twice (an operator may post too): 200 both times,
    // each instance stored once.
    let all = body(
        B,
        &[
            ("application/dicom", &bytes[0]),
            ("application/dicom", &bytes[1]),
            ("application/dicom", &bytes[2]),
        ],
    );
    for token in [&tokens.stow, &tokens.operator] {
        let (code, _, v) = post(&url, Some(token), CT, all.clone()).await;
        assert_eq!(code, StatusCode::OK, "{v}");
        assert_eq!(stored(&v).len(), 3);
        assert!(failures(&v).is_empty());
    }
    assert_eq!(node.db.instance_count().await.unwrap(), 3);
    assert_eq!(walk_dcm(&node.spool()), 3);
    let dups = wait_events(&node.db, "instance_duplicate", 4).await;
    assert_eq!(dups.len(), 4, "{dups:?}");
    // Stored as received: the data set bytes are the client's.
    let path = node.db.instance_path(&uid(&mr[1])).await.unwrap().unwrap();
    assert_eq!(
        dataset_bytes(&node.spool().join(&path)),
        dataset_bytes(&mr[1])
    );

    // Each request is an association of the user, with its counts.
    let assocs: Value = reqwest::Client::new()
        .get(format!("{base}/api/v1/associations?limit=100"))
        .bearer_auth(&tokens.viewer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let stow: Vec<&Value> = assocs["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["called_ae"] == "STOW-RS")
        .collect();
    assert!(
        stow.iter()
            .any(|a| a["calling_ae"] == "pacs" && a["stored"] == 3),
        "{assocs}"
    );
    assert!(
        stow.iter()
            .any(|a| a["calling_ae"] == "olga" && a["failed"] == 0),
        "{assocs}"
    );
    // A client that takes only XML answers.
    let r = reqwest::Client::new()
        .post(&url)
        .bearer_auth(&tokens.stow)
        .header("content-type", CT)
        .header("accept", "application/dicom+xml")
        .body(one.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_ACCEPTABLE);

    // The node's own client, with its token from a file.
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &tokens.stow).unwrap();
    let client = DicomWebClient::new(&DicomWebEndpoint {
        url: format!("{base}/dicom-web/"),
        bearer_token_file: Some(token_file),
        timeout_secs: 30,
        ..Default::default()
    })
    .unwrap();
    let fresh = mr_variants(&files, 1, "client");
    let r = client
        .store(None, vec![std::fs::read(&fresh[0]).unwrap()])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.stored[0].sop_instance_uid, uid(&fresh[0]));
    let e = client
        .store(
            Some("1.2.3.4.5.999"),
            vec![std::fs::read(&fresh[0]).unwrap()],
        )
        .await
        .unwrap_err();
    assert!(e.is_permanent() && e.status() == Some(409), "{e}");
    assert!(e.to_string().contains("failure reason 0xA900"), "{e}");
    assert_eq!(node.db.instance_count().await.unwrap(), 4);

    // Above [http] max_body_bytes but within stow_max_body_bytes: stored;
    // above that: 413, nothing stored.
    let many = mr_variants(&files, 20, "many");
    let many: Vec<Vec<u8>> = many.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let parts = |n: usize| -> Vec<(&str, &[u8])> {
        many[..n]
            .iter()
            .map(|b| ("application/dicom", b.as_slice()))
            .collect()
    };
    let ten = body(B, &parts(10));
    assert!(ten.len() > 65536 && ten.len() < 150_000, "{}", ten.len());
    let (code, _, v) = post(&url, Some(&tokens.stow), CT, ten).await;
    assert_eq!(code, StatusCode::OK, "{v}");
    assert_eq!(node.db.instance_count().await.unwrap(), 14);
    let twenty = body(B, &parts(20));
    assert!(twenty.len() > 150_000);
    let (code, _, _) = post(&url, Some(&tokens.stow), CT, twenty).await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(node.db.instance_count().await.unwrap(), 14);
    // Three at once with stow_concurrency = 1: each waits its turn.
    let (a, b, c) = tokio::join!(
        post(&url, Some(&tokens.stow), CT, body(B, &parts(12)[10..11])),
        post(&url, Some(&tokens.stow), CT, body(B, &parts(12)[11..12])),
        post(
            &url,
            Some(&tokens.operator),
            CT,
            body(B, &parts(12)[10..12])
        ),
    );
    assert_eq!(
        (a.0, b.0, c.0),
        (StatusCode::OK, StatusCode::OK, StatusCode::OK)
    );
    assert_eq!(node.db.instance_count().await.unwrap(), 16);
    // What STOW-RS stored makes a case like what C-STORE stores.
    let first = uid(&mr[0]);
    wait_until("a case holding the STOW-RS instances", 60, || async {
        for c in node.db.all_cases().await.unwrap() {
            let members = node.db.case_members(&c.id).await.unwrap();
            if members.iter().any(|m| m.sop_instance_uid == first) {
                return true;
            }
        }
        false
    })
    .await;
    node.stop().await;
}

/// The node's DICOMweb client over HTTPS (rustls, ring) with the hospital
/// CA of `ca_certificate`, against the node's own STOW-RS under
/// `[http.tls]`: stored with the CA; refused, before anything is sent,
/// without it or with another CA; an unreadable CA file is a settings
/// error.
#[tokio::test(flavor = "multi_thread")]
async fn the_client_verifies_https_with_the_configured_ca() {
    let pki = common::pki::make_pki();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir.path().join("node"));
    let tokens = with_users(&mut settings);
    settings.http.tls.enabled = true;
    settings.http.tls.certificate = pki.server_cert.clone();
    settings.http.tls.private_key = pki.server_key.clone();
    let node = spawn_app_with(settings).await;
    let port = node.http_addr.unwrap().port();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &tokens.stow).unwrap();
    let endpoint = |ca: Option<PathBuf>| DicomWebEndpoint {
        url: format!("https://127.0.0.1:{port}/dicom-web"),
        bearer_token_file: Some(token_file.clone()),
        ca_certificate: ca,
        timeout_secs: 20,
        ..Default::default()
    };
    let files = mr_variants(dir.path(), 1, "https");
    let bytes = std::fs::read(&files[0]).unwrap();

    let client = DicomWebClient::new(&endpoint(Some(pki.ca.clone()))).unwrap();
    let r = client.store(None, vec![bytes.clone()]).await.unwrap();
    assert_eq!(r.status, 200);
    let url = r.stored[0].retrieve_url.clone().unwrap();
    assert!(
        url.starts_with(&format!("https://127.0.0.1:{port}/dicom-web/studies/")),
        "{url}"
    );

    for ca in [None, Some(pki.rogue_cert.clone())] {
        let client = DicomWebClient::new(&endpoint(ca)).unwrap();
        let e = client.store(None, vec![bytes.clone()]).await.unwrap_err();
        assert!(
            matches!(e, her2map::dicomweb::DicomWebError::Transport { .. }),
            "{e}"
        );
        assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    }
    let e = DicomWebClient::new(&endpoint(Some(dir.path().join("no-such-ca.pem")))).unwrap_err();
    assert!(
        e.is_permanent() && e.to_string().contains("ca_certificate"),
        "{e}"
    );
    assert_eq!(node.db.instance_count().await.unwrap(), 1);
    node.stop().await;
}
