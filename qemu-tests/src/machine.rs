//! One qemu-aarch64 car: a private copy of the image's disk, provisioned for one car, booted
//! under TCG with U-Boot; the serial console is read line by line into a log and a buffer the
//! suites wait on.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

/// What `cargo xtask image` built (target/image/layout.json and its neighbours).
#[derive(Clone, Debug)]
pub struct Image {
    pub dir: PathBuf,
    layout: Value,
}

/// One partition of the disk.
#[derive(Clone, Copy, Debug)]
pub struct Partition {
    pub start: u64,
    pub size: u64,
}

impl Image {
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("layout.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{} is missing: build the image with `cargo xtask image`",
                path.display()
            )
        })?;
        let layout: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        Ok(Self {
            dir: dir.to_owned(),
            layout,
        })
    }

    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.img")
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn partition(&self, name: &str) -> anyhow::Result<Partition> {
        self.layout["partitions"]
            .as_array()
            .and_then(|parts| parts.iter().find(|p| p["name"] == name))
            .and_then(|p| {
                Some(Partition {
                    start: p["start"].as_u64()?,
                    size: p["size"].as_u64()?,
                })
            })
            .with_context(|| format!("layout.json has no partition {name:?}"))
    }

    /// The qemu command line for `disk`.
    fn qemu(&self, disk: &Path) -> anyhow::Result<Command> {
        let args: Vec<String> = self.layout["qemu_args"]
            .as_array()
            .context("layout.json has no qemu_args")?
            .iter()
            .map(|a| {
                a.as_str()
                    .unwrap_or_default()
                    .replace("{disk}", &disk.display().to_string())
            })
            .collect();
        let (program, rest) = args.split_first().context("qemu_args is empty")?;
        let mut command = Command::new(program);
        command.args(rest);
        Ok(command)
    }
}

/// Lines the console printed so far, shared with the reader thread.
#[derive(Default)]
struct Console {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

/// A booted (or powered-off) car.
pub struct Machine {
    pub name: String,
    image: Image,
    pub disk: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    console: Arc<Console>,
    /// Index of the first console line of the current boot.
    boot_from: usize,
    pub powered_on: Option<Instant>,
}

impl Machine {
    /// A fresh copy of the image's disk for car `name` under `dir`, with `data` (a directory) as
    /// the content of the data partition: the car's identity and configuration.
    pub fn provision(image: &Image, name: &str, dir: &Path, data: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let disk = dir.join(format!("{name}.img"));
        std::fs::copy(image.disk(), &disk)
            .with_context(|| format!("copying {} to {}", image.disk().display(), disk.display()))?;
        let part = image.partition("data")?;
        let fs = dir.join(format!("{name}-data.ext4"));
        let status = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "data", "-d"])
            .arg(data)
            .arg(&fs)
            .arg(format!("{}k", part.size / 1024))
            .status()
            .context("running mkfs.ext4")?;
        if !status.success() {
            bail!("mkfs.ext4 of the data partition failed");
        }
        write_at(&disk, part.start, &fs)?;
        std::fs::remove_file(&fs)?;
        Ok(Self {
            name: name.to_owned(),
            image: image.clone(),
            log: dir.join(format!("{name}-console.log")),
            disk,
            child: None,
            console: Arc::new(Console::default()),
            boot_from: 0,
            powered_on: None,
        })
    }

    /// Power on: qemu starts, U-Boot runs, the console is read from now on.
    pub fn power_on(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("{} is already running", self.name);
        }
        let mut child = self
            .image
            .qemu(&self.disk)?
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting qemu-system-aarch64 (apt-get install qemu-system-arm)")?;
        let stdout = child.stdout.take().context("qemu stdout")?;
        let stderr = child.stderr.take().context("qemu stderr")?;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        writeln!(log, "==== power on ====")?;
        self.boot_from = self
            .console
            .lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len();
        for stream in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let console = self.console.clone();
            let mut log = log.try_clone()?;
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                let mut raw = Vec::new();
                loop {
                    raw.clear();
                    match reader.read_until(b'\n', &mut raw) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    let line = String::from_utf8_lossy(&raw)
                        .trim_end_matches(['\r', '\n'])
                        .to_owned();
                    let _ = writeln!(log, "{line}");
                    let mut lines = console
                        .lines
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    lines.push(line);
                    console.changed.notify_all();
                }
            });
        }
        self.child = Some(child);
        self.powered_on = Some(Instant::now());
        Ok(())
    }

    /// Pull the plug: SIGKILL qemu. Nothing the guest had not written to its disk survives.
    pub fn power_cut(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.powered_on = None;
    }

    /// A position in the console output, for [`Machine::last_since`].
    pub fn mark(&self) -> usize {
        self.console
            .lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// The last console line after `mark` that contains `needle`.
    pub fn last_since(&self, mark: usize, needle: &str) -> Option<String> {
        let lines = self
            .console
            .lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        lines
            .iter()
            .skip(mark)
            .rev()
            .find(|l| l.contains(needle))
            .cloned()
    }

    /// Wait until a console line of the current boot (or of later boots: a guest reboot resets
    /// the machine within the same qemu process) contains `needle`; returns that line.
    pub fn wait_for(&mut self, needle: &str, within: Duration) -> anyhow::Result<String> {
        self.wait_any(&[needle], within).map(|(_, line)| line)
    }

    /// Like [`Machine::wait_for`], for the first of several needles; returns which and the line.
    /// Lines are consumed: the next wait starts after the matched line.
    pub fn wait_any(
        &mut self,
        needles: &[&str],
        within: Duration,
    ) -> anyhow::Result<(usize, String)> {
        let deadline = Instant::now() + within;
        let mut lines = self
            .console
            .lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            for (at, line) in lines.iter().enumerate().skip(self.boot_from) {
                if let Some(which) = needles.iter().position(|n| line.contains(n)) {
                    self.boot_from = at + 1;
                    return Ok((which, line.clone()));
                }
            }
            self.boot_from = lines.len();
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "{}: none of {needles:?} on the console within {within:?}; see {}",
                    self.name,
                    self.log.display()
                );
            }
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if exited {
                bail!(
                    "{}: qemu exited while waiting for {needles:?}; see {}",
                    self.name,
                    self.log.display()
                );
            }
            let (guard, _) = self
                .console
                .changed
                .wait_timeout(lines, (deadline - now).min(Duration::from_millis(500)))
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            lines = guard;
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.power_cut();
    }
}

/// Write the file `from` into `disk` at byte `offset` (a partition), like `dd conv=notrunc`.
fn write_at(disk: &Path, offset: u64, from: &Path) -> anyhow::Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut src = std::fs::File::open(from)?;
    let mut dst = std::fs::OpenOptions::new().write(true).open(disk)?;
    dst.seek(SeekFrom::Start(offset))?;
    std::io::copy(&mut src, &mut dst)?;
    dst.sync_all()?;
    Ok(())
}
