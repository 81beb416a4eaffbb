//! A real RAUC on a private, system-like D-Bus for tests: `dbus-daemon` with an allow-all policy
//! on a socket in a temp dir, `rauc service` with two file-backed ext4 slots (`rootfs.0` = `A`,
//! `rootfs.1` = `B`), a custom bootloader backend script that keeps the primary slot and each
//! slot's good/bad in files, and a self-signed certificate as keyring and bundle signer.
//!
//! Everything is synchronous ([`std::process::Command`]); [`RaucSystem::start`] blocks for the
//! fraction of a second RAUC needs to come up, which is fine inside a `#[tokio::test]`.
//!
//! Installing needs root and `/dev/loop-control` (RAUC loop-mounts the bundle); [`unavailable`]
//! says why a test cannot run here.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long RAUC or the bus may take to come up before `start`/`restart` give up.
const STARTUP: Duration = Duration::from_secs(20);
const SLOT_SIZE: u64 = 32 * 1024 * 1024;
const IMAGE_SIZE: u64 = 24 * 1024 * 1024;
/// The bootnames of the two slots, in slot order.
const BOOTNAMES: [&str; 2] = ["A", "B"];

/// Who signs a bundle built by [`RaucSystem::bundle`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signer {
    /// The certificate in RAUC's keyring.
    Trusted,
    /// Another self-signed certificate, not in the keyring.
    Untrusted,
}

/// Why RAUC tests cannot run on this machine, or `None` when they can.
pub fn unavailable() -> Option<String> {
    let mut why = Vec::new();
    let missing: Vec<&str> = [
        "rauc",
        "dbus-daemon",
        "dbus-send",
        "mksquashfs",
        "mkfs.ext4",
        "debugfs",
        "openssl",
    ]
    .into_iter()
    .filter(|p| program(p).is_none())
    .collect();
    if !missing.is_empty() {
        why.push(format!(
            "missing programs: {} (Debian: apt-get install rauc rauc-service squashfs-tools e2fsprogs dbus openssl)",
            missing.join(", ")
        ));
    }
    if !crate::procs::is_root() {
        why.push("not root (RAUC installs need /dev/loop-control)".to_owned());
    }
    if !Path::new("/dev/loop-control").exists() {
        why.push("no /dev/loop-control (loop devices unavailable)".to_owned());
    }
    (!why.is_empty()).then(|| why.join("; "))
}

/// For tests: true (after saying so on the real stderr, which the test harness does not capture)
/// when RAUC tests cannot run here. Under `CI=true` a missing dependency is a failure, never a
/// skip: CI must not report as passed what it did not run.
pub fn skipped() -> bool {
    match unavailable() {
        Some(why) => {
            crate::cannot_run("the RAUC tests", &why);
            true
        }
        None => false,
    }
}

/// A private dbus-daemon with `rauc service` on it. Drop stops both and unmounts whatever RAUC
/// left mounted under the temp dir.
#[derive(Debug)]
pub struct RaucSystem {
    dir: tempfile::TempDir,
    bus: Child,
    bus_address: String,
    service: Option<Child>,
}

impl RaucSystem {
    /// Starts the bus and RAUC with system compatible `compatible`, booted from slot `booted`
    /// (`A` or `B`, which is also the initial primary). Blocks until RAUC answers on the bus.
    pub fn start(compatible: &str, booted: &str) -> io::Result<RaucSystem> {
        if !BOOTNAMES.contains(&booted) {
            return Err(invalid(format!(
                "booted slot must be A or B, not {booted:?}"
            )));
        }
        let dir = tempfile::Builder::new().prefix("rauc-").tempdir()?;
        let root = dir.path().to_path_buf();
        let root_str = root
            .to_str()
            .filter(|s| !s.contains(['\'', '\n', '<', '>', '&', '"']))
            .ok_or_else(|| invalid(format!("unusable temp dir {}", root.display())))?
            .to_owned();

        make_cert(&root, "signer", "cardeploy test signer")?;

        fs::create_dir_all(root.join("mnt"))?;
        let boot = root.join("boot");
        fs::create_dir_all(&boot)?;
        fs::write(boot.join("primary"), format!("{booted}\n"))?;
        for bootname in BOOTNAMES {
            fs::write(boot.join(format!("state.{bootname}")), "good\n")?;
            let slot = root.join(format!("slot-{bootname}.img"));
            fs::File::create(&slot)?.set_len(SLOT_SIZE)?;
            run(Command::new(need("mkfs.ext4")?)
                .args(["-q", "-F"])
                .arg(&slot))?;
        }
        write_backend(&root, &root_str)?;
        fs::write(root.join("system.conf"), system_conf(&root_str, compatible))?;
        fs::write(
            root.join("bus.conf"),
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={root_str}/bus.sock</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#
            ),
        )?;

        let (bus, bus_address) = start_bus(&root)?;
        let mut system = RaucSystem {
            dir,
            bus,
            bus_address,
            service: None,
        };
        system.start_service(booted)?;
        Ok(system)
    }

    /// The private bus, `unix:path=...` (as dbus-daemon printed it, with its guid).
    pub fn bus_address(&self) -> &str {
        &self.bus_address
    }

    /// The temp dir holding everything: configs, slots, backend state, logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The file behind slot `A` or `B`.
    pub fn slot_path(&self, bootname: &str) -> PathBuf {
        self.dir().join(format!("slot-{bootname}.img"))
    }

    /// The backend's file holding the primary slot's bootname.
    pub fn primary_file(&self) -> PathBuf {
        self.dir().join("boot").join("primary")
    }

    /// What the bootloader backend holds: the primary bootname and each slot's `good`/`bad`.
    pub fn bootloader_state(&self) -> (Option<String>, BTreeMap<String, String>) {
        let read = |p: PathBuf| {
            fs::read_to_string(p)
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        };
        let primary = read(self.primary_file());
        let states = BOOTNAMES
            .iter()
            .filter_map(|b| {
                let state = read(self.dir().join("boot").join(format!("state.{b}")))?;
                Some(((*b).to_owned(), state))
            })
            .collect();
        (primary, states)
    }

    /// Makes every `set-primary`/`set-state` of the bootloader backend wait `delay` first
    /// (`Duration::ZERO` removes the wait). An installation calls both, so it then takes at
    /// least `2 × delay`: time for a test to act while RAUC installs. `Mark` slows down too.
    pub fn slow_bootloader(&self, delay: Duration) -> io::Result<()> {
        let file = self.dir().join("boot").join("delay");
        if delay.is_zero() {
            return match fs::remove_file(file) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        fs::write(file, format!("{:.3}\n", delay.as_secs_f64()))
    }

    /// A slowed bootloader write is waiting right now (see [`Self::slow_bootloader`]): RAUC is
    /// in the middle of an installation.
    pub fn bootloader_in_delay(&self) -> bool {
        self.dir().join("boot").join("in-delay").exists()
    }

    /// Everything `rauc service` wrote to stdout and stderr, over all its (re)starts.
    pub fn service_log(&self) -> String {
        fs::read(self.dir().join("service.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// A reboot as RAUC sees it: the service stops (SIGTERM) and starts again booted from
    /// `booted`. The bus and all files stay.
    pub fn restart(&mut self, booted: &str) -> io::Result<()> {
        if !BOOTNAMES.contains(&booted) {
            return Err(invalid(format!(
                "booted slot must be A or B, not {booted:?}"
            )));
        }
        if let Some(mut child) = self.service.take() {
            terminate(&mut child);
        }
        // A new RAUC asking for the name before the bus has seen the old one go would be refused.
        self.wait_until_off_the_bus()?;
        self.start_service(booted)
    }

    /// SIGKILLs the service, as a crash would (mid-install, say). Returns once the bus has seen
    /// it go, so that later calls find no RAUC rather than one that died mid-call.
    pub fn kill_service(&mut self) {
        if let Some(mut child) = self.service.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Err(e) = self.wait_until_off_the_bus() {
            eprintln!("RaucSystem::kill_service: {e}");
        }
    }

    /// The bus notices that a client died or quit a moment after its process is gone.
    fn wait_until_off_the_bus(&self) -> io::Result<()> {
        let since = Instant::now();
        while self.rauc_on_bus()? {
            if since.elapsed() > STARTUP {
                return Err(io::Error::other(format!(
                    "de.pengutronix.rauc is still owned on the bus {STARTUP:?} after RAUC ended"
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Whether anyone owns `de.pengutronix.rauc` on our bus.
    fn rauc_on_bus(&self) -> io::Result<bool> {
        let out = Command::new(need("dbus-send")?)
            .arg(format!("--bus={}", self.bus_address))
            .args(["--print-reply", "--dest=org.freedesktop.DBus"])
            .args(["/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner"])
            .arg("string:de.pengutronix.rauc")
            .stdin(Stdio::null())
            .output()?;
        let reply = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && reply.contains("boolean true") {
            Ok(true)
        } else if out.status.success() && reply.contains("boolean false") {
            Ok(false)
        } else {
            Err(io::Error::other(format!(
                "dbus-send NameHasOwner failed: {reply}{}",
                String::from_utf8_lossy(&out.stderr)
            )))
        }
    }

    /// Builds a plain-format bundle at `out` (replacing it) holding one ext4 image for class
    /// `rootfs`, made of `files` (paths relative to the image root), for `compatible` and
    /// `version`, signed by `signer`.
    pub fn bundle(
        &self,
        out: &Path,
        compatible: &str,
        version: &str,
        files: &[(&str, &[u8])],
        signer: Signer,
    ) -> io::Result<()> {
        let work = tempfile::Builder::new()
            .prefix("bundle-")
            .tempdir_in(self.dir())?;
        let content = work.path().join("content");
        let bundle_dir = work.path().join("bundle");
        fs::create_dir_all(&content)?;
        fs::create_dir_all(&bundle_dir)?;
        for (name, data) in files {
            let rel = Path::new(name);
            if rel.is_absolute()
                || rel
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(invalid(format!(
                    "file name {name:?} must be a plain relative path"
                )));
            }
            let path = content.join(rel);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::write(path, data)?;
        }
        let image = bundle_dir.join("rootfs.ext4");
        fs::File::create(&image)?.set_len(IMAGE_SIZE)?;
        run(Command::new(need("mkfs.ext4")?)
            .args(["-q", "-F", "-d"])
            .arg(&content)
            .arg(&image))?;
        fs::write(
            bundle_dir.join("manifest.raucm"),
            format!(
                "[update]\ncompatible={compatible}\nversion={version}\n\n[bundle]\nformat=plain\n\n[image.rootfs]\nfilename=rootfs.ext4\n"
            ),
        )?;
        let (cert, key) = match signer {
            Signer::Trusted => ("signer", "signer"),
            Signer::Untrusted => {
                let root = self.dir();
                if !root.join("untrusted.cert.pem").exists() {
                    make_cert(root, "untrusted", "cardeploy untrusted signer")?;
                }
                ("untrusted", "untrusted")
            }
        };
        // A config without a keyring, so `rauc bundle` does not try to verify what it signs
        // (and never reads the host's /etc/rauc/system.conf).
        let bundler_conf = self.dir().join("bundler.conf");
        fs::write(
            &bundler_conf,
            "[system]\ncompatible=bundler\nbootloader=noop\n",
        )?;
        match fs::remove_file(out) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        run(Command::new(need("rauc")?)
            .arg(format!("--conf={}", bundler_conf.display()))
            .arg("bundle")
            .arg(format!(
                "--cert={}",
                self.dir().join(format!("{cert}.cert.pem")).display()
            ))
            .arg(format!(
                "--key={}",
                self.dir().join(format!("{key}.key.pem")).display()
            ))
            .arg(&bundle_dir)
            .arg(out))
    }

    fn start_service(&mut self, booted: &str) -> io::Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir().join("service.log"))?;
        let mut child = Command::new(need("rauc")?)
            .arg(format!(
                "--conf={}",
                self.dir().join("system.conf").display()
            ))
            .arg("service")
            .arg(format!("--override-boot-slot={booted}"))
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.bus_address)
            .current_dir(self.dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let since = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                return Err(io::Error::other(format!(
                    "rauc service exited ({status}) before answering on the bus:\n{}",
                    self.service_log()
                )));
            }
            if self.rauc_answers() {
                self.service = Some(child);
                return Ok(());
            }
            if since.elapsed() > STARTUP {
                terminate(&mut child);
                return Err(io::Error::other(format!(
                    "rauc service did not answer on the bus within {STARTUP:?}:\n{}",
                    self.service_log()
                )));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `rauc status` succeeds only when the service answers `GetSlotStatus` on our bus.
    fn rauc_answers(&self) -> bool {
        let Some(rauc) = program("rauc") else {
            return false;
        };
        Command::new(rauc)
            .arg("status")
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.bus_address)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for RaucSystem {
    fn drop(&mut self) {
        if let Some(mut child) = self.service.take() {
            terminate(&mut child);
        }
        let _ = self.bus.kill();
        let _ = self.bus.wait();
        // A RAUC killed mid-install leaves its bundle loop-mounted under mountprefix; the loop
        // device goes with the mount (RAUC sets autoclear).
        for mount in mounts_under(self.dir.path()).into_iter().rev() {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&mount)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Starts dbus-daemon on `root/bus.conf`; readiness is the address it prints on fd 1.
fn start_bus(root: &Path) -> io::Result<(Child, String)> {
    let log = fs::File::create(root.join("dbus.log"))?;
    let mut bus = Command::new(need("dbus-daemon")?)
        .arg(format!("--config-file={}", root.join("bus.conf").display()))
        .args(["--nofork", "--nopidfile", "--print-address=1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()?;
    let stdout = bus
        .stdout
        .take()
        .ok_or_else(|| io::Error::other("dbus-daemon stdout not captured"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line).map(|_| line);
        let _ = tx.send(read);
    });
    let failed = |bus: &mut Child, why: String| {
        let _ = bus.kill();
        let _ = bus.wait();
        let log = fs::read_to_string(root.join("dbus.log")).unwrap_or_default();
        io::Error::other(format!("dbus-daemon: {why}\n{log}"))
    };
    match rx.recv_timeout(STARTUP) {
        Ok(Ok(line)) if line.trim().starts_with("unix:") => Ok((bus, line.trim().to_owned())),
        Ok(Ok(line)) => Err(failed(
            &mut bus,
            format!("printed {line:?} instead of an address"),
        )),
        Ok(Err(e)) => Err(failed(&mut bus, format!("reading its address: {e}"))),
        Err(_) => Err(failed(&mut bus, format!("no address within {STARTUP:?}"))),
    }
}

fn system_conf(root: &str, compatible: &str) -> String {
    format!(
        "[system]
compatible={compatible}
bootloader=custom
statusfile={root}/status.raucs
mountprefix={root}/mnt

[keyring]
path={root}/signer.cert.pem

[handlers]
bootloader-custom-backend={root}/bootloader.sh

[slot.rootfs.0]
device={root}/slot-A.img
type=ext4
bootname=A

[slot.rootfs.1]
device={root}/slot-B.img
type=ext4
bootname=B
"
    )
}

/// The custom bootloader backend RAUC 1.8 calls: `get-primary`, `set-primary <bootname>`,
/// `get-state <bootname>`, `set-state <bootname> good|bad`. Making a slot primary also marks it
/// good, as real bootloaders' backends do.
fn write_backend(root: &Path, root_str: &str) -> io::Result<()> {
    let script = format!(
        r#"#!/bin/sh
# Bootloader backend for tests: the primary slot and each slot's state are files.
set -eu
state='{root_str}/boot'
# RaucSystem::slow_bootloader: writes wait, as if to slow flash (RAUC calls them from its
# install thread, so an installation takes at least this long).
case "$1" in
  set-*) if [ -f "$state/delay" ]; then
      touch "$state/in-delay"; sleep "$(cat "$state/delay")"; rm -f "$state/in-delay"
    fi ;;
esac
case "$1" in
  get-primary) cat "$state/primary" ;;
  set-primary) printf '%s\n' "$2" > "$state/primary"; printf 'good\n' > "$state/state.$2" ;;
  get-state) cat "$state/state.$2" ;;
  set-state) printf '%s\n' "$3" > "$state/state.$2" ;;
  *) echo "bootloader.sh: unknown command: $*" >&2; exit 1 ;;
esac
"#
    );
    let path = root.join("bootloader.sh");
    fs::write(&path, script)?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
}

/// A self-signed EC certificate, `<name>.cert.pem` + `<name>.key.pem` in `dir`.
fn make_cert(dir: &Path, name: &str, cn: &str) -> io::Result<()> {
    run(Command::new(need("openssl")?)
        .args(["req", "-x509", "-newkey", "ec"])
        .args(["-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
        .args(["-days", "3650", "-subj"])
        .arg(format!("/CN={cn}"))
        .arg("-keyout")
        .arg(dir.join(format!("{name}.key.pem")))
        .arg("-out")
        .arg(dir.join(format!("{name}.cert.pem"))))
}

/// Runs a command to completion; failure carries its output.
fn run(cmd: &mut Command) -> io::Result<()> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )))
}

/// SIGTERM (RAUC quits its main loop on it), then SIGKILL if it lingers.
fn terminate(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let since = Instant::now();
    while since.elapsed() < Duration::from_secs(5) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Mount points at or below `dir`, in mount order.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(table) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mount(field)))
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A program on PATH, or in the sbin directories a non-login root shell may lack.
fn program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn need(name: &str) -> io::Result<PathBuf> {
    program(name)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{name} not found")))
}

fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mount(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mount(r"/tmp/plain"), "/tmp/plain");
        assert_eq!(unescape_mount(r"/tmp/end\04"), r"/tmp/end\04");
    }
}
