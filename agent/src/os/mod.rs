//! OS updates through RAUC: the A/B state machine ([`machine`], pure), the configuration and
//! its pure policies ([`policy`]), and the driver that performs the effects (`driver`).
//! docs/state-machines.md is the transition table.

pub(crate) mod driver;
pub mod machine;
pub mod policy;

pub use machine::{OsRecord, OsUpdate, RollbackReason};
pub use policy::{HealthConfig, K3sCheck, OsConfig, RebootPolicy};
