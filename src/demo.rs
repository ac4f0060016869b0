//! `her2map demo`: the whole node on one machine in under a minute. A
//! synthetic patient is written, the node starts on loopback with the demo
//! weights and a built-in receiving SCP as its destination, the patient is
//! C-STOREd as three studies with the node's own SCU, and the delivered SR,
//! heatmaps (also as PNG) and audit log are left in the output folder.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::config::Settings;
use crate::db::{CaseState, Db, DeliveryState};
use crate::dimse::client::ClientOptions;
use crate::dimse::server::{Server, ServerConfig};
use crate::ingest::Ingest;
use crate::outbox::DestinationSettings;
use crate::report::OutputKind;
use crate::spool::Spool;

const RECEIVER_AE: &str = "DEMO-PACS";

/// Run the demo, writing everything under `out`; returns the summary text.
pub async fn run(mut settings: Settings, out: &Path) -> anyhow::Result<String> {
    let started = Instant::now();
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("clearing {}", out.display()))?;
    }
    std::fs::create_dir_all(out)?;
    let scratch = tempfile::tempdir()?;

    // 1. The patient.
    let patient = scratch.path().join("patient");
    let opts = crate::synth::SynthOptions::default();
    let p2 = patient.clone();
    let synth =
        tokio::task::spawn_blocking(move || crate::synth::write_synthetic_patient(&p2, &opts))
            .await??;

    // 2. The receiving SCP standing in for the PACS: the node's own SCP
    //    and spool, without a model.
    let recv_dir = out.join("received");
    let recv_db = Db::connect(&format!(
        "sqlite://{}",
        recv_dir.join("received.db").display()
    ))
    .await?;
    let recv_clock = crate::clock::Clock::new();
    let recv_instances = crate::db::InstanceWriter::start(&recv_db, recv_clock.clone());
    let receiver = Server::bind(
        "127.0.0.1:0",
        ServerConfig {
            ae_title: RECEIVER_AE.into(),
            max_pdu: 65536,
            max_associations: 8,
            accept_any_storage: true,
            accept_any_called_ae: true,
            read_timeout: Duration::from_secs(30),
            peers: Vec::new(),
        },
        Ingest::new(
            Spool::open(&recv_dir.join("spool"), 0)?,
            recv_db.clone(),
            recv_instances.queue(),
            recv_clock,
        ),
    )
    .await?;
    let receiver_port = receiver.local_addr()?.port();
    let stop_receiver = CancellationToken::new();
    let receiver_task = tokio::spawn(receiver.run(stop_receiver.clone()));

    // 3. The node.
    settings.dicom.host = "127.0.0.1".into();
    settings.dicom.port = 0;
    settings.storage.data_dir = out.join("node");
    settings.storage.min_free_mb = 0;
    settings.model.demo = true;
    settings.cases.stable_age_secs = 2;
    settings.destinations = vec![DestinationSettings {
        ae_title: RECEIVER_AE.into(),
        host: "127.0.0.1".into(),
        port: receiver_port,
        outputs: None,
        tls: None,
    }];
    let app = App::build(settings.clone()).await?;
    let node_addr = format!("127.0.0.1:{}", app.local_addr().port());
    let db = app.db();
    let stop_node = CancellationToken::new();
    let node_task = tokio::spawn(app.run_until_stopped(stop_node.clone()));

    // 4. Three studies, three associations, as a PACS would route them.
    let options = ClientOptions {
        calling_ae: "DEMO-PACS".into(),
        called_ae: settings.dicom.ae_title.clone(),
        ..Default::default()
    };
    let send_started = Instant::now();
    let mut sent = 0;
    for study in &synth.studies {
        let files: Vec<PathBuf> = study.files.clone();
        let results = crate::send::send_files(&node_addr, &options, &files, |_| {}).await?;
        if let Some(bad) = results.iter().find(|r| !r.ok()) {
            bail!("sending {} failed: {:?}", study.name, bad.error);
        }
        sent += results.len();
    }
    let last_sent = Instant::now();

    // 5. Wait for the case to be reported and delivered.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let cases = db.all_cases().await?;
        let rows = db.outbox().await?;
        let failed = cases.iter().find(|c| c.state == CaseState::Failed);
        if let Some(c) = failed {
            bail!("the case failed: {}", c.reason);
        }
        if cases.iter().any(|c| c.state == CaseState::Done)
            && !rows.is_empty()
            && rows.iter().all(|r| r.state != DeliveryState::Pending)
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("no result within 120 s; see `her2map cases` and `her2map audit`");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let delivered_at = Instant::now();

    // 6. What the radiologist would see, and the audit trail.
    let rows = db.outbox().await?;
    let outputs_dir = out.join("outputs");
    std::fs::create_dir_all(&outputs_dir)?;
    for row in &rows {
        let src = out.join("node").join(&row.path);
        let name = format!("{}-{}.dcm", row.kind, row.sop_instance_uid);
        std::fs::copy(&src, outputs_dir.join(&name))?;
        if row.kind == OutputKind::HeatmapSc {
            let obj = dicom_object::open_file(&src)?;
            crate::report::sc::write_png(&obj, &outputs_dir.join(name.replace(".dcm", ".png")))?;
        }
    }
    let events = db.events(0, None, i64::MAX).await?;
    let mut audit = String::new();
    for e in &events {
        audit.push_str(&serde_json::to_string(e)?);
        audit.push('\n');
    }
    std::fs::write(out.join("audit.jsonl"), audit)?;

    let last = |name: &str| events.iter().rev().find(|e| e.event == name);
    let result_event = last(crate::pipeline::event::CASE_RESULT);
    let result = result_event
        .and_then(|e| e.detail.clone())
        .unwrap_or_default();
    let case_id = result_event
        .and_then(|e| e.case_id.clone())
        .unwrap_or_default();
    let imaging = last(crate::pipeline::event::CASE_IMAGING_DONE)
        .and_then(|e| e.detail.clone())
        .unwrap_or_default();
    let received = recv_db.instance_count().await?;
    stop_node.cancel();
    let _ = node_task.await;
    stop_receiver.cancel();
    let _ = receiver_task.await;
    recv_instances.shutdown().await;

    let mut s = String::new();
    s.push_str(&format!("case {case_id}\n"));
    for side in result["sides"].as_array().into_iter().flatten() {
        let bp = &side["branch_probs"];
        let f = |v: &serde_json::Value| {
            v.as_f64()
                .map_or("absent".to_string(), |x| format!("{x:.3}"))
        };
        s.push_str(&format!(
            "  lesion side {}: P(HER2+) fused {} ({}) | US {} | MRI {} | MG {}\n",
            side["lesion_side"].as_str().unwrap_or("unknown"),
            f(&side["prob"]),
            if side["positive"].as_bool() == Some(true) {
                "positive"
            } else {
                "negative"
            },
            f(&bp["us"]),
            f(&bp["mri"]),
            f(&bp["mg"]),
        ));
        s.push_str(&format!(
            "  modalities used {} missing {}; ROI {}\n",
            side["modalities_used"], side["modalities_missing"], side["roi_methods"]
        ));
    }
    let t = &result["times"];
    let imaging_text = if imaging["prepared_during_stable_age"].as_bool() == Some(true) {
        format!(
            "imaging {:.0} ms during the stable age, {:.0} ms waited",
            imaging["compute_ms"].as_f64().unwrap_or(0.0),
            t["imaging_ms"].as_f64().unwrap_or(0.0),
        )
    } else {
        format!("imaging {:.0} ms", t["imaging_ms"].as_f64().unwrap_or(0.0))
    };
    s.push_str(&format!(
        "  objects delivered to {RECEIVER_AE}: {} ({} SR, {} heatmaps); received there: {received}\n",
        rows.iter().filter(|r| r.state == DeliveryState::Sent).count(),
        rows.iter().filter(|r| r.kind == OutputKind::Sr).count(),
        rows.iter().filter(|r| r.kind == OutputKind::HeatmapSc).count(),
    ));
    s.push_str(&format!(
        "  time: send {} instances {:.1} s | stable age {} s | {imaging_text} | inference {:.0} ms | reporting {:.0} ms | last instance to delivered {:.1} s | total {:.1} s\n",
        sent,
        (last_sent - send_started).as_secs_f64(),
        settings.cases.stable_age_secs,
        t["inference_ms"].as_f64().unwrap_or(0.0),
        t["reporting_ms"].as_f64().unwrap_or(0.0),
        (delivered_at - last_sent).as_secs_f64(),
        started.elapsed().as_secs_f64(),
    ));
    s.push_str("  DEMO WEIGHTS: random, reduced-size parameters. NOT FOR DIAGNOSTIC USE.\n");
    s.push_str(&format!(
        "  left in {}: outputs/ (SR, heatmaps .dcm + .png), audit.jsonl, node/ (spool, database), received/\n",
        out.display()
    ));
    Ok(s)
}
