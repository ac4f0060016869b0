//! The SR's per-image measurement groups (PS3.16 TID 1410 "Planar ROI
//! Measurements and Qualitative Evaluations"): one group per source image the
//! model used (MG CC and MLO, the US image, the MRI key slices shown in the
//! heatmaps), each the index lesion as seen on that image: the ROI as a closed
//! POLYLINE SCOORD selected from the image, the algorithm (TID 4019), P(HER2+)
//! and every branch score as NUM items, the HER2 status, the modalities used
//! and missing, the ROI methods and a reference to the heatmap SC of the
//! image. It owns no other part of the SR tree.
//!
//! Why every group carries the whole result and has an SCOORD: OHIF 3.13's
//! cornerstone-dicom-sr (`_checkIfCanAddMeasurementsToDisplaySet`) reads
//! `coords[0]` of every group of Imaging Measurements and throws on a group
//! without spatial coordinates (a plain TID 1501 group), which leaves its SR
//! viewport black; and that viewport opens on the first group, so the groups
//! of the SR's own study come first (see `docs/report.md`).
//!
//! Tracking identifiers are plain text ("HER2 MAP ROI MG L CC"), not OHIF's
//! `Cornerstone3DTools@^0.1.0:<Tool>` form: a standard reader gets a TID 1410 group,
//! OHIF shows it read-only in its SR viewport.

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

/// One TID 1410 group per heatmap source with an ROI: those of `study` (the
/// SR's own study) first, then the others, each in input order.
pub(crate) fn roi_groups(prep: &Prepared, study: &str) -> Result<Vec<Item>, ReportError> {
    let own = |h: &Heatmap| h.source.study_instance_uid.trim() == study.trim();
    let (mine, others): (Vec<_>, Vec<_>) = with_roi(prep).partition(|(_, h)| own(h));
    mine.into_iter()
        .chain(others)
        .map(|(i, h)| roi_group(prep, i, h))
        .collect()
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
    group
        .children
        .extend(super::sr::probabilities(input.result));
    group.children.extend(super::sr::interpretation(prep));
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
