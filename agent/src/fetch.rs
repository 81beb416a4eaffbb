//! Fetching an artifact by chunk index (docs/delta.md): plan against the seeds (the running
//! slot, assembled artifacts), fetch what is missing window by window — the next window is
//! already on its way while this one is written — and append every chunk in order to the
//! artifact's partial file, which is synced after each window. An interruption at any point —
//! SIGKILL, power cut, a dropped or stalled connection — costs at most the windows in flight:
//! the next attempt verifies the partial file chunk by chunk, keeps every good chunk, and plans
//! the rest.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cardeploy_chunks::transit::{DeltaDecoder, Encoding, Frame, reference_dictionary};
use cardeploy_chunks::{Assembler, ChunkIndex, Digest, INDEX_HEADER_BYTES, Plan, Seed, Source};
use cardeploy_link::{Requester, Window};
use cardeploy_protocol::{
    self as protocol, ChunksRequest, DesiredPageRequest, DesiredState, FetchProgress, IndexRequest,
    MAX_DESIRED_BYTES, PagedDesired, route,
};
use cardeploy_release::Artifact;

use crate::{Config, Error};

/// What the agent needs to fetch: where things live and how big a window is.
#[derive(Clone, Debug)]
pub(crate) struct Fetcher {
    pub indexes: PathBuf,
    pub artifacts: PathBuf,
    pub seeds: Vec<PathBuf>,
    pub window_chunks: usize,
    pub window_bytes: u64,
    pub window_deadline: Duration,
    pub prefetch: bool,
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
            indexes,
            artifacts,
            seeds: config.seeds.clone(),
            window_chunks: config.window_chunks,
            window_bytes: config.window_bytes,
            window_deadline: Duration::from_secs(config.window_deadline_secs.max(1)),
            prefetch: config.prefetch,
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
        let bytes = self.index_pages(link, id).await?;
        let index = ChunkIndex::decode_expecting(&bytes, id, self.max_artifact)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(io(&path))?;
        Ok(index)
    }

    /// An index's encoding from the twin, page by page: the first page's header says how long
    /// the whole is (and that the artifact it describes is within the car's limit) before more
    /// is asked for, so an index of any size arrives and none larger than announced is kept.
    async fn index_pages(&self, link: &Requester, id: &Digest) -> Result<Vec<u8>, Error> {
        let page = |offset: u64| {
            let request = protocol::encode(&IndexRequest {
                index: id.hex(),
                offset: (offset > 0).then_some(offset),
            });
            link.request_response(route::ARTIFACT_INDEX, Bytes::from(request))
        };
        let mut bytes = page(0).await?.to_vec();
        if bytes.len() < INDEX_HEADER_BYTES {
            return Err(cardeploy_chunks::Error::IndexMalformed(format!(
                "the first page of index {id} is {} bytes, shorter than a header",
                bytes.len()
            ))
            .into());
        }
        let total = ChunkIndex::encoded_len(&bytes, self.max_artifact)?;
        let total = usize::try_from(total).map_err(|_| {
            cardeploy_chunks::Error::IndexMalformed(format!("index {id} of {total} bytes"))
        })?;
        bytes.reserve(total.saturating_sub(bytes.len()));
        while bytes.len() < total {
            let next = page(bytes.len() as u64).await?;
            if next.is_empty() || bytes.len() + next.len() > total {
                return Err(cardeploy_chunks::Error::IndexMalformed(format!(
                    "index {id}: a page of {} bytes at offset {} does not fit its {total}-byte length",
                    next.len(),
                    bytes.len()
                ))
                .into());
            }
            bytes.extend_from_slice(&next);
        }
        if bytes.len() > total {
            return Err(cardeploy_chunks::Error::IndexMalformed(format!(
                "index {id}: {} bytes arrived for a {total}-byte encoding",
                bytes.len()
            ))
            .into());
        }
        Ok(bytes)
    }

    /// One chunk, whole (no base offered, so the twin sends no delta).
    async fn whole_chunk(
        &self,
        link: &Requester,
        index: &Digest,
        position: usize,
        len: u32,
    ) -> Result<Bytes, Error> {
        let body = protocol::encode(&ChunksRequest {
            index: index.hex(),
            base: None,
            chunks: vec![u32::try_from(position).unwrap_or(u32::MAX)],
        });
        let raw = u64::from(len);
        let limit = Window {
            max_items: 1,
            max_bytes: usize::try_from(raw + raw / 64 + 128).unwrap_or(usize::MAX),
        };
        let mut frames = link
            .request_window_within(
                route::ARTIFACT_CHUNKS,
                Bytes::from(body),
                limit,
                self.window_deadline,
            )
            .await?;
        frames.pop().ok_or_else(|| {
            Error::Fetch(format!(
                "asked the twin for chunk {position} whole, got nothing"
            ))
        })
    }

    /// Fetch one artifact. `base` is the index of the previous version the car holds (its
    /// assembled file or its running slot); it is offered to the twin only if every one of its
    /// chunks can be read here, because the twin's deltas may refer to any of them. A full disk
    /// is [`Error::DiskFull`], saying how much room the artifact still needs.
    pub async fn fetch(
        &self,
        link: &Requester,
        artifact: &Artifact,
        base: Option<Digest>,
        progress: impl FnMut(&FetchProgress),
    ) -> Result<PathBuf, Error> {
        match self.fetch_one(link, artifact, base, progress).await {
            Err(e) if disk_full(&e) => {
                let id: Digest = artifact.index.parse()?;
                let mut name = self
                    .artifact_path(&artifact.name, &id)
                    .file_name()
                    .unwrap_or_default()
                    .to_owned();
                name.push(".partial");
                let have = std::fs::metadata(self.artifacts.join(name)).map_or(0, |m| m.len());
                Err(Error::DiskFull {
                    path: self.artifacts.clone(),
                    needed: artifact.size.saturating_sub(have),
                    free: free_bytes(&self.artifacts),
                })
            }
            other => other,
        }
    }

    /// Remove the partial files of artifacts `keep` does not name: a replaced desired state's
    /// unfinished downloads (they are no seed for anything).
    pub fn prune_partials(&self, keep: &[Artifact]) {
        let wanted: Vec<PathBuf> = keep
            .iter()
            .filter_map(|a| {
                let id: Digest = a.index.parse().ok()?;
                let mut name = self.artifact_path(&a.name, &id).file_name()?.to_owned();
                name.push(".partial");
                Some(self.artifacts.join(name))
            })
            .collect();
        let Ok(dir) = std::fs::read_dir(&self.artifacts) else {
            return;
        };
        for path in dir.filter_map(Result::ok).map(|e| e.path()) {
            if path.extension().is_some_and(|e| e == "partial") && !wanted.contains(&path) {
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        tracing::info!(path = %path.display(), "removed the partial download of a replaced desired state")
                    }
                    Err(e) => tracing::warn!("could not remove {}: {e}", path.display()),
                }
            }
        }
    }

    /// Wait until the artifacts' disk has `needed` bytes free, checking every `every`.
    pub async fn room_for(&self, needed: u64, every: Duration) {
        loop {
            let dir = self.artifacts.clone();
            let free = tokio::task::spawn_blocking(move || free_bytes(&dir))
                .await
                .unwrap_or(0);
            if free >= needed {
                return;
            }
            tokio::time::sleep(every).await;
        }
    }

    async fn fetch_one(
        &self,
        link: &Requester,
        artifact: &Artifact,
        base: Option<Digest>,
        mut progress: impl FnMut(&FetchProgress),
    ) -> Result<PathBuf, Error> {
        let id: Digest = artifact.index.parse()?;
        let out = self.artifact_path(&artifact.name, &id);
        let index = Arc::new(self.index(link, &id).await?);
        // A1: the index (named by the signed release) agrees with the declared size and digest,
        // so nothing beyond the declared size is ever downloaded or written.
        cardeploy_release::check_artifact(artifact, index.size, &index.artifact.hex())?;

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

        // What an earlier attempt assembled is verified and kept; the plan covers the rest.
        let (asm, plan) = {
            let (index, seeds, out) = (index.clone(), seeds.clone(), out.clone());
            blocking(move || {
                let asm = Assembler::open(&index, &out)?;
                let plan = Plan::resuming(&index, asm.next(), None, &seeds);
                Ok((asm, Arc::new(plan)))
            })
            .await?
        };

        let base = match base {
            Some(b) if b != id => match self.index(link, &b).await {
                Ok(base_index) => {
                    let complete = base_index
                        .chunks
                        .iter()
                        .all(|c| seeds.iter().any(|s| s.contains(&c.id)));
                    if complete {
                        Some(Arc::new(base_index))
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
            already_here = plan.stats.store_bytes, from_seeds = plan.stats.seed_bytes,
            to_fetch = plan.stats.fetch_bytes, "fetch planned");

        let windows: Vec<Vec<(usize, Digest, u32)>> = plan
            .windows(self.window_chunks, self.window_bytes)
            .into_iter()
            .map(<[_]>::to_vec)
            .collect();
        let base_hex = base.as_ref().map(|b| b.id().hex());
        let request = |window: &[(usize, Digest, u32)]| {
            let body = protocol::encode(&ChunksRequest {
                index: id.hex(),
                base: base_hex.clone(),
                chunks: window.iter().map(|(p, _, _)| *p as u32).collect(),
            });
            let raw: u64 = window.iter().map(|(_, _, len)| u64::from(*len)).sum();
            // zstd never grows data by more than ~1/128 plus a small constant per frame.
            let limit = Window {
                max_items: window.len(),
                max_bytes: usize::try_from(raw + raw / 64 + 128 * window.len() as u64)
                    .unwrap_or(usize::MAX),
            };
            let (link, deadline) = (link.clone(), self.window_deadline);
            tokio::spawn(async move {
                link.request_window_within(
                    route::ARTIFACT_CHUNKS,
                    Bytes::from(body),
                    limit,
                    deadline,
                )
                .await
            })
        };

        let mut state = Some((asm, DeltaDecoder::new()));
        let mut last_report = Instant::now();
        let mut in_flight = windows.first().map(|w| request(w));
        for (n, window) in windows.iter().enumerate() {
            let Some(pending) = in_flight.take() else {
                break;
            };
            let frames = pending
                .await
                .map_err(|e| Error::Fetch(format!("a window request failed: {e}")))??;
            // Ask for the next window now: it travels while this one is written.
            if self.prefetch {
                in_flight = windows.get(n + 1).map(|w| request(w));
            }
            if frames.len() != window.len() {
                return Err(Error::Fetch(format!(
                    "asked the twin for {} chunks, got {}",
                    window.len(),
                    frames.len()
                )));
            }
            let wire: u64 = frames.iter().map(|f| f.len() as u64).sum();
            let raw: u64 = window.iter().map(|(_, _, len)| u64::from(*len)).sum();
            let (mut asm, mut decoder) = state
                .take()
                .ok_or_else(|| Error::Fetch("assembler lost".into()))?;
            let mut frames = frames;
            let mut wire = wire;
            // A frame that fails on the car is asked for again whole, and the window goes on
            // from it: a bad delta never blocks an update.
            let mut from = 0;
            loop {
                let (index, seeds, plan, base, todo, sent) = (
                    index.clone(),
                    seeds.clone(),
                    plan.clone(),
                    base.clone(),
                    window[from..].to_vec(),
                    frames[from..].to_vec(),
                );
                let (a, d, applied) = blocking(move || {
                    let applied = apply(
                        &mut asm,
                        &mut decoder,
                        Local {
                            index: &index,
                            plan: &plan,
                            seeds: &seeds,
                            base: base.as_deref(),
                        },
                        &todo,
                        &sent,
                    );
                    Ok((asm, decoder, applied))
                })
                .await?;
                (asm, decoder) = (a, d);
                match applied? {
                    Applied::All => break,
                    Applied::Again { at, why } => {
                        let k = from + at;
                        let (pos, want, len) = window[k];
                        tracing::warn!(chunk = %want, "its delta failed on the car ({why}); asking for it whole");
                        let whole = self.whole_chunk(link, &id, pos, len).await?;
                        wire += whole.len() as u64;
                        frames[k] = whole;
                        from = k;
                    }
                }
            }
            state = Some((asm, decoder));
            if !self.prefetch {
                in_flight = windows.get(n + 1).map(|w| request(w));
            }
            report.fetched_bytes += raw;
            report.wire_bytes += wire;
            if last_report.elapsed() >= Duration::from_secs(1) {
                progress(&report);
                last_report = Instant::now();
            }
        }

        let (asm, _) = state
            .take()
            .ok_or_else(|| Error::Fetch("assembler lost".into()))?;
        {
            let (index, seeds, plan) = (index.clone(), seeds.clone(), plan.clone());
            blocking(move || {
                let mut asm = asm;
                append_until(&mut asm, &index, &plan, &seeds, index.chunks.len())?;
                asm.finish()?;
                Ok(())
            })
            .await?;
        }
        report.done = true;
        progress(&report);
        tracing::info!(artifact = %artifact.name, path = %out.display(),
            fetched = report.fetched_bytes, wire = report.wire_bytes, "artifact assembled and verified");
        Ok(out)
    }
}

/// Bytes free for an unprivileged writer on the file system holding `dir` (0 when unknown).
fn free_bytes(dir: &Path) -> u64 {
    nix::sys::statvfs::statvfs(dir).map_or(0, |s| {
        s.blocks_available().saturating_mul(s.fragment_size())
    })
}

/// Whether `e` is, at its root, a write that found no space left on the device.
fn disk_full(e: &Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.raw_os_error() == Some(nix::libc::ENOSPC)
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// A `car.desired` stream item: the desired state itself, or — when it is too large for one
/// payload — read page by page and checked against the digest the item announced.
pub(crate) async fn desired_item(link: &Requester, item: &[u8]) -> Result<DesiredState, Error> {
    let whole = match protocol::decode::<DesiredState>("desired state", item) {
        Ok(state) => return Ok(state),
        Err(e) => e,
    };
    let Ok(PagedDesired { paged }) = protocol::decode::<PagedDesired>("desired state", item) else {
        return Err(Error::Protocol {
            what: "car.desired",
            source: whole,
        });
    };
    if paged.size > MAX_DESIRED_BYTES {
        return Err(Error::Fetch(format!(
            "a desired state of {} bytes is announced; this agent reads at most {MAX_DESIRED_BYTES}",
            paged.size
        )));
    }
    let size = paged.size as usize;
    let mut bytes = Vec::with_capacity(size);
    while bytes.len() < size {
        let request = protocol::encode(&DesiredPageRequest {
            digest: paged.digest.clone(),
            offset: bytes.len() as u64,
        });
        let page = link
            .request_response(route::CAR_DESIRED_PAGE, Bytes::from(request))
            .await?;
        if page.is_empty() || bytes.len() + page.len() > size {
            return Err(Error::Fetch(format!(
                "a page of {} bytes at offset {} does not fit the announced {size}-byte desired state",
                page.len(),
                bytes.len()
            )));
        }
        bytes.extend_from_slice(&page);
    }
    if Digest::of(&bytes).hex() != paged.digest {
        return Err(Error::Fetch(format!(
            "the pages of desired state {} do not hash to it",
            paged.digest
        )));
    }
    protocol::decode("desired state", &bytes).map_err(|source| Error::Protocol {
        what: "car.desired.page",
        source,
    })
}

/// What the car has locally while it applies a window.
struct Local<'a> {
    index: &'a ChunkIndex,
    plan: &'a Plan,
    seeds: &'a [Seed],
    base: Option<&'a ChunkIndex>,
}

/// How far a window got.
enum Applied {
    All,
    /// The frame at `at` is a delta that did not decode to its chunk: ask for it whole.
    Again {
        at: usize,
        why: String,
    },
}

/// Whether a decoding error is the frame's fault (a bad delta), as opposed to the car's own
/// seeds or disk.
fn frame_fault(e: &cardeploy_chunks::Error) -> bool {
    use cardeploy_chunks::Error as E;
    matches!(
        e,
        E::ChunkDigest { .. }
            | E::TransitMalformed(_)
            | E::DeltaReference { .. }
            | E::DeltaReferenceTooLarge { .. }
    )
}

/// Decode `frames` (one per `window` entry) and append them in order with every local chunk
/// before them — so a context frame finds the bytes before it in the partial file — then sync.
fn apply(
    asm: &mut Assembler,
    decoder: &mut DeltaDecoder,
    local: Local<'_>,
    window: &[(usize, Digest, u32)],
    frames: &[Bytes],
) -> Result<Applied, Error> {
    let Local {
        index,
        plan,
        seeds,
        base,
    } = local;
    for (at, (bytes, (pos, want, len))) in frames.iter().zip(window).enumerate() {
        append_until(asm, index, plan, seeds, *pos)?;
        let frame = Frame::decode(bytes)?;
        frame.expect(want, *len)?;
        let delta = !matches!(frame.encoding, Encoding::Whole);
        if matches!(frame.encoding, Encoding::Delta(_)) && base.is_none() {
            return Err(Error::Fetch(format!(
                "chunk {} came as a delta, but no base was offered",
                frame.id
            )));
        }
        let decoded = decoder.decode(
            &frame,
            base.map_or(&[][..], |b| &b.chunks),
            |r| {
                let Some(b) = base else {
                    return Err(cardeploy_chunks::Error::Unplanned(frame.id));
                };
                let range = &b.chunks[r.start as usize..(r.start + r.count) as usize];
                let mut parts = Vec::with_capacity(range.len());
                for c in range {
                    parts.push(read_seed(seeds, &c.id)?);
                }
                Ok(reference_dictionary(parts))
            },
            |n| asm.preceding(n),
        );
        match decoded {
            Ok(raw) => asm.append(&frame.id, &raw)?,
            Err(e) if delta && frame_fault(&e) => {
                return Ok(Applied::Again {
                    at,
                    why: e.to_string(),
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
    asm.sync()?;
    Ok(Applied::All)
}

/// Append the local chunks before position `upto`: from the partial file itself or a seed.
/// Fetched chunks are appended as they are decoded; meeting one here means it never arrived.
fn append_until(
    asm: &mut Assembler,
    index: &ChunkIndex,
    plan: &Plan,
    seeds: &[Seed],
    upto: usize,
) -> Result<(), Error> {
    while asm.next() < upto {
        let p = asm.next();
        let c = index.chunks[p];
        let data = match plan.sources[p] {
            Source::Fetch => {
                return Err(Error::Fetch(format!(
                    "chunk {} at position {p} never arrived",
                    c.id
                )));
            }
            Source::Local => asm.read_local(&c.id)?,
            Source::Seed { seed } => seeds[seed].read(&c.id)?,
            Source::Store => return Err(cardeploy_chunks::Error::Unplanned(c.id).into()),
        };
        asm.append(&c.id, &data)?;
    }
    Ok(())
}

fn read_seed(seeds: &[Seed], id: &Digest) -> Result<Vec<u8>, cardeploy_chunks::Error> {
    match seeds.iter().find(|s| s.contains(id)) {
        Some(seed) => seed.read(id),
        None => Err(cardeploy_chunks::Error::Unplanned(*id)),
    }
}

#[cfg(test)]
mod tests {
    use cardeploy_chunks::transit::{DeltaEncoder, whole};
    use cardeploy_chunks::{ChunkRef, Params};

    use super::*;

    fn text(seed: u64, len: usize) -> Vec<u8> {
        let words: [&[u8]; 4] = [b"slot ", b"twin ", b"car\n", b"ecu "];
        let mut x = seed | 1;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(words[(x % 4) as usize]);
        }
        out.truncate(len);
        out
    }

    #[test]
    fn a_delta_that_fails_on_the_car_is_asked_for_again_and_the_window_goes_on_from_it() {
        let a = text(1, 64 << 10);
        let mut x = a.clone();
        x[1000] ^= 0x20;
        let data = [a.clone(), x.clone()].concat();
        let index = ChunkIndex {
            params: Params::DEFAULT,
            size: data.len() as u64,
            artifact: Digest::of(&data),
            chunks: [&a, &x]
                .iter()
                .map(|c| ChunkRef {
                    id: Digest::of(c),
                    len: c.len() as u32,
                })
                .collect(),
        };
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("app");
        let mut asm = Assembler::open(&index, &out).unwrap();
        let plan = Plan::resuming(&index, 0, None, &[]);
        let window: Vec<(usize, Digest, u32)> = index
            .chunks
            .iter()
            .enumerate()
            .map(|(p, c)| (p, c.id, c.len))
            .collect();
        let whole_frame = |c: &[u8]| {
            Bytes::from(
                whole(
                    Digest::of(c),
                    c.len() as u32,
                    zstd::bulk::compress(c, 3).unwrap(),
                )
                .encode(),
            )
        };
        // X as a delta against the bytes before it, damaged on the way.
        let mut context = DeltaEncoder::new(3)
            .context(Digest::of(&x), &x, &a)
            .unwrap();
        let middle = context.data.len() / 2;
        context.data[middle] ^= 0xff;
        let frames = vec![whole_frame(&a), Bytes::from(context.encode())];
        let mut decoder = DeltaDecoder::new();
        let local = || Local {
            index: &index,
            plan: &plan,
            seeds: &[],
            base: None,
        };
        match apply(&mut asm, &mut decoder, local(), &window, &frames).unwrap() {
            Applied::Again { at, .. } => assert_eq!(at, 1),
            Applied::All => panic!("a damaged delta was taken"),
        }
        assert_eq!(asm.next(), 1, "the chunk before it is in place");
        // The same chunk, whole: the window ends and the artifact verifies.
        let again = [whole_frame(&x)];
        assert!(matches!(
            apply(&mut asm, &mut decoder, local(), &window[1..], &again).unwrap(),
            Applied::All
        ));
        asm.finish().unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), data);
    }

    #[test]
    fn a_whole_frame_that_does_not_verify_is_an_error_not_a_retry() {
        let a = text(2, 20 << 10);
        let index = ChunkIndex {
            params: Params::DEFAULT,
            size: a.len() as u64,
            artifact: Digest::of(&a),
            chunks: vec![ChunkRef {
                id: Digest::of(&a),
                len: a.len() as u32,
            }],
        };
        let dir = tempfile::tempdir().unwrap();
        let mut asm = Assembler::open(&index, &dir.path().join("app")).unwrap();
        let plan = Plan::resuming(&index, 0, None, &[]);
        let wrong = text(4, a.len());
        let frame = whole(
            Digest::of(&a),
            a.len() as u32,
            zstd::bulk::compress(&wrong, 3).unwrap(),
        );
        let result = apply(
            &mut asm,
            &mut DeltaDecoder::new(),
            Local {
                index: &index,
                plan: &plan,
                seeds: &[],
                base: None,
            },
            &[(0, Digest::of(&a), a.len() as u32)],
            &[Bytes::from(frame.encode())],
        );
        assert!(
            matches!(
                result,
                Err(Error::Chunks(cardeploy_chunks::Error::ChunkDigest { .. }))
            ),
            "{:?}",
            result.err()
        );
    }
}
