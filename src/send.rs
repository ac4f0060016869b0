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
    pub error: Option<String>,
}

impl SendResult {
    pub fn ok(&self) -> bool {
        self.status.is_some_and(is_success_or_warning)
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
                let r = SendResult {
                    path: path.clone(),
                    sop_instance_uid: String::new(),
                    status: None,
                    error: Some(e.to_string()),
                };
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
            let fatal = r.status.is_none()
                && r.error
                    .as_deref()
                    .is_some_and(|e| e.starts_with("association"));
            results.push(r);
            if fatal {
                // The association is gone: every file not yet sent is
                // reported as such rather than silently skipped.
                let sent = results.len();
                for (path, header) in items.iter().skip(sent - (files.len() - items.len())) {
                    let r = SendResult {
                        path: path.clone(),
                        sop_instance_uid: header.sop_instance_uid.clone(),
                        status: None,
                        error: Some("not sent: the association failed earlier".into()),
                    };
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
    let mut result = SendResult {
        path: path.to_path_buf(),
        sop_instance_uid: header.sop_instance_uid.clone(),
        status: None,
        error: None,
    };
    let Some(pc_id) = assoc.context_for(&header.sop_class_uid, &header.transfer_syntax) else {
        result.error = Some(format!(
            "peer accepted no presentation context for {} in {}",
            header.sop_class_uid, header.transfer_syntax
        ));
        return result;
    };
    let file = match open_dataset(path, header).await {
        Ok(f) => f,
        Err(e) => {
            result.error = Some(e.to_string());
            return result;
        }
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
        Ok(status) => {
            result.status = Some(status.code);
            result.error = status.comment;
        }
        Err(e) => result.error = Some(format!("association: {e}")),
    }
    result
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
