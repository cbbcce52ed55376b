//! `edgegate keys generate`, `edgegate token mint` and the credential lines of `edgegate check`,
//! as an operator runs them, with tokens checked by a running edgegate; and keys made by the
//! official Supabase CLI.

use std::path::{Path, PathBuf};
use std::process::{Child, Output};

use edgegate::auth::mint::SigningKey;
use serde_json::{Value, json};

use crate::process::{edgegate, free_port, output, signal, wait_exit, wait_healthy};
use crate::support::{JwksHost, in_ci};

const ISSUERS: &str = "https://abcdefghijklmnop.supabase.co/auth/v1,supabase";
const SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters-long";
/// A secret key as someone might put it in the query of SUPABASE_JWKS_URL.
pub(crate) const QUERY_SECRET: &str = "sb_secret_querysecret0123456789abcd";

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// `keys generate --alg ALG`: the private JWK line and the public JWKS line.
fn generate(dir: &Path, alg: &str) -> (Value, Value) {
    let printed = stdout(&output(
        edgegate(dir, &[]).args(["keys", "generate", "--alg", alg]),
    ));
    let lines: Vec<Value> = printed
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 2, "{printed}");
    (lines[0].clone(), lines[1].clone())
}

/// `token mint` with `args` and `vars`; the token printed.
fn mint(dir: &Path, vars: &[(&str, &str)], args: &[&str]) -> String {
    let mut command = edgegate(dir, vars);
    command.args(["token", "mint"]).args(args);
    let token = stdout(&output(&mut command));
    assert_eq!(token.lines().count(), 1, "{token}");
    token.trim().to_owned()
}

/// An `edgegate serve` child, stopped (and waited for) when dropped.
struct Served {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Served {
    async fn start(vars: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let port_text = port.to_string();
        let mut vars = vars.to_vec();
        vars.push(("PORT", &port_text));
        let child = edgegate(dir.path(), &vars).spawn().unwrap();
        let served = Self {
            child,
            port,
            _dir: dir,
        };
        assert!(wait_healthy(port).await, "edgegate never answered /healthz");
        served
    }

    async fn jwt_test(&self, token: &str) -> (u16, Value) {
        let response = reqwest::Client::new()
            .get(format!(
                "http://127.0.0.1:{}/functions/v1/jwt-test",
                self.port
            ))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    async fn stop(mut self) {
        signal(&self.child, "TERM");
        assert_eq!(wait_exit(&mut self.child).await.code(), Some(0));
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // After stop() the child has exited and this is a no-op; after a panic it is not.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn generated_keys_sign_minted_tokens_that_a_running_edgegate_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let mut published = Vec::new();
    let mut minted = Vec::new();
    for alg in ["ES256", "RS256", "EdDSA"] {
        let (private, jwks) = generate(dir.path(), alg);
        let kid = private["kid"].as_str().unwrap().to_owned();
        assert_eq!(private["alg"], alg);
        assert_eq!(jwks["keys"][0]["kid"], kid.as_str());
        assert!(jwks["keys"][0].get("d").is_none(), "public JWKS only");
        published.push(jwks["keys"][0].clone());

        let file = dir.path().join(format!("{alg}.json"));
        std::fs::write(&file, private.to_string()).unwrap();
        let file = file.to_str().unwrap();
        let vars = [("JWT_ISSUERS", ISSUERS)];
        let user = mint(
            dir.path(),
            &vars,
            &["--role", "authenticated", "--sub", "user-1", "--jwk", file],
        );
        let anon = mint(
            dir.path(),
            &vars,
            &["--role", "anon", "--ttl", "15m", "--jwk", file],
        );
        minted.push((alg, kid, user, anon));
    }

    let jwks = json!({ "keys": published }).to_string();
    let server = Served::start(&[("SUPABASE_JWKS", &jwks), ("JWT_ISSUERS", ISSUERS)]).await;
    for (alg, kid, user, anon) in minted {
        let (status, body) = server.jwt_test(&user).await;
        assert_eq!(status, 200, "{alg}: {body}");
        assert_eq!(
            body["key"],
            json!({"source": "signing_key", "kid": kid, "alg": alg}),
            "{alg}"
        );
        assert_eq!(body["role"], "authenticated");
        assert_eq!(body["sub"], "user-1");
        assert_eq!(
            body["claims"]["iss"],
            "https://abcdefghijklmnop.supabase.co/auth/v1"
        );

        let (status, body) = server.jwt_test(&anon).await;
        assert_eq!(status, 200, "{alg} anon: {body}");
        assert_eq!(body["role"], "anon");
        assert_eq!(body["claims"]["iss"], "supabase");
        let claims = &body["claims"];
        let ttl = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
        assert_eq!(ttl, 900, "{alg}: --ttl 15m");
    }
    server.stop().await;
}

#[tokio::test]
async fn legacy_tokens_verify_as_the_legacy_secret() {
    let dir = tempfile::tempdir().unwrap();
    let vars = [("SUPABASE_JWT_SECRET", SECRET), ("JWT_ISSUERS", ISSUERS)];
    let token = mint(
        dir.path(),
        &vars,
        &["--role", "service_role", "--sub", "svc", "--legacy"],
    );
    let server = Served::start(&vars).await;
    let (status, body) = server.jwt_test(&token).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["key"]["source"], "legacy_secret");
    assert_eq!(body["key"]["alg"], "HS256");
    assert_eq!(body["role"], "service_role");

    // Another secret's token is refused: the signature is really checked.
    let other = mint(
        dir.path(),
        &[("SUPABASE_JWT_SECRET", &SECRET.replace("super", "other"))],
        &["--role", "service_role", "--legacy"],
    );
    let (status, body) = server.jwt_test(&other).await;
    assert_eq!(status, 401, "{body}");
    server.stop().await;
}

/// A variable the command needs and does not have is a configuration error: exit 2, as for
/// `keys report --url` without `EDGEGATE_SECRET_KEY`.
#[test]
fn legacy_without_the_secret_exits_2_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let out =
        output(edgegate(dir.path(), &[]).args(["token", "mint", "--role", "anon", "--legacy"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty(), "no token printed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("SUPABASE_JWT_SECRET"), "{stderr}");
}

#[test]
fn a_bad_key_file_or_ttl_is_refused_without_echoing_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let (mut private, _) = generate(dir.path(), "ES256");
    let d = private["d"].as_str().unwrap().to_owned();
    private["x"] = json!(d);
    let file = dir.path().join("mismatched.json");
    std::fs::write(&file, private.to_string()).unwrap();
    let out = output(
        edgegate(dir.path(), &[])
            .args(["token", "mint", "--role", "anon", "--jwk"])
            .arg(&file),
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mismatched.json"), "{stderr}");
    assert!(stderr.contains("not one P-256 key pair"), "{stderr}");
    assert!(!stderr.contains(&d), "d leaked: {stderr}");

    let out = output(
        edgegate(dir.path(), &[])
            .args(["token", "mint", "--role", "anon", "--legacy", "--ttl", "1w"]),
    );
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ttl"));
}

/// Runs `edgegate check` off the async runtime (the fake JWKS host answers on it), on a
/// migrated SQLite file (check fails a database that `migrate` has not prepared):
/// the exit code, stdout and stderr.
async fn check(vars: Vec<(&'static str, String)>) -> (Option<i32>, String, String) {
    let out = tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().unwrap();
        let migrated = output(edgegate(dir.path(), &[]).arg("migrate"));
        assert!(migrated.status.success(), "{migrated:?}");
        let vars: Vec<(&str, &str)> = vars.iter().map(|(n, v)| (*n, v.as_str())).collect();
        output(edgegate(dir.path(), &vars).arg("check"))
    })
    .await
    .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn line<'a>(stdout: &'a str, item: &str) -> &'a str {
    stdout
        .lines()
        .find(|line| line.get(5..).is_some_and(|rest| rest.starts_with(item)))
        .unwrap_or_else(|| panic!("no {item} line in:\n{stdout}"))
}

#[tokio::test]
async fn check_lists_the_fetched_keys_and_the_credentials_without_secrets() {
    let es = SigningKey::generate_with_kid(edgegate::auth::Alg::ES256, "es-1").unwrap();
    let rs = SigningKey::generate_with_kid(edgegate::auth::Alg::RS256, "rs-1").unwrap();
    let host = JwksHost::start(json!([
        es.public_jwk(),
        rs.public_jwk(),
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
    ]))
    .await;
    let secret_keys = r#"{"backend":"sb_secret_0123456789abcdefghijklmn"}"#;
    let vars = |jwks_url: &str| {
        vec![
            ("SUPABASE_JWKS_URL", jwks_url.to_owned()),
            ("SUPABASE_JWT_SECRET", SECRET.to_owned()),
            ("SUPABASE_SECRET_KEYS", secret_keys.to_owned()),
        ]
    };
    let (code, printed, logged) = check(vars(&host.url)).await;
    assert_eq!(code, Some(0), "{printed}");
    assert_eq!(host.hits(), 1);
    let jwks = line(&printed, "jwks");
    assert!(jwks.starts_with("ok"), "{jwks}");
    assert!(jwks.contains(&host.url), "{jwks}");
    assert!(
        jwks.contains("2 keys: es-1 (ES256), rs-1 (RS256)"),
        "{jwks}"
    );
    assert!(
        jwks.contains("dropped 1: hmac (oct key in a fetched JWKS"),
        "{jwks}"
    );
    assert!(
        line(&printed, "legacy secret").contains("is set"),
        "{printed}"
    );
    assert!(
        line(&printed, "api keys").contains("secret: backend"),
        "{printed}"
    );
    let everything = format!("{printed}{logged}");
    assert!(!everything.contains(SECRET), "{everything}");
    assert!(!everything.contains("sb_secret_0123"), "{everything}");

    // Nothing listening: the JWKS line fails, and so does check.
    let nowhere = format!(
        "http://127.0.0.1:{}/auth/v1/.well-known/jwks.json",
        free_port()
    );
    let (code, printed, _) = check(vars(&nowhere)).await;
    assert_eq!(code, Some(1), "{printed}");
    let jwks = line(&printed, "jwks");
    assert!(jwks.starts_with("FAIL"), "{printed}");
    assert!(
        jwks.contains("tcp connect error"),
        "the cause is told: {jwks}"
    );
    assert!(
        line(&printed, "legacy secret").starts_with("ok"),
        "{printed}"
    );
}

/// An IPv6 listen address is written as a socket address, `[::1]:port`, wherever edgegate
/// prints it: `check`'s configuration line said `listening on ::1:24010`, and a `serve` that
/// cannot bind said `cannot listen on ::1:…`, neither of which reads back as an address.
#[tokio::test]
async fn an_ipv6_listen_address_is_printed_in_brackets() {
    let vars = vec![("HOST", "::1".to_owned()), ("PORT", "24010".to_owned())];
    let (code, printed, _) = check(vars).await;
    assert_eq!(code, Some(0), "{printed}");
    let configuration = line(&printed, "configuration");
    assert!(
        configuration.contains("listening on [::1]:24010"),
        "{configuration}"
    );

    // The port taken on ::1 (or no IPv6 here at all): either way serve cannot listen.
    let taken = std::net::TcpListener::bind("[::1]:0").ok();
    let port = taken
        .as_ref()
        .map_or_else(free_port, |listener| listener.local_addr().unwrap().port())
        .to_string();
    let expected = format!("cannot listen on [::1]:{port}:");
    let out = tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().unwrap();
        output(&mut edgegate(
            dir.path(),
            &[("HOST", "::1"), ("PORT", &port)],
        ))
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&expected), "{stderr}");
    drop(taken);
}

#[tokio::test]
async fn check_fails_when_the_jwks_publishes_keys_but_none_is_usable() {
    let host = JwksHost::start(json!([{"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}])).await;
    let only_jwks = || vec![("SUPABASE_JWKS_URL", host.url.clone())];
    let (code, printed, _) = check(only_jwks()).await;
    assert_eq!(code, Some(1), "{printed}");
    assert!(line(&printed, "jwks").starts_with("FAIL"), "{printed}");
    assert!(
        line(&printed, "legacy secret").contains("is not set"),
        "{printed}"
    );

    host.set_keys(json!([]));
    let (code, printed, _) = check(vars_with(&host, "SUPABASE_JWT_SECRET", SECRET)).await;
    assert_eq!(
        code,
        Some(0),
        "an empty set is a project on the legacy secret: {printed}"
    );
    assert!(
        line(&printed, "jwks").contains("no signing keys published yet (only the legacy secret"),
        "{printed}"
    );
}

/// An `oct` key in SUPABASE_JWKS verifies HS256 tokens as the legacy secret does, so with
/// SUPABASE_JWT_SECRET unset the legacy line does not call HS256 refused or the secret revoked
/// (it said both, then that the oct key verifies HS256).
#[tokio::test]
async fn check_does_not_call_the_legacy_secret_revoked_while_an_inline_oct_key_verifies_hs256() {
    let oct = json!({"keys": [{"kty": "oct", "kid": "octk", "alg": "HS256",
        "k": "b2N0c2VjcmV0LW9jdHNlY3JldC1vY3RzZWNyZXQtMDEyMzQ1Njc4OQ"}]});
    let (code, printed, _) = check(vec![("SUPABASE_JWKS", oct.to_string())]).await;
    assert_eq!(code, Some(0), "{printed}");
    let legacy = line(&printed, "legacy secret");
    assert!(
        !legacy.contains("refused") && !legacy.contains("revoked)"),
        "{legacy}"
    );
    assert!(
        legacy.contains("SUPABASE_JWT_SECRET is not set")
            && legacy.contains("1 oct key(s) in SUPABASE_JWKS verify HS256 tokens"),
        "{legacy}"
    );
}

/// A fetched key under the kid of an inline key is not among the fetched keys `check` lists: the
/// inline key wins, and the fetched one is reported dropped, as overridden. The line fails when
/// that leaves the published set nothing that verifies; a copy of the inline key is fine.
#[tokio::test]
async fn check_reports_a_fetched_key_an_inline_key_overrides() {
    let inline = SigningKey::generate_with_kid(edgegate::auth::Alg::ES256, "py-es").unwrap();
    let impostor = SigningKey::generate_with_kid(edgegate::auth::Alg::ES256, "py-es").unwrap();
    let host = JwksHost::start(json!([impostor.public_jwk()])).await;
    let inline_jwks = json!([inline.public_jwk()]).to_string();
    let (code, printed, _) = check(vars_with(&host, "SUPABASE_JWKS", &inline_jwks)).await;
    assert_eq!(code, Some(1), "{printed}");
    let jwks = line(&printed, "jwks  ");
    assert!(jwks.starts_with("FAIL"), "{jwks}");
    assert!(
        jwks.contains(
            "0 keys; dropped 1: py-es (overridden by the inline key py-es (ES256) from SUPABASE_JWKS"
        ),
        "{jwks}"
    );
    assert!(
        line(&printed, "jwks (inline)").contains("1 key: py-es (ES256)"),
        "{printed}"
    );

    host.set_keys(json!([inline.public_jwk()]));
    let (code, printed, _) = check(vars_with(&host, "SUPABASE_JWKS", &inline_jwks)).await;
    assert_eq!(code, Some(0), "{printed}");
    let jwks = line(&printed, "jwks  ");
    assert!(
        jwks.contains("0 keys; dropped 1: py-es (the same key as the inline key py-es (ES256)"),
        "{jwks}"
    );
}

/// A fetched JWKS that is a bare array of keys is refused saying what a fetched set must be:
/// an array is "an array of keys", taken only inline (SUPABASE_JWKS).
#[tokio::test]
async fn check_says_a_fetched_jwks_must_be_an_object_with_keys() {
    let es = SigningKey::generate_with_kid(edgegate::auth::Alg::ES256, "es-1").unwrap();
    let body = json!([es.public_jwk()]);
    let host = crate::support::serve_app(
        axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || async move { axum::Json(body) }),
        ),
        std::time::Duration::from_millis(100),
    )
    .await;
    let (code, printed, _) = check(vec![
        ("SUPABASE_JWKS_URL", host.url("/jwks.json")),
        ("SUPABASE_JWT_SECRET", SECRET.to_owned()),
    ])
    .await;
    assert_eq!(code, Some(1), "{printed}");
    let jwks = line(&printed, "jwks  ");
    assert!(jwks.starts_with("FAIL"), "{jwks}");
    assert!(
        jwks.contains("a fetched JWKS must be an object with \"keys\""),
        "{jwks}"
    );
    assert!(!jwks.contains("nor an array of keys"), "{jwks}");
}

/// SUPABASE_JWKS_URL is shown without its query: a key in it (`?apikey=sb_secret_…`) would be
/// printed otherwise.
#[tokio::test]
async fn check_shows_the_jwks_url_without_its_query() {
    let es = SigningKey::generate_with_kid(edgegate::auth::Alg::ES256, "es-1").unwrap();
    let host = JwksHost::start(json!([es.public_jwk()])).await;
    let url = format!("{}?apikey={QUERY_SECRET}", host.url);
    let (code, printed, logged) = check(vec![("SUPABASE_JWKS_URL", url)]).await;
    assert_eq!(code, Some(0), "{printed}");
    let jwks = line(&printed, "jwks  ");
    assert!(
        jwks.contains(&format!("{}?…: 1 key: es-1 (ES256)", host.url)),
        "{jwks}"
    );
    let everything = format!("{printed}{logged}");
    assert!(!everything.contains("querysecret"), "{everything}");
}

fn vars_with(host: &JwksHost, name: &'static str, value: &str) -> Vec<(&'static str, String)> {
    vec![
        ("SUPABASE_JWKS_URL", host.url.clone()),
        (name, value.to_owned()),
    ]
}

/// An empty JWKS with no legacy secret and no API key leaves nothing to verify with: `serve`
/// answers /readyz 503 for ever, so `check` fails the JWKS line (the rule of /readyz).
#[tokio::test]
async fn check_fails_when_the_key_ring_can_verify_nothing() {
    let host = JwksHost::start(json!([])).await;
    let only_jwks = vec![("SUPABASE_JWKS_URL", host.url.clone())];
    let served = Served::start(&[("SUPABASE_JWKS_URL", &host.url)]).await;
    let ready = reqwest::get(format!("http://127.0.0.1:{}/readyz", served.port))
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "serve never becomes ready");
    served.stop().await;

    let (code, printed, _) = check(only_jwks).await;
    assert_eq!(code, Some(1), "{printed}");
    let jwks = line(&printed, "jwks");
    assert!(jwks.starts_with("FAIL"), "{printed}");
    assert!(!jwks.contains("only the legacy secret"), "{printed}");
    assert!(jwks.contains("SUPABASE_JWT_SECRET"), "{printed}");

    // An API key verifies: ready, and the line says nothing of a legacy secret that is not set.
    let api_key = r#"{"backend":"sb_secret_0123456789abcdefghijklmn"}"#;
    let (code, printed, _) = check(vars_with(&host, "SUPABASE_SECRET_KEYS", api_key)).await;
    assert_eq!(code, Some(0), "{printed}");
    let jwks = line(&printed, "jwks");
    assert!(jwks.starts_with("ok"), "{printed}");
    assert!(!jwks.contains("only the legacy secret"), "{printed}");
}

/// Twilio credentials without a sender: send-sms answers 503 NOT_CONFIGURED, so the Twilio line
/// fails naming the two variables; without PUBLIC_URL it says status callbacks are off.
#[tokio::test]
async fn check_fails_twilio_credentials_without_a_sender() {
    const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";
    const TOKEN: &str = "f1e2d3c4b5a6978812345678abcdef90";
    let twilio = crate::fake_twilio::FakeTwilio::start(ACCOUNT, TOKEN).await;
    let vars = |extra: &[(&'static str, &str)]| {
        let mut vars = vec![
            ("TWILIO_ACCOUNT_SID", ACCOUNT.to_owned()),
            ("TWILIO_AUTH_TOKEN", TOKEN.to_owned()),
            ("TWILIO_API_BASE", twilio.base.clone()),
        ];
        vars.extend(
            extra
                .iter()
                .map(|(name, value)| (*name, (*value).to_owned())),
        );
        vars
    };
    let (code, printed, _) = check(vars(&[])).await;
    assert_eq!(code, Some(1), "{printed}");
    let twilio_line = line(&printed, "twilio");
    assert!(twilio_line.starts_with("FAIL"), "{printed}");
    assert!(
        twilio_line.contains("TWILIO_FROM_NUMBER")
            && twilio_line.contains("TWILIO_MESSAGING_SERVICE_SID"),
        "{printed}"
    );
    assert!(!printed.contains(TOKEN), "{printed}");

    let (code, printed, _) = check(vars(&[("TWILIO_FROM_NUMBER", "+15005550006")])).await;
    assert_eq!(code, Some(0), "{printed}");
    let twilio_line = line(&printed, "twilio");
    assert!(twilio_line.starts_with("ok"), "{printed}");
    assert!(twilio_line.contains("PUBLIC_URL is not set"), "{printed}");

    let (code, printed, _) = check(vars(&[
        (
            "TWILIO_MESSAGING_SERVICE_SID",
            "MG0123456789abcdef0123456789abcdef",
        ),
        ("PUBLIC_URL", "https://edge.example.com"),
    ]))
    .await;
    assert_eq!(code, Some(0), "{printed}");
    assert!(
        !line(&printed, "twilio").contains("PUBLIC_URL"),
        "{printed}"
    );
}

/// The Twilio line says which numbers may be texted: any, when SMS_ALLOWED_PREFIXES is unset or
/// blank (an operator who meant to restrict them learns that it is not), else the prefixes.
#[tokio::test]
async fn check_says_which_destinations_may_be_texted() {
    const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";
    const TOKEN: &str = "f1e2d3c4b5a6978812345678abcdef90";
    let twilio = crate::fake_twilio::FakeTwilio::start(ACCOUNT, TOKEN).await;
    let vars = |prefixes: Option<&str>| {
        let mut vars = vec![
            ("TWILIO_ACCOUNT_SID", ACCOUNT.to_owned()),
            ("TWILIO_AUTH_TOKEN", TOKEN.to_owned()),
            ("TWILIO_API_BASE", twilio.base.clone()),
            ("TWILIO_FROM_NUMBER", "+15005550006".to_owned()),
            ("PUBLIC_URL", "https://edge.example.com".to_owned()),
        ];
        vars.extend(prefixes.map(|value| ("SMS_ALLOWED_PREFIXES", value.to_owned())));
        vars
    };
    for any in [None, Some(""), Some("  ")] {
        let (code, printed, _) = check(vars(any)).await;
        assert_eq!(code, Some(0), "{any:?}: {printed}");
        let twilio_line = line(&printed, "twilio");
        assert!(twilio_line.starts_with("ok"), "{any:?}: {printed}");
        assert!(
            twilio_line.contains("any destination may be texted (SMS_ALLOWED_PREFIXES is not set)"),
            "{any:?}: {twilio_line}"
        );
    }
    let (code, printed, _) = check(vars(Some("+1, +44"))).await;
    assert_eq!(code, Some(0), "{printed}");
    let twilio_line = line(&printed, "twilio");
    assert!(
        twilio_line
            .contains("only numbers starting with +1, +44 may be texted (SMS_ALLOWED_PREFIXES)"),
        "{twilio_line}"
    );
    assert!(!twilio_line.contains("any destination"), "{twilio_line}");
}

/// What a dependency answers is printed by `check` on its item's one line: a newline in
/// Twilio's error message printed a line of its own, which read as another item's verdict.
#[tokio::test]
async fn check_prints_an_upstream_answer_on_its_items_line() {
    let forged = "Authenticate\nok   stripe         all good\r\u{1b}[2K\u{9b}";
    let twilio = crate::support::serve_app(
        axum::Router::new().fallback(move || async move {
            (
                axum::http::StatusCode::UNAUTHORIZED,
                axum::Json(json!({"code": 20003, "message": forged, "status": 401})),
            )
        }),
        std::time::Duration::from_millis(100),
    )
    .await;
    let (code, printed, _) = check(vec![
        (
            "TWILIO_ACCOUNT_SID",
            "AC0123456789abcdef0123456789abcdef".to_owned(),
        ),
        (
            "TWILIO_AUTH_TOKEN",
            "f1e2d3c4b5a6978812345678abcdef90".to_owned(),
        ),
        ("TWILIO_FROM_NUMBER", "+15005550006".to_owned()),
        ("TWILIO_API_BASE", twilio.url("")),
    ])
    .await;
    assert_eq!(code, Some(1), "{printed}");
    assert!(
        printed
            .lines()
            .all(|line| line.starts_with("ok   ") || line.starts_with("FAIL ")),
        "{printed:?}"
    );
    assert_eq!(
        printed
            .lines()
            .filter(|line| line.get(5..).is_some_and(|rest| rest.starts_with("stripe")))
            .count(),
        1,
        "{printed}"
    );
    assert!(!printed.contains(['\r', '\u{1b}', '\u{9b}']), "{printed:?}");
    let twilio_line = line(&printed, "twilio");
    assert!(
        twilio_line.contains(r"Authenticate\nok   stripe"),
        "{twilio_line}"
    );
}

/// An argument the command cannot use is a usage error, exit 2 as clap's own are (a URL without
/// a scheme and an empty role exited 1, as if the check or the signing had failed); and a
/// command that reads no configuration runs whatever the configuration holds (a malformed PORT
/// stopped `keys generate`, a MySQL DATABASE_URL `healthcheck URL`, with exit 2).
#[tokio::test]
async fn usage_errors_exit_2_and_commands_without_configuration_ignore_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = |vars: &[(&str, &str)], args: &[&str]| {
        let out = output(edgegate(dir.path(), vars).args(args));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for url in ["127.0.0.1:19260", "not a url", "ftp://127.0.0.1/"] {
        let (code, stderr) = run(&[], &["healthcheck", url]);
        assert_eq!(code, Some(2), "{url}: {stderr}");
        assert!(stderr.contains("absolute http(s) URL"), "{url}: {stderr}");
    }
    let secret = [(
        "SUPABASE_JWT_SECRET",
        "a-legacy-secret-of-at-least-32-bytes!",
    )];
    for role in ["", "  "] {
        let (code, stderr) = run(&secret, &["token", "mint", "--legacy", "--role", role]);
        assert_eq!(code, Some(2), "{role:?}: {stderr}");
        assert!(stderr.contains("--role"), "{stderr}");
    }

    let (code, stderr) = run(&[("PORT", "abc")], &["keys", "generate", "--alg", "ES256"]);
    assert_eq!(code, Some(0), "{stderr}");
    let healthy = crate::support::serve_app(
        axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok" })),
        std::time::Duration::from_millis(100),
    )
    .await;
    let url = healthy.url("/");
    let (code, stderr) = tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().unwrap();
        let out = output(
            edgegate(
                dir.path(),
                &[("DATABASE_URL", "mysql://x"), ("PORT", "abc")],
            )
            .args(["healthcheck", &url]),
        );
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    // The commands that read it still refuse it.
    let (code, stderr) = run(&[("PORT", "abc")], &["healthcheck"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("PORT"), "{stderr}");
}

/// `--help` of the commands that read the configuration says where it comes from, where it is
/// documented, and what the exit codes mean.
#[test]
fn help_names_the_configuration_and_the_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["migrate", "--help"],
        &["check", "--help"],
    ] {
        let out = output(edgegate(dir.path(), &[]).args(args));
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}");
        assert!(
            help.contains(".env")
                && help.contains("docs/CONFIGURATION.md")
                && help.contains("Exit codes: 0 success; 1 "),
            "{args:?}: {help}"
        );
    }
}

/// The official Supabase CLI, where `.ci/run` installs it; `None` (after a notice) when absent,
/// except under `CI=true`, where its absence fails the test.
fn supabase_cli() -> Option<PathBuf> {
    let cli =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/node_modules/.bin/supabase");
    if cli.exists() {
        return Some(cli);
    }
    assert!(
        !in_ci(),
        "CI=true and the Supabase CLI is not installed at {}",
        cli.display()
    );
    crate::support::skipped(&format!(
        "the Supabase CLI is not installed at {}",
        cli.display()
    ));
    None
}

/// The public JWK of a private one, derived without edgegate's code: drop the private members.
fn public_part(private: &Value) -> Value {
    let mut public = private.clone();
    let members = public.as_object_mut().unwrap();
    for name in ["d", "p", "q", "dp", "dq", "qi"] {
        members.remove(name);
    }
    members.insert("key_ops".to_owned(), json!(["verify"]));
    public
}

/// Signs a JWT with Node's crypto (OpenSSL) from a private JWK read on stdin.
const NODE_SIGN: &str = r#"
const crypto = require('node:crypto');
let input = '';
process.stdin.on('data', (chunk) => (input += chunk)).on('end', () => {
  const { jwk, claims } = JSON.parse(input);
  const key = crypto.createPrivateKey({ key: jwk, format: 'jwk' });
  const part = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const signed = part({ alg: jwk.alg, kid: jwk.kid, typ: 'JWT' }) + '.' + part(claims);
  const digest = jwk.alg === 'EdDSA' ? null : 'sha256';
  const signature = crypto.sign(digest, Buffer.from(signed), { key, dsaEncoding: 'ieee-p1363' });
  process.stdout.write(signed + '.' + signature.toString('base64url'));
});
"#;

fn node_sign(jwk: &Value, claims: &Value) -> String {
    use std::io::Write as _;
    let mut child = std::process::Command::new("node")
        .args(["-e", NODE_SIGN])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("node runs (the Supabase CLI needs it too)");
    let input = json!({"jwk": jwk, "claims": claims}).to_string();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "node failed");
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn keys_from_the_supabase_cli_mint_tokens_and_ours_load_in_openssl() {
    let Some(cli) = supabase_cli() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut published = Vec::new();
    let mut expected = Vec::new();
    for alg in ["ES256", "RS256"] {
        let out = std::process::Command::new(&cli)
            .args(["gen", "signing-key", "--algorithm", alg])
            .current_dir(dir.path())
            .env("DO_NOT_TRACK", "1")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run the Supabase CLI");
        assert!(
            out.status.success(),
            "supabase gen signing-key --algorithm {alg} failed"
        );
        let printed = String::from_utf8(out.stdout).unwrap();
        let private: Value = serde_json::from_str(printed.trim()).expect("the CLI prints one JWK");
        SigningKey::from_private_jwk(&private).expect("the CLI's key loads");
        // The CLI's own file layout: supabase/signing_keys.json is an array of keys.
        let file = dir.path().join(format!("signing_keys_{alg}.json"));
        std::fs::write(&file, json!([private]).to_string()).unwrap();
        let token = mint(
            dir.path(),
            &[("JWT_ISSUERS", ISSUERS)],
            &[
                "--role",
                "authenticated",
                "--sub",
                "cli-user",
                "--jwk",
                file.to_str().unwrap(),
            ],
        );
        published.push(public_part(&private));
        expected.push((alg, private["kid"].clone(), token));
    }
    // And the other way: our private JWKs, loaded by OpenSSL through Node, sign valid tokens.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for alg in ["ES256", "RS256", "EdDSA"] {
        let (private, jwks) = generate(dir.path(), alg);
        let claims = json!({"iss": "supabase", "role": "anon", "iat": now, "exp": now + 600});
        published.push(jwks["keys"][0].clone());
        expected.push((alg, private["kid"].clone(), node_sign(&private, &claims)));
    }

    let jwks = json!({ "keys": published }).to_string();
    let server = Served::start(&[("SUPABASE_JWKS", &jwks), ("JWT_ISSUERS", ISSUERS)]).await;
    for (alg, kid, token) in expected {
        let (status, body) = server.jwt_test(&token).await;
        assert_eq!(status, 200, "{alg}: {body}");
        assert_eq!(
            body["key"],
            json!({"source": "signing_key", "kid": kid, "alg": alg})
        );
    }
    server.stop().await;
}

/// Fly runs `release_command` on a temporary Machine with `RELEASE_COMMAND=1` set. There, a
/// SQLite database (DATABASE_URL forgotten, the default) would be migrated in a file thrown away
/// with the Machine, and the deploy would go on with every instance on its own empty file:
/// `migrate` refuses it as a configuration error, which stops the deploy. Anywhere else SQLite
/// migrates as before.
#[test]
fn migrate_on_a_release_machine_refuses_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let out = output(edgegate(dir.path(), &[("RELEASE_COMMAND", "1")]).arg("migrate"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");
    assert!(stderr.contains("RELEASE_COMMAND"), "{stderr}");
    assert!(
        !dir.path().join("edgegate.db").exists(),
        "no SQLite file made"
    );

    let out = output(edgegate(dir.path(), &[]).arg("migrate"));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("edgegate.db").exists());
}
