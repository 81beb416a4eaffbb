//! The OS driver: gathers the facts (boot id, RAUC's view, the reboot policy, the health checks),
//! asks [`machine::decide`] what to do, persists the next state, then performs the effect. It
//! runs beside the twin connection and needs none: a car reboots, checks its health and commits
//! or rolls back offline.

use std::sync::Arc;
use std::time::Duration;

use cardeploy_protocol::{InstallProgress, OsReport, ReportBody, SlotReport};
use cardeploy_rauc::{InstallArgs, MarkSlot, MarkState, Rauc, SlotStatus};
use tokio::sync::Notify;

use super::machine::{self, Action, Facts, Health, OsUpdate, Outcome, Wanted};
use super::policy::{self, Check, K3sCheck, OsConfig};
use crate::{Agent, Error, now_secs};

/// After the reboot command succeeded, how long to wait for the init system to stop the agent
/// before trying again.
const REBOOT_GRACE: Duration = Duration::from_secs(120);
/// How often a waiting driver looks again without being woken.
const IDLE_TICK: Duration = Duration::from_secs(30);
/// How often the reboot policy is looked at again while it says "not yet".
const REBOOT_POLL: Duration = Duration::from_secs(5);
/// Longest a single health-check program may run.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// Test aid (a failpoint): `CARDEPLOY_AGENT_CRASH_AFTER=<state>` aborts the process right after
/// the OS state `<state>` is persisted, before its effect: the harshest moment for a power cut.
const CRASH_AFTER: &str = "CARDEPLOY_AGENT_CRASH_AFTER";

/// What the driver shares with the rest of the agent.
pub(crate) struct OsRuntime {
    pub config: OsConfig,
    /// Rung on a new desired state, a finished fetch, a connection to the twin.
    pub wake: Notify,
}

impl std::fmt::Debug for OsRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OsRuntime").finish_non_exhaustive()
    }
}

/// Connect to RAUC, retrying until it answers: at boot the agent may start before RAUC.
pub(crate) async fn connect(config: &OsConfig) -> Rauc {
    let mut delay = Duration::from_millis(200);
    let mut warned = false;
    loop {
        let attempt = match &config.rauc_bus {
            Some(address) => Rauc::at(address).await,
            None => Rauc::system().await,
        };
        match attempt {
            Ok(rauc) => match rauc.compatible().await {
                Ok(_) => return rauc,
                Err(e) if !warned => {
                    tracing::warn!("RAUC is not answering yet: {e}");
                    warned = true;
                }
                Err(_) => {}
            },
            Err(e) if !warned => {
                tracing::warn!("RAUC is not reachable yet: {e}");
                warned = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// What RAUC and the system say, beyond the pure facts: for reports.
struct Observed {
    facts: Facts,
    /// `VERSION_ID` of the running system's os-release.
    version: Option<String>,
    slots: Vec<SlotStatus>,
    primary: Option<String>,
}

/// `VERSION_ID` from an os-release file, if there is one.
fn os_version(path: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| {
        let value = line.strip_prefix("VERSION_ID=")?;
        Some(value.trim().trim_matches('"').to_owned())
    })
}

fn read_boot_id(config: &OsConfig) -> Result<String, Error> {
    std::fs::read_to_string(&config.boot_id_file)
        .map(|s| s.trim().to_owned())
        .map_err(|source| Error::Io {
            path: config.boot_id_file.clone(),
            source,
        })
}

fn bootname_of(slots: &[SlotStatus], name: &str) -> Option<String> {
    slots
        .iter()
        .find(|s| s.name == name)
        .and_then(|s| s.bootname.clone())
}

/// `last` is what RAUC said before: while it installs it answers no slot-status or primary
/// query (`Busy`), and the report keeps the last known slots meanwhile.
async fn observe(
    rauc: &Rauc,
    config: &OsConfig,
    health: &Health,
    last: Option<&Observed>,
) -> Result<Observed, Error> {
    let boot_id = read_boot_id(config)?;
    let booted = rauc.boot_slot().await?;
    let rauc_idle = rauc.operation().await? == "idle";
    let (slots, primary) = match rauc.slots().await {
        Ok(slots) => {
            // Some bootloader backends cannot say; the report then leaves it out.
            let primary = match rauc.primary().await {
                Ok(name) => bootname_of(&slots, &name),
                Err(e) => {
                    tracing::debug!("RAUC primary slot unknown: {e}");
                    None
                }
            };
            (slots, primary)
        }
        Err(cardeploy_rauc::Error::Busy) if !rauc_idle || last.is_some() => last
            .map(|l| (l.slots.clone(), l.primary.clone()))
            .unwrap_or_default(),
        Err(e) => return Err(e.into()),
    };
    let now = now_secs();
    let parked = match &config.reboot {
        policy::RebootPolicy::Parked { file } => file.exists(),
        _ => false,
    };
    Ok(Observed {
        facts: Facts {
            boot_id,
            booted,
            rauc_idle,
            now,
            reboot: policy::reboot_gate(&config.reboot, now, parked),
            health: health.clone(),
            // Filled in by the caller, which holds the state.
            boot_confirmed: false,
        },
        version: os_version(&config.os_release),
        slots,
        primary,
    })
}

fn os_report(observed: &Observed, update: &OsUpdate) -> OsReport {
    OsReport {
        booted: observed.facts.booted.clone(),
        version: observed.version.clone(),
        primary: observed.primary.clone(),
        update: update.name().to_owned(),
        release: update.release().map(|r| r.label.clone()),
        slots: observed
            .slots
            .iter()
            .map(|s| SlotReport {
                name: s.name.clone(),
                bootname: s.bootname.clone(),
                state: s.state.to_string(),
                boot_status: s.boot_status.clone(),
                bundle_version: s.bundle_version.clone(),
            })
            .collect(),
    }
}

/// Run the OS driver until the agent stops.
pub(crate) async fn drive(agent: Arc<Agent>, runtime: Arc<OsRuntime>, rauc: Rauc) {
    let config = &runtime.config;
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
                    agent.notice("rauc", "RAUC answers again".to_owned()).await;
                    rauc_down = false;
                }
                o
            }
            Err(e) => {
                if !rauc_down {
                    tracing::warn!("cannot read the A/B state: {e}");
                    agent
                        .notice("rauc", format!("cannot read the A/B state: {e}"))
                        .await;
                    rauc_down = true;
                }
                if matches!(e, Error::Rauc(_)) {
                    rauc = None;
                }
                sleep_or_wake(&runtime.wake, Duration::from_secs(2)).await;
                continue;
            }
        };
        let (current, refused, wanted) = {
            let state = agent.state();
            observed.facts.boot_confirmed =
                state.os.confirmed_boot.as_deref() == Some(observed.facts.boot_id.as_str());
            (
                state.os.update.clone(),
                state.os.refused.clone(),
                agent.wanted(&state),
            )
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
        if !agent
            .os_transition(step.next.clone(), Some(os_report(&observed, &step.next)))
            .await
        {
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        }
        let mut action = step.action;
        loop {
            let follow = perform(
                &agent,
                &runtime,
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
    agent: &Arc<Agent>,
    runtime: &OsRuntime,
    rauc: &Rauc,
    observed: &Observed,
    action: Action,
    health: &mut Health,
    waiting_for: &mut Option<String>,
) -> Option<Action> {
    let config = &runtime.config;
    let current = agent.state().os.update.clone();
    let counter = agent.state().accepted;
    let outcome = match action {
        Action::Wait => {
            sleep_or_wake(&runtime.wake, IDLE_TICK).await;
            return None;
        }
        Action::Report => return None,
        Action::WaitRaucIdle => {
            tracing::info!("RAUC is busy with an installation; waiting for it to finish");
            tokio::time::sleep(Duration::from_secs(2)).await;
            return None;
        }
        Action::Verify => verify(agent, &current).await,
        Action::Install => install(agent, rauc, config, &current, &observed.facts).await,
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
                    agent.confirm_boot(&observed.facts.boot_id).await;
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
                agent.confirm_boot(&observed.facts.boot_id).await;
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
                agent
                    .notice("reboot", format!("reboot deferred: {why}"))
                    .await;
                *waiting_for = Some(why);
            }
            sleep_or_wake(&runtime.wake, REBOOT_POLL).await;
            return None;
        }
        Action::Reboot => {
            agent
                .notice("reboot", format!("rebooting ({})", current.name()))
                .await;
            match reboot(config).await {
                Ok(()) => tokio::time::sleep(REBOOT_GRACE).await,
                Err(e) => {
                    tracing::error!("{e}");
                    agent.notice("reboot", e).await;
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            }
            return None;
        }
        Action::CheckHealth { deadline } => {
            *health = check_health(agent, config).await;
            match health {
                // A settled slot is checked without a deadline, quietly.
                Health::Pending(missing) if deadline == u64::MAX => {
                    tracing::debug!("this boot is not confirmed yet: waiting for {missing}");
                    sleep_or_wake(
                        &runtime.wake,
                        Duration::from_secs(config.health.interval_secs),
                    )
                    .await;
                }
                Health::Pending(missing) => {
                    let left = deadline.saturating_sub(now_secs());
                    tracing::info!("health gate: waiting for {missing} ({left} s left)");
                    tokio::time::sleep(Duration::from_secs(config.health.interval_secs)).await;
                }
                Health::Pass => tracing::info!("health gate passed"),
                Health::Fail(why) => tracing::warn!("health gate failed: {why}"),
            }
            return None;
        }
    };
    if let Outcome::EffectFailed(why) = &outcome {
        tracing::warn!("{why}");
        agent.notice("os", why.clone()).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        return None;
    }
    if let Outcome::InstallInterrupted(why) | Outcome::InstallRefused(why) = &outcome {
        tracing::warn!("{why}");
        agent.notice("install", why.clone()).await;
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
    if !agent.os_transition(next, fresh).await {
        return None;
    }
    // Verified → install at once: deciding again would count an interrupted install.
    follow.then_some(Action::Install)
}

/// Hash the bundle on disk again: what RAUC installs must be what the release names.
async fn verify(agent: &Arc<Agent>, current: &OsUpdate) -> Outcome {
    let Some(bundle) = agent.target_bundle() else {
        return Outcome::VerifyFailed("the target release names no OS bundle".into());
    };
    let (path, artifact) = bundle;
    let checked = tokio::task::spawn_blocking({
        let path = path.clone();
        let artifact = artifact.clone();
        move || check_file(&path, &artifact)
    })
    .await;
    match checked {
        Ok(Ok(())) => {
            tracing::info!(bundle = %path.display(), "bundle verified");
            Outcome::Verified
        }
        Ok(Err(e)) => {
            // Forget it: the next desired state fetches it again.
            agent.forget_artifact(&artifact.name).await;
            Outcome::VerifyFailed(format!(
                "the bundle of {} on disk is not the release's ({e}); it is fetched again with the next desired state",
                current.release().map_or("?", |r| r.label.as_str())
            ))
        }
        Err(e) => Outcome::VerifyFailed(format!("verification task failed: {e}")),
    }
}

/// Size and sha256 of a file on disk against its declaration, read in blocks.
fn check_file(
    path: &std::path::Path,
    artifact: &cardeploy_release::Artifact,
) -> Result<(), String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut hasher = cardeploy_chunks::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    let digest = hasher.finish().hex();
    if size != artifact.size || digest != artifact.digest {
        return Err(format!(
            "{} has {size} bytes with sha256 {digest}; the release declares {} bytes with sha256 {}",
            path.display(),
            artifact.size,
            artifact.digest
        ));
    }
    Ok(())
}

async fn install(
    agent: &Arc<Agent>,
    rauc: &Rauc,
    config: &OsConfig,
    current: &OsUpdate,
    facts: &Facts,
) -> Outcome {
    let Some((path, _)) = agent.target_bundle() else {
        return Outcome::InstallRefused("the target release names no OS bundle".into());
    };
    let label = current
        .release()
        .map_or_else(String::new, |r| r.label.clone());
    tracing::info!(bundle = %path.display(), release = %label, "installing");
    let mut last = -1;
    let on_progress = |p: &cardeploy_rauc::Progress| {
        // RAUC reports each step; the twin needs a handful of lines, not hundreds.
        if p.percentage / 10 == last / 10 && p.percentage != 100 {
            return;
        }
        last = p.percentage;
        tracing::info!("install {}%: {}", p.percentage, p.message);
        let body = ReportBody::Install {
            progress: InstallProgress {
                release: label.clone(),
                percentage: p.percentage,
                message: p.message.clone(),
            },
        };
        let agent = agent.clone();
        tokio::spawn(async move { agent.emit(body).await });
    };
    let result = rauc
        .install(
            &path,
            &InstallArgs::default(),
            Duration::from_secs(config.install_timeout_secs),
            on_progress,
        )
        .await;
    match result {
        Ok(()) => {
            let slots = rauc.slots().await.unwrap_or_default();
            let to = match rauc.primary().await {
                Ok(name) => bootname_of(&slots, &name),
                Err(_) => None,
            }
            // A backend that cannot say its primary: the other slot of the booted one's class.
            .or_else(|| {
                let class = slots
                    .iter()
                    .find(|s| s.bootname.as_deref() == Some(facts.booted.as_str()))
                    .map(|s| s.class.clone());
                slots
                    .iter()
                    .find(|s| {
                        Some(&s.class) == class.as_ref()
                            && s.bootname.is_some()
                            && s.bootname.as_deref() != Some(facts.booted.as_str())
                    })
                    .and_then(|s| s.bootname.clone())
            });
            match to {
                Some(to) if to != facts.booted => Outcome::Installed {
                    from: facts.booted.clone(),
                    to,
                    boot_id: facts.boot_id.clone(),
                },
                Some(to) => Outcome::InstallRefused(format!(
                    "RAUC installed {label} but slot {to}, the booted one, is primary: check the slot configuration"
                )),
                None => Outcome::InstallRefused(format!(
                    "RAUC installed {label} but no other slot with a bootname was found: check system.conf"
                )),
            }
        }
        Err(cardeploy_rauc::Error::InstallFailed { code, last_error }) => {
            Outcome::InstallRefused(format!("RAUC refused {label} (code {code}): {last_error}"))
        }
        Err(e) => Outcome::InstallInterrupted(format!(
            "installing {label} was interrupted: {e}; it is started again"
        )),
    }
}

/// The init system reboots; if that fails, reboot(2).
async fn reboot(config: &OsConfig) -> Result<(), String> {
    let (program, args) = config
        .reboot_command
        .split_first()
        .ok_or("os.reboot_command is empty")?;
    tracing::warn!(command = ?config.reboot_command, "rebooting");
    let ran = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(program).args(args).status(),
    )
    .await;
    match ran {
        Ok(Ok(status)) if status.success() => return Ok(()),
        Ok(Ok(status)) => tracing::error!("{program} exited with {status}; calling reboot(2)"),
        Ok(Err(e)) => tracing::error!("cannot run {program}: {e}; calling reboot(2)"),
        Err(_) => tracing::error!("{program} did not finish within 60 s; calling reboot(2)"),
    }
    let direct = tokio::task::spawn_blocking(|| {
        nix::unistd::sync();
        nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT)
    })
    .await;
    match direct {
        Ok(Err(errno)) => Err(format!(
            "reboot failed: {} did not work and reboot(2) said {errno} (the agent needs CAP_SYS_BOOT)",
            config.reboot_command.join(" ")
        )),
        Ok(Ok(never)) => match never {},
        Err(e) => Err(format!("reboot task failed: {e}")),
    }
}

/// Run a program; Ok when it exits 0, else what went wrong.
async fn run_check(argv: &[String]) -> Result<String, String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("empty command".into());
    };
    let out = tokio::time::timeout(
        CHECK_TIMEOUT,
        tokio::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| {
        format!(
            "{program} did not finish within {} s",
            CHECK_TIMEOUT.as_secs()
        )
    })?
    .map_err(|e| format!("cannot run {program}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: String = stderr
            .trim()
            .chars()
            .rev()
            .take(200)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        Err(format!(
            "{} exited with {}{}{tail}",
            argv.join(" "),
            out.status,
            if tail.is_empty() { "" } else { ": " }
        ))
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// One round of every configured check.
async fn check_health(agent: &Arc<Agent>, config: &OsConfig) -> Health {
    let h = &config.health;
    let mut checks = Vec::new();
    for unit in &h.units {
        let argv = ["systemctl".to_owned(), "is-active".to_owned(), unit.clone()];
        checks.push(match run_check(&argv).await {
            Ok(_) => Check::Ok,
            Err(_) => Check::Missing(format!("unit {unit} is not active")),
        });
    }
    if !h.command.is_empty() {
        checks.push(match run_check(&h.command).await {
            Ok(_) => Check::Ok,
            Err(why) => Check::Missing(why),
        });
    }
    checks.push(policy::twin_check(
        h.twin_grace_secs,
        agent.twin_reached(),
        agent.started.elapsed().as_secs(),
    ));
    let k3s_present = on_path("k3s");
    match (h.k3s_node, k3s_present) {
        (K3sCheck::Off, _) | (K3sCheck::Auto, false) => {}
        (K3sCheck::Required, false) => {
            checks.push(Check::Missing("k3s is required but not installed".into()));
        }
        (_, true) => {
            let argv: Vec<String> = ["k3s", "kubectl", "get", "nodes", "--no-headers"]
                .map(String::from)
                .to_vec();
            checks.push(match run_check(&argv).await {
                Ok(out)
                    if !out.is_empty()
                        && out
                            .lines()
                            .all(|l| l.split_whitespace().nth(1) == Some("Ready")) =>
                {
                    Check::Ok
                }
                Ok(out) => Check::Missing(format!("k3s node not Ready: {out}")),
                Err(why) => Check::Missing(format!("k3s node: {why}")),
            });
        }
    }
    policy::verdict(&checks)
}

/// For tests: abort right after `state` was persisted (see [`CRASH_AFTER`]).
pub(crate) fn failpoint(state: &OsUpdate) {
    if std::env::var(CRASH_AFTER).is_ok_and(|s| s == state.name()) {
        tracing::error!("{CRASH_AFTER}={}: aborting as a test asked", state.name());
        std::process::abort();
    }
}

/// The OS release the accepted desired state names, if it names an OS bundle.
pub(crate) fn wanted(agent: &Agent, state: &crate::State) -> Option<Wanted> {
    let target = state.target.as_ref()?;
    target
        .artifacts
        .iter()
        .any(|a| a.kind == cardeploy_release::ArtifactKind::RaucBundle)
        .then(|| Wanted {
            release: machine::Rel {
                digest: target.release.clone(),
                label: target.label(),
            },
            counter: state.accepted,
            ready: !agent.needs_fetch(target, &state.artifacts),
        })
}
