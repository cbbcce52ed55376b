//! Logs as an operator gets them from the real process: JSON lines a collector can parse, with
//! the request's id, method, route, status, latency and credential (never the credential
//! itself), and no colour codes when the output is a file.

use crate::support::now_ms;
use edgegate::auth::Alg;
use edgegate::auth::mint::{SigningKey, legacy_token, user_claims};
use serde_json::Value;

use crate::process::{free_port, signal, spawn_server, wait_exit, wait_healthy};

const SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters-long";
const PUBLISHABLE_KEY: &str = "sb_publishable_logs0123456789abcdefgh";

/// Serves with `vars`, runs `requests` against it, stops it with SIGTERM and returns its log.
async fn log_of<F, Fut>(vars: &[(&str, &str)], requests: F) -> String
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let port_text = port.to_string();
    let mut all = vec![("PORT", port_text.as_str())];
    all.extend_from_slice(vars);
    let mut server = spawn_server(dir.path(), "server.log", &all);
    assert!(wait_healthy(port).await, "edgegate never answered /healthz");
    requests(format!("http://127.0.0.1:{port}")).await;
    signal(&server, "TERM");
    assert_eq!(wait_exit(&mut server).await.code(), Some(0));
    std::fs::read_to_string(dir.path().join("server.log")).unwrap()
}

/// A field of a JSON log line: the event's own, else its request span's.
fn field<'a>(line: &'a Value, name: &str) -> Option<&'a Value> {
    line.get(name).or_else(|| line.get("span")?.get(name))
}

/// The one line that closes the request with this id.
fn response_line<'a>(lines: &'a [Value], request_id: &str) -> &'a Value {
    let found: Vec<&Value> = lines
        .iter()
        .filter(|line| field(line, "request_id").and_then(Value::as_str) == Some(request_id))
        .filter(|line| field(line, "status").is_some())
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one response line for {request_id}: {found:?}"
    );
    found[0]
}

#[tokio::test]
async fn json_logs_carry_the_request_and_its_credential_but_never_the_secret() {
    let key = SigningKey::generate(Alg::ES256).unwrap();
    let stranger = SigningKey::generate(Alg::ES256).unwrap();
    let jwks = key.public_jwks().to_string();
    let publishable = format!(r#"{{"web":"{PUBLISHABLE_KEY}"}}"#);
    let now = now_ms() / 1000;
    let claims = user_claims("supabase", "authenticated", "user-1", now, 3600);
    let user = key.token(&claims).unwrap();
    let unknown = stranger.token(&claims).unwrap();
    let legacy = legacy_token(
        SECRET.as_bytes(),
        &user_claims("supabase", "authenticated", "user-2", now, 3600),
        None,
    );
    let vars = [
        ("LOG_FORMAT", "json"),
        ("RUST_LOG", "info"),
        ("SUPABASE_JWKS", jwks.as_str()),
        ("SUPABASE_JWT_SECRET", SECRET),
        ("SUPABASE_PUBLISHABLE_KEYS", publishable.as_str()),
    ];
    let calls = [
        ("log-es256", Some(format!("Bearer {user}")), None),
        ("log-legacy", Some(format!("Bearer {legacy}")), None),
        ("log-publishable", None, Some(PUBLISHABLE_KEY)),
        ("log-refused", Some(format!("Bearer {unknown}")), None),
    ];
    let log = log_of(&vars, |base| async move {
        let client = reqwest::Client::new();
        for (id, authorization, apikey) in calls {
            let mut request = client
                .get(format!("{base}/functions/v1/jwt-test"))
                .header("x-request-id", id);
            if let Some(value) = authorization {
                request = request.header("authorization", value);
            }
            if let Some(value) = apikey {
                request = request.header("apikey", value);
            }
            request.send().await.unwrap();
        }
    })
    .await;

    let lines: Vec<Value> = log
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let expected = [
        ("log-es256", 200, "signing_key", Some(key.kid())),
        ("log-legacy", 200, "legacy_secret", Some("legacy")),
        ("log-publishable", 200, "api_key", Some("publishable:web")),
        ("log-refused", 401, "signing_key", None),
    ];
    for (id, status, source, kid) in expected {
        let line = response_line(&lines, id);
        assert_eq!(field(line, "http.request.method").unwrap(), "GET", "{line}");
        assert_eq!(
            field(line, "http.route").unwrap(),
            "/functions/v1/jwt-test",
            "{line}"
        );
        assert_eq!(field(line, "status").unwrap(), status, "{line}");
        assert!(field(line, "latency_ms").unwrap().is_number(), "{line}");
        assert_eq!(
            field(line, "edgegate.credential.source").unwrap(),
            source,
            "{line}"
        );
        assert_eq!(
            field(line, "edgegate.credential.kid").and_then(Value::as_str),
            kid,
            "{line}"
        );
    }
    let signature = user.rsplit('.').next().unwrap();
    for secret in [
        user.as_str(),
        signature,
        legacy.as_str(),
        SECRET,
        PUBLISHABLE_KEY,
    ] {
        assert!(
            !log.contains(secret),
            "a credential reached the log:\n{log}"
        );
    }
}

/// A JWK dropped is logged with its kid as the kid is, and with no kid field when it has none.
#[tokio::test]
async fn a_dropped_jwk_is_logged_with_its_kid_as_text() {
    let key = SigningKey::generate_with_kid(Alg::ES256, "py-es").unwrap();
    let mut p384 = key.public_jwk();
    p384["kid"] = "py-p384".into();
    p384["crv"] = "P-384".into();
    p384.as_object_mut().unwrap().remove("alg");
    let mut no_kid = key.public_jwk();
    no_kid.as_object_mut().unwrap().remove("kid");
    let jwks = serde_json::json!([key.public_jwk(), p384, no_kid]).to_string();
    let vars = [
        ("LOG_FORMAT", "json"),
        ("RUST_LOG", "info"),
        ("SUPABASE_JWKS", jwks.as_str()),
    ];
    let log = log_of(&vars, |_| async {}).await;
    let dropped: Vec<(Option<Value>, Value)> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| field(line, "message").and_then(Value::as_str) == Some("JWK dropped"))
        .map(|line| (field(&line, "kid").cloned(), line["reason"].clone()))
        .collect();
    assert_eq!(
        dropped,
        [
            (Some("py-p384".into()), "unsupported curve".into()),
            (None, "asymmetric key without kid".into())
        ],
        "{log}"
    );
}

/// Sends `token` to `jwt-test` until the JWKS host has been asked once more than `before` (the
/// first tries may fall in the last fetch's cool-down, which refetches nothing); the status of
/// the answer that followed the refetch.
async fn refetched_for(
    base: &str,
    token: &str,
    host: &crate::support::JwksHost,
    before: usize,
) -> u16 {
    let client = reqwest::Client::new();
    for _ in 0..100 {
        let status = client
            .get(format!("{base}/functions/v1/jwt-test"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if host.hits() > before {
            return status;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("no refetch of the JWKS within 10 s");
}

/// `JWKS fetched` is an INFO line at start and whenever the set fetched differs from the one
/// held, naming the kids added and removed; a refetch for an unknown kid that brings the same
/// set again (a token signed elsewhere, a scanner) is at DEBUG. At INFO, up to 120 such lines an
/// hour with the defaults hid the real key changes.
#[tokio::test]
async fn jwks_fetched_is_at_info_only_when_the_set_changes() {
    let old = SigningKey::generate(Alg::ES256).unwrap();
    let new = SigningKey::generate(Alg::ES256).unwrap();
    let stranger = SigningKey::generate(Alg::ES256).unwrap();
    let now = now_ms() / 1000;
    let claims = user_claims("supabase", "authenticated", "user-1", now, 3600);
    let (stranger_token, new_token) = (
        stranger.token(&claims).unwrap(),
        new.token(&claims).unwrap(),
    );
    let host = crate::support::JwksHost::start(serde_json::json!([old.public_jwk()])).await;
    let vars = [
        ("LOG_FORMAT", "json"),
        ("RUST_LOG", "info,edgegate::auth::jwks=debug"),
        ("SUPABASE_JWKS_URL", host.url.as_str()),
        ("JWKS_MIN_REFRESH_SECONDS", "1"),
    ];
    let (host, new_jwk) = (&host, new.public_jwk());
    let log = log_of(&vars, |base| async move {
        for _ in 0..200 {
            if host.hits() > 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(host.hits(), 1, "the start-up fetch");
        // An unknown kid: the set is fetched again, and is the same.
        assert_eq!(refetched_for(&base, &stranger_token, host, 1).await, 401);
        // The key rotated: the next unknown kid brings a changed set.
        host.set_keys(serde_json::json!([new_jwk]));
        let before = host.hits();
        assert_eq!(refetched_for(&base, &new_token, host, before).await, 200);
    })
    .await;

    let fetched: Vec<Value> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| field(line, "message").and_then(Value::as_str) == Some("JWKS fetched"))
        .collect();
    let levels: Vec<&str> = fetched
        .iter()
        .map(|line| field(line, "level").and_then(Value::as_str).unwrap())
        .collect();
    assert_eq!(levels, ["INFO", "DEBUG", "INFO"], "{log}");
    let kids =
        |line: &Value, name: &str| field(line, name).and_then(Value::as_str).map(str::to_owned);
    assert_eq!(
        kids(&fetched[0], "added"),
        Some(old.kid().to_owned()),
        "{}",
        fetched[0]
    );
    assert_eq!(kids(&fetched[0], "removed"), None, "{}", fetched[0]);
    assert_eq!(kids(&fetched[1], "added"), None, "{}", fetched[1]);
    assert_eq!(kids(&fetched[1], "removed"), None, "{}", fetched[1]);
    assert_eq!(
        kids(&fetched[2], "added"),
        Some(new.kid().to_owned()),
        "{}",
        fetched[2]
    );
    assert_eq!(
        kids(&fetched[2], "removed"),
        Some(old.kid().to_owned()),
        "{}",
        fetched[2]
    );
    for line in &fetched {
        assert_eq!(
            field(line, "keys").and_then(Value::as_u64),
            Some(1),
            "{line}"
        );
    }
}

/// A method outside HTTP's standard set is logged as OpenTelemetry's `_OTHER`: it went into
/// every line of its request as it came, up to the 64 KiB head limit.
#[tokio::test]
async fn an_unknown_method_is_logged_as_other() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let method = "M".repeat(4000);
    let vars = [("LOG_FORMAT", "json"), ("RUST_LOG", "info")];
    let log = log_of(&vars, |base| async move {
        let address = base.trim_start_matches("http://");
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let head = format!(
            "{method} /healthz HTTP/1.1\r\nHost: edgegate\r\nx-request-id: log-method\r\n\
             connection: close\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let read = stream.read_to_end(&mut answer);
        tokio::time::timeout(std::time::Duration::from_secs(10), read)
            .await
            .expect("an answer within 10 s")
            .unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 405"), "{answer:?}");
    })
    .await;
    let lines: Vec<Value> = log
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    for line in &lines {
        if let Some(logged) = field(line, "http.request.method").and_then(Value::as_str) {
            assert!(logged.len() <= 16, "a method of {} bytes", logged.len());
        }
    }
    let line = response_line(&lines, "log-method");
    assert_eq!(field(line, "http.request.method").unwrap(), "_OTHER");
}

#[tokio::test]
async fn pretty_logs_to_a_file_carry_no_colour_codes() {
    let log = log_of(&[("RUST_LOG", "info")], |base| async move {
        reqwest::get(format!("{base}/functions/v1/jwt-test"))
            .await
            .unwrap();
    })
    .await;
    assert!(
        log.contains("/functions/v1/jwt-test"),
        "no request line:\n{log}"
    );
    assert!(!log.contains("\x1b["), "ANSI escapes in a file:\n{log:?}");
}

/// Request lines are written in batches (src/telemetry/stderr.rs): one still reaches the log
/// while the server runs, and the last lines, logged just before the process exits, are not
/// lost with the batch.
#[tokio::test]
async fn batched_lines_reach_the_log_while_serving_and_at_exit() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let port_text = port.to_string();
    let vars = [
        ("PORT", port_text.as_str()),
        ("LOG_FORMAT", "json"),
        ("RUST_LOG", "info"),
    ];
    let mut server = spawn_server(dir.path(), "server.log", &vars);
    assert!(wait_healthy(port).await, "edgegate never answered /healthz");
    let response = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .header("x-request-id", "log-batched")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let read = || std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    let started = std::time::Instant::now();
    while !read().contains("log-batched") {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "the request's line never reached the log:\n{}",
            read()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    signal(&server, "TERM");
    assert_eq!(wait_exit(&mut server).await.code(), Some(0));
    let log = read();
    let last: Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(last["message"], "edgegate stopped", "{log}");
}

/// The number on the `/metrics` line that starts with `series `, if any.
fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// stderr connected to a pipe nobody reads (a stuck log shipper, Docker's blocking log mode):
/// once the pipe and the log buffer are full, lines are dropped and counted, requests keep being
/// answered, and the drop is reported on stderr when it drains.
#[tokio::test]
async fn a_stalled_stderr_reader_drops_log_lines_instead_of_blocking_requests() {
    use std::io::Read as _;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let port_text = port.to_string();
    let mut server = crate::process::Server::from_child(
        crate::process::edgegate(
            dir.path(),
            &[
                ("PORT", port_text.as_str()),
                ("LOG_FORMAT", "json"),
                ("RUST_LOG", "info"),
            ],
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start edgegate"),
    );
    // stderr is piped and not read until the end.
    assert!(wait_healthy(port).await, "edgegate never answered /healthz");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    // A pipe holds 64 KiB, the buffer 256 KiB; a response line is about 200 bytes. Each request
    // carries a long id, which its lines repeat, to fill both sooner.
    let id = "x".repeat(128);
    let started = Instant::now();
    for i in 0..4000 {
        let answer = client
            .get(format!("{base}/healthz"))
            .header("x-request-id", &id)
            .send()
            .await
            .unwrap_or_else(|err| {
                panic!("request {i} not answered while stderr is not read: {err}")
            });
        assert_eq!(answer.status(), 200);
    }
    // Still answering (within the client's 5 s) with both the pipe and the buffer full.
    let answer = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let dropped = metric_value(&metrics, "edgegate_log_lines_dropped_total")
        .unwrap_or_else(|| panic!("no edgegate_log_lines_dropped_total in:\n{metrics}"));
    assert!(
        dropped > 0.0,
        "no line dropped after {:?}",
        started.elapsed()
    );

    // Read the pipe: it drains, and the drop is said once it has.
    let mut stderr = server.stderr.take().unwrap();
    let (found, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = Vec::new();
        let mut chunk = [0u8; 64 * 1024];
        while let Ok(n) = stderr.read(&mut chunk) {
            if n == 0 {
                break;
            }
            text.extend_from_slice(&chunk[..n]);
            // The notice's whole line: a read can end inside it.
            let read = String::from_utf8_lossy(&text);
            if let Some(at) = read.find("log lines dropped")
                && read[at..].contains('\n')
            {
                let _ = found.send(read.into_owned());
                return;
            }
        }
        let _ = found.send(String::from_utf8_lossy(&text).into_owned());
    });
    // Something more to log, so the writer has a line to put after the notice.
    let _ = client.get(format!("{base}/healthz")).send().await;
    let text = tokio::task::spawn_blocking(move || lines.recv_timeout(Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("stderr drained within 10 s");
    let notice = text
        .lines()
        .find(|line| line.contains("log lines dropped"))
        .unwrap_or_else(|| panic!("no drop notice in the last of stderr:\n{}", tail(&text)));
    let line: Value = serde_json::from_str(notice).expect("the notice is a JSON line");
    assert_eq!(line["level"], "WARN", "{notice}");
    let said: u64 = line["message"]
        .as_str()
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // Every line lost up to the metric's reading is in the count (the notice itself is never
    // dropped: were it, the next notice would say 1).
    assert!(
        said as f64 >= dropped,
        "{said} said, {dropped} counted: {notice}"
    );
}

fn tail(text: &str) -> &str {
    &text[text.len().saturating_sub(2000)..]
}

/// At `RUST_LOG=info` an operator sees what became of each text without the database: a send
/// Twilio took is logged with its id, SID and status, a status callback applied with the id,
/// the SID, the status before and after and Twilio's error code; neither line carries the
/// number or the body. `/metrics` counts them (`edgegate_sms_sent_total`,
/// `edgegate_sms_status_total`).
#[tokio::test]
async fn sms_sends_and_status_changes_are_logged_at_info_and_counted_without_the_number() {
    use crate::fake_twilio::FakeTwilio;
    const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";
    const TOKEN: &str = "f1e2d3c4b5a6978812345678abcdef90";
    const SECRET_KEY: &str = "sb_secret_logs0123456789abcdefghijk";
    const PUBLIC_URL: &str = "https://edgegate.example.com";
    const TO: &str = "+12025550199";
    const BODY: &str = "your code is 424242";
    let twilio = FakeTwilio::start(ACCOUNT, TOKEN).await;
    let secret_keys = format!(r#"{{"backend":"{SECRET_KEY}"}}"#);
    let vars = [
        ("LOG_FORMAT", "json"),
        ("RUST_LOG", "info"),
        ("SUPABASE_SECRET_KEYS", secret_keys.as_str()),
        ("TWILIO_ACCOUNT_SID", ACCOUNT),
        ("TWILIO_AUTH_TOKEN", TOKEN),
        ("TWILIO_API_BASE", twilio.base.as_str()),
        ("TWILIO_FROM_NUMBER", "+15005550006"),
        ("PUBLIC_URL", PUBLIC_URL),
    ];
    let (receipt, metrics) = (
        std::sync::Mutex::new(Value::Null),
        std::sync::Mutex::new(String::new()),
    );
    let (receipt_out, metrics_out) = (&receipt, &metrics);
    let log = log_of(&vars, |base| async move {
        let client = reqwest::Client::new();
        let sent: Value = client
            .post(format!("{base}/functions/v1/send-sms"))
            .header("apikey", SECRET_KEY)
            .json(&serde_json::json!({"to": TO, "body": BODY}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let (id, sid) = (
            sent["id"].as_str().expect("an id"),
            sent["sid"].as_str().expect("a sid"),
        );
        let params = [
            ("AccountSid", ACCOUNT),
            ("ErrorCode", "30007"),
            ("From", "+15005550006"),
            ("MessageSid", sid),
            ("MessageStatus", "undelivered"),
            ("To", TO),
        ];
        let url = format!("{PUBLIC_URL}/functions/v1/twilio-status?id={id}");
        let owned: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let signature = edgegate::twilio::signature::compute(TOKEN.as_bytes(), &url, &owned);
        let answered = client
            .post(format!("{base}/functions/v1/twilio-status?id={id}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-twilio-signature", signature)
            .body(
                url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(params)
                    .finish(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(answered.status(), 204);
        *metrics_out.lock().unwrap() = reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        *receipt_out.lock().unwrap() = sent;
    })
    .await;
    let receipt = receipt.into_inner().unwrap();
    let (id, sid) = (
        receipt["id"].as_str().unwrap(),
        receipt["sid"].as_str().unwrap(),
    );

    let lines: Vec<Value> = log
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let line_of = |message: &str| {
        lines
            .iter()
            .find(|line| line["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} line in:\n{log}"))
    };
    let sent = line_of("SMS sent");
    assert_eq!(field(sent, "level").unwrap(), "INFO", "{sent}");
    assert_eq!(field(sent, "id").unwrap(), id, "{sent}");
    assert_eq!(field(sent, "sid").unwrap(), sid, "{sent}");
    assert_eq!(field(sent, "status").unwrap(), "queued", "{sent}");
    let updated = line_of("SMS status updated");
    assert_eq!(field(updated, "level").unwrap(), "INFO", "{updated}");
    assert_eq!(field(updated, "id").unwrap(), id, "{updated}");
    assert_eq!(field(updated, "sid").unwrap(), sid, "{updated}");
    assert_eq!(
        field(updated, "previous_status").unwrap(),
        "queued",
        "{updated}"
    );
    assert_eq!(
        field(updated, "status").unwrap(),
        "undelivered",
        "{updated}"
    );
    assert_eq!(field(updated, "error_code").unwrap(), 30007, "{updated}");
    assert_eq!(field(updated, "source").unwrap(), "callback", "{updated}");
    for secret in [TO, "12025550199", BODY, TOKEN] {
        assert!(!log.contains(secret), "{secret} reached the log:\n{log}");
    }

    let metrics = metrics.into_inner().unwrap();
    for (series, value) in [
        (r#"edgegate_sms_sent_total{outcome="accepted"}"#, 1.0),
        (r#"edgegate_sms_sent_total{outcome="refused"}"#, 0.0),
        (
            r#"edgegate_sms_status_total{status="undelivered",source="callback"}"#,
            1.0,
        ),
        (
            r#"edgegate_sms_status_total{status="delivered",source="recovery"}"#,
            0.0,
        ),
    ] {
        assert_eq!(
            metric_value(&metrics, series),
            Some(value),
            "{series} in:\n{metrics}"
        );
    }
    assert!(
        !metrics.contains(sid) && !metrics.contains("30007"),
        "{metrics}"
    );
}
