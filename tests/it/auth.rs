//! The credential layer through HTTP, as the contract states it: `jwt-test`, the 401 codes and
//! headers, roles, `/admin/signing-keys` and its refresh, metrics and readiness.

use std::time::Duration;

use crate::support::now_ms;
use edgegate::auth::Alg;
use edgegate::auth::mint::{SigningKey, api_key_claims, legacy_token, user_claims};
use edgegate::clock::Clock;
use edgegate::store::KeyUsage;
use serde_json::{Value, json};

use crate::support::{JwksHost, TestServer, spawn_app, spawn_app_with_clock};
use crate::test_db;

const SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters-long";
const ISSUER: &str = "https://abcdefghijklmnop.supabase.co/auth/v1";
const SECRET_KEY: &str = "sb_secret_0123456789abcdefghijklmn";
const PUBLISHABLE_KEY: &str = "sb_publishable_0123456789abcdefghij";

fn now() -> i64 {
    now_ms() / 1000
}

pub(crate) fn user_token(key: &SigningKey) -> String {
    key.token(&user_claims(ISSUER, "authenticated", "user-1", now(), 3600))
        .unwrap()
}

fn legacy_user_token() -> String {
    legacy_token(
        SECRET.as_bytes(),
        &user_claims(ISSUER, "authenticated", "user-2", now(), 3600),
        None,
    )
}

pub(crate) fn legacy_key(role: &str) -> String {
    legacy_token(
        SECRET.as_bytes(),
        &api_key_claims("abcdefghijklmnop", role, now(), 3600),
        None,
    )
}

/// An app that trusts the legacy secret, a JWKS host and two API keys.
pub(crate) async fn app_with(
    db: &crate::support::TestDb,
    host: &JwksHost,
    extra: &[(&str, &str)],
) -> TestServer {
    app_with_clock(db, host, extra, Clock::system()).await
}

/// As [`app_with`], reading time from `clock`.
async fn app_with_clock(
    db: &crate::support::TestDb,
    host: &JwksHost,
    extra: &[(&str, &str)],
    clock: Clock,
) -> TestServer {
    let secret_keys = format!(r#"{{"backend":"{SECRET_KEY}"}}"#);
    let publishable_keys = format!(r#"{{"web":"{PUBLISHABLE_KEY}"}}"#);
    let mut vars = vec![
        ("SUPABASE_JWKS_URL", host.url.as_str()),
        (
            "JWT_ISSUERS",
            "https://abcdefghijklmnop.supabase.co/auth/v1,supabase",
        ),
        ("SUPABASE_SECRET_KEYS", secret_keys.as_str()),
        ("SUPABASE_PUBLISHABLE_KEYS", publishable_keys.as_str()),
    ];
    if !extra.iter().any(|(name, _)| *name == "SUPABASE_JWT_SECRET") {
        vars.push(("SUPABASE_JWT_SECRET", SECRET));
    }
    vars.extend_from_slice(extra);
    vars.retain(|(_, value)| !value.is_empty());
    spawn_app_with_clock(db, &vars, clock).await.0
}

pub(crate) async fn call(
    server: &TestServer,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut request = server.client.get(server.url("/functions/v1/jwt-test"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.json().await.unwrap())
}

pub(crate) async fn bearer(server: &TestServer, token: &str) -> (u16, Value) {
    let auth = format!("Bearer {token}");
    let (status, _, body) = call(server, &[("authorization", &auth)]).await;
    (status, body)
}

/// Waits (bounded) until the background refresh has fetched the JWKS once.
pub(crate) async fn until_fetched(host: &JwksHost) {
    for _ in 0..200 {
        if host.hits() > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the JWKS was never fetched");
}

#[tokio::test]
async fn jwt_test_names_the_key_that_verified_each_kind_of_credential() {
    let db = test_db!();
    let es = SigningKey::generate(Alg::ES256).unwrap();
    let host = JwksHost::start(json!([es.public_jwk()])).await;
    let server = app_with(&db, &host, &[]).await;

    let (status, body) = bearer(&server, &user_token(&es)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["valid"], true);
    assert_eq!(body["role"], "authenticated");
    assert_eq!(body["sub"], "user-1");
    assert_eq!(
        body["key"],
        json!({"source": "signing_key", "kid": es.kid(), "alg": "ES256"})
    );
    assert_eq!(body["claims"]["aud"], "authenticated");
    assert_eq!(body["claims"]["is_anonymous"], false);

    let (status, body) = bearer(&server, &legacy_user_token()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["key"]["source"], "legacy_secret");
    assert_eq!(body["key"]["alg"], "HS256");

    // A Bearer JWT wins over `apikey`, even one that is not text (obs-text bytes, which HTTP
    // allows in a header value); such an `apikey` is refused only where it would count.
    let auth = format!("Bearer {}", user_token(&es));
    let (status, _, body) = call(&server, &[("authorization", &auth), ("apikey", "sb_é")]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["key"]["source"], "signing_key");
    let (status, _, body) = call(&server, &[("apikey", "sb_é")]).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("UNAUTHORIZED_INVALID_API_KEY"))
    );

    // After migration, legacy tokens may carry a kid the JWKS does not have.
    let with_kid = legacy_token(
        SECRET.as_bytes(),
        &user_claims(ISSUER, "authenticated", "user-3", now(), 3600),
        Some("legacy-kid-not-in-jwks"),
    );
    let (status, body) = bearer(&server, &with_kid).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["key"]["source"], "legacy_secret");

    // supabase-js with a legacy anon key sends it as apikey (and Bearer).
    let anon = legacy_key("anon");
    let (status, _, body) = call(&server, &[("apikey", &anon)]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["role"], "anon");
    assert_eq!(body["sub"], Value::Null);

    let (status, _, body) = call(&server, &[("apikey", PUBLISHABLE_KEY)]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["role"], "anon");
    assert_eq!(body["key"]["source"], "api_key");
    assert_eq!(body["key"]["kid"], "publishable:web");
    assert!(
        !body.to_string().contains(PUBLISHABLE_KEY),
        "the key itself must not echo"
    );

    let (status, _, body) = call(&server, &[("apikey", SECRET_KEY)]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["role"], "service_role");

    // POST works the same way (functions.invoke posts).
    let response = server
        .client
        .post(server.url("/functions/v1/jwt-test"))
        .bearer_auth(user_token(&es))
        .json(&json!({"hello": "world"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// `key.kid` of an HS256 token names the secret that verified it, not the token's own `kid`
/// header: null for SUPABASE_JWT_SECRET (as /admin/signing-keys lists it), the JWK's kid for an
/// inline `oct` key. It echoed the header: `"kid":"py-es"` for the legacy secret.
#[tokio::test]
async fn an_hs256_token_names_the_secret_that_verified_it_not_its_kid_header() {
    let db = test_db!();
    let host = JwksHost::start(json!([])).await;
    let oct_secret = b"octsecret-octsecret-octsecret-0123456789";
    let oct = json!({"keys": [{"kty": "oct", "kid": "octk", "alg": "HS256",
        "k": "b2N0c2VjcmV0LW9jdHNlY3JldC1vY3RzZWNyZXQtMDEyMzQ1Njc4OQ"}]});
    let oct = oct.to_string();
    let server = app_with(&db, &host, &[("SUPABASE_JWKS", &oct)]).await;
    let claims = || user_claims(ISSUER, "authenticated", "user-1", now(), 3600);
    for (secret, header_kid, kid) in [
        (SECRET.as_bytes(), Some("py-es"), Value::Null),
        (SECRET.as_bytes(), Some("octk"), Value::Null),
        (SECRET.as_bytes(), None, Value::Null),
        (oct_secret.as_slice(), Some("py-es"), json!("octk")),
        (oct_secret.as_slice(), None, json!("octk")),
    ] {
        let (status, body) = bearer(&server, &legacy_token(secret, &claims(), header_kid)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["key"],
            json!({"source": "legacy_secret", "kid": kid, "alg": "HS256"}),
            "kid header {header_kid:?}"
        );
    }
}

#[tokio::test]
async fn refusals_carry_the_contract_code_and_headers() {
    let db = test_db!();
    let es = SigningKey::generate(Alg::ES256).unwrap();
    let stranger = SigningKey::generate(Alg::ES256).unwrap();
    let host = JwksHost::start(json!([es.public_jwk()])).await;
    let server = app_with(&db, &host, &[]).await;

    let (status, headers, body) = call(&server, &[]).await;
    assert_eq!(status, 401);
    assert_eq!(body["code"], "UNAUTHORIZED_NO_AUTH_HEADER");
    assert_eq!(headers["sb-error-code"], "UNAUTHORIZED_NO_AUTH_HEADER");
    assert_eq!(
        headers["www-authenticate"],
        r#"Bearer error="invalid_token""#
    );
    // An sb_ key in Authorization alone is no credential either (the contract: it counts only
    // beside the same key in apikey), and the message says so rather than that none was sent.
    let bearer = format!("Bearer {SECRET_KEY}");
    let (status, _, body) = call(&server, &[("authorization", bearer.as_str())]).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["code"], "UNAUTHORIZED_NO_AUTH_HEADER");
    assert_eq!(
        body["message"],
        "an sb_ key in Authorization counts only when the apikey header holds the same key"
    );
    assert!(
        !body.to_string().contains(SECRET_KEY),
        "the key itself must not echo"
    );

    let none = format!(
        "{}.{}.",
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0", "eyJyb2xlIjoic2VydmljZV9yb2xlIn0"
    );
    let cases = [
        ("not-a-jwt".to_owned(), "UNAUTHORIZED_INVALID_JWT_FORMAT"),
        ("a".repeat(64 * 1024), "UNAUTHORIZED_INVALID_JWT_FORMAT"),
        (none, "UNAUTHORIZED_UNSUPPORTED_TOKEN_ALGORITHM"),
        (user_token(&stranger), "UNAUTHORIZED_ASYMMETRIC_JWT"),
        (
            legacy_token(
                b"another-secret-that-is-32-bytes-long!!",
                &json!({"exp": now() + 60}),
                None,
            ),
            "UNAUTHORIZED_LEGACY_JWT",
        ),
        (
            es.token(&user_claims(
                "https://evil.example/auth/v1",
                "authenticated",
                "x",
                now(),
                60,
            ))
            .unwrap(),
            "UNAUTHORIZED_ASYMMETRIC_JWT",
        ),
    ];
    for (token, code) in cases {
        let (status, headers, body) =
            call(&server, &[("authorization", &format!("Bearer {token}"))]).await;
        assert_eq!((status, body["code"].as_str()), (401, Some(code)), "{body}");
        assert_eq!(headers["sb-error-code"], code);
        let message = body["message"].as_str().unwrap();
        assert!(!message.is_empty() && !message.contains(&token[..token.len().min(40)]));
    }

    let (status, _, body) = call(&server, &[("apikey", "sb_publishable_wrong")]).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("UNAUTHORIZED_INVALID_API_KEY"))
    );
    let (status, _, body) = call(
        &server,
        &[
            ("apikey", SECRET_KEY),
            ("origin", "https://app.example.com"),
        ],
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("UNAUTHORIZED_INVALID_API_KEY")),
        "a secret key from a browser is refused"
    );
}

/// `apikey` holds a project's API keys: an `sb_` key, or a legacy anon or service_role key (an
/// HS256 JWT with no `sub`, verified by the legacy secret), as on Supabase, whose gateway takes
/// no session there. A signing key's token or a legacy session sent there alone matches no key:
/// 401 `UNAUTHORIZED_INVALID_API_KEY`. They were let in as the request's credential (a black-box
/// tester's ES256 service_role token in `apikey` opened `/admin/signing-keys`). A legacy key
/// after revocation still says `UNAUTHORIZED_LEGACY_JWT`, the series the runbook watches.
#[tokio::test]
async fn apikey_counts_only_an_api_key_never_a_session_or_a_signing_keys_token() {
    let db = test_db!();
    let es = SigningKey::generate(Alg::ES256).unwrap();
    let host = JwksHost::start(json!([es.public_jwk()])).await;
    let server = app_with(&db, &host, &[]).await;
    let service = es
        .token(&api_key_claims(
            "abcdefghijklmnop",
            "service_role",
            now(),
            3600,
        ))
        .unwrap();
    for (what, token) in [
        ("a signing key's session", user_token(&es)),
        ("a signing key's service_role token", service),
        ("a legacy session", legacy_user_token()),
    ] {
        let (status, _, body) = call(&server, &[("apikey", &token)]).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (401, Some("UNAUTHORIZED_INVALID_API_KEY")),
            "{what}: {body}"
        );
    }
    // JWT-shaped values whose header is refused, or that are no JWT at all, match no key
    // either: they answered the Bearer codes (`UNAUTHORIZED_ASYMMETRIC_JWT`,
    // `UNAUTHORIZED_INVALID_JWT_FORMAT`, `UNAUTHORIZED_UNSUPPORTED_TOKEN_ALGORITHM`).
    let b64 = |value: &Value| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
    };
    let signed = user_token(&es);
    let rest = signed.split_once('.').unwrap().1;
    let kid = es.public_jwk()["kid"].clone();
    let with_header = |header: Value| format!("{}.{rest}", b64(&header));
    // Counted where a refused apikey is counted (source "none" for a JWT, as for the sessions
    // above), never as a signing key's refusal, which the runbook reads as a key problem.
    let refusals = async |source: &str, outcome: &str| -> u64 {
        let text = server.get("/metrics").await.text().await.unwrap();
        let (source, outcome) = (
            format!(r#"source="{source}""#),
            format!(r#"outcome="{outcome}"}} "#),
        );
        text.lines()
            .filter(|line| line.starts_with("edgegate_credential_verifications_total{"))
            .filter(|line| line.contains(&source) && line.contains(&outcome))
            .map(|line| line.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    let none_before = refusals("none", "UNAUTHORIZED_INVALID_API_KEY").await;
    let signing_before = refusals("signing_key", "UNAUTHORIZED_ASYMMETRIC_JWT").await;
    let cases = [
        (
            "a signing key's token with jku",
            with_header(json!({"alg": "ES256", "kid": kid, "jku": "https://example.com/jwks"})),
        ),
        (
            "a signing key's token with a kid of 300 bytes",
            with_header(json!({"alg": "ES256", "kid": "k".repeat(300)})),
        ),
        ("three parts that are no JWT", "x.y.z".to_owned()),
        (
            "alg none",
            with_header(json!({"alg": "none", "typ": "JWT"})),
        ),
    ];
    let count = cases.len() as u64;
    for (what, token) in cases {
        let (status, _, body) = call(&server, &[("apikey", &token)]).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (401, Some("UNAUTHORIZED_INVALID_API_KEY")),
            "{what}: {body}"
        );
    }
    assert_eq!(
        refusals("none", "UNAUTHORIZED_INVALID_API_KEY").await,
        none_before + count,
        "each refused apikey counted under source=\"none\""
    );
    assert_eq!(
        refusals("signing_key", "UNAUTHORIZED_ASYMMETRIC_JWT").await,
        signing_before,
        "no apikey counted as a signing key's refusal"
    );
    let (status, _, body) = call(&server, &[("apikey", &legacy_key("anon"))]).await;
    assert_eq!((status, &body["role"]), (200, &json!("anon")), "{body}");

    let revoked = app_with(&db, &host, &[("SUPABASE_JWT_SECRET", "")]).await;
    let (status, _, body) = call(&revoked, &[("apikey", &legacy_key("anon"))]).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("UNAUTHORIZED_LEGACY_JWT")),
        "{body}"
    );
}

/// An `Authorization` header with nothing in it is no credential, as `Bearer` with no token is:
/// the `apikey` counts. It answered `UNAUTHORIZED_INVALID_JWT_FORMAT` where `Bearer` alone let
/// the same `apikey` in.
#[tokio::test]
async fn an_empty_authorization_header_leaves_the_apikey_to_count() {
    let db = test_db!();
    let host = JwksHost::start(json!([])).await;
    let server = app_with(&db, &host, &[]).await;
    for authorization in ["", "Bearer"] {
        let (status, _, body) = call(
            &server,
            &[
                ("authorization", authorization),
                ("apikey", PUBLISHABLE_KEY),
            ],
        )
        .await;
        assert_eq!(
            (status, &body["key"]["source"]),
            (200, &json!("api_key")),
            "{authorization:?}: {body}"
        );
        let (status, _, body) = call(&server, &[("authorization", authorization)]).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (401, Some("UNAUTHORIZED_NO_AUTH_HEADER")),
            "{authorization:?}: {body}"
        );
    }
}

#[tokio::test]
async fn without_the_legacy_secret_hs256_is_refused_and_signing_keys_pass() {
    let db = test_db!();
    let es = SigningKey::generate(Alg::ES256).unwrap();
    let host = JwksHost::start(json!([es.public_jwk()])).await;
    let server = app_with(&db, &host, &[("SUPABASE_JWT_SECRET", "")]).await;
    let (status, body) = bearer(&server, &legacy_user_token()).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("UNAUTHORIZED_LEGACY_JWT"))
    );
    let (status, body) = bearer(&server, &user_token(&es)).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn admin_endpoints_need_the_service_role() {
    let db = test_db!();
    let host = JwksHost::start(json!([])).await;
    let server = app_with(&db, &host, &[]).await;
    for (method, path) in [
        (reqwest::Method::GET, "/admin/signing-keys"),
        (reqwest::Method::POST, "/admin/signing-keys/refresh"),
    ] {
        let response = server
            .client
            .request(method.clone(), server.url(path))
            .bearer_auth(legacy_user_token())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "FORBIDDEN_ROLE");
        let response = server
            .client
            .request(method, server.url(path))
            .header("apikey", PUBLISHABLE_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403, "{path}");
    }
}

/// An admin endpoint called with a secret key; it must answer 200.
async fn admin(server: &TestServer, method: reqwest::Method, path: &str) -> Value {
    let response = server
        .client
        .request(method, server.url(path))
        .header("apikey", SECRET_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{path}");
    response.json().await.unwrap()
}

pub(crate) async fn force_refresh(server: &TestServer) -> Value {
    admin(server, reqwest::Method::POST, "/admin/signing-keys/refresh").await
}

pub(crate) async fn signing_keys(server: &TestServer) -> Value {
    admin(server, reqwest::Method::GET, "/admin/signing-keys").await
}

#[tokio::test]
async fn the_admin_report_lists_keys_usage_and_a_verdict() {
    let db = test_db!();
    let es = SigningKey::generate(Alg::ES256).unwrap();
    let rs = SigningKey::generate(Alg::RS256).unwrap();
    let host = JwksHost::start(json!([es.public_jwk(), rs.public_jwk()])).await;
    let server = app_with(&db, &host, &[]).await;
    until_fetched(&host).await;
    for _ in 0..3 {
        assert_eq!(bearer(&server, &user_token(&es)).await.0, 200);
    }
    assert_eq!(bearer(&server, &legacy_user_token()).await.0, 200);

    let report = signing_keys(&server).await;
    let keys = report["keys"].as_array().unwrap();
    let es_row = keys
        .iter()
        .find(|k| k["kid"] == es.kid())
        .expect("ES256 key listed");
    assert_eq!(es_row["source"], "signing_key");
    assert_eq!(es_row["alg"], "ES256");
    assert_eq!(es_row["origin"], "jwks");
    assert_eq!(es_row["verified_count"], 3);
    assert!(es_row["last_verified_at_ms"].as_i64().unwrap() > 0);
    let rs_row = keys
        .iter()
        .find(|k| k["kid"] == rs.kid())
        .expect("standby RS256 key listed");
    assert_eq!(rs_row["verified_count"], 0);
    assert!(keys.iter().any(|k| k["source"] == "legacy_secret"));
    assert_eq!(report["legacy_secret"]["configured"], true);
    assert_eq!(report["legacy_secret"]["verified_count"], 1);
    assert_eq!(report["legacy_revocation_safe"], false);
    assert!(report["reason"].as_str().unwrap().contains("legacy secret"));
    assert_eq!(report["window_seconds"], 86_400);
    assert!(
        !report.to_string().contains(SECRET),
        "the legacy secret must never show"
    );
}

/// A fetched key never displaces an inline one with the same kid, and is not listed as trusted
/// either: the listing names the inline key once, with its counts, and reports the fetched one
/// among the dropped keys with the reason. A fetched copy of the inline key itself is reported
/// as such.
#[tokio::test]
async fn a_fetched_key_under_an_inline_kid_is_reported_overridden_not_trusted() {
    let db = test_db!();
    let inline = SigningKey::generate_with_kid(Alg::ES256, "py-es").unwrap();
    let impostor = SigningKey::generate_with_kid(Alg::ES256, "py-es").unwrap();
    let copied = SigningKey::generate_with_kid(Alg::EdDSA, "py-same").unwrap();
    let host = JwksHost::start(json!([impostor.public_jwk(), copied.public_jwk()])).await;
    let inline_jwks = json!([inline.public_jwk(), copied.public_jwk()]).to_string();
    let server = app_with(&db, &host, &[("SUPABASE_JWKS", &inline_jwks)]).await;
    until_fetched(&host).await;
    for _ in 0..3 {
        assert_eq!(bearer(&server, &user_token(&inline)).await.0, 200);
    }
    assert_eq!(bearer(&server, &user_token(&impostor)).await.0, 401);
    assert_eq!(bearer(&server, &user_token(&copied)).await.0, 200);

    let report = signing_keys(&server).await;
    let listed: Vec<(&str, &str, i64)> = report["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|key| key["source"] == "signing_key")
        .map(|key| {
            (
                key["kid"].as_str().unwrap(),
                key["origin"].as_str().unwrap(),
                key["verified_count"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [("py-es", "inline", 3), ("py-same", "inline", 1)],
        "{report:#}"
    );
    let dropped = report["jwks"]["dropped"].as_array().unwrap();
    let reason = |kid: &str| {
        dropped
            .iter()
            .find(|key| key["kid"] == kid && key["origin"] == "jwks")
            .and_then(|key| key["reason"].as_str())
            .unwrap_or_else(|| panic!("{kid} not reported: {report:#}"))
            .to_owned()
    };
    let overridden = reason("py-es");
    assert!(
        overridden.contains("overridden by the inline key py-es (ES256)"),
        "{overridden}"
    );
    let copy = reason("py-same");
    assert!(
        copy.contains("the same key as the inline key py-same (EdDSA)"),
        "{copy}"
    );
}

/// The admin answer shows SUPABASE_JWKS_URL without its query, where a key may be.
#[tokio::test]
async fn the_admin_report_shows_the_jwks_url_without_its_query() {
    let db = test_db!();
    let host = JwksHost::start(json!([])).await;
    let secret_keys = format!(r#"{{"backend":"{SECRET_KEY}"}}"#);
    let url = format!("{}?apikey={}", host.url, crate::cli::QUERY_SECRET);
    let (server, _) = spawn_app(
        &db,
        &[
            ("SUPABASE_JWKS_URL", &url),
            ("SUPABASE_SECRET_KEYS", &secret_keys),
        ],
    )
    .await;
    until_fetched(&host).await;
    let report = signing_keys(&server).await;
    assert_eq!(
        report["jwks"]["url"],
        format!("{}?…", host.url),
        "{report:#}"
    );
    assert!(!report.to_string().contains("querysecret"), "{report:#}");
    let refreshed = admin(
        &server,
        reqwest::Method::POST,
        "/admin/signing-keys/refresh",
    )
    .await;
    assert!(
        !refreshed.to_string().contains("querysecret"),
        "{refreshed:#}"
    );
}

/// A fragment on the JWKS URL is the client's own (never sent): the set it names is fetched and
/// used (every fetch was refused as "redirected to another URL", the answer's URL having none).
#[tokio::test]
async fn a_jwks_url_with_a_fragment_is_fetched_and_used() {
    let db = test_db!();
    let es = SigningKey::generate(Alg::ES256).unwrap();
    let host = JwksHost::start(json!([es.public_jwk()])).await;
    let url = format!("{}#keys", host.url);
    let (server, _) = spawn_app(&db, &[("SUPABASE_JWKS_URL", &url)]).await;
    let (status, body) = bearer(&server, &user_token(&es)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["key"]["source"], "signing_key", "{body}");
}

#[tokio::test]
async fn revocation_is_called_safe_once_the_window_has_no_legacy_use() {
    let db = test_db!();
    let host = JwksHost::start(json!([])).await;
    let server = app_with(&db, &host, &[("LEGACY_REVOCATION_WINDOW_SECONDS", "3600")]).await;
    let store = db.store().await;
    const HOUR: i64 = 3_600_000;
    // One reading of the clock: two could straddle a millisecond, and the hour not be whole.
    let now = now_ms();
    let hour = now - now % HOUR;
    let row = |hours_ago: i64, source: &str, kid: &str, alg: &str, last: i64| KeyUsage {
        hour_start_ms: hour - hours_ago * HOUR,
        source: source.into(),
        kid: kid.into(),
        alg: alg.into(),
        verified_count: 10,
        last_verified_at_ms: last,
    };
    // Legacy traffic stopped three hours ago; signing keys carry traffic now.
    store
        .add_key_usage(&[
            row(3, "legacy_secret", "", "HS256", hour - 3 * HOUR + 60_000),
            row(0, "signing_key", "kid-1", "ES256", now_ms() - 1_000),
        ])
        .await
        .unwrap();
    let report = signing_keys(&server).await;
    assert_eq!(report["legacy_revocation_safe"], true, "{report}");

    // One legacy request now flips it back, before any flush.
    assert_eq!(bearer(&server, &legacy_user_token()).await.0, 200);
    let report = signing_keys(&server).await;
    assert_eq!(report["legacy_revocation_safe"], false, "{report}");
}

/// The audit row of the latest signing-key refresh (among the last ten rows).
async fn refresh_audit_row(db: &crate::support::TestDb) -> edgegate::store::AuditEntry {
    let audit = db.store().await.recent_audit(10).await.unwrap();
    audit
        .into_iter()
        .find(|entry| entry.action == "refresh_signing_keys")
        .expect("an audit row for the refresh")
}

#[tokio::test]
async fn a_removed_key_stops_at_once_after_a_forced_refresh() {
    let db = test_db!();
    let es = SigningKey::generate(Alg::ES256).unwrap();
    let host = JwksHost::start(json!([es.public_jwk()])).await;
    let server = app_with(&db, &host, &[]).await;
    let token = user_token(&es);
    assert_eq!(bearer(&server, &token).await.0, 200);

    host.set_keys(json!([]));
    assert_eq!(
        bearer(&server, &token).await.0,
        200,
        "the cached set still holds it"
    );
    let response = server
        .client
        .post(server.url("/admin/signing-keys/refresh"))
        .header("apikey", SECRET_KEY)
        .header("x-request-id", "refresh-after-removal")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["keys"], 0);
    let (status, body) = bearer(&server, &token).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("UNAUTHORIZED_ASYMMETRIC_JWT"))
    );

    let refresh = refresh_audit_row(&db).await;
    assert_eq!(refresh.credential_source, "api_key");
    assert_eq!(refresh.credential_id, "secret:backend");
    assert_eq!(refresh.outcome, "ok");
    assert_eq!(refresh.request_id.as_deref(), Some("refresh-after-removal"));
}

/// Refreshes that arrive while a fetch is under way share one fetch, begun after they arrived,
/// instead of queueing a fetch each on the fetch lock (200 concurrent refreshes made 200 fetches;
/// with a hanging host, 10 waited 5 s each in turn and the last answered 504). The fetch under
/// way began before the key was removed, so it does not count for them.
#[tokio::test]
async fn concurrent_refreshes_share_one_fetch_begun_after_they_arrived() {
    let db = test_db!();
    let es = SigningKey::generate(Alg::ES256).unwrap();
    let host = JwksHost::start(json!([es.public_jwk()])).await;
    let server = app_with(&db, &host, &[]).await;
    let token = user_token(&es);
    force_refresh(&server).await;
    host.set_delay(Duration::from_millis(300));
    let refresh = || {
        let request = server
            .client
            .post(server.url("/admin/signing-keys/refresh"))
            .header("apikey", SECRET_KEY);
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.unwrap()
        }
    };
    let before = host.hits();
    let first = tokio::spawn(refresh());
    while host.hits() == before {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The fetch under way holds the set with the key; the operator removes it.
    host.set_keys(json!([]));
    let started = std::time::Instant::now();
    let later = futures_util::future::join_all((0..10).map(|_| refresh())).await;
    assert_eq!(first.await.unwrap()["keys"], 1);
    for answer in &later {
        assert_eq!(answer["keys"], 0, "{answer}");
    }
    assert_eq!(
        host.hits(),
        before + 2,
        "the fetch under way and one more, shared; took {:?}",
        started.elapsed()
    );
    assert_eq!(bearer(&server, &token).await.0, 401);
}

/// A host whose ETag stays the same while its set changes (a cache or CDN that misbehaves)
/// answers a conditional request 304. The forced refresh asks for the whole set (and caches on
/// the way to revalidate, `Cache-Control: no-cache`), so a removed
/// key stops (it kept verifying while the refresh answered `refreshed: true`, `not_modified:
/// true`), and its answer lists the keys the set drops (a 304's answer said `dropped: []`).
#[tokio::test]
async fn a_forced_refresh_fetches_the_whole_set_whatever_its_etag() {
    let db = test_db!();
    let es = SigningKey::generate(Alg::ES256).unwrap();
    let symmetric = json!({"kty": "oct", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0", "kid": "hs"});
    let host = JwksHost::start(json!([es.public_jwk(), symmetric])).await;
    host.set_etag(Some("\"v1\""));
    let server = app_with(&db, &host, &[]).await;
    let token = user_token(&es);
    until_fetched(&host).await;
    assert_eq!(bearer(&server, &token).await.0, 200);

    let dropped_kids = |answer: &Value| -> Vec<String> {
        answer["dropped"]
            .as_array()
            .unwrap_or_else(|| panic!("{answer}"))
            .iter()
            .map(|key| key["kid"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let refreshed = force_refresh(&server).await;
    assert_eq!(refreshed["not_modified"], false, "{refreshed}");
    assert_eq!(dropped_kids(&refreshed), ["hs"], "{refreshed}");
    // A cache on the way is asked to revalidate too.
    assert_eq!(host.asked_cache_control().as_deref(), Some("no-cache"));

    // The key is removed; the host's validator is not.
    host.set_keys(json!([symmetric]));
    let refreshed = force_refresh(&server).await;
    assert_eq!(
        (&refreshed["not_modified"], &refreshed["keys"]),
        (&json!(false), &json!(0)),
        "{refreshed}"
    );
    assert_eq!(dropped_kids(&refreshed), ["hs"], "{refreshed}");
    assert_eq!(bearer(&server, &token).await.0, 401);
}

#[tokio::test]
async fn audit_rows_are_stamped_by_the_apps_clock() {
    const DAY_MS: i64 = 24 * 3600 * 1000;
    let db = test_db!();
    let es = SigningKey::generate(Alg::ES256).unwrap();
    let host = JwksHost::start(json!([es.public_jwk()])).await;
    let clock = Clock::manual();
    let server = app_with_clock(&db, &host, &[], clock.clone()).await;
    clock.advance(Duration::from_millis(30 * DAY_MS as u64));
    force_refresh(&server).await;

    let refresh = refresh_audit_row(&db).await;
    // The injected clock, not the system's: 30 days ahead of it.
    assert!(
        refresh.at_ms >= now_ms() + 29 * DAY_MS,
        "stamped {} against the system's {}",
        refresh.at_ms,
        now_ms()
    );
    assert!(refresh.at_ms <= clock.now_ms());
}

#[tokio::test]
async fn a_new_kid_costs_one_fetch_and_random_kids_cost_no_more() {
    let db = test_db!();
    let es = SigningKey::generate(Alg::ES256).unwrap();
    let host = JwksHost::start(json!([])).await;
    let vars = [
        ("JWKS_MIN_REFRESH_SECONDS", "2"),
        ("JWKS_CACHE_TTL_SECONDS", "3600"),
    ];
    let clock = Clock::manual();
    let server = app_with_clock(&db, &host, &vars, clock.clone()).await;
    until_fetched(&host).await;
    // The start-up fetch opened a cool-down; move past it so the new kid may fetch.
    clock.advance(Duration::from_millis(2_100));
    let before = host.hits();
    host.set_keys(json!([es.public_jwk()]));
    let (status, body) = bearer(&server, &user_token(&es)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(host.hits(), before + 1, "a new kid costs exactly one fetch");
    // The app's clock stands still: the cool-down that fetch opened lasts through them all.
    for _ in 0..300 {
        let random = SigningKey::generate(Alg::ES256).unwrap();
        assert_eq!(bearer(&server, &user_token(&random)).await.0, 401);
    }
    assert_eq!(host.hits(), before + 1, "random kids cost no fetch");
}

#[tokio::test]
async fn metrics_and_readiness_show_the_credential_layer() {
    let db = test_db!();
    let es = SigningKey::generate(Alg::ES256).unwrap();
    let host = JwksHost::start(json!([es.public_jwk()])).await;
    let server = app_with(&db, &host, &[("SUPABASE_JWT_SECRET", "")]).await;
    until_fetched(&host).await;
    let token = user_token(&es);
    for _ in 0..2 {
        assert_eq!(bearer(&server, &token).await.0, 200);
    }
    assert_eq!(bearer(&server, &legacy_user_token()).await.0, 401);
    let text = server.get("/metrics").await.text().await.unwrap();
    let ok_line = format!(
        r#"edgegate_credential_verifications_total{{source="signing_key",kid="{}",alg="ES256",outcome="ok"}} 2"#,
        es.kid()
    );
    assert!(text.contains(&ok_line), "{text}");
    assert!(
        text.contains(r#"outcome="UNAUTHORIZED_LEGACY_JWT"} 1"#),
        "{text}"
    );
    assert!(text.contains("edgegate_token_cache_hits_total 1"), "{text}");
    assert!(
        text.contains(r#"edgegate_jwks_fetches_total{result="ok"}"#),
        "{text}"
    );
    assert!(text.contains("edgegate_jwks_key_set_age_seconds"), "{text}");

    let ready: Value = server.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["checks"]["key_ring"]["ok"], true, "{ready}");
}

/// Each key counts its verifications in its own series, on a miss and on a hit alike, and a
/// key set fetched again (new key objects for the same kids) goes on counting in the same
/// series rather than starting another.
#[tokio::test]
async fn every_key_counts_its_verifications_in_one_series_across_key_set_fetches() {
    let db = test_db!();
    let es = SigningKey::generate(Alg::ES256).unwrap();
    let rs = SigningKey::generate(Alg::RS256).unwrap();
    let host = JwksHost::start(json!([es.public_jwk()])).await;
    let clock = Clock::manual();
    let vars = [("JWKS_MIN_REFRESH_SECONDS", "2")];
    let server = app_with_clock(&db, &host, &vars, clock.clone()).await;
    until_fetched(&host).await;
    let es_token = user_token(&es);
    let legacy = legacy_user_token();
    let credentials: [&[(&str, &str)]; 3] = [
        &[("apikey", PUBLISHABLE_KEY)],
        &[("apikey", SECRET_KEY)],
        &[("apikey", "sb_publishable_wrong")],
    ];
    let expected = [200, 200, 401];
    for _ in 0..2 {
        assert_eq!(bearer(&server, &es_token).await.0, 200);
        assert_eq!(bearer(&server, &legacy).await.0, 200);
        for (headers, status) in credentials.iter().zip(&expected) {
            assert_eq!(call(&server, headers).await.0, *status);
        }
    }
    // Past the start-up fetch's cool-down, a new kid makes the server fetch the set again:
    // every key in it is a new object.
    clock.advance(Duration::from_millis(2_100));
    host.set_keys(json!([es.public_jwk(), rs.public_jwk()]));
    let before = host.hits();
    assert_eq!(bearer(&server, &user_token(&rs)).await.0, 200);
    assert_eq!(host.hits(), before + 1, "the new kid was fetched");
    let fresh_es = es
        .token(&user_claims(ISSUER, "authenticated", "user-9", now(), 3600))
        .unwrap();
    assert_eq!(bearer(&server, &fresh_es).await.0, 200);
    assert_eq!(bearer(&server, &es_token).await.0, 200);
    assert_eq!(bearer(&server, &legacy_user_token()).await.0, 200);

    let text = server.get("/metrics").await.text().await.unwrap();
    let series = |source: &str, kid: &str, alg: &str, outcome: &str| {
        let prefix = format!(
            r#"edgegate_credential_verifications_total{{source="{source}",kid="{kid}",alg="{alg}",outcome="{outcome}"}} "#
        );
        let values: Vec<&str> = text
            .lines()
            .filter_map(|line| line.strip_prefix(prefix.as_str()))
            .collect();
        assert_eq!(values.len(), 1, "one series for {prefix}: {text}");
        values[0].parse::<u64>().unwrap()
    };
    assert_eq!(series("signing_key", es.kid(), "ES256", "ok"), 4);
    assert_eq!(series("signing_key", rs.kid(), "RS256", "ok"), 1);
    assert_eq!(series("legacy_secret", "legacy", "HS256", "ok"), 3);
    assert_eq!(series("api_key", "publishable:web", "opaque", "ok"), 2);
    assert_eq!(series("api_key", "secret:backend", "opaque", "ok"), 2);
    assert_eq!(
        series(
            "api_key",
            "unknown",
            "unknown",
            "UNAUTHORIZED_INVALID_API_KEY"
        ),
        2
    );
}

/// A token answered from the cache gets the very bytes its first, verified answer got, and
/// its claims are the token's own, whatever they hold.
#[tokio::test]
async fn a_cached_answer_is_the_verified_answer_byte_for_byte() {
    let db = test_db!();
    let es = SigningKey::generate(Alg::ES256).unwrap();
    let host = JwksHost::start(json!([es.public_jwk()])).await;
    let server = app_with(&db, &host, &[]).await;
    until_fetched(&host).await;
    let mut claims = user_claims(ISSUER, "authenticated", "user-1", now(), 3600);
    claims["user_metadata"] = json!({
        "name": "Zoë \"the\" <admin> \u{2028}\u{1F600}",
        "path": "a\\b/c\n",
        "scores": [1.5, -0.25, 1e300, 18446744073709551615u64, -9223372036854775808i64],
        "nested": {"z": null, "a": [true, false, {}, []]},
    });
    let token = es.token(&claims).unwrap();

    let mut bodies = Vec::new();
    for _ in 0..3 {
        let response = server
            .client
            .get(server.url("/functions/v1/jwt-test"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        bodies.push(response.text().await.unwrap());
    }
    let text = server.get("/metrics").await.text().await.unwrap();
    assert!(text.contains("edgegate_token_cache_hits_total 2"), "{text}");
    assert_eq!(bodies[1], bodies[0], "a cache hit answered differently");
    assert_eq!(bodies[2], bodies[0], "a cache hit answered differently");
    let body: Value = serde_json::from_str(&bodies[0]).unwrap();
    assert_eq!(body["claims"], claims);
}

/// A forced refresh (`POST /admin/signing-keys/refresh` with a secret key) that must fail: it
/// answers 502; its body.
async fn failed_refresh(server: &TestServer) -> Value {
    let response = server
        .client
        .post(server.url("/admin/signing-keys/refresh"))
        .header("apikey", SECRET_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    response.json().await.unwrap()
}

/// `token` as a Bearer credential, which must be refused as a signing-key token (401
/// `UNAUTHORIZED_ASYMMETRIC_JWT`); the answer's body.
async fn refused_signing_key_token(server: &TestServer, token: &str) -> Value {
    let (status, body) = bearer(server, token).await;
    assert_eq!(
        (status, &body["code"]),
        (401, &json!("UNAUTHORIZED_ASYMMETRIC_JWT")),
        "{body}"
    );
    body
}

/// A JWKS URL on a loopback port nothing listens on: the key set never arrives.
fn unanswered_jwks_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("http://127.0.0.1:{port}/auth/v1/.well-known/jwks.json")
}

#[tokio::test]
async fn readyz_waits_for_a_key_set_when_only_a_jwks_is_configured() {
    let db = test_db!();
    // Nothing listens here: the JWKS never arrives, so nothing can be verified.
    let url = unanswered_jwks_url();
    let (server, _) = spawn_app(&db, &[("SUPABASE_JWKS_URL", url.as_str())]).await;
    let response = server.get("/readyz").await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["checks"]["key_ring"]["ok"], false, "{body}");
}

/// The legacy secret still verifies while a JWKS that never arrives refuses every signing-key
/// token (a mistyped `SUPABASE_URL` during the migration): `/readyz` stays 200, as it must for the
/// legacy callers, but the set reads as stale everywhere the runbook looks (`edgegate_jwks_stale`
/// 1, `/readyz`'s `jwks.stale`), a forced refresh says that no set was ever fetched rather
/// than that "the last good key set stays in use", and so does a signing-key token's refusal.
#[tokio::test]
async fn a_jwks_that_never_arrives_reads_as_stale_beside_a_legacy_secret() {
    let db = test_db!();
    let url = unanswered_jwks_url();
    let secret_keys = format!(r#"{{"backend":"{SECRET_KEY}"}}"#);
    let (server, _) = spawn_app(
        &db,
        &[
            ("SUPABASE_JWKS_URL", url.as_str()),
            ("SUPABASE_JWT_SECRET", SECRET),
            ("SUPABASE_SECRET_KEYS", secret_keys.as_str()),
        ],
    )
    .await;
    let body = failed_refresh(&server).await;
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("no key set has been fetched yet"),
        "{body}"
    );

    // A signing-key token's refusal says why no key matched: none was ever fetched.
    let es = SigningKey::generate(Alg::ES256).unwrap();
    let body = refused_signing_key_token(&server, &user_token(&es)).await;
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("no signing key matches the token's kid")
            && message.contains("no key set has been fetched yet"),
        "{body}"
    );

    let response = server.get("/readyz").await;
    assert_eq!(response.status(), 200, "the legacy secret verifies");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["checks"]["key_ring"]["jwks"]["stale"], true, "{body}");
    let metrics = server.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.lines().any(|line| line == "edgegate_jwks_stale 1"),
        "{metrics}"
    );
}

/// A set that went stale beyond 24 h past its freshness had its keys dropped: a forced refresh
/// that fails then says so, not that "the last good key set stays in use", while every
/// signing-key token is refused.
#[tokio::test]
async fn a_refresh_that_fails_after_the_set_expired_says_its_keys_were_dropped() {
    let db = test_db!();
    let es = SigningKey::generate(Alg::ES256).unwrap();
    let host = JwksHost::start(json!([es.public_jwk()])).await;
    let clock = Clock::manual();
    let server = app_with_clock(&db, &host, &[], clock.clone()).await;
    force_refresh(&server).await;
    assert_eq!(bearer(&server, &user_token(&es)).await.0, 200);

    // Past the set's freshness (max-age 600, jittered up to 10 %) and 24 h more; the host now
    // serves what is no key set.
    clock.advance(Duration::from_secs(660 + 86_400 + 60));
    host.set_keys(json!("garbage"));
    let body = failed_refresh(&server).await;
    let message = body["message"].as_str().unwrap_or_default();
    assert!(!message.contains("stays in use"), "{body}");
    assert!(
        message.contains("stale for more than 24 h") && message.contains("keys were dropped"),
        "{body}"
    );
    // A token live by the app's clock: refused because no fetched key is left.
    let token = es
        .token(&user_claims(
            ISSUER,
            "authenticated",
            "user-1",
            clock.unix_now(),
            3600,
        ))
        .unwrap();
    let body = refused_signing_key_token(&server, &token).await;
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("no signing key matches the token's kid"),
        "{body}"
    );
}
