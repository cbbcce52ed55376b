//! The HTTP skeleton: health endpoints, errors, and each middleware behaviour, over real TCP.

use std::time::Duration;

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use edgegate::body::RawBody;
use edgegate::server::middleware::Limits;
use edgegate::{AppState, routes};
use serde_json::Value;

use crate::support::{TestServer, serve, spawn_app};
use crate::test_db;

async fn json(response: reqwest::Response) -> Value {
    response.json().await.expect("a JSON body")
}

/// The real routes plus a few that exercise the middleware.
fn test_router() -> Router<AppState> {
    routes::router()
        .route(
            "/test/echo",
            post(|RawBody(body): RawBody| async move { body }),
        )
        .route(
            "/test/panic",
            get(|| async {
                panic!("boom");
                #[allow(unreachable_code)]
                ""
            }),
        )
        .route(
            "/test/slow",
            get(|| async { std::future::pending::<&str>().await }),
        )
        .route(
            "/test/authorization-debug",
            get(|headers: HeaderMap| async move { format!("{:?}", headers.get("authorization")) }),
        )
}

pub async fn test_server(limits: Limits, vars: &[(&str, &str)]) -> Option<TestServer> {
    let db = crate::support::TestDb::new().await?;
    let state = AppState::new(db.config(vars), db.store().await);
    // The server owns the database: a SQLite file's folder goes when its `TestDb` does.
    let server = serve(test_router(), &state, limits, Duration::from_secs(1)).await;
    Some(server.owning(db))
}

/// Counters whose labels are known in advance are on `/metrics` at 0 from the start: a series
/// that first appears at 1 is not counted by Prometheus' `increase()` or `rate()`, so the first
/// sync, webhook delivery, reconciliation or refused credential of a process went unseen.
#[tokio::test]
async fn event_counters_are_on_metrics_at_zero_before_their_first_event() {
    let db = test_db!();
    let (server, _) = spawn_app(&db, &[]).await;
    let text = server.get("/metrics").await.text().await.unwrap();
    for series in [
        r#"edgegate_stripe_sync_runs_total{started_by="manual",outcome="ok"} 0"#,
        r#"edgegate_stripe_sync_runs_total{started_by="periodic",outcome="upstream_error"} 0"#,
        r#"edgegate_stripe_reconcile_runs_total{started_by="periodic",outcome="ok"} 0"#,
        r#"edgegate_stripe_reconcile_runs_total{started_by="manual",outcome="error"} 0"#,
        r#"edgegate_stripe_reconcile_events_total{result="applied"} 0"#,
        r#"edgegate_stripe_reconcile_events_total{result="ignored"} 0"#,
        r#"edgegate_stripe_webhook_events_total{event_type="invoice.paid",outcome="applied"} 0"#,
        r#"edgegate_stripe_webhook_events_total{event_type="other",outcome="duplicate"} 0"#,
        r#"edgegate_stripe_webhook_events_total{event_type="unknown",outcome="invalid_signature"} 0"#,
        r#"edgegate_legacy_verifications_total{kind="anon_key"} 0"#,
        r#"edgegate_legacy_verifications_total{kind="user_session"} 0"#,
        r#"edgegate_credential_verifications_total{source="none",kid="unknown",alg="unknown",outcome="UNAUTHORIZED_NO_AUTH_HEADER"} 0"#,
        r#"edgegate_credential_verifications_total{source="legacy_secret",kid="unknown",alg="unknown",outcome="UNAUTHORIZED_LEGACY_JWT"} 0"#,
    ] {
        assert!(
            text.lines().any(|line| line == series),
            "{series} is not on /metrics:\n{text}"
        );
    }
    // Only what can be counted: a refused delivery's type is never read.
    assert!(
        !text.contains(r#"event_type="invoice.paid",outcome="invalid_signature""#),
        "{text}"
    );
}

#[tokio::test]
async fn healthz_and_readyz_answer_200_on_a_fresh_database() {
    let db = test_db!();
    let (server, _) = spawn_app(&db, &[]).await;
    let health = server.get("/healthz").await;
    assert_eq!(health.status(), 200);
    assert_eq!(json(health).await["status"], "ok");
    let ready = server.get("/readyz").await;
    assert_eq!(ready.status(), 200);
    let body = json(ready).await;
    assert_eq!(body["checks"]["database"]["ok"], true);
    let backend = if db.is_postgres() {
        "postgres"
    } else {
        "sqlite"
    };
    assert_eq!(body["checks"]["database"]["backend"], backend);
}

#[tokio::test]
async fn readyz_answers_503_when_the_database_is_gone() {
    let db = test_db!();
    let (server, state) = spawn_app(&db, &[]).await;
    state.store.close().await;
    let ready = server.get("/readyz").await;
    assert_eq!(ready.status(), 503);
    let body = json(ready).await;
    assert_eq!(body["code"], "NOT_READY");
    assert_eq!(body["checks"]["database"]["ok"], false);
    let health = server.get("/healthz").await;
    assert_eq!(
        health.status(),
        200,
        "liveness must not depend on the database"
    );
}

/// Concurrent `/readyz` callers share one database probe, and an answer is reused for a second:
/// each request spawned its own probe (a pooled connection and, on SQLite, the write lock, kept
/// after its caller hung up), so a client that asked, or reset, many at once starved the writes.
#[tokio::test]
async fn concurrent_readyz_requests_share_one_database_probe() {
    let db = test_db!();
    let (server, state) = spawn_app(&db, &[]).await;
    let requests = 100;
    let started = std::time::Instant::now();
    let answers =
        futures_util::future::join_all((0..requests).map(|_| server.get("/readyz"))).await;
    let elapsed = started.elapsed();
    let statuses: Vec<u16> = answers.iter().map(|r| r.status().as_u16()).collect();
    assert!(statuses.iter().all(|&status| status == 200), "{statuses:?}");
    let probes = state.store.readiness_probes_started();
    eprintln!("{requests} /readyz in {elapsed:?} started {probes} probes");
    // At most one probe runs at a time, and each answer serves a second after it came.
    assert!(
        probes >= 1 && probes <= elapsed.as_secs() + 2,
        "{probes} probes for {requests} requests in {elapsed:?}"
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json_errors() {
    let db = test_db!();
    let (server, _) = spawn_app(&db, &[]).await;
    let missing = server.get("/functions/v1/nope").await;
    assert_eq!(missing.status(), 404);
    let body = json(missing).await;
    assert_eq!(body["code"], "NOT_FOUND");
    assert_eq!(body["message"], "no route for /functions/v1/nope");
    // A token or key put in the path by mistake is not sent back.
    let token = "eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCJ9.eyJyb2xlIjoiYW5vbiJ9.c2lnbmF0dXJl";
    for (path, said) in [
        (
            format!("/functions/v1/{token}"),
            "no route for /functions/v1/…",
        ),
        ("/x/sb_secret_AAAAbbbb/y".to_owned(), "no route for /x/…/y"),
        // A Twilio auth token: 32 hex digits.
        (
            "/functions/v1/0123456789abcdef0123456789abcdef".to_owned(),
            "no route for /functions/v1/…",
        ),
        // The longest segment of a route is still named.
        (
            "/functions/v2/sync-stripe-products-hardened".to_owned(),
            "no route for /functions/v2/sync-stripe-products-hardened",
        ),
    ] {
        let missing = server.get(&path).await;
        assert_eq!(missing.status(), 404);
        assert_eq!(json(missing).await["message"], said, "{path}");
    }
    let wrong = server
        .client
        .delete(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 405);
    let body = json(wrong).await;
    assert_eq!(body["code"], "METHOD_NOT_ALLOWED");
    assert!(body["message"].is_string());
}

#[tokio::test]
async fn request_ids_are_set_and_propagated() {
    let Some(server) = test_server(Limits::default(), &[]).await else {
        return;
    };
    let first = server.get("/healthz").await;
    let generated = first.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&generated).is_ok(), "{generated}");
    let second = server.get("/healthz").await;
    assert_ne!(
        second.headers()["x-request-id"].to_str().unwrap(),
        generated
    );
    let given = server
        .client
        .get(server.url("/healthz"))
        .header("x-request-id", "from-the-caller-42")
        .send()
        .await
        .unwrap();
    assert_eq!(given.headers()["x-request-id"], "from-the-caller-42");
}

#[tokio::test]
async fn credentials_are_marked_sensitive_before_anything_logs_them() {
    let Some(server) = test_server(Limits::default(), &[]).await else {
        return;
    };
    let shown = server
        .client
        .get(server.url("/test/authorization-debug"))
        .bearer_auth("eyJhbGciOiJIUzI1NiJ9.secret.token")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(shown, "Some(Sensitive)");
}

#[tokio::test]
async fn a_panicking_handler_answers_500_json_and_the_server_lives_on() {
    let Some(server) = test_server(Limits::default(), &[]).await else {
        return;
    };
    let response = server.get("/test/panic").await;
    assert_eq!(response.status(), 500);
    assert!(response.headers().contains_key("x-request-id"));
    let body = json(response).await;
    assert_eq!(body["code"], "INTERNAL_ERROR");
    assert!(!body["message"].as_str().unwrap().contains("boom"));
    let after = server.get("/healthz").await;
    assert_eq!(after.status(), 200);
}

#[tokio::test]
async fn a_slow_request_times_out_with_json() {
    let limits = Limits {
        timeout: Duration::from_millis(200),
        ..Limits::default()
    };
    let Some(server) = test_server(limits, &[]).await else {
        return;
    };
    let response = server.get("/test/slow").await;
    assert_eq!(response.status(), 504);
    assert_eq!(json(response).await["code"], "TIMEOUT");
}

/// Answers over HTTP/2 arrive whole and with their length, whatever their size (the connection
/// gives each answer's last byte as a chunk of its own).
#[tokio::test]
async fn answers_over_http2_arrive_whole() {
    let Some(server) = test_server(Limits::default(), &[]).await else {
        return;
    };
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for size in [0, 1, 2, 70_000] {
        let sent: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let answer = client
            .post(server.url("/test/echo"))
            .body(sent.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(answer.version(), reqwest::Version::HTTP_2);
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.content_length(), Some(size as u64), "size {size}");
        let received = answer.bytes().await.unwrap();
        assert!(
            received == sent,
            "size {size}: {} bytes back",
            received.len()
        );
    }
}

#[tokio::test]
async fn bodies_over_the_limit_are_refused_with_413_json() {
    let limits = Limits {
        body: 1024,
        ..Limits::default()
    };
    let Some(server) = test_server(limits, &[]).await else {
        return;
    };
    let small = server
        .client
        .post(server.url("/test/echo"))
        .body(vec![b'a'; 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(small.status(), 200);
    assert_eq!(small.bytes().await.unwrap().len(), 1024);

    let declared = server
        .client
        .post(server.url("/test/echo"))
        .body(vec![b'a'; 1025])
        .send()
        .await
        .unwrap();
    assert_eq!(declared.status(), 413);
    assert_eq!(json(declared).await["code"], "PAYLOAD_TOO_LARGE");

    // No Content-Length: the limit must hold while the body streams in.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..8).map(|_| Ok(vec![b'b'; 512])).collect();
    let streamed = server
        .client
        .post(server.url("/test/echo"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 413);
    assert_eq!(json(streamed).await["code"], "PAYLOAD_TOO_LARGE");
}

/// The answers the middleware gives on its own (a timeout, a declared body over the limit, a
/// panic caught, a CORS preflight) are requests answered too, and counted as such.
#[tokio::test]
async fn metrics_count_the_answers_the_middleware_gives_itself() {
    let limits = Limits {
        timeout: Duration::from_millis(200),
        body: 1024,
    };
    let Some(server) = test_server(limits, &[]).await else {
        return;
    };
    assert_eq!(server.get("/test/slow").await.status(), 504);
    assert_eq!(server.get("/test/panic").await.status(), 500);
    let declared = server
        .client
        .post(server.url("/test/echo"))
        .body(vec![b'a'; 1025])
        .send()
        .await
        .unwrap();
    assert_eq!(declared.status(), 413);
    let preflight = server
        .client
        .request(
            reqwest::Method::OPTIONS,
            server.url("/functions/v1/jwt-test"),
        )
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 200);
    let text = server.get("/metrics").await.text().await.unwrap();
    for counted in [
        r#"edgegate_http_requests_total{method="GET",route="/test/slow",status="504"} 1"#,
        r#"edgegate_http_request_duration_seconds_count{method="GET",route="/test/slow",status="504"} 1"#,
        r#"edgegate_http_requests_total{method="GET",route="/test/panic",status="500"} 1"#,
        r#"edgegate_http_requests_total{method="POST",route="/test/echo",status="413"} 1"#,
        r#"edgegate_http_requests_total{method="OPTIONS",route="/functions/v1/jwt-test",status="200"} 1"#,
    ] {
        assert!(text.contains(counted), "{counted} missing from:\n{text}");
    }
}

#[tokio::test]
async fn metrics_count_requests_by_matched_route_and_status() {
    let db = test_db!();
    let (server, _) = spawn_app(&db, &[]).await;
    for _ in 0..3 {
        server.get("/healthz").await;
    }
    server.get("/probe/abc123").await;
    let response = server.get("/metrics").await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(
        text.contains(
            r#"edgegate_http_requests_total{method="GET",route="/healthz",status="200"} 3"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"route="unmatched",status="404"} 1"#),
        "{text}"
    );
    assert!(!text.contains("abc123"), "raw paths must not become labels");
    assert!(
        text.contains(r#"edgegate_http_request_duration_seconds_count{method="GET",route="/healthz",status="200"} 3"#),
        "{text}"
    );
}

/// The families Python's `prometheus_client` reads in `text` with its parser of the Prometheus
/// text format 0.0.4 (`openmetrics = false`) or of OpenMetrics, as `(name, type, samples)`; None
/// (after a notice) when it is not installed, except under CI=true where that fails the test.
fn python_families(text: &str, openmetrics: bool) -> Option<Vec<(String, String, usize)>> {
    const SCRIPT: &str = "import json, sys
try:
    from prometheus_client.parser import text_string_to_metric_families as prometheus
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
except ImportError:
    sys.exit(3)
parse = openmetrics if sys.argv[1] == 'openmetrics' else prometheus
print(json.dumps([[f.name, f.type, len(f.samples)] for f in parse(sys.stdin.read())]))
";
    use std::io::Write as _;
    let format = if openmetrics {
        "openmetrics"
    } else {
        "prometheus"
    };
    let child = std::process::Command::new("python3")
        .args(["-c", SCRIPT, format])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let output = child.and_then(|mut child| {
        child.stdin.take().unwrap().write_all(text.as_bytes())?;
        child.wait_with_output()
    });
    let in_ci = std::env::var("CI").is_ok_and(|value| value == "true");
    match output {
        Ok(out) if out.status.success() => Some(serde_json::from_slice(&out.stdout).unwrap()),
        Ok(out) if out.status.code() == Some(3) && !in_ci => {
            crate::support::skipped("the Python package prometheus_client is not installed");
            None
        }
        Err(err) if !in_ci => {
            crate::support::skipped(&format!("python3 cannot run ({err})"));
            None
        }
        other => panic!("prometheus_client could not parse:\n{text}\n{other:?}"),
    }
}

/// `/metrics` answers the Prometheus text format 0.0.4 (the contract's "Prometheus text format")
/// unless the scraper asks for OpenMetrics, as Prometheus's own scraper does; each is read by
/// Python's `prometheus_client` as what it says it is: every counter a `counter` with its
/// samples, nothing `unknown`.
#[tokio::test]
async fn metrics_are_prometheus_text_unless_openmetrics_is_asked_for() {
    let db = test_db!();
    let (server, _) = spawn_app(&db, &[]).await;
    server.get("/healthz").await;
    let scrape = |accept: Option<&'static str>| {
        let mut request = server.client.get(server.url("/metrics"));
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            let content_type = response.headers()["content-type"]
                .to_str()
                .unwrap()
                .to_owned();
            (content_type, response.text().await.unwrap())
        }
    };
    let mut parsed = std::collections::HashSet::new();
    let prometheus = "text/plain; version=0.0.4; charset=utf-8";
    let openmetrics = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    for (accept, wanted) in [
        (None, prometheus),
        (Some("*/*"), prometheus),
        (Some("text/plain"), prometheus),
        (Some("text/plain; version=0.0.4"), prometheus),
        (Some("application/json, text/*;q=0.5"), prometheus),
        (Some("application/openmetrics-text;q=0, */*"), prometheus),
        (
            Some("text/plain, application/openmetrics-text;q=0.9"),
            prometheus,
        ),
        (Some("application/openmetrics-text"), openmetrics),
        // Prometheus 2's scrape and Prometheus 3's.
        (
            Some(
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
            ),
            openmetrics,
        ),
        (
            Some(
                "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8,application/openmetrics-text;version=0.0.1;q=0.9,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.8,text/plain;version=0.0.4;q=0.7,*/*;q=0.6",
            ),
            openmetrics,
        ),
    ] {
        let (content_type, text) = scrape(accept).await;
        assert_eq!(content_type, wanted, "Accept: {accept:?}");
        let is_openmetrics = wanted == openmetrics;
        assert_eq!(
            text.ends_with("# EOF\n"),
            is_openmetrics,
            "{accept:?}:\n{text}"
        );
        let counted =
            r#"edgegate_http_requests_total{method="GET",route="/healthz",status="200"} 1"#;
        assert!(
            text.lines().any(|line| line == counted),
            "{accept:?}:\n{text}"
        );
        if !is_openmetrics {
            assert!(
                text.lines()
                    .any(|line| line == "# TYPE edgegate_http_requests_total counter"),
                "{accept:?}:\n{text}"
            );
        }
        // Each format is read once (Python takes a while to start).
        if !parsed.insert(wanted) {
            continue;
        }
        // Without the parser (outside CI), the other Accept headers' checks still run.
        let Some(families) = python_families(&text, is_openmetrics) else {
            continue;
        };
        let family = |name: &str| {
            families
                .iter()
                .find(|(family, ..)| family == name)
                .map(|(_, kind, samples)| (kind.as_str(), *samples > 0))
        };
        assert_eq!(
            family("edgegate_http_requests"),
            Some(("counter", true)),
            "{families:?}"
        );
        assert_eq!(
            family("edgegate_http_request_duration_seconds"),
            Some(("histogram", true)),
            "{families:?}"
        );
        assert_eq!(
            family("edgegate_database_ready"),
            Some(("gauge", true)),
            "{families:?}"
        );
        let wrong: Vec<_> = families
            .iter()
            .filter(|(_, kind, samples)| kind == "unknown" || *samples == 0)
            .collect();
        assert!(wrong.is_empty(), "{accept:?}: {wrong:?} in:\n{text}");
    }
}

#[tokio::test]
async fn unauthorized_errors_carry_the_supabase_headers() {
    use axum::response::IntoResponse;
    let response = edgegate::error::ApiError::Unauthorized {
        code: "UNAUTHORIZED_LEGACY_JWT",
        message: "legacy secret revoked".into(),
    }
    .into_response();
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["sb-error-code"],
        "UNAUTHORIZED_LEGACY_JWT"
    );
    assert_eq!(
        response.headers()["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
    let body = axum::body::to_bytes(response.into_body(), 1024)
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["code"], "UNAUTHORIZED_LEGACY_JWT");
    assert_eq!(body["message"], "legacy secret revoked");
}

/// No answer may be kept by a shared cache: a credential sent in `apikey` alone is not one that
/// stops a cache from reusing the answer (RFC 9111 only names `Authorization`), and `Vary` does
/// not name `apikey`: a proxy could hand the admin report to the next caller.
#[tokio::test]
async fn no_answer_may_be_stored_by_a_cache() {
    let db = test_db!();
    let secret = "sb_secret_0123456789abcdefghijklmn";
    let keys = format!(r#"{{"backend":"{secret}"}}"#);
    let (server, _) = spawn_app(&db, &[("SUPABASE_SECRET_KEYS", &keys)]).await;
    let get = |path: &'static str, key: Option<&'static str>| {
        let mut request = server.client.get(server.url(path));
        if let Some(key) = key {
            request = request.header("apikey", key);
        }
        request.send()
    };
    let answers = [
        (
            "/admin/signing-keys",
            get("/admin/signing-keys", Some(secret)).await.unwrap(),
        ),
        (
            "/functions/v1/jwt-test",
            get("/functions/v1/jwt-test", Some(secret)).await.unwrap(),
        ),
        ("401", get("/functions/v1/jwt-test", None).await.unwrap()),
        ("/healthz", get("/healthz", None).await.unwrap()),
        ("404", get("/no/such/route", None).await.unwrap()),
    ];
    for (what, answer) in answers {
        assert_eq!(
            answer
                .headers()
                .get("cache-control")
                .map(|v| v.to_str().unwrap()),
            Some("no-store"),
            "{what}: {}",
            answer.status()
        );
    }
}

/// A request the client gives up on before its answer (an HTTP/1.1 hang-up, an HTTP/2 reset)
/// is counted under status 499, nginx's "client closed request", over both protocols.
#[tokio::test]
async fn a_request_the_client_cancels_is_counted_as_499() {
    use std::sync::Arc;
    use tokio::sync::Notify;

    let db = crate::support::TestDb::sqlite();
    let state = AppState::new(db.config(&[]), db.store().await);
    let entered = Arc::new(Notify::new());
    let router = routes::router().route(
        "/test/endless",
        get({
            let entered = entered.clone();
            move || {
                let entered = entered.clone();
                async move {
                    entered.notify_one();
                    std::future::pending::<()>().await;
                    "never"
                }
            }
        }),
    );
    let server = serve(router, &state, Limits::default(), Duration::from_secs(1)).await;
    for (count, http2) in [(1, false), (2, true)] {
        let client = crate::support::plain_client(http2);
        let request = tokio::spawn({
            let url = server.url("/test/endless");
            async move { client.get(url).send().await }
        });
        tokio::time::timeout(Duration::from_secs(5), entered.notified())
            .await
            .expect("the handler runs");
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The client gives up: its connection closes (HTTP/1.1), its stream is reset (HTTP/2).
        request.abort();
        let wanted = format!(
            r#"edgegate_http_requests_total{{method="GET",route="/test/endless",status="499"}} {count}"#
        );
        let mut metrics = String::new();
        for _ in 0..250 {
            metrics = server.get("/metrics").await.text().await.unwrap();
            if metrics.lines().any(|line| line == wanted) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            metrics.lines().any(|line| line == wanted),
            "http2: {http2}: no {wanted} in:\n{}",
            metrics
                .lines()
                .filter(|line| line.contains("http_requests_total"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// A client that goes away while its body is being read (an HTTP/1.1 hang-up after 3 of its
/// 1000 bytes, an HTTP/2 stream reset after 3) is counted under 499, as a hang-up while the
/// handler runs is, not as an answered 400 (the failed read was taken for a malformed body). A
/// body that is malformed (a chunk size that is not hex) is still 400 `INVALID_REQUEST`.
#[tokio::test]
async fn a_client_that_goes_away_mid_body_is_counted_as_499_and_a_malformed_body_as_400() {
    use crate::h2c::{CANCEL, H2, RST_STREAM};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    let server = test_server(Limits::default(), &[]).await.unwrap();
    let port = server.addr.port();
    let series = |status: u16| {
        format!(
            r#"edgegate_http_requests_total{{method="POST",route="/test/echo",status="{status}"}}"#
        )
    };
    let count = |metrics: &str, status: u16| {
        let series = series(status);
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(&series))
            .map_or(0, |value| value.trim().parse::<u64>().unwrap())
    };

    let mut h1 = TcpStream::connect(server.addr).await.unwrap();
    h1.write_all(b"POST /test/echo HTTP/1.1\r\nHost: edgegate\r\ncontent-length: 1000\r\n\r\nabc")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(h1);
    let mut h2 = H2::connect(port).await;
    h2.request(
        1,
        "POST",
        "/test/echo",
        &[("content-length", "1000")],
        false,
    )
    .await;
    h2.write_frame(0x0, 0, 1, b"abc").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    h2.write_frame(RST_STREAM, 0, 1, &CANCEL.to_be_bytes())
        .await;

    // Both are counted once their reads have failed: until then neither series is there.
    let mut metrics = String::new();
    for _ in 0..250 {
        metrics = server.get("/metrics").await.text().await.unwrap();
        if count(&metrics, 499) + count(&metrics, 400) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        (count(&metrics, 499), count(&metrics, 400)),
        (2, 0),
        "499 and 400 answers to the hang-ups"
    );

    let mut malformed = TcpStream::connect(server.addr).await.unwrap();
    malformed
        .write_all(
            b"POST /test/echo HTTP/1.1\r\nHost: edgegate\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        )
        .await
        .unwrap();
    let mut answer = vec![0; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), malformed.read(&mut answer))
        .await
        .expect("an answer to the malformed body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..read]);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains(r#""code":"INVALID_REQUEST""#), "{answer}");
    let metrics = server.get("/metrics").await.text().await.unwrap();
    assert_eq!((count(&metrics, 499), count(&metrics, 400)), (2, 1));
}
