//! `/admin/signing-keys`: what the service trusts, how each key is used, and whether the legacy
//! secret can be revoked; `/admin/signing-keys/refresh`: refetch the JWKS now.

use std::time::Duration;

use axum::Json;
use axum::extract::{RawQuery, State};
use serde_json::{Value, json};

use crate::audit;
use crate::auth::legacy_report::{self, KeyReport};
use crate::credentials::{Principal, ServiceRole};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

async fn audit(state: &AppState, principal: &Principal, action: &str, outcome: &str) {
    audit::record(
        &state.store,
        &principal.audit(&state.clock, action, outcome),
    )
    .await;
}

/// Longest span `?window_seconds=` may ask the usage for (the revocation window's own limit).
const MAX_USAGE_WINDOW_SECONDS: u64 = 2_592_000;

/// `?window_seconds=N` (1 to 30 days): the span of the usage lists and hourly series; the
/// verdict always covers the revocation window.
fn usage_window(query: Option<&str>, default: Duration) -> ApiResult<Duration> {
    let Some(value) = query
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("window_seconds="))
    else {
        return Ok(default);
    };
    match value.parse::<u64>() {
        Ok(seconds @ 1..=MAX_USAGE_WINDOW_SECONDS) => Ok(Duration::from_secs(seconds)),
        _ => Err(ApiError::ValidationFailed {
            field: "window_seconds".to_owned(),
            message: format!(
                "must be a whole number of seconds from 1 to {MAX_USAGE_WINDOW_SECONDS}"
            ),
        }),
    }
}

#[utoipa::path(
    get,
    path = "/admin/signing-keys",
    tag = "admin",
    summary = "Every trusted key, its use, and whether revoking the legacy secret is safe",
    security(("bearer" = []), ("apikey" = [])),
    params(("window_seconds" = Option<u64>, Query, minimum = 1, maximum = 2592000,
        description = "Span of the usage lists and hourly series (1 s to 30 days); the verdict always covers the revocation window")),
    responses(
        (status = 200, description = "The key listing and the verdict", body = crate::routes::openapi::SigningKeys),
        crate::routes::openapi::SigningKeysErrors,
    )
)]
pub async fn signing_keys(
    State(state): State<AppState>,
    ServiceRole(principal): ServiceRole,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<KeyReport>> {
    let window = state.config.jwt.legacy_revocation_window;
    let asked_window = usage_window(query.as_deref(), window)?;
    let report = legacy_report::key_report(
        &state.store,
        &state.usage,
        &state.auth,
        &state.clock,
        window,
        asked_window,
    )
    .await?;
    audit(&state, &principal, "list_signing_keys", "ok").await;
    Ok(Json(report))
}

#[utoipa::path(
    post,
    path = "/admin/signing-keys/refresh",
    tag = "admin",
    summary = "Refetch the JWKS now (urgent revocation)",
    security(("bearer" = []), ("apikey" = [])),
    responses(
        (status = 200, description = "The JWKS was fetched", body = crate::routes::openapi::Refreshed),
        crate::routes::openapi::RefreshErrors,
    )
)]
pub async fn refresh(
    State(state): State<AppState>,
    ServiceRole(principal): ServiceRole,
) -> ApiResult<Json<Value>> {
    let Some(fetcher) = state.auth.fetcher() else {
        audit(&state, &principal, "refresh_signing_keys", "not_configured").await;
        return Err(ApiError::NotConfigured(
            "a JWKS URL (SUPABASE_URL or SUPABASE_JWKS_URL)",
        ));
    };
    match fetcher.refresh_now().await {
        Ok(report) => {
            audit(&state, &principal, "refresh_signing_keys", "ok").await;
            Ok(Json(json!({
                "refreshed": true,
                "not_modified": report.not_modified,
                "keys": report.keys,
                "dropped": report.dropped,
                "generation": report.generation,
                "ttl_seconds": report.ttl.as_secs(),
            })))
        }
        Err(err) => {
            audit(&state, &principal, "refresh_signing_keys", "upstream_error").await;
            let stats = fetcher.status().stats;
            let kept = if stats.expired {
                "the last good key set went stale for more than 24 h past its freshness and its \
                 keys were dropped, so tokens of the fetched signing keys are refused"
            } else if stats.last_success_unix.is_some() {
                "the last good key set stays in use"
            } else {
                "no key set has been fetched yet, so tokens of signing keys other than \
                 SUPABASE_JWKS's are refused"
            };
            Err(ApiError::UpstreamUnavailable(format!(
                "the JWKS could not be fetched ({err}); {kept}"
            )))
        }
    }
}
