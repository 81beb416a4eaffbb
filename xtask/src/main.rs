//! `cargo xtask`: the project's own commands. Each installs what it needs (apt packages, the
//! aarch64 toolchain, a Python venv) so that a fresh Debian 12 machine runs them as they are.
//! `cargo xtask --help` lists them; this file only parses the command line and dispatches.
//!
//! Modules, each using only some of those after it in this list (the `layering` test fails on
//! any import cycle):
//! [`ci`] (the test command) · [`demo`] · [`qemu`] · [`image`] · [`bench`](mod@bench) · [`yocto`] ·
//! [`fuzz`] · [`doc_check`] · [`gpsd`] (gpsfake and a recorded drive, for the position test) ·
//! [`debian`] (Debian package fetching, shared by image, bench and gpsd) · [`host`] (apt, root,
//! venvs) · [`cross`] (cross/) · [`synthetic`] · [`sh`] (running commands).

mod bench;
mod ci;
mod cross;
mod debian;
mod demo;
mod doc_check;
mod fuzz;
mod gpsd;
mod host;
mod image;
#[cfg(test)]
mod layering;
mod postgres;
mod qemu;
mod s3;
mod sh;
mod synthetic;
mod yocto;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// cardeploy's own commands: build, test, demo, benchmark.
///
/// Every command installs what it needs on a Debian 12 machine (apt packages, the aarch64
/// toolchain of cross/, Python venvs in .venv*), so run them as root on a fresh machine.
#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand, Debug)]
enum Task {
    /// The main job: a twin, a car, signed releases end to end, an OS image as deltas against
    /// the running slot, a signed downgrade refused; then a qemu-aarch64 car that takes a signed
    /// OS release through a real reboot and rolls a broken one back by itself.
    Demo,
    /// Every test: fmt, the doc check, the Yocto layer's checks, clippy -D warnings, rustdoc,
    /// unit and integration tests (a real RAUC on a private D-Bus, rsocket-py interop, the
    /// aarch64 agent under qemu-user), every bench's smoke run, the qemu-aarch64 system suites,
    /// and every fuzz target for 20 s. What CI runs.
    Test,
    /// The aarch64 agent: a stripped release build with the toolchain and settings in cross/
    /// (cross/README.md says how to do it by hand).
    Cross,
    /// The qemu car's aarch64 A/B disk image and its RAUC bundles, in target/image
    /// (images/README.md).
    Image(image::Options),
    /// The qemu-aarch64 system suites (boot, update, boot-failure, health-failure, power-cut) on
    /// a fresh image, against a real twin on the host.
    QemuTest {
        /// Suites to run (default: all, in order) and the harness's own flags, passed on as
        /// they are (see `target/debug/cardeploy-qemu-tests --help`).
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "SUITE|FLAG"
        )]
        args: Vec<String>,
    },
    /// Install the prerequisites only (apt packages, the aarch64 toolchain, the rsocket-py venv,
    /// gpsfake and a recorded drive in target/gpsd for the position test).
    Deps,
    /// Rewrite meta-cardeploy's crate list (cardeploy-agent-crates.inc) from Cargo.lock, after a
    /// dependency change.
    CratesInc {
        /// Only check that the list is fresh; fail when it is not.
        #[arg(long)]
        check: bool,
    },
    /// The Yocto layer's checks alone: crate list fresh, oelint-adv, kas schema.
    YoctoLint,
    /// The doc check alone: links and repository paths in the docs exist, and nothing cites a
    /// file outside the repository or an issue number.
    DocCheck,
    /// `bitbake -p` and `bitbake -g cardeploy-image` against the real wrynose layers, offline
    /// (meta-cardeploy/README.md, "Validate the layer offline").
    YoctoParse {
        /// A directory of git checkouts of bitbake, openembedded-core, meta-openembedded,
        /// meta-virtualization and meta-rauc at the commits images/kas/cardeploy-qemuarm64.yml
        /// names.
        #[arg(long, value_name = "DIR")]
        layers: PathBuf,
        /// The user bitbake runs as (it refuses root).
        #[arg(long, value_name = "NAME", default_value = "yocto")]
        user: String,
    },
    /// Every fuzz target on the nightly toolchain (cargo-fuzz installed if missing); findings in
    /// fuzz/artifacts/.
    Fuzz {
        /// How long each target runs.
        #[arg(long, value_name = "N", default_value_t = 60)]
        seconds: u64,
    },
    /// Regenerate the signed-metadata threat fixtures in tests/data from fixed seeds (commit
    /// them; agent/tests/threats.rs compares).
    Fixtures,
    /// A fleet deployment on thousands of simulated cars against the real twin: a 1 % canary then
    /// waves of 10/50/100 %, a halt when cars start failing, a time-to-live with parked cars,
    /// and a first car against a later one with real agents. Summary, timeline and plot in
    /// target/fleet-sim/ (docs/fleet-sim.md).
    FleetSim(bench::fleet_sim::Options),
    /// Benchmarks: figures measured on this machine, written to target/. Each has --smoke, the
    /// quick run `cargo xtask test` makes so a bench that breaks fails CI.
    #[command(subcommand)]
    Bench(bench::Bench),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.task {
        Task::Test => ci::test(),
        Task::Demo => demo::main(),
        Task::Cross => cross::agent().map(|_| ()),
        Task::Image(options) => image::main(options).map(|dir| {
            println!("image: {}", dir.display());
        }),
        Task::QemuTest { args } => qemu::qemu_test(args),
        Task::Deps => host::deps(true).and_then(|()| gpsd::prepare().map(|_| ())),
        Task::CratesInc { check } => yocto::crates_inc(*check),
        Task::YoctoLint => yocto::lint(),
        Task::DocCheck => doc_check::check(&sh::root()),
        Task::YoctoParse { layers, user } => yocto::parse(layers, user),
        Task::Fuzz { seconds } => fuzz::fuzz(*seconds),
        Task::Fixtures => sh::run(
            sh::cargo()
                .args([
                    "run",
                    "--locked",
                    "-q",
                    "-p",
                    "cardeploy-testkit",
                    "--example",
                    "threat_fixtures",
                    "--",
                ])
                .arg(sh::root().join("tests/data")),
        ),
        Task::FleetSim(options) => bench::fleet_sim::main(options),
        Task::Bench(bench) => bench::run(bench),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }

    #[test]
    fn documented_command_lines_parse() {
        for line in [
            "test",
            "demo",
            "cross",
            "image",
            "image --agent target/a",
            "qemu-test",
            "qemu-test update power-cut",
            "qemu-test power-cut --rounds 100 --seed 7",
            "deps",
            "crates-inc --check",
            "yocto-lint",
            "doc-check",
            "yocto-parse --layers /srv/layers",
            "fuzz --seconds 20",
            "fixtures",
            "bench link",
            "bench link --cars 1000,10000",
            "bench link --smoke",
            "bench delta --fresh",
            "bench delta --smoke",
            "bench hostile --cars 10 --requests 20 --smoke",
            "fleet-sim",
            "fleet-sim --cars 10000 --speed 10",
            "fleet-sim --smoke",
        ] {
            let args = std::iter::once("cargo-xtask").chain(line.split(' '));
            if let Err(e) = Cli::try_parse_from(args) {
                panic!("`cargo xtask {line}` does not parse: {e}");
            }
        }
    }

    #[test]
    fn qemu_test_passes_its_arguments_on_as_they_are() {
        let cli = Cli::try_parse_from(["x", "qemu-test", "power-cut", "--rounds", "3"]).unwrap();
        let Task::QemuTest { args } = cli.task else {
            panic!("not qemu-test: {cli:?}");
        };
        assert_eq!(args, ["power-cut", "--rounds", "3"]);
    }

    #[test]
    fn an_unknown_flag_is_refused() {
        assert!(Cli::try_parse_from(["x", "bench", "delta", "--fast"]).is_err());
        assert!(Cli::try_parse_from(["x", "image", "--agnet", "a"]).is_err());
    }
}
