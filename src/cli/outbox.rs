//! `her2map outbox`: the result deliveries, and retrying one. The same
//! filters and view as the API's `/api/v1/outbox` (`ops::outbox_page`).

use std::process::ExitCode;

use clap::Subcommand;
use her2map::config::Settings;
use her2map::db::DeliveryState;

/// Rows read per query.
const PAGE: i64 = 1000;

#[derive(clap::Args)]
pub struct OutboxArgs {
    #[arg(long)]
    json: bool,
    /// Only deliveries in this state (pending, sent, dead, ...).
    #[arg(long)]
    state: Option<DeliveryState>,
    /// Only deliveries to this destination (its name, as listed).
    #[arg(long)]
    destination: Option<String>,
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
        return match her2map::ops::retry_delivery_by(&db, &super::cli_user(), id, now).await {
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
    let mut offset = 0;
    loop {
        let page =
            her2map::ops::outbox_page(&db, args.state, args.destination.as_deref(), PAGE, offset)
                .await?;
        if page.items.is_empty() {
            break;
        }
        offset += page.items.len() as i64;
        print_rows(&page.items, args.json)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_rows(rows: &[her2map::db::OutboxRow], json: bool) -> anyhow::Result<()> {
    for row in rows {
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
    Ok(())
}
