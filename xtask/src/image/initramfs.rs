//! Stage 2: the kernel modules the boot needs, in load order, and the initramfs that loads the
//! disk's before /init mounts the slot (Debian's arm64 kernel has virtio and ext4 as modules).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::Context;

use super::files::read_image_file;
use super::packages::Kernel;
use crate::debian::SOURCE_DATE_EPOCH;
/// Loaded by the initramfs, in dependency order: the virtio PCI disk and ext4.
pub const INITRAMFS_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"];
/// Loaded by rcS: the network card, and loop + squashfs for RAUC's bundle mounts.
pub const ROOTFS_MODULES: &[&str] = &["virtio_net", "loop", "squashfs"];

/// `modules.dep` (from depmod): module name -> (path relative to the modules dir, dependencies).
pub struct ModuleDeps {
    by_name: BTreeMap<String, String>,
    deps: BTreeMap<String, Vec<String>>,
    builtin: BTreeSet<String>,
}

impl ModuleDeps {
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
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
    pub fn load_order(
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
pub fn write_initramfs(
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
