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

use rayon::prelude::*;

use super::decode::GrayImage;
use super::resize::Grid3;
use super::select::{Laterality, Stack};

mod annotation;
pub use annotation::DicomAnnotationRoi;

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
