//! Every query of the twin's database, on each backend the run has (SQLite always, PostgreSQL
//! under `cargo xtask test`): the same calls, the same answers. What a query does is tested
//! here once; the twin's own tests use it through the server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use cardeploy_protocol::api::ReleaseSummary;
use cardeploy_protocol::{CarId, Envelope, Position, ReportedState};
use serde_json::json;

use super::testing::each;
use super::{CarRecord, EventLimits, StoredDesired, StoredState};
use crate::fleet::rollout::{Plan, Progress, Started, State};

fn car(id: &str, fingerprint: &str) -> CarRecord {
    CarRecord {
        id: CarId::new(id).unwrap(),
        attributes: serde_json::from_value(json!({"model": "m1"})).unwrap(),
        fingerprint: fingerprint.into(),
        created_at: 7,
        revoked_at: None,
    }
}

fn state(phase: &str, release: Option<&str>) -> ReportedState {
    serde_json::from_value(json!({
        "phase": phase, "desired_counter": null, "release": release, "last_error": null
    }))
    .unwrap()
}

/// An envelope of a release with one artifact whose chunk index is `index` (unsigned: the
/// database stores what the twin verified before; it does not verify).
fn release(line: &str, version: &str, index: &str) -> (ReleaseSummary, Envelope) {
    let payload = json!({
        "line": line, "version": version, "compatible": "acme,ecu-1", "created": 100,
        "artifacts": [{"kind": "rauc-bundle", "name": "a", "digest": "d".repeat(64), "size": 1,
                       "index": index}],
    });
    let envelope = Envelope {
        payload_type: "application/vnd.cardeploy.release+json".into(),
        payload: serde_json::to_vec(&payload).unwrap(),
        signatures: Vec::new(),
    };
    let summary = ReleaseSummary {
        digest: format!("{line}-{version}-digest"),
        line: line.into(),
        version: version.into(),
        compatible: "acme,ecu-1".into(),
        created: 100,
        artifacts: 1,
    };
    (summary, envelope)
}

fn desired(release: &str, counter: u64, scope: Option<&str>) -> StoredDesired {
    StoredDesired {
        desired: Envelope {
            payload_type: "application/vnd.cardeploy.desired+json".into(),
            payload: format!("counter {counter}").into_bytes(),
            signatures: Vec::new(),
        },
        release: release.into(),
        downgrade: None,
        counter,
        issued: 1,
        expires: 2,
        scope: scope.map(str::to_owned),
    }
}

#[tokio::test]
async fn cars_register_revoke_and_list_alike() {
    for fresh in each(EventLimits::default()).await {
        let (db, on) = (&fresh.db, fresh.name());
        db.register_car(&car("B", "fb")).await.unwrap();
        db.register_car(&car("A", "fa")).await.unwrap();
        let ids: Vec<String> = db
            .cars()
            .await
            .unwrap()
            .iter()
            .map(|c| c.id.to_string())
            .collect();
        assert_eq!(ids, ["A", "B"], "{on}");
        let a = db.car(&CarId::new("A").unwrap()).await.unwrap().unwrap();
        assert_eq!((a.fingerprint.as_str(), a.created_at), ("fa", 7), "{on}");
        assert_eq!(a.attributes, car("A", "fa").attributes, "{on}");
        assert!(
            db.car(&CarId::new("Z").unwrap()).await.unwrap().is_none(),
            "{on}"
        );
        assert_eq!(
            db.revoke_car(&a.id, 9).await.unwrap(),
            Some("fa".into()),
            "{on}"
        );
    }
}

#[tokio::test]
async fn desired_states_count_up_per_car_and_scope() {
    for fresh in each(EventLimits::default()).await {
        let (db, on) = (&fresh.db, fresh.name());
        db.register_car(&car("A", "fa")).await.unwrap();
        let a = CarId::new("A").unwrap();
        assert!(db.desired(&a).await.unwrap().is_none(), "{on}");
        let first = db
            .set_desired(&a, Some("s1"), None, |n| Ok(desired("r1", n, Some("s1"))))
            .await
            .unwrap();
        assert_eq!(first.counter, 1, "{on}");
        // The car says it accepted 41 in this scope: the next is above that.
        let second = db
            .set_desired(&a, Some("s1"), Some(41), |n| {
                Ok(desired("r2", n, Some("s1")))
            })
            .await
            .unwrap();
        assert_eq!(second.counter, 42, "{on}");
        // A new scope starts afresh.
        let third = db
            .set_desired(&a, Some("s2"), None, |n| Ok(desired("r3", n, Some("s2"))))
            .await
            .unwrap();
        assert_eq!(third.counter, 1, "{on}");
        let stored = db.desired(&a).await.unwrap().unwrap();
        assert_eq!((stored.release.as_str(), stored.counter), ("r3", 1), "{on}");
        let all = db.all_desired().await.unwrap();
        assert_eq!(all.len(), 1, "{on}");
        assert_eq!(all[0].0, a, "{on}");
    }
}

#[tokio::test]
async fn concurrent_desired_states_for_one_car_never_share_a_counter() {
    for fresh in each(EventLimits::default()).await {
        let (db, on) = (&fresh.db, fresh.name());
        db.register_car(&car("A", "fa")).await.unwrap();
        let a = CarId::new("A").unwrap();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (db, a) = (db.clone(), a.clone());
            tasks.push(tokio::spawn(async move {
                db.set_desired(&a, None, None, |n| Ok(desired("r", n, None)))
                    .await
                    .unwrap()
                    .counter
            }));
        }
        let mut counters = Vec::new();
        for t in tasks {
            counters.push(t.await.unwrap());
        }
        counters.sort_unstable();
        assert_eq!(counters, (1..=8).collect::<Vec<u64>>(), "{on}");
    }
}

#[tokio::test]
async fn releases_are_stored_once_and_found_by_digest_label_and_version() {
    for fresh in each(EventLimits::default()).await {
        let (db, on) = (&fresh.db, fresh.name());
        let (r1, e1) = release("os", "1.0.0+b1", &"1".repeat(64));
        let (r2, e2) = release("os", "2.0.0", &"2".repeat(64));
        assert!(db.insert_release(&r1, &e1).await.unwrap(), "{on}");
        assert!(!db.insert_release(&r1, &e1).await.unwrap(), "{on}: twice");
        assert!(db.insert_release(&r2, &e2).await.unwrap(), "{on}");
        assert_eq!(
            db.release_by_version("os", "1.0.0+b9").await.unwrap(),
            Some(r1.digest.clone()),
            "{on}: build metadata does not count"
        );
        assert_eq!(db.release_by_version("os", "3.0.0").await.unwrap(), None);
        let all = db.releases().await.unwrap();
        assert_eq!(all.len(), 2, "{on}");
        assert_eq!(all[0].artifacts, 1, "{on}");
        let (by_digest, envelope) = db.release(&r2.digest).await.unwrap().unwrap();
        assert_eq!(by_digest.version, "2.0.0", "{on}");
        assert_eq!(envelope.payload, e2.payload, "{on}");
        assert_eq!(
            db.release("os@1.0.0+b1").await.unwrap().unwrap().0.digest,
            r1.digest,
            "{on}"
        );
        assert!(db.release("os@9.9.9").await.unwrap().is_none(), "{on}");
        let indexes = db.release_indexes().await.unwrap();
        assert!(
            indexes.contains(&"1".repeat(64)) && indexes.contains(&"2".repeat(64)),
            "{on}"
        );
    }
}

#[tokio::test]
async fn reports_are_kept_in_order_and_duplicates_dropped() {
    for fresh in each(EventLimits::default()).await {
        let (db, on) = (&fresh.db, fresh.name());
        db.register_car(&car("A", "fa")).await.unwrap();
        let a = CarId::new("A").unwrap();
        db.hello(&a, &state("idle", None), "0.1.0", 10)
            .await
            .unwrap();
        let seen = db.reported(&a).await.unwrap().unwrap();
        assert_eq!(
            (seen.epoch, seen.seq, seen.agent_version.as_deref()),
            (-1, -1, Some("0.1.0")),
            "{on}"
        );
        let fetching = state("fetching", Some("os@1.0.0"));
        assert_eq!(
            db.report_state(&a, &fetching, 1, 1, 11).await.unwrap(),
            StoredState::Changed,
            "{on}"
        );
        assert_eq!(
            db.report_state(&a, &fetching, 1, 2, 12).await.unwrap(),
            StoredState::Same,
            "{on}"
        );
        assert_eq!(
            db.report_state(&a, &state("idle", None), 1, 2, 13)
                .await
                .unwrap(),
            StoredState::Stale,
            "{on}: same (epoch, seq)"
        );
        assert_eq!(
            db.report_state(&a, &state("idle", None), 0, 99, 13)
                .await
                .unwrap(),
            StoredState::Stale,
            "{on}: an older epoch"
        );
        assert!(db.mark_seq(&a, 2, 1, 14).await.unwrap(), "{on}");
        assert!(!db.mark_seq(&a, 2, 1, 15).await.unwrap(), "{on}: duplicate");
        db.touch(&a, 20).await.unwrap();
        let seen = db.reported(&a).await.unwrap().unwrap();
        assert_eq!((seen.epoch, seen.seq, seen.last_seen), (2, 1, 20), "{on}");
        assert_eq!(seen.state, fetching, "{on}");
        let all = db.all_reported().await.unwrap();
        assert_eq!(all.get("A"), Some(&fetching), "{on}");
    }
}

#[tokio::test]
async fn positions_and_sent_releases_keep_the_newest() {
    for fresh in each(EventLimits::default()).await {
        let (db, on) = (&fresh.db, fresh.name());
        db.register_car(&car("A", "fa")).await.unwrap();
        let a = CarId::new("A").unwrap();
        assert!(db.position("A").await.unwrap().is_none(), "{on}");
        let here = Position {
            lat_e6: 48_137_000,
            lon_e6: -11_575_000,
        };
        db.set_position(&a, here, 5).await.unwrap();
        let there = Position {
            lat_e6: -33_868_000,
            lon_e6: 151_209_000,
        };
        db.set_position(&a, there, 6).await.unwrap();
        assert_eq!(db.position("A").await.unwrap(), Some((there, 6)), "{on}");
        assert_eq!(db.positions().await.unwrap().get("A"), Some(&there), "{on}");
        for i in 0..(super::SENT_KEPT + 3) {
            db.record_sent(&a, &format!("r{i}"), i).await.unwrap();
        }
        db.record_sent(&a, "r5", 1000).await.unwrap();
        let sent = db.sent_releases(&a).await.unwrap();
        assert_eq!(
            sent.len(),
            usize::try_from(super::SENT_KEPT).unwrap(),
            "{on}"
        );
        assert_eq!(sent[0], "r5", "{on}: sent again, now the newest");
        assert!(!sent.contains(&"r0".to_owned()), "{on}: the oldest went");
    }
}

#[tokio::test]
async fn deployments_keep_their_progress_cars_and_bounded_log() {
    for fresh in each(EventLimits::default()).await {
        let (db, on) = (&fresh.db, fresh.name());
        let stored = super::StoredDeployment {
            name: "d1".into(),
            release: "os@2.0.0".into(),
            selector: "model=m1".into(),
            geofence: Some(json!({"type": "circle"})),
            plan: Plan {
                phases: Vec::new(),
                max_starts_per_minute: Some(30),
                failure_threshold: 0.1,
                success_threshold: 0.9,
                expires_at: 1000,
            },
            progress: Progress::default(),
            created_at: 1,
            updated_at: 1,
        };
        assert!(db.insert_deployment(&stored).await.unwrap(), "{on}");
        assert!(
            !db.insert_deployment(&stored).await.unwrap(),
            "{on}: a name is taken once"
        );
        assert_eq!(db.deployment_count().await.unwrap(), 1, "{on}");
        let mut progress = Progress {
            state: State::Halted {
                reason: "too many failed".into(),
            },
            phase: 1,
            ..Progress::default()
        };
        progress
            .started
            .insert("A".into(), Started { phase: 0, at: 5 });
        progress
            .started
            .insert("B".into(), Started { phase: 1, at: 6 });
        let total = super::deployments::EVENTS_KEPT + 2;
        for i in 0..total {
            db.save_progress(
                "d1",
                &progress,
                &["A".to_owned(), "B".to_owned()],
                Some(&format!("event {i}")),
                10 + i,
            )
            .await
            .unwrap();
        }
        let all = db.deployments().await.unwrap();
        assert_eq!(all.len(), 1, "{on}");
        let d = &all[0];
        assert_eq!(d.progress, progress, "{on}");
        assert_eq!(d.progress.started.len(), 2, "{on}");
        assert_eq!(d.geofence, stored.geofence, "{on}");
        assert_eq!(d.plan, stored.plan, "{on}");
        assert_eq!(d.updated_at, 10 + total - 1, "{on}");
        let log = db.deployment_events("d1", 3).await.unwrap();
        let messages: Vec<&str> = log.iter().map(|(_, m)| m.as_str()).collect();
        let last = |k: i64| format!("event {}", total - k);
        assert_eq!(messages, [last(3), last(2), last(1)], "{on}: oldest first");
        let kept = db.deployment_events("d1", 10_000).await.unwrap();
        assert_eq!(
            i64::try_from(kept.len()).unwrap(),
            super::deployments::EVENTS_KEPT,
            "{on}"
        );
    }
}

#[tokio::test]
async fn events_are_bounded_per_car_paged_and_swept_by_age() {
    let limits = EventLimits {
        per_car: 5,
        ..EventLimits::default()
    };
    for fresh in each(limits).await {
        let (db, on) = (&fresh.db, fresh.name());
        db.register_car(&car("A", "fa")).await.unwrap();
        let a = CarId::new("A").unwrap();
        for i in 0..8 {
            db.event(&a, 100 + i, "k", &format!("m{i}")).await.unwrap();
        }
        let (page, next) = db.events_page(&a, 2, None).await.unwrap();
        let messages: Vec<&str> = page.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(messages, ["m6", "m7"], "{on}");
        let (older, _) = db.events_page(&a, 10, next).await.unwrap();
        let messages: Vec<&str> = older.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(messages, ["m3", "m4", "m5"], "{on}: five kept in all");
        assert_eq!(db.sweep_events(105).await.unwrap(), 2, "{on}");
        let (left, _) = db.events_page(&a, 10, None).await.unwrap();
        assert_eq!(left.len(), 3, "{on}");
    }
}

#[tokio::test]
async fn the_root_chain_is_stored_once_per_version() {
    for fresh in each(EventLimits::default()).await {
        let db = &fresh.db;
        assert!(db.roots().await.unwrap().is_empty(), "{}", fresh.name());
        assert!(db.insert_root(1, "{\"v\":1}").await.unwrap());
        assert!(db.insert_root(2, "{\"v\":2}").await.unwrap());
        assert!(
            !db.insert_root(2, "{\"other\":2}").await.unwrap(),
            "{}: a version taken twice",
            fresh.name()
        );
        assert_eq!(
            db.roots().await.unwrap(),
            [(1, "{\"v\":1}".to_owned()), (2, "{\"v\":2}".to_owned())],
            "{}",
            fresh.name()
        );
    }
}

#[tokio::test]
async fn presence_follows_the_newest_connection_and_dies_with_its_instance() {
    use super::Instance;
    for fresh in each(EventLimits::default()).await {
        let db = &fresh.db;
        let name = fresh.name();
        let (a, b) = (CarId::new("P-A").unwrap(), CarId::new("P-B").unwrap());
        let instance = |id: &str| Instance {
            id: id.into(),
            api: format!("127.0.0.1:{}", id.len()),
            director: "k1".into(),
        };
        db.instance_alive(&instance("one"), 100).await.unwrap();
        db.instance_alive(&instance("two"), 100).await.unwrap();
        db.present(&a, "one", 1, 100).await.unwrap();
        db.present(&b, "one", 2, 100).await.unwrap();
        // Car A came back on instance two before instance one saw its old connection end.
        db.present(&a, "two", 9, 101).await.unwrap();
        db.absent(&a, "one", 1).await.unwrap();
        let online = db.online(90).await.unwrap();
        assert!(
            online.contains("P-A") && online.contains("P-B"),
            "{name}: {online:?}"
        );
        let there = db.presence(&a, 90).await.unwrap().unwrap();
        assert_eq!(there.instance, "two", "{name}");
        assert_eq!(db.instances(90).await.unwrap().len(), 2, "{name}");
        // Instance one stops being heard: its cars count offline, then it is forgotten.
        db.instance_alive(&instance("two"), 200).await.unwrap();
        assert_eq!(
            db.online(190)
                .await
                .unwrap()
                .into_iter()
                .collect::<Vec<_>>(),
            ["P-A"],
            "{name}"
        );
        assert_eq!(db.forget_instances(150).await.unwrap(), 1, "{name}");
        assert_eq!(db.instances(0).await.unwrap(), [instance("two")], "{name}");
        assert!(db.presence(&b, 0).await.unwrap().is_none(), "{name}");
        // An instance that stops says so.
        db.instance_gone("two").await.unwrap();
        assert!(db.online(0).await.unwrap().is_empty(), "{name}");
        assert!(db.instances(0).await.unwrap().is_empty(), "{name}");
    }
}

#[tokio::test]
async fn a_change_is_heard_by_other_instances_when_it_commits() {
    use super::{CHANNEL, Change};
    for payload in ["desired 7 VIN-1", "car VIN-1", "roots", "deployments"] {
        let change = Change::parse(payload).unwrap();
        assert_eq!(change.payload(), payload);
    }
    assert_eq!(Change::parse("something newer"), None);
    assert_eq!(
        Change::heard("4f2a roots"),
        Some(("4f2a", Change::Roots)),
        "a notification names the instance it comes from"
    );
    for fresh in each(EventLimits::default()).await {
        let db = &fresh.db;
        let Some(url) = db.url() else {
            continue;
        };
        let mut listener = sqlx::postgres::PgListener::connect(url).await.unwrap();
        listener.listen(CHANNEL).await.unwrap();
        let car = CarId::new("N-1").unwrap();
        db.register_car(&car_record_for(&car)).await.unwrap();
        let heard = listener.recv().await.unwrap();
        let origin = db.origin();
        assert_eq!(
            Change::heard(heard.payload()),
            Some((origin, Change::Car(car.clone())))
        );
        db.set_desired(&car, None, None, |counter| Ok(desired("r", counter, None)))
            .await
            .unwrap();
        let heard = listener.recv().await.unwrap();
        assert_eq!(
            Change::heard(heard.payload()),
            Some((
                origin,
                Change::Desired {
                    car: car.clone(),
                    counter: 1
                }
            ))
        );
        // A change that does not commit says nothing.
        let failed = db
            .set_desired(&car, None, None, |_| {
                Err(crate::Error::Config {
                    path: "x".into(),
                    why: "refused".into(),
                })
            })
            .await;
        assert!(failed.is_err());
        db.insert_root(1, "{}").await.unwrap();
        let heard = listener.recv().await.unwrap();
        assert_eq!(
            Change::heard(heard.payload()),
            Some((origin, Change::Roots))
        );
    }
}

fn car_record_for(id: &CarId) -> CarRecord {
    car(id.as_str(), &format!("fp-{id}"))
}
