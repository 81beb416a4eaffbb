//! `cargo xtask bench fleet`: the twin beyond one machine, measured with real processes on this
//! machine — several `cardeploy-twin` instances on one PostgreSQL database, and simulated cars
//! (the link's own client, TLS 1.3 with their own certificates) in child processes of this
//! one, spread over the instances and over source addresses in 127.0.0.0/8.
//!
//! At each fleet size (cumulative: the cars of one point stay connected for the next):
//! - twin memory per idle connected car (the instances' RSS over their RSS with every car
//!   registered and none connected), before and after each car holds a desired state;
//! - desired states signed through the API and pushed to the cars (each through an instance
//!   other than, in general, the one its car is connected to): throughput, and latency from the
//!   call to the car, median and p99;
//! - a fleet-wide push (a root rotation every car must receive): time from the call until every
//!   car has it, median and p99;
//! - the PostgreSQL load: transactions and rows written per second, and its CPU, while cars
//!   connect, while they idle, and while desired states are pushed.
//!
//! Then the reconnect storm: every instance killed and started again at once; the time until every
//! car is back (the cars reconnect with the agent's backoff: exponential, full jitter), errors in
//! the instances' logs, and whether an instance fell over.
//!
//! `--smoke` (run by `cargo xtask test`): 300 cars, 2 instances, 2 car processes, and a failure
//! when a figure is not sane.
//!
//! Arguments: --twin BIN --postgres URL [--cars 10000,50000,100000] [--per-instance 15000]
//! [--per-process 15000] [--smoke] [--out FILE] [--json FILE]
//! The car processes: `bench_fleet cars --pki DIR --first N --count N --ports P,P,...`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cardeploy_link::Bytes;
use cardeploy_pki::{FleetPki, write_file};
use cardeploy_protocol::{self as protocol, Hello, ReportedState, route};
use cardeploy_testkit::procs::{api_at, arg, free_port, http, rss_kib};
use cardeploy_testkit::signing::Signer;
use futures::StreamExt;
use serde_json::{Value, json};

fn car_id(n: usize) -> String {
    format!("FLEET{n:06}")
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("cars") {
        cars_process();
    } else {
        orchestrate();
    }
}

// ---------------------------------------------------------------------------------------------
// The car processes.

/// Cars `first..first+count`, each connected to `ports[n % ports.len()]` from its own loopback
/// address, kept connected with the agent's backoff. Says on stdout: `U` a car is up (hello
/// answered), `D` a car lost its connection, `G <n> <unix nanos>` car n received a message on
/// its desired-state stream.
fn cars_process() {
    let pki = PathBuf::from(arg("--pki").expect("--pki DIR"));
    let first: usize = arg("--first").unwrap().parse().unwrap();
    let count: usize = arg("--count").unwrap().parse().unwrap();
    let ports: Vec<u16> = arg("--ports")
        .unwrap()
        .split(',')
        .map(|p| p.parse().unwrap())
        .collect();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let writer = std::thread::spawn(move || {
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => {
                    writeln!(out, "{line}").unwrap();
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => out.flush().unwrap(),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        out.flush().unwrap();
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        // Handshakes at most 64 at a time per process, as a fleet's cars are spread in time.
        let handshakes = Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = Vec::new();
        for n in first..first + count {
            let (pki, tx, handshakes) = (pki.clone(), tx.clone(), handshakes.clone());
            let port = ports[n % ports.len()];
            tasks.push(tokio::spawn(async move {
                car(n, &pki, port, &tx, &handshakes).await;
            }));
        }
        drop(tx);
        for task in tasks {
            let _ = task.await;
        }
    });
    writer.join().unwrap();
}

async fn car(
    n: usize,
    pki: &Path,
    port: u16,
    tx: &std::sync::mpsc::Sender<String>,
    handshakes: &tokio::sync::Semaphore,
) {
    let id = car_id(n);
    let (ca, cert, key) = (
        pki.join("ca.pem"),
        pki.join("cars").join(format!("{id}.pem")),
        pki.join("cars").join(format!("{id}.key")),
    );
    let source = cardeploy_testkit::loopback_source(n);
    let mut backoff =
        cardeploy_link::Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
    loop {
        let session = {
            let _turn = handshakes.acquire().await.unwrap();
            let link = cardeploy_testkit::car_link_from(
                Some(source),
                port,
                (&ca, &cert, &key),
                &id,
                Duration::from_secs(30),
                Duration::from_secs(60),
            )
            .await;
            match link {
                Ok(link) => {
                    let hello = Hello {
                        agent_version: "bench".into(),
                        reported: ReportedState::idle(),
                    };
                    link.request_response(route::CAR_HELLO, Bytes::from(protocol::encode(&hello)))
                        .await
                        .ok()
                        .map(|_| link)
                }
                Err(_) => None,
            }
        };
        if let Some(link) = session {
            backoff.reset();
            let _ = tx.send("U".into());
            let mut desired = link.request_stream(route::CAR_DESIRED, Bytes::from_static(b"{}"));
            loop {
                tokio::select! {
                    () = link.closed() => break,
                    item = desired.next() => match item {
                        Some(Ok(_)) => { let _ = tx.send(format!("G {n} {}", unix_nanos())); }
                        _ => break,
                    },
                }
            }
            let _ = tx.send("D".into());
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The orchestrator.

/// What the car processes said, gathered.
#[derive(Default)]
struct Heard {
    up: AtomicU64,
    down: AtomicU64,
    /// Per car: the arrival times (unix nanos) of the messages on its desired-state stream.
    arrivals: Mutex<Vec<Vec<u64>>>,
}

impl Heard {
    fn connected(&self) -> u64 {
        self.up
            .load(Ordering::SeqCst)
            .saturating_sub(self.down.load(Ordering::SeqCst))
    }

    /// The first arrival at or after `since` of each of `cars`, if any.
    fn first_after(&self, cars: std::ops::Range<usize>, since: u64) -> Vec<Option<u64>> {
        let arrivals = self.arrivals.lock().unwrap();
        cars.map(|n| arrivals[n].iter().copied().find(|t| *t >= since))
            .collect()
    }
}

struct Instance {
    config: PathBuf,
    dir: PathBuf,
    api: String,
    cars_port: u16,
    child: Option<Child>,
}

impl Instance {
    fn spawn(&mut self, bin: &Path) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("twin.log"))
            .unwrap();
        self.child = Some(
            Command::new(bin)
                .args(["serve", "--config"])
                .arg(&self.config)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    fn wait_api(&self) {
        let started = Instant::now();
        loop {
            let up = http()
                .get(&format!("{}/healthz", self.api))
                .call()
                .is_ok_and(|r| r.status().as_u16() == 200);
            if up {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "twin instance {} did not start:\n{}",
                self.dir.display(),
                std::fs::read_to_string(self.dir.join("twin.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn error_lines(&self) -> usize {
        std::fs::read_to_string(self.dir.join("twin.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains("panicked"))
            .count()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Fleet {
    bin: PathBuf,
    instances: Vec<Instance>,
    token: String,
}

impl Fleet {
    fn call(&self, i: usize, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        api_at(&self.instances[i].api, &self.token, method, path, body)
    }

    /// Cars connected to the instances, as they count them.
    fn connected(&self) -> u64 {
        (0..self.instances.len())
            .map(|i| {
                self.call(i, "GET", "/api/v1/instance", None).1["connected_cars"]
                    .as_u64()
                    .unwrap_or(0)
            })
            .sum()
    }

    fn rss_kib(&self) -> u64 {
        self.instances.iter().map(|i| rss_kib(i.pid())).sum()
    }
}

/// PostgreSQL's counters: (transactions committed, rows written), and its processes' CPU time.
struct PgLoad {
    url: String,
}

#[derive(Clone, Copy)]
struct PgSample {
    at: Instant,
    commits: i64,
    rows: i64,
    cpu: Duration,
}

impl PgLoad {
    fn sample(&self) -> PgSample {
        let out = Command::new("psql")
            .arg(&self.url)
            .args([
                "-Atc",
                "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted FROM pg_stat_database WHERE datname = current_database()",
            ])
            .output()
            .expect("psql");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut fields = text.trim().split('|');
        let commits = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
        let rows = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
        PgSample {
            at: Instant::now(),
            commits,
            rows,
            cpu: postgres_cpu(),
        }
    }

    /// "N commits/s, N rows/s, N % of a core" between two samples.
    fn between(a: PgSample, b: PgSample) -> String {
        let secs = b.at.duration_since(a.at).as_secs_f64().max(0.001);
        format!(
            "{:.0} commits/s, {:.0} rows written/s, CPU {:.0} % of a core",
            (b.commits - a.commits) as f64 / secs,
            (b.rows - a.rows) as f64 / secs,
            100.0 * b.cpu.saturating_sub(a.cpu).as_secs_f64() / secs
        )
    }
}

/// CPU time of PostgreSQL on the machine (the bench's server is the only one): every live
/// `postgres` process, and the backends that already ended, which the server's main process
/// collected (its children's time).
fn postgres_cpu() -> Duration {
    let mut ticks = 0u64;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() != "postgres" {
            continue;
        }
        // The process may have ended in between.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name (which may hold spaces) start after the last ')'.
        let Some(end) = stat.rfind(')') else { continue };
        let fields: Vec<u64> = stat[end + 2..]
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        // utime, stime; cutime, cstime (non-zero only for the main process, whose children the
        // backends are).
        ticks += fields.get(11..15).map_or(0, |f| f.iter().sum());
    }
    // The kernel's USER_HZ is 100 on every Linux this runs on.
    Duration::from_millis(ticks * 10)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn wait_until(what: &str, within: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    started.elapsed()
}

/// `count` calls of `f(n)` for n in `range`, on `threads` threads.
fn parallel(range: std::ops::Range<usize>, threads: usize, f: impl Fn(usize) + Sync) {
    let next = AtomicU64::new(range.start as u64);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst) as usize;
                    if n >= range.end {
                        break;
                    }
                    f(n);
                }
            });
        }
    });
}

fn orchestrate() {
    let twin_bin = PathBuf::from(arg("--twin").expect("--twin BIN"));
    let admin = arg("--postgres").expect("--postgres URL (a server where databases can be made)");
    let smoke = std::env::args().any(|a| a == "--smoke");
    let sizes: Vec<usize> = arg("--cars")
        .unwrap_or_else(|| if smoke { "300" } else { "10000,50000,100000" }.into())
        .split(',')
        .map(|n| n.parse().unwrap())
        .collect();
    let per_instance: usize =
        arg("--per-instance").map_or(if smoke { 200 } else { 15_000 }, |n| n.parse().unwrap());
    let per_process: usize =
        arg("--per-process").map_or(if smoke { 150 } else { 15_000 }, |n| n.parse().unwrap());
    let max = *sizes.iter().max().unwrap();
    let count = max.div_ceil(per_instance);
    let work = tempfile::tempdir().unwrap();
    let pki_dir = work.path().join("pki");
    std::fs::create_dir_all(pki_dir.join("cars")).unwrap();
    let pki = FleetPki::generate("bench fleet", &["localhost".into()]).unwrap();
    pki.write(&pki_dir).unwrap();

    eprintln!("issuing {max} car certificates");
    let started = Instant::now();
    let pems: Vec<Mutex<String>> = (0..max).map(|_| Mutex::new(String::new())).collect();
    parallel(0..max, 2, |n| {
        let id = car_id(n);
        let issued = pki.ca.issue_car(&id).unwrap();
        let cars = pki_dir.join("cars");
        write_file(&cars.join(format!("{id}.pem")), &issued.cert_pem, false).unwrap();
        write_file(&cars.join(format!("{id}.key")), &issued.key_pem, true).unwrap();
        *pems[n].lock().unwrap() = issued.cert_pem;
    });
    eprintln!("  in {:.1} s", started.elapsed().as_secs_f64());

    let database = cardeploy_testkit::postgres::fresh_database_blocking(&admin).unwrap();
    let pg = PgLoad {
        url: database.clone(),
    };
    // The instances: the first makes the director key and the operator token, the others get
    // copies (docs/operations.md, "Several instances").
    let mut instances: Vec<Instance> = (0..count)
        .map(|i| {
            let dir = work.path().join(format!("twin{}", i + 1));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .unwrap();
            let (cars_port, api_port) = (free_port(), free_port());
            let config = dir.join("twin.toml");
            std::fs::write(
                &config,
                format!(
                    "data_dir = \"{data}\"\ndatabase_url = \"{database}\"\ndatabase_connections = 6\n\
                     cars_listen = \"127.0.0.1:{cars_port}\"\napi_listen = \"127.0.0.1:{api_port}\"\n\
                     ca = \"{pki}/ca.pem\"\ncert = \"{pki}/twin.pem\"\nkey = \"{pki}/twin.key\"\n\
                     heartbeat_secs = 30\n",
                    data = dir.display(),
                    pki = pki_dir.display(),
                ),
            )
            .unwrap();
            Instance {
                config,
                dir,
                api: format!("http://127.0.0.1:{api_port}"),
                cars_port,
                child: None,
            }
        })
        .collect();
    instances[0].spawn(&twin_bin);
    instances[0].wait_api();
    let first = instances[0].dir.clone();
    for instance in &mut instances[1..] {
        for name in ["director.key", "director.pub", "operator.token"] {
            std::fs::copy(first.join(name), instance.dir.join(name)).unwrap();
        }
        instance.spawn(&twin_bin);
    }
    for instance in &instances[1..] {
        instance.wait_api();
    }
    let token = std::fs::read_to_string(first.join("operator.token"))
        .unwrap()
        .trim()
        .to_owned();
    let mut fleet = Fleet {
        bin: twin_bin.clone(),
        instances,
        token,
    };
    let signer = Signer::for_twin(&first);
    let director = signer_director(&first);
    signer.push_root_to(&fleet.instances[0].api, &fleet.token);
    let release = signer.publish_to(
        &fleet.instances[0].api,
        &fleet.token,
        &signer.manifest("fleet", "1.0.0", vec![]),
    );
    let ports: Vec<String> = fleet
        .instances
        .iter()
        .map(|i| i.cars_port.to_string())
        .collect();
    let ports = ports.join(",");

    eprintln!("registering {max} cars through {count} instances");
    let started = Instant::now();
    parallel(0..max, 8, |n| {
        let pem = pems[n].lock().unwrap().clone();
        let (status, body) = fleet.call(
            n % count,
            "POST",
            "/api/v1/cars",
            Some(json!({"id": car_id(n), "certificate_pem": pem})),
        );
        assert_eq!(status, 201, "{body}");
    });
    eprintln!("  in {:.1} s", started.elapsed().as_secs_f64());
    std::thread::sleep(Duration::from_secs(2));
    let base_rss = fleet.rss_kib();
    eprintln!(
        "instances' RSS with {max} cars registered, none connected: {} MiB",
        base_rss / 1024
    );

    let heard = Arc::new(Heard {
        arrivals: Mutex::new(vec![Vec::new(); max]),
        ..Heard::default()
    });
    let mut processes: Vec<Child> = Vec::new();
    let mut rows: Vec<Value> = Vec::new();
    let mut table =
        String::from("| cars | instances | measure | value | target |\n|---|---|---|---|---|\n");
    let mut root_version = 1;
    let mut connected = 0;
    for &size in &sizes {
        eprintln!("connecting cars {connected}..{size}");
        let batch = size - connected;
        let before = pg.sample();
        let mut first = connected;
        while first < size {
            let n = per_process.min(size - first);
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args(["cars", "--pki"])
                .arg(&pki_dir)
                .args(["--first", &first.to_string(), "--count", &n.to_string()])
                .args(["--ports", &ports])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            let stdout = child.stdout.take().unwrap();
            let heard = heard.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let mut words = line.split(' ');
                    match words.next() {
                        Some("U") => {
                            heard.up.fetch_add(1, Ordering::SeqCst);
                        }
                        Some("D") => {
                            heard.down.fetch_add(1, Ordering::SeqCst);
                        }
                        Some("G") => {
                            let car: usize = words.next().unwrap().parse().unwrap();
                            let at: u64 = words.next().unwrap().parse().unwrap();
                            heard.arrivals.lock().unwrap()[car].push(at);
                        }
                        _ => {}
                    }
                }
            });
            processes.push(child);
            first += n;
        }
        let took = wait_until(
            &format!("{size} cars connected"),
            Duration::from_secs(1800),
            || heard.connected() >= size as u64,
        );
        let during_connect = PgLoad::between(before, pg.sample());
        connected = size;
        wait_until(
            "the instances to count every car",
            Duration::from_secs(120),
            || fleet.connected() >= size as u64,
        );
        eprintln!("  {size} connected in {:.1} s", took.as_secs_f64());
        // PostgreSQL's statistics trail its transactions by up to a second or so.
        std::thread::sleep(Duration::from_secs(3));
        let idle_from = pg.sample();
        std::thread::sleep(Duration::from_secs(if smoke { 2 } else { 10 }));
        let idle = PgLoad::between(idle_from, pg.sample());
        let rss = fleet.rss_kib();
        let per_car = rss.saturating_sub(base_rss) as f64 / size as f64;

        // Desired states for the cars that have none yet, each through the instance after the
        // one its car is connected to, 16 calls in flight.
        let fresh = (rows
            .last()
            .map_or(0, |r: &Value| r["cars"].as_u64().unwrap() as usize))..size;
        eprintln!("signing and pushing {} desired states", fresh.len());
        let sent: Vec<Mutex<u64>> = fresh.clone().map(|_| Mutex::new(0)).collect();
        let push_from = pg.sample();
        let started = Instant::now();
        parallel(fresh.clone(), 16, |n| {
            *sent[n - fresh.start].lock().unwrap() = unix_nanos();
            let (status, body) = fleet.call(
                (n + 1) % count,
                "PUT",
                &format!("/api/v1/cars/{}/desired", car_id(n)),
                Some(json!({ "release": release })),
            );
            assert_eq!(status, 200, "{body}");
        });
        let signing = started.elapsed();
        let earliest = sent.iter().map(|s| *s.lock().unwrap()).min().unwrap_or(0);
        wait_until(
            "every desired state delivered",
            Duration::from_secs(600),
            || {
                heard
                    .first_after(fresh.clone(), earliest)
                    .iter()
                    .all(Option::is_some)
            },
        );
        let during_push = PgLoad::between(push_from, pg.sample());
        let arrived = heard.first_after(fresh.clone(), earliest);
        let mut latencies: Vec<f64> = arrived
            .iter()
            .zip(&sent)
            .map(|(a, s)| (a.unwrap().saturating_sub(*s.lock().unwrap())) as f64 / 1e6)
            .collect();
        latencies.sort_by(f64::total_cmp);
        std::thread::sleep(Duration::from_secs(2));
        let rss_desired = fleet.rss_kib();
        let per_car_desired = rss_desired.saturating_sub(base_rss) as f64 / size as f64;

        // A fleet-wide push: a root rotation (same director key) every car receives.
        root_version += 1;
        let rotation = signer.rotation(root_version, &director);
        let body: Value = serde_json::from_slice(&rotation).unwrap();
        let at = unix_nanos();
        let (status, answer) = fleet.call(0, "POST", "/api/v1/roots", Some(body));
        assert_eq!(status, 200, "{answer}");
        wait_until(
            "the root rotation at every car",
            Duration::from_secs(600),
            || heard.first_after(0..size, at).iter().all(Option::is_some),
        );
        let mut fanout: Vec<f64> = heard
            .first_after(0..size, at)
            .iter()
            .map(|a| a.unwrap().saturating_sub(at) as f64 / 1e6)
            .collect();
        fanout.sort_by(f64::total_cmp);

        let rate = fresh.len() as f64 / signing.as_secs_f64();
        let mut add = |measure: &str, value: String, target: &str| {
            table += &format!("| {size} | {count} | {measure} | {value} | {target} |\n");
        };
        add(
            "twin memory per idle connected car (all instances)",
            format!("{per_car:.1} KiB (RSS {} MiB in all)", rss / 1024),
            "≤ 40 KiB",
        );
        add(
            "same, each car holding a desired state",
            format!("{per_car_desired:.1} KiB"),
            "—",
        );
        add(
            "cars connecting (TLS 1.3, SETUP, hello; 64 at a time per car process)",
            format!("{batch} in {:.1} s", took.as_secs_f64()),
            "—",
        );
        add(
            "desired states signed through the API and pushed (16 calls in flight)",
            format!(
                "{} at {rate:.0}/s; call → car median {:.0} ms, p99 {:.0} ms",
                fresh.len(),
                percentile(&latencies, 0.5),
                percentile(&latencies, 0.99)
            ),
            "—",
        );
        add(
            "fleet-wide push (root rotation) → every car, median / p99 / last",
            format!(
                "{:.0} ms / {:.0} ms / {:.0} ms",
                percentile(&fanout, 0.5),
                percentile(&fanout, 0.99),
                fanout.last().copied().unwrap_or(f64::NAN)
            ),
            "p99 ≤ 2 s",
        );
        add("PostgreSQL while cars connect", during_connect.clone(), "—");
        add("PostgreSQL while cars idle", idle.clone(), "—");
        add(
            "PostgreSQL while desired states are pushed",
            during_push.clone(),
            "—",
        );
        rows.push(json!({
            "cars": size, "instances": count, "kib_per_car": per_car,
            "kib_per_car_desired": per_car_desired, "rss_mib": rss / 1024,
            "push_p50_ms": percentile(&latencies, 0.5), "push_p99_ms": percentile(&latencies, 0.99),
            "fanout_p50_ms": percentile(&fanout, 0.5), "fanout_p99_ms": percentile(&fanout, 0.99),
            "connect_secs": took.as_secs_f64(), "sign_rate": rate,
        }));
        eprintln!("{table}");
        if smoke {
            assert!(
                per_car > 0.0 && per_car < 400.0,
                "memory per car {per_car} KiB is not sane"
            );
            assert!(
                percentile(&fanout, 0.99) < 30_000.0,
                "fan-out p99 {fanout:?}"
            );
        }
    }

    // The reconnect storm: every instance killed and started again.
    eprintln!("reconnect storm: killing and restarting {count} instances");
    let storm_from = pg.sample();
    for instance in &mut fleet.instances {
        instance.kill();
    }
    let errors_before: usize = fleet.instances.iter().map(Instance::error_lines).sum();
    let restarted = Instant::now();
    for instance in &mut fleet.instances {
        instance.spawn(&fleet.bin);
    }
    for instance in &fleet.instances {
        instance.wait_api();
    }
    let started_in = restarted.elapsed();
    wait_until(
        "every car back after the restart",
        Duration::from_secs(1800),
        || fleet.connected() >= max as u64,
    );
    let back = restarted.elapsed();
    let during_storm = PgLoad::between(storm_from, pg.sample());
    let fell_over = fleet
        .instances
        .iter_mut()
        .map(|i| usize::from(!i.alive()))
        .sum::<usize>();
    let errors: usize = fleet
        .instances
        .iter()
        .map(Instance::error_lines)
        .sum::<usize>()
        - errors_before;
    table += &format!(
        "| {max} | {count} | reconnect storm: every instance killed and restarted → every car back | {:.1} s (instances answering after {:.1} s); {errors} error lines in the instances' logs; {fell_over} instances fell over | ≤ 2 min, no error storm |\n",
        back.as_secs_f64(),
        started_in.as_secs_f64()
    );
    table += &format!("| {max} | {count} | PostgreSQL during the storm | {during_storm} | — |\n");
    let storm = json!({"cars": max, "back_secs": back.as_secs_f64(), "errors": errors, "fell_over": fell_over});
    for mut child in processes {
        let _ = child.kill();
        let _ = child.wait();
    }
    if smoke {
        assert_eq!(fell_over, 0, "an instance fell over in the storm");
        assert!(back < Duration::from_secs(120), "the storm took {back:?}");
    }
    println!("{table}");
    if let Some(out) = arg("--out") {
        std::fs::write(out, &table).unwrap();
    }
    if let Some(path) = arg("--json") {
        std::fs::write(
            path,
            serde_json::to_vec_pretty(&json!({"points": rows, "storm": storm})).unwrap(),
        )
        .unwrap();
    }
}

/// The director key the instances share (the first one's public half).
fn signer_director(first: &Path) -> cardeploy_release::PublicKey {
    cardeploy_release::key_file::read_public(&first.join("director.pub")).unwrap()
}
