//! `cargo xtask qemu-test`: the qemu-aarch64 system tests (qemu-tests/) on the image of
//! `cargo xtask image`, with the host binaries they drive.

use std::path::Path;
use std::process::Command;

use crate::image;
use crate::sh::{cargo, root, run};

/// The image (which builds the aarch64 agent once), then the suites. `args` go to the harness
/// as they are: suite names, and its flags (`cardeploy-qemu-tests --help`).
pub fn qemu_test(args: &[String]) -> anyhow::Result<()> {
    let image = image::main(&image::Options::default())?;
    suites(&image, args)
}

/// Builds the host binaries the suites drive and runs the suites against the image in `image`.
pub fn suites(image: &Path, args: &[String]) -> anyhow::Result<()> {
    run(cargo().args([
        "build",
        "--locked",
        "-p",
        "cardeploy-twin",
        "-p",
        "cardeploy",
        "-p",
        "cardeploy-qemu-tests",
    ]))?;
    let bin = root().join("target/debug");
    run(Command::new(bin.join("cardeploy-qemu-tests"))
        .arg("--image")
        .arg(image)
        .arg("--bin")
        .arg(&bin)
        .arg("--work")
        .arg(root().join("target/qemu-tests"))
        .args(args))
}
