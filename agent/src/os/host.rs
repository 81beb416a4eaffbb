//! What the OS driver may use of the agent: a narrow handle, not the agent itself. Through it
//! the driver reads the state, persists its own transitions (through the state cell, which
//! derives what the twin sees), reports, and finds the bundle on disk. A second workload kind
//! gets a handle of its own beside this one.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use cardeploy_protocol::{OsReport, ReportBody};
use tokio::sync::Notify;

use super::machine::{self, OsUpdate, Wanted};
use super::policy::OsConfig;
use crate::cell::Cell;
use crate::fetch::Fetcher;
use crate::release::HeldArtifact;
use crate::reporter::Reporter;
use crate::state::State;

pub(crate) struct Host {
    pub config: OsConfig,
    /// Rung on a new desired state, a finished fetch, a connection to the twin, a move of the
    /// workloads' rollout.
    pub wake: Arc<Notify>,
    /// The workloads driver's wake: rung when the OS update moves (a release with both starts
    /// its workloads once the new slot passed its checks).
    workloads_wake: Arc<Notify>,
    cell: Arc<Cell>,
    reporter: Arc<Reporter>,
    fetcher: Arc<Fetcher>,
    /// The twin answered a hello since the agent started (the health gate asks).
    reached: Arc<AtomicBool>,
    started: Instant,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("os::Host").finish_non_exhaustive()
    }
}

impl Host {
    pub fn new(
        config: OsConfig,
        cell: Arc<Cell>,
        reporter: Arc<Reporter>,
        fetcher: Arc<Fetcher>,
        reached: Arc<AtomicBool>,
        (wake, workloads_wake): (Arc<Notify>, Arc<Notify>),
    ) -> Self {
        Self {
            config,
            wake,
            workloads_wake,
            cell,
            reporter,
            fetcher,
            reached,
            started: Instant::now(),
        }
    }

    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        self.cell.read(f)
    }

    pub fn twin_reached(&self) -> bool {
        self.reached.load(Ordering::SeqCst)
    }

    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    pub async fn notice(&self, kind: &str, message: String) {
        self.reporter.event(kind, message).await;
    }

    /// Report without waiting (install progress comes from a synchronous callback).
    pub fn report_soon(&self, body: ReportBody) {
        self.reporter.send_soon(body);
    }

    /// The OS release the accepted desired state names, if it names an OS bundle.
    pub fn wanted(&self, state: &State) -> Option<Wanted> {
        let release = state.release.as_ref().filter(|r| r.has_os())?;
        Some(Wanted {
            release: release.id.clone(),
            counter: state.accepted,
            ready: !state.missing(release, |name, index| self.fetcher.on_disk(name, index)),
        })
    }

    /// How the workloads of the release the OS has on trial stand: the OS commits a release
    /// that also carries workloads only once they are promoted.
    pub fn workloads_gate(&self, state: &State) -> machine::WorkloadsGate {
        state.workloads_gate(self.cell.managed())
    }

    /// The accepted release's OS bundle on disk, and its declaration.
    pub fn bundle(&self) -> Option<(PathBuf, HeldArtifact)> {
        let artifact = self
            .cell
            .read(|s| s.release.as_ref()?.os_bundle().cloned())?;
        Some((
            self.fetcher.artifact_path(artifact.name(), &artifact.index),
            artifact,
        ))
    }

    /// Drop an artifact from what the car holds (found damaged): the next plan fetches it.
    pub async fn forget_artifact(&self, name: &str) {
        if let Err(why) = self
            .cell
            .update(|s| {
                s.artifacts.remove(name);
            })
            .await
        {
            tracing::error!("could not persist forgetting {name}: {why}");
        }
    }

    /// Remember that the booted slot was marked good in boot `boot_id`.
    pub async fn confirm_boot(&self, boot_id: &str) {
        if let Err(why) = self
            .cell
            .update(|s| s.os.confirmed_boot = Some(boot_id.to_owned()))
            .await
        {
            tracing::error!("could not persist the boot confirmation: {why}");
        }
    }

    /// Persist a new OS update state (and the slots RAUC reports), then report it if anything
    /// the twin sees changed. Returns false when it could not be persisted: the effect must not
    /// run then.
    pub async fn transition(&self, next: OsUpdate, slots: Option<OsReport>) -> bool {
        let updated = self
            .cell
            .update(|s| {
                let moved = s.move_os(&next);
                match slots {
                    Some(report) => s.reported.os = Some(report),
                    None => {
                        if let Some(report) = &mut s.reported.os {
                            report.update = next.name().to_owned();
                            report.release = next.release().map(|r| r.label());
                        }
                    }
                }
                moved
            })
            .await;
        match updated {
            Ok(updated) => {
                if updated.value {
                    tracing::info!(state = next.name(), release = ?next.release().map(|r| r.label()),
                        problem = ?next.problem(), "OS update");
                    super::driver::failpoint(&next);
                    self.workloads_wake.notify_one();
                }
                if let Some(state) = updated.reported {
                    self.reporter.state(state).await;
                }
                true
            }
            Err(why) => {
                tracing::error!("could not persist the OS state {}: {why}", next.name());
                false
            }
        }
    }
}
