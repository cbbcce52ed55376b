//! The tracing layer that makes edgegate's spans OpenTelemetry spans: the server span of each
//! request and the client span of each call to a service outside.
//!
//! The spans stay `tracing` spans (the logs carry their fields); this layer gives each span of
//! edgegate's own an SDK span when it is made, copies its fields as attributes (`trace_id` apart:
//! the SDK span has it), copies later `record`s, and ends it when the span closes. It does
//! nothing on enter, exit or events, and looks no span up for them, unlike
//! `tracing-opentelemetry` behind a per-layer filter, which measured about 9k instructions a
//! request (BENCHMARKS.md, "Traces").

use std::cell::Cell;

use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt as _, Tracer as _,
};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_sdk::trace::{SdkTracer, Span as SdkSpan};
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Metadata, Subscriber};
use tracing_subscriber::layer::{Context as LayerContext, Layer};
use tracing_subscriber::registry::{LookupSpan, SpanData as _};
use tracing_subscriber::{EnvFilter, Registry};

/// The name of the request span (`server::middleware`, and `traces::server_span`).
pub(super) const SERVER_SPAN: &str = "request";
/// The name of the span of an outgoing call (`traces::send`).
pub(super) const CLIENT_SPAN: &str = "http.client";

/// What a server span gets besides its fields: the caller's trace context and attributes the
/// logs do not carry. Left for the layer on the thread that makes the span ([`server_span_with`]).
pub(super) struct ServerStart {
    pub parent: Context,
    pub attributes: Vec<KeyValue>,
}

thread_local! {
    static NEXT_SERVER_SPAN: Cell<Option<ServerStart>> = const { Cell::new(None) };
}

/// Makes the server span with `make`, which gets `start` (see [`ServerStart`]).
pub(super) fn server_span_with(
    start: ServerStart,
    make: impl FnOnce() -> tracing::Span,
) -> tracing::Span {
    NEXT_SERVER_SPAN.set(Some(start));
    let span = make();
    // Taken by the layer, unless a filter refused the span: then it must not reach the next.
    NEXT_SERVER_SPAN.set(None);
    span
}

/// The OpenTelemetry span of a tracing span, kept in its extensions until it closes.
struct OtelSpan(SdkSpan);

/// Makes an SDK span for each span whose target is edgegate's.
pub(super) struct SpanLayer {
    tracer: SdkTracer,
}

impl SpanLayer {
    pub(super) fn new(tracer: SdkTracer) -> Self {
        Self { tracer }
    }
}

fn is_ours(meta: &Metadata<'_>) -> bool {
    meta.is_span() && meta.target().starts_with("edgegate")
}

impl<S> Layer<S> for SpanLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: LayerContext<'_, S>) {
        let meta = attrs.metadata();
        if !is_ours(meta) {
            return;
        }
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut fields = Fields::with_capacity(attrs.fields().len() + 3);
        attrs.record(&mut fields);
        let (name, kind, parent) = match meta.name() {
            SERVER_SPAN => {
                let start = NEXT_SERVER_SPAN.take();
                // OpenTelemetry names a request of an unknown method `HTTP {route}`, and one
                // no route matched by its method alone.
                let method = match fields.method.as_str() {
                    "_OTHER" => "HTTP",
                    method => method,
                };
                let mut name = String::with_capacity(method.len() + 1 + fields.route.len());
                name.push_str(method);
                if !fields.route.is_empty() {
                    name.push(' ');
                    name.push_str(&fields.route);
                }
                let parent = match start {
                    Some(start) => {
                        fields.attributes.extend(start.attributes);
                        start.parent
                    }
                    None => Context::new(),
                };
                (name.into(), SpanKind::Server, parent)
            }
            CLIENT_SPAN => (fields.method.into(), SpanKind::Client, Context::new()),
            other => (other.into(), SpanKind::Internal, Context::new()),
        };
        // A span of ours inside another (a call made while answering) is its child.
        let parent = if parent.has_active_span() {
            parent
        } else {
            let enclosing = match attrs.parent() {
                Some(parent) => ctx.span(parent),
                None if attrs.is_contextual() => ctx.lookup_current(),
                None => None,
            };
            enclosing
                .and_then(|enclosing| {
                    let extensions = enclosing.extensions();
                    let sdk = &extensions.get::<OtelSpan>()?.0;
                    Some(Context::new().with_remote_span_context(sdk.span_context().clone()))
                })
                .unwrap_or(parent)
        };
        let sdk = self
            .tracer
            .span_builder::<std::borrow::Cow<'static, str>>(name)
            .with_kind(kind)
            .with_attributes(fields.attributes)
            .start_with_context(&self.tracer, &parent);
        span.extensions_mut().insert(OtelSpan(sdk));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: LayerContext<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut extensions = span.extensions_mut();
        let Some(OtelSpan(sdk)) = extensions.get_mut::<OtelSpan>() else {
            return;
        };
        let mut fields = Fields::with_capacity(2);
        values.record(&mut fields);
        sdk.set_attributes(fields.attributes);
    }

    fn on_close(&self, id: Id, ctx: LayerContext<'_, S>) {
        let Some(span) = ctx.span(&id) else {
            return;
        };
        let sdk = span.extensions_mut().remove::<OtelSpan>();
        if let Some(OtelSpan(mut sdk)) = sdk {
            sdk.end();
        }
    }
}

/// The logs' filter (`RUST_LOG`), widened to keep edgegate's own spans for traces whatever it
/// says of them. It is the one filter of the subscriber, so the logs see those spans too (they
/// print no line for a span, only its fields beside a line the filter kept). One filter for the
/// whole subscriber rather than one per layer: a per-layer filter looks each span up again on
/// every enter and exit, and a layer without one cannot keep a span another layer's filter
/// refused.
pub(super) struct Filter {
    logs: EnvFilter,
}

impl Filter {
    pub(super) fn new(logs: EnvFilter) -> Self {
        Self { logs }
    }
}

impl<S> Layer<S> for Filter
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        // Always asked: it notes the span field matchers of its directives per callsite.
        let logs = Layer::<S>::register_callsite(&self.logs, meta);
        if is_ours(meta) {
            Interest::always()
        } else {
            logs
        }
    }

    fn enabled(&self, meta: &Metadata<'_>, ctx: LayerContext<'_, S>) -> bool {
        is_ours(meta) || Layer::<S>::enabled(&self.logs, meta, ctx)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Layer::<S>::max_level_hint(&self.logs).map(|level| level.max(LevelFilter::INFO))
    }

    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: LayerContext<'_, S>) {
        Layer::<S>::on_new_span(&self.logs, attrs, id, ctx);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: LayerContext<'_, S>) {
        Layer::<S>::on_record(&self.logs, id, values, ctx);
    }

    fn on_enter(&self, id: &Id, ctx: LayerContext<'_, S>) {
        Layer::<S>::on_enter(&self.logs, id, ctx);
    }

    fn on_exit(&self, id: &Id, ctx: LayerContext<'_, S>) {
        Layer::<S>::on_exit(&self.logs, id, ctx);
    }

    fn on_close(&self, id: Id, ctx: LayerContext<'_, S>) {
        Layer::<S>::on_close(&self.logs, id, ctx);
    }
}

/// A span's fields as attributes, and the two its name is made of.
struct Fields {
    attributes: Vec<KeyValue>,
    method: String,
    route: String,
}

impl Fields {
    fn with_capacity(capacity: usize) -> Self {
        Self {
            attributes: Vec::with_capacity(capacity),
            method: String::new(),
            route: String::new(),
        }
    }

    fn push(&mut self, field: &Field, value: Value) {
        self.attributes.push(KeyValue::new(field.name(), value));
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            // The logs' copy of what the SDK span has already.
            "trace_id" => return,
            "http.request.method" => value.clone_into(&mut self.method),
            // No route matched: the conventions leave `http.route` out.
            "http.route" if value == super::UNMATCHED_ROUTE => return,
            "http.route" => value.clone_into(&mut self.route),
            _ => {}
        }
        self.push(
            field,
            known(value).map_or_else(|| value.to_owned().into(), Value::from),
        );
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field, Value::I64(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push(field, Value::I64(i64::try_from(value).unwrap_or(i64::MAX)));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push(field, Value::Bool(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.push(field, Value::F64(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
}

/// Values many spans carry (methods, schemes, credential sources), which an attribute can
/// then hold without a copy of its own.
fn known(value: &str) -> Option<&'static str> {
    const KNOWN: [&str; 12] = [
        "GET",
        "POST",
        "PUT",
        "PATCH",
        "DELETE",
        "HEAD",
        "OPTIONS",
        "signing_key",
        "legacy_secret",
        "api_key",
        "http",
        "https",
    ];
    KNOWN.into_iter().find(|known| *known == value)
}

/// Runs `f` on the OpenTelemetry span of `span`, if it has one.
fn with_sdk_span<T>(span: &tracing::Span, f: impl FnOnce(&mut SdkSpan) -> T) -> Option<T> {
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<Registry>()?;
        let data = registry.span_data(id)?;
        let mut extensions = data.extensions_mut();
        let OtelSpan(sdk) = extensions.get_mut::<OtelSpan>()?;
        Some(f(sdk))
    })
    .flatten()
}

/// The trace context of `span`'s OpenTelemetry span, to send on.
pub(super) fn span_context(span: &tracing::Span) -> Option<SpanContext> {
    with_sdk_span(span, |sdk| sdk.span_context().clone())
}

/// Records the answer on the server span: its status, and for a 5xx an error status with
/// `error.type` the status code (OpenTelemetry's HTTP conventions; the status's description is
/// left empty, as the code says it).
pub(crate) fn end_server_span(span: &tracing::Span, status: u16) {
    with_sdk_span(span, |sdk| {
        sdk.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if status >= 500 {
            sdk.set_attribute(KeyValue::new("error.type", status.to_string()));
            sdk.set_status(Status::error(""));
        }
    });
}

/// Gives the client span of a call that failed (see `traces::send`) an error status.
pub(super) fn fail_client_span(span: &tracing::Span, description: &'static str) {
    with_sdk_span(span, |sdk| sdk.set_status(Status::error(description)));
}

/// Ends the server span of a request the client gave up on: no answer was sent, so no status
/// code; an error status, and `error.type` saying why.
pub(crate) fn cancel_server_span(span: &tracing::Span) {
    with_sdk_span(span, |sdk| {
        sdk.set_attribute(KeyValue::new("error.type", "cancelled"));
        sdk.set_status(Status::error("request cancelled by the client"));
    });
}
