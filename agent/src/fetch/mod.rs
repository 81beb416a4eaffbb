//! Fetching an artifact by chunk index (docs/delta.md): plan against the seeds (the running
//! slot, assembled artifacts), fetch what is missing window by window — the next window is
//! already on its way while this one is written — and append every chunk in order to the
//! artifact's partial file, which is synced after each window. An interruption at any point —
//! SIGKILL, power cut, a dropped or stalled connection — costs at most the windows in flight:
//! the next attempt verifies the partial file chunk by chunk, keeps every good chunk, and plans
//! the rest.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::release::HeldArtifact;
use bytes::Bytes;
use cardeploy_chunks::transit::DeltaDecoder;
use cardeploy_chunks::{Assembler, Digest, Plan, Seed};
use cardeploy_link::{Requester, Window};
use cardeploy_protocol::{self as protocol, ChunksRequest, FetchProgress, route};

use crate::error::io;
use crate::{Config, Error};

mod disk;
mod frames;
mod pages;

use disk::{disk_full, free_bytes};
use frames::{Applied, Local, append_until, apply};
pub(crate) use pages::desired_item;

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

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Task(format!("a blocking fetch step: {e}")))?
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
        self.artifacts.join(file_name(name, index))
    }

    /// Whether the artifact is assembled on disk.
    pub fn on_disk(&self, name: &str, index: &Digest) -> bool {
        self.artifact_path(name, index).is_file()
    }

    /// Where it is assembled until it is complete (the assembler's name for it).
    fn partial_path(&self, name: &str, index: &Digest) -> PathBuf {
        self.artifacts
            .join(format!("{}.partial", file_name(name, index)))
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
            Error::TwinAnswer(format!(
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
        artifact: &HeldArtifact,
        base: Option<Digest>,
        progress: impl FnMut(&FetchProgress),
    ) -> Result<PathBuf, Error> {
        match self.fetch_one(link, artifact, base, progress).await {
            Err(e) if disk_full(&e) => {
                let partial = self.partial_path(artifact.name(), &artifact.index);
                let have = std::fs::metadata(partial).map_or(0, |m| m.len());
                Err(Error::DiskFull {
                    path: self.artifacts.clone(),
                    needed: artifact.declared.size.saturating_sub(have),
                    free: free_bytes(&self.artifacts),
                })
            }
            other => other,
        }
    }

    /// Remove the partial files of artifacts `keep` does not name: a replaced desired state's
    /// unfinished downloads (they are no seed for anything).
    pub fn prune_partials(&self, keep: &[HeldArtifact]) {
        let wanted: Vec<PathBuf> = keep
            .iter()
            .map(|a| self.partial_path(a.name(), &a.index))
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

    async fn fetch_one(
        &self,
        link: &Requester,
        artifact: &HeldArtifact,
        base: Option<Digest>,
        mut progress: impl FnMut(&FetchProgress),
    ) -> Result<PathBuf, Error> {
        let id = artifact.index;
        let out = self.artifact_path(artifact.name(), &id);
        let index = Arc::new(self.index(link, &id).await?);
        // A1: the index (named by the signed release) agrees with the declared size and digest,
        // so nothing beyond the declared size is ever downloaded or written.
        cardeploy_release::check_artifact(&artifact.declared, index.size, &index.artifact.hex())?;

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
            artifact: artifact.name().to_owned(),
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
        tracing::info!(artifact = %artifact.name(), index = %id, planned = plan.stats.planned_bytes,
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
                .map_err(|e| Error::Task(format!("a window request: {e}")))??;
            // Ask for the next window now: it travels while this one is written.
            if self.prefetch {
                in_flight = windows.get(n + 1).map(|w| request(w));
            }
            if frames.len() != window.len() {
                return Err(Error::TwinAnswer(format!(
                    "asked the twin for {} chunks, got {}",
                    window.len(),
                    frames.len()
                )));
            }
            let wire: u64 = frames.iter().map(|f| f.len() as u64).sum();
            let raw: u64 = window.iter().map(|(_, _, len)| u64::from(*len)).sum();
            let (mut asm, mut decoder) = state
                .take()
                .ok_or_else(|| Error::Task("the window task lost the assembler".into()))?;
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
            .ok_or_else(|| Error::Task("the window task lost the assembler".into()))?;
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
        tracing::info!(artifact = %artifact.name(), path = %out.display(),
            fetched = report.fetched_bytes, wire = report.wire_bytes, "artifact assembled and verified");
        Ok(out)
    }
}

/// The file name of an assembled artifact: its name and the start of its index id (a new
/// version is another file, so the old one stays a seed until the new one is complete).
fn file_name(name: &str, index: &Digest) -> String {
    format!("{name}@{}", &index.hex()[..16])
}

#[cfg(test)]
mod tests;
