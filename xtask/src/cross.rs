//! `cargo xtask cross`: the aarch64 agent, built as cross/README.md says by hand. The target, the
//! compilers and the runner are read from cross/config.toml and the toolchain is installed by
//! cross/install.sh; nothing about the aarch64 build is written down here a second time.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

use crate::sh::{root, run};

/// Debian's cargo (cargo-web, from cross/install.sh). rustup's cargo is first on `PATH`; this one
/// goes with the rustc that cross/config.toml names.
const DEBIAN_CARGO: &str = "/usr/bin/cargo";

fn config_path() -> PathBuf {
    root().join("cross/config.toml")
}

/// cross/config.toml, parsed.
struct Config {
    target: String,
    runner: Vec<String>,
}

fn config() -> anyhow::Result<Config> {
    let path = config_path();
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    parse_config(&text).with_context(|| format!("in {}", path.display()))
}

fn parse_config(text: &str) -> anyhow::Result<Config> {
    let doc: toml::Table = toml::from_str(text)?;
    let target = doc
        .get("build")
        .and_then(|b| b.get("target"))
        .and_then(toml::Value::as_str)
        .context("no [build] target")?
        .to_owned();
    let runner = doc
        .get("target")
        .and_then(|t| t.get(&target))
        .and_then(|t| t.get("runner"))
        .and_then(toml::Value::as_array)
        .with_context(|| format!("no runner list in [target.{target}]"))?
        .iter()
        .map(|v| v.as_str().map(str::to_owned))
        .collect::<Option<Vec<_>>>()
        .context("the runner is not a list of strings")?;
    if runner.is_empty() {
        bail!("the runner of [target.{target}] is empty");
    }
    Ok(Config { target, runner })
}

/// cross/install.sh: the toolchain, installed when something is missing (then as root).
pub fn install() -> anyhow::Result<()> {
    run(&mut Command::new(root().join("cross/install.sh")))
        .context("the aarch64 toolchain is not installed (cross/README.md)")
}

/// A command that runs the aarch64 program `program` on this machine (the runner of
/// cross/config.toml).
pub fn runner(program: &std::path::Path) -> anyhow::Result<Command> {
    let runner = config()?.runner;
    let mut cmd = Command::new(&runner[0]);
    cmd.args(&runner[1..]).arg(program);
    Ok(cmd)
}

/// Installs the toolchain and builds the stripped release agent; returns the binary.
pub fn agent() -> anyhow::Result<PathBuf> {
    install()?;
    let config = config()?;
    run(Command::new(DEBIAN_CARGO)
        .current_dir(root())
        .arg("--config")
        .arg(config_path())
        .args(["build", "--release", "--locked", "-p", "cardeploy-agent"])
        // Both would win over cross/config.toml: rustup sets the first for the cargo that runs
        // xtask, and a RUSTC from the caller's shell is meant for host builds.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC"))?;
    let bin = root()
        .join("target")
        .join(&config.target)
        .join("release/cardeploy-agent");
    let size = std::fs::metadata(&bin)
        .with_context(|| format!("{} was not built", bin.display()))?
        .len();
    println!(
        "aarch64 agent: {} ({:.2} MiB, stripped)",
        bin.display(),
        size as f64 / (1024.0 * 1024.0)
    );
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checked_in_configuration_names_a_target_and_a_runner() {
        let config = config().unwrap();
        assert_eq!(config.target, "aarch64-unknown-linux-gnu");
        assert_eq!(config.runner[0], "qemu-aarch64-static");
    }

    #[test]
    fn a_configuration_without_a_runner_is_refused() {
        let err = parse_config("[build]\ntarget = \"aarch64-unknown-linux-gnu\"\n")
            .err()
            .unwrap();
        assert!(err.to_string().contains("runner"), "{err}");
    }
}
