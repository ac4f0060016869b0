//! Clinical covariates: the model's five floats, each mapped from a DICOM
//! attribute of the patient's instances (e.g. PatientAge) or a constant.
//! Missing values become 0 and are flagged.

use dicom_core::Tag;
use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_dictionary_std::StandardDataDictionary;
use serde::Deserialize;

use super::attrs::{self, Obj};

/// One covariate: `{ attribute = "PatientAge" }` (a keyword or a tag such as
/// "(0010,1010)"/"00101010"), `{ constant = 1.0 }`, both (the constant is
/// the fallback when the attribute is absent; still flagged missing), or `{}`
/// (always missing). The value is `raw * scale + offset`.
#[derive(Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClinicalSource {
    pub attribute: Option<String>,
    pub constant: Option<f32>,
    pub scale: f32,
    pub offset: f32,
}

impl Default for ClinicalSource {
    fn default() -> Self {
        ClinicalSource {
            attribute: None,
            constant: None,
            scale: 1.0,
            offset: 0.0,
        }
    }
}

impl ClinicalSource {
    pub fn attribute(name: &str) -> Self {
        ClinicalSource {
            attribute: Some(name.to_string()),
            ..Default::default()
        }
    }
    pub fn constant(v: f32) -> Self {
        ClinicalSource {
            constant: Some(v),
            ..Default::default()
        }
    }
}

/// Resolve a keyword or tag text to a tag.
pub fn resolve_tag(name: &str) -> Option<Tag> {
    let n = name.trim();
    let hex: String = n.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    if (n.starts_with('(') || n.chars().all(|c| c.is_ascii_hexdigit())) && hex.len() == 8 {
        let g = u16::from_str_radix(&hex[0..4], 16).ok()?;
        let e = u16::from_str_radix(&hex[4..8], 16).ok()?;
        return Some(Tag(g, e));
    }
    StandardDataDictionary
        .by_name(n)
        .map(|e| e.tag_range().inner())
}

/// Numeric value of an attribute: Age String (PS3.5 6.2, "045Y", "006M",
/// "010W", "003D") in years, else the first numeric value.
fn numeric(obj: &Obj, tag: Tag) -> Option<f32> {
    let e = obj.get(tag)?;
    if e.vr() == dicom_core::VR::AS {
        let s = attrs::text(obj, tag)?;
        let (num, unit) = s.split_at(s.len().saturating_sub(1));
        let v: f32 = num.trim().parse().ok()?;
        return match unit {
            "Y" => Some(v),
            "M" => Some(v / 12.0),
            "W" => Some(v * 7.0 / 365.25),
            "D" => Some(v / 365.25),
            _ => None,
        };
    }
    attrs::float(obj, tag).map(|v| v as f32)
}

/// Map the five covariates, taking each attribute from the first header in
/// `headers` that has a usable value.
pub fn map_clinical<'a>(
    sources: &[ClinicalSource; 5],
    headers: impl Iterator<Item = &'a Obj> + Clone,
) -> ([f32; 5], [bool; 5], Vec<String>) {
    let mut values = [0f32; 5];
    let mut missing = [false; 5];
    let mut notes = Vec::new();
    for (i, src) in sources.iter().enumerate() {
        let found = src.attribute.as_deref().and_then(|name| {
            let tag = resolve_tag(name);
            if tag.is_none() {
                notes.push(format!("clinical[{i}]: unknown attribute '{name}'"));
            }
            let tag = tag?;
            headers.clone().find_map(|h| numeric(h, tag))
        });
        match (found, src.constant) {
            (Some(v), _) => values[i] = v * src.scale + src.offset,
            (None, Some(c)) if src.attribute.is_none() => values[i] = c,
            (None, Some(c)) => {
                values[i] = c;
                missing[i] = true;
                notes.push(format!(
                    "clinical[{i}]: attribute missing, constant fallback used"
                ));
            }
            (None, None) => {
                missing[i] = true;
                if let Some(a) = &src.attribute {
                    notes.push(format!("clinical[{i}]: {a} missing → 0"));
                } else {
                    notes.push(format!("clinical[{i}]: not configured → 0"));
                }
            }
        }
    }
    (values, missing, notes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;

    #[test]
    fn age_and_constants() {
        let mut o = Obj::new_empty();
        o.put(DataElement::new(
            tags::PATIENT_AGE,
            VR::AS,
            PrimitiveValue::from("054Y"),
        ));
        o.put(DataElement::new(
            tags::PATIENT_WEIGHT,
            VR::DS,
            PrimitiveValue::from("61.5"),
        ));
        let src = [
            ClinicalSource::attribute("PatientAge"),
            ClinicalSource {
                attribute: Some("(0010,1030)".into()),
                scale: 0.01,
                ..Default::default()
            },
            ClinicalSource::constant(2.0),
            ClinicalSource::attribute("PatientSize"),
            ClinicalSource::default(),
        ];
        let (v, m, _) = map_clinical(&src, std::iter::once(&o));
        assert_eq!(v[0], 54.0);
        assert!((v[1] - 0.615).abs() < 1e-6);
        assert_eq!(v[2], 2.0);
        assert_eq!((v[3], v[4]), (0.0, 0.0));
        assert_eq!(m, [false, false, false, true, true]);
    }
}
