//! The SR's per-image measurement groups (PS3.16 TID 1410 "Planar ROI
//! Measurements and Qualitative Evaluations"): one group per source image the
//! model used (MG CC and MLO, the US image, the MRI key slices shown in the
//! heatmaps), each with the ROI as a closed POLYLINE SCOORD selected from that
//! image, the HER2 probabilities as NUM items, the HER2 status and a reference to
//! the heatmap SC of the image. This is what viewers draw (OHIF's
//! cornerstone-dicom-sr draws a group only when it holds an SCOORD); it owns no
//! other part of the SR tree.
//!
//! Tracking identifiers are plain text ("HER2 MAP ROI MG L CC"), not OHIF's
//! `Cornerstone3DTools@^0.1.0:<Tool>` form: a standard reader gets a TID 1410 group,
//! OHIF shows it read-only in its SR viewport (see `docs/report.md`).

use super::codes;
use super::ds::InstanceRef;
use super::sr::{CONTAINS, Item, SELECTED_FROM, Value};
use super::{Heatmap, OutputChoice, Prepared, ReportError, SECONDARY_CAPTURE};

/// Indices of the heatmaps with an ROI, in input order: one group each.
fn with_roi<'a>(prep: &Prepared<'a>) -> impl Iterator<Item = (usize, &'a Heatmap)> + use<'a> {
    let heatmaps: &'a [Heatmap] = prep.input.heatmaps;
    heatmaps
        .iter()
        .enumerate()
        .filter(|(_, h)| h.roi.as_ref().is_some_and(|r| r.points.len() >= 3))
}

/// The heatmap SC instances the groups reference (none when heatmaps are
/// not made).
pub(crate) fn referenced_heatmaps(prep: &Prepared) -> Result<Vec<InstanceRef>, ReportError> {
    if !prep.input.settings.makes(OutputChoice::Heatmaps) {
        return Ok(Vec::new());
    }
    with_roi(prep)
        .map(|(i, h)| {
            let study = h.source.study_instance_uid.trim();
            Ok(InstanceRef {
                study_instance_uid: study.to_string(),
                series_instance_uid: prep.uid("sc-series", study, 0)?,
                sop_class_uid: SECONDARY_CAPTURE.to_string(),
                sop_instance_uid: super::heatmap_uid(prep, i)?,
            })
        })
        .collect()
}

/// One TID 1410 group per heatmap source with an ROI.
pub(crate) fn roi_groups(prep: &Prepared) -> Result<Vec<Item>, ReportError> {
    with_roi(prep).map(|(i, h)| roi_group(prep, i, h)).collect()
}

fn roi_group(prep: &Prepared, i: usize, h: &Heatmap) -> Result<Item, ReportError> {
    let input = prep.input;
    let roi = h.roi.as_ref().expect("filtered on roi");
    let src = &h.source;
    let frame = src.frame.unwrap_or(0).to_string();
    let tracking_uid = super::uid::derive_uid(
        input.settings.uid_root.as_deref(),
        &[
            input.case_id,
            "roi-tracking-uid",
            src.sop_instance_uid.trim(),
            &frame,
        ],
    )?;
    let label = if h.label.trim().is_empty() {
        codes::normalize_modality(&src.modality)
    } else {
        h.label.trim().to_string()
    };
    let mut group = super::sr::lesion_group(
        format!("HER2 MAP ROI {label}"),
        tracking_uid,
        src.laterality.as_deref(),
    );
    group
        .children
        .extend(super::sr::algorithm_identification(prep));
    group.children.push(image_region(h, roi));
    group.children.extend(scores(prep, h));
    group.children.push(Item::text(
        CONTAINS,
        codes::P_ROI_METHOD,
        format!(
            "{}: {}",
            codes::normalize_modality(&src.modality),
            roi.method.trim()
        ),
    ));
    if input.settings.makes(OutputChoice::Heatmaps) {
        group.children.push(Item::new(
            CONTAINS,
            Some(codes::ILLUSTRATION_OF_ROI),
            Value::Image {
                class: SECONDARY_CAPTURE.to_string(),
                inst: super::heatmap_uid(prep, i)?,
                frame: None,
            },
        ));
    }
    Ok(group)
}

/// The ROI as a closed POLYLINE (first point repeated last, PS3.3
/// §C.18.6.1.2), selected from the source image (and frame).
fn image_region(h: &Heatmap, roi: &super::Roi) -> Item {
    let mut data: Vec<f32> = roi.points.iter().flat_map(|&(x, y)| [x, y]).collect();
    if let Some(&(x, y)) = roi.points.first() {
        data.extend([x, y]);
    }
    Item::new(
        CONTAINS,
        Some(codes::IMAGE_REGION),
        Value::Scoord {
            graphic_type: "POLYLINE",
            data,
        },
    )
    .with(Item::new(
        SELECTED_FROM,
        None,
        Value::Image {
            class: h.source.sop_class_uid.trim().to_string(),
            inst: h.source.sop_instance_uid.trim().to_string(),
            frame: h.source.frame,
        },
    ))
}

/// P(HER2-positive), this modality's branch score and the HER2 status.
fn scores(prep: &Prepared, h: &Heatmap) -> Vec<Item> {
    let r = prep.input.result;
    let mut items = vec![Item::num(codes::P_HER2_PROBABILITY, r.prob as f64)];
    let branch = match codes::normalize_modality(&h.source.modality).as_str() {
        "MG" => r.branch_probs.mg.map(|p| (codes::P_HER2_PROBABILITY_MG, p)),
        "US" => r.branch_probs.us.map(|p| (codes::P_HER2_PROBABILITY_US, p)),
        "MR" => r
            .branch_probs
            .mri
            .map(|p| (codes::P_HER2_PROBABILITY_MR, p)),
        _ => None,
    };
    if let Some((code, p)) = branch {
        items.push(Item::num(code, p as f64));
    }
    let status = if r.prob >= prep.input.settings.threshold {
        codes::POSITIVE
    } else {
        codes::NEGATIVE
    };
    items.push(Item::code(CONTAINS, codes::HER2_INTERPRETATION, status));
    items
}
