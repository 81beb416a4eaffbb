//! `cardeploy deploy` against the real twin (the test kit's fleet: a `cardeploy-twin` process,
//! keys and root made with this CLI): preview, create, list, status, pause, resume, abort, and
//! what a bad request prints. The rollout itself is tested in `twin/tests/deployments.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Output;

use cardeploy_testkit::fleet::{CarOptions, Fleet};
use cardeploy_testkit::workspace_bin;

fn deploy(fleet: &Fleet, args: &[&str]) -> Output {
    fleet.cli().arg("deploy").args(args).output().unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn an_operator_previews_creates_watches_pauses_resumes_and_aborts_a_deployment() {
    let dir = tempfile::tempdir().unwrap();
    let bin = workspace_bin("cardeploy-twin");
    let fleet = Fleet::start(bin.parent().unwrap(), dir.path()).unwrap();
    for (car, model) in [("VIN-A", "tx7"), ("VIN-B", "tx7"), ("VIN-C", "tx9")] {
        let mut options = CarOptions::new("cardeploy-test", "localhost:7443");
        options.attrs = vec![format!("model={model}"), "market=eu".into()];
        fleet.add_car(car, &options).unwrap();
    }
    let k8s = dir.path().join("k8s");
    std::fs::create_dir_all(&k8s).unwrap();
    std::fs::write(
        k8s.join("cm.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {a: b}\n",
    )
    .unwrap();
    let k8s = k8s.display().to_string();
    fleet
        .release(
            "apps",
            "1.0.0",
            "cardeploy-test",
            &["--manifests", &k8s],
            &[],
        )
        .unwrap();

    let preview = deploy(
        &fleet,
        &["preview", "--selector", "model=tx7,market in (eu,uk)"],
    );
    let stderr = String::from_utf8_lossy(&preview.stderr).into_owned();
    let cars = ok(preview);
    assert_eq!(cars.lines().collect::<Vec<_>>(), vec!["VIN-A", "VIN-B"]);
    assert!(stderr.contains("2 cars selected"), "{stderr}");

    let created = ok(deploy(
        &fleet,
        &[
            "create",
            "apps-1",
            "--release",
            "apps@1.0.0",
            "--selector",
            "model=tx7",
            "--canary",
            "1",
            "--wave",
            "100%",
            "--soak",
            "10m",
            "--failure-threshold",
            "20%",
            "--success-threshold",
            "90%",
            "--ttl",
            "2h",
        ],
    ));
    assert!(
        created.contains("apps-1 — apps@1.0.0 to `model=tx7`: RUNNING"),
        "{created}"
    );
    assert!(created.contains("2 cars selected"), "{created}");
    assert!(created.contains("soak 600 s"), "{created}");

    let list = ok(deploy(&fleet, &["list"]));
    assert!(
        list.lines()
            .any(|l| l.starts_with("apps-1") && l.contains("running")),
        "{list}"
    );
    let status = ok(deploy(&fleet, &["status", "apps-1"]));
    assert!(
        status.contains("phase 1") && status.contains("phase 2"),
        "{status}"
    );

    let paused = ok(deploy(&fleet, &["pause", "apps-1"]));
    assert!(paused.contains(": PAUSED"), "{paused}");
    let again = deploy(&fleet, &["pause", "apps-1"]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("cannot be paused"),
        "{again:?}"
    );
    let resumed = ok(deploy(&fleet, &["resume", "apps-1"]));
    assert!(resumed.contains(": RUNNING"), "{resumed}");
    // A second deployment of the same cars is refused while this one runs.
    let overlap = deploy(
        &fleet,
        &[
            "create",
            "apps-1b",
            "--release",
            "apps@1.0.0",
            "--selector",
            "market=eu",
        ],
    );
    assert!(!overlap.status.success());
    let why = String::from_utf8_lossy(&overlap.stderr).into_owned();
    assert!(why.contains("apps-1 (2 cars: VIN-A, VIN-B)"), "{why}");
    let aborted = ok(deploy(&fleet, &["abort", "apps-1"]));
    assert!(aborted.contains(": ABORTED"), "{aborted}");

    let bad = deploy(
        &fleet,
        &[
            "create",
            "bad",
            "--release",
            "apps@1.0.0",
            "--selector",
            "model tx7",
        ],
    );
    assert!(!bad.status.success());
    let why = String::from_utf8_lossy(&bad.stderr).into_owned();
    assert!(
        why.contains("at character 6") && why.contains("expected an operator"),
        "{why}"
    );
    let bad = deploy(
        &fleet,
        &["create", "bad", "--release", "apps@1.0.0", "--ttl", "1w"],
    );
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unit is s, m, h or d"));
}
