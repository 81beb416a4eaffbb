//! Fleet deployments' records: the request (release, selector, geofence, plan), the progress of
//! the rollout without its cars (small, rewritten as it moves), the cars it started (one row
//! each, written with the progress that started them, in one durable transaction: a twin
//! restarted mid-rollout continues exactly where it was), and a bounded log.

use std::collections::BTreeMap;

use serde_json::Value;
use sqlx::Row;

use super::Db;
use crate::error::{Error, db, encode};
use crate::fleet::rollout::{Plan, Progress, Started};

/// Lines of a deployment's log kept (the oldest go).
pub const EVENTS_KEPT: i64 = 500;

/// A deployment as stored.
#[derive(Clone, Debug)]
pub struct StoredDeployment {
    pub name: String,
    /// The release's digest.
    pub release: String,
    pub selector: String,
    pub geofence: Option<Value>,
    pub plan: Plan,
    pub progress: Progress,
    pub created_at: i64,
    pub updated_at: i64,
}

fn corrupt(name: &str, what: &'static str) -> impl FnOnce(serde_json::Error) -> Error {
    let car = format!("deployment {name}");
    move |source| Error::Corrupt { car, what, source }
}

impl Db {
    /// Store a new deployment; false when the name is taken.
    pub async fn insert_deployment(&self, d: &StoredDeployment) -> Result<bool, Error> {
        let plan = serde_json::to_string(&d.plan).map_err(encode("a deployment plan"))?;
        let progress =
            serde_json::to_string(&d.progress).map_err(encode("a deployment's progress"))?;
        let geofence = d.geofence.as_ref().map(Value::to_string);
        let done = sqlx::query(
            "INSERT INTO deployments (name, release, selector, geofence, plan, progress, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
        )
        .bind(&d.name)
        .bind(&d.release)
        .bind(&d.selector)
        .bind(geofence)
        .bind(plan)
        .bind(progress)
        .bind(d.created_at)
        .bind(d.updated_at)
        .execute(&self.durable)
        .await
        .map_err(db("store a deployment"))?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn deployment_count(&self) -> Result<i64, Error> {
        sqlx::query("SELECT COUNT(*) FROM deployments")
            .fetch_one(&self.pool)
            .await
            .map(|r| r.get(0))
            .map_err(db("count deployments"))
    }

    /// Every deployment with its progress (its started cars included), oldest first.
    pub async fn deployments(&self) -> Result<Vec<StoredDeployment>, Error> {
        let rows = sqlx::query(
            "SELECT name, release, selector, geofence, plan, progress, created_at, updated_at
             FROM deployments ORDER BY created_at, name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("read deployments"))?;
        let mut started: BTreeMap<String, BTreeMap<String, Started>> = BTreeMap::new();
        for row in sqlx::query("SELECT deployment, car_id, phase, at FROM deployment_cars")
            .fetch_all(&self.pool)
            .await
            .map_err(db("read deployments' cars"))?
        {
            let phase: i64 = row.get(2);
            let at: i64 = row.get(3);
            started.entry(row.get(0)).or_default().insert(
                row.get(1),
                Started {
                    phase: usize::try_from(phase).unwrap_or(0),
                    at: at.unsigned_abs(),
                },
            );
        }
        rows.into_iter()
            .map(|row| {
                let name: String = row.get(0);
                let geofence: Option<String> = row.get(3);
                let plan: String = row.get(4);
                let progress: String = row.get(5);
                let mut progress: Progress =
                    serde_json::from_str(&progress).map_err(corrupt(&name, "progress"))?;
                progress.started = started.remove(&name).unwrap_or_default();
                Ok(StoredDeployment {
                    release: row.get(1),
                    selector: row.get(2),
                    geofence: geofence
                        .map(|g: String| serde_json::from_str(&g))
                        .transpose()
                        .map_err(corrupt(&name, "geofence"))?,
                    plan: serde_json::from_str(&plan).map_err(corrupt(&name, "plan"))?,
                    progress,
                    created_at: row.get(6),
                    updated_at: row.get(7),
                    name,
                })
            })
            .collect()
    }

    /// Persist a step of a deployment: its progress, the cars it started now, and what happened,
    /// in one durable transaction (before any of those cars is sent its desired state).
    pub async fn save_progress(
        &self,
        name: &str,
        progress: &Progress,
        started: &[String],
        event: Option<&str>,
        now: i64,
    ) -> Result<(), Error> {
        let doc = serde_json::to_string(progress).map_err(encode("a deployment's progress"))?;
        let mut tx = self
            .durable
            .begin()
            .await
            .map_err(db("save a deployment"))?;
        sqlx::query("UPDATE deployments SET progress = $1, updated_at = $2 WHERE name = $3")
            .bind(doc)
            .bind(now)
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(db("save a deployment"))?;
        for car in started {
            let at = progress
                .started
                .get(car)
                .map_or(now.unsigned_abs(), |s| s.at);
            let phase = progress.started.get(car).map_or(0, |s| s.phase);
            sqlx::query(
                "INSERT INTO deployment_cars (deployment, car_id, phase, at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT DO NOTHING",
            )
            .bind(name)
            .bind(car)
            .bind(i64::try_from(phase).unwrap_or(i64::MAX))
            .bind(i64::try_from(at).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await
            .map_err(db("save a deployment's cars"))?;
        }
        if let Some(message) = event {
            sqlx::query(
                "INSERT INTO deployment_events (deployment, at, message) VALUES ($1, $2, $3)",
            )
            .bind(name)
            .bind(now)
            .bind(message)
            .execute(&mut *tx)
            .await
            .map_err(db("log a deployment event"))?;
            sqlx::query(
                "DELETE FROM deployment_events WHERE deployment = $1 AND id <=
                 (SELECT id FROM deployment_events WHERE deployment = $1 ORDER BY id DESC LIMIT 1 OFFSET $2)",
            )
            .bind(name)
            .bind(EVENTS_KEPT)
            .execute(&mut *tx)
            .await
            .map_err(db("bound a deployment's log"))?;
        }
        self.announce(&mut tx, &super::Change::Deployments)
            .await
            .map_err(db("save a deployment"))?;
        tx.commit().await.map_err(db("save a deployment"))?;
        Ok(())
    }

    /// A deployment's log, newest last (at most `limit` lines).
    pub async fn deployment_events(
        &self,
        name: &str,
        limit: i64,
    ) -> Result<Vec<(i64, String)>, Error> {
        let rows = sqlx::query(
            "SELECT at, message FROM (SELECT id, at, message FROM deployment_events WHERE deployment = $1
             ORDER BY id DESC LIMIT $2) AS newest ORDER BY id",
        )
        .bind(name)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db("read a deployment's log"))?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }
}
