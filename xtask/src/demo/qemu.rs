//! The demo's OS part: a real qemu-aarch64 car (U-Boot with boot counting, A/B slots, RAUC, the
//! cross-built agent; `cargo xtask image`) on the demo's twin. A signed OS release lands through a
//! real reboot and is committed; a broken one fails its health gate and the car rolls back by
//! itself. The same suites run in CI (`cargo xtask qemu-test`).

use std::path::Path;

use cardeploy_qemu_tests::fleet::Fleet;
use cardeploy_qemu_tests::machine::Image;
use cardeploy_qemu_tests::suites::{self, World};

use crate::host::as_root;
use crate::image;
use crate::sh::step;

/// Runs on the demo's running twin (its data directory is `data`).
pub fn main(data: &Path, bin: &Path, api: &str, cars_port: u16) -> anyhow::Result<()> {
    step(
        "a qemu-aarch64 car: U-Boot boot counting, A/B slots, RAUC, the agent (cargo xtask image)",
    );
    if !as_root() {
        println!("  SKIPPED: building the image and booting it needs root (mmdebstrap, apt)");
        return Ok(());
    }
    let image = Image::load(&image::main(&image::Options::default())?)?;
    let fleet = Fleet::attach(bin, data, api, cars_port);
    let work = data.join("qemu");
    let mut world = World::with_fleet(&image, fleet, &work)?;
    world.line = "ecu-os".into();
    println!(
        "  car {} provisioned (its certificate, root.json and agent.toml on the data partition); console: {}",
        suites::CAR,
        world.car.log.display()
    );

    step("power on: slot A boots, the agent connects and reports its slots");
    suites::boot(&mut world)?;

    step(
        "ecu-os@2.0.0: signed, fetched as chunks, installed into B by RAUC, real reboot, health gate, commit",
    );
    suites::update(&mut world)?;

    step(
        "ecu-os@4.0.0 (broken: its health check fails): boots, fails the gate, marked bad, back on B",
    );
    suites::health_failure(&mut world)?;
    world.car.power_cut();
    Ok(())
}
