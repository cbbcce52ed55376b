//! The middleware stack, outermost first, as one readable list (see `apply`).

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use http_body_util::Limited;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::{
    SetSensitiveRequestHeadersLayer, SetSensitiveResponseHeadersLayer,
};
use tower_http::trace::TraceLayer;

use crate::config::CorsOrigins;
use crate::error::ApiError;
use crate::state::AppState;

/// How long a request may take before it is answered 504 `TIMEOUT`.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the routes in `LONG_RUNNING_ROUTES` may take: a full catalogue sync pages through
/// Stripe's whole catalogue, a reconciliation through 30 days of events, retries included.
pub const LONG_REQUEST_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Routes (matched patterns) that get `LONG_REQUEST_TIMEOUT` instead of the default.
pub const LONG_RUNNING_ROUTES: &[&str] = &[
    "/functions/v1/sync-stripe-products-hardened",
    "/admin/stripe/reconcile",
];
/// The largest request body any route takes; routes may set a smaller limit of their own.
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Headers kept out of logs and traces: credentials and provider signatures.
fn sensitive_request_headers() -> [HeaderName; 5] {
    [
        header::AUTHORIZATION,
        header::COOKIE,
        HeaderName::from_static("apikey"),
        HeaderName::from_static("stripe-signature"),
        HeaderName::from_static("x-twilio-signature"),
    ]
}

/// The service-wide bounds on a request.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub timeout: Duration,
    pub body: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: REQUEST_TIMEOUT,
            body: DEFAULT_BODY_LIMIT,
        }
    }
}

/// Wraps `router` in the service's middleware with the default limits.
pub fn apply(router: Router<AppState>, state: &AppState) -> Router {
    apply_with(router, state, Limits::default())
}

/// Wraps `router` in the service's middleware, outermost first:
/// sensitive headers, request id, tracing span, catch-panic, timeout, body limit, CORS, metrics.
pub fn apply_with(router: Router<AppState>, state: &AppState, limits: Limits) -> Router {
    let stack = ServiceBuilder::new()
        .layer(SetSensitiveRequestHeadersLayer::new(
            sensitive_request_headers(),
        ))
        .layer(SetSensitiveResponseHeadersLayer::new([header::SET_COOKIE]))
        .layer(SetRequestIdLayer::new(REQUEST_ID.clone(), MakeRequestUuid))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID.clone()))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn_with_state(limits.timeout, timeout))
        .layer(middleware::from_fn_with_state(limits.body, limit_body))
        .layer(cors(&state.config.cors_allowed_origins))
        .layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            crate::telemetry::track_metrics,
        ));
    router.layer(stack).with_state(state.clone())
}

/// One span per request, named by the matched route so traces group by endpoint.
fn request_span(req: &Request) -> tracing::Span {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |path| path.as_str());
    let request_id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    tracing::info_span!("request", method = %req.method(), route, request_id)
}

fn panic_response(_payload: Box<dyn std::any::Any + Send + 'static>) -> Response {
    // The payload may quote request data; the panic hook already logged it.
    ApiError::Internal(anyhow::anyhow!("a handler panicked")).into_response()
}

async fn timeout(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    // Layered on the router, this runs after routing, so the matched pattern is known.
    let long_running = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .is_some_and(|path| LONG_RUNNING_ROUTES.contains(&path.as_str()));
    let limit = if long_running {
        limit.max(LONG_REQUEST_TIMEOUT)
    } else {
        limit
    };
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout(limit.as_secs()).into_response(),
    }
}

/// Refuses a declared length over `limit` at once; caps a streamed body at `limit` while it is
/// read, which the body extractors turn into 413 `PAYLOAD_TOO_LARGE`.
pub async fn limit_body(State(limit): State<usize>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return ApiError::PayloadTooLarge(format!(
            "the request body is larger than the {limit}-byte limit of this route"
        ))
        .into_response();
    }
    let req = req.map(|body| Body::new(Limited::new(body, limit)));
    next.run(req).await
}

fn cors(origins: &CorsOrigins) -> CorsLayer {
    let allow_origin = match origins {
        CorsOrigins::Any => AllowOrigin::any(),
        CorsOrigins::List(list) => AllowOrigin::list(
            list.iter()
                .filter_map(|origin| origin.parse().ok())
                .collect::<Vec<_>>(),
        ),
    };
    CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            HeaderName::from_static("x-client-info"),
            HeaderName::from_static("apikey"),
            header::CONTENT_TYPE,
        ])
        .expose_headers([REQUEST_ID.clone(), HeaderName::from_static("sb-error-code")])
        .max_age(Duration::from_secs(86_400))
}
