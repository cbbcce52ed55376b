//! The production backend: PostgreSQL (Supabase's own, or Fly Postgres).

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool};

/// The embedded migrations. A database that has a newer migration than this binary knows is
/// accepted, so rolling back to an older release works while migrations stay additive.
pub(super) fn migrator() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!("./migrations/postgres");
    migrator.set_ignore_missing(true);
    migrator
}

/// How long a migration's statement waits for a table's lock before failing (`lock_timeout`).
/// Unbounded, an ALTER TABLE behind a session that holds even a read of the table (a pg_dump, a
/// transaction left idle) queues for ever, and every later statement on that table from the
/// instances still serving queues behind it. Longer than a plain index build on a busy table
/// takes to be let in; short enough that the requests queued behind it are still waiting.
pub(super) const MIGRATION_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// Applies the pending migrations on one connection of its own (returning the versions applied
/// before, read under the migration lock), closed after, so the lock
/// timeout set on it never follows it back into the pool.
pub(super) async fn migrate(pool: &PgPool) -> anyhow::Result<Vec<i64>> {
    let mut conn = pool
        .acquire()
        .await
        .context("connecting to migrate")?
        .detach();
    let migrated = migrate_on(&mut conn).await;
    // Ending the session also lets go of the migration lock if a step failed while holding it.
    let _ = sqlx::Connection::close(conn).await;
    migrated
}

async fn migrate_on(conn: &mut PgConnection) -> anyhow::Result<Vec<i64>> {
    use sqlx::migrate::Migrate as _;
    // sqlx's own migration lock (an advisory lock, the one every release takes), waited for as
    // long as another instance's migrations take: PostgreSQL applies lock_timeout to advisory
    // locks too, so it is taken before the timeout is set, and with none (a role's own
    // lock_timeout would otherwise fail a start-up behind a long index build).
    // Nor is any statement of a migration cut short by the pool's `statement_timeout`: an
    // index build on a large table may take minutes.
    sqlx::raw_sql("SET lock_timeout = 0; SET statement_timeout = 0")
        .execute(&mut *conn)
        .await?;
    take_migration_lock(conn).await?;
    let (stored, dirty) = stored_checksums(conn).await?;
    let before: Vec<i64> = stored.iter().map(|(version, _)| *version).collect();
    let mut migrator = migrator_accepting_earlier_copies(&stored);
    // The migrator applies and compares the up migrations only.
    let ups = || {
        migrator
            .iter()
            .filter(|m| !m.migration_type.is_down_migration())
    };
    if !dirty && ups().all(|m| before.contains(&m.version)) {
        // Nothing to apply: checked here, as the migrator would, without its `CREATE TABLE IF
        // NOT EXISTS _sqlx_migrations`, which PostgreSQL refuses a serving role that may not
        // create in the schema even when the table is there ("permission denied for schema").
        // A dirty row goes to the migrator, which refuses it.
        if let Some(changed) = ups().find(|m| {
            stored
                .iter()
                .any(|(version, checksum)| *version == m.version && **checksum != *m.checksum)
        }) {
            anyhow::bail!(
                "migration {} was previously applied but has been modified",
                changed.version
            );
        }
        conn.unlock().await?;
        return Ok(before);
    }
    let timeout = format!("SET lock_timeout = '{}s'", MIGRATION_LOCK_TIMEOUT.as_secs());
    sqlx::query(sqlx::AssertSqlSafe(timeout))
        .execute(&mut *conn)
        .await?;
    // Held already: the migrator taking it again would wait under the timeout (it is
    // re-entrant today, but that is sqlx's detail).
    migrator.set_locking(false);
    // `run_direct` is what `run` does once it has a connection; `run` itself, given a
    // connection rather than a pool, makes the server's spawned start-up fail to compile
    // (`Acquire` is not general enough: the case sqlx added `run_direct` for).
    let migrated = migrator.run_direct(None, &mut *conn, false).await;
    if let Err(err) = migrated {
        let timed_out = match &err {
            sqlx::migrate::MigrateError::ExecuteMigration(sqlx::Error::Database(db), version)
                if db.code().as_deref() == Some("55P03") =>
            {
                Some(*version)
            }
            _ => None,
        };
        let err = anyhow::Error::from(err);
        let Some(failed) = timed_out else {
            return Err(err);
        };
        // Each migration is its own transaction: the failing one was rolled back, those this
        // run applied before it were committed.
        let now: Option<Vec<i64>> = sqlx::query_scalar(super::APPLIED_SQL)
            .fetch_all(&mut *conn)
            .await
            .ok();
        let applied_by_run = now.map(|mut now| {
            now.sort_unstable();
            now.retain(|version| !before.contains(version));
            now
        });
        return Err(err.context(lock_timeout_said(failed, applied_by_run)));
    }
    conn.unlock().await?;
    Ok(before)
}

/// Fails where the role may use no schema on its search path: PostgreSQL leaves a schema the role
/// has no USAGE on off the path, so its tables read as not there (42P01), as in a database never
/// migrated, where the reason is the grant left out.
pub(super) async fn schema_usable(pool: &PgPool) -> anyhow::Result<()> {
    let (schema, path): (Option<String>, String) =
        sqlx::query_as("SELECT current_schema(), current_setting('search_path')")
            .fetch_one(pool)
            .await?;
    if schema.is_none() {
        anyhow::bail!(
            "this role may use no schema on its search_path ({path}): is it granted USAGE on \
             the schema?"
        );
    }
    Ok(())
}

/// What a run whose migration `failed` on the lock timeout says, given the migrations it had
/// applied before it (`None` when they could not be read).
fn lock_timeout_said(failed: i64, applied_by_run: Option<Vec<i64>>) -> String {
    let run = match applied_by_run.as_deref() {
        Some([]) => ", nor did this run before it".to_owned(),
        Some(applied) => format!(
            "; the {} this run applied before it ({}) {} applied, which the release still \
             running copes with (migrations are additive)",
            match applied.len() {
                1 => "1 migration".to_owned(),
                n => format!("{n} migrations"),
            },
            applied
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            if applied.len() == 1 { "stays" } else { "stay" }
        ),
        None => "; any this run applied before it stay applied, which the release still \
                 running copes with (migrations are additive)"
            .to_owned(),
    };
    format!(
        "a migration waited {} s for a table's lock, which another session holds (a pg_dump, a \
         transaction left open: see pg_locks): migration {failed} changed nothing{run}; migrate \
         again once it is let go",
        MIGRATION_LOCK_TIMEOUT.as_secs()
    )
}

/// A shipped migration whose file was edited after releases had applied it: the SHA-384 (hex)
/// of the copy first shipped, and why it changed.
pub(super) struct EarlierCopy {
    pub version: i64,
    pub checksum: &'static str,
    pub why: &'static str,
}

/// Every edited migration's earlier copy. sqlx refuses a database whose stored checksum is not
/// the binary's ("was previously applied but has been modified"), so a database migrated by a
/// build of the earlier copy is migrated with that copy's checksum for it
/// ([`migrator_accepting_earlier_copies`]); what the earlier copy left undone a later migration
/// does. Nothing is rewritten: the builds of the earlier copy still start on the database.
/// Never added to: a shipped migration is not edited (tests/it/store.rs pins each checksum).
const EARLIER_COPIES: &[EarlierCopy] = &[
    EarlierCopy {
        version: 20261205000003,
        checksum: "bb3e69e4a6e17054071d3e077618391809beda9d5c0a118b321f2a8b\
                   a06b1ee5f17032a2e572cbd954c522d8b8d4f888",
        why: "ff2bbff shipped it with row-level security and no policy; bea5447 added the \
              policy edgegate_not_data_api (20261208000001 creates it where the earlier copy \
              ran) and the lock timeout",
    },
    EarlierCopy {
        version: 20261206000001,
        checksum: "6d7c119528410dbf990ea4298a8fe861a7634ee3cd38cb9f4376bf66\
                   beb16b76f4a290d8210f6247fe1516602e9d9551",
        why: "3099c3f shipped it; 1a9a557 changed only its comments",
    },
];

/// The applied migrations and their stored checksums (none in a database never migrated), and
/// whether a row says a migration failed half-way (`success = false`, "dirty"), which the
/// migrator refuses whatever its version.
async fn stored_checksums(conn: &mut PgConnection) -> anyhow::Result<(Vec<(i64, Vec<u8>)>, bool)> {
    let read: Result<Vec<(i64, Vec<u8>, bool)>, _> =
        sqlx::query_as("SELECT version, checksum, success FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&mut *conn)
            .await;
    match read {
        Ok(rows) => {
            let dirty = rows.iter().any(|(_, _, success)| !success);
            let applied = rows
                .into_iter()
                .filter(|(_, _, success)| *success)
                .map(|(version, checksum, _)| (version, checksum))
                .collect();
            Ok((applied, dirty))
        }
        Err(err) if super::is_undefined_table(&err) => Ok((Vec::new(), false)),
        Err(err) => Err(err).context("reading applied migrations"),
    }
}

/// The [`EarlierCopy`] of migration `version` whose checksum `stored` is, if it is one.
pub(super) fn earlier_copy(version: i64, stored: &[u8]) -> Option<&'static EarlierCopy> {
    let hex: String = stored.iter().map(|b| format!("{b:02x}")).collect();
    EARLIER_COPIES
        .iter()
        .find(|copy| copy.version == version && copy.checksum == hex)
}

/// This binary's migrator, taking each migration applied from an [`EarlierCopy`] with that
/// copy's checksum, as stored: sqlx then finds no difference, and the stored checksum stays, so
/// the builds of that copy still start on the database (rolling back to them works). Logged
/// at each run that meets one; any other stored checksum is left for the migrator to refuse.
fn migrator_accepting_earlier_copies(stored: &[(i64, Vec<u8>)]) -> sqlx::migrate::Migrator {
    let mut migrator = migrator();
    let mut migrations = migrator.migrations.to_vec();
    for migration in &mut migrations {
        let Some((_, checksum)) = stored
            .iter()
            .find(|(version, _)| *version == migration.version)
        else {
            continue;
        };
        let Some(copy) = earlier_copy(migration.version, checksum) else {
            continue;
        };
        tracing::info!(
            version = copy.version,
            "migration {} was applied from an earlier copy of its file ({}); taken as this \
             binary's",
            copy.version,
            copy.why
        );
        migration.checksum = std::borrow::Cow::Owned(checksum.clone());
    }
    migrator.migrations = std::borrow::Cow::Owned(migrations);
    migrator
}

/// The readiness probe: whether this pool's sessions can write. A server that answers may still
/// take no writes (every INSERT failing with 25006): a hot standby, or sessions read-only by
/// `default_transaction_read_only` (Supabase's answer to a full disk). Read from the session
/// rather than tried with a write, which would need a table of its own: `Some(why)` then.
pub(super) async fn probe_write(pool: &PgPool) -> anyhow::Result<Option<&'static str>> {
    let mut conn = probe_connection(pool).await?;
    let (in_recovery, read_only): (bool, String) =
        sqlx::query_as("SELECT pg_is_in_recovery(), current_setting('transaction_read_only')")
            .fetch_one(&mut *conn)
            .await?;
    Ok(if in_recovery {
        Some("the database is read-only: a hot standby, in recovery (a failover under way?)")
    } else if read_only == "on" {
        Some(
            "the database is read-only: its sessions' transactions are read-only \
             (default_transaction_read_only, which Supabase sets when the disk is full)",
        )
    } else {
        None
    })
}

/// The readiness probe's row written and deleted in one transaction that commits
/// (`Store::space_refused`): whether the disk has space again after a write was refused for want
/// of it.
pub(super) async fn probe_space(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    super::write_space_check_row::<sqlx::Postgres>(&mut tx).await?;
    tx.commit().await
}

/// How long the probe waits for a pooled connection before it connects once itself to learn why
/// there is none: shorter than the readiness timeout, which the pool's own wait outlasts.
const PROBE_DIAGNOSE_AFTER: Duration = Duration::from_millis(500);

/// A pooled connection for the probe. The pool retries a refused connection (and a server
/// starting up or out of connection slots) until its acquire timeout, past the probe's, and then
/// says only that it timed out; so when none comes soon, one connection of the probe's own,
/// closed at once, says what the server answers, as start-up does (`first_connection`). If that
/// one connects, the server takes connections and the pool's wait goes on.
async fn probe_connection(
    pool: &PgPool,
) -> anyhow::Result<sqlx::pool::PoolConnection<sqlx::Postgres>> {
    use sqlx::Connection as _;
    let acquire = pool.acquire();
    tokio::pin!(acquire);
    if let Ok(conn) = tokio::time::timeout(PROBE_DIAGNOSE_AFTER, &mut acquire).await {
        return Ok(conn?);
    }
    let options = pool.connect_options();
    let refused = async {
        match PgConnection::connect_with(&options).await {
            Ok(connection) => {
                let _ = connection.close().await;
                std::future::pending().await
            }
            Err(err) => err,
        }
    };
    tokio::select! {
        conn = &mut acquire => Ok(conn?),
        err = refused => Err(anyhow::anyhow!(
            "connecting to PostgreSQL at {}: {}",
            server(&options),
            describe(&err)
        )),
    }
}

/// Takes sqlx's migration lock, however long another process holds it, saying so while it
/// waits (see [`super::wait_for_migration_lock`]).
async fn take_migration_lock(conn: &mut PgConnection) -> anyhow::Result<()> {
    use sqlx::migrate::Migrate as _;
    super::wait_for_migration_lock(async { Ok(conn.lock().await?) }, super::LockWait::Migration)
        .await?;
    Ok(())
}

/// The longest a query waits for a connection, connecting included.
pub(super) const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a pooled session's statement waits for a lock another session holds
/// (`lock_timeout`): a table locked by a migration, a `pg_dump` or a transaction left open.
/// Past it the server cancels the statement (55P03, "not now" to `is_unavailable`: 503
/// `NOT_READY`, nothing written) and the connection goes back to the pool. Unbounded, every
/// request on that table queued behind the lock until the 30 s request timeout answered 504,
/// and the dropped request does not cancel its statement: each stayed queued, holding its
/// connection, until the pool was spent and every route needing the database answered 503.
pub(super) const LOCK_TIMEOUT: Duration = Duration::from_secs(3);

/// How long any one statement of a pooled session may run (`statement_timeout`): past it the
/// server cancels it (57014, a 503 as above). Under the 30 s request timeout, so a request is
/// answered by the database's refusal rather than a 504 whose statement runs on; far above
/// what any of edgegate's statements takes.
pub(super) const STATEMENT_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a usage flush's transaction ([`super::Store::add_usage`]) waits for a row another
/// instance's flush holds, and how long any one of its statements may run, lock wait included
/// (`SET LOCAL`, in that transaction alone). Every instance writes the same current hour's rows,
/// and a flush holds each until its commit: when that was one round trip a row later, hundreds
/// of rows through a pooler 40 ms away were seconds, past the pooled sessions' [`LOCK_TIMEOUT`],
/// and a flush that failed on it was retried 5 s later, or, the last one of a stopping instance,
/// lost. A few hundred rows now go in one statement, but a flush of many thousands, a slow
/// pooler or a busy server can still take longer than that. A flush
/// answers no request, and a stop bounds its last one by the shutdown's deadline.
pub(super) const USAGE_FLUSH_LOCK_TIMEOUT: Duration = Duration::from_secs(60);

/// The `SET LOCAL` statements that give a usage flush's transaction its bounds.
pub(super) fn usage_flush_bounds() -> String {
    format!(
        "SET LOCAL lock_timeout = '{ms}ms'; SET LOCAL statement_timeout = '{ms}ms'",
        ms = USAGE_FLUSH_LOCK_TIMEOUT.as_millis()
    )
}

/// The bounds set on every pooled session as it connects. Sessions that must wait longer set
/// their own: the migration (its lock wait unbounded, its statements under
/// `MIGRATION_LOCK_TIMEOUT`), the SMS reservation and the usage flush (`SET LOCAL`, in their
/// transactions).
fn session_bounds() -> String {
    format!(
        "SET lock_timeout = '{}ms'; SET statement_timeout = '{}ms'",
        LOCK_TIMEOUT.as_millis(),
        STATEMENT_TIMEOUT.as_millis()
    )
}

pub(super) async fn connect(url: &str) -> anyhow::Result<PgPool> {
    let (pool, unreachable) = connect_or_wait(url).await?;
    match unreachable {
        Some(cause) => Err(cause),
        None => Ok(pool),
    }
}

/// As [`connect`], but a server that does not answer yet (not listening, no answer in time,
/// starting up, out of connections) is no error: the pool is returned with that cause beside
/// it, and connects once the server answers. A definitive refusal (authentication, unknown
/// database or role, TLS) is still an error.
pub(super) async fn connect_or_wait(url: &str) -> anyhow::Result<(PgPool, Option<anyhow::Error>)> {
    let options =
        PgConnectOptions::from_str(url).context("DATABASE_URL is not a usable Postgres URL")?;
    // The first connection is made here, not by the pool: the pool retries a refused connection
    // until its timeout and then reports only that it timed out, which names neither the server
    // nor the cause.
    let unreachable = match first_connection(&options).await {
        Ok(()) => None,
        Err(failure) if failure.unreachable => Some(failure.error),
        Err(failure) => return Err(failure.error),
    };
    // Fly's proxy and Supabase's pooler drop long-lived and idle connections; recycle ours first.
    // Through an outage: every idle connection is pinged before use (a dead one is dropped and
    // a new one opened), and acquiring gives up after a few seconds, so a request answers 5xx
    // promptly while the database is away and the same pool serves again once it is back.
    let pool = PgPoolOptions::new()
        .max_connections(10)
        .min_connections(0)
        .max_lifetime(Duration::from_secs(600))
        .idle_timeout(Duration::from_secs(300))
        .test_before_acquire(true)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::raw_sql(sqlx::AssertSqlSafe(session_bounds()))
                    .execute(conn)
                    .await?;
                Ok(())
            })
        })
        .after_release(|conn, _| Box::pin(ready_on_release(conn)))
        .connect_lazy_with(options);
    Ok((pool, unreachable))
}

/// How long a connection coming back to the pool may wait for what its last user left in flight
/// before it is closed instead: [`STATEMENT_TIMEOUT`], past which the server cancels a pooled
/// session's statement itself, plus 2 s for that cancellation's answer to come back (a round
/// trip through a pooler tens of milliseconds away, on a loaded server) and for a rollback sqlx
/// queued behind it (a transaction dropped with its statement). The statement's clock started
/// when the server received it, before its caller gave up, so a server that still answers has
/// answered by then.
const RELEASE_FLUSH_TIMEOUT: Duration = STATEMENT_TIMEOUT.saturating_add(Duration::from_secs(2));

/// Whether a connection coming back to the pool is ready for its next user within
/// [`RELEASE_FLUSH_TIMEOUT`]. sqlx pings every connection it takes back, with no time limit,
/// before the slot is free again: that ping first waits for whatever the connection's last user
/// left in flight (a query whose caller was dropped at its timeout), and from a server that
/// stopped answering with the connection left open (a host lost, or failed over to another
/// address, without a reset) nothing comes, so the slot was held until the kernel gave up on
/// the link (about 15 minutes). This waits for that dropped work alone, bounded: with nothing
/// in flight (every request that ran to its end) it does no I/O at all, so sqlx's ping stays
/// the only round trip of a release; a slow server that answers in time keeps its connection
/// (closing it would leave the server running the dropped statement, holding its locks and a
/// connection slot, while the pool opens another); one that does not answer in time is closed
/// and its slot freed, and the next acquire opens a new connection. A dropped statement that
/// ended in an error the server sent (its own timeout or lock timeout, a cancel) has ended: the
/// wait reads on to the server's `ReadyForQuery` and keeps the connection; an error of the link
/// (an end of file, as after a FATAL one) closes it. The usage flush's statements may run 60 s
/// (`SET LOCAL`), longer than this bound; only the stop's deadline drops one, and the process
/// then ends.
///
/// `Connection::flush` is doc-hidden in sqlx (for `PgConnection` it is `wait_until_ready`:
/// sends what is buffered, then reads until every `ReadyForQuery` owed has come); the version
/// is pinned exactly in Cargo.toml (an upgrade that removes it fails to compile here; one
/// that changes what it does fails the tests in tests/it/outage.rs from
/// `a_postgres_host_gone_silent_mid_query_does_not_hold_the_pool` on).
async fn ready_on_release(conn: &mut sqlx::PgConnection) -> sqlx::Result<bool> {
    use sqlx::Connection as _;
    let ready = async {
        loop {
            // Each error the server sent is one message read; the `ReadyForQuery` owed is still
            // counted, so the next call reads on to it.
            match conn.flush().await {
                Err(sqlx::Error::Database(_)) => continue,
                done => break done,
            }
        }
    };
    match tokio::time::timeout(RELEASE_FLUSH_TIMEOUT, ready).await {
        Ok(ready) => ready.map(|()| true),
        Err(_) => {
            tracing::warn!(
                "a database connection given back to the pool did not finish its dropped query \
                 within {} s (the server stopped answering mid-query?); closing it",
                RELEASE_FLUSH_TIMEOUT.as_secs()
            );
            Ok(false)
        }
    }
}

/// Why the first connection failed, and whether only because the server did not answer (yet).
struct FirstFailure {
    error: anyhow::Error,
    unreachable: bool,
}

/// Connects once and closes, retrying as the pool would (a refused connection, or a server
/// still starting or out of connections) for `ACQUIRE_TIMEOUT` at most. The error names the
/// server by host and port and gives the last cause: never the password; the server's own
/// message may name the user (`role "app" does not exist`), which is no secret and says what
/// to fix.
async fn first_connection(options: &PgConnectOptions) -> Result<(), FirstFailure> {
    use sqlx::Connection as _;
    let deadline = tokio::time::Instant::now() + ACQUIRE_TIMEOUT;
    let mut pause = Duration::from_millis(10);
    let mut last_transient = None;
    let (cause, unreachable) = loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(remaining, PgConnection::connect_with(options)).await {
            Ok(Ok(connection)) => {
                let _ = connection.close().await;
                return Ok(());
            }
            Ok(Err(err))
                if is_transient(&err) && tokio::time::Instant::now() + pause < deadline =>
            {
                last_transient = Some(err);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(ACQUIRE_TIMEOUT / 5);
            }
            Ok(Err(err)) => break (describe(&err), is_unreachable(&err)),
            Err(_) => {
                let cause = last_transient.as_ref().map_or_else(
                    || format!("no answer within {} s", ACQUIRE_TIMEOUT.as_secs()),
                    describe,
                );
                break (cause, true);
            }
        }
    };
    Err(FirstFailure {
        error: anyhow::anyhow!(
            "connecting to PostgreSQL at {} (DATABASE_URL): {cause}",
            server(options)
        ),
        unreachable,
    })
}

/// What the pool retries: the server not listening yet, starting up (57P03) or out of
/// connections (53300).
fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(io) => io.kind() == std::io::ErrorKind::ConnectionRefused,
        sqlx::Error::Database(db) => matches!(db.code().as_deref(), Some("57P03" | "53300")),
        _ => false,
    }
}

/// Whether a failed connection only says that the server cannot be reached now, so that `serve`
/// starts without it: any network error (refused, reset or closed mid-handshake by a proxy in
/// front of a stopped database, a host unreachable, a name that does not resolve while the
/// database's machines are stopped), as `store::is_unavailable` counts them, or the server's own connection-exception, shutdown,
/// starting-up or too-many-connections answers. What remains says the server refused us
/// (authentication, an unknown database or role, TLS) and stops start-up.
fn is_unreachable(err: &sqlx::Error) -> bool {
    match err {
        // A connection a proxy closes mid-handshake shows as a protocol error.
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| unreachable_code(&code, db.message())),
        _ => false,
    }
}

/// A session refused with one of these SQLSTATEs is a server that cannot take us now: class 08
/// (connection exception), 57P (shutting down, starting up), 53 (insufficient resources: too
/// many connections, no memory, a full disk), class 58 (an I/O error on its own files), and
/// XX000 with `message` "could not write init file" (a server whose disk is full refuses every
/// new session so). Not another XX000: Supabase's pooler (Supavisor) answers a wrong password or
/// an unknown project ("Tenant or user not found") with it, which must stop start-up. Nor 28xxx
/// (authentication) or 3D000.
fn unreachable_code(code: &str, message: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("57P")
        || code.starts_with("53")
        || code.starts_with("58")
        || (code == "XX000" && message.starts_with("could not write init file"))
}

/// A connection failure in a few words: the system's for a network error (`connection
/// refused`, not `Connection refused (os error 111)`), the server's own message for one it
/// sent (sqlx appends the line of PostgreSQL's source the message came from).
fn describe(err: &sqlx::Error) -> String {
    match err {
        sqlx::Error::Io(io) if io.raw_os_error().is_some() => io.kind().to_string(),
        sqlx::Error::Io(io) => io.to_string(),
        sqlx::Error::Database(db) => db.message().to_owned(),
        other => other.to_string(),
    }
}

/// `host:port`, or the Unix socket's directory, as the driver connects to it.
fn server(options: &PgConnectOptions) -> String {
    if let Some(socket) = options.get_socket() {
        return socket.display().to_string();
    }
    let host = options.get_host();
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{}", options.get_port())
    } else {
        format!("{host}:{}", options.get_port())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Error, ErrorKind};

    /// A server refusing sessions because its disk is full (`could not write init file`,
    /// XX000) or out of resources is waited for at start, as it is answered 503 later; a refused
    /// password, role or database stops start-up. A full disk stopped it.
    #[test]
    fn a_server_out_of_resources_is_waited_for_at_start() {
        for code in ["08006", "57P03", "53300", "53100", "53200", "58030"] {
            assert!(unreachable_code(code, "any"), "{code}");
        }
        assert!(unreachable_code("XX000", "could not write init file"));
        for code in ["28P01", "28000", "3D000", "42501", "0A000"] {
            assert!(!unreachable_code(code, "any"), "{code}");
        }
        // Supabase's pooler (Supavisor) refuses a wrong password or project with XX000 too:
        // a definitive refusal, which must stop start-up rather than be waited for.
        for message in ["Tenant or user not found", "Wrong password"] {
            assert!(!unreachable_code("XX000", message), "{message}");
        }
    }

    #[test]
    fn network_errors_are_unreachable_and_tls_is_a_refusal() {
        for kind in [
            ErrorKind::ConnectionRefused,
            ErrorKind::ConnectionReset,
            ErrorKind::UnexpectedEof,
            ErrorKind::HostUnreachable,
        ] {
            assert!(is_unreachable(&sqlx::Error::Io(kind.into())), "{kind:?}");
        }
        let dns = Error::other("failed to lookup address information: Name or service not known");
        assert!(is_unreachable(&sqlx::Error::Io(dns)));
        let closed = "expected to read 5 bytes, got 0 bytes at EOF";
        assert!(is_unreachable(&sqlx::Error::Protocol(closed.into())));
        assert!(!is_unreachable(&sqlx::Error::Tls(
            "certificate not trusted".into()
        )));
        assert!(!is_unreachable(&sqlx::Error::Configuration(
            "sslmode".into()
        )));
    }

    #[test]
    fn a_lock_timeout_says_what_the_run_applied_before_it() {
        let said = |applied| lock_timeout_said(20261207000001, applied);
        assert!(said(Some(vec![])).contains(
            "migration 20261207000001 changed nothing, nor did this run before it; migrate again"
        ));
        assert!(said(Some(vec![20261205000003, 20261206000001])).contains(
            "changed nothing; the 2 migrations this run applied before it (20261205000003, \
             20261206000001) stay applied"
        ));
        assert!(said(None).contains("changed nothing; any this run applied before it stay"));
    }
}
