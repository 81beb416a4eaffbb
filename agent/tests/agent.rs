//! The real `cardeploy-agent` binary against a real twin: connect, take desired state, persist,
//! survive restarts of either side, stop cleanly on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Agent, Env, call, until};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_connects_applies_desired_state_and_persists_it() {
    let env = Env::new();
    let twin = env.twin().await;
    let config = env.car(&twin, "VIN-E2E").await;
    let agent = Agent::start(&config);
    until(&twin, "VIN-E2E", "the agent to connect", |v| {
        v["connected"] == true && v["reported"]["state"]["phase"] == "idle"
    })
    .await;

    env.desire(&twin, "VIN-E2E", "hello", "1.0.0", vec![]).await;
    until(&twin, "VIN-E2E", "the desired state to be applied", |v| {
        v["reported"]["state"]["phase"] == "applied"
            && v["reported"]["state"]["release"] == "hello@1.0.0"
    })
    .await;
    let state: Value = serde_json::from_slice(&std::fs::read(env.state_file()).unwrap()).unwrap();
    assert_eq!(state["release"]["line"], "hello");
    assert_eq!(state["release"]["version"], "1.0.0");
    assert_eq!(state["deployment"]["state"], "done");
    assert_eq!(state["last_counter"], 1);
    assert_eq!(state["installed"]["hello"], "1.0.0");

    // The twin can ask the car directly.
    let (status, live) = call(&twin, "GET", "/api/v1/cars/VIN-E2E/inspect", None).await;
    assert_eq!(status, 200, "{live}");
    assert_eq!(live["reported"]["release"], "hello@1.0.0");
    assert!(
        live["desired"]["desired"]["signatures"].is_array(),
        "{live}"
    );

    let (took, ok) = agent.terminate();
    assert!(ok, "the agent exited with an error on SIGTERM");
    assert!(took < Duration::from_secs(3), "SIGTERM took {took:?}");
    until(&twin, "VIN-E2E", "the twin to see the car leave", |v| {
        v["connected"] == false
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_keeps_working_offline_and_comes_back_after_restarts_on_either_side() {
    let env = Env::new();
    let twin = env.twin().await;
    let config = env.car(&twin, "VIN-RST").await;
    let agent = Agent::start(&config);
    until(&twin, "VIN-RST", "the agent to connect", |v| {
        v["connected"] == true
    })
    .await;
    env.desire(&twin, "VIN-RST", "a", "1.0.0", vec![]).await;
    until(&twin, "VIN-RST", "a@1.0.0", |v| {
        v["reported"]["state"]["release"] == "a@1.0.0"
    })
    .await;

    // The twin goes away; the agent stays up and keeps retrying.
    twin.stop().await.unwrap();
    // Observed, not assumed: the agent knocks on the twin's port again and again.
    {
        let port = tokio::net::TcpListener::bind(("127.0.0.1", env.cars_port))
            .await
            .unwrap();
        for attempt in 1..=2 {
            let knock = tokio::time::timeout(Duration::from_secs(60), port.accept()).await;
            assert!(
                matches!(knock, Ok(Ok(_))),
                "no reconnect attempt {attempt} within a minute"
            );
        }
    }
    let mut agent = agent;
    assert!(
        agent.0.try_wait().unwrap().is_none(),
        "the agent died while the twin was away"
    );

    // While the car is offline the operator moves on; the car gets it when it is back.
    let twin = env.twin().await;
    env.desire(&twin, "VIN-RST", "a", "2.0.0", vec![]).await;
    until(
        &twin,
        "VIN-RST",
        "the agent to reconnect and apply a@2.0.0",
        |v| v["connected"] == true && v["reported"]["state"]["release"] == "a@2.0.0",
    )
    .await;

    // An agent restart keeps what it accepted and does not apply it twice.
    let epoch_before: Value =
        serde_json::from_slice(&std::fs::read(env.state_file()).unwrap()).unwrap();
    let (_, ok) = agent.terminate();
    assert!(ok);
    let agent = Agent::start(&config);
    until(&twin, "VIN-RST", "the restarted agent", |v| {
        v["connected"] == true
    })
    .await;
    let state: Value = serde_json::from_slice(&std::fs::read(env.state_file()).unwrap()).unwrap();
    assert_eq!(state["last_counter"], 2);
    assert_eq!(state["installed"]["a"], "2.0.0");
    assert_eq!(state["epoch"], epoch_before["epoch"].as_u64().unwrap() + 1);
    let (_, events) = call(&twin, "GET", "/api/v1/cars/VIN-RST/events?limit=100", None).await;
    let applied_v2 = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "state" && e["message"].as_str().unwrap_or("").contains("a@2.0.0"))
        .count();
    assert_eq!(applied_v2, 1, "a@2.0.0 applied more than once: {events}");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_configuration_is_a_clear_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "car_id = \"../x\"\ntwin = \"h:1\"\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\nstate_dir = \"s\"\nroot = \"root.json\"\ncompatible = \"x\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cardeploy-agent"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid car id"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    std::fs::write(&config, "car_id = \"ok\"\ntwin = \"localhost:1\"\nca = \"missing.pem\"\ncert = \"b\"\nkey = \"c\"\nstate_dir = \"s\"\nroot = \"root.json\"\ncompatible = \"x\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cardeploy-agent"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("missing.pem"), "{stderr}");
}

/// The cross-built aarch64 agent (from `cargo xtask cross`) runs under qemu-user against a host
/// twin: connect, report, take a desired state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aarch64_agent_connects_and_reports_under_qemu_user() {
    let Some(binary) = std::env::var_os("CARDEPLOY_AARCH64_AGENT") else {
        cardeploy_testkit::cannot_run(
            "the_aarch64_agent_connects_and_reports_under_qemu_user",
            "CARDEPLOY_AARCH64_AGENT set to the cross-built aarch64 agent (cargo xtask test does)",
        );
        return;
    };
    let env = Env::new();
    let twin = env.twin().await;
    let config = env.car(&twin, "VIN-ARM64").await;
    // The runner of cross/config.toml (qemu-user), where its choices are explained.
    let qemu = cardeploy_testkit::cross::aarch64_runner(std::path::Path::new(&binary));
    let agent = Agent::start_with(qemu, &config);
    until(&twin, "VIN-ARM64", "the aarch64 agent to connect", |v| {
        v["connected"] == true && v["reported"]["state"]["phase"] == "idle"
    })
    .await;
    env.desire(&twin, "VIN-ARM64", "arm", "1.0.0", vec![]).await;
    until(
        &twin,
        "VIN-ARM64",
        "the aarch64 agent to apply arm@1.0.0",
        |v| v["reported"]["state"]["release"] == "arm@1.0.0",
    )
    .await;
    let (_, ok) = agent.terminate();
    assert!(ok, "the aarch64 agent failed on SIGTERM");
}
