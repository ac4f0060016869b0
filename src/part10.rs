//! The DICOM Part 10 file layout (PS3.10 7.1): 128-byte preamble, `DICM`,
//! the File Meta Information group, then the data set exactly as it was
//! encoded on the wire. One place for both directions: the spool writes
//! headers in front of received data sets, the SCU finds the data set to send.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use dicom_object::meta::FileMetaTableBuilder;

/// Implementation Class UID of her2map (a UUID-derived 2.25 root, PS3.5 B.2).
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.164113538461720466427829373105632018931";
/// Implementation Version Name (PS3.7 D.3.3.2.2), at most 16 characters.
pub const IMPLEMENTATION_VERSION_NAME: &str = concat!("HER2MAP_", env!("CARGO_PKG_VERSION"));

#[derive(Debug, thiserror::Error)]
pub enum Part10Error {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a DICOM Part 10 file: {0}")]
    NotPart10(String),
    #[error("file meta group could not be built: {0}")]
    Meta(String),
}

/// What a Part 10 file says about itself, and where its data set starts.
#[derive(Debug, Clone)]
pub struct Part10Header {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax: String,
    /// Byte offset of the data set (after preamble and meta group).
    pub dataset_offset: u64,
    /// Length of the data set in bytes.
    pub dataset_len: u64,
}

impl Part10Header {
    /// Read the header of a Part 10 file without reading its data set.
    pub fn read(path: &Path) -> Result<Self, Part10Error> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        let mut preamble = [0u8; 128];
        file.read_exact(&mut preamble)
            .map_err(|_| Part10Error::NotPart10("shorter than the preamble".into()))?;
        let meta = dicom_object::meta::FileMetaTable::from_reader(&mut file)
            .map_err(|e| Part10Error::NotPart10(e.to_string()))?;
        // 12 bytes for (0002,0000) UL itself, then the group it measures.
        let dataset_offset = 128 + 4 + 12 + u64::from(meta.information_group_length);
        if dataset_offset > len {
            return Err(Part10Error::NotPart10(
                "meta group length beyond end of file".into(),
            ));
        }
        file.seek(SeekFrom::Start(dataset_offset))?;
        Ok(Part10Header {
            sop_class_uid: meta.media_storage_sop_class_uid().to_string(),
            sop_instance_uid: meta.media_storage_sop_instance_uid().to_string(),
            transfer_syntax: meta.transfer_syntax().to_string(),
            dataset_offset,
            dataset_len: len - dataset_offset,
        })
    }
}

impl Part10Header {
    /// The same from the bytes of a whole file held in memory (a STOW-RS
    /// part).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Part10Error> {
        let len = bytes.len() as u64;
        if bytes.len() < 132 {
            return Err(Part10Error::NotPart10("shorter than the preamble".into()));
        }
        let mut rest = &bytes[128..];
        let meta = dicom_object::meta::FileMetaTable::from_reader(&mut rest)
            .map_err(|e| Part10Error::NotPart10(e.to_string()))?;
        let dataset_offset = 128 + 4 + 12 + u64::from(meta.information_group_length);
        if dataset_offset > len {
            return Err(Part10Error::NotPart10(
                "meta group length beyond end of file".into(),
            ));
        }
        Ok(Part10Header {
            sop_class_uid: meta.media_storage_sop_class_uid().to_string(),
            sop_instance_uid: meta.media_storage_sop_instance_uid().to_string(),
            transfer_syntax: meta.transfer_syntax().to_string(),
            dataset_offset,
            dataset_len: len - dataset_offset,
        })
    }
}

/// Encode preamble, magic and File Meta Information for a data set received
/// with the given identity and transfer syntax.
pub fn encode_header(
    sop_class_uid: &str,
    sop_instance_uid: &str,
    transfer_syntax: &str,
    source_ae: &str,
) -> Result<Vec<u8>, Part10Error> {
    let mut builder = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(sop_class_uid)
        .media_storage_sop_instance_uid(sop_instance_uid)
        .transfer_syntax(transfer_syntax)
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(IMPLEMENTATION_VERSION_NAME);
    if !source_ae.is_empty() {
        builder = builder.source_application_entity_title(source_ae);
    }
    let meta = builder
        .build()
        .map_err(|e| Part10Error::Meta(e.to_string()))?;
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    meta.write(&mut out)
        .map_err(|e| Part10Error::Meta(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.dcm");
        let mut bytes = encode_header("1.2.3", "1.2.3.4", "1.2.840.10008.1.2.1", "SCU").unwrap();
        let offset = bytes.len() as u64;
        bytes.extend_from_slice(&[1, 2, 3, 4]);
        std::fs::write(&path, &bytes).unwrap();
        let h = Part10Header::read(&path).unwrap();
        assert_eq!(h.sop_class_uid, "1.2.3");
        assert_eq!(h.sop_instance_uid, "1.2.3.4");
        assert_eq!(h.transfer_syntax, "1.2.840.10008.1.2.1");
        assert_eq!(h.dataset_offset, offset);
        assert_eq!(h.dataset_len, 4);
        let b = Part10Header::from_bytes(&bytes).unwrap();
        assert_eq!(b.dataset_offset, offset);
        assert_eq!(b.transfer_syntax, h.transfer_syntax);
        assert!(Part10Header::from_bytes(&bytes[..100]).is_err());
        assert!(Part10Header::from_bytes(b"not dicom at all").is_err());
    }
}
