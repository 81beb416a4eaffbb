//! The twin when a car or a client misbehaves: revocation and re-provisioning, registration of
//! nothing but the fleet's client certificates, an event log and report rate that a car cannot
//! grow without bound, an operator API that bounds every header, body and upload and always
//! answers JSON, secrets on disk that must be private, and the chunk store's gc. The real twin,
//! started in-process on port 0; real TLS cars; HTTP from outside.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use cardeploy_chunks::{ChunkIndex, Params, chunk_bytes};
use cardeploy_link::{Bytes, Requester};
use cardeploy_protocol::{
    self as protocol, Hello, HelloReply, Phase, Report, ReportBody, ReportedState, route,
};
use cardeploy_release::ArtifactKind;
use cardeploy_testkit::{CarFiles, eventually, noise, rest_bytes};
use cardeploy_twin::{Config, Running};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "../common/mod.rs"]
mod common;

mod api;
mod cars;
mod events;
mod store;

use common::{Env, api_async as api};

const WAIT: Duration = Duration::from_secs(10);

async fn add_car(twin: &Running, car: &str, pem: &str) -> (u16, Value) {
    api(
        twin,
        "POST",
        "/api/v1/cars",
        Some(json!({"id": car, "certificate_pem": pem})),
    )
    .await
}

async fn register(env: &Env, twin: &Running, car: &str) -> CarFiles {
    let files = env.pki.car(car);
    let (status, body) = add_car(twin, car, &files.cert_pem).await;
    assert_eq!(status, 201, "{body}");
    files
}

async fn car_link(
    env: &Env,
    twin: &Running,
    files: &CarFiles,
    car: &str,
) -> anyhow::Result<Requester> {
    Ok(cardeploy_testkit::car_link(
        twin.cars_addr.port(),
        (&env.pki.ca(), &files.cert, &files.key),
        car,
        Duration::from_secs(2),
        Duration::from_secs(5),
    )
    .await?)
}

async fn hello(link: &Requester) -> anyhow::Result<HelloReply> {
    let hello = Hello {
        agent_version: "test".into(),
        reported: ReportedState {
            phase: Phase::Idle,
            ..ReportedState::idle()
        },
    };
    let answer = link
        .request_response(route::CAR_HELLO, Bytes::from(protocol::encode(&hello)))
        .await?;
    Ok(protocol::decode("hello reply", &answer)?)
}

/// A connected car that said hello (so that its event reports are numbered from here).
async fn connected(env: &Env, twin: &Running, files: &CarFiles, car: &str) -> Requester {
    let link = car_link(env, twin, files, car).await.unwrap();
    hello(&link).await.unwrap();
    link
}

async fn send_event(link: &Requester, seq: u64, kind: &str, message: &str) {
    let report = Report {
        epoch: 1,
        seq,
        at: 0,
        body: ReportBody::Event {
            kind: kind.into(),
            message: message.into(),
        },
    };
    link.fire_and_forget(route::CAR_REPORT, Bytes::from(protocol::encode(&report)))
        .await
        .unwrap();
}

/// Every event of `car` the twin keeps, oldest first.
async fn all_events(twin: &Running, car: &str) -> Vec<Value> {
    let (status, page) = api(
        twin,
        "GET",
        &format!("/api/v1/cars/{car}/events?limit=1000"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    page["events"].as_array().unwrap().clone()
}

async fn events_of_kind(twin: &Running, car: &str, kind: &str) -> Vec<Value> {
    all_events(twin, car)
        .await
        .into_iter()
        .filter(|e| e["kind"] == kind)
        .collect()
}

/// Poll an async condition every 20 ms until it holds, or panic after [`WAIT`].
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = tokio::time::Instant::now();
    while !check().await {
        assert!(started.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A connection attempt with `files` gets no answer, and the twin counts a refused handshake.
async fn refused_at_handshake(env: &Env, twin: &Running, files: &CarFiles, car: &str) {
    let before = twin
        .link_stats
        .handshakes_refused
        .load(std::sync::atomic::Ordering::SeqCst);
    let answered = async {
        let link = car_link(env, twin, files, car).await?;
        hello(&link).await
    }
    .await;
    assert!(answered.is_err(), "a revoked car got an answer");
    eventually(WAIT, "the refused handshake to be counted", || {
        (twin
            .link_stats
            .handshakes_refused
            .load(std::sync::atomic::Ordering::SeqCst)
            > before)
            .then_some(())
    })
    .await;
}
