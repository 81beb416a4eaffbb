//! The deployments' driver: once a second (and when an operator acts), for each deployment that
//! is not over, it gathers the cars it selects and those it started — connected or not, and each
//! one's outcome for the release from what it reports — asks [`rollout::step`] what to do,
//! persists the step (durably, the started cars with it), then signs the started cars' desired
//! states. A twin that stops between the two signs them on its next round: a started car whose
//! desired state does not name the release, and was never sent it, gets it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use cardeploy_protocol::api::{DeploymentView, EventView, FailedCar, PhaseView, ReleaseSummary};
use cardeploy_protocol::{CarId, Phase, ReportedState};

use crate::db::{CarRecord, StoredDeployment};
use crate::error::Error;
use crate::fleet::geofence::Geofence;
use crate::fleet::rollout::{self, Car, Outcome, Plan, Progress};
use crate::fleet::selector::Selector;
use crate::{Twin, now};

/// How often the driver looks at the deployments without being asked.
const TICK: Duration = Duration::from_secs(1);

/// What one round reads of the fleet, once for every deployment.
pub(crate) struct Fleet {
    pub cars: Vec<CarRecord>,
    pub reported: HashMap<String, ReportedState>,
    pub positions: HashMap<String, cardeploy_protocol::Position>,
    /// With several instances: the cars connected to any live instance. `None` with one: it
    /// knows its own connections.
    pub online: Option<HashSet<String>>,
}

impl Fleet {
    pub async fn read(twin: &Twin) -> Result<Self, Error> {
        Ok(Self {
            cars: twin.db.cars().await?,
            reported: twin.db.all_reported().await?,
            positions: twin.db.positions().await?,
            online: match &twin.cluster {
                Some(_) => Some(
                    twin.db
                        .online(now() - crate::instances::ALIVE_WITHIN_SECS)
                        .await?,
                ),
                None => None,
            },
        })
    }
}

/// A deployment's selector and geofence, parsed (they were checked when it was created).
pub(crate) struct Picker {
    selector: Selector,
    geofence: Option<Geofence>,
}

impl Picker {
    pub fn new(selector: &str, geofence: Option<&serde_json::Value>) -> Result<Self, String> {
        Ok(Self {
            selector: Selector::parse(selector).map_err(|e| e.to_string())?,
            geofence: geofence
                .map(Geofence::parse)
                .transpose()
                .map_err(|e| e.to_string())?,
        })
    }

    /// The cars picked now: active (not revoked), matching the selector, and inside the geofence
    /// when there is one (a car that reported no position is outside).
    pub fn pick<'a>(&self, fleet: &'a Fleet) -> Vec<&'a CarRecord> {
        fleet
            .cars
            .iter()
            .filter(|c| c.revoked_at.is_none() && self.selector.matches(&c.attributes))
            .filter(|c| {
                self.geofence.as_ref().is_none_or(|fence| {
                    fleet.positions.get(c.id.as_str()).is_some_and(|p| {
                        let (lat, lon) = p.degrees();
                        fence.contains(lon, lat)
                    })
                })
            })
            .collect()
    }
}

/// `line@version` of the release, as cars report it.
fn label(summary: &ReleaseSummary) -> String {
    format!("{}@{}", summary.line, summary.version)
}

fn outcome(reported: Option<&ReportedState>, label: &str) -> Outcome {
    match reported {
        Some(r) if r.release.as_deref() == Some(label) => match r.phase {
            Phase::Committed | Phase::Applied => Outcome::Succeeded,
            Phase::Failed | Phase::RolledBack => Outcome::Failed,
            _ => Outcome::Pending,
        },
        _ => Outcome::Pending,
    }
}

/// The cars of a deployment for the rollout: those picked now and those it started, once each.
fn members(
    twin: &Twin,
    d: &StoredDeployment,
    fleet: &Fleet,
    label: &str,
) -> Result<Vec<(String, bool, Outcome)>, Error> {
    let picker = Picker::new(&d.selector, d.geofence.as_ref()).map_err(|why| Error::Corrupt {
        car: format!("deployment {}", d.name),
        what: "selector or geofence",
        source: serde::de::Error::custom(why),
    })?;
    let mut ids: Vec<&str> = picker
        .pick(fleet)
        .into_iter()
        .map(|c| c.id.as_str())
        .collect();
    ids.extend(d.progress.started.keys().map(String::as_str));
    ids.sort_unstable();
    ids.dedup();
    Ok(ids
        .into_iter()
        .map(|id| {
            // Connected here, or (several instances) to a live one: presence is written a
            // moment after the connection, so this instance's own count first.
            let online = CarId::new(id.to_owned())
                .ok()
                .is_some_and(|car| twin.fleet.connected(&car).is_some())
                || fleet.online.as_ref().is_some_and(|o| o.contains(id));
            (
                id.to_owned(),
                online,
                outcome(fleet.reported.get(id), label),
            )
        })
        .collect())
}

/// The releases (`line@version`) the `members` report running.
fn running(members: &[(String, bool, Outcome)], fleet: &Fleet) -> HashSet<String> {
    members
        .iter()
        .filter_map(|(id, ..)| fleet.reported.get(id)?.release.clone())
        .collect()
}

/// [`members`] of a deployment, its release's label looked up.
pub(crate) async fn members_of(
    twin: &Twin,
    d: &StoredDeployment,
    fleet: &Fleet,
) -> Result<Vec<(String, bool, Outcome)>, Error> {
    let label = match twin.db.release(&d.release).await? {
        Some((s, _)) => label(&s),
        None => String::new(),
    };
    members(twin, d, fleet, &label)
}

pub(crate) fn cars(members: &[(String, bool, Outcome)]) -> Vec<Car<'_>> {
    members
        .iter()
        .map(|(id, online, outcome)| Car {
            id,
            online: *online,
            outcome: *outcome,
        })
        .collect()
}

/// Run the driver until `stopped` resolves. With several instances, only the one elected
/// (`db::DriverLock`) drives; the others try every tick and take over when it is gone.
pub(crate) async fn drive(twin: Arc<Twin>, stopped: impl std::future::Future<Output = ()>) {
    tokio::pin!(stopped);
    let mut lock = crate::db::DriverLock::new(&twin.db);
    let mut driving = false;
    loop {
        match lock.lead().await {
            Ok(lead) => {
                if lead != driving && twin.cluster.is_some() {
                    if lead {
                        tracing::info!("this instance drives the deployments now");
                    } else {
                        tracing::warn!("this instance no longer drives the deployments");
                    }
                }
                driving = lead;
            }
            Err(e) => {
                if driving {
                    tracing::warn!("this instance no longer drives the deployments: {e}");
                }
                driving = false;
            }
        }
        twin.driving
            .store(driving, std::sync::atomic::Ordering::SeqCst);
        if driving && let Err(e) = round(&twin).await {
            tracing::error!("deployments: {e}");
        }
        tokio::select! {
            () = &mut stopped => break,
            () = tokio::time::sleep(TICK) => {}
            () = twin.deployments_wake.notified() => {}
        }
    }
    twin.driving
        .store(false, std::sync::atomic::Ordering::SeqCst);
    lock.release().await;
}

/// Desired states a round signs at most. Signing one costs a signature and three durable writes
/// (measured: a few hundred a second on two cores): a round that started thousands of cars at
/// once would hold the deployments' lock for a minute, and an operator's pause or abort, a halt
/// or the time-to-live would wait behind it. The started cars are persisted first, so the budget
/// is the same; the next round, right after, signs the next ones.
const SIGN_PER_ROUND: usize = 256;

/// One look at every deployment that is not over.
pub(crate) async fn round(twin: &Twin) -> Result<(), Error> {
    let _turn = twin.deployments_turn().await?;
    let deployments = twin.db.deployments().await?;
    if deployments.iter().all(|d| d.progress.state.is_over()) {
        return Ok(());
    }
    let fleet = Fleet::read(twin).await?;
    let desired: HashMap<String, String> = twin
        .db
        .all_desired()
        .await?
        .into_iter()
        .map(|(car, stored)| (car.as_str().to_owned(), stored.release))
        .collect();
    let (mut signed, mut more) = (0, false);
    for d in deployments.iter().filter(|d| !d.progress.state.is_over()) {
        let Some((summary, _)) = twin.db.release(&d.release).await? else {
            continue;
        };
        let label = label(&summary);
        let members = members(twin, d, &fleet, &label)?;
        let now_secs = now().unsigned_abs();
        // The first car does not wait: until the deltas made ahead for the release are done,
        // nothing starts (they are bounded: a pair not made ahead is made on demand).
        if d.progress.started.is_empty()
            && matches!(d.progress.state, rollout::State::Running)
            && now_secs < d.plan.expires_at
            && twin
                .ahead_pending_for(&d.release, &running(&members, &fleet))
                .await?
                > 0
        {
            continue;
        }
        let step = rollout::step(&d.plan, &d.progress, &cars(&members), now_secs);
        if step.progress != d.progress || !step.start.is_empty() || step.event.is_some() {
            twin.db
                .save_progress(
                    &d.name,
                    &step.progress,
                    &step.start,
                    step.event.as_deref(),
                    now(),
                )
                .await?;
            if let Some(event) = &step.event {
                tracing::info!(deployment = %d.name, "{event}");
            }
        }
        // The cars started now, and any started car that never got the release (the twin
        // stopped between persisting and signing, or a round left them for the next one):
        // their desired states, at most `SIGN_PER_ROUND` of them a round.
        for car in step.progress.started.keys() {
            if desired.get(car) == Some(&summary.digest) {
                continue;
            }
            if signed >= SIGN_PER_ROUND {
                more = true;
                break;
            }
            signed += 1;
            let new = step.start.contains(car);
            if !new
                && twin
                    .db
                    .sent_releases(&CarId::new(car.clone()).map_err(|_| bad_id(car))?)
                    .await?
                    .contains(&summary.digest)
            {
                // Sent once, changed since by an operator: the deployment does not fight it.
                continue;
            }
            if let Err(e) = start(twin, car, &summary, &d.name).await {
                tracing::warn!(deployment = %d.name, car, "could not start: {e}");
            }
        }
    }
    if more {
        // The rest at once, in the next round: this one lets operators and the halt check in.
        twin.deployments_wake.notify_one();
    }
    Ok(())
}

fn bad_id(car: &str) -> Error {
    Error::Corrupt {
        car: car.to_owned(),
        what: "car id",
        source: serde::de::Error::custom("invalid car id"),
    }
}

/// Sign and send `car` the deployment's release, as `PUT /cars/{id}/desired` does.
async fn start(
    twin: &Twin,
    car: &str,
    summary: &ReleaseSummary,
    deployment: &str,
) -> Result<(), Error> {
    let id = CarId::new(car.to_owned()).map_err(|_| bad_id(car))?;
    twin.desire(
        &id,
        summary,
        twin.config.desired_ttl_secs,
        None,
        Some(&format!("deployment {deployment}")),
    )
    .await?;
    Ok(())
}

/// The view of a deployment the API shows.
pub(crate) async fn view(
    twin: &Twin,
    d: &StoredDeployment,
    fleet: &Fleet,
) -> Result<DeploymentView, Error> {
    let (line, version, label) = match twin.db.release(&d.release).await? {
        Some((s, _)) => (s.line.clone(), s.version.clone(), label(&s)),
        None => (String::new(), String::new(), String::new()),
    };
    let members = members(twin, d, fleet, &label)?;
    let cars = cars(&members);
    let targets = rollout::targets(&d.plan, cars.len() as u64);
    let phases = (0..d.plan.phases.len())
        .map(|i| {
            let c = rollout::phase_counts(&d.plan, &d.progress, &cars, i);
            PhaseView {
                target: targets[i],
                group: c.group,
                started: c.started,
                succeeded: c.succeeded,
                failed: c.failed,
                soak_secs: d.plan.phases[i].soak_secs,
            }
        })
        .collect();
    let started: Vec<&Car<'_>> = cars
        .iter()
        .filter(|c| d.progress.started.contains_key(c.id))
        .collect();
    let count = |o: Outcome| started.iter().filter(|c| c.outcome == o).count() as u64;
    let failures = started
        .iter()
        .filter(|c| c.outcome == Outcome::Failed)
        .take(20)
        .map(|c| FailedCar {
            car: c.id.to_owned(),
            error: fleet.reported.get(c.id).and_then(|r| r.last_error.clone()),
        })
        .collect();
    let (reason, never_reached) = match &d.progress.state {
        rollout::State::Halted { reason } => (Some(reason.clone()), None),
        rollout::State::Expired { never_reached } => (None, Some(*never_reached)),
        _ => (None, None),
    };
    let events = twin
        .db
        .deployment_events(&d.name, 20)
        .await?
        .into_iter()
        .map(|(at, message)| EventView {
            id: 0,
            at,
            kind: "deployment".into(),
            message,
        })
        .collect();
    let deltas_ahead_pending = twin
        .ahead_pending_for(&d.release, &running(&members, fleet))
        .await?;
    Ok(DeploymentView {
        deltas_ahead_pending,
        name: d.name.clone(),
        release: d.release.clone(),
        line,
        version,
        selector: d.selector.clone(),
        geofence: d.geofence.is_some(),
        state: rollout::name(&d.progress.state).to_owned(),
        reason,
        never_reached,
        phase: d.progress.phase + 1,
        phases,
        selected: cars.len() as u64,
        started: started.len() as u64,
        succeeded: count(Outcome::Succeeded),
        failed: count(Outcome::Failed),
        failures,
        failure_threshold: d.plan.failure_threshold,
        success_threshold: d.plan.success_threshold,
        max_starts_per_minute: d.plan.max_starts_per_minute,
        created_at: d.created_at,
        updated_at: d.updated_at,
        expires_at: d.plan.expires_at,
        events,
    })
}

/// The cars of `others` (deployments not over) that `picked` shares with each.
pub(crate) fn overlaps<'a>(
    picked: &[&CarRecord],
    others: &'a [StoredDeployment],
    fleet: &Fleet,
) -> Vec<(&'a str, Vec<String>)> {
    let mine: std::collections::HashSet<&str> = picked.iter().map(|c| c.id.as_str()).collect();
    others
        .iter()
        .filter(|d| !d.progress.state.is_over())
        .filter_map(|d| {
            let picker = Picker::new(&d.selector, d.geofence.as_ref()).ok()?;
            let mut theirs: Vec<String> = picker
                .pick(fleet)
                .into_iter()
                .map(|c| c.id.as_str().to_owned())
                .chain(d.progress.started.keys().cloned())
                .filter(|id| mine.contains(id.as_str()))
                .collect();
            theirs.sort_unstable();
            theirs.dedup();
            (!theirs.is_empty()).then_some((d.name.as_str(), theirs))
        })
        .collect()
}

/// A plan from an operator's request, checked.
pub(crate) fn plan(
    request: &cardeploy_protocol::api::NewDeployment,
    now: u64,
) -> Result<Plan, String> {
    let phases = request
        .phases
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let size = match (p.cars, p.percent) {
                (Some(n), None) => rollout::Size::Cars(n),
                (None, Some(x)) => rollout::Size::Percent(x),
                _ => return Err(format!("phase {}: give either `cars` or `percent`", i + 1)),
            };
            Ok(rollout::PhaseSpec {
                size,
                soak_secs: p.soak_secs,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    // Ten seconds at least: less ends before a driver round could start a car. Simulations
    // (`cargo xtask fleet-sim`) scale their time down to that.
    if !(10..=366 * 86_400).contains(&request.ttl_secs) {
        return Err(format!(
            "ttl_secs = {}: give 10 s to 366 days",
            request.ttl_secs
        ));
    }
    let plan = Plan {
        phases,
        max_starts_per_minute: request.max_starts_per_minute,
        failure_threshold: request.failure_threshold,
        success_threshold: request.success_threshold,
        expires_at: now + request.ttl_secs,
    };
    plan.check().map_err(|e| e.to_string())?;
    Ok(plan)
}

/// A new deployment's record.
pub(crate) fn record(
    request: &cardeploy_protocol::api::NewDeployment,
    release: &str,
    plan: Plan,
) -> StoredDeployment {
    StoredDeployment {
        name: request.name.clone(),
        release: release.to_owned(),
        selector: request.selector.clone(),
        geofence: request.geofence.clone(),
        plan,
        progress: Progress::default(),
        created_at: now(),
        updated_at: now(),
    }
}
