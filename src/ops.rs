//! Operator views and actions: what `her2map cases` and `her2map outbox`
//! show and do, as typed calls that an HTTP API can make as well. Every
//! action is a recorded transition (or audit event) through `db`; nothing
//! here writes SQL or prints.

use std::fmt;
use std::str::FromStr;

use time::OffsetDateTime;

use crate::cases::CaseRules;
use crate::cases::rules;
use crate::db::{CaseMember, CaseRow, CaseState, Db, DbError, format_time, parse_time};

/// A case as operators see it (`her2map cases`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaseView {
    #[serde(flatten)]
    pub case: CaseRow,
    pub present: Vec<&'static str>,
    pub missing: Vec<String>,
    pub lesion_side: Option<String>,
    pub instances: usize,
    /// When the case runs if nothing else arrives (collecting cases only).
    pub ready_at: Option<String>,
    /// When it runs partial / is held at the latest.
    pub max_wait_at: Option<String>,
    /// "fetching from SOURCE, ..." while a query/retrieve of what it lacks
    /// is under way (`[[sources]]`): a waiting reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fetching: Option<String>,
}

/// Describe every case for the operator.
pub async fn describe_cases(db: &Db, rules: &CaseRules) -> Result<Vec<CaseView>, DbError> {
    let mut out = Vec::new();
    for case in db.all_cases().await? {
        out.push(describe_case(db, rules, case).await?);
    }
    Ok(out)
}

/// One case as operators see it: what it has, lacks, and when it runs.
pub async fn describe_case(db: &Db, rules: &CaseRules, case: CaseRow) -> Result<CaseView, DbError> {
    let members = db.case_members(&case.id).await?;
    let fetching = fetching_reason(db, &case).await?;
    Ok(CaseView {
        fetching,
        ..view_of(case, &members, rules)
    })
}

/// The waiting reason of a case whose missing modalities are being fetched.
pub(crate) async fn fetching_reason(db: &Db, case: &CaseRow) -> Result<Option<String>, DbError> {
    if case.state != CaseState::Collecting {
        return Ok(None);
    }
    Ok(db
        .active_fetch(&case.id, None)
        .await?
        .map(|sources| rules::fetch_reason(&sources)))
}

fn view_of(case: CaseRow, members: &[CaseMember], rules: &CaseRules) -> CaseView {
    let c = rules::completeness(members, rules);
    let collecting = case.state == CaseState::Collecting;
    let first = parse_time(&case.first_instance_at);
    let last = parse_time(&case.last_instance_at);
    CaseView {
        present: c.usable.iter().map(|m| m.as_str()).collect(),
        missing: c
            .missing
            .iter()
            .map(|(m, what)| format!("{} ({what})", m.as_str()))
            .collect(),
        lesion_side: c.lesion_side.clone(),
        instances: members.len(),
        ready_at: (collecting && c.missing.is_empty())
            .then(|| last.map(|t| format_time(t + rules.stable_age)))
            .flatten(),
        max_wait_at: collecting
            .then(|| first.map(|t| format_time(t + rules.max_wait)))
            .flatten(),
        fetching: None,
        case,
    }
}

/// What an operator can do to a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaseAction {
    /// Run it now, whatever it waits for (or again, when done or failed).
    Run,
    /// Keep it from running until released.
    Hold,
    /// Let a held case collect (and be judged) again.
    Release,
}

impl CaseAction {
    pub fn as_str(self) -> &'static str {
        match self {
            CaseAction::Run => "run",
            CaseAction::Hold => "hold",
            CaseAction::Release => "release",
        }
    }

    /// The state the action moves a case to, and the states it may leave.
    fn transition(self) -> (CaseState, &'static [CaseState]) {
        use CaseState::*;
        match self {
            CaseAction::Run => (Ready, &[Collecting, Held, Failed, Done]),
            CaseAction::Hold => (Held, &[Collecting, Ready, Failed]),
            CaseAction::Release => (Collecting, &[Held]),
        }
    }
}

impl fmt::Display for CaseAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for CaseAction {
    type Err = OpsError;
    fn from_str(s: &str) -> Result<Self, OpsError> {
        match s {
            "run" => Ok(CaseAction::Run),
            "hold" => Ok(CaseAction::Hold),
            "release" => Ok(CaseAction::Release),
            other => Err(OpsError::UnknownAction(other.to_string())),
        }
    }
}

/// Why an operator action did nothing.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("no case {0}")]
    NoCase(String),
    #[error("case {id} is {state}: cannot {action}")]
    NotAllowed {
        id: String,
        state: CaseState,
        action: CaseAction,
    },
    /// The case moved between the read and the write (the node, or
    /// another operator).
    #[error("case {0} changed state meanwhile; try again")]
    Changed(String),
    #[error("no dead or pending delivery {0}")]
    NoDelivery(i64),
    #[error("unknown action {0}")]
    UnknownAction(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// A case an action moved.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Moved {
    pub id: String,
    pub from: CaseState,
    pub to: CaseState,
}

impl fmt::Display for Moved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "case {}: {} -> {}", self.id, self.from, self.to)
    }
}

/// Apply an operator action to a case, recorded as a transition with the
/// reason `operator: <action>`.
pub async fn case_action(
    db: &Db,
    id: &str,
    action: CaseAction,
    now: OffsetDateTime,
) -> Result<Moved, OpsError> {
    let case = db
        .case(id)
        .await?
        .ok_or_else(|| OpsError::NoCase(id.to_string()))?;
    let (to, allowed) = action.transition();
    if !allowed.contains(&case.state) {
        return Err(OpsError::NotAllowed {
            id: id.to_string(),
            state: case.state,
            action,
        });
    }
    let reason = format!("operator: {action}");
    if db.transition_case(id, case.state, to, &reason, now).await? {
        Ok(Moved {
            id: id.to_string(),
            from: case.state,
            to,
        })
    } else {
        Err(OpsError::Changed(id.to_string()))
    }
}

/// Operator retry of a delivery: a dead (or pending) row becomes due now.
pub async fn retry_delivery(db: &Db, id: i64, now: OffsetDateTime) -> Result<(), OpsError> {
    if db.retry_delivery(id, now).await? {
        Ok(())
    } else {
        Err(OpsError::NoDelivery(id))
    }
}

pub mod views;
pub use views::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_parse_and_name_themselves() {
        for a in [CaseAction::Run, CaseAction::Hold, CaseAction::Release] {
            assert_eq!(a.as_str().parse::<CaseAction>().unwrap(), a);
        }
        assert!(matches!(
            "stop".parse::<CaseAction>(),
            Err(OpsError::UnknownAction(_))
        ));
        let moved = Moved {
            id: "c1".into(),
            from: CaseState::Held,
            to: CaseState::Ready,
        };
        assert_eq!(moved.to_string(), "case c1: held -> ready");
    }
}
