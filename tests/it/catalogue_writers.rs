//! Catalogue rows an earlier build wrote while this one served beside it (a rolling deploy) or
//! instead of it (a rollback): that build writes products and prices without the columns it does
//! not know, which keep an earlier value while the row looks current, and neither a redelivered
//! event (a duplicate) nor a reconciliation (already applied) writes them again. The periodic
//! task finds them, at start and after each run, and has the sync rewrite them from Stripe.

use std::time::{Duration, Instant};

use crate::fake_stripe::{self, FakeStripe, Fault};
use crate::reconcile::spawn_periodic;
use crate::stripe::{App, count, fast_retry, scalar, sync, sync_app, sync_app_on_clock};
use crate::support::{TestDb, now_ms};
use crate::{stripe_fixtures, test_db};
use edgegate::clock::Clock;

/// The columns of product `id` that the build before `written_rev` did not know, with its name.
async fn product_columns(db: &TestDb, id: &str) -> String {
    let sql = format!(
        "SELECT name || '|' || COALESCE(images, 'null') || '|' || COALESCE(unit_label, 'null') \
         || '|' || COALESCE(url, 'null') FROM stripe_products WHERE id = '{id}'"
    );
    scalar!(db, String, sql)
}

/// Writes `sql` (an UPDATE or INSERT of one row, ending in `RETURNING 1`) as another build would.
async fn write_as_an_earlier_build(db: &TestDb, sql: &str) {
    assert_eq!(scalar!(db, i32, sql), 1, "{sql}");
}

/// An instance on `clock` that synced the fake's catalogue, product 1 of which an earlier build
/// then wrote.
async fn synced_with_a_row_of_an_earlier_build(
    db: &TestDb,
    fake: &FakeStripe,
    clock: Clock,
) -> App {
    let app = sync_app_on_clock(db, fake, fast_retry(), clock).await;
    assert_eq!(sync(&app.server).await.0, 200);
    write_as_an_earlier_build(
        db,
        &format!(
            "UPDATE stripe_products SET synced_at = synced_at + 5 WHERE id = '{}' RETURNING 1",
            fake_stripe::product_id(1)
        ),
    )
    .await;
    app
}

#[tokio::test]
async fn rows_an_earlier_build_wrote_are_rewritten_from_stripe() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 3, 9).await;
    let app = sync_app(&db, &fake, fast_retry()).await;
    assert_eq!(sync(&app.server).await.0, 200);
    let store = &app.state.store;
    assert_eq!(store.catalogue_rows_by_earlier_builds().await.unwrap(), 0);

    // The earlier build applies an event of product 0 (renamed; its images, unit label and URL
    // removed in Stripe): it writes the name and moves `synced_at`, and leaves the columns it
    // does not know. It also writes a price of a product first seen by it.
    let (product, price) = (fake_stripe::product_id(0), fake_stripe::price_id(1));
    let current = product_columns(&db, &product).await;
    write_as_an_earlier_build(
        &db,
        &format!(
            "UPDATE stripe_products SET name = 'Renamed by the earlier build', \
             images = '[\"https://old.example/a.png\"]', unit_label = 'seat', \
             url = 'https://old.example/a', synced_at = synced_at + 5 WHERE id = '{product}' \
             RETURNING 1"
        ),
    )
    .await;
    write_as_an_earlier_build(
        &db,
        &format!(
            "UPDATE stripe_prices SET recurring_usage_type = NULL, synced_at = synced_at + 5 \
             WHERE id = '{price}' RETURNING 1"
        ),
    )
    .await;
    assert_eq!(store.catalogue_rows_by_earlier_builds().await.unwrap(), 2);
    let runs = count(&db, "SELECT COUNT(*) FROM sync_runs").await;

    // An hour's interval: only the check at start can rewrite them within the test.
    let task = spawn_periodic(&app, Duration::from_secs(3600));
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.catalogue_rows_by_earlier_builds().await.unwrap() > 0 {
        assert!(
            Instant::now() < deadline,
            "rows of an earlier build still there 20 s after start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    task.abort();
    assert_eq!(product_columns(&db, &product).await, current);
    let usage = format!(
        "SELECT COUNT(*) FROM stripe_prices WHERE id = '{price}' AND recurring_usage_type IS NOT NULL"
    );
    assert_eq!(count(&db, &usage).await, 1, "the price is rewritten too");
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM sync_runs").await,
        runs + 1,
        "one sync"
    );

    // Rewritten, they are this build's: a rerun of the task finds nothing and syncs nothing.
    let task = spawn_periodic(&app, Duration::from_secs(3600));
    tokio::time::sleep(Duration::from_millis(500)).await;
    task.abort();
    assert_eq!(count(&db, "SELECT COUNT(*) FROM sync_runs").await, runs + 1);
}

/// A row an earlier build wrote for an event of the very second the check at start runs in is
/// rewritten by that check. The sync's pages count as of the second before they were asked for
/// (so that they never overwrite an event newer than what Stripe served), which made such a row
/// look newer than the listing: it was left for the next check, an interval later, while the log
/// said the rows were rewritten. The check now waits for the listing's as-of to reach the rows it
/// is to rewrite (about 2 s at most) before it syncs.
#[tokio::test]
async fn a_row_an_earlier_build_wrote_just_before_the_check_is_rewritten_by_it() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 2, 6).await;
    let app = sync_app(&db, &fake, fast_retry()).await;
    assert_eq!(sync(&app.server).await.0, 200);
    let store = &app.state.store;
    let product = fake_stripe::product_id(0);
    let current = product_columns(&db, &product).await;
    // The earlier build applies an event Stripe stamped this second (whole seconds, in ms).
    let event_created = now_ms() / 1000 * 1000;
    write_as_an_earlier_build(
        &db,
        &format!(
            "UPDATE stripe_products SET name = 'Renamed by the earlier build', \
             url = 'https://old.example/a', last_event_created = {event_created}, \
             synced_at = synced_at + 5 WHERE id = '{product}' RETURNING 1"
        ),
    )
    .await;
    assert_eq!(store.catalogue_rows_by_earlier_builds().await.unwrap(), 1);
    let ok = "SELECT COUNT(*) FROM sync_runs WHERE outcome = 'ok'";
    let synced = count(&db, ok).await;

    // An hour's interval: the check at start is the first (a periodic run's check may follow it
    // within the test; only the first closing line is read).
    let task = spawn_periodic(&app, Duration::from_secs(3600));
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(&db, ok).await == synced {
        assert!(Instant::now() < deadline, "no sync 20 s after start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    task.abort();
    assert_eq!(
        store.catalogue_rows_by_earlier_builds().await.unwrap(),
        0,
        "the check at start left the row of an earlier build for the next check"
    );
    assert_eq!(product_columns(&db, &product).await, current);
    let upserted = "SELECT products_upserted FROM sync_runs WHERE outcome = 'ok' \
                    ORDER BY started_at DESC LIMIT 1";
    assert_eq!(count(&db, upserted).await, 1, "the rewrite wrote the row");
}

/// A row an earlier build wrote with state stamped ahead of this host's clock (that build's
/// clock ran ahead) is newer than any listing until the clock passes it: no wait capped at 3 s
/// lets a sync overwrite it. The check waited those 3 s at every check for nothing and said
/// "the next check rewrites them"; it now syncs at once and warns, once, how far ahead the row
/// is (`ahead_s`) and what to do.
#[tokio::test]
async fn a_row_stamped_ahead_of_this_hosts_clock_is_warned_of_once_and_not_waited_for() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 2, 6).await;
    let app = sync_app(&db, &fake, fast_retry()).await;
    assert_eq!(sync(&app.server).await.0, 200);
    let store = &app.state.store;
    let product = fake_stripe::product_id(0);
    // The earlier build's clock ran an hour ahead.
    let hour_ms = 3_600_000;
    let event_created = now_ms() + hour_ms;
    write_as_an_earlier_build(
        &db,
        &format!(
            "UPDATE stripe_products SET name = 'Renamed by the earlier build', \
             last_event_created = {event_created}, synced_at = synced_at + 5 \
             WHERE id = '{product}' RETURNING 1"
        ),
    )
    .await;

    let logs = crate::support::JsonLogs::default();
    let _capture = logs.start();
    // Checks after every run, 50 ms apart: each syncs, as the row is left. Counted by the line
    // closing each check (written after its sync_runs row and the count of rows left).
    let rewritten = "catalogue rows of earlier builds rewritten";
    let started = Instant::now();
    let task = spawn_periodic(&app, Duration::from_millis(50));
    let deadline = started + Duration::from_secs(20);
    while logs.lines(rewritten).len() < 4 {
        assert!(Instant::now() < deadline, "no four syncs 20 s after start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = started.elapsed();
    task.abort();
    // Four checks that each waited the 3 s cap take 12 s at least (sleeps are lower bounds);
    // without waiting they take 0.3-1.5 s, so 11 s is a margin for a loaded machine. Not left to
    // the DEBUG line below, whose callsite another test's thread (without this subscriber) can
    // leave off.
    assert!(
        took < Duration::from_secs(11),
        "four checks took {took:?}: they waited for a listing they cannot get"
    );
    let ahead = logs.lines("catalogue rows of earlier builds hold state stamped");
    assert_eq!(ahead.len(), 1, "one warning for four checks: {ahead:?}");
    assert_eq!(ahead[0]["level"], "WARN", "{:?}", ahead[0]);
    let ahead_s = ahead[0]["ahead_s"].as_i64().unwrap();
    assert!(
        (hour_ms / 1000 - 30..=hour_ms / 1000).contains(&ahead_s),
        "ahead_s {ahead_s}"
    );
    let waits = logs.lines("catalogue sync for rows of earlier builds waits for");
    assert!(
        waits.is_empty(),
        "waited for a listing it cannot get: {waits:?}"
    );
    let closing = logs.lines(rewritten);
    assert!(closing.len() >= 4, "{closing:?}");
    for line in &closing {
        assert_eq!(line["rows_left"], 1, "{line:?}");
        let message = line["message"].as_str().unwrap();
        assert!(!message.contains("next check rewrites"), "{message}");
    }
    // Left as the earlier build wrote it, until this host's clock passes its stamp.
    assert_eq!(store.catalogue_rows_by_earlier_builds().await.unwrap(), 1);
}

/// Rows an earlier build wrote for events of the last second are waited for even while another
/// of its rows holds state stamped ahead of this host's clock. The check did not wait at all once
/// one row was stamped past what a wait of 3 s covers, so those recent rows, which the wait would
/// have covered, were left for the next check, an interval later; it now waits for the newest row
/// a wait can cover and warns of the one ahead.
#[tokio::test]
async fn a_row_stamped_ahead_does_not_keep_the_check_from_waiting_for_recent_ones() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 2, 6).await;
    let app = sync_app(&db, &fake, fast_retry()).await;
    assert_eq!(sync(&app.server).await.0, 200);
    let store = &app.state.store;
    let (ahead, recent) = (fake_stripe::product_id(0), fake_stripe::product_id(1));
    let current = product_columns(&db, &recent).await;
    // The earlier build applied an event an hour ahead (its clock ran ahead then) and one Stripe
    // stamped the next second (whole seconds, in ms): a listing asked for at once counts as of
    // before it however late in this second the test reads the clock, so only the wait covers it.
    let hour_ms = 3_600_000;
    for (product, event_created) in [
        (&ahead, now_ms() + hour_ms),
        (&recent, (now_ms() / 1000 + 1) * 1000),
    ] {
        write_as_an_earlier_build(
            &db,
            &format!(
                "UPDATE stripe_products SET name = 'Renamed by the earlier build', \
                 url = 'https://old.example/a', last_event_created = {event_created}, \
                 synced_at = synced_at + 5 WHERE id = '{product}' RETURNING 1"
            ),
        )
        .await;
    }
    assert_eq!(store.catalogue_rows_by_earlier_builds().await.unwrap(), 2);

    let logs = crate::support::JsonLogs::default();
    let _capture = logs.start();
    // An hour's interval: the check at start is the only one within the test.
    let closing = "catalogue rows of earlier builds rewritten";
    let task = spawn_periodic(&app, Duration::from_secs(3600));
    let deadline = Instant::now() + Duration::from_secs(20);
    while logs.lines(closing).is_empty() {
        assert!(Instant::now() < deadline, "no sync 20 s after start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    task.abort();
    assert_eq!(
        product_columns(&db, &recent).await,
        current,
        "the check at start left the recent row of an earlier build for the next check"
    );
    let lines = logs.lines(closing);
    assert_eq!(
        lines[0]["rows_left"], 1,
        "only the row ahead is left: {lines:?}"
    );
    let left = format!(
        "SELECT COUNT(*) FROM stripe_products WHERE id = '{ahead}' \
         AND name = 'Renamed by the earlier build'"
    );
    assert_eq!(
        count(&db, &left).await,
        1,
        "the row ahead is left as written"
    );
    let warned = logs.lines("catalogue rows of earlier builds hold state stamped");
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert_eq!(warned[0]["level"], "WARN", "{:?}", warned[0]);
    let ahead_s = warned[0]["ahead_s"].as_i64().unwrap();
    assert!(
        (hour_ms / 1000 - 30..=hour_ms / 1000).contains(&ahead_s),
        "ahead_s {ahead_s}"
    );
}

/// A sync's stamp of the rows it found unchanged keeps them this build's (else every sync would
/// call for the next); rows from before the columns count as an earlier build's until synced.
#[tokio::test]
async fn rows_this_build_writes_are_never_taken_for_an_earlier_builds() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 4, 12).await;
    let app = sync_app(&db, &fake, fast_retry()).await;
    let store = &app.state.store;
    let written = |body: &serde_json::Value| {
        (
            body["products"]["upserted"].as_i64(),
            body["prices"]["upserted"].as_i64(),
        )
    };
    assert_eq!(sync(&app.server).await.0, 200);
    assert_eq!(store.catalogue_rows_by_earlier_builds().await.unwrap(), 0);
    let (status, body) = sync(&app.server).await;
    assert_eq!(
        (status, written(&body)),
        (200, (Some(0), Some(0))),
        "{body}"
    );
    assert_eq!(store.catalogue_rows_by_earlier_builds().await.unwrap(), 0);
    // A later build's rows (a higher `written_rev`, written beside this one in its rolling
    // deploy) are not this build's to rewrite: each would rewrite the other's back.
    write_as_an_earlier_build(
        &db,
        &format!(
            "UPDATE stripe_products SET written_rev = 2 WHERE id = '{}' RETURNING 1",
            fake_stripe::product_id(2)
        ),
    )
    .await;
    assert_eq!(store.catalogue_rows_by_earlier_builds().await.unwrap(), 0);
    // Rows written before the column existed count as an earlier build's.
    write_as_an_earlier_build(
        &db,
        &format!(
            "UPDATE stripe_products SET written_rev = NULL, written_synced_at = NULL \
             WHERE id = '{}' RETURNING 1",
            fake_stripe::product_id(3)
        ),
    )
    .await;
    assert_eq!(store.catalogue_rows_by_earlier_builds().await.unwrap(), 1);
    // A sync writes both: that one, and the later build's as this build's (that build then
    // finds it an earlier build's and writes it back).
    let (status, body) = sync(&app.server).await;
    assert_eq!(
        (status, written(&body)),
        (200, (Some(2), Some(0))),
        "{body}"
    );
    assert_eq!(store.catalogue_rows_by_earlier_builds().await.unwrap(), 0);
}

/// A sync that cannot succeed (a restricted key without read access to products and prices:
/// Stripe answers 403) is tried at start, and then not after every periodic run, on every
/// instance, for ever: a day later.
#[tokio::test]
async fn a_rewrite_that_fails_is_not_tried_again_after_every_run() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 2, 6).await;
    let app = synced_with_a_row_of_an_earlier_build(&db, &fake, Clock::system()).await;
    let syncs = count(&db, "SELECT COUNT(*) FROM sync_runs").await;
    fake.fault_from(0, Fault::Forbidden);

    let task = spawn_periodic(&app, Duration::from_millis(50));
    let runs = "SELECT COUNT(*) FROM reconcile_runs WHERE started_by = 'periodic'";
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(&db, runs).await < 5 {
        assert!(
            Instant::now() < deadline,
            "no five periodic runs within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    task.abort();
    let failed = "SELECT COUNT(*) FROM sync_runs WHERE outcome = 'upstream_error'";
    assert_eq!(count(&db, failed).await, 1, "the start's sync alone");
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM sync_runs").await,
        syncs + 1
    );
}

/// A sync that failed for a while only (Stripe answering 500 past the retries) is no refused key:
/// it is tried again after the next periodic run, not a day later, and rewrites the rows once
/// Stripe answers.
#[tokio::test]
async fn a_rewrite_that_fails_for_a_while_is_tried_again_after_the_next_run() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 2, 6).await;
    let app = synced_with_a_row_of_an_earlier_build(&db, &fake, Clock::system()).await;
    let store = &app.state.store;
    assert_eq!(store.catalogue_rows_by_earlier_builds().await.unwrap(), 1);
    fake.fault_from(0, Fault::ServerError(None));

    let task = spawn_periodic(&app, Duration::from_millis(50));
    let failed = "SELECT COUNT(*) FROM sync_runs WHERE outcome = 'upstream_error'";
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(&db, failed).await < 3 {
        assert!(
            Instant::now() < deadline,
            "a failed rewrite not tried again after the periodic runs within 20 s ({} failed syncs)",
            count(&db, failed).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fake.clear_faults();
    // The rows are written before the run is recorded: wait for its record.
    let ok = "SELECT COUNT(*) FROM sync_runs WHERE outcome = 'ok'";
    while count(&db, ok).await < 2 {
        assert!(
            Instant::now() < deadline,
            "no rewrite 20 s after start, Stripe answering again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.catalogue_rows_by_earlier_builds().await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    task.abort();
    assert_eq!(count(&db, ok).await, 2, "the test's sync and one rewrite");
}

/// Waits until `n` more periodic runs have started: the check for rows of earlier builds after
/// each run but the last is then done (it comes before the next run).
async fn periodic_runs(db: &TestDb, n: i64) {
    let runs = "SELECT COUNT(*) FROM reconcile_runs WHERE started_by = 'periodic'";
    let target = count(db, runs).await + n;
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(db, runs).await < target {
        assert!(
            Instant::now() < deadline,
            "no {n} periodic runs within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const FAILED_SYNCS: &str = "SELECT COUNT(*) FROM sync_runs WHERE outcome = 'upstream_error'";

/// Fewer rows of earlier builds than the failed sync had to rewrite is no new deploy: this build
/// wrote some of them meanwhile (a webhook, a reconciliation, the failed sync's own first pages),
/// and the wait goes on. Ending it there tried the sync again after every periodic run, as long
/// as webhooks kept coming.
#[tokio::test]
async fn a_rewrite_waiting_after_a_failure_waits_on_when_fewer_rows_are_left() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 2, 6).await;
    let clock = Clock::manual();
    let app = synced_with_a_row_of_an_earlier_build(&db, &fake, clock.clone()).await;
    let product = fake_stripe::product_id(0);
    write_as_an_earlier_build(
        &db,
        &format!(
            "UPDATE stripe_products SET synced_at = synced_at + 5 WHERE id = '{product}' \
             RETURNING 1"
        ),
    )
    .await;
    let store = &app.state.store;
    assert_eq!(store.catalogue_rows_by_earlier_builds().await.unwrap(), 2);
    fake.fault_from(0, Fault::BadRequest(None));
    let task = spawn_periodic(&app, Duration::from_millis(50));
    periodic_runs(&db, 4).await;
    assert_eq!(count(&db, FAILED_SYNCS).await, 1, "the start's sync alone");

    // This build writes one of the two, as a webhook's event does.
    write_as_an_earlier_build(
        &db,
        &format!(
            "UPDATE stripe_products SET written_rev = 1, written_synced_at = synced_at \
             WHERE id = '{product}' RETURNING 1"
        ),
    )
    .await;
    assert_eq!(store.catalogue_rows_by_earlier_builds().await.unwrap(), 1);
    periodic_runs(&db, 4).await;
    task.abort();
    assert_eq!(count(&db, FAILED_SYNCS).await, 1, "still waiting");
}

/// A sync of earlier builds' rows that fails alike every time (Stripe answering 400: a request
/// it will refuse again) is not tried after every periodic run, on one instance after another:
/// the wait doubles from one interval (up to a day), and ends when more rows are to be rewritten or
/// the sync succeeds. On a manual clock that stands still between runs, only the test's steps
/// let a wait run out.
#[tokio::test]
async fn a_rewrite_that_fails_alike_is_tried_again_less_and_less_often() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 2, 6).await;
    let clock = Clock::manual();
    let app = synced_with_a_row_of_an_earlier_build(&db, &fake, clock.clone()).await;
    fake.fault_from(0, Fault::BadRequest(None));
    let interval = Duration::from_millis(50);

    let task = spawn_periodic(&app, interval);
    periodic_runs(&db, 4).await;
    assert_eq!(count(&db, FAILED_SYNCS).await, 1, "the start's sync alone");
    clock.advance(interval);
    periodic_runs(&db, 3).await;
    assert_eq!(
        count(&db, FAILED_SYNCS).await,
        2,
        "tried again an interval later"
    );
    clock.advance(interval);
    periodic_runs(&db, 3).await;
    assert_eq!(
        count(&db, FAILED_SYNCS).await,
        2,
        "then not before two intervals"
    );
    clock.advance(interval);
    periodic_runs(&db, 3).await;
    assert_eq!(
        count(&db, FAILED_SYNCS).await,
        3,
        "tried two intervals later"
    );

    // Another row of an earlier build (a new deploy or rollback) is tried at the next run.
    write_as_an_earlier_build(
        &db,
        &format!(
            "UPDATE stripe_products SET synced_at = synced_at + 5 WHERE id = '{}' RETURNING 1",
            fake_stripe::product_id(0)
        ),
    )
    .await;
    periodic_runs(&db, 3).await;
    assert_eq!(
        count(&db, FAILED_SYNCS).await,
        4,
        "tried once more rows were to be rewritten"
    );

    // Stripe answering again, the rows are rewritten once the wait (an interval again) is over.
    fake.clear_faults();
    periodic_runs(&db, 3).await;
    let ok = "SELECT COUNT(*) FROM sync_runs WHERE outcome = 'ok'";
    assert_eq!(count(&db, ok).await, 1, "the test's sync alone");
    clock.advance(interval);
    periodic_runs(&db, 3).await;
    task.abort();
    assert_eq!(count(&db, ok).await, 2);
    let rows = app.state.store.catalogue_rows_by_earlier_builds().await;
    assert_eq!(rows.unwrap(), 0);
}

/// A sync of earlier builds' rows that failed for a while only (Stripe answering 500 past the
/// retries) is tried again after the next periodic run; failing again, it waits as one that
/// fails alike.
#[tokio::test]
async fn a_rewrite_that_fails_for_a_while_is_tried_at_the_next_run_then_waits() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 2, 6).await;
    let clock = Clock::manual();
    let app = synced_with_a_row_of_an_earlier_build(&db, &fake, clock.clone()).await;
    fake.fault_from(0, Fault::ServerError(None));
    let interval = Duration::from_millis(50);

    let task = spawn_periodic(&app, interval);
    periodic_runs(&db, 4).await;
    assert_eq!(
        count(&db, FAILED_SYNCS).await,
        2,
        "the start's sync and the one after the first run"
    );
    clock.advance(interval);
    periodic_runs(&db, 3).await;
    task.abort();
    assert_eq!(count(&db, FAILED_SYNCS).await, 3, "an interval later");
}

/// The sync of earlier builds' rows is counted on `/metrics` as the periodic task's
/// (`started_by="periodic"`), apart from the syncs asked for (`manual`): nobody asked for it, but
/// an operator must be able to alert on it failing.
#[tokio::test]
async fn rewrites_are_counted_on_metrics_as_the_periodic_tasks() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 2, 6).await;
    let app = synced_with_a_row_of_an_earlier_build(&db, &fake, Clock::system()).await;
    fake.fault_from(0, Fault::ServerError(None));

    let task = spawn_periodic(&app, Duration::from_millis(50));
    let failed = "SELECT COUNT(*) FROM sync_runs WHERE outcome = 'upstream_error'";
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(&db, failed).await < 1 {
        assert!(Instant::now() < deadline, "no failed rewrite within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fake.clear_faults();
    // Counted after its run row is written: wait for the count of the one that succeeds.
    let series = |outcome: &str| {
        format!(r#"edgegate_stripe_sync_runs_total{{started_by="periodic",outcome="{outcome}"}} "#)
    };
    let counted = |metrics: &str, outcome: &str| {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(&series(outcome)))
            .map(|n| n.parse::<i64>().unwrap())
    };
    let mut metrics = String::new();
    while counted(&metrics, "ok") != Some(1) {
        assert!(
            Instant::now() < deadline,
            "no periodic sync counted ok within 20 s:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        metrics = app.server.get("/metrics").await.text().await.unwrap();
    }
    task.abort();
    let rows = app.state.store.catalogue_rows_by_earlier_builds().await;
    assert_eq!(rows.unwrap(), 0);
    assert_eq!(
        counted(&metrics, "upstream_error"),
        Some(count(&db, failed).await),
        "every failed rewrite counted:\n{metrics}"
    );
    // The test's own sync, asked for, is counted apart.
    let manual = r#"edgegate_stripe_sync_runs_total{started_by="manual",outcome="ok"} 1"#;
    assert!(
        metrics.lines().any(|line| line == manual),
        "{manual} in:\n{metrics}"
    );
}

/// The first periodic run after a start is timed from the last one: a row stamped a day ahead
/// (while the wall clock ran ahead, since set back) says nothing of when that was, and must not
/// hide the true last run behind it (taken as none, every start ran one at once; the start's
/// sync, which may take minutes, comes before the read).
#[tokio::test]
async fn the_last_periodic_run_is_not_hidden_by_one_stamped_ahead() {
    let db = test_db!();
    let store = db.store().await;
    let now = now_ms();
    let run = |id: &'static str, started_at: i64| {
        let store = store.clone();
        async move {
            store
                .start_reconcile_run(id, "periodic", 0, started_at, true)
                .await
                .unwrap();
        }
    };
    assert_eq!(store.last_periodic_reconcile(now).await.unwrap(), None);
    run("ten-minutes-ago", now - 600_000).await;
    run("a-day-ahead", now + 86_400_000).await;
    assert_eq!(
        store.last_periodic_reconcile(now).await.unwrap(),
        Some(now - 600_000),
        "the true last run, ten minutes ago"
    );
    // Another instance's clock a little fast still counts.
    run("seconds-ahead", now + 30_000).await;
    assert_eq!(
        store.last_periodic_reconcile(now).await.unwrap(),
        Some(now + 30_000)
    );
}
