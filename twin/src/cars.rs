//! The cars' side of the twin: who is connected, and the routes a car calls.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use cardeploy_link::{Acceptor, Peer, Refusal, Requester, Responder, Session};
use cardeploy_protocol::{
    self as protocol, CarId, DesiredState, Heartbeat, Hello, HelloReply, Report, ReportBody,
    SetupData, route,
};
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::watch;

use crate::{Twin, fetching};

/// What the twin knows live about one car (the database has the rest).
#[derive(Debug)]
pub(crate) struct Live {
    /// The newest desired state; every `car.desired` stream of this car follows it.
    pub desired: watch::Sender<Option<DesiredState>>,
    /// The open connection, if any.
    pub session: Option<(u64, Requester)>,
    /// The last download progress the car reported.
    pub progress: Option<protocol::FetchProgress>,
    /// The last OS installation progress the car reported.
    pub install: Option<protocol::InstallProgress>,
    /// The chunk indexes the car may read, once worked out (`fetching.rs`).
    pub readable: Option<Arc<std::collections::HashSet<cardeploy_chunks::Digest>>>,
    /// Held by the car's delta job while it runs: one at a time per car.
    pub delta_turn: Arc<tokio::sync::Mutex<()>>,
    /// The car's report rate limit (`limits.rs`).
    pub reports: crate::limits::ReportGate,
}

#[derive(Debug, Default)]
pub(crate) struct Fleet {
    cars: Mutex<HashMap<CarId, Live>>,
}

impl Fleet {
    pub fn with_car<T>(&self, car: &CarId, f: impl FnOnce(&mut Live) -> T) -> T {
        let mut cars = self
            .cars
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let live = cars.entry(car.clone()).or_insert_with(|| Live {
            desired: watch::Sender::new(None),
            session: None,
            progress: None,
            install: None,
            readable: None,
            delta_turn: Arc::default(),
            reports: Default::default(),
        });
        f(live)
    }

    /// `f` on `car`'s live record if it has one (a car never connected here has none: nothing is
    /// made for it).
    pub fn if_present<T>(&self, car: &CarId, f: impl FnOnce(&mut Live) -> T) -> Option<T> {
        let mut cars = self
            .cars
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cars.get_mut(car).map(f)
    }

    /// Hand `message` to `car`'s desired-state streams if it is connected here (unless they
    /// have it already). A car connected elsewhere, or not at all, reads its desired state from
    /// the database at its next hello: an instance holds the messages of its own cars only.
    pub fn offer(&self, car: &CarId, message: &DesiredState) {
        self.if_present(car, |live| {
            if live.session.is_some() {
                live.desired.send_if_modified(|current| {
                    if current.as_ref() == Some(message) {
                        false
                    } else {
                        *current = Some(message.clone());
                        true
                    }
                });
            }
        });
    }

    /// `f` on every car's live record (under the fleet's lock: keep it short).
    pub fn each(&self, f: impl FnMut(&mut Live)) {
        let mut cars = self
            .cars
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cars.values_mut().for_each(f);
    }

    pub fn connected(&self, car: &CarId) -> Option<Requester> {
        let cars = self
            .cars
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cars.get(car)
            .and_then(|live| live.session.as_ref())
            .map(|(_, requester)| requester.clone())
    }

    /// The cars connected here.
    pub fn connected_ids(&self) -> Vec<CarId> {
        let cars = self
            .cars
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cars.iter()
            .filter(|(_, live)| live.session.is_some())
            .map(|(id, _)| id.clone())
            .collect()
    }

    pub fn connected_count(&self) -> usize {
        let cars = self
            .cars
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cars.values().filter(|live| live.session.is_some()).count()
    }
}

/// [`cardeploy_release::now_secs`] as SQLite stores it.
pub(crate) fn now() -> i64 {
    i64::try_from(cardeploy_release::now_secs()).unwrap_or(i64::MAX)
}

pub(crate) struct CarAcceptor {
    pub twin: Arc<Twin>,
}

impl Acceptor for CarAcceptor {
    fn accept(&self, session: Session) -> Result<Arc<dyn Responder>, Refusal> {
        let setup: SetupData = protocol::decode("SETUP data", &session.setup_data)
            .map_err(|e| Refusal::new(e.to_string()))?;
        let car = match &session.peer {
            Peer::Authenticated(id) => {
                let car = CarId::new(id.clone()).map_err(|e| Refusal::new(e.to_string()))?;
                if car != setup.car_id {
                    // Not fatal: the certificate is the identity; the SETUP claim is a hint.
                    tracing::warn!(%car, claimed = %setup.car_id,
                        "car's SETUP names another car id; using the certificate's identity");
                }
                car
            }
            Peer::Unauthenticated => {
                let known = self.twin.is_registered(&setup.car_id);
                if !known {
                    return Err(Refusal::new(format!(
                        "car {} is not registered with this twin; register it with `cardeploy car add {}`",
                        setup.car_id, setup.car_id
                    )));
                }
                setup.car_id
            }
        };
        let conn_id = session.conn_id;
        let requester = session.requester;
        let previous = self.twin.fleet.with_car(&car, |live| {
            live.session.replace((conn_id, requester.clone()))
        });
        if let Some((_, old)) = previous {
            // The car came back before its old connection timed out: the new one wins.
            old.close();
        }
        if let Some(cluster) = &self.twin.cluster {
            cluster.tell(crate::instances::PresenceOp::Present {
                car: car.clone(),
                session: conn_id,
            });
        }
        tracing::info!(%car, remote = %session.remote, agent = %setup.agent_version, "car connected");
        {
            let twin = self.twin.clone();
            let car = car.clone();
            let requester = requester.clone();
            tokio::spawn(async move {
                requester.closed().await;
                let still_ours = twin.fleet.with_car(&car, |live| {
                    if live.session.as_ref().is_some_and(|(id, _)| *id == conn_id) {
                        live.session = None;
                        // Read again at its next hello, here or on another instance.
                        live.desired.send_replace(None);
                        true
                    } else {
                        false
                    }
                });
                if still_ours {
                    tracing::info!(%car, "car disconnected");
                    if let Some(cluster) = &twin.cluster {
                        cluster.tell(crate::instances::PresenceOp::Absent {
                            car: car.clone(),
                            session: conn_id,
                        });
                    }
                    let now = now();
                    if let Err(e) = twin.db.touch(&car, now).await {
                        tracing::warn!(%car, "{e}");
                    }
                    if let Err(e) = twin
                        .db
                        .event(&car, now, "disconnected", "connection closed")
                        .await
                    {
                        tracing::warn!(%car, "{e}");
                    }
                }
            });
        }
        Ok(Arc::new(CarResponder {
            twin: self.twin.clone(),
            car,
            requester,
        }))
    }
}

struct CarResponder {
    twin: Arc<Twin>,
    car: CarId,
    requester: Requester,
}

const ROUTES: &[&str] = &[
    route::CAR_HELLO,
    route::CAR_DESIRED,
    route::CAR_DESIRED_PAGE,
    route::CAR_REPORT,
    route::CAR_HEARTBEAT,
    route::ARTIFACT_INDEX,
    route::ARTIFACT_CHUNKS,
];

fn refuse(e: impl std::fmt::Display) -> Refusal {
    Refusal::new(e.to_string())
}

#[async_trait]
impl Responder for CarResponder {
    async fn request_response(&self, route: &str, data: Bytes) -> Result<Bytes, Refusal> {
        match route {
            route::CAR_HELLO => {
                let hello: Hello = protocol::decode("car.hello request", &data).map_err(refuse)?;
                let now = now();
                self.twin
                    .db
                    .hello(&self.car, &hello.reported, &hello.agent_version, now)
                    .await
                    .map_err(|e| internal(&self.car, e))?;
                let message = format!("agent {} connected", hello.agent_version);
                self.twin
                    .db
                    .event(&self.car, now, "connected", &message)
                    .await
                    .map_err(|e| internal(&self.car, e))?;
                // The release it runs may have changed while it was away.
                self.twin.forget_readable(&self.car);
                // A desired state that cannot be signed again now (a counter out of reach) must
                // not keep the car from saying hello: it is logged, and the car works on with the
                // one stored.
                let stored = match self.refresh_desired(&hello.reported).await {
                    Ok(stored) => stored,
                    Err(e) => {
                        tracing::warn!(car = %self.car, "desired state not signed again: {e}");
                        self.twin
                            .db
                            .desired(&self.car)
                            .await
                            .map_err(|e| internal(&self.car, e))?
                    }
                };
                let desired = match stored {
                    Some(stored) => Some(
                        self.twin
                            .offer_stored(&self.car, &stored)
                            .await
                            .map_err(|e| internal(&self.car, e))?,
                    ),
                    None => None,
                };
                let reports_through = self
                    .twin
                    .db
                    .report_mark(&self.car)
                    .await
                    .map_err(|e| internal(&self.car, e))?
                    .map(|(epoch, seq)| protocol::ReportMark {
                        epoch: epoch.unsigned_abs(),
                        seq: seq.unsigned_abs(),
                    });
                let reply = HelloReply {
                    car_id: self.car.clone(),
                    desired,
                    heartbeat_secs: self.twin.config.heartbeat_secs,
                    reports_through,
                };
                let mut answer = protocol::encode(&reply);
                if answer.len() as u64 > protocol::PAGE_BYTES {
                    // Too large for one payload: the car.desired stream announces it by pages.
                    answer = protocol::encode(&HelloReply {
                        desired: None,
                        ..reply
                    });
                }
                Ok(Bytes::from(answer))
            }
            route::CAR_HEARTBEAT => {
                let _: Heartbeat =
                    protocol::decode("car.heartbeat request", &data).map_err(refuse)?;
                Ok(Bytes::from(protocol::encode(&Heartbeat {})))
            }
            route::ARTIFACT_INDEX => fetching::index_page(&self.twin, &self.car, &data).await,
            route::CAR_DESIRED_PAGE => fetching::desired_page(&self.twin, &self.car, &data),
            other => Err(Refusal::unknown_route(other, ROUTES)),
        }
    }

    async fn fire_and_forget(&self, route: &str, data: Bytes) {
        if !crate::limits::admit_report(&self.twin, &self.car) {
            return;
        }
        if route != route::CAR_REPORT {
            tracing::warn!(car = %self.car, %route, "fire-and-forget on an unknown route dropped");
            return;
        }
        let report: Report = match protocol::decode("car.report", &data) {
            Ok(report) => report,
            Err(e) => {
                tracing::warn!(car = %self.car, "dropped a report: {e}");
                return;
            }
        };
        if let Err(e) = self.store_report(report).await {
            tracing::warn!(car = %self.car, "could not store a report: {e}");
        }
    }

    fn request_stream(
        &self,
        route: &str,
        data: Bytes,
    ) -> BoxStream<'static, Result<Bytes, Refusal>> {
        if route == route::ARTIFACT_CHUNKS {
            return fetching::chunks(self.twin.clone(), self.car.clone(), data);
        }
        if route != route::CAR_DESIRED {
            let refusal = Refusal::unknown_route(route, ROUTES);
            return futures::stream::once(async move { Err(refusal) }).boxed();
        }
        // No message is defined for the request: empty data or `{}`.
        if !data.is_empty()
            && let Err(e) = protocol::decode::<Heartbeat>("car.desired request", &data)
        {
            let refusal = refuse(e);
            return futures::stream::once(async move { Err(refusal) }).boxed();
        }
        let mut desired = self
            .twin
            .fleet
            .with_car(&self.car, |live| live.desired.subscribe());
        let requester = self.requester.clone();
        let (twin, car) = (self.twin.clone(), self.car.clone());
        async_stream::stream! {
            // Asked before the hello that reads it (the agent says hello first): read it here.
            if desired.borrow().is_none() {
                let offered = match twin.db.desired(&car).await {
                    Ok(Some(stored)) => twin.offer_stored(&car, &stored).await.map(drop),
                    Ok(None) => Ok(()),
                    Err(e) => Err(e),
                };
                if let Err(e) = offered {
                    tracing::warn!(%car, "{e}");
                }
            }
            loop {
                let current = desired.borrow_and_update().clone();
                if let Some(state) = current {
                    yield Ok(fetching::desired_item(&state));
                }
                tokio::select! {
                    changed = desired.changed() => if changed.is_err() { break },
                    () = requester.closed() => break,
                }
            }
        }
        .boxed()
    }
}

impl CarResponder {
    /// A signed desired state expires (freeze protection); a car coming back after a long time
    /// would refuse it. With less than half its lifetime left, sign the same release again with
    /// the next counter: the car records the counter and has nothing new to do.
    ///
    /// The same when the car says it accepted a higher counter than the one stored: this twin's
    /// database was restored from an older copy (or rebuilt), and the car would refuse the
    /// stored one as a replay. Signed again above the car's counter, it is taken without anyone
    /// stepping in.
    ///
    /// `reported` is what the car said in its hello (stored just before). Returns the desired
    /// state in force afterwards, if there is one.
    async fn refresh_desired(
        &self,
        reported: &protocol::ReportedState,
    ) -> Result<Option<crate::StoredDesired>, crate::Error> {
        let Some(stored) = self.twin.db.desired(&self.car).await? else {
            return Ok(None);
        };
        let now = u64::try_from(now()).unwrap_or(0);
        // Both counters count only in the scope in force.
        let scope = self.twin.trust.counter_scope();
        let in_scope = |counted_in: &Option<String>| counted_in.is_none() || *counted_in == scope;
        let car_counter = Some(reported)
            .filter(|r| in_scope(&r.counter_scope))
            .and_then(|r| r.desired_counter);
        let ours = if in_scope(&stored.scope) {
            stored.counter
        } else {
            0
        };
        let behind = car_counter.is_some_and(|c| c > ours);
        // Signed by a director role no longer in force (the twin restarted with a new director
        // key): signed again by the one in force.
        let outdated = !in_scope(&stored.scope);
        if !behind && !outdated && !due_for_refresh(stored.issued, stored.expires, now) {
            return Ok(Some(stored));
        }
        let ttl = stored.expires.saturating_sub(stored.issued).max(60);
        let fresh = self
            .twin
            .issue_desired(&self.car, &stored.release, ttl, stored.downgrade.clone())
            .await?;
        if behind {
            tracing::warn!(car = %self.car, counter = fresh.counter, car_counter = ?car_counter,
                stored = stored.counter, "the car accepted a higher counter than this twin remembers (a restored database?); desired state signed again above it");
        } else {
            tracing::info!(car = %self.car, counter = fresh.counter, "desired state re-signed before it expires");
        }
        Ok(Some(fresh))
    }

    async fn store_report(&self, report: Report) -> Result<(), crate::Error> {
        let epoch = i64::try_from(report.epoch).unwrap_or(i64::MAX);
        let seq = i64::try_from(report.seq).unwrap_or(i64::MAX);
        let now = now();
        match report.body {
            ReportBody::State { state } => {
                // Bounded before it is stored: a car cannot make the twin keep more than
                // MAX_WORKLOADS workloads or longer texts for it.
                if let Err(why) = state.check() {
                    tracing::warn!(car = %self.car, "dropped a reported state: {why}");
                    return Ok(());
                }
                // The agent sends its last state again after a burst (a report over the rate
                // may have been dropped): the same state again is no new line in the log.
                if self
                    .twin
                    .db
                    .report_state(&self.car, &state, epoch, seq, now)
                    .await?
                    == crate::db::StoredState::Changed
                {
                    tracing::debug!(car = %self.car, ?state.phase, "reported state");
                    self.twin.forget_readable(&self.car);
                    let message = format!(
                        "{:?}: release {} (desired #{})",
                        state.phase,
                        state.release.as_deref().unwrap_or("-"),
                        state.desired_counter.map_or("-".into(), |c| c.to_string())
                    );
                    self.twin
                        .db
                        .event(&self.car, now, "state", &message)
                        .await?;
                }
            }
            ReportBody::Event { kind, message } => {
                self.twin
                    .db
                    .report_event(&self.car, (epoch, seq), now, &kind, &message)
                    .await?;
            }
            ReportBody::Progress { progress: p } => {
                let message = format!(
                    "{} {}: {}/{} fetched ({} on the wire); {} already on the car, {} from seeds; artifact {}",
                    p.artifact,
                    if p.done { "done" } else { "fetching" },
                    protocol::human_bytes(p.fetched_bytes),
                    protocol::human_bytes(p.fetch_bytes),
                    protocol::human_bytes(p.wire_bytes),
                    protocol::human_bytes(p.store_bytes),
                    protocol::human_bytes(p.seed_bytes),
                    protocol::human_bytes(p.planned_bytes),
                );
                if self
                    .twin
                    .db
                    .report_event(&self.car, (epoch, seq), now, "fetch", &message)
                    .await?
                {
                    self.twin
                        .fleet
                        .with_car(&self.car, |live| live.progress = Some(p));
                }
            }
            ReportBody::Position { position } => {
                if let Err(why) = position.check() {
                    tracing::warn!(car = %self.car, "dropped a position: {why}");
                    return Ok(());
                }
                if self.twin.db.mark_seq(&self.car, epoch, seq, now).await? {
                    self.twin.db.set_position(&self.car, position, now).await?;
                }
            }
            ReportBody::Install { progress: p } => {
                let message = format!("{} {}%: {}", p.release, p.percentage, p.message);
                if self
                    .twin
                    .db
                    .report_event(&self.car, (epoch, seq), now, "install", &message)
                    .await?
                {
                    self.twin
                        .fleet
                        .with_car(&self.car, |live| live.install = Some(p));
                }
            }
        }
        Ok(())
    }
}

/// Whether a desired state valid from `issued` to `expires` has less than half its lifetime
/// left at `now`.
fn due_for_refresh(issued: u64, expires: u64, now: u64) -> bool {
    let ttl = expires.saturating_sub(issued);
    expires.saturating_sub(now) <= ttl / 2
}

fn internal(car: &CarId, e: crate::Error) -> Refusal {
    tracing::error!(%car, "{e}");
    Refusal::new("the twin could not store this; it will be retried on the next hello")
}

#[cfg(test)]
mod tests {
    use super::due_for_refresh;

    #[test]
    fn a_desired_state_is_signed_again_in_the_second_half_of_its_life() {
        assert!(!due_for_refresh(1000, 2000, 1000));
        assert!(!due_for_refresh(1000, 2000, 1499));
        assert!(due_for_refresh(1000, 2000, 1500));
        assert!(due_for_refresh(1000, 2000, 5000), "expired long ago");
    }
}
