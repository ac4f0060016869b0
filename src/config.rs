//! The node's settings tree and its loader: the built-in `conf/default.toml`,
//! an optional file given with `--config`, then `HER2MAP__SECTION__KEY`
//! environment variables, each layer over the previous one.
//!
//! The module-graph rule: config is a leaf that aggregates the sections.
//! A section is plain serde data, defined here, or in a module that never
//! imports config (`imaging`, `report`, `cases`: their settings are their
//! own vocabulary). Whatever turns a section into something live (the TLS
//! loader in `dimse::tls`, the outbox, the SCP's wiring in `app`) imports
//! config, never the reverse, and reports its own errors (`ConfigError` is
//! for loading and validating the tree only). `scripts/check-module-cycles.py`
//! fails on any import circle between the top-level modules.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The default configuration, compiled into the binary so that the node runs
/// from any folder.
pub const DEFAULT_TOML: &str = include_str!("../conf/default.toml");

/// Every setting of the node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub dicom: DicomSettings,
    pub storage: StorageSettings,
    pub database: DatabaseSettings,
    #[serde(default)]
    pub node: NodeSettings,
    pub cases: CasesSettings,
    #[serde(default)]
    pub destinations: Vec<DestinationSettings>,
    /// `[[sources]]`: PACSs the node may query for what a case lacks.
    #[serde(default)]
    pub sources: Vec<SourceSettings>,
    /// `[fetch]`: when and how the node queries its sources.
    #[serde(default)]
    pub fetch: FetchSettings,
    pub outbox: OutboxSettings,
    pub imaging: crate::imaging::ImagingSettings,
    pub model: ModelSettings,
    pub report: crate::report::ReportSettings,
    pub log: LogSettings,
    pub http: HttpSettings,
}

/// `[http]`: the administrator's console, REST API, metrics and health
/// checks (issue 15). Turned into a server by `http`, never here.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub enabled: bool,
    pub host: String,
    pub port: u16,
    /// Serve `/metrics` without a token (for a Prometheus on a trusted net).
    pub metrics_public: bool,
    /// Show patient names and IDs to signed-in users; masked when false.
    pub show_phi: bool,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Seconds for a client to send a request's headers (slow-header cut).
    pub header_timeout_secs: u64,
    /// Seconds for a whole request, body included (slow-body cut).
    pub request_timeout_secs: u64,
    /// HTTP connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    pub tls: HttpTlsSettings,
    #[serde(default)]
    pub users: Vec<HttpUser>,
    /// Largest STOW-RS request body (`POST /dicom-web/studies`), in bytes.
    #[serde(default = "default_stow_max_body_bytes")]
    pub stow_max_body_bytes: usize,
    /// Seconds for a whole STOW-RS request, body and storing included.
    #[serde(default = "default_stow_timeout_secs")]
    pub stow_timeout_secs: u64,
    /// STOW-RS requests read and stored at once (each body is in memory).
    #[serde(default = "default_stow_concurrency")]
    pub stow_concurrency: usize,
}

fn default_stow_concurrency() -> usize {
    4
}

fn default_stow_max_body_bytes() -> usize {
    1 << 30
}

fn default_stow_timeout_secs() -> u64 {
    600
}

/// `[http.tls]`: HTTPS with the same PEM handling as `[dicom.tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTlsSettings {
    pub enabled: bool,
    pub certificate: PathBuf,
    pub private_key: PathBuf,
}

/// `[[http.users]]`: one bearer-token user.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HttpUser {
    pub name: String,
    pub role: HttpRole,
    /// SHA-256 (hex) of the user's bearer token; the token itself is never stored.
    pub token_sha256: String,
}

/// What a console user may do: viewers read, operators also act (and may
/// STOW-RS); `stow` users may only store instances by STOW-RS (a PACS's or
/// modality's account: no console page, no API view, no PHI).
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum HttpRole {
    Viewer,
    Operator,
    Stow,
}

impl HttpRole {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpRole::Viewer => "viewer",
            HttpRole::Operator => "operator",
            HttpRole::Stow => "stow",
        }
    }

    /// May store instances by STOW-RS (`POST /dicom-web/studies`).
    pub fn may_stow(self) -> bool {
        matches!(self, HttpRole::Operator | HttpRole::Stow)
    }
}

/// `[model]`: the checkpoint and the device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    pub weights: PathBuf,
    pub device: String,
    pub demo: bool,
    pub queue: usize,
    /// Samples per forward pass at most; 0: by device (8 on a GPU, 1 on
    /// the CPU).
    pub max_batch: usize,
    /// Let f32 matrix products use TF32 on the GPU (off: parity).
    pub tf32: bool,
}

/// The demo weights: the reduced-size parity checkpoint with random weights
/// that ships in test-data/ (see test-data/parity/README.md).
pub const DEMO_WEIGHTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/test-data/parity/map_small_weights.safetensors"
);

impl ModelSettings {
    /// The weights file to load, or why there is none.
    pub fn weights_path(&self) -> Result<PathBuf, ConfigError> {
        if self.demo {
            return Ok(PathBuf::from(DEMO_WEIGHTS));
        }
        if self.weights.as_os_str().is_empty() {
            return Err(ConfigError::Invalid {
                key: "model.weights",
                message: "no checkpoint configured: set it to the HER2 MAP weights (.pth or \
                          .safetensors), or set model.demo = true to try the node with demo weights"
                    .into(),
            });
        }
        if !self.weights.is_file() {
            return Err(ConfigError::Invalid {
                key: "model.weights",
                message: format!("{} does not exist or is not a file", self.weights.display()),
            });
        }
        Ok(self.weights.clone())
    }
}

/// `[cases]`: grouping and readiness of patient cases.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CasesSettings {
    pub patient_key: crate::cases::PatientKeyMode,
    pub window_days: i64,
    pub required: Vec<crate::cases::Modality>,
    pub stable_age_secs: u64,
    pub max_wait_secs: u64,
    pub partial: crate::cases::Partial,
    pub mri_series_required: usize,
    pub queue: usize,
}

impl Settings {
    /// The case rules; the lesion-side fallback is `[imaging] lesion_side`.
    pub fn case_rules(&self) -> crate::cases::CaseRules {
        let c = &self.cases;
        crate::cases::CaseRules {
            required: c.required.clone(),
            stable_age: std::time::Duration::from_secs(c.stable_age_secs),
            max_wait: std::time::Duration::from_secs(c.max_wait_secs),
            partial: c.partial,
            mri_series_required: c.mri_series_required,
            lesion_side: self.imaging.lesion_side,
        }
    }
}

/// `[dicom]`: the Storage SCP and its access control.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DicomSettings {
    pub ae_title: String,
    pub host: String,
    pub port: u16,
    pub max_pdu: u32,
    pub max_associations: usize,
    pub accept_any_storage: bool,
    pub accept_any_called_ae: bool,
    pub read_timeout_secs: u64,
    /// PS3.8 9.1.5 ARTIM: seconds from TCP accept to a complete
    /// A-ASSOCIATE-RQ (TLS handshake included) before the node closes.
    pub artim_timeout_secs: u64,
    /// Connections without an association yet, both ports together.
    pub max_pending_connections: usize,
    /// Of those, from one remote address.
    pub max_pending_per_address: usize,
    #[serde(default)]
    pub peers: Vec<PeerSettings>,
    pub tls: TlsSettings,
}

/// `[dicom.tls]`: DICOM TLS (PS3.15 B.9) on a second port, same association
/// handling as the plain port.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    pub enabled: bool,
    pub port: u16,
    /// PEM: the node's certificate, then its chain.
    pub certificate: PathBuf,
    /// PEM: the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub private_key: PathBuf,
    /// PEM: CA certificates; when set, peers must present a certificate
    /// issued by one of them.
    pub client_ca: PathBuf,
}

/// The TLS of the node's SCU towards one peer (`[destinations.tls]`, and
/// the `--tls-*` options of `send` and `echo`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsSettings {
    /// PEM: the CA certificates the peer's certificate must chain to. A
    /// hospital PKI, not the web's roots: required.
    pub ca: PathBuf,
    /// PEM: the node's certificate and chain, for peers that require one.
    #[serde(default)]
    pub certificate: PathBuf,
    /// PEM: that certificate's private key.
    #[serde(default)]
    pub private_key: PathBuf,
    /// The name the peer's certificate must carry (DNS name or IP address);
    /// the destination's host when empty.
    #[serde(default)]
    pub server_name: String,
}

/// `[[dicom.peers]]`: one allowed calling AE title, optionally bound to a host.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerSettings {
    pub ae_title: String,
    #[serde(default)]
    pub host: Option<String>,
}

/// A DICOMweb service (PS3.18): a `[[destinations]]` entry's `dicomweb`
/// table, and a DICOMweb `[[sources]]` entry. Secrets are never in the
/// file itself: a token or password is read from the file or environment
/// variable named here (turned into a client by `dicomweb::client`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DicomWebEndpoint {
    /// The service root, e.g. `https://pacs.example.org/dicom-web`
    /// (`studies` is appended to it). No user or password in it.
    pub url: String,
    /// A file holding the bearer token (`Authorization: Bearer`).
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
    /// An environment variable holding the bearer token.
    #[serde(default)]
    pub bearer_token_env: Option<String>,
    /// HTTP basic auth user (with a password file or variable).
    #[serde(default)]
    pub basic_user: Option<String>,
    #[serde(default)]
    pub basic_password_file: Option<PathBuf>,
    #[serde(default)]
    pub basic_password_env: Option<String>,
    /// PEM: a CA to trust besides the system's (a hospital PKI).
    #[serde(default)]
    pub ca_certificate: Option<PathBuf>,
    /// Seconds for one whole request (connect, send, response).
    #[serde(default = "default_dicomweb_timeout_secs")]
    pub timeout_secs: u64,
}

fn default_dicomweb_timeout_secs() -> u64 {
    60
}

impl DicomWebEndpoint {
    /// What is wrong with it, if anything (the key's name is the caller's).
    pub fn problem(&self) -> Option<String> {
        let url = self.url.trim();
        let Some((scheme, rest)) = url.split_once("://") else {
            return Some(format!("url {url:?} is not an http:// or https:// URL"));
        };
        if !matches!(scheme, "http" | "https") || rest.is_empty() {
            return Some(format!("url {url:?} is not an http:// or https:// URL"));
        }
        let authority = rest.split('/').next().unwrap_or("");
        if authority.contains('@') {
            return Some("url must not hold a user or password: use basic_user and basic_password_file or _env".into());
        }
        if self.bearer_token_file.is_some() && self.bearer_token_env.is_some() {
            return Some("bearer_token_file and bearer_token_env: set one".into());
        }
        let bearer = self.bearer_token_file.is_some() || self.bearer_token_env.is_some();
        let password = self.basic_password_file.is_some() || self.basic_password_env.is_some();
        if self.basic_user.is_some() != password
            || (self.basic_password_file.is_some() && self.basic_password_env.is_some())
        {
            return Some(
                "basic_user needs exactly one of basic_password_file and basic_password_env".into(),
            );
        }
        if bearer && self.basic_user.is_some() {
            return Some("bearer token and basic auth: set one".into());
        }
        if self.timeout_secs == 0 {
            return Some("timeout_secs must be at least 1".into());
        }
        None
    }
}

/// `[[destinations]]`: where results go: a DIMSE peer (`ae_title`, `host`,
/// `port`) or a DICOMweb service (`dicomweb = { url = ... }`, STOW-RS).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DestinationSettings {
    #[serde(default)]
    pub ae_title: String,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub port: u16,
    /// Deliver by STOW-RS to this service instead of C-STORE.
    #[serde(default)]
    pub dicomweb: Option<DicomWebEndpoint>,
    /// Output kinds this destination receives ("sr", "sc", "gsps"; the summary
    /// card is an "sc"); all when absent.
    #[serde(default)]
    pub outputs: Option<Vec<String>>,
    /// DICOM TLS to this destination; plain TCP when absent.
    #[serde(default)]
    pub tls: Option<ClientTlsSettings>,
}

impl DestinationSettings {
    /// The stable name of a destination in the outbox table.
    pub fn name(&self) -> String {
        if let Some(web) = &self.dicomweb {
            return web.url.trim().trim_end_matches('/').to_string();
        }
        format!("{}@{}:{}", self.ae_title.trim(), self.host, self.port)
    }
    pub fn wants(&self, kind: &str) -> bool {
        self.outputs
            .as_ref()
            .is_none_or(|kinds| kinds.iter().any(|k| k.eq_ignore_ascii_case(kind)))
    }
}

/// How a DIMSE source delivers what the node asks for.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RetrieveMethod {
    /// C-MOVE to the node's own AE title (the PACS must know the node).
    #[default]
    Move,
    /// C-GET: the instances come back on the query's own association.
    Get,
}

/// `[[sources]]`: one PACS the node may query (issue 17): by DIMSE
/// (`ae_title`, `host`, `port`: C-FIND, then C-MOVE or C-GET) or by
/// DICOMweb (`dicomweb = { url = ... }`: QIDO-RS, then WADO-RS).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SourceSettings {
    /// The name in events and in the cases view; `AE@host:port` (or the
    /// DICOMweb URL) when empty.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub ae_title: String,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub port: u16,
    /// "move" (default) or "get".
    #[serde(default)]
    pub retrieve: RetrieveMethod,
    /// DICOM TLS to this source; plain TCP when absent.
    #[serde(default)]
    pub tls: Option<ClientTlsSettings>,
    /// Query by QIDO-RS and retrieve by WADO-RS from this service instead.
    #[serde(default)]
    pub dicomweb: Option<DicomWebEndpoint>,
    /// Seconds to wait for each response (0: `[fetch] timeout_secs`).
    #[serde(default)]
    pub timeout_secs: u64,
    /// Retrieves from this source at once (0: `[fetch] max_retrieves_per_source`).
    #[serde(default)]
    pub max_retrieves: usize,
}

impl SourceSettings {
    /// The stable name of the source in events and attempts.
    pub fn name(&self) -> String {
        if !self.name.trim().is_empty() {
            return self.name.trim().to_string();
        }
        if let Some(web) = &self.dicomweb {
            return web.url.trim().trim_end_matches('/').to_string();
        }
        format!("{}@{}:{}", self.ae_title.trim(), self.host, self.port)
    }
}

/// `[fetch]`: when the node queries its `[[sources]]` for a case's missing
/// modalities, and its limits.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct FetchSettings {
    /// Query when a case opens with a required modality missing.
    pub on_open: bool,
    /// Query again `before_run_secs` before a case's max wait, when a
    /// required modality is still missing.
    pub before_run: bool,
    pub before_run_secs: u64,
    /// Retrieves at once per source (on this node).
    pub max_retrieves_per_source: usize,
    /// The least time between two queries of one patient at one source.
    pub min_query_interval_secs: u64,
    /// Seconds to wait for each DIMSE response or HTTP reply.
    pub timeout_secs: u64,
    /// Seconds one source may take for a whole query and retrieve.
    pub source_timeout_secs: u64,
    /// C-FIND matches read per query at most (then C-CANCEL).
    pub max_matches: usize,
    /// The AE title a C-MOVE sends to; `[dicom] ae_title` when empty.
    pub move_destination: String,
}

impl Default for FetchSettings {
    fn default() -> Self {
        FetchSettings {
            on_open: true,
            before_run: true,
            before_run_secs: 300,
            max_retrieves_per_source: 2,
            min_query_interval_secs: 60,
            timeout_secs: 30,
            source_timeout_secs: 600,
            max_matches: 500,
            move_destination: String::new(),
        }
    }
}

/// `[outbox]`: retry policy and timeouts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxSettings {
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    pub max_attempts: i64,
    pub timeout_secs: u64,
}

/// `[storage]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    pub data_dir: PathBuf,
    pub min_free_mb: u64,
}

/// `[database]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    #[serde(default)]
    pub url: String,
    pub busy_timeout_ms: u64,
}

/// `[node]`: this node's name among several on one database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    /// Recorded on every audit event and on every claim; empty means the
    /// host name.
    #[serde(default)]
    pub id: String,
    /// How long a claim on work (a case run, a delivery) lasts without
    /// renewal: a dead node's work passes to another node after this.
    #[serde(default = "default_lease_secs")]
    pub lease_secs: u64,
}

fn default_lease_secs() -> u64 {
    30
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            id: String::new(),
            lease_secs: default_lease_secs(),
        }
    }
}

impl NodeSettings {
    /// The node id: `[node] id`, or the host name.
    pub fn id(&self) -> String {
        if self.id.trim().is_empty() {
            crate::db::default_node_id()
        } else {
            self.id.trim().to_string()
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A configuration that could not be loaded; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

impl Settings {
    /// Load the layered configuration (built-in default, optional file,
    /// environment) and validate it.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, true)
    }

    /// As [`Settings::load`], optionally without the environment layer (tests).
    pub fn load_with_env(file: Option<&Path>, env: bool) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            // An explicit --config file must exist: a typo in its name must
            // not silently run the defaults.
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        if env {
            builder = builder.add_source(
                config::Environment::with_prefix("HER2MAP")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            );
        }
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| ConfigError::Invalid {
            key,
            message: message.to_string(),
        };
        validate_ae_title(&self.dicom.ae_title).map_err(|m| invalid("dicom.ae_title", &m))?;
        for peer in &self.dicom.peers {
            validate_ae_title(&peer.ae_title).map_err(|m| invalid("dicom.peers.ae_title", &m))?;
        }
        // PS3.8 D.1: the maximum length is at least the header plus one PDV;
        // DCMTK and dicom-ul cap it at 128 KiB + header in practice.
        if !(4096..=4 * 1024 * 1024).contains(&self.dicom.max_pdu) {
            return Err(invalid(
                "dicom.max_pdu",
                "must be between 4096 and 4194304 bytes",
            ));
        }
        if self.dicom.max_associations == 0 {
            return Err(invalid("dicom.max_associations", "must be at least 1"));
        }
        if self.dicom.read_timeout_secs == 0 {
            return Err(invalid("dicom.read_timeout_secs", "must be at least 1"));
        }
        if self.dicom.artim_timeout_secs == 0 {
            return Err(invalid("dicom.artim_timeout_secs", "must be at least 1"));
        }
        if self.dicom.max_pending_connections == 0 {
            return Err(invalid(
                "dicom.max_pending_connections",
                "must be at least 1",
            ));
        }
        if self.dicom.max_pending_per_address == 0 {
            return Err(invalid(
                "dicom.max_pending_per_address",
                "must be at least 1",
            ));
        }
        let tls = &self.dicom.tls;
        if tls.enabled {
            if tls.certificate.as_os_str().is_empty() {
                return Err(invalid(
                    "dicom.tls.certificate",
                    "must name a PEM certificate (chain) file when dicom.tls.enabled = true",
                ));
            }
            if tls.private_key.as_os_str().is_empty() {
                return Err(invalid(
                    "dicom.tls.private_key",
                    "must name a PEM private key file when dicom.tls.enabled = true",
                ));
            }
            if tls.port != 0 && tls.port == self.dicom.port {
                return Err(invalid(
                    "dicom.tls.port",
                    "must differ from dicom.port (TLS has its own port)",
                ));
            }
        }
        for d in &self.destinations {
            if let Some(web) = &d.dicomweb {
                if !d.ae_title.is_empty() || !d.host.is_empty() || d.port != 0 || d.tls.is_some() {
                    return Err(invalid(
                        "destinations.dicomweb",
                        "a DICOMweb destination has no ae_title, host, port or tls (its TLS is dicomweb.ca_certificate)",
                    ));
                }
                if let Some(m) = web.problem() {
                    return Err(invalid("destinations.dicomweb", &m));
                }
            } else {
                validate_ae_title(&d.ae_title).map_err(|m| invalid("destinations.ae_title", &m))?;
                if d.host.trim().is_empty() {
                    return Err(invalid("destinations.host", "must not be empty"));
                }
            }
            if let Some(kinds) = &d.outputs
                && kinds
                    .iter()
                    .any(|k| !crate::report::OutputKind::FILTER_NAMES.contains(&k.as_str()))
            {
                return Err(invalid(
                    "destinations.outputs",
                    "kinds are \"sr\", \"sc\" and \"gsps\"",
                ));
            }
        }
        self.validate_sources()
            .map_err(|(key, m)| invalid(key, &m))?;
        if self.outbox.max_attempts < 1 {
            return Err(invalid("outbox.max_attempts", "must be at least 1"));
        }
        if self.outbox.timeout_secs == 0 {
            return Err(invalid("outbox.timeout_secs", "must be at least 1"));
        }
        if self.model.queue == 0 {
            return Err(invalid("model.queue", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.report.threshold) {
            return Err(invalid("report.threshold", "must be between 0 and 1"));
        }
        if self.cases.window_days < 0 {
            return Err(invalid("cases.window_days", "must not be negative"));
        }
        if self.cases.queue == 0 {
            return Err(invalid("cases.queue", "must be at least 1"));
        }
        if self.cases.mri_series_required == 0 {
            return Err(invalid("cases.mri_series_required", "must be at least 1"));
        }
        self.validate_http().map_err(|(key, m)| invalid(key, &m))?;
        if self.storage.data_dir.as_os_str().is_empty() {
            return Err(invalid("storage.data_dir", "must not be empty"));
        }
        if !self.database.url.is_empty() && crate::db::Backend::of(&self.database.url).is_none() {
            return Err(invalid(
                "database.url",
                "must be a sqlite: or postgres:// URL",
            ));
        }
        Ok(())
    }

    fn validate_sources(&self) -> Result<(), (&'static str, String)> {
        let mut names = std::collections::BTreeSet::new();
        for src in &self.sources {
            if let Some(web) = &src.dicomweb {
                if !src.ae_title.is_empty()
                    || !src.host.is_empty()
                    || src.port != 0
                    || src.tls.is_some()
                    || src.retrieve != RetrieveMethod::Move
                    || src.timeout_secs != 0
                {
                    return Err((
                        "sources.dicomweb",
                        "a DICOMweb source has no ae_title, host, port, tls, retrieve or \
                         timeout_secs (it retrieves by WADO-RS; its TLS is \
                         dicomweb.ca_certificate, its time per request dicomweb.timeout_secs)"
                            .into(),
                    ));
                }
                if let Some(m) = web.problem() {
                    return Err(("sources.dicomweb", m));
                }
            } else {
                validate_ae_title(&src.ae_title).map_err(|m| ("sources.ae_title", m))?;
                if src.host.trim().is_empty() || src.port == 0 {
                    return Err((
                        "sources",
                        format!("source {:?}: host and port are required", src.name()),
                    ));
                }
            }
            if !names.insert(src.name()) {
                return Err(("sources.name", format!("{:?} is repeated", src.name())));
            }
        }
        let f = &self.fetch;
        if f.max_retrieves_per_source == 0 || f.timeout_secs == 0 || f.source_timeout_secs == 0 {
            return Err((
                "fetch",
                "max_retrieves_per_source, timeout_secs and source_timeout_secs must be at least 1"
                    .into(),
            ));
        }
        if f.max_matches == 0 {
            return Err(("fetch.max_matches", "must be at least 1".into()));
        }
        if !f.move_destination.is_empty() {
            validate_ae_title(&f.move_destination).map_err(|m| ("fetch.move_destination", m))?;
        }
        Ok(())
    }

    fn validate_http(&self) -> Result<(), (&'static str, String)> {
        let h = &self.http;
        if h.max_body_bytes == 0 || h.header_timeout_secs == 0 || h.request_timeout_secs == 0 {
            return Err((
                "http",
                "max_body_bytes, header_timeout_secs and request_timeout_secs must be at least 1"
                    .into(),
            ));
        }
        if h.stow_max_body_bytes == 0 || h.stow_timeout_secs == 0 || h.stow_concurrency == 0 {
            return Err((
                "http",
                "stow_max_body_bytes, stow_timeout_secs and stow_concurrency must be at least 1"
                    .into(),
            ));
        }
        if h.max_connections == 0 {
            return Err(("http.max_connections", "must be at least 1".into()));
        }
        if h.tls.enabled
            && (h.tls.certificate.as_os_str().is_empty()
                || h.tls.private_key.as_os_str().is_empty())
        {
            return Err((
                "http.tls",
                "certificate and private_key must name PEM files when http.tls.enabled = true"
                    .into(),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for u in &h.users {
            if u.name.trim().is_empty() || !names.insert(u.name.as_str()) {
                return Err((
                    "http.users.name",
                    format!("{:?} is empty or repeated", u.name),
                ));
            }
            let hex_ok =
                u.token_sha256.len() == 64 && u.token_sha256.bytes().all(|b| b.is_ascii_hexdigit());
            if !hex_ok {
                return Err((
                    "http.users.token_sha256",
                    format!(
                        "user {:?}: must be the 64 hex digits of SHA-256(token) \
                         (`her2map token NAME --role ROLE` prints one)",
                        u.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The database URL, defaulting to `sqlite://{data_dir}/her2map.db`.
    pub fn database_url(&self) -> String {
        if self.database.url.is_empty() {
            format!(
                "sqlite://{}",
                self.storage.data_dir.join("her2map.db").display()
            )
        } else {
            self.database.url.clone()
        }
    }

    /// The folder holding received instances.
    pub fn spool_dir(&self) -> PathBuf {
        self.storage.data_dir.join("spool")
    }
}

/// PS3.5 6.2: an AE title is 1-16 characters of the default repertoire,
/// without backslash or control characters; leading/trailing spaces are
/// insignificant.
pub fn validate_ae_title(ae: &str) -> Result<(), String> {
    let trimmed = ae.trim();
    if trimmed.is_empty() || trimmed.len() > 16 {
        return Err(format!("AE title must be 1 to 16 characters, got {ae:?}"));
    }
    if trimmed
        .chars()
        .any(|c| !c.is_ascii() || c.is_ascii_control() || c == '\\')
    {
        return Err(format!(
            "AE title may hold printable ASCII without backslash, got {ae:?}"
        ));
    }
    Ok(())
}

/// Resolve a peer's optional host to the addresses it may connect from.
pub fn resolve_host(host: &str) -> Vec<IpAddr> {
    use std::net::ToSocketAddrs;
    if let Ok(ip) = host.parse::<IpAddr>() {
        return vec![ip];
    }
    (host, 0)
        .to_socket_addrs()
        .map(|it| it.map(|a| a.ip()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_checked_as_they_load() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        let load = |text: &str| {
            std::fs::write(&file, text).unwrap();
            Settings::load_with_env(Some(&file), false)
        };
        let s = load(
            "[[sources]]\nname = \"pacs\"\nae_title = \"PACS\"\nhost = \"h\"\nport = 104\n\
             retrieve = \"get\"\ntimeout_secs = 5\n\
             [[sources]]\nname = \"web\"\n[sources.dicomweb]\nurl = \"https://pacs.example.org/dicom-web\"\n",
        )
        .unwrap();
        assert_eq!(s.sources[0].retrieve, RetrieveMethod::Get);
        assert_eq!(s.sources[0].timeout_secs, 5);
        assert_eq!(s.sources[1].dicomweb.as_ref().unwrap().timeout_secs, 60);
        for (text, names) in [
            // A DICOMweb source's time per request is its dicomweb.timeout_secs.
            (
                "[[sources]]\nname = \"web\"\ntimeout_secs = 5\n[sources.dicomweb]\nurl = \"https://p/dicom-web\"\n",
                "sources.dicomweb",
            ),
            (
                "[[sources]]\nname = \"web\"\nport = 104\n[sources.dicomweb]\nurl = \"https://p/dicom-web\"\n",
                "sources.dicomweb",
            ),
            (
                "[[sources]]\nname = \"pacs\"\nae_title = \"PACS\"\nport = 104\n",
                "sources",
            ),
            (
                "[[sources]]\nname = \"pacs\"\nae_title = \"NOT A VALID AE TITLE!\"\nhost = \"h\"\nport = 104\n",
                "sources.ae_title",
            ),
        ] {
            let err = load(text).unwrap_err().to_string();
            assert!(err.contains(names), "{text}: {err}");
        }
    }

    #[test]
    fn default_configuration_loads() {
        let s = Settings::load_with_env(None, false).unwrap();
        assert_eq!(s.dicom.ae_title, "HER2MAP");
        assert_eq!(s.dicom.port, 11112);
        assert!(s.dicom.peers.is_empty());
        assert!(!s.dicom.tls.enabled);
        assert_eq!(s.dicom.tls.port, 2762);
        assert_eq!(s.dicom.artim_timeout_secs, 10);
        assert_eq!(s.dicom.max_pending_connections, 64);
        assert!(s.database_url().ends_with("data/her2map.db"));
    }

    #[test]
    fn file_layers_over_default_and_unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[dicom]\nport = 0\n[[dicom.peers]]\nae_title = \"PACS\"\nhost = \"127.0.0.1\"\n",
        )
        .unwrap();
        let s = Settings::load_with_env(Some(&file), false).unwrap();
        assert_eq!(s.dicom.port, 0);
        assert_eq!(s.dicom.peers.len(), 1);
        assert_eq!(s.dicom.ae_title, "HER2MAP");

        std::fs::write(&file, "[dicom]\nprot = 0\n").unwrap();
        let err = Settings::load_with_env(Some(&file), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("prot"), "{err}");

        std::fs::write(&file, "[dicom.tls]\nenabled = true\n").unwrap();
        let err = Settings::load_with_env(Some(&file), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("dicom.tls.certificate"), "{err}");

        std::fs::write(
            &file,
            "[[destinations]]\nae_title = \"PACS\"\nhost = \"h\"\nport = 104\n\
             [[destinations]]\noutputs = [\"sr\"]\n[destinations.dicomweb]\n\
             url = \"https://pacs.example.org/dicom-web/\"\nbearer_token_env = \"PACS_TOKEN\"\n",
        )
        .unwrap();
        let s = Settings::load_with_env(Some(&file), false).unwrap();
        assert_eq!(s.destinations[0].name(), "PACS@h:104");
        assert!(s.destinations[0].dicomweb.is_none());
        let web = s.destinations[1].dicomweb.as_ref().unwrap();
        assert_eq!(web.timeout_secs, 60);
        assert_eq!(
            s.destinations[1].name(),
            "https://pacs.example.org/dicom-web"
        );
        for bad in [
            // Both kinds at once.
            "[[destinations]]\nae_title = \"PACS\"\n[destinations.dicomweb]\nurl = \"http://h/dw\"\n",
            // A password in the URL.
            "[[destinations]]\n[destinations.dicomweb]\nurl = \"http://u:p@h/dw\"\n",
            // Not HTTP.
            "[[destinations]]\n[destinations.dicomweb]\nurl = \"h/dw\"\n",
            // A user without a password source.
            "[[destinations]]\n[destinations.dicomweb]\nurl = \"http://h/dw\"\nbasic_user = \"u\"\n",
            // Two token sources.
            "[[destinations]]\n[destinations.dicomweb]\nurl = \"http://h/dw\"\n\
             bearer_token_env = \"A\"\nbearer_token_file = \"/f\"\n",
        ] {
            std::fs::write(&file, bad).unwrap();
            let err = Settings::load_with_env(Some(&file), false)
                .unwrap_err()
                .to_string();
            assert!(err.contains("destinations.dicomweb"), "{bad}: {err}");
        }

        std::fs::write(&file, "[dicom]\nae_title = \"THIS-IS-FAR-TOO-LONG\"\n").unwrap();
        let err = Settings::load_with_env(Some(&file), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("dicom.ae_title"), "{err}");
    }
}
