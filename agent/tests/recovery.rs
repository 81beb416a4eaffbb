//! Trust that recovers, end to end with the real agent: a twin whose database was restored from
//! an older copy gets its cars to take the next desired state by itself, and a car whose counter
//! is out of reach takes desired states again once the director key is replaced in a new root
//! (docs/release-format.md, "Recovering counters").

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Agent, Env, call, until_within};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

fn state(view: &Value) -> &Value {
    &view["reported"]["state"]
}

/// Wait until the car runs `release` with `counter` accepted.
async fn runs(twin: &cardeploy_twin::Running, car: &str, release: &str, counter: u64) -> Value {
    until_within(
        twin,
        car,
        WAIT,
        &format!("{release} at counter {counter}"),
        |v| {
            state(v)["phase"] == "applied"
                && state(v)["release"] == release
                && state(v)["desired_counter"] == counter
        },
    )
    .await
}

/// The twin's database files (SQLite with its write-ahead log), copied from `from` to `to`.
fn copy_database(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for name in ["twin.db", "twin.db-wal", "twin.db-shm"] {
        let source = from.join(name);
        let target = to.join(name);
        if source.exists() {
            // A new file renamed into place, as a restore from a backup makes it: the stopped
            // twin's last SQLite connection may still be closing on its own thread (a pool's
            // close returns once its connections are released, not once SQLite let go of the
            // file), and a final checkpoint into the old file must not land in the restored one.
            let staged = to.join(format!("{name}.restoring"));
            std::fs::copy(&source, &staged).unwrap();
            std::fs::rename(&staged, &target).unwrap();
        } else {
            let _ = std::fs::remove_file(&target);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twin_restored_from_an_older_database_gets_its_cars_to_take_the_next_desired_state() {
    let env = Env::new();
    let twin = env.twin().await;
    let config = env.car(&twin, "VIN-RESTORED").await;
    let _agent = Agent::start(&config);
    env.desire(&twin, "VIN-RESTORED", "app", "1.0.0", vec![])
        .await;
    runs(&twin, "VIN-RESTORED", "app@1.0.0", 1).await;

    // The backup, taken with the twin stopped.
    twin.stop().await.unwrap();
    let backup = tempfile::tempdir().unwrap();
    copy_database(env.data.path(), backup.path());
    let twin = env.twin().await;
    env.desire(&twin, "VIN-RESTORED", "app", "2.0.0", vec![])
        .await;
    env.desire(&twin, "VIN-RESTORED", "app", "3.0.0", vec![])
        .await;
    runs(&twin, "VIN-RESTORED", "app@3.0.0", 3).await;

    // The database is lost and restored from the backup: its counter for the car is 1, the car
    // has accepted 3.
    twin.stop().await.unwrap();
    copy_database(backup.path(), env.data.path());
    let twin = env.twin().await;
    // The car says hello with counter 3; the twin signs its stored desired state again above it
    // (the car refuses that one as a downgrade: app@1 after app@3, and says so).
    let view = until_within(
        &twin,
        "VIN-RESTORED",
        WAIT,
        "the stored desired state signed above the car's counter",
        |v| v["desired"]["counter"] == 4,
    )
    .await;
    assert_eq!(view["desired"]["version"], "1.0.0", "{view}");
    // Nobody steps in: the next desired state an operator sets is taken.
    let answer = env
        .desire(&twin, "VIN-RESTORED", "app", "4.0.0", vec![])
        .await;
    assert_eq!(answer["counter"], 5, "{answer}");
    runs(&twin, "VIN-RESTORED", "app@4.0.0", 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_car_whose_counter_is_out_of_reach_takes_desired_states_again_after_the_director_key_is_replaced()
 {
    let env = Env::new();
    let twin = env.twin().await;
    let config = env.car(&twin, "VIN-FROZEN").await;
    let agent = Agent::start(&config);
    env.desire(&twin, "VIN-FROZEN", "app", "1.0.0", vec![])
        .await;
    runs(&twin, "VIN-FROZEN", "app@1.0.0", 1).await;

    // A leaked director key pushed the car's counter to the top, as an agent from before
    // counters were bounded would have taken it: every counter after is a replay.
    drop(agent);
    let path = env.state_file();
    let mut saved: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    saved["last_counter"] = json!(u64::MAX);
    saved["reported"]["desired_counter"] = json!(u64::MAX);
    std::fs::write(&path, serde_json::to_vec(&saved).unwrap()).unwrap();
    let agent = Agent::start(&config);
    until_within(
        &twin,
        "VIN-FROZEN",
        WAIT,
        "the car's report of its counter",
        |v| state(v)["desired_counter"] == u64::MAX,
    )
    .await;
    // The twin cannot sign above it, and says what to do.
    let signer = env.signer();
    let release = signer.manifest("app", "2.0.0", vec![]);
    let digest = signer
        .publish(twin.api_addr, &twin.operator_token, &release)
        .await;
    let (status, answer) = call(
        &twin,
        "PUT",
        "/api/v1/cars/VIN-FROZEN/desired",
        Some(json!({ "release": digest })),
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("rotate the director key"),
        "{answer}"
    );

    // The recovery: the twin gets a new director key, a new root names it.
    twin.stop().await.unwrap();
    let aside = tempfile::tempdir().unwrap();
    for name in ["director.key", "director.pub"] {
        std::fs::rename(env.data.path().join(name), aside.path().join(name)).unwrap();
    }
    let twin = env.twin().await;
    let director: cardeploy_release::PublicKey =
        serde_json::from_slice(&std::fs::read(env.data.path().join("director.pub")).unwrap())
            .unwrap();
    let root = serde_json::from_slice::<Value>(&signer.rotation(2, &director)).unwrap();
    let (status, answer) = call(&twin, "POST", "/api/v1/roots", Some(root)).await;
    assert_eq!(status, 200, "{answer}");
    // Its stored desired state, signed again by the new key in the fresh scope, is taken with
    // the new root: counter 1 again.
    runs(&twin, "VIN-FROZEN", "app@1.0.0", 1).await;
    let (status, answer) = call(
        &twin,
        "PUT",
        "/api/v1/cars/VIN-FROZEN/desired",
        Some(json!({ "release": digest })),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    runs(&twin, "VIN-FROZEN", "app@2.0.0", 2).await;
    let saved: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(saved["last_counter"], 2, "{saved}");
    drop(agent);
}
