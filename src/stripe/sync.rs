//! The catalogue sync: every product and price, active or not, listed page by page and written
//! page by page (one transaction each); after a *complete* listing, rows Stripe no longer returns
//! are deactivated. One sync at a time across all instances (`Job::CatalogueSync`).
//!
//! Stripe's product list holds archived products too, but its price list holds only active
//! prices unless asked for `active=false` (and no value lists both): prices are listed twice,
//! active then archived. A price whose `active` changed between the two listings is in neither,
//! so before deactivating, every price neither returned is asked for by id: one Stripe still
//! has is written as it is now; only one it answers 404 for is deactivated.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::clock::Clock;
use crate::store::{AuditEntry, Job, LockHeld, PriceRow, ProductRow, Store, SyncCounts, SyncLock};
use crate::stripe::StripeMetrics;
use crate::stripe::client::{Listed, Pages, StripeClient, StripeError};
use crate::stripe::objects::{Price, Product};
use crate::stripe::reconcile::Trigger;

/// How long the lock outlives its holder's last heartbeat (every 10 s while the run lives, and
/// after every page): a SQLite row's lease (five beats may fail, to a database busy for that
/// long, before another process can take it), and how long PostgreSQL lets the lock's session
/// sit idle before ending it. So a lock left by a killed, stopped or frozen process blocks the
/// next run for at most this.
const LOCK_TTL: Duration = Duration::from_secs(60);

/// How many times one resource's listing starts over after the object it was to continue after
/// vanished, before the sync fails as for any refused request.
const MAX_RESTARTS: u32 = 3;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ResourceCounts {
    pub seen: i64,
    pub upserted: i64,
    pub deactivated: i64,
}

/// The contract's answer to a sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct SyncReport {
    pub products: ResourceCounts,
    pub prices: ResourceCounts,
    pub duration_ms: u64,
}

impl SyncReport {
    fn new(counts: &SyncCounts, duration: Duration) -> Self {
        Self {
            products: ResourceCounts {
                seen: counts.products_seen,
                upserted: counts.products_upserted,
                deactivated: counts.products_deactivated,
            },
            prices: ResourceCounts {
                seen: counts.prices_seen,
                upserted: counts.prices_upserted,
                deactivated: counts.prices_deactivated,
            },
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The lock is held: by a run going on, or (SQLite) by one that stopped without releasing it.
    #[error("{}", .0.describe("catalogue sync"))]
    InProgress(LockHeld),
    /// Stripe failed after retries; what was written so far stays, nothing was deactivated.
    #[error(
        "{error}; run {run_id} stopped after {}, and deactivated nothing: run it again",
        progress(.counts)
    )]
    Upstream {
        run_id: String,
        counts: SyncCounts,
        error: StripeError,
    },
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// A stopped run's counts, for a person: `100 products seen, 0 written; 0 prices seen, 0 written`.
fn progress(counts: &SyncCounts) -> String {
    format!(
        "{} products seen, {} written; {} prices seen, {} written",
        counts.products_seen, counts.products_upserted, counts.prices_seen, counts.prices_upserted
    )
}

impl SyncError {
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::InProgress(_) => "in_progress",
            Self::Upstream { .. } => "upstream_error",
            Self::Internal(_) => "error",
        }
    }
}

/// Why a walk through Stripe's pages (a sync, a reconciliation) stopped early.
pub(crate) enum Stop {
    Upstream(StripeError),
    Internal(anyhow::Error),
}

impl From<anyhow::Error> for Stop {
    fn from(err: anyhow::Error) -> Self {
        Self::Internal(err)
    }
}

impl Stop {
    /// The run row's `outcome` and `error` for a walk that ended so.
    pub(crate) fn outcome<T>(walked: &Result<T, Stop>) -> (&'static str, Option<String>) {
        match walked {
            Ok(_) => ("ok", None),
            Err(Self::Upstream(error)) => ("upstream_error", Some(error.to_string())),
            Err(Self::Internal(err)) => ("error", Some(crate::error::causes(err))),
        }
    }
}

/// Runs one sync as `holder` (names the instance in the SQLite lock row).
/// A sync a caller asked for: run in its own task, audited with `audit`, counted in `metrics`.
pub async fn run_for_caller(
    store: Store,
    client: StripeClient,
    clock: Clock,
    audit: AuditEntry,
    metrics: &StripeMetrics,
) -> Result<SyncReport, SyncError> {
    let (job_store, holder) = (store.clone(), super::lock_holder(&audit));
    let job = async move { run(&job_store, &client, &clock, &holder).await };
    let metrics = metrics.clone();
    let finish = move |result: &Result<_, _>| {
        let outcome = result.as_ref().map_or_else(SyncError::outcome, |_| "ok");
        metrics.sync_run(Trigger::Manual, outcome);
    };
    super::run_for_caller(
        store,
        audit,
        job,
        SyncError::outcome,
        SyncError::Internal,
        finish,
    )
    .await
}

pub async fn run(
    store: &Store,
    client: &StripeClient,
    clock: &Clock,
    holder: &str,
) -> Result<SyncReport, SyncError> {
    let started = clock.now();
    let started_at = clock.now_ms();
    let run_id = uuid::Uuid::now_v7().to_string();
    let locked = async |lock: &mut SyncLock| {
        run_locked(store, client, clock, lock, &run_id, started_at).await
    };
    let result = store
        .with_job_lock(Job::CatalogueSync, holder, clock, LOCK_TTL, locked)
        .await?
        .map_err(SyncError::InProgress)?;
    result.map(|counts| SyncReport::new(&counts, clock.now().saturating_duration_since(started)))
}

/// The longest wait before a failed sync of rows of earlier builds is tried again, and the wait
/// after Stripe refused the key for it (a restricted key without read access to products and
/// prices is refused alike every time).
const REWRITE_RETRY_MAX: Duration = Duration::from_secs(86_400);

/// The longest the sync of rows of earlier builds waits for its listing to count as of the
/// newest of them (`until_listed_as_of`): a row of an event Stripe stamped in this second needs
/// up to 2 s, and `page_as_of` allows Stripe's clock a second behind ours, so 3 s.
const REWRITE_AS_OF_WAIT_MAX: Duration = Duration::from_secs(3);

/// How long after `now_ms` a page asked for counts as of `as_of` or later (`page_as_of`), so
/// that the rows it lists overwrite a row holding state as of `as_of`; zero when one asked for
/// now does.
fn until_listed_as_of(as_of: i64, now_ms: i64) -> Duration {
    // page_as_of(t) >= as_of  <=>  t / 1000 >= ceil((as_of + 1) / 1000) + 1 (whole seconds).
    let after = as_of.saturating_add(1);
    let second = after
        .div_euclid(1000)
        .saturating_add(i64::from(after.rem_euclid(1000) != 0))
        .saturating_add(1);
    let at = second.saturating_mul(1000);
    Duration::from_millis(u64::try_from(at.saturating_sub(now_ms)).unwrap_or(0))
}

/// The newest as-of that a listing asked for within `REWRITE_AS_OF_WAIT_MAX` of `now_ms`
/// counts as of (`page_as_of`): the newest state of a row that the wait for it covers
/// (`until_listed_as_of` at most the cap).
fn newest_covered_by_the_wait(now_ms: i64) -> i64 {
    let max_wait_ms = i64::try_from(REWRITE_AS_OF_WAIT_MAX.as_millis()).unwrap_or(i64::MAX);
    page_as_of(now_ms.saturating_add(max_wait_ms))
}

/// Why a sync of rows of earlier builds failed, for when it is tried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RewriteFailure {
    /// Stripe refused the key (401/403).
    KeyRefused,
    /// What the next try may not meet: Stripe away past the retries (5xx, 429, no answer), a
    /// listing's cursor gone past the restarts, the database, the lock lost.
    Transient,
    /// What the next try meets alike: a 400, an answer past the size limit, a broken listing.
    Alike,
}

impl RewriteFailure {
    fn of(err: &SyncError) -> Self {
        match err {
            SyncError::Upstream { error, .. } => match error {
                StripeError::KeyRefused(_) => Self::KeyRefused,
                StripeError::Unavailable { .. } | StripeError::CursorGone(_) => Self::Transient,
                StripeError::Rejected(_)
                | StripeError::NotFound(_)
                | StripeError::BrokenListing(_) => Self::Alike,
            },
            SyncError::InProgress(_) | SyncError::Internal(_) => Self::Transient,
        }
    }

    /// How long after the `failures`-th failed try in a row (1 for the first) the next may come,
    /// for the periodic task that checks every `interval`: a day for a refused key; else from one
    /// interval, doubling with each failure, up to a day; a transient failure's first try is
    /// repeated after the next run, as soon as it comes.
    fn retry_after(self, failures: u32, interval: Duration) -> Duration {
        let doublings = match self {
            Self::KeyRefused => return REWRITE_RETRY_MAX,
            Self::Transient if failures <= 1 => return Duration::ZERO,
            Self::Transient => failures - 2,
            Self::Alike => failures.saturating_sub(1),
        };
        let factor = 1u32.checked_shl(doublings).unwrap_or(u32::MAX);
        interval.saturating_mul(factor).min(REWRITE_RETRY_MAX)
    }
}

/// The periodic task's sync of catalogue rows an earlier build wrote last (a rolling deploy runs
/// it beside this one, a rollback alone): it wrote them without the columns it does not know,
/// which kept an earlier value or none while the row looked current, and neither a redelivery
/// (a duplicate) nor a reconciliation (already applied) writes them again. The sync does, from
/// Stripe. After a failed sync the next waits (`RewriteFailure::retry_after`): one failing alike
/// every time (a 400, an answer past the size limit, a broken listing) was otherwise tried after
/// every periodic run, listing the catalogue for nothing, by one instance after another.
#[derive(Debug)]
pub struct RewriteOfEarlierBuilds {
    /// How often the periodic task checks.
    interval: Duration,
    /// Failed syncs in a row, the last one's failure and the rows it had to rewrite.
    failures: u32,
    failure: Option<RewriteFailure>,
    rows: i64,
    /// No sync before this, after a failed one.
    not_before: Option<Instant>,
    /// The newest state stamped ahead of this host's clock already warned of (kept through a
    /// reset, so each distinct case is warned of once, not at every check).
    warned_ahead: Option<i64>,
}

impl RewriteOfEarlierBuilds {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            failures: 0,
            failure: None,
            rows: 0,
            not_before: None,
            warned_ahead: None,
        }
    }

    /// As after a sync that succeeded: no failure to wait after, what was warned of kept.
    fn reset(&mut self) {
        *self = Self {
            warned_ahead: self.warned_ahead,
            ..Self::new(self.interval)
        };
    }

    /// Called at start and after each periodic reconciliation: runs the sync when the catalogue
    /// holds rows of earlier builds, unless it failed and its wait is not over (more rows than it
    /// had to rewrite, a new deploy or rollback, ends the wait but a refused key's). A sync
    /// run is counted in `metrics` as started by the periodic task; one that fails is logged.
    pub async fn check(
        &mut self,
        store: &Store,
        client: &StripeClient,
        clock: &Clock,
        holder: &str,
        metrics: &StripeMetrics,
    ) {
        let rows = match store.catalogue_rows_by_earlier_builds().await {
            Ok(0) => {
                self.reset();
                return;
            }
            Ok(rows) => rows,
            Err(err) => {
                tracing::warn!(
                    error = crate::error::causes(&err),
                    "cannot tell whether an earlier build wrote catalogue rows; the next check \
                     tries again"
                );
                return;
            }
        };
        // More rows than the failed sync had to rewrite: an earlier build writing (a new deploy
        // or rollback). Fewer is this build's own writes (webhooks, reconciliations, the failed
        // sync's first pages), which are no reason to try again before the wait is over.
        let rows_rose = rows > self.rows && self.failure != Some(RewriteFailure::KeyRefused);
        if rows_rose {
            self.failures = 0;
        } else if self.not_before.is_some_and(|at| clock.now() < at) {
            tracing::debug!(
                rows,
                "catalogue sync for rows of earlier builds waits after failing"
            );
            return;
        }
        tracing::info!(
            rows,
            "catalogue rows were last written by an earlier build (columns it does not know may \
             be out of date); syncing the catalogue from Stripe"
        );
        // A page counts as of the second before it was asked for (`page_as_of`), and leaves a
        // row holding newer state as it is: a row the earlier build wrote for an event of this
        // second or the last, just before this check, would be left for the next one, an
        // interval later. So the listing starts once it counts as of the newest of them that a
        // wait of at most `REWRITE_AS_OF_WAIT_MAX` covers. The guard is kept whole: the wait only
        // lets the sync ask Stripe after those events.
        let now_ms = clock.now_ms();
        let covered = newest_covered_by_the_wait(now_ms);
        match store.newest_as_of_by_earlier_builds(covered).await {
            Ok(as_of) => {
                // Stamped ahead of this host's clock (the earlier build's ran ahead, or this
                // one's runs behind): no listing is newer before the clock passes it, so no wait
                // helps; the sync waits for the other rows only, and rewrites them.
                if let Some(newest) = as_of.newest.filter(|&newest| newest > covered)
                    && self.warned_ahead != Some(newest)
                {
                    self.warned_ahead = Some(newest);
                    tracing::warn!(
                        ahead_s = newest.saturating_sub(now_ms).saturating_add(999) / 1000,
                        "catalogue rows of earlier builds hold state stamped up to ahead_s ahead of \
                         this host's clock, newer than any listing from Stripe until the clock \
                         passes it: they stay as that build wrote them until then, and a sync \
                         after it (a periodic check, or run the sync) rewrites them; check the \
                         clocks of the hosts (NTP) of both builds"
                    );
                }
                let wait = as_of.newest_up_to.map_or(Duration::ZERO, |newest| {
                    until_listed_as_of(newest, clock.now_ms()).min(REWRITE_AS_OF_WAIT_MAX)
                });
                if !wait.is_zero() {
                    tracing::debug!(
                        wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                        "catalogue sync for rows of earlier builds waits for Stripe's listing to \
                         be newer than them"
                    );
                    tokio::time::sleep(wait).await;
                }
            }
            // The sync rewrites what it can without it; the rest waits for the next check.
            Err(err) => tracing::warn!(
                error = crate::error::causes(&err),
                "cannot tell how new the catalogue rows of earlier builds are; syncing now"
            ),
        }
        let result = run(store, client, clock, holder).await;
        let outcome = result.as_ref().map_or_else(SyncError::outcome, |_| "ok");
        metrics.sync_run(Trigger::Periodic, outcome);
        let err = match result {
            Ok(report) => {
                let left = store.catalogue_rows_by_earlier_builds().await;
                log_rewritten(&report, left);
                self.reset();
                return;
            }
            Err(SyncError::InProgress(_)) => {
                tracing::debug!(
                    "catalogue sync for rows of earlier builds skipped: another one runs"
                );
                return;
            }
            Err(err) => err,
        };
        let failure = RewriteFailure::of(&err);
        self.failures = self.failures.saturating_add(1);
        self.failure = Some(failure);
        self.rows = rows;
        let wait = failure.retry_after(self.failures, self.interval);
        self.not_before = Some(clock.now() + wait);
        let hint = if failure == RewriteFailure::KeyRefused {
            " (a restricted key needs read access to products and prices)"
        } else {
            ""
        };
        tracing::warn!(
            error = format!("{err:#}"),
            failures = self.failures,
            retry_in_s = wait.as_secs(),
            "catalogue sync for rows of earlier builds failed{hint}; tried again after the first \
             periodic run retry_in_s or more from now (0: the next), or run the sync"
        );
    }
}

/// The line that closes a sync of rows of earlier builds that succeeded, given the count of
/// such rows `left` after it.
fn log_rewritten(report: &SyncReport, left: anyhow::Result<i64>) {
    // Rows written since the listing began (an earlier build still running beside this one) or
    // holding state newer than it (stamped ahead of this host's clock) are left for a later
    // check, and said so rather than "rewritten".
    match left {
        Ok(0) => tracing::info!(
            products_written = report.products.upserted,
            prices_written = report.prices.upserted,
            "catalogue rows of earlier builds rewritten"
        ),
        Ok(left) => tracing::info!(
            products_written = report.products.upserted,
            prices_written = report.prices.upserted,
            rows_left = left,
            "catalogue rows of earlier builds rewritten but rows_left, written by an earlier \
             build since the listing or holding state newer than it, left for a later check"
        ),
        // The sync succeeded; whether it left any row is unknown, and the next check counts.
        Err(err) => tracing::warn!(
            products_written = report.products.upserted,
            prices_written = report.prices.upserted,
            error = crate::error::causes(&err),
            "catalogue sync for rows of earlier builds done, but cannot tell whether it left any \
             (rows an earlier build wrote since the listing or holding state newer than it); the \
             next check counts them again"
        ),
    }
}

async fn run_locked(
    store: &Store,
    client: &StripeClient,
    clock: &Clock,
    lock: &mut SyncLock,
    run_id: &str,
    started_at: i64,
) -> Result<SyncCounts, SyncError> {
    store.start_sync_run(run_id, started_at).await?;
    let mut counts = SyncCounts::default();
    let walked = walk(store, client, clock, lock, run_id, started_at, &mut counts).await;
    let (outcome, error) = Stop::outcome(&walked);
    store
        .record_sync_run(
            run_id,
            &counts,
            Some((clock.now_ms(), outcome, error.as_deref())),
        )
        .await?;
    walked.map(|()| counts).map_err(|stop| match stop {
        Stop::Upstream(error) => SyncError::Upstream {
            run_id: run_id.to_owned(),
            counts,
            error,
        },
        Stop::Internal(err) => err.into(),
    })
}

/// A listed resource the sync writes: how it is listed, stored and counted.
trait Catalogued: DeserializeOwned + Listed {
    const RESOURCE: &'static str;
    /// The listings that together return every object, each as its filters.
    const LISTINGS: &'static [&'static [(&'static str, &'static str)]];
    type Row: Sync;
    fn to_row(&self, as_of: i64) -> Self::Row;
    fn write(
        store: &Store,
        rows: &[Self::Row],
        now: i64,
    ) -> impl Future<Output = anyhow::Result<u64>> + Send;
    /// The (seen, upserted) counters of this resource.
    fn counters(counts: &mut SyncCounts) -> (&mut i64, &mut i64);
}

impl Catalogued for Product {
    const RESOURCE: &'static str = "products";
    /// Active and archived alike.
    const LISTINGS: &'static [&'static [(&'static str, &'static str)]] = &[&[]];
    type Row = ProductRow;
    fn to_row(&self, as_of: i64) -> ProductRow {
        self.row(as_of, None)
    }
    fn write(
        store: &Store,
        rows: &[ProductRow],
        now: i64,
    ) -> impl Future<Output = anyhow::Result<u64>> + Send {
        store.sync_catalogue_page(rows, now)
    }
    fn counters(counts: &mut SyncCounts) -> (&mut i64, &mut i64) {
        (&mut counts.products_seen, &mut counts.products_upserted)
    }
}

impl Catalogued for Price {
    const RESOURCE: &'static str = "prices";
    /// Without `active`, Stripe lists active prices only; archived ones are still in use by
    /// subscriptions and must not look deleted. Each listing expands `tiers` and
    /// `currency_options` (`Price::INCLUDABLE`), which Stripe leaves out of a price unless asked
    /// for (in a list, under `data.`).
    const LISTINGS: &'static [&'static [(&'static str, &'static str)]] = &[
        &[
            ("active", "true"),
            ("expand[]", "data.tiers"),
            ("expand[]", "data.currency_options"),
        ],
        &[
            ("active", "false"),
            ("expand[]", "data.tiers"),
            ("expand[]", "data.currency_options"),
        ],
    ];
    type Row = PriceRow;
    fn to_row(&self, as_of: i64) -> PriceRow {
        self.row(as_of, None)
    }
    fn write(
        store: &Store,
        rows: &[PriceRow],
        now: i64,
    ) -> impl Future<Output = anyhow::Result<u64>> + Send {
        store.sync_catalogue_page(rows, now)
    }
    fn counters(counts: &mut SyncCounts) -> (&mut i64, &mut i64) {
        (&mut counts.prices_seen, &mut counts.prices_upserted)
    }
}

/// Lists and writes both resources, then deactivates what the complete listing did not return.
async fn walk(
    store: &Store,
    client: &StripeClient,
    clock: &Clock,
    lock: &mut SyncLock,
    run_id: &str,
    started_at: i64,
    counts: &mut SyncCounts,
) -> Result<(), Stop> {
    let products = walk_resource::<Product>(store, client, clock, lock, run_id, started_at, counts);
    let products_since = products.await?;
    let prices = walk_resource::<Price>(store, client, clock, lock, run_id, started_at, counts);
    let prices_since = prices.await?;
    recheck_unseen_prices(store, client, clock, lock, run_id, prices_since, counts).await?;
    // Only here is the listing known to be complete; an interrupted one deactivates nothing.
    // Every page of the complete pass of a resource was asked for after its `since` (the sync's
    // start, or the last start over): the absence holds as of the page stamp of that moment, so
    // only an event newer than that may bring a row back (one of that very second may, until
    // the deletion's own event, of that second or later, is applied), and a sync run again
    // within that second, which lists the row again, does. Not the sync's start for a listing
    // started over: what only its abandoned pass wrote is as of a later page, and would be left.
    let (products, prices) = store
        .deactivate_unseen(
            products_since,
            prices_since,
            clock.now_ms(),
            page_as_of(products_since),
            page_as_of(prices_since),
        )
        .await?;
    counts.products_deactivated = count(products);
    counts.prices_deactivated = count(prices);
    Ok(())
}

/// Every page of one resource (of each of its listings), each written in its own transaction as
/// soon as it arrives. A Stripe failure (after the client's retries) stops the walk as an upstream
/// error, except a vanished cursor object: then the resource is listed again from its first page
/// (writes are idempotent), at most `MAX_RESTARTS` times. Returns the time from which the
/// complete listing stamped what it saw: rows of the resource stamped before it were not listed.
async fn walk_resource<T: Catalogued>(
    store: &Store,
    client: &StripeClient,
    clock: &Clock,
    lock: &mut SyncLock,
    run_id: &str,
    started_at: i64,
    counts: &mut SyncCounts,
) -> Result<i64, Stop> {
    let mut since = started_at;
    let mut stamped = started_at;
    let mut restarts = 0;
    loop {
        let before = *counts;
        let walked = list_resource::<T>(
            store,
            client,
            clock,
            lock,
            run_id,
            counts,
            since,
            &mut stamped,
        );
        match walked.await {
            Err(Stop::Upstream(StripeError::CursorGone(reason))) if restarts < MAX_RESTARTS => {
                restarts += 1;
                tracing::warn!(
                    resource = T::RESOURCE,
                    restarts,
                    reason,
                    "a Stripe listing's cursor object vanished; listing it again from the start"
                );
                // Seen counts each object once; what was written stays written.
                let mut earlier = before;
                *T::counters(counts).0 = *T::counters(&mut earlier).0;
                // Strictly after every stamp of the abandoned pass, so what only it saw (the
                // vanished object) counts as unseen.
                since = clock.now_ms().max(stamped + 1);
            }
            walked => return walked.map(|()| since),
        }
    }
}

/// Every price not deactivated that the two listings did not return, asked for by id: one
/// Stripe still has (its `active` changed between the listings) is written as it is now and
/// counts as seen; one Stripe answers 404 for stays unseen, to be deactivated. Any other failure
/// stops the sync before anything is deactivated.
async fn recheck_unseen_prices(
    store: &Store,
    client: &StripeClient,
    clock: &Clock,
    lock: &mut SyncLock,
    run_id: &str,
    since: i64,
    counts: &mut SyncCounts,
) -> Result<(), Stop> {
    for id in store.unseen_prices(since).await? {
        let asked_at = clock.now_ms();
        let price = client.retrieve_expanded::<Price>(Price::RESOURCE, &id, &Price::INCLUDABLE);
        match price.await {
            Ok(price) => {
                let row = price.to_row(page_as_of(asked_at));
                let now = clock.now_ms().max(since);
                let upserted = count(Price::write(store, &[row], now).await?);
                counts.prices_seen += 1;
                counts.prices_upserted += upserted;
                tracing::info!(
                    price = id,
                    "a price neither price listing returned is still in Stripe; kept"
                );
            }
            Err(StripeError::NotFound(_)) => {}
            Err(error) => return Err(Stop::Upstream(error)),
        }
        checkpoint(store, clock, lock, run_id, counts).await?;
    }
    Ok(())
}

/// One pass through every listing of a resource; rows are stamped no earlier than `since`, and
/// `stamped` keeps the latest stamp written.
#[allow(clippy::too_many_arguments)]
async fn list_resource<T: Catalogued>(
    store: &Store,
    client: &StripeClient,
    clock: &Clock,
    lock: &mut SyncLock,
    run_id: &str,
    counts: &mut SyncCounts,
    since: i64,
    stamped: &mut i64,
) -> Result<(), Stop> {
    for filters in T::LISTINGS {
        let filters = filters
            .iter()
            .map(|(name, value)| (*name, (*value).to_owned()))
            .collect();
        let mut pages = Pages::<T>::filtered(client, T::RESOURCE, filters);
        loop {
            let asked_at = clock.now_ms();
            let Some(page) = pages.next().await.map_err(Stop::Upstream)? else {
                break;
            };
            let as_of = page_as_of(asked_at);
            let rows: Vec<T::Row> = page.iter().map(|object| object.to_row(as_of)).collect();
            let now = clock.now_ms().max(since);
            let upserted = count(T::write(store, &rows, now).await?);
            *stamped = (*stamped).max(now);
            let (seen, written) = T::counters(counts);
            *seen += len(&rows);
            *written += upserted;
            checkpoint(store, clock, lock, run_id, counts).await?;
        }
    }
    Ok(())
}

/// When a page's state counts as true, against webhook events' `created` (ms): a millisecond
/// before the start of the second before it was asked for. Stripe stamps an event with whole
/// seconds, so an update made while the page was being served, or after, has an event of that
/// second or later, which is newer than the page: applied over it, and never overwritten by it
/// however late the page is written. A page can hold the state from before an event of its own
/// second (served stale, or asked for by a host whose clock runs ahead of Stripe's); written
/// over that event, the older state stayed for good, the event being in the ledger already.
/// An event of that second may also be older than the page; applying it loses nothing, since
/// any later change the page showed has an event of its own, of that second (which then ties
/// with the first, settled by asking Stripe) or later. The millisecond below the second is what
/// tells a page's row from an event's: pages of one second (a sync run again within it, a
/// price asked for by id after the listings) overwrite one another, the later one being the
/// newer listing, while an event's row of that second is newer than any of them. Stamped with
/// the time the page arrived instead, an event of the page's second was older than the page,
/// recorded and dropped. The second before allows this host's clock to run up to a second ahead
/// of Stripe's.
fn page_as_of(asked_at_ms: i64) -> i64 {
    (asked_at_ms.div_euclid(1000) - 1) * 1000 - 1
}

/// Keeps the lock and leaves the counts so far in the run's row, so a crash mid-run still shows
/// how far it got.
async fn checkpoint(
    store: &Store,
    clock: &Clock,
    lock: &mut SyncLock,
    run_id: &str,
    counts: &SyncCounts,
) -> anyhow::Result<()> {
    lock.renew(clock.now_ms()).await?;
    store.record_sync_run(run_id, counts, None).await
}

fn len<T>(rows: &[T]) -> i64 {
    i64::try_from(rows.len()).unwrap_or(i64::MAX)
}

fn count(rows: u64) -> i64 {
    i64::try_from(rows).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A count of the rows left that fails says so, and does not claim every row rewritten.
    #[test]
    fn a_rewrite_whose_rows_left_cannot_be_counted_does_not_claim_them_all_rewritten() {
        let report = SyncReport::new(
            &SyncCounts {
                products_upserted: 2,
                prices_upserted: 3,
                ..SyncCounts::default()
            },
            Duration::ZERO,
        );
        let logged = |left: anyhow::Result<i64>| {
            let lines = crate::telemetry::LogLines::default();
            let _default = tracing::subscriber::set_default(lines.tracing_subscribers_json());
            log_rewritten(&report, left);
            let text = lines.text();
            assert_eq!(text.lines().count(), 1, "{text}");
            serde_json::from_str::<serde_json::Value>(&text).unwrap()
        };
        let line = logged(Err(anyhow::anyhow!("database is locked")
            .context("counting the catalogue rows earlier builds wrote")));
        assert_eq!(line["level"], "WARN", "{line}");
        let message = line["message"].as_str().unwrap();
        assert_ne!(
            message, "catalogue rows of earlier builds rewritten",
            "{line}"
        );
        assert!(message.contains("cannot tell"), "{line}");
        let error = line["error"].as_str().unwrap();
        assert!(
            error.contains("counting the catalogue rows") && error.contains("database is locked"),
            "{line}"
        );
        assert_eq!(
            (
                line["products_written"].as_i64(),
                line["prices_written"].as_i64()
            ),
            (Some(2), Some(3))
        );

        let line = logged(Ok(0));
        assert_eq!(
            line["message"], "catalogue rows of earlier builds rewritten",
            "{line}"
        );
        let line = logged(Ok(4));
        assert_eq!(line["rows_left"], 4, "{line}");
    }

    /// The wait ends at the first millisecond whose page counts as of the row's state.
    #[test]
    fn the_rewrite_waits_until_a_page_counts_as_of_the_newest_row() {
        for as_of in [
            5_000,
            5_001,
            5_999,
            4_999,
            page_as_of(7_250),
            -1,
            -1_000,
            -1_001,
        ] {
            for now in as_of - 4_000..as_of + 4_000 {
                let wait = i64::try_from(until_listed_as_of(as_of, now).as_millis()).unwrap();
                assert!(page_as_of(now + wait) >= as_of, "as_of {as_of}, now {now}");
                if wait > 0 {
                    assert!(
                        page_as_of(now + wait - 1) < as_of,
                        "as_of {as_of}, now {now}"
                    );
                }
                // The rows a wait of at most the cap covers: those up to this bound.
                assert_eq!(
                    wait <= 3_000,
                    as_of <= newest_covered_by_the_wait(now),
                    "as_of {as_of}, now {now}"
                );
            }
        }
        // The bound's edges: a wait of exactly the cap is covered, a millisecond more is not.
        assert_eq!(newest_covered_by_the_wait(3_999), 4_999);
        assert_eq!(newest_covered_by_the_wait(4_000), 5_999);
        // An event of this second: up to 2 s.
        assert_eq!(until_listed_as_of(5_000, 5_000), Duration::from_secs(2));
        assert_eq!(until_listed_as_of(5_000, 6_999), Duration::from_millis(1));
        assert_eq!(until_listed_as_of(5_000, 7_000), Duration::ZERO);
        assert_eq!(
            until_listed_as_of(i64::MAX, 0),
            Duration::from_millis(i64::MAX as u64)
        );
        assert_eq!(until_listed_as_of(i64::MIN, 0), Duration::ZERO);
    }

    #[test]
    fn a_failed_rewrite_waits_longer_each_time_up_to_a_day() {
        let hour = Duration::from_secs(3600);
        let waits = |failure: RewriteFailure| {
            (1..=7)
                .map(|n| failure.retry_after(n, hour).as_secs() / 3600)
                .collect::<Vec<_>>()
        };
        assert_eq!(waits(RewriteFailure::Alike), [1, 2, 4, 8, 16, 24, 24]);
        assert_eq!(waits(RewriteFailure::Transient), [0, 1, 2, 4, 8, 16, 24]);
        assert_eq!(waits(RewriteFailure::KeyRefused), [24; 7]);
        let day = REWRITE_RETRY_MAX;
        assert_eq!(RewriteFailure::Alike.retry_after(u32::MAX, hour), day);
        assert_eq!(RewriteFailure::Alike.retry_after(1, 25 * day), day);
    }
}
