//! The pure case rules: what is present, what is complete, and when a case
//! goes to inference. No I/O and no clock: callers pass `now`, so every rule
//! is tested with exact instants.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::db::CaseMember;
use crate::header::{Laterality, classify};
pub use crate::modality::Modality;
use crate::side::{self, SideEvidence, SideSetting};

/// What happens when `max_wait` passes with required modalities missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Partial {
    /// Run with the usable modalities; the result names the missing ones.
    Run,
    /// Keep the case for an operator (`her2map cases run|release`).
    Hold,
}

/// The rules, from `[cases]`.
#[derive(Debug, Clone)]
pub struct CaseRules {
    pub required: Vec<Modality>,
    pub stable_age: Duration,
    pub max_wait: Duration,
    pub partial: Partial,
    /// Distinct MR series needed for a complete DCE-MRI: the pre-contrast
    /// phase plus the post-contrast phases up to the one the model reads.
    pub mri_series_required: usize,
    /// Lesion side when ultrasound does not say (`[imaging] lesion_side`).
    pub lesion_side: SideSetting,
}

/// The modalities of a case as the rules see them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Completeness {
    /// Modalities with at least one usable image.
    pub usable: Vec<Modality>,
    /// Modalities meeting their completeness rule.
    pub complete: Vec<Modality>,
    /// Required modalities not complete yet, each with what is lacking.
    pub missing: Vec<(Modality, String)>,
    pub lesion_side: Option<String>,
}

/// What the case should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Wait {
        until: OffsetDateTime,
        reason: String,
    },
    Ready {
        reason: String,
    },
    Hold {
        reason: String,
    },
}

fn is_image(m: &CaseMember) -> bool {
    // Derived/secondary objects (our own results coming back, localizers)
    // do not make a modality usable.
    !m.image_type.to_ascii_uppercase().contains("LOCALIZER")
        && !m.sop_class_uid.starts_with("1.2.840.10008.5.1.4.1.1.7")
        && !m.sop_class_uid.starts_with("1.2.840.10008.5.1.4.1.1.88")
}

/// The lesion side of a case's members by the one rule imaging applies too
/// ([`crate::side`]), as its code ("L", "R"), or `None` when unknown.
pub fn lesion_side(members: &[CaseMember], rules: &CaseRules) -> Option<String> {
    let evidence = members.iter().map(|m| SideEvidence {
        kind: classify(&m.sop_class_uid, &m.modality.trim().to_ascii_uppercase()),
        laterality: Laterality::from_code(&m.laterality),
        doppler: m.us_doppler,
    });
    side::lesion_side(evidence, rules.lesion_side)
        .side
        .map(|s| s.code().to_string())
}

pub fn completeness(members: &[CaseMember], rules: &CaseRules) -> Completeness {
    let side = lesion_side(members, rules);
    let images: Vec<&CaseMember> = members.iter().filter(|m| is_image(m)).collect();
    let of = |modality: Modality| {
        images
            .iter()
            .copied()
            .filter(move |m| Modality::from_dicom(&m.modality) == Some(modality))
    };
    let mut usable = Vec::new();
    let mut complete = Vec::new();
    let mut lacking = Vec::new();

    // MG: CC and MLO of the lesion side (either side when unknown).
    let has_view = |view: &str, lat: &str| {
        of(Modality::MG).any(|m| m.view.trim() == view && m.laterality.trim() == lat)
    };
    if of(Modality::MG).next().is_some() {
        usable.push(Modality::MG);
    }
    let mg_sides: Vec<&str> = match side.as_deref() {
        Some(s) => vec![s],
        None => vec!["L", "R"],
    };
    if mg_sides
        .iter()
        .any(|s| has_view("CC", s) && has_view("MLO", s))
    {
        complete.push(Modality::MG);
    } else {
        let which = side.as_deref().unwrap_or("either");
        lacking.push((Modality::MG, format!("CC and MLO of the {which} side")));
    }

    // US: at least one image.
    if of(Modality::US).next().is_some() {
        usable.push(Modality::US);
        complete.push(Modality::US);
    } else {
        lacking.push((Modality::US, "a B-mode image".into()));
    }

    // MR: enough DCE phases (distinct series).
    let mut series: Vec<&str> = of(Modality::MR)
        .map(|m| m.series_instance_uid.as_str())
        .collect();
    series.sort_unstable();
    series.dedup();
    if !series.is_empty() {
        usable.push(Modality::MR);
    }
    if series.len() >= rules.mri_series_required {
        complete.push(Modality::MR);
    } else {
        lacking.push((
            Modality::MR,
            format!(
                "{} of {} DCE phases",
                series.len(),
                rules.mri_series_required
            ),
        ));
    }

    usable.sort();
    complete.sort();
    let missing = lacking
        .into_iter()
        .filter(|(m, _)| rules.required.contains(m))
        .collect();
    Completeness {
        usable,
        complete,
        missing,
        lesion_side: side,
    }
}

fn names(ms: &[Modality]) -> String {
    ms.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(",")
}

fn missing_text(c: &Completeness) -> String {
    c.missing
        .iter()
        .map(|(m, what)| format!("{} ({what})", m.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The waiting reason of a case whose missing modalities are being
/// fetched from `sources` (comma-separated names; empty while queued): the
/// assembler writes it, the operator views show it.
pub fn fetch_reason(sources: &str) -> String {
    if sources.is_empty() {
        "fetch from the sources queued".to_string()
    } else {
        format!("fetching from {sources}")
    }
}

/// Decide for a collecting case. `first`/`last` are when its first and its
/// latest instance arrived (for a reopened case, `first` restarts at the
/// reopening).
pub fn decide(
    c: &Completeness,
    first: OffsetDateTime,
    last: OffsetDateTime,
    now: OffsetDateTime,
    rules: &CaseRules,
) -> Decision {
    let stable_at = last + rules.stable_age;
    let max_at = first + rules.max_wait;
    if c.missing.is_empty() {
        if now >= stable_at {
            return Decision::Ready {
                reason: format!(
                    "complete ({}), no new instance for {} s",
                    names(&c.complete),
                    rules.stable_age.as_secs()
                ),
            };
        }
        return Decision::Wait {
            until: stable_at,
            reason: format!(
                "complete; waiting {} s of stable age",
                rules.stable_age.as_secs()
            ),
        };
    }
    if now < max_at {
        return Decision::Wait {
            until: max_at,
            reason: format!("waiting for {}", missing_text(c)),
        };
    }
    if c.usable.is_empty() {
        return Decision::Hold {
            reason: "max wait reached with no usable modality".into(),
        };
    }
    match rules.partial {
        // Running partial also respects the stable age: a study still
        // arriving at the deadline is not cut in half.
        Partial::Run if now < stable_at => Decision::Wait {
            until: stable_at,
            reason: format!(
                "max wait reached; waiting {} s of stable age",
                rules.stable_age.as_secs()
            ),
        },
        Partial::Run => Decision::Ready {
            reason: format!(
                "max wait reached: running with {}, missing {}",
                names(&c.usable),
                missing_text(c)
            ),
        },
        Partial::Hold => Decision::Hold {
            reason: format!(
                "max wait reached, missing {}: held for an operator",
                missing_text(c)
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(modality: &str, series: &str, lat: &str, view: &str) -> CaseMember {
        CaseMember {
            sop_instance_uid: format!("1.{series}.{view}.{lat}"),
            sop_class_uid: match modality {
                "MG" => crate::header::SOP_MG_PRESENTATION,
                "US" => crate::header::SOP_US,
                _ => crate::header::SOP_MR,
            }
            .into(),
            study_instance_uid: "1.2".into(),
            series_instance_uid: series.into(),
            modality: modality.into(),
            laterality: lat.into(),
            view: view.into(),
            series_description: String::new(),
            image_type: "ORIGINAL\\PRIMARY".into(),
            path: String::new(),
            us_doppler: false,
        }
    }

    fn rules() -> CaseRules {
        CaseRules {
            required: vec![Modality::MR, Modality::US, Modality::MG],
            stable_age: Duration::from_secs(60),
            max_wait: Duration::from_secs(86400),
            partial: Partial::Run,
            mri_series_required: 3,
            lesion_side: SideSetting::Unknown,
        }
    }

    fn full_patient() -> Vec<CaseMember> {
        vec![
            member("US", "u", "L", ""),
            member("MG", "m", "L", "CC"),
            member("MG", "m", "L", "MLO"),
            member("MR", "p0", "", ""),
            member("MR", "p1", "", ""),
            member("MR", "p2", "", ""),
        ]
    }

    #[test]
    fn complete_case_waits_for_stable_age_then_runs() {
        let t0 = OffsetDateTime::UNIX_EPOCH;
        let c = completeness(&full_patient(), &rules());
        assert!(c.missing.is_empty(), "{c:?}");
        assert_eq!(c.lesion_side.as_deref(), Some("L"));
        let secs = |s| t0 + Duration::from_secs(s);
        assert!(
            matches!(decide(&c, t0, secs(10), secs(69), &rules()), Decision::Wait { until, .. } if until == secs(70))
        );
        assert!(matches!(
            decide(&c, t0, secs(10), secs(70), &rules()),
            Decision::Ready { .. }
        ));
    }

    #[test]
    fn mammography_needs_both_views_of_the_lesion_side() {
        let mut m = full_patient();
        m.retain(|x| !(x.modality == "MG" && x.view == "MLO"));
        m.push(member("MG", "m", "R", "MLO"));
        let c = completeness(&m, &rules());
        assert_eq!(c.missing.len(), 1);
        assert!(c.missing[0].1.contains("L side"), "{c:?}");
        // Unknown side: CC+MLO of either side will do.
        let mut r = rules();
        r.lesion_side = SideSetting::Unknown;
        let mut m2: Vec<_> = m.into_iter().filter(|x| x.modality != "US").collect();
        m2.push(member("MG", "m", "R", "CC"));
        r.required = vec![Modality::MG, Modality::MR];
        assert!(completeness(&m2, &r).missing.is_empty());
    }

    #[test]
    fn arrival_order_does_not_matter() {
        // Every permutation of the six arrivals ends complete with side L.
        let all = full_patient();
        let mut idx: Vec<usize> = (0..all.len()).collect();
        let mut count = 0;
        permute(&mut idx, 0, &mut |order| {
            let members: Vec<_> = order.iter().map(|&i| all[i].clone()).collect();
            let c = completeness(&members, &rules());
            assert!(c.missing.is_empty());
            assert_eq!(c.lesion_side.as_deref(), Some("L"));
            // And no prefix is complete.
            for k in 0..members.len() {
                assert!(!completeness(&members[..k], &rules()).missing.is_empty());
            }
            count += 1;
        });
        assert_eq!(count, 720);
    }

    fn permute(v: &mut Vec<usize>, k: usize, f: &mut impl FnMut(&[usize])) {
        if k == v.len() {
            f(v);
            return;
        }
        for i in k..v.len() {
            v.swap(k, i);
            permute(v, k + 1, f);
            v.swap(k, i);
        }
    }

    #[test]
    fn max_wait_runs_partial_or_holds() {
        let t0 = OffsetDateTime::UNIX_EPOCH;
        let mut m = full_patient();
        m.retain(|x| x.modality != "MR");
        let c = completeness(&m, &rules());
        assert_eq!(c.missing.len(), 1);
        let day = Duration::from_secs(86400);
        assert!(
            matches!(decide(&c, t0, t0, t0 + day - Duration::from_secs(1), &rules()), Decision::Wait { until, .. } if until == t0 + day)
        );
        match decide(&c, t0, t0, t0 + day, &rules()) {
            Decision::Ready { reason } => assert!(reason.contains("missing MR"), "{reason}"),
            d => panic!("{d:?}"),
        }
        let mut hold = rules();
        hold.partial = Partial::Hold;
        assert!(matches!(
            decide(&c, t0, t0, t0 + day, &hold),
            Decision::Hold { .. }
        ));
        // Nothing usable: held whatever the policy.
        let empty = completeness(&[], &rules());
        assert!(matches!(
            decide(&empty, t0, t0, t0 + day, &rules()),
            Decision::Hold { .. }
        ));
        // A study still arriving at the deadline is not cut in half.
        assert!(matches!(
            decide(&c, t0, t0 + day, t0 + day, &rules()),
            Decision::Wait { .. }
        ));
    }

    #[test]
    fn a_late_mri_phase_completes_the_case() {
        let mut m = full_patient();
        m.retain(|x| x.series_instance_uid != "p2");
        let c = completeness(&m, &rules());
        assert_eq!(c.missing[0].0, Modality::MR);
        assert!(c.missing[0].1.contains("2 of 3"));
        m.push(member("MR", "p2", "", ""));
        assert!(completeness(&m, &rules()).missing.is_empty());
    }

    #[test]
    fn ultrasound_sides_that_disagree_fall_back_to_configuration() {
        let mut m = full_patient();
        m.push(member("US", "u2", "R", ""));
        assert_eq!(completeness(&m, &rules()).lesion_side, None);
        let mut r = rules();
        r.lesion_side = SideSetting::Right;
        assert_eq!(completeness(&m, &r).lesion_side.as_deref(), Some("R"));
    }

    /// The assembler and imaging apply one rule: a Doppler image of the
    /// other breast (indexed with `us_doppler`) does not change the side,
    /// for the case's completeness as for the views imaging selects.
    #[test]
    fn a_doppler_image_of_the_other_side_does_not_change_the_side() {
        let mut m = full_patient();
        let mut doppler = member("US", "u2", "R", "");
        doppler.us_doppler = true;
        m.push(doppler.clone());
        let c = completeness(&m, &rules());
        assert_eq!(c.lesion_side.as_deref(), Some("L"));
        assert!(c.missing.is_empty(), "{c:?}");
        // The same members as imaging sees them decide the same side.
        let evidence = m.iter().map(|m| SideEvidence {
            kind: classify(&m.sop_class_uid, &m.modality),
            laterality: Laterality::from_code(&m.laterality),
            doppler: m.us_doppler,
        });
        let decided = side::lesion_side(evidence, SideSetting::Unknown);
        assert_eq!(decided.side, Some(Laterality::Left));
        // As a B-mode image it would make the sides disagree.
        doppler.us_doppler = false;
        m.pop();
        m.push(doppler);
        assert_eq!(completeness(&m, &rules()).lesion_side, None);
    }
}
