//! One `artifact.chunks` window, frame by frame: what is served, and the delta work behind it.
//!
//! Serving is lazy — one frame is read (and, if it came from the delta cache, decoded and checked
//! against its chunk's digest) only when the stream is polled, so a car that stops reading holds
//! at most one frame per stream on the twin. Making deltas is separate ([`Artifacts::make`]): it
//! runs on the delta pool, writes its frames to the cache, and the window reads them from there.
//!
//! Without a base the twin sends whole frames only. That is also how a car asks again for a
//! chunk whose delta failed on its side.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use cardeploy_chunks::transit::{
    DeltaDecoder, DeltaEncoder, Frame, ReferencePlanner, reference_dictionary, whole,
};
use cardeploy_chunks::{ChunkIndex, Digest};

use super::cache::{Entry, Grade, Key};
use super::{Artifacts, Refused};

/// Target bytes before a chunk used as its dictionary when it has no good old version.
const CONTEXT_BYTES: u32 = 512 << 10;
/// zstd level of the quick trial that decides, on demand only, whether a delta is worth the
/// configured level.
const PROBE_LEVEL: i32 = 3;
/// On demand, a trial delta must beat the whole frame by this much (per mille) to be made at the
/// configured level.
const PROBE_GAIN_PERMILLE: usize = 900;

/// How hard [`Artifacts::make`] tries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Effort {
    /// A car is waiting: a cheap trial decides whether the configured level is tried at all.
    /// The trial is a poor judge — at level 3 zstd keeps only the last few hundred KiB of a
    /// large reference findable, so it misses old versions the configured level finds — which
    /// is why what it decided is cached as a `trial` entry, to be replaced when made ahead.
    OnDemand,
    /// Ahead of the cars (`crate::ahead`): every candidate at the configured level.
    Ahead,
}

/// The encoders of one delta job, kept across the calls of a job so a reference's zstd
/// dictionary (up to 8 MiB, costly to load at high levels) is built once for the chunks that
/// share it.
#[derive(Debug)]
pub(crate) struct Maker {
    effort: Effort,
    encoder: DeltaEncoder,
    probe: DeltaEncoder,
    checker: Checker,
}

impl Maker {
    pub fn new(effort: Effort, level: i32) -> Self {
        Self {
            effort,
            encoder: DeltaEncoder::new(level),
            probe: DeltaEncoder::new(PROBE_LEVEL),
            checker: Checker::default(),
        }
    }
}

/// The base a car offered: an artifact it holds completely.
pub(crate) struct Base {
    pub id: Digest,
    pub index: Arc<ChunkIndex>,
    pub planner: Arc<ReferencePlanner>,
}

/// A checked `artifact.chunks` request.
pub(crate) struct Window {
    pub target_id: Digest,
    pub target: Arc<ChunkIndex>,
    pub base: Option<Base>,
    pub positions: Vec<u32>,
    /// Positions whose frame could not be cached: served whole.
    pub uncached: HashSet<usize>,
}

impl Window {
    fn key(&self, base: &Base, i: usize) -> Key {
        Key {
            target: self.target_id,
            base: base.id,
            position: self.positions[i],
        }
    }
}

/// Decodes cached frames before they are served; keeps the reference while consecutive frames
/// share it.
#[derive(Debug, Default)]
pub(crate) struct Checker {
    decoder: DeltaDecoder,
}

impl Artifacts {
    /// The whole frame of target position `p`, from the chunk store.
    fn whole_frame(&self, target: &ChunkIndex, p: usize) -> Result<Vec<u8>, Refused> {
        let c = target.chunks[p];
        let (stored, _) = self.store.get_both(&c.id)?;
        Ok(whole(c.id, c.len, stored).encode())
    }

    /// The `n` target bytes just before position `p` (what a context frame was made with).
    fn tail_before(
        &self,
        target: &ChunkIndex,
        p: usize,
        n: u32,
    ) -> Result<Vec<u8>, cardeploy_chunks::Error> {
        let n = n as usize;
        let mut parts = Vec::new();
        let mut total = 0usize;
        for c in target.chunks[..p].iter().rev() {
            if total >= n {
                break;
            }
            total += c.len as usize;
            parts.push(self.store.get(&c.id)?);
        }
        parts.reverse();
        let bytes = parts.concat();
        Ok(bytes[bytes.len().saturating_sub(n)..].to_vec())
    }

    /// Up to `limit` target bytes just before position `p` (whole chunks, nearest first).
    fn preceding(&self, target: &ChunkIndex, p: usize, limit: u32) -> Result<Vec<u8>, Refused> {
        let mut parts = Vec::new();
        let mut total = 0u32;
        for c in target.chunks[..p].iter().rev() {
            if total + c.len > limit {
                break;
            }
            total += c.len;
            parts.push(self.store.get(&c.id)?);
        }
        parts.reverse();
        Ok(parts.concat())
    }

    fn dictionary(
        &self,
        base: &Base,
        r: cardeploy_chunks::transit::Reference,
    ) -> Result<Vec<u8>, cardeploy_chunks::Error> {
        let chunks = base.index.chunks[r.start as usize..(r.start + r.count) as usize]
            .iter()
            .map(|b| self.store.get(&b.id))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(reference_dictionary(chunks))
    }

    /// Whether `bytes` is a frame of target position `p` that decodes to that chunk.
    fn check(
        &self,
        window: &Window,
        base: &Base,
        p: usize,
        bytes: &[u8],
        checker: &mut Checker,
    ) -> Result<bool, Refused> {
        let c = window.target.chunks[p];
        let Ok(frame) = Frame::decode(bytes) else {
            return Ok(false);
        };
        if frame.expect(&c.id, c.len).is_err() {
            return Ok(false);
        }
        let decoded = checker.decoder.decode(
            &frame,
            &base.index.chunks,
            |r| self.dictionary(base, r),
            |n| self.tail_before(&window.target, p, n),
        );
        match decoded {
            Ok(_) => Ok(true),
            // The twin's own store failing is not the frame's fault.
            Err(
                e @ (cardeploy_chunks::Error::ChunkMissing(_)
                | cardeploy_chunks::Error::StoreCorrupt { .. }
                | cardeploy_chunks::Error::Io { .. }),
            ) => Err(e.into()),
            Err(_) => Ok(false),
        }
    }

    /// The frame for `window.positions[i]`: whole without a base; with one, what the delta cache
    /// holds, decoded and checked first. `None` when there is no good cached frame: make it with
    /// [`Artifacts::make`], then read again. Blocking (disk, zstd).
    pub fn read(
        &self,
        window: &Window,
        i: usize,
        checker: &mut Checker,
    ) -> Result<Option<Vec<u8>>, Refused> {
        let p = window.positions[i] as usize;
        let Some(base) = &window.base else {
            return self.whole_frame(&window.target, p).map(Some);
        };
        if window.uncached.contains(&i) {
            return self.whole_frame(&window.target, p).map(Some);
        }
        let key = window.key(base, i);
        match self.cache.get(&key).map(|(entry, _)| entry) {
            None => Ok(None),
            Some(Entry::Whole) => self.whole_frame(&window.target, p).map(Some),
            Some(Entry::Frame(bytes)) => {
                if self.check(window, base, p, &bytes, checker)? {
                    self.served.deltas.fetch_add(1, Ordering::Relaxed);
                    Ok(Some(bytes))
                } else {
                    tracing::warn!(target = %key.target, base = %key.base, position = key.position,
                        "a cached delta does not decode to its chunk; discarded, made again");
                    self.served.repaired.fetch_add(1, Ordering::Relaxed);
                    self.cache.discard(&key);
                    Ok(None)
                }
            }
        }
    }

    /// Make the frames of `window.positions[range]` that the cache lacks and cache them; a
    /// position whose frame cannot be cached (a full disk) is served whole. Each frame is decoded
    /// and checked before it is cached, so the cache only ever receives good frames. On demand a
    /// position with any entry is skipped; ahead, only one with a `full` entry. Blocking and
    /// CPU-heavy: runs on the delta pool.
    pub fn make(
        &self,
        window: &mut Window,
        range: std::ops::Range<usize>,
        maker: &mut Maker,
    ) -> Result<(), Refused> {
        let Some(base) = &window.base else {
            return Ok(());
        };
        let ahead = maker.effort == Effort::Ahead;
        let started = std::time::Instant::now();
        let mut uncached = Vec::new();
        let count = range.len();
        for i in range {
            let key = window.key(base, i);
            let done = if ahead {
                self.cache.has_full(&key)
            } else {
                self.cache.get(&key).is_some()
            };
            if done {
                continue;
            }
            let p = window.positions[i] as usize;
            let c = window.target.chunks[p];
            let (stored, raw) = self.store.get_both(&c.id)?;
            let whole_len = stored.len();
            // Most changed chunks of compressed artifacts (RAUC bundles, OCI layers) have no
            // useful reference: on demand, a cheap trial at a low level finds that out, so a
            // waiting car does not pay the expensive level (an 8 MiB dictionary at level 19
            // takes about a second per chunk) where it does not pay.
            let promising = |trial: usize| trial * 1000 < whole_len * PROBE_GAIN_PERMILLE;
            let mut grade = Grade::Full;
            let mut best: Option<Frame> = None;
            if let Some(r) = base.planner.reference(p) {
                let delta = if ahead {
                    maker
                        .encoder
                        .delta(c.id, &raw, r, || self.dictionary(base, r))?
                } else {
                    let trial = maker
                        .probe
                        .delta(c.id, &raw, r, || self.dictionary(base, r))?;
                    if promising(trial.data.len()) {
                        maker
                            .encoder
                            .delta(c.id, &raw, r, || self.dictionary(base, r))?
                    } else {
                        grade = Grade::Trial;
                        trial
                    }
                };
                if delta.data.len() < whole_len {
                    best = Some(delta);
                }
            }
            // No good old version (new content): the target's own preceding bytes, which the car
            // has just assembled, often are one.
            let so_far = best.as_ref().map_or(whole_len, |f| f.data.len());
            if p > 0 && so_far * 10 >= whole_len * 7 {
                let preceding = self.preceding(&window.target, p, CONTEXT_BYTES)?;
                if !preceding.is_empty() {
                    let context = if ahead {
                        maker.encoder.context(c.id, &raw, &preceding)?
                    } else {
                        let trial = maker.probe.context(c.id, &raw, &preceding)?;
                        if promising(trial.data.len()) {
                            maker.encoder.context(c.id, &raw, &preceding)?
                        } else {
                            grade = Grade::Trial;
                            trial
                        }
                    };
                    if context.data.len() < so_far {
                        best = Some(context);
                    }
                }
            }
            let entry = match best {
                Some(frame) => {
                    let bytes = frame.encode();
                    if self.check(window, base, p, &bytes, &mut maker.checker)? {
                        Entry::Frame(bytes)
                    } else {
                        tracing::error!(chunk = %c.id, encoding = ?frame.encoding,
                            "a delta just made does not decode to its chunk; sending it whole");
                        Entry::Whole
                    }
                }
                None => Entry::Whole,
            };
            if let Err(e) = self.cache.put(&key, &entry, grade) {
                tracing::warn!("delta cache: {e}; position {p} is sent whole");
                uncached.push(i);
            }
        }
        // Deltas cost CPU once per (target, base, position); a slow window is worth knowing.
        if !ahead && started.elapsed() > std::time::Duration::from_secs(2) {
            tracing::info!(chunks = count, took = ?started.elapsed(),
                target = %window.target_id, base = %base.id, "slow delta window");
        }
        window.uncached.extend(uncached);
        Ok(())
    }
}
