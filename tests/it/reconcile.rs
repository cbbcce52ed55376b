//! Nothing lost: `POST /admin/stripe/reconcile` against a fake Stripe whose `/v1/events` lists
//! newest first, and same-second webhook events settled by the object's current state. Webhook
//! deliveries are signed by Stripe's official Python SDK.

use edgegate::stripe::RetryPolicy;
use serde_json::{Value, json};

use crate::fake_stripe::{self, FakeStripe, Fault, SECRET_KEY};
use crate::stripe::{
    App, SB_SECRET, WHSEC, app, count, deliver_signed, event, fast_retry, in_ci, now,
    product_event, product_name, scalar, sdk_available, stripe_sdk, sync,
};
use crate::support::{TestDb, TestServer};
use crate::{stripe_fixtures, test_db};

const PUBLISHABLE_KEY: &str = "sb_publishable_0123456789abcdefghij";

/// An instance with the Stripe key, the webhook secret and a publishable key.
async fn full_app(db: &TestDb, fake: &FakeStripe) -> App {
    let publishable = format!(r#"{{"web":"{PUBLISHABLE_KEY}"}}"#);
    app(
        db,
        &[
            ("STRIPE_SECRET_KEY", SECRET_KEY),
            ("STRIPE_API_BASE", fake.base.as_str()),
            ("STRIPE_WEBHOOK_SECRET", WHSEC),
            ("SUPABASE_PUBLISHABLE_KEYS", publishable.as_str()),
        ],
        fast_retry(),
    )
    .await
}

async fn reconcile_as(
    server: &TestServer,
    apikey: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = server.client.post(server.url("/admin/stripe/reconcile"));
    if let Some(key) = apikey {
        request = request.header("apikey", key);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

pub(crate) async fn reconcile(server: &TestServer) -> (u16, Value) {
    reconcile_as(server, Some(SB_SECRET), None).await
}

fn events(body: &Value) -> (i64, i64, i64, i64) {
    let e = &body["events"];
    (
        e["seen"].as_i64().unwrap(),
        e["applied"].as_i64().unwrap(),
        e["already_applied"].as_i64().unwrap(),
        e["ignored"].as_i64().unwrap(),
    )
}

/// Event `n` of a history: every seventh a type edgegate does not act on, the others renaming
/// product `n` to `Name n`.
fn history_event(fixtures: &Value, n: usize, created: i64) -> Value {
    let id = format!("evt_R{n:05}");
    let body = if n % 7 == 3 {
        event(
            fixtures,
            &id,
            "payment_intent.created",
            created,
            json!({"id": format!("pi_{n}"), "object": "payment_intent"}),
        )
    } else {
        product_event(
            fixtures,
            &id,
            "product.updated",
            created,
            n,
            &format!("Name {n}"),
        )
    };
    serde_json::from_str(&body).unwrap()
}

/// Events `0..count` of a history, event `n` created at `first + step * n`.
fn history(fixtures: &Value, count: usize, first: i64, step: i64) -> Vec<Value> {
    (0..count)
        .map(|n| history_event(fixtures, n, first + step * n as i64))
        .collect()
}

#[tokio::test]
async fn reconcile_applies_missed_events_once_and_a_rerun_applies_nothing() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 0, 0).await;
    let app = full_app(&db, &fake).await;
    let t = now();
    // 250 events over the last 21 minutes: three pages of up to 100, newest first.
    let history = history(&fixtures, 250, t - 1300, 5);
    // One from three days ago: with no run on record, the default window is Stripe's whole
    // retention, however fresh the ledger.
    let old = history_event(&fixtures, 9996, t - 3 * 86_400);
    fake.add_events(history.iter().cloned().chain([old]));
    // Events 140 to 159 were delivered: newest first, page one ends at 150 (events 249..150).
    for delivered in &history[140..160] {
        let (status, body) = deliver_signed(&app.server, &delivered.to_string()).await;
        assert_eq!(status, 200, "{body}");
    }

    let before = now();
    let (status, body) = reconcile(&app.server).await;
    let after = now();
    assert_eq!(status, 200, "{body}");
    // Only the types edgegate acts on are listed: not every seventh event (nor the three of
    // those the webhook received, which it recorded).
    let unhandled = (0..250).filter(|n| n % 7 == 3).count() as i64;
    assert_eq!(unhandled, 36);
    assert_eq!(events(&body), (215, 198, 17, 0));
    let since = body["since"].as_i64().unwrap();
    assert!((before..=after).contains(&(since + 30 * 86_400)), "{body}");
    assert!(body["duration_ms"].as_u64().is_some());
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_events").await, 218);
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM stripe_events WHERE id = 'evt_R09996'"
        )
        .await,
        1
    );
    for n in [0, 1, 149, 151, 155, 200, 249] {
        assert_eq!(product_name(&db, n).await, format!("Name {n}"));
    }
    // And product 9996, of the three-day-old event.
    let products = 250 - (0..250).filter(|n| n % 7 == 3).count() as i64 + 1;
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM stripe_products").await,
        products
    );

    // Everything is in the ledger now: a rerun applies nothing. Its default window starts an
    // hour before the first run, which covered everything before it.
    let (status, body) = reconcile(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(events(&body), (214, 0, 214, 0));
    let since = body["since"].as_i64().unwrap();
    assert!((before..=after).contains(&(since + 3600)), "{body}");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_events").await, 218);

    let runs = "SELECT COUNT(*) FROM reconcile_runs WHERE outcome = 'ok' AND started_by = 'manual' \
                AND finished_at IS NOT NULL AND events_seen = 215 AND last_event_id = 'evt_R09996'";
    assert_eq!(count(&db, runs).await, 1);
    let runs = "SELECT COUNT(*) FROM reconcile_runs WHERE outcome = 'ok' AND started_by = 'manual' \
                AND events_seen = 214 AND last_event_id = 'evt_R00000'";
    assert_eq!(count(&db, runs).await, 1);
    let audit = "SELECT COUNT(*) FROM audit_log WHERE action = 'reconcile_stripe_events' \
                 AND outcome = 'ok' AND credential_source = 'api_key'";
    assert_eq!(count(&db, audit).await, 2);
    let metrics = app.server.get("/metrics").await.text().await.unwrap();
    for line in [
        r#"edgegate_stripe_reconcile_runs_total{started_by="manual",outcome="ok"} 2"#,
        r#"edgegate_stripe_reconcile_events_total{result="already_applied"} 231"#,
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
}

/// A first run, over no event, with its start and Stripe's time of its listing moved back to
/// `at` (unix seconds): as if a run had covered everything up to then.
async fn covered_up_to(app: &App, db: &TestDb, at: i64) {
    let (status, body) = reconcile(&app.server).await;
    assert_eq!((status, events(&body)), (200, (0, 0, 0, 0)), "{body}");
    let moved = format!(
        "UPDATE reconcile_runs SET started_at = {0}, covered_until = {0} RETURNING started_at",
        at * 1000
    );
    assert_eq!(scalar!(db, i64, moved), at * 1000);
}

/// A run over a narrow window (a manual `since`) covers only that window: the next default run
/// still starts from the last run that covered everything before it.
#[tokio::test]
async fn a_narrow_manual_run_does_not_hide_events_missed_before_it() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 0, 0).await;
    let app = full_app(&db, &fake).await;
    let t = now();
    // A run that covered everything up to three hours ago.
    covered_up_to(&app, &db, t - 3 * 3600).await;
    // Since then: events 0..3 two and a half hours ago, never delivered; event 4 a minute ago.
    fake.add_events((0..4).map(|n| history_event(&fixtures, n, t - 9000 + n as i64)));
    fake.add_events([history_event(&fixtures, 4, t - 50)]);
    // An operator reconciles the last minute only.
    let (status, body) =
        reconcile_as(&app.server, Some(SB_SECRET), Some(json!({"since": t - 60}))).await;
    assert_eq!((status, events(&body)), (200, (1, 1, 0, 0)), "{body}");

    let (status, body) = reconcile(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["since"], json!(t - 4 * 3600), "{body}");
    // Event 3 is of a type edgegate does not act on: not listed.
    assert_eq!(events(&body), (4, 3, 1, 0), "{body}");
    assert_eq!(product_name(&db, 0).await, "Name 0");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_events").await, 4);
}

/// A run made while the wall clock was a day ahead (an NTP step then set it right: a VM
/// restored, a host whose clock was wrong at boot) is stamped tomorrow. Taken for the coverage,
/// it would start every later default window in the future (`created[gte]` tomorrow): each run
/// would list nothing and answer 200 while the events of the gap were never recovered. Such a
/// run covers nothing: once the clock is right, the next default run starts from the last run
/// stamped before now, and once the clock has passed the stale stamp, the default window still
/// starts from the runs made since, not from it.
#[tokio::test]
async fn a_run_stamped_while_the_clock_was_ahead_leaves_no_gap_once_it_is_right() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    // Stripe's clock is right throughout: the manual clock less its step.
    let (fake, clock, app, t) = first_run_on_a_manual_clock(&db, &fixtures).await;
    let (hour, day) = (3_600, 86_400);

    clock.step_wall(day * 1000);
    let (status, body) = reconcile(&app.server).await;
    assert_eq!(
        (status, body["since"].clone()),
        (200, json!(t - hour)),
        "{body}"
    );
    clock.step_wall(-day * 1000);

    // Two hours later, at the right time: an event missed in the first hour of the gap.
    clock.advance(std::time::Duration::from_secs(2 * hour as u64));
    fake.set_date(Some(t + 2 * hour));
    fake.add_events([history_event(&fixtures, 0, t + hour)]);
    let (status, body) = reconcile(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["since"], json!(t - hour), "{body}");
    assert_eq!(events(&body), (1, 1, 0, 0), "{body}");
    assert_eq!(product_name(&db, 0).await, "Name 0");

    // A day later, past the stale stamp: an event missed an hour after the last run.
    clock.advance(std::time::Duration::from_secs(day as u64));
    fake.set_date(Some(t + 2 * hour + day));
    fake.add_events([history_event(&fixtures, 1, t + 3 * hour)]);
    let (status, body) = reconcile(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["since"], json!(t + hour), "{body}");
    assert_eq!(events(&body), (2, 1, 1, 0), "{body}");
    assert_eq!(product_name(&db, 1).await, "Name 1");
}

/// An instance on `fake` with the Stripe key and the webhook secret, reading time from `clock`.
async fn app_on_clock(db: &TestDb, fake: &FakeStripe, clock: &edgegate::clock::Clock) -> App {
    let vars = [
        ("STRIPE_SECRET_KEY", SECRET_KEY),
        ("STRIPE_API_BASE", fake.base.as_str()),
        ("STRIPE_WEBHOOK_SECRET", WHSEC),
    ];
    crate::stripe::app_with_clock(db, &vars, fast_retry(), clock.clone()).await
}

/// A fake Stripe and an instance on a manual clock, after a first run at T (the clock's time,
/// unix seconds, returned), which Stripe dates T: what the clock-step tests start from. Stripe's
/// clock then says what the test sets (`FakeStripe::set_date`).
async fn first_run_on_a_manual_clock(
    db: &TestDb,
    fixtures: &Value,
) -> (FakeStripe, edgegate::clock::Clock, App, i64) {
    let fake = FakeStripe::start(fixtures, 0, 0).await;
    let clock = edgegate::clock::Clock::manual();
    let app = app_on_clock(db, &fake, &clock).await;
    let t = clock.now_ms() / 1000;
    fake.set_date(Some(t));
    let (status, body) = reconcile(&app.server).await;
    assert_eq!((status, events(&body)), (200, (0, 0, 0, 0)), "{body}");
    (fake, clock, app, t)
}

/// A day of hourly runs made while the wall clock ran a day ahead, set right by NTP at T+23h30.
/// Each run listed Stripe's events as of Stripe's time, but was stamped a day late: the first,
/// at T, is stamped T+1d. Taken from those stamps, the coverage reached a day past what was
/// listed: every default window started in the future and listed nothing; once the clock was
/// right the later runs were disowned as stamped ahead, but the first was not (its stamp, T+1d,
/// was now), so the run at T+24h listed from T+23h and the events of T..T+23h were never
/// listed, with a 200. Taken from Stripe's `Date` (the clock `created[gte]` is in), every run
/// covers what it listed, whatever our clock said.
#[tokio::test]
async fn runs_made_while_the_clock_ran_a_day_ahead_cover_what_they_listed_in_stripes_time() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 0, 0).await;
    let clock = edgegate::clock::Clock::manual();
    let app = app_on_clock(&db, &fake, &clock).await;
    let t = clock.now_ms() / 1000;
    let (hour, day) = (3_600, 86_400);
    let advance = |seconds: i64| clock.advance(std::time::Duration::from_secs(seconds as u64));
    // Products renamed by events no webhook delivered, ten minutes before a run lists.
    let missed = [1, 6, 11, 16, 21];

    clock.step_wall(day * 1000);
    for k in 0..=22 {
        if k > 0 {
            advance(hour);
        }
        fake.set_date(Some(t + k * hour));
        if missed.contains(&k) {
            fake.add_events([history_event(&fixtures, k as usize, t + k * hour - 600)]);
        }
        let (status, body) = reconcile(&app.server).await;
        assert_eq!(status, 200, "run at T+{k}h: {body}");
    }
    advance(hour / 2);
    clock.step_wall(-day * 1000);
    advance(hour / 2 + hour);
    fake.set_date(Some(t + 24 * hour));
    fake.add_events([history_event(&fixtures, 23, t + 23 * hour + 2700)]);
    assert_eq!(clock.now_ms() / 1000, t + day);

    let (status, body) = reconcile(&app.server).await;
    assert_eq!(status, 200, "{body}");
    // An hour before the last run's listing (T+22h, by Stripe's clock).
    assert_eq!(body["since"], json!(t + 21 * hour), "{body}");
    for n in missed.into_iter().chain([23]) {
        assert_eq!(product_name(&db, n as usize).await, format!("Name {n}"));
    }
}

/// With runs a day apart (`STRIPE_RECONCILE_INTERVAL_SECONDS=86400`), a run made in the one
/// minute the wall clock ran a day ahead was stamped T+1d; the next run, at T+1d, found that
/// stamp no longer in the future and listed from T+23h: the events of T..T+23h were never
/// listed. By Stripe's time that run covered T only.
#[tokio::test]
async fn a_run_in_a_minute_the_clock_ran_a_day_ahead_covers_only_that_minute() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let (fake, clock, app, t) = first_run_on_a_manual_clock(&db, &fixtures).await;
    let (hour, day) = (3_600, 86_400);

    clock.step_wall(day * 1000);
    let (status, body) = reconcile(&app.server).await;
    assert_eq!(status, 200, "{body}");
    clock.advance(std::time::Duration::from_secs(60));
    clock.step_wall(-day * 1000);

    fake.add_events([history_event(&fixtures, 0, t + 2 * hour)]);
    clock.advance(std::time::Duration::from_secs(day as u64 - 60));
    fake.set_date(Some(t + day));
    let (status, body) = reconcile(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["since"], json!(t - hour), "{body}");
    assert_eq!(events(&body), (1, 1, 0, 0), "{body}");
    assert_eq!(product_name(&db, 0).await, "Name 0");
}

/// A `Date` more than the overlap ahead of our clock (a proxy in front of Stripe that writes its
/// own, by a clock a day fast) covers nothing, as a start stamped ahead does: a run after a
/// three-hour outage lists from before it, not from an hour before now. Taken as it came, it
/// held the window at an hour for the day, and the outage's events were never listed.
#[tokio::test]
async fn a_stripe_date_further_ahead_than_the_overlap_covers_nothing() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let (fake, clock, app, t) = first_run_on_a_manual_clock(&db, &fixtures).await;
    let (hour, day) = (3_600, 86_400);

    // An hour later the proxy's clock is a day fast for one run.
    clock.advance(std::time::Duration::from_secs(hour as u64));
    fake.set_date(Some(t + hour + day));
    let (status, body) = reconcile(&app.server).await;
    assert_eq!(status, 200, "{body}");

    // Then three hours of outage, whose events nobody listed, and the proxy's clock is right.
    fake.add_events([history_event(&fixtures, 0, t + 2 * hour)]);
    clock.advance(std::time::Duration::from_secs(4 * hour as u64));
    fake.set_date(Some(t + 5 * hour));
    let (status, body) = reconcile(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["since"].as_i64().unwrap() <= t + 2 * hour, "{body}");
    assert_eq!(events(&body), (1, 1, 0, 0), "{body}");
    assert_eq!(product_name(&db, 0).await, "Name 0");
}

/// A finished successful run as a build before `covered_until` recorded it: without Stripe's
/// time, its start (`started_at`, ms) stands for its coverage.
async fn earlier_builds_run(db: &TestDb, id: &str, started_at: i64) {
    let sql = format!(
        "INSERT INTO reconcile_runs \
         (id, started_by, since, started_at, finished_at, outcome, continuous) \
         VALUES ('{id}', 'periodic', {since}, {started_at}, {started_at}, 'ok', TRUE) \
         RETURNING started_at",
        since = started_at / 1000 - 3_600
    );
    assert_eq!(scalar!(db, i64, sql), started_at);
}

/// A run of a build before `covered_until`, made while the wall clock ran a day ahead, is
/// stamped tomorrow and has no Stripe time to go by. Taken for the coverage (up to now), it
/// would start the next default window an hour before now, and the events missed between the
/// last true run and then would never be listed, with a 200: it covers nothing. One stamped
/// less than a minute ahead (another instance's clock a little fast) still covers up to its
/// start.
#[tokio::test]
async fn an_earlier_builds_run_stamped_a_day_ahead_covers_nothing_and_one_seconds_ahead_counts() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let (fake, clock, app, t) = first_run_on_a_manual_clock(&db, &fixtures).await;
    let (hour, day) = (3_600, 86_400);
    earlier_builds_run(&db, "day-ahead", (t + day) * 1000).await;

    // Two hours later: an event missed half an hour after the first run.
    clock.advance(std::time::Duration::from_secs(2 * hour as u64));
    fake.set_date(Some(t + 2 * hour));
    fake.add_events([history_event(&fixtures, 0, t + hour / 2)]);
    let (status, body) = reconcile(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["since"], json!(t - hour), "{body}");
    assert_eq!(events(&body), (1, 1, 0, 0), "{body}");
    assert_eq!(product_name(&db, 0).await, "Name 0");

    // Three hours later, a run stamped 30 s ahead covers up to now: an hour of overlap before
    // it, not before the run three hours ago.
    clock.advance(std::time::Duration::from_secs(3 * hour as u64));
    fake.set_date(Some(t + 5 * hour));
    earlier_builds_run(&db, "seconds-ahead", (t + 5 * hour + 30) * 1000).await;
    let (status, body) = reconcile(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["since"], json!(t + 4 * hour), "{body}");
}

#[tokio::test]
async fn reconcile_failing_midway_answers_502_and_a_rerun_finishes() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 0, 0).await;
    let app = full_app(&db, &fake).await;
    let t = now();
    // Two and a half hours of events: more than the one-hour overlap of a default window.
    fake.add_events(history(&fixtures, 250, t - 9000, 30));
    // The first page comes; every later request fails, retries included.
    fake.fault_from(1, Fault::ServerError(None));
    let (status, body) = reconcile(&app.server).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["code"], "UPSTREAM_UNAVAILABLE");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with("Stripe answered HTTP 500 (api_error), 3 times; run "),
        "{message}"
    );
    assert!(
        message.contains(
            " stopped after 100 events seen: 100 applied, 0 already applied, 0 ignored; "
        ),
        "{message}"
    );
    // What was applied stays applied, and the run row says where it stopped.
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_events").await, 100);
    let stopped = "SELECT COUNT(*) FROM reconcile_runs WHERE outcome = 'upstream_error' \
                   AND events_seen = 100 AND last_event_id = 'evt_R00133' AND error IS NOT NULL";
    assert_eq!(count(&db, stopped).await, 1);

    fake.clear_faults();
    let (status, body) = reconcile(&app.server).await;
    assert_eq!(status, 200, "{body}");
    let (seen, applied, already, ignored) = events(&body);
    // Every seventh event is of a type edgegate does not act on: not listed.
    assert_eq!((seen, already), (214, 100));
    assert_eq!((applied, ignored), (114, 0));
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_events").await, 214);
    assert_eq!(product_name(&db, 0).await, "Name 0");
    let audit = "SELECT COUNT(*) FROM audit_log WHERE action = 'reconcile_stripe_events' \
                 AND outcome = 'upstream_error'";
    assert_eq!(count(&db, audit).await, 1);
}

#[tokio::test]
async fn two_concurrent_reconciles_on_two_instances_give_one_409() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 0, 0).await;
    fake.add_events(history(&fixtures, 5, now() - 60, 1));
    let first = full_app(&db, &fake).await;
    let second = full_app(&db, &fake).await;
    fake.fault_at(0, Fault::Hold);
    let running = tokio::spawn(async move {
        let result = reconcile(&first.server).await;
        (result, first)
    });
    fake.arrived().await;
    let (status, body) = reconcile(&second.server).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "SYNC_IN_PROGRESS");
    fake.release();
    let ((status, body), _first) = running.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(events(&body).0, 4);

    // The lock is free again, and a catalogue sync never held it.
    let (status, body) = reconcile(&second.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(events(&body), (4, 0, 4, 0));
    let audit = "SELECT COUNT(*) FROM audit_log WHERE action = 'reconcile_stripe_events' \
                 AND outcome = 'in_progress'";
    assert_eq!(count(&db, audit).await, 1);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM reconcile_runs").await, 2);
}

#[tokio::test]
async fn reconcile_needs_a_key_the_service_role_and_a_sound_body() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 0, 0).await;
    fake.add_events([history_event(&fixtures, 1, now() - 10)]);
    let app = full_app(&db, &fake).await;

    let (status, body) = reconcile_as(&app.server, None, None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("UNAUTHORIZED_NO_AUTH_HEADER"))
    );
    let (status, body) = reconcile_as(&app.server, Some(PUBLISHABLE_KEY), None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("FORBIDDEN_ROLE"))
    );

    let future = json!({"since": now() + 3600});
    let (status, body) = reconcile_as(&app.server, Some(SB_SECRET), Some(future)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("VALIDATION_FAILED"))
    );
    assert!(
        body["message"].as_str().unwrap().contains("since"),
        "{body}"
    );
    let (status, body) = reconcile_as(
        &app.server,
        Some(SB_SECRET),
        Some(json!({"since": "yesterday"})),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("VALIDATION_FAILED"))
    );
    assert_eq!(fake.requests(), 0, "nothing reached Stripe");

    // A `since` older than Stripe keeps is moved up to its 30-day retention.
    let (status, body) =
        reconcile_as(&app.server, Some(SB_SECRET), Some(json!({"since": 0}))).await;
    assert_eq!(status, 200, "{body}");
    let since = body["since"].as_i64().unwrap();
    assert!((now() - 30 * 86_400 - since).abs() <= 5, "{body}");
    assert_eq!(events(&body).0, 1);

    // The body is optional, so a JSON `null` (what the OpenAPI document allows) is no body.
    let (status, body) = reconcile_as(&app.server, Some(SB_SECRET), Some(Value::Null)).await;
    assert_eq!(status, 200, "{body}");

    let without_key = app_without_key(&db).await;
    let (status, body) = reconcile(&without_key.server).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("NOT_CONFIGURED"))
    );
}

/// `body` as it is written (a number serde_json would rewrite, such as 2^64, stays as sent).
async fn reconcile_raw(server: &TestServer, body: &str) -> (u16, Value) {
    let response = server
        .client
        .post(server.url("/admin/stripe/reconcile"))
        .header("apikey", SB_SECRET)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// The contract: a field that breaks a rule is 422 `VALIDATION_FAILED` naming it; only a body
/// that is not JSON (or not this object) is 400. A `since` of the wrong JSON type, with a
/// fraction, or past a 64-bit integer names `since` and the rule. A whole number written as a
/// float (Python's `1700000000.0`; an integer to JSON Schema) is taken.
#[tokio::test]
async fn reconcile_names_since_when_it_is_not_whole_unix_seconds() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 0, 0).await;
    let app = full_app(&db, &fake).await;
    for since in [
        r#""1700000000""#,
        "1.5",
        "-0.25",
        "18446744073709551616",
        "9223372036854775808",
        "-9223372036854775809",
        "1e300",
        "true",
        "[1700000000]",
        r#"{"seconds":1700000000}"#,
    ] {
        let (status, body) = reconcile_raw(&app.server, &format!(r#"{{"since":{since}}}"#)).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (422, Some("VALIDATION_FAILED")),
            "{since}: {body}"
        );
        let message = body["message"].as_str().unwrap();
        assert!(message.starts_with("since: "), "{since}: {message}");
        assert!(message.contains("unix seconds"), "{since}: {message}");
    }
    // Whole, but in the future.
    let (status, body) = reconcile_raw(&app.server, r#"{"since":1e10}"#).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("VALIDATION_FAILED")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("since"),
        "{body}"
    );
    for malformed in [
        r#"{since:1}"#,
        r#"{"since":1,"until":2}"#,
        "[]",
        r#"{"since":1"#,
    ] {
        let (status, body) = reconcile_raw(&app.server, malformed).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (400, Some("INVALID_REQUEST")),
            "{malformed}: {body}"
        );
    }
    assert_eq!(fake.requests(), 0, "nothing reached Stripe");

    // `null`: no `since`, the default window.
    let (status, body) = reconcile_raw(&app.server, r#"{"since":null}"#).await;
    assert_eq!(status, 200, "{body}");
    let since = now() - 60;
    let (status, body) = reconcile_raw(&app.server, &format!(r#"{{"since":{since}.0}}"#)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["since"], since, "{body}");
}

async fn app_without_key(db: &TestDb) -> App {
    app(db, &[("STRIPE_WEBHOOK_SECRET", WHSEC)], fast_retry()).await
}

// ---- same-second ordering ----

/// Product `i` in the fake, as Stripe would return it now.
fn stripe_now(fixtures: &Value, fake: &FakeStripe, i: usize) {
    let mut object = fake_stripe::product(fixtures, i);
    object["name"] = json!("As Stripe has it");
    fake.add_product(object);
}

#[tokio::test]
async fn same_second_updates_end_in_the_object_stripe_returns_in_either_order() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 0, 0).await;
    let app = full_app(&db, &fake).await;
    let t = now() - 30;
    for (i, order) in [(1, ["A", "B"]), (2, ["B", "A"])] {
        stripe_now(&fixtures, &fake, i);
        for name in order {
            let body = product_event(
                &fixtures,
                &format!("evt_S{i}{name}"),
                "product.updated",
                t,
                i,
                name,
            );
            let (status, answer) = deliver_signed(&app.server, &body).await;
            assert_eq!(status, 200, "{answer}");
        }
        assert_eq!(
            product_name(&db, i).await,
            "As Stripe has it",
            "order {order:?}"
        );
    }
    // Only the second event of each pair needed Stripe.
    assert_eq!(fake.object_requests(), 2);

    // A strictly older event still changes nothing, without asking Stripe.
    let older = product_event(&fixtures, "evt_S1old", "product.updated", t - 1, 1, "Older");
    assert_eq!(deliver_signed(&app.server, &older).await.0, 200);
    assert_eq!(product_name(&db, 1).await, "As Stripe has it");
    assert_eq!(fake.object_requests(), 2);

    // Prices too.
    let mut price = fake_stripe::price(&fixtures, 6);
    price["unit_amount"] = json!(4242);
    fake.add_price(price.clone());
    for (id, amount) in [("evt_SP1", 1), ("evt_SP2", 2)] {
        price["unit_amount"] = json!(amount);
        let body = event(&fixtures, id, "price.updated", t, price.clone());
        assert_eq!(deliver_signed(&app.server, &body).await.0, 200);
    }
    let amount = format!(
        "SELECT unit_amount FROM stripe_prices WHERE id = '{}'",
        fake_stripe::price_id(6)
    );
    assert_eq!(scalar!(db, Option<i64>, amount), Some(4242));
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_events").await, 7);
}

/// Settling a same-second tie, Stripe's answer may be the stub of a deleted object
/// (`{"id","object","deleted":true}`): the object is gone, so the event's own values are kept,
/// deleted, as when Stripe answers 404. The stub was written as the row: name `''`,
/// `stripe_created` 0, active.
#[tokio::test]
async fn same_second_with_stripe_answering_a_deleted_stub_keeps_the_event_deleted() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 0, 0).await;
    let app = full_app(&db, &fake).await;
    let t = now() - 30;
    let id = fake_stripe::product_id(3);
    fake.add_product(json!({"id": id, "object": "product", "deleted": true}));
    for name in ["A", "B"] {
        let body = product_event(
            &fixtures,
            &format!("evt_X{name}"),
            "product.updated",
            t,
            3,
            name,
        );
        let (status, answer) = deliver_signed(&app.server, &body).await;
        assert_eq!(status, 200, "{answer}");
    }
    assert_eq!(fake.object_requests(), 1);
    let row = format!(
        "SELECT name || '|' || CAST(active AS TEXT) || '|' || CAST(stripe_created AS TEXT) || '|' \
         || CAST(deactivated_at IS NOT NULL AS TEXT) FROM stripe_products WHERE id = '{}'",
        id
    );
    let stored = scalar!(db, String, row);
    let fields: Vec<&str> = stored.split('|').collect();
    assert_eq!(fields[0], "B", "{stored}");
    assert!(matches!(fields[1], "0" | "false"), "{stored}");
    assert_ne!(fields[2], "0", "{stored}");
    assert!(matches!(fields[3], "1" | "true"), "{stored}");
}

#[tokio::test]
async fn same_second_without_stripe_answers_5xx_and_stores_no_ledger_row() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 0, 0).await;
    let app = full_app(&db, &fake).await;
    stripe_now(&fixtures, &fake, 3);
    let t = now() - 30;
    let first = product_event(&fixtures, "evt_U1", "product.updated", t, 3, "First");
    let second = product_event(&fixtures, "evt_U2", "product.updated", t, 3, "Second");
    assert_eq!(deliver_signed(&app.server, &first).await.0, 200);

    fake.fault_objects(Some(Fault::ServerError(None)));
    let (status, body) = deliver_signed(&app.server, &second).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (502, Some("UPSTREAM_UNAVAILABLE")),
        "{body}"
    );
    let ledger = "SELECT COUNT(*) FROM stripe_events WHERE id = 'evt_U2'";
    assert_eq!(count(&db, ledger).await, 0);
    assert_eq!(product_name(&db, 3).await, "First");

    // Without a Stripe key the tie cannot be settled either.
    let without_key = app_without_key(&db).await;
    let (status, body) = deliver_signed(&without_key.server, &second).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("NOT_CONFIGURED")),
        "{body}"
    );
    assert_eq!(count(&db, ledger).await, 0);

    // Stripe redelivers once it answers again.
    fake.fault_objects(None);
    let (status, body) = deliver_signed(&app.server, &second).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(count(&db, ledger).await, 1);
    assert_eq!(product_name(&db, 3).await, "As Stripe has it");
}

/// With the production retry policy and a Stripe that never answers the object request, a
/// same-second event answers 502 (Stripe redelivers) inside the route's 30 s deadline, not 504
/// TIMEOUT: the default policy (4 attempts of 20 s) would outlast it.
#[tokio::test]
async fn same_second_with_stripe_hanging_answers_502_inside_the_route_deadline() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 0, 0).await;
    let app = app(
        &db,
        &[
            ("STRIPE_SECRET_KEY", SECRET_KEY),
            ("STRIPE_API_BASE", fake.base.as_str()),
            ("STRIPE_WEBHOOK_SECRET", WHSEC),
        ],
        RetryPolicy::default(),
    )
    .await;
    stripe_now(&fixtures, &fake, 4);
    let t = now() - 30;
    let first = product_event(&fixtures, "evt_H1", "product.updated", t, 4, "First");
    let second = product_event(&fixtures, "evt_H2", "product.updated", t, 4, "Second");
    assert_eq!(deliver_signed(&app.server, &first).await.0, 200);

    // Every object request is held and never released.
    fake.fault_objects(Some(Fault::Hold));
    let (status, body) = deliver_signed(&app.server, &second).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (502, Some("UPSTREAM_UNAVAILABLE")),
        "{body}"
    );
    assert_eq!(fake.object_requests(), 2, "two attempts");
    let ledger = "SELECT COUNT(*) FROM stripe_events WHERE id = 'evt_H2'";
    assert_eq!(count(&db, ledger).await, 0);
    assert_eq!(product_name(&db, 4).await, "First");
}

/// The periodic reconciliation of `app`, every `interval`, as `run` starts it.
pub(crate) fn spawn_periodic(
    app: &App,
    interval: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    let client = edgegate::stripe::StripeClient::from_config(
        app.state.stripe_http.clone(),
        &app.state.config.stripe,
        fast_retry(),
    )
    .unwrap();
    edgegate::stripe::reconcile::spawn_periodic(
        app.state.store.clone(),
        client,
        app.state.clock.clone(),
        interval,
        app.state.reconcile_metrics.clone(),
        app.state.stripe_metrics.clone(),
    )
}

/// Waits until `sql` counts a row, failing with `what` after `seconds`.
async fn wait_for_a_row(db: &TestDb, sql: &str, seconds: u64, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while count(db, sql).await == 0 {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn periodic_reconciliation_applies_missed_events_with_no_request() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 0, 0).await;
    fake.add_events(history(&fixtures, 4, now() - 60, 1));
    let app = full_app(&db, &fake).await;
    // The configuration allows a minute at least; the task itself takes any interval.
    let task = spawn_periodic(&app, std::time::Duration::from_millis(50));
    let runs = "SELECT COUNT(*) FROM reconcile_runs WHERE started_by = 'periodic' \
                AND outcome = 'ok' AND events_applied = 3 AND events_ignored = 0";
    wait_for_a_row(&db, runs, 20, "no periodic run within 20 s").await;
    // The run is counted after its row is written: wait for that too before stopping the task.
    // The series is there at 0 from the start: wait for a count.
    let line = r#"edgegate_stripe_reconcile_runs_total{started_by="periodic",outcome="ok"} "#;
    let counted = |metrics: &str| {
        metrics
            .lines()
            .filter_map(|l| l.strip_prefix(line))
            .any(|count| count != "0")
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut metrics = String::new();
    while !counted(&metrics) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        metrics = app.server.get("/metrics").await.text().await.unwrap();
    }
    task.abort();
    assert!(counted(&metrics), "{metrics}");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_events").await, 3);
    assert_eq!(product_name(&db, 0).await, "Name 0");
}

/// An instance whose database holds no recent periodic run (none at all here) runs one soon
/// after start, not an interval later: instances restarted more often than the interval
/// (deploys, secret changes) would otherwise never run one.
#[tokio::test]
async fn the_first_periodic_run_comes_soon_when_none_ran_within_the_interval() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 0, 0).await;
    fake.add_events(history(&fixtures, 2, now() - 60, 1));
    let app = full_app(&db, &fake).await;
    // 30 s: the first run is due within 3 s (a tenth of it); waiting 10 s leaves slack.
    let task = spawn_periodic(&app, std::time::Duration::from_secs(30));
    let runs = "SELECT COUNT(*) FROM reconcile_runs WHERE started_by = 'periodic'";
    wait_for_a_row(
        &db,
        runs,
        10,
        "no periodic run within 10 s of start with a 30 s interval and none before",
    )
    .await;
    task.abort();
}

/// Stripe stamps an event with whole seconds, the sync its rows with its own clock: an update
/// Stripe makes in the second the sync fetched and wrote a product must still be applied by
/// its webhook (and the answer, `duplicate: false`, must not say so of an event it dropped).
#[tokio::test]
async fn an_update_in_the_second_a_sync_wrote_is_applied_by_its_webhook() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 1, 0).await;
    let app = full_app(&db, &fake).await;
    assert_eq!(sync(&app.server).await.0, 200);
    let id = fake_stripe::product_id(0);
    let sql = format!("SELECT synced_at FROM stripe_products WHERE id = '{id}'");
    // The second the sync wrote the product in, when it had fetched it.
    let second = scalar!(db, i64, sql) / 1000;
    fake.edit_product(&id, |p| p["name"] = json!("Renamed"));
    let update = product_event(&fixtures, "evt_S1", "product.updated", second, 0, "Renamed");
    let (status, body) = deliver_signed(&app.server, &update).await;
    assert_eq!(
        (status, &body),
        (200, &json!({"received": true, "duplicate": false}))
    );
    assert_eq!(product_name(&db, 0).await, "Renamed");
}

// ---- an event that cannot be applied ----

/// A run that covered everything up to three hours before `t`, then events 0..10 ten minutes
/// apart (event 3 of a type edgegate does not act on), and between events 6 and 7 two updates of
/// product 50 in one second, the second of which needs the product as Stripe has it now.
async fn tied_history(app: &App, db: &TestDb, fixtures: &Value, fake: &FakeStripe, t: i64) {
    covered_up_to(app, db, t - 3 * 3600).await;
    fake.add_events(history(fixtures, 10, t - 9000, 600));
    fake.add_events(["First", "Second"].map(|name| {
        let id = format!("evt_Tie{name}");
        let body = product_event(fixtures, &id, "product.updated", t - 5000, 50, name);
        serde_json::from_str(&body).unwrap()
    }));
    stripe_now(fixtures, fake, 50);
}

/// Stripe refusing the key (403: a restricted key without a permission) is no event's own
/// reason: every event of the kind would be skipped, run after run, each answered 200. The run
/// ends, 502, and covers nothing.
#[tokio::test]
async fn a_key_stripe_refuses_ends_the_run_instead_of_skipping_events() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 0, 0).await;
    let app = full_app(&db, &fake).await;
    let t = now();
    tied_history(&app, &db, &fixtures, &fake, t).await;
    fake.fault_objects(Some(Fault::Forbidden));
    let (status, body) = reconcile(&app.server).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["code"], "UPSTREAM_UNAVAILABLE", "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("refused the key"), "{body}");
}

/// An event refused for a reason of its own (here its object, which settling a same-second tie
/// needs, refused by Stripe with a 4xx) is skipped, counted as ignored, and the run goes on to
/// the older events: Stripe lists newest first, so a run that stopped there never reached them,
/// and every later run stopped at the same event. A run that skipped one does not count as
/// covering its window: the next run lists that window again, and applies the event once Stripe
/// serves its object.
#[tokio::test]
async fn a_listed_event_whose_object_stripe_refuses_is_skipped_and_listed_again_by_the_next_run() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 0, 0).await;
    let app = full_app(&db, &fake).await;
    let t = now();
    tied_history(&app, &db, &fixtures, &fake, t).await;
    fake.fault_objects(Some(Fault::BadRequest(None)));
    let tied = "SELECT COUNT(*) FROM stripe_events WHERE id = 'evt_TieSecond'";

    let (status, body) = reconcile(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["since"], json!(t - 4 * 3600), "{body}");
    assert_eq!(events(&body), (11, 10, 0, 1), "{body}");
    assert_eq!(product_name(&db, 50).await, "First");
    assert_eq!(count(&db, tied).await, 0);
    // The events listed after the refused one (older) were applied.
    for n in [0, 6] {
        assert_eq!(product_name(&db, n).await, format!("Name {n}"));
    }

    // Refused again, and again the run goes on; the window is the same.
    let (status, body) = reconcile(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["since"], json!(t - 4 * 3600), "{body}");
    assert_eq!(events(&body), (11, 0, 10, 1), "{body}");

    fake.fault_objects(None);
    let (status, body) = reconcile(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["since"], json!(t - 4 * 3600), "{body}");
    assert_eq!(events(&body), (11, 1, 10, 0), "{body}");
    assert_eq!(product_name(&db, 50).await, "As Stripe has it");
    assert_eq!(count(&db, tied).await, 1);

    // That run applied everything listed: the coverage moves up to its start.
    let (status, body) = reconcile(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["since"].as_i64().unwrap() >= t - 3600, "{body}");
}

/// An event whose object cannot be read (here `active` a string) is skipped as one refused for a
/// reason of its own is: the run goes on to the older events, and does not count as covering its
/// window, so the next run lists it again (a later build may read it; Stripe lists it for 30
/// days). Skipped as merely ignored, the run covered its window and the event was never listed
/// again by a default run.
#[tokio::test]
async fn a_listed_event_whose_object_cannot_be_read_is_listed_again_by_the_next_run() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 0, 0).await;
    let app = full_app(&db, &fake).await;
    let t = now();
    covered_up_to(&app, &db, t - 3 * 3600).await;
    fake.add_events(history(&fixtures, 10, t - 9000, 600));
    let mut unreadable: Value = serde_json::from_str(&product_event(
        &fixtures,
        "evt_Unreadable",
        "product.updated",
        t - 5000,
        50,
        "Unread",
    ))
    .unwrap();
    unreadable["data"]["object"]["active"] = json!("yes");
    fake.add_events([unreadable]);
    let skipped = "SELECT COUNT(*) FROM stripe_events WHERE id = 'evt_Unreadable'";
    let covering = "SELECT COUNT(*) FROM reconcile_runs WHERE outcome = 'ok' AND continuous";
    let covered_before = count(&db, covering).await;

    let (status, body) = reconcile(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["since"], json!(t - 4 * 3600), "{body}");
    assert_eq!(events(&body), (10, 9, 0, 1), "{body}");
    assert_eq!(count(&db, skipped).await, 0);
    // The events listed after it (older) were applied.
    for n in [0, 6] {
        assert_eq!(product_name(&db, n).await, format!("Name {n}"));
    }
    assert_eq!(count(&db, covering).await, covered_before);

    // The next run lists the same window again, and skips it again.
    let (status, body) = reconcile(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["since"], json!(t - 4 * 3600), "{body}");
    assert_eq!(events(&body), (10, 0, 9, 1), "{body}");
    assert_eq!(count(&db, covering).await, covered_before);
}

/// PostgreSQL stores no U+0000 in text (SQLite does): an event carrying one is stored with
/// U+FFFD in its place on both engines, applied like any other, and the run covers its window
/// (it was skipped on PostgreSQL alone, run after run, and no run covered anything).
#[tokio::test]
async fn a_listed_event_with_u0000_in_its_text_is_applied_alike_on_both_engines() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 0, 0).await;
    let app = full_app(&db, &fake).await;
    let t = now();
    // Events 0..5 a minute apart (event 3 of a type edgegate does not act on, so not listed),
    // and between events 3 and 4 one renaming product 60 to a name with U+0000 in it.
    fake.add_events(history(&fixtures, 5, t - 600, 60));
    let nul = product_event(&fixtures, "evt_Nul", "product.updated", t - 400, 60, "a\0b");
    fake.add_events([serde_json::from_str(&nul).unwrap()]);

    let (status, body) = reconcile(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(events(&body), (5, 5, 0, 0), "{body}");
    assert_eq!(product_name(&db, 0).await, "Name 0");
    assert_eq!(product_name(&db, 60).await, "a\u{FFFD}b");
    let nul = "SELECT COUNT(*) FROM stripe_events WHERE id = 'evt_Nul'";
    assert_eq!(count(&db, nul).await, 1);
    let covering = "SELECT COUNT(*) FROM reconcile_runs WHERE outcome = 'ok' AND continuous";
    assert_eq!(count(&db, covering).await, 1);
}

/// Reconciliation asks Stripe for the event types it applies only (`types[]`, at most 20), not
/// every event of the account.
#[tokio::test]
async fn reconcile_lists_only_the_event_types_it_applies() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 0, 0).await;
    let app = full_app(&db, &fake).await;
    let t = now();
    // Events 3, 10 and 17 are of a type edgegate does not act on.
    fake.add_events(history(&fixtures, 20, t - 600, 5));
    let (status, body) = reconcile(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(events(&body), (17, 17, 0, 0), "{body}");
    let queries = fake.queries();
    let types: Vec<&str> = queries[0]
        .split('&')
        .filter_map(|pair| pair.strip_prefix("types[]="))
        .collect();
    for kind in [
        "product.created",
        "product.updated",
        "product.deleted",
        "price.created",
        "price.updated",
        "price.deleted",
        "checkout.session.completed",
        "customer.subscription.updated",
        "invoice.paid",
        "invoice.payment_failed",
    ] {
        assert!(types.contains(&kind), "{kind} in {}", queries[0]);
    }
    assert!(types.len() <= 20, "{}", queries[0]);
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM stripe_events WHERE event_type = 'payment_intent.created'"
        )
        .await,
        0
    );
}

/// The event a page was to continue after aged out of Stripe's retention (400 on
/// `starting_after`): the run goes on from that event's second, each event handled once.
#[tokio::test]
async fn reconcile_goes_on_when_its_cursor_event_is_gone() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 0, 0).await;
    let app = full_app(&db, &fake).await;
    let t = now();
    let history: Vec<Value> = (0..250)
        .map(|n| {
            let body = product_event(
                &fixtures,
                &format!("evt_C{n:05}"),
                "product.updated",
                t - 2000 + 5 * n as i64,
                n,
                &format!("Name {n}"),
            );
            serde_json::from_str(&body).unwrap()
        })
        .collect();
    fake.add_events(history);
    // The second page's cursor is gone.
    fake.fault_at(1, Fault::CursorGone);
    let (status, body) = reconcile(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(events(&body), (250, 250, 0, 0), "{body}");
    assert_eq!(product_name(&db, 0).await, "Name 0");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_events").await, 250);
    let run = "SELECT COUNT(*) FROM reconcile_runs WHERE outcome = 'ok' AND continuous \
               AND events_seen = 250 AND last_event_id = 'evt_C00000'";
    assert_eq!(count(&db, run).await, 1);

    // Every cursor vanishes: each restart still gets a page further, up to the end.
    fake.fault_from(fake.requests() + 1, Fault::CursorGone);
    let (status, body) = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        reconcile_as(
            &app.server,
            Some(SB_SECRET),
            Some(json!({"since": t - 3000})),
        ),
    )
    .await
    .expect("the run ends");
    assert_eq!(status, 200, "{body}");
    assert_eq!(events(&body), (250, 0, 250, 0), "{body}");
}

/// A reconciliation whose PostgreSQL lock session was ended mid-run (an idle timeout, a pooler
/// restart, an operator's pg_terminate_backend) stops, and its 503 says so, not "the database is
/// unavailable" while the database answered. On a database of its own: the test ends the
/// session that holds an advisory lock there.
#[tokio::test]
async fn a_reconcile_that_lost_its_lock_session_says_so() {
    use futures_util::FutureExt as _;
    let fixtures = stripe_fixtures!();
    let Some(db) = TestDb::postgres_database().await else {
        crate::support::skipped("PostgreSQL only (TEST_POSTGRES_URL)");
        return;
    };
    let outcome = std::panic::AssertUnwindSafe(async {
        let fake = FakeStripe::start(&fixtures, 0, 0).await;
        fake.add_events(history(&fixtures, 5, now() - 60, 1));
        let app = full_app(&db, &fake).await;
        fake.fault_at(0, Fault::Hold);
        let server = app.server;
        let running = tokio::spawn(async move {
            let result = reconcile(&server).await;
            (result, server)
        });
        fake.arrived().await;
        let ended = count(
            &db,
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_locks \
             WHERE locktype = 'advisory' AND database = \
             (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .await;
        assert_eq!(ended, 1, "the lock's session");
        fake.release();
        let ((status, body), _server) = running.await.unwrap();
        assert_eq!(
            (status, &body["code"]),
            (503, &json!("NOT_READY")),
            "{body}"
        );
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains("lock"), "{body}");
    })
    .catch_unwind()
    .await;
    db.drop_database().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

// ---- events that are not the platform account's ----

/// A Connect event (`account` set: it happened in a connected account) sent to an endpoint whose
/// secret edgegate holds: its object is that account's, not the platform's. It is recorded as
/// not applied and answered 200 (Stripe stops retrying), and its object is neither written nor
/// fetched (Stripe would answer the platform key 404 and the row be marked deleted).
#[tokio::test]
async fn a_connected_accounts_event_is_recorded_and_never_applied_nor_fetched() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 1, 0).await;
    let app = full_app(&db, &fake).await;
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    let connect = |id: &str, kind: &str, created: i64, i: usize, name: &str| {
        let mut event: Value =
            serde_json::from_str(&product_event(&fixtures, id, kind, created, i, name)).unwrap();
        event["account"] = json!("acct_1Seller");
        event.to_string()
    };
    let t = now() - 30;
    let created = connect("evt_A1", "product.created", t, 5, "Seller's shirt");
    let (status, body) = deliver_signed(&app.server, &created).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"received": true, "duplicate": false}));
    // Two of one second, which for the platform would ask Stripe for the object.
    for (id, name) in [("evt_A2", "One"), ("evt_A3", "Two")] {
        let body = connect(id, "product.updated", t, 6, name);
        let (status, answer) = deliver_signed(&app.server, &body).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["duplicate"], false, "{answer}");
    }
    assert_eq!(fake.object_requests(), 0, "nothing asked of Stripe");
    let rows = format!(
        "SELECT COUNT(*) FROM stripe_products WHERE id IN ('{}', '{}')",
        fake_stripe::product_id(5),
        fake_stripe::product_id(6)
    );
    assert_eq!(count(&db, &rows).await, 0);
    let unapplied = "SELECT COUNT(*) FROM stripe_events WHERE id IN ('evt_A1', 'evt_A2', \
                     'evt_A3') AND applied = FALSE";
    assert_eq!(count(&db, unapplied).await, 3);
    let (status, body) = deliver_signed(&app.server, &created).await;
    assert_eq!((status, &body["duplicate"]), (200, &json!(true)), "{body}");

    // The next sync leaves the platform's catalogue as it is.
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["products"]["deactivated"], 0, "{body}");

    // A listed event is handled alike (Stripe lists the platform's own events only).
    let listed = connect("evt_A4", "product.updated", t, 7, "Listed");
    fake.add_events([serde_json::from_str::<Value>(&listed).unwrap()]);
    let (status, body) = reconcile(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(events(&body), (1, 0, 0, 1), "{body}");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_products").await, 1);

    let metrics = app.server.get("/metrics").await.text().await.unwrap();
    let line = r#"edgegate_stripe_webhook_events_total{event_type="product.updated",outcome="connect_account"} 2"#;
    assert!(metrics.contains(line), "{line} in {metrics}");
}

/// An event of the other mode than `STRIPE_SECRET_KEY` (a live event to an instance with a test
/// key, or the reverse: an endpoint of the other mode signed with a secret edgegate holds) is
/// recorded and not applied; without a key the mode is unknown and the event applied.
#[tokio::test]
async fn an_event_of_the_other_mode_than_the_key_is_recorded_and_not_applied() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 0, 0).await;
    let in_mode = |id: &str, i: usize, livemode: bool| {
        let mut event: Value = serde_json::from_str(&product_event(
            &fixtures,
            id,
            "product.created",
            now() - 30,
            i,
            "Other mode",
        ))
        .unwrap();
        event["livemode"] = json!(livemode);
        event["data"]["object"]["livemode"] = json!(livemode);
        event.to_string()
    };
    let test_key = full_app(&db, &fake).await;
    let live_key = app(
        &db,
        &[
            ("STRIPE_SECRET_KEY", "rk_live_edgegate0123456789abcdef"),
            ("STRIPE_API_BASE", fake.base.as_str()),
            ("STRIPE_WEBHOOK_SECRET", WHSEC),
        ],
        fast_retry(),
    )
    .await;
    let no_key = app_without_key(&db).await;
    for (app, id, i, livemode) in [
        (&test_key, "evt_M1", 1, true),
        (&live_key, "evt_M2", 2, false),
    ] {
        let (status, body) = deliver_signed(&app.server, &in_mode(id, i, livemode)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, json!({"received": true, "duplicate": false}));
        let row = format!(
            "SELECT COUNT(*) FROM stripe_products WHERE id = '{}'",
            fake_stripe::product_id(i)
        );
        assert_eq!(count(&db, &row).await, 0, "{id}");
        let ledger =
            format!("SELECT COUNT(*) FROM stripe_events WHERE id = '{id}' AND NOT applied");
        assert_eq!(count(&db, &ledger).await, 1, "{id}");
        let metrics = app.server.get("/metrics").await.text().await.unwrap();
        let line = r#"edgegate_stripe_webhook_events_total{event_type="product.created",outcome="livemode_mismatch"} 1"#;
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    // The same mode as the key, or no key: applied.
    for (app, id, i, livemode) in [
        (&test_key, "evt_M3", 3, false),
        (&live_key, "evt_M4", 4, true),
        (&no_key, "evt_M5", 5, true),
    ] {
        let (status, body) = deliver_signed(&app.server, &in_mode(id, i, livemode)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(product_name(&db, i).await, "Other mode", "{id}");
    }
}
