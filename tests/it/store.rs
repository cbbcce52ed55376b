//! The storage conformance suite: the same tests on SQLite and on PostgreSQL.

use edgegate::store::{AuditEntry, BackendKind, CallerUsage, KeyUsage, shipped_migrations};
use sqlx::Connection as _;

use crate::support::TestDb;
use crate::{postgres_db, test_db};

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

/// Every shipped migration's checksum, pinned: a database that applied a migration refuses to
/// start a binary whose copy of it differs ("previously applied but has been modified"), so a
/// shipped file is never edited; a change goes in a new migration. A new migration is pinned
/// here once it ships: the first 16 hex digits of its SHA-384 (the failure prints it whole).
#[test]
fn shipped_migrations_are_never_edited() {
    const SQLITE: &[(i64, &str)] = &[
        (20261126000001, "fd3bb161f27fb830"),
        (20261126000002, "8f2def44368bb822"),
        (20261201000001, "32316145d9b90e6d"),
        (20261201000002, "840fc8299c6a9582"),
        (20261201000003, "4ffee931796e5cd9"),
        (20261205000001, "3f2fdf1330a54f3c"),
        (20261205000002, "3c997ff897f4ec27"),
        (20261205000003, "12b7b7332169e1e1"),
        (20261206000001, "6d7c119528410dbf"),
        (20261207000001, "185e94eef4bb881f"),
        (20261208000001, "26e6b813f4e35d72"),
        (20261209000001, "d7bdd4e0ed359b22"),
        (20261210000002, "d9facd6b8587f0ce"),
        (20261211000001, "6d2bb33054b1e10c"),
        (20261212000001, "d3dac0495c375688"),
        (20261213000001, "97830cd4e8d01678"),
        (20261213000002, "559d783d176f1d46"),
        (20261214000001, "e8d28b72a4896fc9"),
        (20261214000002, "3a77a0be292ba58d"),
        (20261215000002, "8ee87dc405555c6a"),
    ];
    const POSTGRES: &[(i64, &str)] = &[
        (20261126000001, "fe6d0e228eb08d41"),
        (20261126000002, "b6a1840ac32cb6e5"),
        (20261201000001, "0ea16d2eb230d10e"),
        (20261201000002, "840fc8299c6a9582"),
        (20261201000003, "573886d4eeb26c91"),
        (20261205000001, "f1989ac03f88365f"),
        (20261205000002, "8a9dcca85fe4f531"),
        (20261205000003, "570116d3b5142b1e"),
        (20261206000001, "c231466faece2861"),
        (20261207000001, "b7b9920454ecf204"),
        (20261208000001, "7a09ed9a875cf74d"),
        (20261209000001, "44e7b4b63901ceff"),
        (20261210000002, "7a03d00b567bcef1"),
        (20261211000001, "95a9e5515b1a1d4b"),
        (20261212000001, "e494bd29a1149793"),
        (20261213000001, "3138c9d53bbd04fe"),
        (20261213000002, "405426023760c410"),
        (20261214000001, "f5c8eed04334a626"),
        (20261214000002, "3a77a0be292ba58d"),
        (20261215000002, "b4e26cd1700e0c07"),
    ];
    let [(_, sqlite), (_, postgres)] = edgegate::store::shipped_checksums();
    for (engine, shipped, pinned) in [("sqlite", sqlite, SQLITE), ("postgres", postgres, POSTGRES)]
    {
        for (version, checksum) in &shipped {
            match pinned.iter().find(|(pinned, _)| pinned == version) {
                Some((_, pinned)) => assert!(
                    checksum.starts_with(pinned),
                    "migrations/{engine}/{version}_*.sql was edited after it shipped"
                ),
                None => panic!("migrations/{engine}/{version}_*.sql: pin its checksum {checksum}"),
            }
        }
        for (version, _) in pinned {
            assert!(
                shipped.iter().any(|(shipped, _)| shipped == version),
                "migrations/{engine}/{version}_*.sql was removed after it shipped"
            );
        }
    }
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

/// `serve --no-migrate` on a database whose migrations it could not read yet (it did not answer
/// at start) is not ready until a reading says none is missing: it counted as ready, and the
/// routes that need the database answered 500 on the tables it lacked, until its first reading.
#[tokio::test]
async fn a_store_whose_migrations_are_unread_is_not_ready_until_read() {
    let db = test_db!();
    let store = edgegate::Store::connect(&db.config(&[]).database_url)
        .await
        .unwrap();
    store.migrations_unread();
    assert!(!store.is_ready());
    assert_eq!(store.migrations_missing(), None);
    let shipped = shipped_migrations()[0].1.len();
    assert_eq!(store.check_migrations().await.unwrap(), shipped);
    assert!(!store.is_ready(), "ready with every migration missing");
    store.migrate().await.unwrap();
    assert!(store.is_ready());
    store.migrations_unread();
    assert_eq!(store.check_migrations().await.unwrap(), 0);
    assert!(store.is_ready());
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
    assert_eq!(store.dropped_usage().await.unwrap(), None);
}

/// Verifications two instances dropped add up, the latest drop is kept whatever the order they
/// are recorded in, and the evidence still starts at its first counted verification.
#[tokio::test]
async fn dropped_verifications_from_several_instances_add_up() {
    let db = test_db!();
    let (a, b) = (db.store().await, db.store().await);
    a.note_usage_evidence(1_000).await.unwrap();
    a.note_dropped_usage(3, 9_000).await.unwrap();
    b.note_dropped_usage(2, 7_000).await.unwrap();
    assert_eq!(b.dropped_usage().await.unwrap(), Some((5, 9_000)));
    assert_eq!(b.usage_evidence_since().await.unwrap(), Some(1_000));
}

/// The pruner's cutoff is a lower bound of the evidence that no flush moves back: another
/// instance's flush after the pass's start notes its own earlier first count (it is the earliest
/// it knows of), while the pass goes on to delete the hours before the cutoff, that count's
/// among them. Also when no instance of this build had noted any count before the pass.
#[tokio::test]
async fn no_flush_moves_the_evidence_below_a_pruning_cutoff() {
    const HOUR: i64 = 3_600_000;
    let db = test_db!();
    let (pruner, flusher) = (db.store().await, db.store().await);
    pruner.note_usage_evidence(1_000).await.unwrap();
    pruner.raise_usage_evidence(50 * HOUR).await.unwrap();
    assert_eq!(
        pruner.usage_evidence_since().await.unwrap(),
        Some(50 * HOUR)
    );
    flusher.note_usage_evidence(49 * HOUR).await.unwrap();
    assert_eq!(
        pruner.usage_evidence_since().await.unwrap(),
        Some(50 * HOUR),
        "a flush moved the evidence back"
    );
    // A later pass with an earlier cutoff (a clock set right) moves nothing back either.
    pruner.raise_usage_evidence(10 * HOUR).await.unwrap();
    assert_eq!(
        pruner.usage_evidence_since().await.unwrap(),
        Some(50 * HOUR)
    );
    // Later counts start the evidence where they start.
    flusher.note_usage_evidence(60 * HOUR).await.unwrap();
    assert_eq!(
        pruner.usage_evidence_since().await.unwrap(),
        Some(50 * HOUR)
    );

    // No count noted before the pass: still none after it, and the cutoff holds once one is.
    let db = test_db!();
    let (pruner, flusher) = (db.store().await, db.store().await);
    pruner.raise_usage_evidence(50 * HOUR).await.unwrap();
    assert_eq!(pruner.usage_evidence_since().await.unwrap(), None);
    flusher.note_usage_evidence(49 * HOUR).await.unwrap();
    assert_eq!(
        pruner.usage_evidence_since().await.unwrap(),
        Some(50 * HOUR)
    );

    // Counts of builds before usage_evidence: read from their oldest hour as before, and the
    // cutoff holds against a flush noting an earlier count.
    let db = test_db!();
    let (pruner, flusher) = (db.store().await, db.store().await);
    let hour = 52 * HOUR;
    pruner
        .add_key_usage(&[usage(hour, "signing_key", "kid-a", 1, hour + 5)])
        .await
        .unwrap();
    pruner.raise_usage_evidence(50 * HOUR).await.unwrap();
    assert_eq!(
        pruner.usage_evidence_since().await.unwrap(),
        Some(53 * HOUR)
    );
    flusher.note_usage_evidence(49 * HOUR).await.unwrap();
    assert_eq!(
        pruner.usage_evidence_since().await.unwrap(),
        Some(50 * HOUR)
    );
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

    // That role starts `serve` (which migrates) on a database the release command migrated:
    // with nothing to apply it creates nothing, so it needs no CREATE on the schema (sqlx's
    // `CREATE TABLE IF NOT EXISTS _sqlx_migrations` was refused: "permission denied for schema").
    let as_serving = db.url.replace(
        "options=-c%20search_path",
        "options=-c%20role%3Dedgegate_serving_test%20-c%20search_path",
    );
    assert_ne!(as_serving, db.url, "the role is not in the URL");
    let config =
        edgegate::Config::from_lookup(|name| (name == "DATABASE_URL").then(|| as_serving.clone()))
            .unwrap();
    let serving = edgegate::Store::connect(&config.database_url)
        .await
        .unwrap();
    serving
        .migrate()
        .await
        .expect("the serving role migrating an up-to-date database");
    serving.close().await;
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
/// taken in opposite orders deadlock (40P01: one batch refused, its counts lost at a stop). A
/// flush writes its keys and callers in one transaction ([`edgegate::Store::add_usage`]): two of
/// them, given their rows in opposite orders, lock both tables' rows in one order too.
#[tokio::test]
async fn usage_batches_written_at_once_in_opposite_orders_all_succeed() {
    let db = test_db!();
    let (a, b) = (db.store().await, db.store().await);
    const HOUR: i64 = 3_600_000;
    const ROUNDS: i64 = 5;
    let hour = 2_000 * HOUR;
    // More rows than one statement writes (250), so each batch is several statements, one
    // transaction holding the rows of the first while the next are written.
    let keys: Vec<KeyUsage> = (0..600)
        .map(|i| usage(hour, "signing_key", &format!("kid-{i:03}"), 1, hour + i))
        .collect();
    let callers: Vec<CallerUsage> = (0..600)
        .map(|i| CallerUsage {
            hour_start_ms: hour,
            source: "legacy_secret".into(),
            kind: "anon_key".into(),
            route: "/functions/v1/jwt-test".into(),
            client: format!("client-{i:03}"),
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
        let (ua, ub) = tokio::join!(
            a.add_usage(&keys, &callers),
            b.add_usage(&keys_reversed, &callers_reversed),
        );
        for (written, what) in [(ua, "keys and callers a"), (ub, "keys and callers b")] {
            if let Err(err) = written {
                panic!("round {round}, {what}: {err:#}");
            }
        }
    }
    let summed = a.key_usage_since(hour).await.unwrap();
    assert_eq!(summed.len(), 600);
    assert!(
        summed
            .iter()
            .all(|row| row.verified_count == 1 + 4 * ROUNDS),
        "{summed:?}"
    );
    let rows = a.caller_usage_hours_since(hour).await.unwrap();
    assert_eq!(rows.len(), 600);
    assert!(
        rows.iter().all(|row| row.verified_count == 1 + 4 * ROUNDS),
        "{rows:?}"
    );
}

/// Every instance's flush writes the current hour's rows (the key row, the callers of a client
/// that calls every instance), and holds each until its commit, its statements later: another
/// instance's flush queues behind it. Here a session stands in for a flush that holds those
/// rows for 4 s (many thousands of rows through a slow pooler): the queued flush waits and
/// writes them once they are free, where the pooled sessions' 3 s `lock_timeout` failed it
/// (55P03, retried 5 s later, or, the last flush of a stopping instance, lost).
#[tokio::test]
async fn a_usage_flush_waits_for_another_instances_flush_past_the_pooled_lock_wait() {
    let db = postgres_db!();
    let (a, b) = (db.store().await, db.store().await);
    let hour = 2_000 * 3_600_000;
    let key = usage(hour, "legacy_secret", "", 1, hour + 1);
    let caller = CallerUsage {
        hour_start_ms: hour,
        source: "legacy_secret".into(),
        kind: "anon_key".into(),
        route: "/functions/v1/jwt-test".into(),
        client: "supabase-js/2.47.0".into(),
        verified_count: 1,
        last_verified_at_ms: hour + 1,
    };
    for store in [&a, &b] {
        // b too, so that its pool is connected and its flush below starts at once.
        store
            .add_usage(std::slice::from_ref(&key), std::slice::from_ref(&caller))
            .await
            .unwrap();
    }

    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    for sql in [
        "UPDATE caller_usage_hourly SET verified_count = verified_count + 1 WHERE hour_start = $1",
        "UPDATE key_usage_hourly SET verified_count = verified_count + 1 WHERE hour_start = $1",
    ] {
        let done = sqlx::query(sql)
            .bind(hour)
            .execute(&mut holder)
            .await
            .unwrap();
        assert_eq!(done.rows_affected(), 1, "{sql}");
    }
    let flush = {
        let (b, key, caller) = (b.clone(), key.clone(), caller.clone());
        tokio::spawn(async move { b.add_usage(&[key], &[caller]).await })
    };
    // Until the flush waits on the held rows (bounded: 500 × 10 ms).
    let mut waiting = false;
    for _ in 0..500 {
        let blocked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))",
        )
        .fetch_one(&mut holder)
        .await
        .unwrap();
        if blocked > 0 || flush.is_finished() {
            waiting = blocked > 0;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(waiting, "the flush never waited on the held rows");
    // Past the pooled sessions' 3 s lock wait: the old bound failed the flush meanwhile.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    flush
        .await
        .unwrap()
        .expect("a flush queued behind another one writes once the rows are free");

    let keys = a.key_usage_since(hour).await.unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(keys[0].verified_count, 4, "{keys:?}");
    let callers = a.caller_usage_hours_since(hour).await.unwrap();
    assert_eq!(callers.len(), 1, "{callers:?}");
    assert_eq!(callers[0].verified_count, 4, "{callers:?}");
}

/// What the hourly tables should hold after adding `rows` (keyed by their hour and key columns)
/// one at a time: the counts summed, the latest verification kept.
fn summed_model<K: Ord>(
    rows: impl IntoIterator<Item = (K, i64, i64)>,
) -> std::collections::BTreeMap<K, (i64, i64)> {
    let mut model = std::collections::BTreeMap::new();
    for (key, count, last) in rows {
        let entry = model.entry(key).or_insert((0, i64::MIN));
        entry.0 += count;
        entry.1 = entry.1.max(last);
    }
    model
}

fn caller(hour: i64, i: i64, count: i64, last: i64) -> CallerUsage {
    CallerUsage {
        hour_start_ms: hour,
        source: if i % 2 == 0 {
            "legacy_secret"
        } else {
            "api_key"
        }
        .into(),
        kind: if i % 3 == 0 { "anon_key" } else { "secret:ops" }.into(),
        route: format!("/functions/v1/f-{}", i % 7),
        // Quotes, a comma and a parenthesis, and characters beyond ASCII: bound, never spliced.
        client: format!("client-{i:04} 'it''s', (β) ✓"),
        verified_count: count,
        last_verified_at_ms: last,
    }
}

/// A flush of thousands of rows (more than one statement's worth, however the rows are
/// grouped), in no particular order, onto a database that already holds some of them, with
/// rows of the same hour and key given more than once in one batch (the store is given rows,
/// not a map): every row ends as adding the batch's rows one by one would leave it, the counts
/// summed and the latest verification kept (an earlier one in the batch leaves a later stored
/// one), on both tables, through `add_usage` and through each table's own write.
#[tokio::test]
async fn a_usage_flush_of_thousands_of_rows_adds_each_to_what_is_stored() {
    let db = test_db!();
    let store = db.store().await;
    const HOUR: i64 = 3_600_000;
    let hours = [3_000 * HOUR, 3_001 * HOUR];
    let key = |hour: i64, i: i64, count: i64, last: i64| {
        let source = ["signing_key", "api_key", "legacy_secret"][(i % 3) as usize];
        usage(hour, source, &format!("kid-{i:04} 'q', (x)"), count, last)
    };
    // Already stored: every third row of the first hour, their last verification at the middle
    // of the hour, and one row of another hour the batch does not touch.
    let stored_keys: Vec<KeyUsage> = (0..1_300)
        .step_by(3)
        .map(|i| key(hours[0], i, 7, hours[0] + 1_800_000))
        .chain([key(5 * HOUR, 1, 4, 5 * HOUR + 9)])
        .collect();
    let stored_callers: Vec<CallerUsage> = (0..1_100)
        .step_by(3)
        .map(|i| caller(hours[0], i, 7, hours[0] + 1_800_000))
        .chain([caller(5 * HOUR, 1, 4, 5 * HOUR + 9)])
        .collect();
    store
        .add_usage(&stored_keys, &stored_callers)
        .await
        .unwrap();

    // The batch: both hours, last verifications before and after the stored ones, in an order
    // of their own (not the keys'), and every 50th row given again with its own count and time.
    let mut keys: Vec<KeyUsage> = Vec::new();
    let mut callers: Vec<CallerUsage> = Vec::new();
    for hour in hours {
        for i in (0..1_300).rev() {
            keys.push(key(hour, i, 1 + i % 5, hour + (i * 2_741) % HOUR));
        }
        for i in (0..1_100).rev() {
            callers.push(caller(hour, i, 1 + i % 4, hour + (i * 1_933) % HOUR));
        }
        for i in (0..1_300).step_by(50) {
            keys.push(key(hour, i, 100, hour + 1_800_000 + i));
            keys.push(key(hour, i, 1_000, hour + 10));
        }
        for i in (0..1_100).step_by(50) {
            callers.push(caller(hour, i, 100, hour + 1_800_000 + i));
        }
    }
    store.add_usage(&keys, &callers).await.unwrap();
    // Each table's own write, with a duplicate too.
    let more_keys = [
        key(hours[1], 7, 2, hours[1] + 5),
        key(hours[1], 7, 3, hours[1] + HOUR - 1),
    ];
    let more_callers = [
        caller(hours[1], 8, 2, hours[1] + HOUR - 1),
        caller(hours[1], 8, 3, hours[1] + 5),
    ];
    store.add_key_usage(&more_keys).await.unwrap();
    store.add_caller_usage(&more_callers).await.unwrap();

    let key_model = summed_model(
        stored_keys
            .iter()
            .chain(&keys)
            .chain(&more_keys)
            .map(|row| {
                let id = (
                    row.hour_start_ms,
                    row.source.clone(),
                    row.kid.clone(),
                    row.alg.clone(),
                );
                (id, row.verified_count, row.last_verified_at_ms)
            }),
    );
    let stored = store.key_usage_hours_since(0).await.unwrap();
    let mut stored: Vec<_> = stored
        .into_iter()
        .map(|row| {
            let id = (row.hour_start_ms, row.source, row.kid, row.alg);
            (id, (row.verified_count, row.last_verified_at_ms))
        })
        .collect();
    // The database's collation need not order text as Rust does.
    stored.sort();
    assert_eq!(stored.len(), 2 * 1_300 + 1);
    let expected: Vec<_> = key_model.into_iter().collect();
    for (got, want) in stored.iter().zip(&expected) {
        assert_eq!(got, want);
    }
    assert_eq!(stored, expected);

    let caller_model = summed_model(
        stored_callers
            .iter()
            .chain(&callers)
            .chain(&more_callers)
            .map(|row| {
                let id = (
                    row.hour_start_ms,
                    row.source.clone(),
                    row.kind.clone(),
                    row.route.clone(),
                    row.client.clone(),
                );
                (id, row.verified_count, row.last_verified_at_ms)
            }),
    );
    let stored = store.caller_usage_hours_since(0).await.unwrap();
    let mut stored: Vec<_> = stored
        .into_iter()
        .map(|row| {
            let id = (
                row.hour_start_ms,
                row.source,
                row.kind,
                row.route,
                row.client,
            );
            (id, (row.verified_count, row.last_verified_at_ms))
        })
        .collect();
    // The database's collation need not order text as Rust does.
    stored.sort();
    assert_eq!(stored.len(), 2 * 1_100 + 1);
    let expected: Vec<_> = caller_model.into_iter().collect();
    for (got, want) in stored.iter().zip(&expected) {
        assert_eq!(got, want);
    }
    assert_eq!(stored, expected);
}

/// A flush is one transaction whatever its size: a row PostgreSQL refuses (a NUL in a text, which
/// its `TEXT` cannot hold) among the last callers of a batch of thousands fails the flush, and
/// neither the callers before it nor any key is written.
#[tokio::test]
async fn a_usage_flush_refused_at_its_last_row_writes_nothing() {
    let db = postgres_db!();
    let store = db.store().await;
    let hour = 3_000 * 3_600_000;
    let keys: Vec<KeyUsage> = (0..1_500)
        .map(|i| usage(hour, "signing_key", &format!("kid-{i:04}"), 1, hour + i))
        .collect();
    let mut callers: Vec<CallerUsage> = (0..1_500).map(|i| caller(hour, i, 1, hour + i)).collect();
    callers.push(CallerUsage {
        // Sorts after every other row: written last.
        source: "legacy_secret".into(),
        kind: "secret:ops".into(),
        route: "/zz".into(),
        client: "zz\0".into(),
        ..caller(hour, 1, 1, hour)
    });
    let err = store.add_usage(&keys, &callers).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("recording key and caller usage"),
        "{err:#}"
    );
    assert_eq!(store.key_usage_hours_since(0).await.unwrap(), vec![]);
    assert_eq!(store.caller_usage_hours_since(0).await.unwrap(), vec![]);
}

/// Runs `body` on a PostgreSQL database of its own (a test that holds a lock every migration
/// takes must not hold up the migrations of the tests beside it), dropping the database after,
/// panicking or not. Skipped on SQLite.
async fn on_own_postgres_database<F, Fut>(body: F)
where
    F: FnOnce(String, edgegate::config::DatabaseUrl) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use futures_util::FutureExt as _;
    let Some(db) = TestDb::postgres_database().await else {
        return; // PostgreSQL only: the suite on PostgreSQL runs this test.
    };
    let url = db.config(&[]).database_url;
    let outcome = std::panic::AssertUnwindSafe(body(db.url.clone(), url))
        .catch_unwind()
        .await;
    db.drop_database().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// A migration that cannot take its table's lock (a pg_dump running, a transaction left idle
/// after reading the table) must fail after the lock timeout, saying so, instead of queueing for
/// ever: while it queues for ACCESS EXCLUSIVE, every later statement on that table from the
/// instances still serving queues behind it. What it says of the run is exact: the failing
/// migration changed nothing, and those this run applied before it stay (it said that nothing
/// was changed).
#[tokio::test]
async fn a_postgres_migration_behind_a_held_table_lock_fails_promptly_naming_the_lock() {
    on_own_postgres_database(|raw, url| async move {
        use sqlx::Connection as _;
        // Migrated up to just before 20261206000001 (ALTER TABLE sms_messages), which this run
        // applies; 20261207000001's ALTER TABLE usage_evidence waits behind the holder.
        let mut holder = sqlx::PgConnection::connect(&raw).await.unwrap();
        sqlx::migrate!("./migrations/postgres")
            .run_to(20261205000003, &mut holder)
            .await
            .unwrap();
        sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
        sqlx::query("LOCK TABLE usage_evidence IN ACCESS SHARE MODE")
            .execute(&mut holder)
            .await
            .unwrap();

        let store = edgegate::Store::connect(&url).await.unwrap();
        let started = std::time::Instant::now();
        let migrated = tokio::time::timeout(std::time::Duration::from_secs(30), store.migrate())
            .await
            .expect("migrate still waiting for the table lock after 30 s");
        let waited = started.elapsed();
        let err = migrated.expect_err("migrated past a table lock held elsewhere");
        let message = format!("{err:#}");
        assert!(
            message.contains("waited 10 s for a table's lock"),
            "{message}"
        );
        assert!(message.contains("lock timeout"), "{message}");
        assert!(
            message.contains(
                "migration 20261207000001 changed nothing; the 1 migration this run applied \
                 before it (20261206000001) stays applied"
            ),
            "{message}"
        );
        assert!(!message.contains("nothing was changed"), "{message}");
        assert!(waited < std::time::Duration::from_secs(20), "{waited:?}");
        let applied = store.applied_migrations().await.unwrap();
        assert_eq!(applied.last(), Some(&20261206000001), "{applied:?}");

        // The holder gone, the same migration goes through.
        sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
        store.migrate().await.unwrap();
        let applied = store.applied_migrations().await.unwrap();
        let [_, (_, shipped)] = edgegate::store::shipped_checksums();
        let shipped: Vec<i64> = shipped.into_iter().map(|(version, _)| version).collect();
        assert_eq!(applied, shipped);
        store.close().await;
    })
    .await;
}

/// The lock timeout is for tables only: an instance waits, however long, for another
/// instance's migrations (sqlx's advisory lock) rather than failing its start-up.
#[tokio::test]
async fn a_postgres_migration_waits_past_the_lock_timeout_for_another_instances_migrations() {
    on_own_postgres_database(|raw, url| async move {
        use sqlx::Connection as _;
        use sqlx::migrate::Migrate as _;
        let mut other = sqlx::PgConnection::connect(&raw).await.unwrap();
        other.lock().await.unwrap();

        let store = edgegate::Store::connect(&url).await.unwrap();
        let mut migrating = tokio::spawn(async move {
            let migrated = store.migrate().await;
            (store, migrated)
        });
        // Past the 10 s lock timeout, with slack.
        let early = tokio::time::timeout(std::time::Duration::from_secs(12), &mut migrating).await;
        assert!(
            early.is_err(),
            "migrate did not wait for the other instance: {early:?}"
        );
        other.unlock().await.unwrap();
        let (store, migrated) = tokio::time::timeout(std::time::Duration::from_secs(30), migrating)
            .await
            .expect("migrate still waiting after the other instance let go")
            .unwrap();
        migrated.unwrap();
        let shipped: Vec<i64> = shipped_migrations()[1].1.iter().map(|(v, _)| *v).collect();
        assert_eq!(store.applied_migrations().await.unwrap(), shipped);
        store.close().await;
    })
    .await;
}

/// A job's lock is kept by a live holder for as long as it runs, however far past its lease (a
/// heartbeat renews the SQLite row, and keeps the PostgreSQL lock's session from sitting idle
/// for a lease), and a holder gone without releasing it, as a killed process is, blocks the job
/// only until the lease runs out.
#[tokio::test]
async fn a_job_lock_outlives_its_lease_while_held_and_frees_a_lease_after_its_holder_is_gone() {
    use std::time::{Duration, Instant};

    use edgegate::clock::Clock;
    use edgegate::store::Job;

    let db = test_db!();
    let (first, second) = (db.store().await, db.store().await);
    let clock = Clock::system();
    let lease = Duration::from_secs(1);
    let try_lock = async |store: &edgegate::store::Store, holder: &str| {
        store
            .try_lock_job(Job::CatalogueSync, holder, &clock, lease)
            .await
            .unwrap()
    };
    let held = try_lock(&first, "first").await.expect("the lock was free");
    // Three leases: unrenewed, the row would have expired twice over.
    let kept_until = Instant::now() + lease * 3;
    while Instant::now() < kept_until {
        let taken = try_lock(&second, "second").await;
        assert!(taken.is_err(), "a live holder's lock was taken");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Dropped unreleased, as by a killed process: its heartbeat stops with it.
    drop(held);
    let deadline = Instant::now() + lease + Duration::from_secs(10);
    let taken = loop {
        if let Ok(taken) = try_lock(&second, "second").await {
            break taken;
        }
        assert!(
            Instant::now() < deadline,
            "the lock of a holder gone was never freed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    taken.release().await.unwrap();
    assert!(
        try_lock(&first, "first").await.is_ok(),
        "a released lock was not free"
    );
}

/// A holder that goes silent with a job's lock and stays so (its process stopped with SIGSTOP,
/// its Machine frozen or cut off from the database: here the one thread of its runtime blocked,
/// its connections left open as a stopped process's are) blocks the job only until its lease
/// runs out, on PostgreSQL as on SQLite, and once it wakes, its run's next renewal says that the
/// lock was lost, so the run stops instead of going on beside the new holder's.
#[tokio::test]
async fn a_job_lock_whose_holder_goes_silent_is_freed_within_its_lease_and_the_holder_learns_it() {
    use std::time::{Duration, Instant};

    use edgegate::clock::Clock;
    use edgegate::store::Job;

    let db = test_db!();
    let second = db.store().await;
    let lease = Duration::from_secs(2);
    let url = db.config(&[]).database_url;
    let (held, is_held) = tokio::sync::oneshot::channel();
    let (wake, woken) = std::sync::mpsc::channel::<()>();
    let silent = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let clock = Clock::system();
            let store = edgegate::Store::connect(&url).await.unwrap();
            let mut lock = store
                .try_lock_job(Job::CatalogueSync, "silent", &clock, lease)
                .await
                .unwrap()
                .expect("the lock was free");
            held.send(()).unwrap();
            // Nothing on this runtime (the lock's heartbeat included) runs until woken.
            let _ = woken.recv();
            lock.renew(clock.now_ms()).await
        })
    });
    is_held.await.unwrap();

    let clock = Clock::system();
    let deadline = Instant::now() + lease + Duration::from_secs(5);
    let taken = loop {
        let attempt = second
            .try_lock_job(Job::CatalogueSync, "second", &clock, lease)
            .await
            .unwrap();
        if let Ok(taken) = attempt {
            break taken;
        }
        assert!(
            Instant::now() < deadline,
            "a silent holder's lock was not freed within its lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    wake.send(()).unwrap();
    let renewed = tokio::task::spawn_blocking(move || silent.join().unwrap())
        .await
        .unwrap();
    let lost = renewed.expect_err("a holder whose lock was taken renewed it");
    assert!(
        lost.downcast_ref::<edgegate::store::LockLost>().is_some(),
        "{lost:#}"
    );
    taken.release().await.unwrap();
}

/// The PostgreSQL migrations edited after they shipped, with the SHA-384 of the copy first
/// shipped: what a database migrated by a build between the two copies holds.
const POSTGRES_EARLIER_COPIES: [(i64, &str); 2] = [
    (
        20261205000003,
        "bb3e69e4a6e17054071d3e077618391809beda9d5c0a118b321f2a8b\
         a06b1ee5f17032a2e572cbd954c522d8b8d4f888",
    ),
    (
        20261206000001,
        "6d7c119528410dbf990ea4298a8fe861a7634ee3cd38cb9f4376bf66\
         beb16b76f4a290d8210f6247fe1516602e9d9551",
    ),
];

/// The stored checksum of each applied version, hex, oldest first.
async fn stored_checksums(pool: &sqlx::PgPool) -> Vec<(i64, String)> {
    sqlx::query_as("SELECT version, encode(checksum, 'hex') FROM _sqlx_migrations ORDER BY version")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// A database migrated by a build from ff2bbff to before bea5447, or from 3099c3f to before
/// 1a9a557, holds the checksum of the copy of 20261205000003 or 20261206000001 those builds
/// shipped, and the first left row-level security on with no policy. Such a database migrates,
/// its tables getting the policy that lets a serving role which does not own them see their rows
/// (sqlx refused it: "migration 20261205000003 was previously applied but has been modified",
/// and every deploy's release command failed), and its stored checksums stay the earlier
/// copies', so those builds still start on it (rolling back to them works): written over, they
/// refused it, and a run stopped after writing them (a signal, a lock not let go) left the
/// release still serving refusing the database at its next start.
#[tokio::test]
async fn a_postgres_database_migrated_with_earlier_copies_of_edited_migrations_migrates() {
    let db = test_db!();
    if !db.is_postgres() {
        return; // SQLite's copies were never edited: the suite on PostgreSQL runs this test.
    }
    let store = db.store().await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let shipped = stored_checksums(&pool).await;
    for (version, earlier) in POSTGRES_EARLIER_COPIES {
        sqlx::query("UPDATE _sqlx_migrations SET checksum = decode($1, 'hex') WHERE version = $2")
            .bind(earlier)
            .bind(version)
            .execute(&pool)
            .await
            .unwrap();
    }
    // As the earlier 20261205000003 left the tables, before any later migration ran.
    sqlx::query(
        "DO $$ DECLARE t text; BEGIN \
         FOR t IN SELECT tablename FROM pg_policies WHERE schemaname = current_schema() \
         AND policyname = 'edgegate_not_data_api' LOOP \
         EXECUTE format('DROP POLICY edgegate_not_data_api ON %I', t); END LOOP; END $$",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version > 20261207000001")
        .execute(&pool)
        .await
        .unwrap();
    // Nor the columns and tables of the migrations those builds lacked (20261208000001 only
    // adds the policies dropped above): a later migration's are dropped here too.
    for sql in [
        "ALTER TABLE stripe_prices DROP COLUMN billing_scheme, DROP COLUMN unit_amount_decimal, \
         DROP COLUMN tiers_mode, DROP COLUMN tiers, DROP COLUMN transform_quantity, \
         DROP COLUMN custom_unit_amount, DROP COLUMN currency_options, DROP COLUMN tax_behavior",
        "ALTER TABLE stripe_products DROP COLUMN images, DROP COLUMN marketing_features, \
         DROP COLUMN unit_label, DROP COLUMN url",
        "ALTER TABLE stripe_prices DROP COLUMN recurring_usage_type, \
         DROP COLUMN recurring_meter, DROP COLUMN recurring_trial_period_days",
        "ALTER TABLE reconcile_runs DROP COLUMN covered_until",
        "ALTER TABLE stripe_products DROP COLUMN written_rev, DROP COLUMN written_synced_at",
        "ALTER TABLE stripe_prices DROP COLUMN written_rev, DROP COLUMN written_synced_at",
        "ALTER TABLE usage_evidence DROP COLUMN complete_since",
        "DROP TABLE usage_writers",
        // 20261214000001's indexes (reconcile_runs_coverage went with covered_until).
        "DROP INDEX IF EXISTS reconcile_runs_running, sync_runs_running, reconcile_runs_coverage",
        "ALTER TABLE sms_messages DROP COLUMN attempt",
        "ALTER TABLE usage_evidence DROP COLUMN last_noted_at, DROP COLUMN last_noted_by",
    ] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    let earlier = stored_checksums(&pool).await;
    let kept = |after: Vec<(i64, String)>| {
        after
            .into_iter()
            .filter(|(version, _)| earlier.iter().any(|(v, _)| v == version))
            .collect::<Vec<_>>()
    };

    // A run that fails (here the policies' migration, on a table the release still serving
    // holds) leaves them too: that release, a build of the earlier copy, restarts on the
    // database as it did.
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("LOCK TABLE stripe_events IN ACCESS SHARE MODE")
        .execute(&mut holder)
        .await
        .unwrap();
    let err = store
        .migrate()
        .await
        .expect_err("migrated past a held table");
    assert!(
        format!("{err:#}").contains("20261208000001 changed nothing"),
        "{err:#}"
    );
    assert_eq!(stored_checksums(&pool).await, earlier, "after a failed run");
    holder.close().await.unwrap();

    store
        .migrate()
        .await
        .expect("migrating a database of those builds");
    let after = stored_checksums(&pool).await;
    assert_eq!(
        kept(after.clone()),
        earlier,
        "the earlier copies' checksums are kept"
    );
    let mut expected = earlier.clone();
    expected.extend(shipped.iter().filter(|(v, _)| *v > 20261207000001).cloned());
    assert_eq!(
        after, expected,
        "the later migrations applied with this binary's checksums"
    );
    let closed: Vec<(String, bool)> = sqlx::query_as(
        "SELECT c.relname::text, EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid \
         AND p.polname = 'edgegate_not_data_api') \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(closed.len() >= 16, "edgegate's tables: {closed:?}");
    let without: Vec<_> = closed.iter().filter(|(_, policy)| !policy).collect();
    assert!(without.is_empty(), "tables without the policy: {without:?}");
    // Again: a no-op.
    store.migrate().await.unwrap();
    assert_eq!(stored_checksums(&pool).await, after);
    pool.close().await;
    store.close().await;
}

/// Only a known earlier copy's checksum is taken over: any other difference is still refused.
#[tokio::test]
async fn a_postgres_migration_applied_from_an_unknown_copy_is_still_refused() {
    let db = test_db!();
    if !db.is_postgres() {
        return; // PostgreSQL only, as the checksums taken over are.
    }
    let store = db.store().await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    sqlx::query("UPDATE _sqlx_migrations SET checksum = decode('00', 'hex') WHERE version = $1")
        .bind(20261206000001_i64)
        .execute(&pool)
        .await
        .unwrap();
    let err = store.migrate().await.expect_err("migrated an unknown copy");
    let message = format!("{err:#}");
    assert!(
        message.contains("20261206000001 was previously applied but has been modified"),
        "{message}"
    );
    pool.close().await;
    store.close().await;
}

/// A measurement, not a check (run by hand, see BENCHMARKS.md, "The usage flush"): how long
/// `add_usage` takes to write 2,000 key rows and 2,000 caller rows, first inserting them, then
/// five times adding to them (what a busy instance's flush does each minute).
#[tokio::test]
#[ignore = "a measurement: cargo test --test it measure_usage_flush -- --ignored --nocapture"]
async fn measure_usage_flush_of_2000_keys_and_2000_callers() {
    let db = test_db!();
    let store = db.store().await;
    let hour = 4_000 * 3_600_000;
    let keys: Vec<KeyUsage> = (0..2_000)
        .map(|i| usage(hour, "api_key", &format!("secret:key-{i:04}"), 1, hour + i))
        .collect();
    let callers: Vec<CallerUsage> = (0..2_000).map(|i| caller(hour, i, 1, hour + i)).collect();
    let mut updates = Vec::new();
    for round in 0..6 {
        let started = std::time::Instant::now();
        store.add_usage(&keys, &callers).await.unwrap();
        let took = started.elapsed();
        eprintln!(
            "{} round {round} ({}): {:.1} ms",
            if db.is_postgres() {
                "postgres"
            } else {
                "sqlite"
            },
            if round == 0 { "insert" } else { "update" },
            took.as_secs_f64() * 1e3
        );
        if round > 0 {
            updates.push(took);
        }
    }
    updates.sort();
    eprintln!(
        "update rounds: median {:.1} ms (min {:.1}, max {:.1})",
        updates[updates.len() / 2].as_secs_f64() * 1e3,
        updates[0].as_secs_f64() * 1e3,
        updates[updates.len() - 1].as_secs_f64() * 1e3
    );
    let stored = store.key_usage_hours_since(hour).await.unwrap();
    assert_eq!(stored.len(), 2_000);
    assert!(stored.iter().all(|row| row.verified_count == 6));
}

/// Connections to PostgreSQL are made with Nagle's algorithm off (`TCP_NODELAY`), as libpq's
/// are: with it on, a statement's message larger than one write (a multi-row upsert, a
/// catalogue page's rows) sent its tail only once the server acknowledged the rest, which it
/// delays by 40 ms (sqlx 0.9.0 stopped setting it, transact-rs/sqlx#4335; 0.9.1 sets it again).
/// Read from the socket itself: a connection made as the store's pool makes them (sqlx's own
/// connect) asks the server which port it has, and this process's socket of that port is taken
/// (a duplicate, through a pidfd of this process) and asked. Only sockets are duplicated:
/// closing a duplicate of a file's descriptor would release every POSIX lock this process holds
/// on it (other tests' SQLite locks).
#[tokio::test]
async fn connections_to_postgres_are_made_with_nagle_off() {
    use rustix::fs::{FileType, fstat};
    use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};

    let db = postgres_db!();
    let mut connection = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let port: i32 = sqlx::query_scalar("SELECT inet_client_port()")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    let this = pidfd_open(getpid(), PidfdFlags::empty()).unwrap();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        let entry = entry.unwrap();
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:["));
        if !is_socket {
            continue;
        }
        let Ok(duplicate) = pidfd_getfd(&this, fd, PidfdGetfdFlags::empty()) else {
            continue;
        };
        // Closed and its number taken by a file since it was read: kept open, never closed.
        if !fstat(&duplicate).is_ok_and(|stat| FileType::from_raw_mode(stat.st_mode).is_socket()) {
            std::mem::forget(duplicate);
            continue;
        }
        let stream = std::net::TcpStream::from(duplicate);
        if stream
            .local_addr()
            .is_ok_and(|local| i32::from(local.port()) == port)
        {
            found.push(stream.nodelay().unwrap());
        }
    }
    assert_eq!(
        found,
        [true],
        "the connection's socket (port {port}): TCP_NODELAY as found"
    );
    connection.close().await.unwrap();
}
