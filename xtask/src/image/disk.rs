//! Stage 4: the disk. GPT on a plain file (no loop devices): `boot` with the boot script,
//! `uboot-env` with the boot-counting environment, the two slots, `data`; and U-Boot's read-only
//! flash environment. Slot and partition images are ext4 made with `mkfs.ext4 -d`.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

use super::files::boot_dir;
use crate::debian::SOURCE_DATE_EPOCH;
use crate::sh::{fresh_dir, output, run};

/// Debian's U-Boot for qemu's `virt` machine, started with `-bios`.
pub const UBOOT: &str = "/usr/lib/u-boot/qemu_arm64/u-boot.bin";

/// Partitions in disk order, sizes in MiB. The slots hold a ~85 MiB root filesystem.
const BOOT_MIB: u64 = 8;
const ENV_MIB: u64 = 1;
pub const SLOT_MIB: u64 = 160;
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
pub const MIB: u64 = 1 << 20;

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

/// The file-system UUID of every slot image (see `make_ext4`).
const FS_UUID: &str = "c4d0e1a2-5b6c-4d7e-8f90-a1b2c3d4e5f6";

/// An ext4 image of `mib` MiB holding `tree` (mkfs.ext4 -d, no loop device).
pub fn make_ext4(tree: &Path, image: &Path, mib: u64, label: &str) -> anyhow::Result<()> {
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

pub fn used_mib(image: &Path) -> anyhow::Result<u64> {
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

pub struct Partition {
    pub number: usize,
    pub name: &'static str,
    pub start: u64,
    pub size: u64,
}

/// GPT with sfdisk on a plain file, each partition written with `dd conv=notrunc`.
pub fn write_disk(work: &Path, disk: &Path, factory: &Path) -> anyhow::Result<Vec<Partition>> {
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
pub fn write_flash(work: &Path, flash: &Path) -> anyhow::Result<()> {
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

/// The qemu command line the image is made for; `{disk}` stands for the disk's path.
pub fn qemu_args(flash: &Path) -> Vec<String> {
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
