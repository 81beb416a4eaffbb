//! A fleet set up the way an operator and a pipeline would, with the real binaries: a
//! `cardeploy-twin` process, the fleet PKI, offline root and release keys, the twin's director
//! key, a root of trust pushed to the twin, cars registered with `cardeploy car add`, releases
//! made with `release create / sign / push`. The one bootstrap of the system tests (qemu-tests),
//! the demo (`cargo xtask demo`) and anything else that drives the real binaries end to end.
//!
//! Blocking and `anyhow`: its callers are plain programs (xtask, the qemu runner) as much as
//! tests. Layout under `dir`:
//!
//! ```text
//! twin/              the twin's data directory (operator.token, director.key, pki/)
//! twin.log           the twin's log
//! keys/              root.key/.pub, release.key/.pub (0700), director.pub
//! root.json          root version 1, pushed to the twin
//! cars/<car>/        what `car add` wrote, unless the car's options say otherwise
//! releases/<line>-<version>/
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cardeploy_protocol::api::CarView;
use cardeploy_protocol::{OsReport, Phase};

/// A twin process and the keys of its fleet.
#[derive(Debug)]
pub struct Fleet {
    pub dir: PathBuf,
    bin: PathBuf,
    /// The operator API, `http://127.0.0.1:PORT`.
    pub api: String,
    token_file: PathBuf,
    /// Where cars connect, on 127.0.0.1.
    pub cars_port: u16,
    twin: Option<Child>,
}

/// How [`Fleet::add_car`] registers a car.
#[derive(Clone, Debug)]
pub struct CarOptions {
    /// RAUC's `compatible` of the car's hardware.
    pub compatible: String,
    /// The twin's car endpoint as the car reaches it, `host:port` (the host must be one of the
    /// twin certificate's names: `localhost`, `127.0.0.1` or `10.0.2.2`).
    pub twin: String,
    /// `key=value` attributes.
    pub attrs: Vec<String>,
    pub heartbeat_secs: u64,
    /// Where the car's files go (default `cars/<car>` under the fleet's directory).
    pub out: Option<PathBuf>,
    /// Appended to the agent.toml `car add` writes (seeds, `[os]`, ...).
    pub extra_config: String,
}

impl CarOptions {
    /// A car of hardware `compatible` that reaches the twin at `twin`, with a 2 s heartbeat.
    pub fn new(compatible: &str, twin: &str) -> Self {
        Self {
            compatible: compatible.to_owned(),
            twin: twin.to_owned(),
            attrs: Vec::new(),
            heartbeat_secs: 2,
            out: None,
            extra_config: String::new(),
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Run `command`; its stdout, or an error with its stderr.
pub fn run(command: &mut Command) -> anyhow::Result<String> {
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
    /// [`Fleet::start_twin`] and [`Fleet::init_root`]: a twin that can sign desired states.
    pub fn start(bin: &Path, dir: &Path) -> anyhow::Result<Self> {
        let fleet = Self::start_twin(bin, dir)?;
        fleet.init_root()?;
        Ok(fleet)
    }

    /// `cardeploy pki init` and a twin with fresh data under `dir` (binaries from `bin`, e.g.
    /// target/debug) on free loopback ports, heartbeat 2 s; returns once it answers.
    pub fn start_twin(bin: &Path, dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
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
        // The twin's certificate names localhost, 127.0.0.1 and 10.0.2.2 (what qemu guests dial).
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
            if let Some(status) = fleet
                .twin
                .as_mut()
                .and_then(|t| t.try_wait().ok().flatten())
            {
                bail!(
                    "the twin exited with {status}; see {}",
                    dir.join("twin.log").display()
                );
            }
            if started.elapsed() > Duration::from_secs(20) {
                bail!(
                    "the twin did not start; see {}",
                    dir.join("twin.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(fleet)
    }

    /// The root of trust: offline root and release keys (`keys/root`, `keys/release`), the
    /// twin's director key (`keys/director.pub`), root version 1 (`root.json`) pushed to the
    /// twin.
    pub fn init_root(&self) -> anyhow::Result<()> {
        for name in ["keys/root", "keys/release"] {
            run(self
                .cli()
                .args(["keys", "gen", name])
                .current_dir(&self.dir))?;
        }
        run(self
            .cli()
            .args(["root", "director", "--out", "keys/director.pub"])
            .current_dir(&self.dir))?;
        run(self
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
            .current_dir(&self.dir))?;
        run(self
            .cli()
            .args(["root", "push", "root.json"])
            .current_dir(&self.dir))?;
        Ok(())
    }

    /// A fleet whose twin already runs (started by someone else) with the same layout under
    /// `dir`.
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

    /// The same, with the operator token where the twin that runs keeps it (a twin started by
    /// a test keeps its data elsewhere).
    pub fn with_token_file(mut self, token_file: &Path) -> Self {
        token_file.clone_into(&mut self.token_file);
        self
    }

    /// The twin's data directory.
    pub fn twin_data(&self) -> PathBuf {
        self.dir.join("twin")
    }

    /// The `cardeploy` CLI pointed at this twin.
    pub fn cli(&self) -> Command {
        let mut command = Command::new(self.bin.join("cardeploy"));
        command
            .env("CARDEPLOY_API", &self.api)
            .env("CARDEPLOY_TOKEN_FILE", &self.token_file);
        command
    }

    /// `cardeploy car add`: certificate, pinned root, agent.toml (with the options' extra
    /// configuration appended); returns the directory that holds them.
    pub fn add_car(&self, car: &str, options: &CarOptions) -> anyhow::Result<PathBuf> {
        let out = options
            .out
            .clone()
            .unwrap_or_else(|| self.dir.join("cars").join(car));
        let mut add = self.cli();
        add.args(["car", "add", car, "--compatible", &options.compatible])
            .arg("--pki")
            .arg(self.twin_data().join("pki"))
            .arg("--root")
            .arg(self.dir.join("root.json"))
            .arg("--out")
            .arg(&out)
            .args(["--twin", &options.twin])
            .args(["--heartbeat-secs", &options.heartbeat_secs.to_string()]);
        for attr in &options.attrs {
            add.args(["--attr", attr]);
        }
        run(&mut add)?;
        if !options.extra_config.is_empty() {
            let config = out.join("agent.toml");
            let mut text = std::fs::read_to_string(&config)?;
            text.push_str(&options.extra_config);
            std::fs::write(&config, text)?;
        }
        Ok(out)
    }

    /// `release create` with `inputs` (`--os FILE`, `--manifests DIR`, ...), `release sign` with
    /// the offline release key, `release push` with `push_args` → the release digest.
    pub fn release(
        &self,
        line: &str,
        version: &str,
        compatible: &str,
        inputs: &[&str],
        push_args: &[&str],
    ) -> anyhow::Result<String> {
        let out = self.dir.join("releases").join(format!("{line}-{version}"));
        let out_arg = out.display().to_string();
        run(self
            .cli()
            .args(["release", "create", "--line", line, "--version", version])
            .args(["--compatible", compatible, "--out", &out_arg])
            .args(inputs)
            .current_dir(&self.dir))?;
        run(self
            .cli()
            .args(["release", "sign", &out_arg, "--key", "keys/release.key"])
            .current_dir(&self.dir))?;
        Ok(run(self
            .cli()
            .args(["release", "push", &out_arg])
            .args(push_args)
            .current_dir(&self.dir))?
        .trim()
        .to_owned())
    }

    /// [`Fleet::release`] of one OS bundle.
    pub fn release_os(
        &self,
        line: &str,
        version: &str,
        compatible: &str,
        bundle: &Path,
    ) -> anyhow::Result<String> {
        let bundle = bundle.display().to_string();
        self.release(line, version, compatible, &["--os", &bundle], &[])
    }

    pub fn set_desired(&self, car: &str, release: &str) -> anyhow::Result<()> {
        run(self
            .cli()
            .args(["car", "set-desired", car, "--release", release]))?;
        Ok(())
    }

    /// `cardeploy car show`, read back as the twin's view.
    pub fn show(&self, car: &str) -> anyhow::Result<CarView> {
        let text = run(self.cli().args(["car", "show", car]))?;
        serde_json::from_str(&text).context("`cardeploy car show` printed no car view")
    }

    pub fn events(&self, car: &str) -> anyhow::Result<String> {
        run(self.cli().args(["car", "events", car]))
    }

    /// Poll the twin's view of `car` until `check` holds (or fail after `within`), printing each
    /// change of [`progress_line`] on the way when `follow` is set.
    pub fn until(
        &self,
        car: &str,
        what: &str,
        within: Duration,
        follow: bool,
        check: impl Fn(&CarView) -> bool,
    ) -> anyhow::Result<CarView> {
        let started = Instant::now();
        let mut last = String::new();
        loop {
            if let Ok(view) = self.show(car) {
                let line = progress_line(&view);
                if follow && line != last {
                    println!("  [{:>6.1} s] {line}", started.elapsed().as_secs_f64());
                    last = line;
                }
                if check(&view) {
                    return Ok(view);
                }
            }
            if started.elapsed() > within {
                let last = self
                    .show(car)
                    .map_or_else(|e| format!("nothing ({e:#})"), |v| format!("{v:?}"));
                bail!("{car}: timed out after {within:?} waiting for {what}; twin says {last}");
            }
            std::thread::sleep(Duration::from_millis(if follow { 200 } else { 25 }));
        }
    }

    /// SIGTERM the twin this fleet started and wait: it must stop cleanly within 10 s.
    pub fn stop(mut self) -> anyhow::Result<Duration> {
        let Some(twin) = self.twin.take() else {
            return Ok(Duration::ZERO);
        };
        stop(twin, "cardeploy-twin")
    }
}

/// SIGTERM `child` and wait for a clean exit (status 0) within 10 s; returns how long it took.
pub fn stop(mut child: Child, name: &str) -> anyhow::Result<Duration> {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("{name} exited with {status} after SIGTERM");
            }
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{name} ignored SIGTERM for 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
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

/// The reported phase of a car view (`None` before the car reported anything).
pub fn phase(view: &CarView) -> Option<Phase> {
    view.state().map(|s| s.phase)
}

/// The release a car view says the car is at (`line@version`).
pub fn release(view: &CarView) -> Option<&str> {
    view.state().and_then(|s| s.release.as_deref())
}

/// The car's A/B slots, on cars whose agent manages the OS.
pub fn os(view: &CarView) -> Option<&OsReport> {
    view.state().and_then(|s| s.os.as_ref())
}

/// One line of what the twin says about a car: connection, phase, release, slot, progress.
pub fn progress_line(view: &CarView) -> String {
    let state = view.state();
    let mut line = format!(
        "{} {} {}",
        if view.connected { "online " } else { "offline" },
        phase(view).map_or("-", Phase::as_str),
        release(view).unwrap_or("-"),
    );
    if let Some(os) = os(view) {
        line.push_str(&format!(
            " (booted {}, OS {})",
            os.booted,
            os.version.as_deref().unwrap_or("?")
        ));
    }
    if let (Some(Phase::Fetching), Some(p)) = (phase(view), &view.progress) {
        line.push_str(&format!(" fetched {}/{} B", p.fetched_bytes, p.fetch_bytes));
    }
    if let (Some(Phase::Installing), Some(install)) = (phase(view), &view.install) {
        line.push_str(&format!(
            " RAUC {}%: {}",
            install.percentage, install.message
        ));
    }
    if let Some(error) = state.and_then(|s| s.last_error.as_deref()) {
        line.push_str(&format!(" — {error}"));
    }
    line
}
