//! Heatmap geometry: the class-1 CAM of each input mapped back onto its
//! source frame (a crop resized for planar inputs; the patient-aligned cube
//! sampled at each source pixel for MRI), over the frame as the model saw it.

use std::collections::HashMap;
use std::path::Path;

use rayon::prelude::*;
use tracing::warn;

use super::reporting::Header;
use crate::imaging::{self, PreparedCase, SourceGeometry};
use crate::inference::{InferResponse, TensorData};
use crate::report;

/// The heatmap images of one side: MG CC and MLO whole views, the US
/// image, and the MRI axial slices through the ROI's centre and the CAM peak.
pub(super) fn heatmaps(
    p: &PreparedCase,
    response: &InferResponse,
    sample: usize,
    headers: &HashMap<String, Header>,
) -> Vec<report::Heatmap> {
    // One heatmap job per selection, decoded and blended in parallel.
    let made: Vec<Vec<report::Heatmap>> = p
        .selections
        .par_iter()
        .map(|s| {
            let branch = s.modality.branch();
            // The crops share the CAM of their whole views; the
            // pre-contrast phase only served the subtraction.
            if s.role.contains("crop") || s.role.contains("pre-contrast") {
                return Vec::new();
            }
            let Some(cams) = &response.cams[branch] else {
                return Vec::new();
            };
            let made = match &s.geometry {
                SourceGeometry::Planar { frame, crop, .. } => s
                    .sop_instance_uids
                    .first()
                    .and_then(|uid| headers.get(uid))
                    .map(|h| {
                        planar_heatmap(h, s, *frame, *crop, &cams.input, sample)
                            .map(|hm| vec![with_planar_roi(hm, h, s, &p.selections)])
                    })
                    .unwrap_or_else(|| Ok(Vec::new())),
                SourceGeometry::Volume { .. } => mri_heatmaps(s, headers, &cams.input, sample),
            };
            made.unwrap_or_else(|e| {
                warn!(role = %s.role, error = %e, "heatmap skipped");
                Vec::new()
            })
        })
        .collect();
    made.into_iter().flatten().collect()
}

/// The ROI of a planar input on its source: the tumour crop of the same
/// instance where there is one (MG), else the input's own crop (US region).
fn with_planar_roi(
    mut hm: report::Heatmap,
    h: &Header,
    s: &imaging::Selection,
    all: &[imaging::Selection],
) -> report::Heatmap {
    let uid = s.sop_instance_uids.first();
    let chosen = all
        .iter()
        .find(|c| c.role.contains("crop") && c.sop_instance_uids.first() == uid)
        .unwrap_or(s);
    if let SourceGeometry::Planar {
        cols, rows, crop, ..
    } = &chosen.geometry
    {
        let [x0, y0, x1, y1] = crop.map(|v| v as f32);
        hm.roi = Some(report::Roi {
            points: report::Roi::rectangle(x0, y0, x1, y1),
            image_rows: *rows as u32,
            image_cols: *cols as u32,
            method: chosen.roi_provider.clone(),
            window: h.window,
            monochrome1: h.monochrome1,
        });
    }
    hm
}

/// The ROI of the MRI input on one source slice: the model's cube (axis
/// aligned in patient space) projected onto the slice, in source pixels;
/// `None` when the slice misses the cube.
#[allow(clippy::too_many_arguments)]
fn mri_roi(
    h: &Header,
    sl: usize,
    (origin, row_dir, col_dir, normal): (&[f64; 3], &[f64; 3], &[f64; 3], &[f64; 3]),
    spacing: &[f64; 3],
    center: &[f64; 3],
    side: f64,
    method: &str,
) -> Option<report::Roi> {
    let dot = |a: &[f64; 3], b: &[f64; 3]| a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
    let plane = sl as f64 * spacing[0];
    let (mut c0, mut r0, mut c1, mut r1) = (f64::MAX, f64::MAX, f64::MIN, f64::MIN);
    let (mut d0, mut d1) = (f64::MAX, f64::MIN);
    for corner in 0..8 {
        let mut q = [0.0; 3];
        for a in 0..3 {
            let sign = if corner >> a & 1 == 1 { 0.5 } else { -0.5 };
            q[a] = center[a] + sign * side - origin[a];
        }
        let d = dot(&q, normal) - plane;
        d0 = d0.min(d);
        d1 = d1.max(d);
        let c = dot(&q, row_dir) / spacing[2];
        let r = dot(&q, col_dir) / spacing[1];
        c0 = c0.min(c);
        c1 = c1.max(c);
        r0 = r0.min(r);
        r1 = r1.max(r);
    }
    let (cols, rows) = (h.cols as f64, h.rows as f64);
    let clamp = |v: f64, hi: f64| v.clamp(0.0, hi) as f32;
    let (x0, x1, y0, y1) = (
        clamp(c0, cols),
        clamp(c1, cols),
        clamp(r0, rows),
        clamp(r1, rows),
    );
    if d0 > 0.0 || d1 < 0.0 || x1 - x0 < 1.0 || y1 - y0 < 1.0 || h.rows == 0 || h.cols == 0 {
        return None;
    }
    Some(report::Roi {
        points: report::Roi::rectangle(x0, y0, x1, y1),
        image_rows: h.rows,
        image_cols: h.cols,
        method: method.to_string(),
        window: h.window,
        monochrome1: h.monochrome1,
    })
}

/// The heatmap background of a source frame: the one imaging kept from its
/// own decode when there is one, else the frame decoded here (first window,
/// shrunk the same way: `imaging::heatmap_base`).
fn base_image<'a>(
    path: &Path,
    frame: u32,
    kept: Option<&'a imaging::HeatmapBase>,
) -> Result<std::borrow::Cow<'a, imaging::HeatmapBase>, String> {
    if let Some(b) = kept {
        return Ok(std::borrow::Cow::Borrowed(b));
    }
    let obj = dicom_object::open_file(path).map_err(|e| e.to_string())?;
    let g = imaging::decode::decode_gray(&obj, frame, imaging::VoiWindowChoice::First)
        .map_err(|e| e.to_string())?;
    Ok(std::borrow::Cow::Owned(imaging::heatmap_base(&g)))
}

fn to_u8(g: &imaging::decode::GrayImage) -> Vec<u8> {
    g.data
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect()
}

fn planar_heatmap(
    h: &Header,
    s: &imaging::Selection,
    frame: u32,
    crop: [f64; 4],
    cams: &TensorData,
    sample: usize,
) -> Result<report::Heatmap, String> {
    let base = base_image(&h.path, frame, s.heatmap_base.as_deref())?;
    let (g, scale) = (&base.image, base.scale);
    let role = s.role.as_str();
    let (cr, cc) = (
        cams.shape[cams.shape.len() - 2],
        cams.shape[cams.shape.len() - 1],
    );
    let n = cr * cc;
    let cam = cams
        .data
        .get(sample * n..(sample + 1) * n)
        .ok_or("CAM batch shorter than the request")?;
    let [x0, y0, x1, y1] = crop;
    let bx = report::sc::CropBox {
        top: (y0 * scale) as f32,
        left: (x0 * scale) as f32,
        height: ((y1 - y0) * scale) as f32,
        width: ((x1 - x0) * scale) as f32,
    };
    let cam = report::sc::cam_to_base_grid(
        cam,
        cr as u32,
        cc as u32,
        bx,
        g.height as u32,
        g.width as u32,
    )
    .map_err(|e| e.to_string())?;
    let label = format!(
        "{} {} {}",
        h.modality,
        h.laterality.as_deref().unwrap_or(""),
        if role == "US" { "" } else { role }
    );
    Ok(report::Heatmap {
        source: h.source((frame > 0).then_some(frame + 1)),
        base: to_u8(g),
        cam,
        rows: g.height as u32,
        cols: g.width as u32,
        label: label.split_whitespace().collect::<Vec<_>>().join(" "),
        roi: None,
    })
}

/// MRI heatmaps: the axial source slices through the ROI's centre (and its
/// neighbours two slices away) and through the CAM peak, the CAM volume
/// sampled at each source pixel's patient position.
fn mri_heatmaps(
    s: &imaging::Selection,
    headers: &HashMap<String, Header>,
    cams: &TensorData,
    sample: usize,
) -> Result<Vec<report::Heatmap>, String> {
    let SourceGeometry::Volume {
        slices,
        frames,
        origin,
        row_dir,
        col_dir,
        normal,
        spacing,
        box_center_mm,
        box_side_mm,
        ..
    } = &s.geometry
    else {
        return Ok(Vec::new());
    };
    let n = cams.shape[cams.shape.len() - 1];
    let vol = cams
        .data
        .get(sample * n * n * n..(sample + 1) * n * n * n)
        .ok_or("CAM batch shorter than the request")?;
    // Peak of the CAM in input index space (k, j, i) → patient mm.
    let (peak, _) =
        vol.iter().enumerate().fold(
            (0usize, f32::MIN),
            |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc },
        );
    let (pk, pj, pi) = (peak / (n * n), (peak / n) % n, peak % n);
    let axis = |idx: usize| ((idx as f64 + 0.5) / n as f64 - 0.5) * box_side_mm;
    let p = [
        box_center_mm[0] + axis(pi),
        box_center_mm[1] + axis(pj),
        box_center_mm[2] + axis(pk),
    ];
    let dot = |a: &[f64; 3], b: &[f64; 3]| a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
    // The key slices: the ROI's centre slice and its neighbours two
    // slices away (where the lesion the model looked at lies), and the
    // CAM's peak slice when it falls elsewhere (what the model weighed most;
    // with untrained weights it can be far off the lesion).
    let to_slice = |q: &[f64; 3]| {
        let rel = [q[0] - origin[0], q[1] - origin[1], q[2] - origin[2]];
        (dot(&rel, normal) / spacing[0])
            .round()
            .clamp(0.0, (*slices - 1) as f64) as usize
    };
    let peak_slice = to_slice(&p);
    let centre = to_slice(box_center_mm);
    let mut chosen = vec![centre.saturating_sub(2), centre, centre + 2, peak_slice];
    chosen.retain(|&sl| sl < *slices);
    chosen.sort_unstable();
    chosen.dedup();
    let sample_cam = |q: [f64; 3]| sample_cube(vol, n, *box_center_mm, *box_side_mm, q);
    let mut out = Vec::new();
    for sl in chosen {
        let Some(uid) = s.sop_instance_uids.get(sl) else {
            continue;
        };
        let Some(h) = headers.get(uid) else { continue };
        let frame = frames.get(sl).copied().unwrap_or(0);
        let base = base_image(&h.path, frame, None)?;
        let (g, scale) = (&base.image, base.scale);
        let mut cam = Vec::with_capacity(g.width * g.height);
        for r in 0..g.height {
            for c in 0..g.width {
                let (sr, sc) = (r as f64 / scale, c as f64 / scale);
                let mut q = *origin;
                for a in 0..3 {
                    q[a] += sc * spacing[2] * row_dir[a]
                        + sr * spacing[1] * col_dir[a]
                        + sl as f64 * spacing[0] * normal[a];
                }
                cam.push(sample_cam(q));
            }
        }
        out.push(report::Heatmap {
            source: h.source((frame > 0).then_some(frame + 1)),
            base: to_u8(g),
            cam,
            rows: g.height as u32,
            cols: g.width as u32,
            label: format!("MR slice {}", sl + 1),
            roi: mri_roi(
                h,
                sl,
                (origin, row_dir, col_dir, normal),
                spacing,
                box_center_mm,
                *box_side_mm,
                &s.roi_provider,
            ),
        });
    }
    Ok(out)
}

/// The CAM cube (`n`³, the input grid of the MRI branch, centred at
/// `center` with side `side` mm, patient-aligned) at patient point `q`,
/// trilinear; 0 outside the cube.
fn sample_cube(vol: &[f32], n: usize, center: [f64; 3], side: f64, q: [f64; 3]) -> f32 {
    // Patient point → continuous input index, trilinear.
    let f = |c: usize| ((q[c] - center[c]) / side + 0.5) * n as f64 - 0.5;
    let (x, y, z) = (f(0), f(1), f(2));
    if x < -0.5
        || y < -0.5
        || z < -0.5
        || x > n as f64 - 0.5
        || y > n as f64 - 0.5
        || z > n as f64 - 0.5
    {
        return 0.0;
    }
    let cl = |v: f64| v.clamp(0.0, (n - 1) as f64);
    let (x, y, z) = (cl(x), cl(y), cl(z));
    let (x0, y0, z0) = (x.floor() as usize, y.floor() as usize, z.floor() as usize);
    let (x1, y1, z1) = (
        (x0 + 1).min(n - 1),
        (y0 + 1).min(n - 1),
        (z0 + 1).min(n - 1),
    );
    let (fx, fy, fz) = (
        (x - x0 as f64) as f32,
        (y - y0 as f64) as f32,
        (z - z0 as f64) as f32,
    );
    let at = |k: usize, j: usize, i: usize| vol[(k * n + j) * n + i];
    let lerp = |a: f32, b: f32, t: f32| a + (b - a) * t;
    let c00 = lerp(at(z0, y0, x0), at(z0, y0, x1), fx);
    let c01 = lerp(at(z0, y1, x0), at(z0, y1, x1), fx);
    let c10 = lerp(at(z1, y0, x0), at(z1, y0, x1), fx);
    let c11 = lerp(at(z1, y1, x0), at(z1, y1, x1), fx);
    lerp(lerp(c00, c01, fy), lerp(c10, c11, fy), fz)
}
