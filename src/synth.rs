//! Synthetic patient generator (`her2map synth DIR`): a mammography, an
//! ultrasound and a DCE-MRI study of one made-up patient, with a visible
//! lesion in the same breast in all three (enhancing after contrast in MRI).
//! Files are Explicit VR Little Endian with a proper file meta group
//! (PS3.10 7.1). Deterministic for a given seed. Not real anatomy: the shapes
//! exist to exercise selection, decoding, ROI and resampling.

use std::path::{Path, PathBuf};

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::imaging::Laterality;

const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
const SOP_MG: &str = "1.2.840.10008.5.1.4.1.1.1.2";
const SOP_US: &str = "1.2.840.10008.5.1.4.1.1.6.1";
const SOP_US_MF: &str = "1.2.840.10008.5.1.4.1.1.3.1";
const SOP_MR: &str = "1.2.840.10008.5.1.4.1.1.4";
const SOP_ENHANCED_MR: &str = "1.2.840.10008.5.1.4.1.1.4.1";
const SOP_GSPS: &str = "1.2.840.10008.5.1.4.1.1.11.1";

/// Options of the generator.
#[derive(Clone, Debug)]
pub struct SynthOptions {
    /// Clinical sizes (MG 3328×4084, MR 6 × 160 slices of 512², US 800×600)
    /// instead of the small default (MG 208×256, MR 6 × 24 of 64², US 160×120).
    pub full_size: bool,
    pub seed: u64,
    pub patient_name: String,
    pub patient_id: String,
    pub issuer_of_patient_id: String,
    pub birth_date: String,
    /// Age at the studies, DICOM AS ("054Y").
    pub patient_age: String,
    /// Breast with the lesion.
    pub lesion_side: Laterality,
    /// Number of DCE phases (1 pre + n−1 post), at least 2.
    pub mr_phases: usize,
    /// Also write a GSPS that circles the lesion on the lesion-side CC view.
    pub with_annotation: bool,
    /// Write the DCE-MRI as one Enhanced MR Image (all phases as frames, per-
    /// frame functional groups) instead of one classic MR file per slice.
    pub mr_enhanced: bool,
    /// Write laterality on the ultrasound images (off: side must come from
    /// configuration).
    pub us_laterality: bool,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            full_size: false,
            seed: 42,
            patient_name: "SYNTHETIC^PATIENT".into(),
            patient_id: "SYN0001".into(),
            issuer_of_patient_id: "HER2MAP-SYNTH".into(),
            birth_date: "19700101".into(),
            patient_age: "054Y".into(),
            lesion_side: Laterality::Right,
            mr_phases: 6,
            with_annotation: false,
            mr_enhanced: false,
            us_laterality: true,
        }
    }
}

/// Files written for one study.
#[derive(Clone, Debug)]
pub struct SynthStudy {
    pub name: String,
    pub study_instance_uid: String,
    pub files: Vec<PathBuf>,
    pub bytes: u64,
}

/// What was written.
#[derive(Clone, Debug)]
pub struct SynthSummary {
    pub studies: Vec<SynthStudy>,
    pub lesion_side: Laterality,
    /// "issuer/patient id", the key the case assembler groups by.
    pub patient_key: String,
    /// Lesion centre in MRI patient coordinates (mm, LPS) and radius (mm).
    pub mr_lesion_center_mm: [f64; 3],
    pub lesion_radius_mm: f64,
    /// Lesion centre in the lesion-side CC / MLO mammograms (column, row).
    pub mg_lesion_px: [(f64, f64); 2],
    pub total_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("cannot create {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write DICOM file {path}: {message}")]
    Dicom { path: PathBuf, message: String },
    #[error("invalid option: {0}")]
    Options(String),
}

/// One written mammogram: path, bytes, SOP Instance UID, lesion centre (px).
type MgWritten = (PathBuf, u64, String, Option<(f64, f64)>);

/// One MR slice job: written path and bytes, or the pixels (enhanced mode).
type MrWritten = (Option<PathBuf>, u64, Vec<u16>);

/// Deterministic UID generator under the 2.25 (UUID-derived) root.
struct Uids {
    rng: ChaCha8Rng,
}
impl Uids {
    fn next(&mut self) -> String {
        let v: u128 = self.rng.random::<u128>() >> 8;
        format!("2.25.{v}")
    }
}

fn el(tag: Tag, vr: VR, v: impl Into<PrimitiveValue>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, v.into())
}

fn seq(tag: Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

fn code_item(value: &str, scheme: &str, meaning: &str) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        el(tags::CODE_VALUE, VR::SH, value),
        el(tags::CODING_SCHEME_DESIGNATOR, VR::SH, scheme),
        el(tags::CODE_MEANING, VR::LO, meaning),
    ])
}

/// Patient / study / series / instance attributes shared by every file.
#[derive(Clone)]
struct Common<'a> {
    opts: &'a SynthOptions,
    study_uid: String,
    study_date: &'a str,
    study_time: &'a str,
    accession: String,
    study_desc: &'a str,
    modality: &'a str,
    for_uid: String,
}

fn base(
    c: &Common<'_>,
    sop_class: &str,
    sop_uid: &str,
    series_uid: &str,
    series_no: i32,
    inst_no: i32,
) -> InMemDicomObject {
    let o = c.opts;
    InMemDicomObject::from_element_iter([
        el(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100"),
        el(tags::IMAGE_TYPE, VR::CS, "ORIGINAL\\PRIMARY"),
        el(tags::SOP_CLASS_UID, VR::UI, sop_class),
        el(tags::SOP_INSTANCE_UID, VR::UI, sop_uid),
        el(tags::STUDY_DATE, VR::DA, c.study_date),
        el(tags::CONTENT_DATE, VR::DA, c.study_date),
        el(tags::STUDY_TIME, VR::TM, c.study_time),
        el(tags::ACCESSION_NUMBER, VR::SH, c.accession.as_str()),
        el(tags::MODALITY, VR::CS, c.modality),
        el(tags::MANUFACTURER, VR::LO, "her2map synthetic"),
        el(tags::REFERRING_PHYSICIAN_NAME, VR::PN, ""),
        el(tags::STUDY_DESCRIPTION, VR::LO, c.study_desc),
        el(tags::PATIENT_NAME, VR::PN, o.patient_name.as_str()),
        el(tags::PATIENT_ID, VR::LO, o.patient_id.as_str()),
        el(
            tags::ISSUER_OF_PATIENT_ID,
            VR::LO,
            o.issuer_of_patient_id.as_str(),
        ),
        el(tags::PATIENT_BIRTH_DATE, VR::DA, o.birth_date.as_str()),
        el(tags::PATIENT_SEX, VR::CS, "F"),
        el(tags::PATIENT_AGE, VR::AS, o.patient_age.as_str()),
        el(tags::BODY_PART_EXAMINED, VR::CS, "BREAST"),
        el(tags::STUDY_INSTANCE_UID, VR::UI, c.study_uid.as_str()),
        el(tags::SERIES_INSTANCE_UID, VR::UI, series_uid),
        el(tags::STUDY_ID, VR::SH, "1"),
        el(tags::SERIES_NUMBER, VR::IS, series_no.to_string()),
        el(tags::INSTANCE_NUMBER, VR::IS, inst_no.to_string()),
        el(tags::FRAME_OF_REFERENCE_UID, VR::UI, c.for_uid.as_str()),
        el(tags::POSITION_REFERENCE_INDICATOR, VR::LO, ""),
    ])
}

fn pixel_module_u16(
    o: &mut InMemDicomObject,
    rows: usize,
    cols: usize,
    bits_stored: u16,
    px: Vec<u16>,
) {
    for e in [
        el(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16)),
        el(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
        el(tags::ROWS, VR::US, PrimitiveValue::from(rows as u16)),
        el(tags::COLUMNS, VR::US, PrimitiveValue::from(cols as u16)),
        el(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16u16)),
        el(tags::BITS_STORED, VR::US, PrimitiveValue::from(bits_stored)),
        el(
            tags::HIGH_BIT,
            VR::US,
            PrimitiveValue::from(bits_stored - 1),
        ),
        el(
            tags::PIXEL_REPRESENTATION,
            VR::US,
            PrimitiveValue::from(0u16),
        ),
    ] {
        o.put(e);
    }
    o.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::U16(px.into()),
    ));
}

fn pixel_module_u8(
    o: &mut InMemDicomObject,
    rows: usize,
    cols: usize,
    spp: u16,
    frames: usize,
    px: Vec<u8>,
) {
    for e in [
        el(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(spp)),
        el(
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            if spp == 3 { "RGB" } else { "MONOCHROME2" },
        ),
        el(tags::ROWS, VR::US, PrimitiveValue::from(rows as u16)),
        el(tags::COLUMNS, VR::US, PrimitiveValue::from(cols as u16)),
        el(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(8u16)),
        el(tags::BITS_STORED, VR::US, PrimitiveValue::from(8u16)),
        el(tags::HIGH_BIT, VR::US, PrimitiveValue::from(7u16)),
        el(
            tags::PIXEL_REPRESENTATION,
            VR::US,
            PrimitiveValue::from(0u16),
        ),
    ] {
        o.put(e);
    }
    if spp == 3 {
        o.put(el(
            tags::PLANAR_CONFIGURATION,
            VR::US,
            PrimitiveValue::from(0u16),
        ));
    }
    if frames > 1 {
        o.put(el(tags::NUMBER_OF_FRAMES, VR::IS, frames.to_string()));
        o.put(el(tags::FRAME_TIME, VR::DS, "33.3"));
        o.put(DataElement::new(
            tags::FRAME_INCREMENT_POINTER,
            VR::AT,
            PrimitiveValue::Tags((&[tags::FRAME_TIME][..]).into()),
        ));
    }
    o.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::U8(px.into()),
    ));
}

fn write(obj: InMemDicomObject, path: &Path) -> Result<u64, SynthError> {
    let sop_class = crate::imaging::attrs::text(&obj, tags::SOP_CLASS_UID).unwrap_or_default();
    let sop_uid = crate::imaging::attrs::text(&obj, tags::SOP_INSTANCE_UID).unwrap_or_default();
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(EXPLICIT_VR_LE)
                .media_storage_sop_class_uid(sop_class)
                .media_storage_sop_instance_uid(sop_uid)
                .implementation_class_uid("2.25.305828988692329190718491745614562924651")
                .implementation_version_name("HER2MAP_SYNTH"),
        )
        .map_err(|e| SynthError::Dicom {
            path: path.into(),
            message: e.to_string(),
        })?;
    file.write_to_file(path).map_err(|e| SynthError::Dicom {
        path: path.into(),
        message: e.to_string(),
    })?;
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| SynthError::Io {
            path: path.into(),
            source: e,
        })
}

fn mkdir(p: &Path) -> Result<(), SynthError> {
    std::fs::create_dir_all(p).map_err(|e| SynthError::Io {
        path: p.into(),
        source: e,
    })
}

/// Cheap deterministic texture in [−1, 1] (sum of sinusoids).
fn texture(x: f64, y: f64, k: f64) -> f64 {
    ((x * 0.05 * k).sin() * (y * 0.07 * k).cos() + (x * 0.013 * k + y * 0.021 * k).sin()) * 0.5
}

/// Write the synthetic patient under `dir` (sub-folders MG/, US/, MR/).
pub fn write_synthetic_patient(
    dir: &Path,
    opts: &SynthOptions,
) -> Result<SynthSummary, SynthError> {
    if opts.mr_phases < 2 {
        return Err(SynthError::Options("mr_phases must be at least 2".into()));
    }
    mkdir(dir)?;
    let mut uids = Uids {
        rng: ChaCha8Rng::seed_from_u64(opts.seed ^ 0x5EED_0001),
    };
    let mut geo = ChaCha8Rng::seed_from_u64(opts.seed ^ 0x5EED_0002);
    // Lesion placement in breast-relative terms, shared by all modalities:
    // depth from chest wall (fraction), lateral/vertical offsets (fractions).
    let depth: f64 = geo.random_range(0.35..0.55);
    let off_a: f64 = geo.random_range(-0.25..0.25);
    let off_b: f64 = geo.random_range(-0.25..0.25);
    let radius_mm = 11.0;
    let side = opts.lesion_side;
    let mut studies = Vec::new();

    // ------------------------------------------------------------ MG
    let mg = {
        let d = dir.join("MG");
        mkdir(&d)?;
        let c = Common {
            opts,
            study_uid: uids.next(),
            study_date: "20240301",
            study_time: "090000",
            accession: "SYNMG1".into(),
            study_desc: "MAMMOGRAPHY BILATERAL",
            modality: "MG",
            for_uid: uids.next(),
        };
        let series_uid = uids.next();
        let (rows, cols) = if opts.full_size {
            (4084usize, 3328usize)
        } else {
            (256, 208)
        };
        let spacing = 0.07 * 3328.0 / cols as f64; // mm per pixel, same field size
        let views = [
            (Laterality::Right, "CC"),
            (Laterality::Right, "MLO"),
            (Laterality::Left, "CC"),
            (Laterality::Left, "MLO"),
        ];
        let jobs: Vec<(usize, Laterality, &str, String)> = views
            .iter()
            .enumerate()
            .map(|(i, (l, v))| (i, *l, *v, uids.next()))
            .collect();
        let mut lesion_px = [(0.0, 0.0); 2];
        let results: Vec<Result<MgWritten, SynthError>> = jobs
            .par_iter()
            .map(|(i, lat, view, sop)| {
                let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ (0x1000 + *i as u64));
                // Chest wall on the right edge for R, left edge for L.
                let a = 0.8 * cols as f64; // depth semi-axis
                let b = if *view == "MLO" { 0.46 } else { 0.40 } * rows as f64;
                let cy = rows as f64 * if *view == "MLO" { 0.55 } else { 0.5 };
                let wall = |x: f64| {
                    if *lat == Laterality::Right {
                        cols as f64 - x
                    } else {
                        x
                    }
                };
                let has_lesion = *lat == side;
                let ly = cy + off_b * b;
                let lx_depth = depth * a;
                let lx = if *lat == Laterality::Right {
                    cols as f64 - lx_depth
                } else {
                    lx_depth
                };
                let r_px = radius_mm / spacing;
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
                                + 180.0
                                    * texture(
                                        xf * 208.0 / cols as f64,
                                        yf * 208.0 / cols as f64,
                                        1.0,
                                    )
                                + rng.random_range(-40.0..40.0);
                            if *view == "MLO"
                                && wall(xf) < 0.35 * a * (1.0 - yf / (0.6 * rows as f64))
                            {
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
                let mut o = base(&c, SOP_MG, sop, &series_uid, 1, *i as i32 + 1);
                let (code, meaning) = if *view == "CC" {
                    ("399162004", "cranio-caudal")
                } else {
                    ("399368009", "medio-lateral oblique")
                };
                for e in [
                    el(tags::IMAGE_TYPE, VR::CS, "ORIGINAL\\PRIMARY\\"),
                    el(tags::PRESENTATION_INTENT_TYPE, VR::CS, "FOR PRESENTATION"),
                    el(tags::IMAGE_LATERALITY, VR::CS, lat.code()),
                    el(tags::VIEW_POSITION, VR::CS, *view),
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
                        if *lat == Laterality::Right {
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
                pixel_module_u16(&mut o, rows, cols, 12, px);
                let path = d.join(format!("MG_{}{}.dcm", lat.code(), view));
                let bytes = write(o, &path)?;
                Ok((path, bytes, sop.clone(), has_lesion.then_some((lx, ly))))
            })
            .collect();
        let mut files = Vec::new();
        let mut bytes = 0;
        let mut cc_sop = None;
        for (j, r) in results.into_iter().enumerate() {
            let (p, b, sop, les) = r?;
            if let Some(l) = les {
                let k = if jobs[j].2 == "CC" { 0 } else { 1 };
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
            let (lx, ly) = lesion_px[0];
            let r_px = radius_mm / spacing;
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
                el(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, sop.as_str()),
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
                el(tags::SERIES_INSTANCE_UID, VR::UI, series_uid.as_str()),
                seq(tags::REFERENCED_IMAGE_SEQUENCE, vec![referenced]),
            ]);
            o.put(seq(tags::REFERENCED_SERIES_SEQUENCE, vec![series_ref]));
            o.put(seq(tags::GRAPHIC_ANNOTATION_SEQUENCE, vec![ann]));
            let layer = InMemDicomObject::from_element_iter([
                el(tags::GRAPHIC_LAYER, VR::CS, "LESION"),
                el(tags::GRAPHIC_LAYER_ORDER, VR::IS, "1"),
            ]);
            o.put(seq(tags::GRAPHIC_LAYER_SEQUENCE, vec![layer]));
            let path = d.join("PR_lesion.dcm");
            bytes += write(o, &path)?;
            files.push(path);
        }
        studies.push(SynthStudy {
            name: "MG".into(),
            study_instance_uid: c.study_uid.clone(),
            files,
            bytes,
        });
        lesion_px
    };

    // ------------------------------------------------------------ US
    {
        let d = dir.join("US");
        mkdir(&d)?;
        let c = Common {
            opts,
            study_uid: uids.next(),
            study_date: "20240301",
            study_time: "100000",
            accession: "SYNUS1".into(),
            study_desc: "US BREAST",
            modality: "US",
            for_uid: uids.next(),
        };
        let series_uid = uids.next();
        let (rows, cols) = if opts.full_size {
            (600usize, 800usize)
        } else {
            (120, 160)
        };
        // Tissue region leaves a 5 % border (where scanners burn in text).
        let (rx0, ry0, rx1, ry1) = (
            cols / 20,
            rows / 20,
            cols - cols / 20 - 1,
            rows - rows / 20 - 1,
        );
        // (instance number, kind, frames): 1 = colour Doppler (skipped),
        // 2..4 B-mode, 5 cine of 5 frames.
        let jobs: Vec<(i32, &str, usize, String)> = vec![
            (1, "doppler", 1, uids.next()),
            (2, "bmode", 1, uids.next()),
            (3, "bmode", 1, uids.next()),
            (4, "bmode", 1, uids.next()),
            (5, "cine", 5, uids.next()),
        ];
        let results: Vec<Result<(PathBuf, u64), SynthError>> = jobs
            .par_iter()
            .map(|(n, kind, frames, sop)| {
                let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ (0x2000 + *n as u64));
                let (lcx, lcy) = (
                    cols as f64 * (0.5 + 0.5 * off_a),
                    rows as f64 * (0.35 + 0.4 * depth),
                );
                let (la, lb) = (cols as f64 * 0.09, rows as f64 * 0.08);
                let spp = if *kind == "doppler" { 3 } else { 1 };
                let mut px = Vec::with_capacity(rows * cols * spp * frames);
                for f in 0..*frames {
                    let shift = f as f64 * 1.5;
                    for y in 0..rows {
                        for x in 0..cols {
                            let (xf, yf) = (x as f64, y as f64);
                            let inside = x >= rx0 && x <= rx1 && y >= ry0 && y <= ry1;
                            let mut v = if inside {
                                let layer = 70.0
                                    + 40.0 * (yf / rows as f64)
                                    + 30.0 * texture(xf, yf + shift, 2.0);
                                // Speckle: exponential-like multiplicative noise.
                                let s: f64 = rng.random_range(0.02f64..1.0);
                                layer * (-s.ln()).min(3.0)
                            } else {
                                0.0
                            };
                            let dd = ((xf - lcx) / la).powi(2) + ((yf - lcy - shift) / lb).powi(2);
                            if inside && dd < 1.0 {
                                v = 15.0 + rng.random_range(0.0..20.0); // hypoechoic mass
                            }
                            let v = v.clamp(0.0, 255.0) as u8;
                            if spp == 3 {
                                let colour = inside
                                    && (xf - cols as f64 * 0.5).abs() < cols as f64 * 0.2
                                    && (yf - rows as f64 * 0.5).abs() < rows as f64 * 0.2
                                    && rng.random_bool(0.7);
                                if colour {
                                    px.extend_from_slice(&[220, 30, 40]);
                                } else {
                                    px.extend_from_slice(&[v, v, v]);
                                }
                            } else {
                                px.push(v);
                            }
                        }
                    }
                }
                let sop_class = if *frames > 1 { SOP_US_MF } else { SOP_US };
                let mut o = base(&c, sop_class, sop, &series_uid, 1, *n);
                if opts.us_laterality {
                    // Image Laterality only: Laterality (0020,0060) is for
                    // series without it (PS3.3 C.7.3.1, Type 2C).
                    o.put(el(tags::IMAGE_LATERALITY, VR::CS, side.code()));
                }
                o.put(el(tags::PATIENT_ORIENTATION, VR::CS, ""));
                o.put(el(tags::ACQUISITION_TIME, VR::TM, format!("1000{:02}", n)));
                let region = InMemDicomObject::from_element_iter([
                    el(
                        tags::REGION_SPATIAL_FORMAT,
                        VR::US,
                        PrimitiveValue::from(1u16),
                    ),
                    el(tags::REGION_DATA_TYPE, VR::US, PrimitiveValue::from(1u16)),
                    el(tags::REGION_FLAGS, VR::UL, PrimitiveValue::from(0u32)),
                    el(
                        tags::REGION_LOCATION_MIN_X0,
                        VR::UL,
                        PrimitiveValue::from(rx0 as u32),
                    ),
                    el(
                        tags::REGION_LOCATION_MIN_Y0,
                        VR::UL,
                        PrimitiveValue::from(ry0 as u32),
                    ),
                    el(
                        tags::REGION_LOCATION_MAX_X1,
                        VR::UL,
                        PrimitiveValue::from(rx1 as u32),
                    ),
                    el(
                        tags::REGION_LOCATION_MAX_Y1,
                        VR::UL,
                        PrimitiveValue::from(ry1 as u32),
                    ),
                    el(
                        tags::PHYSICAL_UNITS_X_DIRECTION,
                        VR::US,
                        PrimitiveValue::from(3u16),
                    ),
                    el(
                        tags::PHYSICAL_UNITS_Y_DIRECTION,
                        VR::US,
                        PrimitiveValue::from(3u16),
                    ),
                    DataElement::new(
                        tags::PHYSICAL_DELTA_X,
                        VR::FD,
                        PrimitiveValue::F64((&[0.005f64][..]).into()),
                    ),
                    DataElement::new(
                        tags::PHYSICAL_DELTA_Y,
                        VR::FD,
                        PrimitiveValue::F64((&[0.005f64][..]).into()),
                    ),
                ]);
                o.put(seq(tags::SEQUENCE_OF_ULTRASOUND_REGIONS, vec![region]));
                pixel_module_u8(&mut o, rows, cols, spp as u16, *frames, px);
                let path = d.join(format!("US_{n:02}_{kind}.dcm"));
                let bytes = write(o, &path)?;
                Ok((path, bytes))
            })
            .collect();
        let mut files = Vec::new();
        let mut bytes = 0;
        for r in results {
            let (p, b) = r?;
            files.push(p);
            bytes += b;
        }
        studies.push(SynthStudy {
            name: "US".into(),
            study_instance_uid: c.study_uid.clone(),
            files,
            bytes,
        });
    }

    // ------------------------------------------------------------ MR
    let lesion_mm = {
        let d = dir.join("MR");
        mkdir(&d)?;
        let c = Common {
            opts,
            study_uid: uids.next(),
            study_date: "20240302",
            study_time: "080000",
            accession: "SYNMR1".into(),
            study_desc: "MR BREAST DCE",
            modality: "MR",
            for_uid: uids.next(),
        };
        let (n, slices, fov, dz) = if opts.full_size {
            (512usize, 160usize, 340.0, 1.0)
        } else {
            (64, 24, 256.0, 4.0)
        };
        let ps = fov / n as f64;
        let x0 = -fov / 2.0 + ps / 2.0;
        let y0 = -fov / 2.0 + ps / 2.0;
        let z0 = -(slices as f64 - 1.0) * dz / 2.0;
        // Breasts: hemi-ellipsoids anterior (−y) of the chest wall y = yc.
        let yc = 30.0;
        let (ba, bb, bc) = (70.0, 95.0, (slices as f64 * dz / 2.0 - 4.0).min(60.0));
        let bx = |l: Laterality| if l == Laterality::Left { 85.0 } else { -85.0 };
        let lesion = [bx(side) + off_a * ba, yc - depth * bb, off_b * bc];
        let phases = opts.mr_phases;
        let mut series: Vec<(usize, String)> = (0..phases).map(|p| (p, uids.next())).collect();
        let slice_uids: Vec<Vec<String>> = (0..phases)
            .map(|_| (0..slices).map(|_| uids.next()).collect())
            .collect();
        let jobs: Vec<(usize, usize)> = (0..phases)
            .flat_map(|p| (0..slices).map(move |k| (p, k)))
            .collect();
        let results: Vec<Result<MrWritten, SynthError>> = jobs
            .par_iter()
            .map(|&(p, k)| {
                let mut rng =
                    ChaCha8Rng::seed_from_u64(opts.seed ^ (0x3000_0000 + (p * 10_000 + k) as u64));
                let z = z0 + k as f64 * dz;
                let enh_lesion = if p == 0 {
                    0.0
                } else {
                    1300.0 * (1.0 - (-(p as f64) / 1.2).exp())
                };
                let mut px = vec![0u16; n * n];
                for r in 0..n {
                    let y = y0 + r as f64 * ps;
                    for col in 0..n {
                        let x = x0 + col as f64 * ps;
                        let mut v = 20.0;
                        if y > yc {
                            v = 180.0 + 10.0 * p as f64; // chest wall / body
                        } else {
                            for l in [Laterality::Left, Laterality::Right] {
                                let e = ((x - bx(l)) / ba).powi(2)
                                    + ((y - yc) / bb).powi(2)
                                    + (z / bc).powi(2);
                                if e <= 1.0 {
                                    v = 260.0 + 60.0 * texture(x, y + z, 1.0) + 25.0 * p as f64;
                                }
                            }
                        }
                        let dd = ((x - lesion[0]).powi(2)
                            + (y - lesion[1]).powi(2)
                            + (z - lesion[2]).powi(2))
                        .sqrt();
                        if dd < radius_mm {
                            v = 270.0 + enh_lesion;
                        }
                        v += rng.random_range(-12.0..12.0);
                        px[r * n + col] = v.clamp(0.0, 4095.0) as u16;
                    }
                }
                let series_uid = &series[p].1;
                let sop = &slice_uids[p][k];
                let mut o = base(&c, SOP_MR, sop, series_uid, p as i32 + 1, k as i32 + 1);
                // Both breasts in one acquisition: Laterality (Type 2C,
                // PS3.3 C.7.3.1) present and empty.
                o.put(el(tags::LATERALITY, VR::CS, ""));
                let t = 80000 + 100 * p; // 08:00:00 + p minutes
                let tm = format!("{:02}{:02}{:02}", t / 10000, (t / 100) % 100, 0);
                let desc = if p == 0 {
                    "DCE pre".to_string()
                } else {
                    format!("DCE post {p}")
                };
                for e in [
                    el(tags::IMAGE_TYPE, VR::CS, "ORIGINAL\\PRIMARY\\M\\ND"),
                    el(tags::SERIES_DESCRIPTION, VR::LO, desc),
                    el(tags::SERIES_DATE, VR::DA, "20240302"),
                    el(tags::SERIES_TIME, VR::TM, tm.as_str()),
                    el(tags::ACQUISITION_DATE, VR::DA, "20240302"),
                    el(tags::ACQUISITION_TIME, VR::TM, tm.as_str()),
                    el(tags::SCANNING_SEQUENCE, VR::CS, "GR"),
                    el(tags::SEQUENCE_VARIANT, VR::CS, "SP"),
                    el(tags::SCAN_OPTIONS, VR::CS, "FS"),
                    el(tags::MR_ACQUISITION_TYPE, VR::CS, "3D"),
                    el(tags::REPETITION_TIME, VR::DS, "4.5"),
                    el(tags::ECHO_TIME, VR::DS, "1.8"),
                    el(tags::ECHO_TRAIN_LENGTH, VR::IS, "1"),
                    el(tags::SLICE_THICKNESS, VR::DS, format!("{dz}")),
                    el(tags::SPACING_BETWEEN_SLICES, VR::DS, format!("{dz}")),
                    el(
                        tags::TEMPORAL_POSITION_IDENTIFIER,
                        VR::IS,
                        (p + 1).to_string(),
                    ),
                    el(
                        tags::NUMBER_OF_TEMPORAL_POSITIONS,
                        VR::IS,
                        phases.to_string(),
                    ),
                    el(tags::PATIENT_POSITION, VR::CS, "FFP"),
                    el(
                        tags::IMAGE_POSITION_PATIENT,
                        VR::DS,
                        format!("{:.3}\\{:.3}\\{:.3}", x0, y0, z),
                    ),
                    el(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, "1\\0\\0\\0\\1\\0"),
                    el(tags::SLICE_LOCATION, VR::DS, format!("{z:.3}")),
                    el(tags::PIXEL_SPACING, VR::DS, format!("{ps:.5}\\{ps:.5}")),
                    el(tags::WINDOW_CENTER, VR::DS, "600"),
                    el(tags::WINDOW_WIDTH, VR::DS, "1400"),
                ] {
                    o.put(e);
                }
                if p > 0 {
                    o.put(el(tags::CONTRAST_BOLUS_AGENT, VR::LO, "Gadobutrol"));
                }
                if opts.mr_enhanced {
                    return Ok((None, 0, px));
                }
                pixel_module_u16(&mut o, n, n, 12, px);
                let path = d.join(format!("MR_p{p}_s{k:03}.dcm"));
                let bytes = write(o, &path)?;
                Ok((Some(path), bytes, Vec::new()))
            })
            .collect();
        let mut files = Vec::new();
        let mut bytes = 0;
        let mut frames_px = Vec::new();
        for r in results {
            let (p, b, px) = r?;
            files.extend(p);
            bytes += b;
            frames_px.push(px);
        }
        if opts.mr_enhanced {
            // One Enhanced MR Image (PS3.3 A.36.2) holding every phase: the
            // geometry and time point of each frame live in the per-frame
            // functional groups (C.7.6.16), phases by Temporal Position Index.
            let sop = uids.next();
            let mut o = base(&c, SOP_ENHANCED_MR, &sop, &series[0].1, 1, 1);
            o.remove_element(tags::INSTANCE_NUMBER);
            for e in [
                el(tags::IMAGE_TYPE, VR::CS, "ORIGINAL\\PRIMARY\\VOLUME\\NONE"),
                el(tags::SERIES_DESCRIPTION, VR::LO, "DCE dynamic"),
                el(tags::INSTANCE_NUMBER, VR::IS, "1"),
                el(tags::CONTENT_TIME, VR::TM, "080000"),
                el(tags::ACQUISITION_DATE_TIME, VR::DT, "20240302080000"),
                el(
                    tags::NUMBER_OF_FRAMES,
                    VR::IS,
                    (phases * slices).to_string(),
                ),
                el(tags::CONTRAST_BOLUS_AGENT, VR::LO, "Gadobutrol"),
                el(
                    tags::NUMBER_OF_TEMPORAL_POSITIONS,
                    VR::IS,
                    phases.to_string(),
                ),
            ] {
                o.put(e);
            }
            let shared = InMemDicomObject::from_element_iter([
                seq(
                    tags::PIXEL_MEASURES_SEQUENCE,
                    vec![InMemDicomObject::from_element_iter([
                        el(tags::PIXEL_SPACING, VR::DS, format!("{ps:.5}\\{ps:.5}")),
                        el(tags::SLICE_THICKNESS, VR::DS, format!("{dz}")),
                    ])],
                ),
                seq(
                    tags::PLANE_ORIENTATION_SEQUENCE,
                    vec![InMemDicomObject::from_element_iter([el(
                        tags::IMAGE_ORIENTATION_PATIENT,
                        VR::DS,
                        "1\\0\\0\\0\\1\\0",
                    )])],
                ),
                seq(
                    tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE,
                    vec![InMemDicomObject::from_element_iter([
                        el(tags::RESCALE_INTERCEPT, VR::DS, "0"),
                        el(tags::RESCALE_SLOPE, VR::DS, "1"),
                        el(tags::RESCALE_TYPE, VR::LO, "US"),
                    ])],
                ),
                seq(
                    tags::FRAME_VOILUT_SEQUENCE,
                    vec![InMemDicomObject::from_element_iter([
                        el(tags::WINDOW_CENTER, VR::DS, "600"),
                        el(tags::WINDOW_WIDTH, VR::DS, "1400"),
                    ])],
                ),
            ]);
            let per_frame: Vec<InMemDicomObject> = jobs
                .iter()
                .map(|&(p, k)| {
                    let z = z0 + k as f64 * dz;
                    InMemDicomObject::from_element_iter([
                        seq(
                            tags::PLANE_POSITION_SEQUENCE,
                            vec![InMemDicomObject::from_element_iter([el(
                                tags::IMAGE_POSITION_PATIENT,
                                VR::DS,
                                format!("{x0:.3}\\{y0:.3}\\{z:.3}"),
                            )])],
                        ),
                        seq(
                            tags::FRAME_CONTENT_SEQUENCE,
                            vec![InMemDicomObject::from_element_iter([
                                el(
                                    tags::FRAME_ACQUISITION_DATE_TIME,
                                    VR::DT,
                                    format!("2024030208{:02}00", p),
                                ),
                                el(
                                    tags::TEMPORAL_POSITION_INDEX,
                                    VR::UL,
                                    PrimitiveValue::from((p + 1) as u32),
                                ),
                                el(tags::STACK_ID, VR::SH, "1"),
                                el(
                                    tags::IN_STACK_POSITION_NUMBER,
                                    VR::UL,
                                    PrimitiveValue::from((k + 1) as u32),
                                ),
                            ])],
                        ),
                    ])
                })
                .collect();
            o.put(seq(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, vec![shared]));
            o.put(seq(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, per_frame));
            let all: Vec<u16> = frames_px.concat();
            pixel_module_u16(&mut o, n, n, 12, all);
            let path = d.join("MR_enhanced_dce.dcm");
            bytes += write(o, &path)?;
            files.push(path);
        }
        series.clear();
        studies.push(SynthStudy {
            name: "MR".into(),
            study_instance_uid: c.study_uid.clone(),
            files,
            bytes,
        });
        lesion
    };

    let total_bytes = studies.iter().map(|s| s.bytes).sum();
    Ok(SynthSummary {
        studies,
        lesion_side: side,
        patient_key: format!("{}/{}", opts.issuer_of_patient_id, opts.patient_id),
        mr_lesion_center_mm: lesion_mm,
        lesion_radius_mm: radius_mm,
        mg_lesion_px: mg,
        total_bytes,
    })
}
