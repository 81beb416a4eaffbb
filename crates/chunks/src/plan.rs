use std::collections::HashSet;

use crate::{ChunkIndex, Digest, Seed, Store};

/// Where one chunk of the target comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Already in the chunk store (fetched before, or shared with a kept artifact).
    Store,
    /// Readable from seed number `seed` (index into the seeds given to [`Plan::new`]).
    Seed { seed: usize },
    /// Already in the target being assembled (an earlier attempt wrote it, or the same chunk
    /// occurs earlier in the target).
    Local,
    /// Must come over the network.
    Fetch,
}

/// Bytes by origin, counting the target as laid out (a chunk used twice counts twice), except
/// `fetch_bytes`/`fetch_chunks`, which count each missing chunk once: that is what travels.
/// `store_bytes` includes what an earlier attempt already assembled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanStats {
    pub planned_bytes: u64,
    pub store_bytes: u64,
    pub seed_bytes: u64,
    pub fetch_bytes: u64,
    pub fetch_chunks: u64,
}

/// The delta plan: target index minus chunks in the store minus chunks found in seeds.
#[derive(Clone, Debug)]
pub struct Plan {
    pub sources: Vec<Source>,
    pub stats: PlanStats,
    missing: Vec<(usize, Digest, u32)>,
}

impl Plan {
    pub fn new(target: &ChunkIndex, store: &Store, seeds: &[Seed]) -> Self {
        Self::resuming(target, 0, Some(store), seeds)
    }

    /// The plan for the rest of a target whose first `start` chunks are already assembled
    /// (verified): they and every later repeat of them are [`Source::Local`].
    pub fn resuming(
        target: &ChunkIndex,
        start: usize,
        store: Option<&Store>,
        seeds: &[Seed],
    ) -> Self {
        let mut sources = Vec::with_capacity(target.chunks.len());
        let mut stats = PlanStats {
            planned_bytes: target.size,
            ..PlanStats::default()
        };
        let mut missing = Vec::new();
        let mut local: HashSet<Digest> = HashSet::new();
        for (i, c) in target.chunks.iter().enumerate() {
            let source = if i < start || local.contains(&c.id) {
                stats.store_bytes += u64::from(c.len);
                Source::Local
            } else if store.is_some_and(|s| s.has(&c.id)) {
                stats.store_bytes += u64::from(c.len);
                Source::Store
            } else if let Some(seed) = seeds.iter().position(|s| s.contains(&c.id)) {
                stats.seed_bytes += u64::from(c.len);
                Source::Seed { seed }
            } else {
                stats.fetch_bytes += u64::from(c.len);
                stats.fetch_chunks += 1;
                missing.push((i, c.id, c.len));
                Source::Fetch
            };
            local.insert(c.id);
            sources.push(source);
        }
        Self {
            sources,
            stats,
            missing,
        }
    }

    /// Each chunk to fetch once, in target order: (position in the target, id, length).
    pub fn missing(&self) -> &[(usize, Digest, u32)] {
        &self.missing
    }

    /// The missing chunks cut into windows of at most `max_chunks` chunks and `max_bytes` raw
    /// bytes (a single chunk larger than `max_bytes` gets a window of its own).
    pub fn windows(&self, max_chunks: usize, max_bytes: u64) -> Vec<&[(usize, Digest, u32)]> {
        let mut out = Vec::new();
        let mut start = 0;
        let mut bytes = 0u64;
        for (i, m) in self.missing.iter().enumerate() {
            let len = u64::from(m.2);
            if i > start && (i - start >= max_chunks.max(1) || bytes + len > max_bytes) {
                out.push(&self.missing[start..i]);
                start = i;
                bytes = 0;
            }
            bytes += len;
        }
        if start < self.missing.len() {
            out.push(&self.missing[start..]);
        }
        out
    }
}
