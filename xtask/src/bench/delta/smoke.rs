//! `cargo xtask bench delta --smoke`: the cardeploy side of the bench end to end on a small pair
//! made here, so the bench cannot break unnoticed. No download and no external tool: the pair is
//! [`synthetic`]'s stand-in image (4 MiB) and its security update, the same bytes every run.
//!
//! The figures are checked for sanity only ([`Figures::check`]). Because the pair and the chunk
//! boundaries are deterministic, so are the bytes cardeploy sends for it: `first_wire` is the
//! figure to hold against a recorded baseline, in [`Figures::check`] beside the sanity checks.

use std::path::Path;

use anyhow::{Context, bail, ensure};
use serde_json::Value;

use super::cardeploy;
use super::inputs::Pair;
use crate::sh::{fresh_dir, root};
use crate::synthetic;

/// Big enough for a few dozen chunks, small enough for the debug build to push and fetch it
/// three times in well under a minute.
const IMAGE_BYTES: usize = 4 << 20;

/// The figures of one smoke run (bytes everything included: TLS, RSocket, the chunk index).
#[derive(Debug)]
struct Figures {
    /// The first car, seeded with OLD: deltas made while it fetches.
    first_wire: u64,
    /// The second car, seeded alike: the twin serves the deltas it cached.
    cached_wire: u64,
    /// The third car, without a seed: NEW as whole compressed chunks.
    full_wire: u64,
}

impl Figures {
    fn read(result: &Value) -> anyhow::Result<Self> {
        let wire = |run: &str| {
            let value = &result[run];
            ensure!(
                value["secs"].as_f64().is_some_and(|s| s > 0.0),
                "{run}: no time measured: {value}"
            );
            ensure!(
                value["peak_rss_kib"].as_u64().is_some_and(|k| k > 0),
                "{run}: no agent memory measured: {value}"
            );
            value["wire_bytes"]
                .as_u64()
                .with_context(|| format!("{run}: no wire_bytes in {value}"))
        };
        Ok(Self {
            first_wire: wire("first")?,
            cached_wire: wire("cached")?,
            full_wire: wire("full")?,
        })
    }

    /// What must hold whatever the delta engine's tuning: a seeded car fetches far less than a
    /// car without a seed (the update touches about 50 KB of 4 MiB), and cached deltas are no
    /// bigger than the ones made on demand.
    fn check(&self) -> anyhow::Result<()> {
        if self.full_wire < 64 * 1024 {
            bail!(
                "a car without a seed fetched {} B for a 4 MiB image: it cannot have fetched it",
                self.full_wire
            );
        }
        if self.first_wire * 4 > self.full_wire {
            bail!(
                "the seeded car fetched {} B, more than a quarter of the {} B a car without a \
                 seed fetched: deltas against the running version are not working",
                self.first_wire,
                self.full_wire
            );
        }
        // A second car's session costs the same handshake and index; a few per cent of slack
        // for TLS records cut differently.
        if self.cached_wire > self.first_wire + self.first_wire / 20 {
            bail!(
                "the second car fetched {} B from the delta cache, more than the {} B of the \
                 first car",
                self.cached_wire,
                self.first_wire
            );
        }
        Ok(())
    }
}

/// The fixed pair, written under `dir` (made again every run: it takes milliseconds).
fn pair(dir: &Path) -> anyhow::Result<Pair> {
    fresh_dir(dir)?;
    let old = synthetic::image(IMAGE_BYTES);
    let new = synthetic::security_update(&old);
    let pair = Pair {
        name: "smoke".into(),
        title: "synthetic 4 MiB image and its security update".into(),
        old: dir.join("old.img"),
        new: dir.join("new.img"),
        provenance: dir.join("provenance.txt"),
    };
    std::fs::write(&pair.old, old)?;
    std::fs::write(&pair.new, new)?;
    std::fs::write(
        &pair.provenance,
        "xtask/src/synthetic.rs: image(4 MiB) and security_update(image)\n",
    )?;
    Ok(pair)
}

/// The smoke run on binaries already built in `bins`.
pub fn smoke(bins: &Path) -> anyhow::Result<()> {
    let work = root().join("target/bench-delta-smoke");
    let pair = pair(&work.join("pair"))?;
    let result = cardeploy::run(&pair, bins, &work)?;
    let figures = Figures::read(&result)?;
    figures.check()?;
    println!(
        "bench delta --smoke: figures are sane: seeded car {} B, from the delta cache {} B, \
         without a seed {} B",
        figures.first_wire, figures.cached_wire, figures.full_wire
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(first: u64, cached: u64, full: u64) -> Figures {
        Figures {
            first_wire: first,
            cached_wire: cached,
            full_wire: full,
        }
    }

    #[test]
    fn deltas_that_save_nothing_fail_the_check() {
        assert!(figures(90_000, 90_000, 1_000_000).check().is_ok());
        assert!(figures(400_000, 400_000, 1_000_000).check().is_err());
    }

    #[test]
    fn a_cache_that_sends_more_fails_the_check() {
        assert!(figures(90_000, 120_000, 1_000_000).check().is_err());
    }

    #[test]
    fn a_run_without_figures_is_refused() {
        let result = serde_json::json!({"first": {"wire_bytes": 1, "secs": 0.5}});
        assert!(Figures::read(&result).is_err());
    }

    #[test]
    fn the_pair_is_the_same_every_time() {
        let dir = tempfile_dir();
        let a = pair(&dir.join("a")).unwrap();
        let b = pair(&dir.join("b")).unwrap();
        assert_eq!(
            std::fs::read(&a.new).unwrap(),
            std::fs::read(&b.new).unwrap()
        );
        assert_ne!(
            std::fs::read(&a.old).unwrap(),
            std::fs::read(&a.new).unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-smoke-pair-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
