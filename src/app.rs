//! Wiring: `App::build` opens the data folder and database, runs migrations,
//! binds the SCP (port 0 allowed) and `run_until_stopped` serves until the
//! shutdown token fires.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::info;

use tokio::sync::mpsc;

use crate::cases::{Assembler, CaseJob, Clock};
use crate::config::{Settings, resolve_host};
use crate::db::{Db, InstanceWriter, NewEvent, event};
use crate::dimse::server::{ConnectionLimits, Server, ServerConfig};
use crate::inference::{Engine, EngineHandle, EngineOptions};
use crate::ingest::Ingest;
use crate::outbox::Outbox;
use crate::pipeline::{ModelIdentity, Pipeline};
use crate::spool::Spool;

pub struct App {
    server: Server<Ingest>,
    addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    db: Db,
    clock: Clock,
    /// The instance writer, stopped after the server's last association.
    instances: InstanceWriter,
    assembler: Assembler,
    wake: std::sync::Arc<tokio::sync::Notify>,
    jobs_tx: mpsc::Sender<CaseJob>,
    jobs_rx: Option<mpsc::Receiver<CaseJob>>,
    outbox: Outbox,
    outbox_wake: std::sync::Arc<tokio::sync::Notify>,
    pipeline: Pipeline,
    /// The console, API, metrics and health server (`[http]`).
    http: Option<crate::http::HttpServer>,
    /// Query/retrieve from `[[sources]]`, when any is configured.
    fetcher: Option<crate::fetch::Fetcher>,
    /// SQLite: this node's exclusive claim on the database file.
    _node_lock: Option<std::fs::File>,
}

/// Open (creating and migrating) the node's database, owner-only: it holds
/// PHI. The one way the node and the CLI's commands open it.
pub async fn open_database(settings: &Settings) -> anyhow::Result<Db> {
    let db = Db::connect_with(
        &settings.database_url(),
        Duration::from_millis(settings.database.busy_timeout_ms),
    )
    .await
    .context("opening the database")?
    .with_node(&settings.node.id());
    if let Some(file) = db.file() {
        crate::spool::make_private_file(file)
            .with_context(|| format!("securing the database {}", file.display()))?;
    }
    Ok(db)
}

impl App {
    /// Build the node from its settings, in the order that makes a broken
    /// configuration fail before anything is opened to the network: TLS
    /// files, storage and database, the model, then the DICOM port.
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        // Certificates are read first: a bad file stops the node at once,
        // with the key's name, before anything opens.
        let tls = if settings.dicom.tls.enabled {
            Some(crate::dimse::tls::server_config(&settings.dicom.tls)?)
        } else {
            None
        };
        let (spool, db, node_lock) = open_storage(&settings).await?;
        // The one clock of the node: every timer and every stamped row.
        let clock = Clock::new();
        let instances = InstanceWriter::start(&db, clock.clone());
        // The model loads before the port opens: a node that cannot infer
        // must not accept studies it will never report on.
        let engine = load_model(&settings).await?;
        let ingest = Ingest::new(spool, db.clone(), instances.queue(), clock.clone());
        let wake = ingest.stored_notify();
        let workers = Workers::new(&settings, &db, &clock, engine)?;
        let fetcher = fetcher(&settings, &db, &clock, &ingest, &wake)?;
        let server = bind_server(&settings, ingest.clone(), tls).await?;
        let addr = server.local_addr()?;
        let tls_addr = server.tls_local_addr()?;
        let http = crate::http::bind(
            &settings,
            crate::http::Parts {
                db: db.clone(),
                clock: clock.clone(),
                engine: workers.pipeline.engine.clone(),
                dicom_addr: addr,
                dicom_listening: server.listening(),
                ingest,
            },
        )
        .await?;
        Ok(App {
            server,
            addr,
            tls_addr,
            db,
            clock,
            instances,
            assembler: workers.assembler,
            wake,
            jobs_tx: workers.jobs_tx,
            jobs_rx: Some(workers.jobs_rx),
            outbox: workers.outbox,
            outbox_wake: workers.outbox_wake,
            pipeline: workers.pipeline,
            http,
            fetcher,
            _node_lock: node_lock,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The DICOM TLS listener's address, when `dicom.tls.enabled`.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// The HTTP server's address, when `http.enabled`.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|h| h.local_addr())
    }

    /// The HTTP server's routes, to call in process (fuzz/fuzz_targets/http_api.rs).
    pub fn http_router(&self) -> Option<axum::Router> {
        self.http.as_ref().map(|h| h.router())
    }

    pub fn db(&self) -> Db {
        self.db.clone()
    }

    /// The queue of cases ready for inference (tests take it to watch it).
    pub fn take_case_queue(&mut self) -> Option<mpsc::Receiver<CaseJob>> {
        self.jobs_rx.take()
    }

    /// Serve until `shutdown` is cancelled: stop accepting, let in-flight
    /// instances finish, then close the database.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        info!(address = %self.addr, "DICOM storage SCP listening on {}", self.addr);
        if let Some(tls) = self.tls_addr {
            info!(address = %tls, "DICOM TLS listening on {tls}");
        }
        let mut detail = serde_json::json!({
            "address": self.addr.to_string(),
            "version": env!("CARGO_PKG_VERSION"),
        });
        if let Some(tls) = self.tls_addr {
            detail["tls_address"] = serde_json::json!(tls.to_string());
        }
        let _ = self
            .db
            .record(
                NewEvent {
                    event: event::NODE_STARTED,
                    detail: Some(detail),
                    ..Default::default()
                },
                self.clock.now(),
            )
            .await;
        let assembler = tokio::spawn(self.assembler.run(
            self.wake.clone(),
            self.jobs_tx.clone(),
            shutdown.clone(),
        ));
        let pipeline = self
            .jobs_rx
            .map(|jobs| tokio::spawn(self.pipeline.run(jobs, shutdown.clone())));
        let outbox = tokio::spawn(self.outbox.run(self.outbox_wake.clone(), shutdown.clone()));
        let fetcher = self.fetcher.map(|f| tokio::spawn(f.run(shutdown.clone())));
        // After the DICOM lines: scripts read the first "listening on".
        let http = self.http.map(|h| tokio::spawn(h.run(shutdown.clone())));
        self.server.run(shutdown).await;
        // The server has answered its last association: no row is coming.
        self.instances.shutdown().await;
        let _ = assembler.await;
        let _ = outbox.await;
        if let Some(f) = fetcher {
            let _ = f.await;
        }
        if let Some(p) = pipeline {
            let _ = p.await;
        }
        if let Some(h) = http {
            let _ = h.await;
        }
        let _ = self
            .db
            .record(
                NewEvent {
                    event: event::NODE_STOPPED,
                    ..Default::default()
                },
                self.clock.now(),
            )
            .await;
        self.db.close().await;
        info!("stopped");
        Ok(())
    }
}

/// The data folder (owner-only), the database (on SQLite with this node's
/// exclusive claim on it) and the spool.
async fn open_storage(settings: &Settings) -> anyhow::Result<(Spool, Db, Option<std::fs::File>)> {
    let data_dir = &settings.storage.data_dir;
    crate::spool::create_private_dir(data_dir)
        .with_context(|| format!("creating data_dir {}", data_dir.display()))?;
    let db = open_database(settings).await?;
    let node_lock = db.lock_single_node()?;
    // Several nodes share the spool only on PostgreSQL: each then keeps
    // its temporary files in its own folder (SQLite: one node, tmp/).
    let tmp_owner = match db.backend() {
        crate::db::Backend::Postgres => db.node().to_string(),
        crate::db::Backend::Sqlite => String::new(),
    };
    let spool = Spool::open_for_node(
        &settings.spool_dir(),
        &tmp_owner,
        settings.storage.min_free_mb << 20,
    )
    .with_context(|| format!("opening spool {}", settings.spool_dir().display()))?;
    Ok((spool, db, node_lock))
}

/// The model weights on the engine's own thread (loaded off the runtime).
async fn load_model(settings: &Settings) -> anyhow::Result<EngineHandle> {
    let weights = settings.model.weights_path()?;
    let (w, device) = (weights.clone(), settings.model.device.clone());
    let opts = EngineOptions {
        queue: settings.model.queue,
        max_batch: settings.model.max_batch,
    };
    crate::inference::set_tf32(settings.model.tf32);
    let engine = tokio::task::spawn_blocking(move || Engine::start(&w, &device, opts))
        .await?
        .with_context(|| format!("loading the model weights {}", weights.display()))?;
    let (device, device_name) = engine.device();
    info!(
        weights = %weights.display(),
        sha256 = %engine.weights_sha256(),
        device,
        device_name,
        configured = %settings.model.device,
        max_batch = engine.max_batch(),
        tf32 = settings.model.tf32,
        demo = settings.model.demo,
        "model loaded"
    );
    Ok(engine)
}

/// The SCP on its plain port (and TLS port), with the peers' hosts resolved
/// and the pre-association limits.
async fn bind_server(
    settings: &Settings,
    ingest: Ingest,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
) -> anyhow::Result<Server<Ingest>> {
    let d = &settings.dicom;
    let peers = d
        .peers
        .iter()
        .map(|p| {
            let hosts = p.host.as_deref().map(resolve_host).unwrap_or_default();
            if p.host.is_some() && hosts.is_empty() {
                anyhow::bail!(
                    "configuration key `dicom.peers.host`: {:?} does not resolve",
                    p.host
                );
            }
            Ok((p.ae_title.trim().to_string(), hosts))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let config = ServerConfig {
        ae_title: d.ae_title.trim().to_string(),
        max_pdu: d.max_pdu,
        max_associations: d.max_associations,
        accept_any_storage: d.accept_any_storage,
        accept_any_called_ae: d.accept_any_called_ae,
        read_timeout: Duration::from_secs(d.read_timeout_secs),
        peers,
    };
    let bind = format!("{}:{}", d.host, d.port);
    let limits = ConnectionLimits {
        artim_timeout: Duration::from_secs(d.artim_timeout_secs),
        max_pending: d.max_pending_connections,
        max_pending_per_address: d.max_pending_per_address,
    };
    let mut server = Server::bind(&bind, config, ingest)
        .await
        .with_context(|| format!("binding the DICOM port {bind}"))?
        .connection_limits(limits);
    if let Some(tls) = tls {
        let bind = format!("{}:{}", d.host, d.tls.port);
        server = server
            .bind_tls(&bind, tls)
            .await
            .with_context(|| format!("binding the DICOM TLS port {bind}"))?;
    }
    Ok(server)
}

/// The query/retrieve worker (`[[sources]]`, `[fetch]`); none without
/// sources.
fn fetcher(
    settings: &Settings,
    db: &Db,
    clock: &Clock,
    ingest: &Ingest,
    wake: &std::sync::Arc<tokio::sync::Notify>,
) -> anyhow::Result<Option<crate::fetch::Fetcher>> {
    if settings.sources.is_empty() {
        return Ok(None);
    }
    let f = crate::fetch::Fetcher::new(crate::fetch::FetcherParts {
        db: db.clone(),
        clock: clock.clone(),
        ingest: ingest.clone(),
        spool_dir: settings.spool_dir(),
        settings: settings.fetch.clone(),
        sources: settings.sources.clone(),
        rules: settings.case_rules(),
        key_mode: settings.cases.patient_key,
        window_days: settings.cases.window_days,
        node_ae: settings.dicom.ae_title.trim().to_string(),
        pre_patterns: settings.imaging.mri_pre_patterns.clone(),
        post_patterns: settings.imaging.mri_post_patterns.clone(),
        assembler_wake: wake.clone(),
    })
    .context("configuring [[sources]]")?;
    Ok(Some(f))
}

/// The tasks behind ingest: the case assembler, the pipeline that runs
/// ready cases, and the outbox, with the channels between them.
struct Workers {
    assembler: Assembler,
    jobs_tx: mpsc::Sender<CaseJob>,
    jobs_rx: mpsc::Receiver<CaseJob>,
    pipeline: Pipeline,
    outbox: Outbox,
    outbox_wake: std::sync::Arc<tokio::sync::Notify>,
}

impl Workers {
    fn new(
        settings: &Settings,
        db: &Db,
        clock: &Clock,
        engine: EngineHandle,
    ) -> anyhow::Result<Self> {
        let (hints_tx, hints_rx) = mpsc::channel(4);
        let lease = Duration::from_secs(settings.node.lease_secs);
        let assembler = Assembler::new(
            db.clone(),
            settings.case_rules(),
            settings.cases.patient_key,
            settings.cases.window_days,
            clock.clone(),
        )
        .with_prepare_hints(hints_tx)
        .with_case_lease(lease);
        let assembler = if settings.sources.is_empty() {
            assembler
        } else {
            let f = &settings.fetch;
            assembler.with_fetch(crate::cases::FetchPlan {
                on_open: f.on_open,
                before_run: f.before_run.then(|| Duration::from_secs(f.before_run_secs)),
            })
        };
        // Several nodes share the backlog: each claims ahead only what one
        // wave of its pipeline takes (one case on the CPU, `max_batch` on a
        // GPU), so that a backlog spreads and a GPU still gets full batches.
        let assembler = match db.backend() {
            crate::db::Backend::Postgres => assembler.with_claim_ahead(engine.max_batch()),
            crate::db::Backend::Sqlite => assembler,
        };
        let (jobs_tx, jobs_rx) = mpsc::channel(settings.cases.queue);
        let outbox_wake = std::sync::Arc::new(tokio::sync::Notify::new());
        let pipeline = Pipeline {
            db: db.clone(),
            clock: clock.clone(),
            data_dir: settings.storage.data_dir.clone(),
            engine,
            imaging: settings.imaging.clone(),
            report: settings.report.clone(),
            identity: ModelIdentity {
                name: "HER2 MAP (Model3)".into(),
                version: format!("her2map {} (Candle port)", env!("CARGO_PKG_VERSION")),
                demo: settings.model.demo,
            },
            destinations: settings.destinations.clone(),
            outbox_wake: outbox_wake.clone(),
            prepare_hints: Some(hints_rx),
            speculation: Default::default(),
        };
        let outbox = Outbox::new(
            db.clone(),
            settings.storage.data_dir.clone(),
            settings.destinations.clone(),
            settings.outbox.clone(),
            settings.dicom.ae_title.trim().to_string(),
        )?
        .with_clock(clock.clone())
        .with_lease(lease);
        Ok(Workers {
            assembler,
            jobs_tx,
            jobs_rx,
            pipeline,
            outbox,
            outbox_wake,
        })
    }
}
