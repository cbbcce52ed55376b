//! The zero-downtime drill: a project moves from the legacy JWT secret to signing keys and rotates
//! again, with real edgegate processes over TCP, an in-process JWKS host and a client that keeps
//! sending every credential valid at each moment. No valid request may fail.
//!
//! Phases, as Supabase runs them:
//! 0. legacy only, JWKS `{"keys":[]}`;
//! 1. a standby ES256 key appears in the JWKS (nothing signed with it yet);
//! 2. rotation: new user tokens are ES256; old HS256 tokens stay valid until they expire;
//! 3. the legacy secret is revoked by a rolling restart (new instance without it; the old one
//!    gets SIGTERM with a request in flight);
//! 4. a second rotation to RS256, then the ES256 key is revoked: at once where
//!    `POST /admin/signing-keys/refresh` is called, within the refresh window elsewhere.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::now_ms;
use edgegate::auth::Alg;
use edgegate::auth::mint::{SigningKey, api_key_claims, legacy_token, user_claims};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::process::{free_port, signal, spawn_server, wait_exit, wait_healthy};
use crate::support::{JwksHost, TestDb};

const SECRET: &str = "drill-legacy-secret-with-at-least-32-bytes!";
const ISSUER: &str = "https://drillprojectref.supabase.co/auth/v1";
const PUBLISHABLE: &str = "sb_publishable_drill0123456789abcdef";
const SECRET_KEY: &str = "sb_secret_drill0123456789abcdefghij";
/// JWKS freshness as the host announces it; edgegate's floor is 30 s.
const MAX_AGE: u64 = 30;
/// The legacy-revocation window, shortened from 24 h for the drill.
const WINDOW: u64 = 4;

/// One credential the client sends, and the key source edgegate must report for it.
#[derive(Clone)]
struct Credential {
    name: &'static str,
    headers: Vec<(&'static str, String)>,
    source: &'static str,
}

fn bearer(name: &'static str, token: String, source: &'static str) -> Credential {
    Credential {
        name,
        headers: vec![("authorization", format!("Bearer {token}"))],
        source,
    }
}

fn now() -> i64 {
    now_ms() / 1000
}

#[derive(Default)]
struct Tally {
    ok: u64,
    failed: Vec<String>,
}

/// What the client does right now: where it sends, what it sends, which phase it counts under.
struct Plan {
    target: u16,
    phase: &'static str,
    credentials: Vec<Credential>,
    tallies: BTreeMap<&'static str, Tally>,
    readyz_failures: Vec<String>,
    /// When the client last sent a request with a legacy (HS256) credential.
    last_legacy_sent: Option<Instant>,
}

type Shared = Arc<Mutex<Plan>>;

/// The steady client: every credential valid at the moment, one after another, until stopped.
async fn client_loop(plan: Shared, stop: Arc<std::sync::atomic::AtomicBool>) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let (target, phase, credentials) = {
            let plan = plan.lock().unwrap();
            (plan.target, plan.phase, plan.credentials.clone())
        };
        for credential in credentials {
            if credential.source == "legacy_secret" {
                plan.lock().unwrap().last_legacy_sent = Some(Instant::now());
            }
            let mut request =
                client.get(format!("http://127.0.0.1:{target}/functions/v1/jwt-test"));
            for (name, value) in &credential.headers {
                request = request.header(*name, value);
            }
            let outcome = match request.send().await {
                Ok(response) if response.status() == 200 => {
                    let body: Value = response.json().await.unwrap_or_default();
                    if body["key"]["source"] == credential.source {
                        Ok(())
                    } else {
                        Err(format!("{}: wrong source in {body}", credential.name))
                    }
                }
                Ok(response) => {
                    let status = response.status();
                    let body = response.text().await.unwrap_or_default();
                    Err(format!("{}: {status} {body}", credential.name))
                }
                Err(err) => Err(format!("{}: {err}", credential.name)),
            };
            let mut plan = plan.lock().unwrap();
            let tally = plan.tallies.entry(phase).or_default();
            match outcome {
                Ok(()) => tally.ok += 1,
                Err(err) => tally.failed.push(err),
            }
        }
        let ready = client
            .get(format!("http://127.0.0.1:{target}/readyz"))
            .send()
            .await;
        if !matches!(&ready, Ok(r) if r.status() == 200) {
            let detail = match ready {
                Ok(r) => r.status().to_string(),
                Err(err) => err.to_string(),
            };
            plan.lock()
                .unwrap()
                .readyz_failures
                .push(format!("{phase}: {detail}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn enter(plan: &Shared, phase: &'static str, credentials: Vec<Credential>) -> u64 {
    let mut plan = plan.lock().unwrap();
    plan.phase = phase;
    plan.credentials = credentials;
    plan.credentials.len() as u64
}

/// Enters a phase that drops credentials, and returns once a full round has run in it: from
/// then on no request with a dropped credential is in flight.
async fn enter_settled(plan: &Shared, phase: &'static str, credentials: Vec<Credential>) {
    let round = enter(plan, phase, credentials);
    steady(plan, phase, round).await;
}

/// Lets the client run in the current phase for a while (at least a few rounds).
async fn steady(plan: &Shared, phase: &'static str, at_least: u64) {
    for _ in 0..500 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if plan
            .lock()
            .unwrap()
            .tallies
            .get(phase)
            .is_some_and(|t| t.ok >= at_least)
        {
            return;
        }
    }
    panic!("phase {phase} made no progress");
}

async fn admin(client: &reqwest::Client, port: u16) -> Value {
    client
        .get(format!("http://127.0.0.1:{port}/admin/signing-keys"))
        .header("apikey", SECRET_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn refresh(client: &reqwest::Client, port: u16) {
    let response = client
        .post(format!(
            "http://127.0.0.1:{port}/admin/signing-keys/refresh"
        ))
        .header("apikey", SECRET_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// Waits until instance `port` trusts `kid` (true) or no longer does (false); returns how long.
async fn until_trusted(
    client: &reqwest::Client,
    port: u16,
    kid: &str,
    trusted: bool,
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    while started.elapsed() < limit {
        let report = admin(client, port).await;
        let listed = report["keys"]
            .as_array()
            .is_some_and(|keys| keys.iter().any(|k| k["kid"] == kid));
        if listed == trusted {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("instance {port}: kid {kid} trusted={trusted} not reached within {limit:?}");
}

async fn status_of(client: &reqwest::Client, port: u16, credential: &Credential) -> (u16, Value) {
    let mut request = client.get(format!("http://127.0.0.1:{port}/functions/v1/jwt-test"));
    for (name, value) in &credential.headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

/// Starts a request to `port` whose body is still arriving: it is in flight until `finish`.
async fn start_slow_request(port: u16, credential: &Credential) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut head = String::from(
        "POST /functions/v1/jwt-test HTTP/1.1\r\nhost: 127.0.0.1\r\n\
         content-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n",
    );
    for (name, value) in &credential.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n{");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

async fn finish_slow_request(mut stream: tokio::net::TcpStream) -> String {
    stream.write_all(b"}").await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test]
async fn zero_downtime_migration_from_the_legacy_secret_to_signing_keys() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let drill_started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let host = JwksHost::start_with_max_age(json!([]), MAX_AGE as u32).await;
    let client = reqwest::Client::new();
    let window = WINDOW.to_string();
    let secret_keys = format!(r#"{{"backend":"{SECRET_KEY}"}}"#);
    let publishable_keys = format!(r#"{{"web":"{PUBLISHABLE}"}}"#);
    let common: Vec<(&str, &str)> = vec![
        ("DATABASE_URL", db.url.as_str()),
        ("SUPABASE_JWKS_URL", host.url.as_str()),
        (
            "JWT_ISSUERS",
            "https://drillprojectref.supabase.co/auth/v1,supabase",
        ),
        ("SUPABASE_SECRET_KEYS", secret_keys.as_str()),
        ("SUPABASE_PUBLISHABLE_KEYS", publishable_keys.as_str()),
        ("LEGACY_REVOCATION_WINDOW_SECONDS", window.as_str()),
        ("RUST_LOG", "warn"),
    ];
    let start = |log: &str, port: u16, legacy: bool| {
        let port = port.to_string();
        let mut vars = common.clone();
        vars.push(("PORT", port.as_str()));
        if legacy {
            vars.push(("SUPABASE_JWT_SECRET", SECRET));
        }
        spawn_server(dir.path(), log, &vars)
    };
    // (instance, started) for the JWKS fetch bound.
    let mut lifetimes: Vec<(Instant, Option<Instant>)> = Vec::new();
    let mut forced_refreshes = 0;

    // The credentials of the drill.
    let hs256_user = bearer(
        "hs256 user token",
        legacy_token(
            SECRET.as_bytes(),
            &user_claims(ISSUER, "authenticated", "u-legacy", now(), 3600),
            None,
        ),
        "legacy_secret",
    );
    let legacy_anon = Credential {
        name: "legacy anon key",
        headers: vec![(
            "apikey",
            legacy_token(
                SECRET.as_bytes(),
                &api_key_claims("drillprojectref", "anon", now(), 86_400),
                None,
            ),
        )],
        source: "legacy_secret",
    };
    let legacy_service = bearer(
        "legacy service_role key",
        legacy_token(
            SECRET.as_bytes(),
            &api_key_claims("drillprojectref", "service_role", now(), 86_400),
            None,
        ),
        "legacy_secret",
    );
    let publishable = Credential {
        name: "sb_publishable key",
        headers: vec![("apikey", PUBLISHABLE.to_owned())],
        source: "api_key",
    };
    let secret = Credential {
        name: "sb_secret key",
        headers: vec![("apikey", SECRET_KEY.to_owned())],
        source: "api_key",
    };
    let es = SigningKey::generate(Alg::ES256).unwrap();
    let rs = SigningKey::generate(Alg::RS256).unwrap();
    let es_user = bearer(
        "es256 user token",
        es.token(&user_claims(ISSUER, "authenticated", "u-es", now(), 3600))
            .unwrap(),
        "signing_key",
    );
    let rs_user = bearer(
        "rs256 user token",
        rs.token(&user_claims(ISSUER, "authenticated", "u-rs", now(), 3600))
            .unwrap(),
        "signing_key",
    );
    let legacy_creds = vec![
        hs256_user.clone(),
        legacy_anon.clone(),
        legacy_service.clone(),
    ];
    let api_keys = vec![publishable.clone(), secret.clone()];

    // Phase 0: legacy only.
    let port_a = free_port();
    let mut a = start("a.log", port_a, true);
    lifetimes.push((Instant::now(), None));
    assert!(wait_healthy(port_a).await, "instance A never came up");
    let plan: Shared = Arc::new(Mutex::new(Plan {
        target: port_a,
        phase: "0 legacy only",
        credentials: [legacy_creds.clone(), api_keys.clone()].concat(),
        tallies: BTreeMap::new(),
        readyz_failures: Vec::new(),
        last_legacy_sent: None,
    }));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = tokio::spawn(client_loop(plan.clone(), stop.clone()));
    steady(&plan, "0 legacy only", 30).await;
    let report = admin(&client, port_a).await;
    assert_eq!(report["legacy_revocation_safe"], false, "{report}");

    // Phase 1: a standby key is published; it is picked up by the normal refresh, unused.
    enter(
        &plan,
        "1 standby key published",
        [legacy_creds.clone(), api_keys.clone()].concat(),
    );
    host.set_keys(json!([es.public_jwk()]));
    let picked_up = until_trusted(
        &client,
        port_a,
        es.kid(),
        true,
        Duration::from_secs(MAX_AGE + 10),
    )
    .await;
    println!("drill: standby ES256 key trusted {picked_up:?} after it was published");
    steady(&plan, "1 standby key published", 30).await;

    // Phase 2: rotation. New user tokens are ES256; HS256 tokens keep working until they expire.
    enter(
        &plan,
        "2 rotated to ES256",
        [
            legacy_creds.clone(),
            api_keys.clone(),
            vec![es_user.clone()],
        ]
        .concat(),
    );
    steady(&plan, "2 rotated to ES256", 40).await;
    let report = admin(&client, port_a).await;
    assert_eq!(
        report["legacy_revocation_safe"], false,
        "legacy still in use: {report}"
    );

    // Legacy tokens have expired and clients moved to the new API keys: legacy traffic stops.
    enter_settled(
        &plan,
        "2b legacy traffic stopped",
        [api_keys.clone(), vec![es_user.clone()]].concat(),
    )
    .await;
    steady(&plan, "2b legacy traffic stopped", 20).await;
    // The server saw the last legacy request no earlier than the client sent it, and answers the
    // report no later than the client receives it: so "safe" is only allowed once the client's
    // own clock says the window has passed since that send.
    let last_legacy = plan
        .lock()
        .unwrap()
        .last_legacy_sent
        .expect("legacy traffic was sent");
    let window = Duration::from_secs(WINDOW);
    let safe_after = loop {
        let report = admin(&client, port_a).await;
        let since = last_legacy.elapsed();
        if report["legacy_revocation_safe"] == true {
            assert!(
                since >= window,
                "called safe {since:?} after the last legacy request"
            );
            break since;
        }
        assert!(
            since < window + Duration::from_secs(10),
            "never safe: {report}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "drill: revoking the legacy secret called safe {safe_after:?} after the last legacy request (window {WINDOW} s)"
    );

    // Phase 3: rolling restart without the legacy secret; A drains a request in flight.
    let port_b = free_port();
    let mut b = start("b.log", port_b, false);
    lifetimes.push((Instant::now(), None));
    assert!(wait_healthy(port_b).await, "instance B never came up");
    until_trusted(&client, port_b, es.kid(), true, Duration::from_secs(10)).await;
    let in_flight = start_slow_request(port_a, &es_user).await;
    let moved = {
        let mut plan = plan.lock().unwrap();
        plan.target = port_b;
        plan.phase = "3 legacy revoked (rolling restart)";
        plan.credentials.len() as u64
    };
    // A full round against B means the client no longer sends to A (as Fly's proxy stops
    // routing to a Machine before it signals it).
    steady(&plan, "3 legacy revoked (rolling restart)", moved).await;
    signal(&a, "TERM");
    let response = finish_slow_request(in_flight).await;
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "the in-flight request failed: {response}"
    );
    assert_eq!(
        wait_exit(&mut a).await.code(),
        Some(0),
        "instance A exit status"
    );
    lifetimes[0].1 = Some(Instant::now());
    steady(&plan, "3 legacy revoked (rolling restart)", 40).await;
    for legacy in &legacy_creds {
        let (status, body) = status_of(&client, port_b, legacy).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (401, Some("UNAUTHORIZED_LEGACY_JWT")),
            "{}",
            legacy.name
        );
    }

    // Phase 4: second rotation to RS256, published as standby first.
    enter(
        &plan,
        "4 rs256 standby",
        [api_keys.clone(), vec![es_user.clone()]].concat(),
    );
    host.set_keys(json!([es.public_jwk(), rs.public_jwk()]));
    let port_c = free_port();
    let mut c = start("c.log", port_c, false);
    lifetimes.push((Instant::now(), None));
    assert!(wait_healthy(port_c).await, "instance C never came up");
    let picked_up = until_trusted(
        &client,
        port_b,
        rs.kid(),
        true,
        Duration::from_secs(MAX_AGE + 10),
    )
    .await;
    println!("drill: standby RS256 key trusted {picked_up:?} after it was published");
    until_trusted(&client, port_c, rs.kid(), true, Duration::from_secs(10)).await;
    enter(
        &plan,
        "4 rotated to RS256",
        [api_keys.clone(), vec![es_user.clone(), rs_user.clone()]].concat(),
    );
    steady(&plan, "4 rotated to RS256", 40).await;

    // The ES256 key is revoked: gone from the JWKS. B is refreshed by hand, C by its schedule.
    enter_settled(
        &plan,
        "4 es256 revoked",
        [api_keys.clone(), vec![rs_user.clone()]].concat(),
    )
    .await;
    host.set_keys(json!([rs.public_jwk()]));
    let revoked_at = Instant::now();
    refresh(&client, port_b).await;
    forced_refreshes += 1;
    let (status, body) = status_of(&client, port_b, &es_user).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("UNAUTHORIZED_ASYMMETRIC_JWT")),
        "at once after the forced refresh"
    );
    let mut refused_on_c = None;
    while revoked_at.elapsed() < Duration::from_secs(MAX_AGE * 11 / 10 + 5) {
        if status_of(&client, port_c, &es_user).await.0 == 401 {
            refused_on_c = Some(revoked_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let refused_on_c =
        refused_on_c.expect("the revoked key still verifies on C after the refresh window");
    println!(
        "drill: revoked ES256 key refused on the refreshed instance at once, on the other after {refused_on_c:?}"
    );
    steady(&plan, "4 es256 revoked", 20).await;

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    stream.await.unwrap();
    for (child, index) in [(&mut b, 1), (&mut c, 2)] {
        signal(child, "TERM");
        assert_eq!(wait_exit(child).await.code(), Some(0));
        lifetimes[index].1 = Some(Instant::now());
    }

    // The verdicts.
    let plan = plan.lock().unwrap();
    let mut failed = 0;
    for (phase, tally) in &plan.tallies {
        println!(
            "drill: phase {phase}: {} valid requests ok, {} failed",
            tally.ok,
            tally.failed.len()
        );
        for failure in tally.failed.iter().take(5) {
            println!("drill:   {failure}");
        }
        failed += tally.failed.len();
    }
    assert_eq!(failed, 0, "valid requests failed during the migration");
    assert!(
        plan.readyz_failures.is_empty(),
        "/readyz was not 200: {:?}",
        plan.readyz_failures
    );
    // Each instance fetches at start, then at most once per 30 s (JWKS_MIN_REFRESH_SECONDS), plus
    // the forced refreshes.
    let bound: u64 = lifetimes
        .iter()
        .map(|(from, to)| {
            1 + to
                .unwrap_or_else(Instant::now)
                .duration_since(*from)
                .as_secs()
                / 30
        })
        .sum::<u64>()
        + forced_refreshes;
    println!(
        "drill: {} JWKS fetches (bound {bound}), {:?} in all",
        host.hits(),
        drill_started.elapsed()
    );
    assert!(
        host.hits() as u64 <= bound,
        "{} JWKS fetches over the bound {bound}",
        host.hits()
    );
}
