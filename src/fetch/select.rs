//! The pure rules of a fetch: the query keys for a patient, the validation
//! of what a source answers (a PACS's match is checked on the identifiers,
//! never trusted), and which series could complete a case. No I/O: both
//! protocols (C-FIND Identifiers, QIDO-RS JSON) are read into [`Keys`].

use std::collections::{BTreeMap, BTreeSet};

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use regex::Regex;

use crate::cases::PatientKeyMode;
use crate::cases::assembler::widen;
use crate::header::{Kind, classify};
use crate::modality::Modality;

/// The patient a fetch is for, as the case's own instances name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patient {
    pub id: String,
    pub issuer: String,
}

/// The attributes of one match, whatever the protocol: each value trimmed,
/// several values joined with `\`.
#[derive(Debug, Clone, Default)]
pub struct Keys(BTreeMap<Tag, String>);

impl Keys {
    pub fn get(&self, tag: Tag) -> &str {
        self.0.get(&tag).map(String::as_str).unwrap_or("")
    }

    pub fn has(&self, tag: Tag) -> bool {
        self.0.contains_key(&tag)
    }

    pub fn values(&self, tag: Tag) -> Vec<String> {
        self.get(tag)
            .split('\\')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    }

    pub fn set(&mut self, tag: Tag, value: impl Into<String>) {
        self.0.insert(tag, value.into());
    }

    /// The text attributes of a C-FIND Identifier (sequences are skipped).
    pub fn from_dicom(obj: &dicom_object::InMemDicomObject) -> Self {
        let mut keys = Keys::default();
        for e in obj.iter() {
            if let Ok(v) = e.to_multi_str() {
                let joined = v
                    .iter()
                    .map(|s| s.trim_end_matches(['\0', ' ']).trim())
                    .collect::<Vec<_>>()
                    .join("\\");
                keys.set(e.header().tag, joined);
            }
        }
        keys
    }

    /// A QIDO-RS result in the DICOM JSON model (PS3.18 F.2): "GGGGEEEE" →
    /// {"vr", "Value": [...]}; strings and numbers are kept, person names
    /// by their alphabetic form.
    pub fn from_json(obj: &serde_json::Value) -> Self {
        let mut keys = Keys::default();
        let Some(map) = obj.as_object() else {
            return keys;
        };
        for (k, v) in map {
            let Ok(n) = u32::from_str_radix(k, 16) else {
                continue;
            };
            let tag = Tag((n >> 16) as u16, (n & 0xFFFF) as u16);
            let values = v["Value"].as_array().cloned().unwrap_or_default();
            let texts: Vec<String> = values
                .iter()
                .filter_map(|x| match x {
                    serde_json::Value::String(s) => Some(s.trim().to_string()),
                    serde_json::Value::Number(n) => Some(n.to_string()),
                    serde_json::Value::Object(o) => o
                        .get("Alphabetic")
                        .and_then(|a| a.as_str())
                        .map(str::to_string),
                    _ => None,
                })
                .collect();
            keys.set(tag, texts.join("\\"));
        }
        keys
    }
}

/// The Study Date range to ask for: every date a study of the case could
/// have and still join it (`window_days` around the case's dates), as a
/// DA range "YYYYMMDD-YYYYMMDD" (PS3.4 C.2.2.2.5); empty when the case has
/// no date.
pub fn study_date_range(oldest: &str, newest: &str, window_days: i64) -> String {
    let fmt = time::macros::format_description!("[year][month][day]");
    let (Ok(lo), Ok(hi)) = (
        time::Date::parse(oldest.trim(), &fmt),
        time::Date::parse(newest.trim(), &fmt),
    ) else {
        return String::new();
    };
    let days = time::Duration::days(window_days);
    let from = hi.checked_sub(days).unwrap_or(hi);
    let to = lo.checked_add(days).unwrap_or(lo);
    match (from.format(&fmt), to.format(&fmt)) {
        (Ok(a), Ok(b)) => format!("{a}-{b}"),
        _ => String::new(),
    }
}

/// A study a source holds that may belong to the case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StudyMatch {
    pub study_uid: String,
    pub study_date: String,
    pub modalities: Vec<String>,
}

/// A series of such a study.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesMatch {
    pub study_uid: String,
    pub series_uid: String,
    pub modality: String,
    pub description: String,
    pub instances: Option<i64>,
}

/// The case a fetch is for, as the validation rules need it.
#[derive(Debug, Clone)]
pub struct CaseScope {
    pub patient: Patient,
    pub key_mode: PatientKeyMode,
    pub oldest: String,
    pub newest: String,
    pub window_days: i64,
}

/// Check a study-level match against the case: the same Patient ID (and
/// Issuer, when the case is keyed by both), a Study Date the case window
/// admits, a Study Instance UID. A PACS that answers with another
/// patient's studies (a wildcard it applied, a key it ignored) is refused
/// here, whatever it claims to have matched.
pub fn validate_study(keys: &Keys, scope: &CaseScope) -> Result<StudyMatch, String> {
    let id = keys.get(tags::PATIENT_ID);
    if id != scope.patient.id.trim() {
        return Err("another Patient ID".into());
    }
    if scope.key_mode == PatientKeyMode::IdIssuer
        && keys.get(tags::ISSUER_OF_PATIENT_ID) != scope.patient.issuer.trim()
    {
        return Err("another Issuer of Patient ID".into());
    }
    let study_uid = keys.get(tags::STUDY_INSTANCE_UID).to_string();
    if study_uid.is_empty() {
        return Err("no Study Instance UID".into());
    }
    let study_date = keys.get(tags::STUDY_DATE).to_string();
    if widen(&scope.oldest, &scope.newest, &study_date, scope.window_days).is_none() {
        return Err(format!("Study Date {study_date} outside the case window"));
    }
    Ok(StudyMatch {
        study_uid,
        study_date,
        modalities: keys.values(tags::MODALITIES_IN_STUDY),
    })
}

/// Whether a study could hold what the case lacks: its Modalities in Study
/// name one of them, or it names none (a PACS that does not keep the
/// attribute: the series level decides).
pub fn study_may_help(study: &StudyMatch, missing: &[Modality]) -> bool {
    study.modalities.is_empty()
        || study
            .modalities
            .iter()
            .any(|m| Modality::from_dicom(m).is_some_and(|m| missing.contains(&m)))
}

/// [`validate_series`] over one study's series matches: the accepted ones
/// are appended to `into`; returns how many were, and why each other was not.
pub fn accept_series(
    matches: impl IntoIterator<Item = Keys>,
    study_uid: &str,
    patient: &Patient,
    into: &mut Vec<SeriesMatch>,
) -> (usize, Vec<String>) {
    let (mut accepted, mut rejected) = (0, Vec::new());
    for keys in matches {
        match validate_series(&keys, study_uid, patient) {
            Ok(s) => {
                accepted += 1;
                into.push(s);
            }
            Err(why) => rejected.push(why),
        }
    }
    (accepted, rejected)
}

/// Check a series-level match: it must be of the study asked about (when
/// the PACS says which) and name its series.
pub fn validate_series(
    keys: &Keys,
    study_uid: &str,
    patient: &Patient,
) -> Result<SeriesMatch, String> {
    let of_study = keys.get(tags::STUDY_INSTANCE_UID);
    if !of_study.is_empty() && of_study != study_uid {
        return Err("a series of another study".into());
    }
    // Patient ID is no series-level key of the Study Root model, but a PACS
    // that returns it must return this patient's.
    let id = keys.get(tags::PATIENT_ID);
    if !id.is_empty() && id != patient.id.trim() {
        return Err("a series of another Patient ID".into());
    }
    let series_uid = keys.get(tags::SERIES_INSTANCE_UID).to_string();
    if series_uid.is_empty() {
        return Err("no Series Instance UID".into());
    }
    Ok(SeriesMatch {
        study_uid: study_uid.to_string(),
        series_uid,
        modality: keys.get(tags::MODALITY).to_ascii_uppercase(),
        description: keys.get(tags::SERIES_DESCRIPTION).to_string(),
        instances: keys
            .get(tags::NUMBER_OF_SERIES_RELATED_INSTANCES)
            .parse()
            .ok(),
    })
}

/// Series descriptions of localisers and survey scans: what the case rules
/// never count as an image of the modality (their Image Type LOCALIZER,
/// read per instance, is not in a series-level answer).
fn is_localizer(description: &str) -> bool {
    let d = description.to_ascii_lowercase();
    [
        "locali",
        "scout",
        "survey",
        "3-plane",
        "3 plane",
        "tri-pilot",
        "pilot",
    ]
    .iter()
    .any(|w| d.contains(w))
}

/// A series chosen for retrieve, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    pub series: SeriesMatch,
    pub modality: Modality,
    pub why: String,
}

/// The series that could complete the case: of a missing modality (by the
/// kind the case rules and imaging give the series' Modality, so results,
/// presentation states and reports are never fetched), not localisers,
/// not already held (`held`: the case's series UIDs); for MR the DCE
/// series: those whose description the imaging rules read as a pre- or
/// post-contrast phase, and those with the slice count most MR series share
/// (the DCE signature of `imaging::select::detect_dce`, at series level).
pub fn choose_series(
    series: &[SeriesMatch],
    missing: &[Modality],
    held: &BTreeSet<String>,
    pre_patterns: &[Regex],
    post_patterns: &[Regex],
) -> Vec<Chosen> {
    let candidates: Vec<(&SeriesMatch, Modality)> = series
        .iter()
        .filter(|s| !held.contains(&s.series_uid))
        .filter_map(|s| match classify("", &s.modality) {
            Kind::Image(m) if missing.contains(&m) => Some((s, m)),
            _ => None,
        })
        .filter(|(s, _)| !is_localizer(&s.description))
        .collect();
    // The most common instance count among the MR candidates.
    let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
    for (s, m) in &candidates {
        if *m == Modality::MR
            && let Some(n) = s.instances
        {
            *counts.entry(n).or_default() += 1;
        }
    }
    let dce_count = counts
        .iter()
        .max_by_key(|(n, c)| (**c, **n))
        .map(|(n, _)| *n);
    candidates
        .into_iter()
        .filter_map(|(s, m)| {
            let why = match m {
                Modality::MR => {
                    let phase = pre_patterns
                        .iter()
                        .chain(post_patterns)
                        .any(|r| r.is_match(&s.description));
                    if phase {
                        "DCE phase by series description".to_string()
                    } else if s.instances.is_none() || s.instances == dce_count {
                        "DCE series by slice count".to_string()
                    } else {
                        return None;
                    }
                }
                Modality::US => "ultrasound images".to_string(),
                Modality::MG => "mammography views".to_string(),
            };
            Some(Chosen {
                series: s.clone(),
                modality: m,
                why,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> CaseScope {
        CaseScope {
            patient: Patient {
                id: "SYN0001".into(),
                issuer: "HER2MAP-SYNTH".into(),
            },
            key_mode: PatientKeyMode::IdIssuer,
            oldest: "20240301".into(),
            newest: "20240301".into(),
            window_days: 60,
        }
    }

    fn study(id: &str, issuer: &str, date: &str) -> Keys {
        let mut k = Keys::default();
        k.set(tags::PATIENT_ID, id);
        k.set(tags::ISSUER_OF_PATIENT_ID, issuer);
        k.set(tags::STUDY_INSTANCE_UID, "1.2.3");
        k.set(tags::STUDY_DATE, date);
        k.set(tags::MODALITIES_IN_STUDY, "MR");
        k
    }

    #[test]
    fn another_patient_or_issuer_or_date_is_refused() {
        let s = scope();
        assert!(validate_study(&study("SYN0001", "HER2MAP-SYNTH", "20240302"), &s).is_ok());
        for (k, why) in [
            (study("SYN0001X", "HER2MAP-SYNTH", "20240302"), "Patient ID"),
            (study("SYN000*", "HER2MAP-SYNTH", "20240302"), "Patient ID"),
            (study("SYN0001", "OTHER", "20240302"), "Issuer"),
            (study("SYN0001", "HER2MAP-SYNTH", "20250302"), "window"),
        ] {
            let e = validate_study(&k, &s).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        let mut id_only = scope();
        id_only.key_mode = PatientKeyMode::Id;
        assert!(validate_study(&study("SYN0001", "OTHER", "20240302"), &id_only).is_ok());
    }

    #[test]
    fn date_range_spans_the_window() {
        assert_eq!(
            study_date_range("20240301", "20240310", 5),
            "20240305-20240306"
        );
        assert_eq!(study_date_range("", "", 5), "");
    }

    #[test]
    fn only_dce_series_of_missing_modalities_are_chosen() {
        let series = |uid: &str, modality: &str, desc: &str, n: i64| SeriesMatch {
            study_uid: "1".into(),
            series_uid: uid.into(),
            modality: modality.into(),
            description: desc.into(),
            instances: Some(n),
        };
        let all = vec![
            series("loc", "MR", "3-plane localizer", 3),
            series("t2", "MR", "T2 TSE", 40),
            series("p0", "MR", "DCE pre", 24),
            series("p1", "MR", "DCE dynamic", 24),
            series("p2", "MR", "DCE dynamic", 24),
            series("us", "US", "", 5),
            series("sr", "SR", "HER2 MAP report", 1),
            series("mg", "MG", "", 4),
        ];
        let pre = vec![Regex::new(r"(?i)\bpre\b").unwrap()];
        let held: BTreeSet<String> = ["p2".to_string()].into();
        let chosen = choose_series(&all, &[Modality::MR, Modality::US], &held, &pre, &[]);
        let uids: Vec<&str> = chosen
            .iter()
            .map(|c| c.series.series_uid.as_str())
            .collect();
        assert_eq!(uids, ["p0", "p1", "us"]);
    }
}
