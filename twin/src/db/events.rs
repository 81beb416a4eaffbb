//! Each car's event log. Cars write most of it (`car.report` events are free text), so nothing
//! in it may grow without bound: every event is cut to a size limit, a car keeps at most a
//! number of events (enforced on insert, oldest first), and events past an age are swept.

use std::borrow::Cow;

use cardeploy_protocol::CarId;
use cardeploy_protocol::api::EventView;
use sqlx::Row;

use super::Db;
use crate::error::{Error, db};

/// How much of the event log is kept.
#[derive(Clone, Copy, Debug)]
pub struct EventLimits {
    /// Bytes of one message, the marker of a cut included.
    pub message_bytes: usize,
    /// Characters of one kind.
    pub kind_chars: usize,
    /// Events per car.
    pub per_car: u32,
}

impl Default for EventLimits {
    fn default() -> Self {
        Self {
            message_bytes: 4096,
            kind_chars: 64,
            per_car: 1000,
        }
    }
}

/// Rows deleted per statement by the age sweep, so that it never holds the write lock for long.
const SWEEP_BATCH: i64 = 5000;

/// `text` in at most `max` bytes. A cut one ends on a character boundary, followed by a marker
/// that says it was cut and how long it was, so a reader never mistakes it for the whole.
pub(crate) fn truncate_bytes(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let marker = format!("… [cut, {} bytes in all]", text.len());
    let mut end = max.saturating_sub(marker.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}{marker}", &text[..end]))
}

/// `text` in at most `max` characters, the last one `…` when it was cut.
pub(crate) fn truncate_chars(text: &str, max: usize) -> Cow<'_, str> {
    match text.char_indices().nth(max) {
        None => Cow::Borrowed(text),
        Some(_) => {
            let kept: String = text.chars().take(max.saturating_sub(1)).collect();
            Cow::Owned(format!("{kept}…"))
        }
    }
}

impl Db {
    /// Append an event to `car`'s log, cut to the limits, and drop the car's oldest events
    /// beyond the count limit in the same transaction (one indexed range delete: cheap).
    pub async fn event(
        &self,
        car: &CarId,
        now: i64,
        kind: &str,
        message: &str,
    ) -> Result<(), Error> {
        let mut tx = self.pool.begin().await.map_err(db("store event"))?;
        self.event_in(&mut tx, car, now, kind, message).await?;
        tx.commit().await.map_err(db("store event"))?;
        Ok(())
    }

    /// A reported event: stored with the car's report mark advanced to (`epoch`, `seq`), both or
    /// neither (an instance that dies in between loses neither, and the car's resend after the
    /// mark it is told at its next hello brings it). False when it is a duplicate.
    pub async fn report_event(
        &self,
        car: &CarId,
        (epoch, seq): (i64, i64),
        now: i64,
        kind: &str,
        message: &str,
    ) -> Result<bool, Error> {
        let mut tx = self.pool.begin().await.map_err(db("store event"))?;
        let marked = super::advance_mark(car, epoch, seq, now)
            .execute(&mut *tx)
            .await
            .map_err(db("store report"))?;
        if marked.rows_affected() != 1 {
            return Ok(false);
        }
        self.event_in(&mut tx, car, now, kind, message).await?;
        tx.commit().await.map_err(db("store event"))?;
        Ok(true)
    }

    async fn event_in(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        car: &CarId,
        now: i64,
        kind: &str,
        message: &str,
    ) -> Result<(), Error> {
        let kind = truncate_chars(kind, self.events.kind_chars);
        let message = truncate_bytes(message, self.events.message_bytes);
        sqlx::query("INSERT INTO events (car_id, at, kind, message) VALUES ($1, $2, $3, $4)")
            .bind(car.as_str())
            .bind(now)
            .bind(kind.as_ref())
            .bind(message.as_ref())
            .execute(&mut **tx)
            .await
            .map_err(db("store event"))?;
        sqlx::query(
            "DELETE FROM events WHERE car_id = $1 AND id <= (
                SELECT id FROM events WHERE car_id = $1 ORDER BY id DESC LIMIT 1 OFFSET $2
             )",
        )
        .bind(car.as_str())
        .bind(i64::from(self.events.per_car))
        .execute(&mut **tx)
        .await
        .map_err(db("drop old events"))?;
        Ok(())
    }

    /// The newest `limit` events older than event `before` (all if `None`), oldest first, and
    /// the `before` of the next (older) page if there is one.
    pub async fn events_page(
        &self,
        car: &CarId,
        limit: u32,
        before: Option<i64>,
    ) -> Result<(Vec<EventView>, Option<i64>), Error> {
        let rows = sqlx::query(
            "SELECT id, at, kind, message FROM events WHERE car_id = $1 AND id < $2
             ORDER BY id DESC LIMIT $3",
        )
        .bind(car.as_str())
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await
        .map_err(db("read events"))?;
        let mut events: Vec<EventView> = rows
            .into_iter()
            .map(|row| EventView {
                id: row.get(0),
                at: row.get(1),
                kind: row.get(2),
                message: row.get(3),
            })
            .collect();
        let more = events.len() > limit as usize;
        events.truncate(limit as usize);
        let next = if more {
            events.last().map(|e| e.id)
        } else {
            None
        };
        events.reverse();
        Ok((events, next))
    }

    /// Remove every event older than `cutoff` (Unix seconds), in batches. Returns how many.
    pub async fn sweep_events(&self, cutoff: i64) -> Result<u64, Error> {
        let mut removed = 0;
        loop {
            let result = sqlx::query(
                "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE at < $1 LIMIT $2)",
            )
            .bind(cutoff)
            .bind(SWEEP_BATCH)
            .execute(&self.pool)
            .await
            .map_err(db("sweep events"))?;
            removed += result.rows_affected();
            if result.rows_affected() < SWEEP_BATCH.unsigned_abs() {
                return Ok(removed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn a_long_message_is_cut_on_a_character_boundary_with_a_marker_within_the_limit() {
        assert_eq!(truncate_bytes("short", 64), "short");
        let text = "é".repeat(100); // 200 bytes
        let cut = truncate_bytes(&text, 64);
        assert!(cut.len() <= 64, "{} bytes", cut.len());
        assert!(cut.ends_with("… [cut, 200 bytes in all]"), "{cut}");
        assert!(cut.starts_with("éé"), "{cut}");
        let exact = "a".repeat(64);
        assert_eq!(truncate_bytes(&exact, 64), exact.as_str());
    }

    #[test]
    fn a_long_kind_is_cut_to_its_characters_with_an_ellipsis() {
        assert_eq!(truncate_chars("refused", 64), "refused");
        let long = "ü".repeat(70);
        let cut = truncate_chars(&long, 64);
        assert_eq!(cut.chars().count(), 64);
        assert!(cut.ends_with("ü…"));
        assert_eq!(truncate_chars(&"k".repeat(64), 64).chars().count(), 64);
    }

    async fn db(per_car: u32) -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let limits = EventLimits {
            per_car,
            ..EventLimits::default()
        };
        let db = Db::open(&dir.path().join("t.db"), limits).await.unwrap();
        // Events belong to a registered car.
        let car = crate::db::CarRecord {
            id: CarId::new("A").unwrap(),
            attributes: Default::default(),
            fingerprint: "f".into(),
            created_at: 0,
            revoked_at: None,
        };
        db.register_car(&car).await.unwrap();
        (dir, db)
    }

    #[tokio::test]
    async fn a_car_keeps_its_newest_events_up_to_the_count_limit() {
        let (_dir, db) = db(3).await;
        let car = CarId::new("A").unwrap();
        for i in 0..5 {
            db.event(&car, i, "k", &format!("m{i}")).await.unwrap();
        }
        let (events, next) = db.events_page(&car, 10, None).await.unwrap();
        let messages: Vec<_> = events.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(messages, ["m2", "m3", "m4"]);
        assert_eq!(next, None);
    }

    #[tokio::test]
    async fn pages_go_back_in_time_until_there_is_no_older_event() {
        let (_dir, db) = db(100).await;
        let car = CarId::new("A").unwrap();
        for i in 0..5 {
            db.event(&car, i, "k", &format!("m{i}")).await.unwrap();
        }
        let (newest, next) = db.events_page(&car, 2, None).await.unwrap();
        assert_eq!(
            newest.iter().map(|e| &e.message[..]).collect::<Vec<_>>(),
            ["m3", "m4"]
        );
        assert_eq!(next, Some(newest[0].id));
        let (middle, next) = db.events_page(&car, 2, next).await.unwrap();
        assert_eq!(
            middle.iter().map(|e| &e.message[..]).collect::<Vec<_>>(),
            ["m1", "m2"]
        );
        let (oldest, next) = db.events_page(&car, 2, next).await.unwrap();
        assert_eq!(
            oldest.iter().map(|e| &e.message[..]).collect::<Vec<_>>(),
            ["m0"]
        );
        assert_eq!(next, None);
    }

    #[tokio::test]
    async fn the_sweep_removes_exactly_the_events_older_than_the_cutoff() {
        let (_dir, db) = db(100).await;
        let car = CarId::new("A").unwrap();
        for at in [10, 20, 30, 40] {
            db.event(&car, at, "k", "m").await.unwrap();
        }
        assert_eq!(db.sweep_events(30).await.unwrap(), 2);
        let (events, _) = db.events_page(&car, 10, None).await.unwrap();
        assert_eq!(events.iter().map(|e| e.at).collect::<Vec<_>>(), [30, 40]);
    }
}
