use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// cardeploy-qemu-tests: boot the A/B image in qemu-aarch64 and prove updates and rollbacks
/// against a real twin. `cargo xtask qemu-test` builds everything and runs this.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Directory of `cargo xtask image` (layout.json, disk.img, bundles).
    #[arg(long, value_name = "DIR", default_value = "target/image")]
    image: PathBuf,
    /// Where the host binaries are (cardeploy-twin, cardeploy).
    #[arg(long, value_name = "DIR", default_value = "target/debug")]
    bin: PathBuf,
    /// Scratch directory: disks, console logs, the twin's data.
    #[arg(long, value_name = "DIR", default_value = "target/qemu-tests")]
    work: PathBuf,
    /// Suites to run (default: all, in order): boot, update, boot-failure, health-failure,
    /// power-cut, containers. Later suites start from where earlier ones left the car.
    suites: Vec<String>,
    /// Power-cut rounds (default 10, or CARDEPLOY_QEMU_POWER_CUTS). A soak runs many:
    /// `power-cut --rounds 100 --seed 7`.
    #[arg(long, value_name = "N")]
    rounds: Option<u64>,
    /// First seed of the power-cut rounds: round k cuts at a moment drawn from seed + k, so a
    /// failed round is reproduced with the same seed.
    #[arg(long, value_name = "S", default_value_t = 0)]
    seed: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = (|| -> anyhow::Result<()> {
        // The fleet runs commands in its own directory: every path must be absolute.
        let image = cardeploy_qemu_tests::machine::Image::load(&std::path::absolute(&cli.image)?)?;
        let bin = std::path::absolute(&cli.bin)?;
        let work = std::path::absolute(&cli.work)?;
        if work.exists() {
            std::fs::remove_dir_all(&work)?;
        }
        let defaults = cardeploy_qemu_tests::suites::PowerCuts::default();
        let power_cuts = cardeploy_qemu_tests::suites::PowerCuts {
            rounds: cli.rounds.unwrap_or(defaults.rounds),
            seed: cli.seed,
        };
        cardeploy_qemu_tests::suites::run(&image, &bin, &work, &cli.suites, power_cuts)
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cardeploy-qemu-tests: {e:#}");
            ExitCode::FAILURE
        }
    }
}
