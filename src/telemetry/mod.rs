//! Logs (tracing), metrics (Prometheus text format) and traces (OpenTelemetry over OTLP).

mod json_fields;
mod metrics;
mod otlp;
mod spans;
mod stderr;
mod traces;

pub(crate) use metrics::logged_method;
pub use metrics::{Exposition, HttpLabels, Metrics, RouteLabel, TrackMetricsLayer};
pub(crate) use spans::{cancel_server_span, end_server_span};
pub use stderr::{flush as flush_logs, flush_by as flush_logs_by, print as print_after_logs};
pub(crate) use traces::server_span;
#[cfg(test)]
pub(crate) use traces::testing;
pub use traces::{SHUTDOWN_EXPORT, TraceExporter, check_collector, is_exporting, send, send_again};

/// The request span's `http.route` (in the logs) when no route matched. A server span leaves
/// `http.route` out then, as OpenTelemetry's HTTP conventions say, and is named by the method
/// alone.
pub(crate) const UNMATCHED_ROUTE: &str = "unmatched";

use std::io::IsTerminal;
use std::time::Duration;

use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::{LogFormat, TraceExport};

/// How long the process may take to exit once the service has stopped (after the drain and the
/// steps after it, [`crate::AFTER_DRAIN`]): the last span export (at most [`SHUTDOWN_EXPORT`]),
/// the log lines still pending and the async runtime's blocking threads share this one deadline,
/// so that a collector that does not answer, a stderr nobody reads and a thread stuck in a DNS
/// lookup, all at once, still leave the process inside the kill timeout.
pub const EXIT_AFTER_STOP: Duration = Duration::from_millis(1500);

/// Installs the global subscriber: the logs, and the span exporter when `traces` is set (then
/// it must run inside a tokio runtime, which carries the export task). `batched`: info lines go
/// to stderr in batches (a server; [`flush_logs`] before exit and before writing to stderr
/// directly), see `stderr.rs`.
pub fn init(
    format: LogFormat,
    filter: &str,
    traces: Option<&TraceExport>,
    batched: bool,
) -> anyhow::Result<Option<TraceExporter>> {
    let writer = stderr::BatchedStderr::get(batched);
    let Some(traces) = traces else {
        init_logging(format, filter, writer);
        return Ok(None);
    };
    let (exporter, tracer) = traces::start(traces)?;
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer()
        .with_span_events(FmtSpan::NONE)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    let logs = match format {
        // The same JSON lines as without traces (see init_logging).
        LogFormat::Json => logs
            .fmt_fields(json_fields::AppendJsonFields)
            .event_format(json_fields::JsonLines)
            .boxed(),
        LogFormat::Pretty => logs.boxed(),
    };
    let spans = spans::SpanLayer::new(tracer);
    if tracing_subscriber::registry()
        .with(spans::Filter::new(filter))
        .with(logs)
        .with(spans)
        .try_init()
        .is_ok()
    {
        traces::set_exporting();
    }
    Ok(Some(exporter))
}

/// Installs the global subscriber, without spans exported. `filter` was validated with the
/// configuration.
fn init_logging(format: LogFormat, filter: &str, writer: stderr::BatchedStderr) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(FmtSpan::NONE)
        // Colour codes only for a person at a terminal, never into files or log collectors.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    // A second call (tests start several apps) keeps the first subscriber.
    let _ = match format {
        // Each line carries its span's fields once, under `span` (json_fields::JsonLines).
        LogFormat::Json => builder
            .fmt_fields(json_fields::AppendJsonFields)
            .event_format(json_fields::JsonLines)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

/// The line that closes each request, inside its span (which carries the request id, method,
/// matched route and credential): the status and the latency in milliseconds. At error level
/// for a 5xx answer, so that a filter that keeps errors only (`RUST_LOG=error`) still shows
/// them; at info level otherwise.
pub fn log_response<B>(
    response: &axum::http::Response<B>,
    latency: Duration,
    span: &tracing::Span,
) {
    let status = response.status().as_u16();
    if is_exporting() {
        end_server_span(span, status);
    }
    let latency_ms = latency.as_secs_f64() * 1000.0;
    if response.status().is_server_error() {
        tracing::error!(status, latency_ms, "response");
    } else {
        tracing::info!(status, latency_ms, "response");
    }
}

/// Marks an answer to a request whose client went away before it was answered, though its
/// handler ended (a body read that failed because the client hung up or reset its stream): it is
/// logged by [`log_cancelled`] and counted under 499, as a request whose future was dropped is,
/// not as the answer it carries, which the client is not there to read.
#[derive(Clone, Copy, Debug)]
pub struct ClientClosed;

/// The line that closes a request the client gave up on before it was answered (an HTTP/1
/// hang-up, an HTTP/2 reset), inside its span: `status` 499 (as counted in the metrics, nginx's
/// "client closed request") and the latency until then. Its span ends with an error status.
pub fn log_cancelled(latency: Duration, span: &tracing::Span) {
    let _entered = span.enter();
    if is_exporting() {
        cancel_server_span(span);
    }
    tracing::info!(
        status = metrics::CLIENT_CLOSED_REQUEST,
        latency_ms = latency.as_secs_f64() * 1000.0,
        "request cancelled"
    );
}

/// Log output kept in memory, for tests that read what a subscriber wrote.
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct LogLines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(test)]
impl LogLines {
    /// Everything written so far, as text.
    pub(crate) fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }

    /// tracing-subscriber's own JSON format, as the service configured it before
    /// `json_fields::JsonLines`, keeping every level, writing here.
    pub(crate) fn tracing_subscribers_json(&self) -> impl tracing::Subscriber + Send + Sync {
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_span_list(false)
            .with_max_level(tracing::Level::TRACE)
            .with_writer(self.clone())
            .finish()
    }
}

#[cfg(test)]
impl std::io::Write for LogLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogLines {
    type Writer = LogLines;
    fn make_writer(&'a self) -> LogLines {
        self.clone()
    }
}
