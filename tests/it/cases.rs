//! Case assembly against a real SQLite database with a manual clock:
//! grouping, stable age, max wait, late arrivals, restarts, the run loop.
//! On PostgreSQL too, with `HER2MAP_TEST_PG_URL` set (see common).

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use her2map::cases::{
    Assembler, CaseJob, CaseRules, CaseState, Clock, Modality, Partial, PatientKeyMode,
};
use her2map::db::{Db, InstanceRow, InstanceWriter};
use her2map::side::SideSetting;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

fn rules() -> CaseRules {
    CaseRules {
        required: vec![Modality::MR, Modality::US, Modality::MG],
        stable_age: Duration::from_secs(60),
        max_wait: Duration::from_secs(3600),
        partial: Partial::Run,
        mri_series_required: 3,
        lesion_side: SideSetting::Unknown,
    }
}

/// The storage SOP class of an image of `modality` (the kind of an instance
/// is its SOP class first: `header::classify`).
fn sop_class_of(modality: &str) -> &'static str {
    match modality {
        "MG" => "1.2.840.10008.5.1.4.1.1.1.2",
        "US" => "1.2.840.10008.5.1.4.1.1.6.1",
        _ => "1.2.840.10008.5.1.4.1.1.4",
    }
}

struct Patient {
    key: &'static str,
    n: usize,
}

impl Patient {
    fn row(
        &mut self,
        modality: &str,
        series: &str,
        lat: &str,
        view: &str,
        date: &str,
    ) -> InstanceRow {
        self.n += 1;
        InstanceRow {
            sop_instance_uid: format!(
                "1.2.{}.{}.{}",
                self.key.len(),
                self.key.bytes().map(u32::from).sum::<u32>(),
                self.n
            ),
            sop_class_uid: sop_class_of(modality).into(),
            study_instance_uid: format!("1.3.{date}"),
            series_instance_uid: format!("1.4.{series}"),
            patient_key: self.key.into(),
            modality: modality.into(),
            study_date: date.into(),
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            size_bytes: 1,
            path: "x".into(),
            association_id: "a".into(),
            calling_ae: "T".into(),
            patient_id_key: self.key.into(),
            laterality: lat.into(),
            view: view.into(),
            series_description: String::new(),
            image_type: "ORIGINAL\\PRIMARY".into(),
            us_doppler: false,
        }
    }
    /// MG (L CC, L MLO), US (L), MR (3 series) rows, in that order.
    fn full(&mut self, date: &str) -> Vec<InstanceRow> {
        vec![
            self.row("MG", "mg", "L", "CC", date),
            self.row("MG", "mg", "L", "MLO", date),
            self.row("US", "us", "L", "", date),
            self.row("MR", "p0", "", "", date),
            self.row("MR", "p1", "", "", date),
            self.row("MR", "p2", "", "", date),
        ]
    }
}

async fn db() -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::connect(&common::test_database_url(dir.path(), "t.db"))
        .await
        .unwrap();
    (dir, db)
}

async fn insert(db: &Db, rows: &[InstanceRow]) {
    let writer = InstanceWriter::start(db, Clock::new());
    for r in rows {
        writer.insert(r).await.unwrap();
    }
    writer.shutdown().await;
}

fn assembler(db: &Db, rules: CaseRules, clock: &Clock) -> Assembler {
    Assembler::new(
        db.clone(),
        rules,
        PatientKeyMode::IdIssuer,
        60,
        clock.clone(),
    )
}

fn clock() -> Clock {
    Clock::manual(time::OffsetDateTime::now_utc())
}

async fn states(db: &Db) -> Vec<CaseState> {
    db.all_cases()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.state)
        .collect()
}

#[tokio::test]
async fn a_complete_case_runs_after_stable_age_exactly_once() {
    let (_dir, db) = db().await;
    let clock = clock();
    let a = assembler(&db, rules(), &clock);
    let (tx, mut rx) = mpsc::channel(4);
    let stop = CancellationToken::new();
    let mut p = Patient { key: "alice", n: 0 };
    let rows = p.full("20260101");
    // Arrive one by one, 10 s apart: never ready before the last + 60 s.
    for r in &rows {
        insert(&db, std::slice::from_ref(r)).await;
        a.round(&tx, &stop).await.unwrap();
        assert_eq!(states(&db).await, vec![CaseState::Collecting]);
        clock.advance(Duration::from_secs(10));
    }
    clock.advance(Duration::from_secs(49));
    let next = a.round(&tx, &stop).await.unwrap().expect("a deadline");
    assert_eq!(states(&db).await, vec![CaseState::Collecting]);
    assert!(next > clock.now());
    clock.advance(Duration::from_secs(1));
    a.round(&tx, &stop).await.unwrap();
    assert_eq!(states(&db).await, vec![CaseState::Queued]);
    let job = rx.try_recv().unwrap();
    assert_eq!(job.revision, 0);
    // More rounds: nothing more.
    clock.advance(Duration::from_secs(600));
    a.round(&tx, &stop).await.unwrap();
    assert!(rx.try_recv().is_err());
    assert_eq!(db.case_members(&job.case_id).await.unwrap().len(), 6);
    let reasons: Vec<String> = db
        .case_transitions(&job.case_id)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.3)
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("no new instance for 60 s")),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn two_patients_interleaved_make_two_cases() {
    let (_dir, db) = db().await;
    let clock = clock();
    let a = assembler(&db, rules(), &clock);
    let (tx, mut rx) = mpsc::channel(4);
    let stop = CancellationToken::new();
    let (mut p, mut q) = (
        Patient { key: "alice", n: 0 },
        Patient { key: "bob", n: 100 },
    );
    let (rp, rq) = (p.full("20260101"), q.full("20260102"));
    for (x, y) in rp.iter().zip(&rq) {
        insert(&db, &[x.clone(), y.clone()]).await;
        a.round(&tx, &stop).await.unwrap();
    }
    // Both complete: two cases, each run once.
    clock.advance(Duration::from_secs(60));
    a.round(&tx, &stop).await.unwrap();
    let jobs: Vec<CaseJob> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
    assert_eq!(jobs.len(), 2);
    let cases = db.all_cases().await.unwrap();
    let mut keys: Vec<&str> = cases.iter().map(|c| c.patient_key.as_str()).collect();
    keys.sort();
    assert_eq!(keys, vec!["alice", "bob"]);
}

#[tokio::test]
async fn study_date_window_boundaries() {
    let (_dir, db) = db().await;
    let clock = clock();
    let a = assembler(&db, rules(), &clock);
    let mut p = Patient { key: "carol", n: 0 };
    insert(&db, &[p.row("MG", "a", "L", "CC", "20260101")]).await;
    insert(&db, &[p.row("US", "b", "L", "", "20260302")]).await; // 60 days later: same case
    a.assign().await.unwrap();
    assert_eq!(db.all_cases().await.unwrap().len(), 1);
    insert(&db, &[p.row("MR", "c", "", "", "20260303")]).await; // 61 days after the oldest
    a.assign().await.unwrap();
    let cases = db.all_cases().await.unwrap();
    assert_eq!(cases.len(), 2);
    assert_eq!(cases[0].oldest_study_date, "20260101");
    assert_eq!(cases[0].newest_study_date, "20260302");
}

#[tokio::test]
async fn late_arrival_reopens_and_a_resend_changes_nothing() {
    let (_dir, db) = db().await;
    let clock = clock();
    let a = assembler(&db, rules(), &clock);
    let (tx, mut rx) = mpsc::channel(4);
    let stop = CancellationToken::new();
    let mut p = Patient { key: "dora", n: 0 };
    let rows = p.full("20260101");
    insert(&db, &rows).await;
    a.round(&tx, &stop).await.unwrap();
    clock.advance(Duration::from_secs(60));
    a.round(&tx, &stop).await.unwrap();
    let job = rx.try_recv().unwrap();
    db.transition_case(
        &job.case_id,
        CaseState::Queued,
        CaseState::Done,
        "result sent",
        clock.now(),
    )
    .await
    .unwrap();

    // A resend of a known instance is a duplicate: no new row, no change.
    assert_eq!(
        InstanceWriter::start(&db, Clock::new())
            .insert(&rows[0])
            .await
            .unwrap(),
        her2map::db::Inserted::Duplicate {
            existing_path: "x".into()
        }
    );
    assert_eq!(a.assign().await.unwrap(), 0);
    assert_eq!(states(&db).await, vec![CaseState::Done]);

    // A late MRI phase reopens the case as revision 1 and it runs again.
    insert(&db, &[p.row("MR", "p3", "", "", "20260101")]).await;
    a.round(&tx, &stop).await.unwrap();
    let case = db.case(&job.case_id).await.unwrap().unwrap();
    assert_eq!((case.state, case.revision), (CaseState::Collecting, 1));
    clock.advance(Duration::from_secs(60));
    a.round(&tx, &stop).await.unwrap();
    assert_eq!(
        rx.try_recv().unwrap(),
        CaseJob {
            case_id: job.case_id.clone(),
            revision: 1
        }
    );
}

#[tokio::test]
async fn max_wait_runs_with_what_is_there_or_holds() {
    for partial in [Partial::Run, Partial::Hold] {
        let (_dir, db) = db().await;
        let mut r = rules();
        r.partial = partial;
        let clock = clock();
        let a = assembler(&db, r, &clock);
        let (tx, mut rx) = mpsc::channel(4);
        let stop = CancellationToken::new();
        let mut p = Patient { key: "erin", n: 0 };
        let mut rows = p.full("20260101");
        rows.retain(|r| r.modality != "MR");
        insert(&db, &rows).await;
        a.round(&tx, &stop).await.unwrap();
        clock.advance(Duration::from_secs(3599));
        a.round(&tx, &stop).await.unwrap();
        assert_eq!(states(&db).await, vec![CaseState::Collecting]);
        let views = her2map::ops::describe_cases(&db, a.rules()).await.unwrap();
        assert!(
            views[0].missing[0].starts_with("MR"),
            "{:?}",
            views[0].missing
        );
        clock.advance(Duration::from_secs(1));
        a.round(&tx, &stop).await.unwrap();
        let case = &db.all_cases().await.unwrap()[0];
        match partial {
            Partial::Run => {
                assert_eq!(case.state, CaseState::Queued);
                assert!(rx.try_recv().is_ok());
                let reasons = db.case_transitions(&case.id).await.unwrap();
                assert!(
                    reasons.iter().any(|t| t.3.contains("missing MR")),
                    "{reasons:?}"
                );
            }
            Partial::Hold => {
                assert_eq!(case.state, CaseState::Held);
                assert!(rx.try_recv().is_err());
                // The operator releases... and forces it.
                let action = her2map::ops::CaseAction::Run;
                her2map::ops::case_action(&db, &case.id, action, clock.now())
                    .await
                    .unwrap();
                a.round(&tx, &stop).await.unwrap();
                assert!(rx.try_recv().is_ok());
            }
        }
    }
}

#[tokio::test]
async fn a_restart_rebuilds_timers_and_requeues_unfinished_cases() {
    let (_dir, db) = db().await;
    let (tx, mut rx) = mpsc::channel(4);
    let stop = CancellationToken::new();
    let mut p = Patient { key: "fay", n: 0 };
    insert(&db, &p.full("20260101")).await;
    let clock = clock();
    {
        let a = assembler(&db, rules(), &clock);
        a.round(&tx, &stop).await.unwrap();
    } // the node stops while the case waits for its stable age
    clock.advance(Duration::from_secs(60));
    let a = assembler(&db, rules(), &clock);
    a.recover().await.unwrap();
    a.round(&tx, &stop).await.unwrap();
    let job = rx.try_recv().unwrap();
    db.transition_case(
        &job.case_id,
        CaseState::Queued,
        CaseState::Running,
        "engine took it",
        clock.now(),
    )
    .await
    .unwrap();
    // Killed while running: after restart it is queued again, once.
    let a = assembler(&db, rules(), &clock);
    assert_eq!(a.recover().await.unwrap(), 1);
    a.round(&tx, &stop).await.unwrap();
    a.round(&tx, &stop).await.unwrap();
    assert_eq!(rx.try_recv().unwrap().case_id, job.case_id);
    assert!(rx.try_recv().is_err());
}

/// The run loop itself: woken by ingest's notification, it keeps the case
/// until its stable-age deadline passes, then dispatches it once.
#[tokio::test]
async fn the_run_loop_dispatches_once_after_the_deadline() {
    let (_dir, db) = db().await;
    let (tx, mut rx) = mpsc::channel(4);
    let stop = CancellationToken::new();
    let wake = Arc::new(Notify::new());
    let clock = clock();
    let task = tokio::spawn(assembler(&db, rules(), &clock).run(wake.clone(), tx, stop.clone()));
    let mut p = Patient { key: "gus", n: 0 };
    insert(&db, &p.full("20260101")).await;
    wake.notify_waiters();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), rx.recv())
            .await
            .is_err(),
        "ran before its stable age"
    );
    clock.advance(Duration::from_secs(60));
    wake.notify_waiters();
    let job = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("dispatched after the deadline")
        .unwrap();
    assert_eq!(job.revision, 0);
    clock.advance(Duration::from_secs(600));
    assert!(
        tokio::time::timeout(Duration::from_secs(3), rx.recv())
            .await
            .is_err(),
        "dispatched twice"
    );
    stop.cancel();
    task.await.unwrap();
}

/// Rows of many associations at once go through the group commit: every
/// distinct instance is indexed once with its event, and of two copies of
/// one SOP Instance UID racing each other, whichever committed first is
/// kept and the other is told its path, even when both share a transaction.
#[tokio::test]
async fn concurrent_inserts_each_get_their_own_answer() {
    let (_dir, db) = db().await;
    let mut p = Patient { key: "RACE", n: 0 };
    let mut rows: Vec<InstanceRow> = (0..150)
        .map(|i| {
            let mut r = p.row("MR", "race", "", "", "20260101");
            r.path = format!("first-{i}");
            r
        })
        .collect();
    for i in 0..50 {
        let mut copy = rows[i * 3].clone();
        copy.path = format!("second-{i}");
        rows.push(copy);
    }
    let writer = InstanceWriter::start(&db, Clock::new());
    let mut tasks = tokio::task::JoinSet::new();
    for r in rows.clone() {
        let queue = writer.queue();
        tasks.spawn(async move { (r.clone(), queue.insert(&r).await.unwrap()) });
    }
    let mut kept = std::collections::HashMap::new();
    let mut duplicates = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (row, inserted) = done.unwrap();
        match inserted {
            her2map::db::Inserted::New => {
                assert!(kept.insert(row.sop_instance_uid, row.path).is_none());
            }
            her2map::db::Inserted::Duplicate { existing_path } => {
                duplicates.push((row.sop_instance_uid, row.path, existing_path))
            }
        }
    }
    assert_eq!((kept.len(), duplicates.len()), (150, 50));
    for (uid, path, existing) in duplicates {
        assert_ne!(path, existing, "{uid}: told its own path");
        assert_eq!(kept[&uid], existing, "{uid}: not the kept copy's path");
        assert_eq!(db.instance_path(&uid).await.unwrap(), Some(existing));
    }
    assert_eq!(db.instance_count().await.unwrap(), 150);
    let stored = db.events(0, Some("instance_stored"), 1000).await.unwrap();
    assert_eq!(stored.len(), 150);
}
