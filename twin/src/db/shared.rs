//! What several twin instances on one PostgreSQL database share beyond the records: a change
//! feed (`NOTIFY` inside the transaction that made the change, so an instance hears of a change
//! exactly when it is committed, and never of one rolled back), the root chain, which instance is
//! alive and which car is connected to which instance (presence), and the lock that elects the
//! one instance driving deployments.
//!
//! On SQLite (one instance) the feed is silent, presence lives in the instance's memory and the
//! instance always drives; the tables exist on both so every query here is tested on both.

use std::collections::HashSet;

use cardeploy_protocol::CarId;
use sqlx::{Any, AnyConnection, Connection, Row, Transaction};

use super::{Backend, Db};
use crate::error::{Error, db};

/// The `LISTEN` channel of the change feed.
pub const CHANNEL: &str = "cardeploy_changes";

/// The session lock held by the instance that drives deployments.
const DRIVER_LOCK: &str = "cardeploy deployments driver";

/// A change another instance may need to act on. Payloads are short text (`NOTIFY` carries at
/// most 8,000 bytes; a car id is at most 128), after the id of the instance that made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// `car`'s desired state was signed with `counter`: push it to the car if it is connected here.
    Desired { car: CarId, counter: u64 },
    /// `car` was registered, re-provisioned or revoked: let its certificate in or keep it out.
    Car(CarId),
    /// A root was added to the chain.
    Roots,
    /// A deployment was created or moved (an operator's action or a driver's step).
    Deployments,
}

impl Change {
    pub fn payload(&self) -> String {
        match self {
            Self::Desired { car, counter } => format!("desired {counter} {car}"),
            Self::Car(car) => format!("car {car}"),
            Self::Roots => "roots".into(),
            Self::Deployments => "deployments".into(),
        }
    }

    /// The instance a notification came from, and its change; `None` for a payload this twin
    /// does not know (a newer instance's): ignored.
    pub fn heard(notification: &str) -> Option<(&str, Self)> {
        let (origin, payload) = notification.split_once(' ')?;
        Some((origin, Self::parse(payload)?))
    }

    /// `None` for a payload this twin does not know.
    pub fn parse(payload: &str) -> Option<Self> {
        let mut words = payload.splitn(3, ' ');
        match (words.next()?, words.next(), words.next()) {
            ("desired", Some(counter), Some(car)) => Some(Self::Desired {
                counter: counter.parse().ok()?,
                car: CarId::new(car.to_owned()).ok()?,
            }),
            ("car", Some(car), None) => Some(Self::Car(CarId::new(car.to_owned()).ok()?)),
            ("roots", None, None) => Some(Self::Roots),
            ("deployments", None, None) => Some(Self::Deployments),
            _ => None,
        }
    }
}

/// A twin instance as it announces itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    /// Its operator API's address, for messages that send an operator to it.
    pub api: String,
    /// The key id of its director key: every instance must sign with the same one.
    pub director: String,
}

/// Where a car is connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Presence {
    pub instance: String,
    pub api: String,
}

impl Db {
    /// Announce `change` to every instance when `tx` commits (PostgreSQL); nothing on SQLite.
    pub(super) async fn announce(
        &self,
        tx: &mut Transaction<'static, Any>,
        change: &Change,
    ) -> Result<(), sqlx::Error> {
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(format!("{} {}", self.origin, change.payload()))
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// This instance's id (random at each start), which its changes carry.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The database URL, for connections of their own (the change feed's listener, the
    /// driver's lock). `None` on SQLite.
    pub fn url(&self) -> Option<&str> {
        self.url.as_deref()
    }

    /// Every stored root, version 1 first.
    pub async fn roots(&self) -> Result<Vec<(u64, String)>, Error> {
        let rows = sqlx::query("SELECT version, envelope FROM roots ORDER BY version")
            .fetch_all(&self.pool)
            .await
            .map_err(db("read roots"))?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get::<i64, _>(0).unsigned_abs(), r.get(1)))
            .collect())
    }

    /// Store root `version`, durably, and announce it; false when that version is stored
    /// already (by another instance, or an earlier upload).
    pub async fn insert_root(&self, version: u64, envelope: &str) -> Result<bool, Error> {
        let mut tx = self.durable.begin().await.map_err(db("store a root"))?;
        let done = sqlx::query(
            "INSERT INTO roots (version, envelope) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(i64::try_from(version).unwrap_or(i64::MAX))
        .bind(envelope)
        .execute(&mut *tx)
        .await
        .map_err(db("store a root"))?;
        self.announce(&mut tx, &Change::Roots)
            .await
            .map_err(db("store a root"))?;
        tx.commit().await.map_err(db("store a root"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Say that `instance` is alive at `now` (inserted the first time).
    pub async fn instance_alive(&self, instance: &Instance, now: i64) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO twin_instances (id, api, director, seen) VALUES ($1, $2, $3, $4)
             ON CONFLICT(id) DO UPDATE SET seen = excluded.seen",
        )
        .bind(&instance.id)
        .bind(&instance.api)
        .bind(&instance.director)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db("announce this instance"))?;
        Ok(())
    }

    /// The instances seen since `since`.
    pub async fn instances(&self, since: i64) -> Result<Vec<Instance>, Error> {
        let rows = sqlx::query(
            "SELECT id, api, director FROM twin_instances WHERE seen >= $1 ORDER BY id",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await
        .map_err(db("read instances"))?;
        Ok(rows
            .into_iter()
            .map(|r| Instance {
                id: r.get(0),
                api: r.get(1),
                director: r.get(2),
            })
            .collect())
    }

    /// Forget instances not seen since `since`, and the cars they said were connected to them:
    /// those instances died (or were cut off); their cars have reconnected elsewhere or are away.
    pub async fn forget_instances(&self, since: i64) -> Result<u64, Error> {
        let mut tx = self.pool.begin().await.map_err(db("forget instances"))?;
        sqlx::query(
            "DELETE FROM presence WHERE instance IN (SELECT id FROM twin_instances WHERE seen < $1)",
        )
        .bind(since)
        .execute(&mut *tx)
        .await
        .map_err(db("forget instances"))?;
        let gone = sqlx::query("DELETE FROM twin_instances WHERE seen < $1")
            .bind(since)
            .execute(&mut *tx)
            .await
            .map_err(db("forget instances"))?;
        tx.commit().await.map_err(db("forget instances"))?;
        Ok(gone.rows_affected())
    }

    /// `instance` stopped: forget it and the cars connected to it.
    pub async fn instance_gone(&self, instance: &str) -> Result<(), Error> {
        let mut tx = self.pool.begin().await.map_err(db("forget an instance"))?;
        for sql in [
            "DELETE FROM presence WHERE instance = $1",
            "DELETE FROM twin_instances WHERE id = $1",
        ] {
            sqlx::query(sql)
                .bind(instance)
                .execute(&mut *tx)
                .await
                .map_err(db("forget an instance"))?;
        }
        tx.commit().await.map_err(db("forget an instance"))
    }

    /// `car` connected to `instance` with connection `session` (a newer connection anywhere
    /// replaces the row).
    pub async fn present(
        &self,
        car: &CarId,
        instance: &str,
        session: u64,
        now: i64,
    ) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO presence (car_id, instance, session, since) VALUES ($1, $2, $3, $4)
             ON CONFLICT(car_id) DO UPDATE SET instance = excluded.instance,
                session = excluded.session, since = excluded.since",
        )
        .bind(car.as_str())
        .bind(instance)
        .bind(i64::try_from(session).unwrap_or(i64::MAX))
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db("store presence"))?;
        Ok(())
    }

    /// Connection `session` of `car` to `instance` ended; a newer one (here or elsewhere) stays.
    pub async fn absent(&self, car: &CarId, instance: &str, session: u64) -> Result<(), Error> {
        sqlx::query("DELETE FROM presence WHERE car_id = $1 AND instance = $2 AND session = $3")
            .bind(car.as_str())
            .bind(instance)
            .bind(i64::try_from(session).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await
            .map_err(db("store presence"))?;
        Ok(())
    }

    /// Every car connected to an instance seen since `since`.
    pub async fn online(&self, since: i64) -> Result<HashSet<String>, Error> {
        sqlx::query_scalar(
            "SELECT p.car_id FROM presence p JOIN twin_instances i ON p.instance = i.id
             WHERE i.seen >= $1",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await
        .map(|ids: Vec<String>| ids.into_iter().collect())
        .map_err(db("read presence"))
    }

    /// Where `car` is connected, if to an instance seen since `since`.
    pub async fn presence(&self, car: &CarId, since: i64) -> Result<Option<Presence>, Error> {
        let row = sqlx::query(
            "SELECT i.id, i.api FROM presence p JOIN twin_instances i ON p.instance = i.id
             WHERE p.car_id = $1 AND i.seen >= $2",
        )
        .bind(car.as_str())
        .bind(since)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("read presence"))?;
        Ok(row.map(|r| Presence {
            instance: r.get(0),
            api: r.get(1),
        }))
    }

    /// Hold `key` fleet-wide until the returned guard drops: on PostgreSQL a transaction that
    /// holds an advisory lock (ended, and so released, when dropped or when this process dies);
    /// on SQLite nothing (one instance: its own mutex suffices, and SQLite's write lock held
    /// for long would stop every other write).
    pub async fn hold(&self, key: &str) -> Result<Option<Transaction<'static, Any>>, Error> {
        match self.backend {
            Backend::Sqlite => Ok(None),
            Backend::Postgres => self
                .exclusive(key)
                .await
                .map(Some)
                .map_err(db("take a fleet-wide lock")),
        }
    }
}

/// The election of the instance that drives deployments: a session advisory lock on a
/// connection of its own. PostgreSQL releases it when that connection ends — the instance
/// stopped, died or lost the database — and the next instance to try takes it.
pub struct DriverLock {
    url: Option<String>,
    conn: Option<AnyConnection>,
    held: bool,
}

impl DriverLock {
    pub fn new(db: &Db) -> Self {
        Self {
            url: db.url.clone(),
            conn: None,
            held: false,
        }
    }

    /// Whether this instance drives now: takes the lock when it is free, and checks that the
    /// connection holding it is still alive when it is held. Always true on SQLite.
    pub async fn lead(&mut self) -> Result<bool, Error> {
        let Some(url) = &self.url else {
            return Ok(true);
        };
        if self.conn.is_none() {
            self.held = false;
            self.conn = Some(
                AnyConnection::connect(url)
                    .await
                    .map_err(db("connect for the driver's lock"))?,
            );
        }
        let Some(conn) = self.conn.as_mut() else {
            return Ok(false);
        };
        let answer = if self.held {
            sqlx::query_scalar::<_, bool>("SELECT true")
                .fetch_one(&mut *conn)
                .await
        } else {
            sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                .bind(DRIVER_LOCK)
                .fetch_one(&mut *conn)
                .await
        };
        match answer {
            Ok(held) => {
                self.held = held;
                Ok(held)
            }
            Err(e) => {
                // The connection is gone, and with it the lock if it was held.
                self.conn = None;
                self.held = false;
                Err(db("check the driver's lock")(e))
            }
        }
    }

    /// Let the lock go (the instance stops): unlocked before the connection closes, so the next
    /// instance to try has it at once rather than when the server notices the session ended.
    pub async fn release(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            if self.held {
                let _ = sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
                    .bind(DRIVER_LOCK)
                    .execute(&mut conn)
                    .await;
            }
            let _ = conn.close().await;
        }
        self.held = false;
    }
}
