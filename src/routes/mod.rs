//! The routes, each a thin handler: parse, call one domain function, map the result.

mod admin;
mod health;
mod jwt_test;
pub mod openapi;
mod sms;
mod stripe;

use std::borrow::Cow;

use axum::Router;
use axum::extract::FromRequestParts;
use axum::http::Uri;
use axum::http::request::Parts;
use axum::routing::{get, post};

use crate::error::ApiError;
use crate::server::middleware::{LimitBodyLayer, StampArrivalLayer};
use crate::state::AppState;

const STRIPE_WEBHOOK_PATH: &str = "/functions/v1/stripe-webhook";

/// The routes whose body limit is below the service-wide one, by path pattern. Each one's own
/// body-limit layer takes its limit from here, and the service-wide layer, which sits outside it
/// and so refuses first a declared length over both, names it too ([`body_limit`]).
const BODY_LIMITS: [(&str, usize); 2] = [
    (
        crate::twilio::STATUS_CALLBACK_PATH,
        crate::twilio::status::BODY_LIMIT,
    ),
    (STRIPE_WEBHOOK_PATH, stripe::WEBHOOK_BODY_LIMIT),
];

/// The body limit of its own of the route matched as `pattern`, if it has one.
pub fn body_limit(pattern: &str) -> Option<usize> {
    BODY_LIMITS
        .iter()
        .find(|(path, _)| *path == pattern)
        .map(|(_, limit)| *limit)
}

/// The body-limit layer of a route in [`BODY_LIMITS`].
fn limit_body(pattern: &str) -> LimitBodyLayer {
    LimitBodyLayer(body_limit(pattern).unwrap_or_else(|| panic!("{pattern} is not in BODY_LIMITS")))
}

/// Every route of the contract, without middleware.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .route(
            "/functions/v1/jwt-test",
            get(jwt_test::jwt_test).post(jwt_test::jwt_test),
        )
        .route(
            "/functions/v1/send-sms",
            post(sms::send_sms).layer(StampArrivalLayer),
        )
        .route(
            crate::twilio::STATUS_CALLBACK_PATH,
            post(sms::twilio_status).layer(limit_body(crate::twilio::STATUS_CALLBACK_PATH)),
        )
        .route(
            "/functions/v1/sync-stripe-products-hardened",
            post(stripe::sync_products),
        )
        .route(
            STRIPE_WEBHOOK_PATH,
            post(stripe::webhook).layer(limit_body(STRIPE_WEBHOOK_PATH)),
        )
        .route("/admin/signing-keys", get(admin::signing_keys))
        .route("/admin/signing-keys/refresh", post(admin::refresh))
        .route("/admin/stripe/reconcile", post(stripe::reconcile))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(shown_path(uri.path()).into_owned())
}

/// A path as a 404 names it: a segment longer than [`SHOWN_SEGMENT`] bytes, or one that starts
/// like an API key (`sb_`), is written `…`, so that a token or key put in the path by mistake
/// (`/functions/v1/eyJ…`) is not sent back, where a client's error reporting would keep it.
/// A server span's `url.path` is written so too, for every request: a path with nothing to hide
/// is lent as it is.
pub(crate) fn shown_path(path: &str) -> Cow<'_, str> {
    let hidden = |segment: &str| segment.len() > SHOWN_SEGMENT || segment.starts_with("sb_");
    if !path.split('/').any(hidden) {
        return Cow::Borrowed(path);
    }
    let shown: Vec<&str> = path
        .split('/')
        .map(|segment| if hidden(segment) { "…" } else { segment })
        .collect();
    Cow::Owned(shown.join("/"))
}

/// The longest path segment a 404 repeats: every route's segment fits
/// (`sync-stripe-products-hardened`, 29 bytes), a token, a key, a signature or a Twilio auth
/// token (32 hex digits) does not.
const SHOWN_SEGMENT: usize = 29;

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// A handler that takes this runs only once the database's schema can be used: `serve` started
/// while PostgreSQL did not answer applies the migrations when it does, and until then every
/// route that needs the database answers 503 `NOT_READY` rather than querying tables that may
/// not exist yet. Taken after the credential, so only a caller allowed in learns it.
pub struct DatabaseReady;

impl FromRequestParts<AppState> for DatabaseReady {
    type Rejection = ApiError;

    async fn from_request_parts(_: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if state.store.is_ready() {
            Ok(Self)
        } else if state
            .store
            .migrations_missing()
            .is_some_and(|missing| missing > 0)
        {
            Err(ApiError::NotReady(
                "the database's schema is behind this service's; try again later".to_owned(),
            ))
        } else {
            Err(ApiError::NotReady(
                "the database has not answered since start-up; try again later".to_owned(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every request's span names its path: one with nothing to hide is lent, not copied; one
    /// with a token in it is written anew (tests/it/http.rs checks what a 404 says).
    #[test]
    fn a_path_with_nothing_to_hide_is_lent_as_it_is() {
        for path in [
            "/",
            "/functions/v1/jwt-test",
            "/functions/v1/sync-stripe-products-hardened",
        ] {
            assert!(
                matches!(shown_path(path), Cow::Borrowed(p) if p == path),
                "{path}"
            );
        }
        let token = format!("/functions/v1/{}", "a".repeat(SHOWN_SEGMENT + 1));
        assert_eq!(shown_path(&token), "/functions/v1/…");
        assert_eq!(shown_path("/x/sb_publishable_k/y"), "/x/…/y");
    }
}
