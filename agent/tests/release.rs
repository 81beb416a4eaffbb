//! The pipeline round trip with the real binaries: `cardeploy keys gen`, `root director`,
//! `root init`, `root push`, `release create`, `release sign`, `release push`, `car set-desired`
//! — and the real agent verifies the release and the twin's desired state, fetches the artifact
//! and records the release; then refuses a downgrade, takes it with a root-signed override, and
//! takes a root rotation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cardeploy_testkit::signing::COMPATIBLE;
use common::pipeline::{cardeploy, keys_and_root};
use common::{Agent, Env, call, until};
use serde_json::Value;

/// `release create` + `release sign` + `release push` of `bundle` as `os@version`; the digest.
fn publish(
    dir: &Path,
    twin: &cardeploy_twin::Running,
    env: &Env,
    bundle: &str,
    version: &str,
    key: &str,
    root_chain: &[&str],
) -> String {
    let out = format!("rel-{version}");
    cardeploy(
        dir,
        twin,
        env,
        &[
            "release",
            "create",
            "--line",
            "os",
            "--version",
            version,
            "--compatible",
            COMPATIBLE,
            "--os",
            bundle,
            "--manifests",
            "k8s",
            "--out",
            &out,
        ],
    );
    cardeploy(dir, twin, env, &["release", "sign", &out, "--key", key]);
    let envelope = format!("{out}/release.signed.json");
    let mut verify = vec!["release", "verify", &envelope];
    for root in root_chain {
        verify.extend(["--root", root]);
    }
    let verified = cardeploy(dir, twin, env, &verify);
    assert!(verified.contains(version), "{verified}");
    cardeploy(dir, twin, env, &["release", "push", &out, "--level", "3"])
        .trim()
        .to_owned()
}

async fn refused(twin: &cardeploy_twin::Running, car: &str, containing: &str) -> String {
    let started = Instant::now();
    loop {
        let (_, events) = call(
            twin,
            "GET",
            &format!("/api/v1/cars/{car}/events?limit=100"),
            None,
        )
        .await;
        let hit = events["events"].as_array().unwrap().iter().find_map(|e| {
            let m = e["message"].as_str().unwrap_or("");
            (e["kind"] == "refused" && m.contains(containing)).then(|| m.to_owned())
        });
        if let Some(message) = hit {
            return message;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no refusal containing {containing:?}: {events}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_signed_with_the_cli_is_verified_and_recorded_by_the_car() {
    let env = Env::new();
    env.no_root.set(true).unwrap();
    let twin = env.twin().await;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    std::fs::create_dir_all(dir.join("k8s")).unwrap();
    std::fs::write(
        dir.join("k8s/infotainment.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: infotainment\n",
    )
    .unwrap();
    let v1 = cardeploy_testkit::noise(1, 3 << 20);
    let mut v2 = v1.clone();
    v2[1 << 20..(1 << 20) + 4096].copy_from_slice(&cardeploy_testkit::noise(2, 4096));
    std::fs::write(dir.join("os-1.raucb"), &v1).unwrap();
    std::fs::write(dir.join("os-2.raucb"), &v2).unwrap();

    // The pipeline's keys, the twin's director key, the root naming them, uploaded.
    keys_and_root(dir, &twin, &env);

    let config = env
        .car_config(
            &twin,
            "VIN-CLI",
            &format!("localhost:{}", env.cars_port),
            &dir.join("root.json"),
            "",
        )
        .await;
    let _agent = Agent::start(&config);
    until(&twin, "VIN-CLI", "the agent to connect", |v| {
        v["connected"] == true
    })
    .await;

    let digest = publish(
        dir,
        &twin,
        &env,
        "os-2.raucb",
        "2.0.0",
        "keys/release.key",
        &["root.json"],
    );
    assert_eq!(digest.len(), 64, "release push prints the digest: {digest}");
    let said = cardeploy(
        dir,
        &twin,
        &env,
        &["car", "set-desired", "VIN-CLI", "--release", &digest],
    );
    assert!(said.contains("os@2.0.0"), "{said}");
    until(
        &twin,
        "VIN-CLI",
        "the car to verify and apply os@2.0.0",
        |v| {
            v["reported"]["state"]["phase"] == "applied"
                && v["reported"]["state"]["release"] == "os@2.0.0"
        },
    )
    .await;
    let state: Value = serde_json::from_slice(&std::fs::read(env.state_file()).unwrap()).unwrap();
    assert_eq!(state["release"]["digest"], digest.as_str());
    assert_eq!(state["installed"]["os"], "2.0.0");
    assert_eq!(state["last_counter"], 1);
    let index = state["artifacts"]["rootfs"].as_str().unwrap();
    let held = env
        .car_dir
        .path()
        .join(format!("state/artifacts/rootfs@{}", &index[..16]));
    assert_eq!(
        std::fs::read(held).unwrap(),
        v2,
        "the artifact is the bundle"
    );
    assert!(
        state["artifacts"]["infotainment"].is_string(),
        "the workload manifest travels as an artifact: {state}"
    );

    // Anti-rollback: os 1.0.0 is signed by the release key and the twin, and still refused.
    let old = publish(
        dir,
        &twin,
        &env,
        "os-1.raucb",
        "1.0.0",
        "keys/release.key",
        &["root.json"],
    );
    cardeploy(
        dir,
        &twin,
        &env,
        &["car", "set-desired", "VIN-CLI", "--release", &old],
    );
    let why = refused(&twin, "VIN-CLI", "downgrade").await;
    assert!(why.contains("os runs 2.0.0"), "{why}");
    let (_, view) = call(&twin, "GET", "/api/v1/cars/VIN-CLI", None).await;
    assert_eq!(view["reported"]["state"]["release"], "os@2.0.0", "{view}");

    // A refused desired state is not recorded.
    let state: Value = serde_json::from_slice(&std::fs::read(env.state_file()).unwrap()).unwrap();
    assert_eq!(state["last_counter"], 1);

    // With an override the root keys signed, the same downgrade is taken.
    cardeploy(
        dir,
        &twin,
        &env,
        &[
            "root",
            "allow-downgrade",
            "--line",
            "os",
            "--version",
            "1.0.0",
            "--sign-with",
            "keys/root.key",
            "--out",
            "allow.json",
        ],
    );
    cardeploy(
        dir,
        &twin,
        &env,
        &[
            "car",
            "set-desired",
            "VIN-CLI",
            "--release",
            "os@1.0.0",
            "--downgrade",
            "allow.json",
        ],
    );
    until(&twin, "VIN-CLI", "the allowed downgrade to os@1.0.0", |v| {
        v["reported"]["state"]["phase"] == "applied"
            && v["reported"]["state"]["release"] == "os@1.0.0"
    })
    .await;
    let state: Value = serde_json::from_slice(&std::fs::read(env.state_file()).unwrap()).unwrap();
    assert_eq!(state["last_counter"], 3);
    assert_eq!(
        state["installed"]["os"], "2.0.0",
        "the highest version installed stays the anti-rollback mark"
    );

    // The release key is rotated: root version 2 names a new one. The car, pinned to version 1,
    // takes the rotation from the next desired state and then accepts releases signed by the
    // new key.
    cardeploy(dir, &twin, &env, &["keys", "gen", "keys/release-2"]);
    cardeploy(
        dir,
        &twin,
        &env,
        &[
            "root",
            "rotate",
            "--current",
            "root.json",
            "--root-key",
            "keys/root.pub",
            "--release-key",
            "keys/release-2.pub",
            "--director-key",
            "keys/director.pub",
            "--sign-with",
            "keys/root.key",
            "--out",
            "root-2.json",
        ],
    );
    cardeploy(dir, &twin, &env, &["root", "push", "root-2.json"]);
    let v3 = publish(
        dir,
        &twin,
        &env,
        "os-2.raucb",
        "3.0.0",
        "keys/release-2.key",
        &["root.json", "root-2.json"],
    );
    cardeploy(
        dir,
        &twin,
        &env,
        &["car", "set-desired", "VIN-CLI", "--release", &v3],
    );
    until(
        &twin,
        "VIN-CLI",
        "the car to rotate its root and apply os@3.0.0",
        |v| {
            v["reported"]["state"]["phase"] == "applied"
                && v["reported"]["state"]["release"] == "os@3.0.0"
        },
    )
    .await;
    assert!(
        env.car_dir.path().join("state/roots/2.json").is_file(),
        "the rotation is kept for the next start"
    );

    // The agent keeps its counter, installed version and root across a restart.
    drop(_agent);
    let state: Value = serde_json::from_slice(&std::fs::read(env.state_file()).unwrap()).unwrap();
    assert_eq!(state["installed"]["os"], "3.0.0");
    assert_eq!(state["last_counter"], 4);
}

/// The car's registry: a release made with `--image` (a gzip layer the CLI stores uncompressed)
/// reaches the car, and skopeo copies the image out of the agent's registry by the digest the
/// release names, every blob byte for byte what the pipeline signed. Needs skopeo (the test
/// command installs it); under `CI=true` its absence fails the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_release_is_served_by_the_cars_registry_with_the_signed_digests() {
    let test = "a_container_release_is_served_by_the_cars_registry_with_the_signed_digests";
    if Command::new("skopeo").arg("--version").output().is_err() {
        cardeploy_testkit::cannot_run(test, "skopeo (apt-get install skopeo)");
        return;
    }
    let env = Env::new();
    env.no_root.set(true).unwrap();
    let twin = env.twin().await;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    keys_and_root(dir, &twin, &env);

    // An arm64 image whose second layer is gzip-compressed, as builders write them.
    let layout = cardeploy_testkit::oci::Layout::new(&dir.join("oci/nav"));
    let conf = cardeploy_testkit::oci::tar(&[("etc/nav.conf", b"zoom=3\n")]);
    let map = cardeploy_testkit::oci::tar(&[(
        "usr/share/nav/map",
        &cardeploy_testkit::noise(5, 1 << 20),
    )]);
    let image = layout.image("arm64", &[conf.clone(), map.clone()]);
    gzip_layer(&layout, &image, 1);
    std::fs::create_dir_all(dir.join("k8s")).unwrap();
    std::fs::write(
        dir.join("k8s/nav.yaml"),
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: nav}\nspec:\n  template:\n    spec:\n      containers:\n      - {name: nav, image: 'ghcr.io/acme/nav:1.0'}\n",
    )
    .unwrap();
    cardeploy(
        dir,
        &twin,
        &env,
        &[
            "release",
            "create",
            "--line",
            "apps",
            "--version",
            "1.0.0",
            "--compatible",
            COMPATIBLE,
            "--image",
            "acme/nav=oci/nav",
            "--manifests",
            "k8s",
            "--out",
            "rel",
        ],
    );
    cardeploy(
        dir,
        &twin,
        &env,
        &["release", "sign", "rel", "--key", "keys/release.key"],
    );
    let digest = cardeploy(dir, &twin, &env, &["release", "push", "rel"])
        .trim()
        .to_owned();
    let release: cardeploy_release::Release =
        serde_json::from_slice(&std::fs::read(dir.join("rel/release.json")).unwrap()).unwrap();
    let manifest = release.images[0].manifest.clone();

    // The registry's port: a free one, named in the car's configuration.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = env
        .car_config(
            &twin,
            "VIN-OCI",
            &format!("localhost:{}", env.cars_port),
            &dir.join("root.json"),
            &format!("[containers]\nregistry = \"127.0.0.1:{port}\"\n"),
        )
        .await;
    let _agent = Agent::start(&config);
    cardeploy(
        dir,
        &twin,
        &env,
        &["car", "set-desired", "VIN-OCI", "--release", &digest],
    );
    until(&twin, "VIN-OCI", "the car to fetch apps@1.0.0", |v| {
        v["reported"]["state"]["phase"] == "applied"
            && v["reported"]["state"]["release"] == "apps@1.0.0"
    })
    .await;

    let out = dir.join("pulled");
    let copied = cardeploy_testkit::oci::skopeo_copy(
        dir,
        &format!("docker://127.0.0.1:{port}/acme/nav@sha256:{manifest}"),
        &out,
        "1.0",
    )
    .output()
    .unwrap();
    assert!(
        copied.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&copied.stderr)
    );
    let index: Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index["manifests"][0]["digest"],
        format!("sha256:{manifest}")
    );
    // The layers arrive uncompressed: the raw tars, under the diff ids the config names.
    for layer in [&conf, &map] {
        let hex = cardeploy_release::sha256_hex(layer);
        assert_eq!(
            &std::fs::read(out.join("blobs/sha256").join(&hex)).unwrap(),
            layer
        );
    }
    // Every blob the release signed is what the car served.
    let sources: std::collections::BTreeMap<String, std::path::PathBuf> =
        serde_json::from_slice(&std::fs::read(dir.join("rel/sources.json")).unwrap()).unwrap();
    for a in release
        .artifacts
        .iter()
        .filter(|a| a.name.starts_with("acme.nav."))
    {
        let pulled = std::fs::read(out.join("blobs/sha256").join(&a.digest)).unwrap();
        assert_eq!(
            pulled,
            std::fs::read(&sources[&a.name]).unwrap(),
            "{}",
            a.name
        );
    }

    // A layer damaged on the car's disk (same size, a later time) is refused, not served; the
    // agent forgets it, removes the file and tells the twin which artifact it was.
    let layer = release
        .artifacts
        .iter()
        .find(|a| a.name == "acme.nav.layer-2")
        .unwrap();
    let held = env.car_dir.path().join(format!(
        "state/artifacts/acme.nav.layer-2@{}",
        &layer.index[..16]
    ));
    let mut bytes = std::fs::read(&held).unwrap();
    bytes[700] ^= 0xff;
    std::fs::write(&held, &bytes).unwrap();
    let later = std::time::SystemTime::now() + Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(&held)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let url = format!(
        "http://127.0.0.1:{port}/v2/acme/nav/blobs/sha256:{}",
        layer.digest
    );
    let status = tokio::task::spawn_blocking(move || {
        cardeploy_testkit::procs::http()
            .get(&url)
            .call()
            .unwrap()
            .status()
            .as_u16()
    })
    .await
    .unwrap();
    assert_eq!(status, 404, "a damaged blob is not served");
    let started = Instant::now();
    loop {
        let (_, events) = call(&twin, "GET", "/api/v1/cars/VIN-OCI/events?limit=100", None).await;
        let told = events["events"].as_array().unwrap().iter().any(|e| {
            e["kind"] == "images"
                && e["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("acme.nav.layer-2")
        });
        if told {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no event about the damaged layer: {events}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!held.exists(), "the damaged file is removed");
    let state: Value = serde_json::from_slice(&std::fs::read(env.state_file()).unwrap()).unwrap();
    assert!(
        state["artifacts"].get("acme.nav.layer-2").is_none(),
        "forgotten: {state}"
    );
}

/// Replaces layer `i` of `image` in `layout` by its gzip form (digest and size updated in a new
/// manifest, which `index.json` then lists).
fn gzip_layer(
    layout: &cardeploy_testkit::oci::Layout,
    image: &cardeploy_testkit::oci::Image,
    i: usize,
) {
    use std::io::Write;
    let raw = std::fs::read(layout.path(&image.layers[i].digest)).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw).unwrap();
    let packed = layout.blob(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        &gz.finish().unwrap(),
    );
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(layout.path(&image.manifest.digest)).unwrap())
            .unwrap();
    manifest["layers"][i] = serde_json::json!({
        "mediaType": packed.media_type, "digest": packed.digest_string(), "size": packed.size,
    });
    let manifest = layout.blob(
        cardeploy_testkit::oci::OCI_MANIFEST,
        serde_json::to_vec(&manifest).unwrap().as_slice(),
    );
    layout.list(&[(&manifest, "1.0")]);
}
