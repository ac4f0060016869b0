//! Data set building blocks of the synthetic patient: the deterministic UID
//! generator, element helpers, the patient/study/series attributes every file
//! shares, the Image Pixel module and the Part 10 writer. Knows no modality:
//! the per-modality builders (`mg`, `us`, `mr`) own their attributes.

use std::path::Path;

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{SynthError, SynthOptions};

const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";

/// Deterministic UID generator under the 2.25 (UUID-derived) root. The UIDs
/// of a patient are drawn in one fixed order (MG, US, MR), so a seed always
/// yields the same files.
pub(super) struct Uids {
    rng: ChaCha8Rng,
}

impl Uids {
    pub(super) fn new(seed: u64) -> Self {
        Uids {
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5EED_0001),
        }
    }

    pub(super) fn next(&mut self) -> String {
        let v: u128 = self.rng.random::<u128>() >> 8;
        format!("2.25.{v}")
    }
}

pub(super) fn el(tag: Tag, vr: VR, v: impl Into<PrimitiveValue>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, v.into())
}

pub(super) fn seq(tag: Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

pub(super) fn code_item(value: &str, scheme: &str, meaning: &str) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        el(tags::CODE_VALUE, VR::SH, value),
        el(tags::CODING_SCHEME_DESIGNATOR, VR::SH, scheme),
        el(tags::CODE_MEANING, VR::LO, meaning),
    ])
}

/// Patient / study / series / instance attributes shared by every file.
#[derive(Clone)]
pub(super) struct Common<'a> {
    pub opts: &'a SynthOptions,
    pub study_uid: String,
    pub study_date: &'a str,
    pub study_time: &'a str,
    pub accession: String,
    pub study_desc: &'a str,
    pub modality: &'a str,
    pub for_uid: String,
}

/// The attributes of one study every instance of it shares.
pub(super) struct StudyInfo<'a> {
    pub date: &'a str,
    pub time: &'a str,
    pub accession: &'a str,
    pub description: &'a str,
    pub modality: &'a str,
}

impl<'a> Common<'a> {
    /// A new study: its Study Instance UID, then its Frame of Reference UID.
    pub(super) fn new(opts: &'a SynthOptions, uids: &mut Uids, study: StudyInfo<'a>) -> Self {
        Common {
            opts,
            study_uid: uids.next(),
            study_date: study.date,
            study_time: study.time,
            accession: study.accession.into(),
            study_desc: study.description,
            modality: study.modality,
            for_uid: uids.next(),
        }
    }
}

/// The Patient, General Study, General Series, Frame of Reference, General
/// Image and SOP Common attributes of one instance.
pub(super) fn base(
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

/// Image Pixel module (PS3.3 C.7.6.3) of 16-bit MONOCHROME2 pixels.
pub(super) fn pixel_module_u16(
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

/// Image Pixel module of 8-bit pixels (RGB when `spp` is 3), with the
/// Multi-frame module's Number of Frames and Frame Time for a cine.
pub(super) fn pixel_module_u8(
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

/// Write `obj` as a Part 10 file (PS3.10 7.1) in Explicit VR Little Endian;
/// returns the file's size.
pub(super) fn write(obj: InMemDicomObject, path: &Path) -> Result<u64, SynthError> {
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

pub(super) fn mkdir(p: &Path) -> Result<(), SynthError> {
    std::fs::create_dir_all(p).map_err(|e| SynthError::Io {
        path: p.into(),
        source: e,
    })
}

/// Cheap deterministic texture in [−1, 1] (sum of sinusoids).
pub(super) fn texture(x: f64, y: f64, k: f64) -> f64 {
    ((x * 0.05 * k).sin() * (y * 0.07 * k).cos() + (x * 0.013 * k + y * 0.021 * k).sin()) * 0.5
}
