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

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use cardeploy_testkit::kube::{ApiServerDouble, Failure};
use cardeploy_testkit::oci::{Layout, tar};
use cardeploy_testkit::signing::COMPATIBLE;
use common::pipeline::{cardeploy, keys_and_root};
use common::{Agent, Env, until_within};
use serde_json::Value;

/// How long the tests give a rollout: ready deadline and canary time are seconds.
const ROLLOUT: Duration = Duration::from_secs(30);

/// One test's world: the API-server double standing in for the car's k3s, a twin, and the
/// pipeline's keys and root made with the CLI in a working directory.
struct World {
    double: ApiServerDouble,
    env: Env,
    twin: cardeploy_twin::Running,
    work: tempfile::TempDir,
}

impl World {
    async fn new() -> Self {
        let double = ApiServerDouble::start().await;
        let env = Env::new();
        env.no_root.set(true).unwrap();
        let twin = env.twin().await;
        let work = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(work.path().join("keys")).unwrap();
        keys_and_root(work.path(), &twin, &env);
        Self {
            double,
            env,
            twin,
            work,
        }
    }

    fn dir(&self) -> &Path {
        self.work.path()
    }

    /// A car with `[containers]` naming the double, its agent started.
    async fn car(&self, id: &str) -> Agent {
        self.car_with(id, 2).await
    }

    /// The same with a canary time of `canary_secs`.
    async fn car_with(&self, id: &str, canary_secs: u64) -> Agent {
        let kubeconfig = self.dir().join("kubeconfig");
        self.double.write_kubeconfig(&kubeconfig);
        let port = common::free_port();
        let config = self
            .env
            .car_config(
                &self.twin,
                id,
                &format!("localhost:{}", self.env.cars_port),
                &self.dir().join("root.json"),
                &format!(
                    "[containers]\nregistry = \"127.0.0.1:{port}\"\nkubeconfig = \"{}\"\nready_secs = 4\ncanary_secs = {canary_secs}\n",
                    kubeconfig.display()
                ),
            )
            .await;
        Agent::start(&config)
    }

    /// An arm64 image `name` whose one layer holds `content`, as a layout under `oci/`.
    fn image(&self, name: &str, content: &[u8]) -> String {
        let dir = self.dir().join("oci").join(name);
        let _ = std::fs::remove_dir_all(&dir);
        let layout = Layout::new(&dir);
        let image = layout.image("arm64", &[tar(&[("srv/app", content)])]);
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

fn deployment(name: &str, image: &str, extra_annotations: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\n  annotations: {{{extra_annotations}}}\nspec:\n  replicas: 2\n  selector:\n    matchLabels: {{app: {name}}}\n  template:\n    metadata:\n      labels: {{app: {name}}}\n    spec:\n      containers:\n      - {{name: main, image: '{image}'}}\n---\n"
    )
}

const SERVICE: &str =
    "apiVersion: v1\nkind: Service\nmetadata: {name: nav}\nspec:\n  selector: {app: nav}\n---\n";

/// The names of the Deployments in `default` that start with `prefix`.
fn deployments(double: &ApiServerDouble, prefix: &str) -> Vec<String> {
    double
        .names("apps", "deployments", "default")
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect()
}

fn state_of(v: &Value) -> &Value {
    &v["reported"]["state"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_runs_beside_the_old_is_promoted_and_a_crash_loop_is_rolled_back() {
    let w = World::new().await;
    let (double, twin, p) = (&w.double, &w.twin, &w);
    double.ready_after(Duration::from_millis(300));
    let _agent = w.car("VIN-K8S").await;

    // Something the agent did not apply, in the same namespace: it must survive every prune.
    let theirs = kube_client(double);
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
            deployment("nav", "ghcr.io/acme/nav:1.0", "")
        ),
    );
    p.desire("VIN-K8S", &r1);
    let seen = until_within(twin, "VIN-K8S", ROLLOUT, "apps@1.0.0 committed", |v| {
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
    let first = deployments(double, "nav-");
    assert_eq!(first.len(), 1, "{first:?}");
    let d = double
        .object("apps", "deployments", "default", &first[0])
        .unwrap();
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
    assert!(
        double
            .object("", "configmaps", "default", "legacy")
            .is_some()
    );

    // 2.0.0: a new nav beside the old one until its canary time is over; `legacy` dropped.
    let v2 = p.image("nav2", b"version 2");
    let (r2, _) = p.release(
        "2.0.0",
        &[("acme/nav", &v2)],
        &format!("{}{SERVICE}", deployment("nav", "ghcr.io/acme/nav:1.0", "")),
    );
    p.desire("VIN-K8S", &r2);
    until_within(twin, "VIN-K8S", ROLLOUT, "apps@2.0.0 in its canary", |v| {
        state_of(v)["workloads"][0]["release"] == "apps@2.0.0"
            && state_of(v)["workloads"][0]["phase"] == "canary"
    })
    .await;
    let both = deployments(double, "nav-");
    assert_eq!(both.len(), 2, "old and new side by side: {both:?}");
    assert!(both.contains(&first[0]));
    let promoted = until_within(twin, "VIN-K8S", ROLLOUT, "apps@2.0.0 promoted", |v| {
        state_of(v)["release"] == "apps@2.0.0" && state_of(v)["phase"] == "committed"
    })
    .await;
    assert_eq!(state_of(&promoted)["workloads"][0]["phase"], "ready");
    let second = deployments(double, "nav-");
    assert_eq!(second.len(), 1, "the old version is removed: {second:?}");
    assert_ne!(second[0], first[0]);
    assert!(
        double
            .object("", "configmaps", "default", "legacy")
            .is_none(),
        "a workload the new release dropped is removed"
    );
    assert!(double.object("", "services", "default", "nav").is_some());

    // 3.0.0 crash-loops: it is removed, the running version never stopped.
    let v3 = p.image("nav3", b"version 3");
    let (r3, refs) = p.release(
        "3.0.0",
        &[("acme/nav", &v3)],
        &format!("{}{SERVICE}", deployment("nav", "ghcr.io/acme/nav:1.0", "")),
    );
    double.fail(&refs[0], Failure::CrashLoop);
    p.desire("VIN-K8S", &r3);
    let back = until_within(twin, "VIN-K8S", ROLLOUT, "apps@3.0.0 rolled back", |v| {
        state_of(v)["release"] == "apps@3.0.0" && state_of(v)["phase"] == "rolled-back"
    })
    .await;
    let error = state_of(&back)["last_error"].as_str().unwrap_or("");
    assert!(error.contains("crash"), "{back}");
    // The cleanup follows the persisted verdict: wait for it, not for a time.
    let started = std::time::Instant::now();
    while deployments(double, "nav-") != second {
        assert!(
            started.elapsed() < ROLLOUT,
            "the failed version is not removed: {:?}",
            deployments(double, "nav-")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        double
            .object("", "configmaps", "default", "someone-elses")
            .is_some(),
        "an object the agent did not apply is never touched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replace_workload_that_never_gets_ready_is_rolled_back_to_the_previous_manifest() {
    let w = World::new().await;
    let (double, twin, p) = (&w.double, &w.twin, &w);
    let _agent = w.car("VIN-MODEM").await;
    let replace = "cardeploy.io/strategy: replace";

    let v1 = p.image("modem1", b"modem 1");
    let (r1, refs1) = p.release(
        "1.0.0",
        &[("acme/modem", &v1)],
        &deployment("modem", "ghcr.io/acme/modem:1.0", replace),
    );
    p.desire("VIN-MODEM", &r1);
    until_within(twin, "VIN-MODEM", ROLLOUT, "apps@1.0.0 committed", |v| {
        state_of(v)["release"] == "apps@1.0.0" && state_of(v)["phase"] == "committed"
    })
    .await;
    let image = |d: &Value| d["spec"]["template"]["spec"]["containers"][0]["image"].clone();
    let d = double
        .object("apps", "deployments", "default", "modem")
        .unwrap();
    assert_eq!(image(&d), refs1[0].as_str(), "in place, under its own name");

    let v2 = p.image("modem2", b"modem 2");
    let (r2, refs2) = p.release(
        "2.0.0",
        &[("acme/modem", &v2)],
        &deployment("modem", "ghcr.io/acme/modem:1.0", replace),
    );
    double.fail(&refs2[0], Failure::NeverReady);
    p.desire("VIN-MODEM", &r2);
    let back = until_within(twin, "VIN-MODEM", ROLLOUT, "apps@2.0.0 rolled back", |v| {
        state_of(v)["release"] == "apps@2.0.0" && state_of(v)["phase"] == "rolled-back"
    })
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
        let d = double
            .object("apps", "deployments", "default", "modem")
            .unwrap();
        if image(&d) == refs1[0].as_str() {
            break;
        }
        assert!(
            started.elapsed() < ROLLOUT,
            "the previous manifest is not back: {}",
            image(&d)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(deployments(double, "modem"), vec!["modem".to_owned()]);
}

fn kube_client(double: &ApiServerDouble) -> kube::Client {
    kube::Client::try_from(kube::Config::new(double.url().parse().unwrap())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_away_delays_the_rollout_and_the_twin_hears_why() {
    let w = World::new().await;
    let (double, twin, p) = (&w.double, &w.twin, &w);
    let _agent = w.car("VIN-AWAY").await;
    let v1 = p.image("away1", b"away 1");
    let (r1, _) = p.release(
        "1.0.0",
        &[("acme/away", &v1)],
        &deployment("away", "ghcr.io/acme/away:1.0", ""),
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
        assert!(started.elapsed() < ROLLOUT, "no workloads event: {events}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    double.come_back().await;
    until_within(
        twin,
        "VIN-AWAY",
        ROLLOUT,
        "apps@1.0.0 committed once the API server is back",
        |v| state_of(v)["release"] == "apps@1.0.0" && state_of(v)["phase"] == "committed",
    )
    .await;
    assert_eq!(deployments(double, "away-").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_release_during_a_canary_rolls_the_canary_back_and_starts_from_what_ran() {
    let w = World::new().await;
    let (double, twin, p) = (&w.double, &w.twin, &w);
    // A canary long enough for the next desired state to arrive in it.
    let _agent = w.car_with("VIN-NEXT", 120).await;
    let v1 = p.image("next1", b"next 1");
    let (r1, _) = p.release(
        "1.0.0",
        &[("acme/nav", &v1)],
        &deployment("nav", "ghcr.io/acme/nav:1.0", ""),
    );
    p.desire("VIN-NEXT", &r1);
    until_within(twin, "VIN-NEXT", ROLLOUT, "apps@1.0.0 committed", |v| {
        state_of(v)["release"] == "apps@1.0.0" && state_of(v)["phase"] == "committed"
    })
    .await;
    let first = deployments(double, "nav-");
    let v2 = p.image("next2", b"next 2");
    let (r2, _) = p.release(
        "2.0.0",
        &[("acme/nav", &v2)],
        &deployment("nav", "ghcr.io/acme/nav:1.0", ""),
    );
    p.desire("VIN-NEXT", &r2);
    until_within(twin, "VIN-NEXT", ROLLOUT, "apps@2.0.0 in its canary", |v| {
        state_of(v)["workloads"][0]["release"] == "apps@2.0.0"
            && state_of(v)["workloads"][0]["phase"] == "canary"
    })
    .await;
    let with_second = deployments(double, "nav-");
    assert_eq!(with_second.len(), 2, "{with_second:?}");
    let v3 = p.image("next3", b"next 3");
    let (r3, _) = p.release(
        "3.0.0",
        &[("acme/nav", &v3)],
        &deployment("nav", "ghcr.io/acme/nav:1.0", ""),
    );
    p.desire("VIN-NEXT", &r3);
    until_within(twin, "VIN-NEXT", ROLLOUT, "apps@3.0.0 in its canary", |v| {
        state_of(v)["workloads"][0]["release"] == "apps@3.0.0"
            && state_of(v)["workloads"][0]["phase"] == "canary"
    })
    .await;
    let now = deployments(double, "nav-");
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
