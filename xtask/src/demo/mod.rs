//! The main job: a real twin, a real car agent, a desired-state change seen end to end. Every
//! step uses the same binaries and CLI commands a person would. The qemu car comes last
//! ([`qemu`]).

mod cli;
mod containers;
mod qemu;

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::Value;

use crate::sh::{cargo, root, run, step};
use crate::synthetic;
use cli::{CAR, COMPATIBLE, Cli, Daemon, free_port, release};

pub fn main() -> anyhow::Result<()> {
    step("building the twin, the agent and the cardeploy CLI");
    run(cargo().args([
        "build",
        "--locked",
        "-p",
        "cardeploy-twin",
        "-p",
        "cardeploy-agent",
        "-p",
        "cardeploy",
    ]))?;
    let bin = root().join("target/debug");
    let data = root().join("demo-data");
    if data.exists() {
        std::fs::remove_dir_all(&data)?;
    }
    let twin_data = data.join("twin");
    let cars_port = free_port()?;
    let api_port = free_port()?;
    let cli = Cli {
        bin: bin.join("cardeploy"),
        api: format!("http://127.0.0.1:{api_port}"),
        token_file: twin_data.join("operator.token"),
    };

    step("cardeploy pki init: the fleet CA and the twin's certificate");
    run(cli
        .cmd()
        .args(["pki", "init", "--dir"])
        .arg(twin_data.join("pki")))?;

    step("cardeploy-twin serve: cars on mutual TLS, operators on the REST API");
    let twin = Daemon::start(
        "cardeploy-twin",
        Command::new(bin.join("cardeploy-twin"))
            .args(["serve", "--data"])
            .arg(&twin_data)
            .args(["--cars-listen", &format!("127.0.0.1:{cars_port}")])
            .args(["--api-listen", &format!("127.0.0.1:{api_port}")])
            .args(["--heartbeat-secs", "2"]),
        &data.join("twin.log"),
    )?;
    let started = Instant::now();
    while !cli.token_file.exists() || std::net::TcpStream::connect(("127.0.0.1", api_port)).is_err()
    {
        if started.elapsed() > Duration::from_secs(20) {
            bail!("the twin did not start; see demo-data/twin.log");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "  twin up: cars on 127.0.0.1:{cars_port}, API on {}",
        cli.api
    );

    step(
        "signing keys and the root of trust: offline root and release keys, the twin's director key",
    );
    // The same bootstrap the tests and the qemu suites use: keys, director key, root v1 pushed.
    cardeploy_qemu_tests::fleet::Fleet::attach(&bin, &data, &cli.api, cars_port).init_root()?;

    step(&format!(
        "cardeploy car add {CAR}: issue its certificate, pin the root, register it with the twin"
    ));
    let car_dir = data.join("cars").join(CAR);
    run(cli
        .cmd()
        .args([
            "car",
            "add",
            CAR,
            "--attr",
            "model=tx7",
            "--attr",
            "region=eu",
            "--compatible",
            COMPATIBLE,
            "--pki",
        ])
        .arg(twin_data.join("pki"))
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

    step("cardeploy-agent: the car connects with its certificate");
    let start_agent = || {
        Daemon::start(
            "cardeploy-agent",
            Command::new(bin.join("cardeploy-agent"))
                .arg("--config")
                .arg(car_dir.join("agent.toml")),
            &data.join("agent.log"),
        )
    };
    let agent = start_agent()?;
    let took = cli.until("the car to connect", |v| {
        v["connected"] == true && v["reported"]["state"]["phase"] == "idle"
    })?;
    println!("  car connected and reported 'idle' after {took:?}");
    run(cli.cmd().args(["car", "list"]))?;

    step("a signed release: cardeploy release create, sign (offline release key), push");
    let k8s = data.join("k8s");
    std::fs::create_dir_all(&k8s)?;
    std::fs::write(
        k8s.join("infotainment.yaml"),
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: infotainment\n",
    )?;
    let app = release(
        &cli,
        &data,
        "infotainment",
        "1.0.0",
        &["--manifests", "k8s"],
    )?;
    run(cli
        .cmd()
        .args(["release", "inspect"])
        .arg(data.join("releases/infotainment-1.0.0/release.signed.json")))?;

    step("cardeploy car set-desired: the twin signs a desired state naming the release");
    let set = Instant::now();
    run(cli
        .cmd()
        .args(["car", "set-desired", CAR, "--release", &app]))?;
    cli.until("the car to verify and apply infotainment@1.0.0", |v| {
        v["reported"]["state"]["phase"] == "applied"
            && v["reported"]["state"]["release"] == "infotainment@1.0.0"
    })?;
    println!(
        "  the car verified root, release and desired state, fetched and recorded it: {:?} end to end (CLI polling included)",
        set.elapsed()
    );
    let state: Value = serde_json::from_slice(&std::fs::read(car_dir.join("state/state.json"))?)?;
    println!(
        "  car's persisted state: desired #{}, installed {}",
        state["last_counter"], state["installed"]
    );

    step("an OS image update as chunks: the car fetches only what its running slot lacks");
    let images = data.join("images");
    std::fs::create_dir_all(&images)?;
    let (v1, v2) = (images.join("rootfs-v1.img"), images.join("rootfs-v2.img"));
    let old = synthetic::image(24 << 20);
    let new = synthetic::security_update(&old);
    std::fs::write(&v1, &old)?;
    std::fs::write(&v2, &new)?;
    // The car's running slot holds v1: it is the agent's seed.
    let slot = car_dir.join("slot-a.img");
    std::fs::write(&slot, &old)?;
    drop(agent);
    let mut config = std::fs::read_to_string(car_dir.join("agent.toml"))?;
    config.push_str(&format!("seeds = [\"{}\"]\n", slot.display()));
    std::fs::write(car_dir.join("agent.toml"), config)?;
    let agent = start_agent()?;
    let os1 = release(
        &cli,
        &data,
        "os",
        "1.0.0",
        &["--os", "images/rootfs-v1.img"],
    )?;
    let os2 = release(
        &cli,
        &data,
        "os",
        "2.0.0",
        &["--os", "images/rootfs-v2.img"],
    )?;
    run(cli
        .cmd()
        .args(["car", "set-desired", CAR, "--release", &os1]))?;
    cli.until("the car to hold os@1.0.0", |v| {
        v["reported"]["state"]["phase"] == "applied"
            && v["reported"]["state"]["release"] == "os@1.0.0"
    })?;
    let set = Instant::now();
    run(cli
        .cmd()
        .args(["car", "set-desired", CAR, "--release", &os2]))?;
    cli.until("the car to hold os@2.0.0", |v| {
        v["reported"]["state"]["phase"] == "applied"
            && v["reported"]["state"]["release"] == "os@2.0.0"
    })?;
    let view = cli.show()?;
    let p = &view["progress"];
    let mib = |v: &Value| v.as_u64().unwrap_or(0) as f64 / 1048576.0;
    println!(
        "  os@2.0.0 ({:.1} MiB) assembled and verified in {:?}: {:.1} MiB reused from the running slot, \
         {:.2} MiB of changed chunks carried by {:.3} MiB on the wire (deltas against os@1.0.0)",
        mib(&p["planned_bytes"]),
        set.elapsed(),
        mib(&p["seed_bytes"]),
        mib(&p["fetch_bytes"]),
        mib(&p["wire_bytes"]),
    );

    step("anti-rollback: os@1.0.0 again, properly signed, is refused by the car");
    run(cli
        .cmd()
        .args(["car", "set-desired", CAR, "--release", &os1]))?;
    let started = Instant::now();
    loop {
        let out = cli.cmd().args(["car", "events", CAR]).output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(line) = text
            .lines()
            .find(|l| l.contains("refused") && l.contains("downgrade"))
        {
            println!("  {line}");
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the car did not refuse the downgrade; see demo-data/agent.log");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let view = cli.show()?;
    println!(
        "  the car still runs {}",
        view["reported"]["state"]["release"]
    );

    let agent = containers::main(&cli, &data, &car_dir, agent, start_agent)?;

    qemu::main(&data, &bin, &cli.api, cars_port)?;

    step("cardeploy car inspect: the twin asks the car over the same connection");
    run(cli.cmd().args(["car", "inspect", CAR]))?;

    step("cardeploy car events: the car's log on the twin");
    run(cli.cmd().args(["car", "events", CAR]))?;

    step("stopping (SIGTERM) the agent, then the twin");
    agent.stop()?;
    twin.stop()?;
    println!("\ndemo finished: logs and state are in {}", data.display());
    Ok(())
}
