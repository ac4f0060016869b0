//! DICOMweb (PS3.18): the multipart/related bodies ([`multipart`]), the
//! DICOM JSON model and the STOW-RS response ([`json`]), and the node's
//! client for QIDO-RS, WADO-RS and STOW-RS ([`client`]). The server side
//! (STOW-RS in) is a route of `http`, on the same multipart and JSON code.

pub mod client;
pub mod json;
pub mod multipart;

pub use client::{DicomWebClient, DicomWebError};
pub use json::{StowFailed, StowResponse, StowStored, json_string, json_strings};
