//! The batch's view of a folder tree: every file's header (patient, study
//! date, accession, instance), and the instances grouped into patients and
//! cases by the node's own rules — the patient key of `[cases] patient_key`
//! ([`crate::ingest::patient_key`]) and the study-date window of
//! `[cases] window_days` (the assembler's `widen`). Reads headers only
//! (up to Pixel Data); imaging reads the pixels later.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::cases::PatientKeyMode;
use crate::cases::assembler::widen;
use crate::ingest::patient_key;

/// What grouping needs of one file.
#[derive(Debug, Clone)]
pub struct FileHeader {
    pub path: PathBuf,
    pub size: u64,
    pub patient_id: String,
    pub patient_key: String,
    pub patient_id_key: String,
    pub accession_number: String,
    pub study_date: String,
    pub study_instance_uid: String,
    pub sop_instance_uid: String,
}

/// One case as the batch runs it: a patient's instances within one
/// study-date window.
#[derive(Debug, Clone)]
pub struct BatchCase {
    /// Stable across runs: the patient key and the case's oldest study date.
    pub case_id: String,
    pub patient_key: String,
    pub patient_id: String,
    pub accession_numbers: Vec<String>,
    pub study_dates: (String, String),
    pub files: Vec<PathBuf>,
    /// SHA-256 over the sorted (SOP Instance UID, file size) of the members.
    pub files_digest: String,
}

/// A file that is not a readable DICOM instance (it joins no case).
#[derive(Debug, Clone)]
pub struct Unreadable {
    pub path: PathBuf,
    pub reason: String,
}

fn read_header(path: &Path) -> Result<FileHeader, String> {
    let size = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    let obj: DefaultDicomObject = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Auto)
        .read_until(tags::PIXEL_DATA)
        .open_file(path)
        .map_err(|e| e.to_string())?;
    let text = |tag| -> String {
        obj.get(tag)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches('\0').trim().to_string())
            .unwrap_or_default()
    };
    let (id, issuer) = (text(tags::PATIENT_ID), text(tags::ISSUER_OF_PATIENT_ID));
    let sop_instance_uid = text(tags::SOP_INSTANCE_UID);
    if sop_instance_uid.is_empty() {
        return Err("no SOP Instance UID".into());
    }
    Ok(FileHeader {
        path: path.to_path_buf(),
        size,
        patient_key: patient_key(&id, &issuer),
        patient_id_key: patient_key(&id, ""),
        patient_id: id,
        accession_number: text(tags::ACCESSION_NUMBER),
        study_date: text(tags::STUDY_DATE),
        study_instance_uid: text(tags::STUDY_INSTANCE_UID),
        sop_instance_uid,
    })
}

/// Read every file's header (in parallel) and group the instances into
/// cases. Instances are taken in study-date order, so the windows do not
/// depend on the folder layout; within a patient, an instance joins the
/// first case whose window it fits (as the assembler does), else opens one.
pub fn scan(
    inputs: &[PathBuf],
    key: PatientKeyMode,
    window_days: i64,
) -> (Vec<BatchCase>, Vec<Unreadable>) {
    let files = crate::send::collect_files(inputs);
    let read: Vec<Result<FileHeader, Unreadable>> = files
        .par_iter()
        .map(|p| {
            read_header(p).map_err(|reason| Unreadable {
                path: p.clone(),
                reason,
            })
        })
        .collect();
    let mut headers = Vec::with_capacity(read.len());
    let mut unreadable = Vec::new();
    for r in read {
        match r {
            Ok(h) => headers.push(h),
            Err(u) => unreadable.push(u),
        }
    }
    (group(headers, key, window_days), unreadable)
}

/// Group headers into cases (see [`scan`]); a SOP Instance UID seen twice
/// counts once (the first file in path order), as the spool keeps one.
pub fn group(
    mut headers: Vec<FileHeader>,
    key: PatientKeyMode,
    window_days: i64,
) -> Vec<BatchCase> {
    headers.sort_by(|a, b| (&a.study_date, &a.path).cmp(&(&b.study_date, &b.path)));
    let mut seen = std::collections::HashSet::new();
    headers.retain(|h| seen.insert(h.sop_instance_uid.clone()));
    // Per patient key: its cases as (oldest, newest, members).
    let mut patients: BTreeMap<String, Vec<(String, String, Vec<FileHeader>)>> = BTreeMap::new();
    for h in headers {
        let k = match key {
            PatientKeyMode::IdIssuer => h.patient_key.clone(),
            PatientKeyMode::Id => h.patient_id_key.clone(),
        };
        let cases = patients.entry(k).or_default();
        let fit = cases
            .iter_mut()
            .find_map(|c| widen(&c.0, &c.1, &h.study_date, window_days).map(|range| (c, range)));
        match fit {
            Some((case, (lo, hi))) => {
                case.0 = lo;
                case.1 = hi;
                case.2.push(h);
            }
            None => cases.push((h.study_date.clone(), h.study_date.clone(), vec![h])),
        }
    }
    let mut out = Vec::new();
    for (k, cases) in patients {
        for (lo, hi, members) in cases {
            out.push(case_of(&k, lo, hi, members));
        }
    }
    out
}

fn case_of(key: &str, lo: String, hi: String, mut members: Vec<FileHeader>) -> BatchCase {
    members.sort_by(|a, b| a.path.cmp(&b.path));
    let id = Sha256::digest(format!("{key}\n{lo}").as_bytes());
    let mut uids: Vec<(&str, u64)> = members
        .iter()
        .map(|m| (m.sop_instance_uid.as_str(), m.size))
        .collect();
    uids.sort_unstable();
    let mut h = Sha256::new();
    for (uid, size) in uids {
        h.update(format!("{uid}\t{size}\n").as_bytes());
    }
    let mut accessions: Vec<String> = members
        .iter()
        .map(|m| m.accession_number.clone())
        .filter(|a| !a.is_empty())
        .collect();
    accessions.sort();
    accessions.dedup();
    BatchCase {
        case_id: hex::encode(&id[..8]),
        patient_key: key.to_string(),
        patient_id: members
            .first()
            .map(|m| m.patient_id.clone())
            .unwrap_or_default(),
        accession_numbers: accessions,
        study_dates: (lo, hi),
        files: members.iter().map(|m| m.path.clone()).collect(),
        files_digest: hex::encode(h.finalize()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(path: &str, id: &str, date: &str, uid: &str) -> FileHeader {
        FileHeader {
            path: path.into(),
            size: 10,
            patient_id: id.into(),
            patient_key: patient_key(id, "ISS"),
            patient_id_key: patient_key(id, ""),
            accession_number: format!("A{date}"),
            study_date: date.into(),
            study_instance_uid: format!("1.{date}"),
            sop_instance_uid: uid.into(),
        }
    }

    #[test]
    fn patients_and_study_date_windows_make_the_cases() {
        let headers = vec![
            h("b/2", "P1", "20240110", "1.2"),
            h("a/1", "P1", "20240101", "1.1"),
            h("c/3", "P1", "20240601", "1.3"),
            h("d/4", "P2", "20240101", "1.4"),
            h("d/4-copy", "P2", "20240101", "1.4"),
        ];
        let cases = group(headers, PatientKeyMode::IdIssuer, 30);
        assert_eq!(cases.len(), 3);
        let p1: Vec<&BatchCase> = cases.iter().filter(|c| c.patient_id == "P1").collect();
        assert_eq!(p1.len(), 2);
        let first = p1.iter().find(|c| c.study_dates.0 == "20240101").unwrap();
        assert_eq!(first.files.len(), 2);
        assert_eq!(first.study_dates.1, "20240110");
        assert_eq!(first.accession_numbers, ["A20240101", "A20240110"]);
        let p2 = cases.iter().find(|c| c.patient_id == "P2").unwrap();
        assert_eq!(
            p2.files.len(),
            1,
            "a duplicate SOP Instance UID counts once"
        );
        // The case id depends on the patient and the window's start only.
        let again = group(
            vec![
                h("x", "P2", "20240101", "1.9"),
                h("y", "P2", "20240102", "1.8"),
            ],
            PatientKeyMode::IdIssuer,
            30,
        );
        assert_eq!(again[0].case_id, p2.case_id);
        assert_ne!(again[0].files_digest, p2.files_digest);
    }
}
