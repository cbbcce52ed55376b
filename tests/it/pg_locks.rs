//! PostgreSQL statements that wait on a lock another session holds (`LOCK TABLE … IN ACCESS
//! EXCLUSIVE MODE`, as a migration, a `pg_dump` or an operator's transaction left open would):
//! the server cancels them within the pool's bounds, so the request answers 503 `NOT_READY`
//! well before the 30 s request timeout, and the connection goes back to the pool instead of
//! staying queued on the lock after the caller had its answer.

use std::time::{Duration, Instant};

use edgegate::{AppState, Store};
use serde_json::json;
use sqlx::Connection as _;

use crate::outage::{SECRET_KEY, WHSEC, product_event};
use crate::stripe::{in_ci, sdk_available, stripe_sdk};
use crate::support::{TestDb, now_ms, serve_app, status_and_body};
use crate::{postgres_db, stripe_fixtures};

/// Well under the 30 s request timeout (a 504), yet room for a loaded machine.
const ANSWERED_WITHIN: Duration = Duration::from_secs(20);

/// A session of the test's own holding `table` (in the test's schema) until it is closed.
async fn hold(db: &TestDb, table: &str) -> sqlx::PgConnection {
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
    )))
    .execute(&mut holder)
    .await
    .unwrap();
    holder
}

/// How many sessions still wait for a lock on `table` (asked on the holder's own session).
async fn waiting_on(holder: &mut sqlx::PgConnection, table: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = $1::regclass",
    )
    .bind(table)
    .fetch_one(&mut *holder)
    .await
    .unwrap()
}

async fn app(db: &TestDb) -> (crate::support::TestServer, String) {
    let secret_keys = format!(r#"{{"backend":"{SECRET_KEY}"}}"#);
    let config = db.config(&[
        ("STRIPE_WEBHOOK_SECRET", WHSEC),
        ("SUPABASE_SECRET_KEYS", &secret_keys),
    ]);
    let store = Store::connect(&config.database_url).await.unwrap();
    store.migrate().await.unwrap();
    let server = serve_app(
        edgegate::app(AppState::new(config, store)),
        Duration::from_secs(5),
    )
    .await;
    let base = format!("http://{}", server.addr);
    (server, base)
}

/// With `stripe_events` locked, every delivery (as many as the pool has connections) answers
/// 503 `NOT_READY` (Stripe retries it) rather than 504 at the request timeout, no statement of
/// the app's is left queued on the lock, and the database, which is fine, is ready.
#[tokio::test]
async fn webhooks_behind_a_locked_ledger_answer_503_and_give_their_connections_back() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = postgres_db!();
    let (server, base) = app(&db).await;
    let mut holder = hold(&db, "stripe_events").await;
    let client = reqwest::Client::new();
    let started = Instant::now();
    let deliveries = (0..10).map(|i| {
        let body = product_event(&fixtures, i);
        let signature = crate::stripe::sdk_sign(&body, WHSEC, now_ms() / 1000);
        let request = client
            .post(format!("{base}/functions/v1/stripe-webhook"))
            .header("content-type", "application/json")
            .header("stripe-signature", signature)
            .body(body)
            .timeout(Duration::from_secs(60))
            .send();
        async move { status_and_body(request.await.unwrap()).await }
    });
    for (status, body) in futures_util::future::join_all(deliveries).await {
        assert_eq!(
            (status, &body["code"]),
            (503, &json!("NOT_READY")),
            "{body}"
        );
    }
    assert!(
        started.elapsed() < ANSWERED_WITHIN,
        "answered after {:?}",
        started.elapsed()
    );
    assert_eq!(
        waiting_on(&mut holder, "stripe_events").await,
        0,
        "statements still queued on the lock after their callers were answered"
    );
    let (status, body) = status_and_body(server.get("/readyz").await).await;
    assert_eq!(status, 200, "{body}");
    holder.close().await.unwrap();
}

/// With `audit_log` locked, the read-only report still answers 200 (its audit row is given up
/// on, and logged), well before the request timeout, and nothing stays queued on the lock.
#[tokio::test]
async fn signing_keys_answers_while_the_audit_log_is_locked() {
    let db = postgres_db!();
    let (_server, base) = app(&db).await;
    let mut holder = hold(&db, "audit_log").await;
    let started = Instant::now();
    let response = reqwest::Client::new()
        .get(format!("{base}/admin/signing-keys"))
        .header("apikey", SECRET_KEY)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    let (status, body) = status_and_body(response).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["keys"].is_array(), "{body}");
    assert!(
        started.elapsed() < ANSWERED_WITHIN,
        "answered after {:?}",
        started.elapsed()
    );
    assert_eq!(waiting_on(&mut holder, "audit_log").await, 0);
    holder.close().await.unwrap();
}

/// A send refused because the reservation lock is held elsewhere is refused within the one
/// 5 s budget the reservation has, however it spent it: waiting for one of the two permits and
/// then for the lock used to add up (5 s + 5 s). The lock is held by a session of the test's
/// own, in a database of its own (advisory locks are per database).
#[tokio::test]
async fn a_reservation_waits_at_most_its_one_budget_for_permit_and_lock_together() {
    use edgegate::store::{NewSms, SmsLimits};
    let Some(db) = TestDb::postgres_database().await else {
        crate::support::skipped("PostgreSQL only (TEST_POSTGRES_URL)");
        return;
    };
    let store = db.store().await;
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    // SMS_RESERVATION_LOCK in src/store/sms.rs ("edgesms").
    sqlx::query("SELECT pg_advisory_lock(x'0065646765736d73'::bigint)")
        .execute(&mut holder)
        .await
        .unwrap();
    let limits = SmsLimits {
        per_recipient_per_hour: 100,
        per_minute: 100,
    };
    let ids = ["budget-1", "budget-2", "budget-3", "budget-4"];
    // The first two take the permits and wait on the lock; the next two come a second later
    // and wait for a permit, which frees only when the first two give up, 4 s into their wait.
    let sends = ids.iter().enumerate().map(|(i, id)| {
        let store = store.clone();
        async move {
            if i >= 2 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let new = NewSms {
                id,
                idempotency_key: None,
                to_number: "+12025550123",
                body: "hi",
                status: "accepted",
                replayed_error_codes: &[],
            };
            let started = Instant::now();
            let reserved = store.reserve_sms(new, limits, now_ms).await;
            (reserved, started.elapsed())
        }
    });
    for (reserved, took) in futures_util::future::join_all(sends).await {
        let err = reserved.expect_err("reserved while the lock was held");
        assert!(edgegate::store::is_unavailable(&err), "{err:#}");
        // A 5 s budget; a permit waited for 4 s and then the lock for 5 s took 9 s.
        assert!(took < Duration::from_millis(7500), "refused after {took:?}");
    }
    holder.close().await.unwrap();
    store.close().await;
    db.drop_database().await;
}

/// A PostgreSQL error is described by its message alone, without the line of PostgreSQL's own
/// C source sqlx appends to it ("canceling statement due to lock timeout at line 3211"), which
/// says nothing to an operator and made stored run errors and log lines differ by server build.
#[tokio::test]
async fn a_postgres_error_is_described_without_the_servers_source_line() {
    let db = postgres_db!();
    let store = db.store().await;
    let holder = hold(&db, "audit_log").await;
    let err = store
        .recent_audit(1)
        .await
        .expect_err("read a locked table");
    let said = edgegate::error::causes(&err);
    assert!(said.contains("lock timeout"), "{said}");
    assert!(!said.contains(" at line "), "{said}");
    holder.close().await.unwrap();
}

/// The same for a migration's error, the likeliest place an operator reads one (start-up,
/// `edgegate migrate`): sqlx's `MigrateError` repeats the database error's text, source line
/// included, before the error itself in the chain, where the line was kept.
#[tokio::test]
async fn a_migrations_postgres_error_is_described_without_the_servers_source_line() {
    let db = postgres_db!();
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let failed = sqlx::query("SELECT 1 / 0")
        .execute(&mut conn)
        .await
        .expect_err("division by zero");
    assert!(failed.to_string().contains(" at line "), "{failed}");
    let err = anyhow::Error::new(sqlx::migrate::MigrateError::ExecuteMigration(failed, 7))
        .context("applying the migrations");
    let said = edgegate::error::causes(&err);
    assert!(said.contains("while executing migration 7"), "{said}");
    assert!(said.contains("division by zero"), "{said}");
    assert!(!said.contains(" at line "), "{said}");
    conn.close().await.unwrap();
}

/// A product row as a `product.created` of `as_of` writes it.
fn created_product(id: &str, as_of: i64) -> edgegate::store::ProductRow {
    edgegate::store::ProductRow {
        id: id.to_owned(),
        active: true,
        name: "Created".to_owned(),
        description: None,
        default_price_id: None,
        images: None,
        marketing_features: None,
        unit_label: None,
        url: None,
        metadata: "{}".to_owned(),
        livemode: false,
        stripe_created: as_of,
        stripe_updated: None,
        as_of,
        deactivated_at: None,
    }
}

/// A `product.deleted` of `as_of` whose object is Stripe's stub, as `effect_of` makes it.
fn stub_deletion(id: &str, as_of: i64, now: i64) -> edgegate::store::StripeEffect {
    use edgegate::store::{CatalogueObject, Deletion, StripeEffect, Tombstone};
    let mut tombstone = created_product(id, as_of);
    tombstone.active = false;
    tombstone.name = String::new();
    tombstone.stripe_created = 0;
    tombstone.deactivated_at = Some(now);
    StripeEffect::Deletion(Deletion {
        object: CatalogueObject::Product,
        id: id.to_owned(),
        as_of,
        deactivated_at: now,
        tombstone: Tombstone::Product(Box::new(tombstone)),
    })
}

fn ledger_event(id: &str, event_type: &str, created_ms: i64) -> edgegate::store::LedgerEvent {
    edgegate::store::LedgerEvent {
        id: id.to_owned(),
        event_type: event_type.to_owned(),
        created_ms,
        livemode: false,
        received_at: now_ms(),
    }
}

/// Waits (bounded) until a session waits on a lock held by the session of `holder_pid`, or
/// `task` ends. Asked on a session of its own: inside the holder's transaction, the activity
/// view would stay as its first read.
async fn until_a_session_waits<T>(db: &TestDb, holder_pid: i32, task: &tokio::task::JoinHandle<T>) {
    let mut observer = sqlx::PgConnection::connect(&db.url).await.unwrap();
    for _ in 0..500 {
        assert!(
            !task.is_finished(),
            "it ended without waiting on the lock: the interleaving was not exercised"
        );
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY (pg_blocking_pids(pid))",
        )
        .bind(holder_pid)
        .fetch_one(&mut observer)
        .await
        .unwrap();
        if waiting > 0 {
            observer.close().await.unwrap();
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no session came to wait on the lock");
}

/// A `product.created` and a stub `product.deleted` of an id no row holds, at the same time, in
/// both orders: the deletion whose first mark found no row (the creation not committed) writes
/// its tombstone, which waits for the creation and, finding its row, marks that deleted; the
/// creation waiting on the tombstone finds it newer and leaves it. The product ends deleted
/// either way.
#[tokio::test]
async fn a_creation_and_a_stub_deletion_at_the_same_time_leave_the_product_deleted() {
    use edgegate::store::{EventReceipt, SameSecond, StripeEffect};
    let db = postgres_db!();
    let store = db.store().await;
    let created = now_ms() / 1000 * 1000 - 60_000;
    let deleted = created + 30_000;
    let insert = "INSERT INTO stripe_products (id, active, name, metadata, livemode, \
                  stripe_created, last_event_created, synced_at, deactivated_at) \
                  VALUES ($1, $2, $3, '{}', FALSE, $4, $5, $6, $7)";
    let deleted_rows = "SELECT count(*) FROM stripe_products WHERE id = $1 AND active = FALSE \
                        AND deactivated_at IS NOT NULL AND last_event_created = $2";

    // The creation's row not committed yet when the deletion comes.
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let holder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut holder)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query(insert)
        .bind("prod_race_1")
        .bind(true)
        .bind("Created")
        .bind(created)
        .bind(created)
        .bind(now_ms())
        .bind(None::<i64>)
        .execute(&mut holder)
        .await
        .unwrap();
    let deletion = {
        let store = store.clone();
        tokio::spawn(async move {
            let effect = stub_deletion("prod_race_1", deleted, now_ms());
            let event = ledger_event("evt_race_d1", "product.deleted", deleted);
            store
                .apply_stripe_event(&event, &effect, SameSecond::Detect)
                .await
        })
    };
    until_a_session_waits(&db, holder_pid, &deletion).await;
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    assert_eq!(deletion.await.unwrap().unwrap(), EventReceipt::Applied);
    let marked: i64 = sqlx::query_scalar(deleted_rows)
        .bind("prod_race_1")
        .bind(deleted)
        .fetch_one(&mut holder)
        .await
        .unwrap();
    assert_eq!(marked, 1, "the created row, not marked deleted");
    let name: String = sqlx::query_scalar("SELECT name FROM stripe_products WHERE id = $1")
        .bind("prod_race_1")
        .fetch_one(&mut holder)
        .await
        .unwrap();
    assert_eq!(name, "Created");

    // The tombstone not committed yet when the creation comes.
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query(insert)
        .bind("prod_race_2")
        .bind(false)
        .bind("")
        .bind(0_i64)
        .bind(deleted)
        .bind(now_ms())
        .bind(Some(now_ms()))
        .execute(&mut holder)
        .await
        .unwrap();
    let creation = {
        let store = store.clone();
        tokio::spawn(async move {
            let effect = StripeEffect::Product(created_product("prod_race_2", created));
            let event = ledger_event("evt_race_c2", "product.created", created);
            store
                .apply_stripe_event(&event, &effect, SameSecond::Detect)
                .await
        })
    };
    until_a_session_waits(&db, holder_pid, &creation).await;
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    assert_eq!(creation.await.unwrap().unwrap(), EventReceipt::Applied);
    let marked: i64 = sqlx::query_scalar(deleted_rows)
        .bind("prod_race_2")
        .bind(deleted)
        .fetch_one(&mut holder)
        .await
        .unwrap();
    assert_eq!(marked, 1, "the creation brought the product back");
    holder.close().await.unwrap();
}
