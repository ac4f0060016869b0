//! The whole node: the synthetic patient in, SR + heatmaps out at a
//! destination, with restarts between the pieces.

use crate::common;

use dicom_dictionary_std::tags;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use her2map::db::{CaseState, DeliveryState};
use her2map::dimse::client::ClientOptions;
use her2map::report::OutputKind;
use her2map::send::{collect_files, send_files};

fn scu() -> ClientOptions {
    ClientOptions {
        calling_ae: "PACS".into(),
        called_ae: "HER2MAP".into(),
        ..Default::default()
    }
}

fn study(name: &str) -> Vec<PathBuf> {
    collect_files(&[test_data(&format!("synth-patient/{name}"))])
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect()
}

async fn wait_until<F, Fut>(what: &str, secs: u64, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// C-STORE the patient in three pieces over separate associations,
/// restarting the node between them: exactly one case becomes ready, once,
/// and its SR and heatmaps reach the destination in the patient's studies.
#[tokio::test(flavor = "multi_thread")]
async fn one_patient_in_pieces_across_restarts_gives_one_result() {
    let dest_dir = tempfile::tempdir().unwrap();
    let destination = spawn_app(dest_dir.path()).await;
    let data = tempfile::tempdir().unwrap();
    let settings = || {
        let mut s = test_settings(data.path());
        s.cases.stable_age_secs = 2;
        s.destinations = vec![dimse_destination("HER2MAP", destination.port())];
        s
    };
    for (i, piece) in ["MG", "US", "MR"].iter().enumerate() {
        let node = spawn_app_with(settings()).await;
        let files = study(piece);
        let results = send_files(&node.address(), &scu(), &files, |_| {})
            .await
            .unwrap();
        assert!(results.iter().all(|r| r.ok()), "{piece}: {results:?}");
        if i < 2 {
            // Not complete yet: nothing runs, whatever the wait.
            tokio::time::sleep(Duration::from_millis(2500)).await;
            let cases = node.db.all_cases().await.unwrap();
            assert_eq!(cases.len(), 1, "one case for the patient");
            assert_eq!(cases[0].state, CaseState::Collecting, "{:?}", cases[0]);
            node.stop().await;
            continue;
        }
        wait_until("the result to be delivered", 120, || async {
            let rows = node.db.outbox().await.unwrap();
            !rows.is_empty() && rows.iter().all(|r| r.state == DeliveryState::Sent)
        })
        .await;
        let cases = node.db.all_cases().await.unwrap();
        assert_eq!(cases.len(), 1);
        assert_eq!(cases[0].state, CaseState::Done, "{:?}", cases[0]);
        let queued: Vec<_> = node
            .db
            .events(0, Some("case_state_changed"), 1000)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.detail.as_ref().is_some_and(|d| d["to"] == "queued"))
            .collect();
        assert_eq!(queued.len(), 1, "ready exactly once: {queued:?}");
        let results = node.db.events(0, Some("case_result"), 10).await.unwrap();
        assert_eq!(results.len(), 1);
        // `device = "auto"` (the default) without CUDA in the build: the CPU,
        // recorded with the inference.
        let inferred = node
            .db
            .events(0, Some("case_inference_done"), 10)
            .await
            .unwrap();
        let inferred = inferred[0].detail.as_ref().unwrap();
        assert_eq!(inferred["device"], "cpu");
        // The CPU's model name, as /proc/cpuinfo gives it.
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let name = inferred["device_name"].as_str().unwrap();
        assert!(
            !name.is_empty() && cpuinfo.contains(name),
            "{name} not in /proc/cpuinfo"
        );
        // The CPU default of `max_batch = 0` is 1: a case runs alone.
        assert_eq!(inferred["batch_requests"], 1);
        let sides = &results[0].detail.as_ref().unwrap()["sides"];
        let prob = sides[0]["prob"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&prob));
        assert_eq!(
            sides[0]["modalities_used"].as_array().unwrap().len(),
            3,
            "{sides}"
        );

        // At the destination: one SR per contributing study plus heatmaps,
        // each in one of the patient's studies.
        let source_studies: std::collections::BTreeSet<String> = ["MG", "US", "MR"]
            .iter()
            .map(|s| her2map_study_uid(&study(s)[0]))
            .collect();
        let outputs = node.db.case_outputs(&cases[0].id).await.unwrap();
        let srs = outputs.iter().filter(|o| o.kind == OutputKind::Sr).count();
        let scs = outputs
            .iter()
            .filter(|o| o.kind == OutputKind::HeatmapSc)
            .count();
        assert_eq!(srs, 3, "one SR per study");
        assert!(scs >= 4, "MG CC + MLO, US, MR slices: {scs}");
        // The heatmaps as pictures, for a person to look at.
        let pictures =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/heatmaps/synth-patient");
        std::fs::create_dir_all(&pictures).unwrap();
        let mut mg_views = 0;
        for o in outputs.iter().filter(|o| o.kind == OutputKind::HeatmapSc) {
            let obj = dicom_object::open_file(data.path().join(&o.path)).unwrap();
            let png = pictures.join(format!("{}.png", o.sop_instance_uid));
            her2map::report::sc::write_png(&obj, &png).unwrap();
            assert!(std::fs::metadata(&png).unwrap().len() > 1000);
            // The mammography heatmaps carry the view and side imaging
            // read from their sources (the synthetic lesion is right).
            if obj.get(tags::VIEW_CODE_SEQUENCE).is_some() {
                mg_views += 1;
                let side = obj.get(tags::IMAGE_LATERALITY).map(|e| e.to_str().unwrap());
                assert_eq!(side.as_deref().map(str::trim), Some("R"));
            }
        }
        assert_eq!(mg_views, 2, "CC and MLO of the lesion side");
        eprintln!("heatmaps of the synthetic patient: {}", pictures.display());
        for o in &outputs {
            assert!(
                source_studies.contains(&o.study_instance_uid),
                "{o:?} outside the patient's studies"
            );
            assert!(
                destination
                    .db
                    .instance_path(&o.sop_instance_uid)
                    .await
                    .unwrap()
                    .is_some(),
                "{o:?} not delivered"
            );
        }
        node.stop().await;
    }
    destination.stop().await;
}

fn her2map_study_uid(path: &std::path::Path) -> String {
    let obj = dicom_object::open_file(path).unwrap();
    obj.element(dicom_dictionary_std::tags::STUDY_INSTANCE_UID)
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches('\0')
        .to_string()
}

/// Imaging starts while a complete case waits for its stable age; an
/// instance that arrives meanwhile makes the run use inputs prepared from
/// every file, never the early ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_prepared_during_the_stable_age_follow_late_instances() {
    let data = tempfile::tempdir().unwrap();
    let mut s = test_settings(data.path());
    s.cases.stable_age_secs = 3;
    let node = spawn_app_with(s).await;
    let mut files: Vec<PathBuf> = ["MG", "US", "MR"].iter().flat_map(|p| study(p)).collect();
    let last = files.pop().unwrap();
    let results = send_files(&node.address(), &scu(), &files, |_| {})
        .await
        .unwrap();
    assert!(results.iter().all(|r| r.ok()), "{results:?}");
    // Complete already (every MRI series is there): the early preparation
    // of these files starts and, for this small patient, ends.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cases = node.db.all_cases().await.unwrap();
    assert_eq!(cases[0].state, CaseState::Collecting, "{:?}", cases[0]);
    assert!(cases[0].reason.starts_with("complete"), "{:?}", cases[0]);
    let results = send_files(&node.address(), &scu(), &[last], |_| {})
        .await
        .unwrap();
    assert!(results[0].ok());
    wait_until("the case to finish", 120, || async {
        node.db.all_cases().await.unwrap()[0].state == CaseState::Done
    })
    .await;
    let imaging = node
        .db
        .events(0, Some("case_imaging_done"), 10)
        .await
        .unwrap();
    assert_eq!(imaging.len(), 1, "{imaging:?}");
    let detail = imaging[0].detail.as_ref().unwrap();
    assert_eq!(detail["instances"], files.len() + 1, "{detail}");
    assert_eq!(detail["prepared_during_stable_age"], true, "{detail}");
    node.stop().await;
}

/// Three patients ready at once on a node with `max_batch = 8`: the
/// pipeline takes them as one wave, their requests share one forward pass,
/// and each gets its own result in its own studies. They are stored on a
/// node whose stable age keeps them waiting, and become ready together on
/// the restarted node. Their images are copies of one patient's, so their
/// probabilities agree with each other and with the patient's alone.
#[tokio::test(flavor = "multi_thread")]
async fn three_patients_ready_at_once_share_a_forward_pass_with_their_own_results() {
    let data = tempfile::tempdir().unwrap();
    let copies = tempfile::tempdir().unwrap();
    let settings = |stable_age: u64| {
        let mut s = test_settings(data.path());
        s.cases.stable_age_secs = stable_age;
        // Room for all three: a case is one sample per side it reads.
        s.model.max_batch = 8;
        s
    };
    let files: Vec<PathBuf> = ["MG", "US", "MR"].iter().flat_map(|m| study(m)).collect();
    let patients: Vec<Vec<PathBuf>> = (0..3)
        .map(|i| {
            let out = copies.path().join(i.to_string());
            as_patient(&files, &out, &format!("WAVE{i}"), &format!("9{i}"))
        })
        .collect();
    let node = spawn_app_with(settings(3600)).await;
    let (addr, scu) = (node.address(), scu());
    for p in &patients {
        let results = send_files(&addr, &scu, p, |_| {}).await.unwrap();
        assert!(results.iter().all(|r| r.ok()));
    }
    // Every instance assigned: the three cases wait for their stable age,
    // which counts from the last assignment.
    let sent = patients.iter().map(Vec::len).sum::<usize>();
    wait_until("every instance in a case", 60, || async {
        let cases = node.db.all_cases().await.unwrap();
        let mut members = 0;
        for c in &cases {
            members += node.db.case_members(&c.id).await.unwrap().len();
        }
        cases.len() == 3 && members == sent
    })
    .await;
    node.stop().await;
    // Past the restarted node's stable age (1 s), so that its first round
    // finds all three cases ready.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let node = spawn_app_with(settings(1)).await;
    wait_until("three results", 240, || async {
        let cases = node.db.all_cases().await.unwrap();
        assert!(
            cases.iter().all(|c| c.state != CaseState::Failed),
            "{cases:?}"
        );
        cases.len() == 3 && cases.iter().all(|c| c.state == CaseState::Done)
    })
    .await;
    let shared: Vec<u64> = node
        .db
        .events(0, Some("case_inference_done"), 10)
        .await
        .unwrap()
        .iter()
        .map(|e| {
            e.detail.as_ref().unwrap()["batch_requests"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(shared, [3, 3, 3], "requests per forward pass");
    let results = node.db.events(0, Some("case_result"), 10).await.unwrap();
    assert_eq!(results.len(), 3);
    let sides: usize = results
        .iter()
        .map(|r| {
            r.detail.as_ref().unwrap()["sides"]
                .as_array()
                .unwrap()
                .len()
        })
        .sum();
    assert!(sides <= 8, "{sides} samples do not fit one batch");
    let probs: Vec<f64> = results
        .iter()
        .map(|r| {
            r.detail.as_ref().unwrap()["sides"][0]["prob"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert!(
        probs.iter().all(|p| (p - probs[0]).abs() <= 1e-5),
        "{probs:?}"
    );
    // Each case's outputs sit in that patient's studies only.
    for case in node.db.all_cases().await.unwrap() {
        let members = node.db.case_members(&case.id).await.unwrap();
        let studies: std::collections::BTreeSet<String> = members
            .iter()
            .map(|m| m.study_instance_uid.clone())
            .collect();
        let outputs = node.db.case_outputs(&case.id).await.unwrap();
        assert!(!outputs.is_empty());
        for o in &outputs {
            assert!(
                studies.contains(&o.study_instance_uid),
                "{o:?} outside {studies:?}"
            );
        }
    }
    node.stop().await;
}
