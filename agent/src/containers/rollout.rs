//! The workloads' rollout: how a release's workloads take over from the previous release's on
//! the car's k3s. Pure, no I/O, in the style of the OS machine: the containers driver
//! (`super::driver`) hands it what it observed, persists what [`decide`] returns, then performs
//! the effect of the new state. docs/state-machines.md ("Workloads") is the table; the tests
//! below walk its rows.

use serde::{Deserialize, Serialize};

use super::manifests::ObjectRef;
use crate::release::{Release, ReleaseRef};

/// What the agent applied for a release: the release (its manifests and images stay on the car
/// while it is `running`, so a rollback needs no network) and the objects, which the agent alone
/// removes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Applied {
    pub release: Release,
    pub objects: Vec<ObjectRef>,
}

/// Where the rollout of the accepted release's workloads stands. Persisted before its effect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "state", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Rollout {
    #[default]
    Idle,
    /// The release's objects are applied; its Deployments must be ready by `deadline`
    /// (unix seconds).
    Starting { release: ReleaseRef, deadline: u64 },
    /// Every new Deployment is ready and runs beside the previous version, which still serves;
    /// it must stay healthy until `until`.
    Canary { release: ReleaseRef, until: u64 },
    /// The release's workloads run; what the previous release ran and this one does not is
    /// removed.
    Ready { release: ReleaseRef },
    /// The release's workloads failed: what it started anew is removed and the previous
    /// release's run as before.
    RolledBack { release: ReleaseRef, error: String },
}

/// The workloads' record in the agent's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct WorkloadsRecord {
    #[serde(default)]
    pub rollout: Rollout,
    /// The last release whose workloads were promoted: what runs, and what a rollback returns to.
    #[serde(default)]
    pub running: Option<Applied>,
    /// The release in rollout, once its objects are about to be applied; cleared when it is
    /// promoted (it becomes `running`) or rolled back (its new objects removed).
    #[serde(default)]
    pub trying: Option<Applied>,
    /// The health of the release's workloads as last observed: what the twin sees.
    #[serde(default)]
    pub observed: Vec<cardeploy_protocol::WorkloadReport>,
}

impl WorkloadsRecord {
    /// The release whose workloads run (kept on the car until a newer one is promoted).
    pub fn running_release(&self) -> Option<&Release> {
        self.running.as_ref().map(|r| &r.release)
    }

    /// The rollout as the twin should see it: one that ended but still has its cleanup to do
    /// (the old version or the failed one to remove) is still a canary.
    pub fn effective(&self) -> Rollout {
        match (&self.rollout, &self.trying) {
            (r, Some(t)) if r.settled(&t.release.id) => Rollout::Canary {
                release: t.release.id.clone(),
                until: 0,
            },
            (r, _) => r.clone(),
        }
    }
}

/// What the driver saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The deployment hands `release` to the workloads; `canary`: a previous version runs
    /// beside which the new one must prove itself.
    Start {
        release: ReleaseRef,
        now: u64,
        ready_secs: u64,
    },
    /// The release's objects could not be applied.
    ApplyFailed(String),
    /// A newer desired state names another release before this rollout ended: it is rolled
    /// back, so the new one starts from what ran before.
    Superseded(String),
    /// The OS part of the release went back (its slot rolled back or failed for good): the
    /// workloads go back with it.
    OsGaveUp(String),
    /// The Deployments' health: all ready, or the first problem; `crash`: the problem is a crash
    /// loop (waiting does not help).
    Observed {
        ready: bool,
        problem: Option<String>,
        crash: bool,
        now: u64,
        canary_secs: u64,
        canary: bool,
    },
}

impl Rollout {
    pub fn release(&self) -> Option<&ReleaseRef> {
        match self {
            Self::Idle => None,
            Self::Starting { release, .. }
            | Self::Canary { release, .. }
            | Self::Ready { release }
            | Self::RolledBack { release, .. } => Some(release),
        }
    }

    /// Whether the rollout of `release` ended (ready or rolled back).
    pub fn settled(&self, release: &ReleaseRef) -> bool {
        matches!(self, Self::Ready { release: r } | Self::RolledBack { release: r, .. } if r == release)
    }

    /// The phase of the release's workloads for the twin.
    pub fn workload_phase(&self) -> cardeploy_protocol::WorkloadPhase {
        use cardeploy_protocol::WorkloadPhase;
        match self {
            Self::Idle | Self::Starting { .. } => WorkloadPhase::Starting,
            Self::Canary { .. } => WorkloadPhase::Canary,
            Self::Ready { .. } => WorkloadPhase::Ready,
            Self::RolledBack { .. } => WorkloadPhase::RolledBack,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Starting { .. } => "starting",
            Self::Canary { .. } => "canary",
            Self::Ready { .. } => "ready",
            Self::RolledBack { .. } => "rolled-back",
        }
    }
}

/// The next rollout state. Events about a state they do not concern leave it as it is.
pub fn decide(current: &Rollout, event: Event) -> Rollout {
    match (current, event) {
        (
            _,
            Event::Start {
                release,
                now,
                ready_secs,
            },
        ) => {
            if current.release() == Some(&release) {
                return current.clone();
            }
            Rollout::Starting {
                release,
                deadline: now.saturating_add(ready_secs),
            }
        }
        (Rollout::Starting { release, .. }, Event::ApplyFailed(error)) => Rollout::RolledBack {
            release: release.clone(),
            error,
        },
        (
            Rollout::Starting { release, .. } | Rollout::Canary { release, .. },
            Event::Superseded(by),
        ) => Rollout::RolledBack {
            release: release.clone(),
            error: format!("superseded by {by} before it was promoted"),
        },
        (
            Rollout::Starting { release, .. } | Rollout::Canary { release, .. },
            Event::OsGaveUp(why),
        ) => Rollout::RolledBack {
            release: release.clone(),
            error: format!("the OS update of the release went back: {why}"),
        },
        (
            Rollout::Starting { release, deadline },
            Event::Observed {
                ready,
                problem,
                crash,
                now,
                canary_secs,
                canary,
            },
        ) => {
            let release = release.clone();
            if crash {
                return Rollout::RolledBack {
                    release,
                    error: problem.unwrap_or_else(|| "crash loop".into()),
                };
            }
            if ready {
                return if canary && canary_secs > 0 {
                    Rollout::Canary {
                        release,
                        until: now.saturating_add(canary_secs),
                    }
                } else {
                    Rollout::Ready { release }
                };
            }
            if now >= *deadline {
                return Rollout::RolledBack {
                    release,
                    error: format!(
                        "not ready in time: {}",
                        problem.unwrap_or_else(|| "no reason given".into())
                    ),
                };
            }
            current.clone()
        }
        (
            Rollout::Canary { release, until },
            Event::Observed {
                ready,
                problem,
                now,
                ..
            },
        ) => {
            let release = release.clone();
            if !ready || problem.is_some() {
                return Rollout::RolledBack {
                    release,
                    error: format!(
                        "failed during the canary: {}",
                        problem.unwrap_or_else(|| "no longer ready".into())
                    ),
                };
            }
            if now >= *until {
                Rollout::Ready { release }
            } else {
                current.clone()
            }
        }
        (current, _) => current.clone(),
    }
}

#[cfg(test)]
mod tests;
