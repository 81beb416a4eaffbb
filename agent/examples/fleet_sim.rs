//! `cargo xtask fleet-sim`: thousands of simulated cars against the real twin binary, driven
//! through fleet deployments by the operator's REST API (docs/fleet-sim.md).
//!
//! Each simulated car runs in this process with the agent's own code where it decides: the
//! link client (mutual TLS, RSocket, reconnects with the link's jittered backoff), the desired-state
//! checks (`verify::check`: root chain, release, counter), the deployment machine, the OS update
//! machine and `State::derive` (what the twin is told). What is simulated is what touches the
//! world: the fetch, RAUC's install, the reboot and the bootloader (a primary slot, a boot that
//! may fail and fall back), the health checks (they pass or fail with the configured rates) and
//! the power (cars that go offline and come back, each return a new boot). Durations are drawn
//! per car from the profile, divided by `--speed`.
//!
//! Scenarios, one after the other on one fleet:
//! 1. **rollout**: a 1 % canary, then waves of 10, 50 and 100 %; the time from `deploy create`
//!    to every online car done (committed or rolled back), the twin's CPU and RSS during it.
//! 2. **halt**: the same plan for a newer release; when the second wave (phase 3) starts, health
//!    checks begin to fail (`--fault-rate`). The deployment must halt with no car started beyond
//!    the phase's budget, start no car while halted (watched for a while), then is aborted.
//! 3. **ttl**: a share of the fleet parks (powered off); a deployment with a short time-to-live
//!    must end `expired` with at least the parked cars never reached, and must not start them
//!    when they come back after it.
//! 4. **first car** (with `--agent`): two real agent processes holding the base artifact as
//!    their seed; a deployment of the target with a one-car canary. The first car's update time
//!    (desired state → applied) against the later car's on the same (base, target) pair: the
//!    twin makes the deltas before the canary starts, so the first car does not pay for them.
//!
//! Writes `timeline.json` (one sample a second: cars per state, the deployment's phase and
//! counts, the twin's CPU and RSS) and `summary.md` under `--out`. `--smoke` (what `cargo xtask
//! test` runs) uses a small fleet and short times and fails when a scenario does not hold.
//!
//! Arguments: --twin BIN --cli BIN [--agent BIN] --out DIR [--cars N] [--speed X] [--seed N]
//! [--fault-rate P] [--smoke]

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cardeploy_agent::deploy::machine::{self as deployment, Deployment};
use cardeploy_agent::os::machine::{
    self as os_machine, Action, Bootname, Facts, Health, Limits, OsUpdate, Outcome, RebootGate,
    Wanted,
};
use cardeploy_agent::release::{Release, ReleaseRef};
use cardeploy_agent::state::Managed;
use cardeploy_agent::{State, verify};
use cardeploy_link::{Backoff, Bytes, Requester};
use cardeploy_pki::{FleetPki, write_file};
use cardeploy_protocol::api::{CarView, DeploymentView};
use cardeploy_protocol::{
    self as protocol, DesiredState, Hello, OsReport, Phase, Report, ReportBody, route,
};
use cardeploy_release::{ArtifactKind, CarContext, CounterMark, TrustedRoot};
use cardeploy_testkit::procs::{self, TwinProcess, api, arg, cpu_time, rss_kib, start_twin};
use cardeploy_testkit::signing::{COMPATIBLE, Signer, artifact_from_view};
use futures::StreamExt;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// The profile: how long things take on a car, how often they fail.

/// Seconds, drawn uniformly per car and step, then divided by the speed.
#[derive(Clone, Copy, Debug)]
struct Range(f64, f64);

#[derive(Clone, Debug)]
struct Profile {
    fetch: Range,
    verify: Range,
    install: Range,
    reboot: Range,
    health: Range,
    /// A health check of a new slot fails (besides the injected fault).
    health_fail: f64,
    /// The new slot does not boot (the bootloader falls back).
    boot_fail: f64,
    /// Mean time a car stays on before it is switched off (exponential).
    online_mean: f64,
    /// How long a car stays off.
    offline: Range,
    speed: f64,
}

impl Profile {
    fn draw(&self, rng: &mut fastrand::Rng, range: Range) -> Duration {
        let secs = range.0 + rng.f64() * (range.1 - range.0);
        Duration::from_secs_f64(secs / self.speed)
    }

    fn online_for(&self, rng: &mut fastrand::Rng) -> Duration {
        // Exponential: -mean × ln(U).
        let u = rng.f64().max(1e-9);
        Duration::from_secs_f64(-self.online_mean * u.ln() / self.speed)
    }
}

// ---------------------------------------------------------------------------------------------
// What the cars share with the run: their ground truth, for the timeline and the checks.

/// A car's state as the timeline counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Seen {
    Offline = 0,
    Rebooting,
    Idle,
    Fetching,
    Installing,
    Trial,
    Committed,
    RolledBack,
    Failed,
}

const SEEN: [&str; 9] = [
    "offline",
    "rebooting",
    "idle",
    "fetching",
    "installing",
    "trial",
    "committed",
    "rolled-back",
    "failed",
];

struct Sim {
    profile: Profile,
    port: u16,
    ca: PathBuf,
    root: Vec<u8>,
    /// Extra probability (×1e6) that a new slot's health check fails: the injected fault.
    fault_ppm: AtomicU64,
    cars: Vec<SimCar>,
    /// Handshakes at a time (10,000 cars do not connect in the same millisecond).
    connecting: tokio::sync::Semaphore,
}

struct SimCar {
    id: String,
    cert: PathBuf,
    key: PathBuf,
    seen: AtomicU8,
    /// The release label the car runs or works on.
    release: Mutex<Option<String>>,
    /// Releases it accepted a desired state for, in order (the twin started it for them).
    accepted: Mutex<Vec<String>>,
    /// Switched off by the run (the ttl scenario's parked cars).
    parked: AtomicBool,
    /// Sessions with the twin so far (hello answered).
    sessions: AtomicU64,
}

impl Sim {
    fn fault(&self) -> f64 {
        self.fault_ppm.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// Switch `cars` off and wait until they are (their session with the twin ended).
    fn park(&self, cars: &[usize]) {
        for &i in cars {
            self.cars[i].parked.store(true, Ordering::Relaxed);
        }
        let off = Instant::now();
        while cars
            .iter()
            .any(|&i| self.cars[i].seen.load(Ordering::Relaxed) != Seen::Offline as u8)
        {
            assert!(
                off.elapsed() < Duration::from_secs(60),
                "{} cars did not switch off in 60 s",
                cars.len()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One simulated car.

/// The simulated hardware under the agent's machines: A/B slots and a bootloader.
struct Hardware {
    booted: String,
    primary: String,
    boot_id: String,
    health: Health,
    boots: u64,
}

impl Hardware {
    fn other(slot: &str) -> String {
        if slot == "A" { "B" } else { "A" }.to_owned()
    }

    /// Power on: the bootloader starts the primary slot, or the other one if it does not boot.
    fn boot(&mut self, rng: &mut fastrand::Rng, profile: &Profile, fresh_slot: bool) {
        self.boots += 1;
        self.boot_id = format!("boot-{}-{}", self.boots, rng.u64(..));
        self.booted = if fresh_slot && rng.f64() < profile.boot_fail {
            Self::other(&self.primary)
        } else {
            self.primary.clone()
        };
        self.health = Health::Pending("not checked yet in this boot".into());
    }

    fn report(&self, update: &OsUpdate) -> OsReport {
        OsReport {
            booted: self.booted.clone(),
            version: None,
            primary: Some(self.primary.clone()),
            update: update.name().to_owned(),
            release: update.release().map(ReleaseRef::label),
            slots: Vec::new(),
        }
    }
}

/// Work a step started that takes time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Work {
    Fetch,
    Verify,
    Install,
    Health,
}

/// Why a session with the twin ended.
enum End {
    Reboot,
    PowerOff,
    Lost,
}

const LIMITS: Limits = Limits {
    max_installs: 3,
    max_trial_boots: 3,
    health_deadline_secs: 600,
};
const MANAGED: Managed = Managed {
    os: true,
    workloads: false,
};

struct CarRun {
    sim: Arc<Sim>,
    index: usize,
    rng: fastrand::Rng,
    state: State,
    hw: Hardware,
    root: TrustedRoot,
    epoch: u64,
    seq: u64,
    /// What is left of a fetch interrupted by a power-off.
    fetch_left: Option<Duration>,
    /// The boot of the slot just installed (a boot failure is possible only then).
    fresh_slot: bool,
    /// A session with the twin is up (the timeline counts the car by its state then, else as
    /// offline or rebooting).
    connected: bool,
}

impl CarRun {
    fn car(&self) -> &SimCar {
        &self.sim.cars[self.index]
    }

    fn set_seen(&self, seen: Seen) {
        self.car().seen.store(seen as u8, Ordering::Relaxed);
    }

    fn seen_from_state(&self) -> Seen {
        match self.state.reported.phase {
            Phase::Idle => Seen::Idle,
            Phase::Fetching => Seen::Fetching,
            Phase::Verifying | Phase::Installing | Phase::PendingReboot | Phase::Applied => {
                Seen::Installing
            }
            Phase::Trial => Seen::Trial,
            Phase::Committed => Seen::Committed,
            Phase::RolledBack => Seen::RolledBack,
            Phase::Failed => Seen::Failed,
        }
    }

    async fn report(&mut self, link: &Requester) {
        self.seq += 1;
        let report = Report {
            epoch: self.epoch,
            seq: self.seq,
            at: cardeploy_release::now_secs(),
            body: ReportBody::State {
                state: self.state.reported.clone(),
            },
        };
        // Fire-and-forget, as the agent's reporter: a lost one is repeated by the next hello.
        let _ = link
            .fire_and_forget(route::CAR_REPORT, Bytes::from(protocol::encode(&report)))
            .await;
    }

    /// Recompute what the twin is told (the agent's `State::derive`) and the car's seen state.
    fn derive(&mut self) {
        let update = self.state.os.update.clone();
        self.state.reported.os = Some(self.hw.report(&update));
        self.state.derive(MANAGED);
        *self.car().release.lock().unwrap() = self.state.reported.release.clone();
        if self.connected {
            self.set_seen(self.seen_from_state());
        }
    }

    /// Take a desired state as the agent does: check it, record it, start the deployment.
    fn accept(&mut self, message: DesiredState) {
        if self.state.desired.as_ref() == Some(&message) {
            return;
        }
        let context = CarContext {
            car_id: self.car().id.clone(),
            compatible: COMPATIBLE.to_owned(),
            now: cardeploy_release::now_secs(),
            counter: self
                .state
                .last_counter
                .zip(self.state.counter_scope.clone())
                .map(|(last, scope)| CounterMark { scope, last }),
            installed: self.state.installed.clone(),
            os: self.state.installed_os.clone(),
            max_artifact_bytes: 1 << 40,
        };
        let (trusted, _, accepted) = match verify::check(&self.root, &message, &context) {
            Ok(ok) => ok,
            // The agent reports a refusal as an event; the simulation treats one as a bug.
            Err(e) => panic!("{}: desired state refused: {e}", self.car().id),
        };
        let scope = trusted.counter_scope();
        self.root = trusted;
        let checked = accepted.release;
        let release = Release::new(
            ReleaseRef {
                digest: checked.digest.parse().unwrap(),
                line: checked.release.line.clone(),
                version: checked.version.clone(),
            },
            checked.release.artifacts.clone(),
            checked.release.images.clone(),
        )
        .unwrap();
        let state = &mut self.state;
        state.desired = Some(message);
        state.last_counter = Some(accepted.desired.counter);
        state.counter_scope = Some(scope);
        state.accepted = state.accepted.saturating_add(1);
        let before = state.deployment.clone();
        state.deployment = deployment::decide(
            &before,
            deployment::Event::Accepted {
                release: release.id.clone(),
                missing: state.missing(&release, |_, _| true),
                parts: release.has_os(),
                failed: state.reported.phase == Phase::Failed,
            },
        );
        if state.deployment != before {
            self.fetch_left = None;
            state.release = Some(release.clone());
            self.car().accepted.lock().unwrap().push(release.id.label());
        }
        self.derive();
    }

    fn wanted(&self) -> Option<Wanted> {
        let release = self.state.release.as_ref().filter(|r| r.has_os())?;
        Some(Wanted {
            release: release.id.clone(),
            counter: self.state.accepted,
            ready: !self.state.missing(release, |_, _| true),
        })
    }

    fn facts(&self) -> Facts {
        Facts {
            boot_id: self.hw.boot_id.clone(),
            booted: Bootname(self.hw.booted.clone()),
            rauc_idle: true,
            now: cardeploy_release::now_secs(),
            reboot: RebootGate::Allowed,
            health: self.hw.health.clone(),
            boot_confirmed: self.state.os.confirmed_boot.as_deref() == Some(&self.hw.boot_id),
            workloads: self.state.workloads_gate(MANAGED),
        }
    }

    fn apply(&mut self, outcome: Outcome) {
        let next = os_machine::apply(&self.state.os.update, outcome, self.state.accepted);
        self.state.move_os(&next);
    }

    /// Run the OS machine until it asks for something that takes time (returned) or for
    /// nothing. `Err(End::Reboot)`: it asked for a reboot.
    fn settle(&mut self) -> Result<Option<Work>, End> {
        for _ in 0..32 {
            if matches!(self.state.deployment, Deployment::Fetching { .. }) {
                return Ok(Some(Work::Fetch));
            }
            let step = os_machine::decide(
                &self.state.os.update,
                self.wanted().as_ref(),
                &self.state.os.refused,
                &self.facts(),
                &LIMITS,
            );
            self.state.move_os(&step.next);
            match step.action {
                Action::Wait | Action::WaitRaucIdle | Action::WaitReboot(_) => return Ok(None),
                Action::Report | Action::MarkOtherBad => {}
                Action::Verify => return Ok(Some(Work::Verify)),
                Action::Install => return Ok(Some(Work::Install)),
                Action::Abandon => {
                    self.hw.primary = self.hw.booted.clone();
                    self.apply(Outcome::Abandoned);
                }
                Action::Reboot => return Err(End::Reboot),
                Action::CheckHealth { .. } => {
                    if matches!(self.hw.health, Health::Pending(_)) {
                        return Ok(Some(Work::Health));
                    }
                    return Ok(None);
                }
                Action::MarkGood => {
                    self.state.os.confirmed_boot = Some(self.hw.boot_id.clone());
                    self.apply(Outcome::MarkedGood);
                }
                Action::ConfirmBoot => {
                    self.state.os.confirmed_boot = Some(self.hw.boot_id.clone());
                }
                Action::MarkBad => {
                    self.hw.primary = Hardware::other(&self.hw.booted);
                    self.apply(Outcome::MarkedBad);
                }
            }
            self.derive();
        }
        panic!(
            "{}: the OS machine did not settle in 32 steps: {:?}",
            self.car().id,
            self.state.os.update
        );
    }

    fn duration(&mut self, work: Work) -> Duration {
        let p = self.sim.profile.clone();
        match work {
            Work::Fetch => match self.fetch_left {
                Some(left) => left,
                None => p.draw(&mut self.rng, p.fetch),
            },
            Work::Verify => p.draw(&mut self.rng, p.verify),
            Work::Install => p.draw(&mut self.rng, p.install),
            Work::Health => p.draw(&mut self.rng, p.health),
        }
    }

    fn finish(&mut self, work: Work) {
        match work {
            Work::Fetch => {
                self.fetch_left = None;
                if let Some(release) = self.state.release.clone() {
                    for a in &release.artifacts {
                        self.state.artifacts.insert(a.name().to_owned(), a.index);
                    }
                }
                self.state.deployment = deployment::decide(
                    &self.state.deployment,
                    deployment::Event::Fetched { parts: true },
                );
            }
            Work::Verify => self.apply(Outcome::Verified),
            Work::Install => {
                let from = Bootname(self.hw.booted.clone());
                let to = Hardware::other(&self.hw.booted);
                self.hw.primary = to.clone();
                let boot_id = self.hw.boot_id.clone();
                self.apply(Outcome::Installed {
                    from,
                    to: Bootname(to),
                    boot_id,
                });
            }
            Work::Health => {
                let trial = matches!(self.state.os.update, OsUpdate::Trial { .. });
                let fail = self.sim.profile.health_fail + self.sim.fault();
                self.hw.health = if trial && self.rng.f64() < fail {
                    Health::Fail("simulated: the service `vehicle-bus` did not come up".into())
                } else {
                    Health::Pass
                };
            }
        }
        self.derive();
    }

    /// One session with the twin, until the car reboots, is switched off or loses the link.
    async fn session(&mut self, link: &Requester) -> End {
        let hello = Hello {
            agent_version: "fleet-sim".into(),
            reported: self.state.reported.clone(),
        };
        if link
            .request_response(route::CAR_HELLO, Bytes::from(protocol::encode(&hello)))
            .await
            .is_err()
        {
            return End::Lost;
        }
        self.car().sessions.fetch_add(1, Ordering::Relaxed);
        let mut desired = link.request_stream(route::CAR_DESIRED, Bytes::from_static(b"{}"));
        let off_at = tokio::time::Instant::now() + {
            let p = self.sim.profile.clone();
            p.online_for(&mut self.rng)
        };
        let mut told = self.state.reported.clone();
        let mut work: Option<(Work, tokio::time::Instant, Duration)> = None;
        loop {
            if work.is_none() {
                match self.settle() {
                    Ok(Some(w)) => {
                        let d = self.duration(w);
                        work = Some((w, tokio::time::Instant::now() + d, d));
                    }
                    Ok(None) => {}
                    Err(end) => {
                        self.derive();
                        self.report(link).await;
                        return end;
                    }
                }
                self.derive();
            }
            if self.state.reported != told {
                told = self.state.reported.clone();
                self.report(link).await;
            }
            let until = work.map(|(_, at, _)| at);
            tokio::select! {
                message = desired.next() => match message {
                    Some(Ok(bytes)) => {
                        let message: DesiredState = protocol::decode("desired", &bytes).unwrap();
                        self.accept(message);
                        // A new release replaces a fetch; other work finishes first.
                        if matches!(work, Some((Work::Fetch, ..))) {
                            work = None;
                        }
                    }
                    _ => return End::Lost,
                },
                () = async { tokio::time::sleep_until(until.unwrap()).await }, if until.is_some() => {
                    let (w, ..) = work.take().unwrap();
                    self.finish(w);
                }
                () = tokio::time::sleep_until(off_at) => {
                    self.keep_fetch_progress(work);
                    return End::PowerOff;
                }
                () = tokio::time::sleep(Duration::from_millis(250)) => {
                    if self.car().parked.load(Ordering::Relaxed) {
                        self.keep_fetch_progress(work);
                        return End::PowerOff;
                    }
                }
            }
        }
    }

    fn keep_fetch_progress(&mut self, work: Option<(Work, tokio::time::Instant, Duration)>) {
        if let Some((Work::Fetch, at, _)) = work {
            self.fetch_left = Some(at.saturating_duration_since(tokio::time::Instant::now()));
        }
    }

    async fn run(mut self) {
        let mut backoff = Backoff::with_seed(
            Duration::from_millis(500),
            Duration::from_secs(30),
            self.rng.u64(..),
        );
        loop {
            while self.car().parked.load(Ordering::Relaxed) {
                self.set_seen(Seen::Offline);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let link = {
                let _permit = self.sim.connecting.acquire().await.unwrap();
                let car = self.car();
                cardeploy_testkit::car_link(
                    self.sim.port,
                    (&self.sim.ca, &car.cert, &car.key),
                    &car.id,
                    Duration::from_secs(30),
                    Duration::from_secs(30),
                )
                .await
            };
            let link = match link {
                Ok(link) => link,
                Err(_) => {
                    self.set_seen(Seen::Offline);
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            backoff.reset();
            self.connected = true;
            self.set_seen(self.seen_from_state());
            let end = self.session(&link).await;
            drop(link);
            self.connected = false;
            let p = self.sim.profile.clone();
            match end {
                End::Reboot => {
                    self.set_seen(Seen::Rebooting);
                    tokio::time::sleep(p.draw(&mut self.rng, p.reboot)).await;
                    let fresh = matches!(self.state.os.update, OsUpdate::PendingReboot { .. });
                    self.fresh_slot = fresh;
                }
                End::PowerOff => {
                    self.set_seen(Seen::Offline);
                    tokio::time::sleep(p.draw(&mut self.rng, p.offline)).await;
                    self.fresh_slot = false;
                }
                End::Lost => {
                    self.set_seen(Seen::Offline);
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            }
            // Every power-on is a new boot and a new agent run.
            let fresh = self.fresh_slot;
            self.hw.boot(&mut self.rng, &p, fresh);
            self.epoch += 1;
            self.seq = 0;
            self.derive();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The run: the twin, the fleet, the operator.

struct Run {
    twin: TwinProcess,
    sim: Arc<Sim>,
    signer: Signer,
    cli: PathBuf,
    work: PathBuf,
    started: Instant,
    timeline: Vec<Value>,
    events: Vec<Value>,
    /// The twin's CPU time at the last reading, and its share of a core since the one before.
    cpu: (Instant, Duration),
    cpu_share: f64,
    smoke: bool,
}

impl Run {
    fn t(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn event(&mut self, what: &str) {
        eprintln!("[{:>7.1} s] {what}", self.t());
        let t = self.t();
        self.events.push(json!({"t": t, "what": what}));
    }

    fn counts(&self) -> [u64; 9] {
        let mut counts = [0u64; 9];
        for car in &self.sim.cars {
            counts[usize::from(car.seen.load(Ordering::Relaxed))] += 1;
        }
        counts
    }

    fn deployment(&self, name: &str) -> DeploymentView {
        let (status, view) = api(
            &self.twin,
            "GET",
            &format!("/api/v1/deployments/{name}"),
            None,
        );
        assert_eq!(status, 200, "{view}");
        serde_json::from_value(view).unwrap()
    }

    /// Until deployment `name` has completed (the driver's round after its last car); panics
    /// at `deadline`.
    fn until_completed(&self, name: &str, deadline: Instant) {
        while self.deployment(name).state != "completed" {
            assert!(Instant::now() < deadline, "{name} did not complete");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One sample of the timeline; returns the deployment's view.
    fn sample(&mut self, scenario: &str, name: &str) -> DeploymentView {
        let view = self.deployment(name);
        let pid = self.twin.child.id();
        let (then, cpu_then) = self.cpu;
        let now = Instant::now();
        // CPU time moves in clock ticks (10 ms): a share over less than a second is noise, so a
        // sample that soon after the last one repeats its figure.
        if now.duration_since(then) >= Duration::from_millis(900) {
            let cpu_now = cpu_time(pid);
            self.cpu_share = cpu_now.saturating_sub(cpu_then).as_secs_f64()
                / now.duration_since(then).as_secs_f64();
            self.cpu = (now, cpu_now);
        }
        let cpu_share = self.cpu_share;
        let counts = self.counts();
        let t = self.t();
        let cars: serde_json::Map<String, Value> = SEEN
            .iter()
            .zip(counts)
            .map(|(name, n)| ((*name).to_owned(), json!(n)))
            .collect();
        self.timeline.push(json!({
            "t": t,
            "scenario": scenario,
            "cars": cars,
            "deployment": {
                "name": view.name, "state": view.state, "phase": view.phase,
                "started": view.started, "succeeded": view.succeeded, "failed": view.failed,
            },
            "twin_cpu": cpu_share,
            "twin_rss_mib": rss_kib(pid) as f64 / 1024.0,
        }));
        view
    }

    fn create(&mut self, body: Value) {
        let name = body["name"].as_str().unwrap().to_owned();
        let (status, view) = api(&self.twin, "POST", "/api/v1/deployments", Some(body));
        assert_eq!(status, 201, "deploy create {name}: {view}");
        self.event(&format!("deploy create {name}"));
    }

    /// The cars whose power is on (parked and powered-off cars are not).
    fn online(&self) -> Vec<usize> {
        (0..self.sim.cars.len())
            .filter(|&i| {
                !matches!(
                    self.sim.cars[i].seen.load(Ordering::Relaxed),
                    x if x == Seen::Offline as u8 || x == Seen::Rebooting as u8
                )
            })
            .collect()
    }

    fn settled_on(&self, i: usize, label: &str) -> bool {
        let car = &self.sim.cars[i];
        car.release.lock().unwrap().as_deref() == Some(label)
            && matches!(
                car.seen.load(Ordering::Relaxed),
                x if x == Seen::Committed as u8 || x == Seen::RolledBack as u8 || x == Seen::Failed as u8
            )
    }
}

/// `cardeploy artifact push` of `bytes` (as a file under the run's directory); the artifact as
/// a release declares it.
fn push_artifact(run: &Run, name: &str, bytes: &[u8]) -> cardeploy_release::Artifact {
    let file = run.work.join(name);
    std::fs::write(&file, bytes).unwrap();
    let out = Command::new(&run.cli)
        .args(["artifact", "push", "--level", "3"])
        .arg(&file)
        .args(["--api", &run.twin.api, "--token", &run.twin.token])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "push of {} failed", file.display());
    let index = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let (status, view) = api(&run.twin, "GET", &format!("/api/v1/indexes/{index}"), None);
    assert_eq!(status, 200, "{view}");
    artifact_from_view(ArtifactKind::RaucBundle, "rootfs", &index, &view)
}

/// `line@version` with one OS bundle artifact, signed and registered; its label.
fn os_release(run: &Run, line: &str, version: &str, bytes: &[u8]) -> String {
    let artifact = push_artifact(run, &format!("{line}-{version}.raucb"), bytes);
    let manifest = run.signer.manifest(line, version, vec![artifact]);
    run.signer
        .publish_to(&run.twin.api, &run.twin.token, &manifest);
    format!("{line}@{version}")
}

fn plan(name: &str, release: &str, soak: u64, per_minute: Option<u32>) -> Value {
    json!({
        "name": name,
        "release": release,
        "selector": SELECTOR,
        "phases": [
            {"percent": 1.0, "soak_secs": soak},
            {"percent": 10.0, "soak_secs": soak},
            {"percent": 50.0, "soak_secs": soak},
            {"percent": 100.0, "soak_secs": 0},
        ],
        "max_starts_per_minute": per_minute,
        "failure_threshold": 0.1,
        "success_threshold": 0.9,
        "ttl_secs": 86_400,
        "supersede": true,
    })
}

/// Every simulated car (the real ones of the first-car scenario have no model).
const SELECTOR: &str = "model in (tx7,tx9),!test-fleet";

struct Rollout {
    done_secs: f64,
    cpu_mean: f64,
    cpu_max: f64,
    rss_max: f64,
    committed: usize,
    rolled_back: usize,
    online: usize,
}

/// Scenario 1: canary then waves, until every car that is on has settled on the release.
fn rollout(run: &mut Run, label: &str, soak: u64, within: Duration) -> Rollout {
    let first = run.timeline.len();
    run.create(plan("rollout", label, soak, None));
    let t0 = Instant::now();
    let mut phase = 0;
    loop {
        let view = run.sample("rollout", "rollout");
        if view.phase != phase {
            phase = view.phase;
            run.event(&format!(
                "rollout: phase {phase} ({} started)",
                view.started
            ));
        }
        let online = run.online();
        let done = view.phase == view.phases.len()
            && !online.is_empty()
            && online.iter().all(|&i| run.settled_on(i, label));
        if done {
            let done_secs = t0.elapsed().as_secs_f64();
            run.event(&format!(
                "rollout: every online car done after {done_secs:.1} s"
            ));
            let samples = &run.timeline[first..];
            let cpu: Vec<f64> = samples
                .iter()
                .map(|s| s["twin_cpu"].as_f64().unwrap())
                .collect();
            let rss = samples
                .iter()
                .map(|s| s["twin_rss_mib"].as_f64().unwrap())
                .fold(0.0, f64::max);
            let committed = online
                .iter()
                .filter(|&&i| run.sim.cars[i].seen.load(Ordering::Relaxed) == Seen::Committed as u8)
                .count();
            return Rollout {
                done_secs,
                cpu_mean: cpu.iter().sum::<f64>() / cpu.len().max(1) as f64,
                cpu_max: cpu.iter().copied().fold(0.0, f64::max),
                rss_max: rss,
                committed,
                rolled_back: online.len() - committed,
                online: online.len(),
            };
        }
        assert!(
            t0.elapsed() < within,
            "rollout: not every online car done in {within:?}: {}",
            serde_json::to_string(&view).unwrap()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

struct Halt {
    phase: usize,
    started: u64,
    budget: u64,
    failed: u64,
    threshold_cars: f64,
    accepted: usize,
    started_after: u64,
    watched_secs: f64,
    reason: String,
}

/// How many cars accepted a desired state for `label` (the simulation's own count).
fn accepted(run: &Run, label: &str) -> usize {
    run.sim
        .cars
        .iter()
        .filter(|c| c.accepted.lock().unwrap().iter().any(|l| l == label))
        .count()
}

/// Scenario 2: a fault appears when the second wave starts; the deployment must halt within
/// the phase's budget and start nobody while halted.
fn halt(
    run: &mut Run,
    label: &str,
    soak: u64,
    fault: f64,
    watch: Duration,
    within: Duration,
) -> Halt {
    // Starts are rate-limited here (to 30 % of the fleet a minute), so the halt has cars of the
    // phase left not to start.
    let per_minute = (run.sim.cars.len() as u32 * 3 / 10).max(1);
    run.create(plan("halt", label, soak, Some(per_minute)));
    let t0 = Instant::now();
    let mut phase = 0;
    let view = loop {
        let view = run.sample("halt", "halt");
        if view.phase != phase {
            phase = view.phase;
            run.event(&format!("halt: phase {phase} ({} started)", view.started));
            if phase == 3 && run.sim.fault() == 0.0 {
                run.sim
                    .fault_ppm
                    .store((fault * 1e6) as u64, Ordering::Relaxed);
                run.event(&format!(
                    "halt: fault injected, new slots fail their health checks at {:.0} %",
                    fault * 100.0
                ));
            }
        }
        if view.state == "halted" {
            break view;
        }
        assert!(
            view.state == "running",
            "halt: the deployment ended {} instead of halting",
            view.state
        );
        assert!(
            t0.elapsed() < within,
            "halt: no halt in {within:?}: {}",
            serde_json::to_string(&view).unwrap()
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    let reason = view.reason.clone().unwrap_or_default();
    run.event(&format!("halt: {reason}"));
    let current = &view.phases[view.phase - 1];
    let (started, budget) = (view.started, current.target);
    // Watch: nobody starts while halted, whatever the cars do.
    let watched = Instant::now();
    while watched.elapsed() < watch {
        let later = run.sample("halt", "halt");
        assert_eq!(later.state, "halted");
        std::thread::sleep(Duration::from_secs(1));
    }
    let later = run.deployment("halt");
    // Cars started just before they were switched off take the release when they are back.
    let back = Instant::now();
    while accepted(run, label) as u64 != later.started {
        assert!(
            back.elapsed() < Duration::from_secs(120),
            "halt: {} cars accepted the release, the twin started {}",
            accepted(run, label),
            later.started
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, body) = api(&run.twin, "POST", "/api/v1/deployments/halt/abort", None);
    assert_eq!(status, 200, "{body}");
    run.event("halt: aborted");
    run.sim.fault_ppm.store(0, Ordering::Relaxed);
    Halt {
        phase: view.phase,
        started,
        budget,
        failed: view.failed,
        threshold_cars: view.failure_threshold * current.group as f64,
        accepted: accepted(run, label),
        started_after: later.started,
        watched_secs: watched.elapsed().as_secs_f64(),
        reason,
    }
}

struct Ttl {
    ttl: u64,
    parked: usize,
    selected: u64,
    started: u64,
    never_reached: u64,
    started_parked: usize,
}

/// Scenario 3: parked cars, a short time-to-live; they come back after it and must not start.
fn ttl(run: &mut Run, label: &str, share: f64, ttl: u64, within: Duration) -> Ttl {
    let n = run.sim.cars.len();
    let parked: Vec<usize> = (0..n).filter(|i| (*i as f64) < share * n as f64).collect();
    run.sim.park(&parked);
    // The twin must see them gone before the deployment picks its first cars.
    let gone = Instant::now();
    while parked.iter().any(|&i| {
        let (status, view) = api(
            &run.twin,
            "GET",
            &format!("/api/v1/cars/{}", run.sim.cars[i].id),
            None,
        );
        assert_eq!(status, 200);
        view["connected"] == true
    }) {
        assert!(
            gone.elapsed() < Duration::from_secs(60),
            "the twin still shows parked cars connected"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    run.event(&format!("ttl: {} cars parked (switched off)", parked.len()));
    run.create(json!({
        "name": "ttl",
        "release": label,
        "selector": SELECTOR,
        "phases": [{"percent": 100.0, "soak_secs": 0}],
        "failure_threshold": 0.5,
        "success_threshold": 0.5,
        "ttl_secs": ttl,
        "supersede": true,
    }));
    let t0 = Instant::now();
    let view = loop {
        let view = run.sample("ttl", "ttl");
        if view.state == "expired" {
            break view;
        }
        assert!(
            t0.elapsed() < within,
            "ttl: not expired in {within:?}: {}",
            serde_json::to_string(&view).unwrap()
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    run.event(&format!(
        "ttl: expired, {} cars never reached",
        view.never_reached.unwrap_or(0)
    ));
    let sessions: Vec<u64> = parked
        .iter()
        .map(|&i| run.sim.cars[i].sessions.load(Ordering::Relaxed))
        .collect();
    for &i in &parked {
        run.sim.cars[i].parked.store(false, Ordering::Relaxed);
    }
    // They come back (each one a new session with the twin); the twin must not start them.
    let back = Instant::now();
    while parked
        .iter()
        .zip(&sessions)
        .any(|(&i, &before)| run.sim.cars[i].sessions.load(Ordering::Relaxed) == before)
    {
        run.sample("ttl", "ttl");
        assert!(
            back.elapsed() < Duration::from_secs(120),
            "parked cars did not come back"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    // A negative is watched for a while: three driver rounds (one a second).
    for _ in 0..3 {
        run.sample("ttl", "ttl");
        std::thread::sleep(Duration::from_secs(1));
    }
    run.event("ttl: parked cars back");
    let started_parked = parked
        .iter()
        .filter(|&&i| {
            run.sim.cars[i]
                .accepted
                .lock()
                .unwrap()
                .iter()
                .any(|l| l == label)
        })
        .count();
    Ttl {
        ttl,
        parked: parked.len(),
        selected: view.selected,
        started: view.started,
        never_reached: view.never_reached.unwrap_or(0),
        started_parked,
    }
}

// ---------------------------------------------------------------------------------------------
// Scenario 4: the first car against a later one, with real agents.

struct FirstCar {
    /// The simulated fleet was on (sharing the cores) during the round.
    fleet_on: bool,
    artifact_bytes: usize,
    ahead_secs: f64,
    first: f64,
    later: f64,
}

fn start_agent(bin: &Path, config: &Path, log: &Path) -> Child {
    Command::new(bin)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn car_view(run: &Run, id: &str) -> CarView {
    let (status, view) = api(&run.twin, "GET", &format!("/api/v1/cars/{id}"), None);
    assert_eq!(status, 200, "{view}");
    serde_json::from_value(view).unwrap()
}

/// What the real cars' views and logs say, for a failure message.
fn real_cars_said(run: &Run, ids: &[&str]) -> String {
    ids.iter()
        .map(|id| {
            let view = car_view(run, id);
            let log =
                std::fs::read_to_string(run.work.join(id).join("agent.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            format!(
                "{id}: connected {}, desired {:?}, reported {:?}\n  log: {}",
                view.connected,
                view.desired.as_ref().map(|d| d.version.clone()),
                view.state()
                    .map(|s| (s.phase, s.release.clone(), s.last_error.clone())),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n       ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The base with 1 % of it changed in 64 places and 64 KiB inserted (an OS image a small change
/// apart), from `seed`.
fn changed(base: &[u8], seed: u64) -> Vec<u8> {
    let size = base.len();
    let mut target = base.to_vec();
    let mut rng = fastrand::Rng::with_seed(seed);
    let piece = size / 6400;
    for _ in 0..64 {
        let at = rng.usize(..size - piece);
        target[at..at + piece].copy_from_slice(&cardeploy_testkit::noise(rng.u64(..), piece));
    }
    let at = size / 2;
    target.splice(at..at, cardeploy_testkit::noise(seed + 1, 64 << 10));
    target
}

/// Two rounds on two real agents: the base to both, then a target with a one-car canary —
/// first with the simulated fleet on, then with it switched off (its cars share the two cores
/// with the twin; what is compared is the twin's work for a first car and a later one).
fn first_car(
    run: &mut Run,
    agent: &Path,
    ca: &cardeploy_pki::FleetCa,
    size: usize,
) -> Vec<FirstCar> {
    let base = cardeploy_testkit::noise(7, size);
    let base_file = run.work.join("real-base.raucb");
    std::fs::write(&base_file, &base).unwrap();
    let base_label = os_release(run, "real-os", "1.0.0", &base);
    let targets = [changed(&base, 11), changed(&changed(&base, 11), 21)];
    let labels = [
        os_release(run, "real-os", "2.0.0", &targets[0]),
        os_release(run, "real-os", "3.0.0", &targets[1]),
    ];
    // Registering them made deltas ahead against what the simulated cars run (the same artifact
    // name): that work ends before anything is timed.
    let waited = procs::wait_ahead(&run.twin, Duration::from_secs(1800));
    run.event(&format!(
        "first car: the deltas made ahead at registration done after {waited:.1} s"
    ));
    let mut agents = Vec::new();
    let ids = ["REAL-1", "REAL-2"];
    for id in ids {
        let dir = run.work.join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let issued = ca.issue_car(id).unwrap();
        write_file(&dir.join("car.pem"), &issued.cert_pem, false).unwrap();
        write_file(&dir.join("car.key"), &issued.key_pem, true).unwrap();
        let (status, body) = api(
            &run.twin,
            "POST",
            "/api/v1/cars",
            Some(
                json!({"id": id, "attributes": {"kind": "real"}, "certificate_pem": issued.cert_pem}),
            ),
        );
        assert_eq!(status, 201, "{body}");
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "car_id = \"{id}\"\ntwin = \"localhost:{}\"\nca = \"{}\"\ncert = \"car.pem\"\nkey = \"car.key\"\n\
                 state_dir = \"state\"\nheartbeat_secs = 10\nroot = \"{}\"\ncompatible = \"{COMPATIBLE}\"\nseeds = [\"{}\"]\n",
                run.twin.cars_port,
                run.sim.ca.display(),
                run.signer.root_path().display(),
                base_file.display(),
            ),
        )
        .unwrap();
        agents.push(start_agent(agent, &config, &dir.join("agent.log")));
    }
    let applied = |run: &Run, id: &str, label: &str| {
        let view = car_view(run, id);
        view.state()
            .is_some_and(|s| s.phase == Phase::Applied && s.release.as_deref() == Some(label))
    };
    // Both run the base: their seed holds it, nothing travels.
    run.create(json!({
        "name": "real-base", "release": base_label, "selector": "kind=real",
        "phases": [{"percent": 100.0}], "failure_threshold": 0.5, "success_threshold": 1.0,
        "ttl_secs": 3600,
    }));
    let t0 = Instant::now();
    while !ids.iter().all(|id| applied(run, id, &base_label)) {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the real cars did not take the base in 120 s:\n{}",
            real_cars_said(run, &ids)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    run.until_completed("real-base", t0 + Duration::from_secs(120));
    run.event("first car: both real cars run the base");
    let mut rounds = Vec::new();
    for (round, (target, label)) in targets.iter().zip(&labels).enumerate() {
        let fleet_on = round == 0;
        if !fleet_on {
            run.sim.park(&(0..run.sim.cars.len()).collect::<Vec<_>>());
            run.event("first car: the simulated fleet switched off");
        }
        let name = format!("real-target-{}", round + 1);
        let version = label.split_once('@').unwrap().1.to_owned();
        run.create(json!({
            "name": name, "release": label, "selector": "kind=real",
            "phases": [{"cars": 1, "soak_secs": 0}, {"percent": 100.0}],
            "failure_threshold": 0.5, "success_threshold": 1.0, "ttl_secs": 3600,
        }));
        let created = Instant::now();
        let mut desired_at: HashMap<&str, Instant> = HashMap::new();
        let mut done_at: HashMap<&str, Instant> = HashMap::new();
        let mut order = Vec::new();
        while done_at.len() < ids.len() {
            for id in ids {
                if done_at.contains_key(id) {
                    continue;
                }
                let view = car_view(run, id);
                let wants = view.desired.as_ref().and_then(|d| d.version.as_deref())
                    == Some(version.as_str());
                if wants && !desired_at.contains_key(id) {
                    desired_at.insert(id, Instant::now());
                    order.push(id);
                }
                if view.state().is_some_and(|s| {
                    s.phase == Phase::Applied && s.release.as_deref() == Some(label.as_str())
                }) {
                    done_at.insert(id, Instant::now());
                }
            }
            assert!(
                created.elapsed() < Duration::from_secs(600),
                "the real cars did not take {label} in 600 s:\n{}",
                real_cars_said(run, &ids)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Both applied: the deployment completes at the driver's next round.
        run.until_completed(&name, created + Duration::from_secs(600));
        let took = |id: &str| done_at[id].duration_since(desired_at[id]).as_secs_f64();
        let result = FirstCar {
            artifact_bytes: target.len(),
            ahead_secs: desired_at[order[0]].duration_since(created).as_secs_f64(),
            first: took(order[0]),
            later: took(order[1]),
            fleet_on,
        };
        run.event(&format!(
            "first car ({}): {:.2} s, later car {:.2} s",
            if fleet_on { "fleet on" } else { "fleet off" },
            result.first,
            result.later
        ));
        rounds.push(result);
    }
    for mut a in agents {
        let _ = a.kill();
        let _ = a.wait();
    }
    rounds
}

// ---------------------------------------------------------------------------------------------

fn profile(smoke: bool, speed: f64) -> Profile {
    if smoke {
        Profile {
            fetch: Range(0.2, 0.6),
            verify: Range(0.05, 0.1),
            install: Range(0.2, 0.5),
            reboot: Range(0.2, 0.4),
            health: Range(0.1, 0.3),
            health_fail: 0.0,
            boot_fail: 0.0,
            online_mean: 120.0,
            offline: Range(0.5, 2.0),
            speed: 1.0,
        }
    } else {
        // A car on the road: a delta of tens of MB over LTE, RAUC writing a slot, a reboot, the
        // health checks; one car in 200 fails them, one in 500 does not boot the new slot; a
        // car is switched off every hour on average, for half a minute to five.
        Profile {
            fetch: Range(20.0, 120.0),
            verify: Range(2.0, 5.0),
            install: Range(30.0, 90.0),
            reboot: Range(20.0, 40.0),
            health: Range(10.0, 30.0),
            health_fail: 0.005,
            boot_fail: 0.002,
            online_mean: 3600.0,
            offline: Range(30.0, 300.0),
            speed,
        }
    }
}

fn num(name: &str, default: f64) -> f64 {
    arg(name).map_or(default, |v| v.parse().unwrap())
}

fn main() {
    let twin_bin = PathBuf::from(arg("--twin").expect("--twin BIN"));
    let cli = PathBuf::from(arg("--cli").expect("--cli BIN"));
    let agent_bin = arg("--agent").map(PathBuf::from);
    let out = PathBuf::from(arg("--out").expect("--out DIR"));
    let smoke = std::env::args().any(|a| a == "--smoke");
    let cars = num("--cars", if smoke { 300.0 } else { 10_000.0 }) as usize;
    let speed = num("--speed", 10.0);
    let seed = num("--seed", 1.0) as u64;
    let fault = num("--fault-rate", 0.5);
    // Soak and TTL in the simulation's time (scaled down with the profile).
    let soak = if smoke {
        1
    } else {
        (300.0 / speed).ceil() as u64
    };
    let ttl_secs = if smoke { 10 } else { 60 };
    std::fs::create_dir_all(&out).unwrap();

    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("twin");
    let pki_dir = data.join("pki");
    let pki = FleetPki::generate("fleet-sim", &["localhost".into()]).unwrap();
    pki.write(&pki_dir).unwrap();
    let ca = pki.ca;
    eprintln!("fleet-sim: issuing {cars} car certificates");
    let cars_dir = work.path().join("cars");
    std::fs::create_dir_all(&cars_dir).unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut fleet = Vec::with_capacity(cars);
    let mut registrations = Vec::with_capacity(cars);
    for i in 0..cars {
        let id = format!("SIM{i:05}");
        let issued = ca.issue_car(&id).unwrap();
        let cert = cars_dir.join(format!("{id}.pem"));
        let key = cars_dir.join(format!("{id}.key"));
        write_file(&cert, &issued.cert_pem, false).unwrap();
        write_file(&key, &issued.key_pem, true).unwrap();
        let model = if rng.f64() < 0.7 { "tx7" } else { "tx9" };
        let market = ["eu", "uk", "us"][rng.usize(..3)];
        registrations.push(json!({
            "id": id, "certificate_pem": issued.cert_pem,
            "attributes": {"model": model, "market": market, "kind": "sim"},
        }));
        fleet.push(SimCar {
            id,
            cert,
            key,
            seen: AtomicU8::new(Seen::Offline as u8),
            release: Mutex::new(None),
            accepted: Mutex::new(Vec::new()),
            parked: AtomicBool::new(false),
            sessions: AtomicU64::new(0),
        });
    }
    let twin = start_twin(&twin_bin, &data, 30);
    let signer = Signer::for_twin(&data);
    signer.push_root_to(&twin.api, &twin.token);
    eprintln!("fleet-sim: registering {cars} cars");
    for body in registrations {
        let (status, answer) = api(&twin, "POST", "/api/v1/cars", Some(body));
        assert_eq!(status, 201, "{answer}");
    }
    let sim = Arc::new(Sim {
        profile: profile(smoke, speed),
        port: twin.cars_port,
        ca: pki_dir.join("ca.pem"),
        root: signer.root_bytes().to_vec(),
        fault_ppm: AtomicU64::new(0),
        cars: fleet,
        connecting: tokio::sync::Semaphore::new(64),
    });
    let cpu = (Instant::now(), cpu_time(twin.child.id()));
    let mut run = Run {
        twin,
        sim: sim.clone(),
        signer,
        cli,
        work: work.path().to_owned(),
        started: Instant::now(),
        timeline: Vec::new(),
        events: Vec::new(),
        cpu,
        cpu_share: 0.0,
        smoke,
    };
    let v2 = os_release(
        &run,
        "car-os",
        "2.0.0",
        &cardeploy_testkit::noise(2, 256 << 10),
    );
    let v3 = os_release(
        &run,
        "car-os",
        "3.0.0",
        &cardeploy_testkit::noise(3, 256 << 10),
    );
    let v4 = os_release(
        &run,
        "car-os",
        "4.0.0",
        &cardeploy_testkit::noise(4, 256 << 10),
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let root = TrustedRoot::pinned(&sim.root).unwrap();
    for index in 0..cars {
        let mut rng = fastrand::Rng::with_seed(seed ^ (index as u64).wrapping_mul(0x9E37_79B9));
        let mut hw = Hardware {
            booted: "A".into(),
            primary: "A".into(),
            boot_id: String::new(),
            health: Health::Pending(String::new()),
            boots: 0,
        };
        hw.boot(&mut rng, &sim.profile, false);
        let mut car = CarRun {
            sim: sim.clone(),
            index,
            rng,
            state: State::default(),
            hw,
            root: root.clone(),
            epoch: 1,
            seq: 0,
            fetch_left: None,
            fresh_slot: false,
            connected: false,
        };
        car.derive();
        runtime.spawn(car.run());
    }
    run.event(&format!("{cars} simulated cars started"));
    let t0 = Instant::now();
    while run.online().len() < cars * 9 / 10
        || run.counts()[Seen::Idle as usize] < (cars * 9 / 10) as u64
    {
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "the fleet did not connect"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    run.event(&format!("{} cars online", run.online().len()));

    let long = Duration::from_secs(if smoke { 120 } else { 3 * 3600 });
    let r = rollout(&mut run, &v2, soak, long);
    let h = halt(
        &mut run,
        &v3,
        soak,
        fault,
        Duration::from_secs(if smoke { 5 } else { 60 }),
        long,
    );
    let t = ttl(&mut run, &v4, 0.05, ttl_secs, long);
    let f = agent_bin.as_ref().map(|agent| {
        first_car(
            &mut run,
            agent,
            &ca,
            (num("--image-mib", if smoke { 2.0 } else { 64.0 }) * (1 << 20) as f64) as usize,
        )
    });

    let mut md = format!(
        "# fleet-sim: {cars} simulated cars, speed ×{speed}\n\n| measure | value | target |\n|---|---|---|\n"
    );
    md += &format!(
        "| rollout (1 % canary, waves 10/50/100 %, soak {soak} s): `deploy create` → every online car done | {:.1} s ({} online: {} committed, {} rolled back) | |\n",
        r.done_secs, r.online, r.committed, r.rolled_back
    );
    md += &format!(
        "| twin CPU during the rollout, mean / max | {:.0} % / {:.0} % of one core | |\n",
        r.cpu_mean * 100.0,
        r.cpu_max * 100.0
    );
    md += &format!(
        "| twin RSS during the rollout, max | {:.1} MiB | |\n",
        r.rss_max
    );
    md += &format!(
        "| halt: cars started when the threshold was crossed / phase {} budget | {} / {} ({} failed ≥ {:.1}; {} cars accepted it) | ≤ budget |\n",
        h.phase, h.started, h.budget, h.failed, h.threshold_cars, h.accepted
    );
    md += &format!(
        "| halt: cars started while halted ({:.0} s watched) | {} | 0 |\n",
        h.watched_secs,
        h.started_after - h.started
    );
    md += &format!(
        "| ttl {} s with {} cars parked: never reached / started of selected | {} / {} of {} (parked cars started after: {}) | ≥ parked, 0 |\n",
        t.ttl, t.parked, t.never_reached, t.started, t.selected, t.started_parked
    );
    for f in f.iter().flatten() {
        md += &format!(
            "| first car vs later car, same (base, target), {:.1} MiB OS image, simulated fleet {}: desired → applied | {:.2} s / {:.2} s = {:.2}× (deltas made ahead in {:.2} s before the canary) | ≤ 1.5× |\n",
            f.artifact_bytes as f64 / (1 << 20) as f64,
            if f.fleet_on { "on" } else { "off" },
            f.first,
            f.later,
            f.first / f.later,
            f.ahead_secs
        );
    }
    md += &format!("\nHalt reason: {}\n", h.reason);
    std::fs::write(out.join("summary.md"), &md).unwrap();
    std::fs::write(
        out.join("timeline.json"),
        serde_json::to_string(&json!({
            "cars": cars, "speed": speed, "states": SEEN,
            "samples": run.timeline, "events": run.events,
        }))
        .unwrap(),
    )
    .unwrap();
    println!("{md}");

    // What must hold, smoke or not.
    assert!(
        h.started <= h.budget,
        "halt: {} cars started beyond the budget {}",
        h.started,
        h.budget
    );
    assert_eq!(
        h.started_after, h.started,
        "halt: cars started while halted"
    );
    assert_eq!(
        h.accepted as u64, h.started,
        "halt: cars that took the release vs the twin's count"
    );
    assert!(
        t.never_reached >= t.parked as u64,
        "ttl: fewer never reached than parked"
    );
    assert_eq!(
        t.started_parked, 0,
        "ttl: a parked car started after the time-to-live"
    );
    if run.smoke {
        assert_eq!(
            r.rolled_back, 0,
            "smoke: no failure is configured, yet cars rolled back"
        );
        for f in f.iter().flatten() {
            assert!(f.first > 0.0 && f.later > 0.0);
        }
        println!("fleet-sim --smoke: every scenario held");
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
}
