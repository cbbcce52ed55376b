//! OpenTelemetry traces: the OTLP exporter behind a bounded queue, W3C trace context in and out.
//!
//! Nothing here runs unless `OTEL_EXPORTER_OTLP_*ENDPOINT` is set: [`is_exporting`] is false, no
//! span gets OpenTelemetry attributes, no header is read or written, no task runs.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use anyhow::Context as _;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{SpanId, TraceContextExt as _, TraceId, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    IdGenerator as _, RandomIdGenerator, Sampler, SdkTracer, SdkTracerProvider, SpanData,
    SpanProcessor,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::Instrument as _;

use super::otlp::{Collector, Encoder};
use super::spans::{CLIENT_SPAN, SERVER_SPAN, ServerStart, server_span_with, span_context};
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
    let collector = Collector::new(config).context("building the OTLP HTTP client")?;
    let resource = Resource::builder_empty()
        .with_service_name(config.service_name.clone())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let encoder = Encoder::new(&resource);
    let (queue, receiver) = mpsc::channel(config.max_queue_size);
    let (stop, stopped) = oneshot::channel();
    let batch = Arc::new(Batch {
        size: config.max_export_batch_size,
        queued: AtomicUsize::new(0),
        full: Notify::new(),
    });
    let task = tokio::spawn(export_loop(
        receiver,
        Exporter { collector, encoder },
        batch.clone(),
        config.schedule_delay,
        stopped,
    ));
    let provider = SdkTracerProvider::builder()
        .with_span_processor(QueueProcessor { queue, batch })
        .with_id_generator(IdGenerator::default())
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

/// The batch being gathered: how many spans are queued, and a wake-up when they fill a batch.
#[derive(Debug)]
struct Batch {
    size: usize,
    queued: AtomicUsize,
    full: Notify,
}

/// Hands ended spans to the export task through a bounded queue. A full queue drops the span
/// (counted) rather than make a request wait; the SDK's own batch processor would drop too, but
/// counts only in a log line at shutdown, and blocks its own thread on the async HTTP client.
/// The task is woken once per batch (or by its timer), not once per span.
#[derive(Debug)]
struct QueueProcessor {
    queue: mpsc::Sender<SpanData>,
    batch: Arc<Batch>,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if self.queue.try_send(span).is_err() {
            COUNTERS.dropped.inc();
        } else if self
            .batch
            .queued
            .fetch_add(1, Ordering::Relaxed)
            // The task may take the span before this count: the count is then briefly one
            // below zero (wrapped), and at worst a wake-up waits for the timer.
            .wrapping_add(1)
            == self.batch.size
        {
            self.batch.full.notify_one();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Sends what is queued when a batch is full or `delay` has passed; on `stop`, sends what is
/// queued and ends.
async fn export_loop(
    mut queue: mpsc::Receiver<SpanData>,
    mut exporter: Exporter,
    batch: Arc<Batch>,
    delay: Duration,
    mut stop: oneshot::Receiver<()>,
) {
    let mut tick = tokio::time::interval(delay);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            () = batch.full.notified() => {}
            _ = tick.tick() => {}
        }
        send_queued(&mut queue, &mut exporter, &batch).await;
    }
    // Nothing more is taken; what was queued before the stop still goes out.
    queue.close();
    send_queued(&mut queue, &mut exporter, &batch).await;
}

/// Exports what is in the queue now, in batches of at most `batch.size`.
async fn send_queued(queue: &mut mpsc::Receiver<SpanData>, exporter: &mut Exporter, batch: &Batch) {
    loop {
        let mut spans = Vec::with_capacity(batch.size);
        while spans.len() < batch.size {
            match queue.try_recv() {
                Ok(span) => spans.push(span),
                Err(_) => break,
            }
        }
        if spans.is_empty() {
            return;
        }
        batch.queued.fetch_sub(spans.len(), Ordering::Relaxed);
        let full = spans.len() == batch.size;
        exporter.export(spans).await;
        if !full {
            return;
        }
    }
}

/// Where the export task sends batches, and how it writes them.
struct Exporter {
    collector: Collector,
    encoder: Encoder,
}

impl Exporter {
    async fn export(&mut self, spans: Vec<SpanData>) {
        let count = spans.len() as u64;
        let body = self.encoder.encode(&spans);
        drop(spans);
        match self.collector.send(body).await {
            Ok(()) => {
                COUNTERS.exported.inc_by(count);
            }
            Err(err) => {
                COUNTERS.failed.inc_by(count);
                tracing::warn!(error = %err, spans = count, "trace export failed; the spans are lost");
            }
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

thread_local! {
    /// The trace id the next root span built on this thread gets (see [`server_span`]).
    static NEXT_TRACE_ID: Cell<Option<TraceId>> = const { Cell::new(None) };
}

/// Random ids, except a trace id drawn ahead by [`server_span`].
#[derive(Debug, Default)]
struct IdGenerator(RandomIdGenerator);

impl opentelemetry_sdk::trace::IdGenerator for IdGenerator {
    fn new_trace_id(&self) -> TraceId {
        NEXT_TRACE_ID
            .take()
            .unwrap_or_else(|| self.0.new_trace_id())
    }

    fn new_span_id(&self) -> SpanId {
        self.0.new_span_id()
    }
}

/// The server span of a request: the fields of `request_span` plus the trace id, child of the
/// caller's `traceparent`/`tracestate` when valid. Every field is written as the span is made:
/// the JSON log format re-parses a span's fields on each later record, which cost 10 % of
/// jwt-test's throughput. So the trace id of a new trace is drawn here, and the id generator
/// hands it to the SDK when the layer builds the span (`spans::SpanLayer`, on this thread).
pub(crate) fn server_span(
    req: &axum::http::Request<axum::body::Body>,
    route: &str,
    request_id: &str,
    scheme: &'static str,
) -> tracing::Span {
    let headers = req.headers();
    let parent = TraceContextPropagator::new().extract(&ReadHeaders(headers));
    let trace_id = trace_id_of(&parent).unwrap_or_else(|| {
        let trace_id = RandomIdGenerator::default().new_trace_id();
        NEXT_TRACE_ID.set(Some(trace_id));
        trace_id
    });
    let mut attributes = Vec::with_capacity(3);
    attributes.push(KeyValue::new("url.scheme", scheme));
    if let Some(host) = headers
        .get(axum::http::header::HOST)
        .and_then(|value| value.to_str().ok())
    {
        let address = host.rsplit_once(':').map_or(host, |(address, _)| address);
        attributes.push(KeyValue::new("server.address", address.to_owned()));
    }
    if let Some(agent) = headers
        .get(axum::http::header::USER_AGENT)
        .and_then(|value| value.to_str().ok())
    {
        attributes.push(KeyValue::new("user_agent.original", agent.to_owned()));
    }
    let method = req.method().as_str();
    let mut hex = [0u8; 32];
    let span = server_span_with(ServerStart { parent, attributes }, || {
        tracing::info_span!(
            SERVER_SPAN,
            "http.request.method" = method,
            "http.route" = route,
            request_id,
            "edgegate.credential.source" = tracing::field::Empty,
            "edgegate.credential.kid" = tracing::field::Empty,
            trace_id = hex_id(&trace_id.to_bytes(), &mut hex),
        )
    });
    NEXT_TRACE_ID.set(None);
    span
}

/// The trace id of a context's span, if it has a valid one.
fn trace_id_of(cx: &Context) -> Option<TraceId> {
    let span = cx.span();
    let context = span.span_context();
    context.is_valid().then(|| context.trace_id())
}

/// `id` in lowercase hexadecimal, written into `out` (as W3C trace context writes ids): a
/// `&str` field costs the logs and the span a copy, where a `Display` one costs each a
/// formatting of a `u128`.
fn hex_id<'a>(id: &[u8; 16], out: &'a mut [u8; 32]) -> &'a str {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (byte, pair) in id.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0x0f)];
    }
    std::str::from_utf8(out).unwrap_or_default()
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
        CLIENT_SPAN,
        "http.request.method" = %request.method(),
        "server.address" = url.host_str().unwrap_or_default(),
        "server.port" = url.port_or_known_default().unwrap_or_default(),
        "url.scheme" = url.scheme(),
        "http.response.status_code" = tracing::field::Empty,
        "error.type" = tracing::field::Empty,
    );
    if let Some(context) = span_context(&span) {
        TraceContextPropagator::new().inject_context(
            &Context::new().with_remote_span_context(context),
            &mut WriteHeaders(request.headers_mut()),
        );
    }
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

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TraceId;

    #[test]
    fn ids_are_written_as_trace_context_writes_them() {
        let mut out = [0u8; 32];
        for id in [0, 1, 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736, u128::MAX] {
            let id = TraceId::from(id);
            assert_eq!(super::hex_id(&id.to_bytes(), &mut out), id.to_string());
        }
    }
}
