//! Liveness, readiness and metrics.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::state::AppState;

/// 200 while the process runs; touches nothing else so a slow database never fails liveness.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// 200 when every dependency needed to serve answers; 503 `NOT_READY` with the detail otherwise.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let database = match state.store.ping().await {
        Ok(()) => json!({ "ok": true, "backend": state.store.kind().as_str() }),
        Err(err) => {
            tracing::warn!(
                error = format!("{err:#}"),
                "readiness: database check failed"
            );
            json!({ "ok": false, "backend": state.store.kind().as_str(), "error": "database did not answer" })
        }
    };
    let ready = database["ok"] == true;
    let checks = json!({ "database": database });
    if ready {
        (
            StatusCode::OK,
            Json(json!({ "status": "ready", "checks": checks })),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "code": "NOT_READY",
                "message": "a dependency is not ready; see checks",
                "checks": checks,
            })),
        )
            .into_response()
    }
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
