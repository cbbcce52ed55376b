//! Crash safety: real edgegate processes killed with SIGKILL in the middle of a webhook apply, a
//! catalogue sync page and an SMS send, then restarted on the same database. Nothing may be
//! half-applied: redelivered events are applied once, a rerun sync converges, and an SMS Twilio
//! may already have is marked `unknown` and never sent again.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fake_stripe::{self, FakeStripe, Fault};
use crate::fake_twilio::FakeTwilio;
use crate::outage::{
    ACCOUNT, NO_ANSWER, SECRET_KEY, TOKEN, Traffic, WHSEC, assert_each_event_applied_once, deliver,
    product_event, redeliver, scalar_i64, text_pairs,
};
use crate::process::{Server, free_port, spawn_server, wait_exit, wait_healthy};
use crate::stripe::{in_ci, sdk_available, stripe_sdk};
use crate::support::{TestDb, now_ms};
use crate::{stripe_fixtures, test_db};

/// A served edgegate process on `db`, with `vars`, logging into `dir`.
async fn start(
    db: &TestDb,
    dir: &std::path::Path,
    log: &str,
    vars: &[(&str, &str)],
) -> (Server, String) {
    let port = free_port().to_string();
    let mut all = vec![("DATABASE_URL", db.url.as_str()), ("PORT", port.as_str())];
    all.extend_from_slice(vars);
    let server = spawn_server(dir, log, &all);
    let port: u16 = port.parse().unwrap();
    assert!(wait_healthy(port).await, "edgegate did not start");
    (server, format!("http://127.0.0.1:{port}"))
}

async fn kill(server: &mut Server) {
    // `Child::kill` is SIGKILL, sent at once (no `kill` process to spawn first).
    server.kill().expect("SIGKILL");
    let status = wait_exit(server).await;
    assert!(!status.success(), "edgegate was not killed: {status}");
}

#[tokio::test]
async fn sigkill_under_webhook_traffic_then_redelivery_applies_each_event_once() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let dir = tempfile::tempdir().unwrap();
    let vars = [("STRIPE_WEBHOOK_SECRET", WHSEC)];
    let (mut first, base) = start(&db, dir.path(), "first.log", &vars).await;

    let traffic = Traffic::start(fixtures.clone(), base, 8);
    traffic.wait_for(50, |s| s == 200, "events taken").await;
    // The senders keep going until the process is gone: those in flight get no answer.
    kill(&mut first).await;
    let answers = traffic.finish().await;
    let cut = answers.values().filter(|s| **s == NO_ANSWER).count();
    assert!(cut > 0, "the kill cut no delivery in flight: {answers:?}");

    // Stripe redelivers what was not answered 200; an answer lost in the crash may hide an event
    // that was applied, so those are redelivered too and must come back as duplicates.
    let (_second, base) = start(&db, dir.path(), "second.log", &vars).await;
    let client = reqwest::Client::new();
    for (i, status) in &answers {
        let body = product_event(&fixtures, *i);
        if *status == 200 {
            assert_eq!(deliver(&client, &base, &body).await, 200);
        } else {
            redeliver(&client, &base, &body).await;
        }
    }
    assert_each_event_applied_once(&db, answers.len()).await;
}

#[tokio::test]
async fn sigkill_mid_sms_send_leaves_it_unknown_and_a_retry_sends_nothing() {
    let db = test_db!();
    let dir = tempfile::tempdir().unwrap();
    let twilio = FakeTwilio::start(ACCOUNT, TOKEN).await;
    // Twilio takes the request and is slow to answer: the window in which only Twilio knows.
    twilio.set_latency(Duration::from_secs(30));
    let secret_keys = format!(r#"{{"backend":"{SECRET_KEY}"}}"#);
    let vars = [
        ("SUPABASE_SECRET_KEYS", secret_keys.as_str()),
        ("TWILIO_ACCOUNT_SID", ACCOUNT),
        ("TWILIO_AUTH_TOKEN", TOKEN),
        ("TWILIO_API_BASE", twilio.base.as_str()),
        ("TWILIO_FROM_NUMBER", "+15005550006"),
    ];
    let (mut first, base) = start(&db, dir.path(), "first.log", &vars).await;
    let request = json!({"to": "+12025550123", "body": "your code is 123456",
                         "idempotency_key": "crash-1"});
    let send = |base: String| {
        let request = request.clone();
        async move {
            reqwest::Client::new()
                .post(format!("{base}/functions/v1/send-sms"))
                .header("apikey", SECRET_KEY)
                .json(&request)
                .send()
                .await
        }
    };
    let in_flight = tokio::spawn(send(base));
    let deadline = Instant::now() + Duration::from_secs(10);
    while twilio.requests().is_empty() {
        assert!(Instant::now() < deadline, "the send never reached Twilio");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    kill(&mut first).await;
    assert!(
        in_flight.await.unwrap().is_err(),
        "the killed send answered"
    );
    let rows = text_pairs(&db, "SELECT idempotency_key, status FROM sms_messages").await;
    assert_eq!(rows, [("crash-1".to_owned(), "accepted".to_owned())]);

    let (_second, base) = start(&db, dir.path(), "second.log", &vars).await;
    // Another process's send may still be waiting for Twilio (a rolling restart, on PostgreSQL
    // or on one SQLite file alike): the row is left `accepted` until it is older than any send
    // can take (a minute; `the_start_sweep_leaves_another_instances_send_in_flight_alone`), and
    // a retry meanwhile is told the send is under way. Either way nothing is sent twice.
    let retried = send(base).await.unwrap();
    assert_eq!(retried.status(), 409);
    let body: Value = retried.json().await.unwrap();
    assert_eq!(body["code"], "CONFLICT", "{body}");
    assert_eq!(
        twilio.requests().len(),
        1,
        "the message went to Twilio twice"
    );
}

async fn sync(base: &str) -> (u16, Value) {
    post(base, "/functions/v1/sync-stripe-products-hardened").await
}

/// POSTs to `path` with the secret key, as the operator does to run a job.
async fn post(base: &str, path: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .header("apikey", SECRET_KEY)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Two live processes on one database (a second `serve` started by mistake, or an old one not
/// yet gone) never run the same job at once: the second is told the job is in progress, and the
/// first, still holding its lock, finishes.
#[tokio::test]
async fn two_live_processes_on_one_database_run_one_sync_and_one_reconciliation_at_a_time() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let dir = tempfile::tempdir().unwrap();
    let stripe = FakeStripe::start(&fixtures, 10, 10).await;
    let secret_keys = format!(r#"{{"backend":"{SECRET_KEY}"}}"#);
    let vars = [
        ("SUPABASE_SECRET_KEYS", secret_keys.as_str()),
        ("STRIPE_SECRET_KEY", fake_stripe::SECRET_KEY),
        ("STRIPE_API_BASE", stripe.base.as_str()),
        ("STRIPE_WEBHOOK_SECRET", WHSEC),
    ];
    let (_first, first) = start(&db, dir.path(), "first.log", &vars).await;
    let (_second, second) = start(&db, dir.path(), "second.log", &vars).await;

    let jobs = [
        (
            "sync",
            "/functions/v1/sync-stripe-products-hardened",
            "sync_runs",
        ),
        ("reconcile", "/admin/stripe/reconcile", "reconcile_runs"),
    ];
    for (job, path, runs) in jobs {
        stripe.fault_at(stripe.requests(), Fault::Hold);
        let base = first.clone();
        let running = tokio::spawn(async move { post(&base, path).await });
        tokio::time::timeout(Duration::from_secs(30), stripe.arrived())
            .await
            .unwrap_or_else(|_| panic!("the first process's {job} never reached Stripe"));
        let (status, body) = post(&second, path).await;
        assert_eq!(
            (status, &body["code"]),
            (409, &json!("SYNC_IN_PROGRESS")),
            "{job} on the second process: {body}"
        );
        stripe.release();
        let (status, body) = running.await.unwrap();
        assert_eq!(status, 200, "{job} on the first process: {body}");
        let failed = format!("SELECT COUNT(*) FROM {runs} WHERE outcome <> 'ok'");
        assert_eq!(scalar_i64(&db, &failed).await, 0, "a {job} run failed");
    }
}

#[tokio::test]
async fn sigkill_mid_sync_page_then_a_rerun_converges() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let dir = tempfile::tempdir().unwrap();
    // Pages of 100: products are requests 0-2, prices 3-10.
    let stripe = FakeStripe::start(&fixtures, 250, 750).await;
    stripe.fault_at(5, Fault::Hold);
    let secret_keys = format!(r#"{{"backend":"{SECRET_KEY}"}}"#);
    let vars = [
        ("SUPABASE_SECRET_KEYS", secret_keys.as_str()),
        ("STRIPE_SECRET_KEY", fake_stripe::SECRET_KEY),
        ("STRIPE_API_BASE", stripe.base.as_str()),
        ("LOG_FORMAT", "json"),
    ];
    let (mut first, base) = start(&db, dir.path(), "first.log", &vars).await;
    let running = tokio::spawn(async move { sync(&base).await });
    tokio::time::timeout(Duration::from_secs(30), stripe.arrived())
        .await
        .expect("the sync reached the held page");
    kill(&mut first).await;
    let killed_at = now_ms();
    running.abort();
    assert_eq!(
        scalar_i64(&db, "SELECT COUNT(*) FROM stripe_prices").await,
        200
    );
    stripe.clear_faults();
    // The killed run's row, left `running`.
    let killed_run = text_pairs(
        &db,
        "SELECT id, CAST(started_at AS TEXT) FROM sync_runs WHERE outcome = 'running'",
    )
    .await;
    assert_eq!(killed_run.len(), 1, "{killed_run:?}");
    let (killed_run, killed_started) = killed_run.into_iter().next().unwrap();

    let (_second, base) = start(&db, dir.path(), "second.log", &vars).await;
    if !db.is_postgres() {
        // SQLite's lock is a row, which outlives its killed holder until its lease runs out: at
        // most 60 s after the holder's last heartbeat, so at most 60 s after the kill (the
        // PostgreSQL lock went with the killed session). Expire it as that wait would.
        let (status, body) = sync(&base).await;
        assert_eq!((status, &body["code"]), (409, &json!("SYNC_IN_PROGRESS")));
        let expires_at = "SELECT expires_at FROM locks WHERE name = 'stripe_sync'";
        let expires_at = scalar_i64(&db, expires_at).await;
        assert!(
            expires_at <= killed_at + 60_000,
            "the killed holder's row blocks the sync until {} ms after the kill",
            expires_at - killed_at
        );
        expire_sqlite_sync_lock(&db).await;
    }
    let (status, body) = sync(&base).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["products"]["seen"], 250);
    assert_eq!(body["prices"]["seen"], 750);
    assert_eq!(body["prices"]["deactivated"], 0);
    assert_eq!(
        scalar_i64(&db, "SELECT COUNT(*) FROM stripe_products").await,
        250
    );
    assert_eq!(
        scalar_i64(&db, "SELECT COUNT(*) FROM stripe_prices").await,
        750
    );
    assert_eq!(
        scalar_i64(
            &db,
            "SELECT COUNT(*) FROM stripe_prices WHERE deactivated_at IS NOT NULL"
        )
        .await,
        0
    );
    // A second rerun finds nothing to change: the state converged.
    let (status, body) = sync(&base).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["products"]["upserted"], 0);
    assert_eq!(body["prices"]["upserted"], 0);

    // The rerun, holding the lock, marked the killed run's row: no longer `running` forever
    // beside later successful runs.
    let runs = text_pairs(&db, "SELECT id, outcome FROM sync_runs ORDER BY started_at").await;
    assert_eq!(runs.len(), 3, "{runs:?}");
    assert_eq!(runs[0], (killed_run.clone(), "interrupted".to_owned()));
    assert!(
        runs[1..].iter().all(|(_, outcome)| outcome == "ok"),
        "{runs:?}"
    );
    let ended = format!(
        "SELECT COUNT(*) FROM sync_runs WHERE id = '{killed_run}' AND finished_at >= {killed_at}"
    );
    assert_eq!(scalar_i64(&db, &ended).await, 1);
    // Said once, naming the run and when it started.
    let log = std::fs::read_to_string(dir.path().join("second.log")).unwrap();
    let said: Vec<Value> = log
        .lines()
        .filter(|line| line.contains(&killed_run))
        .map(|line| serde_json::from_str(line).expect("a JSON log line"))
        .filter(|line: &Value| line["level"] == "WARN")
        .collect();
    assert_eq!(said.len(), 1, "{log}");
    assert!(
        said[0]["message"].as_str().unwrap().contains("interrupted"),
        "{}",
        said[0]
    );
    assert_eq!(
        said[0]["started_at"].to_string(),
        killed_started,
        "{}",
        said[0]
    );
}

async fn expire_sqlite_sync_lock(db: &TestDb) {
    use sqlx::Connection as _;
    let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
    let expired = sqlx::query("UPDATE locks SET expires_at = 0 WHERE name = 'stripe_sync'")
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(expired.rows_affected(), 1);
    conn.close().await.unwrap();
}

#[tokio::test]
async fn the_sweep_marks_only_old_unanswered_sends_and_a_late_answer_still_lands() {
    use edgegate::store::{NewSms, SendResult, SmsLimits};
    let db = test_db!();
    let store = db.store().await;
    let limits = SmsLimits {
        per_recipient_per_hour: 10,
        per_minute: 10,
    };
    let t0 = 1_000_000_000;
    for (id, status, at) in [
        ("old", "accepted", t0),
        ("sent", "accepted", t0),
        ("service", "accepted", t0),
        ("new", "accepted", t0 + 10_000),
    ] {
        let new = NewSms {
            id,
            idempotency_key: Some(id),
            to_number: "+12025550101",
            body: "hi",
            status,
            replayed_error_codes: &[],
        };
        store.reserve_sms(new, limits, || at).await.unwrap();
    }
    let answered = SendResult {
        status: "queued",
        twilio_sid: Some("SM0001"),
        error_code: None,
        error_message: None,
    };
    store
        .record_sms_send(("sent", 1), answered, t0 + 1)
        .await
        .unwrap();
    // Through a Messaging Service Twilio answers `accepted` too: answered all the same.
    let by_service = SendResult {
        status: "accepted",
        twilio_sid: Some("SM0003"),
        ..answered
    };
    store
        .record_sms_send(("service", 1), by_service, t0 + 1)
        .await
        .unwrap();

    let marked = store
        .mark_unanswered_sms_unknown(t0 + 5_000, "test", t0 + 20_000)
        .await
        .unwrap();
    assert_eq!(marked, 1);
    let status = |id: &'static str| {
        let store = store.clone();
        async move { store.sms_message(id).await.unwrap().unwrap().status }
    };
    assert_eq!(status("old").await, "unknown");
    assert_eq!(status("sent").await, "queued");
    assert_eq!(status("service").await, "accepted");
    assert_eq!(status("new").await, "accepted");
    // A sender that was only slow records Twilio's answer over the sweep's guess.
    let late = SendResult {
        twilio_sid: Some("SM0002"),
        ..answered
    };
    store
        .record_sms_send(("old", 1), late, t0 + 30_000)
        .await
        .unwrap();
    assert_eq!(status("old").await, "queued");
}

/// The sweep at start must not take another instance's send in flight for a dead one: during a
/// rolling restart (a shared PostgreSQL, or two processes on one SQLite file for a moment, as
/// `drill.rs` restarts them), a row reserved a moment before this process started may still be
/// waiting for Twilio's answer. Only rows older than any send can take are marked, at start as
/// later, on both engines (on SQLite every row reserved before the start was marked).
#[tokio::test]
async fn the_start_sweep_leaves_another_instances_send_in_flight_alone() {
    use edgegate::store::{NewSms, SmsLimits};
    let db = test_db!();
    let store = db.store().await;
    let limits = SmsLimits {
        per_recipient_per_hour: 10,
        per_minute: 10,
    };
    let clock = edgegate::clock::Clock::system();
    let now = clock.now_ms();
    // An hour is past any send's deadline; a second ago is inside it.
    for (id, at) in [("dead", now - 3_600_000), ("in_flight", now - 1_000)] {
        let new = NewSms {
            id,
            idempotency_key: Some(id),
            to_number: "+12025550101",
            body: "hi",
            status: "accepted",
            replayed_error_codes: &[],
        };
        store.reserve_sms(new, limits, || at).await.unwrap();
    }
    let status = |id: &'static str| {
        let store = store.clone();
        async move { store.sms_message(id).await.unwrap().unwrap().status }
    };
    // Started after both were reserved.
    let sweeper = edgegate::twilio::send::spawn_unanswered_sweeper(
        store.clone(),
        clock,
        Duration::from_secs(10),
    );
    let started = Instant::now();
    while status("dead").await != "unknown" {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the start sweep did not run"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sweeper.abort();
    assert_eq!(status("in_flight").await, "accepted");
}
