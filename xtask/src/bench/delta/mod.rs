//! `cargo xtask bench delta`: bytes on the wire, time and receiving-side memory of an update,
//! cardeploy against the tools people use today, on real data (Debian arm64 root filesystems,
//! PyPI aarch64 wheels in an OCI layer) that [`inputs`] downloads and builds itself.
//!
//! Per pair: the external tools ([`tools`](mod@tools); their results are cached in
//! `target/bench-delta/<pair>/tools.json` keyed by the inputs' recipe and sizes, because bsdiff
//! alone may run 15 minutes per pair — `--fresh` measures again), then cardeploy through the real
//! twin and agent binaries ([`cardeploy`]). Writes `results.md`,
//! `results.json` and the plot `delta.png` under `target/bench-delta/`.

mod cardeploy;
mod inputs;
mod smoke;
mod tools;

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{Value, json};

use super::build::{self, Profile};
use crate::sh::root;
use inputs::{Pair, build_inputs};
use tools::{ToolRun, measure_tools};

pub use smoke::smoke;

/// `cargo xtask bench delta` arguments.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Measure the external tools again instead of reusing their cached results (bsdiff alone
    /// may take 15 minutes per pair).
    #[arg(long)]
    pub fresh: bool,
    /// A small synthetic pair made here (no download, no external tools) through the debug
    /// build, failing when a figure is not sane (what `cargo xtask test` runs).
    #[arg(long, conflicts_with = "fresh")]
    pub smoke: bool,
}

/// Receiving-side memory a tool may use and still count as "applies within 64 MiB".
const MEMORY_BOUND_KIB: u64 = 64 * 1024;

fn tool_json(r: &ToolRun) -> Value {
    json!({
        "tool": r.tool, "wire_bytes": r.wire_bytes, "encode_secs": r.encode_secs,
        "apply_secs": r.apply_secs, "peak_rss_kib": r.apply_peak_rss_kib, "note": r.note,
    })
}

fn tools_key(pair: &Pair) -> anyhow::Result<String> {
    let recipe =
        std::fs::read_to_string(pair.provenance.with_file_name("recipe.txt")).unwrap_or_default();
    let sizes = (
        std::fs::metadata(&pair.old)?.len(),
        std::fs::metadata(&pair.new)?.len(),
    );
    let timeout = std::env::var("CARDEPLOY_BENCH_BSDIFF_TIMEOUT_SECS").unwrap_or_default();
    Ok(format!("{recipe}|{sizes:?}|bsdiff timeout {timeout}"))
}

fn tools(pair: &Pair, work: &Path, fresh: bool) -> anyhow::Result<Vec<Value>> {
    let cache = pair.new.with_file_name("tools.json");
    let key = tools_key(pair)?;
    if !fresh
        && let Ok(text) = std::fs::read_to_string(&cache)
        && let Ok(cached) = serde_json::from_str::<Value>(&text)
        && cached["key"] == key
        && let Some(rows) = cached["rows"].as_array()
    {
        eprintln!(
            "{}: external tools from {} (use --fresh to measure again)",
            pair.name,
            cache.display()
        );
        return Ok(rows.clone());
    }
    let rows: Vec<Value> = measure_tools(pair, work)?.iter().map(tool_json).collect();
    std::fs::write(
        &cache,
        serde_json::to_string_pretty(&json!({"key": key, "rows": rows}))?,
    )?;
    Ok(rows)
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("-".into(), |k| format!("{:.0}", k as f64 / 1024.0))
}

/// What `cargo xtask bench containers` measures a container update on: a Debian arm64 base layer
/// and the `layer-minor` application layers (OLD, NEW) built here, with the external tools'
/// results on the application layers (cached as this bench caches them).
pub struct ContainerInputs {
    pub base: PathBuf,
    pub old_app: PathBuf,
    pub new_app: PathBuf,
    pub provenance: PathBuf,
    pub tools: Vec<Value>,
}

pub fn container_inputs(fresh: bool) -> anyhow::Result<ContainerInputs> {
    let work = root().join("target/bench-delta");
    let python = inputs::prerequisites()?;
    std::fs::create_dir_all(&work)?;
    let base = inputs::base_layer(&work)?;
    let pair = inputs::layer_minor(&work, &python)?;
    let tools = tools(&pair, &work, fresh)?;
    Ok(ContainerInputs {
        base,
        old_app: pair.old,
        new_app: pair.new,
        provenance: pair.provenance,
        tools,
    })
}

pub fn run_bench(options: &Options) -> anyhow::Result<()> {
    if options.smoke {
        let bins = build::build(Profile::Debug, cardeploy::PACKAGES, cardeploy::EXAMPLE)?;
        return smoke(&bins);
    }
    let work = root().join("target/bench-delta");
    let pairs = build_inputs(&work)?;
    let bins = build::build(Profile::Measure, cardeploy::PACKAGES, cardeploy::EXAMPLE)?;

    let mut md = String::from("# cargo xtask bench delta\n\n");
    let mut summary = String::new();
    let mut plot_pairs = Vec::new();
    for pair in &pairs {
        let rows = tools(pair, &work, options.fresh)?;
        let ours = cardeploy::run(pair, &bins, &work)?;
        let full = rows
            .iter()
            .find(|r| r["tool"] == "full")
            .and_then(|r| r["wire_bytes"].as_u64())
            .context("the full transfer row is missing")?;
        let mut all = rows.clone();
        let first = &ours["first"];
        let cached = &ours["cached"];
        all.push(json!({
            "tool": "cardeploy (first car: deltas made ahead)", "wire_bytes": first["wire_bytes"],
            "encode_secs": ours["push_new_secs"].as_f64().unwrap_or(0.0)
                + first["ahead_secs"].as_f64().unwrap_or(0.0),
            "apply_secs": first["secs"], "peak_rss_kib": first["peak_rss_kib"],
            "note": "seeded from the old image; everything on the wire counted (TLS, RSocket, index); encode = push + the twin making the deltas ahead when the release is registered; time = desired state → car reports applied",
        }));
        all.push(json!({
            "tool": "cardeploy (next cars: deltas cached)", "wire_bytes": cached["wire_bytes"],
            "encode_secs": 0.0, "apply_secs": cached["secs"], "peak_rss_kib": cached["peak_rss_kib"],
            "note": "same, the twin serves cached deltas",
        }));
        md += &format!(
            "## {} — {}\n\nOLD {} B, NEW {} B; provenance: `{}`\n\n\
             | tool | bytes on the wire | % of full | encode s | apply s | apply peak RSS MiB | note |\n\
             |---|---:|---:|---:|---:|---:|---|\n",
            pair.name,
            pair.title,
            std::fs::metadata(&pair.old)?.len(),
            std::fs::metadata(&pair.new)?.len(),
            pair.provenance.display()
        );
        for r in &all {
            let wire = r["wire_bytes"].as_u64();
            md += &format!(
                "| {} | {} | {} | {:.1} | {:.1} | {} | {} |\n",
                r["tool"].as_str().unwrap_or("?"),
                wire.map_or("-".into(), |w| w.to_string()),
                wire.map_or("-".into(), |w| format!(
                    "{:.1}",
                    w as f64 * 100.0 / full as f64
                )),
                r["encode_secs"].as_f64().unwrap_or(0.0),
                r["apply_secs"].as_f64().unwrap_or(0.0),
                mib(r["peak_rss_kib"].as_u64()),
                r["note"].as_str().unwrap_or(""),
            );
        }
        // The targets cardeploy set itself against the tools in use (docs/delta.md).
        let ours_wire = first["wire_bytes"].as_u64().unwrap_or(u64::MAX);
        let tools_only: Vec<&Value> = rows
            .iter()
            .filter(|r| r["wire_bytes"].as_u64().is_some())
            .collect();
        let best = tools_only
            .iter()
            .min_by_key(|r| r["wire_bytes"].as_u64())
            .context("no tool produced a result")?;
        let best_bytes = best["wire_bytes"].as_u64().unwrap_or(1);
        // Tools that apply within 64 MiB; a computed model without a measured apply counts too.
        let small: Vec<&&Value> = tools_only
            .iter()
            .filter(|r| {
                r["peak_rss_kib"]
                    .as_u64()
                    .is_none_or(|k| k <= MEMORY_BOUND_KIB)
            })
            .collect();
        let best_small = small
            .iter()
            .min_by_key(|r| r["wire_bytes"].as_u64())
            .context("no tool applies within 64 MiB")?;
        let peak = first["peak_rss_kib"]
            .as_u64()
            .unwrap_or(0)
            .max(cached["peak_rss_kib"].as_u64().unwrap_or(0));
        let size = ours["size"].as_f64().unwrap_or(0.0);
        let goodput = ours["raw_tcp_secs"].as_f64().unwrap_or(0.0)
            / ours["full"]["secs"].as_f64().unwrap_or(f64::INFINITY);
        let check = |ok: bool| if ok { "✅" } else { "❌" };
        let lines = format!(
            "- bytes on the wire ≤ every tool that applies within 64 MiB (best: {} with {} B): {} B {}\n\
             - ≤ 1.25 × the best tool at any memory ({} with {} B → {:.2}×): {}\n\
             - receiving-side peak RSS ≤ 64 MiB: {:.1} MiB {}\n\
             - fetch goodput over loopback vs raw TCP copy: NEW without seed ({:.0} MiB) in {:.2} s vs raw TCP copy in {:.2} s → {:.2}× {} (wire {} B, peak RSS {:.1} MiB)\n",
            best_small["tool"].as_str().unwrap_or("?"),
            best_small["wire_bytes"],
            ours_wire,
            check(ours_wire <= best_small["wire_bytes"].as_u64().unwrap_or(0)),
            best["tool"].as_str().unwrap_or("?"),
            best_bytes,
            ours_wire as f64 / best_bytes as f64,
            check(ours_wire as f64 <= 1.25 * best_bytes as f64),
            peak as f64 / 1024.0,
            check(peak <= MEMORY_BOUND_KIB),
            size / 1048576.0,
            ours["full"]["secs"].as_f64().unwrap_or(0.0),
            ours["raw_tcp_secs"].as_f64().unwrap_or(0.0),
            goodput,
            check(goodput >= 0.7),
            ours["full"]["wire_bytes"],
            ours["full"]["peak_rss_kib"].as_f64().unwrap_or(0.0) / 1024.0,
        );
        md += &format!("\nTargets:\n{lines}\n");
        summary += &format!("**{}**\n{lines}\n", pair.name);
        plot_pairs
            .push(json!({"name": pair.name, "title": pair.title, "full_bytes": full, "rows": all}));
    }
    md += "Method: `cargo xtask bench delta` (docs/delta.md). Bytes on the wire of cardeploy are \
           counted by a TCP proxy in front of the twin: TLS, RSocket frames, the chunk index and \
           every request. Tool encode times run on the same two cores; apply memory is the peak RSS \
           of the applying process (`/usr/bin/time`), cardeploy's is the agent's VmHWM.\n";
    let results = json!({"pairs": plot_pairs});
    std::fs::write(
        work.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(work.join("results.md"), &md)?;
    let png = work.join("delta.png");
    super::plot::png("plot_delta.py", &work.join("results.json"), &png)?;
    println!(
        "{md}\n{summary}\ntable: {}\nplot:  {}",
        work.join("results.md").display(),
        png.display()
    );
    Ok(())
}
