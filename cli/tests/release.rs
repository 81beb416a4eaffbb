//! `cardeploy release` as a pipeline uses it: create a release from a fake RAUC bundle, OCI image
//! layouts and Kubernetes manifests, sign it, verify it, inspect it — and read every file back
//! with the library the way the twin and the cars will. Pushing to a real twin is tested with the
//! twin; here only what `release push` checks before it contacts one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::thread::JoinHandle;
use std::time::Duration;

use cardeploy_release::now_secs as now;
use cardeploy_release::{
    ArtifactKind, Envelope, PublicKey, RELEASE_TYPE, Release, TrustedRoot, sha256_hex,
    verify_release,
};
use serde_json::json;

/// An address nothing listens on: anything that reaches the network fails with "cannot reach".
const NO_TWIN: &str = "http://127.0.0.1:9";

fn cardeploy(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cardeploy"))
        .args(args)
        .current_dir(dir)
        .env_remove("CARDEPLOY_API")
        .env_remove("CARDEPLOY_TOKEN")
        .env_remove("CARDEPLOY_TOKEN_FILE")
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

/// The command failed; its stderr.
fn fails(out: Output) -> String {
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        !out.status.success(),
        "cardeploy succeeded but should not have: {}{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    stderr
}

/// Deterministic filler, different per seed, that does not compress to nothing.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect()
}

/// Write a blob under its sha256 and return its descriptor.
fn blob(layout: &Path, media_type: &str, data: &[u8]) -> serde_json::Value {
    let hex = sha256_hex(data);
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(&hex), data).unwrap();
    json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": data.len()})
}

/// How a fixture layer is packed in its layout.
#[derive(Clone, Copy)]
enum Pack {
    Tar,
    Gzip,
    Zstd,
}

/// An image manifest over `layers` (raw bytes, packed as given), with a config whose diff ids
/// are the raw layers' digests, as a builder writes them.
fn image_manifest(layout: &Path, arch: &str, layers: &[(&[u8], Pack)]) -> Vec<u8> {
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|(l, _)| format!("sha256:{}", sha256_hex(l)))
        .collect();
    let config = json!({"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}});
    let config = blob(
        layout,
        "application/vnd.oci.image.config.v1+json",
        config.to_string().as_bytes(),
    );
    let layers: Vec<_> = layers
        .iter()
        .map(|(l, pack)| match pack {
            Pack::Tar => blob(layout, "application/vnd.oci.image.layer.v1.tar", l),
            Pack::Gzip => {
                let mut gz =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                gz.write_all(l).unwrap();
                blob(
                    layout,
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                    &gz.finish().unwrap(),
                )
            }
            Pack::Zstd => blob(
                layout,
                "application/vnd.oci.image.layer.v1.tar+zstd",
                &zstd::encode_all(*l, 3).unwrap(),
            ),
        })
        .collect();
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": layers,
    }))
    .unwrap()
}

fn layout_files(layout: &Path, top: serde_json::Value) {
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion": "1.0.0"}"#,
    )
    .unwrap();
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [top]})).unwrap(),
    )
    .unwrap();
}

/// A fleet's keys and root, a fake bundle, two OCI layouts and a manifests directory:
/// - `oci/app`: one manifest with layers L1 (plain tar), L2 (gzip) and L1 again (a blob listed
///   twice ships once);
/// - `oci/tools`: what `docker buildx` writes, an image index holding the image manifest (layers
///   L1, shared with `app`, and L3 as zstd) and an attestation manifest, which is not shipped;
/// - `k8s/`: app.yaml (a Deployment running `app`) and db.yml (a StatefulSet running
///   `registry.example.com/tools:1`) become workloads, README.md is not a manifest.
struct Fleet {
    dir: tempfile::TempDir,
    release_key_id: String,
}

impl Fleet {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut release_key_id = String::new();
        for name in ["root-1", "release", "director", "other"] {
            let id = ok(cardeploy(d, &["keys", "gen", name]));
            if name == "release" {
                release_key_id = id.trim().to_owned();
            }
        }
        ok(cardeploy(
            d,
            &[
                "root",
                "init",
                "--root-key",
                "root-1.pub",
                "--release-key",
                "release.pub",
                "--director-key",
                "director.pub",
                "--sign-with",
                "root-1.key",
                "--out",
                "root.json",
            ],
        ));
        std::fs::write(d.join("rootfs.raucb"), bytes(1, 200_000)).unwrap();

        let (l1, l2, l3) = (bytes(2, 150_000), bytes(3, 40_000), bytes(4, 10_000));
        let app = d.join("oci/app");
        let manifest = image_manifest(
            &app,
            "arm64",
            &[(&l1, Pack::Tar), (&l2, Pack::Gzip), (&l1, Pack::Tar)],
        );
        let top = blob(
            &app,
            "application/vnd.oci.image.manifest.v1+json",
            &manifest,
        );
        layout_files(&app, top);

        let tools = d.join("oci/tools");
        let manifest = image_manifest(&tools, "arm64", &[(&l1, Pack::Tar), (&l3, Pack::Zstd)]);
        let image = blob(
            &tools,
            "application/vnd.oci.image.manifest.v1+json",
            &manifest,
        );
        let attestation = json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", sha256_hex(b"not shipped")),
            "size": 11,
            "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
        });
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [image, attestation],
        }))
        .unwrap();
        let top = blob(&tools, "application/vnd.oci.image.index.v1+json", &index);
        layout_files(&tools, top);

        std::fs::create_dir_all(d.join("k8s")).unwrap();
        std::fs::write(
            d.join("k8s/app.yaml"),
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: app}\nspec:\n  template:\n    spec:\n      containers:\n      - {name: main, image: app}\n",
        )
        .unwrap();
        std::fs::write(
            d.join("k8s/db.yml"),
            "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: db}\nspec:\n  template:\n    spec:\n      containers:\n      - {name: db, image: 'registry.example.com/tools:1'}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: db}\n",
        )
        .unwrap();
        std::fs::write(d.join("k8s/README.md"), "not a manifest\n").unwrap();
        Self {
            dir,
            release_key_id,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn create(&self) -> Output {
        cardeploy(
            self.path(),
            &[
                "release",
                "create",
                "--line",
                "ecu-main",
                "--version",
                "1.5.0",
                "--compatible",
                "cardeploy-qemuarm64",
                "--os",
                "rootfs.raucb",
                "--image",
                "oci/app",
                "--image",
                "oci/tools",
                "--manifests",
                "k8s",
                "--out",
                "rel",
            ],
        )
    }

    fn verify(&self) -> Output {
        cardeploy(
            self.path(),
            &["release", "verify", "rel", "--root", "root.json"],
        )
    }

    fn envelope(&self) -> Envelope {
        Envelope::from_json(&std::fs::read(self.path().join("rel/release.signed.json")).unwrap())
            .unwrap()
    }
}

#[test]
fn a_release_is_created_signed_verified_and_inspected() {
    let fleet = Fleet::new();
    let d = fleet.path();
    ok(fleet.create());

    let payload = std::fs::read(d.join("rel/release.json")).unwrap();
    let release: Release = serde_json::from_slice(&payload).unwrap();
    assert_eq!(
        (
            release.line.as_str(),
            release.version.as_str(),
            release.compatible.as_str()
        ),
        ("ecu-main", "1.5.0", "cardeploy-qemuarm64")
    );
    let kinds: Vec<(ArtifactKind, &str)> = release
        .artifacts
        .iter()
        .map(|a| (a.kind, a.name.as_str()))
        .collect();
    use ArtifactKind::*;
    assert_eq!(
        kinds,
        [
            (RaucBundle, "rootfs"),
            (OciConfig, "app.config"),
            (OciLayer, "app.layer-1"),
            (OciLayer, "app.layer-2"),
            (OciManifest, "app.manifest"),
            (OciConfig, "tools.config"),
            (OciLayer, "tools.layer-2"),
            (OciManifest, "tools.manifest"),
            (KubeManifest, "app"),
            (KubeManifest, "db"),
        ],
        "L1 ships once although listed three times; the attestation and the index do not ship"
    );
    let sources: std::collections::BTreeMap<String, std::path::PathBuf> =
        serde_json::from_slice(&std::fs::read(d.join("rel/sources.json")).unwrap()).unwrap();
    for a in &release.artifacts {
        let source = &sources[&a.name];
        assert!(source.is_absolute(), "{}", source.display());
        let data = std::fs::read(source).unwrap();
        assert_eq!(a.digest, sha256_hex(&data), "{}", a.name);
        assert_eq!(a.size, data.len() as u64);
        let index = std::fs::read(d.join("rel/indexes").join(&a.index)).unwrap();
        assert_eq!(
            sha256_hex(&index),
            a.index,
            "the index file is named by its id"
        );
    }
    // Layers travel uncompressed: each is the raw layer, named by its diff id, and the
    // rewritten manifests say so.
    let digest_of = |name: &str| {
        release
            .artifacts
            .iter()
            .find(|a| a.name == name)
            .unwrap()
            .digest
            .clone()
    };
    for (name, raw) in [
        ("app.layer-1", bytes(2, 150_000)),
        ("app.layer-2", bytes(3, 40_000)),
        ("tools.layer-2", bytes(4, 10_000)),
    ] {
        assert_eq!(digest_of(name), sha256_hex(&raw), "{name}");
        assert_eq!(std::fs::read(&sources[name]).unwrap(), raw, "{name}");
    }
    for image in ["app", "tools"] {
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&sources[&format!("{image}.manifest")]).unwrap())
                .unwrap();
        assert_eq!(
            manifest["mediaType"],
            "application/vnd.oci.image.manifest.v1+json"
        );
        for layer in manifest["layers"].as_array().unwrap() {
            assert_eq!(
                layer["mediaType"], "application/vnd.oci.image.layer.v1.tar",
                "{image}"
            );
        }
    }
    let images: Vec<(&str, &str)> = release
        .images
        .iter()
        .map(|i| (i.name.as_str(), i.manifest.as_str()))
        .collect();
    let (app_manifest, tools_manifest) = (digest_of("app.manifest"), digest_of("tools.manifest"));
    assert_eq!(
        images,
        [
            ("app", app_manifest.as_str()),
            ("tools", tools_manifest.as_str())
        ]
    );
    // Workloads are JSON, their images the car's registry by digest.
    let workloads: Vec<(&str, &str)> = release
        .workloads
        .iter()
        .map(|w| (w.name.as_str(), w.digest.as_str()))
        .collect();
    let (app, db) = (digest_of("app"), digest_of("db"));
    assert_eq!(workloads, [("app", app.as_str()), ("db", db.as_str())]);
    let app: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&sources["app"]).unwrap()).unwrap();
    assert_eq!(
        app[0]["spec"]["template"]["spec"]["containers"][0]["image"],
        format!("registry.cardeploy.local/app@sha256:{app_manifest}")
    );
    let db: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&sources["db"]).unwrap()).unwrap();
    assert_eq!(db.as_array().unwrap().len(), 2, "both documents of db.yml");
    assert_eq!(
        db[0]["spec"]["template"]["spec"]["containers"][0]["image"],
        format!("registry.cardeploy.local/tools@sha256:{tools_manifest}")
    );

    ok(cardeploy(
        d,
        &["release", "sign", "rel", "--key", "release.key"],
    ));
    let envelope = fleet.envelope();
    assert_eq!(envelope.payload_type, RELEASE_TYPE);
    assert_eq!(
        envelope.payload, payload,
        "release.json is signed byte for byte"
    );

    let said = ok(fleet.verify());
    let digest = sha256_hex(&payload);
    assert!(
        said.contains("release verified under root version 1"),
        "{said}"
    );
    assert!(said.contains(&digest), "{said}");
    assert!(said.contains(&fleet.release_key_id), "{said}");

    // What the twin will do with it.
    let root = TrustedRoot::pinned(&std::fs::read(d.join("root.json")).unwrap()).unwrap();
    let checked = verify_release(&root, &envelope, now(), 16 << 30).unwrap();
    assert_eq!(checked.digest, digest);
    assert_eq!(checked.release, release);

    let shown = ok(cardeploy(
        d,
        &["release", "inspect", "rel/release.signed.json"],
    ));
    assert!(shown.contains("NOT verified"), "{shown}");
    assert!(shown.contains(&fleet.release_key_id), "{shown}");
    for a in &release.artifacts {
        assert!(shown.contains(&a.name), "{shown}");
    }
    assert!(
        shown.contains("rauc-bundle") && shown.contains("kube-manifest"),
        "{shown}"
    );
    let json = cardeploy(d, &["release", "inspect", "rel", "--json"]);
    assert!(String::from_utf8_lossy(&json.stderr).contains("NOT verified"));
    assert_eq!(
        ok(json).as_bytes(),
        &payload[..],
        "--json prints the signed bytes"
    );
}

#[test]
fn a_tampered_payload_does_not_verify() {
    let fleet = Fleet::new();
    let d = fleet.path();
    ok(fleet.create());
    ok(cardeploy(
        d,
        &["release", "sign", "rel", "--key", "release.key"],
    ));
    ok(fleet.verify());

    let mut envelope = fleet.envelope();
    let text = String::from_utf8(envelope.payload.clone()).unwrap();
    envelope.payload = text.replace("1.5.0", "9.5.0").into_bytes();
    std::fs::write(d.join("rel/release.signed.json"), envelope.to_json()).unwrap();

    let err = fails(fleet.verify());
    assert!(err.contains("does not verify"), "{err}");
    assert!(
        err.contains("only 0 valid signature(s) from distinct trusted keys, 1 required"),
        "{err}"
    );
}

#[test]
fn a_release_signed_by_another_key_verifies_once_the_release_key_adds_its_signature() {
    let fleet = Fleet::new();
    let d = fleet.path();
    ok(fleet.create());
    ok(cardeploy(
        d,
        &["release", "sign", "rel", "--key", "other.key"],
    ));
    let err = fails(fleet.verify());
    assert!(
        err.contains(
            "only 0 valid signature(s) from distinct trusted keys, 1 required (signatures seen: 1)"
        ),
        "{err}"
    );
    let before = fleet.envelope();

    // A second holder signs the envelope itself.
    let said = ok(cardeploy(
        d,
        &[
            "release",
            "sign",
            "rel/release.signed.json",
            "--key",
            "release.key",
        ],
    ));
    assert!(said.contains("1 signature(s) added, 2 in all"), "{said}");
    let after = fleet.envelope();
    assert_eq!(
        after.payload, before.payload,
        "adding a signature keeps the payload"
    );
    assert_eq!(after.signatures[0], before.signatures[0]);
    assert_eq!(after.signatures.len(), 2);
    ok(fleet.verify());

    // Signing again with the same key adds nothing.
    let said = ok(cardeploy(
        d,
        &["release", "sign", "rel", "--key", "release.key"],
    ));
    assert!(said.contains("0 signature(s) added, 2 in all"), "{said}");
}

#[test]
fn a_source_changed_since_create_stops_push_before_the_twin_is_contacted() {
    let fleet = Fleet::new();
    let d = fleet.path();
    ok(fleet.create());
    ok(cardeploy(
        d,
        &["release", "sign", "rel", "--key", "release.key"],
    ));
    let push = ["release", "push", "rel", "--twin", NO_TWIN, "--token", "t"];

    // Unchanged, push gets as far as the network.
    let err = fails(cardeploy(d, &push));
    assert!(
        err.contains("cannot reach the twin at http://127.0.0.1:9"),
        "{err}"
    );

    // A layer the release took from the layout as it was (a plain tar is not copied).
    let l1 = sha256_hex(&bytes(2, 150_000));
    std::fs::write(d.join("oci/app/blobs/sha256").join(&l1), bytes(9, 150_000)).unwrap();
    let err = fails(cardeploy(d, &push));
    assert!(
        err.contains(&format!("{l1} changed since `release create`")),
        "{err}"
    );
    assert!(!err.contains("cannot reach"), "{err}");
}

#[test]
fn a_workload_naming_an_image_the_release_does_not_carry_is_refused_with_its_name() {
    let fleet = Fleet::new();
    let d = fleet.path();
    std::fs::write(
        d.join("k8s/radio.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: radio}\nspec:\n  containers:\n  - {name: tuner, image: 'acme/radio:2'}\n",
    )
    .unwrap();
    let err = fails(fleet.create());
    assert!(
        err.contains("workload `radio` (pod/radio, container `tuner`) names image `acme/radio:2`")
            && err.contains("--image acme/radio="),
        "{err}"
    );
    assert!(!d.join("rel/release.json").exists());
}

#[test]
fn an_oci_blob_that_does_not_hash_to_its_name_is_refused() {
    let fleet = Fleet::new();
    let d = fleet.path();
    let blobs = d.join("oci/app/blobs/sha256");
    let l1 = sha256_hex(&bytes(2, 150_000));
    std::fs::write(blobs.join(&l1), bytes(5, 150_000)).unwrap();
    let err = fails(fleet.create());
    assert!(
        err.contains(&l1) && err.contains("the OCI layout is damaged"),
        "{err}"
    );
    assert!(!d.join("rel/release.json").exists());
}

#[test]
fn create_asks_for_compatible_when_the_bundle_does_not_say() {
    let fleet = Fleet::new();
    let d = fleet.path();
    let base = [
        "release",
        "create",
        "--line",
        "ecu-main",
        "--version",
        "1.0.0",
    ];
    let with = |extra: &[&'static str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--out", "rel"]);
        cardeploy(d, &args)
    };
    // The fake bundle is no squashfs: whether or not unsquashfs is installed, nothing is read.
    let err = fails(with(&["--os", "rootfs.raucb"]));
    assert!(err.contains("pass --compatible"), "{err}");
    let err = fails(with(&["--manifests", "k8s"]));
    assert!(
        err.contains("--compatible is required without --os"),
        "{err}"
    );
}

#[test]
fn create_refuses_a_version_that_is_not_semver_and_a_line_not_in_canonical_form() {
    let fleet = Fleet::new();
    let d = fleet.path();
    let create = |line: &str, version: &str| {
        cardeploy(
            d,
            &[
                "release",
                "create",
                "--line",
                line,
                "--version",
                version,
                "--compatible",
                "x",
                "--manifests",
                "k8s",
                "--out",
                "rel",
            ],
        )
    };
    let out = create("ecu-main", "1.5");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a semantic version"), "{err}");
    for line in ["../etc", "ECU-MAIN", "ecu-main."] {
        let out = create(line, "1.5.0");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not in canonical form"), "{line}: {err}");
    }
}

#[test]
fn root_push_sends_to_the_twin_given_with_api() {
    let fleet = Fleet::new();
    let err = fails(cardeploy(
        fleet.path(),
        &[
            "root",
            "push",
            "root.json",
            "--api",
            NO_TWIN,
            "--token",
            "t",
        ],
    ));
    assert!(
        err.contains("cannot reach the twin at http://127.0.0.1:9"),
        "{err}"
    );
    let err = fails(cardeploy(
        fleet.path(),
        &[
            "root",
            "push",
            "release.pub",
            "--api",
            NO_TWIN,
            "--token",
            "t",
        ],
    ));
    assert!(err.contains("release.pub is not a signed root"), "{err}");
}

/// A one-request twin: answers `status` with `body` and hands back the request it got
/// (request line, headers, body).
fn twin_answering(status: &'static str, body: String) -> (String, JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut request = String::new();
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap();
            }
            request.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let mut content = vec![0; length];
        reader.read_exact(&mut content).unwrap();
        request.push_str(&String::from_utf8(content).unwrap());
        let mut stream = stream;
        write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        request
    });
    (url, handle)
}

#[test]
fn root_push_posts_the_envelope_and_explains_a_refusal() {
    let fleet = Fleet::new();
    let d = fleet.path();
    let root: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("root.json")).unwrap()).unwrap();

    let (url, twin) = twin_answering("200 OK", json!({"version": 1}).to_string());
    let said = ok(cardeploy(
        d,
        &["root", "push", "root.json", "--api", &url, "--token", "t"],
    ));
    assert!(said.contains("root version 1 accepted"), "{said}");
    let request = twin.join().unwrap();
    assert!(request.starts_with("POST /api/v1/roots "), "{request}");
    assert!(request.contains("Bearer t"), "{request}");
    let (_, body) = request.split_once("\r\n\r\n").unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(body).unwrap(),
        root,
        "the envelope goes as it is"
    );

    let (url, twin) = twin_answering(
        "409 Conflict",
        json!({"error": "root does not name the director key"}).to_string(),
    );
    let err = fails(cardeploy(
        d,
        &["root", "push", "root.json", "--api", &url, "--token", "t"],
    ));
    twin.join().unwrap();
    assert!(
        err.contains("409 Conflict: root does not name the director key"),
        "{err}"
    );
    assert!(err.contains("cardeploy root director --out"), "{err}");
}

#[test]
fn root_director_writes_the_key_as_keys_gen_does() {
    let fleet = Fleet::new();
    let d = fleet.path();
    let public: PublicKey =
        serde_json::from_slice(&std::fs::read(d.join("director.pub")).unwrap()).unwrap();
    let answer = json!({"keyid": public.id(), "public": public}).to_string();
    let (url, twin) = twin_answering("200 OK", answer);
    let said = ok(cardeploy(
        d,
        &[
            "root",
            "director",
            "--out",
            "fetched.pub",
            "--api",
            &url,
            "--token",
            "t",
        ],
    ));
    assert!(twin.join().unwrap().starts_with("GET /api/v1/director "));
    assert_eq!(said.trim(), public.id().as_str());
    assert_eq!(
        std::fs::read(d.join("fetched.pub")).unwrap(),
        std::fs::read(d.join("director.pub")).unwrap(),
        "the same file `keys gen` writes"
    );

    let other: PublicKey =
        serde_json::from_slice(&std::fs::read(d.join("other.pub")).unwrap()).unwrap();
    let lying = json!({"keyid": other.id(), "public": public}).to_string();
    let (url, twin) = twin_answering("200 OK", lying);
    let err = fails(cardeploy(
        d,
        &[
            "root",
            "director",
            "--out",
            "lying.pub",
            "--api",
            &url,
            "--token",
            "t",
        ],
    ));
    twin.join().unwrap();
    assert!(err.contains("not writing it"), "{err}");
    assert!(!d.join("lying.pub").exists());
}
