//! The system-test suites, in the order `cargo xtask qemu-test` runs them. They share one car
//! (each suite starts from where the previous one left it, as a car in the field would) and one
//! twin; each returns what it measured.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use cardeploy_protocol::Phase;
use cardeploy_protocol::api::CarView;

use crate::fleet::{CarOptions, Fleet, TWIN_FROM_GUEST, os, phase, release};
use crate::machine::{Image, Machine};

/// RAUC's `compatible` of the image (images/README.md).
pub const COMPATIBLE: &str = "cardeploy-qemuarm64";
pub const CAR: &str = "QEMU-CAR-1";
/// Seconds the guest's health gate has after booting a new slot.
const HEALTH_DEADLINE: u64 = 25;

/// Where the agent serves its registry in the guest (the image's containerd-pull mirrors
/// registry.cardeploy.local there, as the Yocto layer's registries.yaml does for k3s).
const GUEST_REGISTRY: &str = "127.0.0.1:5000";

/// TCG is slow; these bound each wait generously so a hang fails instead of stalling CI.
const BOOT: Duration = Duration::from_secs(120);
const UPDATE: Duration = Duration::from_secs(300);

/// The agent's OS configuration inside the guest. Both slots are seeds: the bundles are
/// uncompressed squashfs (images/README.md), so most chunks of a new bundle are already in the
/// running slot.
fn agent_extra() -> String {
    format!(
        "seeds = [\"/dev/vda3\", \"/dev/vda4\"]\n\
         [containers]\n\
         registry = \"{GUEST_REGISTRY}\"\n\
         [os]\n\
         reboot_command = [\"busybox\", \"reboot\", \"-f\"]\n\
         [os.health]\n\
         deadline_secs = {HEALTH_DEADLINE}\n\
         interval_secs = 2\n\
         twin_grace_secs = 20\n\
         command = [\"test\", \"-e\", \"/etc/cardeploy/healthy\"]\n"
    )
}

/// One measured line for the summary.
#[derive(Debug, Clone)]
pub struct Measure {
    pub what: String,
    pub value: String,
}

fn measure(out: &mut Vec<Measure>, what: impl Into<String>, value: impl Into<String>) {
    let (what, value) = (what.into(), value.into());
    println!("  {what}: {value}");
    out.push(Measure { what, value });
}

/// The system under test.
pub struct World {
    pub image: Image,
    pub fleet: Fleet,
    pub car: Machine,
    /// The release line the suites publish to (`os`; the demo's twin already has an `os`).
    pub line: String,
    /// How long the update suite's deployment took to commit: the power-cut suite spreads its
    /// cuts over that span.
    pub update_took: Option<Duration>,
    /// The power-cut suite's rounds and first seed.
    pub power_cuts: PowerCuts,
}

/// How the power-cut suite runs: `rounds` cuts, round k seeded with `seed + k`. In CI a few
/// rounds; a soak (`cargo xtask qemu-test power-cut --rounds 100 --seed S`) runs many.
#[derive(Clone, Copy, Debug)]
pub struct PowerCuts {
    pub rounds: u64,
    pub seed: u64,
}

impl Default for PowerCuts {
    fn default() -> Self {
        Self {
            rounds: std::env::var("CARDEPLOY_QEMU_POWER_CUTS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(POWER_CUTS),
            seed: 0,
        }
    }
}

impl World {
    pub fn new(image: &Image, bin: &Path, work: &Path) -> anyhow::Result<Self> {
        let fleet = Fleet::start(bin, &work.join("fleet"))?;
        Self::with_fleet(image, fleet, work)
    }

    /// A new qemu car (`CAR`) registered with `fleet`; its disk and console log go to `work`.
    pub fn with_fleet(image: &Image, fleet: Fleet, work: &Path) -> anyhow::Result<Self> {
        let mut options = CarOptions::new(
            COMPATIBLE,
            &format!("{TWIN_FROM_GUEST}:{}", fleet.cars_port),
        );
        // What goes into the car's /data/cardeploy.
        options.out = Some(fleet.dir.join("cars").join(CAR).join("cardeploy"));
        options.extra_config = agent_extra();
        let files = fleet.add_car(CAR, &options)?;
        let data = files.parent().context("car files have a parent")?;
        // containerd rides on the data partition (images/README.md): the containers suite's.
        let bin = data.join("containerd/bin");
        std::fs::create_dir_all(&bin)?;
        for name in ["containerd", "ctr"] {
            let from = image.file("containerd").join(name);
            std::fs::copy(&from, bin.join(name)).with_context(|| {
                format!(
                    "{} is missing: build the image again with `cargo xtask image`",
                    from.display()
                )
            })?;
        }
        let car = Machine::provision(image, CAR, &work.join("cars"), data)?;
        Ok(Self {
            image: image.clone(),
            fleet,
            car,
            line: "os".into(),
            update_took: None,
            power_cuts: PowerCuts::default(),
        })
    }

    fn deploy(&self, version: &str, bundle: &str) -> anyhow::Result<Instant> {
        let digest =
            self.fleet
                .release_os(&self.line, version, COMPATIBLE, &self.image.file(bundle))?;
        let at = Instant::now();
        self.fleet.set_desired(CAR, &digest)?;
        Ok(at)
    }

    /// Wait for the boot marker of `slot`; returns the time since power on or since `since`.
    fn booted(&mut self, slot: &str, since: Instant) -> anyhow::Result<Duration> {
        let line = self
            .car
            .wait_for(&format!("CARDEPLOY-BOOT slot={slot}"), BOOT)?;
        println!("  console: {line}");
        Ok(since.elapsed())
    }

    /// Follow the deployment of `version` on the twin (fetch and install progress) until RAUC has
    /// written the slot.
    fn installed(&self, version: &str) -> anyhow::Result<()> {
        let label = format!("{}@{version}", self.line);
        self.fleet.until(
            CAR,
            &format!("{label} to be installed"),
            UPDATE,
            true,
            |v| {
                release(v) == Some(label.as_str())
                    && !matches!(
                        phase(v),
                        Some(
                            Phase::Fetching | Phase::Verifying | Phase::Installing | Phase::Applied
                        )
                    )
            },
        )?;
        Ok(())
    }
}

/// boot: slot A boots; the agent connects with its certificate and reports slot A and its
/// version.
pub fn boot(world: &mut World) -> anyhow::Result<Vec<Measure>> {
    let mut out = Vec::new();
    world.car.power_on()?;
    let on = world.car.powered_on.context("powered on")?;
    let took = world.booted("A", on)?;
    measure(
        &mut out,
        "boot slot A (power on → boot marker)",
        format!("{took:.1?}"),
    );
    let view = world.fleet.until(
        CAR,
        "the car to connect and report slot A",
        BOOT,
        true,
        |v| v.connected && booted_slot(v) == Some("A"),
    )?;
    measure(
        &mut out,
        "power on → connected and reported",
        format!("{:.1?}", on.elapsed()),
    );
    let version = os(&view).and_then(|os| os.version.as_deref());
    ensure!(
        version == Some("1.0.0"),
        "the car reports OS version {version:?} instead of 1.0.0: {view:?}"
    );
    ensure!(
        view.reported
            .as_ref()
            .is_some_and(|r| r.agent_version.is_some()),
        "no agent version in {view:?}"
    );
    Ok(out)
}

fn booted_slot(view: &CarView) -> Option<&str> {
    os(view).map(|os| os.booted.as_str())
}

fn last_error(view: &CarView) -> &str {
    view.state()
        .and_then(|s| s.last_error.as_deref())
        .unwrap_or("")
}

/// update: a signed os@2.0.0 lands in slot B, the car reboots into it, passes the health gate,
/// commits it, and the twin reports 2.0.0 on B.
pub fn update(world: &mut World) -> anyhow::Result<Vec<Measure>> {
    let mut out = Vec::new();
    let deployed = world.deploy("2.0.0", "os-2.0.0.raucb")?;
    world.installed("2.0.0")?;
    world.car.wait_for("CARDEPLOY-UBOOT slot=B", UPDATE)?;
    let rebooted = Instant::now();
    let took = world.booted("B", rebooted)?;
    measure(
        &mut out,
        "boot slot B (U-Boot → boot marker)",
        format!("{took:.1?}"),
    );
    let view = world
        .fleet
        .until(CAR, "os@2.0.0 committed on B", UPDATE, true, |v| {
            phase(v) == Some(Phase::Committed) && booted_slot(v) == Some("B")
        })?;
    world.update_took = Some(deployed.elapsed());
    measure(
        &mut out,
        "deployment → committed",
        format!("{:.1?}", deployed.elapsed()),
    );
    let p = view.progress.clone().unwrap_or_default();
    measure(
        &mut out,
        "bytes fetched for os@2.0.0",
        format!(
            "{} B on the wire for a {} B bundle ({} B from seeds)",
            p.wire_bytes, p.planned_bytes, p.seed_bytes
        ),
    );
    ensure!(
        os(&view).and_then(|os| os.version.as_deref()) == Some("2.0.0"),
        "{view:?}"
    );
    Ok(out)
}

/// boot failure: os@3.0.0 cannot boot; U-Boot spends its tries on it and starts B again; the
/// agent reports a boot failure.
pub fn boot_failure(world: &mut World) -> anyhow::Result<Vec<Measure>> {
    let mut out = Vec::new();
    let deployed = world.deploy("3.0.0", "os-3.0.0-bootfail.raucb")?;
    world.installed("3.0.0")?;
    world.car.wait_for("CARDEPLOY-UBOOT slot=A", UPDATE)?;
    world.booted("B", Instant::now())?;
    let view = world
        .fleet
        .until(CAR, "a rollback after a boot failure", UPDATE, true, |v| {
            phase(v) == Some(Phase::RolledBack)
        })?;
    let error = last_error(&view);
    ensure!(
        error.contains("boot failure"),
        "expected a boot failure, got: {view:?}"
    );
    measure(
        &mut out,
        "deployment → rolled back (boot failure)",
        format!("{:.1?}", deployed.elapsed()),
    );
    println!("  twin: {error}");
    Ok(out)
}

/// health failure: os@4.0.0 boots but fails the health gate; the agent marks it bad and reboots;
/// the car is back on B and says why.
pub fn health_failure(world: &mut World) -> anyhow::Result<Vec<Measure>> {
    let mut out = Vec::new();
    let deployed = world.deploy("4.0.0", "os-4.0.0-healthfail.raucb")?;
    world.installed("4.0.0")?;
    world.booted("A", Instant::now())?;
    world.booted("B", Instant::now())?;
    let view = world.fleet.until(
        CAR,
        "a rollback after a health failure",
        UPDATE,
        true,
        |v| {
            phase(v) == Some(Phase::RolledBack)
                && release(v) == Some(format!("{}@4.0.0", world.line).as_str())
        },
    )?;
    let error = last_error(&view);
    ensure!(
        error.contains("health failure"),
        "expected a health failure, got: {view:?}"
    );
    ensure!(booted_slot(&view) == Some("B"), "{view:?}");
    measure(
        &mut out,
        "deployment → rolled back (health failure)",
        format!("{:.1?}", deployed.elapsed()),
    );
    println!("  twin: {error}");
    Ok(out)
}

/// Rounds of the power-cut suite (`CARDEPLOY_QEMU_POWER_CUTS` overrides).
const POWER_CUTS: u64 = 10;
/// The span cuts are spread over when the update suite did not run first (it measures the real
/// one: download, install, reboot and the first boot of the new slot).
const CUT_WINDOW: Duration = Duration::from_secs(40);

/// power cut: a deployment of a good bundle, then qemu is killed (no shutdown) at a random
/// moment; the car must boot a good slot and the agent must finish the update: committed, on a
/// slot marked good. Any other end is a failure, with its cause; every round runs before the
/// suite fails, so a soak gives the whole tally. Seeded: round k uses seed `seed + k`, so a
/// failure is reproduced with the same `--seed`.
pub fn power_cut(world: &mut World) -> anyhow::Result<Vec<Measure>> {
    let mut out = Vec::new();
    let PowerCuts { rounds, seed } = world.power_cuts;
    let mut committed = 0;
    let mut causes = Vec::new();
    // Stratified: round k cuts somewhere in the k-th of `rounds` equal parts of the update, so
    // every stage (download, install, reboot, first boot of the new slot) gets its cuts.
    let window = world.update_took.unwrap_or(CUT_WINDOW);
    for k in 0..rounds {
        let mut rng = fastrand::Rng::with_seed(seed.wrapping_add(k));
        let cut = window.mul_f64((k as f64 + rng.f64()) / rounds as f64);
        // Two good bundles in turn: each round has something to download and install.
        let bundle = if k % 2 == 0 {
            "os-5.0.0.raucb"
        } else {
            "os-2.0.0.raucb"
        };
        let version = format!("10.{k}.0");
        let label = format!("{}@{version}", world.line);
        let console = world.car.mark();
        let deployed = world.deploy(&version, bundle)?;
        let mut seen = String::from("-");
        while deployed.elapsed() < cut {
            if let Ok(view) = world.fleet.show(CAR) {
                seen = format!(
                    "{} {}",
                    phase(&view).map_or("-", Phase::as_str),
                    release(&view).unwrap_or("-")
                );
            }
            std::thread::sleep(
                Duration::from_millis(200).min(cut.saturating_sub(deployed.elapsed())),
            );
        }
        // The console knows better than the twin whether the new slot was already booting.
        if let Some(boot) = world.car.last_since(console, "CARDEPLOY-UBOOT") {
            seen = format!("{seen}; rebooted: {boot}");
        }
        world.car.power_cut();
        println!("  round {k}: power cut {cut:.1?} after deployment (twin last heard: {seen})");
        world.car.power_on()?;
        let line = world.car.wait_for("CARDEPLOY-BOOT", BOOT)?;
        println!("  round {k}: {line}");
        let view = world
            .fleet
            .until(CAR, &format!("{label} to end"), UPDATE, true, |v| {
                release(v) == Some(label.as_str())
                    && matches!(
                        phase(v),
                        Some(Phase::Committed | Phase::RolledBack | Phase::Failed)
                    )
            })?;
        let booted = booted_slot(&view).unwrap_or("?").to_owned();
        let slot_ok = os(&view)
            .and_then(|os| {
                os.slots
                    .iter()
                    .find(|s| s.bootname.as_deref() == Some(booted.as_str()))
            })
            .is_some_and(|s| s.boot_status.as_deref() == Some("good"));
        ensure!(
            slot_ok,
            "round {k}: the car runs slot {booted}, which is not marked good: {view:?}"
        );
        let phase = phase(&view).map_or("-", Phase::as_str);
        // Both bundles are good: anything but committed is a bug the cut exposed.
        match phase {
            "committed" => committed += 1,
            other => causes.push(format!(
                "round {k} (seed {}, cut at {cut:.1?} during \"{seen}\"): {other} on slot {booted}: {}",
                seed.wrapping_add(k),
                match last_error(&view) {
                    "" => "no reason given".to_owned(),
                    e => e.to_string(),
                }
            )),
        }
        measure(
            &mut out,
            format!("round {k} (cut at {cut:.1?}, during \"{seen}\")"),
            format!("{phase} on slot {booted} after {:.1?}", deployed.elapsed()),
        );
    }
    measure(
        &mut out,
        "power cuts",
        format!(
            "{rounds} rounds (seed {seed}): {committed} committed, {} not",
            rounds - committed
        ),
    );
    ensure!(
        causes.is_empty(),
        "{} of {rounds} rounds did not end committed:\n  {}",
        causes.len(),
        causes.join("\n  ")
    );
    Ok(out)
}

/// Every suite, by name, in order.
pub type Suite = fn(&mut World) -> anyhow::Result<Vec<Measure>>;
pub const SUITES: &[(&str, Suite)] = &[
    ("boot", boot),
    ("update", update),
    ("boot-failure", boot_failure),
    ("health-failure", health_failure),
    ("power-cut", power_cut),
    ("containers", containers),
];

/// An arm64 image of 48 files of 64 KiB under `dir` (an OCI layout tagged 1.0); `next` changes
/// three files a little and adds one, as a new version of an application layer would.
fn app_image(dir: &Path, next: bool) -> anyhow::Result<()> {
    use cardeploy_testkit::oci::{Layout, tar};
    let _ = std::fs::remove_dir_all(dir);
    let mut files: Vec<(String, Vec<u8>)> = (0..48u64)
        .map(|i| {
            let mut data = cardeploy_testkit::noise(1000 + i, 64 << 10);
            if next && i % 16 == 5 {
                data[4096..4224].copy_from_slice(&cardeploy_testkit::noise(9000 + i, 128));
            }
            (format!("srv/app/part{i:02}.bin"), data)
        })
        .collect();
    if next {
        files.push((
            "srv/app/added.bin".into(),
            cardeploy_testkit::noise(777, 8 << 10),
        ));
    }
    let entries: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    let layout = Layout::new(dir);
    let image = layout.image("arm64", &[tar(&entries)]);
    layout.list(&[(&image.manifest, "1.0")]);
    Ok(())
}

/// `apps@version` carrying the image in `dir` as qemu/app; returns the release digest and the
/// manifest digest the car's registry will serve (the release rewrote the manifest).
fn container_release(world: &World, version: &str, dir: &Path) -> anyhow::Result<(String, String)> {
    let image = format!("qemu/app={}", dir.display());
    let digest = world
        .fleet
        .release("apps", version, COMPATIBLE, &["--image", &image], &[])?;
    let path = world
        .fleet
        .dir
        .join("releases")
        .join(format!("apps-{version}"))
        .join("release.json");
    let release: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    let manifest = release["images"][0]["manifest"]
        .as_str()
        .with_context(|| format!("{} carries no image", path.display()))?;
    Ok((digest, format!("sha256:{manifest}")))
}

/// containers: a container release reaches the car, its new version as deltas against the one
/// before; containerd on the car (as k3s embeds it) pulls each from the agent's registry.
pub fn containers(world: &mut World) -> anyhow::Result<Vec<Measure>> {
    let mut out = Vec::new();
    if world.car.powered_on.is_none() {
        world.car.power_on()?;
        world
            .fleet
            .until(CAR, "the car to connect", BOOT, true, |v| v.connected)?;
    }
    let dir = world.fleet.dir.join("images");
    let mut served = Vec::new();
    for (version, next) in [("1.0.0", false), ("2.0.0", true)] {
        let image = dir.join(format!("app-{version}"));
        app_image(&image, next)?;
        let (digest, manifest) = container_release(world, version, &image)?;
        let label = format!("apps@{version}");
        let deployed = Instant::now();
        world.fleet.set_desired(CAR, &digest)?;
        // The last progress of each artifact, as the twin saw it while the car fetched.
        let seen = std::cell::RefCell::new(std::collections::BTreeMap::new());
        world
            .fleet
            .until(CAR, &format!("{label} applied"), UPDATE, false, |v| {
                if let Some(p) = &v.progress {
                    seen.borrow_mut().insert(p.artifact.clone(), p.clone());
                }
                release(v) == Some(label.as_str()) && phase(v) == Some(Phase::Applied)
            })?;
        measure(
            &mut out,
            format!("{label}: desired → applied"),
            format!("{:.1?}", deployed.elapsed()),
        );
        let seen = seen.into_inner();
        let layer = seen
            .iter()
            .find(|(name, p)| name.contains(".layer-") && p.done)
            .map(|(_, p)| p.clone())
            .with_context(|| format!("no finished layer fetch seen: {seen:?}"))?;
        measure(
            &mut out,
            format!("{label}: its layer"),
            format!(
                "{} B on the wire for {} B ({} B from the car's earlier layers, {} B already in its store)",
                layer.wire_bytes, layer.planned_bytes, layer.seed_bytes, layer.store_bytes
            ),
        );
        if next {
            ensure!(
                layer.seed_bytes + layer.store_bytes >= layer.planned_bytes / 2
                    && layer.wire_bytes * 4 < layer.planned_bytes,
                "the new layer version did not travel as a delta of the old one: {layer:?}"
            );
        }
        let pulled = world.car.wait_for(
            &format!("CARDEPLOY-CTR-PULLED image=qemu/app digest={manifest}"),
            UPDATE,
        )?;
        println!("  console: {pulled}");
        measure(
            &mut out,
            format!("{label}: desired → containerd pulled it from the car's registry"),
            format!("{:.1?}", deployed.elapsed()),
        );
        served.push(manifest);
    }
    ensure!(
        served[0] != served[1],
        "both versions served the same manifest"
    );
    Ok(out)
}

/// Run `names` (all when empty) in order; stops at the first failure.
pub fn run(
    image: &Image,
    bin: &Path,
    work: &Path,
    names: &[String],
    power_cuts: PowerCuts,
) -> anyhow::Result<()> {
    for name in names {
        if !SUITES.iter().any(|(n, _)| n == name) {
            bail!(
                "no suite {name:?}; suites: {}",
                SUITES
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let mut world = World::new(image, bin, work)?;
    world.power_cuts = power_cuts;
    let mut summary = Vec::new();
    let all = Instant::now();
    for (name, suite) in SUITES {
        if !names.is_empty() && !names.iter().any(|n| n == name) {
            continue;
        }
        println!("\n== qemu suite {name}");
        let started = Instant::now();
        let measured = suite(&mut world).with_context(|| {
            format!(
                "qemu suite {name} failed (console: {}; twin: {})",
                world.car.log.display(),
                world.fleet.dir.join("twin.log").display()
            )
        })?;
        let took = started.elapsed();
        println!("  suite {name} passed in {took:.1?}");
        summary.push((name.to_string(), took, measured));
    }
    println!("\n== qemu suites: all passed in {:.1?}", all.elapsed());
    for (name, took, measured) in &summary {
        println!("  {name:<15} {took:>8.1?}");
        for m in measured {
            println!("      {}: {}", m.what, m.value);
        }
    }
    if let Ok(events) = world.fleet.events(CAR) {
        std::fs::write(work.join("events.txt"), events)?;
    }
    Ok(())
}
