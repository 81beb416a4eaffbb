use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use cardeploy_release::Envelope;

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
    /// The newest report the twin has stored from this car (reports are fire-and-forget): the
    /// car sends again what it sent after it, which a twin instance that died took with it.
    /// Absent when the twin has stored none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reports_through: Option<ReportMark>,
}

/// Where a car's reports stand: (epoch, seq) of [`Report`], compared in that order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportMark {
    pub epoch: u64,
    pub seq: u64,
}

/// What the twin wants one car to run now (docs/release-format.md, docs/protocol.md): the
/// desired state the twin's director key signed for this car, the release manifest it names
/// (signed offline by the release role), every root after version 1 in order (so a car pinned to
/// an older root can rotate), and a root-signed downgrade override when an operator allowed one.
/// Nothing here is trusted as it arrives: the agent verifies all of it before acting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    pub desired: Envelope,
    pub release: Envelope,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roots: Vec<Envelope>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downgrade: Option<Envelope>,
}

/// `artifact.index` request; the answer is up to [`PAGE_BYTES`] of the index's binary encoding
/// (docs/delta.md) from `offset` on. An index of any size travels page by page: the first page
/// holds the header, which says how long the whole encoding is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexRequest {
    pub index: String,
    /// Where the page starts in the encoding; absent means 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

/// Bytes of one page of something too large for one payload (a chunk index, a large desired
/// state): one payload, less room for the frame headers of its fragments.
pub const PAGE_BYTES: u64 = (1 << 20) - 4096;

/// The largest desired state a car reads (by pages); a release and its root chain stay far
/// below it.
pub const MAX_DESIRED_BYTES: u64 = 16 << 20;

/// An item of the `car.desired` stream standing for a desired state too large for one payload
/// (a release with thousands of artifacts, a long root chain): the car reads it page by page
/// with `car.desired.page`. Smaller ones travel as the [`DesiredState`] itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PagedDesired {
    pub paged: PagedRef,
}

/// A document read page by page: the sha256 (hex) and length of its encoding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PagedRef {
    pub digest: String,
    pub size: u64,
}

/// `car.desired.page` request; the answer is up to [`PAGE_BYTES`] of the JSON encoding of the
/// car's current desired state from `offset` on (binary, no JSON wrapper).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredPageRequest {
    pub digest: String,
    pub offset: u64,
}

/// `artifact.chunks` request: chunks of `index` by position, at most [`MAX_WINDOW_CHUNKS`]
/// totalling at most [`MAX_WINDOW_BYTES`] raw. `base` names the index of an artifact the car
/// holds completely; the twin may then send deltas against ranges of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunksRequest {
    pub index: String,
    #[serde(default)]
    pub base: Option<String>,
    pub chunks: Vec<u32>,
}

/// Most chunks one `artifact.chunks` request may ask for.
pub const MAX_WINDOW_CHUNKS: usize = 64;
/// Most raw bytes one `artifact.chunks` request may ask for.
pub const MAX_WINDOW_BYTES: u64 = 16 << 20;

/// Where a download stands; sent at the start, about once a second, and at the end.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchProgress {
    pub artifact: String,
    pub index: String,
    /// Size of the artifact.
    pub planned_bytes: u64,
    /// Bytes found in the car's chunk store (fetched before an interruption, or shared).
    pub store_bytes: u64,
    /// Bytes found in seeds (the running slot, older layers).
    pub seed_bytes: u64,
    /// Raw bytes of the chunks that must come over the network.
    pub fetch_bytes: u64,
    /// Raw bytes of those received so far.
    pub fetched_bytes: u64,
    /// Payload bytes received for them (compressed, deltas).
    pub wire_bytes: u64,
    pub done: bool,
}

/// Where the agent stands with the desired state. A release that carries an OS bundle goes
/// through the A/B phases (docs/state-machines.md); one without goes from `fetching` to `applied`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Nothing desired yet.
    Idle,
    /// A desired state was received and recorded; its artifacts are being fetched.
    Fetching,
    /// A desired state was received, recorded, and everything it names is on the car.
    Applied,
    /// The last desired state could not be applied; see `last_error`.
    Failed,
    /// The OS bundle is on the car; its digest is checked again before RAUC sees it.
    Verifying,
    /// RAUC is writing the bundle into the inactive slot.
    Installing,
    /// The new slot is written and primary; the car waits for its reboot policy to allow a reboot.
    PendingReboot,
    /// The car runs the new slot, not yet committed: the health gate decides.
    Trial,
    /// The new slot passed the health gate and is marked good.
    Committed,
    /// The car is back on the previous slot; `last_error` says why (boot or health failure).
    /// The release is never installed again on its own.
    RolledBack,
}

impl Phase {
    /// The name on the wire and in the twin's views (`pending-reboot`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Fetching => "fetching",
            Self::Applied => "applied",
            Self::Failed => "failed",
            Self::Verifying => "verifying",
            Self::Installing => "installing",
            Self::PendingReboot => "pending-reboot",
            Self::Trial => "trial",
            Self::Committed => "committed",
            Self::RolledBack => "rolled-back",
        }
    }
}

/// What the agent says the car runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportedState {
    pub phase: Phase,
    /// The counter of the desired state the agent last acted on.
    pub desired_counter: Option<u64>,
    /// The scope that counter counts in (docs/release-format.md, D4a): the twin signs above it
    /// when the scope is its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counter_scope: Option<String>,
    pub release: Option<String>,
    pub last_error: Option<String>,
    /// The A/B system as RAUC sees it, on cars whose agent manages the OS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<OsReport>,
    /// The release's workloads as the car's k3s runs them, on cars whose agent applies
    /// workloads (at most [`MAX_WORKLOADS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<WorkloadReport>,
}

impl ReportedState {
    pub fn idle() -> Self {
        Self {
            phase: Phase::Idle,
            desired_counter: None,
            counter_scope: None,
            release: None,
            last_error: None,
            os: None,
            workloads: Vec::new(),
        }
    }

    /// Whether the state is within what the twin keeps for a car: at most [`MAX_WORKLOADS`]
    /// workloads, no text longer than [`MAX_REPORT_TEXT`]. A car sends what it likes; the twin
    /// drops a state outside these bounds (and says so) instead of storing it.
    pub fn check(&self) -> Result<(), String> {
        if self.workloads.len() > MAX_WORKLOADS {
            return Err(format!(
                "{} workloads; at most {MAX_WORKLOADS} are kept",
                self.workloads.len()
            ));
        }
        let texts = [self.release.as_deref(), self.last_error.as_deref()]
            .into_iter()
            .chain(self.workloads.iter().flat_map(|w| {
                [
                    Some(w.name.as_str()),
                    Some(w.release.as_str()),
                    w.last_error.as_deref(),
                ]
            }))
            .flatten();
        for text in texts {
            if text.len() > MAX_REPORT_TEXT {
                return Err(format!(
                    "a text of {} bytes; at most {MAX_REPORT_TEXT} are kept",
                    text.len()
                ));
            }
        }
        Ok(())
    }
}

/// The most workloads one reported state lists.
pub const MAX_WORKLOADS: usize = 64;
/// The longest text (a release label, an error, a workload name) a reported state carries.
pub const MAX_REPORT_TEXT: usize = 4096;

/// One workload of the release as the car's k3s runs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadReport {
    /// `Kind/name` of the object in the release's manifests (`Deployment/web`).
    pub name: String,
    /// The release it belongs to (`line@version`).
    pub release: String,
    pub phase: WorkloadPhase,
    pub ready_replicas: u32,
    pub replicas: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Where one workload stands (docs/state-machines.md, "Workloads").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadPhase {
    /// Applied; waiting for its pods to be ready.
    Starting,
    /// The new version runs beside the previous one and must stay healthy for the canary time.
    Canary,
    /// Ready (and, after a canary, promoted: the previous version is removed).
    Ready,
    /// It did not become ready in time or crash-looped; `last_error` says which.
    Failed,
    /// It failed and the previous version runs again (or never stopped).
    RolledBack,
}

impl WorkloadPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Canary => "canary",
            Self::Ready => "ready",
            Self::Failed => "failed",
            Self::RolledBack => "rolled-back",
        }
    }
}

/// The car's A/B slots and the OS update in progress.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OsReport {
    /// Bootname of the slot the car runs (`A`, `B`).
    pub booted: String,
    /// The running system's version (`VERSION_ID` of its os-release), when it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Bootname of the slot the bootloader starts next time, when known.
    pub primary: Option<String>,
    /// The agent's OS update state (docs/state-machines.md), e.g. `trial`, `rolled-back`.
    pub update: String,
    /// The release the OS update state is about (`line@version`).
    pub release: Option<String>,
    pub slots: Vec<SlotReport>,
}

/// One slot as RAUC reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotReport {
    pub name: String,
    pub bootname: Option<String>,
    /// `booted`, `active` or `inactive`.
    pub state: String,
    /// `good` or `bad`, when the bootloader knows.
    pub boot_status: Option<String>,
    /// The version of the bundle last installed into the slot.
    pub bundle_version: Option<String>,
}

/// RAUC's progress while it installs a bundle.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallProgress {
    /// `line@version` being installed.
    pub release: String,
    pub percentage: i32,
    pub message: String,
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
    /// A download's progress.
    Progress { progress: FetchProgress },
    /// An OS installation's progress (RAUC's own steps and percentage).
    Install { progress: InstallProgress },
    /// Where the car is, rounded on the car to its configured precision; sent when that rounded
    /// position changes (and again at each new session).
    Position { position: Position },
}

/// A position in microdegrees (WGS 84): what the car reports, already rounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Position {
    pub lat_e6: i32,
    pub lon_e6: i32,
}

impl Position {
    /// From degrees, rounded to `decimals` (0–6) decimal places: 2 is about a kilometre.
    pub fn rounded(lat: f64, lon: f64, decimals: u32) -> Option<Self> {
        if !(lat.is_finite() && lon.is_finite()) || lat.abs() > 90.0 || lon.abs() > 180.0 {
            return None;
        }
        let step = 10f64.powi(6 - decimals.min(6) as i32);
        let e6 = |deg: f64| ((deg * 1e6 / step).round() * step) as i32;
        Some(Self {
            lat_e6: e6(lat),
            lon_e6: e6(lon),
        })
    }

    /// Whether it is a position on Earth (a car sends what it likes).
    pub fn check(&self) -> Result<(), String> {
        if self.lat_e6.abs() > 90_000_000 || self.lon_e6.abs() > 180_000_000 {
            return Err(format!(
                "({}, {}) microdegrees is not on Earth",
                self.lat_e6, self.lon_e6
            ));
        }
        Ok(())
    }

    /// (latitude, longitude) in degrees.
    pub fn degrees(&self) -> (f64, f64) {
        (f64::from(self.lat_e6) / 1e6, f64::from(self.lon_e6) / 1e6)
    }
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

#[cfg(test)]
mod position_tests {
    use super::Position;

    #[test]
    fn positions_are_rounded_on_the_car_and_checked_on_the_twin() {
        // Munich, Marienplatz, to about a kilometre and to about a hundred metres.
        let p = Position::rounded(48.137_154, 11.575_382, 2).unwrap();
        assert_eq!(
            p,
            Position {
                lat_e6: 48_140_000,
                lon_e6: 11_580_000
            }
        );
        assert_eq!(p.degrees(), (48.14, 11.58));
        let p = Position::rounded(48.137_154, 11.575_382, 3).unwrap();
        assert_eq!(
            p,
            Position {
                lat_e6: 48_137_000,
                lon_e6: 11_575_000
            }
        );
        assert_eq!(
            Position::rounded(-33.868_82, 151.209_29, 6).unwrap(),
            Position {
                lat_e6: -33_868_820,
                lon_e6: 151_209_290
            }
        );
        assert!(Position::rounded(91.0, 0.0, 2).is_none());
        assert!(Position::rounded(f64::NAN, 0.0, 2).is_none());
        assert!(
            Position {
                lat_e6: 0,
                lon_e6: 180_000_001
            }
            .check()
            .is_err()
        );
        assert!(
            Position {
                lat_e6: -90_000_000,
                lon_e6: 180_000_000
            }
            .check()
            .is_ok()
        );
    }
}
