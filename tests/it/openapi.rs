//! The REST API against its own OpenAPI document: schemathesis (PyPI)
//! generates requests from `/api/v1/openapi.json` (examples, coverage,
//! fuzzing and stateful phases, following the document's links from the
//! lists to the per-item endpoints) against the live node, signed in as an
//! operator, after the synthetic patient has made a case with outputs and
//! deliveries, and must find no 5xx, no undocumented status and no response
//! that breaks the schema (`--checks all`).
//!
//! The STOW-RS operations (multipart/related bodies, which schemathesis
//! cannot generate) are left to tests/it/dicomweb.rs.
//!
//! Needs schemathesis (`pip install schemathesis`, as .ci/run does): the
//! test fails without it, never skips.

use crate::common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use her2map::config::{HttpRole, HttpUser};
use her2map::db::{CaseState, DeliveryState};
use her2map::dimse::client::ClientOptions;
use her2map::send::{collect_files, send_files};

fn schemathesis() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("schemathesis"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("schemathesis is not installed: this test needs it (pip install schemathesis)")
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_no_server_error_and_no_schema_break() {
    let tool = schemathesis();
    let dir = tempfile::tempdir().unwrap();
    let mut s = test_settings(dir.path());
    let (token, digest) = her2map::http::auth::new_token();
    s.http.users = vec![HttpUser {
        name: "olga".into(),
        role: HttpRole::Operator,
        token_sha256: digest,
    }];
    s.cases.stable_age_secs = 1;
    // A destination that refuses every connection: the deliveries stay in
    // the outbox (retried, then dead), so the outbox endpoints have rows.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    s.destinations = vec![dimse_destination("NOWHERE", closed_port)];
    s.outbox.max_attempts = 1;
    let node = spawn_app_with(s).await;
    let base = format!("http://{}", node.http_addr.expect("http enabled"));

    // A case that ran, with outputs and dead deliveries.
    let files: Vec<PathBuf> = collect_files(&[test_data("synth-patient")])
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    let scu = ClientOptions {
        calling_ae: "PACS".into(),
        called_ae: "HER2MAP".into(),
        ..Default::default()
    };
    let results = send_files(&node.address(), &scu, &files, |_| {})
        .await
        .unwrap();
    assert!(results.iter().all(|r| r.ok()), "{results:?}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let cases = node.db.all_cases().await.unwrap();
        let rows = node.db.outbox().await.unwrap();
        if cases.iter().any(|c| c.state == CaseState::Done)
            && !rows.is_empty()
            && rows.iter().all(|r| r.state == DeliveryState::Dead)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no case with dead deliveries: {cases:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let args = [
        "run".to_string(),
        format!("{base}/api/v1/openapi.json"),
        "--header".into(),
        format!("Authorization: Bearer {token}"),
        "--checks".into(),
        "all".into(),
        "--max-examples".into(),
        "40".into(),
        "--workers".into(),
        "1".into(),
        "--seed".into(),
        "20261201".into(),
        "--no-color".into(),
        // STOW-RS takes multipart/related, which schemathesis cannot
        // generate ("no supported serializers"); tests/it/dicomweb.rs sends
        // it real and malformed bodies instead.
        "--exclude-path-regex".into(),
        "^/dicom-web/".into(),
    ];
    // Off the runtime's workers: the node answers on them meanwhile.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&tool)
            .args(&args)
            .output()
            .expect("running schemathesis")
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    // It did test every operation it selected, and selected all of them,
    // in every phase.
    let count = |label: &str| -> String {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .unwrap_or_else(|| panic!("no `{label}` line:\n{text}"))
            .trim()
            .to_string()
    };
    let selected = count("Selected:");
    let (picked, total) = selected.split_once('/').expect("Selected: N/M");
    let (picked_n, total_n): (usize, usize) = (picked.parse().unwrap(), total.parse().unwrap());
    // Everything but the two STOW-RS operations.
    assert_eq!(picked_n + 2, total_n, "{text}");
    assert!(picked_n >= 9, "{text}");
    assert_eq!(count("Tested:"), picked, "{text}");
    for phase in ["Coverage", "Fuzzing", "Stateful"] {
        assert!(text.contains(&format!("✅ {phase}")), "{phase}:\n{text}");
    }
    // The per-item endpoints were reached through the links (a case and a
    // delivery exist), so no operation is left answering only 404.
    assert!(!text.contains("Missing test data"), "{text}");
    node.stop().await;
}
