//! `cargo xtask fuzz --seconds N`: every fuzz target for N seconds on the nightly toolchain
//! (libFuzzer needs it). Findings land in `fuzz/artifacts/<target>/`.

use std::process::Command;

use crate::sh::{cargo, root, run};

/// cargo-fuzz, pinned; installed from crates.io when missing.
const CARGO_FUZZ: &str = "0.13.2";
/// Fuzz targets in `fuzz/fuzz_targets/`.
const FUZZ_TARGETS: &[&str] = &[
    "chunk_index",
    "transit_frame",
    "envelope",
    "release_documents",
    "registry_request",
];

pub fn fuzz(seconds: u64) -> anyhow::Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ));
    if !installed {
        run(cargo().args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ]))?;
    }
    for target in FUZZ_TARGETS {
        run(Command::new("rustup")
            .args(["run", "nightly", "cargo", "fuzz", "run", "--fuzz-dir"])
            .arg(root().join("fuzz"))
            .arg("--target-dir")
            .arg(root().join("target/fuzz"))
            .arg(target)
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-rss_limit_mb=1024",
            ])
            .env_remove("RUSTUP_TOOLCHAIN")
            .current_dir(root()))?;
    }
    Ok(())
}
