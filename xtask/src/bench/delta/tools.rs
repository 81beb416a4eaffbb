//! The external tools `cargo xtask bench delta` compares cardeploy's delta engine against, run on
//! each input pair: bytes on the wire, encode time, and the receiving side's ("apply") wall time and
//! peak RSS. Every apply output is compared with NEW byte for byte.
//!
//! - `full`: `zstd -19 -T1` of NEW
//! - `zstd --patch-from`: `zstd -19 --long=31 --single-thread --patch-from=OLD`
//! - `xdelta3 -9`: `xdelta3 -9 -e -s OLD` (default 64 MiB source window), and `xdelta3 -9 -B`
//!   with the source window as large as OLD (encoder and decoder)
//! - `bsdiff`: bsdiff 4.3, killed after `CARDEPLOY_BENCH_BSDIFF_TIMEOUT_SECS` (default 15 min)
//! - `casync`: NEW chunked into a store (default chunk size, zstd chunks); wire = the .caibx index
//!   + the chunks absent from OLD's chunk set; apply = `casync extract --seed=OLD`
//! - `rauc-block-hash`: a model of RAUC's block-hash-index: 4 KiB blocks of NEW found anywhere in
//!   OLD at a 4 KiB-aligned offset are reused, the others fetched raw, plus 32 bytes of index per
//!   block; `rauc-block-hash+zstd` counts each missing block compressed alone with `zstd -3`.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::inputs::{Pair, prerequisites};
use crate::sh::{describe, fresh_dir, run};

/// One tool on one pair.
pub struct ToolRun {
    pub tool: String,
    pub wire_bytes: Option<u64>,
    pub encode_secs: f64,
    pub apply_secs: f64,
    pub apply_peak_rss_kib: Option<u64>,
    pub note: String,
}

const BSDIFF_TIMEOUT_SECS: u64 = 15 * 60;
const BLOCK: usize = 4096;
/// RAUC's block hash index: one sha256 per block.
const BLOCK_HASH_BYTES: u64 = 32;

/// Runs every external tool on `pair`, in `work/<pair>/tools` (removed afterwards).
pub fn measure_tools(pair: &Pair, work: &Path) -> anyhow::Result<Vec<ToolRun>> {
    prerequisites()?;
    let dir = work.join(&pair.name).join("tools");
    fresh_dir(&dir)?;
    let runs = vec![
        full(pair, &dir)?,
        zstd_patch(pair, &dir)?,
        xdelta3(pair, &dir, false)?,
        xdelta3(pair, &dir, true)?,
        bsdiff(pair, &dir)?,
        casync(pair, &dir)?,
    ];
    let runs = runs.into_iter().chain(block_hash(pair, &dir)?).collect();
    fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    Ok(runs)
}

/// peak RSS (KiB) and wall seconds of a command, via /usr/bin/time -f (install Debian package `time`)
///
/// Returns `(wall seconds, peak RSS KiB)`; fails when the command fails. The command's stdout is
/// discarded, its stderr passed through.
pub fn measure(cmd: &mut std::process::Command) -> anyhow::Result<(f64, u64)> {
    let (secs, kib, status) = measure_status(cmd)?;
    if !status.success() {
        bail!("{} failed ({status})", describe(cmd));
    }
    Ok((secs, kib))
}

fn measure_status(cmd: &Command) -> anyhow::Result<(f64, u64, ExitStatus)> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let report = std::env::temp_dir().join(format!(
        "cardeploy-bench-time-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let mut timed = Command::new("/usr/bin/time");
    timed
        .args(["-f", "%e %M", "-o"])
        .arg(&report)
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if let Some(dir) = cmd.get_current_dir() {
        timed.current_dir(dir);
    }
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => timed.env(key, value),
            None => timed.env_remove(key),
        };
    }
    eprintln!("+ {}", describe(cmd));
    let start = Instant::now();
    let status = timed
        .status()
        .with_context(|| format!("cannot run /usr/bin/time {}", describe(cmd)))?;
    let secs = start.elapsed().as_secs_f64();
    let text = fs::read_to_string(&report)
        .with_context(|| format!("/usr/bin/time wrote no report for {}", describe(cmd)))?;
    let _ = fs::remove_file(&report);
    // On failure time(1) writes "Command exited with non-zero status" first; the format is last.
    let kib = text
        .lines()
        .rev()
        .find_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .with_context(|| format!("cannot read /usr/bin/time's report {text:?}"))?;
    Ok((secs, kib, status))
}

fn cmd(program: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Command {
    let mut c = Command::new(program);
    for a in args {
        c.arg(a);
    }
    c
}

fn size(path: &Path) -> anyhow::Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("no {}", path.display()))?
        .len())
}

/// Fails loudly unless `out` is byte-identical to NEW; removes `out`.
fn verify(tool: &str, out: &Path, pair: &Pair) -> anyhow::Result<()> {
    let same = Command::new("cmp")
        .arg("-s")
        .arg(out)
        .arg(&pair.new)
        .status()
        .context("cannot run cmp")?;
    if !same.success() {
        bail!(
            "{tool} on {}: the applied output {} differs from NEW {}",
            pair.name,
            out.display(),
            pair.new.display()
        );
    }
    fs::remove_file(out)?;
    Ok(())
}

fn full(pair: &Pair, dir: &Path) -> anyhow::Result<ToolRun> {
    let (zst, out) = (dir.join("full.zst"), dir.join("full.out"));
    let (encode, _) = measure(&mut cmd(
        "zstd",
        &[&"-q", &"-f", &"-19", &"-T1", &pair.new, &"-o", &zst],
    ))?;
    let wire = size(&zst)?;
    let (apply, rss) = measure(&mut cmd("zstd", &[&"-q", &"-f", &"-d", &zst, &"-o", &out]))?;
    verify("full", &out, pair)?;
    fs::remove_file(&zst)?;
    Ok(ToolRun {
        tool: "full".into(),
        wire_bytes: Some(wire),
        encode_secs: encode,
        apply_secs: apply,
        apply_peak_rss_kib: Some(rss),
        note: "zstd -19 -T1 of NEW".into(),
    })
}

fn zstd_patch(pair: &Pair, dir: &Path) -> anyhow::Result<ToolRun> {
    let (patch, out) = (dir.join("patch.zst"), dir.join("patch.out"));
    let from = {
        let mut s = std::ffi::OsString::from("--patch-from=");
        s.push(&pair.old);
        s
    };
    let (encode, _) = measure(&mut cmd(
        "zstd",
        &[
            &"-q",
            &"-f",
            &"-19",
            &"--long=31",
            &"--single-thread",
            &from,
            &pair.new,
            &"-o",
            &patch,
        ],
    ))?;
    let wire = size(&patch)?;
    let (apply, rss) = measure(&mut cmd(
        "zstd",
        &[
            &"-q",
            &"-f",
            &"-d",
            &"--long=31",
            &from,
            &patch,
            &"-o",
            &out,
        ],
    ))?;
    verify("zstd --patch-from", &out, pair)?;
    fs::remove_file(&patch)?;
    Ok(ToolRun {
        tool: "zstd --patch-from".into(),
        wire_bytes: Some(wire),
        encode_secs: encode,
        apply_secs: apply,
        apply_peak_rss_kib: Some(rss),
        note: "-19 --long=31 --single-thread; apply -d --long=31 --patch-from=OLD".into(),
    })
}

/// `xdelta3 -9` with its default 64 MiB source window, or (`whole_source`) with `-B` as large as
/// OLD on both sides, so that matches anywhere in OLD are found.
fn xdelta3(pair: &Pair, dir: &Path, whole_source: bool) -> anyhow::Result<ToolRun> {
    let (patch, out) = (dir.join("patch.xd3"), dir.join("patch.out"));
    let window = size(&pair.old)?.max(64 << 20).div_ceil(1 << 20) << 20;
    let window_args: Vec<String> = if whole_source {
        vec!["-B".into(), window.to_string()]
    } else {
        Vec::new()
    };
    let (encode, _) = measure(
        cmd("xdelta3", &[&"-9", &"-e", &"-f"])
            .args(&window_args)
            .arg("-s")
            .arg(&pair.old)
            .arg(&pair.new)
            .arg(&patch),
    )?;
    let wire = size(&patch)?;
    let (apply, rss) = measure(
        cmd("xdelta3", &[&"-d", &"-f"])
            .args(&window_args)
            .arg("-s")
            .arg(&pair.old)
            .arg(&patch)
            .arg(&out),
    )?;
    verify("xdelta3", &out, pair)?;
    fs::remove_file(&patch)?;
    Ok(if whole_source {
        ToolRun {
            tool: "xdelta3 -9 -B".into(),
            wire_bytes: Some(wire),
            encode_secs: encode,
            apply_secs: apply,
            apply_peak_rss_kib: Some(rss),
            note: format!("-B {window} (source window = OLD) on both sides"),
        }
    } else {
        ToolRun {
            tool: "xdelta3 -9".into(),
            wire_bytes: Some(wire),
            encode_secs: encode,
            apply_secs: apply,
            apply_peak_rss_kib: Some(rss),
            note: "default source window (-B 64 MiB)".into(),
        }
    })
}

fn bsdiff_timeout() -> anyhow::Result<Duration> {
    match std::env::var("CARDEPLOY_BENCH_BSDIFF_TIMEOUT_SECS") {
        Ok(v) => Ok(Duration::from_secs(v.trim().parse().with_context(
            || format!("CARDEPLOY_BENCH_BSDIFF_TIMEOUT_SECS={v:?} is not a number of seconds"),
        )?)),
        Err(_) => Ok(Duration::from_secs(BSDIFF_TIMEOUT_SECS)),
    }
}

fn minutes(d: Duration) -> String {
    let secs = d.as_secs();
    if secs.is_multiple_of(60) {
        format!("{} min", secs / 60)
    } else {
        format!("{:.1} min", secs as f64 / 60.0)
    }
}

/// MemAvailable from /proc/meminfo, in bytes.
fn mem_available() -> Option<u64> {
    let info = fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

fn bsdiff(pair: &Pair, dir: &Path) -> anyhow::Result<ToolRun> {
    let (patch, out) = (dir.join("patch.bsdiff"), dir.join("patch.out"));
    let timeout = bsdiff_timeout()?;
    let (old, new) = (size(&pair.old)?, size(&pair.new)?);
    // bsdiff 4.3 holds two 8-byte suffix arrays over OLD plus both files: ~17 x OLD + NEW.
    let needs = 17 * old + new;
    if let Some(available) = mem_available().filter(|a| needs > a / 10 * 8) {
        return Ok(ToolRun {
            tool: "bsdiff".into(),
            wire_bytes: None,
            encode_secs: 0.0,
            apply_secs: 0.0,
            apply_peak_rss_kib: None,
            note: format!(
                "not run: needs ~{:.1} GiB, {:.1} GiB available",
                needs as f64 / f64::from(1 << 30),
                available as f64 / f64::from(1 << 30)
            ),
        });
    }
    let secs = timeout.as_secs().to_string();
    let (encode, _, status) = measure_status(&cmd(
        "timeout",
        &[
            &"--kill-after=30",
            &secs,
            &"bsdiff",
            &pair.old,
            &pair.new,
            &patch,
        ],
    ))?;
    if status.code() == Some(124) || status.code() == Some(137) {
        return Ok(ToolRun {
            tool: "bsdiff".into(),
            wire_bytes: None,
            encode_secs: encode,
            apply_secs: 0.0,
            apply_peak_rss_kib: None,
            note: format!("did not finish in {}", minutes(timeout)),
        });
    }
    if !status.success() {
        bail!("bsdiff on {} failed ({status})", pair.name);
    }
    let wire = size(&patch)?;
    let (apply, rss) = measure(&mut cmd("bspatch", &[&pair.old, &out, &patch]))?;
    verify("bsdiff", &out, pair)?;
    fs::remove_file(&patch)?;
    Ok(ToolRun {
        tool: "bsdiff".into(),
        wire_bytes: Some(wire),
        encode_secs: encode,
        apply_secs: apply,
        apply_peak_rss_kib: Some(rss),
        note: format!("bsdiff 4.3 (bzip2); timeout {}", minutes(timeout)),
    })
}

/// chunk id -> compressed size, over every .cacnk file of a casync store.
fn store_chunks(store: &Path) -> anyhow::Result<HashMap<String, u64>> {
    let mut chunks = HashMap::new();
    let mut dirs = vec![store.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                dirs.push(path);
            } else if let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".cacnk"))
            {
                chunks.insert(id.to_owned(), entry.metadata()?.len());
            }
        }
    }
    Ok(chunks)
}

fn casync(pair: &Pair, dir: &Path) -> anyhow::Result<ToolRun> {
    let base = dir.join("casync");
    fresh_dir(&base)?;
    let (old_store, new_store) = (base.join("old.castr"), base.join("new.castr"));
    let (old_index, new_index) = (base.join("old.caibx"), base.join("new.caibx"));
    let out = base.join("new.out");
    let store_arg = |s: &Path| {
        let mut a = std::ffi::OsString::from("--store=");
        a.push(s);
        a
    };
    // The car's side: the chunks of the image it already has.
    run(cmd(
        "casync",
        &[&"make", &store_arg(&old_store), &old_index, &pair.old],
    )
    .stdout(Stdio::null()))?;
    let (encode, _) = measure(&mut cmd(
        "casync",
        &[&"make", &store_arg(&new_store), &new_index, &pair.new],
    ))?;
    let old_chunks = store_chunks(&old_store)?;
    let new_chunks = store_chunks(&new_store)?;
    let missing: Vec<u64> = new_chunks
        .iter()
        .filter(|(id, _)| !old_chunks.contains_key(*id))
        .map(|(_, len)| *len)
        .collect();
    let index = size(&new_index)?;
    let wire = index + missing.iter().sum::<u64>();
    let seed = {
        let mut a = std::ffi::OsString::from("--seed=");
        a.push(&pair.old);
        a
    };
    let (apply, rss) = measure(&mut cmd(
        "casync",
        &[&"extract", &seed, &store_arg(&new_store), &new_index, &out],
    ))?;
    verify("casync", &out, pair)?;
    fs::remove_dir_all(&base)?;
    Ok(ToolRun {
        tool: "casync".into(),
        wire_bytes: Some(wire),
        encode_secs: encode,
        apply_secs: apply,
        apply_peak_rss_kib: Some(rss),
        note: format!(
            "{} of {} chunks missing (zstd), index {index} B; default chunk size",
            missing.len(),
            new_chunks.len()
        ),
    })
}

fn block_key(block: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    block.hash(&mut h);
    h.finish()
}

/// The RAUC block-hash-index model, computed here: which 4 KiB blocks of NEW the car finds in OLD.
fn block_hash(pair: &Pair, dir: &Path) -> anyhow::Result<Vec<ToolRun>> {
    let start = Instant::now();
    let old = fs::read(&pair.old).with_context(|| format!("cannot read {}", pair.old.display()))?;
    let new = fs::read(&pair.new).with_context(|| format!("cannot read {}", pair.new.display()))?;
    // A short last block is compared as if padded with zeros, like a block device would be.
    let padded = |data: &[u8], at: usize| -> Vec<u8> {
        let mut b = data[at..data.len().min(at + BLOCK)].to_vec();
        b.resize(BLOCK, 0);
        b
    };
    let mut index: HashMap<u64, Vec<usize>> = HashMap::new();
    for at in (0..old.len()).step_by(BLOCK) {
        index
            .entry(block_key(&padded(&old, at)))
            .or_default()
            .push(at);
    }
    // Where each NEW block comes from: Some(offset in OLD), or None = fetched.
    let mut plan: Vec<Option<usize>> = Vec::with_capacity(new.len().div_ceil(BLOCK));
    let mut missing_bytes = 0u64;
    for at in (0..new.len()).step_by(BLOCK) {
        let block = padded(&new, at);
        let found = index
            .get(&block_key(&block))
            .and_then(|offsets| offsets.iter().copied().find(|&o| padded(&old, o) == block));
        if found.is_none() {
            missing_bytes += (new.len() - at).min(BLOCK) as u64;
        }
        plan.push(found);
    }
    let encode = start.elapsed().as_secs_f64();
    let blocks = plan.len() as u64;
    let missing: Vec<usize> = plan
        .iter()
        .enumerate()
        .filter(|(_, p)| p.is_none())
        .map(|(i, _)| i * BLOCK)
        .collect();

    // "Apply": rebuild NEW from OLD's blocks and the fetched ones, then compare like every tool.
    let start = Instant::now();
    let mut rebuilt = Vec::with_capacity(new.len());
    for (i, from) in plan.iter().enumerate() {
        let at = i * BLOCK;
        let len = (new.len() - at).min(BLOCK);
        match from {
            Some(o) => rebuilt.extend_from_slice(&padded(&old, *o)[..len]),
            None => rebuilt.extend_from_slice(&new[at..at + len]),
        }
    }
    let out = dir.join("block-hash.out");
    fs::write(&out, &rebuilt)?;
    drop(rebuilt);
    let apply = start.elapsed().as_secs_f64();
    verify("rauc-block-hash", &out, pair)?;

    // +zstd: each missing block compressed on its own (it is fetched on its own).
    let blocks_dir = dir.join("blocks");
    fresh_dir(&blocks_dir)?;
    let mut list = String::new();
    for (n, &at) in missing.iter().enumerate() {
        let path = blocks_dir.join(format!("{n:08}"));
        fs::write(&path, &new[at..new.len().min(at + BLOCK)])?;
        list.push_str(&path.to_string_lossy());
        list.push('\n');
    }
    let list_path = dir.join("blocks.list");
    fs::write(&list_path, list)?;
    let zst_dir = dir.join("blocks.zst");
    fresh_dir(&zst_dir)?;
    let compress_start = Instant::now();
    if !missing.is_empty() {
        let mut filelist = std::ffi::OsString::from("--filelist=");
        filelist.push(&list_path);
        let mut out_dir = std::ffi::OsString::from("--output-dir-flat=");
        out_dir.push(&zst_dir);
        run(&mut cmd(
            "zstd",
            &[&"-q", &"-3", &"-T1", &filelist, &out_dir],
        ))?;
    }
    let compress = compress_start.elapsed().as_secs_f64();
    let mut compressed = 0u64;
    for (n, &at) in missing.iter().enumerate() {
        let raw = (new.len() - at).min(BLOCK) as u64;
        let zst: PathBuf = zst_dir.join(format!("{n:08}.zst"));
        compressed += size(&zst)?.min(raw);
    }
    fs::remove_dir_all(&blocks_dir)?;
    fs::remove_dir_all(&zst_dir)?;
    fs::remove_file(&list_path)?;
    let distinct_missing = missing
        .iter()
        .map(|&at| &new[at..new.len().min(at + BLOCK)])
        .collect::<HashSet<_>>()
        .len();
    let hashes = blocks * BLOCK_HASH_BYTES;
    let note = format!(
        "computed (model): {} of {blocks} blocks missing ({distinct_missing} distinct), \
         hash index {hashes} B; apply = in-process rebuild",
        missing.len()
    );
    Ok(vec![
        ToolRun {
            tool: "rauc-block-hash".into(),
            wire_bytes: Some(missing_bytes + hashes),
            encode_secs: encode,
            apply_secs: apply,
            apply_peak_rss_kib: None,
            note: note.clone(),
        },
        ToolRun {
            tool: "rauc-block-hash+zstd".into(),
            wire_bytes: Some(compressed + hashes),
            encode_secs: encode + compress,
            apply_secs: apply,
            apply_peak_rss_kib: None,
            note: format!("{note}; each missing block zstd -3 alone (kept raw if larger)"),
        },
    ])
}
