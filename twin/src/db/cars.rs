//! The car registry: which certificate speaks for which car, and which certificates are revoked.
//! Every change goes through the durable pool (see the module docs of `db`).

use cardeploy_protocol::CarId;
use sqlx::Row;

use super::{Db, corrupt};
use crate::db::CarRecord;
use crate::error::{Error, db};

/// Registrations and revocations take this lock, one at a time across all twin instances: a
/// fingerprint's owner is checked and written in one go.
const REGISTRY_LOCK: &str = "the car registry";

const CAR_COLUMNS: &str = "id, attributes, fingerprint, created_at, revoked_at";

/// A `cars` row ([`CAR_COLUMNS`]) as a record.
fn car_record(row: &sqlx::any::AnyRow) -> Result<CarRecord, Error> {
    let id: String = row.get(0);
    let attributes: String = row.get(1);
    Ok(CarRecord {
        attributes: serde_json::from_str(&attributes).map_err(corrupt(&id, "attributes"))?,
        id: CarId::new(id.clone()).map_err(|_| Error::Corrupt {
            car: id.clone(),
            what: "car id",
            source: serde::de::Error::custom("invalid car id"),
        })?,
        fingerprint: row.get(2),
        created_at: row.get(3),
        revoked_at: row.get(4),
    })
}

/// What a registration did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Registration {
    /// A car the twin did not know.
    New,
    /// A revoked car with a new certificate: its record, history and counters carry on.
    Reprovisioned,
    /// Nothing changed, for this reason.
    Refused(Conflict),
}

/// Why a registration was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Conflict {
    /// The car is registered and its certificate is active.
    Active,
    /// Another car (or this one) holds this certificate.
    CertificateInUse { car: String },
    /// This certificate was revoked: it never comes back.
    CertificateRevoked { car: String, at: i64 },
}

impl Db {
    /// Register `car`, or re-provision it if it exists and its certificate is revoked. A
    /// re-provisioned car keeps its attributes unless new ones are given.
    pub async fn register_car(&self, car: &CarRecord) -> Result<Registration, Error> {
        let attributes = serde_json::to_string(&car.attributes).unwrap_or_else(|_| "{}".into());
        let mut tx = self
            .exclusive(REGISTRY_LOCK)
            .await
            .map_err(db("register car"))?;
        let revoked = sqlx::query(
            "SELECT car_id, revoked_at FROM revoked_certificates WHERE fingerprint = $1",
        )
        .bind(&car.fingerprint)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("register car"))?;
        if let Some(row) = revoked {
            return Ok(Registration::Refused(Conflict::CertificateRevoked {
                car: row.get(0),
                at: row.get(1),
            }));
        }
        let holder: Option<String> =
            sqlx::query_scalar("SELECT id FROM cars WHERE fingerprint = $1")
                .bind(&car.fingerprint)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db("register car"))?;
        if let Some(holder) = holder {
            return Ok(Registration::Refused(Conflict::CertificateInUse {
                car: holder,
            }));
        }
        let existing: Option<Option<i64>> =
            sqlx::query_scalar("SELECT revoked_at FROM cars WHERE id = $1")
                .bind(car.id.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db("register car"))?;
        let outcome = match existing {
            Some(None) => return Ok(Registration::Refused(Conflict::Active)),
            Some(Some(_)) => {
                sqlx::query(
                    "UPDATE cars SET fingerprint = $2, revoked_at = NULL,
                        attributes = CASE WHEN $3 = '{}' THEN attributes ELSE $3 END
                     WHERE id = $1",
                )
                .bind(car.id.as_str())
                .bind(&car.fingerprint)
                .bind(attributes)
                .execute(&mut *tx)
                .await
                .map_err(db("re-provision car"))?;
                Registration::Reprovisioned
            }
            None => {
                sqlx::query(
                    "INSERT INTO cars (id, attributes, fingerprint, created_at) VALUES ($1, $2, $3, $4)",
                )
                .bind(car.id.as_str())
                .bind(attributes)
                .bind(&car.fingerprint)
                .bind(car.created_at)
                .execute(&mut *tx)
                .await
                .map_err(db("insert car"))?;
                Registration::New
            }
        };
        self.announce(&mut tx, &super::Change::Car(car.id.clone()))
            .await
            .map_err(db("register car"))?;
        tx.commit().await.map_err(db("register car"))?;
        Ok(outcome)
    }

    /// Revoke `car`'s certificate, durably, and remember its fingerprint for good. Returns the
    /// revoked fingerprint, or `None` if it was revoked already.
    pub async fn revoke_car(&self, car: &CarId, now: i64) -> Result<Option<String>, Error> {
        let mut tx = self
            .exclusive(REGISTRY_LOCK)
            .await
            .map_err(db("revoke car"))?;
        let fingerprint: Option<String> =
            sqlx::query_scalar("SELECT fingerprint FROM cars WHERE id = $1 AND revoked_at IS NULL")
                .bind(car.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db("revoke car"))?;
        let Some(fingerprint) = fingerprint else {
            return Ok(None);
        };
        sqlx::query("UPDATE cars SET revoked_at = $1 WHERE id = $2")
            .bind(now)
            .bind(car.as_str())
            .execute(&mut *tx)
            .await
            .map_err(db("revoke car"))?;
        sqlx::query(
            "INSERT INTO revoked_certificates (fingerprint, car_id, revoked_at) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING",
        )
        .bind(&fingerprint)
        .bind(car.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db("revoke car"))?;
        self.announce(&mut tx, &super::Change::Car(car.clone()))
            .await
            .map_err(db("revoke car"))?;
        tx.commit().await.map_err(db("revoke car"))?;
        Ok(Some(fingerprint))
    }

    pub async fn cars(&self) -> Result<Vec<CarRecord>, Error> {
        let rows = sqlx::query(&format!("SELECT {CAR_COLUMNS} FROM cars ORDER BY id"))
            .fetch_all(&self.pool)
            .await
            .map_err(db("list cars"))?;
        rows.iter().map(car_record).collect()
    }

    /// One car by id, without reading the others.
    pub async fn car(&self, car: &CarId) -> Result<Option<CarRecord>, Error> {
        let row = sqlx::query(&format!("SELECT {CAR_COLUMNS} FROM cars WHERE id = $1"))
            .bind(car.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(db("read car"))?;
        row.as_ref().map(car_record).transpose()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::db::EventLimits;

    fn record(id: &str, fingerprint: &str) -> CarRecord {
        CarRecord {
            id: CarId::new(id).unwrap(),
            attributes: Default::default(),
            fingerprint: fingerprint.into(),
            created_at: 1,
            revoked_at: None,
        }
    }

    #[tokio::test]
    async fn a_revoked_certificate_never_comes_back_and_the_car_takes_a_new_one() {
        for fresh in crate::db::testing::each(EventLimits::default()).await {
            let db = &fresh.db;
            assert_eq!(
                db.register_car(&record("A", "f1")).await.unwrap(),
                Registration::New
            );
            assert_eq!(
                db.register_car(&record("A", "f2")).await.unwrap(),
                Registration::Refused(Conflict::Active)
            );
            assert_eq!(
                db.register_car(&record("B", "f1")).await.unwrap(),
                Registration::Refused(Conflict::CertificateInUse { car: "A".into() })
            );
            let car = CarId::new("A").unwrap();
            assert_eq!(db.revoke_car(&car, 5).await.unwrap(), Some("f1".into()));
            assert_eq!(db.revoke_car(&car, 6).await.unwrap(), None, "revoked once");
            assert_eq!(db.car(&car).await.unwrap().unwrap().revoked_at, Some(5));
            assert_eq!(
                db.register_car(&record("B", "f1")).await.unwrap(),
                Registration::Refused(Conflict::CertificateRevoked {
                    car: "A".into(),
                    at: 5
                })
            );
            assert_eq!(
                db.register_car(&record("A", "f2")).await.unwrap(),
                Registration::Reprovisioned
            );
            let again = db.car(&car).await.unwrap().unwrap();
            assert_eq!((again.fingerprint.as_str(), again.revoked_at), ("f2", None));
            assert_eq!(again.created_at, 1, "the record carries on");
        }
    }
}
