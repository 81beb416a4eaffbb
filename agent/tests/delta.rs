//! Delta transfer end to end: the `cardeploy` CLI pushes artifacts to a real twin, the real
//! agent fetches them by chunk index — from its seeds, as deltas, through SIGKILLs and through
//! cut, stalled and reset connections — and every time ends with exactly the right bytes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cardeploy_chunks::{Assembler, ChunkIndex, Params, chunk_bytes};
use cardeploy_release::ArtifactKind;
use cardeploy_testkit::signing::artifact_from_view;
use cardeploy_testkit::{Fault, FaultProxy, noise};
use cardeploy_twin::Running;
use common::{Agent, Env, call, until};
use serde_json::Value;

/// Compressible pseudo-random bytes, like files in an image.
fn corpus(seed: u64, len: usize) -> Vec<u8> {
    let words: [&[u8]; 8] = [
        b"alpha ", b"beta ", b"gamma\n", b"ecu ", b"car ", b"twin ", b"slot\n", b"0x1f ",
    ];
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        if rng.u8(..) < 30 {
            out.push(rng.u8(..));
        } else {
            out.extend_from_slice(words[rng.usize(..words.len())]);
        }
    }
    out.truncate(len);
    out
}

/// `old` after a "security update": a few regions rewritten, one grown, one shrunk.
fn updated(old: &[u8]) -> Vec<u8> {
    let mut new = old.to_vec();
    let n = new.len();
    for k in 1..8 {
        let at = n * k / 8;
        for b in &mut new[at..at + 300] {
            *b = b.wrapping_add(1);
        }
    }
    new.splice(n / 3..n / 3, corpus(77, 20_000));
    new.drain(n / 2..n / 2 + 10_000);
    new
}

/// 12 MiB of noise pushed as an artifact: (bytes, index id, index, distinct chunks).
fn pushed_noise(twin: &Running, env: &Env, seed: u64) -> (Vec<u8>, String, ChunkIndex, usize) {
    let data = noise(seed, 12 << 20);
    let files = tempfile::tempdir().unwrap();
    let path = files.path().join("layer.tar");
    std::fs::write(&path, &data).unwrap();
    let index = push(twin, env, &path);
    let target = chunk_bytes(&data, Params::DEFAULT);
    let total = target
        .chunks
        .iter()
        .map(|c| c.id)
        .collect::<HashSet<_>>()
        .len();
    (data, index, target, total)
}

/// `cardeploy artifact push FILE` against the twin; returns the index id it prints.
fn push(twin: &Running, env: &Env, file: &Path) -> String {
    common::push_artifact(twin, env, file, 3)
}

/// Sign a release `line@N.0.0` whose one artifact `rootfs` is the pushed index, and make it the
/// car's desired state.
async fn desire(env: &Env, twin: &Running, car: &str, release: &str, index: &str) {
    let (status, view) = call(twin, "GET", &format!("/api/v1/indexes/{index}"), None).await;
    assert_eq!(status, 200, "{view}");
    let artifact = artifact_from_view(ArtifactKind::RaucBundle, "rootfs", index, &view);
    let (line, version) = label(release);
    env.desire(twin, car, line, &version, vec![artifact]).await;
}

/// `os@2` → ("os", "2.0.0"): releases carry semantic versions.
fn label(release: &str) -> (&str, String) {
    let (line, major) = release.split_once('@').unwrap();
    (line, format!("{major}.0.0"))
}

async fn applied(twin: &Running, car: &str, release: &str, within: Duration) -> Value {
    let started = Instant::now();
    loop {
        let (_, view) = call(twin, "GET", &format!("/api/v1/cars/{car}"), None).await;
        let state = &view["reported"]["state"];
        let (line, version) = label(release);
        if state["phase"] == "applied" && state["release"] == format!("{line}@{version}") {
            return view;
        }
        assert!(state["phase"] != "failed", "the fetch failed: {view}");
        assert!(
            started.elapsed() < within,
            "timed out waiting for {release}: {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn artifact_file(env: &Env, index: &str) -> PathBuf {
    env.car_dir
        .path()
        .join(format!("state/artifacts/rootfs@{}", &index[..16]))
}

fn partial_file(env: &Env, index: &str) -> PathBuf {
    env.car_dir
        .path()
        .join(format!("state/artifacts/rootfs@{}.partial", &index[..16]))
}

/// Bytes of the artifact the agent has written so far.
fn assembled_bytes(env: &Env, index: &str) -> u64 {
    std::fs::metadata(partial_file(env, index)).map_or(0, |m| m.len())
}

/// Verify, chunk by chunk, what a killed agent left behind, the way the next start will; returns
/// how many chunks are good. (Opening cuts off a torn tail, exactly as the agent does.)
fn verified_chunks(env: &Env, index: &ChunkIndex, id: &str) -> usize {
    Assembler::open(index, &artifact_file(env, id))
        .unwrap_or_else(|e| panic!("the partial artifact is unreadable after a kill: {e}"))
        .next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_travels_as_deltas_against_the_running_slot() {
    let env = Env::new();
    let twin = env.twin().await;
    let old = corpus(1, 6 << 20);
    let new = updated(&old);
    let files = tempfile::tempdir().unwrap();
    let (old_path, new_path) = (files.path().join("v1.img"), files.path().join("v2.img"));
    std::fs::write(&old_path, &old).unwrap();
    std::fs::write(&new_path, &new).unwrap();
    let v1 = push(&twin, &env, &old_path);
    let v2 = push(&twin, &env, &new_path);

    // The car runs v1 from its slot: the slot is its seed.
    let slot = files.path().join("slot-a.img");
    std::fs::write(&slot, &old).unwrap();
    let config = env
        .car_with(
            &twin,
            "VIN-DELTA",
            &format!("localhost:{}", env.cars_port),
            &format!("seeds = [\"{}\"]\n", slot.display()),
        )
        .await;
    let _agent = Agent::start(&config);
    until(&twin, "VIN-DELTA", "the agent to connect", |v| {
        v["connected"] == true
    })
    .await;

    desire(&env, &twin, "VIN-DELTA", "os@1", &v1).await;
    applied(&twin, "VIN-DELTA", "os@1", Duration::from_secs(60)).await;
    assert_eq!(
        twin.served().chunks.load(Ordering::Relaxed),
        0,
        "v1 is entirely in the slot: nothing may travel"
    );
    assert_eq!(std::fs::read(artifact_file(&env, &v1)).unwrap(), old);

    desire(&env, &twin, "VIN-DELTA", "os@2", &v2).await;
    let view = applied(&twin, "VIN-DELTA", "os@2", Duration::from_secs(120)).await;
    assert_eq!(std::fs::read(artifact_file(&env, &v2)).unwrap(), new);
    assert!(
        !artifact_file(&env, &v1).exists(),
        "the old version is removed once the new one is there"
    );
    let leftovers: Vec<_> = std::fs::read_dir(env.car_dir.path().join("state/artifacts"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "no partial files remain: {leftovers:?}"
    );

    let served = twin.served().bytes.load(Ordering::Relaxed);
    let deltas = twin.served().deltas.load(Ordering::Relaxed);
    let whole = zstd::bulk::compress(&new, 3).unwrap().len() as u64;
    assert!(deltas > 0, "changed chunks should travel as deltas");
    assert!(
        served * 20 < whole,
        "sent {served} bytes for a small change; zstd of the whole image is {whole}"
    );

    let progress = &view["progress"];
    assert_eq!(progress["done"], true, "{view}");
    assert_eq!(progress["planned_bytes"], new.len() as u64);
    assert!(
        progress["seed_bytes"].as_u64().unwrap() > new.len() as u64 * 3 / 4,
        "{progress}"
    );
    let (_, events) = call(
        &twin,
        "GET",
        "/api/v1/cars/VIN-DELTA/events?limit=200",
        None,
    )
    .await;
    assert!(
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "fetch"),
        "progress shows in the car's events: {events}"
    );
}

/// Kill the agent with SIGKILL once it has assembled `at` bytes; returns whether the kill landed
/// before the download finished.
async fn kill_at(env: &Env, index: &str, agent: Agent, at: u64, total: u64) -> bool {
    let started = Instant::now();
    let mut agent = agent;
    loop {
        let n = assembled_bytes(env, index);
        if n >= at || artifact_file(env, index).exists() {
            agent.0.kill().unwrap();
            agent.0.wait().unwrap();
            return n < total && !artifact_file(env, index).exists();
        }
        if let Some(status) = agent.0.try_wait().unwrap() {
            panic!("the agent exited on its own: {status}");
        }
        assert!(started.elapsed() < Duration::from_secs(120), "no progress");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_download_never_corrupts_the_store_and_costs_at_most_a_window() {
    const WINDOW: u64 = 4;
    let env = Env::new();
    let twin = env.twin().await;
    let (data, index, target, total) = pushed_noise(&twin, &env, 2);

    let config = env
        .car_with(
            &twin,
            "VIN-KILL",
            &format!("localhost:{}", env.cars_port),
            // One window in flight: each kill may cost exactly that window, no more.
            &format!("window_chunks = {WINDOW}\nprefetch = false\n"),
        )
        .await;
    desire(&env, &twin, "VIN-KILL", "app@1", &index).await;
    let mut rng = fastrand::Rng::with_seed(7);
    let mut kills = 0;
    let mut good = 0;
    let size = data.len() as u64;
    while kills < 4 {
        let agent = Agent::start(&config);
        // A random moment: somewhere in the next sixth of the download.
        let at = assembled_bytes(&env, &index) + 1 + rng.u64(..size / 6);
        if !kill_at(&env, &index, agent, at, size).await {
            break;
        }
        kills += 1;
        let now = verified_chunks(&env, &target, &index);
        assert!(
            now >= good,
            "a kill lost assembled chunks: {good} before, {now} after"
        );
        good = now;
    }
    assert!(kills >= 3, "only {kills} kills landed during the download");
    let _agent = Agent::start(&config);
    applied(&twin, "VIN-KILL", "app@1", Duration::from_secs(120)).await;
    assert_eq!(std::fs::read(artifact_file(&env, &index)).unwrap(), data);

    let served = twin.served().chunks.load(Ordering::Relaxed);
    assert!(
        served <= total as u64 + kills * WINDOW,
        "{served} chunks sent for {total} after {kills} kills (window {WINDOW})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_stalled_and_reset_connections_resume_where_they_stopped() {
    const WINDOW: u64 = 4;
    let env = Env::new();
    let twin = env.twin().await;
    let proxy = FaultProxy::start(twin.cars_addr).await;
    let (data, index, _, total) = pushed_noise(&twin, &env, 3);
    let size = data.len() as u64;

    let config = env
        .car_with(
            &twin,
            "VIN-FAULT",
            &format!("localhost:{}", proxy.addr.port()),
            &format!("window_chunks = {WINDOW}\nwindow_deadline_secs = 2\nprefetch = false\n"),
        )
        .await;
    let _agent = Agent::start(&config);
    until(&twin, "VIN-FAULT", "the agent to connect", |v| {
        v["connected"] == true
    })
    .await;
    desire(&env, &twin, "VIN-FAULT", "app@1", &index).await;

    let faults = [
        (size / 5, Fault::Reset, Duration::from_millis(300)),
        (size * 2 / 5, Fault::Blackhole, Duration::from_secs(4)),
        (size * 3 / 5, Fault::Reset, Duration::from_millis(300)),
        (size * 4 / 5, Fault::Blackhole, Duration::from_secs(1)),
    ];
    let mut interruptions = 0u64;
    for (at, fault, hold) in faults {
        let started = Instant::now();
        while assembled_bytes(&env, &index) < at {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "no progress before {fault:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        proxy.set(fault);
        tokio::time::sleep(hold).await;
        proxy.set(Fault::Pass);
        interruptions += 1;
    }
    applied(&twin, "VIN-FAULT", "app@1", Duration::from_secs(120)).await;
    assert_eq!(std::fs::read(artifact_file(&env, &index)).unwrap(), data);
    let served = twin.served().chunks.load(Ordering::Relaxed);
    assert!(
        served <= total as u64 + interruptions * WINDOW,
        "{served} chunks sent for {total} after {interruptions} interruptions (window {WINDOW})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_beyond_the_cars_size_limit_is_refused_before_any_download() {
    let env = Env::new();
    let twin = env.twin().await;
    let data = corpus(4, 3 << 20);
    let files = tempfile::tempdir().unwrap();
    let path = files.path().join("big.img");
    std::fs::write(&path, &data).unwrap();
    let index = push(&twin, &env, &path);
    let config = env
        .car_with(
            &twin,
            "VIN-LIMIT",
            &format!("localhost:{}", env.cars_port),
            "max_artifact_bytes = 1048576\n",
        )
        .await;
    let _agent = Agent::start(&config);
    until(&twin, "VIN-LIMIT", "the agent to connect", |v| {
        v["connected"] == true
    })
    .await;
    desire(&env, &twin, "VIN-LIMIT", "os@9", &index).await;
    // M3: the release declares a size above the car's limit; refused before a byte moves.
    let started = Instant::now();
    let why = loop {
        let (_, events) = call(&twin, "GET", "/api/v1/cars/VIN-LIMIT/events?limit=50", None).await;
        let refused = events["events"].as_array().unwrap().iter().find_map(|e| {
            (e["kind"] == "refused").then(|| e["message"].as_str().unwrap().to_owned())
        });
        if let Some(why) = refused {
            break why;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no refusal: {events}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        why.contains("more than this car accepts (1048576)"),
        "the reason names the limit: {why}"
    );
    let (_, view) = call(&twin, "GET", "/api/v1/cars/VIN-LIMIT", None).await;
    assert_eq!(view["reported"]["state"]["phase"], "idle", "{view}");
    assert_eq!(
        twin.served().chunks.load(Ordering::Relaxed),
        0,
        "nothing was fetched"
    );
    assert!(!artifact_file(&env, &index).exists());
}

/// An artifact made of exactly these chunks (the index is crafted, so chunk boundaries are
/// where the test wants them), uploaded to the twin; returns its index.
async fn crafted(twin: &Running, chunks: &[Vec<u8>]) -> ChunkIndex {
    let data = chunks.concat();
    let index = ChunkIndex {
        params: Params::DEFAULT,
        size: data.len() as u64,
        artifact: cardeploy_chunks::Digest::of(&data),
        chunks: chunks
            .iter()
            .map(|c| cardeploy_chunks::ChunkRef {
                id: cardeploy_chunks::Digest::of(c),
                len: c.len() as u32,
            })
            .collect(),
    };
    for c in chunks {
        let id = cardeploy_chunks::Digest::of(c);
        let (status, body) = cardeploy_testkit::rest_bytes(
            twin.api_addr,
            &twin.operator_token,
            &format!("/api/v1/chunks/{id}"),
            zstd::bulk::compress(c, 3).unwrap(),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, body) = cardeploy_testkit::rest_bytes(
        twin.api_addr,
        &twin.operator_token,
        &format!("/api/v1/indexes/{}", index.id()),
        index.encode(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    index
}

/// `app@N.0.0` with one OCI layer `app` made of `index`. Made once: a version is published once,
/// and a manifest made again a second later is another one.
fn app_release(env: &Env, major: u32, index: &ChunkIndex) -> cardeploy_release::Release {
    let artifact = cardeploy_testkit::signing::artifact(ArtifactKind::OciLayer, "app", index);
    env.signer()
        .manifest("app", &format!("{major}.0.0"), vec![artifact])
}

/// `release` as `car`'s desired state.
async fn desire_app(env: &Env, twin: &Running, car: &str, release: &cardeploy_release::Release) {
    env.signer()
        .desire(twin.api_addr, &twin.operator_token, car, release)
        .await;
}

async fn app_applied(twin: &Running, car: &str, major: u32) {
    let started = Instant::now();
    loop {
        let (_, view) = call(twin, "GET", &format!("/api/v1/cars/{car}"), None).await;
        let state = &view["reported"]["state"];
        if state["phase"] == "applied" && state["release"] == format!("app@{major}.0.0") {
            return;
        }
        assert!(state["phase"] != "failed", "the fetch failed: {view}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "timed out waiting for app@{major}.0.0 on {car}: {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two releases that both hold the same new chunk after different bytes, fetched against the same
/// base: the frame made for one (a delta against its own preceding bytes) must never reach a car
/// fetching the other, and a cached frame that was damaged on disk is made again, not served.
#[tokio::test]
async fn one_new_chunk_in_two_releases_over_one_base_reaches_both_cars_and_a_damaged_delta_is_made_again()
 {
    let env = Env::new();
    let twin = env.twin().await;
    let kib = |n: usize| n << 10;
    // The base: incompressible, so no delta against it ever pays. Its chunks are cut the way a
    // car cuts its seeds, so the car finds all of them and offers it as the base.
    let b_bytes = noise(100, kib(256));
    let b_index = chunk_bytes(&b_bytes, Params::DEFAULT);
    let offsets = b_index.offsets();
    let b: Vec<Vec<u8>> = (0..b_index.chunks.len())
        .map(|i| b_bytes[offsets[i] as usize..offsets[i + 1] as usize].to_vec())
        .collect();
    // Text before the shared chunk: different in the two targets.
    let p1 = corpus(1, kib(128));
    let p2 = corpus(2, kib(128));
    // The shared chunk X is the second half of p1 with a few bytes changed: right after p1 a
    // delta against the preceding bytes makes it almost free, right after p2 it does not.
    let mut x = p1[kib(64)..].to_vec();
    for at in [100, 20_000, 50_000] {
        x[at] ^= 0x5a;
    }
    let base = crafted(&twin, &b).await;
    assert_eq!(base, b_index);
    // The targets start like the base (all but its last chunk, which may be short).
    let shared = &b[..b.len() - 1];
    let target = |p: &[u8], x: Vec<u8>| {
        let mut chunks = shared.to_vec();
        chunks.extend([p[..kib(64)].to_vec(), p[kib(64)..].to_vec(), x]);
        chunks
    };
    let t1 = crafted(&twin, &target(&p1, x.clone())).await;
    let t2 = crafted(&twin, &target(&p2, x)).await;
    let at = shared.len() + 2;
    assert_eq!(
        t1.chunks[at].id, t2.chunks[at].id,
        "the same chunk at the same place"
    );

    let (r1, r2, r3) = (
        app_release(&env, 1, &base),
        app_release(&env, 2, &t1),
        app_release(&env, 3, &t2),
    );
    // Car 1 runs the base, then fetches T1: X travels as a context frame, made and cached.
    let car1 = env.car(&twin, "VIN-T1").await;
    let _agent1 = Agent::start(&car1);
    desire_app(&env, &twin, "VIN-T1", &r1).await;
    app_applied(&twin, "VIN-T1", 1).await;
    desire_app(&env, &twin, "VIN-T1", &r2).await;
    app_applied(&twin, "VIN-T1", 2).await;
    assert!(
        twin.served().deltas.load(Ordering::Relaxed) >= 1,
        "X should have travelled as a delta"
    );
    // Made ahead (when r2 was registered) or on demand, whichever came first; once the job made
    // ahead has ended, a `full` entry that no later job touches (it skips `full` entries), so
    // only the next car's read can find the damage below.
    let deadline = Instant::now() + Duration::from_secs(60);
    while twin.deltas_ahead_pending() > 0 {
        assert!(Instant::now() < deadline, "deltas ahead not made in 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pair = env.data.path().join(format!(
        "chunks/deltas/{}.{}",
        t1.id().hex(),
        base.id().hex()
    ));
    let find_cached = || {
        ["full", "trial"]
            .iter()
            .map(|grade| pair.join(format!("{at}.{grade}")))
            .find(|path| path.exists())
            .unwrap_or_else(|| pair.join(format!("{at}.full")))
    };
    let cached = find_cached();
    assert!(
        cached.ends_with(format!("{at}.full")),
        "{}",
        cached.display()
    );
    let frame = std::fs::read(&cached).expect("the delta for T1's shared chunk is cached");
    assert_eq!(frame[0], b'C', "a context frame");

    // Damage it on disk: the next car fetching T1 gets a good frame, made again.
    let mut damaged = frame.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 0xff;
    damaged[50] ^= 0xff;
    std::fs::write(&cached, &damaged).unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let car2 = env.another_car(&twin, "VIN-T1B", dir2.path()).await;
    let _agent2 = Agent::start(&car2);
    desire_app(&env, &twin, "VIN-T1B", &r1).await;
    app_applied(&twin, "VIN-T1B", 1).await;
    desire_app(&env, &twin, "VIN-T1B", &r2).await;
    app_applied(&twin, "VIN-T1B", 2).await;
    assert_eq!(twin.served().repaired.load(Ordering::Relaxed), 1);
    // Made again (on demand, or ahead for the second car's desired state; maybe at the other
    // grade): the same bytes, since the context frame was made at the configured level both times.
    assert_eq!(
        std::fs::read(find_cached()).unwrap(),
        frame,
        "made again, the same"
    );

    // Car 3 runs the base, then fetches T2: X must come for T2, not T1's frame.
    let dir3 = tempfile::tempdir().unwrap();
    let car3 = env.another_car(&twin, "VIN-T2", dir3.path()).await;
    let _agent3 = Agent::start(&car3);
    desire_app(&env, &twin, "VIN-T2", &r1).await;
    app_applied(&twin, "VIN-T2", 1).await;
    let before = twin.served().chunks.load(Ordering::Relaxed);
    desire_app(&env, &twin, "VIN-T2", &r3).await;
    app_applied(&twin, "VIN-T2", 3).await;
    // Exactly the three chunks it lacked: none had to be asked for again after a bad delta.
    assert_eq!(twin.served().chunks.load(Ordering::Relaxed) - before, 3);
    for (dir, index) in [
        (env.car_dir.path(), &t1),
        (dir2.path(), &t1),
        (dir3.path(), &t2),
    ] {
        let file = dir.join(format!("state/artifacts/app@{}", &index.id().hex()[..16]));
        let bytes = std::fs::read(&file).unwrap();
        assert_eq!(cardeploy_chunks::Digest::of(&bytes), index.artifact);
    }
}
