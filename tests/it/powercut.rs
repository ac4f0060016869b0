//! Power cuts (issue 19 §2): `her2map serve` runs under the LD_PRELOAD shim
//! of test-data/powercut, which records what each fsync/fdatasync made
//! durable and SIGKILLs the node after its Nth durability-relevant call. The
//! test rebuilds a data folder holding only that (each folder's entries as of
//! its last fsync, each file's content as of its last fsync), restarts the
//! node on it and checks that nothing acknowledged was lost. The model and
//! its limits are in test-data/powercut/README.md.

use crate::common;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use common::*;
use her2map::db::Db;
use her2map::dimse::client::ClientOptions;
use her2map::dimse::command::status;
use her2map::send::send_files;

fn scu() -> ClientOptions {
    ClientOptions {
        calling_ae: "PCUTSCU".into(),
        called_ae: "HER2MAP".into(),
        ..Default::default()
    }
}

/// Compile the shim into `dir` (a missing C compiler fails the test).
fn build_shim(dir: &Path) -> PathBuf {
    let out = dir.join("shim.so");
    let st = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&out)
        .arg(test_data("powercut/shim.c"))
        .arg("-ldl")
        .status()
        .expect("cc must be installed to build the power-cut shim");
    assert!(st.success(), "building the shim failed");
    out
}

/// The synthetic patient, in two lists sent side by side (the MR series
/// split across both, so two associations place into the same new folders).
fn patient_files() -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut files: Vec<PathBuf> = walkdir::WalkDir::new(test_data("synth-patient"))
        .into_iter()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "dcm"))
        .map(|e| e.into_path())
        .collect();
    files.sort();
    let (a, b): (Vec<_>, Vec<_>) = files.into_iter().enumerate().partition(|(i, _)| i % 2 == 0);
    (
        a.into_iter().map(|(_, f)| f).collect(),
        b.into_iter().map(|(_, f)| f).collect(),
    )
}

struct Recorded {
    /// SOP Instance UIDs answered Success before the cut.
    acked: Vec<String>,
    /// Durability-relevant calls the shim counted.
    calls: usize,
    /// The node listened before the cut.
    listened: bool,
}

/// One run under the shim with the cut after call `cut` (0: none; the node
/// is then SIGKILLed once the patient is sent, as a cut at the end).
async fn record(shim: &Path, root: &Path, shadow: &Path, cut: usize) -> Recorded {
    std::fs::create_dir_all(root).unwrap();
    for d in ["files", "dirs"] {
        std::fs::create_dir_all(shadow.join(d)).unwrap();
    }
    let cut_s = cut.to_string();
    let env = [
        ("LD_PRELOAD", shim.to_str().unwrap()),
        ("POWERCUT_ROOT", root.to_str().unwrap()),
        ("POWERCUT_SHADOW", shadow.to_str().unwrap()),
        ("POWERCUT_CUT", cut_s.as_str()),
    ];
    let (mut child, port) = try_serve_binary(root, &[], &env);
    let acked = Arc::new(Mutex::new(Vec::new()));
    if let Some(port) = port {
        let addr = format!("127.0.0.1:{port}");
        let (a, b) = patient_files();
        let mut tasks = Vec::new();
        for files in [a, b] {
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
        for t in tasks {
            t.await.unwrap();
        }
    }
    let _ = child.kill();
    child.wait().unwrap();
    let log = std::fs::read_to_string(shadow.join("log")).unwrap_or_default();
    let calls = log.lines().filter(|l| !l.contains(" CUT ")).count();
    let acked = acked.lock().unwrap().clone();
    Recorded {
        acked,
        calls,
        listened: port.is_some(),
    }
}

/// Build at `out` the folder `ino` as the shim last saw it fsync'd: a
/// folder never fsync'd is empty, a file never fsync'd is empty.
fn rebuild(shadow: &Path, ino: u64, out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    let Ok(listing) = std::fs::read_to_string(shadow.join("dirs").join(ino.to_string())) else {
        return;
    };
    for line in listing.lines() {
        let mut parts = line.splitn(3, ' ');
        let (kind, ino, name) = (
            parts.next().unwrap(),
            parts.next().unwrap().parse::<u64>().unwrap(),
            parts.next().unwrap(),
        );
        let target = out.join(name);
        match kind {
            "d" => rebuild(shadow, ino, &target),
            _ => {
                let content = shadow.join("files").join(ino.to_string());
                if content.exists() {
                    std::fs::copy(&content, &target).unwrap();
                } else {
                    std::fs::write(&target, b"").unwrap();
                }
            }
        }
    }
}

/// The data set of a stored file, or a panic naming the cut and the file.
fn stored_dataset(cut: usize, what: &str, p: &Path) -> Vec<u8> {
    let h = her2map::part10::Part10Header::read(p).unwrap_or_else(|e| {
        let len = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        panic!("cut {cut}: {what} {p:?} ({len} bytes) is not a whole instance: {e}")
    });
    std::fs::read(p).unwrap()[h.dataset_offset as usize..].to_vec()
}

/// What one cut found, for the report.
#[derive(Debug)]
struct Found {
    cut: usize,
    acked: usize,
    indexed: usize,
    listened: bool,
}

/// Restart the node on the rebuilt folder and check it: it serves again,
/// every acknowledged instance is indexed and whole, every indexed row and
/// every placed file is a whole instance, and tmp/ is left empty.
async fn check_after_cut(
    data: &Path,
    rec: &Recorded,
    sources: &HashMap<String, PathBuf>,
    fresh: &Path,
    cut: usize,
) -> Found {
    let (mut child, port) = try_serve_binary(data, &[], &[]);
    let port = port.unwrap_or_else(|| panic!("cut {cut}: the node does not start again"));
    let r = send_files(
        &format!("127.0.0.1:{port}"),
        &scu(),
        &[fresh.into()],
        |_| {},
    )
    .await
    .unwrap_or_else(|e| panic!("cut {cut}: the restarted node does not serve: {e}"));
    assert!(r[0].ok(), "cut {cut}: store after restart: {r:?}");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success(), "cut {cut}: clean stop");

    let db = Db::connect(&format!("sqlite://{}", data.join("her2map.db").display()))
        .await
        .unwrap_or_else(|e| panic!("cut {cut}: database does not open: {e}"));
    let spool = data.join("spool");
    let source_of = |uid: &str| -> PathBuf {
        sources
            .get(uid)
            .cloned()
            .unwrap_or_else(|| fresh.to_path_buf())
    };
    for uid in &rec.acked {
        let rel = db
            .instance_path(uid)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("cut {cut}: acknowledged {uid} not indexed"));
        let file = spool.join(&rel);
        assert!(
            file.is_file(),
            "cut {cut}: acknowledged {uid}: {rel} missing"
        );
        assert_eq!(
            stored_dataset(cut, "acknowledged", &file),
            dataset_bytes(&source_of(uid)),
            "cut {cut}: acknowledged {uid} differs on disk"
        );
    }
    let rows = db.instance_paths().await.unwrap();
    for (uid, rel) in &rows {
        assert!(
            !rel.starts_with("tmp"),
            "cut {cut}: a temporary file is indexed: {rel}"
        );
        let file = spool.join(rel);
        assert!(file.is_file(), "cut {cut}: indexed {uid}: {rel} missing");
        assert_eq!(
            stored_dataset(cut, "indexed", &file),
            dataset_bytes(&source_of(uid)),
            "cut {cut}: indexed {uid} is not whole"
        );
    }
    db.close().await;
    // Placed files without a row (a cut between link and commit) may stay,
    // but each must be whole; the node's restart emptied tmp/.
    for entry in walkdir::WalkDir::new(&spool).into_iter().flatten() {
        let p = entry.path();
        if !entry.file_type().is_file() {
            continue;
        }
        assert!(
            !p.starts_with(spool.join("tmp")),
            "cut {cut}: temporary file left: {p:?}"
        );
        let data = stored_dataset(cut, "placed", p);
        let h = her2map::part10::Part10Header::read(p).unwrap();
        assert_eq!(
            data,
            dataset_bytes(&source_of(&h.sop_instance_uid)),
            "cut {cut}: partial file {p:?}"
        );
    }
    Found {
        cut,
        acked: rec.acked.len(),
        indexed: rows.len(),
        listened: rec.listened,
    }
}

/// Cut the power at evenly spread points over the ingest of the synthetic
/// patient (start-up and migrations included): every acknowledged instance
/// survives, the database opens and the node serves again.
/// `POWERCUT_POINTS` sets how many cuts are spread past the dense start
/// (default 12).
#[tokio::test(flavor = "multi_thread")]
async fn a_power_cut_during_ingest_loses_no_acknowledged_instance() {
    // POWERCUT_KEEP=DIR keeps the records of a failing cut there.
    let tmp = tempfile::tempdir().unwrap();
    let work = match std::env::var_os("POWERCUT_KEEP") {
        Some(d) => {
            std::fs::create_dir_all(&d).unwrap();
            PathBuf::from(d)
        }
        None => tmp.path().to_path_buf(),
    }
    .canonicalize()
    .unwrap();
    let shim = build_shim(&work);
    let mut sources = HashMap::new();
    let (a, b) = patient_files();
    for f in a.iter().chain(&b) {
        let h = her2map::part10::Part10Header::read(f).unwrap();
        sources.insert(h.sop_instance_uid, f.clone());
    }
    let fresh = mr_variants(&work, 1, "pcut").remove(0);

    // A run without a cut counts the calls an ingest makes.
    let base = record(&shim, &work.join("base/data"), &work.join("base/shadow"), 0).await;
    assert_eq!(base.acked.len(), sources.len(), "the uncut run stores all");
    assert!(base.calls > 50, "the shim saw {} calls", base.calls);

    let points: usize = std::env::var("POWERCUT_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    // Dense over start-up (database creation, migrations) and the first
    // instances (new study and series folders, first commits), where each
    // kind of step happens first; then `points` spread to past the end.
    let mut cuts: Vec<usize> = (1..=3).chain((4..=60).step_by(3)).collect();
    for i in 1..=points {
        cuts.push(60 + i * (base.calls + 5).saturating_sub(60) / points);
    }
    cuts.sort();
    cuts.dedup();
    let mut found = Vec::new();
    for &cut in &cuts {
        let dir = work.join(format!("cut{cut}"));
        let root = dir.join("data");
        let shadow = dir.join("shadow");
        let rec = record(&shim, &root, &shadow, cut).await;
        let root_ino = std::fs::metadata(&root).unwrap().ino();
        let rebuilt = dir.join("rebuilt");
        rebuild(&shadow, root_ino, &rebuilt);
        found.push(check_after_cut(&rebuilt, &rec, &sources, &fresh, cut).await);
        // The rebuilt folder has been checked; keep the disk small.
        let _ = std::fs::remove_dir_all(&dir);
    }
    for f in &found {
        eprintln!(
            "cut after call {:>4}: listened {}, {:>2} acknowledged, {:>2} indexed after restart",
            f.cut, f.listened, f.acked, f.indexed
        );
    }
    eprintln!(
        "{} cut points over {} durability calls; every acknowledged instance survived",
        found.len(),
        base.calls
    );
}

/// A folder that exists is not thereby durable: one left by a kill -9
/// between its mkdir and the fsyncs of its parents (or one another
/// association has just created) is in the page cache only. The instance
/// stored into it, once acknowledged, must survive a power cut.
#[tokio::test(flavor = "multi_thread")]
async fn an_instance_in_a_folder_not_yet_durable_survives_a_power_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().canonicalize().unwrap();
    let shim = build_shim(&work);
    let file = mr_variants(&work, 1, "pcdir").remove(0);
    let obj = dicom_object::open_file(&file).unwrap();
    let uid = |t| obj.element(t).unwrap().to_str().unwrap().to_string();
    let rel = her2map::spool::Spool::relative_path(
        &uid(dicom_dictionary_std::tags::STUDY_INSTANCE_UID),
        &uid(dicom_dictionary_std::tags::SERIES_INSTANCE_UID),
        &uid(dicom_dictionary_std::tags::SOP_INSTANCE_UID),
    );
    let root = work.join("data");
    let shadow = work.join("shadow");
    for d in ["files", "dirs"] {
        std::fs::create_dir_all(shadow.join(d)).unwrap();
    }
    // The study and series folders, made (and never fsync'd) as by a run
    // killed just after its mkdir.
    std::fs::create_dir_all(root.join("spool").join(rel.parent().unwrap())).unwrap();
    let env = [
        ("LD_PRELOAD", shim.to_str().unwrap()),
        ("POWERCUT_ROOT", root.to_str().unwrap()),
        ("POWERCUT_SHADOW", shadow.to_str().unwrap()),
    ];
    let (mut child, port) = serve_binary(&root, &[], &env);
    let r = send_files(
        &format!("127.0.0.1:{port}"),
        &scu(),
        std::slice::from_ref(&file),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(r[0].status, Some(status::SUCCESS), "{r:?}");
    // The cut, just after the acknowledgement.
    child.kill().unwrap();
    child.wait().unwrap();
    let rebuilt = work.join("rebuilt");
    rebuild(&shadow, std::fs::metadata(&root).unwrap().ino(), &rebuilt);
    let stored = rebuilt.join("spool").join(&rel);
    assert!(stored.is_file(), "acknowledged instance lost by the cut");
    assert_eq!(
        stored_dataset(0, "acknowledged", &stored),
        dataset_bytes(&file)
    );
}

/// The harness can fail: with the fsyncs of the spool's temporary files or
/// of the database's WAL left out of the record (as if the node skipped
/// them), an instance answered Success is lost in the rebuilt folder.
#[tokio::test(flavor = "multi_thread")]
async fn the_harness_catches_a_missing_fsync() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().canonicalize().unwrap();
    let shim = build_shim(&work);
    let files = mr_variants(&work, 2, "pcneg");
    for (case, ignore) in ["part", "wal"].into_iter().enumerate() {
        let root = work.join(format!("data{case}"));
        let shadow = work.join(format!("shadow{case}"));
        for d in ["files", "dirs"] {
            std::fs::create_dir_all(shadow.join(d)).unwrap();
        }
        std::fs::create_dir_all(&root).unwrap();
        let env = [
            ("LD_PRELOAD", shim.to_str().unwrap()),
            ("POWERCUT_ROOT", root.to_str().unwrap()),
            ("POWERCUT_SHADOW", shadow.to_str().unwrap()),
            ("POWERCUT_IGNORE", ignore),
        ];
        let (mut child, port) = serve_binary(&root, &[], &env);
        let r = send_files(&format!("127.0.0.1:{port}"), &scu(), &files, |_| {})
            .await
            .unwrap();
        assert!(r.iter().all(|r| r.status == Some(status::SUCCESS)), "{r:?}");
        child.kill().unwrap();
        child.wait().unwrap();
        let rebuilt = work.join(format!("rebuilt{case}"));
        rebuild(&shadow, std::fs::metadata(&root).unwrap().ino(), &rebuilt);
        let db = Db::connect(&format!(
            "sqlite://{}",
            rebuilt.join("her2map.db").display()
        ))
        .await
        .unwrap();
        let mut whole = 0;
        for r in &r {
            if let Some(rel) = db.instance_path(&r.sop_instance_uid).await.unwrap() {
                let p = rebuilt.join("spool").join(rel);
                whole += usize::from(her2map::part10::Part10Header::read(&p).is_ok());
            }
        }
        db.close().await;
        assert_eq!(whole, 0, "without the {ignore} fsyncs nothing may survive");
    }
}
