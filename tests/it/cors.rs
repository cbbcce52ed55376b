//! CORS as a browser sees it, over real HTTP: preflights for every header supabase-js can send,
//! the CORS headers on every error answer (those made by the outer layers included), and exact
//! origins echoed with `Vary: Origin` while unlisted origins get nothing.

use std::time::Duration;

use crate::support::now_ms;
use edgegate::auth::mint::{api_key_claims, legacy_token, user_claims};
use edgegate::server::middleware::{DEFAULT_BODY_LIMIT, Limits};
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

use crate::fake_twilio::FakeTwilio;
use crate::http::test_server;

const SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters-long";
const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";
const TOKEN: &str = "f1e2d3c4b5a6978812345678abcdef90";
const PAGE: &str = "https://app.example.com";

/// What supabase-js (and Supabase's own CORS helper for Edge Functions) may send.
const SUPABASE_JS_HEADERS: [&str; 9] = [
    "authorization",
    "x-client-info",
    "apikey",
    "content-type",
    "x-retry-count",
    "x-region",
    "traceparent",
    "tracestate",
    "baggage",
];

/// The `Vary` list every answer carries (tower-http's default for CORS).
const VARY: [&str; 3] = [
    "origin",
    "access-control-request-method",
    "access-control-request-headers",
];

fn listed(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|value| value.to_str().unwrap().split(','))
        .map(|item| item.trim().to_ascii_lowercase())
        .filter(|item| !item.is_empty())
        .collect()
}

async fn preflight(
    server: &crate::support::TestServer,
    origin: &str,
    requested_headers: &str,
) -> reqwest::Response {
    server
        .client
        .request(
            reqwest::Method::OPTIONS,
            server.url("/functions/v1/jwt-test"),
        )
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", requested_headers)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_preflight_allows_each_header_supabase_js_sends_and_the_configured_extras() {
    let vars = [("CORS_ALLOWED_HEADERS", "X-Tenant-Id")];
    let Some(server) = test_server(Limits::default(), &vars).await else {
        return;
    };
    for name in SUPABASE_JS_HEADERS.into_iter().chain(["x-tenant-id"]) {
        // No credentials: a browser never sends them on a preflight.
        let answer = preflight(&server, PAGE, name).await;
        assert_eq!(answer.status(), 200, "{name}");
        let headers = answer.headers();
        assert_eq!(headers["access-control-allow-origin"], "*", "{name}");
        let methods = listed(headers, "access-control-allow-methods");
        assert!(methods.iter().any(|m| m == "post"), "{methods:?}");
        let allowed = listed(headers, "access-control-allow-headers");
        assert!(
            allowed.iter().any(|h| h == name),
            "{name} not in {allowed:?}"
        );
    }
    let allowed = listed(
        preflight(&server, PAGE, "x-unlisted").await.headers(),
        "access-control-allow-headers",
    );
    assert!(!allowed.iter().any(|h| h == "x-unlisted"), "{allowed:?}");

    let Some(plain) = test_server(Limits::default(), &[]).await else {
        return;
    };
    let allowed = listed(
        preflight(&plain, PAGE, "x-tenant-id").await.headers(),
        "access-control-allow-headers",
    );
    assert!(!allowed.iter().any(|h| h == "x-tenant-id"), "{allowed:?}");
}

/// Asserts a cross-origin answer has `status` and carries what a page needs to read it, and no
/// credentials flag beside `*`.
async fn assert_readable(answer: reqwest::Response, status: u16, code: &str) {
    let headers = answer.headers().clone();
    let actual = answer.status();
    let body: Value = answer.json().await.unwrap_or(Value::Null);
    assert_eq!(actual, status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(
        headers.get("access-control-allow-origin"),
        Some(&"*".parse().unwrap()),
        "{status} {code}"
    );
    let exposed = listed(&headers, "access-control-expose-headers");
    // `Retry-After` (429, 503) and `WWW-Authenticate` (401) are not CORS-safelisted: without
    // them here a page cannot read when to retry or why it was refused.
    for name in [
        "x-request-id",
        "sb-error-code",
        "retry-after",
        "www-authenticate",
    ] {
        assert!(
            exposed.iter().any(|h| h == name),
            "{code}: {name} not in {exposed:?}"
        );
    }
    assert!(
        !headers.contains_key("access-control-allow-credentials"),
        "{code}: * with credentials"
    );
}

#[tokio::test]
async fn every_error_answer_carries_the_cors_headers() {
    let twilio = FakeTwilio::start(ACCOUNT, TOKEN).await;
    let vars = [
        ("SUPABASE_JWT_SECRET", SECRET),
        ("TWILIO_ACCOUNT_SID", ACCOUNT),
        ("TWILIO_AUTH_TOKEN", TOKEN),
        ("TWILIO_API_BASE", twilio.base.as_str()),
        ("TWILIO_FROM_NUMBER", "+15005550006"),
        ("SMS_MAX_PER_RECIPIENT_PER_HOUR", "1"),
    ];
    let limits = Limits {
        timeout: Duration::from_secs(2),
        body: DEFAULT_BODY_LIMIT,
    };
    let Some(server) = test_server(limits, &vars).await else {
        return;
    };
    let now = now_ms() / 1000;
    let user = legacy_token(
        SECRET.as_bytes(),
        &user_claims("supabase", "authenticated", "user-1", now, 3600),
        None,
    );
    let service = legacy_token(
        SECRET.as_bytes(),
        &api_key_claims("abcdefghijklmnop", "service_role", now, 3600),
        None,
    );
    let from_page = |method: reqwest::Method, path: &str| {
        server
            .client
            .request(method, server.url(path))
            .header("origin", PAGE)
    };
    let sms = json!({"to": "+12025550123", "body": "code"});
    let send_sms = |token: &str| {
        from_page(reqwest::Method::POST, "/functions/v1/send-sms")
            .bearer_auth(token)
            .json(&sms)
            .send()
    };

    let cases: Vec<(reqwest::Response, u16, &str)> = vec![
        (
            from_page(reqwest::Method::GET, "/functions/v1/jwt-test")
                .send()
                .await
                .unwrap(),
            401,
            "UNAUTHORIZED_NO_AUTH_HEADER",
        ),
        (send_sms(&user).await.unwrap(), 403, "FORBIDDEN_ROLE"),
        (
            from_page(reqwest::Method::GET, "/functions/v1/nope")
                .send()
                .await
                .unwrap(),
            404,
            "NOT_FOUND",
        ),
        (
            from_page(reqwest::Method::DELETE, "/functions/v1/jwt-test")
                .send()
                .await
                .unwrap(),
            405,
            "METHOD_NOT_ALLOWED",
        ),
        (
            from_page(reqwest::Method::POST, "/test/echo")
                .body(vec![b'a'; DEFAULT_BODY_LIMIT + 1])
                .send()
                .await
                .unwrap(),
            413,
            "PAYLOAD_TOO_LARGE",
        ),
        (
            from_page(
                reqwest::Method::POST,
                "/functions/v1/sync-stripe-products-hardened",
            )
            .bearer_auth(&service)
            .send()
            .await
            .unwrap(),
            503,
            "NOT_CONFIGURED",
        ),
        (
            from_page(reqwest::Method::GET, "/test/panic")
                .send()
                .await
                .unwrap(),
            500,
            "INTERNAL_ERROR",
        ),
        (
            from_page(reqwest::Method::GET, "/test/slow")
                .send()
                .await
                .unwrap(),
            504,
            "TIMEOUT",
        ),
    ];
    for (answer, status, code) in cases {
        assert_readable(answer, status, code).await;
    }

    assert_eq!(send_sms(&service).await.unwrap().status(), 202);
    let limited = send_sms(&service).await.unwrap();
    assert!(
        limited.headers().contains_key("retry-after"),
        "{:?}",
        limited.headers()
    );
    assert_readable(limited, 429, "RATE_LIMITED").await;
}

#[tokio::test]
async fn listed_origins_are_echoed_with_vary_origin_and_others_get_nothing() {
    // Configured as an operator may write them; browsers send the serialized origin (host in
    // lower case, no default port), which is what must match.
    let vars = [(
        "CORS_ALLOWED_ORIGINS",
        "https://App.Example.com:443,http://localhost:3000",
    )];
    let Some(server) = test_server(Limits::default(), &vars).await else {
        return;
    };
    let get = |path: &str, origin: &str| {
        server
            .client
            .get(server.url(path))
            .header("origin", origin)
            .send()
    };
    for origin in ["https://app.example.com", "http://localhost:3000"] {
        let answers = [
            preflight(&server, origin, "x-region").await,
            get("/healthz", origin).await.unwrap(),
            get("/functions/v1/jwt-test", origin).await.unwrap(),
            get("/test/panic", origin).await.unwrap(),
        ];
        for answer in answers {
            let headers = answer.headers();
            assert_eq!(
                headers["access-control-allow-origin"],
                origin,
                "{}",
                answer.status()
            );
            // A shared cache must key the answer on the origin, and a preflight's also on
            // what it asked for: the same list on every answer, once.
            assert_eq!(
                listed(headers, "vary"),
                VARY,
                "{}: Vary {:?}",
                answer.status(),
                headers.get_all("vary")
            );
            assert!(!headers.contains_key("access-control-allow-credentials"));
        }
    }
    for origin in [
        "https://evil.example.net",
        "https://app.example.com.evil.net",
        "null",
    ] {
        let answers = [
            preflight(&server, origin, "x-region").await,
            get("/healthz", origin).await.unwrap(),
            get("/functions/v1/jwt-test", origin).await.unwrap(),
        ];
        for answer in answers {
            let headers = answer.headers();
            assert!(
                !headers.contains_key("access-control-allow-origin"),
                "{origin} echoed: {headers:?}"
            );
            assert_eq!(listed(headers, "vary"), VARY, "{origin}");
        }
    }
}

/// Only a CORS preflight (`Access-Control-Request-Method` present) on `/functions/v1/*` is
/// answered as one; any other `OPTIONS` gets the answer any unsupported method gets, readable
/// from a page like every error.
#[tokio::test]
async fn options_outside_a_functions_preflight_is_answered_404_or_405() {
    let Some(server) = test_server(Limits::default(), &[]).await else {
        return;
    };
    let options = |path: &str| {
        server
            .client
            .request(reqwest::Method::OPTIONS, server.url(path))
            .header("origin", PAGE)
    };
    for (request, status, code, allow) in [
        (
            options("/nope").header("access-control-request-method", "GET"),
            404,
            "NOT_FOUND",
            None,
        ),
        (
            options("/healthz").header("access-control-request-method", "GET"),
            405,
            "METHOD_NOT_ALLOWED",
            Some("GET,HEAD"),
        ),
        (
            options("/admin/signing-keys"),
            405,
            "METHOD_NOT_ALLOWED",
            Some("GET,HEAD"),
        ),
        // Not a preflight: a page's own `fetch(url, {method: "OPTIONS"})`, after its preflight.
        (
            options("/functions/v1/jwt-test"),
            405,
            "METHOD_NOT_ALLOWED",
            Some("GET,HEAD,POST"),
        ),
    ] {
        let answer = request.send().await.unwrap();
        let allowed = answer
            .headers()
            .get("allow")
            .map(|value| value.to_str().unwrap().to_owned());
        assert_eq!(allowed.as_deref(), allow, "{code}");
        assert!(
            !answer
                .headers()
                .contains_key("access-control-allow-methods"),
            "{code}: answered as a preflight"
        );
        assert_readable(answer, status, code).await;
    }
    let real = preflight(&server, PAGE, "authorization").await;
    assert_eq!(real.status(), 200);
    assert!(
        listed(real.headers(), "access-control-allow-methods")
            .iter()
            .any(|m| m == "post")
    );
}
