//! `sync-stripe-products-hardened`, `stripe-webhook` and `/admin/stripe/reconcile`: thin
//! handlers over `crate::stripe`.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use serde_json::{Value, json};
use tracing::Instrument as _;

use crate::auth::extract::{Principal, ServiceRole};
use crate::error::{ApiError, ApiResult};
use crate::extract::RawBody;
use crate::state::AppState;
use crate::store::{AuditEntry, now_ms};
use crate::stripe::StripeClient;
use crate::stripe::reconcile::{self, ReconcileError, ReconcileReport, Trigger};
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

impl From<ReconcileError> for ApiError {
    fn from(err: ReconcileError) -> Self {
        match err {
            ReconcileError::InProgress => ApiError::SyncInProgress(err.to_string()),
            ReconcileError::Upstream { .. } => ApiError::UpstreamUnavailable(err.to_string()),
            ReconcileError::Internal(cause) => ApiError::Internal(cause),
        }
    }
}

impl From<WebhookError> for ApiError {
    fn from(err: WebhookError) -> Self {
        match err {
            WebhookError::Signature(cause) => ApiError::InvalidSignature(cause.to_string()),
            WebhookError::Unreadable(message) => ApiError::InvalidRequest(message),
            WebhookError::Store(cause) => ApiError::Internal(cause),
            WebhookError::NeedsSecretKey(_) => {
                tracing::warn!(error = %err, "same-second event refused");
                ApiError::NotConfigured("STRIPE_SECRET_KEY")
            }
            WebhookError::Upstream { .. } => ApiError::UpstreamUnavailable(err.to_string()),
        }
    }
}

fn stripe_client(state: &AppState) -> Option<StripeClient> {
    StripeClient::from_config(state.http.clone(), &state.config.stripe, state.stripe_retry)
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
    let Some(client) = stripe_client(&state) else {
        audit(&state, principal.audit(action, "not_configured")).await;
        return Err(ApiError::NotConfigured("STRIPE_SECRET_KEY"));
    };
    // Spawned, so a caller that hangs up (or the request timeout) does not cut a run in half.
    let (store, holder) = (state.store.clone(), holder(&principal));
    // In the request's span, so its logs and its calls to Stripe stay in the request's trace.
    let run = async move { sync::run(&store, &client, &holder).await };
    let result = tokio::spawn(run.instrument(tracing::Span::current()))
        .await
        .unwrap_or_else(|err| Err(SyncError::Internal(anyhow::anyhow!("sync task: {err}"))));
    let outcome = audit_run(&state, &principal, action, &result, SyncError::outcome).await;
    state.stripe_metrics.sync_run(outcome);
    Ok(Json(result?))
}

/// The name a run's lock row carries: the request id, which the logs show too.
fn holder(principal: &Principal) -> String {
    principal
        .request_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// Audits a finished run (its outcome and, on success, its answer); returns the outcome.
async fn audit_run<R: serde::Serialize, E>(
    state: &AppState,
    principal: &Principal,
    action: &str,
    result: &Result<R, E>,
    outcome_of: fn(&E) -> &'static str,
) -> &'static str {
    let outcome = result.as_ref().map_or_else(outcome_of, |_| "ok");
    let mut entry = principal.audit(action, outcome);
    if let Ok(report) = result {
        entry.detail = serde_json::to_string(report).ok();
    }
    audit(state, entry).await;
    outcome
}

/// The optional body of `/admin/stripe/reconcile`.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReconcileRequest {
    /// Unix seconds; the default is `reconcile::default_since`.
    since: Option<i64>,
}

#[utoipa::path(
    post,
    path = "/admin/stripe/reconcile",
    tag = "admin",
    summary = "Apply every event in Stripe's event list that the ledger lacks",
    security(("bearer" = []), ("apikey" = [])),
    request_body(content = Option<ReconcileRequest>, content_type = "application/json",
        description = "Optional; without it the window starts at the newest ledger event minus one hour"),
    responses(
        (status = 200, description = "Every listed event is in the ledger", body = ReconcileReport),
        crate::routes::openapi::ReconcileErrors,
    )
)]
pub async fn reconcile(
    State(state): State<AppState>,
    ServiceRole(principal): ServiceRole,
    RawBody(body): RawBody,
) -> ApiResult<Json<ReconcileReport>> {
    let action = "reconcile_stripe_events";
    let request: Option<ReconcileRequest> = if body.trim_ascii().is_empty() {
        None
    } else {
        // `null` reads as no body: the body is optional.
        serde_json::from_slice(&body)
            .map_err(|err| ApiError::InvalidRequest(format!("the body cannot be read: {err}")))?
    };
    let since = match request.and_then(|r| r.since) {
        Some(since) => Some(
            reconcile::requested_since(since, now_ms().div_euclid(1000)).map_err(|message| {
                ApiError::ValidationFailed {
                    field: "since".to_owned(),
                    message,
                }
            })?,
        ),
        None => None,
    };
    let Some(client) = stripe_client(&state) else {
        audit(&state, principal.audit(action, "not_configured")).await;
        return Err(ApiError::NotConfigured("STRIPE_SECRET_KEY"));
    };
    // Spawned, as the sync is.
    let (store, holder) = (state.store.clone(), holder(&principal));
    let run = async move { reconcile::run(&store, &client, &holder, Trigger::Manual, since).await };
    let result = tokio::spawn(run.instrument(tracing::Span::current()))
        .await
        .unwrap_or_else(|err| {
            Err(ReconcileError::Internal(anyhow::anyhow!(
                "reconcile task: {err}"
            )))
        });
    state.reconcile_metrics.record(Trigger::Manual, &result);
    audit_run(&state, &principal, action, &result, ReconcileError::outcome).await;
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
    let stripe = stripe_client(&state);
    match webhook::receive(
        &state.store,
        stripe.as_ref(),
        secrets,
        signature,
        &body,
        now_ms(),
    )
    .await
    {
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
                WebhookError::NeedsSecretKey(_) | WebhookError::Upstream { .. } => {
                    "same_second_unsettled"
                }
            };
            state.stripe_metrics.webhook_event("unknown", outcome);
            Err(err.into())
        }
    }
}
