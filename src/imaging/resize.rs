//! Resampling: a re-implementation of Pillow's `Image.resize(..., BILINEAR)`
//! (separable triangle filter whose support widens with the scale factor, i.e.
//! antialiased when shrinking; Pillow `libImaging/Resample.c`) on f32 images,
//! and trilinear sampling of a 3-D box for the MRI volume.
//!
//! Pillow parity is checked in tests against arrays produced by Pillow itself
//! (test-data/imaging/resize_*.f32, see the README there).

use super::decode::GrayImage;

/// Per output sample: first input index and normalised weights.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    weights: Vec<Vec<f64>>,
}

/// Pillow's `precompute_coeffs` for the bilinear (triangle, support 1) filter
/// over the input span [in0, in1) mapped onto `out_size` samples.
fn precompute(in_size: usize, in0: f64, in1: f64, out_size: usize) -> Coeffs {
    let scale = (in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // triangle support 1.0 × filterscale
    let ss = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = in0 + (xx as f64 + 0.5) * scale;
        // Pillow truncates toward zero (C cast) after adding 0.5.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64)
            .min(in_size as i64)
            .max(xmin as i64) as usize;
        let mut w: Vec<f64> = (xmin..xmax)
            .map(|x| {
                let t = ((x as f64 - center + 0.5) * ss).abs();
                if t < 1.0 { 1.0 - t } else { 0.0 }
            })
            .collect();
        let sum: f64 = w.iter().sum();
        if sum != 0.0 {
            for v in w.iter_mut() {
                *v /= sum;
            }
        }
        bounds.push((xmin, xmax - xmin));
        weights.push(w);
    }
    Coeffs { bounds, weights }
}

/// Resize like Pillow `resize((out_w, out_h), BILINEAR)` on mode "F"
/// (horizontal pass, then vertical pass, f32 intermediate like Pillow's
/// float path). Same size returns a copy.
pub fn resize_bilinear(img: &GrayImage, out_w: usize, out_h: usize) -> GrayImage {
    resize_box(
        img,
        (0.0, 0.0, img.width as f64, img.height as f64),
        out_w,
        out_h,
    )
}

/// Resize the sub-rectangle `(x0, y0, x1, y1)` (source pixels, may be
/// fractional, like Pillow's `box=` argument) to `out_w × out_h`.
pub fn resize_box(
    img: &GrayImage,
    bx: (f64, f64, f64, f64),
    out_w: usize,
    out_h: usize,
) -> GrayImage {
    let (x0, y0, x1, y1) = bx;
    if img.width == 0 || img.height == 0 || out_w == 0 || out_h == 0 {
        return GrayImage {
            width: out_w,
            height: out_h,
            data: vec![0.0; out_w * out_h],
        };
    }
    let full = x0 == 0.0 && y0 == 0.0 && x1 == img.width as f64 && y1 == img.height as f64;
    if full && out_w == img.width && out_h == img.height {
        return img.clone();
    }
    // Horizontal pass over the rows the vertical pass will need.
    let cy = precompute(img.height, y0, y1, out_h);
    let row_lo = cy.bounds.iter().map(|b| b.0).min().unwrap_or(0);
    let row_hi = cy
        .bounds
        .iter()
        .map(|b| b.0 + b.1)
        .max()
        .unwrap_or(0)
        .max(row_lo);
    let cx = precompute(img.width, x0, x1, out_w);
    let mut tmp = vec![0f32; (row_hi - row_lo) * out_w];
    for (r, y) in (row_lo..row_hi).enumerate() {
        let src = &img.data[y * img.width..(y + 1) * img.width];
        let dst = &mut tmp[r * out_w..(r + 1) * out_w];
        for (xx, d) in dst.iter_mut().enumerate() {
            let (start, n) = cx.bounds[xx];
            let w = &cx.weights[xx];
            let mut acc = 0f64;
            for k in 0..n {
                acc += src[start + k] as f64 * w[k];
            }
            *d = acc as f32;
        }
    }
    let mut out = vec![0f32; out_w * out_h];
    for yy in 0..out_h {
        let (start, n) = cy.bounds[yy];
        let w = &cy.weights[yy];
        let dst = &mut out[yy * out_w..(yy + 1) * out_w];
        for (k, wk) in w.iter().enumerate().take(n) {
            let row = &tmp[(start + k - row_lo) * out_w..(start + k - row_lo + 1) * out_w];
            for (d, s) in dst.iter_mut().zip(row) {
                *d += (*s as f64 * wk) as f32;
            }
        }
    }
    GrayImage {
        width: out_w,
        height: out_h,
        data: out,
    }
}

/// A dense volume, axes (z, y, x), row-major.
#[derive(Clone, Debug)]
pub struct Grid3 {
    pub shape: [usize; 3],
    pub data: Vec<f32>,
}

impl Grid3 {
    #[inline]
    pub fn at(&self, z: usize, y: usize, x: usize) -> f32 {
        self.data[(z * self.shape[1] + y) * self.shape[2] + x]
    }

    /// Trilinear interpolation at a continuous voxel position (z, y, x),
    /// voxel centres at integers; positions outside are clamped to the edge
    /// (replicate padding), so a box reaching past the volume repeats the
    /// border instead of inventing zeros.
    pub fn sample(&self, z: f64, y: f64, x: f64) -> f32 {
        let clampi = |v: f64, n: usize| -> (usize, usize, f32) {
            let v = v.clamp(0.0, (n - 1) as f64);
            let i0 = v.floor() as usize;
            let i1 = (i0 + 1).min(n - 1);
            (i0, i1, (v - i0 as f64) as f32)
        };
        let (z0, z1, fz) = clampi(z, self.shape[0]);
        let (y0, y1, fy) = clampi(y, self.shape[1]);
        let (x0, x1, fx) = clampi(x, self.shape[2]);
        let l = |a: f32, b: f32, t: f32| a + (b - a) * t;
        let c00 = l(self.at(z0, y0, x0), self.at(z0, y0, x1), fx);
        let c01 = l(self.at(z0, y1, x0), self.at(z0, y1, x1), fx);
        let c10 = l(self.at(z1, y0, x0), self.at(z1, y0, x1), fx);
        let c11 = l(self.at(z1, y1, x0), self.at(z1, y1, x1), fx);
        l(l(c00, c01, fy), l(c10, c11, fy), fz)
    }

    /// Resample the box `lo..hi` (continuous voxel coordinates of its outer
    /// edges, per axis z,y,x) onto `n³` samples at the cell centres.
    pub fn resample_box(&self, lo: [f64; 3], hi: [f64; 3], n: usize) -> Grid3 {
        let step = [0, 1, 2].map(|a| (hi[a] - lo[a]) / n as f64);
        let mut data = vec![0f32; n * n * n];
        use rayon::prelude::*;
        data.par_chunks_mut(n * n)
            .enumerate()
            .for_each(|(k, plane)| {
                let z = lo[0] + (k as f64 + 0.5) * step[0] - 0.5;
                for j in 0..n {
                    let y = lo[1] + (j as f64 + 0.5) * step[1] - 0.5;
                    for i in 0..n {
                        let x = lo[2] + (i as f64 + 0.5) * step[2] - 0.5;
                        plane[j * n + i] = self.sample(z, y, x);
                    }
                }
            });
        Grid3 {
            shape: [n, n, n],
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_stays_constant() {
        let img = GrayImage {
            width: 37,
            height: 23,
            data: vec![0.25; 37 * 23],
        };
        for (w, h) in [(256, 256), (5, 7), (37, 23)] {
            let r = resize_bilinear(&img, w, h);
            assert!(r.data.iter().all(|v| (v - 0.25).abs() < 1e-6));
        }
    }

    #[test]
    fn trilinear_identity_on_linear_ramp() {
        let n = 8;
        let data = (0..n * n * n).map(|i| (i % n) as f32).collect();
        let g = Grid3 {
            shape: [n, n, n],
            data,
        };
        let r = g.resample_box([0.0; 3], [n as f64; 3], n);
        for (a, b) in r.data.iter().zip(&g.data) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
