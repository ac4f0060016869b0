//! `GET /health` (the process answers) and `GET /ready` (the database
//! answers, the spool has more than `storage.min_free_mb` free, the model
//! is loaded, the DICOM listener is up), for load balancers and probes:
//! no token, no PHI, 503 when not ready.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::{Console, Shared};

/// One readiness check and how it went.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub checks: Vec<Check>,
}

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "alive", "version": env!("CARGO_PKG_VERSION") }))
}

async fn ready(State(s): State<Shared>) -> impl IntoResponse {
    let r = checks(&s).await;
    let code = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(r))
}

/// Run every readiness check (the database with a 2 s bound).
pub async fn checks(s: &Console) -> Readiness {
    let db = match tokio::time::timeout(std::time::Duration::from_secs(2), s.db.ping()).await {
        Ok(Ok(())) => (true, "answers".to_string()),
        Ok(Err(e)) => (false, e.to_string()),
        Err(_) => (false, "no answer within 2 s".to_string()),
    };
    let spool = match spool_free(s) {
        Some(free) if free > s.min_free_bytes => (true, format!("{} MB free", free >> 20)),
        Some(free) => (
            false,
            format!(
                "{} MB free, at or below the minimum of {} MB",
                free >> 20,
                s.min_free_bytes >> 20
            ),
        ),
        None => (false, "free space unknown".to_string()),
    };
    let model = if s.engine.is_running() {
        (true, "loaded".to_string())
    } else {
        (false, "the engine thread has stopped".to_string())
    };
    let dicom = if s.shutdown.is_cancelled() {
        (false, "stopping".to_string())
    } else if !s.dicom_listening.is_up() {
        (false, format!("not accepting on {}", s.dicom_addr))
    } else {
        (true, format!("listening on {}", s.dicom_addr))
    };
    let checks: Vec<Check> = [
        ("database", db),
        ("spool", spool),
        ("model", model),
        ("dicom", dicom),
    ]
    .into_iter()
    .map(|(name, (ok, detail))| Check { name, ok, detail })
    .collect();
    Readiness {
        ready: checks.iter().all(|c| c.ok),
        checks,
    }
}

/// Free bytes on the spool's file system.
pub fn spool_free(s: &Console) -> Option<u64> {
    fs4::available_space(&s.spool_dir).ok()
}
