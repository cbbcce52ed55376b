//! Database outages: the database goes away under webhook traffic and comes back, and the same
//! process must refuse what needs it (webhook 5xx so Stripe retries, send-sms 503 before Twilio,
//! readyz 503), keep serving what does not (credentials), keep key-usage counts in memory, and
//! be ready again within seconds of the database's return, without a restart.
//!
//! PostgreSQL is cut with a TCP proxy the test owns between edgegate and the server (every open
//! connection dropped, every new one closed at once); SQLite with a second connection holding
//! `BEGIN EXCLUSIVE` on the file, as another process locking it would (the suite runs as root,
//! so file permissions would not stop it).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::stripe::{in_ci, sdk_available, stripe_sdk};
use crate::support::now_ms;
use edgegate::auth::mint::{legacy_token, user_claims};
use edgegate::{AppState, Config, Store};
use serde_json::{Value, json};
use sqlx::Connection as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::fake_stripe::{self, product_id};
use crate::fake_twilio::FakeTwilio;
use crate::support::{TestDb, serve_app, status_and_body};
use crate::{postgres_db, stripe_fixtures, test_db};

pub const WHSEC: &str = "whsec_edgegate_outage_test";
pub const SECRET_KEY: &str = "sb_secret_outage0123456789abcdefgh";
const JWT_SECRET: &str = "outage-legacy-secret-with-at-least-32-bytes";
pub const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";
pub const TOKEN: &str = "f1e2d3c4b5a6978812345678abcdef90";

/// A TCP proxy between edgegate and PostgreSQL whose link the test cuts and restores.
pub(crate) struct PgProxy {
    pub(crate) addr: SocketAddr,
    open: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// Links to stop copying on while their sockets stay open (see [`PgProxy::freeze`]).
    frozen: Arc<tokio::sync::watch::Sender<bool>>,
    accept: JoinHandle<()>,
}

impl PgProxy {
    pub(crate) async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let frozen = Arc::new(tokio::sync::watch::Sender::new(false));
        let accept = tokio::spawn({
            let (open, links, frozen) = (open.clone(), links.clone(), frozen.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !open.load(Ordering::SeqCst) {
                        // Closed at once: the client sees its connection end, as when the
                        // database host is gone.
                        drop(inbound);
                        continue;
                    }
                    // Frozen from the next freeze on; a link opened after it forwards.
                    let mut freeze = frozen.subscribe();
                    freeze.mark_unchanged();
                    let link = tokio::spawn(async move {
                        if let Ok(mut upstream) = TcpStream::connect(target).await {
                            tokio::select! {
                                // The freeze first: a link frozen copies nothing more.
                                biased;
                                _ = freeze.changed() => {
                                    // Silent from now on, its sockets open: a host that stopped
                                    // answering without closing anything.
                                    std::future::pending::<()>().await;
                                }
                                _ = tokio::io::copy_bidirectional(&mut inbound, &mut upstream) => {}
                            }
                        }
                    });
                    links.lock().unwrap().push(link);
                }
            }
        });
        Self {
            addr,
            open,
            links,
            frozen,
            accept,
        }
    }

    /// A proxy in front of `db`'s PostgreSQL server, and `db`'s URL through it.
    async fn in_front_of(db: &TestDb) -> (Self, url::Url) {
        let (mut url, target) = postgres_server(db);
        let proxy = Self::start(target).await;
        url.set_port(Some(proxy.addr.port())).unwrap();
        (proxy, url)
    }

    /// Stops every open link copying either way, its sockets left open (nothing sent, nothing
    /// closed: a host lost, or failed over to another address, without a reset); links opened
    /// after it forward as before.
    pub(crate) fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Drops every open connection and closes every new one until `restore`.
    pub(crate) fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    pub(crate) fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// `db`'s URL, parsed for a test to point it elsewhere, and the address of its PostgreSQL server
/// (an IP address in the tests).
fn postgres_server(db: &TestDb) -> (url::Url, SocketAddr) {
    let url = url::Url::parse(&db.url).unwrap();
    let target = SocketAddr::new(
        url.host_str().unwrap().parse().expect("an IP address"),
        url.port().unwrap_or(5432),
    );
    (url, target)
}

/// How the test takes the database away from edgegate.
enum Outage {
    Proxy(PgProxy),
    /// SQLite: a connection of the test's own, holding the file's write lock while cut.
    Lock {
        url: String,
        holder: Option<sqlx::SqliteConnection>,
    },
}

impl Outage {
    /// The outage for `db`, and the `DATABASE_URL` edgegate must use so the test can cut it.
    async fn new(db: &TestDb) -> (Self, String) {
        if db.is_postgres() {
            let (proxy, url) = PgProxy::in_front_of(db).await;
            (Self::Proxy(proxy), url.to_string())
        } else {
            let outage = Self::Lock {
                url: db.url.clone(),
                holder: None,
            };
            (outage, db.url.clone())
        }
    }

    async fn cut(&mut self) {
        match self {
            Self::Proxy(proxy) => proxy.cut(),
            Self::Lock { url, holder } => {
                let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
                sqlx::query("BEGIN EXCLUSIVE")
                    .execute(&mut conn)
                    .await
                    .unwrap();
                *holder = Some(conn);
            }
        }
    }

    async fn restore(&mut self) {
        match self {
            Self::Proxy(proxy) => proxy.restore(),
            Self::Lock { holder, .. } => {
                let mut conn = holder.take().expect("cut before restore");
                sqlx::query("ROLLBACK").execute(&mut conn).await.unwrap();
                conn.close().await.unwrap();
            }
        }
    }
}

/// Runs one query on the test database (directly, never through the proxy).
pub async fn scalar_i64(db: &TestDb, sql: &str) -> i64 {
    let sql = sqlx::AssertSqlSafe(sql.to_owned());
    if db.is_postgres() {
        let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
        let value: i64 = sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap();
        conn.close().await.unwrap();
        value
    } else {
        let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
        let value: i64 = sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap();
        conn.close().await.unwrap();
        value
    }
}

/// The name event `i` gives its product, so a test can tell which event wrote a row.
pub fn product_name(i: usize) -> String {
    format!("outage product {i}")
}

/// `product.created` number `i` (id `evt_outage_{i}`), for product `i`.
pub fn product_event(fixtures: &Value, i: usize) -> String {
    let mut object = fake_stripe::product(fixtures, i);
    object["name"] = json!(product_name(i));
    let mut event = fake_stripe::resource(fixtures, "event");
    event["id"] = json!(format!("evt_outage_{i}"));
    event["type"] = json!("product.created");
    // Fixed, so a redelivery is the very same body, as Stripe's is.
    event["created"] = json!(1_800_000_000 + i);
    event["data"] = json!({ "object": object });
    event.to_string()
}

async fn post_event(
    client: &reqwest::Client,
    base: &str,
    body: &str,
) -> reqwest::Result<reqwest::Response> {
    let signature = crate::stripe::sdk_sign(body, WHSEC, now_ms() / 1000);
    client
        .post(format!("{base}/functions/v1/stripe-webhook"))
        .header("content-type", "application/json")
        .header("stripe-signature", signature)
        .body(body.to_owned())
        .timeout(Duration::from_secs(20))
        .send()
        .await
}

/// `deliver`'s answer when the request was sent and no answer came (the server died under it).
pub const NO_ANSWER: u16 = 0;
/// `deliver`'s answer when no connection could be made (nothing was sent).
pub const NOT_CONNECTED: u16 = 1;

/// Delivers `body` as Stripe would (signed now) to `base`: the status, `NO_ANSWER` or
/// `NOT_CONNECTED`.
pub async fn deliver(client: &reqwest::Client, base: &str, body: &str) -> u16 {
    match post_event(client, base, body).await {
        Ok(response) => response.status().as_u16(),
        Err(err) if err.is_connect() => NOT_CONNECTED,
        Err(_) => NO_ANSWER,
    }
}

/// Redelivers `body` until it is taken, as Stripe's retries would (bounded).
pub async fn redeliver(client: &reqwest::Client, base: &str, body: &str) {
    for _ in 0..50 {
        if deliver(client, base, body).await == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("a redelivered event was never taken");
}

/// Every row `sql` (two TEXT columns) returns, read directly (never through the proxy).
pub async fn text_pairs(db: &TestDb, sql: &str) -> Vec<(String, String)> {
    let sql = sqlx::AssertSqlSafe(sql.to_owned());
    if db.is_postgres() {
        let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
        let rows = sqlx::query_as(sql).fetch_all(&mut conn).await.unwrap();
        conn.close().await.unwrap();
        rows
    } else {
        let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
        let rows = sqlx::query_as(sql).fetch_all(&mut conn).await.unwrap();
        conn.close().await.unwrap();
        rows
    }
}

/// Asserts every event `0..events` is in the ledger once, and that the product rows are exactly
/// the ones those events wrote.
pub async fn assert_each_event_applied_once(db: &TestDb, events: usize) {
    let ledger = text_pairs(db, "SELECT id, event_type FROM stripe_events ORDER BY id").await;
    let mut expected: Vec<(String, String)> = (0..events)
        .map(|i| (format!("evt_outage_{i}"), "product.created".to_owned()))
        .collect();
    expected.sort();
    assert_eq!(ledger, expected, "the ledger holds each event once");
    let products = text_pairs(db, "SELECT id, name FROM stripe_products ORDER BY id").await;
    let mut expected: Vec<(String, String)> = (0..events)
        .map(|i| (product_id(i), product_name(i)))
        .collect();
    expected.sort();
    assert_eq!(products, expected, "each event's product, once");
}

/// Webhook deliveries from `workers` concurrent senders, each event once, until `stop`.
pub struct Traffic {
    answers: Arc<Mutex<BTreeMap<usize, u16>>>,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

const MAX_EVENTS: usize = 2_000;

impl Traffic {
    pub fn start(fixtures: Arc<Value>, base: String, workers: usize) -> Self {
        let answers: Arc<Mutex<BTreeMap<usize, u16>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicUsize::new(0));
        let client = reqwest::Client::new();
        let workers = (0..workers)
            .map(|_| {
                let (answers, stop, next) = (answers.clone(), stop.clone(), next.clone());
                let (fixtures, base, client) = (fixtures.clone(), base.clone(), client.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= MAX_EVENTS {
                            break;
                        }
                        let status = deliver(&client, &base, &product_event(&fixtures, i)).await;
                        answers.lock().unwrap().insert(i, status);
                    }
                })
            })
            .collect();
        Self {
            answers,
            stop,
            workers,
        }
    }

    fn answered(&self, status: impl Fn(u16) -> bool) -> usize {
        let answers = self.answers.lock().unwrap();
        answers.values().filter(|s| status(**s)).count()
    }

    /// Waits (bounded) until `enough` answers match `status`.
    pub async fn wait_for(&self, enough: usize, status: impl Fn(u16) -> bool + Copy, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.answered(status) < enough {
            assert!(Instant::now() < deadline, "waiting for {enough} {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the senders; every event attempted, with its answer.
    pub async fn finish(self) -> BTreeMap<usize, u16> {
        self.stop.store(true, Ordering::SeqCst);
        for worker in self.workers {
            worker.await.unwrap();
        }
        Arc::try_unwrap(self.answers).unwrap().into_inner().unwrap()
    }
}

fn config(url: &str, vars: &[(&str, &str)]) -> Config {
    let mut map: BTreeMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    map.insert("DATABASE_URL".to_owned(), url.to_owned());
    Config::from_lookup(|name| map.get(name).cloned()).expect("valid test configuration")
}

/// A POST with no body and the secret API key: its status and JSON body.
async fn post_with_secret_key(client: &reqwest::Client, url: String) -> (u16, Value) {
    let response = client
        .post(url)
        .header("apikey", SECRET_KEY)
        .send()
        .await
        .unwrap();
    status_and_body(response).await
}

/// The one message the test tries to send, always with the same idempotency key.
async fn send_sms(client: &reqwest::Client, base: &str) -> (u16, Value) {
    let response = client
        .post(format!("{base}/functions/v1/send-sms"))
        .header("apikey", SECRET_KEY)
        .json(&json!({"to": "+12025550123", "body": "hi", "idempotency_key": "outage-1"}))
        .send()
        .await
        .unwrap();
    status_and_body(response).await
}

fn legacy_bearer() -> String {
    let claims = user_claims("supabase", "authenticated", "user-1", now_ms() / 1000, 3600);
    format!(
        "Bearer {}",
        legacy_token(JWT_SECRET.as_bytes(), &claims, None)
    )
}

async fn key_usage_total(db: &TestDb) -> i64 {
    scalar_i64(
        db,
        "SELECT CAST(COALESCE(SUM(verified_count), 0) AS BIGINT) FROM key_usage_hourly \
         WHERE source = 'legacy_secret'",
    )
    .await
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn outage_under_webhook_traffic_refuses_writes_keeps_credentials_and_recovers_in_place() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let twilio = FakeTwilio::start(ACCOUNT, TOKEN).await;
    let (mut outage, url) = Outage::new(&db).await;
    let secret_keys = format!(r#"{{"backend":"{SECRET_KEY}"}}"#);
    let config = config(
        &url,
        &[
            ("STRIPE_WEBHOOK_SECRET", WHSEC),
            ("SUPABASE_JWT_SECRET", JWT_SECRET),
            ("SUPABASE_SECRET_KEYS", &secret_keys),
            ("TWILIO_ACCOUNT_SID", ACCOUNT),
            ("TWILIO_AUTH_TOKEN", TOKEN),
            ("TWILIO_API_BASE", &twilio.base),
            ("TWILIO_FROM_NUMBER", "+15005550006"),
        ],
    );
    let store = Store::connect(&config.database_url).await.unwrap();
    store.migrate().await.unwrap();
    let state = AppState::new(config, store.clone());
    let server = serve_app(edgegate::app(state.clone()), Duration::from_secs(5)).await;
    // As `run` starts it, with pauses short enough for a test.
    let flusher = edgegate::auth::usage::spawn_flusher_every(
        state.usage.clone(),
        store.clone(),
        Duration::from_millis(200),
        Duration::from_millis(100),
    );
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();

    let traffic = Traffic::start(fixtures.clone(), base.clone(), 4);
    traffic.wait_for(20, |s| s == 200, "events taken").await;

    outage.cut().await;
    traffic
        .wait_for(4, |s| s >= 500, "deliveries refused during the cut")
        .await;

    // Credentials need no database.
    let verified_in_outage = 5;
    for _ in 0..verified_in_outage {
        let response = client
            .get(format!("{base}/functions/v1/jwt-test"))
            .header("authorization", legacy_bearer())
            .send()
            .await
            .unwrap();
        let (status, body) = status_and_body(response).await;
        assert_eq!(status, 200, "jwt-test during the outage: {body}");
    }
    let asked = Instant::now();
    let (status, body) = status_and_body(server.get("/readyz").await).await;
    eprintln!(
        "readyz answered {status} in {:?} during the cut",
        asked.elapsed()
    );
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "NOT_READY");
    assert_eq!(body["checks"]["database"]["ok"], false, "{body}");
    let asked = Instant::now();
    let (status, body) = send_sms(&client, &base).await;
    eprintln!(
        "send-sms answered {status} in {:?} during the cut",
        asked.elapsed()
    );
    assert_eq!(status, 503, "send-sms during the outage: {body}");
    assert_eq!(body["code"], "NOT_READY");
    assert!(twilio.requests().is_empty(), "Twilio was called");
    // The counts cannot be written now; the flusher fails and keeps them.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = server.get("/metrics").await.text().await.unwrap();
        if metric(&metrics, "edgegate_key_usage_flush_failures_total") >= Some(1.0) {
            assert_eq!(metric(&metrics, "edgegate_database_ready"), Some(0.0));
            break;
        }
        assert!(Instant::now() < deadline, "no key-usage flush failed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(key_usage_total(&db).await, 0);

    outage.restore().await;
    let restored = Instant::now();
    loop {
        if server.get("/readyz").await.status() == 200 {
            break;
        }
        assert!(
            restored.elapsed() < Duration::from_secs(10),
            "not ready again 10 s after the database came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("ready again {:?} after the restore", restored.elapsed());
    let after = traffic.answered(|s| s == 200);
    traffic
        .wait_for(after + 20, |s| s == 200, "events taken after the restore")
        .await;
    let answers = traffic.finish().await;

    let refused: Vec<usize> = answers
        .iter()
        .filter(|(_, status)| **status != 200)
        .map(|(i, _)| *i)
        .collect();
    assert!(
        refused.len() >= 4,
        "the cut refused {} deliveries",
        refused.len()
    );
    assert!(
        refused.iter().all(|i| answers[i] >= 500),
        "a refused delivery was not a 5xx: {answers:?}"
    );
    for i in &refused {
        redeliver(&client, &base, &product_event(&fixtures, *i)).await;
    }
    // A delivery that was taken once is a duplicate now, whatever the outage did.
    let first_taken = answers.iter().find(|(_, s)| **s == 200).unwrap().0;
    let response = post_event(&client, &base, &product_event(&fixtures, *first_taken)).await;
    let (status, body) = status_and_body(response.unwrap()).await;
    assert_eq!((status, body["duplicate"].clone()), (200, json!(true)));
    assert_each_event_applied_once(&db, answers.len()).await;

    // The counts verified during the outage reach the database now that it is back.
    let deadline = Instant::now() + Duration::from_secs(10);
    while key_usage_total(&db).await < verified_in_outage {
        assert!(
            Instant::now() < deadline,
            "the kept key usage never reached the database"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(key_usage_total(&db).await, verified_in_outage);
    flusher.abort();
    let metrics = server.get("/metrics").await.text().await.unwrap();
    assert_eq!(
        metric(&metrics, "edgegate_key_usage_dropped_total"),
        Some(0.0)
    );
    assert_eq!(metric(&metrics, "edgegate_database_ready"), Some(1.0));

    // And send-sms works again on the same process.
    assert_eq!(send_sms(&client, &base).await.0, 202);
    assert_eq!(twilio.requests().len(), 1);
}

/// A PostgreSQL that is not listening when `serve` starts (a restart during an outage: a deploy,
/// a secret change, an OOM kill) does not stop it: credentials verify at once, readyz and the
/// routes that need the database answer 503 `NOT_READY` (never a query against a schema not yet
/// migrated), and once the server listens the migrations are applied and everything serves,
/// without a restart.
#[tokio::test]
async fn serve_starts_while_postgres_is_down_and_migrates_once_it_answers() {
    let db = postgres_db!();
    let (mut url, target) = postgres_server(&db);
    // A port nothing listens on yet: connections to it are refused until the test opens it.
    let port = crate::process::free_port();
    url.set_port(Some(port)).unwrap();
    let config = config(
        url.as_str(),
        &[
            ("STRIPE_WEBHOOK_SECRET", WHSEC),
            ("SUPABASE_JWT_SECRET", JWT_SECRET),
        ],
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = edgegate::spawn(config, listener)
        .await
        .expect("serve starts while the database is down");
    let base = format!("http://{}", app.local_addr());
    let client = reqwest::Client::new();
    let event = json!({
        "id": "evt_outage_start",
        "object": "event",
        "type": "balance.available",
        "created": now_ms() / 1000,
        "data": { "object": { "object": "balance" } },
    })
    .to_string();
    let webhook = || {
        client
            .post(format!("{base}/functions/v1/stripe-webhook"))
            .header("content-type", "application/json")
            .header(
                "stripe-signature",
                edgegate::stripe::signature::sign(event.as_bytes(), WHSEC, now_ms() / 1000),
            )
            .body(event.clone())
            .send()
    };

    let response = client
        .get(format!("{base}/functions/v1/jwt-test"))
        .header("authorization", legacy_bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (status, body) =
        status_and_body(client.get(format!("{base}/readyz")).send().await.unwrap()).await;
    assert_eq!(
        (status, body["code"].clone()),
        (503, json!("NOT_READY")),
        "{body}"
    );
    let (status, body) = status_and_body(webhook().await.unwrap()).await;
    assert_eq!(
        (status, body["code"].clone()),
        (503, json!("NOT_READY")),
        "{body}"
    );

    // The database comes up on that port.
    let proxy = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let forward = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = proxy.accept().await {
            tokio::spawn(async move {
                if let Ok(mut upstream) = TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut upstream).await;
                }
            });
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status();
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "readyz never turned 200 after the database came up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = status_and_body(webhook().await.unwrap()).await;
    assert_eq!(
        (status, body["received"].clone()),
        (200, json!(true)),
        "{body}"
    );
    assert!(scalar_i64(&db, "SELECT COUNT(*) FROM _sqlx_migrations").await > 0);
    app.shutdown().await.unwrap();
    forward.abort();
}

/// A service waiting for its database to migrate it stops promptly on its shutdown signal: the
/// retry is stopped with the other background tasks.
#[tokio::test]
async fn a_service_waiting_for_its_database_stops_promptly() {
    let port = crate::process::free_port();
    let url = format!("postgres://app:secret@127.0.0.1:{port}/app");
    let config = config(&url, &[("SUPABASE_JWT_SECRET", JWT_SECRET)]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = edgegate::spawn(config, listener).await.unwrap();
    // A verification, so there are usage counts to flush at the stop (which cannot be written).
    let response = reqwest::Client::new()
        .get(format!("http://{}/functions/v1/jwt-test", app.local_addr()))
        .header("authorization", legacy_bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    tokio::time::timeout(Duration::from_secs(15), app.shutdown())
        .await
        .expect("stopped within 15 s")
        .unwrap();
}

/// `GET /admin/signing-keys` during an outage: the keys and the JWKS state are in memory, so
/// they are listed; the usage counts are marked unavailable and revoking is not called safe, the
/// reason saying why alone: a legacy caller this instance has not flushed is not named in it as
/// if it were the whole of the legacy use.
#[tokio::test]
async fn signing_keys_lists_the_keys_during_an_outage_with_the_usage_unavailable() {
    let db = postgres_db!();
    let (mut outage, url) = Outage::new(&db).await;
    let secret_keys = format!(r#"{{"backend":"{SECRET_KEY}"}}"#);
    let config = config(
        &url,
        &[
            ("SUPABASE_JWT_SECRET", JWT_SECRET),
            ("SUPABASE_SECRET_KEYS", &secret_keys),
        ],
    );
    let store = Store::connect(&config.database_url).await.unwrap();
    store.migrate().await.unwrap();
    let state = AppState::new(config, store);
    let server = serve_app(edgegate::app(state), Duration::from_secs(5)).await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/admin/signing-keys", server.addr);
    let report = || async {
        let response = client
            .get(&url)
            .header("apikey", SECRET_KEY)
            .send()
            .await
            .unwrap();
        status_and_body(response).await
    };

    // A legacy session this instance counted and has not flushed (no flusher runs here).
    let response = client
        .get(format!("http://{}/functions/v1/jwt-test", server.addr))
        .header("authorization", legacy_bearer())
        .header("user-agent", "okhttp/4.12.0")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    outage.cut().await;
    let (status, body) = report().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["legacy_revocation_safe"], json!(false), "{body}");
    assert!(body["usage_unavailable"].is_string(), "{body}");
    assert_eq!(
        body["reason"],
        "the database's usage counts cannot be read now, so the legacy secret's use is not \
         known: ask again once the database answers",
        "{body}"
    );
    assert_eq!(body["legacy_secret"]["configured"], json!(true), "{body}");
    assert!(
        body["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|key| key["source"] == "legacy_secret"),
        "{body}"
    );

    outage.restore().await;
    let (status, body) = report().await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("usage_unavailable").is_none(), "{body}");
}

/// A readiness probe whose callers all left before it ended (load balancers that hung up) is
/// not handed to a later caller as if it were still running: after the database is back, the
/// next probe says so, rather than the abandoned probe's failure.
#[tokio::test]
async fn an_abandoned_readiness_probe_is_not_reused_after_the_database_is_back() {
    let db = test_db!();
    let (mut outage, url) = Outage::new(&db).await;
    let config = config(&url, &[]);
    let store = Store::connect(&config.database_url).await.unwrap();
    store.migrate().await.unwrap();
    store.ping().await.expect("ready before the outage");
    // Past the reuse of that answer.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    outage.cut().await;
    let started = std::time::Instant::now();
    // The caller leaves at once; its probe goes on, and fails, with no one to take its answer.
    // (SQLite's locked file keeps it waiting; PostgreSQL behind the cut proxy may refuse it at
    // once, and then nothing is abandoned and only the recovery below is checked.)
    let left = tokio::time::timeout(Duration::from_millis(100), store.ping()).await;
    if !db.is_postgres() {
        assert!(
            left.is_err(),
            "the probe answered within 100 ms during the outage"
        );
    }
    tokio::time::sleep(Duration::from_millis(3_200).saturating_sub(started.elapsed())).await;
    outage.restore().await;
    // Well past the probe's own bound (2 s) and its answer's reuse (1 s).
    tokio::time::sleep(Duration::from_millis(4_500).saturating_sub(started.elapsed())).await;
    store
        .ping()
        .await
        .expect("ready once the database is back, not the abandoned probe's failure");
}

/// A PostgreSQL host that goes silent mid-query (lost, or failed over to another address,
/// without a reset) does not keep the pool's connections: each request whose query was in flight
/// is dropped at its timeout, and its connection, whose answer will never come, is closed once
/// the server would have cancelled the statement itself (`statement_timeout`, 15 s, and 2 s for
/// its answer) rather than held until the kernel gives up on it (about 15 minutes), so the next
/// query gets a new connection (to the host that now answers) instead of `PoolTimedOut`.
#[tokio::test]
async fn a_postgres_host_gone_silent_mid_query_does_not_hold_the_pool() {
    let db = postgres_db!();
    let (proxy, url) = PgProxy::in_front_of(&db).await;
    let config = config(url.as_str(), &[]);
    let store = Arc::new(Store::connect(&config.database_url).await.unwrap());
    store.migrate().await.unwrap();
    // Holds every query on audit_log (directly, not through the proxy) until the proxy is frozen.
    let mut holder = audit_log_locked(&db).await;
    // As many queries in flight as the pool has connections, each dropped after 2 s as a
    // request is at its timeout.
    let callers: Vec<_> = (0..10)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(2), store.recent_audit(1))
                    .await
                    .is_err()
            })
        })
        .collect();
    // Frozen once all ten wait on the lock, so none has its slot back before the host is silent.
    let waiting = async {
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'audit_log'::regclass",
            )
            .fetch_one(&mut holder)
            .await
            .unwrap();
            if waiting == 10 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_millis(1500), waiting)
        .await
        .expect("ten queries waiting on the lock within 1.5 s");
    proxy.freeze();
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .unwrap();
    for caller in callers {
        assert!(
            caller.await.unwrap(),
            "a query answered through the frozen proxy"
        );
    }
    // The callers gave up at 2 s and their connections are closed 17 s later (see above); until
    // then each query gives up acquiring after 3 s. Tried again until 25 s have passed.
    let deadline = Instant::now() + Duration::from_secs(25);
    let next = loop {
        let next = store.recent_audit(1).await;
        if next.is_ok() || Instant::now() >= deadline {
            break next;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        next.is_ok(),
        "the next query 25 s after the host went silent: {next:?}"
    );
}

/// A connection of its own to `db` holding `audit_log` locked (ACCESS EXCLUSIVE) in its open
/// transaction: every query on the table waits until it rolls back.
async fn audit_log_locked(db: &TestDb) -> sqlx::PgConnection {
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE audit_log IN ACCESS EXCLUSIVE MODE")
        .execute(&mut holder)
        .await
        .unwrap();
    holder
}

/// A store on `db` whose query (reading the audit log) was dropped by its caller after 500 ms
/// while it waited on a table lock; the connection holding that lock, in its transaction; and
/// the server process of the dropped query's connection.
async fn a_query_dropped_behind_a_lock(db: &TestDb) -> (Store, sqlx::PgConnection, i32) {
    let config = config(&db.url, &[]);
    let store = Store::connect(&config.database_url).await.unwrap();
    store.migrate().await.unwrap();
    let mut holder = audit_log_locked(db).await;
    let caller = tokio::time::timeout(Duration::from_millis(500), store.recent_audit(1));
    assert!(caller.await.is_err(), "a query answered through the lock");
    let waiting = "SELECT pid FROM pg_locks WHERE NOT granted AND relation = 'audit_log'::regclass";
    let pid: i32 = sqlx::query_scalar(waiting)
        .fetch_one(&mut holder)
        .await
        .expect("the dropped query still waits on the lock");
    (store, holder, pid)
}

/// Whether the server process `pid` still runs (a closed connection's ends as soon as its
/// statement is done).
async fn backend_alive(conn: &mut sqlx::PgConnection, pid: i32) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
        .bind(pid)
        .fetch_one(conn)
        .await
        .unwrap()
}

/// A connection whose caller gave up while a slow server, still answering, had its statement
/// (here waiting on a lock) left to run is given back to the pool once the statement is done,
/// not closed: closed, the server ran the statement on, holding its locks and a connection slot,
/// while the pool opened another in its place.
#[tokio::test]
async fn a_slow_servers_connection_whose_caller_gave_up_is_kept() {
    let db = postgres_db!();
    let (store, mut holder, pid) = a_query_dropped_behind_a_lock(&db).await;
    // The server's work left outlasts a second from the caller's drop: 1.5 s.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .unwrap();
    // A closed connection's server process ends as soon as its statement is done.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let alive = backend_alive(&mut holder, pid).await;
    assert!(alive, "the connection whose caller gave up was closed");
    assert!(store.recent_audit(1).await.is_ok());
}

/// A dropped statement that the server ended with an error (here its lock timeout, 3 s, while
/// the lock is held on) has ended: its connection is kept as well, not closed as after an error
/// of the link.
#[tokio::test]
async fn a_dropped_statement_the_server_ended_with_an_error_keeps_its_connection() {
    let db = postgres_db!();
    let (store, mut holder, pid) = a_query_dropped_behind_a_lock(&db).await;
    // Past the session's lock_timeout (3 s from the statement's start), with the lock still held.
    tokio::time::sleep(Duration::from_millis(4000)).await;
    let alive = backend_alive(&mut holder, pid).await;
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .unwrap();
    assert!(
        alive,
        "the connection whose statement the server ended with an error was closed"
    );
    assert!(store.recent_audit(1).await.is_ok());
}

/// A PostgreSQL database that refuses connections (`ALTER DATABASE … ALLOW_CONNECTIONS false`,
/// as for maintenance: PostgreSQL ends each new session with a FATAL 55000, "not currently
/// accepting connections") is an outage like any other: the sync and the reconciliation answer
/// 503 `NOT_READY`, as readyz does, rather than 500. On a database of its own, so the shared one
/// keeps taking connections.
#[tokio::test]
async fn a_postgres_database_refusing_connections_is_not_ready_for_sync_and_reconcile() {
    use futures_util::FutureExt as _;
    let Some(db) = TestDb::postgres_database().await else {
        crate::support::skipped("PostgreSQL only (TEST_POSTGRES_URL)");
        return;
    };
    let outcome = std::panic::AssertUnwindSafe(refuse_connections_under_the_app(&db))
        .catch_unwind()
        .await;
    db.drop_database().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn refuse_connections_under_the_app(db: &TestDb) {
    let secret_keys = format!(r#"{{"backend":"{SECRET_KEY}"}}"#);
    let config = config(
        &db.url,
        &[
            ("SUPABASE_SECRET_KEYS", &secret_keys),
            ("STRIPE_SECRET_KEY", fake_stripe::SECRET_KEY),
            // Never reached: each run stops at the database first.
            ("STRIPE_API_BASE", "http://127.0.0.1:9/"),
        ],
    );
    let store = Store::connect(&config.database_url).await.unwrap();
    store.migrate().await.unwrap();
    let state = AppState::new(config, store);
    let server = serve_app(edgegate::app(state), Duration::from_secs(5)).await;

    // Refuse new sessions, then end the app's open ones.
    let name = url::Url::parse(&db.url).unwrap().path()[1..].to_owned();
    let base = std::env::var("TEST_POSTGRES_URL").unwrap();
    let mut admin = sqlx::PgConnection::connect(&base).await.unwrap();
    for sql in [
        format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"),
        format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut admin)
            .await
            .unwrap();
    }
    admin.close().await.unwrap();

    for path in [
        "/functions/v1/sync-stripe-products-hardened",
        "/admin/stripe/reconcile",
    ] {
        // Twice: the first may meet a session ended above, the second only a refused one.
        for _ in 0..2 {
            let (status, body) = post_with_secret_key(&server.client, server.url(path)).await;
            assert_eq!(
                (status, &body["code"]),
                (503, &json!("NOT_READY")),
                "{path}: {body}"
            );
        }
    }
    let (status, body) = status_and_body(server.get("/readyz").await).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["checks"]["database"]["ok"], false, "{body}");
}

/// A PostgreSQL that takes no writes (Supabase's answer to a full disk is
/// `default_transaction_read_only`; a hot standby after a failover is the same to its clients)
/// is not ready: /readyz answers 503 saying it is read-only, `edgegate_database_ready` is 0, and
/// what would write answers 503 `NOT_READY` (so Stripe retries), never 500. Its sessions are made
/// read-only by the URL's options, so nothing of the shared database changes.
#[tokio::test]
async fn a_read_only_postgres_is_not_ready_and_writes_answer_503() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = postgres_db!();
    db.store().await.close().await;
    let read_only = format!("{}&options=-c%20default_transaction_read_only%3Don", db.url);
    let twilio = FakeTwilio::start(ACCOUNT, TOKEN).await;
    let secret_keys = format!(r#"{{"backend":"{SECRET_KEY}"}}"#);
    let config = config(
        &read_only,
        &[
            ("STRIPE_WEBHOOK_SECRET", WHSEC),
            ("SUPABASE_SECRET_KEYS", &secret_keys),
            ("STRIPE_SECRET_KEY", fake_stripe::SECRET_KEY),
            // Never reached: the run stops at the database first.
            ("STRIPE_API_BASE", "http://127.0.0.1:9/"),
            ("TWILIO_ACCOUNT_SID", ACCOUNT),
            ("TWILIO_AUTH_TOKEN", TOKEN),
            ("TWILIO_API_BASE", &twilio.base),
            ("TWILIO_FROM_NUMBER", "+15005550006"),
        ],
    );
    let store = Store::connect(&config.database_url).await.unwrap();
    let state = AppState::new(config, store);
    let server = serve_app(edgegate::app(state.clone()), Duration::from_secs(5)).await;
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();

    let (status, body) = status_and_body(server.get("/readyz").await).await;
    assert_eq!(status, 503, "{body}");
    let error = body["checks"]["database"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("read-only"), "{body}");
    let metrics = server.get("/metrics").await.text().await.unwrap();
    assert_eq!(metric(&metrics, "edgegate_database_ready"), Some(0.0));

    let response = post_event(&client, &base, &product_event(&fixtures, 1))
        .await
        .unwrap();
    let (status, body) = status_and_body(response).await;
    assert_eq!(
        (status, &body["code"]),
        (503, &json!("NOT_READY")),
        "webhook: {body}"
    );
    let (status, body) = send_sms(&client, &base).await;
    assert_eq!(
        (status, &body["code"]),
        (503, &json!("NOT_READY")),
        "send-sms: {body}"
    );
    assert!(
        twilio.requests().is_empty(),
        "sent though nothing could be recorded"
    );
    let (status, body) =
        post_with_secret_key(&client, format!("{base}/admin/stripe/reconcile")).await;
    assert_eq!(
        (status, &body["code"]),
        (503, &json!("NOT_READY")),
        "reconcile: {body}"
    );
}

/// A PostgreSQL that refuses the connection at once is reported by readiness with its answer,
/// promptly, not as "did not answer within 2 s" (the pool retries a refused connection until its
/// own timeout and then says only that it timed out); the password is never in it.
#[tokio::test]
async fn readiness_says_why_postgres_refused_the_connection() {
    let port = crate::process::free_port();
    let url = format!("postgres://app:pw-not-in-the-answer@127.0.0.1:{port}/app");
    let config = config(&url, &[]);
    let (store, unreachable) = Store::connect_or_wait(&config.database_url, false)
        .await
        .unwrap();
    assert!(unreachable.is_some(), "port {port} answered");
    let started = Instant::now();
    let error = format!("{:#}", store.ping().await.unwrap_err());
    assert!(error.contains("connection refused"), "{error}");
    assert!(error.contains(&format!("127.0.0.1:{port}")), "{error}");
    assert!(!error.contains("pw-not-in-the-answer"), "{error}");
    assert!(
        started.elapsed() < Duration::from_millis(1_900),
        "{:?}",
        started.elapsed()
    );
}

/// A tmpfs mounted at `path` for one test (unmounted when dropped).
pub struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// With mount `options` (`size=8m`, `size=1m,ro`); `None` (a loud skip; a failure under CI,
    /// which runs as root) when this process may not mount one.
    pub fn mount(path: &std::path::Path, options: &str) -> Option<Self> {
        std::fs::create_dir_all(path).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(path)
            .output();
        match mounted {
            Ok(out) if out.status.success() => Some(Self(path.to_owned())),
            other => {
                let why = format!("{other:?}");
                assert!(!in_ci(), "CI=true and a tmpfs cannot be mounted: {why}");
                crate::support::skipped(&format!(
                    "a tmpfs cannot be mounted here (needs root): {why}"
                ));
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the filesystem of `dir` with one file, until it has no space left; returns that file.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write as _;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let block = vec![0u8; 4096];
    while file.write_all(&block).and_then(|()| file.flush()).is_ok() {}
    path
}

/// The whole application on SQLite on a tmpfs of its own (8 MiB), taking Stripe's webhooks.
/// Dropped in order: the server, the filesystem, then the folder it was mounted in.
struct OnTmpfs {
    server: crate::support::TestServer,
    _mount: Tmpfs,
    db: TestDb,
    tiny: std::path::PathBuf,
    base: String,
}

impl OnTmpfs {
    /// `None` (a loud skip; a failure under CI) when no tmpfs can be mounted here.
    async fn start() -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let tiny = dir.path().join("tiny");
        let mount = Tmpfs::mount(&tiny, "size=8m")?;
        let db = TestDb::sqlite_in(dir, &tiny.join("edgegate.db"));
        let (server, _state) =
            crate::support::spawn_app(&db, &[("STRIPE_WEBHOOK_SECRET", WHSEC)]).await;
        let base = format!("http://{}", server.addr);
        Some(Self {
            server,
            _mount: mount,
            db,
            tiny,
            base,
        })
    }
}

/// SQLite on a disk that fills up: the deliveries whose commit finds no space are refused, and
/// once there is space again every event answered 200 is in the file, each once. A COMMIT that
/// failed on the full disk left its pooled connection counted inside a transaction SQLite had
/// already ended; the deliveries that came to that connection afterwards were answered 200 from
/// a savepoint of a transaction that never committed, lost, while the others alternated with
/// "database is locked".
#[tokio::test]
async fn a_full_disk_under_sqlite_loses_no_event_answered_200() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let Some(disk) = OnTmpfs::start().await else {
        return;
    };
    let (tiny, base) = (&disk.tiny, &disk.base);
    let client = reqwest::Client::new();
    let events = 24;
    assert_eq!(
        deliver(&client, base, &product_event(&fixtures, 0)).await,
        200
    );

    let filler = fill(tiny);
    let mut refused = 0;
    for i in 1..4 {
        let status = deliver(&client, base, &product_event(&fixtures, i)).await;
        refused += usize::from(status >= 500);
    }
    assert!(refused > 0, "no delivery was refused on the full disk");

    std::fs::remove_file(filler).unwrap();
    for i in 1..events {
        redeliver(&client, base, &product_event(&fixtures, i)).await;
    }
    assert_each_event_applied_once(&disk.db, events).await;
}

/// SQLite on a full disk is not ready: once a write was refused for want of space, /readyz
/// answers 503 saying the disk is full (its probe, which took and released the write lock,
/// needed no space and said ready while every webhook was refused), and it is ready again by
/// itself once there is space, with no restart.
#[tokio::test]
async fn a_full_disk_under_sqlite_is_not_ready_until_there_is_space_again() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let Some(disk) = OnTmpfs::start().await else {
        return;
    };
    let (server, tiny, base) = (&disk.server, &disk.tiny, &disk.base);
    let client = reqwest::Client::new();
    assert_eq!(server.get("/readyz").await.status(), 200);

    let filler = fill(tiny);
    let mut refused = false;
    for i in 1..10 {
        if deliver(&client, base, &product_event(&fixtures, i)).await == 503 {
            refused = true;
            break;
        }
    }
    assert!(refused, "no delivery was refused on the full disk");
    // The answer before the disk filled is reused for a second.
    let refused_at = Instant::now();
    let (status, body) = loop {
        let (status, body) = status_and_body(server.get("/readyz").await).await;
        if status != 200 || refused_at.elapsed() > Duration::from_secs(5) {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, 503, "{body}");
    let error = body["checks"]["database"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("disk is full"), "{body}");
    let metrics = server.get("/metrics").await.text().await.unwrap();
    assert_eq!(metric(&metrics, "edgegate_database_ready"), Some(0.0));

    std::fs::remove_file(filler).unwrap();
    let freed = Instant::now();
    loop {
        let (status, body) = status_and_body(server.get("/readyz").await).await;
        if status == 200 {
            break;
        }
        assert!(
            freed.elapsed() < Duration::from_secs(10),
            "not ready 10 s after space came back: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        deliver(&client, base, &product_event(&fixtures, 20)).await,
        200
    );
}
