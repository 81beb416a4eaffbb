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
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", api_port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "twin did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let token = std::fs::read_to_string(data.join("operator.token")).unwrap();
    TwinProcess {
        child,
        cars_port,
        api: format!("http://127.0.0.1:{api_port}"),
        token: token.trim().to_owned(),
    }
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
