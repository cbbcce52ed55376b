//! The storage interface. One `Store`, two backends (SQLite embedded, PostgreSQL in production),
//! picked from `DATABASE_URL`. Queries that both engines accept are written once; what differs
//! (connection setup, migrations, locks) lives in the backend's own file.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Shared};
use sqlx::{PgPool, SqlitePool};

use crate::config::DatabaseUrl;
use engine::{Arg, BindExt as _, Upsert};

/// Runs `$body` with `$pool` bound to whichever pool the store holds: the one place the store
/// picks an engine. The body is compiled once per backend, so it may only use SQL that both SQLite
/// and PostgreSQL accept (`$1` placeholders); longer shared code is a function over `DB: Engine`
/// (`engine.rs`) that the body calls. (A macro, since a closure cannot be generic over `DB`.)
macro_rules! with_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match &$store.backend {
            $crate::store::Backend::Sqlite($pool) => $body,
            $crate::store::Backend::Postgres($pool) => $body,
        }
    };
}

// Declared after the macro so the submodules can use it.
mod callers;
mod engine;
mod postgres;
mod sms;
mod sqlite;
mod stripe;
mod writers;

pub use stripe::{
    CatalogueObject, CheckoutSessionRow, CustomerRow, Deletion, EarlierBuildsAsOf, EventReceipt,
    InvoiceRow, Job, LedgerEvent, LockHeld, LockLost, PriceRow, ProductRow, ReconcileCounts,
    SameSecond, StripeEffect, SubscriptionRow, SyncCounts, SyncLock, SyncRun, Tombstone,
};

pub use callers::{CallerSums, CallerUsage, HourlyTable};
pub use sms::{NewSms, Reservation, SendResult, SmsLimits, SmsMessage, StatusChange};
pub(crate) use sqlite::ServerAccess as SqliteServerAccess;
pub(crate) use sqlite::empty_database_advice as empty_sqlite_database_advice;
pub(crate) use sqlite::is_damage as is_sqlite_damage;
pub(crate) use sqlite::is_in_memory as is_in_memory_sqlite;
pub(crate) use sqlite::not_usable_by_server as sqlite_not_usable_by_server;

/// Migrations an earlier build shipped and a later one retired, which a database may have
/// applied and no release will ship again: not a newer release's
/// ([`Store::migrations_unknown`]). 20261210000001: shipped in 3eb0f9e, deleted in 0552c88.
const RETIRED_MIGRATIONS: [i64; 1] = [20261210000001];
pub(crate) use sqlite::is_empty_database as is_empty_sqlite_database;
pub(crate) use sqlite::missing_directory as missing_sqlite_directory;
pub(crate) use sqlite::unwritable_directory as unwritable_sqlite_directory;
pub use writers::{LastNote, UsageWriter};

#[derive(Clone, Debug)]
enum Backend {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// A handle on the database; cheap to clone (the pools are shared).
#[derive(Clone, Debug)]
pub struct Store {
    backend: Backend,
    readiness: Arc<Readiness>,
    /// False only while `serve` waits to apply the migrations of a database that did not answer
    /// at start: the routes that need the database answer 503 until then.
    schema_ready: Arc<AtomicBool>,
    /// How many of this binary's migrations the database lacks, as last read by
    /// [`Store::check_migrations`] (`serve --no-migrate`); the routes that need the database
    /// answer 503 while it is not 0.
    migrations_missing: Arc<AtomicUsize>,
    /// Permits to wait for the SMS reservation lock (PostgreSQL), taken before a connection is:
    /// see `reserve_sms`.
    sms_reservations: std::sync::Arc<tokio::sync::Semaphore>,
}

/// The readiness probe, shared by every caller of [`Store::ping`]: at most one runs at a time,
/// and its answer is reused for [`PROBE_REUSE`] after it ends. A probe takes a pooled connection
/// (and, on SQLite, the write lock) and outlives a caller that hangs up, so one per `/readyz`
/// request let a client that opened and reset many of them starve every write.
#[derive(Debug, Default)]
struct Readiness {
    /// The last probe, and when it started.
    probe: std::sync::Mutex<Option<(Instant, SharedProbe)>>,
    started: AtomicU64,
    /// [`SPACE_REFUSALS`] as it was when this store's probe last wrote a row: while it has grown
    /// since, the probe writes one again ([`Store::space_refused`]).
    space_found: AtomicU64,
}

/// Writes refused for want of space (SQLite FULL, PostgreSQL 53100 disk_full) that
/// [`is_unavailable`] has seen in this process. The probe's own write lock needs no space, so a
/// full disk answered it ready while every webhook was refused; a refusal makes the next probe
/// write a row too, until one goes through. Counted for the process, since the errors come
/// without their store (tests run several): another store's refusal costs this one a row
/// written, nothing more.
static SPACE_REFUSALS: AtomicU64 = AtomicU64::new(0);
/// When the last of [`SPACE_REFUSALS`] from PostgreSQL came ([`elapsed_ms`] + 1; 0 for never):
/// only PostgreSQL's hold the probe ([`SPACE_REFUSAL_HOLD`]).
static LAST_POSTGRES_SPACE_REFUSAL: AtomicU64 = AtomicU64::new(0);
/// How long PostgreSQL is not ready after a write refused for want of space, whatever the
/// probe's own small row does ([`Store::probe_writes`]).
const SPACE_REFUSAL_HOLD: Duration = Duration::from_secs(30);

/// What the readiness probe learnt of the disk's space.
enum SpaceCheck {
    /// Not asked (no refusal since the last check), or its row went through.
    Found,
    /// Refused by the storage (no space, a read-only file): what `/readyz` says.
    Full(String),
    /// Its row failed for another reason: asked again at the next probe.
    Unknown,
}

/// Milliseconds since the first call in this process: a clock for [`LAST_POSTGRES_SPACE_REFUSAL`].
fn elapsed_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let start = START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// When the last write refused for want of space came, in [`elapsed_ms`]; `None` for never.
fn last_space_refusal() -> Option<u64> {
    LAST_POSTGRES_SPACE_REFUSAL
        .load(Ordering::Acquire)
        .checked_sub(1)
}

/// How long ago the last refusal came, while that is within [`SPACE_REFUSAL_HOLD`].
fn space_refusal_held(last: Option<u64>, now: u64) -> Option<Duration> {
    let ago = Duration::from_millis(now.saturating_sub(last?));
    (ago < SPACE_REFUSAL_HOLD).then_some(ago)
}

/// A probe's answer (its error as text, so that every caller gets a copy) and when it came.
type ProbeAnswer = (Instant, Result<(), ProbeFailure>);

#[derive(Clone, Debug)]
enum ProbeFailure {
    /// The database answered but takes no writes ([`ReadOnly`]).
    ReadOnly(String),
    /// The error's causes.
    Failed(String),
}

/// The database answered the readiness probe but takes no writes: a PostgreSQL hot standby (a
/// failover not finished), sessions made read-only (`default_transaction_read_only`, which
/// Supabase sets on a full disk), or a disk with no space for the row the probe writes after a
/// write was refused for want of it. Not a secret, and what to look at: `/readyz` says it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ReadOnly(String);
type SharedProbe = Shared<BoxFuture<'static, ProbeAnswer>>;

/// How long a probe's answer is reused: load balancers ask every few seconds each, and a
/// second-old answer is as good as a new one.
const PROBE_REUSE: Duration = Duration::from_secs(1);

/// Which engine a store runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Sqlite,
    Postgres,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// One privileged action: who did it (the credential, never its secret), what, and the outcome.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct AuditEntry {
    pub id: String,
    pub at_ms: i64,
    pub request_id: Option<String>,
    /// `signing_key`, `legacy_secret`, `api_key`, or `system` for the service's own actions.
    pub credential_source: String,
    /// The kid, `legacy`, or the API key's id (`secret:NAME`, `publishable:NAME`).
    pub credential_id: String,
    pub action: String,
    pub outcome: String,
    /// Extra JSON about the action, with no secrets in it.
    pub detail: Option<String>,
}

impl AuditEntry {
    pub fn new(
        at_ms: i64,
        request_id: Option<String>,
        credential_source: &str,
        credential_id: &str,
        action: &str,
        outcome: &str,
    ) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            at_ms,
            request_id,
            credential_source: credential_source.to_owned(),
            credential_id: credential_id.to_owned(),
            action: action.to_owned(),
            outcome: outcome.to_owned(),
            detail: None,
        }
    }
}

/// Verifications of one key in one hour (or, when read back, over a period).
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct KeyUsage {
    /// Start of the hour, epoch milliseconds (when read back over a period: the earliest hour).
    pub hour_start_ms: i64,
    /// `signing_key`, `legacy_secret` or `api_key`.
    pub source: String,
    /// The kid, the API key's id (`secret:NAME`, `publishable:NAME`; the bare name in rows of
    /// releases before the type was recorded), or empty for the legacy secret.
    pub kid: String,
    pub alg: String,
    pub verified_count: i64,
    pub last_verified_at_ms: i64,
}

impl Store {
    /// Opens the database `url` names; a SQLite file is created if missing.
    pub async fn connect(url: &DatabaseUrl) -> anyhow::Result<Self> {
        let backend = if url.is_postgres() {
            Backend::Postgres(postgres::connect(url.expose()).await?)
        } else {
            Backend::Sqlite(sqlite::connect(url.expose()).await?)
        };
        Ok(Self::with_backend(backend, true))
    }

    /// For `serve`: as [`Store::connect`], but a PostgreSQL server that does not answer yet (not
    /// listening, no answer in time, starting up, out of connections) is no error. The store is
    /// returned with that cause; its pool connects once the server answers, and when
    /// `migrations_pending` it is not ready until [`Store::migrate`] has succeeded. A definitive
    /// refusal (password, unknown database or role, TLS, a bad URL) is still an error, as is
    /// any failure of SQLite.
    pub async fn connect_or_wait(
        url: &DatabaseUrl,
        migrations_pending: bool,
    ) -> anyhow::Result<(Self, Option<anyhow::Error>)> {
        if !url.is_postgres() {
            return Ok((Self::connect(url).await?, None));
        }
        let (pool, unreachable) = postgres::connect_or_wait(url.expose()).await?;
        let ready = unreachable.is_none() || !migrations_pending;
        Ok((
            Self::with_backend(Backend::Postgres(pool), ready),
            unreachable,
        ))
    }

    fn with_backend(backend: Backend, schema_ready: bool) -> Self {
        Self {
            backend,
            readiness: Arc::default(),
            schema_ready: Arc::new(AtomicBool::new(schema_ready)),
            migrations_missing: Arc::default(),
            sms_reservations: Arc::new(tokio::sync::Semaphore::new(sms::RESERVATION_PERMITS)),
        }
    }

    /// Whether the schema can be used: false while `serve` waits for a database that did not
    /// answer at start, to migrate it, and while a database `serve --no-migrate` serves lacks
    /// some of this binary's migrations.
    pub fn is_ready(&self) -> bool {
        self.schema_ready.load(Ordering::Acquire) && self.migrations_missing() == Some(0)
    }

    /// Returns once [`Store::is_ready`]: for background work on the schema, which `serve` may
    /// still have to migrate (a database that did not answer at start) or, under
    /// `--no-migrate`, another process. Once ready, a store stays so.
    pub async fn wait_until_ready(&self) {
        while !self.is_ready() {
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// How many of this binary's migrations the database lacked when [`Store::check_migrations`]
    /// last read them (0 once [`Store::migrate`] has succeeded, and before anything was asked
    /// of it); `None` after [`Store::migrations_unread`] until a reading succeeds.
    pub fn migrations_missing(&self) -> Option<usize> {
        match self.migrations_missing.load(Ordering::Acquire) {
            MIGRATIONS_UNREAD => None,
            missing => Some(missing),
        }
    }

    /// For `serve --no-migrate` on a database it could not read the migrations of (it did not
    /// answer at start, say): not ready until [`Store::check_migrations`] succeeds, so that the
    /// routes that need the database answer 503, not 500 on a table the database lacks.
    pub fn migrations_unread(&self) {
        self.migrations_missing
            .store(MIGRATIONS_UNREAD, Ordering::Release);
    }

    /// Reads which migrations the database has applied and records how many of this binary's
    /// it lacks (all of them when it was never migrated); [`Store::is_ready`] follows. A
    /// database ahead of the binary (a release rolled back after its migrations ran) lacks
    /// none: `migrate` accepts it too. One small query on `_sqlx_migrations`.
    pub async fn check_migrations(&self) -> anyhow::Result<usize> {
        Ok(self.read_migrations().await?.missing)
    }

    /// As [`Store::check_migrations`], with the applied migrations this binary does not know
    /// ([`Store::migrations_unknown`]) from the same reading: `serve --no-migrate` read them
    /// apart, and a second reading that failed after a first that found none missing was never
    /// made again, so a newer build's migrations went unwarned.
    pub async fn read_migrations(&self) -> anyhow::Result<MigrationsRead> {
        let applied = applied_before(with_pool!(self, |pool| sqlx::query_scalar(APPLIED_SQL)
            .fetch_all(pool)
            .await))?;
        let missing = self
            .migrator()
            .iter()
            .filter(|migration| !applied.contains(&migration.version))
            .count();
        self.migrations_missing.store(missing, Ordering::Release);
        let unknown = self.not_shipped(applied);
        Ok(MigrationsRead { missing, unknown })
    }

    /// How many migrations this binary ships for the store's engine.
    pub fn shipped_migration_count(&self) -> usize {
        self.migrator().iter().count()
    }

    /// The migrations this binary ships for the store's engine.
    fn migrator(&self) -> sqlx::migrate::Migrator {
        match self.backend {
            Backend::Sqlite(_) => sqlite::migrator(),
            Backend::Postgres(_) => postgres::migrator(),
        }
    }

    pub fn kind(&self) -> BackendKind {
        match self.backend {
            Backend::Sqlite(_) => BackendKind::Sqlite,
            Backend::Postgres(_) => BackendKind::Postgres,
        }
    }

    /// Applies every pending migration of this backend; safe to run again and concurrently.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        self.migrate_counting().await.map(|_| ())
    }

    /// As [`Store::migrate`], returning the versions applied before this run, read once it
    /// holds the migration lock: a run that waited for another's counts none of that one's as
    /// its own.
    pub async fn migrate_counting(&self) -> anyhow::Result<Vec<i64>> {
        let before = match &self.backend {
            Backend::Sqlite(pool) => sqlite::migrate(pool).await,
            Backend::Postgres(pool) => postgres::migrate(pool).await,
        }
        .context("applying migrations")?;
        self.schema_ready.store(true, Ordering::Release);
        self.migrations_missing.store(0, Ordering::Release);
        Ok(before)
    }

    /// As [`Store::migrate`], returning the applied migrations this binary does not ship
    /// ([`Store::migrations_unknown`]), oldest first, from the versions read under the lock
    /// before the run: this binary applies only its own, so every one it does not know was
    /// there. No second reading after the migration, whose failure lost the warning for the run.
    pub async fn migrate_reading_unknown(&self) -> anyhow::Result<Vec<i64>> {
        Ok(self.not_shipped(self.migrate_counting().await?))
    }

    /// The versions applied once a migration that found `before` applied (read under its lock,
    /// [`Store::migrate_counting`]) has succeeded, oldest first: those and every one this binary
    /// ships, which the migration applied (it fails otherwise). Not read from the database
    /// again: a failure of that reading made `migrate` exit 1 after its migrations were applied.
    pub fn applied_once_migrated(&self, before: &[i64]) -> Vec<i64> {
        let mut applied = before.to_vec();
        applied.extend(
            self.migrator()
                .iter()
                .filter(|migration| !migration.migration_type.is_down_migration())
                .map(|migration| migration.version),
        );
        applied.sort_unstable();
        applied.dedup();
        applied
    }

    /// The versions the database has applied, oldest first: none where the table of migrations
    /// is not there yet (a database never migrated). Any other error reading them is returned
    /// (a role not granted SELECT on the table, a damaged file, a connection dropped), and on
    /// PostgreSQL a table not found because the role may use no schema on its search path
    /// ([`postgres::schema_usable`]).
    pub async fn applied_migrations(&self) -> anyhow::Result<Vec<i64>> {
        let sql = "SELECT version FROM _sqlx_migrations WHERE success = TRUE ORDER BY version";
        let read = with_pool!(self, |pool| sqlx::query_scalar(sql).fetch_all(pool).await);
        if let (Err(err), Backend::Postgres(pool)) = (&read, &self.backend)
            && is_undefined_table(err)
        {
            postgres::schema_usable(pool)
                .await
                .context("reading applied migrations")?;
        }
        applied_before(read)
    }

    /// SQLite's `PRAGMA quick_check` of the whole file: `None` when it answers `ok`, else its
    /// first complaint (a damaged page, say, which is served until a query reads it). Reads
    /// every page: 2.2 s for a 150 MB file read from the disk, 0.1 s with its pages cached
    /// (docs/OPERATIONS.md); for `edgegate check`, not at start. `None` on PostgreSQL, which has
    /// no such check.
    pub async fn quick_check(&self) -> anyhow::Result<Option<String>> {
        let Backend::Sqlite(pool) = &self.backend else {
            return Ok(None);
        };
        let first: String = sqlx::query_scalar("PRAGMA quick_check(1)")
            .fetch_one(pool)
            .await
            .context("running PRAGMA quick_check")?;
        Ok((first != "ok").then_some(first))
    }

    /// The applied migrations this binary does not ship, oldest first: a newer release's, on a
    /// database that release migrated before this one was started on it (a rollback, DEPLOY.md
    /// §6, or a backup restored into an older build), whether it sorts above this binary's
    /// newest or between its own (a fix made on a branch). `migrate` accepts them. Not one of
    /// [`RETIRED_MIGRATIONS`], which an earlier build shipped and a later one retired.
    pub async fn migrations_unknown(&self) -> anyhow::Result<Vec<i64>> {
        let applied = self.applied_migrations().await?;
        Ok(self.not_shipped(applied))
    }

    /// Of the `applied` versions, those this binary does not ship, oldest first; not one of
    /// [`RETIRED_MIGRATIONS`].
    fn not_shipped(&self, applied: Vec<i64>) -> Vec<i64> {
        let migrator = self.migrator();
        let mut unknown: Vec<i64> = applied
            .into_iter()
            .filter(|version| {
                !RETIRED_MIGRATIONS.contains(version)
                    && !migrator.iter().any(|shipped| shipped.version == *version)
            })
            .collect();
        unknown.sort_unstable();
        unknown
    }

    /// The applied migrations whose stored checksum is neither this binary's copy's nor an
    /// earlier copy's that `migrate` accepts (PostgreSQL's `EARLIER_COPIES`): applied from
    /// another file of the same version, which `migrate` and `serve` refuse ("was previously
    /// applied but has been modified"). Versions this binary does not ship are not compared.
    pub async fn migrations_differing(&self) -> anyhow::Result<Vec<i64>> {
        let sql = "SELECT version, checksum FROM _sqlx_migrations WHERE success = TRUE \
                   ORDER BY version";
        let stored: Vec<(i64, Vec<u8>)> =
            with_pool!(self, |pool| sqlx::query_as(sql).fetch_all(pool).await)
                .context("reading applied migrations")?;
        let (migrator, has_earlier_copies) = match self.backend {
            Backend::Sqlite(_) => (sqlite::migrator(), false),
            Backend::Postgres(_) => (postgres::migrator(), true),
        };
        let accepted = |version: i64, checksum: &[u8]| {
            has_earlier_copies && postgres::earlier_copy(version, checksum).is_some()
        };
        Ok(stored
            .into_iter()
            .filter(|(version, checksum)| {
                migrator.iter().any(|shipped| {
                    shipped.version == *version
                        && *shipped.checksum != **checksum
                        && !accepted(*version, checksum)
                })
            })
            .map(|(version, _)| version)
            .collect())
    }

    /// Whether the database can take a write now, for readiness: PostgreSQL answers that this
    /// session may write ([`ReadOnly`] otherwise: every INSERT would fail); SQLite's write lock
    /// can be taken (a file locked by another process still answers reads).
    /// Bounded by `READINESS_TIMEOUT`, so a dead database gives a prompt answer. Callers share
    /// one probe at a time, and an answer for [`PROBE_REUSE`] after it came ([`Readiness`]).
    pub async fn ping(&self) -> anyhow::Result<()> {
        let probe = self.shared_probe();
        match tokio::time::timeout(READINESS_TIMEOUT, probe).await {
            Ok((_, answered)) => answered.map_err(|failure| match failure {
                ProbeFailure::ReadOnly(why) => anyhow::Error::new(ReadOnly(why)),
                ProbeFailure::Failed(causes) => anyhow::anyhow!(causes),
            }),
            Err(_) => Err(anyhow::anyhow!(
                "database did not answer within {} s",
                READINESS_TIMEOUT.as_secs()
            )),
        }
    }

    /// The probe running now, or the last one if it ended less than [`PROBE_REUSE`] ago;
    /// otherwise a new one. A probe ends within [`READINESS_TIMEOUT`] of its start (its query is
    /// bounded in its task), so one that no caller polled to its end, all of them gone, counts
    /// as running only until then, and is never handed out long after.
    fn shared_probe(&self) -> SharedProbe {
        let mut current = self
            .readiness
            .probe
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((started, probe)) = current.as_ref() {
            let reusable = match probe.peek() {
                None => started.elapsed() < READINESS_TIMEOUT,
                Some((ended, _)) => ended.elapsed() < PROBE_REUSE,
            };
            if reusable {
                return probe.clone();
            }
        }
        self.readiness.started.fetch_add(1, Ordering::Relaxed);
        let store = self.clone();
        // Spawned, so a probe whose callers all hang up still ends in its own rollback; its
        // answer is timed where it came, not where a caller next looks.
        let task = tokio::spawn(async move {
            let query = store.probe_writes();
            // Bounded here too: a query that hangs once its connection was handed out (a
            // network gone silent mid-query) must not stand for every later probe.
            let answered = match tokio::time::timeout(READINESS_TIMEOUT, query).await {
                Ok(Ok(None)) => Ok(()),
                Ok(Ok(Some(read_only))) => Err(ProbeFailure::ReadOnly(read_only)),
                Ok(Err(err)) => {
                    let err = err.context("database did not answer");
                    Err(ProbeFailure::Failed(crate::error::causes(&err)))
                }
                Err(_) => Err(ProbeFailure::Failed(format!(
                    "database did not answer within {} s",
                    READINESS_TIMEOUT.as_secs()
                ))),
            };
            (Instant::now(), answered)
        });
        let probe = async move {
            task.await.unwrap_or_else(|join| {
                (
                    Instant::now(),
                    Err(ProbeFailure::Failed(format!(
                        "database probe failed: {join}"
                    ))),
                )
            })
        }
        .boxed()
        .shared();
        *current = Some((Instant::now(), probe.clone()));
        probe
    }

    /// The readiness probe's query: `Some(why)` when the database answers but takes no writes.
    /// After a write was refused for want of space (since this store's probe last found space),
    /// the probe also writes and deletes one row in a transaction that commits, which needs
    /// space (taking SQLite's write lock, or asking PostgreSQL whether the session may write,
    /// needs none); with no refusal since, nothing is written, and the probe stays as cheap as
    /// its lock. On SQLite that row is written under the probe's own lock, waited for once. On
    /// PostgreSQL a small row often still fits in a page that has room while the writes that need
    /// a new one are refused: the database is not ready for [`SPACE_REFUSAL_HOLD`] after the last
    /// refusal, whatever the row does. A failure of the row for another reason (a table not
    /// migrated yet) says nothing about space: the next probe tries again.
    async fn probe_writes(&self) -> anyhow::Result<Option<String>> {
        let refusals = SPACE_REFUSALS.load(Ordering::Acquire);
        let check_space = refusals > self.readiness.space_found.load(Ordering::Acquire);
        let space = match &self.backend {
            Backend::Sqlite(pool) => match sqlite::probe_write(pool, check_space).await {
                Ok(()) => SpaceCheck::Found,
                Err(sqlx::Error::Database(db)) if check_space && out_of_space(db.as_ref()) => {
                    SpaceCheck::Full(storage_refusal_said(db.as_ref()))
                }
                Err(err) => return Err(err.into()),
            },
            Backend::Postgres(pool) => {
                if let Some(why) = postgres::probe_write(pool).await? {
                    return Ok(Some(why.to_owned()));
                }
                if !check_space {
                    SpaceCheck::Found
                } else if let Some(ago) = space_refusal_held(last_space_refusal(), elapsed_ms()) {
                    SpaceCheck::Full(format!(
                        "the database's disk is full: a write was refused for want of space {} s \
                         ago",
                        ago.as_secs()
                    ))
                } else {
                    match postgres::probe_space(pool).await {
                        Ok(()) => SpaceCheck::Found,
                        Err(sqlx::Error::Database(db)) if out_of_space(db.as_ref()) => {
                            SpaceCheck::Full(storage_refusal_said(db.as_ref()))
                        }
                        Err(_) => SpaceCheck::Unknown,
                    }
                }
            }
        };
        Ok(match space {
            SpaceCheck::Found => {
                if check_space {
                    self.readiness
                        .space_found
                        .fetch_max(refusals, Ordering::AcqRel);
                }
                None
            }
            SpaceCheck::Full(why) => Some(why),
            SpaceCheck::Unknown => None,
        })
    }

    /// Readiness probes started since the store was opened (several callers share one).
    pub fn readiness_probes_started(&self) -> u64 {
        self.readiness.started.load(Ordering::Relaxed)
    }

    pub async fn record_audit(&self, entry: &AuditEntry) -> anyhow::Result<()> {
        let sql = "INSERT INTO audit_log \
                   (id, at, request_id, credential_source, credential_id, action, outcome, detail) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
        let args = [
            entry.id.as_str().into(),
            entry.at_ms.into(),
            entry.request_id.as_deref().into(),
            entry.credential_source.as_str().into(),
            entry.credential_id.as_str().into(),
            entry.action.as_str().into(),
            entry.outcome.as_str().into(),
            entry.detail.as_deref().into(),
        ];
        self.execute(sql, &args)
            .await
            .context("writing the audit log")?;
        Ok(())
    }

    /// The newest audit entries, newest first.
    pub async fn recent_audit(&self, limit: i64) -> anyhow::Result<Vec<AuditEntry>> {
        let sql = "SELECT id, at AS at_ms, request_id, credential_source, credential_id, action, \
                   outcome, detail FROM audit_log ORDER BY at DESC, id DESC LIMIT $1";
        let entries = with_pool!(self, |pool| {
            sqlx::query_as(sql).bind(limit).fetch_all(pool).await
        })
        .context("reading the audit log")?;
        Ok(entries)
    }

    /// Adds counted verifications; rows of the same hour and key from every instance are summed.
    pub async fn add_key_usage(&self, rows: &[KeyUsage]) -> anyhow::Result<()> {
        let upsert = key_usage_batch(rows).context("recording key usage")?;
        self.execute_upserts(&[upsert])
            .await
            .context("recording key usage")
    }

    /// Adds counted verifications ([`Store::add_key_usage`]) and their callers
    /// ([`Store::add_caller_usage`]) in one transaction: both are written or neither, so a report
    /// read from the database never finds an instance's key counts without the callers counted
    /// with them (it would list those as having no caller recorded).
    ///
    /// On PostgreSQL each row is locked as it is written, until the commit. Every instance's batch
    /// locks its caller rows, then its key rows, each in one fixed order (see [`hourly_batch`]),
    /// so two batches queue and never deadlock (no other transaction writes both tables: the
    /// pruning pass's `DELETE`s are single statements, and builds before this one wrote each
    /// table in a transaction of its own). The key rows come last because every instance writes
    /// the current hour's: they are held for the key rows' round trips and the commit only, not
    /// for the caller rows' too, which would make another instance's flush wait on them past the
    /// `lock_timeout` sooner. Each table's rows are written dozens to a statement
    /// ([`engine::run_upserts`]), so a flush of thousands of rows is dozens of round trips, not one a
    /// row (2,000 key and 2,000 caller rows: see BENCHMARKS.md, "The usage flush"). Another
    /// instance's flush still queues behind this one on the rows both write (the current hour's
    /// callers of a client that calls every instance, then its keys), for as long as this one's
    /// statements take: the transaction waits for a lock up to [`postgres::USAGE_FLUSH_LOCK_TIMEOUT`], not
    /// the pooled sessions' 3 s, which is there to answer a request promptly; a flush answers
    /// none.
    pub async fn add_usage(
        &self,
        keys: &[KeyUsage],
        callers: &[CallerUsage],
    ) -> anyhow::Result<()> {
        let context = "recording key and caller usage";
        let upserts = [
            callers::caller_usage_batch(callers).context(context)?,
            key_usage_batch(keys).context(context)?,
        ];
        match &self.backend {
            Backend::Sqlite(pool) => engine::run_upserts(pool, None, &upserts).await,
            Backend::Postgres(pool) => {
                let bounds = postgres::usage_flush_bounds();
                engine::run_upserts(pool, Some(&bounds), &upserts).await
            }
        }
        .context(context)
    }

    /// Usage per key summed over the hours starting at or after `since_ms`.
    pub async fn key_usage_since(&self, since_ms: i64) -> anyhow::Result<Vec<KeyUsage>> {
        let sql = "SELECT MIN(hour_start) AS hour_start_ms, source, kid, alg, \
                   CAST(SUM(verified_count) AS BIGINT) AS verified_count, \
                   MAX(last_verified_at) AS last_verified_at_ms \
                   FROM key_usage_hourly WHERE hour_start >= $1 \
                   GROUP BY source, kid, alg ORDER BY source, kid, alg";
        let usage = with_pool!(self, |pool| {
            sqlx::query_as(sql).bind(since_ms).fetch_all(pool).await
        })
        .context("reading key usage")?;
        Ok(usage)
    }

    /// Notes that verifications have been counted since `first_ms` (kept when earlier than the
    /// time held). Written before the counts it covers: a failure between the two leaves a true
    /// statement, never counts without their evidence.
    pub async fn note_usage_evidence(&self, first_ms: i64) -> anyhow::Result<()> {
        let sql = "INSERT INTO usage_evidence (id, first_verified_at) VALUES (1, $1) \
                   ON CONFLICT (id) DO UPDATE SET first_verified_at = \
                   CASE WHEN excluded.first_verified_at < usage_evidence.first_verified_at \
                   THEN excluded.first_verified_at ELSE usage_evidence.first_verified_at END";
        self.execute(sql, &[first_ms.into()])
            .await
            .context("recording since when usage is counted")?;
        Ok(())
    }

    /// Adds `count` verifications to those left out of the evidence (an instance's buffer was
    /// full), the last at `last_ms`. With no evidence recorded yet, it starts at that drop: no
    /// verdict can be safe before a whole window has passed after it anyway.
    pub async fn note_dropped_usage(&self, count: i64, last_ms: i64) -> anyhow::Result<()> {
        let sql = "INSERT INTO usage_evidence (id, first_verified_at, dropped_count, last_dropped_at) \
                   VALUES (1, $2, $1, $2) ON CONFLICT (id) DO UPDATE SET \
                   dropped_count = usage_evidence.dropped_count + excluded.dropped_count, \
                   last_dropped_at = CASE WHEN usage_evidence.last_dropped_at IS NULL \
                   OR excluded.last_dropped_at > usage_evidence.last_dropped_at \
                   THEN excluded.last_dropped_at ELSE usage_evidence.last_dropped_at END";
        self.execute(sql, &[count.into(), last_ms.into()])
            .await
            .context("recording verifications left out of the usage evidence")?;
        Ok(())
    }

    /// The verifications every instance left out of the evidence: how many, and the last one's
    /// time (ms); `None` when none was.
    pub async fn dropped_usage(&self) -> anyhow::Result<Option<(i64, i64)>> {
        let sql = "SELECT dropped_count, last_dropped_at FROM usage_evidence \
                   WHERE id = 1 AND last_dropped_at IS NOT NULL";
        let dropped: Option<(i64, i64)> = with_pool!(self, |pool| {
            sqlx::query_as(sql).fetch_optional(pool).await
        })
        .context("reading verifications left out of the usage evidence")?;
        Ok(dropped)
    }

    /// How far back the evidence goes (ms): the earliest verification counted (for counts from
    /// before that was recorded, the end of the earliest hour with usage), but no earlier than
    /// the highest cutoff of a pruning pass ([`Store::raise_usage_evidence`]): the counts are
    /// complete from there only, whatever a flush noted since.
    pub async fn usage_evidence_since(&self) -> anyhow::Result<Option<i64>> {
        let (first, complete) = self.usage_evidence_bounds().await?;
        Ok(first.map(|first| complete.map_or(first, |complete| first.max(complete))))
    }

    /// The two bounds [`Store::usage_evidence_since`] takes the later of: the earliest
    /// verification counted (as it reads it), and `complete_since`, from when the counts are
    /// complete (a pruning pass's cutoff, or when an instance found another that ended holding
    /// counts), no earlier count is evidence, not even one an instance still holds.
    pub async fn usage_evidence_bounds(&self) -> anyhow::Result<(Option<i64>, Option<i64>)> {
        let sql = "SELECT (SELECT MIN(since) FROM (\
                   SELECT first_verified_at AS since FROM usage_evidence WHERE first_verified_at < $1 \
                   UNION ALL SELECT MIN(hour_start) + 3600000 AS since FROM key_usage_hourly\
                   ) AS evidence) AS since, \
                   (SELECT complete_since FROM usage_evidence WHERE id = 1) AS complete_since";
        let (first, complete): (Option<i64>, Option<i64>) = with_pool!(self, |pool| {
            sqlx::query_as(sql)
                .bind(NONE_COUNTED_YET)
                .fetch_one(pool)
                .await
        })
        .context("reading key usage")?;
        Ok((first, complete))
    }

    /// Records that the usage counts are complete from `before_ms` on (`complete_since`, only
    /// ever raised), and moves `first_verified_at` up to it when earlier (what builds before that
    /// column read): the hours before it are about to be deleted. Normally that is 31 days ago,
    /// beyond any window, and no verdict changes. A wall clock running weeks ahead prunes hours
    /// still inside the window once it is set right: the evidence then starts at that cutoff,
    /// and the verdict waits a whole window after it ("recorded for less than the window")
    /// instead of calling revocation safe on counts with a hole in them. Another instance's
    /// flush during the pass notes its own first count in `first_verified_at`, earlier than the
    /// cutoff after such a clock, and the pass may then delete those counts: only
    /// `complete_since` keeps the start, since no flush writes it. With no row yet one is
    /// written, its `first_verified_at` the end of the earliest hour stored (counts from builds
    /// before `usage_evidence`), raised to the cutoff likewise, or none counted yet
    /// ([`NONE_COUNTED_YET`]) when no hour is.
    pub async fn raise_usage_evidence(&self, before_ms: i64) -> anyhow::Result<()> {
        // SQLite reads `ON CONFLICT` after a `SELECT ... FROM t` as a join's: hence the WHERE.
        let sql = "INSERT INTO usage_evidence (id, first_verified_at, complete_since) \
                   SELECT 1, CASE WHEN MIN(hour_start) IS NULL THEN $2 \
                   WHEN MIN(hour_start) + 3600000 < $1 THEN $1 \
                   ELSE MIN(hour_start) + 3600000 END, $1 FROM key_usage_hourly WHERE TRUE \
                   ON CONFLICT (id) DO UPDATE SET \
                   first_verified_at = CASE WHEN usage_evidence.first_verified_at < $1 \
                   THEN $1 ELSE usage_evidence.first_verified_at END, \
                   complete_since = CASE WHEN usage_evidence.complete_since IS NULL \
                   OR usage_evidence.complete_since < $1 \
                   THEN $1 ELSE usage_evidence.complete_since END";
        self.execute(sql, &[before_ms.into(), NONE_COUNTED_YET.into()])
            .await
            .context("recording from when the usage counts are complete")?;
        Ok(())
    }

    /// Runs one of the store's statements with `args`; returns the rows it wrote.
    async fn execute(&self, sql: &str, args: &[Arg<'_>]) -> Result<u64, sqlx::Error> {
        with_pool!(self, |pool| engine::run(pool, sql, args).await)
    }

    /// Writes `upserts` in one transaction, each one's rows in the order given: rows a
    /// statement locks must come in one fixed order (see [`hourly_batch`]).
    async fn execute_upserts(&self, upserts: &[Upsert<'_>]) -> Result<(), sqlx::Error> {
        with_pool!(self, |pool| engine::run_upserts(pool, None, upserts).await)
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        with_pool!(self, |pool| pool.close().await)
    }
}

/// The statement of [`Store::add_key_usage`] and its rows.
fn key_usage_batch(rows: &[KeyUsage]) -> anyhow::Result<Upsert<'_>> {
    let rows = rows.iter().map(|row| HourlyCount {
        hour_start_ms: row.hour_start_ms,
        key: vec![&row.source, &row.kid, &row.alg],
        verified_count: row.verified_count,
        last_verified_at_ms: row.last_verified_at_ms,
    });
    hourly_batch("key_usage_hourly", &["source", "kid", "alg"], rows)
}

/// The statement that adds `rows` to the hourly counts of `table`, keyed by the hour and
/// `key_columns` (the counts are summed and the latest verification kept, whichever instance
/// wrote first), and its rows, in the order of their keys whatever order they come in. Rows of
/// the same hour and key are summed into one first, as writing them one after the other would
/// leave them: one statement may not update a row twice on PostgreSQL (21000, "ON CONFLICT DO
/// UPDATE command cannot affect row a second time"). A sum past `i64::MAX` is refused, as
/// PostgreSQL refuses it in the table ("bigint out of range").
fn hourly_batch<'a>(
    table: &str,
    key_columns: &[&str],
    rows: impl Iterator<Item = HourlyCount<'a>>,
) -> anyhow::Result<Upsert<'a>> {
    let keys = key_columns.join(", ");
    let head =
        format!("INSERT INTO {table} (hour_start, {keys}, verified_count, last_verified_at)");
    let tail = format!(
        "ON CONFLICT (hour_start, {keys}) DO UPDATE SET \
         verified_count = {table}.verified_count + excluded.verified_count, \
         last_verified_at = CASE WHEN excluded.last_verified_at > {table}.last_verified_at \
         THEN excluded.last_verified_at ELSE {table}.last_verified_at END"
    );
    // PostgreSQL locks each row as the batch's one transaction upserts it (in the order of a
    // statement's `VALUES`, the statements in turn): two instances flushing the same keys, each
    // in the order its own map held them, would lock them in opposite orders and deadlock
    // (40P01): one batch refused, and at a stop its counts lost. With one order for every
    // batch, whoever writes it, they queue instead.
    let mut rows: Vec<HourlyCount<'a>> = rows.collect();
    rows.sort_unstable_by(|a, b| (a.hour_start_ms, &a.key).cmp(&(b.hour_start_ms, &b.key)));
    let mut merged: Vec<HourlyCount<'a>> = Vec::with_capacity(rows.len());
    for row in rows {
        match merged.last_mut() {
            Some(last) if (last.hour_start_ms, &last.key) == (row.hour_start_ms, &row.key) => {
                last.verified_count = last
                    .verified_count
                    .checked_add(row.verified_count)
                    .with_context(|| format!("{table}: a count past the largest integer"))?;
                last.last_verified_at_ms = last.last_verified_at_ms.max(row.last_verified_at_ms);
            }
            _ => merged.push(row),
        }
    }
    let rows: Vec<Vec<Arg<'_>>> = merged
        .into_iter()
        .map(|row| {
            let mut args = vec![row.hour_start_ms.into()];
            args.extend(row.key.into_iter().map(Arg::from));
            args.extend([
                Arg::from(row.verified_count),
                row.last_verified_at_ms.into(),
            ]);
            args
        })
        .collect();
    Ok(Upsert { head, tail, rows })
}

/// One row for [`hourly_batch`]: an hour, the values of the table's key columns, and the counts.
struct HourlyCount<'a> {
    hour_start_ms: i64,
    key: Vec<&'a str>,
    verified_count: i64,
    last_verified_at_ms: i64,
}

/// `usage_evidence.first_verified_at` of a row a pruning pass wrote before any count was noted:
/// none yet. Every count noted is earlier and replaces it ([`Store::note_usage_evidence`] keeps
/// the earliest); nothing reads it as a time.
const NONE_COUNTED_YET: i64 = i64::MAX;

/// How often [`Store::wait_until_ready`] looks again.
const READY_POLL: Duration = Duration::from_secs(1);

/// How long the readiness probe waits for the database.
const READINESS_TIMEOUT: Duration = Duration::from_secs(2);

/// The `locks` row the readiness probe writes and deletes in one transaction to learn whether
/// the disk has space ([`Store::space_refused`]): a name no lock uses, never seen committed.
const SPACE_CHECK_LOCK: &str = "edgegate.readiness.space-check";

/// Writes and deletes the probe's row on `conn`, inside the caller's transaction.
async fn write_space_check_row<DB: engine::Engine>(
    conn: &mut DB::Connection,
) -> Result<(), sqlx::Error> {
    use engine::Execute as _;
    let insert = "INSERT INTO locks (name, holder, acquired_at, expires_at) \
                  VALUES ($1, $1, 0, 0)";
    for sql in [insert, "DELETE FROM locks WHERE name = $1"] {
        sqlx::query::<DB>(sql)
            .bind_value(SPACE_CHECK_LOCK)
            .execute(conn.executor())
            .await?;
    }
    Ok(())
}

/// The longest one write of the store's runs before it succeeds or fails, on either engine:
/// the wait for a pool connection (connecting included), then the statement's own bound
/// (SQLite's busy timeout, the wait for another connection's write lock; PostgreSQL's
/// `statement_timeout`, its lock waits included). 18 s, PostgreSQL's. Only a server that stops
/// answering mid-statement, its connection left open, is bounded by neither.
pub const LONGEST_WRITE_TRY: Duration = {
    let sqlite = sqlite::ACQUIRE_TIMEOUT.as_secs() + sqlite::BUSY_TIMEOUT.as_secs();
    let postgres = postgres::ACQUIRE_TIMEOUT.as_secs() + postgres::STATEMENT_TIMEOUT.as_secs();
    Duration::from_secs(if sqlite > postgres { sqlite } else { postgres })
};

/// Whether `err` says the database could not be reached or written at all (connection lost or
/// refused, pool exhausted, file locked by another process, no space left), as opposed to a
/// failed statement. Nothing was written then, so the caller may answer 503 and be retried. A
/// write refused for want of space is counted for the readiness probe ([`SPACE_REFUSALS`]).
pub fn is_unavailable(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<sqlx::Error>()
            .is_some_and(sqlx_unavailable)
    })
}

fn sqlx_unavailable(err: &sqlx::Error) -> bool {
    match err {
        // A connection the server (or a proxy) closes mid-handshake shows as a protocol error.
        sqlx::Error::Io(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            if out_of_space(db.as_ref()) {
                if matches!(engine_of(db.as_ref()), Engine::Postgres { .. }) {
                    LAST_POSTGRES_SPACE_REFUSAL
                        .store(elapsed_ms().saturating_add(1), Ordering::Release);
                }
                SPACE_REFUSALS.fetch_add(1, Ordering::AcqRel);
            }
            let engine = engine_of(db.as_ref());
            db.code()
                .is_some_and(|code| unavailable_code(&code, engine))
        }
        _ => false,
    }
}

/// Whether the database's storage refused a write: for want of space, SQLite's FULL (13,
/// "database or disk is full") and PostgreSQL's 53100 disk_full ("could not extend file …: No
/// space left on device"); or a SQLite file that cannot be written, READONLY (8, "attempt to
/// write a readonly database": a filesystem remounted read-only after an error). Neither stops
/// the readiness probe's write lock.
fn out_of_space(db: &dyn sqlx::error::DatabaseError) -> bool {
    db.code()
        .is_some_and(|code| out_of_space_code(&code, engine_of(db)))
}

fn out_of_space_code(code: &str, engine: Engine) -> bool {
    match engine {
        Engine::Sqlite => code
            .parse::<i32>()
            .is_ok_and(|sqlite| matches!(sqlite & 0xff, 8 | 13)),
        Engine::Postgres { .. } => code == "53100",
    }
}

/// What `/readyz` says of a write the storage refused ([`out_of_space`]).
fn storage_refusal_said(db: &dyn sqlx::error::DatabaseError) -> String {
    let read_only = matches!(engine_of(db), Engine::Sqlite)
        && db
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            .is_some_and(|sqlite| sqlite & 0xff == 8);
    if read_only {
        format!(
            "the database file cannot be written (a read-only filesystem or file): {}",
            db.message()
        )
    } else {
        format!(
            "the database's disk is full: writes are refused for want of space ({})",
            db.message()
        )
    }
}

fn engine_of(db: &dyn sqlx::error::DatabaseError) -> Engine {
    match db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        Some(pg) => Engine::Postgres {
            fatal: pg.severity() == sqlx::postgres::PgSeverity::Fatal,
        },
        None => Engine::Sqlite,
    }
}

/// The engine a database error came from; for PostgreSQL, whether it was FATAL: the session it
/// ended, or refused at connection, is gone, which an ERROR in a statement never means.
#[derive(Clone, Copy, Debug)]
enum Engine {
    Sqlite,
    Postgres { fatal: bool },
}

/// SQLite result codes (their primary part: BUSY, LOCKED, READONLY, IOERR, FULL, CANTOPEN) and
/// PostgreSQL SQLSTATEs (classes 08 connection exception, 53 insufficient resources, 57P0x
/// shutdown, 57P03 among them for a server starting up; 55P03, a lock not taken within
/// `lock_timeout`; 25P03, a session the server ended for idling in its transaction, which it
/// rolled back; 25006, a write in a read-only transaction: a hot standby until its failover
/// ends, a Supabase database made read-only until its full disk is grown; 57014, a statement
/// cancelled, by `statement_timeout` or an operator, and rolled back) that mean "not now"
/// rather than "never". 57014 is a 503 like the rest, not a 504: it is the database that was
/// slow or busy (a lock held, a load), as with 55P03, and nothing was written, so the caller
/// (Stripe) retries later, as for any other outage.
/// Told apart by engine, not by the code's shape: many SQLSTATEs are all digits (08006, 53300),
/// and read as SQLite's numbers they meant nothing, so a PostgreSQL with too many clients was a
/// 500 rather than a 503.
///
/// PostgreSQL's 55000 (object not in prerequisite state) counts only when FATAL: that is how a
/// database closed to connections (`ALTER DATABASE … ALLOW_CONNECTIONS false`) refuses a new
/// session, while a 55000 in a statement (an ERROR: `currval` before `nextval`, say) is a fault
/// of the statement that a retry would meet again. 3D000 (no such database) is a configuration
/// to fix, not an outage, and stays a 500. So, FATAL only, are class 58 (system error: an I/O
/// error on the server's own files) and XX000: a server whose disk is full refuses every new
/// session with `could not write init file` (its relation cache file), an `elog(FATAL)`, whose
/// code is XX000; the configuration's refusals (28P01, 28000, 3D000) have codes of their own.
fn unavailable_code(code: &str, engine: Engine) -> bool {
    let Engine::Postgres { fatal } = engine else {
        return code
            .parse::<i32>()
            .is_ok_and(|sqlite| matches!(sqlite & 0xff, 5 | 6 | 8 | 10 | 13 | 14));
    };
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P0")
        || matches!(code, "55P03" | "25P03" | "25006" | "57014")
        || (fatal && (code == "55000" || code == "XX000" || code.starts_with("58")))
}

/// Whether `err` says the database refused the values written (PostgreSQL class 22, data
/// exception, such as U+0000 in text, which it stores nowhere; SQLite TOOBIG, MISMATCH; a value
/// sqlx cannot encode): the same values are refused whenever they are written again, while
/// other writes go through.
pub fn is_refused_value(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<sqlx::Error>()
            .is_some_and(|err| match err {
                sqlx::Error::Encode(_) => true,
                sqlx::Error::Database(db) => refused_by_database(db.as_ref()),
                _ => false,
            })
    })
}

/// By engine, not by the code's shape: PostgreSQL's SQLSTATEs are often all digits too.
fn refused_by_database(db: &dyn sqlx::error::DatabaseError) -> bool {
    let Some(code) = db.code() else {
        return false;
    };
    // Only what a value alone brings about: class 22 (data exception) on PostgreSQL, TOOBIG and
    // MISMATCH on SQLite. Not a constraint (PostgreSQL's class 23, SQLite's CONSTRAINT): a NOT
    // NULL or foreign key broken by every row is the schema's problem, not one event's.
    if db
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .is_some()
    {
        code.starts_with("22")
    } else {
        code.parse::<i32>()
            .is_ok_and(|sqlite| matches!(sqlite & 0xff, 18 | 20))
    }
}

/// How long the migration lock is waited for before the wait is logged, and then how often.
const LOCK_WAIT_SAID_AFTER: Duration = Duration::from_secs(2);
const LOCK_WAIT_SAID_EVERY: Duration = Duration::from_secs(30);

/// What a process waits for the migration lock to do.
#[derive(Clone, Copy)]
enum LockWait {
    /// Apply the migrations.
    Migration,
    /// Set up a new SQLite database file (not there yet or with no pages): any process starting
    /// on one, `serve --no-migrate` too, which applies nothing.
    SetUp,
}

/// Waits for `lock` (the migration lock, which another process may hold), however long, saying
/// so while it waits: `serve` answers nothing until its migrations are applied, /healthz
/// included, and an `edgegate migrate` on another Machine can hold the lock for minutes. Both
/// engines' locks: PostgreSQL's advisory lock, SQLite's file beside the database. Returns
/// whether it said it waits: the caller's line on what it does once it has the lock follows that
/// line, and only it (judged again on another clock, a lock taken just under
/// [`LOCK_WAIT_SAID_AFTER`] could print it with no wait said before it).
async fn wait_for_migration_lock(
    lock: impl Future<Output = anyhow::Result<()>>,
    what: LockWait,
) -> anyhow::Result<bool> {
    let started = tokio::time::Instant::now();
    tokio::pin!(lock);
    let mut say_at = started + LOCK_WAIT_SAID_AFTER;
    let mut said = false;
    loop {
        match tokio::time::timeout_at(say_at, &mut lock).await {
            Ok(locked) => {
                locked?;
                break;
            }
            Err(_) => {
                let waited_s = started.elapsed().as_secs();
                match what {
                    LockWait::Migration => tracing::warn!(
                        waited_s,
                        "waiting for another process's migrations (the migration lock is held); \
                         nothing that needs the database is served until they are applied"
                    ),
                    LockWait::SetUp => tracing::warn!(
                        waited_s,
                        "waiting to set up the new database file: another process holds the \
                         migration lock (setting the file up or migrating it); nothing that \
                         needs the database is served until then"
                    ),
                }
                said = true;
                say_at += LOCK_WAIT_SAID_EVERY;
            }
        }
    }
    // The set-up wait's caller says what it does once it has the lock: the process that held
    // it may have set the file up meanwhile (`sqlite::set_up_lock`).
    if said && matches!(what, LockWait::Migration) {
        tracing::info!(
            waited_s = started.elapsed().as_secs(),
            "the migration lock is taken; applying what is left"
        );
    }
    Ok(said)
}

/// The versions applied so far (for a migration, read once it holds the lock): none when the
/// table of migrations is not there yet.
fn applied_before(read: Result<Vec<i64>, sqlx::Error>) -> anyhow::Result<Vec<i64>> {
    match read {
        Ok(applied) => Ok(applied),
        Err(err) if is_undefined_table(&err) => Ok(Vec::new()),
        Err(err) => Err(err).context("reading applied migrations"),
    }
}

/// One reading of the applied migrations ([`Store::read_migrations`]).
#[derive(Debug)]
pub struct MigrationsRead {
    /// How many of this binary's migrations the database lacks.
    pub missing: usize,
    /// The applied ones this binary does not ship, oldest first ([`Store::migrations_unknown`]).
    pub unknown: Vec<i64>,
}

/// What [`applied_before`] reads.
const APPLIED_SQL: &str = "SELECT version FROM _sqlx_migrations WHERE success = TRUE";

/// `Store::migrations_missing` while the applied migrations have not been read.
const MIGRATIONS_UNREAD: usize = usize::MAX;

/// A query on a table that does not exist: `_sqlx_migrations` in a database never migrated
/// (PostgreSQL's SQLSTATE 42P01; SQLite has no code of its own for it, only its message).
pub(super) fn is_undefined_table(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => {
            db.code().as_deref() == Some("42P01") || db.message().starts_with("no such table")
        }
        _ => false,
    }
}

/// The migration versions and names shipped for each backend, for the test that keeps them equal.
pub fn shipped_migrations() -> [(BackendKind, Vec<(i64, String)>); 2] {
    let list = |migrator: &sqlx::migrate::Migrator| {
        migrator
            .iter()
            .map(|m| (m.version, m.description.to_string()))
            .collect()
    };
    [
        (BackendKind::Sqlite, list(&sqlite::migrator())),
        (BackendKind::Postgres, list(&postgres::migrator())),
    ]
}

/// The SHA-384 of each shipped migration (hex) by version, for the test that pins them: a
/// database that applied a migration refuses to start a binary whose copy of it differs.
pub fn shipped_checksums() -> [(BackendKind, Vec<(i64, String)>); 2] {
    let list = |migrator: &sqlx::migrate::Migrator| {
        migrator
            .iter()
            .map(|m| {
                let hex = m.checksum.iter().map(|b| format!("{b:02x}")).collect();
                (m.version, hex)
            })
            .collect()
    };
    [
        (BackendKind::Sqlite, list(&sqlite::migrator())),
        (BackendKind::Postgres, list(&postgres::migrator())),
    ]
}

#[cfg(test)]
mod tests {
    use super::{Engine, out_of_space_code, unavailable_code};

    /// What makes the readiness probe write a row: SQLite's FULL (and its extended codes),
    /// PostgreSQL's disk_full; not another resource running out, nor a SQLite code read as a
    /// SQLSTATE.
    /// PostgreSQL stays not ready for the hold after the last refusal, whatever its probe's
    /// small row does, and only then asks the row again; never before any refusal.
    #[test]
    fn a_refusal_for_want_of_space_is_held_for_a_while() {
        use super::{SPACE_REFUSAL_HOLD, space_refusal_held};
        let hold = u64::try_from(SPACE_REFUSAL_HOLD.as_millis()).unwrap();
        assert_eq!(space_refusal_held(None, 5_000), None);
        assert_eq!(
            space_refusal_held(Some(1_000), 3_500),
            Some(std::time::Duration::from_millis(2_500))
        );
        assert_eq!(space_refusal_held(Some(1_000), 1_000 + hold), None);
        // A clock read before the refusal was stored (another thread) is no time ago.
        assert_eq!(
            space_refusal_held(Some(9_000), 8_000),
            Some(std::time::Duration::ZERO)
        );
    }

    #[test]
    fn a_write_refused_for_want_of_space_is_told_apart() {
        let pg = Engine::Postgres { fatal: false };
        assert!(out_of_space_code("53100", pg));
        for code in ["53000", "53200", "53300", "53400", "XX000", "13"] {
            assert!(!out_of_space_code(code, pg), "PostgreSQL {code}");
        }
        // FULL, and READONLY with its extended codes (a filesystem remounted read-only after an
        // error, a file made read-only): the write lock is still taken on both.
        for code in ["13", "8", "264", "1032"] {
            assert!(out_of_space_code(code, Engine::Sqlite), "SQLite {code}");
        }
        for code in ["5", "10", "778", "14", "53100"] {
            assert!(!out_of_space_code(code, Engine::Sqlite), "SQLite {code}");
        }
    }

    #[test]
    fn unavailable_codes_are_read_by_engine() {
        let (error, fatal) = (
            Engine::Postgres { fatal: false },
            Engine::Postgres { fatal: true },
        );
        for code in [
            "08006", "08001", "53300", "53100", "57P01", "57P03", "55P03", "25P03", "25006",
            "57014",
        ] {
            assert!(unavailable_code(code, error), "PostgreSQL {code}");
        }
        // A database closed to connections refuses a session with a FATAL 55000.
        assert!(unavailable_code("55000", fatal), "PostgreSQL FATAL 55000");
        // The same code from a statement is the statement's fault; no such database is a
        // configuration's.
        for code in [
            "23505", "22021", "42P01", "40P01", "55000", "55006", "3D000",
        ] {
            assert!(!unavailable_code(code, error), "PostgreSQL {code}");
        }
        assert!(!unavailable_code("3D000", fatal), "PostgreSQL FATAL 3D000");
        // A server that can no longer write its own files (its disk full) refuses every new
        // session: `elog(FATAL, "could not write init file")` is XX000, an I/O error 58030.
        for code in ["XX000", "58030"] {
            assert!(unavailable_code(code, fatal), "PostgreSQL FATAL {code}");
            assert!(!unavailable_code(code, error), "PostgreSQL {code}");
        }
        // Refusals of the configuration (bad password, no such role or database) stay faults.
        for code in ["28P01", "28000", "3D000", "42501"] {
            assert!(!unavailable_code(code, fatal), "PostgreSQL FATAL {code}");
        }
        // BUSY, LOCKED, READONLY, IOERR_WRITE (778), FULL, CANTOPEN.
        for code in ["5", "6", "8", "778", "13", "14"] {
            assert!(unavailable_code(code, Engine::Sqlite), "SQLite {code}");
        }
        // CONSTRAINT_UNIQUE, ERROR; an SQLSTATE never comes from SQLite.
        for code in ["2067", "1", "53300", "55000"] {
            assert!(!unavailable_code(code, Engine::Sqlite), "SQLite {code}");
        }
    }
}
