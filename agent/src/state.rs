//! The agent's persistent state: what it accepted, what it works towards and what it holds.
//! Only the state cell (`crate::cell`) changes it, and only after the new value is durable
//! (`crate::store`).

use std::collections::BTreeMap;

use cardeploy_chunks::Digest;
use cardeploy_protocol::{DesiredState, Phase, ReportedState};
use cardeploy_release::InstalledOs;
use serde::{Deserialize, Serialize};

use crate::deploy::Deployment;
use crate::release::Release;

/// 2: signed desired states — the counter, the target release and installed versions.
/// 3: the OS update state (`os`); a schema-2 file loads with an idle OS state.
/// 4: the counter's scope, the count of accepted desired states, the installed OS; a schema-3
/// file loads with its counter in the scope of the root in force (`adopt_scope`).
/// 5: the deployment (`deployment`), the release under `release` (was `target`, with the
/// manifest digest under `release`), OS releases named by line and version (were a `label`); a
/// schema-4 file loads with the deployment its reported phase stood for (`Store::load`).
/// 6: the workloads' rollout (`workloads`); a schema-5 file loads with none.
pub const SCHEMA: u32 = 6;

/// The workload parts this agent runs: what a release's deployment waits for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Managed {
    /// `[os]`: releases with a bundle are installed through RAUC.
    pub os: bool,
    /// `[containers] kubeconfig`: releases with workload manifests are rolled out to k3s.
    pub workloads: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub schema: u32,
    /// Grows with every agent start; with `seq` it orders this agent's reports.
    pub epoch: u64,
    /// The last desired state the agent accepted, exactly as it arrived (signed).
    pub desired: Option<DesiredState>,
    /// The highest desired-state counter accepted (D4) in `counter_scope`: a replayed older one
    /// is refused.
    #[serde(default)]
    pub last_counter: Option<u64>,
    /// The counter scope of `last_counter` (D4a: the director role it was accepted under). A
    /// root whose director role is another starts a fresh scope.
    #[serde(default)]
    pub counter_scope: Option<String>,
    /// How many desired states this car accepted, ever: what tells the OS update that a desired
    /// state is newer than the one a failure happened under, whatever counter scope it is in.
    #[serde(default)]
    pub accepted: u64,
    /// The verified release the accepted desired state names: what the agent works towards.
    #[serde(default, alias = "target")]
    pub release: Option<Release>,
    /// Where that release stands as a whole (docs/state-machines.md).
    #[serde(default)]
    pub deployment: Deployment,
    /// The highest version installed per release line (M5: no downgrade without an override).
    #[serde(default)]
    pub installed: BTreeMap<String, semver::Version>,
    /// The OS this hardware runs, from the last OS release installed (M5a: held against every OS
    /// release, whatever line it claims).
    #[serde(default)]
    pub installed_os: Option<InstalledOs>,
    /// What the twin is told; derived from the rest by [`State::derive`], except the
    /// OS slots, which the OS driver observes.
    pub reported: ReportedState,
    /// Artifacts the car holds, by name: the id of each one's chunk index. The previous version
    /// of an artifact is the base the twin makes deltas against.
    #[serde(default)]
    pub artifacts: BTreeMap<String, Digest>,
    /// The OS update (A/B through RAUC) and the releases this car will not install again.
    #[serde(default)]
    pub os: crate::os::OsRecord,
    /// The workloads' rollout on the car's k3s, what runs there, and what was observed.
    #[serde(default)]
    pub workloads: crate::containers::rollout::WorkloadsRecord,
}

impl State {
    /// A state written before counters had scopes holds a counter accepted under the root in
    /// force then, which is the root loaded now: it adopts that root's scope, and its counter
    /// stands for the desired states accepted so far. Returns whether anything changed.
    pub fn adopt_scope(&mut self, scope: &str) -> bool {
        if self.last_counter.is_none() || self.counter_scope.is_some() {
            return false;
        }
        self.counter_scope = Some(scope.to_owned());
        self.accepted = self.accepted.max(self.last_counter.unwrap_or(0));
        true
    }

    /// Does the release name artifacts the car does not hold yet? `on_disk` says whether an
    /// artifact's file is there.
    pub fn missing(&self, release: &Release, on_disk: impl Fn(&str, &Digest) -> bool) -> bool {
        release
            .artifacts
            .iter()
            .any(|a| self.artifacts.get(a.name()) != Some(&a.index) || !on_disk(a.name(), &a.index))
    }

    /// The release is on the car: its version becomes the line's installed version if it is
    /// the highest (M5 compares against it), and, for an OS release, the OS this hardware runs
    /// (M5a).
    pub fn record_installed(&mut self) {
        if let Some(release) = self.release.clone() {
            self.record_version(&release.id.line, &release.id.version, release.has_os());
        }
    }

    /// Record `line@version` as installed: the line's highest version by SemVer precedence, and,
    /// for an OS release (`os`), the OS of this hardware — on its line, at the highest version
    /// that line reached here (an override that moved it to another line starts there).
    pub fn record_version(&mut self, line: &str, version: &semver::Version, os: bool) {
        let above = |have: &semver::Version| cardeploy_release::older(have, version);
        if self.installed.get(line).is_none_or(above) {
            self.installed.insert(line.to_owned(), version.clone());
        }
        if os {
            let same_line_higher = self
                .installed_os
                .as_ref()
                .is_some_and(|running| running.line == line && !above(&running.version));
            if !same_line_higher {
                self.installed_os = Some(InstalledOs {
                    line: line.to_owned(),
                    version: version.clone(),
                });
            }
        }
    }

    /// The OS update moves to `next`: a release the car will not install again on its own is
    /// remembered as refused, a committed one recorded as installed. Returns whether it moved.
    pub fn move_os(&mut self, next: &crate::os::OsUpdate) -> bool {
        let moved = self.os.update != *next;
        if moved {
            if crate::os::machine::refuses(next)
                && let Some(release) = next.release()
            {
                self.os.refuse(&release.digest);
            }
            if let crate::os::OsUpdate::Committed { release, .. } = next {
                self.record_version(&release.line, &release.version, true);
            }
        }
        self.os.update = next.clone();
        moved
    }

    /// Whether the OS part lets the workloads of `release` start: it has no OS part
    /// (`managed_os` false, or no bundle), the OS update committed it, or the new slot passed
    /// its health checks and waits for the workloads to commit with them.
    pub fn os_ready_for_workloads(&self, managed_os: bool, release: &Release) -> bool {
        use crate::os::{OsUpdate, TrialGate};
        !(managed_os && release.has_os())
            || self.os.update.release() == Some(&release.id)
                && matches!(
                    &self.os.update,
                    OsUpdate::Committed { .. }
                        | OsUpdate::Trial {
                            gate: TrialGate::Workloads | TrialGate::Commit,
                            ..
                        }
                )
    }

    /// Whether the OS part of `release` ended without committing it (rolled back, or failed
    /// for good): its workloads must not stay on a car whose OS went back.
    pub fn os_gave_up(&self, managed_os: bool, release: &Release) -> Option<String> {
        use crate::os::OsUpdate;
        if !(managed_os && release.has_os()) || self.os.update.release() != Some(&release.id) {
            return None;
        }
        match &self.os.update {
            OsUpdate::RolledBack { .. } | OsUpdate::MarkedBad { .. } => {
                Some(self.os.update.problem().unwrap_or_default())
            }
            OsUpdate::Failed { retry: false, .. } => {
                Some(self.os.update.problem().unwrap_or_default())
            }
            _ => None,
        }
    }

    /// How the workloads of the release on OS trial stand, for the OS's verdict.
    pub fn workloads_gate(&self, managed: Managed) -> crate::os::WorkloadsGate {
        use crate::containers::rollout::Rollout;
        use crate::os::WorkloadsGate;
        let Some(release) = self.release.as_ref() else {
            return WorkloadsGate::NotPart;
        };
        if !managed.workloads
            || !release.has_workloads()
            || self.os.update.release() != Some(&release.id)
        {
            return WorkloadsGate::NotPart;
        }
        match self.workloads.effective() {
            r if r.release() != Some(&release.id) => WorkloadsGate::NotStarted,
            Rollout::Idle => WorkloadsGate::NotStarted,
            Rollout::Starting { .. } | Rollout::Canary { .. } => WorkloadsGate::Running,
            Rollout::Ready { .. } => WorkloadsGate::Ready,
            Rollout::RolledBack { error, .. } => WorkloadsGate::RolledBack(error),
        }
    }

    /// Whether the artifact file `name` at `index` must stay on the car: the accepted release,
    /// the release whose workloads run (a rollback needs it without the network) or the one in
    /// rollout uses it, or it is the latest version of its name the car holds (the base a fetch
    /// in progress may be reading; that fetch removes it once its newer version is there).
    pub fn keeps_file(&self, name: &str, index: &Digest) -> bool {
        let w = &self.workloads;
        self.artifacts.get(name) == Some(index)
            || self
                .release
                .iter()
                .chain(w.running_release())
                .chain(w.trying.as_ref().map(|t| &t.release))
                .any(|r| {
                    r.artifacts
                        .iter()
                        .any(|a| a.name() == name && &a.index == index)
                })
    }

    /// A schema-4 state had no deployment: the one its reported phase stood for.
    pub(crate) fn deployment_from_phase(&self) -> Deployment {
        let Some(release) = &self.release else {
            return Deployment::Idle;
        };
        let release = release.id.clone();
        let os_holds = self.os.update.release() == Some(&release);
        match self.reported.phase {
            Phase::Idle => Deployment::Idle,
            Phase::Fetching => Deployment::Fetching {
                release,
                stalled: self.reported.last_error.clone(),
            },
            Phase::Applied => Deployment::Done { release },
            Phase::Failed if !os_holds => Deployment::Failed {
                release,
                error: self.reported.last_error.clone().unwrap_or_else(|| {
                    "failed (an earlier agent version did not record why)".to_owned()
                }),
            },
            Phase::Committed | Phase::RolledBack | Phase::Failed => Deployment::Done { release },
            Phase::Verifying | Phase::Installing | Phase::PendingReboot | Phase::Trial => {
                Deployment::Applying { release }
            }
        }
    }
}

impl Default for State {
    fn default() -> Self {
        Self {
            schema: SCHEMA,
            epoch: 0,
            desired: None,
            last_counter: None,
            counter_scope: None,
            accepted: 0,
            release: None,
            deployment: Deployment::Idle,
            installed: BTreeMap::new(),
            installed_os: None,
            reported: ReportedState::idle(),
            artifacts: BTreeMap::new(),
            os: crate::os::OsRecord::default(),
            workloads: Default::default(),
        }
    }
}

impl State {
    /// What follows from the rest of the state, computed after every change and nowhere else:
    /// a deployment whose parts all settled is done, and what the twin is told (the phase and
    /// error, from the deployment and, while the OS works on the release, the OS update; the
    /// release; the counter and its scope).
    pub fn derive(&mut self, managed: Managed) {
        if let Deployment::Applying { release: id } = &self.deployment
            && let Some(release) = self.release.as_ref().filter(|r| &r.id == id)
        {
            use crate::deploy::machine::os_settled;
            let os_part = managed.os && release.has_os();
            let os_done = !os_part || os_settled(&self.os.update, id, self.accepted);
            // The workloads start once the OS part passed its checks (the slot commits when
            // they are promoted); an OS that did not leaves them where they were.
            let workloads_part = managed.workloads
                && release.has_workloads()
                && self.os_ready_for_workloads(managed.os, release);
            let workloads_done = !workloads_part
                || (self.workloads.rollout.settled(id) && self.workloads.trying.is_none());
            if os_done && workloads_done {
                self.deployment = crate::deploy::machine::decide(
                    &self.deployment,
                    crate::deploy::machine::Event::PartsSettled,
                );
            }
        }
        let os = managed.os.then_some(&self.os.update);
        // A rollout that ended but whose cleanup (removing the old or the failed version) has
        // not happened yet is still on trial: the twin hears the verdict once it is true on
        // the car.
        let rollout = self.workloads.effective();
        let rollout = managed.workloads.then_some(&rollout);
        let (phase, error) = crate::deploy::machine::phase(&self.deployment, os, rollout);
        self.reported.phase = phase;
        self.reported.last_error = error;
        self.reported.release = self.release.as_ref().map(|r| r.id.label());
        self.reported.desired_counter = self.last_counter;
        self.reported.counter_scope.clone_from(&self.counter_scope);
        let workload_phase = self.workloads.effective().workload_phase();
        self.reported.workloads = self
            .workloads
            .observed
            .iter()
            .take(cardeploy_protocol::MAX_WORKLOADS)
            .map(|w| cardeploy_protocol::WorkloadReport {
                phase: workload_phase,
                ..w.clone()
            })
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use cardeploy_release::{Artifact, ArtifactKind};

    use super::*;
    use crate::os::{OsUpdate, TrialGate, WorkloadsGate};
    use crate::release::ReleaseRef;

    fn release(kinds: &[ArtifactKind]) -> Release {
        let id = ReleaseRef {
            digest: Digest([7; 32]),
            line: "car".into(),
            version: semver::Version::new(1, 0, 0),
        };
        let artifacts = kinds
            .iter()
            .enumerate()
            .map(|(i, kind)| Artifact {
                kind: *kind,
                name: format!("a{i}"),
                digest: "cd".repeat(32),
                size: 1,
                index: "ab".repeat(32),
            })
            .collect();
        Release::new(id, artifacts, Vec::new()).unwrap()
    }

    /// `release` on trial in slot B at `gate`.
    fn trial(release: &Release, gate: TrialGate) -> OsUpdate {
        OsUpdate::Trial {
            release: release.id.clone(),
            from: "A".into(),
            to: "B".into(),
            boot_id: "b".into(),
            deadline: 0,
            boots: 1,
            gate,
        }
    }

    #[test]
    fn the_workloads_wait_for_the_os_part_only_when_there_is_one() {
        let both = release(&[ArtifactKind::RaucBundle, ArtifactKind::KubeManifest]);
        let mut state = State::default();
        // No [os]: nothing installs the bundle, nothing to wait for.
        assert!(state.os_ready_for_workloads(false, &both));
        assert!(!state.os_ready_for_workloads(true, &both));
        let trial = |gate| trial(&both, gate);
        // On trial, the workloads start once the OS checks passed (and commit with the slot).
        state.os.update = trial(TrialGate::Os);
        assert!(!state.os_ready_for_workloads(true, &both));
        state.os.update = trial(TrialGate::Workloads);
        assert!(state.os_ready_for_workloads(true, &both));
        state.os.update = OsUpdate::Committed {
            release: both.id.clone(),
            slot: "B".into(),
        };
        assert!(state.os_ready_for_workloads(true, &both));
        // A commit of another release does not count.
        let mut other = both.clone();
        other.id.digest = Digest([8; 32]);
        assert!(!state.os_ready_for_workloads(true, &other));
        let workloads_only = release(&[ArtifactKind::KubeManifest]);
        assert!(State::default().os_ready_for_workloads(true, &workloads_only));
    }

    #[test]
    fn the_os_trial_sees_how_the_workloads_of_its_release_stand() {
        use crate::containers::rollout::Rollout;
        let both = release(&[ArtifactKind::RaucBundle, ArtifactKind::KubeManifest]);
        let managed = Managed {
            os: true,
            workloads: true,
        };
        let mut state = State {
            release: Some(both.clone()),
            ..State::default()
        };
        state.os.update = trial(&both, TrialGate::Workloads);
        assert_eq!(state.workloads_gate(managed), WorkloadsGate::NotStarted);
        // A car without workloads, or a release without them: the OS decides alone.
        let no_workloads = Managed {
            os: true,
            workloads: false,
        };
        assert_eq!(state.workloads_gate(no_workloads), WorkloadsGate::NotPart);
        let id = both.id.clone();
        for (rollout, gate) in [
            (
                Rollout::Starting {
                    release: id.clone(),
                    deadline: 9,
                },
                WorkloadsGate::Running,
            ),
            (
                Rollout::Canary {
                    release: id.clone(),
                    until: 9,
                },
                WorkloadsGate::Running,
            ),
            (
                Rollout::Ready {
                    release: id.clone(),
                },
                WorkloadsGate::Ready,
            ),
            (
                Rollout::RolledBack {
                    release: id.clone(),
                    error: "crash loop".into(),
                },
                WorkloadsGate::RolledBack("crash loop".into()),
            ),
        ] {
            state.workloads.rollout = rollout;
            assert_eq!(state.workloads_gate(managed), gate);
        }
        // Promoted but the old version not removed yet: still running.
        state.workloads.rollout = Rollout::Ready { release: id };
        state.workloads.trying = Some(crate::containers::rollout::Applied {
            release: both.clone(),
            objects: Vec::new(),
        });
        assert_eq!(state.workloads_gate(managed), WorkloadsGate::Running);
    }

    #[test]
    fn the_car_keeps_the_files_of_the_releases_it_may_need() {
        let mut state = State::default();
        let r = release(&[ArtifactKind::OciLayer]);
        let index = r.artifacts[0].index;
        assert!(!state.keeps_file("a0", &index));
        state.artifacts.insert("a0".into(), index);
        assert!(state.keeps_file("a0", &index), "the latest held version");
        state.artifacts.clear();
        state.workloads.running = Some(crate::containers::rollout::Applied {
            release: r,
            objects: Vec::new(),
        });
        assert!(
            state.keeps_file("a0", &index),
            "the running workloads' release"
        );
        assert!(!state.keeps_file("a1", &index));
    }
}
