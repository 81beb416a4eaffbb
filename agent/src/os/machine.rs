//! The OS update state machine: pure decisions, no I/O. The driver (`super::driver`) gathers the
//! facts, calls [`decide`], persists the returned state, performs the action, and hands the
//! action's outcome to [`apply`]. docs/state-machines.md is the transition table; the tests below
//! walk every row of it.

use serde::{Deserialize, Serialize};

use cardeploy_protocol::Phase;

/// A release, as the OS machine names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rel {
    /// sha256 of the release manifest.
    pub digest: String,
    /// `line@version`, for people.
    pub label: String,
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
    Fetching { release: Rel },
    /// The bundle is on the car: check its digest again before RAUC sees it.
    Verifying { release: Rel },
    /// RAUC installs into the inactive slot. `attempt` counts installs started for this release:
    /// an agent killed mid-install finds this state and starts again, at most `max_installs`.
    Installing { release: Rel, attempt: u32 },
    /// Slot `to` is written and primary; waiting for the reboot policy. `boot_id` is the boot
    /// the install happened in: a different one means the car rebooted.
    PendingReboot {
        release: Rel,
        from: String,
        to: String,
        boot_id: String,
    },
    /// Running slot `to`, not committed. `boots` counts boots into it during the trial.
    Trial {
        release: Rel,
        from: String,
        to: String,
        boot_id: String,
        /// Unix seconds: the health gate must pass before this.
        deadline: u64,
        boots: u32,
    },
    /// Slot `to` failed the health gate. `marked` once RAUC marked it bad; then the car
    /// reboots (when the policy allows) and the bootloader starts `from`.
    MarkedBad {
        release: Rel,
        from: String,
        to: String,
        boot_id: String,
        why: String,
        marked: bool,
    },
    /// The release runs on slot `slot`, marked good.
    Committed { release: Rel, slot: String },
    /// Back on slot `slot`; the release is never installed again on its own.
    RolledBack {
        release: Rel,
        slot: String,
        reason: RollbackReason,
    },
    /// The release could not be installed. `retry`: a newer desired state (higher counter) for
    /// the same release may try again (a bundle damaged on disk); otherwise only a new release.
    Failed {
        release: Rel,
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
    pub refused: Vec<String>,
    /// The boot id in which the booted slot was last marked good. Boot-counting bootloaders
    /// (U-Boot's `BOOT_x_LEFT`) count every boot down until someone marks the slot good: the
    /// agent does that once per boot, after the health checks pass.
    #[serde(default)]
    pub confirmed_boot: Option<String>,
}

/// How many refused release digests are remembered.
pub const REFUSED_KEPT: usize = 64;

impl OsRecord {
    pub fn refuse(&mut self, digest: &str) {
        if !self.refused.iter().any(|d| d == digest) {
            self.refused.push(digest.to_owned());
        }
        let excess = self.refused.len().saturating_sub(REFUSED_KEPT);
        self.refused.drain(..excess);
    }
}

/// The OS release the accepted desired state asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub release: Rel,
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
    pub booted: String,
    /// RAUC is not installing anything.
    pub rauc_idle: bool,
    pub now: u64,
    pub reboot: RebootGate,
    pub health: Health,
    /// The booted slot was marked good in this boot already.
    pub boot_confirmed: bool,
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

fn step(next: OsUpdate, action: Action) -> Step {
    Step { next, action }
}

impl OsUpdate {
    /// The release this state is about.
    pub fn release(&self) -> Option<&Rel> {
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
    fn in_transaction(&self) -> bool {
        matches!(
            self,
            Self::Installing { .. } | Self::Trial { .. } | Self::MarkedBad { .. }
        )
    }
}

/// Start working on `wanted` from a settled state (or a state abandoned for it).
fn start(wanted: &Wanted, refused: &[String]) -> Step {
    if refused.contains(&wanted.release.digest) {
        return step(
            OsUpdate::Failed {
                release: wanted.release.clone(),
                error: format!(
                    "{} was rolled back or failed for good on this car before; it is not installed again: publish a new version",
                    wanted.release.label
                ),
                retry: false,
                counter: wanted.counter,
            },
            Action::Report,
        );
    }
    if wanted.ready {
        step(
            OsUpdate::Verifying {
                release: wanted.release.clone(),
            },
            Action::Verify,
        )
    } else {
        step(
            OsUpdate::Fetching {
                release: wanted.release.clone(),
            },
            Action::Report,
        )
    }
}

/// What to do now. `wanted` is the OS release the accepted desired state names (None when it
/// names no OS bundle).
pub fn decide(
    current: &OsUpdate,
    wanted: Option<&Wanted>,
    refused: &[String],
    facts: &Facts,
    limits: &Limits,
) -> Step {
    let stay = |action| step(current.clone(), action);
    let other_wanted = wanted.filter(|w| current.release() != Some(&w.release));
    // A new release replaces anything not yet touching the slots.
    if let Some(w) = other_wanted
        && !current.in_transaction()
        && !matches!(current, OsUpdate::PendingReboot { .. })
    {
        return start(w, refused);
    }
    match current {
        OsUpdate::Idle => settled(current, facts),
        OsUpdate::Fetching { .. } => match wanted {
            Some(w) if w.ready => step(
                OsUpdate::Verifying {
                    release: w.release.clone(),
                },
                Action::Verify,
            ),
            Some(_) => stay(Action::Wait),
            // The desired state no longer names an OS bundle.
            None => step(OsUpdate::Idle, Action::Report),
        },
        OsUpdate::Verifying { .. } => match wanted {
            Some(_) => stay(Action::Verify),
            None => step(OsUpdate::Idle, Action::Report),
        },
        OsUpdate::Installing { release, attempt } => {
            // Only ever seen at start-up or after an interrupted install: the driver performs
            // the install it starts without asking again.
            if !facts.rauc_idle {
                stay(Action::WaitRaucIdle)
            } else if *attempt >= limits.max_installs {
                step(
                    OsUpdate::Failed {
                        release: release.clone(),
                        error: format!(
                            "installing {} was interrupted {attempt} times; giving up (limit max_installs = {})",
                            release.label, limits.max_installs
                        ),
                        retry: false,
                        counter: wanted.map_or(0, |w| w.counter),
                    },
                    Action::Report,
                )
            } else {
                step(
                    OsUpdate::Installing {
                        release: release.clone(),
                        attempt: attempt + 1,
                    },
                    Action::Install,
                )
            }
        }
        OsUpdate::PendingReboot {
            release,
            from,
            to,
            boot_id,
        } => {
            if *boot_id == facts.boot_id {
                if wanted.is_none_or(|w| w.release != *release) {
                    return stay(Action::Abandon);
                }
                return stay(reboot_when_allowed(facts));
            }
            // The car rebooted.
            if facts.booted == *to {
                step(
                    OsUpdate::Trial {
                        release: release.clone(),
                        from: from.clone(),
                        to: to.clone(),
                        boot_id: facts.boot_id.clone(),
                        deadline: facts.now + limits.health_deadline_secs,
                        boots: 1,
                    },
                    Action::CheckHealth {
                        deadline: facts.now + limits.health_deadline_secs,
                    },
                )
            } else if facts.booted == *from {
                step(
                    OsUpdate::RolledBack {
                        release: release.clone(),
                        slot: from.clone(),
                        reason: RollbackReason::BootFailure {
                            detail: format!(
                                "the car rebooted into slot {from}, not {to}: slot {to} did not boot (the bootloader ran out of tries)"
                            ),
                        },
                    },
                    Action::MarkOtherBad,
                )
            } else {
                unknown_slot(release, facts, from, to, wanted)
            }
        }
        OsUpdate::Trial {
            release,
            from,
            to,
            boot_id,
            deadline,
            boots,
        } => {
            if *boot_id != facts.boot_id {
                if facts.booted == *from {
                    return step(
                        OsUpdate::RolledBack {
                            release: release.clone(),
                            slot: from.clone(),
                            reason: RollbackReason::BootFailure {
                                detail: format!(
                                    "the car came back to slot {from} while slot {to} was on trial"
                                ),
                            },
                        },
                        Action::MarkOtherBad,
                    );
                }
                if facts.booted != *to {
                    return unknown_slot(release, facts, from, to, wanted);
                }
                if *boots >= limits.max_trial_boots {
                    return step(
                        OsUpdate::MarkedBad {
                            release: release.clone(),
                            from: from.clone(),
                            to: to.clone(),
                            boot_id: facts.boot_id.clone(),
                            why: format!(
                                "slot {to} restarted {} times before passing the health gate (limit max_trial_boots = {})",
                                boots + 1,
                                limits.max_trial_boots
                            ),
                            marked: false,
                        },
                        Action::MarkBad,
                    );
                }
                let deadline = facts.now + limits.health_deadline_secs;
                return step(
                    OsUpdate::Trial {
                        release: release.clone(),
                        from: from.clone(),
                        to: to.clone(),
                        boot_id: facts.boot_id.clone(),
                        deadline,
                        boots: boots + 1,
                    },
                    Action::CheckHealth { deadline },
                );
            }
            let fail = |why: String| {
                step(
                    OsUpdate::MarkedBad {
                        release: release.clone(),
                        from: from.clone(),
                        to: to.clone(),
                        boot_id: boot_id.clone(),
                        why,
                        marked: false,
                    },
                    Action::MarkBad,
                )
            };
            match &facts.health {
                // Healthy, but RAUC would not take the mark for as long again: give up on it.
                Health::Pass
                    if facts.now >= deadline.saturating_add(limits.health_deadline_secs) =>
                {
                    fail("the slot passed the health gate but could not be marked good".into())
                }
                Health::Pass => stay(Action::MarkGood),
                Health::Fail(why) => fail(why.clone()),
                Health::Pending(missing) if facts.now >= *deadline => fail(format!(
                    "the health checks did not pass within {} s: {missing}",
                    limits.health_deadline_secs
                )),
                Health::Pending(_) => stay(Action::CheckHealth {
                    deadline: *deadline,
                }),
            }
        }
        OsUpdate::MarkedBad {
            release,
            from,
            to,
            boot_id,
            why,
            marked,
        } => {
            if *boot_id == facts.boot_id {
                return stay(if *marked {
                    reboot_when_allowed(facts)
                } else {
                    Action::MarkBad
                });
            }
            if facts.booted == *from {
                step(
                    OsUpdate::RolledBack {
                        release: release.clone(),
                        slot: from.clone(),
                        reason: RollbackReason::HealthFailure {
                            detail: why.clone(),
                        },
                    },
                    Action::Report,
                )
            } else {
                // Marked bad and still started: the bootloader does not follow RAUC. Rebooting
                // again would loop; stop and say so.
                step(
                    OsUpdate::Failed {
                        release: release.clone(),
                        error: format!(
                            "slot {to} was marked bad ({why}) but the car booted slot {} again: check the bootloader integration (RAUC's bootloader backend)",
                            facts.booted
                        ),
                        retry: false,
                        counter: wanted.map_or(0, |w| w.counter),
                    },
                    Action::Report,
                )
            }
        }
        OsUpdate::Committed { .. } | OsUpdate::RolledBack { .. } => settled(current, facts),
        OsUpdate::Failed { retry, counter, .. } => match wanted {
            Some(w) if *retry && w.counter > *counter => start(w, refused),
            _ => settled(current, facts),
        },
    }
}

fn reboot_when_allowed(facts: &Facts) -> Action {
    match &facts.reboot {
        RebootGate::Allowed => Action::Reboot,
        RebootGate::NotYet(why) => Action::WaitReboot(why.clone()),
    }
}

/// No update under way: confirm this boot once the health checks pass, then wait.
fn settled(current: &OsUpdate, facts: &Facts) -> Step {
    let action = match (&facts.health, facts.boot_confirmed) {
        (_, true) => Action::Wait,
        (Health::Pass, false) => Action::ConfirmBoot,
        // No deadline: an unhealthy settled slot is simply not confirmed, and the bootloader
        // falls back once its tries are spent.
        (_, false) => Action::CheckHealth { deadline: u64::MAX },
    };
    step(current.clone(), action)
}

fn unknown_slot(
    release: &Rel,
    facts: &Facts,
    from: &str,
    to: &str,
    wanted: Option<&Wanted>,
) -> Step {
    step(
        OsUpdate::Failed {
            release: release.clone(),
            error: format!(
                "the car booted slot {}, neither the old ({from}) nor the new ({to}) one",
                facts.booted
            ),
            retry: false,
            counter: wanted.map_or(0, |w| w.counter),
        },
        Action::Report,
    )
}

/// The result of an effect, as the driver saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Verified,
    /// The bundle on disk is not the release's (damaged or replaced): fetch it again.
    VerifyFailed(String),
    /// Installed; `to` is the bootname RAUC made primary.
    Installed {
        from: String,
        to: String,
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

/// The state after an effect's outcome.
pub fn apply(current: &OsUpdate, outcome: Outcome, counter: u64) -> OsUpdate {
    match (current, outcome) {
        (OsUpdate::Verifying { release }, Outcome::Verified) => OsUpdate::Installing {
            release: release.clone(),
            attempt: 1,
        },
        (OsUpdate::Verifying { release }, Outcome::VerifyFailed(why)) => OsUpdate::Failed {
            release: release.clone(),
            error: why,
            retry: true,
            counter,
        },
        (OsUpdate::Installing { release, .. }, Outcome::Installed { from, to, boot_id }) => {
            OsUpdate::PendingReboot {
                release: release.clone(),
                from,
                to,
                boot_id,
            }
        }
        (OsUpdate::Installing { release, .. }, Outcome::InstallRefused(why)) => OsUpdate::Failed {
            release: release.clone(),
            error: why,
            retry: false,
            counter,
        },
        (OsUpdate::PendingReboot { .. }, Outcome::Abandoned) => OsUpdate::Idle,
        (OsUpdate::Trial { release, to, .. }, Outcome::MarkedGood) => OsUpdate::Committed {
            release: release.clone(),
            slot: to.clone(),
        },
        (
            OsUpdate::MarkedBad {
                release,
                from,
                to,
                boot_id,
                why,
                ..
            },
            Outcome::MarkedBad,
        ) => OsUpdate::MarkedBad {
            release: release.clone(),
            from: from.clone(),
            to: to.clone(),
            boot_id: boot_id.clone(),
            why: why.clone(),
            marked: true,
        },
        // An interrupted install stays Installing: the next decision starts the next attempt
        // (bounded by max_installs). A failed mark or reboot stays too and is tried again.
        (state, _) => state.clone(),
    }
}

/// Releases in these states are never installed again on their own.
pub fn refuses(update: &OsUpdate) -> bool {
    matches!(
        update,
        OsUpdate::RolledBack { .. }
            | OsUpdate::MarkedBad { .. }
            | OsUpdate::Failed { retry: false, .. }
    )
}

#[cfg(test)]
mod tests;
