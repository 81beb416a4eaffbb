//! Debian bookworm arm64 packages, fetched and unpacked without running anything from them:
//! the qemu image (`image`) and the delta bench's real inputs (`bench::delta::inputs`) both take
//! their files from here. apt inside mmdebstrap verifies every package against the archive keys.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::host;
use crate::sh::{output, run};

const DEBIAN: &str = "http://deb.debian.org/debian";
const DEBIAN_SECURITY: &str = "http://deb.debian.org/debian-security";
/// /bin, /sbin and /lib as links into /usr, as bookworm installs it.
pub const MERGED_USR_HOOK: &str = "/usr/share/mmdebstrap/hooks/merged-usr/setup00.sh";
/// 2026-01-01T00:00:00Z: file times in the trees and images made from them, so the same packages
/// give the same bytes.
pub const SOURCE_DATE_EPOCH: u64 = 1_767_225_600;

/// name -> (version, architecture)
pub type Packages = BTreeMap<String, (String, String)>;

/// mmdebstrap and the archive keys apt checks the packages with.
pub const HOST_TOOLS: &[&str] = &["mmdebstrap", "debian-archive-keyring"];

pub fn prerequisites(who: &str) -> anyhow::Result<()> {
    host::apt_install(who, HOST_TOOLS)
}

/// The apt sources: bookworm, and with `updates` its updates and security suites too (the
/// newest version of each package wins).
pub fn sources(updates: bool) -> Vec<String> {
    let mut lines = vec![format!("deb {DEBIAN} bookworm main")];
    if updates {
        lines.push(format!("deb {DEBIAN} bookworm-updates main"));
        lines.push(format!("deb {DEBIAN_SECURITY} bookworm-security main"));
    }
    lines
}

/// `mmdebstrap --variant=extract` of `includes` and their dependencies (no recommends) into the
/// empty directory `tree`. The extract variant runs no maintainer scripts, so no arm64 code runs
/// here. The downloaded .debs stay in `var/cache/apt/archives` ([`debs`]) for the caller to read
/// and remove.
pub fn extract(tree: &Path, includes: &[&str], sources: &[String]) -> anyhow::Result<()> {
    run(Command::new("mmdebstrap")
        .args(["--variant=extract", "--architectures=arm64", "--quiet"])
        .arg(format!("--include={}", includes.join(",")))
        .arg(format!("--setup-hook={MERGED_USR_HOOK}"))
        .arg("--skip=cleanup/apt/cache")
        .arg("bookworm")
        .arg(tree)
        .args(sources)
        .env("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH.to_string()))
    .with_context(|| {
        format!(
            "mmdebstrap could not fetch {includes:?} for arm64 from deb.debian.org; check the \
             network and `apt-cache policy mmdebstrap`"
        )
    })
}

/// The .debs an [`extract`] into `tree` downloaded, sorted.
pub fn debs(tree: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let archives = tree.join("var/cache/apt/archives");
    let mut debs: Vec<PathBuf> = std::fs::read_dir(&archives)
        .with_context(|| format!("cannot read {}", archives.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    debs.sort();
    if debs.is_empty() {
        bail!("mmdebstrap left no packages in {}", archives.display());
    }
    Ok(debs)
}

/// The control paragraph of a .deb.
pub struct Control {
    pub text: String,
}

impl Control {
    pub fn read(deb: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            text: output(Command::new("dpkg-deb").arg("-f").arg(deb))?,
        })
    }

    /// One field's value (single-line fields only: Package, Version, Architecture, Multi-Arch).
    pub fn field(&self, name: &str) -> Option<String> {
        self.text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
            .map(str::to_owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_control_field_is_found_by_its_whole_name() {
        let control = Control {
            text: "Package: libc6\nVersion: 2.36-9\nArchitecture: arm64\nMulti-Arch: same\n".into(),
        };
        assert_eq!(control.field("Version").as_deref(), Some("2.36-9"));
        assert_eq!(control.field("Multi-Arch").as_deref(), Some("same"));
        assert_eq!(control.field("Arch"), None);
    }

    #[test]
    fn updates_add_the_update_and_security_suites() {
        assert_eq!(sources(false).len(), 1);
        let all = sources(true);
        assert!(
            all.iter().any(|s| s.contains("bookworm-security")),
            "{all:?}"
        );
    }
}
