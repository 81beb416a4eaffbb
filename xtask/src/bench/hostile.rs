//! `cargo xtask bench hostile`: one hostile car against the real twin (twin/examples/
//! bench_hostile.rs): the twin's RSS while it holds unread chunk windows, push p99 to honest cars
//! quiet and under attack, CPU for requests naming a base the car does not own, revocation to
//! session closed. The table goes to `target/bench-hostile.md`.

use std::path::Path;
use std::process::Command;

use super::build::{self, Profile};
use crate::sh::{root, run};

/// `cargo xtask bench hostile` arguments.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Honest cars connected while the hostile one attacks [default: 1000; smoke: 50].
    #[arg(long, value_name = "N")]
    pub cars: Option<usize>,
    /// Unread chunk requests the hostile car holds [default: 1000; smoke: 200].
    #[arg(long, value_name = "N")]
    pub requests: Option<usize>,
    /// Fewer cars and requests on the debug build, and a failure when a bound that does not
    /// depend on timing breaks (what `cargo xtask test` runs).
    #[arg(long)]
    pub smoke: bool,
}

const PACKAGES: &[&str] = &["cardeploy-twin"];
const EXAMPLE: &str = "bench_hostile";

pub fn run_bench(options: &Options) -> anyhow::Result<()> {
    let profile = if options.smoke {
        Profile::Debug
    } else {
        Profile::Measure
    };
    let bins = build::build(profile, PACKAGES, EXAMPLE)?;
    let out = root().join("target/bench-hostile.md");
    let mut cmd = command(&bins);
    cmd.arg("--out").arg(&out);
    if let Some(cars) = options.cars {
        cmd.arg("--cars").arg(cars.to_string());
    }
    if let Some(requests) = options.requests {
        cmd.arg("--requests").arg(requests.to_string());
    }
    if options.smoke {
        cmd.arg("--smoke");
    }
    run(&mut cmd)?;
    println!("table written to {}", out.display());
    Ok(())
}

fn command(bins: &Path) -> Command {
    let mut cmd = Command::new(bins.join("examples").join(EXAMPLE));
    cmd.arg("--twin").arg(bins.join("cardeploy-twin"));
    cmd
}

/// The smoke run on binaries already built in `bins`; the example asserts the bounds.
pub fn smoke(bins: &Path) -> anyhow::Result<()> {
    run(command(bins).arg("--smoke"))
}
