//! A real PACS in the loop: Orthanc on loopback auto-routes the synthetic
//! patient's breast studies to the node with `conf/orthanc-route.lua`, and
//! the node's destination is Orthanc. The SR and the heatmaps must land in
//! the patient's studies in Orthanc, Orthanc must render every heatmap, and
//! the SR must say what the node computed. This is the deployment the
//! README's "Deployment with Orthanc" describes.
//!
//! Needs Orthanc (Debian package `orthanc`, `/usr/sbin/Orthanc`; or the
//! binary named by `HER2MAP_ORTHANC`) and curl. Without them the test fails:
//! it is never skipped.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::orthanc::*;
use common::*;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use her2map::config::PeerSettings;
use her2map::db::{CaseState, DeliveryState};
use her2map::dimse::client::ClientOptions;
use her2map::report::OutputKind;
use her2map::send::{collect_files, send_files};

fn study(name: &str) -> Vec<PathBuf> {
    collect_files(&[test_data(&format!("synth-patient/{name}"))])
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect()
}

fn study_uid(path: &Path) -> String {
    let obj = dicom_object::open_file(path).unwrap();
    text(&obj, tags::STUDY_INSTANCE_UID)
}

fn text(obj: &InMemDicomObject, tag: dicom_core::Tag) -> String {
    obj.element(tag)
        .ok()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).trim().to_string())
        .unwrap_or_default()
}

fn code_value(item: &InMemDicomObject, seq: dicom_core::Tag) -> Option<String> {
    let items = item.element(seq).ok()?.items()?;
    items.first().map(|i| text(i, tags::CODE_VALUE))
}

/// One measurement group of the SR: P(HER2-positive) (written in percent,
/// read back as a fraction) and the HER2 status code.
#[derive(Debug, Default)]
struct Her2Group {
    prob: Option<f64>,
    status: Option<String>,
}

/// Every content item holding P(HER2+) (private code HER2P) or the HER2
/// interpretation (LOINC 48676-1), grouped by their parent container.
fn her2_groups(obj: &InMemDicomObject, out: &mut Vec<Her2Group>) {
    let Some(items) = obj
        .element(tags::CONTENT_SEQUENCE)
        .ok()
        .and_then(|e| e.items())
    else {
        return;
    };
    let mut group = Her2Group::default();
    for item in items {
        match code_value(item, tags::CONCEPT_NAME_CODE_SEQUENCE).as_deref() {
            Some("HER2P") => {
                let mv = item
                    .element(tags::MEASURED_VALUE_SEQUENCE)
                    .expect("NUM without Measured Value Sequence");
                let mv = &mv.items().unwrap()[0];
                assert_eq!(
                    code_value(mv, tags::MEASUREMENT_UNITS_CODE_SEQUENCE).as_deref(),
                    Some("%"),
                    "P(HER2+) in percent"
                );
                let percent: f64 = text(mv, tags::NUMERIC_VALUE).parse().unwrap();
                group.prob = Some(percent / 100.0);
            }
            Some("48676-1") => {
                group.status = code_value(item, tags::CONCEPT_CODE_SEQUENCE);
            }
            _ => her2_groups(item, out),
        }
    }
    if group.prob.is_some() || group.status.is_some() {
        out.push(group);
    }
}

async fn wait_until<F, Fut>(what: &str, secs: u64, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The synthetic patient C-STOREd to Orthanc comes back from the node, via
/// Orthanc's routing, as SRs and heatmaps in the patient's own studies.
#[tokio::test(flavor = "multi_thread")]
async fn orthanc_routes_the_patient_to_the_node_and_stores_its_results() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();

    // Each needs the other's DICOM port: pick Orthanc's, start the node on
    // port 0 with Orthanc as its destination, then Orthanc.
    orthanc_binary();
    let (orthanc_http, orthanc_dicom) = (free_port(), free_port());
    let mut settings = test_settings(&dir.path().join("node"));
    settings.cases.stable_age_secs = 2;
    // Only Orthanc may send to the node, from loopback.
    settings.dicom.peers = vec![PeerSettings {
        ae_title: ORTHANC_AET.into(),
        host: Some("127.0.0.1".into()),
    }];
    settings.destinations = vec![dimse_destination(ORTHANC_AET, orthanc_dicom)];
    let node = spawn_app_with(settings).await;
    let orthanc = tokio::task::block_in_place(|| {
        Orthanc::start(dir.path(), orthanc_http, orthanc_dicom, node.port())
    });

    // A modality stores the three studies in Orthanc.
    let modality = ClientOptions {
        calling_ae: "MODALITY".into(),
        called_ae: ORTHANC_AET.into(),
        ..Default::default()
    };
    let orthanc_addr = format!("127.0.0.1:{}", orthanc.dicom);
    let mut sent = 0;
    for piece in ["MG", "US", "MR"] {
        let files = study(piece);
        let results = send_files(&orthanc_addr, &modality, &files, |_| {})
            .await
            .unwrap();
        assert!(results.iter().all(|r| r.ok()), "{piece}: {results:?}");
        sent += files.len();
    }

    // Orthanc forwards every instance; the node runs the case once and
    // delivers to Orthanc.
    wait_until("the node to receive every routed instance", 60, || async {
        node.db.instance_count().await.unwrap() as usize >= sent
    })
    .await;
    wait_until("the result to be delivered to Orthanc", 90, || async {
        let cases = node.db.all_cases().await.unwrap();
        assert!(
            cases.iter().all(|c| c.state != CaseState::Failed),
            "case failed: {cases:?}"
        );
        let rows = node.db.outbox().await.unwrap();
        cases.iter().any(|c| c.state == CaseState::Done)
            && !rows.is_empty()
            && rows.iter().all(|r| r.state == DeliveryState::Sent)
    })
    .await;
    assert_eq!(
        node.db.instance_count().await.unwrap() as usize,
        sent,
        "the node got exactly the patient's instances (none of its outputs back)"
    );
    let cases = node.db.all_cases().await.unwrap();
    assert_eq!(cases.len(), 1, "{cases:?}");
    let case_id = cases[0].id.clone();
    let results = node.db.events(0, Some("case_result"), 10).await.unwrap();
    assert_eq!(results.len(), 1, "one result: {results:?}");
    let sides = results[0].detail.as_ref().unwrap()["sides"]
        .as_array()
        .unwrap()
        .clone();
    assert!(!sides.is_empty());
    let outputs = node.db.case_outputs(&case_id).await.unwrap();
    let srs: Vec<_> = outputs
        .iter()
        .filter(|o| o.kind == OutputKind::Sr)
        .collect();
    let scs: Vec<_> = outputs
        .iter()
        .filter(|o| o.kind == OutputKind::HeatmapSc)
        .collect();
    assert_eq!(srs.len(), 3, "one SR per study: {outputs:?}");
    assert!(scs.len() >= 4, "MG CC + MLO, US, MR heatmaps: {outputs:?}");
    let states = outputs
        .iter()
        .filter(|o| o.kind == OutputKind::Gsps)
        .count();
    assert!(
        states >= 4,
        "a presentation state per source image: {outputs:?}"
    );

    tokio::task::block_in_place(|| {
        // The patient in Orthanc: one patient, the three original studies,
        // no new study for the results.
        let source_studies: BTreeSet<String> = ["MG", "US", "MR"]
            .iter()
            .map(|s| study_uid(&study(s)[0]))
            .collect();
        let patients = orthanc.get_json("/patients");
        assert_eq!(patients.as_array().unwrap().len(), 1, "{patients}");
        let patient_id = patients[0].as_str().unwrap();
        let studies = orthanc.get_json(&format!("/patients/{patient_id}/studies"));
        let orthanc_studies: BTreeMap<String, String> = studies
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["MainDicomTags"]["StudyInstanceUID"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                    s["ID"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            orthanc_studies.keys().cloned().collect::<BTreeSet<_>>(),
            source_studies,
            "the patient's studies in Orthanc"
        );
        let instances = orthanc.get_json("/instances");
        assert_eq!(
            instances.as_array().unwrap().len(),
            sent + outputs.len(),
            "Orthanc holds the patient's instances and the node's outputs"
        );

        // Every output, where it belongs.
        for o in &outputs {
            let id = orthanc
                .lookup_instance(&o.sop_instance_uid)
                .unwrap_or_else(|| panic!("{o:?} not in Orthanc"));
            let tags = orthanc.get_json(&format!("/instances/{id}/simplified-tags"));
            assert_eq!(tags["StudyInstanceUID"], o.study_instance_uid.as_str());
            assert!(
                source_studies.contains(&o.study_instance_uid),
                "{o:?} outside the patient's studies"
            );
            assert_eq!(tags["PatientID"], "SYN0001", "{tags}");
            let study = orthanc.get_json(&format!("/instances/{id}/study"));
            assert_eq!(
                study["ID"].as_str(),
                orthanc_studies
                    .get(&o.study_instance_uid)
                    .map(String::as_str),
                "{o:?} filed under another study"
            );
            let modality = tags["Modality"].as_str().unwrap_or_default();
            match o.kind {
                OutputKind::Sr => assert_eq!(modality, "SR", "{tags}"),
                // The heatmaps and the summary card: Secondary Captures.
                OutputKind::HeatmapSc | OutputKind::SummarySc => {
                    assert_eq!(modality, "OT", "{tags}");
                    // Orthanc renders the heatmap.
                    let png = orthanc.get(&format!("/instances/{id}/preview"));
                    assert!(
                        png.starts_with(b"\x89PNG\r\n\x1a\n"),
                        "preview of {} is not a PNG",
                        o.sop_instance_uid
                    );
                    assert!(
                        png.len() > 1000,
                        "preview of {} too small",
                        o.sop_instance_uid
                    );
                    let img = image::load_from_memory(&png).expect("preview decodes");
                    assert!(img.width() >= 32 && img.height() >= 32);
                }
                OutputKind::Gsps => assert_eq!(modality, "PR", "{tags}"),
            }
        }

        // What the SRs say, read back from Orthanc's copy.
        for o in &srs {
            let id = orthanc.lookup_instance(&o.sop_instance_uid).unwrap();
            let bytes = orthanc.get(&format!("/instances/{id}/file"));
            let path = dir.path().join(format!("{}.dcm", o.sop_instance_uid));
            std::fs::write(&path, &bytes).unwrap();
            let sr = dicom_object::open_file(&path).expect("SR from Orthanc parses");
            let mut groups = Vec::new();
            her2_groups(&sr, &mut groups);
            // The index-lesion group of each side, and one ROI group per
            // source image of that side, each with the side's P and status.
            assert!(groups.len() > sides.len(), "{groups:?} vs {sides:?}");
            for g in &groups {
                let p = g.prob.unwrap();
                assert!(
                    sides
                        .iter()
                        .any(|s| (s["prob"].as_f64().unwrap() - p).abs() <= 1e-6),
                    "group {g:?} of no side"
                );
            }
            for side in &sides {
                let prob = side["prob"].as_f64().unwrap();
                let positive = side["positive"].as_bool().unwrap();
                let want_code = if positive { "10828004" } else { "260385009" };
                let found = groups.iter().any(|g| {
                    let p = g.prob.unwrap();
                    // The SR writes 4 decimals of the percentage.
                    (p - prob).abs() <= 1e-6 && g.status.as_deref() == Some(want_code)
                });
                assert!(
                    found,
                    "SR {} lacks P={prob} / {want_code}: {groups:?}",
                    o.sop_instance_uid
                );
            }
        }
    });

    node.stop().await;
    drop(orthanc);
    println!(
        "Orthanc round trip: {sent} instances, {} outputs, {:.1} s",
        outputs.len(),
        started.elapsed().as_secs_f64()
    );
}
