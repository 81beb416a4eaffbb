//! cardeploy's side of a pair: the real twin, agent and CLI binaries driven by
//! agent/examples/bench_delta.rs, which writes its figures as JSON.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::inputs::Pair;
use crate::sh::run as sh;

/// What the example drives, and the example.
pub const PACKAGES: &[&str] = &["cardeploy-twin", "cardeploy-agent", "cardeploy"];
pub const EXAMPLE: &str = "bench_delta";

/// One pair through the binaries in `bins`, with scratch space under `work`; the example's
/// JSON: `first`, `cached` and `full` runs with `wire_bytes`, `secs`, `peak_rss_kib`, and more.
pub fn run(pair: &Pair, bins: &Path, work: &Path) -> anyhow::Result<Value> {
    let out = work.join(&pair.name).join("cardeploy.json");
    std::fs::create_dir_all(work.join(&pair.name))?;
    sh(Command::new(bins.join("examples").join(EXAMPLE))
        .arg("--twin")
        .arg(bins.join("cardeploy-twin"))
        .arg("--agent")
        .arg(bins.join("cardeploy-agent"))
        .arg("--cli")
        .arg(bins.join("cardeploy"))
        .arg("--old")
        .arg(&pair.old)
        .arg("--new")
        .arg(&pair.new)
        .arg("--work")
        .arg(work.join("cardeploy-run"))
        .arg("--out")
        .arg(&out))?;
    let _ = std::fs::remove_dir_all(work.join("cardeploy-run"));
    Ok(serde_json::from_str(&std::fs::read_to_string(&out)?)?)
}
