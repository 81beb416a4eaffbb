//! The double's object store: objects by resource, namespace and name, one resource version
//! counter for all of them (as etcd gives the real API server), server-side apply with field
//! managers and conflicts, and the event history watches replay from.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde_json::{Map, Value, json};

/// Events kept for watches that resume from a resource version; an older one gets 410 Gone,
/// as from the real API server once etcd compacted.
const HISTORY: usize = 4096;

/// A leaf field of an object, as the path of keys to it (lists are atomic: a path ends at one).
pub type FieldPath = Vec<String>;

/// Which resource an object belongs to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Resource {
    /// `""` for the core group.
    pub group: String,
    pub version: String,
    /// Plural, lowercase (`deployments`).
    pub plural: String,
}

impl Resource {
    pub fn new(group: &str, version: &str, plural: &str) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub resource: Resource,
    /// `""` for cluster-scoped objects.
    pub namespace: String,
    pub name: String,
}

/// One stored object and who owns which of its fields.
#[derive(Clone, Debug)]
pub struct Stored {
    pub object: Value,
    pub managers: BTreeMap<String, BTreeSet<FieldPath>>,
}

#[derive(Clone, Debug)]
pub struct Event {
    pub kind: &'static str,
    pub key: Key,
    pub version: u64,
    pub object: Value,
}

/// Why an apply is refused, as the API server says it.
#[derive(Debug)]
pub enum Refusal {
    /// 409: fields another manager owns would change; `(manager, path)` each.
    Conflict(Vec<(String, String)>),
    /// 409: the request names a resource version that is not the object's.
    Stale { given: String, current: u64 },
    /// 422: the object is not valid.
    Invalid(String),
}

#[derive(Default)]
pub struct Store {
    pub objects: BTreeMap<Key, Stored>,
    version: u64,
    history: VecDeque<Event>,
}

impl Store {
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The oldest resource version a watch may resume from.
    pub fn oldest(&self) -> u64 {
        self.history.front().map_or(self.version, |e| e.version - 1)
    }

    pub fn events_after(&self, version: u64) -> Vec<Event> {
        self.history
            .iter()
            .filter(|e| e.version > version)
            .cloned()
            .collect()
    }

    fn record(&mut self, kind: &'static str, key: &Key, object: Value) -> Event {
        let event = Event {
            kind,
            key: key.clone(),
            version: self.version,
            object,
        };
        self.history.push_back(event.clone());
        if self.history.len() > HISTORY {
            self.history.pop_front();
        }
        event
    }

    fn bump(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    /// Server-side apply of `config` by `manager` (`force` takes fields over from others).
    /// Returns the event when the object changed, None when the apply changed nothing.
    pub fn apply(
        &mut self,
        key: &Key,
        config: &Value,
        manager: &str,
        force: bool,
    ) -> Result<Option<Event>, Refusal> {
        if !config.is_object() {
            return Err(Refusal::Invalid(
                "the apply configuration is not an object".into(),
            ));
        }
        if config["metadata"]["name"]
            .as_str()
            .is_some_and(|n| n != key.name)
        {
            return Err(Refusal::Invalid(format!(
                "metadata.name `{}` does not match the name in the URL `{}`",
                config["metadata"]["name"].as_str().unwrap_or(""),
                key.name
            )));
        }
        let existing = self.objects.get(key).cloned();
        if let (Some(given), Some(stored)) =
            (config["metadata"]["resourceVersion"].as_str(), &existing)
        {
            let current = version_of(&stored.object);
            if given != current.to_string() {
                return Err(Refusal::Stale {
                    given: given.to_owned(),
                    current,
                });
            }
        }
        let mut stored = existing.clone().unwrap_or(Stored {
            object: json!({}),
            managers: BTreeMap::new(),
        });
        let applied = leaves(config);
        // Fields another manager owns may only change with force; then they change hands.
        let mut conflicts = Vec::new();
        for (other, owned) in stored
            .managers
            .iter_mut()
            .filter(|(m, _)| m.as_str() != manager)
        {
            let mine: Vec<FieldPath> = applied
                .iter()
                .filter(|p| owned.contains(*p))
                .cloned()
                .collect();
            for path in &mine {
                if get(&stored.object, path) != get(config, path) {
                    if force {
                        owned.remove(path);
                    } else {
                        conflicts.push((other.clone(), format!(".{}", path.join("."))));
                    }
                }
            }
        }
        if !conflicts.is_empty() {
            return Err(Refusal::Conflict(conflicts));
        }
        // What this manager applied before and leaves out now goes, unless another owns it.
        let before = stored.managers.remove(manager).unwrap_or_default();
        let others: BTreeSet<FieldPath> = stored.managers.values().flatten().cloned().collect();
        for path in before.difference(&applied) {
            if !others.contains(path) {
                remove(&mut stored.object, path);
            }
        }
        merge(&mut stored.object, config);
        stored.managers.insert(manager.to_owned(), applied);
        stored.managers.retain(|_, owned| !owned.is_empty());
        let previous = existing.as_ref().map(|e| strip_server_fields(&e.object));
        if previous.as_ref() == Some(&strip_server_fields(&stored.object)) {
            return Ok(None);
        }
        let spec_changed = previous
            .as_ref()
            .is_none_or(|p| p["spec"] != stored.object["spec"]);
        let generation = existing
            .as_ref()
            .and_then(|e| e.object["metadata"]["generation"].as_u64())
            .unwrap_or(0)
            + u64::from(spec_changed);
        let version = self.bump();
        let meta = &mut stored.object["metadata"];
        meta["generation"] = json!(generation.max(1));
        meta["resourceVersion"] = json!(version.to_string());
        if existing.is_none() {
            meta["uid"] = json!(format!("double-{version}"));
            meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
            if !key.namespace.is_empty() {
                meta["namespace"] = json!(key.namespace);
            }
        }
        meta["managedFields"] = managed_fields(&stored.managers);
        let object = stored.object.clone();
        self.objects.insert(key.clone(), stored);
        Ok(Some(self.record(
            if existing.is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            },
            key,
            object,
        )))
    }

    /// Replaces what the controller owns (`status`, or a whole object it made) without field
    /// management: the double's controllers write as the real ones do, through their own calls.
    pub fn put_by_controller(&mut self, key: &Key, mut object: Value) -> Option<Event> {
        let existing = self.objects.get(key).cloned();
        if let Some(e) = &existing
            && strip_server_fields(&e.object) == strip_server_fields(&object)
        {
            return None;
        }
        let kind = if existing.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let managers = existing
            .as_ref()
            .map(|e| e.managers.clone())
            .unwrap_or_default();
        let version = self.bump();
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        if existing.is_none() {
            object["metadata"]["uid"] = json!(format!("double-{version}"));
        }
        self.objects.insert(
            key.clone(),
            Stored {
                object: object.clone(),
                managers,
            },
        );
        Some(self.record(kind, key, object))
    }

    pub fn delete(&mut self, key: &Key) -> Option<Event> {
        let stored = self.objects.remove(key)?;
        let version = self.bump();
        let mut object = stored.object;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        Some(self.record("DELETED", key, object))
    }
}

pub fn version_of(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The object without what the server writes itself, to tell whether an apply changed anything.
fn strip_server_fields(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(meta) = o["metadata"].as_object_mut() {
        for f in [
            "resourceVersion",
            "generation",
            "managedFields",
            "uid",
            "creationTimestamp",
        ] {
            meta.remove(f);
        }
    }
    o
}

/// The leaf paths of an apply configuration. Identity fields are not owned by anyone.
fn leaves(config: &Value) -> BTreeSet<FieldPath> {
    fn walk(v: &Value, path: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
        match v {
            Value::Object(map) if !map.is_empty() => {
                for (k, child) in map {
                    path.push(k.clone());
                    walk(child, path, out);
                    path.pop();
                }
            }
            _ => {
                out.insert(path.clone());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(config, &mut Vec::new(), &mut out);
    for identity in [
        &["apiVersion"][..],
        &["kind"],
        &["metadata", "name"],
        &["metadata", "namespace"],
        &["metadata", "resourceVersion"],
    ] {
        out.remove(&identity.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
    }
    out
}

fn get<'a>(v: &'a Value, path: &FieldPath) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

fn remove(v: &mut Value, path: &FieldPath) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = v;
    for k in parents {
        match at.get_mut(k) {
            Some(next) => at = next,
            None => return,
        }
    }
    if let Some(map) = at.as_object_mut() {
        map.remove(last);
    }
}

/// Objects merge key by key; anything else (lists included) is replaced whole.
fn merge(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

/// `metadata.managedFields` in the API's FieldsV1 form (`{"f:spec":{"f:replicas":{}}}`).
fn managed_fields(managers: &BTreeMap<String, BTreeSet<FieldPath>>) -> Value {
    let entries: Vec<Value> = managers
        .iter()
        .map(|(manager, paths)| {
            let mut fields = Map::new();
            for path in paths {
                let mut at = &mut fields;
                for k in path {
                    let next = at.entry(format!("f:{k}")).or_insert_with(|| json!({}));
                    at = match next.as_object_mut() {
                        Some(m) => m,
                        None => break,
                    };
                }
            }
            json!({
                "manager": manager,
                "operation": "Apply",
                "apiVersion": "v1",
                "fieldsType": "FieldsV1",
                "fieldsV1": Value::Object(fields),
            })
        })
        .collect();
    Value::Array(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key {
            resource: Resource::new("apps", "v1", "deployments"),
            namespace: "default".into(),
            name: "nav".into(),
        }
    }

    fn config(replicas: u64, image: &str) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "nav"},
               "spec": {"replicas": replicas, "template": {"spec": {"containers": [{"name": "nav", "image": image}]}}}})
    }

    #[test]
    fn apply_creates_then_changes_only_when_something_differs() {
        let mut s = Store::default();
        let created = s
            .apply(&key(), &config(1, "a"), "agent", false)
            .unwrap()
            .unwrap();
        assert_eq!(created.kind, "ADDED");
        assert_eq!(created.object["metadata"]["generation"], 1);
        assert!(
            s.apply(&key(), &config(1, "a"), "agent", false)
                .unwrap()
                .is_none()
        );
        let changed = s
            .apply(&key(), &config(2, "a"), "agent", false)
            .unwrap()
            .unwrap();
        assert_eq!(changed.kind, "MODIFIED");
        assert_eq!(changed.object["metadata"]["generation"], 2);
        assert!(version_of(&changed.object) > version_of(&created.object));
    }

    #[test]
    fn another_managers_field_conflicts_unless_forced() {
        let mut s = Store::default();
        s.apply(&key(), &config(1, "a"), "agent", false).unwrap();
        let Err(Refusal::Conflict(c)) = s.apply(&key(), &config(3, "a"), "kubectl", false) else {
            panic!("no conflict")
        };
        assert_eq!(c, [("agent".to_owned(), ".spec.replicas".to_owned())]);
        s.apply(&key(), &config(3, "a"), "kubectl", true)
            .unwrap()
            .unwrap();
        let owners = &s.objects[&key()].managers;
        assert!(owners["kubectl"].contains(&vec!["spec".to_owned(), "replicas".to_owned()]));
        assert!(!owners["agent"].contains(&vec!["spec".to_owned(), "replicas".to_owned()]));
    }

    #[test]
    fn a_field_the_manager_stops_applying_is_removed() {
        let mut s = Store::default();
        let mut with_label = config(1, "a");
        with_label["metadata"]["labels"] = json!({"tier": "nav"});
        s.apply(&key(), &with_label, "agent", false).unwrap();
        s.apply(&key(), &config(1, "a"), "agent", false)
            .unwrap()
            .unwrap();
        assert!(
            s.objects[&key()].object["metadata"]
                .get("labels")
                .is_none_or(|l| l.get("tier").is_none())
        );
    }

    #[test]
    fn a_stale_resource_version_is_refused() {
        let mut s = Store::default();
        s.apply(&key(), &config(1, "a"), "agent", false).unwrap();
        let mut stale = config(2, "a");
        stale["metadata"]["resourceVersion"] = json!("0");
        assert!(matches!(
            s.apply(&key(), &stale, "agent", false),
            Err(Refusal::Stale { .. })
        ));
    }
}
