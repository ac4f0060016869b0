//! `her2map demo`: the whole node on this machine (see `her2map::demo`),
//! its summary printed.

use std::path::PathBuf;
use std::process::ExitCode;

use her2map::config::Settings;

#[derive(clap::Args)]
pub struct DemoArgs {
    #[arg(long, default_value = "demo-out")]
    out: PathBuf,
}

pub async fn run(args: DemoArgs, settings: Settings) -> anyhow::Result<ExitCode> {
    let summary = her2map::demo::run(settings, &args.out).await?;
    print!("{summary}");
    Ok(ExitCode::SUCCESS)
}
