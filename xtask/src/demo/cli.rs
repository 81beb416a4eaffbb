//! What the demo's steps share: the daemons it starts, the `cardeploy` CLI as an operator runs
//! it, and the release pipeline (create, sign, push).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::sh::run;

pub const CAR: &str = "DEMO-CAR-1";
/// The demo car's hardware, as RAUC's `compatible` would name it.
pub const COMPATIBLE: &str = "cardeploy-demo";

pub struct Daemon {
    name: &'static str,
    child: Child,
}

impl Daemon {
    pub fn start(name: &'static str, cmd: &mut Command, log: &Path) -> anyhow::Result<Self> {
        let file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self { name, child })
    }

    /// SIGTERM and wait: both daemons must stop cleanly.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("{} exited with {status} after SIGTERM", self.name);
                }
                println!("  {} stopped cleanly in {:?}", self.name, started.elapsed());
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(10) {
                bail!("{} ignored SIGTERM for 10 s", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub struct Cli {
    pub bin: PathBuf,
    pub api: String,
    pub token_file: PathBuf,
}

impl Cli {
    pub fn cmd(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env("CARDEPLOY_API", &self.api)
            .env("CARDEPLOY_TOKEN_FILE", &self.token_file);
        cmd
    }

    pub fn show(&self) -> anyhow::Result<Value> {
        let out = self.cmd().args(["car", "show", CAR]).output()?;
        if !out.status.success() {
            bail!(
                "cardeploy car show: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    pub fn until(&self, what: &str, check: impl Fn(&Value) -> bool) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            if let Ok(view) = self.show()
                && check(&view)
            {
                return Ok(started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("timed out waiting for {what}; see the logs in demo-data/");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// `cardeploy release create` (with `extra` inputs) + `release sign` with the offline release
/// key + `release push` → the release digest it prints.
pub fn release(
    cli: &Cli,
    data: &Path,
    line: &str,
    version: &str,
    extra: &[&str],
) -> anyhow::Result<String> {
    let dir = data.join("releases").join(format!("{line}-{version}"));
    let dir_arg = dir.display().to_string();
    let mut create = vec![
        "release",
        "create",
        "--line",
        line,
        "--version",
        version,
        "--compatible",
        COMPATIBLE,
        "--out",
        &dir_arg,
    ];
    create.extend_from_slice(extra);
    run(cli.cmd().args(&create).current_dir(data))?;
    run(cli
        .cmd()
        .args(["release", "sign", &dir_arg, "--key", "keys/release.key"])
        .current_dir(data))?;
    let out = cli
        .cmd()
        .args(["release", "push", &dir_arg, "--level", "9"])
        .current_dir(data)
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("cardeploy release push {dir_arg} failed");
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}
