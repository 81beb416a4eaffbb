//! Artifacts on the twin: the chunk store (uploaded by the release tool through the REST API),
//! the chunk indexes, and what the car routes `artifact.index` and `artifact.chunks` read.
//!
//! A chunk the car lacks is answered with the smallest of its stored zstd frame, a delta against
//! the base artifact the car named, and a delta against the target's own preceding bytes
//! (docs/delta.md). Deltas cost CPU once: each is kept in the delta cache ([`cache`]) under the
//! (target, base, position) it was made for. Serving a window is lazy and making deltas is
//! separate ([`window`]), so the car routes (`crate::fetching`) can bound both: memory by the
//! outbound budget of the connection, CPU by the delta pool.

mod cache;
mod s3;
mod window;

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use cardeploy_chunks::transit::{MAX_REFERENCE, ReferencePlanner};
use cardeploy_chunks::{ChunkIndex, Digest, Store};
use cardeploy_protocol::{ChunksRequest, MAX_WINDOW_BYTES, MAX_WINDOW_CHUNKS, PAGE_BYTES};

pub(crate) use window::{Base, Checker, Effort, Maker, Window};

use crate::Error;
use cache::DeltaCache;

/// Why a car's request for an index or chunks was refused (becomes an RSocket error the car can
/// read).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("{0}")]
    Bad(String),
    #[error("the twin has no chunk index {0}; was the release pushed?")]
    UnknownIndex(Digest),
    #[error(transparent)]
    Chunks(#[from] cardeploy_chunks::Error),
}

/// What `artifact.chunks` sent, counted as frames go out.
#[derive(Debug, Default)]
pub struct ServedStats {
    pub chunks: AtomicU64,
    /// Frames that were deltas (against the base or the target's preceding bytes).
    pub deltas: AtomicU64,
    pub bytes: AtomicU64,
    /// Cached deltas that did not decode to their chunk: discarded and made again.
    pub repaired: AtomicU64,
    /// Delta windows made on the delta pool.
    pub delta_jobs: AtomicU64,
    /// Delta jobs running right now, and the most that ever ran at once.
    pub delta_jobs_running: AtomicU64,
    pub delta_jobs_peak: AtomicU64,
    /// (target, base) pairs made ahead completely, and chunks made ahead (`crate::ahead`).
    pub ahead_pairs: AtomicU64,
    pub ahead_chunks: AtomicU64,
}

/// A map that keeps its `cap` most recently used entries: indexes and reference planners are
/// cheap to load again, and which ones are loaded is up to the cars.
struct Recent<K, V> {
    cap: usize,
    clock: u64,
    map: HashMap<K, (u64, V)>,
}

impl<K: Eq + Hash + Copy, V: Clone> Recent<K, V> {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            clock: 0,
            map: HashMap::new(),
        }
    }

    fn get(&mut self, key: &K) -> Option<V> {
        self.clock += 1;
        let clock = self.clock;
        self.map.get_mut(key).map(|(used, v)| {
            *used = clock;
            v.clone()
        })
    }

    fn retain(&mut self, keep: impl Fn(&K) -> bool) {
        self.map.retain(|k, _| keep(k));
    }

    fn insert(&mut self, key: K, value: V) {
        self.clock += 1;
        if self.map.len() >= self.cap
            && !self.map.contains_key(&key)
            && let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, (u, _))| *u)
                .map(|(k, _)| *k)
        {
            self.map.remove(&oldest);
        }
        self.map.insert(key, (self.clock, value));
    }
}

/// Chunk indexes kept parsed in memory (a 16 GiB artifact's is about 10 MB).
const INDEXES_KEPT: usize = 32;
/// Reference planners kept (about 60 bytes per target chunk each).
const PLANNERS_KEPT: usize = 16;

pub(crate) struct Artifacts {
    store: Store,
    max_artifact: u64,
    delta_level: i32,
    cache: DeltaCache,
    indexes: Mutex<Recent<Digest, Arc<ChunkIndex>>>,
    planners: Mutex<Recent<(Digest, Digest), Arc<ReferencePlanner>>>,
    /// What cars were sent since start (tests and benchmarks read these).
    pub served: ServedStats,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn digest(hex: &str) -> Result<Digest, Refused> {
    hex.parse()
        .map_err(|_| Refused::Bad(format!("`{hex}` is not a sha256 digest (64 hex digits)")))
}

impl Artifacts {
    pub fn open(config: &crate::Config) -> Result<Self, Error> {
        let store = match &config.object_store {
            Some(objects) => Store::with_blobs(std::sync::Arc::new(s3::S3Blobs::connect(objects)?)),
            None => Store::open(&config.chunks_path())?,
        };
        let cache = DeltaCache::open(store.blobs().clone(), config.delta_cache_bytes).map_err(
            |source| Error::Io {
                path: format!("{}/deltas", store.location()).into(),
                source,
            },
        )?;
        Ok(Self {
            store,
            max_artifact: config.max_artifact_bytes,
            delta_level: config.delta_level,
            cache,
            indexes: Mutex::new(Recent::new(INDEXES_KEPT)),
            planners: Mutex::new(Recent::new(PLANNERS_KEPT)),
            served: ServedStats::default(),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Bytes the delta cache holds.
    pub fn cache_bytes(&self) -> u64 {
        self.cache.bytes()
    }

    pub fn index(&self, id: &Digest) -> Result<Arc<ChunkIndex>, Refused> {
        if let Some(index) = lock(&self.indexes).get(id) {
            return Ok(index);
        }
        if !self.store.has_index(id) {
            return Err(Refused::UnknownIndex(*id));
        }
        let index = Arc::new(self.store.get_index(id, self.max_artifact)?);
        lock(&self.indexes).insert(*id, index.clone());
        Ok(index)
    }

    /// `artifact.index`: up to [`PAGE_BYTES`] of the encoding from `offset`, exactly as stored
    /// (the car checks the digest of the whole). Reads only the page, so an index of any size
    /// costs one page of memory per request.
    pub fn index_page(&self, id: &Digest, offset: u64) -> Result<Vec<u8>, Refused> {
        let key = format!("indexes/{}", id.hex());
        let read = self
            .store
            .blobs()
            .get_range(&key, offset, PAGE_BYTES)
            .map_err(|source| {
                Refused::Chunks(cardeploy_chunks::Error::Io {
                    what: "cannot read index",
                    path: format!("{}/{key}", self.store.location()).into(),
                    source,
                })
            })?;
        let Some((page, len)) = read else {
            return Err(Refused::UnknownIndex(*id));
        };
        if offset >= len {
            return Err(Refused::Bad(format!(
                "offset {offset} is at or beyond the end of index {id} ({len} bytes)"
            )));
        }
        Ok(page)
    }

    fn planner(
        &self,
        target_id: &Digest,
        target: &ChunkIndex,
        base_id: &Digest,
        base: &ChunkIndex,
    ) -> Arc<ReferencePlanner> {
        if let Some(p) = lock(&self.planners).get(&(*target_id, *base_id)) {
            return p;
        }
        let planner = Arc::new(ReferencePlanner::new(target, base, MAX_REFERENCE));
        lock(&self.planners).insert((*target_id, *base_id), planner.clone());
        planner
    }

    /// The encoders of one delta job at `effort`.
    pub fn maker(&self, effort: Effort) -> Maker {
        Maker::new(effort, self.delta_level)
    }

    /// The window of every position of `target_id` whose chunk is not in `base_id`, each chunk
    /// once (a car holding the base fetches nothing else): what making the pair's deltas ahead
    /// covers. Blocking (may load indexes from disk).
    pub fn ahead_window(&self, target_id: &Digest, base_id: &Digest) -> Result<Window, Refused> {
        let target = self.index(target_id)?;
        let index = self.index(base_id)?;
        let planner = self.planner(target_id, &target, base_id, &index);
        let held: HashSet<Digest> = index.chunks.iter().map(|c| c.id).collect();
        let mut seen = HashSet::new();
        let positions = (0..target.chunks.len() as u32)
            .filter(|&p| {
                let id = target.chunks[p as usize].id;
                !held.contains(&id) && seen.insert(id)
            })
            .collect();
        Ok(Window {
            target_id: *target_id,
            target,
            base: Some(Base {
                id: *base_id,
                index,
                planner,
            }),
            positions,
            uncached: Default::default(),
        })
    }

    /// Check an `artifact.chunks` request against its index and the window limits. Blocking
    /// (may load indexes from disk).
    pub fn window(&self, request: &ChunksRequest) -> Result<Window, Refused> {
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
                let index = self.index(&id)?;
                let planner = self.planner(&target_id, &target, &id, &index);
                Some(Base { id, index, planner })
            }
            None => None,
        };
        Ok(Window {
            target_id,
            target,
            base,
            positions: request.chunks.clone(),
            uncached: Default::default(),
        })
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

    /// After the chunk store's gc: forget parsed indexes and planners of indexes it removed, and
    /// the delta-cache pairs made for them. Returns the delta-cache bytes freed.
    pub fn forget_collected(&self) -> u64 {
        let store = &self.store;
        lock(&self.indexes).retain(|id| store.has_index(id));
        lock(&self.planners)
            .retain(|(target, base)| store.has_index(target) && store.has_index(base));
        self.cache.retain(|index| store.has_index(index))
    }
}
