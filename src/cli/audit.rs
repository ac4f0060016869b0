//! `her2map audit`: the audit log, oldest first, as text or JSON lines. The
//! same filters and the same view as the API's `/api/v1/audit`
//! (`ops::audit_events`), read page by page.

use std::collections::VecDeque;
use std::process::ExitCode;

use her2map::config::Settings;
use her2map::db::EventFilter;

/// Events read per query (keyset paging, as the API pages).
const PAGE: i64 = 1000;

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
    /// Only events of this case.
    #[arg(long = "case")]
    case_id: Option<String>,
    /// Only events of this association.
    #[arg(long = "association")]
    association_id: Option<String>,
    /// Only events at or after this time (RFC 3339, UTC).
    #[arg(long)]
    since: Option<String>,
    /// Only events before this time (RFC 3339, UTC).
    #[arg(long)]
    until: Option<String>,
    /// Only the last N events.
    #[arg(long)]
    tail: Option<usize>,
}

pub async fn run(args: AuditArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    // The API's own parser of the filter (times checked the same way).
    let query = her2map::http::api::AuditQuery {
        event: args.event,
        since: args.since,
        until: args.until,
        case_id: args.case_id,
        association_id: args.association_id,
        node: args.node,
        after_seq: None,
        limit: Some(PAGE),
    };
    let mut filter: EventFilter = match query.filter() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {}", e.message);
            return Ok(ExitCode::FAILURE);
        }
    };
    let db = her2map::app::open_database(settings).await?;
    let keep = args.tail.unwrap_or(usize::MAX);
    let mut events = VecDeque::new();
    loop {
        let page = her2map::ops::audit_events(&db, &filter).await?;
        let Some(last) = page.last() else { break };
        filter.after_seq = last.seq;
        for e in page {
            if events.len() == keep {
                events.pop_front();
            }
            if keep > 0 {
                events.push_back(e);
            }
        }
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
                ("case", &e.case_id),
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
