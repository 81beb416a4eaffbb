//! Dev-only helpers for the lower test tiers (docs/architecture.md, "Test tiers"): a fault-injecting TCP proxy,
//! a throw-away fleet PKI, finding the workspace's binaries, a real RAUC on a private bus
//! ([`rauc`]), a hostile car speaking raw RSocket ([`hostile`]), and the fleet bootstrap with
//! the real binaries that the system tests and the demo share ([`fleet`]), OCI images made on
//! the spot ([`oci`]), and a Kubernetes API-server double ([`kube`]). Never a dependency
//! of a product crate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod cross;
pub mod fleet;
pub mod hostile;
pub mod kube;
pub mod oci;
pub mod postgres;
pub mod procs;
pub mod rauc;
pub mod s3;
pub mod signing;
pub mod threats;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use cardeploy_pki::{FleetPki, Issued, write_file};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    /// Forward everything.
    Pass = 0,
    /// Keep connections open but forward nothing, either way: a dead peer that never says so
    /// (a car driving into a tunnel, a NAT that forgot the flow).
    Blackhole = 1,
    /// Reset every connection now and refuse new ones.
    Reset = 2,
}

/// A TCP proxy in front of a server, with faults switchable at run time.
#[derive(Debug)]
pub struct FaultProxy {
    pub addr: SocketAddr,
    /// Bytes forwarded server → client (what a car downloads through the proxy).
    pub bytes_down: Arc<std::sync::atomic::AtomicU64>,
    /// Bytes forwarded client → server.
    pub bytes_up: Arc<std::sync::atomic::AtomicU64>,
    fault: Arc<AtomicU8>,
    changed: watch::Sender<u8>,
}

impl FaultProxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fault = Arc::new(AtomicU8::new(Fault::Pass as u8));
        let (changed, _) = watch::channel(0u8);
        let bytes_down = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let bytes_up = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let proxy = Self {
            addr,
            bytes_down: bytes_down.clone(),
            bytes_up: bytes_up.clone(),
            fault: fault.clone(),
            changed: changed.clone(),
        };
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if fault.load(Ordering::SeqCst) == Fault::Reset as u8 {
                    // Dropping at once looks like a reset to the client.
                    drop(client);
                    continue;
                }
                let fault = fault.clone();
                let changed = changed.subscribe();
                let counters = (bytes_up.clone(), bytes_down.clone());
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        pipe(client, server, fault, changed, counters).await;
                    }
                });
            }
        });
        proxy
    }

    pub fn set(&self, fault: Fault) {
        self.fault.store(fault as u8, Ordering::SeqCst);
        self.changed.send_replace(fault as u8);
    }
}

async fn pipe(
    client: TcpStream,
    server: TcpStream,
    fault: Arc<AtomicU8>,
    changed: watch::Receiver<u8>,
    (up, down): (
        Arc<std::sync::atomic::AtomicU64>,
        Arc<std::sync::atomic::AtomicU64>,
    ),
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let a = copy(cr, sw, fault.clone(), changed.clone(), up);
    let b = copy(sr, cw, fault, changed, down);
    let _ = tokio::join!(a, b);
}

async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    fault: Arc<AtomicU8>,
    mut changed: watch::Receiver<u8>,
    counter: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            read = from.read(&mut buf) => {
                let n = match read { Ok(0) | Err(_) => break, Ok(n) => n };
                match fault.load(Ordering::SeqCst) {
                    0 => {
                        if to.write_all(&buf[..n]).await.is_err() { break }
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    1 => {} // swallowed
                    _ => break,
                }
            }
            _ = changed.changed() => {
                if fault.load(Ordering::SeqCst) == Fault::Reset as u8 {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

/// A fleet PKI in a temp dir, with helpers to issue car certificates.
#[derive(Debug)]
pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub pki: FleetPki,
}

/// Paths of one car's credentials.
#[derive(Clone, Debug)]
pub struct CarFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_pem: String,
}

impl TestPki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let names = ["localhost".to_owned(), "127.0.0.1".to_owned()];
        let pki = FleetPki::generate("test fleet", &names).unwrap();
        pki.write(dir.path()).unwrap();
        Self { dir, pki }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn ca(&self) -> PathBuf {
        self.path().join("ca.pem")
    }

    pub fn twin_cert(&self) -> PathBuf {
        self.path().join("twin.pem")
    }

    pub fn twin_key(&self) -> PathBuf {
        self.path().join("twin.key")
    }

    /// Issue a certificate for `car_id` and write it next to the CA.
    pub fn car(&self, car_id: &str) -> CarFiles {
        self.write_car(car_id, self.pki.ca.issue_car(car_id).unwrap())
    }

    /// A certificate for `car_id` from another, unrelated CA.
    pub fn foreign_car(&self, car_id: &str) -> CarFiles {
        let other = FleetPki::generate("someone else", &["localhost".to_owned()]).unwrap();
        self.write_car(
            &format!("foreign-{car_id}"),
            other.ca.issue_car(car_id).unwrap(),
        )
    }

    /// A certificate for `car_id` from the fleet CA with only the serverAuth extended key usage:
    /// a twin certificate, not a car's.
    pub fn server_auth_car(&self, car_id: &str) -> CarFiles {
        let (not_before, not_after) = valid_around_now();
        self.write_car(
            &format!("server-{car_id}"),
            self.issue(
                car_id,
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                not_before,
                not_after,
            ),
        )
    }

    /// A car certificate from the fleet CA whose validity ended yesterday.
    pub fn expired_car(&self, car_id: &str) -> CarFiles {
        let now = time::OffsetDateTime::now_utc();
        let day = time::Duration::days(1);
        self.write_car(
            &format!("expired-{car_id}"),
            self.issue(
                car_id,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
                now - day * 30,
                now - day,
            ),
        )
    }

    /// Issue with rcgen directly: `crates/pki` only makes certificates a fleet should have, and
    /// these tests need the ones it should not.
    fn issue(
        &self,
        common_name: &str,
        usage: rcgen::ExtendedKeyUsagePurpose,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Issued {
        let ca_key = std::fs::read_to_string(self.path().join("ca.key")).unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(
            self.pki.ca.cert_pem(),
            rcgen::KeyPair::from_pem(&ca_key).unwrap(),
        )
        .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &issuer).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    fn write_car(&self, name: &str, issued: Issued) -> CarFiles {
        let Issued { cert_pem, key_pem } = issued;
        let cert = self.path().join(format!("{name}.pem"));
        let key = self.path().join(format!("{name}.key"));
        write_file(&cert, &cert_pem, false).unwrap();
        write_file(&key, &key_pem, true).unwrap();
        CarFiles {
            cert,
            key,
            cert_pem,
        }
    }
}

fn valid_around_now() -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (
        now - time::Duration::hours(1),
        now + time::Duration::days(365),
    )
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

/// Path of a binary of this workspace, built by `cargo test` or `cargo build` into the same
/// target directory as the running test.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/debug/deps/test-hash → target/debug/name
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build -p {name}` or `cargo xtask test`)",
        path.display()
    );
    path
}

/// One call to the twin's operator REST API with `Authorization: Bearer <token>`. ureq blocks,
/// so the call runs on the blocking pool, off the runtime that may also be serving the twin.
/// Returns the status and the JSON body (a body that is not JSON comes back as a JSON string).
pub async fn rest(
    api: SocketAddr,
    token: &str,
    method: &'static str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let url = format!("http://{api}{path}");
    let auth = format!("Bearer {token}");
    tokio::task::spawn_blocking(move || {
        let agent = procs::http();
        let response = match (method, body) {
            ("GET", None) => agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", None) => agent.delete(&url).header("Authorization", &auth).call(),
            ("POST", Some(b)) => agent.post(&url).header("Authorization", &auth).send_json(b),
            ("PUT", Some(b)) => agent.put(&url).header("Authorization", &auth).send_json(b),
            (method, body) => panic!("rest(): unsupported {method} with body {body:?}"),
        };
        status_and_json(response)
    })
    .await
    .unwrap()
}

fn status_and_json(
    response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> (u16, serde_json::Value) {
    let mut response = response.unwrap();
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap();
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (status, json)
}

/// Like [`rest`] with a raw body (`PUT` chunks and indexes).
pub async fn rest_bytes(
    api: SocketAddr,
    token: &str,
    path: &str,
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    let url = format!("http://{api}{path}");
    let auth = format!("Bearer {token}");
    tokio::task::spawn_blocking(move || {
        let response = procs::http()
            .put(&url)
            .header("Authorization", &auth)
            .send(&body[..]);
        status_and_json(response)
    })
    .await
    .unwrap()
}

/// A car's connection to the twin on `localhost:port`, made with the agent's own link code:
/// mutual TLS with the car's certificate, SETUP naming `car_id`, requests with `deadline`.
pub async fn car_link(
    port: u16,
    files: (&Path, &Path, &Path),
    car_id: &str,
    heartbeat: Duration,
    deadline: Duration,
) -> Result<cardeploy_link::Requester, cardeploy_link::Error> {
    car_link_from(None, port, files, car_id, heartbeat, deadline).await
}

/// [`car_link`] from the local address `bind` (a simulated fleet spreads its cars over
/// 127.0.0.0/8: see [`loopback_source`]).
pub async fn car_link_from(
    bind: Option<std::net::IpAddr>,
    port: u16,
    (ca, cert, key): (&Path, &Path, &Path),
    car_id: &str,
    heartbeat: Duration,
    deadline: Duration,
) -> Result<cardeploy_link::Requester, cardeploy_link::Error> {
    use cardeploy_link::tls::{TlsFiles, client_config};
    let config = client_config(&TlsFiles { ca, cert, key })?;
    cardeploy_link::connect(&cardeploy_link::ClientOptions {
        addr: format!("localhost:{port}"),
        security: cardeploy_link::ClientSecurity::MutualTls(config),
        heartbeat,
        request_deadline: deadline,
        connect_timeout: deadline,
        limits: cardeploy_link::Limits::default(),
        setup_data: cardeploy_link::Bytes::from(
            serde_json::json!({"car_id": car_id, "agent_version": "test"}).to_string(),
        ),
        responder: None,
        bind,
    })
    .await
}

/// The loopback address simulated car `n` connects from: 10,000 cars per address (each
/// (source, destination) pair has ~28,000 ephemeral ports), from 127.1.0.1 on.
pub fn loopback_source(n: usize) -> std::net::IpAddr {
    let block = u32::try_from(n / 10_000).unwrap_or(u32::MAX);
    std::net::IpAddr::V4(std::net::Ipv4Addr::from(
        0x7F01_0001_u32.saturating_add(block),
    ))
}

/// `len` pseudo-random bytes from `seed` (xorshift64): incompressible, so every chunk travels at
/// full size, and two seeds share no chunk.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 56) as u8
        })
        .collect()
}

/// Poll `check` every 20 ms until it returns Some, or panic after `timeout` with `what`.
pub async fn eventually<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let start = tokio::time::Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A name no other test of this run uses: `prefix`, the process id, a counter and the clock's
/// nanoseconds, joined by `sep` (databases take `_`, buckets `-`).
pub fn unique_name(prefix: &str, sep: char) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let (pid, n) = (std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    format!("{prefix}{sep}{pid}{sep}{n}{sep}{nanos}")
}

/// `CI` is set to something that means yes (`true`, `1`, ...): a test whose real dependency is
/// missing fails there instead of skipping.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// A test cannot run here because it needs `why`: under CI that is a failure (panics, naming
/// what is needed); by hand it skips loudly. Call it and return.
pub fn cannot_run(test: &str, why: &str) {
    assert!(
        !in_ci(),
        "{test} must run in CI but needs {why}; CI is set, so this fails instead of skipping"
    );
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: it needs {why} (CI=true makes this a failure)"
    );
}
