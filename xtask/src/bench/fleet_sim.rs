//! `cargo xtask fleet-sim`: thousands of simulated cars against the real twin, through a canary
//! and waves, a halt, a time-to-live and a first-car measurement with real agents
//! (agent/examples/fleet_sim.rs says what is real and what is simulated; docs/fleet-sim.md how to
//! read the results). Writes `summary.md`, `timeline.json` and the plot `timeline.png` under
//! `target/fleet-sim/`.

use std::path::Path;
use std::process::Command;

use super::build::{self, Profile};
use crate::sh::{RAISE_FDS, root, run};

/// `cargo xtask fleet-sim` arguments.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Simulated cars [default: 10000; smoke: 300].
    #[arg(long, value_name = "N")]
    pub cars: Option<usize>,
    /// How much faster than a car on the road the simulated steps run (fetch, install, reboot,
    /// health checks, time switched off); soak times are scaled the same way.
    #[arg(long, value_name = "X", default_value_t = 10.0)]
    pub speed: f64,
    /// Share of new slots failing their health checks once the halt scenario's second wave
    /// starts.
    #[arg(long, value_name = "P", default_value_t = 0.5)]
    pub fault_rate: f64,
    /// Seed of the fleet's attributes and the cars' draws.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,
    /// A small fleet with short times on the debug build, failing when a scenario does not hold
    /// (what `cargo xtask test` runs).
    #[arg(long)]
    pub smoke: bool,
}

const PACKAGES: &[&str] = &["cardeploy-twin", "cardeploy-agent", "cardeploy"];
const EXAMPLE: &str = "fleet_sim";

pub fn main(options: &Options) -> anyhow::Result<()> {
    let profile = if options.smoke {
        Profile::Debug
    } else {
        Profile::Measure
    };
    let bins = build::build(profile, PACKAGES, EXAMPLE)?;
    simulate(&bins, options)
}

/// The smoke run on binaries already built in `bins`.
pub fn smoke(bins: &Path) -> anyhow::Result<()> {
    simulate(
        bins,
        &Options {
            cars: None,
            speed: 10.0,
            fault_rate: 0.5,
            seed: 1,
            smoke: true,
        },
    )
}

fn simulate(bins: &Path, options: &Options) -> anyhow::Result<()> {
    let out = root().join(if options.smoke {
        "target/fleet-sim-smoke"
    } else {
        "target/fleet-sim"
    });
    std::fs::create_dir_all(&out)?;
    let mut command = format!(
        "{RAISE_FDS} && exec {} --twin {} --cli {} --agent {} --out {} --speed {} --fault-rate {} --seed {}",
        bins.join("examples").join(EXAMPLE).display(),
        bins.join("cardeploy-twin").display(),
        bins.join("cardeploy").display(),
        bins.join("cardeploy-agent").display(),
        out.display(),
        options.speed,
        options.fault_rate,
        options.seed,
    );
    if let Some(cars) = options.cars {
        command += &format!(" --cars {cars}");
    }
    if options.smoke {
        command += " --smoke";
    }
    // 10,000 cars hold 10,000 connections on each side: the descriptor limit goes to the hard one.
    run(Command::new("bash").args(["-c", &command]))?;
    let png = out.join("timeline.png");
    super::plot::png("plot_fleet.py", &out.join("timeline.json"), &png)?;
    println!(
        "summary:  {}\ntimeline: {}\nplot:     {}",
        out.join("summary.md").display(),
        out.join("timeline.json").display(),
        png.display()
    );
    Ok(())
}
