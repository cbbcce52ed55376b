//! OTLP/HTTP trace export: ended spans encoded straight into the protobuf wire format of
//! `ExportTraceServiceRequest`, and POSTed to the collector with OTLP's retry rules.
//!
//! `opentelemetry-otlp`'s exporter first copies every span into the generated protobuf structs
//! (a `String` per attribute key and value, a `Vec` per id), groups them by scope in a hash map,
//! encodes, and drops the copies: measured at about 16,000 instructions a span, half of what
//! exporting cost a jwt-test request. Here a span is written once, from the SDK's own data, into
//! one buffer reused batch after batch. The messages and their field numbers are those of
//! `opentelemetry/proto/trace/v1/trace.proto`; the unit tests decode the output with the
//! `opentelemetry-proto` crate and compare it with that crate's own conversion.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use opentelemetry::trace::{SpanId, SpanKind, Status};
use opentelemetry::{Array, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SpanData;
use secrecy::ExposeSecret as _;
use tokio::time::Instant;
use url::Url;

use crate::backoff;
use crate::config::TraceExport;

/// Retries after the first attempt, and their delays: OTLP's recommended policy, the one
/// `opentelemetry-otlp` applies (3 retries, 100 ms doubling to 1.6 s, jittered), all within
/// `OTEL_EXPORTER_OTLP_TIMEOUT`.
const RETRIES: u32 = 3;
const RETRY_BASE: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_millis(1_600);
/// The most of a collector's answer that is read (a partial-success notice is a few hundred
/// bytes); past it the connection is dropped rather than the answer held.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The most of a refusal's reason that is kept for the log: enough for a collector's message
/// (`span 3: trace_id is not 16 bytes`), not a page of HTML.
const MAX_REASON_CHARS: usize = 300;

/// Why an export was lost. Says nothing of the request: its URL may carry a key in its query,
/// and its headers carry the collector's credentials.
#[derive(Debug, thiserror::Error)]
pub(super) enum ExportError {
    /// With the collector's reason, when its answer gave one ([`reason`]).
    #[error("the collector answered {status}{}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Status {
        status: StatusCode,
        reason: Option<String>,
    },
    /// With the causes, without the URL (`…: tcp connect error: Connection refused`).
    #[error("the collector could not be reached: {0}")]
    Unreachable(String),
    #[error("no answer within OTEL_EXPORTER_OTLP_TIMEOUT")]
    TimedOut,
}

/// The collector's endpoint, and the client that POSTs to it.
#[derive(Debug)]
pub(super) struct Collector {
    client: reqwest::Client,
    endpoint: Url,
    headers: HeaderMap,
    timeout: Duration,
}

impl Collector {
    /// `purpose` goes in the user agent, as `check`'s other clients have it.
    pub(super) fn new(config: &TraceExport, purpose: Option<&str>) -> anyhow::Result<Self> {
        // The service's own client stack (rustls on aws-lc-rs), not a second one; a 3xx is a
        // failed export, not followed with the collector's headers.
        let client = crate::outbound::build(|| {
            crate::outbound::client_builder(purpose, &[&config.endpoint])
        });
        let mut headers = HeaderMap::new();
        for (name, value) in &config.headers {
            // Checked with the configuration; a value is marked sensitive so that no debug
            // output of the request shows it.
            let name = HeaderName::from_bytes(name.as_bytes())?;
            let mut value = HeaderValue::from_str(value.expose_secret())?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-protobuf"),
        );
        Ok(Self {
            client,
            endpoint: config.endpoint.clone(),
            headers,
            timeout: config.export_timeout,
        })
    }

    /// POSTs one encoded request. Retries what OTLP/HTTP says to retry (429, 502, 503, 504, and
    /// no answer at all), after `Retry-After` when the collector gives one, until the export
    /// timeout has passed.
    pub(super) async fn send(&self, body: bytes::Bytes) -> Result<(), ExportError> {
        let deadline = Instant::now() + self.timeout;
        let mut retry = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ExportError::TimedOut);
            }
            let attempt = self
                .client
                .post(self.endpoint.clone())
                .headers(self.headers.clone())
                .body(body.clone())
                .timeout(left)
                .send()
                .await;
            let (error, retry_after) = match attempt {
                Ok(response) if response.status().is_success() => {
                    // Read to the end (the connection is kept); a partial success says what
                    // the collector refused, which no one here acts on.
                    let _ = crate::outbound::read_capped(response, MAX_ANSWER_BYTES).await;
                    return Ok(());
                }
                Ok(response) => {
                    let status = response.status();
                    let retry_after = crate::outbound::retry_after(response.headers());
                    // OTLP/HTTP puts why in the body: a `google.rpc.Status` in protobuf.
                    let reason = crate::outbound::read_capped(response, MAX_ANSWER_BYTES)
                        .await
                        .ok()
                        .and_then(|body| reason(&body));
                    let error = ExportError::Status { status, reason };
                    let retryable = matches!(status.as_u16(), 429 | 502 | 503 | 504);
                    if !retryable {
                        return Err(error);
                    }
                    (error, retry_after)
                }
                Err(err) if err.is_timeout() => return Err(ExportError::TimedOut),
                // reqwest's own message alone ("error sending request") does not say what
                // failed: a refused connection, a TLS handshake with a plain port, a certificate
                // the system does not trust.
                Err(err) => (
                    ExportError::Unreachable(crate::error::causes(&anyhow::Error::new(
                        err.without_url(),
                    ))),
                    None,
                ),
            };
            retry += 1;
            if retry > RETRIES {
                return Err(error);
            }
            let pause = retry_after.unwrap_or_else(|| {
                backoff::equal_jitter(backoff::exponential(RETRY_BASE, retry, RETRY_MAX))
            });
            // A collector's `Retry-After` may be any number of seconds: past the clock's range
            // is past the deadline too.
            if Instant::now()
                .checked_add(pause)
                .is_none_or(|resume| resume >= deadline)
            {
                return Err(error);
            }
            tokio::time::sleep(pause).await;
        }
    }
}

/// What a refusal's body says, as one bounded line: the `message` of a `google.rpc.Status`
/// (what OTLP/HTTP collectors answer), else the body as text if it is text (a proxy's, or a
/// collector's plain-text answer); `None` when there is nothing to show. Escaped: it goes into
/// the logs and `check`'s one line.
fn reason(body: &[u8]) -> Option<String> {
    let text = match status_message(body) {
        Some(message) => message,
        None => std::str::from_utf8(body).ok()?,
    };
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let mut cut: String = text.chars().take(MAX_REASON_CHARS).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    Some(crate::commands::one_line(&cut))
}

/// The `message` (field 2) of a `google.rpc.Status`, empty when it has none, when `body` is one:
/// every field well-formed to its end, no field number or wire type the message does not have.
fn status_message(body: &[u8]) -> Option<&str> {
    fn read_varint(body: &[u8], at: &mut usize) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *body.get(*at)?;
            *at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Some(value);
            }
        }
        None
    }
    let mut message = "";
    let mut at = 0;
    while at < body.len() {
        let key = read_varint(body, &mut at)?;
        match (key >> 3, key & 7) {
            // code (int32)
            (1, VARINT_U64) => {
                read_varint(body, &mut at)?;
            }
            // message (string), details (repeated Any)
            (field @ (2 | 3), LEN_U64) => {
                let len = usize::try_from(read_varint(body, &mut at)?).ok()?;
                let content = body.get(at..at.checked_add(len)?)?;
                at += len;
                if field == 2 {
                    message = std::str::from_utf8(content).ok()?;
                }
            }
            _ => return None,
        }
    }
    Some(message)
}

const VARINT_U64: u64 = VARINT as u64;
const LEN_U64: u64 = LEN as u64;

/// Writes `ExportTraceServiceRequest` messages for one resource. Keeps its buffer: a batch
/// after the first allocates nothing unless it is larger.
#[derive(Debug)]
pub(super) struct Encoder {
    /// The encoded `Resource` message (its fields), written once.
    resource: Vec<u8>,
    resource_schema_url: Option<String>,
    buf: Vec<u8>,
}

impl Encoder {
    pub(super) fn new(resource: &Resource) -> Self {
        let mut encoded = Vec::new();
        for (key, value) in resource.iter() {
            message(&mut encoded, 1, |buf| key_value(buf, key.as_str(), value));
        }
        Self {
            resource: encoded,
            resource_schema_url: resource.schema_url().map(str::to_owned),
            buf: Vec::new(),
        }
    }

    /// The request carrying `spans`: one `ResourceSpans`, and one `ScopeSpans` for each run of
    /// spans from the same instrumentation scope (all of edgegate's come from one).
    pub(super) fn encode(&mut self, spans: &[SpanData]) -> bytes::Bytes {
        let buf = &mut self.buf;
        buf.clear();
        message(buf, 1, |buf| {
            message(buf, 1, |buf| buf.extend_from_slice(&self.resource));
            let mut rest = spans;
            while let Some(first) = rest.first() {
                let scope = &first.instrumentation_scope;
                let run = rest
                    .iter()
                    .position(|span| span.instrumentation_scope != *scope)
                    .unwrap_or(rest.len());
                let (same, after) = rest.split_at(run);
                message(buf, 2, |buf| scope_spans(buf, scope, same));
                rest = after;
            }
            string(buf, 3, self.resource_schema_url.as_deref().unwrap_or(""));
        });
        bytes::Bytes::copy_from_slice(buf)
    }
}

fn scope_spans(buf: &mut Vec<u8>, scope: &InstrumentationScope, spans: &[SpanData]) {
    message(buf, 1, |buf| {
        string(buf, 1, scope.name());
        string(buf, 2, scope.version().unwrap_or(""));
        for attribute in scope.attributes() {
            message(buf, 3, |buf| {
                key_value(buf, attribute.key.as_str(), &attribute.value);
            });
        }
    });
    for one in spans {
        message(buf, 2, |buf| span(buf, one));
    }
    string(buf, 3, scope.schema_url().unwrap_or(""));
}

/// `Span`, field by field in the order of their numbers (as prost writes them).
fn span(buf: &mut Vec<u8>, span: &SpanData) {
    let context = &span.span_context;
    bytes(buf, 1, &context.trace_id().to_bytes());
    bytes(buf, 2, &context.span_id().to_bytes());
    string(buf, 3, &context.trace_state().header());
    if span.parent_span_id != SpanId::INVALID {
        bytes(buf, 4, &span.parent_span_id.to_bytes());
    }
    string(buf, 5, &span.name);
    uint(buf, 6, span_kind(&span.span_kind));
    fixed64(buf, 7, nanos(span.start_time));
    fixed64(buf, 8, nanos(span.end_time));
    attributes(buf, 9, &span.attributes);
    uint(buf, 10, span.dropped_attributes_count.into());
    for event in span.events.iter() {
        message(buf, 11, |buf| {
            fixed64(buf, 1, nanos(event.timestamp));
            string(buf, 2, &event.name);
            attributes(buf, 3, &event.attributes);
            uint(buf, 4, event.dropped_attributes_count.into());
        });
    }
    uint(buf, 12, span.events.dropped_count.into());
    for link in span.links.iter() {
        let context = &link.span_context;
        message(buf, 13, |buf| {
            bytes(buf, 1, &context.trace_id().to_bytes());
            bytes(buf, 2, &context.span_id().to_bytes());
            string(buf, 3, &context.trace_state().header());
            attributes(buf, 4, &link.attributes);
            uint(buf, 5, link.dropped_attributes_count.into());
            fixed32(
                buf,
                6,
                flags(context.is_remote(), context.trace_flags().to_u8()),
            );
        });
    }
    uint(buf, 14, span.links.dropped_count.into());
    // Always present, as the SDK's conversion sends it.
    message(buf, 15, |buf| {
        let (code, description) = match &span.status {
            Status::Unset => (0, ""),
            Status::Ok => (1, ""),
            Status::Error { description } => (2, description.as_ref()),
        };
        string(buf, 2, description);
        uint(buf, 3, code);
    });
    fixed32(
        buf,
        16,
        flags(span.parent_span_is_remote, context.trace_flags().to_u8()),
    );
}

/// `SpanFlags`: the W3C trace flags, and whether the parent is remote (which is known).
fn flags(parent_is_remote: bool, trace_flags: u8) -> u32 {
    const HAS_IS_REMOTE: u32 = 0x100;
    const IS_REMOTE: u32 = 0x200;
    u32::from(trace_flags) | HAS_IS_REMOTE | if parent_is_remote { IS_REMOTE } else { 0 }
}

fn span_kind(kind: &SpanKind) -> u64 {
    match kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

fn nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as u64)
}

fn attributes(buf: &mut Vec<u8>, field: u32, attributes: &[KeyValue]) {
    for attribute in attributes {
        message(buf, field, |buf| {
            key_value(buf, attribute.key.as_str(), &attribute.value);
        });
    }
}

/// The fields of `KeyValue`.
fn key_value(buf: &mut Vec<u8>, key: &str, value: &Value) {
    string(buf, 1, key);
    message(buf, 2, |buf| any_value(buf, value));
}

/// The fields of `AnyValue`: one member of its `oneof`, written even when it is the default.
fn any_value(buf: &mut Vec<u8>, value: &Value) {
    match value {
        Value::String(text) => {
            tag(buf, 1, LEN);
            length_delimited(buf, text.as_str().as_bytes());
        }
        Value::Bool(flag) => {
            tag(buf, 2, VARINT);
            varint(buf, u64::from(*flag));
        }
        Value::I64(number) => {
            tag(buf, 3, VARINT);
            // int64: two's complement, ten bytes when negative.
            varint(buf, *number as u64);
        }
        Value::F64(number) => {
            tag(buf, 4, I64);
            buf.extend_from_slice(&number.to_le_bytes());
        }
        Value::Array(array) => message(buf, 5, |buf| match array {
            Array::Bool(values) => array_values(buf, values, |v| Value::Bool(*v)),
            Array::I64(values) => array_values(buf, values, |v| Value::I64(*v)),
            Array::F64(values) => array_values(buf, values, |v| Value::F64(*v)),
            Array::String(values) => array_values(buf, values, |v| Value::String(v.clone())),
            // A kind of array this encoder does not know: sent empty rather than wrong.
            _ => {}
        }),
        // A kind of value this encoder does not know: an `AnyValue` with nothing set.
        _ => {}
    }
}

/// `ArrayValue.values`.
fn array_values<T>(buf: &mut Vec<u8>, values: &[T], to_value: impl Fn(&T) -> Value) {
    for value in values {
        message(buf, 1, |buf| any_value(buf, &to_value(value)));
    }
}

// The wire format: https://protobuf.dev/programming-guides/encoding/

const VARINT: u32 = 0;
const I64: u32 = 1;
const LEN: u32 = 2;
const I32: u32 = 5;

fn tag(buf: &mut Vec<u8>, field: u32, wire_type: u32) {
    varint(buf, u64::from(field << 3 | wire_type));
}

fn varint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push((value as u8) | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

fn length_delimited(buf: &mut Vec<u8>, content: &[u8]) {
    varint(buf, content.len() as u64);
    buf.extend_from_slice(content);
}

/// A proto3 `string` field; the empty string, its default, is not written.
fn string(buf: &mut Vec<u8>, field: u32, text: &str) {
    bytes(buf, field, text.as_bytes());
}

/// A proto3 `bytes` field; empty, its default, it is not written.
fn bytes(buf: &mut Vec<u8>, field: u32, content: &[u8]) {
    if !content.is_empty() {
        tag(buf, field, LEN);
        length_delimited(buf, content);
    }
}

/// A proto3 `uint32` or enum field; zero, its default, is not written.
fn uint(buf: &mut Vec<u8>, field: u32, value: u64) {
    if value != 0 {
        tag(buf, field, VARINT);
        varint(buf, value);
    }
}

fn fixed64(buf: &mut Vec<u8>, field: u32, value: u64) {
    if value != 0 {
        tag(buf, field, I64);
        buf.extend_from_slice(&value.to_le_bytes());
    }
}

fn fixed32(buf: &mut Vec<u8>, field: u32, value: u32) {
    if value != 0 {
        tag(buf, field, I32);
        buf.extend_from_slice(&value.to_le_bytes());
    }
}

/// An embedded message (always written, even empty): its fields are written by `fields` after
/// the tag, then its length is put in front of them. Most of the messages here are shorter than
/// 128 bytes, so one byte is set aside for the length, and the fields move only when the length
/// needs more.
fn message(buf: &mut Vec<u8>, field: u32, fields: impl FnOnce(&mut Vec<u8>)) {
    tag(buf, field, LEN);
    let at = buf.len();
    buf.push(0);
    fields(buf);
    let len = buf.len() - at - 1;
    if len < 0x80 {
        buf[at] = len as u8;
        return;
    }
    let mut prefix = [0u8; 10];
    let mut size = 0;
    let mut rest = len as u64;
    while rest >= 0x80 {
        prefix[size] = (rest as u8) | 0x80;
        rest >>= 7;
        size += 1;
    }
    prefix[size] = rest as u8;
    size += 1;
    buf.resize(buf.len() + size - 1, 0);
    buf.copy_within(at + 1..at + 1 + len, at + size);
    buf[at..at + size].copy_from_slice(&prefix[..size]);
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::time::Duration;

    use opentelemetry::trace::{
        Event, Link, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue, Value};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
    use prost::Message as _;

    use super::Encoder;

    fn context(trace: u128, span: u64, state: &str, remote: bool) -> SpanContext {
        let state = if state.is_empty() {
            TraceState::NONE
        } else {
            state.parse::<TraceState>().unwrap()
        };
        SpanContext::new(
            TraceId::from(trace),
            SpanId::from(span),
            TraceFlags::SAMPLED,
            remote,
            state,
        )
    }

    fn at(ns: u64) -> std::time::SystemTime {
        std::time::UNIX_EPOCH + Duration::from_nanos(ns)
    }

    /// Every kind of value the API has, the edge cases of the wire format among them: negative
    /// and zero integers, an empty string, and strings whose length needs two and three bytes.
    fn every_value() -> Vec<KeyValue> {
        vec![
            KeyValue::new("http.request.method", "GET"),
            KeyValue::new("empty", ""),
            KeyValue::new("flag", true),
            KeyValue::new("off", false),
            KeyValue::new("status", 200_i64),
            KeyValue::new("zero", 0_i64),
            KeyValue::new("negative", -42_i64),
            KeyValue::new("min", i64::MIN),
            KeyValue::new("ratio", 0.25_f64),
            KeyValue::new("minus zero", -0.0_f64),
            KeyValue::new("two-byte length", "x".repeat(300)),
            KeyValue::new("three-byte length", "é".repeat(10_000)),
            KeyValue::new("bools", Value::Array(Array::Bool(vec![true, false]))),
            KeyValue::new("ints", Value::Array(Array::I64(vec![-1, 0, 1]))),
            KeyValue::new("floats", Value::Array(Array::F64(vec![1.5]))),
            KeyValue::new(
                "strings",
                Value::Array(Array::String(vec![
                    StringValue::from("a"),
                    StringValue::from(""),
                ])),
            ),
            KeyValue::new("no values", Value::Array(Array::I64(vec![]))),
        ]
    }

    fn spans() -> Vec<SpanData> {
        let edgegate = InstrumentationScope::builder("edgegate").build();
        let other = InstrumentationScope::builder("other")
            .with_version("1.2.3")
            .with_schema_url("https://opentelemetry.io/schemas/1.26.0")
            .with_attributes([KeyValue::new("scope.attribute", 7_i64)])
            .build();
        let mut events = SpanEvents::default();
        events.events.push(Event::new(
            "exception",
            at(1_764_590_400_000_100_000),
            vec![KeyValue::new("exception.message", "boom")],
            1,
        ));
        events.dropped_count = 2;
        let mut links = SpanLinks::default();
        links.links.push(Link::new(
            context(9, 10, "a=b,c=d", true),
            vec![KeyValue::new("link", true)],
            4,
        ));
        links.dropped_count = 5;
        let server = SpanData {
            span_context: context(
                0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736,
                1,
                "vendor=opaque",
                false,
            ),
            parent_span_id: SpanId::from(0x00f0_67aa_0ba9_02b7),
            parent_span_is_remote: true,
            span_kind: SpanKind::Server,
            name: Cow::Borrowed("GET /functions/v1/jwt-test"),
            start_time: at(1_764_590_400_000_000_001),
            end_time: at(1_764_590_400_000_123_456),
            attributes: every_value(),
            dropped_attributes_count: 3,
            events,
            links,
            status: Status::error("upstream failed"),
            instrumentation_scope: edgegate.clone(),
        };
        let root = SpanData {
            span_context: context(2, 3, "", false),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: Cow::Owned(String::new()),
            start_time: at(0),
            end_time: at(5),
            attributes: vec![],
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: edgegate,
        };
        let kinds = [
            SpanKind::Client,
            SpanKind::Producer,
            SpanKind::Consumer,
            SpanKind::Server,
        ];
        let mut spans = vec![server, root];
        for (n, kind) in kinds.into_iter().enumerate() {
            let mut span = spans[1].clone();
            span.span_kind = kind;
            span.status = Status::Ok;
            span.parent_span_id = SpanId::from(n as u64 + 100);
            span.instrumentation_scope = other.clone();
            spans.push(span);
        }
        spans
    }

    fn resource() -> Resource {
        Resource::builder_empty()
            .with_service_name("edgegate")
            .with_attribute(KeyValue::new("service.version", "1.0.0"))
            .with_schema_url([], "https://opentelemetry.io/schemas/1.26.0")
            .build()
    }

    /// What `opentelemetry-otlp` sends for the same spans: `opentelemetry-proto`'s conversion.
    fn reference(spans: &[SpanData], resource: &Resource) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(
                spans.to_vec(),
                &ResourceAttributesWithSchema::from(resource),
            ),
        }
    }

    #[test]
    fn the_request_decodes_to_what_the_sdks_own_conversion_builds() {
        let (spans, resource) = (spans(), resource());
        let mut encoder = Encoder::new(&resource);
        let body = encoder.encode(&spans);
        let decoded = ExportTraceServiceRequest::decode(body.as_ref()).expect("valid protobuf");
        assert_eq!(decoded, reference(&spans, &resource));
        // The same bytes as prost writes for those messages: no field is missing or extra.
        let by_prost = decoded.encode_to_vec();
        let first_difference = body.iter().zip(&by_prost).position(|(a, b)| a != b);
        assert_eq!(
            (first_difference, body.len()),
            (None, by_prost.len()),
            "first differing byte, and length; prost wrote {:?}",
            &by_prost[first_difference.unwrap_or(0).saturating_sub(16)..][..32]
        );
    }

    /// A refusal's reason: a `google.rpc.Status`'s message, else text, one bounded line.
    #[test]
    fn a_refusals_reason_is_the_status_message_or_the_text_bounded_and_escaped() {
        use super::reason;
        // google.rpc.Status { code: 3, message: "bad span", details: [Any {}] }
        let status = b"\x08\x03\x12\x08bad span\x1a\x00";
        assert_eq!(reason(status).as_deref(), Some("bad span"));
        // A code without a message: nothing to show, not its bytes.
        assert_eq!(reason(b"\x08\x03"), None);
        assert_eq!(reason(b""), None);
        assert_eq!(
            reason(&[0xff, 0xfe, 0x00]),
            None,
            "neither a Status nor text"
        );
        assert_eq!(
            reason(b"quota exceeded\nok   traces forged\x1b[2J").as_deref(),
            Some("quota exceeded\\nok   traces forged\\u{1b}[2J")
        );
        let long = "é".repeat(1_000);
        let cut = reason(long.as_bytes()).unwrap();
        assert_eq!(cut, format!("{}…", "é".repeat(super::MAX_REASON_CHARS)));
    }

    #[test]
    fn the_buffer_is_reused_without_leftovers_from_the_last_batch() {
        let (spans, resource) = (spans(), resource());
        let mut encoder = Encoder::new(&resource);
        encoder.encode(&spans);
        for batch in [&spans[1..2], &spans[..0]] {
            let body = encoder.encode(batch);
            let decoded = ExportTraceServiceRequest::decode(body.as_ref()).unwrap();
            if batch.is_empty() {
                // One resource with no scope: a valid, empty export.
                assert!(decoded.resource_spans[0].scope_spans.is_empty());
            } else {
                assert_eq!(decoded, reference(batch, &resource));
            }
        }
    }
}
