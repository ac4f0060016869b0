//! The console over HTTPS (`[http.tls]`, the PEM handling of `[dicom.tls]`)
//! with curl as the client, and the HTTP server's limits on clients that
//! never finish (issue 19): a TLS handshake that never completes, request
//! headers that never arrive, a body that stops halfway. Each cut
//! connection is an `http_connection_cut` audit event with its reason.

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use her2map::config::{HttpRole, HttpUser};

fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl must be installed (apt-get install curl)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The details of the `http_connection_cut` events, once `count` of them
/// have `reason` (10 s at most).
async fn cuts(app: &TestApp, reason: &str, count: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events: Vec<serde_json::Value> = app
            .db
            .events(0, Some("http_connection_cut"), 1000)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|e| e.detail)
            .collect();
        if events.iter().filter(|d| d["reason"] == reason).count() >= count {
            return events;
        }
        assert!(Instant::now() < deadline, "{count} x {reason}: {events:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Read until the peer closes (or 10 s pass): what it answered.
fn read_to_close(mut s: TcpStream) -> (String, Duration) {
    let started = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    (
        String::from_utf8_lossy(&buf).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn https_console_with_curl_and_a_handshake_that_never_completes() {
    let pki = common::pki::make_pki();
    let dir = tempfile::tempdir().unwrap();
    let mut s = test_settings(dir.path());
    let (token, digest) = her2map::http::auth::new_token();
    s.http.users = vec![HttpUser {
        name: "vera".into(),
        role: HttpRole::Viewer,
        token_sha256: digest,
    }];
    s.http.tls.enabled = true;
    s.http.tls.certificate = pki.server_cert.clone();
    s.http.tls.private_key = pki.server_key.clone();
    s.http.header_timeout_secs = 1;
    let app = spawn_app_with(s).await;
    let addr = app.http_addr.unwrap();
    let url = |p: &str| format!("https://127.0.0.1:{}{p}", addr.port());
    let ca = pki.ca.display().to_string();

    // Health over HTTPS, verified against the CA.
    let (ok, body, err) = curl(&["--fail", "--cacert", &ca, &url("/health")]);
    assert!(ok, "{err}");
    assert!(body.contains("alive"), "{body}");
    // Without the CA, curl refuses the node's certificate.
    let (ok, _, err) = curl(&["--fail", &url("/health")]);
    assert!(!ok, "an unverified certificate was accepted");
    assert!(err.contains("certificate"), "{err}");
    // Plain HTTP to the HTTPS port gets no answer.
    let (ok, _, _) = curl(&[
        "--fail",
        &format!("http://127.0.0.1:{}/health", addr.port()),
    ]);
    assert!(!ok, "plain HTTP was served on the HTTPS port");
    // The API with the token; the login cookie is Secure over HTTPS.
    let (ok, body, err) = curl(&[
        "--fail",
        "--cacert",
        &ca,
        "-H",
        &format!("Authorization: Bearer {token}"),
        &url("/api/v1/status"),
    ]);
    assert!(ok, "{err}");
    assert!(body.contains("\"ready\""), "{body}");
    let (ok, headers, err) = curl(&[
        "--cacert",
        &ca,
        "-D",
        "-",
        "-o",
        "/dev/null",
        "--data-urlencode",
        &format!("token={token}"),
        &url("/login"),
    ]);
    assert!(ok, "{err}");
    let cookie = headers
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("no cookie set:\n{headers}"));
    assert!(
        cookie.contains("Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );

    // A connection that opens TCP and never starts the handshake is closed
    // after header_timeout_secs, and audited.
    let idle = TcpStream::connect(addr).unwrap();
    let (_, waited) = read_to_close(idle);
    assert!(
        waited < Duration::from_secs(8),
        "the idle TLS connection was kept {waited:?}"
    );
    let events = cuts(&app, "tls_handshake_timeout", 1).await;
    // The client without the CA and the plain-HTTP client failed theirs.
    assert!(
        events
            .iter()
            .filter(|d| d["reason"] == "tls_handshake_failed")
            .count()
            >= 2,
        "{events:?}"
    );
    // The node still serves.
    let (ok, _, err) = curl(&["--fail", "--cacert", &ca, &url("/health")]);
    assert!(ok, "{err}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_headers_are_cut_and_slow_bodies_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = test_settings(dir.path());
    s.http.header_timeout_secs = 1;
    s.http.request_timeout_secs = 2;
    let app = spawn_app_with(s).await;
    let addr: SocketAddr = app.http_addr.unwrap();

    // Nothing at all, and half a request line: both cut after ~1 s.
    let silent = TcpStream::connect(addr).unwrap();
    let mut half = TcpStream::connect(addr).unwrap();
    half.write_all(b"GET /hea").unwrap();
    let (_, waited) = read_to_close(silent);
    assert!(waited < Duration::from_secs(8), "silent kept {waited:?}");
    let (_, waited) = read_to_close(half);
    assert!(waited < Duration::from_secs(8), "half kept {waited:?}");
    let events = cuts(&app, "header_timeout", 2).await;
    assert!(
        events.iter().all(|d| d["reason"] == "header_timeout"),
        "{events:?}"
    );
    assert!(events.iter().all(|d| d["peer"].as_str().is_some()));

    // Headers complete, the body stops halfway: 408 after the request time.
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.write_all(
        b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
          Content-Length: 100\r\n\r\ntoken=abc",
    )
    .unwrap();
    let (answer, waited) = read_to_close(slow);
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "after {waited:?}: {answer}"
    );

    // Meanwhile and after, a normal client is served.
    let (ok, body, err) = curl(&["--fail", &format!("http://{addr}/health")]);
    assert!(ok, "{err}");
    assert!(body.contains("alive"));
    app.stop().await;
}
