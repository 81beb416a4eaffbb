//! Stage 1: the Debian arm64 packages of the image, the root filesystem's and the kernel's.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::debian::{self, Control, Packages};
use crate::sh::fresh_dir;

/// The root filesystem's packages; apt adds their dependencies (no recommends).
pub const ROOTFS_PACKAGES: &[&str] = &[
    "busybox-static",
    "rauc",
    "rauc-service",
    "dbus",
    "libubootenv-tool",
    "libgcc-s1",
    "libc6",
];
/// containerd, as k3s embeds it: its daemon and `ctr` go onto the data partition of the car the
/// qemu suites provision (not into the slots: they would nearly double every OS bundle), and the
/// image's `containerd-pull` service pulls from the agent's registry with them.
pub const CONTAINERD_PACKAGE: &str = "containerd";
pub const CONTAINERD_BINARIES: &[&str] = &["usr/bin/containerd", "usr/bin/ctr"];

/// The kernel comes from its own extraction: its dependencies (initramfs-tools, kmod, ...) are
/// not part of the image, only its Image and a few modules are.
pub const KERNEL_PACKAGE: &str = "linux-image-arm64";

/// `mmdebstrap --variant=extract` of `packages` (and their dependencies) into `tree`, from
/// bookworm with its updates and security fixes; the downloaded .debs are read for the package
/// list, then removed.
pub fn extract(tree: &Path, packages: &[&str]) -> anyhow::Result<Packages> {
    fresh_dir(tree)?;
    debian::extract(tree, packages, &debian::sources(true))?;
    let mut found = Packages::new();
    for deb in debian::debs(tree)? {
        let control = Control::read(&deb)?;
        let field = |name: &str| {
            control
                .field(name)
                .with_context(|| format!("{} has no {name}", deb.display()))
        };
        found.insert(
            field("Package")?,
            (field("Version")?, field("Architecture")?),
        );
        fs::remove_file(&deb).with_context(|| format!("cannot remove {}", deb.display()))?;
    }
    Ok(found)
}

pub struct Kernel {
    pub version: String,
    /// The uncompressed arm64 `Image` (Debian's vmlinuz is one), booted with `booti`.
    pub image: PathBuf,
    pub modules: PathBuf,
}

impl Kernel {
    pub fn find(tree: &Path) -> anyhow::Result<Self> {
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
