//! The car's k3s as the agent uses it, through kube: server-side apply under the agent's own
//! field manager, deletion of what the agent applied (only while it still carries the agent's
//! mark), and the health of a Deployment from its status and its pods.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::{ApiCapabilities, ApiResource, Scope};

use super::manifests::{MANAGED_BY, MANAGER, Object, ObjectRef};

/// The field manager of everything the agent applies.
pub const FIELD_MANAGER: &str = "cardeploy";

/// A failed call to the car's API server, with what the agent was doing.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct ClusterError {
    pub what: String,
    #[source]
    pub source: kube::Error,
}

/// The agent's client of the car's API server.
pub struct Cluster {
    client: Client,
    /// What discovery said about each kind (asked once per kind).
    kinds: Mutex<HashMap<(String, String), (ApiResource, ApiCapabilities)>>,
}

/// A Deployment's health as the agent judges it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Health {
    pub replicas: u32,
    pub ready: u32,
    /// Every wanted pod is of the current template and ready.
    pub ready_all: bool,
    /// Container restarts across its pods.
    pub restarts: u32,
    /// Why it cannot become ready by waiting (a crash loop), or what it waits for.
    pub problem: Option<String>,
    /// The problem is a crash loop: waiting does not help.
    pub crashing: bool,
}

impl Cluster {
    /// A client from a kubeconfig file (k3s writes `/etc/rancher/k3s/k3s.yaml`).
    pub async fn connect(kubeconfig: &Path) -> Result<Self, crate::Error> {
        let bad = |why: String| crate::Error::Kubeconfig {
            path: kubeconfig.to_owned(),
            why,
        };
        let file = Kubeconfig::read_from(kubeconfig).map_err(|e| bad(e.to_string()))?;
        let config = kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
            .await
            .map_err(|e| bad(e.to_string()))?;
        let client = Client::try_from(config).map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            client,
            kinds: Mutex::new(HashMap::new()),
        })
    }

    async fn api(&self, r: &ObjectRef) -> Result<Api<DynamicObject>, ClusterError> {
        let key = (r.api_version.clone(), r.kind.clone());
        let known = self
            .kinds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
            .cloned();
        let (resource, caps) = match known {
            Some(k) => k,
            None => {
                let (group, version) = match r.api_version.split_once('/') {
                    Some((g, v)) => (g, v),
                    None => ("", r.api_version.as_str()),
                };
                let gvk = kube::api::GroupVersionKind::gvk(group, version, &r.kind);
                let found = kube::discovery::pinned_kind(&self.client, &gvk)
                    .await
                    .map_err(|source| ClusterError {
                        what: format!("the API server does not serve {} {}", r.api_version, r.kind),
                        source,
                    })?;
                self.kinds
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(key, found.clone());
                found
            }
        };
        Ok(match caps.scope {
            Scope::Namespaced => Api::namespaced_with(
                self.client.clone(),
                r.namespace.as_deref().unwrap_or("default"),
                &resource,
            ),
            Scope::Cluster => Api::all_with(self.client.clone(), &resource),
        })
    }

    /// Server-side apply under the agent's field manager. Forced: fields someone changed by
    /// hand on an object of the release go back to what the signed release says.
    pub async fn apply(&self, object: &Object) -> Result<(), ClusterError> {
        let api = self.api(&object.reference).await?;
        api.patch(
            &object.reference.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&object.body),
        )
        .await
        .map_err(|source| ClusterError {
            what: format!("apply {}", object.reference),
            source,
        })?;
        Ok(())
    }

    /// Delete an object the agent applied, if it is still there and still carries the agent's
    /// mark (someone may have taken it over since: then it is left alone). Returns whether it
    /// was deleted.
    pub async fn delete(&self, r: &ObjectRef) -> Result<bool, ClusterError> {
        let api = self.api(r).await?;
        let err = |source| ClusterError {
            what: format!("delete {r}"),
            source,
        };
        let Some(found) = api.get_opt(&r.name).await.map_err(err)? else {
            return Ok(false);
        };
        let ours = found
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGED_BY))
            .is_some_and(|v| v == MANAGER);
        if !ours {
            tracing::warn!(object = %r, "no longer carries the agent's mark: left alone");
            return Ok(false);
        }
        match api.delete(&r.name, &DeleteParams::background()).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
            Err(e) => Err(err(e)),
        }
    }

    /// The health of the Deployment `r`: its status and its pods' containers.
    pub async fn health(&self, r: &ObjectRef, crash_restarts: u32) -> Result<Health, ClusterError> {
        let ns = r.namespace.as_deref().unwrap_or("default");
        let err = |source| ClusterError {
            what: format!("read {r}"),
            source,
        };
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), ns);
        let Some(d) = deployments.get_opt(&r.name).await.map_err(err)? else {
            return Ok(Health {
                problem: Some("not on the API server".into()),
                ..Health::default()
            });
        };
        let spec = d.spec.unwrap_or_default();
        let replicas = spec.replicas.unwrap_or(1).max(0) as u32;
        let status = d.status.unwrap_or_default();
        let observed =
            status.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0);
        let num = |v: Option<i32>| v.unwrap_or(0).max(0) as u32;
        let ready = num(status.ready_replicas);
        let updated = num(status.updated_replicas);
        let mut health = Health {
            replicas,
            ready,
            ready_all: observed && updated == replicas && ready >= replicas,
            ..Health::default()
        };
        let selector = spec
            .selector
            .match_labels
            .unwrap_or_default()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let list = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(err)?;
        for pod in list.items {
            let pod_name = pod.metadata.name.unwrap_or_default();
            for c in pod
                .status
                .and_then(|s| s.container_statuses)
                .unwrap_or_default()
            {
                let restarts = c.restart_count.max(0) as u32;
                health.restarts += restarts;
                let waiting = c.state.and_then(|s| s.waiting);
                let reason = waiting.as_ref().and_then(|w| w.reason.clone());
                if reason.as_deref() == Some("CrashLoopBackOff") || restarts >= crash_restarts {
                    health.crashing = true;
                    health.problem = Some(format!(
                        "container {} of pod {pod_name} crash-loops ({restarts} restarts{})",
                        c.name,
                        reason.map_or(String::new(), |r| format!(", {r}"))
                    ));
                } else if health.problem.is_none()
                    && let Some(reason) = reason
                {
                    let message = waiting.and_then(|w| w.message).unwrap_or_default();
                    health.problem = Some(format!(
                        "container {} of pod {pod_name} waits: {reason} {message}",
                        c.name
                    ));
                } else if health.problem.is_none() && !c.ready {
                    health.problem = Some(format!(
                        "container {} of pod {pod_name} is not ready",
                        c.name
                    ));
                }
            }
        }
        if !health.ready_all && health.problem.is_none() {
            health.problem = Some(format!("{ready} of {replicas} replicas ready"));
        }
        Ok(health)
    }
}
