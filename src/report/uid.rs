//! Deterministic DICOM UIDs for everything the report layer creates (SOP instances,
//! series, tracking UIDs, the device observer UID).
//!
//! A UID is derived from a SHA-256 digest of its identifying parts joined by `|`
//! (for objects: `case_id|revision|kind|study_instance_uid|index`), so that a re-send
//! after a crash reproduces exactly the same SOP Instance UIDs and a PACS treats the
//! second copy as a duplicate instead of a new object.
//!
//! * No root configured: `2.25.<decimal of the first 128 bits of the digest>`, the
//!   UUID-derived form of PS3.5 §B.2 (the digest's first 128 bits stand in for the UUID).
//! * `uid_root` configured: `<root>.<decimal digits of the first 128 bits>`, cut to
//!   the 64-character limit of PS3.5 §9.1 (a root of at most 40 characters leaves at
//!   least 23 decimal digits, ~76 bits).

use sha2::{Digest, Sha256};

use super::ReportError;

/// Maximum length of a UID (PS3.5 §9.1).
pub const UID_MAX_LEN: usize = 64;
/// Longest accepted `uid_root`, so that enough digest digits remain.
pub const ROOT_MAX_LEN: usize = 40;

/// Whether `s` is a syntactically valid UID: digits and dots, no empty component,
/// no leading zero in a multi-digit component, at most 64 characters.
pub fn is_valid_uid(s: &str) -> bool {
    if s.is_empty() || s.len() > UID_MAX_LEN {
        return false;
    }
    s.split('.').all(|c| {
        !c.is_empty()
            && c.bytes().all(|b| b.is_ascii_digit())
            && !(c.len() > 1 && c.starts_with('0'))
    })
}

/// Check a configured UID root.
pub fn validate_root(root: &str) -> Result<(), ReportError> {
    if !is_valid_uid(root) || root.len() > ROOT_MAX_LEN {
        return Err(ReportError::InvalidUidRoot(format!(
            "`{root}` is not a valid UID root (digits and dots, no leading zeros, at most {ROOT_MAX_LEN} characters)"
        )));
    }
    Ok(())
}

/// Derive a UID from its identifying parts (joined with `|`) under `root`
/// (or `2.25` when `root` is `None`).
pub fn derive_uid(root: Option<&str>, parts: &[&str]) -> Result<String, ReportError> {
    let digest = Sha256::digest(parts.join("|").as_bytes());
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    let n = u128::from_be_bytes(first);
    // A zero first byte would give fewer digits; keep the number non-zero.
    let digits = n.max(1).to_string();
    match root {
        None => Ok(format!("2.25.{digits}")),
        Some(root) => {
            validate_root(root)?;
            let room = UID_MAX_LEN - root.len() - 1;
            let cut = &digits[..digits.len().min(room)];
            Ok(format!("{root}.{cut}"))
        }
    }
}

/// Short hex digest used as a revision key (see `docs/report.md`).
pub fn short_digest(parts: &[&str]) -> String {
    let digest = Sha256::digest(parts.join("|").as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_uids_are_valid_and_stable() {
        let a = derive_uid(None, &["case", "r1", "sr", "1.2.3", "0"]).unwrap();
        let b = derive_uid(None, &["case", "r1", "sr", "1.2.3", "0"]).unwrap();
        let c = derive_uid(None, &["case", "r2", "sr", "1.2.3", "0"]).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.starts_with("2.25."));
        assert!(is_valid_uid(&a), "{a}");
    }

    #[test]
    fn rooted_uids_fit_64_chars() {
        let root = "1.2.826.0.1.3680043.10.999.123456789012";
        let u = derive_uid(Some(root), &["x"]).unwrap();
        assert!(u.len() <= 64, "{u}");
        assert!(u.starts_with(root));
        assert!(is_valid_uid(&u), "{u}");
    }

    #[test]
    fn bad_roots_are_rejected() {
        for r in ["", "1..2", "1.02", "a.b", "1.2.", &"1.".repeat(30)] {
            assert!(derive_uid(Some(r), &["x"]).is_err(), "{r}");
        }
    }

    #[test]
    fn uid_syntax() {
        assert!(is_valid_uid("1.2.840.10008.5.1.4.1.1.7"));
        assert!(is_valid_uid("2.25.0"));
        assert!(!is_valid_uid("1.2.3 "));
        assert!(!is_valid_uid("1.2.03"));
    }
}
