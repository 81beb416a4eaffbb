//! The aarch64 runner for tests and benchmarks that start the cross-built agent on this machine:
//! read from cross/config.toml, where `cargo xtask cross` and `cargo run` take it from too.

use std::path::Path;
use std::process::Command;

/// A command that runs the aarch64 program `program` here (`qemu-aarch64-static -L / PROGRAM`
/// as cross/config.toml says today). Panics when the file does not say it: a test cannot run
/// the binary without it.
pub fn aarch64_runner(program: &Path) -> Command {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cross/config.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let config: toml::Table =
        toml::from_str(&text).unwrap_or_else(|e| panic!("{} is not TOML: {e}", path.display()));
    let runner: Vec<&str> = config
        .get("build")
        .and_then(|build| build.get("target"))
        .and_then(toml::Value::as_str)
        .and_then(|target| config.get("target")?.get(target)?.get("runner"))
        .and_then(toml::Value::as_array)
        .map(|list| list.iter().filter_map(toml::Value::as_str).collect())
        .unwrap_or_default();
    let Some((first, rest)) = runner.split_first() else {
        panic!("{} names no runner for its [build] target", path.display());
    };
    let mut cmd = Command::new(first);
    cmd.args(rest).arg(program);
    cmd
}
