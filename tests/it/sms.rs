//! `send-sms` and `twilio-status` through HTTP against a fake Twilio: the request Twilio gets,
//! validation, idempotency and the send limits across two instances on one database, retries
//! that can never text twice, and signed status callbacks (signatures from Twilio's own library).

use std::time::Duration;

use edgegate::AppState;
use edgegate::twilio::signature;
use futures_util::StreamExt as _;
use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::fake_twilio::{ClosingTwilio, FakeTwilio, Reply};
use crate::support::{TestDb, TestServer, serve_app};
use crate::test_db;

const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";
const TOKEN: &str = "f1e2d3c4b5a6978812345678abcdef90";
const FROM: &str = "+15005550006";
const SERVICE: &str = "MG0123456789abcdef0123456789abcdef";
const PUBLIC_URL: &str = "https://edgegate.example.com";
const CALLBACK_URL: &str = "https://edgegate.example.com/functions/v1/twilio-status";
/// How long one call to Twilio may take in these tests (`TwilioConfig::request_timeout`).
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
const SECRET_KEY: &str = "sb_secret_0123456789abcdefghijklmn";
const PUBLISHABLE_KEY: &str = "sb_publishable_0123456789abcdefghij";

/// One edgegate instance with Twilio pointed at `fake` (or unconfigured when `fake` is None).
struct Instance {
    server: TestServer,
    state: AppState,
}

async fn instance(db: &TestDb, fake: Option<&FakeTwilio>, extra: &[(&str, &str)]) -> Instance {
    instance_with(db, fake, extra, |_| {}).await
}

/// As `instance`, with `adjust` applied to the configuration after the test's own settings.
async fn instance_with(
    db: &TestDb,
    fake: Option<&FakeTwilio>,
    extra: &[(&str, &str)],
    adjust: impl FnOnce(&mut edgegate::Config),
) -> Instance {
    instance_reading(db, fake, extra, adjust, edgegate::clock::Clock::system()).await
}

/// As `instance_with`, the service reading time from `clock`.
async fn instance_reading(
    db: &TestDb,
    fake: Option<&FakeTwilio>,
    extra: &[(&str, &str)],
    adjust: impl FnOnce(&mut edgegate::Config),
    clock: edgegate::clock::Clock,
) -> Instance {
    let secret_keys = format!(r#"{{"backend":"{SECRET_KEY}"}}"#);
    let publishable_keys = format!(r#"{{"web":"{PUBLISHABLE_KEY}"}}"#);
    let mut vars = vec![
        ("SUPABASE_SECRET_KEYS", secret_keys.as_str()),
        ("SUPABASE_PUBLISHABLE_KEYS", publishable_keys.as_str()),
    ];
    if let Some(fake) = fake {
        vars.extend([
            ("TWILIO_ACCOUNT_SID", ACCOUNT),
            ("TWILIO_AUTH_TOKEN", TOKEN),
            ("TWILIO_API_BASE", fake.base.as_str()),
        ]);
    }
    let sender_given = extra
        .iter()
        .any(|(name, _)| name.starts_with("TWILIO_FROM") || name.starts_with("TWILIO_MESSAGING"));
    if fake.is_some() && !sender_given {
        vars.push(("TWILIO_FROM_NUMBER", FROM));
    }
    if !extra.iter().any(|(name, _)| *name == "PUBLIC_URL") {
        vars.push(("PUBLIC_URL", PUBLIC_URL));
    }
    vars.extend_from_slice(extra);
    vars.retain(|(_, value)| !value.is_empty());
    let mut config = db.config(&vars);
    // Short enough for tests; the retry and timeout logic is the same at any length. Long
    // enough that a fake Twilio answering within a few hundred ms is never cut off on a loaded
    // machine (a debug build, tests in parallel): a late answer would turn a row `unknown`.
    config.twilio.request_timeout = CALL_TIMEOUT;
    config.twilio.retry_base_delay = Duration::from_millis(5);
    adjust(&mut config);
    let state = AppState::with_clock(config, db.store().await, clock);
    let server = serve_app(edgegate::app(state.clone()), Duration::from_secs(1)).await;
    Instance { server, state }
}

/// As `instance`, with Twilio pointed at `fake` and the service reading time from `clock`.
async fn instance_on_clock(
    db: &TestDb,
    fake: &FakeTwilio,
    extra: &[(&str, &str)],
    clock: edgegate::clock::Clock,
) -> Instance {
    instance_reading(db, Some(fake), extra, |_| {}, clock).await
}

/// A fresh database, a fake Twilio, and one instance on them; returns from the test when the
/// database is not available (see `test_db!`).
macro_rules! one_instance {
    ($extra:expr) => {{
        let db = test_db!();
        let fake = FakeTwilio::start(ACCOUNT, TOKEN).await;
        let app = instance(&db, Some(&fake), $extra).await;
        (db, fake, app)
    }};
}

/// Like `one_instance!`, with two instances on the one database (as two machines would be).
macro_rules! two_instances {
    ($extra:expr) => {{
        let db = test_db!();
        let fake = FakeTwilio::start(ACCOUNT, TOKEN).await;
        let a = instance(&db, Some(&fake), $extra).await;
        let b = instance(&db, Some(&fake), $extra).await;
        (db, fake, a, b)
    }};
}

struct Answer {
    status: u16,
    retry_after: Option<u64>,
    body: Value,
}

async fn post_sms(instance: &Instance, key: &str, body: &str) -> Answer {
    let response = instance
        .server
        .client
        .post(instance.server.url("/functions/v1/send-sms"))
        .header("apikey", key)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let retry_after = crate::support::retry_after(&response);
    let body = response.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        retry_after,
        body,
    }
}

async fn send(instance: &Instance, body: Value) -> Answer {
    post_sms(instance, SECRET_KEY, &body.to_string()).await
}

fn assert_error(answer: &Answer, status: u16, code: &str) {
    assert_eq!(answer.status, status, "{}", answer.body);
    assert_eq!(answer.body["code"], code, "{}", answer.body);
}

async fn stored(instance: &Instance, answer: &Answer) -> edgegate::store::SmsMessage {
    let id = answer.body["id"].as_str().expect("an id");
    instance
        .state
        .store
        .sms_message(id)
        .await
        .unwrap()
        .expect("the row")
}

async fn only_message_status(instance: &Instance) -> (String, Option<i64>) {
    let row = last_message(instance).await;
    (row.status, row.error_code)
}

/// The row of the last send (the audit log's last entry), whatever its answer.
async fn last_message(instance: &Instance) -> edgegate::store::SmsMessage {
    let audit = instance.state.store.recent_audit(1).await.unwrap();
    let detail: Value = serde_json::from_str(audit[0].detail.as_deref().expect("detail")).unwrap();
    let id = detail["sms_id"].as_str().unwrap();
    instance.state.store.sms_message(id).await.unwrap().unwrap()
}

/// Sends one text to `to`, expects 502 `UPSTREAM_UNAVAILABLE`, and the row left `row_status`.
async fn expect_upstream_failure(app: &Instance, to: &str, row_status: &str) -> Answer {
    let answer = send(app, json!({"to": to, "body": "hi"})).await;
    assert_error(&answer, 502, "UPSTREAM_UNAVAILABLE");
    assert_eq!(only_message_status(app).await.0, row_status);
    answer
}

#[tokio::test]
async fn sms_sends_a_form_with_basic_auth_and_a_status_callback_and_stores_the_sid() {
    let (_db, fake, app) = one_instance!(&[]);

    let answer = send(
        &app,
        json!({"to": "+12025550123", "body": "Your code is 123456"}),
    )
    .await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let sid = answer.body["sid"].as_str().unwrap().to_owned();
    assert!(sid.starts_with("SM") && sid.len() == 34, "{sid}");
    assert_eq!(answer.body["status"], "queued");

    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(
        request.basic_auth,
        Some((ACCOUNT.to_owned(), TOKEN.to_owned()))
    );
    assert_eq!(request.field("To"), Some("+12025550123"));
    assert_eq!(request.field("Body"), Some("Your code is 123456"));
    assert_eq!(request.field("From"), Some(FROM));
    assert_eq!(request.field("MessagingServiceSid"), None);
    let id = answer.body["id"].as_str().unwrap();
    let callback = format!("{CALLBACK_URL}?id={id}");
    assert_eq!(request.field("StatusCallback"), Some(callback.as_str()));

    let row = stored(&app, &answer).await;
    assert_eq!(row.twilio_sid.as_deref(), Some(sid.as_str()));
    assert_eq!(row.status, "queued");
    assert_eq!(row.to_number, "+12025550123");

    let audit = app.state.store.recent_audit(1).await.unwrap();
    assert_eq!(audit[0].action, "send_sms");
    assert_eq!(audit[0].outcome, "sent");
    assert_eq!(audit[0].credential_source, "api_key");
    assert!(!audit[0].detail.as_deref().unwrap_or("").contains(TOKEN));
}

#[tokio::test]
async fn sms_through_a_messaging_service_without_public_url_sends_no_from_and_no_callback() {
    let (_db, fake, app) = one_instance!(&[
        ("TWILIO_MESSAGING_SERVICE_SID", SERVICE),
        ("PUBLIC_URL", ""),
    ]);

    let answer = send(&app, json!({"to": "+447700900123", "body": "hello"})).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(answer.body["status"], "accepted");
    let request = &fake.requests()[0];
    assert_eq!(request.field("MessagingServiceSid"), Some(SERVICE));
    assert_eq!(request.field("From"), None);
    assert_eq!(request.field("StatusCallback"), None);
}

#[tokio::test]
async fn sms_refuses_bad_fields_by_name_and_malformed_json_without_calling_twilio() {
    let (_db, fake, app) = one_instance!(&[("SMS_ALLOWED_PREFIXES", "+1,+44")]);

    let long_body = "x".repeat(1601);
    let long_key = "k".repeat(256);
    let cases = [
        (json!({"to": "2025550123", "body": "hi"}), "to"),
        (json!({"to": "+33612345678", "body": "hi"}), "to"),
        (json!({"body": "hi"}), "to"),
        (json!({"to": "+12025550123", "body": ""}), "body"),
        (json!({"to": "+12025550123", "body": long_body}), "body"),
        (json!({"to": "+12025550123"}), "body"),
        (
            json!({"to": "+12025550123", "body": "hi", "idempotency_key": long_key}),
            "idempotency_key",
        ),
        // U+0000, which no SMS carries and PostgreSQL cannot store.
        (json!({"to": "+12025550123", "body": "a\u{0}b"}), "body"),
        (
            json!({"to": "+12025550123", "body": "hi", "idempotency_key": "k\u{0}"}),
            "idempotency_key",
        ),
        // A misspelt key would be ignored, and a retry text twice.
        (
            json!({"to": "+12025550123", "body": "hi", "idempotencyKey": "k-1"}),
            "idempotencyKey",
        ),
        (
            json!({"to": "+12025550123", "body": "hi", "Idempotency-Key": "k-1"}),
            "Idempotency-Key",
        ),
    ];
    for (body, field) in cases {
        let answer = send(&app, body.clone()).await;
        assert_error(&answer, 422, "VALIDATION_FAILED");
        let message = answer.body["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("{field}:")),
            "{body}: {message}"
        );
    }

    let answer = post_sms(&app, SECRET_KEY, "{\"to\": \"+1202").await;
    assert_error(&answer, 400, "INVALID_REQUEST");
    let answer = post_sms(&app, SECRET_KEY, r#"{"to": 12025550123, "body": "hi"}"#).await;
    assert_error(&answer, 400, "INVALID_REQUEST");
    let message = answer.body["message"].as_str().unwrap();
    assert!(
        message.contains(": to: invalid type"),
        "names the field: {message}"
    );

    // Not an object: the message says what the route takes, not a Rust type's name.
    for text in ["[]", "1", "\"hi\""] {
        let answer = post_sms(&app, SECRET_KEY, text).await;
        assert_error(&answer, 400, "INVALID_REQUEST");
        let message = answer.body["message"].as_str().unwrap();
        assert!(
            message.contains("expected a JSON object"),
            "{text}: {message}"
        );
    }
    let answer = post_sms(
        &app,
        SECRET_KEY,
        r#"{"to": "+12025550123", "to": "+12025550124", "body": "hi"}"#,
    )
    .await;
    assert_error(&answer, 400, "INVALID_REQUEST");
    assert!(
        answer.body["message"]
            .as_str()
            .unwrap()
            .contains("duplicate field `to`"),
        "{}",
        answer.body
    );

    // Members the route does not read are ignored, as the Edge Function ignored them.
    let extra =
        json!({"to": "+12025550123", "body": "hi", "template": "welcome", "user": {"id": 7}});
    assert_eq!(send(&app, extra).await.status, 202);
    assert_eq!(fake.requests().len(), 1);

    // The longest body and key are accepted.
    let longest = json!({"to": "+447700900123", "body": "é".repeat(1600), "idempotency_key": "k".repeat(255)});
    assert_eq!(send(&app, longest).await.status, 202);
    assert_eq!(fake.requests().len(), 2);
}

/// supabase-js's `functions.invoke` sends a string body as `text/plain`: the Edge Function read
/// it with `req.json()` whatever the label, and so does edgegate.
#[tokio::test]
async fn sms_takes_a_json_body_whatever_its_content_type_says() {
    let (_db, fake, app) = one_instance!(&[]);
    let body = json!({"to": "+12025550123", "body": "hi"}).to_string();
    for content_type in [Some("text/plain;charset=UTF-8"), None] {
        let mut request = app
            .server
            .client
            .post(app.server.url("/functions/v1/send-sms"))
            .header("apikey", SECRET_KEY)
            .body(body.clone());
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 202, "{content_type:?}");
    }
    assert_eq!(fake.requests().len(), 2);
    // Still not JSON: still refused.
    let answer = post_sms(&app, SECRET_KEY, "to=%2B12025550123&body=hi").await;
    assert_error(&answer, 400, "INVALID_REQUEST");
}

#[tokio::test]
async fn sms_needs_the_service_role_and_twilio_configured() {
    let (db, fake, app) = one_instance!(&[]);
    let body = json!({"to": "+12025550123", "body": "hi"}).to_string();
    let answer = post_sms(&app, PUBLISHABLE_KEY, &body).await;
    assert_error(&answer, 403, "FORBIDDEN_ROLE");

    let unconfigured = instance(&db, None, &[]).await;
    let answer = send(&unconfigured, json!({"to": "+12025550123", "body": "hi"})).await;
    assert_error(&answer, 503, "NOT_CONFIGURED");
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn sms_idempotency_key_sends_once_across_two_instances_even_concurrently() {
    let (_db, fake, a, b) = two_instances!(&[]);
    let message = json!({"to": "+12025550123", "body": "once", "idempotency_key": "order-1"});

    let first = send(&a, message.clone()).await;
    assert_eq!(first.status, 202, "{}", first.body);
    let again = send(&b, message.clone()).await;
    assert_eq!(again.status, 202, "{}", again.body);
    assert_eq!(again.body, first.body);
    assert_eq!(fake.requests().len(), 1);

    // The same key for another message is a conflict, not a silent replay.
    let other = json!({"to": "+12025550123", "body": "twice", "idempotency_key": "order-1"});
    assert_error(&send(&b, other).await, 409, "CONFLICT");

    // Eight at once, split over both instances, while Twilio is slow to answer: one sends, and
    // each other gets either 409 (the send still under way) or, once it is answered, its 202.
    fake.set_latency(Duration::from_millis(100));
    let message = json!({"to": "+12025550124", "body": "race", "idempotency_key": "order-2"});
    let answers = join_all((0..8).map(|i| {
        let target = if i % 2 == 0 { &a } else { &b };
        send(target, message.clone())
    }))
    .await;
    let accepted: Vec<&Answer> = answers.iter().filter(|a| a.status == 202).collect();
    let in_progress = answers.len() - accepted.len();
    let bodies: Vec<&Value> = answers.iter().map(|answer| &answer.body).collect();
    assert!(!accepted.is_empty(), "{bodies:?}");
    assert!(
        accepted
            .iter()
            .all(|answer| answer.body == accepted[0].body && answer.body["sid"].is_string()),
        "{bodies:?}"
    );
    for answer in answers.iter().filter(|a| a.status != 202) {
        assert_error(answer, 409, "CONFLICT");
        assert!(answer.retry_after.is_some(), "{}", answer.body);
    }
    assert_eq!(fake.requests().len(), 2, "order-2 was sent more than once");

    let audit = a.state.store.recent_audit(20).await.unwrap();
    let count = |outcome: &str| audit.iter().filter(|e| e.outcome == outcome).count();
    // One replay for order-1; for order-2, the 202s but the sender's.
    assert_eq!(count("replayed"), 1 + accepted.len() - 1);
    assert_eq!(
        count("conflict"),
        1 + in_progress,
        "order-1's other message too"
    );
}

/// A repeat of a send still under way is not told that the message is going out (the first may
/// yet fail): it gets 409 `CONFLICT` with `Retry-After`, and once the first has its answer, a
/// retry replays that answer.
#[tokio::test]
async fn sms_a_repeat_while_the_first_send_is_under_way_is_409_then_replays_the_first_answer() {
    let db = test_db!();
    let fake = FakeTwilio::start(ACCOUNT, TOKEN).await;
    let app = instance_with(&db, Some(&fake), &[], |config| {
        config.twilio.request_timeout = Duration::from_secs(10);
    })
    .await;
    fake.set_latency(Duration::from_secs(3));
    let message = json!({"to": "+12025550123", "body": "hi", "idempotency_key": "slow-1"});
    let first = send(&app, message.clone());
    let repeat = async {
        // Once Twilio has the first request, its row is reserved and the send is under way.
        tokio::time::timeout(Duration::from_secs(10), async {
            while fake.requests().is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the first send never reached Twilio");
        let repeat = send(&app, message.clone()).await;
        (repeat, fake.requests().len())
    };
    let (first, (repeat, requests_meanwhile)) = tokio::time::timeout(
        Duration::from_secs(20),
        futures_util::future::join(first, repeat),
    )
    .await
    .expect("a send hung");
    assert_error(&repeat, 409, "CONFLICT");
    let words = repeat.body["message"].as_str().unwrap();
    assert!(words.contains("in progress"), "{words}");
    let retry_after = repeat.retry_after.expect("Retry-After");
    assert!((1..=5).contains(&retry_after), "{retry_after}");
    assert_eq!(requests_meanwhile, 1);
    assert_eq!(first.status, 202, "{}", first.body);
    assert!(first.body["sid"].is_string(), "{}", first.body);

    let again = tokio::time::timeout(Duration::from_secs(20), send(&app, message))
        .await
        .expect("the retry hung");
    assert_eq!((again.status, &again.body), (202, &first.body));
    assert_eq!(fake.requests().len(), 1);
    let audit = app.state.store.recent_audit(3).await.unwrap();
    let mut outcomes: Vec<&str> = audit.iter().map(|entry| entry.outcome.as_str()).collect();
    outcomes.sort_unstable();
    assert_eq!(outcomes, ["conflict", "replayed", "sent"]);
}

/// A row still `accepted` without a SID after a send could have ended has no sender left (the
/// sweeper marks it `unknown` within a minute): a repeat gets that answer, not a 409 for ever.
#[tokio::test]
async fn sms_a_repeat_of_a_send_whose_sender_is_gone_answers_unknown() {
    use edgegate::store::{NewSms, SmsLimits};
    let (_db, fake, app) = one_instance!(&[]);
    let an_hour_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 3_600_000;
    let new = NewSms {
        id: "orphan",
        idempotency_key: Some("orphan-1"),
        to_number: "+12025550123",
        body: "hi",
        status: "accepted",
        replayed_error_codes: &[],
    };
    let limits = SmsLimits {
        per_recipient_per_hour: 5,
        per_minute: 60,
    };
    app.state
        .store
        .reserve_sms(new, limits, || an_hour_ago)
        .await
        .unwrap();
    let message = json!({"to": "+12025550123", "body": "hi", "idempotency_key": "orphan-1"});
    let answer = tokio::time::timeout(Duration::from_secs(20), send(&app, message))
        .await
        .expect("the send hung");
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(
        answer.body,
        json!({"id": "orphan", "sid": null, "status": "unknown"})
    );
    assert!(
        fake.requests().is_empty(),
        "a send that may have gone out was sent again"
    );
}

/// A sender killed while the wall clock was a day ahead leaves its row `accepted`, stamped a
/// day ahead. Once the clock is set back its age was below zero for a day: every repeat with
/// its key got 409 `CONFLICT` and the sweep passed it over. A row stamped more than an hour
/// ahead is restamped an hour back by the next reservation, the repeat's own: it is answered
/// as a send whose sender is gone, and never sent again. One stamped a little ahead (an
/// instance whose clock is a few seconds fast, its sender maybe still waiting on Twilio) is
/// still a send in progress.
#[tokio::test]
async fn sms_a_repeat_of_a_send_stamped_a_day_ahead_by_a_clock_since_set_back_answers_unknown() {
    use edgegate::store::{NewSms, SmsLimits};
    let (_db, fake, app) = one_instance!(&[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let limits = SmsLimits {
        per_recipient_per_hour: 5,
        per_minute: 60,
    };
    for (key, at) in [("fast-1", now + 5_000), ("ahead-1", now + 86_400_000)] {
        let new = NewSms {
            id: key,
            idempotency_key: Some(key),
            to_number: "+12025550123",
            body: "hi",
            status: "accepted",
            replayed_error_codes: &[],
        };
        app.state
            .store
            .reserve_sms(new, limits, || at)
            .await
            .unwrap();
    }
    let repeat = |key: &str| json!({"to": "+12025550123", "body": "hi", "idempotency_key": key});
    let answer = send(&app, repeat("ahead-1")).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(
        answer.body,
        json!({"id": "ahead-1", "sid": null, "status": "unknown"})
    );
    let answer = send(&app, repeat("fast-1")).await;
    assert_error(&answer, 409, "CONFLICT");
    assert!(
        fake.requests().is_empty(),
        "a send that may have gone out was sent again"
    );
}

/// Reserves message `id` (its idempotency key `id` too) as a send does when its clock reads `at`
/// (ms), and leaves it `accepted`: as a sender stopped before Twilio answered left it.
async fn reserve_at(store: &edgegate::store::Store, id: &str, at: i64) {
    use edgegate::store::{NewSms, Reservation, SmsLimits};
    let new = NewSms {
        id,
        idempotency_key: Some(id),
        to_number: "+12025550123",
        body: "hi",
        status: "accepted",
        replayed_error_codes: &[],
    };
    let limits = SmsLimits {
        per_recipient_per_hour: 1_000,
        per_minute: 1_000,
    };
    let reserved = store.reserve_sms(new, limits, || at).await.unwrap();
    assert!(matches!(reserved, Reservation::Created(_)), "{reserved:?}");
}

/// Records Twilio's answer `sent` with `sid` for message `id`, at `at` (ms).
async fn record_sent_at(store: &edgegate::store::Store, id: &str, sid: &str, at: i64) {
    let sent = edgegate::store::SendResult {
        status: "sent",
        twilio_sid: Some(sid),
        error_code: None,
        error_message: None,
    };
    store.record_sms_send((id, 1), sent, at).await.unwrap();
}

/// A failure's write repeated after its row was reopened (the first write committed, its answer
/// lost on the way back, so it was tried again while the caller's retry reserved the row anew
/// and called Twilio) set the row back to `failed`: a third request with the key reopened it and
/// texted again, two texts for one key. A send's write now applies only to its own reservation.
#[tokio::test]
async fn sms_a_failure_written_again_after_its_row_was_reopened_leaves_the_new_send_alone() {
    use edgegate::store::{NewSms, Reservation, SendResult, SmsLimits};
    let db = test_db!();
    let store = db.store().await;
    let new = NewSms {
        id: "twice",
        idempotency_key: Some("twice"),
        to_number: "+12025550123",
        body: "hi",
        status: "accepted",
        replayed_error_codes: &[],
    };
    let limits = SmsLimits {
        per_recipient_per_hour: 1_000,
        per_minute: 1_000,
    };
    let failed = SendResult {
        status: "failed",
        twilio_sid: None,
        error_code: None,
        error_message: Some("Twilio did not take the message after 1 attempt"),
    };
    let t0 = 1_800_000_000_000;
    let first = store.reserve_sms(new, limits, || t0).await.unwrap();
    assert!(matches!(first, Reservation::Created(_)), "{first:?}");
    assert!(
        store
            .record_sms_send(("twice", 1), failed, t0 + 1)
            .await
            .unwrap(),
        "its own reservation's"
    );
    let second = store.reserve_sms(new, limits, || t0 + 2).await.unwrap();
    let Reservation::Reopened(reopened) = second else {
        panic!("not reopened: {second:?}");
    };
    assert_eq!(reopened.attempt, 2);
    // The first send's write again, after the second send reserved the row: said not stored.
    assert!(
        !store
            .record_sms_send(("twice", 1), failed, t0 + 3)
            .await
            .unwrap(),
        "the row is the second send's"
    );
    let third = store.reserve_sms(new, limits, || t0 + 4).await.unwrap();
    match third {
        Reservation::Existing(message) => assert_eq!(message.status, "accepted"),
        other => panic!("the second send's row was reserved again: {other:?}"),
    }
}

/// Rows stamped over an hour ahead by a clock since set back are restamped an hour before now by
/// the sweep, not only by the next send: with no send coming, a row left `accepted` a day ahead
/// (its sender killed while the clock was ahead) waited a day to be swept `unknown`, and every
/// row came back into the limits once the clock neared its stamp. A row less far ahead keeps its
/// stamp (another instance's clock a little fast), and its send may still be under way.
#[tokio::test]
async fn sms_the_sweep_restamps_rows_stamped_over_an_hour_ahead_with_no_send_coming() {
    let db = test_db!();
    let store = db.store().await;
    let clock = edgegate::clock::Clock::manual();
    let (now, hour, day) = (clock.now_ms(), 3_600_000, 86_400_000);
    // In time order: a reservation after a row over an hour ahead of it restamps that row.
    reserve_at(&store, "old", now - hour).await;
    reserve_at(&store, "half-hour-ahead", now + hour / 2).await;
    reserve_at(&store, "day-ahead", now + day).await;
    reserve_at(&store, "sent-day-ahead", now + day).await;
    record_sent_at(&store, "sent-day-ahead", "SM0001", now + day).await;

    let (_server, state) = crate::support::spawn_app_with_clock(&db, &[], clock).await;
    let row = |id: &'static str| {
        let store = state.store.clone();
        async move { store.sms_message(id).await.unwrap().unwrap() }
    };
    // The sweep restamps before it marks: once the old row is marked, the restamp is done.
    tokio::time::timeout(Duration::from_secs(20), async {
        while row("old").await.status != "unknown" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the start sweep did not run");
    let swept = row("day-ahead").await;
    assert_eq!(
        (swept.status.as_str(), swept.created_at_ms),
        ("unknown", now - hour)
    );
    let sent = row("sent-day-ahead").await;
    assert_eq!(
        (sent.status.as_str(), sent.created_at_ms, sent.updated_at_ms),
        ("sent", now - hour, now - hour)
    );
    let fast = row("half-hour-ahead").await;
    assert_eq!(
        (fast.status.as_str(), fast.created_at_ms),
        ("accepted", now + hour / 2)
    );
}

/// Once Twilio has the message, a stalled database must not turn the answer into a 504 (the
/// caller, without the SID, would send again): the write waits a bounded time, the caller gets
/// 202 with the SID, and the write goes on, storing the SID once the database answers. On
/// PostgreSQL, where a write blocked on a row lock waits for ever (SQLite's busy timeout bounds
/// it already).
#[tokio::test]
async fn sms_a_database_stalled_after_twilio_answered_still_answers_202_with_the_sid() {
    let db = crate::postgres_db!();
    let fake = FakeTwilio::start(ACCOUNT, TOKEN).await;
    let app = instance_with(&db, Some(&fake), &[], |config| {
        config.twilio.request_timeout = Duration::from_secs(10);
    })
    .await;
    fake.set_latency(Duration::from_secs(3));
    let started = std::time::Instant::now();
    let sending = send(&app, json!({"to": "+12025550123", "body": "hi"}));
    let stall = async {
        // Twilio has the request, so its row is reserved: lock it until the test says.
        tokio::time::timeout(Duration::from_secs(10), async {
            while fake.requests().is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the send never reached Twilio");
        let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("SELECT id FROM sms_messages FOR UPDATE")
            .execute(&mut *tx)
            .await
            .unwrap();
        (pool, tx)
    };
    let (answer, (pool, tx)) = tokio::time::timeout(
        Duration::from_secs(45),
        futures_util::future::join(sending, stall),
    )
    .await
    .expect("the send hung");
    assert_eq!(answer.status, 202, "{}", answer.body);
    let sid = answer.body["sid"].as_str().expect("the SID").to_owned();
    // Twilio's 3 s, then at most 5 s for the stalled write: well inside the route's 30 s.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );

    // The database answers again: the write that went on stores the SID.
    tx.rollback().await.unwrap();
    let mut stored_sid = None;
    for _ in 0..200 {
        stored_sid = stored(&app, &answer).await.twilio_sid;
        if stored_sid.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stored_sid.as_deref(), Some(sid.as_str()));
    pool.close().await;
}

/// A send whose failure the database refused at first (its row locked past `lock_timeout`, the
/// pool spent) keeps trying to store it for a minute after the caller's 502. A retry with the
/// key meanwhile found the row still `accepted`, past the 48 s after which a row was taken for
/// one whose sender is gone, and was answered 202 `"status":"unknown"`: for a text never sent,
/// which the write then marked `failed`, and the client, told it may have gone, stopped. The
/// row is a send in progress as long as its sender may still store its answer: 409, and a retry
/// once the failure is stored sends it. On PostgreSQL, whose row lock holds back the failure's
/// write and not the retry's reservation (SQLite's write lock would hold back both).
#[tokio::test]
async fn sms_a_repeat_while_the_senders_failure_is_still_being_stored_is_409_not_unknown() {
    let db = crate::postgres_db!();
    let fake = FakeTwilio::start(ACCOUNT, TOKEN).await;
    let clock = edgegate::clock::Clock::manual();
    let app = instance_on_clock(&db, &fake, &[], clock.clone()).await;
    // A refusal of our credentials: Twilio created nothing, the row is `failed` and a retry with
    // the key sends. Late enough to lock the row before it comes.
    fake.script([Reply::Error {
        http: 401,
        code: 20003,
        message: "Authenticate",
    }]);
    fake.set_latency(Duration::from_secs(1));
    let message = json!({"to": "+12025550123", "body": "hi", "idempotency_key": "late-failure"});
    let sending = send(&app, message.clone());
    let stall = async {
        // Twilio has the request, so its row is reserved: lock it until the test says.
        tokio::time::timeout(Duration::from_secs(10), async {
            while fake.requests().is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the send never reached Twilio");
        let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
        let mut tx = pool.begin().await.unwrap();
        let (status,): (String,) =
            sqlx::query_as("SELECT status FROM sms_messages WHERE idempotency_key = $1 FOR UPDATE")
                .bind("late-failure")
                .fetch_one(&mut *tx)
                .await
                .unwrap();
        assert_eq!(
            status, "accepted",
            "the row was locked after Twilio answered"
        );
        (pool, tx)
    };
    let (first, (pool, tx)) = tokio::time::timeout(
        Duration::from_secs(30),
        futures_util::future::join(sending, stall),
    )
    .await
    .expect("the send hung");
    assert_error(&first, 502, "UPSTREAM_UNAVAILABLE");
    let id = last_audited_sms_id(&app).await;

    // 50 s after the reservation, the sender still trying to store the failure.
    clock.advance(Duration::from_secs(50));
    let repeat = tokio::time::timeout(Duration::from_secs(20), send(&app, message.clone()))
        .await
        .expect("the repeat hung");
    assert_error(&repeat, 409, "CONFLICT");

    // The database answers again: the failure is stored, and a retry sends the text.
    tx.rollback().await.unwrap();
    let mut status = String::new();
    for _ in 0..200 {
        status = app
            .state
            .store
            .sms_message(&id)
            .await
            .unwrap()
            .unwrap()
            .status;
        if status != "accepted" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, "failed");
    let retry = tokio::time::timeout(Duration::from_secs(20), send(&app, message))
        .await
        .expect("the retry hung");
    assert_eq!(retry.status, 202, "{}", retry.body);
    assert!(retry.body["sid"].is_string(), "{}", retry.body);
    assert_eq!(fake.requests().len(), 2);
    pool.close().await;
}

/// Twilio took the message while the database refused writes for longer than a write waits for
/// it (SQLite's 5 s busy timeout; PostgreSQL's 3 s pool acquire): the write of the SID is tried
/// again until the database takes it, instead of leaving the row without it (marked `unknown`
/// later, and a retry with the key answered without the SID).
#[tokio::test]
async fn sms_a_sid_write_the_database_refuses_is_retried_until_it_is_stored() {
    use sqlx::Connection as _;
    let db = test_db!();
    if db.is_postgres() {
        crate::support::skipped("needs SQLite (a write lock another connection holds)");
        return;
    }
    let fake = FakeTwilio::start(ACCOUNT, TOKEN).await;
    let app = instance(&db, Some(&fake), &[]).await;
    // Time to take the lock after Twilio has the request, before it answers.
    fake.set_latency(Duration::from_millis(300));
    let sending = send(&app, json!({"to": "+12025550123", "body": "hi"}));
    let lock = async {
        tokio::time::timeout(Duration::from_secs(10), async {
            while fake.requests().is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the send never reached Twilio");
        let mut holder = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut holder)
            .await
            .unwrap();
        // Past the busy timeout, so the first write fails rather than waits.
        tokio::time::sleep(Duration::from_secs(7)).await;
        sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
        holder.close().await.unwrap();
    };
    let (answer, ()) = tokio::time::timeout(
        Duration::from_secs(30),
        futures_util::future::join(sending, lock),
    )
    .await
    .expect("the send hung");
    assert_eq!(answer.status, 202, "{}", answer.body);
    let sid = answer.body["sid"].as_str().expect("the SID").to_owned();

    let mut row = stored(&app, &answer).await;
    for _ in 0..100 {
        if row.twilio_sid.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        row = stored(&app, &answer).await;
    }
    assert_eq!(row.twilio_sid.as_deref(), Some(sid.as_str()), "{row:?}");
    assert_eq!(row.status, "queued", "{row:?}");
}

#[tokio::test]
async fn sms_a_caller_who_hangs_up_mid_send_still_gets_it_recorded_and_a_retry_sends_nothing() {
    let (_db, fake, app) = one_instance!(&[]);
    // Twilio answers after the caller gives up (100 ms), well within edgegate's own timeout
    // (`CALL_TIMEOUT`, 2 s).
    fake.set_latency(Duration::from_millis(400));
    let message = json!({"to": "+12025550123", "body": "hi", "idempotency_key": "hang-up"});
    let impatient = app
        .server
        .client
        .post(app.server.url("/functions/v1/send-sms"))
        .header("apikey", SECRET_KEY)
        .json(&message)
        .timeout(Duration::from_millis(100))
        .send()
        .await;
    assert!(impatient.is_err(), "the caller was meant to give up first");

    // The first send goes on without its caller: its answer and its audit row are recorded.
    let mut sent_audited = false;
    for _ in 0..250 {
        let audit = app.state.store.recent_audit(10).await.unwrap();
        sent_audited = audit.iter().any(|entry| entry.outcome == "sent");
        if sent_audited {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(sent_audited, "the abandoned send was never recorded");
    // The caller's retry with the same key gets that message and sends nothing.
    let replay = send(&app, message).await;
    assert_eq!(replay.status, 202, "{}", replay.body);
    assert_eq!(replay.body["status"], "queued", "{}", replay.body);
    assert!(replay.body["sid"].is_string(), "{}", replay.body);
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn sms_per_recipient_limit_holds_across_instances_with_retry_after() {
    let limit = [("SMS_MAX_PER_RECIPIENT_PER_HOUR", "2")];
    let (_db, fake, a, b) = two_instances!(&limit);
    let to_alice = json!({"to": "+12025550123", "body": "code"});
    assert_eq!(send(&a, to_alice.clone()).await.status, 202);
    assert_eq!(send(&b, to_alice.clone()).await.status, 202);

    let refused = send(&a, to_alice.clone()).await;
    assert_error(&refused, 429, "RATE_LIMITED");
    let retry_after = refused.retry_after.expect("Retry-After");
    assert!((3590..=3600).contains(&retry_after), "{retry_after}");
    assert_error(&send(&b, to_alice).await, 429, "RATE_LIMITED");

    let to_bob = json!({"to": "+12025550199", "body": "code"});
    assert_eq!(send(&b, to_bob).await.status, 202);
    assert_eq!(fake.requests().len(), 3);
    let audit = a.state.store.recent_audit(10).await.unwrap();
    assert_eq!(
        audit.iter().filter(|e| e.outcome == "rate_limited").count(),
        2
    );
    // Each instance counts its own.
    for (instance, accepted, limited) in [(&a, 1, 1), (&b, 2, 1)] {
        let text = instance.server.get("/metrics").await.text().await.unwrap();
        for line in [
            format!(r#"edgegate_sms_sent_total{{outcome="accepted"}} {accepted}"#),
            format!(r#"edgegate_sms_sent_total{{outcome="rate_limited"}} {limited}"#),
        ] {
            assert!(text.lines().any(|l| l == line), "no {line} in:\n{text}");
        }
    }
}

#[tokio::test]
async fn sms_global_limit_lets_exactly_the_limit_through_concurrent_sends_on_two_instances() {
    let limit = [("SMS_MAX_PER_MINUTE", "3")];
    let (_db, fake, a, b) = two_instances!(&limit);
    let answers = join_all((0..8).map(|i| {
        let target = if i % 2 == 0 { &a } else { &b };
        send(
            target,
            json!({"to": format!("+1202555010{i}"), "body": "hi"}),
        )
    }))
    .await;
    let accepted = answers.iter().filter(|a| a.status == 202).count();
    let limited: Vec<&Answer> = answers.iter().filter(|a| a.status == 429).collect();
    assert_eq!(accepted, 3);
    assert_eq!(limited.len(), 5);
    for answer in limited {
        assert_error(answer, 429, "RATE_LIMITED");
        let retry_after = answer.retry_after.expect("Retry-After");
        assert!((1..=60).contains(&retry_after), "{retry_after}");
    }
    assert_eq!(fake.requests().len(), 3);
}

/// Sends stamped while the wall clock was a day ahead (an NTP step set it back since: a VM
/// restored, a host whose clock was wrong at boot) are no recent sends once it is right: they
/// must not fill the minute's or the hour's window for a whole day. A row stamped less far
/// ahead (another machine's clock a little fast) still counts, until it is a window old, and
/// the wait it asks for is never longer than its window.
#[tokio::test]
async fn sms_limits_ignore_rows_stamped_more_than_an_hour_ahead_of_the_clock() {
    let db = test_db!();
    let fake = FakeTwilio::start(ACCOUNT, TOKEN).await;
    let clock = edgegate::clock::Clock::manual();
    let limits = [
        ("SMS_MAX_PER_MINUTE", "3"),
        ("SMS_MAX_PER_RECIPIENT_PER_HOUR", "2"),
    ];
    let app = instance_on_clock(&db, &fake, &limits, clock.clone()).await;
    let day_ms = 24 * 3_600_000;
    let text = |to: &str| json!({"to": to, "body": "code"});

    clock.step_wall(day_ms);
    assert_eq!(send(&app, text("+12025550123")).await.status, 202);
    assert_eq!(send(&app, text("+12025550123")).await.status, 202);
    assert_eq!(send(&app, text("+12025550124")).await.status, 202);
    let full = send(&app, text("+12025550125")).await;
    assert_error(&full, 429, "RATE_LIMITED");

    clock.step_wall(-day_ms);
    let after = send(&app, text("+12025550125")).await;
    assert_eq!(after.status, 202, "{}", after.body);
    let again = send(&app, text("+12025550123")).await;
    assert_eq!(again.status, 202, "{}", again.body);

    // Rows 30 s ahead count until they are a minute old, 90 s from now; the wait asked for is
    // never longer than the minute's window (60 s, not 90), then what is left of it.
    let db2 = test_db!();
    let app = instance_on_clock(&db2, &fake, &limits, clock.clone()).await;
    clock.step_wall(30_000);
    for n in 0..3 {
        let to = format!("+1202555020{n}");
        assert_eq!(send(&app, text(&to)).await.status, 202);
    }
    clock.step_wall(-30_000);
    let refused = send(&app, text("+12025550209")).await;
    assert_error(&refused, 429, "RATE_LIMITED");
    assert_eq!(refused.retry_after, Some(60), "{}", refused.body);
    clock.advance(Duration::from_secs(60));
    let refused = send(&app, text("+12025550209")).await;
    assert_error(&refused, 429, "RATE_LIMITED");
    assert_eq!(refused.retry_after, Some(30), "{}", refused.body);
    clock.advance(Duration::from_secs(30));
    let after = send(&app, text("+12025550209")).await;
    assert_eq!(after.status, 202, "{}", after.body);
}

/// An instance whose clock runs two minutes fast stamps its sends two minutes ahead. The
/// instances whose clock is right must count them in `SMS_MAX_PER_MINUTE`, as they did before
/// rows over a window ahead were left out: left out, each side let its own limit through in
/// the same minute, twice the cap in all.
#[tokio::test]
async fn sms_global_limit_counts_the_sends_of_an_instance_whose_clock_is_minutes_fast() {
    let db = test_db!();
    let fake = FakeTwilio::start(ACCOUNT, TOKEN).await;
    let limits = [("SMS_MAX_PER_MINUTE", "3")];
    let fast_clock = edgegate::clock::Clock::manual();
    fast_clock.step_wall(120_000);
    let fast = instance_on_clock(&db, &fake, &limits, fast_clock).await;
    let right = instance_on_clock(&db, &fake, &limits, edgegate::clock::Clock::manual()).await;
    let text = |to: &str| json!({"to": to, "body": "code"});

    for n in 0..3 {
        let sent = send(&fast, text(&format!("+1202555030{n}"))).await;
        assert_eq!(sent.status, 202, "{}", sent.body);
    }
    let refused = send(&right, text("+12025550309")).await;
    assert_error(&refused, 429, "RATE_LIMITED");
    assert_eq!(refused.retry_after, Some(60), "{}", refused.body);
    assert_error(
        &send(&fast, text("+12025550308")).await,
        429,
        "RATE_LIMITED",
    );
    assert_eq!(fake.requests().len(), 3);
}

/// Sends stamped while the wall clock was a day ahead, once it is set back, must not count again
/// when our clock comes within a window of their stamp: left out only while more than a window
/// ahead, they filled the recipient's hour again 23 h later, and a person texted once a day
/// before was refused 429. The first send after the step restamps them: they never count again.
#[tokio::test]
async fn sms_rows_stamped_a_day_ahead_do_not_count_again_as_the_clock_nears_their_stamp() {
    let db = test_db!();
    let fake = FakeTwilio::start(ACCOUNT, TOKEN).await;
    let clock = edgegate::clock::Clock::manual();
    let limits = [("SMS_MAX_PER_RECIPIENT_PER_HOUR", "2")];
    let app = instance_on_clock(&db, &fake, &limits, clock.clone()).await;
    let text = |to: &str| json!({"to": to, "body": "code"});
    let day_ms = 24 * 3_600_000;

    clock.step_wall(day_ms);
    for _ in 0..2 {
        assert_eq!(send(&app, text("+12025550401")).await.status, 202);
    }
    clock.step_wall(-day_ms);
    assert_eq!(send(&app, text("+12025550402")).await.status, 202);

    // 23 h 30 min later the rows would be 30 min ahead, within the hour's window.
    clock.advance(Duration::from_secs(23 * 3600 + 1800));
    for _ in 0..2 {
        let sent = send(&app, text("+12025550401")).await;
        assert_eq!(sent.status, 202, "{}", sent.body);
    }
    // The limit itself holds: two sends this hour.
    let refused = send(&app, text("+12025550401")).await;
    assert_error(&refused, 429, "RATE_LIMITED");
    assert_eq!(refused.retry_after, Some(3600), "{}", refused.body);
    let stamped = "SELECT COUNT(*) FROM sms_messages WHERE created_at > ";
    let ahead = format!("{stamped}{}", clock.now_ms() + 3_600_000);
    assert_eq!(crate::stripe::count(&db, &ahead).await, 0);
}

#[tokio::test]
async fn sms_numbers_twilio_refuses_are_422_naming_to() {
    let (_db, fake, app) = one_instance!(&[]);
    let refusals = [
        (
            21211,
            "The 'To' number +12025550120 is not a valid phone number.",
            422,
        ),
        (21614, "'To' number is not a valid mobile number", 422),
        (
            21612,
            "The 'To' phone number is not currently reachable via SMS",
            422,
        ),
        (
            21408,
            "Permission to send an SMS has not been enabled for the region",
            422,
        ),
        (21610, "Attempt to send to unsubscribed recipient", 422),
        // Not about the recipient: Twilio's (or our configuration's) failure, not the caller's.
        (
            21606,
            "The 'From' phone number provided is not a valid message-capable Twilio phone number.",
            502,
        ),
    ];
    for (i, (code, message, expected)) in refusals.into_iter().enumerate() {
        fake.script([Reply::Error {
            http: 400,
            code,
            message,
        }]);
        let to = format!("+1202555012{i}");
        let answer = send(&app, json!({"to": to, "body": "hi"})).await;
        assert_eq!(answer.status, expected, "{code}: {}", answer.body);
        let text = answer.body["message"].as_str().unwrap();
        if expected == 422 {
            assert_eq!(answer.body["code"], "VALIDATION_FAILED");
            assert!(
                text.starts_with("to:") && text.contains(&code.to_string()),
                "{text}"
            );
        } else {
            assert_eq!(answer.body["code"], "UPSTREAM_UNAVAILABLE");
        }
        assert_eq!(
            only_message_status(&app).await,
            ("failed".to_owned(), Some(code))
        );
    }
    assert_eq!(
        fake.requests().len(),
        refusals.len(),
        "refusals are not retried"
    );
}

/// Twilio's words for a refusal are stored (and answered) as its description from a status
/// fetch is: a U+0000 in them made PostgreSQL refuse the row's write ("SMS failure not
/// stored"), which left the message `accepted`; they are kept as one line (control characters a
/// space), trimmed and cut to 256 characters.
#[tokio::test]
async fn sms_refusal_words_are_stored_as_one_short_printable_line() {
    let (_db, fake, app) = one_instance!(&[]);
    let long = "é".repeat(5_000);
    let words: &'static str =
        Box::leak(format!("The 'To' number\u{0} is not valid\u{1b}[2J\r\n{long}").into_boxed_str());
    fake.script([Reply::Error {
        http: 400,
        code: 21211,
        message: words,
    }]);
    let message = json!({"to": "+12025550123", "body": "hi", "idempotency_key": "refused-words"});
    let answer = send(&app, message.clone()).await;
    assert_error(&answer, 422, "VALIDATION_FAILED");
    // One line of words, its control characters a space; cut to 256 characters, the last "…".
    let kept = format!("The 'To' number is not valid [2J {}…", "é".repeat(222));
    assert_eq!(kept.chars().count(), 256);
    let detail = format!("{kept} (error 21211)");
    let row = last_message(&app).await;
    assert_eq!(
        (row.status.as_str(), row.error_code),
        ("failed", Some(21211))
    );
    assert_eq!(row.error_message.as_deref(), Some(detail.as_str()));
    assert_eq!(answer.body["message"], format!("to: {detail}"));
    // A retry with the key is answered from the stored row, as the first answer was.
    let requests = fake.requests().len();
    let retry = send(&app, message).await;
    assert_eq!((retry.status, &retry.body), (answer.status, &answer.body));
    assert_eq!(fake.requests().len(), requests, "the retry reached Twilio");
}

/// Twilio measures a body in segments (a character outside GSM-7 takes two bytes of UCS-2), so a
/// body of at most 1,600 characters can still be too long for it: its refusal is the caller's
/// body, a 422 naming `body`, and a retry with the same key gets that answer again.
#[tokio::test]
async fn sms_bodies_twilio_refuses_are_422_naming_body_and_replayed() {
    let (_db, fake, app) = one_instance!(&[]);
    let refusals = [
        (
            21617,
            "The concatenated message body exceeds the 1600 character limit",
        ),
        (21658, "Parameter exceeded character limit"),
        (21602, "Message body is required"),
    ];
    let long = "\u{1F600}".repeat(1_000);
    for (i, (code, text)) in refusals.into_iter().enumerate() {
        fake.script([Reply::Error {
            http: 400,
            code,
            message: text,
        }]);
        let message =
            json!({"to": "+12025550123", "body": long, "idempotency_key": format!("body-{i}")});
        let first = tokio::time::timeout(Duration::from_secs(20), send(&app, message.clone()))
            .await
            .expect("the send hung");
        assert_error(&first, 422, "VALIDATION_FAILED");
        let words = first.body["message"].as_str().unwrap();
        assert!(
            words.starts_with("body:") && words.contains(&code.to_string()),
            "{words}"
        );
        assert_eq!(
            only_message_status(&app).await,
            ("failed".to_owned(), Some(code))
        );
        let requests = fake.requests().len();
        let retry = tokio::time::timeout(Duration::from_secs(20), send(&app, message))
            .await
            .expect("the retry hung");
        assert_eq!((retry.status, &retry.body), (first.status, &first.body));
        assert_eq!(
            fake.requests().len(),
            requests,
            "a refused body was sent again"
        );
        assert_eq!(app_audit_outcome(&app).await, "validation_failed");
    }
}

#[tokio::test]
async fn sms_throttling_is_retried_then_succeeds_or_gives_502() {
    let (_db, fake, app) = one_instance!(&[]);

    fake.script([
        Reply::throttled(),
        Reply::Error {
            http: 503,
            code: 20429,
            message: "Too Many Requests",
        },
    ]);
    let answer = send(&app, json!({"to": "+12025550123", "body": "hi"})).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(fake.requests().len(), 3);
    assert_eq!(stored(&app, &answer).await.status, "queued");

    fake.script([Reply::throttled(), Reply::throttled(), Reply::throttled()]);
    expect_upstream_failure(&app, "+12025550124", "failed").await;
    assert_eq!(fake.requests().len(), 6);
}

/// A `Retry-After` from Twilio longer than one send may pause (5 s), or past the send's budget,
/// is not cut short: Twilio is not called again before it, and the caller gets it in the 502's
/// `Retry-After` (at most an hour), told that Twilio is throttling and nothing was sent; a retry
/// with the same key sends it. A shorter one is waited out.
#[tokio::test]
async fn sms_a_throttle_longer_than_a_send_can_wait_is_passed_on_in_retry_after() {
    let (db, fake, app) = one_instance!(&[]);

    fake.script([Reply::ThrottledFor(30)]);
    let message = json!({"to": "+12025550123", "body": "hi", "idempotency_key": "slow-down-1"});
    let answer = send(&app, message.clone()).await;
    assert_error(&answer, 502, "UPSTREAM_UNAVAILABLE");
    assert_eq!(answer.retry_after, Some(30), "{}", answer.body);
    let text = answer.body["message"].as_str().unwrap();
    assert!(
        text.contains("throttling") && text.contains("nothing was sent"),
        "{text}"
    );
    assert_eq!(
        fake.requests().len(),
        1,
        "Twilio was called before its wait"
    );
    assert_eq!(only_message_status(&app).await.0, "failed");
    assert_eq!(app_audit_outcome(&app).await, "upstream_unavailable");
    let retry = send(&app, message).await;
    assert_eq!(retry.status, 202, "{}", retry.body);
    assert!(retry.body["sid"].is_string(), "{}", retry.body);
    assert_eq!(fake.requests().len(), 2);

    // The header's other form, an HTTP date, is the same wait (a second lost to its
    // whole-second precision at most).
    fake.script([Reply::ThrottledUntil(30)]);
    let answer = expect_upstream_failure(&app, "+12025550128", "failed").await;
    let retry_after = answer.retry_after.expect("Retry-After");
    assert!((29..=30).contains(&retry_after), "{retry_after}");
    assert_eq!(fake.requests().len(), 3);

    // An absurd wait is passed on bounded.
    fake.script([Reply::ThrottledFor(1_000_000)]);
    let answer = expect_upstream_failure(&app, "+12025550124", "failed").await;
    assert_eq!(answer.retry_after, Some(3_600), "{}", answer.body);
    assert_eq!(fake.requests().len(), 4);

    // Twilio still asking on the last attempt: its wait is passed on too.
    fake.script([
        Reply::throttled(),
        Reply::throttled(),
        Reply::ThrottledFor(2),
    ]);
    let answer = expect_upstream_failure(&app, "+12025550125", "failed").await;
    assert_eq!(answer.retry_after, Some(2), "{}", answer.body);
    assert_eq!(fake.requests().len(), 7);

    // A wait a send can afford is waited out.
    fake.script([Reply::ThrottledFor(1)]);
    let answer = send(&app, json!({"to": "+12025550126", "body": "hi"})).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(fake.requests().len(), 9);

    // A wait under 5 s that a call after it could not end within the send's budget (3 s and a
    // 2 s call past a 4 s budget) is passed on too.
    let short = instance_with(&db, Some(&fake), &[], |config| {
        config.twilio.send_budget = Duration::from_secs(4);
    })
    .await;
    fake.script([Reply::ThrottledFor(3)]);
    let answer = expect_upstream_failure(&short, "+12025550127", "failed").await;
    assert_eq!(answer.retry_after, Some(3), "{}", answer.body);
    assert_eq!(fake.requests().len(), 10);
}

#[tokio::test]
async fn sms_a_timeout_after_sending_is_never_retried() {
    let (_db, fake, app) = one_instance!(&[]);

    fake.script([Reply::Hang]);
    expect_upstream_failure(&app, "+12025550123", "unknown").await;
    assert_eq!(
        fake.requests().len(),
        1,
        "a request Twilio may have seen was sent again"
    );
    let audit = app.state.store.recent_audit(1).await.unwrap();
    assert_eq!(audit[0].outcome, "upstream_unavailable");

    // A server error is no proof that nothing was created either.
    fake.script([Reply::Error {
        http: 500,
        code: 20500,
        message: "Internal Server Error",
    }]);
    expect_upstream_failure(&app, "+12025550124", "unknown").await;
    assert_eq!(fake.requests().len(), 2);
}

#[tokio::test]
async fn sms_a_connection_closed_after_the_request_was_written_is_never_retried() {
    let db = test_db!();
    let closing = ClosingTwilio::start().await;
    let fake = FakeTwilio::start(ACCOUNT, TOKEN).await;
    let app = instance(&db, Some(&fake), &[("TWILIO_API_BASE", &closing.base)]).await;
    expect_upstream_failure(&app, "+12025550123", "unknown").await;
    assert_eq!(
        closing.connections(),
        1,
        "a delivered request was sent again"
    );
}

/// An answer far larger than any Twilio sends (a Message resource is about 2 KB) is not read
/// whole, however well-formed: the send ends `unknown` (Twilio may have the message, so it is
/// not sent again), and the connection is dropped before the answer's end.
#[tokio::test]
async fn sms_an_oversized_answer_is_not_read_whole_and_leaves_the_send_unknown() {
    let (_db, fake, app) = one_instance!(&[]);
    fake.script([Reply::Oversized(8 * 1024 * 1024)]);
    let started = std::time::Instant::now();
    expect_upstream_failure(&app, "+12025550123", "unknown").await;
    assert!(
        started.elapsed() < CALL_TIMEOUT,
        "answered after {:?}",
        started.elapsed()
    );
    assert_eq!(fake.requests().len(), 1, "sent again");
    assert!(
        !fake.oversized_answer_finished(),
        "the whole answer was read"
    );
}

#[tokio::test]
async fn sms_a_refused_connection_is_retried_then_marked_failed() {
    let db = test_db!();
    // A port that was free a moment ago: nothing listens there.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let fake = FakeTwilio::start(ACCOUNT, TOKEN).await;
    let app = instance(&db, Some(&fake), &[("TWILIO_API_BASE", &closed)]).await;
    let answer = send(&app, json!({"to": "+12025550123", "body": "hi"})).await;
    assert_error(&answer, 502, "UPSTREAM_UNAVAILABLE");
    assert!(
        answer.body["message"]
            .as_str()
            .unwrap()
            .contains("3 attempts")
    );
    assert_eq!(only_message_status(&app).await.0, "failed");
}

/// A loopback `http://` address where a TCP connect never completes: a listener whose accept
/// queue (backlog 0 holds one) is full with a connection it never accepts, so the kernel drops
/// every further SYN, as a blackholed address does. Both sockets live as long as the pair does.
async fn unconnectable() -> (String, (tokio::net::TcpListener, tokio::net::TcpStream)) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let address = listener.local_addr().unwrap();
    let queued = tokio::net::TcpStream::connect(address).await.unwrap();
    let probe = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::net::TcpStream::connect(address),
    )
    .await;
    assert!(
        probe.is_err(),
        "a connect to a full accept queue completed: {probe:?}"
    );
    (format!("http://{address}"), (listener, queued))
}

/// A loopback `https://` address that takes the TCP connection and never answers the TLS
/// handshake: the request is never written. Stops when the task is aborted.
async fn silent_tls() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("https://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (base, task)
}

/// A connection to Twilio that cannot be made in time (a SYN never answered, a TLS handshake
/// never answered) proves the request never left, however long the call's own timeout: the
/// send is `failed`, not `unknown`, and a retry with the same key sends it once Twilio is back.
#[tokio::test]
async fn sms_a_connection_never_made_in_time_is_marked_failed_and_sent_by_a_retry() {
    let db = test_db!();
    let (no_syn_ack, _full_queue) = unconnectable().await;
    let (no_handshake, silent) = silent_tls().await;
    let fake = FakeTwilio::start(ACCOUNT, TOKEN).await;
    let up = instance(&db, Some(&fake), &[]).await;
    let connect = edgegate::outbound::CONNECT_TIMEOUT;
    for (i, base) in [no_syn_ack, no_handshake].iter().enumerate() {
        // The call's own timeout is longer than the connect's, as by default; the budget holds
        // one attempt only, to keep the test short.
        let down = instance_with(&db, Some(&fake), &[("TWILIO_API_BASE", base)], |config| {
            config.twilio.request_timeout = connect + Duration::from_secs(1);
            config.twilio.send_budget = 2 * connect;
        })
        .await;
        let key = format!("stalled-{i}");
        let message = json!({"to": "+12025550123", "body": "hi", "idempotency_key": key});
        let answer = send(&down, message.clone()).await;
        assert_error(&answer, 502, "UPSTREAM_UNAVAILABLE");
        assert!(
            answer.body["message"]
                .as_str()
                .unwrap()
                .contains("Twilio did not take the message"),
            "{base}: {}",
            answer.body
        );
        assert_eq!(only_message_status(&down).await.0, "failed", "{base}");
        let retry = send(&up, message).await;
        assert_eq!(retry.status, 202, "{base}: {}", retry.body);
        assert!(retry.body["sid"].is_string(), "{base}: {}", retry.body);
        assert_eq!(fake.requests().len(), i + 1, "{base}");
    }
    silent.abort();
}

/// Twilio may call back before the sender has stored the message's SID (its database slow,
/// or failing): the callback URL names the message, so the status is not lost.
#[tokio::test]
async fn sms_a_status_that_comes_before_the_sid_is_stored_is_kept() {
    let (_db, fake, app) = one_instance!(&[]);
    const SID: &str = "SM0123456789abcdef0123456789abcdef";
    fake.script([Reply::CreatedAs(SID)]);
    // Time for the callback to come first; well within edgegate's timeout (`CALL_TIMEOUT`).
    fake.set_latency(Duration::from_millis(300));
    let sending = {
        let (server, client) = (
            app.server.url("/functions/v1/send-sms"),
            app.server.client.clone(),
        );
        tokio::spawn(async move {
            let response = client
                .post(server)
                .header("apikey", SECRET_KEY)
                .json(&json!({"to": "+12025550123", "body": "hi"}))
                .send()
                .await
                .unwrap();
            (response.status(), response.json::<Value>().await.unwrap())
        })
    };
    while fake.requests().is_empty() {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let url = fake.requests()[0]
        .field("StatusCallback")
        .unwrap()
        .to_owned();
    let query = url.split_once('?').map_or("", |(_, query)| query);
    assert_eq!(url, format!("{CALLBACK_URL}?{query}"));
    // Twilio has the message and calls back while its answer to the sender is still on the way.
    let (status, body) = signed_callback(&app, query, &status_params(SID, "sent")).await;
    assert_eq!(status, 204, "{body}");

    let (status, body) = sending.await.unwrap();
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap();
    let row = app.state.store.sms_message(id).await.unwrap().unwrap();
    assert_eq!(row.twilio_sid.as_deref(), Some(SID));
    assert_eq!(
        row.status, "sent",
        "Twilio's earlier answer must not undo the callback"
    );
}

/// Posts a status callback to the URL edgegate gives Twilio for message `id` (`…?id=<id>`),
/// signed over that URL with the auth token; returns the answer's status and body.
async fn callback_for(app: &Instance, id: &str, params: &[(&str, &str)]) -> (u16, Value) {
    signed_callback(app, &format!("id={id}"), params).await
}

/// Posts a status callback to `CALLBACK_URL?query` (the URL edgegate gave Twilio), signed over
/// it with the auth token; returns the answer's status and body.
async fn signed_callback(app: &Instance, query: &str, params: &[(&str, &str)]) -> (u16, Value) {
    let signature = sign(TOKEN, &format!("{CALLBACK_URL}?{query}"), params);
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish();
    let response = app
        .server
        .client
        .post(
            app.server
                .url(&format!("/functions/v1/twilio-status?{query}")),
        )
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", signature)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// `params` signed over `url` with `token` by edgegate's own signer (Twilio's library signs in
/// `sms_status_signatures_made_by_twilios_library`, and agrees).
fn sign(token: &str, url: &str, params: &[(&str, &str)]) -> String {
    let owned: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    signature::compute(token.as_bytes(), url, &owned)
}

/// A signed callback whose URL names one message (`id=A`, A without a SID: its send ended
/// `unknown`) and whose `MessageSid` is another's (B's) is about B: the SID is Twilio's name
/// for the message, the id only finds a row whose SID is not stored yet. B's status is applied,
/// A is left as it was and never takes B's SID (that answered 500, `UNIQUE constraint failed:
/// sms_messages.twilio_sid`, and B's status was lost).
#[tokio::test]
async fn sms_a_callback_naming_one_message_with_anothers_sid_is_applied_to_the_sids_message() {
    let (_db, fake, app) = one_instance!(&[]);
    const SID_B: &str = "SM0123456789abcdef0123456789abcd0b";
    fake.script([Reply::Oversized(8 * 1024 * 1024), Reply::CreatedAs(SID_B)]);
    expect_upstream_failure(&app, "+12025550123", "unknown").await;
    let text = app.server.get("/metrics").await.text().await.unwrap();
    let line = r#"edgegate_sms_sent_total{outcome="unknown"} 1"#;
    assert!(text.lines().any(|l| l == line), "no {line} in:\n{text}");
    let id_a = last_audited_sms_id(&app).await;
    let row_a = app.state.store.sms_message(&id_a).await.unwrap().unwrap();
    assert!(row_a.error_message.is_some(), "{row_a:?}");
    let b = send(&app, json!({"to": "+12025550124", "body": "hi"})).await;
    assert_eq!(b.status, 202, "{}", b.body);
    assert_eq!(b.body["sid"], SID_B);

    let mut undelivered = status_params(SID_B, "undelivered");
    undelivered.push(("ErrorCode", "30007"));
    let (status, body) = callback_for(&app, &id_a, &undelivered).await;
    assert_eq!(status, 204, "{body}");
    let row_b = stored(&app, &b).await;
    assert_eq!(
        (row_b.status.as_str(), row_b.error_code),
        ("undelivered", Some(30007))
    );
    let row_a = app.state.store.sms_message(&id_a).await.unwrap().unwrap();
    assert_eq!(
        (row_a.status.as_str(), row_a.twilio_sid.as_deref()),
        ("unknown", None)
    );

    // An earlier status of B's, through A's URL again, changes nothing and is no error either.
    let (status, body) = callback_for(&app, &id_a, &status_params(SID_B, "sent")).await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(stored(&app, &b).await.status, "undelivered");
    let row_a = app.state.store.sms_message(&id_a).await.unwrap().unwrap();
    assert_eq!(
        (row_a.status.as_str(), row_a.twilio_sid.as_deref()),
        ("unknown", None)
    );

    // A's own SID through its URL is still stored on A (the callback that comes first).
    const SID_A: &str = "SM0123456789abcdef0123456789abcd0a";
    let (status, body) = callback_for(&app, &id_a, &status_params(SID_A, "delivered")).await;
    assert_eq!(status, 204, "{body}");
    let row_a = app.state.store.sms_message(&id_a).await.unwrap().unwrap();
    assert_eq!(
        (row_a.status.as_str(), row_a.twilio_sid.as_deref()),
        ("delivered", Some(SID_A))
    );
    // Why the send's outcome was unknown (the answer too large to read) is not why a delivered
    // message failed: the status clears it, as it replaces the error code.
    assert_eq!(row_a.error_message, None);
}

/// Posts a status callback signed with `token` (by our own signer; Twilio's library signs in
/// `sms_status_signatures_made_by_twilios_library`).
async fn callback(app: &Instance, params: &[(&str, &str)], token: &str) -> u16 {
    let signature = sign(token, CALLBACK_URL, params);
    post_callback(app, params, Some(&signature)).await
}

async fn post_callback(app: &Instance, params: &[(&str, &str)], signature: Option<&str>) -> u16 {
    let (status, body) = post_callback_answer(app, params, signature).await;
    if status == 400 {
        assert_eq!(body["code"], "INVALID_SIGNATURE", "{body}");
    }
    status
}

async fn post_callback_answer(
    app: &Instance,
    params: &[(&str, &str)],
    signature: Option<&str>,
) -> (u16, Value) {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish();
    let mut request = app
        .server
        .client
        .post(app.server.url("/functions/v1/twilio-status"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body);
    if let Some(signature) = signature {
        request = request.header("x-twilio-signature", signature);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn status_params<'a>(sid: &'a str, status: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("AccountSid", ACCOUNT),
        ("ApiVersion", "2010-04-01"),
        ("From", FROM),
        ("MessageSid", sid),
        ("MessageStatus", status),
        ("SmsSid", sid),
        ("SmsStatus", status),
        ("To", "+12025550123"),
    ]
}

#[tokio::test]
async fn sms_status_only_moves_forward_even_out_of_order_or_concurrently() {
    let (_db, _fake, a, b) = two_instances!(&[]);
    let answer = send(&a, json!({"to": "+12025550123", "body": "hi"})).await;
    let sid = answer.body["sid"].as_str().unwrap().to_owned();

    assert_eq!(callback(&a, &status_params(&sid, "sent"), TOKEN).await, 204);
    assert_eq!(stored(&a, &answer).await.status, "sent");
    assert_eq!(
        callback(&b, &status_params(&sid, "delivered"), TOKEN).await,
        204
    );
    // Late arrivals of earlier statuses change nothing.
    for late in ["sent", "queued", "sending"] {
        assert_eq!(callback(&a, &status_params(&sid, late), TOKEN).await, 204);
    }
    // Nor does a second final outcome.
    let mut failed = status_params(&sid, "failed");
    failed.push(("ErrorCode", "30003"));
    assert_eq!(callback(&b, &failed, TOKEN).await, 204);
    let row = stored(&a, &answer).await;
    assert_eq!((row.status.as_str(), row.error_code), ("delivered", None));

    // Racing callbacks on both instances settle on the latest status.
    let answer = send(&a, json!({"to": "+12025550124", "body": "hi"})).await;
    let sid = answer.body["sid"].as_str().unwrap().to_owned();
    let mut undelivered = status_params(&sid, "undelivered");
    undelivered.push(("ErrorCode", "30005"));
    let sequence = ["sending", "sent", "queued", "sent", "sending"];
    let mut posts: Vec<Vec<(&str, &str)>> =
        sequence.iter().map(|s| status_params(&sid, s)).collect();
    posts.insert(2, undelivered);
    let codes = join_all(posts.iter().enumerate().map(|(i, params)| {
        let target = if i % 2 == 0 { &a } else { &b };
        callback(target, params, TOKEN)
    }))
    .await;
    assert!(codes.iter().all(|code| *code == 204), "{codes:?}");
    let row = stored(&a, &answer).await;
    assert_eq!(
        (row.status.as_str(), row.error_code),
        ("undelivered", Some(30005))
    );

    // A message we never sent is acknowledged (Twilio must not retry it) and changes nothing.
    let unknown = "SM00000000000000000000000000000000";
    assert_eq!(
        callback(&a, &status_params(unknown, "delivered"), TOKEN).await,
        204
    );
}

/// A status that moves a message forward carries its own error code, none included: `sent` with
/// 30008 then `delivered` without one leaves `delivered` and no code (the code stayed, and
/// OPERATIONS.md's query, which reads status and code together, showed a delivered text with
/// Twilio's "unknown error"). A status that does not move it (late or repeated) changes
/// nothing, its code included.
#[tokio::test]
async fn sms_a_status_that_moves_forward_replaces_the_error_code_and_a_stale_one_changes_nothing() {
    let (_db, _fake, app) = one_instance!(&[]);
    let answer = send(&app, json!({"to": "+12025550123", "body": "hi"})).await;
    let sid = answer.body["sid"].as_str().unwrap().to_owned();
    let code_of = |status: &'static str, code: Option<&'static str>| {
        let mut params = status_params(&sid, status);
        params.extend(code.map(|code| ("ErrorCode", code)));
        params
    };

    assert_eq!(
        callback(&app, &code_of("sent", Some("30008")), TOKEN).await,
        204
    );
    let row = stored(&app, &answer).await;
    assert_eq!((row.status.as_str(), row.error_code), ("sent", Some(30008)));
    assert_eq!(
        callback(&app, &code_of("delivered", None), TOKEN).await,
        204
    );
    let row = stored(&app, &answer).await;
    assert_eq!((row.status.as_str(), row.error_code), ("delivered", None));

    // Late or repeated statuses with a code of their own leave the row as it is.
    for (status, code) in [
        ("sent", "30008"),
        ("delivered", "30003"),
        ("failed", "30005"),
    ] {
        let late = code_of(status, Some(code));
        assert_eq!(callback(&app, &late, TOKEN).await, 204);
        let row = stored(&app, &answer).await;
        assert_eq!(
            (row.status.as_str(), row.error_code),
            ("delivered", None),
            "{status} {code}"
        );
    }
    // A later status with a code takes it.
    assert_eq!(
        callback(&app, &code_of("read", Some("30008")), TOKEN).await,
        204
    );
    let row = stored(&app, &answer).await;
    assert_eq!((row.status.as_str(), row.error_code), ("read", Some(30008)));
}

/// Twilio's shared-key webhook signatures (a public beta: `X-Twilio-Webhooks-Signature-Settings:
/// key=…,algorithm=HMAC_SHA256`) are not supported: such a callback is refused, and the 400 says
/// why, so an account that turned them on learns it from its callback logs.
#[tokio::test]
async fn sms_a_callback_signed_with_a_shared_key_is_refused_saying_it_is_not_supported() {
    let (_db, _fake, app) = one_instance!(&[]);
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(status_params("SM00000000000000000000000000000001", "sent"))
        .finish();
    // The standard base64 of a 32-byte HMAC-SHA256, as such a callback carries.
    let sha256 = "8Bv3hT0NWkpDmbsCgJ8YbQYoOhXFaTt2U0cE6eXP4jE=";
    for settings in [
        None,
        Some("key=HK0123456789abcdef0123456789abcdef,algorithm=HMAC_SHA256"),
    ] {
        let mut request = app
            .server
            .client
            .post(app.server.url("/functions/v1/twilio-status"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-twilio-signature", sha256)
            .body(body.clone());
        if let Some(settings) = settings {
            request = request.header("x-twilio-webhooks-signature-settings", settings);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 400);
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["code"], "INVALID_SIGNATURE", "{answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(message.contains("HMAC-SHA1"), "{message}");
        assert_eq!(
            message.contains("shared key"),
            settings.is_some(),
            "{settings:?}: {message}"
        );
    }
}

/// A signature made by Twilio's official Python library (`pip install twilio`), or None (after a
/// notice) when it is not installed, except under CI=true where that fails the test.
fn official_signature(token: &str, url: &str, params: &[(&str, &str)]) -> Option<String> {
    const SCRIPT: &str = "import json, sys\n\
try:\n    from twilio.request_validator import RequestValidator\n\
except ImportError:\n    sys.exit(3)\n\
token, url, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])\n\
print(RequestValidator(token).compute_signature(url, params))\n";
    let params: serde_json::Map<String, Value> = params
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
        .collect();
    let output = std::process::Command::new("python3")
        .args(["-c", SCRIPT, token, url, &Value::Object(params).to_string()])
        .output();
    let in_ci = std::env::var("CI").is_ok_and(|value| value == "true");
    match output {
        Ok(out) if out.status.success() => {
            Some(String::from_utf8(out.stdout).unwrap().trim().to_owned())
        }
        Ok(out) if out.status.code() == Some(3) && !in_ci => {
            crate::support::skipped("the Python package twilio is not installed");
            None
        }
        Err(err) if !in_ci => {
            crate::support::skipped(&format!("python3 cannot run ({err})"));
            None
        }
        other => panic!("Twilio's Python library could not sign: {other:?}"),
    }
}

#[tokio::test]
async fn sms_status_signatures_made_by_twilios_library() {
    let (_db, _fake, app) = one_instance!(&[]);
    let answer = send(&app, json!({"to": "+12025550123", "body": "hi"})).await;
    let sid = answer.body["sid"].as_str().unwrap().to_owned();
    let params = status_params(&sid, "delivered");
    let Some(valid) = official_signature(TOKEN, CALLBACK_URL, &params) else {
        return;
    };
    // Sanity: our signer agrees with Twilio's on the same input.
    assert_eq!(sign(TOKEN, CALLBACK_URL, &params), valid);

    // Tampered: signed for "delivered", posted as "failed".
    let tampered = status_params(&sid, "failed");
    assert_eq!(post_callback(&app, &tampered, Some(&valid)).await, 400);
    // Another account's token.
    let wrong = official_signature("0000000000000000000000000000dead", CALLBACK_URL, &params)
        .expect("the library signed a moment ago");
    assert_eq!(post_callback(&app, &params, Some(&wrong)).await, 400);
    // No signature at all.
    assert_eq!(post_callback(&app, &params, None).await, 400);
    assert_eq!(
        stored(&app, &answer).await.status,
        "queued",
        "a refused callback changed the row"
    );

    assert_eq!(post_callback(&app, &params, Some(&valid)).await, 204);
    assert_eq!(stored(&app, &answer).await.status, "delivered");

    // Twilio may sign the URL with its default port written out.
    let with_port = official_signature(
        TOKEN,
        "https://edgegate.example.com:443/functions/v1/twilio-status",
        &status_params(&sid, "read"),
    )
    .unwrap();
    assert_eq!(
        post_callback(&app, &status_params(&sid, "read"), Some(&with_port)).await,
        204
    );
    assert_eq!(stored(&app, &answer).await.status, "read");
}

#[tokio::test]
async fn sms_status_without_public_url_is_not_configured() {
    let (_db, _fake, app) = one_instance!(&[("PUBLIC_URL", "")]);
    let params = status_params("SM00000000000000000000000000000000", "sent");
    let (status, body) = post_callback_answer(&app, &params, Some("x")).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("NOT_CONFIGURED"))
    );
}

#[tokio::test]
async fn sms_check_reaches_the_twilio_account_without_printing_the_token() {
    let (_db, _fake, app) = one_instance!(&[]);
    let lines = edgegate::commands::check(&app.state.config).await;
    let twilio = lines.iter().find(|line| line.item == "twilio").unwrap();
    assert!(twilio.ok, "{}", twilio.detail);
    assert!(twilio.detail.contains("active"), "{}", twilio.detail);

    let wrong_token = "00000000000000000000000000000000";
    let mut config = (*app.state.config).clone();
    config.twilio.auth_token = Some(wrong_token.to_owned().into());
    let lines = edgegate::commands::check(&config).await;
    let twilio = lines.iter().find(|line| line.item == "twilio").unwrap();
    assert!(!twilio.ok);
    assert!(twilio.detail.contains("20003"), "{}", twilio.detail);
    for line in &lines {
        assert!(!line.detail.contains(wrong_token) && !line.detail.contains(TOKEN));
    }
}

#[tokio::test]
async fn sms_store_windows_slide_with_the_injected_clock() {
    use edgegate::store::{NewSms, Reservation, SmsLimits};
    let db = test_db!();
    let store = db.store().await;
    let limits = SmsLimits {
        per_recipient_per_hour: 2,
        per_minute: 3,
    };
    let hour = 3_600_000;
    let reserve = |id: &'static str, to: &'static str, at: i64| {
        let store = store.clone();
        async move {
            let new = NewSms {
                id,
                idempotency_key: None,
                to_number: to,
                body: "hi",
                status: "accepted",
                replayed_error_codes: &[],
            };
            store.reserve_sms(new, limits, || at).await.unwrap()
        }
    };
    let t0 = 1_000_000_000;
    assert!(matches!(
        reserve("a", "+12025550101", t0).await,
        Reservation::Created(_)
    ));
    assert!(matches!(
        reserve("b", "+12025550101", t0 + 1_000).await,
        Reservation::Created(_)
    ));
    // Full for this recipient until the oldest of its two rows is an hour old.
    assert_eq!(
        reserve("c", "+12025550101", t0 + 2_000).await,
        Reservation::Limited {
            retry_after_ms: hour - 2_000
        }
    );
    assert_eq!(
        reserve("c", "+12025550101", t0 + hour - 1).await,
        Reservation::Limited { retry_after_ms: 1 }
    );
    assert!(matches!(
        reserve("c", "+12025550101", t0 + hour).await,
        Reservation::Created(_)
    ));

    // Globally: three in a minute, whoever they go to.
    let t1 = t0 + 10 * hour;
    for (id, to) in [
        ("d", "+12025550102"),
        ("e", "+12025550103"),
        ("f", "+12025550104"),
    ] {
        assert!(matches!(reserve(id, to, t1).await, Reservation::Created(_)));
    }
    assert_eq!(
        reserve("g", "+12025550105", t1 + 59_000).await,
        Reservation::Limited {
            retry_after_ms: 1_000
        }
    );
    assert!(matches!(
        reserve("g", "+12025550105", t1 + 60_000).await,
        Reservation::Created(_)
    ));
}

/// The id of the message the last audited send was about.
async fn last_audited_sms_id(instance: &Instance) -> String {
    let audit = instance.state.store.recent_audit(1).await.unwrap();
    let detail: Value = serde_json::from_str(audit[0].detail.as_deref().expect("detail")).unwrap();
    detail["sms_id"].as_str().expect("an sms_id").to_owned()
}

/// A send Twilio certainly never took (it could not be reached, or it throttled every attempt)
/// is sent by a retry with the same key, under the same row; one Twilio refused is answered as
/// the first time, and Twilio is not asked again.
#[tokio::test]
async fn sms_a_retry_after_a_certain_failure_sends_again_under_the_same_key() {
    let db = test_db!();
    // A port that was free a moment ago: nothing listens there.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let fake = FakeTwilio::start(ACCOUNT, TOKEN).await;
    // Two instances on one database: one while Twilio is unreachable, one once it is back.
    let down = instance(&db, Some(&fake), &[("TWILIO_API_BASE", &closed)]).await;
    let up = instance(&db, Some(&fake), &[]).await;

    let message = json!({"to": "+12025550123", "body": "hi", "idempotency_key": "outage-1"});
    assert_error(
        &send(&down, message.clone()).await,
        502,
        "UPSTREAM_UNAVAILABLE",
    );
    let first_id = last_audited_sms_id(&down).await;
    let retry = send(&up, message.clone()).await;
    assert_eq!(retry.status, 202, "{}", retry.body);
    assert!(retry.body["sid"].is_string(), "{}", retry.body);
    assert_eq!(retry.body["status"], "queued", "{}", retry.body);
    assert_eq!(retry.body["id"], first_id.as_str(), "not the same row");
    assert_eq!(fake.requests().len(), 1);
    let row = stored(&up, &retry).await;
    assert_eq!((row.status.as_str(), row.error_message), ("queued", None));
    assert_eq!(app_audit_outcome(&up).await, "sent");
    // Sent now: a further retry replays it.
    let again = send(&down, message).await;
    assert_eq!((again.status, &again.body), (202, &retry.body));
    assert_eq!(fake.requests().len(), 1);

    // Throttled on every attempt, then taken on the retry.
    fake.script([Reply::throttled(), Reply::throttled(), Reply::throttled()]);
    let message = json!({"to": "+12025550124", "body": "hi", "idempotency_key": "throttled-1"});
    assert_error(
        &send(&up, message.clone()).await,
        502,
        "UPSTREAM_UNAVAILABLE",
    );
    assert_eq!(fake.requests().len(), 4);
    let retry = send(&up, message).await;
    assert_eq!(retry.status, 202, "{}", retry.body);
    assert!(retry.body["sid"].is_string(), "{}", retry.body);
    assert_eq!(fake.requests().len(), 5);

    // Refusals of the message would only be refused again: the retry gets the first answer,
    // Twilio no call (a refusal not about the message is sent again: see
    // `sms_a_refusal_not_about_the_message_is_sent_by_a_retry_with_the_same_key`).
    let refusals = [
        (
            21211,
            "The 'To' number +12025550125 is not a valid phone number.",
        ),
        (
            21617,
            "The concatenated message body exceeds the 1600 character limit",
        ),
    ];
    for (i, (code, text)) in refusals.into_iter().enumerate() {
        fake.script([Reply::Error {
            http: 400,
            code,
            message: text,
        }]);
        let key = format!("refused-{i}");
        let message = json!({"to": "+12025550125", "body": "hi", "idempotency_key": key});
        let first = send(&up, message.clone()).await;
        assert_error(&first, 422, "VALIDATION_FAILED");
        let requests = fake.requests().len();
        let retry = send(&down, message).await;
        assert_eq!((retry.status, &retry.body), (first.status, &first.body));
        assert_eq!(
            fake.requests().len(),
            requests,
            "a refused message was sent again"
        );
    }
}

/// A refusal that is not about the caller's message (Twilio refused our credentials, our
/// account or our sender, or its queue was full) created nothing at Twilio: a retry with the
/// same key sends, once that is mended, instead of replaying the refusal for ever.
#[tokio::test]
async fn sms_a_refusal_not_about_the_message_is_sent_by_a_retry_with_the_same_key() {
    let (_db, fake, app) = one_instance!(&[]);
    let refusals = [
        (401, 20003, "Authenticate"),
        (404, 20404, "The requested resource was not found"),
        (
            400,
            21606,
            "The 'From' phone number provided is not a valid message-capable Twilio phone number.",
        ),
        (400, 21212, "The 'From' number is not a valid phone number."),
        (
            400,
            21611,
            "This 'From' number has exceeded the maximum number of queued messages",
        ),
    ];
    for (i, (http, code, text)) in refusals.into_iter().enumerate() {
        fake.script([Reply::Error {
            http,
            code,
            message: text,
        }]);
        let requests = fake.requests().len();
        let message =
            json!({"to": "+12025550123", "body": "hi", "idempotency_key": format!("ours-{i}")});
        let first = tokio::time::timeout(Duration::from_secs(20), send(&app, message.clone()))
            .await
            .expect("the send hung");
        assert_error(&first, 502, "UPSTREAM_UNAVAILABLE");
        let first_id = last_audited_sms_id(&app).await;
        let retry = tokio::time::timeout(Duration::from_secs(20), send(&app, message))
            .await
            .expect("the retry hung");
        assert_eq!(retry.status, 202, "{code}: {}", retry.body);
        assert!(retry.body["sid"].is_string(), "{}", retry.body);
        assert_eq!(retry.body["id"], first_id.as_str(), "not the same row");
        assert_eq!(fake.requests().len(), requests + 2, "{code}");
        let row = stored(&app, &retry).await;
        assert_eq!((row.status.as_str(), row.error_code), ("queued", None));
    }
}

async fn app_audit_outcome(instance: &Instance) -> String {
    instance.state.store.recent_audit(1).await.unwrap()[0]
        .outcome
        .clone()
}

/// A send ends within its budget, under the route's timeout: otherwise the caller gets 504 with
/// no id while the send goes on, and a retry texts the person twice. Here one attempt of 1.5 s
/// fits a 4.4 s budget with 3 s calls, and a second never can (1.5 s + 3 s > 4.4 s): it is not
/// started. The slack is real on a loaded machine: the first call starts if the request is
/// reserved within 1.4 s, and Twilio's answer comes 1.5 s before the call's timeout (a call cut
/// off by its timeout would leave the row `unknown`, not `failed`).
#[tokio::test]
async fn sms_no_attempt_starts_that_could_outlast_the_send_budget() {
    let db = test_db!();
    let fake = FakeTwilio::start(ACCOUNT, TOKEN).await;
    let app = instance_with(&db, Some(&fake), &[], |config| {
        config.twilio.request_timeout = Duration::from_secs(3);
        config.twilio.send_budget = Duration::from_millis(4_400);
    })
    .await;
    fake.set_latency(Duration::from_millis(1_500));
    fake.script([Reply::throttled(), Reply::throttled(), Reply::throttled()]);
    let answer = expect_upstream_failure(&app, "+12025550123", "failed").await;
    assert_eq!(
        fake.requests().len(),
        1,
        "an attempt was started that could end past the budget"
    );
    let message = answer.body["message"].as_str().unwrap();
    assert!(message.contains("1 attempt"), "{message}");
}

/// The send's budget counts from the request's arrival, not from the send's start: time spent
/// before it (a body slow to come, a credential check that fetched keys) leaves less to Twilio,
/// so the answer still comes before the route's 30 s. Here the body takes 1.5 s to arrive and a
/// call may take 2 s: no call fits a 3 s budget, and none is made (one was, when the budget
/// counted from the send's start, and could end past it: 2 s fits 3 s with 1 s to spare).
#[tokio::test]
async fn sms_the_send_budget_counts_from_the_requests_arrival() {
    let db = test_db!();
    let fake = FakeTwilio::start(ACCOUNT, TOKEN).await;
    let app = instance_with(&db, Some(&fake), &[], |config| {
        config.twilio.request_timeout = Duration::from_secs(2);
        config.twilio.send_budget = Duration::from_secs(3);
    })
    .await;
    let body = json!({"to": "+12025550123", "body": "hi"}).to_string();
    let (head, tail) = body.split_at(10);
    let chunks = [
        (Duration::ZERO, head.to_owned()),
        (Duration::from_millis(1_500), tail.to_owned()),
    ];
    let slow = futures_util::stream::iter(chunks).then(|(pause, chunk)| async move {
        tokio::time::sleep(pause).await;
        Ok::<_, std::io::Error>(chunk)
    });
    let response = app
        .server
        .client
        .post(app.server.url("/functions/v1/send-sms"))
        .header("apikey", SECRET_KEY)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(slow))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        fake.requests().len(),
        0,
        "a call that could end past the budget"
    );
    assert_eq!(status, 502, "{answer}");
    assert_eq!(answer["code"], "UPSTREAM_UNAVAILABLE", "{answer}");
}

/// A redirect from Twilio's base is not followed: a 307 re-posted the message (its number and
/// text) to wherever it pointed. The send fails as refused, and the other host sees nothing.
#[tokio::test]
async fn sms_a_redirect_from_twilio_is_not_followed() {
    let (_db, fake, app) = one_instance!(&[]);
    let elsewhere = FakeTwilio::start(ACCOUNT, TOKEN).await;
    let path = format!("/2010-04-01/Accounts/{ACCOUNT}/Messages.json");
    let target = format!("{}{path}", elsewhere.base.trim_end_matches('/'));
    fake.script([Reply::RedirectTo(target.replace("127.0.0.1", "localhost"))]);
    let answer = send(&app, json!({"to": "+12025550123", "body": "hi"})).await;
    assert_ne!(answer.status, 202, "{}", answer.body);
    assert_eq!(elsewhere.requests().len(), 0, "the redirect was followed");
    assert_eq!(fake.requests().len(), 1);
}

/// Sends Twilio never took leave the limits as they were: an outage must not rate-limit anyone.
#[tokio::test]
async fn sms_sends_twilio_never_took_do_not_count_against_the_limits() {
    let limits = [
        ("SMS_MAX_PER_RECIPIENT_PER_HOUR", "2"),
        ("SMS_MAX_PER_MINUTE", "3"),
    ];
    let (_db, fake, app) = one_instance!(&limits);
    for _ in 0..4 {
        fake.script([Reply::throttled(), Reply::throttled(), Reply::throttled()]);
        expect_upstream_failure(&app, "+12025550123", "failed").await;
    }
    let to = |number: &str| json!({"to": number, "body": "hi"});
    // Both windows still hold their whole limit, and count what was sent.
    assert_eq!(send(&app, to("+12025550123")).await.status, 202);
    assert_eq!(send(&app, to("+12025550123")).await.status, 202);
    assert_error(&send(&app, to("+12025550123")).await, 429, "RATE_LIMITED");
    assert_eq!(send(&app, to("+12025550124")).await.status, 202);
    assert_error(&send(&app, to("+12025550125")).await, 429, "RATE_LIMITED");
    assert_eq!(fake.requests().len(), 12 + 3);
}

/// A signed status callback that cannot be stored because the database is away is 503
/// `NOT_READY`, as `send-sms` answers then, not a 500.
#[tokio::test]
async fn sms_status_while_the_database_is_unavailable_is_503_not_ready() {
    let (_db, _fake, app) = one_instance!(&[]);
    // A closed pool is how sqlx reports a database it cannot reach any more.
    app.state.store.close().await;
    let params = status_params("SM0123456789abcdef0123456789abcdef", "delivered");
    let signature = sign(TOKEN, CALLBACK_URL, &params);
    let (status, body) = post_callback_answer(&app, &params, Some(&signature)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("NOT_READY")),
        "{body}"
    );
}

/// A stop waits for a send under way (its caller already cut off by the drain) before it closes
/// the database, so Twilio's answer is stored and the row does not end up `accepted`/`unknown`.
#[tokio::test]
async fn sms_a_stop_waits_for_a_send_under_way_before_closing_the_database() {
    let db = test_db!();
    // Twilio answers after the drain (0 s here) is over, well within the 3 s after it.
    let stop = stop_while_twilio_has_a_send(&db, Duration::from_secs(1)).await;
    // The drain (0 s) cut the caller off: not a clean stop, though the send was recorded.
    assert_eq!(
        stop.error,
        "the drain's 0 s ran out: 1 request still in flight was dropped"
    );
    let row = stop.row(&db).await;
    assert_eq!(row.status, "queued", "{row:?}");
    assert!(row.twilio_sid.is_some(), "{row:?}");
}

/// A send still waiting for Twilio when the steps after the drain run out of time (3 s after
/// the drain's limit) is left unrecorded, its row `accepted`: the stop says so, as a failure,
/// with the request the drain dropped. It returned `Ok` (the binary exited 0 after `edgegate
/// stopped`).
#[tokio::test]
async fn sms_a_stop_that_cuts_a_send_short_is_a_failure_saying_so() {
    let db = test_db!();
    // Past the drain (0 s) and the 3 s after it.
    let stop = stop_while_twilio_has_a_send(&db, Duration::from_secs(8)).await;
    assert_eq!(
        stop.error,
        "the drain's 0 s ran out: 1 request still in flight was dropped; the steps after the \
         drain ran past its limit plus 3 s and were stopped unfinished (the SMS sends under \
         way, the database's close; the key-usage counts were written)"
    );
    assert!(stop.caller_cut_off, "the caller was cut off");
    let row = stop.row(&db).await;
    assert_eq!(row.status, "accepted", "{row:?}");
}

/// What a stop made while Twilio had a send did ([`stop_while_twilio_has_a_send`]).
struct StopDuringSend {
    /// The stop's error: it cannot be clean, its drain (0 s) cut the caller off.
    error: String,
    /// Whether the caller got no answer.
    caller_cut_off: bool,
    /// The URL edgegate gave Twilio for the message's status (`…?id=<id>`).
    callback: String,
    /// Twilio, kept up until the test ends: the send the stop cut off still runs in the test's
    /// runtime (a process would have exited), and a Twilio gone would end it as `unknown`.
    _twilio: FakeTwilio,
}

impl StopDuringSend {
    /// The message's row as the stop left it.
    async fn row(&self, db: &TestDb) -> edgegate::store::SmsMessage {
        let id = self.callback.split_once("?id=").unwrap().1;
        db.store().await.sms_message(id).await.unwrap().unwrap()
    }
}

/// The whole application on `db` (drain 0 s) sending one SMS through a Twilio that answers
/// after `latency`, stopped once Twilio has the send.
async fn stop_while_twilio_has_a_send(db: &TestDb, latency: Duration) -> StopDuringSend {
    let fake = FakeTwilio::start(ACCOUNT, TOKEN).await;
    fake.set_latency(latency);
    let secret_keys = format!(r#"{{"backend":"{SECRET_KEY}"}}"#);
    let (mut server, _state) = crate::support::spawn_app(
        db,
        &[
            ("SUPABASE_SECRET_KEYS", &secret_keys),
            ("TWILIO_ACCOUNT_SID", ACCOUNT),
            ("TWILIO_AUTH_TOKEN", TOKEN),
            ("TWILIO_API_BASE", &fake.base),
            ("TWILIO_FROM_NUMBER", FROM),
            ("PUBLIC_URL", PUBLIC_URL),
            ("SHUTDOWN_DRAIN_SECONDS", "0"),
        ],
    )
    .await;
    let sending = tokio::spawn({
        let (client, url) = (server.client.clone(), server.url("/functions/v1/send-sms"));
        async move {
            client
                .post(url)
                .header("apikey", SECRET_KEY)
                .json(&json!({"to": "+12025550123", "body": "hi"}))
                .send()
                .await
        }
    });
    while fake.requests().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.begin_shutdown();
    let stopped = (&mut server.task).await.unwrap();
    let error = stopped.expect_err("a request was dropped").to_string();
    let caller_cut_off = sending.await.unwrap().is_err();
    let callback = fake.requests()[0]
        .field("StatusCallback")
        .unwrap()
        .to_owned();
    StopDuringSend {
        error,
        caller_cut_off,
        callback,
        _twilio: fake,
    }
}

/// A holder of the reservation lock that stops talking (its machine gone without a FIN) must not
/// make every send on every instance wait, each holding a pool connection, until TCP gives up on
/// it: a send waits a few seconds at most, then answers 503 `NOT_READY` as when the database is
/// away, with nothing reserved and nothing sent.
#[tokio::test]
async fn sms_a_reservation_lock_held_elsewhere_answers_503_not_ready_instead_of_waiting() {
    use futures_util::FutureExt as _;
    // The lock is the database's, not the schema's: this test's database is its own, so the
    // sends of the tests beside it do not queue behind the lock held here.
    let Some(db) = TestDb::postgres_database().await else {
        return; // Only PostgreSQL has the lock: the suite on PostgreSQL runs this test.
    };
    let outcome = std::panic::AssertUnwindSafe(send_behind_a_held_reservation_lock(&db))
        .catch_unwind()
        .await;
    db.drop_database().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn send_behind_a_held_reservation_lock(db: &TestDb) {
    use sqlx::Connection as _;
    let fake = FakeTwilio::start(ACCOUNT, TOKEN).await;
    let app = instance(db, Some(&fake), &[]).await;
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    // SMS_RESERVATION_LOCK in src/store/sms.rs ("edgesms").
    sqlx::query("SELECT pg_advisory_xact_lock(28539367894248819)")
        .execute(&mut holder)
        .await
        .unwrap();

    // Well past the lock wait, short of the route's 30 s: unbounded, the send would answer
    // 504 at 30 s, or only once the holder lets go.
    let answer = tokio::time::timeout(
        Duration::from_secs(25),
        send(&app, json!({"to": "+12025550123", "body": "hi"})),
    )
    .await
    .expect("the send waited for the lock instead of answering");
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    assert_error(&answer, 503, "NOT_READY");
    assert!(fake.requests().is_empty(), "a text was sent");
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sms_messages")
        .fetch_one(&mut holder)
        .await
        .unwrap();
    assert_eq!(rows, 0, "a send was reserved");

    // The lock free again, the same send goes through.
    let answer = send(&app, json!({"to": "+12025550123", "body": "hi"})).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
}

fn twilio_api(app: &Instance) -> edgegate::twilio::client::TwilioApi {
    edgegate::twilio::client::TwilioApi::from_config(
        &app.state.twilio_http,
        &app.state.config.twilio,
    )
    .expect("Twilio configured")
}

/// Twilio does not retry a status callback, and the final status is usually the last one: a
/// callback answered 503 during a database outage would leave the row `queued` or `sent` for
/// ever. The recovery pass asks Twilio (Fetch Message) for a message left unsettled past
/// `SETTLE`, and stores what it says through the callbacks' rank rule, Twilio's error code and
/// description with it.
#[tokio::test]
async fn sms_recovery_fetches_the_final_status_whose_callback_was_lost() {
    use edgegate::twilio::recover::{SETTLE, recover_statuses};
    let (_db, fake, app) = one_instance!(&[]);
    let delivered = send(&app, json!({"to": "+12025550123", "body": "hi"})).await;
    assert_eq!(delivered.status, 202, "{}", delivered.body);
    let lost = send(&app, json!({"to": "+12025550124", "body": "hi"})).await;
    assert_eq!(lost.status, 202, "{}", lost.body);
    let sid = delivered.body["sid"].as_str().unwrap().to_owned();
    let lost_sid = lost.body["sid"].as_str().unwrap().to_owned();
    fake.set_status(&sid, "delivered", None);
    fake.set_status_described(
        &lost_sid,
        "undelivered",
        Some(30003),
        Some("Unreachable destination handset"),
    );
    let (store, api, metrics) = (&app.state.store, twilio_api(&app), &app.state.sms_metrics);
    let clock = edgegate::clock::Clock::manual();

    // Too soon: its callbacks may still come.
    let early = recover_statuses(store, &api, &clock, metrics)
        .await
        .unwrap();
    assert_eq!(early.fetched, 0);
    assert!(fake.fetches().is_empty());

    clock.advance(SETTLE + Duration::from_secs(1));
    let pass = recover_statuses(store, &api, &clock, metrics)
        .await
        .unwrap();
    assert_eq!((pass.fetched, pass.applied), (2, 2), "{pass:?}");
    let mut fetched = fake.fetches();
    fetched.sort();
    let mut expected = vec![sid.clone(), lost_sid.clone()];
    expected.sort();
    assert_eq!(fetched, expected);
    let row = stored(&app, &delivered).await;
    assert_eq!(
        (row.status.as_str(), row.error_code, row.error_message),
        ("delivered", None, None)
    );
    // Twilio's description with its code, as the message resource gives them.
    let row = stored(&app, &lost).await;
    assert_eq!(
        (
            row.status.as_str(),
            row.error_code,
            row.error_message.as_deref()
        ),
        (
            "undelivered",
            Some(30003),
            Some("Unreachable destination handset")
        )
    );
    // Counted as recovered, not as callbacks.
    let text = app.server.get("/metrics").await.text().await.unwrap();
    for line in [
        r#"edgegate_sms_status_total{status="delivered",source="recovery"} 1"#,
        r#"edgegate_sms_status_total{status="undelivered",source="recovery"} 1"#,
        r#"edgegate_sms_status_total{status="delivered",source="callback"} 0"#,
        r#"edgegate_sms_sent_total{outcome="accepted"} 2"#,
    ] {
        assert!(text.lines().any(|l| l == line), "no {line} in:\n{text}");
    }

    // Settled: never asked again.
    clock.advance(Duration::from_secs(24 * 3600));
    let later = recover_statuses(store, &api, &clock, metrics)
        .await
        .unwrap();
    assert_eq!(later.fetched, 0);
    assert_eq!(fake.fetches().len(), 2);
}

/// Twilio's description is text from outside, stored as it came: a NUL in it made PostgreSQL
/// refuse the UPDATE, so the message's status never recovered (the pass warned at every check
/// for 72 h), and any length or terminal escape reached the row. It is stored as one line (control
/// characters a space), trimmed and cut to 256 characters; one left blank is none.
#[tokio::test]
async fn sms_recovery_stores_twilios_description_as_one_short_printable_line() {
    use edgegate::twilio::recover::{SETTLE, recover_statuses};
    let (_db, fake, app) = one_instance!(&[]);
    let odd = send(&app, json!({"to": "+12025550123", "body": "hi"})).await;
    assert_eq!(odd.status, 202, "{}", odd.body);
    let blank = send(&app, json!({"to": "+12025550124", "body": "hi"})).await;
    assert_eq!(blank.status, 202, "{}", blank.body);
    // A NUL, an escape sequence, a line break, then 10 KB (5,000 two-byte characters).
    let long = "é".repeat(5_000);
    let description = format!(" Unreachable\u{0}handset\u{1b}[2J\r\n{long}");
    fake.set_status_described(
        odd.body["sid"].as_str().unwrap(),
        "undelivered",
        Some(30003),
        Some(&description),
    );
    fake.set_status_described(
        blank.body["sid"].as_str().unwrap(),
        "failed",
        Some(30008),
        Some("\u{0}\u{1b}\t \u{7f}"),
    );
    let (store, api, metrics) = (&app.state.store, twilio_api(&app), &app.state.sms_metrics);
    let clock = edgegate::clock::Clock::manual();
    clock.advance(SETTLE + Duration::from_secs(1));
    let pass = recover_statuses(store, &api, &clock, metrics)
        .await
        .unwrap();
    assert_eq!((pass.fetched, pass.applied), (2, 2), "{pass:?}");

    let row = stored(&app, &odd).await;
    assert_eq!(
        (row.status.as_str(), row.error_code),
        ("undelivered", Some(30003))
    );
    let stored_text = row.error_message.expect("a description");
    // One line of words, its control characters a space; cut to 256 characters, the last "…".
    let expected = format!("Unreachable handset [2J {}…", "é".repeat(231));
    assert_eq!(expected.chars().count(), 256);
    assert_eq!(stored_text, expected);
    let row = stored(&app, &blank).await;
    assert_eq!(
        (row.status.as_str(), row.error_code, row.error_message),
        ("failed", Some(30008), None)
    );
}

/// A description the recovery pass stored is the status's own: a later status applied by a
/// callback (which carries none) clears it, with the code as the callbacks' rule has it (none,
/// or the callback's own).
#[tokio::test]
async fn a_description_recovery_stored_is_cleared_by_a_later_status_callback() {
    use edgegate::twilio::recover::{SETTLE, recover_statuses};
    let (_db, fake, app) = one_instance!(&[]);
    let delivered = send(&app, json!({"to": "+12025550123", "body": "hi"})).await;
    assert_eq!(delivered.status, 202, "{}", delivered.body);
    let undelivered = send(&app, json!({"to": "+12025550124", "body": "hi"})).await;
    assert_eq!(undelivered.status, 202, "{}", undelivered.body);
    let sids = [&delivered, &undelivered].map(|a| a.body["sid"].as_str().unwrap().to_owned());
    for sid in &sids {
        fake.set_status_described(sid, "sent", Some(30008), Some("Unknown error"));
    }
    let (store, api, metrics) = (&app.state.store, twilio_api(&app), &app.state.sms_metrics);
    let clock = edgegate::clock::Clock::manual();
    clock.advance(SETTLE + Duration::from_secs(1));
    let pass = recover_statuses(store, &api, &clock, metrics)
        .await
        .unwrap();
    assert_eq!((pass.fetched, pass.applied), (2, 2), "{pass:?}");
    for answer in [&delivered, &undelivered] {
        let row = stored(&app, answer).await;
        assert_eq!(
            (
                row.status.as_str(),
                row.error_code,
                row.error_message.as_deref()
            ),
            ("sent", Some(30008), Some("Unknown error"))
        );
    }

    let ok = callback(&app, &status_params(&sids[0], "delivered"), TOKEN).await;
    assert_eq!(ok, 204);
    let mut failed = status_params(&sids[1], "undelivered");
    failed.push(("ErrorCode", "30005"));
    assert_eq!(callback(&app, &failed, TOKEN).await, 204);
    let row = stored(&app, &delivered).await;
    assert_eq!(
        (row.status.as_str(), row.error_code, row.error_message),
        ("delivered", None, None)
    );
    let row = stored(&app, &undelivered).await;
    assert_eq!(
        (row.status.as_str(), row.error_code, row.error_message),
        ("undelivered", Some(30005), None)
    );
}

/// One pass fetches at most `BATCH` rows, oldest change first; a row just checked waits at
/// least as long as it had been unchanged before that check (so a message that stays `sent`
/// is asked about a few times, not every pass); a status lower than the stored one, a
/// Twilio error or a message Twilio does not know changes nothing and stops nothing; final
/// rows and rows unchanged for longer than `GIVE_UP` are never fetched.
#[tokio::test]
async fn sms_recovery_is_bounded_backs_off_and_never_regresses() {
    use edgegate::store::{NewSms, SendResult, SmsLimits};
    use edgegate::twilio::recover::{BATCH, GIVE_UP, SETTLE, recover_statuses};
    let (_db, fake, app) = one_instance!(&[]);
    let (store, api, metrics) = (&app.state.store, twilio_api(&app), &app.state.sms_metrics);
    let clock = edgegate::clock::Clock::manual();
    let now = clock.now_ms();
    let hour = 3_600_000;
    let limits = SmsLimits {
        per_recipient_per_hour: 1_000,
        per_minute: 1_000,
    };
    let row = |id: String, sid: String, status: &'static str, at: i64| async move {
        let new = NewSms {
            id: &id,
            idempotency_key: None,
            to_number: "+12025550123",
            body: "hi",
            status: "accepted",
            replayed_error_codes: &[],
        };
        store.reserve_sms(new, limits, || at - 1).await.unwrap();
        let result = SendResult {
            status,
            twilio_sid: Some(&sid),
            error_code: None,
            error_message: None,
        };
        store
            .record_sms_send((id.as_str(), 1), result, at)
            .await
            .unwrap();
    };
    // Reserved in the order of their times: one reserved earlier than the newest row by more
    // than an hour reads as a clock set back, and restamps the rows ahead of it.
    let old = GIVE_UP.as_millis() as i64 + hour;
    row("old".into(), "SMold".into(), "sent", now - old).await;
    fake.set_status("SMold", "delivered", None);
    let count = BATCH + 5;
    let sids: Vec<String> = (0..count).map(|i| format!("SM{i:032}")).collect();
    for (i, sid) in sids.iter().enumerate() {
        row(format!("r{i}"), sid.clone(), "sent", now - hour + i as i64).await;
        fake.set_status(sid, "delivered", None);
    }
    // r0: Twilio fails; r1: Twilio does not know it; r2: Twilio reports a lower status.
    fake.fail_fetch(&sids[0], 500);
    fake.set_status(&sids[1], "delivered", None);
    fake.fail_fetch(&sids[1], 404);
    fake.set_status(&sids[2], "queued", None);
    row("final".into(), "SMfinal".into(), "delivered", now - hour).await;
    fake.set_status("SMfinal", "sent", None);

    let first = recover_statuses(store, &api, &clock, metrics)
        .await
        .unwrap();
    assert_eq!(first.fetched, BATCH, "{first:?}");
    assert_eq!(first.applied, BATCH - 3, "{first:?}");
    assert_eq!(fake.fetches(), sids[..BATCH], "oldest first, at most BATCH");
    let status =
        |id: &'static str| async move { store.sms_message(id).await.unwrap().unwrap().status };
    assert_eq!(status("r0").await, "sent");
    assert_eq!(status("r1").await, "sent");
    assert_eq!(
        status("r2").await,
        "sent",
        "a lower status never replaces a higher one"
    );
    assert_eq!(status("r3").await, "delivered");
    assert_eq!(status("r50").await, "sent");

    // The next pass takes the rest, not the rows just checked.
    let second = recover_statuses(store, &api, &clock, metrics)
        .await
        .unwrap();
    assert_eq!((second.fetched, second.applied), (5, 5), "{second:?}");
    assert_eq!(fake.fetches()[BATCH..], sids[BATCH..]);
    assert_eq!(status("r54").await, "delivered");

    // r0 to r2 had been unchanged for an hour when checked: not again within the hour.
    clock.advance(SETTLE + Duration::from_secs(1));
    let third = recover_statuses(store, &api, &clock, metrics)
        .await
        .unwrap();
    assert_eq!(third.fetched, 0, "{third:?}");
    clock.advance(Duration::from_secs(3600));
    let fourth = recover_statuses(store, &api, &clock, metrics)
        .await
        .unwrap();
    assert_eq!(fourth.fetched, 3, "{fourth:?}");
    assert_eq!(fake.fetches()[count..], sids[..3]);

    assert!(
        !fake
            .fetches()
            .iter()
            .any(|sid| sid == "SMfinal" || sid == "SMold"),
        "a final row or one past GIVE_UP was fetched"
    );
    assert_eq!(status("final").await, "delivered");
    assert_eq!(status("old").await, "sent");
}

/// A message Twilio took while the wall clock ran a day ahead is created and updated "tomorrow".
/// Once the clock is set back, the next send (or the sweep) restamps it an hour before now, its
/// `updated_at` too: the recovery pass asks Twilio about it at once. Had only `created_at`
/// moved, the row would not read as unchanged for `SETTLE` until a day later, and a status
/// callback lost meanwhile would have left it `sent` for that day.
#[tokio::test]
async fn sms_recovery_asks_at_once_about_a_row_updated_a_day_ahead_once_it_is_restamped() {
    use edgegate::twilio::recover::recover_statuses;
    let db = test_db!();
    let fake = FakeTwilio::start(ACCOUNT, TOKEN).await;
    let clock = edgegate::clock::Clock::manual();
    let app = instance_on_clock(&db, &fake, &[], clock.clone()).await;
    let (store, api, metrics) = (&app.state.store, twilio_api(&app), &app.state.sms_metrics);
    let (now, hour, day) = (clock.now_ms(), 3_600_000, 86_400_000);
    reserve_at(store, "ahead", now + day - 1).await;
    record_sent_at(store, "ahead", "SMahead", now + day).await;
    fake.set_status("SMahead", "delivered", None);
    let early = recover_statuses(store, &api, &clock, metrics)
        .await
        .unwrap();
    assert_eq!(early.fetched, 0, "changed tomorrow: not settled yet");

    let sent = send(&app, json!({"to": "+12025550124", "body": "hi"})).await;
    assert_eq!(sent.status, 202, "{}", sent.body);
    let restamped = store.sms_message("ahead").await.unwrap().unwrap();
    assert_eq!(restamped.created_at_ms, now - hour);
    let pass = recover_statuses(store, &api, &clock, metrics)
        .await
        .unwrap();
    assert_eq!((pass.fetched, pass.applied), (1, 1), "{pass:?}");
    assert_eq!(fake.fetches(), ["SMahead"]);
    let row = store.sms_message("ahead").await.unwrap().unwrap();
    assert_eq!(row.status, "delivered");
}

/// Sends queued behind a reservation lock held elsewhere must not take the whole pool (ten
/// connections) while they wait: a signed Stripe webhook arriving meanwhile still gets a
/// connection and is applied at once.
#[tokio::test]
async fn sms_sends_waiting_for_the_reservation_lock_leave_the_pool_to_webhooks() {
    use crate::stripe::{in_ci, sdk_available, stripe_sdk};
    use futures_util::FutureExt as _;
    stripe_sdk!();
    let fixtures = crate::stripe_fixtures!();
    // Its own database: the lock is the database's (see the test above).
    let Some(db) = TestDb::postgres_database().await else {
        return; // Only PostgreSQL has the lock: the suite on PostgreSQL runs this test.
    };
    let outcome =
        std::panic::AssertUnwindSafe(webhook_beside_sends_behind_a_held_lock(&db, &fixtures))
            .catch_unwind()
            .await;
    db.drop_database().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn webhook_beside_sends_behind_a_held_lock(db: &TestDb, fixtures: &Value) {
    use sqlx::Connection as _;
    let fake = FakeTwilio::start(ACCOUNT, TOKEN).await;
    let app = instance(
        db,
        Some(&fake),
        &[("STRIPE_WEBHOOK_SECRET", crate::stripe::WHSEC)],
    )
    .await;
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    // SMS_RESERVATION_LOCK in src/store/sms.rs ("edgesms").
    sqlx::query("SELECT pg_advisory_xact_lock(28539367894248819)")
        .execute(&mut holder)
        .await
        .unwrap();

    let sends = (0..10).map(|i| {
        let to = format!("+120255501{i:02}");
        let app = &app;
        async move { send(app, json!({"to": to, "body": "hi"})).await }
    });
    let sends = join_all(sends);
    let webhook = async {
        // Every send has reached the lock or the queue before it.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let body = crate::stripe::product_event(
            fixtures,
            "evt_sms_pool",
            "product.created",
            crate::stripe::now() - 10,
            1,
            "Beside the sends",
        );
        let started = std::time::Instant::now();
        let answer = crate::stripe::deliver_signed(&app.server, &body).await;
        (answer, started.elapsed())
    };
    let (answers, ((status, body), took)) = tokio::join!(sends, webhook);
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    assert_eq!(status, 200, "{body}");
    // Well short of the lock's 5 s wait, which is what a pool held by the sends took.
    assert!(took < Duration::from_secs(3), "the webhook waited {took:?}");
    for answer in &answers {
        assert_error(answer, 503, "NOT_READY");
    }
    assert!(fake.requests().is_empty(), "a text was sent");
}
