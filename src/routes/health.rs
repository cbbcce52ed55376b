//! Liveness, readiness and metrics.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::telemetry::Exposition;

/// 200 while the process runs; touches nothing else so a slow database never fails liveness.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses(
        (status = 200, description = "The process runs", body = crate::routes::openapi::Health),
        crate::routes::openapi::CommonErrors,
    )
)]
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// 200 when every dependency needed to serve answers; 503 `NOT_READY` with the detail otherwise.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "The database answers and the key ring can verify", body = crate::routes::openapi::Ready),
        (status = 503, description = "A dependency is not ready; see checks", body = crate::routes::openapi::NotReady),
        crate::routes::openapi::CommonErrors,
    )
)]
pub async fn readyz(State(state): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    // A database that answers but whose migrations are still to be applied (`serve` started
    // while it was down), or that lacks some of this binary's (`serve --no-migrate`), is not
    // ready either: the routes that need it refuse until then.
    let store = &state.store;
    let probed = match store.ping().await {
        Ok(()) => match store.migrations_missing() {
            Some(0) if !store.is_ready() => {
                readiness_failed(&anyhow::anyhow!("migrations not applied yet"))
            }
            Some(0) => Ok(()),
            Some(missing) => Err(format!(
                "the database lacks {missing} of this binary's {} migrations: run edgegate \
                 migrate",
                store.shipped_migration_count()
            )),
            None => Err("the migrations the database has applied are not read yet".to_owned()),
        },
        Err(err) => readiness_failed(&err),
    };
    state.metrics.database_ready.set(i64::from(probed.is_ok()));
    let database = match probed {
        Ok(()) => json!({ "ok": true, "backend": store.kind().as_str() }),
        Err(error) => json!({ "ok": false, "backend": store.kind().as_str(), "error": error }),
    };
    let key_ring = key_ring_check(&state);
    let ready = database["ok"] == true && key_ring["ok"] == true;
    let checks = json!({ "database": database, "key_ring": key_ring });
    if ready {
        Ok(Json(json!({ "status": "ready", "checks": checks })))
    } else {
        Err(ApiError::DependenciesNotReady(checks))
    }
}

/// A database that did not answer the probe, or that `serve` has not migrated yet: logged, and
/// answered without its cause; one that answered but takes no writes is answered saying so.
fn readiness_failed(err: &anyhow::Error) -> Result<(), String> {
    tracing::warn!(
        error = crate::error::causes(err),
        "readiness: database check failed"
    );
    match err.downcast_ref::<crate::store::ReadOnly>() {
        Some(read_only) => Err(read_only.to_string()),
        None => Err("database did not answer".to_owned()),
    }
}

/// The key ring is ready when it can verify something; with no credential configured at all
/// there is nothing to wait for. A stale JWKS still verifies (stale-if-error) and is reported.
fn key_ring_check(state: &AppState) -> serde_json::Value {
    let ring = state.auth.key_ring().load();
    let config = &state.config;
    let configured = ring.can_verify()
        || config.jwt.jwks_url.is_some()
        || !config.api_keys.secret.is_empty()
        || !config.api_keys.publishable.is_empty();
    let jwks = state.auth.fetcher().map(|fetcher| {
        let status = fetcher.status();
        json!({
            "key_set_age_seconds": status.stats.key_set_age_seconds,
            "stale": status.stats.stale,
            "expired": status.stats.expired,
            "consecutive_failures": status.consecutive_failures,
        })
    });
    json!({
        "ok": !configured || state.auth.can_verify(),
        "configured": configured,
        "keys": ring.listing().len(),
        "jwks": jwks,
    })
}

/// Prometheus metrics, in the Prometheus text format or, when asked for, OpenMetrics.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "The Prometheus text format 0.0.4 (`text/plain; version=0.0.4`), or OpenMetrics 1.0 (`application/openmetrics-text; version=1.0.0`) when the `Accept` entry of highest q names `application/openmetrics-text`, as Prometheus's scraper sends it",
            content(
                (String = "text/plain"),
                (String = "application/openmetrics-text"),
            )),
        crate::routes::openapi::CommonErrors,
    )
)]
pub async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let exposition = Exposition::negotiate(&headers);
    (
        [(header::CONTENT_TYPE, exposition.content_type())],
        state.metrics.render(exposition),
    )
        .into_response()
}
