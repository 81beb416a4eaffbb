//! Offline look at what a delta between two files would cost on the wire, without a twin or a
//! car: `cargo run --profile measure -p cardeploy-chunks --example delta_eval -- OLD NEW [LEVEL]`.
//! The end-to-end measurement (real link, real agent, peak memory) is `cargo xtask bench delta`.

use std::collections::HashSet;
use std::time::Instant;

use cardeploy_chunks::transit::{
    DeltaEncoder, MAX_REFERENCE, ReferencePlanner, reference_dictionary,
};
use cardeploy_chunks::{Params, chunk_reader};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [old, new, rest @ ..] = args.as_slice() else {
        return Err("usage: delta_eval OLD NEW [LEVEL]".into());
    };
    let level: i32 = rest.first().map_or(Ok(19), |s| s.parse())?;
    let old = std::fs::read(old)?;
    let new = std::fs::read(new)?;
    let started = Instant::now();
    let mut base_chunks = Vec::new();
    let base = chunk_reader(&old[..], Params::DEFAULT, |c| {
        base_chunks.push(c.data.to_vec());
        Ok(())
    })?;
    let target = chunk_reader(&new[..], Params::DEFAULT, |_| Ok(()))?;
    let in_base: HashSet<_> = base.chunks.iter().map(|c| c.id).collect();
    let max_ref = std::env::var("REF_MIB")
        .ok()
        .and_then(|m| m.parse::<u64>().ok())
        .map_or(MAX_REFERENCE, |m| m << 20);
    let planner = ReferencePlanner::new(&target, &base, max_ref);
    let offsets = target.offsets();
    let mut enc = DeltaEncoder::new(level);
    let (mut missing, mut missing_bytes, mut delta, mut whole, mut refs) = (0, 0u64, 0u64, 0u64, 0);
    let mut seen = HashSet::new();
    let mut buckets = [(0u64, 0u64); 4];
    let mut last_ref = None;
    for (i, c) in target.chunks.iter().enumerate() {
        if in_base.contains(&c.id) || !seen.insert(c.id) {
            continue;
        }
        missing += 1;
        missing_bytes += u64::from(c.len);
        let raw = &new[offsets[i] as usize..offsets[i + 1] as usize];
        let w = zstd::bulk::compress(raw, level)?.len() as u64;
        let r = planner.reference(i).ok_or("empty base")?;
        if last_ref != Some(r) {
            refs += 1;
            last_ref = Some(r);
        }
        let f = enc.delta(c.id, raw, r, || {
            Ok(reference_dictionary(
                base_chunks[r.start as usize..(r.start + r.count) as usize]
                    .iter()
                    .cloned(),
            ))
        })?;
        let mut d = f.data.len() as u64;
        // New content: try the target's own preceding bytes as dictionary.
        if d * 10 >= w * 7 && i > 0 {
            let ctx_len: usize = std::env::var("CTX_KIB")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(512)
                << 10;
            let start = (offsets[i] as usize).saturating_sub(ctx_len);
            let c = enc.context(c.id, raw, &new[start..offsets[i] as usize])?;
            d = d.min(c.data.len() as u64);
        }
        delta += d.min(w) + 45;
        whole += w + 37;
        // How good was the reference? Buckets by delta/whole.
        let bucket = match d * 10 / w.max(1) {
            0 => 0,
            1..=4 => 1,
            5..=8 => 2,
            _ => 3,
        };
        buckets[bucket].0 += 1;
        buckets[bucket].1 += d.min(w);
    }
    let index = target.encode().len() as u64;
    let full = zstd::bulk::compress(&new, 19)?.len() as u64;
    println!(
        "target {} chunks, {} missing ({} KiB raw), {} references\n\
         index {} KiB; missing sent whole {} KiB; as deltas {} KiB; total {} KiB = {:.2} % of zstd -19 full ({} KiB); {:.1} s",
        target.chunks.len(),
        missing,
        missing_bytes >> 10,
        refs,
        index >> 10,
        whole >> 10,
        delta >> 10,
        (index + delta) >> 10,
        100.0 * (index + delta) as f64 / full as f64,
        full >> 10,
        started.elapsed().as_secs_f64()
    );
    for (label, (n, b)) in [
        "delta < 10% of whole",
        "10-50%",
        "50-90%",
        ">= 90% (no useful reference)",
    ]
    .iter()
    .zip(buckets)
    {
        println!("  {label}: {n} chunks, {} KiB sent", b >> 10);
    }
    Ok(())
}
