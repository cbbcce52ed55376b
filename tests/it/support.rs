//! Test harness: a fresh database per test and the app served on 127.0.0.1:0.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use edgegate::clock::Clock;
use edgegate::server::middleware::{self, Limits};
use edgegate::{AppState, Config, Store};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A database of the suite's backend, private to one test.
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

/// The wall clock in milliseconds, for test data made outside an app (the apps read their
/// `AppState` clock).
pub fn now_ms() -> i64 {
    Clock::system().now_ms()
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true")
}

/// Says that a test skipped and why, where it is seen: the test harness keeps what `eprintln!`
/// prints from a test that passes to itself (a skip printed with it was shown by nothing short
/// of `--nocapture`); written to the process's standard error itself, which it does not capture.
pub fn skipped(why: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {why}");
}

impl TestDb {
    /// SQLite in a temporary folder, or, when `TEST_POSTGRES_URL` is set, a new schema there.
    /// `None` (after a printed notice) when PostgreSQL was asked for but does not answer,
    /// except under `CI=true`, where that fails the test.
    pub async fn new() -> Option<Self> {
        match std::env::var("TEST_POSTGRES_URL") {
            Ok(base) if !base.is_empty() => Self::postgres(&base).await,
            _ => Some(Self::sqlite()),
        }
    }

    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temporary folder");
        let url = format!("sqlite://{}", dir.path().join("edgegate.db").display());
        Self {
            url,
            _dir: Some(dir),
        }
    }

    /// SQLite at `file` in `dir`, which the database keeps until it is dropped.
    pub fn sqlite_in(dir: tempfile::TempDir, file: &std::path::Path) -> Self {
        Self {
            url: format!("sqlite://{}", file.display()),
            _dir: Some(dir),
        }
    }

    /// A connection to the PostgreSQL at `base` for making a test's schema or database; `None`
    /// (a loud skip) when it does not answer, a failure under `CI=true`.
    async fn postgres_admin(base: &str) -> Option<sqlx::PgPool> {
        match sqlx::PgPool::connect(base).await {
            Ok(pool) => Some(pool),
            Err(err) if !in_ci() => {
                crate::support::skipped(&format!(
                    "PostgreSQL at TEST_POSTGRES_URL does not answer ({err})"
                ));
                None
            }
            Err(err) => {
                panic!("CI=true and PostgreSQL at TEST_POSTGRES_URL does not answer: {err}")
            }
        }
    }

    async fn postgres(base: &str) -> Option<Self> {
        let admin = Self::postgres_admin(base).await?;
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&admin)
            .await
            .expect("create the test schema");
        admin.close().await;
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}options=-c%20search_path%3D{schema}");
        Some(Self { url, _dir: None })
    }

    /// On PostgreSQL, a database of its own instead of a schema in the shared one: for a test
    /// that holds one of edgegate's advisory locks, which are per database, so the tests running
    /// beside it never wait on it. `None` on SQLite, or as `new` when PostgreSQL does not answer.
    /// `drop_database` removes it.
    pub async fn postgres_database() -> Option<Self> {
        let base = std::env::var("TEST_POSTGRES_URL")
            .ok()
            .filter(|url| !url.is_empty())?;
        let admin = Self::postgres_admin(&base).await?;
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("create the test database");
        admin.close().await;
        let mut url = url::Url::parse(&base).expect("TEST_POSTGRES_URL is a URL");
        url.set_path(&name);
        Some(Self {
            url: url.into(),
            _dir: None,
        })
    }

    /// Drops a database made by `postgres_database`, closing the connections still open on it.
    pub async fn drop_database(self) {
        let url = url::Url::parse(&self.url).expect("a URL");
        let name = url.path().trim_start_matches('/').to_owned();
        let base = std::env::var("TEST_POSTGRES_URL").expect("TEST_POSTGRES_URL");
        let admin = sqlx::PgPool::connect(&base).await.expect("connect");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&admin)
        .await
        .expect("drop the test database");
        admin.close().await;
    }

    pub fn is_postgres(&self) -> bool {
        self.url.starts_with("postgres")
    }

    /// A configuration on this database with `vars` set and every other variable unset.
    pub fn config(&self, vars: &[(&str, &str)]) -> Config {
        let mut map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        map.insert("DATABASE_URL".to_owned(), self.url.clone());
        // With a Stripe key the periodic reconciliation is on, and its first run comes within a
        // minute of start: its calls to the fake Stripe would land in the middle of a test that
        // counts or traces requests. A test of it sets the interval.
        map.entry("STRIPE_RECONCILE_INTERVAL_SECONDS".to_owned())
            .or_insert_with(|| "0".to_owned());
        Config::from_lookup(|name| map.get(name).cloned()).expect("valid test configuration")
    }

    pub async fn store(&self) -> Store {
        let store = Store::connect(&self.config(&[]).database_url)
            .await
            .expect("connect to the test database");
        store.migrate().await.expect("migrate the test database");
        store
    }
}

/// Skips the calling test (returning from it) when its database is not available.
#[macro_export]
macro_rules! test_db {
    () => {
        match $crate::support::TestDb::new().await {
            Some(db) => db,
            None => return,
        }
    };
}

/// As [`test_db!`], for a test of PostgreSQL alone: on SQLite it says it was skipped and returns
/// (the suite runs again on PostgreSQL, in CI too).
#[macro_export]
macro_rules! postgres_db {
    () => {{
        let db = $crate::test_db!();
        if !db.is_postgres() {
            $crate::support::skipped("PostgreSQL only (TEST_POSTGRES_URL)");
            return;
        }
        db
    }};
}

/// An answer's status and its JSON body (`null` when it has none).
pub async fn status_and_body(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    (
        status,
        response.json().await.unwrap_or(serde_json::Value::Null),
    )
}

/// An answer's `Retry-After`, in whole seconds, if it has one.
pub fn retry_after(response: &reqwest::Response) -> Option<u64> {
    response
        .headers()
        .get("retry-after")
        .map(|value| value.to_str().unwrap().parse().unwrap())
}

/// A client over plain TCP: HTTP/1.1, or HTTP/2 with prior knowledge (h2c).
pub fn plain_client(http2: bool) -> reqwest::Client {
    if http2 {
        reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap()
    } else {
        reqwest::Client::new()
    }
}

/// A server on 127.0.0.1:0 and a way to stop it.
pub struct TestServer {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<std::io::Result<()>>,
    /// The database the server uses, when the server owns it: a SQLite file lives in a
    /// temporary folder that is deleted with its `TestDb`.
    db: Option<TestDb>,
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `GET path` with no credentials.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.expect("GET")
    }

    /// Keeps `db` as long as the server: for a server on a database no test holds.
    pub fn owning(mut self, db: TestDb) -> Self {
        self.db = Some(db);
        self
    }

    /// Sends the shutdown signal; the server stops accepting and drains.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.begin_shutdown();
    }
}

/// Serves `router` (wrapped in the real middleware stack with `limits`) over TCP.
pub async fn serve(
    router: Router<AppState>,
    state: &AppState,
    limits: Limits,
    drain: Duration,
) -> TestServer {
    let app = middleware::apply_with(router, state, limits);
    serve_app(app, drain).await
}

pub async fn serve_app(app: Router, drain: Duration) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (stop, stopped) = oneshot::channel::<()>();
    let served = edgegate::server::serve(
        app,
        listener,
        None,
        async move {
            let _ = stopped.await;
        },
        drain,
    );
    let task = tokio::spawn(async move { served.await.map(|_| ()) });
    TestServer {
        addr,
        client: reqwest::Client::new(),
        stop: Some(stop),
        task,
        db: None,
    }
}

/// `edgegate::run` (what `serve` runs: the connection bounds and the lingering close of
/// `server::conn`, TLS when `vars` ask for it) on a fresh port of 127.0.0.1 with `vars`, on a
/// SQLite file of its own. The listener is bound before it returns, so a connection made at once
/// waits in its backlog; dropping it signals the stop.
pub struct Running {
    pub port: u16,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _db: TestDb,
}

impl Running {
    pub async fn start(vars: &[(&str, &str)]) -> Self {
        let db = TestDb::sqlite();
        let config = db.config(vars);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(edgegate::run(config, listener, async move {
            let _ = stopped.await;
        }));
        Self {
            port,
            stop: Some(stop),
            task: Some(task),
            _db: db,
        }
    }

    /// Signals the stop; the task it gives back ends when the drain is over.
    pub fn stop(&mut self) -> JoinHandle<anyhow::Result<()>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().expect("stopped once")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The whole application, started by `edgegate::spawn` as `edgegate::run` starts it (background
/// tasks included); dropping the server shuts it down as `run` does.
pub async fn spawn_app(db: &TestDb, vars: &[(&str, &str)]) -> (TestServer, AppState) {
    spawn_app_with_clock(db, vars, Clock::system()).await
}

/// As [`spawn_app`], with the service reading time from `clock`.
pub async fn spawn_app_with_clock(
    db: &TestDb,
    vars: &[(&str, &str)],
    clock: Clock,
) -> (TestServer, AppState) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let app = edgegate::spawn_with_clock(db.config(vars), listener, clock)
        .await
        .expect("start edgegate");
    let (addr, state) = (app.local_addr(), app.state().clone());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = stopped.await;
        app.shutdown().await.map_err(std::io::Error::other)
    });
    let server = TestServer {
        addr,
        client: reqwest::Client::new(),
        stop: Some(stop),
        task,
        db: None,
    };
    (server, state)
}

/// A stand-in for Supabase's JWKS host: serves whatever key set the test puts in it, with
/// Supabase's `Cache-Control`, and counts its requests. A test can make it slow to answer
/// ([`JwksHost::set_delay`]): it reads the set when the request arrives, as a fetch under way
/// holds what was published when it began. With an ETag ([`JwksHost::set_etag`]) it answers a
/// matching `If-None-Match` with 304, whatever the set holds, as a misbehaving cache may.
pub struct JwksHost {
    pub url: String,
    keys: std::sync::Arc<std::sync::Mutex<serde_json::Value>>,
    hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    delay: std::sync::Arc<std::sync::Mutex<Duration>>,
    etag: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    cache_control: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    _server: TestServer,
}

impl JwksHost {
    pub async fn start(keys: serde_json::Value) -> Self {
        Self::start_with_max_age(keys, 600).await
    }

    /// As Supabase's host, with `Cache-Control: public, max-age={max_age}`.
    pub async fn start_with_max_age(keys: serde_json::Value, max_age: u32) -> Self {
        use axum::routing::get;
        let cache_control = format!("public, max-age={max_age}");
        let shared = std::sync::Arc::new(std::sync::Mutex::new(keys));
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let delay = std::sync::Arc::new(std::sync::Mutex::new(Duration::ZERO));
        let etag = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
        let asked_cache_control = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
        let app = Router::new().route(
            "/auth/v1/.well-known/jwks.json",
            get({
                let (shared, hits, delay, etag, asked_cache_control) = (
                    shared.clone(),
                    hits.clone(),
                    delay.clone(),
                    etag.clone(),
                    asked_cache_control.clone(),
                );
                move |headers: axum::http::HeaderMap| async move {
                    use axum::response::IntoResponse;
                    hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    *asked_cache_control.lock().unwrap() = headers
                        .get("cache-control")
                        .map(|v| v.to_str().unwrap_or_default().to_owned());
                    let body = shared.lock().unwrap().clone();
                    let delay = *delay.lock().unwrap();
                    let etag = etag.lock().unwrap().clone();
                    tokio::time::sleep(delay).await;
                    let mut response = (
                        [("cache-control", cache_control)],
                        axum::Json(serde_json::json!({ "keys": body })),
                    )
                        .into_response();
                    if let Some(etag) = etag {
                        let asked = headers.get("if-none-match").map(|v| v.as_bytes());
                        if asked == Some(etag.as_bytes()) {
                            *response.status_mut() = axum::http::StatusCode::NOT_MODIFIED;
                            *response.body_mut() = axum::body::Body::empty();
                        }
                        response.headers_mut().insert("etag", etag.parse().unwrap());
                    }
                    response
                }
            }),
        );
        let server = serve_app(app, Duration::from_millis(100)).await;
        Self {
            url: server.url("/auth/v1/.well-known/jwks.json"),
            keys: shared,
            hits,
            delay,
            etag,
            cache_control: asked_cache_control,
            _server: server,
        }
    }

    /// The `Cache-Control` of the last request, if it had one.
    pub fn asked_cache_control(&self) -> Option<String> {
        self.cache_control.lock().unwrap().clone()
    }

    /// Answers carry `etag`, and a request whose `If-None-Match` matches it gets 304.
    pub fn set_etag(&self, etag: Option<&str>) {
        *self.etag.lock().unwrap() = etag.map(str::to_owned);
    }

    pub fn set_keys(&self, keys: serde_json::Value) {
        *self.keys.lock().unwrap() = keys;
    }

    /// Each request from now on is answered after `delay`.
    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap() = delay;
    }

    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A self-signed certificate for `localhost`, written as `cert.pem` and `key.pem` in `dir`.
pub fn self_signed_localhost(
    dir: &std::path::Path,
) -> (
    rcgen::CertifiedKey<rcgen::KeyPair>,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).unwrap();
    (certified, cert_path, key_path)
}

/// A TLS client's configuration that trusts `certified` (from [`self_signed_localhost`]) alone.
pub fn trusting(certified: &rcgen::CertifiedKey<rcgen::KeyPair>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Log lines of this thread, as JSON (each event's fields at its top level), kept in memory: those
/// of a current-thread test's tasks. Captures from [`JsonLogs::start`] until its guard drops, at
/// DEBUG and above.
#[derive(Clone, Default)]
pub struct JsonLogs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl JsonLogs {
    /// Captures until the guard is dropped.
    pub fn start(&self) -> tracing::subscriber::DefaultGuard {
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(self.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    /// The lines whose message starts with `start`.
    pub fn lines(&self, start: &str) -> Vec<serde_json::Value> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
            .filter(|line| {
                line["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(start))
            })
            .collect()
    }
}

impl std::io::Write for JsonLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for JsonLogs {
    type Writer = Self;
    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}
