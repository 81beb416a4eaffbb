//! A hostile car against the twin: the testkit's raw RSocket client with a registered car's own
//! certificate, doing what an attacker with a key pulled out of an ECU would do. Each attack
//! ends in the documented answer, within a stated bound, while honest cars are still served.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use cardeploy_link::Bytes;
use cardeploy_protocol::{self as protocol, ChunksRequest, Hello, ReportedState, route};
use cardeploy_release::ArtifactKind;
use cardeploy_testkit::hostile::{self, HostileCar, REJECTED, error_code, error_text};
use cardeploy_testkit::procs::{rss_kib, start_twin_configured};
use cardeploy_testkit::signing::Signer;
use cardeploy_testkit::{CarFiles, TestPki, noise, rest};
use common::{Env, car_link, register};
use futures::StreamExt;
use rsocket_rust::frame::{self, Frame};
use serde_json::{Value, json};

const SOON: Duration = Duration::from_secs(5);

fn hello_json() -> Vec<u8> {
    protocol::encode(&Hello {
        agent_version: "hostile".into(),
        reported: ReportedState::idle(),
    })
}

/// A hostile car registered with the twin, connected, SETUP sent and hello answered.
async fn hostile_car(env: &Env, twin: &cardeploy_twin::Running, id: &str) -> HostileCar {
    let files = register(env, twin, id).await;
    let mut car = HostileCar::connect(twin.cars_addr, &env.pki.ca(), &files, id)
        .await
        .unwrap();
    let hello = car
        .request_response(route::CAR_HELLO, &hello_json())
        .await
        .unwrap();
    let answer = car.answer(hello, SOON).await.unwrap();
    assert!(error_code(&answer).is_none(), "{:?}", error_text(&answer));
    car
}

#[tokio::test]
async fn more_open_streams_than_allowed_are_rejected_and_the_connection_stays() {
    let env = Env::new();
    let twin = env.start().await;
    let mut car = hostile_car(&env, &twin, "VIN-STREAMS").await;
    // car.desired streams stay open for the whole session: eight of them fill the car's quota.
    let mut open = Vec::new();
    for _ in 0..8 {
        open.push(car.request_stream(route::CAR_DESIRED, b"{}").await.unwrap());
    }
    let ninth = car
        .request_response(route::CAR_HEARTBEAT, b"{}")
        .await
        .unwrap();
    let answer = car.answer(ninth, SOON).await.unwrap();
    assert_eq!(error_code(&answer), Some(REJECTED), "{answer:?}");
    assert!(
        error_text(&answer).unwrap().contains("concurrent streams"),
        "{answer:?}"
    );
    // One stream ends: the next request is served on the same connection.
    car.send(frame::Cancel::builder(open[0], 0).build())
        .await
        .unwrap();
    let beat = car
        .request_response(route::CAR_HEARTBEAT, b"{}")
        .await
        .unwrap();
    let answer = car.answer(beat, SOON).await.unwrap();
    assert_eq!(hostile::payload_data(&answer).as_deref(), Some(&b"{}"[..]));
}

/// Each entry: what the attacker sends after a proper SETUP and hello, and what it is.
async fn malformed_cases(car: &mut HostileCar, case: usize) {
    match case {
        // A PAYLOAD on a request-response the car itself opened and the twin is still
        // answering: rsocket_rust reaches `unreachable!()` for it.
        0 => {
            let id = car.next_id();
            let request = frame::RequestResponse::builder(id, Frame::FLAG_METADATA)
                .set_metadata(hostile::route_metadata(route::CAR_HELLO))
                .set_data(Bytes::from(hello_json()))
                .build();
            let payload = frame::Payload::builder(id, Frame::FLAG_NEXT)
                .set_data(Bytes::from_static(b"more"))
                .build();
            car.send(request).await.unwrap();
            car.send(payload).await.unwrap();
        }
        // An ERROR on a stream the car opened (a requester cancels with CANCEL).
        1 => {
            let id = car.request_stream(route::CAR_DESIRED, b"{}").await.unwrap();
            let error = frame::Error::builder(id, 0)
                .set_code(0x201)
                .set_data(Bytes::from_static(b"boom"))
                .build();
            car.send(error).await.unwrap();
        }
        // A frame type that does not exist.
        2 => car
            .send_raw(&[0, 0, 6, 0, 0, 0, 1, 0xFC, 0x00])
            .await
            .unwrap(),
        // A second SETUP.
        3 => car.send(hostile::setup("VIN-MALFORMED")).await.unwrap(),
        // A request on an even stream id, which only the twin opens.
        4 => {
            let request = frame::RequestResponse::builder(2, Frame::FLAG_METADATA)
                .set_metadata(hostile::route_metadata(route::CAR_HEARTBEAT))
                .set_data(Bytes::from_static(b"{}"))
                .build();
            car.send(request).await.unwrap();
        }
        // A PAYLOAD on a stream that was never opened.
        _ => car
            .send(
                frame::Payload::builder(999, Frame::FLAG_NEXT)
                    .set_data(Bytes::from_static(b"?"))
                    .build(),
            )
            .await
            .unwrap(),
    }
}

#[tokio::test]
async fn frames_that_break_the_protocol_drop_the_car_without_a_panic_and_others_are_served() {
    let env = Env::new();
    let data = tempfile::tempdir().unwrap();
    let log = data.path().join("twin.log");
    let twin_data = data.path().join("twin");
    let process = start_twin_configured(
        std::path::Path::new(env!("CARGO_BIN_EXE_cardeploy-twin")),
        &twin_data,
        &env.pki,
        "",
        &log,
    );
    let api: std::net::SocketAddr = process.api.trim_start_matches("http://").parse().unwrap();
    let cars: std::net::SocketAddr = format!("127.0.0.1:{}", process.cars_port).parse().unwrap();
    let files = env.pki.car("VIN-MALFORMED");
    let (status, body) = rest(
        api,
        &process.token,
        "POST",
        "/api/v1/cars",
        Some(json!({"id": "VIN-MALFORMED", "certificate_pem": files.cert_pem})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    for case in 0..6 {
        let mut car = HostileCar::connect(cars, &env.pki.ca(), &files, "VIN-MALFORMED")
            .await
            .unwrap();
        let hello = car
            .request_response(route::CAR_HELLO, &hello_json())
            .await
            .unwrap();
        car.answer(hello, SOON).await.unwrap();
        malformed_cases(&mut car, case).await;
        assert!(
            car.closed_within(SOON).await,
            "case {case}: the twin kept a car that broke the protocol"
        );
    }
    // A request before SETUP.
    let mut car = HostileCar::handshake(cars, &env.pki.ca(), &files)
        .await
        .unwrap();
    car.request_response(route::CAR_HEARTBEAT, b"{}")
        .await
        .unwrap();
    assert!(car.closed_within(SOON).await, "a request before SETUP");

    // The twin carries on: the same car, behaving, is served.
    let mut car = HostileCar::connect(cars, &env.pki.ca(), &files, "VIN-MALFORMED")
        .await
        .unwrap();
    let beat = car
        .request_response(route::CAR_HEARTBEAT, b"{}")
        .await
        .unwrap();
    let answer = car.answer(beat, SOON).await.unwrap();
    assert_eq!(hostile::payload_data(&answer).as_deref(), Some(&b"{}"[..]));
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(!log.contains("panicked"), "the twin panicked:\n{log}");
    assert!(
        log.contains("dropping a peer that broke the protocol"),
        "the twin says why it dropped the car:\n{log}"
    );
}

/// What the attacks below share: the twin binary (so its memory is its own), an artifact the
/// hostile car was sent, and an honest car next to it.
struct Stage {
    _dir: tempfile::TempDir,
    pki: TestPki,
    process: cardeploy_testkit::procs::TwinProcess,
    api: std::net::SocketAddr,
    cars: std::net::SocketAddr,
    signer: Signer,
    index: cardeploy_chunks::ChunkIndex,
    /// Each version's manifest, made once: a version is published once.
    releases: std::sync::Mutex<std::collections::HashMap<String, cardeploy_release::Release>>,
}

impl Stage {
    async fn new(extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::new();
        let data = dir.path().join("twin");
        let process = start_twin_configured(
            std::path::Path::new(env!("CARGO_BIN_EXE_cardeploy-twin")),
            &data,
            &pki,
            extra,
            &dir.path().join("twin.log"),
        );
        let api = process.api.trim_start_matches("http://").parse().unwrap();
        let cars = format!("127.0.0.1:{}", process.cars_port).parse().unwrap();
        let signer = Signer::for_twin(&data);
        signer.push_root(api, &process.token).await;
        // 8 MiB of noise: 128 chunks of about 64 KiB, each frame as large as its chunk.
        let bytes = noise(7, 8 << 20);
        let index = cardeploy_chunks::chunk_bytes(&bytes, cardeploy_chunks::Params::DEFAULT);
        let twin = Rest {
            api,
            token: process.token.clone(),
        };
        twin.upload(&bytes, &index).await;
        Self {
            _dir: dir,
            pki,
            process,
            api,
            cars,
            signer,
            index,
            releases: Default::default(),
        }
    }

    fn rest(&self) -> Rest {
        Rest {
            api: self.api,
            token: self.process.token.clone(),
        }
    }

    /// Register `car` and make `app@version` (the noise artifact) its desired state.
    async fn car(&self, car: &str, version: &str) -> CarFiles {
        let files = self.pki.car(car);
        let (status, body) = self
            .rest()
            .call(
                "POST",
                "/api/v1/cars",
                Some(json!({"id": car, "certificate_pem": files.cert_pem})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        self.desire(car, version).await;
        files
    }

    async fn desire(&self, car: &str, version: &str) {
        let release = self
            .releases
            .lock()
            .unwrap()
            .entry(version.to_owned())
            .or_insert_with(|| {
                let artifact = cardeploy_testkit::signing::artifact(
                    ArtifactKind::OciLayer,
                    "app",
                    &self.index,
                );
                self.signer.manifest("app", version, vec![artifact])
            })
            .clone();
        self.signer
            .desire(self.api, &self.process.token, car, &release)
            .await;
    }

    fn rss_mib(&self) -> f64 {
        rss_kib(self.process.child.id()) as f64 / 1024.0
    }
}

struct Rest {
    api: std::net::SocketAddr,
    token: String,
}

impl Rest {
    async fn call(&self, method: &'static str, path: &str, body: Option<Value>) -> (u16, Value) {
        rest(self.api, &self.token, method, path, body).await
    }

    async fn upload(&self, bytes: &[u8], index: &cardeploy_chunks::ChunkIndex) {
        let offsets = index.offsets();
        for (i, c) in index.chunks.iter().enumerate() {
            let raw = &bytes[offsets[i] as usize..offsets[i + 1] as usize];
            let (status, body) = cardeploy_testkit::rest_bytes(
                self.api,
                &self.token,
                &format!("/api/v1/chunks/{}", c.id),
                zstd::bulk::compress(raw, 1).unwrap(),
            )
            .await;
            assert_eq!(status, 201, "{body}");
        }
        let (status, body) = cardeploy_testkit::rest_bytes(
            self.api,
            &self.token,
            &format!("/api/v1/indexes/{}", index.id()),
            index.encode(),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }

    async fn connected(&self, car: &str) -> bool {
        let (_, view) = self.call("GET", &format!("/api/v1/cars/{car}"), None).await;
        view["connected"] == true
    }
}

/// The whole artifact, 16 windows of 8 chunks each at most, as an agent would ask.
fn windows(index: &cardeploy_chunks::ChunkIndex) -> Vec<Vec<u8>> {
    (0..index.chunks.len() as u32)
        .collect::<Vec<_>>()
        .chunks(8)
        .map(|w| {
            protocol::encode(&ChunksRequest {
                index: index.id().hex(),
                base: None,
                chunks: w.to_vec(),
            })
        })
        .collect()
}

#[tokio::test]
async fn a_car_that_stops_reading_costs_bounded_memory_is_dropped_and_others_are_served() {
    let stage = Stage::new("send_stall_secs = 3").await;
    let honest_files = stage.car("VIN-HONEST", "1.0.0").await;
    let hostile_files = stage.car("VIN-GREEDY", "1.0.0").await;

    // The honest car fetches a window first, so the twin has loaded what serving takes.
    let honest = honest_link(&stage, &honest_files, "VIN-HONEST").await;
    let mut desired = honest.request_stream(route::CAR_DESIRED, Bytes::new());
    assert!(
        desired.next().await.unwrap().is_ok(),
        "the first desired state"
    );
    fetch_window(&honest, &windows(&stage.index)[0]).await;
    let before = stage.rss_mib();

    // The attacker asks for the whole artifact 60 times over (1,000 windows) and reads nothing.
    let mut greedy = HostileCar::connect(stage.cars, &stage.pki.ca(), &hostile_files, "VIN-GREEDY")
        .await
        .unwrap();
    let hello = greedy
        .request_response(route::CAR_HELLO, &hello_json())
        .await
        .unwrap();
    greedy.answer(hello, SOON).await.unwrap();
    let requests = windows(&stage.index);
    for n in 0..1000 {
        greedy
            .request_stream(route::ARTIFACT_CHUNKS, &requests[n % requests.len()])
            .await
            .unwrap();
    }

    // Meanwhile an honest car gets its next desired state at once and its chunks.
    let rest = stage.rest();
    let pushed = Instant::now();
    stage.desire("VIN-HONEST", "2.0.0").await;
    let next = tokio::time::timeout(SOON, desired.next()).await.unwrap();
    assert!(next.unwrap().is_ok());
    let push = pushed.elapsed();
    fetch_window(&honest, &requests[3]).await;

    // The twin's memory while the attacker holds its requests, until it drops the attacker.
    let mut peak = stage.rss_mib();
    let started = Instant::now();
    while rest.connected("VIN-GREEDY").await {
        peak = peak.max(stage.rss_mib());
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a car that reads nothing was kept for 30 s (send_stall_secs = 3)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "twin RSS {before:.1} MiB before, {peak:.1} MiB at most under attack; push during the attack took {push:?}"
    );
    assert!(
        peak - before <= 32.0,
        "a car holding 1,000 unread windows grew the twin from {before:.1} to {peak:.1} MiB"
    );
    assert!(greedy.closed_within(SOON).await);
    // The honest car never noticed.
    fetch_window(&honest, &requests[5]).await;
}

async fn honest_link(stage: &Stage, files: &CarFiles, id: &str) -> cardeploy_link::Requester {
    let link = cardeploy_testkit::car_link(
        stage.process.cars_port,
        (&stage.pki.ca(), &files.cert, &files.key),
        id,
        Duration::from_secs(2),
        SOON,
    )
    .await
    .unwrap();
    link.request_response(route::CAR_HELLO, Bytes::from(hello_json()))
        .await
        .unwrap();
    link
}

async fn fetch_window(link: &cardeploy_link::Requester, request: &[u8]) {
    let frames = link
        .request_window_within(
            route::ARTIFACT_CHUNKS,
            Bytes::copy_from_slice(request),
            cardeploy_link::Window {
                max_items: 8,
                max_bytes: 4 << 20,
            },
            SOON,
        )
        .await
        .unwrap();
    assert_eq!(frames.len(), 8);
}

#[tokio::test]
async fn a_car_reads_only_its_own_artifacts_and_foreign_bases_cost_no_delta_work() {
    let env = Env::new();
    let twin = env.start().await;
    let signer = env.signer();
    // Two versions of one artifact, and a stranger's artifact.
    let v1 = noise(1, 600_000);
    let mut v2 = v1.clone();
    v2[300_000..300_100].fill(7);
    let other = noise(3, 300_000);
    let mut indexes = Vec::new();
    for bytes in [&v1, &v2, &other] {
        indexes.push(common::upload(&twin, bytes).await);
    }
    let release = |version: &str, index: &cardeploy_chunks::ChunkIndex| {
        let a = cardeploy_testkit::signing::artifact(ArtifactKind::OciLayer, "app", index);
        signer.manifest("app", version, vec![a])
    };
    let (r1, r2, r3) = (
        release("1.0.0", &indexes[0]),
        release("2.0.0", &indexes[1]),
        release("3.0.0", &indexes[2]),
    );
    let files = register(&env, &twin, "VIN-OWN").await;
    let stranger = register(&env, &twin, "VIN-STRANGER").await;
    signer
        .desire(twin.api_addr, &twin.operator_token, "VIN-OWN", &r1)
        .await;
    signer
        .desire(twin.api_addr, &twin.operator_token, "VIN-OWN", &r2)
        .await;
    signer
        .desire(twin.api_addr, &twin.operator_token, "VIN-STRANGER", &r3)
        .await;
    let link = car_link(&env, &twin, &files, "VIN-OWN").await;
    common::hello(&link, cardeploy_protocol::Phase::Idle).await;
    let ask = |index, base| ask_with(&link, index, base);
    // The stranger's artifact, by index, by chunks, or as a base: refused, and nothing was done
    // for it.
    let err = link
        .request_response(
            route::ARTIFACT_INDEX,
            Bytes::from(json!({"index": indexes[2].id().hex()}).to_string()),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("reads only its own artifacts"),
        "{err}"
    );
    let err = ask(&indexes[2], None).await.unwrap_err();
    assert!(
        err.to_string().contains("reads only its own artifacts"),
        "{err}"
    );
    let err = ask(&indexes[1], Some(&indexes[2])).await.unwrap_err();
    assert!(err.to_string().contains("base"), "{err}");
    assert_eq!(
        twin.served()
            .delta_jobs
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(twin.delta_cache_bytes(), 0);
    assert_eq!(
        twin.served()
            .chunks
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    // Its own: the current release against the earlier one, as deltas.
    let frames = ask(&indexes[1], Some(&indexes[0])).await.unwrap();
    assert_eq!(frames.len(), indexes[1].chunks.len());
    assert!(
        twin.served()
            .delta_jobs
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );

    // A car may also read the release it reports running.
    let runner = register(&env, &twin, "VIN-RUNNER").await;
    let link = car_link(&env, &twin, &runner, "VIN-RUNNER").await;
    let err = ask_with(&link, &indexes[2], None).await.unwrap_err();
    assert!(
        err.to_string().contains("reads only its own artifacts"),
        "{err}"
    );
    let hello = Hello {
        agent_version: "test".into(),
        reported: ReportedState {
            release: Some("app@3.0.0".into()),
            ..ReportedState::idle()
        },
    };
    link.request_response(route::CAR_HELLO, Bytes::from(protocol::encode(&hello)))
        .await
        .unwrap();
    let frames = ask_with(&link, &indexes[2], None).await.unwrap();
    assert_eq!(frames.len(), indexes[2].chunks.len());
    // Whatever cars ask for, none of it starts deltas made ahead: only operator actions do.
    assert_eq!(twin.deltas_ahead_pending(), 0);
    assert_eq!(
        twin.served()
            .ahead_pairs
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    drop(stranger);
}

#[tokio::test]
async fn a_release_registered_while_cars_run_the_last_one_has_its_deltas_made_before_the_first_car_asks()
 {
    let env = Env::new();
    let twin = env.start().await;
    let signer = env.signer();
    let v1 = noise(11, 1_500_000);
    let mut v2 = v1.clone();
    for at in [200_000, 700_000, 1_200_000] {
        v2[at..at + 300].fill(9);
    }
    let (i1, i2) = (
        common::upload(&twin, &v1).await,
        common::upload(&twin, &v2).await,
    );
    let release = |version: &str, index: &cardeploy_chunks::ChunkIndex| {
        let a = cardeploy_testkit::signing::artifact(ArtifactKind::OciLayer, "app", index);
        signer.manifest("app", version, vec![a])
    };
    let (r1, r2) = (release("1.0.0", &i1), release("2.0.0", &i2));
    let files = register(&env, &twin, "VIN-AHEAD").await;
    signer
        .desire(twin.api_addr, &twin.operator_token, "VIN-AHEAD", &r1)
        .await;
    let link = car_link(&env, &twin, &files, "VIN-AHEAD").await;
    let hello = Hello {
        agent_version: "test".into(),
        reported: ReportedState {
            release: Some("app@1.0.0".into()),
            ..ReportedState::idle()
        },
    };
    link.request_response(route::CAR_HELLO, Bytes::from(protocol::encode(&hello)))
        .await
        .unwrap();
    // Registering 2.0.0 plans the pair (2.0.0, 1.0.0) before the call returns.
    signer
        .publish(twin.api_addr, &twin.operator_token, &r2)
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while twin.deltas_ahead_pending() > 0 {
        assert!(Instant::now() < deadline, "deltas ahead not made in 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let served = twin.served();
    let load = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(load(&served.ahead_pairs), 1);
    let held: std::collections::HashSet<_> = i1.chunks.iter().map(|c| c.id).collect();
    let missing: Vec<u32> = (0..i2.chunks.len() as u32)
        .filter(|&p| !held.contains(&i2.chunks[p as usize].id))
        .collect();
    assert!(!missing.is_empty());
    assert_eq!(load(&served.ahead_chunks), missing.len() as u64);
    signer
        .desire(twin.api_addr, &twin.operator_token, "VIN-AHEAD", &r2)
        .await;
    // The first car's window: every frame from the cache, no delta job on its behalf, and deltas
    // where the chunk barely changed.
    let request = protocol::encode(&ChunksRequest {
        index: i2.id().hex(),
        base: Some(i1.id().hex()),
        chunks: missing.clone(),
    });
    let frames = link
        .request_window(
            route::ARTIFACT_CHUNKS,
            Bytes::from(request),
            cardeploy_link::Window {
                max_items: 64,
                max_bytes: 16 << 20,
            },
        )
        .await
        .unwrap();
    assert_eq!(frames.len(), missing.len());
    assert_eq!(load(&served.delta_jobs), 0);
    assert_eq!(load(&served.deltas), missing.len() as u64);
}

async fn ask_with(
    link: &cardeploy_link::Requester,
    index: &cardeploy_chunks::ChunkIndex,
    base: Option<&cardeploy_chunks::ChunkIndex>,
) -> Result<Vec<Bytes>, cardeploy_link::Error> {
    let request = protocol::encode(&ChunksRequest {
        index: index.id().hex(),
        base: base.map(|b| b.id().hex()),
        chunks: (0..index.chunks.len() as u32).collect(),
    });
    link.request_window(
        route::ARTIFACT_CHUNKS,
        Bytes::from(request),
        cardeploy_link::Window {
            max_items: 64,
            max_bytes: 16 << 20,
        },
    )
    .await
}

#[tokio::test]
async fn a_flood_of_reports_is_read_no_faster_than_it_is_handled() {
    let stage = Stage::new("").await;
    let files = stage.car("VIN-CHATTY", "1.0.0").await;
    let honest_files = stage.car("VIN-CALM", "1.0.0").await;
    let before = stage.rss_mib();
    let mut chatty = HostileCar::connect(stage.cars, &stage.pki.ca(), &files, "VIN-CHATTY")
        .await
        .unwrap();
    // Reports of nearly 1 MiB each, as fast as TLS goes, for three seconds.
    let event = json!({"epoch": 1, "seq": 1, "at": 0,
        "body": {"type": "event", "kind": "spam", "message": "x".repeat(900_000)}});
    let body = serde_json::to_vec(&event).unwrap();
    let flood = tokio::spawn(async move {
        let until = Instant::now() + Duration::from_secs(3);
        let mut sent = 0u64;
        while Instant::now() < until {
            let write = chatty.fire_and_forget(route::CAR_REPORT, &body);
            match tokio::time::timeout(Duration::from_millis(500), write).await {
                Ok(Ok(_)) => sent += 1,
                Ok(Err(_)) => break,
                Err(_) => {} // the twin is not reading: exactly the point
            }
        }
        sent
    });
    let mut peak = stage.rss_mib();
    while !flood.is_finished() {
        peak = peak.max(stage.rss_mib());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sent = flood.await.unwrap();
    eprintln!("{sent} reports of 900 kB sent; twin RSS {before:.1} → {peak:.1} MiB at most");
    assert!(
        peak - before <= 32.0,
        "a report flood grew the twin from {before:.1} to {peak:.1} MiB"
    );
    let honest = honest_link(&stage, &honest_files, "VIN-CALM").await;
    fetch_window(&honest, &windows(&stage.index)[1]).await;
}

#[tokio::test]
async fn a_car_revoked_between_its_handshake_and_its_setup_gets_no_session() {
    let env = Env::new();
    let twin = env.start().await;
    let files = register(&env, &twin, "VIN-LATE").await;
    let mut car = HostileCar::handshake(twin.cars_addr, &env.pki.ca(), &files)
        .await
        .unwrap();
    let (status, body) = common::api_async(&twin, "DELETE", "/api/v1/cars/VIN-LATE", None).await;
    assert_eq!(status, 200, "{body}");
    // Re-provisioned with a new certificate: the old handshake must not speak for it.
    let renewed = env.pki.car("VIN-LATE");
    let (status, body) = common::api_async(
        &twin,
        "POST",
        "/api/v1/cars",
        Some(json!({"id": "VIN-LATE", "certificate_pem": renewed.cert_pem})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    car.send(hostile::setup("VIN-LATE")).await.unwrap();
    let refusal = car
        .read_frame(SOON)
        .await
        .unwrap()
        .expect("an answer to SETUP");
    assert_eq!(
        error_code(&refusal),
        Some(0x003),
        "REJECTED_SETUP: {refusal:?}"
    );
    assert!(
        error_text(&refusal).unwrap().contains("revoked"),
        "{refusal:?}"
    );
    assert!(car.closed_within(SOON).await);
    assert_eq!(twin.connected_cars(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_work_runs_one_job_per_car_and_no_more_than_the_pool_at_once() {
    let env = Env::new();
    let mut config = env.config();
    config.delta_workers = 2;
    let twin = cardeploy_twin::start(config).await.unwrap();
    let signer = Signer::for_twin(env.data.path());
    signer.push_root(twin.api_addr, &twin.operator_token).await;
    // A base and three targets, each changed in every chunk: every chunk travels as a delta.
    let base = noise(11, 1 << 20);
    let changed = |seed: u8| {
        let mut v = base.clone();
        for at in (1000..v.len()).step_by(8 << 10) {
            v[at] = v[at].wrapping_add(seed);
        }
        v
    };
    let mut indexes = Vec::new();
    for bytes in [base.clone(), changed(1), changed(2), changed(3)] {
        indexes.push(common::upload(&twin, &bytes).await);
    }
    let release = |version: &str, index: &cardeploy_chunks::ChunkIndex| {
        let a = cardeploy_testkit::signing::artifact(ArtifactKind::OciLayer, "app", index);
        signer.manifest("app", version, vec![a])
    };
    // Every car runs the base first; a version is published once, so its manifest is made once.
    let first = release("1.0.0", &indexes[0]);
    let mut links = Vec::new();
    for (n, car) in ["VIN-POOL-A", "VIN-POOL-B", "VIN-POOL-C"]
        .iter()
        .enumerate()
    {
        let files = register(&env, &twin, car).await;
        let next = release(&format!("{}.0.0", n + 2), &indexes[n + 1]);
        for release in [&first, &next] {
            signer
                .desire(twin.api_addr, &twin.operator_token, car, release)
                .await;
        }
        links.push(car_link(&env, &twin, &files, car).await);
    }
    let windows_of = |target: &cardeploy_chunks::ChunkIndex| -> Vec<Bytes> {
        (0..target.chunks.len() as u32)
            .collect::<Vec<_>>()
            .chunks(4)
            .map(|w| {
                Bytes::from(protocol::encode(&ChunksRequest {
                    index: target.id().hex(),
                    base: Some(indexes[0].id().hex()),
                    chunks: w.to_vec(),
                }))
            })
            .collect()
    };
    let fetch = |link: cardeploy_link::Requester, request: Bytes| async move {
        link.request_window_within(
            route::ARTIFACT_CHUNKS,
            request,
            cardeploy_link::Window {
                max_items: 4,
                max_bytes: 4 << 20,
            },
            Duration::from_secs(120),
        )
        .await
        .unwrap()
    };
    let served = twin.served();
    // One car asks for all its windows at once: its jobs run one after the other.
    let asks: Vec<_> = windows_of(&indexes[1])
        .into_iter()
        .map(|w| tokio::spawn(fetch(links[0].clone(), w)))
        .collect();
    assert!(asks.len() >= 4, "{} windows", asks.len());
    for ask in asks {
        assert_eq!(ask.await.unwrap().len(), 4);
    }
    let jobs = served.delta_jobs.load(std::sync::atomic::Ordering::SeqCst);
    assert!(jobs >= 4, "every window needed a delta job, {jobs} ran");
    assert_eq!(
        served
            .delta_jobs_peak
            .load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one car had more than one delta job in flight"
    );
    // Two cars at once: never more jobs than the pool has workers.
    let mut asks = Vec::new();
    for (link, target) in [(&links[1], &indexes[2]), (&links[2], &indexes[3])] {
        for w in windows_of(target) {
            asks.push(tokio::spawn(fetch(link.clone(), w)));
        }
    }
    for ask in asks {
        assert_eq!(ask.await.unwrap().len(), 4);
    }
    assert!(
        served
            .delta_jobs_peak
            .load(std::sync::atomic::Ordering::SeqCst)
            <= 2
    );
}
