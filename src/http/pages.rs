//! The console's server-rendered pages (no CDN, no fonts, no JavaScript):
//! the dashboard, cases, one case (timeline, result, heatmap PNGs,
//! deliveries, operator buttons), the outbox (with retry) and the audit
//! log, behind a login form that sets an HttpOnly, SameSite=Strict cookie
//! with the token. Patient names and IDs show only to signed-in users, and
//! never with `[http] show_phi = false`. Data comes from `ops`, as the API's.

use std::fmt::Write as _;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Form, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use super::api::{ApiError, AuditQuery, CasesQuery};
use super::auth::{self, Identity};
use super::{Console, Shared};
use crate::db::CaseState;
use crate::ops::{self, CaseAction};

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/", get(dashboard))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/cases", get(cases))
        .route("/cases/{id}", get(case))
        .route("/cases/{id}/action", post(case_action))
        .route("/cases/{id}/outputs/{sop}", get(png))
        .route("/outbox", get(outbox))
        .route("/outbox/{id}/retry", post(retry))
        .route("/audit", get(audit))
}

/// Extractor: a signed-in page user; others are sent to the login form.
pub struct PageUser(pub Identity);

impl FromRequestParts<Shared> for PageUser {
    type Rejection = Response;
    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, Response> {
        auth::authenticate(state, parts)
            .await
            .map(PageUser)
            .map_err(|_| Redirect::to("/login").into_response())
    }
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page(title: &str, user: Option<&Identity>, body: &str) -> Html<String> {
    let nav = match user {
        Some(u) => format!(
            "<nav><a href=\"/\">Dashboard</a> <a href=\"/cases\">Cases</a> <a href=\"/outbox\">Outbox</a> \
             <a href=\"/audit\">Audit</a> <span class=\"user\">{} ({})</span> \
             <form method=\"post\" action=\"/logout\" class=\"inline\"><button>Sign out</button></form></nav>",
            esc(&u.name),
            u.role.as_str()
        ),
        None => String::new(),
    };
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t} · her2map</title>\
         <style>body{{font-family:sans-serif;margin:1.5em;color:#222}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}}\
         .bad{{color:#b00}}.ok{{color:#070}}nav a{{margin-right:1em}}.inline{{display:inline}}\
         img.heatmap{{max-width:480px;border:1px solid #999;margin:.25em}}</style></head>\
         <body>{nav}<h1>{t}</h1>{body}</body></html>",
        t = esc(title)
    ))
}

async fn login_form() -> Html<String> {
    page(
        "Sign in",
        None,
        "<form method=\"post\" action=\"/login\"><label>Token <input type=\"password\" name=\"token\" \
         autocomplete=\"current-password\" id=\"token\"></label> <button id=\"signin\">Sign in</button></form>",
    )
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    State(s): State<Shared>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Form(f): Form<LoginForm>,
) -> Response {
    if s.users.find(f.token.trim()).is_none() {
        auth::failed_login(&s, peer, "/login").await;
        let body = "<p class=\"bad\">Unknown token.</p><p><a href=\"/login\">Try again</a></p>";
        return (StatusCode::UNAUTHORIZED, page("Sign in", None, body)).into_response();
    }
    let secure = if s.secure_cookie { "; Secure" } else { "" };
    let cookie = format!(
        "{}={}; Path=/; HttpOnly; SameSite=Strict{secure}",
        auth::COOKIE,
        f.token.trim()
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

async fn logout() -> Response {
    let cookie = format!(
        "{}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict",
        auth::COOKIE
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response()
}

/// Turn an API error into a page.
fn error_page(user: &Identity, e: ApiError) -> Response {
    (
        e.status,
        page(
            "Error",
            Some(user),
            &format!("<p class=\"bad\">{}</p>", esc(&e.message)),
        ),
    )
        .into_response()
}

async fn dashboard(State(s): State<Shared>, PageUser(user): PageUser) -> Response {
    match dashboard_body(&s).await {
        Ok(body) => page("her2map node", Some(&user), &body).into_response(),
        Err(e) => error_page(&user, e),
    }
}

async fn dashboard_body(s: &Console) -> Result<String, ApiError> {
    let ready = super::health::checks(s).await;
    let counts = ops::counts(&s.db, s.clock.now()).await?;
    let mut b = String::new();
    let _ = write!(
        b,
        "<h2>Health</h2><p id=\"ready\" class=\"{}\">{}</p><ul>",
        if ready.ready { "ok" } else { "bad" },
        if ready.ready { "Ready" } else { "NOT READY" }
    );
    for c in &ready.checks {
        let _ = write!(
            b,
            "<li class=\"{}\">{}: {}</li>",
            if c.ok { "ok" } else { "bad" },
            c.name,
            esc(&c.detail)
        );
    }
    let active = crate::metrics::METRICS
        .associations_active
        .load(std::sync::atomic::Ordering::Relaxed);
    let _ = write!(
        b,
        "</ul><p>DICOM {} on {} · associations now: {active} · inference queue: {}</p>",
        esc(&s.ae_title),
        s.dicom_addr,
        s.engine.queue_depth()
    );
    let table = |title: &str, m: &std::collections::BTreeMap<String, i64>| {
        let mut t = format!("<h2>{title}</h2><table>");
        for (k, v) in m {
            let _ = write!(t, "<tr><th>{}</th><td>{v}</td></tr>", esc(k));
        }
        t + "</table>"
    };
    b += &table("Cases by state", &counts.cases);
    b += &table("Outbox", &counts.outbox);
    b += &table("Last 24 hours (audit events)", &counts.last_24h);
    b += "<h2>Cases waiting</h2><table><tr><th>Case</th><th>State</th><th>Missing</th><th>Why</th><th>Runs at</th></tr>";
    for state in [CaseState::Collecting, CaseState::Held] {
        let filter = crate::db::CaseFilter {
            state: Some(state),
            ..Default::default()
        };
        for c in &ops::list_cases(&s.db, &s.rules, &filter, 20, 0)
            .await?
            .items
        {
            let _ = write!(
                b,
                "<tr><td><a href=\"/cases/{id}\">{id}</a></td><td class=\"state\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                c.case.state,
                esc(&c.missing.join("; ")),
                esc(&c.case.reason),
                esc(runs_at(c)),
                id = esc(&c.case.id)
            );
        }
    }
    b += "</table><h2>Recent failures</h2><table><tr><th>Time</th><th>Event</th><th>Case</th><th>Reason</th></tr>";
    let mut failures = Vec::new();
    for name in ["instance_failed", "case_failed", "delivery_dead_letter"] {
        failures.extend(ops::recent_events(&s.db, name, 5).await?);
    }
    // Newest first across the three kinds.
    failures.sort_by_key(|e| std::cmp::Reverse(e.seq));
    for e in failures.iter().take(10) {
        let case = e.case_id.as_deref().unwrap_or("");
        let reason = e
            .detail
            .as_ref()
            .and_then(|d| d.get("reason"))
            .and_then(|r| r.as_str())
            .unwrap_or("");
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&e.time),
            esc(&e.event),
            if case.is_empty() {
                String::new()
            } else {
                format!("<a href=\"/cases/{c}\">{c}</a>", c = esc(case))
            },
            esc(reason)
        );
    }
    Ok(b + "</table>")
}

async fn cases(
    State(s): State<Shared>,
    PageUser(user): PageUser,
    q: Result<Query<CasesQuery>, QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return error_page(
            &user,
            ApiError::new(StatusCode::BAD_REQUEST, "bad_request", "bad query"),
        );
    };
    let filter = match q.filter() {
        Ok(f) => f,
        Err(e) => return error_page(&user, e),
    };
    let offset = q.offset.unwrap_or(0).max(0);
    let list = match ops::list_cases(&s.db, &s.rules, &filter, 100, offset).await {
        Ok(l) => l,
        Err(e) => return error_page(&user, e.into()),
    };
    let v = |o: &Option<String>| esc(o.as_deref().unwrap_or(""));
    let mut b = String::from(
        "<form method=\"get\" action=\"/cases\">state <select name=\"state\"><option value=\"\">any</option>",
    );
    for st in CaseState::ALL {
        let _ = write!(
            b,
            "<option{}>{}</option>",
            if filter.state == Some(*st) {
                " selected"
            } else {
                ""
            },
            st.as_str()
        );
    }
    let _ = write!(
        b,
        "</select> opened since <input name=\"since\" value=\"{}\"> until <input name=\"until\" value=\"{}\"> \
         <button>Filter</button></form>",
        v(&q.since),
        v(&q.until)
    );
    b += "<table><tr><th>Case</th><th>State</th><th>Present</th><th>Missing</th><th>Why</th>\
         <th>Runs at</th><th>Instances</th></tr>";
    for c in &list.items {
        let _ = write!(
            b,
            "<tr><td><a href=\"/cases/{id}\">{id}</a></td><td class=\"state\">{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td></tr>",
            c.case.state,
            c.present.join(", "),
            esc(&c.missing.join("; ")),
            esc(&c.case.reason),
            esc(runs_at(c)),
            c.instances,
            id = esc(&c.case.id)
        );
    }
    b += "</table>";
    if list.items.len() as i64 == list.limit {
        let next = CasesQuery {
            offset: Some(offset + list.limit),
            limit: None,
            ..q
        };
        let _ = write!(
            b,
            "<p><a href=\"/cases?{}\">Next page</a></p>",
            query_string(&next)
        );
    }
    page("Cases", Some(&user), &b).into_response()
}

/// When a case runs: if nothing else arrives, else at its max wait.
fn runs_at(c: &ops::CaseView) -> &str {
    c.ready_at
        .as_deref()
        .or(c.max_wait_at.as_deref())
        .unwrap_or("")
}

/// A page's own query, for its next-page link (the filters kept).
fn query_string<T: serde::Serialize>(q: &T) -> String {
    esc(&serde_urlencoded::to_string(q).unwrap_or_default())
}

/// Patient name and ID of a case, read from its first member's header.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Patient {
    pub name: String,
    pub id: String,
}

pub async fn patient_of(s: &Console, case_id: &str) -> Option<Patient> {
    let members = s.db.case_members(case_id).await.ok()?;
    let path = s.spool_dir.join(&members.first()?.path);
    tokio::task::spawn_blocking(move || {
        use dicom_dictionary_std::tags;
        let obj = dicom_object::OpenFileOptions::new()
            .read_until(tags::PIXEL_DATA)
            .open_file(&path)
            .ok()?;
        let text = |t| {
            obj.element(t)
                .ok()
                .and_then(|e| e.to_str().ok())
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        Some(Patient {
            name: text(tags::PATIENT_NAME),
            id: text(tags::PATIENT_ID),
        })
    })
    .await
    .ok()?
}

/// A heatmap secondary capture of a case as PNG bytes.
pub async fn output_png(s: &Console, case_id: &str, sop: &str) -> Result<Vec<u8>, ApiError> {
    let outputs = s.db.case_outputs(case_id).await?;
    let out = outputs
        .into_iter()
        .find(|o| o.sop_instance_uid == sop && o.kind == crate::report::OutputKind::HeatmapSc)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such heatmap of this case",
            )
        })?;
    let path = s.data_dir.join(&out.path);
    let png = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
        let obj = dicom_object::open_file(&path).map_err(|e| e.to_string())?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let file = dir.path().join("heatmap.png");
        crate::report::sc::write_png(&obj, &file).map_err(|e| e.to_string())?;
        std::fs::read(&file).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    png.map_err(|e| {
        tracing::warn!(error = %e, "heatmap could not be rendered");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "render",
            "the heatmap could not be rendered",
        )
    })
}

async fn png(
    State(s): State<Shared>,
    PageUser(user): PageUser,
    Path((id, sop)): Path<(String, String)>,
) -> Response {
    let sop = sop.trim_end_matches(".png");
    match output_png(&s, &id, sop).await {
        Ok(png) => ([(header::CONTENT_TYPE, "image/png")], png).into_response(),
        Err(e) => error_page(&user, e),
    }
}

async fn case(
    State(s): State<Shared>,
    PageUser(user): PageUser,
    Path(id): Path<String>,
) -> Response {
    let detail = match ops::case_detail(&s.db, &s.rules, &id).await {
        Ok(Some(d)) => d,
        Ok(None) => {
            return error_page(
                &user,
                ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no case {id}")),
            );
        }
        Err(e) => return error_page(&user, e.into()),
    };
    let mut b = String::new();
    let c = &detail.view;
    let _ = write!(
        b,
        "<p>State: <b id=\"state\">{}</b> (revision {}) — {}</p>",
        c.case.state,
        c.case.revision,
        esc(&c.case.reason)
    );
    if user.signed_in && s.show_phi {
        if let Some(p) = patient_of(&s, &id).await {
            let _ = write!(
                b,
                "<p>Patient: <span id=\"patient\">{} ({})</span></p>",
                esc(&p.name),
                esc(&p.id)
            );
        }
    } else {
        let _ = write!(
            b,
            "<p>Patient: <span id=\"patient\">masked</span> (key {})</p>",
            esc(&c.case.patient_key)
        );
    }
    let _ = write!(
        b,
        "<p>Present: {} · missing: {}</p>",
        c.present.join(", "),
        if c.missing.is_empty() {
            "none".to_string()
        } else {
            esc(&c.missing.join("; "))
        }
    );
    if user.may_act() {
        b += &format!(
            "<form method=\"post\" action=\"/cases/{}/action\">",
            esc(&id)
        );
        for a in ["run", "hold", "release"] {
            let _ = write!(
                b,
                "<button name=\"action\" value=\"{a}\" id=\"{a}\">{a}</button> "
            );
        }
        b += "</form>";
    }
    b += &result_html(detail.result.as_ref());
    b += "<h2>Heatmaps</h2>";
    for o in detail.outputs.iter().filter(|o| o.kind == "sc") {
        let _ = write!(
            b,
            "<img class=\"heatmap\" alt=\"heatmap\" src=\"/cases/{}/outputs/{}.png\">",
            esc(&id),
            esc(&o.sop_instance_uid)
        );
    }
    b += "<h2>Deliveries</h2><table><tr><th>Output</th><th>Destination</th><th>State</th><th>Attempts</th><th>Last</th></tr>";
    for o in &detail.outputs {
        for d in &o.deliveries {
            let _ = write!(
                b,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                o.kind,
                esc(&d.destination),
                d.state,
                d.attempts,
                esc(&d.last_status)
            );
        }
    }
    b += "</table><h2>Members</h2><ul>";
    for (m, list) in &detail.members {
        let _ = write!(b, "<li>{}: {} instance(s)</li>", esc(m), list.len());
    }
    b += "</ul><h2>Timeline</h2><table>";
    for t in &detail.timeline {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&t.time),
            t.kind,
            esc(&t.what)
        );
    }
    b += "</table>";
    page(&format!("Case {id}"), Some(&user), &b).into_response()
}

/// The result as the SR states it: per side, P(HER2+) and the call.
fn result_html(result: Option<&serde_json::Value>) -> String {
    let Some(r) = result else {
        return "<h2>Result</h2><p id=\"result\">no result yet</p>".into();
    };
    let mut b = String::from("<h2>Result</h2><div id=\"result\">");
    if r["demo"].as_bool() == Some(true) {
        b += "<p class=\"bad\">DEMO WEIGHTS — not for clinical use</p>";
    }
    for side in r["sides"].as_array().into_iter().flatten() {
        let positive = side["positive"].as_bool().unwrap_or(false);
        let _ = write!(
            b,
            "<p>Side {}: HER2 {} (P(HER2+) = {:.3}); modalities used: {}; missing: {}</p>",
            esc(side["lesion_side"].as_str().unwrap_or("unknown")),
            if positive { "Positive" } else { "Negative" },
            side["prob"].as_f64().unwrap_or(f64::NAN),
            esc(&names(&side["modalities_used"])),
            esc(&names(&side["modalities_missing"]))
        );
    }
    b + "</div>"
}

/// A JSON list of names as the page says it: "US, MR, MG", or "none".
fn names(list: &serde_json::Value) -> String {
    let names: Vec<&str> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

#[derive(Deserialize)]
struct ActionForm {
    action: String,
}

async fn case_action(
    State(s): State<Shared>,
    PageUser(user): PageUser,
    Path(id): Path<String>,
    Form(f): Form<ActionForm>,
) -> Response {
    if !user.may_act() {
        return error_page(
            &user,
            ApiError::new(StatusCode::FORBIDDEN, "forbidden", "operators only"),
        );
    }
    let action: CaseAction = match f.action.parse() {
        Ok(a) => a,
        Err(e) => return error_page(&user, ApiError::from(e)),
    };
    match ops::case_action_by(&s.db, &user.name, &id, action, s.clock.now()).await {
        Ok(_) => Redirect::to(&format!("/cases/{id}")).into_response(),
        Err(e) => error_page(&user, e.into()),
    }
}

async fn outbox(State(s): State<Shared>, PageUser(user): PageUser) -> Response {
    let rows = match ops::outbox_page(&s.db, None, None, 500, 0).await {
        Ok(p) => p.items,
        Err(e) => return error_page(&user, e.into()),
    };
    let mut b = String::from(
        "<table><tr><th>Id</th><th>Case</th><th>Kind</th><th>Destination</th><th>State</th>\
         <th>Attempts</th><th>Next</th><th>Last status</th><th></th></tr>",
    );
    for r in &rows {
        let button = if user.may_act() && r.state != crate::db::DeliveryState::Sent {
            format!(
                "<form method=\"post\" action=\"/outbox/{}/retry\"><button>retry</button></form>",
                r.id
            )
        } else {
            String::new()
        };
        let _ = write!(
            b,
            "<tr><td>{}</td><td><a href=\"/cases/{c}\">{c}</a></td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{button}</td></tr>",
            r.id,
            r.kind,
            esc(&r.destination),
            r.state,
            r.attempts,
            esc(&r.next_attempt_at),
            esc(&r.last_status),
            c = esc(&r.case_id)
        );
    }
    page("Outbox", Some(&user), &(b + "</table>")).into_response()
}

async fn retry(State(s): State<Shared>, PageUser(user): PageUser, Path(id): Path<i64>) -> Response {
    if !user.may_act() {
        return error_page(
            &user,
            ApiError::new(StatusCode::FORBIDDEN, "forbidden", "operators only"),
        );
    }
    match ops::retry_delivery_by(&s.db, &user.name, id, s.clock.now()).await {
        Ok(()) => Redirect::to("/outbox").into_response(),
        Err(e) => error_page(&user, e.into()),
    }
}

async fn audit(
    State(s): State<Shared>,
    PageUser(user): PageUser,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Response {
    let q = q.map(|Query(q)| q).unwrap_or_default();
    let filter = match q.filter() {
        Ok(f) => f,
        Err(e) => return error_page(&user, e),
    };
    let events = match ops::audit_events(&s.db, &filter).await {
        Ok(e) => e,
        Err(e) => return error_page(&user, e.into()),
    };
    let v = |o: &Option<String>| esc(o.as_deref().unwrap_or(""));
    let mut b = format!(
        "<form method=\"get\" action=\"/audit\">event <input name=\"event\" value=\"{}\"> \
         case <input name=\"case_id\" value=\"{}\"> association <input name=\"association_id\" value=\"{}\"> \
         since <input name=\"since\" value=\"{}\"> until <input name=\"until\" value=\"{}\"> \
         <button>Filter</button></form><table><tr><th>#</th><th>Time</th><th>Event</th><th>Case</th><th>Detail</th></tr>",
        v(&q.event),
        v(&q.case_id),
        v(&q.association_id),
        v(&q.since),
        v(&q.until)
    );
    for e in &events {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e.seq,
            esc(&e.time),
            esc(&e.event),
            esc(e.case_id.as_deref().unwrap_or("")),
            esc(&e.detail.as_ref().map(|d| d.to_string()).unwrap_or_default())
        );
    }
    b += "</table>";
    if let Some(last) = events.last()
        && events.len() as i64 == filter.limit
    {
        let next = AuditQuery {
            after_seq: Some(last.seq),
            ..q
        };
        let _ = write!(
            b,
            "<p><a href=\"/audit?{}\">Next page</a></p>",
            query_string(&next)
        );
    }
    page("Audit log", Some(&user), &b).into_response()
}
