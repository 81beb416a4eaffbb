//! `release create --manifests DIR`: Kubernetes manifests made ready for the car. Each file
//! becomes one workload: its documents (YAML or JSON, `List`s flattened) as one JSON array, so
//! the car parses JSON only, with every container image rewritten to the car's registry by
//! digest (`registry.cardeploy.local/NAME@sha256:…`). An image no `--image` carries is refused
//! here, with the workload, object and container that name it, not on the car.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use cardeploy_release::CAR_REGISTRY;
use serde::Deserialize;
use serde_json::Value;

use super::images::Prepared;
use super::{absolute, check_name};

/// A workload file is read whole; manifests are text, and this bounds a mistaken path.
const MAX_MANIFEST_FILE: u64 = 4 << 20;
/// The fields of a pod spec that list containers.
const CONTAINER_LISTS: [&str; 3] = ["containers", "initContainers", "ephemeralContainers"];

/// Writes the car's form of workload `name` (from `path`) to `out/workloads/NAME.json`.
pub fn prepare(
    name: &str,
    path: &Path,
    images: &[Prepared],
    out: &Path,
) -> anyhow::Result<PathBuf> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if size > MAX_MANIFEST_FILE {
        bail!(
            "{} is {size} bytes: more than a manifest file should be ({MAX_MANIFEST_FILE})",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{} is not UTF-8 text", path.display()))?;
    let mut objects = Vec::new();
    for doc in documents(path, &text)? {
        flatten(doc, &mut objects);
    }
    if objects.is_empty() {
        bail!("{} holds no Kubernetes object", path.display());
    }
    for object in &mut objects {
        let what = describe(object).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        rewrite_images(object, &mut |container, image| {
            resolve(image, images).map_err(|why| {
                anyhow!("workload `{name}` ({what}, container `{container}`) names image `{image}`: {why}")
            })
        })?;
    }
    let dir = out.join("workloads");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let target = dir.join(format!("{name}.json"));
    let mut bytes = serde_json::to_vec_pretty(&objects)?;
    bytes.push(b'\n');
    crate::files::write(&target, &bytes)?;
    absolute(&target)
}

/// The documents of a YAML stream (a JSON file is one YAML document).
fn documents(path: &Path, text: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        let value = Value::deserialize(doc)
            .with_context(|| format!("{} is not valid YAML", path.display()))?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// A `List` (what `kubectl get -o yaml` writes) contributes its items.
fn flatten(doc: Value, out: &mut Vec<Value>) {
    if doc["kind"] == "List"
        && let Some(items) = doc["items"].as_array()
    {
        for item in items {
            flatten(item.clone(), out);
        }
        return;
    }
    out.push(doc);
}

/// `kind/name` of an object, or why it is not one.
fn describe(object: &Value) -> Result<String, String> {
    let field = |v: &Value, f: &str| {
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("an object without `{f}`"))
    };
    field(&object["apiVersion"], "apiVersion")?;
    let kind = field(&object["kind"], "kind")?;
    let name = field(&object["metadata"]["name"], "metadata.name")?;
    Ok(format!("{}/{name}", kind.to_lowercase()))
}

/// Calls `f(container, image)` for every container of every pod spec in `v`, wherever it is
/// nested (Pod, Deployment, StatefulSet, DaemonSet, Job, CronJob, and custom kinds that embed a
/// pod template), and puts back what it returns.
fn rewrite_images(
    v: &mut Value,
    f: &mut dyn FnMut(&str, &str) -> anyhow::Result<String>,
) -> anyhow::Result<()> {
    match v {
        Value::Object(map) => {
            for (key, child) in map.iter_mut() {
                if CONTAINER_LISTS.contains(&key.as_str())
                    && let Value::Array(containers) = child
                {
                    for c in containers.iter_mut() {
                        let name = c["name"].as_str().unwrap_or("?").to_owned();
                        if let Some(image) = c["image"].as_str() {
                            let rewritten = f(&name, image)?;
                            c["image"] = Value::String(rewritten);
                        }
                    }
                } else {
                    rewrite_images(child, f)?;
                }
            }
            Ok(())
        }
        Value::Array(items) => items.iter_mut().try_for_each(|i| rewrite_images(i, f)),
        _ => Ok(()),
    }
}

/// An image reference split the way registries read it.
#[derive(Debug, PartialEq, Eq)]
struct Reference<'a> {
    /// Repository path without the registry host (and without Docker Hub's `library/`).
    path: &'a str,
    tag: Option<&'a str>,
    /// sha256 hex.
    digest: Option<&'a str>,
}

fn split(image: &str) -> Reference<'_> {
    let (rest, digest) = match image.split_once("@sha256:") {
        Some((rest, d)) => (rest, Some(d)),
        None => (image, None),
    };
    let (rest, tag) = match rest.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => (r, Some(t)),
        _ => (rest, None),
    };
    // The first component is a registry host when it looks like one (a dot, a port, localhost).
    let path = match rest.split_once('/') {
        Some((host, path)) if host.contains(['.', ':']) || host == "localhost" => path,
        _ => rest,
    };
    let path = path.strip_prefix("library/").unwrap_or(path);
    Reference { path, tag, digest }
}

/// The car's reference for `image`: the release's image of that name, by digest.
fn resolve(image: &str, images: &[Prepared]) -> Result<String, String> {
    let r = split(image);
    let Some(found) = images
        .iter()
        .find(|i| i.name == r.path || i.name.strip_prefix("library/") == Some(r.path))
    else {
        let carried: Vec<&str> = images.iter().map(|i| i.name.as_str()).collect();
        return Err(format!(
            "no --image carries `{}` (the release carries {carried:?}); add --image {}=OCI_LAYOUT_DIR or fix the manifest",
            r.path, r.path
        ));
    };
    if let Some(d) = r.digest
        && d != found.original
        && d != found.manifest
    {
        return Err(format!(
            "it pins sha256:{d}, but --image {} holds sha256:{}",
            found.name, found.original
        ));
    }
    if let (Some(t), Some(have)) = (r.tag, &found.tag)
        && t != have
    {
        return Err(format!(
            "it asks for tag `{t}`, but --image {} is tagged `{have}`",
            found.name
        ));
    }
    Ok(format!(
        "{CAR_REGISTRY}/{}@sha256:{}",
        found.name, found.manifest
    ))
}

/// `*.yaml`, `*.yml` and `*.json` files of `dir`, sorted, each named after its stem.
pub fn kube_manifests(dir: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("reading the directory {}", dir.display()))?;
    let mut found = BTreeMap::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("reading the directory {}", dir.display()))?
            .path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !path.is_file() || !matches!(ext, "yaml" | "yml" | "json") {
            continue;
        }
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| anyhow!("{} has no usable name", path.display()))?
            .to_owned();
        check_name(&stem)
            .map_err(|e| anyhow!("{}: the workload name {e}; rename the file", path.display()))?;
        if let Some(other) = found.insert(stem.clone(), absolute(&path)?) {
            bail!(
                "{} and {} would both be workload `{stem}`: keep one",
                other.display(),
                path.display()
            );
        }
    }
    if found.is_empty() {
        bail!(
            "{} holds no *.yaml, *.yml or *.json manifest",
            dir.display()
        );
    }
    Ok(found.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_split_as_registries_read_them() {
        let r = |path, tag, digest| Reference { path, tag, digest };
        assert_eq!(split("nav"), r("nav", None, None));
        assert_eq!(split("nav:1.2"), r("nav", Some("1.2"), None));
        assert_eq!(
            split("docker.io/library/nginx:1.25"),
            r("nginx", Some("1.25"), None)
        );
        assert_eq!(split("localhost:5000/acme/nav"), r("acme/nav", None, None));
        assert_eq!(
            split("ghcr.io/acme/nav:2@sha256:ab"),
            r("acme/nav", Some("2"), Some("ab"))
        );
        assert_eq!(split("acme/nav"), r("acme/nav", None, None));
    }

    fn prepared() -> Vec<Prepared> {
        vec![Prepared {
            name: "acme/nav".into(),
            tag: Some("2.0".into()),
            original: "aa".repeat(32),
            manifest: "bb".repeat(32),
        }]
    }

    #[test]
    fn an_image_the_release_carries_is_rewritten_to_the_car_registry_by_digest() {
        let want = format!("{CAR_REGISTRY}/acme/nav@sha256:{}", "bb".repeat(32));
        for image in [
            "ghcr.io/acme/nav:2.0",
            "acme/nav",
            &format!("acme/nav@sha256:{}", "aa".repeat(32)),
        ] {
            assert_eq!(resolve(image, &prepared()).unwrap(), want, "{image}");
        }
    }

    #[test]
    fn an_image_the_release_does_not_carry_is_refused_with_its_name() {
        let e = resolve("acme/radio:1", &prepared()).unwrap_err();
        assert!(e.contains("acme/radio") && e.contains("--image"), "{e}");
        let e = resolve("acme/nav:3.0", &prepared()).unwrap_err();
        assert!(e.contains("3.0") && e.contains("2.0"), "{e}");
        let e = resolve(&format!("acme/nav@sha256:{}", "cc".repeat(32)), &prepared()).unwrap_err();
        assert!(e.contains("pins"), "{e}");
    }

    #[test]
    fn every_container_list_is_rewritten_wherever_the_pod_spec_is() {
        let mut cron: Value = serde_json::json!({
            "apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "sync"},
            "spec": {"jobTemplate": {"spec": {"template": {"spec": {
                "initContainers": [{"name": "init", "image": "a"}],
                "containers": [{"name": "main", "image": "b"}]
            }}}}}
        });
        let mut seen = Vec::new();
        rewrite_images(&mut cron, &mut |c, i| {
            seen.push((c.to_owned(), i.to_owned()));
            Ok(format!("x/{i}"))
        })
        .unwrap();
        seen.sort();
        assert_eq!(
            seen,
            [
                ("init".to_owned(), "a".to_owned()),
                ("main".to_owned(), "b".to_owned())
            ]
        );
        assert_eq!(
            cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"],
            "x/b"
        );
    }
}
