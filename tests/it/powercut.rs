//! Power cuts (issue 19 §2): `her2map serve` runs under the LD_PRELOAD shim
//! of test-data/powercut, which records what each fsync/fdatasync made
//! durable and SIGKILLs the node after its Nth durability-relevant call. The
//! test rebuilds a data folder holding only that (each folder's entries as of
//! its last fsync, each file's content as of its last fsync), restarts the
//! node on it and checks that nothing acknowledged was lost: over an ingest,
//! and over a case run and its delivery to storescp (the case ends done,
//! each output whole and delivered, a copy sent again only when the cut lost
//! its 'sent' mark). On PostgreSQL too (`HER2MAP_TEST_PG_URL`): the node's
//! database is then outside the shim's root. The model, the results and
//! the limits are in test-data/powercut/README.md.

use crate::common;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use common::*;
use her2map::db::{CaseState, Db, DeliveryState};
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

/// A node's process, SIGKILLed when dropped: a check that fails never
/// leaves a node running.
struct Node(std::process::Child);

impl std::ops::Deref for Node {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Node {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
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
async fn record(shim: &Path, root: &Path, shadow: &Path, ndb: &NodeDb, cut: usize) -> Recorded {
    std::fs::create_dir_all(root).unwrap();
    for d in ["files", "dirs"] {
        std::fs::create_dir_all(shadow.join(d)).unwrap();
    }
    let cut_s = cut.to_string();
    let mut env = vec![
        ("LD_PRELOAD", shim.to_str().unwrap()),
        ("POWERCUT_ROOT", root.to_str().unwrap()),
        ("POWERCUT_SHADOW", shadow.to_str().unwrap()),
        ("POWERCUT_CUT", cut_s.as_str()),
    ];
    env.extend(ndb.env());
    let (child, port) = try_serve_binary(root, &[], &env);
    let mut child = Node(child);
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
fn stored_dataset(cut: impl std::fmt::Display, what: &str, p: &Path) -> Vec<u8> {
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
    ndb: &NodeDb,
    cut: usize,
) -> Found {
    let env: Vec<_> = ndb.env().into_iter().collect();
    let (child, port) = try_serve_binary(data, &[], &env);
    let mut child = Node(child);
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
    let rows = check_spool(
        data,
        &ndb.url(data),
        &rec.acked,
        sources,
        fresh,
        &cut.to_string(),
    )
    .await;
    Found {
        cut,
        acked: rec.acked.len(),
        indexed: rows,
        listened: rec.listened,
    }
}

/// The spool and index of a stopped node's data folder after cut `cut`:
/// every acknowledged instance is indexed and byte-identical to what was
/// sent (`sources`; `fresh`: the one stored after the restart), every
/// indexed row and every placed file is a whole instance, `tmp/` is empty.
/// Returns the number of indexed instances.
async fn check_spool(
    data: &Path,
    db_url: &str,
    acked: &[String],
    sources: &HashMap<String, PathBuf>,
    fresh: &Path,
    cut: &str,
) -> usize {
    let db = Db::connect(db_url)
        .await
        .unwrap_or_else(|e| panic!("cut {cut}: database does not open: {e}"));
    let spool = data.join("spool");
    let source_of = |uid: &str| -> PathBuf {
        sources
            .get(uid)
            .cloned()
            .unwrap_or_else(|| fresh.to_path_buf())
    };
    for uid in acked {
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
    rows.len()
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
    let ndb = NodeDb::for_dir(&work.join("base"));
    let base = record(
        &shim,
        &work.join("base/data"),
        &work.join("base/shadow"),
        &ndb,
        0,
    )
    .await;
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
        let ndb = NodeDb::for_dir(&dir);
        let rec = record(&shim, &root, &shadow, &ndb, cut).await;
        let root_ino = std::fs::metadata(&root).unwrap().ino();
        let rebuilt = dir.join("rebuilt");
        rebuild(&shadow, root_ino, &rebuilt);
        found.push(check_after_cut(&rebuilt, &rec, &sources, &fresh, &ndb, cut).await);
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
    let (child, port) = serve_binary(&root, &[], &env);
    let mut child = Node(child);
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
        let (child, port) = serve_binary(&root, &[], &env);
        let mut child = Node(child);
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

// ---------------------------------------------------------------------------
// Case run and delivery: the node ingests a small patient under the shim,
// the case becomes ready, runs (imaging, inference with the demo weights,
// reporting, outputs written durably and queued) and is delivered to DCMTK
// storescp; the cut comes at the Nth call after the ingest was acknowledged.

/// The US and MG images of the synthetic patient (9 instances): with
/// `cases.required = ["US", "MG"]` a complete case, small enough that one
/// run (ingest, case run, delivery) takes a few seconds.
fn small_patient() -> Vec<PathBuf> {
    let (a, b) = patient_files();
    let mut files: Vec<PathBuf> = a
        .into_iter()
        .chain(b)
        .filter(|p| !p.components().any(|c| c.as_os_str() == "MR"))
        .collect();
    files.sort();
    files
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// DCMTK storescp as the destination: it outlives the node's cut and its
/// restart, and `+uf` writes one file per received copy, so that an object
/// received twice shows as two files with the same SOP Instance UID.
struct StoreScp {
    child: std::process::Child,
    dir: PathBuf,
    port: u16,
}

impl StoreScp {
    fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let child = Command::new(tool("storescp"))
            .args(["-aet", "DEST", "+xa", "+uf", "-od"])
            .arg(dir)
            .arg(port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("storescp (apt-get install dcmtk)");
        // Listening once a connection is taken.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "storescp does not listen"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        StoreScp {
            child,
            dir: dir.to_path_buf(),
            port,
        }
    }

    /// Copies received so far, by SOP Instance UID.
    fn received(&self) -> HashMap<String, usize> {
        let mut n = HashMap::new();
        for e in std::fs::read_dir(&self.dir).unwrap().flatten() {
            if let Ok(h) = her2map::part10::Part10Header::read(&e.path()) {
                *n.entry(h.sop_instance_uid).or_default() += 1;
            }
        }
        n
    }
}

impl Drop for StoreScp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The node's settings for the case tests: a case of US and MG is
/// complete, ready 1 s after its last instance, delivered to `dest` with
/// quick retries.
fn case_config(dir: &Path, dest: u16) -> PathBuf {
    let conf = dir.join("node.toml");
    std::fs::write(
        &conf,
        format!(
            "[cases]\nstable_age_secs = 1\nrequired = [\"US\", \"MG\"]\n\
             [[destinations]]\nae_title = \"DEST\"\nhost = \"127.0.0.1\"\nport = {dest}\n\
             [outbox]\nretry_base_ms = 100\nretry_max_ms = 1000\nmax_attempts = 50\ntimeout_secs = 5\n"
        ),
    )
    .unwrap();
    conf
}

/// The node's database in the case tests: SQLite inside the data folder
/// (under the shim, rebuilt with it), or, with `HER2MAP_TEST_PG_URL`, a
/// database of its own on that PostgreSQL server, outside the shim's root:
/// PostgreSQL keeps what it committed, and the cut loses only the node's
/// unsynced spool and output writes.
#[derive(Clone)]
struct NodeDb(Option<String>);

impl NodeDb {
    fn on_pg() -> bool {
        std::env::var("HER2MAP_TEST_PG_URL").is_ok_and(|u| !u.is_empty())
    }
    fn for_dir(dir: &Path) -> Self {
        let pg = Self::on_pg();
        // The process id in the name: a kept folder (POWERCUT_KEEP) run
        // again gets a fresh database.
        NodeDb(pg.then(|| test_database_url(dir, &format!("powercut-{}", std::process::id()))))
    }
    fn url(&self, data: &Path) -> String {
        self.0
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", data.join("her2map.db").display()))
    }
    fn env(&self) -> Option<(&'static str, &str)> {
        self.0.as_deref().map(|u| ("HER2MAP__DATABASE__URL", u))
    }
    async fn open(&self, data: &Path, cut: &str) -> Db {
        Db::connect(&self.url(data))
            .await
            .unwrap_or_else(|e| panic!("cut {cut}: database does not open: {e}"))
    }
}

/// Every case done and every delivery sent (`Ok`), a delivery dead or a
/// case failed (`Err`, why), or not yet (`None`).
async fn delivered(db: &Db) -> Option<Result<(), String>> {
    let cases = db.all_cases().await.ok()?;
    let outbox = db.outbox().await.ok()?;
    if let Some(c) = cases.iter().find(|c| c.state == CaseState::Failed) {
        return Some(Err(format!("case failed: {}", c.reason)));
    }
    if let Some(o) = outbox.iter().find(|o| o.state == DeliveryState::Dead) {
        return Some(Err(format!("{} dead: {}", o.path, o.last_status)));
    }
    let done = !cases.is_empty() && cases.iter().all(|c| c.state == CaseState::Done);
    let sent = !outbox.is_empty() && outbox.iter().all(|o| o.state == DeliveryState::Sent);
    (done && sent).then_some(Ok(()))
}

/// Poll [`delivered`] for up to `secs`; panics on a failure or timeout.
async fn wait_delivered(db: &Db, secs: u64, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        match delivered(db).await {
            Some(Ok(())) => return,
            Some(Err(e)) => panic!("{what}: {e}"),
            None => {}
        }
        if std::time::Instant::now() > deadline {
            let cases: Vec<_> = db
                .all_cases()
                .await
                .unwrap_or_default()
                .into_iter()
                .map(|c| (c.state, c.reason))
                .collect();
            let outbox: Vec<_> = db
                .outbox()
                .await
                .unwrap_or_default()
                .into_iter()
                .map(|o| (o.state, o.last_status))
                .collect();
            panic!("{what}: not delivered within {secs} s: cases {cases:?}, outbox {outbox:?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The shim's log lines after it was armed, up to the cut.
fn armed_calls(log: &str) -> Vec<&str> {
    log.lines()
        .skip_while(|l| !l.contains(" ARMED"))
        .skip(1)
        .take_while(|l| !l.contains(" CUT "))
        .collect()
}

struct CaseRecorded {
    acked: Vec<String>,
    /// The node's settings (the restart uses them too).
    conf: PathBuf,
    /// The shim's log (call number, call, path).
    log: String,
    /// The cut was reached (the shim killed the node).
    reached: bool,
}

/// Where a case run is cut.
#[derive(Clone, Copy, Debug)]
enum CutAt {
    /// Not cut: SIGKILL once the case is delivered (a cut at the end).
    End,
    /// After the shim's Nth call once the ingest was acknowledged.
    Call(usize),
    /// SIGKILLed from the test once the database shows a case running, or
    /// at least N outputs queued, or N marked sent: on PostgreSQL the node
    /// makes no file calls between writing its outputs and the end, so
    /// these moments are cut by the database's state (the rebuild still
    /// keeps only what was fsync'd).
    Running,
    Queued(usize),
    Sent(usize),
    /// SIGKILLed once the destination has received at least N copies: in
    /// the middle of the delivery's association, where the node makes no
    /// durable call at all.
    Received(usize),
}

impl std::fmt::Display for CutAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CutAt::End => write!(f, "end"),
            CutAt::Call(n) => write!(f, "call {n}"),
            CutAt::Running => write!(f, "running"),
            CutAt::Queued(n) => write!(f, "{n} queued"),
            CutAt::Sent(n) => write!(f, "{n} sent"),
            CutAt::Received(n) => write!(f, "{n} received"),
        }
    }
}

/// Whether the database (or the destination's folder `received`) shows
/// the moment of `at` (a state cut).
async fn reached_state(db: &Db, received: &Path, at: CutAt) -> bool {
    let outbox = || async { db.outbox().await.unwrap_or_default() };
    match at {
        CutAt::Running => db
            .all_cases()
            .await
            .unwrap_or_default()
            .iter()
            .any(|c| c.state == CaseState::Running),
        CutAt::Queued(n) => outbox().await.len() >= n,
        CutAt::Sent(n) => {
            outbox()
                .await
                .iter()
                .filter(|o| o.state == DeliveryState::Sent)
                .count()
                >= n
        }
        CutAt::Received(n) => std::fs::read_dir(received).map_or(0, |d| d.count()) >= n,
        CutAt::End | CutAt::Call(_) => false,
    }
}

/// One run under the shim: start, ingest the small patient, arm the cut,
/// and wait for it (the shim's, or the test's SIGKILL at a state), or for
/// the case to be delivered and a little more, then SIGKILL the node.
async fn record_case(
    shim: &Path,
    dir: &Path,
    conf: &Path,
    files: &[PathBuf],
    ndb: &NodeDb,
    at: CutAt,
    ignore: &str,
) -> CaseRecorded {
    let cut = at.to_string();
    let (root, shadow) = (dir.join("data"), dir.join("shadow"));
    std::fs::create_dir_all(&root).unwrap();
    for d in ["files", "dirs"] {
        std::fs::create_dir_all(shadow.join(d)).unwrap();
    }
    let arm = shadow.join("armed");
    let cut_s = match at {
        CutAt::Call(n) => n.to_string(),
        _ => "0".into(),
    };
    let mut env = vec![
        ("LD_PRELOAD", shim.to_str().unwrap()),
        ("POWERCUT_ROOT", root.to_str().unwrap()),
        ("POWERCUT_SHADOW", shadow.to_str().unwrap()),
        ("POWERCUT_CUT", cut_s.as_str()),
        ("POWERCUT_ARM", arm.to_str().unwrap()),
        ("POWERCUT_IGNORE", ignore),
    ];
    env.extend(ndb.env());
    let args = ["--config".as_ref(), conf.as_os_str()];
    // The cut is armed only after the ingest: the node listens.
    let (child, port) = serve_binary(&root, &args, &env);
    let mut child = Node(child);
    let r = send_files(&format!("127.0.0.1:{port}"), &scu(), files, |_| {})
        .await
        .unwrap_or_else(|e| panic!("cut {cut}: ingest: {e}"));
    let acked: Vec<String> = r
        .iter()
        .filter(|r| r.status == Some(status::SUCCESS))
        .map(|r| r.sop_instance_uid.clone())
        .collect();
    assert_eq!(
        acked.len(),
        files.len(),
        "cut {cut}: ingest not acknowledged"
    );
    std::fs::write(&arm, b"").unwrap();
    let mut reached = false;
    let db = ndb.open(&root, &cut).await;
    if let CutAt::End = at {
        wait_delivered(&db, 120, "uncut run").await;
    } else {
        // Until the shim cuts, the state is reached, or the case has been
        // delivered and the node has had a moment more (on SQLite the
        // assembler's lease renewals are calls too; on PostgreSQL a call
        // cut past the last file call is never reached).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let mut done_at = None;
        while std::time::Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                reached = true;
                break;
            }
            if reached_state(&db, &dir.join("received"), at).await {
                reached = true;
                break;
            }
            if done_at.is_none() && matches!(delivered(&db).await, Some(Ok(()))) {
                done_at = Some(std::time::Instant::now());
            }
            if done_at.is_some_and(|t| t.elapsed().as_secs() >= 3) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    let _ = child.kill();
    child.wait().unwrap();
    db.close().await;
    let log = std::fs::read_to_string(shadow.join("log")).unwrap_or_default();
    CaseRecorded {
        acked,
        conf: conf.to_path_buf(),
        log,
        reached,
    }
}

/// What one cut of a case run found, for the report.
#[derive(Debug)]
struct CaseFound {
    cut: String,
    phase: &'static str,
    /// The case's state in the rebuilt database, before the restart.
    state_at_cut: String,
    /// Outputs the rebuilt database had recorded, and of those marked sent.
    recorded: usize,
    sent_marks: usize,
    /// Copies the destination had before the restart.
    received_before: usize,
    /// Outputs the restarted node sent again (their 'sent' mark was lost).
    resent: usize,
    /// Copies beyond the first at the destination, all told.
    extra_copies: usize,
    /// `.part` files left under outputs/ (never referenced).
    part_files: usize,
}

/// Where in the run the cut came, from the calls made before it and what
/// the destination had received.
fn phase_of(calls: &[&str], recorded: usize, received: usize, outputs: usize) -> &'static str {
    let touched = calls.iter().any(|l| {
        l.split(' ')
            .nth(2)
            .is_some_and(|p| p.starts_with("/outputs"))
    });
    if received >= outputs {
        "delivered (sent marks, idle)"
    } else if received > 0 {
        "delivering"
    } else if recorded > 0 {
        "outputs queued"
    } else if touched {
        "writing outputs"
    } else {
        "case run, before outputs"
    }
}

/// Rebuild what cut `cut` left, restart the node on it (no shim) with the
/// same destination, and check: the database opens; the case ends done
/// with as many outputs as an uncut run, each a whole DICOM file named by
/// its row; every acknowledged instance is still indexed and whole; each
/// output reached the destination, nothing the node has no record of did,
/// and an output is sent again only if the cut lost its 'sent' mark.
async fn check_case_after_cut(
    dir: &Path,
    rec: &CaseRecorded,
    scp: &StoreScp,
    sources: &HashMap<String, PathBuf>,
    base_outputs: usize,
    ndb: &NodeDb,
    at: CutAt,
) -> CaseFound {
    let cut = at.to_string();
    let root = dir.join("data");
    let rebuilt = dir.join("rebuilt");
    rebuild(
        &dir.join("shadow"),
        std::fs::metadata(&root).unwrap().ino(),
        &rebuilt,
    );
    // What survived, before the node touches it.
    let db = ndb.open(&rebuilt, &cut).await;
    let state_at_cut = db
        .all_cases()
        .await
        .unwrap()
        .iter()
        .map(|c| c.state.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let state_at_cut = if state_at_cut.is_empty() {
        "none".to_string()
    } else {
        state_at_cut
    };
    let marks: HashMap<String, DeliveryState> = db
        .outbox()
        .await
        .unwrap()
        .into_iter()
        .map(|o| (o.sop_instance_uid, o.state))
        .collect();
    db.close().await;
    // The destination has seen the end of the node's association.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let before = scp.received();

    let args = ["--config".as_ref(), rec.conf.as_os_str()];
    let env: Vec<_> = ndb.env().into_iter().collect();
    let (child, port) = try_serve_binary(&rebuilt, &args, &env);
    let mut child = Node(child);
    port.unwrap_or_else(|| panic!("cut {cut}: the node does not start again"));
    let db = ndb.open(&rebuilt, &cut).await;
    wait_delivered(&db, 120, &format!("cut {cut}: after the restart")).await;
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success(), "cut {cut}: clean stop");

    let mut outputs = Vec::new();
    for case in db.all_cases().await.unwrap() {
        outputs.extend(db.case_outputs(&case.id).await.unwrap());
    }
    db.close().await;
    assert_eq!(
        outputs.len(),
        base_outputs,
        "cut {cut}: the case has not the outputs of an uncut run"
    );
    for o in &outputs {
        assert!(
            o.path.ends_with(".dcm"),
            "cut {cut}: an output row names {}",
            o.path
        );
        let obj = dicom_object::open_file(rebuilt.join(&o.path))
            .unwrap_or_else(|e| panic!("cut {cut}: output {} is not whole: {e}", o.path));
        let sop = obj
            .element(dicom_dictionary_std::tags::SOP_INSTANCE_UID)
            .unwrap()
            .to_str()
            .unwrap()
            .trim_end_matches('\0')
            .to_string();
        assert_eq!(
            sop, o.sop_instance_uid,
            "cut {cut}: {} is another object",
            o.path
        );
    }
    // Files under outputs/: each .dcm whole; .part files are leftovers of a
    // cut write, never named by a row (checked above), only counted.
    let mut part_files = 0;
    for e in walkdir::WalkDir::new(rebuilt.join("outputs"))
        .into_iter()
        .flatten()
    {
        let p = e.path();
        if !e.file_type().is_file() {
            continue;
        }
        if p.extension().is_some_and(|x| x == "part") {
            part_files += 1;
            continue;
        }
        dicom_object::open_file(p)
            .unwrap_or_else(|e| panic!("cut {cut}: {p:?} under outputs/ is not whole: {e}"));
    }
    // Nothing acknowledged was lost on the way.
    check_spool(
        &rebuilt,
        &ndb.url(&rebuilt),
        &rec.acked,
        sources,
        Path::new("/nonexistent"),
        &cut,
    )
    .await;

    // Delivery: each output at least once; re-sent only when its mark was
    // lost; nothing the node has no record of.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let after = scp.received();
    let ours: std::collections::HashSet<&str> = outputs
        .iter()
        .map(|o| o.sop_instance_uid.as_str())
        .collect();
    for uid in after.keys() {
        assert!(
            ours.contains(uid.as_str()),
            "cut {cut}: the destination has {uid}, which the node has no record of"
        );
    }
    let mut resent = 0;
    for o in &outputs {
        let uid = &o.sop_instance_uid;
        let (b, a) = (
            before.get(uid).copied().unwrap_or(0),
            after.get(uid).copied().unwrap_or(0),
        );
        assert!(
            a >= 1,
            "cut {cut}: {} never reached the destination",
            o.path
        );
        if a > b && b > 0 {
            assert_ne!(
                marks.get(uid),
                Some(&DeliveryState::Sent),
                "cut {cut}: {} sent again although its 'sent' mark survived",
                o.path
            );
            resent += 1;
        }
    }
    let calls = armed_calls(&rec.log);
    CaseFound {
        phase: if rec.reached {
            phase_of(&calls, marks.len(), before.values().sum(), base_outputs)
        } else {
            "not reached: killed at the end"
        },
        state_at_cut,
        recorded: marks.len(),
        sent_marks: marks
            .values()
            .filter(|s| **s == DeliveryState::Sent)
            .count(),
        received_before: before.values().sum(),
        resent,
        extra_copies: after.values().map(|n| n - 1).sum(),
        part_files,
        cut,
    }
}

/// The power cut during a case run and its delivery: at points spread over
/// every call the node makes from the moment the ingest is acknowledged to
/// the moment the last output is marked sent (the case's transitions and
/// audit events, the outputs' files and folders, their rows and outbox
/// entries, each delivery's mark), then past it. After each cut the
/// restarted node finishes the case and delivers each output; none is lost,
/// torn, or sent again unless its 'sent' mark was lost with the cut.
/// `POWERCUT_CASE_POINTS` sets the number of cuts (default 24),
/// `POWERCUT_JOBS` how many run side by side (default 3).
#[test]
fn a_power_cut_during_a_case_run_and_delivery_loses_no_output() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
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
    let files = small_patient();
    assert_eq!(files.len(), 9, "US and MG of the synthetic patient");
    let sources: HashMap<String, PathBuf> = files
        .iter()
        .map(|f| {
            (
                her2map::part10::Part10Header::read(f)
                    .unwrap()
                    .sop_instance_uid,
                f.clone(),
            )
        })
        .collect();

    // The uncut run: how many calls from the acknowledged ingest to the
    // last 'sent' mark, and how many outputs.
    let base_dir = work.join("case-base");
    let scp = StoreScp::start(&base_dir.join("received"));
    let conf = case_config(&base_dir, scp.port);
    let ndb = NodeDb::for_dir(&base_dir);
    let base = rt.block_on(record_case(
        &shim,
        &base_dir,
        &conf,
        &files,
        &ndb,
        CutAt::End,
        "",
    ));
    let span = armed_calls(&base.log).len();
    let base_outputs = scp.received().len();
    assert!(base_outputs > 0, "the uncut run delivers");
    assert!(span > 10, "the shim saw {span} calls after the ingest");
    drop(scp);
    let _ = std::fs::remove_dir_all(&base_dir);

    let env_num = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    // On PostgreSQL the calls after the ingest are the outputs' files only
    // (fewer points: the state cuts below cover the rest).
    let pg = NodeDb::on_pg();
    let points = env_num("POWERCUT_CASE_POINTS", if pg { 12 } else { 24 }).max(1);
    let jobs = env_num("POWERCUT_JOBS", 3).max(1);
    // Evenly over the span, and a little past it (idle).
    let mut calls: Vec<usize> = (1..=points)
        .map(|i| (i * (span + 4)).div_ceil(points))
        .collect();
    calls.insert(0, 1);
    calls.sort();
    calls.dedup();
    let mut cuts: Vec<CutAt> = calls.into_iter().map(CutAt::Call).collect();
    // Mid-association: no durable call marks it, on either database.
    let n = base_outputs;
    cuts.extend([CutAt::Received(1), CutAt::Received(n / 2)]);
    if pg {
        // On PostgreSQL the calls are the outputs' files only: the moments
        // before and after them are cut by the database's state.
        cuts.extend([
            CutAt::Running,
            CutAt::Queued(1),
            CutAt::Queued(n / 2),
            CutAt::Queued(n),
            CutAt::Sent(1),
            CutAt::Sent(n / 2),
            CutAt::Sent(n),
        ]);
    }
    let queue = Arc::new(Mutex::new(
        cuts.iter().copied().enumerate().collect::<Vec<_>>(),
    ));
    let found = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let sources = Arc::new(sources);
    let files = Arc::new(files);
    let workers: Vec<_> = (0..jobs)
        .map(|_| {
            let (queue, found, failures) = (queue.clone(), found.clone(), failures.clone());
            let (shim, work, sources, files) =
                (shim.clone(), work.clone(), sources.clone(), files.clone());
            std::thread::spawn(move || {
                // The DICOM client blocks in place: a multi-thread runtime.
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .unwrap();
                loop {
                    let Some((order, cut)) = queue.lock().unwrap().pop() else {
                        return;
                    };
                    let dir = work.join(format!("case-{}", cut.to_string().replace(' ', "-")));
                    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let scp = StoreScp::start(&dir.join("received"));
                        let conf = case_config(&dir, scp.port);
                        let ndb = NodeDb::for_dir(&dir);
                        rt.block_on(async {
                            let rec = record_case(&shim, &dir, &conf, &files, &ndb, cut, "").await;
                            check_case_after_cut(
                                &dir,
                                &rec,
                                &scp,
                                &sources,
                                base_outputs,
                                &ndb,
                                cut,
                            )
                            .await
                        })
                    }));
                    match run {
                        Ok(f) => {
                            found.lock().unwrap().push((order, f));
                            let _ = std::fs::remove_dir_all(&dir);
                        }
                        Err(e) => {
                            let msg = e
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_default();
                            failures.lock().unwrap().push(msg);
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let mut found = std::mem::take(&mut *found.lock().unwrap());
    found.sort_by_key(|(order, _)| *order);
    let found: Vec<CaseFound> = found.into_iter().map(|(_, f)| f).collect();
    for f in &found {
        eprintln!(
            "cut at {:<9}: {:<28} case {:<8} {:>2} outputs recorded, {:>2} marked sent, \
             {:>2} received before the restart, {} re-sent, {} extra copies, {} .part left",
            f.cut,
            f.phase,
            f.state_at_cut,
            f.recorded,
            f.sent_marks,
            f.received_before,
            f.resent,
            f.extra_copies,
            f.part_files
        );
    }
    let mut phases: Vec<(&str, usize)> = Vec::new();
    for f in &found {
        match phases.iter_mut().find(|(p, _)| *p == f.phase) {
            Some((_, n)) => *n += 1,
            None => phases.push((f.phase, 1)),
        }
    }
    eprintln!(
        "{} cut points over {span} calls after the ingest ({base_outputs} outputs); by phase: {phases:?}; \
         re-sent after a lost mark: {}",
        found.len(),
        found.iter().map(|f| f.resent).sum::<usize>()
    );
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} cuts failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The bug the case cuts found: `outputs/` is made by the first case run,
/// after the data folder was last fsync'd (at start-up), and the outputs
/// fsync'd their own folders and `outputs/` but not the data folder's
/// entry for it. A cut after the case was delivered then kept the rows
/// (and their 'sent' marks) but lost every output file. The outputs of a
/// delivered case now survive a cut at the end of the run.
#[tokio::test(flavor = "multi_thread")]
async fn the_outputs_of_the_first_case_survive_a_power_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().canonicalize().unwrap();
    let shim = build_shim(&work);
    let scp = StoreScp::start(&work.join("received"));
    let conf = case_config(&work, scp.port);
    let ndb = NodeDb::for_dir(&work);
    let files = small_patient();
    let rec = record_case(
        &shim,
        &work.join("run"),
        &conf,
        &files,
        &ndb,
        CutAt::End,
        "",
    )
    .await;
    assert_eq!(rec.acked.len(), 9);
    let rebuilt = work.join("rebuilt");
    rebuild(
        &work.join("run/shadow"),
        std::fs::metadata(work.join("run/data")).unwrap().ino(),
        &rebuilt,
    );
    let db = ndb.open(&rebuilt, "end").await;
    let outbox = db.outbox().await.unwrap();
    db.close().await;
    assert!(!outbox.is_empty(), "the rows survive");
    for o in &outbox {
        assert!(
            dicom_object::open_file(rebuilt.join(&o.path)).is_ok(),
            "{} (marked {}) lost by the cut",
            o.path,
            o.state
        );
    }
}

/// The case cuts can fail: with the fsyncs under `outputs/*/` (the
/// outputs' files and their folders) left out of the record, as if
/// `write_outputs` skipped them, the outputs of a delivered case are lost
/// in the rebuilt folder while their rows survive.
#[tokio::test(flavor = "multi_thread")]
async fn the_case_cuts_catch_a_missing_output_fsync() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().canonicalize().unwrap();
    let shim = build_shim(&work);
    let scp = StoreScp::start(&work.join("received"));
    let conf = case_config(&work, scp.port);
    let ndb = NodeDb::for_dir(&work);
    let files = small_patient();
    let run = work.join("run");
    record_case(&shim, &run, &conf, &files, &ndb, CutAt::End, "/outputs/").await;
    let rebuilt = work.join("rebuilt");
    rebuild(
        &run.join("shadow"),
        std::fs::metadata(run.join("data")).unwrap().ino(),
        &rebuilt,
    );
    let db = ndb.open(&rebuilt, "end").await;
    let outbox = db.outbox().await.unwrap();
    db.close().await;
    assert!(!outbox.is_empty(), "the rows survive");
    let whole = outbox
        .iter()
        .filter(|o| dicom_object::open_file(rebuilt.join(&o.path)).is_ok())
        .count();
    assert_eq!(whole, 0, "without the outputs' fsyncs none may survive");
}
