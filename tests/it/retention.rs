//! What docs/OPERATIONS.md ("Database size") tells the operator they may delete by hand: its
//! statements, run on a database with rows older and newer than each cutoff, delete the old rows
//! and leave every answer edgegate gives as it was.

use edgegate::store::{NewSms, Reservation, SmsLimits};
use serde_json::{Value, json};
use sqlx::Connection as _;

use crate::fake_stripe::FakeStripe;
use crate::reconcile::reconcile;
use crate::stripe::{
    app, count, deliver_signed, fast_retry, in_ci, now, product_event, product_name, sdk_available,
    stripe_and_webhook_vars, stripe_sdk,
};
use crate::support::{TestDb, now_ms};
use crate::{stripe_fixtures, test_db};

const DAY_MS: i64 = 86_400_000;
const DAY_S: i64 = 86_400;

/// The SQL block that follows `<!-- database-size: ENGINE -->` in docs/OPERATIONS.md.
fn documented_sql(engine: &str) -> String {
    operations_sql(&format!("database-size: {engine}"))
}

/// The SQL block that follows `<!-- NAME -->` in docs/OPERATIONS.md.
pub(crate) fn operations_sql(name: &str) -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/OPERATIONS.md"))
        .unwrap();
    let marker = format!("<!-- {name} -->\n```sql\n");
    let start = doc
        .find(&marker)
        .unwrap_or_else(|| panic!("no {marker:?} in docs/OPERATIONS.md"))
        + marker.len();
    let end = doc[start..].find("```").expect("the end of the block");
    doc[start..start + end].to_owned()
}

/// Runs `sql` (one statement or several) on `db` as `psql` or `sqlite3` would; returns the rows
/// it changed.
pub(crate) async fn run_sql(db: &TestDb, sql: &str) -> u64 {
    let sql = sqlx::AssertSqlSafe(sql.to_owned());
    if db.is_postgres() {
        let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
        let done = sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
        conn.close().await.unwrap();
        done.rows_affected()
    } else {
        let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
        let done = sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
        conn.close().await.unwrap();
        done.rows_affected()
    }
}

/// The ids in `table`, sorted.
async fn ids(db: &TestDb, table: &str) -> Vec<String> {
    let sql = sqlx::AssertSqlSafe(format!("SELECT id FROM {table} ORDER BY id"));
    if db.is_postgres() {
        let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
        sqlx::query_scalar(sql).fetch_all(&pool).await.unwrap()
    } else {
        let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
        sqlx::query_scalar(sql).fetch_all(&pool).await.unwrap()
    }
}

fn sms<'a>(id: &'a str, key: Option<&'a str>, to: &'a str) -> NewSms<'a> {
    NewSms {
        id,
        idempotency_key: key,
        to_number: to,
        body: "Your code is 123456",
        status: "accepted",
        replayed_error_codes: &[],
    }
}

/// What the statements of the section delete on each engine, run as it says (again until they
/// delete nothing), and what they leave answering as before:
/// - a Stripe event whose row was deleted, delivered again, is taken as new (`duplicate: false`)
///   and changes nothing a newer event changed; a reconciliation still finds the listed event
///   of the last 30 days in the ledger (already applied, none applied again);
/// - the reconciliation's window starts where it did: the newest covering run is kept, though
///   older than the cutoff, and so is a run left `running`;
/// - the SMS limits per recipient and per minute refuse as before; a recent idempotency key
///   still answers its message; a deleted one sends again (as the section says); unsettled
///   rows stay at any age;
/// - old `audit_log` and `sync_runs` rows go, a `running` sync stays.
#[tokio::test]
async fn the_documented_deletions_leave_every_answer_as_it_was() {
    stripe_sdk!();
    let fixtures = stripe_fixtures!();
    let db = test_db!();
    let fake = FakeStripe::start(&fixtures, 0, 0).await;
    let app = app(&db, &stripe_and_webhook_vars(&fake), fast_retry()).await;
    let store = &app.state.store;
    let (t, now) = (now(), now_ms());

    // Events of 45, 41 and 40 days ago (three days of backlog), and one of yesterday, which
    // Stripe still lists.
    let old = product_event(
        &fixtures,
        "evt_OLD1",
        "product.updated",
        t - 40 * DAY_S,
        1,
        "Old",
    );
    let newer = product_event(
        &fixtures,
        "evt_NEW1",
        "product.updated",
        t - DAY_S,
        1,
        "New",
    );
    let others = [
        product_event(
            &fixtures,
            "evt_OLD2",
            "product.updated",
            t - 41 * DAY_S,
            2,
            "Two",
        ),
        product_event(
            &fixtures,
            "evt_OLD3",
            "product.updated",
            t - 45 * DAY_S,
            3,
            "Three",
        ),
    ];
    for body in [&old, &newer].into_iter().chain(&others) {
        let (status, answer) = deliver_signed(&app.server, body).await;
        assert_eq!(status, 200, "{answer}");
    }
    fake.add_events([serde_json::from_str::<Value>(&newer).unwrap()]);

    // Reconciliation runs: the newest covering one 35 days ago (the periodic runs have failed
    // since), an older one, failed ones, one left running by a process that died.
    let run = |id: &str, days_ago: i64, outcome: &str, continuous: bool| {
        let started = now - days_ago * DAY_MS;
        format!(
            "INSERT INTO reconcile_runs (id, started_by, since, started_at, finished_at, outcome, \
             continuous, covered_until) VALUES ('{id}', 'periodic', {}, {started}, {started}, \
             '{outcome}', {continuous}, {started});",
            started / 1000 - 30 * DAY_S
        )
    };
    let runs = [
        run("run-cover-50d", 50, "ok", true),
        run("run-cover-35d", 35, "ok", true),
        run("run-error-33d", 33, "error", true),
        run("run-running-40d", 40, "running", true),
        run("run-error-1d", 1, "error", false),
    ];
    run_sql(&db, &runs.concat()).await;
    let coverage = store.reconcile_coverage().await.unwrap();
    assert_eq!(coverage, Some(now - 35 * DAY_MS));

    // SMS rows: settled and unsettled ones of 40 and 41 days ago; three to one number in the
    // last seconds, the first with an idempotency key.
    let message = |id: &str, key: &str, to: &str, status: &str, sid: &str, at: i64| {
        format!(
            "INSERT INTO sms_messages (id, idempotency_key, to_number, body, status, twilio_sid, \
             created_at, updated_at) VALUES ('{id}', {key}, '{to}', 'hi', '{status}', {sid}, \
             {at}, {at});"
        )
    };
    let old_day = now - 40 * DAY_MS;
    let messages = [
        message(
            "sms-old-delivered",
            "'key-old'",
            "+15550000001",
            "delivered",
            "'SM01'",
            old_day,
        ),
        message(
            "sms-old-failed",
            "NULL",
            "+15550000001",
            "failed",
            "NULL",
            old_day - DAY_MS,
        ),
        message(
            "sms-old-sent",
            "NULL",
            "+15550000001",
            "sent",
            "'SM03'",
            old_day,
        ),
        message(
            "sms-old-accepted",
            "NULL",
            "+15550000001",
            "accepted",
            "NULL",
            old_day,
        ),
        message(
            "sms-new-1",
            "'key-new'",
            "+15550000002",
            "delivered",
            "'SM11'",
            now - 3000,
        ),
        message(
            "sms-new-2",
            "NULL",
            "+15550000002",
            "delivered",
            "'SM12'",
            now - 2000,
        ),
        message(
            "sms-new-3",
            "NULL",
            "+15550000002",
            "sent",
            "'SM13'",
            now - 1000,
        ),
    ];
    run_sql(&db, &messages.concat()).await;

    // Audit rows and sync runs of 100 and 101 days ago and of yesterday.
    let audit = |id: &str, at: i64| {
        format!(
            "INSERT INTO audit_log (id, at, credential_source, credential_id, action, outcome) \
             VALUES ('{id}', {at}, 'api_key', 'secret:backend', 'sync_stripe_products', 'ok');"
        )
    };
    let sync = |id: &str, at: i64, outcome: &str| {
        format!(
            "INSERT INTO sync_runs (id, started_at, finished_at, outcome) \
             VALUES ('{id}', {at}, {at}, '{outcome}');"
        )
    };
    let others_sql = [
        audit("audit-100d", now - 100 * DAY_MS),
        audit("audit-101d", now - 101 * DAY_MS),
        audit("audit-1d", now - DAY_MS),
        sync("sync-100d", now - 100 * DAY_MS, "ok"),
        sync("sync-101d", now - 101 * DAY_MS, "error"),
        sync("sync-running-100d", now - 100 * DAY_MS, "running"),
        sync("sync-1d", now - DAY_MS, "ok"),
    ];
    run_sql(&db, &others_sql.concat()).await;

    // As the section says: again until they delete nothing. Each DELETE takes one day of the
    // oldest rows: the three days of events take three runs.
    let sql = documented_sql(if db.is_postgres() {
        "postgres"
    } else {
        "sqlite"
    });
    let mut runs_deleting = 0;
    while run_sql(&db, &sql).await > 0 {
        runs_deleting += 1;
        assert!(runs_deleting < 10, "the statements keep deleting");
    }
    assert_eq!(runs_deleting, 3);

    assert_eq!(ids(&db, "stripe_events").await, ["evt_NEW1"]);
    assert_eq!(
        ids(&db, "reconcile_runs").await,
        ["run-cover-35d", "run-error-1d", "run-running-40d"]
    );
    assert_eq!(
        ids(&db, "sms_messages").await,
        ["sms-new-1", "sms-new-2", "sms-new-3", "sms-old-accepted"]
    );
    assert_eq!(ids(&db, "audit_log").await, ["audit-1d"]);
    assert_eq!(
        ids(&db, "sync_runs").await,
        ["sync-1d", "sync-running-100d"]
    );

    // The SMS limits count the same sends.
    let clock = || now_ms();
    let per_recipient = SmsLimits {
        per_recipient_per_hour: 3,
        per_minute: 100,
    };
    let reserved = store
        .reserve_sms(sms("sms-a", None, "+15550000002"), per_recipient, clock)
        .await
        .unwrap();
    assert!(
        matches!(reserved, Reservation::Limited { .. }),
        "{reserved:?}"
    );
    let per_minute = SmsLimits {
        per_recipient_per_hour: 100,
        per_minute: 3,
    };
    let reserved = store
        .reserve_sms(sms("sms-b", None, "+15550000003"), per_minute, clock)
        .await
        .unwrap();
    assert!(
        matches!(reserved, Reservation::Limited { .. }),
        "{reserved:?}"
    );
    // A recent key answers its message; a key whose row was deleted sends again.
    let open = SmsLimits {
        per_recipient_per_hour: 100,
        per_minute: 100,
    };
    let reserved = store
        .reserve_sms(sms("sms-c", Some("key-new"), "+15550000002"), open, clock)
        .await
        .unwrap();
    assert!(
        matches!(&reserved, Reservation::Existing(m) if m.id == "sms-new-1"),
        "{reserved:?}"
    );
    let reserved = store
        .reserve_sms(sms("sms-d", Some("key-old"), "+15550000001"), open, clock)
        .await
        .unwrap();
    assert!(
        matches!(&reserved, Reservation::Created(m) if m.id == "sms-d"),
        "{reserved:?}"
    );

    // The reconciliation's window is what the kept coverage gives: Stripe's 30 days (the
    // coverage is older), and its listed event of yesterday is found in the ledger.
    assert_eq!(store.reconcile_coverage().await.unwrap(), coverage);
    let before = now_ms() / 1000;
    let (status, body) = reconcile(&app.server).await;
    let after = now_ms() / 1000;
    assert_eq!(status, 200, "{body}");
    let since = body["since"].as_i64().unwrap();
    let expected = |at| edgegate::stripe::reconcile::default_since(coverage, at);
    assert!(
        (expected(before)..=expected(after)).contains(&since),
        "{body}"
    );
    assert_eq!(
        body["events"],
        json!({"seen": 1, "applied": 0, "already_applied": 1, "ignored": 0}),
        "{body}"
    );

    // A deleted event delivered again (resent from the dashboard: Stripe itself retries for
    // three days) is new to the ledger and changes nothing a newer event changed.
    let (status, answer) = deliver_signed(&app.server, &old).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"received": true, "duplicate": false}));
    assert_eq!(product_name(&db, 1).await, "New");
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM stripe_events WHERE id = 'evt_OLD1'"
        )
        .await,
        1
    );
}
