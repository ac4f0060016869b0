//! The DICOM network layer: association handling on dicom-ul, DIMSE command
//! sets and statuses, the negotiation policy, the SCP and the SCU. It knows
//! nothing of disk, SQL or the model: instance bytes cross into the node
//! through [`server::StoreService`].

pub mod client;
pub mod command;
pub mod server;
pub mod sop;
pub mod tls;
