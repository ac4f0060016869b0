//! Delivery of result objects: DCMTK storescp and the node itself as
//! destinations; down, rejecting, silent and restarted. On PostgreSQL too,
//! with `HER2MAP_TEST_PG_URL` set (see common).

use crate::common;

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use common::*;
use her2map::db::{Db, DeliveryState, OutputRow};
use her2map::outbox::{DestinationSettings, Outbox, OutboxSettings};
use her2map::report::OutputKind;
use time::OffsetDateTime;

fn settings(retry_base_ms: u64, timeout_secs: u64) -> OutboxSettings {
    OutboxSettings {
        retry_base_ms,
        retry_max_ms: 1000,
        max_attempts: 50,
        timeout_secs,
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn dest(ae: &str, port: u16) -> DestinationSettings {
    dimse_destination(ae, port)
}

/// A node database with `n` outputs (MR_small variants standing in for
/// result objects) queued for `destinations`.
async fn queued_outputs(data_dir: &Path, n: usize, tag: &str, destinations: &[String]) -> Db {
    let db = Db::connect(&test_database_url(data_dir, "her2map.db"))
        .await
        .unwrap();
    let out_dir = data_dir.join("outputs");
    std::fs::create_dir_all(&out_dir).unwrap();
    for path in mr_variants(&out_dir, n, tag) {
        let h = her2map::part10::Part10Header::read(&path).unwrap();
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
            db.add_output(&row, destinations, OffsetDateTime::now_utc())
                .await
                .unwrap()
        );
        // Recording it again (a rerun) queues nothing more.
        assert!(
            !db.add_output(&row, destinations, OffsetDateTime::now_utc())
                .await
                .unwrap()
        );
    }
    db
}

struct StoreScp {
    child: Child,
    dir: tempfile::TempDir,
}

impl StoreScp {
    fn start(port: u16) -> Self {
        Self::start_with(port, &[])
    }
    /// With extra options first (TLS).
    fn start_with(port: u16, options: &[String]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // +uf: a unique file per received copy, so a duplicate would show.
        let child = Command::new("storescp")
            .args(options)
            .args(["-aet", "DEST", "+xa", "+uf", "-od"])
            .arg(dir.path())
            .arg(port.to_string())
            .env("TCP_NODELAY", "1")
            .spawn()
            .expect("storescp (apt-get install dcmtk)");
        std::thread::sleep(Duration::from_millis(300));
        StoreScp { child, dir }
    }
    fn files(&self) -> usize {
        std::fs::read_dir(self.dir.path()).unwrap().count()
    }
}

impl Drop for StoreScp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn states(db: &Db) -> Vec<DeliveryState> {
    db.outbox()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.state)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_destination_down_at_first_receives_everything_once_it_is_up() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let d = dest("DEST", port);
    let db = queued_outputs(data.path(), 5, "down", &[d.name()]).await;
    let outbox = Outbox::new(
        db.clone(),
        data.path().to_path_buf(),
        vec![d],
        settings(50, 5),
        "HER2MAP".into(),
    )
    .unwrap();

    assert_eq!(outbox.deliver_due().await.unwrap(), 5);
    let rows = db.outbox().await.unwrap();
    assert!(
        rows.iter()
            .all(|r| r.state == DeliveryState::Pending && r.attempts == 1),
        "{rows:?}"
    );
    assert!(
        rows[0].last_status.contains("connect"),
        "{}",
        rows[0].last_status
    );

    let scp = StoreScp::start(port);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while states(&db).await.iter().any(|s| *s != DeliveryState::Sent) {
        assert!(std::time::Instant::now() < deadline, "not delivered");
        outbox.deliver_due().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(scp.files(), 5, "each object exactly once");
    let sent = wait_events(&db, "delivery_sent", 5).await;
    assert_eq!(sent.len(), 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_permanent_rejection_is_dead_lettered_after_one_try() {
    let node_dir = tempfile::tempdir().unwrap();
    let mut s = test_settings(node_dir.path());
    s.dicom.peers = vec![her2map::config::PeerSettings {
        ae_title: "SOMEONE-ELSE".into(),
        host: None,
    }];
    let node = spawn_app_with(s).await;
    let data = tempfile::tempdir().unwrap();
    let d = dest("HER2MAP", node.port());
    let db = queued_outputs(data.path(), 2, "rej", &[d.name()]).await;
    let outbox = Outbox::new(
        db.clone(),
        data.path().to_path_buf(),
        vec![d],
        settings(10, 5),
        "HER2MAP".into(),
    )
    .unwrap();
    assert_eq!(outbox.deliver_due().await.unwrap(), 2);
    let rows = db.outbox().await.unwrap();
    assert!(
        rows.iter()
            .all(|r| r.state == DeliveryState::Dead && r.attempts == 1),
        "{rows:?}"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        outbox.deliver_due().await.unwrap(),
        0,
        "no looping on dead letters"
    );
    // The operator puts one back.
    assert!(
        db.retry_delivery(rows[0].id, OffsetDateTime::now_utc())
            .await
            .unwrap()
    );
    assert_eq!(
        states(&db).await,
        vec![DeliveryState::Pending, DeliveryState::Dead]
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_destination_that_never_answers_times_out_and_retries() {
    // Accepts TCP connections and never says a word.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let data = tempfile::tempdir().unwrap();
    let d = dest("SILENT", port);
    let db = queued_outputs(data.path(), 1, "silent", &[d.name()]).await;
    let outbox = Outbox::new(
        db.clone(),
        data.path().to_path_buf(),
        vec![d],
        settings(10, 1),
        "HER2MAP".into(),
    )
    .unwrap();
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), outbox.deliver_due())
        .await
        .expect("the worker is not blocked")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    let row = &db.outbox().await.unwrap()[0];
    assert_eq!(
        (row.state, row.attempts),
        (DeliveryState::Pending, 1),
        "{row:?}"
    );
    silent.abort();
}

/// Kill the delivery worker mid-round and start a new one: every object
/// reaches the destination, and no object other than ours appears there.
#[tokio::test(flavor = "multi_thread")]
async fn a_restart_in_the_middle_of_delivery_loses_and_duplicates_nothing() {
    let dest_dir = tempfile::tempdir().unwrap();
    let destination = spawn_app(dest_dir.path()).await;
    let data = tempfile::tempdir().unwrap();
    let d = dest("HER2MAP", destination.port());
    let db = queued_outputs(data.path(), 30, "restart", &[d.name()]).await;
    let expected: Vec<String> = db
        .outbox()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.sop_instance_uid)
        .collect();

    let first = Outbox::new(
        db.clone(),
        data.path().to_path_buf(),
        vec![d.clone()],
        settings(10, 5),
        "HER2MAP".into(),
    )
    .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(first.run(
        std::sync::Arc::new(tokio::sync::Notify::new()),
        stop.clone(),
    ));
    while destination.db.instance_count().await.unwrap() < 5 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    task.abort(); // a crash, not a graceful stop
    let _ = task.await;
    let delivered_before = destination.db.instance_count().await.unwrap();
    assert!(
        delivered_before < 30,
        "stopped mid-delivery ({delivered_before})"
    );

    let second = Outbox::new(
        db.clone(),
        data.path().to_path_buf(),
        vec![d],
        settings(10, 5),
        "HER2MAP".into(),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while states(&db).await.iter().any(|s| *s != DeliveryState::Sent) {
        assert!(std::time::Instant::now() < deadline);
        second.deliver_due().await.unwrap();
    }
    let mut at_destination: Vec<String> = destination
        .db
        .instance_paths()
        .await
        .unwrap()
        .into_iter()
        .map(|(uid, _)| uid)
        .collect();
    at_destination.sort();
    let mut expected = expected;
    expected.sort();
    assert_eq!(at_destination, expected, "exactly our objects, each once");
    destination.stop().await;
}

/// A destination over DICOM TLS: DCMTK storescp with its own certificate,
/// requiring the node's (storescp's default `--require-peer-cert`). The
/// node delivers once its certificate is configured; before that, each
/// attempt fails the handshake and stays pending.
#[tokio::test(flavor = "multi_thread")]
async fn a_tls_destination_gets_everything_once_the_node_has_its_certificate() {
    let pki = common::pki::make_pki();
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let arg = |p: &Path| p.display().to_string();
    let scp = StoreScp::start_with(
        port,
        &[
            "+tls".into(),
            arg(&pki.server_key),
            arg(&pki.server_cert),
            "+cf".into(),
            arg(&pki.ca),
        ],
    );
    let mut d = dest("DEST", port);
    d.tls = Some(her2map::config::ClientTlsSettings {
        ca: pki.ca.clone(),
        ..Default::default()
    });
    let db = queued_outputs(data.path(), 3, "tls", &[d.name()]).await;
    let outbox = |d: DestinationSettings| {
        Outbox::new(
            db.clone(),
            data.path().to_path_buf(),
            vec![d],
            settings(10, 5),
            "HER2MAP".into(),
        )
        .unwrap()
    };

    // No client certificate: storescp refuses the handshake.
    assert_eq!(outbox(d.clone()).deliver_due().await.unwrap(), 3);
    assert_eq!(states(&db).await, vec![DeliveryState::Pending; 3]);
    assert_eq!(scp.files(), 0);

    let tls = d.tls.as_mut().unwrap();
    tls.certificate = pki.client_cert.clone();
    tls.private_key = pki.client_key.clone();
    let outbox = outbox(d);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while states(&db).await.iter().any(|s| *s != DeliveryState::Sent) {
        assert!(std::time::Instant::now() < deadline, "not delivered");
        outbox.deliver_due().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(scp.files(), 3, "each object exactly once, over TLS");
}
