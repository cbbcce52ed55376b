//! OpenTelemetry traces from the real process: spans POSTed over OTLP/HTTP (protobuf) to a fake
//! collector on loopback, decoded with the `opentelemetry-proto` messages; the caller's W3C trace
//! context continued into the server span and on to Stripe; nothing of it without the variables.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::now_ms;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse as _, Response};
use axum::routing::post;
use edgegate::auth::Alg;
use edgegate::auth::mint::{SigningKey, user_claims};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::{AnyValue as AnyValueMessage, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;
use serde_json::Value;
use tokio::sync::Notify;

use crate::fake_stripe::{FakeStripe, SECRET_KEY};
use crate::process::{Server, free_port, signal, spawn_server, wait_exit, wait_healthy};
use crate::stripe::SB_SECRET;
use crate::stripe_fixtures;
use crate::support::{TestServer, serve_app};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";
const JWT_TEST: &str = "/functions/v1/jwt-test";
const SYNC: &str = "/functions/v1/sync-stripe-products-hardened";

fn traceparent() -> String {
    format!("00-{TRACE_ID}-{PARENT_ID}-01")
}

/// An OTLP/HTTP collector: keeps every body POSTed to `/v1/traces`, and its headers. A holding
/// collector never answers (a collector that hangs); `answers` are given, one per POST, before
/// it answers 200.
struct Collector {
    base: String,
    shared: Arc<Received>,
    _server: TestServer,
}

#[derive(Default)]
struct Received {
    bodies: Mutex<Vec<Bytes>>,
    /// Every POST, answered or refused.
    posts: Mutex<Vec<(HeaderMap, Bytes)>>,
    answers: Mutex<VecDeque<Response>>,
    arrived: Notify,
}

async fn receive(
    State(shared): State<(Arc<Received>, bool)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (received, hold) = shared;
    received.posts.lock().unwrap().push((headers, body.clone()));
    let answer = received.answers.lock().unwrap().pop_front();
    if let Some(answer) = answer {
        return answer;
    }
    received.bodies.lock().unwrap().push(body);
    received.arrived.notify_waiters();
    if hold {
        std::future::pending::<()>().await;
    }
    "".into_response()
}

impl Collector {
    async fn start(hold: bool) -> Self {
        Self::answering(hold, Vec::new()).await
    }

    async fn answering(hold: bool, answers: Vec<Response>) -> Self {
        let shared = Arc::new(Received {
            answers: Mutex::new(answers.into()),
            ..Received::default()
        });
        let app = Router::new()
            .route("/v1/traces", post(receive))
            .with_state((shared.clone(), hold));
        let server = serve_app(app, Duration::from_millis(100)).await;
        Self {
            base: server.url(""),
            shared,
            _server: server,
        }
    }

    /// Fails when any of `secrets` is in the bytes received.
    fn assert_never_holds(&self, secrets: &[&str]) {
        let raw = self.shared.bodies.lock().unwrap().concat();
        for secret in secrets {
            assert!(
                !raw.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "a credential reached the exported spans"
            );
        }
    }

    fn requests(&self) -> Vec<ExportTraceServiceRequest> {
        self.shared
            .bodies
            .lock()
            .unwrap()
            .iter()
            .map(|body| ExportTraceServiceRequest::decode(body.as_ref()).expect("OTLP protobuf"))
            .collect()
    }

    fn spans(&self) -> Vec<Span> {
        self.requests()
            .into_iter()
            .flat_map(|request| request.resource_spans)
            .flat_map(|resource| resource.scope_spans)
            .flat_map(|scope| scope.spans)
            .collect()
    }

    /// Waits (10 s at most) until a span matching `wanted` has arrived.
    async fn span(&self, wanted: impl Fn(&Span) -> bool) -> Span {
        for _ in 0..100 {
            let arrived = self.shared.arrived.notified();
            if let Some(span) = self.spans().into_iter().find(|span| wanted(span)) {
                return span;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), arrived).await;
        }
        panic!(
            "no such span arrived; the collector has: {:#?}",
            self.spans()
        );
    }
}

fn text(value: Option<&AnyValueMessage>) -> Option<String> {
    match value?.value.as_ref()? {
        AnyValue::StringValue(text) => Some(text.clone()),
        AnyValue::IntValue(number) => Some(number.to_string()),
        AnyValue::BoolValue(flag) => Some(flag.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    text(attributes.iter().find(|kv| kv.key == key)?.value.as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A server process with `vars`; its log (JSON lines) is `server.log` in the returned folder.
async fn start(vars: &[(&str, &str)]) -> (Server, tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let mut all = vec![
        ("PORT", port.as_str()),
        ("LOG_FORMAT", "json"),
        ("RUST_LOG", "info"),
    ];
    all.extend_from_slice(vars);
    let server = spawn_server(dir.path(), "server.log", &all);
    assert!(
        wait_healthy(port.parse().unwrap()).await,
        "edgegate never answered /healthz"
    );
    (server, dir, format!("http://127.0.0.1:{port}"))
}

/// [`start`], exporting its spans to `collector` every 20 ms.
async fn start_exported(collector: &Collector) -> (Server, tempfile::TempDir, String) {
    let vars = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.base.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "20"),
    ];
    start(&vars).await
}

/// A server that syncs from `stripe`, with `vars`.
async fn start_syncing(
    stripe: &FakeStripe,
    vars: &[(&str, &str)],
) -> (Server, tempfile::TempDir, String) {
    let secret_keys = format!(r#"{{"backend":"{SB_SECRET}"}}"#);
    let mut all = vec![
        ("SUPABASE_SECRET_KEYS", secret_keys.as_str()),
        ("STRIPE_SECRET_KEY", SECRET_KEY),
        ("STRIPE_API_BASE", stripe.base.as_str()),
    ];
    all.extend_from_slice(vars);
    start(&all).await
}

/// [`start_syncing`], exporting its spans to `collector` every 20 ms.
async fn start_syncing_exported(
    stripe: &FakeStripe,
    collector: &Collector,
) -> (Server, tempfile::TempDir, String) {
    let vars = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.base.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "20"),
    ];
    start_syncing(stripe, &vars).await
}

/// A catalogue sync called inside the caller's trace ([`traceparent`]).
async fn sync_traced(base: &str, request_id: &str) {
    let response = reqwest::Client::new()
        .post(format!("{base}{SYNC}"))
        .header("apikey", SB_SECRET)
        .header("traceparent", traceparent())
        .header("x-request-id", request_id)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// Stops the server with SIGTERM (a clean exit) and returns its log.
async fn stop_raw(mut server: Server, dir: &tempfile::TempDir) -> String {
    signal(&server, "TERM");
    assert_eq!(wait_exit(&mut server).await.code(), Some(0));
    std::fs::read_to_string(dir.path().join("server.log")).unwrap()
}

/// Stops the server with SIGTERM (a clean exit) and returns its JSON log lines.
async fn stop(server: Server, dir: &tempfile::TempDir) -> Vec<Value> {
    stop_raw(server, dir)
        .await
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// The field of the line that closes the request `request_id` (the event's, else its span's).
fn response_field(lines: &[Value], request_id: &str, name: &str) -> Option<Value> {
    let line = lines
        .iter()
        .find(|line| line["span"]["request_id"] == request_id && line.get("status").is_some())
        .unwrap_or_else(|| panic!("no response line for {request_id}: {lines:#?}"));
    line.get(name).or_else(|| line["span"].get(name)).cloned()
}

/// A counter of `/metrics`.
async fn metric(base: &str, name: &str) -> u64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} is not on /metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn the_server_span_continues_the_callers_trace_with_http_and_credential_attributes() {
    let collector = Collector::start(false).await;
    let key = SigningKey::generate(Alg::ES256).unwrap();
    let jwks = key.public_jwks().to_string();
    let claims = user_claims("supabase", "authenticated", "user-1", now_ms() / 1000, 3600);
    let token = key.token(&claims).unwrap();
    let (server, dir, base) = start(&[
        ("SUPABASE_JWKS", jwks.as_str()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.base.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "20"),
        ("OTEL_SERVICE_NAME", "edgegate-under-test"),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=prod,service.name=loses,team=a%2Cb",
        ),
    ])
    .await;

    let response = reqwest::Client::new()
        .get(format!("{base}{JWT_TEST}"))
        .bearer_auth(&token)
        .header("traceparent", traceparent())
        .header("tracestate", "vendor=opaque")
        .header("x-request-id", "otel-jwt-test")
        .header("user-agent", "trace-test/1.0")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let name = format!("GET {JWT_TEST}");
    let span = collector.span(|span| span.name == name).await;
    assert_eq!(hex(&span.trace_id), TRACE_ID, "the caller's trace goes on");
    assert_eq!(
        hex(&span.parent_span_id),
        PARENT_ID,
        "the caller's span is the parent"
    );
    assert_eq!(span.kind, SpanKind::Server as i32);
    let expected = [
        ("http.request.method", "GET"),
        ("http.route", JWT_TEST),
        ("http.response.status_code", "200"),
        ("url.scheme", "http"),
        ("server.address", "127.0.0.1"),
        ("user_agent.original", "trace-test/1.0"),
        ("request_id", "otel-jwt-test"),
        ("edgegate.credential.source", "signing_key"),
        ("edgegate.credential.kid", key.kid()),
    ];
    for (key, value) in expected {
        assert_eq!(
            attribute(&span.attributes, key).as_deref(),
            Some(value),
            "{key}: {span:#?}"
        );
    }
    let resource = collector.requests()[0].resource_spans[0]
        .resource
        .clone()
        .unwrap();
    // OTEL_SERVICE_NAME wins over a service.name in OTEL_RESOURCE_ATTRIBUTES, whose values
    // are percent-decoded.
    for (key, value) in [
        ("service.name", "edgegate-under-test"),
        ("deployment.environment", "prod"),
        ("team", "a,b"),
    ] {
        assert_eq!(
            attribute(&resource.attributes, key).as_deref(),
            Some(value),
            "{key}: {resource:#?}"
        );
    }
    assert!(metric(&base, "edgegate_otel_spans_exported_total").await >= 1);

    // Without a caller's trace: a new one, whose id the log line carries too.
    let response = reqwest::Client::new()
        .get(format!("{base}{JWT_TEST}"))
        .bearer_auth(&token)
        .header("x-request-id", "otel-new-trace")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let root = collector
        .span(|span| attribute(&span.attributes, "request_id").as_deref() == Some("otel-new-trace"))
        .await;
    assert!(root.parent_span_id.is_empty(), "{root:#?}");
    assert_ne!(hex(&root.trace_id), TRACE_ID);

    let lines = stop(server, &dir).await;
    assert_eq!(
        response_field(&lines, "otel-jwt-test", "trace_id"),
        Some(Value::from(TRACE_ID)),
        "the log line carries the trace id"
    );
    assert_eq!(
        response_field(&lines, "otel-new-trace", "trace_id"),
        Some(Value::from(hex(&root.trace_id))),
        "the log line carries the new trace's id"
    );
    let signature = token.rsplit('.').next().unwrap();
    collector.assert_never_holds(&[token.as_str(), signature]);
}

/// What a client sends is bounded in a span: a span queued for a collector that does not answer
/// must not keep a client's 60 KiB header.
#[tokio::test]
async fn header_values_in_a_span_are_cut_to_a_bounded_length() {
    let collector = Collector::start(false).await;
    let (server, dir, base) = start_exported(&collector).await;
    let agent = format!("long-agent/{}", "a".repeat(16_000));
    let host = format!("{}.example:8080", "h".repeat(4000));
    // 20 members of 60 bytes: past the 512 characters W3C lets a tracer discard.
    let tracestate = (0..20)
        .map(|n| format!("v{n:02}={}", "o".repeat(56)))
        .collect::<Vec<_>>()
        .join(",");
    let response = reqwest::Client::new()
        .get(format!("{base}/healthz"))
        .header("traceparent", traceparent())
        .header("tracestate", &tracestate)
        .header("host", &host)
        .header("user-agent", &agent)
        .header("x-request-id", "otel-long-headers")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let span = collector
        .span(|span| {
            attribute(&span.attributes, "request_id").as_deref() == Some("otel-long-headers")
        })
        .await;
    let kept = attribute(&span.attributes, "user_agent.original").unwrap();
    assert!(
        kept.len() <= 256 && agent.starts_with(&kept),
        "{} bytes",
        kept.len()
    );
    assert!(kept.len() > 200, "{} bytes", kept.len());
    let kept = attribute(&span.attributes, "server.address").unwrap();
    assert!(
        kept.len() <= 256 && host.starts_with(&kept),
        "{} bytes",
        kept.len()
    );
    assert_eq!(span.trace_state, "", "{} bytes", span.trace_state.len());
    assert_eq!(
        hex(&span.trace_id),
        TRACE_ID,
        "the trace goes on without its state"
    );
    stop(server, &dir).await;
}

#[tokio::test]
async fn a_sync_carries_the_requests_trace_to_stripe_in_a_client_span() {
    let fixtures = stripe_fixtures!();
    let stripe = FakeStripe::start(&fixtures, 3, 3).await;
    let collector = Collector::start(false).await;
    let (server, dir, base) = start_syncing_exported(&stripe, &collector).await;
    sync_traced(&base, "traced-sync").await;

    let sent = stripe.traceparents();
    assert!(!sent.is_empty(), "Stripe was never called");
    let server_span = collector
        .span(|span| span.name == format!("POST {SYNC}"))
        .await;
    for traceparent in &sent {
        let traceparent = traceparent
            .as_deref()
            .expect("every call carries traceparent");
        let parts: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(parts.len(), 4, "{traceparent}");
        assert_eq!(parts[1], TRACE_ID, "Stripe sees the request's trace");
        // The client span's own id: a child of the server span, not the caller's span.
        let client = collector.span(|span| hex(&span.span_id) == parts[2]).await;
        assert_eq!(client.kind, SpanKind::Client as i32);
        assert_eq!(client.parent_span_id, server_span.span_id);
        assert_eq!(
            attribute(&client.attributes, "http.response.status_code").as_deref(),
            Some("200")
        );
    }
    stop(server, &dir).await;
    collector.assert_never_holds(&[SECRET_KEY, SB_SECRET]);
}

/// OpenTelemetry's HTTP conventions: a request no route matched has no `http.route` and is named
/// by its method alone; an unknown method is `_OTHER` with the method sent kept in
/// `http.request.method_original`; a 5xx server span has `error.type`, its status code; and an
/// outbound call made without a caller's `tracestate` carries none (not an empty one).
#[tokio::test]
async fn server_spans_follow_the_http_conventions_for_no_route_unknown_methods_and_5xx() {
    let fixtures = stripe_fixtures!();
    let stripe = FakeStripe::start(&fixtures, 3, 3).await;
    let collector = Collector::start(false).await;
    let (server, dir, base) = start_syncing_exported(&stripe, &collector).await;
    let client = reqwest::Client::new();
    let by_id = |id: &'static str| {
        move |span: &Span| attribute(&span.attributes, "request_id").as_deref() == Some(id)
    };

    let response = client
        .get(format!("{base}/no/such/path"))
        .header("x-request-id", "no-route")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let span = collector.span(by_id("no-route")).await;
    assert_eq!(span.name, "GET", "{span:#?}");
    assert_eq!(attribute(&span.attributes, "http.route"), None, "{span:#?}");

    let response = client
        .request(
            reqwest::Method::from_bytes(b"PURGE").unwrap(),
            format!("{base}/healthz"),
        )
        .header("x-request-id", "odd-method")
        .send()
        .await
        .unwrap();
    assert!(response.status().is_client_error());
    let span = collector.span(by_id("odd-method")).await;
    assert_eq!(
        attribute(&span.attributes, "http.request.method").as_deref(),
        Some("_OTHER")
    );
    assert_eq!(
        attribute(&span.attributes, "http.request.method_original").as_deref(),
        Some("PURGE"),
        "{span:#?}"
    );
    assert!(span.name.starts_with("HTTP"), "{span:#?}");

    // No STRIPE_WEBHOOK_SECRET: 503.
    let response = client
        .post(format!("{base}/functions/v1/stripe-webhook"))
        .header("x-request-id", "server-error")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let span = collector.span(by_id("server-error")).await;
    assert_eq!(span.status.clone().map(|status| status.code), Some(2));
    assert_eq!(
        attribute(&span.attributes, "error.type").as_deref(),
        Some("503"),
        "{span:#?}"
    );

    sync_traced(&base, "no-tracestate").await;
    let sent = stripe.tracestates();
    assert!(!sent.is_empty(), "Stripe was never called");
    assert!(
        sent.iter().all(Option::is_none),
        "a tracestate went out though the caller sent none: {sent:?}"
    );
    stop(server, &dir).await;
}

/// A call Stripe answers with an error is a client span with an error status (OpenTelemetry's
/// HTTP conventions: a client span is an error on a 4xx or a 5xx), and `error.type` its status;
/// the retries it answers 200 leave the status unset.
#[tokio::test]
async fn a_call_stripe_answers_with_an_error_ends_its_client_span_with_an_error_status() {
    let fixtures = stripe_fixtures!();
    let stripe = FakeStripe::start(&fixtures, 3, 3).await;
    // Both retried: the sync still succeeds.
    stripe.fault_at(0, crate::fake_stripe::Fault::ServerError(None));
    stripe.fault_at(1, crate::fake_stripe::Fault::TooMany(None));
    let collector = Collector::start(false).await;
    let (server, dir, base) = start_syncing_exported(&stripe, &collector).await;
    sync_traced(&base, "failed-call").await;

    let status_code = |span: &Span| attribute(&span.attributes, "http.response.status_code");
    for failed in ["500", "429"] {
        let client = collector
            .span(|span| status_code(span).as_deref() == Some(failed))
            .await;
        assert_eq!(client.kind, SpanKind::Client as i32, "{failed}");
        let status = client.status.clone().expect("a span status");
        assert_eq!(status.code, 2, "{failed}: an error status: {status:?}");
        assert_eq!(
            attribute(&client.attributes, "error.type").as_deref(),
            Some(failed)
        );
    }
    let answered = collector
        .span(|span| {
            span.kind == SpanKind::Client as i32 && status_code(span).as_deref() == Some("200")
        })
        .await;
    assert_eq!(answered.status.map_or(0, |status| status.code), 0);
    assert_eq!(attribute(&answered.attributes, "error.type"), None);
    stop(server, &dir).await;
}

/// `OTEL_PROPAGATORS=none`: a caller's `traceparent` is not followed (each request starts a
/// trace of its own) and outbound calls carry none, while spans are still exported.
#[tokio::test]
async fn with_otel_propagators_none_no_trace_context_is_read_or_sent() {
    let fixtures = stripe_fixtures!();
    let stripe = FakeStripe::start(&fixtures, 3, 3).await;
    let collector = Collector::start(false).await;
    let (server, dir, base) = start_syncing(
        &stripe,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.base.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "20"),
            ("OTEL_PROPAGATORS", "none"),
        ],
    )
    .await;
    sync_traced(&base, "unpropagated-sync").await;

    let server_span = collector
        .span(|span| span.name == format!("POST {SYNC}"))
        .await;
    assert_ne!(
        hex(&server_span.trace_id),
        TRACE_ID,
        "the caller's trace was followed"
    );
    assert!(server_span.parent_span_id.is_empty(), "a root span");
    let sent = stripe.traceparents();
    assert!(!sent.is_empty(), "Stripe was never called");
    assert!(
        sent.iter().all(Option::is_none),
        "a traceparent sent with propagation off: {sent:?}"
    );
    stop(server, &dir).await;
}

/// `RUST_LOG` decides what the logs keep, not what is traced: the request and client spans are
/// `info` spans, and a filter that keeps only warnings must not take them from the traces.
#[tokio::test]
async fn a_log_filter_that_keeps_only_warnings_takes_nothing_from_the_traces() {
    let fixtures = stripe_fixtures!();
    let stripe = FakeStripe::start(&fixtures, 3, 3).await;
    let collector = Collector::start(false).await;
    let (server, dir, base) = start_syncing(
        &stripe,
        &[
            ("RUST_LOG", "warn"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.base.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "20"),
        ],
    )
    .await;
    sync_traced(&base, "quiet-sync").await;

    let server_span = collector
        .span(|span| span.name == format!("POST {SYNC}"))
        .await;
    assert_eq!(hex(&server_span.trace_id), TRACE_ID);
    assert_eq!(
        attribute(&server_span.attributes, "request_id").as_deref(),
        Some("quiet-sync")
    );
    let sent = stripe.traceparents();
    assert!(!sent.is_empty(), "Stripe was never called");
    let traceparent = sent[0].as_deref().expect("the call carries traceparent");
    let client_id = traceparent.split('-').nth(2).unwrap().to_owned();
    let client = collector.span(|span| hex(&span.span_id) == client_id).await;
    assert_eq!(client.parent_span_id, server_span.span_id);
    // And the logs still keep only warnings.
    let lines = stop(server, &dir).await;
    assert!(
        lines.iter().all(|line| line["level"] != "INFO"),
        "an info line under RUST_LOG=warn: {lines:#?}"
    );
}

#[tokio::test]
async fn spans_go_as_protobuf_with_the_configured_headers_and_a_throttled_export_is_retried() {
    const COLLECTOR_SECRET: &str = "collector-secret-3f9a";
    let throttled = (
        StatusCode::SERVICE_UNAVAILABLE,
        [("retry-after", "0")],
        "busy",
    )
        .into_response();
    let collector = Collector::answering(
        false,
        vec![throttled, StatusCode::BAD_GATEWAY.into_response()],
    )
    .await;
    let authorization = format!("authorization=Bearer {COLLECTOR_SECRET}");
    let (server, dir, base) = start(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.base.as_str()),
        ("OTEL_EXPORTER_OTLP_HEADERS", authorization.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "20"),
    ])
    .await;
    let response = reqwest::Client::new()
        .get(format!("{base}/healthz"))
        .header("x-request-id", "otel-retried")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // Refused twice (503 with Retry-After, then 502), taken the third time.
    let span = collector
        .span(|span| attribute(&span.attributes, "request_id").as_deref() == Some("otel-retried"))
        .await;
    assert_eq!(span.kind, SpanKind::Server as i32);
    let posts = collector.shared.posts.lock().unwrap().clone();
    assert!(posts.len() >= 3, "{} POSTs", posts.len());
    for (sent, body) in &posts[..3] {
        assert_eq!(body, &posts[0].1, "a retry sends the same spans");
        assert_eq!(sent["content-type"], "application/x-protobuf");
        assert_eq!(
            sent["authorization"],
            format!("Bearer {COLLECTOR_SECRET}").as_str()
        );
    }
    assert!(metric(&base, "edgegate_otel_spans_exported_total").await >= 1);
    assert_eq!(
        metric(&base, "edgegate_otel_spans_export_failed_total").await,
        0
    );
    let log = stop_raw(server, &dir).await;
    assert!(
        !log.contains(COLLECTOR_SECRET),
        "the collector's credential is in the log"
    );
}

/// A `Retry-After` past any deadline (u64::MAX seconds) costs that export only: the exporter
/// gives it up, counted, and exports the next spans (adding the wait to the clock overflowed,
/// and the panic ended the exporter's task: every later span was lost).
#[tokio::test]
async fn a_collector_asking_for_an_endless_wait_costs_one_export_only() {
    let endless = (
        StatusCode::TOO_MANY_REQUESTS,
        [("retry-after", "18446744073709551615")],
        "later",
    )
        .into_response();
    let collector = Collector::answering(false, vec![endless]).await;
    let (server, dir, base) = start_exported(&collector).await;
    let client = reqwest::Client::new();
    let healthz = |id: &'static str| {
        client
            .get(format!("{base}/healthz"))
            .header("x-request-id", id)
            .send()
    };
    assert_eq!(healthz("otel-endless").await.unwrap().status(), 200);
    // Its span, and the span of the /metrics read polling for the count if that read came
    // before the batch went (a CI run counted 2).
    let failed = export_failures(&base).await;
    assert!((1..=2).contains(&failed), "{failed} spans failed");
    assert_eq!(healthz("otel-after").await.unwrap().status(), 200);
    collector
        .span(|span| attribute(&span.attributes, "request_id").as_deref() == Some("otel-after"))
        .await;
    stop_raw(server, &dir).await;
}

/// `edgegate_otel_spans_export_failed_total` once it is above zero (polled for 5 s at most).
async fn export_failures(base: &str) -> u64 {
    let mut failed = 0;
    for _ in 0..100 {
        failed = metric(base, "edgegate_otel_spans_export_failed_total").await;
        if failed > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    failed
}

#[tokio::test]
async fn a_collector_that_refuses_the_spans_costs_them_counted_and_is_not_retried() {
    let collector = Collector::answering(
        false,
        vec![(StatusCode::BAD_REQUEST, "malformed").into_response()],
    )
    .await;
    let (server, dir, base) = start_exported(&collector).await;
    let response = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(response.status(), 200);
    let failed = export_failures(&base).await;
    assert!(failed >= 1, "the refused span was not counted as lost");
    let posts = collector.shared.posts.lock().unwrap().clone();
    let refused = &posts[0].1;
    assert_eq!(
        posts.iter().filter(|(_, body)| body == refused).count(),
        1,
        "a 400 was retried"
    );
    let lines = stop(server, &dir).await;
    assert!(
        lines.iter().any(|line| line["level"] == "WARN"
            && line["error"] == "the collector answered 400 Bad Request: malformed"),
        "no warning says why the spans were lost"
    );
}

/// A collector that refuses batch after batch is logged once when it starts (why, as before),
/// then at most once a minute, and once when exports work again: every failed batch was a
/// warning of its own (16 in 6 s at a 200 ms delay, some 720 an hour at the default).
#[tokio::test]
async fn a_collector_outage_is_logged_once_and_when_it_ends_not_per_batch() {
    let refusals = (0..40)
        .map(|_| (StatusCode::BAD_REQUEST, "malformed").into_response())
        .collect();
    let collector = Collector::answering(false, refusals).await;
    let (server, dir, base) = start_exported(&collector).await;
    // A span every 30 ms until the collector has refused 40 batches and taken one.
    let client = reqwest::Client::new();
    for _ in 0..400 {
        client.get(format!("{base}/healthz")).send().await.unwrap();
        if !collector.spans().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(
        !collector.spans().is_empty(),
        "the collector never took spans"
    );
    assert!(export_failures(&base).await >= 10);
    let lines = stop(server, &dir).await;
    let messages: Vec<&str> = lines
        .iter()
        .filter(|line| line["level"] == "WARN" || line["level"] == "INFO")
        .filter_map(|line| line["message"].as_str())
        .filter(|message| message.starts_with("trace export"))
        .collect();
    assert_eq!(
        messages,
        [
            "trace export failed; the spans are lost",
            "trace export works again"
        ],
        "{lines:#?}"
    );
    let recovered = lines
        .iter()
        .find(|line| line["message"] == "trace export works again")
        .unwrap();
    assert_eq!(recovered["batches_lost"], 40, "{recovered}");
    assert!(
        recovered["spans_lost"].as_u64().unwrap() >= 40,
        "{recovered}"
    );
}

/// A failed export says why: what a collector that refuses the spans put in its answer (OTLP's
/// `google.rpc.Status`, its message), or why it could not be reached; and the start says where
/// spans go (without the endpoint's query).
#[tokio::test]
async fn a_failed_export_says_why_in_the_collectors_words_or_the_connections() {
    // google.rpc.Status { code: 3, message: "…" }, as an OTLP/HTTP collector answers a 400.
    let reason = "span 1: trace_id is not 16 bytes";
    let mut status = vec![0x08, 0x03, 0x12, reason.len() as u8];
    status.extend_from_slice(reason.as_bytes());
    let refusal = (
        StatusCode::BAD_REQUEST,
        [("content-type", "application/x-protobuf")],
        status,
    )
        .into_response();
    let collector = Collector::answering(false, vec![refusal]).await;
    let (server, dir, base) = start_exported(&collector).await;
    reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert!(export_failures(&base).await >= 1);
    let lines = stop(server, &dir).await;
    let failed = |lines: &[Value]| {
        lines
            .iter()
            .find(|line| {
                line["level"] == "WARN"
                    && line["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("trace export failed"))
            })
            .map(|line| line["error"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_else(|| panic!("no warning of a failed export: {lines:#?}"))
    };
    assert_eq!(
        failed(&lines),
        format!("the collector answered 400 Bad Request: {reason}")
    );
    let started = lines
        .iter()
        .find(|line| line["message"] == "exporting traces over OTLP")
        .unwrap_or_else(|| panic!("no line says spans are exported: {lines:#?}"));
    assert_eq!(started["endpoint"], format!("{}/v1/traces", collector.base));

    // Nothing listens there.
    let endpoint = format!(
        "http://127.0.0.1:{}/v1/traces?api_key=QUERYOTLPKEY",
        free_port()
    );
    let (server, dir, base) = start(&[
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "20"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "1000"),
    ])
    .await;
    reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert!(export_failures(&base).await >= 1);
    let log = stop_raw(server, &dir).await;
    assert!(
        !log.contains("QUERYOTLPKEY"),
        "the endpoint's query is in the log"
    );
    let lines: Vec<Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let error = failed(&lines);
    assert!(
        error.starts_with("the collector could not be reached: ")
            && error.contains("Connection refused"),
        "{error}"
    );
}

/// `check` reaches the collector with an empty export, as spans would go (its headers, never
/// printed), and fails when it cannot or is refused.
#[tokio::test]
async fn check_reaches_the_collector_with_its_headers_and_fails_when_refused() {
    const COLLECTOR_SECRET: &str = "collector-secret-c4e1";
    let refusal = (StatusCode::UNAUTHORIZED, "invalid API key").into_response();
    let collector = Collector::answering(false, vec![refusal]).await;
    let headers = format!("authorization=Bearer {COLLECTOR_SECRET}");
    let check = |endpoint: String| {
        let headers = headers.clone();
        async move {
            // The collector answers on this test's runtime while the command runs.
            let out = tokio::task::spawn_blocking(move || {
                let dir = tempfile::tempdir().unwrap();
                let vars = [
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
                    ("OTEL_EXPORTER_OTLP_HEADERS", headers.as_str()),
                ];
                crate::process::output(crate::process::edgegate(dir.path(), &vars).arg("check"))
            })
            .await
            .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(!stdout.contains(COLLECTOR_SECRET), "{stdout}");
            let line = stdout
                .lines()
                .find(|line| line[4..].trim_start().starts_with("traces"))
                .unwrap_or_else(|| panic!("no traces line: {stdout}"))
                .to_owned();
            (out.status.code(), line)
        }
    };

    let (code, line) = check(collector.base.clone()).await;
    assert_eq!(code, Some(1), "{line}");
    assert!(
        line.starts_with("FAIL") && line.contains("401 Unauthorized: invalid API key"),
        "{line}"
    );
    let (code, line) = check(collector.base.clone()).await;
    assert_eq!(code, Some(0), "{line}");
    assert!(
        line.starts_with("ok") && line.contains(&format!("{}/v1/traces", collector.base)),
        "{line}"
    );
    let posts = collector.shared.posts.lock().unwrap().clone();
    assert_eq!(posts.len(), 2);
    for (sent, body) in &posts {
        assert_eq!(
            sent["authorization"],
            format!("Bearer {COLLECTOR_SECRET}").as_str()
        );
        let request = ExportTraceServiceRequest::decode(body.as_ref()).unwrap();
        assert!(request.resource_spans.is_empty(), "{request:?}");
    }

    let (code, line) = check(format!("http://127.0.0.1:{}", free_port())).await;
    assert_eq!(code, Some(1), "{line}");
    assert!(
        line.starts_with("FAIL") && line.contains("Connection refused"),
        "{line}"
    );
}

/// A collector that redirects is not followed: reqwest drops only the standard credential
/// headers on a redirect to another host, so the collector's own (`OTEL_EXPORTER_OTLP_HEADERS`),
/// the spans, and a Referer naming the endpoint with its query went wherever a 307 pointed. The
/// export fails, counted, and the other host sees nothing.
#[tokio::test]
async fn a_collector_that_redirects_is_not_followed() {
    let elsewhere = Collector::start(false).await;
    let location = format!(
        "{}/v1/traces",
        elsewhere.base.replace("127.0.0.1", "localhost")
    );
    let redirect = || {
        (
            StatusCode::TEMPORARY_REDIRECT,
            [(axum::http::header::LOCATION, location.clone())],
        )
            .into_response()
    };
    let collector = Collector::answering(false, (0..20).map(|_| redirect()).collect()).await;
    let endpoint = format!("{}/v1/traces?api_key=QUERYOTLPKEY", collector.base);
    let (server, dir, base) = start(&[
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint.as_str()),
        (
            "OTEL_EXPORTER_OTLP_HEADERS",
            "x-honeycomb-team=HONEYCOMBKEYVALUE",
        ),
        ("OTEL_BSP_SCHEDULE_DELAY", "20"),
    ])
    .await;
    let response = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(response.status(), 200);
    let failed = export_failures(&base).await;
    stop(server, &dir).await;
    let followed = elsewhere.shared.posts.lock().unwrap().len();
    assert_eq!(followed, 0, "the redirect was followed to another host");
    assert!(failed >= 1, "the redirected export was not counted as lost");
}

#[tokio::test]
async fn without_otel_variables_nothing_is_traced_nor_propagated() {
    let fixtures = stripe_fixtures!();
    let stripe = FakeStripe::start(&fixtures, 3, 3).await;
    let (server, dir, base) = start_syncing(&stripe, &[]).await;
    sync_traced(&base, "untraced-sync").await;

    let sent = stripe.traceparents();
    assert!(!sent.is_empty(), "Stripe was never called");
    assert!(
        sent.iter().all(Option::is_none),
        "a traceparent left without tracing: {sent:?}"
    );
    for counter in [
        "edgegate_otel_spans_exported_total",
        "edgegate_otel_spans_dropped_total",
        "edgegate_otel_spans_export_failed_total",
    ] {
        assert_eq!(metric(&base, counter).await, 0, "{counter}");
    }
    let lines = stop(server, &dir).await;
    assert_eq!(response_field(&lines, "untraced-sync", "trace_id"), None);
    assert_eq!(response_field(&lines, "untraced-sync", "otel.name"), None);
}

#[tokio::test]
async fn a_collector_that_never_answers_costs_counted_spans_not_requests() {
    let collector = Collector::start(true).await;
    let (server, dir, base) = start(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.base.as_str()),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "1"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1"),
        ("OTEL_BSP_SCHEDULE_DELAY", "1"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "3000"),
    ])
    .await;
    // One export in flight (held) and one span queued at most: the rest are dropped.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    const REQUESTS: u64 = 20;
    for _ in 0..REQUESTS {
        let response = client.get(format!("{base}/healthz")).send().await;
        assert_eq!(
            response
                .expect("a held export never holds a request")
                .status(),
            200
        );
    }
    let dropped = metric(&base, "edgegate_otel_spans_dropped_total").await;
    assert!(
        dropped >= REQUESTS - 2,
        "{dropped} spans counted as dropped"
    );
    assert!(!collector.requests().is_empty(), "no export was attempted");
    stop(server, &dir).await;
}

#[tokio::test]
async fn text_log_lines_carry_the_request_id_and_the_trace_id() {
    let collector = Collector::start(false).await;
    let (server, dir, base) = start(&[
        ("LOG_FORMAT", "pretty"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.base.as_str()),
    ])
    .await;
    let response = reqwest::Client::new()
        .get(format!("{base}/healthz"))
        .header("traceparent", traceparent())
        .header("x-request-id", "text-log-line")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let log = stop_raw(server, &dir).await;
    let line = log
        .lines()
        .find(|line| line.contains(r#"request_id="text-log-line""#) && line.contains("response"))
        .unwrap_or_else(|| panic!("no response line:\n{log}"));
    // Quoted, as the request id is: both are text fields.
    assert!(
        line.contains(&format!(r#"trace_id="{TRACE_ID}""#)),
        "{line}"
    );
}

/// A request the client gives up on (here an HTTP/1.1 hang-up while the sync waits on Stripe)
/// is still seen: a `request cancelled` line with its id and status 499, a server span with an
/// error status, and a 499 in the metrics.
#[tokio::test]
async fn a_request_the_client_gives_up_on_is_logged_traced_and_counted_as_cancelled() {
    let fixtures = stripe_fixtures!();
    let stripe = FakeStripe::start(&fixtures, 3, 3).await;
    stripe.fault_at(0, crate::fake_stripe::Fault::Hold);
    let collector = Collector::start(false).await;
    let (server, dir, base) = start_syncing_exported(&stripe, &collector).await;
    let request = tokio::spawn({
        let url = format!("{base}{SYNC}");
        async move {
            reqwest::Client::new()
                .post(url)
                .header("apikey", SB_SECRET)
                .header("x-request-id", "given-up")
                .send()
                .await
        }
    });
    tokio::time::timeout(Duration::from_secs(10), stripe.arrived())
        .await
        .expect("the sync reached Stripe");
    tokio::time::sleep(Duration::from_millis(100)).await;
    request.abort();

    let series =
        format!(r#"edgegate_http_requests_total{{method="POST",route="{SYNC}",status="499"}}"#);
    // The hang-up reaches the server a moment after the abort: until then the series is absent.
    for _ in 0..250 {
        let text = reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains(&series) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(&base, &series).await, 1);
    // The sync goes on in a task of its own (the webhook's and the sync's writes are not cut
    // short), which holds the span: it ends, and is exported, when the sync does.
    stripe.release();
    let span = tokio::time::timeout(
        Duration::from_secs(10),
        collector.span(|span| span.name == format!("POST {SYNC}")),
    )
    .await
    .expect("the cancelled request's span is exported");
    let status = span.status.clone().expect("a span status");
    assert_eq!(status.code, 2, "an error status: {status:?}");
    assert_eq!(
        attribute(&span.attributes, "error.type").as_deref(),
        Some("cancelled")
    );
    let lines = stop(server, &dir).await;
    let line = lines
        .iter()
        .find(|line| line["message"] == "request cancelled")
        .unwrap_or_else(|| panic!("no request cancelled line: {lines:#?}"));
    assert_eq!(line["span"]["request_id"], "given-up", "{line}");
    assert_eq!(line["status"], 499, "{line}");
}
