//! The console's pages (issue 15) in a real browser: the node with HTTP on
//! port 0 and an operator, the synthetic patient run to completion, then
//! headless Chromium (tests/browser/console.cjs, playwright-core) signs in
//! through the login form, opens the dashboard and the case's page. The
//! page states the case's state and HER2 result, and every heatmap image
//! loads. Screenshots are kept under `target/browser/console/`.
//!
//! Needs Node.js, Chromium and `eval "$(scripts/web-deps.sh)"`; without them
//! the test fails: it is never skipped.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::browser::run_script;
use common::*;
use her2map::config::{HttpRole, HttpUser};
use her2map::db::CaseState;
use her2map::dimse::client::ClientOptions;
use her2map::report::OutputKind;
use her2map::send::{collect_files, send_files};
use serde_json::json;

fn study(name: &str) -> Vec<PathBuf> {
    collect_files(&[test_data(&format!("synth-patient/{name}"))])
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn chromium_signs_in_and_sees_the_case_result_and_heatmaps() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = test_settings(dir.path());
    let (token, digest) = her2map::http::auth::new_token();
    s.http.users = vec![HttpUser {
        name: "olga".into(),
        role: HttpRole::Operator,
        token_sha256: digest,
    }];
    // The screenshot goes to docs/: no patient name in it.
    s.http.show_phi = false;
    s.cases.stable_age_secs = 2;
    // Results go to a second node, so that delivery moves its metrics too.
    let dest_dir = tempfile::tempdir().unwrap();
    let destination = spawn_app(dest_dir.path()).await;
    s.destinations = vec![dimse_destination("HER2MAP", destination.port())];
    let dest_name = s.destinations[0].name();
    let node = spawn_app_with(s).await;
    let base = format!("http://{}", node.http_addr.expect("http enabled"));
    let scrape = || async {
        let text = reqwest::Client::new()
            .get(format!("{base}/metrics"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        crate::console::promtool(&text);
        text
    };
    // The metrics are the process's: other tests of this binary move them
    // too, so every check is "at least what this case adds".
    let before = scrape().await;

    let scu = ClientOptions {
        calling_ae: "PACS".into(),
        called_ae: "HER2MAP".into(),
        ..Default::default()
    };
    for piece in ["MG", "US", "MR"] {
        let results = send_files(&node.address(), &scu, &study(piece), |_| {})
            .await
            .unwrap();
        assert!(results.iter().all(|r| r.ok()), "{piece}: {results:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    let case = loop {
        // The assembler opens the case after ingest has answered: none yet
        // is a moment to wait, more than one a failure.
        let cases = node.db.all_cases().await.unwrap();
        assert!(cases.len() <= 1, "{cases:?}");
        if let Some(case) = cases.first() {
            assert_ne!(case.state, CaseState::Failed, "{case:?}");
            if case.state == CaseState::Done {
                break case.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "the case did not finish: {cases:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Every output delivered, then the metrics of the whole run.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = node.db.outbox().await.unwrap();
        if !rows.is_empty()
            && rows
                .iter()
                .all(|r| r.state == her2map::db::DeliveryState::Sent)
        {
            break;
        }
        assert!(Instant::now() < deadline, "not delivered: {rows:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let outputs = node.db.outbox().await.unwrap().len() as f64;
    let after = scrape().await;
    let m = crate::console::metric;
    let grew = |name: &str, by: f64| {
        assert!(
            m(&after, name) >= m(&before, name) + by,
            "{name}: {} then {}, expected at least +{by}",
            m(&before, name),
            m(&after, name)
        );
    };
    for modality in ["MG", "US", "MR"] {
        grew(
            &format!(
                "her2map_instances_received_total{{outcome=\"stored\",status=\"0x0000\",modality=\"{modality}\"}}"
            ),
            1.0,
        );
    }
    for stage in ["imaging", "inference", "reporting"] {
        grew(
            &format!("her2map_case_stage_duration_seconds_count{{stage=\"{stage}\"}}"),
            1.0,
        );
    }
    grew("her2map_last_instance_to_delivery_seconds_count", outputs);
    grew(
        &format!("her2map_delivery_attempts_total{{destination=\"{dest_name}\",outcome=\"sent\"}}"),
        outputs,
    );
    assert_eq!(m(&after, "her2map_cases{state=\"done\"}"), 1.0, "{after}");
    assert_eq!(
        m(
            &after,
            &format!("her2map_outbox_deliveries{{destination=\"{dest_name}\",state=\"sent\"}}")
        ),
        outputs
    );

    let results = node.db.events(0, Some("case_result"), 10).await.unwrap();
    let side = results[0].detail.as_ref().unwrap()["sides"][0].clone();
    let prob = side["prob"].as_f64().unwrap();
    let status = if side["positive"].as_bool().unwrap() {
        "HER2 Positive"
    } else {
        "HER2 Negative"
    };
    let heatmaps = node
        .db
        .case_outputs(&case.id)
        .await
        .unwrap()
        .iter()
        .filter(|o| o.kind == OutputKind::HeatmapSc)
        .count();

    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser/console");
    std::fs::create_dir_all(&artifacts).unwrap();
    let r = tokio::task::block_in_place(|| {
        run_script(
            "console.cjs",
            &json!({ "base": base, "token": token, "caseId": case.id, "out": artifacts }),
        )
    });
    eprintln!(
        "console screenshots: {} and {} (page errors: {}, failed requests: {})",
        r["dashboard"]["screenshot"], r["case"]["screenshot"], r["errors"], r["failed"]
    );

    assert_eq!(
        r["afterLogin"],
        format!("{base}/"),
        "signed in, on the dashboard"
    );
    let dash = r["dashboard"]["text"].as_str().unwrap();
    assert!(
        dash.contains("Health") && dash.contains("Ready"),
        "dashboard:\n{dash}"
    );
    assert!(
        !dash.contains("Sign in"),
        "still on the login form:\n{dash}"
    );

    let c = &r["case"];
    assert_eq!(c["state"], "done", "{c}");
    let result = c["result"].as_str().unwrap();
    let p = format!("P(HER2+) = {prob:.3}");
    assert!(
        result.contains(status) && result.contains(&p),
        "the case page does not state {status}, {p}:\n{result}"
    );
    assert!(
        c["text"].as_str().unwrap().contains("masked"),
        "show_phi = false masks the patient"
    );
    let images = c["images"].as_array().unwrap();
    assert!(
        images.len() >= 4 && images.len() == heatmaps,
        "one image per heatmap output ({heatmaps}): {images:?}"
    );
    for img in images {
        assert!(
            img["naturalWidth"].as_u64().unwrap() > 0 && img["naturalHeight"].as_u64().unwrap() > 0,
            "heatmap did not load: {img}"
        );
    }
    assert!(
        r["errors"].as_array().unwrap().is_empty(),
        "{}",
        r["errors"]
    );
    // No page asks for something the node does not serve (but the
    // favicon Chromium asks every site for).
    let failed: Vec<_> = r["failed"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| !f["url"].as_str().unwrap().ends_with("/favicon.ico"))
        .collect();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    node.stop().await;
    destination.stop().await;
}
