//! Small, panic-free accessors for DICOM attribute values (strings, numbers,
//! sequences, functional groups), shared by `header` and `imaging`.
//!
//! Every accessor returns `Option`/empty on a missing or malformed value: the
//! callers decide whether that is an error, a fallback, or a note.

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

/// The in-memory data set type used throughout `imaging`.
pub type Obj = InMemDicomObject;

/// Trimmed string value (first value of a multi-valued string kept whole, i.e.
/// backslashes preserved); `None` when absent or empty.
pub fn text(obj: &Obj, tag: Tag) -> Option<String> {
    let e = obj.get(tag)?;
    let s = e.to_str().ok()?;
    let s = s.trim_matches(|c: char| c == ' ' || c == '\0').to_string();
    if s.is_empty() { None } else { Some(s) }
}

/// All values of a multi-valued string attribute, trimmed, upper-cased.
pub fn texts_upper(obj: &Obj, tag: Tag) -> Vec<String> {
    text(obj, tag)
        .map(|s| {
            s.split('\\')
                .map(|v| v.trim().to_ascii_uppercase())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
}

/// All numeric values (DS, IS, US, SS, FL, FD, ...) as f64.
pub fn floats(obj: &Obj, tag: Tag) -> Vec<f64> {
    obj.get(tag)
        .and_then(|e| e.to_multi_float64().ok())
        .map(|v| v.into_iter().filter(|x| x.is_finite()).collect())
        .unwrap_or_default()
}

/// First numeric value as f64.
pub fn float(obj: &Obj, tag: Tag) -> Option<f64> {
    floats(obj, tag).first().copied()
}

/// First numeric value as i64 (accepts "12.0"-style IS/DS too).
pub fn int(obj: &Obj, tag: Tag) -> Option<i64> {
    let e = obj.get(tag)?;
    if let Ok(v) = e.to_int::<i64>() {
        return Some(v);
    }
    float(obj, tag).map(|f| f.round() as i64)
}

/// Raw integer values (for US/SS LUT descriptors).
pub fn ints(obj: &Obj, tag: Tag) -> Vec<i64> {
    obj.get(tag)
        .and_then(|e| e.to_multi_int::<i64>().ok())
        .unwrap_or_default()
}

/// Items of a sequence attribute (empty when absent or not a sequence).
pub fn items(obj: &Obj, tag: Tag) -> &[Obj] {
    obj.get(tag).and_then(|e| e.items()).unwrap_or(&[])
}

/// First item of a sequence.
pub fn item(obj: &Obj, tag: Tag) -> Option<&Obj> {
    items(obj, tag).first()
}

/// Raw bytes of a primitive value (OB/OW/US...), native little-endian order.
pub fn bytes(obj: &Obj, tag: Tag) -> Option<Vec<u8>> {
    let e = obj.get(tag)?;
    e.value().primitive().map(|p| p.to_bytes().into_owned())
}

/// Enhanced multi-frame functional groups (PS3.3 C.7.6.16): look for
/// `macro_seq` first in the Per-frame Functional Groups item of `frame`
/// (0-based), then in the Shared Functional Groups; return its first item.
pub fn functional_group(obj: &Obj, frame: usize, macro_seq: Tag) -> Option<&Obj> {
    if let Some(per_frame) = items(obj, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE).get(frame)
        && let Some(it) = item(per_frame, macro_seq)
    {
        return Some(it);
    }
    let shared = item(obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE)?;
    item(shared, macro_seq)
}

/// Combined DICOM date (DA) + time (TM) as seconds since an arbitrary epoch,
/// only meaningful for ordering and differences within one patient.
pub fn date_time_seconds(date: Option<&str>, time: Option<&str>) -> Option<f64> {
    let t = time?;
    let tsec = parse_tm(t)?;
    let dsec = date.and_then(parse_da).unwrap_or(0.0);
    Some(dsec + tsec)
}

/// DT value ("YYYYMMDDHHMMSS.FFFFFF&ZZXX") as seconds, same epoch as above.
pub fn dt_seconds(dt: &str) -> Option<f64> {
    let dt = dt.trim();
    let core = dt.split(['+', '-']).next().unwrap_or(dt);
    if core.len() < 8 {
        return None;
    }
    let (d, t) = core.split_at(8);
    let dsec = parse_da(d)?;
    let tsec = if t.is_empty() { 0.0 } else { parse_tm(t)? };
    Some(dsec + tsec)
}

fn parse_da(d: &str) -> Option<f64> {
    let d = d.trim().replace('.', "");
    if d.len() != 8 {
        return None;
    }
    let y: i64 = d[0..4].parse().ok()?;
    let m: i64 = d[4..6].parse().ok()?;
    let day: i64 = d[6..8].parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm), exact for ordering.
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = if y2 >= 0 { y2 } else { y2 - 399 } / 400;
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days as f64 * 86400.0)
}

fn parse_tm(t: &str) -> Option<f64> {
    let t = t.trim().replace(':', "");
    let (hms, frac) = match t.split_once('.') {
        Some((a, b)) => (a.to_string(), b.to_string()),
        None => (t.clone(), String::new()),
    };
    if hms.len() < 2 || !hms.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let h: f64 = hms.get(0..2)?.parse().ok()?;
    let m: f64 = hms.get(2..4).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    let s: f64 = hms.get(4..6).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    let f: f64 = if frac.is_empty() {
        0.0
    } else {
        format!("0.{frac}").parse().unwrap_or(0.0)
    };
    Some(h * 3600.0 + m * 60.0 + s + f)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn times_parse() {
        assert_eq!(parse_tm("101530"), Some(36930.0));
        assert_eq!(parse_tm("10:15:30.5"), Some(36930.5));
        assert_eq!(parse_tm("10"), Some(36000.0));
        let a = date_time_seconds(Some("20240101"), Some("235959")).unwrap();
        let b = date_time_seconds(Some("20240102"), Some("000001")).unwrap();
        assert!((b - a - 2.0).abs() < 1e-6);
        assert!(dt_seconds("20240102000001.5+0100").unwrap() - b - 0.5 < 1e-6);
    }
}
