//! What docs/MIGRATION.md tells the operator about edgegate itself, where no other test showed it:
//! an emergency rotation that outruns the JWKS, a legacy anon key as the last legacy caller, and a
//! revocation window long enough for monthly jobs.

use crate::support::now_ms;
use edgegate::auth::Alg;
use edgegate::auth::mint::SigningKey;
use edgegate::store::KeyUsage;
use serde_json::{Value, json};

use crate::auth::{
    app_with, bearer, call, force_refresh, legacy_key, signing_keys, until_fetched, user_token,
};
use crate::support::JwksHost;
use crate::test_db;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

fn assert_reason_starts_with(report: &Value, prefix: &str) {
    let reason = report["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with(prefix), "{report}");
}

fn usage(source: &str, kid: &str, alg: &str, last_ms: i64, count: i64) -> KeyUsage {
    KeyUsage {
        hour_start_ms: last_ms - last_ms.rem_euclid(HOUR_MS),
        source: source.into(),
        kid: kid.into(),
        alg: alg.into(),
        verified_count: count,
        last_verified_at_ms: last_ms,
    }
}

/// MIGRATION §4.2: rotating before a Machine has fetched the standby key refuses the new ES256
/// tokens there (Supabase's edge served an older JWKS, then the refetch cool-down holds), until
/// `POST /admin/signing-keys/refresh` reaches that Machine.
#[tokio::test]
async fn a_rotation_ahead_of_the_jwks_refuses_the_new_kid_until_the_instance_is_refreshed() {
    let db = test_db!();
    let es = SigningKey::generate(Alg::ES256).unwrap();
    // What Supabase's edge still serves right after *Migrate JWT secret*: no asymmetric key yet.
    let host = JwksHost::start(json!([])).await;
    let vars = [
        ("JWKS_CACHE_TTL_SECONDS", "3600"),
        ("JWKS_MIN_REFRESH_SECONDS", "600"),
    ];
    let server = app_with(&db, &host, &vars).await;
    until_fetched(&host).await;

    let token = user_token(&es);
    let refused = || async {
        let (status, body) = bearer(&server, &token).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (401, Some("UNAUTHORIZED_ASYMMETRIC_JWT")),
            "{body}"
        );
    };
    refused().await;

    // The key is published now, but this instance holds back refetches until its cool-down ends.
    host.set_keys(json!([es.public_jwk()]));
    let fetches = host.hits();
    refused().await;
    assert_eq!(host.hits(), fetches, "the cool-down held the refetch back");
    let report = signing_keys(&server).await;
    assert!(
        report["jwks"]["stats"]["refetches_suppressed"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "{report}"
    );

    let refreshed = force_refresh(&server).await;
    assert_eq!(refreshed["keys"], 1, "{refreshed}");
    let (status, body) = bearer(&server, &token).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["key"]["kid"], es.kid());
}

/// MIGRATION §4.4: a legacy `anon` key is legacy use like any HS256 token. Alone it keeps the
/// verdict unsafe, and the report counts it under the legacy secret (not yet per caller).
#[tokio::test]
async fn a_legacy_anon_key_alone_keeps_revocation_unsafe() {
    let db = test_db!();
    let host = JwksHost::start(json!([])).await;
    let server = app_with(&db, &host, &[("LEGACY_REVOCATION_WINDOW_SECONDS", "3600")]).await;
    let now = now_ms();
    // Everyone else moved: signing keys carry the traffic, no legacy use for three hours.
    db.store()
        .await
        .add_key_usage(&[
            usage("signing_key", "kid-1", "ES256", now - 3 * HOUR_MS, 5),
            usage("signing_key", "kid-1", "ES256", now - 1_000, 5),
        ])
        .await
        .unwrap();
    let report = signing_keys(&server).await;
    assert_eq!(report["legacy_revocation_safe"], true, "{report}");

    // supabase-js with the legacy anon key sends it as apikey.
    let anon = legacy_key("anon");
    let (status, _, body) = call(&server, &[("apikey", &anon)]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["key"]["source"], "legacy_secret");
    assert_eq!(body["role"], "anon");

    let report = signing_keys(&server).await;
    assert_eq!(report["legacy_revocation_safe"], false, "{report}");
    assert_reason_starts_with(
        &report,
        "legacy anon_key still used by unknown on /functions/v1/jwt-test, 1 time",
    );
    assert_eq!(report["legacy_secret"]["verified_count"], 1);
    assert!(
        report["legacy_secret"]["last_verified_at_ms"]
            .as_i64()
            .unwrap()
            >= now
    );
    let legacy_row = report["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["source"] == "legacy_secret")
        .expect("the legacy secret is listed");
    assert_eq!(legacy_row["verified_count"], 1);
}

/// MIGRATION §4.3: a job that last ran ten days ago is invisible to the default 24 h window and
/// keeps the verdict unsafe under the longest window edgegate takes, 30 days; that window also
/// needs 30 days of recorded usage.
#[tokio::test]
async fn a_thirty_day_window_still_sees_a_monthly_job() {
    let db = test_db!();
    let host = JwksHost::start(json!([])).await;
    let now = now_ms();
    db.store()
        .await
        .add_key_usage(&[
            usage("signing_key", "kid-1", "ES256", now - 40 * DAY_MS, 5),
            usage("legacy_secret", "", "HS256", now - 10 * DAY_MS, 3),
            usage("signing_key", "kid-1", "ES256", now - 1_000, 5),
        ])
        .await
        .unwrap();

    let default_window = app_with(&db, &host, &[]).await;
    let report = signing_keys(&default_window).await;
    assert_eq!(report["window_seconds"], 86_400);
    assert_eq!(report["legacy_revocation_safe"], true, "{report}");

    let month = app_with(
        &db,
        &host,
        &[("LEGACY_REVOCATION_WINDOW_SECONDS", "2592000")],
    )
    .await;
    let report = signing_keys(&month).await;
    assert_eq!(report["window_seconds"], 2_592_000);
    assert_eq!(report["legacy_revocation_safe"], false, "{report}");
    // The rows above are key counts alone (no caller row), which the reason says after it.
    assert_eq!(
        report["reason"],
        "3 verification(s) with the legacy secret in the last 720 h, none with its caller \
         recorded (counted by an edgegate from before caller counts, or by a later one from \
         before 2026-12-07 whose caller write failed after its key counts were written, or left \
         out of the per-caller counts in a long database outage, or, rarely, counted just as a \
         flush began, or by one from before 2026-12-08 just as an hour ended)",
        "{report}"
    );
    assert_eq!(report["legacy_secret"]["verified_count"], 3);

    // The cost: a whole window of recorded usage is needed, not only a window without legacy use.
    let Some(fresh) = crate::support::TestDb::new().await else {
        return;
    };
    fresh
        .store()
        .await
        .add_key_usage(&[usage("signing_key", "kid-1", "ES256", now - HOUR_MS, 5)])
        .await
        .unwrap();
    let month = app_with(
        &fresh,
        &host,
        &[("LEGACY_REVOCATION_WINDOW_SECONDS", "2592000")],
    )
    .await;
    let report = signing_keys(&month).await;
    assert_eq!(report["legacy_revocation_safe"], false, "{report}");
    assert_reason_starts_with(&report, "usage has been recorded for less than 720 h");

    let longer = edgegate::Config::from_lookup(|name| {
        (name == "LEGACY_REVOCATION_WINDOW_SECONDS").then(|| "2592001".to_owned())
    })
    .unwrap_err();
    assert_eq!(longer.variable, "LEGACY_REVOCATION_WINDOW_SECONDS");
}
