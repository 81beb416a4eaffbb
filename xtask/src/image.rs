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
//! - `versions.txt`: every Debian package used, with version and architecture.
//!
//! The pieces that are not code (boot script, inittab, rcS, system.conf, fw_env.config, the
//! initramfs /init) are files under `images/`, copied as they are.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::{PermissionsExt as _, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use serde_json::json;

use crate::delta_inputs::{MERGED_USR_HOOK, SOURCE_DATE_EPOCH, output, sources};
use crate::{as_root, installed, root, run};

/// The `compatible` of the image's RAUC and of every bundle.
const COMPATIBLE: &str = "cardeploy-qemuarm64";
/// Debian's U-Boot for qemu's `virt` machine, started with `-bios`.
const UBOOT: &str = "/usr/lib/u-boot/qemu_arm64/u-boot.bin";

/// Host tools: qemu and U-Boot (the image's firmware and for trying it), mkimage/mkenvimage,
/// sfdisk, mkfs.ext4, mmdebstrap, depmod (module dependencies of the arm64 kernel), rauc and
/// mksquashfs (bundles), openssl (the development CA), qemu-user (to ask busybox for its applets).
const APT_HOST: &[&str] = &[
    "qemu-system-arm",
    "u-boot-qemu",
    "u-boot-tools",
    "fdisk",
    "e2fsprogs",
    "mmdebstrap",
    "debian-archive-keyring",
    "kmod",
    "rauc",
    "squashfs-tools",
    "openssl",
    "qemu-user-static",
];

/// The root filesystem's packages; apt adds their dependencies (no recommends).
const ROOTFS_PACKAGES: &[&str] = &[
    "busybox-static",
    "rauc",
    "rauc-service",
    "dbus",
    "libubootenv-tool",
    "libgcc-s1",
    "libc6",
];
/// The kernel comes from its own extraction: its dependencies (initramfs-tools, kmod, ...) are
/// not part of the image, only its Image and a few modules are.
const KERNEL_PACKAGE: &str = "linux-image-arm64";

/// Loaded by the initramfs, in dependency order: the virtio PCI disk and ext4.
const INITRAMFS_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"];
/// Loaded by rcS: the network card, and loop + squashfs for RAUC's bundle mounts.
const ROOTFS_MODULES: &[&str] = &["virtio_net", "loop", "squashfs"];

/// Not needed on a read-only, console-only car: documentation, translations, apt's state, and
/// glibc's iconv modules (UTF-8 and ASCII are built into libc).
const PRUNE: &[&str] = &[
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
const PRUNE_DBUS_PREFIX: &str = "org.freedesktop.";
const DBUS_DIRS: &[&str] = &[
    "usr/share/dbus-1/system.d",
    "usr/share/dbus-1/system-services",
    "usr/share/dbus-1/services",
];

/// A fixed machine id: the image is the same for every car; D-Bus only needs a valid one.
const MACHINE_ID: &str = "c0de0000ca4d4e918d1a00000000a64e";

/// Partitions in disk order, sizes in MiB. The slots hold a ~85 MiB root filesystem.
const BOOT_MIB: u64 = 8;
const ENV_MIB: u64 = 1;
const SLOT_MIB: u64 = 160;
// The agent keeps the new and the previous bundle (about 110 MiB each, uncompressed) and its state here.
const DATA_MIB: u64 = 512;
const PARTITIONS: &[(&str, u64, &str)] = &[
    ("boot", BOOT_MIB, LINUX_FS),
    ("uboot-env", ENV_MIB, UBOOT_ENV),
    ("rootfs-a", SLOT_MIB, LINUX_FS),
    ("rootfs-b", SLOT_MIB, LINUX_FS),
    ("data", DATA_MIB, LINUX_FS),
];
const LINUX_FS: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
/// U-Boot's own GPT type for an environment partition.
const UBOOT_ENV: &str = "3DE21764-95BD-54BD-A5C3-4ABE786F38A8";
const MIB: u64 = 1 << 20;

/// One copy of the U-Boot environment (header included); copies at 0 and ENV_COPY on
/// partition 2. The boot script (BOOT_SCRIPT) and images/rootfs/etc/fw_env.config say the same.
const ENV_COPY: u64 = 0x10000;
const BOOT_TRIES: u32 = 3;

/// qemu's second flash bank, where Debian's U-Boot looks for its own environment
/// (CONFIG_ENV_SIZE 0x40000 at the bank's start). The image ships it read-only with
/// `bootdelay=0` and a `bootcmd` that sources boot.scr at once: 2 s less per boot than the
/// default environment's countdown and distro-boot scan (which also finds boot.scr).
const FLASH_BANK: u64 = 64 * MIB;
const FLASH_ENV_SIZE: u64 = 0x40000;

/// The releases built: 1.0.0 is the image's slot A, the others are bundles.
struct Release {
    version: &'static str,
    bundle: Option<&'static str>,
    /// `/etc/cardeploy/healthy` exists (the harness's health command tests for it).
    healthy: bool,
    /// `/sbin/init` is busybox; otherwise a script that exits at once.
    boots: bool,
    description: &'static str,
}

const RELEASES: &[Release] = &[
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

struct Options {
    agent: Option<PathBuf>,
}

impl Options {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut agent = None;
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--agent" => {
                    agent = Some(PathBuf::from(
                        args.next()
                            .context("--agent needs the path of an aarch64 agent")?,
                    ));
                }
                other => bail!(
                    "unknown argument {other:?}; usage: cargo xtask image [--agent PATH] \
                     (default: build the agent with `cargo xtask cross`)"
                ),
            }
        }
        Ok(Self { agent })
    }
}

/// `cargo xtask image [--agent PATH]`: builds everything into `target/image/`, returns that dir.
pub fn main(args: &[String]) -> anyhow::Result<PathBuf> {
    let options = Options::parse(args)?;
    let started = Instant::now();
    prerequisites()?;
    let agent = match options.agent {
        Some(agent) => agent,
        None => crate::cross()?,
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
    let rootfs_packages = extract(&tree, ROOTFS_PACKAGES)?;
    step("Debian packages: kernel");
    let kernel_tree = work.join("kernel");
    let kernel_packages = extract(&kernel_tree, &[KERNEL_PACKAGE])?;
    let kernel = Kernel::find(&kernel_tree)?;
    println!("image: kernel {}", kernel.version);

    step("kernel modules and initramfs");
    run(Command::new("depmod")
        .arg("-b")
        .arg(&kernel_tree)
        .arg(&kernel.version))?;
    let deps = ModuleDeps::read(&kernel.modules)?;
    let early = deps.load_order(INITRAMFS_MODULES, &BTreeSet::new())?;
    let late = deps.load_order(ROOTFS_MODULES, &early.iter().cloned().collect())?;
    let initrd = work.join("initrd.img");
    write_initramfs(&initrd, &tree, &kernel, &early)?;

    step("root filesystem");
    let keys = Keys::ensure(&out.join("keys"), &work)?;
    compose_rootfs(&tree, &kernel, &initrd, &early, &late, &agent, &keys)?;

    step("slot images, one per release");
    let mut slot_images = BTreeMap::new();
    for release in RELEASES {
        release.apply(&tree)?;
        let image = if release.bundle.is_none() {
            out.join(format!("rootfs-{}.ext4", release.version))
        } else {
            work.join(format!("rootfs-{}.ext4", release.version))
        };
        make_ext4(&tree, &image, SLOT_MIB, "rootfs").with_context(|| {
            format!(
                "root filesystem {} (slots are {SLOT_MIB} MiB)",
                release.version
            )
        })?;
        println!(
            "image: rootfs {} ({}): {} MiB used of {SLOT_MIB} MiB",
            release.version,
            release.description,
            used_mib(&image)?
        );
        slot_images.insert(release.version, image);
    }

    step("RAUC bundles");
    for release in RELEASES {
        let (Some(name), Some(image)) = (release.bundle, slot_images.get(release.version)) else {
            continue;
        };
        bundle(&work, release, image, &keys, &out.join(name))?;
    }

    step("disk image");
    let factory = RELEASES
        .iter()
        .find(|r| r.bundle.is_none())
        .and_then(|r| slot_images.get(r.version))
        .context("RELEASES has no factory release (one without a bundle)")?;
    let partitions = write_disk(&work, &out.join("disk.img"), factory)?;

    let flash = out.join("uboot-flash.img");
    write_flash(&work, &flash)?;
    write_layout(&out, &partitions, &flash)?;
    write_versions(&out, &rootfs_packages, &kernel_packages)?;
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
    let missing: Vec<&str> = APT_HOST.iter().copied().filter(|p| !installed(p)).collect();
    if !as_root() {
        bail!(
            "cargo xtask image must run as root (mmdebstrap extracts packages as root and the \
             image's files must be owned by root){}",
            if missing.is_empty() {
                String::new()
            } else {
                format!("; it also needs: apt-get install {}", missing.join(" "))
            }
        );
    }
    if !missing.is_empty() {
        run(Command::new("apt-get").args(["update", "-q"]))
            .context("apt-get update failed: is deb.debian.org reachable?")?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
        .with_context(|| format!("cannot install the host tools {missing:?}"))?;
    }
    Ok(())
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

fn fresh_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

fn images_dir() -> PathBuf {
    root().join("images")
}

/// The boot script and U-Boot's flash environment live in the Yocto layer: the dev image and the
/// Yocto image boot the same way, from one copy.
fn boot_dir() -> PathBuf {
    root().join("meta-cardeploy/recipes-bsp/cardeploy-boot/files")
}

fn read_image_file(relative: &str) -> anyhow::Result<String> {
    let path = images_dir().join(relative);
    fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Debian packages

/// name -> (version, architecture)
type Packages = BTreeMap<String, (String, String)>;

/// `mmdebstrap --variant=extract` of `packages` (and their dependencies) into `tree`; the
/// downloaded .debs are read for the package list, then removed.
fn extract(tree: &Path, packages: &[&str]) -> anyhow::Result<Packages> {
    fresh_dir(tree)?;
    run(Command::new("mmdebstrap")
        .args(["--variant=extract", "--architectures=arm64", "--quiet"])
        .arg(format!("--include={}", packages.join(",")))
        .arg(format!("--setup-hook={MERGED_USR_HOOK}"))
        .arg("--skip=cleanup/apt/cache")
        .arg("bookworm")
        .arg(tree)
        .args(sources(true))
        .env("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH.to_string()))
    .with_context(|| {
        format!(
            "mmdebstrap could not fetch {packages:?} for arm64 from deb.debian.org; check the \
             network and `apt-cache policy mmdebstrap`"
        )
    })?;
    let archives = tree.join("var/cache/apt/archives");
    let mut found = Packages::new();
    for entry in fs::read_dir(&archives)
        .with_context(|| format!("cannot read {}", archives.display()))?
        .filter_map(Result::ok)
    {
        let deb = entry.path();
        if deb.extension().is_none_or(|e| e != "deb") {
            continue;
        }
        let control = output(Command::new("dpkg-deb").arg("-f").arg(&deb).args([
            "Package",
            "Version",
            "Architecture",
        ]))?;
        let field = |name: &str| {
            control
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
                .map(str::to_owned)
                .with_context(|| format!("{} has no {name}", deb.display()))
        };
        found.insert(
            field("Package")?,
            (field("Version")?, field("Architecture")?),
        );
        fs::remove_file(&deb).with_context(|| format!("cannot remove {}", deb.display()))?;
    }
    if found.is_empty() {
        bail!("mmdebstrap left no packages in {}", archives.display());
    }
    Ok(found)
}

struct Kernel {
    version: String,
    /// The uncompressed arm64 `Image` (Debian's vmlinuz is one), booted with `booti`.
    image: PathBuf,
    modules: PathBuf,
}

impl Kernel {
    fn find(tree: &Path) -> anyhow::Result<Self> {
        let modules_root = tree.join("usr/lib/modules");
        let versions: Vec<String> = fs::read_dir(&modules_root)
            .with_context(|| format!("{KERNEL_PACKAGE} installed no {}", modules_root.display()))?
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let [version] = versions.as_slice() else {
            bail!(
                "expected one kernel in {}, found {versions:?}",
                modules_root.display()
            );
        };
        let image = tree.join(format!("boot/vmlinuz-{version}"));
        let mut header = [0u8; 64];
        fs::File::open(&image)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut header))
            .with_context(|| format!("cannot read {}", image.display()))?;
        // The arm64 Image header's magic "ARM\x64" at offset 56; a compressed vmlinuz lacks it.
        if header[56..60] != *b"ARM\x64" {
            bail!(
                "{} is not an uncompressed arm64 Image; booti needs one (or kernel_comp_addr_r)",
                image.display()
            );
        }
        Ok(Self {
            modules: modules_root.join(version),
            version: version.clone(),
            image,
        })
    }
}

/// `modules.dep` (from depmod): module name -> (path relative to the modules dir, dependencies).
struct ModuleDeps {
    by_name: BTreeMap<String, String>,
    deps: BTreeMap<String, Vec<String>>,
    builtin: BTreeSet<String>,
}

impl ModuleDeps {
    fn read(dir: &Path) -> anyhow::Result<Self> {
        let name_of = |path: &str| {
            Path::new(path)
                .file_name()
                .map(|f| f.to_string_lossy())
                .and_then(|f| f.strip_suffix(".ko").map(|n| n.replace('-', "_")))
        };
        let text = fs::read_to_string(dir.join("modules.dep"))
            .with_context(|| format!("no modules.dep in {} (depmod failed?)", dir.display()))?;
        let mut by_name = BTreeMap::new();
        let mut deps = BTreeMap::new();
        for line in text.lines() {
            let Some((module, needs)) = line.split_once(':') else {
                continue;
            };
            if let Some(name) = name_of(module) {
                by_name.insert(name, module.to_owned());
                deps.insert(
                    module.to_owned(),
                    needs.split_whitespace().map(str::to_owned).collect(),
                );
            }
        }
        let builtin = fs::read_to_string(dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(name_of)
            .collect();
        Ok(Self {
            by_name,
            deps,
            builtin,
        })
    }

    /// The modules (paths) to insmod, dependencies first, skipping built-in ones and `loaded`.
    fn load_order(
        &self,
        wanted: &[&str],
        loaded: &BTreeSet<String>,
    ) -> anyhow::Result<Vec<String>> {
        let mut seen = loaded.clone();
        let mut order = Vec::new();
        for name in wanted {
            if self.builtin.contains(*name) {
                continue;
            }
            let path = self
                .by_name
                .get(*name)
                .with_context(|| format!("the kernel has no module {name}"))?;
            self.visit(path, &mut seen, &mut order);
        }
        Ok(order)
    }

    fn visit(&self, path: &str, seen: &mut BTreeSet<String>, order: &mut Vec<String>) {
        if !seen.insert(path.to_owned()) {
            return;
        }
        for dep in self.deps.get(path).into_iter().flatten().rev() {
            self.visit(dep, seen, order);
        }
        order.push(path.to_owned());
    }
}

// ---------------------------------------------------------------------------------------------
// initramfs

/// A newc cpio archive written directly: fixed owners and times, and /dev/console as a device
/// node without mknod (the kernel opens it for PID 1's stdio before /init runs).
struct Cpio {
    data: Vec<u8>,
    inode: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    fn new() -> Self {
        Self {
            data: Vec::new(),
            inode: 0,
            dirs: BTreeSet::new(),
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), content: &[u8]) {
        self.inode += 1;
        self.header(self.inode, mode, rdev, name, content);
    }

    /// A newc header (all numbers as 8 hex digits), the name, the content, each padded to 4.
    fn header(&mut self, inode: u32, mode: u32, rdev: (u32, u32), name: &str, content: &[u8]) {
        let fields = [
            inode,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            u32::try_from(SOURCE_DATE_EPOCH).unwrap_or(0),
            u32::try_from(content.len()).unwrap_or(u32::MAX),
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).unwrap_or(u32::MAX),
            0, // check
        ];
        let mut header = String::from("070701");
        for field in fields {
            let _ = write!(header, "{field:08x}");
        }
        self.data.extend_from_slice(header.as_bytes());
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(content);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    /// `path` and its parents, once each.
    fn dir(&mut self, path: &str) {
        let mut prefix = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if self.dirs.insert(prefix.clone()) {
                let name = prefix.clone();
                self.entry(&name, 0o040_755, (0, 0), &[]);
            }
        }
    }

    fn file(&mut self, path: &str, mode: u32, content: &[u8]) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entry(path, 0o100_000 | mode, (0, 0), content);
    }

    fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entry(path, 0o020_000 | mode, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.header(0, 0, (0, 0), "TRAILER!!!", &[]);
        self.data
    }
}

/// /init (images/initramfs/init), static busybox, the disk and ext4 modules and their load order.
fn write_initramfs(
    initrd: &Path,
    rootfs: &Path,
    kernel: &Kernel,
    modules: &[String],
) -> anyhow::Result<()> {
    let busybox = rootfs.join("usr/bin/busybox");
    let mut cpio = Cpio::new();
    for dir in ["bin", "dev", "etc", "proc", "sys", "newroot"] {
        cpio.dir(dir);
    }
    cpio.char_device("dev/console", 0o600, 5, 1);
    cpio.file("init", 0o755, read_image_file("initramfs/init")?.as_bytes());
    cpio.file(
        "bin/busybox",
        0o755,
        &fs::read(&busybox).with_context(|| {
            format!(
                "{} missing: busybox-static was not extracted",
                busybox.display()
            )
        })?,
    );
    for module in modules {
        let path = kernel.modules.join(module);
        let content = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        cpio.file(
            &format!("lib/modules/{}/{module}", kernel.version),
            0o644,
            &content,
        );
    }
    cpio.file("etc/modules", 0o644, (modules.join("\n") + "\n").as_bytes());
    fs::write(initrd, cpio.finish()).with_context(|| format!("cannot write {}", initrd.display()))
}

// ---------------------------------------------------------------------------------------------
// root filesystem

/// The release-independent part: prune, overlay images/rootfs/, busybox applets, kernel and
/// modules, the agent, the keyring, the directories and links of a read-only root.
fn compose_rootfs(
    tree: &Path,
    kernel: &Kernel,
    initrd: &Path,
    early: &[String],
    late: &[String],
    agent: &Path,
    keys: &Keys,
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
    fs::copy(&keys.ca_cert, tree.join("etc/rauc/ca.cert.pem"))?;
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
    let applets = output(
        Command::new("qemu-aarch64-static")
            .arg(&busybox)
            .arg("--list-full"),
    )
    .context("cannot list busybox's applets (qemu-user-static runs the arm64 busybox)")?;
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
    fn apply(&self, tree: &Path) -> anyhow::Result<()> {
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

/// An ext4 image of `mib` MiB holding `tree` (mkfs.ext4 -d, no loop device).
/// The file-system UUID of every slot image (see `make_ext4`).
const FS_UUID: &str = "c4d0e1a2-5b6c-4d7e-8f90-a1b2c3d4e5f6";

fn make_ext4(tree: &Path, image: &Path, mib: u64, label: &str) -> anyhow::Result<()> {
    if image.exists() {
        fs::remove_file(image)?;
    }
    fs::File::create(image)
        .and_then(|f| f.set_len(mib * MIB))
        .with_context(|| format!("cannot create {}", image.display()))?;
    let epoch = SOURCE_DATE_EPOCH.to_string();
    // One UUID and directory-hash seed for every release: metadata checksums are seeded by the
    // UUID, so with a random one every inode and group descriptor would differ between two
    // releases of the same tree, and the car could reuse none of them from its running slot.
    let extended = format!("root_owner=0:0,hash_seed={FS_UUID}");
    run(Command::new("mkfs.ext4")
        .args([
            "-q", "-F", "-L", label, "-U", FS_UUID, "-E", &extended, "-d",
        ])
        .arg(tree)
        .arg(image)
        .env("E2FSPROGS_FAKE_TIME", &epoch)
        .env("SOURCE_DATE_EPOCH", &epoch))
    .with_context(|| format!("mkfs.ext4 could not put {} into {mib} MiB", tree.display()))
}

fn used_mib(image: &Path) -> anyhow::Result<u64> {
    let header = output(Command::new("dumpe2fs").arg("-h").arg(image))?;
    let number = |key: &str| -> anyhow::Result<u64> {
        header
            .lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
            .with_context(|| format!("dumpe2fs -h {} shows no {key}", image.display()))
    };
    let used = number("Block count:")? - number("Free blocks:")?;
    Ok(used * number("Block size:")? / MIB)
}

// ---------------------------------------------------------------------------------------------
// keys and bundles

/// The development CA (the image's RAUC keyring) and the bundle signer it issued.
struct Keys {
    ca_cert: PathBuf,
    signing_cert: PathBuf,
    signing_key: PathBuf,
}

impl Keys {
    /// Reuses `dir` when complete, otherwise makes a new CA and signer with openssl.
    fn ensure(dir: &Path, work: &Path) -> anyhow::Result<Self> {
        let keys = Self {
            ca_cert: dir.join("ca.cert.pem"),
            signing_cert: dir.join("signing.cert.pem"),
            signing_key: dir.join("signing.key.pem"),
        };
        let ca_key = dir.join("ca.key.pem");
        if [
            &keys.ca_cert,
            &keys.signing_cert,
            &keys.signing_key,
            &ca_key,
        ]
        .iter()
        .all(|p| p.is_file())
        {
            println!("image: reusing the development CA in {}", dir.display());
            return Ok(keys);
        }
        println!("image: new development CA in {}", dir.display());
        fresh_dir(dir)?;
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        run(Command::new("openssl")
            .args(["req", "-x509"])
            .args(ec)
            .arg("-keyout")
            .arg(&ca_key)
            .arg("-out")
            .arg(&keys.ca_cert)
            .args([
                "-days",
                "3650",
                "-subj",
                "/O=cardeploy development/CN=cardeploy development CA",
            ])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]))
        .context("openssl could not make the development CA")?;
        let csr = work.join("signing.csr");
        run(Command::new("openssl")
            .arg("req")
            .args(ec)
            .arg("-keyout")
            .arg(&keys.signing_key)
            .arg("-out")
            .arg(&csr)
            .args([
                "-subj",
                "/O=cardeploy development/CN=cardeploy development bundle signer",
            ]))?;
        // No extendedKeyUsage: RAUC's default check-purpose (smimesign) accepts such a signer.
        let extensions = work.join("signing.ext");
        fs::write(
            &extensions,
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
        )?;
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "3650", "-set_serial", "2"])
            .arg("-in")
            .arg(&csr)
            .arg("-CA")
            .arg(&keys.ca_cert)
            .arg("-CAkey")
            .arg(&ca_key)
            .arg("-extfile")
            .arg(&extensions)
            .arg("-out")
            .arg(&keys.signing_cert))
        .context("openssl could not issue the bundle signing certificate")?;
        Ok(keys)
    }
}

fn bundle(
    work: &Path,
    release: &Release,
    image: &Path,
    keys: &Keys,
    out: &Path,
) -> anyhow::Result<()> {
    let content = work.join(format!("bundle-{}", release.version));
    fresh_dir(&content)?;
    let manifest = read_image_file("bundle/manifest.raucm")?
        .replace("@VERSION@", release.version)
        .replace("@DESCRIPTION@", release.description);
    if !manifest.contains(&format!("compatible={COMPATIBLE}")) {
        bail!("images/bundle/manifest.raucm must say compatible={COMPATIBLE}");
    }
    fs::write(content.join("manifest.raucm"), manifest)?;
    fs::hard_link(image, content.join("rootfs.ext4"))
        .or_else(|_| fs::copy(image, content.join("rootfs.ext4")).map(|_| ()))
        .with_context(|| format!("cannot put {} into the bundle", image.display()))?;
    run(Command::new("rauc")
        .arg("bundle")
        // Uncompressed squashfs: the slot image's bytes appear as they are in the bundle, so the
        // car finds most of its chunks in the slot it runs (a seed) and fetches only the rest —
        // the delta. Compressed, every bundle would be new bytes to the car.
        .arg("--mksquashfs-args=-noI -noId -noD -noF -noX")
        .arg(format!("--cert={}", keys.signing_cert.display()))
        .arg(format!("--key={}", keys.signing_key.display()))
        .arg(format!("--keyring={}", keys.ca_cert.display()))
        .arg(&content)
        .arg(out))
    .with_context(|| format!("rauc bundle failed for {}", out.display()))?;
    fs::remove_dir_all(&content)?;
    println!(
        "image: {} ({}, {:.1} MiB)",
        out.display(),
        release.description,
        fs::metadata(out)?.len() as f64 / MIB as f64
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// disk

struct Partition {
    number: usize,
    name: &'static str,
    start: u64,
    size: u64,
}

/// GPT with sfdisk on a plain file, each partition written with `dd conv=notrunc`.
fn write_disk(work: &Path, disk: &Path, factory: &Path) -> anyhow::Result<Vec<Partition>> {
    let mut partitions = Vec::new();
    let mut start = MIB;
    for (i, (name, mib, _)) in PARTITIONS.iter().enumerate() {
        partitions.push(Partition {
            number: i + 1,
            name,
            start,
            size: mib * MIB,
        });
        start += mib * MIB;
    }
    // 1 MiB at the end for the backup GPT.
    fs::File::create(disk)
        .and_then(|f| f.set_len(start + MIB))
        .with_context(|| format!("cannot create {}", disk.display()))?;
    let mut script = String::from("label: gpt\nunit: sectors\nfirst-lba: 2048\n");
    for (partition, (_, _, kind)) in partitions.iter().zip(PARTITIONS) {
        let _ = writeln!(
            script,
            "start={}, size={}, type={kind}, name=\"{}\"",
            partition.start / 512,
            partition.size / 512,
            partition.name
        );
    }
    let script_path = work.join("sfdisk.txt");
    fs::write(&script_path, &script)?;
    run(Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(disk)
        .stdin(fs::File::open(&script_path)?))
    .context("sfdisk could not write the partition table")?;

    // 1 boot: boot.scr (and its source, for people reading the disk).
    let boot = work.join("boot");
    fresh_dir(&boot)?;
    fs::copy(boot_dir().join("boot.cmd"), boot.join("boot.cmd"))?;
    run(Command::new("mkimage")
        .args(["-A", "arm64", "-O", "linux", "-T", "script", "-C", "none"])
        .args(["-n", "cardeploy A/B boot"])
        .arg("-d")
        .arg(boot.join("boot.cmd"))
        .arg(boot.join("boot.scr")))
    .context("mkimage (u-boot-tools) could not compile meta-cardeploy/recipes-bsp/cardeploy-boot/files/boot.cmd")?;
    let boot_img = work.join("boot.ext4");
    make_ext4(&boot, &boot_img, BOOT_MIB, "boot")?;

    // 2 uboot-env: two redundant copies, flags 1 (current) and 0.
    let env_img = work.join("uboot-env.img");
    write_environment(work, &env_img)?;

    // 5 data: empty but for cardeploy/; the harness replaces it with a provisioned one.
    let data = work.join("data");
    fresh_dir(&data.join("cardeploy"))?;
    let data_img = work.join("data.ext4");
    make_ext4(&data, &data_img, DATA_MIB, "data")?;

    // 4 rootfs-b stays zeroed: RAUC writes it on the first update.
    for (number, image) in [
        (1, boot_img.as_path()),
        (2, env_img.as_path()),
        (3, factory),
        (5, data_img.as_path()),
    ] {
        let partition = &partitions[number - 1];
        let size = fs::metadata(image)?.len();
        if size > partition.size {
            bail!(
                "{} ({size} bytes) does not fit partition {number} ({} bytes)",
                image.display(),
                partition.size
            );
        }
        run(Command::new("dd")
            .arg(format!("if={}", image.display()))
            .arg(format!("of={}", disk.display()))
            .args(["bs=1M", "conv=notrunc,sparse", "status=none"])
            .arg(format!("seek={}", partition.start / MIB)))?;
    }
    Ok(partitions)
}

/// The initial boot-counting environment: BOOT_ORDER="A B", BOOT_A_LEFT=BOOT_B_LEFT=3, in two
/// copies of U-Boot's redundant format (`[crc32][flags][data]`); the first one is current.
fn write_environment(work: &Path, image: &Path) -> anyhow::Result<()> {
    let text = work.join("uboot-env.txt");
    fs::write(
        &text,
        format!("BOOT_ORDER=A B\nBOOT_A_LEFT={BOOT_TRIES}\nBOOT_B_LEFT={BOOT_TRIES}\n"),
    )?;
    let copy = work.join("uboot-env.copy");
    run(Command::new("mkenvimage")
        .args(["-r", "-p", "0", "-s"])
        .arg(format!("{ENV_COPY:#x}"))
        .arg("-o")
        .arg(&copy)
        .arg(&text))
    .context("mkenvimage (u-boot-tools) failed")?;
    let first = fs::read(&copy)?;
    if first.len() as u64 != ENV_COPY || first.get(4) != Some(&1) {
        bail!("mkenvimage -r wrote an unexpected environment (not {ENV_COPY:#x} bytes, flags 1)");
    }
    let mut second = first.clone();
    second[4] = 0;
    let mut partition = vec![0u8; usize::try_from(ENV_MIB * MIB)?];
    let size = usize::try_from(ENV_COPY)?;
    partition[..size].copy_from_slice(&first);
    partition[size..2 * size].copy_from_slice(&second);
    fs::write(image, partition).with_context(|| format!("cannot write {}", image.display()))
}

/// The read-only flash bank with U-Boot's tuned environment (uboot-flash-env.txt beside the boot script).
fn write_flash(work: &Path, flash: &Path) -> anyhow::Result<()> {
    let env = work.join("uboot-flash-env.bin");
    run(Command::new("mkenvimage")
        .arg("-s")
        .arg(format!("{FLASH_ENV_SIZE:#x}"))
        .arg("-o")
        .arg(&env)
        .arg(boot_dir().join("uboot-flash-env.txt")))
    .context("mkenvimage (u-boot-tools) failed on meta-cardeploy/recipes-bsp/cardeploy-boot/files/uboot-flash-env.txt")?;
    let mut bank = fs::read(&env)?;
    bank.resize(usize::try_from(FLASH_BANK)?, 0);
    fs::write(flash, bank).with_context(|| format!("cannot write {}", flash.display()))
}

// ---------------------------------------------------------------------------------------------
// layout.json, versions.txt

/// The qemu command line the image is made for; `{disk}` stands for the disk's path.
fn qemu_args(flash: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "qemu-system-aarch64",
        "-M",
        "virt",
        "-cpu",
        "cortex-a57",
        "-smp",
        "1",
        "-m",
        "1024",
        "-nographic",
        "-bios",
        UBOOT,
        "-drive",
        "if=none,id=disk0,format=raw,file={disk}",
        "-device",
        "virtio-blk-pci,drive=disk0",
        "-netdev",
        "user,id=n0",
        // romfile=: no iPXE option ROM (Debian's qemu-system-arm does not ship efi-virtio.rom).
        "-device",
        "virtio-net-pci,netdev=n0,romfile=",
        "-drive",
    ]
    .map(str::to_owned)
    .to_vec();
    // Read-only: every qemu may share it, and U-Boot never saves its environment there.
    args.push(format!(
        "if=pflash,format=raw,unit=1,readonly=on,file={}",
        flash.display()
    ));
    args
}

fn write_layout(out: &Path, partitions: &[Partition], flash: &Path) -> anyhow::Result<()> {
    let layout = json!({
        "partitions": partitions.iter().map(|p| json!({
            "number": p.number,
            "name": p.name,
            "start": p.start,
            "size": p.size,
        })).collect::<Vec<_>>(),
        "uboot": UBOOT,
        "uboot_flash": flash,
        "qemu_args": qemu_args(flash),
        "compatible": COMPATIBLE,
    });
    let path = out.join("layout.json");
    fs::write(&path, serde_json::to_string_pretty(&layout)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))
}

fn write_versions(out: &Path, rootfs: &Packages, kernel: &Packages) -> anyhow::Result<()> {
    let date = output(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]))?;
    let mut text = format!(
        "# cardeploy qemu image: Debian packages used\nbuilt: {}\nsources: {}\n\
         \n## root filesystem: mmdebstrap --variant=extract --include={} (+ dependencies): {} \
         packages\n",
        date.trim(),
        sources(true).join(" | "),
        ROOTFS_PACKAGES.join(","),
        rootfs.len()
    );
    for (name, (version, arch)) in rootfs {
        let _ = writeln!(text, "{name} {version} {arch}");
    }
    let _ = writeln!(
        text,
        "\nremoved from the root filesystem: {}",
        PRUNE.join(", ")
    );
    let _ = writeln!(
        text,
        "removed: D-Bus files {PRUNE_DBUS_PREFIX}* (systemd's services) in {}",
        DBUS_DIRS.join(", ")
    );
    let _ = writeln!(
        text,
        "\n## kernel: {KERNEL_PACKAGE} (its Image and modules only; its dependencies are not in \
         the image)"
    );
    for (name, (version, arch)) in kernel.iter().filter(|(n, _)| n.starts_with("linux-image-")) {
        let _ = writeln!(text, "{name} {version} {arch}");
    }
    let _ = writeln!(text, "\n## host tools (amd64) that built and run the image");
    for package in APT_HOST {
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
                size as f64 / MIB as f64
            )
        })
        .collect();
    entries.sort();
    Ok(entries)
}
