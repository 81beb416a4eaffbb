//! `cargo xtask bench delta --smoke`: the cardeploy side of the bench end to end on a small pair
//! made here, so neither the bench nor the bytes it measures can get worse unnoticed. No download
//! and no external tool: the pair is [`synthetic`]'s stand-in image (4 MiB) with a 2 MiB stand-in
//! library, and its security update with the library rebuilt, the same bytes every run.
//!
//! The rebuilt library is there for the delta engine's costliest judgement: every one of its
//! chunks changed, its reference is the whole old library, and at a low zstd level only the last
//! few hundred KiB of such a reference can be matched — a delta made at the configured level is
//! a fifth of the whole frame, one made at level 3 looks no better than the whole frame. A twin
//! that let a cheap trial decide those chunks sent about 4× the bytes for this pair.
//!
//! Because the pair and the chunk boundaries are deterministic, so are the bytes cardeploy sends
//! for it: besides sanity checks, [`Figures::check`] holds them against the baseline recorded in
//! `smoke-baseline.json` beside this file, and fails on a growth over [`GROWTH_PERMILLE`]. After a
//! change that really makes the bytes smaller (or knowingly larger), record the new figures there;
//! the command prints them.

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
/// The stand-in library, placed at [`LIBRARY_AT`] (away from the update's other edits' middle
/// insertion, so its offsets are the same in both images).
const LIBRARY_BYTES: usize = 2 << 20;
const LIBRARY_AT: usize = 1 << 20;

/// The recorded figures (bytes on the wire) that a run may not exceed by more than
/// [`GROWTH_PERMILLE`]: TLS records and heartbeats vary a little, deltas do not.
const BASELINE: &str = include_str!("smoke-baseline.json");
const GROWTH_PERMILLE: u64 = 30;

#[derive(Debug)]
struct Baseline {
    first_wire: u64,
    cached_wire: u64,
}

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
    /// car without a seed, and cached deltas are no bigger than the first car's; and what held
    /// when `baseline` was recorded: neither seeded car fetches more than then, beyond a few per
    /// mille of noise.
    fn check(&self, baseline: &Baseline) -> anyhow::Result<()> {
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
        for (what, now, then) in [
            ("first", self.first_wire, baseline.first_wire),
            ("second", self.cached_wire, baseline.cached_wire),
        ] {
            if now * 1000 > then * (1000 + GROWTH_PERMILLE) {
                bail!(
                    "the {what} seeded car fetched {now} B, {:.1} % more than the {then} B \
                     recorded in xtask/src/bench/delta/smoke-baseline.json (at most {:.1} % \
                     more passes): the delta engine got worse",
                    (now as f64 / then as f64 - 1.0) * 100.0,
                    GROWTH_PERMILLE as f64 / 10.0
                );
            }
        }
        Ok(())
    }
}

/// The fixed pair, written under `dir` (made again every run: it takes milliseconds).
fn pair(dir: &Path) -> anyhow::Result<Pair> {
    fresh_dir(dir)?;
    let mut old = synthetic::image(IMAGE_BYTES);
    old.splice(LIBRARY_AT..LIBRARY_AT, synthetic::library(LIBRARY_BYTES));
    let mut new = synthetic::security_update(&old);
    synthetic::rebuild(&mut new[LIBRARY_AT..LIBRARY_AT + LIBRARY_BYTES]);
    let pair = Pair {
        name: "smoke".into(),
        title: "synthetic 6 MiB image and its security update, a library rebuilt".into(),
        old: dir.join("old.img"),
        new: dir.join("new.img"),
        provenance: dir.join("provenance.txt"),
    };
    std::fs::write(&pair.old, old)?;
    std::fs::write(&pair.new, new)?;
    std::fs::write(
        &pair.provenance,
        "xtask/src/synthetic.rs: image(4 MiB) with library(2 MiB) at 1 MiB; \
         security_update(image) with rebuild(library)\n",
    )?;
    Ok(pair)
}

/// The smoke run on binaries already built in `bins`.
pub fn smoke(bins: &Path) -> anyhow::Result<()> {
    let work = root().join("target/bench-delta-smoke");
    let pair = pair(&work.join("pair"))?;
    let result = cardeploy::run(&pair, bins, &work)?;
    let figures = Figures::read(&result)?;
    println!(
        "bench delta --smoke: seeded car {} B, from the delta cache {} B, without a seed {} B \
         (recorded: {BASELINE})",
        figures.first_wire,
        figures.cached_wire,
        figures.full_wire,
        BASELINE = BASELINE.trim()
    );
    figures.check(&baseline()?)?;
    Ok(())
}

fn baseline() -> anyhow::Result<Baseline> {
    let what = "xtask/src/bench/delta/smoke-baseline.json";
    let value: Value = serde_json::from_str(BASELINE).context(what)?;
    let field = |name: &str| {
        value[name]
            .as_u64()
            .with_context(|| format!("{what}: no {name} (bytes)"))
    };
    Ok(Baseline {
        first_wire: field("first_wire")?,
        cached_wire: field("cached_wire")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECORDED: Baseline = Baseline {
        first_wire: 90_000,
        cached_wire: 90_000,
    };

    fn figures(first: u64, cached: u64, full: u64) -> Figures {
        Figures {
            first_wire: first,
            cached_wire: cached,
            full_wire: full,
        }
    }

    #[test]
    fn deltas_that_save_nothing_fail_the_check() {
        assert!(figures(90_000, 90_000, 1_000_000).check(&RECORDED).is_ok());
        assert!(
            figures(400_000, 400_000, 1_000_000)
                .check(&RECORDED)
                .is_err()
        );
    }

    #[test]
    fn a_cache_that_sends_more_fails_the_check() {
        assert!(
            figures(90_000, 120_000, 1_000_000)
                .check(&RECORDED)
                .is_err()
        );
    }

    #[test]
    fn more_bytes_than_recorded_fail_the_check_and_noise_does_not() {
        assert!(figures(92_000, 90_000, 1_000_000).check(&RECORDED).is_ok());
        assert!(figures(93_000, 90_000, 1_000_000).check(&RECORDED).is_err());
        assert!(figures(88_000, 93_000, 1_000_000).check(&RECORDED).is_err());
        // Fewer bytes than recorded pass: the baseline is a ceiling.
        assert!(figures(20_000, 20_000, 1_000_000).check(&RECORDED).is_ok());
    }

    #[test]
    fn the_recorded_baseline_parses() {
        let b = baseline().unwrap();
        assert!(b.first_wire > 0 && b.cached_wire > 0);
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
