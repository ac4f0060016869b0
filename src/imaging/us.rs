//! The ultrasound input: the B-mode image of the lesion side (Doppler and
//! colour flow left out), its frame, the tissue region (US Region
//! Calibration, PS3.3 C.8.5.5) and the square input plane.

use std::panic::{AssertUnwindSafe, catch_unwind};

use super::decode::{self, DecodeError, GrayImage};
use super::resize::{self};
use super::select::{self, Kind};
use super::{
    ImagingSettings, InputGrid, InstanceMeta, Laterality, Modality, Part, Plane, Selection,
    UsFrameRule, clamp01, inst_err, open_full, shared_base,
};

fn us_frame(m: &InstanceMeta, rule: UsFrameRule) -> u32 {
    let n = m.frames.max(1);
    match rule {
        UsFrameRule::First => 0,
        UsFrameRule::Middle => n / 2,
        UsFrameRule::Index(i) => i.min(n - 1),
        UsFrameRule::RepresentativeOrMiddle => m
            .representative_frame
            .map(|f| (f - 1).min(n - 1))
            .unwrap_or(n / 2),
    }
}

pub(super) fn prepare_us(
    metas: &[InstanceMeta],
    s: &ImagingSettings,
    grid: InputGrid,
    side: Option<Laterality>,
) -> Part<Plane> {
    let (mut errors, mut notes) = (Vec::new(), Vec::new());
    let flagged = metas
        .iter()
        .filter(|m| m.kind == Kind::Image(Modality::US) && select::us_flagged_doppler(m))
        .count();
    if flagged > 0 {
        notes.push(format!(
            "US: {flagged} Doppler/colour-flagged instance(s) skipped"
        ));
    }
    let cands = select::us_candidates(metas, side);
    if cands.is_empty() {
        if metas.iter().any(|m| m.kind == Kind::Image(Modality::US)) {
            notes.push("US: no B-mode image of the lesion side".into());
        }
        return (None, vec![], errors, notes);
    }
    for m in cands {
        let frame = us_frame(m, s.us_frame);
        let obj = match open_full(&m.path) {
            Ok(o) => o,
            Err(e) => {
                errors.push(inst_err(m, e));
                continue;
            }
        };
        let result = catch_unwind(AssertUnwindSafe(
            || -> Result<(GrayImage, f32), DecodeError> {
                let colour = if s.us_skip_colour {
                    decode::chroma_fraction(&decode::decode_rgb(&obj, frame)?, 0.15)
                } else {
                    0.0
                };
                Ok((decode::decode_gray(&obj, frame, s.voi_window)?, colour))
            },
        ));
        let (img, colour) = match result {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                errors.push(inst_err(m, format!("frame {frame}: {e}")));
                continue;
            }
            Err(_) => {
                errors.push(inst_err(m, "decoder panicked"));
                continue;
            }
        };
        if colour > s.us_colour_fraction {
            notes.push(format!(
                "US: frame {frame} of an instance skipped as colour-dominant ({:.0}% coloured pixels)",
                colour * 100.0
            ));
            continue;
        }
        let (crop, provider) = match select::us_tissue_region(m).filter(|_| s.us_crop_to_region) {
            Some((x0, y0, x1, y1)) => ([x0 as f64, y0 as f64, x1 as f64, y1 as f64], "us-region"),
            None => (
                [0.0, 0.0, img.width as f64, img.height as f64],
                "whole-image",
            ),
        };
        let out = resize::resize_box(
            &img,
            (crop[0], crop[1], crop[2], crop[3]),
            grid.image,
            grid.image,
        );
        if m.frames > 1 {
            notes.push(format!(
                "US: cine with {} frames, frame {frame} (0-based) used",
                m.frames
            ));
        }
        let sel = Selection::planar(
            Modality::US,
            "US".into(),
            m,
            &img,
            (frame, crop),
            provider,
            shared_base(&img, s),
        );
        return (
            Some(Plane {
                size: grid.image,
                data: clamp01(out.data),
            }),
            vec![sel],
            errors,
            notes,
        );
    }
    notes.push("US: no decodable B-mode image".into());
    (None, vec![], errors, notes)
}
