//! The batch's results: one CSV row per case (the columns of
//! [`COLUMNS`]) and one JSON line per case with the full detail; reading
//! them back for a resumed run and for `her2map evaluate`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::csv;

/// The CSV columns, in order.
pub const COLUMNS: [&str; 18] = [
    "case_id",
    "patient_key",
    "patient_id",
    "accession_numbers",
    "study_dates",
    "instances",
    "lesion_side",
    "modalities_used",
    "modalities_missing",
    "prob",
    "prob_mg",
    "prob_us",
    "prob_mri",
    "status",
    "threshold",
    "weights_sha256",
    "inputs_sha256",
    "error",
];

/// One case's row (every field as written).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row(pub HashMap<String, String>);

impl Row {
    pub fn get(&self, column: &str) -> &str {
        self.0.get(column).map(String::as_str).unwrap_or("")
    }
    pub fn set(&mut self, column: &str, value: impl Into<String>) {
        self.0.insert(column.to_string(), value.into());
    }
    fn line(&self) -> String {
        csv::line(&COLUMNS.map(|c| self.get(c)))
    }
}

/// The JSON lines file beside a results CSV (`RESULTS.jsonl`).
pub fn jsonl_path(csv: &Path) -> PathBuf {
    csv.with_extension("jsonl")
}

/// The list of files that joined no case, beside a results CSV
/// (`RESULTS.unreadable.csv`).
pub fn unreadable_path(csv: &Path) -> PathBuf {
    csv.with_extension("unreadable.csv")
}

/// Write the files that are not readable DICOM instances, with the reason.
pub fn write_unreadable(path: &Path, files: &[super::scan::Unreadable]) -> std::io::Result<()> {
    let mut text = csv::line(&["path", "reason"]);
    for u in files {
        text.push_str(&csv::line(&[
            u.path.display().to_string(),
            u.reason.clone(),
        ]));
    }
    replace(path, text.as_bytes())
}

/// The rows of an existing results file (none when it does not exist).
pub fn read_rows(path: &Path) -> std::io::Result<Vec<Row>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(csv::Table::parse(&text).rows.into_iter().map(Row).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// The JSON lines of an existing detail file, by case id.
pub fn read_details(path: &Path) -> std::io::Result<HashMap<String, String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(e),
    };
    Ok(text
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((v["case_id"].as_str()?.to_string(), l.to_string()))
        })
        .collect())
}

/// The two files being written: rows are appended and flushed as cases
/// finish, so an interrupted batch keeps what it did.
pub struct Writer {
    csv: std::fs::File,
    jsonl: std::fs::File,
}

impl Writer {
    /// Start the files afresh with the rows (and their detail lines) kept
    /// from an earlier run; written to temporary files and renamed, so a
    /// crash here loses nothing.
    pub fn start(csv_path: &Path, kept: &[(Row, Option<String>)]) -> std::io::Result<Writer> {
        let jsonl_path = jsonl_path(csv_path);
        let mut head = csv::line(&COLUMNS);
        let mut lines = String::new();
        for (row, detail) in kept {
            head.push_str(&row.line());
            if let Some(d) = detail {
                lines.push_str(d);
                lines.push('\n');
            }
        }
        replace(csv_path, head.as_bytes())?;
        replace(&jsonl_path, lines.as_bytes())?;
        let open = |p: &Path| std::fs::OpenOptions::new().append(true).open(p);
        Ok(Writer {
            csv: open(csv_path)?,
            jsonl: open(&jsonl_path)?,
        })
    }

    pub fn append(&mut self, row: &Row, detail: &serde_json::Value) -> std::io::Result<()> {
        self.jsonl
            .write_all(format!("{}\n", serde_json::to_string(detail)?).as_bytes())?;
        self.csv.write_all(row.line().as_bytes())?;
        self.jsonl.flush()?;
        self.csv.flush()
    }
}

fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
