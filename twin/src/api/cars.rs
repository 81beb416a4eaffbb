//! `/api/v1/cars`: registration and revocation, the car view, events, desired state, inspect.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use bytes::Bytes;
use cardeploy_protocol::api::{
    CarView, CertificateState, DesiredView, EventsPage, NewCar, SetDesired,
};
use cardeploy_protocol::{self as protocol, CarId, Inspection, route, validate_attribute};
use serde::Deserialize;

use super::{ApiError, bad_request, blocking, car_id, verified_release};
use crate::Twin;
use crate::cars::now;
use crate::db::{CarRecord, Conflict, Registration, StoredDesired};

/// Most events one page holds.
const MAX_EVENTS_PAGE: u32 = 1000;
const DEFAULT_EVENTS_PAGE: u32 = 100;

/// Register a car, or give a revoked one a new certificate. Only a client certificate of the
/// fleet CA is taken (checked the way the handshake checks it), and never a revoked one.
pub(super) async fn add(
    State(twin): State<Arc<Twin>>,
    Json(new): Json<NewCar>,
) -> Result<(StatusCode, Json<CarView>), ApiError> {
    let id = car_id(new.id)?;
    for (key, value) in &new.attributes {
        validate_attribute(key, value).map_err(|e| bad_request(e.to_string()))?;
    }
    let fingerprint = certificate_fingerprint(&twin, new.certificate_pem).await?;
    let record = CarRecord {
        id: id.clone(),
        attributes: new.attributes,
        fingerprint,
        created_at: now(),
        revoked_at: None,
    };
    let conflict = |message: String| Err(ApiError(StatusCode::CONFLICT, message));
    let what = match twin.db.register_car(&record).await? {
        Registration::New => "registered",
        Registration::Reprovisioned => "re-provisioned",
        Registration::Refused(Conflict::Active) => {
            return conflict(format!(
                "car {id} is registered and its certificate is active; to give it a new one, revoke the old one first (`cardeploy car revoke {id}`)"
            ));
        }
        Registration::Refused(Conflict::CertificateInUse { car }) => {
            return conflict(format!(
                "this certificate is registered already (car {car}); issue a new one for car {id}"
            ));
        }
        Registration::Refused(Conflict::CertificateRevoked { car, at }) => {
            return conflict(format!(
                "this certificate was revoked (car {car}, at {at}) and is never taken again; issue a new one (`cardeploy car add {id}`)"
            ));
        }
    };
    // A re-provisioned car keeps what it had: show the stored record.
    let record = find(&twin, &id).await?;
    twin.register(&record);
    let message = format!("certificate {} {what}", short(&record.fingerprint));
    twin.db.event(&id, now(), "registered", &message).await?;
    tracing::info!(car = %id, "car {what}");
    Ok((StatusCode::CREATED, Json(view(&twin, record).await?)))
}

/// The certificate's fingerprint if the fleet CA issued it for client authentication.
async fn certificate_fingerprint(twin: &Arc<Twin>, pem: String) -> Result<String, ApiError> {
    let refused = |e: cardeploy_link::Error| match e {
        cardeploy_link::Error::ClientCertificate { .. } | cardeploy_link::Error::Pem { .. } => {
            ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("certificate_pem: {e}"),
            )
        }
        other => ApiError::from(crate::Error::from(other)),
    };
    if twin.config.insecure_plaintext {
        // Development only: cars name themselves and no fleet CA needs to exist.
        return cardeploy_link::tls::fingerprint_pem(&pem).map_err(refused);
    }
    let ca = twin.config.ca_path();
    blocking(move || cardeploy_link::tls::check_client_certificate(&ca, &pem).map_err(refused))
        .await
}

/// The start of a fingerprint, enough for a person to tell certificates apart.
fn short(fingerprint: &str) -> &str {
    fingerprint.get(..16).unwrap_or(fingerprint)
}

/// Revoke a car's certificate: refused from the next handshake on, its session closed now. The
/// car's record, history and desired-state counter stay for when it is re-provisioned.
pub(super) async fn revoke(
    State(twin): State<Arc<Twin>>,
    Path(id): Path<String>,
) -> Result<Json<CarView>, ApiError> {
    let id = car_id(id)?;
    find(&twin, &id).await?;
    let now = now();
    if let Some(fingerprint) = twin.db.revoke_car(&id, now).await? {
        twin.unregister(&id, &fingerprint);
        let message = format!(
            "certificate {} revoked; the car is refused until it is re-provisioned",
            short(&fingerprint)
        );
        twin.db.event(&id, now, "revoked", &message).await?;
        tracing::warn!(car = %id, fingerprint, "car certificate revoked");
    }
    let car = find(&twin, &id).await?;
    Ok(Json(view(&twin, car).await?))
}

async fn view(twin: &Twin, car: CarRecord) -> Result<CarView, ApiError> {
    let reported = twin.db.reported(&car.id).await?;
    let desired = match twin.db.desired(&car.id).await? {
        Some(stored) => Some(desired_view(twin, &stored).await?),
        None => None,
    };
    let (progress, install, dropped_reports) = twin
        .fleet
        .if_present(&car.id, |live| {
            (
                live.progress.clone(),
                live.install.clone(),
                live.reports.dropped,
            )
        })
        .unwrap_or_default();
    let (connected, connected_to) = twin.connection(&car.id).await?;
    let position = twin.db.position(car.id.as_str()).await?.map(|(p, at)| {
        let (lat, lon) = p.degrees();
        cardeploy_protocol::api::PositionView { lat, lon, at }
    });
    Ok(CarView {
        position,
        progress,
        install,
        dropped_reports,
        connected,
        connected_to,
        certificate: match car.revoked_at {
            None => CertificateState::Active,
            Some(_) => CertificateState::Revoked,
        },
        revoked_at: car.revoked_at,
        id: car.id,
        attributes: car.attributes,
        fingerprint: car.fingerprint,
        desired,
        reported,
    })
}

pub(super) async fn list(State(twin): State<Arc<Twin>>) -> Result<Json<Vec<CarView>>, ApiError> {
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

pub(super) async fn get_one(
    State(twin): State<Arc<Twin>>,
    Path(id): Path<String>,
) -> Result<Json<CarView>, ApiError> {
    let id = car_id(id)?;
    let car = find(&twin, &id).await?;
    Ok(Json(view(&twin, car).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsQuery {
    /// Events per page, at most [`MAX_EVENTS_PAGE`].
    limit: Option<u32>,
    /// Only events older than this event id (`next_before` of the previous page).
    before: Option<i64>,
}

pub(super) async fn events(
    State(twin): State<Arc<Twin>>,
    Path(id): Path<String>,
    Query(query): Query<EventsQuery>,
) -> Result<Json<EventsPage>, ApiError> {
    let id = car_id(id)?;
    find(&twin, &id).await?;
    let limit = match query.limit {
        Some(0) => return Err(bad_request("limit = 0: ask for at least one event")),
        Some(n) => n.min(MAX_EVENTS_PAGE),
        None => DEFAULT_EVENTS_PAGE,
    };
    let (events, next_before) = twin.db.events_page(&id, limit, query.before).await?;
    Ok(Json(EventsPage {
        events,
        next_before,
    }))
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

pub(super) async fn set_desired(
    State(twin): State<Arc<Twin>>,
    Path(id): Path<String>,
    Json(body): Json<SetDesired>,
) -> Result<Json<DesiredView>, ApiError> {
    let id = car_id(id)?;
    find(&twin, &id).await?;
    let summary = verified_release(&twin, &body.release).await?;
    let ttl = body.ttl_secs.unwrap_or(twin.config.desired_ttl_secs);
    if !(60..=366 * 86_400).contains(&ttl) {
        return Err(bad_request(format!(
            "ttl_secs = {ttl}: use 60 s to 366 days"
        )));
    }
    let stored = twin
        .desire(&id, &summary, ttl, body.downgrade, None)
        .await?;
    // The deltas this car will ask for, if no job for the pair made them yet (a car that
    // registered after the release did not count then).
    if let Err(e) = twin
        .deltas_ahead(&summary.digest, std::slice::from_ref(&id))
        .await
    {
        tracing::warn!(car = %id, release = %summary.digest, "no deltas made ahead: {e}");
    }
    Ok(Json(desired_view(&twin, &stored).await?))
}

pub(super) async fn inspect(
    State(twin): State<Arc<Twin>>,
    Path(id): Path<String>,
) -> Result<Json<Inspection>, ApiError> {
    let id = car_id(id)?;
    find(&twin, &id).await?;
    let Some(requester) = twin.fleet.connected(&id) else {
        let why = match twin.connected_elsewhere(&id).await? {
            Some(there) => format!(
                "car {id} is connected to another twin instance ({}, API {}): ask that one",
                there.instance, there.api
            ),
            None => format!("car {id} is not connected"),
        };
        return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, why));
    };
    let answer = requester
        .request_response(route::TWIN_INSPECT, Bytes::from_static(b"{}"))
        .await
        .map_err(|e| ApiError(StatusCode::BAD_GATEWAY, e.to_string()))?;
    let inspection = protocol::decode("twin.inspect answer", &answer)
        .map_err(|e| ApiError(StatusCode::BAD_GATEWAY, e.to_string()))?;
    Ok(Json(inspection))
}
