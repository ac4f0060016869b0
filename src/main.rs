//! The `her2map` command line: a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use her2map::app::App;
use her2map::config::{LogFormat, Settings};
use her2map::dimse::client::{ClientOptions, echo};
use her2map::send::{SendResult, collect_files, send_files};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "her2map",
    version,
    about = "DICOM node running the HER2 MAP model on breast imaging"
)]
struct Cli {
    /// Configuration file layered over the built-in defaults.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// DICOM TLS (PS3.15 B.9) for `send` and `echo`: given `--tls-ca`, the
/// association runs over TLS.
#[derive(clap::Args)]
struct TlsArgs {
    /// Use DICOM TLS, trusting the CA certificates in this PEM file.
    #[arg(long, value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// The node's own certificate (PEM), for peers that require one.
    #[arg(long, value_name = "PEM", requires_all = ["tls_ca", "tls_private_key"])]
    tls_certificate: Option<PathBuf>,
    /// The private key (PEM) of --tls-certificate.
    #[arg(long, value_name = "PEM", requires = "tls_certificate")]
    tls_private_key: Option<PathBuf>,
    /// The name the peer's certificate must carry; default: HOST.
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    tls_server_name: Option<String>,
}

impl TlsArgs {
    fn client_tls(
        self,
        address: &str,
    ) -> anyhow::Result<Option<her2map::dimse::client::ClientTls>> {
        let Some(ca) = self.tls_ca else {
            return Ok(None);
        };
        let settings = her2map::config::ClientTlsSettings {
            ca,
            certificate: self.tls_certificate.unwrap_or_default(),
            private_key: self.tls_private_key.unwrap_or_default(),
            server_name: self.tls_server_name.unwrap_or_default(),
        };
        let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        her2map::tls::client_tls(&settings, host, &her2map::tls::COMMAND_LINE_KEYS)
            .map(Some)
            .map_err(|e| match e {
                her2map::config::ConfigError::Invalid { key, message } => {
                    anyhow::anyhow!("{key}: {message}")
                }
                other => other.into(),
            })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the node: DICOM storage SCP, spool and audit log, case assembly,
    /// inference, results and their delivery.
    Serve,
    /// The whole node on this machine with a synthetic patient and the demo
    /// weights; leaves the SR, heatmaps and audit log in OUT.
    Demo {
        #[arg(long, default_value = "demo-out")]
        out: PathBuf,
    },
    /// Run the model: on tensors (`--inputs`) or on a folder of DICOM files.
    Infer {
        /// The checkpoint (.pth or .safetensors); default: `[model] weights`.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Inputs in the fixtures' safetensors layout (input.mri, input.us,
        /// input.mg, input.clinical; batch first).
        #[arg(long, conflicts_with = "dir")]
        inputs: Option<PathBuf>,
        /// `US,MRI,MG` flags for every sample (`1,1,1`) or per sample (`1,1,1;0,1,0`).
        #[arg(long, default_value = "1,1,1")]
        flags: String,
        /// A folder of one patient's DICOM files (any layout).
        dir: Option<PathBuf>,
        /// With a DICOM folder: write the exact input tensors here.
        #[arg(long)]
        dump_inputs: Option<PathBuf>,
        /// Device: cpu or cuda:N; default: `[model] device`.
        #[arg(long)]
        device: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// C-STORE DICOM files (or folders of them) to a peer.
    Send {
        /// Peer address, HOST:PORT.
        address: String,
        /// Files or folders to send.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long, default_value = "HER2MAP-SCU")]
        calling_ae: String,
        #[arg(long, default_value = "ANY-SCP")]
        called_ae: String,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// C-ECHO a peer.
    Echo {
        address: String,
        #[arg(long, default_value = "HER2MAP-SCU")]
        calling_ae: String,
        #[arg(long, default_value = "ANY-SCP")]
        called_ae: String,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Write a synthetic patient (MG, US and DCE-MRI studies) for tests and demos.
    Synth {
        /// Output folder (one sub-folder per study).
        dir: PathBuf,
        /// Clinical sizes (about 600 MB) instead of the small default (~2 MB).
        #[arg(long)]
        full_size: bool,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Patient's Name (PN) written into every instance.
        #[arg(long)]
        patient_name: Option<String>,
        /// Patient ID written into every instance.
        #[arg(long)]
        patient_id: Option<String>,
    },
    /// List patient cases, or act on one (run, hold, release).
    Cases {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<CasesAction>,
    },
    /// List result deliveries, or retry one.
    Outbox {
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<OutboxAction>,
    },
    /// Print the audit log, oldest first.
    Audit {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Only events of this name (e.g. instance_failed).
        #[arg(long)]
        event: Option<String>,
        /// Only the last N events.
        #[arg(long)]
        tail: Option<usize>,
    },
}

#[derive(Subcommand)]
enum CasesAction {
    /// Run the case now, whatever it is waiting for.
    Run { id: String },
    /// Keep the case from running until released.
    Hold { id: String },
    /// Let a held case collect and run by the rules again.
    Release { id: String },
}

#[derive(Subcommand)]
enum OutboxAction {
    /// Make a dead-lettered (or waiting) delivery due now.
    Retry { id: i64 },
}

fn init_tracing(settings: Option<&Settings>) {
    let level = settings
        .map(|s| s.log.level.clone())
        .unwrap_or_else(|| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if settings.is_some_and(|s| s.log.format == LogFormat::Json) {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // The demo prints its own summary; its logs stay quiet unless asked.
    let mut log_settings = settings.clone();
    if matches!(cli.command, Command::Demo { .. }) && std::env::var_os("RUST_LOG").is_none() {
        log_settings.log.level = "warn".into();
    }
    init_tracing(Some(&log_settings));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, settings)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve => {
            let app = App::build(settings).await?;
            let shutdown = CancellationToken::new();
            tokio::spawn(stop_on_signal(shutdown.clone()));
            app.run_until_stopped(shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { out } => {
            let summary = her2map::demo::run(settings, &out).await?;
            print!("{summary}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Infer {
            model,
            inputs,
            flags,
            dir,
            dump_inputs,
            device,
            json,
        } => {
            let weights = match model {
                Some(m) => m,
                None => settings.model.weights_path()?,
            };
            let device = device.unwrap_or_else(|| settings.model.device.clone());
            let imaging = settings.imaging.clone();
            let value =
                tokio::task::spawn_blocking(move || -> anyhow::Result<serde_json::Value> {
                    match (inputs, dir) {
                        (Some(inputs), None) => Ok(her2map::inference::infer_tensors_file(
                            &weights, &inputs, &flags, &device,
                        )?),
                        (None, Some(dir)) => Ok(her2map::pipeline::infer_dicom_folder(
                            &weights,
                            &device,
                            &dir,
                            &imaging,
                            dump_inputs.as_deref(),
                        )?),
                        _ => anyhow::bail!("give either --inputs FILE or a DICOM folder"),
                    }
                })
                .await??;
            if json {
                println!("{}", serde_json::to_string(&value)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&value)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Echo {
            address,
            calling_ae,
            called_ae,
            tls,
        } => {
            let options = ClientOptions {
                calling_ae,
                called_ae,
                tls: tls.client_tls(&address)?,
                ..Default::default()
            };
            let status = echo(&address, &options).await?;
            println!("C-ECHO {address}: status {:#06X}", status.code);
            Ok(if status.code == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Send {
            address,
            paths,
            calling_ae,
            called_ae,
            tls,
        } => {
            let options = ClientOptions {
                calling_ae,
                called_ae,
                tls: tls.client_tls(&address)?,
                ..Default::default()
            };
            send(&address, &options, &paths).await
        }
        Command::Synth {
            dir,
            full_size,
            seed,
            patient_name,
            patient_id,
        } => {
            let mut opts = her2map::synth::SynthOptions {
                full_size,
                seed,
                ..Default::default()
            };
            if let Some(n) = patient_name {
                opts.patient_name = n;
            }
            if let Some(id) = patient_id {
                opts.patient_id = id;
            }
            let dir2 = dir.clone();
            let summary = tokio::task::spawn_blocking(move || {
                her2map::synth::write_synthetic_patient(&dir2, &opts)
            })
            .await??;
            for st in &summary.studies {
                println!("{}: {} files, {} bytes", st.name, st.files.len(), st.bytes);
            }
            println!(
                "wrote {} bytes under {} (lesion side {:?})",
                summary.total_bytes,
                dir.display(),
                summary.lesion_side
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Cases { json, action } => {
            let db = her2map::app::open_database(&settings).await?;
            if let Some(action) = action {
                use her2map::ops::CaseAction;
                let (action, id) = match action {
                    CasesAction::Run { id } => (CaseAction::Run, id),
                    CasesAction::Hold { id } => (CaseAction::Hold, id),
                    CasesAction::Release { id } => (CaseAction::Release, id),
                };
                let now = her2map::clock::Clock::new().now();
                return match her2map::ops::case_action(&db, &id, action, now).await {
                    Ok(moved) => {
                        println!("{moved}");
                        Ok(ExitCode::SUCCESS)
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        Ok(ExitCode::FAILURE)
                    }
                };
            }
            let rules = settings.case_rules();
            let cases = her2map::ops::describe_cases(&db, &rules).await?;
            for c in &cases {
                if json {
                    println!("{}", serde_json::to_string(c)?);
                } else {
                    println!(
                        "{} rev {} {:<10} patient={} present=[{}] missing=[{}] side={} instances={}",
                        c.case.id,
                        c.case.revision,
                        c.case.state,
                        c.case.patient_key,
                        c.present.join(","),
                        c.missing.join("; "),
                        c.lesion_side.as_deref().unwrap_or("?"),
                        c.instances,
                    );
                    println!("    reason: {}", c.case.reason);
                    if let Some(t) = &c.ready_at {
                        println!("    runs at {t} if nothing else arrives");
                    }
                    if let Some(t) = &c.max_wait_at {
                        println!("    max wait until {t}");
                    }
                }
            }
            if cases.is_empty() && !json {
                println!("no cases");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Outbox { json, action } => {
            let db = her2map::app::open_database(&settings).await?;
            if let Some(OutboxAction::Retry { id }) = action {
                let now = her2map::clock::Clock::new().now();
                return match her2map::ops::retry_delivery(&db, id, now).await {
                    Ok(()) => {
                        println!("delivery {id} is due now");
                        Ok(ExitCode::SUCCESS)
                    }
                    Err(her2map::ops::OpsError::Db(e)) => Err(e.into()),
                    Err(e) => {
                        eprintln!("error: {e}");
                        Ok(ExitCode::FAILURE)
                    }
                };
            }
            for row in db.outbox().await? {
                if json {
                    println!("{}", serde_json::to_string(&row)?);
                } else {
                    println!(
                        "{:>5} {:<8} {} {} case={} attempts={} next={} last=[{}]",
                        row.id,
                        row.state,
                        row.kind,
                        row.destination,
                        row.case_id,
                        row.attempts,
                        row.next_attempt_at,
                        row.last_status
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { json, event, tail } => {
            let db = her2map::app::open_database(&settings).await?;
            let mut events = db.events(0, event.as_deref(), i64::MAX).await?;
            if let Some(n) = tail {
                let skip = events.len().saturating_sub(n);
                events.drain(..skip);
            }
            for e in &events {
                if json {
                    println!("{}", serde_json::to_string(e)?);
                } else {
                    let mut line = format!("{} {:<22}", e.time, e.event);
                    for (k, v) in [
                        ("assoc", &e.association_id),
                        ("sop", &e.sop_instance_uid),
                        ("study", &e.study_instance_uid),
                        ("patient", &e.patient_key),
                    ] {
                        if let Some(v) = v {
                            line.push_str(&format!(" {k}={v}"));
                        }
                    }
                    if let Some(s) = e.status {
                        line.push_str(&format!(" status={s:#06X}"));
                    }
                    if let Some(d) = &e.detail {
                        line.push_str(&format!(" {d}"));
                    }
                    println!("{line}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn send(
    address: &str,
    options: &ClientOptions,
    paths: &[PathBuf],
) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    let files = collect_files(paths);
    if files.is_empty() {
        anyhow::bail!("no files found under the given paths");
    }
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(files.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let results = send_files(address, options, &files, |_r: &SendResult| bar.inc(1)).await?;
    bar.finish_and_clear();
    let failed: Vec<&SendResult> = results.iter().filter(|r| !r.ok()).collect();
    println!(
        "sent {} of {} file(s), {} failed",
        results.len() - failed.len(),
        results.len(),
        failed.len()
    );
    for r in &failed {
        let status = r
            .status
            .map(|s| format!("status {s:#06X}"))
            .unwrap_or_else(|| "no status".into());
        println!(
            "  failed {}: {status}: {}",
            r.path.display(),
            r.error.as_deref().unwrap_or("")
        );
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// SIGINT or SIGTERM: stop accepting and finish in-flight instances.
async fn stop_on_signal(token: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                token.cancel();
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("shutdown requested");
    token.cancel();
}
