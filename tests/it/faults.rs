//! Faults: kill -9 under load, a full disk, file permissions.

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use her2map::db::{CaseState, Db, DeliveryState};
use her2map::dimse::client::ClientOptions;
use her2map::dimse::command::status;
use her2map::send::send_files;

fn scu() -> ClientOptions {
    ClientOptions {
        calling_ae: "LOADSCU".into(),
        called_ae: "HER2MAP".into(),
        ..Default::default()
    }
}

/// kill -9 while 8 associations send, ten times at random moments: every
/// instance that got Success is on disk (byte-identical) and in the
/// database; no file in the spool is partial.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_under_load_loses_no_acknowledged_instance() {
    let data = tempfile::tempdir().unwrap();
    let files_dir = tempfile::tempdir().unwrap();
    let mut sources: HashMap<String, PathBuf> = HashMap::new();
    let acked: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    for round in 0..10 {
        let (mut child, port) = serve_binary(data.path(), &[], &[]);
        let addr = format!("127.0.0.1:{port}");
        let mut tasks = Vec::new();
        for a in 0..8 {
            let files = mr_variants(files_dir.path(), 25, &format!("k{round}a{a}"));
            for f in &files {
                let h = her2map::part10::Part10Header::read(f).unwrap();
                sources.insert(h.sop_instance_uid, f.clone());
            }
            let (addr, acked) = (addr.clone(), acked.clone());
            tasks.push(tokio::spawn(async move {
                let _ = send_files(&addr, &scu(), &files, |r| {
                    if r.status == Some(status::SUCCESS) {
                        acked.lock().unwrap().push(r.sop_instance_uid.clone());
                    }
                })
                .await;
            }));
        }
        let delay = 100 + (rand::random::<u64>() % 500);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        for t in tasks {
            let _ = t.await;
        }
    }
    let acked = acked.lock().unwrap().clone();
    assert!(!acked.is_empty());

    let db = Db::connect(&format!(
        "sqlite://{}",
        data.path().join("her2map.db").display()
    ))
    .await
    .unwrap();
    let spool = data.path().join("spool");
    for uid in &acked {
        let rel = db
            .instance_path(uid)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("acknowledged {uid} not indexed"));
        assert_eq!(
            dataset_bytes(&spool.join(rel)),
            dataset_bytes(&sources[uid]),
            "{uid} differs"
        );
    }
    // Every placed file (rows or crash orphans) is a whole instance.
    let mut checked = 0;
    for entry in walkdir::WalkDir::new(&spool).into_iter().flatten() {
        let p = entry.path();
        if entry.file_type().is_file() && !p.starts_with(spool.join("tmp")) {
            let h = her2map::part10::Part10Header::read(p).unwrap();
            assert_eq!(
                dataset_bytes(p),
                dataset_bytes(&sources[&h.sop_instance_uid]),
                "partial file {p:?}"
            );
            checked += 1;
        }
    }
    assert!(checked >= acked.len());
    eprintln!(
        "{} acknowledged, {checked} files checked over 10 kills",
        acked.len()
    );
}

/// A full disk: 0xA700, no partial file, no row; accepted again once space
/// returns, without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_answers_out_of_resources_and_recovers() {
    let data = tempfile::tempdir().unwrap();
    let files_dir = tempfile::tempdir().unwrap();
    let free = fs4::available_space(data.path()).unwrap();
    // "Full" = below a minimum just under today's free space; a filler file
    // crosses it, deleting the filler brings the space back.
    let margin: u64 = 512 << 20;
    assert!(
        free > 3 * margin,
        "test needs {} MB free",
        (3 * margin) >> 20
    );
    let mut s = test_settings(data.path());
    s.storage.min_free_mb = (free - margin) >> 20;
    let app = spawn_app_with(s).await;
    let files = mr_variants(files_dir.path(), 2, "full");

    let filler = data.path().join("filler");
    let f = std::fs::File::create(&filler).unwrap();
    fs4::fs_std::FileExt::allocate(&f, 2 * margin).unwrap();
    drop(f);
    let r = send_files(&app.address(), &scu(), &files[..1], |_| {})
        .await
        .unwrap();
    assert_eq!(r[0].status, Some(status::OUT_OF_RESOURCES), "{r:?}");
    assert_eq!(app.db.instance_count().await.unwrap(), 0);
    assert_eq!(app.temp_files(), 0);

    std::fs::remove_file(&filler).unwrap();
    let r = send_files(&app.address(), &scu(), &files, |_| {})
        .await
        .unwrap();
    assert!(r.iter().all(|r| r.ok()), "{r:?}");
    assert_eq!(app.db.instance_count().await.unwrap(), 2);
    app.stop().await;
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn spool_and_database_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("node");
    let app = spawn_app(&data_dir).await;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data_dir), 0o700);
    assert_eq!(mode(&data_dir.join("spool")), 0o700);
    assert_eq!(mode(&data_dir.join("her2map.db")), 0o600);
    app.stop().await;
}

/// kill -9 during inference and during delivery: after a restart the case
/// resumes and the destination ends with each output exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_inference_and_delivery_resumes_without_duplicates() {
    for stage in ["running", "delivering"] {
        let dest_dir = tempfile::tempdir().unwrap();
        let destination = spawn_app(dest_dir.path()).await;
        let data = tempfile::tempdir().unwrap();
        let conf = data.path().join("node.toml");
        std::fs::write(
            &conf,
            format!(
                "[[destinations]]\nae_title = \"HER2MAP\"\nhost = \"127.0.0.1\"\nport = {}\n\
                 [outbox]\nretry_base_ms = 100\nretry_max_ms = 1000\nmax_attempts = 50\ntimeout_secs = 5\n",
                destination.port()
            ),
        )
        .unwrap();
        let start = || {
            serve_binary(
                data.path(),
                &["--config".as_ref(), conf.as_os_str()],
                &[("HER2MAP__CASES__STABLE_AGE_SECS", "1")],
            )
        };
        let (mut child, port) = start();
        let files = her2map::send::collect_files(&[test_data("synth-patient")])
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
            .collect::<Vec<_>>();
        let r = send_files(&format!("127.0.0.1:{port}"), &scu(), &files, |_| {})
            .await
            .unwrap();
        assert!(r.iter().all(|r| r.ok()));
        let db = Db::connect(&format!(
            "sqlite://{}",
            data.path().join("her2map.db").display()
        ))
        .await
        .unwrap();
        // Wait for the moment, then SIGKILL.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let cases = db.all_cases().await.unwrap();
            let outbox = db.outbox().await.unwrap();
            let hit = match stage {
                "running" => cases.iter().any(|c| c.state == CaseState::Running),
                // Mid-delivery: the destination has stored some of the
                // outputs but not all (the association is open), or the
                // node has recorded some as sent but not all. The first is
                // the wider window: the outbox records its results after
                // the association, so the second lasts a few writes only.
                _ => {
                    let received = destination.db.instance_count().await.unwrap() as usize;
                    (received > 0 && received < outbox.len())
                        || (outbox.iter().any(|o| o.state == DeliveryState::Sent)
                            && outbox.iter().any(|o| o.state == DeliveryState::Pending))
                }
            };
            if hit {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never reached {stage}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        child.kill().unwrap();
        child.wait().unwrap();

        let (mut child, _) = start();
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            let done = db
                .all_cases()
                .await
                .unwrap()
                .iter()
                .all(|c| c.state == CaseState::Done);
            let outbox = db.outbox().await.unwrap();
            if done && !outbox.is_empty() && outbox.iter().all(|o| o.state == DeliveryState::Sent) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{stage}: did not resume"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let case = &db.all_cases().await.unwrap()[0];
        let mut ours: Vec<String> = db
            .case_outputs(&case.id)
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.sop_instance_uid)
            .collect();
        ours.sort();
        let mut there: Vec<String> = destination
            .db
            .instance_paths()
            .await
            .unwrap()
            .into_iter()
            .map(|(u, _)| u)
            .collect();
        there.sort();
        assert_eq!(
            there, ours,
            "{stage}: the destination holds exactly the case's outputs"
        );
        let results = db.events(0, Some("case_result"), 10).await.unwrap();
        assert!(!results.is_empty());
        // A rerun after a kill during inference makes the same objects (same
        // UIDs), never a second set.
        assert!(ours.len() >= 5, "{ours:?}");
        destination.stop().await;
    }
}

/// The database locked by another process: 0xA700 (for one association and
/// for several at once), no file left in the spool, no row; accepted again
/// once the lock goes.
#[tokio::test(flavor = "multi_thread")]
async fn a_locked_database_answers_out_of_resources_and_recovers() {
    use sqlx::Connection;
    let data = tempfile::tempdir().unwrap();
    let files_dir = tempfile::tempdir().unwrap();
    let mut s = test_settings(data.path());
    s.database.busy_timeout_ms = 200;
    let app = spawn_app_with(s).await;
    let files = mr_variants(files_dir.path(), 5, "locked");

    let url = format!("sqlite://{}", data.path().join("her2map.db").display());
    let mut other = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut other)
        .await
        .unwrap();
    let r = send_files(&app.address(), &scu(), &files[..1], |_| {})
        .await
        .unwrap();
    assert_eq!(r[0].status, Some(status::OUT_OF_RESOURCES), "{r:?}");
    // Four associations at once: their rows wait together behind the
    // first, so the group commit fails a batch of several, each answered.
    let sends: Vec<_> = files[1..]
        .iter()
        .map(|f| {
            let (addr, f) = (app.address(), f.clone());
            tokio::spawn(async move { send_files(&addr, &scu(), &[f], |_| {}).await.unwrap() })
        })
        .collect();
    for send in sends {
        let r = send.await.unwrap();
        assert_eq!(r[0].status, Some(status::OUT_OF_RESOURCES), "{r:?}");
    }
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    drop(other);

    assert_eq!(app.db.instance_count().await.unwrap(), 0);
    assert_eq!(app.temp_files(), 0);
    let placed = walkdir::WalkDir::new(app.spool())
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .count();
    assert_eq!(placed, 0, "no file without its row");
    let r = send_files(&app.address(), &scu(), &files, |_| {})
        .await
        .unwrap();
    assert!(r.iter().all(|r| r.ok()), "{r:?}");
    assert_eq!(app.db.instance_count().await.unwrap(), 5);
    app.stop().await;
}
