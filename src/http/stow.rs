//! STOW-RS in (PS3.18 10.5): `POST /dicom-web/studies[/{study}]` with a
//! multipart/related body of `application/dicom` parts. Every instance
//! goes through the same ingest as a C-STORE (validated, spooled and
//! fsync'd, indexed, deduplicated, audited) before the answer is sent; the
//! answer is the standard STOW-RS response in DICOM JSON. One request is
//! recorded as one association (calling identity: the user's name; called
//! AE `STOW-RS`), so the views and the audit log show who sent what.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;

use super::Shared;
use super::api::ApiError;
use super::auth::Stower;
use crate::config::HttpSettings;
use crate::db::{NewEvent, event};
use crate::dicomweb::client::{APPLICATION_DICOM, APPLICATION_DICOM_JSON};
use crate::dicomweb::multipart::{self, Limits, MediaType, MultipartError};
use crate::dicomweb::{StowFailed, StowResponse, StowStored};
use crate::dimse::command::status;
use crate::dimse::server::{
    AssociationInfo, AssociationStats, InstanceSink, StoreRequest, StoreService,
};
use crate::dimse::sop;
use crate::part10::Part10Header;

/// PS3.18 10.5.3 Failure Reason: Referenced Transfer Syntax not supported.
const TRANSFER_SYNTAX_NOT_SUPPORTED: u16 = 0xC122;

/// Most instances in one request.
const MAX_PARTS: usize = 10_000;
/// The called "AE" an HTTP request is recorded under.
pub const CALLED: &str = "STOW-RS";

/// The STOW-RS routes, with their own body limit and timeout (a request
/// carries whole studies; `[http] stow_max_body_bytes`, `stow_timeout_secs`).
pub fn routes(h: &HttpSettings) -> Router<Shared> {
    // At most `stow_concurrency` requests read and store at once: each
    // holds its body in memory (up to `stow_max_body_bytes`); the others
    // wait before their body is read (TCP backpressure on the sender).
    let slots = Arc::new(tokio::sync::Semaphore::new(h.stow_concurrency.max(1)));
    Router::new()
        .route("/dicom-web/studies", post(store_any))
        .route("/dicom-web/studies/{study}", post(store_study))
        .layer(DefaultBodyLimit::max(h.stow_max_body_bytes))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            h.stow_max_body_bytes,
        ))
        .layer(axum::middleware::from_fn(move |req, next: Next| {
            let slots = slots.clone();
            async move {
                let _slot = slots.acquire_owned().await;
                next.run(req).await
            }
        }))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            std::time::Duration::from_secs(h.stow_timeout_secs),
        ))
}

async fn store_any(
    State(s): State<Shared>,
    Stower(user): Stower,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    store(s, user.name, peer, headers, None, body).await
}

async fn store_study(
    State(s): State<Shared>,
    Stower(user): Stower,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(study): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    store(s, user.name, peer, headers, Some(study), body).await
}

fn error(status: StatusCode, code: &'static str, message: impl Into<String>) -> Response {
    ApiError::new(status, code, message).into_response()
}

/// The request's media type: 415 unless multipart/related of
/// application/dicom (a missing `type` parameter is taken as that).
fn boundary(headers: &HeaderMap) -> Result<String, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let unsupported = |m: String| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            m,
        )
    };
    let Some(mt) = MediaType::parse(ct) else {
        return Err(unsupported(
            "Content-Type must be multipart/related; type=\"application/dicom\"".into(),
        ));
    };
    if mt.essence != "multipart/related" {
        return Err(unsupported(format!(
            "Content-Type {} is not multipart/related; type=\"application/dicom\"",
            mt.essence
        )));
    }
    if let Some(t) = mt.param("type")
        && !t.trim().eq_ignore_ascii_case(APPLICATION_DICOM)
    {
        return Err(unsupported(format!(
            "parts of type {t:?}: only application/dicom (Part 10 files) is accepted"
        )));
    }
    multipart::boundary_of(ct)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))
}

/// PS3.18 10.5.2: the response is DICOM JSON; a client that accepts
/// neither it nor any JSON (`application/dicom+xml` only) gets 406.
fn accepts_json(headers: &HeaderMap) -> bool {
    let values: Vec<&str> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    values.is_empty()
        || values.iter().flat_map(|v| v.split(',')).any(|item| {
            let essence = item
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            matches!(
                essence.as_str(),
                "" | "*/*" | "application/*" | "application/json" | APPLICATION_DICOM_JSON
            )
        })
}

/// The scheme and host the client reached, for Retrieve URLs.
fn origin(headers: &HeaderMap, secure: bool) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_graphic()))
        .unwrap_or("localhost");
    format!("{}://{host}", if secure { "https" } else { "http" })
}

/// An AE-title-shaped form of the user's name (PS3.5: at most 16
/// characters, no backslash), for the Part 10 Source AE of the files.
fn source_ae(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_ascii_graphic() && *c != '\\')
        .take(16)
        .collect()
}

async fn store(
    s: Shared,
    user: String,
    peer: SocketAddr,
    headers: HeaderMap,
    study: Option<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if !accepts_json(&headers) {
        return error(
            StatusCode::NOT_ACCEPTABLE,
            "not_acceptable",
            "the STOW-RS response is application/dicom+json",
        );
    }
    let boundary = match boundary(&headers) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let body = match body {
        Ok(b) => b,
        Err(rejection) => {
            // Too large (413), or the body could not be read.
            let status = rejection.status();
            return error(status, "bad_body", rejection.body_text());
        }
    };
    let limits = Limits {
        max_parts: MAX_PARTS,
        max_bytes: usize::MAX,
    };
    // The whole body is parsed before anything is stored: a malformed body
    // leaves nothing behind.
    let parts = match multipart::parse(&body, &boundary, &limits) {
        Ok(p) => p,
        Err(e @ MultipartError::TooManyParts(_)) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_parts",
                e.to_string(),
            );
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_multipart", e.to_string()),
    };
    let study = study.map(|u| crate::dimse::command::trim_uid(u.trim()).to_string());
    let info = AssociationInfo {
        id: format!(
            "stow-{}",
            crate::http::auth::new_token().0.get(..16).unwrap_or("0")
        ),
        calling_ae: source_ae(&user),
        called_ae: CALLED.into(),
        peer,
    };
    let ingest = &s.ingest;
    ingest.association_opened(&info).await;
    let base = format!("{}/dicom-web", origin(&headers, s.secure_cookie));
    let mut response = StowResponse {
        retrieve_url: study.as_ref().map(|u| format!("{base}/studies/{u}")),
        ..Default::default()
    };
    let mut stats = AssociationStats::default();
    for (n, part) in parts.iter().enumerate() {
        let outcome = store_part(&s, &info, study.as_deref(), n, part).await;
        match outcome {
            Ok((class, instance, study_uid, series)) => {
                stats.stored += 1;
                stats.bytes += part.body.len() as u64;
                response.stored.push(StowStored {
                    retrieve_url: Some(format!(
                        "{base}/studies/{study_uid}/series/{series}/instances/{instance}"
                    )),
                    sop_class_uid: class,
                    sop_instance_uid: instance,
                    warning: None,
                });
            }
            Err(failed) => {
                stats.failed += 1;
                response.failed.push(failed);
            }
        }
    }
    ingest.association_closed(&info, "released", &stats).await;
    // PS3.18 10.5.3: 200 all stored, 202 some, 409 none.
    let code = match (response.stored.is_empty(), response.failed.is_empty()) {
        (_, true) => StatusCode::OK,
        (false, false) => StatusCode::ACCEPTED,
        (true, false) => StatusCode::CONFLICT,
    };
    response.status = code.as_u16();
    let body = response.to_json().to_string();
    (code, [(header::CONTENT_TYPE, APPLICATION_DICOM_JSON)], body).into_response()
}

/// What a part was read as, for its failure entry.
struct Known {
    class: String,
    instance: String,
}

/// Store one part; on success its SOP Class, SOP Instance, Study and Series
/// UIDs, else its failure entry (PS3.18 10.5.3, reasons of PS3.4 B.2.3).
async fn store_part(
    s: &Shared,
    info: &AssociationInfo,
    study: Option<&str>,
    n: usize,
    part: &multipart::Part,
) -> Result<(String, String, String, String), StowFailed> {
    let mut known = Known {
        class: String::new(),
        instance: String::new(),
    };
    // Refusals are audited where they are found: by ingest, or by
    // `audited` for the checks made before it.
    check_and_ingest(s, info, study, n, part, &mut known)
        .await
        .map_err(|(reason, message)| {
            tracing::warn!(
                request = %info.id,
                part = n + 1,
                reason = format_args!("{reason:#06X}"),
                %message,
                "STOW-RS instance refused"
            );
            StowFailed {
                sop_class_uid: known.class,
                sop_instance_uid: known.instance,
                reason: Some(reason),
            }
        })
}

type PartResult = Result<(String, String, String, String), (u16, String)>;

async fn check_and_ingest(
    s: &Shared,
    info: &AssociationInfo,
    study: Option<&str>,
    n: usize,
    part: &multipart::Part,
    known: &mut Known,
) -> PartResult {
    match part.content_type() {
        Some(mt) if mt.essence == APPLICATION_DICOM => {}
        Some(mt) => {
            return Err(audited(
                s,
                info,
                n,
                known,
                status::CANNOT_UNDERSTAND,
                format!("part is {}, not application/dicom", mt.essence),
            )
            .await);
        }
        None => {
            return Err(audited(
                s,
                info,
                n,
                known,
                status::CANNOT_UNDERSTAND,
                "part has no Content-Type".into(),
            )
            .await);
        }
    }
    let bytes = &part.body[..];
    let meta = match Part10Header::from_bytes(bytes) {
        Ok(m) => m,
        Err(e) => {
            return Err(audited(
                s,
                info,
                n,
                known,
                status::CANNOT_UNDERSTAND,
                format!("not a DICOM Part 10 file: {e}"),
            )
            .await);
        }
    };
    let header = match crate::ingest::parse_header_bytes(bytes) {
        Ok(h) => h,
        Err(e) => {
            return Err(audited(
                s,
                info,
                n,
                known,
                status::CANNOT_UNDERSTAND,
                format!("data set does not parse: {e}"),
            )
            .await);
        }
    };
    known.class = header.sop_class_uid.clone();
    known.instance = header.sop_instance_uid.clone();
    if header.sop_class_uid.is_empty() || header.sop_instance_uid.is_empty() {
        return Err(audited(
            s,
            info,
            n,
            known,
            status::CANNOT_UNDERSTAND,
            "data set holds no SOP Class UID or no SOP Instance UID".into(),
        )
        .await);
    }
    if header.study_instance_uid.is_empty() || header.series_instance_uid.is_empty() {
        return Err(audited(
            s,
            info,
            n,
            known,
            status::CANNOT_UNDERSTAND,
            "data set holds no Study or Series Instance UID".into(),
        )
        .await);
    }
    // The SCP's SOP classes and transfer syntaxes (`dimse::sop`), as a
    // C-STORE would negotiate them.
    let class = header.sop_class_uid.as_str();
    if !(sop::is_default_storage_class(class)
        || (s.accept_any_storage && sop::is_storage_class(class)))
    {
        return Err(audited(
            s,
            info,
            n,
            known,
            status::SOP_CLASS_NOT_SUPPORTED,
            "SOP class not accepted (see [dicom] accept_any_storage)".into(),
        )
        .await);
    }
    if !sop::TRANSFER_SYNTAXES
        .iter()
        .any(|(ts, _)| *ts == meta.transfer_syntax.trim_end_matches('\0'))
    {
        return Err(audited(
            s,
            info,
            n,
            known,
            TRANSFER_SYNTAX_NOT_SUPPORTED,
            "transfer syntax not accepted".into(),
        )
        .await);
    }
    if let Some(study) = study
        && header.study_instance_uid != study
    {
        return Err(audited(
            s,
            info,
            n,
            known,
            status::DATA_SET_DOES_NOT_MATCH,
            "Study Instance UID differs from the request's URL".into(),
        )
        .await);
    }
    // The same seam as a C-STORE: the node writes its own meta group in
    // front of the data set, as received, in its transfer syntax.
    let request = StoreRequest {
        message_id: u16::try_from(n + 1).unwrap_or(u16::MAX),
        sop_class_uid: header.sop_class_uid.clone(),
        sop_instance_uid: header.sop_instance_uid.clone(),
        transfer_syntax: meta.transfer_syntax.clone(),
    };
    let ingest = &s.ingest;
    let mut sink = ingest
        .begin(info, &request)
        .await
        .map_err(|st| (st.code, st.comment.unwrap_or_default()))?;
    let start = usize::try_from(meta.dataset_offset)
        .unwrap_or(bytes.len())
        .min(bytes.len());
    if let Err(st) = sink.write(bytes[start..].to_vec()).await {
        sink.abort().await;
        return Err((st.code, st.comment.unwrap_or_default()));
    }
    let st = sink.finish().await;
    if st.code != status::SUCCESS && !crate::dimse::command::is_success_or_warning(st.code) {
        return Err((st.code, st.comment.unwrap_or_default()));
    }
    Ok((
        header.sop_class_uid,
        header.sop_instance_uid,
        header.study_instance_uid,
        header.series_instance_uid,
    ))
}

/// Audit a refusal found before ingest saw the instance; the error to return.
async fn audited(
    s: &Shared,
    info: &AssociationInfo,
    n: usize,
    known: &Known,
    reason: u16,
    message: String,
) -> (u16, String) {
    let modality = crate::header::image_modality_of_class(&known.class);
    crate::metrics::METRICS.instance("failed", reason, modality.map_or("", |m| m.as_str()));
    let _ =
        s.db.record(
            NewEvent {
                event: event::INSTANCE_FAILED,
                association_id: Some(&info.id),
                sop_instance_uid: (!known.instance.is_empty()).then_some(known.instance.as_str()),
                status: Some(reason),
                detail: Some(serde_json::json!({
                    "reason": message,
                    "part": n + 1,
                    "via": "STOW-RS",
                })),
                ..Default::default()
            },
            s.clock.now(),
        )
        .await;
    (reason, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_are_checked() {
        let h = |ct: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            m
        };
        assert_eq!(
            boundary(&h(
                "multipart/related; type=\"application/dicom\"; boundary=abc"
            ))
            .unwrap(),
            "abc"
        );
        assert_eq!(
            boundary(&h("multipart/related; boundary=abc")).unwrap(),
            "abc"
        );
        let code = |r: Result<String, ApiError>| r.unwrap_err().status;
        assert_eq!(
            code(boundary(&h("application/dicom"))),
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        assert_eq!(
            code(boundary(&h(
                "multipart/related; type=\"application/dicom+xml\"; boundary=a"
            ))),
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        assert_eq!(
            code(boundary(&h(
                "multipart/related; type=\"application/dicom\""
            ))),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            code(boundary(&HeaderMap::new())),
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        assert_eq!(source_ae("a very long user name\\x"), "averylongusernam");
        let accept = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT, v.parse().unwrap());
            accepts_json(&m)
        };
        assert!(accepts_json(&HeaderMap::new()));
        assert!(accept("application/dicom+json"));
        assert!(accept("application/dicom+xml;q=1, application/json;q=0.5"));
        assert!(accept("*/*"));
        assert!(!accept("application/dicom+xml"));
    }
}
