//! The workloads driver: once the deployment hands a release to the workloads (every artifact
//! on the car, and the OS part, if the release has one, committed), it applies the release's
//! objects to the car's k3s, watches its Deployments against the deadline and the canary time,
//! and then promotes the release (removing what the previous one ran and this one does not) or
//! rolls it back (removing what it started anew, applying the previous release's in-place
//! objects again from the manifests kept on the car). Every step goes through the pure
//! [`rollout::decide`]; its state is persisted before its effect, and every effect can be
//! repeated, so a power cut anywhere ends in the same place.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cardeploy_protocol::{WorkloadPhase, WorkloadReport};
use cardeploy_release::ArtifactKind;

use super::cluster::Cluster;
use super::manifests::{self, Object, ObjectRef, Strategy};
use super::rollout::{self, Applied, Event, Rollout, WorkloadsRecord};
use super::{WorkloadError, Workloads};
use crate::deploy::Deployment;
use crate::now_secs;
use crate::release::{Release, ReleaseRef};

/// How often health is looked at while a rollout waits on it.
const WATCH_TICK: Duration = Duration::from_millis(500);
/// How often an idle driver looks again without being woken.
const IDLE_TICK: Duration = Duration::from_secs(30);
/// How long to wait before trying the API server again after it failed.
const RETRY: Duration = Duration::from_secs(2);

/// The release's objects, from its workload manifests on disk.
pub(super) fn objects(part: &Workloads, release: &Release) -> Result<Vec<Object>, WorkloadError> {
    let mut files = BTreeMap::new();
    for a in release
        .artifacts
        .iter()
        .filter(|a| a.declared.kind == ArtifactKind::KubeManifest)
    {
        let path = part.fetcher.artifact_path(a.name(), &a.index);
        let bytes = std::fs::read(&path).map_err(|source| WorkloadError::Read { path, source })?;
        files.insert(a.name().to_owned(), bytes);
    }
    Ok(manifests::objects(&release.id.label(), &files)?)
}

/// Run the workloads driver until the agent stops. k3s writes its kubeconfig when it starts,
/// which may be after the agent: until the file makes a client, the driver says why once and
/// tries again.
pub(crate) async fn drive(part: Arc<Workloads>, kubeconfig: PathBuf) {
    let mut told = false;
    let cluster = loop {
        match Cluster::connect(&kubeconfig).await {
            Ok(cluster) => break cluster,
            Err(e) => {
                if !told {
                    tracing::warn!("workloads wait for k3s: {e}");
                    part.reporter.event("workloads", e.to_string()).await;
                    told = true;
                }
                tokio::time::sleep(RETRY).await;
            }
        }
    };
    if told {
        tracing::info!("k3s's kubeconfig is there now: workloads are applied");
    }
    // The release whose objects this run of the agent applied, with the objects (read from its
    // manifests once, not on every look at its health): after a restart they are applied again
    // (server-side apply is idempotent), so a crash between persisting `starting` and applying
    // loses nothing.
    let mut applied_now: Option<(ReleaseRef, Vec<Object>)> = None;
    // The twin hears a problem once, not every retry (the API server may be away for long).
    let mut last_problem: Option<String> = None;
    loop {
        let wait = match step(&part, &cluster, &mut applied_now).await {
            Ok(wait) => {
                last_problem = None;
                wait
            }
            Err(e) => {
                let problem = e.to_string();
                if last_problem.as_ref() != Some(&problem) {
                    tracing::warn!("workloads: {problem}");
                    part.reporter.event("workloads", problem.clone()).await;
                    last_problem = Some(problem);
                }
                RETRY
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = part.wake.notified() => {}
        }
    }
}

/// One look: returns how long to wait before the next.
async fn step(
    part: &Workloads,
    cluster: &Cluster,
    applied_now: &mut Option<(ReleaseRef, Vec<Object>)>,
) -> Result<Duration, WorkloadError> {
    let (record, wanted, accepted, os_gave_up) = part.cell.read(|s| {
        let os_gave_up = s
            .workloads
            .trying
            .as_ref()
            .and_then(|t| s.os_gave_up(part.managed_os, &t.release));
        (
            s.workloads.clone(),
            handed_over(s, part.managed_os).cloned(),
            s.release.as_ref().map(|r| r.id.clone()),
            os_gave_up,
        )
    });
    let rollout = &record.rollout;
    // A rollout that ended leaves cleaning to do: promoted, the previous release's objects go;
    // rolled back, the new ones go and the previous release's in-place objects come back.
    if let Some(trying) = &record.trying
        && rollout.settled(&trying.release.id)
    {
        return settle(part, cluster, rollout, trying, record.running.as_ref()).await;
    }
    match rollout {
        Rollout::Starting { release, .. } | Rollout::Canary { release, .. }
            if accepted.as_ref().is_some_and(|a| a != release) =>
        {
            let by = accepted.map(|a| a.to_string()).unwrap_or_default();
            update(part, |s| {
                s.rollout = rollout::decide(&s.rollout, Event::Superseded(by))
            })
            .await?;
            Ok(Duration::ZERO)
        }
        // The slot the release came with went back: its workloads go back with it.
        Rollout::Starting { .. } | Rollout::Canary { .. } if os_gave_up.is_some() => {
            let why = os_gave_up.unwrap_or_default();
            update(part, |s| {
                s.rollout = rollout::decide(&s.rollout, Event::OsGaveUp(why))
            })
            .await?;
            Ok(Duration::ZERO)
        }
        Rollout::Starting { release, .. } | Rollout::Canary { release, .. } => {
            let Some(trying) = record.trying.as_ref().filter(|t| &t.release.id == release) else {
                return Err(WorkloadError::NotRecorded(release.to_string()));
            };
            let objects = match applied_now {
                Some((applied, objects)) if applied == release => objects,
                _ => {
                    let objects = objects(part, &trying.release)?;
                    for object in &objects {
                        if let Err(e) = cluster.apply(object).await {
                            if matches!(rollout, Rollout::Starting { .. }) && refused(&e.source) {
                                let error = e.to_string();
                                update(part, |s| {
                                    s.rollout =
                                        rollout::decide(&s.rollout, Event::ApplyFailed(error))
                                })
                                .await?;
                                return Ok(Duration::ZERO);
                            }
                            return Err(e.into());
                        }
                    }
                    tracing::info!(release = %release, objects = objects.len(), "workloads applied");
                    &applied_now.insert((release.clone(), objects)).1
                }
            };
            // A rollout that this look ended is cleaned up at once: a rollback must not wait a
            // tick (the bench of the rollback time caught that wait).
            let ended = observe(part, cluster, objects, trying, record.running.as_ref()).await?;
            Ok(if ended { Duration::ZERO } else { WATCH_TICK })
        }
        _ => {
            let Some(release) = wanted else {
                return Ok(IDLE_TICK);
            };
            if rollout.release() == Some(&release.id) {
                return Ok(IDLE_TICK);
            }
            // A new release for the workloads: its objects recorded, then the rollout starts.
            let started = match objects(part, &release) {
                Ok(objects) => Ok(Applied {
                    release: release.clone(),
                    objects: objects.into_iter().map(|o| o.reference).collect(),
                }),
                Err(e) => Err(e.to_string()),
            };
            let start = Event::Start {
                release: release.id.clone(),
                now: now_secs(),
                ready_secs: part.config.ready_secs,
            };
            update(part, |s| {
                s.rollout = rollout::decide(&s.rollout, start);
                match started {
                    Ok(applied) => s.trying = Some(applied),
                    Err(e) => {
                        s.trying = None;
                        s.rollout = rollout::decide(&s.rollout, Event::ApplyFailed(e));
                    }
                }
                s.observed.clear();
            })
            .await?;
            Ok(Duration::ZERO)
        }
    }
}

/// The release the deployment hands to the workloads now, if any: every artifact on the car,
/// workload manifests among them, and the OS part (when the release has one) past its health
/// checks on the new slot (the slot commits once the workloads are promoted).
fn handed_over(s: &crate::state::State, managed_os: bool) -> Option<&Release> {
    let release = s.release.as_ref()?;
    let Deployment::Applying { release: id } = &s.deployment else {
        return None;
    };
    (id == &release.id && release.has_workloads() && s.os_ready_for_workloads(managed_os, release))
        .then_some(release)
}

/// Whether the API server refused the object itself (a bad manifest): waiting does not help.
fn refused(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if (400..500).contains(&s.code) && s.code != 429 && s.code != 409)
}

/// Health of every Deployment of the release in rollout, persisted (the twin sees it) and
/// handed to the rollout; returns whether the rollout ended.
async fn observe(
    part: &Workloads,
    cluster: &Cluster,
    objects: &[Object],
    trying: &Applied,
    running: Option<&Applied>,
) -> Result<bool, WorkloadError> {
    let before: BTreeSet<&ObjectRef> = running
        .map(|r| r.objects.iter().collect())
        .unwrap_or_default();
    let mut reports = Vec::new();
    let (mut ready, mut problem, mut crash, mut canary) = (true, None, false, false);
    for object in objects.iter().filter(|o| o.runs) {
        let health = cluster
            .health(&object.reference, part.config.crash_restarts)
            .await?;
        ready &= health.ready_all;
        if health.crashing {
            crash = true;
            problem = health.problem.clone();
        } else if problem.is_none() && !health.ready_all {
            problem = health.problem.clone();
        }
        // A new version beside a running one: the canary applies.
        canary |= object.strategy == Strategy::SideBySide
            && !before.contains(&object.reference)
            && running.is_some_and(|r| {
                r.objects
                    .iter()
                    .any(|o| o.kind == object.reference.kind && same_workload(o, object))
            });
        reports.push(WorkloadReport {
            name: object.workload.clone(),
            release: trying.release.id.label(),
            phase: WorkloadPhase::Starting,
            ready_replicas: health.ready,
            replicas: health.replicas,
            last_error: health
                .problem
                .filter(|_| !health.ready_all || health.crashing),
        });
    }
    let event = Event::Observed {
        ready,
        problem: problem.map(|p| p.chars().take(1024).collect()),
        crash,
        now: now_secs(),
        canary_secs: part.config.canary_secs,
        canary,
    };
    let mut ended = false;
    update(part, |s| {
        s.rollout = rollout::decide(&s.rollout, event);
        ended = s.rollout.settled(&trying.release.id);
        s.observed = reports;
    })
    .await?;
    Ok(ended)
}

/// Whether `running` is an earlier version of the same workload as `object`.
fn same_workload(running: &ObjectRef, object: &Object) -> bool {
    let base = |name: &str| {
        name.rsplit_once('-')
            .map_or(name.to_owned(), |(b, _)| b.to_owned())
    };
    running.namespace == object.reference.namespace
        && base(&running.name) == base(&object.reference.name)
}

/// The end of a rollout: clean up, then record what runs.
async fn settle(
    part: &Workloads,
    cluster: &Cluster,
    rollout: &Rollout,
    trying: &Applied,
    running: Option<&Applied>,
) -> Result<Duration, WorkloadError> {
    let old: BTreeSet<&ObjectRef> = running
        .map(|r| r.objects.iter().collect())
        .unwrap_or_default();
    let new: BTreeSet<&ObjectRef> = trying.objects.iter().collect();
    let promoted = matches!(rollout, Rollout::Ready { .. });
    let (remove, keep) = if promoted { (&old, &new) } else { (&new, &old) };
    for gone in remove.difference(keep) {
        cluster.delete(gone).await?;
        tracing::info!(object = %gone, "removed");
    }
    if !promoted && let Some(running) = running {
        // In-place objects the failed release changed come back as the previous release had
        // them, from its manifests kept on the car.
        for object in objects(part, &running.release)?
            .iter()
            .filter(|o| o.strategy == Strategy::InPlace)
        {
            cluster.apply(object).await?;
        }
    }
    let message = match rollout {
        Rollout::RolledBack { error, .. } => format!(
            "{}: rolled back ({error}); {} runs",
            trying.release.id,
            running.map_or("nothing".to_owned(), |r| r.release.id.to_string())
        ),
        _ => format!("{}: workloads promoted", trying.release.id),
    };
    update(part, |s| {
        if promoted {
            s.running = s.trying.take();
        } else {
            s.trying = None;
        }
    })
    .await?;
    part.reporter.event("workloads", message).await;
    // Promoted: the previous release retires. Rolled back: the failed release's files go too,
    // unless it is still the accepted release (the car keeps what it was told to run).
    part.retired(if promoted { running } else { Some(trying) });
    Ok(Duration::ZERO)
}

/// Change the workloads' record through the state cell (persisted before anything follows
/// from it), then tell the twin if what it sees changed.
async fn update(
    part: &Workloads,
    f: impl FnOnce(&mut WorkloadsRecord),
) -> Result<(), WorkloadError> {
    let updated = part
        .cell
        .update(|s| {
            let before = s.workloads.effective();
            f(&mut s.workloads);
            s.workloads.effective() != before
        })
        .await
        .map_err(|source| WorkloadError::Persist {
            what: "the workloads' rollout",
            source: Box::new(source),
        })?;
    if updated.value {
        part.os_wake.notify_one();
    }
    if let Some(reported) = updated.reported {
        part.reporter.state(reported).await;
    }
    Ok(())
}
