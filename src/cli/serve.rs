//! `her2map serve`: build the node and run it until SIGINT or SIGTERM.

use std::process::ExitCode;

use her2map::app::App;
use her2map::config::Settings;
use tokio_util::sync::CancellationToken;

pub async fn run(settings: Settings) -> anyhow::Result<ExitCode> {
    let app = App::build(settings).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    app.run_until_stopped(shutdown).await?;
    Ok(ExitCode::SUCCESS)
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
