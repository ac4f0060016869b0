//! Small helpers to build data sets with dicom-object: typed element setters that
//! sanitise values to their VR (length, character repertoire, DA/TM syntax), code
//! sequence items (PS3.3 §8.8 Code Sequence Macro) and hierarchical SOP instance
//! references (PS3.3 Table 10-4).

use std::collections::BTreeMap;

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use super::codes::Code;

pub type Obj = InMemDicomObject;

/// Maximum value length in characters for the string VRs we write.
fn max_len(vr: VR) -> Option<usize> {
    match vr {
        VR::AE | VR::CS | VR::SH => Some(16),
        VR::LO | VR::PN | VR::UI => Some(64),
        VR::ST => Some(1024),
        VR::LT => Some(10240),
        VR::DS => Some(16),
        VR::IS => Some(12),
        _ => None,
    }
}

/// Make `v` acceptable for a single-valued element of `vr`: drop backslashes and
/// control characters (CR/LF kept for LT/UT/ST), trim, cut to the VR's length.
pub fn sanitize(vr: VR, v: &str) -> String {
    let multiline = matches!(vr, VR::LT | VR::UT | VR::ST);
    let mut s: String = v
        .chars()
        .map(|c| if c == '\\' { '/' } else { c })
        .filter(|c| !c.is_control() || (multiline && (*c == '\r' || *c == '\n')))
        .collect();
    if !multiline {
        s = s.trim().to_string();
    }
    if let Some(n) = max_len(vr)
        && s.chars().count() > n
    {
        s = s.chars().take(n).collect();
        if !multiline {
            s = s.trim_end().to_string();
        }
    }
    s
}

/// Put a (sanitised) string element; an empty string gives a zero-length element.
pub fn put_str(obj: &mut Obj, tag: Tag, vr: VR, v: &str) {
    let s = sanitize(vr, v);
    if s.is_empty() {
        obj.put(DataElement::new(tag, vr, PrimitiveValue::Empty));
    } else {
        obj.put(DataElement::new(tag, vr, PrimitiveValue::from(s)));
    }
}

/// Put a multi-valued string element (e.g. Image Type).
pub fn put_strs(obj: &mut Obj, tag: Tag, vr: VR, vs: &[&str]) {
    let vals: Vec<String> = vs.iter().map(|v| sanitize(vr, v)).collect();
    obj.put(DataElement::new(tag, vr, PrimitiveValue::Strs(vals.into())));
}

/// Put a zero-length element (Type 2 with no known value).
pub fn put_empty(obj: &mut Obj, tag: Tag, vr: VR) {
    obj.put(DataElement::new(tag, vr, PrimitiveValue::Empty));
}

/// Put a valid DA value, or an empty element when `v` is not `YYYYMMDD`.
pub fn put_date(obj: &mut Obj, tag: Tag, v: &str) {
    put_str(obj, tag, VR::DA, if is_da(v) { v } else { "" });
}

/// Put a valid TM value, or an empty element when `v` is not `HH[MM[SS[.F{1,6}]]]`.
pub fn put_time(obj: &mut Obj, tag: Tag, v: &str) {
    put_str(obj, tag, VR::TM, if is_tm(v) { v.trim() } else { "" });
}

pub fn is_da(v: &str) -> bool {
    let v = v.trim();
    v.len() == 8
        && v.bytes().all(|b| b.is_ascii_digit())
        && matches!(v[4..6].parse::<u8>(), Ok(1..=12))
        && matches!(v[6..8].parse::<u8>(), Ok(1..=31))
}

pub fn is_tm(v: &str) -> bool {
    let v = v.trim();
    let (hms, frac) = match v.split_once('.') {
        Some((a, b)) => (a, Some(b)),
        None => (v, None),
    };
    let ok_hms = matches!(hms.len(), 2 | 4 | 6)
        && hms.bytes().all(|b| b.is_ascii_digit())
        && hms[..2].parse::<u8>().is_ok_and(|h| h < 24)
        && (hms.len() < 4 || hms[2..4].parse::<u8>().is_ok_and(|m| m < 60))
        && (hms.len() < 6 || hms[4..6].parse::<u8>().is_ok_and(|s| s < 61));
    let ok_frac = match frac {
        None => true,
        Some(f) => {
            hms.len() == 6 && (1..=6).contains(&f.len()) && f.bytes().all(|b| b.is_ascii_digit())
        }
    };
    ok_hms && ok_frac
}

pub fn put_u16(obj: &mut Obj, tag: Tag, v: u16) {
    obj.put(DataElement::new(tag, VR::US, PrimitiveValue::from(v)));
}

pub fn put_seq(obj: &mut Obj, tag: Tag, items: Vec<Obj>) {
    obj.put(DataElement::new(tag, VR::SQ, DataSetSequence::from(items)));
}

/// A Code Sequence Macro item.
pub fn code_item(code: &Code) -> Obj {
    let mut o = Obj::new_empty();
    put_str(&mut o, tags::CODE_VALUE, VR::SH, code.value);
    put_str(&mut o, tags::CODING_SCHEME_DESIGNATOR, VR::SH, code.scheme);
    put_str(&mut o, tags::CODE_MEANING, VR::LO, code.meaning);
    o
}

/// Put a one-item code sequence.
pub fn put_code_seq(obj: &mut Obj, tag: Tag, code: &Code) {
    put_seq(obj, tag, vec![code_item(code)]);
}

/// One referenced instance for a hierarchical reference.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct InstanceRef {
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
}

/// Items of a Hierarchical SOP Instance Reference Macro sequence (PS3.3 Table 10-4):
/// Study → Referenced Series Sequence → Referenced SOP Sequence. Duplicates of the
/// same SOP Instance UID are listed once; order is by study, series, instance UID.
pub fn hierarchical_refs(refs: &[InstanceRef]) -> Vec<Obj> {
    let mut tree: BTreeMap<&str, BTreeMap<&str, BTreeMap<&str, &str>>> = BTreeMap::new();
    for r in refs {
        tree.entry(r.study_instance_uid.as_str())
            .or_default()
            .entry(r.series_instance_uid.as_str())
            .or_default()
            .insert(r.sop_instance_uid.as_str(), r.sop_class_uid.as_str());
    }
    tree.into_iter()
        .map(|(study, series)| {
            let mut st = Obj::new_empty();
            let series_items = series
                .into_iter()
                .map(|(series_uid, sops)| {
                    let mut se = Obj::new_empty();
                    let sop_items = sops
                        .into_iter()
                        .map(|(inst, class)| {
                            let mut s = Obj::new_empty();
                            put_str(&mut s, tags::REFERENCED_SOP_CLASS_UID, VR::UI, class);
                            put_str(&mut s, tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, inst);
                            s
                        })
                        .collect();
                    put_seq(&mut se, tags::REFERENCED_SOP_SEQUENCE, sop_items);
                    put_str(&mut se, tags::SERIES_INSTANCE_UID, VR::UI, series_uid);
                    se
                })
                .collect();
            put_seq(&mut st, tags::REFERENCED_SERIES_SEQUENCE, series_items);
            put_str(&mut st, tags::STUDY_INSTANCE_UID, VR::UI, study);
            st
        })
        .collect()
}

/// Whether any string value in the data set (recursively) is not plain ASCII, in
/// which case Specific Character Set must be declared.
pub fn needs_utf8(obj: &Obj) -> bool {
    use dicom_core::value::Value;
    obj.iter().any(|e| match e.value() {
        Value::Primitive(PrimitiveValue::Str(s)) => !s.is_ascii(),
        Value::Primitive(PrimitiveValue::Strs(ss)) => ss.iter().any(|s| !s.is_ascii()),
        Value::Sequence(seq) => seq.items().iter().any(needs_utf8),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_times() {
        assert!(is_da("20240131"));
        assert!(!is_da("2024-01-31"));
        assert!(!is_da("20241301"));
        assert!(is_tm("101500"));
        assert!(is_tm("1015"));
        assert!(is_tm("101500.123"));
        assert!(!is_tm("10:15"));
        assert!(!is_tm("2500"));
    }

    #[test]
    fn sanitize_cuts_and_cleans() {
        assert_eq!(
            sanitize(VR::SH, "a\\b\ncdefghijklmnopqrstuvwxyz"),
            "a/bcdefghijklmno"
        );
        assert_eq!(sanitize(VR::LT, "x\ny"), "x\ny");
    }
}
