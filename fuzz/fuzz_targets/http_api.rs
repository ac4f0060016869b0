//! The node's HTTP API, console pages, health and metrics in process: each
//! input is one request to the real router of a node that `App::build`
//! made (demo weights, SQLite in a temporary folder, one viewer and one
//! operator user), so paths, query strings, headers and JSON or multipart
//! bodies reach the real extractors, handlers and SQL. Input layout:
//! byte 0 the credentials (none, viewer, operator, a wrong token), byte 1
//! the method, byte 2 the Content-Type, then the request target up to the
//! first newline (relative targets go under /api/v1/), then the body.
//! A crash: a panic (libfuzzer-sys aborts on a panic in any thread), or a
//! 500, which no input may cause (a client's mistake is a 4xx; the node
//! being unable is a 503).
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode, Uri, header};
use her2map::app::App;
use her2map::config::{HttpRole, HttpUser, Settings};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

struct Node {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
    viewer: String,
    operator: String,
    // The node's data folder lives as long as the process.
    _dir: tempfile::TempDir,
}

fn node() -> &'static Node {
    static NODE: OnceLock<Node> = OnceLock::new();
    NODE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Settings::load_with_env(None, false).unwrap();
        s.storage.data_dir = dir.path().to_path_buf();
        s.storage.min_free_mb = 0;
        s.model.demo = true;
        s.dicom.port = 0;
        s.http.port = 0;
        let (viewer, viewer_sha) = her2map::http::auth::new_token();
        let (operator, operator_sha) = her2map::http::auth::new_token();
        s.http.users = vec![
            HttpUser {
                name: "viewer".into(),
                role: HttpRole::Viewer,
                token_sha256: viewer_sha,
            },
            HttpUser {
                name: "operator".into(),
                role: HttpRole::Operator,
                token_sha256: operator_sha,
            },
        ];
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let app = rt.block_on(App::build(s)).unwrap();
        let router = app.http_router().expect("[http] enabled");
        // The node's tasks are not run: the router alone answers, and the
        // App (engine thread, listeners) stays alive with the process.
        std::mem::forget(app);
        Node {
            rt,
            router,
            viewer,
            operator,
            _dir: dir,
        }
    })
}

const METHODS: [Method; 6] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::HEAD,
    Method::PATCH,
];

const CONTENT_TYPES: [Option<&str>; 4] = [
    None,
    Some("application/json"),
    Some("multipart/related; type=\"application/dicom\"; boundary=B"),
    Some("application/x-www-form-urlencoded"),
];

fuzz_target!(|data: &[u8]| {
    let [who, method, ctype, rest @ ..] = data else {
        return;
    };
    let (target, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let Ok(target) = std::str::from_utf8(target) else {
        return;
    };
    let target = if target.starts_with('/') {
        target.to_string()
    } else {
        format!("/api/v1/{target}")
    };
    // A target that is no URI never gets past hyper: not the node's input.
    let Ok(uri) = target.parse::<Uri>() else {
        return;
    };
    let n = node();
    let mut req = Request::builder()
        .method(METHODS[*method as usize % METHODS.len()].clone())
        .uri(uri);
    match who % 4 {
        1 => req = req.header(header::AUTHORIZATION, format!("Bearer {}", n.viewer)),
        2 => req = req.header(header::AUTHORIZATION, format!("Bearer {}", n.operator)),
        3 => req = req.header(header::AUTHORIZATION, "Bearer 00"),
        _ => {}
    }
    if let Some(ct) = CONTENT_TYPES[*ctype as usize % CONTENT_TYPES.len()] {
        req = req.header(header::CONTENT_TYPE, ct);
    }
    let Ok(mut req) = req.body(Body::from(body.to_vec())) else {
        return;
    };
    // The peer's address, as the node's accept loop attaches it to every
    // request (sign-in failures and STOW-RS audit it).
    req.extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([192, 0, 2, 1], 40000))));
    let router = n.router.clone();
    n.rt.block_on(async move {
        let resp = router.oneshot(req).await.unwrap();
        let status = resp.status();
        // The whole answer, as a client reads it (pages and PNGs stream).
        let _ = axum::body::to_bytes(resp.into_body(), usize::MAX).await;
        assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{target}");
    });
});
