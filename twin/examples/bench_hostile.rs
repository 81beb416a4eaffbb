//! `cargo xtask bench hostile`: what one hostile car costs the twin, measured on the real twin
//! process with the testkit's hostile car (raw RSocket, its own certificate) and honest cars on
//! the agent's own link code.
//!
//! - twin RSS before and while one car holds 1,000 `artifact.chunks` requests it never reads
//!   (target: at most 32 MiB more);
//! - desired-state push to 1,000 honest cars, median and p99, quiet and during that attack
//!   (target: p99 under attack at most twice the quiet one);
//! - twin CPU for requests naming a base the car does not own, against the same number of
//!   heartbeats, and the delta cache afterwards (target: no delta work, an empty cache);
//! - revocation (`DELETE /api/v1/cars/{id}`) to the car's session closed (target: under 1 s).
//!
//! `--smoke` runs the same with 50 cars and 200 requests and fails when a bound that does not
//! depend on timing is broken (memory, delta work, revocation within a second); `cargo xtask
//! test` runs it so the bench cannot rot.
//!
//! Arguments: --twin BIN [--cars N] [--requests N] [--smoke] [--out FILE]

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cardeploy_chunks::{ChunkIndex, Params, chunk_bytes};
use cardeploy_link::{Bytes, Requester};
use cardeploy_protocol::{self as protocol, ChunksRequest, Hello, ReportedState, route};
use cardeploy_release::ArtifactKind;
use cardeploy_testkit::hostile::HostileCar;
use cardeploy_testkit::procs::{arg, cpu_time, http, rss_kib, start_twin_configured};
use cardeploy_testkit::signing::{Signer, artifact};
use cardeploy_testkit::{CarFiles, TestPki, noise};
use futures::StreamExt;
use serde_json::json;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// The operator API of the twin process, blocking (run it on the blocking pool).
#[derive(Clone)]
struct Api {
    url: String,
    token: String,
}

impl Api {
    fn send(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> u16 {
        let agent = http();
        let url = format!("{}{path}", self.url);
        let auth = format!("Bearer {}", self.token);
        let response = match (method, body) {
            ("PUT", Some(b)) => agent.put(&url).header("Authorization", &auth).send_json(b),
            ("POST", Some(b)) => agent.post(&url).header("Authorization", &auth).send_json(b),
            ("DELETE", None) => agent.delete(&url).header("Authorization", &auth).call(),
            (method, _) => panic!("unsupported {method}"),
        };
        response.unwrap().status().as_u16()
    }

    fn put_bytes(&self, path: &str, body: &[u8]) -> u16 {
        http()
            .put(&format!("{}{path}", self.url))
            .header("Authorization", &format!("Bearer {}", self.token))
            .send(body)
            .unwrap()
            .status()
            .as_u16()
    }

    fn upload(&self, bytes: &[u8]) -> ChunkIndex {
        let index = chunk_bytes(bytes, Params::DEFAULT);
        let offsets = index.offsets();
        for (i, c) in index.chunks.iter().enumerate() {
            let raw = &bytes[offsets[i] as usize..offsets[i + 1] as usize];
            let z = zstd::bulk::compress(raw, 1).unwrap();
            assert_eq!(self.put_bytes(&format!("/api/v1/chunks/{}", c.id), &z), 201);
        }
        assert_eq!(
            self.put_bytes(&format!("/api/v1/indexes/{}", index.id()), &index.encode()),
            201
        );
        index
    }

    fn register(&self, id: &str, pem: &str) {
        let body = json!({"id": id, "certificate_pem": pem});
        assert_eq!(self.send("POST", "/api/v1/cars", Some(body)), 201);
    }

    fn desire(&self, car: &str, release: &str) -> Instant {
        let t0 = Instant::now();
        let body = json!({ "release": release });
        let status = self.send("PUT", &format!("/api/v1/cars/{car}/desired"), Some(body));
        assert_eq!(status, 200);
        t0
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

fn hello() -> Bytes {
    Bytes::from(protocol::encode(&Hello {
        agent_version: "bench".into(),
        reported: ReportedState::idle(),
    }))
}

async fn connect(port: u16, ca: &Path, files: &CarFiles, id: &str) -> Requester {
    let link = cardeploy_testkit::car_link(
        port,
        (ca, &files.cert, &files.key),
        id,
        Duration::from_secs(30),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    link.request_response(route::CAR_HELLO, hello())
        .await
        .unwrap();
    link
}

/// Push `release` to every honest car; returns each car's REST-call-to-arrival latency, sorted.
async fn push(
    api: &Api,
    ids: &[String],
    release: &str,
    arrivals: &[Arc<Mutex<Vec<Instant>>>],
    generation: usize,
) -> Vec<Duration> {
    let (api2, ids2, release) = (api.clone(), ids.to_vec(), release.to_owned());
    let sent: Vec<Instant> =
        blocking(move || ids2.iter().map(|id| api2.desire(id, &release)).collect()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while arrivals
        .iter()
        .any(|a| a.lock().unwrap().len() <= generation)
    {
        assert!(Instant::now() < deadline, "a push did not reach every car");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut latencies: Vec<Duration> = arrivals
        .iter()
        .zip(&sent)
        .map(|(a, t0)| a.lock().unwrap()[generation].duration_since(*t0))
        .collect();
    latencies.sort();
    latencies
}

fn windows(index: &ChunkIndex, base: Option<&ChunkIndex>) -> Vec<Vec<u8>> {
    (0..index.chunks.len() as u32)
        .collect::<Vec<_>>()
        .chunks(64)
        .map(|w| {
            protocol::encode(&ChunksRequest {
                index: index.id().hex(),
                base: base.map(|b| b.id().hex()),
                chunks: w.to_vec(),
            })
        })
        .collect()
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| {
            let path = e.path();
            if path.is_dir() {
                dir_bytes(&path)
            } else {
                std::fs::metadata(&path).map_or(0, |m| m.len())
            }
        })
        .sum()
}

#[tokio::main]
async fn main() {
    let twin_bin = PathBuf::from(arg("--twin").expect("--twin BIN"));
    let smoke = std::env::args().any(|a| a == "--smoke");
    let cars: usize = arg("--cars").map_or(if smoke { 50 } else { 1000 }, |n| n.parse().unwrap());
    let requests: usize =
        arg("--requests").map_or(if smoke { 200 } else { 1000 }, |n| n.parse().unwrap());
    let work = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let data = work.path().join("twin");
    let log = work.path().join("twin.log");
    // A stalled car is dropped after 20 s: long enough to measure it holding its requests.
    let twin = start_twin_configured(
        &twin_bin,
        &data,
        &pki,
        "send_stall_secs = 20\nheartbeat_secs = 30",
        &log,
    );
    let pid = twin.child.id();
    let api = Api {
        url: twin.api.clone(),
        token: twin.token.clone(),
    };
    let ca = pki.ca();

    eprintln!("root, artifacts, releases");
    let (app, secret, releases) = {
        let (api, data) = (api.clone(), data.clone());
        blocking(move || {
            let signer = Signer::for_twin(&data);
            signer.push_root_to(&api.url, &api.token);
            let app = api.upload(&noise(1, 8 << 20));
            let secret = api.upload(&noise(2, 2 << 20));
            let publish = |line: &str, version: &str, index: Option<&ChunkIndex>| {
                let artifacts = index
                    .map(|i| vec![artifact(ArtifactKind::OciLayer, line, i)])
                    .unwrap_or_default();
                signer.publish_to(
                    &api.url,
                    &api.token,
                    &signer.manifest(line, version, artifacts),
                )
            };
            let releases = [
                publish("app", "1.0.0", Some(&app)),
                publish("secret", "1.0.0", Some(&secret)),
                publish("bench", "1.0.0", None),
                publish("bench", "2.0.0", None),
            ];
            (app, secret, releases)
        })
        .await
    };
    let [app_release, _secret_release, quiet_release, attack_release] = releases;

    eprintln!("issuing and registering {cars} honest cars and three more");
    let ids: Vec<String> = (0..cars).map(|i| format!("HONEST{i:05}")).collect();
    let mut files = Vec::with_capacity(cars);
    for id in ids
        .iter()
        .map(String::as_str)
        .chain(["GREEDY", "PROBER", "REVOKED"])
    {
        files.push((id.to_owned(), pki.car(id)));
    }
    {
        let (api, files) = (api.clone(), files.clone());
        blocking(move || {
            for (id, f) in &files {
                api.register(id, &f.cert_pem);
            }
        })
        .await;
    }
    let file_of = |id: &str| files.iter().find(|(i, _)| i == id).unwrap().1.clone();

    eprintln!("connecting {cars} honest cars");
    let mut arrivals = Vec::with_capacity(cars);
    let mut links = Vec::with_capacity(cars);
    for batch in files[..cars].chunks(64) {
        let mut joins = Vec::new();
        for (id, f) in batch {
            let (id, f, ca, port) = (id.clone(), f.clone(), ca.clone(), twin.cars_port);
            let arrived: Arc<Mutex<Vec<Instant>>> = Arc::default();
            arrivals.push(arrived.clone());
            joins.push(tokio::spawn(async move {
                let link = connect(port, &ca, &f, &id).await;
                let mut stream = link.request_stream(route::CAR_DESIRED, Bytes::new());
                tokio::spawn(async move {
                    while let Some(Ok(_)) = stream.next().await {
                        arrived.lock().unwrap().push(Instant::now());
                    }
                });
                link
            }));
        }
        for j in joins {
            links.push(j.await.unwrap());
        }
    }
    let mut report = format!(
        "| measure ({cars} honest cars, {requests} unread requests) | value | target |\n|---|---|---|\n"
    );

    eprintln!("quiet push");
    let quiet = push(&api, &ids, &quiet_release, &arrivals, 0).await;

    eprintln!("the attack: {requests} artifact.chunks requests never read");
    {
        let (api, release) = (api.clone(), app_release.clone());
        blocking(move || api.desire("GREEDY", &release)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid);
    let greedy_files = file_of("GREEDY");
    let mut greedy = HostileCar::connect(
        format!("127.0.0.1:{}", twin.cars_port).parse().unwrap(),
        &ca,
        &greedy_files,
        "GREEDY",
    )
    .await
    .unwrap();
    let h = greedy
        .request_response(route::CAR_HELLO, &hello())
        .await
        .unwrap();
    greedy.answer(h, Duration::from_secs(10)).await.unwrap();
    let asks = windows(&app, None);
    for n in 0..requests {
        greedy
            .request_stream(route::ARTIFACT_CHUNKS, &asks[n % asks.len()])
            .await
            .unwrap();
    }
    let sampling = Arc::new(Mutex::new(before));
    let sampler = {
        let peak = sampling.clone();
        tokio::spawn(async move {
            loop {
                let rss = rss_kib(pid);
                {
                    let mut p = peak.lock().unwrap();
                    *p = (*p).max(rss);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("push during the attack");
    let attacked = push(&api, &ids, &attack_release, &arrivals, 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    sampler.abort();
    let peak = *sampling.lock().unwrap();
    let grown_mib = peak.saturating_sub(before) as f64 / 1024.0;
    report += &format!(
        "| twin RSS before / at most during the attack | {:.1} MiB / {:.1} MiB (+{grown_mib:.1} MiB) | ≤ +32 MiB |\n",
        before as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    let (q50, q99) = (percentile(&quiet, 0.5), percentile(&quiet, 0.99));
    let (a50, a99) = (percentile(&attacked, 0.5), percentile(&attacked, 0.99));
    report += &format!(
        "| desired-state push to {cars} cars, median / p99, quiet | {} / {} | |\n",
        ms(q50),
        ms(q99)
    );
    report += &format!(
        "| the same during the attack | {} / {} ({:.2}× the quiet p99) | ≤ 2× |\n",
        ms(a50),
        ms(a99),
        a99.as_secs_f64() / q99.as_secs_f64()
    );
    drop(greedy);

    eprintln!("requests naming a base the car does not own");
    let prober_files = file_of("PROBER");
    {
        let (api, release) = (api.clone(), app_release.clone());
        blocking(move || api.desire("PROBER", &release)).await;
    }
    let prober = connect(twin.cars_port, &ca, &prober_files, "PROBER").await;
    let foreign = windows(&app, Some(&secret));
    let probes = requests.max(200);
    let cpu = |label: &'static str, ask: Box<dyn Fn(usize) -> (&'static str, Bytes)>| {
        let prober = prober.clone();
        async move {
            let t0 = cpu_time(pid);
            let mut refused = 0;
            for n in 0..probes {
                let (route, body) = ask(n);
                let answer = if route == route::ARTIFACT_CHUNKS {
                    prober
                        .request_window(
                            route,
                            body,
                            cardeploy_link::Window {
                                max_items: 64,
                                max_bytes: 32 << 20,
                            },
                        )
                        .await
                        .map(|_| ())
                } else {
                    prober.request_response(route, body).await.map(|_| ())
                };
                refused += usize::from(answer.is_err());
            }
            let spent = cpu_time(pid).saturating_sub(t0);
            eprintln!("  {label}: {probes} requests, {refused} refused, twin CPU {spent:?}");
            (spent, refused)
        }
    };
    let (beats_cpu, _) = cpu(
        "heartbeats",
        Box::new(|_| (route::CAR_HEARTBEAT, Bytes::from_static(b"{}"))),
    )
    .await;
    let foreign2 = foreign.clone();
    let (foreign_cpu, refused) = cpu(
        "foreign bases",
        Box::new(move |n| {
            (
                route::ARTIFACT_CHUNKS,
                Bytes::from(foreign2[n % foreign2.len()].clone()),
            )
        }),
    )
    .await;
    assert_eq!(
        refused, probes,
        "every request naming a foreign base is refused"
    );
    let cache = dir_bytes(&data.join("chunks/deltas"));
    report += &format!(
        "| twin CPU for {probes} requests naming a base the car does not own / for {probes} heartbeats | {} / {} | no delta work |\n",
        ms(foreign_cpu),
        ms(beats_cpu)
    );
    report += &format!("| delta cache after them | {cache} bytes | 0 |\n");

    eprintln!("revocation");
    let revoked_files = file_of("REVOKED");
    let revoked = connect(twin.cars_port, &ca, &revoked_files, "REVOKED").await;
    let t0 = Instant::now();
    {
        let api = api.clone();
        blocking(move || assert_eq!(api.send("DELETE", "/api/v1/cars/REVOKED", None), 200)).await;
    }
    tokio::time::timeout(Duration::from_secs(10), revoked.closed())
        .await
        .expect("the revoked car's session was never closed");
    let revocation = t0.elapsed();
    report += &format!(
        "| revocation (REST call) to the car's session closed | {} | < 1 s |\n",
        ms(revocation)
    );
    drop(links);
    println!("{report}");
    if let Some(out) = arg("--out") {
        std::fs::write(out, &report).unwrap();
    }
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!log.contains("panicked"), "the twin panicked:\n{log}");
    if smoke {
        assert!(
            grown_mib <= 32.0,
            "the twin grew by {grown_mib:.1} MiB under attack"
        );
        assert_eq!(
            cache, 0,
            "delta work was done for a base the car does not own"
        );
        assert!(
            revocation < Duration::from_secs(1),
            "revocation took {revocation:?}"
        );
        println!("bench hostile --smoke: bounds hold");
    }
}
