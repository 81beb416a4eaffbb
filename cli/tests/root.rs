//! The CLI as a pipeline uses it: generate keys, create a root, rotate it — and the library reads
//! every file back the way a car will.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use cardeploy_release::TrustedRoot;
use cardeploy_release::now_secs as now;

fn cardeploy(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cardeploy"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "cardeploy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn keys_root_init_and_rotation_round_trip_through_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for name in [
        "root-1", "root-2", "root-3", "root-4", "release", "director",
    ] {
        let id = ok(cardeploy(d, &["keys", "gen", name]));
        assert_eq!(id.trim().len(), 64, "keys gen prints the key id");
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(d.join("root-1.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "private keys are 0600");
    let again = cardeploy(d, &["keys", "gen", "root-1"]);
    assert!(
        !again.status.success(),
        "an existing private key is never overwritten"
    );

    let roles = |keys: &[&str], threshold: &str| -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        for k in keys {
            a.extend(["--root-key".into(), format!("{k}.pub")]);
        }
        a.extend(
            [
                "--threshold",
                threshold,
                "--release-key",
                "release.pub",
                "--director-key",
                "director.pub",
            ]
            .map(String::from),
        );
        a
    };
    let mut init: Vec<String> = vec!["root".into(), "init".into()];
    init.extend(roles(&["root-1", "root-2", "root-3"], "2"));
    init.extend(
        [
            "--sign-with",
            "root-1.key",
            "--sign-with",
            "root-3.key",
            "--out",
            "root-v1.json",
        ]
        .map(String::from),
    );
    let said = ok(cardeploy(
        d,
        &init.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert!(said.contains("root version 1 valid"), "{said}");
    let v1 = TrustedRoot::pinned(&std::fs::read(d.join("root-v1.json")).unwrap()).unwrap();
    assert_eq!(v1.root().roles.root.threshold, 2);
    assert!(v1.fresh(now()).is_ok(), "a new root is valid for a while");

    // Rotate root-3 out and root-4 in. Signed by root-4 and root-1 only: one old key short.
    let mut rotate: Vec<String> = vec![
        "root".into(),
        "rotate".into(),
        "--current".into(),
        "root-v1.json".into(),
    ];
    rotate.extend(roles(&["root-1", "root-2", "root-4"], "2"));
    let mut short = rotate.clone();
    short.extend(
        [
            "--sign-with",
            "root-1.key",
            "--sign-with",
            "root-4.key",
            "--out",
            "root-v2.json",
        ]
        .map(String::from),
    );
    let out = cardeploy(d, &short.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not rotate") && err.contains("2 required"),
        "{err}"
    );
    assert!(
        !d.join("root-v2.json").exists(),
        "a root that does not verify is not left behind"
    );

    let mut full = rotate;
    full.extend(
        [
            "--sign-with",
            "root-1.key",
            "--sign-with",
            "root-2.key",
            "--out",
            "root-v2.json",
        ]
        .map(String::from),
    );
    ok(cardeploy(
        d,
        &full.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    let v2 = v1
        .rotate(&std::fs::read(d.join("root-v2.json")).unwrap())
        .unwrap();
    assert_eq!(v2.root().version, 2);
    let said = ok(cardeploy(
        d,
        &[
            "root",
            "verify",
            "root-v2.json",
            "--previous",
            "root-v1.json",
        ],
    ));
    assert!(said.contains("root version 2 valid"), "{said}");
}
