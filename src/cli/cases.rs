//! `her2map cases`: the operator's view of the patient cases, and the
//! run / hold / release actions on one.

use std::process::ExitCode;

use clap::Subcommand;
use her2map::config::Settings;
use her2map::db::Db;

#[derive(clap::Args)]
pub struct CasesArgs {
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    action: Option<CasesAction>,
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

pub async fn run(args: CasesArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    let db = her2map::app::open_database(settings).await?;
    match args.action {
        Some(action) => act(db, action).await,
        None => list(db, settings, args.json).await,
    }
}

async fn act(db: Db, action: CasesAction) -> anyhow::Result<ExitCode> {
    use her2map::ops::CaseAction;
    let (action, id) = match action {
        CasesAction::Run { id } => (CaseAction::Run, id),
        CasesAction::Hold { id } => (CaseAction::Hold, id),
        CasesAction::Release { id } => (CaseAction::Release, id),
    };
    let now = her2map::clock::Clock::new().now();
    match her2map::ops::case_action_by(&db, &super::cli_user(), &id, action, now).await {
        Ok(moved) => {
            println!("{moved}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn list(db: Db, settings: &Settings, json: bool) -> anyhow::Result<ExitCode> {
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
