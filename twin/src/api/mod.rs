//! The operator REST API (axum). JSON in and out; every error is `{"error": "..."}` with a
//! status code that says whose fault it was. Requests need `Authorization: Bearer <token>`, the
//! token the twin writes to `<data_dir>/operator.token` at first start.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use cardeploy_chunks::Digest;
use cardeploy_protocol::{
    self as protocol, Attributes, CarId, Envelope, FetchProgress, Inspection, route,
    validate_attribute,
};
use serde::{Deserialize, Serialize};

use crate::Twin;
use crate::cars::now;
use crate::db::{CarRecord, EventRecord, ReleaseSummary, ReportedRecord, StoredDesired};
use crate::trust::TrustError;

#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> Self {
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
        .route("/api/v1/cars", get(list_cars).post(add_car))
        .route("/api/v1/cars/{id}", get(get_car))
        .route("/api/v1/cars/{id}/events", get(events))
        .route("/api/v1/cars/{id}/desired", put(set_desired))
        .route("/api/v1/cars/{id}/inspect", get(inspect))
        .route("/api/v1/director", get(director))
        .route("/api/v1/roots", get(list_roots).post(add_root))
        .route("/api/v1/releases", get(list_releases).post(add_release))
        .route("/api/v1/releases/{reference}", get(get_release))
        .route("/api/v1/chunks/missing", post(missing_chunks))
        .route("/api/v1/chunks/{id}", put(put_chunk))
        .route("/api/v1/indexes/{id}", put(put_index).get(get_index))
        // A chunk frame is at most 16 MiB (FastCDC's largest chunk, incompressible); an index at
        // most MAX_INDEX_BYTES.
        .layer(DefaultBodyLimit::max(17 << 20))
        .route_layer(middleware::from_fn_with_state(twin.clone(), authorize));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .merge(api)
        .with_state(twin)
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCar {
    pub id: String,
    #[serde(default)]
    pub attributes: Attributes,
    /// The car's client certificate (PEM), issued by the fleet CA.
    pub certificate_pem: String,
}

#[derive(Debug, Serialize)]
pub struct CarView {
    pub id: CarId,
    pub attributes: Attributes,
    pub fingerprint: String,
    pub connected: bool,
    pub desired: Option<DesiredView>,
    pub reported: Option<ReportedRecord>,
    /// The last download progress the car reported since the twin started.
    pub progress: Option<FetchProgress>,
    /// The last OS installation progress the car reported since the twin started.
    pub install: Option<protocol::InstallProgress>,
}

async fn add_car(
    State(twin): State<Arc<Twin>>,
    Json(new): Json<NewCar>,
) -> Result<(StatusCode, Json<CarView>), ApiError> {
    let id = car_id(new.id)?;
    for (key, value) in &new.attributes {
        validate_attribute(key, value).map_err(|e| bad_request(e.to_string()))?;
    }
    let fingerprint = cardeploy_link::tls::fingerprint_pem(&new.certificate_pem)
        .map_err(|e| bad_request(format!("certificate_pem: {e}")))?;
    let record = CarRecord {
        id: id.clone(),
        attributes: new.attributes,
        fingerprint,
        created_at: now(),
    };
    if !twin.db.insert_car(&record).await? {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("car {id} or its certificate is already registered"),
        ));
    }
    twin.register(&record);
    tracing::info!(car = %id, "car registered");
    Ok((StatusCode::CREATED, Json(view(&twin, record).await?)))
}

async fn view(twin: &Twin, car: CarRecord) -> Result<CarView, ApiError> {
    let reported = twin.db.reported(&car.id).await?;
    let desired = match twin.db.desired(&car.id).await? {
        Some(stored) => Some(desired_view(twin, &stored).await?),
        None => None,
    };
    let (progress, install) = twin.fleet.with_car(&car.id, |live| {
        (live.progress.clone(), live.install.clone())
    });
    Ok(CarView {
        progress,
        install,
        connected: twin.fleet.connected(&car.id).is_some(),
        id: car.id,
        attributes: car.attributes,
        fingerprint: car.fingerprint,
        desired,
        reported,
    })
}

async fn list_cars(State(twin): State<Arc<Twin>>) -> Result<Json<Vec<CarView>>, ApiError> {
    let mut views = Vec::new();
    for car in twin.db.cars().await? {
        views.push(view(&twin, car).await?);
    }
    Ok(Json(views))
}

async fn find(twin: &Twin, id: &CarId) -> Result<CarRecord, ApiError> {
    twin.db.car(id).await?.ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no car {id}; list cars with `cardeploy car list`"),
        )
    })
}

async fn get_car(
    State(twin): State<Arc<Twin>>,
    Path(id): Path<String>,
) -> Result<Json<CarView>, ApiError> {
    let id = car_id(id)?;
    let car = find(&twin, &id).await?;
    Ok(Json(view(&twin, car).await?))
}

async fn events(
    State(twin): State<Arc<Twin>>,
    Path(id): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Json<Vec<EventRecord>>, ApiError> {
    let id = car_id(id)?;
    find(&twin, &id).await?;
    let limit = match query.get("limit") {
        Some(l) => l
            .parse::<u32>()
            .map_err(|_| bad_request("limit must be a number"))?
            .min(10_000),
        None => 100,
    };
    Ok(Json(twin.db.events(&id, limit).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetDesired {
    /// The release: its digest (64 hex) or `line@version`, registered with
    /// `POST /api/v1/releases` (`cardeploy release push`).
    pub release: String,
    /// How long the signed desired state stays valid; default the twin's `desired_ttl_secs`.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// A root-signed downgrade override, when the release is older than what the car runs.
    #[serde(default)]
    pub downgrade: Option<Envelope>,
}

/// What the API shows of a car's signed desired state.
#[derive(Debug, Serialize)]
pub struct DesiredView {
    pub counter: u64,
    pub release: String,
    pub line: Option<String>,
    pub version: Option<String>,
    pub issued: u64,
    pub expires: u64,
    pub downgrade: bool,
}

async fn desired_view(twin: &Twin, stored: &StoredDesired) -> Result<DesiredView, ApiError> {
    let summary = twin.db.release(&stored.release).await?.map(|(s, _)| s);
    Ok(DesiredView {
        counter: stored.counter,
        release: stored.release.clone(),
        line: summary.as_ref().map(|s| s.line.clone()),
        version: summary.map(|s| s.version),
        issued: stored.issued,
        expires: stored.expires,
        downgrade: stored.downgrade.is_some(),
    })
}

fn trust_error(e: TrustError) -> ApiError {
    let status = match &e {
        TrustError::NoRoot | TrustError::DirectorNotNamed { .. } => StatusCode::CONFLICT,
        TrustError::FirstRootVersion(_) | TrustError::Verify(_) => StatusCode::UNPROCESSABLE_ENTITY,
    };
    ApiError(status, e.to_string())
}

fn now_secs() -> u64 {
    u64::try_from(now()).unwrap_or(0)
}

async fn set_desired(
    State(twin): State<Arc<Twin>>,
    Path(id): Path<String>,
    Json(body): Json<SetDesired>,
) -> Result<Json<DesiredView>, ApiError> {
    let id = car_id(id)?;
    find(&twin, &id).await?;
    let (summary, envelope) = twin.db.release(&body.release).await?.ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "no release {:?} on this twin: name one by digest or line@version (`cardeploy release list`), after `cardeploy release push`",
                body.release
            ),
        )
    })?;
    // Verified again under the current root: a release whose key was rotated out is refused
    // here, not by every car.
    twin.trust
        .verify_release(&envelope, now_secs(), twin.config.max_artifact_bytes)
        .map_err(trust_error)?;
    let ttl = body.ttl_secs.unwrap_or(twin.config.desired_ttl_secs);
    if !(60..=366 * 86_400).contains(&ttl) {
        return Err(bad_request(format!(
            "ttl_secs = {ttl}: use 60 s to 366 days"
        )));
    }
    let stored = twin
        .issue_desired(&id, &summary.digest, ttl, body.downgrade)
        .await?;
    twin.db
        .event(
            &id,
            now(),
            "desired",
            &format!(
                "desired #{} {}@{} ({})",
                stored.counter,
                summary.line,
                summary.version,
                &summary.digest[..16]
            ),
        )
        .await?;
    tracing::info!(car = %id, counter = stored.counter, release = %summary.digest, "desired state signed and set");
    Ok(Json(desired_view(&twin, &stored).await?))
}

#[derive(Debug, Serialize)]
pub struct DirectorView {
    pub keyid: String,
    pub public: cardeploy_release::PublicKey,
}

async fn director(State(twin): State<Arc<Twin>>) -> Json<DirectorView> {
    let public = twin.trust.director_public();
    Json(DirectorView {
        keyid: public.id().to_string(),
        public,
    })
}

async fn list_roots(State(twin): State<Arc<Twin>>) -> Json<Vec<Envelope>> {
    Json(twin.trust.roots())
}

async fn add_root(
    State(twin): State<Arc<Twin>>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let version = twin
        .trust
        .add_root(&body, now_secs())
        .map_err(trust_error)?;
    // Every car's next message carries the new chain.
    for (car, stored) in twin.db.all_desired().await? {
        let message = twin.compose(&stored).await?;
        twin.fleet
            .with_car(&car, |live| live.desired.send_replace(Some(message)));
    }
    Ok(Json(serde_json::json!({ "version": version })))
}

/// Register a release: signed by the release role of the current root (M1–M3), every
/// artifact's chunk index on this twin and in agreement with the manifest (A1).
async fn add_release(
    State(twin): State<Arc<Twin>>,
    body: Bytes,
) -> Result<(StatusCode, Json<ReleaseSummary>), ApiError> {
    let envelope = Envelope::from_json(&body)
        .map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    let checked = twin
        .trust
        .verify_release(&envelope, now_secs(), twin.config.max_artifact_bytes)
        .map_err(trust_error)?;
    let artifacts = checked.release.artifacts.clone();
    let twin2 = twin.clone();
    blocking(move || {
        for a in &artifacts {
            let id = parse_digest(&a.index)?;
            let index = match twin2.artifacts.index(&id) {
                Ok(index) => index,
                Err(crate::artifacts::Refused::UnknownIndex(_)) => {
                    return Err(ApiError(
                        StatusCode::CONFLICT,
                        format!(
                            "artifact {}: chunk index {id} is not on this twin; `cardeploy release push` uploads the artifacts before the release",
                            a.name
                        ),
                    ));
                }
                Err(e) => return Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
            };
            cardeploy_release::check_artifact(a, index.size, &index.artifact.hex())
                .map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
        }
        Ok(())
    })
    .await?;
    let r = &checked.release;
    let summary = ReleaseSummary {
        digest: checked.digest.clone(),
        line: r.line.clone(),
        version: r.version.clone(),
        compatible: r.compatible.clone(),
        created: r.created,
        artifacts: r.artifacts.len(),
    };
    if let Some(other) = twin.db.release_by_version(&r.line, &r.version).await?
        && other != checked.digest
    {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "{}@{} is already registered with different content ({}); a version is published once: give this one a new version",
                r.line, r.version, other
            ),
        ));
    }
    let new = twin.db.insert_release(&summary, &envelope).await?;
    tracing::info!(digest = %summary.digest, line = %summary.line, version = %summary.version, new, "release registered");
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(summary)))
}

async fn list_releases(
    State(twin): State<Arc<Twin>>,
) -> Result<Json<Vec<ReleaseSummary>>, ApiError> {
    Ok(Json(twin.db.releases().await?))
}

#[derive(Debug, Serialize)]
pub struct ReleaseView {
    pub summary: ReleaseSummary,
    pub envelope: Envelope,
}

async fn get_release(
    State(twin): State<Arc<Twin>>,
    Path(reference): Path<String>,
) -> Result<Json<ReleaseView>, ApiError> {
    let (summary, envelope) = twin.db.release(&reference).await?.ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no release {reference:?} on this twin"),
        )
    })?;
    Ok(Json(ReleaseView { summary, envelope }))
}

async fn inspect(
    State(twin): State<Arc<Twin>>,
    Path(id): Path<String>,
) -> Result<Json<Inspection>, ApiError> {
    let id = car_id(id)?;
    find(&twin, &id).await?;
    let requester = twin.fleet.connected(&id).ok_or_else(|| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("car {id} is not connected"),
        )
    })?;
    let answer = requester
        .request_response(route::TWIN_INSPECT, Bytes::from_static(b"{}"))
        .await
        .map_err(|e| ApiError(StatusCode::BAD_GATEWAY, e.to_string()))?;
    let inspection = protocol::decode("twin.inspect answer", &answer)
        .map_err(|e| ApiError(StatusCode::BAD_GATEWAY, e.to_string()))?;
    Ok(Json(inspection))
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

fn chunk_error(e: cardeploy_chunks::Error) -> ApiError {
    use cardeploy_chunks::Error as E;
    match e {
        E::ChunkDigest { .. }
        | E::TransitMalformed(_)
        | E::IndexMalformed(_)
        | E::IndexDigest { .. }
        | E::IndexTooLarge { .. } => bad_request(e.to_string()),
        other => ApiError(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkList {
    pub chunks: Vec<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MissingChunks {
    pub missing: Vec<String>,
}

/// Which of these chunks the twin lacks: the release tool uploads only those.
async fn missing_chunks(
    State(twin): State<Arc<Twin>>,
    Json(list): Json<ChunkList>,
) -> Result<Json<MissingChunks>, ApiError> {
    if list.chunks.len() > 1_000_000 {
        return Err(bad_request("ask about at most 1,000,000 chunks at a time"));
    }
    let ids = list
        .chunks
        .iter()
        .map(|h| parse_digest(h))
        .collect::<Result<Vec<_>, _>>()?;
    let missing = blocking(move || {
        Ok(ids
            .into_iter()
            .filter(|id| !twin.artifacts.store().has(id))
            .map(|id| id.hex())
            .collect())
    })
    .await?;
    Ok(Json(MissingChunks { missing }))
}

/// One chunk, as a zstd frame; stored only if it decompresses to bytes with this sha256.
async fn put_chunk(
    State(twin): State<Arc<Twin>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let id = parse_digest(&id)?;
    blocking(move || {
        let store = twin.artifacts.store();
        store.put_compressed(&id, &body).map_err(chunk_error)?;
        store.sync().map_err(chunk_error)?;
        Ok(StatusCode::CREATED)
    })
    .await
}

#[derive(Debug, Deserialize, Serialize)]
pub struct IndexView {
    pub index: String,
    pub artifact: String,
    pub size: u64,
    pub chunks: usize,
}

fn index_view(id: &Digest, index: &cardeploy_chunks::ChunkIndex) -> IndexView {
    IndexView {
        index: id.hex(),
        artifact: index.artifact.hex(),
        size: index.size,
        chunks: index.chunks.len(),
    }
}

/// A chunk index; accepted only when the twin holds every chunk it names.
async fn put_index(
    State(twin): State<Arc<Twin>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<IndexView>), ApiError> {
    let id = parse_digest(&id)?;
    blocking(move || {
        let missing = twin.artifacts.put_index(&id, &body).map_err(|e| match e {
            crate::artifacts::Refused::Chunks(c) => chunk_error(c),
            other => bad_request(other.to_string()),
        })?;
        if !missing.is_empty() {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!(
                    "{} chunks of index {id} are not on the twin (first: {}); upload them before the index",
                    missing.len(),
                    missing[0]
                ),
            ));
        }
        let index = twin
            .artifacts
            .index(&id)
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        Ok((StatusCode::CREATED, Json(index_view(&id, &index))))
    })
    .await
}

async fn get_index(
    State(twin): State<Arc<Twin>>,
    Path(id): Path<String>,
) -> Result<Json<IndexView>, ApiError> {
    let id = parse_digest(&id)?;
    blocking(move || match twin.artifacts.index(&id) {
        Ok(index) => Ok(Json(index_view(&id, &index))),
        Err(crate::artifacts::Refused::UnknownIndex(_)) => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no chunk index {id} on this twin"),
        )),
        Err(e) => Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    })
    .await
}
