//! Load: 16 associations each sending 500 small instances and 2 sending
//! full-field mammograms, at once, against the node binary: zero failures,
//! every instance indexed, the node's peak memory bounded, and associations
//! beyond the configured limit refused cleanly.

use crate::common;

use std::path::{Path, PathBuf};

use common::*;
use dicom_core::{DataElement, PrimitiveValue, VR, dicom_value};
use dicom_dictionary_std::tags;
use her2map::dimse::client::{ClientError, ClientOptions, ScuAssociation};
use her2map::send::send_files;

/// A full-field mammogram (3328 x 4084, 16 bit: 27 MB) built from the
/// synthetic patient's small one.
fn full_field_mammogram(dir: &Path, i: usize) -> PathBuf {
    let mut obj = dicom_object::open_file(test_data("synth-patient/MG/MG_LCC.dcm")).unwrap();
    let (rows, cols) = (4084u16, 3328u16);
    let mut pixels = vec![0u8; rows as usize * cols as usize * 2];
    for (k, p) in pixels.chunks_exact_mut(2).enumerate() {
        let v = ((k % cols as usize) as u16).wrapping_mul(3) & 0x0FFF;
        p.copy_from_slice(&v.to_le_bytes());
    }
    let uid = format!("2.25.{}{}", 77_000 + i, std::process::id());
    obj.put(DataElement::new(
        tags::SOP_INSTANCE_UID,
        VR::UI,
        PrimitiveValue::from(uid.as_str()),
    ));
    obj.update_meta(|m| m.media_storage_sop_instance_uid = uid.clone());
    obj.put(DataElement::new(
        tags::ROWS,
        VR::US,
        dicom_value!(U16, [rows]),
    ));
    obj.put(DataElement::new(
        tags::COLUMNS,
        VR::US,
        dicom_value!(U16, [cols]),
    ));
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::from(pixels),
    ));
    let path = dir.join(format!("mg-full-{i}.dcm"));
    obj.write_to_file(&path).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn sixteen_small_and_two_large_senders_at_once() {
    let data = tempfile::tempdir().unwrap();
    let files_dir = tempfile::tempdir().unwrap();
    let small: Vec<Vec<PathBuf>> = (0..16)
        .map(|a| mr_variants(files_dir.path(), 500, &format!("load{a}")))
        .collect();
    let large: Vec<PathBuf> = (0..2)
        .map(|i| full_field_mammogram(files_dir.path(), i))
        .collect();
    let large_bytes: u64 = large
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();

    let (mut child, port) = serve_binary(
        data.path(),
        &[],
        &[
            ("HER2MAP__DICOM__MAX_ASSOCIATIONS", "18"),
            // Ingest only: the cases never become stable during the test.
            ("HER2MAP__CASES__STABLE_AGE_SECS", "86400"),
            ("RUST_LOG", "info"),
        ],
    );
    let addr = format!("127.0.0.1:{port}");
    let opts = ClientOptions {
        calling_ae: "LOAD".into(),
        called_ae: "HER2MAP".into(),
        ..Default::default()
    };
    let contexts = [(
        her2map::dimse::sop::VERIFICATION.to_string(),
        her2map::dimse::sop::IMPLICIT_VR_LE.to_string(),
    )];
    let db = her2map::db::Db::connect(&format!(
        "sqlite://{}",
        data.path().join("her2map.db").display()
    ))
    .await
    .unwrap();
    let opened = || {
        let db = db.clone();
        async move {
            db.events(0, Some("association_opened"), 100_000)
                .await
                .unwrap()
                .len()
        }
    };
    // The 16 small senders start; two slots are held by idle associations
    // of the test until all 18 are open, so that a 19th can be shown to be
    // refused (transient), not queued, before the two large senders take
    // those slots.
    let mut tasks = Vec::new();
    for files in small {
        let (addr, opts) = (addr.clone(), opts.clone());
        tasks.push(tokio::spawn(async move {
            send_files(&addr, &opts, &files, |_| {}).await
        }));
    }
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(
            ScuAssociation::connect(&addr, &opts, &contexts)
                .await
                .expect("a free slot"),
        );
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while opened().await < 18 {
        assert!(
            std::time::Instant::now() < deadline,
            "the 18 associations never got in"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    match ScuAssociation::connect(&addr, &opts, &contexts).await {
        Err(ClientError::Rejected {
            permanent: false, ..
        }) => {}
        Err(e) => panic!("the 19th association: expected a transient rejection, got {e}"),
        Ok(_) => panic!("a 19th association was accepted while 18 were open"),
    }
    for a in held {
        a.release().await;
    }
    // Their slots are free once the node has closed them.
    while db
        .events(0, Some("association_closed"), 100_000)
        .await
        .unwrap()
        .len()
        < 2
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    for path in &large {
        let (addr, opts, files) = (addr.clone(), opts.clone(), vec![path.clone()]);
        tasks.push(tokio::spawn(async move {
            send_files(&addr, &opts, &files, |_| {}).await
        }));
    }
    let mut failures = 0;
    let mut sent = 0;
    for t in tasks {
        let results = t.await.unwrap().expect("association");
        failures += results.iter().filter(|r| !r.ok()).count();
        sent += results.len();
    }
    assert_eq!(sent, 16 * 500 + 2);
    assert_eq!(failures, 0);
    let peak_mib = vm_hwm_mib(child.id());
    child.kill().unwrap();
    child.wait().unwrap();

    let db = her2map::db::Db::connect(&format!(
        "sqlite://{}",
        data.path().join("her2map.db").display()
    ))
    .await
    .unwrap();
    assert_eq!(db.instance_count().await.unwrap(), 16 * 500 + 2);
    // The data sets are streamed to disk, never held whole: the node's peak
    // stays far below even one copy of everything in flight.
    eprintln!(
        "load: {sent} instances ({} MB of mammograms), peak RSS of the node {peak_mib} MiB",
        large_bytes >> 20
    );
    assert!(peak_mib < 512, "peak RSS {peak_mib} MiB");
}

fn vm_hwm_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<u64>().ok())
        .map(|k| k / 1024)
        .unwrap()
}
