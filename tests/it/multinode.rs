//! Several real `her2map serve` processes on one PostgreSQL database and one
//! shared data folder, behind a real TCP load balancer (haproxy, round
//! robin), delivering to DCMTK storescp: the synthetic patient sent as
//! three studies over several associations gives exactly one case and each
//! output once at the destination; a node killed with SIGKILL while it
//! holds the case leaves it to another node. Needs a PostgreSQL server
//! (`HER2MAP_MULTINODE_PG_URL` or `HER2MAP_TEST_PG_URL`, as
//! scripts/postgres.sh prints; scripts/test.sh starts one) and haproxy;
//! without them they fail, never skip.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use her2map::db::{CaseState, Db, DeliveryState};
use her2map::dimse::client::ClientOptions;
use her2map::send::{collect_files, send_files};

/// One test at a time: each picks its nodes' ports ahead (free_port), and
/// a test running beside it could take one in the meantime.
/// Never skipped: without PostgreSQL these tests fail with this message.
const NO_POSTGRES: &str = "the multi-node tests need PostgreSQL and haproxy \
     (apt-get install postgresql haproxy): scripts/test.sh starts a throwaway \
     server and sets HER2MAP_MULTINODE_PG_URL";

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn server() -> Option<String> {
    let url = std::env::var("HER2MAP_MULTINODE_PG_URL")
        .or_else(|_| std::env::var("HER2MAP_TEST_PG_URL"))
        .ok()
        .filter(|u| !u.is_empty())?;
    let haproxy = Command::new("haproxy").arg("-v").output();
    haproxy.is_ok().then_some(url)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn study(name: &str) -> Vec<PathBuf> {
    collect_files(&[test_data(&format!("synth-patient/{name}"))])
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect()
}

/// A process killed (SIGKILL) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Cluster {
    nodes: Vec<Option<Proc>>,
    ports: Vec<u16>,
    _haproxy: Proc,
    lb_port: u16,
    storescp: Option<Proc>,
    /// Accepts the nodes' associations and never answers, until
    /// [`Cluster::open_destination`].
    silent: Option<tokio::task::JoinHandle<()>>,
    dest_port: u16,
    received: tempfile::TempDir,
    data: tempfile::TempDir,
    db: Db,
}

impl Cluster {
    /// `n` nodes with claims lasting `lease_secs`; with `silent`, the
    /// destination answers nothing until [`Cluster::open_destination`].
    async fn start(server: &str, n: usize, lease_secs: u64, silent: bool) -> Cluster {
        let data = tempfile::tempdir().unwrap();
        let url = {
            // A database of this cluster's own on the server.
            cluster_database_url(server, data.path())
        };
        let received = tempfile::tempdir().unwrap();
        let dest_port = free_port();
        let (storescp, silent) = if silent {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", dest_port))
                .await
                .unwrap();
            let task = tokio::spawn(async move {
                let mut held = Vec::new();
                while let Ok((stream, _)) = listener.accept().await {
                    held.push(stream);
                }
            });
            (None, Some(task))
        } else {
            (Some(storescp(received.path(), dest_port)), None)
        };
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let config = data.path().join(format!("node{i}.toml"));
            std::fs::write(
                &config,
                format!(
                    "[dicom]\nhost = \"127.0.0.1\"\nport = {port}\n\
                     [storage]\ndata_dir = \"{data}\"\nmin_free_mb = 0\n\
                     [node]\nid = \"node{i}\"\nlease_secs = {lease_secs}\n\
                     [database]\nurl = \"{url}\"\n\
                     [cases]\nstable_age_secs = 3\n\
                     [outbox]\ntimeout_secs = 5\n\
                     [model]\ndemo = true\n\
                     [http]\nport = 0\n\
                     [[destinations]]\nae_title = \"DEST\"\nhost = \"127.0.0.1\"\nport = {dest_port}\n",
                    data = data.path().join("shared").display(),
                ),
            )
            .unwrap();
            let log = std::fs::File::create(data.path().join(format!("node{i}.log"))).unwrap();
            let child = Command::new(env!("CARGO_BIN_EXE_her2map"))
                .arg("--config")
                .arg(&config)
                .arg("serve")
                .stdout(Stdio::from(log.try_clone().unwrap()))
                .stderr(Stdio::from(log))
                .spawn()
                .expect("her2map serve");
            nodes.push(Some(Proc(child)));
        }
        for port in &ports {
            wait_for_port(*port, 120).await;
        }
        let lb_port = free_port();
        let mut cfg = format!(
            "global\n  maxconn 256\ndefaults\n  mode tcp\n  timeout connect 2s\n  \
             timeout client 5m\n  timeout server 5m\nfrontend dicom\n  bind 127.0.0.1:{lb_port}\n  \
             default_backend nodes\nbackend nodes\n  balance roundrobin\n"
        );
        for (i, port) in ports.iter().enumerate() {
            cfg.push_str(&format!(
                "  server node{i} 127.0.0.1:{port} check inter 500ms fall 1 rise 1\n"
            ));
        }
        let cfg_path = data.path().join("haproxy.cfg");
        std::fs::write(&cfg_path, cfg).unwrap();
        let haproxy = Proc(
            Command::new("haproxy")
                .arg("-db")
                .arg("-f")
                .arg(&cfg_path)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("haproxy"),
        );
        wait_for_port(lb_port, 10).await;
        let db = Db::connect(&url).await.unwrap().with_node("test");
        Cluster {
            nodes,
            ports,
            _haproxy: haproxy,
            lb_port,
            storescp,
            silent,
            dest_port,
            received,
            data,
            db,
        }
    }

    /// Replace the silent destination with storescp on the same port.
    async fn open_destination(&mut self) {
        if let Some(task) = self.silent.take() {
            task.abort();
            let _ = task.await;
        }
        self.storescp = Some(storescp(self.received.path(), self.dest_port));
        wait_for_port(self.dest_port, 10).await;
    }

    fn lb(&self) -> String {
        format!("127.0.0.1:{}", self.lb_port)
    }

    fn kill(&mut self, i: usize) {
        self.nodes[i] = None;
    }

    fn received_files(&self) -> usize {
        std::fs::read_dir(self.received.path()).unwrap().count()
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.data.path().join(format!("node{i}.log"))).unwrap_or_default()
    }
}

/// DCMTK storescp as the destination; +uf: a file per received copy, so a
/// duplicate delivery shows.
fn storescp(dir: &Path, port: u16) -> Proc {
    Proc(
        Command::new("storescp")
            .args(["-aet", "DEST", "+xa", "+uf", "-od"])
            .arg(dir)
            .arg(port.to_string())
            .env("TCP_NODELAY", "1")
            .spawn()
            .expect("storescp (apt-get install dcmtk)"),
    )
}

/// The cluster's own database on `server`, named after its data folder.
fn cluster_database_url(server: &str, dir: &Path) -> String {
    // test_database_url reads HER2MAP_TEST_PG_URL; the multi-node tests run
    // with only HER2MAP_MULTINODE_PG_URL set as well, so ask psql here.
    use sha2::Digest;
    let server = server.trim_end_matches('/');
    let digest = sha2::Sha256::digest(dir.to_string_lossy().as_bytes());
    let name = format!("m_{}", hex::encode(&digest[..10]));
    let out = Command::new("psql")
        .arg(format!("{server}/postgres"))
        .args(["-qAt", "-c", &format!("CREATE DATABASE {name}")])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("{server}/{name}")
}

async fn wait_for_port(port: u16, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "port {port} never opened");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_until<F, Fut>(what: &str, secs: u64, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn scu() -> ClientOptions {
    ClientOptions {
        calling_ae: "PACS".into(),
        called_ae: "HER2MAP".into(),
        ..Default::default()
    }
}

/// The patient's three studies, each split over two associations, all at
/// once through the load balancer: every instance acknowledged.
async fn send_patient(lb: &str) -> usize {
    let mut sends = Vec::new();
    let mut total = 0;
    for piece in ["MG", "US", "MR"] {
        let files = study(piece);
        total += files.len();
        let half = files.len().div_ceil(2);
        for chunk in files.chunks(half) {
            let (lb, chunk) = (lb.to_string(), chunk.to_vec());
            sends.push(tokio::spawn(async move {
                send_files(&lb, &scu(), &chunk, |_| {}).await.unwrap()
            }));
        }
    }
    for s in sends {
        let results = s.await.unwrap();
        assert!(results.iter().all(|r| r.ok()), "{results:?}");
    }
    total
}

/// The case done and every output at the destination.
async fn wait_delivered(c: &Cluster, secs: u64) {
    wait_until("the result at the destination", secs, || async {
        let cases = c.db.all_cases().await.unwrap();
        let rows = c.db.outbox().await.unwrap();
        cases.len() == 1
            && cases[0].state == CaseState::Done
            && !rows.is_empty()
            && rows.iter().all(|r| r.state == DeliveryState::Sent)
    })
    .await;
}

async fn assert_one_result(c: &Cluster, sent: usize) {
    assert_eq!(c.db.instance_count().await.unwrap() as usize, sent);
    let cases = c.db.all_cases().await.unwrap();
    assert_eq!(cases.len(), 1, "{cases:?}");
    let outputs = c.db.case_outputs(&cases[0].id).await.unwrap();
    assert!(!outputs.is_empty());
    // Give a straggling duplicate time to arrive before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        c.received_files(),
        outputs.len(),
        "each output exactly once at the destination"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_behind_haproxy_make_one_case_and_deliver_each_output_once() {
    let server = server().expect(NO_POSTGRES);
    let _serial = SERIAL.lock().await;
    let c = Cluster::start(&server, 3, 30, false).await;
    let sent = send_patient(&c.lb()).await;
    wait_delivered(&c, 240).await;
    assert_one_result(&c, sent).await;
    // Round robin spread the associations: more than one node ingested.
    let stored =
        c.db.events(0, Some("instance_stored"), 100_000)
            .await
            .unwrap();
    let nodes: std::collections::BTreeSet<_> =
        stored.iter().filter_map(|e| e.node.clone()).collect();
    assert!(nodes.len() >= 2, "ingest on {nodes:?}");
    // Exactly one node queued the case, once.
    let queued: Vec<_> =
        c.db.events(0, Some("case_state_changed"), 1000)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.detail.as_ref().is_some_and(|d| d["to"] == "queued"))
            .collect();
    assert_eq!(queued.len(), 1, "{queued:?}");
    let _ = &c.ports;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_killed_while_it_holds_the_case_leaves_it_to_another() {
    let server = server().expect(NO_POSTGRES);
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start(&server, 3, 4, false).await;
    let sent = send_patient(&c.lb()).await;
    // The moment one node claims the case, kill it with SIGKILL.
    let deadline = Instant::now() + Duration::from_secs(120);
    let victim = loop {
        let cases = c.db.all_cases().await.unwrap();
        if let Some(case) = cases
            .iter()
            .find(|k| matches!(k.state, CaseState::Queued | CaseState::Running))
        {
            let owner: Vec<_> =
                c.db.events(0, Some("case_state_changed"), 1000)
                    .await
                    .unwrap()
                    .into_iter()
                    .filter(|e| e.case_id.as_deref() == Some(case.id.as_str()))
                    .filter(|e| e.detail.as_ref().is_some_and(|d| d["to"] == "queued"))
                    .filter_map(|e| e.node)
                    .collect();
            let name = owner.last().expect("the claiming node").clone();
            let i: usize = name.trim_start_matches("node").parse().unwrap();
            c.kill(i);
            break (i, case.id.clone());
        }
        assert!(
            cases.iter().all(|k| k.state != CaseState::Done),
            "the case finished before it could be interrupted"
        );
        assert!(Instant::now() < deadline, "no case was claimed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    wait_delivered(&c, 240).await;
    assert_one_result(&c, sent).await;
    let reasons: Vec<String> =
        c.db.case_transitions(&victim.1)
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.3)
            .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r == &format!("lease of node node{} expired: queued again", victim.0)),
        "{reasons:?}\n{}",
        c.log((victim.0 + 1) % 3)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_killed_mid_delivery_leaves_it_to_another_and_each_output_arrives_once() {
    let server = server().expect(NO_POSTGRES);
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start(&server, 3, 4, true).await;
    let sent = send_patient(&c.lb()).await;
    // The case is done and some node is sending to the (silent) destination.
    let deadline = Instant::now() + Duration::from_secs(240);
    let victim = loop {
        let rows = c.db.outbox().await.unwrap();
        if let Some(r) = rows.iter().find(|r| !r.claimed_by.is_empty()) {
            break Some(r.claimed_by.clone());
        }
        assert!(
            Instant::now() < deadline,
            "no node ever sent: {:?} {rows:?}\n{}",
            c.db.all_cases().await.unwrap(),
            c.log(0)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let victim = victim.unwrap();
    let i: usize = victim.trim_start_matches("node").parse().unwrap();
    c.kill(i);
    c.open_destination().await;
    // After the claim's lease (twice the 5 s send timeout) another node
    // sends everything; each output arrives once.
    wait_delivered(&c, 240).await;
    assert_one_result(&c, sent).await;
    let sent_by: std::collections::BTreeSet<String> =
        c.db.events(0, Some("delivery_sent"), 10_000)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|e| e.node)
            .collect();
    assert!(!sent_by.contains(&victim), "{sent_by:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_instance_on_two_nodes_at_once_is_kept_once_and_both_succeed() {
    let server = server().expect(NO_POSTGRES);
    let _serial = SERIAL.lock().await;
    let data = tempfile::tempdir().unwrap();
    let files_dir = tempfile::tempdir().unwrap();
    let url = cluster_database_url(&server, data.path());
    let node = |id: &str| {
        let mut s = test_settings(&data.path().join("shared"));
        s.database.url = url.clone();
        s.node.id = id.into();
        s
    };
    let a = spawn_app_with(node("node-a")).await;
    let b = spawn_app_with(node("node-b")).await;
    let files = mr_variants(files_dir.path(), 20, "twice");
    for f in &files {
        let (addr_a, addr_b, options) = (a.address(), b.address(), scu());
        let (ra, rb) = tokio::join!(
            send_files(&addr_a, &options, std::slice::from_ref(f), |_| {}),
            send_files(&addr_b, &options, std::slice::from_ref(f), |_| {})
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert!(ra[0].ok() && rb[0].ok(), "{ra:?} {rb:?}");
    }
    assert_eq!(
        a.db.instance_count().await.unwrap() as usize,
        files.len(),
        "{:?}",
        a.db.instance_paths().await.unwrap()
    );
    let spooled = walkdir::WalkDir::new(a.spool())
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file() && e.path().extension().is_some_and(|x| x == "dcm"))
        .count();
    assert_eq!(spooled, files.len(), "one file per instance");
    assert_eq!(a.temp_files() + b.temp_files(), 0);
    a.stop().await;
    b.stop().await;
}

/// A PostgreSQL server of the test's own (scripts/postgres.sh), so that
/// stopping it disturbs no other test.
struct OwnPostgres {
    url: String,
    dir: String,
}

impl OwnPostgres {
    fn start() -> OwnPostgres {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/postgres.sh");
        let out = Command::new(&script).arg("start").output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8_lossy(&out.stdout).to_string();
        let value = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{key}=")))
                .unwrap()
                .to_string()
        };
        OwnPostgres {
            url: value("HER2MAP_TEST_PG_URL"),
            dir: value("HER2MAP_TEST_PG_DIR"),
        }
    }

    fn ctl(&self, what: &str) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/postgres.sh");
        let ok = Command::new(&script)
            .args([what, &self.dir])
            .status()
            .unwrap();
        assert!(ok.success(), "postgres.sh {what}");
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        self.ctl("stop");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_down_for_10_s_answers_out_of_resources_and_the_node_recovers() {
    use her2map::dimse::command::status;
    server().expect(NO_POSTGRES);
    let _serial = SERIAL.lock().await;
    let pg = OwnPostgres::start();
    let data = tempfile::tempdir().unwrap();
    let files_dir = tempfile::tempdir().unwrap();
    let mut s = test_settings(data.path());
    s.database.url = format!("{}/postgres", pg.url);
    s.database.busy_timeout_ms = 1000;
    let app = spawn_app_with(s).await;
    let files = mr_variants(files_dir.path(), 40, "pgdown");
    let r = send_files(&app.address(), &scu(), &files[..5], |_| {})
        .await
        .unwrap();
    assert!(r.iter().all(|r| r.ok()), "{r:?}");

    pg.ctl("pause");
    let down_since = Instant::now();
    let mut acknowledged: Vec<String> = r.iter().map(|r| r.sop_instance_uid.clone()).collect();
    let mut refused = Vec::new();
    let mut next = 5;
    while down_since.elapsed() < Duration::from_secs(10) && next < files.len() {
        let r = send_files(&app.address(), &scu(), &files[next..next + 1], |_| {})
            .await
            .unwrap();
        for r in r {
            if r.ok() {
                acknowledged.push(r.sop_instance_uid);
            } else {
                assert_eq!(r.status, Some(status::OUT_OF_RESOURCES), "{r:?}");
                refused.push(files[next].clone());
            }
        }
        next += 1;
    }
    assert!(
        !refused.is_empty(),
        "nothing was refused while the database was down"
    );
    pg.ctl("resume");

    // Back: the peer's resends (and the rest) are stored, without a restart.
    let rest: Vec<PathBuf> = refused.into_iter().chain(files[next..].to_vec()).collect();
    wait_until("the node to store again", 60, || async {
        send_files(&app.address(), &scu(), &rest[..1], |_| {})
            .await
            .is_ok_and(|r| r.iter().all(|r| r.ok()))
    })
    .await;
    let r = send_files(&app.address(), &scu(), &rest, |_| {})
        .await
        .unwrap();
    assert!(r.iter().all(|r| r.ok()), "{r:?}");
    acknowledged.extend(r.into_iter().map(|r| r.sop_instance_uid));
    // Nothing acknowledged is lost: every one is indexed, with its file.
    let indexed: std::collections::HashMap<String, String> =
        app.db.instance_paths().await.unwrap().into_iter().collect();
    for uid in &acknowledged {
        let path = indexed.get(uid).unwrap_or_else(|| panic!("{uid} lost"));
        assert!(app.spool().join(path).exists(), "{path}");
    }
    assert_eq!(indexed.len(), files.len());
    app.stop().await;
}
