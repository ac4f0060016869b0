//! Issue #19 part 1: connections that never become associations cannot lock
//! a real peer out. Floods of idle and half-sent connections (far more than
//! `max_associations`) run against a real node while DCMTK's storescu, an
//! allowed peer, sends instances: the peer is served and everything it sent
//! is stored, the flood's connections are closed after the ARTIM time
//! (PS3.8 9.1.5) or at accept when a pre-association cap is reached, the
//! node's sockets and descriptors stay bounded, and the cuts are audited
//! through a rate limit. Loopback only; every loop ends by itself.

use crate::common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use her2map::config::PeerSettings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

/// What a flood connection sends before it goes quiet.
#[derive(Clone, Copy, Debug)]
enum Stall {
    /// Nothing at all.
    Idle,
    /// Three bytes of a PDU header.
    HalfHeader,
    /// An A-ASSOCIATE-RQ header claiming 200 bytes, then 50 of them.
    HalfBody,
}

impl Stall {
    fn bytes(self) -> Vec<u8> {
        match self {
            Stall::Idle => Vec::new(),
            Stall::HalfHeader => vec![0x01, 0x00, 0x00],
            Stall::HalfBody => {
                let mut b = vec![0x01, 0x00, 0x00, 0x00, 0x00, 200];
                b.extend([0x00, 0x01, 0x00, 0x00]);
                b.extend(std::iter::repeat_n(b' ', 46));
                b
            }
        }
    }
}

/// Open one stalled connection from `from` and wait (at most `patience`)
/// for the node to close it; the time it stayed open, `None` if it did not
/// close.
async fn stalled(
    from: IpAddr,
    to: SocketAddr,
    stall: Stall,
    patience: Duration,
) -> Option<Duration> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::new(from, 0)).ok()?;
    let start = Instant::now();
    let mut stream = socket.connect(to).await.ok()?;
    let _ = stream.write_all(&stall.bytes()).await;
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(patience, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

/// The node's side of its connections on `port`: sockets that are open
/// (established, or closed by the peer and not yet by the node).
fn node_sockets(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/self/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local_port = cols
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            local_port == Some(port) && matches!(cols.get(3), Some(&"01") | Some(&"08"))
        })
        .count()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The process's descriptors by kind (socket, anon_inode, file), for the report.
fn fd_kinds() -> std::collections::BTreeMap<String, usize> {
    let mut kinds = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
    {
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        let t = target.to_string_lossy();
        let kind = if t.starts_with("socket:") {
            "socket".to_string()
        } else if let Some((k, _)) = t.split_once(':') {
            k.to_string()
        } else {
            t.rsplit('.')
                .next()
                .unwrap_or("file")
                .chars()
                .take(12)
                .collect()
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// What the sampler saw at its peaks.
struct Peaks {
    node_sockets: usize,
    fds: usize,
    fd_kinds: std::collections::BTreeMap<String, usize>,
}

/// Peaks of the node's sockets and of the process's descriptors, sampled
/// every 20 ms until `stop`.
fn sample_peaks(port: u16, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Peaks> {
    tokio::spawn(async move {
        let mut peaks = Peaks {
            node_sockets: 0,
            fds: 0,
            fd_kinds: Default::default(),
        };
        while !stop.load(Ordering::SeqCst) {
            peaks.node_sockets = peaks.node_sockets.max(node_sockets(port));
            let fds = open_fds();
            if fds > peaks.fds {
                peaks.fds = fds;
                peaks.fd_kinds = fd_kinds();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        peaks
    })
}

/// The tests count the descriptors of this one process: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn pacs_settings(dir: &std::path::Path) -> her2map::config::Settings {
    let mut s = test_settings(dir);
    s.dicom.max_associations = 2;
    s.dicom.artim_timeout_secs = 1;
    s.dicom.peers = vec![PeerSettings {
        ae_title: "PACS".into(),
        host: Some("127.0.0.1".into()),
    }];
    s
}

async fn storescu_as_pacs(port: u16, files: &[std::path::PathBuf]) -> (bool, String, Duration) {
    let mut args = vec![
        "-aet".into(),
        "PACS".into(),
        "-aec".into(),
        "HER2MAP".into(),
        "127.0.0.1".into(),
        port.to_string(),
    ];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let start = Instant::now();
    let (ok, out) = dcmtk("storescu", args).await;
    (ok, out, start.elapsed())
}

async fn reasons_of(app: &TestApp, at_least: usize) -> Vec<String> {
    // Each cut is audited just after the peer sees its connection close.
    wait_events(&app.db, "association_rejected", at_least)
        .await
        .iter()
        .filter_map(|e| e.detail.as_ref()?["reason"].as_str().map(String::from))
        .collect()
}

/// The flood comes from the allowed peer's own address (127.0.0.1), so no
/// per-address policy can tell them apart: only ARTIM and counting pending
/// connections apart from associations keep the peer served.
#[tokio::test(flavor = "multi_thread")]
async fn idle_and_half_sent_connections_do_not_lock_out_an_allowed_peer() {
    const FLOOD: usize = 60;
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let files_dir = tempfile::tempdir().unwrap();
    let mut settings = pacs_settings(dir.path());
    // Room for the whole flood from one address: here the point is that
    // the flood takes no association slot (2 of them, against 60).
    settings.dicom.max_pending_per_address = 4 * FLOOD;
    settings.dicom.max_pending_connections = 4 * FLOOD;
    let app = spawn_app_with(settings).await;
    let node = app.addr;
    let files = mr_variants(files_dir.path(), 20, "artim");
    let (fds_before, rss_before) = (open_fds(), rss_kib());

    // FLOOD stalled connections at all times, each reopened when the node
    // closes it, until `stop` (and at most 40 rounds each).
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let lifetimes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut flood = Vec::new();
    for i in 0..FLOOD {
        let stall = [Stall::Idle, Stall::HalfHeader, Stall::HalfBody][i % 3];
        let (stop, opened, lifetimes) = (stop.clone(), opened.clone(), lifetimes.clone());
        flood.push(tokio::spawn(async move {
            for _ in 0..40 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                opened.fetch_add(1, Ordering::SeqCst);
                let from = IpAddr::from([127, 0, 0, 1]);
                let open = stalled(from, node, stall, Duration::from_secs(5)).await;
                lifetimes.lock().unwrap().push((stall, open));
            }
        }));
    }
    while opened.load(Ordering::SeqCst) < FLOOD {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sampling = Arc::new(AtomicBool::new(false));
    let peaks = sample_peaks(node.port(), sampling.clone());

    let (ok, out, waited) = storescu_as_pacs(node.port(), &files).await;
    assert!(ok, "the allowed peer is served during the flood: {out}");
    assert_eq!(app.db.instance_count().await.unwrap(), 20);
    // Let the flood run through a few ARTIM periods more.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, Ordering::SeqCst);
    for f in flood {
        f.await.unwrap();
    }
    sampling.store(true, Ordering::SeqCst);
    let peaks = peaks.await.unwrap();
    let (peak_sockets, peak_fds) = (peaks.node_sockets, peaks.fds);

    let lifetimes = lifetimes.lock().unwrap().clone();
    let never_closed = lifetimes.iter().filter(|(_, t)| t.is_none()).count();
    assert_eq!(never_closed, 0, "every stalled connection is closed");
    let times: Vec<Duration> = lifetimes.iter().filter_map(|(_, t)| *t).collect();
    let (shortest, longest) = (
        times.iter().min().copied().unwrap(),
        times.iter().max().copied().unwrap(),
    );
    eprintln!(
        "ARTIM flood: {} stalled connections ({FLOOD} at a time) from 127.0.0.1; storescu \
         (20 instances) took {waited:?}; stalled connections lived {shortest:?} to \
         {longest:?}; node sockets peak {peak_sockets} (flood {FLOOD} + 1 association); \
         process fds {fds_before} before, peak {peak_fds} (both ends of every loopback \
         connection: {:?}), {} after; RSS {rss_before} KiB before, {} KiB after",
        times.len(),
        peaks.fd_kinds,
        open_fds(),
        rss_kib(),
    );
    assert!(waited < Duration::from_secs(8), "served in {waited:?}");
    assert!(
        shortest >= Duration::from_millis(900),
        "closed before ARTIM: {shortest:?}"
    );
    assert!(longest < Duration::from_secs(4), "closed late: {longest:?}");
    // Bounded by the flood's size, not by the number of connections over
    // time: each flood client holds one connection, and for a moment after
    // ARTIM cuts all of them together, a client's new connection and the
    // node's side of its old one (not yet closed) can both be open.
    assert!(
        peak_sockets <= 2 * FLOOD + 1,
        "node sockets bounded: {peak_sockets}"
    );
    let left = node_sockets(node.port());
    assert_eq!(left, 0, "no socket left open after the flood");
    assert!(peak_fds <= fds_before + 3 * FLOOD + 40, "fds: {peak_fds}");

    // Audited, rate-limited: 20 one by one in the minute, then a summary.
    let reasons = reasons_of(&app, 20).await;
    let one_by_one = reasons.iter().filter(|r| *r == "artim_timeout").count();
    assert_eq!(one_by_one, 20, "{reasons:?}");
    app.stop().await;
    let db = her2map::db::Db::connect(&format!(
        "sqlite://{}",
        dir.path().join("her2map.db").display()
    ))
    .await
    .unwrap();
    let events = db
        .events(0, Some("association_rejected"), 10_000)
        .await
        .unwrap();
    let summary = events
        .iter()
        .filter_map(|e| e.detail.as_ref()?["reason"].as_str())
        .find(|r| r.starts_with("artim_timeout: "))
        .map(String::from);
    let expected = times.len() - 20;
    assert!(
        summary
            .as_deref()
            .is_some_and(|s| s.contains(&format!(" {expected} more "))),
        "{summary:?}, expected {expected} more"
    );
}

/// Floods from addresses that are no listed peer's host: each address gets
/// `max_pending_per_address` places, unknown addresses together half of
/// `max_pending_connections`, and everything beyond is closed at accept.
/// The allowed peer, on its listed host, still has its reserved places.
#[tokio::test(flavor = "multi_thread")]
async fn pending_caps_close_a_flood_at_accept_and_keep_room_for_listed_hosts() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let files_dir = tempfile::tempdir().unwrap();
    let mut settings = pacs_settings(dir.path());
    settings.dicom.artim_timeout_secs = 3;
    settings.dicom.max_pending_connections = 40;
    settings.dicom.max_pending_per_address = 12;
    let app = spawn_app_with(settings).await;
    let node = app.addr;
    let files = mr_variants(files_dir.path(), 10, "caps");

    // 4 unknown addresses x 50 connections at once: 12 + 8 places held
    // (the unknown share is 20 of 40), 180 closed at once.
    let mut flood = Vec::new();
    for host in 2..=5u8 {
        for i in 0..50 {
            let stall = [Stall::Idle, Stall::HalfHeader, Stall::HalfBody][i % 3];
            let from = IpAddr::from([127, 0, 0, host]);
            flood.push(tokio::spawn(stalled(
                from,
                node,
                stall,
                Duration::from_secs(8),
            )));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = node_sockets(node.port());
    let (ok, out, waited) = storescu_as_pacs(node.port(), &files).await;
    assert!(ok, "the listed host keeps its places: {out}");
    assert_eq!(app.db.instance_count().await.unwrap(), 10);

    let mut at_once = 0;
    let mut at_artim = 0;
    for f in flood {
        match f.await.unwrap() {
            Some(t) if t < Duration::from_millis(1500) => at_once += 1,
            Some(t) if t >= Duration::from_millis(2900) => at_artim += 1,
            other => panic!("closed neither at accept nor at ARTIM: {other:?}"),
        }
    }
    eprintln!(
        "pending caps: 200 connections from 4 unknown addresses; {at_once} closed at \
         accept, {at_artim} held until ARTIM (3 s); node sockets while held: {held}; \
         storescu (10 instances) took {waited:?}"
    );
    assert_eq!(at_artim, 20, "unknown hosts hold half of 40 places");
    assert_eq!(at_once, 180);
    assert!(held <= 21, "node sockets while the flood is held: {held}");

    let reasons = reasons_of(&app, 20).await;
    let limit = reasons.iter().filter(|r| *r == "connection_limit").count();
    assert_eq!(limit, 20, "rate-limited audit: {reasons:?}");
    app.stop().await;
}

/// On the TLS port the same ARTIM deadline covers the TLS handshake: a peer
/// that opens the connection and never completes the handshake (nothing
/// sent, or the first bytes of a ClientHello) is closed after it, while a
/// TLS peer that does complete it is served.
#[tokio::test(flavor = "multi_thread")]
async fn a_tls_handshake_that_never_completes_is_cut_at_artim() {
    let _serial = SERIAL.lock().await;
    let pki = common::pki::make_pki();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = pacs_settings(dir.path());
    settings.dicom.tls.enabled = true;
    settings.dicom.tls.port = 0;
    settings.dicom.tls.certificate = pki.server_cert.clone();
    settings.dicom.tls.private_key = pki.server_key.clone();
    // The stalls come from the peer's own address (see the first test).
    settings.dicom.max_pending_per_address = 64;
    let app = spawn_app_with(settings).await;
    let tls = app.tls_addr.unwrap();
    // A TLS record header (handshake, TLS 1.0 record version) claiming 512
    // bytes, then 5 of them.
    let client_hello_start = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03];
    let mut stalls = Vec::new();
    for i in 0..30 {
        stalls.push(tokio::spawn(async move {
            let socket = TcpSocket::new_v4().unwrap();
            let start = Instant::now();
            let mut stream = socket.connect(tls).await.unwrap();
            if i % 2 == 1 {
                stream.write_all(&client_hello_start).await.unwrap();
            }
            let mut buf = [0u8; 64];
            loop {
                match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
                    Ok(Ok(_)) => continue,
                    Err(_) => return None,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut args = vec!["+tla".into(), "+cf".into(), pki.ca.display().to_string()];
    args.extend([
        "-aet".into(),
        "PACS".into(),
        "-aec".into(),
        "HER2MAP".into(),
    ]);
    args.extend(["127.0.0.1".into(), tls.port().to_string()]);
    let start = Instant::now();
    let (ok, out) = dcmtk("echoscu", args).await;
    let waited = start.elapsed();
    assert!(
        ok,
        "a TLS peer that completes its handshake is served: {out}"
    );
    let mut lived = Vec::new();
    for s in stalls {
        lived.push(s.await.unwrap().expect("stalled TLS connection closed"));
    }
    let (shortest, longest) = (lived.iter().min().unwrap(), lived.iter().max().unwrap());
    eprintln!(
        "TLS ARTIM: 30 stalled handshakes lived {shortest:?} to {longest:?}; echoscu +tla \
         took {waited:?}"
    );
    assert!(*shortest >= Duration::from_millis(900), "{shortest:?}");
    assert!(*longest < Duration::from_secs(4), "{longest:?}");
    let reasons = reasons_of(&app, 20).await;
    assert_eq!(
        reasons.iter().filter(|r| *r == "artim_timeout").count(),
        20,
        "{reasons:?}"
    );
    app.stop().await;
}
