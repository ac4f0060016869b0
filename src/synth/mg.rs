//! The synthetic mammography study: CC and MLO views of both breasts
//! (Digital Mammography X-Ray Image, For Presentation) and, on request, a
//! Grayscale Softcopy Presentation State circling the lesion on the
//! lesion-side CC view. Owns the MG pixels and attributes only.

use std::path::{Path, PathBuf};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::dataset::{
    Common, StudyInfo, Uids, base, code_item, el, mkdir, pixel_module_u16, seq, texture, write,
};
use super::{Lesion, SynthError, SynthOptions, SynthStudy};
use crate::imaging::Laterality;

const SOP_MG: &str = "1.2.840.10008.5.1.4.1.1.1.2";
const SOP_GSPS: &str = "1.2.840.10008.5.1.4.1.1.11.1";

/// The four views, in instance-number order.
const VIEWS: [(Laterality, &str); 4] = [
    (Laterality::Right, "CC"),
    (Laterality::Right, "MLO"),
    (Laterality::Left, "CC"),
    (Laterality::Left, "MLO"),
];

/// One written mammogram: path, bytes, SOP Instance UID, lesion centre (px).
type MgWritten = (PathBuf, u64, String, Option<(f64, f64)>);

/// Detector size of every view.
#[derive(Clone, Copy)]
struct Grid {
    rows: usize,
    cols: usize,
    /// mm per pixel, the same field size at both sizes.
    spacing: f64,
}

impl Grid {
    fn new(full_size: bool) -> Self {
        let (rows, cols) = if full_size {
            (4084usize, 3328usize)
        } else {
            (256, 208)
        };
        Grid {
            rows,
            cols,
            spacing: 0.07 * 3328.0 / cols as f64,
        }
    }
}

/// One view to write.
struct View {
    /// 0-based position in [`VIEWS`]: seeds its noise, numbers the instance.
    index: usize,
    lat: Laterality,
    name: &'static str,
    sop: String,
}

/// Write the MG study into `d`; returns it with the lesion centre on the
/// lesion-side CC and MLO views (column, row).
pub(super) fn write_study(
    d: &Path,
    opts: &SynthOptions,
    lesion: &Lesion,
    uids: &mut Uids,
) -> Result<(SynthStudy, [(f64, f64); 2]), SynthError> {
    mkdir(d)?;
    let c = Common::new(
        opts,
        uids,
        StudyInfo {
            date: "20240301",
            time: "090000",
            accession: "SYNMG1",
            description: "MAMMOGRAPHY BILATERAL",
            modality: "MG",
        },
    );
    let series_uid = uids.next();
    let grid = Grid::new(opts.full_size);
    let views: Vec<View> = VIEWS
        .iter()
        .enumerate()
        .map(|(index, (lat, name))| View {
            index,
            lat: *lat,
            name,
            sop: uids.next(),
        })
        .collect();
    let results: Vec<Result<MgWritten, SynthError>> = views
        .par_iter()
        .map(|v| write_view(d, &c, &series_uid, grid, lesion, v))
        .collect();
    let mut files = Vec::new();
    let mut bytes = 0;
    let mut lesion_px = [(0.0, 0.0); 2];
    let mut cc_sop = None;
    for (view, r) in views.iter().zip(results) {
        let (p, b, sop, les) = r?;
        if let Some(l) = les {
            let k = if view.name == "CC" { 0 } else { 1 };
            lesion_px[k] = l;
            if k == 0 {
                cc_sop = Some(sop);
            }
        }
        files.push(p);
        bytes += b;
    }
    if opts.with_annotation
        && let Some(sop) = cc_sop
    {
        let r_px = lesion.radius_mm / grid.spacing;
        let o = lesion_gsps(&c, uids, &series_uid, &sop, lesion_px[0], r_px);
        let path = d.join("PR_lesion.dcm");
        bytes += write(o, &path)?;
        files.push(path);
    }
    let study = SynthStudy {
        name: "MG".into(),
        study_instance_uid: c.study_uid.clone(),
        files,
        bytes,
    };
    Ok((study, lesion_px))
}

/// Write one view; the lesion centre is returned for the lesion side only.
fn write_view(
    d: &Path,
    c: &Common<'_>,
    series_uid: &str,
    grid: Grid,
    lesion: &Lesion,
    view: &View,
) -> Result<MgWritten, SynthError> {
    let (px, lesion_at) = pixels(c.opts.seed, grid, lesion, view);
    let mut o = base(c, SOP_MG, &view.sop, series_uid, 1, view.index as i32 + 1);
    put_view_attributes(&mut o, grid, view);
    pixel_module_u16(&mut o, grid.rows, grid.cols, 12, px);
    let path = d.join(format!("MG_{}{}.dcm", view.lat.code(), view.name));
    let bytes = write(o, &path)?;
    Ok((path, bytes, view.sop.clone(), lesion_at))
}

/// The view's pixels: a half-ellipse breast against the chest wall (on the
/// right edge for R, the left edge for L), the pectoral muscle on MLO, and
/// the lesion on the lesion side.
fn pixels(seed: u64, grid: Grid, lesion: &Lesion, view: &View) -> (Vec<u16>, Option<(f64, f64)>) {
    let Grid {
        rows,
        cols,
        spacing,
    } = grid;
    let (lat, name) = (view.lat, view.name);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (0x1000 + view.index as u64));
    let a = 0.8 * cols as f64; // depth semi-axis
    let b = if name == "MLO" { 0.46 } else { 0.40 } * rows as f64;
    let cy = rows as f64 * if name == "MLO" { 0.55 } else { 0.5 };
    let wall = |x: f64| {
        if lat == Laterality::Right {
            cols as f64 - x
        } else {
            x
        }
    };
    let has_lesion = lat == lesion.side;
    let ly = cy + lesion.off_b * b;
    let lx_depth = lesion.depth * a;
    let lx = if lat == Laterality::Right {
        cols as f64 - lx_depth
    } else {
        lx_depth
    };
    let r_px = lesion.radius_mm / spacing;
    let mut px = vec![0u16; rows * cols];
    for y in 0..rows {
        for x in 0..cols {
            let (xf, yf) = (x as f64, y as f64);
            let u = wall(xf) / a;
            let v = (yf - cy) / b;
            let mut val = 60.0 + rng.random_range(0.0..20.0);
            if u * u + v * v <= 1.0 {
                let thick = (1.0 - u * u - v * v).sqrt();
                val = 1100.0
                    + 500.0 * thick
                    + 180.0 * texture(xf * 208.0 / cols as f64, yf * 208.0 / cols as f64, 1.0)
                    + rng.random_range(-40.0..40.0);
                if name == "MLO" && wall(xf) < 0.35 * a * (1.0 - yf / (0.6 * rows as f64)) {
                    val += 700.0; // pectoral muscle
                }
                if has_lesion {
                    let dd = ((xf - lx).powi(2) + (yf - ly).powi(2)).sqrt() / r_px;
                    if dd < 1.0 {
                        val += 1600.0 * (1.0 - dd * dd).sqrt().max(0.35);
                    }
                }
            }
            px[y * cols + x] = val.clamp(0.0, 4095.0) as u16;
        }
    }
    (px, has_lesion.then_some((lx, ly)))
}

/// DX Image, Mammography Image and DX Detector attributes of one view.
fn put_view_attributes(o: &mut InMemDicomObject, grid: Grid, view: &View) {
    let spacing = grid.spacing;
    let (lat, name, i) = (view.lat, view.name, view.index);
    let (code, meaning) = if name == "CC" {
        ("399162004", "cranio-caudal")
    } else {
        ("399368009", "medio-lateral oblique")
    };
    for e in [
        el(tags::IMAGE_TYPE, VR::CS, "ORIGINAL\\PRIMARY\\"),
        el(tags::PRESENTATION_INTENT_TYPE, VR::CS, "FOR PRESENTATION"),
        el(tags::IMAGE_LATERALITY, VR::CS, lat.code()),
        el(tags::VIEW_POSITION, VR::CS, name),
        el(
            tags::IMAGER_PIXEL_SPACING,
            VR::DS,
            format!("{spacing:.4}\\{spacing:.4}"),
        ),
        el(
            tags::PIXEL_SPACING,
            VR::DS,
            format!("{spacing:.4}\\{spacing:.4}"),
        ),
        el(tags::WINDOW_CENTER, VR::DS, "2048"),
        el(tags::WINDOW_WIDTH, VR::DS, "4096"),
        el(tags::RESCALE_INTERCEPT, VR::DS, "0"),
        el(tags::RESCALE_SLOPE, VR::DS, "1"),
        el(tags::RESCALE_TYPE, VR::LO, "US"),
        el(tags::BURNED_IN_ANNOTATION, VR::CS, "NO"),
        el(
            tags::PATIENT_ORIENTATION,
            VR::CS,
            if lat == Laterality::Right {
                "P\\L"
            } else {
                "A\\R"
            },
        ),
        el(tags::ACQUISITION_TIME, VR::TM, format!("0900{:02}", i * 10)),
        // The rest of the DX Image and Mammography Image
        // modules' Type 1 and 2 attributes (PS3.3 C.8.11.7,
        // C.8.11.7.1), so that dciodvfy passes the files.
        el(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00"),
        el(tags::PRESENTATION_LUT_SHAPE, VR::CS, "IDENTITY"),
        el(tags::PIXEL_INTENSITY_RELATIONSHIP, VR::CS, "LOG"),
        el(
            tags::PIXEL_INTENSITY_RELATIONSHIP_SIGN,
            VR::SS,
            PrimitiveValue::from(-1i16),
        ),
        el(tags::ORGAN_EXPOSED, VR::CS, "BREAST"),
        el(tags::POSITIONER_TYPE, VR::CS, "MAMMOGRAPHIC"),
        el(tags::DETECTOR_TYPE, VR::CS, "DIRECT"),
    ] {
        o.put(e);
    }
    let mut view_item = code_item(code, "SCT", meaning);
    view_item.put(seq(tags::VIEW_MODIFIER_CODE_SEQUENCE, Vec::new()));
    o.put(seq(tags::VIEW_CODE_SEQUENCE, vec![view_item]));
    o.put(seq(tags::ACQUISITION_CONTEXT_SEQUENCE, Vec::new()));
    o.put(seq(
        tags::ANATOMIC_REGION_SEQUENCE,
        vec![code_item("76752008", "SCT", "Breast")],
    ));
}

/// A GSPS (PS3.3 A.33.1) with one CIRCLE graphic of radius `r_px` around the
/// lesion centre `(lx, ly)` on the mammogram `sop` of `series_uid`.
fn lesion_gsps(
    c: &Common<'_>,
    uids: &mut Uids,
    series_uid: &str,
    sop: &str,
    (lx, ly): (f64, f64),
    r_px: f64,
) -> InMemDicomObject {
    let gsps_uid = uids.next();
    let series = uids.next();
    let mut o = base(
        &Common {
            modality: "PR",
            ..c.clone()
        },
        SOP_GSPS,
        &gsps_uid,
        &series,
        90,
        1,
    );
    o.remove_element(tags::FRAME_OF_REFERENCE_UID);
    o.remove_element(tags::POSITION_REFERENCE_INDICATOR);
    o.remove_element(tags::IMAGE_TYPE);
    let referenced = InMemDicomObject::from_element_iter([
        el(tags::REFERENCED_SOP_CLASS_UID, VR::UI, SOP_MG),
        el(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, sop),
    ]);
    let graphic = InMemDicomObject::from_element_iter([
        el(tags::GRAPHIC_ANNOTATION_UNITS, VR::CS, "PIXEL"),
        el(tags::GRAPHIC_DIMENSIONS, VR::US, PrimitiveValue::from(2u16)),
        el(
            tags::NUMBER_OF_GRAPHIC_POINTS,
            VR::US,
            PrimitiveValue::from(2u16),
        ),
        DataElement::new(
            tags::GRAPHIC_DATA,
            VR::FL,
            PrimitiveValue::F32(
                (&[lx as f32, ly as f32, (lx + r_px) as f32, ly as f32][..]).into(),
            ),
        ),
        el(tags::GRAPHIC_TYPE, VR::CS, "CIRCLE"),
        el(tags::GRAPHIC_FILLED, VR::CS, "N"),
    ]);
    let ann = InMemDicomObject::from_element_iter([
        seq(tags::REFERENCED_IMAGE_SEQUENCE, vec![referenced.clone()]),
        el(tags::GRAPHIC_LAYER, VR::CS, "LESION"),
        seq(tags::GRAPHIC_OBJECT_SEQUENCE, vec![graphic]),
    ]);
    for e in [
        el(tags::CONTENT_LABEL, VR::CS, "LESION"),
        el(
            tags::CONTENT_DESCRIPTION,
            VR::LO,
            "synthetic lesion outline",
        ),
        el(tags::PRESENTATION_CREATION_DATE, VR::DA, "20240301"),
        el(tags::PRESENTATION_CREATION_TIME, VR::TM, "100000"),
        el(tags::CONTENT_CREATOR_NAME, VR::PN, ""),
        el(tags::PRESENTATION_LUT_SHAPE, VR::CS, "IDENTITY"),
    ] {
        o.put(e);
    }
    let series_ref = InMemDicomObject::from_element_iter([
        el(tags::SERIES_INSTANCE_UID, VR::UI, series_uid),
        seq(tags::REFERENCED_IMAGE_SEQUENCE, vec![referenced]),
    ]);
    o.put(seq(tags::REFERENCED_SERIES_SEQUENCE, vec![series_ref]));
    o.put(seq(tags::GRAPHIC_ANNOTATION_SEQUENCE, vec![ann]));
    let layer = InMemDicomObject::from_element_iter([
        el(tags::GRAPHIC_LAYER, VR::CS, "LESION"),
        el(tags::GRAPHIC_LAYER_ORDER, VR::IS, "1"),
    ]);
    o.put(seq(tags::GRAPHIC_LAYER_SEQUENCE, vec![layer]));
    o
}
