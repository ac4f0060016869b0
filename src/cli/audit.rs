//! `her2map audit`: the audit log, oldest first, as text or JSON lines.

use std::process::ExitCode;

use her2map::config::Settings;

#[derive(clap::Args)]
pub struct AuditArgs {
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    /// Only events of this name (e.g. instance_failed).
    #[arg(long)]
    event: Option<String>,
    /// Only events written by this node (`[node] id`).
    #[arg(long)]
    node: Option<String>,
    /// Only the last N events.
    #[arg(long)]
    tail: Option<usize>,
}

pub async fn run(args: AuditArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    let db = her2map::app::open_database(settings).await?;
    let mut events = db
        .events_of_node(0, args.event.as_deref(), args.node.as_deref(), i64::MAX)
        .await?;
    if let Some(n) = args.tail {
        let skip = events.len().saturating_sub(n);
        events.drain(..skip);
    }
    for e in &events {
        if args.json {
            println!("{}", serde_json::to_string(e)?);
        } else {
            let mut line = format!("{} {:<22}", e.time, e.event);
            for (k, v) in [
                ("assoc", &e.association_id),
                ("sop", &e.sop_instance_uid),
                ("study", &e.study_instance_uid),
                ("patient", &e.patient_key),
                ("node", &e.node),
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
