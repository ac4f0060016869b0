//! The Storage SCP against real peers: DCMTK's echoscu/storescu/dcmsend and
//! the node's own SCU.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use dicom_ul::association::client::ClientAssociationOptions;
use dicom_ul::pdu::{PDataValue, PDataValueType, Pdu};
use her2map::config::PeerSettings;
use her2map::dimse::client::{ClientError, ClientOptions, ScuAssociation};
use her2map::dimse::command::{self, status};
use her2map::send::send_files;

const MR: &str = "1.2.840.10008.5.1.4.1.1.4";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

fn scu(called: &str) -> ClientOptions {
    ClientOptions {
        calling_ae: "TESTSCU".into(),
        called_ae: called.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn echoscu_gets_success() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let (ok, out) = dcmtk(
        "echoscu",
        vec![
            "-aec".into(),
            "HER2MAP".into(),
            "127.0.0.1".into(),
            app.port().to_string(),
        ],
    )
    .await;
    assert!(ok, "{out}");
    let status = her2map::dimse::client::echo(&app.address(), &scu("HER2MAP"))
        .await
        .unwrap();
    assert_eq!(status.code, 0);
    app.stop().await;
}

/// Every accepted transfer syntax is accepted from DCMTK's dcmsend, and
/// stored exactly as received (byte for byte from the node's own SCU, which
/// streams the file's data set unchanged), with a file meta group naming it.
#[tokio::test(flavor = "multi_thread")]
async fn every_transfer_syntax_is_stored_as_received() {
    let files = [
        ("MR_small.dcm", "1.2.840.10008.1.2.1"),
        ("MR_small_implicit.dcm", "1.2.840.10008.1.2"),
        ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2"),
        ("image_dfl.dcm", "1.2.840.10008.1.2.1.99"),
        ("SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.4.50"),
        ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51"),
        ("MR_small_jpeg_lossless14.dcm", "1.2.840.10008.1.2.4.57"),
        ("MR_small_jpeg_sv1.dcm", "1.2.840.10008.1.2.4.70"),
        ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80"),
        ("JPEGLSNearLossless_16.dcm", "1.2.840.10008.1.2.4.81"),
        ("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90"),
        ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91"),
        ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5"),
    ];
    for (name, ts) in files {
        // The MR_small variants share one SOP Instance UID: a fresh node each.
        let dir = tempfile::tempdir().unwrap();
        let app = spawn_app(dir.path()).await;
        let source = test_data(&format!("dicom/{name}"));
        // dcmsend proposes each file's own transfer syntax.
        let (ok, out) = dcmtk(
            "dcmsend",
            vec![
                "-aec".into(),
                "HER2MAP".into(),
                "127.0.0.1".into(),
                app.port().to_string(),
                source.display().to_string(),
            ],
        )
        .await;
        assert!(ok, "{name}: {out}");
        let stored = app.db.instance_paths().await.unwrap();
        assert_eq!(stored.len(), 1, "{name}");
        let path = app.spool().join(&stored[0].1);
        let header = her2map::part10::Part10Header::read(&path).unwrap();
        let native = [
            "1.2.840.10008.1.2",
            "1.2.840.10008.1.2.1",
            "1.2.840.10008.1.2.2",
        ];
        if native.contains(&ts) {
            // DCMTK prefers Explicit VR LE for any native-encoded file.
            assert!(native.contains(&header.transfer_syntax.as_str()), "{name}");
        } else {
            assert_eq!(header.transfer_syntax, ts, "{name}");
        }
        assert_eq!(app.temp_files(), 0);
        app.stop().await;

        // DCMTK re-encodes what it sends; the node's own SCU does not.
        let dir = tempfile::tempdir().unwrap();
        let app = spawn_app(dir.path()).await;
        let results = send_files(
            &app.address(),
            &scu("HER2MAP"),
            std::slice::from_ref(&source),
            |_| {},
        )
        .await
        .unwrap();
        assert!(results[0].ok(), "{name}: {results:?}");
        let stored = app.db.instance_paths().await.unwrap();
        let path = app.spool().join(&stored[0].1);
        assert_eq!(
            her2map::part10::Part10Header::read(&path)
                .unwrap()
                .transfer_syntax,
            ts
        );
        assert!(
            dataset_bytes(&path) == dataset_bytes(&source),
            "{name}: data set changed"
        );
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn storescu_and_own_scu_store_and_duplicates_keep_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let files_dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let files = mr_variants(files_dir.path(), 3, "dup");
    let mut args = vec![
        "-aec".into(),
        "HER2MAP".into(),
        "127.0.0.1".into(),
        app.port().to_string(),
    ];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let (ok, out) = dcmtk("storescu", args).await;
    assert!(ok, "{out}");
    assert_eq!(app.db.instance_count().await.unwrap(), 3);
    let first = app.db.instance_paths().await.unwrap();
    let before = std::fs::read(app.spool().join(&first[0].1)).unwrap();

    // Same instances again, with the node's own SCU: Success, kept once.
    let results = send_files(&app.address(), &scu("HER2MAP"), &files, |_| {})
        .await
        .unwrap();
    assert!(results.iter().all(|r| r.ok()), "{results:?}");
    assert_eq!(app.db.instance_count().await.unwrap(), 3);
    assert_eq!(
        std::fs::read(app.spool().join(&first[0].1)).unwrap(),
        before
    );
    let dups = wait_events(&app.db, "instance_duplicate", 3).await;
    assert_eq!(dups.len(), 3);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_calling_ae_and_wrong_called_ae_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(dir.path());
    settings.dicom.peers = vec![
        PeerSettings {
            ae_title: "PACS".into(),
            host: Some("127.0.0.1".into()),
        },
        PeerSettings {
            ae_title: "ELSEWHERE".into(),
            host: Some("10.255.255.1".into()),
        },
    ];
    let app = spawn_app_with(settings).await;
    let port = app.port().to_string();
    let echo = |calling: &str, called: &str| {
        vec![
            "-aet".into(),
            calling.to_string(),
            "-aec".into(),
            called.to_string(),
            "127.0.0.1".into(),
            port.clone(),
        ]
    };
    let (ok, out) = dcmtk("echoscu", echo("PACS", "HER2MAP")).await;
    assert!(ok, "known peer: {out}");
    let (ok, out) = dcmtk("echoscu", echo("STRANGER", "HER2MAP")).await;
    assert!(!ok, "unknown calling AE must be rejected: {out}");
    assert!(out.contains("Calling AE Title Not Recognized"), "{out}");
    // Known AE title, wrong host.
    let (ok, _) = dcmtk("echoscu", echo("ELSEWHERE", "HER2MAP")).await;
    assert!(!ok);
    let (ok, out) = dcmtk("echoscu", echo("PACS", "NOT-ME")).await;
    assert!(!ok, "{out}");
    assert!(out.contains("Called AE Title Not Recognized"), "{out}");
    let rejected = wait_events(&app.db, "association_rejected", 3).await;
    assert_eq!(rejected.len(), 3, "{rejected:?}");
    let reasons: Vec<String> = rejected
        .iter()
        .map(|e| e.detail.as_ref().unwrap()["reason"].to_string())
        .collect();
    assert!(
        reasons[0].contains("calling AE title not recognized"),
        "{reasons:?}"
    );
    assert!(
        reasons[2].contains("called AE title not recognized"),
        "{reasons:?}"
    );
    assert_eq!(
        rejected[0].detail.as_ref().unwrap()["calling_ae"],
        "STRANGER"
    );
    // The associations list (console, API) shows them, with their outcome,
    // each tied to its event.
    let listed = app.db.recent_associations(50, 0).await.unwrap();
    let refused: Vec<_> = listed
        .iter()
        .filter(|a| {
            a.outcome
                .as_deref()
                .is_some_and(|o| o.starts_with("rejected: "))
        })
        .collect();
    assert_eq!(refused.len(), 3, "{listed:?}");
    assert!(refused.iter().any(|a| {
        a.calling_ae == "STRANGER"
            && a.outcome
                .as_deref()
                .unwrap()
                .contains("calling AE title not recognized")
    }));
    for e in &rejected {
        let id = e
            .association_id
            .as_deref()
            .expect("the event names its row");
        assert!(refused.iter().any(|a| a.id == id), "{id} not listed");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sop_class_not_accepted_is_refused_at_negotiation() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let ct = test_data("dicom/CT_small.dcm");
    let (ok, out) = dcmtk(
        "storescu",
        vec![
            "-aec".into(),
            "HER2MAP".into(),
            "127.0.0.1".into(),
            app.port().to_string(),
            ct.display().to_string(),
        ],
    )
    .await;
    assert!(!ok, "{out}");
    assert!(out.contains("No presentation context"), "{out}");
    assert_eq!(app.db.instance_count().await.unwrap(), 0);
    app.stop().await;

    // accept_any_storage opens the door.
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(dir.path());
    settings.dicom.accept_any_storage = true;
    let app = spawn_app_with(settings).await;
    let results = send_files(&app.address(), &scu("HER2MAP"), &[ct], |_| {})
        .await
        .unwrap();
    assert!(results[0].ok(), "{results:?}");
    assert_eq!(app.db.instance_count().await.unwrap(), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mismatched_uids_and_unparseable_data_sets_get_failure_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let source = test_data("dicom/MR_small.dcm");
    let contexts = [(MR.to_string(), EXPLICIT_LE.to_string())];
    let mut assoc = ScuAssociation::connect(&app.address(), &scu("HER2MAP"), &contexts)
        .await
        .unwrap();
    let pc = assoc.context_for(MR, EXPLICIT_LE).unwrap();

    // Command names another instance than the data set holds.
    let bytes = dataset_bytes(&source);
    let s = assoc
        .store(pc, MR, "1.2.3.4.5.6.7", &mut &bytes[..])
        .await
        .unwrap();
    assert_eq!(s.code, status::DATA_SET_DOES_NOT_MATCH, "{s:?}");

    // Data sets that do not parse: an element longer than the data set,
    // and bytes that hold no element the node can use.
    let mut truncated = vec![0x08, 0x00, 0x16, 0x00, b'U', b'I', 0xFF, 0x7F];
    truncated.extend_from_slice(b"1.2.840.10008");
    let s = assoc
        .store(pc, MR, "1.2.3.4.5.6.8", &mut &truncated[..])
        .await
        .unwrap();
    assert_eq!(s.code, status::CANNOT_UNDERSTAND, "{s:?}");
    let garbage = vec![0xFFu8; 1000];
    let s = assoc
        .store(pc, MR, "1.2.3.4.5.6.9", &mut &garbage[..])
        .await
        .unwrap();
    assert_eq!(s.code, status::CANNOT_UNDERSTAND, "{s:?}");

    // The association keeps serving: the real instance is stored.
    let real_uid = her2map::part10::Part10Header::read(&source)
        .unwrap()
        .sop_instance_uid;
    let s = assoc
        .store(pc, MR, &real_uid, &mut &bytes[..])
        .await
        .unwrap();
    assert_eq!(s.code, status::SUCCESS, "{s:?}");
    assoc.release().await;

    assert_eq!(app.db.instance_count().await.unwrap(), 1);
    let failed = app.db.events(0, Some("instance_failed"), 10).await.unwrap();
    let statuses: Vec<_> = failed.iter().map(|e| e.status).collect();
    assert_eq!(statuses, vec![Some(0xA900), Some(0xC000), Some(0xC000)]);
    assert_eq!(app.temp_files(), 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn aborted_association_leaves_no_partial_file_and_no_row() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let source = test_data("dicom/MR_small.dcm");
    let header = her2map::part10::Part10Header::read(&source).unwrap();
    let bytes = dataset_bytes(&source);

    let mut assoc = ClientAssociationOptions::new()
        .calling_ae_title("TESTSCU")
        .called_ae_title("HER2MAP")
        .with_presentation_context(MR, vec![EXPLICIT_LE])
        .establish_async(app.address())
        .await
        .unwrap();
    let pc = assoc.presentation_contexts()[0].id;
    let cmd = command::store_request(1, MR, &header.sop_instance_uid).unwrap();
    let pdv = |value_type, is_last, data: Vec<u8>| Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: pc,
            value_type,
            is_last,
            data,
        }],
    };
    assoc
        .send(&pdv(PDataValueType::Command, true, cmd))
        .await
        .unwrap();
    assoc
        .send(&pdv(PDataValueType::Data, false, bytes[..4000].to_vec()))
        .await
        .unwrap();
    // Give the node time to write the fragment, then abort mid-instance.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assoc.abort().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    assert_eq!(app.db.instance_count().await.unwrap(), 0);
    assert_eq!(app.temp_files(), 0, "partial file left behind");
    let closed = wait_events(&app.db, "association_closed", 1).await;
    assert!(
        closed[0].detail.as_ref().unwrap()["outcome"]
            .to_string()
            .contains("aborted"),
        "{closed:?}"
    );

    // The next association works.
    let results = send_files(&app.address(), &scu("HER2MAP"), &[source], |_| {})
        .await
        .unwrap();
    assert!(results[0].ok());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn eight_concurrent_associations_and_the_limit_beyond() {
    let dir = tempfile::tempdir().unwrap();
    let files_dir = tempfile::tempdir().unwrap();
    let app = spawn_app(dir.path()).await;
    let mut tasks = Vec::new();
    for a in 0..8 {
        let files = mr_variants(files_dir.path(), 10, &format!("c{a}"));
        let addr = app.address();
        tasks.push(tokio::spawn(async move {
            send_files(&addr, &scu("HER2MAP"), &files, |_| {}).await
        }));
    }
    for t in tasks {
        let results = t.await.unwrap().unwrap();
        assert!(results.iter().all(|r| r.ok()), "{results:?}");
    }
    assert_eq!(app.db.instance_count().await.unwrap(), 80);
    app.stop().await;

    // max_associations = 1: a second association is rejected, not queued.
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(dir.path());
    settings.dicom.max_associations = 1;
    let app = spawn_app_with(settings).await;
    let contexts = [(
        her2map::dimse::sop::VERIFICATION.to_string(),
        her2map::dimse::sop::IMPLICIT_VR_LE.to_string(),
    )];
    let held = ScuAssociation::connect(&app.address(), &scu("HER2MAP"), &contexts)
        .await
        .unwrap();
    match ScuAssociation::connect(&app.address(), &scu("HER2MAP"), &contexts).await {
        Err(ClientError::Rejected { permanent, .. }) => {
            assert!(!permanent, "limit rejection is transient")
        }
        Err(e) => panic!("expected a rejection, got {e}"),
        Ok(_) => panic!("expected a rejection, got an association"),
    }
    held.release().await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let status = her2map::dimse::client::echo(&app.address(), &scu("HER2MAP"))
        .await
        .unwrap();
    assert_eq!(status.code, 0, "a slot frees when the association ends");
    let rejected = wait_events(&app.db, "association_rejected", 1).await;
    assert_eq!(rejected.len(), 1);
    app.stop().await;
}

/// Stop the node in the middle of a batch: whatever was acknowledged before
/// the stop is there, byte for byte, after the restart.
#[tokio::test(flavor = "multi_thread")]
async fn restart_mid_batch_keeps_every_acknowledged_instance() {
    let dir = tempfile::tempdir().unwrap();
    let files_dir = tempfile::tempdir().unwrap();
    let files = mr_variants(files_dir.path(), 60, "restart");
    let app = spawn_app(dir.path()).await;
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let (addr, f, a, c) = (app.address(), files.clone(), acked.clone(), count.clone());
    let sender = tokio::spawn(async move {
        send_files(&addr, &scu("HER2MAP"), &f, |r| {
            if r.ok() {
                a.lock()
                    .unwrap()
                    .push((r.path.clone(), r.sop_instance_uid.clone()));
            }
            c.fetch_add(1, Ordering::SeqCst);
        })
        .await
    });
    while count.load(Ordering::SeqCst) < 15 {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    app.stop().await;
    let _ = sender.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 15 && acked.len() < 60,
        "stopped mid-batch: {} acknowledged",
        acked.len()
    );

    let app = spawn_app(dir.path()).await;
    for (path, uid) in &acked {
        let stored = app
            .db
            .instance_path(uid)
            .await
            .unwrap()
            .expect("acknowledged instance indexed");
        assert_eq!(
            dataset_bytes(&app.spool().join(stored)),
            dataset_bytes(path)
        );
    }
    assert_eq!(app.temp_files(), 0);
    // The rest of the batch can be resent; nothing is lost or doubled.
    let results = send_files(&app.address(), &scu("HER2MAP"), &files, |_| {})
        .await
        .unwrap();
    assert!(results.iter().all(|r| r.ok()));
    assert_eq!(app.db.instance_count().await.unwrap(), 60);
    app.stop().await;
}
