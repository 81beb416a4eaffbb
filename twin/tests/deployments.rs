//! Fleet deployments end to end: a real twin, simulated cars on real TLS links (the link's own
//! client) that take the desired state they are pushed and report it committed — or failed —
//! and the operator's REST API.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

mod common;

use cardeploy_link::{Bytes, Requester};
use cardeploy_protocol::{
    self as protocol, DesiredState, Hello, Phase, Report, ReportBody, ReportedState, route,
};
use cardeploy_release::{CarContext, TrustedRoot, check_release};
use cardeploy_testkit::CarFiles;
use cardeploy_twin::Running;
use common::{Env, api_async, apps_release, car_link};
use futures::StreamExt;
use serde_json::{Value, json};

/// A simulated car: it reports every desired state pushed to it as committed (or failed).
struct SimCar {
    link: Requester,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SimCar {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn register(env: &Env, twin: &Running, id: &str, attributes: Value) -> CarFiles {
    let files = env.pki.car(id);
    let (status, body) = api_async(
        twin,
        "POST",
        "/api/v1/cars",
        Some(json!({"id": id, "attributes": attributes, "certificate_pem": files.cert_pem})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    files
}

/// `running`: the release the car already reports (after a reconnect), or none (a fresh car).
async fn connect(
    env: &Env,
    twin: &Running,
    id: &str,
    files: &CarFiles,
    fails: bool,
    running: Option<&str>,
) -> SimCar {
    let link = car_link(env, twin, files, id).await;
    let reported = ReportedState {
        phase: match (running, fails) {
            (None, _) => Phase::Idle,
            (Some(_), false) => Phase::Committed,
            (Some(_), true) => Phase::RolledBack,
        },
        release: running.map(str::to_owned),
        ..ReportedState::idle()
    };
    let hello = Hello {
        agent_version: "simulated".into(),
        reported,
    };
    link.request_response(route::CAR_HELLO, Bytes::from(protocol::encode(&hello)))
        .await
        .unwrap();
    let mut desired = link.request_stream(route::CAR_DESIRED, Bytes::from_static(b"{}"));
    let reporter = link.clone();
    let root = TrustedRoot::pinned(env.signer().root_bytes()).unwrap();
    let car = CarContext {
        car_id: id.into(),
        compatible: cardeploy_testkit::signing::COMPATIBLE.into(),
        now: cardeploy_testkit::signing::now(),
        counter: None,
        installed: Default::default(),
        os: None,
        max_artifact_bytes: 1 << 30,
    };
    let task = tokio::spawn(async move {
        let mut seq = 0;
        while let Some(Ok(pushed)) = desired.next().await {
            let pushed: DesiredState = protocol::decode("desired", &pushed).unwrap();
            let checked = check_release(&root, &pushed.release, &car, None).unwrap();
            let label = format!("{}@{}", checked.release.line, checked.version);
            seq += 1;
            let state = ReportedState {
                phase: if fails {
                    Phase::RolledBack
                } else {
                    Phase::Committed
                },
                release: Some(label),
                last_error: fails.then(|| "health failure: simulated".to_owned()),
                ..ReportedState::idle()
            };
            // Above the epoch of the test's position reports: one numbering per car.
            let report = Report {
                epoch: 3,
                seq,
                at: 0,
                body: ReportBody::State { state },
            };
            let _ = reporter
                .fire_and_forget(route::CAR_REPORT, Bytes::from(protocol::encode(&report)))
                .await;
        }
    });
    SimCar { link, task }
}

/// `POST /api/v1/deployments`, which must succeed; the deployment's view.
async fn create(twin: &Running, request: Value) -> Value {
    let (status, created) = api_async(twin, "POST", "/api/v1/deployments", Some(request)).await;
    assert_eq!(status, 201, "{created}");
    created
}

async fn until(twin: &Running, name: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let (status, view) =
            api_async(twin, "GET", &format!("/api/v1/deployments/{name}"), None).await;
        assert_eq!(status, 200, "{view}");
        if check(&view) {
            return view;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}: {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn phases(view: &Value) -> Vec<(u64, u64, u64)> {
    view["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["group"].as_u64().unwrap(),
                p["started"].as_u64().unwrap(),
                p["failed"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_then_waves_reach_every_selected_car_and_no_other() {
    let env = Env::new();
    let twin = env.start().await;
    let mut cars = Vec::new();
    for i in 0..12 {
        let id = format!("VIN-{i:02}");
        let model = if i < 10 { "tx7" } else { "tx9" };
        let files = register(&env, &twin, &id, json!({"model": model, "market": "eu"})).await;
        cars.push(connect(&env, &twin, &id, &files, false, None).await);
    }
    let digest = apps_release(&env, &twin, "2.0.0").await;
    let (status, preview) = api_async(
        &twin,
        "POST",
        "/api/v1/deployments/preview",
        Some(json!({"selector": "model=tx7,market in (eu,uk)"})),
    )
    .await;
    assert_eq!(status, 200, "{preview}");
    assert_eq!(preview["total"], 10);
    let created = create(
        &twin,
        json!({
        "name": "tx7-apps-2", "release": "apps@2.0.0", "selector": "model=tx7,market in (eu,uk)",
        "phases": [{"cars": 2}, {"percent": 50}, {"percent": 100}],
        "failure_threshold": 0.5, "success_threshold": 1.0, "ttl_secs": 600
    }),
    )
    .await;
    assert_eq!(created["release"], digest.as_str());
    let done = until(&twin, "tx7-apps-2", "completed", |v| {
        v["state"] == "completed"
    })
    .await;
    assert_eq!(done["started"], 10);
    assert_eq!(done["succeeded"], 10);
    assert_eq!(phases(&done), vec![(2, 2, 0), (3, 3, 0), (5, 5, 0)]);
    let log: Vec<&str> = done["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(log.iter().any(|m| m.contains("phase 1 over")), "{log:?}");
    assert!(
        log.iter().any(|m| m.contains("completed: 10 cars")),
        "{log:?}"
    );
    // The tx9 cars were not selected: they never got a desired state.
    for id in ["VIN-10", "VIN-11"] {
        let (_, car) = api_async(&twin, "GET", &format!("/api/v1/cars/{id}"), None).await;
        assert!(car["desired"].is_null(), "{car}");
    }
    // A second deployment of the same cars is refused while... the first is over: it is allowed.
    let (status, body) = api_async(&twin, "GET", "/api/v1/deployments", None).await;
    assert_eq!(status, 200);
    assert_eq!(body.as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_halt_the_wave_within_its_budget_the_halt_survives_a_restart_and_resume_finishes_it()
 {
    let env = Env::new();
    let mut twin = env.start().await;
    let ids: Vec<String> = (0..10).map(|i| format!("VIN-{i:02}")).collect();
    let mut files = Vec::new();
    for id in &ids {
        files.push(register(&env, &twin, id, json!({"model": "tx7"})).await);
    }
    // VIN-02 and VIN-03 roll the release back: two failures in the second phase's group of 4.
    let fails = |id: &str| id == "VIN-02" || id == "VIN-03";
    let mut cars = Vec::new();
    for (id, files) in ids.iter().zip(&files) {
        cars.push(connect(&env, &twin, id, files, fails(id), None).await);
    }
    apps_release(&env, &twin, "3.0.0").await;
    create(
        &twin,
        json!({
            "name": "apps-3", "release": "apps@3.0.0", "selector": "model=tx7",
            "phases": [{"cars": 2}, {"percent": 60}, {"percent": 100}],
            "failure_threshold": 0.5, "success_threshold": 0.5, "ttl_secs": 600
        }),
    )
    .await;
    let halted = until(&twin, "apps-3", "halted", |v| v["state"] == "halted").await;
    assert!(
        halted["reason"].as_str().unwrap().contains("2 cars failed"),
        "{halted}"
    );
    // Not one car beyond the phase's budget: the canary's 2 and the wave's 4.
    assert_eq!(halted["started"], 6, "{halted}");
    assert_eq!(halted["failed"], 2);
    let failed: Vec<&str> = halted["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["car"].as_str().unwrap())
        .collect();
    assert_eq!(failed, vec!["VIN-02", "VIN-03"]);
    assert!(
        halted["failures"][0]["error"]
            .as_str()
            .unwrap()
            .contains("simulated")
    );

    // An overlapping deployment is refused while this one runs, naming it.
    apps_release(&env, &twin, "4.0.0").await;
    let request = json!({
        "name": "apps-4", "release": "apps@4.0.0", "selector": "model=tx7",
        "phases": [{"percent": 100}], "failure_threshold": 0.5, "success_threshold": 0.5, "ttl_secs": 600
    });
    let (status, body) =
        api_async(&twin, "POST", "/api/v1/deployments", Some(request.clone())).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("apps-3 (10 cars"),
        "{body}"
    );

    // The twin restarts: the halt and the started cars are where they were.
    drop(cars);
    twin.stop().await.unwrap();
    twin = env.start().await;
    let (_, after) = api_async(&twin, "GET", "/api/v1/deployments/apps-3", None).await;
    assert_eq!(after["state"], "halted", "{after}");
    assert_eq!(after["started"], 6, "{after}");
    let after_started: Vec<String> = ids[..6].to_vec();
    let mut cars = Vec::new();
    // The cars come back reporting what they run: the six started ones apps@3.0.0.
    for (id, files) in ids.iter().zip(&files) {
        let started = after_started.contains(id);
        let running = started.then_some("apps@3.0.0");
        cars.push(connect(&env, &twin, id, files, fails(id), running).await);
    }
    // Halted stays halted: a few rounds start nobody.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, still) = api_async(&twin, "GET", "/api/v1/deployments/apps-3", None).await;
    assert_eq!(still["state"], "halted");
    assert_eq!(still["started"], 6);

    // Resumed: the two failures are forgiven, 2 of 4 succeeded is enough, the rest follows.
    let (status, resumed) = api_async(
        &twin,
        "POST",
        "/api/v1/deployments/apps-3/resume",
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 200, "{resumed}");
    let done = until(&twin, "apps-3", "completed", |v| v["state"] == "completed").await;
    assert_eq!(done["started"], 10);
    assert_eq!(phases(&done), vec![(2, 2, 0), (4, 4, 2), (4, 4, 0)]);

    // Over: the next deployment of the same cars is accepted; superseding works on a running one.
    let (status, body) = api_async(&twin, "POST", "/api/v1/deployments", Some(request)).await;
    assert_eq!(status, 201, "{body}");
    let (status, paused) = api_async(
        &twin,
        "POST",
        "/api/v1/deployments/apps-4/pause",
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 200, "{paused}");
    let (status, _) = api_async(
        &twin,
        "POST",
        "/api/v1/deployments/apps-4/pause",
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 409, "pausing a paused deployment");
    create(
        &twin,
        json!({
        "name": "apps-4b", "release": "apps@4.0.0", "selector": "model=tx7", "supersede": true,
        "phases": [{"percent": 100}], "failure_threshold": 0.5, "success_threshold": 0.5, "ttl_secs": 600
    }),
    )
    .await;
    let (_, old) = api_async(&twin, "GET", "/api/v1/deployments/apps-4", None).await;
    assert_eq!(old["state"], "aborted", "{old}");
    assert!(
        old["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["message"] == "superseded by deployment apps-4b"),
        "{old}"
    );
}

#[tokio::test]
async fn bad_requests_say_what_is_wrong() {
    let env = Env::new();
    let twin = env.start().await;
    apps_release(&env, &twin, "1.0.0").await;
    let base = json!({
        "name": "d1", "release": "apps@1.0.0", "selector": "model=tx7",
        "phases": [{"cars": 1}], "failure_threshold": 0.1, "success_threshold": 0.9, "ttl_secs": 600
    });
    for (change, why) in [
        (json!({"selector": "model tx7"}), "expected an operator"),
        (
            json!({"geofence": {"type": "Point", "coordinates": [1, 2]}}),
            "not an area",
        ),
        (json!({"phases": []}), "0 phases"),
        (
            json!({"phases": [{"cars": 1, "percent": 5}]}),
            "either `cars` or `percent`",
        ),
        (json!({"failure_threshold": 2}), "failure_threshold"),
        (json!({"ttl_secs": 5}), "ttl_secs"),
        (json!({"name": "bad name"}), "deployment name"),
    ] {
        let mut body = base.clone();
        for (k, v) in change.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, answer) = api_async(&twin, "POST", "/api/v1/deployments", Some(body)).await;
        assert_eq!(status, 400, "{change}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(why),
            "{change}: {answer}"
        );
    }
    let mut unknown = base.clone();
    unknown["release"] = json!("apps@9.9.9");
    let (status, answer) = api_async(&twin, "POST", "/api/v1/deployments", Some(unknown)).await;
    assert_eq!(status, 404, "{answer}");
    let (status, answer) = api_async(&twin, "GET", "/api/v1/deployments/nope", None).await;
    assert_eq!(status, 404, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_car_waits_for_the_deltas_made_ahead() {
    let env = Env::new();
    let twin = env.start().await;
    let signer = env.signer();
    // 16 MB whose new version changes a little every 256 KiB: seconds of deltas at level 19.
    let v1 = cardeploy_testkit::noise(5, 16 << 20);
    let mut v2 = v1.clone();
    for at in (100_000..v2.len() - 1000).step_by(256 << 10) {
        v2[at..at + 200].fill(7);
    }
    let (i1, i2) = (
        common::upload(&twin, &v1).await,
        common::upload(&twin, &v2).await,
    );
    let release = |version: &str, index: &cardeploy_chunks::ChunkIndex| {
        let a = cardeploy_testkit::signing::artifact(
            cardeploy_release::ArtifactKind::OciLayer,
            "app",
            index,
        );
        signer.manifest("app", version, vec![a])
    };
    signer
        .publish(twin.api_addr, &twin.operator_token, &release("1.0.0", &i1))
        .await;
    let mut cars = Vec::new();
    for i in 0..3 {
        let id = format!("VIN-{i}");
        let files = register(&env, &twin, &id, json!({"model": "tx7"})).await;
        cars.push(connect(&env, &twin, &id, &files, false, Some("app@1.0.0")).await);
    }
    signer
        .publish(twin.api_addr, &twin.operator_token, &release("2.0.0", &i2))
        .await;
    let created = create(
        &twin,
        json!({
            "name": "app-2", "release": "app@2.0.0", "selector": "model=tx7",
            "phases": [{"cars": 1}, {"percent": 100}],
            "failure_threshold": 0.5, "success_threshold": 1.0, "ttl_secs": 600
        }),
    )
    .await;
    assert!(
        created["deltas_ahead_pending"].as_u64().unwrap() > 0,
        "the deltas of 2.0.0 against 1.0.0 are being made: {created}"
    );
    assert_eq!(created["started"], 0);
    // Never a car started while they are being made; then all of them.
    let started = Instant::now();
    loop {
        let (_, view) = api_async(&twin, "GET", "/api/v1/deployments/app-2", None).await;
        let pending = view["deltas_ahead_pending"].as_u64().unwrap();
        assert!(
            pending == 0 || view["started"] == 0,
            "a car started before the deltas were made: {view}"
        );
        if view["state"] == "completed" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{view}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_time_to_live_cars_not_started_never_start_and_the_count_is_kept() {
    let env = Env::new();
    let twin = env.start().await;
    // Three cars online, one parked (registered, never connected).
    let mut cars = Vec::new();
    for i in 0..3 {
        let id = format!("VIN-{i}");
        let files = register(&env, &twin, &id, json!({"model": "tx7"})).await;
        cars.push(connect(&env, &twin, &id, &files, false, None).await);
    }
    let parked = register(&env, &twin, "VIN-P", json!({"model": "tx7"})).await;
    apps_release(&env, &twin, "5.0.0").await;
    // A canary of one, then an hour of soak: the time-to-live (10 s) comes first.
    create(
        &twin,
        json!({
            "name": "short", "release": "apps@5.0.0", "selector": "model=tx7",
            "phases": [{"cars": 1, "soak_secs": 3600}, {"percent": 100}],
            "failure_threshold": 0.5, "success_threshold": 1.0, "ttl_secs": 10
        }),
    )
    .await;
    let ended = until(&twin, "short", "expired", |v| v["state"] == "expired").await;
    assert_eq!(ended["started"], 1, "{ended}");
    assert_eq!(ended["succeeded"], 1, "{ended}");
    assert_eq!(
        ended["never_reached"], 3,
        "two online cars and the parked one: {ended}"
    );
    let log = ended["events"].to_string();
    assert!(
        log.contains("time-to-live over: 3 selected cars were never started"),
        "{log}"
    );
    // The parked car comes back: nothing is started for it any more.
    let back = connect(&env, &twin, "VIN-P", &parked, false, None).await;
    let (_, car) = api_async(&twin, "GET", "/api/v1/cars/VIN-P", None).await;
    assert_eq!(car["connected"], true, "{car}");
    // A negative can only be watched for a while: two driver rounds (one a second) after it
    // connected, still one car started and only one car with a desired state.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, view) = api_async(&twin, "GET", "/api/v1/deployments/short", None).await;
    assert_eq!(view["started"], 1, "{view}");
    let mut desired = 0;
    for id in ["VIN-0", "VIN-1", "VIN-2", "VIN-P"] {
        let (_, car) = api_async(&twin, "GET", &format!("/api/v1/cars/{id}"), None).await;
        desired += usize::from(!car["desired"].is_null());
    }
    assert_eq!(
        desired, 1,
        "a car got a desired state after the time-to-live"
    );
    drop((back, cars));
}

/// Report a position (degrees) on the car's link; seq far above its state reports.
async fn at(car: &SimCar, seq: u64, lat: f64, lon: f64) {
    let report = Report {
        epoch: 2,
        seq,
        at: 0,
        body: ReportBody::Position {
            position: protocol::Position::rounded(lat, lon, 3).unwrap(),
        },
    };
    car.link
        .fire_and_forget(route::CAR_REPORT, Bytes::from(protocol::encode(&report)))
        .await
        .unwrap();
}

async fn selected(twin: &Running, fence: &Value) -> u64 {
    let (status, view) = api_async(
        twin,
        "POST",
        "/api/v1/deployments/preview",
        Some(json!({"selector": "model=tx7", "geofence": fence})),
    )
    .await;
    assert_eq!(status, 200, "{view}");
    view["total"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_car_driving_into_the_geofence_joins_the_deployment() {
    let env = Env::new();
    let twin = env.start().await;
    // Bavaria, roughly.
    let bavaria = json!({"type": "Polygon", "coordinates": [
        [[9.0, 47.3], [13.8, 47.3], [13.8, 50.5], [9.0, 50.5], [9.0, 47.3]]]});
    let mut files = Vec::new();
    for id in ["VIN-MUC", "VIN-BER", "VIN-NOWHERE"] {
        files.push(register(&env, &twin, id, json!({"model": "tx7"})).await);
    }
    // VIN-MUC reports Munich, then goes offline: selected, but it cannot start.
    let muc = connect(&env, &twin, "VIN-MUC", &files[0], false, None).await;
    at(&muc, 10, 48.137, 11.575).await;
    let started = Instant::now();
    while selected(&twin, &bavaria).await < 1 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "Munich not seen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(muc);
    // VIN-BER is in Berlin; VIN-NOWHERE never says where it is.
    let ber = connect(&env, &twin, "VIN-BER", &files[1], false, None).await;
    at(&ber, 10, 52.52, 13.405).await;
    let _nowhere = connect(&env, &twin, "VIN-NOWHERE", &files[2], false, None).await;
    let (_, car) = api_async(&twin, "GET", "/api/v1/cars/VIN-MUC", None).await;
    assert_eq!(car["position"]["lat"], 48.137, "{car}");
    apps_release(&env, &twin, "5.0.0").await;
    let created = create(
        &twin,
        json!({
        "name": "bavaria", "release": "apps@5.0.0", "selector": "model=tx7", "geofence": bavaria,
        "phases": [{"percent": 100}], "failure_threshold": 0.5, "success_threshold": 1.0,
        "ttl_secs": 600
    }),
    )
    .await;
    assert_eq!(created["selected"], 1, "only Munich is inside: {created}");
    assert!(created["geofence"].as_bool().unwrap());
    // Berlin drives south into Bavaria: it joins and gets the release; Munich is still offline.
    at(&ber, 11, 49.45, 11.08).await;
    let view = until(&twin, "bavaria", "the car from Berlin to join", |v| {
        v["selected"] == 2 && v["succeeded"] == 1
    })
    .await;
    assert_eq!(view["started"], 1, "{view}");
    assert_eq!(view["state"], "running", "Munich has not started: {view}");
    let (_, nowhere) = api_async(&twin, "GET", "/api/v1/cars/VIN-NOWHERE", None).await;
    assert!(nowhere["desired"].is_null(), "{nowhere}");
    let (_, ber_view) = api_async(&twin, "GET", "/api/v1/cars/VIN-BER", None).await;
    assert_eq!(ber_view["reported"]["state"]["release"], "apps@5.0.0");
}

#[tokio::test]
async fn a_position_not_on_earth_is_dropped() {
    let env = Env::new();
    let twin = env.start().await;
    let files = register(&env, &twin, "VIN-X", json!({"model": "tx7"})).await;
    let car = connect(&env, &twin, "VIN-X", &files, false, None).await;
    let bogus = Report {
        epoch: 2,
        seq: 1,
        at: 0,
        body: ReportBody::Position {
            position: protocol::Position {
                lat_e6: 95_000_000,
                lon_e6: 0,
            },
        },
    };
    car.link
        .fire_and_forget(route::CAR_REPORT, Bytes::from(protocol::encode(&bogus)))
        .await
        .unwrap();
    // A good one after it: once it is stored, the bogus one was handled before it.
    at(&car, 2, 10.0, 20.0).await;
    let started = Instant::now();
    loop {
        let (_, view) = api_async(&twin, "GET", "/api/v1/cars/VIN-X", None).await;
        if !view["position"].is_null() {
            assert_eq!(view["position"]["lat"], 10.0, "{view}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{view}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
