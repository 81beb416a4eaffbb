//! The OS update's vocabulary: its persisted state, the facts and limits the machine decides
//! on, the effects it asks for and their outcomes. The decisions are in `super::machine`.

use cardeploy_chunks::Digest;
use cardeploy_protocol::Phase;
use serde::{Deserialize, Serialize};

use crate::release::ReleaseRef;

/// A slot as the bootloader names it (RAUC's `bootname`, e.g. `A`): what the car boots.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Bootname(pub String);

impl std::fmt::Display for Bootname {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Bootname {
    fn from(name: &str) -> Self {
        Self(name.to_owned())
    }
}

impl From<String> for Bootname {
    fn from(name: String) -> Self {
        Self(name)
    }
}

impl PartialEq<str> for Bootname {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl Bootname {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a trial waits for before the slot is marked good.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TrialGate {
    /// The OS health checks (all a release without workloads waits for).
    #[default]
    Os,
    /// The OS checks passed; the release's workloads start on this slot and must be promoted.
    /// The deadline is for them to start; once started, their rollout's own deadline and canary
    /// time bound the wait.
    Workloads,
    /// Both are healthy: the slot is being marked good (the deadline bounds RAUC's refusals).
    Commit,
}

impl TrialGate {
    fn is_os(&self) -> bool {
        *self == Self::Os
    }
}

/// How the workloads of the release on trial stand, as the OS trial sees them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkloadsGate {
    /// The release carries no workloads for this car (or the car runs none): the OS decides
    /// alone.
    NotPart,
    /// Not started yet (they wait for the OS checks, or for k3s).
    NotStarted,
    /// Starting or proving themselves as a canary (or cleaning up after the verdict).
    Running,
    /// Promoted.
    Ready,
    /// Rolled back, with the reason.
    RolledBack(String),
}

/// Why the car is back on the previous slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum RollbackReason {
    /// The new slot never came up: the bootloader ran out of tries and started the old one.
    BootFailure { detail: String },
    /// The new slot came up but failed the health gate; the agent marked it bad.
    HealthFailure { detail: String },
}

impl std::fmt::Display for RollbackReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BootFailure { detail } => write!(f, "boot failure: {detail}"),
            Self::HealthFailure { detail } => write!(f, "health failure: {detail}"),
        }
    }
}

/// Where the OS update stands. Persisted (state.json) before every effect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "state", rename_all = "kebab-case", deny_unknown_fields)]
pub enum OsUpdate {
    /// No OS update asked for since the agent was installed.
    #[default]
    Idle,
    /// The release's bundle is being fetched (the fetch job does that; the machine waits).
    Fetching { release: ReleaseRef },
    /// The bundle is on the car: check its digest again before RAUC sees it.
    Verifying { release: ReleaseRef },
    /// RAUC installs into the inactive slot. `attempt` counts installs started for this release:
    /// an agent killed mid-install finds this state and starts again, at most `max_installs`.
    Installing { release: ReleaseRef, attempt: u32 },
    /// Slot `to` is written and primary; waiting for the reboot policy. `boot_id` is the boot
    /// the install happened in: a different one means the car rebooted.
    PendingReboot {
        release: ReleaseRef,
        from: Bootname,
        to: Bootname,
        boot_id: String,
    },
    /// Running slot `to`, not committed. `boots` counts boots into it during the trial.
    Trial {
        release: ReleaseRef,
        from: Bootname,
        to: Bootname,
        boot_id: String,
        /// Unix seconds: what `gate` waits for must happen before this.
        deadline: u64,
        boots: u32,
        /// What the trial waits for (a release that also carries workloads commits only when
        /// both are healthy).
        #[serde(default, skip_serializing_if = "TrialGate::is_os")]
        gate: TrialGate,
    },
    /// Slot `to` failed the health gate. `marked` once RAUC marked it bad; then the car
    /// reboots (when the policy allows) and the bootloader starts `from`.
    MarkedBad {
        release: ReleaseRef,
        from: Bootname,
        to: Bootname,
        boot_id: String,
        why: String,
        marked: bool,
    },
    /// The release runs on slot `slot`, marked good.
    Committed { release: ReleaseRef, slot: Bootname },
    /// Back on slot `slot`; the release is never installed again on its own.
    RolledBack {
        release: ReleaseRef,
        slot: Bootname,
        reason: RollbackReason,
    },
    /// The release could not be installed. `retry`: a newer desired state (higher counter) for
    /// the same release may try again (a bundle damaged on disk); otherwise only a new release.
    Failed {
        release: ReleaseRef,
        error: String,
        retry: bool,
        counter: u64,
    },
}

/// The OS part of the agent's persistent state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OsRecord {
    pub update: OsUpdate,
    /// Releases this car will not install again on its own (rolled back, or failed for a
    /// reason retrying cannot fix). Newest last; bounded by [`REFUSED_KEPT`].
    #[serde(default)]
    pub refused: heapless::Vec<Digest, REFUSED_KEPT>,
    /// The boot id in which the booted slot was last marked good. Boot-counting bootloaders
    /// (U-Boot's `BOOT_x_LEFT`) count every boot down until someone marks the slot good: the
    /// agent does that once per boot, after the health checks pass.
    #[serde(default)]
    pub confirmed_boot: Option<String>,
}

/// How many refused release digests are remembered.
pub const REFUSED_KEPT: usize = 64;

impl OsRecord {
    pub fn refuse(&mut self, digest: &Digest) {
        if self.refused.contains(digest) {
            return;
        }
        if self.refused.is_full() {
            // The oldest goes: the newest failures are the ones the twin may still send.
            self.refused.remove(0);
        }
        // Room was made above.
        let _ = self.refused.push(*digest);
    }
}

/// The OS release the accepted desired state asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub release: ReleaseRef,
    /// The desired state's counter (a newer one may retry a retryable failure).
    pub counter: u64,
    /// Every artifact of the release is on the car.
    pub ready: bool,
}

/// What the reboot policy says right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RebootGate {
    Allowed,
    /// Not now; the reason says until when or what is awaited.
    NotYet(String),
}

/// The health gate's verdict in this boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Not run yet in this boot, or still failing with time left: what is still missing.
    Pending(String),
    Pass,
    /// Failed for good (a check that cannot recover, or the deadline passed).
    Fail(String),
}

/// What the driver knows about the car right now.
#[derive(Clone, Debug)]
pub struct Facts {
    /// The kernel's boot id: changes with every boot.
    pub boot_id: String,
    /// Bootname of the running slot (RAUC's `BootSlot`).
    pub booted: Bootname,
    /// RAUC is not installing anything.
    pub rauc_idle: bool,
    pub now: u64,
    pub reboot: RebootGate,
    pub health: Health,
    /// The booted slot was marked good in this boot already.
    pub boot_confirmed: bool,
    /// The workloads of the release on trial.
    pub workloads: WorkloadsGate,
}

/// Limits that break loops.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Installs started for one release before it fails for good.
    pub max_installs: u32,
    /// Boots into the new slot during its trial before the agent gives up on it.
    pub max_trial_boots: u32,
    /// Seconds the health gate has after each boot into the new slot.
    pub health_deadline_secs: u64,
}

/// The effect the driver performs next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing to do until something changes (a desired state, a finished fetch, a timer).
    Wait,
    /// Hash the bundle again and compare with the release.
    Verify,
    /// RAUC is busy with an install this agent did not start (or lost track of): wait for idle.
    WaitRaucIdle,
    /// `InstallBundle`.
    Install,
    /// Mark the booted slot active again so the written one is not started: an install is
    /// abandoned for a newer release.
    Abandon,
    /// Reboot through the init system.
    Reboot,
    /// Waiting for the reboot policy.
    WaitReboot(String),
    /// Run the health checks (again) until the deadline.
    CheckHealth { deadline: u64 },
    /// `Mark good booted`.
    MarkGood,
    /// `Mark bad booted`.
    MarkBad,
    /// `Mark bad other`: the slot the bootloader gave up on is never started again.
    MarkOtherBad,
    /// The state changed and must be reported; no other effect.
    Report,
    /// `Mark good booted` outside an update: this boot of a settled slot is healthy (resets the
    /// bootloader's boot counter).
    ConfirmBoot,
}

/// The next state (persist it first) and the effect to perform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub next: OsUpdate,
    pub action: Action,
}

pub(super) fn step(next: OsUpdate, action: Action) -> Step {
    Step { next, action }
}

impl OsUpdate {
    /// The release this state is about.
    pub fn release(&self) -> Option<&ReleaseRef> {
        match self {
            Self::Idle => None,
            Self::Fetching { release }
            | Self::Verifying { release }
            | Self::Installing { release, .. }
            | Self::PendingReboot { release, .. }
            | Self::Trial { release, .. }
            | Self::MarkedBad { release, .. }
            | Self::Committed { release, .. }
            | Self::RolledBack { release, .. }
            | Self::Failed { release, .. } => Some(release),
        }
    }

    /// The phase the twin sees.
    pub fn phase(&self) -> Phase {
        match self {
            Self::Idle => Phase::Idle,
            Self::Fetching { .. } => Phase::Fetching,
            Self::Verifying { .. } => Phase::Verifying,
            Self::Installing { .. } => Phase::Installing,
            Self::PendingReboot { .. } => Phase::PendingReboot,
            Self::Trial { .. } | Self::MarkedBad { .. } => Phase::Trial,
            Self::Committed { .. } => Phase::Committed,
            Self::RolledBack { .. } => Phase::RolledBack,
            Self::Failed { .. } => Phase::Failed,
        }
    }

    /// Short name for reports and logs (as serialized).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Fetching { .. } => "fetching",
            Self::Verifying { .. } => "verifying",
            Self::Installing { .. } => "installing",
            Self::PendingReboot { .. } => "pending-reboot",
            Self::Trial { .. } => "trial",
            Self::MarkedBad { .. } => "marked-bad",
            Self::Committed { .. } => "committed",
            Self::RolledBack { .. } => "rolled-back",
            Self::Failed { .. } => "failed",
        }
    }

    /// The error or rollback reason a person should read.
    pub fn problem(&self) -> Option<String> {
        match self {
            Self::RolledBack { reason, .. } => Some(format!("rolled back: {reason}")),
            Self::Failed { error, .. } => Some(error.clone()),
            Self::MarkedBad { why, .. } => Some(format!("health gate failed: {why}")),
            _ => None,
        }
    }

    /// A slot transaction is under way that must finish before another release is taken up:
    /// the car runs (or is about to run) an uncommitted slot.
    pub(super) fn in_transaction(&self) -> bool {
        matches!(
            self,
            Self::Installing { .. } | Self::Trial { .. } | Self::MarkedBad { .. }
        )
    }
}

/// The result of an effect, as the driver saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Verified,
    /// The bundle on disk is not the release's (damaged or replaced): fetch it again.
    VerifyFailed(String),
    /// Installed; `to` is the bootname RAUC made primary.
    Installed {
        from: Bootname,
        to: Bootname,
        boot_id: String,
    },
    /// RAUC refused or failed the bundle (signature, compatible, a write error): retrying the
    /// same bundle cannot help.
    InstallRefused(String),
    /// The install did not finish (RAUC vanished, a deadline): the next attempt may succeed.
    InstallInterrupted(String),
    Abandoned,
    MarkedGood,
    MarkedBad,
    /// A mark or reboot call failed; the state stays and the step is tried again.
    EffectFailed(String),
}
