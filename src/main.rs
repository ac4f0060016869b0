//! The `her2map` binary: parse the command line, load the settings, set up
//! logging, run the subcommand (in [`cli`]) on a Tokio runtime and turn its
//! outcome into the exit status. Nothing else lives here.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use her2map::config::{LogFormat, Settings};

use cli::Cli;

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
    if cli.command.prints_summary() && std::env::var_os("RUST_LOG").is_none() {
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
    match runtime.block_on(cli.command.run(settings)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
