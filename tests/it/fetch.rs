//! Query/retrieve of what a case lacks (issue 17), with real PACSs: the
//! synthetic patient's MG, US and MR studies are in the PACS, only the MG
//! study is sent to the node, and the node fetches the US and MR series it
//! needs — by C-MOVE and C-GET from Orthanc, by C-MOVE from DCMTK's
//! dcmqrscp, by QIDO-RS/WADO-RS from Orthanc's DICOMweb plugin — so that the result uses all three modalities. Sources that
//! are down, that answer with another patient's studies (a Patient ID
//! with a wildcard character, which a PACS applies), or whose C-MOVE
//! fails or is partial, never stop the case: the audit events say what
//! happened.
//!
//! Needs Orthanc, DCMTK (dcmqrscp, storescu) and curl; a missing tool is a
//! failure, never a skip.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::orthanc::*;
use common::*;
use her2map::config::{DicomWebEndpoint, RetrieveMethod, Settings, SourceSettings};
use her2map::db::{AuditEvent, CaseState, Db};
use her2map::dimse::client::ClientOptions;
use her2map::send::{collect_files, send_files};
use serde_json::Value;

fn study(name: &str) -> Vec<PathBuf> {
    collect_files(&[test_data(&format!("synth-patient/{name}"))])
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect()
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

fn node_settings(dir: &Path, sources: Vec<SourceSettings>, max_wait: u64) -> Settings {
    let mut s = test_settings(&dir.join("node"));
    s.cases.stable_age_secs = 2;
    s.cases.max_wait_secs = max_wait;
    s.sources = sources;
    s.fetch.timeout_secs = 10;
    s.fetch.source_timeout_secs = 60;
    s
}

fn source(name: &str, ae: &str, port: u16, retrieve: RetrieveMethod) -> SourceSettings {
    SourceSettings {
        name: name.into(),
        ae_title: ae.into(),
        host: "127.0.0.1".into(),
        port,
        retrieve,
        tls: None,
        dicomweb: None,
        timeout_secs: 0,
        max_retrieves: 0,
    }
}

/// Orthanc's DICOMweb server (QIDO-RS, WADO-RS) as a source.
fn web_source(name: &str, http: u16) -> SourceSettings {
    SourceSettings {
        ae_title: String::new(),
        host: String::new(),
        port: 0,
        dicomweb: Some(DicomWebEndpoint {
            url: format!("http://127.0.0.1:{http}/dicom-web"),
            bearer_token_file: None,
            bearer_token_env: None,
            basic_user: None,
            basic_password_file: None,
            basic_password_env: None,
            ca_certificate: None,
            timeout_secs: 30,
        }),
        ..source(name, "", 0, RetrieveMethod::Move)
    }
}

/// How the node reaches Orthanc in [`orthanc_fetch`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    Move,
    Get,
    Wado,
}

/// Orthanc knowing the node (C-FIND, C-MOVE and C-GET are refused to an AE
/// not in `DicomModalities`).
fn orthanc(dir: &Path, http: u16, dicom: u16, node_port: u16) -> Orthanc {
    orthanc_with(dir, http, dicom, node_port, false)
}

fn orthanc_with(dir: &Path, http: u16, dicom: u16, node_port: u16, web: bool) -> Orthanc {
    let mut extra = serde_json::json!({
        "DicomModalities": { "her2map": [NODE_AET, "127.0.0.1", node_port] },
    });
    if web {
        let (plugins, dicomweb) = dicomweb_plugin();
        extra["Plugins"] = plugins;
        extra["DicomWeb"] = dicomweb;
    }
    tokio::task::block_in_place(|| Orthanc::start_with(dir, http, dicom, extra))
}

async fn store(addr: &str, called: &str, files: &[PathBuf]) {
    let options = ClientOptions {
        calling_ae: "MODALITY".into(),
        called_ae: called.into(),
        ..Default::default()
    };
    let results = send_files(addr, &options, files, |_| {}).await.unwrap();
    assert!(results.iter().all(|r| r.ok()), "storing: {results:?}");
}

async fn events(db: &Db, name: &str) -> Vec<AuditEvent> {
    db.events(0, Some(name), 10_000).await.unwrap()
}

fn detail(e: &AuditEvent) -> &Value {
    e.detail.as_ref().expect("event detail")
}

/// The details of the events of one source.
fn of_source<'a>(events: &'a [AuditEvent], name: &str) -> Vec<&'a Value> {
    events
        .iter()
        .map(detail)
        .filter(|d| d["source"] == name)
        .collect()
}

/// The one case's result: its modalities used (every side).
async fn wait_result(db: &Db, secs: u64) -> Vec<String> {
    wait_until("the case's result", secs, || async {
        let cases = db.all_cases().await.unwrap();
        assert!(
            cases.iter().all(|c| c.state != CaseState::Failed),
            "case failed: {cases:?}"
        );
        cases.iter().any(|c| c.state == CaseState::Done)
    })
    .await;
    let results = db.events(0, Some("case_result"), 10).await.unwrap();
    assert_eq!(results.len(), 1, "one result: {results:?}");
    let mut used: Vec<String> = detail(&results[0])["sides"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["modalities_used"].as_array().unwrap().clone())
        .map(|m| m.as_str().unwrap().to_string())
        .collect();
    used.sort();
    used.dedup();
    used
}

/// The node, with Orthanc (and a source that is down) as sources, fetches
/// what the MG-only case lacks by `via`.
async fn orthanc_fetch(via: Via) {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    orthanc_binary();
    let (http, dicom) = (free_port(), free_port());
    let down = free_port();
    let pacs_source = match via {
        Via::Move => source("orthanc", ORTHANC_AET, dicom, RetrieveMethod::Move),
        Via::Get => source("orthanc", ORTHANC_AET, dicom, RetrieveMethod::Get),
        Via::Wado => web_source("orthanc", http),
    };
    let down_source = match via {
        Via::Wado => web_source("down", down),
        _ => source("down", "NOBODY", down, RetrieveMethod::Move),
    };
    let settings = node_settings(dir.path(), vec![down_source, pacs_source], 300);
    let node = spawn_app_with(settings).await;
    let pacs = orthanc_with(dir.path(), http, dicom, node.port(), via == Via::Wado);
    let pacs_addr = format!("127.0.0.1:{dicom}");
    let (mg, us, mr) = (study("MG"), study("US"), study("MR"));
    for files in [&mg, &us, &mr] {
        store(&pacs_addr, ORTHANC_AET, files).await;
    }
    // Only the mammograms reach the node.
    store(&node.address(), NODE_AET, &mg).await;

    let used = wait_result(&node.db, 240).await;
    assert_eq!(
        used,
        ["MG", "MR", "US"],
        "the result uses all three modalities"
    );
    let all = mg.len() + us.len() + mr.len();
    assert_eq!(
        node.db.instance_count().await.unwrap() as usize,
        all,
        "the node holds the patient's instances, each once"
    );

    let attempts = events(&node.db, "fetch_attempt").await;
    let of = |name: &str| of_source(&attempts, name);
    let ok = of("orthanc");
    assert_eq!(ok.len(), 1, "{attempts:?}");
    assert_eq!(ok[0]["status"], "ok", "{:?}", ok[0]);
    assert_eq!(ok[0]["trigger"], "on_open");
    assert_eq!(
        ok[0]["instances_received"].as_u64().unwrap() as usize,
        us.len() + mr.len()
    );
    // 1 US series + 6 DCE series.
    assert_eq!(ok[0]["series_requested"], 7, "{:?}", ok[0]);
    let down = of("down");
    assert_eq!(down.len(), 1, "{attempts:?}");
    assert_eq!(down[0]["status"], "failed", "{:?}", down[0]);

    let retrieves = events(&node.db, "fetch_retrieve").await;
    assert_eq!(retrieves.len(), 7, "{retrieves:?}");
    let (want_method, ok_status) = match via {
        Via::Move => ("C-MOVE", "0x0000"),
        Via::Get => ("C-GET", "0x0000"),
        Via::Wado => ("WADO-RS", "200"),
    };
    for r in &retrieves {
        let d = detail(r);
        assert_eq!(d["method"], want_method, "{d}");
        assert_eq!(d["status"], ok_status, "{d}");
        assert!(d["instances_received"].as_u64().unwrap() > 0, "{d}");
        assert_ne!(d["modality"], "MG", "MG was not missing: {d}");
    }
    let queries = events(&node.db, "fetch_query").await;
    let study_query = queries
        .iter()
        .map(detail)
        .find(|d| d["source"] == "orthanc" && d["level"] == "STUDY")
        .expect("a study-level query");
    // The MR and US studies (the MG study is not asked for: not missing).
    assert_eq!(study_query["accepted"], 2, "{study_query}");
    // The cases view named the source while it fetched.
    let cases = node.db.all_cases().await.unwrap();
    let transitions = node.db.case_transitions(&cases[0].id).await.unwrap();
    assert!(
        transitions.iter().any(
            |(_, _, _, reason)| reason.contains("fetching from down, orthanc")
                || reason.contains("fetch from the sources queued")
        ),
        "{transitions:?}"
    );
    let fetched = node.db.fetch_attempts(&cases[0].id).await.unwrap();
    let took = fetched
        .iter()
        .find(|a| a.source == "orthanc")
        .map(|a| {
            let t = |s: &str| her2map::db::parse_time(s).unwrap();
            (t(&a.finished_at) - t(&a.started_at)).as_seconds_f64()
        })
        .unwrap();
    node.stop().await;
    drop(pacs);
    println!(
        "fetch by {want_method} from Orthanc: {} instances fetched in {took:.2} s \
         (queries included); whole test {:.1} s",
        us.len() + mr.len(),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn orthanc_c_move_completes_the_case() {
    orthanc_fetch(Via::Move).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn orthanc_c_get_completes_the_case() {
    orthanc_fetch(Via::Get).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn orthanc_wado_rs_completes_the_case() {
    orthanc_fetch(Via::Wado).await;
}

/// dcmqrscp on free ports, with the node as its only move destination;
/// killed when dropped.
struct Dcmqrscp {
    child: Child,
    port: u16,
    storage: PathBuf,
}

impl Dcmqrscp {
    fn start(dir: &Path, node_port: u16) -> Dcmqrscp {
        let port = free_port();
        let storage = dir.join("dcmqrscp-db");
        std::fs::create_dir_all(&storage).unwrap();
        let config = dir.join("dcmqrscp.cfg");
        std::fs::write(
            &config,
            format!(
                "NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n\n\
                 HostTable BEGIN\nnode = ({NODE_AET}, 127.0.0.1, {node_port})\nHostTable END\n\n\
                 VendorTable BEGIN\nVendorTable END\n\n\
                 AETable BEGIN\nDCMQRSCP {} RW (500, 1024mb) ANY\nAETable END\n",
                storage.display()
            ),
        )
        .unwrap();
        let child = Command::new("dcmqrscp")
            .arg("-c")
            .arg(&config)
            .env("TCP_NODELAY", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dcmqrscp must be installed (apt-get install dcmtk)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "dcmqrscp did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Dcmqrscp {
            child,
            port,
            storage,
        }
    }
}

impl Drop for Dcmqrscp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// DCMTK's storescp on `port`, storing into `dir`; killed when dropped.
struct StoreScp(Child);

impl StoreScp {
    fn start(dir: &Path, port: u16) -> StoreScp {
        std::fs::create_dir_all(dir).unwrap();
        let child = Command::new("storescp")
            .args(["-aet", "STORESCP", "-od"])
            .arg(dir)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("storescp must be installed (apt-get install dcmtk)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "storescp did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        StoreScp(child)
    }
}

impl Drop for StoreScp {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// DCMTK's dcmqrscp as a second vendor's PACS, C-FIND/C-MOVE, with some MR
/// files gone from its storage: those series come back partial (failed
/// sub-operations, warning status); the case still completes with all
/// three modalities, and the events say what failed. A second source is a
/// storage-only peer that refuses query/retrieve at negotiation.
#[tokio::test(flavor = "multi_thread")]
async fn dcmqrscp_c_move_completes_the_case_despite_failed_sub_operations() {
    let dir = tempfile::tempdir().unwrap();
    // The node's port is needed in dcmqrscp's configuration and dcmqrscp's
    // in the node's: bind the node first on a port chosen here.
    let node_port = free_port();
    let qr = tokio::task::block_in_place(|| Dcmqrscp::start(dir.path(), node_port));
    // A peer that is no PACS: DCMTK's storescp refuses the Q/R contexts.
    let store_port = free_port();
    let storescp = StoreScp::start(&dir.path().join("storescp"), store_port);
    let mut settings = node_settings(
        dir.path(),
        vec![
            source("dcmqrscp", "DCMQRSCP", qr.port, RetrieveMethod::Move),
            source("storescp", "STORESCP", store_port, RetrieveMethod::Get),
        ],
        300,
    );
    settings.dicom.port = node_port;
    let node = spawn_app_with(settings).await;
    let qr_addr = format!("127.0.0.1:{}", qr.port);
    let (mg, us, mr) = (study("MG"), study("US"), study("MR"));
    store(&qr_addr, "DCMQRSCP", &us).await;
    store(&qr_addr, "DCMQRSCP", &mr).await;
    // Lose every tenth MR file from the PACS's storage.
    let mut stored: Vec<PathBuf> = std::fs::read_dir(&qr.storage)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("MR"))
        })
        .collect();
    stored.sort();
    assert_eq!(stored.len(), mr.len(), "dcmqrscp holds the MR files");
    let lost: Vec<&PathBuf> = stored.iter().step_by(10).collect();
    for p in &lost {
        std::fs::remove_file(p).unwrap();
    }
    store(&node.address(), NODE_AET, &mg).await;

    let used = wait_result(&node.db, 240).await;
    assert_eq!(used, ["MG", "MR", "US"]);
    assert_eq!(
        node.db.instance_count().await.unwrap() as usize,
        mg.len() + us.len() + mr.len() - lost.len()
    );
    let attempts = events(&node.db, "fetch_attempt").await;
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    let of = |name: &str| {
        attempts
            .iter()
            .map(detail)
            .find(|d| d["source"] == name)
            .unwrap_or_else(|| panic!("no attempt of {name}: {attempts:?}"))
    };
    let refused = of("storescp");
    assert_eq!(refused["status"], "failed", "{refused}");
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains("no presentation context"),
        "{refused}"
    );
    let a = of("dcmqrscp");
    assert_eq!(a["status"], "partial", "{a}");
    assert_eq!(
        a["instances_received"].as_u64().unwrap() as usize,
        us.len() + mr.len() - lost.len(),
        "{a}"
    );
    drop(storescp);
    let retrieves = events(&node.db, "fetch_retrieve").await;
    let failed: u64 = retrieves
        .iter()
        .map(|r| detail(r)["failed"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(failed as usize, lost.len(), "{retrieves:?}");
    assert!(
        retrieves
            .iter()
            .any(|r| detail(r)["result"] == "partial" && detail(r)["status"] == "0xB000"),
        "{retrieves:?}"
    );
    node.stop().await;
}

/// The case's patient has a Patient ID with a wildcard character in it;
/// Orthanc applies it (PS3.4 C.2.2.2.4) and answers with another patient's
/// US and MR studies. The node refuses those matches, retrieves nothing,
/// and the case runs with its mammograms at its max wait. A second source
/// refuses the C-MOVE (a destination it does not know): the case goes on.
#[tokio::test(flavor = "multi_thread")]
async fn another_patients_matches_and_a_refused_move_do_not_reach_the_case() {
    let dir = tempfile::tempdir().unwrap();
    orthanc_binary();
    let (http, dicom) = (free_port(), free_port());
    let (http2, dicom2) = (free_port(), free_port());
    let mut settings = node_settings(
        dir.path(),
        vec![
            source("orthanc", ORTHANC_AET, dicom, RetrieveMethod::Move),
            source("orthanc-b", ORTHANC_AET, dicom2, RetrieveMethod::Move),
        ],
        12,
    );
    // Orthanc B knows the node for queries, but C-MOVE names a destination
    // neither Orthanc knows.
    settings.fetch.move_destination = "NOWHERE".into();
    let node = spawn_app_with(settings).await;
    for d in ["a", "b"] {
        std::fs::create_dir_all(dir.path().join(d)).unwrap();
    }
    let pacs = orthanc(&dir.path().join("a"), http, dicom, node.port());
    let pacs_b = orthanc(&dir.path().join("b"), http2, dicom2, node.port());
    let mg = as_patient(&study("MG"), &dir.path().join("mg"), "RISK?01", "1");
    let other_us = as_patient(&study("US"), &dir.path().join("us"), "RISKX01", "2");
    let other_mr = as_patient(&study("MR"), &dir.path().join("mr"), "RISKX01", "3");
    store(&format!("127.0.0.1:{dicom}"), ORTHANC_AET, &other_us).await;
    store(&format!("127.0.0.1:{dicom}"), ORTHANC_AET, &other_mr).await;
    let own_us = as_patient(&study("US"), &dir.path().join("own-us"), "RISK?01", "4");
    store(&format!("127.0.0.1:{dicom2}"), ORTHANC_AET, &own_us).await;
    store(&node.address(), NODE_AET, &mg).await;

    let used = wait_result(&node.db, 120).await;
    assert_eq!(used, ["MG"], "only the case's own modality");
    assert_eq!(
        node.db.instance_count().await.unwrap() as usize,
        mg.len(),
        "nothing of another patient reached the node"
    );
    let queries = events(&node.db, "fetch_query").await;
    let a = queries
        .iter()
        .map(detail)
        .find(|d| d["source"] == "orthanc" && d["level"] == "STUDY")
        .expect("a study query to orthanc");
    assert_eq!(a["matches"], 2, "Orthanc matched the wildcard: {a}");
    assert_eq!(a["accepted"], 0, "{a}");
    let rejected = a["rejected"].as_array().unwrap();
    assert!(
        rejected.iter().all(|r| r == "another Patient ID"),
        "{rejected:?}"
    );
    let retrieves = events(&node.db, "fetch_retrieve").await;
    assert!(
        retrieves.iter().all(|r| detail(r)["source"] == "orthanc-b"),
        "nothing retrieved from orthanc: {retrieves:?}"
    );
    let b: Vec<&Value> = retrieves.iter().map(detail).collect();
    assert!(!b.is_empty(), "orthanc-b was asked to move its US study");
    for d in &b {
        assert_eq!(d["result"], "failed", "{d}");
        assert_eq!(d["instances_received"], 0, "{d}");
    }
    let attempts = events(&node.db, "fetch_attempt").await;
    let statuses: Vec<(String, String)> = attempts
        .iter()
        .map(detail)
        .map(|d| {
            (
                d["source"].as_str().unwrap().to_string(),
                d["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        statuses.contains(&("orthanc".into(), "nothing".into())),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&("orthanc-b".into(), "partial".into()))
            || statuses.contains(&("orthanc-b".into(), "failed".into())),
        "{statuses:?}"
    );
    // Half-way to the max wait the sources were due again, but the patient
    // was asked about too recently (`min_query_interval_secs`).
    let before_run: Vec<&Value> = attempts
        .iter()
        .map(detail)
        .filter(|d| d["trigger"] == "before_run")
        .collect();
    assert_eq!(before_run.len(), 2, "{attempts:?}");
    assert!(
        before_run.iter().all(|d| d["status"] == "skipped"),
        "{before_run:?}"
    );
    node.stop().await;
    drop((pacs, pacs_b));
}

/// `max_matches` bounds what a C-FIND reads: past it the node sends a
/// C-CANCEL (PS3.7 9.3.2.3) and keeps the matches it has; the association
/// goes on and the fetch retrieves from what it kept.
#[tokio::test(flavor = "multi_thread")]
async fn a_query_past_max_matches_is_cancelled_and_the_fetch_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    orthanc_binary();
    let (http, dicom) = (free_port(), free_port());
    let mut settings = node_settings(
        dir.path(),
        vec![source("orthanc", ORTHANC_AET, dicom, RetrieveMethod::Move)],
        300,
    );
    settings.fetch.max_matches = 1;
    let node = spawn_app_with(settings).await;
    let pacs = orthanc(dir.path(), http, dicom, node.port());
    let pacs_addr = format!("127.0.0.1:{dicom}");
    let (mg, us, mr) = (study("MG"), study("US"), study("MR"));
    for files in [&us, &mr] {
        store(&pacs_addr, ORTHANC_AET, files).await;
    }
    store(&node.address(), NODE_AET, &mg).await;
    wait_until("the fetch", 120, || async {
        !events(&node.db, "fetch_attempt").await.is_empty()
    })
    .await;
    let queries = events(&node.db, "fetch_query").await;
    let study_query = queries
        .iter()
        .map(detail)
        .find(|d| d["level"] == "STUDY")
        .expect("a study query");
    assert_eq!(study_query["matches"], 1, "{study_query}");
    assert_eq!(study_query["truncated"], true, "{study_query}");
    let attempts = events(&node.db, "fetch_attempt").await;
    let a = detail(&attempts[0]);
    assert_eq!(a["status"], "ok", "{a}");
    assert!(a["instances_received"].as_u64().unwrap() > 0, "{a}");
    node.stop().await;
    drop(pacs);
}

/// A source whose host accepts the connection but never answers (a hung
/// PACS): the case shows "fetching from silent" while the node waits, the
/// association request fails after the source's `timeout_secs`, the
/// attempt is recorded as failed and the case collects on.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_that_never_answers_times_out_while_the_case_shows_fetching() {
    let dir = tempfile::tempdir().unwrap();
    // The kernel completes the TCP handshake into the backlog; nothing
    // ever reads.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let mut s = source("silent", "SILENT", port, RetrieveMethod::Move);
    s.timeout_secs = 3;
    let settings = node_settings(dir.path(), vec![s], 300);
    let rules = settings.case_rules();
    let node = spawn_app_with(settings).await;
    store(&node.address(), NODE_AET, &study("MG")).await;
    wait_until("the case to show the fetch", 30, || async {
        her2map::ops::describe_cases(&node.db, &rules)
            .await
            .unwrap()
            .iter()
            .any(|v| v.fetching.as_deref() == Some("fetching from silent"))
    })
    .await;
    wait_until("the attempt", 30, || async {
        !events(&node.db, "fetch_attempt").await.is_empty()
    })
    .await;
    let attempts = events(&node.db, "fetch_attempt").await;
    let a = detail(&attempts[0]);
    assert_eq!(a["status"], "failed", "{a}");
    // dicom-ul 0.10.1 reports the read timeout on the A-ASSOCIATE-AC
    // oddly ("TLS not enabled, but peer seems to be sending TLS data"):
    // only the stage is checked.
    assert!(
        a["reason"].as_str().unwrap().starts_with("association"),
        "{a}"
    );
    let views = her2map::ops::describe_cases(&node.db, &rules)
        .await
        .unwrap();
    assert_eq!(views.len(), 1);
    assert_eq!(views[0].case.state, CaseState::Collecting);
    assert_eq!(views[0].fetching, None, "the fetch is over: {:?}", views[0]);
    node.stop().await;
    drop(silent);
}

/// Orthanc with a TLS-only DICOM port (`cert`, requiring a peer
/// certificate from `ca`), knowing the node as `node_entry`, holding
/// `studies` (stored by REST: its DICOM port takes TLS only).
fn tls_orthanc(
    dir: &Path,
    (http, dicom): (u16, u16),
    node_entry: Value,
    (cert, key): (&Path, &Path),
    ca: &Path,
    studies: &[&Vec<PathBuf>],
) -> Orthanc {
    let extra = serde_json::json!({
        "DicomModalities": { "her2map": node_entry },
        "DicomTlsEnabled": true,
        "DicomTlsCertificate": cert,
        "DicomTlsPrivateKey": key,
        "DicomTlsTrustedCertificates": ca,
        "DicomTlsRemoteCertificateRequired": true,
    });
    tokio::task::block_in_place(|| {
        let pacs = Orthanc::start_with(dir, http, dicom, extra);
        for f in studies.iter().flat_map(|s| s.iter()) {
            pacs.request("/instances", Some(&format!("@{}", f.display())))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        pacs
    })
}

/// A DIMSE source over DICOM TLS: Orthanc's DICOM port speaks TLS only
/// (its own certificate, and it requires the node's), and the node
/// queries and retrieves by C-GET on that one TLS association. A second
/// source on the same Orthanc trusts another CA: its handshake fails, the
/// attempt says so, and the case completes from the first.
#[tokio::test(flavor = "multi_thread")]
async fn orthanc_over_dicom_tls_completes_the_case_by_c_get() {
    let pki = common::pki::make_pki();
    let dir = tempfile::tempdir().unwrap();
    orthanc_binary();
    let (http, dicom) = (free_port(), free_port());
    let tls = |ca: &Path| her2map::config::ClientTlsSettings {
        ca: ca.to_path_buf(),
        certificate: pki.client_cert.clone(),
        private_key: pki.client_key.clone(),
        server_name: String::new(),
    };
    let mut secure = source("orthanc-tls", ORTHANC_AET, dicom, RetrieveMethod::Get);
    secure.tls = Some(tls(&pki.ca));
    let mut untrusted = source("wrong-ca", ORTHANC_AET, dicom, RetrieveMethod::Get);
    // The rogue client certificate is self-issued: as a CA it anchors
    // nothing Orthanc's certificate chains to.
    untrusted.tls = Some(tls(&pki.rogue_cert));
    let node = spawn_app_with(node_settings(dir.path(), vec![untrusted, secure], 300)).await;
    let node_entry = serde_json::json!([NODE_AET, "127.0.0.1", node.port()]);
    let (mg, us, mr) = (study("MG"), study("US"), study("MR"));
    let pacs = tls_orthanc(
        dir.path(),
        (http, dicom),
        node_entry,
        (&pki.server_cert, &pki.server_key),
        &pki.ca,
        &[&us, &mr],
    );
    store(&node.address(), NODE_AET, &mg).await;

    let used = wait_result(&node.db, 240).await;
    assert_eq!(
        used,
        ["MG", "MR", "US"],
        "fetched over TLS: {:?}",
        pacs.log_text()
    );
    assert_eq!(
        node.db.instance_count().await.unwrap() as usize,
        mg.len() + us.len() + mr.len()
    );
    let attempts = events(&node.db, "fetch_attempt").await;
    let of = |name: &str| of_source(&attempts, name);
    let ok = of("orthanc-tls");
    assert_eq!(ok.len(), 1, "{attempts:?}");
    assert_eq!(ok[0]["status"], "ok", "{:?}", ok[0]);
    assert_eq!(
        ok[0]["instances_received"].as_u64().unwrap() as usize,
        us.len() + mr.len()
    );
    let refused = of("wrong-ca");
    assert_eq!(refused.len(), 1, "{attempts:?}");
    assert_eq!(refused[0]["status"], "failed", "{:?}", refused[0]);
    let reason = refused[0]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        reason.contains("tls") || reason.contains("certificate") || reason.contains("handshake"),
        "the failure names the TLS handshake: {:?}",
        refused[0]
    );
    let retrieves = events(&node.db, "fetch_retrieve").await;
    assert!(!retrieves.is_empty());
    for r in &retrieves {
        assert_eq!(detail(r)["method"], "C-GET", "{:?}", detail(r));
        assert_eq!(detail(r)["status"], "0x0000", "{:?}", detail(r));
    }
    node.stop().await;
    drop(pacs);
}

/// C-MOVE with DICOM TLS both ways: the node queries Orthanc's TLS-only
/// port, and Orthanc's C-STOREs of the move come back to the node's DICOM
/// TLS listener (the only port of the node Orthanc knows, `UseDicomTls`),
/// each side requiring the other's certificate.
#[tokio::test(flavor = "multi_thread")]
async fn orthanc_c_move_over_dicom_tls_both_ways_completes_the_case() {
    let pki = common::pki::make_pki();
    let dir = tempfile::tempdir().unwrap();
    orthanc_binary();
    let (http, dicom) = (free_port(), free_port());
    let mut secure = source("orthanc-tls", ORTHANC_AET, dicom, RetrieveMethod::Move);
    secure.tls = Some(her2map::config::ClientTlsSettings {
        ca: pki.ca.clone(),
        certificate: pki.client_cert.clone(),
        private_key: pki.client_key.clone(),
        server_name: String::new(),
    });
    let mut settings = node_settings(dir.path(), vec![secure], 300);
    settings.dicom.tls.enabled = true;
    settings.dicom.tls.port = 0;
    settings.dicom.tls.certificate = pki.server_cert.clone();
    settings.dicom.tls.private_key = pki.server_key.clone();
    settings.dicom.tls.client_ca = pki.ca.clone();
    let node = spawn_app_with(settings).await;
    let tls_port = node.tls_addr.expect("the node's TLS listener").port();
    let node_entry = serde_json::json!({
        "AET": NODE_AET, "Host": "127.0.0.1", "Port": tls_port, "UseDicomTls": true
    });
    let (mg, us, mr) = (study("MG"), study("US"), study("MR"));
    let pacs = tls_orthanc(
        dir.path(),
        (http, dicom),
        node_entry,
        (&pki.pacs_cert, &pki.pacs_key),
        &pki.ca,
        &[&us, &mr],
    );
    store(&node.address(), NODE_AET, &mg).await;

    let used = wait_result(&node.db, 240).await;
    assert_eq!(used, ["MG", "MR", "US"], "{}", pacs.log_text());
    assert_eq!(
        node.db.instance_count().await.unwrap() as usize,
        mg.len() + us.len() + mr.len()
    );
    let attempts = events(&node.db, "fetch_attempt").await;
    let ok = of_source(&attempts, "orthanc-tls");
    assert_eq!(ok.len(), 1, "{attempts:?}");
    assert_eq!(ok[0]["status"], "ok", "{:?}", ok[0]);
    let retrieves = events(&node.db, "fetch_retrieve").await;
    assert!(!retrieves.is_empty());
    for r in &retrieves {
        assert_eq!(detail(r)["method"], "C-MOVE", "{:?}", detail(r));
        assert_eq!(detail(r)["status"], "0x0000", "{:?}", detail(r));
    }
    // Orthanc's associations reached the node on its TLS port only.
    let opened = events(&node.db, "association_opened").await;
    assert!(
        opened
            .iter()
            .any(|e| detail(e)["calling_ae"] == ORTHANC_AET),
        "no association from Orthanc: {opened:?}"
    );
    node.stop().await;
    drop(pacs);
}
