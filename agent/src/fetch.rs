//! Fetching an artifact by chunk index (docs/delta.md): plan against the chunk store and the
//! seeds, fetch what is missing window by window, write each chunk atomically the moment it
//! arrives, assemble, verify. An interruption at any point — SIGKILL, power cut, a dropped or
//! stalled connection — costs at most the window in flight: the next attempt plans again and
//! finds everything already written in the store.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cardeploy_chunks::transit::{DeltaDecoder, Encoding, Frame, reference_dictionary};
use cardeploy_chunks::{ChunkIndex, Digest, Plan, Seed, Store as ChunkStore};
use cardeploy_link::{Requester, Window};
use cardeploy_protocol::{
    self as protocol, ArtifactRef, ChunksRequest, FetchProgress, IndexRequest, route,
};

use crate::{Config, Error};

/// What the agent needs to fetch: where things live and how big a window is.
#[derive(Clone, Debug)]
pub(crate) struct Fetcher {
    pub store: Arc<ChunkStore>,
    pub indexes: PathBuf,
    pub artifacts: PathBuf,
    pub seeds: Vec<PathBuf>,
    pub window_chunks: usize,
    pub window_bytes: u64,
    pub window_deadline: Duration,
    pub max_artifact: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Fetch(format!("a blocking task failed: {e}")))?
}

impl Fetcher {
    pub fn new(config: &Config) -> Result<Self, Error> {
        let indexes = config.state_dir.join("indexes");
        let artifacts = config.state_dir.join("artifacts");
        for dir in [&indexes, &artifacts] {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        Ok(Self {
            store: Arc::new(ChunkStore::open(&config.state_dir.join("chunks"))?),
            indexes,
            artifacts,
            seeds: config.seeds.clone(),
            window_chunks: config.window_chunks,
            window_bytes: config.window_bytes,
            window_deadline: Duration::from_secs(config.window_deadline_secs.max(1)),
            max_artifact: config.max_artifact_bytes,
        })
    }

    /// Where an artifact lives once assembled.
    pub fn artifact_path(&self, name: &str, index: &Digest) -> PathBuf {
        self.artifacts
            .join(format!("{name}@{}", &index.hex()[..16]))
    }

    /// An index from the local cache (checked against its id) or from the twin.
    async fn index(&self, link: &Requester, id: &Digest) -> Result<ChunkIndex, Error> {
        let path = self.indexes.join(id.hex());
        if let Ok(bytes) = std::fs::read(&path) {
            match ChunkIndex::decode_expecting(&bytes, id, self.max_artifact) {
                Ok(index) => return Ok(index),
                Err(e) => tracing::warn!(
                    "cached index {} is unusable ({e}); fetching it again",
                    path.display()
                ),
            }
        }
        let request = protocol::encode(&IndexRequest { index: id.hex() });
        let bytes = link
            .request_response(route::ARTIFACT_INDEX, Bytes::from(request))
            .await?;
        let index = ChunkIndex::decode_expecting(&bytes, id, self.max_artifact)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(io(&path))?;
        Ok(index)
    }

    /// Fetch one artifact. `base` is the index of the previous version the car holds (its
    /// assembled file or its running slot); it is offered to the twin only if every one of its
    /// chunks can be read here, because the twin's deltas may refer to any of them.
    pub async fn fetch(
        &self,
        link: &Requester,
        artifact: &ArtifactRef,
        base: Option<Digest>,
        mut progress: impl FnMut(&FetchProgress),
    ) -> Result<PathBuf, Error> {
        let id: Digest = artifact.index.parse()?;
        let out = self.artifact_path(&artifact.name, &id);
        let index = Arc::new(self.index(link, &id).await?);
        let pin = format!("fetch-{}", artifact.name);
        {
            let (store, index) = (self.store.clone(), index.clone());
            let pin = pin.clone();
            blocking(move || {
                let stored = store.put_index(&index)?;
                store.keep(&pin, &stored)?;
                Ok(())
            })
            .await?;
        }

        // Seeds: the configured ones (the running slot) and every assembled artifact.
        let mut seed_paths = self.seeds.clone();
        if let Ok(dir) = std::fs::read_dir(&self.artifacts) {
            seed_paths.extend(
                dir.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_none_or(|e| e != "partial")),
            );
        }
        let params = index.params;
        let seeds = Arc::new(
            blocking(move || {
                let mut seeds = Vec::new();
                for path in seed_paths {
                    match Seed::scan(&path, params) {
                        Ok(seed) => seeds.push(seed),
                        Err(e) => tracing::warn!("seed {} skipped: {e}", path.display()),
                    }
                }
                Ok(seeds)
            })
            .await?,
        );

        let plan = {
            let (store, index, seeds) = (self.store.clone(), index.clone(), seeds.clone());
            Arc::new(blocking(move || Ok(Plan::new(&index, &store, &seeds))).await?)
        };

        let base = match base {
            Some(b) if b != id => match self.index(link, &b).await {
                Ok(base_index) => {
                    let (store, seeds) = (self.store.clone(), seeds.clone());
                    let complete = base_index
                        .chunks
                        .iter()
                        .all(|c| store.has(&c.id) || seeds.iter().any(|s| s.contains(&c.id)));
                    if complete {
                        Some((b, Arc::new(base_index)))
                    } else {
                        tracing::info!(base = %b, "the base is not complete on this car; fetching without deltas");
                        None
                    }
                }
                Err(e) => {
                    tracing::warn!(base = %b, "base index unavailable ({e}); fetching without deltas");
                    None
                }
            },
            _ => None,
        };

        let mut report = FetchProgress {
            artifact: artifact.name.clone(),
            index: id.hex(),
            planned_bytes: plan.stats.planned_bytes,
            store_bytes: plan.stats.store_bytes,
            seed_bytes: plan.stats.seed_bytes,
            fetch_bytes: plan.stats.fetch_bytes,
            fetched_bytes: 0,
            wire_bytes: 0,
            done: false,
        };
        progress(&report);
        tracing::info!(artifact = %artifact.name, index = %id, planned = plan.stats.planned_bytes,
            from_store = plan.stats.store_bytes, from_seeds = plan.stats.seed_bytes,
            to_fetch = plan.stats.fetch_bytes, "fetch planned");

        let mut decoder = DeltaDecoder::new();
        let mut last_report = Instant::now();
        let windows: Vec<Vec<(usize, Digest, u32)>> = plan
            .windows(self.window_chunks, self.window_bytes)
            .into_iter()
            .map(<[_]>::to_vec)
            .collect();
        for window in windows {
            let request = ChunksRequest {
                index: id.hex(),
                base: base.as_ref().map(|(b, _)| b.hex()),
                chunks: window.iter().map(|(p, _, _)| *p as u32).collect(),
            };
            let raw: u64 = window.iter().map(|(_, _, len)| u64::from(*len)).sum();
            // zstd never grows data by more than ~1/128 plus a small constant per frame.
            let limit = Window {
                max_items: window.len(),
                max_bytes: usize::try_from(raw + raw / 64 + 128 * window.len() as u64)
                    .unwrap_or(usize::MAX),
            };
            let frames = link
                .request_window_within(
                    route::ARTIFACT_CHUNKS,
                    Bytes::from(protocol::encode(&request)),
                    limit,
                    self.window_deadline,
                )
                .await?;
            if frames.len() != window.len() {
                return Err(Error::Fetch(format!(
                    "asked the twin for {} chunks, got {}",
                    window.len(),
                    frames.len()
                )));
            }
            let wire: u64 = frames.iter().map(|f| f.len() as u64).sum();
            let (store, seeds) = (self.store.clone(), seeds.clone());
            let base = base.clone();
            decoder = blocking(move || {
                for (bytes, (_, want, _)) in frames.iter().zip(&window) {
                    let frame = Frame::decode(bytes)?;
                    if frame.id != *want {
                        return Err(Error::Fetch(format!(
                            "asked for chunk {want}, the twin sent {}",
                            frame.id
                        )));
                    }
                    match frame.encoding {
                        Encoding::Whole => {
                            store.put_compressed(&frame.id, &frame.data)?;
                        }
                        Encoding::Delta(_) => {
                            let Some((_, base_index)) = &base else {
                                return Err(Error::Fetch(format!(
                                    "chunk {} came as a delta, but no base was offered",
                                    frame.id
                                )));
                            };
                            let raw = decoder.decode(&frame, base_index.chunks.len(), |r| {
                                let range = &base_index.chunks
                                    [r.start as usize..(r.start + r.count) as usize];
                                let mut parts = Vec::with_capacity(range.len());
                                for c in range {
                                    parts.push(read_chunk(&store, &seeds, &c.id)?);
                                }
                                Ok(reference_dictionary(parts))
                            })?;
                            store.put_raw(&frame.id, &raw)?;
                        }
                    }
                }
                store.sync()?;
                Ok(decoder)
            })
            .await?;
            report.fetched_bytes += raw;
            report.wire_bytes += wire;
            if last_report.elapsed() >= Duration::from_secs(1) {
                progress(&report);
                last_report = Instant::now();
            }
        }

        let (store, seeds, index2, out2) = (
            self.store.clone(),
            seeds.clone(),
            index.clone(),
            out.clone(),
        );
        blocking(move || {
            cardeploy_chunks::assemble(&index2, &store, &seeds, &out2, |_| {})?;
            Ok(())
        })
        .await?;
        report.done = true;
        progress(&report);
        tracing::info!(artifact = %artifact.name, path = %out.display(),
            fetched = report.fetched_bytes, wire = report.wire_bytes, "artifact assembled and verified");

        // The assembled file is a seed from now on: its chunks need not stay in the store.
        let store = self.store.clone();
        let max = self.max_artifact;
        blocking(move || {
            store.unkeep(&pin)?;
            store.gc(max)?;
            Ok(())
        })
        .await?;
        Ok(out)
    }
}

fn read_chunk(
    store: &ChunkStore,
    seeds: &[Seed],
    id: &Digest,
) -> Result<Vec<u8>, cardeploy_chunks::Error> {
    if store.has(id) {
        return store.get(id);
    }
    match seeds.iter().find(|s| s.contains(id)) {
        Some(seed) => seed.read(id),
        None => Err(cardeploy_chunks::Error::Unplanned(*id)),
    }
}
