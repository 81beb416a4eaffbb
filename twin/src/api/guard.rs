//! What every API request goes through. Before its handler ([`guard`]): an upload takes one of
//! the `max_concurrent_uploads` permits or is answered 429, before its body is read; then the
//! body is read within `api_body_timeout_secs` (408) and the limit of its route (413). After
//! everything ([`json_errors`]): an error axum answered itself (no such route, wrong method, a
//! body its extractors refuse) gets the API's `{"error": "..."}` body too.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use super::ApiError;
use super::chunks::MAX_MISSING_QUERY;
use crate::Twin;

/// JSON bodies: a car, a desired state, a page request.
const JSON_LIMIT: usize = 64 << 10;
/// A chunk upload: one zstd frame of a chunk up to FastCDC's largest (16 MiB), incompressible.
const CHUNK_LIMIT: usize = 17 << 20;
/// An index entry: a chunk's length (u32) and sha256; and the header before the entries.
const INDEX_ENTRY: u64 = 4 + 32;
const INDEX_HEADER: u64 = 64;
/// Seconds a client told 429 should wait before it tries again.
const RETRY_AFTER_SECS: u64 = 1;

/// The largest index of an artifact of `max_artifact` bytes: every chunk but the last is at
/// least the minimum chunk size (16 KiB with cardeploy's parameters), so a 16 GiB artifact
/// has at most 1 Mi + 1 chunks, about 36 MiB of index. Derived from the configured artifact
/// size, not from the index decoder's own ceiling, so the two can change apart.
pub(super) fn index_limit(max_artifact: u64) -> usize {
    let min_chunk = u64::from(cardeploy_chunks::Params::DEFAULT.min);
    let chunks = max_artifact / min_chunk + 1;
    usize::try_from(INDEX_HEADER.saturating_add(chunks.saturating_mul(INDEX_ENTRY)))
        .unwrap_or(usize::MAX)
}

/// The body limit of a route (by its pattern). Anything not named here is a small JSON route:
/// a route added later gets the strictest limit until it asks for more.
fn body_limit(method: &Method, route: &str, max_artifact: u64) -> usize {
    match (method, route) {
        (&Method::PUT, "/api/v1/chunks/{id}") => CHUNK_LIMIT,
        (&Method::PUT, "/api/v1/indexes/{id}") => index_limit(max_artifact),
        (&Method::POST, "/api/v1/releases" | "/api/v1/roots") => {
            cardeploy_release::MAX_ENVELOPE_BYTES
        }
        // 64 hex digits, quotes and a comma per id.
        (&Method::POST, "/api/v1/chunks/missing") => 1024 + MAX_MISSING_QUERY * 67,
        // A geofence of up to 100,000 positions (`fleet::geofence::MAX_POINTS`).
        (&Method::POST, "/api/v1/deployments" | "/api/v1/deployments/preview") => 8 << 20,
        _ => JSON_LIMIT,
    }
}

fn is_upload(method: &Method, route: &str) -> bool {
    method == Method::PUT && matches!(route, "/api/v1/chunks/{id}" | "/api/v1/indexes/{id}")
}

fn refuse(status: StatusCode, message: String) -> Response {
    ApiError(status, message).into_response()
}

pub(super) async fn guard(State(twin): State<Arc<Twin>>, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_default();
    let _permit = if is_upload(&method, &route) {
        match twin.uploads.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                let mut response = refuse(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "{} uploads are in progress, as many as this twin takes at once; try again in {RETRY_AFTER_SECS} s",
                        twin.config.max_concurrent_uploads
                    ),
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
                return response;
            }
        }
    } else {
        None
    };
    let limit = body_limit(&method, &route, twin.config.max_artifact_bytes);
    let too_large = || {
        refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{method} {route} takes a body of at most {}",
                cardeploy_protocol::human_bytes(limit as u64)
            ),
        )
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large();
    }
    let timeout = Duration::from_secs(twin.config.api_body_timeout_secs);
    let (parts, body) = request.into_parts();
    let capacity = declared.map_or(0, |n| usize::try_from(n).unwrap_or(limit).min(limit));
    let body = match tokio::time::timeout(timeout, read_body(body, limit, capacity)).await {
        Err(_) => {
            return refuse(
                StatusCode::REQUEST_TIMEOUT,
                format!("the request body did not arrive within {timeout:?}"),
            );
        }
        Ok(Err(BodyError::TooLarge)) => return too_large(),
        Ok(Err(BodyError::Read(e))) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("the request body could not be read: {e}"),
            );
        }
        Ok(Ok(body)) => body,
    };
    next.run(Request::from_parts(parts, Body::from(body))).await
}

enum BodyError {
    TooLarge,
    Read(axum::Error),
}

async fn read_body(body: Body, limit: usize, capacity: usize) -> Result<Bytes, BodyError> {
    let mut stream = body.into_data_stream();
    let mut buffer = BytesMut::with_capacity(capacity);
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(BodyError::Read)?;
        if buffer.len() + piece.len() > limit {
            return Err(BodyError::TooLarge);
        }
        buffer.extend_from_slice(&piece);
    }
    Ok(buffer.freeze())
}

/// Give every error response the API's JSON shape. Handlers answer JSON already; axum's own
/// answers (404, 405, extractor rejections) are plain text or empty, and become
/// `{"error": "<that text or what happened>"}` with their status and other headers kept.
pub(super) async fn json_errors(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let status = response.status();
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // axum's own messages are short; anything longer is cut rather than buffered.
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    let message = match status {
        StatusCode::NOT_FOUND => format!("no such route: {method} {path}"),
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = parts
                .headers
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            format!("{method} is not allowed on {path} (allowed: {allowed})")
        }
        _ if text.is_empty() => status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_owned(),
        _ => text,
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::CONTENT_TYPE);
    let mut mapped = Json(serde_json::json!({ "error": message })).into_response();
    for (name, value) in &parts.headers {
        mapped.headers_mut().append(name, value.clone());
    }
    *mapped.status_mut() = status;
    mapped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_of_a_16_gib_artifact_is_about_36_mib() {
        let limit = index_limit(16 << 30);
        assert_eq!(limit, 64 + 36 * ((16 << 30) / (16 << 10) + 1));
        assert!((36 << 20..37 << 20).contains(&limit), "{limit}");
        // One chunk: the header and one entry.
        assert_eq!(index_limit(1000), 64 + 36);
    }

    #[test]
    fn json_routes_take_far_less_than_uploads_and_unknown_routes_take_the_least() {
        let max = 16 << 30;
        let json = body_limit(&Method::POST, "/api/v1/cars", max);
        assert_eq!(json, 64 << 10);
        assert_eq!(
            body_limit(&Method::PUT, "/api/v1/cars/{id}/desired", max),
            json
        );
        assert_eq!(body_limit(&Method::GET, "/api/v1/indexes/{id}", max), json);
        assert_eq!(body_limit(&Method::POST, "/api/v1/a-new-route", max), json);
        assert_eq!(
            body_limit(&Method::PUT, "/api/v1/chunks/{id}", max),
            17 << 20
        );
        assert_eq!(
            body_limit(&Method::PUT, "/api/v1/indexes/{id}", max),
            index_limit(max)
        );
        assert_eq!(body_limit(&Method::POST, "/api/v1/releases", max), 1 << 20);
        assert!(body_limit(&Method::POST, "/api/v1/chunks/missing", max) <= 1 << 20);
    }

    #[test]
    fn only_chunk_and_index_puts_count_as_uploads() {
        assert!(is_upload(&Method::PUT, "/api/v1/chunks/{id}"));
        assert!(is_upload(&Method::PUT, "/api/v1/indexes/{id}"));
        assert!(!is_upload(&Method::GET, "/api/v1/indexes/{id}"));
        assert!(!is_upload(&Method::POST, "/api/v1/chunks/missing"));
        assert!(!is_upload(&Method::POST, "/api/v1/releases"));
    }
}
