//! The integration tests, as one test binary with a module per area (as
//! zero2prod does): the node and its dependencies are linked once instead
//! of once per file. Run one area with `cargo test --test it cases::`.
//! Each area starts the real node on port 0 and talks to it with real peers
//! (DCMTK, Orthanc, the node's own SCU): see each module's header.

mod common;

mod artim;
mod bad_input;
mod batch;
mod cases;
mod cli;
mod console;
mod console_pages;
mod dicomweb;
mod engine;
mod evaluate;
mod faults;
mod fetch;
mod https;
mod imaging_real_files;
mod imaging_resize;
mod imaging_settings;
mod load;
mod multinode;
mod nodes;
mod openapi;
mod orthanc;
mod outbox;
mod parity;
mod pipeline;
mod powercut;
mod report_outputs;
mod scp;
mod synth_patient;
mod tls;
mod viewer;
