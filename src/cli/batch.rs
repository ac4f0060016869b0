//! `her2map batch`: the model over folders of past cases, one results row
//! per case (see `her2map::batch`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use her2map::batch::{BatchOptions, run_batch};
use her2map::config::Settings;

#[derive(clap::Args)]
pub struct BatchArgs {
    /// Folders (or files) of DICOM instances, any layout.
    #[arg(required = true)]
    dirs: Vec<PathBuf>,
    /// The results CSV (the detail goes beside it as RESULTS.jsonl). A rerun
    /// keeps the cases already there with the same inputs and weights.
    #[arg(long)]
    out: PathBuf,
    /// Cases imaged at once (one engine runs them in turn).
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Leave Patient ID and accession numbers out of the results (the
    /// patient key, a hash, stays).
    #[arg(long)]
    no_phi: bool,
    /// The checkpoint; default: `[model] weights`.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Device: cpu or cuda:N; default: `[model] device`.
    #[arg(long)]
    device: Option<String>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: BatchArgs, settings: Settings) -> anyhow::Result<ExitCode> {
    let weights = match args.model {
        Some(m) => m,
        None => settings.model.weights_path()?,
    };
    let opts = BatchOptions {
        inputs: args.dirs,
        out: args.out,
        jobs: args.jobs.max(1),
        no_phi: args.no_phi,
        weights,
        device: args.device.unwrap_or_else(|| settings.model.device.clone()),
        progress: std::io::stderr().is_terminal(),
    };
    let summary = tokio::task::spawn_blocking(move || run_batch(&opts, &settings)).await??;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "{} cases: {} run, {} failed, {} kept from an earlier run; {} unreadable files; \
             {:.1} cases/min; imaging {:.0} ms, inference {:.0} ms, writing {:.0} ms; peak RSS {} MB",
            summary.cases,
            summary.done,
            summary.failed,
            summary.skipped,
            summary.unreadable_files,
            summary.cases_per_minute,
            summary.imaging_ms,
            summary.inference_ms,
            summary.writing_ms,
            summary.peak_rss_kb / 1024
        );
    }
    Ok(ExitCode::SUCCESS)
}
