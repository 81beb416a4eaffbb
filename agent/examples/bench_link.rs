//! `cargo xtask bench link`: the link's numbers, measured on this machine with real processes.
//!
//! - twin memory per idle connected car (RSS of the real twin process, 1,000 and 10,000 cars;
//!   the simulated cars run in this process, each with the agent's own link code);
//! - desired-state push latency to 1,000 connected cars (REST call → car receives), median/p99;
//! - dead-peer detection through a black-holing proxy (car side and twin side);
//! - twin memory kept per closed connection (cars that connect, say hello and go, thousands of
//!   times);
//! - agent idle RSS (x86_64, and aarch64 under qemu-user when given) and binary size.
//!
//! `--smoke` (part of `cargo xtask test`) runs the same with 20 cars and fails when a figure is
//! not sane: a push not delivered to every car, a dead peer not detected within seconds, closed
//! connections that are not freed, an agent that does not connect or exits, an RSS outside what a
//! running agent can have.
//!
//! Arguments: --twin BIN --agent BIN [--aarch64-agent BIN] [--cars 1000,10000] [--smoke]
//! [--out FILE]

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cardeploy_link::{Bytes, Requester};
use cardeploy_pki::{FleetPki, write_file};
use cardeploy_protocol::{self as protocol, DesiredState, Hello, ReportedState, route};
use cardeploy_testkit::procs::{TwinProcess, arg, http, rss_kib, start_twin};
use cardeploy_testkit::signing::{COMPATIBLE, Signer};
use cardeploy_testkit::{Fault, FaultProxy};
use futures::StreamExt;
use serde_json::json;

#[derive(Clone)]
struct Car {
    id: String,
    cert: PathBuf,
    key: PathBuf,
}

async fn link(pki: &Path, car: &Car, port: u16, heartbeat: Duration) -> Requester {
    link_from(None, pki, car, port, heartbeat).await
}

/// [`link`] from the local address `bind`.
async fn link_from(
    bind: Option<std::net::IpAddr>,
    pki: &Path,
    car: &Car,
    port: u16,
    heartbeat: Duration,
) -> Requester {
    let requester = cardeploy_testkit::car_link_from(
        bind,
        port,
        (&pki.join("ca.pem"), &car.cert, &car.key),
        &car.id,
        heartbeat,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let hello = Hello {
        agent_version: "bench".into(),
        reported: ReportedState::idle(),
    };
    requester
        .request_response(route::CAR_HELLO, Bytes::from(protocol::encode(&hello)))
        .await
        .unwrap();
    requester
}

fn car_view(twin: &TwinProcess, id: &str) -> serde_json::Value {
    let mut r = http()
        .get(&format!("{}/api/v1/cars/{id}", twin.api))
        .header("Authorization", &format!("Bearer {}", twin.token))
        .call()
        .unwrap();
    r.body_mut().read_json().unwrap()
}

/// Until the twin shows car `id` connected; `check` runs on every round (it panics when the
/// process that should connect has gone).
async fn wait_connected(twin: &TwinProcess, id: &str, within: Duration, mut check: impl FnMut()) {
    let started = Instant::now();
    while car_view(twin, id)["connected"] != true {
        check();
        assert!(
            started.elapsed() < within,
            "{id} did not connect in {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_disconnected(twin: &TwinProcess, id: &str) {
    let started = Instant::now();
    while car_view(twin, id)["connected"] == true {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the twin still shows {id} connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

#[tokio::main]
async fn main() {
    let twin_bin = PathBuf::from(arg("--twin").expect("--twin BIN"));
    let agent_bin = PathBuf::from(arg("--agent").expect("--agent BIN"));
    let aarch64 = arg("--aarch64-agent").map(PathBuf::from);
    let smoke = std::env::args().any(|a| a == "--smoke");
    let counts: Vec<usize> = arg("--cars")
        .unwrap_or_else(|| if smoke { "20" } else { "1000,10000" }.into())
        .split(',')
        .map(|n| n.parse().unwrap())
        .collect();
    let max = *counts.iter().max().unwrap();
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("twin");
    let pki_dir = data.join("pki");
    let pki = FleetPki::generate("bench fleet", &["localhost".into()]).unwrap();
    pki.write(&pki_dir).unwrap();
    let mut report = String::from("| measure | value | target |\n|---|---|---|\n");

    // Issue and register every car up front, so RSS deltas count connections, not records.
    eprintln!("issuing {max} car certificates");
    let ca = Arc::new(pki.ca);
    let cars_dir = work.path().join("cars");
    std::fs::create_dir_all(&cars_dir).unwrap();
    let mut cars = Vec::with_capacity(max);
    let mut pems = Vec::with_capacity(max);
    for i in 0..max {
        let id = format!("BENCH{i:05}");
        let issued = ca.issue_car(&id).unwrap();
        let cert = cars_dir.join(format!("{id}.pem"));
        let key = cars_dir.join(format!("{id}.key"));
        write_file(&cert, &issued.cert_pem, false).unwrap();
        write_file(&key, &issued.key_pem, true).unwrap();
        pems.push(issued.cert_pem);
        cars.push(Car { id, cert, key });
    }
    let twin = start_twin(&twin_bin, &data, 30);
    // One root for the whole run: the twin registers releases under it and the agent whose idle
    // RSS is measured pins it (an agent without a root refuses to start). It lives in the
    // signer's temporary directory, so the signer lives as long as `main`.
    let signer = Arc::new(Signer::for_twin(&data));
    {
        let (signer, api, token) = (signer.clone(), twin.api.clone(), twin.token.clone());
        tokio::task::spawn_blocking(move || signer.push_root_to(&api, &token))
            .await
            .unwrap();
    }
    eprintln!("registering {max} cars");
    {
        let api = twin.api.clone();
        let token = twin.token.clone();
        let ids: Vec<String> = cars.iter().map(|c| c.id.clone()).collect();
        tokio::task::spawn_blocking(move || {
            let agent = http();
            for (id, pem) in ids.iter().zip(pems) {
                let r = agent
                    .post(&format!("{api}/api/v1/cars"))
                    .header("Authorization", &format!("Bearer {token}"))
                    .send_json(json!({"id": id, "certificate_pem": pem}))
                    .unwrap();
                assert_eq!(r.status().as_u16(), 201);
            }
        })
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = rss_kib(twin.child.id());
    eprintln!("twin RSS with {max} registered, none connected: {base} KiB");

    let arrivals: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut links: Vec<Requester> = Vec::new();
    let heartbeat = Duration::from_secs(30);
    let mut connected = 0;
    for &count in &counts {
        eprintln!("connecting cars {connected}..{count}");
        let started = Instant::now();
        let mut joins = Vec::new();
        for (n, car) in cars.iter().enumerate().take(count).skip(connected) {
            // Beyond ~28,000 connections one source address runs out of ports.
            let source = cardeploy_testkit::loopback_source(n);
            let pki_dir = pki_dir.clone();
            let car = Car {
                id: car.id.clone(),
                cert: car.cert.clone(),
                key: car.key.clone(),
            };
            let port = twin.cars_port;
            let arrivals = arrivals.clone();
            joins.push(tokio::spawn(async move {
                let requester = link_from(Some(source), &pki_dir, &car, port, heartbeat).await;
                let mut stream =
                    requester.request_stream(route::CAR_DESIRED, Bytes::from_static(b"{}"));
                let id = car.id.clone();
                tokio::spawn(async move {
                    while let Some(Ok(bytes)) = stream.next().await {
                        // Every message on the stream is a signed desired state.
                        let _: DesiredState = protocol::decode("desired", &bytes).unwrap();
                        arrivals.lock().unwrap().insert(id.clone(), Instant::now());
                    }
                });
                requester
            }));
            // Bounded concurrency of handshakes.
            if joins.len() >= 64 {
                for j in joins.drain(..) {
                    links.push(j.await.unwrap());
                }
            }
        }
        for j in joins {
            links.push(j.await.unwrap());
        }
        connected = count;
        eprintln!("  {count} connected in {:?}", started.elapsed());
        tokio::time::sleep(Duration::from_secs(3)).await;
        let rss = rss_kib(twin.child.id());
        let per_car = (rss.saturating_sub(base)) as f64 / count as f64;
        report += &format!(
            "| twin memory per idle connected car, {count} cars | {per_car:.1} KiB (RSS {} MiB) | ≤ 64 KiB |\n",
            rss / 1024
        );

        if count == counts[0] {
            eprintln!("pushing a desired state to {count} cars");
            let api = twin.api.clone();
            let token = twin.token.clone();
            let ids: Vec<String> = cars[..count].iter().map(|c| c.id.clone()).collect();
            let signer = signer.clone();
            let sent: Vec<(String, Instant)> = tokio::task::spawn_blocking(move || {
                // One signed release; the twin signs a desired state per car naming it.
                let release =
                    signer.publish_to(&api, &token, &signer.manifest("bench", "1.0.0", vec![]));
                let agent = http();
                let mut sent = Vec::new();
                for id in ids {
                    let t0 = Instant::now();
                    let r = agent
                        .put(&format!("{api}/api/v1/cars/{id}/desired"))
                        .header("Authorization", &format!("Bearer {token}"))
                        .send_json(json!({ "release": release }))
                        .unwrap();
                    assert_eq!(r.status().as_u16(), 200);
                    sent.push((id, t0));
                }
                sent
            })
            .await
            .unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            while arrivals.lock().unwrap().len() < count && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let arrived = arrivals.lock().unwrap().clone();
            let mut latencies: Vec<Duration> = sent
                .iter()
                .filter_map(|(id, t0)| arrived.get(id).map(|t1| t1.duration_since(*t0)))
                .collect();
            latencies.sort();
            report += &format!(
                "| desired-state push, {count} cars (REST call → car), delivered | {}/{count} | all |\n",
                latencies.len()
            );
            assert_eq!(
                latencies.len(),
                count,
                "a desired state reached {} of {count} connected cars in 30 s",
                latencies.len()
            );
            report += &format!(
                "| push latency median / p99 | {:.1} ms / {:.1} ms | p99 ≤ 1 s |\n",
                percentile(&latencies, 0.5).as_secs_f64() * 1e3,
                percentile(&latencies, 0.99).as_secs_f64() * 1e3
            );
        }
    }
    drop(links);
    drop(twin);

    // Dead peer: a twin with a 1 s heartbeat, one car behind a black-holing proxy.
    eprintln!("dead-peer detection");
    let twin = start_twin(&twin_bin, &data, 1);
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", twin.cars_port).parse().unwrap()).await;
    let car = &cars[0];
    let requester = link(&pki_dir, car, proxy.addr.port(), Duration::from_secs(1)).await;
    let blackholed = Instant::now();
    proxy.set(Fault::Blackhole);
    tokio::time::timeout(Duration::from_secs(30), requester.closed())
        .await
        .expect("the car never noticed its black-holed twin (heartbeat 1 s) in 30 s");
    let car_side = blackholed.elapsed();
    let twin_side = {
        let api = twin.api.clone();
        let token = twin.token.clone();
        let id = car.id.clone();
        tokio::task::spawn_blocking(move || {
            let agent = http();
            loop {
                let mut r = agent
                    .get(&format!("{api}/api/v1/cars/{id}"))
                    .header("Authorization", &format!("Bearer {token}"))
                    .call()
                    .unwrap();
                let v: serde_json::Value = r.body_mut().read_json().unwrap();
                if v["connected"] == false {
                    return blackholed.elapsed();
                }
                assert!(blackholed.elapsed() < Duration::from_secs(30));
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .await
        .unwrap()
    };
    report += &format!(
        "| dead peer detected (heartbeat 1 s): car side / twin side | {:.2} s / {:.2} s | ≤ 3 intervals (3 s) |\n",
        car_side.as_secs_f64(),
        twin_side.as_secs_f64()
    );

    // Closed connections: cars connect, say hello and go, again and again (every OS update
    // reboots the car; cars are switched off and on). The twin should hold nothing of a
    // connection once it is closed (rsocket_rust 0.7.5 kept every socket, ~12 KiB each, until
    // the link got its own engine). Two rounds: the first grows the allocator's pools to what
    // this churn needs, the second shows what stays per connection.
    let reconnects = if smoke { 400 } else { 5_000 };
    // Not the first car: the agent below connects as it.
    let movers: Vec<Car> = cars.iter().skip(1).take(20).cloned().collect();
    let per_car = reconnects / movers.len();
    let closed = per_car * movers.len();
    let churn = |movers: Vec<Car>| {
        let (pki_dir, port) = (pki_dir.clone(), twin.cars_port);
        async move {
            let mut joins = Vec::new();
            for car in movers {
                let pki_dir = pki_dir.clone();
                joins.push(tokio::spawn(async move {
                    for _ in 0..per_car {
                        let requester = link(&pki_dir, &car, port, Duration::from_secs(30)).await;
                        // The last requester of a car's connection ends it.
                        drop(requester);
                    }
                }));
            }
            for j in joins {
                j.await.unwrap();
            }
        }
    };
    churn(movers.clone()).await;
    let twin_pid = twin.child.id();
    let settled = || async move {
        // Let the twin see the last ones go.
        tokio::time::sleep(Duration::from_secs(2)).await;
        rss_kib(twin_pid)
    };
    let before = settled().await;
    let started = Instant::now();
    churn(movers).await;
    let elapsed = started.elapsed();
    let after = settled().await;
    let kept = after.saturating_sub(before) as f64 / closed as f64;
    report += &format!(
        "| twin memory kept per closed connection ({closed} connect, hello, close in {:.1} s, after as many to warm up) | {kept:.2} KiB | 0 |\n",
        elapsed.as_secs_f64()
    );

    // Agent idle RSS: a real agent, configured like a car (its certificate, the pinned root),
    // measured once it is connected and has nothing to do.
    let agent_toml = work.path().join("agent.toml");
    std::fs::write(
        &agent_toml,
        format!(
            "car_id = \"{}\"\ntwin = \"localhost:{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nstate_dir = \"{}\"\n\
             heartbeat_secs = 10\nroot = \"{}\"\ncompatible = \"{COMPATIBLE}\"\n",
            car.id,
            twin.cars_port,
            pki_dir.join("ca.pem").display(),
            car.cert.display(),
            car.key.display(),
            work.path().join("state").display(),
            signer.root_path().display(),
        ),
    )
    .unwrap();
    let mut runs: Vec<(&str, Command)> = vec![("x86_64", Command::new(&agent_bin))];
    if let Some(bin) = &aarch64 {
        runs.push((
            "aarch64 (qemu-user, RSS includes the emulator)",
            cardeploy_testkit::cross::aarch64_runner(bin),
        ));
    }
    for (label, mut cmd) in runs {
        let log = work.path().join("agent.log");
        let mut child = cmd
            .arg("--config")
            .arg(&agent_toml)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let alive = |child: &mut std::process::Child| {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "the {label} agent exited ({status}) instead of running:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        wait_connected(&twin, &car.id, Duration::from_secs(60), || {
            alive(&mut child)
        })
        .await;
        // Idle: connected, hello answered, nothing to fetch; let start-up allocations settle.
        tokio::time::sleep(Duration::from_secs(if smoke { 1 } else { 8 })).await;
        alive(&mut child);
        let rss = rss_kib(child.id());
        let _ = child.kill();
        let _ = child.wait();
        if smoke {
            // A running Rust agent with tokio and rustls cannot be below 1 MiB; an unoptimised
            // one far over 64 MiB would mean a leak, not a debug build.
            assert!(
                (1024..64 * 1024).contains(&rss),
                "the {label} agent's idle RSS is {rss} KiB"
            );
        }
        report += &format!(
            "| agent idle RSS, {label} | {:.1} MiB | ≤ 10 MiB |\n",
            rss as f64 / 1024.0
        );
        // The next run connects as the same car: wait until the twin has seen this one go.
        wait_disconnected(&twin, &car.id).await;
    }
    if let Some(bin) = &aarch64 {
        let size = std::fs::metadata(bin).unwrap().len();
        report += &format!(
            "| aarch64 agent binary (release, stripped) | {:.2} MiB | ≤ 6 MiB |\n",
            size as f64 / (1024.0 * 1024.0)
        );
    }
    drop(twin);
    println!("{report}");
    if smoke {
        assert!(
            car_side < Duration::from_secs(10) && twin_side < Duration::from_secs(10),
            "dead peer detected after {car_side:?} (car) / {twin_side:?} (twin) with a 1 s heartbeat"
        );
        // A connection's state is ~10 KiB (buffers, TLS, streams): a leak keeps whole ones, the
        // allocator's noise over a few hundred connections stays well under a page each.
        assert!(
            kept < 4.0,
            "the twin kept {kept:.1} KiB per closed connection: connections are not freed"
        );
        println!("bench link --smoke: figures are sane");
    }
    if let Some(out) = arg("--out") {
        std::fs::write(out, &report).unwrap();
    }
}
