//! Uploads of artifacts: which chunks the twin lacks, chunks, chunk indexes. Each upload is
//! acknowledged only once it is durable, and holds the chunk store's gc off while it runs.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use bytes::Bytes;
use cardeploy_chunks::Digest;
use cardeploy_protocol::api::{ChunkList, DeltasView, IndexView, MissingChunks};

use super::{ApiError, bad_request, blocking, parse_digest};
use crate::Twin;

/// Most chunk ids one `POST /api/v1/chunks/missing` may ask about (about 670 KB of JSON).
pub(crate) const MAX_MISSING_QUERY: usize = 10_000;

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

/// Which of these chunks the twin lacks: the release tool uploads only those. The ones it has
/// are held (their time refreshed) so that the gc spares them until the index naming them
/// arrives.
/// `GET /api/v1/deltas`: what the twin's delta work stands at.
pub(super) async fn deltas(State(twin): State<Arc<Twin>>) -> Json<DeltasView> {
    let served = &twin.artifacts.served;
    Json(DeltasView {
        ahead_pending: twin.ahead.pending(),
        ahead_pairs: served
            .ahead_pairs
            .load(std::sync::atomic::Ordering::Relaxed),
        ahead_chunks: served
            .ahead_chunks
            .load(std::sync::atomic::Ordering::Relaxed),
        cache_bytes: twin.artifacts.cache_bytes(),
    })
}

pub(super) async fn missing(
    State(twin): State<Arc<Twin>>,
    Json(list): Json<ChunkList>,
) -> Result<Json<MissingChunks>, ApiError> {
    if list.chunks.len() > MAX_MISSING_QUERY {
        return Err(bad_request(format!(
            "ask about at most {MAX_MISSING_QUERY} chunks at a time, not {}",
            list.chunks.len()
        )));
    }
    let ids = list
        .chunks
        .iter()
        .map(|h| parse_digest(h))
        .collect::<Result<Vec<_>, _>>()?;
    let no_gc = twin.store_gc.clone().read_owned().await;
    let missing = blocking(move || {
        let _no_gc = no_gc;
        let grace = Duration::from_secs(twin.config.gc_grace_secs);
        let store = twin.artifacts.store();
        let mut missing = Vec::new();
        for id in ids {
            if !store.hold(&id, grace).map_err(chunk_error)? {
                missing.push(id.hex());
            }
        }
        Ok(missing)
    })
    .await?;
    Ok(Json(MissingChunks { missing }))
}

/// One chunk, as a zstd frame; stored only if it decompresses to bytes with this sha256, and
/// acknowledged only once its own rename is durable.
pub(super) async fn put_chunk(
    State(twin): State<Arc<Twin>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let id = parse_digest(&id)?;
    let no_gc = twin.store_gc.clone().read_owned().await;
    blocking(move || {
        let _no_gc = no_gc;
        twin.artifacts
            .store()
            .put_compressed_durable(&id, &body)
            .map_err(chunk_error)?;
        Ok(StatusCode::CREATED)
    })
    .await
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
pub(super) async fn put_index(
    State(twin): State<Arc<Twin>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<IndexView>), ApiError> {
    let id = parse_digest(&id)?;
    let no_gc = twin.store_gc.clone().read_owned().await;
    blocking(move || {
        let _no_gc = no_gc;
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

pub(super) async fn get_index(
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
