//! The service's metrics registry. Each app has its own (no global recorder), so tests that start
//! several apps in one process read only their own numbers.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use axum::extract::MatchedPath;
use axum::http::{Request, Response};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::ClientClosed;

/// Labels of the HTTP metrics. `route` is the matched route pattern, never the raw path, so an
/// attacker probing random URLs cannot grow the label set.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: &'static str,
    pub route: RouteLabel,
    pub status: u16,
}

/// The `route` label: the request's matched pattern (the router's own, shared, not copied), or
/// `unmatched`.
#[derive(Clone, Debug)]
pub struct RouteLabel(Option<MatchedPath>);

impl RouteLabel {
    pub fn as_str(&self) -> &str {
        self.0.as_ref().map_or("unmatched", MatchedPath::as_str)
    }
}

impl PartialEq for RouteLabel {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for RouteLabel {}

impl Hash for RouteLabel {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl EncodeLabelValue for RouteLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

type HistogramFamily = Family<HttpLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_request_duration: HistogramFamily,
    /// Each label set's two HTTP series, found with one lookup: the families' own maps take a
    /// lock and a SipHash of the labels each.
    http_series: RwLock<HashMap<HttpLabels, HttpSeries, foldhash::fast::RandomState>>,
    /// 1 when the last readiness probe reached the database, 0 when it did not.
    pub database_ready: Gauge,
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
        super::traces::register(&mut registry);
        super::stderr::register(&mut registry);
        Self {
            registry,
            http_requests,
            http_request_duration,
            http_series: RwLock::default(),
            database_ready,
        }
    }

    /// Adds more metrics; the credential and integration layers register theirs here.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Counts an answer and observes its latency under `labels`.
    pub fn record_http(&self, labels: HttpLabels, seconds: f64) {
        let series = self
            .http_series
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(series) = series.get(&labels) {
            series.record(seconds);
            return;
        }
        drop(series);
        // The families' series, shared: the exposition reads them, this map only finds them.
        let mut series = self
            .http_series
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        series
            .entry(labels)
            .or_insert_with_key(|labels| HttpSeries {
                requests: self.http_requests.get_or_create(labels).clone(),
                duration: self.http_request_duration.get_or_create(labels).clone(),
            })
            .record(seconds);
    }

    /// Every registered metric, in `exposition`'s format.
    pub fn render(&self, exposition: Exposition) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        match exposition {
            Exposition::OpenMetrics => out,
            Exposition::Prometheus => openmetrics_to_prometheus(&out),
        }
    }
}

/// The text formats `/metrics` answers in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposition {
    /// The Prometheus text format 0.0.4, what the contract promises and what any scraper reads.
    Prometheus,
    /// OpenMetrics 1.0, what prometheus-client writes, for scrapers that ask for it.
    OpenMetrics,
}

impl Exposition {
    /// As Prometheus's client libraries choose: the format named by the `Accept` entry of highest
    /// q (the first of equals), OpenMetrics only when it is named; the Prometheus text format
    /// when no entry names either, and for a request without `Accept`.
    pub fn negotiate(headers: &axum::http::HeaderMap) -> Self {
        let mut best: Option<(f32, Self)> = None;
        let entries = headers
            .get_all(axum::http::header::ACCEPT)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','));
        for entry in entries {
            let mut parts = entry.split(';');
            let media_type = parts.next().unwrap_or_default().trim();
            let format = if media_type.eq_ignore_ascii_case("application/openmetrics-text") {
                Self::OpenMetrics
            } else if ["text/plain", "text/*", "*/*"]
                .iter()
                .any(|served| media_type.eq_ignore_ascii_case(served))
            {
                Self::Prometheus
            } else {
                continue;
            };
            let q = parts
                .filter_map(|parameter| parameter.split_once('='))
                .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
                .map_or(Some(1.0), |(_, q)| q.trim().parse::<f32>().ok());
            // q=0 is "not acceptable"; a q that does not parse is taken as the entry's absence.
            let Some(q) = q.filter(|q| *q > 0.0) else {
                continue;
            };
            if best.is_none_or(|(best, _)| q > best) {
                best = Some((q, format));
            }
        }
        best.map_or(Self::Prometheus, |(_, format)| format)
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// prometheus-client's OpenMetrics exposition as the Prometheus text format 0.0.4 (the crate
/// writes OpenMetrics only). Samples and label sets are written alike in both; what differs:
/// a counter's HELP and TYPE name its samples, `_total` included (OpenMetrics names the family
/// without it, so a 0.0.4 parser read a counter without samples and an untyped `_total` family
/// beside it), an info metric is a gauge named with its `_info`, `unknown` is `untyped`, and
/// 0.0.4 has no `# UNIT`, `# EOF`, `_created` samples or exemplars.
fn openmetrics_to_prometheus(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len() + 256);
    // A family's HELP comes before its TYPE, which tells what to name it.
    let mut help: Option<&str> = None;
    // The family's `_created` sample name, for counters and histograms.
    let mut created = String::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let Some((name, kind)) = rest.split_once(' ') else {
                continue;
            };
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "unknown" => ("", "untyped"),
                other => ("", other),
            };
            let help = help
                .take()
                .and_then(|help| help.strip_prefix(name))
                .and_then(|help| help.strip_prefix(' '));
            if let Some(help) = help {
                // prometheus-client writes HELP as given; 0.0.4 reads a backslash in it as an escape.
                let _ = writeln!(out, "# HELP {name}{suffix} {}", help.replace('\\', "\\\\"));
            }
            let _ = writeln!(out, "# TYPE {name}{suffix} {kind}");
            created.clear();
            if matches!(kind, "counter" | "histogram") {
                created.push_str(name);
                created.push_str("_created");
            }
        } else if line.starts_with('#') || line.is_empty() {
            // `# UNIT` and `# EOF`.
        } else {
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            if !created.is_empty() && line[..name_end] == created {
                continue;
            }
            out.push_str(without_exemplar(line, name_end));
            out.push('\n');
        }
    }
    out
}

/// An OpenMetrics sample line without its exemplar (` # {…} value`), found after the label set,
/// whose quoted values may hold ` # ` themselves.
fn without_exemplar(line: &str, name_end: usize) -> &str {
    let mut labels_end = name_end;
    if line[name_end..].starts_with('{') {
        let (mut quoted, mut escaped) = (false, false);
        for (at, byte) in line.bytes().enumerate().skip(name_end + 1) {
            match byte {
                _ if escaped => escaped = false,
                b'\\' if quoted => escaped = true,
                b'"' => quoted = !quoted,
                b'}' if !quoted => {
                    labels_end = at + 1;
                    break;
                }
                _ => {}
            }
        }
    }
    match line[labels_end..].find(" # ") {
        Some(exemplar) => &line[..labels_end + exemplar],
        None => line,
    }
}

/// One label set's series of `http_requests` and `http_request_duration_seconds`.
struct HttpSeries {
    requests: Counter,
    duration: Histogram,
}

impl HttpSeries {
    fn record(&self, seconds: f64) {
        self.requests.inc();
        self.duration.observe(seconds);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The method as logs and spans carry it (`http.request.method`): OpenTelemetry's `_OTHER` for
/// one outside the standard set, which went into every line and span name of its request as it
/// came (up to the 64 KiB head limit).
pub(crate) fn logged_method(method: &axum::http::Method) -> &'static str {
    match known_method(method) {
        "other" => "_OTHER",
        known => known,
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

/// Counts each answer and observes its latency under its method, matched route and status.
/// A hand-written layer rather than `axum::middleware::from_fn`, which clones the whole stack
/// beneath it and boxes it and its future on every request.
#[derive(Clone, Debug)]
pub struct TrackMetricsLayer {
    metrics: Arc<Metrics>,
}

impl TrackMetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for TrackMetricsLayer {
    type Service = TrackMetrics<S>;

    fn layer(&self, inner: S) -> TrackMetrics<S> {
        TrackMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// See [`TrackMetricsLayer`].
#[derive(Clone, Debug)]
pub struct TrackMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, R> tower::Service<Request<B>> for TrackMetrics<S>
where
    S: tower::Service<Request<B>, Response = Response<R>>,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = TrackMetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let pending = Pending {
            metrics: self.metrics.clone(),
            method: known_method(req.method()),
            route: RouteLabel(req.extensions().get::<MatchedPath>().cloned()),
            started: Instant::now(),
            answered: false,
        };
        TrackMetricsFuture {
            inner: self.inner.call(req),
            pending: Some(pending),
        }
    }
}

/// The status recorded for a request the client gave up on before it was answered (an HTTP/1
/// hang-up, an HTTP/2 reset, which drop the request's future): nginx's "client closed request".
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

/// What is recorded when the answer is ready, or, when its future is dropped before, as
/// [`CLIENT_CLOSED_REQUEST`].
struct Pending {
    metrics: Arc<Metrics>,
    method: &'static str,
    route: RouteLabel,
    started: Instant,
    /// Set once the inner future completed, so that dropping records nothing more.
    answered: bool,
}

impl Pending {
    fn record(&mut self, status: u16) {
        let labels = HttpLabels {
            method: self.method,
            route: self.route.clone(),
            status,
        };
        self.metrics
            .record_http(labels, self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.answered {
            self.record(CLIENT_CLOSED_REQUEST);
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner answer, recorded as it completes.
    pub struct TrackMetricsFuture<F> {
        #[pin]
        inner: F,
        pending: Option<Pending>,
    }
}

impl<F, R, E> Future for TrackMetricsFuture<F>
where
    F: Future<Output = Result<Response<R>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Some(mut pending) = this.pending.take() {
            // An error (none in this service: its errors are answers) is not counted.
            pending.answered = true;
            if let Ok(response) = &result {
                let status = if response.extensions().get::<ClientClosed>().is_some() {
                    CLIENT_CLOSED_REQUEST
                } else {
                    response.status().as_u16()
                };
                pending.record(status);
            }
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(method: &'static str, status: u16) -> HttpLabels {
        HttpLabels {
            method,
            route: RouteLabel(None),
            status,
        }
    }

    #[test]
    fn each_answer_lands_in_its_own_label_sets_series_of_both_families() {
        let metrics = Metrics::new();
        metrics.record_http(labels("GET", 200), 0.002);
        metrics.record_http(labels("GET", 404), 0.2);
        metrics.record_http(labels("GET", 200), 0.003);
        metrics.record_http(labels("POST", 200), 7.0);
        let text = metrics.render(Exposition::Prometheus);
        for line in [
            r#"edgegate_http_requests_total{method="GET",route="unmatched",status="200"} 2"#,
            r#"edgegate_http_requests_total{method="GET",route="unmatched",status="404"} 1"#,
            r#"edgegate_http_requests_total{method="POST",route="unmatched",status="200"} 1"#,
            r#"edgegate_http_request_duration_seconds_count{method="GET",route="unmatched",status="200"} 2"#,
            r#"edgegate_http_request_duration_seconds_sum{method="GET",route="unmatched",status="200"} 0.005"#,
            r#"edgegate_http_request_duration_seconds_bucket{le="0.0025",method="GET",route="unmatched",status="200"} 1"#,
            r#"edgegate_http_request_duration_seconds_bucket{le="0.25",method="GET",route="unmatched",status="404"} 1"#,
            r#"edgegate_http_request_duration_seconds_bucket{le="5.0",method="POST",route="unmatched",status="200"} 0"#,
            r#"edgegate_http_request_duration_seconds_bucket{le="10.0",method="POST",route="unmatched",status="200"} 1"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line} in:\n{text}"
            );
        }
    }

    #[test]
    fn the_prometheus_text_names_counters_by_their_samples_and_has_nothing_0_0_4_lacks() {
        use prometheus_client::metrics::exemplar::CounterWithExemplar;
        use prometheus_client::metrics::info::Info;
        use prometheus_client::registry::Unit;

        let mut metrics = Metrics::new();
        metrics.record_http(labels("GET", 200), 0.002);
        let registry = metrics.registry_mut();
        let exemplified = CounterWithExemplar::<Vec<(String, String)>>::default();
        registry.register_with_unit("sent", "Bytes sent", Unit::Bytes, exemplified.clone());
        exemplified.inc_by(
            3,
            Some(vec![("trace_id".into(), "a # {b} \\\" # c".into())]),
            None,
        );
        registry.register("build", "The build", Info::new(vec![("version", "1.2.3")]));
        registry.register("paths", r"Paths under C:\data", Counter::<u64>::default());

        let openmetrics = metrics.render(Exposition::OpenMetrics);
        assert!(
            openmetrics.contains("# UNIT edgegate_sent_bytes bytes"),
            "{openmetrics}"
        );
        assert!(
            openmetrics.contains("edgegate_sent_bytes_total 3 # {trace_id="),
            "{openmetrics}"
        );
        let text = metrics.render(Exposition::Prometheus);
        for line in [
            "# HELP edgegate_http_requests_total HTTP requests answered, by method, matched route and status.",
            "# TYPE edgegate_http_requests_total counter",
            r#"edgegate_http_requests_total{method="GET",route="unmatched",status="200"} 1"#,
            "# TYPE edgegate_http_request_duration_seconds histogram",
            r#"edgegate_http_request_duration_seconds_bucket{le="+Inf",method="GET",route="unmatched",status="200"} 1"#,
            "# TYPE edgegate_database_ready gauge",
            "edgegate_database_ready 0",
            "# HELP edgegate_sent_bytes_total Bytes sent.",
            "# TYPE edgegate_sent_bytes_total counter",
            "edgegate_sent_bytes_total 3",
            "# TYPE edgegate_build_info gauge",
            r#"edgegate_build_info{version="1.2.3"} 1"#,
            r"# HELP edgegate_paths_total Paths under C:\\data.",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line} in:\n{text}"
            );
        }
        for absent in [
            "# EOF",
            "# UNIT",
            "trace_id",
            "_created",
            "TYPE edgegate_http_requests ",
        ] {
            assert!(!text.contains(absent), "{absent} in:\n{text}");
        }
        // Every sample line is the OpenMetrics one, up to its exemplar.
        let samples = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|line| !line.starts_with('#'))
                .map(|line| line.split(" # ").next().unwrap().to_owned())
                .collect()
        };
        assert_eq!(samples(&text), samples(&openmetrics));
    }

    #[test]
    fn an_exemplar_is_cut_after_the_label_set_whatever_its_values_hold() {
        let openmetrics = concat!(
            "# HELP a A.\n",
            "# TYPE a unknown\n",
            "a{x=\"1 # 2\",y=\"\\\" # }\"} 4 # {t=\"u\"} 1.0 17.5\n",
            "# HELP c C.\n",
            "# TYPE c counter\n",
            "c_total 2\n",
            "c_created 1700000000.0\n",
            "# EOF\n",
        );
        assert_eq!(
            openmetrics_to_prometheus(openmetrics),
            concat!(
                "# HELP a A.\n",
                "# TYPE a untyped\n",
                "a{x=\"1 # 2\",y=\"\\\" # }\"} 4\n",
                "# HELP c_total C.\n",
                "# TYPE c_total counter\n",
                "c_total 2\n",
            )
        );
    }

    #[test]
    fn openmetrics_is_served_only_when_accept_prefers_it() {
        use axum::http::{HeaderMap, HeaderValue, header::ACCEPT};
        let negotiate = |values: &[&'static str]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(ACCEPT, HeaderValue::from_static(value));
            }
            Exposition::negotiate(&headers)
        };
        use Exposition::{OpenMetrics, Prometheus};
        for (accept, wanted) in [
            (&[][..], Prometheus),
            (&["*/*"], Prometheus),
            (&["application/json"], Prometheus),
            (&["text/plain;version=0.0.4"], Prometheus),
            (&["application/openmetrics-text"], OpenMetrics),
            (
                &["Application/OpenMetrics-Text; version=1.0.0"],
                OpenMetrics,
            ),
            (&["text/plain, application/openmetrics-text"], Prometheus),
            (&["application/openmetrics-text, text/plain"], OpenMetrics),
            (
                &["text/plain;q=0.5", "application/openmetrics-text;q=0.6"],
                OpenMetrics,
            ),
            (&["application/openmetrics-text;q=0"], Prometheus),
            (
                &["application/openmetrics-text;q=high, text/plain;q=0.1"],
                Prometheus,
            ),
            (&["application/*"], Prometheus),
        ] {
            assert_eq!(negotiate(accept), wanted, "{accept:?}");
        }
    }
}
