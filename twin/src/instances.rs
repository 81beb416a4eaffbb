//! Several twin instances on one PostgreSQL database (docs/operations.md, "Several instances").
//!
//! Each instance serves the cars connected to it from its memory, as a single twin does; what
//! one instance changes that another must act on travels through the database's change feed
//! (`db::Change`, `NOTIFY` in the transaction that made it): a desired state signed through
//! instance 1 is read and pushed by the instance the car is connected to; a registration or
//! revocation lets a certificate in or out everywhere; a new root reaches every car; a
//! deployment changed anywhere wakes the driver. The instance that drives deployments is elected
//! by a lock (`db::DriverLock`) and rounds take a fleet-wide lock, so no step runs twice.
//!
//! Each instance says every [`HEARTBEAT`] that it is alive, and which cars are connected to it
//! (presence): the driver counts a car online when it is connected to any live instance.

use std::sync::Arc;
use std::time::Duration;

use cardeploy_protocol::CarId;
use sqlx::postgres::PgListener;
use tokio::sync::mpsc;

use crate::db::{CHANNEL, Change, Instance};
use crate::error::Error;
use crate::{Twin, now};

/// How often an instance says it is alive.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(5);

/// An instance not heard from for this long is taken for dead: its cars count offline.
pub(crate) const ALIVE_WITHIN_SECS: i64 = 20;

/// An instance dead this long is forgotten, with its presence rows.
const FORGET_AFTER_SECS: i64 = 300;

/// A change of presence, written in order by one task so that a car's quick reconnect to the
/// same instance is never undone by its old connection's late goodbye.
#[derive(Debug)]
pub(crate) enum PresenceOp {
    Present { car: CarId, session: u64 },
    Absent { car: CarId, session: u64 },
}

/// This instance among others (PostgreSQL only).
#[derive(Debug)]
pub(crate) struct Cluster {
    pub me: Instance,
    presence: mpsc::UnboundedSender<PresenceOp>,
}

impl Cluster {
    /// This instance (its id the database's [`crate::db::Db::origin`]), and the receiving end
    /// for [`write_presence`].
    pub fn new(
        id: &str,
        api: std::net::SocketAddr,
        director: String,
    ) -> (Self, mpsc::UnboundedReceiver<PresenceOp>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self {
                me: Instance {
                    id: id.to_owned(),
                    api: api.to_string(),
                    director,
                },
                presence: tx,
            },
            rx,
        )
    }

    /// Queue a change of presence (a car connected or left).
    pub fn tell(&self, op: PresenceOp) {
        // The receiver lives as long as the twin runs; after it stops nobody needs to know.
        let _ = self.presence.send(op);
    }
}

/// Refuse to start beside live instances that sign with another director key: cars would take
/// the desired states of one and refuse the other's.
pub(crate) async fn check_director(twin: &Twin, me: &Instance) -> Result<(), Error> {
    for other in twin.db.instances(now() - ALIVE_WITHIN_SECS).await? {
        if other.id != me.id && other.director != me.director {
            return Err(Error::Config {
                path: twin.config.director_key_path(),
                why: format!(
                    "the running twin instance {} (API {}) signs with director key {}, this one with {}: every instance must hold the same key — copy director.key and director.pub from a running instance's data directory (docs/operations.md)",
                    other.id, other.api, other.director, me.director
                ),
            });
        }
    }
    if !twin.trust.names_director() {
        tracing::warn!(
            keyid = %me.director,
            "the root in force does not name this instance's director key: cars refuse what it signs until a root naming it is pushed"
        );
    }
    Ok(())
}

/// Say every [`HEARTBEAT`] that this instance is alive; forget instances long dead. When the
/// instance stops, it says so: its cars count offline at once rather than after
/// [`ALIVE_WITHIN_SECS`].
pub(crate) async fn heartbeat(twin: Arc<Twin>, me: Instance, stopped: impl Future<Output = ()>) {
    tokio::pin!(stopped);
    loop {
        let now = now();
        if let Err(e) = twin.db.instance_alive(&me, now).await {
            tracing::warn!("could not say this instance is alive: {e}");
        }
        match twin.db.forget_instances(now - FORGET_AFTER_SECS).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(instances = n, "forgot twin instances not heard from"),
            Err(e) => tracing::warn!("{e}"),
        }
        tokio::select! {
            () = &mut stopped => break,
            () = tokio::time::sleep(HEARTBEAT) => {}
        }
    }
    if let Err(e) = twin.db.instance_gone(&me.id).await {
        tracing::warn!("could not say this instance stopped: {e}");
    }
}

/// Write presence changes in the order they happened.
/// Holds the database, not the twin: it ends when the twin (the last sender) is dropped.
pub(crate) async fn write_presence(
    db: crate::db::Db,
    me: String,
    mut ops: mpsc::UnboundedReceiver<PresenceOp>,
) {
    while let Some(op) = ops.recv().await {
        let result = match &op {
            PresenceOp::Present { car, session } => db.present(car, &me, *session, now()).await,
            PresenceOp::Absent { car, session } => db.absent(car, &me, *session).await,
        };
        if let Err(e) = result {
            tracing::warn!(?op, "{e}");
        }
    }
}

/// Follow the change feed until `stopped`. Whenever the listening connection was lost (and
/// notifications with it), everything the feed would have said is read again.
pub(crate) async fn follow(
    twin: Arc<Twin>,
    url: String,
    stopped: impl Future<Output = ()>,
) -> Result<(), Error> {
    tokio::pin!(stopped);
    let feed_error = |e: sqlx::Error| Error::Database {
        url: "(change feed)".into(),
        why: e.to_string(),
    };
    let mut listener = PgListener::connect(&url).await.map_err(feed_error)?;
    listener.listen(CHANNEL).await.map_err(feed_error)?;
    // What changed between reading the state at start and listening.
    resync(&twin).await;
    loop {
        let next = tokio::select! {
            () = &mut stopped => return Ok(()),
            next = listener.try_recv() => next,
        };
        match next {
            Ok(Some(notification)) => match Change::heard(notification.payload()) {
                // This instance's own changes took effect here when it made them.
                Some((origin, _)) if origin == twin.db.origin() => {}
                Some((_, change)) => {
                    if let Err(e) = apply(&twin, &change).await {
                        tracing::warn!(?change, "change from another instance: {e}");
                    }
                }
                None => tracing::debug!(payload = notification.payload(), "unknown change"),
            },
            // Reconnected (and listening again): what was said meanwhile is lost.
            Ok(None) => {
                tracing::warn!("the change feed's connection was lost; reading everything again");
                resync(&twin).await;
            }
            Err(e) => {
                tracing::warn!("change feed: {e}; retrying");
                tokio::select! {
                    () = &mut stopped => return Ok(()),
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                // Connects and listens again if it has to.
                if sqlx::Executor::execute(&mut listener, "SELECT 1")
                    .await
                    .is_ok()
                {
                    resync(&twin).await;
                }
            }
        }
    }
}

/// Act on one change.
async fn apply(twin: &Twin, change: &Change) -> Result<(), Error> {
    match change {
        Change::Desired { car, .. } => {
            twin.forget_readable(car);
            // A car connected elsewhere (or nowhere) costs this instance nothing more.
            if twin.fleet.connected(car).is_some()
                && let Some(stored) = twin.db.desired(car).await?
            {
                twin.offer_stored(car, &stored).await?;
            }
            Ok(())
        }
        Change::Car(car) => {
            if let Some(record) = twin.db.car(car).await? {
                admit(twin, &record);
            }
            Ok(())
        }
        Change::Roots => {
            twin.trust.load(&twin.db).await?;
            // Every car's next message carries the new chain. With a new director role the
            // instance that took the root also signs every desired state again: those changes
            // come through this feed.
            twin.push_roots();
            Ok(())
        }
        Change::Deployments => {
            twin.deployments_wake.notify_one();
            Ok(())
        }
    }
}

/// Let a car's certificate in, or keep a revoked one out (and end its session here).
fn admit(twin: &Twin, record: &crate::CarRecord) {
    if record.revoked_at.is_some() {
        twin.unregister(&record.id, &record.fingerprint);
    } else {
        twin.register(record);
    }
}

/// Read again everything the change feed announces.
async fn resync(twin: &Twin) {
    let result = async {
        for record in twin.db.cars().await? {
            admit(twin, &record);
        }
        apply(twin, &Change::Roots).await?;
        for car in twin.fleet.connected_ids() {
            apply(twin, &Change::Desired { car, counter: 0 }).await?;
        }
        apply(twin, &Change::Deployments).await
    };
    if let Err(e) = result.await {
        tracing::warn!("reading the shared state again: {e}");
    }
}
