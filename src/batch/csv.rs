//! The small RFC 4180 CSV reader and writer of the batch results and the
//! label files (a header line, fields quoted when they hold a comma, a quote
//! or a line break). Owns only the text format, not what the columns mean.

use std::collections::HashMap;

/// One field as written: quoted (with doubled quotes) only when it must be.
pub fn field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// One record as a line (with its `\n`).
pub fn line<S: AsRef<str>>(fields: &[S]) -> String {
    let mut out = fields
        .iter()
        .map(|f| field(f.as_ref()))
        .collect::<Vec<_>>()
        .join(",");
    out.push('\n');
    out
}

/// Every record of `text` (quoted fields may span lines; a UTF-8 BOM, as
/// spreadsheet programs write, is dropped; blank lines are skipped).
pub fn parse(text: &str) -> Vec<Vec<String>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                cur.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => cur.push(c),
            (false, '"') => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut cur)),
            (false, '\r') => {}
            (false, '\n') => {
                record.push(std::mem::take(&mut cur));
                if !(record.len() == 1 && record[0].is_empty()) {
                    records.push(std::mem::take(&mut record));
                }
                record.clear();
            }
            (false, c) => cur.push(c),
        }
    }
    if !cur.is_empty() || !record.is_empty() {
        record.push(cur);
        records.push(record);
    }
    records
}

/// A parsed file: the header's column names (trimmed, lower case) and the
/// records as maps from column name to value.
#[derive(Debug, Clone, Default)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<HashMap<String, String>>,
}

impl Table {
    pub fn parse(text: &str) -> Table {
        let mut records = parse(text).into_iter();
        let columns: Vec<String> = records
            .next()
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.trim().to_ascii_lowercase())
            .collect();
        let rows = records
            .map(|r| {
                columns
                    .iter()
                    .cloned()
                    .zip(r.into_iter().map(|v| v.trim().to_string()))
                    .collect()
            })
            .collect();
        Table { columns, rows }
    }

    pub fn has(&self, column: &str) -> bool {
        self.columns.iter().any(|c| c == column)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_fields_round_trip() {
        let fields = ["a", "b,c", "say \"hi\"", "two\nlines", ""];
        let text = format!("{}{}", line(&["h1", "h2", "h3", "h4", "h5"]), line(&fields));
        let t = Table::parse(&text);
        assert_eq!(t.columns, ["h1", "h2", "h3", "h4", "h5"]);
        assert_eq!(t.rows.len(), 1);
        assert_eq!(t.rows[0]["h2"], "b,c");
        assert_eq!(t.rows[0]["h3"], "say \"hi\"");
        assert_eq!(t.rows[0]["h4"], "two\nlines");
        assert_eq!(t.rows[0]["h5"], "");
    }

    #[test]
    fn bom_crlf_and_blank_lines() {
        let t = Table::parse("\u{feff}Patient_ID,HER2\r\nP1,positive\r\n\r\nP2,negative");
        assert_eq!(t.columns, ["patient_id", "her2"]);
        assert_eq!(t.rows.len(), 2);
        assert_eq!(t.rows[1]["her2"], "negative");
    }
}
