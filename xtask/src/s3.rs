//! An S3-compatible server for the twin's object-storage tests: moto's server mode (PyPI
//! `moto[server]`, an AWS service mock whose server speaks the S3 REST API), in a venv of its own,
//! on a free loopback port, stopped when the run ends. It keeps objects in memory and checks no
//! signatures; the tests need the protocol, not AWS.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::host;

/// Pinned, like every tool the tests download.
const MOTO: &str = "moto[server]==5.2.5";

/// A running server; killed on drop.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`, what the tests get as `CARDEPLOY_S3_ENDPOINT`.
    pub endpoint: String,
}

/// Install moto's server in `.venv-s3` if needed and start it.
pub fn start() -> anyhow::Result<Server> {
    let venv = host::python_venv(".venv-s3", &[MOTO])?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("cannot find a free loopback port")?
        .port();
    let log = std::env::temp_dir().join(format!("cardeploy-s3-{}.log", std::process::id()));
    let mut child = Command::new(venv.join("bin/moto_server"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).context("cannot create the S3 server's log")?)
        .spawn()
        .context("cannot start moto_server")?;
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait()? {
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("the S3 server (moto) exited at start ({status}):\n{said}");
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            bail!("the S3 server (moto) did not listen on port {port} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Server {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
    })
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
