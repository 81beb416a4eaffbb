//! The README's "By hand" steps, run as a new user would run them: the fenced block is read out
//! of README.md at test time, so the test breaks when the README changes. Only what must differ
//! on a shared test machine is substituted (where the binaries are, free ports instead of 7443
//! and 7080, a temp dir as the working directory), plus waiting where a person would look first
//! (the twin up before the first API call, the car connected before `car inspect`). Every
//! substitution must find its place in the README, else the test fails and says which. The
//! twin, the agent and the CLI are the real binaries.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The lines of the ```sh block under "## By hand", continuation lines joined.
fn by_hand_steps(readme: &str) -> Vec<String> {
    let section = readme
        .split("\n## By hand\n")
        .nth(1)
        .expect("README.md has no \"## By hand\" section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("the By hand section has no ```sh block");
    let mut steps = Vec::new();
    let mut current = String::new();
    for line in block.lines() {
        match line.strip_suffix('\\') {
            Some(head) => current.push_str(head),
            None => {
                current.push_str(line);
                steps.push(std::mem::take(&mut current));
            }
        }
    }
    steps
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The directory of the binaries cargo built for this test (`target/debug`).
fn bin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cardeploy"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The README's steps as a script for this machine.
fn script(steps: &[String], bin: &Path, cars: u16, api: u16) -> String {
    let mut out = vec![
        "set -eu".to_owned(),
        // Whatever happens, the twin and the agent the steps started in the background go.
        "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT".to_owned(),
        format!("export CARDEPLOY_API=http://127.0.0.1:{api}"),
    ];
    let mut found = [false; 5];
    for step in steps {
        let trimmed = step.trim();
        if trimmed == "cargo build" {
            // The test runs the binaries cargo built for it.
            found[0] = true;
            continue;
        }
        let mut line = step.replace("target/debug/", &format!("{}/", bin.display()));
        if line.contains("cardeploy-twin serve") {
            found[1] = true;
            let at = line.find(" &").expect("the twin starts in the background");
            line.insert_str(
                at,
                &format!(" --cars-listen 127.0.0.1:{cars} --api-listen 127.0.0.1:{api}"),
            );
            out.push(line);
            // A person types the next command after the twin has printed that it listens.
            out.push(format!(
                "i=0; until [ -s data/operator.token ] && (exec 3<>/dev/tcp/127.0.0.1/{api}) 2>/dev/null; \
                 do i=$((i+1)); [ $i -lt 300 ] || {{ echo 'the twin did not start' >&2; exit 1; }}; sleep 0.1; done"
            ));
            continue;
        }
        if trimmed.starts_with("$cardeploy car add ") {
            found[2] = true;
            let at = line.find(" --").expect("car add has options");
            line.insert_str(at, &format!(" --twin localhost:{cars}"));
        }
        if trimmed.starts_with("$cardeploy car inspect") {
            // `car inspect` asks the car live: a person checks `car list` first.
            found[3] = true;
            out.push(
                // grep reads to the end (no -q): the CLI never writes into a closed pipe.
                "i=0; until $cardeploy car list --json | grep '\"connected\": true' >/dev/null; \
                 do i=$((i+1)); [ $i -lt 300 ] || { echo 'the car did not connect' >&2; exit 1; }; sleep 0.1; done"
                    .to_owned(),
            );
        }
        if line.contains("cardeploy-agent --config") {
            found[4] = true;
        }
        out.push(line);
    }
    let names = [
        "`cargo build`",
        "the twin started",
        "`car add`",
        "`car inspect`",
        "the agent started",
    ];
    for (found, name) in found.iter().zip(names) {
        assert!(found, "the README's By hand steps no longer have {name}");
    }
    out.join("\n") + "\n"
}

/// What `release create --os rootfs.raucb --image oci/app --manifests k8s/` reads: a squashfs
/// with a RAUC manifest (its `compatible` is read from there), an OCI image layout, manifests.
fn release_inputs(dir: &Path) -> Result<(), String> {
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(
        bundle.join("manifest.raucm"),
        "[update]\ncompatible=cardeploy-qemuarm64\nversion=1.0.0\n\n[image.rootfs]\nfilename=rootfs.img\n",
    )
    .unwrap();
    std::fs::write(bundle.join("rootfs.img"), vec![7u8; 64 * 1024]).unwrap();
    let made = Command::new("mksquashfs")
        .arg(&bundle)
        .arg(dir.join("rootfs.raucb"))
        .args(["-quiet", "-noappend", "-all-root"])
        .output();
    match made {
        Ok(out) if out.status.success() => {}
        Ok(out) => return Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        Err(e) => return Err(format!("mksquashfs (package squashfs-tools): {e}")),
    }
    // An arm64 image of one plain tar layer, as `skopeo copy ... oci:oci/app` would leave it.
    let layout = cardeploy_testkit::oci::Layout::new(&dir.join("oci/app"));
    let image = layout.image(
        "arm64",
        &[cardeploy_testkit::oci::tar(&[("app/run", b"#!/bin/sh\n")])],
    );
    layout.list(&[(&image.manifest, "1.0.0")]);
    std::fs::create_dir_all(dir.join("k8s")).unwrap();
    std::fs::write(
        dir.join("k8s/app.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: app\nspec:\n  containers:\n  - name: app\n    image: app:1.0.0\n",
    )
    .unwrap();
    Ok(())
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn the_readme_by_hand_steps_work_as_written() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    if let Err(why) = release_inputs(dir.path()) {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "cannot make the README's release inputs: {why}"
        );
        println!("SKIPPED: cannot make the README's release inputs: {why}");
        return;
    }
    let bin = bin_dir();
    for name in ["cardeploy-twin", "cardeploy-agent"] {
        assert!(
            bin.join(name).exists(),
            "{} is missing: build it first (`cargo build -p {name}`)",
            bin.join(name).display()
        );
    }
    let script = script(&by_hand_steps(&readme), &bin, free_port(), free_port());
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .env_remove("CARDEPLOY_TOKEN")
        .env_remove("CARDEPLOY_TOKEN_FILE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the By hand steps failed ({}):\n{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    let d = dir.path();
    assert_eq!(mode(&d.join("keys")), 0o700, "keys/ holds private keys");
    assert_eq!(mode(&d.join("keys/root-1.key")), 0o600);
    for file in [
        "root.json",
        "cars/VIN0001/agent.toml",
        "cars/VIN0001-new/car.pem",
        "rel-1.0.0/release.signed.json",
    ] {
        assert!(d.join(file).is_file(), "{file} was not written");
    }
    assert!(
        stdout.contains("VIN0001"),
        "`car list` shows the car:\n{stdout}"
    );
    assert!(
        stdout.contains("ecu-1 — ecu@1.0.0 to `model=tx7,!test-fleet`"),
        "`deploy create` and `deploy status` show the deployment:\n{stdout}"
    );
}

#[test]
fn keys_gen_makes_its_directory_private_and_says_a_failure_once() {
    let dir = tempfile::tempdir().unwrap();
    let cardeploy = env!("CARGO_BIN_EXE_cardeploy");
    let out = Command::new(cardeploy)
        .args(["keys", "gen", "deep/er/keys/root-1"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(mode(&dir.path().join("deep/er/keys")), 0o700);

    // A directory that cannot be made (a file is in the way): the OS error once, not twice.
    std::fs::write(dir.path().join("file"), b"").unwrap();
    let out = Command::new(cardeploy)
        .args(["keys", "gen", "file/root-1"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("file"), "{stderr}");
    assert_eq!(
        stderr.matches("Not a directory").count() + stderr.matches("File exists").count(),
        1,
        "each cause once: {stderr}"
    );
}
