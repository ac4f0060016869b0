//! The label file of a site validation: one row per patient (or per
//! accession) with its HER2 status from pathology, and how a row's columns
//! give that status. Matching results to labels lives here too.

use std::collections::HashMap;

use crate::batch::csv::Table;
use crate::batch::results::Row;

/// The HER2 status of one label row: from `her2` (`positive`/`negative`,
/// also `pos`/`neg`, `1`/`0`) when given, else from `ihc` and `ish` by the
/// ASCO/CAP rule (Wolff et al. 2018, reaffirmed 2023): IHC 3+ is positive;
/// IHC 0 and 1+ are negative (HER2-low is HER2-negative for this purpose);
/// IHC 2+ is equivocal and takes the ISH result (positive or negative), and
/// without one the row has no label. `Err` names a value that is not one of
/// these.
pub fn her2_status(row: &HashMap<String, String>) -> Result<Option<bool>, String> {
    let get = |c: &str| {
        row.get(c)
            .map(|v| v.trim().to_ascii_lowercase())
            .unwrap_or_default()
    };
    let binary = |v: &str, col: &str| match v {
        "positive" | "pos" | "1" | "+" | "amplified" => Ok(Some(true)),
        "negative" | "neg" | "0" | "-" | "not amplified" | "non-amplified" => Ok(Some(false)),
        "" => Ok(None),
        other => Err(format!("{col}: {other:?} is not positive/negative")),
    };
    let her2 = get("her2");
    if !her2.is_empty() {
        return binary(&her2, "her2");
    }
    let ihc = get("ihc");
    match ihc.trim_end_matches('+') {
        "" => Ok(None),
        "3" => Ok(Some(true)),
        "0" | "1" => Ok(Some(false)),
        "2" => binary(&get("ish"), "ish"),
        _ => Err(format!("ihc: {ihc:?} is not 0, 1+, 2+ or 3+")),
    }
}

/// A result row joined with its label row.
pub struct Matched<'a> {
    pub result: &'a Row,
    pub label: &'a HashMap<String, String>,
    pub positive: bool,
}

/// How results were matched to labels.
pub struct Join<'a> {
    pub matched: Vec<Matched<'a>>,
    /// Result rows with a probability but no label row (or a label row
    /// without a usable status).
    pub unmatched: usize,
    /// Result rows with an error (no probability).
    pub failed: usize,
    /// Label rows no result row matched.
    pub labels_without_result: usize,
}

/// Match each result row to a label row: by `accession_number` when the
/// label file has that column (any of the row's accession numbers), else by
/// `patient_id` — the row's Patient ID, or, for results written with
/// `--no-phi`, the patient key hashed from the label's `patient_id` (and
/// `issuer` column, when given) as the node hashes it.
pub fn join<'a>(results: &'a [Row], labels: &'a Table) -> Result<Join<'a>, String> {
    let by_accession = labels.has("accession_number");
    if !by_accession && !labels.has("patient_id") {
        return Err("the label file needs a patient_id or an accession_number column".into());
    }
    let mut index: HashMap<String, usize> = HashMap::new();
    for (i, l) in labels.rows.iter().enumerate() {
        if by_accession {
            index.insert(format!("acc:{}", l["accession_number"]), i);
        } else {
            let id = &l["patient_id"];
            let issuer = l.get("issuer").map(String::as_str).unwrap_or("");
            index.insert(format!("id:{id}"), i);
            index.insert(format!("key:{}", crate::ingest::patient_key(id, issuer)), i);
            index.insert(format!("key:{}", crate::ingest::patient_key(id, "")), i);
        }
    }
    let mut used = vec![false; labels.rows.len()];
    let mut out = Join {
        matched: Vec::new(),
        unmatched: 0,
        failed: 0,
        labels_without_result: 0,
    };
    for r in results {
        if !r.get("error").is_empty() || r.get("prob").is_empty() {
            out.failed += 1;
            continue;
        }
        let keys: Vec<String> = if by_accession {
            r.get("accession_numbers")
                .split(';')
                .map(|a| format!("acc:{a}"))
                .collect()
        } else if !r.get("patient_id").is_empty() {
            vec![format!("id:{}", r.get("patient_id"))]
        } else {
            vec![format!("key:{}", r.get("patient_key"))]
        };
        let Some(&i) = keys.iter().find_map(|k| index.get(k)) else {
            out.unmatched += 1;
            continue;
        };
        match her2_status(&labels.rows[i])? {
            Some(positive) => {
                used[i] = true;
                out.matched.push(Matched {
                    result: r,
                    label: &labels.rows[i],
                    positive,
                });
            }
            None => out.unmatched += 1,
        }
    }
    out.labels_without_result = used.iter().filter(|u| !**u).count();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn asco_cap_mapping() {
        let s = |p: &[(&str, &str)]| her2_status(&row(p)).unwrap();
        assert_eq!(s(&[("her2", "Positive")]), Some(true));
        assert_eq!(
            s(&[("her2", "neg"), ("ihc", "3+")]),
            Some(false),
            "her2 wins"
        );
        assert_eq!(s(&[("ihc", "3+")]), Some(true));
        assert_eq!(s(&[("ihc", "1+"), ("ish", "positive")]), Some(false));
        assert_eq!(s(&[("ihc", "0")]), Some(false));
        assert_eq!(s(&[("ihc", "2+"), ("ish", "positive")]), Some(true));
        assert_eq!(s(&[("ihc", "2+"), ("ish", "negative")]), Some(false));
        assert_eq!(s(&[("ihc", "2+")]), None, "equivocal without ISH");
        assert!(her2_status(&row(&[("ihc", "4+")])).is_err());
    }
}
