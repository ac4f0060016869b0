//! The administrator's console (issue 15) against the real node on port 0,
//! called with a real HTTP client: auth and roles, health, metrics (checked
//! by promtool), the API's shapes and bad input, an operator action in the
//! audit log, and the pages' login.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use her2map::config::{HttpRole, HttpUser};
use reqwest::StatusCode;
use serde_json::Value;

struct Node {
    app: TestApp,
    base: String,
    viewer: String,
    operator: String,
}

async fn node(dir: &std::path::Path) -> Node {
    let mut s = test_settings(dir);
    let (viewer, vd) = her2map::http::auth::new_token();
    let (operator, od) = her2map::http::auth::new_token();
    s.http.users = vec![
        HttpUser {
            name: "vera".into(),
            role: HttpRole::Viewer,
            token_sha256: vd,
        },
        HttpUser {
            name: "olga".into(),
            role: HttpRole::Operator,
            token_sha256: od,
        },
    ];
    // Keep the case collecting so that the operator's hold has work to do.
    s.cases.stable_age_secs = 3600;
    s.http.max_body_bytes = 1024;
    let app = spawn_app_with(s).await;
    let base = format!("http://{}", app.http_addr.expect("http enabled"));
    Node {
        app,
        base,
        viewer,
        operator,
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn get(n: &Node, path: &str, token: Option<&str>) -> (StatusCode, String) {
    let mut r = client().get(format!("{}{path}", n.base));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let resp = r.send().await.expect("request");
    (resp.status(), resp.text().await.unwrap())
}

async fn json(n: &Node, path: &str, token: &str) -> Value {
    let (code, body) = get(n, path, Some(token)).await;
    assert_eq!(code, StatusCode::OK, "{path}: {body}");
    serde_json::from_str(&body).expect("json")
}

pub(crate) fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

pub(crate) fn promtool(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn console_auth_health_metrics_api_and_pages() {
    let dir = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let n = node(dir.path()).await;

    // Health needs no token; everything else does.
    let (code, body) = get(&n, "/health", None).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let (code, body) = get(&n, "/ready", None).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = ready["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["database", "spool", "model", "dicom"]);
    for path in ["/api/v1/status", "/metrics", "/api/v1/cases"] {
        let (code, body) = get(&n, path, None).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{path}: {body}");
        let e: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(e["error"], "unauthorized");
    }
    // A NUL in the URL is the client's mistake on either database (PostgreSQL
    // refuses NUL in text: it must not surface as a database error).
    for path in [
        "/api/v1/cases/a%00b",
        "/api/v1/audit?event=x%00",
        "/cases/a%00",
    ] {
        let (code, body) = get(&n, path, Some(&n.viewer)).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{path}: {body}");
    }
    let wrong = "not-a-real-token-0123456789";
    let (code, _) = get(&n, "/api/v1/status", Some(wrong)).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let failed = wait_events(&n.app.db, "http_auth_failed", 1).await;
    assert_eq!(failed.len(), 1);
    let all = serde_json::to_string(&n.app.db.events(0, None, 10_000).await.unwrap()).unwrap();
    assert!(!all.contains(wrong), "a token reached the audit log");

    // Metrics before and after three MR instances.
    let (_, before) = get(&n, "/metrics", Some(&n.viewer)).await;
    promtool(&before);
    let stored =
        "her2map_instances_received_total{outcome=\"stored\",status=\"0x0000\",modality=\"MR\"}";
    let paths = mr_variants(files.path(), 3, "console");
    let mut args = vec!["-aec".into(), "HER2MAP".into(), "127.0.0.1".into()];
    args.push(n.app.port().to_string());
    args.extend(paths.iter().map(|p| p.display().to_string()));
    let (ok, out) = dcmtk("storescu", args).await;
    assert!(ok, "{out}");
    let (_, after) = get(&n, "/metrics", Some(&n.viewer)).await;
    promtool(&after);
    assert!(
        metric(&after, stored) >= metric(&before, stored) + 3.0,
        "stored counter did not move:\n{after}"
    );
    assert!(
        metric(&after, "her2map_received_bytes_total")
            > metric(&before, "her2map_received_bytes_total")
    );
    assert!(after.contains("her2map_build_info{version="));
    assert_eq!(metric(&after, "her2map_ready "), 1.0, "{after}");
    assert_eq!(metric(&after, "her2map_ready_check{check=\"dicom\"}"), 1.0);
    assert!(after.contains("her2map_ingest_duration_seconds_bucket{le=\"+Inf\"}"));

    // The case appears; its detail has members by modality and a timeline.
    let deadline = Instant::now() + Duration::from_secs(20);
    let case_id = loop {
        let page = json(&n, "/api/v1/cases?limit=10", &n.viewer).await;
        if let Some(c) = page["items"].as_array().and_then(|a| a.first()) {
            break c["id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no case was opened");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The assembler attaches instances to the case after ingest has
    // answered them: wait for all three rather than race it.
    let detail = loop {
        let detail = json(&n, &format!("/api/v1/cases/{case_id}"), &n.viewer).await;
        let members = detail["members"]["MR"].as_array().map_or(0, Vec::len);
        if members == 3 {
            break detail;
        }
        assert!(Instant::now() < deadline, "3 MR members expected: {detail}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(detail["state"], "collecting");
    assert!(!detail["timeline"].as_array().unwrap().is_empty());
    assert!(detail["outputs"].as_array().unwrap().is_empty());
    let status = json(&n, "/api/v1/status", &n.viewer).await;
    assert_eq!(status["ready"], true);
    assert_eq!(status["user"]["role"], "viewer");
    let assoc = json(&n, "/api/v1/associations", &n.viewer).await;
    assert_eq!(assoc["items"][0]["calling_ae"], "STORESCU");
    json(&n, "/api/v1/outbox?state=dead", &n.viewer).await;

    // A viewer may not act; an operator may, and the audit log names them.
    let action = format!("{}/api/v1/cases/{case_id}/actions", n.base);
    let hold = serde_json::json!({ "action": "hold" });
    let r = client()
        .post(&action)
        .bearer_auth(&n.viewer)
        .json(&hold)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = client()
        .post(&action)
        .bearer_auth(&n.operator)
        .json(&hold)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let moved: Value = r.json().await.unwrap();
    assert_eq!(moved["to"], "held");
    let detail = json(&n, &format!("/api/v1/cases/{case_id}"), &n.viewer).await;
    assert_eq!(detail["state"], "held");
    let audit = json(
        &n,
        &format!("/api/v1/audit?event=operator_action&case_id={case_id}"),
        &n.viewer,
    )
    .await;
    let items = audit["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{audit}");
    assert_eq!(items[0]["detail"]["user"], "olga");
    assert_eq!(items[0]["detail"]["action"], "hold");

    // Bad input: 4xx with a JSON error, nothing changes.
    for (body, ctype, want) in [
        ("{not json", "application/json", StatusCode::BAD_REQUEST),
        (
            "{\"action\":\"run\",\"extra\":1}",
            "application/json",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "{\"action\":\"stop\"}",
            "application/json",
            StatusCode::BAD_REQUEST,
        ),
        (
            "action=run",
            "text/plain",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
    ] {
        let r = client()
            .post(&action)
            .bearer_auth(&n.operator)
            .header("content-type", ctype)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want, "{body}");
        let e: Value = r.json().await.expect("json error body");
        assert!(e["message"].is_string(), "{e}");
    }
    let big = format!("{{\"action\":\"{}\"}}", "x".repeat(4096));
    let r = client()
        .post(&action)
        .bearer_auth(&n.operator)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let e: Value = r.json().await.expect("a JSON error for the body limit too");
    assert_eq!(e["error"], "payload_too_large", "{e}");
    // A method the route does not take: 405 with JSON and its Allow header.
    let r = client()
        .delete(format!("{}/api/v1/status", n.base))
        .bearer_auth(&n.operator)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(r.headers().contains_key("allow"), "{:?}", r.headers());
    let e: Value = r.json().await.expect("a JSON error for a wrong method");
    assert_eq!(e["error"], "method_not_allowed", "{e}");
    for path in [
        "/api/v1/cases?limit=0",
        "/api/v1/cases?limit=abc",
        "/api/v1/cases?state=nonsense",
        "/api/v1/audit?since=yesterday",
        "/api/v1/cases?since=yesterday",
        "/api/v1/cases?bogus=1",
    ] {
        let (code, body) = get(&n, path, Some(&n.viewer)).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert!(serde_json::from_str::<Value>(&body).is_ok(), "{body}");
    }
    let (code, _) = get(&n, "/api/v1/cases/no-such-case", Some(&n.viewer)).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    let r = client()
        .post(format!("{}/api/v1/outbox/999/retry", n.base))
        .bearer_auth(&n.operator)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let detail = json(&n, &format!("/api/v1/cases/{case_id}"), &n.viewer).await;
    assert_eq!(detail["state"], "held");

    // The cases list filtered by when a case opened.
    let all = json(&n, "/api/v1/cases?since=2000-01-01T00:00:00Z", &n.viewer).await;
    assert!(
        all["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == case_id.as_str()),
        "{all}"
    );
    let none = json(&n, "/api/v1/cases?until=2000-01-01T00:00:00Z", &n.viewer).await;
    assert_eq!(none["items"].as_array().unwrap().len(), 0, "{none}");
    let held = json(&n, "/api/v1/cases?state=held&since=", &n.viewer).await;
    assert_eq!(held["items"][0]["id"], case_id.as_str(), "{held}");

    // The document needs a token like every endpoint but health.
    let (code, _) = get(&n, "/api/v1/openapi.json", None).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let spec = json(&n, "/api/v1/openapi.json", &n.viewer).await;
    assert_eq!(spec["openapi"], "3.0.3");
    assert!(spec["paths"]["/api/v1/cases/{id}/actions"]["post"].is_object());

    // Pages: the login form, its cookie, the dashboard and the case page.
    let (code, _) = get(&n, "/", None).await;
    assert_eq!(code, StatusCode::SEE_OTHER);
    let r = client()
        .post(format!("{}/login", n.base))
        .form(&[("token", n.operator.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    let cookie = cookie.split(';').next().unwrap().to_string();
    let page = |path: String| {
        let cookie = cookie.clone();
        let base = n.base.clone();
        async move {
            let r = client()
                .get(format!("{base}{path}"))
                .header("cookie", cookie)
                .send()
                .await
                .unwrap();
            (r.status(), r.text().await.unwrap())
        }
    };
    let (code, html) = page("/".into()).await;
    assert_eq!(code, StatusCode::OK);
    assert!(
        html.contains("Ready") && html.contains("Cases by state"),
        "{html}"
    );
    let (code, html) = page(format!("/cases/{case_id}")).await;
    assert_eq!(code, StatusCode::OK);
    assert!(html.contains("id=\"state\">held<"), "{html}");
    assert!(html.contains("id=\"release\""), "operator buttons: {html}");
    for p in ["/cases", "/outbox", "/audit?event=operator_action"] {
        let (code, html) = page(p.into()).await;
        assert_eq!(code, StatusCode::OK, "{p}: {html}");
    }
    let r = client()
        .post(format!("{}/login", n.base))
        .form(&[("token", "guess")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(wait_events(&n.app.db, "http_auth_failed", 2).await.len(), 2);
    n.app.stop().await;
}

/// Without users the console stays on loopback and reads only.
#[tokio::test(flavor = "multi_thread")]
async fn without_users_the_console_is_loopback_and_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = test_settings(dir.path());
    s.http.host = "0.0.0.0".into();
    let app = spawn_app_with(s).await;
    let addr = app.http_addr.unwrap();
    assert!(addr.ip().is_loopback(), "{addr}");
    let base = format!("http://{addr}");
    let r = client()
        .get(format!("{base}/api/v1/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = client()
        .post(format!("{base}/api/v1/outbox/1/retry"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    app.stop().await;
}

/// The alert rules the README offers (conf/prometheus/her2map-rules.yml)
/// are valid Prometheus rules.
#[test]
fn the_shipped_alert_rules_pass_promtool() {
    let rules =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/prometheus/her2map-rules.yml");
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("promtool must be installed (apt-get install prometheus)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
