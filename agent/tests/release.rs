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
use cardeploy_testkit::workspace_bin;
use common::{Agent, Env, call, until};
use serde_json::Value;

/// Run `cardeploy ARGS` in `dir` against the twin; stdout on success, panic with stderr if not.
fn cardeploy(dir: &Path, twin: &cardeploy_twin::Running, env: &Env, args: &[&str]) -> String {
    let out = Command::new(workspace_bin("cardeploy"))
        .args(args)
        .current_dir(dir)
        .env("CARDEPLOY_API", format!("http://{}", twin.api_addr))
        .env(
            "CARDEPLOY_TOKEN_FILE",
            env.data.path().join("operator.token"),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cardeploy {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

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
    cardeploy(dir, &twin, &env, &["keys", "gen", "keys/root"]);
    cardeploy(dir, &twin, &env, &["keys", "gen", "keys/release"]);
    cardeploy(
        dir,
        &twin,
        &env,
        &["root", "director", "--out", "keys/director.pub"],
    );
    cardeploy(
        dir,
        &twin,
        &env,
        &[
            "root",
            "init",
            "--root-key",
            "keys/root.pub",
            "--release-key",
            "keys/release.pub",
            "--director-key",
            "keys/director.pub",
            "--sign-with",
            "keys/root.key",
            "--out",
            "root.json",
        ],
    );
    cardeploy(dir, &twin, &env, &["root", "push", "root.json"]);

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
