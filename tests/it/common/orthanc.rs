//! Orthanc as a child process on free loopback ports: the real PACS of the
//! tests (tests/it/orthanc.rs, and any test that needs a PACS peer).
//!
//! Needs Orthanc (Debian package `orthanc`, `/usr/sbin/Orthanc`; or the
//! binary named by `HER2MAP_ORTHANC`) and curl. Without them a test fails:
//! it is never skipped.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const ORTHANC_AET: &str = "ORTHANC";
pub const NODE_AET: &str = "HER2MAP";

/// The Orthanc executable: `HER2MAP_ORTHANC`, `Orthanc` on PATH, or where
/// the Debian package puts it.
pub fn orthanc_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("HER2MAP_ORTHANC") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "HER2MAP_ORTHANC={} is not a file: this test needs Orthanc",
            p.display()
        );
        return p;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join("Orthanc"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "Orthanc is not installed: this test needs a real PACS \
                 (apt-get install orthanc, or set HER2MAP_ORTHANC to the Orthanc binary)"
            )
        })
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Orthanc as a child process; killed (and its log printed on failure)
/// when dropped.
pub struct Orthanc {
    child: Child,
    pub http: u16,
    pub dicom: u16,
    log: PathBuf,
}

impl Orthanc {
    /// Start Orthanc on `http` and `dicom` (loopback), with the node on
    /// `node_port` as modality "her2map" and the routing recipe of
    /// `conf/orthanc-route.lua`.
    pub fn start(dir: &Path, http: u16, dicom: u16, node_port: u16) -> Orthanc {
        let lua = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/orthanc-route.lua");
        assert!(lua.is_file(), "{} missing", lua.display());
        Orthanc::start_with(
            dir,
            http,
            dicom,
            serde_json::json!({
                "DicomModalities": { "her2map": [NODE_AET, "127.0.0.1", node_port] },
                "LuaScripts": [lua],
            }),
        )
    }

    /// Start Orthanc on `http` and `dicom` (loopback) with the base
    /// configuration below, each top-level key of `extra` replacing the
    /// base's (modalities, Lua scripts, plugins, DICOMweb...).
    pub fn start_with(dir: &Path, http: u16, dicom: u16, extra: Value) -> Orthanc {
        let binary = orthanc_binary();
        let storage = dir.join("orthanc-db");
        let mut config = serde_json::json!({
            "Name": "her2map-test",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "HttpPort": http,
            "DicomPort": dicom,
            "DicomAet": ORTHANC_AET,
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false,
            "HttpCompressionEnabled": false,
            "DicomAlwaysAllowStore": true,
            "DicomCheckCalledAet": true,
            "DicomModalities": {},
            "Plugins": [],
            "SaveJobs": false,
        });
        if let Value::Object(extra) = extra {
            for (k, v) in extra {
                config[k] = v;
            }
        }
        let config_path = dir.join("orthanc.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        let log = dir.join("orthanc.log");
        let out = std::fs::File::create(&log).unwrap();
        // Orthanc's DICOM network code (DCMTK's) leaves Nagle's algorithm
        // on unless told: each small PDU then stalls ~40 ms on loopback
        // (a C-MOVE of the synthetic US+MR took 7.9 s instead of 2.4 s).
        let child = Command::new(&binary)
            .env("TCP_NODELAY", "1")
            .arg(&config_path)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let mut orthanc = Orthanc {
            child,
            http,
            dicom,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = orthanc.child.try_wait().unwrap() {
                panic!(
                    "Orthanc exited at start-up ({status}):\n{}",
                    orthanc.log_text()
                );
            }
            if let Ok(v) = orthanc.try_get_json("/system")
                && v["DicomAet"] == ORTHANC_AET
            {
                return orthanc;
            }
            assert!(
                Instant::now() < deadline,
                "Orthanc's REST API did not answer within 30 s:\n{}",
                orthanc.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http)
    }

    /// GET (or POST `body`) with curl; the response body, or curl's error.
    pub fn request(&self, path: &str, body: Option<&str>) -> Result<Vec<u8>, String> {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--fail", "--max-time", "20"]);
        if let Some(b) = body {
            cmd.args(["-X", "POST", "--data-binary", b]);
        }
        let out = cmd
            .arg(self.url(path))
            .output()
            .unwrap_or_else(|e| panic!("curl must be installed (apt-get install curl): {e}"));
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(format!(
                "{path}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    pub fn try_get_json(&self, path: &str) -> Result<Value, String> {
        let body = self.request(path, None)?;
        serde_json::from_slice(&body).map_err(|e| format!("{path}: {e}"))
    }

    pub fn get_json(&self, path: &str) -> Value {
        self.try_get_json(path).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn get(&self, path: &str) -> Vec<u8> {
        self.request(path, None).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Orthanc's identifier of the instance with this SOP Instance UID.
    pub fn lookup_instance(&self, sop_instance_uid: &str) -> Option<String> {
        let body = self
            .request("/tools/lookup", Some(sop_instance_uid))
            .unwrap_or_else(|e| panic!("{e}"));
        let v: Value = serde_json::from_slice(&body).unwrap();
        v.as_array()?
            .iter()
            .find(|r| r["Type"] == "Instance")
            .and_then(|r| r["ID"].as_str())
            .map(str::to_string)
    }
}

/// The `extra` keys of [`Orthanc::start_with`] that load Debian's
/// `orthanc-dicomweb` plugin and serve DICOMweb (QIDO-RS, WADO-RS, STOW-RS)
/// under `/dicom-web/`.
pub fn dicomweb_plugin() -> (Value, Value) {
    let plugin = PathBuf::from("/usr/share/orthanc/plugins/libOrthancDicomWeb.so");
    assert!(
        plugin.is_file(),
        "{} missing: apt-get install orthanc-dicomweb",
        plugin.display()
    );
    (
        serde_json::json!([plugin]),
        serde_json::json!({ "Enable": true, "Root": "/dicom-web/" }),
    )
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- Orthanc log ---\n{}", self.log_text());
        }
    }
}
