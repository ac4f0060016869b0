//! Several nodes on one database, at the database level: the assembler
//! role, case runs and deliveries claimed by exactly one node with leases,
//! takeover once a lease expires, audit events by node, and the SQLite
//! single-node lock. On SQLite by default and on PostgreSQL with
//! `HER2MAP_TEST_PG_URL` set (see common).

use crate::common;

use std::time::Duration;

use her2map::cases::{Assembler, CaseRules, CaseState, Clock, Modality, Partial, PatientKeyMode};
use her2map::db::{Backend, Db, InstanceRow, InstanceWriter, OutputRow};
use her2map::report::OutputKind;
use her2map::side::SideSetting;
use tokio::sync::mpsc;
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

/// A complete patient (MG L CC + MLO, US L, MR 3 series), UIDs under `root`.
fn patient(key: &str, root: u32) -> Vec<InstanceRow> {
    let spec = [
        ("MG", "1.2.840.10008.5.1.4.1.1.1.2", "mg", "L", "CC"),
        ("MG", "1.2.840.10008.5.1.4.1.1.1.2", "mg", "L", "MLO"),
        ("US", "1.2.840.10008.5.1.4.1.1.6.1", "us", "L", ""),
        ("MR", "1.2.840.10008.5.1.4.1.1.4", "p0", "", ""),
        ("MR", "1.2.840.10008.5.1.4.1.1.4", "p1", "", ""),
        ("MR", "1.2.840.10008.5.1.4.1.1.4", "p2", "", ""),
    ];
    spec.iter()
        .enumerate()
        .map(|(i, (modality, class, series, lat, view))| InstanceRow {
            sop_instance_uid: format!("1.2.{root}.{i}"),
            sop_class_uid: (*class).into(),
            study_instance_uid: format!("1.3.{root}"),
            series_instance_uid: format!("1.4.{root}.{series}"),
            patient_key: key.into(),
            modality: (*modality).into(),
            study_date: "20260101".into(),
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            size_bytes: 1,
            path: "x".into(),
            association_id: "a".into(),
            calling_ae: "T".into(),
            patient_id_key: key.into(),
            laterality: (*lat).into(),
            view: (*view).into(),
            series_description: String::new(),
            image_type: "ORIGINAL\\PRIMARY".into(),
            us_doppler: false,
        })
        .collect()
}

/// Two nodes, `a` and `b`, on one fresh database.
async fn two_nodes(dir: &std::path::Path) -> (Db, Db) {
    let url = common::test_database_url(dir, "shared.db");
    let a = Db::connect(&url).await.unwrap().with_node("node-a");
    let b = Db::connect(&url).await.unwrap().with_node("node-b");
    (a, b)
}

async fn insert(db: &Db, rows: &[InstanceRow]) {
    let writer = InstanceWriter::start(db, Clock::new());
    for r in rows {
        writer.insert(r).await.unwrap();
    }
    writer.shutdown().await;
}

fn assembler(db: &Db, clock: &Clock) -> Assembler {
    Assembler::new(
        db.clone(),
        rules(),
        PatientKeyMode::IdIssuer,
        60,
        clock.clone(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_case_runs_on_one_node_and_another_takes_it_over_after_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_nodes(dir.path()).await;
    let clock = Clock::manual(time::OffsetDateTime::now_utc());
    let (asm_a, asm_b) = (assembler(&a, &clock), assembler(&b, &clock));
    let stop = CancellationToken::new();
    let (tx_a, mut rx_a) = mpsc::channel(4);
    let (tx_b, mut rx_b) = mpsc::channel(4);
    // Half the patient arrives through node a, half through node b.
    let rows = patient("alice", 7);
    insert(&a, &rows[..3]).await;
    insert(&b, &rows[3..]).await;
    // Both nodes run rounds at once: one holds the assembler role.
    let (ra, rb) = tokio::join!(asm_a.round(&tx_a, &stop), asm_b.round(&tx_b, &stop));
    ra.unwrap();
    rb.unwrap();
    let cases = a.all_cases().await.unwrap();
    assert_eq!(cases.len(), 1, "one case for the patient: {cases:?}");
    assert_eq!(a.case_members(&cases[0].id).await.unwrap().len(), 6);
    // Past the stable age both look again: exactly one claims the run.
    clock.advance(Duration::from_secs(61));
    let (ra, rb) = tokio::join!(asm_a.round(&tx_a, &stop), asm_b.round(&tx_b, &stop));
    ra.unwrap();
    rb.unwrap();
    let jobs: Vec<_> = std::iter::from_fn(|| rx_a.try_recv().ok())
        .map(|j| ("node-a", j))
        .chain(std::iter::from_fn(|| rx_b.try_recv().ok()).map(|j| ("node-b", j)))
        .collect();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let (owner, job) = &jobs[0];
    let (survivor, survivor_asm, survivor_rx) = if *owner == "node-a" {
        (&b, &asm_b, &mut rx_b)
    } else {
        (&a, &asm_a, &mut rx_a)
    };
    let tx_survivor = if *owner == "node-a" { &tx_b } else { &tx_a };
    // The owner dies (no more heartbeats). Within the lease: nothing moves.
    clock.advance(Duration::from_secs(20));
    survivor_asm.round(tx_survivor, &stop).await.unwrap();
    assert!(survivor_rx.try_recv().is_err());
    assert_eq!(
        survivor.case(&job.case_id).await.unwrap().unwrap().state,
        CaseState::Queued
    );
    // Past the lease: the survivor takes the case over and runs it.
    clock.advance(Duration::from_secs(15));
    survivor_asm.round(tx_survivor, &stop).await.unwrap();
    let taken = survivor_rx.try_recv().expect("taken over");
    assert_eq!(taken.case_id, job.case_id);
    assert_eq!(taken.revision, job.revision);
    let reasons: Vec<String> = survivor
        .case_transitions(&job.case_id)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.3)
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r == &format!("lease of node {owner} expired: queued again")),
        "{reasons:?}"
    );
    // Every event names the node that wrote it.
    let by_survivor = survivor
        .events_filtered(&her2map::db::EventFilter {
            event: Some("case_state_changed".into()),
            node: Some(survivor.node().to_string()),
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!by_survivor.is_empty());
    assert!(
        by_survivor
            .iter()
            .all(|e| e.node.as_deref() == Some(survivor.node()))
    );
    let all = a.events(0, None, 10_000).await.unwrap();
    assert!(all.iter().all(|e| e.node.is_some()));
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_assembly_on_two_nodes_makes_one_case_per_patient() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_nodes(dir.path()).await;
    let clock = Clock::manual(time::OffsetDateTime::now_utc());
    let (asm_a, asm_b) = (assembler(&a, &clock), assembler(&b, &clock));
    for round in 0..6u32 {
        // Each patient's instances arrive on both nodes, interleaved.
        for p in 0..4u32 {
            let rows = patient(&format!("p{p}"), 100 + p);
            let r = round as usize;
            insert(if (p + round) % 2 == 0 { &a } else { &b }, &rows[r..=r]).await;
        }
        let (ra, rb) = tokio::join!(asm_a.assign(), asm_b.assign());
        ra.unwrap();
        rb.unwrap();
        // The role passes when its holder stops renewing it.
        clock.advance(Duration::from_secs(if round % 2 == 0 { 11 } else { 1 }));
    }
    let cases = a.all_cases().await.unwrap();
    assert_eq!(cases.len(), 4, "{cases:?}");
    for c in &cases {
        assert_eq!(a.case_members(&c.id).await.unwrap().len(), 6);
    }
    assert!(a.unassigned_instances(10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_is_claimed_by_one_node_until_its_lease_expires() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_nodes(dir.path()).await;
    let now = time::OffsetDateTime::now_utc();
    let out = OutputRow {
        sop_instance_uid: "1.2.3.4.5".into(),
        case_id: "c".into(),
        revision: 0,
        kind: OutputKind::HeatmapSc,
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.7".into(),
        study_instance_uid: "1.2.3".into(),
        series_instance_uid: "1.2.3.4".into(),
        path: "outputs/x.dcm".into(),
    };
    a.add_output(&out, &["PACS".into(), "ARCHIVE".into()], now)
        .await
        .unwrap();
    let lease = Duration::from_secs(300);
    let (ca, cb) = tokio::join!(
        a.claim_due_deliveries(now + lease, now, 100),
        b.claim_due_deliveries(now + lease, now, 100)
    );
    let (ca, cb) = (ca.unwrap(), cb.unwrap());
    assert_eq!(
        ca.len() + cb.len(),
        2,
        "each row claimed once: {ca:?} {cb:?}"
    );
    let (winner, loser) = if ca.is_empty() { (&b, &a) } else { (&a, &b) };
    let later = now + Duration::from_secs(299);
    assert!(
        loser
            .claim_due_deliveries(later + lease, later, 100)
            .await
            .unwrap()
            .is_empty()
    );
    // The winner records one of them; the other it never finishes (dies).
    let mine = winner
        .claim_due_deliveries(later + lease, later, 100)
        .await
        .unwrap();
    assert_eq!(mine.len(), 2, "a live node keeps its own claims");
    winner
        .record_delivery(
            &mine[0],
            her2map::db::DeliveryState::Sent,
            "0x0000",
            later,
            later,
        )
        .await
        .unwrap();
    let expired = later + Duration::from_secs(301);
    let taken = loser
        .claim_due_deliveries(expired + lease, expired, 100)
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].id, mine[1].id);
}

#[tokio::test]
async fn a_second_node_on_one_sqlite_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("one.db").display());
    let first = Db::connect(&url).await.unwrap();
    assert_eq!(first.backend(), Backend::Sqlite);
    let _held = first.lock_single_node().unwrap().expect("a lock file");
    let second = Db::connect(&url).await.unwrap();
    let err = second.lock_single_node().unwrap_err().to_string();
    assert!(err.contains("another her2map node"), "{err}");
    assert!(err.contains("postgres://"), "{err}");
    drop(_held);
    assert!(second.lock_single_node().unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backlog_spreads_over_the_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_nodes(dir.path()).await;
    let clock = Clock::manual(time::OffsetDateTime::now_utc());
    let asm_a = assembler(&a, &clock).with_claim_ahead(1);
    let asm_b = assembler(&b, &clock).with_claim_ahead(1);
    let stop = CancellationToken::new();
    let (tx_a, mut rx_a) = mpsc::channel(16);
    let (tx_b, mut rx_b) = mpsc::channel(16);
    for p in 0..4u32 {
        insert(&a, &patient(&format!("p{p}"), 200 + p)).await;
    }
    asm_a.round(&tx_a, &stop).await.unwrap();
    clock.advance(Duration::from_secs(61));
    // Four ready cases: each node claims one ahead, not the whole backlog.
    asm_a.round(&tx_a, &stop).await.unwrap();
    asm_b.round(&tx_b, &stop).await.unwrap();
    assert_eq!(tx_a.max_capacity() - tx_a.capacity(), 1);
    assert_eq!(tx_b.max_capacity() - tx_b.capacity(), 1);
    // Once a node takes its job off the queue, it claims the next.
    rx_a.try_recv().unwrap();
    asm_a.round(&tx_a, &stop).await.unwrap();
    rx_a.try_recv().unwrap();
    rx_b.try_recv().unwrap();
    let ready = a.cases_in_states(&[CaseState::Ready]).await.unwrap();
    assert_eq!(ready.len(), 1);
}
