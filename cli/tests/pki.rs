//! `cardeploy pki`: the fleet CA and the twin's certificate, checked with openssl (a tool that is
//! not ours) rather than with the code that made them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn cardeploy(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_cardeploy"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cardeploy {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `openssl`'s output, or None (a loud skip by hand, a failure under CI) without openssl.
fn openssl(args: &[&str]) -> Option<(bool, String)> {
    match Command::new("openssl").args(args).output() {
        Ok(out) => Some((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )),
        Err(e) => {
            cardeploy_testkit::cannot_run(
                "the openssl check of the twin certificate",
                &format!("openssl (cargo xtask deps installs it): {e}"),
            );
            None
        }
    }
}

fn text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn a_new_twin_certificate_chains_to_the_same_ca_names_the_new_host_and_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let pki_s = pki.to_str().unwrap();
    cardeploy(&["pki", "init", "--dir", pki_s]);
    let (old_cert, old_key) = (text(&pki.join("twin.pem")), text(&pki.join("twin.key")));
    let ca_before = text(&pki.join("ca.pem"));

    let out = cardeploy(&[
        "pki",
        "twin",
        "--dir",
        pki_s,
        "--twin-name",
        "twin.fleet.example",
        "--twin-name",
        "10.1.2.3",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("restart the twin"));
    assert_eq!(text(&pki.join("ca.pem")), ca_before, "the CA stays");
    assert_ne!(text(&pki.join("twin.pem")), old_cert);
    assert_eq!(text(&pki.join("twin.pem.previous")), old_cert);
    assert_eq!(text(&pki.join("twin.key.previous")), old_key);
    let mode = std::fs::metadata(pki.join("twin.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the new key is private");

    let ca = pki.join("ca.pem");
    let cert = pki.join("twin.pem");
    let Some((ok, said)) = openssl(&[
        "verify",
        "-CAfile",
        ca.to_str().unwrap(),
        cert.to_str().unwrap(),
    ]) else {
        return;
    };
    assert!(ok, "{said}");
    let (_, names) = openssl(&[
        "x509",
        "-noout",
        "-ext",
        "subjectAltName",
        "-in",
        cert.to_str().unwrap(),
    ])
    .unwrap();
    assert!(
        names.contains("DNS:twin.fleet.example") && names.contains("IP Address:10.1.2.3"),
        "{names}"
    );
    assert!(
        !names.contains("localhost"),
        "only the names asked for: {names}"
    );
}

#[test]
fn without_the_ca_key_there_is_no_new_certificate_and_the_message_says_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cardeploy"))
        .args(["pki", "twin", "--dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ca.pem") || err.contains(dir.path().to_str().unwrap()),
        "{err}"
    );
    assert!(!dir.path().join("twin.pem").exists());
}
