//! The middleware stack, outermost first, as one readable list (see `apply`).

use std::future::{Future, Ready, ready};
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use futures_util::future::Either;
use http_body_util::Limited;
use tower::layer::layer_fn;
use tower::{Layer, Service, ServiceBuilder};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::set_header::SetResponseHeaderLayer;

use crate::config::{Config, CorsOrigins};
use crate::error::ApiError;
use crate::state::AppState;
use crate::telemetry::TrackMetricsLayer;

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

/// `x-request-id`: the request's id, on the request and its answer.
pub(crate) static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `apikey`: Supabase's API key header.
pub(crate) static APIKEY: HeaderName = HeaderName::from_static("apikey");

/// Request headers kept out of logs and traces: credentials and provider signatures.
static SENSITIVE_REQUEST_HEADERS: [&HeaderName; 5] = [
    &header::AUTHORIZATION,
    &header::COOKIE,
    &APIKEY,
    &STRIPE_SIGNATURE,
    &TWILIO_SIGNATURE,
];
static STRIPE_SIGNATURE: HeaderName = HeaderName::from_static("stripe-signature");
static TWILIO_SIGNATURE: HeaderName = HeaderName::from_static("x-twilio-signature");

/// Marks the values of [`SENSITIVE_REQUEST_HEADERS`] on the request, and of `Set-Cookie` on the
/// answer, sensitive, so that their `Debug` output, and with it any log or trace that shows
/// them, reads `Sensitive`. tower-http's `SetSensitiveRequestHeaders` and
/// `SetSensitiveResponseHeaders` do the same by looking each name up in the map, a hash and a
/// probe each (and a possible growth of the map); a request has a handful of headers, so going
/// through them once costs less.
#[derive(Clone, Debug)]
struct SensitiveHeaders<S> {
    inner: S,
}

impl<S, B> Service<Request> for SensitiveHeaders<S>
where
    S: Service<Request, Response = axum::http::Response<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = SensitiveHeadersFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        for (name, value) in req.headers_mut() {
            if SENSITIVE_REQUEST_HEADERS.contains(&name) {
                value.set_sensitive(true);
            }
        }
        SensitiveHeadersFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    struct SensitiveHeadersFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, B, E> Future for SensitiveHeadersFuture<F>
where
    F: Future<Output = Result<axum::http::Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let mut answer = std::task::ready!(self.project().inner.poll(cx))?;
        for (name, value) in answer.headers_mut() {
            if name == header::SET_COOKIE {
                value.set_sensitive(true);
            }
        }
        Poll::Ready(Ok(answer))
    }
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
/// sensitive headers, request id (a client's kept only when well-formed), tracing span, metrics,
/// CORS (its `Vary` header added by a layer of its own, and `Cache-Control: no-store` by
/// another; its preflights limited to `/functions/v1/*` by two more, [`ScopePreflights`]),
/// catch-panic, timeout, body limit. CORS
/// wraps every layer that can answer on its own (500, 504, 413), so a page can read those errors
/// too instead of seeing an opaque network failure; the metrics wrap CORS, so every answer is
/// counted, those and preflights included. Layered on the router, every layer runs after routing
/// and sees the matched pattern. The layers are the service's own or tower-http's, none
/// `axum::middleware::from_fn`: the router already clones a route's whole stack for each
/// request, and each `from_fn` layer cloned what lay beneath it again and boxed it and its
/// future.
pub fn apply_with(router: Router<AppState>, state: &AppState, limits: Limits) -> Router {
    let scheme = if state.config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let stack = ServiceBuilder::new()
        .layer(layer_fn(|inner| SensitiveHeaders { inner }))
        .layer(layer_fn(|inner| RequestIds { inner }))
        .layer(layer_fn(move |inner| RequestSpans { inner, scheme }))
        .layer(TrackMetricsLayer::new(state.metrics.clone()))
        .layer(SetResponseHeaderLayer::appending(header::VARY, VARY))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CACHE_CONTROL,
            NO_STORE,
        ))
        .layer(layer_fn(|inner| ScopePreflights { inner }))
        .layer(cors(&state.config))
        .layer(layer_fn(|inner| RestoreOptions { inner }))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(layer_fn(move |inner| Deadline {
            inner,
            limit: limits.timeout,
        }))
        .layer(LimitBodyLayer(limits.body));
    router.layer(stack).with_state(state.clone())
}

/// The longest client `x-request-id` kept (the contract's bound).
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Whether a client's `x-request-id` may be kept: at most [`MAX_REQUEST_ID_LEN`] characters of
/// `[A-Za-z0-9._:-]`, so it can be echoed, logged and stored as it is.
pub fn is_usable_request_id(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_LEN
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Gives each request an `x-request-id`, and its answer the same one unless the answer has its
/// own: the client's when it sent exactly one that may be kept ([`is_usable_request_id`]),
/// otherwise a new UUID v4, which replaces whatever the client sent. Set on the request before
/// the layers beneath see it (the span logs it, handlers record it). One layer in place of
/// tower-http's `SetRequestId` and `PropagateRequestId`, which also put the id in the request's
/// and the answer's extensions (nothing here reads them) and made a new one through a `String`.
#[derive(Clone, Debug)]
struct RequestIds<S> {
    inner: S,
}

impl<S, B> Service<Request> for RequestIds<S>
where
    S: Service<Request, Response = axum::http::Response<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = RequestIdFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        let id = match kept_request_id(req.headers()) {
            Some(id) => id.clone(),
            None => {
                let id = new_request_id();
                // Replaces every value the client sent under the name.
                req.headers_mut().insert(&REQUEST_ID, id.clone());
                id
            }
        };
        RequestIdFuture {
            inner: self.inner.call(req),
            id: Some(id),
        }
    }
}

/// The client's `x-request-id`, if it sent exactly one and it may be kept.
fn kept_request_id(headers: &HeaderMap) -> Option<&HeaderValue> {
    let mut ids = headers.get_all(&REQUEST_ID).iter();
    match (ids.next(), ids.next()) {
        (Some(id), None) if is_usable_request_id(id.as_bytes()) => Some(id),
        _ => None,
    }
}

/// A new request id: a UUID v4, lower-case and hyphenated, written without a `String`.
fn new_request_id() -> HeaderValue {
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("unavailable"))
}

pin_project_lite::pin_project! {
    struct RequestIdFuture<F> {
        #[pin]
        inner: F,
        id: Option<HeaderValue>,
    }
}

impl<F, B, E> Future for RequestIdFuture<F>
where
    F: Future<Output = Result<axum::http::Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let mut answer = std::task::ready!(this.inner.poll(cx))?;
        if let Some(id) = this.id.take()
            && !answer.headers().contains_key(&REQUEST_ID)
        {
            answer.headers_mut().insert(&REQUEST_ID, id);
        }
        Poll::Ready(Ok(answer))
    }
}

/// One span per request, the server span of its trace, its fields named by the OpenTelemetry
/// HTTP conventions (the logs carry them too). The credential extractor fills in
/// `edgegate.credential.*`. While traces are exported, `telemetry::server_span` makes it, with
/// the trace id and the OpenTelemetry name and kind besides.
fn request_span(req: &Request, scheme: &'static str) -> tracing::Span {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or(crate::telemetry::UNMATCHED_ROUTE, |path| path.as_str());
    let request_id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    if crate::telemetry::is_exporting() {
        return crate::telemetry::server_span(req, route, request_id, scheme);
    }
    tracing::info_span!(
        "request",
        "http.request.method" = crate::telemetry::logged_method(req.method()),
        "http.route" = route,
        request_id,
        "edgegate.credential.source" = tracing::field::Empty,
        "edgegate.credential.kid" = tracing::field::Empty,
    )
}

/// Makes each request's span ([`request_span`]), entered while the layers beneath take the
/// request and make its answer, and writes the line that closes the request
/// ([`crate::telemetry::log_response`]: status and latency; at error level for a 5xx). A service
/// error (none in the app's stack, whose errors are answers) gets tower-http's `TraceLayer`
/// error line instead (`response failed`, its classification and latency in milliseconds), and
/// each request its `started processing request` at debug level, both under tower-http's
/// targets: this layer replaces it. Unlike `TraceLayer`, a 5xx answer is not logged twice (its
/// `response` line, then `response failed`). Unlike `TraceLayer`, it leaves the answer's body as it is: nothing here reads the
/// body's frames, and wrapping it cost each request a clone of its span, which the body held
/// until its end, and a span entry, an exit and a clock read for each frame and at the end.
#[derive(Clone, Debug)]
struct RequestSpans<S> {
    inner: S,
    scheme: &'static str,
}

impl<S, B> Service<Request> for RequestSpans<S>
where
    S: Service<Request, Response = axum::http::Response<B>>,
    S::Error: std::fmt::Display,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = RequestSpanFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let span = request_span(&req, self.scheme);
        let start = Instant::now();
        let inner = {
            let _entered = span.enter();
            tracing::debug!(
                target: "tower_http::trace::on_request",
                "started processing request"
            );
            self.inner.call(req)
        };
        RequestSpanFuture {
            inner,
            span,
            start,
            answered: false,
        }
    }
}

pin_project_lite::pin_project! {
    /// Dropped before its answer (the client hung up or reset the stream): the request is
    /// logged as cancelled and its span ends with an error status.
    struct RequestSpanFuture<F> {
        #[pin]
        inner: F,
        span: tracing::Span,
        start: Instant,
        answered: bool,
    }

    impl<F> PinnedDrop for RequestSpanFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if !*this.answered {
                crate::telemetry::log_cancelled(this.start.elapsed(), this.span);
            }
        }
    }
}

impl<F, B, E> Future for RequestSpanFuture<F>
where
    F: Future<Output = Result<axum::http::Response<B>, E>>,
    E: std::fmt::Display,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let result = std::task::ready!(this.inner.poll(cx));
        *this.answered = true;
        let latency = this.start.elapsed();
        let failure = match &result {
            // The client went away while its body was read: logged as a hang-up during the
            // handler is, not as the answer no one reads.
            Ok(answer)
                if answer
                    .extensions()
                    .get::<crate::telemetry::ClientClosed>()
                    .is_some() =>
            {
                crate::telemetry::log_cancelled(latency, this.span);
                None
            }
            // A 5xx is the `response` line's own (at error level): a second line repeated it.
            Ok(answer) => {
                crate::telemetry::log_response(answer, latency, this.span);
                None
            }
            Err(error) => Some(format!("Error: {error}")),
        };
        if let Some(classification) = failure {
            tracing::error!(
                target: "tower_http::trace::on_failure",
                classification = %classification,
                latency = %format_args!("{} ms", latency.as_millis()),
                "response failed"
            );
        }
        Poll::Ready(result)
    }
}

fn panic_response(_payload: Box<dyn std::any::Any + Send + 'static>) -> Response {
    // The payload may quote request data; the panic hook already logged it.
    ApiError::Internal(anyhow::anyhow!("a handler panicked")).into_response()
}

/// Answers 504 `TIMEOUT` when a request takes longer than its limit (`LONG_REQUEST_TIMEOUT` at
/// least on `LONG_RUNNING_ROUTES`).
#[derive(Clone, Debug)]
struct Deadline<S> {
    inner: S,
    limit: Duration,
}

impl<S> Service<Request> for Deadline<S>
where
    S: Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = DeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        // Layered on the router, this runs after routing, so the matched pattern is known.
        let long_running = req
            .extensions()
            .get::<axum::extract::MatchedPath>()
            .is_some_and(|path| LONG_RUNNING_ROUTES.contains(&path.as_str()));
        let limit = if long_running {
            self.limit.max(LONG_REQUEST_TIMEOUT)
        } else {
            self.limit
        };
        DeadlineFuture {
            inner: tokio::time::timeout(limit, self.inner.call(req)),
            limit,
        }
    }
}

pin_project_lite::pin_project! {
    struct DeadlineFuture<F> {
        #[pin]
        inner: tokio::time::Timeout<F>,
        limit: Duration,
    }
}

impl<F, E> Future for DeadlineFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        this.inner.poll(cx).map(|result| match result {
            Ok(answer) => answer,
            Err(_elapsed) => Ok(ApiError::Timeout(this.limit.as_secs()).into_response()),
        })
    }
}

/// When a request reached its route, before its credential was checked and its body read. A
/// handler whose work has a budget of its own (send-sms's) counts it from here: time the
/// request spent before the work leaves less to the work, not more to the route's timeout.
/// Stamped by [`StampArrivalLayer`] on the routes that ask for it; read as an extractor (the
/// time it is read, where no layer stamped it).
#[derive(Clone, Copy, Debug)]
pub struct Arrival(pub tokio::time::Instant);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Arrival {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Arrival>()
            .copied()
            .unwrap_or_else(|| Arrival(tokio::time::Instant::now())))
    }
}

/// Stamps each request with its [`Arrival`].
#[derive(Clone, Copy, Debug)]
pub struct StampArrivalLayer;

impl<S> Layer<S> for StampArrivalLayer {
    type Service = StampArrival<S>;

    fn layer(&self, inner: S) -> StampArrival<S> {
        StampArrival { inner }
    }
}

/// See [`StampArrivalLayer`].
#[derive(Clone, Debug)]
pub struct StampArrival<S> {
    inner: S,
}

impl<S: Service<Request>> Service<Request> for StampArrival<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        req.extensions_mut()
            .insert(Arrival(tokio::time::Instant::now()));
        self.inner.call(req)
    }
}

/// Refuses a declared length over the limit at once (413 `PAYLOAD_TOO_LARGE`); caps a streamed
/// body at the limit while it is read, which the body extractors turn into the same answer.
/// Routes may add their own, smaller limit (`routes::BODY_LIMITS`).
#[derive(Clone, Copy, Debug)]
pub struct LimitBodyLayer(pub usize);

impl<S> Layer<S> for LimitBodyLayer {
    type Service = LimitBody<S>;

    fn layer(&self, inner: S) -> LimitBody<S> {
        LimitBody {
            inner,
            limit: self.0,
        }
    }
}

/// See [`LimitBodyLayer`].
#[derive(Clone, Debug)]
pub struct LimitBody<S> {
    inner: S,
    limit: usize,
}

impl<S> Service<Request> for LimitBody<S>
where
    S: Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let limit = self.limit;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        if declared.is_some_and(|length| length > limit as u64) {
            // The service-wide layer sits outside a route's own, so it refuses first a length
            // over both: the answer names the route's limit, the one the caller must keep to.
            // Looked up only here, on a refusal.
            let limit = req
                .extensions()
                .get::<axum::extract::MatchedPath>()
                .and_then(|pattern| crate::routes::body_limit(pattern.as_str()))
                .map_or(limit, |route| route.min(limit));
            return Either::Left(ready(Ok(ApiError::PayloadTooLarge(format!(
                "the request body is larger than the {limit}-byte limit of this route"
            ))
            .into_response())));
        }
        let req = req.map(|body| Body::new(Limited::new(body, limit)));
        Either::Right(self.inner.call(req))
    }
}

/// Request headers a browser may send: what supabase-js can add (`x-region` with a region,
/// `traceparent`/`tracestate`/`baggage` with trace propagation) and what Supabase's own CORS
/// helper for Edge Functions allows (`x-retry-count`).
const DEFAULT_ALLOWED_HEADERS: [&str; 9] = [
    "authorization",
    "x-client-info",
    "apikey",
    "content-type",
    "x-retry-count",
    "x-region",
    "traceparent",
    "tracestate",
    "baggage",
];

/// `Cache-Control` of every answer the service gives (hyper's own 400 and 431 to a head it
/// cannot parse are outside the stack; they carry nothing): none may be kept by a cache. A
/// credential sent in `apikey` alone does not stop a shared cache from reusing an answer
/// (RFC 9111 names `Authorization`), and what edgegate answers is per caller or of the moment.
const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");

/// What CORS answers depend on, for shared caches: tower-http's default `Vary` list, as one
/// value made once, added after any the route set (as tower-http adds it).
const VARY: HeaderValue = HeaderValue::from_static(
    "origin, access-control-request-method, access-control-request-headers",
);

/// Where a CORS preflight is answered: the contract's `/functions/v1/*`, what a page calls.
const PREFLIGHT_PATHS: &str = "/functions/v1/";

/// The method an `OPTIONS` request that is no preflight of ours has while it passes tower-http's
/// CORS layer (see [`ScopePreflights`]). Short enough to be stored inline, without allocating.
static HIDDEN_OPTIONS: LazyLock<Method> =
    LazyLock::new(|| Method::from_bytes(b"NOT-PREFLIGHT").expect("a valid method token"));

/// Marks a request whose `OPTIONS` method [`ScopePreflights`] hid, for [`RestoreOptions`] (a
/// client sending `NOT-PREFLIGHT` itself keeps it).
#[derive(Clone, Copy, Debug)]
struct HiddenOptions;

/// tower-http's CORS layer answers every `OPTIONS` request as a preflight, 200 with no body,
/// whatever its path and whether it asks anything. A preflight is answered only on
/// `/functions/v1/*` (the contract), and only when it is one: the Fetch standard's preflight
/// always carries `Access-Control-Request-Method`, so an `OPTIONS` without it is a page's or a
/// tool's own request (a page's `fetch(url, {method: "OPTIONS"})` comes after its preflight).
/// Any other `OPTIONS` has its method hidden from the CORS layer, which then treats it as an
/// ordinary request and adds the headers a page needs to read the answer, and given back
/// beneath it by [`RestoreOptions`]: routing already chose the 404 `NOT_FOUND` or the 405
/// `METHOD_NOT_ALLOWED` (with `Allow`) any other method gets. Every other request costs one
/// comparison of its method.
#[derive(Clone, Debug)]
struct ScopePreflights<S> {
    inner: S,
}

impl<S: Service<Request>> Service<Request> for ScopePreflights<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        if req.method() == Method::OPTIONS
            && !(req.uri().path().starts_with(PREFLIGHT_PATHS)
                && req
                    .headers()
                    .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD))
        {
            *req.method_mut() = HIDDEN_OPTIONS.clone();
            req.extensions_mut().insert(HiddenOptions);
        }
        self.inner.call(req)
    }
}

/// Gives back the `OPTIONS` method [`ScopePreflights`] hid from the CORS layer.
#[derive(Clone, Debug)]
struct RestoreOptions<S> {
    inner: S,
}

impl<S: Service<Request>> Service<Request> for RestoreOptions<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        // The method first: a standard one is told apart at once, without a look in the
        // extensions.
        if req.method() == *HIDDEN_OPTIONS
            && req.extensions_mut().remove::<HiddenOptions>().is_some()
        {
            *req.method_mut() = Method::OPTIONS;
        }
        self.inner.call(req)
    }
}

/// `*` or the listed origins (echoed one at a time, with `Vary: Origin`); never credentials,
/// which a browser refuses beside `*` anyway.
fn cors(config: &Config) -> CorsLayer {
    let allow_origin = match &config.cors_allowed_origins {
        CorsOrigins::Any => AllowOrigin::any(),
        CorsOrigins::List(list) => AllowOrigin::list(
            list.iter()
                .filter_map(|origin| origin.parse().ok())
                .collect::<Vec<_>>(),
        ),
    };
    let mut allow_headers: Vec<HeaderName> = Vec::new();
    for name in DEFAULT_ALLOWED_HEADERS
        .iter()
        .copied()
        .chain(config.cors_allowed_headers.iter().map(String::as_str))
    {
        // Config validated the extras as header names; a repeat of a default is dropped.
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes())
            && !allow_headers.contains(&name)
        {
            allow_headers.push(name);
        }
    }
    CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers(allow_headers)
        // The contract's two, and what a page needs to act on a refusal: when to retry a 429 or
        // 503, and why a 401 (neither is CORS-safelisted).
        .expose_headers([
            REQUEST_ID.clone(),
            HeaderName::from_static("sb-error-code"),
            header::RETRY_AFTER,
            header::WWW_AUTHENTICATE,
        ])
        .max_age(Duration::from_secs(86_400))
        // Built once in `apply_with` instead (`VARY`): tower-http joins this list into a new
        // header value on every request, five allocations each time.
        .vary([])
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use tower::ServiceExt;

    /// Answers with the request ids it was given, as "a,b", and with `own` as its own id if set.
    async fn answer_ids(
        client_ids: &[&'static str],
        own: Option<&'static str>,
    ) -> (String, Vec<String>) {
        let inner = tower::service_fn(move |req: Request| async move {
            let seen: Vec<&str> = req
                .headers()
                .get_all(&REQUEST_ID)
                .iter()
                .map(|id| id.to_str().unwrap())
                .collect();
            let mut answer = Response::new(Body::from(seen.join(",")));
            if let Some(own) = own {
                answer
                    .headers_mut()
                    .insert(&REQUEST_ID, HeaderValue::from_static(own));
            }
            Ok::<_, std::convert::Infallible>(answer)
        });
        let mut req = Request::new(Body::empty());
        for id in client_ids {
            req.headers_mut()
                .append(&REQUEST_ID, HeaderValue::from_static(id));
        }
        let answer = RequestIds { inner }.oneshot(req).await.unwrap();
        let answered = answer
            .headers()
            .get_all(&REQUEST_ID)
            .iter()
            .map(|id| id.to_str().unwrap().to_owned())
            .collect();
        let body = axum::body::to_bytes(answer.into_body(), 1024)
            .await
            .unwrap();
        (String::from_utf8(body.to_vec()).unwrap(), answered)
    }

    #[tokio::test]
    async fn credentials_and_signatures_are_marked_sensitive_on_the_request_and_cookies_on_the_answer()
     {
        // Each of the request's values, as the layers beneath see them: (name, sensitive).
        let inner = tower::service_fn(|req: Request| async move {
            let seen: Vec<String> = req
                .headers()
                .iter()
                .map(|(name, value)| format!("{name}={}", value.is_sensitive()))
                .collect();
            let mut answer = Response::new(Body::from(seen.join(" ")));
            let headers = answer.headers_mut();
            headers.append(header::SET_COOKIE, HeaderValue::from_static("a=1"));
            headers.append(header::SET_COOKIE, HeaderValue::from_static("b=2"));
            headers.append(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            Ok::<_, std::convert::Infallible>(answer)
        });
        let mut req = Request::new(Body::empty());
        for (name, value) in [
            ("host", "example.test"),
            ("authorization", "Bearer a.b.c"),
            ("cookie", "session=1"),
            ("apikey", "sb_secret_x"),
            ("stripe-signature", "t=1,v1=ab"),
            ("x-twilio-signature", "c2ln"),
            ("authorization", "Bearer second"),
            ("x-request-id", "r-1"),
        ] {
            req.headers_mut().append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        let answer = SensitiveHeaders { inner }.oneshot(req).await.unwrap();
        let answered: Vec<String> = answer
            .headers()
            .iter()
            .map(|(name, value)| format!("{name}={}", value.is_sensitive()))
            .collect();
        assert_eq!(
            answered,
            ["set-cookie=true", "set-cookie=true", "content-type=false"]
        );
        let body = axum::body::to_bytes(answer.into_body(), 1024)
            .await
            .unwrap();
        let mut seen: Vec<&str> = std::str::from_utf8(&body).unwrap().split(' ').collect();
        seen.sort_unstable();
        assert_eq!(
            seen,
            [
                "apikey=true",
                "authorization=true",
                "authorization=true",
                "cookie=true",
                "host=false",
                "stripe-signature=true",
                "x-request-id=false",
                "x-twilio-signature=true",
            ]
        );
    }

    fn is_new_uuid(id: &str) -> bool {
        uuid::Uuid::parse_str(id).is_ok_and(|uuid| uuid.get_version_num() == 4)
            && id == id.to_ascii_lowercase()
    }

    #[tokio::test]
    async fn a_usable_client_id_is_kept_on_the_request_and_the_answer() {
        let (seen, answered) = answer_ids(&["client-7"], None).await;
        assert_eq!(seen, "client-7");
        assert_eq!(answered, ["client-7"]);
    }

    #[tokio::test]
    async fn no_id_or_an_unusable_one_or_several_get_one_new_id_seen_and_answered() {
        for client_ids in [&[][..], &["has space"], &["a", "b"], &["a", "has space"]] {
            let (seen, answered) = answer_ids(client_ids, None).await;
            assert!(is_new_uuid(&seen), "{client_ids:?}: {seen}");
            assert_eq!(answered, [seen], "{client_ids:?}");
        }
    }

    #[tokio::test]
    async fn an_answer_keeps_its_own_id() {
        let (seen, answered) = answer_ids(&["client-7"], Some("own")).await;
        assert_eq!(seen, "client-7");
        assert_eq!(answered, ["own"]);
    }

    /// Answers every request with its status, or fails with its error.
    #[derive(Clone, Copy)]
    struct Answering(Result<StatusCode, &'static str>);

    impl Service<Request> for Answering {
        type Response = Response;
        type Error = &'static str;
        type Future = Ready<Result<Response, &'static str>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _req: Request) -> Self::Future {
            ready(self.0.map(|status| {
                let mut response = Response::new(Body::from("answer"));
                *response.status_mut() = status;
                response
            }))
        }
    }

    /// What a request answered `answer` (a status, or an error) makes the layer from `layer`
    /// log, at every level, as JSON: each line parsed, without what differs from run to run
    /// (its timestamp and latencies).
    async fn logged<L>(layer: L, answer: Result<StatusCode, &'static str>) -> Vec<serde_json::Value>
    where
        L: Layer<Answering>,
        L::Service: Service<Request, Error = &'static str>,
        <L::Service as Service<Request>>::Response: IntoResponse,
    {
        let lines = crate::telemetry::LogLines::default();
        let _default = tracing::subscriber::set_default(lines.tracing_subscribers_json());
        let service = layer.layer(Answering(answer));
        let mut req = Request::new(Body::empty());
        *req.uri_mut() = "/functions/v1/jwt-test".parse().unwrap();
        req.headers_mut()
            .insert(&REQUEST_ID, HeaderValue::from_static("req-1"));
        if let Ok(answer) = service.oneshot(req).await {
            // The body to its end, so that whatever a layer does with it is done.
            let body = answer.into_response().into_body();
            axum::body::to_bytes(body, usize::MAX).await.unwrap();
        }
        drop(_default);
        lines
            .text()
            .lines()
            .map(|line| {
                let mut line: serde_json::Value = serde_json::from_str(line).unwrap();
                let members = line.as_object_mut().unwrap();
                for varies in ["timestamp", "latency_ms", "latency"] {
                    members.remove(varies);
                }
                line
            })
            .collect()
    }

    #[tokio::test]
    async fn request_spans_log_one_line_a_request_as_tower_https_trace_layer_did() {
        use tower_http::trace::TraceLayer;
        for answer in [
            Ok(StatusCode::OK),
            Ok(StatusCode::NOT_FOUND),
            Ok(StatusCode::INTERNAL_SERVER_ERROR),
            Ok(StatusCode::GATEWAY_TIMEOUT),
            Err("the service failed"),
        ] {
            let ours = logged(
                layer_fn(|inner| RequestSpans {
                    inner,
                    scheme: "http",
                }),
                answer,
            )
            .await;
            let mut theirs = logged(
                TraceLayer::new_for_http()
                    .make_span_with(|req: &Request| request_span(req, "http"))
                    .on_response(crate::telemetry::log_response),
                answer,
            )
            .await;
            // Theirs left out: a debug line once the body has been sent, and the second line a
            // 5xx answer got (`response failed`), which repeated the `response` line.
            theirs.retain(|line| {
                line["message"] != "end of stream"
                    && (answer.is_err() || line["message"] != "response failed")
            });
            assert_eq!(ours, theirs, "{answer:?}");
            let messages: Vec<(&str, &str)> = ours
                .iter()
                .map(|line| {
                    (
                        line["message"].as_str().unwrap(),
                        line["level"].as_str().unwrap(),
                    )
                })
                .collect();
            let started = ("started processing request", "DEBUG");
            // One line closes each request; a 5xx one at error level.
            let expected = match answer {
                Err(_) => vec![started, ("response failed", "ERROR")],
                Ok(status) if status.is_server_error() => vec![started, ("response", "ERROR")],
                Ok(_) => vec![started, ("response", "INFO")],
            };
            assert_eq!(messages, expected, "{answer:?}");
            assert!(
                ours.iter()
                    .all(|line| line["span"]["request_id"] == "req-1"),
                "{ours:?}"
            );
        }
    }

    /// OpenTelemetry's HTTP conventions: a server span has `url.path` (with a segment that may be
    /// a token written `…`, as a 404 writes it), `server.port` (the Host header's, else the
    /// scheme's default) and `network.protocol.version`.
    #[tokio::test]
    async fn server_spans_carry_the_path_the_port_and_the_protocol_version() {
        let token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlc2lnbmF0dXJl";
        let cases = [
            (
                format!("/functions/v1/{token}?apikey=sb_secret_x"),
                Some("edge.example:8443"),
                axum::http::Version::HTTP_2,
                "/functions/v1/…",
                "8443",
                "2",
            ),
            (
                "/functions/v1/jwt-test".to_owned(),
                Some("[::1]"),
                axum::http::Version::HTTP_11,
                "/functions/v1/jwt-test",
                "80",
                "1.1",
            ),
        ];
        for (uri, host, version, path, port, protocol) in cases {
            let captured = crate::telemetry::testing::capture();
            let service = RequestSpans {
                inner: Answering(Ok(StatusCode::OK)),
                scheme: "http",
            };
            let mut req = Request::new(Body::empty());
            *req.uri_mut() = uri.parse().unwrap();
            *req.version_mut() = version;
            if let Some(host) = host {
                req.headers_mut()
                    .insert(header::HOST, HeaderValue::from_static(host));
            }
            service.oneshot(req).await.unwrap();
            let spans = captured.ended();
            assert_eq!(spans.len(), 1, "{spans:#?}");
            let attribute = |key| crate::telemetry::testing::attribute(&spans[0], key);
            assert_eq!(attribute("url.path").as_deref(), Some(path), "{uri}");
            assert_eq!(attribute("server.port").as_deref(), Some(port), "{uri}");
            assert_eq!(
                attribute("network.protocol.version").as_deref(),
                Some(protocol),
                "{uri}"
            );
            assert_eq!(
                attribute("server.address").as_deref(),
                host.map(|host| host.trim_end_matches(":8443").trim_matches(['[', ']'])),
                "{uri}"
            );
            let all = format!("{spans:?}");
            assert!(!all.contains("eyJ") && !all.contains("sb_secret"), "{all}");
        }
    }

    /// An answer marked [`crate::telemetry::ClientClosed`] (a body read cut off by the client's
    /// hang-up) is logged as a request the client cancelled, status 499, not as its answer.
    #[tokio::test]
    async fn an_answer_to_a_client_gone_mid_body_is_logged_as_cancelled() {
        let lines = crate::telemetry::LogLines::default();
        let _default = tracing::subscriber::set_default(lines.tracing_subscribers_json());
        let inner = tower::service_fn(|_req: Request| async {
            Ok::<_, std::convert::Infallible>(
                ApiError::ClientClosed("gone".to_owned()).into_response(),
            )
        });
        let service = RequestSpans {
            inner,
            scheme: "http",
        };
        let answer = service.oneshot(Request::new(Body::empty())).await.unwrap();
        assert_eq!(answer.status(), StatusCode::BAD_REQUEST);
        drop(_default);
        let lines: Vec<serde_json::Value> = lines
            .text()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .filter(|line: &serde_json::Value| line["message"] != "started processing request")
            .collect();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["message"], "request cancelled", "{lines:?}");
        assert_eq!(lines[0]["status"], 499, "{lines:?}");
    }
}
