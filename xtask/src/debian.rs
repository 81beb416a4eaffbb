//! Debian bookworm arm64 packages, fetched and unpacked without running anything from them:
//! the qemu image (`image`) and the delta bench's real inputs (`bench::delta::inputs`) both take
//! their files from here. apt inside mmdebstrap verifies every package against the archive keys.
//! Single files are taken from here too: one file out of a package for this machine (apt checks
//! the package), and a file of the archive's pool checked against a pinned size and sha256
//! (`gpsd`: gpsfake and a recorded track).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::host;
use crate::sh::{fresh_dir, output, run};

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

/// `apt-get download` of `package` at `version`, for this machine, into `dir`: apt checks it
/// against the signed index of the host's sources. The package lists are refreshed once (as
/// root) when apt does not know that version. Returns the .deb, its control checked.
pub fn download(package: &str, version: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    let wanted = format!("{package}={version}");
    let get = || {
        run(Command::new("apt-get")
            .args(["download", "-q"])
            .arg(&wanted)
            .current_dir(dir))
    };
    if get().is_err() {
        if !host::as_root() {
            bail!("apt cannot download {wanted}; run as root (apt-get update) and try again");
        }
        run(Command::new("apt-get").args(["update", "-q"]))
            .context("apt-get update failed: is deb.debian.org reachable?")?;
        get().with_context(|| format!("apt cannot download {wanted}"))?;
    }
    let deb = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|e| e == "deb")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
        })
        .with_context(|| {
            format!(
                "apt-get download left no {package} .deb in {}",
                dir.display()
            )
        })?;
    let control = Control::read(&deb)?;
    if control.field("Package").as_deref() != Some(package)
        || control.field("Version").as_deref() != Some(version)
    {
        bail!("{} is not {package} {version}", deb.display());
    }
    Ok(deb)
}

/// The one file `member` of `deb` (its path in the package, `usr/bin/gpsfake`), written to `to`
/// with its mode; nothing else of the package is unpacked and nothing of it runs.
pub fn extract_file(deb: &Path, member: &str, to: &Path) -> anyhow::Result<()> {
    let scratch = to.with_extension("unpack");
    fresh_dir(&scratch)?;
    run(Command::new("bash")
        .args([
            "-c",
            "set -o pipefail; dpkg-deb --fsys-tarfile \"$1\" | tar -x -C \"$2\" \"./$3\"",
            "-",
        ])
        .arg(deb)
        .arg(&scratch)
        .arg(member))
    .with_context(|| format!("{} holds no {member}", deb.display()))?;
    std::fs::rename(scratch.join(member), to)
        .with_context(|| format!("cannot move {member} to {}", to.display()))?;
    std::fs::remove_dir_all(&scratch)?;
    Ok(())
}

/// `path` of the archive's pool (a source package's tarball, say) at `to`, unless `to` already
/// holds it: downloaded, then kept only if it has `bytes` bytes and the sha256 `sha256`.
pub fn pool_file(path: &str, bytes: u64, sha256: &str, to: &Path) -> anyhow::Result<()> {
    if check(to, bytes, sha256).is_ok() {
        return Ok(());
    }
    let url = format!("{DEBIAN}/pool/{path}");
    let mut part = to.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    run(Command::new("curl")
        .args(["-sSfL", "--retry", "3", "-o"])
        .arg(&part)
        .arg(&url))
    .with_context(|| format!("cannot download {url}"))?;
    check(&part, bytes, sha256).with_context(|| format!("{url} is not the file pinned here"))?;
    std::fs::rename(&part, to).with_context(|| format!("cannot write {}", to.display()))
}

/// Whether `path` has `bytes` bytes and the sha256 `sha256`.
fn check(path: &Path, bytes: u64, sha256: &str) -> anyhow::Result<()> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    if size != bytes {
        bail!("{}: {size} bytes, not {bytes}", path.display());
    }
    let sum = output(Command::new("sha256sum").arg(path))?;
    let sum = sum.split_whitespace().next().unwrap_or_default();
    if sum != sha256 {
        bail!("{}: sha256 {sum}, not {sha256}", path.display());
    }
    Ok(())
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
    fn a_pool_file_is_kept_only_with_its_pinned_size_and_digest() {
        let path = std::env::temp_dir().join(format!("xtask-check-{}", std::process::id()));
        std::fs::write(&path, b"gpsd\n").unwrap();
        // sha256 of "gpsd\n"
        let sum = "b8674125a3d293a3bb18c5c2cf2bae7f7b984c37d283ce3fe9a3fdbe3c02f233";
        let checked = check(&path, 5, sum);
        let wrong_size = check(&path, 6, sum);
        let wrong_sum = check(&path, 5, &sum.replace('b', "c"));
        std::fs::remove_file(&path).unwrap();
        checked.unwrap();
        assert!(
            wrong_size
                .unwrap_err()
                .to_string()
                .contains("5 bytes, not 6")
        );
        assert!(wrong_sum.unwrap_err().to_string().contains("sha256"));
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
