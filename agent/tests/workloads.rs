//! Workloads through kube, end to end: releases made and signed with the real CLI, the real
//! twin and agent, and the Kubernetes API-server **double** of the test kit in place of the
//! car's k3s (k3s cannot be installed on our machines; the double is strict where the real API
//! server is: server-side apply, field managers, resource versions, watches).
//!
//! - A new version of a Deployment starts beside the running one, stays healthy for the canary
//!   time, then the old one goes; a version that crash-loops is removed while the old one never
//!   stopped; an object the agent did not apply is never touched; a workload a release drops is
//!   removed once the release is promoted.
//! - `cardeploy.io/strategy: replace`: a version that never becomes ready is rolled back by
//!   applying the previous release's manifest again, from the car's disk.
//!
//! **Against a real cluster**: with `CARDEPLOY_KUBECONFIG` naming one (k3s on this machine, its
//! `registries.yaml` mirroring `registry.cardeploy.local` to the agent's registry at
//! `CARDEPLOY_REGISTRY`, default `127.0.0.1:5000`), the same tests run against it, one at a time
//! (they share that registry address). Their images then hold a static busybox for this machine's
//! architecture (`/bin/busybox` from Debian's busybox-static, or `CARDEPLOY_BUSYBOX`); the
//! manifests make a version crash (`busybox false`) or never get ready (a readiness probe that
//! fails), where the double is told so by image. The test that stops the API server needs the
//! double and says so. Objects of earlier runs labelled `app.kubernetes.io/managed-by: cardeploy`
//! in `default` are deleted first.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use cardeploy_testkit::kube::{ApiServerDouble, Failure};
use cardeploy_testkit::oci::{Layout, tar_with_modes};
use cardeploy_testkit::signing::COMPATIBLE;
use common::pipeline::{cardeploy, keys_and_root};
use common::{Agent, Env, until_within};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams};
use serde_json::Value;

/// Real-cluster tests share the registry address the cluster mirrors: one at a time.
static REAL_CLUSTER: Mutex<()> = Mutex::new(());

/// The car's k3s in these tests: the double, or a real cluster.
enum Cluster {
    Double(ApiServerDouble),
    Real {
        kubeconfig: PathBuf,
        registry: String,
        busybox: Vec<u8>,
        _one_at_a_time: MutexGuard<'static, ()>,
    },
}

impl Cluster {
    async fn new() -> Self {
        let Ok(kubeconfig) = std::env::var("CARDEPLOY_KUBECONFIG") else {
            return Self::Double(ApiServerDouble::start().await);
        };
        let guard = REAL_CLUSTER.lock().unwrap_or_else(PoisonError::into_inner);
        let busybox_path =
            std::env::var("CARDEPLOY_BUSYBOX").unwrap_or_else(|_| "/bin/busybox".into());
        let busybox = std::fs::read(&busybox_path).unwrap_or_else(|e| {
            panic!(
                "CARDEPLOY_KUBECONFIG is set: the test images need a static busybox at {busybox_path} \
                 (apt-get install busybox-static, or CARDEPLOY_BUSYBOX=PATH): {e}"
            )
        });
        eprintln!(
            "workloads tests against the REAL cluster of {kubeconfig} (CARDEPLOY_KUBECONFIG)"
        );
        let cluster = Self::Real {
            kubeconfig: kubeconfig.into(),
            registry: std::env::var("CARDEPLOY_REGISTRY")
                .unwrap_or_else(|_| "127.0.0.1:5000".into()),
            busybox,
            _one_at_a_time: guard,
        };
        cluster.clean().await;
        cluster
    }

    fn double(&self) -> Option<&ApiServerDouble> {
        match self {
            Self::Double(d) => Some(d),
            Self::Real { .. } => None,
        }
    }

    fn real(&self) -> bool {
        self.double().is_none()
    }

    /// The kubeconfig the agent is given, written to `path`.
    fn write_kubeconfig(&self, path: &Path) {
        match self {
            Self::Double(d) => d.write_kubeconfig(path),
            Self::Real { kubeconfig, .. } => {
                std::fs::copy(kubeconfig, path).unwrap();
            }
        }
    }

    /// The agent's registry address: any free port with the double; with a real cluster, the
    /// one its `registries.yaml` mirrors.
    fn registry(&self) -> String {
        match self {
            Self::Double(_) => format!("127.0.0.1:{}", common::free_port()),
            Self::Real { registry, .. } => registry.clone(),
        }
    }

    /// Pods running `image` fail this way: the double is told; on a real cluster the manifest
    /// does it (see [`Run`]).
    fn fail(&self, image: &str, failure: Failure) {
        if let Self::Double(d) = self {
            d.fail(image, failure);
        }
    }

    /// Pods become Ready this long after they start (the double; a real cluster takes its time).
    fn ready_after(&self, delay: Duration) {
        if let Self::Double(d) = self {
            d.ready_after(delay);
        }
    }

    async fn client(&self) -> kube::Client {
        match self {
            Self::Double(d) => {
                kube::Client::try_from(kube::Config::new(d.url().parse().unwrap())).unwrap()
            }
            Self::Real { kubeconfig, .. } => {
                let config = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
                let config = kube::Config::from_custom_kubeconfig(config, &Default::default())
                    .await
                    .unwrap();
                kube::Client::try_from(config).unwrap()
            }
        }
    }

    async fn api(&self, group: &str, plural: &str) -> Api<DynamicObject> {
        let kind = match plural {
            "deployments" => "Deployment",
            "services" => "Service",
            "configmaps" => "ConfigMap",
            other => panic!("no kind for {other}"),
        };
        let api_version = if group.is_empty() {
            "v1".to_owned()
        } else {
            format!("{group}/v1")
        };
        let resource = ApiResource {
            group: group.into(),
            version: "v1".into(),
            api_version,
            kind: kind.into(),
            plural: plural.into(),
        };
        Api::namespaced_with(self.client().await, "default", &resource)
    }

    /// An object in `default`, as the API server returns it.
    async fn object(&self, group: &str, plural: &str, name: &str) -> Option<Value> {
        let found = self.api(group, plural).await.get_opt(name).await.unwrap();
        found.map(|o| serde_json::to_value(o).unwrap())
    }

    /// The names of the Deployments in `default` that start with `prefix`.
    async fn deployments(&self, prefix: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .api("apps", "deployments")
            .await
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|o| o.metadata.name)
            .filter(|n| n.starts_with(prefix))
            .collect();
        names.sort();
        names
    }

    /// A real cluster starts without what earlier runs left.
    async fn clean(&self) {
        for (group, plural) in [
            ("apps", "deployments"),
            ("", "services"),
            ("", "configmaps"),
        ] {
            let api = self.api(group, plural).await;
            let params = ListParams::default().labels("app.kubernetes.io/managed-by=cardeploy");
            for o in api.list(&params).await.unwrap().items {
                let name = o.metadata.name.unwrap_or_default();
                let _ = api.delete(&name, &DeleteParams::foreground()).await;
            }
        }
        let configmaps = self.api("", "configmaps").await;
        let _ = configmaps
            .delete("someone-elses", &DeleteParams::default())
            .await;
    }

    /// The layer of a test image: `content`, and a static busybox on a real cluster.
    fn layer(&self, content: &[u8]) -> (Vec<u8>, &'static str) {
        match self {
            Self::Double(_) => (tar_with_modes(&[("srv/app", content, 0o644)]), "arm64"),
            Self::Real { busybox, .. } => {
                let arch = match std::env::consts::ARCH {
                    "x86_64" => "amd64",
                    "aarch64" => "arm64",
                    other => other,
                };
                let arch: &'static str = Box::leak(arch.to_owned().into_boxed_str());
                (
                    tar_with_modes(&[("bin/busybox", busybox, 0o755), ("srv/app", content, 0o644)]),
                    arch,
                )
            }
        }
    }
}

/// What a test workload's container does (a real cluster runs it; the double is told by image).
#[derive(Clone, Copy)]
enum Run {
    Serve,
    Crash,
    NeverReady,
}

/// One test's world: the car's k3s (the double, or a real cluster), a twin, and the pipeline's
/// keys and root made with the CLI in a working directory.
struct World {
    kube: Cluster,
    env: Env,
    twin: cardeploy_twin::Running,
    work: tempfile::TempDir,
    /// How long the rollouts get: seconds on the double, longer on a real cluster (image pulls).
    rollout: Duration,
    ready_secs: u64,
}

impl World {
    async fn new() -> Self {
        let kube = Cluster::new().await;
        let env = Env::new();
        env.no_root.set(true).unwrap();
        let twin = env.twin().await;
        let work = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(work.path().join("keys")).unwrap();
        keys_and_root(work.path(), &twin, &env);
        let (rollout, ready_secs) = if kube.real() {
            (Duration::from_secs(300), 120)
        } else {
            (Duration::from_secs(30), 4)
        };
        Self {
            kube,
            env,
            twin,
            work,
            rollout,
            ready_secs,
        }
    }

    fn dir(&self) -> &Path {
        self.work.path()
    }

    /// A car with `[containers]` naming the cluster, its agent started.
    async fn car(&self, id: &str) -> Agent {
        self.car_with(id, 2).await
    }

    /// The same with a canary time of `canary_secs`.
    async fn car_with(&self, id: &str, canary_secs: u64) -> Agent {
        let kubeconfig = self.dir().join("kubeconfig");
        self.kube.write_kubeconfig(&kubeconfig);
        let config = self
            .env
            .car_config(
                &self.twin,
                id,
                &format!("localhost:{}", self.env.cars_port),
                &self.dir().join("root.json"),
                &format!(
                    "[containers]\nregistry = \"{}\"\nkubeconfig = \"{}\"\nready_secs = {}\ncanary_secs = {canary_secs}\n",
                    self.kube.registry(),
                    kubeconfig.display(),
                    self.ready_secs,
                ),
            )
            .await;
        Agent::start(&config)
    }

    /// An image `name` whose one layer holds `content` (and busybox on a real cluster), as a
    /// layout under `oci/`.
    fn image(&self, name: &str, content: &[u8]) -> String {
        let dir = self.dir().join("oci").join(name);
        let _ = std::fs::remove_dir_all(&dir);
        let layout = Layout::new(&dir);
        let (layer, arch) = self.kube.layer(content);
        let image = layout.image(arch, &[layer]);
        layout.list(&[(&image.manifest, "1.0")]);
        format!("oci/{name}")
    }

    /// `apps@version` with `images` (NAME=DIR) and the manifests `yaml`, signed and pushed;
    /// returns the release digest and the image references the workloads were rewritten to.
    fn release(&self, version: &str, images: &[(&str, &str)], yaml: &str) -> (String, Vec<String>) {
        let k8s = self.dir().join(format!("k8s-{version}"));
        std::fs::create_dir_all(&k8s).unwrap();
        std::fs::write(k8s.join("app.yaml"), yaml).unwrap();
        let out = format!("rel-{version}");
        let mut args = vec![
            "release".to_owned(),
            "create".into(),
            "--line".into(),
            "apps".into(),
            "--version".into(),
            version.into(),
            "--compatible".into(),
            COMPATIBLE.into(),
            "--manifests".into(),
            k8s.display().to_string(),
            "--out".into(),
            out.clone(),
        ];
        for (name, dir) in images {
            args.extend(["--image".into(), format!("{name}={dir}")]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cardeploy(self.dir(), &self.twin, &self.env, &args);
        cardeploy(
            self.dir(),
            &self.twin,
            &self.env,
            &["release", "sign", &out, "--key", "keys/release.key"],
        );
        let digest = cardeploy(
            self.dir(),
            &self.twin,
            &self.env,
            &["release", "push", &out],
        )
        .trim()
        .to_owned();
        let release: cardeploy_release::Release = serde_json::from_slice(
            &std::fs::read(self.dir().join(&out).join("release.json")).unwrap(),
        )
        .unwrap();
        let refs = release
            .images
            .iter()
            .map(|i| {
                format!(
                    "{}/{}@sha256:{}",
                    cardeploy_release::CAR_REGISTRY,
                    i.name,
                    i.manifest
                )
            })
            .collect();
        (digest, refs)
    }

    fn desire(&self, car: &str, digest: &str) {
        cardeploy(
            self.dir(),
            &self.twin,
            &self.env,
            &["car", "set-desired", car, "--release", digest],
        );
    }
}

/// A Deployment of two replicas running `image` as `run` says.
fn deployment(name: &str, image: &str, extra_annotations: &str, run: Run) -> String {
    let container = match run {
        Run::Serve => {
            format!("{{name: main, image: '{image}', command: [/bin/busybox, sleep, '3600']}}")
        }
        Run::Crash => format!("{{name: main, image: '{image}', command: [/bin/busybox, 'false']}}"),
        Run::NeverReady => format!(
            "{{name: main, image: '{image}', command: [/bin/busybox, sleep, '3600'], readinessProbe: {{exec: {{command: [/bin/busybox, 'false']}}, periodSeconds: 1}}}}"
        ),
    };
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\n  annotations: {{{extra_annotations}}}\nspec:\n  replicas: 2\n  selector:\n    matchLabels: {{app: {name}}}\n  template:\n    metadata:\n      labels: {{app: {name}}}\n    spec:\n      containers:\n      - {container}\n---\n"
    )
}

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: nav}\nspec:\n  selector: {app: nav}\n  ports:\n  - {port: 80}\n---\n";

fn state_of(v: &Value) -> &Value {
    &v["reported"]["state"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_runs_beside_the_old_is_promoted_and_a_crash_loop_is_rolled_back() {
    let w = World::new().await;
    let (kube, twin, p) = (&w.kube, &w.twin, &w);
    kube.ready_after(Duration::from_millis(300));
    let _agent = w.car("VIN-K8S").await;

    // Something the agent did not apply, in the same namespace: it must survive every prune.
    let theirs = kube.client().await;
    let cm: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(theirs, "default");
    cm.patch(
        "someone-elses",
        &kube::api::PatchParams::apply("someone"),
        &kube::api::Patch::Apply(serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "someone-elses", "labels": {"app": "nav"}}, "data": {"k": "v"}
        })),
    )
    .await
    .unwrap();

    // 1.0.0: nav, its Service and a ConfigMap that 2.0.0 drops. Nothing ran before: no canary.
    let v1 = p.image("nav1", b"version 1");
    let (r1, _) = p.release(
        "1.0.0",
        &[("acme/nav", &v1)],
        &format!(
            "{}{SERVICE}apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: legacy}}\ndata: {{a: b}}\n",
            deployment("nav", "ghcr.io/acme/nav:1.0", "", Run::Serve)
        ),
    );
    p.desire("VIN-K8S", &r1);
    let seen = until_within(twin, "VIN-K8S", w.rollout, "apps@1.0.0 committed", |v| {
        state_of(v)["release"] == "apps@1.0.0" && state_of(v)["phase"] == "committed"
    })
    .await;
    let workloads = &state_of(&seen)["workloads"];
    let nav = workloads
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "Deployment/nav")
        .unwrap_or_else(|| panic!("no nav in {workloads}"));
    assert_eq!(nav["phase"], "ready", "{nav}");
    assert_eq!(nav["ready_replicas"], 2, "{nav}");
    let first = kube.deployments("nav-").await;
    assert_eq!(first.len(), 1, "{first:?}");
    let d = kube.object("apps", "deployments", &first[0]).await.unwrap();
    assert_eq!(
        d["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "cardeploy"
    );
    assert!(
        d["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["manager"] == "cardeploy" && f["operation"] == "Apply"),
        "applied server-side by the agent's field manager: {d}"
    );
    assert!(kube.object("", "configmaps", "legacy").await.is_some());

    // 2.0.0: a new nav beside the old one until its canary time is over; `legacy` dropped.
    let v2 = p.image("nav2", b"version 2");
    let (r2, _) = p.release(
        "2.0.0",
        &[("acme/nav", &v2)],
        &format!(
            "{}{SERVICE}",
            deployment("nav", "ghcr.io/acme/nav:1.0", "", Run::Serve)
        ),
    );
    p.desire("VIN-K8S", &r2);
    until_within(
        twin,
        "VIN-K8S",
        w.rollout,
        "apps@2.0.0 in its canary",
        |v| {
            state_of(v)["workloads"][0]["release"] == "apps@2.0.0"
                && state_of(v)["workloads"][0]["phase"] == "canary"
        },
    )
    .await;
    let both = kube.deployments("nav-").await;
    assert_eq!(both.len(), 2, "old and new side by side: {both:?}");
    assert!(both.contains(&first[0]));
    let promoted = until_within(twin, "VIN-K8S", w.rollout, "apps@2.0.0 promoted", |v| {
        state_of(v)["release"] == "apps@2.0.0" && state_of(v)["phase"] == "committed"
    })
    .await;
    assert_eq!(state_of(&promoted)["workloads"][0]["phase"], "ready");
    let second = kube.deployments("nav-").await;
    assert_eq!(second.len(), 1, "the old version is removed: {second:?}");
    assert_ne!(second[0], first[0]);
    assert!(
        kube.object("", "configmaps", "legacy").await.is_none(),
        "a workload the new release dropped is removed"
    );
    assert!(kube.object("", "services", "nav").await.is_some());

    // 3.0.0 crash-loops: it is removed, the running version never stopped.
    let v3 = p.image("nav3", b"version 3");
    let (r3, refs) = p.release(
        "3.0.0",
        &[("acme/nav", &v3)],
        &format!(
            "{}{SERVICE}",
            deployment("nav", "ghcr.io/acme/nav:1.0", "", Run::Crash)
        ),
    );
    kube.fail(&refs[0], Failure::CrashLoop);
    p.desire("VIN-K8S", &r3);
    let back = until_within(twin, "VIN-K8S", w.rollout, "apps@3.0.0 rolled back", |v| {
        state_of(v)["release"] == "apps@3.0.0" && state_of(v)["phase"] == "rolled-back"
    })
    .await;
    let error = state_of(&back)["last_error"].as_str().unwrap_or("");
    assert!(error.contains("crash"), "{back}");
    // The cleanup follows the persisted verdict: wait for it, not for a time.
    let started = std::time::Instant::now();
    while kube.deployments("nav-").await != second {
        assert!(
            started.elapsed() < w.rollout,
            "the failed version is not removed: {:?}",
            kube.deployments("nav-").await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        kube.object("", "configmaps", "someone-elses")
            .await
            .is_some(),
        "an object the agent did not apply is never touched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replace_workload_that_never_gets_ready_is_rolled_back_to_the_previous_manifest() {
    let w = World::new().await;
    let (kube, twin, p) = (&w.kube, &w.twin, &w);
    let _agent = w.car("VIN-MODEM").await;
    let replace = "cardeploy.io/strategy: replace";

    let v1 = p.image("modem1", b"modem 1");
    let (r1, refs1) = p.release(
        "1.0.0",
        &[("acme/modem", &v1)],
        &deployment("modem", "ghcr.io/acme/modem:1.0", replace, Run::Serve),
    );
    p.desire("VIN-MODEM", &r1);
    until_within(twin, "VIN-MODEM", w.rollout, "apps@1.0.0 committed", |v| {
        state_of(v)["release"] == "apps@1.0.0" && state_of(v)["phase"] == "committed"
    })
    .await;
    let image = |d: &Value| d["spec"]["template"]["spec"]["containers"][0]["image"].clone();
    let d = kube.object("apps", "deployments", "modem").await.unwrap();
    assert_eq!(image(&d), refs1[0].as_str(), "in place, under its own name");

    let v2 = p.image("modem2", b"modem 2");
    let (r2, refs2) = p.release(
        "2.0.0",
        &[("acme/modem", &v2)],
        &deployment("modem", "ghcr.io/acme/modem:1.0", replace, Run::NeverReady),
    );
    kube.fail(&refs2[0], Failure::NeverReady);
    p.desire("VIN-MODEM", &r2);
    let back = until_within(
        twin,
        "VIN-MODEM",
        w.rollout,
        "apps@2.0.0 rolled back",
        |v| state_of(v)["release"] == "apps@2.0.0" && state_of(v)["phase"] == "rolled-back",
    )
    .await;
    assert!(
        state_of(&back)["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("not ready in time"),
        "{back}"
    );
    let started = std::time::Instant::now();
    loop {
        let d = kube.object("apps", "deployments", "modem").await.unwrap();
        if image(&d) == refs1[0].as_str() {
            break;
        }
        assert!(
            started.elapsed() < w.rollout,
            "the previous manifest is not back: {}",
            image(&d)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(kube.deployments("modem").await, vec!["modem".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_away_delays_the_rollout_and_the_twin_hears_why() {
    let w = World::new().await;
    let Some(double) = w.kube.double() else {
        eprintln!(
            "SKIPPED: stopping the API server needs the test kit's double, not the real cluster of CARDEPLOY_KUBECONFIG"
        );
        return;
    };
    let (kube, twin, p) = (&w.kube, &w.twin, &w);
    let _agent = w.car("VIN-AWAY").await;
    let v1 = p.image("away1", b"away 1");
    let (r1, _) = p.release(
        "1.0.0",
        &[("acme/away", &v1)],
        &deployment("away", "ghcr.io/acme/away:1.0", "", Run::Serve),
    );
    double.go_away();
    p.desire("VIN-AWAY", &r1);
    // The twin hears why nothing runs yet, once.
    let started = std::time::Instant::now();
    loop {
        let (_, events) =
            common::call(twin, "GET", "/api/v1/cars/VIN-AWAY/events?limit=100", None).await;
        let told = events["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "workloads")
            .count();
        if told > 0 {
            assert_eq!(told, 1, "said once, not every retry: {events}");
            break;
        }
        assert!(
            started.elapsed() < w.rollout,
            "no workloads event: {events}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    double.come_back().await;
    until_within(
        twin,
        "VIN-AWAY",
        w.rollout,
        "apps@1.0.0 committed once the API server is back",
        |v| state_of(v)["release"] == "apps@1.0.0" && state_of(v)["phase"] == "committed",
    )
    .await;
    assert_eq!(kube.deployments("away-").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_release_during_a_canary_rolls_the_canary_back_and_starts_from_what_ran() {
    let w = World::new().await;
    let (kube, twin, p) = (&w.kube, &w.twin, &w);
    // A canary long enough for the next desired state to arrive in it.
    let _agent = w.car_with("VIN-NEXT", 120).await;
    let v1 = p.image("next1", b"next 1");
    let (r1, _) = p.release(
        "1.0.0",
        &[("acme/nav", &v1)],
        &deployment("nav", "ghcr.io/acme/nav:1.0", "", Run::Serve),
    );
    p.desire("VIN-NEXT", &r1);
    until_within(twin, "VIN-NEXT", w.rollout, "apps@1.0.0 committed", |v| {
        state_of(v)["release"] == "apps@1.0.0" && state_of(v)["phase"] == "committed"
    })
    .await;
    let first = kube.deployments("nav-").await;
    let v2 = p.image("next2", b"next 2");
    let (r2, _) = p.release(
        "2.0.0",
        &[("acme/nav", &v2)],
        &deployment("nav", "ghcr.io/acme/nav:1.0", "", Run::Serve),
    );
    p.desire("VIN-NEXT", &r2);
    until_within(
        twin,
        "VIN-NEXT",
        w.rollout,
        "apps@2.0.0 in its canary",
        |v| {
            state_of(v)["workloads"][0]["release"] == "apps@2.0.0"
                && state_of(v)["workloads"][0]["phase"] == "canary"
        },
    )
    .await;
    let with_second = kube.deployments("nav-").await;
    assert_eq!(with_second.len(), 2, "{with_second:?}");
    let v3 = p.image("next3", b"next 3");
    let (r3, _) = p.release(
        "3.0.0",
        &[("acme/nav", &v3)],
        &deployment("nav", "ghcr.io/acme/nav:1.0", "", Run::Serve),
    );
    p.desire("VIN-NEXT", &r3);
    until_within(
        twin,
        "VIN-NEXT",
        w.rollout,
        "apps@3.0.0 in its canary",
        |v| {
            state_of(v)["workloads"][0]["release"] == "apps@3.0.0"
                && state_of(v)["workloads"][0]["phase"] == "canary"
        },
    )
    .await;
    let now = kube.deployments("nav-").await;
    assert_eq!(
        now.len(),
        2,
        "the new canary beside what ran before: {now:?}"
    );
    assert!(now.contains(&first[0]), "1.0.0 still runs: {now:?}");
    assert!(
        with_second
            .iter()
            .all(|d| d == &first[0] || !now.contains(d)),
        "2.0.0's version is removed: {now:?}"
    );
    let (_, events) =
        common::call(twin, "GET", "/api/v1/cars/VIN-NEXT/events?limit=100", None).await;
    assert!(
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "workloads"
                && e["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("superseded by apps@3.0.0")),
        "{events}"
    );
}
