//! Grayscale Softcopy Presentation States (PS3.3 §A.33.1): one per source image
//! with an ROI, referencing that image (and frame), with the ROI outline as a
//! closed POLYLINE graphic and a short text annotation on one graphic layer
//! (§C.10.5, §C.10.7), so that workstations that apply presentation states draw
//! the region on the radiologist's own image.
//!
//! The same outline is also carried as a graphics overlay plane (§C.9.2, group
//! 6000, activated on that layer by §C.11.7): renderers that apply a state's
//! overlays but not its graphics (DCMTK's `dcmp2pgm`, older PACS) still show it.
//! This module owns only the presentation state objects.

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;

use super::ds::{self, Obj};
use super::{
    GRAYSCALE_SOFTCOPY_PS, GSPS_SERIES_DESCRIPTION, GSPS_SERIES_NUMBER, Heatmap, OutputKind,
    OutputObject, Prepared, ReportError, Roi,
};

/// The graphic layer of the outline, the text and the overlay.
const LAYER: &str = "HER2MAP";
/// Overlay Rows / Columns / Type / Origin / Bits Allocated / Bit Position / Data
/// and Description, group 6000 (PS3.3 §C.9.2).
const OVERLAY_ROWS: Tag = Tag(0x6000, 0x0010);
const OVERLAY_COLUMNS: Tag = Tag(0x6000, 0x0011);
const OVERLAY_DESCRIPTION: Tag = Tag(0x6000, 0x0022);
const OVERLAY_TYPE: Tag = Tag(0x6000, 0x0040);
const OVERLAY_ORIGIN: Tag = Tag(0x6000, 0x0050);
const OVERLAY_BITS_ALLOCATED: Tag = Tag(0x6000, 0x0100);
const OVERLAY_BIT_POSITION: Tag = Tag(0x6000, 0x0102);
const OVERLAY_ACTIVATION_LAYER: Tag = Tag(0x6000, 0x1001);
const OVERLAY_DATA: Tag = Tag(0x6000, 0x3000);

/// The annotation text of every presentation state.
pub(crate) fn annotation_text(prep: &Prepared) -> String {
    let r = prep.input.result;
    let status = if r.prob >= prep.input.settings.threshold {
        "positive"
    } else {
        "negative"
    };
    let mut t = format!(
        "HER2 MAP P(HER2+) {} ({status}) - research, not for diagnostic use",
        super::percent(r.prob)
    );
    if let Some(b) = prep.weights.banner() {
        t.push_str(" - ");
        t.push_str(b);
    }
    t
}

/// One presentation state per heatmap source with an ROI, numbered within
/// its study.
pub(crate) fn build_presentation_states(prep: &Prepared) -> Result<Vec<OutputObject>, ReportError> {
    let mut out = Vec::new();
    for h in prep.input.heatmaps {
        let Some(roi) = h.roi.as_ref().filter(|r| r.points.len() >= 3) else {
            continue;
        };
        let study = h.source.study_instance_uid.trim();
        let index = out
            .iter()
            .filter(|o: &&OutputObject| o.study_instance_uid == study)
            .count();
        let sop_uid = prep.uid("gsps", study, index)?;
        let o = presentation_state(prep, h, roi, index, &sop_uid)?;
        out.push(OutputObject {
            kind: OutputKind::Gsps,
            study_instance_uid: study.to_string(),
            sop_class_uid: GRAYSCALE_SOFTCOPY_PS.to_string(),
            sop_instance_uid: sop_uid,
            object: super::finish(o)?,
        });
    }
    Ok(out)
}

fn presentation_state(
    prep: &Prepared,
    h: &Heatmap,
    roi: &Roi,
    index: usize,
    sop_uid: &str,
) -> Result<Obj, ReportError> {
    let input = prep.input;
    let study = h.source.study_instance_uid.trim();
    let attrs = prep.studies.get(study).copied().unwrap_or(&h.source.study);
    let (d, t, _) = super::da_tm(input.now);
    let mut o = Obj::new_empty();
    super::put_sop_common(&mut o, GRAYSCALE_SOFTCOPY_PS, sop_uid, input.now);
    super::put_patient_study(&mut o, study, attrs);
    // General Series + Presentation Series (PS3.3 §C.11.9: Modality PR).
    super::put_series(
        &mut o,
        "PR",
        &prep.uid("gsps-series", study, 0)?,
        GSPS_SERIES_NUMBER,
        &d,
        &t,
        GSPS_SERIES_DESCRIPTION,
    );
    // Laterality (General Series, Type 2C; breast is paired): the source's, or
    // zero length when unknown.
    match h
        .source
        .laterality
        .as_deref()
        .and_then(super::codes::laterality_letter)
    {
        Some(l) => ds::put_str(&mut o, tags::LATERALITY, VR::CS, l),
        None => ds::put_empty(&mut o, tags::LATERALITY, VR::CS),
    }
    super::put_equipment(&mut o, input.settings, input.result);

    // Presentation State Identification (§C.11.10).
    ds::put_str(
        &mut o,
        tags::INSTANCE_NUMBER,
        VR::IS,
        &(index + 1).to_string(),
    );
    ds::put_str(&mut o, tags::CONTENT_LABEL, VR::CS, "HER2MAP_ROI");
    ds::put_str(
        &mut o,
        tags::CONTENT_DESCRIPTION,
        VR::LO,
        "HER2 MAP region of interest (research)",
    );
    ds::put_str(&mut o, tags::PRESENTATION_CREATION_DATE, VR::DA, &d);
    ds::put_str(&mut o, tags::PRESENTATION_CREATION_TIME, VR::TM, &t);
    ds::put_empty(&mut o, tags::CONTENT_CREATOR_NAME, VR::PN);

    // Presentation State Relationship (§C.11.11).
    let mut series = Obj::new_empty();
    ds::put_str(
        &mut series,
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        h.source.series_instance_uid.trim(),
    );
    ds::put_seq(
        &mut series,
        tags::REFERENCED_IMAGE_SEQUENCE,
        vec![image_ref(h)],
    );
    ds::put_seq(&mut o, tags::REFERENCED_SERIES_SEQUENCE, vec![series]);

    put_displayed_area(&mut o, roi);
    put_annotation(&mut o, prep, h, roi);
    put_overlay(&mut o, roi)?;
    put_luts(&mut o, roi);
    super::set_charset(&mut o);
    Ok(o)
}

/// A Referenced Image Sequence item for the source (and frame).
fn image_ref(h: &Heatmap) -> Obj {
    let mut r = Obj::new_empty();
    ds::put_str(
        &mut r,
        tags::REFERENCED_SOP_CLASS_UID,
        VR::UI,
        h.source.sop_class_uid.trim(),
    );
    ds::put_str(
        &mut r,
        tags::REFERENCED_SOP_INSTANCE_UID,
        VR::UI,
        h.source.sop_instance_uid.trim(),
    );
    if let Some(f) = h.source.frame {
        ds::put_str(
            &mut r,
            tags::REFERENCED_FRAME_NUMBER,
            VR::IS,
            &f.to_string(),
        );
    }
    r
}

/// Displayed Area (§C.10.4): the whole image, scaled to fit.
fn put_displayed_area(o: &mut Obj, roi: &Roi) {
    let mut area = Obj::new_empty();
    area.put(DataElement::new(
        tags::DISPLAYED_AREA_TOP_LEFT_HAND_CORNER,
        VR::SL,
        PrimitiveValue::I32(vec![1i32, 1].into()),
    ));
    area.put(DataElement::new(
        tags::DISPLAYED_AREA_BOTTOM_RIGHT_HAND_CORNER,
        VR::SL,
        PrimitiveValue::I32(vec![roi.image_cols as i32, roi.image_rows as i32].into()),
    ));
    ds::put_str(
        &mut area,
        tags::PRESENTATION_SIZE_MODE,
        VR::CS,
        "SCALE TO FIT",
    );
    ds::put_strs(
        &mut area,
        tags::PRESENTATION_PIXEL_ASPECT_RATIO,
        VR::IS,
        &["1", "1"],
    );
    ds::put_seq(o, tags::DISPLAYED_AREA_SELECTION_SEQUENCE, vec![area]);
}

fn fl(v: Vec<f32>) -> PrimitiveValue {
    PrimitiveValue::F32(v.into())
}

/// Graphic Annotation (§C.10.5) and Graphic Layer (§C.10.7): the closed
/// outline and the text just above it (below it when the ROI touches the top).
fn put_annotation(o: &mut Obj, prep: &Prepared, h: &Heatmap, roi: &Roi) {
    let mut data: Vec<f32> = roi.points.iter().flat_map(|&(x, y)| [x, y]).collect();
    data.extend([roi.points[0].0, roi.points[0].1]);
    let mut graphic = Obj::new_empty();
    ds::put_str(
        &mut graphic,
        tags::GRAPHIC_ANNOTATION_UNITS,
        VR::CS,
        "PIXEL",
    );
    ds::put_u16(&mut graphic, tags::GRAPHIC_DIMENSIONS, 2);
    ds::put_u16(
        &mut graphic,
        tags::NUMBER_OF_GRAPHIC_POINTS,
        (data.len() / 2) as u16,
    );
    graphic.put(DataElement::new(tags::GRAPHIC_DATA, VR::FL, fl(data)));
    ds::put_str(&mut graphic, tags::GRAPHIC_TYPE, VR::CS, "POLYLINE");
    ds::put_str(&mut graphic, tags::GRAPHIC_FILLED, VR::CS, "N");

    let (x0, y0, x1, y1) = bounds(roi);
    let (rows, cols) = (roi.image_rows as f32, roi.image_cols as f32);
    let text_h = (rows / 20.0).max(8.0);
    let (ty0, ty1) = if y0 >= text_h {
        (y0 - text_h, y0)
    } else {
        (y1.min(rows - text_h).max(0.0), (y1 + text_h).min(rows))
    };
    let tx1 = (x0 + (x1 - x0).max(cols / 2.0)).min(cols);
    let tx0 = x0.min(tx1 - 1.0).max(0.0);
    let mut text = Obj::new_empty();
    ds::put_str(
        &mut text,
        tags::BOUNDING_BOX_ANNOTATION_UNITS,
        VR::CS,
        "PIXEL",
    );
    ds::put_str(
        &mut text,
        tags::UNFORMATTED_TEXT_VALUE,
        VR::ST,
        &annotation_text(prep),
    );
    text.put(DataElement::new(
        tags::BOUNDING_BOX_TOP_LEFT_HAND_CORNER,
        VR::FL,
        fl(vec![tx0, ty0]),
    ));
    text.put(DataElement::new(
        tags::BOUNDING_BOX_BOTTOM_RIGHT_HAND_CORNER,
        VR::FL,
        fl(vec![tx1, ty1]),
    ));
    ds::put_str(
        &mut text,
        tags::BOUNDING_BOX_TEXT_HORIZONTAL_JUSTIFICATION,
        VR::CS,
        "LEFT",
    );

    let mut ann = Obj::new_empty();
    ds::put_seq(
        &mut ann,
        tags::REFERENCED_IMAGE_SEQUENCE,
        vec![image_ref(h)],
    );
    ds::put_str(&mut ann, tags::GRAPHIC_LAYER, VR::CS, LAYER);
    ds::put_seq(&mut ann, tags::TEXT_OBJECT_SEQUENCE, vec![text]);
    ds::put_seq(&mut ann, tags::GRAPHIC_OBJECT_SEQUENCE, vec![graphic]);
    ds::put_seq(o, tags::GRAPHIC_ANNOTATION_SEQUENCE, vec![ann]);

    let mut layer = Obj::new_empty();
    ds::put_str(&mut layer, tags::GRAPHIC_LAYER, VR::CS, LAYER);
    ds::put_str(&mut layer, tags::GRAPHIC_LAYER_ORDER, VR::IS, "1");
    ds::put_u16(
        &mut layer,
        tags::GRAPHIC_LAYER_RECOMMENDED_DISPLAY_GRAYSCALE_VALUE,
        0xFFFF,
    );
    ds::put_str(
        &mut layer,
        tags::GRAPHIC_LAYER_DESCRIPTION,
        VR::LO,
        "HER2 MAP region of interest",
    );
    ds::put_seq(o, tags::GRAPHIC_LAYER_SEQUENCE, vec![layer]);
}

/// (x0, y0, x1, y1) of the ROI polygon, clamped to the image.
pub fn bounds(roi: &Roi) -> (f32, f32, f32, f32) {
    let (mut x0, mut y0, mut x1, mut y1) = (f32::MAX, f32::MAX, f32::MIN, f32::MIN);
    for &(x, y) in &roi.points {
        x0 = x0.min(x);
        y0 = y0.min(y);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    let (c, r) = (roi.image_cols as f32, roi.image_rows as f32);
    (
        x0.clamp(0.0, c),
        y0.clamp(0.0, r),
        x1.clamp(0.0, c),
        y1.clamp(0.0, r),
    )
}

/// The outline as a bitmap of `rows x cols`, `width` pixels wide inwards.
pub fn outline_bitmap(roi: &Roi) -> Vec<bool> {
    let (rows, cols) = (roi.image_rows as usize, roi.image_cols as usize);
    let mut bits = vec![false; rows * cols];
    let width = (rows.min(cols) / 200).max(1) as i64;
    let n = roi.points.len();
    for k in 0..n {
        let (ax, ay) = roi.points[k];
        let (bx, by) = roi.points[(k + 1) % n];
        let steps = ((bx - ax).abs().max((by - ay).abs()).ceil() as usize).max(1);
        for s in 0..=steps {
            let f = s as f32 / steps as f32;
            let (x, y) = (ax + (bx - ax) * f, ay + (by - ay) * f);
            let (px, py) = (x.floor() as i64, y.floor() as i64);
            for dy in -width / 2..=(width - 1) / 2 + (width > 1) as i64 {
                for dx in -width / 2..=(width - 1) / 2 + (width > 1) as i64 {
                    let (qx, qy) = (px + dx, py + dy);
                    if qx >= 0 && qy >= 0 && (qx as usize) < cols && (qy as usize) < rows {
                        bits[qy as usize * cols + qx as usize] = true;
                    }
                }
            }
        }
    }
    bits
}

/// Overlay Plane (§C.9.2) with the outline, and its activation on the layer
/// (§C.11.7). The overlay covers the whole image (origin 1\1).
fn put_overlay(o: &mut Obj, roi: &Roi) -> Result<(), ReportError> {
    let rows = u16::try_from(roi.image_rows)
        .map_err(|_| ReportError::InvalidInput("ROI image too tall".into()))?;
    let cols = u16::try_from(roi.image_cols)
        .map_err(|_| ReportError::InvalidInput("ROI image too wide".into()))?;
    let bits = outline_bitmap(roi);
    // Bit-packed, least significant bit first, padded to 16 bits (PS3.5 §8.1.2).
    let mut words = vec![0u16; bits.len().div_ceil(16)];
    for (i, _) in bits.iter().enumerate().filter(|(_, b)| **b) {
        words[i / 16] |= 1 << (i % 16);
    }
    ds::put_u16(o, OVERLAY_ROWS, rows);
    ds::put_u16(o, OVERLAY_COLUMNS, cols);
    ds::put_str(o, OVERLAY_TYPE, VR::CS, "G");
    o.put(DataElement::new(
        OVERLAY_ORIGIN,
        VR::SS,
        PrimitiveValue::I16(vec![1i16, 1].into()),
    ));
    ds::put_u16(o, OVERLAY_BITS_ALLOCATED, 1);
    ds::put_u16(o, OVERLAY_BIT_POSITION, 0);
    ds::put_str(
        o,
        OVERLAY_DESCRIPTION,
        VR::LO,
        "HER2 MAP region of interest outline",
    );
    o.put(DataElement::new(
        OVERLAY_DATA,
        VR::OW,
        PrimitiveValue::U16(words.into()),
    ));
    ds::put_str(o, OVERLAY_ACTIVATION_LAYER, VR::CS, LAYER);
    Ok(())
}

/// Softcopy VOI LUT (§C.11.8) with the source's first window, when it has
/// one, and Softcopy Presentation LUT (§C.11.6), inverting MONOCHROME1.
fn put_luts(o: &mut Obj, roi: &Roi) {
    if let Some((c, w)) = roi
        .window
        .filter(|(c, w)| c.is_finite() && w.is_finite() && *w >= 1.0)
    {
        let mut voi = Obj::new_empty();
        ds::put_str(&mut voi, tags::WINDOW_CENTER, VR::DS, &format_ds(c));
        ds::put_str(&mut voi, tags::WINDOW_WIDTH, VR::DS, &format_ds(w));
        ds::put_seq(o, tags::SOFTCOPY_VOILUT_SEQUENCE, vec![voi]);
    }
    ds::put_str(
        o,
        tags::PRESENTATION_LUT_SHAPE,
        VR::CS,
        if roi.monochrome1 {
            "INVERSE"
        } else {
            "IDENTITY"
        },
    );
}

fn format_ds(v: f64) -> String {
    let s = format!("{v:.4}");
    if s.len() <= 16 { s } else { format!("{v:.6e}") }
}
