//! End-to-end: synthetic patient → prepare_case → model inputs.
use std::path::PathBuf;

use crate::common;

use her2map::imaging::{
    ClinicalSource, ImagingSettings, InputGrid, Laterality, Modality, SideBasis, SideSetting,
    SourceGeometry, prepare_case, prepare_case_sides,
};
use her2map::synth::{SynthOptions, SynthSummary, write_synthetic_patient};

fn all_files(s: &SynthSummary) -> Vec<PathBuf> {
    s.studies.iter().flat_map(|st| st.files.clone()).collect()
}

fn synth(opts: &SynthOptions) -> (tempfile::TempDir, SynthSummary) {
    let dir = tempfile::tempdir().unwrap();
    let s = write_synthetic_patient(dir.path(), opts).unwrap();
    (dir, s)
}

#[test]
fn synthetic_patient_is_prepared() {
    let (_dir, s) = synth(&SynthOptions::default());
    assert!(
        s.total_bytes < 8_000_000,
        "small patient is {} bytes",
        s.total_bytes
    );
    let grid = InputGrid { mri: 32, image: 64 };
    let mut settings = ImagingSettings::default();
    settings.clinical[1] = ClinicalSource::constant(1.5);
    let case = prepare_case(&all_files(&s), &settings, grid);
    assert!(case.errors.is_empty(), "{:?}", case.errors);

    // Side from US laterality.
    assert_eq!(case.lesion_side.side, Some(Laterality::Right));
    assert_eq!(case.lesion_side.basis, SideBasis::UltrasoundLaterality);

    // Shapes and ranges.
    let mri = case.mri.as_ref().expect("mri");
    assert_eq!(mri.shape, [32, 32, 32]);
    assert_eq!(mri.data.len(), 32 * 32 * 32);
    assert!(mri.data.iter().all(|v| (-1.0..=1.0).contains(v)));
    let us = case.us.as_ref().expect("us");
    assert_eq!(us.data.len(), 64 * 64);
    assert!(us.data.iter().all(|v| (0.0..=1.0).contains(v)));
    let mg = case.mg.as_ref().expect("mg");
    assert_eq!(mg.data.len(), 4 * 64 * 64);
    assert!(mg.data.iter().all(|v| (0.0..=1.0).contains(v)));
    assert_eq!(case.modalities().model_flags(), [true, true, true]);

    // MG: R CC then R MLO, crops by the image-derived provider.
    let roles: Vec<&str> = case
        .selections
        .iter()
        .filter(|s| s.modality == Modality::MG)
        .map(|s| s.role.as_str())
        .collect();
    assert_eq!(roles, ["CC", "CC crop", "MLO", "MLO crop"]);
    for (k, role) in ["CC crop", "MLO crop"].iter().enumerate() {
        let sel = case.selections.iter().find(|s| s.role == *role).unwrap();
        assert_eq!(sel.roi_provider, "mg-blob", "{role}");
        let SourceGeometry::Planar { crop, .. } = sel.geometry else {
            panic!()
        };
        let (lx, ly) = s.mg_lesion_px[k];
        assert!(
            crop[0] <= lx && lx <= crop[2] && crop[1] <= ly && ly <= crop[3],
            "{role}: {crop:?} vs {lx},{ly}"
        );
    }
    // The crop channel is brighter in its centre (the lesion) than the whole view.
    let n = 64;
    let centre_mean = |c: usize| {
        let mut acc = 0.0;
        for y in 24..40 {
            for x in 24..40 {
                acc += mg.data[c * n * n + y * n + x];
            }
        }
        acc / 256.0
    };
    assert!(centre_mean(2) > 0.6, "CC crop centre {}", centre_mean(2));

    // US: the Doppler image is skipped, first B-mode image used, region crop.
    let us_sel = case
        .selections
        .iter()
        .find(|s| s.modality == Modality::US)
        .unwrap();
    assert_eq!(us_sel.roi_provider, "us-region");
    assert!(
        case.notes.iter().any(|n| n.contains("colour-dominant")),
        "{:?}",
        case.notes
    );

    // MR: P2 = third temporal position = series number 3 ("DCE post 2").
    let mr_sel = case
        .selections
        .iter()
        .find(|s| s.role.starts_with("MR post"))
        .unwrap();
    assert_eq!(mr_sel.role, "MR post-contrast 2");
    assert_eq!(mr_sel.sop_instance_uids.len(), 24);
    assert_eq!(mr_sel.roi_provider, "mri-enhancement");
    let mr_files: Vec<&PathBuf> = s.studies[2]
        .files
        .iter()
        .filter(|p| p.to_string_lossy().contains("MR_p2_"))
        .collect();
    assert_eq!(mr_files.len(), 24);
    let SourceGeometry::Volume {
        box_center_mm,
        box_side_mm,
        ..
    } = mr_sel.geometry
    else {
        panic!()
    };
    for a in 0..3 {
        assert!(
            (box_center_mm[a] - s.mr_lesion_center_mm[a]).abs() < 8.0,
            "{box_center_mm:?} vs {:?}",
            s.mr_lesion_center_mm
        );
    }
    assert!(box_side_mm >= 64.0);
    assert!(
        case.selections
            .iter()
            .any(|s| s.role == "MR pre-contrast (subtraction)")
    );
    // The lesion (centre of the crop) is brighter than the crop on average.
    let m = 32;
    let mut centre = 0.0;
    for z in 14..18 {
        for y in 14..18 {
            for x in 14..18 {
                centre += mri.data[(z * m + y) * m + x];
            }
        }
    }
    centre /= 64.0;
    let mean: f32 = mri.data.iter().sum::<f32>() / mri.data.len() as f32;
    assert!(centre > mean + 0.5, "centre {centre} mean {mean}");

    // Clinical: PatientAge 054Y → 54, constant 1.5, rest missing.
    assert_eq!(case.clinical[0], 54.0);
    assert_eq!(case.clinical[1], 1.5);
    assert_eq!(case.clinical_missing, [false, false, true, true, true]);
}

#[test]
fn gsps_annotation_is_used_and_side_unknown_runs_both() {
    let opts = SynthOptions {
        lesion_side: Laterality::Left,
        with_annotation: true,
        us_laterality: false,
        seed: 7,
        ..Default::default()
    };
    let (_dir, s) = synth(&opts);
    let grid = InputGrid { mri: 16, image: 32 };
    let settings = ImagingSettings::default();
    let files = all_files(&s);
    // Side unknown: no guess, no MG in the single case.
    let single = prepare_case(&files, &settings, grid);
    assert_eq!(single.lesion_side.side, None);
    assert!(single.mg.is_none());
    assert!(
        single
            .notes
            .iter()
            .any(|n| n.contains("lesion side unknown"))
    );
    // Both sides.
    let both = prepare_case_sides(&files, &settings, grid);
    assert_eq!(both.len(), 2);
    assert_eq!(both[0].lesion_side.side, Some(Laterality::Left));
    assert_eq!(both[1].lesion_side.side, Some(Laterality::Right));
    assert!(
        both.iter()
            .all(|c| c.lesion_side.basis == SideBasis::BothSidesRun && c.mg.is_some())
    );
    // The two runs share one MRI decode: each side's volume is still the
    // one a run with that side configured gets, and the sides differ.
    for (case, side) in both.iter().zip([SideSetting::Left, SideSetting::Right]) {
        let configured = ImagingSettings {
            lesion_side: side,
            ..Default::default()
        };
        let alone = prepare_case(&files, &configured, grid);
        let volume = case.mri.as_ref().expect("MRI prepared");
        assert_eq!(Some(&volume.data), alone.mri.as_ref().map(|v| &v.data));
    }
    assert_ne!(
        both[0].mri.as_ref().unwrap().data,
        both[1].mri.as_ref().unwrap().data
    );
    // Left run: the CC crop comes from the GSPS circle.
    let cc = both[0]
        .selections
        .iter()
        .find(|s| s.role == "CC crop")
        .unwrap();
    assert_eq!(cc.roi_provider, "dicom-annotation");
    // Configured side.
    let configured = ImagingSettings {
        lesion_side: her2map::imaging::SideSetting::Left,
        ..Default::default()
    };
    let c = prepare_case(&files, &configured, grid);
    assert_eq!(c.lesion_side.basis, SideBasis::Configuration);
    assert!(c.mg.is_some());
}

#[test]
fn phase_choice_and_missing_phases() {
    let (_dir, s) = synth(&SynthOptions {
        mr_phases: 3,
        ..Default::default()
    });
    let grid = InputGrid { mri: 16, image: 32 };
    let settings = ImagingSettings {
        mri_post_contrast_phase: 4,
        ..Default::default()
    };
    let case = prepare_case(&all_files(&s), &settings, grid);
    let mr = case
        .selections
        .iter()
        .find(|s| s.role.starts_with("MR post"))
        .unwrap();
    assert_eq!(mr.role, "MR post-contrast 2");
    assert!(
        case.notes.iter().any(|n| n.contains("only 2 present")),
        "{:?}",
        case.notes
    );
}

/// Every file of the synthetic patient is a conformant instance of its IOD
/// (dicom3tools' dciodvfy reports no error), like what a modality sends.
#[test]
fn synthetic_patient_passes_dciodvfy() {
    let (_dir, s) = synth(&SynthOptions::default());
    let files = all_files(&s);
    assert!(files.len() > 50);
    for f in files {
        let (errors, _, text) = common::dciodvfy(&f);
        assert!(errors.is_empty(), "{f:?}:\n{text}");
    }
}

#[test]
fn synth_is_deterministic() {
    let (_a, s1) = synth(&SynthOptions::default());
    let (_b, s2) = synth(&SynthOptions::default());
    for (f1, f2) in all_files(&s1).iter().zip(all_files(&s2)) {
        assert_eq!(
            std::fs::read(f1).unwrap(),
            std::fs::read(&f2).unwrap(),
            "{f1:?}"
        );
    }
}

#[test]
fn corrupt_file_is_a_per_instance_error() {
    let (dir, s) = synth(&SynthOptions::default());
    let mut files = all_files(&s);
    // Truncate one US B-mode image's pixel data and add a non-DICOM file.
    let victim = files
        .iter()
        .find(|p| p.to_string_lossy().contains("US_02"))
        .unwrap()
        .clone();
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() - 5000]).unwrap();
    let junk = dir.path().join("junk.dcm");
    std::fs::write(&junk, b"not dicom at all").unwrap();
    files.push(junk.clone());
    let case = prepare_case(
        &files,
        &ImagingSettings::default(),
        InputGrid { mri: 16, image: 32 },
    );
    assert!(
        case.errors
            .iter()
            .any(|e| e.file == junk && e.sop_instance_uid.is_none())
    );
    assert!(
        case.errors
            .iter()
            .any(|e| e.file == victim && e.sop_instance_uid.is_some()),
        "{:?}",
        case.errors
    );
    // The next B-mode image is used instead.
    assert!(case.us.is_some());
    assert!(case.mg.is_some() && case.mri.is_some());
}

#[test]
fn enhanced_mr_per_frame_functional_groups() {
    let (_dir, s) = synth(&SynthOptions {
        mr_enhanced: true,
        ..Default::default()
    });
    assert_eq!(s.studies[2].files.len(), 1, "one Enhanced MR instance");
    let case = prepare_case(
        &all_files(&s),
        &ImagingSettings::default(),
        InputGrid { mri: 32, image: 32 },
    );
    assert!(case.errors.is_empty(), "{:?}", case.errors);
    let mri = case.mri.as_ref().expect("mri from enhanced MR");
    let mr = case
        .selections
        .iter()
        .find(|s| s.role.starts_with("MR post"))
        .unwrap();
    assert_eq!(mr.role, "MR post-contrast 2");
    assert_eq!(mr.roi_provider, "mri-enhancement");
    // Phase P2 = temporal position index 3 = frames 48..72 (0-based), in order.
    let SourceGeometry::Volume {
        frames,
        box_center_mm,
        ..
    } = &mr.geometry
    else {
        panic!()
    };
    assert_eq!(frames, &(48..72).collect::<Vec<u32>>());
    for (c, l) in box_center_mm.iter().zip(s.mr_lesion_center_mm) {
        assert!((c - l).abs() < 8.0);
    }
    assert!(
        case.notes.iter().any(|n| n.contains("earliest phase")),
        "{:?}",
        case.notes
    );
    assert!(mri.data.iter().all(|v| (-1.0..=1.0).contains(v)));
}

/// The heatmap backgrounds imaging keeps (MG whole views, the US image) are
/// exactly what decoding the source frame again would give, so reporting can
/// use them instead; with another VOI window none is kept.
#[test]
fn kept_heatmap_bases_match_a_fresh_decode() {
    use her2map::imaging::{VoiWindowChoice, decode, heatmap_base, read_instance_meta};
    let (_dir, s) = synth(&SynthOptions::default());
    let files = all_files(&s);
    let paths: std::collections::HashMap<String, PathBuf> = files
        .iter()
        .filter_map(|p| {
            read_instance_meta(p)
                .ok()
                .map(|m| (m.sop_instance, p.clone()))
        })
        .collect();
    let grid = InputGrid { mri: 32, image: 64 };
    let case = prepare_case(&files, &ImagingSettings::default(), grid);
    let kept: Vec<_> = case
        .selections
        .iter()
        .filter_map(|s| s.heatmap_base.as_ref().map(|b| (s, b)))
        .collect();
    let roles: Vec<&str> = kept.iter().map(|(s, _)| s.role.as_str()).collect();
    assert_eq!(roles, ["CC", "MLO", "US"]);
    for (sel, base) in kept {
        let SourceGeometry::Planar { frame, .. } = sel.geometry else {
            panic!()
        };
        let obj = dicom_object::open_file(&paths[&sel.sop_instance_uids[0]]).unwrap();
        let fresh =
            heatmap_base(&decode::decode_gray(&obj, frame, VoiWindowChoice::First).unwrap());
        assert_eq!(fresh.image, base.image, "{}", sel.role);
        assert_eq!(fresh.scale, base.scale, "{}", sel.role);
    }

    let settings = ImagingSettings {
        voi_window: VoiWindowChoice::Widest,
        ..Default::default()
    };
    let case = prepare_case(&files, &settings, grid);
    assert!(case.selections.iter().all(|s| s.heatmap_base.is_none()));
}
