//! The deployment driver: takes a desired state (verify, persist, report), fetches what its
//! release needs, and hands the release to the workload parts that apply it (the OS today).
//! Every step goes through the pure [`machine`]; its state is persisted by the state cell
//! before anything follows from it.

pub mod machine;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cardeploy_link::Requester;
use cardeploy_protocol::{DesiredState, FetchProgress, Phase, ReportBody};
use cardeploy_release::{CarContext, CounterMark, TrustedRoot};

pub use machine::Deployment;
use machine::Event;

use crate::cell::Cell;
use crate::containers::{Containers, Workloads};
use crate::fetch::Fetcher;
use crate::os::host::Host;
use crate::release::{Release, ReleaseRef};
use crate::reporter::Reporter;
use crate::state::State;
use crate::{Error, now_secs, verify};

/// How often a fetch stopped by a full disk checks for room again.
const DISK_RECHECK: Duration = Duration::from_secs(5);

/// The workload parts that apply a release once it is on the car. The OS is one; containers
/// join beside it (a handle of their own, a claim on the releases that carry their artifacts).
pub(crate) struct Parts {
    pub os: Option<Arc<Host>>,
    pub containers: Option<Arc<Containers>>,
    pub workloads: Option<Arc<Workloads>>,
}

impl Parts {
    /// Whether some part applies `release` (else it is done once it is on the car).
    pub fn apply(&self, release: &Release) -> bool {
        (self.os.is_some() && release.has_os())
            || (self.workloads.is_some() && release.has_workloads())
    }

    /// Something they may wait for happened (a new release, a finished fetch, the twin).
    pub fn wake(&self) {
        if let Some(os) = &self.os {
            os.wake.notify_one();
        }
        if let Some(workloads) = &self.workloads {
            workloads.wake.notify_one();
        }
    }

    /// Serve `release`'s images (and those of the release whose workloads run).
    fn serve(&self, release: &Release, running: Option<&Release>) -> Result<(), Error> {
        match &self.containers {
            Some(containers) => containers.serve(release, running),
            None => Ok(()),
        }
    }
}

/// What the car knows of itself for the checks, beyond its state.
pub(crate) struct Car {
    pub id: String,
    /// This hardware's RAUC `compatible` (from RAUC when the agent manages the OS).
    pub compatible: String,
    pub max_artifact_bytes: u64,
}

pub(crate) struct Deployer {
    pub cell: Arc<Cell>,
    pub reporter: Arc<Reporter>,
    pub fetcher: Arc<Fetcher>,
    pub parts: Parts,
    pub roots: verify::Roots,
    /// The root in force: the pinned one or the newest rotation accepted.
    pub trusted: Mutex<TrustedRoot>,
    pub car: Car,
}

/// The work a desired state asks for, run alongside the session's other duties.
pub(crate) type Job = std::pin::Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

impl Deployer {
    /// What the car knows about itself for the checks of docs/release-format.md.
    fn car_context(&self, state: &State) -> CarContext {
        CarContext {
            car_id: self.car.id.clone(),
            compatible: self.car.compatible.clone(),
            now: now_secs(),
            counter: state
                .last_counter
                .zip(state.counter_scope.clone())
                .map(|(last, scope)| CounterMark { scope, last }),
            installed: state.installed.clone(),
            os: state.installed_os.clone(),
            max_artifact_bytes: self.car.max_artifact_bytes,
        }
    }

    fn on_disk(&self) -> impl Fn(&str, &cardeploy_chunks::Digest) -> bool + '_ {
        |name, index| self.fetcher.on_disk(name, index)
    }

    /// The release whose workloads run on the car's k3s (kept until a newer one is promoted).
    fn running_release(&self) -> Option<Release> {
        self.cell.read(|s| s.workloads.running_release().cloned())
    }

    async fn refuse(&self, message: String) {
        tracing::warn!("{message}");
        self.reporter.event("refused", message).await;
    }

    /// Take a desired state: verify, persist, then report. Returns true when artifacts must be
    /// fetched for it.
    pub async fn accept(&self, message: DesiredState) -> bool {
        // The twin repeats the current desired state on every hello: nothing new.
        if self.cell.read(|s| s.desired.as_ref() == Some(&message)) {
            tracing::debug!("desired state already accepted");
            return false;
        }
        let root = self
            .trusted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let context = self.cell.read(|s| self.car_context(s));
        let (trusted, new_roots, accepted) = match verify::check(&root, &message, &context) {
            Ok(ok) => ok,
            Err(e) => {
                self.refuse(format!("desired state refused: {e}")).await;
                return false;
            }
        };
        let checked = accepted.release;
        let release = checked
            .digest
            .parse()
            .map_err(Error::from)
            .and_then(|digest| {
                let id = ReleaseRef {
                    digest,
                    line: checked.release.line.clone(),
                    version: checked.version.clone(),
                };
                Ok(Release::new(
                    id,
                    checked.release.artifacts.clone(),
                    checked.release.images.clone(),
                )?)
            });
        let release = match release {
            Ok(release) => release,
            Err(e) => {
                self.refuse(format!("desired state refused: {e}")).await;
                return false;
            }
        };
        // New roots are kept before anything signed under them is acted on.
        if let Err(e) = self.roots.store(&new_roots) {
            let message = format!("could not store the new root: {e}");
            tracing::error!("{message}");
            self.reporter.event("refused", message).await;
            return false;
        }
        // D4a: the scope the counter is accepted in (a rotation to another director starts one).
        let scope = trusted.counter_scope();
        if !new_roots.is_empty() {
            tracing::info!(version = trusted.root().version, "root rotated");
        }
        *self.trusted.lock().unwrap_or_else(PoisonError::into_inner) = trusted;

        let counter = accepted.desired.counter;
        let parts = self.parts.apply(&release);
        // Persist before anything else happens: after a crash the agent knows what it accepted,
        // and a replay of an older counter stays refused.
        let updated = self
            .cell
            .update(|next| {
                next.desired = Some(message);
                next.last_counter = Some(counter);
                next.counter_scope = Some(scope);
                next.accepted = next.accepted.saturating_add(1);
                let event = Event::Accepted {
                    release: release.id.clone(),
                    missing: next.missing(&release, self.on_disk()),
                    parts,
                    failed: next.reported.phase == Phase::Failed,
                };
                let before = next.deployment.clone();
                next.deployment = machine::decide(&before, event);
                if next.deployment == before {
                    // The same release signed again (a refresh before expiry): only the
                    // counter moved.
                    return false;
                }
                next.release = Some(release.clone());
                if matches!(next.deployment, Deployment::Done { .. }) {
                    next.record_installed();
                }
                matches!(next.deployment, Deployment::Fetching { .. })
            })
            .await;
        let fetch = match updated {
            Ok(updated) => updated.value,
            Err(why) => {
                tracing::error!(counter, "could not persist desired state: {why}");
                // Nothing changed on the car; the twin hears why.
                let mut reported = self.cell.reported();
                reported.phase = Phase::Failed;
                reported.last_error = Some(format!("could not persist desired #{counter}: {why}"));
                self.reporter.state(reported).await;
                return false;
            }
        };
        // Downloads of a replaced desired state are never finished: their partial files go.
        self.fetcher.prune_partials(&release.artifacts);
        // A release already on the car is served at once (one being fetched, when it is there).
        let running = self.running_release();
        if !fetch && let Err(e) = self.parts.serve(&release, running.as_ref()) {
            tracing::error!("{e}");
            self.reporter.event("images", e.to_string()).await;
        }
        let reported = self.cell.reported();
        tracing::info!(counter, release = %release.id.digest, line = %release.id.line,
            version = %release.id.version, phase = ?reported.phase, "desired state verified and accepted");
        self.reporter.state(reported).await;
        self.parts.wake();
        fetch
    }

    /// A fetch an earlier session (or an earlier run of the agent) did not finish.
    pub fn fetch_pending(&self) -> bool {
        self.cell
            .read(|s| matches!(s.deployment, Deployment::Fetching { .. }))
    }

    /// The fetch job: every artifact of the accepted release the car lacks, one after the
    /// other; each finished artifact is recorded at once, so an interruption never repeats it.
    pub fn fetch(self: &Arc<Self>, link: &Requester) -> Job {
        Box::pin(self.clone().fetch_all(link.clone()))
    }

    /// The fetch job once the disk has `needed` bytes free again.
    pub fn fetch_when_room(self: &Arc<Self>, link: &Requester, needed: u64) -> Job {
        let (deployer, link) = (self.clone(), link.clone());
        Box::pin(async move {
            deployer.fetcher.room_for(needed, DISK_RECHECK).await;
            tracing::info!("there is room again; the fetch goes on");
            deployer.fetch_all(link).await
        })
    }

    async fn fetch_all(self: Arc<Self>, link: Requester) -> Result<(), Error> {
        let Some(release) = self.cell.read(|s| s.release.clone()) else {
            return Ok(());
        };
        // Names were checked with the release (M3): safe file names, unique.
        for artifact in &release.artifacts {
            let held = self
                .cell
                .read(|s| s.artifacts.get(artifact.name()).copied());
            let path = self.fetcher.artifact_path(artifact.name(), &artifact.index);
            if held == Some(artifact.index) && path.is_file() {
                continue;
            }
            let progress = |p: &FetchProgress| {
                self.reporter.send_soon(ReportBody::Progress {
                    progress: p.clone(),
                });
            };
            // A seed that changed under the reader (someone wrote to the slot) is read again
            // once: the new plan sees what is really there now.
            let path = match self.fetcher.fetch(&link, artifact, held, progress).await {
                Err(Error::Chunks(e @ cardeploy_chunks::Error::SeedChanged { .. })) => {
                    tracing::warn!("{e}; planning again");
                    self.fetcher.fetch(&link, artifact, held, progress).await?
                }
                other => other?,
            };
            let previous = self
                .cell
                .update(|s| {
                    s.artifacts
                        .insert(artifact.name().to_owned(), artifact.index)
                })
                .await?
                .value;
            // The previous version was the base of this download; the new one is the base of
            // the next.
            // ... unless a release the car keeps uses it (the running workloads' for a rollback
            // without the network, the one in rollout for its manifests); it goes when that
            // release retires.
            if let Some(old) = previous
                && old != artifact.index
                && !self.cell.read(|s| s.keeps_file(artifact.name(), &old))
            {
                let old_path = self.fetcher.artifact_path(artifact.name(), &old);
                if let Err(e) = std::fs::remove_file(&old_path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!("could not remove {}: {e}", old_path.display());
                }
            }
            tracing::info!(artifact = %artifact.name(), path = %path.display(), "artifact ready");
        }
        Ok(())
    }

    /// A fetch job ended: record the outcome. Link errors end the session instead (the next
    /// session resumes the fetch). A full disk leaves the fetch pending with the reason
    /// reported; the returned byte count is the room to wait for before it goes on.
    pub async fn fetched(&self, result: Result<(), Error>) -> Result<Option<u64>, Error> {
        let (event, needed) = match result {
            Ok(()) => {
                let release = self.cell.read(|s| s.release.clone());
                let running = self.running_release();
                let served = match &release {
                    Some(release) => self.parts.serve(release, running.as_ref()),
                    None => Ok(()),
                };
                match served {
                    Ok(()) => {
                        let parts = release.as_ref().is_some_and(|r| self.parts.apply(r));
                        (Event::Fetched { parts }, None)
                    }
                    Err(e) => {
                        tracing::error!("{e}");
                        (Event::FetchFailed(e.to_string()), None)
                    }
                }
            }
            Err(e @ Error::Link(_)) => return Err(e),
            Err(e @ Error::DiskFull { needed, .. }) => {
                tracing::error!("{e}");
                (Event::FetchStalled(e.to_string()), Some(needed))
            }
            Err(e) => {
                tracing::error!("fetch failed: {e}");
                (Event::FetchFailed(e.to_string()), None)
            }
        };
        let updated = self
            .cell
            .update(|next| {
                next.deployment = machine::decide(&next.deployment, event.clone());
                if matches!(next.deployment, Deployment::Done { .. }) {
                    next.record_installed();
                }
            })
            .await;
        let reported = match updated {
            Ok(_) => self.cell.reported(),
            Err(persist) => {
                tracing::warn!("could not persist the fetch outcome: {persist}");
                // The state file may live on the full disk too: the twin hears it either way.
                let mut reported = self.cell.reported();
                if let Event::FetchStalled(why) | Event::FetchFailed(why) = event {
                    reported.last_error = Some(why);
                }
                reported
            }
        };
        self.reporter.state(reported).await;
        self.parts.wake();
        Ok(needed)
    }
}
