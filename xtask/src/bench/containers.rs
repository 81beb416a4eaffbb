//! `cargo xtask bench containers`: containers on the car.
//!
//! - **A container update's bytes on the wire** (agent/examples/bench_container_update.rs): two
//!   aarch64 images from packages nobody here wrote — a Debian 12 arm64 base layer with Python
//!   and an application layer of PyPI aarch64 wheels whose numpy moves a minor version (the
//!   delta bench's `layer-minor` pair) — through the real twin, agent and CLI, against what a
//!   layer-level pull fetches (the changed gzip layers, as docker or k3s would) and the external
//!   tools on the changed layer (zstd `--patch-from`, xdelta3, bsdiff, casync; measured and cached
//!   by the delta bench).
//! - **Rollback time**, from the decision to the previous version serving alone, against the
//!   API-server double with no controller delay, side by side and `strategy: replace`, with the
//!   breakdown (same example).
//! - **The car's registry**: a large layer pulled by skopeo from it against reading and copying
//!   the file, and the memory serving adds (crates/registry/examples/bench_registry.rs).
//!
//! The table goes to `target/bench-containers.md`; the smoke mode (what `cargo xtask test` runs)
//! does all three on small synthetic inputs and the debug build, failing when a figure is not sane.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::Context;
use serde_json::Value;

use super::build::{self, Profile};
use super::delta;
use crate::host;
use crate::sh::{root, run};

/// `cargo xtask bench containers` arguments.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Size of the layer pulled from the registry, MiB [default: 1024; smoke: 16].
    #[arg(long, value_name = "MIB")]
    pub layer_mib: Option<u64>,
    /// Measure the external tools on the application layers again instead of reusing the delta
    /// bench's cached results (bsdiff alone may take 15 minutes).
    #[arg(long)]
    pub fresh: bool,
    /// Small synthetic inputs on the debug build, failing when the update is not far smaller
    /// than a layer pull, a rollback has no breakdown, the registry's copy is not exact or
    /// serving holds the layer in memory (what `cargo xtask test` runs).
    #[arg(long, conflicts_with = "fresh")]
    pub smoke: bool,
}

const REGISTRY_PACKAGES: &[&str] = &["cardeploy-registry"];
const REGISTRY_EXAMPLE: &str = "bench_registry";
const UPDATE_PACKAGES: &[&str] = &["cardeploy-twin", "cardeploy-agent", "cardeploy"];
const UPDATE_EXAMPLE: &str = "bench_container_update";

/// Rollback target: decision to the previous version serving alone.
const ROLLBACK_TARGET_MS: f64 = 3000.0;

pub fn run_bench(options: &Options) -> anyhow::Result<()> {
    host::apt_install("cargo xtask bench containers", &["skopeo", "gzip"])?;
    if options.smoke {
        build::build(Profile::Debug, REGISTRY_PACKAGES, REGISTRY_EXAMPLE)?;
        let bins = build::build(Profile::Debug, UPDATE_PACKAGES, UPDATE_EXAMPLE)?;
        return smoke(&bins);
    }
    let inputs = delta::container_inputs(options.fresh)?;
    build::build(Profile::Measure, REGISTRY_PACKAGES, REGISTRY_EXAMPLE)?;
    let bins = build::build(Profile::Measure, UPDATE_PACKAGES, UPDATE_EXAMPLE)?;
    let work = root().join("target/bench-containers");
    std::fs::create_dir_all(&work)?;

    let update_json = work.join("update.json");
    run(Command::new(bins.join("examples").join(UPDATE_EXAMPLE))
        .arg("--bins")
        .arg(&bins)
        .arg("--work")
        .arg(work.join("run"))
        .arg("--out")
        .arg(&update_json)
        .arg("--base")
        .arg(&inputs.base)
        .arg("--old-app")
        .arg(&inputs.old_app)
        .arg("--new-app")
        .arg(&inputs.new_app))?;
    let _ = std::fs::remove_dir_all(work.join("run"));
    let result: Value = serde_json::from_str(&std::fs::read_to_string(&update_json)?)?;

    let registry_md = work.join("registry.md");
    let mut cmd = registry_command(&bins);
    cmd.arg("--out").arg(&registry_md);
    if let Some(mib) = options.layer_mib {
        cmd.arg("--layer-mib").arg(mib.to_string());
    }
    run(&mut cmd)?;

    let mut md = String::from("# cargo xtask bench containers\n\n");
    md += &update_table(&result, &inputs)?;
    md += &rollback_table(&result)?;
    md += &std::fs::read_to_string(&registry_md)?;
    let out = root().join("target/bench-containers.md");
    std::fs::write(&out, &md)?;
    println!("{md}\ntable written to {}", out.display());
    Ok(())
}

fn registry_command(bins: &Path) -> Command {
    Command::new(bins.join("examples").join(REGISTRY_EXAMPLE))
}

fn bytes(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn check(ok: bool) -> &'static str {
    if ok { "✅" } else { "❌" }
}

/// The update's bytes against a layer pull and the tools on the changed layer.
fn update_table(result: &Value, inputs: &delta::ContainerInputs) -> anyhow::Result<String> {
    let update = &result["update"];
    let wire = bytes(&update["wire_bytes"]);
    let pull = bytes(&update["layer_pull_bytes"]);
    let mut md = format!(
        "## A container update: Debian 12 arm64 base + Python application layer, numpy 2.1 → 2.2\n\n\
         Base layer {} B (unchanged), application layer {} B → {} B uncompressed; image v2 {} B as \
         gzip layers. Provenance: `{}` and `target/bench-delta/base-python/provenance.txt`.\n\n\
         | how | bytes on the wire | note |\n|---|---:|---|\n\
         | layer-level pull (docker, k3s) | {pull} | the blobs v1 does not have: manifest, config, the new application layer gzip -6 |\n\
         | **cardeploy** | **{wire}** | everything through a proxy before the twin (TLS, RSocket, indexes, frames); the twin made the deltas ahead ({:.1} s); desired → committed {:.1} s |\n",
        std::fs::metadata(&inputs.base)?.len(),
        std::fs::metadata(&inputs.old_app)?.len(),
        std::fs::metadata(&inputs.new_app)?.len(),
        bytes(&update["image_bytes"]),
        inputs.provenance.display(),
        update["ahead_secs"].as_f64().unwrap_or(0.0),
        update["secs"].as_f64().unwrap_or(0.0),
    );
    let tools: Vec<&Value> = inputs
        .tools
        .iter()
        .filter(|r| r["wire_bytes"].as_u64().is_some() && r["tool"] != "full")
        .collect();
    for r in &tools {
        let _ = writeln!(
            md,
            "| {} (the application layer alone) | {} | apply peak RSS {} MiB |",
            r["tool"].as_str().unwrap_or("?"),
            bytes(&r["wire_bytes"]),
            r["peak_rss_kib"]
                .as_u64()
                .map_or("-".into(), |k| format!("{:.0}", k as f64 / 1024.0)),
        );
    }
    let best = tools
        .iter()
        .min_by_key(|r| bytes(&r["wire_bytes"]))
        .context("the delta bench's tools gave no result")?;
    let best_bytes = bytes(&best["wire_bytes"]).max(1);
    let fewer = pull as f64 / wire.max(1) as f64;
    let ratio = wire as f64 / best_bytes as f64;
    let _ = write!(
        md,
        "\nTargets:\n\
         - at least 5× fewer bytes than the layer-level pull: {fewer:.1}× fewer {}\n\
         - within 1.25× of the best tool at any memory ({} with {best_bytes} B on the layer alone, \
         without the manifest and config cardeploy's figure includes): {ratio:.2}× {}\n\n",
        check(fewer >= 5.0),
        best["tool"].as_str().unwrap_or("?"),
        check(ratio <= 1.25),
    );
    Ok(md)
}

/// Each rollback's breakdown, from the double's journal.
fn rollback_table(result: &Value) -> anyhow::Result<String> {
    let mut md = String::from(
        "## Rollback time (API-server double, no controller delay)\n\n\
         | workload | decision → first cleanup request ms | first request → previous serving alone ms | **decision → previous serving alone ms** | cleanup requests | failed version applied → decision ms | desired → car reports rolled-back s |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut worst: f64 = 0.0;
    for r in result["rollbacks"]
        .as_array()
        .context("the example wrote no rollbacks")?
    {
        let b = &r["breakdown"];
        let total = b["decision_to_serving_ms"]
            .as_f64()
            .unwrap_or(f64::INFINITY);
        worst = worst.max(total);
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.1} | **{total:.1}** | {} | {:.1} | {:.2} |",
            r["what"].as_str().unwrap_or("?"),
            b["decision_to_first_request_ms"].as_f64().unwrap_or(0.0),
            b["first_request_to_serving_ms"].as_f64().unwrap_or(0.0),
            b["cleanup_requests"],
            b["detect_ms"].as_f64().unwrap_or(0.0),
            r["desired_to_reported_secs"].as_f64().unwrap_or(0.0),
        );
    }
    let _ = write!(
        md,
        "\nTarget: decision → previous version serving ≤ 3 s: worst {worst:.1} ms {}\n\n\
         The decision is the agent's health read that showed the crash loop (the double shows \
         CrashLoopBackOff at once; a real kubelet takes its back-off first, which is detection, \
         not rollback); \"serving alone\" is the double's view: the previous version's Deployment \
         has every replica Ready and no pod of the failed version is left.\n\n",
        check(worst <= ROLLBACK_TARGET_MS),
    );
    Ok(md)
}

/// The smoke runs on the examples already built in `bins`: the registry's (it asserts what
/// timing cannot change) and the update's on synthetic layers, checked here.
pub fn smoke(bins: &Path) -> anyhow::Result<()> {
    run(registry_command(bins)
        .arg("--smoke")
        .arg("--out")
        .arg(root().join("target/bench-containers-smoke.md")))?;
    let out = root().join("target/bench-containers-smoke.json");
    run(Command::new(bins.join("examples").join(UPDATE_EXAMPLE))
        .arg("--smoke")
        .arg("--bins")
        .arg(bins)
        .arg("--work")
        .arg(root().join("target/bench-containers-smoke"))
        .arg("--out")
        .arg(&out))?;
    let _ = std::fs::remove_dir_all(root().join("target/bench-containers-smoke"));
    let result: Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    let (wire, pull) = (
        bytes(&result["update"]["wire_bytes"]),
        bytes(&result["update"]["layer_pull_bytes"]),
    );
    anyhow::ensure!(
        wire > 0 && wire * 5 <= pull,
        "the synthetic update took {wire} B on the wire against a layer pull of {pull} B: \
         it should be far smaller (three files changed a little, one added)"
    );
    let rollbacks = result["rollbacks"]
        .as_array()
        .context("the example wrote no rollbacks")?;
    anyhow::ensure!(rollbacks.len() == 2, "two rollbacks expected: {result}");
    for r in rollbacks {
        let b = &r["breakdown"];
        let total = b["decision_to_serving_ms"].as_f64();
        let first = b["decision_to_first_request_ms"].as_f64();
        anyhow::ensure!(
            matches!((first, total), (Some(f), Some(t)) if f >= 0.0 && t >= f)
                && bytes(&b["cleanup_requests"]) >= 1,
            "a rollback without a sane breakdown: {r}"
        );
    }
    println!(
        "bench containers smoke: update {wire} B vs layer pull {pull} B; rollbacks {}",
        rollbacks
            .iter()
            .map(|r| format!(
                "{} {:.1} ms",
                r["what"].as_str().unwrap_or("?"),
                r["breakdown"]["decision_to_serving_ms"]
                    .as_f64()
                    .unwrap_or(0.0)
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
