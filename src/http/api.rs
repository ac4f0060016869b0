//! The REST API under `/api/v1`: JSON views of the node (status,
//! associations, cases, outbox, audit) and the operator actions, all from
//! `ops` (the code behind the CLI's views). Bad input is a 4xx with a JSON
//! body `{"error": CODE, "message": TEXT}`; nothing a client sends changes
//! state without the operator role.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::Shared;
use super::auth::{Operator, Viewer};
use crate::db::{CaseFilter, CaseState, DeliveryState, EventFilter, format_time, parse_time};
use crate::ops::{self, CaseAction, OpsError};

/// A 4xx/5xx answer with a JSON body naming the problem.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub(crate) fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.code, "message": self.message });
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"her2map\""),
            );
        }
        resp
    }
}

impl From<crate::db::DbError> for ApiError {
    fn from(e: crate::db::DbError) -> Self {
        tracing::error!(error = %e, "API database error");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database",
            "the database did not answer",
        )
    }
}

impl From<OpsError> for ApiError {
    fn from(e: OpsError) -> Self {
        match e {
            OpsError::NoCase(_) | OpsError::NoDelivery(_) => ApiError::not_found(e.to_string()),
            OpsError::NotAllowed { .. } | OpsError::Changed(_) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            OpsError::UnknownAction(_) => ApiError::bad(e.to_string()),
            OpsError::Db(e) => e.into(),
        }
    }
}

fn query_err(e: QueryRejection) -> ApiError {
    ApiError::bad(format!("query: {}", e.body_text()))
}

fn path_err(e: PathRejection) -> ApiError {
    ApiError::bad(format!("path: {}", e.body_text()))
}

fn json_err(e: JsonRejection) -> ApiError {
    let status = match e.status() {
        s if s.is_client_error() => s,
        _ => StatusCode::BAD_REQUEST,
    };
    ApiError::new(status, "bad_body", e.body_text())
}

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/associations", get(associations))
        .route("/api/v1/cases", get(cases))
        .route("/api/v1/cases/{id}", get(case))
        .route("/api/v1/cases/{id}/actions", post(case_action))
        .route("/api/v1/cases/{id}/outputs/{sop}/png", get(output_png))
        .route("/api/v1/outbox", get(outbox))
        .route("/api/v1/outbox/{id}/retry", post(retry))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/openapi.json", get(super::openapi::document))
}

/// `limit` and `offset` of a list.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Paging {
    pub limit: Option<i64>,
    pub offset: Option<i64>,
}

pub fn paging(limit: Option<i64>, offset: Option<i64>) -> Result<(i64, i64), ApiError> {
    let limit = limit.unwrap_or(50);
    let offset = offset.unwrap_or(0);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad("limit must be between 1 and 1000"));
    }
    if !(0..=i64::from(i32::MAX)).contains(&offset) {
        return Err(ApiError::bad("offset must be between 0 and 2147483647"));
    }
    Ok((limit, offset))
}

async fn status(
    State(s): State<Shared>,
    Viewer(user): Viewer,
) -> Result<Json<serde_json::Value>, ApiError> {
    let now = s.clock.now();
    let counts = ops::counts(&s.db, now).await?;
    let ready = super::health::checks(&s).await;
    Ok(Json(serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "ae_title": s.ae_title,
        "dicom_address": s.dicom_addr.to_string(),
        "time": format_time(now),
        "ready": ready.ready,
        "checks": ready.checks,
        "associations_active": crate::metrics::METRICS
            .associations_active
            .load(std::sync::atomic::Ordering::Relaxed),
        "inference_queue_depth": s.engine.queue_depth(),
        "counts": counts,
        "user": { "name": user.name, "role": user.role },
    })))
}

async fn associations(
    State(s): State<Shared>,
    _: Viewer,
    q: Result<Query<Paging>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = q.map_err(query_err)?;
    let (limit, offset) = paging(q.limit, q.offset)?;
    let items = s.db.recent_associations(limit, offset).await?;
    Ok(Json(
        serde_json::json!({ "items": items, "limit": limit, "offset": offset }),
    ))
}

/// The cases list's query: the console's cases page reads the same.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CasesQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Opened at or after (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Opened before (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<i64>,
}

impl CasesQuery {
    /// The database filter, or what is wrong with the query; empty values
    /// (a page's form sends its empty fields) mean no filter.
    pub fn filter(&self) -> Result<CaseFilter, ApiError> {
        let state = self
            .state
            .as_deref()
            .filter(|v| !v.is_empty())
            .map(|v| v.parse::<CaseState>())
            .transpose()
            .map_err(|e| ApiError::bad(format!("state: {e}")))?;
        Ok(CaseFilter {
            state,
            opened_since: time_param("since", &self.since)?,
            opened_until: time_param("until", &self.until)?,
        })
    }
}

/// An optional RFC 3339 time parameter, in the database's format; empty
/// is none.
fn time_param(name: &str, v: &Option<String>) -> Result<Option<String>, ApiError> {
    match v.as_deref().filter(|t| !t.is_empty()) {
        None => Ok(None),
        Some(t) => parse_time(t).map(|t| Some(format_time(t))).ok_or_else(|| {
            ApiError::bad(format!(
                "{name}: not an RFC 3339 time (2026-12-01T10:00:00Z)"
            ))
        }),
    }
}

async fn cases(
    State(s): State<Shared>,
    _: Viewer,
    q: Result<Query<CasesQuery>, QueryRejection>,
) -> Result<Json<ops::Page<ops::CaseView>>, ApiError> {
    let Query(q) = q.map_err(query_err)?;
    let (limit, offset) = paging(q.limit, q.offset)?;
    let filter = q.filter()?;
    Ok(Json(
        ops::list_cases(&s.db, &s.rules, &filter, limit, offset).await?,
    ))
}

async fn case(
    State(s): State<Shared>,
    Viewer(user): Viewer,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(id) = id.map_err(path_err)?;
    let detail = ops::case_detail(&s.db, &s.rules, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no case {id}")))?;
    let mut v = serde_json::to_value(&detail).unwrap_or_default();
    if user.signed_in && s.show_phi {
        v["patient"] =
            serde_json::to_value(super::pages::patient_of(&s, &id).await).unwrap_or_default();
    }
    Ok(Json(v))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action: String,
}

async fn case_action(
    State(s): State<Shared>,
    Operator(user): Operator,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<ActionBody>, JsonRejection>,
) -> Result<Json<ops::Moved>, ApiError> {
    let Path(id) = id.map_err(path_err)?;
    let Json(body) = body.map_err(json_err)?;
    let action: CaseAction = body.action.parse()?;
    let moved = ops::case_action_by(&s.db, &user.name, &id, action, s.clock.now()).await?;
    Ok(Json(moved))
}

async fn output_png(
    State(s): State<Shared>,
    _: Viewer,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((id, sop)) = p.map_err(path_err)?;
    let png = super::pages::output_png(&s, &id, &sop).await?;
    Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutboxQuery {
    state: Option<String>,
    destination: Option<String>,
    limit: Option<i64>,
    offset: Option<i64>,
}

async fn outbox(
    State(s): State<Shared>,
    _: Viewer,
    q: Result<Query<OutboxQuery>, QueryRejection>,
) -> Result<Json<ops::Page<crate::db::OutboxRow>>, ApiError> {
    let Query(q) = q.map_err(query_err)?;
    let (limit, offset) = paging(q.limit, q.offset)?;
    let state = q
        .state
        .map(|v| v.parse::<DeliveryState>())
        .transpose()
        .map_err(|e| ApiError::bad(format!("state: {e}")))?;
    Ok(Json(
        ops::outbox_page(&s.db, state, q.destination.as_deref(), limit, offset).await?,
    ))
}

async fn retry(
    State(s): State<Shared>,
    Operator(user): Operator,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(id) = id.map_err(path_err)?;
    ops::retry_delivery_by(&s.db, &user.name, id, s.clock.now()).await?;
    Ok(Json(serde_json::json!({ "id": id, "state": "pending" })))
}

/// The audit filters of `/api/v1/audit` (and the audit page).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub case_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub association_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after_seq: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
}

impl AuditQuery {
    /// The database filter, or what is wrong with the query.
    pub fn filter(&self) -> Result<EventFilter, ApiError> {
        let (limit, _) = paging(self.limit, None)?;
        let after_seq = self.after_seq.unwrap_or(0);
        if after_seq < 0 {
            return Err(ApiError::bad("after_seq must not be negative"));
        }
        let some = |v: &Option<String>| v.clone().filter(|v| !v.is_empty());
        Ok(EventFilter {
            event: some(&self.event),
            since: time_param("since", &self.since)?,
            until: time_param("until", &self.until)?,
            case_id: some(&self.case_id),
            association_id: some(&self.association_id),
            node: some(&self.node),
            after_seq,
            limit,
        })
    }
}

async fn audit(
    State(s): State<Shared>,
    _: Viewer,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = q.map_err(query_err)?;
    let filter = q.filter()?;
    let items = ops::audit_events(&s.db, &filter).await?;
    let next = items.last().map(|e| e.seq);
    Ok(Json(serde_json::json!({
        "items": items,
        "limit": filter.limit,
        "next_after_seq": next,
    })))
}
