//! Coded concepts used in the outputs, with code meanings as in PS3.16 (DCM codes:
//! PS3.16 Annex D; SNOMED CT, LOINC, UCUM, UMLS as referenced by the templates) and
//! the node's private coding scheme `99HER2MAP` for concepts no standard code covers
//! (declared in the Coding Scheme Identification Sequence, PS3.3 §C.12.1.1.4).

/// A coded concept (Code Sequence Macro, PS3.3 Table 8.8-1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Code {
    pub value: &'static str,
    pub scheme: &'static str,
    pub meaning: &'static str,
}

const fn c(value: &'static str, scheme: &'static str, meaning: &'static str) -> Code {
    Code {
        value,
        scheme,
        meaning,
    }
}

/// Designator of the node's private coding scheme.
pub const PRIVATE_SCHEME: &str = "99HER2MAP";
/// Name of the private coding scheme, for the Coding Scheme Identification Sequence.
pub const PRIVATE_SCHEME_NAME: &str = "HER2 MAP node local concepts";

// TID 1500 Measurement Report
pub const IMAGING_MEASUREMENT_REPORT: Code = c("126000", "DCM", "Imaging Measurement Report");
pub const LANGUAGE_OF_CONTENT: Code =
    c("121049", "DCM", "Language of Content Item and Descendants");
pub const ENGLISH_US: Code = c("en-US", "RFC5646", "English (United States)");
pub const PROCEDURE_REPORTED: Code = c("121058", "DCM", "Procedure reported");
pub const IMAGE_LIBRARY: Code = c("111028", "DCM", "Image Library");
pub const IMAGE_LIBRARY_GROUP: Code = c("126200", "DCM", "Image Library Group");
pub const IMAGING_MEASUREMENTS: Code = c("126010", "DCM", "Imaging Measurements");
pub const QUALITATIVE_EVALUATIONS: Code = c("C0034375", "UMLS", "Qualitative Evaluations");
pub const COMMENT: Code = c("121106", "DCM", "Comment");

// TID 1001/1002/1004 observation context, device observer
pub const OBSERVER_TYPE: Code = c("121005", "DCM", "Observer Type");
pub const DEVICE: Code = c("121007", "DCM", "Device");
pub const DEVICE_OBSERVER_UID: Code = c("121012", "DCM", "Device Observer UID");
pub const DEVICE_OBSERVER_NAME: Code = c("121013", "DCM", "Device Observer Name");
pub const DEVICE_OBSERVER_MANUFACTURER: Code = c("121014", "DCM", "Device Observer Manufacturer");
pub const DEVICE_OBSERVER_MODEL_NAME: Code = c("121015", "DCM", "Device Observer Model Name");

// TID 1501 Measurement and Qualitative Evaluation Group
pub const MEASUREMENT_GROUP: Code = c("125007", "DCM", "Measurement Group");
pub const TRACKING_IDENTIFIER: Code = c("112039", "DCM", "Tracking Identifier");
pub const TRACKING_UNIQUE_IDENTIFIER: Code = c("112040", "DCM", "Tracking Unique Identifier");
pub const FINDING: Code = c("121071", "DCM", "Finding");
pub const IMAGE_REGION: Code = c("111030", "DCM", "Image Region");
pub const ILLUSTRATION_OF_ROI: Code = c("121200", "DCM", "Illustration of ROI");
pub const MALIGNANT_NEOPLASM_OF_BREAST: Code =
    c("254837009", "SCT", "Malignant neoplasm of breast");
pub const FINDING_SITE: Code = c("363698007", "SCT", "Finding Site");
pub const BREAST: Code = c("76752008", "SCT", "Breast");
pub const LATERALITY: Code = c("272741003", "SCT", "Laterality");
pub const LEFT: Code = c("7771000", "SCT", "Left");
pub const RIGHT: Code = c("24028007", "SCT", "Right");

// TID 4019 Algorithm Identification
pub const ALGORITHM_NAME: Code = c("111001", "DCM", "Algorithm Name");
pub const ALGORITHM_VERSION: Code = c("111003", "DCM", "Algorithm Version");
pub const ALGORITHM_PARAMETERS: Code = c("111002", "DCM", "Algorithm Parameters");

// HER2 qualitative evaluation
pub const HER2_INTERPRETATION: Code = c("48676-1", "LN", "HER2 [Interpretation] in Tissue");
pub const POSITIVE: Code = c("10828004", "SCT", "Positive");
pub const NEGATIVE: Code = c("260385009", "SCT", "Negative");

// Units. Probabilities are written in percent, not as a fraction with the
// unit (1, UCUM, "no units"): viewers print a NUM as its value and the
// unit's code value (OHIF 3.13: `toFixed(2)` + CodeValue), so a fraction
// reads "0.73 1" and small probabilities vanish as "0.00 1", where percent
// reads "73.00 %".
pub const UCUM_PERCENT: Code = c("%", "UCUM", "percent");

// TID 1602 Image Library Entry Descriptors
pub const MODALITY: Code = c("121139", "DCM", "Modality");
pub const IMAGE_LATERALITY: Code = c("111027", "DCM", "Image Laterality");
pub const IMAGE_VIEW: Code = c("111031", "DCM", "Image View");
pub const STUDY_DATE: Code = c("111060", "DCM", "Study Date");
pub const CRANIO_CAUDAL: Code = c("399162004", "SCT", "cranio-caudal");
pub const MEDIO_LATERAL_OBLIQUE: Code = c("399368009", "SCT", "medio-lateral oblique");

// Modalities (CID 29)
pub const MOD_MG: Code = c("MG", "DCM", "Mammography");
pub const MOD_US: Code = c("US", "DCM", "Ultrasound");
pub const MOD_MR: Code = c("MR", "DCM", "Magnetic Resonance");

// Procedures reported (SNOMED CT procedures)
pub const PROC_MAMMOGRAPHY: Code = c("71651007", "SCT", "Mammography");
pub const PROC_US_BREAST: Code = c("47079000", "SCT", "Ultrasonography of breast");
pub const PROC_MR_BREAST: Code = c("241615005", "SCT", "Magnetic resonance imaging of breast");
pub const PROC_IMAGING: Code = c("363679005", "SCT", "Imaging");

// Source Image Sequence purpose (CID 7202)
pub const SOURCE_IMAGE_FOR_PROCESSING: Code = c(
    "121322",
    "DCM",
    "Source image for image processing operation",
);

// Private concepts (99HER2MAP). The meanings are short: OHIF shows each NUM
// of a measurement group as a label line "meaning: value unit" beside the
// region, and long lines run off the viewport.
pub const P_HER2_PROBABILITY: Code = c(
    "HER2P",
    PRIVATE_SCHEME,
    "Probability of HER2-positive status",
);
pub const P_HER2_PROBABILITY_US: Code = c(
    "HER2P-US",
    PRIVATE_SCHEME,
    "HER2-positive probability, US alone",
);
pub const P_HER2_PROBABILITY_MR: Code = c(
    "HER2P-MR",
    PRIVATE_SCHEME,
    "HER2-positive probability, MR alone",
);
pub const P_HER2_PROBABILITY_MG: Code = c(
    "HER2P-MG",
    PRIVATE_SCHEME,
    "HER2-positive probability, MG alone",
);
pub const P_MODALITY_USED: Code = c("MODUSED", PRIVATE_SCHEME, "Modality used by the model");
pub const P_MODALITY_MISSING: Code = c(
    "MODMISSING",
    PRIVATE_SCHEME,
    "Modality missing from the model input",
);
pub const P_ROI_METHOD: Code = c("ROIMETHOD", PRIVATE_SCHEME, "Region of interest method");
pub const P_DECISION_THRESHOLD: Code = c(
    "THRESHOLD",
    PRIVATE_SCHEME,
    "HER2-positive decision threshold",
);

/// Normalise a modality string ("MRI" → "MR", upper case).
pub fn normalize_modality(m: &str) -> String {
    let m = m.trim().to_ascii_uppercase();
    match m.as_str() {
        "MRI" => "MR".to_string(),
        "MAMMO" | "MAMMOGRAPHY" => "MG".to_string(),
        "ULTRASOUND" => "US".to_string(),
        _ => m,
    }
}

/// CID 29 code of a (normalised) modality, if it is one of the model's three.
pub fn modality_code(m: &str) -> Option<Code> {
    match normalize_modality(m).as_str() {
        "MG" => Some(MOD_MG),
        "US" => Some(MOD_US),
        "MR" => Some(MOD_MR),
        _ => None,
    }
}

/// Procedure code for a modality.
pub fn procedure_code(m: &str) -> Code {
    match normalize_modality(m).as_str() {
        "MG" => PROC_MAMMOGRAPHY,
        "US" => PROC_US_BREAST,
        "MR" => PROC_MR_BREAST,
        _ => PROC_IMAGING,
    }
}

/// Laterality code from "L"/"R" (also "LEFT"/"RIGHT").
pub fn laterality_code(l: &str) -> Option<Code> {
    match l.trim().to_ascii_uppercase().as_str() {
        "L" | "LEFT" => Some(LEFT),
        "R" | "RIGHT" => Some(RIGHT),
        _ => None,
    }
}

/// Normalised laterality letter ("L"/"R") or None.
pub fn laterality_letter(l: &str) -> Option<&'static str> {
    match l.trim().to_ascii_uppercase().as_str() {
        "L" | "LEFT" => Some("L"),
        "R" | "RIGHT" => Some("R"),
        _ => None,
    }
}

/// View code from "CC"/"MLO".
pub fn view_code(v: &str) -> Option<Code> {
    match v.trim().to_ascii_uppercase().as_str() {
        "CC" => Some(CRANIO_CAUDAL),
        "MLO" => Some(MEDIO_LATERAL_OBLIQUE),
        _ => None,
    }
}
