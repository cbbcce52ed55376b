//! OpenTelemetry traces: the OTLP exporter behind a bounded queue, W3C trace context in and out.
//!
//! Nothing here runs unless `OTEL_EXPORTER_OTLP_*ENDPOINT` is set: [`is_exporting`] is false, no
//! span gets OpenTelemetry attributes, no header is read or written, no task runs.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
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
use tokio::sync::{Notify, oneshot};
use tracing::Instrument as _;

use super::otlp::{Collector, Encoder};
use super::spans::{
    CLIENT_SPAN, SERVER_SPAN, ServerStart, fail_client_span, server_span_with, span_context,
};
use crate::config::{TraceExport, TraceSampler};

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (the process's subscriber has the OpenTelemetry layer).
pub fn is_exporting() -> bool {
    #[cfg(test)]
    if testing::CAPTURING.get() {
        return true;
    }
    EXPORTING.load(Ordering::Relaxed)
}

pub(super) fn set_exporting() {
    EXPORTING.store(true, Ordering::Relaxed);
}

/// Whether W3C trace context is read from requests and written on outbound calls while spans
/// are exported (`OTEL_PROPAGATORS`; on unless it leaves `tracecontext` out).
static TRACE_CONTEXT: AtomicBool = AtomicBool::new(true);

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

/// The longest the final export at shutdown may take, whatever `OTEL_EXPORTER_OTLP_TIMEOUT`:
/// it comes after the drain and the service's own last steps, inside the kill timeout (a
/// collector slower than this loses the last spans, not the process its clean exit). Part of
/// [`super::EXIT_AFTER_STOP`], which leaves the rest to the last log lines.
pub const SHUTDOWN_EXPORT: Duration = Duration::from_secs(1);

impl TraceExporter {
    /// Exports every span ended so far, then stops. Bounded by the export timeout,
    /// [`SHUTDOWN_EXPORT`] and `deadline`.
    pub async fn shutdown(self, deadline: tokio::time::Instant) {
        let _ = self.stop.send(());
        let deadline = deadline.min(tokio::time::Instant::now() + self.flush_timeout);
        if tokio::time::timeout_at(deadline, self.task).await.is_err() {
            tracing::warn!("trace export did not finish in time; queued spans are lost");
        }
        let _ = self.provider.shutdown();
    }
}

/// `edgegate check`'s call to the collector: an export of no spans (an empty
/// `ExportTraceServiceRequest`, which a collector takes), sent as spans are, with the configured
/// headers and the export's retries and timeout. Says why it failed, never with the headers.
pub async fn check_collector(config: &TraceExport) -> Result<(), String> {
    let collector =
        Collector::new(config, Some("check")).map_err(|err| crate::error::causes(&err))?;
    collector
        .send(bytes::Bytes::new())
        .await
        .map_err(|err| err.to_string())
}

/// Builds the OTLP exporter and starts its task (on the current tokio runtime).
pub(super) fn start(config: &TraceExport) -> anyhow::Result<(TraceExporter, SdkTracer)> {
    let collector = Collector::new(config, None).context("building the OTLP HTTP client")?;
    TRACE_CONTEXT.store(config.trace_context, Ordering::Relaxed);
    let resource = Resource::builder_empty()
        .with_service_name(config.service_name.clone())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        // The operator's (OTEL_RESOURCE_ATTRIBUTES), over ours of the same key.
        .with_attributes(
            config
                .resource_attributes
                .iter()
                .map(|(key, value)| KeyValue::new(key.clone(), value.clone())),
        )
        .build();
    let encoder = Encoder::new(&resource);
    let (stop, stopped) = oneshot::channel();
    let queue = Arc::new(Queue {
        spans: Mutex::new(Queued {
            spans: Vec::new(),
            closed: false,
        }),
        capacity: config.max_queue_size,
        batch_size: config.max_export_batch_size,
        batch_full: Notify::new(),
    });
    let task = tokio::spawn(export_loop(
        queue.clone(),
        Exporter {
            collector,
            encoder,
            outage: Outage::default(),
        },
        config.schedule_delay,
        stopped,
    ));
    let provider = SdkTracerProvider::builder()
        .with_span_processor(QueueProcessor(queue))
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
            flush_timeout: config.export_timeout.min(SHUTDOWN_EXPORT),
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

/// Ended spans waiting for the export task, at most `capacity`; a wake-up when they fill a
/// batch. A plain vector under a mutex: the task takes all of it at once in exchange for an
/// empty one, so a span is copied once on its way in and never on its way out (a channel
/// copied each span in, and out again, and counted it in a semaphore besides).
#[derive(Debug)]
struct Queue {
    spans: Mutex<Queued>,
    capacity: usize,
    batch_size: usize,
    batch_full: Notify,
}

#[derive(Debug)]
struct Queued {
    spans: Vec<SpanData>,
    /// Set when the exporter stops: later spans are dropped.
    closed: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Queued> {
        // A panic while holding the lock leaves a valid vector of spans: keep going.
        self.spans
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes every queued span, leaving `spare` (emptied) in their place.
    fn take(&self, spare: &mut Vec<SpanData>) {
        spare.clear();
        std::mem::swap(&mut self.lock().spans, spare);
    }
}

/// Hands ended spans to the export task through the bounded [`Queue`]. A full queue drops the
/// span (counted) rather than make a request wait; the SDK's own batch processor would drop
/// too, but counts only in a log line at shutdown, and blocks its own thread on the async HTTP
/// client. The task is woken once per batch (or by its timer), not once per span.
#[derive(Debug)]
struct QueueProcessor(Arc<Queue>);

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        let queue = &self.0;
        let mut queued = queue.lock();
        if queued.closed || queued.spans.len() >= queue.capacity {
            drop(queued);
            COUNTERS.dropped.inc();
            return;
        }
        queued.spans.push(span);
        let filled = queued.spans.len() == queue.batch_size;
        drop(queued);
        if filled {
            queue.batch_full.notify_one();
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
    queue: Arc<Queue>,
    mut exporter: Exporter,
    delay: Duration,
    mut stop: oneshot::Receiver<()>,
) {
    let mut tick = tokio::time::interval(delay);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Grows to what a wake-up finds (at most `capacity`), then keeps trading places with the
    // queue's vector: while it is sent, the exporter holds at most one queue's worth of spans.
    let mut taken = Vec::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            () = queue.batch_full.notified() => {}
            _ = tick.tick() => {}
        }
        queue.take(&mut taken);
        exporter.export_all(&mut taken, queue.batch_size).await;
    }
    // Nothing more is taken; what was queued before the stop still goes out.
    queue.lock().closed = true;
    queue.take(&mut taken);
    exporter.export_all(&mut taken, queue.batch_size).await;
    exporter.log_unsaid();
}

/// Where the export task sends batches, and how it writes them.
struct Exporter {
    collector: Collector,
    encoder: Encoder,
    outage: Outage,
}

/// How often a collector outage that goes on is logged, after its first failed batch.
const OUTAGE_LOGGED_EVERY: Duration = Duration::from_secs(60);

/// What the log says of failed exports: the first failure of an outage (why), then at most one
/// line a minute while batches go on failing (batches and spans lost since, and spans dropped
/// because the queue was full), and one line when an export works again: a line per failed
/// batch was 720 an hour at the default delay.
#[derive(Debug, Default)]
struct Outage {
    /// When the last line about the outage was written; `None` while exports work.
    logged_at: Option<std::time::Instant>,
    /// Since that line.
    since_logged: Lost,
    /// Since the outage began.
    all: Lost,
    /// `otel_spans_dropped_total` when the last line was written, and when the outage began.
    dropped_when_logged: u64,
    dropped_when_begun: u64,
}

/// Batches and spans whose export failed, and spans dropped from the full queue meanwhile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Lost {
    batches: u64,
    spans: u64,
    dropped: u64,
}

/// A line [`Outage`] asks for.
#[derive(Debug, PartialEq, Eq)]
enum OutageLine {
    /// The first failed batch of an outage.
    Began,
    /// Still failing, a minute or more after the last line: what was lost since.
    Lasting(Lost),
    /// An export worked again: what the whole outage lost.
    Over(Lost),
}

impl Outage {
    /// A batch of `spans` failed at `now`; `dropped` is `otel_spans_dropped_total`.
    fn failed(&mut self, now: std::time::Instant, spans: u64, dropped: u64) -> Option<OutageLine> {
        let Some(logged_at) = self.logged_at else {
            *self = Self {
                logged_at: Some(now),
                since_logged: Lost::default(),
                all: Lost {
                    batches: 1,
                    spans,
                    dropped: 0,
                },
                dropped_when_logged: dropped,
                dropped_when_begun: dropped,
            };
            return Some(OutageLine::Began);
        };
        self.since_logged.batches += 1;
        self.since_logged.spans += spans;
        self.all.batches += 1;
        self.all.spans += spans;
        if now.duration_since(logged_at) < OUTAGE_LOGGED_EVERY {
            return None;
        }
        self.logged_at = Some(now);
        Some(OutageLine::Lasting(self.take_since_logged(dropped)))
    }

    /// A batch was exported; `dropped` is `otel_spans_dropped_total`.
    fn exported(&mut self, dropped: u64) -> Option<OutageLine> {
        self.logged_at?;
        let over = Lost {
            dropped: dropped.saturating_sub(self.dropped_when_begun),
            ..self.all
        };
        *self = Self::default();
        Some(OutageLine::Over(over))
    }

    /// At shutdown, during an outage: what was lost since the last line, if anything.
    fn ending(&mut self, dropped: u64) -> Option<OutageLine> {
        self.logged_at?;
        let lost = self.take_since_logged(dropped);
        (lost != Lost::default()).then_some(OutageLine::Lasting(lost))
    }

    fn take_since_logged(&mut self, dropped: u64) -> Lost {
        let lost = Lost {
            dropped: dropped.saturating_sub(self.dropped_when_logged),
            ..std::mem::take(&mut self.since_logged)
        };
        self.dropped_when_logged = dropped;
        lost
    }
}

/// Writes what `line` says; `error` is the last failure's.
fn log_outage(line: OutageLine, error: Option<&str>, spans: u64) {
    match line {
        OutageLine::Began => tracing::warn!(
            error = error.unwrap_or_default(),
            spans,
            "trace export failed; the spans are lost"
        ),
        OutageLine::Lasting(lost) => tracing::warn!(
            error = error.unwrap_or_default(),
            batches_lost = lost.batches,
            spans_lost = lost.spans,
            spans_dropped = lost.dropped,
            "trace export still failing; spans lost since the last line"
        ),
        OutageLine::Over(lost) => tracing::info!(
            batches_lost = lost.batches,
            spans_lost = lost.spans,
            spans_dropped = lost.dropped,
            "trace export works again"
        ),
    }
}

impl Exporter {
    /// Exports `spans` in batches of at most `batch_size`, and empties it.
    async fn export_all(&mut self, spans: &mut Vec<SpanData>, batch_size: usize) {
        for batch in spans.chunks(batch_size.max(1)) {
            self.export(batch).await;
        }
        spans.clear();
    }

    async fn export(&mut self, spans: &[SpanData]) {
        let count = spans.len() as u64;
        let body = self.encoder.encode(spans);
        match self.collector.send(body).await {
            Ok(()) => {
                COUNTERS.exported.inc_by(count);
                if let Some(line) = self.outage.exported(COUNTERS.dropped.get()) {
                    log_outage(line, None, count);
                }
            }
            Err(err) => {
                COUNTERS.failed.inc_by(count);
                let now = std::time::Instant::now();
                if let Some(line) = self.outage.failed(now, count, COUNTERS.dropped.get()) {
                    log_outage(line, Some(&err.to_string()), count);
                }
            }
        }
    }

    /// At shutdown: what an outage still going on lost since its last line.
    fn log_unsaid(&mut self) {
        if let Some(line) = self.outage.ending(COUNTERS.dropped.get()) {
            log_outage(line, None, 0);
        }
    }
}

struct ReadHeaders<'a>(&'a HeaderMap);

/// The longest client header value a span keeps (`server.address`, `user_agent.original`):
/// spans wait in a queue bounded in count while a collector is slow, so what each holds of a
/// client's headers is bounded in bytes (a head may be 64 KiB).
const MAX_HEADER_ATTRIBUTE_BYTES: usize = 256;
/// The longest `tracestate` carried on: W3C's 512 characters, past which a tracer may discard it.
const MAX_TRACESTATE_BYTES: usize = 512;

/// `value` cut to at most [`MAX_HEADER_ATTRIBUTE_BYTES`], on a character boundary.
fn bounded_attribute(value: &str) -> String {
    let mut end = value.len().min(MAX_HEADER_ATTRIBUTE_BYTES);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    value[..end].to_owned()
}

impl Extractor for ReadHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let value = self.0.get(key)?.to_str().ok()?;
        let dropped = key == "tracestate" && value.len() > MAX_TRACESTATE_BYTES;
        (!dropped).then_some(value)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct WriteHeaders<'a>(&'a mut HeaderMap);

impl Injector for WriteHeaders<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagator writes `tracestate` even when the trace has none: an empty header
        // says nothing, and W3C trace context asks for none then.
        if value.is_empty() {
            return;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// W3C trace context's header.
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

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
    // Most requests carry no trace context: then there is nothing to parse.
    let parent = if headers.contains_key(&TRACEPARENT) && TRACE_CONTEXT.load(Ordering::Relaxed) {
        TraceContextPropagator::new().extract(&ReadHeaders(headers))
    } else {
        Context::new()
    };
    let trace_id = trace_id_of(&parent).unwrap_or_else(|| {
        let trace_id = RandomIdGenerator::default().new_trace_id();
        NEXT_TRACE_ID.set(Some(trace_id));
        trace_id
    });
    let mut attributes = Vec::with_capacity(8);
    attributes.push(KeyValue::new("url.scheme", scheme));
    // A segment that may be a token or a key is written `…`, as a 404 writes it.
    attributes.push(KeyValue::new(
        "url.path",
        bounded_attribute(&crate::routes::shown_path(req.uri().path())),
    ));
    attributes.push(KeyValue::new(
        "network.protocol.version",
        protocol_version(req.version()),
    ));
    if let Some(host) = headers
        .get(axum::http::header::HOST)
        .and_then(|value| value.to_str().ok())
    {
        let (address, port) = host_and_port(host);
        attributes.push(KeyValue::new("server.address", bounded_attribute(address)));
        let port = port.unwrap_or(if scheme == "https" { 443 } else { 80 });
        attributes.push(KeyValue::new("server.port", i64::from(port)));
    }
    if let Some(agent) = headers
        .get(axum::http::header::USER_AGENT)
        .and_then(|value| value.to_str().ok())
    {
        attributes.push(KeyValue::new(
            "user_agent.original",
            bounded_attribute(agent),
        ));
    }
    let method = super::logged_method(req.method());
    // A method outside the known set is `_OTHER`; the conventions keep the one sent beside it.
    if method == "_OTHER" {
        attributes.push(KeyValue::new(
            "http.request.method_original",
            bounded_attribute(req.method().as_str()),
        ));
    }
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

/// A Host header's address (an IPv6 one without its brackets) and port, if it names one.
fn host_and_port(host: &str) -> (&str, Option<u16>) {
    if let Some(bracketed) = host.strip_prefix('[')
        && let Some((address, rest)) = bracketed.split_once(']')
    {
        return (
            address,
            rest.strip_prefix(':').and_then(|port| port.parse().ok()),
        );
    }
    match host.rsplit_once(':') {
        Some((address, port)) => (address, port.parse().ok()),
        None => (host, None),
    }
}

/// `network.protocol.version` as OpenTelemetry writes it: `1.1`, `2`.
fn protocol_version(version: axum::http::Version) -> &'static str {
    match version {
        axum::http::Version::HTTP_09 => "0.9",
        axum::http::Version::HTTP_10 => "1.0",
        axum::http::Version::HTTP_2 => "2",
        axum::http::Version::HTTP_3 => "3",
        _ => "1.1",
    }
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
    send_again(request, 0).await
}

/// [`send`] for the `resends`-th retry of a request (0 for its first attempt), which its client
/// span says (`http.request.resend_count`).
pub async fn send_again(
    request: reqwest::RequestBuilder,
    resends: u32,
) -> reqwest::Result<reqwest::Response> {
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
        // Without its query and fragment (`?…`), where a key or a cursor may be.
        "url.full" = crate::config::shown_url(url),
        "http.request.resend_count" = tracing::field::Empty,
        "http.response.status_code" = tracing::field::Empty,
        "error.type" = tracing::field::Empty,
    );
    if resends > 0 {
        span.record("http.request.resend_count", resends);
    }
    if let Some(context) = span_context(&span).filter(|_| TRACE_CONTEXT.load(Ordering::Relaxed)) {
        TraceContextPropagator::new().inject_context(
            &Context::new().with_remote_span_context(context),
            &mut WriteHeaders(request.headers_mut()),
        );
    }
    // A call given up on before it ended (the caller's own request cancelled) ends its span
    // as one: never a client span without a status.
    let mut unfinished = Unfinished(Some(&span));
    let result = client.execute(request).instrument(span.clone()).await;
    unfinished.0 = None;
    // OpenTelemetry's HTTP conventions: a client span is an error when no answer came, or when
    // it is a 4xx or a 5xx, with `error.type` the status code (the status's description left
    // empty then, as the code says it) or why none came.
    let status = result.as_ref().ok().map(reqwest::Response::status);
    if let Some(status) = status {
        span.record("http.response.status_code", status.as_u16());
    }
    let failure = match (&result, &status) {
        (_, Some(status)) if status.is_client_error() || status.is_server_error() => {
            Some((status.as_str(), ""))
        }
        (Err(err), _) if err.is_timeout() => Some(("timeout", "timeout")),
        (Err(_), _) => Some(("transport", "transport error")),
        _ => None,
    };
    if let Some((error_type, description)) = failure {
        span.record("error.type", error_type);
        fail_client_span(&span, description);
    }
    result
}

/// Marks the client span of a call dropped before it ended: an error status, `error.type`
/// `cancelled`.
struct Unfinished<'a>(Option<&'a tracing::Span>);

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if let Some(span) = self.0 {
            span.record("error.type", "cancelled");
            fail_client_span(span, "cancelled");
        }
    }
}

/// Spans captured in memory on one thread, for unit tests of what the spans say.
#[cfg(test)]
pub(crate) mod testing {
    use std::cell::Cell;
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanProcessor};
    use tracing_subscriber::layer::SubscriberExt as _;

    thread_local! {
        /// Set while a [`Captured`] lives on this thread: [`super::is_exporting`] is true here
        /// only, so that other tests of the process (which compare log lines) see no trace id.
        pub(super) static CAPTURING: Cell<bool> = const { Cell::new(false) };
    }

    #[derive(Debug, Default)]
    struct Keep(Arc<Mutex<Vec<SpanData>>>);

    impl SpanProcessor for Keep {
        fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &opentelemetry::Context) {}

        fn on_end(&self, span: SpanData) {
            self.0.lock().unwrap().push(span);
        }

        fn force_flush(&self) -> OTelSdkResult {
            Ok(())
        }

        fn shutdown_with_timeout(&self, _: std::time::Duration) -> OTelSdkResult {
            Ok(())
        }
    }

    /// Every span of edgegate's ended on this thread while it lives, as they would be exported
    /// (a current-thread runtime keeps a test's tasks on its thread).
    pub(crate) struct Captured {
        spans: Arc<Mutex<Vec<SpanData>>>,
        _default: tracing::subscriber::DefaultGuard,
        _provider: SdkTracerProvider,
    }

    pub(crate) fn capture() -> Captured {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Keep(spans.clone()))
            .build();
        let layer = super::super::spans::SpanLayer::new(provider.tracer("edgegate"));
        let default = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
        CAPTURING.set(true);
        Captured {
            spans,
            _default: default,
            _provider: provider,
        }
    }

    impl Captured {
        /// The spans ended so far.
        pub(crate) fn ended(&self) -> Vec<SpanData> {
            self.spans.lock().unwrap().clone()
        }
    }

    impl Drop for Captured {
        fn drop(&mut self) {
            CAPTURING.set(false);
        }
    }

    /// A span's attribute, written as text.
    pub(crate) fn attribute(span: &SpanData, key: &str) -> Option<String> {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::bounded_attribute;
    use opentelemetry::trace::TraceId;

    #[test]
    fn a_header_attribute_is_cut_on_a_character_boundary() {
        assert_eq!(bounded_attribute("curl/8.5"), "curl/8.5");
        // 255 one-byte characters, then two-byte ones: the 256th byte is inside one.
        let value = format!("{}{}", "a".repeat(255), "é".repeat(10));
        assert_eq!(bounded_attribute(&value), "a".repeat(255));
        let value = "é".repeat(200);
        assert_eq!(bounded_attribute(&value), "é".repeat(128));
    }

    /// A collector outage is logged when it begins, then at most once a minute (what was lost
    /// since, queue drops included), and when it ends (what it lost in all).
    #[test]
    fn an_outage_is_logged_when_it_begins_once_a_minute_and_when_it_ends() {
        use super::{Lost, Outage, OutageLine};
        use std::time::{Duration, Instant};

        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut outage = Outage::default();
        assert_eq!(outage.exported(0), None, "no outage, nothing to say");
        assert_eq!(outage.failed(at(0), 5, 10), Some(OutageLine::Began));
        for n in 1..300 {
            assert_eq!(outage.failed(at(n * 200), 5, 10), None, "batch {n}");
        }
        // A minute after the first line: the 300 batches since it, 7 spans dropped meanwhile.
        assert_eq!(
            outage.failed(at(60_000), 5, 17),
            Some(OutageLine::Lasting(Lost {
                batches: 300,
                spans: 1500,
                dropped: 7
            }))
        );
        assert_eq!(outage.failed(at(60_200), 5, 17), None);
        assert_eq!(outage.failed(at(119_999), 5, 17), None);
        assert_eq!(
            outage.exported(20),
            Some(OutageLine::Over(Lost {
                batches: 303,
                spans: 1515,
                dropped: 10
            }))
        );
        assert_eq!(outage.exported(20), None);
        assert_eq!(outage.failed(at(200_000), 1, 20), Some(OutageLine::Began));
        assert_eq!(outage.failed(at(200_200), 2, 23), None);
        assert_eq!(
            outage.ending(23),
            Some(OutageLine::Lasting(Lost {
                batches: 1,
                spans: 2,
                dropped: 3
            }))
        );
        assert_eq!(outage.ending(23), None, "said already");
    }

    #[test]
    fn ids_are_written_as_trace_context_writes_them() {
        let mut out = [0u8; 32];
        for id in [0, 1, 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736, u128::MAX] {
            let id = TraceId::from(id);
            assert_eq!(super::hex_id(&id.to_bytes(), &mut out), id.to_string());
        }
    }
}
