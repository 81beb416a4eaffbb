//! The API-server double against a client nobody here wrote (kube-rs, the client the agent
//! uses): each test holds the double to what the real API server does for that request.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use cardeploy_testkit::kube::{ApiServerDouble, Failure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::wait::await_condition;
use kube::{Api, Client};
use serde_json::json;

async fn client(double: &ApiServerDouble) -> Client {
    let config = kube::Config::new(double.url().parse().unwrap());
    Client::try_from(config).unwrap()
}

fn deployment(name: &str, image: &str, replicas: i32) -> serde_json::Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                         "spec": {"containers": [{"name": name, "image": image}]}}
        }
    })
}

/// Server-side apply as the agent does it (field manager `cardeploy`); the object back.
async fn apply(api: &Api<Deployment>, object: serde_json::Value) -> Deployment {
    let name = object["metadata"]["name"].as_str().unwrap().to_owned();
    api.patch(
        &name,
        &PatchParams::apply("cardeploy"),
        &Patch::Apply(object),
    )
    .await
    .unwrap()
}

fn ready(replicas: i32) -> impl Fn(Option<&Deployment>) -> bool {
    move |d: Option<&Deployment>| {
        d.and_then(|d| d.status.as_ref()).is_some_and(|s| {
            s.ready_replicas == Some(replicas) && s.updated_replicas == Some(replicas)
        })
    }
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

#[tokio::test]
async fn server_side_apply_makes_a_deployment_whose_pods_become_ready() {
    let double = ApiServerDouble::start().await;
    let deployments: Api<Deployment> = Api::namespaced(client(&double).await, "default");
    let params = PatchParams::apply("cardeploy");
    let applied = deployments
        .patch("nav", &params, &Patch::Apply(deployment("nav", "nav:1", 2)))
        .await
        .unwrap();
    assert_eq!(applied.metadata.generation, Some(1));
    let fields = applied.metadata.managed_fields.unwrap();
    assert_eq!(fields[0].manager.as_deref(), Some("cardeploy"));
    within(
        "nav ready",
        await_condition(deployments.clone(), "nav", ready(2)),
    )
    .await
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&double).await, "default");
    let listed = pods
        .list(&ListParams::default().labels("app=nav"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 2);
    // The same apply again changes nothing: same resource version.
    let again = deployments
        .patch("nav", &params, &Patch::Apply(deployment("nav", "nav:1", 2)))
        .await
        .unwrap();
    let now = deployments.get("nav").await.unwrap();
    assert_eq!(
        again.metadata.resource_version,
        now.metadata.resource_version
    );
}

#[tokio::test]
async fn apply_needs_its_content_type_and_a_field_manager() {
    let double = ApiServerDouble::start().await;
    let deployments: Api<Deployment> = Api::namespaced(client(&double).await, "default");
    let merge = deployments
        .patch(
            "nav",
            &PatchParams::default(),
            &Patch::Merge(deployment("nav", "nav:1", 1)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(merge, kube::Error::Api(ref e) if e.code == 415),
        "{merge}"
    );
    let no_manager = reqwest_like_apply(&double, "").await;
    assert_eq!(no_manager.0, 400, "{}", no_manager.1);
    assert!(
        no_manager.1.contains("fieldManager: Required value"),
        "{}",
        no_manager.1
    );
}

/// An apply with the field manager given verbatim (kube refuses to send an empty one).
async fn reqwest_like_apply(double: &ApiServerDouble, manager: &str) -> (u16, String) {
    let url = format!(
        "{}/apis/apps/v1/namespaces/default/deployments/nav?fieldManager={manager}",
        double.url()
    );
    let body = deployment("nav", "nav:1", 1).to_string();
    tokio::task::spawn_blocking(move || {
        let mut response = cardeploy_testkit::procs::http()
            .patch(&url)
            .header("Content-Type", "application/apply-patch+yaml")
            .send(body.as_bytes())
            .unwrap();
        (
            response.status().as_u16(),
            response.body_mut().read_to_string().unwrap(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_field_another_manager_owns_conflicts_unless_forced() {
    let double = ApiServerDouble::start().await;
    let deployments: Api<Deployment> = Api::namespaced(client(&double).await, "default");
    apply(&deployments, deployment("nav", "nav:1", 1)).await;
    let err = deployments
        .patch(
            "nav",
            &PatchParams::apply("kubectl"),
            &Patch::Apply(deployment("nav", "nav:1", 3)),
        )
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(e) => {
            assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
            assert!(
                e.message.contains("conflict with \"cardeploy\"")
                    && e.message.contains(".spec.replicas"),
                "{}",
                e.message
            );
        }
        other => panic!("not a conflict: {other}"),
    }
    let forced = deployments
        .patch(
            "nav",
            &PatchParams::apply("kubectl").force(),
            &Patch::Apply(deployment("nav", "nav:1", 3)),
        )
        .await
        .unwrap();
    assert_eq!(forced.spec.unwrap().replicas, Some(3));
}

#[tokio::test]
async fn a_new_template_replaces_the_pods_and_a_delete_takes_them_away() {
    let double = ApiServerDouble::start().await;
    let c = client(&double).await;
    let deployments: Api<Deployment> = Api::namespaced(c.clone(), "default");
    let params = PatchParams::apply("cardeploy");
    deployments
        .patch("nav", &params, &Patch::Apply(deployment("nav", "nav:1", 1)))
        .await
        .unwrap();
    within(
        "nav:1 ready",
        await_condition(deployments.clone(), "nav", ready(1)),
    )
    .await
    .unwrap();
    let before = double.names("", "pods", "default");
    let v2 = deployments
        .patch("nav", &params, &Patch::Apply(deployment("nav", "nav:2", 1)))
        .await
        .unwrap();
    assert_eq!(v2.metadata.generation, Some(2));
    within(
        "nav:2 ready",
        await_condition(deployments.clone(), "nav", ready(1)),
    )
    .await
    .unwrap();
    let after = double.names("", "pods", "default");
    assert_eq!(after.len(), 1);
    assert_ne!(before, after, "a new template, new pods");
    deployments
        .delete("nav", &DeleteParams::default())
        .await
        .unwrap();
    assert!(double.names("", "pods", "default").is_empty());
    assert!(deployments.get_opt("nav").await.unwrap().is_none());
}

#[tokio::test]
async fn injected_failures_show_as_the_kubelet_would_report_them() {
    let double = ApiServerDouble::start().await;
    double.fail("nav:crash", Failure::CrashLoop);
    double.fail("nav:stuck", Failure::NeverReady);
    let c = client(&double).await;
    let deployments: Api<Deployment> = Api::namespaced(c.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(c, "default");
    let params = PatchParams::apply("cardeploy");
    deployments
        .patch(
            "crash",
            &params,
            &Patch::Apply(deployment("crash", "nav:crash", 1)),
        )
        .await
        .unwrap();
    deployments
        .patch(
            "stuck",
            &params,
            &Patch::Apply(deployment("stuck", "nav:stuck", 1)),
        )
        .await
        .unwrap();
    let crashing = |p: Option<&Pod>| {
        p.and_then(|p| p.status.as_ref())
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|c| c[0].restart_count >= 3 && !c[0].ready)
    };
    let name = double
        .names("", "pods", "default")
        .into_iter()
        .find(|n| n.starts_with("crash-"))
        .unwrap();
    within(
        "restarts to climb",
        await_condition(pods.clone(), &name, crashing),
    )
    .await
    .unwrap();
    let pod = pods.get(&name).await.unwrap();
    let waiting = pod.status.unwrap().container_statuses.unwrap()[0]
        .state
        .clone()
        .unwrap()
        .waiting
        .unwrap();
    assert_eq!(waiting.reason.as_deref(), Some("CrashLoopBackOff"));
    let stuck = deployments.get("stuck").await.unwrap().status.unwrap();
    assert_eq!((stuck.replicas, stuck.ready_replicas), (Some(1), Some(0)));
}

#[tokio::test]
async fn objects_only_go_into_namespaces_that_exist() {
    let double = ApiServerDouble::start().await;
    let deployments: Api<Deployment> = Api::namespaced(client(&double).await, "infotainment");
    let err = deployments
        .patch(
            "nav",
            &PatchParams::apply("cardeploy"),
            &Patch::Apply(deployment("nav", "nav:1", 1)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 404 && e.message.contains("namespaces \"infotainment\" not found")),
        "{err}"
    );
}

#[tokio::test]
async fn discovery_names_the_kinds_served() {
    let double = ApiServerDouble::start().await;
    let discovery = kube::Discovery::new(client(&double).await)
        .run()
        .await
        .unwrap();
    let kinds: Vec<String> = discovery
        .groups()
        .flat_map(|g| g.recommended_resources().into_iter().map(|(r, _)| r.kind))
        .collect();
    for kind in ["Deployment", "Pod", "Service", "ConfigMap", "Namespace"] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} in {kinds:?}");
    }
}

#[tokio::test]
async fn the_api_server_can_go_away_and_come_back_with_its_objects() {
    let double = ApiServerDouble::start().await;
    let deployments: Api<Deployment> = Api::namespaced(client(&double).await, "default");
    apply(&deployments, deployment("nav", "nav:1", 1)).await;
    double.go_away();
    let gone = within("a refused connection", deployments.get("nav")).await;
    assert!(gone.is_err(), "the API server is away");
    double.come_back().await;
    let fresh: Api<Deployment> = Api::namespaced(client(&double).await, "default");
    assert!(fresh.get("nav").await.is_ok());
}
