//! The operator REST API (axum). JSON in and out; every error is `{"error": "..."}` with a
//! status code that says whose fault it was, including the ones axum answers itself (unknown
//! route, wrong method, a body its extractors refuse). Requests need
//! `Authorization: Bearer <token>`, the token the twin writes to `<data_dir>/operator.token` at
//! first start.
//!
//! Nothing a client sends is read without a bound (`guard.rs`): headers within
//! `api_header_timeout_secs` (`serve.rs`), bodies within `api_body_timeout_secs` and the limit
//! of their route, and at most `max_concurrent_uploads` chunk and index uploads at a time.

mod cars;
mod chunks;
mod deployments;
mod guard;
mod releases;
mod serve;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use cardeploy_chunks::Digest;
use cardeploy_protocol::CarId;

use crate::Twin;
use crate::trust::TrustError;

pub(crate) use serve::serve;

#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> Self {
        // The operator can act on this one: it is the car's state, not the twin failing.
        if let crate::Error::CounterExhausted { .. } = e {
            return Self(StatusCode::CONFLICT, e.to_string());
        }
        tracing::error!("{e}");
        Self(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

fn car_id(id: String) -> Result<CarId, ApiError> {
    CarId::new(id).map_err(|e| bad_request(e.to_string()))
}

pub fn router(twin: Arc<Twin>) -> Router {
    let api = Router::new()
        .route("/api/v1/cars", get(cars::list).post(cars::add))
        .route("/api/v1/cars/{id}", get(cars::get_one).delete(cars::revoke))
        .route("/api/v1/cars/{id}/events", get(cars::events))
        .route("/api/v1/cars/{id}/desired", put(cars::set_desired))
        .route("/api/v1/cars/{id}/inspect", get(cars::inspect))
        .route(
            "/api/v1/deployments",
            get(deployments::list).post(deployments::create),
        )
        .route("/api/v1/deployments/preview", post(deployments::preview))
        .route("/api/v1/deployments/{name}", get(deployments::get_one))
        .route(
            "/api/v1/deployments/{name}/{action}",
            post(deployments::act),
        )
        .route("/api/v1/director", get(releases::director))
        .route("/api/v1/instance", get(instance))
        .route(
            "/api/v1/roots",
            get(releases::list_roots).post(releases::add_root),
        )
        .route("/api/v1/releases", get(releases::list).post(releases::add))
        .route("/api/v1/releases/{reference}", get(releases::get_one))
        .route("/api/v1/deltas", get(chunks::deltas))
        .route("/api/v1/chunks/missing", post(chunks::missing))
        .route("/api/v1/chunks/{id}", put(chunks::put_chunk))
        .route(
            "/api/v1/indexes/{id}",
            put(chunks::put_index).get(chunks::get_index),
        )
        // Route layers run on matched routes only, the last one added first: the token is
        // checked before a byte of the body is read.
        .route_layer(middleware::from_fn_with_state(twin.clone(), guard::guard))
        .route_layer(middleware::from_fn_with_state(twin.clone(), authorize))
        // `guard` has bounded and read the body already, by route; axum's own default (2 MB)
        // would refuse chunk frames and indexes.
        .layer(DefaultBodyLimit::disable());
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .merge(api)
        .layer(middleware::from_fn(guard::json_errors))
        .with_state(twin)
}

/// `GET /api/v1/instance`: this twin instance — its id among several, whether it drives the
/// deployments, the cars connected to it.
async fn instance(State(twin): State<Arc<Twin>>) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({
        "id": twin.cluster.as_ref().map(|c| c.me.id.clone()),
        "driving": twin.driving.load(std::sync::atomic::Ordering::SeqCst),
        "connected_cars": twin.fleet.connected_count(),
        "database": match twin.db.backend() {
            crate::db::Backend::Sqlite => "SQLite",
            crate::db::Backend::Postgres => "PostgreSQL",
        },
    }))
}

async fn authorize(State(twin): State<Arc<Twin>>, request: Request, next: Next) -> Response {
    let expected = format!("Bearer {}", twin.operator_token);
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let ok = given.is_some_and(|given| same_secret(given.as_bytes(), expected.as_bytes()));
    if ok {
        next.run(request).await
    } else {
        ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong operator token: send `Authorization: Bearer <token>` with the token from <data_dir>/operator.token".into(),
        )
        .into_response()
    }
}

/// Compare without an early exit, so the time taken does not tell how much of a guess was right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A registered release by digest or `line@version`, verified again under the current root: a
/// release whose key was rotated out is refused here, not by every car.
async fn verified_release(
    twin: &Twin,
    reference: &str,
) -> Result<cardeploy_protocol::api::ReleaseSummary, ApiError> {
    let (summary, envelope) = twin.db.release(reference).await?.ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "no release {reference:?} on this twin: name one by digest or line@version (`cardeploy release list`), after `cardeploy release push`"
            ),
        )
    })?;
    twin.trust
        .verify_release(
            &envelope,
            cardeploy_release::now_secs(),
            twin.config.max_artifact_bytes,
        )
        .map_err(trust_error)?;
    Ok(summary)
}

fn trust_error(e: TrustError) -> ApiError {
    let status = match &e {
        TrustError::NoRoot | TrustError::DirectorNotNamed { .. } | TrustError::Raced { .. } => {
            StatusCode::CONFLICT
        }
        TrustError::FirstRootVersion(_) | TrustError::Verify(_) => StatusCode::UNPROCESSABLE_ENTITY,
        TrustError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError(status, e.to_string())
}

fn parse_digest(hex: &str) -> Result<Digest, ApiError> {
    hex.parse()
        .map_err(|_| bad_request(format!("`{hex}` is not a sha256 digest (64 hex digits)")))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}
