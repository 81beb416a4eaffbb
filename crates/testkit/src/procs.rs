//! Real processes for benchmarks: the twin binary on free ports, RSS readings from /proc.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `cardeploy-twin serve` child process; killed on drop.
#[derive(Debug)]
pub struct TwinProcess {
    pub child: Child,
    pub cars_port: u16,
    /// `http://127.0.0.1:<port>`
    pub api: String,
    pub token: String,
}

impl Drop for TwinProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Start the twin binary on `data` (its PKI under `data/pki`) and wait for its API.
pub fn start_twin(bin: &Path, data: &Path, heartbeat: u64) -> TwinProcess {
    let cars_port = free_port();
    let api_port = free_port();
    let child = Command::new(bin)
        .args(["serve", "--data"])
        .arg(data)
        .args(["--cars-listen", &format!("127.0.0.1:{cars_port}")])
        .args(["--api-listen", &format!("127.0.0.1:{api_port}")])
        .args(["--heartbeat-secs", &heartbeat.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    started(child, cars_port, api_port, data)
}

/// Start the twin binary with a configuration file: `data` as its data directory, the TLS files
/// of `pki`, free loopback ports, and `extra` TOML lines (limits under test). Its log goes to
/// `log`, so a test can look for panics in it.
pub fn start_twin_configured(
    bin: &Path,
    data: &Path,
    pki: &crate::TestPki,
    extra: &str,
    log: &Path,
) -> TwinProcess {
    let cars_port = free_port();
    let api_port = free_port();
    let config = data.with_extension("toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{data}\"\ncars_listen = \"127.0.0.1:{cars_port}\"\napi_listen = \"127.0.0.1:{api_port}\"\n\
             ca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n{extra}\n",
            data = data.display(),
            ca = pki.ca().display(),
            cert = pki.twin_cert().display(),
            key = pki.twin_key().display(),
        ),
    )
    .unwrap();
    // tracing writes to stdout: both streams go to the log.
    let out = std::fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    let child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap();
    started(child, cars_port, api_port, data)
}

/// The twin process once its API answers, with the token it wrote.
fn started(child: Child, cars_port: u16, api_port: u16, data: &Path) -> TwinProcess {
    wait_for_api(api_port);
    let token = std::fs::read_to_string(data.join("operator.token")).unwrap();
    TwinProcess {
        child,
        cars_port,
        api: format!("http://127.0.0.1:{api_port}"),
        token: token.trim().to_owned(),
    }
}

fn wait_for_api(api_port: u16) {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", api_port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "twin did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// CPU time (user + system) a process has used so far.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // The kernel's USER_HZ is 100 on every Linux this runs on.
    Duration::from_millis(ticks * 10)
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Resident set size now, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// Peak resident set size since the process started, KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

/// The value after `name` on the command line.
pub fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// A ureq agent that returns error statuses instead of failing on them.
pub fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// An operator API call to `twin` (`GET`, `POST`, `PUT`; `body` as JSON): the status and the
/// answer, as JSON when it is, else as a string.
pub fn api(
    twin: &TwinProcess,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    api_at(&twin.api, &twin.token, method, path, body)
}

/// [`api`] to the twin whose API is at `base` (`http://host:port`), with `token`.
pub fn api_at(
    base: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let url = format!("{base}{path}");
    let auth = format!("Bearer {token}");
    let agent = http();
    let answer = match (method, body) {
        ("GET", None) => agent.get(&url).header("Authorization", &auth).call(),
        ("POST", Some(b)) => agent.post(&url).header("Authorization", &auth).send_json(b),
        ("POST", None) => agent.post(&url).header("Authorization", &auth).send_empty(),
        ("PUT", Some(b)) => agent.put(&url).header("Authorization", &auth).send_json(b),
        (method, body) => panic!("api: {method} with body {body:?} is not a call tests make"),
    };
    let mut r = answer.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

/// Until `twin` has made every delta it planned ahead (`GET /api/v1/deltas`); the seconds it
/// took. Panics after `within`.
pub fn wait_ahead(twin: &TwinProcess, within: Duration) -> f64 {
    let started = Instant::now();
    loop {
        let (status, view) = api(twin, "GET", "/api/v1/deltas", None);
        assert_eq!(status, 200, "{view}");
        if view["ahead_pending"] == 0 {
            return started.elapsed().as_secs_f64();
        }
        assert!(
            started.elapsed() < within,
            "deltas ahead not made in {within:?}: {view}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}
