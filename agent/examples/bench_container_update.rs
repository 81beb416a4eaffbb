//! `cargo xtask bench containers`, the cardeploy side of a container update and of a rollback:
//! the real twin, agent and CLI binaries, with the test kit's Kubernetes API-server **double** in
//! place of the car's k3s (k3s cannot run on our machines), pods Ready at once (no controller
//! delay).
//!
//! 1. Three layer tars (BASE, OLD-APP, NEW-APP) become two gzip images, as a registry holds them:
//!    v1 = BASE + OLD-APP, v2 = BASE + NEW-APP. `cardeploy release create --image` makes the
//!    releases (layers stored uncompressed, references pinned to the car's registry).
//! 2. The car runs v1; then, once the twin has made v2's deltas ahead, v2. Bytes on the wire are
//!    counted by a proxy in front of the twin (TLS, RSocket, index, frames: everything). What a
//!    layer-level pull of v2 fetches (the blobs v1 does not have: manifest, config, gzip
//!    layers) is the yardstick beside it.
//! 3. Rollbacks: a version whose containers crash-loop, side by side (the canary goes, the
//!    running version never stopped) and `strategy: replace` (the previous manifest is applied
//!    again, its image still in the car's registry). The breakdown comes from the double's
//!    request journal and a watch on its objects: the health read that showed the crash loop
//!    (the decision), the first cleanup request, and the moment the previous version serves
//!    alone (its Deployment available, no pod of the failed image left).
//!
//! Arguments: --bins DIR (cardeploy-twin, cardeploy-agent, cardeploy) --work DIR --out FILE.json
//! and either --smoke (small synthetic layers made here) or --base TAR --old-app TAR --new-app TAR.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cardeploy_chunks::Digest;
use cardeploy_testkit::FaultProxy;
use cardeploy_testkit::fleet::{CarOptions, Fleet};
use cardeploy_testkit::kube::{ApiServerDouble, Failure, Request};
use cardeploy_testkit::oci::{LAYER_TAR_GZIP, Layout, tar};
use cardeploy_testkit::procs::{arg, free_port, http};
use serde_json::{Value, json};

const COMPATIBLE: &str = "cardeploy-bench-arm64";
const CAR: &str = "CAR-CONTAINERS";
/// How long a step may take before the bench gives up.
const WITHIN: Duration = Duration::from_secs(1800);

/// The gzip blob of a layer tar (`gzip -n -6`, as image builders compress layers) in `layout`,
/// with the tar's digest (the diff id).
fn gzip_layer(layout: &Layout, tar: &Path) -> (cardeploy_testkit::oci::Blob, Digest) {
    let out = Command::new("gzip")
        .args(["-n", "-6", "-c"])
        .arg(tar)
        .output()
        .expect("gzip");
    assert!(out.status.success(), "gzip {} failed", tar.display());
    let diff_id = Digest::of(&std::fs::read(tar).unwrap());
    (layout.blob(LAYER_TAR_GZIP, &out.stdout), diff_id)
}

/// An arm64 image of `tars` (gzip layers) as an OCI layout in `dir`; returns its blobs' digests
/// and sizes (manifest, config, layers).
fn image(dir: &Path, tars: &[&Path]) -> Vec<(String, u64)> {
    let _ = std::fs::remove_dir_all(dir);
    let layout = Layout::new(dir);
    let layers: Vec<_> = tars.iter().map(|t| gzip_layer(&layout, t)).collect();
    let image = layout.image_of("arm64", &layers);
    layout.list(&[(&image.manifest, "1.0")]);
    std::iter::once(&image.manifest)
        .chain([&image.config])
        .chain(&image.layers)
        .map(|b| (b.digest_string(), b.size))
        .collect()
}

fn deployment(image: &str, annotations: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: app\n  annotations: {{{annotations}}}\nspec:\n  replicas: 2\n  selector:\n    matchLabels: {{app: app}}\n  template:\n    metadata:\n      labels: {{app: app}}\n    spec:\n      containers:\n      - {{name: main, image: '{image}'}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: app}}\nspec:\n  selector: {{app: app}}\n  ports:\n  - {{port: 80}}\n"
    )
}

struct Bench {
    fleet: Fleet,
    double: Arc<ApiServerDouble>,
    work: PathBuf,
}

impl Bench {
    /// `app@version` of the image in `layout` and the Deployment's `annotations`; returns the
    /// release digest and the image reference the workload was pinned to.
    fn release(&self, version: &str, layout: &Path, annotations: &str) -> (String, String) {
        let k8s = self.work.join(format!("k8s-{version}"));
        std::fs::create_dir_all(&k8s).unwrap();
        std::fs::write(
            k8s.join("app.yaml"),
            deployment("ghcr.io/acme/app:1.0", annotations),
        )
        .unwrap();
        let image = format!("acme/app={}", layout.display());
        let k8s = k8s.display().to_string();
        let digest = self
            .fleet
            .release(
                "app",
                version,
                COMPATIBLE,
                &["--image", &image, "--manifests", &k8s],
                &[],
            )
            .unwrap();
        let release: Value = serde_json::from_slice(
            &std::fs::read(
                self.fleet
                    .dir
                    .join("releases")
                    .join(format!("app-{version}"))
                    .join("release.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let manifest = release["images"][0]["manifest"].as_str().unwrap();
        (
            digest,
            format!(
                "{}/acme/app@sha256:{manifest}",
                cardeploy_release::CAR_REGISTRY
            ),
        )
    }

    /// Run `digest` (`app@version`) and wait until the car reports `phase`; returns the time.
    fn run(&self, digest: &str, version: &str, phase: &str) -> f64 {
        let started = Instant::now();
        self.fleet.set_desired(CAR, digest).unwrap();
        let label = format!("app@{version}");
        self.fleet
            .until(CAR, &format!("{label} {phase}"), WITHIN, false, |v| {
                let state = serde_json::to_value(v).unwrap();
                let state = &state["reported"]["state"];
                state["release"] == label.as_str() && state["phase"] == phase
            })
            .unwrap();
        started.elapsed().as_secs_f64()
    }

    /// Wait until the twin has made every delta it planned ahead.
    fn wait_ahead(&self) -> f64 {
        let token = std::fs::read_to_string(self.fleet.dir.join("twin/operator.token")).unwrap();
        let started = Instant::now();
        loop {
            let mut r = http()
                .get(format!("{}/api/v1/deltas", self.fleet.api))
                .header("Authorization", format!("Bearer {}", token.trim()))
                .call()
                .unwrap();
            let view: Value =
                serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
            if view["ahead_pending"] == 0 {
                return started.elapsed().as_secs_f64();
            }
            assert!(started.elapsed() < WITHIN, "deltas ahead not made: {view}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A rollback: `failing` (released as `version` with `annotations`) crash-loops while
    /// `previous` runs. Returns the breakdown.
    fn rollback(
        &self,
        what: &str,
        version: &str,
        layout: &Path,
        annotations: &str,
        previous: &str,
    ) -> Value {
        let (digest, failing) = self.release(version, layout, annotations);
        self.double.fail(&failing, Failure::CrashLoop);
        self.wait_ahead();
        // The watch on the double's objects: when the failed version has run and the previous
        // one serves alone again.
        let watcher = {
            let double = Arc::clone(&self.double);
            let (failing, previous) = (failing.clone(), previous.to_owned());
            std::thread::spawn(move || {
                let started = Instant::now();
                while !pods(&double).iter().any(|p| p.contains(&failing)) {
                    assert!(started.elapsed() < WITHIN, "the failing version never ran");
                    std::thread::sleep(Duration::from_millis(1));
                }
                while !serving_alone(&double, &previous, &failing) {
                    assert!(
                        started.elapsed() < WITHIN,
                        "the previous version never served alone"
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
                Instant::now()
            })
        };
        let total = self.run(&digest, version, "rolled-back");
        let serving = watcher.join().unwrap();
        let journal = self.double.journal();
        let breakdown = breakdown(&journal, &failing, serving);
        eprintln!("{what}: {breakdown}");
        json!({"what": what, "desired_to_reported_secs": total, "breakdown": breakdown})
    }
}

/// The pods in `default`, each as its images.
fn pods(double: &ApiServerDouble) -> Vec<Vec<String>> {
    double
        .names("", "pods", "default")
        .iter()
        .filter_map(|n| double.object("", "pods", "default", n))
        .map(|p| images(&p["spec"]))
        .collect()
}

/// Whether a Deployment running `image` has every replica Ready and no pod runs `failed`.
fn serving_alone(double: &ApiServerDouble, image: &str, failed: &str) -> bool {
    let available = double
        .names("apps", "deployments", "default")
        .iter()
        .filter_map(|n| double.object("apps", "deployments", "default", n))
        .any(|d| {
            images(&d["spec"]["template"]["spec"])
                .iter()
                .any(|i| i == image)
                && d["status"]["readyReplicas"].as_u64() >= d["spec"]["replicas"].as_u64()
        });
    available && !pods(double).iter().any(|p| p.iter().any(|i| i == failed))
}

fn images(pod_spec: &Value) -> Vec<String> {
    pod_spec["containers"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter_map(|c| c["image"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// From the journal: the apply of the failing version, the health read that showed the crash
/// loop (the agent's decision follows it), the rollback's first and last requests, and `serving`.
fn breakdown(journal: &[Request], failing: &str, serving: Instant) -> Value {
    let applied = journal
        .iter()
        .position(|r| r.method == "PATCH" && r.images.iter().any(|i| i == failing))
        .expect("the failing version was never applied");
    let failing_path = &journal[applied].path;
    let first = applied
        + journal[applied..]
            .iter()
            .position(|r| {
                (r.method == "DELETE" && &r.path == failing_path)
                    || (r.method == "PATCH"
                        && !r.images.is_empty()
                        && !r.images.iter().any(|i| i == failing))
            })
            .expect("no rollback request in the journal");
    let decided = journal[applied..first]
        .iter()
        .rev()
        .find(|r| r.method == "GET" && r.path.ends_with("/pods"))
        .expect("no health read before the rollback")
        .end;
    let last = journal[first..]
        .iter()
        .filter(|r| matches!(r.method.as_str(), "DELETE" | "PATCH") && r.start <= serving)
        .map(|r| r.end)
        .max()
        .unwrap_or(journal[first].end);
    let requests = journal[first..]
        .iter()
        .filter(|r| matches!(r.method.as_str(), "GET" | "DELETE" | "PATCH") && r.start <= serving)
        .count();
    json!({
        "detect_ms": ms(decided - journal[applied].end),
        "decision_to_first_request_ms": ms(journal[first].start - decided),
        "first_request_to_serving_ms": ms(serving.saturating_duration_since(journal[first].start)),
        "cleanup_requests": requests,
        "last_cleanup_request_ms": ms(last - decided),
        "decision_to_serving_ms": ms(serving.saturating_duration_since(decided)),
    })
}

/// Small layers for the smoke run: a base of 4 MiB and an app layer of 32 files whose next
/// version changes three files a little and adds one.
fn synthetic(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let base: Vec<(String, Vec<u8>)> = (0..16)
        .map(|i| {
            (
                format!("usr/lib/base{i}.so"),
                cardeploy_testkit::noise(i, 256 << 10),
            )
        })
        .collect();
    let app = |new: bool| -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<(String, Vec<u8>)> = (0..32)
            .map(|i| {
                let mut data = cardeploy_testkit::noise(100 + i, 64 << 10);
                if new && i % 11 == 0 {
                    data[1000..1100].copy_from_slice(&cardeploy_testkit::noise(900 + i, 100));
                }
                (format!("usr/local/lib/app/m{i}.py"), data)
            })
            .collect();
        if new {
            files.push((
                "usr/local/lib/app/new.py".into(),
                cardeploy_testkit::noise(999, 16 << 10),
            ));
        }
        files
    };
    let write = |name: &str, files: &[(String, Vec<u8>)]| {
        let refs: Vec<(&str, &[u8])> = files
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_slice()))
            .collect();
        let path = dir.join(name);
        std::fs::write(&path, tar(&refs)).unwrap();
        path
    };
    (
        write("base.tar", &base),
        write("old-app.tar", &app(false)),
        write("new-app.tar", &app(true)),
    )
}

fn start_agent(bins: &Path, car_dir: &Path, log: &Path) -> Child {
    Command::new(bins.join("cardeploy-agent"))
        .arg("--config")
        .arg(car_dir.join("agent.toml"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let bins = std::fs::canonicalize(arg("--bins").expect("--bins DIR"))
        .expect("--bins names a directory");
    let work = PathBuf::from(arg("--work").expect("--work DIR"));
    let out = PathBuf::from(arg("--out").expect("--out FILE"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let (base, old_app, new_app) = if std::env::args().any(|a| a == "--smoke") {
        synthetic(&work.join("layers"))
    } else {
        (
            PathBuf::from(arg("--base").expect("--base TAR")),
            PathBuf::from(arg("--old-app").expect("--old-app TAR")),
            PathBuf::from(arg("--new-app").expect("--new-app TAR")),
        )
    };
    let double = Arc::new(ApiServerDouble::start().await);
    double.ready_after(Duration::ZERO);
    let fleet = Fleet::start(&bins, &work.join("fleet")).unwrap();
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", fleet.cars_port).parse().unwrap()).await;
    let kubeconfig = work.join("kubeconfig");
    double.write_kubeconfig(&kubeconfig);
    let mut options = CarOptions::new(COMPATIBLE, &format!("localhost:{}", proxy.addr.port()));
    options.extra_config = format!(
        "\n[containers]\nregistry = \"127.0.0.1:{}\"\nkubeconfig = \"{}\"\nready_secs = 120\ncanary_secs = 1\n",
        free_port(),
        kubeconfig.display()
    );
    let car_dir = fleet.add_car(CAR, &options).unwrap();
    let log = work.join("agent.log");
    let mut agent = start_agent(&bins, &car_dir, &log);
    let bench = Bench {
        fleet,
        double,
        work: work.clone(),
    };

    let result = tokio::task::spawn_blocking(move || {
        bench
            .fleet
            .until(
                CAR,
                "the car to connect",
                Duration::from_secs(60),
                false,
                |v| v.connected,
            )
            .unwrap();
        eprintln!("images: gzip layers, as a registry holds them");
        let v1 = image(&work.join("oci/v1"), &[&base, &old_app]);
        let v2 = image(&work.join("oci/v2"), &[&base, &new_app]);
        std::fs::create_dir_all(work.join("layers")).unwrap();
        let broken = work.join("layers/broken.tar");
        std::fs::write(&broken, tar(&[("etc/app/broken", b"exit 1\n")])).unwrap();
        image(&work.join("oci/v3"), &[&base, &new_app, &broken]);
        let broken2 = work.join("layers/broken2.tar");
        std::fs::write(&broken2, tar(&[("etc/app/broken", b"exit 2\n")])).unwrap();
        image(&work.join("oci/v5"), &[&base, &new_app, &broken2]);
        let layer_pull: u64 = v2.iter().filter(|b| !v1.contains(b)).map(|b| b.1).sum();
        let image_bytes: u64 = v2.iter().map(|b| b.1).sum();

        eprintln!("v1: the car's first image (everything travels)");
        let (r1, _) = bench.release("1.0.0", &work.join("oci/v1"), "");
        bench.wait_ahead();
        bench.run(&r1, "1.0.0", "committed");

        eprintln!("v2: the update measured");
        let (r2, image2) = bench.release("2.0.0", &work.join("oci/v2"), "");
        let ahead_secs = bench.wait_ahead();
        let before =
            proxy.bytes_down.load(Ordering::Relaxed) + proxy.bytes_up.load(Ordering::Relaxed);
        let update_secs = bench.run(&r2, "2.0.0", "committed");
        let wire = proxy.bytes_down.load(Ordering::Relaxed)
            + proxy.bytes_up.load(Ordering::Relaxed)
            - before;
        eprintln!("v2: {wire} B on the wire vs a layer-level pull of {layer_pull} B");

        eprintln!("rollback, side by side: v3 crash-loops beside v2");
        let side = bench.rollback("side by side", "3.0.0", &work.join("oci/v3"), "", &image2);

        eprintln!("rollback, strategy: replace: v4 (v2's image) runs, v5 crash-loops in its place");
        let replace = "cardeploy.io/strategy: replace";
        let (r4, image4) = bench.release("4.0.0", &work.join("oci/v2"), replace);
        bench.wait_ahead();
        bench.run(&r4, "4.0.0", "committed");
        let replaced = bench.rollback("replace", "5.0.0", &work.join("oci/v5"), replace, &image4);
        json!({
            "update": {
                "wire_bytes": wire, "secs": update_secs, "ahead_secs": ahead_secs,
                "layer_pull_bytes": layer_pull, "image_bytes": image_bytes,
                "layers": v2.iter().skip(2).map(|b| b.1).collect::<Vec<_>>(),
            },
            "rollbacks": [side, replaced],
        })
    })
    .await
    .unwrap();
    let _ = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    let _ = agent.wait();
    let text = serde_json::to_string_pretty(&result).unwrap();
    println!("{text}");
    std::fs::write(out, text).unwrap();
}
