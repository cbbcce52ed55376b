//! `/admin/signing-keys`: what the service trusts, how each key is used, and whether the legacy
//! secret can be revoked; `/admin/signing-keys/refresh`: refetch the JWKS now.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::extract::{RawQuery, State};
use serde_json::{Value, json};

use crate::auth::extract::{Principal, ServiceRole};
use crate::auth::legacy_report::{self, first_hour};
use crate::auth::usage::{legacy_verdict, window_first_hour};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::{KeyUsage, now_ms};

/// Usage per (source, kid, alg) over the window: the database plus this instance's unflushed counts.
async fn usage_in_window(state: &AppState) -> ApiResult<Vec<KeyUsage>> {
    let since = window_first_hour(state.config.jwt.legacy_revocation_window);
    let mut merged: BTreeMap<(String, String, String), KeyUsage> = BTreeMap::new();
    let stored = state.store.key_usage_since(since).await?;
    for row in stored.into_iter().chain(state.usage.pending_since(since)) {
        let key = (row.source.clone(), row.kid.clone(), row.alg.clone());
        match merged.get_mut(&key) {
            Some(sum) => {
                sum.verified_count += row.verified_count;
                sum.last_verified_at_ms = sum.last_verified_at_ms.max(row.last_verified_at_ms);
                sum.hour_start_ms = sum.hour_start_ms.min(row.hour_start_ms);
            }
            None => {
                merged.insert(key, row);
            }
        }
    }
    Ok(merged.into_values().collect())
}

async fn audit(state: &AppState, principal: &Principal, action: &str, outcome: &str) {
    if let Err(err) = state
        .store
        .record_audit(&principal.audit(action, outcome))
        .await
    {
        tracing::error!(error = format!("{err:#}"), action, "audit row not written");
    }
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
) -> ApiResult<Json<Value>> {
    let window = state.config.jwt.legacy_revocation_window;
    let asked_window = usage_window(query.as_deref(), window)?;
    let usage = usage_in_window(&state).await?;
    let evidence_since = match (
        state.store.key_usage_first_hour().await?,
        state.usage.first_pending_hour(),
    ) {
        (Some(stored), Some(pending)) => Some(stored.min(pending)),
        (stored, pending) => stored.or(pending),
    };
    let ring = state.auth.key_ring().load();
    let find = |source: &str, kid: &str| {
        usage
            .iter()
            .find(|u| u.source == source && u.kid == kid)
            .map_or((0, None), |u| {
                (u.verified_count, Some(u.last_verified_at_ms))
            })
    };
    let keys: Vec<Value> = ring
        .listing()
        .into_iter()
        .map(|key| {
            let kid = key.kid.clone().unwrap_or_default();
            let (count, last) = match key.source.as_str() {
                "legacy_secret" => find("legacy_secret", ""),
                source => find(source, &kid),
            };
            json!({
                "source": key.source.as_str(),
                "kid": key.kid,
                "alg": key.alg,
                "origin": key.origin,
                "last_verified_at_ms": last,
                "verified_count": count,
            })
        })
        .collect();
    let api_keys: Vec<Value> = usage
        .iter()
        .filter(|u| u.source == "api_key")
        .map(|u| {
            json!({
                "name": u.kid,
                "last_verified_at_ms": u.last_verified_at_ms,
                "verified_count": u.verified_count,
            })
        })
        .collect();
    let legacy_configured = !ring.legacy_secrets().is_empty();
    let (legacy_count, legacy_last) = find("legacy_secret", "");
    let now = now_ms();
    let verdict = legacy_verdict(legacy_configured, &usage, evidence_since, window, now);
    let since = first_hour(window, now).min(first_hour(asked_window, now));
    let (hourly_keys, hourly_callers) =
        legacy_report::hourly_rows(&state.store, Some(&state.usage), since).await?;
    let report = legacy_report::view(
        &hourly_keys,
        &hourly_callers,
        verdict,
        window,
        asked_window,
        now,
    );
    audit(&state, &principal, "list_signing_keys", "ok").await;
    Ok(Json(json!({
        "keys": keys,
        "api_keys": api_keys,
        "legacy_secret": {
            "configured": legacy_configured,
            "verified_count": legacy_count,
            "last_verified_at_ms": legacy_last,
        },
        "window_seconds": window.as_secs(),
        "evidence_since_ms": evidence_since,
        "legacy_revocation_safe": report.legacy_revocation_safe,
        "reason": report.reason,
        "legacy_usage": report.legacy_usage,
        "api_key_usage": report.api_key_usage,
        "legacy_kinds": report.legacy_kinds,
        "usage_window_seconds": report.usage_window_seconds,
        "usage_hourly": report.usage_hourly,
        "jwks": state.auth.fetcher().map(|fetcher| fetcher.status()),
    })))
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
            Err(ApiError::UpstreamUnavailable(format!(
                "the JWKS could not be fetched ({err}); the last good key set stays in use"
            )))
        }
    }
}
