//! Stage 3: the root filesystem of a slot. The part every release shares (Debian's files pruned,
//! images/rootfs/ laid over them, busybox's applets, the kernel, the agent, RAUC's keyring), then
//! per release what makes it that release.

use std::fs;
use std::os::unix::fs::{PermissionsExt as _, symlink};
use std::path::Path;
use std::process::Command;

use anyhow::Context;

use super::files::{images_dir, read_image_file};
use super::packages::Kernel;
use crate::cross;
use crate::sh::{output, run};

/// Not needed on a read-only, console-only car: documentation, translations, apt's state, and
/// glibc's iconv modules (UTF-8 and ASCII are built into libc).
pub const PRUNE: &[&str] = &[
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/bug",
    "usr/lib/aarch64-linux-gnu/gconv",
    "var/cache/apt",
    "var/cache/debconf",
    "var/lib/apt",
    "etc/apt",
    // D-Bus activation would start a second `rauc service` racing the one rcS starts (and needs
    // a setuid launch helper that the extract variant does not set up).
    "usr/share/dbus-1/system-services/de.pengutronix.rauc.service",
];

/// D-Bus configuration and activation files of systemd's services (systemd comes in as a
/// dependency of rauc but is not the init system here); their policies name users that do not
/// exist, which dbus-daemon reports on every boot.
pub const PRUNE_DBUS_PREFIX: &str = "org.freedesktop.";
pub const DBUS_DIRS: &[&str] = &[
    "usr/share/dbus-1/system.d",
    "usr/share/dbus-1/system-services",
    "usr/share/dbus-1/services",
];

/// A fixed machine id: the image is the same for every car; D-Bus only needs a valid one.
const MACHINE_ID: &str = "c0de0000ca4d4e918d1a00000000a64e";

/// The releases built: 1.0.0 is the image's slot A, the others are bundles.
pub struct Release {
    pub version: &'static str,
    pub bundle: Option<&'static str>,
    /// `/etc/cardeploy/healthy` exists (the harness's health command tests for it).
    pub healthy: bool,
    /// `/sbin/init` is busybox; otherwise a script that exits at once.
    pub boots: bool,
    pub description: &'static str,
}

pub const RELEASES: &[Release] = &[
    Release {
        version: "1.0.0",
        bundle: None,
        healthy: true,
        boots: true,
        description: "the factory image",
    },
    Release {
        version: "2.0.0",
        bundle: Some("os-2.0.0.raucb"),
        healthy: true,
        boots: true,
        description: "a good update",
    },
    Release {
        version: "3.0.0",
        bundle: Some("os-3.0.0-bootfail.raucb"),
        healthy: true,
        boots: false,
        description: "test release: /sbin/init exits, the kernel panics",
    },
    Release {
        version: "4.0.0",
        bundle: Some("os-4.0.0-healthfail.raucb"),
        healthy: false,
        boots: true,
        description: "test release: boots, but /etc/cardeploy/healthy is missing",
    },
    Release {
        version: "5.0.0",
        bundle: Some("os-5.0.0.raucb"),
        healthy: true,
        boots: true,
        description: "another good update (the power-cut suite alternates it with 2.0.0)",
    },
];

/// The release-independent part: prune, overlay images/rootfs/, busybox applets, kernel and
/// modules, the agent, RAUC's keyring, the directories and links of a read-only root.
pub fn compose_rootfs(
    tree: &Path,
    kernel: &Kernel,
    initrd: &Path,
    early: &[String],
    late: &[String],
    agent: &Path,
    rauc_keyring: &Path,
) -> anyhow::Result<()> {
    for path in PRUNE {
        let path = tree.join(path);
        if path.is_dir() {
            fs::remove_dir_all(&path)
        } else if path.exists() {
            fs::remove_file(&path)
        } else {
            Ok(())
        }
        .with_context(|| format!("cannot remove {}", path.display()))?;
    }
    for dir in DBUS_DIRS {
        let dir = tree.join(dir);
        for entry in fs::read_dir(&dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .filter_map(Result::ok)
        {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(PRUNE_DBUS_PREFIX)
            {
                fs::remove_file(entry.path())?;
            }
        }
    }
    copy_overlay(&images_dir().join("rootfs"), tree)?;
    busybox_links(tree)?;

    for dir in [
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "data",
        "boot",
        "root",
        "var/lib/dbus",
    ] {
        fs::create_dir_all(tree.join(dir))?;
    }
    fs::set_permissions(tree.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    for (link, target) in [
        ("var/run", "../run"),
        ("var/lock", "../run/lock"),
        ("var/tmp", "../tmp"),
        ("var/lib/dbus/machine-id", "/etc/machine-id"),
    ] {
        replace_with_symlink(&tree.join(link), target)?;
    }
    fs::write(tree.join("etc/machine-id"), format!("{MACHINE_ID}\n"))?;

    let boot = tree.join("boot");
    fs::copy(&kernel.image, boot.join("Image"))
        .with_context(|| format!("cannot copy {}", kernel.image.display()))?;
    fs::copy(initrd, boot.join("initrd.img"))?;
    let modules = tree.join("usr/lib/modules").join(&kernel.version);
    for module in early.iter().chain(late) {
        let target = modules.join(module);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::copy(kernel.modules.join(module), &target)
            .with_context(|| format!("cannot copy module {module}"))?;
    }
    for file in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        fs::copy(kernel.modules.join(file), modules.join(file))?;
    }
    run(Command::new("depmod")
        .arg("-b")
        .arg(tree)
        .arg(&kernel.version))?;
    fs::create_dir_all(tree.join("etc/cardeploy"))?;
    fs::write(tree.join("etc/cardeploy/modules"), late.join("\n") + "\n")?;

    let bin = tree.join("usr/bin/cardeploy-agent");
    fs::copy(agent, &bin).with_context(|| format!("cannot copy {}", agent.display()))?;
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))?;
    fs::copy(rauc_keyring, tree.join("etc/rauc/ca.cert.pem"))?;
    Ok(())
}

/// Copies `from` into `to`; scripts (`#!`) get mode 0755, other files 0644.
fn copy_overlay(from: &Path, to: &Path) -> anyhow::Result<()> {
    for entry in fs::read_dir(from)
        .with_context(|| format!("cannot read {}", from.display()))?
        .filter_map(Result::ok)
    {
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        if source.is_dir() {
            fs::create_dir_all(&target)?;
            copy_overlay(&source, &target)?;
        } else {
            let content =
                fs::read(&source).with_context(|| format!("cannot read {}", source.display()))?;
            if target.is_symlink() {
                fs::remove_file(&target)?;
            }
            fs::write(&target, &content)
                .with_context(|| format!("cannot write {}", target.display()))?;
            let mode = if content.starts_with(b"#!") {
                0o755
            } else {
                0o644
            };
            fs::set_permissions(&target, fs::Permissions::from_mode(mode))?;
        }
    }
    Ok(())
}

/// A link for every busybox applet whose name no Debian package already provides (the list
/// comes from the arm64 busybox itself, run under qemu-user).
fn busybox_links(tree: &Path) -> anyhow::Result<()> {
    let busybox = tree.join("usr/bin/busybox");
    let applets = output(cross::runner(&busybox)?.arg("--list-full")).context(
        "cannot list busybox's applets (the runner of cross/config.toml runs the arm64 busybox)",
    )?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        // merged /usr: /bin and /sbin are links to usr/bin and usr/sbin.
        let path = match applet.split_once('/') {
            Some(("bin", name)) => format!("usr/bin/{name}"),
            Some(("sbin", name)) => format!("usr/sbin/{name}"),
            _ => applet.to_owned(),
        };
        let target = tree.join(&path);
        if target.symlink_metadata().is_ok() {
            continue;
        }
        let relative = if path.starts_with("usr/bin/") {
            "busybox"
        } else {
            "../bin/busybox"
        };
        symlink(relative, &target)
            .with_context(|| format!("cannot link {} to busybox", target.display()))?;
    }
    Ok(())
}

fn replace_with_symlink(link: &Path, target: &str) -> anyhow::Result<()> {
    if link.is_symlink() || link.is_file() {
        fs::remove_file(link)?;
    } else if link.is_dir() {
        fs::remove_dir_all(link)?;
    }
    symlink(target, link).with_context(|| format!("cannot link {}", link.display()))
}

impl Release {
    /// Makes the tree this release: os-release, the health marker, /sbin/init.
    pub fn apply(&self, tree: &Path) -> anyhow::Result<()> {
        let version = self.version;
        fs::write(
            tree.join("etc/os-release"),
            format!(
                "NAME=\"cardeploy\"\nID=cardeploy\nID_LIKE=debian\nVERSION_ID={version}\n\
                 VERSION=\"{version} (Debian bookworm based)\"\n\
                 PRETTY_NAME=\"cardeploy {version} (qemu arm64)\"\n"
            ),
        )?;
        let healthy = tree.join("etc/cardeploy/healthy");
        if self.healthy {
            fs::write(&healthy, "this release passes its health check\n")?;
        } else if healthy.exists() {
            fs::remove_file(&healthy)?;
        }
        let init = tree.join("usr/sbin/init");
        if init.symlink_metadata().is_ok() {
            fs::remove_file(&init)?;
        }
        if self.boots {
            symlink("../bin/busybox", &init)?;
        } else {
            let script = read_image_file("variants/bootfail-init")?.replace("@VERSION@", version);
            fs::write(&init, script)?;
            fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;
        }
        Ok(())
    }
}
