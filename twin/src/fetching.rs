//! What a car reads from the twin besides control messages — chunk indexes, chunk windows, and
//! desired states too large for one payload — and what bounds it.
//!
//! - **A car reads only what is its own**: the indexes of the artifacts of releases it was sent
//!   (its current or an earlier desired state, the most recent [`crate::db::SENT_KEPT`]) or
//!   reports running. Anything else, as the index asked for or as the base of deltas, is refused
//!   with an error that says so, before any disk, CPU or cache is spent on it.
//! - **Frames are made as they are read**: a window is served one frame at a time, and each
//!   frame waits for room in the connection's outbound budget (`crates/link`), so a car that
//!   stops reading holds at most one frame per open stream.
//! - **Delta work is bounded**: it runs on a pool of `delta_workers` threads with at most one job
//!   per car in flight; a job keeps its place in the pool until it really ends, also when the car
//!   that asked has gone.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use cardeploy_chunks::Digest;
use cardeploy_link::Refusal;
use cardeploy_protocol::{
    self as protocol, CarId, ChunksRequest, DesiredPageRequest, DesiredState, IndexRequest,
    PAGE_BYTES, PagedDesired, PagedRef,
};
use futures::StreamExt;
use futures::stream::BoxStream;

use crate::artifacts::{Checker, Effort, digest};
use crate::{Error, Twin};

fn refuse(e: impl std::fmt::Display) -> Refusal {
    Refusal::new(e.to_string())
}

fn internal(car: &CarId, e: impl std::fmt::Display) -> Refusal {
    tracing::error!(%car, "{e}");
    Refusal::new("the twin failed to read its own records; try again later")
}

/// Run `job` on the delta pool: one job per car at a time, at most `delta_workers` at once.
/// The car's turn and the pool's permit travel into the job and end with it.
async fn on_pool<T: Send + 'static>(
    twin: &Arc<Twin>,
    car: &CarId,
    job: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Refusal> {
    let turn = twin
        .fleet
        .with_car(car, |live| live.delta_turn.clone())
        .lock_owned()
        .await;
    let permit = twin
        .delta_pool
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| Refusal::new("the twin is shutting down"))?;
    twin.artifacts
        .served
        .delta_jobs
        .fetch_add(1, Ordering::Relaxed);
    let twin = twin.clone();
    tokio::task::spawn_blocking(move || {
        let _held = (turn, permit);
        let served = &twin.artifacts.served;
        let running = served.delta_jobs_running.fetch_add(1, Ordering::SeqCst) + 1;
        served.delta_jobs_peak.fetch_max(running, Ordering::SeqCst);
        let result = job();
        served.delta_jobs_running.fetch_sub(1, Ordering::SeqCst);
        result
    })
    .await
    .map_err(refuse)
}

async fn blocking<T: Send + 'static>(
    job: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Refusal> {
    tokio::task::spawn_blocking(job).await.map_err(refuse)
}

impl Twin {
    /// The chunk indexes of one release's artifacts (releases never change once registered).
    async fn release_indexes(&self, release: &str) -> Result<Arc<Vec<Digest>>, Error> {
        if let Some(known) = self
            .release_indexes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(release)
        {
            return Ok(known.clone());
        }
        let indexes: Vec<Digest> = match self.db.release(release).await? {
            Some((_, envelope)) => {
                let manifest: cardeploy_release::Release =
                    serde_json::from_slice(&envelope.payload).map_err(|source| Error::Corrupt {
                        car: format!("(release {release})"),
                        what: "release manifest",
                        source,
                    })?;
                manifest
                    .artifacts
                    .iter()
                    .filter_map(|a| a.index.parse().ok())
                    .collect()
            }
            // Not registered (yet: another instance may register it in a moment): not kept.
            None => return Ok(Arc::new(Vec::new())),
        };
        let indexes = Arc::new(indexes);
        self.release_indexes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(release.to_owned(), indexes.clone());
        Ok(indexes)
    }

    /// The indexes `car` may read: of the releases it was sent and the one it reports running.
    /// Kept with the car's live record until its desired or reported release changes.
    pub(crate) async fn readable(&self, car: &CarId) -> Result<Arc<HashSet<Digest>>, Error> {
        if let Some(known) = self.fleet.with_car(car, |live| live.readable.clone()) {
            return Ok(known);
        }
        let mut releases = self.db.sent_releases(car).await?;
        if let Some(reported) = self.db.reported(car).await?
            && let Some((line, version)) = reported
                .state
                .release
                .as_deref()
                .and_then(|label| label.split_once('@'))
            && let Some(running) = self.db.release_by_version(line, version).await?
        {
            releases.push(running);
        }
        let mut readable = HashSet::new();
        for release in releases {
            readable.extend(self.release_indexes(&release).await?.iter().copied());
        }
        let readable = Arc::new(readable);
        self.fleet
            .with_car(car, |live| live.readable = Some(readable.clone()));
        Ok(readable)
    }

    /// `car`'s desired or reported release changed: what it may read is worked out again.
    pub(crate) fn forget_readable(&self, car: &CarId) {
        self.fleet.if_present(car, |live| live.readable = None);
    }

    /// Refuse `index` (and `base`) unless `car` may read them.
    async fn authorize(
        &self,
        car: &CarId,
        index: &Digest,
        base: Option<&Digest>,
    ) -> Result<(), Refusal> {
        let readable = self.readable(car).await.map_err(|e| internal(car, e))?;
        if !readable.contains(index) {
            return Err(Refusal::new(format!(
                "index {index} is not an artifact of a release this car was sent or runs; a car reads only its own artifacts"
            )));
        }
        if let Some(base) = base
            && !readable.contains(base)
        {
            return Err(Refusal::new(format!(
                "base {base} is not an artifact of a release this car was sent or runs; offer the index of an artifact you hold"
            )));
        }
        Ok(())
    }
}

/// `artifact.index`: one page of an index the car may read.
pub(crate) async fn index_page(
    twin: &Arc<Twin>,
    car: &CarId,
    data: &[u8],
) -> Result<Bytes, Refusal> {
    let request: IndexRequest = protocol::decode("artifact.index request", data).map_err(refuse)?;
    let id = digest(&request.index).map_err(refuse)?;
    twin.authorize(car, &id, None).await?;
    let offset = request.offset.unwrap_or(0);
    let twin = twin.clone();
    let page = blocking(move || twin.artifacts.index_page(&id, offset))
        .await?
        .map_err(refuse)?;
    Ok(Bytes::from(page))
}

/// `artifact.chunks`: one frame per requested position, in order, each made when the stream is
/// polled (see the module docs).
pub(crate) fn chunks(
    twin: Arc<Twin>,
    car: CarId,
    data: Bytes,
) -> BoxStream<'static, Result<Bytes, Refusal>> {
    async_stream::stream! {
        let request: ChunksRequest = match protocol::decode("artifact.chunks request", &data) {
            Ok(r) => r,
            Err(e) => {
                yield Err(refuse(e));
                return;
            }
        };
        let ids = digest(&request.index).and_then(|index| {
            let base = request.base.as_deref().map(digest).transpose()?;
            Ok((index, base))
        });
        let (index, base) = match ids {
            Ok(ids) => ids,
            Err(e) => {
                yield Err(refuse(e));
                return;
            }
        };
        if let Err(refusal) = twin.authorize(&car, &index, base.as_ref()).await {
            tracing::info!(%car, "artifact.chunks refused: {refusal}");
            yield Err(refusal);
            return;
        }
        let checked = {
            let twin = twin.clone();
            blocking(move || twin.artifacts.window(&request)).await
        };
        let mut window = match checked {
            Ok(Ok(window)) => window,
            Ok(Err(e)) => {
                tracing::warn!(%car, "artifact.chunks refused: {e}");
                yield Err(refuse(e));
                return;
            }
            Err(refusal) => {
                yield Err(refusal);
                return;
            }
        };
        let mut checker = Checker::default();
        for i in 0..window.positions.len() {
            let mut made = false;
            let frame = loop {
                let read = {
                    let twin = twin.clone();
                    blocking(move || {
                        let frame = twin.artifacts.read(&window, i, &mut checker);
                        (window, checker, frame)
                    })
                    .await
                };
                let (w, c, frame) = match read {
                    Ok(read) => read,
                    Err(refusal) => {
                        yield Err(refusal);
                        return;
                    }
                };
                (window, checker) = (w, c);
                match frame {
                    Ok(Some(bytes)) => break Ok(bytes),
                    Ok(None) if !made => {
                        made = true;
                        let job = {
                            let twin = twin.clone();
                            on_pool(&twin.clone(), &car, move || {
                                let mut maker = twin.artifacts.maker(Effort::OnDemand);
                                let all = i..window.positions.len();
                                let made = twin.artifacts.make(&mut window, all, &mut maker);
                                (window, made)
                            })
                            .await
                        };
                        match job {
                            Ok((w, Ok(()))) => window = w,
                            Ok((w, Err(e))) => {
                                window = w;
                                break Err(refuse(e));
                            }
                            Err(refusal) => {
                                yield Err(refusal);
                                return;
                            }
                        }
                    }
                    // Made, and still nothing good in the cache: send it whole.
                    Ok(None) => {
                        window.uncached.insert(i);
                    }
                    Err(e) => break Err(refuse(e)),
                }
            };
            match frame {
                Ok(bytes) => {
                    let served = &twin.artifacts.served;
                    served.chunks.fetch_add(1, Ordering::Relaxed);
                    served.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    yield Ok(Bytes::from(bytes));
                }
                Err(refusal) => {
                    tracing::warn!(%car, "artifact.chunks failed: {refusal}");
                    yield Err(refusal);
                    return;
                }
            }
        }
    }
    .boxed()
}

/// What a `car.desired` stream item is for `state`: the state itself when it fits in one
/// payload, else a reference to read it by pages.
pub(crate) fn desired_item(state: &DesiredState) -> Bytes {
    let whole = protocol::encode(state);
    if whole.len() as u64 <= PAGE_BYTES {
        return Bytes::from(whole);
    }
    Bytes::from(protocol::encode(&PagedDesired {
        paged: PagedRef {
            digest: Digest::of(&whole).hex(),
            size: whole.len() as u64,
        },
    }))
}

/// `car.desired.page`: a page of the car's current desired state, when it is the one named.
pub(crate) fn desired_page(twin: &Twin, car: &CarId, data: &[u8]) -> Result<Bytes, Refusal> {
    let request: DesiredPageRequest =
        protocol::decode("car.desired.page request", data).map_err(refuse)?;
    let current = twin
        .fleet
        .with_car(car, |live| live.desired.borrow().clone());
    let Some(state) = current else {
        return Err(Refusal::new("this car has no desired state"));
    };
    let whole = protocol::encode(&state);
    if Digest::of(&whole).hex() != request.digest {
        return Err(Refusal::new(
            "that desired state was replaced; the car.desired stream carries the new one",
        ));
    }
    let start = usize::try_from(request.offset)
        .ok()
        .filter(|&o| o < whole.len())
        .ok_or_else(|| {
            Refusal::new(format!(
                "offset {} is beyond the desired state's {} bytes",
                request.offset,
                whole.len()
            ))
        })?;
    let end = whole.len().min(start + PAGE_BYTES as usize);
    Ok(Bytes::copy_from_slice(&whole[start..end]))
}
