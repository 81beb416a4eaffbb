//! `cargo xtask bench link`: builds the twin, the agent and the benchmark with optimisations, the
//! aarch64 agent with Debian's toolchain, then runs `agent/examples/bench_link.rs` with a file
//! descriptor limit raised to the hard limit (10,000 cars need 10,000 on each side).

use std::process::Command;

use anyhow::bail;

use crate::{cargo, cross, root, run as sh};

pub fn run(args: &[String]) -> anyhow::Result<()> {
    match args.first().map(String::as_str) {
        Some("link") => link(&args[1..]),
        Some("delta") => crate::bench_delta::run(&args[1..]),
        Some("hostile") => hostile(&args[1..]),
        _ => bail!(
            "usage: cargo xtask bench link [--cars 1000,10000] | bench delta [--fresh] | bench hostile [--cars N] [--requests N] [--smoke]"
        ),
    }
}

/// Build the binaries of `packages` and the agent's benchmark `example` with the `measure`
/// profile in one cargo run; returns `target/measure`.
pub fn measure_build(packages: &[&str], example: &str) -> anyhow::Result<std::path::PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "--locked", "--profile", "measure"]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    sh(cmd.args(["--bins", "--example", example]))?;
    Ok(root().join("target/measure"))
}

fn link(extra: &[String]) -> anyhow::Result<()> {
    let aarch64 = cross()?;
    let dir = measure_build(&["cardeploy-twin", "cardeploy-agent"], "bench_link")?;
    let out = root().join("target/bench-link.md");
    let command = format!(
        "ulimit -n \"$(ulimit -Hn)\" && exec {} --twin {} --agent {} --aarch64-agent {} --out {} {}",
        dir.join("examples/bench_link").display(),
        dir.join("cardeploy-twin").display(),
        dir.join("cardeploy-agent").display(),
        aarch64.display(),
        out.display(),
        extra.join(" ")
    );
    sh(Command::new("bash").args(["-c", &command]))?;
    println!("table written to {}", out.display());
    Ok(())
}

/// `cargo xtask bench hostile`: one hostile car against the real twin (twin/examples/
/// bench_hostile.rs); the table goes to `target/bench-hostile.md`.
fn hostile(extra: &[String]) -> anyhow::Result<()> {
    let dir = measure_build(&["cardeploy-twin"], "bench_hostile")?;
    let out = root().join("target/bench-hostile.md");
    sh(Command::new(dir.join("examples/bench_hostile"))
        .arg("--twin")
        .arg(dir.join("cardeploy-twin"))
        .arg("--out")
        .arg(&out)
        .args(extra))?;
    println!("table written to {}", out.display());
    Ok(())
}

/// The hostile bench in its smoke mode, on the debug build `cargo test` just made: it fails when
/// a bound that does not depend on timing breaks, so the bench cannot rot.
pub fn hostile_smoke() -> anyhow::Result<()> {
    let debug = root().join("target/debug");
    sh(Command::new(debug.join("examples/bench_hostile"))
        .arg("--twin")
        .arg(debug.join("cardeploy-twin"))
        .arg("--smoke"))
}
