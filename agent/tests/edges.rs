//! The real agent at the edges of what it fetches: a chunk index larger than one payload, an
//! index describing 16 GiB, a desired state larger than one payload, a download replaced before it
//! finished, and a disk that fills up in the middle of one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cardeploy_chunks::{ChunkIndex, ChunkRef, Digest, Params, Store, chunk_bytes};
use cardeploy_release::ArtifactKind;
use cardeploy_testkit::noise;
use cardeploy_testkit::signing::artifact;
use cardeploy_twin::Running;
use common::{Agent, Env, until_within};
use serde_json::Value;

fn state(view: &Value) -> &Value {
    &view["reported"]["state"]
}

fn applied(view: &Value, release: &str) -> bool {
    assert_ne!(state(view)["phase"], "failed", "{view}");
    state(view)["phase"] == "applied" && state(view)["release"] == release
}

/// Put chunks straight into the running twin's store (the test's data is large in count, not in
/// bytes; the REST upload is tested elsewhere), then the index through the API.
async fn stored(env: &Env, twin: &Running, chunks: &[Vec<u8>], index: &ChunkIndex) {
    let store = Store::open(&env.data.path().join("chunks")).unwrap();
    for c in chunks {
        store.put_raw(&Digest::of(c), c).unwrap();
    }
    store.sync().unwrap();
    let (status, body) = cardeploy_testkit::rest_bytes(
        twin.api_addr,
        &twin.operator_token,
        &format!("/api/v1/indexes/{}", index.id()),
        index.encode(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_whose_index_is_larger_than_one_payload_is_fetched_end_to_end() {
    let env = Env::new();
    let twin = env.twin().await;
    // 30,000 chunks of 1 KiB (64 distinct ones, repeated): a 1.08 MB index for a 30 MB artifact.
    let params = Params {
        min: 256,
        avg: 1024,
        max: 4096,
    };
    let distinct: Vec<Vec<u8>> = (0..64).map(|i| noise(i, 1024)).collect();
    let order: Vec<usize> = (0..30_000).map(|i| (i * 7 + i / 64) % 64).collect();
    let data: Vec<u8> = order.iter().flat_map(|&i| distinct[i].clone()).collect();
    let index = ChunkIndex {
        params,
        size: data.len() as u64,
        artifact: Digest::of(&data),
        chunks: order
            .iter()
            .map(|&i| ChunkRef {
                id: Digest::of(&distinct[i]),
                len: 1024,
            })
            .collect(),
    };
    assert!(
        index.encode().len() > 1 << 20,
        "the index must exceed one payload"
    );
    stored(&env, &twin, &distinct, &index).await;
    let config = env
        .car_with(
            &twin,
            "VIN-BIGINDEX",
            &format!("localhost:{}", env.cars_port),
            "window_chunks = 64\n",
        )
        .await;
    let _agent = Agent::start(&config);
    env.desire(
        &twin,
        "VIN-BIGINDEX",
        "app",
        "1.0.0",
        vec![artifact(ArtifactKind::OciLayer, "app", &index)],
    )
    .await;
    until_within(
        &twin,
        "VIN-BIGINDEX",
        Duration::from_secs(60),
        "app@1.0.0 applied",
        |v| applied(v, "app@1.0.0"),
    )
    .await;
    let file = env
        .car_dir
        .path()
        .join(format!("state/artifacts/app@{}", &index.id().hex()[..16]));
    assert_eq!(Digest::of(&std::fs::read(file).unwrap()), index.artifact);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_of_a_16_gib_artifact_reaches_the_car_page_by_page() {
    let env = Env::new();
    let twin = env.twin().await;
    let size = 16u64 << 30;
    let avg = u64::from(Params::DEFAULT.avg);
    let index = ChunkIndex {
        params: Params::DEFAULT,
        size,
        artifact: Digest::of(b"an OS image of 16 GiB"),
        chunks: (0..size / avg)
            .map(|i| ChunkRef {
                id: Digest::of(&i.to_le_bytes()),
                len: avg as u32,
            })
            .collect(),
    };
    // The index only: its 262,144 chunks need not exist for the index to travel.
    let store = Store::open(&env.data.path().join("chunks")).unwrap();
    store.put_index(&index).unwrap();
    store.keep(&index.id().hex(), &index.id()).unwrap();
    store.sync().unwrap();
    let config = env.car(&twin, "VIN-16GIB").await;
    let _agent = Agent::start(&config);
    env.desire(
        &twin,
        "VIN-16GIB",
        "os",
        "1.0.0",
        vec![artifact(ArtifactKind::RaucBundle, "rootfs", &index)],
    )
    .await;
    let cached = env
        .car_dir
        .path()
        .join(format!("state/indexes/{}", index.id().hex()));
    let started = Instant::now();
    let bytes = loop {
        if let Ok(bytes) = std::fs::read(&cached)
            && !bytes.is_empty()
        {
            break bytes;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the 16 GiB index never reached the car"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(bytes.len() > 9 << 20, "{} bytes", bytes.len());
    assert_eq!(Digest::of(&bytes), index.id());
    // The car planned the download from it: 16 GiB, nothing of it on the car yet.
    until_within(
        &twin,
        "VIN-16GIB",
        Duration::from_secs(60),
        "the plan of the 16 GiB fetch",
        |v| v["progress"]["planned_bytes"] == size && v["progress"]["index"] == index.id().hex(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desired_state_larger_than_one_payload_reaches_the_car_and_is_accepted() {
    let env = Env::new();
    let twin = env.twin().await;
    let data = noise(9, 100_000);
    let index = chunk_bytes(&data, Params::DEFAULT);
    let chunks: Vec<Vec<u8>> = {
        let offsets = index.offsets();
        (0..index.chunks.len())
            .map(|i| data[offsets[i] as usize..offsets[i + 1] as usize].to_vec())
            .collect()
    };
    stored(&env, &twin, &chunks, &index).await;
    // As many layers (the same bytes under different names) as one signed release envelope
    // holds: with the desired state around it, more than one payload.
    let signer = env.signer();
    let layers_of = |n: usize| -> Vec<_> {
        (0..n)
            .map(|i| artifact(ArtifactKind::OciLayer, &format!("layer-{i:05}"), &index))
            .collect()
    };
    let envelope_len = |n: usize| {
        signer
            .sign_release(&signer.manifest("fleet", "1.0.0", layers_of(n)))
            .to_json()
            .len()
    };
    let (mut fits, mut over) = (1, 8000);
    while over - fits > 1 {
        let mid = (fits + over) / 2;
        if envelope_len(mid) <= cardeploy_release::MAX_ENVELOPE_BYTES {
            fits = mid;
        } else {
            over = mid;
        }
    }
    assert!(
        envelope_len(fits) as u64 > cardeploy_protocol::PAGE_BYTES,
        "the desired state must exceed one payload"
    );
    let layers = layers_of(fits);
    let config = env.car(&twin, "VIN-BIGDESIRE").await;
    let _agent = Agent::start(&config);
    let answer = env
        .desire(&twin, "VIN-BIGDESIRE", "fleet", "1.0.0", layers)
        .await;
    let counter = answer["counter"].as_u64().unwrap();
    // Accepted: verified against the root and recorded, whatever the fetch of 5,000 layers does.
    until_within(
        &twin,
        "VIN-BIGDESIRE",
        Duration::from_secs(60),
        "the big desired state",
        |v| state(v)["desired_counter"] == counter && state(v)["release"] == "fleet@1.0.0",
    )
    .await;
}

/// How much of `name`'s partial download is on the car.
fn partial(env: &Env, name: &str, index: &ChunkIndex) -> PathBuf {
    env.car_dir.path().join(format!(
        "state/artifacts/{name}@{}.partial",
        &index.id().hex()[..16]
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partial_download_of_a_replaced_desired_state_is_removed() {
    let env = Env::new();
    let twin = env.twin().await;
    let big = noise(1, 16 << 20);
    let big_index = common::push_bytes(&twin, &env, &big);
    let small = noise(2, 100_000);
    let small_index = common::push_bytes(&twin, &env, &small);
    let config = env
        .car_with(
            &twin,
            "VIN-REPLACED",
            &format!("localhost:{}", env.cars_port),
            "prefetch = false\nwindow_chunks = 1\n",
        )
        .await;
    let agent = Agent::start(&config);
    env.desire(
        &twin,
        "VIN-REPLACED",
        "app",
        "1.0.0",
        vec![artifact(ArtifactKind::OciLayer, "app", &big_index)],
    )
    .await;
    let partial_big = partial(&env, "app", &big_index);
    let started = Instant::now();
    while std::fs::metadata(&partial_big).map_or(0, |m| m.len()) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the download never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Stopped in the middle of it; while it is down, the operator wants something else.
    drop(agent);
    assert!(partial_big.exists());
    env.desire(
        &twin,
        "VIN-REPLACED",
        "app",
        "2.0.0",
        vec![artifact(ArtifactKind::OciLayer, "app", &small_index)],
    )
    .await;
    let _agent = Agent::start(&config);
    until_within(
        &twin,
        "VIN-REPLACED",
        Duration::from_secs(30),
        "app@2.0.0",
        |v| applied(v, "app@2.0.0"),
    )
    .await;
    assert!(
        !partial_big.exists(),
        "the replaced download's partial file is still there"
    );
}

/// A tmpfs of `mib` MiB at `dir`, unmounted on drop. Needs root.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mib: u32) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir)
            .status()
            .ok()?;
        status.success().then(|| Self(dir.to_owned()))
    }

    fn grow(&self, mib: u32) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_with_the_room_needed_and_the_fetch_goes_on_when_there_is_room() {
    let env = Env::new();
    let twin = env.twin().await;
    let Some(disk) = Tmpfs::mount(&env.car_dir.path().join("state"), 6) else {
        cardeploy_testkit::cannot_run(
            "the full-disk test",
            "root, to mount a small tmpfs as the car's disk",
        );
        return;
    };
    let data = noise(3, 12 << 20);
    let index = common::push_bytes(&twin, &env, &data);
    let config = env.car(&twin, "VIN-FULL").await;
    let agent = Agent::start(&config);
    env.desire(
        &twin,
        "VIN-FULL",
        "app",
        "1.0.0",
        vec![artifact(ArtifactKind::OciLayer, "app", &index)],
    )
    .await;
    let view = until_within(
        &twin,
        "VIN-FULL",
        Duration::from_secs(60),
        "a full disk reported",
        |v| {
            state(v)["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("is full"))
        },
    )
    .await;
    assert_eq!(state(&view)["phase"], "fetching", "{view}");
    let message = state(&view)["last_error"].as_str().unwrap().to_owned();
    assert!(
        message.contains("more there") && message.contains("free"),
        "{message}"
    );
    disk.grow(64);
    until_within(
        &twin,
        "VIN-FULL",
        Duration::from_secs(60),
        "app@1.0.0 after room",
        |v| applied(v, "app@1.0.0"),
    )
    .await;
    drop(agent);
}
