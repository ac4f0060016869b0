//! `GET /metrics`: the Prometheus text format of the node's counters
//! ([`crate::metrics`]) plus the gauges read at scrape time (cases by state,
//! outbox rows per destination and state, spool free bytes, inference
//! queue depth, build info). Protected like the API unless
//! `[http] metrics_public = true`.

use axum::Router;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::Shared;
use super::auth::Viewer;
use crate::metrics::{METRICS, gauge};

pub fn routes() -> Router<Shared> {
    Router::new().route("/metrics", get(metrics))
}

async fn metrics(State(s): State<Shared>, req: Request) -> Response {
    if !s.metrics_public {
        let (mut parts, _) = req.into_parts();
        if let Err(e) = Viewer::from_request_parts(&mut parts, &s).await {
            return e.into_response();
        }
    }
    let mut out = String::with_capacity(8192);
    METRICS.render(&mut out);
    scraped(&s, &mut out).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

/// The gauges that are views of stored state.
async fn scraped(s: &Shared, out: &mut String) {
    let version = env!("CARGO_PKG_VERSION");
    gauge(
        out,
        "her2map_build_info",
        "Build of the running node (always 1).",
        &[(&[("version", version)], 1.0)],
    );
    // Readiness as the scrape sees it, so that an alert needs no probe of
    // /ready beside the scrape (conf/prometheus/her2map-rules.yml).
    let ready = super::health::checks(s).await;
    gauge(
        out,
        "her2map_ready",
        "1 when every readiness check of /ready passes, else 0.",
        &[(&[], f64::from(u8::from(ready.ready)))],
    );
    let samples: Vec<([(&str, &str); 1], f64)> = ready
        .checks
        .iter()
        .map(|c| ([("check", c.name)], f64::from(u8::from(c.ok))))
        .collect();
    let refs: Vec<(&[(&str, &str)], f64)> = samples.iter().map(|(l, v)| (&l[..], *v)).collect();
    gauge(
        out,
        "her2map_ready_check",
        "1 when the readiness check passes (database, spool, model, dicom), else 0.",
        &refs,
    );
    if let Ok(counts) = s.db.case_state_counts().await {
        let mut all: Vec<(String, f64)> = crate::db::CaseState::ALL
            .iter()
            .map(|st| (st.as_str().to_string(), 0.0))
            .collect();
        for (st, n) in counts {
            if let Some(e) = all.iter_mut().find(|(k, _)| k == st.as_str()) {
                e.1 = n as f64;
            }
        }
        let samples: Vec<([(&str, &str); 1], f64)> = all
            .iter()
            .map(|(k, v)| ([("state", k.as_str())], *v))
            .collect();
        let refs: Vec<(&[(&str, &str)], f64)> = samples.iter().map(|(l, v)| (&l[..], *v)).collect();
        gauge(out, "her2map_cases", "Cases by state.", &refs);
    }
    if let Ok(rows) = s.db.outbox_state_counts().await {
        let samples: Vec<([(&str, &str); 2], f64)> = rows
            .iter()
            .map(|(d, st, n)| {
                (
                    [("destination", d.as_str()), ("state", st.as_str())],
                    *n as f64,
                )
            })
            .collect();
        let refs: Vec<(&[(&str, &str)], f64)> = samples.iter().map(|(l, v)| (&l[..], *v)).collect();
        gauge(
            out,
            "her2map_outbox_deliveries",
            "Result deliveries by destination and state (pending, sent, dead).",
            &refs,
        );
    }
    if let Some(free) = super::health::spool_free(s) {
        gauge(
            out,
            "her2map_spool_free_bytes",
            "Free bytes on the spool's file system.",
            &[(&[], free as f64)],
        );
    }
    gauge(
        out,
        "her2map_inference_queue_depth",
        "Requests waiting for the inference engine.",
        &[(&[], s.engine.queue_depth() as f64)],
    );
}
