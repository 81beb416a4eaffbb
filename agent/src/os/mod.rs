//! OS updates through RAUC: the A/B state machine ([`machine`], pure, with its vocabulary in
//! [`update`]), the configuration and its pure policies ([`policy`]), and the driver that
//! performs the effects (`driver`, with `observe`, `effects` and `health`), which reaches the
//! rest of the agent only through its `host`. docs/state-machines.md is the transition table.

pub(crate) mod driver;
mod effects;
mod health;
pub(crate) mod host;
pub mod machine;
mod observe;
pub mod policy;
pub mod update;

pub(crate) use observe::connect;
pub use policy::{HealthConfig, K3sCheck, OsConfig, RebootPolicy};
pub use update::{OsRecord, OsUpdate, RollbackReason, TrialGate, WorkloadsGate};
