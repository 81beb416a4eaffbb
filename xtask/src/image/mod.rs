//! `cargo xtask image`: an aarch64 A/B disk image for qemu, built from Debian bookworm arm64
//! packages (apt verifies them) without Yocto and without loop devices, plus three signed RAUC
//! bundles. The harness in qemu-tests/ boots it; images/README.md explains the layout, the boot
//! flow and the console markers.
//!
//! Output in `target/image/` (rebuilt every time; `keys/` is kept so bundles made later with the
//! same development CA stay installable):
//! - `disk.img`: GPT disk; 1 `boot` (ext4, boot.scr), 2 `uboot-env` (raw, redundant U-Boot
//!   environment for boot counting), 3 `rootfs-a`, 4 `rootfs-b` (ext4 slots), 5 `data` (ext4).
//! - `layout.json`: partition offsets, the U-Boot binary and the qemu command line.
//! - `rootfs-1.0.0.ext4`: slot A's content.
//! - `os-2.0.0.raucb`, `os-3.0.0-bootfail.raucb`, `os-4.0.0-healthfail.raucb`, `os-5.0.0.raucb`:
//!   plain bundles.
//! - `containerd/`: containerd and ctr (Debian arm64), which the qemu suites put on the car's data
//!   partition.
//! - `versions.txt`: every Debian package used, with version and architecture.
//!
//! The pieces that are not code (boot script, inittab, rcS, system.conf, fw_env.config, the
//! initramfs /init) are files under `images/`, copied as they are.

//! The stages, one module each, in the order they run: [`packages`] (Debian arm64 packages and
//! the kernel), [`initramfs`], [`rootfs`] (the root filesystem and the releases made from it),
//! [`disk`] (partitions, boot environment, ext4 images) and [`bundles`] (the development CA and
//! the RAUC bundles). [`files`] finds the inputs under `images/`. This module only runs the
//! stages and writes the summaries (`layout.json`, `versions.txt`).

mod bundles;
mod disk;
mod files;
mod initramfs;
mod packages;
mod rootfs;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use serde_json::json;

use crate::cross;
use crate::debian::{self, Packages};
use crate::host::{apt_install, as_root};
use crate::sh::{fresh_dir, output, root, run};

/// Host tools besides the Debian package fetching (`debian::prerequisites`) and the aarch64
/// runner that asks busybox for its applets (cross/install.sh): qemu and U-Boot (the image's
/// firmware and for trying it), mkimage/mkenvimage, sfdisk, mkfs.ext4, depmod (module
/// dependencies of the arm64 kernel), rauc and mksquashfs (bundles), openssl (the development CA).
const APT_HOST: &[&str] = &[
    "qemu-system-arm",
    "u-boot-qemu",
    "u-boot-tools",
    "fdisk",
    "e2fsprogs",
    "kmod",
    "rauc",
    "squashfs-tools",
    "openssl",
];

/// `cargo xtask image` arguments.
#[derive(clap::Args, Debug, Default)]
pub struct Options {
    /// An aarch64 agent binary to put into the image, instead of building one with
    /// `cargo xtask cross` first.
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
}

/// `cargo xtask image [--agent PATH]`: builds everything into `target/image/`, returns that dir.
pub fn main(options: &Options) -> anyhow::Result<PathBuf> {
    let started = Instant::now();
    prerequisites()?;
    let agent = match &options.agent {
        Some(agent) => agent.clone(),
        None => cross::agent()?,
    };
    let agent_time = started.elapsed();
    if !agent.is_file() {
        bail!(
            "no agent at {}: build it with `cargo xtask cross`",
            agent.display()
        );
    }
    let out = root().join("target/image");
    let work = root().join("target/image-work");
    clean_output(&out)?;
    fresh_dir(&work)?;

    step("Debian packages: root filesystem (mmdebstrap, arm64, bookworm)");
    let tree = work.join("rootfs");
    let rootfs_packages = packages::extract(&tree, packages::ROOTFS_PACKAGES)?;
    step("Debian packages: kernel");
    let kernel_tree = work.join("kernel");
    let kernel_packages = packages::extract(&kernel_tree, &[packages::KERNEL_PACKAGE])?;
    let kernel = packages::Kernel::find(&kernel_tree)?;
    println!("image: kernel {}", kernel.version);
    step("Debian packages: containerd (for the car's data partition)");
    let containerd_tree = work.join("containerd");
    let containerd_packages = packages::extract(&containerd_tree, &[packages::CONTAINERD_PACKAGE])?;
    let containerd_out = out.join("containerd");
    fs::create_dir_all(&containerd_out)?;
    for binary in packages::CONTAINERD_BINARIES {
        let from = containerd_tree.join(binary);
        let name = from.file_name().context("a binary has a name")?;
        fs::copy(&from, containerd_out.join(name))
            .with_context(|| format!("{} has no {}", packages::CONTAINERD_PACKAGE, binary))?;
    }

    step("kernel modules and initramfs");
    run(Command::new("depmod")
        .arg("-b")
        .arg(&kernel_tree)
        .arg(&kernel.version))?;
    let deps = initramfs::ModuleDeps::read(&kernel.modules)?;
    let early = deps.load_order(initramfs::INITRAMFS_MODULES, &BTreeSet::new())?;
    let late = deps.load_order(initramfs::ROOTFS_MODULES, &early.iter().cloned().collect())?;
    let initrd = work.join("initrd.img");
    initramfs::write_initramfs(&initrd, &tree, &kernel, &early)?;

    step("root filesystem");
    let keys = bundles::Keys::ensure(&out.join("keys"), &work)?;
    rootfs::compose_rootfs(
        &tree,
        &kernel,
        &initrd,
        &early,
        &late,
        &agent,
        &keys.ca_cert,
    )?;

    step("slot images, one per release");
    let mut slot_images = BTreeMap::new();
    for release in rootfs::RELEASES {
        release.apply(&tree)?;
        let image = if release.bundle.is_none() {
            out.join(format!("rootfs-{}.ext4", release.version))
        } else {
            work.join(format!("rootfs-{}.ext4", release.version))
        };
        disk::make_ext4(&tree, &image, disk::SLOT_MIB, "rootfs").with_context(|| {
            format!(
                "root filesystem {} (slots are {} MiB)",
                release.version,
                disk::SLOT_MIB
            )
        })?;
        println!(
            "image: rootfs {} ({}): {} MiB used of {} MiB",
            release.version,
            release.description,
            disk::used_mib(&image)?,
            disk::SLOT_MIB
        );
        slot_images.insert(release.version, image);
    }

    step("RAUC bundles");
    for release in rootfs::RELEASES {
        let (Some(name), Some(image)) = (release.bundle, slot_images.get(release.version)) else {
            continue;
        };
        bundles::bundle(&work, release, image, &keys, &out.join(name))?;
    }

    step("disk image");
    let factory = rootfs::RELEASES
        .iter()
        .find(|r| r.bundle.is_none())
        .and_then(|r| slot_images.get(r.version))
        .context("RELEASES has no factory release (one without a bundle)")?;
    let partitions = disk::write_disk(&work, &out.join("disk.img"), factory)?;

    let flash = out.join("uboot-flash.img");
    disk::write_flash(&work, &flash)?;
    write_layout(&out, &partitions, &flash)?;
    write_versions(
        &out,
        &rootfs_packages,
        &kernel_packages,
        &containerd_packages,
    )?;
    fs::remove_dir_all(&work).with_context(|| format!("cannot remove {}", work.display()))?;

    println!(
        "image: built in {:.0} s (+ {:.0} s for the agent): {}",
        (started.elapsed() - agent_time).as_secs_f64(),
        agent_time.as_secs_f64(),
        out.display()
    );
    for entry in listing(&out)? {
        println!("  {entry}");
    }
    Ok(out)
}

fn step(what: &str) {
    println!("image: {what}");
}

/// Installs the host tools (idempotent). Building needs root: mmdebstrap extracts as root and
/// the root filesystem's files must be owned by root.
fn prerequisites() -> anyhow::Result<()> {
    if !as_root() {
        bail!(
            "cargo xtask image must run as root (mmdebstrap extracts packages as root and the \
             image's files must be owned by root)"
        );
    }
    apt_install("cargo xtask image", APT_HOST)?;
    debian::prerequisites("cargo xtask image")?;
    cross::install()
}

/// Empties `out`, keeping `keys/`.
fn clean_output(out: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for entry in fs::read_dir(out)?.filter_map(Result::ok) {
        if entry.file_name() == "keys" {
            continue;
        }
        let path = entry.path();
        let removed = if path.is_dir() && !path.is_symlink() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.with_context(|| format!("cannot remove {}", path.display()))?;
    }
    Ok(())
}

fn write_layout(out: &Path, partitions: &[disk::Partition], flash: &Path) -> anyhow::Result<()> {
    let layout = json!({
        "partitions": partitions.iter().map(|p| json!({
            "number": p.number,
            "name": p.name,
            "start": p.start,
            "size": p.size,
        })).collect::<Vec<_>>(),
        "uboot": disk::UBOOT,
        "uboot_flash": flash,
        "qemu_args": disk::qemu_args(flash),
        "compatible": bundles::COMPATIBLE,
    });
    let path = out.join("layout.json");
    fs::write(&path, serde_json::to_string_pretty(&layout)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))
}

fn write_versions(
    out: &Path,
    rootfs: &Packages,
    kernel: &Packages,
    containerd: &Packages,
) -> anyhow::Result<()> {
    let date = output(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]))?;
    let mut text = format!(
        "# cardeploy qemu image: Debian packages used\nbuilt: {}\nsources: {}\n\
         \n## root filesystem: mmdebstrap --variant=extract --include={} (+ dependencies): {} \
         packages\n",
        date.trim(),
        debian::sources(true).join(" | "),
        packages::ROOTFS_PACKAGES.join(","),
        rootfs.len()
    );
    for (name, (version, arch)) in rootfs {
        let _ = writeln!(text, "{name} {version} {arch}");
    }
    let _ = writeln!(
        text,
        "\nremoved from the root filesystem: {}",
        rootfs::PRUNE.join(", ")
    );
    let _ = writeln!(
        text,
        "removed: D-Bus files {}* (systemd's services) in {}",
        rootfs::PRUNE_DBUS_PREFIX,
        rootfs::DBUS_DIRS.join(", ")
    );
    let _ = writeln!(
        text,
        "\n## kernel: {} (its Image and modules only; its dependencies are not in the image)",
        packages::KERNEL_PACKAGE
    );
    for (name, (version, arch)) in kernel.iter().filter(|(n, _)| n.starts_with("linux-image-")) {
        let _ = writeln!(text, "{name} {version} {arch}");
    }
    let _ = writeln!(
        text,
        "\n## containerd for the data partition: {} from {}",
        packages::CONTAINERD_BINARIES.join(", "),
        packages::CONTAINERD_PACKAGE
    );
    for (name, (version, arch)) in containerd
        .iter()
        .filter(|(n, _)| *n == packages::CONTAINERD_PACKAGE)
    {
        let _ = writeln!(text, "{name} {version} {arch}");
    }
    let _ = writeln!(text, "\n## host tools (amd64) that built and run the image");
    for package in APT_HOST.iter().chain(debian::HOST_TOOLS) {
        let version = output(Command::new("dpkg-query").args([
            "-W",
            "-f=${Version} ${Architecture}",
            package,
        ]))
        .unwrap_or_else(|_| "not installed".into());
        let _ = writeln!(text, "{package} {version}");
    }
    fs::write(out.join("versions.txt"), text).context("cannot write versions.txt")
}

fn listing(out: &Path) -> anyhow::Result<Vec<String>> {
    let mut entries: Vec<String> = fs::read_dir(out)?
        .filter_map(Result::ok)
        .map(|e| {
            let size = e.metadata().map(|m| m.len()).unwrap_or(0);
            format!(
                "{} ({:.1} MiB)",
                e.file_name().to_string_lossy(),
                size as f64 / disk::MIB as f64
            )
        })
        .collect();
    entries.sort();
    Ok(entries)
}
