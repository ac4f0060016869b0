//! A DIMSE source: C-FIND at study then series level (Study Root, PS3.4
//! C.6.2), then C-MOVE to the node's own AE title or C-GET on the same
//! association (storage SCP role negotiated for the image SOP classes the
//! node reads), one series per request, each an audit event.

use std::net::SocketAddr;

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use super::select::{self, Chosen, Keys};
use super::{Fetcher, Outcome, Source, Want};
use crate::config::RetrieveMethod;
use crate::db::fetch_event;
use crate::dimse::client::{ClientError, ClientOptions, RetrieveOutcome, ScuAssociation};
use crate::dimse::server::{AssociationInfo, AssociationStats, StoreService};
use crate::dimse::sop;
use crate::header::{Kind, classify};

/// Transfer syntaxes proposed for the storage sub-operations of a C-GET:
/// three contexts per SOP class, so that an SCP can send what it holds
/// without transcoding it to something lossy (PS3.5 Section 10).
const GET_SYNTAXES: [&[&str]; 3] = [
    &[
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1.99",
    ],
    &[
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.5",
    ],
    &[
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.91",
    ],
];

/// The image storage SOP classes the model reads (MG, US, MR): what a
/// C-GET may bring back.
fn image_classes() -> Vec<String> {
    sop::STORAGE_SOP_CLASSES
        .iter()
        .filter(|(uid, _)| matches!(classify(uid, ""), Kind::Image(_)))
        .map(|(uid, _)| uid.to_string())
        .collect()
}

fn el(tag: Tag, vr: VR, value: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::from(value))
}

fn empty(tag: Tag, vr: VR) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::Empty)
}

/// Study-level keys (PS3.4 C.6.2.1.2): the patient's identifiers as
/// single-value matches, the case window as a date range, and the
/// modalities the case lacks; the rest are return keys.
fn study_keys(want: &Want, with_modalities: bool) -> InMemDicomObject {
    let range = select::study_date_range(
        &want.scope.oldest,
        &want.scope.newest,
        want.scope.window_days,
    );
    let mut keys = vec![
        el(tags::QUERY_RETRIEVE_LEVEL, VR::CS, "STUDY"),
        el(tags::PATIENT_ID, VR::LO, &want.scope.patient.id),
        el(
            tags::ISSUER_OF_PATIENT_ID,
            VR::LO,
            &want.scope.patient.issuer,
        ),
        el(tags::STUDY_DATE, VR::DA, &range),
        empty(tags::STUDY_INSTANCE_UID, VR::UI),
    ];
    if with_modalities {
        let m: Vec<&str> = want.missing.iter().map(|m| m.as_str()).collect();
        keys.push(el(tags::MODALITIES_IN_STUDY, VR::CS, &m.join("\\")));
    } else {
        keys.push(empty(tags::MODALITIES_IN_STUDY, VR::CS));
    }
    InMemDicomObject::from_element_iter(keys)
}

fn series_keys(study_uid: &str) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        el(tags::QUERY_RETRIEVE_LEVEL, VR::CS, "SERIES"),
        el(tags::STUDY_INSTANCE_UID, VR::UI, study_uid),
        empty(tags::SERIES_INSTANCE_UID, VR::UI),
        empty(tags::MODALITY, VR::CS),
        empty(tags::SERIES_DESCRIPTION, VR::LO),
        empty(tags::SERIES_NUMBER, VR::IS),
        empty(tags::NUMBER_OF_SERIES_RELATED_INSTANCES, VR::IS),
    ])
}

fn retrieve_keys(series: &select::SeriesMatch) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        el(tags::QUERY_RETRIEVE_LEVEL, VR::CS, "SERIES"),
        el(tags::STUDY_INSTANCE_UID, VR::UI, &series.study_uid),
        el(tags::SERIES_INSTANCE_UID, VR::UI, &series.series_uid),
    ])
}

/// One DIMSE source's attempt for the case.
pub(super) async fn attempt(f: &Fetcher, source: &Source, want: &Want) -> Outcome {
    let s = &source.settings;
    let options = ClientOptions {
        calling_ae: f.node_ae.clone(),
        called_ae: s.ae_title.trim().to_string(),
        max_pdu: 65536,
        timeout: source.timeout,
        tls: source.tls.clone(),
    };
    let qr = vec![
        sop::EXPLICIT_VR_LE.to_string(),
        sop::IMPLICIT_VR_LE.to_string(),
    ];
    let mut contexts = vec![(sop::STUDY_ROOT_FIND.to_string(), qr.clone())];
    let mut roles = Vec::new();
    match s.retrieve {
        RetrieveMethod::Move => contexts.push((sop::STUDY_ROOT_MOVE.to_string(), qr)),
        RetrieveMethod::Get => {
            contexts.push((sop::STUDY_ROOT_GET.to_string(), qr));
            for class in image_classes() {
                for syntaxes in GET_SYNTAXES {
                    contexts.push((
                        class.clone(),
                        syntaxes.iter().map(|t| t.to_string()).collect(),
                    ));
                }
                roles.push(class);
            }
        }
    }
    let addr = format!("{}:{}", s.host, s.port);
    let mut assoc = match ScuAssociation::connect_with(&addr, &options, &contexts, &roles).await {
        Ok(a) => a,
        Err(e) => {
            f.audit(
                want,
                fetch_event::FETCH_QUERY,
                serde_json::json!({
                    "source": source.name, "level": "STUDY", "status": "failed",
                    "reason": e.to_string(),
                }),
            )
            .await;
            return Outcome::failed(format!("association: {e}"));
        }
    };
    let result = run(f, source, want, &mut assoc).await;
    match &result {
        Err(ClientError::Timeout(_)) | Err(ClientError::Protocol(_)) => assoc.abort().await,
        _ => assoc.release().await,
    }
    match result {
        Ok(o) => o,
        Err(e) => Outcome::failed(e.to_string()),
    }
}

async fn run(
    f: &Fetcher,
    source: &Source,
    want: &Want,
    assoc: &mut ScuAssociation,
) -> Result<Outcome, ClientError> {
    let max = f.settings.max_matches;
    // Study level; a PACS that does not match on Modalities in Study (it
    // returns nothing) is asked again without it, and the series level
    // decides.
    let mut find = assoc
        .find(sop::STUDY_ROOT_FIND, &study_keys(want, true), max)
        .await?;
    let mut with_modalities = true;
    if find.completed() && find.matches.is_empty() {
        find = assoc
            .find(sop::STUDY_ROOT_FIND, &study_keys(want, false), max)
            .await?;
        with_modalities = false;
    }
    let mut studies = Vec::new();
    let mut rejected = Vec::new();
    for m in &find.matches {
        match select::validate_study(&Keys::from_dicom(m), &want.scope) {
            Ok(st) if select::study_may_help(&st, &want.missing) => studies.push(st),
            Ok(_) => {}
            Err(why) => rejected.push(why),
        }
    }
    let matches = find.matches.len() as i64;
    f.audit(
        want,
        fetch_event::FETCH_QUERY,
        serde_json::json!({
            "source": source.name, "level": "STUDY",
            "status": format!("{:#06X}", find.status.code),
            "modalities_in_study_key": with_modalities,
            "matches": matches, "accepted": studies.len(), "rejected": rejected,
            "truncated": find.truncated,
        }),
    )
    .await;
    if !find.completed() {
        return Ok(Outcome {
            status: "failed",
            matches,
            reason: format!(
                "C-FIND status {:#06X} {}",
                find.status.code,
                find.status.comment.unwrap_or_default()
            ),
            ..Default::default()
        });
    }

    // Series level, study by study.
    let mut series = Vec::new();
    for st in &studies {
        let find = assoc
            .find(sop::STUDY_ROOT_FIND, &series_keys(&st.study_uid), max)
            .await?;
        let (accepted, rejected) = select::accept_series(
            find.matches.iter().map(Keys::from_dicom),
            &st.study_uid,
            &want.scope.patient,
            &mut series,
        );
        f.audit(
            want,
            fetch_event::FETCH_QUERY,
            serde_json::json!({
                "source": source.name, "level": "SERIES", "study_instance_uid": st.study_uid,
                "status": format!("{:#06X}", find.status.code),
                "matches": find.matches.len(), "accepted": accepted, "rejected": rejected,
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
        return Ok(Outcome::nothing(matches, studies.len(), series.len()));
    }

    // Retrieve, one series per request.
    let peer = assoc
        .peer_addr()
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut received = 0i64;
    let mut partial = Vec::new();
    for c in &chosen {
        let before =
            f.db.series_instance_count(std::slice::from_ref(&c.series.series_uid))
                .await
                .unwrap_or(0);
        let (method, result) = retrieve(f, source, assoc, c, peer).await;
        let after =
            f.db.series_instance_count(std::slice::from_ref(&c.series.series_uid))
                .await
                .unwrap_or(before);
        let got = (after - before).max(0);
        received += got;
        let detail = match &result {
            Ok(o) => serde_json::json!({
                "source": source.name, "method": method,
                "series_instance_uid": c.series.series_uid, "modality": c.modality.as_str(),
                "why": c.why, "status": format!("{:#06X}", o.status.code),
                "result": format!("{:?}", o.result()).to_lowercase(),
                "comment": o.status.comment,
                "completed": o.completed, "failed": o.failed, "warning": o.warning,
                "failed_instances": o.failed_instances.len(),
                "instances_received": got,
            }),
            Err(e) => serde_json::json!({
                "source": source.name, "method": method,
                "series_instance_uid": c.series.series_uid, "modality": c.modality.as_str(),
                "status": "failed", "reason": e.to_string(), "instances_received": got,
            }),
        };
        f.audit(want, fetch_event::FETCH_RETRIEVE, detail).await;
        match result {
            Ok(o) if o.result() == crate::dimse::client::RetrieveResult::Success => {}
            Ok(o) => partial.push(format!(
                "{} {:#06X} ({} failed, {} warning)",
                c.modality.as_str(),
                o.status.code,
                o.failed,
                o.warning
            )),
            // The association is gone: the other series cannot follow.
            Err(e) => {
                return Ok(Outcome {
                    status: if received > 0 { "partial" } else { "failed" },
                    matches,
                    series_requested: chosen.len() as i64,
                    instances_received: received,
                    reason: e.to_string(),
                });
            }
        }
    }
    Ok(Outcome::retrieved(
        matches,
        chosen.len(),
        received,
        &partial,
    ))
}

async fn retrieve(
    f: &Fetcher,
    source: &Source,
    assoc: &mut ScuAssociation,
    c: &Chosen,
    peer: SocketAddr,
) -> (&'static str, Result<RetrieveOutcome, ClientError>) {
    let keys = retrieve_keys(&c.series);
    match source.settings.retrieve {
        RetrieveMethod::Move => (
            "C-MOVE",
            assoc
                .move_to(sop::STUDY_ROOT_MOVE, &f.move_destination, &keys)
                .await,
        ),
        RetrieveMethod::Get => {
            // The instances come in on this association: the records of
            // ingest name it like an association the source opened.
            let info = AssociationInfo {
                id: format!("get-{:016x}", rand::random::<u64>()),
                calling_ae: source.settings.ae_title.trim().to_string(),
                called_ae: f.node_ae.clone(),
                peer,
            };
            f.ingest.association_opened(&info).await;
            let result = assoc
                .get(sop::STUDY_ROOT_GET, &keys, &f.ingest, &info)
                .await;
            let stats = AssociationStats {
                stored: result.as_ref().map(|o| o.received).unwrap_or(0),
                failed: result.as_ref().map(|o| o.received_failed).unwrap_or(0),
                bytes: 0,
            };
            let outcome = match &result {
                Ok(_) => "released",
                Err(_) => "aborted",
            };
            f.ingest.association_closed(&info, outcome, &stats).await;
            ("C-GET", result)
        }
    }
}
