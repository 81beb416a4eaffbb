//! The system-test suites, in the order `cargo xtask qemu-test` runs them. They share one car
//! (each suite starts from where the previous one left it, as a car in the field would) and one
//! twin; each returns what it measured.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::Value;

use crate::fleet::{Fleet, phase};
use crate::machine::{Image, Machine};

/// RAUC's `compatible` of the image (images/README.md).
pub const COMPATIBLE: &str = "cardeploy-qemuarm64";
pub const CAR: &str = "QEMU-CAR-1";
/// Seconds the guest's health gate has after booting a new slot.
const HEALTH_DEADLINE: u64 = 25;

/// TCG is slow; these bound each wait generously so a hang fails instead of stalling CI.
const BOOT: Duration = Duration::from_secs(120);
const UPDATE: Duration = Duration::from_secs(300);

/// The agent's OS configuration inside the guest. No seeds: a RAUC bundle is a compressed
/// squashfs, so the raw slot shares no chunks with it; deltas come from the previous bundle in
/// the agent's store instead.
fn agent_extra() -> String {
    format!(
        "[os]\n\
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
}

impl World {
    pub fn new(image: &Image, bin: &Path, work: &Path) -> anyhow::Result<Self> {
        let fleet = Fleet::start(bin, &work.join("fleet"))?;
        let files = fleet.add_car(CAR, COMPATIBLE, &agent_extra())?;
        let data = files.parent().context("car files have a parent")?;
        let car = Machine::provision(image, CAR, &work.join("cars"), data)?;
        Ok(Self {
            image: image.clone(),
            fleet,
            car,
        })
    }

    fn deploy(&self, version: &str, bundle: &str) -> anyhow::Result<Instant> {
        let digest = self
            .fleet
            .release_os("os", version, COMPATIBLE, &self.image.file(bundle))?;
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

    fn os(view: &Value) -> &Value {
        &view["reported"]["state"]["os"]
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
    let view = world
        .fleet
        .until(CAR, "the car to connect and report slot A", BOOT, |v| {
            v["connected"] == true && booted_slot(v) == Some("A")
        })?;
    measure(
        &mut out,
        "power on → connected and reported",
        format!("{:.1?}", on.elapsed()),
    );
    let os = World::os(&view);
    ensure!(
        os["version"] == "1.0.0",
        "the car reports OS version {} instead of 1.0.0: {view}",
        os["version"]
    );
    ensure!(
        view["reported"]["agent_version"].as_str().is_some(),
        "no agent version in {view}"
    );
    Ok(out)
}

fn booted_slot(view: &Value) -> Option<&str> {
    World::os(view)["booted"].as_str()
}

/// update: a signed os@2.0.0 lands in slot B, the car reboots into it, passes the health gate,
/// commits it, and the twin reports 2.0.0 on B.
pub fn update(world: &mut World) -> anyhow::Result<Vec<Measure>> {
    let mut out = Vec::new();
    let deployed = world.deploy("2.0.0", "os-2.0.0.raucb")?;
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
        .until(CAR, "os@2.0.0 committed on B", UPDATE, |v| {
            phase(v) == "committed" && booted_slot(v) == Some("B")
        })?;
    measure(
        &mut out,
        "deployment → committed",
        format!("{:.1?}", deployed.elapsed()),
    );
    let p = &view["progress"];
    measure(
        &mut out,
        "bytes fetched for os@2.0.0",
        format!(
            "{} B on the wire for a {} B bundle ({} B from seeds)",
            p["wire_bytes"], p["planned_bytes"], p["seed_bytes"]
        ),
    );
    ensure!(World::os(&view)["version"] == "2.0.0", "{view}");
    Ok(out)
}

/// boot failure: os@3.0.0 cannot boot; U-Boot spends its tries on it and starts B again; the
/// agent reports a boot failure.
pub fn boot_failure(world: &mut World) -> anyhow::Result<Vec<Measure>> {
    let mut out = Vec::new();
    let deployed = world.deploy("3.0.0", "os-3.0.0-bootfail.raucb")?;
    world.car.wait_for("CARDEPLOY-UBOOT slot=A", UPDATE)?;
    world.booted("B", Instant::now())?;
    let view = world
        .fleet
        .until(CAR, "a rollback after a boot failure", UPDATE, |v| {
            phase(v) == "rolled-back"
        })?;
    let error = view["reported"]["state"]["last_error"]
        .as_str()
        .unwrap_or("");
    ensure!(
        error.contains("boot failure"),
        "expected a boot failure, got: {view}"
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
    world.booted("A", Instant::now())?;
    world.booted("B", Instant::now())?;
    let view = world
        .fleet
        .until(CAR, "a rollback after a health failure", UPDATE, |v| {
            phase(v) == "rolled-back" && v["reported"]["state"]["release"] == "os@4.0.0"
        })?;
    let error = view["reported"]["state"]["last_error"]
        .as_str()
        .unwrap_or("");
    ensure!(
        error.contains("health failure"),
        "expected a health failure, got: {view}"
    );
    ensure!(booted_slot(&view) == Some("B"), "{view}");
    measure(
        &mut out,
        "deployment → rolled back (health failure)",
        format!("{:.1?}", deployed.elapsed()),
    );
    println!("  twin: {error}");
    Ok(out)
}

/// Every suite, by name, in order.
pub type Suite = fn(&mut World) -> anyhow::Result<Vec<Measure>>;
pub const SUITES: &[(&str, Suite)] = &[
    ("boot", boot),
    ("update", update),
    ("boot-failure", boot_failure),
    ("health-failure", health_failure),
];

/// Run `names` (all when empty) in order; stops at the first failure.
pub fn run(image: &Image, bin: &Path, work: &Path, names: &[String]) -> anyhow::Result<()> {
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
