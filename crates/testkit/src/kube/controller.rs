//! What the double does in place of the controllers and the kubelet: a Deployment gets its Pods
//! (one set per pod template, as a ReplicaSet would hold them; a new template replaces the old
//! set), Pods become Ready, and the Deployment's status says so. Failures are injected by image:
//! a Pod whose container runs an image marked `NeverReady` runs but never passes readiness; one
//! marked `CrashLoop` restarts again and again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::store::{Event, Key, Resource, Store};

/// A failure injected for every Pod that runs a given image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Running, never Ready (a readiness probe that never passes).
    NeverReady,
    /// The container exits at once and is restarted, again and again (CrashLoopBackOff).
    CrashLoop,
}

/// How Pods behave: the time they take to become Ready, and the failures by image.
#[derive(Clone, Debug, Default)]
pub struct Behaviour {
    pub ready_after: Duration,
    pub failures: BTreeMap<String, Failure>,
}

/// When each Pod started (the double's notion of the kubelet's clock).
#[derive(Default)]
pub struct Clock {
    started: BTreeMap<Key, Instant>,
}

fn deployments() -> Resource {
    Resource::new("apps", "v1", "deployments")
}

fn pods() -> Resource {
    Resource::new("", "v1", "pods")
}

/// A short stable hash of the pod template, as the pod-template-hash label carries one.
fn template_hash(template: &Value) -> String {
    let digest = cardeploy_chunks::Digest::of(template.to_string().as_bytes());
    digest.hex()[..10].to_owned()
}

/// Brings every Pod and Deployment status in line with the Deployments and the behaviour.
/// Returns the events that made.
pub fn reconcile(store: &mut Store, clock: &mut Clock, behaviour: &Behaviour) -> Vec<Event> {
    let mut events = Vec::new();
    let deployments: Vec<(Key, Value)> = store
        .objects
        .iter()
        .filter(|(k, _)| k.resource == deployments())
        .map(|(k, s)| (k.clone(), s.object.clone()))
        .collect();
    // Pods whose Deployment is gone, or whose template is not the current one, go.
    let wanted: BTreeMap<Key, (Key, Value)> = deployments
        .iter()
        .flat_map(|(dkey, d)| {
            wanted_pods(dkey, d)
                .into_iter()
                .map(move |(k, p)| (k, (dkey.clone(), p)))
        })
        .collect();
    let stale: Vec<Key> = store
        .objects
        .iter()
        .filter(|(k, s)| {
            k.resource == pods()
                && s.object["metadata"]["ownerReferences"].is_array()
                && !wanted.contains_key(*k)
        })
        .map(|(k, _)| k.clone())
        .collect();
    for k in stale {
        clock.started.remove(&k);
        events.extend(store.delete(&k));
    }
    let now = Instant::now();
    for (pkey, (_, mut pod)) in wanted {
        let started = *clock.started.entry(pkey.clone()).or_insert(now);
        pod["status"] = pod_status(&pod, now.duration_since(started), behaviour);
        events.extend(store.put_by_controller(&pkey, pod));
    }
    for (dkey, d) in deployments {
        let mut d2 = d.clone();
        d2["status"] = deployment_status(store, &dkey, &d);
        events.extend(store.put_by_controller(&dkey, d2));
    }
    events
}

fn wanted_pods(dkey: &Key, d: &Value) -> Vec<(Key, Value)> {
    let replicas = d["spec"]["replicas"].as_u64().unwrap_or(1);
    let template = &d["spec"]["template"];
    let hash = template_hash(template);
    (0..replicas)
        .map(|i| {
            let name = format!("{}-{hash}-{i}", dkey.name);
            let mut labels = template["metadata"]["labels"].clone();
            if !labels.is_object() {
                labels = json!({});
            }
            labels["pod-template-hash"] = json!(hash);
            let pod = json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "namespace": dkey.namespace,
                    "labels": labels,
                    "ownerReferences": [{
                        "apiVersion": "apps/v1", "kind": "Deployment", "name": dkey.name,
                        "uid": d["metadata"]["uid"], "controller": true,
                    }],
                    "creationTimestamp": "2026-01-01T00:00:00Z",
                },
                "spec": template["spec"],
            });
            (
                Key {
                    resource: pods(),
                    namespace: dkey.namespace.clone(),
                    name,
                },
                pod,
            )
        })
        .collect()
}

fn pod_status(pod: &Value, age: Duration, behaviour: &Behaviour) -> Value {
    let containers = pod["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut all_ready = true;
    let statuses: Vec<Value> = containers
        .iter()
        .map(|c| {
            let image = c["image"].as_str().unwrap_or("");
            let name = c["name"].clone();
            match behaviour.failures.get(image) {
                Some(Failure::CrashLoop) => {
                    all_ready = false;
                    // One restart per 100 ms of the Pod's life: a test sees the count climb.
                    let restarts = (age.as_millis() / 100) as u64 + 1;
                    json!({"name": name, "image": image, "ready": false, "restartCount": restarts,
                           "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off restarting failed container"}},
                           "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}})
                }
                Some(Failure::NeverReady) => {
                    all_ready = false;
                    json!({"name": name, "image": image, "ready": false, "restartCount": 0,
                           "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}})
                }
                None => {
                    let ready = age >= behaviour.ready_after;
                    all_ready &= ready;
                    json!({"name": name, "image": image, "ready": ready, "restartCount": 0,
                           "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}})
                }
            }
        })
        .collect();
    let ready = if all_ready { "True" } else { "False" };
    json!({
        "phase": "Running",
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "ContainersReady", "status": ready},
            {"type": "Ready", "status": ready},
        ],
        "containerStatuses": statuses,
    })
}

fn deployment_status(store: &Store, dkey: &Key, d: &Value) -> Value {
    let hash = template_hash(&d["spec"]["template"]);
    let replicas = d["spec"]["replicas"].as_u64().unwrap_or(1);
    let owned: Vec<&Value> = store
        .objects
        .iter()
        .filter(|(k, s)| {
            k.resource == pods()
                && k.namespace == dkey.namespace
                && s.object["metadata"]["ownerReferences"][0]["name"] == dkey.name.as_str()
        })
        .map(|(_, s)| &s.object)
        .collect();
    let updated = owned
        .iter()
        .filter(|p| p["metadata"]["labels"]["pod-template-hash"] == hash.as_str())
        .count() as u64;
    let ready = owned
        .iter()
        .filter(|p| {
            p["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        })
        .count() as u64;
    let available = if ready >= replicas { "True" } else { "False" };
    json!({
        "observedGeneration": d["metadata"]["generation"],
        "replicas": owned.len(),
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": ready,
        "unavailableReplicas": replicas.saturating_sub(ready),
        "conditions": [
            {"type": "Available", "status": available, "reason": if ready >= replicas { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" }},
            {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"},
        ],
    })
}
