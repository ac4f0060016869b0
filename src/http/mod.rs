//! The node's one HTTP server (issue 15): the administrator's console
//! ([`pages`]), the REST API under `/api/v1` ([`api`], described by
//! [`openapi`]), Prometheus metrics ([`metrics`]) and the health checks
//! ([`health`]), STOW-RS in ([`stow`]), behind bearer-token users and
//! roles ([`auth`]). It owns
//! the listener, its accept loop and per-connection limits (slow headers,
//! slow bodies, body size, connection count: issue 19's HTTP part); it
//! reads and acts only through `ops` and `db`, as the CLI does.

pub mod api;
pub mod auth;
pub mod health;
pub mod metrics;
pub mod openapi;
pub mod pages;
pub mod stow;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{debug, info, warn};

use crate::audit_limit::AuditLimit;
use crate::cases::CaseRules;
use crate::clock::Clock;
use crate::config::{HttpSettings, Settings, TlsSettings};
use crate::db::Db;
use crate::inference::EngineHandle;

/// What the handlers share.
pub struct Console {
    pub db: Db,
    pub clock: Clock,
    pub rules: CaseRules,
    pub users: auth::Users,
    pub show_phi: bool,
    pub metrics_public: bool,
    pub secure_cookie: bool,
    pub engine: EngineHandle,
    pub data_dir: PathBuf,
    pub spool_dir: PathBuf,
    pub min_free_bytes: u64,
    pub dicom_addr: SocketAddr,
    /// Whether the DICOM listener accepts: the `dicom` readiness check.
    pub dicom_listening: crate::dimse::server::Listening,
    pub ae_title: String,
    /// Where STOW-RS instances go: the same ingest as C-STORE.
    pub ingest: crate::ingest::Ingest,
    /// `[dicom] accept_any_storage`: STOW-RS takes the SCP's SOP classes.
    pub accept_any_storage: bool,
    /// Cancelled when the node stops (the `dicom` check fails from then).
    pub shutdown: CancellationToken,
    /// The rate limit of the events a peer can cause at will (failed
    /// sign-ins, cut connections).
    audit_limit: AuditLimit,
}

pub type Shared = Arc<Console>;

/// The parts of the running node the server reads.
pub struct Parts {
    pub db: Db,
    pub clock: Clock,
    pub engine: EngineHandle,
    pub dicom_addr: SocketAddr,
    pub dicom_listening: crate::dimse::server::Listening,
    pub ingest: crate::ingest::Ingest,
}

/// The bound HTTP server, ready to serve.
pub struct HttpServer {
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
    console: Shared,
    settings: HttpSettings,
    addr: SocketAddr,
    /// The console's copy of the node's shutdown (readiness reads it).
    stopping: CancellationToken,
}

/// Bind the server of `[http]` (None when disabled). Without users it binds
/// to loopback whatever `host` says: an open console stays on this machine.
pub async fn bind(settings: &Settings, parts: Parts) -> anyhow::Result<Option<HttpServer>> {
    let h = &settings.http;
    if !h.enabled {
        return Ok(None);
    }
    let tls = if h.tls.enabled {
        let config = crate::dimse::tls::server_config(&TlsSettings {
            enabled: true,
            port: 0,
            certificate: h.tls.certificate.clone(),
            private_key: h.tls.private_key.clone(),
            client_ca: PathBuf::new(),
        })
        .map_err(|e| anyhow::anyhow!(e.to_string().replace("dicom.tls", "http.tls")))?;
        Some(tokio_rustls::TlsAcceptor::from(config))
    } else {
        None
    };
    let mut host = h.host.clone();
    if h.users.is_empty() {
        let loopback = host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
            || host == "localhost";
        if !loopback {
            warn!(configured = %host, "no [[http.users]] configured: HTTP binds to 127.0.0.1 only");
        } else {
            info!(
                "no [[http.users]] configured: HTTP serves this machine only (loopback), read-only"
            );
        }
        host = "127.0.0.1".into();
    }
    let bind = format!("{host}:{}", h.port);
    let listener = TcpListener::bind(&bind)
        .await
        .with_context(|| format!("binding the HTTP port {bind}"))?;
    let addr = listener.local_addr()?;
    let console = Arc::new(Console {
        db: parts.db,
        clock: parts.clock,
        rules: settings.case_rules(),
        users: auth::Users::new(&h.users),
        show_phi: h.show_phi,
        metrics_public: h.metrics_public,
        secure_cookie: h.tls.enabled,
        engine: parts.engine,
        data_dir: settings.storage.data_dir.clone(),
        spool_dir: settings.spool_dir(),
        min_free_bytes: settings.storage.min_free_mb << 20,
        dicom_addr: parts.dicom_addr,
        dicom_listening: parts.dicom_listening,
        ae_title: settings.dicom.ae_title.trim().to_string(),
        ingest: parts.ingest,
        accept_any_storage: settings.dicom.accept_any_storage,
        shutdown: CancellationToken::new(),
        audit_limit: AuditLimit::new(),
    });
    let stopping = console.shutdown.clone();
    Ok(Some(HttpServer {
        listener,
        tls,
        stopping,
        console: console.clone(),
        router: router(console, h),
        settings: h.clone(),
        addr,
    }))
}

/// Every route, with the limits every request gets (STOW-RS has its own
/// body limit and timeout: [`stow::routes`]).
pub fn router(console: Shared, h: &HttpSettings) -> Router {
    Router::new()
        .merge(health::routes())
        .merge(metrics::routes())
        .merge(api::routes())
        .merge(pages::routes())
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(h.max_body_bytes))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            h.max_body_bytes,
        ))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(h.request_timeout_secs),
        ))
        .merge(stow::routes(h))
        .layer(middleware::from_fn(count_and_harden))
        .with_state(console)
}

async fn not_found(req: Request) -> Response {
    if req.uri().path().starts_with("/api/") {
        api::ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint").into_response()
    } else {
        (StatusCode::NOT_FOUND, "not found").into_response()
    }
}

/// Count the answer by code class; every answer says not to be cached or
/// framed (it may carry PHI). A URL carrying a NUL character (`%00`) is
/// refused here, once for every route: no identifier or filter of the node
/// can hold one, and PostgreSQL rejects NUL in text parameters, which would
/// otherwise come back as a database error (503) instead of the client's
/// mistake (400).
async fn count_and_harden(req: Request, next: Next) -> Response {
    let has_nul = req
        .uri()
        .path_and_query()
        .is_some_and(|pq| pq.as_str().to_ascii_lowercase().contains("%00"));
    let path = req.uri().path();
    let json_errors = path.starts_with("/api/") || path.starts_with("/dicom-web/");
    let mut resp = if has_nul {
        let msg = "the URL contains a NUL character (%00)";
        if json_errors {
            api::ApiError::bad(msg).into_response()
        } else {
            (StatusCode::BAD_REQUEST, msg).into_response()
        }
    } else {
        let resp = next.run(req).await;
        if json_errors {
            as_json_error(resp)
        } else {
            resp
        }
    };
    let class = format!("{}xx", resp.status().as_u16() / 100);
    crate::metrics::METRICS.http_requests.inc(&[&class]);
    let h = resp.headers_mut();
    use axum::http::header::{self, HeaderValue};
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// An error answer the layers or the router made themselves (the body
/// limit's 413, the timeout's 408, a wrong method's 405: plain text) as the
/// API's JSON error, so an API client always gets `{"error", "message"}`.
fn as_json_error(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.contains("+json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (code, message) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => (
            "payload_too_large",
            "the request body is larger than the node accepts",
        ),
        StatusCode::REQUEST_TIMEOUT => (
            "request_timeout",
            "the request took longer than the node waits",
        ),
        StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", "this method is not allowed here"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            ("unsupported_media_type", "unsupported Content-Type")
        }
        StatusCode::NOT_FOUND => ("not_found", "not found"),
        s if s.is_client_error() => ("bad_request", "the request was refused"),
        _ => ("internal_error", "the node could not answer"),
    };
    let mut out = api::ApiError::new(status, code, message).into_response();
    // Keep what the original answer said beyond its body (Allow on a 405).
    for (name, value) in resp.headers() {
        if name != axum::http::header::CONTENT_TYPE && name != axum::http::header::CONTENT_LENGTH {
            out.headers_mut().entry(name).or_insert(value.clone());
        }
    }
    out
}

/// Record an audit event; the audit log failing must not take a request
/// (or the server) down.
async fn audit(state: &Console, name: &str, detail: serde_json::Value) {
    let e = crate::db::NewEvent {
        event: name,
        detail: Some(detail),
        ..Default::default()
    };
    if let Err(err) = state.db.record(e, state.clock.now()).await {
        tracing::error!(error = %err, "audit event could not be recorded");
    }
}

/// Reasons of [`event::HTTP_CONNECTION_CUT`](crate::db::event::HTTP_CONNECTION_CUT).
pub const TLS_HANDSHAKE_TIMEOUT: &str = "tls_handshake_timeout";
pub const TLS_HANDSHAKE_FAILED: &str = "tls_handshake_failed";
pub const HEADER_TIMEOUT: &str = "header_timeout";

/// Audit the events the rate limit lets through (one cut, or a summary).
async fn audit_cuts(state: &Console, events: Vec<crate::audit_limit::Limited>) {
    for (peer, reason) in events {
        warn!(%peer, %reason, "HTTP connection cut");
        let detail = serde_json::json!({ "peer": peer.to_string(), "reason": reason });
        audit(state, crate::db::event::HTTP_CONNECTION_CUT, detail).await;
    }
}

async fn cut(state: &Console, reason: &'static str, peer: SocketAddr) {
    let events = state.audit_limit.note(reason, peer);
    audit_cuts(state, events).await;
}

impl HttpServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every route with its state, for callers in this process that send
    /// requests without a socket (the HTTP fuzz target).
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// Serve until `shutdown`; then finish in-flight requests (at most 5 s).
    pub async fn run(self, shutdown: CancellationToken) {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        info!(address = %self.addr, "HTTP listening on {scheme}://{}", self.addr);
        let (node, mine) = (shutdown.clone(), self.stopping.clone());
        tokio::spawn(async move {
            node.cancelled().await;
            mine.cancel();
        });
        let limit = Arc::new(tokio::sync::Semaphore::new(self.settings.max_connections));
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let header_timeout = Duration::from_secs(self.settings.header_timeout_secs);
        // The summaries of rate-limited events, once their window is over.
        let flusher = {
            let (console, stop) = (self.console.clone(), shutdown.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(crate::audit_limit::WINDOW) => {}
                        _ = stop.cancelled() => break,
                    }
                    audit_cuts(&console, console.audit_limit.flush(false)).await;
                }
            })
        };
        loop {
            let permit = tokio::select! {
                p = limit.clone().acquire_owned() => p.expect("semaphore open"),
                _ = shutdown.cancelled() => break,
            };
            let (stream, peer) = tokio::select! {
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "HTTP accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => break,
            };
            let _ = stream.set_nodelay(true);
            let router = self.router.clone();
            let console = self.console.clone();
            let tls = self.tls.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let _permit = permit;
                let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let mut req = req.map(axum::body::Body::new);
                    req.extensions_mut().insert(ConnectInfo(peer));
                    router.clone().oneshot(req)
                });
                let builder = {
                    let mut b = hyper::server::conn::http1::Builder::new();
                    b.timer(TokioTimer::new())
                        .header_read_timeout(header_timeout)
                        .keep_alive(true);
                    b
                };
                let result = match tls {
                    None => {
                        let conn = builder.serve_connection(TokioIo::new(stream), service);
                        watcher.watch(conn).await
                    }
                    Some(acceptor) => {
                        // The handshake is bounded like the headers.
                        match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => {
                                let conn = builder.serve_connection(TokioIo::new(s), service);
                                watcher.watch(conn).await
                            }
                            Ok(Err(e)) => {
                                debug!(%peer, error = %e, "HTTPS handshake failed");
                                cut(&console, TLS_HANDSHAKE_FAILED, peer).await;
                                return;
                            }
                            Err(_) => {
                                cut(&console, TLS_HANDSHAKE_TIMEOUT, peer).await;
                                return;
                            }
                        }
                    }
                };
                match result {
                    // hyper's header_read_timeout: the request line and
                    // headers did not arrive in time (a slow or idle client).
                    Err(e) if e.is_timeout() => cut(&console, HEADER_TIMEOUT, peer).await,
                    Err(e) => debug!(%peer, error = %e, "HTTP connection ended"),
                    Ok(()) => {}
                }
            });
        }
        drop(self.listener);
        let _ = flusher.await;
        audit_cuts(&self.console, self.console.audit_limit.flush(true)).await;
        if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
            .await
            .is_err()
        {
            warn!("HTTP connections still open after 5 s; closing them");
        }
    }
}
