//! The operator views that the console and the REST API show beyond the
//! CLI's lists: one case in full, pages of cases, audit events and outbox
//! rows with filters, the node's counts, and the actions audited with the
//! acting user's name. Reads and writes only through `db`.

use std::collections::BTreeMap;

use serde::Serialize;
use time::OffsetDateTime;

use super::{CaseAction, CaseView, Moved, OpsError, describe_case, view_of};
use crate::cases::CaseRules;
use crate::db::{
    AuditEvent, CaseFilter, Db, DbError, DeliveryState, EventFilter, NewEvent, OutboxRow, event,
    format_time,
};

/// One page of a list: the items and the paging that produced them.
#[derive(Debug, Clone, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub limit: i64,
    pub offset: i64,
}

/// One member instance of a case, as the case page lists it.
#[derive(Debug, Clone, Serialize)]
pub struct MemberView {
    pub sop_instance_uid: String,
    pub series_instance_uid: String,
    pub study_instance_uid: String,
    pub laterality: String,
    pub view: String,
    pub series_description: String,
}

/// One step of a case's history: a state transition or an audit event.
#[derive(Debug, Clone, Serialize)]
pub struct TimelineEntry {
    pub time: String,
    pub kind: &'static str,
    pub what: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// An output of a case and where it went.
#[derive(Debug, Clone, Serialize)]
pub struct OutputView {
    pub sop_instance_uid: String,
    pub kind: String,
    pub revision: i64,
    pub sop_class_uid: String,
    pub series_instance_uid: String,
    pub deliveries: Vec<OutboxRow>,
}

/// Everything about one case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseDetail {
    #[serde(flatten)]
    pub view: CaseView,
    pub members: BTreeMap<String, Vec<MemberView>>,
    pub timeline: Vec<TimelineEntry>,
    /// The latest `case_result` event's detail, as the SR states it.
    pub result: Option<serde_json::Value>,
    pub outputs: Vec<OutputView>,
    /// The SOP Instance UIDs of the heatmap secondary captures among the
    /// outputs: what `/api/v1/cases/{id}/outputs/{sop}/png` renders.
    pub heatmaps: Vec<String>,
}

/// A page of cases, newest first.
pub async fn list_cases(
    db: &Db,
    rules: &CaseRules,
    filter: &CaseFilter,
    limit: i64,
    offset: i64,
) -> Result<Page<CaseView>, DbError> {
    let mut items = Vec::new();
    for case in db.cases_page(filter, limit, offset).await? {
        items.push(describe_case(db, rules, case).await?);
    }
    Ok(Page {
        items,
        limit,
        offset,
    })
}

/// One case in full, or None when there is no such case.
pub async fn case_detail(
    db: &Db,
    rules: &CaseRules,
    id: &str,
) -> Result<Option<CaseDetail>, DbError> {
    let Some(case) = db.case(id).await? else {
        return Ok(None);
    };
    let members = db.case_members(id).await?;
    let mut by_modality: BTreeMap<String, Vec<MemberView>> = BTreeMap::new();
    for m in &members {
        by_modality
            .entry(m.modality.clone())
            .or_default()
            .push(MemberView {
                sop_instance_uid: m.sop_instance_uid.clone(),
                series_instance_uid: m.series_instance_uid.clone(),
                study_instance_uid: m.study_instance_uid.clone(),
                laterality: m.laterality.clone(),
                view: m.view.clone(),
                series_description: m.series_description.clone(),
            });
    }
    let mut timeline: Vec<TimelineEntry> = db
        .case_transitions(id)
        .await?
        .into_iter()
        .map(|(time, from, to, reason)| TimelineEntry {
            time,
            kind: "transition",
            what: format!("{from} -> {to}"),
            detail: Some(serde_json::json!({ "reason": reason })),
        })
        .collect();
    let events = case_events(db, id).await?;
    let result = events
        .iter()
        .rev()
        .find(|e| e.event == crate::pipeline::event::CASE_RESULT)
        .and_then(|e| e.detail.clone());
    timeline.extend(
        events
            .into_iter()
            .filter(|e| e.event != crate::db::case_event::CASE_STATE_CHANGED)
            .map(|e| TimelineEntry {
                time: e.time,
                kind: "event",
                what: e.event,
                detail: e.detail,
            }),
    );
    timeline.sort_by(|a, b| a.time.cmp(&b.time));
    let deliveries = db
        .outbox_filtered(None, None, Some(id), i64::MAX, 0)
        .await?;
    let outputs = db.case_outputs(id).await?;
    let heatmaps = outputs
        .iter()
        .filter(|o| o.kind == crate::report::OutputKind::HeatmapSc)
        .map(|o| o.sop_instance_uid.clone())
        .collect();
    let outputs = outputs
        .into_iter()
        .map(|o| OutputView {
            deliveries: deliveries
                .iter()
                .filter(|d| d.sop_instance_uid == o.sop_instance_uid)
                .cloned()
                .collect(),
            sop_instance_uid: o.sop_instance_uid,
            kind: o.kind.as_str().to_string(),
            revision: o.revision,
            sop_class_uid: o.sop_class_uid,
            series_instance_uid: o.series_instance_uid,
        })
        .collect();
    Ok(Some(CaseDetail {
        view: CaseView {
            fetching: super::fetching_reason(db, &case).await?,
            ..view_of(case, &members, rules)
        },
        members: by_modality,
        timeline,
        result,
        outputs,
        heatmaps,
    }))
}

async fn case_events(db: &Db, id: &str) -> Result<Vec<AuditEvent>, DbError> {
    db.events_filtered(&EventFilter {
        case_id: Some(id.to_string()),
        limit: 10_000,
        ..Default::default()
    })
    .await
}

/// Audit events with filters and keyset paging (the CLI's `audit` reads
/// the same table through [`Db::events`]).
pub async fn audit_events(db: &Db, filter: &EventFilter) -> Result<Vec<AuditEvent>, DbError> {
    db.events_filtered(filter).await
}

/// The newest `limit` events of one name, newest first.
pub async fn recent_events(db: &Db, event: &str, limit: i64) -> Result<Vec<AuditEvent>, DbError> {
    db.recent_events(event, limit).await
}

/// The outbox, filtered and paged.
pub async fn outbox_page(
    db: &Db,
    state: Option<DeliveryState>,
    destination: Option<&str>,
    limit: i64,
    offset: i64,
) -> Result<Page<OutboxRow>, DbError> {
    Ok(Page {
        items: db
            .outbox_filtered(state, destination, None, limit, offset)
            .await?,
        limit,
        offset,
    })
}

/// The node's counts for the dashboard and `/api/v1/status`.
#[derive(Debug, Clone, Serialize)]
pub struct Counts {
    pub cases: BTreeMap<String, i64>,
    pub outbox: BTreeMap<String, i64>,
    /// Audit events of the last 24 hours, by name.
    pub last_24h: BTreeMap<String, i64>,
}

pub async fn counts(db: &Db, now: OffsetDateTime) -> Result<Counts, DbError> {
    let cases = db
        .case_state_counts()
        .await?
        .into_iter()
        .map(|(s, n)| (s.as_str().to_string(), n))
        .collect();
    let mut outbox = BTreeMap::new();
    for (_, state, n) in db.outbox_state_counts().await? {
        *outbox.entry(state.as_str().to_string()).or_insert(0) += n;
    }
    let since = format_time(now - time::Duration::hours(24));
    let last_24h = db.event_counts_since(&since).await?.into_iter().collect();
    Ok(Counts {
        cases,
        outbox,
        last_24h,
    })
}

/// A case action by a named user (console or API): the transition as the
/// CLI makes it, plus an `operator_action` event naming the user, whether
/// it moved the case or not.
pub async fn case_action_by(
    db: &Db,
    user: &str,
    id: &str,
    action: CaseAction,
    now: OffsetDateTime,
) -> Result<Moved, OpsError> {
    let result = super::case_action(db, id, action, now).await;
    let outcome = match &result {
        Ok(m) => serde_json::json!({ "from": m.from.as_str(), "to": m.to.as_str() }),
        Err(e) => serde_json::json!({ "refused": e.to_string() }),
    };
    record_action(db, user, action.as_str(), Some(id), outcome, now).await?;
    result
}

/// A delivery retry by a named user, audited likewise.
pub async fn retry_delivery_by(
    db: &Db,
    user: &str,
    delivery: i64,
    now: OffsetDateTime,
) -> Result<(), OpsError> {
    let result = super::retry_delivery(db, delivery, now).await;
    let mut outcome = serde_json::json!({ "outbox_id": delivery });
    if let Err(e) = &result {
        outcome["refused"] = serde_json::json!(e.to_string());
    }
    record_action(db, user, "retry", None, outcome, now).await?;
    result
}

async fn record_action(
    db: &Db,
    user: &str,
    action: &str,
    case_id: Option<&str>,
    mut detail: serde_json::Value,
    now: OffsetDateTime,
) -> Result<(), DbError> {
    detail["user"] = serde_json::json!(user);
    detail["action"] = serde_json::json!(action);
    db.record(
        NewEvent {
            event: event::OPERATOR_ACTION,
            case_id,
            detail: Some(detail),
            ..Default::default()
        },
        now,
    )
    .await
}
