//! The fleet bootstrap the demo and the qemu suites use, with the real binaries: a car added by
//! it connects, and a release made by it is verified and applied by the real agent.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command};
use std::time::Duration;

use cardeploy_protocol::Phase;
use cardeploy_testkit::fleet::{CarOptions, Fleet, phase, release, stop};
use cardeploy_testkit::workspace_bin;

/// Kills the agent if the test fails before it is stopped.
struct Agent(Option<Child>);

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn a_bootstrapped_fleet_takes_a_car_and_a_release_end_to_end() {
    let bin = workspace_bin("cardeploy-agent")
        .parent()
        .unwrap()
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let fleet = Fleet::start(&bin, dir.path()).unwrap();
    let mut options = CarOptions::new("cardeploy-test", &format!("localhost:{}", fleet.cars_port));
    options.attrs.push("model=tx7".into());
    let car_dir = fleet.add_car("FLEET-1", &options).unwrap();
    let view = fleet.show("FLEET-1").unwrap();
    assert_eq!(view.attributes["model"], "tx7");
    assert!(!view.connected);

    let k8s = dir.path().join("k8s");
    std::fs::create_dir_all(&k8s).unwrap();
    std::fs::write(
        k8s.join("app.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: app}\n",
    )
    .unwrap();
    let digest = fleet
        .release(
            "app",
            "1.0.0",
            "cardeploy-test",
            &["--manifests", "k8s"],
            &[],
        )
        .unwrap();
    assert_eq!(digest.len(), 64, "release push prints the digest: {digest}");

    let mut agent = Agent(Some(
        Command::new(bin.join("cardeploy-agent"))
            .arg("--config")
            .arg(car_dir.join("agent.toml"))
            .stderr(std::fs::File::create(dir.path().join("agent.log")).unwrap())
            .spawn()
            .unwrap(),
    ));
    let within = Duration::from_secs(30);
    fleet
        .until("FLEET-1", "the car to connect", within, false, |v| {
            v.connected
        })
        .unwrap();
    fleet.set_desired("FLEET-1", &digest).unwrap();
    let view = fleet
        .until("FLEET-1", "app@1.0.0 applied", within, false, |v| {
            phase(v) == Some(Phase::Applied)
        })
        .unwrap();
    assert_eq!(release(&view), Some("app@1.0.0"));
    stop(agent.0.take().unwrap(), "cardeploy-agent").unwrap();
    fleet.stop().unwrap();
}
