//! Deltas made ahead of the cars: when an operator registers a release or sets a desired state,
//! the twin makes the deltas of the release's artifacts against the artifacts cars run, at the
//! configured level, in the background. The first car is then served from the delta cache like
//! every later one; a position not ready yet is made on demand as before (`crate::fetching`).
//!
//! - **Only operator actions start it** (`POST /api/v1/releases`, `PUT /api/v1/cars/{id}/desired`);
//!   nothing a car sends does. The bases are the artifacts of the release each car reports
//!   running — a registered release, the same one the car may already ask deltas against — of the
//!   same name as the target artifact, at most [`BASES_PER_TARGET`] per target, the most run first.
//! - **One job per (target, base) pair at a time**, at most [`PAIRS_PENDING`] pairs waiting or
//!   running; a pair asked for again while its job runs is not queued twice.
//! - **It shares the delta pool with the cars, one chunk per turn**: a job takes a pool permit for
//!   a single chunk and queues again, so a car's on-demand job waits for at most one chunk per
//!   worker, not for a whole artifact.
//! - **Its frames take the cache's usual road**: checked by decoding before they are cached,
//!   written atomically, counted against the cap. They are `full` entries and replace the `trial`
//!   ones an on-demand job made where its cheap trial kept the configured level from being tried.
//!
//! Jobs are not persisted: after a restart, cars get what is cached and the rest on demand.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use cardeploy_chunks::Digest;
use cardeploy_protocol::CarId;

use crate::artifacts::Effort;
use crate::{Error, Twin};

/// Bases per target artifact: the distinct versions of it the fleet runs, most run first.
pub(crate) const BASES_PER_TARGET: usize = 8;
/// (target, base) pairs waiting or running at once; more are left to be made on demand.
pub(crate) const PAIRS_PENDING: usize = 64;

/// The pairs with a job waiting or running.
#[derive(Debug, Default)]
pub(crate) struct Jobs {
    pending: std::sync::Mutex<HashSet<(Digest, Digest)>>,
}

impl Jobs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<(Digest, Digest)>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Pairs with a job waiting or running.
    pub fn pending(&self) -> usize {
        self.lock().len()
    }

    /// How many of `pairs` have a job waiting or running.
    pub fn pending_of(&self, pairs: &HashSet<(Digest, Digest)>) -> usize {
        self.lock().iter().filter(|p| pairs.contains(p)).count()
    }

    /// Claim `pair` for a new job: false when one is already pending or too many are.
    fn claim(&self, pair: (Digest, Digest)) -> bool {
        let mut pending = self.lock();
        if pending.contains(&pair) {
            return false;
        }
        if pending.len() >= PAIRS_PENDING {
            tracing::warn!(target = %pair.0, base = %pair.1, "{PAIRS_PENDING} delta pairs are being made ahead already; this one is made on demand");
            return false;
        }
        pending.insert(pair)
    }

    fn release(&self, pair: &(Digest, Digest)) {
        self.lock().remove(pair);
    }
}

/// A pair's place in [`Jobs`], given back when dropped.
struct Claim {
    twin: Arc<Twin>,
    pair: (Digest, Digest),
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.twin.ahead.release(&self.pair);
    }
}

impl Twin {
    /// The artifacts of a registered release, by name: their chunk indexes.
    async fn artifacts_by_name(&self, release: &str) -> Result<BTreeMap<String, Digest>, Error> {
        let Some((_, envelope)) = self.db.release(release).await? else {
            return Ok(BTreeMap::new());
        };
        let manifest: cardeploy_release::Release = serde_json::from_slice(&envelope.payload)
            .map_err(|source| Error::Corrupt {
                car: format!("(release {release})"),
                what: "release manifest",
                source,
            })?;
        Ok(manifest
            .artifacts
            .iter()
            .filter_map(|a| Some((a.name.clone(), a.index.parse().ok()?)))
            .collect())
    }

    /// Pairs of `release`'s deltas still being made ahead against the releases in `running`
    /// (`line@version` labels: what a deployment's cars report). A deployment's first car waits
    /// for them — it is then served from the cache like every later one — and for no pair made
    /// for cars outside it.
    pub(crate) async fn ahead_pending_for(
        &self,
        release: &str,
        running: &HashSet<String>,
    ) -> Result<usize, Error> {
        let targets = self.artifacts_by_name(release).await?;
        let mut pairs = HashSet::new();
        for label in running {
            let Some(base) = self.release_by_label(label).await? else {
                continue;
            };
            if base == release {
                continue;
            }
            for (name, base) in self.artifacts_by_name(&base).await? {
                if let Some(target) = targets.get(&name).filter(|t| **t != base) {
                    pairs.insert((*target, base));
                }
            }
        }
        Ok(self.ahead.pending_of(&pairs))
    }

    /// The release `car` reports running, by digest.
    async fn running(&self, car: &CarId) -> Result<Option<String>, Error> {
        match self.db.reported(car).await?.and_then(|r| r.state.release) {
            Some(label) => self.release_by_label(&label).await,
            None => Ok(None),
        }
    }

    /// The registered release a car's `line@version` label names, by digest.
    async fn release_by_label(&self, label: &str) -> Result<Option<String>, Error> {
        match label.split_once('@') {
            Some((line, version)) => self.db.release_by_version(line, version).await,
            None => Ok(None),
        }
    }

    /// Make `release`'s deltas ahead against what `cars` run (see the module docs). Returns the
    /// pairs whose job started; the jobs run in the background.
    pub(crate) async fn deltas_ahead(
        self: &Arc<Self>,
        release: &str,
        cars: &[CarId],
    ) -> Result<usize, Error> {
        let targets = self.artifacts_by_name(release).await?;
        // How many cars run each (artifact name, base) — the most run bases go first.
        let mut held: HashMap<(String, Digest), usize> = HashMap::new();
        let mut runs: HashMap<String, BTreeMap<String, Digest>> = HashMap::new();
        for car in cars {
            let Some(running) = self.running(car).await? else {
                continue;
            };
            if running == release {
                continue;
            }
            if !runs.contains_key(&running) {
                let artifacts = self.artifacts_by_name(&running).await?;
                runs.insert(running.clone(), artifacts);
            }
            for (name, base) in &runs[&running] {
                if targets.get(name).is_some_and(|t| t != base) {
                    *held.entry((name.clone(), *base)).or_default() += 1;
                }
            }
        }
        let mut started = 0;
        for (name, target) in &targets {
            let mut bases: Vec<(Digest, usize)> = held
                .iter()
                .filter(|((n, _), _)| n == name)
                .map(|((_, base), cars)| (*base, *cars))
                .collect();
            bases.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.hex().cmp(&b.0.hex())));
            for (base, _) in bases.into_iter().take(BASES_PER_TARGET) {
                if self.ahead.claim((*target, base)) {
                    started += 1;
                    let twin = self.clone();
                    let target = *target;
                    tokio::spawn(async move {
                        // Released however the job ends, a panic included: a pair stuck as
                        // pending would never be made ahead again.
                        let _claim = Claim {
                            twin: twin.clone(),
                            pair: (target, base),
                        };
                        twin.run_ahead(target, base).await;
                    });
                }
            }
        }
        Ok(started)
    }

    /// One pair's job: every missing chunk at the configured level, one chunk per pool turn.
    async fn run_ahead(self: Arc<Self>, target: Digest, base: Digest) {
        let started = std::time::Instant::now();
        let twin = self.clone();
        let window =
            tokio::task::spawn_blocking(move || twin.artifacts.ahead_window(&target, &base)).await;
        let mut window = match window {
            Ok(Ok(window)) => window,
            Ok(Err(e)) => {
                tracing::warn!(%target, %base, "deltas ahead: {e}");
                return;
            }
            Err(e) => {
                tracing::error!(%target, %base, "deltas ahead: {e}");
                return;
            }
        };
        let mut maker = self.artifacts.maker(Effort::Ahead);
        let served = &self.artifacts.served;
        for i in 0..window.positions.len() {
            let Ok(permit) = self.delta_pool.clone().acquire_owned().await else {
                return; // shutting down
            };
            let twin = self.clone();
            let job = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let made = twin.artifacts.make(&mut window, i..i + 1, &mut maker);
                (window, maker, made)
            })
            .await;
            match job {
                Ok((w, m, Ok(()))) => (window, maker) = (w, m),
                Ok((_, _, Err(e))) => {
                    tracing::warn!(%target, %base, "deltas ahead stopped: {e}");
                    return;
                }
                Err(e) => {
                    tracing::error!(%target, %base, "deltas ahead failed: {e}");
                    return;
                }
            }
            served.ahead_chunks.fetch_add(1, Ordering::Relaxed);
        }
        served.ahead_pairs.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%target, %base, chunks = window.positions.len(), took = ?started.elapsed(), "deltas made ahead");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(n: u32) -> (Digest, Digest) {
        (Digest::of(&n.to_le_bytes()), Digest::of(b"base"))
    }

    #[test]
    fn a_pair_has_one_job_at_a_time_and_pending_pairs_are_bounded() {
        let jobs = Jobs::default();
        assert!(jobs.claim(pair(0)));
        assert!(!jobs.claim(pair(0)), "the same pair twice");
        for n in 1..PAIRS_PENDING as u32 {
            assert!(jobs.claim(pair(n)));
        }
        assert_eq!(jobs.pending(), PAIRS_PENDING);
        assert!(!jobs.claim(pair(PAIRS_PENDING as u32)), "one pair too many");
        jobs.release(&pair(0));
        assert!(
            jobs.claim(pair(0)),
            "a pair whose job ended may be made again"
        );
    }
}
