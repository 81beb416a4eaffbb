//! Artifacts on the twin: the chunk store (uploaded by the release tool through the REST API)
//! and the two car routes that read it, `artifact.index` and `artifact.chunks`.
//!
//! A chunk the car lacks is answered with the smaller of its stored zstd frame and a delta
//! against the base artifact the car named (docs/delta.md). Deltas cost CPU once: each is cached
//! under `<data_dir>/chunks/deltas/<base>/<chunk>`, so the next car with the same base gets it
//! for free.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use cardeploy_chunks::transit::{
    DeltaEncoder, Frame, MAX_REFERENCE, ReferencePlanner, reference_dictionary, whole,
};
use cardeploy_chunks::{ChunkIndex, Digest, Store};
use cardeploy_protocol::{ChunksRequest, MAX_WINDOW_BYTES, MAX_WINDOW_CHUNKS};

use crate::Error;

/// Why a car's request for chunks was refused (becomes an RSocket error the car can read).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("{0}")]
    Bad(String),
    #[error("the twin has no chunk index {0}; was the release pushed?")]
    UnknownIndex(Digest),
    #[error(transparent)]
    Chunks(#[from] cardeploy_chunks::Error),
}

/// What `artifact.chunks` sent, counted when a window is encoded.
#[derive(Debug, Default)]
pub struct ServedStats {
    pub chunks: std::sync::atomic::AtomicU64,
    pub deltas: std::sync::atomic::AtomicU64,
    pub bytes: std::sync::atomic::AtomicU64,
}

pub(crate) struct Artifacts {
    store: Store,
    max_artifact: u64,
    delta_level: i32,
    deltas: PathBuf,
    indexes: Mutex<HashMap<Digest, Arc<ChunkIndex>>>,
    /// Chunks and frame bytes sent to cars since start (tests and benchmarks read these).
    pub served: ServedStats,
    planners: Mutex<HashMap<(Digest, Digest), Arc<ReferencePlanner>>>,
}

/// Target bytes before a chunk used as its dictionary when it has no good old version.
const CONTEXT_BYTES: u32 = 512 << 10;
/// zstd level of the quick trial that decides whether a delta is worth the configured level.
const PROBE_LEVEL: i32 = 3;
/// A trial delta must beat the whole frame by this much (per mille) to be made properly.
const PROBE_GAIN_PERMILLE: usize = 900;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn digest(hex: &str) -> Result<Digest, Refused> {
    hex.parse()
        .map_err(|_| Refused::Bad(format!("`{hex}` is not a sha256 digest (64 hex digits)")))
}

impl Artifacts {
    pub fn open(config: &crate::Config) -> Result<Self, Error> {
        let root = config.chunks_path();
        let store = Store::open(&root)?;
        let deltas = root.join("deltas");
        std::fs::create_dir_all(&deltas).map_err(|source| Error::Io {
            path: deltas.clone(),
            source,
        })?;
        Ok(Self {
            store,
            max_artifact: config.max_artifact_bytes,
            delta_level: config.delta_level,
            deltas,
            indexes: Mutex::new(HashMap::new()),
            served: ServedStats::default(),
            planners: Mutex::new(HashMap::new()),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn index(&self, id: &Digest) -> Result<Arc<ChunkIndex>, Refused> {
        if let Some(index) = lock(&self.indexes).get(id) {
            return Ok(index.clone());
        }
        if !self.store.has_index(id) {
            return Err(Refused::UnknownIndex(*id));
        }
        let index = Arc::new(self.store.get_index(id, self.max_artifact)?);
        lock(&self.indexes).insert(*id, index.clone());
        Ok(index)
    }

    /// `artifact.index`: the encoding, exactly as stored (the car checks its digest).
    pub fn index_bytes(&self, hex: &str) -> Result<Vec<u8>, Refused> {
        let id = digest(hex)?;
        if !self.store.has_index(&id) {
            return Err(Refused::UnknownIndex(id));
        }
        Ok(self.store.index_bytes(&id)?)
    }

    /// Accept an uploaded index once every chunk it names is stored. Returns the chunks still
    /// missing (nothing stored then).
    pub fn put_index(&self, id: &Digest, bytes: &[u8]) -> Result<Vec<Digest>, Refused> {
        let index = ChunkIndex::decode_expecting(bytes, id, self.max_artifact)?;
        let mut missing: Vec<Digest> = index
            .chunks
            .iter()
            .map(|c| c.id)
            .filter(|c| !self.store.has(c))
            .collect();
        missing.sort();
        missing.dedup();
        if missing.is_empty() {
            // Durable before the upload is acknowledged, whatever other uploads sync meanwhile.
            self.store.put_index_durable(&index)?;
            // Pinned by its own id until the chunk store's gc finds that no release names it
            // (`housekeeping.rs`).
            self.store.keep(&id.hex(), id)?;
        }
        Ok(missing)
    }

    /// Forget cached indexes (and the planners made from them) the chunk store's gc removed.
    pub fn forget_collected(&self) {
        lock(&self.indexes).retain(|id, _| self.store.has_index(id));
        lock(&self.planners)
            .retain(|(target, base), _| self.store.has_index(target) && self.store.has_index(base));
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

    fn planner(&self, target: &Digest, base: &Digest) -> Result<Arc<ReferencePlanner>, Refused> {
        if let Some(p) = lock(&self.planners).get(&(*target, *base)) {
            return Ok(p.clone());
        }
        let t = self.index(target)?;
        let b = self.index(base)?;
        let planner = Arc::new(ReferencePlanner::new(&t, &b, MAX_REFERENCE));
        lock(&self.planners).insert((*target, *base), planner.clone());
        Ok(planner)
    }

    /// `artifact.chunks`: one encoded transit frame per requested chunk, in request order.
    /// Blocking (disk, zstd): call from `spawn_blocking`.
    pub fn frames(&self, request: &ChunksRequest) -> Result<Vec<Vec<u8>>, Refused> {
        let target_id = digest(&request.index)?;
        let target = self.index(&target_id)?;
        if request.chunks.is_empty() || request.chunks.len() > MAX_WINDOW_CHUNKS {
            return Err(Refused::Bad(format!(
                "ask for 1 to {MAX_WINDOW_CHUNKS} chunks per request, not {}",
                request.chunks.len()
            )));
        }
        let mut raw_total = 0u64;
        for &p in &request.chunks {
            let c = target.chunks.get(p as usize).ok_or_else(|| {
                Refused::Bad(format!(
                    "chunk position {p} is beyond the index's {} chunks",
                    target.chunks.len()
                ))
            })?;
            raw_total += u64::from(c.len);
        }
        if raw_total > MAX_WINDOW_BYTES {
            return Err(Refused::Bad(format!(
                "the window holds {raw_total} raw bytes; the limit is {MAX_WINDOW_BYTES}"
            )));
        }
        let base = match &request.base {
            Some(hex) => {
                let id = digest(hex)?;
                Some((id, self.index(&id)?, self.planner(&target_id, &id)?))
            }
            None => None,
        };
        let mut encoder = DeltaEncoder::new(self.delta_level);
        // Most changed chunks of compressed artifacts (RAUC bundles, OCI layers) have no useful
        // reference: a cheap trial at a low level finds that out, so the expensive level (an
        // 8 MiB dictionary at level 19 takes about a second per chunk) is spent only where it
        // pays.
        let mut probe = DeltaEncoder::new(PROBE_LEVEL);
        let started = std::time::Instant::now();
        let mut out = Vec::with_capacity(request.chunks.len());
        for &p in &request.chunks {
            let c = target.chunks[p as usize];
            // A delta made for an earlier car is served as it is (the car verifies every chunk).
            let cached = base
                .as_ref()
                .map(|(base_id, _, _)| self.deltas.join(base_id.hex()).join(c.id.hex()));
            if let Some(cached) = &cached
                && let Ok(bytes) = std::fs::read(cached)
                && Frame::decode(&bytes).is_ok_and(|f| f.id == c.id)
            {
                out.push(bytes);
                continue;
            }
            let (stored, raw) = self.store.get_both(&c.id)?;
            let whole_frame = whole(c.id, c.len, stored);
            let (Some((_, base_index, planner)), Some(cached)) = (&base, cached) else {
                out.push(whole_frame.encode());
                continue;
            };
            let whole_len = whole_frame.data.len();
            let promising = |trial: usize| trial * 1000 < whole_len * PROBE_GAIN_PERMILLE;
            let mut frame = match planner.reference(p as usize) {
                Some(r) => {
                    let dictionary = || {
                        let chunks = base_index.chunks
                            [r.start as usize..(r.start + r.count) as usize]
                            .iter()
                            .map(|b| self.store.get(&b.id))
                            .collect::<Result<Vec<_>, _>>()?;
                        Ok(reference_dictionary(chunks))
                    };
                    let trial = probe.delta(c.id, &raw, r, dictionary)?;
                    let delta = if promising(trial.data.len()) {
                        encoder.delta(c.id, &raw, r, dictionary)?
                    } else {
                        trial
                    };
                    if delta.data.len() < whole_frame.data.len() {
                        delta
                    } else {
                        whole_frame
                    }
                }
                None => whole_frame,
            };
            // No good old version (new content): the target's own preceding bytes, which the car
            // has just assembled, often are one.
            if p > 0 && frame.data.len() * 10 >= whole_len * 7 {
                let preceding = self.preceding(&target, p as usize, CONTEXT_BYTES)?;
                if !preceding.is_empty() {
                    let trial = probe.context(c.id, &raw, &preceding)?;
                    let context = if promising(trial.data.len()) {
                        encoder.context(c.id, &raw, &preceding)?
                    } else {
                        trial
                    };
                    if context.data.len() < frame.data.len() {
                        frame = context;
                    }
                }
            }
            if !matches!(frame.encoding, cardeploy_chunks::transit::Encoding::Whole) {
                self.served.deltas.fetch_add(1, Ordering::Relaxed);
            }
            let bytes = frame.encode();
            cache(&cached, &bytes);
            out.push(bytes);
        }
        // Deltas cost CPU once per (base, chunk); a slow window is worth knowing about.
        if started.elapsed() > std::time::Duration::from_secs(2) {
            tracing::info!(chunks = out.len(), raw = raw_total, took = ?started.elapsed(),
                base = request.base.as_deref().unwrap_or("-"), "slow chunk window");
        }
        self.served
            .chunks
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        self.served
            .bytes
            .fetch_add(out.iter().map(|f| f.len() as u64).sum(), Ordering::Relaxed);
        Ok(out)
    }
}

/// Best effort: a cache that cannot be written only costs CPU next time.
fn cache(path: &std::path::Path, bytes: &[u8]) {
    let Some(dir) = path.parent() else { return };
    let tmp = path.with_extension("tmp");
    let ok = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = ok {
        tracing::debug!("delta cache {}: {e}", path.display());
    }
}
