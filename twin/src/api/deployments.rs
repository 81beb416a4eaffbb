//! `/api/v1/deployments`: fleet deployments — create (refused when it selects a car of a running
//! deployment, unless it supersedes it), preview, list, status, pause, resume, abort. The
//! rollout itself is the driver's (`crate::deployments`).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use cardeploy_protocol::api::{DeploymentView, NewDeployment, PreviewRequest, PreviewView};

use super::{ApiError, bad_request, verified_release};
use crate::Twin;
use crate::deployments::{self, Fleet, Picker};
use crate::fleet::rollout;

/// At most this many deployments are kept (finished ones included).
const MAX_DEPLOYMENTS: i64 = 10_000;

fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(bad_request(format!(
            "deployment name {name:?}: 1-64 characters of A-Z a-z 0-9 - _ ., starting alphanumeric"
        )))
    }
}

fn picker(selector: &str, geofence: Option<&serde_json::Value>) -> Result<Picker, ApiError> {
    Picker::new(selector, geofence).map_err(bad_request)
}

pub(super) async fn preview(
    State(twin): State<Arc<Twin>>,
    Json(body): Json<PreviewRequest>,
) -> Result<Json<PreviewView>, ApiError> {
    let picker = picker(&body.selector, body.geofence.as_ref())?;
    let fleet = Fleet::read(&twin).await?;
    let picked = picker.pick(&fleet);
    Ok(Json(PreviewView {
        total: picked.len(),
        cars: picked
            .into_iter()
            .take(1000)
            .map(|c| c.id.clone())
            .collect(),
    }))
}

pub(super) async fn create(
    State(twin): State<Arc<Twin>>,
    Json(body): Json<NewDeployment>,
) -> Result<(StatusCode, Json<DeploymentView>), ApiError> {
    check_name(&body.name)?;
    let picker = picker(&body.selector, body.geofence.as_ref())?;
    let plan = deployments::plan(&body, rollout_now()).map_err(bad_request)?;
    let summary = verified_release(&twin, &body.release).await?;
    let _turn = twin.deployments_turn().await?;
    if twin.db.deployment_count().await? >= MAX_DEPLOYMENTS {
        return Err(ApiError(
            StatusCode::INSUFFICIENT_STORAGE,
            format!("this twin keeps at most {MAX_DEPLOYMENTS} deployments"),
        ));
    }
    let fleet = Fleet::read(&twin).await?;
    let picked = picker.pick(&fleet);
    let existing = twin.db.deployments().await?;
    if existing.iter().any(|d| d.name == body.name) {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("a deployment named {:?} exists", body.name),
        ));
    }
    // One car, one running deployment.
    let overlaps = deployments::overlaps(&picked, &existing, &fleet);
    if !overlaps.is_empty() && !body.supersede {
        let what: Vec<String> = overlaps
            .iter()
            .map(|(name, cars)| {
                let some: Vec<&str> = cars.iter().take(5).map(String::as_str).collect();
                format!(
                    "{name} ({} cars: {}{})",
                    cars.len(),
                    some.join(", "),
                    if cars.len() > 5 { ", …" } else { "" }
                )
            })
            .collect();
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "it selects cars of running deployments: {}; supersede them (`--supersede`) or narrow the selector",
                what.join("; ")
            ),
        ));
    }
    for (name, _) in &overlaps {
        let Some(old) = existing.iter().find(|d| d.name == *name) else {
            continue;
        };
        let aborted = rollout::abort(&old.progress).map_err(bad_request)?;
        twin.db
            .save_progress(
                name,
                &aborted,
                &[],
                Some(&format!("superseded by deployment {}", body.name)),
                crate::now(),
            )
            .await?;
    }
    let record = deployments::record(&body, &summary.digest, plan);
    if !twin.db.insert_deployment(&record).await? {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("a deployment named {:?} exists", body.name),
        ));
    }
    twin.db
        .save_progress(
            &record.name,
            &record.progress,
            &[],
            Some(&format!(
                "created: {}@{} to {} cars selected now",
                summary.line,
                summary.version,
                picked.len()
            )),
            crate::now(),
        )
        .await?;
    // The first car does not wait: the deltas from what the selected cars run are made now.
    let cars: Vec<_> = picked.iter().map(|c| c.id.clone()).collect();
    if let Err(e) = twin.deltas_ahead(&summary.digest, &cars).await {
        tracing::warn!(deployment = %record.name, "no deltas made ahead: {e}");
    }
    drop(_turn);
    twin.deployments_wake.notify_one();
    let view = deployments::view(&twin, &record, &fleet).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

fn rollout_now() -> u64 {
    crate::now().unsigned_abs()
}

pub(super) async fn list(
    State(twin): State<Arc<Twin>>,
) -> Result<Json<Vec<DeploymentView>>, ApiError> {
    let fleet = Fleet::read(&twin).await?;
    let mut views = Vec::new();
    for d in twin.db.deployments().await? {
        views.push(deployments::view(&twin, &d, &fleet).await?);
    }
    Ok(Json(views))
}

async fn find(twin: &Twin, name: &str) -> Result<crate::db::StoredDeployment, ApiError> {
    twin.db
        .deployments()
        .await?
        .into_iter()
        .find(|d| d.name == name)
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("no deployment {name:?} (`cardeploy deploy list`)"),
            )
        })
}

pub(super) async fn get_one(
    State(twin): State<Arc<Twin>>,
    Path(name): Path<String>,
) -> Result<Json<DeploymentView>, ApiError> {
    let d = find(&twin, &name).await?;
    let fleet = Fleet::read(&twin).await?;
    Ok(Json(deployments::view(&twin, &d, &fleet).await?))
}

/// Pause, resume or abort.
pub(super) async fn act(
    State(twin): State<Arc<Twin>>,
    Path((name, action)): Path<(String, String)>,
) -> Result<Json<DeploymentView>, ApiError> {
    let _turn = twin.deployments_turn().await?;
    let d = find(&twin, &name).await?;
    let fleet = Fleet::read(&twin).await?;
    let next = match action.as_str() {
        "pause" => rollout::pause(&d.progress),
        "abort" => rollout::abort(&d.progress),
        "resume" => {
            // The failures forgiven are those of the cars as they report now.
            let members = deployments::members_of(&twin, &d, &fleet).await?;
            rollout::resume(&d.progress, &deployments::cars(&members))
        }
        other => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no action {other:?}: pause, resume or abort"),
            ));
        }
    }
    .map_err(|why| ApiError(StatusCode::CONFLICT, why))?;
    twin.db
        .save_progress(
            &name,
            &next,
            &[],
            Some(match action.as_str() {
                "pause" => "paused by the operator",
                "resume" => "resumed by the operator (the failures so far are forgiven)",
                _ => "aborted by the operator",
            }),
            crate::now(),
        )
        .await?;
    drop(_turn);
    twin.deployments_wake.notify_one();
    let d = find(&twin, &name).await?;
    Ok(Json(deployments::view(&twin, &d, &fleet).await?))
}
