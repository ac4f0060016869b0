//! The SOP classes and transfer syntaxes the node negotiates (PS3.4 Annex B,
//! PS3.5 Section 10 and Annex A).

/// Verification SOP Class (PS3.4 A.4).
pub const VERIFICATION: &str = "1.2.840.10008.1.1";

/// Study Root Query/Retrieve Information Model - FIND (PS3.4 C.6.2.1).
pub const STUDY_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
/// Study Root Query/Retrieve Information Model - MOVE (PS3.4 C.6.2.2).
pub const STUDY_ROOT_MOVE: &str = "1.2.840.10008.5.1.4.1.2.2.2";
/// Study Root Query/Retrieve Information Model - GET (PS3.4 C.6.2.3).
pub const STUDY_ROOT_GET: &str = "1.2.840.10008.5.1.4.1.2.2.3";
/// Explicit VR Little Endian (PS3.5 A.2).
pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";

/// Storage SOP classes accepted by default: breast imaging and the objects a
/// PACS sends along with it (PS3.4 B.5, Table B.5-1).
pub const STORAGE_SOP_CLASSES: &[(&str, &str)] = &[
    (
        "1.2.840.10008.5.1.4.1.1.1.2",
        "Digital Mammography X-Ray Image Storage - For Presentation",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.1.2.1",
        "Digital Mammography X-Ray Image Storage - For Processing",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.13.1.3",
        "Breast Tomosynthesis Image Storage",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.13.1.4",
        "Breast Projection X-Ray Image Storage - For Presentation",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.13.1.5",
        "Breast Projection X-Ray Image Storage - For Processing",
    ),
    ("1.2.840.10008.5.1.4.1.1.6.1", "Ultrasound Image Storage"),
    (
        "1.2.840.10008.5.1.4.1.1.6",
        "Ultrasound Image Storage (Retired)",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.3.1",
        "Ultrasound Multi-frame Image Storage",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.3",
        "Ultrasound Multi-frame Image Storage (Retired)",
    ),
    ("1.2.840.10008.5.1.4.1.1.6.2", "Enhanced US Volume Storage"),
    ("1.2.840.10008.5.1.4.1.1.4", "MR Image Storage"),
    ("1.2.840.10008.5.1.4.1.1.4.1", "Enhanced MR Image Storage"),
    (
        "1.2.840.10008.5.1.4.1.1.4.3",
        "Enhanced MR Color Image Storage",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.7",
        "Secondary Capture Image Storage",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.7.1",
        "Multi-frame Single Bit Secondary Capture Image Storage",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.7.2",
        "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.7.3",
        "Multi-frame Grayscale Word Secondary Capture Image Storage",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.7.4",
        "Multi-frame True Color Secondary Capture Image Storage",
    ),
    ("1.2.840.10008.5.1.4.1.1.88.22", "Enhanced SR Storage"),
    ("1.2.840.10008.5.1.4.1.1.88.33", "Comprehensive SR Storage"),
    (
        "1.2.840.10008.5.1.4.1.1.88.34",
        "Comprehensive 3D SR Storage",
    ),
    ("1.2.840.10008.5.1.4.1.1.66.4", "Segmentation Storage"),
    (
        "1.2.840.10008.5.1.4.1.1.11.1",
        "Grayscale Softcopy Presentation State Storage",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.88.59",
        "Key Object Selection Document Storage",
    ),
];

/// Transfer syntaxes accepted, in the node's order of preference. Files are
/// kept as received, so the order only matters when a peer proposes several
/// in one presentation context: keep what it would send natively.
pub const TRANSFER_SYNTAXES: &[(&str, &str)] = &[
    ("1.2.840.10008.1.2.1", "Explicit VR Little Endian"),
    ("1.2.840.10008.1.2", "Implicit VR Little Endian"),
    ("1.2.840.10008.1.2.2", "Explicit VR Big Endian (Retired)"),
    (
        "1.2.840.10008.1.2.1.99",
        "Deflated Explicit VR Little Endian",
    ),
    ("1.2.840.10008.1.2.4.50", "JPEG Baseline (Process 1)"),
    ("1.2.840.10008.1.2.4.51", "JPEG Extended (Process 2 & 4)"),
    (
        "1.2.840.10008.1.2.4.57",
        "JPEG Lossless, Non-Hierarchical (Process 14)",
    ),
    (
        "1.2.840.10008.1.2.4.70",
        "JPEG Lossless, First-Order Prediction (Process 14 SV1)",
    ),
    ("1.2.840.10008.1.2.4.80", "JPEG-LS Lossless"),
    ("1.2.840.10008.1.2.4.81", "JPEG-LS Near-Lossless"),
    ("1.2.840.10008.1.2.4.90", "JPEG 2000 Lossless Only"),
    ("1.2.840.10008.1.2.4.91", "JPEG 2000"),
    ("1.2.840.10008.1.2.5", "RLE Lossless"),
];

/// Implicit VR Little Endian: the default transfer syntax, and the encoding of
/// every DIMSE command set (PS3.7 6.3.1).
pub const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";

/// Whether `uid` is one of the storage SOP classes accepted by default.
pub fn is_default_storage_class(uid: &str) -> bool {
    STORAGE_SOP_CLASSES.iter().any(|(u, _)| *u == uid)
}

/// Whether `uid` looks like a Storage SOP class (PS3.4 B.5: they all live
/// under 1.2.840.10008.5.1.4.1.1), used when `accept_any_storage` is on.
pub fn is_storage_class(uid: &str) -> bool {
    uid.starts_with("1.2.840.10008.5.1.4.1.1.") || is_default_storage_class(uid)
}
