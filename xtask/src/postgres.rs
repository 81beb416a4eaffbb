//! A PostgreSQL server of the test run's own, for the twin's database tests on PostgreSQL
//! (twin/src/db/): Debian's PostgreSQL from apt, a fresh cluster in a directory of the system's
//! temporary directory (the `postgres` user must reach it, which a checkout under a private home
//! may not allow) on a free loopback port, trust authentication on loopback only, stopped and
//! removed when the run ends. PostgreSQL refuses to run as root, so as root the cluster belongs
//! to the `postgres` user the package creates.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::host;
use crate::sh::{describe, run};

/// A running cluster; stopped (and its directory removed) on drop.
pub struct Server {
    dir: PathBuf,
    bin: PathBuf,
    /// `postgres://postgres@127.0.0.1:PORT/postgres`, what the tests get as
    /// `CARDEPLOY_POSTGRES_URL`.
    pub url: String,
}

/// The newest PostgreSQL's bin directory (`/usr/lib/postgresql/<major>/bin`).
fn bin_dir() -> anyhow::Result<PathBuf> {
    let base = Path::new("/usr/lib/postgresql");
    let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir(base)
        .with_context(|| format!("{}: is PostgreSQL installed?", base.display()))?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let major = entry.file_name().to_str()?.parse().ok()?;
            Some((major, entry.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    majors.sort();
    majors
        .pop()
        .map(|(_, bin)| bin)
        .with_context(|| format!("no initdb under {}", base.display()))
}

/// `program` as the cluster's owner: `postgres` when we are root, ourselves otherwise.
fn as_owner(program: &Path) -> Command {
    if host::as_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

fn free_port() -> anyhow::Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// Install PostgreSQL if needed and start a cluster of this run's own.
pub fn start() -> anyhow::Result<Server> {
    host::apt_install("the database tests on PostgreSQL", host::APT_POSTGRES)?;
    let bin = bin_dir()?;
    let dir = std::env::temp_dir().join(format!("cardeploy-postgres-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if host::as_root() {
        run(Command::new("chown").args(["postgres:postgres"]).arg(&dir))?;
    }
    let data = dir.join("data");
    run(as_owner(&bin.join("initdb")).arg("-D").arg(&data).args([
        "-U",
        "postgres",
        "--auth=trust",
        "-E",
        "UTF8",
        "--no-sync",
    ]))?;
    let port = free_port()?;
    // Loopback only, its socket in its own directory (not /run/postgresql), enough connections
    // for several twins at once.
    let options = format!(
        "-c listen_addresses=127.0.0.1 -p {port} -k {} -c max_connections=300",
        dir.display()
    );
    let mut start = as_owner(&bin.join("pg_ctl"));
    start
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(dir.join("server.log"))
        .args(["-o", &options, "-w", "-t", "60", "start"]);
    let status = start
        .status()
        .with_context(|| format!("cannot run {}", describe(&start)))?;
    if !status.success() {
        let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
        bail!("PostgreSQL did not start ({status}):\n{log}");
    }
    Ok(Server {
        dir,
        bin,
        url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
    })
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = as_owner(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "-w", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
