//! The lesion side of a case: the one rule that both the case assembler
//! (is the case complete for this side?) and imaging (which side's views
//! feed the model?) apply, so they can never disagree. Pure: callers pass
//! what the headers say.
//!
//! The rule: the Laterality (PS3.3 C.7.3.1.1.2; Image Laterality C.7.6.1.1.2
//! first, see `header::laterality_term`) shared by every ultrasound B-mode
//! image that carries one (Doppler and colour-flow images are left out:
//! operators often scan the other breast in Doppler for comparison); else the
//! configured side (`[imaging] lesion_side`); else unknown.

use serde::Deserialize;

use crate::header::{Kind, Laterality};
use crate::modality::Modality;

/// Lesion side to use when the ultrasound laterality does not decide it.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SideSetting {
    Left,
    Right,
    /// Do not guess: `prepare_case` leaves side-specific inputs (MG) out and
    /// `prepare_case_sides` prepares both sides. Default.
    #[default]
    Unknown,
}

/// How the lesion side was decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SideBasis {
    /// Image Laterality / Laterality of the ultrasound images.
    UltrasoundLaterality,
    /// `imaging.lesion_side` in the configuration.
    Configuration,
    /// Side unknown; this case is one of the two produced by
    /// `prepare_case_sides`.
    BothSidesRun,
    /// Side unknown and not guessed.
    Unknown,
}

/// The lesion side and how it was decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LesionSide {
    pub side: Option<Laterality>,
    pub basis: SideBasis,
    pub detail: String,
}

/// What the rule reads of one instance.
#[derive(Clone, Copy, Debug)]
pub struct SideEvidence {
    pub kind: Kind,
    pub laterality: Option<Laterality>,
    /// The ultrasound image is Doppler / colour flow (`header::us_doppler`).
    pub doppler: bool,
}

/// The lesion side of a case's instances (see the module doc).
pub fn lesion_side(
    instances: impl IntoIterator<Item = SideEvidence>,
    configured: SideSetting,
) -> LesionSide {
    let lats: Vec<Laterality> = instances
        .into_iter()
        .filter(|m| m.kind == Kind::Image(Modality::US) && !m.doppler)
        .filter_map(|m| m.laterality)
        .collect();
    let has_l = lats.contains(&Laterality::Left);
    let has_r = lats.contains(&Laterality::Right);
    let us_detail = match (has_l, has_r) {
        (true, false) => {
            return LesionSide {
                side: Some(Laterality::Left),
                basis: SideBasis::UltrasoundLaterality,
                detail: format!("{} ultrasound image(s) with laterality L", lats.len()),
            };
        }
        (false, true) => {
            return LesionSide {
                side: Some(Laterality::Right),
                basis: SideBasis::UltrasoundLaterality,
                detail: format!("{} ultrasound image(s) with laterality R", lats.len()),
            };
        }
        (true, true) => "ultrasound images of both sides",
        (false, false) => "no ultrasound laterality",
    };
    match configured {
        SideSetting::Left => LesionSide {
            side: Some(Laterality::Left),
            basis: SideBasis::Configuration,
            detail: format!("{us_detail}; configured side L"),
        },
        SideSetting::Right => LesionSide {
            side: Some(Laterality::Right),
            basis: SideBasis::Configuration,
            detail: format!("{us_detail}; configured side R"),
        },
        SideSetting::Unknown => LesionSide {
            side: None,
            basis: SideBasis::Unknown,
            detail: format!("{us_detail}; no configured side"),
        },
    }
}
