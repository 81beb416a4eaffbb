//! Helpers shared by the agent's integration tests: a twin on port 0 with a test PKI, a
//! registered car with its agent.toml, the real agent binary as a child process.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

pub mod pipeline;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cardeploy_testkit::signing::{COMPATIBLE, Signer};
use cardeploy_testkit::{TestPki, rest};
use cardeploy_twin::{Config, Running};
use serde_json::{Value, json};

pub struct Env {
    pub pki: TestPki,
    /// Root and release keys, made when the twin first starts (the root names its director key).
    pub signer: std::sync::OnceLock<Signer>,
    /// Set to leave the root to the test (e.g. made with the CLI).
    pub no_root: std::sync::OnceLock<bool>,
    pub data: tempfile::TempDir,
    pub car_dir: tempfile::TempDir,
    pub cars_port: u16,
}

pub use cardeploy_testkit::procs::free_port;

impl Env {
    pub fn new() -> Self {
        Self {
            pki: TestPki::new(),
            signer: std::sync::OnceLock::new(),
            no_root: std::sync::OnceLock::new(),
            data: tempfile::tempdir().unwrap(),
            car_dir: tempfile::tempdir().unwrap(),
            cars_port: free_port(),
        }
    }

    pub async fn twin(&self) -> Running {
        let mut config = Config::new(self.data.path());
        config.cars_listen = format!("127.0.0.1:{}", self.cars_port).parse().unwrap();
        config.api_listen = "127.0.0.1:0".parse().unwrap();
        config.ca = Some(self.pki.ca());
        config.cert = Some(self.pki.twin_cert());
        config.key = Some(self.pki.twin_key());
        config.heartbeat_secs = 1;
        let twin = cardeploy_twin::start(config).await.unwrap();
        if self.signer.get().is_none() && !self.no_root.get().copied().unwrap_or(false) {
            let signer = Signer::for_twin(self.data.path());
            signer.push_root(twin.api_addr, &twin.operator_token).await;
            let _ = self.signer.set(signer);
        }
        twin
    }

    pub fn signer(&self) -> &Signer {
        self.signer
            .get()
            .expect("start the twin first: the root names its director key")
    }

    /// Sign `line@version` with `artifacts`, register it and make it `car`'s desired state.
    pub async fn desire(
        &self,
        twin: &Running,
        car: &str,
        line: &str,
        version: &str,
        artifacts: Vec<cardeploy_release::Artifact>,
    ) -> Value {
        let signer = self.signer();
        let release = signer.manifest(line, version, artifacts);
        signer
            .desire(twin.api_addr, &twin.operator_token, car, &release)
            .await
    }

    /// Issue and register the car, write its agent.toml.
    pub async fn car(&self, twin: &Running, car: &str) -> PathBuf {
        self.car_with(twin, car, &format!("localhost:{}", self.cars_port), "")
            .await
    }

    /// Like [`Env::car`], with the agent pointed at `twin_addr` (e.g. a fault proxy) and
    /// `extra` TOML lines appended to its configuration.
    pub async fn car_with(
        &self,
        twin: &Running,
        car: &str,
        twin_addr: &str,
        extra: &str,
    ) -> PathBuf {
        let root = self.signer().root_path();
        self.car_config(twin, car, twin_addr, &root, extra).await
    }

    /// Register `car` and write its agent.toml pinning `root`.
    pub async fn car_config(
        &self,
        twin: &Running,
        car: &str,
        twin_addr: &str,
        root: &Path,
        extra: &str,
    ) -> PathBuf {
        self.car_config_in(self.car_dir.path(), twin, car, twin_addr, root, extra)
            .await
    }

    /// One more car on the same twin, its agent.toml and state under `dir`.
    pub async fn another_car(&self, twin: &Running, car: &str, dir: &Path) -> PathBuf {
        let root = self.signer().root_path();
        let addr = format!("localhost:{}", self.cars_port);
        self.car_config_in(dir, twin, car, &addr, &root, "").await
    }

    async fn car_config_in(
        &self,
        dir: &Path,
        twin: &Running,
        car: &str,
        twin_addr: &str,
        root: &Path,
        extra: &str,
    ) -> PathBuf {
        let files = self.pki.car(car);
        let (status, body) = call(
            twin,
            "POST",
            "/api/v1/cars",
            Some(json!({"id": car, "certificate_pem": files.cert_pem})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "car_id = \"{car}\"\ntwin = \"{twin_addr}\"\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
                 state_dir = \"state\"\nheartbeat_secs = 1\nreconnect_base_ms = 100\nreconnect_cap_secs = 1\n\
                 root = \"{root}\"\ncompatible = \"{COMPATIBLE}\"\n{extra}",
                root = root.display(),
                ca = self.pki.ca().display(),
                cert = files.cert.display(),
                key = files.key.display(),
            ),
        )
        .unwrap();
        config
    }

    pub fn state_file(&self) -> PathBuf {
        self.car_dir.path().join("state/state.json")
    }
}

/// `cardeploy artifact push FILE` (zstd `level`) against the twin; returns the index id it
/// prints.
pub fn push_artifact(twin: &Running, env: &Env, file: &Path, level: u32) -> String {
    let out = Command::new(cardeploy_testkit::workspace_bin("cardeploy"))
        .args(["artifact", "push", "--level", &level.to_string()])
        .arg(file)
        .arg("--api")
        .arg(format!("http://{}", twin.api_addr))
        .arg("--token-file")
        .arg(env.data.path().join("operator.token"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cardeploy artifact push failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

pub struct Agent(pub Child);

impl Agent {
    pub fn start(config: &Path) -> Self {
        Self::start_with(Command::new(env!("CARGO_BIN_EXE_cardeploy-agent")), config)
    }

    pub fn start_with(mut command: Command, config: &Path) -> Self {
        let child = command
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Self(child)
    }

    /// SIGTERM, then wait; returns how long the agent took to exit and whether it succeeded.
    pub fn terminate(mut self) -> (Duration, bool) {
        let started = Instant::now();
        let pid = i32::try_from(self.0.id()).unwrap();
        // No libc binding in this workspace: kill(1) sends the signal.
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success());
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return (started.elapsed(), status.success());
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "agent ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn call(
    twin: &Running,
    method: &'static str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    rest(twin.api_addr, &twin.operator_token, method, path, body).await
}

/// Poll the car's twin until `check` holds.
pub async fn until(twin: &Running, car: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    until_within(twin, car, Duration::from_secs(15), what, check).await
}

/// [`until`] with its own timeout.
pub async fn until_within(
    twin: &Running,
    car: &str,
    within: Duration,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let started = Instant::now();
    loop {
        let (_, view) = call(twin, "GET", &format!("/api/v1/cars/{car}"), None).await;
        if check(&view) {
            return view;
        }
        assert!(
            started.elapsed() < within,
            "timed out waiting for {what}; last view: {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Push `data` as an artifact with the CLI; returns its chunk index (as the CLI cut it).
pub fn push_bytes(twin: &Running, env: &Env, data: &[u8]) -> cardeploy_chunks::ChunkIndex {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("artifact");
    std::fs::write(&path, data).unwrap();
    let id = push_artifact(twin, env, &path, 1);
    let index = cardeploy_chunks::chunk_bytes(data, cardeploy_chunks::Params::DEFAULT);
    assert_eq!(index.id().hex(), id);
    index
}
