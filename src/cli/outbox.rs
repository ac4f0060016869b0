//! `her2map outbox`: the result deliveries, and retrying one.

use std::process::ExitCode;

use clap::Subcommand;
use her2map::config::Settings;

#[derive(clap::Args)]
pub struct OutboxArgs {
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    action: Option<OutboxAction>,
}

#[derive(Subcommand)]
enum OutboxAction {
    /// Make a dead-lettered (or waiting) delivery due now.
    Retry { id: i64 },
}

pub async fn run(args: OutboxArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    let db = her2map::app::open_database(settings).await?;
    if let Some(OutboxAction::Retry { id }) = args.action {
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
        if args.json {
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
