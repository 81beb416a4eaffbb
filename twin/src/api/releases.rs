//! The root of trust and releases: `/api/v1/director`, `/api/v1/roots`, `/api/v1/releases`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use bytes::Bytes;
use cardeploy_protocol::Envelope;
use cardeploy_protocol::api::{DirectorView, ReleaseSummary, ReleaseView, RootAccepted};

use super::{ApiError, blocking, parse_digest, trust_error};
use crate::Twin;

pub(super) async fn director(State(twin): State<Arc<Twin>>) -> Json<DirectorView> {
    let public = twin.trust.director_public();
    Json(DirectorView {
        keyid: public.id().to_string(),
        public,
    })
}

pub(super) async fn list_roots(State(twin): State<Arc<Twin>>) -> Json<Vec<Envelope>> {
    Json(twin.trust.roots())
}

pub(super) async fn add_root(
    State(twin): State<Arc<Twin>>,
    body: Bytes,
) -> Result<Json<RootAccepted>, ApiError> {
    let scope_before = twin.trust.counter_scope();
    let version = twin
        .trust
        .add_root(&twin.db, &body, cardeploy_release::now_secs())
        .await
        .map_err(trust_error)?;
    let scope = twin.trust.counter_scope();
    if scope == scope_before {
        // Every car's next message carries the new chain.
        twin.push_roots();
        return Ok(Json(RootAccepted { version }));
    }
    for (car, stored) in twin.db.all_desired().await? {
        if stored.scope.is_some() && stored.scope != scope {
            // A new director role: what the old one signed no longer verifies on a car that
            // takes the new root, so every desired state is signed again, in the fresh counter
            // scope (docs/release-format.md, D4a).
            let ttl = stored.expires.saturating_sub(stored.issued).max(60);
            twin.issue_desired(&car, &stored.release, ttl, stored.downgrade.clone())
                .await?;
        } else if twin.fleet.connected(&car).is_some() {
            twin.offer_stored(&car, &stored).await?;
        }
    }
    Ok(Json(RootAccepted { version }))
}

/// Register a release: signed by the release role of the current root (M1–M3), every
/// artifact's chunk index on this twin and in agreement with the manifest (A1).
pub(super) async fn add(
    State(twin): State<Arc<Twin>>,
    body: Bytes,
) -> Result<(StatusCode, Json<ReleaseSummary>), ApiError> {
    let envelope = Envelope::from_json(&body)
        .map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    let checked = twin
        .trust
        .verify_release(
            &envelope,
            cardeploy_release::now_secs(),
            twin.config.max_artifact_bytes,
        )
        .map_err(trust_error)?;
    // Until the release is stored, the chunk store's gc must not take the indexes checked here.
    let _no_gc = twin.store_gc.clone().read_owned().await;
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
    if new {
        // The deltas the fleet will ask for, made now at the configured level rather than on
        // demand while the first car waits. Planned here, so `GET /api/v1/deltas` counts them
        // when this call returns; made in the background.
        let cars: Vec<_> = twin.db.cars().await?.into_iter().map(|c| c.id).collect();
        match twin.deltas_ahead(&summary.digest, &cars).await {
            Ok(pairs) => tracing::info!(release = %summary.digest, pairs, "deltas made ahead"),
            Err(e) => tracing::warn!(release = %summary.digest, "no deltas made ahead: {e}"),
        }
    }
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(summary)))
}

pub(super) async fn list(
    State(twin): State<Arc<Twin>>,
) -> Result<Json<Vec<ReleaseSummary>>, ApiError> {
    Ok(Json(twin.db.releases().await?))
}

pub(super) async fn get_one(
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
