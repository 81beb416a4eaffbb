//! The HTTP side: one handler for every path under `/v2/`, answering with the distribution
//! spec's headers (`Docker-Content-Digest`, `Content-Range`, `Docker-Distribution-API-Version`)
//! and its JSON error bodies. Read-only: anything but `GET` and `HEAD` is `UNSUPPORTED`.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, PoisonError, RwLock};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cardeploy_chunks::Digest;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::TcpListener;

use crate::catalog::{Catalog, Manifest, Repository};
use crate::manifest::{Parsed, Platform};
use crate::request::{self, Bad, Reference, Route, Span};
use crate::verify::{Refused, Verifier};

/// Blobs stream in pieces this big: large enough that a 1 GiB layer is not a million reads,
/// small enough that serving adds little to the agent's memory.
const STREAM_BUFFER: usize = 256 << 10;

/// The registry: a catalog that can be swapped while serving, and the blobs verified so far.
pub struct Registry {
    catalog: RwLock<Arc<Catalog>>,
    verifier: Verifier,
    platform: Platform,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("platform", &self.platform)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// A registry serving `catalog`; an index is resolved for `platform` when a client accepts
    /// only image manifests.
    pub fn new(catalog: Catalog, platform: Platform) -> Arc<Self> {
        Arc::new(Self {
            catalog: RwLock::new(Arc::new(catalog)),
            verifier: Verifier::default(),
            platform,
        })
    }

    /// Serves `catalog` from now on (requests under way finish with the old one).
    pub fn replace(&self, catalog: Catalog) {
        self.verifier.retain(&catalog.served_files());
        *self.catalog.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(catalog);
    }

    fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Blobs found damaged on disk since the last call: not served (the agent forgets them, so
    /// the next desired state for the release fetches them again).
    pub fn take_damaged(&self) -> BTreeSet<Digest> {
        self.verifier.take_damaged()
    }

    /// Waits until a blob is found damaged; returns those found since the last call.
    pub async fn next_damaged(&self) -> BTreeSet<Digest> {
        self.verifier.next_damaged().await
    }

    /// The axum router of the `/v2/` API.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new().fallback(handle).with_state(self.clone())
    }
}

/// Serves `registry` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, registry.router())
        .with_graceful_shutdown(shutdown)
        .await
}

/// The spec's error codes this registry answers with.
#[derive(Clone, Copy, Debug)]
enum Code {
    BlobUnknown,
    DigestInvalid,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    Unsupported,
}

impl Code {
    fn as_str(self) -> &'static str {
        match self {
            Self::BlobUnknown => "BLOB_UNKNOWN",
            Self::DigestInvalid => "DIGEST_INVALID",
            Self::ManifestInvalid => "MANIFEST_INVALID",
            Self::ManifestUnknown => "MANIFEST_UNKNOWN",
            Self::NameInvalid => "NAME_INVALID",
            Self::NameUnknown => "NAME_UNKNOWN",
            Self::Unsupported => "UNSUPPORTED",
        }
    }
}

fn error(status: StatusCode, code: Code, message: impl Into<String>) -> Response {
    let body = serde_json::json!({
        "errors": [{ "code": code.as_str(), "message": message.into(), "detail": null }]
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn api_version(mut response: Response) -> Response {
    response.headers_mut().insert(
        "Docker-Distribution-API-Version",
        HeaderValue::from_static("registry/2.0"),
    );
    response
}

async fn handle(State(registry): State<Arc<Registry>>, request: Request) -> Response {
    let method = request.method().clone();
    let path = request::decode_path(request.uri().path());
    let headers = request.headers().clone();
    api_version(answer(&registry, &method, &path, &headers, request.uri().query()).await)
}

async fn answer(
    registry: &Registry,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Response {
    let route = match request::route(path) {
        Ok(route) => route,
        Err(Bad::NotFound) => {
            return error(
                StatusCode::NOT_FOUND,
                Code::Unsupported,
                format!("{path} is not an endpoint of this registry"),
            );
        }
        Err(Bad::NameInvalid(m)) => return error(StatusCode::BAD_REQUEST, Code::NameInvalid, m),
        Err(Bad::DigestInvalid(m)) => {
            return error(StatusCode::BAD_REQUEST, Code::DigestInvalid, m);
        }
        Err(Bad::ManifestInvalid(m)) => {
            return error(StatusCode::BAD_REQUEST, Code::ManifestInvalid, m);
        }
    };
    if method != Method::GET && method != Method::HEAD {
        return read_only();
    }
    let head = method == Method::HEAD;
    let (name, want) = match route {
        Route::Base => {
            return (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                "{}",
            )
                .into_response();
        }
        Route::Upload { .. } => return read_only(),
        Route::Manifest { name, reference } => (name, Want::Manifest(reference)),
        Route::Blob { name, digest } => (name, Want::Blob(digest)),
        Route::Tags { name } => (name, Want::Tags),
    };
    let catalog = registry.catalog();
    let Some(repo) = catalog.repository(&name) else {
        return error(
            StatusCode::NOT_FOUND,
            Code::NameUnknown,
            format!("no repository `{name}` on this car"),
        );
    };
    match want {
        Want::Manifest(reference) => manifest(registry, &name, repo, &reference, headers, head),
        Want::Blob(digest) => blob(registry, &catalog, &name, repo, digest, headers, head).await,
        Want::Tags => tags(&name, repo, query),
    }
}

/// What a request for a repository asks for.
enum Want {
    Manifest(Reference),
    Blob(Digest),
    Tags,
}

fn read_only() -> Response {
    let mut response = error(
        StatusCode::METHOD_NOT_ALLOWED,
        Code::Unsupported,
        "this registry is read-only: it serves what the cardeploy agent fetched and verified",
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    response
}

fn manifest(
    registry: &Registry,
    name: &str,
    repo: &Repository,
    reference: &Reference,
    headers: &HeaderMap,
    head: bool,
) -> Response {
    let digest = match reference {
        Reference::Digest(d) => *d,
        Reference::Tag(tag) => match repo.tags.get(tag) {
            Some(d) => *d,
            None => {
                return error(
                    StatusCode::NOT_FOUND,
                    Code::ManifestUnknown,
                    format!("{name} has no tag `{tag}`"),
                );
            }
        },
    };
    let Some(found) = repo.manifests.get(&digest) else {
        return error(
            StatusCode::NOT_FOUND,
            Code::ManifestUnknown,
            format!("{name} has no manifest sha256:{digest}"),
        );
    };
    let accept = || {
        headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
    };
    let (digest, found) = if request::accepts(accept(), found.parsed.media_type()) {
        (digest, found)
    } else {
        // A client that takes no index gets the index's manifest for this car's platform, if
        // it takes that one's type (what registries do for clients older than indexes).
        match resolve(registry, repo, found, &mut |t| {
            request::accepts(accept(), t)
        }) {
            Some(pair) => pair,
            None => {
                return error(
                    StatusCode::NOT_FOUND,
                    Code::ManifestUnknown,
                    format!(
                        "{name}: manifest sha256:{digest} is {}, which the request's Accept header does not list",
                        found.parsed.media_type()
                    ),
                );
            }
        }
    };
    let mut response = if head {
        Body::empty().into_response()
    } else {
        Body::from(bytes_of(found)).into_response()
    };
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(found.parsed.media_type()),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(found.bytes.len()));
    insert_digest(h, digest);
    response
}

fn bytes_of(m: &Manifest) -> axum::body::Bytes {
    axum::body::Bytes::copy_from_slice(&m.bytes)
}

fn resolve<'a>(
    registry: &Registry,
    repo: &'a Repository,
    index: &Manifest,
    accepts: &mut dyn FnMut(&str) -> bool,
) -> Option<(Digest, &'a Manifest)> {
    let Parsed::Index { manifests, .. } = &index.parsed else {
        return None;
    };
    manifests
        .iter()
        .filter(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| registry.platform.runs(p))
        })
        .filter_map(|d| repo.manifests.get(&d.digest).map(|m| (d.digest, m)))
        .find(|(_, m)| matches!(m.parsed, Parsed::Image { .. }) && accepts(m.parsed.media_type()))
}

fn insert_digest(h: &mut HeaderMap, digest: Digest) {
    if let Ok(v) = HeaderValue::from_str(&format!("sha256:{digest}")) {
        h.insert("Docker-Content-Digest", v);
    }
}

async fn blob(
    registry: &Registry,
    catalog: &Catalog,
    name: &str,
    repo: &Repository,
    digest: Digest,
    headers: &HeaderMap,
    head: bool,
) -> Response {
    // Manifests are blobs too (a client may fetch one by digest from the blob endpoint).
    if let Some(m) = repo.manifests.get(&digest) {
        let size = m.bytes.len() as u64;
        return match request::span(range_header(headers), size) {
            Span::Unsatisfiable => unsatisfiable(size),
            Span::Whole => blob_response(
                StatusCode::OK,
                digest,
                size,
                None,
                if head {
                    Body::empty()
                } else {
                    Body::from(bytes_of(m))
                },
            ),
            Span::Part { start, end } => {
                let body = if head {
                    Body::empty()
                } else {
                    Body::from(axum::body::Bytes::copy_from_slice(
                        &m.bytes[start as usize..=end as usize],
                    ))
                };
                blob_response(
                    StatusCode::PARTIAL_CONTENT,
                    digest,
                    end - start + 1,
                    Some((start, end, size)),
                    body,
                )
            }
        };
    }
    let file = match (repo.blobs.contains(&digest), catalog.file(&digest)) {
        (true, Some(file)) => file,
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                Code::BlobUnknown,
                format!("{name} has no blob sha256:{digest}"),
            );
        }
    };
    if let Err(refused) = registry.verifier.check(digest, &file.path, file.size).await {
        let message = match refused {
            Refused::Damaged { path, why } => format!(
                "blob sha256:{digest} is damaged on this car ({}: {why}); it is not served, and the car fetches it again with the next desired state",
                path.display()
            ),
            Refused::Unreadable { path, source } => {
                format!(
                    "blob sha256:{digest} cannot be read on this car ({}: {source})",
                    path.display()
                )
            }
        };
        return error(StatusCode::NOT_FOUND, Code::BlobUnknown, message);
    }
    let size = file.size;
    let (status, start, len, range) = match request::span(range_header(headers), size) {
        Span::Unsatisfiable => return unsatisfiable(size),
        Span::Whole => (StatusCode::OK, 0, size, None),
        Span::Part { start, end } => (
            StatusCode::PARTIAL_CONTENT,
            start,
            end - start + 1,
            Some((start, end, size)),
        ),
    };
    if head {
        return blob_response(status, digest, len, range, Body::empty());
    }
    let opened = async {
        let mut f = tokio::fs::File::open(&file.path).await?;
        f.seek(std::io::SeekFrom::Start(start)).await?;
        Ok::<_, std::io::Error>(f.take(len))
    };
    match opened.await {
        Ok(reader) => {
            let stream = tokio_util::io::ReaderStream::with_capacity(reader, STREAM_BUFFER);
            blob_response(status, digest, len, range, Body::from_stream(stream))
        }
        Err(e) => error(
            StatusCode::NOT_FOUND,
            Code::BlobUnknown,
            format!(
                "blob sha256:{digest} cannot be read on this car ({}: {e})",
                file.path.display()
            ),
        ),
    }
}

fn range_header(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::RANGE).and_then(|v| v.to_str().ok())
}

fn unsatisfiable(size: u64) -> Response {
    let mut response = error(
        StatusCode::RANGE_NOT_SATISFIABLE,
        Code::BlobUnknown,
        format!("the blob is {size} bytes; the range asks beyond it"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
        response.headers_mut().insert(header::CONTENT_RANGE, v);
    }
    response
}

fn blob_response(
    status: StatusCode,
    digest: Digest,
    len: u64,
    range: Option<(u64, u64, u64)>,
    body: Body,
) -> Response {
    let mut response = (status, body).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    insert_digest(h, digest);
    if let Some((start, end, size)) = range
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{size}"))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    response
}

/// `GET /v2/<name>/tags/list[?n=N&last=T]`: tags in lexical order, paginated as the spec says.
fn tags(name: &str, repo: &Repository, query: Option<&str>) -> Response {
    let mut n: Option<usize> = None;
    let mut last: Option<String> = None;
    for pair in query.unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some(("n", v)) => match v.parse() {
                Ok(v) => n = Some(v),
                Err(_) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        Code::Unsupported,
                        format!("n=`{v}` is not a number"),
                    );
                }
            },
            Some(("last", v)) => last = Some(v.to_owned()),
            _ => {}
        }
    }
    let after = repo
        .tags
        .keys()
        .filter(|t| last.as_ref().is_none_or(|l| t.as_str() > l.as_str()));
    let page: Vec<&String> = after.clone().take(n.unwrap_or(usize::MAX)).collect();
    let more = n.is_some() && after.count() > page.len();
    let body = serde_json::json!({ "name": name, "tags": page });
    let mut response = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    if more
        && let (Some(n), Some(tail)) = (n, page.last())
        && let Ok(v) = HeaderValue::from_str(&format!(
            "</v2/{name}/tags/list?n={n}&last={tail}>; rel=\"next\""
        ))
    {
        response.headers_mut().insert(header::LINK, v);
    }
    response
}
