//! `her2map send`: C-STORE files (or folders of them) to a peer with a
//! progress bar on a terminal, and report the failures.

use std::path::PathBuf;
use std::process::ExitCode;

use her2map::dimse::client::ClientOptions;
use her2map::send::{SendResult, collect_files, send_files};

use super::tls::ScuArgs;

#[derive(clap::Args)]
pub struct SendArgs {
    /// Peer address, HOST:PORT.
    address: String,
    /// Files or folders to send.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    scu: ScuArgs,
}

pub async fn run(args: SendArgs) -> anyhow::Result<ExitCode> {
    let address = args.address;
    let options = args.scu.options(&address)?;
    send(&address, &options, &args.paths).await
}

async fn send(
    address: &str,
    options: &ClientOptions,
    paths: &[PathBuf],
) -> anyhow::Result<ExitCode> {
    let files = collect_files(paths);
    if files.is_empty() {
        anyhow::bail!("no files found under the given paths");
    }
    let bar = progress_bar(files.len() as u64);
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

/// A progress bar on stderr when it is a terminal, hidden otherwise.
fn progress_bar(len: u64) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(len)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}
