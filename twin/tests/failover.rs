//! Failover: three `cardeploy-twin` processes on one PostgreSQL database and one S3 bucket,
//! behind HAProxy in TCP mode (mutual TLS passes through to the twins). Cars on the link's own
//! client report events and take a phased deployment; the instance that drives it is killed
//! (SIGKILL) mid-rollout. Its cars reconnect through HAProxy to the others with jittered
//! backoff, another instance takes over the rollout, and in the end: every car ran the release,
//! signed for it once (no desired state twice, no rollout step twice), every event a car sent is
//! stored exactly once, and the killed instance restarted loses nothing it acknowledged.
//!
//! Needs `CARDEPLOY_POSTGRES_URL`, `CARDEPLOY_S3_ENDPOINT` and HAProxy (`cargo xtask test`
//! provides all three): skipped loudly by hand without them, a failure under `CI=true`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cardeploy_chunks::ChunkIndex;
use cardeploy_chunks::transit::Frame;
use cardeploy_link::Bytes;
use cardeploy_protocol::{
    self as protocol, ChunksRequest, DesiredState, Hello, HelloReply, Phase, Report, ReportBody,
    ReportMark, ReportedState, route,
};
use cardeploy_testkit::procs::free_port;
use cardeploy_testkit::signing::Signer;
use cardeploy_testkit::{CarFiles, TestPki, rest};
use futures::StreamExt;
use serde_json::{Value, json};

const CARS: usize = 24;
const INSTANCES: usize = 3;
/// The epoch of every simulated car's reports (one run of its agent).
const EPOCH: u64 = 1;

fn haproxy() -> Option<PathBuf> {
    ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// One twin process.
struct Instance {
    dir: PathBuf,
    cars: u16,
    api: std::net::SocketAddr,
    config: PathBuf,
    child: Option<Child>,
}

impl Instance {
    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.join("twin.log")).unwrap();
        let child = Command::new(cardeploy_testkit::workspace_bin("cardeploy-twin"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGKILL: no goodbye to the database, the cars or HAProxy.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("twin.log")).unwrap_or_default()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn api(
    instance: &Instance,
    token: &str,
    method: &'static str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    rest(instance.api, token, method, path, body).await
}

/// Wait until `check` holds, up to `within`; `what` names it in the failure.
async fn until<F: std::future::Future<Output = bool>>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> F,
) -> Duration {
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

/// What a simulated car has seen, for the assertions.
#[derive(Default)]
struct Seen {
    /// Desired-state counters pushed to it, in order (repeats of the same one included).
    counters: Vec<u64>,
    /// Connections that ended under it.
    lost: u64,
    /// The release it reports running.
    running: Option<String>,
    /// The state reports it sent, by number (the other numbers are `tick` events).
    states: HashMap<u64, ReportedState>,
    /// The release whose artifact it is fetching, until it has every chunk.
    fetching: Option<String>,
    /// The positions of the artifact's chunks it holds.
    have: std::collections::BTreeSet<u32>,
    /// Sessions that ended with the fetch unfinished (it resumes in the next one).
    interrupted: u64,
}

/// Fetch the chunks of `index` that `seen` does not hold, four a window, a little slowly (the
/// instance must be able to die mid-fetch), until it holds them all; a window that fails is asked
/// again. Each chunk is checked to be the one asked for, at its length.
async fn fetch(link: cardeploy_link::Requester, index: Arc<ChunkIndex>, seen: Arc<Mutex<Seen>>) {
    loop {
        let missing: Vec<u32> = {
            let seen = seen.lock().unwrap();
            (0..index.chunks.len() as u32)
                .filter(|p| !seen.have.contains(p))
                .take(4)
                .collect()
        };
        if missing.is_empty() {
            return;
        }
        let request = ChunksRequest {
            index: index.id().to_string(),
            base: None,
            chunks: missing.clone(),
        };
        let mut frames = link.request_stream(
            route::ARTIFACT_CHUNKS,
            Bytes::from(protocol::encode(&request)),
        );
        let mut next = missing.iter();
        while let Some(Ok(bytes)) = frames.next().await {
            let Some(&position) = next.next() else { break };
            let frame = Frame::decode(&bytes).unwrap();
            let chunk = &index.chunks[position as usize];
            frame.expect(&chunk.id, chunk.len).unwrap();
            seen.lock().unwrap().have.insert(position);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// A simulated car: connects through HAProxy, says hello, sends a numbered event every
/// 400 ms (under the twin's report rate limit), takes every desired state pushed to it (reporting it committed), and after losing
/// the connection comes back with jittered backoff, sending again the events the twin says it
/// has not stored (the agent's reporter does the same).
struct Car {
    id: String,
    seen: Arc<Mutex<Seen>>,
    sent: Arc<AtomicU64>,
    quiet: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Car {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start_car(id: String, files: CarFiles, ca: PathBuf, port: u16, index: Arc<ChunkIndex>) -> Car {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let sent = Arc::new(AtomicU64::new(0));
    let quiet = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn({
        let (id, seen, sent, quiet) = (id.clone(), seen.clone(), sent.clone(), quiet.clone());
        async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let link = match cardeploy_testkit::car_link(
                    port,
                    (&ca, &files.cert, &files.key),
                    &id,
                    Duration::from_secs(1),
                    Duration::from_secs(5),
                )
                .await
                {
                    Ok(link) => link,
                    Err(_) => {
                        // Jittered: the cars of a dead instance do not come back in one wave.
                        let jitter =
                            Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64));
                        tokio::time::sleep(backoff / 2 + jitter).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                };
                let running = seen.lock().unwrap().running.clone();
                let hello = Hello {
                    agent_version: "simulated".into(),
                    reported: ReportedState {
                        phase: if running.is_some() {
                            Phase::Committed
                        } else {
                            Phase::Idle
                        },
                        release: running,
                        ..ReportedState::idle()
                    },
                };
                let Ok(answer) = link
                    .request_response(route::CAR_HELLO, Bytes::from(protocol::encode(&hello)))
                    .await
                else {
                    seen.lock().unwrap().lost += 1;
                    tokio::time::sleep(backoff).await;
                    continue;
                };
                backoff = Duration::from_millis(100);
                let reply: HelloReply = protocol::decode("hello reply", &answer).unwrap();
                // Events after the twin's mark, sent again with their numbers.
                let stored = reply
                    .reports_through
                    .map_or(0, |m: ReportMark| if m.epoch == EPOCH { m.seq } else { 0 });
                for seq in stored + 1..=sent.load(Ordering::SeqCst) {
                    let state = seen.lock().unwrap().states.get(&seq).cloned();
                    match state {
                        Some(state) => report(&link, seq, ReportBody::State { state }).await,
                        None => send_event(&link, seq).await,
                    }
                }
                let mut desired =
                    link.request_stream(route::CAR_DESIRED, Bytes::from_static(b"{}"));
                let mut tick = tokio::time::interval(Duration::from_millis(400));
                // A fetch the last session left unfinished resumes with the chunks still missing.
                let mut fetching = seen
                    .lock()
                    .unwrap()
                    .fetching
                    .is_some()
                    .then(|| tokio::spawn(fetch(link.clone(), index.clone(), seen.clone())));
                loop {
                    tokio::select! {
                        () = link.closed() => break,
                        done = async { fetching.as_mut().unwrap().await }, if fetching.is_some() => {
                            fetching = None;
                            if done.is_ok() {
                                let label = {
                                    let mut seen = seen.lock().unwrap();
                                    let label = seen.fetching.take();
                                    seen.running.clone_from(&label);
                                    label
                                };
                                let seq = sent.fetch_add(1, Ordering::SeqCst) + 1;
                                let state = ReportedState {
                                    phase: Phase::Committed,
                                    release: label,
                                    ..ReportedState::idle()
                                };
                                seen.lock().unwrap().states.insert(seq, state.clone());
                                report(&link, seq, ReportBody::State { state }).await;
                            }
                        }
                        pushed = desired.next() => {
                            let Some(Ok(pushed)) = pushed else { break };
                            let pushed: DesiredState = protocol::decode("desired", &pushed).unwrap();
                            let doc: Value = serde_json::from_slice(&pushed.desired.payload).unwrap();
                            let release: Value = serde_json::from_slice(&pushed.release.payload).unwrap();
                            let label = format!("{}@{}", release["line"].as_str().unwrap(), release["version"].as_str().unwrap());
                            {
                                let mut seen = seen.lock().unwrap();
                                seen.counters.push(doc["counter"].as_u64().unwrap());
                                if seen.running.as_ref() != Some(&label) && seen.fetching.as_ref() != Some(&label) {
                                    seen.fetching = Some(label);
                                    seen.have.clear();
                                }
                            }
                            if fetching.is_none() && seen.lock().unwrap().fetching.is_some() {
                                fetching = Some(tokio::spawn(fetch(link.clone(), index.clone(), seen.clone())));
                            }
                        }
                        _ = tick.tick() => {
                            if !quiet.load(Ordering::SeqCst) {
                                let seq = sent.fetch_add(1, Ordering::SeqCst) + 1;
                                send_event(&link, seq).await;
                            }
                        }
                    }
                }
                if let Some(unfinished) = fetching.take() {
                    unfinished.abort();
                }
                let mut seen = seen.lock().unwrap();
                seen.lost += 1;
                if seen.fetching.is_some() {
                    seen.interrupted += 1;
                }
            }
        }
    });
    Car {
        id,
        seen,
        sent,
        quiet,
        task,
    }
}

async fn report(link: &cardeploy_link::Requester, seq: u64, body: ReportBody) {
    let report = Report {
        epoch: EPOCH,
        seq,
        at: 0,
        body,
    };
    let _ = link
        .fire_and_forget(route::CAR_REPORT, Bytes::from(protocol::encode(&report)))
        .await;
}

async fn send_event(link: &cardeploy_link::Requester, seq: u64) {
    report(
        link,
        seq,
        ReportBody::Event {
            kind: "tick".into(),
            message: format!("tick {seq}"),
        },
    )
    .await;
}

/// The `tick` events stored for `car`, by their numbers (with repeats, if any).
async fn stored_ticks(instance: &Instance, token: &str, car: &str) -> Vec<u64> {
    let (status, body) = api(
        instance,
        token,
        "GET",
        &format!("/api/v1/cars/{car}/events?limit=1000"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let mut ticks: Vec<u64> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "tick")
        .map(|e| {
            e["message"].as_str().unwrap()["tick ".len()..]
                .parse()
                .unwrap()
        })
        .collect();
    ticks.sort_unstable();
    ticks
}

fn write_config(
    dir: &Path,
    pki: &TestPki,
    cars: u16,
    api: u16,
    database: &str,
    bucket: &str,
    endpoint: &str,
) -> PathBuf {
    let config = format!(
        r#"data_dir = "{data}"
database_url = "{database}"
database_connections = 6
cars_listen = "127.0.0.1:{cars}"
api_listen = "127.0.0.1:{api}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
heartbeat_secs = 1

[object_store]
url = "s3://{bucket}/twin"
endpoint = "{endpoint}"
region = "us-east-1"
access_key_id = "{access}"
secret_access_key = "{secret}"
allow_http = true
"#,
        data = dir.display(),
        ca = pki.ca().display(),
        cert = pki.twin_cert().display(),
        key = pki.twin_key().display(),
        access = cardeploy_testkit::s3::ACCESS_KEY,
        secret = cardeploy_testkit::s3::SECRET_KEY,
    );
    let path = dir.join("twin.toml");
    std::fs::write(&path, config).unwrap();
    path
}

fn copy_private(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::copy(from, to).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_driving_instance_loses_nothing_and_repeats_nothing() {
    const TEST: &str = "killing_the_driving_instance_loses_nothing_and_repeats_nothing";
    let (Some(server), Some(endpoint), Some(haproxy)) = (
        cardeploy_testkit::postgres::server(),
        cardeploy_testkit::s3::endpoint(),
        haproxy(),
    ) else {
        cardeploy_testkit::cannot_run(
            TEST,
            "CARDEPLOY_POSTGRES_URL (a PostgreSQL server), CARDEPLOY_S3_ENDPOINT (an S3-compatible server) and HAProxy (apt install haproxy); `cargo xtask test` provides all three",
        );
        return;
    };
    let database = cardeploy_testkit::postgres::fresh_database(&server)
        .await
        .unwrap();
    let bucket = cardeploy_testkit::s3::fresh_bucket(&endpoint).unwrap();
    let pki = TestPki::new();
    let root = tempfile::tempdir().unwrap();

    // Three instances; the first makes the director key and the operator token, which the
    // others get copies of (docs/operations.md, "Several instances").
    let mut instances: Vec<Instance> = (0..INSTANCES)
        .map(|i| {
            let dir = root.path().join(format!("twin{}", i + 1));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .unwrap();
            let (cars, api) = (free_port(), free_port());
            let config = write_config(&dir, &pki, cars, api, &database, &bucket, &endpoint);
            Instance {
                dir,
                cars,
                api: format!("127.0.0.1:{api}").parse().unwrap(),
                config,
                child: None,
            }
        })
        .collect();
    instances[0].spawn();
    let healthy = |instance: &Instance| {
        let api = instance.api;
        async move {
            // `rest` expects a server: ask only once the port answers.
            tokio::net::TcpStream::connect(api).await.is_ok()
                && rest(api, "", "GET", "/healthz", None).await.0 == 200
        }
    };
    until("instance 1 to start", Duration::from_secs(30), || {
        healthy(&instances[0])
    })
    .await;
    let first = instances[0].dir.clone();
    for instance in &mut instances[1..] {
        for name in ["director.key", "operator.token"] {
            copy_private(&first.join(name), &instance.dir.join(name));
        }
        std::fs::copy(
            first.join("director.pub"),
            instance.dir.join("director.pub"),
        )
        .unwrap();
        instance.spawn();
    }
    for instance in &instances[1..] {
        until(
            "the other instances to start",
            Duration::from_secs(30),
            || healthy(instance),
        )
        .await;
    }
    let token = std::fs::read_to_string(first.join("operator.token"))
        .unwrap()
        .trim()
        .to_owned();
    let signer = Signer::for_twin(&first);
    signer.push_root(instances[1].api, &token).await;

    // HAProxy in front, TCP mode: TLS goes through to the twins untouched.
    let front = free_port();
    let servers: String = instances
        .iter()
        .enumerate()
        .map(|(i, t)| {
            format!(
                "    server twin{} 127.0.0.1:{} check inter 300ms fall 2 rise 2\n",
                i + 1,
                t.cars
            )
        })
        .collect();
    let haproxy_config = root.path().join("haproxy.cfg");
    std::fs::write(
        &haproxy_config,
        format!(
            "global\n    maxconn 2000\n\ndefaults\n    mode tcp\n    timeout connect 2s\n    timeout client 60s\n    timeout server 60s\n    retries 3\n    option redispatch\n\nfrontend cars\n    bind 127.0.0.1:{front}\n    default_backend twins\n\nbackend twins\n    balance roundrobin\n{servers}"
        ),
    )
    .unwrap();
    let check = Command::new(&haproxy)
        .arg("-c")
        .arg("-f")
        .arg(&haproxy_config)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "haproxy -c: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let _proxy = Proxy(
        Command::new(&haproxy)
            .arg("-db")
            .arg("-f")
            .arg(&haproxy_config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // The release's artifact, pushed through instance 3 into the shared bucket: every car fetches
    // it, from whichever instance it is connected to.
    let data = cardeploy_testkit::noise(11, 3 << 20);
    let index = Arc::new(cardeploy_chunks::chunk_bytes(
        &data,
        cardeploy_chunks::Params::DEFAULT,
    ));
    let offsets = index.offsets();
    for (i, c) in index.chunks.iter().enumerate() {
        let raw = &data[offsets[i] as usize..offsets[i + 1] as usize];
        let z = zstd::bulk::compress(raw, 3).unwrap();
        let (status, body) = cardeploy_testkit::rest_bytes(
            instances[2].api,
            &token,
            &format!("/api/v1/chunks/{}", c.id),
            z,
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, body) = cardeploy_testkit::rest_bytes(
        instances[2].api,
        &token,
        &format!("/api/v1/indexes/{}", index.id()),
        index.encode(),
    )
    .await;
    assert_eq!(status, 201, "{body}");

    // The cars, registered through instance 3, connected through HAProxy.
    let mut cars = Vec::new();
    for n in 0..CARS {
        let id = format!("VIN-F{n:02}");
        let files = pki.car(&id);
        let (status, body) = api(
            &instances[2],
            &token,
            "POST",
            "/api/v1/cars",
            Some(json!({"id": id, "attributes": {"model": "tx7"}, "certificate_pem": files.cert_pem})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        cars.push(start_car(id, files, pki.ca(), front, index.clone()));
    }
    let apis: Vec<std::net::SocketAddr> = instances.iter().map(|t| t.api).collect();
    let connected = |i: usize| {
        let (api, token) = (apis[i], token.clone());
        async move {
            let (_, body) = rest(api, &token, "GET", "/api/v1/instance", None).await;
            body["connected_cars"].as_u64().unwrap_or(0)
        }
    };
    until("every car connected", Duration::from_secs(30), || async {
        let mut all = 0;
        for i in 0..INSTANCES {
            all += connected(i).await;
        }
        all == CARS as u64
    })
    .await;
    let mut spread = Vec::new();
    for i in 0..INSTANCES {
        spread.push(connected(i).await);
    }
    println!("cars per instance through HAProxy: {spread:?}");

    // A phased deployment, made through instance 2: a third of the fleet, soak, then the rest.
    let artifact = cardeploy_testkit::signing::artifact(
        cardeploy_release::ArtifactKind::RaucBundle,
        "app",
        &index,
    );
    let manifest = signer.manifest("apps", "5.0.0", vec![artifact]);
    let body: Value = serde_json::from_slice(&signer.sign_release(&manifest).to_json()).unwrap();
    let (status, view) = api(
        &instances[1],
        &token,
        "POST",
        "/api/v1/releases",
        Some(body),
    )
    .await;
    assert_eq!(status, 201, "{view}");
    let request = json!({
        "name": "failover", "release": view["digest"], "selector": "",
        "phases": [{"percent": 33.0, "soak_secs": 3}, {"percent": 100.0, "soak_secs": 0}],
        "max_starts_per_minute": 600, "failure_threshold": 0.5, "success_threshold": 0.9,
        "ttl_secs": 3600,
    });
    let (status, body) = api(
        &instances[1],
        &token,
        "POST",
        "/api/v1/deployments",
        Some(request),
    )
    .await;
    assert_eq!(status, 201, "{body}");

    // Mid-rollout (the first phase started, soaking), the driving instance dies.
    let deployment = |i: usize| {
        let (api, token) = (apis[i], token.clone());
        async move {
            rest(api, &token, "GET", "/api/v1/deployments/failover", None)
                .await
                .1
        }
    };
    until(
        "the first phase to start",
        Duration::from_secs(30),
        || async { deployment(1).await["started"].as_u64().unwrap_or(0) > 0 },
    )
    .await;
    let mut driver = None;
    for (i, api) in apis.iter().enumerate() {
        let (_, body) = rest(*api, &token, "GET", "/api/v1/instance", None).await;
        if body["driving"] == true {
            assert!(driver.is_none(), "two instances drive");
            driver = Some((i, body["id"].as_str().unwrap().to_owned()));
        }
    }
    let (driver, driver_id) = driver.expect("no instance drives");
    // Killed while a car connected to it is mid-fetch.
    let total = index.chunks.len();
    let mid_fetch = until(
        "a car on the driving instance to be mid-fetch",
        Duration::from_secs(30),
        || async {
            for car in &cars {
                let have = car.seen.lock().unwrap().have.len();
                if have == 0 || have >= total {
                    continue;
                }
                let (_, view) = rest(
                    apis[1],
                    &token,
                    "GET",
                    &format!("/api/v1/cars/{}", car.id),
                    None,
                )
                .await;
                if view["connected_to"] == driver_id.as_str() {
                    return true;
                }
            }
            false
        },
    )
    .await;
    assert!(mid_fetch < Duration::from_secs(30));
    let orphans = connected(driver).await;
    let killed_at = Instant::now();
    instances[driver].kill();
    println!(
        "killed instance {} (it drove the rollout and held {orphans} cars)",
        driver + 1
    );
    let alive: Vec<usize> = (0..INSTANCES).filter(|i| *i != driver).collect();

    until(
        "another instance to drive",
        Duration::from_secs(30),
        || async {
            for &i in &alive {
                let (_, body) =
                    rest(instances[i].api, &token, "GET", "/api/v1/instance", None).await;
                if body["driving"] == true {
                    return true;
                }
            }
            false
        },
    )
    .await;
    println!(
        "rollout taken over {:.1} s after the kill",
        killed_at.elapsed().as_secs_f64()
    );
    until(
        "every car back on the other instances",
        Duration::from_secs(60),
        || async {
            let mut all = 0;
            for &i in &alive {
                all += connected(i).await;
            }
            all == CARS as u64
        },
    )
    .await;
    println!(
        "every car back {:.1} s after the kill",
        killed_at.elapsed().as_secs_f64()
    );
    let finishing = Instant::now();
    loop {
        let view = deployment(alive[0]).await;
        if view["state"] == "completed" {
            break;
        }
        if finishing.elapsed() > Duration::from_secs(90) {
            let cars: Vec<String> = cars
                .iter()
                .map(|c| {
                    let seen = c.seen.lock().unwrap();
                    format!(
                        "{}: {}/{total} chunks, fetching {:?}, running {:?}, counters {:?}",
                        c.id,
                        seen.have.len(),
                        seen.fetching,
                        seen.running,
                        seen.counters
                    )
                })
                .collect();
            let logs: Vec<String> = instances.iter().map(Instance::log).collect();
            panic!(
                "the rollout did not finish in 90 s: {view}\n{cars:#?}\n{}",
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "rollout done {:.1} s after the kill",
        killed_at.elapsed().as_secs_f64()
    );

    // Every fetch finished, at least one of them across the kill.
    let interrupted: u64 = cars
        .iter()
        .map(|c| c.seen.lock().unwrap().interrupted)
        .sum();
    for car in &cars {
        let seen = car.seen.lock().unwrap();
        assert_eq!(seen.have.len(), total, "{} did not get every chunk", car.id);
        assert!(seen.fetching.is_none(), "{} is still fetching", car.id);
    }
    assert!(interrupted >= 1, "no fetch was interrupted by the kill");
    println!(
        "{interrupted} fetches interrupted by the kill resumed on another instance ({total} chunks each)"
    );

    // Nothing twice: each car was signed for the release once (counter 1, however often the
    // stream showed it again after a reconnect) and started once.
    let view = deployment(alive[0]).await;
    assert_eq!(view["started"], CARS as u64, "{view}");
    assert_eq!(view["state"], "completed", "{view}");
    for car in &cars {
        let seen = car.seen.lock().unwrap();
        assert!(!seen.counters.is_empty(), "{} got no desired state", car.id);
        assert!(
            seen.counters.iter().all(|c| *c == 1),
            "{} was signed for more than once: counters {:?}",
            car.id,
            seen.counters
        );
    }
    let log: Vec<String> = view["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_owned())
        .collect();
    let mut steps = log.clone();
    steps.sort();
    steps.dedup();
    assert_eq!(
        steps.len(),
        log.len(),
        "a rollout step was logged twice: {log:#?}"
    );

    // Nothing lost, nothing twice: every event each car sent is stored exactly once.
    for car in &cars {
        car.quiet.store(true, Ordering::SeqCst);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lost_connections: u64 = cars.iter().map(|c| c.seen.lock().unwrap().lost).sum();
    assert!(
        lost_connections >= orphans,
        "the killed instance's cars never lost their connection"
    );
    for car in &cars {
        let sent = car.sent.load(Ordering::SeqCst);
        let ticks_sent: Vec<u64> = {
            let seen = car.seen.lock().unwrap();
            (1..=sent)
                .filter(|seq| !seen.states.contains_key(seq))
                .collect()
        };
        let instance = &instances[alive[0]];
        until(
            &format!("{}'s events stored", car.id),
            Duration::from_secs(20),
            || async { stored_ticks(instance, &token, &car.id).await.len() >= ticks_sent.len() },
        )
        .await;
        assert_eq!(
            stored_ticks(instance, &token, &car.id).await,
            ticks_sent,
            "{}: the events stored are not the events sent, each once",
            car.id
        );
    }
    println!(
        "every event of every car stored exactly once ({} events)",
        cars.iter()
            .map(|c| c.sent.load(Ordering::SeqCst))
            .sum::<u64>()
    );

    // The killed instance comes back: everything acknowledged is there.
    instances[driver].spawn();
    until(
        "the killed instance to restart",
        Duration::from_secs(30),
        || healthy(&instances[driver]),
    )
    .await;
    let (status, list) = api(&instances[driver], &token, "GET", "/api/v1/cars", None).await;
    assert_eq!(status, 200, "{list}");
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), CARS);
    let by_id: HashMap<&str, &Value> = list
        .iter()
        .map(|c| (c["id"].as_str().unwrap(), c))
        .collect();
    for car in &cars {
        let view = by_id[car.id.as_str()];
        assert_eq!(view["desired"]["counter"], 1, "{view}");
        assert_eq!(view["reported"]["state"]["release"], "apps@5.0.0", "{view}");
        assert_eq!(view["connected"], true, "{view}");
    }
    for instance in &instances {
        let log = instance.log();
        assert!(!log.contains("panicked"), "a twin panicked:\n{log}");
    }
}
