//! `cargo xtask bench delta`, the cardeploy side: one input pair (OLD, NEW) through the real
//! twin binary and the real agent binary over loopback, measured from outside.
//!
//! 1. `cardeploy artifact push` OLD and NEW to a fresh twin (zstd -19 chunks; the push of NEW is
//!    the pipeline's encode time).
//! 2. Car 1 holds OLD as its seed (the running slot or the old layer) and is told to run OLD
//!    (nothing travels), then — after an agent restart, so peak RSS counts only the update — NEW.
//!    Bytes on the wire are counted by a proxy in front of the twin (TLS, RSocket, index, frames:
//!    everything); time runs from the REST call to the car reporting `applied`. Registering NEW
//!    while car 1 runs OLD makes the twin make NEW's deltas against OLD ahead of the cars; the
//!    desired state is set once they are made (`ahead_secs`), so the first car's bytes do not
//!    depend on how far that work got (docs/delta.md).
//! 3. Car 2 does the same; the twin serves its cached deltas.
//! 4. Car 3 has no seed and fetches NEW whole; its artifact throughput is compared with a raw
//!    TCP copy of NEW over loopback in the same run (read file → socket → file → fsync).
//!
//! Arguments: --twin BIN --agent BIN --cli BIN --old FILE --new FILE --work DIR --out FILE.json

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cardeploy_pki::{FleetPki, write_file};
use cardeploy_release::ArtifactKind;
use cardeploy_testkit::FaultProxy;
use cardeploy_testkit::procs::{self, TwinProcess, arg, peak_rss_kib, start_twin};
use cardeploy_testkit::signing::{COMPATIBLE, Signer, artifact_from_view};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Bench {
    work: PathBuf,
    twin: TwinProcess,
    signer: Signer,
    ca: cardeploy_pki::FleetCa,
    agent_bin: PathBuf,
}

fn api(bench: &Bench, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    procs::api(&bench.twin, method, path, body)
}

fn push(bench: &Bench, cli: &Path, file: &Path) -> (String, f64) {
    let started = Instant::now();
    let out = Command::new(cli)
        .args(["artifact", "push", "--level", "19"])
        .arg(file)
        .args(["--api", &bench.twin.api, "--token", &bench.twin.token])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "push of {} failed", file.display());
    (
        String::from_utf8(out.stdout).unwrap().trim().to_owned(),
        started.elapsed().as_secs_f64(),
    )
}

struct Car {
    id: String,
    config: PathBuf,
}

fn car(bench: &Bench, id: &str, twin_port: u16, seed: Option<&Path>) -> Car {
    let dir = bench.work.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let issued = bench.ca.issue_car(id).unwrap();
    let (cert, key) = (dir.join("car.pem"), dir.join("car.key"));
    write_file(&cert, &issued.cert_pem, false).unwrap();
    write_file(&key, &issued.key_pem, true).unwrap();
    let (status, body) = api(
        bench,
        "POST",
        "/api/v1/cars",
        Some(json!({"id": id, "certificate_pem": issued.cert_pem})),
    );
    assert_eq!(status, 201, "{body}");
    let seeds = seed.map_or(String::new(), |s| {
        format!("seeds = [\"{}\"]\n", s.display())
    });
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "car_id = \"{id}\"\ntwin = \"localhost:{twin_port}\"\nca = \"{}\"\ncert = \"car.pem\"\nkey = \"car.key\"\n\
             state_dir = \"state\"\nheartbeat_secs = 10\nroot = \"{}\"\ncompatible = \"{COMPATIBLE}\"\n{seeds}",
            bench.work.join("twin/pki/ca.pem").display(),
            bench.signer.root_path().display()
        ),
    )
    .unwrap();
    Car {
        id: id.to_owned(),
        config,
    }
}

fn start_agent(bench: &Bench, car: &Car) -> Child {
    Command::new(&bench.agent_bin)
        .arg("--config")
        .arg(&car.config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// Tell the car to run `release` (one artifact, `rootfs`) and wait until it has it; returns
/// the seconds from the desired state to `applied`, and those the deltas made ahead took first.
fn run(bench: &Bench, car: &Car, release: &str, index: &str) -> (f64, f64) {
    // A signed release with the one artifact (registered once; the same digest again is a no-op).
    let (status, view) = api(bench, "GET", &format!("/api/v1/indexes/{index}"), None);
    assert_eq!(status, 200, "{view}");
    let artifact = artifact_from_view(ArtifactKind::RaucBundle, "rootfs", index, &view);
    let (line, major) = release.split_once('@').unwrap();
    let mut manifest = bench
        .signer
        .manifest(line, &format!("{major}.0.0"), vec![artifact]);
    manifest.created = 0;
    let digest = bench
        .signer
        .publish_to(&bench.twin.api, &bench.twin.token, &manifest);
    let label = format!("{line}@{major}.0.0");
    let ahead = procs::wait_ahead(&bench.twin, Duration::from_secs(3600));
    let started = Instant::now();
    let (status, body) = api(
        bench,
        "PUT",
        &format!("/api/v1/cars/{}/desired", car.id),
        Some(json!({ "release": digest })),
    );
    assert_eq!(status, 200, "{body}");
    loop {
        let (_, view) = api(bench, "GET", &format!("/api/v1/cars/{}", car.id), None);
        let state = &view["reported"]["state"];
        if state["phase"] == "applied" && state["release"] == label.as_str() {
            return (started.elapsed().as_secs_f64(), ahead);
        }
        assert!(state["phase"] != "failed", "fetch failed: {view}");
        assert!(
            started.elapsed() < Duration::from_secs(3600),
            "no result in an hour: {view}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_connected(bench: &Bench, car: &Car) {
    let started = Instant::now();
    loop {
        let (_, view) = api(bench, "GET", &format!("/api/v1/cars/{}", car.id), None);
        if view["connected"] == true {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "car did not connect"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A measured update: the car runs OLD from its seed, restarts, then fetches NEW.
fn update(bench: &Bench, proxy: &FaultProxy, id: &str, old: &Path, v1: &str, v2: &str) -> Value {
    let car = car(bench, id, proxy.addr.port(), Some(old));
    let agent = start_agent(bench, &car);
    run(bench, &car, "bench@1", v1);
    stop(agent);
    let agent = start_agent(bench, &car);
    wait_connected(bench, &car);
    let before = proxy.bytes_down.load(Ordering::Relaxed) + proxy.bytes_up.load(Ordering::Relaxed);
    let (secs, ahead_secs) = run(bench, &car, "bench@2", v2);
    let wire =
        proxy.bytes_down.load(Ordering::Relaxed) + proxy.bytes_up.load(Ordering::Relaxed) - before;
    let peak = peak_rss_kib(agent.id());
    stop(agent);
    json!({"wire_bytes": wire, "secs": secs, "peak_rss_kib": peak, "ahead_secs": ahead_secs})
}

/// Raw TCP copy of `file` over loopback into `out`, synced: the yardstick for goodput.
async fn raw_tcp_copy(file: &Path, out: &Path) -> f64 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let file = file.to_owned();
    let sender = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut f = tokio::fs::File::open(file).await.unwrap();
        tokio::io::copy(&mut f, &mut socket).await.unwrap();
        socket.shutdown().await.unwrap();
    });
    let started = Instant::now();
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut f = tokio::fs::File::create(out).await.unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = socket.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        f.write_all(&buf[..n]).await.unwrap();
    }
    f.sync_all().await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    sender.await.unwrap();
    let _ = std::fs::remove_file(out);
    secs
}

#[tokio::main]
async fn main() {
    let twin_bin = PathBuf::from(arg("--twin").expect("--twin BIN"));
    let agent_bin = PathBuf::from(arg("--agent").expect("--agent BIN"));
    let cli = PathBuf::from(arg("--cli").expect("--cli BIN"));
    let old = PathBuf::from(arg("--old").expect("--old FILE"));
    let new = PathBuf::from(arg("--new").expect("--new FILE"));
    let work = PathBuf::from(arg("--work").expect("--work DIR"));
    let out = PathBuf::from(arg("--out").expect("--out FILE"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let pki = FleetPki::generate("bench fleet", &["localhost".into()]).unwrap();
    pki.write(&work.join("twin/pki")).unwrap();
    let twin = start_twin(&twin_bin, &work.join("twin"), 10);
    let signer = Signer::for_twin(&work.join("twin"));
    signer.push_root_to(&twin.api, &twin.token);
    let bench = Bench {
        work: work.clone(),
        signer,
        twin,
        ca: pki.ca,
        agent_bin,
    };
    let proxy = FaultProxy::start(
        format!("127.0.0.1:{}", bench.twin.cars_port)
            .parse()
            .unwrap(),
    )
    .await;

    let result = tokio::task::spawn_blocking(move || {
        eprintln!("pushing OLD and NEW");
        let (v1, push_old) = push(&bench, &cli, &old);
        let (v2, push_new) = push(&bench, &cli, &new);
        eprintln!("car 1: update with deltas made ahead");
        let first = update(&bench, &proxy, "CAR1", &old, &v1, &v2);
        eprintln!("car 2: update with cached deltas");
        let cached = update(&bench, &proxy, "CAR2", &old, &v1, &v2);
        eprintln!("car 3: NEW without seed");
        let car3 = car(&bench, "CAR3", proxy.addr.port(), None);
        let agent = start_agent(&bench, &car3);
        wait_connected(&bench, &car3);
        let before =
            proxy.bytes_down.load(Ordering::Relaxed) + proxy.bytes_up.load(Ordering::Relaxed);
        let (full_secs, _) = run(&bench, &car3, "bench@2", &v2);
        let full_wire = proxy.bytes_down.load(Ordering::Relaxed)
            + proxy.bytes_up.load(Ordering::Relaxed)
            - before;
        let full_peak = peak_rss_kib(agent.id());
        stop(agent);
        json!({
            "push_old_secs": push_old, "push_new_secs": push_new,
            "first": first, "cached": cached,
            "full": {"wire_bytes": full_wire, "secs": full_secs, "peak_rss_kib": full_peak},
            "size": std::fs::metadata(&new).unwrap().len(),
        })
    })
    .await
    .unwrap();
    let new = PathBuf::from(arg("--new").unwrap());
    let raw = raw_tcp_copy(&new, &work.join("raw-copy")).await;
    let mut result = result;
    result["raw_tcp_secs"] = json!(raw);
    let text = serde_json::to_string_pretty(&result).unwrap();
    println!("{text}");
    std::fs::write(out, text).unwrap();
}
