//! The binaries a bench drives, built the way it needs them.

use std::path::PathBuf;

use crate::sh::{cargo, root, run};

/// How a bench's binaries are built.
#[derive(Clone, Copy, Debug)]
pub enum Profile {
    /// The `measure` profile (optimised like a release, quicker to build): for the figures.
    Measure,
    /// The debug build `cargo test` makes: for smoke runs, which check that a bench works end to
    /// end, not how fast.
    Debug,
}

/// Builds the binaries of `packages` and the benchmark `example` in one cargo run; returns the
/// directory holding them (`examples/` below it).
pub fn build(profile: Profile, packages: &[&str], example: &str) -> anyhow::Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "--locked"]);
    if let Profile::Measure = profile {
        cmd.args(["--profile", "measure"]);
    }
    for p in packages {
        cmd.args(["-p", p]);
    }
    run(cmd.args(["--bins", "--example", example]))?;
    Ok(dir(profile))
}

/// Where `build` puts the binaries of `profile`.
pub fn dir(profile: Profile) -> PathBuf {
    root().join(match profile {
        Profile::Measure => "target/measure",
        Profile::Debug => "target/debug",
    })
}
