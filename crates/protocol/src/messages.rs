use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{CarId, Error};

/// Car attributes used by selectors: `key=value` labels in the Kubernetes style.
pub type Attributes = BTreeMap<String, String>;

/// Check one attribute the way Kubernetes checks label keys and values (simplified: no prefix
/// part): keys 1–63, values 0–63 characters of alphanumerics and `-_.`, starting and ending
/// alphanumeric.
pub fn validate_attribute(key: &str, value: &str) -> Result<(), Error> {
    fn label_ok(s: &str) -> bool {
        s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
            && s.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
    }
    if key.is_empty() || !label_ok(key) {
        return Err(Error::InvalidAttribute {
            key: key.to_owned(),
            why: "keys are 1-63 characters of A-Z a-z 0-9 - _ ., starting and ending alphanumeric",
        });
    }
    if !label_ok(value) {
        return Err(Error::InvalidAttribute {
            key: key.to_owned(),
            why: "values are 0-63 characters of A-Z a-z 0-9 - _ ., starting and ending alphanumeric",
        });
    }
    Ok(())
}

/// Data of the RSocket SETUP frame the agent sends. With mutual TLS the twin takes the car's
/// identity from its certificate, never from here; `car_id` is used only with
/// `--insecure-plaintext` during local development.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetupData {
    pub car_id: CarId,
    pub agent_version: String,
}

/// `car.hello` request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub agent_version: String,
    pub reported: ReportedState,
}

/// `car.hello` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelloReply {
    /// The identity the twin authenticated (from the car's certificate).
    pub car_id: CarId,
    /// What the car should run now, if the twin wants anything.
    pub desired: Option<DesiredState>,
    /// The heartbeat interval the twin expects, in seconds.
    pub heartbeat_secs: u64,
}

/// What the twin wants one car to run now. Until signed releases exist (docs/release-format.md),
/// `release` is a reference to a release by name and version, e.g. `infotainment@1.4.2`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    pub car_id: CarId,
    /// Grows by one with every change for this car; the agent ignores anything not above the
    /// counter it has already seen.
    pub counter: u64,
    pub release: String,
    /// Unix seconds.
    pub issued_at: u64,
}

/// Where the agent stands with the desired state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Nothing desired yet.
    Idle,
    /// A desired state was received and recorded.
    Applied,
    /// The last desired state could not be applied; see `last_error`.
    Failed,
}

/// What the agent says the car runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportedState {
    pub phase: Phase,
    /// The counter of the desired state the agent last acted on.
    pub desired_counter: Option<u64>,
    pub release: Option<String>,
    pub last_error: Option<String>,
}

impl ReportedState {
    pub fn idle() -> Self {
        Self {
            phase: Phase::Idle,
            desired_counter: None,
            release: None,
            last_error: None,
        }
    }
}

/// `car.report` payload: fire-and-forget, so it carries a sequence number the twin deduplicates
/// on. `seq` grows strictly within one agent epoch; the epoch grows with every agent start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub epoch: u64,
    pub seq: u64,
    /// Unix seconds on the car's clock.
    pub at: u64,
    pub body: ReportBody,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ReportBody {
    /// The agent's whole reported state after a change.
    State { state: ReportedState },
    /// Something worth a line in the car's event log.
    Event { kind: String, message: String },
}

/// `car.heartbeat` request and answer: nothing but liveness.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {}

/// `twin.inspect` answer: the agent's live view of itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inspection {
    pub agent_version: String,
    pub reported: ReportedState,
    pub desired: Option<DesiredState>,
    /// Seconds since the agent started.
    pub uptime_secs: u64,
}
