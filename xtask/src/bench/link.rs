//! `cargo xtask bench link`: the link's figures (agent/examples/bench_link.rs): twin memory per
//! idle connected car, desired-state push latency, dead-peer detection, memory kept per closed
//! connection, the agent's idle RSS on x86_64 and on aarch64 under qemu-user, and the aarch64
//! binary's size. Runs with the file descriptor limit raised ([`crate::sh::RAISE_FDS`]): 10,000
//! cars need 10,000 on each side.

use std::path::Path;
use std::process::Command;

use super::build::{self, Profile};
use crate::cross;
use crate::sh::{RAISE_FDS, root, run};

/// `cargo xtask bench link` arguments.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Connected cars at each measuring point, comma-separated.
    #[arg(long, value_name = "N,N,...", default_value = "1000,10000")]
    pub cars: String,
    /// 20 cars on the debug build, no aarch64 agent, and a failure when a figure is not sane
    /// (what `cargo xtask test` runs).
    #[arg(long)]
    pub smoke: bool,
}

const PACKAGES: &[&str] = &["cardeploy-twin", "cardeploy-agent"];
const EXAMPLE: &str = "bench_link";

pub fn run_bench(options: &Options) -> anyhow::Result<()> {
    if options.smoke {
        let bins = build::build(Profile::Debug, PACKAGES, EXAMPLE)?;
        return smoke(&bins);
    }
    let aarch64 = cross::agent()?;
    let bins = build::build(Profile::Measure, PACKAGES, EXAMPLE)?;
    let out = root().join("target/bench-link.md");
    let command = format!(
        "{RAISE_FDS} && exec {} --twin {} --agent {} --aarch64-agent {} --cars {} --out {}",
        bins.join("examples").join(EXAMPLE).display(),
        bins.join("cardeploy-twin").display(),
        bins.join("cardeploy-agent").display(),
        aarch64.display(),
        options.cars,
        out.display(),
    );
    run(Command::new("bash").args(["-c", &command]))?;
    println!("table written to {}", out.display());
    Ok(())
}

/// The smoke run on binaries already built in `bins`; the example asserts the figures.
pub fn smoke(bins: &Path) -> anyhow::Result<()> {
    run(Command::new(bins.join("examples").join(EXAMPLE))
        .arg("--twin")
        .arg(bins.join("cardeploy-twin"))
        .arg("--agent")
        .arg(bins.join("cardeploy-agent"))
        .arg("--smoke"))
}
