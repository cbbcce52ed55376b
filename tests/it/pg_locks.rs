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
