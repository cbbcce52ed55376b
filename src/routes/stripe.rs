//! `sync-stripe-products-hardened` and `stripe-webhook`: thin handlers over `crate::stripe`.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use serde_json::{Value, json};

use crate::auth::extract::ServiceRole;
use crate::error::{ApiError, ApiResult};
use crate::extract::RawBody;
use crate::state::AppState;
use crate::store::{AuditEntry, now_ms};
use crate::stripe::StripeClient;
use crate::stripe::sync::{self, SyncError, SyncReport};
use crate::stripe::webhook::{self, WebhookError};

/// The largest webhook body taken (Stripe's events are far smaller).
pub const WEBHOOK_BODY_LIMIT: usize = 512 * 1024;

impl From<SyncError> for ApiError {
    fn from(err: SyncError) -> Self {
        match err {
            SyncError::InProgress => ApiError::SyncInProgress(err.to_string()),
            SyncError::Upstream { .. } => ApiError::UpstreamUnavailable(err.to_string()),
            SyncError::Internal(cause) => ApiError::Internal(cause),
        }
    }
}

impl From<WebhookError> for ApiError {
    fn from(err: WebhookError) -> Self {
        match err {
            WebhookError::Signature(cause) => ApiError::InvalidSignature(cause.to_string()),
            WebhookError::Unreadable(message) => ApiError::InvalidRequest(message),
            WebhookError::Store(cause) => ApiError::Internal(cause),
        }
    }
}

#[utoipa::path(
    post,
    path = "/functions/v1/sync-stripe-products-hardened",
    tag = "functions",
    summary = "Copy Stripe's product and price catalogue into the database",
    security(("bearer" = []), ("apikey" = [])),
    responses(
        (status = 200, description = "The sync ran to the end", body = SyncReport),
        crate::routes::openapi::SyncErrors,
    )
)]
pub async fn sync_products(
    State(state): State<AppState>,
    ServiceRole(principal): ServiceRole,
) -> ApiResult<Json<SyncReport>> {
    let action = "sync_stripe_products";
    let Some(client) =
        StripeClient::from_config(state.http.clone(), &state.config.stripe, state.stripe_retry)
    else {
        audit(&state, principal.audit(action, "not_configured")).await;
        return Err(ApiError::NotConfigured("STRIPE_SECRET_KEY"));
    };
    // Spawned, so a caller that hangs up (or the request timeout) does not cut a run in half.
    let store = state.store.clone();
    let holder = principal
        .request_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let result = tokio::spawn(async move { sync::run(&store, &client, &holder).await })
        .await
        .unwrap_or_else(|err| Err(SyncError::Internal(anyhow::anyhow!("sync task: {err}"))));
    let outcome = match &result {
        Ok(_) => "ok",
        Err(err) => err.outcome(),
    };
    state.stripe_metrics.sync_run(outcome);
    let mut entry = principal.audit(action, outcome);
    if let Ok(report) = &result {
        entry.detail = serde_json::to_string(report).ok();
    }
    audit(&state, entry).await;
    Ok(Json(result?))
}

async fn audit(state: &AppState, entry: AuditEntry) {
    if let Err(err) = state.store.record_audit(&entry).await {
        tracing::error!(
            error = format!("{err:#}"),
            action = entry.action,
            "audit row not written"
        );
    }
}

#[utoipa::path(
    post,
    path = "/functions/v1/stripe-webhook",
    tag = "functions",
    summary = "Receive a Stripe event",
    request_body(
        content = crate::stripe::objects::Event,
        description = "A Stripe event exactly as Stripe sent it; the signature covers the raw bytes. \
                       Event types edgegate does not act on are recorded and answered 200."
    ),
    security(("stripe_signature" = [])),
    responses(
        (status = 200, description = "The event is recorded (or was already)", body = crate::routes::openapi::WebhookReceipt),
        crate::routes::openapi::WebhookErrors,
    )
)]
pub async fn webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> ApiResult<Json<Value>> {
    let secrets = &state.config.stripe.webhook_secrets;
    if secrets.is_empty() {
        return Err(ApiError::NotConfigured("STRIPE_WEBHOOK_SECRET"));
    }
    // A header that is not text is as good as missing.
    let signature = headers
        .get("stripe-signature")
        .and_then(|value| value.to_str().ok());
    match webhook::receive(&state.store, secrets, signature, &body, now_ms()).await {
        Ok(delivery) => {
            let outcome = if delivery.duplicate {
                "duplicate"
            } else {
                "applied"
            };
            state
                .stripe_metrics
                .webhook_event(&delivery.event_type, outcome);
            Ok(Json(
                json!({"received": true, "duplicate": delivery.duplicate}),
            ))
        }
        Err(err) => {
            let outcome = match &err {
                WebhookError::Signature(_) => "invalid_signature",
                WebhookError::Unreadable(_) => "unreadable",
                WebhookError::Store(_) => "error",
            };
            state.stripe_metrics.webhook_event("unknown", outcome);
            Err(err.into())
        }
    }
}
