//! The routes, each a thin handler: parse, call one domain function, map the result.

mod health;

use axum::Router;
use axum::http::Uri;
use axum::routing::get;

use crate::error::ApiError;
use crate::state::AppState;

/// Every route of the contract that exists so far, without middleware.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(uri.path().to_owned())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
