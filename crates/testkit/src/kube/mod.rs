//! A Kubernetes API-server **double**: not a Kubernetes API server, a stand-in for one that the
//! agent's kube path is tested against, because k3s cannot be installed on our machines. It is
//! strict where the real server is strict in what the agent relies on:
//!
//! - server-side apply only with `Content-Type: application/apply-patch+yaml` and a
//!   `fieldManager` (else 415 / 400, as the real server answers); field ownership per manager,
//!   409 Conflict naming the other manager's fields unless `force=true`; fields a manager stops
//!   applying are removed; a stale `resourceVersion` in the body is a 409;
//! - one resource version counter for every object; `generation` grows with `spec`;
//! - list and watch with label selectors (equality and set based) and `metadata.name` field
//!   selectors; a watch resumes from a resource version and gets 410 Gone when it is too old;
//! - discovery (`/api`, `/apis`, the group versions) for the kinds it serves;
//! - objects only in namespaces that exist (`default` and `kube-system` do).
//!
//! In place of the controllers and the kubelet it fills in Pods and Deployment status
//! ([`controller`]), with failures injected by image (never Ready, crash loop). The API server
//! can go away and come back on the same address ([`ApiServerDouble::go_away`]). It keeps a journal
//! of the requests it answered, with their times ([`ApiServerDouble::journal`]).
//!
//! Where it is simpler than the real server (say so in a test that leans on it): lists inside an
//! apply are replaced whole (the real server merges `containers` by name); bodies are JSON (the
//! YAML subset kube sends); no admission, no defaulting beyond `replicas: 1`; `POST`/`PUT` are
//! refused (the agent only applies); StatefulSets and DaemonSets are stored, not run.

pub mod controller;
mod select;
pub mod store;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::broadcast;

pub use controller::Failure;
use controller::{Behaviour, Clock};
use store::{Event, Key, Refusal, Resource, Store};

/// The kinds served: (group, version, plural, kind, namespaced).
const KINDS: &[(&str, &str, &str, &str, bool)] = &[
    ("", "v1", "namespaces", "Namespace", false),
    ("", "v1", "pods", "Pod", true),
    ("", "v1", "services", "Service", true),
    ("", "v1", "configmaps", "ConfigMap", true),
    ("", "v1", "secrets", "Secret", true),
    ("apps", "v1", "deployments", "Deployment", true),
    ("apps", "v1", "statefulsets", "StatefulSet", true),
    ("apps", "v1", "daemonsets", "DaemonSet", true),
];

const APPLY_PATCH: &str = "application/apply-patch+yaml";

struct World {
    store: Store,
    clock: Clock,
    behaviour: Behaviour,
}

#[derive(Clone)]
struct Shared {
    world: Arc<Mutex<World>>,
    events: broadcast::Sender<Event>,
    journal: Arc<Mutex<VecDeque<Request>>>,
}

/// How many requests the journal keeps (the oldest go first).
const JOURNAL: usize = 10_000;

/// One request the double answered, as its journal keeps it: what a bench reads to tell when the
/// agent did what (a rollback's breakdown).
#[derive(Clone, Debug)]
pub struct Request {
    /// When the request arrived and when its answer was ready.
    pub start: Instant,
    pub end: Instant,
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// For an apply, the images of the object's pod template (empty for other kinds).
    pub images: Vec<String>,
    pub status: u16,
}

impl Shared {
    fn record(&self, request: Request) {
        let mut journal = self.journal.lock().unwrap_or_else(PoisonError::into_inner);
        if journal.len() == JOURNAL {
            journal.pop_front();
        }
        journal.push_back(request);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs the controllers and tells the watchers about everything that changed.
    fn settle(&self, mut events: Vec<Event>) {
        let mut world = self.lock();
        let World {
            store,
            clock,
            behaviour,
        } = &mut *world;
        events.extend(controller::reconcile(store, clock, behaviour));
        drop(world);
        for e in events {
            let _ = self.events.send(e);
        }
    }
}

/// The double, serving on loopback until dropped.
pub struct ApiServerDouble {
    pub addr: SocketAddr,
    shared: Shared,
    server: Mutex<Option<tokio::task::JoinHandle<()>>>,
    ticker: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for ApiServerDouble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServerDouble")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for ApiServerDouble {
    fn drop(&mut self) {
        self.ticker.abort();
        if let Some(server) = self
            .server
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            server.abort();
        }
    }
}

impl ApiServerDouble {
    /// Starts the double on a free loopback port, with Pods Ready at once.
    pub async fn start() -> Self {
        let mut store = Store::default();
        for ns in ["default", "kube-system"] {
            let key = Key {
                resource: Resource::new("", "v1", "namespaces"),
                namespace: String::new(),
                name: ns.into(),
            };
            let ns_object =
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
            let _ = store.apply(&key, &ns_object, "double", false);
        }
        let (events, _) = broadcast::channel(4096);
        let shared = Shared {
            world: Arc::new(Mutex::new(World {
                store,
                clock: Clock::default(),
                behaviour: Behaviour::default(),
            })),
            events,
            journal: Arc::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Mutex::new(Some(spawn_server(listener, shared.clone())));
        // The kubelet's clock: readiness delays and crash-loop restarts move on their own.
        let ticking = shared.clone();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                ticking.settle(Vec::new());
            }
        });
        Self {
            addr,
            shared,
            server,
            ticker,
        }
    }

    /// The cluster URL a kube client is given.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig naming the double, written to `path` (what `CARDEPLOY_KUBECONFIG` names).
    pub fn write_kubeconfig(&self, path: &std::path::Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: {}\ncontexts:\n- name: double\n  context:\n    cluster: double\n    user: double\n    namespace: default\ncurrent-context: double\nusers:\n- name: double\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(path, text).unwrap();
    }

    /// Every Pod running `image` fails this way from now on.
    pub fn fail(&self, image: &str, failure: Failure) {
        self.shared
            .lock()
            .behaviour
            .failures
            .insert(image.to_owned(), failure);
        self.shared.settle(Vec::new());
    }

    /// Pods become Ready this long after they start (zero: at once).
    pub fn ready_after(&self, delay: Duration) {
        self.shared.lock().behaviour.ready_after = delay;
    }

    /// The stored object, if any (namespace `""` for cluster-scoped kinds).
    pub fn object(&self, group: &str, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let kind = KINDS.iter().find(|k| k.0 == group && k.2 == plural)?;
        let key = Key {
            resource: Resource::new(group, kind.1, plural),
            namespace: namespace.into(),
            name: name.into(),
        };
        self.shared
            .lock()
            .store
            .objects
            .get(&key)
            .map(|s| s.object.clone())
    }

    /// Names of the stored objects of a kind in a namespace.
    pub fn names(&self, group: &str, plural: &str, namespace: &str) -> Vec<String> {
        self.shared
            .lock()
            .store
            .objects
            .keys()
            .filter(|k| {
                k.resource.group == group && k.resource.plural == plural && k.namespace == namespace
            })
            .map(|k| k.name.clone())
            .collect()
    }

    /// The requests answered so far, oldest first (the last 10,000).
    pub fn journal(&self) -> Vec<Request> {
        self.shared
            .journal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// The API server goes away: connections are refused until [`Self::come_back`].
    pub fn go_away(&self) {
        if let Some(server) = self
            .server
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            server.abort();
        }
    }

    /// The API server is back on the same address, with the same objects.
    pub async fn come_back(&self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        *self.server.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(spawn_server(listener, self.shared.clone()));
    }
}

fn spawn_server(listener: tokio::net::TcpListener, shared: Shared) -> tokio::task::JoinHandle<()> {
    let app = axum::Router::new().fallback(handle).with_state(shared);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}

/// A `Status` failure, as the real server writes one.
fn status(code: StatusCode, reason: &str, message: impl Into<String>) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message.into(), "reason": reason, "code": code.as_u16(),
    });
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn ok_json(code: StatusCode, v: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// A request's target, from its path.
enum Target {
    Discovery(Value),
    Collection {
        resource: Resource,
        kind: &'static str,
        namespace: Option<String>,
    },
    Object {
        key: Key,
        kind: &'static str,
    },
}

fn discovery_list(group: &str, version: &str) -> Value {
    let resources: Vec<Value> = KINDS
        .iter()
        .filter(|k| k.0 == group && k.1 == version)
        .map(|k| {
            json!({"name": k.2, "singularName": k.3.to_lowercase(), "namespaced": k.4, "kind": k.3,
                        "verbs": ["delete", "get", "list", "patch", "watch"]})
        })
        .collect();
    let gv = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

fn target(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest): (&str, &str, &[&str]) = match parts.as_slice() {
        ["version"] => {
            return Some(Target::Discovery(
                json!({"major": "1", "minor": "35", "gitVersion": "v1.35.0-cardeploy-double", "platform": "linux/amd64"}),
            ));
        }
        ["api"] => {
            return Some(Target::Discovery(
                json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
            ));
        }
        ["apis"] => {
            return Some(Target::Discovery(
                json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                    {"name": "apps", "versions": [{"groupVersion": "apps/v1", "version": "v1"}], "preferredVersion": {"groupVersion": "apps/v1", "version": "v1"}}
                ]}),
            ));
        }
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (g, v, rest),
        _ => return None,
    };
    if rest.is_empty() {
        return KINDS
            .iter()
            .any(|k| k.0 == group && k.1 == version)
            .then(|| Target::Discovery(discovery_list(group, version)));
    }
    let (namespace, rest) = match rest {
        ["namespaces", ns, more @ ..] if !more.is_empty() => (Some((*ns).to_owned()), more),
        _ => (None, rest),
    };
    let kind_of = |plural: &str| {
        KINDS
            .iter()
            .find(|k| k.0 == group && k.1 == version && k.2 == plural)
    };
    match rest {
        [plural] => {
            let k = kind_of(plural)?;
            Some(Target::Collection {
                resource: Resource::new(group, version, plural),
                kind: k.3,
                namespace,
            })
        }
        [plural, name] => {
            let k = kind_of(plural)?;
            if k.4 != namespace.is_some() {
                return None;
            }
            Some(Target::Object {
                key: Key {
                    resource: Resource::new(group, version, plural),
                    namespace: namespace.unwrap_or_default(),
                    name: (*name).to_owned(),
                },
                kind: k.3,
            })
        }
        _ => None,
    }
}

fn query(q: Option<&str>) -> std::collections::BTreeMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = (bytes[i] == b'%')
            .then(|| s.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (hex, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(State(shared): State<Shared>, request: axum::extract::Request) -> Response {
    let start = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let params = query(request.uri().query());
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = axum::body::to_bytes(request.into_body(), 16 << 20)
        .await
        .unwrap_or_default();
    let images = if method == Method::PATCH {
        serde_json::from_slice::<Value>(&body)
            .map(|object| images_of(&object))
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let response = respond(
        &shared,
        method.clone(),
        &path,
        &params,
        &content_type,
        &body,
    )
    .await;
    shared.record(Request {
        start,
        end: Instant::now(),
        method: method.to_string(),
        path,
        images,
        status: response.status().as_u16(),
    });
    response
}

/// The images of a workload object's pod template (a Deployment's, say), in order.
fn images_of(object: &Value) -> Vec<String> {
    object["spec"]["template"]["spec"]["containers"]
        .as_array()
        .map(|containers| {
            containers
                .iter()
                .filter_map(|c| c["image"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

async fn respond(
    shared: &Shared,
    method: Method,
    path: &str,
    params: &std::collections::BTreeMap<String, String>,
    content_type: &str,
    body: &Bytes,
) -> Response {
    let shared = shared.clone();
    let path = path.to_owned();
    let Some(target) = target(&path) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        );
    };
    match (method, target) {
        (Method::GET, Target::Discovery(v)) => ok_json(StatusCode::OK, &v),
        (
            Method::GET,
            Target::Collection {
                resource,
                kind,
                namespace,
            },
        ) => {
            let selector = match select::Selector::parse(
                params.get("labelSelector").map_or("", String::as_str),
                params.get("fieldSelector").map_or("", String::as_str),
            ) {
                Ok(s) => s,
                Err(why) => return status(StatusCode::BAD_REQUEST, "BadRequest", why),
            };
            if params.get("watch").is_some_and(|w| w == "true" || w == "1") {
                return watch(&shared, resource, namespace, selector, params);
            }
            let world = shared.lock();
            let items: Vec<Value> = world
                .store
                .objects
                .iter()
                .filter(|(k, s)| {
                    k.resource == resource
                        && namespace.as_ref().is_none_or(|ns| &k.namespace == ns)
                        && selector.matches(&s.object)
                })
                .map(|(_, s)| s.object.clone())
                .collect();
            let api_version = if resource.group.is_empty() {
                resource.version.clone()
            } else {
                format!("{}/{}", resource.group, resource.version)
            };
            ok_json(
                StatusCode::OK,
                &json!({"kind": format!("{kind}List"), "apiVersion": api_version,
                        "metadata": {"resourceVersion": world.store.version().to_string()}, "items": items}),
            )
        }
        (Method::GET, Target::Object { key, kind }) => {
            match shared.lock().store.objects.get(&key) {
                Some(s) => ok_json(StatusCode::OK, &s.object),
                None => not_found(kind, &key),
            }
        }
        (Method::PATCH, Target::Object { key, kind }) => {
            apply(&shared, key, kind, content_type, params, body)
        }
        (Method::DELETE, Target::Object { key, kind }) => {
            let event = shared.lock().store.delete(&key);
            match event {
                Some(e) => {
                    let object = e.object.clone();
                    shared.settle(vec![e]);
                    ok_json(StatusCode::OK, &object)
                }
                None => not_found(kind, &key),
            }
        }
        (method, _) => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!(
                "{method} is not served by the API-server double: it serves server-side apply (PATCH), get, list, watch and delete"
            ),
        ),
    }
}

fn not_found(kind: &str, key: &Key) -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{}s \"{}\" not found", kind.to_lowercase(), key.name),
    )
}

fn apply(
    shared: &Shared,
    key: Key,
    kind: &str,
    content_type: &str,
    params: &std::collections::BTreeMap<String, String>,
    body: &Bytes,
) -> Response {
    if content_type.split(';').next().map(str::trim) != Some(APPLY_PATCH) {
        return status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: {APPLY_PATCH} (the double serves server-side apply only; got `{content_type}`)"
            ),
        );
    }
    let Some(manager) = params.get("fieldManager").filter(|m| !m.is_empty()) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
        );
    };
    let force = params.get("force").is_some_and(|f| f == "true");
    let config: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("the apply body is not JSON: {e}"),
            );
        }
    };
    if config["kind"] != kind {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("the body's kind {} is not {kind}", config["kind"]),
        );
    }
    let namespace = &key.namespace;
    if !namespace.is_empty() {
        let ns_key = Key {
            resource: Resource::new("", "v1", "namespaces"),
            namespace: String::new(),
            name: namespace.clone(),
        };
        if !shared.lock().store.objects.contains_key(&ns_key) {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("namespaces \"{namespace}\" not found"),
            );
        }
    }
    let mut config = config;
    if kind == "Deployment" && config["spec"].is_object() && config["spec"]["replicas"].is_null() {
        config["spec"]["replicas"] = json!(1);
    }
    let result = shared.lock().store.apply(&key, &config, manager, force);
    match result {
        Ok(event) => {
            let created = event.as_ref().is_some_and(|e| e.kind == "ADDED");
            if let Some(e) = event {
                shared.settle(vec![e]);
            }
            let object = shared
                .lock()
                .store
                .objects
                .get(&key)
                .map(|s| s.object.clone())
                .unwrap_or(Value::Null);
            ok_json(
                if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                },
                &object,
            )
        }
        Err(Refusal::Conflict(fields)) => {
            let causes: Vec<Value> = fields.iter().map(|(m, f)| json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{m}\""), "field": f})).collect();
            let message = format!(
                "Apply failed with {} conflict{}: {}",
                fields.len(),
                if fields.len() == 1 { "" } else { "s" },
                fields
                    .iter()
                    .map(|(m, f)| format!("conflict with \"{m}\": {f}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
                              "reason": "Conflict", "details": {"name": key.name, "kind": kind.to_lowercase(), "causes": causes}, "code": 409});
            ok_json(StatusCode::CONFLICT, &body)
        }
        Err(Refusal::Stale { given, current }) => status(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {}s \"{}\": the object has been modified (resourceVersion {given}, now {current}); please apply your changes to the latest version and try again",
                kind.to_lowercase(),
                key.name
            ),
        ),
        Err(Refusal::Invalid(why)) => status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", why),
    }
}

fn watch(
    shared: &Shared,
    resource: Resource,
    namespace: Option<String>,
    selector: select::Selector,
    params: &std::collections::BTreeMap<String, String>,
) -> Response {
    let receiver = shared.events.subscribe();
    let (backlog, since) = {
        let world = shared.lock();
        let since = params
            .get("resourceVersion")
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|v| *v > 0);
        match since {
            Some(v) if v < world.store.oldest() => {
                return status(
                    StatusCode::GONE,
                    "Expired",
                    format!("too old resource version: {v} ({})", world.store.oldest()),
                );
            }
            // From a version: what happened since. Without one: the objects as they are now.
            Some(v) => (world.store.events_after(v), world.store.version()),
            None => (
                world
                    .store
                    .objects
                    .iter()
                    .map(|(k, s)| Event {
                        kind: "ADDED",
                        key: k.clone(),
                        version: store::version_of(&s.object),
                        object: s.object.clone(),
                    })
                    .collect(),
                world.store.version(),
            ),
        }
    };
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(300);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    let wanted = move |e: &Event| {
        e.key.resource == resource
            && namespace.as_ref().is_none_or(|ns| &e.key.namespace == ns)
            && selector.matches(&e.object)
    };
    let line =
        |e: &Event| Bytes::from(format!("{}\n", json!({"type": e.kind, "object": e.object})));
    let first: Vec<Bytes> = backlog.iter().filter(|e| wanted(e)).map(line).collect();
    let stream = futures::stream::unfold(
        (first.into_iter(), receiver, since),
        move |(mut first, mut rx, seen)| {
            let wanted = wanted.clone();
            async move {
                if let Some(b) = first.next() {
                    return Some((Ok::<_, std::io::Error>(b), (first, rx, seen)));
                }
                loop {
                    let next = tokio::time::timeout_at(deadline, rx.recv()).await;
                    match next {
                        Ok(Ok(e)) if e.version > seen && wanted(&e) => {
                            let b = line(&e);
                            return Some((Ok(b), (first, rx, e.version)));
                        }
                        Ok(Ok(_)) => {}
                        // Lagged, closed, or the watch's time is up: the stream ends, the client watches again.
                        _ => return None,
                    }
                }
            }
        },
    );
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}
