//! The one vocabulary of imaging modalities the node reads: its DICOM code
//! (Modality (0008,0060), PS3.3 C.7.3.1.1.1), its place among the model's
//! branches, and sets of modalities. Every other module (case rules,
//! imaging, the model, reporting) speaks this type; none has its own.
//!
//! A leaf: imports nothing from the crate.

use serde::{Deserialize, Serialize};

/// A modality the model reads. The declaration order (MR, US, MG) is the
/// order in which case rules list modalities; [`Modality::MODEL_ORDER`] is
/// the order of the model's branches and availability flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Modality {
    MR,
    US,
    MG,
}

impl Modality {
    /// The branches of the model, in the order of the reference's modality
    /// flags `mi = [US, MRI, MG]` (MODEL.md): index `i` of every per-branch
    /// array is `MODEL_ORDER[i]`.
    pub const MODEL_ORDER: [Modality; 3] = [Modality::US, Modality::MR, Modality::MG];

    /// The modality of a DICOM Modality value, if the model reads it.
    pub fn from_dicom(modality: &str) -> Option<Self> {
        match modality.trim() {
            "MR" => Some(Modality::MR),
            "US" => Some(Modality::US),
            "MG" => Some(Modality::MG),
            _ => None,
        }
    }

    /// The DICOM Modality code ("MR", "US", "MG").
    pub fn as_str(self) -> &'static str {
        match self {
            Modality::MR => "MR",
            Modality::US => "US",
            Modality::MG => "MG",
        }
    }

    /// The index of this modality's branch in the model's per-branch arrays.
    pub fn branch(self) -> usize {
        match self {
            Modality::US => 0,
            Modality::MR => 1,
            Modality::MG => 2,
        }
    }

    /// The branch's name in the checkpoint, the parity fixtures and the JSON
    /// of results ("us", "mri", "mg").
    pub fn key(self) -> &'static str {
        match self {
            Modality::US => "us",
            Modality::MR => "mri",
            Modality::MG => "mg",
        }
    }
}

impl std::fmt::Display for Modality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which modalities a case (or one side of it) has, kept in the model's
/// order; serialises as the model's flags `[US, MRI, MG]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ModalitySet([bool; 3]);

impl ModalitySet {
    pub fn with(mut self, m: Modality, present: bool) -> Self {
        self.0[m.branch()] = present;
        self
    }
    pub fn contains(self, m: Modality) -> bool {
        self.0[m.branch()]
    }
    pub fn is_empty(self) -> bool {
        !self.0.iter().any(|f| *f)
    }
    /// The present modalities, in the model's order.
    pub fn present(self) -> impl Iterator<Item = Modality> {
        Modality::MODEL_ORDER
            .into_iter()
            .filter(move |m| self.contains(*m))
    }
    /// The absent modalities, in the model's order.
    pub fn absent(self) -> impl Iterator<Item = Modality> {
        Modality::MODEL_ORDER
            .into_iter()
            .filter(move |m| !self.contains(*m))
    }
    /// The model's availability flags `[US, MRI, MG]`.
    pub fn model_flags(self) -> [bool; 3] {
        self.0
    }
}
