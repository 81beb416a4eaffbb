//! The views of the twin's operator REST API (`/api/v1/...`), defined once: the twin serializes
//! them and the `cardeploy` CLI (and the test harnesses) deserialize them, so a renamed field is
//! a compile error on both sides instead of a `null` the CLI prints. docs/architecture.md
//! describes the routes.
//!
//! Requests reject unknown fields, like every message of this crate (a typo in a client is an
//! error). Answers do not: a twin that shows one field more must not break an older CLI.

use serde::{Deserialize, Serialize};

use crate::{Attributes, CarId, Envelope, FetchProgress, InstallProgress, ReportedState};

/// `POST /api/v1/cars`: register a car, or give a revoked one a new certificate.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCar {
    pub id: String,
    #[serde(default)]
    pub attributes: Attributes,
    /// The car's client certificate (PEM), issued by the fleet CA.
    pub certificate_pem: String,
}

/// Whether the twin takes a car's certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CertificateState {
    Active,
    /// Refused at every handshake until the car is re-provisioned with a new certificate.
    Revoked,
}

impl CertificateState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Revoked => "revoked",
        }
    }
}

/// One car's twin: `GET /api/v1/cars/{id}`, each of `GET /api/v1/cars`, and the answer to
/// registration and revocation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CarView {
    pub id: CarId,
    pub attributes: Attributes,
    /// SHA-256 of the car's current certificate (the revoked one while `revoked_at` is set).
    pub fingerprint: String,
    pub certificate: CertificateState,
    pub revoked_at: Option<i64>,
    pub connected: bool,
    /// With several twin instances: the one the car is connected to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_to: Option<String>,
    pub desired: Option<DesiredView>,
    pub reported: Option<ReportedView>,
    /// The last download progress the car reported since the twin started.
    pub progress: Option<FetchProgress>,
    /// The last OS installation progress the car reported since the twin started.
    pub install: Option<InstallProgress>,
    /// Reports dropped over the rate limit since the twin started.
    pub dropped_reports: u64,
    /// Where the car last said it was (rounded on the car), if it ever did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<PositionView>,
}

/// A car's last reported position, in degrees, and when it was reported (unix seconds).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PositionView {
    pub lat: f64,
    pub lon: f64,
    pub at: i64,
}

impl CarView {
    /// What the car last reported, if it ever did.
    pub fn state(&self) -> Option<&ReportedState> {
        self.reported.as_ref().map(|r| &r.state)
    }
}

/// What a car last reported, with the numbering that orders its reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReportedView {
    pub state: ReportedState,
    pub epoch: i64,
    pub seq: i64,
    pub agent_version: Option<String>,
    pub updated_at: i64,
    pub last_seen: i64,
}

/// `PUT /api/v1/cars/{id}/desired`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetDesired {
    /// The release: its digest (64 hex) or `line@version`, registered with
    /// `POST /api/v1/releases` (`cardeploy release push`).
    pub release: String,
    /// How long the signed desired state stays valid; default the twin's `desired_ttl_secs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// A root-signed downgrade override, when the release is older than what the car runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downgrade: Option<Envelope>,
}

/// What the API shows of a car's signed desired state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DesiredView {
    pub counter: u64,
    pub release: String,
    pub line: Option<String>,
    pub version: Option<String>,
    pub issued: u64,
    pub expires: u64,
    pub downgrade: bool,
}

/// One event of a car's log.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventView {
    /// Grows with every event of the twin; `before` in a page request.
    pub id: i64,
    pub at: i64,
    pub kind: String,
    pub message: String,
}

/// `GET /api/v1/cars/{id}/events`: one page of a car's events, oldest first.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventsPage {
    pub events: Vec<EventView>,
    /// `before` of the next, older page; `null` on the oldest one.
    pub next_before: Option<i64>,
}

/// `GET /api/v1/director`: the twin's director key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DirectorView {
    pub keyid: String,
    pub public: cardeploy_release::PublicKey,
}

/// The answer to `POST /api/v1/roots`: the root version the twin took.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RootAccepted {
    pub version: u64,
}

/// A registered release: each of `GET /api/v1/releases`, and the answer to
/// `POST /api/v1/releases`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseSummary {
    pub digest: String,
    pub line: String,
    pub version: String,
    pub compatible: String,
    pub created: u64,
    pub artifacts: usize,
}

/// `GET /api/v1/releases/{digest or line@version}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReleaseView {
    pub summary: ReleaseSummary,
    pub envelope: Envelope,
}

/// `POST /api/v1/chunks/missing`: which of these chunks (sha256 hex) does the twin lack?
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkList {
    pub chunks: Vec<String>,
}

/// The answer to [`ChunkList`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MissingChunks {
    pub missing: Vec<String>,
}

/// A chunk index the twin holds: `PUT` and `GET /api/v1/indexes/{id}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IndexView {
    pub index: String,
    pub artifact: String,
    pub size: u64,
    pub chunks: usize,
}

/// `GET /api/v1/deltas`: the delta work of the twin (docs/delta.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltasView {
    /// (target, base) pairs whose deltas are being made ahead of the cars, waiting or running.
    pub ahead_pending: usize,
    /// Pairs made ahead completely, and chunks made ahead, since the twin started.
    pub ahead_pairs: u64,
    pub ahead_chunks: u64,
    /// Bytes the delta cache holds.
    pub cache_bytes: u64,
}

/// One phase of a deployment as an operator asks for it: a number of cars or a share of the
/// selected cars (cumulative: each phase reaches at least as far as the one before), and the
/// time it must stay good before the next starts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cars: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    #[serde(default)]
    pub soak_secs: u64,
}

/// `POST /api/v1/deployments`: one release to the cars a selector (and a geofence) picks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewDeployment {
    pub name: String,
    /// A release digest, or `line@version`.
    pub release: String,
    /// Label selector over car attributes (empty: every car).
    #[serde(default)]
    pub selector: String,
    /// GeoJSON (multi)polygons over the cars' last reported positions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub geofence: Option<serde_json::Value>,
    pub phases: Vec<PhaseRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_starts_per_minute: Option<u32>,
    /// Share (0–1) of a phase's cars failing that halts the deployment.
    pub failure_threshold: f64,
    /// Share (0–1) of a phase's cars that must succeed before the next phase.
    pub success_threshold: f64,
    /// Time-to-live, seconds from now.
    pub ttl_secs: u64,
    /// Abort the running deployments that select any of the same cars, instead of refusing.
    #[serde(default)]
    pub supersede: bool,
}

/// `POST /api/v1/deployments/preview`: which cars a selector and geofence pick now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewRequest {
    #[serde(default)]
    pub selector: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub geofence: Option<serde_json::Value>,
}

/// The answer to [`PreviewRequest`]: the number of cars, and their ids (the first 1,000).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviewView {
    pub total: usize,
    pub cars: Vec<CarId>,
}

/// One phase of a deployment as it stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseView {
    /// Cars the phase reaches, cumulative, among the cars selected now.
    pub target: u64,
    /// What it adds to the phase before.
    pub group: u64,
    pub started: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub soak_secs: u64,
}

/// A car of a deployment that failed, with what it said.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedCar {
    pub car: String,
    pub error: Option<String>,
}

/// `GET /api/v1/deployments/{name}` (and each entry of the list).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeploymentView {
    pub name: String,
    pub release: String,
    pub line: String,
    pub version: String,
    pub selector: String,
    pub geofence: bool,
    /// `running`, `paused`, `halted`, `completed`, `aborted` or `expired`.
    pub state: String,
    /// Why it halted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Once expired: the selected cars it never started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub never_reached: Option<u64>,
    /// The current phase, from 1.
    pub phase: usize,
    pub phases: Vec<PhaseView>,
    pub selected: u64,
    pub started: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// The failed cars (the first 20) and their errors.
    pub failures: Vec<FailedCar>,
    pub failure_threshold: f64,
    pub success_threshold: f64,
    pub max_starts_per_minute: Option<u32>,
    pub created_at: i64,
    pub updated_at: i64,
    pub expires_at: u64,
    /// Its log, newest last (the last 20 lines).
    pub events: Vec<EventView>,
    /// (artifact, base) pairs of the release's deltas still being made ahead of the cars; the
    /// first car starts once they are done.
    #[serde(default)]
    pub deltas_ahead_pending: usize,
}
