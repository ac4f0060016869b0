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
/// The band left empty at the top: viewers draw their own overlays there
/// (OHIF 3.13: the series description top left, and its cine controls top
/// centre, which it opens by default for Modality OT), and text under them
/// would be hidden.
const TOP_BAND: u32 = 64;
/// The band left empty at the bottom, for the window/level and image
/// number overlays of the bottom corners.
const BOTTOM_BAND: u32 = 40;
/// Body text scale (font pixels → image pixels).
const BODY: u32 = 2;
const WHITE: [u8; 3] = [255, 255, 255];
const GREY: [u8; 3] = [190, 190, 190];
const AMBER: [u8; 3] = [255, 176, 0];
const RED: [u8; 3] = [255, 90, 90];
/// Thumbnails: up to six in a row at 150 px; more (the synthetic patient
/// has seven heatmaps: CC, MLO, US and four MRI slices) at 130 px, seven to
/// a row, in at most two rows. Beyond fourteen the last box says how many
/// more the heatmap series holds, rather than dropping them unsaid.
const THUMB_LARGE: (usize, u32) = (6, 150);
const THUMB_SMALL: (usize, u32) = (7, 130);
const MAX_THUMB_ROWS: usize = 2;

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
        format!(
            "P(HER2+) {} (THRESHOLD {})",
            super::percent(r.prob),
            super::percent(s.threshold)
        ),
    ));
    let score = |p: Option<f32>| p.map_or("-".to_string(), super::percent);
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
    if !r.roi_methods.is_empty() {
        let methods: Vec<String> = r
            .roi_methods
            .iter()
            .map(|(m, p)| format!("{} {}", codes::normalize_modality(m), p.trim()))
            .collect();
        top.push((BODY, GREY, format!("ROI: {}", methods.join(", "))));
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
    let y = draw_lines(&mut rgb, TOP_BAND, &top) + 8;
    let y = draw_thumbnails(&mut rgb, y, prep.input.heatmaps);
    let bottom_h: u32 = bottom.len() as u32 * (font::GLYPH_H + 6) * BODY * 2;
    draw_lines(&mut rgb, y.max(CARD_ROWS - BOTTOM_BAND - bottom_h), &bottom);
    rgb
}

/// Every heatmap as a labelled thumbnail, in rows from `y` (see
/// `THUMB_LARGE`); returns the next free row.
fn draw_thumbnails(rgb: &mut [u8], mut y: u32, heatmaps: &[super::Heatmap]) -> u32 {
    if heatmaps.is_empty() {
        return y;
    }
    let (per_row, size) = if heatmaps.len() <= THUMB_LARGE.0 {
        THUMB_LARGE
    } else {
        THUMB_SMALL
    };
    let boxes = per_row * MAX_THUMB_ROWS;
    // All of them when they fit; else one box fewer, and that box tells
    // how many are not shown.
    let shown = if heatmaps.len() <= boxes {
        heatmaps.len()
    } else {
        boxes - 1
    };
    let gap = (CARD_COLS - 2 * MARGIN - per_row as u32 * size) / (per_row as u32 - 1);
    let label_chars = ((size + gap) / (font::ADVANCE * BODY)) as usize;
    let row_h = size + 4 + (font::GLYPH_H + 8) * BODY;
    let x_of = |i: usize| MARGIN + (i % per_row) as u32 * (size + gap);
    for (i, h) in heatmaps.iter().take(shown).enumerate() {
        let (x, ty) = (x_of(i), y + (i / per_row) as u32 * row_h);
        thumbnail(rgb, x, ty, size, h);
        let label: String = h
            .label
            .to_ascii_uppercase()
            .chars()
            .take(label_chars)
            .collect();
        font::draw_text(
            rgb,
            CARD_COLS,
            CARD_ROWS,
            x,
            ty + size + 4,
            &label,
            BODY,
            GREY,
        );
    }
    if shown < heatmaps.len() {
        let (x, ty) = (x_of(shown), y + (shown / per_row) as u32 * row_h);
        let more = format!("+{} MORE", heatmaps.len() - shown);
        font::draw_text(
            rgb,
            CARD_COLS,
            CARD_ROWS,
            x,
            ty + size / 2 - 12,
            &more,
            BODY,
            WHITE,
        );
        let series = format!("SERIES {}", super::SC_SERIES_NUMBER);
        font::draw_text(
            rgb,
            CARD_COLS,
            CARD_ROWS,
            x,
            ty + size / 2 + 12,
            &series,
            BODY,
            GREY,
        );
    }
    let drawn = shown + usize::from(shown < heatmaps.len());
    y += drawn.div_ceil(per_row) as u32 * row_h;
    y
}

/// The blended heatmap scaled (nearest neighbour) into a `size` box at (x, y).
fn thumbnail(rgb: &mut [u8], x: u32, y: u32, size: u32, h: &super::Heatmap) {
    let blended = colormap::blend(&h.base, &h.cam);
    // Small images (MRI slices) are enlarged to fill the box too.
    let f = size as f32 / h.cols.max(h.rows) as f32;
    let (w, hh) = (
        ((h.cols as f32 * f) as u32).max(1),
        ((h.rows as f32 * f) as u32).max(1),
    );
    let (ox, oy) = (x + (size - w) / 2, y + (size - hh) / 2);
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
    // The images the thumbnails show (PS3.3 §C.7.6.1.1.2), each once.
    let mut sources = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for h in input.heatmaps {
        if seen.insert((h.source.sop_instance_uid.trim(), h.source.frame)) {
            sources.push(super::sc::source_image_item(h));
        }
    }
    if !sources.is_empty() {
        ds::put_seq(&mut o, tags::SOURCE_IMAGE_SEQUENCE, sources);
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Heatmap;

    /// A uniform mid-grey 32x32 heatmap: its thumbnail lights its whole box.
    fn heatmap(i: usize) -> Heatmap {
        Heatmap {
            base: vec![128; 32 * 32],
            cam: vec![0.5; 32 * 32],
            rows: 32,
            cols: 32,
            label: format!("MR slice {i}"),
            ..Default::default()
        }
    }

    /// Runs of lit pixels at least `min` wide along row `y`.
    fn runs(rgb: &[u8], y: u32, min: u32) -> usize {
        let lit = |x: u32| {
            rgb[((y * CARD_COLS + x) * 3) as usize..][..3]
                .iter()
                .any(|&c| c > 0)
        };
        let (mut n, mut len) = (0, 0);
        for x in 0..CARD_COLS {
            if lit(x) {
                len += 1;
            } else {
                n += usize::from(len >= min);
                len = 0;
            }
        }
        n + usize::from(len >= min)
    }

    #[test]
    fn every_heatmap_gets_a_thumbnail_and_an_overflow_is_counted() {
        let y0 = 300;
        for (n, rows) in [(4, vec![4]), (6, vec![6]), (7, vec![7]), (12, vec![7, 5])] {
            let hm: Vec<_> = (0..n).map(heatmap).collect();
            let mut rgb = vec![0u8; (CARD_ROWS * CARD_COLS * 3) as usize];
            let end = draw_thumbnails(&mut rgb, y0, &hm);
            let (_, size) = if n <= THUMB_LARGE.0 {
                THUMB_LARGE
            } else {
                THUMB_SMALL
            };
            let row_h = size + 4 + (font::GLYPH_H + 8) * BODY;
            for (r, want) in rows.iter().enumerate() {
                let mid = y0 + r as u32 * row_h + size / 2;
                assert_eq!(runs(&rgb, mid, size - 2), *want, "{n} heatmaps, row {r}");
            }
            assert_eq!(end, y0 + rows.len() as u32 * row_h, "{n} heatmaps");
        }
        // Sixteen: thirteen thumbnails and a box that counts the other three.
        let hm: Vec<_> = (0..16).map(heatmap).collect();
        let mut rgb = vec![0u8; (CARD_ROWS * CARD_COLS * 3) as usize];
        draw_thumbnails(&mut rgb, y0, &hm);
        let (per_row, size) = THUMB_SMALL;
        let row_h = size + 4 + (font::GLYPH_H + 8) * BODY;
        assert_eq!(runs(&rgb, y0 + size / 2, size - 2), per_row);
        assert_eq!(runs(&rgb, y0 + row_h + size / 2, size - 2), per_row - 1);
        let gap = (CARD_COLS - 2 * MARGIN - per_row as u32 * size) / (per_row as u32 - 1);
        let x = MARGIN + (per_row as u32 - 1) * (size + gap);
        let text_rows = (y0 + row_h + size / 2 - 12)..(y0 + row_h + size / 2 + 12 + 14);
        let white = text_rows
            .flat_map(|y| (x..x + size).map(move |x| (x, y)))
            .filter(|&(x, y)| rgb[((y * CARD_COLS + x) * 3) as usize] == 255)
            .count();
        assert!(
            white > 50,
            "the overflow box says '+3 MORE': {white} white pixels"
        );
    }
}
