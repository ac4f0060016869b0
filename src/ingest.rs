//! The C-STORE handler: validate → spool → database → audit. It turns every
//! failure into the right DIMSE status (PS3.4 B.2.3) and answers Success only
//! once the file is fsync'd in place and its row committed.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tracing::{debug, error, warn};

use crate::clock::Clock;
use crate::db::{Db, Inserted, InstanceQueue, InstanceRow, NewEvent, event};
use crate::dimse::command::{status, trim_uid};
use crate::dimse::server::{
    AssociationInfo, AssociationStats, DimseStatus, InstanceSink, StoreRequest, StoreService,
};
use crate::header;
use crate::metrics::METRICS;
use crate::part10;
use crate::spool::{Placement, SealedInstance, Spool, TempInstance};

/// The ingest service shared by every association (cheap to clone).
#[derive(Clone)]
pub struct Ingest(Arc<IngestCore>);

impl std::ops::Deref for Ingest {
    type Target = IngestCore;
    fn deref(&self) -> &IngestCore {
        &self.0
    }
}

pub struct IngestCore {
    spool: Spool,
    db: Db,
    instances: InstanceQueue,
    /// Stamps associations and audit events.
    clock: Clock,
    /// Woken after each stored instance (case assembly listens here).
    stored: Arc<Notify>,
}

impl Ingest {
    pub fn new(spool: Spool, db: Db, instances: InstanceQueue, clock: Clock) -> Self {
        Ingest(Arc::new(IngestCore {
            spool,
            db,
            instances,
            clock,
            stored: Arc::new(Notify::new()),
        }))
    }
}

impl IngestCore {
    pub fn stored_notify(&self) -> Arc<Notify> {
        self.stored.clone()
    }

    async fn audit(&self, e: NewEvent<'_>) {
        if let Err(err) = self.db.record(e, self.clock.now()).await {
            // The audit log itself failing must not take the node down.
            error!(error = %err, "audit event could not be recorded");
        }
    }

    async fn fail(
        &self,
        info: &AssociationInfo,
        request: &StoreRequest,
        status: DimseStatus,
    ) -> DimseStatus {
        warn!(
            association = %info.id,
            status = format_args!("{:#06X}", status.code),
            reason = status.comment.as_deref().unwrap_or(""),
            "instance refused"
        );
        // The data set may not have been read: the modality by SOP Class.
        let modality = crate::header::image_modality_of_class(&request.sop_class_uid);
        METRICS.instance("failed", status.code, modality.map_or("", |m| m.as_str()));
        self.audit(NewEvent {
            event: event::INSTANCE_FAILED,
            association_id: Some(&info.id),
            sop_instance_uid: Some(&request.sop_instance_uid),
            status: Some(status.code),
            detail: Some(serde_json::json!({
                "reason": status.comment,
                "sop_class_uid": request.sop_class_uid,
                "transfer_syntax": request.transfer_syntax,
            })),
            ..Default::default()
        })
        .await;
        status
    }
}

/// A salted-free, truncated SHA-256 of Issuer + Patient ID: stable across
/// studies, and what logs and events show instead of the identity.
pub fn patient_key(patient_id: &str, issuer: &str) -> String {
    let digest = Sha256::digest(format!("{}\\{}", issuer.trim(), patient_id.trim()).as_bytes());
    hex::encode(&digest[..12])
}

/// The attributes the index needs, read from the data set header.
#[derive(Debug, Clone)]
pub struct Header {
    pub patient_id_key: String,
    pub laterality: String,
    pub view: String,
    pub series_description: String,
    pub image_type: String,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub patient_key: String,
    pub modality: String,
    pub study_date: String,
    /// An ultrasound image that is Doppler / colour flow.
    pub us_doppler: bool,
}

/// Sequences nested deeper than this are refused (0xC000): the parser
/// builds nested items recursively, and a few thousand levels (a few tens of
/// kilobytes of hostile input) overflow a thread's stack and kill the node.
/// Real data sets (SR content trees included) stay far below.
pub const MAX_SEQUENCE_DEPTH: usize = 64;

fn read_header(path: PathBuf) -> Result<Header, String> {
    let open = || {
        std::fs::File::open(&path)
            .map(std::io::BufReader::new)
            .map_err(|e| e.to_string())
    };
    let len = std::fs::metadata(&path).map_err(|e| e.to_string())?.len();
    check_structure(open()?, len)?;
    parse_header(open()?)
}

/// The header parse of ingest on the bytes of a whole Part 10 file (preamble,
/// meta group, data set), as the spool holds it: what the sink runs on every
/// received instance, for tests and fuzzing.
pub fn parse_header_bytes(bytes: &[u8]) -> Result<Header, String> {
    check_structure(bytes, bytes.len() as u64)?;
    parse_header(bytes)
}

/// Walk the data set's tokens (a flat, iterative reader) up to Pixel Data
/// and refuse, before the parse that builds the object sees them, nesting
/// beyond [`MAX_SEQUENCE_DEPTH`] and values longer than the file itself
/// (the parser zero-fills a buffer of the declared length before reading:
/// a 4 GB claim in a 1 KB file costs 4 GB of memory and minutes).
fn check_structure<R: std::io::Read>(mut source: R, file_len: u64) -> Result<(), String> {
    use dicom_encoding::transfer_syntax::{Codec, TransferSyntaxIndex};
    use dicom_parser::dataset::{DataSetReader, DataToken};
    use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

    let mut preamble = [0u8; 128];
    source
        .read_exact(&mut preamble)
        .map_err(|e| format!("preamble: {e}"))?;
    let meta =
        dicom_object::meta::FileMetaTable::from_reader(&mut source).map_err(|e| e.to_string())?;
    let ts = TransferSyntaxRegistry
        .get(meta.transfer_syntax())
        .ok_or_else(|| format!("unknown transfer syntax {}", meta.transfer_syntax()))?;
    // Deflate expands at most ~1032:1.
    let max_value_len = if matches!(ts.codec(), Codec::Dataset(Some(_))) {
        file_len.saturating_mul(1032)
    } else {
        file_len
    };
    let source: Box<dyn std::io::Read + '_> = match ts.codec() {
        Codec::Dataset(Some(adapter)) => adapter.adapt_reader(Box::new(source)),
        Codec::Dataset(None) => {
            return Err(format!("transfer syntax {} cannot be read", ts.uid()));
        }
        _ => Box::new(source),
    };
    let reader = DataSetReader::new_with_ts(source, ts).map_err(|e| e.to_string())?;
    let mut depth = 0usize;
    for token in reader {
        match token.map_err(|e| e.to_string())? {
            DataToken::SequenceStart { .. } => {
                depth += 1;
                if depth > MAX_SEQUENCE_DEPTH {
                    return Err(format!(
                        "sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels"
                    ));
                }
            }
            DataToken::SequenceEnd => depth = depth.saturating_sub(1),
            DataToken::ElementHeader(h) if depth == 0 && h.tag == tags::PIXEL_DATA => break,
            DataToken::ElementHeader(h)
                if h.len.get().is_some_and(|l| u64::from(l) > max_value_len) =>
            {
                return Err(format!(
                    "element {} claims {} bytes, more than the data set holds",
                    h.tag, h.len.0
                ));
            }
            DataToken::PixelSequenceStart if depth == 0 => break,
            _ => {}
        }
    }
    Ok(())
}

fn parse_header<R: std::io::Read>(source: R) -> Result<Header, String> {
    // Pixel data is not needed to index; it is decoded (and any error in it
    // reported) when a case uses the instance.
    let obj: DefaultDicomObject = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .read_until(tags::PIXEL_DATA)
        .from_reader(source)
        .map_err(|e| e.to_string())?;
    // `get`, never `element`/`element_opt`: dicom-object reports an absent
    // attribute as an error whose backtrace snafu always captures (a stack
    // unwind per missing tag, per instance).
    let text = |tag| -> String {
        obj.get(tag)
            .and_then(|e| e.to_str().ok())
            .map(|s| trim_uid(s.trim()).to_string())
            .unwrap_or_default()
    };
    Ok(Header {
        patient_id_key: patient_key(&text(tags::PATIENT_ID), ""),
        laterality: header::laterality_term(&obj).unwrap_or_default(),
        view: header::view_term(&obj)
            .map(|(term, _)| term)
            .unwrap_or_default(),
        series_description: text(tags::SERIES_DESCRIPTION),
        image_type: text(tags::IMAGE_TYPE),
        sop_class_uid: text(tags::SOP_CLASS_UID),
        sop_instance_uid: text(tags::SOP_INSTANCE_UID),
        study_instance_uid: text(tags::STUDY_INSTANCE_UID),
        series_instance_uid: text(tags::SERIES_INSTANCE_UID),
        patient_key: patient_key(&text(tags::PATIENT_ID), &text(tags::ISSUER_OF_PATIENT_ID)),
        modality: text(tags::MODALITY),
        study_date: text(tags::STUDY_DATE),
        us_doppler: header::us_doppler_of(&obj),
    })
}

pub struct IngestSink {
    ingest: Ingest,
    info: AssociationInfo,
    request: StoreRequest,
    temp: TempInstance,
    /// When the command arrived: the ingest latency metric.
    started: std::time::Instant,
}

impl StoreService for Ingest {
    type Sink = IngestSink;

    async fn association_opened(&self, info: &AssociationInfo) {
        METRICS.associations_opened.inc(&[]);
        METRICS.associations_active.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self
            .db
            .association_opened(
                &info.id,
                &info.calling_ae,
                &info.called_ae,
                &info.peer.to_string(),
                self.clock.now(),
            )
            .await
        {
            error!(error = %e, "association could not be recorded");
        }
    }

    async fn association_rejected(
        &self,
        peer: std::net::SocketAddr,
        calling_ae: &str,
        called_ae: &str,
        reason: &str,
    ) {
        METRICS
            .associations_rejected
            .inc(&[&crate::metrics::reason_label(reason)]);
        let id = crate::dimse::server::new_association_id();
        let peer = peer.to_string();
        let now = self.clock.now();
        if let Err(e) = self
            .db
            .association_rejected(&id, calling_ae, called_ae, &peer, reason, now)
            .await
        {
            error!(error = %e, "rejected association could not be recorded");
        }
    }

    async fn association_closed(
        &self,
        info: &AssociationInfo,
        outcome: &str,
        stats: &AssociationStats,
    ) {
        METRICS.associations_active.fetch_sub(1, Ordering::Relaxed);
        if let Err(e) = self
            .db
            .association_closed(
                &info.id,
                outcome,
                stats.stored,
                stats.failed,
                stats.bytes,
                self.clock.now(),
            )
            .await
        {
            error!(error = %e, "association close could not be recorded");
        }
    }

    async fn begin(
        &self,
        info: &AssociationInfo,
        request: &StoreRequest,
    ) -> Result<IngestSink, DimseStatus> {
        // The file meta group repeats these UIDs, and a meta group with
        // other characters than digits, dots and padding cannot be read
        // back (by the node or anyone): refuse before receiving.
        for (name, uid) in [
            ("SOP Class", &request.sop_class_uid),
            ("SOP Instance", &request.sop_instance_uid),
        ] {
            if !uid
                .chars()
                .all(|c| c == '.' || c.is_ascii_digit() || c == '\0' || c == ' ')
            {
                let s = DimseStatus::failure(
                    status::CANNOT_UNDERSTAND,
                    format!("Affected {name} UID is not a UID"),
                );
                return Err(self.fail(info, request, s).await);
            }
        }
        let header = part10::encode_header(
            &request.sop_class_uid,
            &request.sop_instance_uid,
            &request.transfer_syntax,
            &info.calling_ae,
        )
        .map_err(|e| DimseStatus::failure(status::CANNOT_UNDERSTAND, e.to_string()));
        let header = match header {
            Ok(h) => h,
            Err(s) => return Err(self.fail(info, request, s).await),
        };
        if let Err(e) = self.spool.check_space() {
            let s = DimseStatus::failure(status::OUT_OF_RESOURCES, format!("spool: {e}"));
            return Err(self.fail(info, request, s).await);
        }
        Ok(IngestSink {
            ingest: self.clone(),
            info: info.clone(),
            request: request.clone(),
            temp: self.spool.create_temp(header),
            started: std::time::Instant::now(),
        })
    }
}

impl InstanceSink for IngestSink {
    async fn write(&mut self, bytes: Vec<u8>) -> Result<(), DimseStatus> {
        METRICS
            .received_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        self.temp.write(bytes).await.map_err(|e| {
            DimseStatus::failure(status::OUT_OF_RESOURCES, format!("spool write: {e}"))
        })
    }

    async fn finish(self) -> DimseStatus {
        let IngestSink {
            ingest,
            info,
            request,
            temp,
            started,
        } = self;
        let status = commit(&ingest, &info, &request, temp).await;
        METRICS.ingest_seconds.observe(&[], started.elapsed());
        if status.code != status::SUCCESS {
            return ingest.fail(&info, &request, status).await;
        }
        status
    }

    async fn abort(self) {
        debug!(association = %self.info.id, "partial instance discarded");
        self.temp.discard().await;
    }
}

/// A received instance, fsync'd, parsed and linked into place.
struct Placed {
    sealed: SealedInstance,
    header: Header,
    relative: PathBuf,
    placement: Placement,
}

/// The file half of the commit, in one call on the blocking pool (one
/// hand-off per instance, not one per step): write what is pending and
/// fsync, read the header back, check it against the command, link the
/// file into place. Any failure removes the temporary file.
fn seal_and_place(
    spool: &Spool,
    request: &StoreRequest,
    temp: TempInstance,
) -> Result<Placed, DimseStatus> {
    let sealed = temp
        .seal_blocking()
        .map_err(|e| DimseStatus::failure(status::OUT_OF_RESOURCES, format!("spool fsync: {e}")))?;
    let checked = read_header(sealed.path.clone())
        .map_err(|e| {
            DimseStatus::failure(
                status::CANNOT_UNDERSTAND,
                format!("data set does not parse: {e}"),
            )
        })
        .and_then(|header| check_identity(&header, request).map(|()| header));
    let header = match checked {
        Ok(h) => h,
        Err(s) => {
            let _ = std::fs::remove_file(&sealed.path);
            return Err(s);
        }
    };
    let relative = Spool::relative_path(
        &header.study_instance_uid,
        &header.series_instance_uid,
        &header.sop_instance_uid,
    );
    match spool.place_blocking(&sealed, &relative) {
        Ok(placement) => Ok(Placed {
            sealed,
            header,
            relative,
            placement,
        }),
        Err(e) => {
            let _ = std::fs::remove_file(&sealed.path);
            Err(DimseStatus::failure(
                status::OUT_OF_RESOURCES,
                format!("spool: {e}"),
            ))
        }
    }
}

/// PS3.4 B.2.3: the data set must be the instance the command announced.
fn check_identity(header: &Header, request: &StoreRequest) -> Result<(), DimseStatus> {
    if header.sop_instance_uid.is_empty() && header.sop_class_uid.is_empty() {
        return Err(DimseStatus::failure(
            status::CANNOT_UNDERSTAND,
            "data set holds no SOP Class/Instance UID",
        ));
    }
    if header.sop_instance_uid != request.sop_instance_uid
        || header.sop_class_uid != request.sop_class_uid
    {
        return Err(DimseStatus::failure(
            status::DATA_SET_DOES_NOT_MATCH,
            "data set SOP Class/Instance UID differ from the command",
        ));
    }
    Ok(())
}

/// Seal, validate and place the instance, then index it.
async fn commit(
    ingest: &Ingest,
    info: &AssociationInfo,
    request: &StoreRequest,
    temp: TempInstance,
) -> DimseStatus {
    let (spool, req) = (ingest.spool.clone(), request.clone());
    let placed = match tokio::task::spawn_blocking(move || seal_and_place(&spool, &req, temp)).await
    {
        Ok(Ok(p)) => p,
        Ok(Err(status)) => return status,
        Err(e) => return DimseStatus::failure(status::OUT_OF_RESOURCES, e.to_string()),
    };
    let Placed {
        sealed,
        header,
        relative,
        placement,
    } = placed;
    let row = InstanceRow {
        sop_instance_uid: header.sop_instance_uid,
        sop_class_uid: header.sop_class_uid,
        study_instance_uid: header.study_instance_uid,
        series_instance_uid: header.series_instance_uid,
        patient_key: header.patient_key,
        modality: header.modality,
        study_date: header.study_date,
        transfer_syntax: request.transfer_syntax.clone(),
        size_bytes: sealed.len,
        path: relative.to_string_lossy().into_owned(),
        association_id: info.id.clone(),
        calling_ae: info.calling_ae.clone(),
        patient_id_key: header.patient_id_key,
        laterality: header.laterality,
        view: header.view,
        series_description: header.series_description,
        image_type: header.image_type,
        us_doppler: header.us_doppler,
    };
    if placement == Placement::Exists {
        let existing = ingest.db.instance_path(&row.sop_instance_uid).await;
        match existing {
            Ok(Some(_)) => {
                sealed.discard().await;
                return duplicate(ingest, info, &row).await;
            }
            Ok(None) => {
                // A file without a row: a crash hit between link and commit,
                // so the peer never got Success for it. This copy replaces it.
                if let Err(e) = ingest.spool.replace(&sealed, &relative).await {
                    sealed.discard().await;
                    return DimseStatus::failure(status::OUT_OF_RESOURCES, format!("spool: {e}"));
                }
            }
            Err(e) => {
                sealed.discard().await;
                return DimseStatus::failure(status::OUT_OF_RESOURCES, e.to_string());
            }
        }
    }
    match ingest.instances.insert(&row).await {
        Ok(Inserted::New) => {
            METRICS.instance("stored", status::SUCCESS, &row.modality);
            ingest.stored.notify_waiters();
            DimseStatus::SUCCESS
        }
        Ok(Inserted::Duplicate { existing_path }) => {
            // Same UID already indexed under another study/series path.
            if existing_path != row.path {
                let _ = ingest.spool.remove(&relative).await;
            }
            duplicate(ingest, info, &row).await
        }
        Err(e) => {
            // No row, so no file: the peer will resend. Unless the index
            // does have the row after all (another node stored the same
            // instance at the same moment and acknowledged it) or cannot
            // say (the database is gone: the orphan is replaced on resend).
            if let Ok(None) = ingest.db.instance_path(&row.sop_instance_uid).await {
                let _ = ingest.spool.remove(&relative).await;
            }
            DimseStatus::failure(status::OUT_OF_RESOURCES, e.to_string())
        }
    }
}

async fn duplicate(ingest: &IngestCore, info: &AssociationInfo, row: &InstanceRow) -> DimseStatus {
    debug!(association = %info.id, "duplicate instance kept as first received");
    METRICS.instance("duplicate", status::SUCCESS, &row.modality);
    ingest
        .audit(NewEvent {
            event: event::INSTANCE_DUPLICATE,
            association_id: Some(&info.id),
            sop_instance_uid: Some(&row.sop_instance_uid),
            study_instance_uid: Some(&row.study_instance_uid),
            patient_key: Some(&row.patient_key),
            status: Some(0),
            detail: Some(serde_json::json!({ "kept": "first" })),
            ..Default::default()
        })
        .await;
    DimseStatus::SUCCESS
}
