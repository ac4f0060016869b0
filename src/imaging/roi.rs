//! Regions of interest: the `RoiProvider` trait and its providers, tried in
//! order per modality (docs/imaging.md):
//! 1. `dicom-annotation`: ROIs carried by DICOM objects of the same patient —
//!    Grayscale Softcopy Presentation State graphic annotations (PS3.3
//!    C.10.5 Graphic Annotation module, units PIXEL) and Structured Report
//!    SCOORD / SCOORD3D content items (PS3.3 C.18.6/C.18.9, TID 1500
//!    planar/volumetric ROIs) that reference the chosen images;
//! 2. image-derived: `mri-enhancement` (strongest enhancing region of
//!    post − pre subtraction) and `mg-blob` (most prominent compact bright
//!    region of the mammogram, a documented fallback: mapping the MRI lesion
//!    onto projection mammograms needs a registration we do not have);
//! 3. `centred`: a centred crop as the last resort.

use std::collections::HashMap;

use dicom_dictionary_std::tags;
use rayon::prelude::*;

use super::attrs::{self, Obj};
use super::decode::GrayImage;
use super::resize::Grid3;
use super::select::{InstanceMeta, Kind, Laterality, SOP_GSPS, SOP_SEG, SliceGeom, Stack};
use crate::modality::Modality;

/// Axis-aligned box in source pixels (x0, y0, x1, y1), exclusive ends.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PixelBox {
    pub x0: f64,
    pub y0: f64,
    pub x1: f64,
    pub y1: f64,
}

impl PixelBox {
    pub fn center(&self) -> (f64, f64) {
        ((self.x0 + self.x1) / 2.0, (self.y0 + self.y1) / 2.0)
    }
    pub fn contains(&self, x: f64, y: f64) -> bool {
        x >= self.x0 && x < self.x1 && y >= self.y0 && y < self.y1
    }
}

/// Axis-aligned box in patient coordinates (mm, LPS).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PatientBox {
    pub min: [f64; 3],
    pub max: [f64; 3],
}

impl PatientBox {
    pub fn center(&self) -> [f64; 3] {
        [0, 1, 2].map(|a| (self.min[a] + self.max[a]) / 2.0)
    }
    pub fn extent(&self) -> [f64; 3] {
        [0, 1, 2].map(|a| self.max[a] - self.min[a])
    }
    fn from_points(pts: &[[f64; 3]]) -> Option<PatientBox> {
        let first = pts.first()?;
        let mut b = PatientBox {
            min: *first,
            max: *first,
        };
        for p in pts {
            for (a, v) in p.iter().enumerate() {
                b.min[a] = b.min[a].min(*v);
                b.max[a] = b.max[a].max(*v);
            }
        }
        Some(b)
    }
}

/// A 2-D image the model sees (mammogram view) and what is known about it.
pub struct PlanarTarget<'a> {
    pub sop_instance_uid: &'a str,
    pub frame: u32,
    pub image: &'a GrayImage,
    pub pixel_spacing_mm: Option<f64>,
}

/// The MRI phase the model sees, with its pre-contrast partner when found.
pub struct VolumeTarget<'a> {
    pub stack: &'a Stack,
    pub post: &'a Grid3,
    /// Post − pre pooled in-plane ([`pool_grid`], [`pool_slice`]), when a
    /// pre-contrast phase on the same grid was decoded: the only form of the
    /// pre phase that is kept.
    pub pooled_subtraction: Option<&'a Grid3>,
    pub side: Option<Laterality>,
}

/// A source of lesion regions. Providers return `None` when they have
/// nothing for a target; the caller then tries the next one.
pub trait RoiProvider: Send + Sync {
    /// Stable name, recorded in the selection of each modality.
    fn name(&self) -> &'static str;
    fn planar(&self, target: &PlanarTarget<'_>) -> Option<PixelBox>;
    fn volume(&self, target: &VolumeTarget<'_>) -> Option<PatientBox>;
}

// ------------------------------------------------------ DICOM annotations

/// One annotation: a pixel box on a referenced image (frame 0-based, `None`
/// = all frames), or a set of patient-space points (SCOORD3D).
#[derive(Clone, Debug)]
enum Annotation {
    Planar {
        sop: String,
        frame: Option<u32>,
        bx: PixelBox,
    },
    Patient(PatientBox),
}

/// ROIs read from GSPS and SR objects of the patient.
pub struct DicomAnnotationRoi {
    annotations: Vec<Annotation>,
    /// Geometry of every MR slice (SOP UID, frame) so that a 2-D annotation
    /// drawn on an MR slice becomes a 3-D region.
    mr_geoms: HashMap<(String, u32), SliceGeom>,
}

impl DicomAnnotationRoi {
    pub fn from_index(index: &[InstanceMeta]) -> DicomAnnotationRoi {
        let mut annotations = Vec::new();
        let mut mr_geoms = HashMap::new();
        for m in index {
            match m.kind {
                Kind::RoiObject if m.sop_class == SOP_GSPS => {
                    gsps_annotations(&m.header, &mut annotations)
                }
                Kind::RoiObject if m.sop_class == SOP_SEG => {
                    seg_annotations(&m.path, &mut annotations)
                }
                Kind::RoiObject => sr_annotations(&m.header, &mut annotations, None),
                Kind::Image(Modality::MR) => {
                    if let Some(g) = m.geom {
                        mr_geoms.insert((m.sop_instance.clone(), 0), g);
                    }
                    for (f, (g, _)) in m.frame_geoms.iter().enumerate() {
                        if let Some(g) = g {
                            mr_geoms.insert((m.sop_instance.clone(), f as u32), *g);
                        }
                    }
                }
                _ => {}
            }
        }
        DicomAnnotationRoi {
            annotations,
            mr_geoms,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.annotations.is_empty()
    }

    /// Number of ROI annotations found.
    pub fn len(&self) -> usize {
        self.annotations.len()
    }

    /// Union box of the planar annotations on `sop_instance_uid` (any frame).
    pub fn planar_box(&self, sop_instance_uid: &str) -> Option<PixelBox> {
        union_boxes(self.annotations.iter().filter_map(|a| match a {
            Annotation::Planar { sop, bx, .. } if sop == sop_instance_uid => Some(*bx),
            _ => None,
        }))
    }
}

/// Bounding box of GraphicData (column, row pairs) of a given Graphic Type.
fn graphic_box(kind: &str, data: &[f64]) -> Option<PixelBox> {
    let pts: Vec<(f64, f64)> = data.chunks_exact(2).map(|c| (c[0], c[1])).collect();
    let first = *pts.first()?;
    let bb = |pts: &[(f64, f64)]| {
        let mut b = PixelBox {
            x0: first.0,
            y0: first.1,
            x1: first.0,
            y1: first.1,
        };
        for &(x, y) in pts {
            b.x0 = b.x0.min(x);
            b.y0 = b.y0.min(y);
            b.x1 = b.x1.max(x);
            b.y1 = b.y1.max(y);
        }
        b
    };
    let b = match kind {
        // C.10.5.1.2: CIRCLE = centre + one point on the circumference.
        "CIRCLE" if pts.len() >= 2 => {
            let r = ((pts[1].0 - first.0).powi(2) + (pts[1].1 - first.1).powi(2)).sqrt();
            PixelBox {
                x0: first.0 - r,
                y0: first.1 - r,
                x1: first.0 + r,
                y1: first.1 + r,
            }
        }
        _ => bb(&pts),
    };
    // A point or a degenerate line still marks a location: give it 1 px.
    Some(PixelBox {
        x0: b.x0,
        y0: b.y0,
        x1: b.x1.max(b.x0 + 1.0),
        y1: b.y1.max(b.y0 + 1.0),
    })
}

/// PS3.3 C.10.5 Graphic Annotation Sequence; only PIXEL units are used
/// (DISPLAY units depend on the displayed area and are skipped).
fn gsps_annotations(o: &Obj, out: &mut Vec<Annotation>) {
    for ann in attrs::items(o, tags::GRAPHIC_ANNOTATION_SEQUENCE) {
        let refs: Vec<(String, Option<u32>)> = attrs::items(ann, tags::REFERENCED_IMAGE_SEQUENCE)
            .iter()
            .filter_map(|r| {
                let sop = attrs::text(r, tags::REFERENCED_SOP_INSTANCE_UID)?;
                let frame = attrs::int(r, tags::REFERENCED_FRAME_NUMBER)
                    .filter(|f| *f >= 1)
                    .map(|f| (f - 1) as u32);
                Some((sop, frame))
            })
            .collect();
        for g in attrs::items(ann, tags::GRAPHIC_OBJECT_SEQUENCE) {
            let units = attrs::text(g, tags::GRAPHIC_ANNOTATION_UNITS).unwrap_or_default();
            if units != "PIXEL" {
                continue;
            }
            let kind = attrs::text(g, tags::GRAPHIC_TYPE).unwrap_or_default();
            if let Some(b) = graphic_box(&kind, &attrs::floats(g, tags::GRAPHIC_DATA)) {
                // PIXEL units: top-left corner of the image is (0,0), pixel
                // centres at +0.5 — so the values are already our box units.
                for (sop, frame) in &refs {
                    out.push(Annotation::Planar {
                        sop: sop.clone(),
                        frame: *frame,
                        bx: b,
                    });
                }
            }
        }
    }
}

/// Segmentation (PS3.3 A.51, C.8.20): each frame's non-zero pixels give a
/// box on the source image named by its Derivation Image functional group
/// (C.7.6.16.2.6), or, without one, a patient-space box from its Plane
/// Position / Orientation / Pixel Measures groups. BINARY segmentations are
/// bit-packed across frames (PS3.5 8.1.1); FRACTIONAL ones use 8 bits (> 0 = in).
/// Only native (uncompressed) SEG pixel data are read.
fn seg_annotations(path: &std::path::Path, out: &mut Vec<Annotation>) {
    let Ok(obj) = dicom_object::OpenFileOptions::new().open_file(path) else {
        return;
    };
    let rows = attrs::int(&obj, tags::ROWS).unwrap_or(0).max(0) as usize;
    let cols = attrs::int(&obj, tags::COLUMNS).unwrap_or(0).max(0) as usize;
    let frames = attrs::int(&obj, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1) as usize;
    let bits = attrs::int(&obj, tags::BITS_ALLOCATED).unwrap_or(1);
    let Some(px) = obj
        .get(tags::PIXEL_DATA)
        .and_then(|e| e.value().primitive())
        .map(|p| p.to_bytes().into_owned())
    else {
        return;
    };
    let n = rows * cols;
    if n == 0 {
        return;
    }
    for f in 0..frames {
        let on = |i: usize| -> bool {
            match bits {
                1 => {
                    let bit = f * n + i;
                    px.get(bit / 8).is_some_and(|b| (b >> (bit % 8)) & 1 == 1)
                }
                _ => px.get(f * n + i).is_some_and(|b| *b > 0),
            }
        };
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        for i in 0..n {
            if on(i) {
                let (x, y) = (i % cols, i / cols);
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x + 1);
                y1 = y1.max(y + 1);
            }
        }
        if x0 == usize::MAX {
            continue;
        }
        let bx = PixelBox {
            x0: x0 as f64,
            y0: y0 as f64,
            x1: x1 as f64,
            y1: y1 as f64,
        };
        let source = attrs::functional_group(&obj, f, tags::DERIVATION_IMAGE_SEQUENCE)
            .and_then(|d| attrs::item(d, tags::SOURCE_IMAGE_SEQUENCE))
            .and_then(|s| {
                let sop = attrs::text(s, tags::REFERENCED_SOP_INSTANCE_UID)?;
                let frame = attrs::int(s, tags::REFERENCED_FRAME_NUMBER)
                    .filter(|v| *v >= 1)
                    .map(|v| (v - 1) as u32);
                Some((sop, frame))
            });
        if let Some((sop, frame)) = source {
            out.push(Annotation::Planar { sop, frame, bx });
            continue;
        }
        let pos = attrs::functional_group(&obj, f, tags::PLANE_POSITION_SEQUENCE)
            .map(|g| attrs::floats(g, tags::IMAGE_POSITION_PATIENT));
        let ori = attrs::functional_group(&obj, f, tags::PLANE_ORIENTATION_SEQUENCE)
            .map(|g| attrs::floats(g, tags::IMAGE_ORIENTATION_PATIENT));
        let sp = attrs::functional_group(&obj, f, tags::PIXEL_MEASURES_SEQUENCE)
            .map(|g| attrs::floats(g, tags::PIXEL_SPACING));
        if let (Some(p), Some(o), Some(sp)) = (pos, ori, sp)
            && p.len() >= 3
            && o.len() >= 6
            && sp.len() >= 2
        {
            let g = SliceGeom {
                position: [p[0], p[1], p[2]],
                row_dir: [o[0], o[1], o[2]],
                col_dir: [o[3], o[4], o[5]],
                spacing: [sp[0], sp[1]],
            };
            let pts: Vec<[f64; 3]> = [
                (bx.x0, bx.y0),
                (bx.x1, bx.y1),
                (bx.x0, bx.y1),
                (bx.x1, bx.y0),
            ]
            .iter()
            .map(|&(x, y)| g.to_patient(x - 0.5, y - 0.5))
            .collect();
            if let Some(b) = PatientBox::from_points(&pts) {
                out.push(Annotation::Patient(b));
            }
        }
    }
}

/// Walk an SR content tree for SCOORD (with its referenced IMAGE child or
/// the parent's) and SCOORD3D items (PS3.3 C.18.6, C.18.9).
fn sr_annotations(o: &Obj, out: &mut Vec<Annotation>, inherited: Option<(String, Option<u32>)>) {
    for item in attrs::items(o, tags::CONTENT_SEQUENCE) {
        let vt = attrs::text(item, tags::VALUE_TYPE).unwrap_or_default();
        let image_ref = attrs::items(item, tags::CONTENT_SEQUENCE)
            .iter()
            .find(|c| attrs::text(c, tags::VALUE_TYPE).as_deref() == Some("IMAGE"))
            .and_then(|c| attrs::item(c, tags::REFERENCED_SOP_SEQUENCE))
            .and_then(|r| {
                let sop = attrs::text(r, tags::REFERENCED_SOP_INSTANCE_UID)?;
                let frame = attrs::int(r, tags::REFERENCED_FRAME_NUMBER)
                    .filter(|f| *f >= 1)
                    .map(|f| (f - 1) as u32);
                Some((sop, frame))
            })
            .or_else(|| inherited.clone());
        match vt.as_str() {
            "SCOORD" => {
                let kind = attrs::text(item, tags::GRAPHIC_TYPE).unwrap_or_default();
                if let (Some((sop, frame)), Some(b)) = (
                    image_ref.clone(),
                    graphic_box(&kind, &attrs::floats(item, tags::GRAPHIC_DATA)),
                ) {
                    out.push(Annotation::Planar { sop, frame, bx: b });
                }
            }
            "SCOORD3D" => {
                let pts: Vec<[f64; 3]> = attrs::floats(item, tags::GRAPHIC_DATA)
                    .chunks_exact(3)
                    .map(|c| [c[0], c[1], c[2]])
                    .collect();
                if let Some(b) = PatientBox::from_points(&pts) {
                    out.push(Annotation::Patient(b));
                }
            }
            _ => {}
        }
        sr_annotations(item, out, image_ref);
    }
}

impl RoiProvider for DicomAnnotationRoi {
    fn name(&self) -> &'static str {
        "dicom-annotation"
    }

    fn planar(&self, t: &PlanarTarget<'_>) -> Option<PixelBox> {
        union_boxes(self.annotations.iter().filter_map(|a| match a {
            Annotation::Planar { sop, frame, bx }
                if sop == t.sop_instance_uid && frame.is_none_or(|f| f == t.frame) =>
            {
                Some(*bx)
            }
            _ => None,
        }))
    }

    fn volume(&self, t: &VolumeTarget<'_>) -> Option<PatientBox> {
        let mut pts = Vec::new();
        for a in &self.annotations {
            match a {
                Annotation::Patient(b) => {
                    pts.push(b.min);
                    pts.push(b.max);
                }
                Annotation::Planar { sop, frame, bx } => {
                    let Some(g) = self.mr_geoms.get(&(sop.clone(), frame.unwrap_or(0))) else {
                        continue;
                    };
                    // A 2-D outline on one slice: extend it along the slice
                    // normal by its mean in-plane size (a roughly round lesion).
                    let half =
                        0.25 * ((bx.x1 - bx.x0) * g.spacing[1] + (bx.y1 - bx.y0) * g.spacing[0]);
                    let n = g.normal();
                    for (x, y) in [
                        (bx.x0, bx.y0),
                        (bx.x1, bx.y1),
                        (bx.x0, bx.y1),
                        (bx.x1, bx.y0),
                    ] {
                        let p = g.to_patient(x - 0.5, y - 0.5);
                        for s in [-half, half] {
                            pts.push([p[0] + n[0] * s, p[1] + n[1] * s, p[2] + n[2] * s]);
                        }
                    }
                }
            }
        }
        let b = PatientBox::from_points(&pts)?;
        // Only an ROI that lies inside the target volume counts.
        let v = t.stack.to_voxel(b.center());
        let inside = v[0] >= -0.5
            && v[0] <= t.stack.slices.len() as f64 - 0.5
            && v[1] >= -0.5
            && v[1] <= t.stack.rows as f64 - 0.5
            && v[2] >= -0.5
            && v[2] <= t.stack.cols as f64 - 0.5;
        inside.then_some(b)
    }
}

fn union_boxes(it: impl Iterator<Item = PixelBox>) -> Option<PixelBox> {
    it.reduce(|a, b| PixelBox {
        x0: a.x0.min(b.x0),
        y0: a.y0.min(b.y0),
        x1: a.x1.max(b.x1),
        y1: a.y1.max(b.y1),
    })
}

// ------------------------------------------------------ image-derived

/// MRI: strongest enhancing region of post − pre (or of post alone when no
/// pre-contrast phase is available), restricted to the lesion-side half of
/// the patient when the side is known.
///
/// Steps: in-plane average pooling to ≤ 128 columns; subtraction; 3×3×3 box
/// smoothing; arg-max inside the side mask; 6-connected region growing over
/// voxels ≥ 50 % of the peak (at most 5 % of the volume); its bounding box.
pub struct EnhancementRoi;

impl RoiProvider for EnhancementRoi {
    fn name(&self) -> &'static str {
        "mri-enhancement"
    }
    fn planar(&self, _: &PlanarTarget<'_>) -> Option<PixelBox> {
        None
    }
    fn volume(&self, t: &VolumeTarget<'_>) -> Option<PatientBox> {
        let [nz, ny, nx] = t.post.shape;
        let (f, py, px) = pool_grid(ny, nx);
        let pooled_post;
        let d: &[f32] = match t.pooled_subtraction {
            Some(g) if g.shape == [nz, py, px] => &g.data,
            Some(_) => return None,
            None => {
                let mut d = vec![0f32; nz * py * px];
                d.par_chunks_mut(py * px)
                    .zip(t.post.data.par_chunks(ny * nx))
                    .for_each(|(plane, post)| pool_slice(post, None, nx, f, px, plane));
                pooled_post = d;
                &pooled_post
            }
        };
        let sm = box3(d, [nz, py, px]);
        // Side mask: patient +x is the patient's left (LPS).
        let mid = t.stack.to_patient(
            (nz as f64 - 1.0) / 2.0,
            (ny as f64 - 1.0) / 2.0,
            (nx as f64 - 1.0) / 2.0,
        )[0];
        let side_ok = |z: usize, y: usize, x: usize| -> bool {
            match t.side {
                None => true,
                Some(s) => {
                    let p = t.stack.to_patient(z as f64, (y * f) as f64, (x * f) as f64)[0];
                    match s {
                        Laterality::Left => p >= mid,
                        Laterality::Right => p < mid,
                    }
                }
            }
        };
        let mut best = (f32::NEG_INFINITY, 0usize);
        for z in 0..nz {
            for y in 0..py {
                for x in 0..px {
                    let i = (z * py + y) * px + x;
                    if sm[i] > best.0 && side_ok(z, y, x) {
                        best = (sm[i], i);
                    }
                }
            }
        }
        if !best.0.is_finite() || best.0 <= 0.0 {
            return None;
        }
        let thr = best.0 * 0.5;
        let cap = (nz * py * px / 20).max(1);
        let (lo, hi) = grow(&sm, [nz, py, px], best.1, thr, cap);
        // Back to full-resolution voxel edges, then patient space.
        let vlo = [
            lo[0] as f64 - 0.5,
            (lo[1] * f) as f64 - 0.5,
            (lo[2] * f) as f64 - 0.5,
        ];
        let vhi = [
            hi[0] as f64 + 0.5,
            ((hi[1] + 1) * f) as f64 - 0.5,
            ((hi[2] + 1) * f) as f64 - 0.5,
        ];
        let mut pts = Vec::new();
        for z in [vlo[0], vhi[0]] {
            for y in [vlo[1], vhi[1]] {
                for x in [vlo[2], vhi[2]] {
                    pts.push(t.stack.to_patient(z, y, x));
                }
            }
        }
        PatientBox::from_points(&pts)
    }
}

/// In-plane pooling of the enhancement search for `ny × nx` slices: the
/// factor f (so that at most 128 columns remain) and the pooled rows and
/// columns.
pub fn pool_grid(ny: usize, nx: usize) -> (usize, usize, usize) {
    let f = nx.max(ny).div_ceil(128).max(1);
    (f, ny.div_ceil(f), nx.div_ceil(f))
}

/// Average-pool one slice of post − pre (post alone without `pre`) by `f`
/// in-plane into `plane` (`px` columns). Each cell sums its voxels row by
/// row, left to right, whoever calls it, so the result does not depend on
/// how slices are spread over threads or when the pre phase is decoded.
pub fn pool_slice(
    post: &[f32],
    pre: Option<&[f32]>,
    nx: usize,
    f: usize,
    px: usize,
    plane: &mut [f32],
) {
    let ny = post.len() / nx.max(1);
    for (y, post) in post.chunks_exact(nx).enumerate() {
        let cells = &mut plane[(y / f) * px..(y / f + 1) * px];
        match pre {
            Some(pre) => {
                let pre = &pre[y * nx..(y + 1) * nx];
                for ((cell, post), pre) in cells.iter_mut().zip(post.chunks(f)).zip(pre.chunks(f)) {
                    for (a, b) in post.iter().zip(pre) {
                        *cell += a - b;
                    }
                }
            }
            None => {
                for (cell, post) in cells.iter_mut().zip(post.chunks(f)) {
                    for a in post {
                        *cell += a - 0.0;
                    }
                }
            }
        }
    }
    // Voxels per cell: f × f, fewer in the last row and column of cells.
    for (i, v) in plane.iter_mut().enumerate() {
        let (cy, cx) = (i / px, i % px);
        let n = (ny - cy * f).min(f) * (nx - cx * f).min(f);
        *v /= n.max(1) as f32;
    }
}

/// 3×3×3 box mean (edges use the available neighbours).
fn box3(v: &[f32], s: [usize; 3]) -> Vec<f32> {
    let mut cur = v.to_vec();
    for axis in 0..3 {
        let mut out = vec![0f32; cur.len()];
        let stride = match axis {
            0 => s[1] * s[2],
            1 => s[2],
            _ => 1,
        };
        let n = s[axis];
        for (i, o) in out.iter_mut().enumerate() {
            let c = (i / stride) % n;
            let mut acc = cur[i];
            let mut k = 1.0;
            if c > 0 {
                acc += cur[i - stride];
                k += 1.0;
            }
            if c + 1 < n {
                acc += cur[i + stride];
                k += 1.0;
            }
            *o = acc / k;
        }
        cur = out;
    }
    cur
}

/// 6-connected region growing from `seed` over values ≥ `thr`; returns the
/// inclusive bounding box (z, y, x).
fn grow(v: &[f32], s: [usize; 3], seed: usize, thr: f32, cap: usize) -> ([usize; 3], [usize; 3]) {
    let coord = |i: usize| [i / (s[1] * s[2]), (i / s[2]) % s[1], i % s[2]];
    let mut seen = vec![false; v.len()];
    let mut stack = vec![seed];
    seen[seed] = true;
    let c0 = coord(seed);
    let (mut lo, mut hi) = (c0, c0);
    let mut n = 0;
    while let Some(i) = stack.pop() {
        n += 1;
        if n > cap {
            break;
        }
        let c = coord(i);
        for a in 0..3 {
            lo[a] = lo[a].min(c[a]);
            hi[a] = hi[a].max(c[a]);
        }
        let strides = [s[1] * s[2], s[2], 1];
        for a in 0..3 {
            for dir in [-1i64, 1] {
                let nc = c[a] as i64 + dir;
                if nc < 0 || nc >= s[a] as i64 {
                    continue;
                }
                let j = (i as i64 + dir * strides[a] as i64) as usize;
                if !seen[j] && v[j] >= thr {
                    seen[j] = true;
                    stack.push(j);
                }
            }
        }
    }
    (lo, hi)
}

/// Mammography fallback: the most prominent compact bright region —
/// difference of box means (radius 1.5 % vs 6 % of the longer side, on a
/// ≤ 512-pixel working copy) inside the breast (working-copy value > 0.05),
/// away from the image border; the box is the region ≥ 50 % of the peak
/// response around the peak.
pub struct MgBlobRoi;

impl RoiProvider for MgBlobRoi {
    fn name(&self) -> &'static str {
        "mg-blob"
    }
    fn planar(&self, t: &PlanarTarget<'_>) -> Option<PixelBox> {
        let img = t.image;
        let f = img.width.max(img.height).div_ceil(512).max(1);
        let (w, h) = (img.width.div_ceil(f), img.height.div_ceil(f));
        let mut small = vec![0f32; w * h];
        let mut cnt = vec![0u32; w * h];
        for y in 0..img.height {
            for x in 0..img.width {
                let j = (y / f) * w + x / f;
                small[j] += img.get(x, y);
                cnt[j] += 1;
            }
        }
        for (v, c) in small.iter_mut().zip(&cnt) {
            *v /= (*c).max(1) as f32;
        }
        let longer = w.max(h) as f64;
        let r1 = ((longer * 0.015) as usize).max(1);
        let r2 = ((longer * 0.06) as usize).max(r1 + 1);
        let m1 = box2(&small, w, h, r1);
        let m2 = box2(&small, w, h, r2);
        let border = ((longer * 0.03) as usize).max(1);
        let mut best = (0f32, 0usize);
        let mut score = vec![0f32; w * h];
        for y in border..h.saturating_sub(border) {
            for x in border..w.saturating_sub(border) {
                let i = y * w + x;
                if m2[i] > 0.05 {
                    score[i] = m1[i] - m2[i];
                    if score[i] > best.0 {
                        best = (score[i], i);
                    }
                }
            }
        }
        if best.0 <= 0.01 {
            return None;
        }
        let (lo, hi) = grow(&score, [1, h, w], best.1, best.0 * 0.5, w * h / 10);
        let fx = f as f64;
        Some(PixelBox {
            x0: lo[2] as f64 * fx,
            y0: lo[1] as f64 * fx,
            x1: ((hi[2] + 1) as f64 * fx).min(img.width as f64),
            y1: ((hi[1] + 1) as f64 * fx).min(img.height as f64),
        })
    }
    fn volume(&self, _: &VolumeTarget<'_>) -> Option<PatientBox> {
        None
    }
}

/// Separable box mean of radius r (summed-area along each axis).
fn box2(v: &[f32], w: usize, h: usize, r: usize) -> Vec<f32> {
    let pass = |src: &[f32], n: usize, m: usize, idx: &dyn Fn(usize, usize) -> usize| -> Vec<f32> {
        let mut out = vec![0f32; src.len()];
        for j in 0..m {
            let mut pre = vec![0f64; n + 1];
            for i in 0..n {
                pre[i + 1] = pre[i] + src[idx(i, j)] as f64;
            }
            for i in 0..n {
                let a = i.saturating_sub(r);
                let b = (i + r + 1).min(n);
                out[idx(i, j)] = ((pre[b] - pre[a]) / (b - a) as f64) as f32;
            }
        }
        out
    };
    let hpass = pass(v, w, h, &|i, j| j * w + i);
    pass(&hpass, h, w, &|i, j| i * w + j)
}

/// Last resort: a centred region. Mammography: the centre of the breast's
/// bounding box (pixels > 0.05); MRI: the centre of the lesion-side half of
/// the volume (whole volume when the side is unknown). Extents are decided
/// by the caller's fallback crop size, so the box is a point-sized centre.
pub struct CentredRoi;

impl RoiProvider for CentredRoi {
    fn name(&self) -> &'static str {
        "centred"
    }
    fn planar(&self, t: &PlanarTarget<'_>) -> Option<PixelBox> {
        let img = t.image;
        let (mut x0, mut y0, mut x1, mut y1) = (img.width, img.height, 0, 0);
        for y in 0..img.height {
            for x in 0..img.width {
                if img.get(x, y) > 0.05 {
                    x0 = x0.min(x);
                    y0 = y0.min(y);
                    x1 = x1.max(x + 1);
                    y1 = y1.max(y + 1);
                }
            }
        }
        let (cx, cy) = if x1 > x0 && y1 > y0 {
            ((x0 + x1) as f64 / 2.0, (y0 + y1) as f64 / 2.0)
        } else {
            (img.width as f64 / 2.0, img.height as f64 / 2.0)
        };
        Some(PixelBox {
            x0: cx,
            y0: cy,
            x1: cx,
            y1: cy,
        })
    }
    fn volume(&self, t: &VolumeTarget<'_>) -> Option<PatientBox> {
        let [nz, ny, nx] = t.post.shape;
        let c = t.stack.to_patient(
            (nz as f64 - 1.0) / 2.0,
            (ny as f64 - 1.0) / 2.0,
            (nx as f64 - 1.0) / 2.0,
        );
        let mut c2 = c;
        if let Some(s) = t.side {
            // Quarter of the left-right extent towards the lesion side.
            let corners = [
                t.stack.to_patient(0.0, 0.0, 0.0),
                t.stack
                    .to_patient(nz as f64 - 1.0, ny as f64 - 1.0, nx as f64 - 1.0),
            ];
            let span = (corners[1][0] - corners[0][0]).abs();
            c2[0] += match s {
                Laterality::Left => span / 4.0,
                Laterality::Right => -span / 4.0,
            };
        }
        Some(PatientBox { min: c2, max: c2 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn circle_and_polyline_boxes() {
        let c = graphic_box("CIRCLE", &[10.0, 10.0, 13.0, 14.0]).unwrap();
        assert_eq!((c.x0, c.y0, c.x1, c.y1), (5.0, 5.0, 15.0, 15.0));
        let p = graphic_box("POLYLINE", &[1.0, 2.0, 5.0, 3.0, 4.0, 9.0]).unwrap();
        assert_eq!((p.x0, p.y0, p.x1, p.y1), (1.0, 2.0, 5.0, 9.0));
    }

    #[test]
    fn sr_tid1500_scoord_and_scoord3d() {
        use dicom_core::value::DataSetSequence;
        use dicom_core::{DataElement, PrimitiveValue, VR};
        let sq = |tag, items: Vec<Obj>| DataElement::new(tag, VR::SQ, DataSetSequence::from(items));
        let image = Obj::from_element_iter([
            DataElement::new(tags::VALUE_TYPE, VR::CS, PrimitiveValue::from("IMAGE")),
            sq(
                tags::REFERENCED_SOP_SEQUENCE,
                vec![Obj::from_element_iter([DataElement::new(
                    tags::REFERENCED_SOP_INSTANCE_UID,
                    VR::UI,
                    PrimitiveValue::from("1.2.3"),
                )])],
            ),
        ]);
        // TID 1410 planar ROI: SCOORD POLYLINE with its source IMAGE child.
        let scoord = Obj::from_element_iter([
            DataElement::new(tags::VALUE_TYPE, VR::CS, PrimitiveValue::from("SCOORD")),
            DataElement::new(tags::GRAPHIC_TYPE, VR::CS, PrimitiveValue::from("POLYLINE")),
            DataElement::new(
                tags::GRAPHIC_DATA,
                VR::FL,
                PrimitiveValue::F32(
                    (&[10.0f32, 20.0, 30.0, 20.0, 30.0, 40.0, 10.0, 20.0][..]).into(),
                ),
            ),
            sq(tags::CONTENT_SEQUENCE, vec![image]),
        ]);
        // TID 1411 volumetric ROI as SCOORD3D points.
        let scoord3d = Obj::from_element_iter([
            DataElement::new(tags::VALUE_TYPE, VR::CS, PrimitiveValue::from("SCOORD3D")),
            DataElement::new(tags::GRAPHIC_TYPE, VR::CS, PrimitiveValue::from("POLYGON")),
            DataElement::new(
                tags::GRAPHIC_DATA,
                VR::FL,
                PrimitiveValue::F32((&[1.0f32, 2.0, 3.0, 5.0, 6.0, 7.0, 1.0, 2.0, 3.0][..]).into()),
            ),
        ]);
        let container = Obj::from_element_iter([
            DataElement::new(tags::VALUE_TYPE, VR::CS, PrimitiveValue::from("CONTAINER")),
            sq(tags::CONTENT_SEQUENCE, vec![scoord, scoord3d]),
        ]);
        let sr = Obj::from_element_iter([sq(tags::CONTENT_SEQUENCE, vec![container])]);
        let mut out = Vec::new();
        sr_annotations(&sr, &mut out, None);
        assert_eq!(out.len(), 2);
        let roi = DicomAnnotationRoi {
            annotations: out,
            mr_geoms: HashMap::new(),
        };
        let b = roi.planar_box("1.2.3").unwrap();
        assert_eq!((b.x0, b.y0, b.x1, b.y1), (10.0, 20.0, 30.0, 40.0));
        assert!(roi.annotations.iter().any(|a| matches!(a, Annotation::Patient(p) if p.min == [1.0, 2.0, 3.0] && p.max == [5.0, 6.0, 7.0])));
    }

    #[test]
    fn blob_found() {
        let (w, h) = (200, 160);
        let mut data = vec![0.3f32; w * h];
        for y in 0..h {
            for x in 0..w {
                if (x as f64 - 120.0).powi(2) + (y as f64 - 60.0).powi(2) < 64.0 {
                    data[y * w + x] = 0.9;
                }
            }
        }
        let img = GrayImage {
            width: w,
            height: h,
            data,
        };
        let t = PlanarTarget {
            sop_instance_uid: "1",
            frame: 0,
            image: &img,
            pixel_spacing_mm: None,
        };
        let b = MgBlobRoi.planar(&t).unwrap();
        assert!(b.contains(120.0, 60.0), "{b:?}");
        assert!(b.x1 - b.x0 < 40.0);
    }
}
