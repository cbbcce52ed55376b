//! Stripe through HTTP, as the contract states it: the catalogue sync against a fake Stripe
//! built from Stripe's own objects, and webhooks signed by Stripe's official Python SDK.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::now_ms;
use edgegate::AppState;
use edgegate::clock::Clock;
use edgegate::stripe::RetryPolicy;
use serde_json::{Value, json};

use crate::fake_stripe::{
    self, FakeStripe, Fault, NO_EVENTS_KEY, RESTRICTED_KEY, SECRET_KEY, product_id, resource,
};
use crate::support::{TestDb, TestServer, serve, serve_app};
use crate::{stripe_fixtures, test_db};
use edgegate::server::middleware::Limits;

pub(crate) const SB_SECRET: &str = "sb_secret_0123456789abcdefghijklmn";
pub(crate) const WHSEC: &str = "whsec_edgegate_test_current";
const WHSEC_NEXT: &str = "whsec_edgegate_test_next";
const WHSEC_OTHER: &str = "whsec_edgegate_test_unrelated";

pub(crate) fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true")
}

/// Retries without real waiting: tests exercise the decisions, not the delays.
pub(crate) fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(4),
        attempt_timeout: Duration::from_secs(10),
    }
}

pub(crate) struct App {
    pub(crate) server: TestServer,
    #[allow(dead_code)]
    pub(crate) state: AppState,
}

pub(crate) async fn app(db: &TestDb, vars: &[(&str, &str)], retry: RetryPolicy) -> App {
    app_with_clock(db, vars, retry, Clock::system()).await
}

/// As [`app`], reading time from `clock`.
pub(crate) async fn app_with_clock(
    db: &TestDb,
    vars: &[(&str, &str)],
    retry: RetryPolicy,
    clock: Clock,
) -> App {
    let secret_keys = format!(r#"{{"backend":"{SB_SECRET}"}}"#);
    let mut all = vec![("SUPABASE_SECRET_KEYS", secret_keys.as_str())];
    all.extend_from_slice(vars);
    let state =
        AppState::with_clock(db.config(&all), db.store().await, clock).with_stripe_retry(retry);
    let server = serve_app(edgegate::app(state.clone()), Duration::from_secs(5)).await;
    App { server, state }
}

/// The settings that point edgegate's Stripe client at `fake` with its secret key.
fn stripe_vars(fake: &FakeStripe) -> [(&'static str, &str); 2] {
    [
        ("STRIPE_SECRET_KEY", SECRET_KEY),
        ("STRIPE_API_BASE", fake.base.as_str()),
    ]
}

/// As [`stripe_vars`], with the webhook secret [`WHSEC`]: for a test of the sync and events.
pub(crate) fn stripe_and_webhook_vars(fake: &FakeStripe) -> [(&'static str, &str); 3] {
    let [key, base] = stripe_vars(fake);
    [key, base, ("STRIPE_WEBHOOK_SECRET", WHSEC)]
}

pub(crate) async fn sync_app(db: &TestDb, fake: &FakeStripe, retry: RetryPolicy) -> App {
    app(db, &stripe_vars(fake), retry).await
}

/// As [`sync_app`], reading time from `clock`.
pub(crate) async fn sync_app_on_clock(
    db: &TestDb,
    fake: &FakeStripe,
    retry: RetryPolicy,
    clock: Clock,
) -> App {
    app_with_clock(db, &stripe_vars(fake), retry, clock).await
}

pub(crate) async fn sync(server: &TestServer) -> (u16, Value) {
    let response = server
        .client
        .post(server.url("/functions/v1/sync-stripe-products-hardened"))
        .header("apikey", SB_SECRET)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Runs one query on the test database and returns its single value.
macro_rules! scalar {
    ($db:expr, $ty:ty, $sql:expr) => {{
        let sql = sqlx::AssertSqlSafe($sql.to_string());
        if $db.is_postgres() {
            let pool = sqlx::PgPool::connect(&$db.url).await.unwrap();
            let value: $ty = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
            pool.close().await;
            value
        } else {
            let pool = sqlx::SqlitePool::connect(&$db.url).await.unwrap();
            let value: $ty = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
            pool.close().await;
            value
        }
    }};
}

pub(crate) use scalar;

pub(crate) async fn count(db: &TestDb, sql: &str) -> i64 {
    scalar!(db, i64, sql)
}

/// Counts the rows that hold product `i` inactive and deactivated (1 where it is).
fn deactivated_product(i: usize) -> String {
    format!(
        "SELECT COUNT(*) FROM stripe_products WHERE id = '{}' AND active = FALSE \
         AND deactivated_at IS NOT NULL",
        product_id(i)
    )
}

/// How many products, and how many prices, the syncs have marked deactivated.
const PRODUCTS_DEACTIVATED: &str =
    "SELECT COUNT(*) FROM stripe_products WHERE deactivated_at IS NOT NULL";
const PRICES_DEACTIVATED: &str =
    "SELECT COUNT(*) FROM stripe_prices WHERE deactivated_at IS NOT NULL";

fn counts(body: &Value, resource: &str) -> (i64, i64, i64) {
    let part = &body[resource];
    (
        part["seen"].as_i64().unwrap(),
        part["upserted"].as_i64().unwrap(),
        part["deactivated"].as_i64().unwrap(),
    )
}

#[tokio::test]
async fn sync_lists_every_page_and_a_rerun_upserts_nothing() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 2500, 7500).await;
    let app = sync_app(&db, &fake, fast_retry()).await;

    let started = Instant::now();
    let (status, body) = sync(&app.server).await;
    let first = started.elapsed();
    assert_eq!(status, 200, "{body}");
    assert_eq!(counts(&body, "products"), (2500, 2500, 0));
    assert_eq!(counts(&body, "prices"), (7500, 7500, 0));
    assert!(body["duration_ms"].as_u64().is_some());
    // Pages of 100: 25 for products and 75 for prices, and nothing more.
    assert_eq!(fake.requests(), 100);
    assert!(fake.limits().iter().all(|limit| limit == "100"));
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM stripe_products").await,
        2500
    );
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_prices").await, 7500);
    // Inactive objects are synced too, as they are in Stripe.
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM stripe_products WHERE active = FALSE"
        )
        .await,
        (0..2500).filter(|i: &usize| i.is_multiple_of(7)).count() as i64
    );
    let price = format!(
        "SELECT unit_amount FROM stripe_prices WHERE id = '{}'",
        fake_stripe::price_id(4321)
    );
    assert_eq!(scalar!(db, Option<i64>, price), Some(4421));

    let started = Instant::now();
    let (status, body) = sync(&app.server).await;
    let second = started.elapsed();
    assert_eq!(status, 200, "{body}");
    assert_eq!(counts(&body, "products"), (2500, 0, 0));
    assert_eq!(counts(&body, "prices"), (7500, 0, 0));
    eprintln!(
        "sync of 2500 products and 7500 prices on {}: first {first:?}, rerun {second:?}",
        if db.is_postgres() {
            "PostgreSQL"
        } else {
            "SQLite"
        }
    );

    // A changed product is the only one upserted.
    fake.edit_product(&product_id(7), |p| p["name"] = json!("Renamed"));
    let (_, body) = sync(&app.server).await;
    assert_eq!(counts(&body, "products"), (2500, 1, 0));

    let runs = "SELECT COUNT(*) FROM sync_runs WHERE outcome = 'ok' AND finished_at IS NOT NULL \
                AND products_seen = 2500 AND prices_seen = 7500";
    assert_eq!(count(&db, runs).await, 3);
    let audit = "SELECT COUNT(*) FROM audit_log WHERE action = 'sync_stripe_products' \
                 AND outcome = 'ok' AND credential_source = 'api_key'";
    assert_eq!(count(&db, audit).await, 3);
}

#[tokio::test]
async fn sync_deactivates_what_stripe_no_longer_lists_and_never_deletes() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 20, 60).await;
    let app = sync_app(&db, &fake, fast_retry()).await;
    let (status, _) = sync(&app.server).await;
    assert_eq!(status, 200);

    fake.remove_product(&product_id(4));
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(counts(&body, "products"), (19, 0, 1));
    assert_eq!(counts(&body, "prices"), (57, 0, 3));
    assert_eq!(count(&db, &deactivated_product(4)).await, 1);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_products").await, 20);
    assert_eq!(count(&db, PRICES_DEACTIVATED).await, 3);

    // Already deactivated rows are not counted again.
    let (_, body) = sync(&app.server).await;
    assert_eq!(counts(&body, "products"), (19, 0, 0));

    // A product that comes back is reactivated.
    fake.add_product(fake_stripe::product(&fixtures, 4));
    let (_, body) = sync(&app.server).await;
    assert_eq!(counts(&body, "products"), (20, 1, 0));
    let back = format!(
        "SELECT COUNT(*) FROM stripe_products WHERE id = '{}' AND active = TRUE \
         AND deactivated_at IS NULL",
        product_id(4)
    );
    assert_eq!(count(&db, &back).await, 1);
}

/// An event applied while a sync lists (its same-second tie settled by a fetch from Stripe, or
/// its write waiting on the write lock) is written with the time it was received, which can be
/// before the sync started. Over a row the sync's page stamped, it moved the stamp back: the row
/// then looked unseen by the complete listing and was deactivated, live in Stripe, until its next
/// event or sync; the stamp now stays. A row the listing did not return, holding an event's
/// state newer than the listing's start (an object that new may be missing from it), is left
/// as the event wrote it too.
#[tokio::test]
async fn a_row_an_event_wrote_late_during_a_sync_is_not_deactivated() {
    use edgegate::store::{
        EventReceipt, LedgerEvent, PriceRow, ProductRow, SameSecond, StripeEffect,
    };
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 3, 9).await;
    let app = sync_app(&db, &fake, fast_retry()).await;
    let store = &app.state.store;
    let started = now_ms();
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    // The page stamp (`sync::page_as_of`) of the listing's start.
    let listing_as_of = (started.div_euclid(1000) - 1) * 1000 - 1;
    let (product, price) = (product_id(1), fake_stripe::price_id(4));
    // Not in the fake's catalogue: created after the listing's page stamp.
    let (new_product, new_price) = (product_id(7), fake_stripe::price_id(30));
    let page_as_of =
        |table: &str, id: &str| format!("SELECT last_event_created FROM {table} WHERE id = '{id}'");
    // Each event of a listed object is of the second after the one its page counts as of (so
    // newer than the listing's start), received 100 ms before the sync started and written
    // after its page; those of the new ones are of the second after the listing's page stamp.
    let received_at = started - 100;
    let product_as_of = scalar!(db, i64, page_as_of("stripe_products", &product)) + 1;
    let price_as_of = scalar!(db, i64, page_as_of("stripe_prices", &price)) + 1;
    assert!(product_as_of > listing_as_of && price_as_of > listing_as_of);
    let ledger = |id: &str, event_type: &str, created_ms: i64| LedgerEvent {
        id: id.to_owned(),
        event_type: event_type.to_owned(),
        created_ms,
        livemode: false,
        received_at,
    };
    let product_row = |id: &str, as_of: i64| ProductRow {
        id: id.to_owned(),
        active: true,
        name: "Renamed".to_owned(),
        description: None,
        default_price_id: Some(fake_stripe::price_id(3)),
        images: None,
        marketing_features: None,
        unit_label: None,
        url: None,
        metadata: "{}".to_owned(),
        livemode: false,
        stripe_created: 1_234_567_890_000,
        stripe_updated: Some(as_of),
        as_of,
        deactivated_at: None,
    };
    let price_row = |id: &str, product: &str, as_of: i64| PriceRow {
        id: id.to_owned(),
        product_id: product.to_owned(),
        active: true,
        currency: "usd".to_owned(),
        unit_amount: Some(404),
        unit_amount_decimal: Some("404".to_owned()),
        billing_scheme: Some("per_unit".to_owned()),
        tiers_mode: None,
        tiers: None,
        transform_quantity: None,
        custom_unit_amount: None,
        currency_options: None,
        tax_behavior: None,
        price_type: "one_time".to_owned(),
        recurring_interval: None,
        recurring_interval_count: None,
        recurring_usage_type: None,
        recurring_meter: None,
        recurring_trial_period_days: None,
        lookup_key: None,
        nickname: None,
        metadata: "{}".to_owned(),
        livemode: false,
        stripe_created: 1_234_567_890_000,
        as_of,
        deactivated_at: None,
    };
    for (event, effect) in [
        (
            ledger("evt_late_product", "product.updated", product_as_of),
            StripeEffect::Product(product_row(&product, product_as_of)),
        ),
        (
            ledger("evt_late_price", "price.updated", price_as_of),
            StripeEffect::Price(price_row(&price, &product, price_as_of)),
        ),
        (
            ledger("evt_new_product", "product.created", listing_as_of + 1),
            StripeEffect::Product(product_row(&new_product, listing_as_of + 1)),
        ),
        (
            ledger("evt_new_price", "price.created", listing_as_of + 1),
            StripeEffect::Price(price_row(&new_price, &new_product, listing_as_of + 1)),
        ),
    ] {
        let receipt = store.apply_stripe_event(&event, &effect, SameSecond::Overwrite);
        assert_eq!(receipt.await.unwrap(), EventReceipt::Applied);
    }
    let stamped_before = |product: &str, price: &str| {
        format!(
            "SELECT (SELECT COUNT(*) FROM stripe_products WHERE id = '{product}' \
             AND synced_at < {started}) \
             + (SELECT COUNT(*) FROM stripe_prices WHERE id = '{price}' AND synced_at < {started})"
        )
    };
    assert_eq!(count(&db, &stamped_before(&product, &price)).await, 0);
    assert_eq!(
        count(&db, &stamped_before(&new_product, &new_price)).await,
        2
    );

    let as_of = listing_as_of;
    let deactivated = store.deactivate_unseen(started, started, now_ms(), as_of, as_of);
    assert_eq!(deactivated.await.unwrap(), (0, 0));
    let live = "SELECT (SELECT COUNT(*) FROM stripe_products WHERE active = TRUE \
                AND deactivated_at IS NULL AND name = 'Renamed') \
                + (SELECT COUNT(*) FROM stripe_prices WHERE active = TRUE \
                AND deactivated_at IS NULL AND unit_amount = 404)";
    assert_eq!(count(&db, live).await, 4);
    assert_eq!(count(&db, PRODUCTS_DEACTIVATED).await, 0);
    assert_eq!(count(&db, PRICES_DEACTIVATED).await, 0);
}

/// A same-second event whose fetch from Stripe outlasts the start of a sync: event A applied
/// before the sync, the sync's page (as A left the row, so only stamped), then event B of A's
/// second, received before the sync started and written after its page, ties with A and
/// overwrites. It wrote the time it was received as the row's stamp, moving it back before the
/// sync's start; A's second being older than the listing's, the complete listing then took the
/// row for unseen and deactivated the product, live in Stripe. A stamp never moves back.
#[tokio::test]
async fn a_same_second_event_written_late_does_not_move_a_syncs_stamp_back() {
    use edgegate::store::{EventReceipt, LedgerEvent, SameSecond, StripeEffect};
    use edgegate::stripe::objects::Product;
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 3, 9).await;
    let app = sync_app(&db, &fake, fast_retry()).await;
    let store = &app.state.store;
    let product = product_id(1);
    // Event A, of a whole second well before the sync, with the product as Stripe lists it.
    let before = now_ms();
    let created = (before.div_euclid(1000) - 10) * 1000;
    let object: Product = serde_json::from_value(fake_stripe::product(&fixtures, 1)).unwrap();
    let ledger = |id: &str, received_at: i64| LedgerEvent {
        id: id.to_owned(),
        event_type: "product.updated".to_owned(),
        created_ms: created,
        livemode: false,
        received_at,
    };
    let effect = StripeEffect::Product(object.row(created, None));
    let a = ledger("evt_a", before);
    let receipt = store.apply_stripe_event(&a, &effect, SameSecond::Overwrite);
    assert_eq!(receipt.await.unwrap(), EventReceipt::Applied);

    let started = now_ms();
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    // The page found the row as A left it: stamped, not written.
    let as_a_left_it = format!(
        "SELECT COUNT(*) FROM stripe_products WHERE id = '{product}' \
         AND last_event_created = {created} AND synced_at >= {started}"
    );
    assert_eq!(count(&db, &as_a_left_it).await, 1);

    // B: A's second, received 100 ms before the sync started, written now.
    let b = ledger("evt_b", started - 100);
    let receipt = store.apply_stripe_event(&b, &effect, SameSecond::Overwrite);
    assert_eq!(receipt.await.unwrap(), EventReceipt::Applied);
    assert_eq!(count(&db, &as_a_left_it).await, 1);

    // The sync's end, after B: the listing's start and its page stamp (`sync::page_as_of`).
    let listing_as_of = (started.div_euclid(1000) - 1) * 1000 - 1;
    assert!(created <= listing_as_of);
    let as_of = listing_as_of;
    let deactivated = store.deactivate_unseen(started, started, now_ms(), as_of, as_of);
    assert_eq!(deactivated.await.unwrap(), (0, 0));
    assert_eq!(count(&db, PRODUCTS_DEACTIVATED).await, 0);
    // Written by this build, as before: no earlier build's row for a sync to rewrite.
    assert_eq!(store.catalogue_rows_by_earlier_builds().await.unwrap(), 0);
}

/// Stripe lists only active prices unless asked for inactive ones; an archived price is still
/// one that subscriptions use, and must be synced, never marked deleted.
#[tokio::test]
async fn sync_keeps_archived_prices_and_never_marks_them_deleted() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    // Prices 0, 5, 10 and 15 are archived (inactive).
    let fake = FakeStripe::start(&fixtures, 6, 18).await;
    let app = sync_app(&db, &fake, fast_retry()).await;
    let archived = "SELECT COUNT(*) FROM stripe_prices WHERE active = FALSE \
                    AND deactivated_at IS NULL";

    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(counts(&body, "prices"), (18, 18, 0));
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_prices").await, 18);
    assert_eq!(count(&db, archived).await, 4);

    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(counts(&body, "prices"), (18, 0, 0));
    assert_eq!(count(&db, archived).await, 4);
    assert_eq!(count(&db, PRICES_DEACTIVATED).await, 0);
}

/// Stripe answers 400 `resource_missing` (`param: starting_after`) when the object a listing
/// continues after was deleted between two pages; the listing starts over instead of failing the
/// whole sync, counts each object once, and the deleted object is deactivated in that run.
#[tokio::test]
async fn sync_starts_a_listing_over_when_its_cursor_object_was_deleted() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 250, 6).await;
    let app = sync_app(&db, &fake, fast_retry()).await;
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    // Products in pages 0-2, active prices 3, archived prices 4.
    assert_eq!(fake.requests(), 5);

    // The second products page of the next run continues after product 99: delete it first.
    fake.fault_at(6, Fault::Hold);
    let running = tokio::spawn(async move {
        let result = sync(&app.server).await;
        (result, app)
    });
    fake.arrived().await;
    fake.remove_product(&product_id(99));
    fake.release();
    let ((status, body), _app) = running.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(counts(&body, "products"), (249, 0, 1));
    assert_eq!(counts(&body, "prices"), (6, 0, 0));
    // The first page, the refused one, then the whole listing again and both price listings.
    assert_eq!(fake.requests(), 5 + 2 + 3 + 2);
    assert_eq!(count(&db, &deactivated_product(99)).await, 1);
    assert_eq!(count(&db, PRODUCTS_DEACTIVATED).await, 1);
    let run = "SELECT COUNT(*) FROM sync_runs WHERE outcome = 'ok' AND products_seen = 249 \
               AND products_deactivated = 1";
    assert_eq!(count(&db, run).await, 1);
}

/// A listing started over leaves behind what only its abandoned pass saw: a product that pass
/// wrote (changed in Stripe), asked for seconds after the sync started, then deleted, is not
/// returned by the complete pass and is deactivated in that run. The pass had written it as of
/// its page, newer than the sync's start, and rows newer than that were left.
#[tokio::test]
async fn a_product_only_an_abandoned_pass_wrote_is_deactivated() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 350, 6).await;
    let clock = Clock::manual();
    let app = sync_app_on_clock(&db, &fake, fast_retry(), clock.clone()).await;
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    // Products in pages 0-3, active prices 4, archived prices 5.
    assert_eq!(fake.requests(), 6);

    // The next run's third products page (asked for 3 s after its start, the second one held
    // meanwhile) writes product 299, changed; the fourth, after it, finds it deleted.
    clock.advance(Duration::from_secs(1));
    fake.edit_product(&product_id(299), |product| {
        product["name"] = json!("Changed")
    });
    fake.fault_at(7, Fault::Hold);
    fake.fault_at(9, Fault::Hold);
    let running = tokio::spawn(async move {
        let result = sync(&app.server).await;
        (result, app)
    });
    fake.arrived().await;
    clock.advance(Duration::from_secs(3));
    fake.release();
    fake.arrived().await;
    let changed = format!(
        "SELECT COUNT(*) FROM stripe_products WHERE id = '{}' AND name = 'Changed'",
        product_id(299)
    );
    assert_eq!(count(&db, &changed).await, 1);
    fake.remove_product(&product_id(299));
    fake.release();
    let ((status, body), _app) = running.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(counts(&body, "products"), (349, 1, 1));
    assert_eq!(count(&db, &deactivated_product(299)).await, 1);
    assert_eq!(count(&db, PRODUCTS_DEACTIVATED).await, 1);
}

/// A cursor that keeps vanishing starts the listing over a bounded number of times, then fails
/// as any refused request does: 502, and nothing deactivated.
#[tokio::test]
async fn sync_gives_up_on_a_cursor_that_keeps_vanishing() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 150, 3).await;
    let app = sync_app(&db, &fake, fast_retry()).await;
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(fake.requests(), 4);

    fake.remove_product(&product_id(0));
    fake.fault_from(4, Fault::CursorGone);
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["code"], "UPSTREAM_UNAVAILABLE");
    // The first listing and three more, each a first page and a refused second one.
    assert_eq!(fake.requests(), 4 + 2 * (1 + 3));
    assert_eq!(count(&db, PRODUCTS_DEACTIVATED).await, 0);
    let run = "SELECT COUNT(*) FROM sync_runs WHERE outcome = 'upstream_error' \
               AND error LIKE '%starting_after%'";
    assert_eq!(count(&db, run).await, 1);
}

#[tokio::test]
async fn sync_failing_midway_deactivates_nothing_and_answers_502_with_the_partial_run() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 300, 30).await;
    let app = sync_app(&db, &fake, fast_retry()).await;
    let (status, _) = sync(&app.server).await;
    assert_eq!(status, 200);
    // Products in three pages, then active prices and archived prices in one page each.
    assert_eq!(fake.requests(), 5);

    fake.remove_product(&product_id(5));
    // The third page of products fails on every attempt.
    fake.fault_from(7, Fault::ServerError(None));
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["code"], "UPSTREAM_UNAVAILABLE");
    // Said for a person: what Stripe answered, how far the run got, what it did not do.
    let message = body["message"].as_str().unwrap();
    assert!(!message.contains(SECRET_KEY));
    assert!(
        message.starts_with("Stripe answered HTTP 500 (api_error), 3 times; run "),
        "{message}"
    );
    assert!(
        message.contains(" stopped after 200 products seen, 0 written; 0 prices seen, 0 written, and deactivated nothing"),
        "{message}"
    );
    assert_eq!(fake.requests(), 5 + 2 + 3, "two pages, then three attempts");

    assert_eq!(count(&db, PRODUCTS_DEACTIVATED).await, 0);
    assert_eq!(count(&db, PRICES_DEACTIVATED).await, 0);
    let run = "SELECT COUNT(*) FROM sync_runs WHERE outcome = 'upstream_error' \
               AND finished_at IS NOT NULL AND products_seen = 200 AND prices_seen = 0 \
               AND products_deactivated = 0 \
               AND error = 'Stripe answered HTTP 500 (api_error), 3 times'";
    assert_eq!(count(&db, run).await, 1);
    let audit = "SELECT COUNT(*) FROM audit_log WHERE action = 'sync_stripe_products' \
                 AND outcome = 'upstream_error'";
    assert_eq!(count(&db, audit).await, 1);

    // Once Stripe answers again the deactivation happens.
    fake.clear_faults();
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(counts(&body, "products"), (299, 0, 1));
}

/// A Stripe that cannot be reached is said to be so, with the cause, and how often it was tried.
#[tokio::test]
async fn sync_against_an_unreachable_stripe_says_it_could_not_be_reached() {
    let db = test_db!();
    let nothing_listens = format!("http://127.0.0.1:{}/", crate::process::free_port());
    let stripe = [
        ("STRIPE_SECRET_KEY", SECRET_KEY),
        ("STRIPE_API_BASE", nothing_listens.as_str()),
    ];
    let app = app(&db, &stripe, fast_retry()).await;
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 502, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with("Stripe could not be reached (") && message.contains("refused"),
        "{message}"
    );
    assert!(
        message.contains("), 3 times; run ") && !message.contains(SECRET_KEY),
        "{message}"
    );
}

/// A page without `has_more`, or an empty one that claims more, does not say the listing is
/// complete: the sync fails as an upstream error and deactivates nothing.
#[tokio::test]
async fn sync_never_takes_a_page_without_a_clear_has_more_for_the_end() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 250, 3).await;
    let app = sync_app(&db, &fake, fast_retry()).await;
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(fake.requests(), 5);

    // The second page of products leaves out `has_more`, on every attempt.
    fake.fault_from(6, Fault::NoHasMore);
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["code"], "UPSTREAM_UNAVAILABLE");
    assert_eq!(fake.requests(), 5 + 1 + 3, "a page, then three attempts");
    assert_eq!(count(&db, PRODUCTS_DEACTIVATED).await, 0);

    // The second page of products is empty and claims more.
    fake.clear_faults();
    fake.fault_at(10, Fault::EmptyWithMore);
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["code"], "UPSTREAM_UNAVAILABLE");
    assert_eq!(count(&db, PRODUCTS_DEACTIVATED).await, 0);
    let runs = "SELECT COUNT(*) FROM sync_runs WHERE outcome = 'upstream_error' \
                AND products_deactivated = 0 AND prices_deactivated = 0";
    assert_eq!(count(&db, runs).await, 2);

    // A clean listing after them deactivates nothing either: nothing was deleted.
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(counts(&body, "products"), (250, 0, 0));
    assert_eq!(count(&db, PRODUCTS_DEACTIVATED).await, 0);
}

#[tokio::test]
async fn sync_retries_429_500_slow_and_truncated_pages() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 150, 10).await;
    // Only the slow answer may time out: a real page (100 objects, a debug build on a loaded
    // machine) is well within 1.5 s, and the slow one far past it, or the count below is off.
    let retry = RetryPolicy {
        max_attempts: 5,
        attempt_timeout: Duration::from_millis(1_500),
        ..fast_retry()
    };
    let app = sync_app(&db, &fake, retry).await;
    fake.fault_at(0, Fault::TooMany(None));
    fake.fault_at(1, Fault::ServerError(None));
    fake.fault_at(2, Fault::Slow(Duration::from_secs(10)));
    fake.fault_at(3, Fault::Truncated);
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(counts(&body, "products"), (150, 150, 0));
    assert_eq!(counts(&body, "prices"), (10, 10, 0));
    // Two pages of products, one of active and one of archived prices, and the retries.
    assert_eq!(fake.requests(), 4 + 4);
}

#[tokio::test]
async fn sync_follows_stripe_should_retry() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 5, 5).await;
    let app = sync_app(&db, &fake, fast_retry()).await;

    // A 429 that Stripe says not to retry is not retried.
    fake.fault_at(0, Fault::TooMany(Some(false)));
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(fake.requests(), 1);

    // A 400 that Stripe says to retry is retried.
    fake.clear_faults();
    fake.fault_at(1, Fault::BadRequest(Some(true)));
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(fake.requests(), 1 + 4);

    // Without the header a 400 is final.
    fake.fault_at(5, Fault::BadRequest(None));
    let (status, _) = sync(&app.server).await;
    assert_eq!(status, 502);
    assert_eq!(fake.requests(), 6);
}

#[tokio::test]
async fn two_concurrent_syncs_give_one_409() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 10, 10).await;
    let first = sync_app(&db, &fake, fast_retry()).await;
    // A second instance on the same database: the lock holds across instances.
    let second = sync_app(&db, &fake, fast_retry()).await;
    fake.fault_at(0, Fault::Hold);

    let running = tokio::spawn(async move {
        let result = sync(&first.server).await;
        (result, first)
    });
    fake.arrived().await;
    let (status, body) = sync(&second.server).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "SYNC_IN_PROGRESS");
    fake.release();
    let ((status, body), _first) = running.await.unwrap();
    assert_eq!(status, 200, "{body}");

    // The lock is free again.
    let (status, body) = sync(&second.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(counts(&body, "products"), (10, 0, 0));
    let audit = "SELECT COUNT(*) FROM audit_log WHERE action = 'sync_stripe_products' \
                 AND outcome = 'in_progress'";
    assert_eq!(count(&db, audit).await, 1);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM sync_runs").await, 2);
}

/// Posts to one of the two locked jobs' routes: the status, the `Retry-After` (whole seconds)
/// and the body.
async fn post_job(server: &TestServer, path: &str) -> (u16, Option<u64>, Value) {
    let response = server
        .client
        .post(server.url(path))
        .header("apikey", SB_SECRET)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let retry_after = crate::support::retry_after(&response);
    (status, retry_after, response.json().await.unwrap())
}

/// Leaves the lock row `lock_name` as a holder killed mid-run does on SQLite: taken at
/// `acquired_at`, its lease running to `expires_at` (epoch milliseconds).
async fn leave_lock_row(db: &TestDb, lock_name: &str, acquired_at: i64, expires_at: i64) {
    let left = format!(
        "INSERT INTO locks (name, holder, acquired_at, expires_at) \
         VALUES ('{lock_name}', 'req-killed lock-1', {acquired_at}, {expires_at}) \
         RETURNING expires_at"
    );
    assert_eq!(count(db, &left).await, expires_at);
}

/// A sync or reconciliation refused because its lock is held says what is known of the holder
/// and when to try again (`Retry-After`): a live run holds it; on SQLite, a lock row its holder
/// no longer renews (its process killed, or stopped mid-run) is named as such, with the seconds
/// until its lease can be taken, instead of "another catalogue sync is running" for 60 s.
#[tokio::test]
async fn a_held_job_lock_is_refused_saying_what_is_known_with_retry_after() {
    use edgegate::store::Job;

    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 1, 1).await;
    let app = sync_app(&db, &fake, fast_retry()).await;
    let other = db.store().await;
    let clock = Clock::system();
    let jobs = [
        (
            Job::CatalogueSync,
            "/functions/v1/sync-stripe-products-hardened",
            "catalogue sync",
            "stripe_sync",
        ),
        (
            Job::Reconcile,
            "/admin/stripe/reconcile",
            "reconciliation",
            "stripe_reconcile",
        ),
    ];
    for (job, path, run, lock_name) in jobs {
        // Held by a live run (another instance).
        let lease = Duration::from_secs(60);
        let taken = std::time::Instant::now();
        let held = other
            .try_lock_job(job, "live", &clock, lease)
            .await
            .unwrap();
        let held = held.expect("the lock was free");
        let (status, retry_after, body) = post_job(&app.server, path).await;
        // Whole seconds since the lease began, rounded up: a loaded machine takes some.
        let since = taken.elapsed().as_secs() + 1;
        assert_eq!((status, &body["code"]), (409, &json!("SYNC_IN_PROGRESS")));
        let message = body["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("another {run} is running")),
            "{message}"
        );
        let retry_after = retry_after.expect("a 409 SYNC_IN_PROGRESS carries Retry-After");
        if db.is_postgres() {
            assert!((1..=60).contains(&retry_after), "{retry_after}");
        } else {
            // Until the lease could be taken, were the holder to stop renewing it now.
            assert!(
                (60 - since.min(60)..=60).contains(&retry_after),
                "{retry_after} ({since} s after the lease began)"
            );
            assert!(message.contains("expires in"), "{message}");
        }
        held.release().await.unwrap();
        if db.is_postgres() {
            // A killed process's advisory lock went with its session.
            continue;
        }

        // Left by a killed process: taken 100 s ago, last renewed 40 s ago (its lease is 60 s).
        let now = now_ms();
        let inserted = std::time::Instant::now();
        leave_lock_row(&db, lock_name, now - 100_000, now + 20_000).await;
        let (status, retry_after, body) = post_job(&app.server, path).await;
        let since = inserted.elapsed().as_secs() + 1;
        assert_eq!((status, &body["code"]), (409, &json!("SYNC_IN_PROGRESS")));
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("a {run} that stopped without releasing it")),
            "{message}"
        );
        let not_renewed: u64 = message
            .split("not renewed for ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|secs| secs.parse().ok())
            .unwrap_or_else(|| panic!("{message}"));
        assert!((40..=40 + since).contains(&not_renewed), "{message}");
        let retry_after = retry_after.expect("a 409 SYNC_IN_PROGRESS carries Retry-After");
        assert!(
            (20 - since.min(20)..=20).contains(&retry_after),
            "{retry_after} ({since} s after the row was left)"
        );
        assert!(
            message.contains(&format!("expires in {retry_after} s")),
            "{message}"
        );
        let gone = format!("DELETE FROM locks WHERE name = '{lock_name}' RETURNING 1");
        assert_eq!(count(&db, &gone).await, 1);
    }
}

/// SQLite: a lock row left by a run killed while the wall clock was a day ahead (an NTP step set
/// it right since: a VM restored, a host whose clock was wrong at boot) expires a day from now.
/// It must not block the job for that day: the lease it holds is cut to one lease period from
/// now, so `Retry-After` and the message say at most 60 s, and the job runs once they are over.
#[tokio::test]
async fn a_lock_row_stamped_while_the_clock_was_ahead_holds_for_one_lease_at_most() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    if db.is_postgres() {
        crate::support::skipped("SQLite only (PostgreSQL's lock is its session's, not a row)");
        return;
    }
    let fake = FakeStripe::start(&fixtures, 1, 1).await;
    let clock = Clock::manual();
    let app = app_with_clock(&db, &stripe_vars(&fake), fast_retry(), clock.clone()).await;
    let day = 86_400_000;
    let jobs = [
        ("/functions/v1/sync-stripe-products-hardened", "stripe_sync"),
        ("/admin/stripe/reconcile", "stripe_reconcile"),
    ];
    for (path, lock_name) in jobs {
        // Taken 5 s before the kill, a day ahead; its lease is 60 s.
        let ahead = clock.now_ms() + day;
        leave_lock_row(&db, lock_name, ahead - 5_000, ahead + 55_000).await;
        let (status, retry_after, body) = post_job(&app.server, path).await;
        assert_eq!((status, &body["code"]), (409, &json!("SYNC_IN_PROGRESS")));
        let retry_after = retry_after.expect("a 409 SYNC_IN_PROGRESS carries Retry-After");
        assert!((1..=60).contains(&retry_after), "{retry_after}");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("expires in {retry_after} s")),
            "{message}"
        );

        // Taken once expired: a millisecond after the lease's last one.
        clock.advance(Duration::from_secs(retry_after) + Duration::from_millis(1));
        let (status, _, body) = post_job(&app.server, path).await;
        assert_eq!(status, 200, "{body}");
    }
}

/// SQLite: a wall clock stepped forward past the lease during a run (an NTP step of a clock
/// that was behind) lets another caller take the lock, as a lease on wall-clock time allows. The
/// run that lost it stops at its next renewal as any run whose lock was lost does: 503
/// `NOT_READY` saying so (as on PostgreSQL), not 500 `INTERNAL_ERROR`, its row `error` with why.
#[tokio::test]
async fn a_run_whose_sqlite_lease_a_forward_clock_step_let_be_taken_answers_503() {
    use edgegate::store::Job;

    let fixtures = stripe_fixtures!();
    let db = test_db!();
    if db.is_postgres() {
        crate::support::skipped("SQLite only (PostgreSQL's lock is its session's, not a lease)");
        return;
    }
    let other = db.store().await;
    let jobs = [
        (
            Job::CatalogueSync,
            "/functions/v1/sync-stripe-products-hardened",
            "sync_runs",
        ),
        (Job::Reconcile, "/admin/stripe/reconcile", "reconcile_runs"),
    ];
    for (job, path, runs) in jobs {
        let fake = FakeStripe::start(&fixtures, 1, 1).await;
        let clock = Clock::manual();
        let app = app_with_clock(&db, &stripe_vars(&fake), fast_retry(), clock.clone()).await;
        fake.fault_at(0, Fault::Hold);
        let server = app.server;
        let running = tokio::spawn(async move {
            let answer = post_job(&server, path).await;
            (answer, server)
        });
        fake.arrived().await;
        clock.step_wall(120_000);
        let taken = other
            .try_lock_job(job, "other", &clock, Duration::from_secs(60))
            .await
            .unwrap()
            .expect("a lease 120 s old is taken");
        fake.release();
        let ((status, _, body), _server) = running.await.unwrap();
        assert_eq!(
            (status, &body["code"]),
            (503, &json!("NOT_READY")),
            "{body}"
        );
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains("lock"), "{body}");
        taken.release().await.unwrap();
        let row = format!(
            "SELECT COUNT(*) FROM {runs} WHERE outcome = 'error' \
             AND error LIKE '%lock expired and was taken%'"
        );
        assert_eq!(count(&db, &row).await, 1, "{runs}");
    }
}

/// A run row left `running` by a process that died mid-run (killed, or stopped with the run
/// cut) is marked `interrupted`, with `finished_at`, by the next run of its job, which holds the
/// lock and so knows no run of it is going on; the other job's rows are its own run's to mark.
#[tokio::test]
async fn a_run_left_running_by_a_dead_process_is_marked_interrupted_by_the_next_run() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 2, 2).await;
    let app = sync_app(&db, &fake, fast_retry()).await;
    let started = now_ms() - 3_600_000;
    let left = format!(
        "INSERT INTO sync_runs (id, started_at, outcome, products_seen) \
         VALUES ('left-sync', {started}, 'running', 100) RETURNING started_at"
    );
    assert_eq!(count(&db, &left).await, started);
    let left = format!(
        "INSERT INTO reconcile_runs (id, started_by, since, started_at, outcome) \
         VALUES ('left-reconcile', 'periodic', 0, {started}, 'running') RETURNING started_at"
    );
    assert_eq!(count(&db, &left).await, started);
    let interrupted = |table: &str, id: &str| {
        format!(
            "SELECT COUNT(*) FROM {table} WHERE id = '{id}' AND outcome = 'interrupted' \
             AND finished_at >= {} AND error IS NOT NULL",
            started + 3_600_000
        )
    };

    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(count(&db, &interrupted("sync_runs", "left-sync")).await, 1);
    // Its counts are kept: how far it got.
    let kept = "SELECT products_seen FROM sync_runs WHERE id = 'left-sync'";
    assert_eq!(count(&db, kept).await, 100);
    let still = "SELECT COUNT(*) FROM reconcile_runs WHERE outcome = 'running'";
    assert_eq!(count(&db, still).await, 1, "a sync marked a reconciliation");
    let running = "SELECT COUNT(*) FROM sync_runs WHERE outcome = 'running'";
    assert_eq!(count(&db, running).await, 0);

    let response = app
        .server
        .client
        .post(app.server.url("/admin/stripe/reconcile"))
        .header("apikey", SB_SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let marked = interrupted("reconcile_runs", "left-reconcile");
    assert_eq!(count(&db, &marked).await, 1);
    assert_eq!(count(&db, still).await, 0);
    // The new runs themselves are `ok`, and nothing else was marked.
    let ok = "SELECT COUNT(*) FROM sync_runs WHERE outcome = 'ok'";
    assert_eq!(count(&db, ok).await, 1);
    let ok = "SELECT COUNT(*) FROM reconcile_runs WHERE outcome = 'ok'";
    assert_eq!(count(&db, ok).await, 1);
}

#[tokio::test]
async fn sync_needs_a_key_and_the_service_role() {
    let db = test_db!();
    let app = app(&db, &[], fast_retry()).await;
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 503);
    assert_eq!(body["code"], "NOT_CONFIGURED");
    let response = app
        .server
        .client
        .post(
            app.server
                .url("/functions/v1/sync-stripe-products-hardened"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

// ---- webhooks ----

pub(crate) fn sdk_available() -> bool {
    Command::new("python3")
        .args(["-c", "import stripe"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Returns from the calling test when Python's `stripe` package is missing (outside CI).
macro_rules! stripe_sdk {
    () => {
        if !sdk_available() {
            assert!(
                !in_ci(),
                "CI=true and Python's stripe package is missing (python3 -m pip install stripe)"
            );
            $crate::support::skipped("Python's stripe package is not installed");
            return;
        }
    };
}

pub(crate) use stripe_sdk;

/// Stripe's own Python library, started once per test process and asked for one signature per
/// line: the outage and crash tests sign thousands of deliveries, a process each took minutes.
struct SdkSigner {
    /// Kept for the life of the test process (a static, never dropped or waited on).
    _child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl SdkSigner {
    fn start() -> Self {
        // One JSON array `[payload, secret, timestamp]` a line in, one header a line out.
        let script = "import sys, json, stripe\n\
                      for line in sys.stdin:\n\
                      \x20   payload, secret, timestamp = json.loads(line)\n\
                      \x20   print(stripe.WebhookSignature.generate_signature_header(\
                      payload, secret, timestamp=timestamp), flush=True)\n";
        // Its stdin closes when this process ends, and the loop with it.
        let mut child = Command::new("python3")
            .args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        Self {
            stdin: child.stdin.take().unwrap(),
            stdout: std::io::BufReader::new(child.stdout.take().unwrap()),
            _child: child,
        }
    }

    fn sign(&mut self, payload: &str, secret: &str, timestamp: i64) -> String {
        use std::io::{BufRead as _, Write as _};
        let request = json!([payload, secret, timestamp]).to_string();
        writeln!(self.stdin, "{request}").expect("the Stripe SDK takes the payload");
        let mut header = String::new();
        self.stdout
            .read_line(&mut header)
            .expect("the Stripe SDK answers");
        assert!(header.ends_with('\n'), "the Stripe SDK could not sign");
        header.trim_end().to_owned()
    }
}

/// A `Stripe-Signature` header made by Stripe's own Python library.
pub(crate) fn sdk_sign(payload: &str, secret: &str, timestamp: i64) -> String {
    static SIGNER: std::sync::OnceLock<std::sync::Mutex<SdkSigner>> = std::sync::OnceLock::new();
    SIGNER
        .get_or_init(|| std::sync::Mutex::new(SdkSigner::start()))
        .lock()
        // A test that failed while signing leaves no half-read answer: the line is read whole.
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .sign(payload, secret, timestamp)
}

pub(crate) fn now() -> i64 {
    now_ms() / 1000
}

pub(crate) fn event(fixtures: &Value, id: &str, kind: &str, created: i64, object: Value) -> String {
    let mut event = resource(fixtures, "event");
    event["id"] = json!(id);
    event["type"] = json!(kind);
    event["created"] = json!(created);
    event["data"] = json!({ "object": object });
    event.to_string()
}

async fn webhook_app(db: &TestDb, secrets: &str) -> App {
    app(db, &[("STRIPE_WEBHOOK_SECRET", secrets)], fast_retry()).await
}

pub(crate) async fn deliver(
    server: &TestServer,
    body: &str,
    signature: Option<&str>,
) -> (u16, Value) {
    let mut request = server
        .client
        .post(server.url("/functions/v1/stripe-webhook"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(signature) = signature {
        request = request.header("stripe-signature", signature);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

pub(crate) async fn deliver_signed(server: &TestServer, body: &str) -> (u16, Value) {
    deliver(server, body, Some(&sdk_sign(body, WHSEC, now()))).await
}

/// A product event whose object is the fixture product `i` named `name`.
pub(crate) fn product_event(
    fixtures: &Value,
    id: &str,
    kind: &str,
    created: i64,
    i: usize,
    name: &str,
) -> String {
    let mut object = fake_stripe::product(fixtures, i);
    object["name"] = json!(name);
    event(fixtures, id, kind, created, object)
}

pub(crate) async fn product_name(db: &TestDb, i: usize) -> String {
    let sql = format!(
        "SELECT name FROM stripe_products WHERE id = '{}'",
        product_id(i)
    );
    scalar!(db, String, sql)
}

#[tokio::test]
async fn webhook_signed_by_the_stripe_sdk_is_applied_once() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let app = webhook_app(&db, WHSEC).await;
    let t = now();
    let first = product_event(&fixtures, "evt_T1", "product.created", t - 20, 1, "First");
    let (status, body) = deliver_signed(&app.server, &first).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"received": true, "duplicate": false}));
    assert_eq!(product_name(&db, 1).await, "First");

    let newer = product_event(&fixtures, "evt_T2", "product.updated", t - 10, 1, "Second");
    assert_eq!(deliver_signed(&app.server, &newer).await.0, 200);
    assert_eq!(product_name(&db, 1).await, "Second");

    // Stripe redelivers the first event: acknowledged, and it changes nothing.
    let (status, body) = deliver_signed(&app.server, &first).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"received": true, "duplicate": true}));
    assert_eq!(product_name(&db, 1).await, "Second");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_events").await, 2);
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM stripe_events WHERE applied = TRUE"
        )
        .await,
        2
    );
    let metrics = app.server.get("/metrics").await.text().await.unwrap();
    let duplicate = r#"edgegate_stripe_webhook_events_total{event_type="product.created",outcome="duplicate"} 1"#;
    assert!(metrics.contains(duplicate), "{metrics}");
}

#[tokio::test]
async fn webhook_refuses_every_bad_signature_and_stores_nothing() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let app = webhook_app(&db, WHSEC).await;
    let body = product_event(&fixtures, "evt_T3", "product.created", now(), 3, "Three");
    let good = sdk_sign(&body, WHSEC, now());
    let tampered = body.replace("Three", "Free");
    let cases: Vec<(&str, String, Option<String>)> = vec![
        ("tampered body", tampered, Some(good.clone())),
        (
            "wrong secret",
            body.clone(),
            Some(sdk_sign(&body, WHSEC_OTHER, now())),
        ),
        (
            "older than 300 s",
            body.clone(),
            Some(sdk_sign(&body, WHSEC, now() - 301)),
        ),
        ("missing header", body.clone(), None),
        ("only v0", body.clone(), Some(good.replace("v1=", "v0="))),
        ("garbage", body.clone(), Some("nonsense".to_owned())),
    ];
    for (case, payload, signature) in cases {
        let (status, answer) = deliver(&app.server, &payload, signature.as_deref()).await;
        assert_eq!(status, 400, "{case}: {answer}");
        assert_eq!(answer["code"], "INVALID_SIGNATURE", "{case}");
    }
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_events").await, 0);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_products").await, 0);
    // Signed but not an event: refused as a bad request, nothing stored.
    let junk = "not an event";
    let (status, answer) = deliver(&app.server, junk, Some(&sdk_sign(junk, WHSEC, now()))).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["code"], "INVALID_REQUEST");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_events").await, 0);
    // A signature well inside the tolerance is fine.
    let recent = sdk_sign(&body, WHSEC, now() - 200);
    assert_eq!(deliver(&app.server, &body, Some(&recent)).await.0, 200);
}

#[tokio::test]
async fn webhook_accepts_either_secret_while_one_is_rolled() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let t = now();
    let body = |n: usize| {
        product_event(
            &fixtures,
            &format!("evt_R{n}"),
            "product.created",
            t,
            n,
            "Rolled",
        )
    };
    // During a roll Stripe signs with both secrets: two v1 values under one timestamp.
    let both = |payload: &str| {
        let current = sdk_sign(payload, WHSEC, t);
        let next = sdk_sign(payload, WHSEC_NEXT, t);
        format!("{current},{}", next.split_once(',').unwrap().1)
    };
    let old_only = webhook_app(&db, WHSEC).await;
    let payload = body(1);
    let (status, answer) = deliver(&old_only.server, &payload, Some(&both(&payload))).await;
    assert_eq!(status, 200, "{answer}");
    let payload = body(2);
    let next_only = sdk_sign(&payload, WHSEC_NEXT, t);
    assert_eq!(
        deliver(&old_only.server, &payload, Some(&next_only))
            .await
            .0,
        400
    );

    // edgegate configured with both secrets accepts a signature by either.
    let rolled = webhook_app(&db, &format!("{WHSEC_NEXT},{WHSEC}")).await;
    assert_eq!(
        deliver(&rolled.server, &payload, Some(&next_only)).await.0,
        200
    );
    let payload = body(3);
    let current_only = sdk_sign(&payload, WHSEC, t);
    assert_eq!(
        deliver(&rolled.server, &payload, Some(&current_only))
            .await
            .0,
        200
    );
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_events").await, 3);
}

#[tokio::test]
async fn webhook_out_of_order_event_never_overwrites_newer_state() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let app = webhook_app(&db, WHSEC).await;
    let t = now();
    let newer = product_event(&fixtures, "evt_N", "product.updated", t - 5, 9, "Newer");
    let older = product_event(&fixtures, "evt_O", "product.updated", t - 60, 9, "Older");
    assert_eq!(deliver_signed(&app.server, &newer).await.0, 200);
    let (status, body) = deliver_signed(&app.server, &older).await;
    assert_eq!(status, 200);
    assert_eq!(body["duplicate"], false, "a distinct event, recorded");
    assert_eq!(product_name(&db, 9).await, "Newer");

    // Prices follow the same rule.
    let mut price = fake_stripe::price(&fixtures, 27);
    price["unit_amount"] = json!(999);
    let newer = event(&fixtures, "evt_PN", "price.updated", t - 5, price.clone());
    price["unit_amount"] = json!(111);
    let older = event(&fixtures, "evt_PO", "price.updated", t - 60, price);
    assert_eq!(deliver_signed(&app.server, &newer).await.0, 200);
    assert_eq!(deliver_signed(&app.server, &older).await.0, 200);
    let amount = format!(
        "SELECT unit_amount FROM stripe_prices WHERE id = '{}'",
        fake_stripe::price_id(27)
    );
    assert_eq!(scalar!(db, Option<i64>, amount), Some(999));
}

/// A deletion event whose object is only Stripe's stub (`{"id","object","deleted":true}`, what
/// its DELETE answers) marks the row deleted and keeps the rest: the stub says nothing of the
/// product, amount or type, and writing the row from it blanked them (a recurring price became
/// `one_time` in no currency, created at 0). For an object never stored it writes no row of
/// made-up values, yet an older event of it delivered afterwards (Stripe retries for days) is
/// stored as deleted, as it would be had the row been there first.
#[tokio::test]
async fn a_deletion_whose_object_is_a_stub_marks_the_row_deleted_and_keeps_the_rest() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let app = webhook_app(&db, WHSEC).await;
    let t = now();
    // Price 27 is recurring (monthly), of product 9.
    let mut price = fake_stripe::price(&fixtures, 27);
    price["metadata"] = json!({"plan": "pro"});
    let created = event(&fixtures, "evt_D1", "price.created", t - 60, price);
    assert_eq!(deliver_signed(&app.server, &created).await.0, 200);
    let created = product_event(&fixtures, "evt_D2", "product.created", t - 60, 9, "Kept");
    assert_eq!(deliver_signed(&app.server, &created).await.0, 200);
    let stored_price = format!(
        "SELECT product_id || '|' || currency || '|' || unit_amount || '|' || price_type || '|' \
         || recurring_interval || '|' || metadata || '|' || stripe_created FROM stripe_prices \
         WHERE id = '{}'",
        fake_stripe::price_id(27)
    );
    let price_kept = format!(
        "{}|usd|127|recurring|month|{{\"plan\":\"pro\"}}|1234567890000",
        product_id(9)
    );
    assert_eq!(scalar!(db, String, stored_price), price_kept);
    let stored_product = format!(
        "SELECT name || '|' || stripe_created FROM stripe_products WHERE id = '{}'",
        product_id(9)
    );
    assert_eq!(scalar!(db, String, stored_product), "Kept|1234567890000");

    let stub = |object: &str, id: String| json!({"id": id, "object": object, "deleted": true});
    let deleted = |table: &str, id: String| {
        format!(
            "SELECT COUNT(*) FROM {table} WHERE id = '{id}' AND active = FALSE \
             AND deactivated_at IS NOT NULL AND last_event_created = {}",
            (t - 30) * 1000
        )
    };
    let price_stub = stub("price", fake_stripe::price_id(27));
    let deletion = event(&fixtures, "evt_D3", "price.deleted", t - 30, price_stub);
    let (status, body) = deliver_signed(&app.server, &deletion).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(scalar!(db, String, stored_price), price_kept);
    let price_deleted = deleted("stripe_prices", fake_stripe::price_id(27));
    assert_eq!(count(&db, &price_deleted).await, 1);
    let deletion = event(
        &fixtures,
        "evt_D4",
        "product.deleted",
        t - 30,
        stub("product", product_id(9)),
    );
    assert_eq!(deliver_signed(&app.server, &deletion).await.0, 200);
    assert_eq!(scalar!(db, String, stored_product), "Kept|1234567890000");
    assert_eq!(
        count(&db, &deleted("stripe_products", product_id(9))).await,
        1
    );

    // Product 10 was never stored: its stub writes the row of the stub alone, deleted.
    let deletion = event(
        &fixtures,
        "evt_D5",
        "product.deleted",
        t - 30,
        stub("product", product_id(10)),
    );
    assert_eq!(deliver_signed(&app.server, &deletion).await.0, 200);
    assert_eq!(
        count(&db, &deleted("stripe_products", product_id(10))).await,
        1
    );
    // Its creation, delivered late, does not bring it back.
    let late = product_event(&fixtures, "evt_D6", "product.created", t - 90, 10, "Late");
    assert_eq!(deliver_signed(&app.server, &late).await.0, 200);
    assert_eq!(
        count(&db, &deleted("stripe_products", product_id(10))).await,
        1
    );
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM stripe_events WHERE applied = TRUE"
        )
        .await,
        6
    );
}

/// A sync page listed before a deletion and written after its stub was applied (the stub's
/// `created` newer than the page) does not bring the object back: the stub's row, deleted as of
/// the stub, stands, as any newer row does against an older page.
#[tokio::test]
async fn a_sync_page_older_than_a_stub_deletion_does_not_bring_the_object_back() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 3, 0).await;
    let vars = stripe_and_webhook_vars(&fake);
    let app = app(&db, &vars, fast_retry()).await;
    let stub = json!({"id": product_id(1), "object": "product", "deleted": true});
    let later = now() + 60;
    let deletion = event(&fixtures, "evt_DS", "product.deleted", later, stub);
    assert_eq!(deliver_signed(&app.server, &deletion).await.0, 200);

    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    let deleted = format!(
        "SELECT COUNT(*) FROM stripe_products WHERE id = '{}' AND active = FALSE \
         AND deactivated_at IS NOT NULL AND last_event_created = {}",
        product_id(1),
        later * 1000
    );
    assert_eq!(count(&db, &deleted).await, 1);
    let active = "SELECT COUNT(*) FROM stripe_products WHERE active = TRUE";
    assert_eq!(
        count(&db, active).await,
        1,
        "product 0 is archived, 2 active"
    );
}

/// A sync page stamps its rows with the second before it asked for them, and Stripe stamps an
/// event with the second of the change: a page served stale (or asked for by a host whose clock
/// runs ahead of Stripe's) can carry the state from before an event of that very second. Written
/// after the event was applied, it must not overwrite it: the event is in the ledger, so no
/// redelivery or reconciliation would ever put it back.
#[tokio::test]
async fn a_sync_page_of_the_second_of_an_applied_event_does_not_overwrite_it() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 3, 0).await;
    let clock = Clock::manual();
    let vars = stripe_and_webhook_vars(&fake);
    let app = app_with_clock(&db, &vars, fast_retry(), clock.clone()).await;
    // The second the sync's page will be stamped with: the one before the clock's.
    let second = clock.now_ms() / 1000 - 1;
    let update = product_event(&fixtures, "evt_P1", "product.updated", second, 0, "Renamed");
    let (status, body) = deliver_signed(&app.server, &update).await;
    assert_eq!((status, &body["duplicate"]), (200, &json!(false)), "{body}");

    // The listing still has the name from before the event.
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(counts(&body, "products").0, 3, "{body}");
    assert_eq!(product_name(&db, 0).await, "Renamed");
    // The other products were written.
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_products").await, 3);
}

/// PostgreSQL stores no U+0000 in text (SQLite does): Stripe text carrying one (a name, a
/// description, metadata) is stored with U+FFFD in its place on both engines, instead of
/// failing the sync at that page, and a webhook for it, on PostgreSQL only.
#[tokio::test]
async fn stripe_text_with_u0000_is_stored_alike_on_both_engines() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 3, 0).await;
    let nul = |object: &mut Value| {
        object["name"] = json!("a\0b");
        object["description"] = json!("\0");
        object["metadata"] = json!({"k\0": "v\0"});
    };
    fake.edit_product(&product_id(1), nul);
    let vars = stripe_and_webhook_vars(&fake);
    let app = app(&db, &vars, fast_retry()).await;
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(counts(&body, "products"), (3, 3, 0), "{body}");
    let stored = |i: usize| {
        format!(
            "SELECT name || '|' || description || '|' || metadata FROM stripe_products \
             WHERE id = '{}'",
            product_id(i)
        )
    };
    assert_eq!(
        scalar!(db, String, stored(1)),
        "a\u{FFFD}b|\u{FFFD}|{\"k\u{FFFD}\":\"v\u{FFFD}\"}"
    );
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_products").await, 3);

    let mut object = fake_stripe::product(&fixtures, 2);
    nul(&mut object);
    object["name"] = json!("c\0d");
    let update = event(&fixtures, "evt_Nul", "product.updated", now(), object);
    let (status, body) = deliver_signed(&app.server, &update).await;
    assert_eq!((status, &body["duplicate"]), (200, &json!(false)), "{body}");
    assert_eq!(product_name(&db, 2).await, "c\u{FFFD}d");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_events").await, 1);
}

#[tokio::test]
async fn webhook_billing_events_leave_what_access_needs() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let app = webhook_app(&db, WHSEC).await;
    let t = now();

    let mut session = resource(&fixtures, "checkout.session");
    session["id"] = json!("cs_test_T1");
    session["customer"] = json!("cus_T1");
    session["client_reference_id"] = json!("user-42");
    session["subscription"] = json!("sub_T1");
    session["mode"] = json!("subscription");
    session["payment_status"] = json!("paid");
    session["status"] = json!("complete");
    let mut subscription = resource(&fixtures, "subscription");
    subscription["id"] = json!("sub_T1");
    subscription["customer"] = json!("cus_T1");
    subscription["status"] = json!("active");
    let mut canceled = subscription.clone();
    canceled["status"] = json!("canceled");
    let mut invoice = resource(&fixtures, "invoice");
    invoice["id"] = json!("in_T1");
    invoice["customer"] = json!("cus_T1");
    let mut customer = resource(&fixtures, "customer");
    customer["id"] = json!("cus_T1");

    let deliveries = [
        event(
            &fixtures,
            "evt_B1",
            "checkout.session.completed",
            t - 50,
            session,
        ),
        event(
            &fixtures,
            "evt_B2",
            "customer.subscription.created",
            t - 49,
            subscription,
        ),
        event(
            &fixtures,
            "evt_B3",
            "invoice.payment_failed",
            t - 48,
            invoice.clone(),
        ),
        event(&fixtures, "evt_B4", "invoice.paid", t - 47, invoice),
        event(
            &fixtures,
            "evt_B5",
            "customer.subscription.deleted",
            t - 40,
            canceled,
        ),
        event(&fixtures, "evt_B6", "customer.created", t - 30, customer),
    ];
    for body in &deliveries {
        let (status, answer) = deliver_signed(&app.server, body).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["duplicate"], false);
    }
    let session = "SELECT COUNT(*) FROM stripe_checkout_sessions WHERE id = 'cs_test_T1' \
                   AND client_reference_id = 'user-42' AND customer_id = 'cus_T1' \
                   AND subscription_id = 'sub_T1' AND payment_status = 'paid'";
    assert_eq!(count(&db, session).await, 1);
    let customer = "SELECT COUNT(*) FROM stripe_customers WHERE id = 'cus_T1' \
                    AND email = 'example@example.com'";
    assert_eq!(count(&db, customer).await, 1);
    let subscription = "SELECT status FROM stripe_subscriptions WHERE id = 'sub_T1'";
    assert_eq!(scalar!(db, String, subscription), "canceled");
    let price = "SELECT COUNT(*) FROM stripe_subscriptions WHERE price_id IS NOT NULL \
                 AND product_id IS NOT NULL";
    assert_eq!(count(&db, price).await, 1);
    let invoice = "SELECT COUNT(*) FROM stripe_invoices WHERE id = 'in_T1' \
                   AND paid_at IS NOT NULL AND payment_failed_at IS NOT NULL";
    assert_eq!(count(&db, invoice).await, 1);
    // A type edgegate does not act on is recorded and acknowledged.
    let other = "SELECT COUNT(*) FROM stripe_events WHERE id = 'evt_B6' AND applied = FALSE";
    assert_eq!(count(&db, other).await, 1);
}

/// `invoice.payment_failed` delivered after the `invoice.paid` that followed it (Stripe does not
/// deliver in order; reconciliation lists newest first) still records when the payment failed:
/// the newer row refuses the older event's state, yet not the time only that event carries. It
/// wrote nothing, and `payment_failed_at` stayed null for good.
#[tokio::test]
async fn an_invoice_payment_failure_delivered_after_its_payment_is_kept() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let app = webhook_app(&db, WHSEC).await;
    let t = now();
    let mut invoice = resource(&fixtures, "invoice");
    invoice["id"] = json!("in_R1");
    invoice["customer"] = json!("cus_R1");
    invoice["status"] = json!("paid");
    let mut open = invoice.clone();
    open["status"] = json!("open");
    let deliveries = [
        event(&fixtures, "evt_R_paid", "invoice.paid", t - 47, invoice),
        event(
            &fixtures,
            "evt_R_failed",
            "invoice.payment_failed",
            t - 48,
            open,
        ),
    ];
    for body in &deliveries {
        let (status, answer) = deliver_signed(&app.server, body).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["duplicate"], false);
    }
    let failed = "SELECT payment_failed_at FROM stripe_invoices WHERE id = 'in_R1'";
    assert_eq!(scalar!(db, Option<i64>, failed), Some((t - 48) * 1000));
    // The rest is the newer event's.
    let kept = "SELECT COUNT(*) FROM stripe_invoices WHERE id = 'in_R1' AND status = 'paid' \
                AND paid_at IS NOT NULL AND last_event_created = ";
    assert_eq!(count(&db, &format!("{kept}{}", (t - 47) * 1000)).await, 1);

    // An older failure still, delivered last, leaves the latest one.
    let mut open = resource(&fixtures, "invoice");
    open["id"] = json!("in_R1");
    open["status"] = json!("open");
    let earliest = event(
        &fixtures,
        "evt_R_failed_0",
        "invoice.payment_failed",
        t - 49,
        open,
    );
    assert_eq!(deliver_signed(&app.server, &earliest).await.0, 200);
    assert_eq!(scalar!(db, Option<i64>, failed), Some((t - 48) * 1000));
    assert_eq!(count(&db, &format!("{kept}{}", (t - 47) * 1000)).await, 1);
}

/// An invoice event older than its row still merges the time its payment was made or failed;
/// that merge changes the row as any write does, so it moves `updated_at`, and one that brings
/// nothing new writes nothing. It left the newer event's `updated_at`, and rewrote the row
/// every time.
#[tokio::test]
async fn an_invoice_merge_moves_updated_at_only_when_it_changes_the_row() {
    use edgegate::store::{EventReceipt, InvoiceRow, LedgerEvent, SameSecond, StripeEffect};
    let db = test_db!();
    let app = webhook_app(&db, WHSEC).await;
    let store = &app.state.store;
    let t = now_ms().div_euclid(1000) * 1000;
    let row = |status: &str, paid_at, payment_failed_at, as_of| InvoiceRow {
        id: "in_M1".to_owned(),
        customer_id: Some("cus_M1".to_owned()),
        subscription_id: None,
        status: Some(status.to_owned()),
        amount_due: Some(500),
        amount_paid: Some(0),
        currency: Some("usd".to_owned()),
        paid_at,
        payment_failed_at,
        attempt_count: Some(1),
        livemode: false,
        stripe_created: t - 60_000,
        as_of,
    };
    let events = [
        (
            "evt_M_paid",
            "invoice.paid",
            row("paid", Some(t - 47_000), None, t - 47_000),
            t,
        ),
        // Older, delivered later: its failure is news.
        (
            "evt_M_failed",
            "invoice.payment_failed",
            row("open", None, Some(t - 48_000), t - 48_000),
            t + 1_000,
        ),
        // Older still: nothing new.
        (
            "evt_M_failed_0",
            "invoice.payment_failed",
            row("open", None, Some(t - 49_000), t - 49_000),
            t + 2_000,
        ),
    ];
    let updated = "SELECT updated_at FROM stripe_invoices WHERE id = 'in_M1'";
    let mut seen = Vec::new();
    for (id, event_type, row, received_at) in events {
        let event = LedgerEvent {
            id: id.to_owned(),
            event_type: event_type.to_owned(),
            created_ms: row.as_of,
            livemode: false,
            received_at,
        };
        let effect = StripeEffect::Invoice(row);
        let receipt = store.apply_stripe_event(&event, &effect, SameSecond::Overwrite);
        assert_eq!(receipt.await.unwrap(), EventReceipt::Applied);
        seen.push(scalar!(db, i64, updated));
    }
    assert_eq!(seen, [t, t + 1_000, t + 1_000]);
    let merged = format!(
        "SELECT COUNT(*) FROM stripe_invoices WHERE id = 'in_M1' AND status = 'paid' \
         AND paid_at = {} AND payment_failed_at = {} AND last_event_created = {}",
        t - 47_000,
        t - 48_000,
        t - 47_000
    );
    assert_eq!(count(&db, &merged).await, 1);
}

#[tokio::test]
async fn webhook_failing_to_apply_answers_500_and_leaves_no_ledger_row() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let app = webhook_app(&db, WHSEC).await;
    // Break the table the effect goes to, so applying fails after the ledger insert.
    if db.is_postgres() {
        let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
        sqlx::query("DROP TABLE stripe_invoices")
            .execute(&pool)
            .await
            .unwrap();
    } else {
        let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
        sqlx::query("DROP TABLE stripe_invoices")
            .execute(&pool)
            .await
            .unwrap();
    }
    let mut invoice = resource(&fixtures, "invoice");
    invoice["id"] = json!("in_T9");
    let body = event(&fixtures, "evt_F1", "invoice.paid", now(), invoice);
    let (status, answer) = deliver_signed(&app.server, &body).await;
    assert_eq!(status, 500, "{answer}");
    assert_eq!(answer["code"], "INTERNAL_ERROR");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_events").await, 0);
}

#[tokio::test]
async fn same_event_to_two_instances_at_once_is_applied_once() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    // Two instances (two pools) on one database: PostgreSQL, or one SQLite file.
    let one = webhook_app(&db, WHSEC).await;
    let two = webhook_app(&db, WHSEC).await;
    let t = now();
    for n in 0..8 {
        let body = product_event(
            &fixtures,
            &format!("evt_C{n}"),
            "product.updated",
            t,
            n,
            "Concurrent",
        );
        let signature = sdk_sign(&body, WHSEC, t);
        let (a, b) = tokio::join!(
            deliver(&one.server, &body, Some(&signature)),
            deliver(&two.server, &body, Some(&signature))
        );
        assert_eq!((a.0, b.0), (200, 200), "{} {}", a.1, b.1);
        let duplicates = [&a.1, &b.1]
            .iter()
            .filter(|answer| answer["duplicate"] == true)
            .count();
        assert_eq!(
            duplicates, 1,
            "exactly one delivery applies: {} {}",
            a.1, b.1
        );
    }
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_events").await, 8);
}

#[tokio::test]
async fn webhook_body_limit_and_configuration() {
    let db = test_db!();
    let app = webhook_app(&db, WHSEC).await;
    let big = "x".repeat(512 * 1024 + 1);
    let (status, answer) = deliver(&app.server, &big, Some("t=1,v1=00")).await;
    assert_eq!(status, 413);
    assert_eq!(answer["code"], "PAYLOAD_TOO_LARGE");
    let (status, answer) = deliver(&app.server, "{}", None).await;
    assert_eq!(status, 400);
    assert_eq!(answer["code"], "INVALID_SIGNATURE");

    let unconfigured = app_without_secret(&db).await;
    let (status, answer) = deliver(&unconfigured.server, "{}", Some("t=1,v1=00")).await;
    assert_eq!(status, 503);
    assert_eq!(answer["code"], "NOT_CONFIGURED");
}

async fn app_without_secret(db: &TestDb) -> App {
    app(db, &[], fast_retry()).await
}

/// What `edgegate check` says of Stripe with the secret key `key` against `fake`.
async fn check_stripe(db: &TestDb, fake: &FakeStripe, key: &str) -> edgegate::commands::CheckLine {
    let config = db.config(&[
        ("STRIPE_SECRET_KEY", key),
        ("STRIPE_API_BASE", fake.base.as_str()),
    ]);
    let lines = edgegate::commands::check(&config).await;
    lines
        .into_iter()
        .find(|line| line.item == "stripe")
        .unwrap()
}

#[tokio::test]
async fn check_reports_the_stripe_mode() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 0, 0).await;
    let stripe = check_stripe(&db, &fake, SECRET_KEY).await;
    assert!(stripe.ok, "{}", stripe.detail);
    assert!(stripe.detail.contains("test mode"), "{}", stripe.detail);
    assert!(!stripe.detail.contains(SECRET_KEY));

    let stripe = check_stripe(&db, &fake, "sk_live_not_the_fake_key").await;
    assert!(!stripe.ok);
    assert!(!stripe.detail.contains("sk_live_not_the_fake_key"));
}

/// A restricted key with the read access docs/OPERATIONS.md asks for (no Balance) passes
/// `check`: it works for everything edgegate does.
#[tokio::test]
async fn check_passes_with_the_documented_restricted_key() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 1, 1).await;
    let stripe = check_stripe(&db, &fake, RESTRICTED_KEY).await;
    assert!(stripe.ok, "{}", stripe.detail);
    assert!(stripe.detail.contains("test mode"), "{}", stripe.detail);
    assert!(!stripe.detail.contains(RESTRICTED_KEY));

    // The same key syncs, so the check said the truth.
    let app = app(
        &db,
        &[
            ("STRIPE_SECRET_KEY", RESTRICTED_KEY),
            ("STRIPE_API_BASE", fake.base.as_str()),
        ],
        fast_retry(),
    )
    .await;
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
}

/// A restricted key that can list products but not events passes the sync and fails every
/// reconciliation: `check` says so rather than letting the hourly run fail.
#[tokio::test]
async fn check_fails_a_restricted_key_that_cannot_list_events() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 1, 1).await;
    let stripe = check_stripe(&db, &fake, NO_EVENTS_KEY).await;
    assert!(!stripe.ok, "{}", stripe.detail);
    assert!(
        stripe.detail.contains("listing events"),
        "{}",
        stripe.detail
    );
    assert!(
        stripe.detail.contains("refused the key"),
        "{}",
        stripe.detail
    );
    assert!(!stripe.detail.contains(NO_EVENTS_KEY));
}

#[tokio::test]
async fn sync_outlives_the_default_request_timeout() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 3, 3).await;
    let secret_keys = format!(r#"{{"backend":"{SB_SECRET}"}}"#);
    let state = AppState::new(
        db.config(&[
            ("SUPABASE_SECRET_KEYS", secret_keys.as_str()),
            ("STRIPE_SECRET_KEY", SECRET_KEY),
            ("STRIPE_API_BASE", fake.base.as_str()),
        ]),
        db.store().await,
    )
    .with_stripe_retry(fast_retry());
    let limits = Limits {
        timeout: Duration::from_millis(100),
        ..Limits::default()
    };
    let server = serve(
        edgegate::routes::router(),
        &state,
        limits,
        Duration::from_secs(1),
    )
    .await;
    fake.fault_at(0, Fault::Hold);
    let running = tokio::spawn(async move {
        let result = sync(&server).await;
        (result, server)
    });
    fake.arrived().await;
    // The route's own timeout is the thing under test, so real time has to pass here.
    tokio::time::sleep(Duration::from_millis(400)).await;
    fake.release();
    let ((status, body), server) = running.await.unwrap();
    assert_eq!(status, 200, "{body}");
    drop(server);
}

/// Found by the schemathesis run (tests/schema): a signed body that is not a Stripe event
/// envelope (empty id or type, `data.object` not an object) was recorded in the ledger and
/// answered 200; an empty id would then make every later empty-id event a "duplicate".
#[tokio::test]
async fn webhook_refuses_a_signed_body_that_is_not_an_event_envelope() {
    stripe_sdk!();
    let db = test_db!();
    let app = webhook_app(&db, WHSEC).await;
    let t = now();
    for (body, field) in [
        (
            json!({"id": "", "type": "x.y", "created": t, "data": {"object": {}}}),
            "id",
        ),
        (
            json!({"id": "evt_S1", "type": "", "created": t, "data": {"object": {}}}),
            "type",
        ),
        (
            json!({"id": "evt_S2", "type": "x.y", "created": t, "data": {"object": [null]}}),
            "data.object",
        ),
    ] {
        let (status, answer) = deliver_signed(&app.server, &body.to_string()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["code"], "INVALID_REQUEST", "{body}");
        let message = answer["message"].as_str().unwrap();
        assert!(message.contains(field), "{body}: {message}");
    }
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_events").await, 0);
}

/// A signed body that is JSON but not an object (an array, a string, a number, a boolean,
/// null) is refused 400 `INVALID_REQUEST` saying just that. The message described the array's
/// first element (`[0]: invalid type: integer, expected a string`), or named the internal type
/// (`expected struct Event`), which sent the sender looking at the wrong thing. One that starts
/// as such a value but is not JSON gets the syntax error.
#[tokio::test]
async fn webhook_refuses_a_signed_body_that_is_not_a_json_object_saying_so() {
    stripe_sdk!();
    let db = test_db!();
    let app = webhook_app(&db, WHSEC).await;
    for (body, kind) in [
        ("[1,2]", "an array"),
        ("[]", "an array"),
        (r#""evt_1""#, "a string"),
        ("42", "a number"),
        ("-1.5", "a number"),
        ("true", "a boolean"),
        (" null\n", "null"),
    ] {
        let (status, answer) = deliver_signed(&app.server, body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["code"], "INVALID_REQUEST", "{body}");
        let message = answer["message"].as_str().unwrap();
        assert_eq!(
            message,
            format!("the event cannot be read: the body is {kind}, not a JSON object"),
            "{body}"
        );
    }
    // Not JSON at all: the syntax error, not the first element's type.
    let (status, answer) = deliver_signed(&app.server, "[1,2").await;
    assert_eq!((status, &answer["code"]), (400, &json!("INVALID_REQUEST")));
    assert_eq!(
        answer["message"],
        "the event cannot be read: the body is not JSON: EOF while parsing a list at line 1 \
         column 4"
    );
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_events").await, 0);
}

/// A "thin" event (an event destination with the thin payload style: `v2.core.event`, `created`
/// in RFC 3339, a `related_object` and no `data`), signed as any other: edgegate cannot apply it
/// (it needs the snapshot, which reconciliation lists), so it is recorded, not applied, and
/// answered 200, not refused for Stripe to retry for days and then disable the endpoint.
#[tokio::test]
async fn webhook_records_a_thin_event_and_answers_200_without_applying_it() {
    stripe_sdk!();
    let db = test_db!();
    let app = webhook_app(&db, WHSEC).await;
    let thin = |id: &str, kind: &str, created: &str| {
        json!({
            "id": id, "object": "v2.core.event", "type": kind, "livemode": false,
            "created": created,
            "related_object": {"id": "prod_thin1", "type": "product", "url": "/v1/products/prod_thin1"},
            "reason": {"type": "request", "request": {"id": "req_1", "idempotency_key": "k"}},
        })
        .to_string()
    };
    let updated = thin(
        "evt_test_65RthinA",
        "v1.product.updated",
        "2026-12-01T06:00:00.123Z",
    );
    let (status, body) = deliver_signed(&app.server, &updated).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"received": true, "duplicate": false}));
    let ledger = "SELECT COUNT(*) FROM stripe_events WHERE id = 'evt_test_65RthinA' \
                  AND event_type = 'v1.product.updated' AND created = 1796104800123 \
                  AND NOT applied";
    assert_eq!(count(&db, ledger).await, 1);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_products").await, 0);
    let (status, body) = deliver_signed(&app.server, &updated).await;
    assert_eq!((status, &body["duplicate"]), (200, &json!(true)), "{body}");

    let ping = thin(
        "evt_test_65RthinB",
        "v2.core.event_destination.ping",
        "2026-12-01T08:00:00+02:00",
    );
    let (status, body) = deliver_signed(&app.server, &ping).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"received": true, "duplicate": false}));
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_events").await, 2);

    // What Stripe never sends is refused as any unreadable event is, naming the field.
    let odd = thin("evt_test_65RthinC", "v1.product.updated", "yesterday");
    let (status, body) = deliver_signed(&app.server, &odd).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("INVALID_REQUEST"))
    );
    assert!(
        body["message"].as_str().unwrap().contains("created"),
        "{body}"
    );
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_events").await, 2);

    let metrics = app.server.get("/metrics").await.text().await.unwrap();
    let line = r#"edgegate_stripe_webhook_events_total{event_type="other",outcome="thin"} 2"#;
    assert!(metrics.contains(line), "{line} in {metrics}");
}

/// An upstream that drops `starting_after` answers the first page again and again, each saying
/// more follow: the sync stops at the repeated page (502, nothing deactivated) instead of
/// looping with its lock held, and the next sync runs.
#[tokio::test]
async fn sync_stops_at_a_page_that_does_not_advance_and_frees_its_lock() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 250, 3).await;
    let app = sync_app(&db, &fake, fast_retry()).await;
    fake.fault_from(0, Fault::IgnoreCursor);
    let (status, body) = tokio::time::timeout(Duration::from_secs(20), sync(&app.server))
        .await
        .expect("a sync over a listing that never advances ends");
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["code"], "UPSTREAM_UNAVAILABLE");
    // edgegate's own check, not Stripe's refusal: the message blames no one it cannot know.
    let message = body["message"].as_str().unwrap();
    let repeated = format!(
        "the list of products did not advance: page 2 ended with {}, as page 1 did, and said \
         more follow (as when a proxy drops starting_after); run ",
        product_id(99)
    );
    assert!(message.starts_with(&repeated), "{message}");
    assert!(message.contains("deactivated nothing"), "{message}");
    // The first page, then the same page again.
    assert_eq!(fake.requests(), 2);
    assert_eq!(count(&db, PRODUCTS_DEACTIVATED).await, 0);
    let run = "SELECT COUNT(*) FROM sync_runs WHERE outcome = 'upstream_error' \
               AND error LIKE '%did not advance%'";
    assert_eq!(count(&db, run).await, 1);

    fake.clear_faults();
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    // The first page was written before the repeat; the rest now.
    assert_eq!(counts(&body, "products"), (250, 150, 0));
}

/// An answer that never ends is read up to a cap, then refused for good: no retry, no waiting
/// for the attempt's timeout.
#[tokio::test]
async fn sync_refuses_an_answer_past_the_size_cap_without_retrying() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 5, 5).await;
    let app = sync_app(&db, &fake, fast_retry()).await;
    fake.fault_at(0, Fault::Endless);
    let (status, body) = tokio::time::timeout(Duration::from_secs(9), sync(&app.server))
        .await
        .expect("an endless answer is cut off well before the attempt timeout");
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["code"], "UPSTREAM_UNAVAILABLE");
    assert!(
        body["message"].as_str().unwrap().contains("32 MiB"),
        "{body}"
    );
    assert_eq!(fake.requests(), 1, "not retried");

    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
}

/// A product the sync found gone is stamped as of the sync: an older event Stripe retries late
/// (newer than the row's last event, older than the sync) does not bring it back.
#[tokio::test]
async fn a_late_event_older_than_the_sync_does_not_reactivate_what_it_found_gone() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 3, 0).await;
    let app = app(&db, &stripe_and_webhook_vars(&fake), fast_retry()).await;
    let t = now();
    // Product 5 came by webhook; Stripe no longer lists it.
    let created = product_event(&fixtures, "evt_G1", "product.created", t - 100, 5, "Gone");
    assert_eq!(deliver_signed(&app.server, &created).await.0, 200);
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(counts(&body, "products"), (3, 3, 1));

    let late = product_event(&fixtures, "evt_G2", "product.updated", t - 50, 5, "Late");
    let (status, body) = deliver_signed(&app.server, &late).await;
    assert_eq!(status, 200, "{body}");
    let gone = format!(
        "SELECT COUNT(*) FROM stripe_products WHERE id = '{}' AND active = FALSE \
         AND deactivated_at IS NOT NULL AND name = 'Gone'",
        product_id(5)
    );
    assert_eq!(count(&db, &gone).await, 1);
}

/// A 429 with `Retry-After` is retried after the time Stripe gives, not the short backoff.
#[tokio::test]
async fn sync_waits_out_a_429_as_long_as_retry_after_says() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 5, 5).await;
    let app = sync_app(&db, &fake, fast_retry()).await;
    fake.rate_limit_for(Duration::from_millis(1500));
    let started = Instant::now();
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    // 429 with `Retry-After: 2`, then the page, then both price listings.
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(fake.requests(), 2 + 2);

    // A wait past the call's longest time (3 attempts of 10 s here) is not waited: the call
    // gives up at once instead of retrying before Stripe said to.
    fake.rate_limit_for(Duration::from_secs(45));
    let (status, body) = tokio::time::timeout(Duration::from_secs(5), sync(&app.server))
        .await
        .expect("a Retry-After past the deadline ends the call at once");
    assert_eq!(status, 502, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("Retry-After 45 s"),
        "{body}"
    );
    assert_eq!(fake.requests(), 4 + 1);
}

/// A `Retry-After` longer than edgegate waits (`MAX_RETRY_AFTER`, 60 s) ends the call at once,
/// even when the call's longest time could hold a shorter wait and another attempt: waiting
/// only 60 s would retry before Stripe said to.
#[tokio::test]
async fn a_retry_after_longer_than_edgegate_waits_ends_the_call_at_once() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 5, 5).await;
    // 4 attempts of 30 s: a 60 s wait and one more attempt fit in its longest time.
    let policy = RetryPolicy {
        max_attempts: 4,
        attempt_timeout: Duration::from_secs(30),
        ..fast_retry()
    };
    let app = sync_app(&db, &fake, policy).await;
    fake.rate_limit_for(Duration::from_secs(90));
    let (status, body) = tokio::time::timeout(Duration::from_secs(5), sync(&app.server))
        .await
        .expect("a Retry-After over 60 s ends the call at once");
    assert_eq!(status, 502, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("Retry-After 90 s"),
        "{body}"
    );
    assert_eq!(fake.requests(), 1);
}

/// Once a `Retry-After` has been waited out, the backoff no longer keeps the call inside its
/// longest time: each later retry is checked against it too, not only the one after the wait.
#[tokio::test]
async fn after_a_retry_after_no_later_attempt_runs_past_the_calls_longest_time() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 5, 5).await;
    // 3 attempts of 2 s: at most about 6 s.
    let policy = RetryPolicy {
        attempt_timeout: Duration::from_secs(2),
        ..fast_retry()
    };
    let app = sync_app(&db, &fake, policy).await;
    // 429 with `Retry-After: 3` (3 s + one 2 s attempt fit), then an answer that never comes in
    // time: after it, a third attempt would end past 6 s.
    fake.rate_limit_for(Duration::from_secs(3));
    fake.fault_from(1, Fault::Slow(Duration::from_secs(10)));
    let (status, body) = tokio::time::timeout(Duration::from_secs(20), sync(&app.server))
        .await
        .expect("the sync ends");
    assert_eq!(status, 502, "{body}");
    assert_eq!(fake.requests(), 2, "{body}");
}

/// Prices are listed twice, active then archived: one reactivated between the two listings is
/// in neither. It is asked for by id before anything is deactivated, and kept.
#[tokio::test]
async fn a_price_reactivated_between_the_two_price_listings_is_not_deactivated() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 3, 10).await;
    let app = sync_app(&db, &fake, fast_retry()).await;
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    // Products, active prices, archived prices: one page each.
    assert_eq!(fake.requests(), 3);
    // Price 5 is archived (every fifth is).
    let archived = fake_stripe::price_id(5);
    let state = format!(
        "SELECT COUNT(*) FROM stripe_prices WHERE id = '{archived}' AND active = {{}} \
         AND deactivated_at IS NULL"
    );
    assert_eq!(count(&db, &state.replace("{}", "FALSE")).await, 1);

    // The next sync's archived listing waits until the price is active again.
    fake.fault_at(5, Fault::Hold);
    let running = tokio::spawn(async move {
        let result = sync(&app.server).await;
        (result, app)
    });
    fake.arrived().await;
    fake.edit_price(&archived, |p| p["active"] = json!(true));
    fake.release();
    let ((status, body), _app) = running.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(counts(&body, "prices").2, 0, "{body}");
    assert_eq!(count(&db, &state.replace("{}", "TRUE")).await, 1);
}

/// A database that cannot be had (here the SQLite file locked by another process past the busy
/// timeout) is 503 `NOT_READY` on the webhook, as on the SMS routes: nothing stored, and the
/// answer says what happened (Stripe retries either way).
#[tokio::test]
async fn webhook_with_the_database_unavailable_answers_503_not_ready() {
    use sqlx::Connection as _;
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    if db.is_postgres() {
        return; // The lock held is SQLite's; the outage tests cut PostgreSQL.
    }
    let app = webhook_app(&db, WHSEC).await;
    let mut holder = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut holder)
        .await
        .unwrap();
    let body = product_event(
        &fixtures,
        "evt_U1",
        "product.created",
        now() - 10,
        1,
        "Locked",
    );
    let (status, answer) = deliver_signed(&app.server, &body).await;
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["code"], "NOT_READY", "{answer}");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM stripe_events").await, 0);
}

/// An event stored as not applied (a release that did not act on its type) is applied when it
/// comes again to a release that acts on it, redelivered or through a reconcile, instead of
/// counting as a duplicate for ever; once applied it is a duplicate as before.
#[tokio::test]
async fn webhook_applies_an_event_an_earlier_release_stored_unapplied() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let app = webhook_app(&db, WHSEC).await;
    let t = now() - 10;
    // As an earlier release that ignored `product.created` would have left it.
    let stored: i64 = scalar!(
        db,
        i64,
        format!(
            "INSERT INTO stripe_events (id, event_type, created, livemode, received_at, applied) \
             VALUES ('evt_L1', 'product.created', {}, FALSE, {}, FALSE) RETURNING created",
            t * 1000,
            now_ms()
        )
    );
    assert_eq!(stored, t * 1000);
    let body = product_event(&fixtures, "evt_L1", "product.created", t, 1, "Late");
    let (status, answer) = deliver_signed(&app.server, &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"received": true, "duplicate": false}));
    assert_eq!(product_name(&db, 1).await, "Late");
    let applied = "SELECT COUNT(*) FROM stripe_events WHERE id = 'evt_L1' AND applied = TRUE";
    assert_eq!(count(&db, applied).await, 1);

    let (status, answer) = deliver_signed(&app.server, &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"received": true, "duplicate": true}));
}

/// A caller that hangs up mid-sync (Fly's proxy cuts a quiet connection after 60 s) does not
/// stop the run, and the run is still audited and counted once it ends: the audit row and the
/// run's metric were written by the request, which was gone.
#[tokio::test]
async fn a_sync_whose_caller_hung_up_is_still_audited_and_counted() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 5, 5).await;
    let app = sync_app(&db, &fake, fast_retry()).await;
    fake.fault_at(1, Fault::Hold);
    let url = app
        .server
        .url("/functions/v1/sync-stripe-products-hardened");
    let request = app
        .server
        .client
        .post(url)
        .header("apikey", SB_SECRET)
        .send();
    let caller = tokio::spawn(request);
    tokio::time::timeout(Duration::from_secs(10), fake.arrived())
        .await
        .expect("the sync reached Stripe");
    caller.abort();
    assert!(caller.await.unwrap_err().is_cancelled());
    fake.release();
    let audit = "SELECT COUNT(*) FROM audit_log WHERE action = 'sync_stripe_products' \
                 AND outcome = 'ok'";
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&db, audit).await == 0 {
        assert!(Instant::now() < deadline, "no audit row for the run");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let runs = "SELECT COUNT(*) FROM sync_runs WHERE outcome = 'ok' AND products_seen = 5";
    assert_eq!(count(&db, runs).await, 1);
    let metrics = app.server.get("/metrics").await.text().await.unwrap();
    let line = r#"edgegate_stripe_sync_runs_total{started_by="manual",outcome="ok"} 1"#;
    assert!(metrics.contains(line), "{line} in {metrics}");
}

// ---- price shapes ----

/// Each price shape Stripe has beside a plain per-unit amount, as Stripe serves it when
/// `tiers` and `currency_options` are expanded: tiered (graduated, its last tier's `up_to`
/// null), a sub-cent decimal amount, pay-what-you-want (`custom_unit_amount`), packaged
/// (`transform_quantity`), several currencies, and a plain one with a tax behaviour.
fn price_shapes(fixtures: &Value) -> Vec<Value> {
    let base = |i: usize| {
        let mut price = fake_stripe::price(fixtures, i);
        let amount = price["unit_amount"].clone();
        price["active"] = json!(true);
        price["billing_scheme"] = json!("per_unit");
        price["tiers_mode"] = Value::Null;
        price["tiers"] = Value::Null;
        price["transform_quantity"] = Value::Null;
        price["custom_unit_amount"] = Value::Null;
        price["tax_behavior"] = json!("unspecified");
        price["unit_amount_decimal"] = json!(amount.to_string());
        price["currency_options"] = json!({"usd": {"custom_unit_amount": null,
            "tax_behavior": "unspecified", "unit_amount": amount,
            "unit_amount_decimal": amount.to_string()}});
        price
    };
    let mut tiered = base(100);
    tiered["billing_scheme"] = json!("tiered");
    tiered["tiers_mode"] = json!("graduated");
    tiered["unit_amount"] = Value::Null;
    tiered["unit_amount_decimal"] = Value::Null;
    tiered["tiers"] = json!([
        {"flat_amount": null, "flat_amount_decimal": null, "unit_amount": 1000,
         "unit_amount_decimal": "1000", "up_to": 10},
        {"flat_amount": 500, "flat_amount_decimal": "500", "unit_amount": 800,
         "unit_amount_decimal": "800", "up_to": null}
    ]);
    tiered["currency_options"] = json!({"usd": {"custom_unit_amount": null,
        "tax_behavior": "unspecified", "tiers": tiered["tiers"].clone(),
        "unit_amount": null, "unit_amount_decimal": null}});
    let mut decimal = base(101);
    decimal["unit_amount"] = Value::Null;
    decimal["unit_amount_decimal"] = json!("12.345");
    decimal["currency_options"]["usd"]["unit_amount"] = Value::Null;
    decimal["currency_options"]["usd"]["unit_amount_decimal"] = json!("12.345");
    let mut custom = base(102);
    custom["type"] = json!("one_time");
    custom["recurring"] = Value::Null;
    custom["unit_amount"] = Value::Null;
    custom["unit_amount_decimal"] = Value::Null;
    custom["custom_unit_amount"] = json!({"maximum": null, "minimum": 500, "preset": 1000});
    custom["currency_options"]["usd"]["custom_unit_amount"] = custom["custom_unit_amount"].clone();
    custom["currency_options"]["usd"]["unit_amount"] = Value::Null;
    custom["currency_options"]["usd"]["unit_amount_decimal"] = Value::Null;
    let mut packaged = base(103);
    packaged["transform_quantity"] = json!({"divide_by": 10, "round": "up"});
    let mut currencies = base(104);
    currencies["currency_options"]["eur"] = json!({"custom_unit_amount": null,
        "tax_behavior": "exclusive", "unit_amount": 900, "unit_amount_decimal": "900"});
    let mut taxed = base(105);
    taxed["tax_behavior"] = json!("inclusive");
    vec![tiered, decimal, custom, packaged, currencies, taxed]
}

/// What `stripe_prices` holds of a price's shape, with its JSON columns read back as JSON, in
/// the form of the Stripe object's own fields.
async fn stored_shape(db: &TestDb, id: &str) -> Value {
    let text = |column: &'static str| stored_text(db, "stripe_prices", column, id);
    let json = |column: &'static str| async move {
        match text(column).await {
            Some(text) => serde_json::from_str::<Value>(&text)
                .unwrap_or_else(|err| panic!("{id}: stored {text:?} is not JSON: {err}")),
            None => Value::Null,
        }
    };
    let unit_amount = format!("SELECT unit_amount FROM stripe_prices WHERE id = '{id}'");
    json!({
        "billing_scheme": text("billing_scheme").await,
        "unit_amount": scalar!(db, Option<i64>, unit_amount),
        "unit_amount_decimal": text("unit_amount_decimal").await,
        "tiers_mode": text("tiers_mode").await,
        "tiers": json("tiers").await,
        "transform_quantity": json("transform_quantity").await,
        "custom_unit_amount": json("custom_unit_amount").await,
        "currency_options": json("currency_options").await,
        "tax_behavior": text("tax_behavior").await,
        "type": text("price_type").await.expect("a price has a type"),
    })
}

/// The fields of `price` that `stored_shape` reads back.
fn shape_of(price: &Value) -> Value {
    let fields = [
        "billing_scheme",
        "unit_amount",
        "unit_amount_decimal",
        "tiers_mode",
        "tiers",
        "transform_quantity",
        "custom_unit_amount",
        "currency_options",
        "tax_behavior",
        "type",
    ];
    fields
        .iter()
        .map(|field| ((*field).to_owned(), price[*field].clone()))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Tiered, sub-cent, pay-what-you-want, packaged and multi-currency prices are stored with what
/// prices them (they were all a null `unit_amount`, or a plain per-unit price): the sync asks
/// Stripe for `tiers` and `currency_options`, which its list leaves out unless expanded.
#[tokio::test]
async fn sync_stores_every_price_shape() {
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 0, 0).await;
    let shapes = price_shapes(&fixtures);
    for price in &shapes {
        fake.add_price(price.clone());
    }
    let app = sync_app(&db, &fake, fast_retry()).await;
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(counts(&body, "prices"), (6, 6, 0), "{body}");
    for price in &shapes {
        let id = price["id"].as_str().unwrap();
        assert_eq!(stored_shape(&db, id).await, shape_of(price), "{id}");
    }
    // Stripe's `up_to` of the last tier (null: infinity) is kept as Stripe sent it.
    let tiers = format!(
        "SELECT tiers FROM stripe_prices WHERE id = '{}'",
        shapes[0]["id"].as_str().unwrap()
    );
    let tiers = scalar!(db, String, tiers);
    assert!(tiers.contains(r#""up_to":null"#), "{tiers}");
    // Stored as compared: a rerun finds nothing changed.
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(counts(&body, "prices"), (6, 0, 0), "{body}");
}

/// A webhook stores every price shape as the sync does, under the same ordering rule. Stripe
/// leaves `tiers` and `currency_options` out of an object it was not asked to expand: an event
/// without them keeps what is stored; an event of the same second as the row has the price
/// fetched with both.
#[tokio::test]
async fn webhook_stores_every_price_shape() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 0, 0).await;
    let vars = stripe_and_webhook_vars(&fake);
    let app = app(&db, &vars, fast_retry()).await;
    let t = now();
    let shapes = price_shapes(&fixtures);
    for (n, price) in shapes.iter().enumerate() {
        let body = event(
            &fixtures,
            &format!("evt_S{n}"),
            "price.created",
            t - 60,
            price.clone(),
        );
        let (status, answer) = deliver_signed(&app.server, &body).await;
        assert_eq!(
            (status, &answer["duplicate"]),
            (200, &json!(false)),
            "{answer}"
        );
        let id = price["id"].as_str().unwrap();
        assert_eq!(stored_shape(&db, id).await, shape_of(price), "{id}");
    }

    // An older event changes none of them.
    let mut older = shapes[3].clone();
    older["transform_quantity"] = json!({"divide_by": 2, "round": "down"});
    older["tax_behavior"] = json!("exclusive");
    let body = event(&fixtures, "evt_Old", "price.updated", t - 120, older);
    assert_eq!(deliver_signed(&app.server, &body).await.0, 200);
    let id = shapes[3]["id"].as_str().unwrap();
    assert_eq!(stored_shape(&db, id).await, shape_of(&shapes[3]), "{id}");

    // A newer event without the fields Stripe serves only when expanded keeps them.
    let mut unexpanded = shapes[0].clone();
    let object = unexpanded.as_object_mut().unwrap();
    object.remove("tiers");
    object.remove("currency_options");
    unexpanded["tax_behavior"] = json!("exclusive");
    let body = event(&fixtures, "evt_New", "price.updated", t - 30, unexpanded);
    assert_eq!(deliver_signed(&app.server, &body).await.0, 200);
    let mut expected = shapes[0].clone();
    expected["tax_behavior"] = json!("exclusive");
    let id = shapes[0]["id"].as_str().unwrap();
    assert_eq!(stored_shape(&db, id).await, shape_of(&expected), "{id}");

    // Another event of that second: the price is fetched, with both fields expanded.
    let mut current = expected.clone();
    current["currency_options"]["gbp"] = json!({"custom_unit_amount": null,
        "tax_behavior": "exclusive", "tiers": current["tiers"].clone(),
        "unit_amount": null, "unit_amount_decimal": null});
    fake.add_price(current.clone());
    let mut same_second = expected.clone();
    same_second
        .as_object_mut()
        .unwrap()
        .remove("currency_options");
    let body = event(&fixtures, "evt_Same", "price.updated", t - 30, same_second);
    let (status, answer) = deliver_signed(&app.server, &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(fake.object_requests(), 1);
    assert_eq!(stored_shape(&db, id).await, shape_of(&current), "{id}");
}

// ---- what a price or product means ----

/// `column` of the row `id` of `table`, as text (null as `None`).
async fn stored_text(db: &TestDb, table: &str, column: &str, id: &str) -> Option<String> {
    let sql = format!("SELECT {column} FROM {table} WHERE id = '{id}'");
    scalar!(db, Option<String>, sql)
}

/// What `stripe_prices` holds of a price's `recurring` beside its interval: usage type, meter
/// and trial days.
async fn stored_usage(db: &TestDb, id: &str) -> (Option<String>, Option<String>, Option<i64>) {
    let usage = stored_text(db, "stripe_prices", "recurring_usage_type", id).await;
    let meter = stored_text(db, "stripe_prices", "recurring_meter", id).await;
    let trial = format!("SELECT recurring_trial_period_days FROM stripe_prices WHERE id = '{id}'");
    (usage, meter, scalar!(db, Option<i64>, trial))
}

/// What `stripe_products` holds of what a storefront shows: images and marketing features
/// (JSON text), unit label and URL.
async fn stored_storefront(db: &TestDb, id: &str) -> [Option<String>; 4] {
    let mut stored = [None, None, None, None];
    for (slot, column) in
        stored
            .iter_mut()
            .zip(["images", "marketing_features", "unit_label", "url"])
    {
        *slot = stored_text(db, "stripe_products", column, id).await;
    }
    stored
}

/// A metered price (`recurring.usage_type`, its `meter`) was stored as a licensed one would be,
/// and its trial and a product's images, unit label, URL and marketing features not at all: the
/// sync and events store them as Stripe sends them, null where it sends null. Events carry whole
/// objects with these fields, so an event's value, null included, replaces the row's; a rerun of
/// the sync finds nothing changed.
#[tokio::test]
async fn what_a_price_or_product_means_is_stored_by_the_sync_and_by_events() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 0, 0).await;
    let mut product = fake_stripe::product(&fixtures, 1);
    product["images"] = json!(["https://example.com/pro.png"]);
    product["marketing_features"] = json!([{"name": "Unlimited seats"}]);
    product["unit_label"] = json!("seat");
    product["url"] = json!("https://example.com/pro");
    fake.add_product(product.clone());
    // Prices 3 and 7 are recurring (Stripe's example: licensed, no meter, no trial), 4 one-time.
    let mut metered = fake_stripe::price(&fixtures, 3);
    metered["recurring"]["usage_type"] = json!("metered");
    metered["recurring"]["meter"] = json!("mtr_61Ql");
    metered["recurring"]["trial_period_days"] = json!(14);
    for price in [
        metered.clone(),
        fake_stripe::price(&fixtures, 7),
        fake_stripe::price(&fixtures, 4),
    ] {
        fake.add_price(price);
    }
    let vars = stripe_and_webhook_vars(&fake);
    let app = app(&db, &vars, fast_retry()).await;
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(counts(&body, "prices"), (3, 3, 0), "{body}");
    let id = |i: usize| fake_stripe::price_id(i);
    let some = |text: &str| Some(text.to_owned());
    assert_eq!(
        stored_usage(&db, &id(3)).await,
        (some("metered"), some("mtr_61Ql"), Some(14))
    );
    assert_eq!(
        stored_usage(&db, &id(7)).await,
        (some("licensed"), None, None)
    );
    assert_eq!(stored_usage(&db, &id(4)).await, (None, None, None));
    assert_eq!(
        stored_storefront(&db, &product_id(1)).await,
        [
            some(r#"["https://example.com/pro.png"]"#),
            some(r#"[{"name":"Unlimited seats"}]"#),
            some("seat"),
            some("https://example.com/pro"),
        ]
    );
    let (status, body) = sync(&app.server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(counts(&body, "products"), (1, 0, 0), "{body}");
    assert_eq!(counts(&body, "prices"), (3, 0, 0), "{body}");

    // Events: Stripe's null replaces the stored value.
    let t = now();
    let mut bare = product.clone();
    bare["images"] = json!([]);
    bare["marketing_features"] = json!([]);
    bare["unit_label"] = Value::Null;
    bare["url"] = Value::Null;
    let update = event(&fixtures, "evt_M1", "product.updated", t, bare);
    assert_eq!(deliver_signed(&app.server, &update).await.0, 200);
    assert_eq!(
        stored_storefront(&db, &product_id(1)).await,
        [some("[]"), some("[]"), None, None]
    );
    // An object without `marketing_features` (an API version before 2024-04-10 calls them
    // `features`: an endpoint pinned to it) keeps the row's; Stripe never sends it null.
    let mut featured = product.clone();
    featured["marketing_features"] = json!([{"name": "SSO"}]);
    let update = event(
        &fixtures,
        "evt_M3",
        "product.updated",
        t + 1,
        featured.clone(),
    );
    assert_eq!(deliver_signed(&app.server, &update).await.0, 200);
    let older_version = featured.as_object_mut().unwrap();
    older_version.remove("marketing_features");
    older_version.insert("features".to_owned(), json!([{"name": "SSO"}]));
    let update = event(&fixtures, "evt_M4", "product.updated", t + 2, featured);
    assert_eq!(deliver_signed(&app.server, &update).await.0, 200);
    assert_eq!(
        stored_storefront(&db, &product_id(1)).await[1],
        some(r#"[{"name":"SSO"}]"#)
    );
    let mut licensed = metered.clone();
    licensed["recurring"]["usage_type"] = json!("licensed");
    licensed["recurring"]["meter"] = Value::Null;
    licensed["recurring"]["trial_period_days"] = Value::Null;
    let update = event(&fixtures, "evt_M2", "price.updated", t, licensed);
    assert_eq!(deliver_signed(&app.server, &update).await.0, 200);
    assert_eq!(
        stored_usage(&db, &id(3)).await,
        (some("licensed"), None, None)
    );
}
