//! The DICOM JSON model (PS3.18 F.2) as far as the node reads and writes
//! it: a tag's first value from a QIDO-RS match, and the STOW-RS response
//! (PS3.18 10.5.3: Referenced SOP Sequence, Failed SOP Sequence) in both
//! directions.

use serde_json::{Map, Value, json};

/// (0008,1199) Referenced SOP Sequence.
pub const REFERENCED_SOP_SEQUENCE: &str = "00081199";
/// (0008,1198) Failed SOP Sequence.
pub const FAILED_SOP_SEQUENCE: &str = "00081198";
/// (0008,1197) Failure Reason.
pub const FAILURE_REASON: &str = "00081197";
/// (0008,1196) Warning Reason.
pub const WARNING_REASON: &str = "00081196";
/// (0008,1150) Referenced SOP Class UID.
pub const REFERENCED_SOP_CLASS_UID: &str = "00081150";
/// (0008,1155) Referenced SOP Instance UID.
pub const REFERENCED_SOP_INSTANCE_UID: &str = "00081155";
/// (0008,1190) Retrieve URL.
pub const RETRIEVE_URL: &str = "00081190";

/// Normalise a tag written `0020000D`, `0020,000D` or `(0020,000D)` to the
/// DICOM JSON key (8 upper-case hex digits).
fn key(tag: &str) -> String {
    tag.chars()
        .filter(|c| c.is_ascii_hexdigit())
        .collect::<String>()
        .to_ascii_uppercase()
}

/// The first value of `tag` in a DICOM JSON object, as text: strings and
/// UIDs as they are, numbers printed, a person name's Alphabetic group.
/// None when the attribute is absent or has no value.
pub fn json_string(obj: &Value, tag: &str) -> Option<String> {
    let first = obj.get(key(tag))?.get("Value")?.as_array()?.first()?;
    match first {
        Value::String(s) => Some(s.trim_end_matches(['\0', ' ']).to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Object(pn) => pn
            .get("Alphabetic")
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

/// Every value of `tag` as text (e.g. Modalities in Study).
pub fn json_strings(obj: &Value, tag: &str) -> Vec<String> {
    let Some(values) = obj
        .get(key(tag))
        .and_then(|e| e.get("Value"))
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    values
        .iter()
        .filter_map(|v| match v {
            Value::String(s) => Some(s.trim_end_matches(['\0', ' ']).to_string()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
        .collect()
}

/// One instance a STOW-RS response names as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StowStored {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub retrieve_url: Option<String>,
    /// Warning Reason (0008,1196), e.g. 0xB000 coercion.
    pub warning: Option<u16>,
}

/// One instance a STOW-RS response names as failed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StowFailed {
    /// Empty when the part could not be read far enough to know it.
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    /// Failure Reason (0008,1197): PS3.4 B.2.3 / PS3.18 table 10.5.3-2
    /// (0xA7xx out of resources, 0xA9xx does not match, 0xCxxx cannot
    /// understand, 0x0110 processing failure, 0x0122 SOP class not
    /// supported, 0xC122 transfer syntax not supported).
    pub reason: Option<u16>,
}

/// A STOW-RS response (PS3.18 10.5.3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StowResponse {
    /// The HTTP status: 200 all stored, 202 some failed, 409 none stored.
    pub status: u16,
    /// Retrieve URL of the study (0008,1190), when given.
    pub retrieve_url: Option<String>,
    pub stored: Vec<StowStored>,
    pub failed: Vec<StowFailed>,
}

fn items<'a>(obj: &'a Value, tag: &str) -> impl Iterator<Item = &'a Value> {
    obj.get(tag)
        .and_then(|e| e.get("Value"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn reason(item: &Value, tag: &str) -> Option<u16> {
    json_string(item, tag).and_then(|s| s.parse::<u16>().ok())
}

impl StowResponse {
    /// Read a response body (a DICOM JSON object; some servers send it in
    /// an array of one).
    pub fn from_json(status: u16, body: &Value) -> StowResponse {
        let obj = match body {
            Value::Array(a) => a.first().unwrap_or(&Value::Null),
            v => v,
        };
        let stored = items(obj, REFERENCED_SOP_SEQUENCE)
            .map(|i| StowStored {
                sop_class_uid: json_string(i, REFERENCED_SOP_CLASS_UID).unwrap_or_default(),
                sop_instance_uid: json_string(i, REFERENCED_SOP_INSTANCE_UID).unwrap_or_default(),
                retrieve_url: json_string(i, RETRIEVE_URL),
                warning: reason(i, WARNING_REASON),
            })
            .collect();
        let failed = items(obj, FAILED_SOP_SEQUENCE)
            .map(|i| StowFailed {
                sop_class_uid: json_string(i, REFERENCED_SOP_CLASS_UID).unwrap_or_default(),
                sop_instance_uid: json_string(i, REFERENCED_SOP_INSTANCE_UID).unwrap_or_default(),
                reason: reason(i, FAILURE_REASON),
            })
            .collect();
        StowResponse {
            status,
            retrieve_url: json_string(obj, RETRIEVE_URL),
            stored,
            failed,
        }
    }

    /// The response body (DICOM JSON, `application/dicom+json`).
    pub fn to_json(&self) -> Value {
        fn uid(v: &str) -> Value {
            json!({ "vr": "UI", "Value": [v] })
        }
        let mut obj = Map::new();
        if let Some(url) = &self.retrieve_url {
            obj.insert(RETRIEVE_URL.into(), json!({ "vr": "UR", "Value": [url] }));
        }
        if !self.stored.is_empty() {
            let seq: Vec<Value> = self
                .stored
                .iter()
                .map(|s| {
                    let mut item = Map::new();
                    item.insert(REFERENCED_SOP_CLASS_UID.into(), uid(&s.sop_class_uid));
                    item.insert(REFERENCED_SOP_INSTANCE_UID.into(), uid(&s.sop_instance_uid));
                    if let Some(url) = &s.retrieve_url {
                        item.insert(RETRIEVE_URL.into(), json!({ "vr": "UR", "Value": [url] }));
                    }
                    if let Some(w) = s.warning {
                        item.insert(WARNING_REASON.into(), json!({ "vr": "US", "Value": [w] }));
                    }
                    Value::Object(item)
                })
                .collect();
            obj.insert(
                REFERENCED_SOP_SEQUENCE.into(),
                json!({ "vr": "SQ", "Value": seq }),
            );
        }
        if !self.failed.is_empty() {
            let seq: Vec<Value> = self
                .failed
                .iter()
                .map(|f| {
                    let mut item = Map::new();
                    // Type 1 in the response, but unknown for a part that
                    // is not DICOM at all: left out rather than invented.
                    if !f.sop_class_uid.is_empty() {
                        item.insert(REFERENCED_SOP_CLASS_UID.into(), uid(&f.sop_class_uid));
                    }
                    if !f.sop_instance_uid.is_empty() {
                        item.insert(REFERENCED_SOP_INSTANCE_UID.into(), uid(&f.sop_instance_uid));
                    }
                    if let Some(r) = f.reason {
                        item.insert(FAILURE_REASON.into(), json!({ "vr": "US", "Value": [r] }));
                    }
                    Value::Object(item)
                })
                .collect();
            obj.insert(
                FAILED_SOP_SEQUENCE.into(),
                json!({ "vr": "SQ", "Value": seq }),
            );
        }
        Value::Object(obj)
    }

    /// The failures in words, for an outbox row or an error: `UID: 0xC000`.
    pub fn failure_summary(&self) -> String {
        self.failed
            .iter()
            .map(|f| {
                let uid = if f.sop_instance_uid.is_empty() {
                    "(unknown instance)"
                } else {
                    f.sop_instance_uid.as_str()
                };
                match f.reason {
                    Some(r) => format!("{uid}: failure reason {r:#06X}"),
                    None => format!("{uid}: failed"),
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_values_of_each_kind() {
        let obj = json!({
            "0020000D": { "vr": "UI", "Value": ["1.2.3"] },
            "00100010": { "vr": "PN", "Value": [{ "Alphabetic": "Doe^Jane" }] },
            "00201208": { "vr": "IS", "Value": [12] },
            "00080061": { "vr": "CS", "Value": ["MG", "US"] },
            "00080020": { "vr": "DA" }
        });
        assert_eq!(json_string(&obj, "0020000D").as_deref(), Some("1.2.3"));
        assert_eq!(json_string(&obj, "(0020,000d)").as_deref(), Some("1.2.3"));
        assert_eq!(json_string(&obj, "00100010").as_deref(), Some("Doe^Jane"));
        assert_eq!(json_string(&obj, "00201208").as_deref(), Some("12"));
        assert_eq!(json_string(&obj, "00080020"), None);
        assert_eq!(json_string(&obj, "00080050"), None);
        assert_eq!(json_strings(&obj, "00080061"), vec!["MG", "US"]);
    }

    #[test]
    fn stow_responses_round_trip() {
        let r = StowResponse {
            status: 202,
            retrieve_url: Some("http://x/studies/1".into()),
            stored: vec![StowStored {
                sop_class_uid: "1.2".into(),
                sop_instance_uid: "1.2.3".into(),
                retrieve_url: Some("http://x/studies/1/series/2/instances/1.2.3".into()),
                warning: None,
            }],
            failed: vec![
                StowFailed {
                    sop_class_uid: "1.2".into(),
                    sop_instance_uid: "1.2.4".into(),
                    reason: Some(0xC000),
                },
                StowFailed {
                    reason: Some(0xC000),
                    ..Default::default()
                },
            ],
        };
        let back = StowResponse::from_json(202, &r.to_json());
        assert_eq!(back, r);
        assert!(r.failure_summary().contains("1.2.4: failure reason 0xC000"));
    }
}
