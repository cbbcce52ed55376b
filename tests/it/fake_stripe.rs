//! A stand-in for the Stripe API: list endpoints paged exactly as Stripe pages them, built from
//! Stripe's own example objects (`../shared/vectors/stripe/fixtures3.json`), with faults a test
//! can inject per request (429 with or without `Stripe-Should-Retry`, 500, slow, truncated, held,
//! endless, a page that ignores `starting_after`), and a stretch of 429s with `Retry-After`.
//! `/v1/events` lists newest first and takes `created[gte]`, `created[lte]` and `types[]`; `/v1/prices` lists only active
//! prices unless `active=false` is given, `/v1/products` every product unless `active` is given,
//! as Stripe does. Single products and prices can be fetched (`GET /v1/products/{id}`), with
//! faults of their own. A price's `tiers` and `currency_options` are served only when asked for
//! (`expand[]=data.tiers` on a list, `expand[]=tiers` on one price), as Stripe serves them.
//! Every answer carries a `Date`, as Stripe's do: the real time (hyper writes it), or the second
//! a test sets (`set_date`), for a Stripe whose clock is not the service's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore};

use crate::support::{TestServer, serve_app};

#[path = "../common/stripe_catalogue.rs"]
mod stripe_catalogue;

pub const SECRET_KEY: &str = "sk_test_fake0123456789abcdefghij";
/// A restricted key with the read access docs/OPERATIONS.md lists (Events, Products, Prices,
/// Customers, Subscriptions, Invoices, Checkout Sessions) and nothing else: no Balance.
pub const RESTRICTED_KEY: &str = "rk_test_fake0123456789abcdefghij";
/// A restricted key like `RESTRICTED_KEY` but without Events read: the sync works with it, the
/// reconciliation does not.
pub const NO_EVENTS_KEY: &str = "rk_test_noevents0123456789abcdef";

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true")
}

/// Stripe's example objects, or `None` (after a notice) when `../shared/vectors` is absent;
/// under `CI=true` a missing file fails the test.
pub fn fixtures() -> Option<Arc<Value>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/vectors/stripe/fixtures3.json");
    match std::fs::read(&path) {
        Ok(bytes) => Some(Arc::new(
            serde_json::from_slice(&bytes).expect("fixtures3.json is JSON"),
        )),
        Err(err) if !in_ci() => {
            crate::support::skipped(&format!("{} is not readable ({err})", path.display()));
            None
        }
        Err(err) => panic!("CI=true and {} is not readable: {err}", path.display()),
    }
}

/// Returns from the calling test when the Stripe fixtures are absent (outside CI).
#[macro_export]
macro_rules! stripe_fixtures {
    () => {
        match $crate::fake_stripe::fixtures() {
            Some(fixtures) => fixtures,
            None => return,
        }
    };
}

/// One of Stripe's example objects (`resources.<name>`), to be varied by the test.
pub fn resource(fixtures: &Value, name: &str) -> Value {
    fixtures["resources"][name].clone()
}

pub fn product_id(i: usize) -> String {
    format!("prod_T{i:06}")
}

pub fn price_id(i: usize) -> String {
    format!("price_T{i:06}")
}

/// Stripe's example product with id, name and default price varied by `i`.
pub fn product(fixtures: &Value, i: usize) -> Value {
    stripe_catalogue::product(
        &resource(fixtures, "product"),
        i,
        product_id(i),
        price_id(i * 3),
    )
}

/// Stripe's example price `i`, belonging to product `i / 3`.
pub fn price(fixtures: &Value, i: usize) -> Value {
    stripe_catalogue::price(
        &resource(fixtures, "price"),
        i,
        price_id(i),
        product_id(i / 3),
    )
}

/// What one request gets instead of (or before) its normal answer.
#[derive(Clone, Debug)]
pub enum Fault {
    /// 429 with `Stripe-Should-Retry` set to the value, or without it.
    TooMany(Option<bool>),
    /// 500 with `Stripe-Should-Retry` set to the value, or without it.
    ServerError(Option<bool>),
    /// 400 with `Stripe-Should-Retry` set to the value, or without it.
    BadRequest(Option<bool>),
    /// 403, Stripe's answer to a restricted key without the permission the request needs.
    Forbidden,
    /// The normal answer, after this delay.
    Slow(Duration),
    /// 200 with only the first half of the normal body.
    Truncated,
    /// Waits until the test calls `release` (the test can wait for `arrived`).
    Hold,
    /// A request with `starting_after` gets Stripe's 400 for a cursor object that is gone (as if
    /// it had been deleted since the page before); one without it, its normal answer.
    CursorGone,
    /// 200 with the normal page but no `has_more`.
    NoHasMore,
    /// 200 with no objects and `has_more: true`.
    EmptyWithMore,
    /// The first page whatever `starting_after` says, as an upstream that drops the parameter.
    IgnoreCursor,
    /// 200 with a body that never ends.
    Endless,
}

#[derive(Default)]
struct Faults {
    /// By request number (0-based, every list request counted).
    at: HashMap<usize, Fault>,
    /// For every request from this number on.
    from: Option<(usize, Fault)>,
}

struct Catalogue {
    products: Vec<Value>,
    prices: Vec<Value>,
    /// Newest first, as Stripe lists them.
    events: Vec<Value>,
}

struct Shared {
    catalogue: Mutex<Catalogue>,
    faults: Mutex<Faults>,
    /// Every `GET /v1/{resource}/{id}` gets this instead of its object, when set.
    object_fault: Mutex<Option<Fault>>,
    object_requests: AtomicUsize,
    requests: AtomicUsize,
    limits: Mutex<Vec<String>>,
    /// The query string of every list request, in order.
    queries: Mutex<Vec<String>>,
    /// Until then every list request gets 429 with `Retry-After` (whole seconds, rounded up).
    rate_limited_until: Mutex<Option<std::time::Instant>>,
    /// The `traceparent` header of every request, in order (`None` when absent).
    traceparents: Mutex<Vec<Option<String>>>,
    /// The `tracestate` header of every request, in order (`None` when absent).
    tracestates: Mutex<Vec<Option<String>>>,
    /// The `Date` of every answer (unix seconds) when set; the real time when not.
    date: Mutex<Option<i64>>,
    arrived: Notify,
    release: Semaphore,
}

pub struct FakeStripe {
    pub base: String,
    shared: Arc<Shared>,
    _server: TestServer,
}

impl FakeStripe {
    /// `products` products and `prices` prices built from the fixtures.
    pub async fn start(fixtures: &Value, products: usize, prices: usize) -> Self {
        let shared = Arc::new(Shared {
            catalogue: Mutex::new(Catalogue {
                products: (0..products).map(|i| product(fixtures, i)).collect(),
                prices: (0..prices).map(|i| price(fixtures, i)).collect(),
                events: Vec::new(),
            }),
            faults: Mutex::new(Faults::default()),
            object_fault: Mutex::new(None),
            object_requests: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            limits: Mutex::new(Vec::new()),
            queries: Mutex::new(Vec::new()),
            rate_limited_until: Mutex::new(None),
            traceparents: Mutex::new(Vec::new()),
            tracestates: Mutex::new(Vec::new()),
            date: Mutex::new(None),
            arrived: Notify::new(),
            release: Semaphore::new(0),
        });
        let app = Router::new()
            .route("/v1/products", get(list_products))
            .route("/v1/prices", get(list_prices))
            .route("/v1/events", get(list_events))
            .route("/v1/products/{id}", get(retrieve_product))
            .route("/v1/prices/{id}", get(retrieve_price))
            .route("/v1/balance", get(balance))
            .layer(axum::middleware::from_fn_with_state(
                shared.clone(),
                record_traceparent,
            ))
            .with_state(shared.clone());
        let server = serve_app(app, Duration::from_millis(100)).await;
        Self {
            base: server.url("/"),
            shared,
            _server: server,
        }
    }

    /// List requests answered so far (retries included).
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// The `traceparent` of every request so far, `None` where there was none.
    pub fn traceparents(&self) -> Vec<Option<String>> {
        self.shared.traceparents.lock().unwrap().clone()
    }

    /// The `tracestate` of every request so far, `None` where there was none.
    pub fn tracestates(&self) -> Vec<Option<String>> {
        self.shared.tracestates.lock().unwrap().clone()
    }

    /// The `limit` of every list request so far.
    pub fn limits(&self) -> Vec<String> {
        self.shared.limits.lock().unwrap().clone()
    }

    /// The query string of every list request so far.
    pub fn queries(&self) -> Vec<String> {
        self.shared.queries.lock().unwrap().clone()
    }

    /// Every answer from now on says in its `Date` that it was made at unix second `at`: Stripe's
    /// clock, where the test's clock (a manual one, or one stepped) is not it. `None`: the real
    /// time again.
    pub fn set_date(&self, at: Option<i64>) {
        *self.shared.date.lock().unwrap() = at;
    }

    /// For `window` from now, every list request is answered 429 with the `Retry-After` (whole
    /// seconds, rounded up) that would end it.
    pub fn rate_limit_for(&self, window: Duration) {
        *self.shared.rate_limited_until.lock().unwrap() = Some(std::time::Instant::now() + window);
    }

    pub fn fault_at(&self, request: usize, fault: Fault) {
        self.shared.faults.lock().unwrap().at.insert(request, fault);
    }

    pub fn fault_from(&self, request: usize, fault: Fault) {
        self.shared.faults.lock().unwrap().from = Some((request, fault));
    }

    pub fn clear_faults(&self) {
        *self.shared.faults.lock().unwrap() = Faults::default();
    }

    /// Resolves once a held request has arrived.
    pub async fn arrived(&self) {
        self.shared.arrived.notified().await;
    }

    /// Lets one held request go on.
    pub fn release(&self) {
        self.shared.release.add_permits(1);
    }

    /// Removes product `id` and its prices, as deleting them in Stripe would.
    pub fn remove_product(&self, id: &str) {
        let mut catalogue = self.shared.catalogue.lock().unwrap();
        catalogue.products.retain(|p| p["id"] != id);
        catalogue.prices.retain(|p| p["product"] != id);
    }

    /// Adds events to `/v1/events`, which keeps them newest first (by `created`).
    pub fn add_events(&self, events: impl IntoIterator<Item = Value>) {
        let mut catalogue = self.shared.catalogue.lock().unwrap();
        catalogue.events.extend(events);
        catalogue
            .events
            .sort_by_key(|event| std::cmp::Reverse(event["created"].as_i64()));
    }

    /// Object requests (`GET /v1/products/{id}`, `/v1/prices/{id}`) answered so far.
    pub fn object_requests(&self) -> usize {
        self.shared.object_requests.load(Ordering::SeqCst)
    }

    /// What every object request gets from now on (`None`: the object).
    pub fn fault_objects(&self, fault: Option<Fault>) {
        *self.shared.object_fault.lock().unwrap() = fault;
    }

    pub fn add_product(&self, object: Value) {
        self.shared.catalogue.lock().unwrap().products.push(object);
    }

    pub fn add_price(&self, object: Value) {
        self.shared.catalogue.lock().unwrap().prices.push(object);
    }

    pub fn edit_price(&self, id: &str, edit: impl FnOnce(&mut Value)) {
        let mut catalogue = self.shared.catalogue.lock().unwrap();
        if let Some(price) = catalogue.prices.iter_mut().find(|p| p["id"] == id) {
            edit(price);
        }
    }

    pub fn edit_product(&self, id: &str, edit: impl FnOnce(&mut Value)) {
        let mut catalogue = self.shared.catalogue.lock().unwrap();
        if let Some(product) = catalogue.products.iter_mut().find(|p| p["id"] == id) {
            edit(product);
        }
    }
}

fn stripe_error(status: StatusCode, should_retry: Option<bool>, kind: &str) -> Response {
    let body = json!({"error": {"type": kind, "message": "injected by the fake"}});
    let mut response = (status, axum::Json(body)).into_response();
    if let Some(value) = should_retry {
        response.headers_mut().insert(
            "stripe-should-retry",
            if value { "true" } else { "false" }.parse().unwrap(),
        );
    }
    response
}

async fn record_traceparent(
    State(shared): State<Arc<Shared>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let headers = request.headers();
    let header = |name: &str| {
        headers
            .get(name)
            .map(|value| value.to_str().unwrap_or("(not text)").to_owned())
    };
    let (traceparent, tracestate) = (header("traceparent"), header("tracestate"));
    shared.traceparents.lock().unwrap().push(traceparent);
    shared.tracestates.lock().unwrap().push(tracestate);
    let mut response = next.run(request).await;
    // hyper writes the real time only where the answer has no `Date` of its own.
    let date = *shared.date.lock().unwrap();
    if let Some(at) = date {
        let at = std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(at).unwrap());
        response.headers_mut().insert(
            axum::http::header::DATE,
            httpdate::fmt_http_date(at).parse().unwrap(),
        );
    }
    response
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
}

/// The secret key, or the restricted key (on what its permissions cover: everything served here
/// but the balance).
fn authorized(headers: &HeaderMap) -> bool {
    bearer(headers).is_some_and(|key| [SECRET_KEY, RESTRICTED_KEY, NO_EVENTS_KEY].contains(&key))
}

async fn list_products(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let listing = Listing {
        url: "/v1/products",
        objects: |c| &c.products,
        active_by_default: None,
        includable: &[],
    };
    list(shared, headers, query, listing).await
}

async fn list_prices(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    // "Returns a list of your active prices… For the list of inactive prices, set active to false."
    let listing = Listing {
        url: "/v1/prices",
        objects: |c| &c.prices,
        active_by_default: Some(true),
        includable: &INCLUDABLE,
    };
    list(shared, headers, query, listing).await
}

/// A price's fields Stripe leaves out of its answers unless they are expanded ("This field is
/// not included by default. To include it in the response, expand the … field.").
const INCLUDABLE: [&str; 2] = ["tiers", "currency_options"];

/// The fields `expand[]` names, each with `prefix` (`data.` in a list) taken off.
fn expanded(query: &[(String, String)], prefix: &str) -> Vec<String> {
    query
        .iter()
        .filter(|(name, _)| name.starts_with("expand["))
        .filter_map(|(_, value)| value.strip_prefix(prefix).map(str::to_owned))
        .collect()
}

/// `object` as served: without each of `includable` that `expanded` does not name.
fn without_includable(object: &Value, includable: &[&str], expanded: &[String]) -> Value {
    let mut served = object.clone();
    if let Some(fields) = served.as_object_mut() {
        for field in includable {
            if !expanded.iter().any(|e| e == field) {
                fields.remove(*field);
            }
        }
    }
    served
}

async fn list_events(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    if bearer(&headers) == Some(NO_EVENTS_KEY) {
        // What Stripe answers a restricted key without the Events read permission.
        let body = json!({"error": {"type": "invalid_request_error", "message":
            "The provided key 'rk_test_***cdef' does not have the required permissions for this \
             endpoint. Having the 'rak_event_read' permission would allow this request to \
             continue."}});
        return (StatusCode::FORBIDDEN, axum::Json(body)).into_response();
    }
    let listing = Listing {
        url: "/v1/events",
        objects: |c| &c.events,
        active_by_default: None,
        includable: &[],
    };
    list(shared, headers, query, listing).await
}

async fn retrieve_product(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    retrieve(shared, headers, &id, |c| &c.products, Value::clone).await
}

async fn retrieve_price(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let expanded = expanded(&query, "");
    let served = |price: &Value| without_includable(price, &INCLUDABLE, &expanded);
    retrieve(shared, headers, &id, |c| &c.prices, served).await
}

/// One object as it is now, or Stripe's 404 (`resource_missing`).
async fn retrieve(
    shared: Arc<Shared>,
    headers: HeaderMap,
    id: &str,
    objects: fn(&Catalogue) -> &Vec<Value>,
    served: impl Fn(&Value) -> Value,
) -> Response {
    shared.object_requests.fetch_add(1, Ordering::SeqCst);
    if !authorized(&headers) {
        return stripe_error(StatusCode::UNAUTHORIZED, None, "invalid_request_error");
    }
    let fault = shared.object_fault.lock().unwrap().clone();
    if let Some(response) = apply_fault(&shared, fault.as_ref()).await {
        return response;
    }
    let found = objects(&shared.catalogue.lock().unwrap())
        .iter()
        .find(|o| o["id"] == id)
        .map(served);
    match found {
        Some(object) => axum::Json(object).into_response(),
        None => {
            let body = json!({"error": {"type": "invalid_request_error",
                "code": "resource_missing", "message": format!("No such object: '{id}'")}});
            (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
        }
    }
}

/// Answers an error fault, or waits as a delay fault says; `None` when the request goes on.
async fn apply_fault(shared: &Shared, fault: Option<&Fault>) -> Option<Response> {
    match fault {
        Some(Fault::TooMany(retry)) => Some(stripe_error(
            StatusCode::TOO_MANY_REQUESTS,
            *retry,
            "rate_limit_error",
        )),
        Some(Fault::ServerError(retry)) => Some(stripe_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            *retry,
            "api_error",
        )),
        Some(Fault::BadRequest(retry)) => Some(stripe_error(
            StatusCode::BAD_REQUEST,
            *retry,
            "invalid_request_error",
        )),
        Some(Fault::Forbidden) => Some(stripe_error(
            StatusCode::FORBIDDEN,
            None,
            "permission_error",
        )),
        Some(Fault::Slow(delay)) => {
            tokio::time::sleep(*delay).await;
            None
        }
        Some(Fault::Hold) => {
            shared.arrived.notify_one();
            shared.release.acquire().await.unwrap().forget();
            None
        }
        Some(
            Fault::Truncated
            | Fault::CursorGone
            | Fault::NoHasMore
            | Fault::EmptyWithMore
            | Fault::IgnoreCursor
            | Fault::Endless,
        )
        | None => None,
    }
}

async fn balance(headers: HeaderMap) -> Response {
    if !authorized(&headers) {
        return stripe_error(StatusCode::UNAUTHORIZED, None, "invalid_request_error");
    }
    if bearer(&headers) == Some(RESTRICTED_KEY) {
        // What Stripe answers a restricted key without the Balance read permission.
        let body = json!({"error": {"type": "invalid_request_error", "message":
            "The provided key 'rk_test_***ghij' does not have the required permissions for this \
             endpoint. Having the 'rak_balance_read' permission would allow this request to \
             continue."}});
        return (StatusCode::FORBIDDEN, axum::Json(body)).into_response();
    }
    axum::Json(json!({"object": "balance", "available": [], "pending": [], "livemode": false}))
        .into_response()
}

/// Stripe's answer to a `starting_after` that names no object of the list (deleted, or no
/// longer matching the list's filter).
fn cursor_missing(url: &str, after: &str) -> Response {
    let kind = url
        .trim_start_matches("/v1/")
        .trim_end_matches('s')
        .to_owned();
    let body = json!({"error": {"type": "invalid_request_error", "code": "resource_missing",
        "param": "starting_after", "message": format!("No such {kind}: '{after}'")}});
    (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
}

/// One list endpoint: where it is, what it lists, and which `active` it lists without the
/// parameter (`None`: every object).
struct Listing {
    url: &'static str,
    objects: fn(&Catalogue) -> &Vec<Value>,
    active_by_default: Option<bool>,
    /// Fields of its objects served only when expanded (`expand[]=data.<field>`).
    includable: &'static [&'static str],
}

/// One page as Stripe answers it: `limit` (default 10, 1 to 100), `active` (`true` or `false`),
/// `created[gte]`, `created[lte]`, `types[]` (events of those types only, at most 20), objects
/// after `starting_after` (400 when that id is not in the list), `has_more` when any are left.
async fn list(
    shared: Arc<Shared>,
    headers: HeaderMap,
    pairs: Vec<(String, String)>,
    listing: Listing,
) -> Response {
    shared.queries.lock().unwrap().push(
        pairs
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join("&"),
    );
    // Stripe takes an array as `types[]=a&types[]=b` or `types[0]=a&types[1]=b`.
    let types: Vec<String> = pairs
        .iter()
        .filter(|(name, _)| name.starts_with("types["))
        .map(|(_, value)| value.clone())
        .collect();
    let expanded = expanded(&pairs, "data.");
    let query: HashMap<String, String> = pairs.into_iter().collect();
    let Listing {
        url,
        objects,
        active_by_default,
        includable,
    } = listing;
    let number = shared.requests.fetch_add(1, Ordering::SeqCst);
    shared
        .limits
        .lock()
        .unwrap()
        .push(query.get("limit").cloned().unwrap_or_default());
    if !authorized(&headers) {
        return stripe_error(StatusCode::UNAUTHORIZED, None, "invalid_request_error");
    }
    let fault = {
        let faults = shared.faults.lock().unwrap();
        faults.at.get(&number).cloned().or_else(|| {
            faults
                .from
                .as_ref()
                .filter(|(from, _)| number >= *from)
                .map(|(_, fault)| fault.clone())
        })
    };
    if let Some(response) = apply_fault(&shared, fault.as_ref()).await {
        return response;
    }
    let limited_until = *shared.rate_limited_until.lock().unwrap();
    if let Some(until) = limited_until {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if !left.is_zero() {
            let mut response =
                stripe_error(StatusCode::TOO_MANY_REQUESTS, None, "rate_limit_error");
            let seconds = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert("retry-after", seconds.to_string().parse().unwrap());
            return response;
        }
    }
    if matches!(fault, Some(Fault::Endless)) {
        let chunk = bytes::Bytes::from(vec![b' '; 64 * 1024]);
        let head = futures_util::stream::once(async {
            Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"{\"data\": ["))
        });
        let tail = futures_util::stream::repeat_with(move || Ok(chunk.clone()));
        let body = axum::body::Body::from_stream(futures_util::StreamExt::chain(head, tail));
        return (StatusCode::OK, [("content-type", "application/json")], body).into_response();
    }
    if types.len() > 20 {
        return stripe_error(StatusCode::BAD_REQUEST, None, "invalid_request_error");
    }
    let limit = match query.get("limit").map(|l| l.parse::<usize>()) {
        None => 10,
        Some(Ok(limit)) if (1..=100).contains(&limit) => limit,
        Some(_) => return stripe_error(StatusCode::BAD_REQUEST, None, "invalid_request_error"),
    };
    let since = match query.get("created[gte]").map(|s| s.parse::<i64>()) {
        None => None,
        Some(Ok(since)) => Some(since),
        Some(Err(_)) => {
            return stripe_error(StatusCode::BAD_REQUEST, None, "invalid_request_error");
        }
    };
    let until = match query.get("created[lte]").map(|s| s.parse::<i64>()) {
        None => None,
        Some(Ok(until)) => Some(until),
        Some(Err(_)) => {
            return stripe_error(StatusCode::BAD_REQUEST, None, "invalid_request_error");
        }
    };
    let active = match query.get("active").map(|a| a.parse::<bool>()) {
        None => active_by_default,
        Some(Ok(active)) => Some(active),
        Some(Err(_)) => {
            return stripe_error(StatusCode::BAD_REQUEST, None, "invalid_request_error");
        }
    };
    let body = {
        let catalogue = shared.catalogue.lock().unwrap();
        let all: Vec<&Value> = objects(&catalogue)
            .iter()
            .filter(|o| since.is_none_or(|since| o["created"].as_i64() >= Some(since)))
            .filter(|o| until.is_none_or(|until| o["created"].as_i64() <= Some(until)))
            .filter(|o| types.is_empty() || types.iter().any(|kind| o["type"] == kind.as_str()))
            .filter(|o| active.is_none_or(|active| o["active"].as_bool() == Some(active)))
            .collect();
        let start = match query.get("starting_after") {
            None => 0,
            Some(_) if matches!(fault, Some(Fault::IgnoreCursor)) => 0,
            Some(after) if matches!(fault, Some(Fault::CursorGone)) => {
                return cursor_missing(url, after);
            }
            Some(after) => match all.iter().position(|o| o["id"] == *after) {
                Some(index) => index + 1,
                None => return cursor_missing(url, after),
            },
        };
        let end = (start + limit).min(all.len());
        let data: Vec<Value> = all[start..end]
            .iter()
            .map(|object| without_includable(object, includable, &expanded))
            .collect();
        let mut body = json!({
            "object": "list",
            "data": data,
            "has_more": end < all.len(),
            "url": url,
        });
        match fault {
            Some(Fault::NoHasMore) => {
                body.as_object_mut().unwrap().remove("has_more");
            }
            Some(Fault::EmptyWithMore) => {
                body["data"] = json!([]);
                body["has_more"] = json!(true);
            }
            _ => {}
        }
        body
    };
    let text = body.to_string();
    if matches!(fault, Some(Fault::Truncated)) {
        let cut = text.len() / 2;
        return (StatusCode::OK, text[..cut].to_owned()).into_response();
    }
    (StatusCode::OK, [("content-type", "application/json")], text).into_response()
}
