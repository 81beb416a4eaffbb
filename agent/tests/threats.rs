//! Every threat of docs/release-format.md as a fixture under `tests/data/<threat>/` (made by
//! `crates/testkit/src/threats.rs`, `cargo xtask fixtures`), run through the checks the agent
//! itself runs, each ending in its exact error variant.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use cardeploy_agent::verify;
use cardeploy_chunks::ChunkIndex;
use cardeploy_chunks::transit::Frame;
use cardeploy_protocol::DesiredState;
use cardeploy_release::{
    CarContext, Envelope, InstalledOs, TrustedRoot, check_artifact, verify_release,
};
use serde_json::Value;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data")
}

/// The variant name of an error: its Debug form up to the first non-identifier character.
fn variant(e: &impl std::fmt::Debug) -> String {
    format!("{e:?}")
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

fn envelope(dir: &Path, file: &str) -> Envelope {
    Envelope::from_json(&std::fs::read(dir.join(file)).unwrap()).unwrap()
}

fn car(case: &Value) -> CarContext {
    let c = &case["car"];
    CarContext {
        car_id: c["car_id"].as_str().unwrap().into(),
        compatible: c["compatible"].as_str().unwrap().into(),
        now: c["now"].as_u64().unwrap(),
        counter: (!c["counter"].is_null())
            .then(|| serde_json::from_value(c["counter"].clone()).unwrap()),
        installed: c["installed"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(line, v)| (line.clone(), v.as_str().unwrap().parse().unwrap()))
            .collect(),
        os: (!c["os"].is_null()).then(|| InstalledOs {
            line: c["os"]["line"].as_str().unwrap().into(),
            version: c["os"]["version"].as_str().unwrap().parse().unwrap(),
        }),
        max_artifact_bytes: c["max_artifact_bytes"].as_u64().unwrap(),
    }
}

/// Rotations + M1–M6 + D1–D6: what the agent runs on every desired state.
fn check_message(dir: &Path, car: &CarContext) -> Result<(), String> {
    let root_bytes = std::fs::read(dir.join("root.json")).unwrap();
    let root = TrustedRoot::pinned(&root_bytes).map_err(|e| variant(&e))?;
    let message = DesiredState {
        desired: envelope(dir, "desired.json"),
        release: envelope(dir, "release.json"),
        // A rotation the message carries, taken before the rest is checked.
        roots: dir
            .join("rotation.json")
            .exists()
            .then(|| envelope(dir, "rotation.json"))
            .into_iter()
            .collect(),
        downgrade: dir
            .join("downgrade.json")
            .exists()
            .then(|| envelope(dir, "downgrade.json")),
    };
    verify::check(&root, &message, car).map_err(|e| variant(&e))?;
    Ok(())
}

/// R5–R6.
fn check_rotation(dir: &Path) -> Result<(), String> {
    let root_bytes = std::fs::read(dir.join("root.json")).unwrap();
    let root = TrustedRoot::pinned(&root_bytes).map_err(|e| variant(&e))?;
    let next = std::fs::read(dir.join("rotation.json")).unwrap();
    root.rotate(&next).map_err(|e| variant(&e))?;
    Ok(())
}

/// A1, as the agent's fetch runs it once the index arrives.
fn check_index(dir: &Path, car: &CarContext) -> Result<(), String> {
    let root = TrustedRoot::pinned(&std::fs::read(dir.join("root.json")).unwrap()).unwrap();
    let release = verify_release(&root, &envelope(dir, "release.json"), car.now, 1 << 30).unwrap();
    let artifact = &release.release.artifacts[0];
    let bytes = std::fs::read(dir.join("index.cdix")).unwrap();
    // The index is the one the release names (by digest): only its content disagrees.
    let index =
        ChunkIndex::decode_expecting(&bytes, &artifact.index.parse().unwrap(), 1 << 30).unwrap();
    check_artifact(artifact, index.size, &index.artifact.hex()).map_err(|e| variant(&e))
}

/// A transit frame for the index's first chunk, as the agent's fetch checks each one.
fn check_frame(dir: &Path) -> Result<(), String> {
    let bytes = std::fs::read(dir.join("index.cdix")).unwrap();
    let index = ChunkIndex::decode(&bytes, 1 << 30).unwrap();
    let frame =
        Frame::decode(&std::fs::read(dir.join("frame.bin")).unwrap()).map_err(|e| variant(&e))?;
    frame
        .expect(&index.chunks[0].id, index.chunks[0].len)
        .map_err(|e| variant(&e))
}

/// Run one case; `ok` or the error variant it ended in.
fn run(dir: &Path, case: &Value) -> String {
    let car = car(case);
    let result = match case["check"].as_str().unwrap() {
        "message" => check_message(dir, &car),
        "rotation" => check_rotation(dir),
        "index" => check_index(dir, &car),
        "frame" => check_frame(dir),
        other => panic!("{}: unknown check {other}", dir.display()),
    };
    result.err().unwrap_or_else(|| "ok".to_owned())
}

#[test]
fn every_threat_fixture_ends_in_its_exact_error_variant() {
    let mut seen = 0;
    let mut failures = Vec::new();
    let mut dirs: Vec<_> = std::fs::read_dir(data_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("case.json").exists())
        .collect();
    dirs.sort();
    for dir in dirs {
        let case: Value =
            serde_json::from_slice(&std::fs::read(dir.join("case.json")).unwrap()).unwrap();
        let expect = case["expect"].as_str().unwrap();
        let got = run(&dir, &case);
        if got != expect {
            failures.push(format!(
                "{}: expected {expect}, got {got} ({})",
                dir.display(),
                case["why"]
            ));
        }
        seen += 1;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Fourteen threats of the issue, plus their positive twins and a few more.
    assert!(seen >= 20, "only {seen} fixtures found under tests/data");
}

#[test]
fn the_fixtures_are_exactly_what_the_checked_in_generator_makes() {
    let fresh = tempfile::tempdir().unwrap();
    cardeploy_testkit::threats::generate(fresh.path()).unwrap();
    let mut compared = 0;
    for entry in walk(fresh.path()) {
        let relative = entry.strip_prefix(fresh.path()).unwrap();
        let checked_in = data_dir().join(relative);
        assert_eq!(
            std::fs::read(&entry).unwrap(),
            std::fs::read(&checked_in).unwrap_or_default(),
            "{} differs from the generator: run `cargo xtask fixtures` and commit",
            checked_in.display()
        );
        compared += 1;
    }
    assert_eq!(
        compared,
        walk(&data_dir()).len(),
        "tests/data holds files the generator does not make"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// The agent verifies and never signs: `cardeploy-release` is in its build without `sign`.
/// (`cargo build --workspace` unifies features across members, so product images build the
/// agent alone: `cargo build -p cardeploy-agent`, which is what this tree describes.)
#[test]
fn the_agent_never_compiles_signing_code() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "-p",
            "cardeploy-agent",
            "-e",
            "normal,features",
            "--prefix",
            "none",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).unwrap();
    assert!(
        tree.contains("cardeploy-release"),
        "the agent must depend on cardeploy-release:\n{tree}"
    );
    let signing: Vec<_> = tree
        .lines()
        .filter(|l| l.starts_with("cardeploy-release") && l.contains("feature \"sign\""))
        .collect();
    assert!(
        signing.is_empty(),
        "the agent's build enables signing: {signing:?}"
    );
}
