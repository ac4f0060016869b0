//! Heatmap Secondary Captures: one RGB Secondary Capture Image (PS3.3 §A.8.1) per
//! model input image, the class-1 CAM in viridis alpha-blended over the windowed
//! source image, with a legend band burned in below the image (Burned In Annotation
//! YES) and a Source Image Sequence reference to the source instance (and frame).
//!
//! The image area keeps the source geometry (the caller maps the CAM back onto the
//! base grid); the legend band is appended below it so no anatomy is covered.

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;

use super::codes;
use super::colormap;
use super::ds::{self, Obj};
use super::font;
use super::{
    Heatmap, OutputKind, OutputObject, Prepared, ReportError, SC_SERIES_DESCRIPTION,
    SC_SERIES_NUMBER, SECONDARY_CAPTURE,
};

/// Largest accepted heatmap height, leaving room for the legend band in 16-bit Rows.
pub const MAX_IMAGE_ROWS: u32 = 60_000;

/// Longest legend line (characters) before wrapping.
const LEGEND_MAX_CHARS: usize = 80;
/// Narrower images are enlarged (integer factor, nearest neighbour) to at least
/// this width, so that the legend's lines fit at the smallest font scale without
/// splitting words and its band stays smaller than the image (small MRI slices).
pub const MIN_LEGEND_COLS: u32 = 320;
/// The enlargement stops at this height.
const MAX_ENLARGED_ROWS: u32 = 8192;
const WHITE: [u8; 3] = [255, 255, 255];
const AMBER: [u8; 3] = [255, 176, 0];
const RED: [u8; 3] = [255, 90, 90];

/// Legend text lines with their colours.
fn legend_lines(prep: &Prepared, h: &Heatmap) -> Vec<(String, [u8; 3])> {
    let r = prep.input.result;
    let mut lines = vec![("NOT FOR DIAGNOSTIC USE - RESEARCH".to_string(), AMBER)];
    if let Some(b) = prep.weights.banner() {
        lines.push((b.to_string(), RED));
    }
    lines.push((
        format!("{} CLASS-1 CAM (HER2+)", super::model_label(r)),
        WHITE,
    ));
    lines.push((format!("P(HER2+) {}", super::percent(r.prob)), WHITE));
    let modality = codes::normalize_modality(&h.source.modality);
    let branch = match modality.as_str() {
        "MG" => r.branch_probs.mg,
        "US" => r.branch_probs.us,
        "MR" => r.branch_probs.mri,
        _ => None,
    };
    let mut l = h.label.trim().to_string();
    if l.is_empty() {
        l = modality.clone();
    }
    if let Some(b) = branch {
        l = format!("{l} - {modality} SCORE {}", super::percent(b));
    }
    lines.push((l, WHITE));
    // Bound the band height whatever the caller's strings are.
    lines
        .into_iter()
        .map(|(t, c)| (t.chars().take(LEGEND_MAX_CHARS).collect(), c))
        .collect()
}

/// The integer enlargement of a `rows x cols` heatmap (1 for images at least
/// [`MIN_LEGEND_COLS`] wide).
pub fn enlargement(rows: u32, cols: u32) -> u32 {
    if cols >= MIN_LEGEND_COLS {
        return 1;
    }
    MIN_LEGEND_COLS
        .div_ceil(cols.max(1))
        .min((MAX_ENLARGED_ROWS / rows.max(1)).max(1))
}

/// Nearest-neighbour enlargement by `k` of a `rows x cols` grid.
fn enlarge<T: Copy>(v: &[T], rows: u32, cols: u32, k: u32) -> Vec<T> {
    let (rows, cols, k) = (rows as usize, cols as usize, k as usize);
    let mut out = Vec::with_capacity(rows * cols * k * k);
    for r in 0..rows * k {
        let row = &v[(r / k) * cols..(r / k + 1) * cols];
        for c in 0..cols * k {
            out.push(row[c / k]);
        }
    }
    out
}

/// Render the heatmap: blended image plus legend band. Returns (rgb, rows, cols).
pub(crate) fn render(prep: &Prepared, h: &Heatmap) -> (Vec<u8>, u32, u32) {
    let k = enlargement(h.rows, h.cols);
    let (image_rows, cols) = (h.rows * k, h.cols * k);
    let scale = (cols / 200).clamp(1, 6);
    let margin = 3 * scale;
    let line_h = (font::GLYPH_H + 3) * scale;
    let max_chars = ((cols.saturating_sub(2 * margin)) / (font::ADVANCE * scale)).max(1) as usize;
    let mut wrapped: Vec<(String, [u8; 3])> = Vec::new();
    for (text, colour) in legend_lines(prep, h) {
        for w in font::wrap(&text.to_ascii_uppercase(), max_chars) {
            wrapped.push((w, colour));
        }
    }
    let bar_h = 5 * scale;
    let band = margin + wrapped.len() as u32 * line_h + line_h + bar_h + margin;
    let rows = image_rows + band;

    let mut rgb = if k == 1 {
        colormap::blend(&h.base, &h.cam)
    } else {
        colormap::blend(
            &enlarge(&h.base, h.rows, h.cols, k),
            &enlarge(&h.cam, h.rows, h.cols, k),
        )
    };
    rgb.resize((rows as usize) * (cols as usize) * 3, 0);

    let mut y = image_rows + margin;
    for (text, colour) in &wrapped {
        font::draw_text(&mut rgb, cols, rows, margin, y, text, scale, *colour);
        y += line_h;
    }
    // Colour bar with LOW / HIGH labels.
    let low_w = font::text_width("LOW", scale);
    let high_w = font::text_width("HIGH", scale);
    font::draw_text(&mut rgb, cols, rows, margin, y, "CAM", scale, WHITE);
    y += line_h;
    let bar_x0 = margin + low_w + 2 * scale;
    let bar_x1 = cols.saturating_sub(margin + high_w + 2 * scale);
    font::draw_text(&mut rgb, cols, rows, margin, y, "LOW", scale, WHITE);
    if bar_x1 > bar_x0 {
        font::draw_text(
            &mut rgb,
            cols,
            rows,
            bar_x1 + 2 * scale,
            y,
            "HIGH",
            scale,
            WHITE,
        );
        let lut = colormap::viridis_lut();
        let span = (bar_x1 - bar_x0).max(1);
        for x in bar_x0..bar_x1 {
            let c = lut[(((x - bar_x0) as f32 / span as f32) * 255.0).round() as usize];
            for yy in y..(y + bar_h.min(font::GLYPH_H * scale)).min(rows) {
                let o = ((yy as usize) * (cols as usize) + x as usize) * 3;
                rgb[o..o + 3].copy_from_slice(&c);
            }
        }
    }
    (rgb, rows, cols)
}

/// Build one Secondary Capture per heatmap.
pub(crate) fn build_heatmaps(prep: &Prepared) -> Result<Vec<OutputObject>, ReportError> {
    let heatmaps = prep.input.heatmaps;
    let mut out = Vec::new();
    for (i, h) in heatmaps.iter().enumerate() {
        let study = h.source.study_instance_uid.trim();
        // Numbered within its study: the SC series lives in the source's study.
        let index = heatmaps[..i]
            .iter()
            .filter(|x| x.source.study_instance_uid.trim() == study)
            .count();
        let sop_uid = prep.uid("sc", study, index)?;
        let o = heatmap_sc(prep, i, index, &sop_uid)?;
        out.push(OutputObject {
            kind: OutputKind::HeatmapSc,
            study_instance_uid: study.to_string(),
            sop_class_uid: SECONDARY_CAPTURE.to_string(),
            sop_instance_uid: sop_uid,
            object: super::finish(o)?,
        });
    }
    Ok(out)
}

/// The SC data set of heatmap `i`, the `index`-th of its study.
fn heatmap_sc(prep: &Prepared, i: usize, index: usize, sop_uid: &str) -> Result<Obj, ReportError> {
    let input = prep.input;
    let h = &input.heatmaps[i];
    let study = h.source.study_instance_uid.trim();
    let series_uid = prep.uid("sc-series", study, 0)?;
    let attrs = prep.studies.get(study).copied().unwrap_or(&h.source.study);
    let (d, t, _) = super::da_tm(input.now);

    let mut o = Obj::new_empty();
    super::put_sop_common(&mut o, SECONDARY_CAPTURE, sop_uid, input.now);
    ds::put_strs(&mut o, tags::IMAGE_TYPE, VR::CS, &["DERIVED", "SECONDARY"]);
    super::put_patient_study(&mut o, study, attrs);

    // General Series (PS3.3 §C.7.3.1).
    super::put_series(
        &mut o,
        "OT",
        &series_uid,
        SC_SERIES_NUMBER,
        &d,
        &t,
        SC_SERIES_DESCRIPTION,
    );
    ds::put_str(&mut o, tags::BODY_PART_EXAMINED, VR::CS, "BREAST");
    // Laterality (General Series, Type 2C) is only required when Image Laterality is
    // absent: an image of known side carries Image Laterality (General Image) and no
    // series Laterality; an image of unknown side carries a zero-length Laterality
    // ("unknown"; breast is a paired structure).
    if image_laterality(h).is_none() {
        ds::put_empty(&mut o, tags::LATERALITY, VR::CS);
    }

    super::put_equipment(&mut o, input.settings, input.result);
    // SC Equipment (PS3.3 §C.8.6.1).
    ds::put_str(&mut o, tags::CONVERSION_TYPE, VR::CS, "WSD");

    put_general_image(&mut o, prep, h, index, (&d, &t));

    // SC Image (PS3.3 §C.8.6.2).
    ds::put_str(&mut o, tags::DATE_OF_SECONDARY_CAPTURE, VR::DA, &d);
    ds::put_str(&mut o, tags::TIME_OF_SECONDARY_CAPTURE, VR::TM, &t);

    put_image_pixel(&mut o, prep, h, i)?;
    super::set_charset(&mut o);
    Ok(o)
}

/// "L" / "R" of the source image, `None` when unknown.
fn image_laterality(h: &Heatmap) -> Option<&'static str> {
    h.source
        .laterality
        .as_deref()
        .and_then(codes::laterality_letter)
}

/// General Image (PS3.3 §C.7.6.1): number, content date/time, laterality and
/// view of the source, how the image was derived and from which source.
fn put_general_image(
    o: &mut Obj,
    prep: &Prepared,
    h: &Heatmap,
    index: usize,
    (d, t): (&str, &str),
) {
    ds::put_str(o, tags::INSTANCE_NUMBER, VR::IS, &(index + 1).to_string());
    ds::put_empty(o, tags::PATIENT_ORIENTATION, VR::CS);
    ds::put_str(o, tags::CONTENT_DATE, VR::DA, d);
    ds::put_str(o, tags::CONTENT_TIME, VR::TM, t);
    if let Some(l) = image_laterality(h) {
        ds::put_str(o, tags::IMAGE_LATERALITY, VR::CS, l);
    }
    let view = h.source.view.as_deref().and_then(codes::view_code);
    if let Some(v) = &view {
        ds::put_code_seq(o, tags::VIEW_CODE_SEQUENCE, v);
    }
    let label = h.label.trim();
    ds::put_str(
        o,
        tags::DERIVATION_DESCRIPTION,
        VR::ST,
        &format!(
            "{} class-1 CAM (HER2-positive) in viridis, alpha-blended over the windowed source image{}{}; legend burned in",
            super::model_label(prep.input.result),
            if label.is_empty() {
                String::new()
            } else {
                format!(" ({label})")
            },
            match &view {
                Some(v) => format!(", view {}", v.meaning),
                None => String::new(),
            }
        ),
    );
    ds::put_seq(o, tags::SOURCE_IMAGE_SEQUENCE, vec![source_image_item(h)]);
    ds::put_str(o, tags::BURNED_IN_ANNOTATION, VR::CS, "YES");
    ds::put_str(o, tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00");
    let mut comment = String::from("HER2 MAP heatmap, NOT FOR DIAGNOSTIC USE");
    if let Some(b) = prep.weights.banner() {
        comment.push_str(", ");
        comment.push_str(b);
    }
    if !label.is_empty() {
        comment.push_str(". Source: ");
        comment.push_str(label);
    }
    ds::put_str(o, tags::IMAGE_COMMENTS, VR::LT, &comment);
}

/// The Source Image Sequence item: the source instance (and frame), for
/// processing.
pub(super) fn source_image_item(h: &Heatmap) -> Obj {
    let mut src = Obj::new_empty();
    ds::put_str(
        &mut src,
        tags::REFERENCED_SOP_CLASS_UID,
        VR::UI,
        h.source.sop_class_uid.trim(),
    );
    ds::put_str(
        &mut src,
        tags::REFERENCED_SOP_INSTANCE_UID,
        VR::UI,
        h.source.sop_instance_uid.trim(),
    );
    if let Some(f) = h.source.frame {
        ds::put_str(
            &mut src,
            tags::REFERENCED_FRAME_NUMBER,
            VR::IS,
            &f.to_string(),
        );
    }
    ds::put_code_seq(
        &mut src,
        tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
        &codes::SOURCE_IMAGE_FOR_PROCESSING,
    );
    src
}

/// Image Pixel (PS3.3 §C.7.6.3): the rendered heatmap, 8-bit RGB, interleaved.
fn put_image_pixel(o: &mut Obj, prep: &Prepared, h: &Heatmap, i: usize) -> Result<(), ReportError> {
    let (rgb, rows, cols) = render(prep, h);
    let rows16 = u16::try_from(rows)
        .map_err(|_| ReportError::InvalidInput(format!("heatmap[{i}] too tall with legend")))?;
    let cols16 = u16::try_from(cols)
        .map_err(|_| ReportError::InvalidInput(format!("heatmap[{i}] too wide")))?;
    put_rgb_pixels(o, rgb, rows16, cols16);
    Ok(())
}

/// Image Pixel (PS3.3 §C.7.6.3) of an interleaved 8-bit RGB image.
pub(crate) fn put_rgb_pixels(o: &mut Obj, mut rgb: Vec<u8>, rows16: u16, cols16: u16) {
    ds::put_u16(o, tags::SAMPLES_PER_PIXEL, 3);
    ds::put_str(o, tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "RGB");
    ds::put_u16(o, tags::PLANAR_CONFIGURATION, 0);
    ds::put_u16(o, tags::ROWS, rows16);
    ds::put_u16(o, tags::COLUMNS, cols16);
    ds::put_u16(o, tags::BITS_ALLOCATED, 8);
    ds::put_u16(o, tags::BITS_STORED, 8);
    ds::put_u16(o, tags::HIGH_BIT, 7);
    ds::put_u16(o, tags::PIXEL_REPRESENTATION, 0);
    // Pixel Data has even length (PS3.5 §7.1.1).
    if rgb.len() % 2 == 1 {
        rgb.push(0);
    }
    o.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::U8(rgb.into()),
    ));
}

/// Where the model's CAM grid lies on the base image grid: the rectangle (in base-grid
/// pixels, fractional allowed) that was cropped and resized to the model input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CropBox {
    pub top: f32,
    pub left: f32,
    pub height: f32,
    pub width: f32,
}

impl CropBox {
    /// The whole `rows x cols` grid (no crop, only a resize).
    pub fn full(rows: u32, cols: u32) -> Self {
        CropBox {
            top: 0.0,
            left: 0.0,
            height: rows as f32,
            width: cols as f32,
        }
    }
}

/// Undo the crop/resize of the model input: bilinearly resample a `cam_rows x cam_cols`
/// CAM that covers `crop` of the base grid onto the full `rows x cols` base grid, with
/// pixel centres aligned as PyTorch `interpolate(..., align_corners=False)` does.
/// Base pixels outside the crop get 0; negative and non-finite CAM values count as 0.
/// The result is what [`Heatmap::cam`] expects.
pub fn cam_to_base_grid(
    cam: &[f32],
    cam_rows: u32,
    cam_cols: u32,
    crop: CropBox,
    rows: u32,
    cols: u32,
) -> Result<Vec<f32>, ReportError> {
    let n = (cam_rows as usize).saturating_mul(cam_cols as usize);
    if cam_rows == 0 || cam_cols == 0 || cam.len() != n {
        return Err(ReportError::InvalidInput(format!(
            "CAM has {} values, expected {cam_rows}x{cam_cols}",
            cam.len()
        )));
    }
    let finite = [crop.top, crop.left, crop.height, crop.width]
        .iter()
        .all(|v| v.is_finite());
    if !finite || crop.height <= 0.0 || crop.width <= 0.0 {
        return Err(ReportError::InvalidInput(
            "CAM crop box must be finite with a positive size".into(),
        ));
    }
    let at = |y: usize, x: usize| {
        let v = cam[y * cam_cols as usize + x];
        if v.is_finite() && v > 0.0 { v } else { 0.0 }
    };
    let mut out = vec![0.0f32; (rows as usize) * (cols as usize)];
    for y in 0..rows {
        let cy = y as f32 + 0.5;
        if cy < crop.top || cy >= crop.top + crop.height {
            continue;
        }
        let v = ((cy - crop.top) / crop.height * cam_rows as f32 - 0.5)
            .clamp(0.0, (cam_rows - 1) as f32);
        let (y0, fy) = (v.floor() as usize, v - v.floor());
        let y1 = (y0 + 1).min(cam_rows as usize - 1);
        for x in 0..cols {
            let cx = x as f32 + 0.5;
            if cx < crop.left || cx >= crop.left + crop.width {
                continue;
            }
            let u = ((cx - crop.left) / crop.width * cam_cols as f32 - 0.5)
                .clamp(0.0, (cam_cols - 1) as f32);
            let (x0, fx) = (u.floor() as usize, u - u.floor());
            let x1 = (x0 + 1).min(cam_cols as usize - 1);
            let top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx;
            let bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx;
            out[(y as usize) * (cols as usize) + x as usize] = top * (1.0 - fy) + bottom * fy;
        }
    }
    Ok(out)
}

/// Write an RGB secondary capture (as this module makes them: 8-bit,
/// interleaved, uncompressed) as a PNG, for people to look at.
pub fn write_png(
    obj: &dicom_object::DefaultDicomObject,
    path: &std::path::Path,
) -> Result<(), ReportError> {
    use dicom_dictionary_std::tags;
    let uint = |tag| -> Option<u32> { obj.element(tag).ok()?.to_int::<u32>().ok() };
    let (rows, cols) = match (uint(tags::ROWS), uint(tags::COLUMNS)) {
        (Some(r), Some(c)) => (r, c),
        _ => {
            return Err(ReportError::InvalidInput(
                "not an image: no Rows/Columns".into(),
            ));
        }
    };
    let pixels = obj
        .element(tags::PIXEL_DATA)
        .ok()
        .and_then(|e| e.to_bytes().ok())
        .ok_or_else(|| ReportError::InvalidInput("no native pixel data".into()))?;
    let n = (rows * cols * 3) as usize;
    let frame = pixels
        .get(..n)
        .ok_or_else(|| ReportError::InvalidInput("pixel data shorter than one RGB frame".into()))?
        .to_vec();
    let img = image::RgbImage::from_raw(cols, rows, frame)
        .ok_or_else(|| ReportError::InvalidInput("pixel buffer size".into()))?;
    img.save(path)
        .map_err(|e| ReportError::InvalidInput(format!("writing {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsampling_keeps_constant_and_zeroes_outside_crop() {
        let cam = vec![2.0; 4 * 4];
        let crop = CropBox {
            top: 10.0,
            left: 20.0,
            height: 40.0,
            width: 30.0,
        };
        let out = cam_to_base_grid(&cam, 4, 4, crop, 64, 64).unwrap();
        assert_eq!(out[0], 0.0);
        assert_eq!(out[30 * 64 + 35], 2.0);
        assert_eq!(out[30 * 64 + 55], 0.0, "right of the crop");
        assert_eq!(out[55 * 64 + 35], 0.0, "below the crop");
    }

    #[test]
    fn upsampling_puts_the_peak_where_it_was() {
        // 8x8 CAM with a peak at (2, 5) over the full 80x80 grid: peak near (25, 55).
        let mut cam = vec![0.0; 64];
        cam[2 * 8 + 5] = 1.0;
        let out = cam_to_base_grid(&cam, 8, 8, CropBox::full(80, 80), 80, 80).unwrap();
        let (i, _) = out
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.partial_cmp(b.1).unwrap())
            .unwrap();
        let (py, px) = (i / 80, i % 80);
        assert!(
            (24..=25).contains(&py) && (54..=55).contains(&px),
            "peak at {py},{px}"
        );
    }

    #[test]
    fn upsampling_rejects_bad_shapes() {
        assert!(cam_to_base_grid(&[1.0; 3], 2, 2, CropBox::full(4, 4), 4, 4).is_err());
        let bad = CropBox {
            top: 0.0,
            left: 0.0,
            height: 0.0,
            width: 4.0,
        };
        assert!(cam_to_base_grid(&[1.0; 4], 2, 2, bad, 4, 4).is_err());
    }
}
