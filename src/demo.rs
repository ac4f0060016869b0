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
    let synth = write_patient(&scratch.path().join("patient")).await?;
    // 2. The receiving SCP standing in for the PACS.
    let receiver = Receiver::start(&out.join("received")).await?;
    // 3. The node.
    configure_node(&mut settings, out, receiver.port);
    let app = App::build(settings.clone()).await?;
    let node_addr = format!("127.0.0.1:{}", app.local_addr().port());
    let db = app.db();
    let stop_node = CancellationToken::new();
    let node_task = tokio::spawn(app.run_until_stopped(stop_node.clone()));
    // 4. Three studies, three associations, as a PACS would route them.
    let sending = send_studies(&node_addr, &settings.dicom.ae_title, &synth).await?;
    // 5. Wait for the case to be reported and delivered.
    wait_for_delivery(&db).await?;
    let delivered_at = Instant::now();
    // 6. What the radiologist would see, and the audit trail.
    let rows = db.outbox().await?;
    copy_outputs(out, &rows)?;
    let events = db.events(0, None, i64::MAX).await?;
    write_audit(out, &events)?;

    let received = receiver.db.instance_count().await?;
    stop_node.cancel();
    let _ = node_task.await;
    receiver.stop().await;

    let run = DemoRun {
        settings: &settings,
        out,
        rows: &rows,
        events: &events,
        received,
        sending,
        delivered_at,
        started,
    };
    Ok(run.summary())
}

/// Write the synthetic patient (default options) under `dir`.
async fn write_patient(dir: &Path) -> anyhow::Result<crate::synth::SynthSummary> {
    let opts = crate::synth::SynthOptions::default();
    let dir = dir.to_path_buf();
    Ok(
        tokio::task::spawn_blocking(move || crate::synth::write_synthetic_patient(&dir, &opts))
            .await??,
    )
}

/// The receiving SCP standing in for the PACS: the node's own SCP and spool,
/// without a model.
struct Receiver {
    db: Db,
    instances: crate::db::InstanceWriter,
    port: u16,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(dir: &Path) -> anyhow::Result<Self> {
        let db = Db::connect(&format!("sqlite://{}", dir.join("received.db").display())).await?;
        let clock = crate::clock::Clock::new();
        let instances = crate::db::InstanceWriter::start(&db, clock.clone());
        let server = Server::bind(
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
                Spool::open(&dir.join("spool"), 0)?,
                db.clone(),
                instances.queue(),
                clock,
            ),
        )
        .await?;
        let port = server.local_addr()?.port();
        let stop = CancellationToken::new();
        let task = tokio::spawn(server.run(stop.clone()));
        Ok(Receiver {
            db,
            instances,
            port,
            stop,
            task,
        })
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
        self.instances.shutdown().await;
    }
}

/// The node on loopback (port 0) with the demo weights, its data under
/// `out/node`, a short stable age, and the receiver as its one destination.
fn configure_node(settings: &mut Settings, out: &Path, receiver_port: u16) {
    settings.dicom.host = "127.0.0.1".into();
    settings.dicom.port = 0;
    settings.storage.data_dir = out.join("node");
    settings.storage.min_free_mb = 0;
    // The demo is one run on this machine: no console to serve.
    settings.http.enabled = false;
    settings.model.demo = true;
    settings.cases.stable_age_secs = 2;
    settings.destinations = vec![DestinationSettings {
        ae_title: RECEIVER_AE.into(),
        host: "127.0.0.1".into(),
        port: receiver_port,
        dicomweb: None,
        outputs: None,
        tls: None,
    }];
}

/// How the patient went to the node.
struct Sending {
    instances: usize,
    started: Instant,
    last_sent: Instant,
}

/// C-STORE each study of the patient to the node over its own association.
async fn send_studies(
    node_addr: &str,
    node_ae: &str,
    synth: &crate::synth::SynthSummary,
) -> anyhow::Result<Sending> {
    let options = ClientOptions {
        calling_ae: "DEMO-PACS".into(),
        called_ae: node_ae.to_string(),
        ..Default::default()
    };
    let started = Instant::now();
    let mut instances = 0;
    for study in &synth.studies {
        let files: Vec<PathBuf> = study.files.clone();
        let results = crate::send::send_files(node_addr, &options, &files, |_| {}).await?;
        if let Some(bad) = results.iter().find(|r| !r.ok()) {
            bail!("sending {} failed: {:?}", study.name, bad.error);
        }
        instances += results.len();
    }
    Ok(Sending {
        instances,
        started,
        last_sent: Instant::now(),
    })
}

/// Poll until a case is done and none of its deliveries is pending (or a
/// case failed, or 120 s passed).
async fn wait_for_delivery(db: &Db) -> anyhow::Result<()> {
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
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no result within 120 s; see `her2map cases` and `her2map audit`");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Copy each delivered object into `out/outputs`, and each heatmap as PNG too.
fn copy_outputs(out: &Path, rows: &[crate::db::OutboxRow]) -> anyhow::Result<()> {
    let outputs_dir = out.join("outputs");
    std::fs::create_dir_all(&outputs_dir)?;
    for row in rows {
        let src = out.join("node").join(&row.path);
        let name = format!("{}-{}.dcm", row.kind, row.sop_instance_uid);
        std::fs::copy(&src, outputs_dir.join(&name))?;
        if matches!(row.kind, OutputKind::HeatmapSc | OutputKind::SummarySc) {
            let obj = dicom_object::open_file(&src)?;
            crate::report::sc::write_png(&obj, &outputs_dir.join(name.replace(".dcm", ".png")))?;
        }
    }
    Ok(())
}

/// The node's audit log as `out/audit.jsonl`, one event per line.
fn write_audit(out: &Path, events: &[crate::db::AuditEvent]) -> anyhow::Result<()> {
    let mut audit = String::new();
    for e in events {
        audit.push_str(&serde_json::to_string(e)?);
        audit.push('\n');
    }
    std::fs::write(out.join("audit.jsonl"), audit)?;
    Ok(())
}

/// What the summary reports.
struct DemoRun<'a> {
    settings: &'a Settings,
    out: &'a Path,
    rows: &'a [crate::db::OutboxRow],
    events: &'a [crate::db::AuditEvent],
    received: i64,
    sending: Sending,
    delivered_at: Instant,
    started: Instant,
}

impl DemoRun<'_> {
    /// Detail of the last event of this name (JSON), or null.
    fn last_detail(&self, name: &str) -> (serde_json::Value, String) {
        let e = self.events.iter().rev().find(|e| e.event == name);
        (
            e.and_then(|e| e.detail.clone()).unwrap_or_default(),
            e.and_then(|e| e.case_id.clone()).unwrap_or_default(),
        )
    }

    /// The summary text: the result per side, what was delivered, the times.
    fn summary(&self) -> String {
        let (result, case_id) = self.last_detail(crate::pipeline::event::CASE_RESULT);
        let (imaging, _) = self.last_detail(crate::pipeline::event::CASE_IMAGING_DONE);
        let mut s = String::new();
        s.push_str(&format!("case {case_id}\n"));
        for side in result["sides"].as_array().into_iter().flatten() {
            s.push_str(&side_lines(side));
        }
        let rows = self.rows;
        let of = |kind: OutputKind| rows.iter().filter(|r| r.kind == kind).count();
        s.push_str(&format!(
            "  objects delivered to {RECEIVER_AE}: {} ({} SR, {} heatmaps, {} summary cards, {} presentation states); received there: {}\n",
            rows.iter()
                .filter(|r| r.state == DeliveryState::Sent)
                .count(),
            of(OutputKind::Sr),
            of(OutputKind::HeatmapSc),
            of(OutputKind::SummarySc),
            of(OutputKind::Gsps),
            self.received,
        ));
        s.push_str(&self.time_line(&result["times"], &imaging));
        s.push_str("  DEMO WEIGHTS: random, reduced-size parameters. NOT FOR DIAGNOSTIC USE.\n");
        s.push_str(&format!(
            "  left in {}: outputs/ (SR, heatmaps and summary cards .dcm + .png, GSPS), audit.jsonl, node/ (spool, database), received/\n",
            self.out.display()
        ));
        s
    }

    /// The time taken by each stage.
    fn time_line(&self, t: &serde_json::Value, imaging: &serde_json::Value) -> String {
        let imaging_text = if imaging["prepared_during_stable_age"].as_bool() == Some(true) {
            format!(
                "imaging {:.0} ms during the stable age, {:.0} ms waited",
                imaging["compute_ms"].as_f64().unwrap_or(0.0),
                t["imaging_ms"].as_f64().unwrap_or(0.0),
            )
        } else {
            format!("imaging {:.0} ms", t["imaging_ms"].as_f64().unwrap_or(0.0))
        };
        let sending = &self.sending;
        format!(
            "  time: send {} instances {:.1} s | stable age {} s | {imaging_text} | inference {:.0} ms | reporting {:.0} ms | last instance to delivered {:.1} s | total {:.1} s\n",
            sending.instances,
            (sending.last_sent - sending.started).as_secs_f64(),
            self.settings.cases.stable_age_secs,
            t["inference_ms"].as_f64().unwrap_or(0.0),
            t["reporting_ms"].as_f64().unwrap_or(0.0),
            (self.delivered_at - sending.last_sent).as_secs_f64(),
            self.started.elapsed().as_secs_f64(),
        )
    }
}

/// The two summary lines of one lesion side of the `case_result` event.
fn side_lines(side: &serde_json::Value) -> String {
    let bp = &side["branch_probs"];
    let f = |v: &serde_json::Value| {
        v.as_f64()
            .map_or("absent".to_string(), |x| format!("{x:.3}"))
    };
    format!(
        "  lesion side {}: P(HER2+) fused {} ({}) | US {} | MRI {} | MG {}\n  modalities used {} missing {}; ROI {}\n",
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
        side["modalities_used"],
        side["modalities_missing"],
        side["roi_methods"]
    )
}
