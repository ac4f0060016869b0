//! The `dicom-annotation` ROI provider: regions drawn by people or other
//! systems on the chosen images, from Grayscale Softcopy Presentation State
//! graphic annotations (PS3.3 C.10.5, units PIXEL), Segmentations (C.8.20)
//! and SR SCOORD / SCOORD3D content items (C.18.6 / C.18.9, TID 1500).

use std::collections::HashMap;

use dicom_dictionary_std::tags;

use super::{PatientBox, PixelBox, PlanarTarget, RoiProvider, VolumeTarget};
use crate::imaging::attrs::{self, Obj};
use crate::imaging::select::{InstanceMeta, Kind, SOP_GSPS, SOP_SEG, SliceGeom};
use crate::modality::Modality;

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
}
