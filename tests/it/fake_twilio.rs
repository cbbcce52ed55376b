//! A stand-in for Twilio's REST API: records each request (form fields, basic auth) and answers
//! with Twilio's real shapes, or as the test scripts it (errors, throttling, hanging).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use futures_util::StreamExt as _;
use serde_json::{Value, json};

use crate::support::{TestServer, serve_app};

/// How the fake answers one `Messages.json` request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// 201 with a new message resource.
    Created,
    /// 201 with a new message resource of this SID (a test that posts its status callbacks).
    CreatedAs(&'static str),
    /// An error in Twilio's shape.
    Error {
        http: u16,
        code: i64,
        message: &'static str,
    },
    /// 429 with error 20429 and `Retry-After` of this many seconds, as Twilio throttles.
    ThrottledFor(u64),
    /// 429 with error 20429 and `Retry-After` as an HTTP date this many seconds ahead, the
    /// header's other form (RFC 9110 §10.2.3).
    ThrottledUntil(u64),
    /// Reads the request, then never answers: the caller times out after sending.
    Hang,
    /// 307 to this URL (Twilio never redirects; a proxy or a hijacked base might).
    RedirectTo(String),
    /// 201 with a message resource padded to this many bytes, streamed in chunks without a
    /// `Content-Length` and paced, so a client that stops reading is seen to stop
    /// (`FakeTwilio::oversized_answer_finished`).
    Oversized(usize),
}

impl Reply {
    pub fn throttled() -> Self {
        Reply::Error {
            http: 429,
            code: 20429,
            message: "Too Many Requests",
        }
    }
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub form: Vec<(String, String)>,
    pub basic_auth: Option<(String, String)>,
}

impl Recorded {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// A message's `status`, `error_code` and `error_message`, as Fetch Message answers them.
type FetchedStatus = (String, Option<i64>, Option<String>);

struct Shared {
    account_sid: String,
    auth_token: String,
    requests: Mutex<Vec<Recorded>>,
    script: Mutex<VecDeque<Reply>>,
    latency: Mutex<Duration>,
    /// Each message's status as a Fetch Message answers it, by SID (set by a create, or by
    /// the test), its error code and its error message.
    messages: Mutex<HashMap<String, FetchedStatus>>,
    /// Fetch Message answers this HTTP status (Twilio's error shape) for these SIDs.
    fetch_errors: Mutex<HashMap<String, u16>>,
    /// The SIDs fetched, in order.
    fetches: Mutex<Vec<String>>,
    /// Whether a `Reply::Oversized` answer was written to its end.
    oversized_finished: Arc<std::sync::atomic::AtomicBool>,
}

pub struct FakeTwilio {
    pub base: String,
    shared: Arc<Shared>,
    _server: TestServer,
}

impl FakeTwilio {
    /// A fake account `account_sid` whose API takes `auth_token`.
    pub async fn start(account_sid: &str, auth_token: &str) -> Self {
        let shared = Arc::new(Shared {
            account_sid: account_sid.to_owned(),
            auth_token: auth_token.to_owned(),
            requests: Mutex::new(Vec::new()),
            script: Mutex::new(VecDeque::new()),
            latency: Mutex::new(Duration::ZERO),
            messages: Mutex::new(HashMap::new()),
            fetch_errors: Mutex::new(HashMap::new()),
            fetches: Mutex::new(Vec::new()),
            oversized_finished: Arc::default(),
        });
        let app = Router::new()
            .route("/2010-04-01/Accounts/{account}/Messages.json", post(create))
            .route("/2010-04-01/Accounts/{account}", get(account))
            .route(
                "/2010-04-01/Accounts/{account}/Messages/{file}",
                get(fetch_message),
            )
            .with_state(shared.clone());
        let server = serve_app(app, Duration::from_millis(100)).await;
        Self {
            base: server.url(""),
            shared,
            _server: server,
        }
    }

    /// The next answers, in order; after them every request gets `Reply::Created`.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.shared.script.lock().unwrap().extend(replies);
    }

    /// A pause before each answer, to widen the window in which concurrent sends overlap.
    pub fn set_latency(&self, latency: Duration) {
        *self.shared.latency.lock().unwrap() = latency;
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// What Fetch Message answers for `sid` from now on (the message need not have been created
    /// through the fake), with a null `error_message`, as Twilio often leaves it.
    pub fn set_status(&self, sid: &str, status: &str, error_code: Option<i64>) {
        self.set_status_described(sid, status, error_code, None);
    }

    /// As `set_status`, with Twilio's `error_message` too.
    pub fn set_status_described(
        &self,
        sid: &str,
        status: &str,
        error_code: Option<i64>,
        error_message: Option<&str>,
    ) {
        self.shared.messages.lock().unwrap().insert(
            sid.to_owned(),
            (
                status.to_owned(),
                error_code,
                error_message.map(str::to_owned),
            ),
        );
    }

    /// Fetch Message answers `http` (500, 404, …) for `sid`.
    pub fn fail_fetch(&self, sid: &str, http: u16) {
        self.shared
            .fetch_errors
            .lock()
            .unwrap()
            .insert(sid.to_owned(), http);
    }

    /// The SIDs Fetch Message was asked for, in order.
    pub fn fetches(&self) -> Vec<String> {
        self.shared.fetches.lock().unwrap().clone()
    }

    /// Whether a `Reply::Oversized` answer was written to its end (the client read it all).
    pub fn oversized_answer_finished(&self) -> bool {
        self.shared
            .oversized_finished
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn basic_auth(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

fn error(http: u16, code: i64, message: &str) -> Response {
    let status = StatusCode::from_u16(http).unwrap();
    let body = json!({
        "code": code,
        "message": message,
        "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
        "status": http,
    });
    (status, axum::Json(body)).into_response()
}

fn authenticated(shared: &Shared, account: &str, headers: &HeaderMap) -> bool {
    account == shared.account_sid
        && basic_auth(headers) == Some((shared.account_sid.clone(), shared.auth_token.clone()))
}

async fn create(
    State(shared): State<Arc<Shared>>,
    Path(account): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let recorded = Recorded {
        form,
        basic_auth: basic_auth(&headers),
    };
    shared.requests.lock().unwrap().push(recorded.clone());
    if !authenticated(&shared, &account, &headers) {
        return error(401, 20003, "Authenticate");
    }
    let latency = *shared.latency.lock().unwrap();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let reply = shared
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(Reply::Created);
    let created = |sid: &str| {
        let status = if recorded.field("MessagingServiceSid").is_some() {
            "accepted"
        } else {
            "queued"
        };
        shared
            .messages
            .lock()
            .unwrap()
            .insert(sid.to_owned(), (status.to_owned(), None, None));
    };
    match reply {
        Reply::Created => {
            let sid = format!("SM{}", uuid::Uuid::new_v4().simple());
            created(&sid);
            (
                StatusCode::CREATED,
                axum::Json(message(&account, &recorded, &sid)),
            )
                .into_response()
        }
        Reply::CreatedAs(sid) => {
            created(sid);
            (
                StatusCode::CREATED,
                axum::Json(message(&account, &recorded, sid)),
            )
                .into_response()
        }
        Reply::Error {
            http,
            code,
            message,
        } => error(http, code, message),
        Reply::ThrottledFor(seconds) => {
            let mut response = error(429, 20429, "Too Many Requests");
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
            response
        }
        Reply::ThrottledUntil(seconds) => {
            let mut response = error(429, 20429, "Too Many Requests");
            let at = std::time::SystemTime::now() + std::time::Duration::from_secs(seconds);
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                httpdate::fmt_http_date(at).parse().unwrap(),
            );
            response
        }
        Reply::Hang => std::future::pending().await,
        Reply::Oversized(size) => {
            let sid = format!("SM{}", uuid::Uuid::new_v4().simple());
            let head = format!(r#"{{"sid":"{sid}","status":"queued","padding":""#).into_bytes();
            let padding = size.saturating_sub(head.len() + 2);
            oversized(head, padding, shared.oversized_finished.clone())
        }
        Reply::RedirectTo(location) => (
            StatusCode::TEMPORARY_REDIRECT,
            [(axum::http::header::LOCATION, location)],
        )
            .into_response(),
    }
}

/// A 201 whose body is `head`, `padding` spaces and `"}`: valid JSON however large, sent in
/// 64 KiB chunks a millisecond apart; `finished` is set once the last one was taken.
fn oversized(
    head: Vec<u8>,
    padding: usize,
    finished: Arc<std::sync::atomic::AtomicBool>,
) -> Response {
    const CHUNK: usize = 64 * 1024;
    let chunks = padding.div_ceil(CHUNK);
    let padding = (0..chunks).map(move |i| Bytes::from(vec![b' '; CHUNK.min(padding - i * CHUNK)]));
    let parts = std::iter::once(Bytes::from(head))
        .chain(padding)
        .chain(std::iter::once(Bytes::from_static(b"\"}")));
    let body = futures_util::stream::iter(parts)
        .then(|chunk| async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok::<_, std::convert::Infallible>(chunk)
        })
        .chain(futures_util::stream::once(async move {
            finished.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(Bytes::new())
        }));
    (StatusCode::CREATED, axum::body::Body::from_stream(body)).into_response()
}

/// A message resource as Twilio's API returns it on creation.
fn message(account: &str, request: &Recorded, sid: &str) -> Value {
    let service = request.field("MessagingServiceSid");
    let now = "Thu, 26 Nov 2026 10:00:00 +0000";
    json!({
        "account_sid": account,
        "api_version": "2010-04-01",
        "body": request.field("Body"),
        "date_created": now,
        "date_sent": null,
        "date_updated": now,
        "direction": "outbound-api",
        "error_code": null,
        "error_message": null,
        "from": request.field("From"),
        "messaging_service_sid": service,
        "num_media": "0",
        // A Messaging Service picks the sender later, so it reports 0 segments at first.
        "num_segments": if service.is_some() { "0" } else { "1" },
        "price": null,
        "price_unit": "USD",
        "sid": sid,
        // Twilio answers `accepted` for a Messaging Service, `queued` for a From number.
        "status": if service.is_some() { "accepted" } else { "queued" },
        "subresource_uris": {
            "media": format!("/2010-04-01/Accounts/{account}/Messages/{sid}/Media.json"),
        },
        "to": request.field("To"),
        "uri": format!("/2010-04-01/Accounts/{account}/Messages/{sid}.json"),
    })
}

/// Twilio's Fetch Message: `GET /2010-04-01/Accounts/{AccountSid}/Messages/{Sid}.json`, the
/// message resource with its current `status`, `error_code` (a number, or null) and
/// `error_message` (a string, or null).
async fn fetch_message(
    State(shared): State<Arc<Shared>>,
    Path((account, file)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if !authenticated(&shared, &account, &headers) {
        return error(401, 20003, "Authenticate");
    }
    let Some(sid) = file.strip_suffix(".json") else {
        return error(404, 20404, "The requested resource was not found");
    };
    shared.fetches.lock().unwrap().push(sid.to_owned());
    if let Some(http) = shared.fetch_errors.lock().unwrap().get(sid).copied() {
        return error(http, 20500, "Internal Server Error");
    }
    let Some((status, error_code, error_message)) =
        shared.messages.lock().unwrap().get(sid).cloned()
    else {
        let message = format!(
            "The requested resource /2010-04-01/Accounts/{account}/Messages/{sid}.json was not found"
        );
        return error(404, 20404, &message);
    };
    let now = "Thu, 26 Nov 2026 10:00:00 +0000";
    axum::Json(json!({
        "account_sid": account,
        "api_version": "2010-04-01",
        "body": "Your code is 123456",
        "date_created": now,
        "date_sent": now,
        "date_updated": now,
        "direction": "outbound-api",
        "error_code": error_code,
        "error_message": error_message,
        "from": "+15005550006",
        "messaging_service_sid": null,
        "num_media": "0",
        "num_segments": "1",
        "price": "-0.00790",
        "price_unit": "USD",
        "sid": sid,
        "status": status,
        "subresource_uris": {
            "media": format!("/2010-04-01/Accounts/{account}/Messages/{sid}/Media.json"),
            "feedback": format!("/2010-04-01/Accounts/{account}/Messages/{sid}/Feedback.json"),
        },
        "to": "+12025550123",
        "uri": format!("/2010-04-01/Accounts/{account}/Messages/{sid}.json"),
    }))
    .into_response()
}

async fn account(
    State(shared): State<Arc<Shared>>,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Response {
    let account = file.strip_suffix(".json").unwrap_or_default();
    if !authenticated(&shared, account, &headers) {
        return error(401, 20003, "Authenticate");
    }
    axum::Json(json!({
        "sid": account,
        "friendly_name": "edgegate test account",
        "status": "active",
        "type": "Full",
        "date_created": "Thu, 26 Nov 2026 10:00:00 +0000",
        "uri": format!("/2010-04-01/Accounts/{account}.json"),
    }))
    .into_response()
}

/// A Twilio that reads each request whole, then closes the connection without a word: the
/// request was delivered, its outcome never comes back.
pub struct ClosingTwilio {
    pub base: String,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl ClosingTwilio {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                read_request(&mut socket).await;
                // Dropped here: closed after the whole request was read.
            }
        });
        Self {
            base,
            connections,
            task,
        }
    }

    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for ClosingTwilio {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one HTTP/1.1 request: the head, then `Content-Length` bytes of body.
async fn read_request(socket: &mut tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt as _;
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .and_then(|value| value.trim().parse().ok())
                .unwrap_or(0);
            if received.len() >= end + 4 + length {
                return;
            }
        }
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(read) => received.extend_from_slice(&chunk[..read]),
        }
    }
}
