//! Runs of the catalogue sync and the reconciliation (`sync_runs`, `reconcile_runs`), and the
//! lock that lets one of each run at a time across every instance.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::clock::Clock;
use crate::store::{Backend, Store};
use crate::stripe::reconcile::STAMPED_AHEAD_MS;

/// Counts of one sync run, as stored in `sync_runs`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncCounts {
    pub products_seen: i64,
    pub products_upserted: i64,
    pub products_deactivated: i64,
    pub prices_seen: i64,
    pub prices_upserted: i64,
    pub prices_deactivated: i64,
}

/// Counts of one reconciliation, as answered and stored in `reconcile_runs`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct ReconcileCounts {
    /// Events Stripe listed.
    pub seen: i64,
    /// New to the ledger, and their effect written.
    pub applied: i64,
    /// Already in the ledger (delivered by webhook or an earlier run): nothing done.
    pub already_applied: i64,
    /// New to the ledger but of a type edgegate does not act on: recorded, nothing else. Also
    /// a listed event that could not be applied for a reason of its own (its object unreadable,
    /// or refused by Stripe or the database): logged as `listed event skipped`, not recorded, and
    /// listed again by a later run.
    pub ignored: i64,
}

/// One row of `sync_runs`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncRun {
    pub id: String,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub outcome: String,
    pub counts: SyncCounts,
    pub error: Option<String>,
}

/// A job that runs one at a time across every instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Job {
    CatalogueSync,
    Reconcile,
}

impl Job {
    /// PostgreSQL: the advisory lock class (one no other lock uses); the key is the schema, since
    /// advisory locks are per database while the synced tables are per schema.
    fn advisory_class(self) -> i32 {
        match self {
            Self::CatalogueSync => 1_701_079_920,
            Self::Reconcile => 1_701_079_921,
        }
    }

    /// The table of its runs.
    fn runs_table(self) -> &'static str {
        match self {
            Self::CatalogueSync => "sync_runs",
            Self::Reconcile => "reconcile_runs",
        }
    }

    /// Its runs' name in logs.
    fn run_name(self) -> &'static str {
        match self {
            Self::CatalogueSync => "catalogue sync",
            Self::Reconcile => "reconciliation",
        }
    }

    /// SQLite: the `locks` row name.
    fn lock_name(self) -> &'static str {
        match self {
            Self::CatalogueSync => "stripe_sync",
            Self::Reconcile => "stripe_reconcile",
        }
    }
}

/// What is known of the holder of a job's lock that could not be taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockHeld {
    /// PostgreSQL: a session holds the advisory lock (a killed process's went with its
    /// session), until its run ends, or, its instance gone silent (frozen, cut off), for at most
    /// its lease after its last heartbeat.
    Session,
    /// SQLite: the holder's `locks` row, as of this attempt.
    Lease {
        /// Since the holder took the lock.
        held: Duration,
        /// Since the holder last renewed it (its lease starts again at each renewal).
        renewed: Duration,
        /// Until the lease can be taken, unless renewed before.
        expires_in: Duration,
        /// How often a live holder renews it.
        beat: Duration,
    },
    /// SQLite: the holder let go between this attempt and the look at its row.
    Released,
}

/// What a refused caller waits on a PostgreSQL lock, whose end cannot be foreseen: as long as
/// a SQLite holder's renewal beat.
const SESSION_RETRY_AFTER: Duration = Duration::from_secs(10);

impl LockHeld {
    /// A SQLite holder whose row has not been renewed for two beats has stopped (its process
    /// killed, or stopped mid-run) rather than fallen behind: a live one renews every beat.
    pub fn stopped(&self) -> bool {
        matches!(self, Self::Lease { renewed, beat, .. } if *renewed > *beat * 2)
    }

    /// When to try again: on SQLite, once the lease can be taken (the holder may renew it
    /// before then); on PostgreSQL, a beat.
    pub fn retry_after(&self) -> Duration {
        let wait = match self {
            Self::Session => SESSION_RETRY_AFTER,
            Self::Lease { expires_in, .. } => *expires_in,
            Self::Released => Duration::ZERO,
        };
        // Whole seconds, rounded up, at least one.
        Duration::from_secs(
            u64::try_from(wait.as_millis().div_ceil(1000).max(1)).unwrap_or(u64::MAX),
        )
    }

    /// Why a `run` ("catalogue sync", "reconciliation") cannot start now, for its caller.
    pub fn describe(&self, run: &str) -> String {
        let secs = |d: &Duration| d.as_secs();
        let retry = self.retry_after().as_secs();
        match self {
            Self::Session => format!(
                "another {run} is running (on this or another instance), holding its lock until \
                 it ends (or, should its instance have gone silent, for at most a minute more); \
                 try again after Retry-After seconds"
            ),
            Self::Released => {
                format!("another {run} has just ended and let its lock go; try again")
            }
            Self::Lease { renewed, beat, .. } if self.stopped() => format!(
                "the lock is still held by a {run} that stopped without releasing it (its \
                 process killed, or stopped mid-run), or whose renewals the database has kept \
                 waiting: not renewed for {} s (a live run renews it every {} s), it expires in \
                 {retry} s; try again then",
                secs(renewed),
                secs(beat).max(1),
            ),
            Self::Lease { held, renewed, .. } => format!(
                "another {run} is running: it took the lock {} s ago and renewed it {} s ago; \
                 should its process have stopped without releasing it, the lock expires in \
                 {retry} s; try again after Retry-After seconds",
                secs(held),
                secs(renewed),
            ),
        }
    }
}

const JOB_LOCK_TRY: &str = "SELECT pg_try_advisory_lock($1, hashtext(current_schema()))";
const JOB_LOCK_RELEASE: &str = "SELECT pg_advisory_unlock($1, hashtext(current_schema()))";

/// The one-job-at-a-time lock (catalogue sync or reconciliation); `release` it when done.
/// Dropped without release, a PostgreSQL lock goes with its connection (closed, not returned to
/// the pool) and a SQLite one expires once its heartbeat stops renewing it (within its `ttl`).
/// A holder gone silent (its process stopped, its machine frozen or cut off) stops beating: the
/// server ends a PostgreSQL lock's session once it has been idle for `ttl` (its transaction's
/// `idle_in_transaction_session_timeout`), and a SQLite row expires within `ttl`.
pub struct SyncLock {
    job: Job,
    inner: LockInner,
}

enum LockInner {
    /// The session holding the advisory lock, and the heartbeat that keeps it from going idle.
    Postgres {
        session: LockSession,
        heartbeat: Heartbeat,
    },
    Sqlite {
        pool: sqlx::SqlitePool,
        holder: String,
        ttl: Duration,
        heartbeat: Heartbeat,
    },
}

/// The task that renews a SQLite lock row, or keeps a PostgreSQL lock's session from going idle,
/// while its holder lives; stopped when the lock is released or dropped, so a lock whose holder
/// is gone (killed, or its run's task aborted at a stop) is freed within the lease.
struct Heartbeat(tokio::task::AbortHandle);

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Heartbeat {
    /// Beats on a PostgreSQL lock's session every sixth of `ttl` until dropped or the session is
    /// lost (logged; the run's own `renew` then says so and the run stops).
    fn postgres(session: LockSession, job: Job, ttl: Duration) -> Self {
        let beats = async move {
            let mut every = tokio::time::interval((ttl / 6).max(Duration::from_millis(1)));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                every.tick().await;
                if let Err(err) = beat(&session).await {
                    tracing::warn!(
                        error = crate::error::causes(&err),
                        ?job,
                        "lock session lost; the run stops at its next renewal"
                    );
                    break;
                }
            }
        };
        Self(tokio::spawn(beats).abort_handle())
    }

    /// Renews `holder`'s row every sixth of `ttl` until dropped or the row is no longer its own.
    /// A renewal refused by the database is logged and tried at the next beat; only a lock not
    /// renewed for a whole `ttl` can be taken, and the run's own `renew` then says so.
    fn start(
        pool: sqlx::SqlitePool,
        job: Job,
        holder: String,
        clock: Clock,
        ttl: Duration,
    ) -> Self {
        let beat = async move {
            let mut every = tokio::time::interval(heartbeat_every(ttl));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                every.tick().await;
                let renewed = sqlx::query(SQLITE_LOCK_RENEW)
                    .bind(job.lock_name())
                    .bind(holder.as_str())
                    .bind(clock.now_ms().saturating_add(ttl_ms(ttl)))
                    .execute(&pool)
                    .await;
                match renewed {
                    Ok(done) if done.rows_affected() == 1 => {}
                    Ok(_) => break,
                    Err(err) => tracing::warn!(
                        error = crate::error::causes(&anyhow::Error::new(err)),
                        ?job,
                        "lock heartbeat not written; tried again at the next beat"
                    ),
                }
            }
        };
        Self(tokio::spawn(beat).abort_handle())
    }
}

/// How often a SQLite lock's holder renews it: six beats to a lease.
fn heartbeat_every(ttl: Duration) -> Duration {
    (ttl / 6).max(Duration::from_millis(1))
}

const SQLITE_LOCK_RENEW: &str = "UPDATE locks SET expires_at = $3 WHERE name = $1 AND holder = $2";

/// The session that holds a PostgreSQL job lock, taken out of the pool for the lock's lifetime:
/// the advisory lock is taken inside a transaction left open, whose
/// `idle_in_transaction_session_timeout` (`ttl`) has the server end the session, and the lock
/// with it, once its holder has sent nothing for that long. A session lock alone outlived a
/// stopped or frozen holder for as long as its TCP connection (hours: `tcp_keepalives_idle` is
/// 2 h by default, and a stopped process's kernel answers keepalives). Shared by the heartbeat
/// and the run's `renew`; `Lost` once a beat failed, its connection then closed.
type LockSession = Arc<tokio::sync::Mutex<SessionState>>;

enum SessionState {
    Held {
        conn: sqlx::PgConnection,
        ttl: Duration,
    },
    Lost(String),
}

/// Before the lock, on its session: a transaction, left open while the lock is held, and its
/// idle timeout (`SET LOCAL`, so nothing outlives the transaction, even behind a pooler).
/// Read committed, whatever the role's default, so the open transaction holds no snapshot
/// between statements and keeps no row from vacuum.
const JOB_LOCK_BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";
const JOB_LOCK_IDLE_TIMEOUT: &str =
    "SELECT set_config('idle_in_transaction_session_timeout', $1, true)";

/// How long the server lets a lock session sit idle in its transaction before ending it, in
/// PostgreSQL's milliseconds (0 would mean never): `ttl`.
fn idle_timeout_ms(ttl: Duration) -> String {
    ttl.as_millis().clamp(1, i32::MAX as u128).to_string()
}

/// One beat on a PostgreSQL lock's session: a statement in its open transaction, which starts
/// the server's idle clock again. One that fails, or gets no answer within half the `ttl`
/// (the server may end a session silent for a `ttl`, a beat after the last answered one), leaves
/// the lock lost: its connection is closed, as the server's end of it may be already, and every
/// later beat and `renew` says so.
async fn beat(session: &LockSession) -> anyhow::Result<()> {
    let mut state = session.lock().await;
    let (conn, wait) = match &mut *state {
        SessionState::Held { conn, ttl } => (conn, *ttl / 2),
        SessionState::Lost(cause) => {
            return Err(anyhow::anyhow!("{cause}").context(LockLost::Session));
        }
    };
    let answered = tokio::time::timeout(wait, sqlx::query("SELECT 1").execute(conn))
        .await
        .map_err(|_| anyhow::anyhow!("the lock session did not answer within {wait:?}"))
        .and_then(|done| done.map(|_| ()).map_err(anyhow::Error::new));
    if let Err(err) = answered {
        let cause = crate::error::causes(&err);
        *state = SessionState::Lost(cause);
        return Err(err.context(LockLost::Session));
    }
    Ok(())
}

impl LockInner {
    /// A PostgreSQL lock just taken on `conn`, and its heartbeat.
    fn postgres(conn: sqlx::PgConnection, job: Job, ttl: Duration) -> Self {
        let session = Arc::new(tokio::sync::Mutex::new(SessionState::Held { conn, ttl }));
        let heartbeat = Heartbeat::postgres(session.clone(), job, ttl);
        Self::Postgres { session, heartbeat }
    }
}

impl std::fmt::Debug for SyncLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncLock")
            .field("job", &self.job)
            .finish_non_exhaustive()
    }
}

fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

/// A run's lock is gone, so the run stops rather than race one that may take the lock now. The
/// database itself may answer, so its caller is told this, not that it is unavailable.
#[derive(Debug, thiserror::Error)]
pub enum LockLost {
    /// PostgreSQL: the session that held it ended (an idle timeout, a pooler restart, an
    /// operator's `pg_terminate_backend`).
    #[error("the sync lock session was lost")]
    Session,
    /// SQLite: its lease ran out unrenewed and another run took it (its holder stopped or kept
    /// waiting past the lease, or the wall clock stepped forward past it).
    #[error("the sync lock expired and was taken")]
    Taken,
}

impl SyncLock {
    /// Keeps the lock alive across a long run: a SQLite row is extended; a PostgreSQL session
    /// beats, which checks it too, since a session ended (the server's idle timeout after the
    /// holder went silent, a proxy restart) took its lock with it.
    /// Errors when the lock was lost, so the run stops instead of racing another one.
    pub async fn renew(&mut self, now: i64) -> anyhow::Result<()> {
        if let LockInner::Postgres { session, .. } = &self.inner {
            beat(session).await?;
        }
        if let LockInner::Sqlite {
            pool, holder, ttl, ..
        } = &self.inner
        {
            let renewed = sqlx::query(SQLITE_LOCK_RENEW)
                .bind(self.job.lock_name())
                .bind(holder.as_str())
                .bind(now.saturating_add(ttl_ms(*ttl)))
                .execute(pool)
                .await
                .context("renewing the sync lock")?;
            if renewed.rows_affected() != 1 {
                return Err(LockLost::Taken.into());
            }
        }
        Ok(())
    }

    pub async fn release(self) -> anyhow::Result<()> {
        match self.inner {
            LockInner::Postgres { session, heartbeat } => {
                use sqlx::Connection as _;
                drop(heartbeat);
                let mut state = session.lock().await;
                // A lost session holds nothing.
                if let SessionState::Held { mut conn, .. } =
                    std::mem::replace(&mut *state, SessionState::Lost("released".into()))
                {
                    sqlx::query(JOB_LOCK_RELEASE)
                        .bind(self.job.advisory_class())
                        .execute(&mut conn)
                        .await
                        .context("releasing the sync lock")?;
                    conn.close()
                        .await
                        .context("closing the sync lock session")?;
                }
            }
            LockInner::Sqlite {
                pool,
                holder,
                heartbeat,
                ..
            } => {
                // The heartbeat stops first, so it cannot renew a row taken after this one.
                drop(heartbeat);
                sqlx::query("DELETE FROM locks WHERE name = $1 AND holder = $2")
                    .bind(self.job.lock_name())
                    .bind(holder)
                    .execute(&pool)
                    .await
                    .context("releasing the sync lock")?;
            }
        }
        Ok(())
    }
}

/// What `job`'s SQLite lock row says of its holder at `now` (ms), its lease being `ttl`.
async fn sqlite_lease(
    pool: &sqlx::SqlitePool,
    job: Job,
    now: i64,
    ttl: Duration,
) -> anyhow::Result<LockHeld> {
    let row: Option<(i64, i64)> =
        sqlx::query_as("SELECT acquired_at, expires_at FROM locks WHERE name = $1")
            .bind(job.lock_name())
            .fetch_optional(pool)
            .await
            .context("reading the sync lock's holder")?;
    let Some((acquired_at, mut expires_at)) = row else {
        return Ok(LockHeld::Released);
    };
    // A lease never runs further than `ttl` from now. One that does was written while the wall
    // clock was ahead (since set back), and would otherwise hold the job until our clock caught
    // up with it, a day for a clock a day ahead, though its holder may be long dead. Cut, it is
    // taken a lease from now at most; a live holder renews it every beat anyway.
    let longest = now.saturating_add(ttl_ms(ttl));
    if expires_at > longest {
        sqlx::query("UPDATE locks SET expires_at = $2 WHERE name = $1 AND expires_at > $2")
            .bind(job.lock_name())
            .bind(longest)
            .execute(pool)
            .await
            .context("cutting the sync lock's lease")?;
        // Not for a clock a few milliseconds off another process's on the file.
        if expires_at - longest > 1_000 {
            tracing::warn!(
                ?job,
                acquired_at,
                expires_at,
                now,
                "the {} lock row expires more than a lease after now (written while the wall \
                 clock was ahead, since set back): its lease is cut to end a lease from now",
                job.run_name()
            );
        }
        expires_at = longest;
    }
    let ago = |at: i64| Duration::from_millis(u64::try_from(now.saturating_sub(at)).unwrap_or(0));
    Ok(LockHeld::Lease {
        held: ago(acquired_at),
        renewed: ago(expires_at.saturating_sub(ttl_ms(ttl))),
        // Taken once `expires_at < now`, a millisecond later: not counted, or a lease taken in
        // this same millisecond would expire in 60.001 s, a Retry-After of 61 for a 60 s lease.
        expires_in: Duration::from_millis(
            u64::try_from(expires_at.saturating_sub(now)).unwrap_or(0),
        ),
        beat: heartbeat_every(ttl),
    })
}

/// The `finished_at`, `outcome` and `error` columns of a run row, finished or still running.
fn run_end<'a>(
    finished: Option<(i64, &'a str, Option<&'a str>)>,
) -> (Option<i64>, &'a str, Option<&'a str>) {
    match finished {
        Some((at, outcome, error)) => (Some(at), outcome, error),
        None => (None, "running", None),
    }
}

/// The `error` of a run marked `interrupted`.
const INTERRUPTED: &str = "the run stopped before it ended: its process was killed or stopped \
                           mid-run; marked interrupted (at finished_at) by the next run of its \
                           job, and its counts are as far as it got";

type SyncRunRow = (
    String,
    i64,
    Option<i64>,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    Option<String>,
);

/// [`Store::mark_interrupted_runs`] of `job`: reads the runs still `running` alone, from the
/// partial index `reconcile_runs_running` or `sync_runs_running`, not every run ever kept.
fn mark_interrupted_sql(job: Job) -> String {
    format!(
        "UPDATE {} SET outcome = 'interrupted', finished_at = $1, error = $2 \
         WHERE outcome = 'running' RETURNING id, started_at",
        job.runs_table()
    )
}

/// [`Store::disown_coverage_after`]: both of its conditions put a run's coverage
/// (`COALESCE(covered_until, started_at)`) after the earlier of `$1` and `$3`, which `$4` is, so
/// the statement reads the runs covering past it from the partial index `reconcile_runs_coverage`
/// (none, unless a clock ran ahead), not every run ever kept.
const DISOWN: &str = "UPDATE reconcile_runs SET continuous = $2 \
                      WHERE outcome = 'ok' AND continuous \
                      AND COALESCE(covered_until, started_at) > $4 \
                      AND ((covered_until IS NULL AND started_at > $1) OR covered_until > $3) \
                      RETURNING id, COALESCE(covered_until, started_at)";

/// [`Store::reconcile_coverage`]: the newest entry of the partial index
/// `reconcile_runs_coverage`, not a scan of every run ever kept.
const COVERAGE: &str = "SELECT MAX(COALESCE(covered_until, started_at)) FROM reconcile_runs \
                        WHERE outcome = 'ok' AND continuous";

impl Store {
    /// Runs `body` holding `job`'s lock, then releases it: `Err` (and `body` not run) with
    /// what is known of the holder while that job runs elsewhere. A failed release is logged;
    /// the lock then expires.
    pub async fn with_job_lock<T>(
        &self,
        job: Job,
        holder: &str,
        clock: &Clock,
        ttl: Duration,
        body: impl AsyncFnOnce(&mut SyncLock) -> T,
    ) -> anyhow::Result<Result<T, LockHeld>> {
        let mut lock = match self.try_lock_job(job, holder, clock, ttl).await? {
            Ok(lock) => lock,
            Err(held) => return Ok(Err(held)),
        };
        if let Err(err) = self.mark_interrupted_runs(job, clock.now_ms()).await {
            // The rows stay `running` until the next run marks them; this run goes on.
            tracing::warn!(
                error = crate::error::causes(&err),
                ?job,
                "runs left running by a stopped process not marked interrupted"
            );
        }
        let result = body(&mut lock).await;
        if let Err(err) = lock.release().await {
            tracing::warn!(
                error = crate::error::causes(&err),
                ?job,
                "lock not released; it expires"
            );
        }
        Ok(Ok(result))
    }

    /// Takes `job`'s lock if no one holds it: `Err` with what is known of its holder while that
    /// job runs, on any instance.
    /// PostgreSQL: a session advisory lock on a connection of its own. SQLite: a `locks` row
    /// that expires after `ttl` unless renewed. The PostgreSQL lock is held in a transaction
    /// that the server ends after `ttl` idle, the SQLite row is renewed: a heartbeat beats every
    /// sixth of `ttl` for as long as the lock is held, so a crashed, stopped or frozen holder
    /// blocks the job for at most `ttl`, however long a live holder's run takes.
    pub async fn try_lock_job(
        &self,
        job: Job,
        holder: &str,
        clock: &Clock,
        ttl: Duration,
    ) -> anyhow::Result<Result<SyncLock, LockHeld>> {
        match &self.backend {
            Backend::Postgres(pool) => {
                // Detached: a session that dies (or a guard dropped unreleased) closes instead of
                // going back to the pool with the lock still held.
                let mut conn = pool
                    .acquire()
                    .await
                    .context("opening the sync lock session")?
                    .detach();
                sqlx::query(JOB_LOCK_BEGIN)
                    .execute(&mut conn)
                    .await
                    .context("taking the sync lock")?;
                sqlx::query(JOB_LOCK_IDLE_TIMEOUT)
                    .bind(idle_timeout_ms(ttl))
                    .execute(&mut conn)
                    .await
                    .context("taking the sync lock")?;
                let locked: bool = sqlx::query_scalar(JOB_LOCK_TRY)
                    .bind(job.advisory_class())
                    .fetch_one(&mut conn)
                    .await
                    .context("taking the sync lock")?;
                if !locked {
                    use sqlx::Connection as _;
                    conn.close()
                        .await
                        .context("closing the sync lock session")?;
                    return Ok(Err(LockHeld::Session));
                }
                Ok(Ok(SyncLock {
                    job,
                    inner: LockInner::postgres(conn, job, ttl),
                }))
            }
            Backend::Sqlite(pool) => {
                // Only an expired row is taken over: another process's row may be a run still
                // going (two processes on one file). The holder is made unique per lock, so a
                // run whose row was taken cannot renew the new holder's row as its own.
                let holder = format!("{holder} lock-{}", uuid::Uuid::new_v4());
                let now = clock.now_ms();
                let taken = sqlx::query(
                    "INSERT INTO locks (name, holder, acquired_at, expires_at) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO UPDATE SET \
                     holder = excluded.holder, acquired_at = excluded.acquired_at, \
                     expires_at = excluded.expires_at WHERE locks.expires_at < excluded.acquired_at",
                )
                .bind(job.lock_name())
                .bind(&holder)
                .bind(now)
                .bind(now.saturating_add(ttl_ms(ttl)))
                .execute(pool)
                .await
                .context("taking the sync lock")?;
                if taken.rows_affected() != 1 {
                    return Ok(Err(sqlite_lease(pool, job, now, ttl).await?));
                }
                let heartbeat =
                    Heartbeat::start(pool.clone(), job, holder.clone(), clock.clone(), ttl);
                Ok(Ok(SyncLock {
                    job,
                    inner: LockInner::Sqlite {
                        pool: pool.clone(),
                        holder,
                        ttl,
                        heartbeat,
                    },
                }))
            }
        }
    }

    /// Marks `interrupted` (finished `now`, ms) the runs of `job` still `running`: called
    /// holding its lock, which a live run keeps until it ends (or loses it, and then stops at its
    /// next renewal, writing its own outcome over this one), so their process stopped mid-run
    /// (killed, or its run cut by a stop). Each is logged once, as a WARN: it is then no longer
    /// `running`. Returns their ids.
    pub async fn mark_interrupted_runs(&self, job: Job, now: i64) -> anyhow::Result<Vec<String>> {
        let sql = sqlx::AssertSqlSafe(mark_interrupted_sql(job));
        let marked: Vec<(String, i64)> = with_pool!(self, |pool| sqlx::query_as(sql)
            .bind(now)
            .bind(INTERRUPTED)
            .fetch_all(pool)
            .await)
        .context("marking runs left running")?;
        for (run, started_at) in &marked {
            tracing::warn!(
                run = run.as_str(),
                started_at,
                table = job.runs_table(),
                "a {} left running by a process that stopped mid-run (killed, or its run cut by \
                 a stop) is marked interrupted; its counts are as far as it got",
                job.run_name()
            );
        }
        Ok(marked.into_iter().map(|(run, _)| run).collect())
    }

    pub async fn start_sync_run(&self, id: &str, started_at: i64) -> anyhow::Result<()> {
        let sql = "INSERT INTO sync_runs (id, started_at, outcome) VALUES ($1, $2, 'running')";
        self.execute(sql, &[id.into(), started_at.into()])
            .await
            .context("recording the sync run")?;
        Ok(())
    }

    /// Records a run's counts so far; with `finished` (at, outcome, error) it closes the run.
    pub async fn record_sync_run(
        &self,
        id: &str,
        counts: &SyncCounts,
        finished: Option<(i64, &str, Option<&str>)>,
    ) -> anyhow::Result<()> {
        let (finished_at, outcome, error) = run_end(finished);
        let sql = "UPDATE sync_runs SET products_seen = $2, products_upserted = $3, \
                   products_deactivated = $4, prices_seen = $5, prices_upserted = $6, \
                   prices_deactivated = $7, finished_at = $8, outcome = $9, error = $10 \
                   WHERE id = $1";
        let args = [
            id.into(),
            counts.products_seen.into(),
            counts.products_upserted.into(),
            counts.products_deactivated.into(),
            counts.prices_seen.into(),
            counts.prices_upserted.into(),
            counts.prices_deactivated.into(),
            finished_at.into(),
            outcome.into(),
            error.into(),
        ];
        self.execute(sql, &args)
            .await
            .context("recording the sync run")?;
        Ok(())
    }

    /// The newest sync runs, newest first.
    pub async fn recent_sync_runs(&self, limit: i64) -> anyhow::Result<Vec<SyncRun>> {
        let sql = "SELECT id, started_at, finished_at, outcome, products_seen, \
                   products_upserted, products_deactivated, prices_seen, prices_upserted, \
                   prices_deactivated, error FROM sync_runs \
                   ORDER BY started_at DESC, id DESC LIMIT $1";
        let rows: Vec<SyncRunRow> = with_pool!(self, |pool| sqlx::query_as(sql)
            .bind(limit)
            .fetch_all(pool)
            .await)
        .context("reading sync runs")?;
        Ok(rows
            .into_iter()
            .map(|r| SyncRun {
                id: r.0,
                started_at: r.1,
                finished_at: r.2,
                outcome: r.3,
                counts: SyncCounts {
                    products_seen: r.4,
                    products_upserted: r.5,
                    products_deactivated: r.6,
                    prices_seen: r.7,
                    prices_upserted: r.8,
                    prices_deactivated: r.9,
                },
                error: r.10,
            })
            .collect())
    }

    pub async fn start_reconcile_run(
        &self,
        id: &str,
        started_by: &str,
        since: i64,
        started_at: i64,
        continuous: bool,
    ) -> anyhow::Result<()> {
        let sql = "INSERT INTO reconcile_runs \
                   (id, started_by, since, started_at, outcome, continuous) \
                   VALUES ($1, $2, $3, $4, 'running', $5)";
        let args = [
            id.into(),
            started_by.into(),
            since.into(),
            started_at.into(),
            continuous.into(),
        ];
        self.execute(sql, &args)
            .await
            .context("recording the reconcile run")?;
        Ok(())
    }

    /// Records a run's counts and the last event it handled, and how far its listing reached
    /// (`covered_until`, Stripe's time in ms, kept once set); with `finished` (at, outcome,
    /// error) it closes the run. Unless `complete` (no listed event left for a later run to
    /// apply), the run no longer counts as continuous: it covers nothing.
    pub async fn record_reconcile_run(
        &self,
        id: &str,
        counts: &ReconcileCounts,
        last_event_id: Option<&str>,
        complete: bool,
        covered_until: Option<i64>,
        finished: Option<(i64, &str, Option<&str>)>,
    ) -> anyhow::Result<()> {
        let (finished_at, outcome, error) = run_end(finished);
        let sql = "UPDATE reconcile_runs SET events_seen = $2, events_applied = $3, \
                   events_already_applied = $4, events_ignored = $5, last_event_id = $6, \
                   finished_at = $7, outcome = $8, error = $9, continuous = continuous AND $10, \
                   covered_until = COALESCE(covered_until, $11) \
                   WHERE id = $1";
        let args = [
            id.into(),
            counts.seen.into(),
            counts.applied.into(),
            counts.already_applied.into(),
            counts.ignored.into(),
            last_event_id.into(),
            finished_at.into(),
            outcome.into(),
            error.into(),
            complete.into(),
            covered_until.into(),
        ];
        self.execute(sql, &args)
            .await
            .context("recording the reconcile run")?;
        Ok(())
    }

    /// When (ms) the newest periodic run started, whatever its outcome: a restarted instance
    /// schedules its first run from it. Runs stamped more than `STAMPED_AHEAD_MS` after
    /// `now_ms` are passed over: stamped while the wall clock ran ahead, since set back, they
    /// say nothing of when they ran, and the newest would hide the true last run behind it.
    pub async fn last_periodic_reconcile(&self, now_ms: i64) -> anyhow::Result<Option<i64>> {
        let sql = "SELECT MAX(started_at) FROM reconcile_runs \
                   WHERE started_by = 'periodic' AND started_at <= $1";
        let stamped_until = now_ms.saturating_add(STAMPED_AHEAD_MS);
        let last: Option<i64> = with_pool!(self, |pool| sqlx::query_scalar(sql)
            .bind(stamped_until)
            .fetch_one(pool)
            .await)
        .context("reading earlier reconcile runs")?;
        Ok(last)
    }

    /// Takes from the coverage the successful continuous runs whose coverage lies further ahead
    /// of now than can be right: a run without Stripe's time (from builds before
    /// `covered_until`, or whose answer had no `Date`) stamped after `stamped_after` (ms), made
    /// while the wall clock was ahead, since set back; one whose `Date` is after
    /// `covered_after`, a clock in front of Stripe (a proxy writing its own `Date`) that far
    /// ahead of ours. Either says nothing of how far the run really listed. They are marked not
    /// `continuous` for good, not merely passed over while in the future: once the clock passes
    /// their stamp they would again claim events up to it, and the default window would skip
    /// those created since the last true run. Returns their ids and coverage.
    pub async fn disown_coverage_after(
        &self,
        stamped_after: i64,
        covered_after: i64,
    ) -> anyhow::Result<Vec<(String, i64)>> {
        let disowned: Vec<(String, i64)> = with_pool!(self, |pool| sqlx::query_as(DISOWN)
            .bind(stamped_after)
            .bind(false)
            .bind(covered_after)
            .bind(stamped_after.min(covered_after))
            .fetch_all(pool)
            .await)
        .context("reading earlier reconcile runs")?;
        Ok(disowned)
    }

    /// How far Stripe's event list is known to be applied (ms, Stripe's time): how far the
    /// newest successful continuous run listed (its window reached back to the coverage before
    /// it, and it left no listed event for a later run), which applied every event listed up to
    /// then: its `covered_until`, or for a run without it (an earlier build's) its start.
    pub async fn reconcile_coverage(&self) -> anyhow::Result<Option<i64>> {
        let covered: Option<i64> = with_pool!(self, |pool| sqlx::query_scalar(COVERAGE)
            .fetch_one(pool)
            .await)
        .context("reading earlier reconcile runs")?;
        Ok(covered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    use crate::store::engine::{Arg, bind_all};

    /// How a plan must read a statement's index.
    struct RunScan {
        sql: String,
        args: Vec<Arg<'static>>,
        index: &'static str,
        /// What the plan must say besides the index's name, on SQLite and on PostgreSQL: for
        /// the coverage and disowning, whose index holds nearly every run (the successful
        /// continuous ones), a search of it from a bound, not a read of all of it (which a
        /// plan may choose for an index whose condition the statement implies); for the
        /// marking, whose index holds the `running` runs alone, any read of it.
        sqlite: &'static str,
        postgres: &'static str,
    }

    /// The statements every reconciliation and catalogue sync starts with, each with arguments
    /// of its types and how it must read its index: with none, each read every run ever kept
    /// (the tables grow until pruned by hand), 1-20 ms a run at 10,000-20,000 rows, and more
    /// as they grow.
    fn run_scans() -> Vec<RunScan> {
        let marking = |job: Job, index| RunScan {
            sql: mark_interrupted_sql(job),
            args: vec![Arg::from(0_i64), Arg::from(INTERRUPTED)],
            index,
            sqlite: "",
            postgres: "",
        };
        // Past all but the newest of the runs the PostgreSQL test writes.
        let ahead = 4_999_000_i64;
        let disowning = [ahead.into(), false.into(), ahead.into(), ahead.into()];
        vec![
            marking(Job::Reconcile, "reconcile_runs_running"),
            marking(Job::CatalogueSync, "sync_runs_running"),
            RunScan {
                sql: DISOWN.to_owned(),
                args: disowning.to_vec(),
                index: "reconcile_runs_coverage",
                sqlite: "SEARCH reconcile_runs USING INDEX reconcile_runs_coverage (<expr>>?)",
                postgres: "Index Cond: (COALESCE(",
            },
            RunScan {
                sql: COVERAGE.to_owned(),
                args: Vec::new(),
                index: "reconcile_runs_coverage",
                sqlite: "SEARCH reconcile_runs USING",
                postgres: "Backward using reconcile_runs_coverage",
            },
        ]
    }

    #[tokio::test]
    async fn the_runs_scans_read_their_index_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("edgegate.db").display());
        let pool = crate::store::sqlite::connect(&url).await.unwrap();
        crate::store::sqlite::migrate(&pool).await.unwrap();
        let mut missed = Vec::new();
        for scan in run_scans() {
            let explain = format!("EXPLAIN QUERY PLAN {}", scan.sql);
            let query = bind_all(sqlx::query(sqlx::AssertSqlSafe(explain)), &scan.args);
            let rows = query.fetch_all(&pool).await.unwrap();
            // Each row of the plan: id, parent, unused, detail.
            let plan = rows
                .iter()
                .map(|row| sqlx::Row::get::<String, _>(row, 3))
                .collect::<Vec<_>>()
                .join("; ");
            if !plan.contains(&format!("INDEX {}", scan.index)) || !plan.contains(scan.sqlite) {
                missed.push(format!("{}: {plan}", scan.sql));
            }
        }
        pool.close().await;
        assert!(missed.is_empty(), "plans without their index: {missed:#?}");
    }

    /// On PostgreSQL, with sequential scans priced out (in a test's small tables a scan is
    /// cheapest: `sync_runs` is empty, `reconcile_runs` holds 5,000 analysed runs): a plan that
    /// can read the index does, one that cannot still scans.
    #[tokio::test]
    async fn the_runs_scans_read_their_index_on_postgres() {
        let Some(base) = std::env::var("TEST_POSTGRES_URL")
            .ok()
            .filter(|url| !url.is_empty())
        else {
            // Past the harness's capture, which hides a passing test's `eprintln!`. `.ci/run`
            // runs it again with TEST_POSTGRES_URL after the PostgreSQL suite.
            let skip = "SKIPPED: PostgreSQL only (TEST_POSTGRES_URL)";
            let _ = writeln!(std::io::stderr().lock(), "{skip}");
            return;
        };
        let admin = sqlx::PgPool::connect(&base).await.unwrap();
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let create = format!("CREATE DATABASE {name}");
        sqlx::query(sqlx::AssertSqlSafe(create))
            .execute(&admin)
            .await
            .unwrap();
        let mut url = url::Url::parse(&base).unwrap();
        url.set_path(&name);
        let pool = crate::store::postgres::connect(url.as_str()).await.unwrap();
        crate::store::postgres::migrate(&pool).await.unwrap();
        // Enough runs that reading every entry of an index costs more than searching it (in an
        // empty table a plan may read all of one: it holds nothing), and their statistics.
        sqlx::query(
            "INSERT INTO reconcile_runs (id, started_by, since, started_at, outcome, continuous, \
             covered_until) SELECT 'run-' || n, 'periodic', 0, n * 1000, 'ok', TRUE, n * 1000 \
             FROM generate_series(1, 5000) AS n",
        )
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query("ANALYZE reconcile_runs")
            .execute(&pool)
            .await
            .unwrap();
        let mut missed = Vec::new();
        for scan in run_scans() {
            let mut tx = pool.begin().await.unwrap();
            sqlx::query("SET LOCAL enable_seqscan = off")
                .execute(&mut *tx)
                .await
                .unwrap();
            let explain = format!("EXPLAIN {}", scan.sql);
            let query = bind_all(sqlx::query(sqlx::AssertSqlSafe(explain)), &scan.args);
            let rows = query.fetch_all(&mut *tx).await.unwrap();
            let plan = rows
                .iter()
                .map(|row| sqlx::Row::get::<String, _>(row, 0))
                .collect::<Vec<_>>()
                .join("; ");
            tx.rollback().await.unwrap();
            // `Index Scan using`, `Bitmap Index Scan on`: named either way.
            if !plan.contains(scan.index) || !plan.contains(scan.postgres) {
                missed.push(format!("{}: {plan}", scan.sql));
            }
        }
        pool.close().await;
        let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
        sqlx::query(sqlx::AssertSqlSafe(drop))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        assert!(missed.is_empty(), "plans without their index: {missed:#?}");
    }
}
