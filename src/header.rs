//! The one reader of the header facts a case is decided on: what kind of
//! object an instance is, its side, its mammographic view, whether an
//! ultrasound image is Doppler. Ingest indexes these facts and imaging
//! selects on them, so that the case assembler and the model see the same
//! instance the same way. Reads data sets only; no I/O of its own.
//!
//! DICOM references: PS3.3 C.8.11.7 Mammography Image (View Code Sequence,
//! Image Laterality), C.7.3.1 General Series (Laterality), C.7.6.16.2.8
//! Frame Anatomy, C.8.5.5 US Region Calibration, C.8.5.6 US Image.

use dicom_dictionary_std::tags;

use crate::attrs::{self, Obj};
use crate::modality::Modality;

pub const SOP_MG_PRESENTATION: &str = "1.2.840.10008.5.1.4.1.1.1.2";
pub const SOP_MG_PROCESSING: &str = "1.2.840.10008.5.1.4.1.1.1.2.1";
pub const SOP_US: &str = "1.2.840.10008.5.1.4.1.1.6.1";
pub const SOP_US_MULTIFRAME: &str = "1.2.840.10008.5.1.4.1.1.3.1";
pub const SOP_MR: &str = "1.2.840.10008.5.1.4.1.1.4";
pub const SOP_ENHANCED_MR: &str = "1.2.840.10008.5.1.4.1.1.4.1";
pub const SOP_GSPS: &str = "1.2.840.10008.5.1.4.1.1.11.1";
pub const SOP_SEG: &str = "1.2.840.10008.5.1.4.1.1.66.4";

/// Patient side (DICOM Laterality "L"/"R").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Laterality {
    Left,
    Right,
}

impl Laterality {
    pub fn from_code(s: &str) -> Option<Laterality> {
        match s.trim().to_ascii_uppercase().as_str() {
            "L" => Some(Laterality::Left),
            "R" => Some(Laterality::Right),
            _ => None,
        }
    }
    pub fn code(self) -> &'static str {
        match self {
            Laterality::Left => "L",
            Laterality::Right => "R",
        }
    }
}

/// Mammography view (PS3.16 CID 4014).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MgView {
    Cc,
    Mlo,
}

impl MgView {
    /// The View Position (0018,5101) term of the view.
    pub fn code(self) -> &'static str {
        match self {
            MgView::Cc => "CC",
            MgView::Mlo => "MLO",
        }
    }
}

/// What kind of object an instance is, for the case and for imaging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An image of a modality the model reads.
    Image(Modality),
    /// Grayscale Softcopy Presentation State, Structured Report or
    /// Segmentation: may carry an ROI.
    RoiObject,
    Other,
}

/// The modality the model reads of an instance known only by its SOP Class
/// (a refused instance whose data set was not read): `classify` without a
/// Modality to fall back on.
pub fn image_modality_of_class(sop_class: &str) -> Option<Modality> {
    match classify(sop_class, "") {
        Kind::Image(m) => Some(m),
        _ => None,
    }
}

/// The kind of an instance: by SOP Class first, else by Modality.
pub fn classify(sop_class: &str, modality: &str) -> Kind {
    match sop_class {
        SOP_MG_PRESENTATION | SOP_MG_PROCESSING => return Kind::Image(Modality::MG),
        SOP_US | SOP_US_MULTIFRAME => return Kind::Image(Modality::US),
        SOP_MR | SOP_ENHANCED_MR => return Kind::Image(Modality::MR),
        SOP_GSPS | SOP_SEG => return Kind::RoiObject,
        s if s.starts_with("1.2.840.10008.5.1.4.1.1.88.") => return Kind::RoiObject,
        _ => {}
    }
    match modality {
        "MG" => Kind::Image(Modality::MG),
        "US" => Kind::Image(Modality::US),
        "MR" => Kind::Image(Modality::MR),
        "SR" | "PR" | "SEG" => Kind::RoiObject,
        _ => Kind::Other,
    }
}

/// The mammographic view as a View Position (0018,5101) term, and whether it
/// came from the View Code Sequence (0054,0220): that sequence first (PS3.16
/// CID 4014, SNOMED CT or the legacy SNOMED RT codes, else the code meaning),
/// then View Position itself, upper-cased. Ingest indexes this term and
/// imaging selects on it, so that a case is complete by the same views the
/// model will be given.
pub fn view_term(o: &Obj) -> Option<(String, bool)> {
    if let Some(code) = attrs::item(o, tags::VIEW_CODE_SEQUENCE) {
        let value = attrs::text(code, tags::CODE_VALUE).unwrap_or_default();
        let meaning = attrs::text(code, tags::CODE_MEANING)
            .unwrap_or_default()
            .to_ascii_lowercase();
        // The code value decides; the meaning only when the value is unknown.
        let term = match value.as_str() {
            "399162004" | "R-10242" => Some("CC"),
            "399368009" | "R-10226" => Some("MLO"),
            "399260004" | "R-10224" => Some("ML"),
            "399352003" | "R-10228" => Some("LM"),
            _ => match meaning.as_str() {
                "cranio-caudal" => Some("CC"),
                "medio-lateral oblique" => Some("MLO"),
                "medio-lateral" => Some("ML"),
                "latero-medial" => Some("LM"),
                _ => None,
            },
        };
        if let Some(t) = term {
            return Some((t.to_string(), true));
        }
    }
    attrs::text(o, tags::VIEW_POSITION).map(|s| (s.to_ascii_uppercase(), false))
}

/// The side an image shows, as its code (upper-cased): Image Laterality
/// (0020,0062), else Laterality (0020,0060), else the Frame Laterality
/// (0020,9072) of the first frame's Frame Anatomy (PS3.3 C.7.6.16.2.8, for
/// enhanced objects). Ingest indexes this code and imaging reads L and R
/// from it, so the case assembler and the model see the same side.
pub fn laterality_term(o: &Obj) -> Option<String> {
    attrs::text(o, tags::IMAGE_LATERALITY)
        .or_else(|| attrs::text(o, tags::LATERALITY))
        .or_else(|| {
            attrs::functional_group(o, 0, tags::FRAME_ANATOMY_SEQUENCE)
                .and_then(|fa| attrs::text(fa, tags::FRAME_LATERALITY))
        })
        .map(|s| s.to_ascii_uppercase())
}

/// True when an ultrasound image is Doppler / colour flow: a US region of
/// data type colour flow (2), PW/CW spectral (3, 4) or colour M-mode
/// (PS3.3 C.8.5.5.1.2), or an Image Type value naming Doppler/colour
/// (C.8.5.6.1.1). `image_type`: the values, upper-cased.
pub fn us_doppler(region_data_types: impl IntoIterator<Item = i64>, image_type: &[String]) -> bool {
    let region_doppler = region_data_types
        .into_iter()
        .any(|t| matches!(t, 2..=4 | 0x0F..=0x12));
    let type_doppler = image_type.iter().any(|t| {
        t.contains("DOPPLER")
            || t.contains("COLOR")
            || t.contains("CFM")
            || t == "0020"
            || t == "0004"
    });
    region_doppler || type_doppler
}

/// [`us_doppler`] of a data set's header.
pub fn us_doppler_of(o: &Obj) -> bool {
    us_doppler(
        attrs::items(o, tags::SEQUENCE_OF_ULTRASOUND_REGIONS)
            .iter()
            .map(|r| attrs::int(r, tags::REGION_DATA_TYPE).unwrap_or(0)),
        &attrs::texts_upper(o, tags::IMAGE_TYPE),
    )
}
