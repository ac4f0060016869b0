//! The `her2map` command line: the clap definitions and one module per
//! subcommand, each a thin layer over the library (it parses, calls one
//! library entry point and prints). No node logic lives here.

mod audit;
mod batch;
mod cases;
mod demo;
mod echo;
mod evaluate;
mod infer;
mod outbox;
mod send;
mod serve;
mod synth;
mod tls;
mod token;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use her2map::config::Settings;

#[derive(Parser)]
#[command(
    name = "her2map",
    version,
    about = "DICOM node running the HER2 MAP model on breast imaging"
)]
pub struct Cli {
    /// Configuration file layered over the built-in defaults.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the node: DICOM storage SCP, spool and audit log, case assembly,
    /// inference, results and their delivery.
    Serve,
    /// The whole node on this machine with a synthetic patient and the demo
    /// weights; leaves the SR, heatmaps and audit log in OUT.
    Demo(demo::DemoArgs),
    /// Run the model: on tensors (`--inputs`) or on a folder of DICOM files.
    Infer(infer::InferArgs),
    /// C-STORE DICOM files (or folders of them) to a peer.
    Send(send::SendArgs),
    /// C-ECHO a peer.
    Echo(echo::EchoArgs),
    /// Write a synthetic patient (MG, US and DCE-MRI studies) for tests and demos.
    Synth(synth::SynthArgs),
    /// List patient cases, or act on one (run, hold, release).
    Cases(cases::CasesArgs),
    /// List result deliveries, or retry one.
    Outbox(outbox::OutboxArgs),
    /// Print the audit log, oldest first.
    Audit(audit::AuditArgs),
    /// Make a bearer token for a console/API user and print its
    /// `[[http.users]]` entry.
    Token(token::TokenArgs),
    /// Site validation: run the model over folders of past cases, one
    /// results row per case.
    Batch(batch::BatchArgs),
    /// Site validation: the batch results against pathology labels (AUROC,
    /// sensitivity, specificity, calibration; HTML report).
    Evaluate(evaluate::EvaluateArgs),
}

impl Command {
    /// Whether the command prints its own summary (its logs stay quiet unless
    /// asked).
    pub fn prints_summary(&self) -> bool {
        matches!(self, Command::Demo(_))
    }

    /// Run the command; the exit code says whether it did what was asked.
    pub async fn run(self, settings: Settings) -> anyhow::Result<ExitCode> {
        match self {
            Command::Serve => serve::run(settings).await,
            Command::Demo(args) => demo::run(args, settings).await,
            Command::Infer(args) => infer::run(args, &settings).await,
            Command::Send(args) => send::run(args).await,
            Command::Echo(args) => echo::run(args).await,
            Command::Synth(args) => synth::run(args).await,
            Command::Cases(args) => cases::run(args, &settings).await,
            Command::Outbox(args) => outbox::run(args, &settings).await,
            Command::Audit(args) => audit::run(args, &settings).await,
            Command::Token(args) => token::run(args),
            Command::Batch(args) => batch::run(args, settings).await,
            Command::Evaluate(args) => evaluate::run(args, &settings).await,
        }
    }
}

/// Who acts from the command line, for the `operator_action` event: the
/// login name, as `cli:NAME` (the console's users are named by their token).
fn cli_user() -> String {
    let name = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_default();
    let name: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
        .take(32)
        .collect();
    if name.is_empty() {
        "cli".into()
    } else {
        format!("cli:{name}")
    }
}
