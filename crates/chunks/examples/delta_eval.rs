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
    let planner = ReferencePlanner::new(&target, &base, MAX_REFERENCE);
    let offsets = target.offsets();
    let mut enc = DeltaEncoder::new(level);
    let (mut missing, mut missing_bytes, mut delta, mut whole, mut refs) = (0, 0u64, 0u64, 0u64, 0);
    let mut seen = HashSet::new();
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
        let d = f.data.len() as u64;
        delta += d.min(w) + 45;
        whole += w + 37;
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
    Ok(())
}
