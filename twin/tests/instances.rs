//! Several twin instances on one PostgreSQL database (in this process; `failover.rs` runs them
//! as processes behind HAProxy and kills one): a change made through one instance reaches a car
//! connected to another, reports are counted once whichever instance they reach, and exactly one
//! instance drives the deployments, another taking over when it stops.
//!
//! Needs `CARDEPLOY_POSTGRES_URL` (`cargo xtask test` starts a server): skipped loudly by hand
//! without it, a failure under `CI=true`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

mod common;

use cardeploy_link::{Bytes, Requester};
use cardeploy_protocol::{
    self as protocol, DesiredState, Hello, HelloReply, Report, ReportBody, ReportMark,
    ReportedState, route,
};
use cardeploy_testkit::CarFiles;
use cardeploy_twin::Running;
use common::{Env, api_async, apps_release, register};
use futures::StreamExt;
use serde_json::{Value, json};

/// Two instances' worth of set-up: the environment (PKI, the first instance's data directory,
/// the signer) and the shared database.
struct Fleet {
    env: Env,
    url: String,
    dirs: Vec<tempfile::TempDir>,
}

impl Fleet {
    async fn new() -> Option<Self> {
        let server = cardeploy_testkit::postgres::server()?;
        let url = cardeploy_testkit::postgres::fresh_database(&server)
            .await
            .unwrap();
        Some(Self {
            env: Env::new(),
            url,
            dirs: Vec::new(),
        })
    }

    /// The first instance: its data directory is the environment's (it makes the director key,
    /// and the root naming it is pushed through it).
    async fn first(&self) -> Running {
        let mut config = self.env.config();
        config.database_url = Some(self.url.clone());
        self.env.start_with(config).await
    }

    /// Another instance, with a data directory of its own holding a copy of the director key.
    async fn another(&mut self) -> Running {
        let dir = tempfile::tempdir().unwrap();
        copy_director_key(self.env.data.path(), dir.path());
        let mut config = self.env.config();
        config.data_dir = dir.path().to_owned();
        config.database_url = Some(self.url.clone());
        self.dirs.push(dir);
        cardeploy_twin::start(config).await.unwrap()
    }
}

fn copy_director_key(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for name in ["director.key", "director.pub"] {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
    std::fs::set_permissions(
        to.join("director.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
}

/// Wait until `check` holds, up to `within`.
async fn until<F: std::future::Future<Output = bool>>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> F,
) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < within, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A car's link to `twin` and its hello answer. The car was registered through another
/// instance: until that instance's change reaches this one, the handshake is refused.
async fn connect(env: &Env, twin: &Running, files: &CarFiles, id: &str) -> (Requester, HelloReply) {
    let started = Instant::now();
    loop {
        let attempt = async {
            let link = cardeploy_testkit::car_link(
                twin.cars_addr.port(),
                (&env.pki.ca(), &files.cert, &files.key),
                id,
                Duration::from_secs(2),
                Duration::from_secs(5),
            )
            .await
            .ok()?;
            let hello = Hello {
                agent_version: "test".into(),
                reported: ReportedState::idle(),
            };
            let answer = link
                .request_response(route::CAR_HELLO, Bytes::from(protocol::encode(&hello)))
                .await
                .ok()?;
            let reply: HelloReply = protocol::decode("hello reply", &answer).unwrap();
            Some((link, reply))
        };
        if let Some(done) = attempt.await {
            return done;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{id} could not connect to the second instance"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn event(link: &Requester, epoch: u64, seq: u64, message: &str) {
    let report = Report {
        epoch,
        seq,
        at: 0,
        body: ReportBody::Event {
            kind: "test".into(),
            message: message.into(),
        },
    };
    link.fire_and_forget(route::CAR_REPORT, Bytes::from(protocol::encode(&report)))
        .await
        .unwrap();
}

async fn events(twin: &Running, car: &str) -> Vec<String> {
    let (status, body) = api_async(twin, "GET", &format!("/api/v1/cars/{car}/events"), None).await;
    assert_eq!(status, 200, "{body}");
    let mut events: Vec<(u64, String)> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "test")
        .map(|e| {
            let message = e["message"].as_str().unwrap().to_owned();
            (e["id"].as_u64().unwrap(), message)
        })
        .collect();
    events.sort();
    events.into_iter().map(|(_, message)| message).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_through_one_instance_reaches_a_car_connected_to_another_within_a_second() {
    let Some(mut fleet) = Fleet::new().await else {
        return;
    };
    let a = fleet.first().await;
    let b = fleet.another().await;
    let env = &fleet.env;
    let files = register(env, &a, "VIN-B").await;
    let (link, _) = connect(env, &b, &files, "VIN-B").await;
    let mut desired = link.request_stream(route::CAR_DESIRED, Bytes::from_static(b"{}"));

    // Instance 1 knows the car is connected (to instance 2).
    until("presence", Duration::from_secs(5), || async {
        let (_, view) = api_async(&a, "GET", "/api/v1/cars/VIN-B", None).await;
        view["connected"] == true
    })
    .await;
    let (status, answer) = api_async(&a, "GET", "/api/v1/cars/VIN-B/inspect", None).await;
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer.to_string().contains("another twin instance"),
        "{answer}"
    );

    // A desired state signed through instance 1.
    let signer = env.signer();
    let release = signer.manifest("infotainment", "2.0.0", vec![]);
    let asked = Instant::now();
    let view = signer
        .desire(a.api_addr, &a.operator_token, "VIN-B", &release)
        .await;
    assert_eq!(view["counter"], 1, "{view}");
    let pushed = tokio::time::timeout(Duration::from_secs(5), desired.next())
        .await
        .expect("no push within 5 s")
        .unwrap()
        .unwrap();
    let took = asked.elapsed();
    let pushed: DesiredState = protocol::decode("desired", &pushed).unwrap();
    assert_eq!(
        pushed.release.payload,
        signer.sign_release(&release).payload
    );
    assert!(
        took < Duration::from_secs(1),
        "the change took {took:?} to reach the car on the other instance"
    );
    println!("desired state through instance 1 reached the car on instance 2 in {took:?}");

    // A revocation through instance 1 ends the car's session on instance 2, and keeps it out.
    let (status, answer) = api_async(&a, "DELETE", "/api/v1/cars/VIN-B", None).await;
    assert_eq!(status, 200, "{answer}");
    tokio::time::timeout(Duration::from_secs(5), link.closed())
        .await
        .expect("the revoked car's session on the other instance stayed open");
    let again = cardeploy_testkit::car_link(
        b.cars_addr.port(),
        (&env.pki.ca(), &files.cert, &files.key),
        "VIN-B",
        Duration::from_secs(2),
        Duration::from_secs(5),
    )
    .await;
    if let Ok(link) = again {
        let hello = Hello {
            agent_version: "test".into(),
            reported: ReportedState::idle(),
        };
        assert!(
            link.request_response(route::CAR_HELLO, Bytes::from(protocol::encode(&hello)))
                .await
                .is_err(),
            "a revoked car was let in by the other instance"
        );
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_sent_again_to_another_instance_is_stored_once_and_the_car_is_told_where_it_stands()
 {
    let Some(mut fleet) = Fleet::new().await else {
        return;
    };
    let a = fleet.first().await;
    let b = fleet.another().await;
    let env = &fleet.env;
    let files = register(env, &a, "VIN-R").await;
    let (link, reply) = connect(env, &a, &files, "VIN-R").await;
    assert_eq!(reply.reports_through, None);
    for seq in 1..=3 {
        event(&link, 7, seq, &format!("event {seq}")).await;
    }
    until(
        "the events on instance 1",
        Duration::from_secs(5),
        || async { events(&a, "VIN-R").await.len() == 3 },
    )
    .await;
    link.close();
    // The car came back on instance 2, not knowing whether 2 and 3 were stored: it is told.
    let (link, reply) = connect(env, &b, &files, "VIN-R").await;
    assert_eq!(reply.reports_through, Some(ReportMark { epoch: 7, seq: 3 }));
    // A car that sends them again anyway (an older agent) is not counted twice.
    for seq in 2..=4 {
        event(&link, 7, seq, &format!("event {seq}")).await;
    }
    until("event 4", Duration::from_secs(5), || async {
        events(&b, "VIN-R").await.len() == 4
    })
    .await;
    assert_eq!(
        events(&a, "VIN-R").await,
        ["event 1", "event 2", "event 3", "event 4"]
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// Deploy `release` to every car, one phase; the deployment is created through `twin`.
async fn deploy(twin: &Running, name: &str, release: &str) {
    let request = json!({
        "name": name, "release": release, "selector": "",
        "phases": [{"percent": 100.0, "soak_secs": 0}],
        "max_starts_per_minute": 600, "failure_threshold": 0.5, "success_threshold": 0.0,
        "ttl_secs": 3600, "supersede": true,
    });
    let (status, body) = api_async(twin, "POST", "/api/v1/deployments", Some(request)).await;
    assert_eq!(status, 201, "{body}");
}

/// The counter of the next desired state pushed on `stream`.
async fn next_counter(
    stream: &mut (impl futures::Stream<Item = Result<Bytes, cardeploy_link::Error>> + Unpin),
) -> Value {
    let pushed = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("no desired state within 20 s")
        .unwrap()
        .unwrap();
    let pushed: DesiredState = protocol::decode("desired", &pushed).unwrap();
    let doc: Value = serde_json::from_slice(&pushed.desired.payload).unwrap();
    doc["counter"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_instance_drives_and_another_takes_over_when_it_stops() {
    let Some(mut fleet) = Fleet::new().await else {
        return;
    };
    let a = fleet.first().await;
    let b = fleet.another().await;
    until("a driver", Duration::from_secs(10), || async {
        a.drives() || b.drives()
    })
    .await;
    // Never two: watched for a few rounds.
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(3) {
        assert!(!(a.drives() && b.drives()), "two instances drive at once");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (driver, other) = if a.drives() { (a, b) } else { (b, a) };
    let env = &fleet.env;
    let files = register(env, &driver, "VIN-D").await;
    // The car is on the instance that does not drive; the deployment is made through it too.
    let (link, _) = connect(env, &other, &files, "VIN-D").await;
    let mut desired = link.request_stream(route::CAR_DESIRED, Bytes::from_static(b"{}"));
    let first = apps_release(env, &other, "1.0.0").await;
    deploy(&other, "first", &first).await;
    assert_eq!(next_counter(&mut desired).await, 1);

    // The driver stops: the other instance takes over and drives the next deployment.
    driver.stop().await.unwrap();
    until(
        "the other instance to drive",
        Duration::from_secs(10),
        || async { other.drives() },
    )
    .await;
    let second = apps_release(env, &other, "2.0.0").await;
    deploy(&other, "second", &second).await;
    assert_eq!(
        next_counter(&mut desired).await,
        2,
        "each deployment started the car once"
    );
    let (_, view) = api_async(&other, "GET", "/api/v1/deployments/first", None).await;
    assert_eq!(view["started"], 1, "{view}");
    other.stop().await.unwrap();
}
