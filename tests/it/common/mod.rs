//! Test harness: start the real node in-process on port 0 with a temporary
//! data folder, and small helpers around DCMTK and test files.
#![allow(dead_code)]

pub mod browser;
pub mod orthanc;
pub mod pki;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use her2map::app::App;
use her2map::config::Settings;
use her2map::db::Db;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct TestApp {
    pub addr: SocketAddr,
    /// The HTTP server (console, API, metrics), when enabled.
    pub http_addr: Option<SocketAddr>,
    /// The DICOM TLS listener, when the settings enable it.
    pub tls_addr: Option<SocketAddr>,
    pub db: Db,
    pub data_dir: PathBuf,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.addr.port())
    }
    /// Graceful stop, as on SIGTERM.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            h.await.expect("app task").expect("app run");
        }
    }
    pub fn spool(&self) -> PathBuf {
        self.data_dir.join("spool")
    }
    /// Files left under the spool's tmp/ folder or a node's folder in it
    /// (must be none between instances).
    pub fn temp_files(&self) -> usize {
        let files = |dir: &Path| -> Vec<PathBuf> {
            std::fs::read_dir(dir)
                .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
                .unwrap_or_default()
        };
        files(&self.spool().join("tmp"))
            .into_iter()
            .map(|p| if p.is_dir() { files(&p).len() } else { 1 })
            .sum()
    }
}

/// Default settings for a test node storing under `data_dir`.
pub fn test_settings(data_dir: &Path) -> Settings {
    let mut s = Settings::load_with_env(None, false).expect("default settings");
    s.dicom.port = 0;
    s.dicom.host = "127.0.0.1".into();
    s.storage.data_dir = data_dir.to_path_buf();
    // Tests share a busy disk; the full-disk test sets its own minimum.
    s.storage.min_free_mb = 0;
    // The small demo checkpoint from test-data/parity: fast to load.
    s.model.demo = true;
    // Tests run side by side: the console on a free port.
    s.http.port = 0;
    if std::env::var_os("HER2MAP_TEST_PG_URL").is_some_and(|u| !u.is_empty()) {
        s.database.url = test_database_url(data_dir, "her2map.db");
    }
    s
}

/// The database of a test: on the PostgreSQL server that
/// `HER2MAP_TEST_PG_URL` names (`postgres://user@host:port`, started by
/// scripts/postgres.sh; .ci/run runs the database-level tests this way
/// too) a database of its own for `dir` and `file` (the same one each time,
/// as the SQLite file would be: a restarted node finds its data), or else
/// the SQLite file `file` in `dir`.
pub fn test_database_url(dir: &Path, file: &str) -> String {
    match std::env::var("HER2MAP_TEST_PG_URL") {
        Ok(server) if !server.is_empty() => {
            use sha2::Digest;
            let server = server.trim_end_matches('/');
            let digest = sha2::Sha256::digest(dir.join(file).to_string_lossy().as_bytes());
            let name = format!("t_{}", hex::encode(&digest[..10]));
            let out = Command::new("psql")
                .arg(format!("{server}/postgres"))
                .args(["-qAt", "-c", &format!("CREATE DATABASE {name}")])
                .output()
                .expect("psql must be installed (apt-get install postgresql-client)");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() || stderr.contains("already exists"),
                "creating the test database: {stderr}"
            );
            format!("{server}/{name}")
        }
        _ => format!("sqlite://{}", dir.join(file).display()),
    }
}

pub async fn spawn_app_with(settings: Settings) -> TestApp {
    let data_dir = settings.storage.data_dir.clone();
    let app = App::build(settings).await.expect("app builds");
    let addr = app.local_addr();
    let tls_addr = app.tls_addr();
    let http_addr = app.http_addr();
    let db = app.db();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    TestApp {
        addr,
        http_addr,
        tls_addr,
        db,
        data_dir,
        shutdown,
        handle: Some(handle),
    }
}

/// A DIMSE destination on loopback: every output, no TLS.
pub fn dimse_destination(ae_title: &str, port: u16) -> her2map::config::DestinationSettings {
    her2map::config::DestinationSettings {
        ae_title: ae_title.into(),
        host: "127.0.0.1".into(),
        port,
        dicomweb: None,
        outputs: None,
        tls: None,
    }
}

pub async fn spawn_app(data_dir: &Path) -> TestApp {
    spawn_app_with(test_settings(data_dir)).await
}

pub fn test_data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("test-data")
        .join(name)
}

/// Run a DCMTK tool (TCP_NODELAY on, as the node's sockets), returning
/// (success, stdout+stderr).
pub async fn dcmtk(tool: &str, args: Vec<String>) -> (bool, String) {
    let tool = tool.to_string();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(&tool)
            .args(&args)
            .env("TCP_NODELAY", "1")
            .output()
            .unwrap_or_else(|e| panic!("{tool} must be installed (apt-get install dcmtk): {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    })
    .await
    .expect("dcmtk task")
}

/// Write `n` copies of MR_small.dcm with fresh SOP Instance UIDs into `dir`.
pub fn mr_variants(dir: &Path, n: usize, tag: &str) -> Vec<PathBuf> {
    let source = dicom_object::open_file(test_data("dicom/MR_small.dcm")).expect("MR_small");
    let mut out = Vec::new();
    for i in 0..n {
        let mut obj = source.clone();
        let uid = format!("2.25.{}{}{}", tag_number(tag), 1000 + i, std::process::id());
        obj.put(DataElement::new(
            tags::SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(uid.as_str()),
        ));
        obj.update_meta(|m| m.media_storage_sop_instance_uid = uid.clone());
        let path = dir.join(format!("{tag}-{i:04}.dcm"));
        obj.write_to_file(&path).expect("write variant");
        out.push(path);
    }
    out
}

fn tag_number(tag: &str) -> u64 {
    tag.bytes()
        .fold(7u64, |a, b| (a * 31 + u64::from(b)) % 1_000_000)
}

/// The data set bytes of a Part 10 file (everything after the meta group).
pub fn dataset_bytes(path: &Path) -> Vec<u8> {
    let h = her2map::part10::Part10Header::read(path).expect("part 10 header");
    std::fs::read(path).expect("read")[h.dataset_offset as usize..].to_vec()
}

/// Audit events named `name`, waiting up to 10 s for at least `n` of them
/// (the node records an event just after the peer sees the answer).
pub async fn wait_events(db: &Db, name: &str, n: usize) -> Vec<her2map::db::AuditEvent> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let events = db.events(0, Some(name), 10_000).await.expect("events");
        if events.len() >= n || std::time::Instant::now() > deadline {
            return events;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// `her2map serve` as a child process on 127.0.0.1 port 0 with the demo
/// weights and no free-space floor; `args` go after `serve` (e.g.
/// `--config F`) and `env` over the defaults. Returns once it logs its
/// "listening on" line, with the DICOM port; stderr keeps being drained.
pub fn serve_binary(
    data_dir: &Path,
    args: &[&std::ffi::OsStr],
    env: &[(&str, &str)],
) -> (std::process::Child, u16) {
    let (child, port) = try_serve_binary(data_dir, args, env);
    (child, port.expect("serve exited before listening"))
}

/// As [`serve_binary`], but a node that exits before it listens (e.g.
/// killed during start-up by a fault test) gives `None` for the port.
pub fn try_serve_binary(
    data_dir: &Path,
    args: &[&std::ffi::OsStr],
    env: &[(&str, &str)],
) -> (std::process::Child, Option<u16>) {
    use std::io::{BufRead, BufReader};
    // HER2MAP_TEST_BIN: a copy of the binary to run instead (several
    // worktrees sharing one target folder rebuild it under a running test).
    let bin = std::env::var_os("HER2MAP_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_her2map").into());
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars() {
        if k.starts_with("HER2MAP__") {
            cmd.env_remove(k);
        }
    }
    cmd.arg("serve")
        .args(args)
        .env("HER2MAP__DICOM__PORT", "0")
        .env("HER2MAP__DICOM__HOST", "127.0.0.1")
        .env("HER2MAP__STORAGE__DATA_DIR", data_dir)
        .env("HER2MAP__STORAGE__MIN_FREE_MB", "0")
        .env("HER2MAP__MODEL__DEMO", "true")
        .env("HER2MAP__HTTP__PORT", "0")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("her2map serve starts");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let port = loop {
        let Some(Ok(line)) = lines.next() else {
            return (child, None);
        };
        if let Some(rest) = line.split("listening on ").nth(1) {
            let addr: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
            break addr
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("port");
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, Some(port))
}

/// A DICOM tool on PATH; a missing one fails the test (tests never skip).
pub fn tool(name: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "required tool `{name}` not found on PATH: install it (Debian: apt-get install dicom3tools dcmtk); \
         this test never skips"
    );
}

/// Run dciodvfy; return (errors, warnings) lines.
pub fn dciodvfy(path: &Path) -> (Vec<String>, Vec<String>, String) {
    let out = Command::new(tool("dciodvfy"))
        .arg(path)
        .output()
        .expect("run dciodvfy");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let errors = text
        .lines()
        .filter(|l| l.starts_with("Error"))
        .map(String::from)
        .collect();
    let warnings = text
        .lines()
        .filter(|l| l.starts_with("Warning"))
        .map(String::from)
        .collect();
    (errors, warnings, text)
}

/// A copy of `files` as another patient's: Patient ID `patient_id`, fresh
/// Study/Series/SOP Instance UIDs.
pub fn as_patient(files: &[PathBuf], out: &Path, patient_id: &str, salt: &str) -> Vec<PathBuf> {
    std::fs::create_dir_all(out).unwrap();
    let fresh = |uid: &str| format!("{}.{salt}", uid.trim_end_matches(['\0', ' ']));
    files
        .iter()
        .map(|f| {
            let mut obj = dicom_object::open_file(f).unwrap();
            let get = |o: &dicom_object::DefaultDicomObject, tag| {
                o.element(tag).unwrap().to_str().unwrap().to_string()
            };
            let (st, se, sop) = (
                fresh(&get(&obj, tags::STUDY_INSTANCE_UID)),
                fresh(&get(&obj, tags::SERIES_INSTANCE_UID)),
                fresh(&get(&obj, tags::SOP_INSTANCE_UID)),
            );
            for (tag, vr, v) in [
                (tags::PATIENT_ID, VR::LO, patient_id.to_string()),
                (tags::STUDY_INSTANCE_UID, VR::UI, st),
                (tags::SERIES_INSTANCE_UID, VR::UI, se),
                (tags::SOP_INSTANCE_UID, VR::UI, sop.clone()),
            ] {
                obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
            }
            obj.meta_mut().media_storage_sop_instance_uid = sop;
            obj.meta_mut().update_information_group_length();
            let path = out.join(f.file_name().unwrap());
            obj.write_to_file(&path).unwrap();
            path
        })
        .collect()
}
