//! Cases (issue 5): case rows, their membership (`case_instances`) and
//! their state transitions (`case_transitions`, each with an audit event).

use serde::Serialize;
use sqlx::AssertSqlSafe;

use super::audit::{NewEvent, insert_event};
use time::OffsetDateTime;

use super::{CaseState, Db, DbError, format_time};

/// Case audit event names.
pub mod case_event {
    pub const CASE_OPENED: &str = "case_opened";
    pub const CASE_STATE_CHANGED: &str = "case_state_changed";
}

/// An instance not yet assigned to a case.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UnassignedInstance {
    pub sop_instance_uid: String,
    pub patient_key: String,
    pub patient_id_key: String,
    pub study_date: String,
}

/// One step of a case-assignment round ([`Db::assign_instances`]).
#[derive(Debug, Clone)]
pub enum Assignment {
    /// Open a new case with this instance.
    Open {
        case_id: String,
        patient_key: String,
        sop_instance_uid: String,
        study_date: String,
    },
    /// Add the instance to a case (in `from_state`), widening its study
    /// dates to `oldest..newest`; `reopen` makes a finished case collect
    /// again as a new revision, with this reason.
    Add {
        case_id: String,
        from_state: CaseState,
        sop_instance_uid: String,
        oldest: String,
        newest: String,
        reopen: Option<&'static str>,
    },
}

/// Which cases a page lists (the console's and the API's filters); times
/// are the database's own format (`clock::format_time`).
#[derive(Debug, Clone, Default)]
pub struct CaseFilter {
    pub state: Option<CaseState>,
    /// Opened at or after.
    pub opened_since: Option<String>,
    /// Opened before.
    pub opened_until: Option<String>,
}

/// One case row.
#[derive(Debug, Clone, Default, Serialize, sqlx::FromRow)]
pub struct CaseRow {
    pub id: String,
    pub patient_key: String,
    #[sqlx(try_from = "String")]
    pub state: CaseState,
    pub revision: i64,
    pub reason: String,
    pub opened_at: String,
    pub first_instance_at: String,
    pub last_instance_at: String,
    pub oldest_study_date: String,
    pub newest_study_date: String,
    pub inputs_digest: String,
    pub updated_at: String,
}

/// What the completeness rules read of a case member.
#[derive(Debug, Clone)]
pub struct CaseMember {
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub modality: String,
    pub laterality: String,
    pub view: String,
    pub series_description: String,
    pub image_type: String,
    pub path: String,
    /// An ultrasound image that is Doppler / colour flow.
    pub us_doppler: bool,
}

/// Read by hand for `us_doppler`: the query turns the boolean into 0/1,
/// because the `Any` driver cannot map SQLite's BOOLEAN column type.
impl<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> for CaseMember {
    fn from_row(r: &'r sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        Ok(CaseMember {
            sop_instance_uid: r.try_get("sop_instance_uid")?,
            sop_class_uid: r.try_get("sop_class_uid")?,
            study_instance_uid: r.try_get("study_instance_uid")?,
            series_instance_uid: r.try_get("series_instance_uid")?,
            modality: r.try_get("modality")?,
            laterality: r.try_get("laterality")?,
            view: r.try_get("view")?,
            series_description: r.try_get("series_description")?,
            image_type: r.try_get("image_type")?,
            path: r.try_get("path")?,
            us_doppler: r.try_get::<i64, _>("us_doppler")? != 0,
        })
    }
}

/// A `case_transitions` row, as read back.
#[derive(sqlx::FromRow)]
struct TransitionRow {
    time: String,
    #[sqlx(try_from = "String")]
    from_state: CaseState,
    #[sqlx(try_from = "String")]
    to_state: CaseState,
    reason: String,
}

const CASE_COLUMNS: &str = "id, patient_key, state, revision, reason, opened_at, \
     first_instance_at, last_instance_at, oldest_study_date, newest_study_date, inputs_digest, \
     updated_at";

impl Db {
    /// Stored instances that belong to no case yet, oldest first.
    pub async fn unassigned_instances(
        &self,
        limit: i64,
    ) -> Result<Vec<UnassignedInstance>, DbError> {
        Ok(sqlx::query_as(
            "SELECT i.sop_instance_uid, i.patient_key, i.patient_id_key, i.study_date \
             FROM instances i LEFT JOIN case_instances c ON c.sop_instance_uid = i.sop_instance_uid \
             WHERE c.case_id IS NULL ORDER BY i.received_at LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn cases_of_patient(&self, patient_key: &str) -> Result<Vec<CaseRow>, DbError> {
        let rows = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {CASE_COLUMNS} FROM cases WHERE patient_key = $1 ORDER BY opened_at DESC"
        )))
        .bind(patient_key)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    pub async fn cases_in_states(&self, states: &[CaseState]) -> Result<Vec<CaseRow>, DbError> {
        let mut all = Vec::new();
        for state in states {
            let rows = sqlx::query_as(AssertSqlSafe(format!(
                "SELECT {CASE_COLUMNS} FROM cases WHERE state = $1 ORDER BY opened_at"
            )))
            .bind(state.as_str())
            .fetch_all(&self.pool)
            .await?;
            all.extend(rows);
        }
        Ok(all)
    }

    pub async fn all_cases(&self) -> Result<Vec<CaseRow>, DbError> {
        let rows = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {CASE_COLUMNS} FROM cases ORDER BY opened_at"
        )))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// One page of cases, newest first, optionally in one state.
    pub async fn cases_page(
        &self,
        f: &CaseFilter,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<CaseRow>, DbError> {
        let rows = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {CASE_COLUMNS} FROM cases WHERE ($1 IS NULL OR state = $1) \
             AND ($2 IS NULL OR opened_at >= $2) AND ($3 IS NULL OR opened_at < $3) \
             ORDER BY opened_at DESC, id LIMIT $4 OFFSET $5"
        )))
        .bind(f.state.map(|s| s.as_str()))
        .bind(f.opened_since.as_deref())
        .bind(f.opened_until.as_deref())
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// How many cases are in each state (states with none are absent).
    pub async fn case_state_counts(&self) -> Result<Vec<(CaseState, i64)>, DbError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, COUNT(*) FROM cases GROUP BY state ORDER BY state")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(s, n)| s.parse().ok().map(|s| (s, n)))
            .collect())
    }

    pub async fn case(&self, id: &str) -> Result<Option<CaseRow>, DbError> {
        let row = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {CASE_COLUMNS} FROM cases WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    /// Record a round of case assignment in one transaction (one commit,
    /// not one per instance: the assembler assigns a burst of instances at
    /// once while ingest competes for the same write lock).
    pub async fn assign_instances(
        &self,
        steps: &[Assignment],
        now: OffsetDateTime,
    ) -> Result<(), DbError> {
        self.assign_instances_as(steps, None, now).await.map(|_| ())
    }

    /// As [`Db::assign_instances`], committed only while this node holds
    /// `role` (checked in the same transaction): whether it was recorded.
    pub async fn assign_instances_as(
        &self,
        steps: &[Assignment],
        role: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<bool, DbError> {
        if steps.is_empty() {
            return Ok(true);
        }
        let now = &format_time(now);
        let mut tx = self.pool.begin().await?;
        if let Some(role) = role
            && !self.still_holds(&mut tx, role, now).await?
        {
            return Ok(false);
        }
        for step in steps {
            match step {
                Assignment::Open {
                    case_id,
                    patient_key,
                    sop_instance_uid,
                    study_date,
                } => {
                    open_case(
                        &mut tx,
                        &self.node,
                        case_id,
                        patient_key,
                        sop_instance_uid,
                        study_date,
                        now,
                    )
                    .await?
                }
                Assignment::Add {
                    case_id,
                    from_state,
                    sop_instance_uid,
                    oldest,
                    newest,
                    reopen,
                } => {
                    add_to_case(
                        &mut tx,
                        (&self.node, now),
                        case_id,
                        *from_state,
                        sop_instance_uid,
                        (oldest, newest),
                        *reopen,
                    )
                    .await?
                }
            }
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Move a case from `from` to `to` if it is still in `from`; returns
    /// whether it moved. The transition and an audit event are recorded.
    pub async fn transition_case(
        &self,
        id: &str,
        from: CaseState,
        to: CaseState,
        reason: &str,
        now: OffsetDateTime,
    ) -> Result<bool, DbError> {
        let now = &format_time(now);
        let mut tx = self.pool.begin().await?;
        let moved = sqlx::query(
            "UPDATE cases SET state = $1, reason = $2, updated_at = $3 WHERE id = $4 AND state = $5",
        )
        .bind(to.as_str())
        .bind(reason)
        .bind(now)
        .bind(id)
        .bind(from.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if moved == 0 {
            return Ok(false);
        }
        insert_transition(&mut tx, &self.node, id, from, to, reason, now).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Reopen a case as a new revision (instances arrived while it ran).
    pub async fn reopen_case(
        &self,
        id: &str,
        from: CaseState,
        reason: &str,
        now: OffsetDateTime,
    ) -> Result<bool, DbError> {
        let now = &format_time(now);
        let mut tx = self.pool.begin().await?;
        let moved = sqlx::query(
            "UPDATE cases SET state = $1, revision = revision + 1, reason = $2, \
             first_instance_at = $3, updated_at = $4 WHERE id = $5 AND state = $6",
        )
        .bind(CaseState::Collecting.as_str())
        .bind(reason)
        .bind(now)
        .bind(now)
        .bind(id)
        .bind(from.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if moved == 0 {
            return Ok(false);
        }
        insert_transition(
            &mut tx,
            &self.node,
            id,
            from,
            CaseState::Collecting,
            reason,
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Record the inputs a run used (the amendment check compares them).
    pub async fn set_case_inputs(&self, id: &str, digest: &str) -> Result<(), DbError> {
        sqlx::query("UPDATE cases SET inputs_digest = $1 WHERE id = $2")
            .bind(digest)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn case_members(&self, id: &str) -> Result<Vec<CaseMember>, DbError> {
        Ok(sqlx::query_as(
            "SELECT i.sop_instance_uid, i.sop_class_uid, i.study_instance_uid, \
             i.series_instance_uid, i.modality, i.laterality, i.view, i.series_description, \
             i.image_type, i.path, CASE WHEN i.us_doppler THEN 1 ELSE 0 END AS us_doppler \
             FROM case_instances c \
             JOIN instances i ON i.sop_instance_uid = c.sop_instance_uid \
             WHERE c.case_id = $1 ORDER BY i.received_at",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// A case's transitions, oldest first: (time, from, to, reason).
    pub async fn case_transitions(
        &self,
        id: &str,
    ) -> Result<Vec<(String, CaseState, CaseState, String)>, DbError> {
        let rows: Vec<TransitionRow> = sqlx::query_as(
            "SELECT time, from_state, to_state, reason FROM case_transitions \
             WHERE case_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|t| (t.time, t.from_state, t.to_state, t.reason))
            .collect())
    }
}

/// Open a new case holding its first instance.
async fn open_case(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    node: &str,
    id: &str,
    patient_key: &str,
    sop_instance_uid: &str,
    study_date: &str,
    now: &str,
) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO cases (id, patient_key, state, revision, reason, opened_at, \
         first_instance_at, last_instance_at, oldest_study_date, newest_study_date, updated_at) \
         VALUES ($1, $2, $3, 0, 'first instance', $4, $5, $6, $7, $8, $9)",
    )
    .bind(id)
    .bind(patient_key)
    .bind(CaseState::Collecting.as_str())
    .bind(now)
    .bind(now)
    .bind(now)
    .bind(study_date)
    .bind(study_date)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO case_instances (case_id, sop_instance_uid, added_at) VALUES ($1, $2, $3)",
    )
    .bind(id)
    .bind(sop_instance_uid)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    let e = NewEvent {
        event: case_event::CASE_OPENED,
        sop_instance_uid: Some(sop_instance_uid),
        patient_key: Some(patient_key),
        case_id: Some(id),
        ..Default::default()
    };
    insert_event(tx, node, &e, now).await
}

/// Add an instance to an existing case, widening its study-date range;
/// `reopen` moves a finished case back to collecting as a new revision.
/// Recorded as written by `node` at `now`.
async fn add_to_case(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    (node, now): (&str, &str),
    case_id: &str,
    from_state: CaseState,
    sop_instance_uid: &str,
    (oldest, newest): (&str, &str),
    reopen: Option<&str>,
) -> Result<(), DbError> {
    let added = sqlx::query(
        "INSERT INTO case_instances (case_id, sop_instance_uid, added_at) VALUES ($1, $2, $3) \
         ON CONFLICT (case_id, sop_instance_uid) DO NOTHING",
    )
    .bind(case_id)
    .bind(sop_instance_uid)
    .bind(now)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if added == 0 {
        return Ok(());
    }
    sqlx::query(
        "UPDATE cases SET last_instance_at = $1, oldest_study_date = $2, \
         newest_study_date = $3, updated_at = $4 WHERE id = $5",
    )
    .bind(now)
    .bind(oldest)
    .bind(newest)
    .bind(now)
    .bind(case_id)
    .execute(&mut **tx)
    .await?;
    if let Some(reason) = reopen {
        sqlx::query(
            "UPDATE cases SET state = $1, revision = revision + 1, reason = $2, \
             first_instance_at = $3 WHERE id = $4",
        )
        .bind(CaseState::Collecting.as_str())
        .bind(reason)
        .bind(now)
        .bind(case_id)
        .execute(&mut **tx)
        .await?;
        insert_transition(
            tx,
            node,
            case_id,
            from_state,
            CaseState::Collecting,
            reason,
            now,
        )
        .await?;
    }
    Ok(())
}

pub(super) async fn insert_transition(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    node: &str,
    id: &str,
    from: CaseState,
    to: CaseState,
    reason: &str,
    now: &str,
) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO case_transitions (case_id, time, from_state, to_state, reason) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(now)
    .bind(from.as_str())
    .bind(to.as_str())
    .bind(reason)
    .execute(&mut **tx)
    .await?;
    let e = NewEvent {
        event: case_event::CASE_STATE_CHANGED,
        case_id: Some(id),
        detail: Some(
            serde_json::json!({ "from": from.as_str(), "to": to.as_str(), "reason": reason }),
        ),
        ..Default::default()
    };
    insert_event(tx, node, &e, now).await?;
    Ok(())
}
