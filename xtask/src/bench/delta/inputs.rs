//! Input pairs for `cargo xtask bench delta`: real data from packages nobody here wrote.
//!
//! - `rootfs-security`: an aarch64 ext4 root filesystem image built from Debian 12 arm64
//!   packages; OLD = `bookworm` versions only, NEW = the same package set with
//!   `bookworm-updates`/`bookworm-security` versions where they are newer.
//! - `rootfs-step`: OLD = the `rootfs-security` NEW image; NEW = a larger product step (packages
//!   added and removed) at current versions.
//! - `layer-minor`: an uncompressed OCI layer tar of a Python application's site-packages for
//!   linux aarch64 (pandas), numpy moving a minor version.
//!
//! Root filesystems come from `mmdebstrap --variant=extract` (no maintainer scripts run, so no
//! emulation is needed); the dpkg database is written from the packages' own control data. Images
//! are reproducible: fixed SOURCE_DATE_EPOCH, `E2FSPROGS_FAKE_TIME`, fixed UUID and hash seed,
//! mtimes clamped, and atime/ctime of every inode set to the epoch with debugfs (mke2fs 1.47.0
//! copies them from the source tree). Each pair's directory holds `recipe.txt`; when it matches the
//! recipe below, the pair is reused as it is. Exact package versions go to `provenance.txt`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};

use crate::debian::{self, Control, MERGED_USR_HOOK, Packages, SOURCE_DATE_EPOCH};
use crate::host::{as_root, installed};
use crate::sh::{fresh_dir, output, root, run};

/// One benchmark input: OLD is what the car has, NEW what it should get.
pub struct Pair {
    pub name: String,
    pub title: String,
    pub old: PathBuf,
    pub new: PathBuf,
    pub provenance: PathBuf,
}

/// Bump when the way inputs are built changes, so recorded pairs are rebuilt.
const RECIPE_VERSION: u32 = 1;
/// Every image has this size (old and new alike), with room to spare for `rootfs-step`.
const IMAGE_MIB: u64 = 576;
const FS_UUID: &str = "c0ffee00-ca4d-4e91-8d1a-00000000e4c0";
const FS_HASH_SEED: &str = "5eed5eed-ca4d-4e91-8d1a-00000000e4c0";

/// apt packages the bench needs on the host besides the Debian package fetching
/// (`debian::HOST_TOOLS`): input building and the measured tools.
const APT_HOST: &[&str] = &[
    "e2fsprogs",
    "zstd",
    "xdelta3",
    "bsdiff",
    "casync",
    "time",
    "python3-venv",
];

/// The Essential:yes set of bookworm (the extract variant installs nothing by itself).
const ESSENTIAL: &[&str] = &[
    "base-files",
    "base-passwd",
    "bash",
    "bsdutils",
    "coreutils",
    "dash",
    "debconf",
    "debianutils",
    "diffutils",
    "dpkg",
    "findutils",
    "grep",
    "gzip",
    "hostname",
    "init-system-helpers",
    "libc-bin",
    "login",
    "mawk",
    "ncurses-base",
    "ncurses-bin",
    "perl-base",
    "sed",
    "sysvinit-utils",
    "tar",
    "util-linux",
];

/// An ECU-ish userland on top: init, device manager, IPC, networking, TLS, RAUC, CAN, Bluetooth,
/// Python, media. Dependencies are resolved by apt (no recommends).
const ECU: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "systemd-timesyncd",
    "udev",
    "dbus",
    "kmod",
    "iproute2",
    "iptables",
    "nftables",
    "iputils-ping",
    "busybox",
    "e2fsprogs",
    "procps",
    "less",
    "openssl",
    "ca-certificates",
    "curl",
    "openssh-server",
    "rauc",
    "can-utils",
    "bluez",
    "wpasupplicant",
    "sqlite3",
    "python3",
    "python3-dbus",
    "python3-gi",
    "fonts-dejavu-core",
    "tzdata",
    "gstreamer1.0-plugins-base",
    "gstreamer1.0-plugins-good",
];

/// `rootfs-step`: the next product release drops these (nftables replaces iptables, the
/// busybox rescue shell goes, CAN tools and Bluetooth move elsewhere) ...
const STEP_REMOVE: &[&str] = &["iptables", "busybox", "can-utils", "bluez"];
/// ... and adds these (NetworkManager with a cellular modem, numpy for on-board analytics).
const STEP_ADD: &[&str] = &[
    "network-manager",
    "modemmanager",
    "python3-numpy",
    "python3-serial",
];

/// `layer-minor`: wheels for CPython 3.11 on linux aarch64; pandas pinned, numpy moves a minor.
const PIP_TARGET: &[&str] = &[
    "--platform",
    "manylinux2014_aarch64",
    "--only-binary=:all:",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
];
const LAYER_COMMON: &[&str] = &[
    "pandas==2.3.2",
    "python-dateutil==2.9.0.post0",
    "pytz==2025.2",
    "tzdata==2025.2",
    "six==1.17.0",
];
const NUMPY_OLD: &str = "numpy==2.1.3";
const NUMPY_NEW: &str = "numpy==2.2.6";
const SITE_PACKAGES: &str = "usr/local/lib/python3.11/site-packages";

/// Builds (or reuses, when the recorded recipe is unchanged) every input pair under `work`.
pub fn build_inputs(work: &Path) -> anyhow::Result<Vec<Pair>> {
    let python = prerequisites()?;
    fs::create_dir_all(work).with_context(|| format!("cannot create {}", work.display()))?;
    let security = rootfs_security(work)?;
    let step = rootfs_step(work, &security)?;
    let layer = layer_minor(work, &python)?;
    let scratch = work.join("scratch");
    if scratch.exists() {
        fs::remove_dir_all(&scratch)
            .with_context(|| format!("cannot remove {}", scratch.display()))?;
    }
    Ok(vec![security, step, layer])
}

/// Installs what the bench needs (idempotent): the arm64 foreign architecture, the apt packages
/// of [`APT_HOST`] and the repository's Python venv. Returns the venv's python.
pub(crate) fn prerequisites() -> anyhow::Result<PathBuf> {
    static DONE: AtomicBool = AtomicBool::new(false);
    let python = root().join(".venv/bin/python");
    if DONE.load(Ordering::Relaxed) {
        return Ok(python);
    }
    let arches = Command::new("dpkg")
        .arg("--print-foreign-architectures")
        .output()
        .context("cannot run dpkg")?;
    let has_arm64 = String::from_utf8_lossy(&arches.stdout)
        .split_whitespace()
        .any(|a| a == "arm64");
    let missing: Vec<&str> = APT_HOST
        .iter()
        .chain(debian::HOST_TOOLS)
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if !has_arm64 || !missing.is_empty() {
        if !as_root() {
            bail!(
                "the delta bench needs root to add the arm64 architecture and install {missing:?}"
            );
        }
        if !has_arm64 {
            run(Command::new("dpkg").args(["--add-architecture", "arm64"]))?;
        }
        run(Command::new("apt-get").args(["update", "-q"]))?;
        if !missing.is_empty() {
            run(Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"))?;
        }
    }
    if !python.exists() {
        run(Command::new("python3")
            .args(["-m", "venv"])
            .arg(root().join(".venv")))?;
    }
    DONE.store(true, Ordering::Relaxed);
    Ok(python)
}

// ---------------------------------------------------------------------------------------------
// root filesystems

fn security_set() -> Vec<&'static str> {
    ESSENTIAL.iter().chain(ECU).copied().collect()
}

fn step_set() -> Vec<&'static str> {
    ESSENTIAL
        .iter()
        .chain(ECU)
        .filter(|p| !STEP_REMOVE.contains(p))
        .chain(STEP_ADD)
        .copied()
        .collect()
}

fn rootfs_recipe(what: &str, includes: &[&str], sources: &[String]) -> String {
    format!(
        "{what}: mmdebstrap --variant=extract --architectures=arm64 --setup-hook={MERGED_USR_HOOK}\n\
         \x20 sources: {}\n\
         \x20 include: {}\n\
         \x20 image: ext4, {IMAGE_MIB} MiB, 4 KiB blocks, uuid {FS_UUID}, hash_seed {FS_HASH_SEED}, \
         SOURCE_DATE_EPOCH {SOURCE_DATE_EPOCH}\n",
        sources.join(" | "),
        includes.join(",")
    )
}

fn rootfs_security(work: &Path) -> anyhow::Result<Pair> {
    let dir = work.join("rootfs-security");
    let (old_set, new_set) = (security_set(), security_set());
    let recipe = format!(
        "cardeploy bench input rootfs-security, recipe v{RECIPE_VERSION}\n{}{}",
        rootfs_recipe("old", &old_set, &debian::sources(false)),
        rootfs_recipe("new", &new_set, &debian::sources(true)),
    );
    let pair = Pair {
        name: "rootfs-security".into(),
        title: "aarch64 rootfs ext4 image, Debian 12 point release -> security/updates".into(),
        old: dir.join("old.img"),
        new: dir.join("new.img"),
        provenance: dir.join("provenance.txt"),
    };
    if reusable(&dir, &recipe, &pair) {
        eprintln!("bench inputs: reusing {}", dir.display());
        return Ok(pair);
    }
    fresh_dir(&dir)?;
    let scratch = work.join("scratch");
    let old = build_rootfs(&scratch, &old_set, &debian::sources(false), &pair.old)?;
    let new = build_rootfs(&scratch, &new_set, &debian::sources(true), &pair.new)?;
    let mut text = provenance_header(&pair, &recipe)?;
    text.push_str(&package_diff(&old, &new));
    text.push_str(&package_list("OLD packages (bookworm only)", &old));
    text.push_str(&package_list(
        "NEW packages (bookworm + bookworm-updates + bookworm-security, newest wins)",
        &new,
    ));
    finish(&dir, &recipe, &pair, &text)?;
    Ok(pair)
}

fn rootfs_step(work: &Path, security: &Pair) -> anyhow::Result<Pair> {
    let dir = work.join("rootfs-step");
    let new_set = step_set();
    let security_recipe = fs::read_to_string(security.provenance.with_file_name("recipe.txt"))
        .context("rootfs-security has no recipe.txt")?;
    let recipe = format!(
        "cardeploy bench input rootfs-step, recipe v{RECIPE_VERSION}\n\
         old: the NEW image of\n{security_recipe}\
         removed from the include list: {}\n\
         added to the include list: {}\n{}",
        STEP_REMOVE.join(","),
        STEP_ADD.join(","),
        rootfs_recipe("new", &new_set, &debian::sources(true)),
    );
    let pair = Pair {
        name: "rootfs-step".into(),
        title: "aarch64 rootfs ext4 image, next product step: packages added and removed".into(),
        old: dir.join("old.img"),
        new: dir.join("new.img"),
        provenance: dir.join("provenance.txt"),
    };
    if reusable(&dir, &recipe, &pair) && same_content(&pair.old, &security.new)? {
        eprintln!("bench inputs: reusing {}", dir.display());
        return Ok(pair);
    }
    fresh_dir(&dir)?;
    // OLD is the security pair's NEW image, shared by a hard link.
    if fs::hard_link(&security.new, &pair.old).is_err() {
        fs::copy(&security.new, &pair.old)
            .with_context(|| format!("cannot copy {}", security.new.display()))?;
    }
    let old = read_package_section(&security.provenance, "NEW packages")?;
    let new = build_rootfs(
        &work.join("scratch"),
        &new_set,
        &debian::sources(true),
        &pair.new,
    )?;
    let mut text = provenance_header(&pair, &recipe)?;
    text.push_str(&package_diff(&old, &new));
    text.push_str(&package_list("NEW packages (current versions)", &new));
    finish(&dir, &recipe, &pair, &text)?;
    Ok(pair)
}

/// mmdebstrap (extract variant) into a scratch tree, the dpkg database from the packages' control
/// data, fixed host-dependent files, clamped mtimes, then a reproducible ext4 image.
fn build_rootfs(
    scratch: &Path,
    includes: &[&str],
    sources: &[String],
    image: &Path,
) -> anyhow::Result<Packages> {
    let (tree, packages) = build_tree(scratch, includes, sources)?;
    make_ext4(&tree, image)?;
    fs::remove_dir_all(&tree).with_context(|| format!("cannot remove {}", tree.display()))?;
    Ok(packages)
}

/// The tree of [`build_rootfs`] under `scratch/rootfs`, before it becomes an image.
fn build_tree(
    scratch: &Path,
    includes: &[&str],
    sources: &[String],
) -> anyhow::Result<(PathBuf, Packages)> {
    let tree = scratch.join("rootfs");
    if tree.exists() {
        fs::remove_dir_all(&tree).with_context(|| format!("cannot remove {}", tree.display()))?;
    }
    fs::create_dir_all(&tree)?;
    debian::extract(&tree, includes, sources)?;
    let packages = dpkg_database(scratch, &tree)?;
    // apt's binary caches (kept with the .debs) embed build times; apt regenerates them anyway.
    for cache in ["pkgcache.bin", "srcpkgcache.bin"] {
        let path = tree.join("var/cache/apt").join(cache);
        if path.exists() {
            fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    for (file, content) in [
        ("etc/hostname", "ecu\n"),
        (
            "etc/resolv.conf",
            "nameserver 127.0.0.53\noptions edns0 trust-ad\n",
        ),
        ("etc/machine-id", ""),
    ] {
        fs::write(tree.join(file), content).with_context(|| format!("cannot write {file}"))?;
    }
    run(Command::new("find")
        .arg(&tree)
        .args(["-newermt", &format!("@{SOURCE_DATE_EPOCH}")])
        .args(["-exec", "touch", "-h", "-c", "-d"])
        .arg(format!("@{SOURCE_DATE_EPOCH}"))
        .args(["{}", "+"]))?;
    Ok((tree, packages))
}

/// Writes `/var/lib/dpkg/status` and `/var/lib/dpkg/info/*` (file lists, md5sums, conffiles,
/// maintainer scripts) as dpkg would have after unpacking, from the downloaded .debs, then removes
/// the .debs. Returns the package set.
fn dpkg_database(scratch: &Path, tree: &Path) -> anyhow::Result<Packages> {
    let info = tree.join("var/lib/dpkg/info");
    let ctrl = scratch.join("control");
    let debs = debian::debs(tree)?;
    // The merged-usr hook registers a dummy package; it is not part of the image.
    for entry in fs::read_dir(&info)?.filter_map(Result::ok) {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with("usr-is-merged.")
        {
            fs::remove_file(entry.path())?;
        }
    }
    let mut packages = Packages::new();
    let mut status: BTreeMap<String, String> = BTreeMap::new();
    for deb in &debs {
        let control = Control::read(deb)?;
        let field = |name: &str| control.field(name);
        let name = field("Package").with_context(|| format!("{} has no Package", deb.display()))?;
        let version = field("Version").unwrap_or_default();
        let arch = field("Architecture").unwrap_or_default();
        let key = if field("Multi-Arch").as_deref() == Some("same") {
            format!("{name}:{arch}")
        } else {
            name.clone()
        };
        let mut paragraph = String::new();
        for line in control.text.lines() {
            paragraph.push_str(line);
            paragraph.push('\n');
            if line.starts_with("Package: ") {
                paragraph.push_str("Status: install ok installed\n");
            }
        }
        status.insert(key.clone(), paragraph);
        if ctrl.exists() {
            fs::remove_dir_all(&ctrl)?;
        }
        output(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&ctrl))?;
        for entry in fs::read_dir(&ctrl)?.filter_map(Result::ok) {
            let member = entry.file_name().to_string_lossy().into_owned();
            if member != "control" {
                fs::rename(entry.path(), info.join(format!("{key}.{member}")))?;
            }
        }
        let listing = output(
            Command::new("bash")
                .args([
                    "-c",
                    "set -o pipefail; dpkg-deb --fsys-tarfile \"$1\" | tar -t",
                    "-",
                ])
                .arg(deb),
        )?;
        let mut list = String::new();
        for path in listing.lines() {
            let path = path.trim_start_matches('.').trim_end_matches('/');
            list.push_str(if path.is_empty() { "/." } else { path });
            list.push('\n');
        }
        fs::write(info.join(format!("{key}.list")), list)?;
        packages.insert(key, (version, arch));
    }
    let status: Vec<String> = status.into_values().collect();
    fs::write(tree.join("var/lib/dpkg/status"), status.join("\n"))?;
    for deb in &debs {
        fs::remove_file(deb)?;
    }
    Ok(packages)
}

/// A fixed-size ext4 image from `tree`, byte-for-byte reproducible.
fn make_ext4(tree: &Path, image: &Path) -> anyhow::Result<()> {
    let _ = fs::remove_file(image);
    fs::File::create(image)
        .and_then(|f| f.set_len(IMAGE_MIB << 20))
        .with_context(|| format!("cannot create {}", image.display()))?;
    let epoch = SOURCE_DATE_EPOCH.to_string();
    run(Command::new("mkfs.ext4")
        .args([
            "-q", "-F", "-T", "default", "-b", "4096", "-I", "256", "-L", "rootfs",
        ])
        .args(["-U", FS_UUID])
        .arg("-E")
        .arg(format!("hash_seed={FS_HASH_SEED},root_owner=0:0"))
        .arg("-d")
        .arg(tree)
        .arg(image)
        .env("E2FSPROGS_FAKE_TIME", &epoch)
        .env("SOURCE_DATE_EPOCH", &epoch))?;
    // mke2fs -d copies atime and ctime from the source tree: set them to the epoch.
    let dump = output(Command::new("dumpe2fs").arg(image))?;
    let mut script = String::new();
    for inode in used_inodes(&dump)? {
        let _ = writeln!(script, "sif <{inode}> atime @{epoch}");
        let _ = writeln!(script, "sif <{inode}> ctime @{epoch}");
    }
    let script_path = image.with_extension("debugfs");
    fs::write(&script_path, script)?;
    let done = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&script_path)
        .arg(image)
        // otherwise closing a busy session stamps the superblock's write time with the clock
        .env("E2FSPROGS_FAKE_TIME", &epoch)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("cannot run debugfs")?;
    fs::remove_file(&script_path)?;
    if !done.success() {
        bail!("debugfs failed on {}", image.display());
    }
    run(Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(image)
        .stdout(Stdio::null()))?;
    Ok(())
}

/// Inodes in use, from dumpe2fs's per-group "Free inodes:" ranges.
fn used_inodes(dump: &str) -> anyhow::Result<Vec<u64>> {
    let number = |key: &str| -> anyhow::Result<u64> {
        dump.lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
            .with_context(|| format!("dumpe2fs shows no {key}"))
    };
    let count = number("Inode count:")?;
    let per_group = number("Inodes per group:")?;
    let mut free = BTreeSet::new();
    let mut groups = 0;
    for line in dump.lines() {
        let Some(ranges) = line.trim().strip_prefix("Free inodes:") else {
            continue;
        };
        if line.starts_with("Free inodes:") {
            continue; // the superblock's total, not a group
        }
        groups += 1;
        for range in ranges.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            let (a, b) = range.split_once('-').unwrap_or((range, range));
            let (a, b): (u64, u64) = (a.parse()?, b.parse()?);
            free.extend(a..=b);
        }
    }
    if groups * per_group != count {
        bail!("dumpe2fs: {groups} groups of {per_group} inodes, but {count} inodes");
    }
    Ok((1..=count).filter(|i| !free.contains(i)).collect())
}

// ---------------------------------------------------------------------------------------------
// OCI layers

/// The base under [`layer_minor`]'s application layer in `cargo xtask bench containers`: what a
/// `python:3.11-slim`-like image's base layer holds, from Debian 12 arm64 packages.
const BASE_PYTHON: &[&str] = &["python3", "ca-certificates", "tzdata"];

/// `base-python/layer.tar`: the Essential set and [`BASE_PYTHON`] as one reproducible layer tar
/// (the dpkg database written as for the root filesystems; mtimes clamped, owners root).
pub(crate) fn base_layer(work: &Path) -> anyhow::Result<PathBuf> {
    let dir = work.join("base-python");
    let includes: Vec<&str> = ESSENTIAL.iter().chain(BASE_PYTHON).copied().collect();
    let sources = debian::sources(true);
    let recipe = format!(
        "cardeploy bench input base-python, recipe v{RECIPE_VERSION}\n\
         mmdebstrap --variant=extract --architectures=arm64 --setup-hook={MERGED_USR_HOOK}\n\
         \x20 sources: {}\n\
         \x20 include: {}\n\
         tar --sort=name --mtime=@{SOURCE_DATE_EPOCH} --owner=0 --group=0 --numeric-owner\n",
        sources.join(" | "),
        includes.join(","),
    );
    let layer = dir.join("layer.tar");
    if fs::read_to_string(dir.join("recipe.txt")).is_ok_and(|r| r == recipe) && layer.is_file() {
        eprintln!("bench inputs: reusing {}", dir.display());
        return Ok(layer);
    }
    fresh_dir(&dir)?;
    let scratch = work.join("scratch");
    let (tree, packages) = build_tree(&scratch, &includes, &sources)?;
    run(Command::new("tar")
        .arg("-C")
        .arg(&tree)
        .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
        .arg(format!("--mtime=@{SOURCE_DATE_EPOCH}"))
        .arg("-cf")
        .arg(&layer)
        .arg("."))?;
    fs::remove_dir_all(&tree).with_context(|| format!("cannot remove {}", tree.display()))?;
    fs::write(
        dir.join("provenance.txt"),
        package_list("packages (bookworm + updates + security)", &packages),
    )?;
    fs::write(dir.join("recipe.txt"), recipe)?;
    Ok(layer)
}

pub(crate) fn layer_minor(work: &Path, python: &Path) -> anyhow::Result<Pair> {
    let dir = work.join("layer-minor");
    let recipe = format!(
        "cardeploy bench input layer-minor, recipe v{RECIPE_VERSION}\n\
         pip wheels: {} | old: {NUMPY_OLD} | new: {NUMPY_NEW}\n\
         pip install --no-deps --no-compile --target /{SITE_PACKAGES} {}; scripts to \
         /usr/local/bin with #!/usr/local/bin/python3.11\n\
         python -m compileall --invalidation-mode checked-hash -d /{SITE_PACKAGES}\n\
         tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf layer.tar usr\n",
        LAYER_COMMON.join(" "),
        PIP_TARGET.join(" "),
    );
    let pair = Pair {
        name: "layer-minor".into(),
        title: "OCI layer tar: pandas site-packages for aarch64, numpy 2.1 -> 2.2".into(),
        old: dir.join("old.tar"),
        new: dir.join("new.tar"),
        provenance: dir.join("provenance.txt"),
    };
    if reusable(&dir, &recipe, &pair) {
        eprintln!("bench inputs: reusing {}", dir.display());
        return Ok(pair);
    }
    fresh_dir(&dir)?;
    let wheels = dir.join("wheels");
    // One download per variant: pip refuses two versions of numpy in one resolution.
    for numpy in [NUMPY_OLD, NUMPY_NEW] {
        run(Command::new(python)
            .args([
                "-m",
                "pip",
                "download",
                "-q",
                "--disable-pip-version-check",
                "--no-deps",
            ])
            .arg("--dest")
            .arg(&wheels)
            .args(PIP_TARGET)
            .args(LAYER_COMMON)
            .arg(numpy))?;
    }
    let scratch = work.join("scratch");
    for (numpy, tar) in [(NUMPY_OLD, &pair.old), (NUMPY_NEW, &pair.new)] {
        let tree = scratch.join("layer");
        if tree.exists() {
            fs::remove_dir_all(&tree)?;
        }
        let site = tree.join(SITE_PACKAGES);
        let files = LAYER_COMMON
            .iter()
            .chain([&numpy])
            .map(|pin| wheel_file(&wheels, pin))
            .collect::<anyhow::Result<Vec<_>>>()?;
        run(Command::new(python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(["--no-deps", "--no-compile", "--no-index", "--target"])
            .arg(&site)
            .args(PIP_TARGET)
            .args(&files))?;
        // Console scripts belong in /usr/local/bin with the image's interpreter.
        let bin = tree.join("usr/local/bin");
        fs::rename(site.join("bin"), &bin).context("pip installed no scripts")?;
        for entry in fs::read_dir(&bin)?.filter_map(Result::ok) {
            let text = fs::read_to_string(entry.path())?;
            if let Some((_, rest)) = text.split_once('\n').filter(|_| text.starts_with("#!")) {
                fs::write(entry.path(), format!("#!/usr/local/bin/python3.11\n{rest}"))?;
            }
        }
        run(Command::new(python)
            .args([
                "-m",
                "compileall",
                "-q",
                "--invalidation-mode",
                "checked-hash",
                "-d",
            ])
            .arg(format!("/{SITE_PACKAGES}"))
            .arg(&site)
            .stdout(Stdio::null()))?;
        run(Command::new("tar")
            .arg("-C")
            .arg(&tree)
            .args([
                "--sort=name",
                "--mtime=@0",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
            ])
            .arg("-cf")
            .arg(tar)
            .arg("usr"))?;
        fs::remove_dir_all(&tree)?;
    }
    let mut text = provenance_header(&pair, &recipe)?;
    text.push_str("\nwheels (PyPI, sha256):\n");
    text.push_str(&output(
        Command::new("sha256sum").current_dir(&wheels).args(
            fs::read_dir(&wheels)?
                .filter_map(Result::ok)
                .map(|e| e.file_name())
                .collect::<BTreeSet<_>>(),
        ),
    )?);
    let _ = writeln!(
        text,
        "\nOLD layer: {} + {NUMPY_OLD}",
        LAYER_COMMON.join(" ")
    );
    let _ = writeln!(text, "NEW layer: {} + {NUMPY_NEW}", LAYER_COMMON.join(" "));
    finish(&dir, &recipe, &pair, &text)?;
    Ok(pair)
}

/// The downloaded wheel for `name==version`.
fn wheel_file(wheels: &Path, pin: &str) -> anyhow::Result<PathBuf> {
    let (name, version) = pin.split_once("==").context("pins are name==version")?;
    let prefix = format!("{}-{version}-", name.replace('-', "_")).to_lowercase();
    fs::read_dir(wheels)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().to_lowercase().starts_with(&prefix))
        })
        .with_context(|| format!("no wheel for {pin} in {}", wheels.display()))
}

// ---------------------------------------------------------------------------------------------
// recipes and provenance

fn reusable(dir: &Path, recipe: &str, pair: &Pair) -> bool {
    fs::read_to_string(dir.join("recipe.txt")).is_ok_and(|r| r == recipe)
        && [&pair.old, &pair.new, &pair.provenance]
            .iter()
            .all(|p| p.is_file())
}

/// The same file (hard link), or byte-identical.
fn same_content(a: &Path, b: &Path) -> anyhow::Result<bool> {
    use std::os::unix::fs::MetadataExt as _;
    let (Ok(ma), Ok(mb)) = (fs::metadata(a), fs::metadata(b)) else {
        return Ok(false);
    };
    if (ma.dev(), ma.ino()) == (mb.dev(), mb.ino()) {
        return Ok(true);
    }
    let same = Command::new("cmp")
        .arg("-s")
        .arg(a)
        .arg(b)
        .status()
        .context("cannot run cmp")?;
    Ok(same.success())
}

/// Writes the provenance, then the recipe: a pair counts as built only once recipe.txt exists.
fn finish(dir: &Path, recipe: &str, pair: &Pair, provenance: &str) -> anyhow::Result<()> {
    fs::write(&pair.provenance, provenance)?;
    fs::write(dir.join("recipe.txt"), recipe)?;
    Ok(())
}

fn provenance_header(pair: &Pair, recipe: &str) -> anyhow::Result<String> {
    let mut text = format!("# {}: {}\n\n{recipe}\n", pair.name, pair.title);
    for (what, path) in [("OLD", &pair.old), ("NEW", &pair.new)] {
        let size = fs::metadata(path)?.len();
        let sum = output(Command::new("sha256sum").arg(path))?;
        let sum = sum.split_whitespace().next().unwrap_or_default();
        let _ = writeln!(
            text,
            "{what}: {} ({size} bytes) sha256 {sum}",
            path.display()
        );
    }
    Ok(text)
}

fn package_list(title: &str, packages: &Packages) -> String {
    let mut text = format!("\n## {title}: {} packages\n", packages.len());
    for (name, (version, arch)) in packages {
        let _ = writeln!(text, "{name} {version} {arch}");
    }
    text
}

fn package_diff(old: &Packages, new: &Packages) -> String {
    let (mut changed, mut added, mut removed) = (String::new(), String::new(), String::new());
    let (mut n_changed, mut n_added, mut n_removed) = (0, 0, 0);
    for (name, (version, _)) in new {
        match old.get(name) {
            Some((was, _)) if was != version => {
                n_changed += 1;
                let _ = writeln!(changed, "{name} {was} -> {version}");
            }
            Some(_) => {}
            None => {
                n_added += 1;
                let _ = writeln!(added, "{name} {version}");
            }
        }
    }
    for (name, (version, _)) in old {
        if !new.contains_key(name) {
            n_removed += 1;
            let _ = writeln!(removed, "{name} {version}");
        }
    }
    format!(
        "\n## versions changed: {n_changed}\n{changed}\n## added: {n_added}\n{added}\n\
         ## removed: {n_removed}\n{removed}"
    )
}

/// Reads back a package list written by [`package_list`] (the section whose title starts so).
fn read_package_section(provenance: &Path, title: &str) -> anyhow::Result<Packages> {
    let text = fs::read_to_string(provenance)
        .with_context(|| format!("cannot read {}", provenance.display()))?;
    let mut packages = Packages::new();
    let mut inside = false;
    for line in text.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            inside = heading.starts_with(title);
        } else if inside {
            let mut fields = line.split_whitespace();
            if let (Some(n), Some(v), Some(a)) = (fields.next(), fields.next(), fields.next()) {
                packages.insert(n.into(), (v.into(), a.into()));
            }
        }
    }
    if packages.is_empty() {
        bail!("{} has no section {title}", provenance.display());
    }
    Ok(packages)
}
