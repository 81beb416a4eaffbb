//! The deployment state machine: where the accepted release stands as a whole. Pure, no I/O:
//! the deployment driver (`super`) hands it events and persists what [`decide`] returns before
//! anything follows from it. Workload parts (the OS today) work on the release while it is
//! `applying`; their own machines say how (`crate::os::machine`). docs/state-machines.md is the
//! transition table; the tests below walk every row of it.

use cardeploy_protocol::Phase;
use serde::{Deserialize, Serialize};

use crate::containers::rollout::Rollout;
use crate::os::OsUpdate;
use crate::release::ReleaseRef;

/// Where the accepted release stands. Persisted (state.json) before anything follows from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "state", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Deployment {
    /// No desired state accepted yet.
    #[default]
    Idle,
    /// Accepted; artifacts the car lacks are being fetched. `stalled` says why the fetch waits
    /// (a full disk) — it goes on by itself.
    Fetching {
        release: ReleaseRef,
        stalled: Option<String>,
    },
    /// Every artifact is on the car; the workload parts (the OS) apply it.
    Applying { release: ReleaseRef },
    /// Nothing is left to do for the release: on the car with no part to apply it, or every
    /// part settled (the OS committed, rolled back or failed: its state says which).
    Done { release: ReleaseRef },
    /// The release cannot be brought onto the car (the fetch failed); a desired state signed
    /// again for it tries again.
    Failed { release: ReleaseRef, error: String },
}

/// What happened to the deployment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A desired state naming `release` was verified and accepted. `missing`: artifacts are not
    /// on the car yet; `parts`: a workload part applies the release; `failed`: what the car
    /// reports for the current release is a failure (a new signature of it tries again).
    Accepted {
        release: ReleaseRef,
        missing: bool,
        parts: bool,
        failed: bool,
    },
    /// Every artifact is on the car now.
    Fetched { parts: bool },
    /// The fetch waits (for room on the disk); it goes on by itself.
    FetchStalled(String),
    /// The fetch failed for a reason waiting does not fix.
    FetchFailed(String),
    /// Every part working on the release settled.
    PartsSettled,
}

impl Deployment {
    pub fn release(&self) -> Option<&ReleaseRef> {
        match self {
            Self::Idle => None,
            Self::Fetching { release, .. }
            | Self::Applying { release }
            | Self::Done { release }
            | Self::Failed { release, .. } => Some(release),
        }
    }

    /// Short name for logs (as serialized).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Fetching { .. } => "fetching",
            Self::Applying { .. } => "applying",
            Self::Done { .. } => "done",
            Self::Failed { .. } => "failed",
        }
    }
}

/// The next deployment state. Events that do not concern the current state (a fetch outcome
/// after a newer release replaced the one fetched) leave it as it is.
pub fn decide(current: &Deployment, event: Event) -> Deployment {
    match (current, event) {
        (
            _,
            Event::Accepted {
                release,
                missing,
                parts,
                failed,
            },
        ) => {
            // The same release signed again (a refresh before expiry): only the counter moves.
            if current.release() == Some(&release) && !failed {
                return current.clone();
            }
            if missing {
                Deployment::Fetching {
                    release,
                    stalled: None,
                }
            } else if parts {
                Deployment::Applying { release }
            } else {
                Deployment::Done { release }
            }
        }
        (Deployment::Fetching { release, .. }, Event::Fetched { parts }) => {
            let release = release.clone();
            if parts {
                Deployment::Applying { release }
            } else {
                Deployment::Done { release }
            }
        }
        (Deployment::Fetching { release, .. }, Event::FetchStalled(why)) => Deployment::Fetching {
            release: release.clone(),
            stalled: Some(why),
        },
        (Deployment::Fetching { release, .. }, Event::FetchFailed(error)) => Deployment::Failed {
            release: release.clone(),
            error,
        },
        (Deployment::Applying { release }, Event::PartsSettled) => Deployment::Done {
            release: release.clone(),
        },
        (current, _) => current.clone(),
    }
}

/// Whether the OS part is done with `release`: committed, rolled back, or failed — for good, or
/// under a desired state no newer than the `accepted`-th (a newer one makes it try again).
pub fn os_settled(os: &OsUpdate, release: &ReleaseRef, accepted: u64) -> bool {
    os.release() == Some(release)
        && match os {
            OsUpdate::Committed { .. } | OsUpdate::RolledBack { .. } => true,
            OsUpdate::Failed { retry, counter, .. } => !retry || *counter >= accepted,
            _ => false,
        }
}

/// The phase the twin sees and the error a person should read: the deployment's, except while
/// a part holds the release — the OS update's while it works on it (installing, trial, rolled
/// back...), then the workloads' rollout (trial while they start and run as a canary, committed
/// once promoted, rolled back). `os` is the OS update when the agent manages the OS, `rollout`
/// the workloads' when it applies workloads.
pub fn phase(
    deployment: &Deployment,
    os: Option<&OsUpdate>,
    rollout: Option<&Rollout>,
) -> (Phase, Option<String>) {
    let os_holds = |release: &ReleaseRef| {
        os.filter(|u| u.release() == Some(release) && !matches!(u, OsUpdate::Fetching { .. }))
    };
    let rollout_holds = |release: &ReleaseRef| rollout.filter(|r| r.release() == Some(release));
    match deployment {
        Deployment::Idle => (Phase::Idle, None),
        Deployment::Fetching { stalled, .. } => (Phase::Fetching, stalled.clone()),
        Deployment::Applying { release } | Deployment::Done { release } => {
            let os = os_holds(release);
            match (os, rollout_holds(release)) {
                (Some(update), _) if !matches!(update, OsUpdate::Committed { .. }) => {
                    (update.phase(), update.problem())
                }
                (_, Some(Rollout::Starting { .. } | Rollout::Canary { .. })) => {
                    (Phase::Trial, None)
                }
                (_, Some(Rollout::Ready { .. })) => (Phase::Committed, None),
                (_, Some(Rollout::RolledBack { error, .. })) => {
                    (Phase::RolledBack, Some(error.clone()))
                }
                (Some(update), _) => (update.phase(), update.problem()),
                (None, _) if matches!(deployment, Deployment::Applying { .. }) => {
                    (Phase::Verifying, None)
                }
                (None, _) => (Phase::Applied, None),
            }
        }
        Deployment::Failed { error, .. } => (Phase::Failed, Some(error.clone())),
    }
}

#[cfg(test)]
mod tests;
