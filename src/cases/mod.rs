//! Patient cases across modalities: which stored instances belong together
//! (patient key, study-date window), when a case is complete enough to run
//! (stable age, max wait, partial policy), and its persisted state machine.
//!
//! States ([`CaseState`], stored by `db`): collecting → ready → queued →
//! running → done, with held (operator or `partial = "hold"`) and failed; a
//! late instance reopens a done case as a new revision. Every transition is
//! a row in `case_transitions` and a `case_state_changed` audit event.
//! Operator views and actions live in [`crate::ops`].

pub mod assembler;
pub mod rules;

pub use crate::clock::Clock;
pub use crate::db::CaseState;
pub use assembler::{Assembler, CaseJob, FetchPlan, PatientKeyMode};
pub use rules::{CaseRules, Modality, Partial};
