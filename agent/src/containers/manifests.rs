//! A release's workloads as the objects the agent applies to the car's k3s. Pure: the
//! manifests come in as JSON (what `cardeploy release create` stored), the objects go out with
//! the agent's marks on them.
//!
//! - Every object carries `app.kubernetes.io/managed-by: cardeploy` and the workload it belongs
//!   to; the release is an annotation. The agent deletes only objects it applied itself (it
//!   keeps their references in its state) and only when they still carry its mark.
//! - A Deployment runs **side by side** by default: it is applied under its name plus a revision
//!   (the first 10 hex digits of the sha256 of the object as the release states it), its
//!   selector and pod labels carry that revision, so a new version starts beside the running
//!   one and a Service that selects the workload's own labels reaches both. An unchanged
//!   Deployment keeps its revision, so a release that does not change it does not restart it.
//! - `cardeploy.io/strategy: replace` on a Deployment (one that owns a device or a port and
//!   cannot run twice) keeps its name: the new version replaces the old one in place, and a
//!   rollback applies the previous release's version again.

use std::collections::BTreeMap;

use cardeploy_chunks::Digest;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The label on everything the agent applied.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGER: &str = "cardeploy";
/// The workload (`Kind/name` in the release) an object belongs to, as a label value
/// (`Kind.name`: label values cannot hold `/`).
pub const WORKLOAD: &str = "cardeploy.io/workload";
/// A side-by-side Deployment's revision, on the Deployment, its selector and its pods.
pub const REVISION: &str = "cardeploy.io/revision";
/// The release (`line@version`) that applied the object.
pub const RELEASE: &str = "cardeploy.io/release";
/// `replace`: the Deployment cannot run twice.
pub const STRATEGY: &str = "cardeploy.io/strategy";

/// The longest object name Kubernetes takes (a DNS subdomain).
const MAX_NAME: usize = 253;

/// Where an object lives in the cluster: what the agent remembers of what it applied.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectRef {
    pub api_version: String,
    pub kind: String,
    /// `None` for cluster-scoped kinds and for namespaced ones the release left to `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {}/{}", self.kind, ns, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// How an object's new version takes over from the old one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Applied under a name of its own, beside the previous version (Deployments by default).
    SideBySide,
    /// Applied in place under its own name (every other kind, and Deployments that say so).
    InPlace,
}

/// One object to apply.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    pub reference: ObjectRef,
    /// `Kind/name` as the release names it: what the twin sees in `reported.workloads`.
    pub workload: String,
    pub strategy: Strategy,
    /// Whether the agent waits for it to be ready (Deployments).
    pub runs: bool,
    pub body: Value,
}

/// Why the manifests cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("workload manifest {artifact} is not a JSON array of objects: {why}")]
    Shape { artifact: String, why: String },
    #[error("{workload} in {artifact}: {why}")]
    Object {
        artifact: String,
        workload: String,
        why: String,
    },
    #[error("{0} is in the release twice")]
    Twice(String),
}

/// The objects of `manifests` (artifact name → its JSON), marked for `release`.
pub fn objects(
    release: &str,
    manifests: &BTreeMap<String, Vec<u8>>,
) -> Result<Vec<Object>, ManifestError> {
    let mut out: Vec<Object> = Vec::new();
    for (artifact, bytes) in manifests {
        let shape = |why: String| ManifestError::Shape {
            artifact: artifact.clone(),
            why,
        };
        let list: Vec<Value> = serde_json::from_slice(bytes).map_err(|e| shape(e.to_string()))?;
        for original in list {
            let object =
                object(release, original).map_err(|(workload, why)| ManifestError::Object {
                    artifact: artifact.clone(),
                    workload,
                    why,
                })?;
            if out.iter().any(|o| o.reference == object.reference) {
                return Err(ManifestError::Twice(object.workload));
            }
            out.push(object);
        }
    }
    Ok(out)
}

fn object(release: &str, original: Value) -> Result<Object, (String, String)> {
    let text = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(str::to_owned);
    let api_version = text(&original["apiVersion"]);
    let kind = text(&original["kind"]);
    let name = text(&original["metadata"]["name"]);
    let (Some(api_version), Some(kind), Some(name)) = (api_version, kind, name) else {
        return Err((
            "(an object)".into(),
            "apiVersion, kind and metadata.name are required".into(),
        ));
    };
    let workload = format!("{kind}/{name}");
    let fail = |why: &str| (workload.clone(), why.to_owned());
    let namespace = match &original["metadata"]["namespace"] {
        Value::Null => None,
        v => Some(text(v).ok_or_else(|| fail("metadata.namespace is not a name"))?),
    };
    let deployment = api_version == "apps/v1" && kind == "Deployment";
    let replace = match &original["metadata"]["annotations"][STRATEGY] {
        Value::Null => false,
        Value::String(s) if s == "replace" => true,
        other => {
            return Err(fail(&format!(
                "{STRATEGY} is {other}; the one value is `replace`"
            )));
        }
    };
    let strategy = if deployment && !replace {
        Strategy::SideBySide
    } else {
        Strategy::InPlace
    };
    let mut body = original.clone();
    let label = format!("{kind}.{name}");
    let mark = |body: &mut Value| -> Result<(), (String, String)> {
        let meta = body["metadata"]
            .as_object_mut()
            .ok_or_else(|| fail("metadata is not an object"))?;
        let labels = meta.entry("labels").or_insert_with(|| json!({}));
        let labels = labels
            .as_object_mut()
            .ok_or_else(|| fail("metadata.labels is not an object"))?;
        labels.insert(MANAGED_BY.into(), json!(MANAGER));
        labels.insert(WORKLOAD.into(), json!(label));
        let notes = meta.entry("annotations").or_insert_with(|| json!({}));
        notes
            .as_object_mut()
            .ok_or_else(|| fail("metadata.annotations is not an object"))?
            .insert(RELEASE.into(), json!(release));
        Ok(())
    };
    mark(&mut body)?;
    let mut applied_name = name.clone();
    if strategy == Strategy::SideBySide {
        let revision = revision(&original);
        applied_name = format!("{name}-{revision}");
        if applied_name.len() > MAX_NAME {
            return Err(fail(&format!(
                "the name is too long to run side by side (at most {} characters)",
                MAX_NAME - 11
            )));
        }
        body["metadata"]["name"] = json!(applied_name);
        body["metadata"]["labels"][REVISION] = json!(revision);
        let selector = &mut body["spec"]["selector"]["matchLabels"];
        if !selector.is_object() {
            return Err(fail("spec.selector.matchLabels is required"));
        }
        selector[REVISION] = json!(revision);
        let pod_labels = &mut body["spec"]["template"]["metadata"]["labels"];
        if !pod_labels.is_object() {
            return Err(fail("spec.template.metadata.labels is required"));
        }
        pod_labels[REVISION] = json!(revision);
        pod_labels[WORKLOAD] = json!(label);
    } else if deployment && body["spec"]["template"]["metadata"]["labels"].is_object() {
        body["spec"]["template"]["metadata"]["labels"][WORKLOAD] = json!(label);
    }
    Ok(Object {
        reference: ObjectRef {
            api_version,
            kind,
            namespace,
            name: applied_name,
        },
        workload,
        strategy,
        runs: deployment,
        body,
    })
}

/// The revision of a Deployment as the release states it (before the agent's marks).
fn revision(original: &Value) -> String {
    Digest::of(original.to_string().as_bytes()).hex()[..10].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(name: &str, image: &str) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"containers": [{"name": "main", "image": image}]}
                }
            }
        })
    }

    fn one(objects: Vec<Value>) -> BTreeMap<String, Vec<u8>> {
        BTreeMap::from([("app.yaml".into(), serde_json::to_vec(&objects).unwrap())])
    }

    #[test]
    fn a_deployment_runs_side_by_side_under_its_revision() {
        let v1 = objects("app@1.0.0", &one(vec![deployment("web", "a@sha256:1")])).unwrap();
        let v2 = objects("app@2.0.0", &one(vec![deployment("web", "a@sha256:2")])).unwrap();
        let again = objects("app@3.0.0", &one(vec![deployment("web", "a@sha256:1")])).unwrap();
        assert_eq!(v1[0].strategy, Strategy::SideBySide);
        assert_eq!(v1[0].workload, "Deployment/web");
        assert!(v1[0].reference.name.starts_with("web-"));
        assert_ne!(v1[0].reference.name, v2[0].reference.name, "a new version");
        assert_eq!(
            v1[0].reference.name, again[0].reference.name,
            "an unchanged Deployment keeps its name (no restart)"
        );
        let body = &v1[0].body;
        let revision = &body["metadata"]["labels"][REVISION];
        assert_eq!(&body["spec"]["selector"]["matchLabels"][REVISION], revision);
        assert_eq!(
            &body["spec"]["template"]["metadata"]["labels"][REVISION],
            revision
        );
        assert_eq!(body["spec"]["template"]["metadata"]["labels"]["app"], "web");
        assert_eq!(body["metadata"]["labels"][MANAGED_BY], MANAGER);
        assert_eq!(body["metadata"]["annotations"][RELEASE], "app@1.0.0");
    }

    #[test]
    fn replace_and_other_kinds_keep_their_names() {
        let mut d = deployment("modem", "m@sha256:1");
        d["metadata"]["annotations"] = json!({STRATEGY: "replace"});
        let svc = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "apps"}, "spec": {"selector": {"app": "web"}}});
        let out = objects("app@1.0.0", &one(vec![d, svc])).unwrap();
        assert_eq!(out[0].strategy, Strategy::InPlace);
        assert_eq!(out[0].reference.name, "modem");
        assert!(out[0].runs);
        assert_eq!(out[1].reference.namespace.as_deref(), Some("apps"));
        assert!(!out[1].runs);
        assert_eq!(out[1].body["metadata"]["labels"][WORKLOAD], "Service.web");
    }

    #[test]
    fn bad_manifests_are_refused_with_the_object() {
        let mut d = deployment("web", "a");
        d["metadata"]["annotations"] = json!({STRATEGY: "sideways"});
        let e = objects("r", &one(vec![d])).unwrap_err().to_string();
        assert!(e.contains("Deployment/web") && e.contains("replace"), "{e}");
        let e = objects("r", &one(vec![json!({"kind": "Service"})]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("metadata.name"), "{e}");
        let twice = one(vec![deployment("web", "a"), deployment("web", "a")]);
        assert!(matches!(objects("r", &twice), Err(ManifestError::Twice(_))));
        let e = objects(
            "r",
            &BTreeMap::from([("x.yaml".to_owned(), b"{}".to_vec())]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("x.yaml"), "{e}");
    }
}
