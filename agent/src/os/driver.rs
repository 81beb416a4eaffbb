//! The OS driver: gathers the facts (boot id, RAUC's view, the reboot policy, the health checks),
//! asks [`machine::decide`] what to do, persists the next state, then performs the effect. It
//! runs beside the twin connection and needs none: a car reboots, checks its health and commits
//! or rolls back offline. It reaches the rest of the agent only through its [`Host`].

use std::sync::Arc;
use std::time::Duration;

use cardeploy_rauc::{MarkSlot, MarkState, Rauc};
use tokio::sync::Notify;

use super::effects::{install, reboot, verify};
use super::health::check_health;
use super::host::Host;
use super::machine::{self, Action, Health, OsUpdate, Outcome, TrialGate};
use super::observe::{Observed, connect, observe, os_report};
use crate::{Error, now_secs};

/// After the reboot command succeeded, how long to wait for the init system to stop the agent
/// before trying again.
const REBOOT_GRACE: Duration = Duration::from_secs(120);
/// How often a waiting driver looks again without being woken.
const IDLE_TICK: Duration = Duration::from_secs(30);
/// How often the reboot policy is looked at again while it says "not yet".
const REBOOT_POLL: Duration = Duration::from_secs(5);

/// Test aid (a failpoint): `CARDEPLOY_AGENT_CRASH_AFTER=<state>` aborts the process right after
/// the OS state `<state>` is persisted, before its effect: the harshest moment for a power cut.
const CRASH_AFTER: &str = "CARDEPLOY_AGENT_CRASH_AFTER";

/// Run the OS driver until the agent stops.
pub(crate) async fn drive(host: Arc<Host>, rauc: Rauc) {
    let config = &host.config;
    let limits = config.limits();
    let mut rauc = Some(rauc);
    let mut health = Health::Pending("not checked yet".into());
    let mut waiting_for: Option<String> = None;
    let mut rauc_down = false;
    let mut last: Option<Observed> = None;
    loop {
        let client = match &rauc {
            Some(r) => r.clone(),
            None => connect(config).await,
        };
        rauc = Some(client.clone());
        let mut observed = match observe(&client, config, &health, last.as_ref()).await {
            Ok(o) => {
                if rauc_down {
                    host.notice("rauc", "RAUC answers again".to_owned()).await;
                    rauc_down = false;
                }
                o
            }
            Err(e) => {
                if !rauc_down {
                    tracing::warn!("cannot read the A/B state: {e}");
                    host.notice("rauc", format!("cannot read the A/B state: {e}"))
                        .await;
                    rauc_down = true;
                }
                if matches!(e, Error::Rauc(_)) {
                    rauc = None;
                }
                sleep_or_wake(&host.wake, Duration::from_secs(2)).await;
                continue;
            }
        };
        let (current, refused, wanted) = {
            let boot_id = observed.facts.boot_id.clone();
            host.read(|state| {
                observed.facts.boot_confirmed =
                    state.os.confirmed_boot.as_deref() == Some(boot_id.as_str());
                observed.facts.workloads = host.workloads_gate(state);
                (
                    state.os.update.clone(),
                    state.os.refused.clone(),
                    host.wanted(state),
                )
            })
        };
        let step = machine::decide(
            &current,
            wanted.as_ref(),
            &refused,
            &observed.facts,
            &limits,
        );
        if step.next != current {
            health = Health::Pending("not checked yet".into());
            waiting_for = None;
        }
        // Persist before the effect; report the slots whenever they or the state changed.
        if !host
            .transition(step.next.clone(), Some(os_report(&observed, &step.next)))
            .await
        {
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        }
        let mut action = step.action;
        loop {
            let follow = perform(
                &host,
                &client,
                &observed,
                action,
                &mut health,
                &mut waiting_for,
            )
            .await;
            match follow {
                Some(next) => action = next,
                None => break,
            }
        }
        last = Some(observed);
    }
}

async fn sleep_or_wake(wake: &Notify, timeout: Duration) {
    tokio::select! {
        () = wake.notified() => {}
        () = tokio::time::sleep(timeout) => {}
    }
}

/// Perform one action; returns an action that must follow at once (without deciding again).
async fn perform(
    host: &Host,
    rauc: &Rauc,
    observed: &Observed,
    action: Action,
    health: &mut Health,
    waiting_for: &mut Option<String>,
) -> Option<Action> {
    let config = &host.config;
    let current = host.read(|s| s.os.update.clone());
    let counter = host.read(|s| s.accepted);
    let outcome = match action {
        Action::Wait => {
            sleep_or_wake(&host.wake, IDLE_TICK).await;
            return None;
        }
        Action::Report => return None,
        Action::WaitRaucIdle => {
            tracing::info!("RAUC is busy with an installation; waiting for it to finish");
            tokio::time::sleep(Duration::from_secs(2)).await;
            return None;
        }
        Action::Verify => verify(host, &current).await,
        Action::Install => install(host, rauc, config, &current, &observed.facts).await,
        Action::Abandon => {
            tracing::info!("a newer release replaces the one installed but not booted");
            match rauc.mark(MarkState::Active, MarkSlot::Booted).await {
                Ok(_) => Outcome::Abandoned,
                Err(e) => Outcome::EffectFailed(format!("marking the booted slot active: {e}")),
            }
        }
        Action::ConfirmBoot => {
            match rauc.mark(MarkState::Good, MarkSlot::Booted).await {
                Ok(m) => {
                    tracing::info!(slot = %m.slot, "this boot is healthy; {}", m.message);
                    host.confirm_boot(&observed.facts.boot_id).await;
                }
                Err(e) => {
                    tracing::warn!("could not mark the booted slot good: {e}");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
            return None;
        }
        Action::MarkGood => match rauc.mark(MarkState::Good, MarkSlot::Booted).await {
            Ok(m) => {
                tracing::info!(slot = %m.slot, "slot marked good: {}", m.message);
                host.confirm_boot(&observed.facts.boot_id).await;
                Outcome::MarkedGood
            }
            Err(e) => Outcome::EffectFailed(format!("marking the booted slot good: {e}")),
        },
        Action::MarkBad => match rauc.mark(MarkState::Bad, MarkSlot::Booted).await {
            Ok(m) => {
                tracing::warn!(slot = %m.slot, "slot marked bad: {}", m.message);
                Outcome::MarkedBad
            }
            Err(e) => Outcome::EffectFailed(format!("marking the booted slot bad: {e}")),
        },
        Action::MarkOtherBad => {
            // The bootloader already gave up on it; this keeps it from ever being tried again.
            if let Err(e) = rauc.mark(MarkState::Bad, MarkSlot::Other).await {
                tracing::warn!("could not mark the failed slot bad: {e}");
            }
            return None;
        }
        Action::WaitReboot(why) => {
            if waiting_for.as_deref() != Some(why.as_str()) {
                tracing::info!("reboot deferred: {why}");
                host.notice("reboot", format!("reboot deferred: {why}"))
                    .await;
                *waiting_for = Some(why);
            }
            sleep_or_wake(&host.wake, REBOOT_POLL).await;
            return None;
        }
        Action::Reboot => {
            host.notice("reboot", format!("rebooting ({})", current.name()))
                .await;
            match reboot(config).await {
                Ok(()) => tokio::time::sleep(REBOOT_GRACE).await,
                Err(e) => {
                    tracing::error!("{e}");
                    host.notice("reboot", e.to_string()).await;
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            }
            return None;
        }
        Action::CheckHealth { deadline } => {
            *health = check_health(host, config).await;
            match health {
                // A settled slot is checked without a deadline, quietly.
                Health::Pending(missing) if deadline == u64::MAX => {
                    tracing::debug!("this boot is not confirmed yet: waiting for {missing}");
                    sleep_or_wake(&host.wake, Duration::from_secs(config.health.interval_secs))
                        .await;
                }
                Health::Pending(missing) => {
                    let left = deadline.saturating_sub(now_secs());
                    tracing::info!("health gate: waiting for {missing} ({left} s left)");
                    tokio::time::sleep(Duration::from_secs(config.health.interval_secs)).await;
                }
                // Passed, and the release's workloads have their turn on this slot: look again
                // when they move (they wake this driver) or after the interval.
                Health::Pass
                    if matches!(
                        current,
                        OsUpdate::Trial {
                            gate: TrialGate::Workloads,
                            ..
                        }
                    ) =>
                {
                    tracing::debug!("health gate passed; waiting for the workloads");
                    sleep_or_wake(&host.wake, Duration::from_secs(config.health.interval_secs))
                        .await;
                }
                Health::Pass => tracing::info!("health gate passed"),
                Health::Fail(why) => tracing::warn!("health gate failed: {why}"),
            }
            return None;
        }
    };
    if let Outcome::EffectFailed(why) = &outcome {
        tracing::warn!("{why}");
        host.notice("os", why.clone()).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        return None;
    }
    if let Outcome::InstallInterrupted(why) | Outcome::InstallRefused(why) = &outcome {
        tracing::warn!("{why}");
        host.notice("install", why.clone()).await;
    }
    // These outcomes changed the slots (primary, boot status): report them as they are now, not
    // as they were observed before the effect.
    let slots_changed = matches!(
        outcome,
        Outcome::Installed { .. } | Outcome::Abandoned | Outcome::MarkedGood | Outcome::MarkedBad
    );
    let next = machine::apply(&current, outcome, counter);
    let follow = matches!(
        (&current, &next),
        (OsUpdate::Verifying { .. }, OsUpdate::Installing { .. })
    );
    let fresh = if slots_changed {
        observe(rauc, config, health, Some(observed))
            .await
            .ok()
            .map(|now| os_report(&now, &next))
    } else {
        None
    };
    if !host.transition(next, fresh).await {
        return None;
    }
    // Verified → install at once: deciding again would count an interrupted install.
    follow.then_some(Action::Install)
}

/// For tests: abort right after `state` was persisted (see [`CRASH_AFTER`]).
pub(crate) fn failpoint(state: &OsUpdate) {
    if std::env::var(CRASH_AFTER).is_ok_and(|s| s == state.name()) {
        tracing::error!("{CRASH_AFTER}={}: aborting as a test asked", state.name());
        std::process::abort();
    }
}
