//! The twin as cars and operators see it: a real server on port 0, real TLS cars (the link's own
//! client), the REST API over HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

mod common;

use cardeploy_link::Bytes;
use cardeploy_protocol::{
    self as protocol, DesiredState, Phase, Report, ReportBody, ReportedState, route,
};
use cardeploy_release::{ArtifactKind, CarContext, TrustedRoot, check_desired, check_release};
use cardeploy_testkit::signing::Signer;
use common::{Env, api_async, car_link, hello, publish, put_bytes, register, upload_chunks};
use futures::StreamExt;
use serde_json::{Value, json};

#[tokio::test]
async fn a_desired_state_set_through_the_api_reaches_the_connected_car_at_once() {
    let env = Env::new();
    let twin = env.start().await;
    let files = register(&env, &twin, "VIN-1").await;
    let link = car_link(&env, &twin, &files, "VIN-1").await;
    let reply = hello(&link, Phase::Idle).await;
    assert_eq!(reply.car_id.as_str(), "VIN-1");
    assert!(reply.desired.is_none());
    let mut desired = link.request_stream(route::CAR_DESIRED, Bytes::from_static(b"{}"));
    let signer = env.signer();
    let release = signer.manifest("infotainment", "1.0.0", vec![]);
    let view = signer
        .desire(twin.api_addr, &twin.operator_token, "VIN-1", &release)
        .await;
    assert_eq!(view["counter"], 1, "{view}");
    assert_eq!(view["version"], "1.0.0", "{view}");
    let pushed = tokio::time::timeout(Duration::from_secs(5), desired.next())
        .await
        .expect("no push within 5 s")
        .unwrap()
        .unwrap();
    let pushed: DesiredState = protocol::decode("desired", &pushed).unwrap();
    // What the car receives verifies under the root the car pins: the release by the release
    // key, the desired state by the twin's director key.
    let root = TrustedRoot::pinned(signer.root_bytes()).unwrap();
    let car = CarContext {
        car_id: "VIN-1".into(),
        compatible: cardeploy_testkit::signing::COMPATIBLE.into(),
        now: cardeploy_testkit::signing::now(),
        counter: None,
        installed: Default::default(),
        os: None,
        max_artifact_bytes: 1 << 30,
    };
    let checked = check_release(&root, &pushed.release, &car, None).unwrap();
    assert_eq!(checked.release.line, "infotainment");
    let desired_doc = check_desired(&root, &pushed.desired, &car, &checked).unwrap();
    assert_eq!(desired_doc.counter, 1);
    assert!(desired_doc.expires > desired_doc.issued);
    let other = CarContext {
        car_id: "VIN-2".into(),
        ..car
    };
    assert!(matches!(
        check_desired(&root, &pushed.desired, &other, &checked),
        Err(cardeploy_release::Error::OtherCar { .. })
    ));
}

#[tokio::test]
async fn the_twin_takes_only_releases_signed_under_its_root() {
    let env = Env::new();
    let twin = env.start_without_root().await;
    // The director key is made at first start, private to the twin's user.
    let key = env.data.path().join("director.key");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "director.key mode {mode:o}");
    let (status, director) = api_async(&twin, "GET", "/api/v1/director", None).await;
    assert_eq!(status, 200, "{director}");

    let signer = Signer::for_twin(env.data.path());
    assert_eq!(director["keyid"], signer.director.id().to_string());
    let release = signer.manifest("ecu", "1.0.0", vec![]);
    let envelope: Value = serde_json::from_slice(&signer.sign_release(&release).to_json()).unwrap();

    // No root yet: nothing can be verified.
    let (status, body) = api_async(&twin, "POST", "/api/v1/releases", Some(envelope.clone())).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("root push"),
        "{body}"
    );

    // A root that does not name this twin's director key is refused: cars would refuse
    // everything the twin signs.
    let stranger = cardeploy_release::SigningKey::generate().unwrap();
    let foreign = Signer::new(stranger.public());
    let body: Value = serde_json::from_slice(foreign.root_bytes()).unwrap();
    let (status, answer) = api_async(&twin, "POST", "/api/v1/roots", Some(body)).await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("director key"),
        "{answer}"
    );

    signer.push_root(twin.api_addr, &twin.operator_token).await;
    // The same root again is acknowledged, not an error (a chain pushed again after a rotation).
    signer.push_root(twin.api_addr, &twin.operator_token).await;
    // Signed by a key that is not the release role's (the root key): refused.
    let wrong = cardeploy_release::sign(
        cardeploy_release::RELEASE_TYPE,
        &serde_json::to_vec(&release).unwrap(),
        &[&signer.root_key],
    );
    let body: Value = serde_json::from_slice(&wrong.to_json()).unwrap();
    let (status, answer) = api_async(&twin, "POST", "/api/v1/releases", Some(body)).await;
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("valid signature"),
        "{answer}"
    );

    // Signed by the release key: registered, listed, and named by digest or line@version.
    let (status, answer) = api_async(&twin, "POST", "/api/v1/releases", Some(envelope)).await;
    assert_eq!(status, 201, "{answer}");
    let digest = answer["digest"].as_str().unwrap().to_owned();
    let (_, list) = api_async(&twin, "GET", "/api/v1/releases", None).await;
    assert_eq!(list[0]["digest"], digest.as_str(), "{list}");
    let (status, got) = api_async(&twin, "GET", "/api/v1/releases/ecu@1.0.0", None).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["summary"]["digest"], digest.as_str());

    // The same line@version with other content is refused: a version is published once.
    let mut changed = release.clone();
    changed.created += 1;
    let body: Value = serde_json::from_slice(&signer.sign_release(&changed).to_json()).unwrap();
    let (status, answer) = api_async(&twin, "POST", "/api/v1/releases", Some(body)).await;
    assert_eq!(status, 409, "{answer}");
    // So is the same version with other build metadata: SemVer says it is the same version.
    let mut rebuilt = release.clone();
    rebuilt.version = "1.0.0+build10".into();
    let body: Value = serde_json::from_slice(&signer.sign_release(&rebuilt).to_json()).unwrap();
    let (status, answer) = api_async(&twin, "POST", "/api/v1/releases", Some(body)).await;
    assert_eq!(status, 409, "{answer}");

    // A desired state takes a reference to a registered release, never a free-form document.
    register(&env, &twin, "VIN-REL").await;
    let (status, answer) = api_async(
        &twin,
        "PUT",
        "/api/v1/cars/VIN-REL/desired",
        Some(json!({"release": "ecu@9.9.9"})),
    )
    .await;
    assert_eq!(status, 404, "{answer}");
    let (status, answer) = api_async(
        &twin,
        "PUT",
        "/api/v1/cars/VIN-REL/desired",
        Some(json!({"release": "ecu@1.0.0", "artifacts": []})),
    )
    .await;
    assert_eq!(status, 422, "unknown fields are refused: {answer}");
    let (status, answer) = api_async(
        &twin,
        "PUT",
        "/api/v1/cars/VIN-REL/desired",
        Some(json!({"release": digest})),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["line"], "ecu");
}

#[tokio::test]
async fn a_certificate_of_car_x_cannot_speak_as_car_y() {
    let env = Env::new();
    let twin = env.start().await;
    let x = register(&env, &twin, "CAR-X").await;
    register(&env, &twin, "CAR-Y").await;
    // Car X's certificate, claiming to be Y in SETUP.
    let link = car_link(&env, &twin, &x, "CAR-Y").await;
    let reply = hello(&link, Phase::Failed).await;
    assert_eq!(
        reply.car_id.as_str(),
        "CAR-X",
        "the twin must go by the certificate"
    );
    let (_, y) = api_async(&twin, "GET", "/api/v1/cars/CAR-Y", None).await;
    assert_eq!(
        y["reported"],
        Value::Null,
        "car Y's twin was written by car X: {y}"
    );
    let (_, xv) = api_async(&twin, "GET", "/api/v1/cars/CAR-X", None).await;
    assert_eq!(xv["reported"]["state"]["phase"], "failed");
}

#[tokio::test]
async fn malformed_json_gets_an_error_naming_the_message_and_the_connection_stays_up() {
    let env = Env::new();
    let twin = env.start().await;
    let files = register(&env, &twin, "VIN-2").await;
    let link = car_link(&env, &twin, &files, "VIN-2").await;
    let err = link
        .request_response(
            route::CAR_HELLO,
            Bytes::from_static(b"{\"agent_version\": 7"),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("malformed car.hello request"),
        "{err}"
    );
    let err = link
        .request_response("car.teleport", Bytes::from_static(b"{}"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unknown route"), "{err}");
    assert!(err.to_string().contains("car.hello"), "{err}");
    hello(&link, Phase::Idle).await;
}

#[tokio::test]
async fn repeated_reports_are_stored_once_and_reported_state_survives_a_twin_restart() {
    let env = Env::new();
    let twin = env.start().await;
    let files = register(&env, &twin, "VIN-3").await;
    let link = car_link(&env, &twin, &files, "VIN-3").await;
    hello(&link, Phase::Idle).await;
    let state = ReportedState {
        phase: Phase::Applied,
        desired_counter: Some(1),
        release: Some("app@2.0.0".into()),
        ..ReportedState::idle()
    };
    let report = Report {
        epoch: 1,
        seq: 0,
        at: 0,
        body: ReportBody::State {
            state: state.clone(),
        },
    };
    for _ in 0..3 {
        link.fire_and_forget(route::CAR_REPORT, Bytes::from(protocol::encode(&report)))
            .await
            .unwrap();
    }
    let stale = Report {
        epoch: 0,
        seq: 99,
        at: 0,
        body: ReportBody::State {
            state: ReportedState::idle(),
        },
    };
    link.fire_and_forget(route::CAR_REPORT, Bytes::from(protocol::encode(&stale)))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let events = loop {
        let (_, events) = api_async(&twin, "GET", "/api/v1/cars/VIN-3/events", None).await;
        let states = events["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "state")
            .count();
        if states >= 1 {
            break states;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the report never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // A barrier instead of a pause: a report numbered above all of them. Once it is stored,
    // any duplicate still on its way is below the last stored number and can no longer land.
    let marker = Report {
        epoch: 1,
        seq: 1000,
        at: 0,
        body: ReportBody::Event {
            kind: "marker".into(),
            message: "after the duplicates".into(),
        },
    };
    link.fire_and_forget(route::CAR_REPORT, Bytes::from(protocol::encode(&marker)))
        .await
        .unwrap();
    let events_after = loop {
        let (_, events) = api_async(&twin, "GET", "/api/v1/cars/VIN-3/events", None).await;
        if events["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "marker")
        {
            break events;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the marker report never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let states = events_after["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "state")
        .count();
    assert_eq!(
        (events, states),
        (1, 1),
        "duplicates or a stale report were stored"
    );

    drop(link);
    twin.stop().await.unwrap();
    let twin = env.start().await;
    let (_, view) = api_async(&twin, "GET", "/api/v1/cars/VIN-3", None).await;
    assert_eq!(view["reported"]["state"]["release"], "app@2.0.0", "{view}");
    assert_eq!(view["reported"]["state"]["phase"], "applied");
    // The restarted twin still knows the car's certificate.
    let link = car_link(&env, &twin, &files, "VIN-3").await;
    hello(&link, Phase::Applied).await;
}

#[tokio::test]
async fn the_operator_api_needs_the_token_and_says_what_is_wrong() {
    let env = Env::new();
    let twin = env.start().await;
    let addr = twin.api_addr;
    let status = tokio::task::spawn_blocking(move || {
        // No Authorization header at all.
        ureq::Agent::from(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build(),
        )
        .get(&format!("http://{addr}/api/v1/cars"))
        .call()
        .unwrap()
        .status()
        .as_u16()
    })
    .await
    .unwrap();
    assert_eq!(status, 401);
    let files = register(&env, &twin, "VIN-4").await;
    let (status, body) = api_async(
        &twin,
        "POST",
        "/api/v1/cars",
        Some(json!({"id": "VIN-4", "certificate_pem": files.cert_pem})),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = api_async(
        &twin,
        "PUT",
        "/api/v1/cars/VIN-4/desired",
        Some(json!({"release": "nope"})),
    )
    .await;
    assert_eq!(status, 404);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("cardeploy release push"),
        "{body}"
    );
    let (status, _) = api_async(&twin, "GET", "/api/v1/cars/NOBODY", None).await;
    assert_eq!(status, 404);
    let (status, body) = api_async(&twin, "GET", "/api/v1/cars/..%2Fetc", None).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = api_async(
        &twin,
        "POST",
        "/api/v1/cars",
        Some(json!({"id": "VIN-5", "attributes": {"bad key": "x"}, "certificate_pem": "x"})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = api_async(&twin, "GET", "/api/v1/cars/VIN-4/inspect", None).await;
    assert_eq!(status, 503, "{body}");
}

#[tokio::test]
async fn uploads_are_verified_and_desired_states_name_only_complete_indexes() {
    let env = Env::new();
    let twin = env.start().await;
    register(&env, &twin, "VIN-ART").await;
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let index = cardeploy_chunks::chunk_bytes(&data, cardeploy_chunks::Params::DEFAULT);
    let id = index.id().hex();

    // A chunk whose bytes are not what its name says is refused.
    let first = index.chunks[0];
    let wrong = zstd::bulk::compress(b"not this chunk", 3).unwrap();
    let (status, body) = put_bytes(&twin, &format!("/api/v1/chunks/{}", first.id), wrong).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("hash"), "{body}");

    // An index is accepted only once every chunk it names is there.
    let (status, body) = put_bytes(&twin, &format!("/api/v1/indexes/{id}"), index.encode()).await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = publish(&env, &twin, "rootfs", &index).await;
    assert_eq!(
        status, 409,
        "a release may not name an index the twin lacks: {body}"
    );

    let (status, body) = api_async(
        &twin,
        "POST",
        "/api/v1/chunks/missing",
        Some(json!({"chunks": index.chunks.iter().map(|c| c.id.hex()).collect::<Vec<_>>()})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["missing"].as_array().unwrap().len(),
        index.chunks.len()
    );
    upload_chunks(&twin, &data, &index).await;
    // An index under another id (here: reordered bytes) is refused.
    let mut reordered = index.clone();
    reordered.chunks.swap(0, 1);
    let (status, body) =
        put_bytes(&twin, &format!("/api/v1/indexes/{id}"), reordered.encode()).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = put_bytes(&twin, &format!("/api/v1/indexes/{id}"), index.encode()).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["size"], 300_000);

    let (status, body) = publish(&env, &twin, "../etc", &index).await;
    assert_eq!(status, 422, "artifact names become file names: {body}");
    // A release whose declared size disagrees with the index is refused (A1).
    let signer = env.signer();
    let mut a = cardeploy_testkit::signing::artifact(ArtifactKind::RaucBundle, "rootfs", &index);
    a.size += 1;
    let bad = signer.manifest("os", "0.9.0", vec![a]);
    let body: Value = serde_json::from_slice(&signer.sign_release(&bad).to_json()).unwrap();
    let (status, answer) = api_async(&twin, "POST", "/api/v1/releases", Some(body)).await;
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("size"),
        "{answer}"
    );
    let (status, body) = publish(&env, &twin, "rootfs", &index).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["artifacts"], 1);
}

#[tokio::test]
async fn chunk_requests_outside_the_index_or_the_window_limits_are_refused() {
    let env = Env::new();
    let twin = env.start().await;
    let files = register(&env, &twin, "VIN-WIN").await;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let data: Vec<u8> = (0..400_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 56) as u8
        })
        .collect();
    let index = cardeploy_chunks::chunk_bytes(&data, cardeploy_chunks::Params::DEFAULT);
    upload_chunks(&twin, &data, &index).await;
    let id = index.id().hex();
    let (status, _) = put_bytes(&twin, &format!("/api/v1/indexes/{id}"), index.encode()).await;
    assert_eq!(status, 201);
    let link = car_link(&env, &twin, &files, "VIN-WIN").await;

    let ask = |chunks: Vec<u32>, index: String| {
        let link = link.clone();
        async move {
            let request = json!({"index": index, "base": null, "chunks": chunks});
            link.request_window(
                route::ARTIFACT_CHUNKS,
                Bytes::from(request.to_string()),
                cardeploy_link::Window {
                    max_items: 64,
                    max_bytes: 64 << 20,
                },
            )
            .await
        }
    };
    // Before the car is sent a release naming the index, it may not read it.
    let err = ask(vec![0], id.clone()).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("not an artifact of a release this car was sent or runs"),
        "{err}"
    );
    let (status, body) = publish(&env, &twin, "rootfs", &index).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = api_async(
        &twin,
        "PUT",
        "/api/v1/cars/VIN-WIN/desired",
        Some(json!({"release": body["digest"]})),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let frames = ask(vec![0, 1], id.clone()).await.unwrap();
    assert_eq!(frames.len(), 2);
    let frame = cardeploy_chunks::transit::Frame::decode(&frames[1]).unwrap();
    assert_eq!(frame.id, index.chunks[1].id);

    let beyond = index.chunks.len() as u32;
    let err = ask(vec![beyond], id.clone()).await.unwrap_err();
    assert!(err.to_string().contains("beyond"), "{err}");
    let err = ask(vec![0; 65], id.clone()).await.unwrap_err();
    assert!(err.to_string().contains("1 to 64"), "{err}");
    let err = ask(vec![0], "00".repeat(32)).await.unwrap_err();
    assert!(err.to_string().contains("not an artifact"), "{err}");

    let bytes = link
        .request_response(
            route::ARTIFACT_INDEX,
            Bytes::from(json!({"index": id}).to_string()),
        )
        .await
        .unwrap();
    assert_eq!(
        cardeploy_chunks::ChunkIndex::decode_expecting(&bytes, &index.id(), 1 << 30).unwrap(),
        index
    );
}

#[tokio::test]
async fn a_reported_state_beyond_the_bounds_is_dropped_not_stored() {
    let env = Env::new();
    let twin = env.start().await;
    let files = register(&env, &twin, "VIN-BIG").await;
    let link = car_link(&env, &twin, &files, "VIN-BIG").await;
    hello(&link, Phase::Idle).await;
    let workload = |n: usize| cardeploy_protocol::WorkloadReport {
        name: format!("Deployment/w{n}"),
        release: "app@9.0.0".into(),
        phase: cardeploy_protocol::WorkloadPhase::Ready,
        ready_replicas: 1,
        replicas: 1,
        last_error: None,
    };
    let state = ReportedState {
        phase: Phase::Committed,
        release: Some("app@9.0.0".into()),
        workloads: (0..=cardeploy_protocol::MAX_WORKLOADS)
            .map(workload)
            .collect(),
        ..ReportedState::idle()
    };
    let big = Report {
        epoch: 1,
        seq: 0,
        at: 0,
        body: ReportBody::State { state },
    };
    link.fire_and_forget(route::CAR_REPORT, Bytes::from(protocol::encode(&big)))
        .await
        .unwrap();
    // The barrier: a later report of the same car; once it is stored, the big one was handled.
    let marker = Report {
        epoch: 1,
        seq: 1,
        at: 0,
        body: ReportBody::Event {
            kind: "marker".into(),
            message: "after the big state".into(),
        },
    };
    link.fire_and_forget(route::CAR_REPORT, Bytes::from(protocol::encode(&marker)))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    loop {
        let (_, events) = api_async(&twin, "GET", "/api/v1/cars/VIN-BIG/events", None).await;
        let events = events["events"].as_array().unwrap().clone();
        if events.iter().any(|e| e["kind"] == "marker") {
            assert!(
                !events.iter().any(|e| e["kind"] == "state"),
                "the oversized state was stored: {events:?}"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the marker report never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, view) = api_async(&twin, "GET", "/api/v1/cars/VIN-BIG", None).await;
    assert_ne!(view["reported"]["state"]["release"], "app@9.0.0", "{view}");
}
