//! The registry against clients nobody here wrote: skopeo, and containerd (the same containerd
//! k3s embeds) driven by `ctr`, pulling through a mirror configured the way k3s writes one from
//! `/etc/rancher/k3s/registries.yaml`. Each ends with the exact digests the registry served.
//! Needs `skopeo` and `containerd` (Debian packages; `cargo xtask test` installs them) and root
//! for containerd; under `CI=true` their absence fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cardeploy_registry::Catalog;
use cardeploy_testkit::oci::{Image, Layout, skopeo, skopeo_copy, tar};
use cardeploy_testkit::{cannot_run, eventually, noise};

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

struct Served {
    dir: tempfile::TempDir,
    layout: Layout,
    image: Image,
    addr: SocketAddr,
    _running: common::Running,
}

/// An arm64 image of two layers (one of 3 MiB, so blobs stream in several pieces), served as
/// `cardeploy/nav` tagged `1.0`.
async fn served() -> Served {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(&dir.path().join("layout"));
    let big = noise(7, 3 << 20);
    let image = layout.image(
        "arm64",
        &[
            tar(&[("etc/nav.conf", b"zoom=3\n")]),
            tar(&[("usr/lib/nav/map.bin", &big)]),
        ],
    );
    layout.list(&[(&image.manifest, "1.0")]);
    let catalog = Catalog::from_layout(&layout.dir, "cardeploy/nav").unwrap();
    let running = common::serve(catalog).await;
    Served {
        dir,
        layout,
        image,
        addr: running.addr,
        _running: running,
    }
}

/// Runs a client to completion off the runtime (the registry serves on it meanwhile).
async fn run(mut command: Command) -> Vec<u8> {
    let shown = format!("{command:?}");
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{shown} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[tokio::test]
async fn skopeo_copies_an_image_out_of_the_registry_with_identical_digests() {
    if !have("skopeo") {
        cannot_run(
            "skopeo_copies_an_image_out_of_the_registry_with_identical_digests",
            "skopeo (apt-get install skopeo)",
        );
        return;
    }
    let s = served().await;
    let source = format!("docker://{}/cardeploy/nav", s.addr);
    let out = s.dir.path().join("copied");
    let copy = skopeo_copy(s.dir.path(), &format!("{source}:1.0"), &out, "1.0");
    run(copy).await;
    // The copy's index names our manifest digest, and every blob is byte for byte ours.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index["manifests"][0]["digest"],
        s.image.manifest.digest_string()
    );
    for blob in std::iter::once(&s.image.manifest)
        .chain([&s.image.config])
        .chain(&s.image.layers)
    {
        let copied = out.join("blobs/sha256").join(blob.digest.to_string());
        assert_eq!(
            std::fs::read(&copied).unwrap(),
            std::fs::read(s.layout.path(&blob.digest)).unwrap(),
            "{}",
            blob.digest_string()
        );
    }
    // By digest, raw: the exact manifest bytes.
    let mut inspect = skopeo(s.dir.path());
    inspect
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("{source}@{}", s.image.manifest.digest_string()));
    assert_eq!(
        run(inspect).await,
        std::fs::read(s.layout.path(&s.image.manifest.digest)).unwrap()
    );
    let mut tags = skopeo(s.dir.path());
    tags.args(["list-tags", "--tls-verify=false", &source]);
    let tags: serde_json::Value = serde_json::from_slice(&run(tags).await).unwrap();
    assert_eq!(tags["Tags"], serde_json::json!(["1.0"]));
}

/// A containerd daemon of its own: private root, state and socket, no CRI plugin.
struct Containerd {
    child: Child,
    socket: PathBuf,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn containerd(dir: &Path) -> Containerd {
    let socket = dir.join("containerd.sock");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{socket}\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            socket = socket.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
    let child = Command::new("containerd")
        .arg("--config")
        .arg(&config)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let daemon = Containerd { child, socket };
    let sock = daemon.socket.clone();
    eventually(
        Duration::from_secs(30),
        "containerd answers on its socket",
        || {
            Command::new("ctr")
                .arg("--address")
                .arg(&sock)
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
                .then_some(())
        },
    )
    .await;
    daemon
}

fn ctr(d: &Containerd) -> Command {
    let mut c = Command::new("ctr");
    c.arg("--address")
        .arg(&d.socket)
        .arg("--namespace")
        .arg("cardeploy-test");
    c
}

#[tokio::test]
async fn containerd_pulls_through_the_k3s_style_mirror_with_identical_digests() {
    let test = "containerd_pulls_through_the_k3s_style_mirror_with_identical_digests";
    if !have("containerd") || !have("ctr") {
        cannot_run(test, "containerd and ctr (apt-get install containerd)");
        return;
    }
    if !cardeploy_testkit::procs::is_root() {
        cannot_run(test, "root, to run a containerd daemon");
        return;
    }
    let s = served().await;
    let daemon = containerd(s.dir.path()).await;
    // What k3s writes from registries.yaml: registry.cardeploy.local mirrored to the agent.
    let hosts = s.dir.path().join("certs.d");
    let mirror = hosts.join("registry.cardeploy.local");
    std::fs::create_dir_all(&mirror).unwrap();
    std::fs::write(
        mirror.join("hosts.toml"),
        format!(
            "server = \"https://registry.cardeploy.local\"\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            s.addr
        ),
    )
    .unwrap();
    let by_digest = format!(
        "registry.cardeploy.local/cardeploy/nav@{}",
        s.image.manifest.digest_string()
    );
    let mut pull = ctr(&daemon);
    pull.args([
        "images",
        "pull",
        "--platform",
        "linux/arm64",
        "--snapshotter",
        "native",
        "--hosts-dir",
    ])
    .arg(&hosts)
    .arg(&by_digest);
    run(pull).await;
    let mut list = ctr(&daemon);
    list.args(["images", "list", "--quiet"]);
    let names = String::from_utf8(run(list).await).unwrap();
    assert!(
        names.lines().any(|l| l == by_digest),
        "ctr images list: {names}"
    );
    // containerd's content store holds exactly the bytes served, under the same digests.
    for blob in std::iter::once(&s.image.manifest)
        .chain([&s.image.config])
        .chain(&s.image.layers)
    {
        let mut get = ctr(&daemon);
        get.args(["content", "get", &blob.digest_string()]);
        assert_eq!(
            run(get).await,
            std::fs::read(s.layout.path(&blob.digest)).unwrap(),
            "{}",
            blob.digest_string()
        );
    }
}
