//! The `[os]` configuration and its pure parts: when the car may reboot, and what the health
//! checks' results add up to.

use std::path::PathBuf;

use serde::Deserialize;

use super::machine::{Health, Limits, RebootGate};

/// `[os]` in agent.toml: the agent installs OS bundles through RAUC. Without it, an OS bundle is
/// fetched and verified but not installed (a car without RAUC, or a development host).
///
/// ```toml
/// [os]
/// reboot = { when = "window", start = "02:00", end = "04:00" }   # UTC
/// # reboot = { when = "immediately" }
/// # reboot = { when = "parked", file = "/run/cardeploy/parked" }
///
/// [os.health]
/// deadline_secs = 300
/// units = ["k3s.service", "dbus.service"]
/// command = ["/usr/libexec/cardeploy/health-check"]
/// twin_grace_secs = 120
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OsConfig {
    #[serde(default)]
    pub reboot: RebootPolicy,
    /// How the agent reboots the car; when it fails the agent calls reboot(2) itself.
    #[serde(default = "default_reboot_command")]
    pub reboot_command: Vec<String>,
    /// The kernel's boot id: a different value means the car rebooted.
    #[serde(default = "default_boot_id_file")]
    pub boot_id_file: PathBuf,
    /// The running system's os-release: its `VERSION_ID` is reported as the OS version.
    #[serde(default = "default_os_release")]
    pub os_release: PathBuf,
    /// D-Bus address of RAUC's bus; the system bus when unset.
    #[serde(default)]
    pub rauc_bus: Option<String>,
    /// The longest an installation may take, seconds.
    #[serde(default = "default_install_timeout")]
    pub install_timeout_secs: u64,
    /// Installs started for one release (interrupted by a crash or a vanished RAUC) before the
    /// release fails for good.
    #[serde(default = "default_max_installs")]
    pub max_installs: u32,
    /// Boots into a new slot during its trial before the agent marks it bad.
    #[serde(default = "default_max_trial_boots")]
    pub max_trial_boots: u32,
    #[serde(default)]
    pub health: HealthConfig,
}

/// When the car may reboot into a new slot (or back from a bad one).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(tag = "when", rename_all = "kebab-case", deny_unknown_fields)]
pub enum RebootPolicy {
    /// As soon as the slot is written.
    #[default]
    Immediately,
    /// Only between `start` and `end`, "HH:MM" UTC; a window may cross midnight.
    Window { start: String, end: String },
    /// Only while `file` exists: the vehicle integration creates it when the car is parked
    /// (ignition off, gear in park) and removes it when the car is about to move.
    Parked { file: PathBuf },
}

/// The health gate after booting a new slot: every configured check must pass before the
/// deadline; then the slot is marked good.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Seconds after boot within which every check must pass.
    #[serde(default = "default_deadline")]
    pub deadline_secs: u64,
    /// Seconds between two rounds of checks.
    #[serde(default = "default_interval")]
    pub interval_secs: u64,
    /// systemd units that must be active (`systemctl is-active`).
    #[serde(default)]
    pub units: Vec<String>,
    /// A program that must exit 0 (argv; no shell).
    #[serde(default)]
    pub command: Vec<String>,
    /// The twin must have been reached in this boot, or the car must have been offline this
    /// long (a car in an underground garage is not broken). 0: the twin is not required.
    #[serde(default = "default_twin_grace")]
    pub twin_grace_secs: u64,
    /// The k3s node must be Ready: `auto` checks when a `k3s` binary is on PATH.
    #[serde(default)]
    pub k3s_node: K3sCheck,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum K3sCheck {
    #[default]
    Auto,
    Required,
    Off,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            deadline_secs: default_deadline(),
            interval_secs: default_interval(),
            units: Vec::new(),
            command: Vec::new(),
            twin_grace_secs: default_twin_grace(),
            k3s_node: K3sCheck::Auto,
        }
    }
}

fn default_reboot_command() -> Vec<String> {
    vec!["systemctl".into(), "reboot".into()]
}
fn default_boot_id_file() -> PathBuf {
    PathBuf::from("/proc/sys/kernel/random/boot_id")
}
fn default_os_release() -> PathBuf {
    PathBuf::from("/etc/os-release")
}
fn default_install_timeout() -> u64 {
    1800
}
fn default_max_installs() -> u32 {
    3
}
fn default_max_trial_boots() -> u32 {
    2
}
fn default_deadline() -> u64 {
    300
}
fn default_interval() -> u64 {
    5
}
fn default_twin_grace() -> u64 {
    120
}

impl OsConfig {
    /// Problems a person must fix in the configuration, if any.
    pub fn validate(&self) -> Result<(), Invalid> {
        if let RebootPolicy::Window { start, end } = &self.reboot
            && minutes(start)? == minutes(end)?
        {
            return Err(Invalid::EmptyWindow {
                start: start.clone(),
                end: end.clone(),
            });
        }
        if self.reboot_command.is_empty() {
            return Err(Invalid::EmptyRebootCommand);
        }
        if self.max_installs == 0 || self.max_trial_boots == 0 {
            return Err(Invalid::ZeroAttempts);
        }
        if self.install_timeout_secs == 0 {
            return Err(Invalid::ZeroInstallTimeout);
        }
        let h = &self.health;
        if h.deadline_secs == 0 || h.interval_secs == 0 {
            return Err(Invalid::ZeroHealthTimes);
        }
        if h.twin_grace_secs >= h.deadline_secs {
            return Err(Invalid::GraceBeyondDeadline {
                grace: h.twin_grace_secs,
                deadline: h.deadline_secs,
            });
        }
        Ok(())
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_installs: self.max_installs,
            max_trial_boots: self.max_trial_boots,
            health_deadline_secs: self.health.deadline_secs,
        }
    }
}

/// What is wrong with an `[os]` configuration, said so that a person can fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("os.reboot window time {0:?}: expected HH:MM (UTC), e.g. \"02:30\"")]
    WindowTime(String),
    #[error("os.reboot window {start}-{end} is empty: give two different times")]
    EmptyWindow { start: String, end: String },
    #[error("os.reboot_command is empty: e.g. [\"systemctl\", \"reboot\"]")]
    EmptyRebootCommand,
    #[error("os.max_installs and os.max_trial_boots must be at least 1")]
    ZeroAttempts,
    #[error("os.install_timeout_secs must be above 0")]
    ZeroInstallTimeout,
    #[error("os.health.deadline_secs and interval_secs must be above 0")]
    ZeroHealthTimes,
    #[error(
        "os.health.twin_grace_secs ({grace}) must be below deadline_secs ({deadline}): an offline car would always fail its health gate"
    )]
    GraceBeyondDeadline { grace: u64, deadline: u64 },
}

/// "HH:MM" → minutes after midnight.
fn minutes(hhmm: &str) -> Result<u32, Invalid> {
    let bad = || Invalid::WindowTime(hhmm.to_owned());
    let (h, m) = hhmm.split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 || hhmm.len() != 5 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// May the car reboot now? `now` is Unix seconds, `parked` whether the parked file exists.
pub fn reboot_gate(policy: &RebootPolicy, now: u64, parked: bool) -> RebootGate {
    match policy {
        RebootPolicy::Immediately => RebootGate::Allowed,
        RebootPolicy::Parked { file } => {
            if parked {
                RebootGate::Allowed
            } else {
                RebootGate::NotYet(format!(
                    "waiting for the car to be parked ({} does not exist)",
                    file.display()
                ))
            }
        }
        RebootPolicy::Window { start, end } => {
            // Validated at load; an unreadable window never allows a reboot.
            let (Ok(s), Ok(e)) = (minutes(start), minutes(end)) else {
                return RebootGate::NotYet(format!("invalid reboot window {start}-{end}"));
            };
            let now_min = u32::try_from((now % 86_400) / 60).unwrap_or(0);
            let inside = if s < e {
                (s..e).contains(&now_min)
            } else {
                now_min >= s || now_min < e
            };
            if inside {
                RebootGate::Allowed
            } else {
                RebootGate::NotYet(format!("waiting for the reboot window {start}-{end} UTC"))
            }
        }
    }
}

/// One health check's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    Ok,
    /// Not (yet) healthy; the text says what is missing.
    Missing(String),
}

/// All checks must pass; anything missing is listed (the deadline turns it into a failure).
pub fn verdict(checks: &[Check]) -> Health {
    let missing: Vec<&str> = checks
        .iter()
        .filter_map(|c| match c {
            Check::Ok => None,
            Check::Missing(why) => Some(why.as_str()),
        })
        .collect();
    if missing.is_empty() {
        Health::Pass
    } else {
        Health::Pending(missing.join("; "))
    }
}

/// The twin check: reached in this boot, or offline for the whole grace period.
pub fn twin_check(grace_secs: u64, reached: bool, offline_for: u64) -> Check {
    if grace_secs == 0 || reached || offline_for >= grace_secs {
        Check::Ok
    } else {
        Check::Missing(format!(
            "the twin was not reached yet ({offline_for} s of {grace_secs} s grace offline)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 20_000 * 86_400;

    fn window(s: &str, e: &str) -> RebootPolicy {
        RebootPolicy::Window {
            start: s.into(),
            end: e.into(),
        }
    }

    #[test]
    fn a_window_allows_reboots_only_inside_it() {
        let w = window("02:00", "04:00");
        assert_eq!(reboot_gate(&w, DAY + 2 * 3600, false), RebootGate::Allowed);
        assert_eq!(
            reboot_gate(&w, DAY + 3 * 3600 + 59 * 60, false),
            RebootGate::Allowed
        );
        assert!(matches!(
            reboot_gate(&w, DAY + 4 * 3600, false),
            RebootGate::NotYet(_)
        ));
        assert!(matches!(
            reboot_gate(&w, DAY + 3600, false),
            RebootGate::NotYet(_)
        ));
    }

    #[test]
    fn a_window_may_cross_midnight() {
        let w = window("22:30", "01:00");
        assert_eq!(reboot_gate(&w, DAY + 23 * 3600, false), RebootGate::Allowed);
        assert_eq!(reboot_gate(&w, DAY + 1800, false), RebootGate::Allowed);
        assert!(matches!(
            reboot_gate(&w, DAY + 12 * 3600, false),
            RebootGate::NotYet(_)
        ));
    }

    #[test]
    fn parked_and_immediately() {
        let p = RebootPolicy::Parked {
            file: "/run/cardeploy/parked".into(),
        };
        assert_eq!(reboot_gate(&p, DAY, true), RebootGate::Allowed);
        let RebootGate::NotYet(why) = reboot_gate(&p, DAY, false) else {
            panic!("a moving car must not reboot");
        };
        assert!(why.contains("/run/cardeploy/parked"));
        assert_eq!(
            reboot_gate(&RebootPolicy::Immediately, DAY, false),
            RebootGate::Allowed
        );
    }

    #[test]
    fn bad_configurations_are_refused_with_the_fix() {
        let mut c: OsConfig = toml::from_str("").unwrap();
        assert!(c.validate().is_ok());
        c.reboot = window("2:00", "04:00");
        let e = c.validate().unwrap_err();
        assert_eq!(e, Invalid::WindowTime("2:00".into()));
        assert!(e.to_string().contains("HH:MM"), "{e}");
        c.reboot = window("04:00", "04:00");
        assert!(matches!(c.validate(), Err(Invalid::EmptyWindow { .. })));
        c.reboot = window("24:00", "04:00");
        assert_eq!(c.validate(), Err(Invalid::WindowTime("24:00".into())));
        c.reboot = RebootPolicy::Immediately;
        c.health.twin_grace_secs = c.health.deadline_secs;
        let e = c.validate().unwrap_err();
        assert!(matches!(e, Invalid::GraceBeyondDeadline { .. }));
        assert!(e.to_string().contains("twin_grace_secs"), "{e}");
        let parsed: OsConfig = toml::from_str(
            "reboot = { when = \"parked\", file = \"/run/p\" }\n[health]\nunits = [\"a.service\"]\n",
        )
        .unwrap();
        assert_eq!(
            parsed.reboot,
            RebootPolicy::Parked {
                file: "/run/p".into()
            }
        );
        assert!(toml::from_str::<OsConfig>("reboot = { when = \"sometimes\" }").is_err());
    }

    #[test]
    fn the_verdict_needs_every_check() {
        assert_eq!(verdict(&[Check::Ok, Check::Ok]), Health::Pass);
        assert_eq!(verdict(&[]), Health::Pass);
        assert_eq!(
            verdict(&[
                Check::Ok,
                Check::Missing("a".into()),
                Check::Missing("b".into())
            ]),
            Health::Pending("a; b".into())
        );
    }

    #[test]
    fn the_twin_check_allows_a_grace_period_offline() {
        assert_eq!(twin_check(120, true, 0), Check::Ok);
        assert_eq!(twin_check(120, false, 120), Check::Ok);
        assert!(matches!(twin_check(120, false, 60), Check::Missing(_)));
        assert_eq!(twin_check(0, false, 0), Check::Ok);
    }
}
