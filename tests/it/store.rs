//! The storage conformance suite: the same tests on SQLite and on PostgreSQL.

use edgegate::store::{AuditEntry, BackendKind, CallerUsage, KeyUsage, shipped_migrations};

use crate::support::TestDb;
use crate::test_db;

#[test]
fn both_backends_ship_the_same_migrations() {
    let [(_, sqlite), (_, postgres)] = shipped_migrations();
    assert!(!sqlite.is_empty(), "no migrations found");
    assert_eq!(
        sqlite, postgres,
        "migrations/sqlite and migrations/postgres differ"
    );
}

#[test]
fn migration_folders_hold_the_same_file_names() {
    let names = |dir: &str| {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let root = env!("CARGO_MANIFEST_DIR");
    assert_eq!(
        names(&format!("{root}/migrations/sqlite")),
        names(&format!("{root}/migrations/postgres"))
    );
}

#[tokio::test]
async fn migrate_applies_every_version_and_is_idempotent() {
    let db = test_db!();
    let store = db.store().await;
    let expected_kind = if db.is_postgres() {
        BackendKind::Postgres
    } else {
        BackendKind::Sqlite
    };
    assert_eq!(store.kind(), expected_kind);
    store.migrate().await.expect("a second migrate is a no-op");
    let shipped: Vec<i64> = shipped_migrations()[0].1.iter().map(|(v, _)| *v).collect();
    assert_eq!(store.applied_migrations().await.unwrap(), shipped);
}

#[tokio::test]
async fn concurrent_migrations_from_two_instances_agree() {
    let db = test_db!();
    let config = db.config(&[]);
    let (a, b) = tokio::join!(
        edgegate::Store::connect(&config.database_url),
        edgegate::Store::connect(&config.database_url)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let (ra, rb) = tokio::join!(a.migrate(), b.migrate());
    ra.unwrap();
    rb.unwrap();
    assert_eq!(
        a.applied_migrations().await.unwrap(),
        b.applied_migrations().await.unwrap()
    );
}

#[tokio::test]
async fn every_table_later_features_need_exists() {
    let db = test_db!();
    let store = db.store().await;
    let url = db.config(&[]).database_url;
    let tables = [
        "stripe_products",
        "stripe_prices",
        "stripe_events",
        "sync_runs",
        "locks",
        "sms_messages",
        "key_usage_hourly",
        "audit_log",
    ];
    for table in tables {
        let sql = sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}"));
        let count: i64 = if db.is_postgres() {
            let pool = sqlx::PgPool::connect(url.expose()).await.unwrap();
            sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap()
        } else {
            let pool = sqlx::SqlitePool::connect(url.expose()).await.unwrap();
            sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap()
        };
        assert_eq!(count, 0, "{table} should start empty");
    }
    store.ping().await.unwrap();
}

#[tokio::test]
async fn audit_entries_round_trip_newest_first() {
    let db = test_db!();
    let store = db.store().await;
    let now = crate::support::now_ms();
    let first = AuditEntry::new(
        now - 1_000,
        Some("req-1".into()),
        "legacy_secret",
        "legacy",
        "sync_stripe_products",
        "ok",
    );
    let mut second = AuditEntry::new(
        now,
        None,
        "api_key",
        "backend",
        "refresh_signing_keys",
        "error",
    );
    second.detail = Some(r#"{"reason":"jwks host down"}"#.into());
    store.record_audit(&first).await.unwrap();
    store.record_audit(&second).await.unwrap();
    let entries = store.recent_audit(10).await.unwrap();
    assert_eq!(entries, vec![second.clone(), first]);
    assert_eq!(store.recent_audit(1).await.unwrap(), vec![second]);
}

#[tokio::test]
async fn an_audit_id_is_never_written_twice() {
    let db = test_db!();
    let store = db.store().await;
    let entry = AuditEntry::new(
        crate::support::now_ms(),
        None,
        "system",
        "edgegate",
        "migrate",
        "ok",
    );
    store.record_audit(&entry).await.unwrap();
    assert!(store.record_audit(&entry).await.is_err());
    assert_eq!(store.recent_audit(10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn sqlite_is_created_on_first_use_in_wal_mode() {
    let db = TestDb::sqlite();
    let path = db.url.trim_start_matches("sqlite://").to_owned();
    assert!(!std::path::Path::new(&path).exists());
    let store = db.store().await;
    assert!(
        std::path::Path::new(&path).exists(),
        "the database file was not created"
    );
    let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    store.close().await;
}

fn usage(hour: i64, source: &str, kid: &str, count: i64, last: i64) -> KeyUsage {
    KeyUsage {
        hour_start_ms: hour,
        source: source.into(),
        kid: kid.into(),
        alg: if source == "legacy_secret" {
            "HS256"
        } else {
            "ES256"
        }
        .into(),
        verified_count: count,
        last_verified_at_ms: last,
    }
}

#[tokio::test]
async fn key_usage_from_several_instances_is_summed_per_key() {
    let db = test_db!();
    let (a, b) = (db.store().await, db.store().await);
    const HOUR: i64 = 3_600_000;
    let h1 = 1_000 * HOUR;
    let h2 = h1 + HOUR;
    a.add_key_usage(&[
        usage(h1, "legacy_secret", "", 5, h1 + 10),
        usage(h2, "signing_key", "kid-a", 2, h2 + 50),
    ])
    .await
    .unwrap();
    b.add_key_usage(&[
        usage(h2, "signing_key", "kid-a", 3, h2 + 20),
        usage(h2, "legacy_secret", "", 1, h2 + 5),
    ])
    .await
    .unwrap();

    let all = a.key_usage_since(0).await.unwrap();
    assert_eq!(
        all,
        vec![
            usage(h1, "legacy_secret", "", 6, h2 + 5),
            usage(h2, "signing_key", "kid-a", 5, h2 + 50),
        ]
    );
    let recent = b.key_usage_since(h2).await.unwrap();
    assert_eq!(
        recent,
        vec![
            usage(h2, "legacy_secret", "", 1, h2 + 5),
            usage(h2, "signing_key", "kid-a", 5, h2 + 50),
        ]
    );
    // Counts written without their first verification (before usage_evidence): the end of
    // their earliest hour.
    assert_eq!(a.usage_evidence_since().await.unwrap(), Some(h2));
    // Each instance notes its earliest verification; the earliest of all is kept.
    b.note_usage_evidence(h1 + 3_000_000).await.unwrap();
    a.note_usage_evidence(h1 + 2_000_000).await.unwrap();
    b.note_usage_evidence(h1 + 2_500_000).await.unwrap();
    assert_eq!(
        a.usage_evidence_since().await.unwrap(),
        Some(h1 + 2_000_000)
    );
}

#[tokio::test]
async fn no_usage_means_no_evidence() {
    let db = test_db!();
    let store = db.store().await;
    assert_eq!(store.usage_evidence_since().await.unwrap(), None);
    assert!(store.key_usage_since(0).await.unwrap().is_empty());
}

/// Supabase's Data API serves the tables of `public` to anyone holding the project's publishable
/// (anon) key, and Supabase projects grant `anon` and `authenticated` every privilege on new
/// tables there by default. On PostgreSQL every table of edgegate's is closed to both: row-level
/// security on with no policy (the owner, which runs edgegate, bypasses it) and their grants
/// revoked. A table a later migration adds must do the same; this test finds it.
#[tokio::test]
async fn postgres_tables_are_closed_to_supabase_data_api_roles() {
    let db = test_db!();
    if !db.is_postgres() {
        return; // SQLite has no roles: the suite on PostgreSQL runs this test.
    }
    let url = db.config(&[]).database_url;
    let pool = sqlx::PgPool::connect(url.expose()).await.unwrap();
    // Supabase's roles (cluster-wide, so made once and kept) and its default privileges on new
    // tables, set in this test's own schema before edgegate's tables exist.
    for role in ["anon", "authenticated"] {
        create_role(&pool, role).await;
    }
    sqlx::query(
        "DO $$ BEGIN EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I \
         GRANT ALL ON TABLES TO anon, authenticated', current_schema()); END $$",
    )
    .execute(&pool)
    .await
    .unwrap();
    let store = db.store().await;
    store.ping().await.unwrap();

    let tables: Vec<(String, bool, bool, bool)> = sqlx::query_as(
        "SELECT c.relname::text, c.relrowsecurity, \
                has_table_privilege('anon', c.oid, 'SELECT,INSERT,UPDATE,DELETE'), \
                has_table_privilege('authenticated', c.oid, 'SELECT,INSERT,UPDATE,DELETE') \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(tables.len() >= 16, "edgegate's tables: {tables:?}");
    let open: Vec<_> = tables
        .iter()
        .filter(|(_, rls, anon, authenticated)| !rls || *anon || *authenticated)
        .collect();
    assert!(
        open.is_empty(),
        "tables open to the Data API (name, row-level security, anon, authenticated): {open:?}"
    );

    // A serving role that does not own the tables (granted what it needs) still reads and
    // writes every row: row-level security shuts out the Data API's roles only.
    create_role(&pool, "edgegate_serving_test").await;
    let mut conn = pool.acquire().await.unwrap();
    for sql in [
        "DO $$ BEGIN EXECUTE format('GRANT USAGE ON SCHEMA %I TO edgegate_serving_test', \
         current_schema()); EXECUTE format('GRANT ALL ON ALL TABLES IN SCHEMA %I TO \
         edgegate_serving_test', current_schema()); END $$",
        "INSERT INTO locks (name, holder, acquired_at, expires_at) VALUES ('owner', 'o', 1, 2)",
        "SET ROLE edgegate_serving_test",
        "INSERT INTO locks (name, holder, acquired_at, expires_at) VALUES ('serving', 's', 1, 2)",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await
            .unwrap_or_else(|err| panic!("{sql}: {err}"));
    }
    let seen: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM locks")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    sqlx::query("RESET ROLE").execute(&mut *conn).await.unwrap();
    assert_eq!(seen, 2, "rows the serving role sees");
    drop(conn);
    pool.close().await;
}

/// A role of the cluster (roles are not per database or schema: made once and kept).
async fn create_role(pool: &sqlx::PgPool, role: &str) {
    let made = sqlx::query(sqlx::AssertSqlSafe(format!("CREATE ROLE {role} NOLOGIN")))
        .execute(pool)
        .await;
    if let Err(err) = made {
        let code = err.as_database_error().and_then(|e| e.code());
        // 42710: it exists; 23505: another test run made it at the same moment.
        assert!(
            matches!(code.as_deref(), Some("42710" | "23505")),
            "CREATE ROLE {role}: {err}"
        );
    }
}

/// Two instances flushing the same keys, each in the order its own map happens to hold them:
/// every batch is written whole. On PostgreSQL a batch is one transaction of row locks, and two
/// taken in opposite orders deadlock (40P01: one batch refused, its counts lost at a stop).
#[tokio::test]
async fn usage_batches_written_at_once_in_opposite_orders_all_succeed() {
    let db = test_db!();
    let (a, b) = (db.store().await, db.store().await);
    const HOUR: i64 = 3_600_000;
    const ROUNDS: i64 = 5;
    let hour = 2_000 * HOUR;
    let keys: Vec<KeyUsage> = (0..50)
        .map(|i| usage(hour, "signing_key", &format!("kid-{i:02}"), 1, hour + i))
        .collect();
    let callers: Vec<CallerUsage> = (0..50)
        .map(|i| CallerUsage {
            hour_start_ms: hour,
            source: "legacy_secret".into(),
            kind: "anon_key".into(),
            route: "/functions/v1/jwt-test".into(),
            client: format!("client-{i:02}"),
            verified_count: 1,
            last_verified_at_ms: hour + i,
        })
        .collect();
    let (keys_reversed, callers_reversed): (Vec<_>, Vec<_>) = (
        keys.iter().rev().cloned().collect(),
        callers.iter().rev().cloned().collect(),
    );
    // Every row exists first, so each batch below only updates, taking one row lock per row.
    a.add_key_usage(&keys).await.unwrap();
    a.add_caller_usage(&callers).await.unwrap();
    for round in 0..ROUNDS {
        let (ka, kb, ca, cb) = tokio::join!(
            a.add_key_usage(&keys),
            b.add_key_usage(&keys_reversed),
            a.add_caller_usage(&callers),
            b.add_caller_usage(&callers_reversed),
        );
        for (written, what) in [
            (ka, "keys a"),
            (kb, "keys b"),
            (ca, "callers a"),
            (cb, "callers b"),
        ] {
            if let Err(err) = written {
                panic!("round {round}, {what}: {err:#}");
            }
        }
    }
    let summed = a.key_usage_since(hour).await.unwrap();
    assert_eq!(summed.len(), 50);
    assert!(
        summed
            .iter()
            .all(|row| row.verified_count == 1 + 2 * ROUNDS),
        "{summed:?}"
    );
    let rows = a.caller_usage_hours_since(hour).await.unwrap();
    assert_eq!(rows.len(), 50);
    assert!(
        rows.iter().all(|row| row.verified_count == 1 + 2 * ROUNDS),
        "{rows:?}"
    );
}
