//! The summary "report card": one RGB Secondary Capture (PS3.3 §A.8.1) per target
//! study with the result as text any viewer shows (HER2 status and probability,
//! per-modality scores, modalities used and missing, lesion side, ROI method per
//! modality, heatmap thumbnails, model and weights identity, the research-use
//! text), laid out for the viewer's default window: white and coloured text on
//! black, the font at 2x or more. It goes wherever "sc" outputs go.
//!
//! This module owns only the card; the SC data set modules it writes are those of
//! the heatmaps (`sc`).

use dicom_core::VR;
use dicom_dictionary_std::tags;

use super::codes;
use super::colormap;
use super::ds::{self, Obj};
use super::font;
use super::{
    OutputKind, OutputObject, Prepared, ReportError, SECONDARY_CAPTURE, SUMMARY_SERIES_DESCRIPTION,
    SUMMARY_SERIES_NUMBER,
};

/// Card size in pixels.
pub const CARD_COLS: u32 = 1024;
pub const CARD_ROWS: u32 = 768;
const MARGIN: u32 = 24;
/// Body text scale (font pixels → image pixels).
const BODY: u32 = 2;
const WHITE: [u8; 3] = [255, 255, 255];
const GREY: [u8; 3] = [190, 190, 190];
const AMBER: [u8; 3] = [255, 176, 0];
const RED: [u8; 3] = [255, 90, 90];
const THUMB: u32 = 150;
const MAX_THUMBS: usize = 6;

/// One card per target study (the SR's studies).
pub(crate) fn build_summaries(prep: &Prepared) -> Result<Vec<OutputObject>, ReportError> {
    let rgb = render(prep);
    let mut out = Vec::new();
    for study in super::sr::target_studies(prep) {
        let sop_uid = prep.uid("summary", study, 0)?;
        let o = card_sc(prep, study, &sop_uid, rgb.clone())?;
        out.push(OutputObject {
            kind: OutputKind::SummarySc,
            study_instance_uid: study.to_string(),
            sop_class_uid: SECONDARY_CAPTURE.to_string(),
            sop_instance_uid: sop_uid,
            object: super::finish(o)?,
        });
    }
    Ok(out)
}

fn side_word(side: Option<&str>) -> &'static str {
    match side.and_then(codes::laterality_letter) {
        Some("L") => "LEFT",
        Some("R") => "RIGHT",
        _ => "UNKNOWN",
    }
}

/// One text line of the card: font scale, colour, text.
type Line = (u32, [u8; 3], String);

/// The card's text lines (scale, colour, text), top to bottom, before the
/// thumbnails; then those after them.
fn lines(prep: &Prepared) -> (Vec<Line>, Vec<Line>) {
    let r = prep.input.result;
    let s = prep.input.settings;
    let positive = r.prob >= s.threshold;
    let mut top = vec![(
        BODY,
        AMBER,
        "HER2 MAP SUMMARY - RESEARCH - NOT FOR DIAGNOSTIC USE".to_string(),
    )];
    if let Some(b) = prep.weights.banner() {
        top.push((BODY, RED, b.to_string()));
    }
    if prep.amended() {
        top.push((BODY, AMBER, "AMENDED: REPLACES THE EARLIER RESULT".into()));
    }
    top.push((
        4,
        if positive { RED } else { WHITE },
        format!("HER2 {}", if positive { "POSITIVE" } else { "NEGATIVE" }),
    ));
    top.push((
        3,
        WHITE,
        format!("P(HER2+) {:.2} (THRESHOLD {:.2})", r.prob, s.threshold),
    ));
    let score = |p: Option<f32>| p.map_or("-".to_string(), |p| format!("{p:.2}"));
    top.push((
        BODY,
        WHITE,
        format!(
            "SCORES: MG {}  US {}  MR {}",
            score(r.branch_probs.mg),
            score(r.branch_probs.us),
            score(r.branch_probs.mri)
        ),
    ));
    let list = |v: &[String]| {
        if v.is_empty() {
            "NONE".to_string()
        } else {
            v.iter()
                .map(|m| codes::normalize_modality(m))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    top.push((
        BODY,
        WHITE,
        format!(
            "MODALITIES USED: {}; MISSING: {}",
            list(&r.modalities_used),
            list(&r.modalities_missing)
        ),
    ));
    top.push((
        BODY,
        WHITE,
        format!("LESION SIDE: {}", side_word(r.lesion_side.as_deref())),
    ));
    for (m, p) in &r.roi_methods {
        top.push((
            BODY,
            GREY,
            format!("ROI {}: {}", codes::normalize_modality(m), p.trim()),
        ));
    }
    let sha = r.weights_sha256.trim().to_ascii_lowercase();
    let bottom = vec![
        (
            BODY,
            GREY,
            format!(
                "MODEL {}   WEIGHTS SHA-256 {}",
                super::model_label(r),
                if sha.is_empty() {
                    "UNKNOWN".to_string()
                } else {
                    sha.chars().take(16).collect::<String>()
                }
            ),
        ),
        (
            BODY,
            AMBER,
            "RESEARCH MODEL OUTPUT, NOT A PATHOLOGY RESULT: NOT FOR DIAGNOSIS OR TREATMENT DECISIONS"
                .to_string(),
        ),
    ];
    (top, bottom)
}

/// Draw wrapped lines from `y`; returns the next free row.
fn draw_lines(rgb: &mut [u8], mut y: u32, lines: &[Line]) -> u32 {
    for (scale, colour, text) in lines {
        let max_chars = ((CARD_COLS - 2 * MARGIN) / (font::ADVANCE * scale)) as usize;
        for l in font::wrap(&text.to_ascii_uppercase(), max_chars) {
            font::draw_text(rgb, CARD_COLS, CARD_ROWS, MARGIN, y, &l, *scale, *colour);
            y += (font::GLYPH_H + 4) * scale;
        }
        y += 2 * scale;
    }
    y
}

/// The card's pixels, `CARD_ROWS x CARD_COLS` RGB.
pub(crate) fn render(prep: &Prepared) -> Vec<u8> {
    let mut rgb = vec![0u8; (CARD_ROWS * CARD_COLS * 3) as usize];
    let (top, bottom) = lines(prep);
    let mut y = draw_lines(&mut rgb, MARGIN, &top) + 8;
    let heatmaps = prep.input.heatmaps;
    if !heatmaps.is_empty() {
        let gap = (CARD_COLS - 2 * MARGIN - MAX_THUMBS as u32 * THUMB) / (MAX_THUMBS as u32 - 1);
        for (i, h) in heatmaps.iter().take(MAX_THUMBS).enumerate() {
            let x = MARGIN + i as u32 * (THUMB + gap);
            thumbnail(&mut rgb, x, y, h);
            let label: String = h.label.to_ascii_uppercase().chars().take(12).collect();
            font::draw_text(
                &mut rgb,
                CARD_COLS,
                CARD_ROWS,
                x,
                y + THUMB + 4,
                &label,
                BODY,
                GREY,
            );
        }
        y += THUMB + 4 + (font::GLYPH_H + 8) * BODY;
    }
    let bottom_h: u32 = bottom.len() as u32 * (font::GLYPH_H + 6) * BODY * 2;
    draw_lines(&mut rgb, y.max(CARD_ROWS - MARGIN - bottom_h), &bottom);
    rgb
}

/// The blended heatmap scaled (nearest neighbour) into a THUMB box at (x, y).
fn thumbnail(rgb: &mut [u8], x: u32, y: u32, h: &super::Heatmap) {
    let blended = colormap::blend(&h.base, &h.cam);
    // Small images (MRI slices) are enlarged to fill the box too.
    let f = THUMB as f32 / h.cols.max(h.rows) as f32;
    let (w, hh) = (
        ((h.cols as f32 * f) as u32).max(1),
        ((h.rows as f32 * f) as u32).max(1),
    );
    let (ox, oy) = (x + (THUMB - w) / 2, y + (THUMB - hh) / 2);
    for ty in 0..hh {
        for tx in 0..w {
            let sx = ((tx as f32 / f) as u32).min(h.cols - 1);
            let sy = ((ty as f32 / f) as u32).min(h.rows - 1);
            let s = ((sy * h.cols + sx) * 3) as usize;
            let (px, py) = (ox + tx, oy + ty);
            if px < CARD_COLS && py < CARD_ROWS {
                let d = ((py * CARD_COLS + px) * 3) as usize;
                rgb[d..d + 3].copy_from_slice(&blended[s..s + 3]);
            }
        }
    }
}

/// The card's SC data set in `study`.
fn card_sc(prep: &Prepared, study: &str, sop_uid: &str, rgb: Vec<u8>) -> Result<Obj, ReportError> {
    let input = prep.input;
    let (d, t, _) = super::da_tm(input.now);
    let mut o = Obj::new_empty();
    super::put_sop_common(&mut o, SECONDARY_CAPTURE, sop_uid, input.now);
    ds::put_strs(&mut o, tags::IMAGE_TYPE, VR::CS, &["DERIVED", "SECONDARY"]);
    super::put_patient_study(&mut o, study, prep.studies[study]);
    super::put_series(
        &mut o,
        "OT",
        &prep.uid("summary-series", study, 0)?,
        SUMMARY_SERIES_NUMBER,
        &d,
        &t,
        SUMMARY_SERIES_DESCRIPTION,
    );
    ds::put_str(&mut o, tags::BODY_PART_EXAMINED, VR::CS, "BREAST");
    // As for the heatmaps: Image Laterality when the lesion side is known, else
    // a zero-length series Laterality (PS3.3 §C.7.3.1, Type 2C).
    let side = input
        .result
        .lesion_side
        .as_deref()
        .and_then(codes::laterality_letter);
    if side.is_none() {
        ds::put_empty(&mut o, tags::LATERALITY, VR::CS);
    }
    super::put_equipment(&mut o, input.settings, input.result);
    ds::put_str(&mut o, tags::CONVERSION_TYPE, VR::CS, "WSD");
    // General Image (§C.7.6.1).
    ds::put_str(&mut o, tags::INSTANCE_NUMBER, VR::IS, "1");
    ds::put_empty(&mut o, tags::PATIENT_ORIENTATION, VR::CS);
    ds::put_str(&mut o, tags::CONTENT_DATE, VR::DA, &d);
    ds::put_str(&mut o, tags::CONTENT_TIME, VR::TM, &t);
    if let Some(l) = side {
        ds::put_str(&mut o, tags::IMAGE_LATERALITY, VR::CS, l);
    }
    ds::put_str(
        &mut o,
        tags::DERIVATION_DESCRIPTION,
        VR::ST,
        &format!(
            "{} result summary with heatmap thumbnails; text burned in",
            super::model_label(input.result)
        ),
    );
    ds::put_str(&mut o, tags::BURNED_IN_ANNOTATION, VR::CS, "YES");
    ds::put_str(&mut o, tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00");
    let mut comment = String::from("HER2 MAP summary, NOT FOR DIAGNOSTIC USE");
    if let Some(b) = prep.weights.banner() {
        comment.push_str(", ");
        comment.push_str(b);
    }
    ds::put_str(&mut o, tags::IMAGE_COMMENTS, VR::LT, &comment);
    // SC Image (§C.8.6.2).
    ds::put_str(&mut o, tags::DATE_OF_SECONDARY_CAPTURE, VR::DA, &d);
    ds::put_str(&mut o, tags::TIME_OF_SECONDARY_CAPTURE, VR::TM, &t);
    super::sc::put_rgb_pixels(&mut o, rgb, CARD_ROWS as u16, CARD_COLS as u16);
    super::set_charset(&mut o);
    Ok(o)
}
