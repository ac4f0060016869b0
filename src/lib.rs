//! her2map: a DICOM-native PACS integration node that receives breast imaging
//! (MG, US, MR), keeps it durably, and runs the HER2 MAP model on it.
//!
//! The layers, each owning one seam: [`dimse`] (network), [`ingest`]
//! (C-STORE handling), [`spool`] (files), [`db`] (all SQL), [`app`] (wiring).

pub mod app;
pub mod attrs;
pub mod audit_limit;
pub mod batch;
pub mod cases;
pub mod clock;
pub mod config;
pub mod db;
pub mod demo;
pub mod dicomweb;
pub mod dimse;
pub mod durable;
pub mod evaluate;
pub mod fetch;
pub mod header;
pub mod http;
pub mod imaging;
pub mod inference;
pub mod ingest;
pub mod metrics;
pub mod modality;
pub mod model;
pub mod ops;
pub mod outbox;
pub mod part10;
pub mod pipeline;
pub mod report;
pub mod send;
pub mod side;
pub mod spool;
pub mod synth;
pub mod worker;
