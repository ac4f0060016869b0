//! Sending Part 10 files with the node's SCU: find the files, group them into
//! associations by presentation context, stream each data set as stored.

use std::path::{Path, PathBuf};

use crate::dimse::client::{ClientError, ClientOptions, ScuAssociation};
use crate::dimse::command::is_success_or_warning;
use crate::part10::Part10Header;

/// PS3.8 9.3.2.2: at most 128 presentation contexts (odd ids 1..=255).
const MAX_CONTEXTS: usize = 128;

/// The result of sending one file.
#[derive(Debug, Clone)]
pub struct SendResult {
    pub path: PathBuf,
    pub sop_instance_uid: String,
    /// The DIMSE status, when the peer answered.
    pub status: Option<u16>,
    /// The peer's Error Comment (0000,0902) with the status, or the text of
    /// `failure`.
    pub error: Option<String>,
    /// Why the peer gave no status for the file.
    pub failure: Option<SendFailure>,
}

/// Why a file got no DIMSE status: what the outbox's retry policy needs to
/// know (the association's own failures are [`ClientError`]s).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendFailure {
    /// The file could not be read as Part 10 (it will fail again).
    #[error("{0}")]
    File(String),
    /// The peer accepted no presentation context for the file's SOP class
    /// and transfer syntax (PS3.8 9.3.3.2).
    #[error("peer accepted no presentation context for {sop_class_uid} in {transfer_syntax}")]
    NoContext {
        sop_class_uid: String,
        transfer_syntax: String,
    },
    /// The association failed while the file was being sent.
    #[error("association: {0}")]
    Association(String),
    /// Not attempted: the association had failed on an earlier file.
    #[error("not sent: the association failed earlier")]
    NotSent,
}

impl SendResult {
    pub fn ok(&self) -> bool {
        self.status.is_some_and(is_success_or_warning)
    }

    fn failed(path: &Path, sop_instance_uid: &str, failure: SendFailure) -> Self {
        SendResult {
            path: path.to_path_buf(),
            sop_instance_uid: sop_instance_uid.to_string(),
            status: None,
            error: Some(failure.to_string()),
            failure: Some(failure),
        }
    }
}

/// Every regular file under the given files and folders, sorted.
pub fn collect_files(inputs: &[PathBuf]) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for input in inputs {
        for entry in walkdir::WalkDir::new(input)
            .follow_links(true)
            .into_iter()
            .flatten()
        {
            if entry.file_type().is_file() {
                files.push(entry.into_path());
            }
        }
    }
    files.sort();
    files
}

/// Send files to `addr`; `progress` is called after each file.
pub async fn send_files(
    addr: &str,
    options: &ClientOptions,
    files: &[PathBuf],
    mut progress: impl FnMut(&SendResult),
) -> Result<Vec<SendResult>, ClientError> {
    let mut results = Vec::with_capacity(files.len());
    let mut items = Vec::new();
    for path in files {
        match Part10Header::read(path) {
            Ok(h) => items.push((path.clone(), h)),
            Err(e) => {
                let r = SendResult::failed(path, "", SendFailure::File(e.to_string()));
                progress(&r);
                results.push(r);
            }
        }
    }
    // One association per batch of files whose distinct contexts fit.
    let mut start = 0;
    while start < items.len() {
        let mut contexts: Vec<(String, String)> = Vec::new();
        let mut end = start;
        while end < items.len() {
            let key = (
                items[end].1.sop_class_uid.clone(),
                items[end].1.transfer_syntax.clone(),
            );
            if !contexts.contains(&key) {
                if contexts.len() == MAX_CONTEXTS {
                    break;
                }
                contexts.push(key);
            }
            end += 1;
        }
        let mut assoc = ScuAssociation::connect(addr, options, &contexts).await?;
        for (path, header) in &items[start..end] {
            let r = send_one(&mut assoc, path, header).await;
            progress(&r);
            let fatal = matches!(r.failure, Some(SendFailure::Association(_)));
            results.push(r);
            if fatal {
                // The association is gone: every file not yet sent is
                // reported as such rather than silently skipped.
                let sent = results.len();
                for (path, header) in items.iter().skip(sent - (files.len() - items.len())) {
                    let r =
                        SendResult::failed(path, &header.sop_instance_uid, SendFailure::NotSent);
                    progress(&r);
                    results.push(r);
                }
                return Ok(results);
            }
        }
        assoc.release().await;
        start = end;
    }
    Ok(results)
}

async fn send_one(assoc: &mut ScuAssociation, path: &Path, header: &Part10Header) -> SendResult {
    let uid = &header.sop_instance_uid;
    let Some(pc_id) = assoc.context_for(&header.sop_class_uid, &header.transfer_syntax) else {
        let failure = SendFailure::NoContext {
            sop_class_uid: header.sop_class_uid.clone(),
            transfer_syntax: header.transfer_syntax.clone(),
        };
        return SendResult::failed(path, uid, failure);
    };
    let file = match open_dataset(path, header).await {
        Ok(f) => f,
        Err(e) => return SendResult::failed(path, uid, SendFailure::File(e.to_string())),
    };
    let mut reader = tokio::io::BufReader::with_capacity(1 << 20, file);
    match assoc
        .store(
            pc_id,
            &header.sop_class_uid,
            &header.sop_instance_uid,
            &mut reader,
        )
        .await
    {
        Ok(status) => SendResult {
            path: path.to_path_buf(),
            sop_instance_uid: uid.clone(),
            status: Some(status.code),
            error: status.comment,
            failure: None,
        },
        Err(e) => SendResult::failed(path, uid, SendFailure::Association(e.to_string())),
    }
}

async fn open_dataset(
    path: &Path,
    header: &Part10Header,
) -> std::io::Result<tokio::io::Take<tokio::fs::File>> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(std::io::SeekFrom::Start(header.dataset_offset))
        .await?;
    Ok(file.take(header.dataset_len))
}
