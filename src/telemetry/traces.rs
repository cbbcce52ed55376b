//! OpenTelemetry traces: the OTLP exporter behind a bounded queue, W3C trace context in and out.
//!
//! Nothing here runs unless `OTEL_EXPORTER_OTLP_*ENDPOINT` is set: [`is_exporting`] is false, no
//! span gets OpenTelemetry attributes, no header is read or written, no task runs.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{Status, TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use secrecy::ExposeSecret as _;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::config::{TraceExport, TraceSampler};

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (the process's subscriber has the OpenTelemetry layer).
pub fn is_exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

pub(super) fn set_exporting() {
    EXPORTING.store(true, Ordering::Relaxed);
}

/// The exporter's counters. Process-wide like the subscriber they describe; every app's
/// `/metrics` shows them (all zero when nothing is exported).
#[derive(Default)]
struct ExportCounters {
    dropped: Counter,
    exported: Counter,
    failed: Counter,
}

static COUNTERS: LazyLock<ExportCounters> = LazyLock::new(ExportCounters::default);

pub(super) fn register(registry: &mut Registry) {
    registry.register(
        "otel_spans_dropped",
        "Ended spans dropped because the export queue was full (OTEL_BSP_MAX_QUEUE_SIZE)",
        COUNTERS.dropped.clone(),
    );
    registry.register(
        "otel_spans_exported",
        "Spans the OTLP collector accepted",
        COUNTERS.exported.clone(),
    );
    registry.register(
        "otel_spans_export_failed",
        "Spans lost because their export failed (after the exporter's retries)",
        COUNTERS.failed.clone(),
    );
}

/// The running exporter: stop it with [`TraceExporter::shutdown`] to send what is queued.
#[derive(Debug)]
pub struct TraceExporter {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    provider: SdkTracerProvider,
    /// How long the final flush may take.
    flush_timeout: Duration,
}

impl TraceExporter {
    /// Exports every span ended so far, then stops. Bounded by the export timeout.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        if tokio::time::timeout(self.flush_timeout, self.task)
            .await
            .is_err()
        {
            tracing::warn!("trace export did not finish in time; queued spans are lost");
        }
        let _ = self.provider.shutdown();
    }
}

/// Builds the OTLP exporter and starts its task (on the current tokio runtime).
pub(super) fn start(config: &TraceExport) -> anyhow::Result<(TraceExporter, SdkTracer)> {
    // The service's own client stack (rustls on aws-lc-rs), not a second one.
    let client = reqwest::Client::builder()
        .timeout(config.export_timeout)
        .user_agent(concat!("edgegate/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("building the OTLP HTTP client")?;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(config.endpoint.as_str())
        .with_timeout(config.export_timeout)
        .with_headers(
            config
                .headers
                .iter()
                .map(|(name, value)| (name.clone(), value.expose_secret().to_owned()))
                .collect(),
        )
        .build()
        .context("building the OTLP span exporter")?;
    let resource = Resource::builder_empty()
        .with_service_name(config.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    // The SDK's processors hand the resource over; this one owns no exporter, so it is set here.
    exporter.set_resource(&resource);
    let (queue, receiver) = mpsc::channel(config.max_queue_size);
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(export_loop(
        receiver,
        exporter,
        config.max_export_batch_size,
        config.schedule_delay,
        stopped,
    ));
    let provider = SdkTracerProvider::builder()
        .with_span_processor(QueueProcessor { queue })
        .with_sampler(sampler(config.sampler))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("edgegate");
    Ok((
        TraceExporter {
            stop,
            task,
            provider,
            flush_timeout: config.export_timeout + Duration::from_secs(1),
        },
        tracer,
    ))
}

fn sampler(sampler: TraceSampler) -> Sampler {
    match sampler {
        TraceSampler::AlwaysOn => Sampler::AlwaysOn,
        TraceSampler::AlwaysOff => Sampler::AlwaysOff,
        TraceSampler::TraceIdRatio(ratio) => Sampler::TraceIdRatioBased(ratio),
        TraceSampler::ParentBasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        TraceSampler::ParentBasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        TraceSampler::ParentBasedTraceIdRatio(ratio) => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
        }
    }
}

/// Hands ended spans to the export task through a bounded queue. A full queue drops the span
/// (counted) rather than make a request wait; the SDK's own batch processor would drop too, but
/// counts only in a log line at shutdown, and blocks its own thread on the async HTTP client.
#[derive(Debug)]
struct QueueProcessor {
    queue: mpsc::Sender<SpanData>,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if self.queue.try_send(span).is_err() {
            COUNTERS.dropped.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Sends a batch when it is full or `delay` has passed; on `stop`, sends what is queued and ends.
async fn export_loop(
    mut queue: mpsc::Receiver<SpanData>,
    exporter: opentelemetry_otlp::SpanExporter,
    batch_size: usize,
    delay: Duration,
    mut stop: oneshot::Receiver<()>,
) {
    let mut batch = Vec::with_capacity(batch_size);
    let mut tick = tokio::time::interval(delay);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Never zero: a full batch is sent before the next turn.
        let room = batch_size - batch.len();
        tokio::select! {
            _ = &mut stop => break,
            received = queue.recv_many(&mut batch, room) => {
                if received == 0 {
                    break;
                }
                if batch.len() >= batch_size {
                    export(&exporter, &mut batch).await;
                }
            }
            _ = tick.tick() => {
                if !batch.is_empty() {
                    export(&exporter, &mut batch).await;
                }
            }
        }
    }
    queue.close();
    while let Some(span) = queue.recv().await {
        batch.push(span);
        if batch.len() >= batch_size {
            export(&exporter, &mut batch).await;
        }
    }
    if !batch.is_empty() {
        export(&exporter, &mut batch).await;
    }
    let _ = exporter.shutdown();
}

async fn export(exporter: &opentelemetry_otlp::SpanExporter, batch: &mut Vec<SpanData>) {
    let spans = std::mem::take(batch);
    let count = spans.len() as u64;
    match exporter.export(spans).await {
        Ok(()) => {
            COUNTERS.exported.inc_by(count);
        }
        Err(err) => {
            COUNTERS.failed.inc_by(count);
            tracing::warn!(error = %err, spans = count, "trace export failed; the spans are lost");
        }
    }
}

struct ReadHeaders<'a>(&'a HeaderMap);

impl Extractor for ReadHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)?.to_str().ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct WriteHeaders<'a>(&'a mut HeaderMap);

impl Injector for WriteHeaders<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Makes `span` (not yet entered) the server span of a request: named `{method} {route}`, child
/// of the caller's `traceparent`/`tracestate` when valid, with the HTTP attributes logs do not
/// need. Records the trace id in the span so every log line of the request carries it.
pub(crate) fn start_server_span(
    span: &tracing::Span,
    method: &str,
    route: &str,
    scheme: &'static str,
    headers: &HeaderMap,
) {
    span.record("otel.name", format!("{method} {route}").as_str());
    span.record("otel.kind", "server");
    let parent = TraceContextPropagator::new().extract(&ReadHeaders(headers));
    let _ = span.set_parent(parent);
    span.set_attribute("url.scheme", scheme);
    if let Some(host) = headers
        .get(http::header::HOST)
        .and_then(|value| value.to_str().ok())
    {
        let address = host.rsplit_once(':').map_or(host, |(address, _)| address);
        span.set_attribute("server.address", address.to_owned());
    }
    if let Some(agent) = headers
        .get(http::header::USER_AGENT)
        .and_then(|value| value.to_str().ok())
    {
        span.set_attribute("user_agent.original", agent.to_owned());
    }
    let trace_id = span.context().span().span_context().trace_id();
    span.record("trace_id", tracing::field::display(trace_id));
}

/// Records the answer on the server span: its status, and an error status for a 5xx.
pub(crate) fn end_server_span(span: &tracing::Span, status: u16) {
    span.set_attribute("http.response.status_code", i64::from(status));
    if status >= 500 {
        span.set_status(Status::error(""));
    }
}

/// Sends `request` to a service outside (Stripe, Twilio, the JWKS host). While traces are
/// exported, it goes inside a client span whose `traceparent` it carries; otherwise it is sent
/// as it is.
pub async fn send(request: reqwest::RequestBuilder) -> reqwest::Result<reqwest::Response> {
    if !is_exporting() {
        return request.send().await;
    }
    let (client, request) = request.build_split();
    let mut request = request?;
    let url = request.url();
    let span = tracing::info_span!(
        "http.client",
        otel.name = %request.method(),
        otel.kind = "client",
        "http.request.method" = %request.method(),
        "server.address" = url.host_str().unwrap_or_default(),
        "server.port" = url.port_or_known_default().unwrap_or_default(),
        "url.scheme" = url.scheme(),
        "http.response.status_code" = tracing::field::Empty,
        "error.type" = tracing::field::Empty,
    );
    TraceContextPropagator::new()
        .inject_context(&span.context(), &mut WriteHeaders(request.headers_mut()));
    let result = client.execute(request).instrument(span.clone()).await;
    match &result {
        Ok(response) => {
            span.record("http.response.status_code", response.status().as_u16());
            if response.status().is_server_error() {
                span.record("error.type", response.status().as_str());
            }
        }
        Err(err) if err.is_timeout() => {
            span.record("error.type", "timeout");
        }
        Err(_) => {
            span.record("error.type", "transport");
        }
    }
    result
}
