//! The node's DICOMweb user agent (PS3.18): QIDO-RS search (10.6), WADO-RS
//! series retrieve (10.4) and STOW-RS store (10.5) against one
//! [`DicomWebEndpoint`], on reqwest with rustls (ring). Errors say whether
//! trying again can help ([`DicomWebError::is_transient`]): the outbox
//! and the retrieve scheduler decide on that alone.

use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderValue};

use super::json::StowResponse;
use super::multipart::{self, Limits};
use crate::config::DicomWebEndpoint;

/// The media type of a Part 10 instance (PS3.18 8.7.3.5).
pub const APPLICATION_DICOM: &str = "application/dicom";
/// The DICOM JSON model (PS3.18 F.2).
pub const APPLICATION_DICOM_JSON: &str = "application/dicom+json";
/// Largest QIDO-RS response read (a JSON array of matches).
const MAX_SEARCH_BYTES: usize = 64 << 20;
/// Largest WADO-RS series response read; it is held in memory.
const MAX_RETRIEVE_BYTES: usize = 4 << 30;
/// Largest error or STOW-RS response body read.
const MAX_SMALL_BODY_BYTES: usize = 4 << 20;
/// How much of an error body goes into the error's text.
const REASON_CHARS: usize = 300;

/// Why a DICOMweb request failed.
#[derive(Debug, thiserror::Error)]
pub enum DicomWebError {
    /// The endpoint's settings are unusable (token file missing, bad CA).
    #[error("DICOMweb settings: {0}")]
    Config(String),
    /// The service answered with an error status; `reason` is what its body
    /// says (the STOW-RS failure reasons, or its message).
    #[error("HTTP {status} from {url}: {reason}")]
    Status {
        status: u16,
        url: String,
        reason: String,
    },
    /// No answer: connection refused or reset, TLS failure, timeout.
    #[error("{url}: {message}")]
    Transport {
        url: String,
        message: String,
        timeout: bool,
    },
    /// An answer the node cannot use (not JSON, not multipart, too large).
    #[error("{url}: unusable response: {message}")]
    Response { url: String, message: String },
}

impl DicomWebError {
    /// Worth trying again later: 5xx, 408 and 429 answers, and no answer
    /// at all. Everything else (4xx incl. 409, bad settings, unusable
    /// answers) fails the same way again: permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            DicomWebError::Status { status, .. } => {
                *status >= 500 || *status == 408 || *status == 429
            }
            DicomWebError::Transport { .. } => true,
            DicomWebError::Config(_) | DicomWebError::Response { .. } => false,
        }
    }

    pub fn is_permanent(&self) -> bool {
        !self.is_transient()
    }

    /// The HTTP status, when the service answered with one.
    pub fn status(&self) -> Option<u16> {
        match self {
            DicomWebError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// How the client proves who it is.
#[derive(Clone)]
enum Auth {
    None,
    Bearer(String),
    Basic(String, String),
}

/// A client for one DICOMweb service (cheap to clone).
#[derive(Clone)]
pub struct DicomWebClient {
    http: reqwest::Client,
    /// The service root without a trailing slash.
    base: String,
    auth: Auth,
}

impl std::fmt::Debug for DicomWebClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credentials.
        f.debug_struct("DicomWebClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// A secret from a file (trimmed) or an environment variable.
fn secret(
    file: &Option<std::path::PathBuf>,
    env: &Option<String>,
    what: &str,
) -> Result<Option<String>, DicomWebError> {
    if let Some(path) = file {
        let s = std::fs::read_to_string(path)
            .map_err(|e| DicomWebError::Config(format!("{what} file {}: {e}", path.display())))?;
        let s = s.trim().to_string();
        if s.is_empty() {
            return Err(DicomWebError::Config(format!(
                "{what} file {} is empty",
                path.display()
            )));
        }
        return Ok(Some(s));
    }
    if let Some(var) = env {
        let s = std::env::var(var).map_err(|_| {
            DicomWebError::Config(format!("{what}: environment variable {var} is not set"))
        })?;
        let s = s.trim().to_string();
        if s.is_empty() {
            return Err(DicomWebError::Config(format!(
                "{what}: environment variable {var} is empty"
            )));
        }
        return Ok(Some(s));
    }
    Ok(None)
}

impl DicomWebClient {
    /// A client for `endpoint`: reads its token or password and its CA now,
    /// so that a node with unusable settings says so at start.
    pub fn new(endpoint: &DicomWebEndpoint) -> Result<Self, DicomWebError> {
        if let Some(problem) = endpoint.problem() {
            return Err(DicomWebError::Config(problem));
        }
        let auth = if let Some(token) = secret(
            &endpoint.bearer_token_file,
            &endpoint.bearer_token_env,
            "bearer token",
        )? {
            Auth::Bearer(token)
        } else if let Some(user) = &endpoint.basic_user {
            let password = secret(
                &endpoint.basic_password_file,
                &endpoint.basic_password_env,
                "basic auth password",
            )?
            .unwrap_or_default();
            Auth::Basic(user.clone(), password)
        } else {
            Auth::None
        };
        let timeout = Duration::from_secs(endpoint.timeout_secs.max(1));
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .tcp_nodelay(true)
            // A redirect of a POST would be replayed as a GET: a wrong URL
            // is reported, not followed.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("her2map/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &endpoint.ca_certificate {
            let pem = std::fs::read(ca).map_err(|e| {
                DicomWebError::Config(format!("ca_certificate {}: {e}", ca.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                DicomWebError::Config(format!("ca_certificate {}: {e}", ca.display()))
            })?;
            if certs.is_empty() {
                return Err(DicomWebError::Config(format!(
                    "ca_certificate {}: no PEM certificate in it",
                    ca.display()
                )));
            }
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let http = builder
            .build()
            .map_err(|e| DicomWebError::Config(format!("HTTP client: {e}")))?;
        Ok(DicomWebClient {
            http,
            base: endpoint.url.trim().trim_end_matches('/').to_string(),
            auth,
        })
    }

    /// The service root this client talks to.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path.trim_start_matches('/'))
    }

    fn authorise(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            Auth::None => req,
            Auth::Bearer(t) => req.bearer_auth(t),
            Auth::Basic(u, p) => req.basic_auth(u, Some(p)),
        }
    }

    /// Send, mapping "no answer" to a transient error. `url` is the one
    /// errors show: without the query string (it may hold a Patient ID).
    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<reqwest::Response, DicomWebError> {
        self.authorise(req)
            .send()
            .await
            .map_err(|e| transport(url, &e))
    }

    /// QIDO-RS (PS3.18 10.6): `path` is `studies`, `series`,
    /// `studies/{uid}/series`, ...; the matches as DICOM JSON objects (an
    /// empty list for 204 No Content).
    pub async fn search(
        &self,
        path: &str,
        params: &[(&str, &str)],
    ) -> Result<Vec<serde_json::Value>, DicomWebError> {
        let url = self.url(path);
        let req = self
            .http
            .get(&url)
            .query(params)
            .header(ACCEPT, APPLICATION_DICOM_JSON);
        let resp = self.send(req, &url).await?;
        let status = resp.status();
        if status == StatusCode::NO_CONTENT {
            return Ok(Vec::new());
        }
        if !status.is_success() {
            return Err(status_error(resp, &url).await);
        }
        let body = read_limited(resp, MAX_SEARCH_BYTES, &url).await?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Vec::new());
        }
        match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(serde_json::Value::Array(matches)) => Ok(matches),
            Ok(_) => Err(DicomWebError::Response {
                url,
                message: "QIDO-RS answer is not a JSON array".into(),
            }),
            Err(e) => Err(DicomWebError::Response {
                url,
                message: format!("QIDO-RS answer is not JSON: {e}"),
            }),
        }
    }

    /// WADO-RS (PS3.18 10.4.1): every instance of a series, each a Part 10
    /// file, in the transfer syntax the service holds it in
    /// (`transfer-syntax=*`, PS3.18 8.7.3.5.2).
    pub async fn retrieve_series(
        &self,
        study_uid: &str,
        series_uid: &str,
    ) -> Result<Vec<Bytes>, DicomWebError> {
        let url = self.url(&format!("studies/{study_uid}/series/{series_uid}"));
        let req = self.http.get(&url).header(
            ACCEPT,
            "multipart/related; type=\"application/dicom\"; transfer-syntax=*",
        );
        let resp = self.send(req, &url).await?;
        if !resp.status().is_success() {
            return Err(status_error(resp, &url).await);
        }
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let boundary =
            multipart::boundary_of(&content_type).map_err(|e| DicomWebError::Response {
                url: url.clone(),
                message: e.to_string(),
            })?;
        let body = read_limited(resp, MAX_RETRIEVE_BYTES, &url).await?;
        let limits = Limits {
            max_parts: 100_000,
            max_bytes: MAX_RETRIEVE_BYTES,
        };
        let parts = multipart::parse(&body, &boundary, &limits)
            .and_then(|parts| multipart::require_type(&parts, APPLICATION_DICOM).map(|()| parts))
            .map_err(|e| DicomWebError::Response {
                url: url.clone(),
                message: e.to_string(),
            })?;
        Ok(parts.into_iter().map(|p| p.body).collect())
    }

    /// STOW-RS (PS3.18 10.5): store Part 10 instances, under `studies` or
    /// `studies/{study_uid}`. 200 and 202 (some failed: see
    /// [`StowResponse::failed`]) are answers; 409 (none stored) and every
    /// other error status is a [`DicomWebError::Status`] whose reason holds
    /// the failure reasons of the response.
    pub async fn store(
        &self,
        study_uid: Option<&str>,
        instances: Vec<Vec<u8>>,
    ) -> Result<StowResponse, DicomWebError> {
        let url = match study_uid {
            Some(uid) => self.url(&format!("studies/{uid}")),
            None => self.url("studies"),
        };
        let boundary = multipart::new_boundary();
        let parts: Vec<(&str, Vec<u8>)> = instances
            .into_iter()
            .map(|b| (APPLICATION_DICOM, b))
            .collect();
        let body = multipart::build(&parts, &boundary);
        drop(parts);
        let content_type =
            HeaderValue::from_str(&multipart::content_type(APPLICATION_DICOM, &boundary))
                .map_err(|e| DicomWebError::Config(e.to_string()))?;
        let req = self
            .http
            .post(&url)
            .header(CONTENT_TYPE, content_type)
            .header(ACCEPT, APPLICATION_DICOM_JSON)
            .body(body);
        let resp = self.send(req, &url).await?;
        let status = resp.status().as_u16();
        if status != 200 && status != 202 {
            return Err(status_error(resp, &url).await);
        }
        let body = read_limited(resp, MAX_SMALL_BODY_BYTES, &url).await?;
        // A success whose body cannot be read is still a success: the
        // status says what was stored.
        let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        Ok(StowResponse::from_json(status, &json))
    }
}

fn transport(url: &str, e: &reqwest::Error) -> DicomWebError {
    // The chain of causes (connection refused, certificate unknown, ...),
    // without the URL reqwest repeats (it may hold a query).
    let mut message = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "could not connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    DicomWebError::Transport {
        url: url.to_string(),
        message,
        timeout: e.is_timeout(),
    }
}

/// Read a body, at most `max` bytes.
async fn read_limited(
    mut resp: reqwest::Response,
    max: usize,
    url: &str,
) -> Result<Bytes, DicomWebError> {
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(DicomWebError::Response {
            url: url.to_string(),
            message: format!("answer larger than {max} bytes"),
        });
    }
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| transport(url, &e))? {
        if buf.len() + chunk.len() > max {
            return Err(DicomWebError::Response {
                url: url.to_string(),
                message: format!("answer larger than {max} bytes"),
            });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// An error status with the reason its body gives: a STOW-RS response's
/// failed instances, a JSON `Message`/`message`/`error`, or the text.
async fn status_error(resp: reqwest::Response, url: &str) -> DicomWebError {
    let status = resp.status().as_u16();
    let body = read_limited(resp, MAX_SMALL_BODY_BYTES, url)
        .await
        .unwrap_or_default();
    DicomWebError::Status {
        status,
        url: url.to_string(),
        reason: reason_of(status, &body),
    }
}

/// What an error body says, in one short line.
pub fn reason_of(status: u16, body: &[u8]) -> String {
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) {
        let stow = StowResponse::from_json(status, &json);
        if !stow.failed.is_empty() {
            return clip(&stow.failure_summary());
        }
        for key in ["Message", "message", "Details", "error", "detail"] {
            if let Some(m) = json.get(key).and_then(|v| v.as_str()) {
                return clip(m);
            }
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("no reason given")
            .to_string()
    } else {
        clip(text)
    }
}

fn clip(s: &str) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut out: String = one_line.chars().take(REASON_CHARS).collect();
    if one_line.chars().count() > REASON_CHARS {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(status: u16) -> DicomWebError {
        DicomWebError::Status {
            status,
            url: "u".into(),
            reason: String::new(),
        }
    }

    #[test]
    fn transient_and_permanent_failures() {
        for s in [500, 502, 503, 504, 408, 429] {
            assert!(err(s).is_transient(), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 413, 415] {
            assert!(err(s).is_permanent(), "{s}");
        }
        let t = DicomWebError::Transport {
            url: "u".into(),
            message: "refused".into(),
            timeout: false,
        };
        assert!(t.is_transient());
        assert!(DicomWebError::Config("x".into()).is_permanent());
    }

    #[test]
    fn reasons_come_from_the_body() {
        let stow = serde_json::json!({
            "00081198": { "vr": "SQ", "Value": [{
                "00081155": { "vr": "UI", "Value": ["1.2.3"] },
                "00081197": { "vr": "US", "Value": [43264] }
            }]}
        });
        let r = reason_of(409, stow.to_string().as_bytes());
        assert_eq!(r, "1.2.3: failure reason 0xA900");
        assert_eq!(
            reason_of(
                404,
                br#"{"HttpError":"Not Found","Message":"Unknown resource"}"#
            ),
            "Unknown resource"
        );
        assert_eq!(reason_of(404, b""), "Not Found");
        assert_eq!(reason_of(500, b"boom\r\nline"), "boom  line");
        assert!(reason_of(500, "x".repeat(1000).as_bytes()).chars().count() <= REASON_CHARS + 1);
    }

    #[test]
    fn settings_are_checked_and_secrets_read() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret\n").unwrap();
        let mut e = DicomWebEndpoint {
            url: "http://127.0.0.1:1/dicom-web/".into(),
            bearer_token_file: Some(token),
            timeout_secs: 5,
            ..Default::default()
        };
        let c = DicomWebClient::new(&e).unwrap();
        assert_eq!(c.base_url(), "http://127.0.0.1:1/dicom-web");
        assert!(!format!("{c:?}").contains("s3cret"));
        e.bearer_token_file = Some(dir.path().join("missing"));
        assert!(matches!(
            DicomWebClient::new(&e),
            Err(DicomWebError::Config(_))
        ));
        e.bearer_token_file = None;
        e.url = "http://user:pw@host/dicom-web".into();
        assert!(DicomWebClient::new(&e).is_err());
        e.url = "ftp://host".into();
        assert!(DicomWebClient::new(&e).is_err());
    }

    #[tokio::test]
    async fn no_service_is_a_transient_error() {
        // A port nothing listens on.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let c = DicomWebClient::new(&DicomWebEndpoint {
            url: format!("http://127.0.0.1:{port}/dicom-web"),
            timeout_secs: 5,
            ..Default::default()
        })
        .unwrap();
        let e = c
            .search("studies", &[("PatientID", "SECRET-ID")])
            .await
            .unwrap_err();
        assert!(e.is_transient(), "{e}");
        assert!(!e.to_string().contains("SECRET-ID"), "{e}");
    }
}
