//! Integration tests of the report objects: every SR and SC passes `dciodvfy`
//! (dicom3tools) with no errors, `dsrdump` (DCMTK) parses the SR, and the heatmaps
//! are written as PNGs under `target/heatmaps/` for a person to look at.

use crate::common;
use common::{dciodvfy, tool};
use std::path::{Path, PathBuf};
use std::process::Command;

use dicom_dictionary_std::tags;
use dicom_object::open_file;
use her2map::report::sc::{CropBox, cam_to_base_grid};
use her2map::report::{
    BranchScores, Heatmap, ModelResult, OutputKind, OutputObject, PriorOutput, ReportInput,
    ReportSettings, Roi, SourceInstance, StudyAttributes, StudyPolicy, build_outputs,
};
use time::macros::datetime;

const MG_CLASS: &str = "1.2.840.10008.5.1.4.1.1.1.2"; // Digital Mammography - For Presentation
const US_CLASS: &str = "1.2.840.10008.5.1.4.1.1.6.1"; // Ultrasound Image
const MR_CLASS: &str = "1.2.840.10008.5.1.4.1.1.4.1"; // Enhanced MR Image
const SC_CLASS: &str = "1.2.840.10008.5.1.4.1.1.7"; // Secondary Capture Image

fn study(date: &str, time: &str, acc: &str, desc: &str) -> StudyAttributes {
    StudyAttributes {
        patient_name: "Müller^Anna".into(),
        patient_id: "PAT-0001".into(),
        issuer_of_patient_id: Some("HOSP".into()),
        patient_birth_date: "19700101".into(),
        patient_sex: "F".into(),
        study_date: date.into(),
        study_time: time.into(),
        accession_number: acc.into(),
        referring_physician_name: "Doe^John".into(),
        study_id: "S1".into(),
        study_description: Some(desc.into()),
    }
}

const MG_STUDY: &str = "1.2.826.0.1.3680043.10.1.1";
const US_STUDY: &str = "1.2.826.0.1.3680043.10.1.2";
const MR_STUDY: &str = "1.2.826.0.1.3680043.10.1.3";

#[allow(clippy::too_many_arguments)]
fn inst(
    class: &str,
    inst: &str,
    study_uid: &str,
    series: &str,
    modality: &str,
    lat: Option<&str>,
    view: Option<&str>,
    frame: Option<u32>,
    st: &StudyAttributes,
) -> SourceInstance {
    SourceInstance {
        sop_class_uid: class.into(),
        sop_instance_uid: inst.into(),
        study_instance_uid: study_uid.into(),
        series_instance_uid: series.into(),
        modality: modality.into(),
        laterality: lat.map(Into::into),
        view: view.map(Into::into),
        frame,
        study: st.clone(),
    }
}

fn evidence() -> Vec<SourceInstance> {
    let mg = study("20240110", "093000", "ACC-MG", "MAMMO BILAT");
    let us = study("20240112", "101500", "ACC-US", "US BREAST LEFT");
    let mr = study("20240115", "140000.123", "ACC-MR", "MRI BREAST DCE");
    vec![
        inst(
            MG_CLASS,
            "1.2.826.0.1.3680043.10.2.1",
            MG_STUDY,
            "1.2.826.0.1.3680043.10.3.1",
            "MG",
            Some("L"),
            Some("CC"),
            None,
            &mg,
        ),
        inst(
            MG_CLASS,
            "1.2.826.0.1.3680043.10.2.2",
            MG_STUDY,
            "1.2.826.0.1.3680043.10.3.1",
            "MG",
            Some("L"),
            Some("MLO"),
            None,
            &mg,
        ),
        inst(
            US_CLASS,
            "1.2.826.0.1.3680043.10.2.3",
            US_STUDY,
            "1.2.826.0.1.3680043.10.3.2",
            "US",
            Some("L"),
            None,
            None,
            &us,
        ),
        inst(
            MR_CLASS,
            "1.2.826.0.1.3680043.10.2.4",
            MR_STUDY,
            "1.2.826.0.1.3680043.10.3.3",
            "MR",
            None,
            None,
            Some(42),
            &mr,
        ),
        inst(
            MR_CLASS,
            "1.2.826.0.1.3680043.10.2.4",
            MR_STUDY,
            "1.2.826.0.1.3680043.10.3.3",
            "MR",
            None,
            None,
            Some(43),
            &mr,
        ),
    ]
}

/// Synthetic grayscale "breast" with a bright blob, and a Gaussian CAM on the blob.
fn synth(rows: u32, cols: u32, cy: f32, cx: f32) -> (Vec<u8>, Vec<f32>) {
    let mut base = Vec::with_capacity((rows * cols) as usize);
    let mut cam = Vec::with_capacity((rows * cols) as usize);
    for y in 0..rows {
        for x in 0..cols {
            let (fy, fx) = (y as f32 / rows as f32, x as f32 / cols as f32);
            let breast = ((fx - 0.0) / 0.8).powi(2) + ((fy - 0.5) / 0.45).powi(2) < 1.0;
            let d2 = (fy - cy).powi(2) + (fx - cx).powi(2);
            let lesion = (-d2 / 0.004).exp();
            let tex = ((x as f32 * 0.21).sin() * (y as f32 * 0.17).cos() * 12.0) as i32;
            let g = if breast {
                90 + tex + (lesion * 120.0) as i32
            } else {
                5
            };
            base.push(g.clamp(0, 255) as u8);
            cam.push((-d2 / 0.02).exp() * 3.7);
        }
    }
    (base, cam)
}

/// A square ROI of a quarter of the shorter side around (cy, cx) (fractions).
fn roi(rows: u32, cols: u32, cy: f32, cx: f32) -> Roi {
    let half = rows.min(cols) as f32 / 8.0;
    let (y, x) = (cy * rows as f32, cx * cols as f32);
    Roi {
        points: Roi::rectangle(x - half, y - half, x + half, y + half),
        image_rows: rows,
        image_cols: cols,
        method: "mg-blob".into(),
        window: None,
        monochrome1: false,
    }
}

fn heatmaps(ev: &[SourceInstance]) -> Vec<Heatmap> {
    let mk = |src: &SourceInstance, rows, cols, cy, cx, label: &str| {
        let (base, cam) = synth(rows, cols, cy, cx);
        Heatmap {
            source: src.clone(),
            base,
            cam,
            rows,
            cols,
            label: label.into(),
            roi: Some(roi(rows, cols, cy, cx)),
        }
    };
    vec![
        mk(&ev[0], 320, 256, 0.45, 0.35, "MG L CC"),
        mk(&ev[1], 320, 256, 0.40, 0.40, "MG L MLO"),
        {
            // The US CAM comes from a 7x7 model grid over a crop of the image, mapped
            // back with the public helper (undoing crop + resize).
            let (base, _) = synth(240, 320, 0.50, 0.50);
            let mut low = vec![0.0f32; 49];
            for (i, v) in low.iter_mut().enumerate() {
                let (y, x) = ((i / 7) as f32 - 3.0, (i % 7) as f32 - 3.0);
                *v = (-(y * y + x * x) / 2.0).exp();
            }
            let crop = CropBox {
                top: 40.0,
                left: 80.0,
                height: 160.0,
                width: 160.0,
            };
            let cam = cam_to_base_grid(&low, 7, 7, crop, 240, 320).unwrap();
            Heatmap {
                source: ev[2].clone(),
                base,
                cam,
                rows: 240,
                cols: 320,
                label: "US L".into(),
                roi: Some(Roi {
                    points: Roi::rectangle(80.0, 40.0, 240.0, 200.0),
                    image_rows: 240,
                    image_cols: 320,
                    method: "us-region".into(),
                    window: Some((128.0, 256.0)),
                    monochrome1: false,
                }),
            }
        },
        mk(&ev[3], 256, 256, 0.55, 0.30, "MR slice 42"),
    ]
}

fn result(prob: f32) -> ModelResult {
    ModelResult {
        model_name: "HER2 MAP".into(),
        model_version: "1.0.0".into(),
        weights_sha256: "ab".repeat(32),
        device: "cpu".into(),
        demo: false,
        prob,
        branch_probs: BranchScores {
            us: Some(0.61),
            mri: Some(0.77),
            mg: Some(0.58),
        },
        modalities_used: vec!["US".into(), "MRI".into(), "MG".into()],
        modalities_missing: vec![],
        roi_methods: vec![
            ("US".into(), "bbox-annotation".into()),
            ("MR".into(), "cam-peak".into()),
        ],
        lesion_side: Some("L".into()),
        notes: vec!["MRI phase: first post-contrast".into()],
    }
}

fn settings() -> ReportSettings {
    ReportSettings {
        institution_name: "Test Hospital".into(),
        manufacturer: "her2map project".into(),
        ..Default::default()
    }
}

fn build(res: &ModelResult, preds: &[PriorOutput], s: &ReportSettings) -> Vec<OutputObject> {
    let ev = evidence();
    let hm = heatmaps(&ev);
    let input = ReportInput {
        case_id: "case-0001",
        result: res,
        evidence: &ev,
        heatmaps: &hm,
        predecessors: preds,
        settings: s,
        now: datetime!(2024-02-01 12:30:00 +01:00),
    };
    build_outputs(&input).expect("build outputs")
}

fn write_all(outs: &[OutputObject], dir: &Path) -> Vec<(PathBuf, OutputKind)> {
    outs.iter()
        .enumerate()
        .map(|(i, o)| {
            let name = match o.kind {
                OutputKind::Sr => format!("sr_{i}.dcm"),
                OutputKind::HeatmapSc => format!("sc_{i}.dcm"),
                OutputKind::SummarySc => format!("summary_{i}.dcm"),
                OutputKind::Gsps => format!("gsps_{i}.dcm"),
            };
            let p = dir.join(name);
            o.object.write_to_file(&p).expect("write");
            (p, o.kind)
        })
        .collect()
}

fn dsrdump(path: &Path) -> (bool, String) {
    let out = Command::new(tool("dsrdump"))
        .args(["+Pc", "+Pl", "+Pu"])
        .arg(path)
        .output()
        .expect("run dsrdump");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// DCMTK's HTML rendering of an SR (fails the test when dsr2html fails).
fn dsr2html(path: &Path) -> String {
    let out = Command::new(tool("dsr2html"))
        .arg(path)
        .output()
        .expect("run dsr2html");
    assert!(
        out.status.success(),
        "dsr2html {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_output_passes_dciodvfy_and_dsrdump() {
    // Kept under target/ so a person can open them (dcmdump, dsr2html, a viewer).
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("report-out");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let s = settings();
    let outs = build(&result(0.73), &[], &s);
    assert_eq!(
        outs.iter().filter(|o| o.kind == OutputKind::Sr).count(),
        3,
        "one SR per contributing study"
    );
    assert_eq!(
        outs.iter()
            .filter(|o| o.kind == OutputKind::HeatmapSc)
            .count(),
        4
    );
    let mut all_warnings = Vec::new();
    for (p, kind) in write_all(&outs, &dir) {
        let (errors, warnings, text) = dciodvfy(&p);
        assert!(
            errors.is_empty(),
            "dciodvfy errors for {kind:?} {}:\n{text}",
            p.display()
        );
        all_warnings.extend(warnings.into_iter().map(|w| format!("{kind:?}: {w}")));
        if kind == OutputKind::Sr {
            let (ok, text) = dsrdump(&p);
            assert!(ok, "dsrdump failed:\n{text}");
            assert!(
                text.contains("(48676-1,LN,\"HER2 [Interpretation] in Tissue\")"),
                "{text}"
            );
            assert!(
                text.contains("=\"73.0000\" (%,UCUM,\"percent\")"),
                "probability (in percent) missing:\n{text}"
            );
            assert!(text.contains("10828004"), "positive code missing:\n{text}");
            assert!(text.contains("NOT FOR DIAGNOSTIC USE"), "{text}");
            assert!(text.contains("UNVERIFIED WEIGHTS"), "{text}");
            assert!(text.contains("device: cpu"), "device missing:\n{text}");
            // The ROI groups: an Image Region SCOORD on each heatmap source.
            assert_eq!(
                text.matches("(111030,DCM,\"Image Region\")").count(),
                4,
                "{text}"
            );
            let html = dsr2html(&p);
            assert!(html.contains("Image Region"), "dsr2html:\n{html}");
            std::fs::write(p.with_extension("html"), &html).unwrap();
        }
    }
    all_warnings.sort();
    all_warnings.dedup();
    println!("dciodvfy warnings ({}):", all_warnings.len());
    for w in &all_warnings {
        println!("  {w}");
    }
}

#[test]
fn amended_and_enhanced_and_demo_variants_pass_validation() {
    let dir = tempfile::tempdir().unwrap();
    let first = build(&result(0.73), &[], &settings());
    let preds: Vec<PriorOutput> = first
        .iter()
        .filter(|o| o.kind == OutputKind::Sr)
        .map(|o| PriorOutput {
            sop_class_uid: o.sop_class_uid.clone(),
            sop_instance_uid: o.sop_instance_uid.clone(),
            series_instance_uid: o
                .object
                .element(tags::SERIES_INSTANCE_UID)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string(),
            study_instance_uid: o.study_instance_uid.clone(),
        })
        .collect();
    let s = ReportSettings {
        sr_class: her2map::report::SrClass::Enhanced,
        studies: StudyPolicy::Latest,
        uid_root: Some("1.2.826.0.1.3680043.10.999".into()),
        ..settings()
    };
    let mut res = result(0.2);
    res.demo = true;
    res.lesion_side = None;
    res.modalities_missing = vec!["MG".into()];
    let outs = build(&res, &preds, &s);
    let srs: Vec<_> = outs.iter().filter(|o| o.kind == OutputKind::Sr).collect();
    assert_eq!(srs.len(), 1, "latest policy: one SR");
    assert_eq!(srs[0].study_instance_uid, MR_STUDY, "the most recent study");
    let sr = &srs[0].object;
    let pred = sr
        .element(tags::PREDECESSOR_DOCUMENTS_SEQUENCE)
        .expect("Predecessor Documents Sequence");
    let items = pred.items().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(
        items[0]
            .element(tags::STUDY_INSTANCE_UID)
            .unwrap()
            .to_str()
            .unwrap(),
        MR_STUDY
    );
    for (p, kind) in write_all(&outs, dir.path()) {
        let (errors, warnings, text) = dciodvfy(&p);
        assert!(errors.is_empty(), "dciodvfy errors for {kind:?}:\n{text}");
        for w in warnings {
            println!("{kind:?} (enhanced/amended/demo): {w}");
        }
        if kind == OutputKind::Sr {
            let (ok, text) = dsrdump(&p);
            assert!(ok, "dsrdump failed:\n{text}");
            assert!(text.contains("260385009"), "negative code missing:\n{text}");
            assert!(text.contains("DEMO WEIGHTS"), "{text}");
            assert!(text.contains("AMENDED RESULT"), "{text}");
        }
    }
}

#[test]
fn writes_heatmap_pngs() {
    let outs = build(&result(0.73), &[], &settings());
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("heatmaps");
    std::fs::create_dir_all(&dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut n = 0;
    for (i, o) in outs
        .iter()
        .enumerate()
        .filter(|(_, o)| o.kind == OutputKind::HeatmapSc)
    {
        // Round-trip through the file to check what a viewer would read.
        let p = tmp.path().join(format!("{i}.dcm"));
        o.object.write_to_file(&p).unwrap();
        let obj = open_file(&p).unwrap();
        let rows: u32 = obj.element(tags::ROWS).unwrap().to_int().unwrap();
        let cols: u32 = obj.element(tags::COLUMNS).unwrap().to_int().unwrap();
        let px = obj.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap();
        let n_bytes = (rows * cols * 3) as usize;
        let img =
            image::RgbImage::from_raw(cols, rows, px[..n_bytes].to_vec()).expect("rgb buffer");
        let label = obj
            .element(tags::IMAGE_COMMENTS)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let name = label
            .rsplit("Source: ")
            .next()
            .unwrap_or("heatmap")
            .replace(' ', "_");
        let out = dir.join(format!("{name}.png"));
        img.save(&out).unwrap();
        assert_eq!(
            obj.element(tags::BURNED_IN_ANNOTATION)
                .unwrap()
                .to_str()
                .unwrap(),
            "YES"
        );
        n += 1;
    }
    assert_eq!(n, 4);
    println!("heatmap PNGs written to {}", dir.display());
}

// ---------------------------------------------------------------------------
// Behaviour tests (no external tools needed).

use dicom_object::InMemDicomObject;

/// Concept code value of the first CODE item named `name` anywhere in the tree.
fn find_code(obj: &InMemDicomObject, name: &str) -> Option<String> {
    let seq = obj.element(tags::CONTENT_SEQUENCE).ok()?;
    for item in seq.items()? {
        let concept = item
            .element(tags::CONCEPT_NAME_CODE_SEQUENCE)
            .ok()
            .and_then(|e| {
                e.items().map(|i| {
                    i[0].element(tags::CODE_VALUE)
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .to_string()
                })
            });
        if concept.as_deref() == Some(name)
            && let Ok(v) = item.element(tags::CONCEPT_CODE_SEQUENCE)
        {
            return Some(str_of(&v.items().unwrap()[0], tags::CODE_VALUE));
        }
        if let Some(found) = find_code(item, name) {
            return Some(found);
        }
    }
    None
}

fn sop_uids(outs: &[OutputObject]) -> Vec<String> {
    outs.iter().map(|o| o.sop_instance_uid.clone()).collect()
}

fn concept_value(item: &InMemDicomObject) -> Option<String> {
    let seq = item.element(tags::CONCEPT_NAME_CODE_SEQUENCE).ok()?;
    Some(str_of(&seq.items()?[0], tags::CODE_VALUE))
}

fn children(item: &InMemDicomObject) -> &[InMemDicomObject] {
    item.element(tags::CONTENT_SEQUENCE)
        .ok()
        .and_then(|e| e.items())
        .unwrap_or_default()
}

/// The Measurement Groups (125007) of Imaging Measurements (126010), in order.
fn measurement_groups(sr: &InMemDicomObject) -> Vec<&InMemDicomObject> {
    children(sr)
        .iter()
        .filter(|i| concept_value(i).as_deref() == Some("126010"))
        .flat_map(children)
        .filter(|g| concept_value(g).as_deref() == Some("125007"))
        .collect()
}

/// The image a group's SCOORD is selected from.
fn scoord_image(group: &InMemDicomObject) -> Option<String> {
    let scoord = children(group)
        .iter()
        .find(|i| str_of(i, tags::VALUE_TYPE) == "SCOORD")?;
    let image = children(scoord).first()?;
    let refs = image.element(tags::REFERENCED_SOP_SEQUENCE).ok()?;
    Some(str_of(&refs.items()?[0], tags::REFERENCED_SOP_INSTANCE_UID))
}

fn str_of(obj: &InMemDicomObject, tag: dicom_core::Tag) -> String {
    obj.element(tag)
        .unwrap()
        .to_str()
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn her2_coding_flips_at_threshold() {
    let s = ReportSettings {
        threshold: 0.6,
        ..settings()
    };
    let code_for = |p: f32| {
        let outs = build(&result(p), &[], &s);
        find_code(&outs[0].object, "48676-1").expect("HER2 item")
    };
    assert_eq!(code_for(0.6), "10828004", "at threshold: Positive");
    assert_eq!(code_for(0.95), "10828004");
    assert_eq!(code_for(0.5999), "260385009", "below threshold: Negative");
    assert_eq!(code_for(0.0), "260385009");
}

#[test]
fn uids_are_deterministic_per_revision() {
    let s = settings();
    let a = build(&result(0.73), &[], &s);
    let b = build(&result(0.73), &[], &s);
    assert_eq!(sop_uids(&a), sop_uids(&b), "same input, same UIDs");
    // A different `now` does not change UIDs (a re-send after a crash).
    let ev = evidence();
    let hm = heatmaps(&ev);
    let res = result(0.73);
    let later = build_outputs(&ReportInput {
        case_id: "case-0001",
        result: &res,
        evidence: &ev,
        heatmaps: &hm,
        predecessors: &[],
        settings: &s,
        now: datetime!(2024-02-03 08:00:00 UTC),
    })
    .unwrap();
    assert_eq!(sop_uids(&a), sop_uids(&later));
    // An amended result (new revision) gets new UIDs everywhere.
    let preds = vec![PriorOutput {
        sop_class_uid: a[0].sop_class_uid.clone(),
        sop_instance_uid: a[0].sop_instance_uid.clone(),
        series_instance_uid: "1.2.3.4".into(),
        study_instance_uid: a[0].study_instance_uid.clone(),
    }];
    let c = build(&result(0.73), &preds, &s);
    for u in sop_uids(&c) {
        assert!(!sop_uids(&a).contains(&u), "revision must change UIDs");
    }
    // Different weights are a different revision too.
    let mut other = result(0.73);
    other.weights_sha256 = "cd".repeat(32);
    let d = build(&other, &[], &s);
    assert_ne!(sop_uids(&a), sop_uids(&d));
    // All UIDs are unique and valid.
    let mut all = sop_uids(&a);
    all.sort();
    all.dedup();
    assert_eq!(all.len(), a.len());
    for u in &all {
        assert!(u.starts_with("2.25.") && u.len() <= 64, "{u}");
    }
    // UID root is honoured.
    let rooted = build(
        &result(0.73),
        &[],
        &ReportSettings {
            uid_root: Some("1.2.826.0.1.3680043.10.999".into()),
            ..s
        },
    );
    for o in &rooted {
        assert!(
            o.sop_instance_uid
                .starts_with("1.2.826.0.1.3680043.10.999."),
            "{}",
            o.sop_instance_uid
        );
        assert!(o.sop_instance_uid.len() <= 64);
    }
}

#[test]
fn srs_reference_all_evidence_and_each_other() {
    let outs = build(&result(0.73), &[], &settings());
    let srs: Vec<_> = outs.iter().filter(|o| o.kind == OutputKind::Sr).collect();
    let study_uids: Vec<&str> = srs.iter().map(|o| o.study_instance_uid.as_str()).collect();
    assert_eq!(study_uids, vec![MG_STUDY, US_STUDY, MR_STUDY]);
    for sr in &srs {
        let o = &sr.object;
        assert_eq!(str_of(o, tags::STUDY_INSTANCE_UID), sr.study_instance_uid);
        assert_eq!(str_of(o, tags::SERIES_NUMBER), "9901");
        assert_eq!(
            str_of(o, tags::SERIES_DESCRIPTION),
            "HER2 MAP report (research)"
        );
        assert_eq!(str_of(o, tags::MODALITY), "SR");
        assert_eq!(str_of(o, tags::PATIENT_ID), "PAT-0001");
        assert_eq!(str_of(o, tags::SPECIFIC_CHARACTER_SET), "ISO_IR 192");
        // Every instance used is referenced once, in CRPE (own study) or POE
        // (others); the heatmap SCs the ROI groups show are in POE.
        let mut refs = Vec::new();
        let mut sc_refs = Vec::new();
        for seq_tag in [
            tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE,
            tags::PERTINENT_OTHER_EVIDENCE_SEQUENCE,
        ] {
            let Ok(seq) = o.element(seq_tag) else {
                continue;
            };
            for st in seq.items().unwrap() {
                let study = str_of(st, tags::STUDY_INSTANCE_UID);
                for se in st
                    .element(tags::REFERENCED_SERIES_SEQUENCE)
                    .unwrap()
                    .items()
                    .unwrap()
                {
                    for sop in se
                        .element(tags::REFERENCED_SOP_SEQUENCE)
                        .unwrap()
                        .items()
                        .unwrap()
                    {
                        let uid = str_of(sop, tags::REFERENCED_SOP_INSTANCE_UID);
                        if str_of(sop, tags::REFERENCED_SOP_CLASS_UID) == SC_CLASS {
                            assert_eq!(seq_tag, tags::PERTINENT_OTHER_EVIDENCE_SEQUENCE);
                            sc_refs.push(uid);
                            continue;
                        }
                        if seq_tag == tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE {
                            assert_eq!(study, sr.study_instance_uid);
                        } else {
                            assert_ne!(study, sr.study_instance_uid);
                        }
                        refs.push(uid);
                    }
                }
            }
        }
        sc_refs.sort();
        let mut heatmap_uids: Vec<String> = outs
            .iter()
            .filter(|o| o.kind == OutputKind::HeatmapSc)
            .map(|o| o.sop_instance_uid.clone())
            .collect();
        heatmap_uids.sort();
        assert_eq!(sc_refs, heatmap_uids, "the heatmaps of the ROI groups");
        refs.sort();
        assert_eq!(
            refs,
            vec![
                "1.2.826.0.1.3680043.10.2.1",
                "1.2.826.0.1.3680043.10.2.2",
                "1.2.826.0.1.3680043.10.2.3",
                "1.2.826.0.1.3680043.10.2.4"
            ]
        );
        // Each copy opens on its own study's image (the first measurement
        // group is a viewer's first view), so the copies are not Identical
        // Documents and do not say they are.
        assert!(o.element(tags::IDENTICAL_DOCUMENTS_SEQUENCE).is_err());
        let groups = measurement_groups(o);
        assert_eq!(groups.len(), 4, "one group per heatmap source");
        let first = scoord_image(groups[0]).expect("the first group has a region");
        let own: Vec<_> = evidence()
            .into_iter()
            .filter(|i| i.study_instance_uid == sr.study_instance_uid)
            .map(|i| i.sop_instance_uid)
            .collect();
        assert!(
            own.contains(&first),
            "{}: first group on {first}, not on an image of its study",
            sr.study_instance_uid
        );
        for g in &groups {
            assert!(scoord_image(g).is_some(), "every group has a region");
        }
        assert!(
            o.element(tags::PREDECESSOR_DOCUMENTS_SEQUENCE).is_err(),
            "first result is not amended"
        );
        assert_eq!(
            find_code(o, "121005").as_deref(),
            Some("121007"),
            "observer is a device"
        );
    }
}

#[test]
fn heatmaps_keep_source_study_laterality_view_and_frame() {
    let outs = build(&result(0.73), &[], &settings());
    let scs: Vec<_> = outs
        .iter()
        .filter(|o| o.kind == OutputKind::HeatmapSc)
        .collect();
    let ev = evidence();
    let expect = [
        (&ev[0], Some("L"), Some("399162004")),
        (&ev[1], Some("L"), Some("399368009")),
        (&ev[2], Some("L"), None),
        (&ev[3], None, None),
    ];
    for (sc, (src, lat, view)) in scs.iter().zip(expect) {
        let o = &sc.object;
        assert_eq!(sc.study_instance_uid, src.study_instance_uid);
        assert_eq!(str_of(o, tags::STUDY_INSTANCE_UID), src.study_instance_uid);
        assert_eq!(
            str_of(o, tags::ACCESSION_NUMBER),
            src.study.accession_number
        );
        assert_eq!(
            str_of(o, tags::SERIES_DESCRIPTION),
            "HER2 MAP heatmaps (research)"
        );
        assert_eq!(str_of(o, tags::SERIES_NUMBER), "9902");
        assert_eq!(str_of(o, tags::BURNED_IN_ANNOTATION), "YES");
        assert_eq!(str_of(o, tags::PHOTOMETRIC_INTERPRETATION), "RGB");
        assert_eq!(
            o.element(tags::IMAGE_LATERALITY)
                .ok()
                .map(|e| e.to_str().unwrap().to_string())
                .as_deref(),
            lat
        );
        let v = o
            .element(tags::VIEW_CODE_SEQUENCE)
            .ok()
            .map(|e| str_of(&e.items().unwrap()[0], tags::CODE_VALUE));
        assert_eq!(v.as_deref(), view);
        let src_item = &o
            .element(tags::SOURCE_IMAGE_SEQUENCE)
            .unwrap()
            .items()
            .unwrap()[0];
        assert_eq!(
            str_of(src_item, tags::REFERENCED_SOP_INSTANCE_UID),
            src.sop_instance_uid
        );
        let frame = src_item
            .element(tags::REFERENCED_FRAME_NUMBER)
            .ok()
            .map(|e| e.to_int::<u32>().unwrap());
        assert_eq!(frame, src.frame);
        let comments = str_of(o, tags::IMAGE_COMMENTS);
        assert!(
            comments.contains("NOT FOR DIAGNOSTIC USE") && comments.contains("UNVERIFIED WEIGHTS"),
            "{comments}"
        );
    }
    // Both MG heatmaps share one series in the MG study, numbered 1 and 2.
    assert_eq!(
        str_of(&scs[0].object, tags::SERIES_INSTANCE_UID),
        str_of(&scs[1].object, tags::SERIES_INSTANCE_UID)
    );
    assert_eq!(str_of(&scs[1].object, tags::INSTANCE_NUMBER), "2");
    assert_ne!(
        str_of(&scs[0].object, tags::SERIES_INSTANCE_UID),
        str_of(&scs[2].object, tags::SERIES_INSTANCE_UID)
    );
}

#[test]
fn verified_weights_carry_no_banner() {
    let mut s = settings();
    s.verified_weights_sha256 = vec!["AB".repeat(32)];
    let outs = build(&result(0.73), &[], &s);
    for o in &outs {
        if o.kind == OutputKind::HeatmapSc {
            let c = str_of(&o.object, tags::IMAGE_COMMENTS);
            assert!(!c.contains("WEIGHTS"), "{c}");
            assert!(c.contains("NOT FOR DIAGNOSTIC USE"));
        }
    }
    assert_eq!(
        her2map::report::weights_status(&result(0.1), &s),
        her2map::report::WeightsStatus::Verified
    );
    let mut demo = result(0.1);
    demo.demo = true;
    assert_eq!(
        her2map::report::weights_status(&demo, &s),
        her2map::report::WeightsStatus::Demo
    );
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let s = settings();
    let ev = evidence();
    let hm = heatmaps(&ev);
    let run = |res: &ModelResult, ev: &[SourceInstance], hm: &[Heatmap], s: &ReportSettings| {
        build_outputs(&ReportInput {
            case_id: "c",
            result: res,
            evidence: ev,
            heatmaps: hm,
            predecessors: &[],
            settings: s,
            now: datetime!(2024-02-01 12:30:00 UTC),
        })
    };
    assert!(run(&result(f32::NAN), &ev, &hm, &s).is_err());
    assert!(run(&result(1.5), &ev, &hm, &s).is_err());
    let mut r = result(0.5);
    r.branch_probs.us = Some(-0.1);
    assert!(run(&r, &ev, &hm, &s).is_err());
    assert!(matches!(
        run(&result(0.5), &[], &[], &s),
        Err(her2map::report::ReportError::NoEvidence)
    ));
    let mut bad_hm = hm.clone();
    bad_hm[0].cam.pop();
    assert!(run(&result(0.5), &ev, &bad_hm, &s).is_err());
    let mut bad_ev = ev.clone();
    bad_ev[0].sop_instance_uid = "1.2.abc".into();
    assert!(run(&result(0.5), &bad_ev, &hm, &s).is_err());
    let bad_root = ReportSettings {
        uid_root: Some("1.02.3".into()),
        ..settings()
    };
    assert!(matches!(
        run(&result(0.5), &ev, &hm, &bad_root),
        Err(her2map::report::ReportError::InvalidUidRoot(_))
    ));
    // Malformed study dates are written empty, not invalid.
    let mut odd = ev.clone();
    for e in &mut odd {
        e.study.study_date = "2024-01-10".into();
        e.study.patient_sex = "female".into();
    }
    let outs = run(&result(0.5), &odd, &[], &s).unwrap();
    assert_eq!(str_of(&outs[0].object, tags::STUDY_DATE), "");
    assert_eq!(str_of(&outs[0].object, tags::PATIENT_SEX), "");
}

#[test]
fn settings_deserialize_with_defaults_and_reject_unknown_keys() {
    let s: ReportSettings =
        serde_json::from_str(r#"{"studies": "latest", "threshold": 0.4}"#).unwrap();
    assert_eq!(s.studies, StudyPolicy::Latest);
    assert_eq!(s.threshold, 0.4);
    assert_eq!(s.device_name, "HER2MAP");
    assert_eq!(s.sr_class, her2map::report::SrClass::Comprehensive3d);
    let e: ReportSettings = serde_json::from_str(r#"{"sr_class": "enhanced"}"#).unwrap();
    assert_eq!(e.sr_class, her2map::report::SrClass::Enhanced);
    assert!(serde_json::from_str::<ReportSettings>(r#"{"treshold": 0.4}"#).is_err());
}

#[test]
fn padded_uids_are_rejected() {
    let mut ev = evidence();
    ev[0].study_instance_uid.push(' ');
    let res = result(0.5);
    let r = build_outputs(&ReportInput {
        case_id: "c",
        result: &res,
        evidence: &ev,
        heatmaps: &[],
        predecessors: &[],
        settings: &settings(),
        now: datetime!(2024-02-01 12:30:00 UTC),
    });
    assert!(matches!(
        r,
        Err(her2map::report::ReportError::InvalidInput(_))
    ));
}

#[test]
fn large_heatmap_with_demo_weights_passes_dciodvfy() {
    let ev = evidence();
    let (base, cam) = synth(1200, 960, 0.5, 0.3);
    let hm = vec![Heatmap {
        source: ev[0].clone(),
        base,
        cam,
        rows: 1200,
        cols: 960,
        label: "MG L CC".into(),
        roi: None,
    }];
    let mut res = result(0.42);
    res.demo = true;
    let s = settings();
    let outs = build_outputs(&ReportInput {
        case_id: "case-large",
        result: &res,
        evidence: &ev,
        heatmaps: &hm,
        predecessors: &[],
        settings: &s,
        now: datetime!(2024-02-01 12:30:00 UTC),
    })
    .unwrap();
    let sc = outs
        .iter()
        .find(|o| o.kind == OutputKind::HeatmapSc)
        .unwrap();
    let rows: u32 = sc.object.element(tags::ROWS).unwrap().to_int().unwrap();
    assert!(rows > 1200, "legend band below the image");
    assert!(str_of(&sc.object, tags::IMAGE_COMMENTS).contains("DEMO WEIGHTS"));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("heatmaps");
    std::fs::create_dir_all(&dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("large_demo.dcm");
    sc.object.write_to_file(&p).unwrap();
    let (errors, _w, text) = dciodvfy(&p);
    assert!(errors.is_empty(), "{text}");
    let px = sc
        .object
        .element(tags::PIXEL_DATA)
        .unwrap()
        .to_bytes()
        .unwrap();
    let img =
        image::RgbImage::from_raw(960, rows, px[..(960 * rows * 3) as usize].to_vec()).unwrap();
    img.save(dir.join("large_demo.png")).unwrap();
}

/// A plain MONOCHROME2 image with the UIDs of `src` (as many frames as its
/// frame number needs): a ramp of 500..2500 in 12 bits per frame.
fn source_image(src: &SourceInstance, rows: u32, cols: u32, path: &Path) {
    let frames = src.frame.unwrap_or(1);
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
    let mut o = InMemDicomObject::new_empty();
    let put = |o: &mut InMemDicomObject, tag, vr, v: &str| {
        o.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
    };
    put(&mut o, tags::SOP_CLASS_UID, VR::UI, &src.sop_class_uid);
    put(
        &mut o,
        tags::SOP_INSTANCE_UID,
        VR::UI,
        &src.sop_instance_uid,
    );
    put(
        &mut o,
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        &src.study_instance_uid,
    );
    put(
        &mut o,
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        &src.series_instance_uid,
    );
    put(&mut o, tags::MODALITY, VR::CS, &src.modality);
    put(
        &mut o,
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        "MONOCHROME2",
    );
    for (tag, v) in [
        (tags::SAMPLES_PER_PIXEL, 1u16),
        (tags::ROWS, rows as u16),
        (tags::COLUMNS, cols as u16),
        (tags::BITS_ALLOCATED, 16),
        (tags::BITS_STORED, 12),
        (tags::HIGH_BIT, 11),
        (tags::PIXEL_REPRESENTATION, 0),
    ] {
        o.put(DataElement::new(tag, VR::US, PrimitiveValue::from(v)));
    }
    if frames > 1 {
        put(&mut o, tags::NUMBER_OF_FRAMES, VR::IS, &frames.to_string());
    }
    let px: Vec<u16> = (0..rows * cols * frames)
        .map(|i| 500 + (2000 * (i % (rows * cols)) / (rows * cols)) as u16)
        .collect();
    o.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::U16(px.into()),
    ));
    let file = o
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax("1.2.840.10008.1.2.1")
                .media_storage_sop_class_uid(&src.sop_class_uid)
                .media_storage_sop_instance_uid(&src.sop_instance_uid),
        )
        .unwrap();
    file.write_to_file(path).unwrap();
}

/// (width, height, pixels) of a binary 8-bit PGM.
fn read_pgm(path: &Path) -> (usize, usize, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let mut fields = Vec::new();
    let mut i = 0;
    while fields.len() < 4 {
        while bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if bytes[i] == b'#' {
            while bytes[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        let start = i;
        while !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        fields.push(String::from_utf8_lossy(&bytes[start..i]).into_owned());
    }
    assert_eq!(fields[0], "P5", "binary PGM");
    let (w, h): (usize, usize) = (fields[1].parse().unwrap(), fields[2].parse().unwrap());
    let px = bytes[i + 1..].to_vec();
    assert_eq!(px.len(), w * h, "8-bit PGM");
    (w, h, px)
}

/// Each presentation state, read and applied to its image by DCMTK's dcmp2pgm,
/// carries the ROI outline where the ROI is (and nowhere well inside or
/// outside it) and the text annotation.
#[test]
fn presentation_states_draw_the_roi_outline_with_dcmp2pgm() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("gsps-out");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ev = evidence();
    let hm = heatmaps(&ev);
    let outs = build(&result(0.73), &[], &settings());
    let states: Vec<_> = outs.iter().filter(|o| o.kind == OutputKind::Gsps).collect();
    assert_eq!(
        states.len(),
        hm.len(),
        "one GSPS per heatmap source with an ROI"
    );
    for (k, (ps, h)) in states.iter().zip(&hm).enumerate() {
        let roi = h.roi.as_ref().unwrap();
        let img = dir.join(format!("image_{k}.dcm"));
        source_image(&h.source, roi.image_rows, roi.image_cols, &img);
        let ps_path = dir.join(format!("gsps_{k}.dcm"));
        ps.object.write_to_file(&ps_path).unwrap();
        let (errors, _, text) = dciodvfy(&ps_path);
        assert!(errors.is_empty(), "dciodvfy {}:\n{text}", ps_path.display());
        // dcmp2pgm renders the image through the state (displayed area, VOI,
        // presentation LUT) but burns in neither graphics nor state overlays
        // (its man page: "textual and graphical annotations will not be
        // visible"); with -v it dumps the state as DCMTK parsed it, the
        // polyline, and writes each activated overlay as ovl_*.pgm: that
        // bitmap is what is checked.
        let case_dir = dir.join(format!("render_{k}"));
        std::fs::create_dir_all(&case_dir).unwrap();
        let out = Command::new(tool("dcmp2pgm"))
            .current_dir(&case_dir)
            .arg("-v")
            .arg("--frame")
            .arg(h.source.frame.unwrap_or(1).to_string())
            .arg("--pstate")
            .arg(&ps_path)
            .arg(&img)
            .arg(case_dir.join("render.pgm"))
            .output()
            .expect("run dcmp2pgm");
        let log = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "dcmp2pgm: {log}");
        let (rw, rh, _) = read_pgm(&case_dir.join("render.pgm"));
        assert_eq!((rw as u32, rh as u32), (roi.image_cols, roi.image_rows));
        assert!(log.contains("Number of activated overlays: 1"), "{log}");
        // DCMTK 3.6.7 lists a frame's annotations only for single-frame
        // images here (it does not match Referenced Frame Number to --frame).
        if h.source.frame.is_none() {
            assert!(log.contains("type=polyline filled=no units=pixel"), "{log}");
            assert!(log.contains("HER2 MAP P(HER2+) 73.0 %"), "{log}");
        }
        let pgm = case_dir.join("ovl_0101.pgm");
        let (w, ht, px) = read_pgm(&pgm);
        assert_eq!((w as u32, ht as u32), (roi.image_cols, roi.image_rows));
        let at = |x: f32, y: f32| px[(y as usize).min(ht - 1) * w + (x as usize).min(w - 1)];
        let xs: Vec<f32> = roi.points.iter().map(|p| p.0).collect();
        let ys: Vec<f32> = roi.points.iter().map(|p| p.1).collect();
        let (x0, x1) = (
            xs.iter().cloned().fold(f32::MAX, f32::min),
            xs.iter().cloned().fold(f32::MIN, f32::max),
        );
        let (y0, y1) = (
            ys.iter().cloned().fold(f32::MAX, f32::min),
            ys.iter().cloned().fold(f32::MIN, f32::max),
        );
        let (xm, ym) = ((x0 + x1) / 2.0, (y0 + y1) / 2.0);
        // On each edge of the rectangle: white; 6 px inside and outside: not.
        for (ex, ey, nx, ny) in [
            (xm, y0, 0.0, 1.0),
            (xm, y1.min(ht as f32 - 1.0), 0.0, -1.0),
            (x0, ym, 1.0, 0.0),
            (x1.min(w as f32 - 1.0), ym, -1.0, 0.0),
        ] {
            assert_eq!(
                at(ex, ey),
                255,
                "outline at ({ex}, {ey}) in {}",
                pgm.display()
            );
            assert!(
                at(ex + 6.0 * nx, ey + 6.0 * ny) < 250,
                "inside at ({ex}, {ey})"
            );
            assert!(
                at(ex - 6.0 * nx, ey - 6.0 * ny) < 250,
                "outside at ({ex}, {ey})"
            );
        }
        let white = px.iter().filter(|&&v| v == 255).count();
        let perimeter = 2.0 * ((x1 - x0) + (y1 - y0));
        assert!(
            (white as f32) < perimeter * 3.0 + 16.0,
            "{white} white pixels: more than an outline"
        );
    }
}

/// The report card renders legibly: mostly black with text and thumbnails,
/// and passes dciodvfy; a small MRI slice gets a legend that fits.
#[test]
fn summary_card_and_small_heatmap_legend() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("report-out");
    std::fs::create_dir_all(&dir).unwrap();
    let outs = build(&result(0.73), &[], &settings());
    let cards: Vec<_> = outs
        .iter()
        .filter(|o| o.kind == OutputKind::SummarySc)
        .collect();
    assert_eq!(cards.len(), 3, "one card per study");
    assert_eq!(
        cards[0].kind.filter_name(),
        "sc",
        "the card goes where SCs go"
    );
    let png = dir.join("summary.png");
    her2map::report::sc::write_png(&cards[0].object, &png).unwrap();
    let img = image::open(&png).unwrap().to_rgb8();
    let lit = img
        .pixels()
        .filter(|p| p.0.iter().any(|&c| c > 100))
        .count();
    let frac = lit as f64 / (img.width() * img.height()) as f64;
    assert!((0.02..0.5).contains(&frac), "lit fraction {frac}");

    // A 64x64 MR slice: enlarged so the legend neither splits words nor
    // outgrows the image.
    let ev = evidence();
    let (base, cam) = synth(64, 64, 0.5, 0.5);
    let hm = vec![Heatmap {
        source: ev[3].clone(),
        base,
        cam,
        rows: 64,
        cols: 64,
        label: "MR slice 7".into(),
        roi: None,
    }];
    let res = result(0.42);
    let s = settings();
    let outs = build_outputs(&ReportInput {
        case_id: "case-small",
        result: &res,
        evidence: &ev,
        heatmaps: &hm,
        predecessors: &[],
        settings: &s,
        now: datetime!(2024-02-01 12:30:00 UTC),
    })
    .unwrap();
    let sc = outs
        .iter()
        .find(|o| o.kind == OutputKind::HeatmapSc)
        .unwrap();
    let rows: u32 = sc.object.element(tags::ROWS).unwrap().to_int().unwrap();
    let cols: u32 = sc.object.element(tags::COLUMNS).unwrap().to_int().unwrap();
    assert!(cols >= 320, "enlarged to {cols}");
    assert!(
        rows - cols < cols,
        "legend band {} vs image {cols}",
        rows - cols
    );
    her2map::report::sc::write_png(&sc.object, &dir.join("small-mr-heatmap.png")).unwrap();
}

/// `[report] outputs` makes only what it names, and an SR made without the
/// heatmaps references none of them (no dangling "Illustration of ROI");
/// the SR-only output still passes dciodvfy.
#[test]
fn report_outputs_makes_only_the_chosen_objects() {
    use her2map::report::OutputChoice;
    let kinds = |outs: &[OutputObject]| {
        let mut k: Vec<OutputKind> = outs.iter().map(|o| o.kind).collect();
        k.dedup();
        k
    };
    let all = build(&result(0.73), &[], &settings());
    assert_eq!(
        kinds(&all),
        [
            OutputKind::Sr,
            OutputKind::HeatmapSc,
            OutputKind::SummarySc,
            OutputKind::Gsps
        ]
    );
    let heatmap_uids: Vec<&str> = all
        .iter()
        .filter(|o| o.kind == OutputKind::HeatmapSc)
        .map(|o| o.sop_instance_uid.as_str())
        .collect();
    let sr_text = |outs: &[OutputObject], dir: &Path| -> String {
        let sr = outs.iter().find(|o| o.kind == OutputKind::Sr).unwrap();
        let p = dir.join("sr.dcm");
        sr.object.write_to_file(&p).unwrap();
        String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned()
    };
    let dir = tempfile::tempdir().unwrap();
    let full = sr_text(&all, dir.path());
    assert!(
        heatmap_uids.iter().all(|u| full.contains(u)),
        "the full SR references its heatmaps"
    );

    let only = |choices: &[OutputChoice]| ReportSettings {
        outputs: choices.to_vec(),
        ..settings()
    };
    let sr_only = build(&result(0.73), &[], &only(&[OutputChoice::Sr]));
    assert_eq!(kinds(&sr_only), [OutputKind::Sr]);
    let text = sr_text(&sr_only, dir.path());
    assert!(
        heatmap_uids.iter().all(|u| !text.contains(u)),
        "an SR without heatmaps points at none"
    );
    let (errors, _, report) = dciodvfy(&dir.path().join("sr.dcm"));
    assert!(errors.is_empty(), "{report}");

    let two = build(
        &result(0.73),
        &[],
        &only(&[OutputChoice::Summary, OutputChoice::Gsps]),
    );
    assert_eq!(kinds(&two), [OutputKind::SummarySc, OutputKind::Gsps]);
}
