//! The mammography input: CC and MLO of the lesion side (whole views) and
//! the tumour crops placed by the ROI providers, as the four input planes.

use rayon::prelude::*;

use super::decode::GrayImage;
use super::resize::{self};
use super::roi::{CentredRoi, DicomAnnotationRoi, MgBlobRoi, PixelBox, PlanarTarget, RoiProvider};
use super::select::{self, Kind};
use super::{
    ImagingSettings, InputGrid, InstanceError, InstanceMeta, Laterality, Modality, Part, Planes4,
    Selection, clamp01, load_gray, shared_base,
};

pub(super) fn prepare_mg(
    metas: &[InstanceMeta],
    s: &ImagingSettings,
    grid: InputGrid,
    side: Option<Laterality>,
    ann: Option<&DicomAnnotationRoi>,
) -> Part<Planes4> {
    let (mut errors, mut notes) = (Vec::new(), Vec::new());
    let Some(side) = side else {
        return (None, vec![], errors, notes);
    };
    if !metas.iter().any(|m| m.kind == Kind::Image(Modality::MG)) {
        return (None, vec![], errors, notes);
    }
    let picks = select::select_mg(metas, side);
    let decoded: Vec<Option<(&InstanceMeta, Result<GrayImage, InstanceError>)>> = picks
        .par_iter()
        .map(|p| p.as_ref().map(|p| (p.meta, load_gray(p.meta, 0, s))))
        .collect();
    for p in picks.iter().flatten() {
        notes.extend(p.note.clone());
    }
    let mut views = Vec::new();
    for (i, d) in decoded.into_iter().enumerate() {
        let name = if i == 0 { "CC" } else { "MLO" };
        match d {
            None => notes.push(format!("MG: no {name} view of side {}", side.code())),
            Some((_, Err(e))) => errors.push(e),
            Some((m, Ok(img))) => views.push((name, m, img)),
        }
    }
    if views.len() < 2 {
        notes.push("MG: both CC and MLO of the lesion side are needed; MG input left out".into());
        return (None, vec![], errors, notes);
    }
    let n = grid.image;
    let mut data = vec![0f32; 4 * n * n];
    let mut sels = Vec::new();
    let mut providers: Vec<&dyn RoiProvider> = Vec::new();
    if let Some(a) = ann {
        providers.push(a);
    }
    if s.roi_image_derived {
        providers.push(&MgBlobRoi);
    }
    // The views are independent (resizes, ROI search, heatmap base): one
    // rayon task each, assembled in view order below.
    let per_view = |(name, m, img): &(&str, &InstanceMeta, GrayImage)| {
        let whole = clamp01(resize::resize_bilinear(img, n, n).data);
        let all = [0.0, 0.0, img.width as f64, img.height as f64];
        let whole_sel = Selection::planar(
            Modality::MG,
            name.to_string(),
            m,
            img,
            (0, all),
            "whole-image",
            shared_base(img, s),
        );
        let (provider, crop) = tumour_crop(m, img, s, &providers);
        let out = resize::resize_box(img, (crop[0], crop[1], crop[2], crop[3]), n, n);
        let crop_sel = Selection::planar(
            Modality::MG,
            format!("{name} crop"),
            m,
            img,
            (0, crop),
            provider,
            None,
        );
        (whole, whole_sel, clamp01(out.data), crop_sel)
    };
    let made: Vec<_> = views.par_iter().map(per_view).collect();
    for (c, (whole, whole_sel, crop, crop_sel)) in made.into_iter().enumerate() {
        data[c * n * n..(c + 1) * n * n].copy_from_slice(&whole);
        data[(c + 2) * n * n..(c + 3) * n * n].copy_from_slice(&crop);
        sels.push(whole_sel);
        sels.push(crop_sel);
    }
    (Some(Planes4 { size: n, data }), sels, errors, notes)
}

/// The tumour crop of one view: the first provider's box with the margin
/// and the minimum side, else a centred square; returns the provider's name
/// and the crop in source pixels.
fn tumour_crop(
    m: &InstanceMeta,
    img: &GrayImage,
    s: &ImagingSettings,
    providers: &[&dyn RoiProvider],
) -> (&'static str, [f64; 4]) {
    let target = PlanarTarget {
        sop_instance_uid: &m.sop_instance,
        frame: 0,
        image: img,
        pixel_spacing_mm: m.pixel_spacing_mm,
    };
    let found = providers
        .iter()
        .find_map(|p| p.planar(&target).map(|b| (p.name(), b)));
    let shorter = img.width.min(img.height) as f64;
    match found {
        Some((pname, b)) => {
            let min_side = match m.pixel_spacing_mm {
                Some(sp) => s.mg_min_crop_mm / sp,
                None => s.mg_min_crop_fraction * shorter,
            };
            let side_px = ((b.x1 - b.x0).max(b.y1 - b.y0) * s.mg_roi_margin).max(min_side);
            (
                pname,
                square_crop(b.center(), side_px, img.width, img.height),
            )
        }
        None => {
            let b = CentredRoi.planar(&target).unwrap_or(PixelBox {
                x0: img.width as f64 / 2.0,
                y0: img.height as f64 / 2.0,
                x1: img.width as f64 / 2.0,
                y1: img.height as f64 / 2.0,
            });
            (
                "centred",
                square_crop(
                    b.center(),
                    s.mg_fallback_crop_fraction * shorter,
                    img.width,
                    img.height,
                ),
            )
        }
    }
}

/// A square of `side` pixels centred at `c`, shifted (not shrunk) to stay
/// inside the image; shrunk only when larger than the image.
fn square_crop(c: (f64, f64), side: f64, w: usize, h: usize) -> [f64; 4] {
    let side = side.min(w.min(h) as f64).max(1.0);
    let place = |c: f64, n: f64| -> (f64, f64) {
        let lo = (c - side / 2.0).clamp(0.0, (n - side).max(0.0));
        (lo, lo + side)
    };
    let (x0, x1) = place(c.0, w as f64);
    let (y0, y1) = place(c.1, h as f64);
    [x0.round(), y0.round(), x1.round(), y1.round()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_stays_inside() {
        assert_eq!(
            square_crop((5.0, 5.0), 20.0, 100, 50),
            [0.0, 0.0, 20.0, 20.0]
        );
        assert_eq!(
            square_crop((99.0, 49.0), 20.0, 100, 50),
            [80.0, 30.0, 100.0, 50.0]
        );
        assert_eq!(
            square_crop((50.0, 25.0), 80.0, 100, 50),
            [25.0, 0.0, 75.0, 50.0]
        );
    }
}
