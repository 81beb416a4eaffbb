//! `cargo xtask bench fleet`: the twin beyond one machine (twin/examples/bench_fleet.rs) —
//! several instances on one PostgreSQL database (a server of the run's own, as the tests use),
//! 10,000 / 50,000 / 100,000 simulated connected cars in child processes: memory per idle car,
//! desired-state push latency, a fleet-wide push, the PostgreSQL load, and the reconnect storm
//! after every instance restarts. Table in target/bench-fleet.md, the curve of cost against
//! fleet size in target/bench-fleet.png.
//!
//! A process here may hold 20,000 open files at most (the hard limit, which the machine does not
//! let even root raise), so both sides are spread: one twin instance per `--per-instance` cars,
//! one car process per 15,000. Runs with the limit raised as far as it goes
//! ([`crate::sh::RAISE_FDS`]).

use std::path::Path;
use std::process::Command;

use super::build::{self, Profile};
use super::plot;
use crate::postgres;
use crate::sh::{RAISE_FDS, root, run};

/// `cargo xtask bench fleet` arguments.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Connected cars at each measuring point, comma-separated (cumulative).
    #[arg(long, value_name = "N,N,...", default_value = "10000,50000,100000")]
    pub cars: String,
    /// Cars per twin instance: the instances are the largest point divided by this.
    #[arg(long, value_name = "N", default_value_t = 15_000)]
    pub per_instance: usize,
    /// 300 cars on two instances and two car processes, on the debug build, failing when a
    /// figure is not sane (what `cargo xtask test` runs).
    #[arg(long)]
    pub smoke: bool,
}

const PACKAGES: &[&str] = &["cardeploy-twin"];
const EXAMPLE: &str = "bench_fleet";

pub fn run_bench(options: &Options) -> anyhow::Result<()> {
    if options.smoke {
        let bins = build::build(Profile::Debug, PACKAGES, EXAMPLE)?;
        return smoke(&bins);
    }
    let bins = build::build(Profile::Measure, PACKAGES, EXAMPLE)?;
    let pg = postgres::start()?;
    let out = root().join("target/bench-fleet.md");
    let json = root().join("target/bench-fleet.json");
    let command = format!(
        "{RAISE_FDS} && exec {} --twin {} --postgres {} --cars {} --per-instance {} --out {} --json {}",
        bins.join("examples").join(EXAMPLE).display(),
        bins.join("cardeploy-twin").display(),
        pg.url,
        options.cars,
        options.per_instance,
        out.display(),
        json.display(),
    );
    run(Command::new("bash").args(["-c", &command]))?;
    let png = root().join("target/bench-fleet.png");
    plot::png("plot_fleet_scale.py", &json, &png)?;
    println!(
        "table written to {}, plot to {}",
        out.display(),
        png.display()
    );
    Ok(())
}

/// The smoke run on binaries already built in `bins`, with a PostgreSQL of its own; the example
/// asserts the figures.
pub fn smoke(bins: &Path) -> anyhow::Result<()> {
    let pg = postgres::start()?;
    let command = format!(
        "{RAISE_FDS} && exec {} --twin {} --postgres {} --smoke",
        bins.join("examples").join(EXAMPLE).display(),
        bins.join("cardeploy-twin").display(),
        pg.url,
    );
    run(Command::new("bash").args(["-c", &command]))
}
