//! The OS update state machine: pure decisions, no I/O. The driver (`super::driver`) gathers the
//! facts, calls [`decide`], persists the returned state, performs the action, and hands the
//! action's outcome to [`apply`]. docs/state-machines.md is the transition table; the tests below
//! walk every row of it.

use cardeploy_chunks::Digest;

pub use super::update::*;
use crate::release::ReleaseRef;

/// Start working on `wanted` from a settled state (or a state abandoned for it).
fn start(wanted: &Wanted, refused: &[Digest]) -> Step {
    if refused.contains(&wanted.release.digest) {
        return step(
            OsUpdate::Failed {
                release: wanted.release.clone(),
                error: format!(
                    "{} was rolled back or failed for good on this car before; it is not installed again: publish a new version",
                    wanted.release
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
    refused: &[Digest],
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
                            release, limits.max_installs
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
                        gate: TrialGate::Os,
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
            gate,
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
                // Each boot checks the OS again, whatever the last one got to.
                return step(
                    OsUpdate::Trial {
                        release: release.clone(),
                        from: from.clone(),
                        to: to.clone(),
                        boot_id: facts.boot_id.clone(),
                        deadline,
                        boots: boots + 1,
                        gate: TrialGate::Os,
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
            let to_gate = |gate: TrialGate, deadline: u64, action: Action| {
                step(
                    OsUpdate::Trial {
                        release: release.clone(),
                        from: from.clone(),
                        to: to.clone(),
                        boot_id: boot_id.clone(),
                        deadline,
                        boots: *boots,
                        gate,
                    },
                    action,
                )
            };
            let check = stay(Action::CheckHealth {
                deadline: *deadline,
            });
            if let Health::Fail(why) = &facts.health {
                return fail(why.clone());
            }
            if let WorkloadsGate::RolledBack(why) = &facts.workloads {
                return fail(format!("the release's workloads were rolled back: {why}"));
            }
            let pass = facts.health == Health::Pass;
            let late = facts.now >= *deadline;
            let settled = matches!(
                facts.workloads,
                WorkloadsGate::NotPart | WorkloadsGate::Ready
            );
            match gate {
                TrialGate::Os if !pass => match (&facts.health, late) {
                    (Health::Pending(missing), true) => fail(format!(
                        "the health checks did not pass within {} s: {missing}",
                        limits.health_deadline_secs
                    )),
                    _ => check,
                },
                // Healthy, but RAUC would not take the mark for as long again: give up on it.
                TrialGate::Os if facts.workloads == WorkloadsGate::NotPart => {
                    if facts.now >= deadline.saturating_add(limits.health_deadline_secs) {
                        fail("the slot passed the health gate but could not be marked good".into())
                    } else {
                        stay(Action::MarkGood)
                    }
                }
                TrialGate::Os if settled => to_gate(
                    TrialGate::Commit,
                    facts.now + limits.health_deadline_secs,
                    Action::MarkGood,
                ),
                // The OS is healthy: the workloads' turn, on this slot.
                TrialGate::Os => {
                    let deadline = facts.now + limits.health_deadline_secs;
                    to_gate(
                        TrialGate::Workloads,
                        deadline,
                        Action::CheckHealth { deadline },
                    )
                }
                TrialGate::Workloads if facts.workloads == WorkloadsGate::NotStarted && late => {
                    fail(format!(
                        "the release's workloads did not start within {} s of the OS passing its health checks (is k3s running on the new slot?)",
                        limits.health_deadline_secs
                    ))
                }
                TrialGate::Workloads if !settled => check,
                TrialGate::Workloads => {
                    let deadline = facts.now + limits.health_deadline_secs;
                    let action = if pass {
                        Action::MarkGood
                    } else {
                        Action::CheckHealth { deadline }
                    };
                    to_gate(TrialGate::Commit, deadline, action)
                }
                TrialGate::Commit if late => fail(if pass {
                    "the slot passed the health gate but could not be marked good".into()
                } else {
                    format!(
                        "the health checks passed, then did not pass again within {} s: {}",
                        limits.health_deadline_secs,
                        match &facts.health {
                            Health::Pending(missing) => missing.as_str(),
                            _ => "",
                        }
                    )
                }),
                TrialGate::Commit if pass && settled => stay(Action::MarkGood),
                TrialGate::Commit => check,
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
    release: &ReleaseRef,
    facts: &Facts,
    from: &Bootname,
    to: &Bootname,
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
