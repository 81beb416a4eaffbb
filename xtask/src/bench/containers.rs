//! `cargo xtask bench containers`: the car's registry — a large layer pulled by skopeo from it
//! against reading and copying the file, and the memory serving adds
//! (crates/registry/examples/bench_registry.rs). The table goes to
//! `target/bench-containers.md`. Bytes on the wire for a container update and the rollback time
//! join this bench with the kube path.

use std::path::Path;
use std::process::Command;

use super::build::{self, Profile};
use crate::host;
use crate::sh::{root, run};

/// `cargo xtask bench containers` arguments.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Size of the layer pulled, MiB [default: 1024; smoke: 16].
    #[arg(long, value_name = "MIB")]
    pub layer_mib: Option<u64>,
    /// A small layer on the debug build, failing when the copy is not exact or serving holds
    /// the layer in memory (what `cargo xtask test` runs).
    #[arg(long)]
    pub smoke: bool,
}

const PACKAGES: &[&str] = &["cardeploy-registry"];
const EXAMPLE: &str = "bench_registry";

pub fn run_bench(options: &Options) -> anyhow::Result<()> {
    host::apt_install("cargo xtask bench containers", &["skopeo"])?;
    let profile = if options.smoke {
        Profile::Debug
    } else {
        Profile::Measure
    };
    let bins = build::build(profile, PACKAGES, EXAMPLE)?;
    let out = root().join("target/bench-containers.md");
    let mut cmd = command(&bins);
    cmd.arg("--out").arg(&out);
    if let Some(mib) = options.layer_mib {
        cmd.arg("--layer-mib").arg(mib.to_string());
    }
    if options.smoke {
        cmd.arg("--smoke");
    }
    run(&mut cmd)?;
    println!("table written to {}", out.display());
    Ok(())
}

fn command(bins: &Path) -> Command {
    Command::new(bins.join("examples").join(EXAMPLE))
}

/// The smoke run on the example already built in `bins`; the example asserts what timing
/// cannot change.
pub fn smoke(bins: &Path) -> anyhow::Result<()> {
    run(command(bins)
        .arg("--smoke")
        .arg("--out")
        .arg(root().join("target/bench-containers-smoke.md")))
}
