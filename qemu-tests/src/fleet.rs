//! The host side of a system test: a real `cardeploy-twin` process and the `cardeploy` CLI, set
//! up the way an operator and a pipeline would (PKI, keys, root of trust, signed releases). Cars
//! in qemu reach the twin at 10.0.2.2 (qemu's user networking maps it to the host's loopback).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

/// The twin as a qemu guest sees it.
pub const TWIN_FROM_GUEST: &str = "10.0.2.2";

/// A twin and the keys of its fleet.
pub struct Fleet {
    pub dir: PathBuf,
    bin: PathBuf,
    pub api: String,
    token_file: PathBuf,
    pub cars_port: u16,
    twin: Option<Child>,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn run(command: &mut Command) -> anyhow::Result<String> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Fleet {
    /// Start a twin with fresh data under `dir` (binaries from `bin`, e.g. target/debug), make
    /// the root of trust with offline root and release keys and push it.
    pub fn start(bin: &Path, dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let twin_data = dir.join("twin");
        let cars_port = free_port()?;
        let api_port = free_port()?;
        let mut fleet = Self {
            dir: dir.to_owned(),
            bin: bin.to_owned(),
            api: format!("http://127.0.0.1:{api_port}"),
            token_file: twin_data.join("operator.token"),
            cars_port,
            twin: None,
        };
        // The twin's certificate names 10.0.2.2 by default: what the guests dial.
        run(fleet
            .cli()
            .args(["pki", "init", "--dir"])
            .arg(twin_data.join("pki")))?;
        let log = std::fs::File::create(dir.join("twin.log"))?;
        fleet.twin = Some(
            Command::new(bin.join("cardeploy-twin"))
                .args(["serve", "--data"])
                .arg(&twin_data)
                // 0.0.0.0 is not needed: qemu's user networking connects from the host's loopback.
                .args(["--cars-listen", &format!("127.0.0.1:{cars_port}")])
                .args(["--api-listen", &format!("127.0.0.1:{api_port}")])
                .args(["--heartbeat-secs", "2"])
                .env("RUST_LOG", "info")
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting cardeploy-twin")?,
        );
        let started = Instant::now();
        while !fleet.token_file.exists()
            || std::net::TcpStream::connect(("127.0.0.1", api_port)).is_err()
        {
            if started.elapsed() > Duration::from_secs(20) {
                bail!(
                    "the twin did not start; see {}",
                    dir.join("twin.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::fs::create_dir_all(dir.join("keys"))?;
        for name in ["keys/root", "keys/release"] {
            run(fleet.cli().args(["keys", "gen", name]).current_dir(dir))?;
        }
        run(fleet
            .cli()
            .args(["root", "director", "--out", "keys/director.pub"])
            .current_dir(dir))?;
        run(fleet
            .cli()
            .args([
                "root",
                "init",
                "--root-key",
                "keys/root.pub",
                "--release-key",
                "keys/release.pub",
                "--director-key",
                "keys/director.pub",
                "--sign-with",
                "keys/root.key",
                "--out",
                "root.json",
            ])
            .current_dir(dir))?;
        run(fleet
            .cli()
            .args(["root", "push", "root.json"])
            .current_dir(dir))?;
        Ok(fleet)
    }

    /// A fleet whose twin already runs (started by someone else, e.g. the demo) with the same
    /// layout under `dir`: `keys/release.key`, `root.json`, `twin/pki`, `twin/operator.token`.
    pub fn attach(bin: &Path, dir: &Path, api: &str, cars_port: u16) -> Self {
        Self {
            dir: dir.to_owned(),
            bin: bin.to_owned(),
            api: api.to_owned(),
            token_file: dir.join("twin/operator.token"),
            cars_port,
            twin: None,
        }
    }

    /// The `cardeploy` CLI pointed at this twin.
    pub fn cli(&self) -> Command {
        let mut command = Command::new(self.bin.join("cardeploy"));
        command
            .env("CARDEPLOY_API", &self.api)
            .env("CARDEPLOY_TOKEN_FILE", &self.token_file);
        command
    }

    /// `cardeploy car add`: certificate, pinned root, agent.toml (with `extra` appended), all
    /// in the returned directory — what goes into the car's /data/cardeploy.
    pub fn add_car(&self, car: &str, compatible: &str, extra: &str) -> anyhow::Result<PathBuf> {
        let out = self.dir.join("cars").join(car).join("cardeploy");
        run(self
            .cli()
            .args(["car", "add", car, "--compatible", compatible, "--pki"])
            .arg(self.dir.join("twin/pki"))
            .arg("--root")
            .arg(self.dir.join("root.json"))
            .arg("--out")
            .arg(&out)
            .args([
                "--twin",
                &format!("{TWIN_FROM_GUEST}:{}", self.cars_port),
                "--heartbeat-secs",
                "2",
            ]))?;
        let config = out.join("agent.toml");
        let mut text = std::fs::read_to_string(&config)?;
        text.push_str(extra);
        std::fs::write(&config, text)?;
        Ok(out)
    }

    /// `release create --os BUNDLE`, `release sign`, `release push` → the release digest.
    pub fn release_os(
        &self,
        line: &str,
        version: &str,
        compatible: &str,
        bundle: &Path,
    ) -> anyhow::Result<String> {
        let out = self.dir.join("releases").join(format!("{line}-{version}"));
        let out_arg = out.display().to_string();
        run(self
            .cli()
            .args([
                "release",
                "create",
                "--line",
                line,
                "--version",
                version,
                "--compatible",
                compatible,
                "--out",
                &out_arg,
                "--os",
            ])
            .arg(bundle)
            .current_dir(&self.dir))?;
        run(self
            .cli()
            .args(["release", "sign", &out_arg, "--key", "keys/release.key"])
            .current_dir(&self.dir))?;
        Ok(run(self
            .cli()
            .args(["release", "push", &out_arg])
            .current_dir(&self.dir))?
        .trim()
        .to_owned())
    }

    pub fn set_desired(&self, car: &str, release: &str) -> anyhow::Result<()> {
        run(self
            .cli()
            .args(["car", "set-desired", car, "--release", release]))?;
        Ok(())
    }

    pub fn show(&self, car: &str) -> anyhow::Result<Value> {
        let text = run(self.cli().args(["car", "show", car]))?;
        Ok(serde_json::from_str(&text)?)
    }

    pub fn events(&self, car: &str) -> anyhow::Result<String> {
        run(self.cli().args(["car", "events", car]))
    }

    /// Poll the twin's view of `car` until `check` holds, printing each change of phase and
    /// RAUC's install progress on the way.
    pub fn until(
        &self,
        car: &str,
        what: &str,
        within: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let started = Instant::now();
        let mut last = String::new();
        loop {
            if let Ok(view) = self.show(car) {
                let line = progress_line(&view);
                if line != last {
                    println!("  [{:>6.1} s] {line}", started.elapsed().as_secs_f64());
                    last = line;
                }
                if check(&view) {
                    return Ok(view);
                }
            }
            if started.elapsed() > within {
                let last = self.show(car).map(|v| v.to_string()).unwrap_or_default();
                bail!("{car}: timed out after {within:?} waiting for {what}; twin says {last}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if let Some(mut twin) = self.twin.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &twin.id().to_string()])
                .status();
            let started = Instant::now();
            while twin.try_wait().ok().flatten().is_none()
                && started.elapsed() < Duration::from_secs(5)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = twin.kill();
            let _ = twin.wait();
        }
    }
}

/// One line of what the twin says about a car: connection, phase, release, slot, progress.
pub fn progress_line(view: &Value) -> String {
    let state = &view["reported"]["state"];
    let mut line = format!(
        "{} {} {}",
        if view["connected"] == true {
            "online "
        } else {
            "offline"
        },
        state["phase"].as_str().unwrap_or("-"),
        state["release"].as_str().unwrap_or("-"),
    );
    if let Some(slot) = state["os"]["booted"].as_str() {
        line.push_str(&format!(
            " (booted {slot}, OS {})",
            state["os"]["version"].as_str().unwrap_or("?")
        ));
    }
    if state["phase"] == "fetching" {
        let p = &view["progress"];
        line.push_str(&format!(
            " fetched {}/{} B",
            p["fetched_bytes"].as_u64().unwrap_or(0),
            p["fetch_bytes"].as_u64().unwrap_or(0)
        ));
    }
    if state["phase"] == "installing" {
        line.push_str(&format!(
            " RAUC {}%: {}",
            view["install"]["percentage"],
            view["install"]["message"].as_str().unwrap_or("")
        ));
    }
    if let Some(error) = state["last_error"].as_str() {
        line.push_str(&format!(" — {error}"));
    }
    line
}

/// The reported phase in a twin view.
pub fn phase(view: &Value) -> &str {
    view["reported"]["state"]["phase"].as_str().unwrap_or("")
}
