//! The demo's containers step: a release's images served by the car's registry and its
//! workloads rolled out side by side — one canary promoted, one that crash-loops rolled back
//! while the running version never stops. k3s cannot run on our machines, so the car's API
//! server is the test kit's API-server double (a stand-in, strict where the real one is; it
//! runs Deployments' pods as a controller and kubelet would, and can make an image crash-loop).

use std::path::Path;

use anyhow::Context;
use cardeploy_testkit::kube::{ApiServerDouble, Failure};
use cardeploy_testkit::oci::{Layout, tar};
use serde_json::Value;

use super::cli::{CAR, Cli, Daemon, free_port, release};
use crate::sh::{run, step};

/// The Deployment and Service of the demo's navigation app, pinned by `cardeploy release
/// create` to the image it carries.
const NAV: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: nav}\nspec:\n  replicas: 2\n  selector:\n    matchLabels: {app: nav}\n  template:\n    metadata:\n      labels: {app: nav}\n    spec:\n      containers:\n      - {name: nav, image: 'ghcr.io/acme/nav:1.0'}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: nav}\nspec:\n  selector: {app: nav}\n  ports:\n  - {port: 80}\n";

/// `nav@version`: an arm64 image whose layer says `content`, and the manifests.
fn nav_release(cli: &Cli, data: &Path, version: &str, content: &[u8]) -> anyhow::Result<String> {
    let image = data.join("oci").join(format!("nav-{version}"));
    let layout = Layout::new(&image);
    let built = layout.image("arm64", &[tar(&[("srv/nav/VERSION", content)])]);
    layout.list(&[(&built.manifest, "1.0")]);
    let k8s = data.join(format!("k8s-nav-{version}"));
    std::fs::create_dir_all(&k8s)?;
    std::fs::write(k8s.join("nav.yaml"), NAV)?;
    let image_arg = format!("acme/nav={}", image.display());
    let k8s_arg = k8s.display().to_string();
    release(
        cli,
        data,
        "nav",
        version,
        &["--image", &image_arg, "--manifests", &k8s_arg],
    )
}

/// The image reference the release's workloads were rewritten to.
fn car_image(data: &Path, version: &str) -> anyhow::Result<String> {
    let path = data
        .join("releases")
        .join(format!("nav-{version}"))
        .join("release.json");
    let release: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    let manifest = release["images"][0]["manifest"]
        .as_str()
        .context("the release carries no image")?;
    Ok(format!(
        "registry.cardeploy.local/acme/nav@sha256:{manifest}"
    ))
}

fn navs(double: &ApiServerDouble) -> Vec<String> {
    double
        .names("apps", "deployments", "default")
        .into_iter()
        .filter(|n| n.starts_with("nav-"))
        .collect()
}

fn workloads(view: &Value) -> String {
    view["reported"]["state"]["workloads"]
        .as_array()
        .map(|w| {
            w.iter()
                .map(|w| {
                    format!(
                        "{} {} {} ({}/{} ready)",
                        w["name"].as_str().unwrap_or(""),
                        w["release"].as_str().unwrap_or(""),
                        w["phase"].as_str().unwrap_or(""),
                        w["ready_replicas"],
                        w["replicas"]
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
}

/// The step. `agent` is the running agent; it is restarted with `[containers]`, and the new
/// one is returned.
pub fn main(
    cli: &Cli,
    data: &Path,
    car_dir: &Path,
    agent: Daemon,
    start_agent: impl Fn() -> anyhow::Result<Daemon>,
) -> anyhow::Result<Daemon> {
    step(
        "containers: the car's registry and workloads side by side — a canary promoted, one rolled back (the car's k3s is the test kit's API-server double)",
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let double = runtime.block_on(ApiServerDouble::start());
    double.ready_after(std::time::Duration::from_millis(500));
    let kubeconfig = car_dir.join("kubeconfig");
    double.write_kubeconfig(&kubeconfig);
    drop(agent);
    let mut config = std::fs::read_to_string(car_dir.join("agent.toml"))?;
    config.push_str(&format!(
        "\n[containers]\nregistry = \"127.0.0.1:{}\"\nkubeconfig = \"{}\"\nready_secs = 20\ncanary_secs = 4\n",
        free_port()?,
        kubeconfig.display()
    ));
    std::fs::write(car_dir.join("agent.toml"), config)?;
    let agent = start_agent()?;

    let v1 = nav_release(cli, data, "1.0.0", b"nav 1.0.0\n")?;
    run(cli
        .cmd()
        .args(["car", "set-desired", CAR, "--release", &v1]))?;
    let took = cli.until("nav@1.0.0 to run", |v| {
        v["reported"]["state"]["release"] == "nav@1.0.0"
            && v["reported"]["state"]["phase"] == "committed"
    })?;
    println!(
        "  nav@1.0.0 runs after {took:?}: Deployments {:?}; {}",
        navs(&double),
        workloads(&cli.show()?)
    );

    let v2 = nav_release(cli, data, "2.0.0", b"nav 2.0.0\n")?;
    run(cli
        .cmd()
        .args(["car", "set-desired", CAR, "--release", &v2]))?;
    cli.until("nav@2.0.0's canary", |v| {
        v["reported"]["state"]["workloads"][0]["release"] == "nav@2.0.0"
            && v["reported"]["state"]["workloads"][0]["phase"] == "canary"
    })?;
    println!(
        "  canary: the new version beside the old, both serving: Deployments {:?}",
        navs(&double)
    );
    let took = cli.until("nav@2.0.0 promoted", |v| {
        v["reported"]["state"]["release"] == "nav@2.0.0"
            && v["reported"]["state"]["phase"] == "committed"
    })?;
    println!(
        "  promoted {took:?} later: Deployments {:?}; {}",
        navs(&double),
        workloads(&cli.show()?)
    );
    let running = navs(&double);

    let v3 = nav_release(cli, data, "3.0.0", b"nav 3.0.0, broken\n")?;
    double.fail(&car_image(data, "3.0.0")?, Failure::CrashLoop);
    run(cli
        .cmd()
        .args(["car", "set-desired", CAR, "--release", &v3]))?;
    let took = cli.until("nav@3.0.0 rolled back", |v| {
        v["reported"]["state"]["release"] == "nav@3.0.0"
            && v["reported"]["state"]["phase"] == "rolled-back"
    })?;
    let view = cli.show()?;
    println!(
        "  nav@3.0.0 crash-looped and was rolled back {took:?} after its desired state: {}",
        view["reported"]["state"]["last_error"]
    );
    anyhow::ensure!(
        navs(&double) == running,
        "the running version should be untouched: {:?} vs {running:?}",
        navs(&double)
    );
    println!("  nav@2.0.0 never stopped: Deployments {:?}", navs(&double));
    drop(double);
    drop(runtime);
    Ok(agent)
}
