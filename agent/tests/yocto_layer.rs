//! The Yocto layer's agent files against the agent itself: meta-cardeploy renders
//! `agent.toml.in` with the `??=` defaults of the cardeploy-conf recipe, and the unit starts the
//! agent with that file and the car's `car.toml` layered over it. If the template or the unit
//! drift from what the agent accepts, cars built from the layer would not start; this catches it
//! here instead of on a flashed ECU.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cardeploy_agent::Config;

fn layer() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../meta-cardeploy")
}

/// `NAME ??= "value"` lines of a recipe.
fn defaults(recipe: &str) -> HashMap<String, String> {
    recipe
        .lines()
        .filter_map(|l| l.split_once(" ??= "))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
        .collect()
}

/// What the recipe's do_install does with a space-separated list: a TOML string array body.
fn toml_list(items: &str) -> String {
    items
        .split_whitespace()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn the_images_agent_toml_with_a_provisioned_car_toml_is_a_valid_configuration() {
    let conf = layer().join("recipes-cardeploy/cardeploy-conf");
    let recipe = std::fs::read_to_string(conf.join("cardeploy-conf.bb")).unwrap();
    let template = std::fs::read_to_string(conf.join("files/agent.toml.in")).unwrap();
    let mut vars = defaults(&recipe);
    // Layer-wide defaults (the registry's address, shared with cardeploy-k3s-conf).
    vars.extend(defaults(
        &std::fs::read_to_string(layer().join("conf/layer.conf")).unwrap(),
    ));
    let var = |name: &str| {
        vars.get(name)
            .unwrap_or_else(|| panic!("cardeploy-conf.bb has no `{name} ??=` default"))
            .clone()
    };
    let rendered = template
        .replace("@TWIN@", &var("CARDEPLOY_TWIN"))
        .replace("@STATE_DIR@", &var("CARDEPLOY_STATE_DIR"))
        .replace("@SEEDS@", &toml_list(&var("CARDEPLOY_SEEDS")))
        .replace("@REBOOT@", &var("CARDEPLOY_REBOOT"))
        .replace("@HEALTH_DEADLINE@", &var("CARDEPLOY_HEALTH_DEADLINE"))
        .replace("@HEALTH_UNITS@", &toml_list(&var("CARDEPLOY_HEALTH_UNITS")))
        .replace("@REGISTRY@", &var("CARDEPLOY_REGISTRY"));
    assert!(
        !rendered.contains('@'),
        "a placeholder the recipe does not fill: {rendered}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let (etc, data) = (tmp.path().join("etc"), tmp.path().join("data"));
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&data).unwrap();
    let image = etc.join("agent.toml");
    std::fs::write(&image, rendered).unwrap();
    // The car.toml of meta-cardeploy/README.md, step 8.
    let car = data.join("car.toml");
    std::fs::write(
        &car,
        "car_id = \"VIN0001\"\ncert = \"car.pem\"\nkey = \"car.key\"\n",
    )
    .unwrap();

    let config = Config::from_files(&[image, car]).unwrap();
    assert_eq!(config.car_id.as_str(), "VIN0001");
    assert_eq!(config.twin, var("CARDEPLOY_TWIN"));
    assert_eq!(config.cert, data.join("car.pem"));
    assert_eq!(config.ca, PathBuf::from("/etc/cardeploy/fleet-ca.pem"));
    assert_eq!(config.root, PathBuf::from("/etc/cardeploy/root.json"));
    assert_eq!(config.seeds.len(), 2);
    let os = config.os.expect("the image's agent.toml has [os]");
    assert_eq!(os.health.units, vec!["k3s.service".to_owned()]);
    assert_eq!(
        os.health.deadline_secs.to_string(),
        var("CARDEPLOY_HEALTH_DEADLINE")
    );
    // The agent's registry listens where k3s's mirror points.
    let containers = config
        .containers
        .expect("the image's agent.toml has [containers]");
    assert_eq!(containers.registry.to_string(), var("CARDEPLOY_REGISTRY"));
    // Workloads go to the image's k3s, through the kubeconfig k3s writes.
    assert_eq!(
        containers.kubeconfig.as_deref(),
        Some(std::path::Path::new("/etc/rancher/k3s/k3s.yaml"))
    );
    let mirror = std::fs::read_to_string(
        layer().join("recipes-cardeploy/cardeploy-k3s-conf/files/registries.yaml"),
    )
    .unwrap();
    assert!(
        mirror.contains("http://@REGISTRY@"),
        "registries.yaml mirrors to the same variable: {mirror}"
    );
}

#[test]
fn the_units_command_line_is_one_the_agent_accepts() {
    let unit = std::fs::read_to_string(
        layer().join("recipes-cardeploy/cardeploy/files/cardeploy-agent.service"),
    )
    .unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("the unit has ExecStart");
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some("/usr/bin/cardeploy-agent"));
    let args: Vec<&str> = words.collect();
    assert_eq!(
        args,
        [
            "--config",
            "/etc/cardeploy/agent.toml",
            "--config",
            "/data/cardeploy/car.toml"
        ],
        "the unit's arguments changed: check them against the agent's --help and update this test"
    );
    // The real binary takes the flag twice; missing files are its error, not the parser's.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cardeploy-agent"))
        .args([
            "--config",
            "/nonexistent/agent.toml",
            "--config",
            "/nonexistent/car.toml",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("/nonexistent/agent.toml"),
        "the agent should name the missing file: {stderr}"
    );
    assert!(
        !stderr.contains("cannot be used multiple times"),
        "{stderr}"
    );
    for key in [
        "Type=notify",
        "WatchdogSec=",
        "ConditionPathExists=/data/cardeploy/car.toml",
    ] {
        assert!(unit.contains(key), "the unit lost {key}");
    }
}
