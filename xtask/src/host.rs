//! What the host needs installed: apt packages, root, the Python venvs. Commands call these
//! first so a fresh Debian 12 machine runs them as they are.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::cross;
use crate::sh::{root, run, which};

/// rsocket-py, the RSocket implementation from another ecosystem the twin is tested against.
const RSOCKET_PY: &str = "rsocket==0.4.20";

/// RAUC on the host for the OS tests and the demo: a real `rauc service` on a private bus with
/// file-backed slots (docs/state-machines.md, crates/testkit/src/rauc.rs).
const APT_RAUC: &[&str] = &[
    "rauc",
    "rauc-service",
    "squashfs-tools",
    "dbus",
    "e2fsprogs",
    "openssl",
];

/// Clients nobody here wrote, for the car's registry (crates/registry/tests/clients.rs):
/// skopeo, and containerd with `ctr` (the containerd k3s embeds).
const APT_REGISTRY_CLIENTS: &[&str] = &["skopeo", "containerd"];

/// gpsd for the position test (agent/tests/position.rs): the daemon, and the Python module that
/// gpsfake (taken out of gpsd-clients by `gpsd::prepare`, not installed) drives it with; gpsfake
/// also imports distutils, which Debian 12 ships apart from Python. curl and xz-utils fetch and
/// unpack gpsd's source for its recorded track.
pub const APT_GPSD: &[&str] = &[
    "gpsd",
    "python3-gps",
    "python3-distutils",
    "curl",
    "xz-utils",
];

/// PostgreSQL for the twin's database tests (`postgres::start` runs a cluster of the run's own):
/// the server and its tools (initdb, pg_ctl).
pub const APT_POSTGRES: &[&str] = &["postgresql"];

/// HAProxy for the failover test (twin/tests/failover.rs): the load balancer in TCP mode in
/// front of several twin instances, as docs/operations.md lays them out.
pub const APT_HAPROXY: &[&str] = &["haproxy"];

pub fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

pub fn as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `apt-get install` of the packages of `wanted` that are missing (none: nothing runs). `who`
/// names the command that needs them, for the message when not root.
pub fn apt_install(who: &str, wanted: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = wanted.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !as_root() {
        bail!(
            "{who} needs packages {missing:?}; run as root or install them: apt-get install {}",
            missing.join(" ")
        );
    }
    run(Command::new("apt-get").args(["update", "-q"]))
        .context("apt-get update failed: is deb.debian.org reachable?")?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("cannot install {missing:?}"))
}

/// `cargo xtask deps`: RAUC, the registry's clients, gpsd, PostgreSQL, HAProxy and Python for
/// the tests,
/// and (with
/// `cross_too`) the aarch64 toolchain of cross/install.sh; then the rsocket-py venv.
pub fn deps(cross_too: bool) -> anyhow::Result<()> {
    let mut wanted = [
        APT_RAUC,
        APT_REGISTRY_CLIENTS,
        APT_GPSD,
        APT_POSTGRES,
        APT_HAPROXY,
    ]
    .concat();
    if !Path::new("/usr/bin/python3").exists() && which("python3").is_none() {
        wanted.push("python3");
    }
    apt_install("the tests", &wanted)?;
    if cross_too {
        cross::install()?;
    }
    venv()?;
    Ok(())
}

/// `.venv` with rsocket-py, for the interoperability test; returns its python.
pub fn venv() -> anyhow::Result<PathBuf> {
    Ok(python_venv(".venv", &[RSOCKET_PY])?.join("bin/python"))
}

/// A venv at `name` in the checkout with the pinned packages `pins` (`name==version`), made or
/// completed when one is missing; returns its directory.
pub fn python_venv(name: &str, pins: &[&str]) -> anyhow::Result<PathBuf> {
    let venv = root().join(name);
    let python = venv.join("bin/python");
    // pip freeze spells names with '_' where PyPI has '-' (oelint_adv==…).
    let have = Command::new(&python)
        .args(["-m", "pip", "freeze"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .to_lowercase()
                .replace('-', "_")
        })
        .unwrap_or_default();
    // `name[extra]==1.0` is frozen as `name==1.0`.
    let frozen = |pin: &str| {
        let pin = match (pin.find('['), pin.find(']')) {
            (Some(open), Some(close)) if open < close => {
                format!("{}{}", &pin[..open], &pin[close + 1..])
            }
            _ => pin.to_owned(),
        };
        pin.to_lowercase().replace('-', "_")
    };
    let missing: Vec<&str> = pins
        .iter()
        .copied()
        .filter(|pin| !have.lines().any(|l| l == frozen(pin)))
        .collect();
    if !missing.is_empty() {
        let base = which("python3").unwrap_or_else(|| PathBuf::from("/usr/bin/python3"));
        if !python.exists() {
            run(Command::new(&base).args(["-m", "venv"]).arg(&venv))?;
        }
        run(Command::new(&python)
            .args(["-m", "pip", "install", "-q"])
            .args(&missing))?;
    }
    Ok(venv)
}
