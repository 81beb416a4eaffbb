//! The demo's OS part: a real `rauc service` with two file-backed slots on a private D-Bus
//! (crates/testkit's RaucSystem), real bundles, and the agent driving install, reboot, health
//! gate, commit — and an automatic rollback of a release whose health check fails. The reboot is
//! simulated here (the agent is killed, RAUC restarts with the slot a bootloader would start, the
//! boot id changes); the qemu system tests boot a real image instead.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cardeploy_testkit::rauc::{RaucSystem, Signer, unavailable};
use serde_json::Value;

use crate::demo::{COMPATIBLE, Cli, Daemon, release, step};

/// The second demo car: this one runs RAUC.
const ECU: &str = "DEMO-CAR-2";
use crate::run;

/// The demo's stand-in for a bootloader: the primary slot unless it is marked bad (RAUC's
/// boot-counting bootloaders skip bad slots), then the other one.
fn next_boot(rauc: &RaucSystem) -> String {
    let (primary, states) = rauc.bootloader_state();
    let primary = primary.unwrap_or_else(|| "A".into());
    if states.get(&primary).map(String::as_str) == Some("bad") {
        if primary == "A" { "B" } else { "A" }.to_owned()
    } else {
        primary
    }
}

struct Car<'a> {
    dir: &'a Path,
    config: &'a Path,
    log: &'a Path,
    bin: &'a Path,
    rauc: RaucSystem,
    agent: Option<Daemon>,
    boot: u32,
}

impl Car<'_> {
    fn start_agent(&mut self) -> anyhow::Result<()> {
        self.agent = Some(Daemon::start(
            "cardeploy-agent",
            std::process::Command::new(self.bin.join("cardeploy-agent"))
                .arg("--config")
                .arg(self.config),
            self.log,
        )?);
        Ok(())
    }

    fn reboots(&self) -> usize {
        std::fs::read_to_string(self.dir.join("reboots"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// Power cut and boot: SIGKILL the agent, start RAUC booted from what the bootloader picks.
    fn reboot(&mut self) -> anyhow::Result<String> {
        drop(self.agent.take());
        let slot = next_boot(&self.rauc);
        self.rauc.restart(&slot)?;
        self.boot += 1;
        std::fs::write(
            self.dir.join("boot_id"),
            format!("demo-boot-{}\n", self.boot),
        )?;
        std::fs::write(self.dir.join("booted"), &slot)?;
        self.start_agent()?;
        Ok(slot)
    }
}

/// Follow the car on the twin until `done` holds, printing each new phase and install progress.
fn follow(cli: &Cli, car: &Car, done: impl Fn(&Value, usize) -> bool) -> anyhow::Result<Value> {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        if let Ok(view) = cli.show_car(ECU) {
            let state = &view["reported"]["state"];
            let line = format!(
                "{} {}{}",
                state["phase"].as_str().unwrap_or("?"),
                state["release"].as_str().unwrap_or("-"),
                if state["phase"] == "installing" {
                    format!(
                        " (RAUC {}%: {})",
                        view["install"]["percentage"],
                        view["install"]["message"].as_str().unwrap_or("")
                    )
                } else {
                    String::new()
                }
            );
            if line != last {
                println!("  [{:>5.1} s] {line}", started.elapsed().as_secs_f64());
                last = line;
            }
            if done(&view, car.reboots()) {
                return Ok(view);
            }
        }
        if started.elapsed() > Duration::from_secs(90) {
            bail!("the OS update did not progress; see demo-data/agent.log and demo-data/rauc/");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn slots(view: &Value) -> String {
    let os = &view["reported"]["state"]["os"];
    let slots: Vec<String> = os["slots"]
        .as_array()
        .map(|v| {
            v.iter()
                .map(|s| {
                    format!(
                        "{} ({}): {}, {}, bundle {}",
                        s["bootname"].as_str().unwrap_or("?"),
                        s["name"].as_str().unwrap_or("?"),
                        s["state"].as_str().unwrap_or("?"),
                        s["boot_status"].as_str().unwrap_or("?"),
                        s["bundle_version"].as_str().unwrap_or("-"),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    format!("booted {} | {}", os["booted"], slots.join(" | "))
}

/// Runs the OS part with a second car, registered here; `pki` is the twin's PKI directory.
pub fn main(cli: &Cli, data: &Path, bin: &Path, pki: &Path, cars_port: u16) -> anyhow::Result<()> {
    step(
        "OS updates through RAUC: file-backed A/B slots, a real `rauc service` on a private D-Bus",
    );
    if let Some(why) = unavailable() {
        println!("  SKIPPED: this part needs {why}");
        return Ok(());
    }
    let car_dir = data.join("cars").join(ECU);
    run(cli
        .cmd()
        .args([
            "car",
            "add",
            ECU,
            "--attr",
            "model=tx7",
            "--compatible",
            COMPATIBLE,
            "--pki",
        ])
        .arg(pki)
        .arg("--root")
        .arg(data.join("root.json"))
        .arg("--out")
        .arg(&car_dir)
        .args([
            "--twin",
            &format!("localhost:{cars_port}"),
            "--heartbeat-secs",
            "2",
        ]))?;
    let dir = data.join("rauc-car");
    std::fs::create_dir_all(&dir)?;
    let rauc = RaucSystem::start(COMPATIBLE, "A").context("starting RAUC")?;
    std::fs::write(dir.join("boot_id"), "demo-boot-1\n")?;
    std::fs::write(dir.join("booted"), "A")?;
    // The health check looks into the slot the car booted: a release whose /etc/health does not
    // say "ok" is broken.
    let health = dir.join("health-check.sh");
    std::fs::write(
        &health,
        format!(
            "#!/bin/sh\ncase \"$(cat {booted})\" in A) img={a} ;; *) img={b} ;; esac\n\
             debugfs -R 'cat /etc/health' \"$img\" 2>/dev/null | grep -qx ok || {{ echo \"/etc/health of the booted slot is not ok\" >&2; exit 1; }}\n",
            booted = dir.join("booted").display(),
            a = rauc.slot_path("A").display(),
            b = rauc.slot_path("B").display(),
        ),
    )?;
    let config = car_dir.join("agent.toml");
    let mut text = std::fs::read_to_string(&config)?;
    text.push_str(&format!(
        "\n[os]\nrauc_bus = \"{bus}\"\nboot_id_file = \"{d}/boot_id\"\n\
         reboot_command = [\"sh\", \"-c\", \"echo reboot >> {d}/reboots\"]\n\
         [os.health]\ndeadline_secs = 8\ninterval_secs = 1\ntwin_grace_secs = 4\n\
         command = [\"sh\", \"{health}\"]\n",
        bus = rauc.bus_address(),
        d = dir.display(),
        health = health.display(),
    ));
    std::fs::write(&config, text)?;
    println!(
        "  {ECU}: RAUC ({}) booted from A, slots are files in {}; its agent.toml has [os]",
        COMPATIBLE,
        rauc.dir().display()
    );
    let log = data.join("agent-os.log");
    let mut car = Car {
        dir: &dir,
        config: &config,
        log: &log,
        bin,
        rauc,
        agent: None,
        boot: 1,
    };
    car.start_agent()?;

    let bundles = data.join("bundles");
    std::fs::create_dir_all(&bundles)?;
    for (version, health) in [("3.0.0", "ok"), ("4.0.0", "broken")] {
        let content = format!("cardeploy demo OS {version}\n");
        car.rauc.bundle(
            &bundles.join(format!("os-{version}.raucb")),
            COMPATIBLE,
            version,
            &[
                ("etc/os-version", content.as_bytes()),
                ("etc/health", format!("{health}\n").as_bytes()),
            ],
            Signer::Trusted,
        )?;
    }
    println!("  rauc bundle: os-3.0.0.raucb (healthy) and os-4.0.0.raucb (its health check fails)");

    step(
        "os@3.0.0 on car 2: fetched, verified, installed into slot B by RAUC, reboot, health gate, commit",
    );
    let v3 = release(
        cli,
        data,
        "os",
        "3.0.0",
        &["--os", "bundles/os-3.0.0.raucb"],
    )?;
    let set = Instant::now();
    run(cli
        .cmd()
        .args(["car", "set-desired", ECU, "--release", &v3]))?;
    follow(cli, &car, |_, reboots| reboots >= 1)?;
    let slot = car.reboot()?;
    println!("  -- simulated reboot: the bootloader starts slot {slot} --");
    let view = follow(cli, &car, |v, _| {
        v["reported"]["state"]["phase"] == "committed"
    })?;
    println!(
        "  os@3.0.0 committed {:?} after set-desired; {}",
        set.elapsed(),
        slots(&view)
    );

    step(
        "os@4.0.0 (broken): installed into slot A, boots, fails its health gate, rolled back automatically",
    );
    let v4 = release(
        cli,
        data,
        "os",
        "4.0.0",
        &["--os", "bundles/os-4.0.0.raucb"],
    )?;
    let set = Instant::now();
    run(cli
        .cmd()
        .args(["car", "set-desired", ECU, "--release", &v4]))?;
    follow(cli, &car, |_, reboots| reboots >= 2)?;
    let slot = car.reboot()?;
    println!("  -- simulated reboot: the bootloader starts slot {slot} --");
    follow(cli, &car, |_, reboots| reboots >= 3)?;
    let slot = car.reboot()?;
    println!("  -- simulated reboot: slot A is marked bad, the bootloader starts slot {slot} --");
    let view = follow(cli, &car, |v, _| {
        v["reported"]["state"]["phase"] == "rolled-back"
    })?;
    println!(
        "  {:?} after set-desired: {}",
        set.elapsed(),
        view["reported"]["state"]["last_error"]
            .as_str()
            .unwrap_or("?")
    );
    println!("  {}", slots(&view));
    run(cli.cmd().args(["car", "events", ECU]))?;
    if let Some(agent) = car.agent.take() {
        agent.stop()?;
    }
    Ok(())
}
