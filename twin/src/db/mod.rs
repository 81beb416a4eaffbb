//! The twin's records, in SQLite (the embedded default) or PostgreSQL (several twin instances
//! sharing one database), through sqlx's `Any` driver: every query is written once, in the SQL
//! both understand (`$N` parameters, `ON CONFLICT`, row values), and runs on either. The schema is
//! written once per dialect and migrated in step (`SCHEMA` + `MIGRATIONS` for SQLite,
//! `PG_MIGRATIONS` for PostgreSQL); the tests run every query on both.
//!
//! Writes are single statements or short transactions. Writes that must not interleave (a car's
//! desired-state counter, the car registry) take a lock first: SQLite's write lock
//! (`BEGIN IMMEDIATE`), or on PostgreSQL a transaction-scoped advisory lock on the key, which also
//! orders twin instances.
//!
//! SQLite runs in WAL mode so readers (the API) never block writers (the cars). Two pools share
//! the file. The main one runs `synchronous=NORMAL`: a commit may be lost on a
//! power cut, which costs nothing for reports and events the car sends again or that only
//! describe the past. The durable one (one connection, `synchronous=FULL`, so its commits fsync
//! the WAL) takes the writes that must never be undone once acknowledged: desired-state counters
//! (a counter signed, lost and signed again for another release would be a replay the car
//! refuses, or worse, accepts on another car's behalf) and the car registry (a revocation that a
//! power cut undoes would let the revoked certificate back in). On PostgreSQL every commit is
//! durable (`synchronous_commit` on, its default) and one pool serves both.

#[cfg(test)]
mod both;
mod cars;
mod deployments;
mod events;
mod shared;

use std::path::{Path, PathBuf};

use cardeploy_protocol::api::{ReleaseSummary, ReportedView};
use cardeploy_protocol::{Attributes, CarId, Envelope, ReportedState};
use serde::{Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, Connection, Row, Transaction};
use sqlx::{AnyConnection, AnyPool};

use crate::error::{Error, db, encode};

const SCHEMA: &str = r"
CREATE TABLE IF NOT EXISTS cars (
    id TEXT PRIMARY KEY,
    attributes TEXT NOT NULL,
    fingerprint TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    digest TEXT PRIMARY KEY,
    line TEXT NOT NULL,
    version TEXT NOT NULL,
    compatible TEXT NOT NULL,
    created INTEGER NOT NULL,
    artifacts INTEGER NOT NULL,
    envelope TEXT NOT NULL,
    UNIQUE (line, version)
);
-- One signed desired state per car (docs/release-format.md); `document` is a StoredDesired.
CREATE TABLE IF NOT EXISTS signed_desired (
    car_id TEXT PRIMARY KEY REFERENCES cars(id),
    counter INTEGER NOT NULL,
    document TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reported (
    car_id TEXT PRIMARY KEY REFERENCES cars(id),
    document TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    agent_version TEXT,
    updated_at INTEGER NOT NULL,
    last_seen INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    car_id TEXT NOT NULL REFERENCES cars(id),
    at INTEGER NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_car ON events(car_id, id);
";

/// Releases remembered per car as sent: a car may read the artifacts of these (and of the one it
/// runs). Bounded so that no car's record grows with the years; a base older than the last
/// `SENT_KEPT` releases is no longer offered anyway (the car keeps one version per artifact).
pub const SENT_KEPT: i64 = 32;

/// Schema changes after the first version, in order; `PRAGMA user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
    // 1: revocation, and the index the age sweep of events needs.
    r"
ALTER TABLE cars ADD COLUMN revoked_at INTEGER;
CREATE TABLE revoked_certificates (
    fingerprint TEXT PRIMARY KEY,
    car_id TEXT NOT NULL REFERENCES cars(id),
    revoked_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_time ON events(at);
",
    // 2: the releases each car was sent (its desired states), newest SENT_KEPT: what it may
    // read. What twins before it signed counts as sent.
    r"
CREATE TABLE sent_releases (
    car_id TEXT NOT NULL REFERENCES cars(id),
    release TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (car_id, release)
);
INSERT OR IGNORE INTO sent_releases (car_id, release, at)
    SELECT car_id, json_extract(document, '$.release'), 0 FROM signed_desired;
",
    // 3: fleet deployments: the operator's request, the rollout's progress (without its cars),
    // the cars it started, and its log.
    r"
CREATE TABLE deployments (
    name TEXT PRIMARY KEY,
    release TEXT NOT NULL,
    selector TEXT NOT NULL,
    geofence TEXT,
    plan TEXT NOT NULL,
    progress TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE deployment_cars (
    deployment TEXT NOT NULL REFERENCES deployments(name),
    car_id TEXT NOT NULL,
    phase INTEGER NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (deployment, car_id)
);
CREATE TABLE deployment_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    deployment TEXT NOT NULL REFERENCES deployments(name),
    at INTEGER NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX deployment_events_by_deployment ON deployment_events(deployment, id);
",
    // 4: each car's last reported position (rounded on the car), for geofences.
    r"
CREATE TABLE positions (
    car_id TEXT PRIMARY KEY REFERENCES cars(id),
    lat_e6 INTEGER NOT NULL,
    lon_e6 INTEGER NOT NULL,
    at INTEGER NOT NULL
);
",
    // 5: what several instances share (`shared.rs`): the root chain (was files in
    // data_dir/roots), the instances alive, and which car is connected to which.
    SHARED,
];

/// Step 5 of `MIGRATIONS` and step 2 of `PG_MIGRATIONS`: the same text fits both.
const SHARED: &str = r"
CREATE TABLE roots (
    version BIGINT PRIMARY KEY,
    envelope TEXT NOT NULL
);
CREATE TABLE twin_instances (
    id TEXT PRIMARY KEY,
    api TEXT NOT NULL,
    director TEXT NOT NULL,
    seen BIGINT NOT NULL
);
CREATE TABLE presence (
    car_id TEXT PRIMARY KEY,
    instance TEXT NOT NULL,
    session BIGINT NOT NULL,
    since BIGINT NOT NULL
);
CREATE INDEX presence_by_instance ON presence(instance);
";

/// The same schema for PostgreSQL, in its types: its first step is everything SQLite's `SCHEMA`
/// and `MIGRATIONS` make (they were written before PostgreSQL came); later changes are appended
/// to both lists. The applied count is kept in `schema_version`.
const PG_MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE cars (
    id TEXT PRIMARY KEY,
    attributes TEXT NOT NULL,
    fingerprint TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE TABLE revoked_certificates (
    fingerprint TEXT PRIMARY KEY,
    car_id TEXT NOT NULL REFERENCES cars(id),
    revoked_at BIGINT NOT NULL
);
CREATE TABLE releases (
    digest TEXT PRIMARY KEY,
    line TEXT NOT NULL,
    version TEXT NOT NULL,
    compatible TEXT NOT NULL,
    created BIGINT NOT NULL,
    artifacts BIGINT NOT NULL,
    envelope TEXT NOT NULL,
    UNIQUE (line, version)
);
CREATE TABLE signed_desired (
    car_id TEXT PRIMARY KEY REFERENCES cars(id),
    counter BIGINT NOT NULL,
    document TEXT NOT NULL
);
CREATE TABLE reported (
    car_id TEXT PRIMARY KEY REFERENCES cars(id),
    document TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    agent_version TEXT,
    updated_at BIGINT NOT NULL,
    last_seen BIGINT NOT NULL
);
CREATE TABLE events (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    car_id TEXT NOT NULL REFERENCES cars(id),
    at BIGINT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX events_by_car ON events(car_id, id);
CREATE INDEX events_by_time ON events(at);
CREATE TABLE sent_releases (
    car_id TEXT NOT NULL REFERENCES cars(id),
    release TEXT NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (car_id, release)
);
CREATE TABLE deployments (
    name TEXT PRIMARY KEY,
    release TEXT NOT NULL,
    selector TEXT NOT NULL,
    geofence TEXT,
    plan TEXT NOT NULL,
    progress TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE TABLE deployment_cars (
    deployment TEXT NOT NULL REFERENCES deployments(name),
    car_id TEXT NOT NULL,
    phase BIGINT NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (deployment, car_id)
);
CREATE TABLE deployment_events (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    deployment TEXT NOT NULL REFERENCES deployments(name),
    at BIGINT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX deployment_events_by_deployment ON deployment_events(deployment, id);
CREATE TABLE positions (
    car_id TEXT PRIMARY KEY REFERENCES cars(id),
    lat_e6 BIGINT NOT NULL,
    lon_e6 BIGINT NOT NULL,
    at BIGINT NOT NULL
);
",
    SHARED,
];

/// Which database the twin keeps its records in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone, Debug, Serialize)]
pub struct CarRecord {
    pub id: CarId,
    pub attributes: Attributes,
    /// The fingerprint of the car's current certificate (the revoked one while `revoked_at` is
    /// set).
    pub fingerprint: String,
    pub created_at: i64,
    /// When its certificate was revoked; `None` while it is active.
    pub revoked_at: Option<i64>,
}

fn release_summary(row: &AnyRow) -> ReleaseSummary {
    let created: i64 = row.get(4);
    let artifacts: i64 = row.get(5);
    ReleaseSummary {
        digest: row.get(0),
        line: row.get(1),
        version: row.get(2),
        compatible: row.get(3),
        created: created.unsigned_abs(),
        artifacts: usize::try_from(artifacts).unwrap_or(0),
    }
}

/// A car's signed desired state as the twin keeps it: the envelope it signed, the release it
/// names (by digest, in `releases`), and the downgrade override an operator supplied, if any.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredDesired {
    pub desired: Envelope,
    pub release: String,
    #[serde(default)]
    pub downgrade: Option<Envelope>,
    /// The signed document's fields, for display and refresh decisions.
    pub counter: u64,
    pub issued: u64,
    pub expires: u64,
    /// The counter scope it was signed in (docs/release-format.md, D4a); absent on documents
    /// from before scopes, which count in the scope in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

pub use cars::{Conflict, Registration};
pub use deployments::StoredDeployment;
pub use events::EventLimits;
pub use shared::{CHANNEL, Change, DriverLock, Instance, Presence};

/// What [`Db::report_state`] did with a reported state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredState {
    /// An equal or newer (epoch, seq) was stored already: dropped.
    Stale,
    /// Stored; the state is the one stored before.
    Same,
    /// Stored; the state changed.
    Changed,
}

#[derive(Clone, Debug)]
pub struct Db {
    pool: AnyPool,
    /// SQLite: `synchronous=FULL`, one connection (see the module docs). PostgreSQL: `pool`.
    durable: AnyPool,
    backend: Backend,
    events: EventLimits,
    /// SQLite: the file, for the last checkpoint at close.
    file: Option<PathBuf>,
    /// PostgreSQL: the URL, for the connections of the change feed and the driver's lock.
    url: Option<String>,
    /// This process's id among the instances on the database, random at each start: the
    /// change feed's messages say where they come from, so an instance skips its own.
    origin: String,
}

/// A fresh instance id: 12 hex digits.
fn new_origin() -> Result<String, Error> {
    let mut bytes = [0u8; 6];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).map_err(|_| {
        Error::Config {
            path: "(instance id)".into(),
            why: "no randomness".into(),
        }
    })?;
    Ok(cardeploy_release::hex::encode(&bytes))
}

fn corrupt(car: &str, what: &'static str) -> impl FnOnce(serde_json::Error) -> Error {
    let car = car.to_owned();
    move |source| Error::Corrupt { car, what, source }
}

/// Every SQLite connection: WAL, foreign keys, and a writer waits for the lock instead of failing;
/// `synchronous` as the pool needs (see the module docs).
const SQLITE_NORMAL: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
    PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;";
const SQLITE_FULL: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
    PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;";

async fn sqlite_pool(
    url: &str,
    connections: u32,
    pragmas: &'static str,
) -> Result<AnyPool, sqlx::Error> {
    AnyPoolOptions::new()
        .max_connections(connections)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                sqlx::Executor::execute(conn, pragmas).await?;
                Ok(())
            })
        })
        .connect(url)
        .await
}

/// A database URL without its password, for messages.
fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((credentials, host)) if credentials.contains(':') => {
            let user = credentials.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:…@{host}")
        }
        _ => url.to_owned(),
    }
}

impl Db {
    /// The embedded default: SQLite in `path`, created if missing.
    pub async fn open(path: &Path, events: EventLimits) -> Result<Self, Error> {
        sqlx::any::install_default_drivers();
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let pool = sqlite_pool(&url, 4, SQLITE_NORMAL)
            .await
            .map_err(db("open"))?;
        sqlx::raw_sql(SCHEMA)
            .execute(&pool)
            .await
            .map_err(db("create schema"))?;
        migrate_sqlite(&pool).await?;
        let durable = sqlite_pool(&url, 1, SQLITE_FULL)
            .await
            .map_err(db("open"))?;
        Ok(Self {
            pool,
            durable,
            backend: Backend::Sqlite,
            events,
            file: Some(path.to_owned()),
            url: None,
            origin: new_origin()?,
        })
    }

    /// PostgreSQL at `url` (`postgres://user:password@host:port/database`): the database must
    /// exist; the schema is created or migrated. Several twin instances may share it
    /// (`shared.rs`: the change feed, presence, the driver's election).
    pub async fn connect(url: &str, connections: u32, events: EventLimits) -> Result<Self, Error> {
        sqlx::any::install_default_drivers();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(Error::Database {
                url: redacted(url),
                why: "only postgres:// URLs are supported here (SQLite is the default, in the data directory)".into(),
            });
        }
        let pool = AnyPoolOptions::new()
            .max_connections(connections.max(2))
            .acquire_timeout(std::time::Duration::from_secs(30))
            .connect(url)
            .await
            .map_err(|e| Error::Database {
                url: redacted(url),
                why: format!("cannot connect: {e}"),
            })?;
        migrate_postgres(&pool).await.map_err(|e| match e {
            Error::Database { why, .. } => Error::Database {
                url: redacted(url),
                why,
            },
            other => other,
        })?;
        Ok(Self {
            durable: pool.clone(),
            pool,
            backend: Backend::Postgres,
            events,
            file: None,
            url: Some(url.to_owned()),
            origin: new_origin()?,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A durable transaction that holds the lock named `key` until it ends: SQLite's one write
    /// lock, or a PostgreSQL advisory lock on the key's hash (other keys go on in parallel, and
    /// so do other twin instances' transactions on them).
    async fn exclusive(&self, key: &str) -> Result<Transaction<'static, Any>, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => self.durable.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => {
                let mut tx = self.durable.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
                    .bind(key)
                    .execute(&mut *tx)
                    .await?;
                Ok(tx)
            }
        }
    }

    pub async fn desired(&self, car: &CarId) -> Result<Option<StoredDesired>, Error> {
        let row = sqlx::query("SELECT document FROM signed_desired WHERE car_id = $1")
            .bind(car.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(db("read desired state"))?;
        row.map(|row| {
            let doc: String = row.get(0);
            serde_json::from_str(&doc).map_err(corrupt(car.as_str(), "desired state"))
        })
        .transpose()
    }

    pub async fn all_desired(&self) -> Result<Vec<(CarId, StoredDesired)>, Error> {
        let rows = sqlx::query("SELECT car_id, document FROM signed_desired")
            .fetch_all(&self.pool)
            .await
            .map_err(db("read desired states"))?;
        rows.into_iter()
            .map(|row| {
                let car: String = row.get(0);
                let doc: String = row.get(1);
                let stored = serde_json::from_str(&doc).map_err(corrupt(&car, "desired state"))?;
                let id = CarId::new(car.clone()).map_err(|_| Error::Corrupt {
                    car,
                    what: "car id",
                    source: serde::de::Error::custom("invalid car id"),
                })?;
                Ok((id, stored))
            })
            .collect()
    }

    /// Store a new desired state with the next counter for this car, atomically: `make` gets the
    /// counter and returns the signed document. Durable when it returns (the durable pool), so a
    /// counter is never handed out twice, and `BEGIN IMMEDIATE` takes the write lock before the
    /// counter is read, so no other writer slips in between. The release is recorded as sent to
    /// the car (what it may read) in the same transaction.
    /// The counter is one above both the last one this twin signed for the car in `scope` (the
    /// counter scope in force; one signed in another scope does not count) and `floor`, the
    /// last one the car says it accepted in this scope: a twin whose database was restored from
    /// an older copy (or lost) signs above what the car already has instead of freezing it.
    pub async fn set_desired(
        &self,
        car: &CarId,
        scope: Option<&str>,
        floor: Option<u64>,
        make: impl FnOnce(u64) -> Result<StoredDesired, Error>,
    ) -> Result<StoredDesired, Error> {
        let mut tx = self
            .exclusive(&format!("desired {car}"))
            .await
            .map_err(db("set desired state"))?;
        let last: Option<(i64, String)> =
            sqlx::query_as("SELECT counter, document FROM signed_desired WHERE car_id = $1")
                .bind(car.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db("set desired state"))?;
        /// The one field of a stored document this needs.
        #[derive(Deserialize)]
        struct Scope {
            #[serde(default)]
            scope: Option<String>,
        }
        let last = last
            .map(|(counter, doc)| {
                serde_json::from_str::<Scope>(&doc)
                    .map(|s| (counter, s.scope))
                    .map_err(corrupt(car.as_str(), "desired state"))
            })
            .transpose()?;
        let mine = last
            .filter(|(_, signed_in)| signed_in.is_none() || signed_in.as_deref() == scope)
            .map_or(0, |(counter, _)| counter.unsigned_abs());
        let above = mine.max(floor.unwrap_or(0));
        let counter = above
            .checked_add(1)
            .filter(|c| *c <= cardeploy_release::MAX_COUNTER)
            .ok_or_else(|| Error::CounterExhausted {
                car: car.to_string(),
                counter: above,
            })?;
        let stored = make(counter)?;
        let doc = serde_json::to_string(&stored).map_err(encode("a signed desired state"))?;
        sqlx::query(
            "INSERT INTO signed_desired (car_id, counter, document) VALUES ($1, $2, $3)
             ON CONFLICT(car_id) DO UPDATE SET counter = excluded.counter, document = excluded.document",
        )
        .bind(car.as_str())
        .bind(i64::try_from(counter).unwrap_or(i64::MAX))
        .bind(doc)
        .execute(&mut *tx)
        .await
        .map_err(db("set desired state"))?;
        // The car may read the release's artifacts from the moment it can hear of it, on any
        // instance: recorded in the same transaction as the state and its announcement.
        let now = i64::try_from(cardeploy_release::now_secs()).unwrap_or(i64::MAX);
        record_sent_in(&mut tx, car, &stored.release, now).await?;
        self.announce(
            &mut tx,
            &Change::Desired {
                car: car.clone(),
                counter,
            },
        )
        .await
        .map_err(db("set desired state"))?;
        tx.commit().await.map_err(db("set desired state"))?;
        Ok(stored)
    }

    /// Register a verified release. Returns false if it was registered before (same digest).
    pub async fn insert_release(
        &self,
        release: &ReleaseSummary,
        envelope: &Envelope,
    ) -> Result<bool, Error> {
        let result = sqlx::query(
            "INSERT INTO releases (digest, line, version, compatible, created, artifacts, envelope)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT(digest) DO NOTHING",
        )
        .bind(&release.digest)
        .bind(&release.line)
        .bind(&release.version)
        .bind(&release.compatible)
        .bind(i64::try_from(release.created).unwrap_or(i64::MAX))
        .bind(i64::try_from(release.artifacts).unwrap_or(i64::MAX))
        .bind(String::from_utf8_lossy(&envelope.to_json()).into_owned())
        .execute(&self.pool)
        .await
        .map_err(db("store release"))?;
        Ok(result.rows_affected() == 1)
    }

    /// Whether another release already has this line and version.
    ///
    /// Versions are the same when SemVer says so: build metadata does not count, so
    /// `2.0.0+build9` and `2.0.0+build10` are one version (published once).
    pub async fn release_by_version(
        &self,
        line: &str,
        version: &str,
    ) -> Result<Option<String>, Error> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT digest, version FROM releases WHERE line = $1")
                .bind(line)
                .fetch_all(&self.pool)
                .await
                .map_err(db("read release"))?;
        let wanted = semver::Version::parse(version).ok();
        Ok(rows
            .into_iter()
            .find(|(_, have)| match (&wanted, semver::Version::parse(have)) {
                (Some(wanted), Ok(have)) => wanted.cmp_precedence(&have).is_eq(),
                _ => have == version,
            })
            .map(|(digest, _)| digest))
    }

    pub async fn releases(&self) -> Result<Vec<ReleaseSummary>, Error> {
        let rows = sqlx::query(
            "SELECT digest, line, version, compatible, created, artifacts FROM releases ORDER BY created, line, version",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("read releases"))?;
        Ok(rows.iter().map(release_summary).collect())
    }

    /// The chunk index (hex) of every artifact of every registered release: what the chunk
    /// store's gc must keep.
    pub async fn release_indexes(&self) -> Result<std::collections::HashSet<String>, Error> {
        let rows = sqlx::query("SELECT digest, envelope FROM releases")
            .fetch_all(&self.pool)
            .await
            .map_err(db("read releases"))?;
        let mut indexes = std::collections::HashSet::new();
        for row in rows {
            let digest: String = row.get(0);
            let text: String = row.get(1);
            let corrupt = |e: String| Error::Corrupt {
                car: format!("(release {digest})"),
                what: "release envelope",
                source: serde::de::Error::custom(e),
            };
            // Verified when it was registered; here only read.
            let envelope =
                Envelope::from_json(text.as_bytes()).map_err(|e| corrupt(e.to_string()))?;
            let release: cardeploy_release::Release =
                serde_json::from_slice(&envelope.payload).map_err(|e| corrupt(e.to_string()))?;
            indexes.extend(release.artifacts.into_iter().map(|a| a.index));
        }
        Ok(indexes)
    }

    /// A release by digest or `line@version`, with its envelope.
    pub async fn release(
        &self,
        reference: &str,
    ) -> Result<Option<(ReleaseSummary, Envelope)>, Error> {
        let query = match reference.split_once('@') {
            Some((line, version)) => sqlx::query(
                "SELECT digest, line, version, compatible, created, artifacts, envelope FROM releases WHERE line = $1 AND version = $2",
            )
            .bind(line)
            .bind(version),
            None => sqlx::query(
                "SELECT digest, line, version, compatible, created, artifacts, envelope FROM releases WHERE digest = $1",
            )
            .bind(reference),
        };
        let row = query
            .fetch_optional(&self.pool)
            .await
            .map_err(db("read release"))?;
        row.map(|row| {
            let summary = release_summary(&row);
            let text: String = row.get(6);
            let envelope = Envelope::from_json(text.as_bytes()).map_err(|e| Error::Corrupt {
                car: format!("(release {})", summary.digest),
                what: "release envelope",
                source: serde::de::Error::custom(e),
            })?;
            Ok((summary, envelope))
        })
        .transpose()
    }

    pub async fn reported(&self, car: &CarId) -> Result<Option<ReportedView>, Error> {
        let row = sqlx::query(
            "SELECT document, epoch, seq, agent_version, updated_at, last_seen FROM reported WHERE car_id = $1",
        )
        .bind(car.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(db("read reported state"))?;
        row.map(|row| {
            let doc: String = row.get(0);
            Ok(ReportedView {
                state: serde_json::from_str(&doc)
                    .map_err(corrupt(car.as_str(), "reported state"))?,
                epoch: row.get(1),
                seq: row.get(2),
                agent_version: row.get(3),
                updated_at: row.get(4),
                last_seen: row.get(5),
            })
        })
        .transpose()
    }

    /// Store a car's position (one row a car: it replaces the last).
    pub async fn set_position(
        &self,
        car: &CarId,
        position: cardeploy_protocol::Position,
        now: i64,
    ) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO positions (car_id, lat_e6, lon_e6, at) VALUES ($1, $2, $3, $4)
             ON CONFLICT(car_id) DO UPDATE SET lat_e6 = excluded.lat_e6, lon_e6 = excluded.lon_e6,
                at = excluded.at",
        )
        .bind(car.as_str())
        .bind(position.lat_e6)
        .bind(position.lon_e6)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db("store a position"))?;
        Ok(())
    }

    /// A car's last position and when it was reported.
    pub async fn position(
        &self,
        car: &str,
    ) -> Result<Option<(cardeploy_protocol::Position, i64)>, Error> {
        let row = sqlx::query("SELECT lat_e6, lon_e6, at FROM positions WHERE car_id = $1")
            .bind(car)
            .fetch_optional(&self.pool)
            .await
            .map_err(db("read a position"))?;
        Ok(row.map(|r| {
            (
                cardeploy_protocol::Position {
                    lat_e6: r.get(0),
                    lon_e6: r.get(1),
                },
                r.get(2),
            )
        }))
    }

    /// Every car's last position.
    pub async fn positions(
        &self,
    ) -> Result<std::collections::HashMap<String, cardeploy_protocol::Position>, Error> {
        let rows = sqlx::query("SELECT car_id, lat_e6, lon_e6 FROM positions")
            .fetch_all(&self.pool)
            .await
            .map_err(db("read positions"))?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    r.get(0),
                    cardeploy_protocol::Position {
                        lat_e6: r.get(1),
                        lon_e6: r.get(2),
                    },
                )
            })
            .collect())
    }

    /// Every car's reported state (what the deployments' driver reads once a round).
    pub async fn all_reported(
        &self,
    ) -> Result<std::collections::HashMap<String, ReportedState>, Error> {
        let rows = sqlx::query("SELECT car_id, document FROM reported")
            .fetch_all(&self.pool)
            .await
            .map_err(db("read reported states"))?;
        rows.into_iter()
            .map(|row| {
                let car: String = row.get(0);
                let doc: String = row.get(1);
                let state = serde_json::from_str(&doc).map_err(corrupt(&car, "reported state"))?;
                Ok((car, state))
            })
            .collect()
    }

    /// Store reported state from `car.hello` (no sequence number: it is the newest by definition,
    /// since reports travel in order on the connection that the hello opened).
    pub async fn hello(
        &self,
        car: &CarId,
        state: &ReportedState,
        agent_version: &str,
        now: i64,
    ) -> Result<(), Error> {
        let doc = serde_json::to_string(state).map_err(encode("a reported state"))?;
        sqlx::query(
            "INSERT INTO reported (car_id, document, epoch, seq, agent_version, updated_at, last_seen)
             VALUES ($1, $2, -1, -1, $3, $4, $5)
             ON CONFLICT(car_id) DO UPDATE SET document = excluded.document,
                agent_version = excluded.agent_version, updated_at = excluded.updated_at,
                last_seen = excluded.last_seen",
        )
        .bind(car.as_str())
        .bind(doc)
        .bind(agent_version)
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db("store hello"))?;
        Ok(())
    }

    /// Store a reported state unless an equal or newer (epoch, seq) is stored: fire-and-forget
    /// reports may be sent twice after a reconnect. Says whether it was stored and whether the
    /// state differs from the one before (the agent sends its last state again after a burst).
    pub async fn report_state(
        &self,
        car: &CarId,
        state: &ReportedState,
        epoch: i64,
        seq: i64,
        now: i64,
    ) -> Result<StoredState, Error> {
        let doc = serde_json::to_string(state).map_err(encode("a reported state"))?;
        // The same state serializes to the same text: compared as stored, not decoded.
        let before: Option<String> =
            sqlx::query_scalar("SELECT document FROM reported WHERE car_id = $1")
                .bind(car.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(db("read report"))?;
        let same = before.as_deref() == Some(doc.as_str());
        let result = sqlx::query(
            "INSERT INTO reported (car_id, document, epoch, seq, agent_version, updated_at, last_seen)
             VALUES ($1, $2, $3, $4, NULL, $5, $5)
             ON CONFLICT(car_id) DO UPDATE SET document = excluded.document, epoch = excluded.epoch,
                seq = excluded.seq, updated_at = excluded.updated_at, last_seen = excluded.last_seen
             WHERE (excluded.epoch, excluded.seq) > (reported.epoch, reported.seq)",
        )
        .bind(car.as_str())
        .bind(doc)
        .bind(epoch)
        .bind(seq)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db("store report"))?;
        Ok(match (result.rows_affected() == 1, same) {
            (false, _) => StoredState::Stale,
            (true, true) => StoredState::Same,
            (true, false) => StoredState::Changed,
        })
    }

    /// The newest (epoch, seq) stored from `car`'s reports, if any.
    pub async fn report_mark(&self, car: &CarId) -> Result<Option<(i64, i64)>, Error> {
        let mark: Option<(i64, i64)> =
            sqlx::query_as("SELECT epoch, seq FROM reported WHERE car_id = $1")
                .bind(car.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(db("read report mark"))?;
        Ok(mark.filter(|(epoch, seq)| *epoch >= 0 && *seq >= 0))
    }

    /// Advance the (epoch, seq) mark for an event report; false if it is a duplicate.
    pub async fn mark_seq(
        &self,
        car: &CarId,
        epoch: i64,
        seq: i64,
        now: i64,
    ) -> Result<bool, Error> {
        let result = advance_mark(car, epoch, seq, now)
            .execute(&self.pool)
            .await
            .map_err(db("store report"))?;
        Ok(result.rows_affected() == 1)
    }

    pub async fn touch(&self, car: &CarId, now: i64) -> Result<(), Error> {
        sqlx::query("UPDATE reported SET last_seen = $1 WHERE car_id = $2")
            .bind(now)
            .bind(car.as_str())
            .execute(&self.pool)
            .await
            .map_err(db("store last seen"))?;
        Ok(())
    }

    /// Remember that `car` was sent `release`, keeping the newest [`SENT_KEPT`]. The twin does
    /// it in [`Db::set_desired`]'s transaction; alone, for the tests of the bound.
    #[cfg(test)]
    pub async fn record_sent(&self, car: &CarId, release: &str, now: i64) -> Result<(), Error> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("record a sent release"))?;
        record_sent_in(&mut tx, car, release, now).await?;
        tx.commit().await.map_err(db("record a sent release"))
    }

    /// The releases `car` was sent, newest first.
    pub async fn sent_releases(&self, car: &CarId) -> Result<Vec<String>, Error> {
        sqlx::query_scalar("SELECT release FROM sent_releases WHERE car_id = $1 ORDER BY at DESC")
            .bind(car.as_str())
            .fetch_all(&self.pool)
            .await
            .map_err(db("read sent releases"))
    }

    pub async fn close(&self) {
        self.durable.close().await;
        self.pool.close().await;
        let Some(file) = &self.file else { return };
        // A pool's close returns once its connections are handed back, which can be before
        // SQLite has let go of the file (a connection dropped by a task closes on its own
        // thread). A last checkpoint through a connection of our own, awaited, leaves twin.db
        // complete by itself when the twin stops: a backup of the file alone holds everything,
        // and nothing that was only in the WAL can be lost by copying the files one by one.
        let settled = async {
            let mut conn =
                AnyConnection::connect(&format!("sqlite://{}?mode=rw", file.display())).await?;
            let (busy, _, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
                .fetch_one(&mut conn)
                .await?;
            conn.close().await?;
            Ok::<_, sqlx::Error>(busy == 0)
        };
        match settled.await {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                "the database was still in use at shutdown: its last changes stay in the WAL file beside it"
            ),
            Err(e) => tracing::warn!("last checkpoint at shutdown: {e}"),
        }
    }
}

async fn migrate_sqlite(pool: &AnyPool) -> Result<(), Error> {
    let applied: i64 = sqlx::query_scalar("PRAGMA user_version")
        .fetch_one(pool)
        .await
        .map_err(db("read schema version"))?;
    let applied = usize::try_from(applied).unwrap_or(0);
    for (version, step) in MIGRATIONS.iter().enumerate().skip(applied) {
        let mut tx = pool.begin().await.map_err(db("migrate schema"))?;
        sqlx::raw_sql(step)
            .execute(&mut *tx)
            .await
            .map_err(db("migrate schema"))?;
        // PRAGMA takes no bound parameters; the number is ours.
        sqlx::raw_sql(&format!("PRAGMA user_version = {}", version + 1))
            .execute(&mut *tx)
            .await
            .map_err(db("migrate schema"))?;
        tx.commit().await.map_err(db("migrate schema"))?;
    }
    Ok(())
}

/// Bring a PostgreSQL database to the current schema. Twin instances starting together take
/// turns (an advisory lock), so a migration runs once; each step commits with its number.
async fn migrate_postgres(pool: &AnyPool) -> Result<(), Error> {
    let mut tx = pool.begin().await.map_err(db("migrate schema"))?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('cardeploy schema', 0))")
        .execute(&mut *tx)
        .await
        .map_err(db("migrate schema"))?;
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        .execute(&mut *tx)
        .await
        .map_err(db("migrate schema"))?;
    let applied: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        .fetch_one(&mut *tx)
        .await
        .map_err(db("read schema version"))?;
    let applied = usize::try_from(applied).unwrap_or(0);
    if applied > PG_MIGRATIONS.len() {
        return Err(Error::Database {
            url: String::new(),
            why: format!(
                "its schema is version {applied}, newer than this twin's ({}): run the newer twin, or restore a backup made for this one",
                PG_MIGRATIONS.len()
            ),
        });
    }
    for (version, step) in PG_MIGRATIONS.iter().enumerate().skip(applied) {
        sqlx::raw_sql(step)
            .execute(&mut *tx)
            .await
            .map_err(db("migrate schema"))?;
        sqlx::query("INSERT INTO schema_version (version) VALUES ($1)")
            .bind(i64::try_from(version + 1).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await
            .map_err(db("migrate schema"))?;
    }
    tx.commit().await.map_err(db("migrate schema"))
}

/// Advance `car`'s report mark to (`epoch`, `seq`) if that is newer: one row changed, or none
/// for a duplicate.
fn advance_mark(
    car: &CarId,
    epoch: i64,
    seq: i64,
    now: i64,
) -> sqlx::query::Query<'_, Any, sqlx::any::AnyArguments<'_>> {
    sqlx::query(
        "UPDATE reported SET epoch = $2, seq = $3, last_seen = $4
         WHERE car_id = $1 AND ($2, $3) > (epoch, seq)",
    )
    .bind(car.as_str())
    .bind(epoch)
    .bind(seq)
    .bind(now)
}

/// [`Db::record_sent`] inside a transaction of the caller's.
async fn record_sent_in(
    tx: &mut Transaction<'static, Any>,
    car: &CarId,
    release: &str,
    now: i64,
) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO sent_releases (car_id, release, at) VALUES ($1, $2, $3)
         ON CONFLICT(car_id, release) DO UPDATE SET at = excluded.at",
    )
    .bind(car.as_str())
    .bind(release)
    .bind(now)
    .execute(&mut **tx)
    .await
    .map_err(db("record a sent release"))?;
    sqlx::query(
        "DELETE FROM sent_releases WHERE car_id = $1 AND release NOT IN (
            SELECT release FROM sent_releases WHERE car_id = $1 ORDER BY at DESC LIMIT $2)",
    )
    .bind(car.as_str())
    .bind(SENT_KEPT)
    .execute(&mut **tx)
    .await
    .map_err(db("record a sent release"))?;
    Ok(())
}

/// Fresh databases for tests, one on each backend the run has.
#[cfg(test)]
pub(crate) mod testing {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::{Backend, Db, EventLimits};

    /// One fresh database; a SQLite one lives as long as its directory.
    pub struct Fresh {
        pub db: Db,
        _dir: Option<tempfile::TempDir>,
    }

    impl Fresh {
        pub fn name(&self) -> &'static str {
            match self.db.backend() {
                Backend::Sqlite => "SQLite",
                Backend::Postgres => "PostgreSQL",
            }
        }
    }

    /// SQLite always; PostgreSQL when `CARDEPLOY_POSTGRES_URL` names a server (`cargo xtask
    /// test` starts one), in a database made for this call. Under `CI` a missing server fails;
    /// by hand the PostgreSQL half is skipped, loudly.
    pub async fn each(events: EventLimits) -> Vec<Fresh> {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = Db::open(&dir.path().join("t.db"), events).await.unwrap();
        let mut all = vec![Fresh {
            db: sqlite,
            _dir: Some(dir),
        }];
        if let Some(server) = cardeploy_testkit::postgres::server() {
            let url = cardeploy_testkit::postgres::fresh_database(&server)
                .await
                .unwrap();
            all.push(Fresh {
                db: Db::connect(&url, 4, events).await.unwrap(),
                _dir: None,
            });
        }
        all
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn a_database_url_in_a_message_has_no_password() {
        assert_eq!(
            redacted("postgres://twin:s3cret@db.example:5432/fleet"),
            "postgres://twin:…@db.example:5432/fleet"
        );
        assert_eq!(
            redacted("postgres://twin@db:5432/fleet"),
            "postgres://twin@db:5432/fleet"
        );
    }

    #[tokio::test]
    async fn one_instance_drives_until_it_stops_then_another_takes_over() {
        let Some(server) = cardeploy_testkit::postgres::server() else {
            return;
        };
        let url = cardeploy_testkit::postgres::fresh_database(&server)
            .await
            .unwrap();
        let first = Db::connect(&url, 2, EventLimits::default()).await.unwrap();
        let second = Db::connect(&url, 2, EventLimits::default()).await.unwrap();
        let (mut a, mut b) = (DriverLock::new(&first), DriverLock::new(&second));
        assert!(a.lead().await.unwrap());
        assert!(!b.lead().await.unwrap(), "two drivers at once");
        assert!(a.lead().await.unwrap(), "the driver keeps its lock");
        a.release().await;
        assert!(b.lead().await.unwrap(), "nobody took over");
        assert!(
            !a.lead().await.unwrap(),
            "the old driver came back as a second one"
        );
        first.close().await;
        second.close().await;
    }

    #[tokio::test]
    async fn counters_and_the_registry_commit_through_a_pool_that_fsyncs_every_commit() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db"), EventLimits::default())
            .await
            .unwrap();
        let synchronous = |pool: &AnyPool| {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>("PRAGMA synchronous")
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        };
        // 2 = FULL: in WAL mode the WAL is synced at every commit. 1 = NORMAL: at checkpoints.
        assert_eq!(synchronous(&db.durable).await, 2);
        assert_eq!(synchronous(&db.pool).await, 1);
        let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&db.durable)
            .await
            .unwrap();
        assert_eq!(journal, "wal");
    }

    #[tokio::test]
    async fn a_database_of_the_first_schema_is_migrated_once() {
        use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
        use std::str::FromStr;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        {
            let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
                .unwrap()
                .create_if_missing(true);
            let pool = SqlitePoolOptions::new()
                .connect_with(options)
                .await
                .unwrap();
            sqlx::raw_sql(SCHEMA).execute(&pool).await.unwrap();
            sqlx::query("INSERT INTO cars VALUES ('OLD', '{}', 'f', 1)")
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
        for _ in 0..2 {
            let db = Db::open(&path, EventLimits::default()).await.unwrap();
            let car = db.car(&CarId::new("OLD").unwrap()).await.unwrap().unwrap();
            assert_eq!(car.revoked_at, None);
            db.close().await;
        }
    }
}
