//! Who still uses the legacy secret: callers counted per kind, route and client on every
//! instance, summed in the database, listed by `GET /admin/signing-keys` and `edgegate keys report`.

use std::sync::Arc;
use std::time::Duration;

use crate::support::now_ms;
use edgegate::AppState;
use edgegate::auth::Alg;
use edgegate::auth::callers::{
    CallerKind, CallerTracker, LegacyKind, MAX_CANDIDATES, MAX_NAMED_CLIENTS,
};
use edgegate::auth::mint::{SigningKey, api_key_claims, legacy_token, user_claims};
use edgegate::auth::usage::UsageTracker;
use edgegate::clock::Clock;
use edgegate::store::{CallerUsage, KeyUsage};
use serde_json::{Value, json};
use sqlx::Connection as _;

use crate::process::{edgegate, output};
use crate::support::{TestDb, TestServer, spawn_app, spawn_app_with_clock};
use crate::test_db;

const SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters-long";
const ISSUER: &str = "https://abcdefghijklmnop.supabase.co/auth/v1";
const SECRET_KEY: &str = "sb_secret_0123456789abcdefghijklmn";
const USER_ID: &str = "0d7c1a8e-5b7e-4c55-9e8a-6f2f2f4f9c11";
const JWT_TEST: &str = "/functions/v1/jwt-test";
const SYNC: &str = "/functions/v1/sync-stripe-products-hardened";

fn legacy_key(role: &str) -> String {
    legacy_token(
        SECRET.as_bytes(),
        &api_key_claims("abcdefghijklmnop", role, now_ms() / 1000, 3600),
        None,
    )
}

fn legacy_session() -> String {
    legacy_token(
        SECRET.as_bytes(),
        &user_claims(ISSUER, "authenticated", USER_ID, now_ms() / 1000, 3600),
        None,
    )
}

async fn instance(db: &TestDb) -> (TestServer, AppState) {
    let secret_keys = format!(r#"{{"backend":"{SECRET_KEY}"}}"#);
    spawn_app(
        db,
        &[
            ("SUPABASE_JWT_SECRET", SECRET),
            (
                "JWT_ISSUERS",
                "https://abcdefghijklmnop.supabase.co/auth/v1,supabase",
            ),
            ("SUPABASE_SECRET_KEYS", &secret_keys),
        ],
    )
    .await
}

/// supabase-js with the legacy anon key: `apikey` and the same key as Bearer, `x-client-info`.
async fn supabase_js(server: &TestServer, anon: &str) {
    let response = server
        .client
        .get(server.url(JWT_TEST))
        .header("apikey", anon)
        .bearer_auth(anon)
        .header("x-client-info", "supabase-js/2.47.0")
        .header("user-agent", "Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// A nightly job with the legacy service_role key; Stripe is not configured, so the sync answers
/// 503 after the credential was verified.
async fn nightly_export(server: &TestServer, service_role: &str) {
    let response = server
        .client
        .post(server.url(SYNC))
        .bearer_auth(service_role)
        .header("user-agent", "nightly-export/1.0 (linux; cron)")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
}

/// A user's session still signed with the legacy secret, from a mobile app.
async fn mobile_session(server: &TestServer, token: &str) {
    let response = server
        .client
        .post(server.url(JWT_TEST))
        .bearer_auth(token)
        .header("user-agent", "okhttp/4.12.0")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

async fn admin(server: &TestServer, query: &str) -> Value {
    let response = server
        .client
        .get(server.url(&format!("/admin/signing-keys{query}")))
        .header("apikey", SECRET_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// `legacy_usage` without `last_seen`, which the test cannot know exactly.
fn callers(report: &Value) -> Vec<Value> {
    callers_in(report, "legacy_usage")
}

/// A list of callers of `report` without `last_seen`.
fn callers_in(report: &Value, list: &str) -> Vec<Value> {
    report[list]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let mut row = row.clone();
            let last_seen = row.as_object_mut().unwrap().remove("last_seen").unwrap();
            assert!(last_seen.as_i64().unwrap() > now_ms() - 600_000, "{row}");
            row
        })
        .collect()
}

async fn metric(server: &TestServer, line_start: &str) -> String {
    let text = server.get("/metrics").await.text().await.unwrap();
    text.lines()
        .find(|line| line.starts_with(line_start))
        .unwrap_or_else(|| panic!("no {line_start} in\n{text}"))
        .to_owned()
}

#[tokio::test]
async fn three_legacy_callers_on_two_instances_are_named_with_summed_counts() {
    let db = test_db!();
    let (a, a_state) = instance(&db).await;
    let (b, b_state) = instance(&db).await;
    let (anon, service_role, session) = (
        legacy_key("anon"),
        legacy_key("service_role"),
        legacy_session(),
    );
    for _ in 0..3 {
        supabase_js(&a, &anon).await;
    }
    for _ in 0..2 {
        supabase_js(&b, &anon).await;
    }
    nightly_export(&a, &service_role).await;
    nightly_export(&b, &service_role).await;
    mobile_session(&a, &session).await;
    mobile_session(&b, &session).await;
    mobile_session(&b, &session).await;

    // Before any flush, an instance knows its own counts.
    let own = admin(&a, "").await;
    assert_eq!(own["legacy_usage"][0]["count"], 3, "{own}");
    assert_eq!(own["legacy_usage"].as_array().unwrap().len(), 3, "{own}");

    // What the 60 s flush (or shutdown) does on each instance.
    let store = db.store().await;
    a_state.usage.flush(&store).await.unwrap();
    b_state.usage.flush(&store).await.unwrap();

    let report = admin(&b, "").await;
    assert_eq!(
        callers(&report),
        vec![
            json!({"kind": "anon_key", "route": JWT_TEST, "client": "supabase-js/2.47.0", "count": 5}),
            json!({"kind": "user_session", "route": JWT_TEST, "client": "okhttp/4.12.0", "count": 3}),
            json!({"kind": "service_role_key", "route": SYNC, "client": "nightly-export/1.0", "count": 2}),
        ],
        "{report}"
    );
    assert_eq!(report["legacy_revocation_safe"], false);
    assert_eq!(
        report["reason"],
        "legacy anon_key still used by supabase-js/2.47.0 on /functions/v1/jwt-test, 5 times \
         in the last 24 h; 10 verifications with the legacy secret in all, from 3 clients"
    );
    let kinds = report["legacy_kinds"].as_array().unwrap();
    let counts: Vec<(&str, i64)> = kinds
        .iter()
        .map(|kind| {
            assert!(kind["last_seen"].as_i64().unwrap() > 0, "{kind}");
            (
                kind["kind"].as_str().unwrap(),
                kind["count"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        counts,
        [
            ("anon_key", 5),
            ("service_role_key", 2),
            ("user_session", 3)
        ]
    );
    assert_eq!(report["legacy_secret"]["verified_count"], 10);
    // The admin calls themselves came with the sb_secret_ key, named "backend".
    assert_eq!(report["api_key_usage"][0]["kind"], "secret:backend");
    assert_eq!(report["api_key_usage"][0]["route"], "/admin/signing-keys");

    // Each instance counts its own; no client label.
    assert_eq!(
        metric(&a, "edgegate_legacy_verifications_total{kind=\"anon_key\"}").await,
        "edgegate_legacy_verifications_total{kind=\"anon_key\"} 3"
    );
    assert_eq!(
        metric(
            &b,
            "edgegate_legacy_verifications_total{kind=\"user_session\"}"
        )
        .await,
        "edgegate_legacy_verifications_total{kind=\"user_session\"} 2"
    );

    // Nothing identifying is stored: no token, user id or address.
    let rows = store.caller_usage_hours_since(0).await.unwrap();
    let stored = format!("{rows:?}");
    for secret in [anon.as_str(), &service_role, &session, USER_ID, "127.0.0.1"] {
        assert!(!stored.contains(secret), "{stored}");
    }
}

/// supabase-js after the project rotated to signing keys, in an app that still ships the legacy
/// anon key: the user's session is an ES256 Bearer (which wins), and `apikey` is the legacy key.
/// Revoking the legacy secret in Supabase invalidates that key, so it is legacy use, counted under
/// its kind, route and client, although the request was let in by the signing key.
/// A real client beside a flood of one-off clients (an app's build number in its `User-Agent`):
/// the flood is counted as `other`, which is no caller to fix. The reason names the real client
/// and says how much came from clients not named; before the flush the report names the clients
/// the flush will name, not the one-off values waiting to be judged.
#[tokio::test]
async fn the_reason_names_a_real_caller_and_never_other() {
    let db = test_db!();
    let (server, state) = instance(&db).await;
    let anon = legacy_key("anon");
    for _ in 0..20 {
        supabase_js(&server, &anon).await;
    }
    for build in 1000..1300 {
        let response = server
            .client
            .get(server.url(JWT_TEST))
            .header("apikey", &anon)
            .header("user-agent", format!("MyApp/{build} CFNetwork/1410"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let store = db.store().await;
    for flushed in [false, true] {
        if flushed {
            state.usage.flush(&store).await.unwrap();
        }
        let report = admin(&server, "").await;
        let listed: Vec<(&str, i64)> = report["legacy_usage"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                (
                    row["client"].as_str().unwrap(),
                    row["count"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            listed,
            [("other", 300), ("supabase-js/2.47.0", 20)],
            "flushed: {flushed}"
        );
        assert_eq!(
            report["reason"],
            "legacy anon_key still used by supabase-js/2.47.0 on \
             /functions/v1/jwt-test, 20 times in the last 24 h; 320 verifications with the \
             legacy secret in all, 20 from 1 named client and 300 from clients not named \
             (counted as other)",
            "flushed: {flushed}"
        );
    }
}

#[tokio::test]
async fn a_legacy_anon_key_beside_a_signing_key_session_is_legacy_use() {
    let db = test_db!();
    let es = SigningKey::generate(Alg::ES256).unwrap();
    let jwks = es.public_jwks().to_string();
    let secret_keys = format!(r#"{{"backend":"{SECRET_KEY}"}}"#);
    let (server, _state) = spawn_app(
        &db,
        &[
            ("SUPABASE_JWT_SECRET", SECRET),
            (
                "JWT_ISSUERS",
                "https://abcdefghijklmnop.supabase.co/auth/v1,supabase",
            ),
            ("SUPABASE_SECRET_KEYS", &secret_keys),
            (
                "SUPABASE_PUBLISHABLE_KEYS",
                r#"{"web":"sb_publishable_web_0123456789"}"#,
            ),
            ("SUPABASE_JWKS", &jwks),
        ],
    )
    .await;
    let session = es
        .token(&user_claims(
            ISSUER,
            "authenticated",
            USER_ID,
            now_ms() / 1000,
            3600,
        ))
        .unwrap();
    let (anon, forged) = (
        legacy_key("anon"),
        legacy_token(
            b"another-projects-secret-of-at-least-32-characters",
            &api_key_claims("abcdefghijklmnop", "anon", now_ms() / 1000, 3600),
            None,
        ),
    );
    let call = |apikey: String| {
        server
            .client
            .get(server.url(JWT_TEST))
            .header("apikey", apikey)
            .bearer_auth(&session)
            .header("x-client-info", "supabase-js/2.49.1")
            .send()
    };
    for _ in 0..2 {
        let response = call(anon.clone()).await.unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        // The Bearer is what let the request in.
        assert_eq!(body["key"]["source"], "signing_key", "{body}");
    }
    // An apikey the legacy secret did not sign, an unknown key, a session: nothing to count.
    for apikey in [forged, "sb_publishable_abc".to_owned(), session.clone()] {
        assert_eq!(call(apikey).await.unwrap().status(), 200);
    }
    // The app's next release, with the new publishable key: the proof that it moved.
    let moved = call("sb_publishable_web_0123456789".to_owned())
        .await
        .unwrap();
    assert_eq!(moved.status(), 200);

    let report = admin(&server, "").await;
    assert_eq!(
        callers(&report),
        vec![
            json!({"kind": "anon_key", "route": JWT_TEST, "client": "supabase-js/2.49.1", "count": 2})
        ],
        "{report}"
    );
    assert_eq!(report["legacy_revocation_safe"], false, "{report}");
    assert_eq!(report["legacy_secret"]["verified_count"], 2, "{report}");
    let web: Vec<&Value> = report["api_key_usage"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row["kind"] == "publishable:web")
        .collect();
    assert_eq!(web.len(), 1, "{report}");
    assert_eq!(
        (&web[0]["route"], &web[0]["client"], &web[0]["count"]),
        (&json!(JWT_TEST), &json!("supabase-js/2.49.1"), &json!(1)),
        "{report}"
    );
    assert_eq!(
        metric(
            &server,
            "edgegate_legacy_verifications_total{kind=\"anon_key\"}"
        )
        .await,
        "edgegate_legacy_verifications_total{kind=\"anon_key\"} 2"
    );
}

/// The same supabase-js client after step 5 (edgegate restarted without `SUPABASE_JWT_SECRET`):
/// its ES256 session still lets it in, but the legacy anon key it ships in `apikey` can no
/// longer be verified, and that key is what Supabase refuses once the legacy keys are disabled.
/// It is counted where the runbook looks after step 5, as unverifiable: in the
/// `UNAUTHORIZED_LEGACY_JWT` series of `edgegate_credential_verifications_total` (under
/// `kid="apikey_beside"`) and in `unverified_legacy_usage` by kind, route and client, never as a
/// verified use (not in `legacy_usage` nor `legacy_kinds`, no
/// `edgegate_legacy_verifications_total`, no key usage).
#[tokio::test]
async fn a_legacy_anon_key_beside_a_session_after_revocation_is_counted_unverified() {
    let db = test_db!();
    let es = SigningKey::generate(Alg::ES256).unwrap();
    let jwks = es.public_jwks().to_string();
    let secret_keys = format!(r#"{{"backend":"{SECRET_KEY}"}}"#);
    let (server, state) = spawn_app(
        &db,
        &[
            (
                "JWT_ISSUERS",
                "https://abcdefghijklmnop.supabase.co/auth/v1,supabase",
            ),
            ("SUPABASE_SECRET_KEYS", &secret_keys),
            ("SUPABASE_JWKS", &jwks),
        ],
    )
    .await;
    let beside = "edgegate_credential_verifications_total{source=\"legacy_secret\",kid=\"apikey_beside\",alg=\"HS256\",outcome=\"UNAUTHORIZED_LEGACY_JWT\"}";
    // At 0 from the start, so that `increase()` sees the first one.
    assert_eq!(metric(&server, beside).await, format!("{beside} 0"));
    let session = es
        .token(&user_claims(
            ISSUER,
            "authenticated",
            USER_ID,
            now_ms() / 1000,
            3600,
        ))
        .unwrap();
    let call = |apikey: String, client: &'static str| {
        server
            .client
            .get(server.url(JWT_TEST))
            .header("apikey", apikey)
            .bearer_auth(&session)
            .header("x-client-info", client)
            .send()
    };
    let (anon, service_role) = (legacy_key("anon"), legacy_key("service_role"));
    for _ in 0..2 {
        let response = call(anon.clone(), "supabase-js/2.47.0").await.unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["key"]["source"], "signing_key", "{body}");
    }
    assert_eq!(
        call(service_role.clone(), "backend-sync/3.1")
            .await
            .unwrap()
            .status(),
        200
    );
    // Not a legacy API key's shape: an HS256 user session, an ES256 token, something else.
    for apikey in [legacy_session(), session.clone(), "a.b.c".to_owned()] {
        assert_eq!(call(apikey, "noise/1.0").await.unwrap().status(), 200);
    }

    assert_eq!(metric(&server, beside).await, format!("{beside} 3"));
    // Nothing was verified with the legacy secret.
    assert_eq!(
        metric(
            &server,
            "edgegate_legacy_verifications_total{kind=\"anon_key\"}"
        )
        .await,
        "edgegate_legacy_verifications_total{kind=\"anon_key\"} 0"
    );
    // Through the database, as every instance's counts are summed.
    state.usage.flush(&db.store().await).await.unwrap();
    let report = admin(&server, "").await;
    assert_eq!(callers(&report), Vec::<Value>::new(), "{report}");
    assert_eq!(
        callers_in(&report, "unverified_legacy_usage"),
        vec![
            json!({"kind": "anon_key_unverified", "route": JWT_TEST, "client": "supabase-js/2.47.0", "count": 2}),
            json!({"kind": "service_role_key_unverified", "route": JWT_TEST, "client": "backend-sync/3.1", "count": 1}),
        ],
        "{report}"
    );
    for kind in report["legacy_kinds"].as_array().unwrap() {
        assert_eq!(kind["count"], 0, "{report}");
    }
    assert_eq!(report["legacy_secret"]["configured"], false, "{report}");
    assert_eq!(report["legacy_secret"]["verified_count"], 0, "{report}");
    assert_eq!(report["legacy_revocation_safe"], true, "{report}");
    // Nor are they verifications per hour: no series of the legacy secret shows them.
    let hourly = report["usage_hourly"]["series"].as_array().unwrap();
    assert!(
        hourly.iter().all(|s| s["source"] != "legacy_secret"),
        "{hourly:?}"
    );
    // No token in what is stored.
    let stored = format!(
        "{:?}",
        db.store().await.caller_usage_hours_since(0).await.unwrap()
    );
    for token in [anon.as_str(), &service_role, &session] {
        assert!(!stored.contains(token), "{stored}");
    }
}

#[tokio::test]
async fn keys_report_reads_a_running_edgegate() {
    let db = test_db!();
    let (a, a_state) = instance(&db).await;
    supabase_js(&a, &legacy_key("anon")).await;
    a_state.usage.flush(&db.store().await).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://{}", a.addr);
    let run = |vars: Vec<(&'static str, String)>, url: String| {
        let path = dir.path().to_owned();
        tokio::task::spawn_blocking(move || {
            let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
            output(edgegate(&path, &vars).args(["keys", "report", "--url", &url, "--window", "2h"]))
        })
    };
    let printed = run(
        vec![("EDGEGATE_SECRET_KEY", SECRET_KEY.to_owned())],
        url.clone(),
    )
    .await
    .unwrap();
    let text = String::from_utf8(printed.stdout).unwrap();
    assert!(printed.status.success(), "{text}{:?}", printed.stderr);
    assert!(text.starts_with("Key usage over the last 2 h"), "{text}");
    let caller = text
        .lines()
        .find(|line| line.starts_with("anon_key"))
        .unwrap_or_else(|| panic!("{text}"));
    let cells: Vec<&str> = caller.split_whitespace().collect();
    assert_eq!(
        cells[..4],
        ["anon_key", JWT_TEST, "supabase-js/2.47.0", "1"]
    );
    assert!(
        text.contains(
            "Revoking the legacy secret: NOT SAFE. legacy anon_key still used by supabase-js/2.47.0"
        ),
        "{text}"
    );
    assert!(!text.contains(SECRET_KEY));

    // A window the API does not take: the contract's error, naming the field.
    for bad in ["0", "2592001", "24h", ""] {
        let response = a
            .client
            .get(a.url(&format!("/admin/signing-keys?window_seconds={bad}")))
            .header("apikey", SECRET_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422, "{bad:?}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "VALIDATION_FAILED");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .starts_with("window_seconds")
        );
    }

    // Without the key: a configuration error naming the variable.
    let refused = run(vec![], url).await.unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("EDGEGATE_SECRET_KEY"));
}

/// Counts are kept by the hour, with the hour's last use. Over a window shorter than the hour it
/// starts in, use in that hour but before the window is in no number of the answer, as it is in
/// neither the callers nor the verdict; an hour used inside the window counts whole, and the
/// answer says from when.
#[tokio::test]
async fn use_before_a_short_window_is_in_no_number_of_it() {
    let db = test_db!();
    let key = SigningKey::generate(Alg::ES256).unwrap();
    let jwks = key.public_jwks().to_string();
    let secret_keys = format!(r#"{{"backend":"{SECRET_KEY}"}}"#);
    let clock = Clock::manual();
    // Ten minutes into an hour: the use before the window and the use in it share that hour.
    let into_hour = u64::try_from(clock.now_ms().rem_euclid(HOUR)).unwrap();
    clock.advance(Duration::from_millis(3_600_000 - into_hour + 600_000));
    let hour = clock.now_ms() - clock.now_ms().rem_euclid(HOUR);
    let (server, _state) = spawn_app_with_clock(
        &db,
        &[
            ("SUPABASE_JWT_SECRET", SECRET),
            (
                "JWT_ISSUERS",
                "https://abcdefghijklmnop.supabase.co/auth/v1,supabase",
            ),
            ("SUPABASE_SECRET_KEYS", &secret_keys),
            ("SUPABASE_JWKS", &jwks),
            ("LEGACY_REVOCATION_WINDOW_SECONDS", "40"),
        ],
        clock.clone(),
    )
    .await;
    let claims = api_key_claims("abcdefghijklmnop", "service_role", clock.unix_now(), 3600);
    nightly_export(&server, &legacy_token(SECRET.as_bytes(), &claims, None)).await;
    clock.advance(Duration::from_secs(45));
    let claims = user_claims(ISSUER, "authenticated", USER_ID, clock.unix_now(), 3600);
    mobile_session(&server, &key.token(&claims).unwrap()).await;

    let report = admin(&server, "?window_seconds=40").await;
    let series: Vec<(&str, Option<&str>, i64)> = report["usage_hourly"]["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["source"].as_str().unwrap(),
                s["kind"].as_str(),
                s["count"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        series,
        [("signing_key", None, 1), ("api_key", None, 1)],
        "{report:#}"
    );
    assert_eq!(report["legacy_usage"], json!([]), "{report:#}");
    let kinds: Vec<i64> = report["legacy_kinds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|kind| kind["count"].as_i64().unwrap())
        .collect();
    assert_eq!(kinds, [0, 0, 0], "{report:#}");
    assert_eq!(report["legacy_secret"]["verified_count"], 0, "{report:#}");
    let legacy_key_row = report["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|key| key["source"] == "legacy_secret")
        .unwrap();
    assert_eq!(legacy_key_row["verified_count"], 0, "{report:#}");
    assert_eq!(report["legacy_revocation_safe"], true, "{report:#}");
    assert_eq!(report["usage_straddling_hour_ms"], hour, "{report:#}");

    let url = format!("http://{}", server.addr);
    let dir = tempfile::tempdir().unwrap();
    let printed = tokio::task::spawn_blocking(move || {
        output(
            edgegate(dir.path(), &[("EDGEGATE_SECRET_KEY", SECRET_KEY)])
                .args(["keys", "report", "--url", &url]),
        )
    })
    .await
    .unwrap();
    let text = String::from_utf8(printed.stdout).unwrap();
    assert!(printed.status.success(), "{text}{:?}", printed.stderr);
    assert!(!text.contains("legacy secret (HS256)"), "{text}");
    assert!(text.contains("No legacy caller in the window."), "{text}");
    assert!(
        text.contains("Counted by the hour: the hour from "),
        "the hour counted whole is told: {text}"
    );
}

#[tokio::test]
async fn ten_thousand_random_user_agents_keep_memory_and_rows_bounded() {
    let db = test_db!();
    let (a, a_state) = instance(&db).await;
    let anon = legacy_key("anon");
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (client, url, anon, sent) = (
            a.client.clone(),
            a.url(JWT_TEST),
            anon.clone(),
            sent.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let n = sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if n >= 11_000 {
                    break;
                }
                // Every eleventh request is the real client; the rest each name a new one.
                let agent = if n % 11 == 0 {
                    "supabase-js/2.47.0".to_owned()
                } else {
                    format!("random-{}/1.0", uuid::Uuid::new_v4().simple())
                };
                let response = client
                    .get(&url)
                    .bearer_auth(&anon)
                    .header("user-agent", agent)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    // The bounds hold per hour; a run that crosses the hour's end holds two hours' tables (seen
    // in CI at 08:00 UTC: 400 candidates and 402 counters over two hours).
    let held = a_state.usage.callers.footprint();
    assert!((1..=2).contains(&held.hours), "{held:?}");
    assert!(
        held.candidate_clients <= MAX_CANDIDATES * held.hours,
        "{held:?}"
    );
    assert!(
        held.counters <= (MAX_CANDIDATES + 1) * held.hours,
        "{held:?}"
    );

    let store = db.store().await;
    a_state.usage.flush(&store).await.unwrap();
    let after = a_state.usage.callers.footprint();
    assert!(
        after.named_clients <= MAX_NAMED_CLIENTS && after.counters == 0,
        "{after:?}"
    );
    let rows = store.caller_usage_hours_since(0).await.unwrap();
    let anon_rows: Vec<&CallerUsage> = rows.iter().filter(|row| row.kind == "anon_key").collect();
    assert!(
        anon_rows.len() <= 2 * (MAX_NAMED_CLIENTS + 1),
        "{}",
        anon_rows.len()
    );
    let count = |client: &str| -> i64 {
        anon_rows
            .iter()
            .filter(|row| row.client == client)
            .map(|row| row.verified_count)
            .sum()
    };
    assert_eq!(
        count("supabase-js/2.47.0"),
        1_000,
        "the real caller keeps its name"
    );
    assert_eq!(
        anon_rows.iter().map(|row| row.verified_count).sum::<i64>(),
        11_000,
        "nothing lost"
    );
    assert_eq!(
        metric(&a, "edgegate_legacy_verifications_total{kind=\"anon_key\"}").await,
        "edgegate_legacy_verifications_total{kind=\"anon_key\"} 11000"
    );
}

/// 2026-12-01 09:30 UTC: the report's "now" in the snapshot.
const SNAPSHOT_NOW: i64 = 1_796_117_400_000;
const HOUR: i64 = 3_600_000;

fn key_row(hours_ago: i64, source: &str, kid: &str, alg: &str, count: i64) -> KeyUsage {
    let hour = SNAPSHOT_NOW - SNAPSHOT_NOW % HOUR - hours_ago * HOUR;
    KeyUsage {
        hour_start_ms: hour,
        source: source.into(),
        kid: kid.into(),
        alg: alg.into(),
        verified_count: count,
        last_verified_at_ms: hour + 1_234_000,
    }
}

fn caller_row(
    hours_ago: i64,
    source: &str,
    kind: &str,
    route: &str,
    client: &str,
    count: i64,
) -> CallerUsage {
    let hour = SNAPSHOT_NOW - SNAPSHOT_NOW % HOUR - hours_ago * HOUR;
    CallerUsage {
        hour_start_ms: hour,
        source: source.into(),
        kind: kind.into(),
        route: route.into(),
        client: client.into(),
        verified_count: count,
        last_verified_at_ms: hour + 1_234_000,
    }
}

#[tokio::test]
async fn keys_report_from_the_database_matches_its_snapshot() {
    let db = test_db!();
    let store = db.store().await;
    let mut keys = Vec::new();
    let mut callers = Vec::new();
    // A day of traffic: the app moved to signing keys; supabase-js on an old build still sends the
    // legacy anon key, a nightly export the legacy service_role key, some sessions linger.
    for hours_ago in 0..=24 {
        let anon = 40 + hours_ago * 3;
        keys.push(key_row(
            hours_ago,
            "signing_key",
            "2b9f0c1e",
            "ES256",
            900 - hours_ago * 20,
        ));
        callers.push(caller_row(
            hours_ago,
            "legacy_secret",
            "anon_key",
            JWT_TEST,
            "supabase-js/2.47.0",
            anon,
        ));
        let mut legacy = anon;
        if hours_ago % 24 == 2 {
            callers.push(caller_row(
                hours_ago,
                "legacy_secret",
                "service_role_key",
                SYNC,
                "nightly-export/1.0",
                12,
            ));
            legacy += 12;
        }
        if hours_ago >= 18 {
            callers.push(caller_row(
                hours_ago,
                "legacy_secret",
                "user_session",
                JWT_TEST,
                "okhttp/4.12.0",
                30 - hours_ago,
            ));
            callers.push(caller_row(
                hours_ago,
                "legacy_secret",
                "user_session",
                JWT_TEST,
                "other",
                2,
            ));
            legacy += 32 - hours_ago;
        }
        keys.push(key_row(hours_ago, "legacy_secret", "", "HS256", legacy));
        if hours_ago % 6 == 0 {
            keys.push(key_row(hours_ago, "api_key", "secret:backend", "opaque", 5));
            callers.push(caller_row(
                hours_ago,
                "api_key",
                "secret:backend",
                SYNC,
                "node-fetch/1.0",
                5,
            ));
        }
    }
    // Outside the window: not shown.
    keys.push(key_row(30, "legacy_secret", "", "HS256", 999));
    callers.push(caller_row(
        30,
        "legacy_secret",
        "anon_key",
        JWT_TEST,
        "supabase-js/2.39.0",
        999,
    ));
    store.add_key_usage(&keys).await.unwrap();
    store.add_caller_usage(&callers).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let now = SNAPSHOT_NOW.to_string();
    let printed = output(
        edgegate(
            dir.path(),
            &[("DATABASE_URL", &db.url), ("SUPABASE_JWT_SECRET", SECRET)],
        )
        .args(["keys", "report", "--now-ms", &now]),
    );
    let text = String::from_utf8(printed.stdout).unwrap();
    assert!(
        printed.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&printed.stderr)
    );
    let expected = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/it/snapshots/keys_report.txt"
    ))
    .unwrap_or_default();
    assert!(
        text == expected,
        "the report differs from tests/it/snapshots/keys_report.txt; it printed:\n{text}"
    );
}

/// The report read from the database judges by the usage there, whatever the environment it runs
/// in: from a laptop or CI without `SUPABASE_JWT_SECRET`, legacy use is still not "safe".
#[tokio::test]
async fn keys_report_from_the_database_judges_by_usage_not_by_its_own_environment() {
    let db = test_db!();
    let store = db.store().await;
    let rows = [
        key_row(0, "legacy_secret", "", "HS256", 500),
        key_row(0, "signing_key", "2b9f0c1e", "ES256", 900),
    ];
    store.add_key_usage(&rows).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let now = SNAPSHOT_NOW.to_string();
    let printed = output(
        edgegate(dir.path(), &[("DATABASE_URL", &db.url)])
            .args(["keys", "report", "--now-ms", &now]),
    );
    let text = String::from_utf8(printed.stdout).unwrap();
    assert!(printed.status.success(), "{text}");
    let verdict = text.lines().last().unwrap_or_default();
    assert!(verdict.contains("NOT SAFE"), "{verdict}");
    assert!(verdict.contains("500 verification(s)"), "{verdict}");
}

/// The evidence starts at the first verification counted, not at the start of its hour, so a
/// window is never called observed up to an hour early.
#[tokio::test]
async fn the_evidence_starts_at_the_first_counted_verification_not_its_hour() {
    let db = test_db!();
    let key = SigningKey::generate(Alg::ES256).unwrap();
    let jwks = key.public_jwks().to_string();
    let (mut server, _state) = spawn_app(
        &db,
        &[
            ("SUPABASE_JWT_SECRET", SECRET),
            ("JWT_ISSUERS", ISSUER),
            ("SUPABASE_JWKS", &jwks),
        ],
    )
    .await;
    let token = key
        .token(&user_claims(
            ISSUER,
            "authenticated",
            USER_ID,
            now_ms() / 1000,
            3600,
        ))
        .unwrap();
    // A user's session signed with the new key, twice, 50 ms apart.
    let call = async || {
        let response = server
            .client
            .get(server.url(JWT_TEST))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    };
    let before = now_ms();
    call().await;
    let after = now_ms();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    call().await;
    server.begin_shutdown();
    (&mut server.task)
        .await
        .expect("the service task")
        .expect("a clean stop");

    let hour = before - before % HOUR;
    assert!(
        before > hour + 1,
        "started in the first millisecond of an hour: run it again"
    );
    let dir = tempfile::tempdir().unwrap();
    let verdict = |now: i64| {
        let printed = output(
            edgegate(
                dir.path(),
                &[
                    ("DATABASE_URL", &db.url),
                    ("LEGACY_REVOCATION_WINDOW_SECONDS", "3600"),
                ],
            )
            .args(["keys", "report", "--now-ms", &now.to_string()]),
        );
        assert!(printed.status.success());
        let text = String::from_utf8(printed.stdout).unwrap();
        text.lines().last().unwrap_or_default().to_owned()
    };
    // An hour after the start of the first verification's hour, not after the verification.
    let early = verdict(hour + HOUR + 1);
    assert!(
        early.contains("NOT SAFE. usage has been recorded for less than 1 h"),
        "{early}"
    );
    // An hour after the first verification, the second one still in the window.
    let late = verdict(after + HOUR);
    assert!(late.contains(": safe."), "{late}");
}

/// An instance started as `run` starts it writes its unflushed counts when it stops, so a
/// deploy's last minute of legacy use still reaches the report.
#[tokio::test]
async fn a_stopping_instance_writes_the_counts_it_had_not_flushed() {
    let db = test_db!();
    let (mut server, state) = instance(&db).await;
    supabase_js(&server, &legacy_key("anon")).await;
    assert!(
        state.usage.first_pending_verification().is_some(),
        "counted, not flushed"
    );

    server.begin_shutdown();
    (&mut server.task)
        .await
        .expect("the service task")
        .expect("a clean stop");

    let store = db.store().await;
    // Every count written: its row in `usage_writers` is gone with it, so no other instance
    // takes it for one that ended holding counts.
    assert_eq!(
        store.usage_writers_seen_before("", i64::MAX).await.unwrap(),
        vec![]
    );
    let keys = store.key_usage_since(0).await.unwrap();
    let legacy: i64 = keys
        .iter()
        .filter(|row| row.source == "legacy_secret")
        .map(|row| row.verified_count)
        .sum();
    assert_eq!(legacy, 1, "{keys:?}");
    let callers = store.caller_usage_hours_since(0).await.unwrap();
    assert!(
        callers
            .iter()
            .any(|row| row.kind == "anon_key" && row.route == JWT_TEST && row.verified_count == 1),
        "{callers:?}"
    );
}

/// The key report of `state`'s instance over its revocation window with the unflushed counts of
/// `tracker`, as `GET /admin/signing-keys` builds it (without the audit line, a write of its own).
async fn key_report(state: &AppState, tracker: &UsageTracker) -> Value {
    let window = state.config.jwt.legacy_revocation_window;
    let report = edgegate::auth::legacy_report::key_report(
        &state.store,
        tracker,
        &state.auth,
        &state.clock,
        window,
        window,
    )
    .await
    .unwrap();
    serde_json::to_value(report).unwrap()
}

/// Stored evidence that says revoking is safe unless something else shows legacy use: a whole
/// window observed, signing keys in use in it, and an instance counting until now (the fleet's
/// last note, by one that has since stopped cleanly).
async fn evidence_that_says_safe(state: &AppState) {
    let now = now_ms();
    state
        .store
        .note_usage_evidence(now - 48 * HOUR)
        .await
        .unwrap();
    state
        .store
        .note_usage_fleet("an-instance-stopped-cleanly", now)
        .await
        .unwrap();
    signing_key_requests(&state.store, now, 900).await;
}

/// `count` signing-key verifications counted, the last at `at_ms`, as that many ES256 requests
/// leave them.
async fn signing_key_requests(store: &edgegate::store::Store, at_ms: i64, count: i64) {
    let signing = KeyUsage {
        hour_start_ms: at_ms - at_ms % HOUR,
        source: "signing_key".into(),
        kid: "2b9f0c1e".into(),
        alg: "ES256".into(),
        verified_count: count,
        last_verified_at_ms: at_ms,
    };
    store.add_key_usage(&[signing]).await.unwrap();
}

/// A flush takes the counts out of memory before it writes them; while the write waits (here
/// on SQLite's write lock, held by another process; on PostgreSQL on an exhausted pool) a report
/// reads the database and the instance's unflushed counts, and must still find them there, or
/// it calls the legacy secret unused while it is not.
#[tokio::test]
async fn a_flush_waiting_for_the_database_hides_no_legacy_use_from_the_report() {
    let db = TestDb::sqlite();
    let (server, state) = instance(&db).await;
    evidence_that_says_safe(&state).await;
    supabase_js(&server, &legacy_key("anon")).await;

    let mut holder = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut holder)
        .await
        .unwrap();
    let flush = tokio::spawn({
        let state = state.clone();
        async move { state.usage.flush(&state.store).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!flush.is_finished(), "the flush waits for the lock");
    let during = key_report(&state, &state.usage).await;
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    holder.close().await.unwrap();
    let flushed = tokio::time::timeout(Duration::from_secs(30), flush)
        .await
        .expect("the flush ends once the lock is gone")
        .unwrap();

    let legacy = |report: &Value| report["legacy_secret"]["verified_count"].clone();
    assert_eq!(
        (legacy(&during), during["legacy_revocation_safe"].clone()),
        (json!(1), json!(false)),
        "{during:#}"
    );
    assert_eq!(
        callers(&during),
        [
            json!({"kind": "anon_key", "route": JWT_TEST, "client": "supabase-js/2.47.0", "count": 1})
        ]
    );
    // Written or put back, the count shows once.
    let after = key_report(&state, &state.usage).await;
    assert_eq!(legacy(&after), json!(1), "{flushed:?} {after:#}");
    assert_eq!(callers(&after)[0]["count"], json!(1), "{after:#}");
}

/// Verifications dropped because the buffer was full (a long database outage) are a hole in the
/// evidence: legacy use may be among them, so while a drop is inside the window revoking is not
/// called safe, and the report says how many were dropped and when.
#[tokio::test]
async fn verifications_dropped_from_a_full_buffer_keep_revocation_unsafe() {
    let db = test_db!();
    let (_server, state) = instance(&db).await;
    evidence_that_says_safe(&state).await;
    let tracker = UsageTracker::with_max_buckets(1);
    let now = now_ms();
    let api_key = state.auth.verify_api_key(SECRET_KEY, false).unwrap();
    tracker.record(&api_key, now);
    let legacy = state.auth.verify_bearer(&legacy_key("anon")).await.unwrap();
    tracker.record(&legacy, now);
    assert_eq!(tracker.dropped(), 1);

    let report = key_report(&state, &tracker).await;
    assert_eq!(report["legacy_revocation_safe"], json!(false), "{report:#}");
    let reason = report["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("1 verification was left out of the usage evidence"),
        "{reason}"
    );
    assert_eq!(report["evidence_dropped"]["count"], json!(1), "{report:#}");

    // Once flushed, the hole is in the database: the report of an instance that dropped nothing
    // knows of it too.
    tracker.flush(&state.store).await.unwrap();
    assert_eq!(tracker.pending_dropped(), None);
    let elsewhere = key_report(&state, &UsageTracker::default()).await;
    assert_eq!(elsewhere["legacy_revocation_safe"], json!(false));
    assert_eq!(elsewhere["evidence_dropped"], report["evidence_dropped"]);
}

/// Each failed flush puts every hour's caller counts back: without a bound across hours, a long
/// outage held a table per hour, and anyone can fill one with the public anon key by varying
/// `x-client-info`. The oldest hours' clients are folded into `other`, then whole hours dropped
/// and counted, so what is held stays under a fixed bound however long the outage lasts.
#[tokio::test]
async fn a_long_outage_holds_a_bounded_number_of_caller_counts() {
    // A store that refuses every write: its tables were never made.
    let db = TestDb::sqlite();
    let store = edgegate::Store::connect(&db.config(&[]).database_url)
        .await
        .unwrap();
    let tracker = CallerTracker::with_max_held(300);
    let anon = CallerKind::Legacy(LegacyKind::AnonKey);
    // One reading of the clock: two could straddle a millisecond, and the hours not be whole.
    let now = now_ms();
    let first_hour = now - now % HOUR - 400 * HOUR;
    let (mut recorded, mut most) = (0, 0);
    for hour in 0..400 {
        let at = first_hour + hour * HOUR;
        for client in 0..60 {
            tracker.record(anon, JWT_TEST, &format!("client-{client:02}"), at + client);
            recorded += 1;
        }
        assert!(tracker.flush(&store).await.is_err(), "no table to write to");
        most = most.max(tracker.footprint().counters);
    }
    // The newest hour keeps its own bound (fifty named and other); the older ones share the cap.
    assert!(most <= 300 + MAX_NAMED_CLIENTS + 1, "{most} counts held");
    let held = tracker.pending_since(0);
    let dropped = i64::try_from(tracker.dropped()).unwrap();
    assert!(dropped > 0, "400 hours of other do not fit in 300 counts");
    assert_eq!(
        held.iter().map(|row| row.verified_count).sum::<i64>() + dropped,
        recorded,
        "every count held or counted as dropped"
    );
    // The newest hours keep their clients' names.
    let newest = first_hour + 399 * HOUR;
    let named: std::collections::HashSet<&str> = held
        .iter()
        .filter(|row| row.hour_start_ms == newest)
        .map(|row| row.client.as_str())
        .collect();
    assert_eq!(named.len(), MAX_NAMED_CLIENTS + 1, "{named:?}");
}

/// Supabase names both its default API keys `default`, the publishable and the secret one. After
/// a leak what matters is whether the secret key is used, so the two are told apart wherever a
/// key is named: the listing (with each key's type), `api_key_usage`, the metrics' `kid` label,
/// the stored rows and `edgegate keys report` (`secret:default`, `publishable:default`). Every
/// configured key is listed, unused ones with count 0 as signing keys are. Rows an earlier
/// release stored under the bare name cannot be told apart: they show under it, typeless.
#[tokio::test]
async fn a_publishable_and_a_secret_key_both_named_default_are_told_apart() {
    const PUBLISHABLE: &str = "sb_publishable_default_0123456789";
    let db = test_db!();
    let secret_keys = format!(r#"{{"default":"{SECRET_KEY}"}}"#);
    let publishable_keys =
        format!(r#"{{"default":"{PUBLISHABLE}","mobile":"sb_publishable_mobile_0123456789"}}"#);
    let (server, state) = spawn_app(
        &db,
        &[
            ("SUPABASE_SECRET_KEYS", &secret_keys),
            ("SUPABASE_PUBLISHABLE_KEYS", &publishable_keys),
        ],
    )
    .await;
    // What an earlier release stored: both kinds under the bare name.
    let store = db.store().await;
    let now = now_ms();
    let (hour, last) = (now - now % HOUR, now - 1);
    store
        .add_key_usage(&[KeyUsage {
            hour_start_ms: hour,
            source: "api_key".into(),
            kid: "default".into(),
            alg: "opaque".into(),
            verified_count: 7,
            last_verified_at_ms: last,
        }])
        .await
        .unwrap();
    store
        .add_caller_usage(&[CallerUsage {
            hour_start_ms: hour,
            source: "api_key".into(),
            kind: "default".into(),
            route: JWT_TEST.into(),
            client: "old/1.0".into(),
            verified_count: 7,
            last_verified_at_ms: last,
        }])
        .await
        .unwrap();
    for _ in 0..2 {
        let response = server
            .client
            .get(server.url(JWT_TEST))
            .header("apikey", PUBLISHABLE)
            .header("x-client-info", "supabase-js/2.49.1")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["key"]["kid"], "publishable:default", "{body}");
    }

    let report = admin(&server, "").await;
    let api_keys: Vec<Value> = report["api_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let mut row = row.clone();
            let last = row
                .as_object_mut()
                .unwrap()
                .remove("last_verified_at_ms")
                .unwrap();
            assert_eq!(last.is_null(), row["verified_count"] == 0, "{row}");
            row
        })
        .collect();
    assert_eq!(
        api_keys,
        [
            json!({"name": "default", "type": "secret", "kid": "secret:default", "configured": true, "verified_count": 1}),
            json!({"name": "default", "type": "publishable", "kid": "publishable:default", "configured": true, "verified_count": 2}),
            json!({"name": "mobile", "type": "publishable", "kid": "publishable:mobile", "configured": true, "verified_count": 0}),
            json!({"name": "default", "type": null, "kid": "default", "configured": false, "verified_count": 7}),
        ],
        "{report:#}"
    );
    let mut usage: Vec<(&str, &str, i64)> = report["api_key_usage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            (
                row["kind"].as_str().unwrap(),
                row["route"].as_str().unwrap(),
                row["count"].as_i64().unwrap(),
            )
        })
        .collect();
    usage.sort_unstable();
    assert_eq!(
        usage,
        [
            ("default", JWT_TEST, 7),
            ("publishable:default", JWT_TEST, 2),
            ("secret:default", "/admin/signing-keys", 1),
        ],
        "{report:#}"
    );
    assert_eq!(
        metric(
            &server,
            "edgegate_credential_verifications_total{source=\"api_key\",kid=\"publishable:default\""
        )
        .await,
        "edgegate_credential_verifications_total{source=\"api_key\",kid=\"publishable:default\",alg=\"opaque\",outcome=\"ok\"} 2"
    );
    assert!(
        metric(
            &server,
            "edgegate_credential_verifications_total{source=\"api_key\",kid=\"secret:default\""
        )
        .await
        .ends_with(" 1"),
        "the admin call"
    );

    state.usage.flush(&store).await.unwrap();
    let mut kids: Vec<String> = store
        .key_usage_since(0)
        .await
        .unwrap()
        .into_iter()
        .map(|row| row.kid)
        .collect();
    kids.sort_unstable();
    kids.dedup();
    assert_eq!(kids, ["default", "publishable:default", "secret:default"]);
    let dir = tempfile::tempdir().unwrap();
    let printed =
        output(edgegate(dir.path(), &[("DATABASE_URL", &db.url)]).args(["keys", "report"]));
    let text = String::from_utf8(printed.stdout).unwrap();
    assert!(printed.status.success(), "{text}");
    let named: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with("api key"))
        .map(|line| line.split("  ").next().unwrap())
        .collect();
    for name in [
        "api key secret:default",
        "api key publishable:default",
        "api key default (secret or publishable)",
    ] {
        assert!(named.contains(&name), "{name} in\n{text}");
    }
}

/// One request of one client can carry two legacy credentials: the legacy anon key in `apikey`
/// and a user's session signed with the legacy secret as its Bearer. Both are counted (revoking
/// breaks both), so the reason speaks of verifications, not requests, and counts the client
/// once, not once per kind.
#[tokio::test]
async fn the_reason_counts_verifications_and_distinct_clients() {
    let db = test_db!();
    let (server, _state) = instance(&db).await;
    let response = server
        .client
        .get(server.url(JWT_TEST))
        .header("apikey", legacy_key("anon"))
        .bearer_auth(legacy_session())
        .header("user-agent", "myapp/1.0")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let report = admin(&server, "").await;
    assert_eq!(report["legacy_secret"]["verified_count"], 2, "{report:#}");
    assert_eq!(report["legacy_usage"].as_array().unwrap().len(), 2);
    assert_eq!(
        report["reason"],
        "legacy anon_key still used by myapp/1.0 on /functions/v1/jwt-test, 1 time in the last \
         24 h; 2 verifications with the legacy secret in all, from 1 client"
    );
}

/// The schema version of the last edgegate from before caller counts (before 2026-12-01): it
/// counted legacy verifications per key in `key_usage_hourly` alone; `caller_usage_hourly` came
/// with 20261201000003.
const BEFORE_CALLER_COUNTS: i64 = 20261201000002;

/// A database as an edgegate from before caller counts left it: migrated up to
/// [`BEFORE_CALLER_COUNTS`], with legacy verifications counted per key only, each row an hour's
/// `(hour_start, count, last use)`.
async fn counted_before_caller_counts(db: &TestDb, legacy_hours: &[(i64, i64, i64)]) {
    migrated_to(db, BEFORE_CALLER_COUNTS).await;
    for &(hour, count, last) in legacy_hours {
        let insert = format!(
            "INSERT INTO key_usage_hourly \
             (hour_start, source, kid, alg, verified_count, last_verified_at) \
             VALUES ({hour}, 'legacy_secret', '', 'HS256', {count}, {last})"
        );
        run_sql(db, &insert).await;
    }
}

/// A database created and migrated up to schema `version` alone, as the last release of that
/// schema left it.
async fn migrated_to(db: &TestDb, version: i64) {
    if db.is_postgres() {
        let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
        sqlx::migrate!("./migrations/postgres")
            .run_to(version, &mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
    } else {
        let options: sqlx::sqlite::SqliteConnectOptions = db.url.parse().unwrap();
        let mut conn = sqlx::SqliteConnection::connect_with(&options.create_if_missing(true))
            .await
            .unwrap();
        sqlx::migrate!("./migrations/sqlite")
            .run_to(version, &mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
    }
}

/// After an upgrade from an edgegate from before caller counts, the legacy verifications it
/// counted stay in the key counts for a whole window with no caller row: the report accounts
/// for them apart (no kind, route or client is known), and the reason's total counts them. Two
/// hours ago the earlier build alone; this hour both, so the callers are taken off hour by hour.
#[tokio::test]
async fn legacy_use_counted_before_caller_counts_is_in_the_report_without_a_caller() {
    let db = test_db!();
    let now = now_ms();
    let this_hour = now - now % HOUR;
    let earlier = [
        (this_hour - 2 * HOUR, 3, this_hour - 2 * HOUR + 600_000),
        (this_hour, 2, now - 1),
    ];
    let not_recorded: i64 = earlier.iter().map(|(_, count, _)| count).sum();
    counted_before_caller_counts(&db, &earlier).await;

    // The upgrade: this build migrates the database and counts a caller of its own.
    let (server, state) = instance(&db).await;
    nightly_export(&server, &legacy_key("service_role")).await;
    state.usage.flush(&db.store().await).await.unwrap();

    let report = admin(&server, "").await;
    let total = not_recorded + 1;
    assert_eq!(
        report["legacy_secret"]["verified_count"], total,
        "{report:#}"
    );
    assert_eq!(report["legacy_revocation_safe"], false);
    assert_eq!(
        report["reason"],
        format!(
            "legacy service_role_key still used by nightly-export/1.0 on {SYNC}, 1 time in the \
             last 24 h; {total} verifications with the legacy secret in all, 1 from 1 client and \
             {not_recorded} with no caller recorded (counted by an edgegate from before caller \
             counts, or by a later one from before 2026-12-07 whose caller write failed after its \
             key counts were written, or left out of the per-caller counts in a long database \
             outage, or, rarely, counted just as a flush began, or by one from before 2026-12-08 \
             just as an hour ended)"
        ),
    );
    // The contract's rows are callers, each of a known kind: the rest is listed apart.
    assert_eq!(
        callers(&report),
        [
            json!({"kind": "service_role_key", "route": SYNC, "client": "nightly-export/1.0",
                "count": 1})
        ]
    );
    let without = &report["legacy_usage_without_caller"];
    assert_eq!(without["count"], not_recorded, "{report:#}");
    let last_seen = without["last_seen"].as_i64().unwrap();
    assert!((now - 1..=now_ms()).contains(&last_seen), "{without}");

    // `edgegate keys report` lists them among the legacy callers.
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://{}", server.addr);
    let printed = tokio::task::spawn_blocking(move || {
        output(
            edgegate(dir.path(), &[("EDGEGATE_SECRET_KEY", SECRET_KEY)])
                .args(["keys", "report", "--url", &url]),
        )
    })
    .await
    .unwrap();
    let text = String::from_utf8(printed.stdout).unwrap();
    assert!(printed.status.success(), "{text}{:?}", printed.stderr);
    let row = text
        .lines()
        .find(|line| line.contains("no caller recorded"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        row.split_whitespace()
            .any(|cell| cell == not_recorded.to_string()),
        "{text}"
    );
    assert!(text.contains(&format!(
        "{total} verifications with the legacy secret in all"
    )));
}

/// The key counts and the callers of a flush are written in one transaction: a caller write that
/// fails leaves the key counts of the batch unwritten too (kept for the next flush), so a report
/// read from the database never shows this Machine's latest legacy verifications as having no
/// caller recorded, and once the flush goes through both are there.
#[tokio::test]
async fn a_failed_caller_write_leaves_no_legacy_count_without_its_caller() {
    let db = test_db!();
    let (server, state) = instance(&db).await;
    nightly_export(&server, &legacy_key("service_role")).await;
    let store = db.store().await;
    crate::retention::run_sql(
        &db,
        "ALTER TABLE caller_usage_hourly RENAME TO callers_away",
    )
    .await;
    assert!(
        state.usage.flush(&store).await.is_err(),
        "no caller table to write to"
    );
    crate::retention::run_sql(
        &db,
        "ALTER TABLE callers_away RENAME TO caller_usage_hourly",
    )
    .await;

    // Another Machine's report, from the database alone, while this one holds the batch.
    let elsewhere = key_report(&state, &UsageTracker::default()).await;
    assert_eq!(
        elsewhere["legacy_usage_without_caller"],
        Value::Null,
        "{elsewhere:#}"
    );
    assert_eq!(
        elsewhere["legacy_secret"]["verified_count"], 0,
        "{elsewhere:#}"
    );
    // This Machine's own report still counts it, with its caller.
    let here = admin(&server, "").await;
    assert_eq!(here["legacy_secret"]["verified_count"], 1, "{here:#}");
    assert_eq!(here["legacy_usage_without_caller"], Value::Null, "{here:#}");

    state.usage.flush(&store).await.unwrap();
    let elsewhere = key_report(&state, &UsageTracker::default()).await;
    assert_eq!(
        elsewhere["legacy_secret"]["verified_count"], 1,
        "{elsewhere:#}"
    );
    assert_eq!(
        elsewhere["legacy_usage_without_caller"],
        Value::Null,
        "{elsewhere:#}"
    );
    assert_eq!(
        callers(&elsewhere),
        [json!({"kind": "service_role_key", "route": SYNC,
            "client": "nightly-export/1.0", "count": 1})]
    );
}

/// A verification's key count and its caller are counted at one time, read once per request: on
/// a clock that moves an hour at each read, a legacy key let in (the Bearer) and one beside a
/// signing-key session each have their caller in their key count's hour, so the report lists no
/// legacy use without a caller. Read twice, the key was counted in one hour and its caller in the
/// next, and the report listed it under no caller recorded.
#[tokio::test]
async fn a_verification_counts_its_key_and_its_caller_in_the_same_hour() {
    let db = test_db!();
    let es = SigningKey::generate(Alg::ES256).unwrap();
    let jwks = es.public_jwks().to_string();
    let secret_keys = format!(r#"{{"backend":"{SECRET_KEY}"}}"#);
    let (server, state) = spawn_app_with_clock(
        &db,
        &[
            ("SUPABASE_JWT_SECRET", SECRET),
            (
                "JWT_ISSUERS",
                "https://abcdefghijklmnop.supabase.co/auth/v1,supabase",
            ),
            ("SUPABASE_SECRET_KEYS", &secret_keys),
            ("SUPABASE_JWKS", &jwks),
        ],
        Clock::manual_ticking(Duration::from_millis(HOUR as u64)),
    )
    .await;
    // Valid for as long as the clock's hours run on in this test.
    const MONTH: i64 = 30 * 24 * 3600;
    let now = now_ms() / 1000;
    let anon = legacy_token(
        SECRET.as_bytes(),
        &api_key_claims("abcdefghijklmnop", "anon", now, MONTH),
        None,
    );
    let session = es
        .token(&user_claims(ISSUER, "authenticated", USER_ID, now, MONTH))
        .unwrap();
    for bearer in [&anon, &session] {
        let response = server
            .client
            .get(server.url(JWT_TEST))
            .header("apikey", &anon)
            .bearer_auth(bearer)
            .header("x-client-info", "supabase-js/2.47.0")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }

    let held = state.usage.unflushed_since(0);
    let mut keys: Vec<(i64, i64)> = held
        .keys
        .iter()
        .filter(|row| row.source == "legacy_secret")
        .map(|row| (row.hour_start_ms, row.verified_count))
        .collect();
    let mut callers: Vec<(i64, i64)> = held
        .callers
        .iter()
        .filter(|row| row.source == "legacy_secret")
        .map(|row| (row.hour_start_ms, row.verified_count))
        .collect();
    keys.sort_unstable();
    callers.sort_unstable();
    assert_eq!(keys.iter().map(|(_, n)| n).sum::<i64>(), 2, "{keys:?}");
    assert_eq!(keys, callers, "each key count's hour and its caller's");

    let report = admin(&server, "").await;
    assert_eq!(report["legacy_secret"]["verified_count"], 2, "{report:#}");
    assert_eq!(
        report["legacy_usage_without_caller"],
        Value::Null,
        "{report:#}"
    );
}

/// Keys and callers of the hour starting `hours_ago` hours before `now`'s: a signing key and the
/// legacy anon key, each with its caller.
fn usage_of_hour(now: i64, hours_ago: i64) -> (Vec<KeyUsage>, Vec<CallerUsage>) {
    let hour = now - now % HOUR - hours_ago * HOUR;
    let key = |source: &str, kid: &str, alg: &str| KeyUsage {
        hour_start_ms: hour,
        source: source.into(),
        kid: kid.into(),
        alg: alg.into(),
        verified_count: 3,
        last_verified_at_ms: hour + 1_000,
    };
    let caller = CallerUsage {
        hour_start_ms: hour,
        source: "legacy_secret".into(),
        kind: "anon_key".into(),
        route: JWT_TEST.into(),
        client: "supabase-js/2.47.0".into(),
        verified_count: 3,
        last_verified_at_ms: hour + 1_000,
    };
    (
        vec![
            key("signing_key", "2b9f0c1e", "ES256"),
            key("legacy_secret", "", "HS256"),
        ],
        vec![caller],
    )
}

/// Stores [`usage_of_hour`] of each of `hours_ago`.
async fn store_usage_of_hours(
    store: &edgegate::store::Store,
    now: i64,
    hours_ago: impl IntoIterator<Item = i64>,
) {
    for hours_ago in hours_ago {
        let (keys, callers) = usage_of_hour(now, hours_ago);
        store.add_key_usage(&keys).await.unwrap();
        store.add_caller_usage(&callers).await.unwrap();
    }
}

/// The hours of key rows and of caller rows stored that start before `before_ms`, and the
/// caller rows' hours from it on.
async fn stored_hours(store: &edgegate::store::Store, before_ms: i64) -> (usize, usize, usize) {
    let keys = store.key_usage_hours_since(0).await.unwrap();
    let callers = store.caller_usage_hours_since(0).await.unwrap();
    let keys_before = keys.iter().filter(|r| r.hour_start_ms < before_ms).count();
    let callers_before = callers
        .iter()
        .filter(|r| r.hour_start_ms < before_ms)
        .count();
    (
        keys_before / 2,
        callers_before,
        callers.len() - callers_before,
    )
}

/// The store, a manual clock and an instance's state on them, with the legacy secret and a
/// revocation window of `window_seconds`.
async fn on_a_manual_clock(
    db: &crate::support::TestDb,
    window_seconds: &str,
) -> (edgegate::store::Store, Clock, AppState) {
    let store = db.store().await;
    let clock = Clock::manual();
    let config = db.config(&[
        ("SUPABASE_JWT_SECRET", SECRET),
        ("LEGACY_REVOCATION_WINDOW_SECONDS", window_seconds),
    ]);
    let state = AppState::with_clock(config, store.clone(), clock.clone());
    (store, clock, state)
}

/// Nothing reads more than 30 days of hourly usage (the revocation window and the report's
/// window at most): the flusher deletes the hours older than 31 days, hourly, a day of hours per
/// statement and a bounded number of statements per pass, so a year of backlog never holds
/// SQLite's write lock for long. The report over 30 days is the same after as before but for
/// how far back the evidence goes: this database has no `usage_evidence` row (its counts came
/// before that table, read from their oldest hour), and from the first pass on it starts where
/// the hours the pass kept start, as with one, the counts being complete from there only.
#[tokio::test]
async fn the_flusher_deletes_usage_hours_older_than_31_days_a_day_per_statement() {
    use edgegate::auth::usage::{Pruning, prune_usage, spawn_flusher_pruning};
    const DAY: i64 = 24 * HOUR;
    let db = test_db!();
    let (store, clock, state) = on_a_manual_clock(&db, "2592000").await;
    let now = clock.now_ms();
    // Ten days of hours, 50 to 40 days old; one hour 29 days old; the last three hours.
    store_usage_of_hours(
        &store,
        now,
        (40 * 24 + 1..=50 * 24).chain([29 * 24]).chain(0..3),
    )
    .await;
    let cutoff = now - 31 * DAY;
    assert_eq!(stored_hours(&store, cutoff).await, (240, 240, 4));
    let evidence = store.usage_evidence_since().await.unwrap().unwrap();
    // A pass deletes the hour its cutoff falls in whole: the counts are complete from the next.
    let first_hour_kept = |cutoff: i64| cutoff + (HOUR - cutoff % HOUR) % HOUR;
    // The report but for how far back the evidence goes.
    let report_of = async || {
        let mut report = key_report(&state, &state.usage).await;
        report.as_object_mut().unwrap().remove("evidence_since_ms");
        report
    };
    let report = report_of().await;

    let flusher = spawn_flusher_pruning(
        state.usage.clone(),
        store.clone(),
        clock.clone(),
        Duration::from_millis(10),
        Duration::from_millis(10),
        Pruning {
            every: Duration::from_secs(3600),
            statements_per_pass: 3,
        },
    );
    let mut passes = flusher.prune_passes();
    let mut pass = async |n: u64| {
        tokio::time::timeout(Duration::from_secs(20), passes.wait_for(|done| *done >= n))
            .await
            .expect("a pruning pass within 20 s")
            .unwrap();
    };
    // One pass: three statements per table, each the oldest day's 24 hours.
    pass(1).await;
    assert_eq!(stored_hours(&store, cutoff).await, (240 - 72, 240 - 72, 4));
    assert!(report_of().await == report, "the report changed");
    assert_eq!(
        store.usage_evidence_since().await.unwrap(),
        Some(first_hour_kept(cutoff)),
        "from {evidence}"
    );

    // The next pass an hour later on the instance's clock, not at the next flush.
    clock.advance(Duration::from_secs(3600));
    let report = report_of().await;
    pass(2).await;
    assert_eq!(
        stored_hours(&store, cutoff).await,
        (240 - 144, 240 - 144, 4)
    );
    let _ = flusher.stop().await;

    // A whole pass deletes what is left before the cutoff, and nothing of the 29-day-old hour.
    let deleted = prune_usage(
        &store,
        clock.now_ms(),
        Pruning::default().statements_per_pass,
    )
    .await
    .unwrap();
    assert_eq!(deleted, 96 * 3);
    assert_eq!(stored_hours(&store, cutoff).await, (0, 0, 4));
    let kept = store.key_usage_hours_since(0).await.unwrap();
    assert!(
        kept.iter()
            .any(|row| row.hour_start_ms == now - now % HOUR - 29 * DAY),
        "{kept:?}"
    );
    assert!(report_of().await == report, "the report changed");
    assert_eq!(
        store.usage_evidence_since().await.unwrap(),
        Some(first_hour_kept(clock.now_ms() - 31 * DAY))
    );
}

/// A pruning pass of a large backlog runs for seconds (a statement a day of hours, a pause after
/// each), and on a slow database for longer. The instance's flushes and notes keep their interval
/// meanwhile: counts recorded during the pass reach the database, and its row in `usage_writers`
/// keeps being noted, so no other instance takes it, after `WRITER_GONE_AFTER`, for one that
/// ended holding counts (moving the evidence's start). A stop during the pass does not wait for
/// the rest of it, nor leaves it running: it waits for the statement under way, after which
/// nothing more is deleted, and the pass logs what it deleted, stopped, and is not counted.
#[tokio::test]
async fn flushes_and_notes_keep_their_interval_during_a_long_pruning_pass() {
    const DAY: i64 = 24 * HOUR;
    // The flusher's log lines: its tasks run on this thread (a current-thread runtime).
    let logs = crate::support::JsonLogs::default();
    let _logging = logs.start();
    let db = test_db!();
    let (store, clock, state) = on_a_manual_clock(&db, "2592000").await;
    let now = clock.now_ms();
    // An hour a day for 100 days, 32 to 131 days old: the first pass is 100 statements per
    // table, a day each, with a pause of 50 ms after each: 10 s at least.
    store_usage_of_hours(&store, now, (32..132).map(|day| day * 24)).await;
    let cutoff = now - 31 * DAY;
    let old_hours = async || {
        let (keys, callers, _) = stored_hours(&store, cutoff).await;
        keys + callers
    };
    assert_eq!(old_hours().await, 200);
    let noted = async |id: &str| {
        let rows = store.usage_writers_seen_before("", i64::MAX).await.unwrap();
        rows.into_iter()
            .find(|row| row.id == id)
            .map(|row| row.seen_at_ms)
    };
    let this_hour = now - now % HOUR;
    let flushed_legacy = async || {
        let rows = store.key_usage_hours_since(this_hour).await.unwrap();
        rows.iter()
            .filter(|row| row.source == "legacy_secret")
            .map(|row| row.verified_count)
            .sum::<i64>()
    };

    // Flushes every 10 ms, prunes at the first one (`Pruning::default`).
    let flusher = fast_flusher(state.usage.clone(), &store, &clock);
    let passes = flusher.prune_passes();
    let bounded = Duration::from_secs(30);
    tokio::time::timeout(bounded, async {
        while old_hours().await == 200 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the pass deletes its first day within 30 s");

    // Counted during the pass, and the row's value before them.
    let legacy = state.auth.verify_bearer(&legacy_key("anon")).await.unwrap();
    state.usage.record(&legacy, clock.now_ms());
    state.usage.record(&legacy, clock.now_ms());
    let before = noted(flusher.writer_id()).await.expect("noted at start");
    // Each note writes a value above the last (the manual clock stands): three notes later.
    let done = tokio::time::timeout(bounded, async {
        loop {
            let flushed = flushed_legacy().await == 2;
            let renoted = noted(flusher.writer_id())
                .await
                .is_some_and(|at| at >= before + 3);
            // Read after the database: a pass not ended yet had not ended when they were written.
            let passes_ended = *passes.borrow();
            if (flushed && renoted) || passes_ended > 0 {
                return (flushed, renoted, passes_ended);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("flushed and noted, or the pass ended, within 30 s");
    assert_eq!(
        done,
        (true, true, 0),
        "(counts flushed, instance noted, passes ended): this instance wrote neither its counts \
         nor its row while its pruning pass ran"
    );
    let left = old_hours().await;
    assert!(left > 0, "the pass ended before the test could stop it");

    // A stop mid-pass ends it: nothing more is deleted after it.
    let _ = tokio::time::timeout(Duration::from_secs(5), flusher.stop())
        .await
        .expect("a stop does not wait for the rest of the pass");
    let after_stop = old_hours().await;
    assert!(after_stop > 0, "the pass went on to its end");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        old_hours().await,
        after_stop,
        "the pass went on after the stop"
    );
    assert_eq!(*passes.borrow(), 0, "a pass a stop ended was counted");
    // What it deleted before the stop is logged, said stopped: rows, two key rows an hour.
    let (keys_left, callers_left, _) = stored_hours(&store, cutoff).await;
    let rows_gone = 2 * (100 - keys_left) + (100 - callers_left);
    let pruned = logs.lines("deleted hourly usage rows older than 31 days");
    assert_eq!(
        pruned
            .iter()
            .map(|line| (line["deleted"].clone(), line["stopped"].clone()))
            .collect::<Vec<_>>(),
        [(json!(rows_gone), json!(true))],
        "{pruned:?}"
    );
}

/// A wall clock running weeks ahead prunes hours that are still inside the window once it is set
/// right: here a weekly legacy caller's hour. The evidence then starts at that cutoff, and the
/// verdict waits a whole window after it, instead of calling revocation safe on counts with a
/// hole in them (signing keys in use, no legacy use left to see).
#[tokio::test]
async fn a_prune_by_a_clock_weeks_ahead_never_makes_revocation_safe() {
    use edgegate::auth::usage::prune_usage;
    const DAY: i64 = 24 * HOUR;
    let db = test_db!();
    let (store, clock, state) = on_a_manual_clock(&db, "604800").await;
    let now = clock.now_ms();
    // Counted for 60 days; legacy and signing-key use two days ago.
    store.note_usage_evidence(now - 60 * DAY).await.unwrap();
    store
        .add_key_usage(&usage_of_hour(now, 48).0)
        .await
        .unwrap();
    let report = key_report(&state, &state.usage).await;
    assert_eq!(
        report["legacy_revocation_safe"],
        json!(false),
        "{}",
        report["reason"]
    );

    // An instance whose clock runs 40 days ahead prunes; set right, signing-key traffic goes on.
    prune_usage(&store, now + 40 * DAY, 100).await.unwrap();
    let signing: Vec<KeyUsage> = usage_of_hour(now, 0)
        .0
        .into_iter()
        .filter(|usage| usage.source == "signing_key")
        .collect();
    store.add_key_usage(&signing).await.unwrap();
    // The cutoff of a clock 40 days ahead: 9 days from now.
    waits_a_window_from(&key_report(&state, &state.usage).await, now + 9 * DAY);
}

/// Two instances: one whose clock runs 40 days ahead prunes every hour before its cutoff, which
/// is in the future once its clock is set right, while the other flushes a legacy caller's
/// counts of the minute before: the flush notes its first count as the evidence's start (the
/// earliest it knows of) after the pass moved that start up, and the pass then deletes those
/// counts with the rest. The evidence must still start at the cutoff, or a window after that
/// first count the verdict calls revoking safe with the legacy use inside the window gone.
#[tokio::test]
async fn a_flush_during_a_prune_by_a_clock_ahead_never_makes_revocation_safe() {
    use edgegate::auth::usage::prune_usage;
    const DAY: i64 = 24 * HOUR;
    let db = test_db!();
    let (store, clock, state) = on_a_manual_clock(&db, "86400").await;
    let now = clock.now_ms();
    // Counted for 60 days, an hour a day: the pass deletes a day per statement, with a pause
    // between, so it runs for seconds.
    store.note_usage_evidence(now - 60 * DAY).await.unwrap();
    for day in 1..=60 {
        store
            .add_key_usage(&usage_of_hour(now, day * 24).0)
            .await
            .unwrap();
    }
    let stored = async || store.key_usage_hours_since(0).await.unwrap().len();
    let before = stored().await;
    // The other instance, on a clock set right: a legacy caller a minute and half a minute ago.
    let other = UsageTracker::default();
    let legacy = state.auth.verify_bearer(&legacy_key("anon")).await.unwrap();
    let first = now - 60_000;
    other.record(&legacy, first);
    other.record(&legacy, now - 30_000);

    let pass = tokio::spawn({
        let store = store.clone();
        async move { prune_usage(&store, now + 40 * DAY, 100).await }
    });
    // The pass has moved the start up once its first day is gone; the flush lands meanwhile.
    for _ in 0..2_000 {
        if stored().await < before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(stored().await < before, "the pass deleted nothing in 10 s");
    other.flush(&store).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), pass)
        .await
        .expect("the pass ends")
        .unwrap()
        .unwrap();
    assert_eq!(stored().await, 0, "the pass deleted the flushed counts too");

    // A window after the first count, with the legacy use still inside it and signing keys in
    // use: the evidence has a hole, revoking is not safe.
    clock.advance(Duration::from_millis(86_400_000 - 50_000));
    let at = clock.now_ms();
    let signing: Vec<KeyUsage> = usage_of_hour(at, 0)
        .0
        .into_iter()
        .filter(|usage| usage.source == "signing_key")
        .map(|usage| KeyUsage {
            last_verified_at_ms: at,
            ..usage
        })
        .collect();
    store.add_key_usage(&signing).await.unwrap();
    let report = key_report(&state, &UsageTracker::default()).await;
    // From the pass's cutoff (its clock 40 days ahead: 9 days from now), not the first count.
    waits_a_window_from(&report, now + 9 * DAY);
}

/// A pass deletes whole hours: the hour its cutoff falls in goes too, counts after the cutoff
/// with it. With a clock weeks ahead that hour is inside the window once the clock is set right:
/// the evidence must start where the hours kept start, not at the cutoff, or a window after the
/// cutoff the verdict calls revoking safe with a legacy use of that hour's end gone.
#[tokio::test]
async fn a_prune_mid_hour_never_makes_revocation_safe() {
    use edgegate::auth::usage::prune_usage;
    const DAY: i64 = 24 * HOUR;
    let db = test_db!();
    let (store, clock, state) = on_a_manual_clock(&db, "86400").await;
    // Set the clock to ten minutes into an hour, counting since a day before.
    let now = clock.now_ms();
    clock.advance(Duration::from_millis(
        u64::try_from(HOUR + 10 * 60_000 - now % HOUR).unwrap(),
    ));
    let now = clock.now_ms();
    let hour = now - now % HOUR;
    store.note_usage_evidence(now - DAY).await.unwrap();
    // A legacy caller at 40 minutes past the hour, after an instance 31 days and 20 minutes
    // ahead cut off at 30 minutes past.
    let cutoff = hour + 30 * 60_000;
    let (mut keys, _) = usage_of_hour(now, 0);
    for key in &mut keys {
        key.last_verified_at_ms = hour + 40 * 60_000;
    }
    store.add_key_usage(&keys).await.unwrap();
    prune_usage(&store, cutoff + 31 * DAY, 100).await.unwrap();
    assert!(store.key_usage_hours_since(0).await.unwrap().is_empty());

    // A window after the cutoff, with that legacy use still inside it and signing keys in use.
    let at = cutoff + DAY + 5 * 60_000;
    clock.advance(Duration::from_millis(u64::try_from(at - now).unwrap()));
    let signing: Vec<KeyUsage> = usage_of_hour(at, 0)
        .0
        .into_iter()
        .filter(|usage| usage.source == "signing_key")
        .map(|usage| KeyUsage {
            last_verified_at_ms: at,
            ..usage
        })
        .collect();
    store.add_key_usage(&signing).await.unwrap();
    let report = key_report(&state, &UsageTracker::default()).await;
    waits_a_window_from(&report, hour + HOUR);
    assert_eq!(
        report["evidence_since_ms"],
        json!(hour + HOUR),
        "cutoff {cutoff}"
    );
}

/// Spawns a flusher of `tracker` on `store` and `clock` that flushes every 10 ms.
fn fast_flusher(
    tracker: Arc<UsageTracker>,
    store: &edgegate::store::Store,
    clock: &Clock,
) -> edgegate::auth::usage::Flusher {
    use edgegate::auth::usage::{Pruning, spawn_flusher_pruning};
    let ms = Duration::from_millis(10);
    spawn_flusher_pruning(
        tracker,
        store.clone(),
        clock.clone(),
        ms,
        ms,
        Pruning::default(),
    )
}

/// Waits until `usage_writers` holds `n` rows.
async fn writers_noted(store: &edgegate::store::Store, n: usize) {
    writers_until(store, |ids| ids.len() == n).await;
}

/// Waits until the ids in `usage_writers` are as `done` wants them.
async fn writers_until(store: &edgegate::store::Store, done: impl Fn(&[String]) -> bool) {
    let all = async || {
        let rows = store.usage_writers_seen_before("", i64::MAX).await.unwrap();
        rows.into_iter().map(|row| row.id).collect::<Vec<_>>()
    };
    let waited = tokio::time::timeout(Duration::from_secs(20), async {
        while !done(&all().await) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "not within 20 s: {:?}", all().await);
}

/// The verdict is `false` for want of a whole window of counts from at least `since_ms` on.
fn waits_a_window_from(report: &Value, since_ms: i64) {
    assert_eq!(report["legacy_revocation_safe"], json!(false), "{report}");
    assert!(
        report["reason"]
            .as_str()
            .unwrap()
            .starts_with("usage has been recorded for less than"),
        "{}",
        report["reason"]
    );
    let evidence_since = report["evidence_since_ms"].as_i64().unwrap();
    assert!(evidence_since >= since_ms, "{evidence_since} < {since_ms}");
}

/// An instance that ends without writing the counts it holds (killed, crashed; or a database
/// restored from a backup taken while it ran, its counts since gone) leaves its row in
/// `usage_writers` unnoted. Once another instance has watched it unnoted for
/// `WRITER_GONE_AFTER` (on its own steady clock), each of its flushes starts the evidence again
/// at its own time, until the row has stayed unnoted for `WRITER_GONE_FOR_GOOD` and is deleted:
/// revoking is not called safe on counts with a hole in them (the dead one's legacy use) until a
/// whole window after that.
#[tokio::test]
async fn an_instance_that_ended_holding_counts_keeps_revocation_unsafe_for_a_window() {
    use edgegate::auth::usage::{WRITER_GONE_AFTER, WRITER_GONE_FOR_GOOD};
    let db = test_db!();
    let (store, clock, state) = on_a_manual_clock(&db, "86400").await;
    evidence_that_says_safe(&state).await;
    // The instance that dies: noted, then gone mid-flight, its counts with it.
    let dead = fast_flusher(Arc::new(UsageTracker::default()), &store, &clock);
    writers_noted(&store, 1).await;
    dead.abort();
    let report = key_report(&state, &state.usage).await;
    assert_eq!(report["legacy_revocation_safe"], json!(true), "{report}");

    let alive = fast_flusher(state.usage.clone(), &store, &clock);
    writers_noted(&store, 2).await;
    // Nothing is taken for lost before WRITER_GONE_AFTER on the living instance's clock.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        key_report(&state, &state.usage).await["legacy_revocation_safe"],
        json!(true)
    );
    let evidence_since = async |at_least: i64| {
        let waited = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let report = key_report(&state, &state.usage).await;
                if report["evidence_since_ms"].as_i64() >= Some(at_least) {
                    return report;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        waited.unwrap_or_else(|_| panic!("no evidence from {at_least} on within 20 s"))
    };
    clock.advance(WRITER_GONE_AFTER + Duration::from_secs(60));
    let found_after = clock.now_ms();
    waits_a_window_from(&evidence_since(found_after).await, found_after);
    // It may still hold counts (cut off from the database): the start keeps moving.
    clock.advance(Duration::from_secs(600));
    let later = clock.now_ms();
    waits_a_window_from(&evidence_since(later).await, later);
    assert_eq!(
        store
            .usage_writers_seen_before("", i64::MAX)
            .await
            .unwrap()
            .len(),
        2
    );

    // Gone for good: its row deleted, the start moves no more.
    clock.advance(WRITER_GONE_FOR_GOOD);
    let gone_at = clock.now_ms();
    writers_noted(&store, 1).await;
    waits_a_window_from(&key_report(&state, &state.usage).await, gone_at);
    clock.advance(Duration::from_secs(600));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let report = key_report(&state, &state.usage).await;
    assert!(
        report["evidence_since_ms"].as_i64().unwrap() < clock.now_ms(),
        "{report}"
    );
    let _ = alive.stop().await;
}

/// A live instance is never taken for lost while it writes, whatever its wall clock says: rows
/// are judged by whether their value changes, on the watching instance's steady clock, not by
/// comparing clocks of different machines (one 10 minutes behind was taken for gone at every
/// flush).
#[tokio::test]
async fn an_instance_whose_wall_clock_runs_behind_is_not_taken_for_lost() {
    use edgegate::auth::usage::WRITER_GONE_AFTER;
    let db = test_db!();
    let (store, clock, state) = on_a_manual_clock(&db, "86400").await;
    evidence_that_says_safe(&state).await;
    let behind = Clock::manual();
    behind.step_wall(-600_000);
    let other = fast_flusher(Arc::new(UsageTracker::default()), &store, &behind);
    let watcher = fast_flusher(state.usage.clone(), &store, &clock);
    writers_noted(&store, 2).await;
    let value = async |id: &str| {
        let rows = store.usage_writers_seen_before("", i64::MAX).await.unwrap();
        rows.into_iter()
            .find(|row| row.id == id)
            .unwrap()
            .seen_at_ms
    };
    let changes = async |id: &str| {
        let before = value(id).await;
        let waited = tokio::time::timeout(Duration::from_secs(20), async {
            while value(id).await == before {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "{id} not noted again within 20 s");
    };
    // Steps of a third of WRITER_GONE_AFTER, each seen noted by the other and then read by the
    // watcher (two notes of its own after it), over three times WRITER_GONE_AFTER in all.
    for _ in 0..9 {
        clock.advance(WRITER_GONE_AFTER / 3);
        behind.advance(WRITER_GONE_AFTER / 3);
        changes(other.writer_id()).await;
        changes(watcher.writer_id()).await;
        changes(watcher.writer_id()).await;
    }
    let report = key_report(&state, &state.usage).await;
    assert_eq!(report["legacy_revocation_safe"], json!(true), "{report}");
    let _ = other.stop().await;
    let _ = watcher.stop().await;
}

/// docs/OPERATIONS.md ("Backup and restore") has the operator run a statement on a restored
/// database before its first start: the first instance's first flush then takes the counts since
/// the backup for lost, whether the backup holds rows of running instances or none (taken while
/// edgegate was stopped), and the verdict waits a whole window.
#[tokio::test]
async fn the_statement_run_after_a_restore_keeps_revocation_unsafe_for_a_window() {
    let db = test_db!();
    let (store, clock, state) = on_a_manual_clock(&db, "86400").await;
    evidence_that_says_safe(&state).await;
    let report = key_report(&state, &state.usage).await;
    assert_eq!(report["legacy_revocation_safe"], json!(true), "{report}");
    let sql = crate::retention::operations_sql("restore: usage");
    assert_eq!(crate::retention::run_sql(&db, &sql).await, 1, "{sql}");

    let started_at = clock.now_ms();
    let flusher = fast_flusher(state.usage.clone(), &store, &clock);
    // The statement's row taken for gone, this instance's own left.
    let own = flusher.writer_id().to_owned();
    writers_until(&store, |ids| ids == [own.as_str()]).await;
    waits_a_window_from(&key_report(&state, &state.usage).await, started_at);
    let _ = flusher.stop().await;
}

/// Every number the report shows of its callers, from the database and from an instance
/// (`edgegate keys report`, `GET /admin/signing-keys`), is what the hourly rows summed one by one
/// give ([`edgegate::auth::legacy_report::summarize`]): three days of hours for each caller, the
/// hour holding each window's start used before it by one caller (in no number) and after it by
/// another (counted whole, and named), an hour stamped ahead of the clock (the newest column),
/// unverified legacy keys and API keys, legacy use with no caller recorded in that hour, over a
/// revocation window and a shorter usage window.
#[tokio::test]
async fn the_reports_callers_are_the_hourly_rows_summed_one_by_one() {
    use edgegate::auth::legacy_report::{self, summarize};
    use edgegate::auth::usage::LegacyVerdict;

    let db = test_db!();
    let store = db.store().await;
    // Both windows start half past an hour (SNAPSHOT_NOW is 09:30), inside a stored hour.
    let revocation = Duration::from_secs(3 * 86_400);
    let usage_window = Duration::from_secs(5 * 3600);
    let (mut keys, mut callers) = (Vec::new(), Vec::new());
    let used_at = |mut row: CallerUsage, minute: i64| {
        row.last_verified_at_ms = row.hour_start_ms + minute * 60_000;
        row
    };
    // From 80 hours ago (before the revocation window) to 2 hours ahead of the clock.
    for hours_ago in -2..=80_i64 {
        let count = 100 + hours_ago;
        let anon = caller_row(
            hours_ago,
            "legacy_secret",
            "anon_key",
            JWT_TEST,
            "supabase-js/2.47.0",
            count,
        );
        // Used at :20 of each hour: left out of the hour holding a window's start.
        callers.push(used_at(anon, 20));
        let export = caller_row(
            hours_ago,
            "legacy_secret",
            "service_role_key",
            SYNC,
            "nightly-export/1.0",
            3,
        );
        // Used at :40: the hour holding a window's start counts whole.
        callers.push(used_at(export, 40));
        if hours_ago % 3 == 0 {
            callers.push(caller_row(
                hours_ago,
                "legacy_secret",
                "user_session",
                JWT_TEST,
                "other",
                2,
            ));
            callers.push(caller_row(
                hours_ago,
                "legacy_secret",
                "user_session",
                JWT_TEST,
                "okhttp/4.12.0",
                2,
            ));
            callers.push(caller_row(
                hours_ago,
                "legacy_secret",
                "anon_key_unverified",
                JWT_TEST,
                "supabase-js/2.47.0",
                1,
            ));
        }
        callers.push(caller_row(
            hours_ago,
            "api_key",
            "secret:backend",
            SYNC,
            "node-fetch/1.0",
            5,
        ));
        keys.push(key_row(hours_ago, "legacy_secret", "", "HS256", count + 3));
        keys.push(key_row(hours_ago, "api_key", "secret:backend", "opaque", 5));
    }
    // The hour holding the usage window's start (04:00): 7 more, counted with no caller (an
    // earlier build), the last at :45, so the hour counts whole, its anon_key use at :20 with it.
    let mut without_caller = key_row(5, "legacy_secret", "", "HS256", 7);
    without_caller.last_verified_at_ms = without_caller.hour_start_ms + 45 * 60_000;
    keys.push(without_caller);
    store.add_key_usage(&keys).await.unwrap();
    store.add_caller_usage(&callers).await.unwrap();
    let keys = store.key_usage_hours_since(0).await.unwrap();
    let callers = store.caller_usage_hours_since(0).await.unwrap();
    assert_eq!(callers.len(), 83 * 3 + 27 * 3);

    // What the rows summed one by one give, over each window.
    let expected = |window| summarize(&keys, &callers, window, SNAPSHOT_NOW);
    let (over_revocation, over_usage) = (expected(revocation), expected(usage_window));
    let mut reason = LegacyVerdict {
        legacy_revocation_safe: false,
        reason: String::new(),
    };
    legacy_report::name_top_caller(
        &mut reason,
        &over_revocation.legacy_usage,
        over_revocation.legacy_usage_without_caller,
        revocation,
    );
    // The oracle itself, by hand: 5 hours of anon_key (the sixth, used at 04:20, is before
    // 04:30) and 2 ahead; 6 hours of service_role_key (04:00 counted whole) and 2 ahead.
    let anon = &over_usage.legacy_usage[0];
    assert_eq!(
        (anon.kind.as_str(), anon.count),
        ("anon_key", (-2..=4).map(|ago| 100 + ago).sum())
    );
    assert_eq!(over_usage.legacy_kinds[1].count, 8 * 3);
    let five_hours_ago = SNAPSHOT_NOW - SNAPSHOT_NOW % HOUR - 5 * HOUR;
    assert_eq!(over_usage.straddling_hour_ms, Some(five_hours_ago));
    // The 7 with no caller, in both windows: that hour's callers from before the usage window's
    // start are its key count's too, so none of theirs is taken for one with no caller.
    for over in [&over_usage, &over_revocation] {
        let without = over.legacy_usage_without_caller.unwrap();
        assert_eq!(without.count, 7);
        assert_eq!(without.last_seen, five_hours_ago + 45 * 60_000);
    }
    assert!(reason.reason.contains(" and 7 with no caller recorded"));
    assert!(
        reason
            .reason
            .contains("anon_key still used by supabase-js/2.47.0")
    );

    let check = |view: &legacy_report::ReportView, whence: &str| {
        assert_eq!(view.legacy_usage, over_usage.legacy_usage, "{whence}");
        assert_eq!(
            view.legacy_usage_without_caller, over_usage.legacy_usage_without_caller,
            "{whence}"
        );
        assert_eq!(
            view.unverified_legacy_usage, over_usage.unverified_legacy_usage,
            "{whence}"
        );
        assert_eq!(view.api_key_usage, over_usage.api_key_usage, "{whence}");
        assert_eq!(view.legacy_kinds, over_usage.legacy_kinds, "{whence}");
        assert_eq!(view.usage_hourly, over_usage.hourly, "{whence}");
        assert_eq!(
            view.usage_straddling_hour_ms, over_usage.straddling_hour_ms,
            "{whence}"
        );
        assert_eq!(view.reason, reason.reason, "{whence}");
    };

    let config = db.config(&[
        ("SUPABASE_JWT_SECRET", SECRET),
        ("LEGACY_REVOCATION_WINDOW_SECONDS", "259200"),
    ]);
    let from_database =
        edgegate::commands::report::from_database(&config, Some(usage_window), SNAPSHOT_NOW)
            .await
            .unwrap();
    check(&from_database, "edgegate keys report");

    let clock = Clock::manual();
    clock.step_wall(SNAPSHOT_NOW - clock.now_ms());
    let state = AppState::with_clock(config, store.clone(), clock);
    let from_instance = legacy_report::key_report(
        &state.store,
        &UsageTracker::default(),
        &state.auth,
        &state.clock,
        revocation,
        usage_window,
    )
    .await
    .unwrap();
    check(&from_instance.report, "GET /admin/signing-keys");
    // Over one window, the usage lists are the revocation window's.
    let same_window = edgegate::commands::report::from_database(&state.config, None, SNAPSHOT_NOW)
        .await
        .unwrap();
    assert_eq!(same_window.legacy_usage, over_revocation.legacy_usage);
    assert_eq!(
        same_window.legacy_usage_without_caller,
        over_revocation.legacy_usage_without_caller
    );
    assert_eq!(same_window.usage_hourly, over_revocation.hourly);
    assert_eq!(
        same_window.usage_straddling_hour_ms,
        over_revocation.straddling_hour_ms
    );
}

/// An instance's counts held back (not flushed yet) are evidence from their first on, but not
/// from before the counts are complete: a hole found after them (`complete_since`) is the start,
/// or the report's verdict would read the hole as counted.
#[tokio::test]
async fn counts_held_back_never_take_the_evidence_before_a_hole_found_after_them() {
    let db = test_db!();
    let (store, clock, state) = on_a_manual_clock(&db, "86400").await;
    evidence_that_says_safe(&state).await;
    let legacy = state.auth.verify_bearer(&legacy_key("anon")).await.unwrap();
    let held_since = clock.now_ms() - 60_000;
    state.usage.record(&legacy, held_since);
    let hole_found = clock.now_ms() - 1_000;
    store.raise_usage_evidence(hole_found).await.unwrap();

    let report = key_report(&state, &state.usage).await;
    assert_eq!(report["evidence_since_ms"], json!(hole_found), "{report}");
}

/// A row unnoted for longer than `WRITER_GONE_FOR_GOOD` by its own stamp is deleted once an
/// instance just started has watched it unnoted for `WRITER_GONE_AFTER`: deploys and restarts
/// more often than an hour would otherwise never let any instance watch it that long, and
/// every flush would move the evidence's start for ever. A live instance whose wall clock is
/// hours behind is never deleted: its value changes at every flush (deleted, it put its row back
/// at its next flush, and a crash in between was a hole no one saw).
#[tokio::test]
async fn a_row_unnoted_for_over_an_hour_is_taken_for_gone_after_a_short_watch() {
    use edgegate::auth::usage::WRITER_GONE_AFTER;
    let db = test_db!();
    let (store, clock, state) = on_a_manual_clock(&db, "86400").await;
    evidence_that_says_safe(&state).await;
    let stamped = clock.now_ms() - 2 * 3_600_000;
    store
        .note_usage_writer("crashed-long-ago", stamped)
        .await
        .unwrap();
    // A live instance whose wall clock is three hours behind.
    let behind = Clock::manual();
    behind.step_wall(-3 * 3_600_000);
    let other = fast_flusher(Arc::new(UsageTracker::default()), &store, &behind);

    let flusher = fast_flusher(state.usage.clone(), &store, &clock);
    let (own, live) = (flusher.writer_id().to_owned(), other.writer_id().to_owned());
    writers_noted(&store, 3).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        key_report(&state, &state.usage).await["legacy_revocation_safe"],
        json!(true),
        "taken for lost before a watch of WRITER_GONE_AFTER"
    );
    clock.advance(WRITER_GONE_AFTER);
    let watched_at = clock.now_ms();
    writers_until(&store, |ids| {
        ids.len() == 2 && ids.contains(&own) && ids.contains(&live)
    })
    .await;
    waits_a_window_from(&key_report(&state, &state.usage).await, watched_at);
    // The live one stays, however far behind its clock.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ids = store.usage_writers_seen_before("", i64::MAX).await.unwrap();
    assert!(ids.iter().any(|row| row.id == live), "{ids:?}");
    let _ = other.stop().await;
    let _ = flusher.stop().await;
}

/// The state of an instance started anew on `store` and `clock`, configured as
/// [`on_a_manual_clock`] configures it.
fn restarted_on(
    db: &crate::support::TestDb,
    store: &edgegate::store::Store,
    clock: &Clock,
    window_seconds: &str,
) -> AppState {
    let config = db.config(&[
        ("SUPABASE_JWT_SECRET", SECRET),
        ("LEGACY_REVOCATION_WINDOW_SECONDS", window_seconds),
    ]);
    AppState::with_clock(config, store.clone(), clock.clone())
}

/// Stops the instance of `flusher` and `state` as `serve` does: the flusher, the last flush, then
/// its row in `usage_writers` retired.
async fn stop_cleanly(
    flusher: edgegate::auth::usage::Flusher,
    state: &AppState,
    store: &edgegate::store::Store,
) {
    let retiring = flusher.stop().await;
    state.usage.flush(store).await.unwrap();
    retiring.retire(store, state.clock.now_ms()).await.unwrap();
}

/// `serve` on `db` and `clock`, configured as [`on_a_manual_clock`] configures an instance (the
/// legacy secret, a revocation window of a day).
async fn serving_on(db: &TestDb, clock: &Clock) -> (TestServer, AppState) {
    spawn_app_with_clock(
        db,
        &[
            ("SUPABASE_JWT_SECRET", SECRET),
            ("LEGACY_REVOCATION_WINDOW_SECONDS", "86400"),
        ],
        clock.clone(),
    )
    .await
}

/// Stops `server` as `serve` stops on a signal (its clean stop), waits until its row in
/// `usage_writers` is gone, and returns the fleet's last note after the stop.
async fn served_until_a_clean_stop(
    server: &mut TestServer,
    store: &edgegate::store::Store,
) -> edgegate::store::LastNote {
    server.begin_shutdown();
    (&mut server.task)
        .await
        .expect("the service task")
        .expect("a clean stop");
    writers_noted(store, 0).await;
    store.usage_fleet_last_note().await.unwrap().unwrap()
}

/// Starts `state`'s instance (its flusher) at `clock`'s now and checks that its start begins the
/// evidence again: once `usage_writers` holds `writers` rows (its own among them), with a
/// signing-key request counted at the start, the verdict `after` it waits a whole window from it.
async fn starts_the_evidence_again(
    state: &AppState,
    clock: &Clock,
    writers: usize,
    after: Duration,
) {
    let start_ms = clock.now_ms();
    let flusher = fast_flusher(state.usage.clone(), &state.store, clock);
    writers_noted(&state.store, writers).await;
    signing_key_requests(&state.store, start_ms, 1).await;
    clock.advance(after);
    waits_a_window_from(&key_report(state, &state.usage).await, start_ms);
    let _ = flusher.stop().await;
}

/// A clean stop leaves no row in `usage_writers`. With no instance running for two days, a
/// legacy client that failed meanwhile was never counted: the instance started next finds the
/// fleet silent since the last note (the one the stop wrote), starts the evidence again at its
/// own time, and the verdict waits a whole window, as after a crash (it read `true` minutes
/// after the start).
#[tokio::test]
async fn a_stop_with_no_instance_running_is_a_hole_in_the_evidence() {
    let db = test_db!();
    let clock = Clock::manual();
    let (mut server, state) = serving_on(&db, &clock).await;
    let store = db.store().await;
    evidence_that_says_safe(&state).await;
    writers_noted(&store, 1).await;
    let rows = store.usage_writers_seen_before("", i64::MAX).await.unwrap();
    let writer = rows[0].id.clone();
    clock.advance(Duration::from_secs(59));
    let stopped_ms = clock.now_ms();
    let last = served_until_a_clean_stop(&mut server, &store).await;
    assert_eq!(last.noted_by, writer);
    assert_eq!(last.noted_at_ms, stopped_ms);

    clock.advance(Duration::from_secs(2 * 86_400));
    let restarted = restarted_on(&db, &store, &clock, "86400");
    starts_the_evidence_again(&restarted, &clock, 1, Duration::from_secs(600)).await;
}

/// A stop and a start seconds apart (a deploy replacing the only instance) is no hole: the
/// evidence keeps its start.
#[tokio::test]
async fn a_restart_seconds_after_a_clean_stop_keeps_the_evidence() {
    let db = test_db!();
    let (store, clock, state) = on_a_manual_clock(&db, "86400").await;
    evidence_that_says_safe(&state).await;
    let first = fast_flusher(state.usage.clone(), &store, &clock);
    writers_noted(&store, 1).await;
    clock.advance(Duration::from_secs(59));
    stop_cleanly(first, &state, &store).await;

    clock.advance(Duration::from_secs(30));
    let restarted = restarted_on(&db, &store, &clock, "86400");
    let flusher = fast_flusher(restarted.usage.clone(), &store, &clock);
    writers_noted(&store, 1).await;
    let report = key_report(&restarted, &restarted.usage).await;
    assert_eq!(report["legacy_revocation_safe"], json!(true), "{report}");
    let _ = flusher.stop().await;
}

/// Runs `sql` on `db` with a connection of its own (a test changing what the store would not).
async fn run_sql(db: &crate::support::TestDb, sql: &str) {
    let sql = sqlx::AssertSqlSafe(sql);
    if db.is_postgres() {
        let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
        sqlx::query(sql).execute(&mut conn).await.unwrap();
        conn.close().await.unwrap();
    } else {
        let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
        sqlx::query(sql).execute(&mut conn).await.unwrap();
        conn.close().await.unwrap();
    }
}

/// Makes every write to `usage_evidence` fail, or lets them through again (`refused` false): the
/// write that starts the evidence again then fails as it does when the database goes away between
/// an instance's read of the fleet's last note and that write (or, with the database away at the
/// start, every statement fails), while `usage_writers` still takes the instance's row, so the
/// test sees when its look for a gap has ended.
async fn refuse_usage_evidence_writes(db: &crate::support::TestDb, refused: bool) {
    let statements: &[&'static str] = match (db.is_postgres(), refused) {
        (true, true) => &[
            "CREATE FUNCTION refuse_a_write() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'the database is away'; END $$",
            "CREATE TRIGGER refuse_usage_evidence BEFORE INSERT OR UPDATE ON usage_evidence \
             FOR EACH ROW EXECUTE FUNCTION refuse_a_write()",
        ],
        (true, false) => &["DROP TRIGGER refuse_usage_evidence ON usage_evidence"],
        (false, true) => &[
            "CREATE TRIGGER refuse_usage_evidence_insert BEFORE INSERT ON usage_evidence \
             BEGIN SELECT RAISE(ABORT, 'the database is away'); END",
            "CREATE TRIGGER refuse_usage_evidence_update BEFORE UPDATE ON usage_evidence \
             BEGIN SELECT RAISE(ABORT, 'the database is away'); END",
        ],
        (false, false) => &[
            "DROP TRIGGER refuse_usage_evidence_insert",
            "DROP TRIGGER refuse_usage_evidence_update",
        ],
    };
    for &sql in statements {
        run_sql(db, sql).await;
    }
}

/// An instance whose look for a gap at its start never completed (the database away then) and
/// that then stops cleanly, its counts written, before its next note (a minute on): the gap
/// before its start was never looked at, so its stop leaves the fleet's last note as it was, and
/// the instance started next finds the gap there and starts the evidence again. The stop stamped
/// the note, and the next start, seconds later, found no gap: the verdict read `true` after two
/// days with no instance running.
#[tokio::test]
async fn a_clean_stop_before_the_gap_at_its_start_was_looked_at_keeps_the_gap() {
    let db = test_db!();
    let clock = Clock::manual();
    let store = db.store().await;
    // The evidence says safe but for the two days no instance ran since the last note.
    let start_ms = clock.now_ms();
    let last_noted_ms = start_ms - 2 * 86_400_000;
    store
        .note_usage_evidence(start_ms - 4 * 86_400_000)
        .await
        .unwrap();
    store
        .note_usage_fleet("an-instance-stopped-two-days-ago", last_noted_ms)
        .await
        .unwrap();
    signing_key_requests(&store, start_ms - 60_000, 1).await;
    let evidence_since = store.usage_evidence_since().await.unwrap();

    refuse_usage_evidence_writes(&db, true).await;
    let (mut server, _state) = serving_on(&db, &clock).await;
    // Its row is written once its look for a gap has failed (the evidence's start unmoved).
    writers_noted(&store, 1).await;
    assert_eq!(store.usage_evidence_since().await.unwrap(), evidence_since);
    refuse_usage_evidence_writes(&db, false).await;
    clock.advance(Duration::from_secs(30));
    let last = served_until_a_clean_stop(&mut server, &store).await;
    assert_eq!(
        (last.noted_by.as_str(), last.noted_at_ms),
        ("an-instance-stopped-two-days-ago", last_noted_ms),
        "the fleet's last note after a stop that never looked for the gap at its start"
    );

    clock.advance(Duration::from_secs(30));
    let restarted = restarted_on(&db, &store, &clock, "86400");
    starts_the_evidence_again(&restarted, &clock, 1, Duration::from_secs(600)).await;
}

/// `serve --no-migrate` on a database without the fleet's last note (its columns missing):
/// reading and stamping it fail, and the instance still notes itself in `usage_writers`, so a
/// crash of it is seen.
#[tokio::test]
async fn an_instance_notes_itself_when_the_last_note_cannot_be_read() {
    let db = TestDb::sqlite();
    let (store, clock, state) = on_a_manual_clock(&db, "86400").await;
    evidence_that_says_safe(&state).await;
    run_sql(&db, "ALTER TABLE usage_evidence DROP COLUMN last_noted_at").await;
    run_sql(&db, "ALTER TABLE usage_evidence DROP COLUMN last_noted_by").await;
    assert!(store.usage_fleet_last_note().await.is_err());

    let flusher = fast_flusher(state.usage.clone(), &store, &clock);
    writers_noted(&store, 1).await;
    let _ = flusher.stop().await;
}

/// The schema version before the fleet's last note (`usage_evidence.last_noted_at`, 20261215000002).
const BEFORE_THE_LAST_NOTE: i64 = 20261214000002;

/// `serve --no-migrate` on a database of the release before the fleet's last note: the instance
/// notes itself in `usage_writers` (its crash would be seen), cannot look for a gap at its start
/// (nothing to read it from), and a clean stop deletes its row, its counts written. The stop
/// stamped the note first, which failed on the missing column, and the row stayed (other
/// instances then took it for one that ended holding counts, and the verdict waited a window).
#[tokio::test]
async fn a_clean_stop_on_a_schema_without_the_last_note_deletes_its_row() {
    let db = test_db!();
    migrated_to(&db, BEFORE_THE_LAST_NOTE).await;
    // As `serve --no-migrate` opens it: not migrated.
    let store = edgegate::Store::connect(&db.config(&[]).database_url)
        .await
        .unwrap();
    assert!(store.usage_fleet_last_note().await.is_err());
    let clock = Clock::manual();
    let state = restarted_on(&db, &store, &clock, "86400");
    let flusher = fast_flusher(state.usage.clone(), &store, &clock);
    writers_noted(&store, 1).await;
    stop_cleanly(flusher, &state, &store).await;
    writers_noted(&store, 0).await;
}

/// Evidence that says safe ([`evidence_that_says_safe`]) but for the fleet's last note, which is
/// as the migration that added it leaves it (NULL): no instance of this build has run yet.
async fn evidence_that_says_safe_with_no_last_note(db: &TestDb, state: &AppState) {
    evidence_that_says_safe(state).await;
    run_sql(
        db,
        "UPDATE usage_evidence SET last_noted_at = NULL, last_noted_by = NULL",
    )
    .await;
}

/// The first start of this build during a rolling deploy from an older one (no last note, an
/// instance of that build running, its row live): that row says the fleet runs now, not that it
/// ran before (that fleet may have been stopped for days and started again, which it could not
/// see), so the evidence starts again at the start too.
#[tokio::test]
async fn a_first_start_beside_an_older_running_instance_restarts_the_evidence_too() {
    let db = test_db!();
    let (_store, clock, state) = on_a_manual_clock(&db, "86400").await;
    evidence_that_says_safe_with_no_last_note(&db, &state).await;
    let start_ms = clock.now_ms();
    run_sql(
        &db,
        &format!("INSERT INTO usage_writers (id, seen_at) VALUES ('an-older-build', {start_ms})"),
    )
    .await;

    starts_the_evidence_again(&state, &clock, 2, Duration::from_secs(60)).await;
}

/// The first start of this build after a stop of an older one (no last note: the migration
/// leaves it NULL) with no instance running: nothing tells how long none ran, so the evidence
/// starts again at the start (it read `true` minutes after it).
#[tokio::test]
async fn a_first_start_with_no_last_note_and_no_instance_running_restarts_the_evidence() {
    let db = test_db!();
    let (store, clock, state) = on_a_manual_clock(&db, "86400").await;
    evidence_that_says_safe_with_no_last_note(&db, &state).await;
    writers_noted(&store, 0).await;

    starts_the_evidence_again(&state, &clock, 1, Duration::from_secs(600)).await;
}
