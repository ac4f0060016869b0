//! A DICOMweb source (PS3.18): QIDO-RS at study then series level, then
//! WADO-RS of each chosen series; every retrieved Part 10 instance goes
//! through ingest like a C-STORE (durable, indexed, deduplicated), after a
//! check that it is the case's patient's.

use std::net::SocketAddr;

use super::select::{self, Keys};
use super::{Fetcher, Outcome, Source, Want};
use crate::db::fetch_event;
use crate::dicomweb::client::DicomWebClient;
use crate::dimse::command::status;
use crate::dimse::server::{AssociationInfo, InstanceSink, StoreRequest, StoreService};
use crate::part10::Part10Header;

/// The AE title recorded for instances from this source (the meta group's
/// Source AE: at most 16 characters of the default repertoire).
fn source_ae(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_ascii_graphic() && *c != '\\')
        .take(16)
        .collect()
}

pub(super) async fn attempt(f: &Fetcher, source: &Source, want: &Want) -> Outcome {
    let Some(endpoint) = &source.settings.dicomweb else {
        return Outcome::failed("not a DICOMweb source");
    };
    let client = match DicomWebClient::new(endpoint) {
        Ok(c) => c,
        Err(e) => return Outcome::failed(e.to_string()),
    };
    // Study level: the patient's identifiers and the case window as
    // matching keys; Modalities in Study is returned and checked here
    // (multi-valued matching differs between servers).
    let range = select::study_date_range(
        &want.scope.oldest,
        &want.scope.newest,
        want.scope.window_days,
    );
    let mut params = vec![
        ("PatientID", want.scope.patient.id.as_str()),
        ("includefield", "00100020"),
        ("includefield", "00100021"),
        ("includefield", "00080020"),
        ("includefield", "00080061"),
        ("includefield", "0020000D"),
    ];
    if !want.scope.patient.issuer.is_empty() {
        params.push(("IssuerOfPatientID", want.scope.patient.issuer.as_str()));
    }
    if !range.is_empty() {
        params.push(("StudyDate", range.as_str()));
    }
    let found = match client.search("studies", &params).await {
        Ok(m) => m,
        Err(e) => {
            f.audit(
                want,
                fetch_event::FETCH_QUERY,
                serde_json::json!({
                    "source": source.name, "method": "QIDO-RS", "level": "STUDY",
                    "status": "failed", "reason": e.to_string(),
                }),
            )
            .await;
            return Outcome::failed(e.to_string());
        }
    };
    let found = &found[..found.len().min(f.settings.max_matches)];
    let mut studies = Vec::new();
    let mut rejected = Vec::new();
    for m in found {
        match select::validate_study(&Keys::from_json(m), &want.scope) {
            Ok(st) if select::study_may_help(&st, &want.missing) => studies.push(st),
            Ok(_) => {}
            Err(why) => rejected.push(why),
        }
    }
    let matches = found.len() as i64;
    f.audit(
        want,
        fetch_event::FETCH_QUERY,
        serde_json::json!({
            "source": source.name, "method": "QIDO-RS", "level": "STUDY", "status": "200",
            "matches": matches, "accepted": studies.len(), "rejected": rejected,
        }),
    )
    .await;

    let mut series = Vec::new();
    for st in &studies {
        let path = format!("studies/{}/series", st.study_uid);
        let params = [
            ("includefield", "0020000E"),
            ("includefield", "00080060"),
            ("includefield", "0008103E"),
            ("includefield", "00201209"),
        ];
        let found = match client.search(&path, &params).await {
            Ok(m) => m,
            Err(e) => {
                f.audit(
                    want,
                    fetch_event::FETCH_QUERY,
                    serde_json::json!({
                        "source": source.name, "method": "QIDO-RS", "level": "SERIES",
                        "study_instance_uid": st.study_uid, "status": "failed",
                        "reason": e.to_string(),
                    }),
                )
                .await;
                return Outcome {
                    matches,
                    ..Outcome::failed(e.to_string())
                };
            }
        };
        let (accepted, rejected) = select::accept_series(
            found.iter().map(Keys::from_json),
            &st.study_uid,
            &want.scope.patient,
            &mut series,
        );
        f.audit(
            want,
            fetch_event::FETCH_QUERY,
            serde_json::json!({
                "source": source.name, "method": "QIDO-RS", "level": "SERIES",
                "study_instance_uid": st.study_uid, "status": "200",
                "matches": found.len(), "accepted": accepted, "rejected": rejected,
            }),
        )
        .await;
    }
    let chosen = select::choose_series(
        &series,
        &want.missing,
        &want.held_series,
        &f.pre_patterns,
        &f.post_patterns,
    );
    if chosen.is_empty() {
        return Outcome::nothing(matches, studies.len(), series.len());
    }

    let info = AssociationInfo {
        id: format!("wado-{:016x}", rand::random::<u64>()),
        calling_ae: source_ae(&source.name),
        called_ae: f.node_ae.clone(),
        peer: SocketAddr::from(([0, 0, 0, 0], 0)),
    };
    let mut received = 0i64;
    let mut problems = Vec::new();
    for c in &chosen {
        let s = &c.series;
        let before =
            f.db.series_instance_count(std::slice::from_ref(&s.series_uid))
                .await
                .unwrap_or(0);
        let detail = match client.retrieve_series(&s.study_uid, &s.series_uid).await {
            Ok(parts) => {
                let (mut stored, mut refused) = (0u64, Vec::new());
                for part in &parts {
                    match store(f, want, &info, part).await {
                        Ok(()) => stored += 1,
                        Err(why) => refused.push(why),
                    }
                }
                let after =
                    f.db.series_instance_count(std::slice::from_ref(&s.series_uid))
                        .await
                        .unwrap_or(before);
                let got = (after - before).max(0);
                received += got;
                if !refused.is_empty() {
                    problems.push(format!(
                        "{}: {} refused",
                        c.modality.as_str(),
                        refused.len()
                    ));
                }
                refused.truncate(10);
                serde_json::json!({
                    "source": source.name, "method": "WADO-RS",
                    "series_instance_uid": s.series_uid, "modality": c.modality.as_str(),
                    "why": c.why, "status": "200",
                    "result": if refused.is_empty() { "success" } else { "partial" },
                    "instances_in_response": parts.len(), "stored": stored,
                    "refused": refused, "instances_received": got,
                })
            }
            Err(e) => {
                problems.push(format!("{}: {e}", c.modality.as_str()));
                serde_json::json!({
                    "source": source.name, "method": "WADO-RS",
                    "series_instance_uid": s.series_uid, "modality": c.modality.as_str(),
                    "status": e.status().map(|s| s.to_string()).unwrap_or_else(|| "failed".into()),
                    "result": "failed", "reason": e.to_string(), "instances_received": 0,
                })
            }
        };
        f.audit(want, fetch_event::FETCH_RETRIEVE, detail).await;
    }
    Outcome::retrieved(matches, chosen.len(), received, &problems)
}

/// One retrieved Part 10 instance into ingest, if it is the case's
/// patient's.
async fn store(
    f: &Fetcher,
    want: &Want,
    info: &AssociationInfo,
    bytes: &[u8],
) -> Result<(), String> {
    let meta = Part10Header::from_bytes(bytes).map_err(|e| format!("not Part 10: {e}"))?;
    let header = crate::ingest::parse_header_bytes(bytes)
        .map_err(|e| format!("data set does not parse: {e}"))?;
    let key = match want.scope.key_mode {
        crate::cases::PatientKeyMode::IdIssuer => &header.patient_key,
        crate::cases::PatientKeyMode::Id => &header.patient_id_key,
    };
    if *key != want.patient_key {
        return Err("another patient's instance".into());
    }
    let request = StoreRequest {
        message_id: 1,
        sop_class_uid: header.sop_class_uid.clone(),
        sop_instance_uid: header.sop_instance_uid.clone(),
        transfer_syntax: meta.transfer_syntax.trim_end_matches('\0').to_string(),
    };
    let mut sink = f
        .ingest
        .begin(info, &request)
        .await
        .map_err(|s| s.comment.unwrap_or_default())?;
    let start = usize::try_from(meta.dataset_offset)
        .unwrap_or(bytes.len())
        .min(bytes.len());
    if let Err(s) = sink.write(bytes[start..].to_vec()).await {
        sink.abort().await;
        return Err(s.comment.unwrap_or_default());
    }
    let s = sink.finish().await;
    if s.code != status::SUCCESS {
        return Err(format!("{:#06X} {}", s.code, s.comment.unwrap_or_default()));
    }
    Ok(())
}
