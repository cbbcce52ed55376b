//! `sync-stripe-products-hardened`, `stripe-webhook` and `/admin/stripe/reconcile`: thin
//! handlers over `crate::stripe`.

use axum::Json;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use serde_json::{Value, json};

use crate::audit;
use crate::body::{RawBody, SignedBody};
use crate::credentials::ServiceRole;
use crate::error::{ApiError, ApiResult};
use crate::routes::DatabaseReady;
use crate::state::AppState;
use crate::stripe::StripeClient;
use crate::stripe::reconcile::{self, ReconcileReport};
use crate::stripe::signature;
use crate::stripe::sync::{self, SyncReport};
use crate::stripe::webhook::{self, WebhookError};

/// The largest webhook body taken (Stripe's events are far smaller).
pub const WEBHOOK_BODY_LIMIT: usize = 512 * 1024;

fn stripe_client(state: &AppState) -> Option<StripeClient> {
    StripeClient::from_config(
        state.stripe_http.clone(),
        &state.config.stripe,
        state.stripe_retry,
    )
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
    _: DatabaseReady,
) -> ApiResult<Json<SyncReport>> {
    let action = "sync_stripe_products";
    let Some(client) = stripe_client(&state) else {
        audit::record(
            &state.store,
            &principal.audit(&state.clock, action, "not_configured"),
        )
        .await;
        return Err(ApiError::NotConfigured("STRIPE_SECRET_KEY"));
    };
    let audit = principal.audit(&state.clock, action, "pending");
    let report = sync::run_for_caller(
        state.store.clone(),
        client,
        state.clock.clone(),
        audit,
        &state.stripe_metrics,
    )
    .await?;
    Ok(Json(report))
}

/// The optional body of `/admin/stripe/reconcile`.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReconcileRequest {
    /// Unix seconds, a whole number (`1700000000.0` is taken as `1700000000`), not in the
    /// future; one older than Stripe's 30-day event retention is moved up to it. Anything else
    /// (a string, a fraction, a number past a 64-bit integer) is 422 `VALIDATION_FAILED` naming
    /// `since`.
    // Kept as written, so its type and range are checked as a rule of `since` (422), not as
    // a body that cannot be read (400).
    #[schema(value_type = Option<i64>)]
    since: Option<Box<serde_json::value::RawValue>>,
}

#[utoipa::path(
    post,
    path = "/admin/stripe/reconcile",
    tag = "admin",
    summary = "Apply every event in Stripe's event list that the ledger lacks",
    security(("bearer" = []), ("apikey" = [])),
    request_body(content = Option<ReconcileRequest>, content_type = "application/json",
        description = "Optional; without it the window starts an hour before the last run that covered everything before it, or 30 days ago when none has"),
    responses(
        (status = 200, description = "Every listed event is in the ledger", body = ReconcileReport),
        crate::routes::openapi::ReconcileErrors,
    )
)]
pub async fn reconcile(
    State(state): State<AppState>,
    ServiceRole(principal): ServiceRole,
    _: DatabaseReady,
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
    let invalid = |message| ApiError::ValidationFailed {
        field: "since".to_owned(),
        message,
    };
    let since = match request.and_then(|r| r.since) {
        Some(since) => {
            let seconds = reconcile::since_seconds(since.get()).map_err(invalid)?;
            Some(reconcile::requested_since(seconds, state.clock.unix_now()).map_err(invalid)?)
        }
        None => None,
    };
    let Some(client) = stripe_client(&state) else {
        audit::record(
            &state.store,
            &principal.audit(&state.clock, action, "not_configured"),
        )
        .await;
        return Err(ApiError::NotConfigured("STRIPE_SECRET_KEY"));
    };
    let audit = principal.audit(&state.clock, action, "pending");
    let metrics = &state.reconcile_metrics;
    let report = reconcile::run_for_caller(
        state.store.clone(),
        client,
        state.clock.clone(),
        since,
        audit,
        metrics,
    )
    .await?;
    Ok(Json(report))
}

/// A webhook's `Stripe-Signature`, checked before its body is read: the webhook is configured
/// (503 `NOT_CONFIGURED`) and the header is there, well-formed and recent
/// ([`signature::check_header`]; 400 `INVALID_SIGNATURE`, counted as a refused delivery). The
/// signature itself is verified over the body afterwards.
pub struct StripeSignature(String);

impl FromRequestParts<AppState> for StripeSignature {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if state.config.stripe.webhook_secrets.is_empty() {
            return Err(ApiError::NotConfigured("STRIPE_WEBHOOK_SECRET"));
        }
        // A header that is not text is as good as missing.
        let header = parts
            .headers
            .get("stripe-signature")
            .and_then(|value| value.to_str().ok());
        let now = state.clock.now_ms().div_euclid(1000);
        match signature::check_header(header, now) {
            Ok(()) => Ok(Self(header.unwrap_or_default().to_owned())),
            Err(err) => {
                let err = WebhookError::from(err);
                state.stripe_metrics.webhook_event("unknown", err.outcome());
                Err(err.into())
            }
        }
    }
}

#[utoipa::path(
    post,
    path = "/functions/v1/stripe-webhook",
    tag = "functions",
    summary = "Receive a Stripe event",
    request_body(
        content = crate::routes::openapi::WebhookBody,
        description = "A Stripe event exactly as Stripe sent it; the signature covers the raw bytes. \
                       Event types edgegate does not act on are recorded and answered 200; so are a \
                       connected account's event (`account` set, from a Connect endpoint) and, \
                       when STRIPE_SECRET_KEY is set, an event whose `livemode` is not the key's \
                       mode, which are recorded and not applied. A thin event (`object` \
                       `v2.core.event`, from an event destination whose payload style is thin) is \
                       answered 200 and recorded, not applied: edgegate acts on snapshot events."
    ),
    security(("stripe_signature" = [])),
    responses(
        (status = 200, description = "The event is recorded (or was already)", body = crate::routes::openapi::WebhookReceipt),
        crate::routes::openapi::WebhookErrors,
    )
)]
pub async fn webhook(
    State(state): State<AppState>,
    StripeSignature(signature): StripeSignature,
    _: DatabaseReady,
    SignedBody(body): SignedBody,
) -> ApiResult<Json<Value>> {
    let stripe = stripe_client(&state);
    let delivery = webhook::receive(
        &state.store,
        stripe.as_ref(),
        &state.config.stripe.webhook_secrets,
        Some(&signature),
        &body,
        state.clock.now_ms(),
        &state.stripe_metrics,
    )
    .await?;
    Ok(Json(
        json!({"received": true, "duplicate": delivery.duplicate}),
    ))
}
