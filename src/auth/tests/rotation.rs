//! Key rotation against an in-process JWKS host on 127.0.0.1:0 that counts its requests.

use super::util::*;
use crate::auth::error::{AuthError, Failure};
use crate::auth::jwks::FetchError;
use crate::auth::{AuthSettings, Authenticator};
use crate::clock::Clock;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use secrecy::SecretString;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore, oneshot};

#[derive(Clone)]
struct HostState {
    hits: Arc<AtomicUsize>,
    notify: Arc<Notify>,
    reply: Arc<Mutex<Reply>>,
    /// When set, each request waits for a permit before it is answered.
    gate: Arc<Mutex<Option<Arc<Semaphore>>>>,
}

#[derive(Clone)]
struct Reply {
    status: u16,
    body: String,
    cache_control: Option<String>,
    etag: Option<String>,
    /// An `Age` header, as a cache in front of the host adds.
    age: Option<String>,
}

struct JwksHost {
    url: url::Url,
    state: HostState,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

async fn serve_jwks(State(s): State<HostState>, headers: HeaderMap) -> Response {
    s.hits.fetch_add(1, Ordering::SeqCst);
    s.notify.notify_one();
    let gate = s.gate.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(gate) = gate {
        gate.acquire().await.expect("gate").forget();
    }
    let reply = s
        .reply
        .lock()
        .map(|r| r.clone())
        .unwrap_or_else(|p| p.into_inner().clone());
    if let (Some(etag), Some(inm)) = (&reply.etag, headers.get(header::IF_NONE_MATCH))
        && inm.as_bytes() == etag.as_bytes()
    {
        return StatusCode::NOT_MODIFIED.into_response();
    }
    let mut response = (
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::OK),
        reply.body,
    )
        .into_response();
    if let Some(cc) = reply
        .cache_control
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        response.headers_mut().insert(header::CACHE_CONTROL, cc);
    }
    if let Some(etag) = reply.etag.and_then(|v| HeaderValue::from_str(&v).ok()) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    if let Some(age) = reply.age.and_then(|v| HeaderValue::from_str(&v).ok()) {
        response.headers_mut().insert(header::AGE, age);
    }
    response
}

impl JwksHost {
    async fn start(keys: &[Value]) -> Self {
        let state = HostState {
            hits: Arc::new(AtomicUsize::new(0)),
            notify: Arc::new(Notify::new()),
            reply: Arc::new(Mutex::new(Reply {
                status: 200,
                body: json!({"keys": keys}).to_string(),
                cache_control: None,
                etag: None,
                age: None,
            })),
            gate: Arc::new(Mutex::new(None)),
        };
        let app = Router::new()
            .route("/auth/v1/.well-known/jwks.json", get(serve_jwks))
            .route(
                "/moved",
                get(|| async {
                    axum::response::Redirect::temporary("/auth/v1/.well-known/jwks.json")
                }),
            )
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        let url =
            url::Url::parse(&format!("http://{addr}/auth/v1/.well-known/jwks.json")).expect("url");
        Self {
            url,
            state,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// From now on each request waits for a permit of the returned gate.
    fn hold(&self) -> Arc<Semaphore> {
        let gate = Arc::new(Semaphore::new(0));
        *self.state.gate.lock().unwrap_or_else(|p| p.into_inner()) = Some(gate.clone());
        gate
    }

    fn update(&self, f: impl FnOnce(&mut Reply)) {
        let mut reply = self.state.reply.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut reply);
    }

    fn set_keys(&self, keys: &[Value]) {
        self.update(|r| {
            r.status = 200;
            r.body = json!({"keys": keys}).to_string();
        });
    }

    async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

fn client() -> reqwest::Client {
    // No pooled connections: a stopped host must look down at once.
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

/// An authenticator as [`auth_with_ttl`] makes it, with the 600 s TTL most tests here use.
fn auth_for(host: &JwksHost, clock: &Clock, legacy: bool) -> Authenticator {
    auth_with_ttl(host, clock, legacy, Duration::from_secs(600))
}

/// An authenticator on `clock` fetching `host`'s set (issuer `ISS`, refetches at least 30 s
/// apart) with `JWKS_CACHE_TTL_SECONDS` at `cache_ttl`, and the legacy secret if `legacy`.
fn auth_with_ttl(
    host: &JwksHost,
    clock: &Clock,
    legacy: bool,
    cache_ttl: Duration,
) -> Authenticator {
    let settings = AuthSettings {
        legacy_secrets: if legacy {
            vec![SecretString::from(
                String::from_utf8_lossy(LEGACY_SECRET).into_owned(),
            )]
        } else {
            Vec::new()
        },
        jwks_url: Some(host.url.clone()),
        issuers: Some(vec![ISS.to_owned()]),
        min_refresh: Duration::from_secs(30),
        cache_ttl,
        ..AuthSettings::default()
    };
    Authenticator::with_clock(settings, client(), clock.clone())
}

async fn initial_fetch(auth: &Authenticator) {
    auth.fetcher()
        .expect("fetcher")
        .refresh_now()
        .await
        .expect("initial fetch");
}

#[tokio::test]
async fn standby_key_is_accepted_without_refetch() {
    let current = TestKey::es256("current");
    let standby = TestKey::rs256("standby");
    let host = JwksHost::start(&[current.public_jwk(), standby.public_jwk()]).await;
    let clock = Clock::manual();
    let auth = auth_for(&host, &clock, false);
    initial_fetch(&auth).await;
    assert_eq!(host.hits(), 1);
    let n = clock.unix_now();
    assert!(auth.verify_bearer(&current.token(&claims(n))).await.is_ok());
    let v = auth
        .verify_bearer(&standby.token(&claims(n)))
        .await
        .expect("standby key verifies");
    assert_eq!((v.alg, v.kid.as_deref()), ("RS256", Some("standby")));
    assert_eq!(host.hits(), 1, "no refetch for a key already in the set");
}

#[tokio::test]
async fn new_kid_costs_exactly_one_fetch() {
    let k1 = TestKey::es256("k1");
    let k2 = TestKey::eddsa("k2");
    let host = JwksHost::start(&[k1.public_jwk()]).await;
    let clock = Clock::manual();
    let auth = auth_for(&host, &clock, false);
    initial_fetch(&auth).await;
    clock.advance(Duration::from_secs(31));
    host.set_keys(&[k1.public_jwk(), k2.public_jwk()]);
    let n = clock.unix_now();
    let v = auth
        .verify_bearer(&k2.token(&claims(n)))
        .await
        .expect("new key after one refetch");
    assert_eq!(v.kid.as_deref(), Some("k2"));
    assert_eq!(host.hits(), 2);
    for _ in 0..10 {
        assert!(auth.verify_bearer(&k2.token(&claims(n))).await.is_ok());
    }
    assert_eq!(host.hits(), 2, "the new key is now in the ring");
}

/// A token with a new kid arriving while the background task holds the fetch lock only to find
/// that nothing is due (it fetches nothing, so no fetch ends to share): it fetches as soon as the
/// lock is free, instead of waiting out the fetch timeout for a fetch that never comes.
#[tokio::test]
async fn a_new_kid_waiting_on_a_holder_that_fetches_nothing_fetches_itself() {
    let k1 = TestKey::es256("k1");
    let k2 = TestKey::eddsa("k2");
    let host = JwksHost::start(&[k1.public_jwk()]).await;
    let clock = Clock::manual();
    let auth = auth_for(&host, &clock, false);
    initial_fetch(&auth).await;
    clock.advance(Duration::from_secs(31));
    host.set_keys(&[k1.public_jwk(), k2.public_jwk()]);
    let held = auth.fetcher().expect("fetcher").hold_fetch_lock().await;
    let token = k2.token(&claims(clock.unix_now()));
    let (verified, ()) = tokio::join!(
        // Well under the 6 s a waiter gives a running fetch.
        tokio::time::timeout(Duration::from_secs(3), auth.verify_bearer(&token)),
        async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(held);
        }
    );
    let verified = verified
        .expect("answered once the lock was free")
        .expect("the new key after one refetch");
    assert_eq!(verified.kid.as_deref(), Some("k2"));
    assert_eq!(host.hits(), 2);
}

#[tokio::test]
async fn random_kids_cost_at_most_one_fetch_per_min_refresh() {
    let k1 = TestKey::es256("k1");
    let host = JwksHost::start(&[k1.public_jwk()]).await;
    let clock = Clock::manual();
    let auth = auth_for(&host, &clock, false);
    initial_fetch(&auth).await;
    for round in 1..=3usize {
        clock.advance(Duration::from_secs(31));
        let n = clock.unix_now();
        for i in 0..1000 {
            let kid = format!("random-{round}-{i}-{}", uuid::Uuid::new_v4());
            let t = k1.token_with_header(
                &json!({"alg":"ES256","kid":kid}).to_string(),
                &claims(n).to_string(),
            );
            let r = auth.verify_bearer(&t).await;
            assert_eq!(r, Err(AuthError::Asymmetric(Failure::UnknownKid)));
            assert_eq!(r.map_err(|e| e.code()), Err("UNAUTHORIZED_ASYMMETRIC_JWT"));
        }
        assert_eq!(host.hits(), 1 + round, "one refetch per cool-down interval");
    }
    let stats = auth.fetcher().expect("fetcher").status().stats;
    assert_eq!(stats.refetches_suppressed, 3 * 999);
    assert_eq!(stats.unknown_kid_refetches, 3);

    // Concurrent unknown kids within one interval share at most one fetch.
    clock.advance(Duration::from_secs(31));
    let auth = Arc::new(auth);
    let n = clock.unix_now();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let auth = auth.clone();
        let t = k1.token_with_header(
            &json!({"alg":"ES256","kid":format!("c{i}")}).to_string(),
            &claims(n).to_string(),
        );
        tasks.push(tokio::spawn(async move { auth.verify_bearer(&t).await }));
    }
    for t in tasks {
        assert!(t.await.expect("join").is_err());
    }
    assert_eq!(host.hits(), 5);
}

/// A JWKS that has never been fetched, because every fetch fails (a mistyped `SUPABASE_URL`, the
/// host down at start), reads as stale: signing-key tokens are all refused then, and the alert
/// on `edgegate_jwks_stale` is the one the runbook sets. It read `false`, and the key set's age
/// `-1`, so no documented alert could fire. The first good fetch clears it.
#[tokio::test]
async fn a_set_never_fetched_because_fetches_fail_is_stale() {
    let k1 = TestKey::es256("k1");
    let host = JwksHost::start(&[k1.public_jwk()]).await;
    let clock = Clock::manual();
    let auth = auth_for(&host, &clock, true);
    let fetcher = auth.fetcher().expect("fetcher");
    let fresh = fetcher.status().stats;
    assert!(!fresh.stale, "not stale before any fetch was tried");

    host.update(|r| r.status = 503);
    assert!(fetcher.refresh_now().await.is_err());
    let status = fetcher.status();
    assert_eq!(status.stats.key_set_age_seconds, None);
    assert!(status.stats.stale, "{:?}", status.stats);
    assert!(!status.stats.expired, "nothing was dropped");

    host.update(|r| r.status = 200);
    fetcher.refresh_now().await.expect("the host answers");
    assert!(!fetcher.status().stats.stale);
}

#[tokio::test]
async fn host_down_keeps_the_last_set_until_max_stale() {
    let k1 = TestKey::es256("k1");
    let mut host = JwksHost::start(&[k1.public_jwk()]).await;
    let clock = Clock::manual();
    let auth = auth_for(&host, &clock, false);
    initial_fetch(&auth).await;
    let fetcher = auth.fetcher().expect("fetcher");

    host.update(|r| r.status = 503);
    assert_eq!(
        fetcher.refresh_now().await.map(|_| ()),
        Err(FetchError::Status(503))
    );
    host.update(|r| {
        r.status = 200;
        r.body = "{not json".into();
    });
    assert!(matches!(
        fetcher.refresh_now().await,
        Err(FetchError::Document(_))
    ));
    host.update(|r| r.body = format!("{{\"keys\":[],\"pad\":\"{}\"}}", "x".repeat(70 * 1024)));
    assert_eq!(
        fetcher.refresh_now().await.map(|_| ()),
        Err(FetchError::TooLarge)
    );
    let many: Vec<Value> = (0..101)
        .map(|i| TestKey::eddsa(&format!("m{i}")).public_jwk())
        .collect();
    host.set_keys(&many);
    assert!(matches!(
        fetcher.refresh_now().await,
        Err(FetchError::Document(_))
    ));
    host.stop().await;
    assert!(matches!(
        fetcher.refresh_now().await,
        Err(FetchError::Transport(_))
    ));

    let n = clock.unix_now();
    assert!(
        auth.verify_bearer(&k1.token(&claims(n))).await.is_ok(),
        "last good set still verifies"
    );
    // A token that outlives the keys, verified once and then answered from the cache.
    let mut long_lived = claims(n);
    long_lived["exp"] = json!(n + 200_000);
    let cached = k1.token(&long_lived);
    assert!(auth.verify_bearer(&cached).await.is_ok());
    let hits = auth.cache().hits();
    assert!(auth.verify_bearer(&cached).await.is_ok());
    assert_eq!(auth.cache().hits(), hits + 1, "answered from the cache");
    let stats = fetcher.status().stats;
    assert_eq!(
        (stats.fetches_ok, stats.fetches_failed, stats.stale),
        (1, 5, false)
    );

    clock.advance(Duration::from_secs(700));
    assert!(fetcher.refresh_now().await.is_err());
    let status = fetcher.status();
    assert!(status.stats.stale, "past its TTL");
    assert!(!status.stats.expired);
    assert!(status.last_error.is_some());
    assert_eq!(status.stats.key_set_age_seconds, Some(700));
    // The age is the time the set has been held, whatever the wall clock does meanwhile: an NTP
    // step of a day either way is no day of age (the alert on it would fire, or stay silent).
    clock.step_wall(86_400_000);
    assert_eq!(fetcher.status().stats.key_set_age_seconds, Some(700));
    clock.step_wall(-2 * 86_400_000);
    assert_eq!(fetcher.status().stats.key_set_age_seconds, Some(700));
    clock.step_wall(86_400_000);
    let n = clock.unix_now();
    assert!(
        auth.verify_bearer(&k1.token(&claims(n))).await.is_ok(),
        "stale but within 24 h"
    );

    clock.advance(Duration::from_secs(24 * 3600));
    assert!(fetcher.refresh_now().await.is_err());
    assert!(fetcher.status().stats.expired);
    let n = clock.unix_now();
    assert_eq!(
        auth.verify_bearer(&k1.token(&claims(n)))
            .await
            .map_err(|e| e.code()),
        Err("UNAUTHORIZED_ASYMMETRIC_JWT"),
        "keys stale beyond 24 h are dropped"
    );
    assert_eq!(
        auth.verify_bearer(&cached).await.map_err(|e| e.code()),
        Err("UNAUTHORIZED_ASYMMETRIC_JWT"),
        "a token the cache holds goes with the keys that verified it"
    );
}

#[tokio::test]
async fn removed_key_stops_after_next_refresh_and_at_once_after_refresh_now() {
    let k1 = TestKey::es256("k1");
    let k2 = TestKey::es256("k2");
    let host = JwksHost::start(&[k1.public_jwk(), k2.public_jwk()]).await;
    let clock = Clock::manual();
    let auth = auth_for(&host, &clock, false);
    initial_fetch(&auth).await;
    let fetcher = auth.fetcher().expect("fetcher");
    let n = clock.unix_now();
    let mut long_lived = claims(n);
    long_lived["exp"] = json!(n + 5000);
    let t2 = k2.token(&long_lived);
    assert!(auth.verify_bearer(&t2).await.is_ok());
    assert_eq!(auth.cache().len(), 1);

    host.set_keys(&[k1.public_jwk()]);
    assert!(
        auth.verify_bearer(&t2).await.is_ok(),
        "until the next refresh the cached set stands"
    );
    assert!(fetcher.refresh_if_due().await.is_none(), "not due yet");
    clock.advance(Duration::from_secs(661)); // past TTL + 10 % jitter
    assert!(matches!(fetcher.refresh_if_due().await, Some(Ok(_))));
    assert_eq!(
        auth.verify_bearer(&t2).await,
        Err(AuthError::Asymmetric(Failure::UnknownKid)),
        "removed key no longer verifies, cached or not"
    );
    assert!(
        auth.verify_bearer(&k1.token(&claims(clock.unix_now())))
            .await
            .is_ok()
    );

    // Urgent revocation: refresh_now ignores the cool-down.
    host.set_keys(&[k1.public_jwk(), k2.public_jwk()]);
    fetcher.refresh_now().await.expect("refresh");
    assert_eq!(
        auth.verify_bearer(&t2).await.map(|v| v.kid),
        Ok(Some("k2".into()))
    );
    host.set_keys(&[k1.public_jwk()]);
    fetcher.refresh_now().await.expect("refresh");
    assert_eq!(
        auth.verify_bearer(&t2).await.map_err(|e| e.code()),
        Err("UNAUTHORIZED_ASYMMETRIC_JWT")
    );
}

#[tokio::test]
async fn legacy_revoked_while_signing_keys_pass() {
    let k1 = TestKey::es256("k1");
    let host = JwksHost::start(&[k1.public_jwk()]).await;
    let clock = Clock::manual();
    let n = clock.unix_now();
    let hs = hs256_token(
        LEGACY_SECRET,
        r#"{"alg":"HS256","typ":"JWT"}"#,
        &claims(n).to_string(),
    );

    let with_legacy = auth_for(&host, &clock, true);
    initial_fetch(&with_legacy).await;
    assert!(
        with_legacy.verify_bearer(&hs).await.is_ok(),
        "HS256 passes while the secret is configured"
    );

    let auth = auth_for(&host, &clock, false);
    initial_fetch(&auth).await;
    assert_eq!(auth.verify_bearer(&hs).await, Err(AuthError::LegacyRevoked));
    assert_eq!(
        auth.verify_bearer(&hs).await.map_err(|e| e.code()),
        Err("UNAUTHORIZED_LEGACY_JWT")
    );
    let v = auth
        .verify_bearer(&k1.token(&claims(n)))
        .await
        .expect("ES256 passes");
    assert_eq!(v.source, crate::auth::KeySource::SigningKey);
}

#[tokio::test]
async fn cache_control_etag_and_backoff() {
    let k1 = TestKey::es256("k1");
    let symmetric = json!({"kty": "oct", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0", "kid": "hs"});
    let host = JwksHost::start(&[k1.public_jwk(), symmetric]).await;
    host.update(|r| {
        r.cache_control = Some("public, max-age=45".into());
        r.etag = Some("\"v1\"".into());
    });
    let clock = Clock::manual();
    let auth = auth_for(&host, &clock, false);
    let fetcher = auth.fetcher().expect("fetcher");
    let first = fetcher.refresh_now().await.expect("fetch");
    assert!(!first.not_modified);
    assert!(
        first.ttl >= Duration::from_millis(40_500) && first.ttl <= Duration::from_millis(49_500),
        "{:?}",
        first.ttl
    );
    assert_eq!(fetcher.time_until_due(), first.ttl);
    assert_eq!(first.dropped.len(), 1, "{:?}", first.dropped);
    // The manual clock moves by whole milliseconds.
    clock.advance(first.ttl + Duration::from_millis(1));
    let second = fetcher
        .refresh_if_due()
        .await
        .expect("due")
        .expect("conditional fetch");
    assert!(second.not_modified, "If-None-Match answered 304");
    assert_eq!(second.generation, first.generation);
    assert_eq!(
        second.dropped, first.dropped,
        "the set is confirmed as it was"
    );
    // The admin refresh asks for the whole set: a host whose ETag did not change with its set
    // would keep a removed key verifying.
    let whole = fetcher.refresh_now().await.expect("unconditional fetch");
    assert!(!whole.not_modified);
    assert!(
        auth.verify_bearer(&k1.token(&claims(clock.unix_now())))
            .await
            .is_ok()
    );

    // Failures back off exponentially from 5 s, never under min_refresh (30 s), capped at the
    // held set's freshness (max-age=45 ±10 %), below the TTL (600 s).
    host.update(|r| {
        r.status = 500;
        r.etag = None;
    });
    let mut dues = Vec::new();
    for _ in 0..10 {
        assert!(fetcher.refresh_now().await.is_err());
        dues.push(fetcher.time_until_due().as_secs_f64());
    }
    assert!(
        dues[..3].iter().all(|d| (29.9..=33.1).contains(d)),
        "{dues:?}"
    );
    assert!((36.0..=44.0).contains(&dues[3]), "{dues:?}");
    let held = whole.ttl.as_secs_f64();
    assert!(
        dues[4..]
            .iter()
            .all(|d| (held * 0.9 - 0.01..=held * 1.1 + 0.01).contains(d)),
        "{held}: {dues:?}"
    );
}

#[tokio::test]
async fn background_task_refreshes_and_stops() {
    let k1 = TestKey::es256("k1");
    let host = JwksHost::start(&[k1.public_jwk()]).await;
    let settings = AuthSettings {
        jwks_url: Some(host.url.clone()),
        cache_ttl: Duration::from_millis(50),
        min_refresh: Duration::ZERO,
        ..AuthSettings::default()
    };
    let auth = Authenticator::new(settings, client());
    let task = auth.spawn_refresh().expect("task");
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(10), host.state.notify.notified())
            .await
            .expect("a refresh");
    }
    assert!(host.hits() >= 3);
    assert!(auth.key_ring().load().find("k1").is_some());
    tokio::time::timeout(Duration::from_secs(10), task.stop())
        .await
        .expect("task stops");
}

#[tokio::test]
async fn scheduled_refresh_never_comes_sooner_than_min_refresh() {
    let k1 = TestKey::es256("k1");
    let host = JwksHost::start(&[k1.public_jwk()]).await;
    host.update(|r| r.cache_control = Some("max-age=1".into()));
    let clock = Clock::manual();
    let settings = AuthSettings {
        jwks_url: Some(host.url.clone()),
        min_refresh: Duration::from_secs(90),
        ..AuthSettings::default()
    };
    let auth = Authenticator::with_clock(settings, client(), clock.clone());
    let fetcher = auth.fetcher().expect("fetcher");
    let report = fetcher.refresh_now().await.expect("fetch");
    assert!(
        report.ttl <= Duration::from_secs(33),
        "max-age=1 is clamped up to 30 s (± jitter)"
    );
    assert_eq!(fetcher.time_until_due(), Duration::from_secs(90));
    clock.advance(Duration::from_secs(60));
    assert!(fetcher.refresh_if_due().await.is_none());
    clock.advance(Duration::from_secs(30));
    assert!(matches!(fetcher.refresh_if_due().await, Some(Ok(_))));
    assert_eq!(host.hits(), 2);
}

#[tokio::test]
async fn redirects_are_refused() {
    let k1 = TestKey::es256("k1");
    let host = JwksHost::start(&[k1.public_jwk()]).await;
    let settings = AuthSettings {
        jwks_url: Some(host.url.join("/moved").expect("url")),
        ..AuthSettings::default()
    };
    let auth = Authenticator::new(settings, reqwest::Client::new());
    let fetcher = auth.fetcher().expect("fetcher");
    assert_eq!(
        fetcher.refresh_now().await.map(|_| ()),
        Err(FetchError::RedirectFollowed)
    );
    assert!(auth.key_ring().load().find("k1").is_none());
}

/// A client that hangs up while its unknown-kid fetch is in flight (its request dropped) must
/// not cut the fetch off half-way: that moved the schedule with nothing fetched, so a client
/// hanging up every cool-down kept a rotated-in key unknown and the scheduled refresh away.
#[tokio::test]
async fn an_unknown_kid_fetch_finishes_when_its_caller_hangs_up() {
    let k1 = TestKey::es256("k1");
    let k2 = TestKey::es256("k2");
    let mut host = JwksHost::start(&[k1.public_jwk()]).await;
    let clock = Clock::manual();
    let auth = auth_for(&host, &clock, false);
    initial_fetch(&auth).await;

    // Supabase rotates k2 in; the host is slow to answer.
    host.set_keys(&[k1.public_jwk(), k2.public_jwk()]);
    let hits = host.hits();
    let gate = host.hold();
    clock.advance(Duration::from_secs(31));
    let random = TestKey::es256("random").token(&claims(clock.unix_now()));
    let caller = auth.verify_bearer(&random);
    tokio::select! {
        _ = caller => panic!("the held fetch answered"),
        () = async { while host.hits() == hits { tokio::task::yield_now().await } } => {}
    }
    // The caller is gone (its future dropped); the host answers now.
    gate.add_permits(1);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while auth.key_ring().load().find("k2").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the fetch was cut off with its caller"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let token = k2.token(&claims(clock.unix_now()));
    assert!(auth.verify_bearer(&token).await.is_ok());
    host.stop().await;
}

/// A host down for more than a day comes back with the same document: the keys dropped at the
/// stale limit return with the first fetch. Their ETag must go with them: sent back as
/// If-None-Match it drew a 304 that "confirmed" an empty ring, so every signing-key token got
/// 401 until the set changed, while the counters said the JWKS was healthy.
#[tokio::test]
async fn keys_dropped_after_max_stale_return_when_the_host_answers_304() {
    let k1 = TestKey::es256("k1");
    let host = JwksHost::start(&[k1.public_jwk()]).await;
    host.update(|r| r.etag = Some("\"v1\"".into()));
    let clock = Clock::manual();
    let auth = auth_for(&host, &clock, false);
    initial_fetch(&auth).await;
    let fetcher = auth.fetcher().expect("fetcher");

    // The outage (no ETag: a failing host answers no 304 either), past the stale limit.
    host.update(|r| {
        r.status = 503;
        r.etag = None;
    });
    clock.advance(Duration::from_secs(25 * 3600));
    assert_eq!(
        fetcher.refresh_now().await.map(|_| ()),
        Err(FetchError::Status(503))
    );
    assert!(fetcher.status().stats.expired);
    assert_eq!(auth.key_ring().load().fetched_len(), 0, "keys dropped");

    // The host is back with the same document and ETag; it answers a matching If-None-Match
    // with 304. The first token after the cool-down brings the keys back.
    host.update(|r| {
        r.status = 200;
        r.etag = Some("\"v1\"".into());
    });
    clock.advance(Duration::from_secs(31));
    let hits = host.hits();
    let token = k1.token(&claims(clock.unix_now()));
    assert_eq!(
        auth.verify_bearer(&token).await.map(|v| v.kid),
        Ok(Some("k1".into())),
        "the unknown-kid refetch restores the dropped keys"
    );
    assert_eq!(host.hits(), hits + 1);
    assert_eq!(auth.key_ring().load().fetched_len(), 1);
    let stats = fetcher.status().stats;
    assert!(!stats.expired && !stats.stale, "{stats:?}");

    // Now that the ring holds the set again, a 304 confirms it.
    clock.advance(fetcher.time_until_due() + Duration::from_millis(1));
    let again = fetcher
        .refresh_if_due()
        .await
        .expect("due")
        .expect("conditional fetch");
    assert!(again.not_modified, "If-None-Match answered 304");
    assert_eq!(again.keys, 1);
    assert!(auth.verify_bearer(&token).await.is_ok());
}

/// Stale-if-error is counted from the end of the set's freshness, not from its fetch: with a
/// day-long TTL (and no max-age) the first scheduled refresh comes up to 26.4 h after the
/// fetch, and its failure dropped every key at once instead of keeping them 24 h more.
#[tokio::test]
async fn a_long_ttl_keeps_the_set_for_max_stale_after_it_goes_stale() {
    let k1 = TestKey::es256("k1");
    let host = JwksHost::start(&[k1.public_jwk()]).await;
    let clock = Clock::manual();
    let auth = auth_with_ttl(&host, &clock, false, Duration::from_secs(86_400));
    let fetcher = auth.fetcher().expect("fetcher");
    let ttl = fetcher.refresh_now().await.expect("fetch").ttl;
    let max_stale = crate::auth::jwks::MAX_STALE;

    // The scheduled refresh, due when the set goes stale, fails; so does the retry 24 h later,
    // a minute before the stale limit. (The manual clock counts whole milliseconds: a second
    // more makes sure the jittered TTL has run out.)
    host.update(|r| r.status = 503);
    for wait in [
        ttl + Duration::from_secs(1),
        max_stale - Duration::from_secs(60),
    ] {
        clock.advance(wait);
        assert!(matches!(fetcher.refresh_if_due().await, Some(Err(_))));
        let stats = fetcher.status().stats;
        assert!(stats.stale && !stats.expired, "{stats:?}");
        assert!(
            auth.verify_bearer(&k1.token(&claims(clock.unix_now())))
                .await
                .is_ok(),
            "stale for less than 24 h: the last good set verifies"
        );
    }

    // Past the limit the next failure drops the keys.
    clock.advance(Duration::from_secs(120));
    assert!(matches!(fetcher.refresh_if_due().await, Some(Err(_))));
    assert!(fetcher.status().stats.expired);
    assert_eq!(auth.key_ring().load().fetched_len(), 0);
}

/// The failure back-off is capped by the held set's own freshness (its `max-age`), not only by
/// `JWKS_CACHE_TTL_SECONDS`: a day-long setting, which does nothing against Supabase's
/// `max-age=600`, let a six-hour outage grow the back-off to about 10 h, so after the host came
/// back the set was not refetched for hours (a removed key kept verifying).
#[tokio::test]
async fn the_failure_backoff_is_capped_by_the_held_sets_freshness() {
    let k1 = TestKey::es256("k1");
    let host = JwksHost::start(&[k1.public_jwk()]).await;
    host.update(|r| r.cache_control = Some("public, max-age=600".into()));
    let clock = Clock::manual();
    let auth = auth_with_ttl(&host, &clock, false, Duration::from_secs(86_400));
    let fetcher = auth.fetcher().expect("fetcher");
    let ttl = fetcher.refresh_now().await.expect("fetch").ttl;
    assert!(ttl <= Duration::from_secs(660), "{ttl:?}");

    host.update(|r| r.status = 503);
    let mut dues = Vec::new();
    for _ in 0..15 {
        // The manual clock counts whole milliseconds: one more makes the fetch due.
        clock.advance(fetcher.time_until_due() + Duration::from_millis(1));
        assert!(matches!(fetcher.refresh_if_due().await, Some(Err(_))));
        dues.push(fetcher.time_until_due().as_secs());
    }
    // At most the set's freshness (600 s ±10 %), with the back-off's own ±10 % jitter on it.
    assert!(dues.iter().all(|due| *due <= 726), "{dues:?}");
}

/// A fetch that ends between a request's look at the ring and its refetch request puts that
/// request in the cool-down. The request must look at the ring the fetch left (once), not
/// refuse a key that ring holds. The helper is driven directly: the interleaving has no await
/// point in `verify_bearer`, so only the snapshot the request read can stand in for it.
#[tokio::test]
async fn an_unknown_kid_refused_by_the_cool_down_is_looked_up_in_the_new_ring() {
    let k1 = TestKey::es256("k1");
    let k2 = TestKey::es256("k2");
    let host = JwksHost::start(&[k1.public_jwk()]).await;
    let clock = Clock::manual();
    let auth = auth_for(&host, &clock, false);
    initial_fetch(&auth).await;
    let fetcher = auth.fetcher().expect("fetcher");
    clock.advance(Duration::from_secs(31));

    // The request reads the ring, which lacks k2; meanwhile a fetch (the scheduled one, an
    // admin refresh, another request's refetch) brings k2 in.
    let read = auth.key_ring().load();
    let token = k2.token(&claims(clock.unix_now()));
    assert_eq!(
        crate::auth::verify::verify(&read, &settings(), &token, clock.unix_now()).map(|_| ()),
        Err(AuthError::UnknownKid)
    );
    host.set_keys(&[k1.public_jwk(), k2.public_jwk()]);
    fetcher.refresh_now().await.expect("fetch");
    let hits = host.hits();

    let (ring, result) = auth.verify_after_unknown_kid(read, &token).await;
    assert_eq!(result.map(|v| v.kid), Ok(Some("k2".into())));
    assert_eq!(ring.generation(), auth.key_ring().load().generation());
    let stats = fetcher.status().stats;
    assert_eq!(stats.refetches_suppressed, 1, "the cool-down answered");
    assert_eq!(host.hits(), hits, "no fetch of its own");

    // An unknown kid in an unchanged ring is still refused, without a second look.
    let stranger = TestKey::es256("k3").token(&claims(clock.unix_now()));
    let (_, result) = auth.verify_after_unknown_kid(ring, &stranger).await;
    assert_eq!(result.map(|_| ()), Err(AuthError::UnknownKid));
}

/// A cache in front of the JWKS host (Supabase's edge) says with `Age` how long it has held the
/// answer: `max-age=600` with `Age: 590` leaves 10 s of freshness (clamped up to 30 s), not 600.
#[tokio::test]
async fn an_age_header_shortens_the_freshness() {
    let k1 = TestKey::es256("k1");
    let host = JwksHost::start(&[k1.public_jwk()]).await;
    host.update(|r| {
        r.cache_control = Some("public, max-age=600".into());
        r.age = Some("590".into());
    });
    let clock = Clock::manual();
    let auth = auth_for(&host, &clock, false);
    let fetcher = auth.fetcher().expect("fetcher");
    let report = fetcher.refresh_now().await.expect("fetch");
    assert!(
        report.ttl >= Duration::from_secs(27) && report.ttl <= Duration::from_secs(33),
        "30 s ± jitter: {:?}",
        report.ttl
    );

    host.update(|r| r.age = Some("120".into()));
    let report = fetcher.refresh_now().await.expect("fetch");
    assert!(
        report.ttl >= Duration::from_secs(432) && report.ttl <= Duration::from_secs(528),
        "480 s ± jitter: {:?}",
        report.ttl
    );
}

/// One key of the set with a duplicate member (RFC 7517 §4: that JWK must be rejected) is
/// dropped alone, with the member named; the rest of the set is taken, so a kid removed in the
/// same document stops verifying. The whole refresh used to fail ("JWKS is not valid JSON"),
/// which kept the removed key trusted. A duplicate outside the keys (two "keys" members) still
/// refuses the whole document, and says so.
#[tokio::test]
async fn a_key_with_a_duplicate_member_is_dropped_alone_and_a_removal_beside_it_holds() {
    let k1 = TestKey::es256("k1");
    let k2 = TestKey::es256("k2");
    let dm = TestKey::es256("dm");
    let host = JwksHost::start(&[k1.public_jwk(), k2.public_jwk()]).await;
    let clock = Clock::manual();
    let auth = auth_for(&host, &clock, false);
    initial_fetch(&auth).await;
    let fetcher = auth.fetcher().expect("fetcher");
    let t2 = k2.token(&claims(clock.unix_now()));
    assert!(auth.verify_bearer(&t2).await.is_ok());

    // k2 removed; dm published with "kty" twice, and a key with a duplicate deeper inside.
    let dm_jwk = dm.public_jwk().to_string();
    let dm_twice = dm_jwk.replacen('{', r#"{"kty":"EC","#, 1);
    let deep = TestKey::es256("deep").public_jwk().to_string();
    let deep_twice = deep.replacen('{', r#"{"ext":{"a":[{"b":1,"b":2}]},"#, 1);
    let body = format!(
        r#"{{"keys":[{},{dm_twice},{deep_twice}]}}"#,
        k1.public_jwk()
    );
    host.update(|r| r.body = body);
    let report = fetcher.refresh_now().await.expect("the set is taken");
    assert_eq!(report.keys, 1, "{:?}", report.dropped);
    let dropped: Vec<(Option<&str>, &str)> = report
        .dropped
        .iter()
        .map(|d| (d.kid.as_deref(), d.reason.as_str()))
        .collect();
    assert_eq!(
        dropped,
        [
            (Some("dm"), "duplicate member `kty`"),
            (Some("deep"), "duplicate member `b`")
        ]
    );
    assert_eq!(
        auth.verify_bearer(&t2).await.map_err(|e| e.code()),
        Err("UNAUTHORIZED_ASYMMETRIC_JWT"),
        "the removed key no longer verifies"
    );
    assert!(
        auth.verify_bearer(&dm.token(&claims(clock.unix_now())))
            .await
            .is_err(),
        "the key with a duplicate member is not trusted"
    );
    assert!(
        auth.verify_bearer(&k1.token(&claims(clock.unix_now())))
            .await
            .is_ok()
    );

    // Two "keys" members: the document is refused whole, the last good set stays.
    let body = format!(
        r#"{{"keys":[{}],"keys":[{}]}}"#,
        k1.public_jwk(),
        k2.public_jwk()
    );
    host.update(|r| r.body = body);
    let err = fetcher.refresh_now().await.expect_err("refused");
    assert_eq!(err.to_string(), "JWKS has a duplicate member `keys`");
    assert!(
        auth.verify_bearer(&k1.token(&claims(clock.unix_now())))
            .await
            .is_ok()
    );
    assert!(auth.verify_bearer(&t2).await.is_err());
}

/// The scheduled refetch of `fetcher`, once the set is due.
async fn refetch_when_due(fetcher: &crate::auth::jwks::JwksFetcher, clock: &Clock) {
    clock.advance(fetcher.time_until_due() + Duration::from_millis(1));
    fetcher
        .refresh_if_due()
        .await
        .expect("due")
        .expect("the host answers");
}

/// The kids of the `JWK dropped` lines logged at `level`, in order.
fn dropped_logged(lines: &crate::telemetry::LogLines, level: &str) -> Vec<String> {
    lines
        .text()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["level"] == level && line["message"] == "JWK dropped")
        .map(|line| line["kid"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// A key the host publishes and edgegate drops (an `oct` key) is warned of once while it stays
/// published: each refetch (every `JWKS_CACHE_TTL`) found it again and warned again. Found again,
/// it is logged at DEBUG and still reported as dropped; a key newly dropped is warned of, and so
/// is one published again after it was gone.
#[tokio::test]
async fn a_fetched_key_dropped_is_warned_of_once_while_it_stays_published() {
    let lines = crate::telemetry::LogLines::default();
    let _default = tracing::subscriber::set_default(lines.tracing_subscribers_json());
    let k1 = TestKey::es256("k1");
    let oct =
        |kid: &str| json!({"kty": "oct", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0", "kid": kid});
    let publish = |keys: &[Value]| json!({ "keys": keys }).to_string();
    let host = JwksHost::start(&[k1.public_jwk(), oct("hs")]).await;
    let clock = Clock::manual();
    let auth = auth_for(&host, &clock, false);
    let fetcher = auth.fetcher().expect("fetcher");

    fetcher.refresh_now().await.expect("the host answers");
    refetch_when_due(fetcher, &clock).await;
    assert_eq!(host.hits(), 2, "two whole fetches");
    assert_eq!(dropped_logged(&lines, "WARN"), ["hs"]);
    assert_eq!(dropped_logged(&lines, "DEBUG"), ["hs"]);
    let status = fetcher.status();
    assert_eq!(
        status.dropped.len(),
        1,
        "still reported: {:?}",
        status.dropped
    );

    host.update(|r| r.body = publish(&[k1.public_jwk(), oct("hs"), oct("hs2")]));
    refetch_when_due(fetcher, &clock).await;
    assert_eq!(dropped_logged(&lines, "WARN"), ["hs", "hs2"]);

    host.update(|r| r.body = publish(&[k1.public_jwk()]));
    refetch_when_due(fetcher, &clock).await;
    host.update(|r| r.body = publish(&[k1.public_jwk(), oct("hs")]));
    refetch_when_due(fetcher, &clock).await;
    assert_eq!(dropped_logged(&lines, "WARN"), ["hs", "hs2", "hs"]);

    // Keys with no kid, dropped for the same reason, are told apart by how many the set
    // holds: a second one published beside the first is warned of.
    let unnamed = json!({"kty": "oct", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"});
    host.update(|r| r.body = publish(&[k1.public_jwk(), oct("hs"), unnamed.clone()]));
    refetch_when_due(fetcher, &clock).await;
    host.update(|r| {
        r.body = publish(&[k1.public_jwk(), oct("hs"), unnamed.clone(), unnamed.clone()]);
    });
    refetch_when_due(fetcher, &clock).await;
    assert_eq!(dropped_logged(&lines, "WARN"), ["hs", "hs2", "hs", "", ""]);
}

/// A dropped key republished under the same kid with other key material, dropped for the same
/// reason, is a new bad key and is warned of again: kid, reason and origin alike named the first
/// one, so it was logged at DEBUG and the operator never saw it. The same material with other
/// members beside it is the same key (DEBUG), and no line carries an `oct` key's `k`.
#[tokio::test]
async fn a_key_republished_under_its_kid_with_other_material_is_warned_of_again() {
    let lines = crate::telemetry::LogLines::default();
    let _default = tracing::subscriber::set_default(lines.tracing_subscribers_json());
    let k1 = TestKey::es256("k1");
    let (first_k, second_k) = (b64(&[0x5a; 32]), b64(&[0xa5; 32]));
    let oct = |k: &str| json!({"kty": "oct", "k": k, "kid": "hs"});
    // The same kid, dropped for the same reason (`use` is not `sig`), each time another EC key.
    let enc = |key: &TestKey| {
        let mut jwk = key.public_jwk();
        jwk["kid"] = json!("ec");
        jwk["use"] = json!("enc");
        jwk
    };
    let (ec1, ec2) = (TestKey::es256("ec"), TestKey::es256("ec"));
    let publish = |keys: &[Value]| json!({ "keys": keys }).to_string();
    let host = JwksHost::start(&[k1.public_jwk(), oct(&first_k), enc(&ec1)]).await;
    let clock = Clock::manual();
    let auth = auth_for(&host, &clock, false);
    let fetcher = auth.fetcher().expect("fetcher");

    fetcher.refresh_now().await.expect("the host answers");
    assert_eq!(dropped_logged(&lines, "WARN"), ["hs", "ec"]);

    host.update(|r| r.body = publish(&[k1.public_jwk(), oct(&second_k), enc(&ec2)]));
    refetch_when_due(fetcher, &clock).await;
    assert_eq!(dropped_logged(&lines, "WARN"), ["hs", "ec", "hs", "ec"]);
    assert_eq!(dropped_logged(&lines, "DEBUG"), Vec::<String>::new());

    let mut described = enc(&ec2);
    described["x5t"] = json!("not key material");
    host.update(|r| r.body = publish(&[k1.public_jwk(), oct(&second_k), described]));
    refetch_when_due(fetcher, &clock).await;
    assert_eq!(dropped_logged(&lines, "WARN"), ["hs", "ec", "hs", "ec"]);
    assert_eq!(dropped_logged(&lines, "DEBUG"), ["hs", "ec"]);

    let text = lines.text();
    assert!(
        !text.contains(&first_k) && !text.contains(&second_k),
        "an oct key's k is logged: {text}"
    );
}
