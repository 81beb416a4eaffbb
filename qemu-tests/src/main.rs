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
    /// power-cut. Later suites start from where earlier ones left the car.
    suites: Vec<String>,
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
        cardeploy_qemu_tests::suites::run(&image, &bin, &work, &cli.suites)
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cardeploy-qemu-tests: {e:#}");
            ExitCode::FAILURE
        }
    }
}
