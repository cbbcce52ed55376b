//! Logs (tracing) and metrics (Prometheus text format).

mod json_fields;
mod metrics;

pub use metrics::{HttpLabels, LegacyKindLabels, Metrics, track_metrics};

use std::io::IsTerminal;
use std::time::Duration;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

use crate::config::LogFormat;

/// Installs the global subscriber. `filter` was validated with the configuration.
pub fn init_logging(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(FmtSpan::NONE)
        // Colour codes only for a person at a terminal, never into files or log collectors.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // A second call (tests start several apps) keeps the first subscriber.
    let _ = match format {
        // Each line carries its span's fields once, under `span`: the list of every enclosing
        // span would repeat the request span's fields, and each copy costs a parse of them.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_span_list(false)
            .fmt_fields(json_fields::AppendJsonFields)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

/// The line that closes each request, inside its span (which carries the request id, method,
/// matched route and credential): the status and the latency in milliseconds.
pub fn log_response<B>(
    response: &axum::http::Response<B>,
    latency: Duration,
    _span: &tracing::Span,
) {
    tracing::info!(
        status = response.status().as_u16(),
        latency_ms = latency.as_secs_f64() * 1000.0,
        "response"
    );
}
