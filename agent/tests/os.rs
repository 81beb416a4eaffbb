//! The agent's whole OS path against a real RAUC: a private dbus-daemon and `rauc service` with
//! file-backed slots and a custom bootloader backend (crates/testkit/src/rauc.rs), real bundles
//! from `rauc bundle`, a real twin, the real agent binary. A reboot is simulated: the agent is
//! SIGKILLed, RAUC restarts with another booted slot, and the boot id changes.
//!
//! Installing needs root (loop devices): elsewhere every test here says SKIPPED and why.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cardeploy_release::ArtifactKind;
use cardeploy_testkit::kube::{ApiServerDouble, Failure};
use cardeploy_testkit::rauc::{RaucSystem, Signer as BundleSigner};
use cardeploy_testkit::signing::{COMPATIBLE, artifact_from_view};
use cardeploy_twin::Running;
use common::{Agent, Env, call};
use serde_json::Value;

/// A car: RAUC, a twin, the agent's configuration and the files the test steers it with.
struct Car {
    env: Env,
    twin: Running,
    rauc: RaucSystem,
    config: PathBuf,
    /// Holds boot_id, the reboot log, the health marker, bundles.
    dir: tempfile::TempDir,
    agent: Option<Agent>,
    boots: u32,
}

const CAR: &str = "VIN-OS";
/// The health gate's deadline in these tests, seconds.
const DEADLINE: u64 = 6;

fn skip() -> bool {
    cardeploy_testkit::rauc::skipped()
}

impl Car {
    async fn new() -> Self {
        Self::new_with("").await
    }

    /// The same car running workloads too, on the API-server double standing in for its k3s.
    async fn with_workloads(double: &ApiServerDouble) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        double.write_kubeconfig(&kubeconfig);
        let car = Self::new_with(&format!(
            "[containers]\nregistry = \"127.0.0.1:{}\"\nkubeconfig = \"{}\"\nready_secs = 4\ncanary_secs = 1\n",
            common::free_port(),
            kubeconfig.display()
        ))
        .await;
        // The kubeconfig's directory lives as long as the car.
        std::mem::forget(dir);
        car
    }

    async fn new_with(more: &str) -> Self {
        let env = Env::new();
        let twin = env.twin().await;
        let rauc = RaucSystem::start(COMPATIBLE, "A").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("boot_id"), "boot-1\n").unwrap();
        let d = dir.path().display();
        // The reboot "command" only logs: the test performs the reboot.
        let extra = format!(
            "[os]\nrauc_bus = \"{bus}\"\nboot_id_file = \"{d}/boot_id\"\n\
             reboot_command = [\"sh\", \"-c\", \"echo reboot >> {d}/reboots\"]\n\
             [os.health]\ndeadline_secs = {DEADLINE}\ninterval_secs = 1\ntwin_grace_secs = 0\n\
             command = [\"sh\", \"-c\", \"echo >> {d}/health-checks; test -e {d}/healthy\"]\n{more}",
            bus = rauc.bus_address(),
        );
        let addr = format!("localhost:{}", env.cars_port);
        let config = env.car_with(&twin, CAR, &addr, &extra).await;
        Self {
            env,
            twin,
            rauc,
            config,
            dir,
            agent: None,
            boots: 1,
        }
    }

    fn start(&mut self) {
        self.agent = Some(Agent::start(&self.config));
    }

    /// A car whose health checks pass or not, running its agent, with os@2.0.0 installed into
    /// slot B and a reboot asked for.
    async fn installed(healthy: bool) -> Self {
        let mut car = Self::new().await;
        car.healthy(healthy);
        car.start();
        car.deploy("2.0.0", COMPATIBLE, BundleSigner::Trusted).await;
        car.reboot_requested(1).await;
        car
    }

    fn start_crashing_after(&mut self, state: &str) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cardeploy-agent"));
        command.env("CARDEPLOY_AGENT_CRASH_AFTER", state);
        self.agent = Some(Agent::start_with(command, &self.config));
    }

    /// Wait for the agent process to end on its own (a failpoint).
    fn wait_exit(&mut self) {
        let agent = self.agent.as_mut().unwrap();
        let started = Instant::now();
        while agent.0.try_wait().unwrap().is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the agent did not crash"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.agent = None;
    }

    fn healthy(&self, yes: bool) {
        let marker = self.dir.path().join("healthy");
        if yes {
            std::fs::write(marker, b"").unwrap();
        } else {
            let _ = std::fs::remove_file(marker);
        }
    }

    /// Rounds of the health command so far (each round appends a line).
    fn health_checks(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("health-checks"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    fn reboots_requested(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("reboots"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// Power off (SIGKILL: no chance to write anything) and come up on `slot` with a new boot
    /// id, without an agent yet.
    fn power_cycle(&mut self, slot: &str) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.0.kill();
            let _ = agent.0.wait();
        }
        self.rauc.restart(slot).unwrap();
        self.boots += 1;
        std::fs::write(
            self.dir.path().join("boot_id"),
            format!("boot-{}\n", self.boots),
        )
        .unwrap();
    }

    /// Power off and boot `slot`.
    fn reboot_into(&mut self, slot: &str) {
        self.power_cycle(slot);
        self.start();
    }

    /// Build a bundle, push it to the twin, sign `os@version` around it and make it desired.
    async fn deploy(&self, version: &str, bundle_compatible: &str, signer: BundleSigner) {
        self.deploy_with(version, bundle_compatible, signer, &[])
            .await;
    }

    /// The same with workload manifests (`name`, YAML) in the release beside the bundle.
    async fn deploy_with(
        &self,
        version: &str,
        bundle_compatible: &str,
        signer: BundleSigner,
        manifests: &[(&str, &str)],
    ) {
        let mut extra = Vec::new();
        for (name, yaml) in manifests {
            let file = self.dir.path().join(format!("{version}-{name}"));
            std::fs::write(&file, yaml).unwrap();
            let index = common::push_artifact(&self.twin, &self.env, &file, 3);
            let (status, view) =
                call(&self.twin, "GET", &format!("/api/v1/indexes/{index}"), None).await;
            assert_eq!(status, 200, "{view}");
            extra.push(artifact_from_view(
                ArtifactKind::KubeManifest,
                name,
                &index,
                &view,
            ));
        }
        let bundle = self.dir.path().join(format!("os-{version}.raucb"));
        let content = format!("VERSION={version}\n");
        self.rauc
            .bundle(
                &bundle,
                bundle_compatible,
                version,
                &[("etc/os-version", content.as_bytes())],
                signer,
            )
            .unwrap();
        let index = common::push_artifact(&self.twin, &self.env, &bundle, 3);
        let (status, view) =
            call(&self.twin, "GET", &format!("/api/v1/indexes/{index}"), None).await;
        assert_eq!(status, 200, "{view}");
        let artifact = artifact_from_view(ArtifactKind::RaucBundle, "rootfs", &index, &view);
        extra.insert(0, artifact);
        self.env.desire(&self.twin, CAR, "os", version, extra).await;
    }

    /// Poll the twin until the car reports `phase` (a failed phase that is not awaited fails
    /// the test at once).
    async fn phase(&self, phase: &str, within: Duration) -> Value {
        let started = Instant::now();
        loop {
            let (_, view) = call(&self.twin, "GET", &format!("/api/v1/cars/{CAR}"), None).await;
            let state = &view["reported"]["state"];
            if state["phase"] == phase {
                return view;
            }
            assert!(
                phase == "failed" || phase == "rolled-back" || state["phase"] != "failed",
                "the update failed: {view}\nRAUC:\n{}",
                self.rauc.service_log()
            );
            assert!(
                started.elapsed() < within,
                "timed out waiting for phase {phase}: {view}\nRAUC:\n{}",
                self.rauc.service_log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn reboot_requested(&self, count: usize) {
        let started = Instant::now();
        while self.reboots_requested() < count {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no reboot was requested; state: {}",
                std::fs::read_to_string(self.env.state_file()).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn slot_file(&self, slot: &str, path: &str) -> String {
        debugfs_cat(&self.rauc.slot_path(slot), path)
    }

    fn state(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.env.state_file()).unwrap()).unwrap()
    }
}

/// A file inside an ext4 image, without mounting it.
fn debugfs_cat(image: &Path, path: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat /{path}"))
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn last_error(view: &Value) -> String {
    view["reported"]["state"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_os_release_is_installed_into_the_other_slot_and_committed_after_the_health_gate() {
    if skip() {
        return;
    }
    let mut car = Car::new().await;
    car.healthy(true);
    car.start();
    car.deploy("2.0.0", COMPATIBLE, BundleSigner::Trusted).await;
    let view = car.phase("pending-reboot", Duration::from_secs(60)).await;
    let os = &view["reported"]["state"]["os"];
    assert_eq!(os["booted"], "A", "{view}");
    assert_eq!(os["primary"], "B", "{view}");
    // RAUC wrote slot B, and only slot B.
    assert_eq!(car.slot_file("B", "etc/os-version"), "VERSION=2.0.0\n");
    assert_eq!(car.slot_file("A", "etc/os-version"), "");
    car.reboot_requested(1).await;
    assert_eq!(car.rauc.bootloader_state().0.as_deref(), Some("B"));

    car.reboot_into("B");
    let view = car.phase("committed", Duration::from_secs(30)).await;
    let state = &view["reported"]["state"];
    assert_eq!(state["release"], "os@2.0.0");
    assert_eq!(state["os"]["booted"], "B");
    assert_eq!(state["last_error"], Value::Null);
    let (_, bootloader) = car.rauc.bootloader_state();
    assert_eq!(bootloader.get("B").map(String::as_str), Some("good"));
    assert_eq!(car.state()["installed"]["os"], "2.0.0");
    // The twin keeps RAUC's progress and the transitions.
    assert!(view["install"]["percentage"] == 100, "{view}");
    let (_, log) = call(
        &car.twin,
        "GET",
        &format!("/api/v1/cars/{CAR}/events"),
        None,
    )
    .await;
    let log = log.to_string();
    for phase in [
        "Verifying",
        "Installing",
        "PendingReboot",
        "Trial",
        "Committed",
    ] {
        assert!(log.contains(phase), "no {phase} in the event log: {log}");
    }
    assert_eq!(car.reboots_requested(), 1, "one reboot, no more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_that_fails_the_health_gate_is_marked_bad_and_the_car_rolls_back() {
    if skip() {
        return;
    }
    let mut car = Car::installed(false).await;
    car.reboot_into("B");
    car.phase("trial", Duration::from_secs(30)).await;
    // The deadline passes; the agent marks B bad and asks for a reboot.
    car.reboot_requested(2).await;
    let (_, bootloader) = car.rauc.bootloader_state();
    assert_eq!(bootloader.get("B").map(String::as_str), Some("bad"));
    assert_eq!(car.state()["os"]["update"]["state"], "marked-bad");
    // The bootloader starts A again.
    car.reboot_into("A");
    let view = car.phase("rolled-back", Duration::from_secs(30)).await;
    let error = last_error(&view);
    assert!(error.contains("health failure"), "{view}");
    assert!(error.contains(&format!("{DEADLINE} s")), "{view}");
    assert_eq!(view["reported"]["state"]["os"]["booted"], "A");
    let state = car.state();
    assert!(
        state["installed"].get("os").is_none(),
        "a rolled back release is not installed: {state}"
    );
    assert_eq!(state["os"]["refused"].as_array().map(Vec::len), Some(1));
    // It stays rolled back: the driver goes on deciding (it checks this boot's health each
    // round, and fails it), and no round installs or reboots.
    let seen = car.health_checks();
    let started = Instant::now();
    while car.health_checks() < seen + 3 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the driver stopped deciding"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(car.reboots_requested(), 2);
    assert_eq!(
        car.phase("rolled-back", Duration::from_secs(1)).await["reported"]["state"]["release"],
        "os@2.0.0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_that_never_boots_is_reported_as_a_boot_failure() {
    if skip() {
        return;
    }
    let mut car = Car::installed(true).await;
    // The bootloader ran out of tries on B and started A.
    car.reboot_into("A");
    let view = car.phase("rolled-back", Duration::from_secs(30)).await;
    let error = last_error(&view);
    assert!(error.contains("boot failure"), "{view}");
    // The agent marks the failed slot bad so it is never tried again.
    let started = Instant::now();
    while car.rauc.bootloader_state().1.get("B").map(String::as_str) != Some("bad") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "B not marked bad"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_rauc_refuses_fail_with_its_reason_and_leave_the_car_as_it_was() {
    if skip() {
        return;
    }
    let mut car = Car::new().await;
    car.start();
    // The release is for this hardware, but the bundle inside says otherwise.
    car.deploy("2.0.0", "other-hardware", BundleSigner::Trusted)
        .await;
    let view = car.phase("failed", Duration::from_secs(60)).await;
    let error = view["reported"]["state"]["last_error"].to_string();
    assert!(error.contains("RAUC refused"), "{view}");
    assert!(error.to_lowercase().contains("compatible"), "{view}");
    // A bundle signed by a certificate RAUC does not trust.
    car.deploy("3.0.0", COMPATIBLE, BundleSigner::Untrusted)
        .await;
    let started = Instant::now();
    let view = loop {
        let view = car.phase("failed", Duration::from_secs(60)).await;
        if view["reported"]["state"]["release"] == "os@3.0.0" {
            break view;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{view}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        view["reported"]["state"]["last_error"]
            .to_string()
            .contains("RAUC refused"),
        "{view}"
    );
    assert_eq!(car.reboots_requested(), 0);
    assert_eq!(car.rauc.bootloader_state().0.as_deref(), Some("A"));
    assert_eq!(car.slot_file("B", "etc/os-version"), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rauc_dying_mid_install_is_survived_and_the_install_is_repeated() {
    if skip() {
        return;
    }
    let mut car = Car::new().await;
    car.healthy(true);
    // The install's bootloader calls take 2 s each: RAUC is killed while one of them waits.
    car.rauc.slow_bootloader(Duration::from_secs(2)).unwrap();
    car.start();
    car.deploy("2.0.0", COMPATIBLE, BundleSigner::Trusted).await;
    car.phase("installing", Duration::from_secs(60)).await;
    let started = Instant::now();
    while !car.rauc.bootloader_in_delay() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "RAUC never reached the bootloader"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    car.rauc.kill_service();
    car.rauc.slow_bootloader(Duration::ZERO).unwrap();
    car.rauc.restart("A").unwrap();
    let view = car.phase("pending-reboot", Duration::from_secs(60)).await;
    let (_, log) = call(
        &car.twin,
        "GET",
        &format!("/api/v1/cars/{CAR}/events"),
        None,
    )
    .await;
    assert!(
        log.to_string().contains("RAUC went away") || log.to_string().contains("interrupted"),
        "the interrupted install is not in the log: {log}\n{view}"
    );
    assert_eq!(car.slot_file("B", "etc/os-version"), "VERSION=2.0.0\n");
    car.reboot_requested(1).await;
    car.reboot_into("B");
    car.phase("committed", Duration::from_secs(30)).await;
}

/// Kill the agent right after each state is persisted (before its effect) and restart it: the
/// update must still end where it would have without the crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_at_every_state_finishes_the_update_after_restart() {
    if skip() {
        return;
    }
    for crash in [
        "verifying",
        "installing",
        "pending-reboot",
        "trial",
        "committed",
    ] {
        let mut car = Car::new().await;
        car.healthy(true);
        let before_reboot = matches!(crash, "verifying" | "installing" | "pending-reboot");
        if before_reboot {
            car.start_crashing_after(crash);
        } else {
            car.start();
        }
        car.deploy("2.0.0", COMPATIBLE, BundleSigner::Trusted).await;
        if before_reboot {
            car.wait_exit();
            assert_eq!(
                car.state()["os"]["update"]["state"],
                crash,
                "crash point {crash}"
            );
            car.start();
            car.reboot_requested(1).await;
            car.reboot_into("B");
        } else {
            car.reboot_requested(1).await;
            // Power off, then the first boot of B runs an agent that dies at `crash`.
            car.power_cycle("B");
            car.start_crashing_after(crash);
            car.wait_exit();
            assert_eq!(
                car.state()["os"]["update"]["state"],
                crash,
                "crash point {crash}"
            );
            car.start();
        }
        let view = car.phase("committed", Duration::from_secs(60)).await;
        assert_eq!(
            view["reported"]["state"]["os"]["booted"], "B",
            "crash point {crash}"
        );
        assert_eq!(
            car.rauc.bootloader_state().1.get("B").map(String::as_str),
            Some("good"),
            "crash point {crash}"
        );
        assert_eq!(car.slot_file("B", "etc/os-version"), "VERSION=2.0.0\n");
        eprintln!("crash after {crash}: update committed after restart");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_failure_survives_an_agent_killed_after_marking_bad() {
    if skip() {
        return;
    }
    let mut car = Car::installed(false).await;
    car.power_cycle("B");
    car.start_crashing_after("marked-bad");
    car.wait_exit();
    // Persisted, but RAUC was not told yet: the restarted agent marks and reboots.
    car.start();
    car.reboot_requested(2).await;
    assert_eq!(
        car.rauc.bootloader_state().1.get("B").map(String::as_str),
        Some("bad")
    );
    car.reboot_into("A");
    let view = car.phase("rolled-back", Duration::from_secs(30)).await;
    assert!(
        view["reported"]["state"]["last_error"]
            .to_string()
            .contains("health failure")
    );
}

/// A Deployment as `cardeploy release create` stores workload manifests: a JSON array.
fn app(image: &str) -> String {
    serde_json::json!([{
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "app"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "app"}},
            "template": {
                "metadata": {"labels": {"app": "app"}},
                "spec": {"containers": [{"name": "main", "image": image}]},
            },
        },
    }])
    .to_string()
}

/// A release with a bundle and workloads: the slot is marked good only once the workloads are
/// promoted on it; workloads that fail on the new slot take the slot back with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_with_os_and_workloads_commits_only_when_both_are_healthy() {
    if skip() {
        return;
    }
    let double = ApiServerDouble::start().await;
    let mut car = Car::with_workloads(&double).await;
    car.healthy(true);
    car.start();

    // os@2.0.0: the OS is healthy, its workload crash-loops on the new slot.
    double.fail("example.com/app:2", Failure::CrashLoop);
    car.deploy_with(
        "2.0.0",
        COMPATIBLE,
        BundleSigner::Trusted,
        &[("app.yaml", &app("example.com/app:2"))],
    )
    .await;
    car.reboot_requested(1).await;
    assert!(
        double.names("apps", "deployments", "default").is_empty(),
        "no workload may start before the new slot runs"
    );
    car.reboot_into("B");
    // The OS passes its checks, the workload starts on B, crash-loops: B is marked bad.
    car.reboot_requested(2).await;
    let (_, bootloader) = car.rauc.bootloader_state();
    assert_eq!(bootloader.get("B").map(String::as_str), Some("bad"));
    assert!(
        double.names("apps", "deployments", "default").is_empty(),
        "the failed workload is removed: {:?}",
        double.names("apps", "deployments", "default")
    );
    car.reboot_into("A");
    let view = car.phase("rolled-back", Duration::from_secs(30)).await;
    let error = last_error(&view);
    assert!(
        error.contains("workloads were rolled back") && error.contains("crash-loops"),
        "{view}"
    );
    assert!(
        car.state()["installed"].get("os").is_none(),
        "a rolled back release is not installed"
    );

    // os@3.0.0: both healthy, the workload slow to become ready: the slot waits for it.
    double.ready_after(Duration::from_secs(2));
    car.deploy_with(
        "3.0.0",
        COMPATIBLE,
        BundleSigner::Trusted,
        &[("app.yaml", &app("example.com/app:3"))],
    )
    .await;
    car.reboot_requested(3).await;
    car.reboot_into("B");
    let view = car.phase("committed", Duration::from_secs(60)).await;
    assert_eq!(view["reported"]["state"]["release"], "os@3.0.0");
    let (_, bootloader) = car.rauc.bootloader_state();
    assert_eq!(bootloader.get("B").map(String::as_str), Some("good"));
    assert_eq!(view["reported"]["state"]["workloads"][0]["phase"], "ready");
    // The order on the car: the workloads were promoted, then the slot committed.
    let (_, log) = call(
        &car.twin,
        "GET",
        &format!("/api/v1/cars/{CAR}/events"),
        None,
    )
    .await;
    let messages: Vec<String> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
        .collect();
    let promoted = messages
        .iter()
        .position(|m| m.contains("os@3.0.0") && m.contains("workloads promoted"))
        .unwrap_or_else(|| panic!("no promotion in {messages:?}"));
    let committed = messages
        .iter()
        .rposition(|m| m.contains("Committed"))
        .unwrap_or_else(|| panic!("no commit in {messages:?}"));
    assert!(
        promoted < committed,
        "the slot committed before the workloads were promoted: {messages:?}"
    );
}
