//! The service's metrics registry. Each app has its own (no global recorder), so tests that start
//! several apps in one process read only their own numbers.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of the HTTP metrics. `route` is the matched route pattern, never the raw path, so an
/// attacker probing random URLs cannot grow the label set.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

type HistogramFamily = Family<HttpLabels, Histogram, fn() -> Histogram>;

/// Label of a legacy verification: `anon_key`, `service_role_key` or `user_session`. No client
/// label: client names are the caller's choice, so they would grow the label set without bound.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LegacyKindLabels {
    pub kind: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_request_duration: HistogramFamily,
    /// 1 when the last readiness probe reached the database, 0 when it did not.
    pub database_ready: Gauge,
    pub legacy_verifications: Family<LegacyKindLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("edgegate");
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by method, matched route and status",
            http_requests.clone(),
        );
        let http_request_duration: HistogramFamily =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency, by method, matched route and status",
            http_request_duration.clone(),
        );
        let database_ready = Gauge::default();
        registry.register(
            "database_ready",
            "1 when the last /readyz probe could write to the database, else 0",
            database_ready.clone(),
        );
        let legacy_verifications = Family::<LegacyKindLabels, Counter>::default();
        registry.register(
            "legacy_verifications",
            "Credentials verified with the legacy secret, by kind (anon_key, service_role_key, user_session)",
            legacy_verifications.clone(),
        );
        super::traces::register(&mut registry);
        Self {
            registry,
            http_requests,
            http_request_duration,
            database_ready,
            legacy_verifications,
        }
    }

    /// Adds more metrics; the credential and integration layers register theirs here.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The Prometheus text exposition of every registered metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The method as a label; anything outside the standard set is `other`, so labels stay bounded.
fn known_method(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Middleware: counts each request and observes its latency under its matched route.
pub async fn track_metrics(
    State(metrics): State<Arc<Metrics>>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = known_method(req.method()).to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let response = next.run(req).await;
    let labels = HttpLabels {
        method,
        route,
        status: response.status().as_u16(),
    };
    metrics.http_requests.get_or_create(&labels).inc();
    metrics
        .http_request_duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}
