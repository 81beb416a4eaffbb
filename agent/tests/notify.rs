//! The real `cardeploy-agent` binary under a stand-in for systemd: a datagram socket named by
//! `NOTIFY_SOCKET`, as a `Type=notify` unit with `WatchdogSec=` sets it up. No twin runs: the
//! agent must report ready while offline.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cardeploy_release::SigningKey;
use cardeploy_testkit::TestPki;
use cardeploy_testkit::signing::{COMPATIBLE, Signer};
use common::{Agent, free_port};

/// The agent, killed if the test fails before it is stopped (a panic must not leave it running).
struct Running(Option<Agent>);

impl Running {
    fn terminate(mut self) -> (Duration, bool) {
        self.0.take().unwrap().terminate()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut agent) = self.0.take() {
            let _ = agent.0.kill();
            let _ = agent.0.wait();
        }
    }
}

/// The next datagram, or None once `deadline` has passed.
fn next(systemd: &UnixDatagram, deadline: Instant) -> Option<String> {
    let left = deadline.checked_duration_since(Instant::now())?;
    systemd
        .set_read_timeout(Some(left.max(Duration::from_millis(1))))
        .unwrap();
    let mut buf = [0u8; 4096];
    match systemd.recv(&mut buf) {
        Ok(n) => Some(String::from_utf8(buf[..n].to_vec()).unwrap()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(e) => panic!("reading the notify socket: {e}"),
    }
}

fn has_line(message: &str, line: &str) -> bool {
    message.lines().any(|l| l == line)
}

/// An agent.toml for a car whose twin does not answer (nothing listens on the port).
fn offline_config(dir: &Path, pki: &TestPki, signer: &Signer) -> std::path::PathBuf {
    let files = pki.car("VIN-NOTIFY");
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "car_id = \"VIN-NOTIFY\"\ntwin = \"localhost:{port}\"\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
             state_dir = \"state\"\nheartbeat_secs = 1\nreconnect_base_ms = 100\nreconnect_cap_secs = 1\n\
             root = \"{root}\"\ncompatible = \"{COMPATIBLE}\"\n",
            port = free_port(),
            ca = pki.ca().display(),
            cert = files.cert.display(),
            key = files.key.display(),
            root = signer.root_path().display(),
        ),
    )
    .unwrap();
    config
}

#[test]
fn agent_reports_ready_pings_the_watchdog_and_says_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let signer = Signer::new(SigningKey::generate().unwrap().public());
    let config = offline_config(dir.path(), &pki, &signer);
    let socket = dir.path().join("notify.sock");
    let systemd = UnixDatagram::bind(&socket).unwrap();

    let mut command = Command::new(env!("CARGO_BIN_EXE_cardeploy-agent"));
    command
        .env("NOTIFY_SOCKET", &socket)
        .env("WATCHDOG_USEC", "200000")
        .env_remove("WATCHDOG_PID");
    let agent = Running(Some(Agent::start_with(command, &config)));

    // Startup: the first thing systemd hears is READY=1 (no pings before it), with no twin.
    let first = next(&systemd, Instant::now() + Duration::from_secs(30))
        .expect("the agent sent nothing within 30 s: no READY=1");
    assert!(
        has_line(&first, "READY=1"),
        "the first notification is not READY=1: {first:?}"
    );
    let mut seen = vec![first];

    // The watchdog: every 100 ms, so at least two within 2 s.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut pings = 0;
    while pings < 2 {
        let Some(message) = next(&systemd, deadline) else {
            break;
        };
        if message == "WATCHDOG=1" {
            pings += 1;
        }
        seen.push(message);
    }
    assert!(
        pings >= 2,
        "{pings} WATCHDOG=1 within 2 s of READY=1: {seen:?}"
    );

    let (took, ok) = agent.terminate();
    assert!(ok, "the agent exited with an error on SIGTERM");
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?}");
    // The agent has exited: all it sent is queued on the socket.
    while let Some(message) = next(&systemd, Instant::now() + Duration::from_millis(200)) {
        seen.push(message);
    }
    assert!(
        seen.iter().any(|m| has_line(m, "STOPPING=1")),
        "no STOPPING=1 after SIGTERM: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|m| has_line(m, "STATUS=offline, reconnecting to the twin")),
        "no offline status although no twin answers: {seen:?}"
    );
    for message in &seen {
        assert!(
            message
                .lines()
                .all(|l| ["READY=1", "WATCHDOG=1", "STOPPING=1"].contains(&l)
                    || l.starts_with("STATUS=")),
            "not a notification the agent should send: {message:?}"
        );
    }
}
