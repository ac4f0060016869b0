//! What the radiologist sees (issue 16), in a real viewer: the synthetic
//! patient's studies and the node's outputs in Orthanc with its DICOMweb
//! plugin, the OHIF Viewer 3.13 (npm `@ohif/app`'s built dist) served by
//! tests/browser/ohif.cjs with a same-origin proxy to Orthanc, headless
//! Chromium. Opening the SR shows the referenced image (not black) with the
//! region drawn and the HER2 probability in the page; the summary card
//! renders. Screenshots are kept under `target/browser/ohif/`.
//!
//! Needs Orthanc + `orthanc-dicomweb`, Node.js, Chromium and
//! `eval "$(scripts/web-deps.sh)"` (playwright-core, the OHIF dist). Without
//! them the test fails: it is never skipped.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::browser::run_script;
use common::orthanc::*;
use common::*;
use her2map::db::{CaseState, DeliveryState, OutputRow};
use her2map::dimse::client::ClientOptions;
use her2map::report::OutputKind;
use her2map::send::{collect_files, send_files};
use serde_json::{Value, json};

fn study(name: &str) -> Vec<PathBuf> {
    collect_files(&[test_data(&format!("synth-patient/{name}"))])
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect()
}

fn study_uid(path: &Path) -> String {
    let obj = dicom_object::open_file(path).unwrap();
    obj.element(dicom_dictionary_std::tags::STUDY_INSTANCE_UID)
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches(['\0', ' '])
        .to_string()
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

/// The series of the output of `kind` in `study`.
fn series_of(outputs: &[OutputRow], kind: OutputKind, study: &str) -> String {
    outputs
        .iter()
        .find(|o| o.kind == kind && o.study_instance_uid == study)
        .unwrap_or_else(|| panic!("no {kind:?} in study {study}: {outputs:?}"))
        .series_instance_uid
        .clone()
}

fn view<'a>(result: &'a Value, name: &str) -> &'a Value {
    result["views"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no view {name} in {result}"))
}

/// The viewport shows an image: a canvas, and more than 5 % of its pixels
/// not black.
fn assert_image(v: &Value) {
    let c = &v["canvas"];
    assert!(c.is_object(), "{}: no viewport canvas: {v}", v["name"]);
    let non_black = c["nonBlack"].as_f64().unwrap();
    assert!(
        non_black > 0.05,
        "{}: the viewport is black ({:.1} % of pixels lit); see {}",
        v["name"],
        non_black * 100.0,
        v["screenshot"]
    );
}

/// The SR's region drawn on the image (an SVG shape of the annotation
/// layer, with a box inside the viewport) and the probability in its label:
/// OHIF writes each NUM of the group as "meaning: value unit", the value
/// with 2 decimals: the SR's percentages read "0.12 %", not the "0.00 1" a
/// fraction with UCUM "1" gave.
fn assert_region_and_probability(v: &Value, prob: f64) {
    assert_image(v);
    let svg = &v["svg"];
    assert!(
        svg["shapes"].as_u64().unwrap() > 0,
        "{}: no region drawn (no SVG shape in the annotation layer); see {}: {svg}",
        v["name"],
        v["screenshot"],
    );
    let r = &svg["region"];
    let (x0, y0, x1, y1) = (
        r["x0"].as_f64().unwrap(),
        r["y0"].as_f64().unwrap(),
        r["x1"].as_f64().unwrap(),
        r["y1"].as_f64().unwrap(),
    );
    assert!(
        x0 > -0.01 && y0 > -0.01 && x1 < 1.01 && y1 < 1.01 && x1 - x0 > 0.02 && y1 - y0 > 0.02,
        "{}: the region's box {r} is not a visible area of the viewport",
        v["name"]
    );
    let mut text = v["text"].as_str().unwrap_or_default().to_string();
    for t in svg["texts"].as_array().unwrap() {
        text.push('\n');
        text.push_str(t.as_str().unwrap_or_default());
    }
    let label = format!("Probability of HER2-positive status: {:.2} %", prob * 100.0);
    assert!(
        text.contains(&label),
        "{}: \"{label}\" is not on the page; see {}:\n{text}",
        v["name"],
        v["screenshot"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ohif_shows_the_sr_region_probability_and_summary() {
    let started = Instant::now();
    let dist = PathBuf::from(std::env::var_os("HER2MAP_OHIF_DIST").expect(
        "HER2MAP_OHIF_DIST is not set: run eval \"$(scripts/web-deps.sh)\" (the OHIF dist)",
    ));
    assert!(
        dist.join("index.html").is_file(),
        "{}: no OHIF dist",
        dist.display()
    );
    let dir = tempfile::tempdir().unwrap();

    // Orthanc with DICOMweb; the node delivers its outputs there.
    let (plugins, dicomweb) = dicomweb_plugin();
    let orthanc = tokio::task::block_in_place(|| {
        Orthanc::start_with(
            dir.path(),
            free_port(),
            free_port(),
            json!({ "Plugins": plugins, "DicomWeb": dicomweb }),
        )
    });
    let mut settings = test_settings(&dir.path().join("node"));
    settings.cases.stable_age_secs = 2;
    settings.destinations = vec![dimse_destination(ORTHANC_AET, orthanc.dicom)];
    let node = spawn_app_with(settings).await;

    // The modality sends the studies to the PACS and to the node.
    let to = |called: &str| ClientOptions {
        calling_ae: "MODALITY".into(),
        called_ae: called.into(),
        ..Default::default()
    };
    let orthanc_addr = format!("127.0.0.1:{}", orthanc.dicom);
    for piece in ["MG", "US", "MR"] {
        let files = study(piece);
        for (addr, called) in [
            (orthanc_addr.as_str(), ORTHANC_AET),
            (&node.address(), NODE_AET),
        ] {
            let results = send_files(addr, &to(called), &files, |_| {}).await.unwrap();
            assert!(
                results.iter().all(|r| r.ok()),
                "{piece} to {called}: {results:?}"
            );
        }
    }
    wait_until("the result to be delivered to Orthanc", 180, || async {
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
    let cases = node.db.all_cases().await.unwrap();
    let outputs = node.db.case_outputs(&cases[0].id).await.unwrap();
    let results = node.db.events(0, Some("case_result"), 10).await.unwrap();
    let prob = results[0].detail.as_ref().unwrap()["sides"][0]["prob"]
        .as_f64()
        .unwrap();
    node.stop().await;

    let mg = study_uid(&study("MG")[0]);
    let us = study_uid(&study("US")[0]);
    let mr = study_uid(&study("MR")[0]);
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser/ohif");
    std::fs::create_dir_all(&artifacts).unwrap();
    let views = json!([
        { "name": "mg-sr", "study": mg, "series": series_of(&outputs, OutputKind::Sr, &mg), "annotations": true },
        { "name": "us-sr", "study": us, "series": series_of(&outputs, OutputKind::Sr, &us), "annotations": true },
        { "name": "mr-sr", "study": mr, "series": series_of(&outputs, OutputKind::Sr, &mr), "annotations": true },
        { "name": "mg-summary", "study": mg, "series": series_of(&outputs, OutputKind::SummarySc, &mg), "annotations": false },
    ]);
    let result = tokio::task::block_in_place(|| {
        run_script(
            "ohif.cjs",
            &json!({
                "dist": dist,
                "orthanc": orthanc.url(""),
                "out": artifacts,
                "views": views,
            }),
        )
    });
    eprintln!(
        "OHIF screenshots: {} (page errors: {})",
        artifacts.display(),
        result["errors"]
    );
    for v in result["views"].as_array().unwrap() {
        eprintln!(
            "{}: {} ms, canvas {}, svg {}",
            v["name"], v["elapsedMs"], v["canvas"], v["svg"]
        );
    }
    // OHIF failed on the node's earlier SRs with an unhandled rejection in
    // its SR loader (see docs/report.md): none now.
    let failures: Vec<_> = result["errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            let e = e.as_str().unwrap_or_default();
            e.contains("pageerror") || e.contains("unhandled rejection")
        })
        .collect();
    assert!(failures.is_empty(), "OHIF failed: {failures:?}");
    for name in ["mg-sr", "us-sr", "mr-sr"] {
        assert_region_and_probability(view(&result, name), prob);
    }
    // On the mammogram the region is the lesion: the synthetic lesion is a
    // bright blob, so the image inside the region is brighter than the
    // image as a whole.
    let mg_sr = view(&result, "mg-sr");
    let inside = mg_sr["svg"]["region"]["insideMean"].as_f64().unwrap();
    let whole = mg_sr["canvas"]["mean"].as_f64().unwrap();
    assert!(
        inside > whole * 1.5,
        "mg-sr: the region is not on the lesion (mean {inside:.1} inside, {whole:.1} overall); see {}",
        mg_sr["screenshot"]
    );
    assert_image(view(&result, "mg-summary"));
    drop(orthanc);
    eprintln!("viewer test: {:.1} s", started.elapsed().as_secs_f64());
}
