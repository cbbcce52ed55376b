//! Reconciliation: walk Stripe's event list (`GET /v1/events`, newest first) and feed every event
//! through the webhook's own `webhook::apply`, so an event the endpoint never received (down,
//! wrong `whsec_`, disabled in the dashboard) is applied exactly once, and one it did receive is
//! skipped. One run at a time across all instances (`Job::Reconcile`), each recorded in
//! `reconcile_runs` with the last event it handled.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::clock::Clock;
use crate::store::{self, AuditEntry, Job, LockHeld, ReconcileCounts, Store, SyncLock};
use crate::stripe::StripeMetrics;
use crate::stripe::client::{Pages, StripeClient, StripeError};
use crate::stripe::objects::Event;
use crate::stripe::sync::{RewriteOfEarlierBuilds, Stop};
use crate::stripe::webhook::{self, Outcome, WebhookError};

/// How long the lock outlives its holder's last heartbeat (every 10 s while the run lives, and
/// after every page): a SQLite row's lease (five beats may fail, to a database busy for that
/// long, before another process can take it), and how long PostgreSQL lets the lock's session
/// sit idle before ending it. So a lock left by a killed, stopped or frozen process blocks the
/// next run for at most this.
const LOCK_TTL: Duration = Duration::from_secs(60);
/// How many times a run goes on from its last event's second after the event a page was to
/// start after vanished (aged out of Stripe's retention), before it fails as for any refused
/// request.
const MAX_RESTARTS: u32 = 3;
/// Stripe keeps events for 30 days: nothing older can be listed.
pub const RETENTION_SECONDS: i64 = 30 * 86_400;
/// How far before the start of the last covering run a default run starts, for events Stripe
/// created before that start but listed only later.
pub const OVERLAP_SECONDS: i64 = 3_600;
/// How far after now a covering run without Stripe's time (from an earlier build, or whose
/// answer had no `Date`) may be stamped and still count: another instance's clock a little fast.
/// The overlap absorbs a start stamped this much late; one stamped later was made while a wall
/// clock ran ahead, since set back, and covers nothing (see `disown_coverage_after`).
pub(crate) const STAMPED_AHEAD_MS: i64 = 60_000;

/// Who started a run (stored in `reconcile_runs.started_by`, a metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Trigger {
    Manual,
    Periodic,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Manual => "manual",
            Self::Periodic => "periodic",
        }
    }
}

/// The contract's answer to a reconciliation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ReconcileReport {
    pub events: ReconcileCounts,
    /// The start of the listed window, unix seconds (`created[gte]`).
    pub since: i64,
    pub duration_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The lock is held: by a run going on, or (SQLite) by one that stopped without releasing it.
    #[error("{}", .0.describe("reconciliation"))]
    InProgress(LockHeld),
    /// Stripe failed after retries; what was applied stays applied.
    #[error(
        "{error}; run {run_id} stopped after {} events seen: {} applied, {} already applied, \
         {} ignored; run it again to finish (what was applied stays applied)",
        .counts.seen, .counts.applied, .counts.already_applied, .counts.ignored
    )]
    Upstream {
        run_id: String,
        counts: ReconcileCounts,
        error: StripeError,
    },
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ReconcileError {
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::InProgress(_) => "in_progress",
            Self::Upstream { .. } => "upstream_error",
            Self::Internal(_) => "error",
        }
    }
}

/// The window's start when the caller gives none: an hour before `covered` (ms), how far the
/// newest successful continuous run listed (Stripe's time when it answered that run's first
/// page; the run's start for runs from earlier builds), so consecutive runs overlap and leave no gap, whatever
/// ran between (a failed run, a manual one over a narrower window); Stripe's whole retention
/// when no run covers anything yet. Never earlier than the retention, nor later than an hour
/// before now (a coverage stamped ahead of our clock).
pub fn default_since(covered: Option<i64>, now_s: i64) -> i64 {
    let oldest = now_s - RETENTION_SECONDS;
    covered.map_or(oldest, |ms| {
        (ms.div_euclid(1000).min(now_s) - OVERLAP_SECONDS).max(oldest)
    })
}

/// The events a default window could not list (unix seconds, `from..to`): those between the
/// window the coverage asked for and Stripe's retention, which aged out before this run (runs
/// failed, or stopped, for longer than the retention less the overlap). `None` when the window
/// reaches back as far as the coverage asks. The run still starts the coverage afresh from the
/// retention (nothing older can be listed by anyone); the gap is reported, not hidden.
pub fn aged_out(covered: Option<i64>, now_s: i64) -> Option<(i64, i64)> {
    let oldest = now_s - RETENTION_SECONDS;
    let wanted = covered?.div_euclid(1000) - OVERLAP_SECONDS;
    (wanted < oldest).then_some((wanted, oldest))
}

/// Whether a run over `since..` extends the coverage `covered` (see [`default_since`]): its
/// window reaches back to the default one, or to Stripe's retention.
fn continues(since: i64, covered: Option<i64>, now_s: i64) -> bool {
    since <= default_since(covered, now_s)
}

/// A `since` as written in the request's JSON, read as whole unix seconds: an integer, or a
/// number written with a fraction or an exponent whose value is whole (`1700000000.0`, as
/// Python's `json` writes a float; JSON Schema counts it as an integer too). `Err` names the
/// rule and what was given instead (never the value).
pub fn since_seconds(json: &str) -> Result<i64, String> {
    const RULE: &str = "must be an integer of unix seconds";
    let json = json.trim();
    let not = |given: &str| format!("{RULE}, not {given}");
    match json.as_bytes().first() {
        Some(b'-' | b'0'..=b'9') => {}
        Some(b'"') => return Err(not("a string")),
        Some(b't' | b'f') => return Err(not("a boolean")),
        Some(b'[') => return Err(not("an array")),
        Some(b'{') => return Err(not("an object")),
        _ => return Err(not("null")),
    }
    let out_of_range = || format!("{RULE}; the number given is out of range");
    if json.bytes().all(|b| b == b'-' || b.is_ascii_digit()) {
        // An integer literal: read exactly (serde_json would round one out of range to a float).
        return json.parse::<i64>().map_err(|_| out_of_range());
    }
    let value: f64 = json.parse().map_err(|_| not("a number"))?;
    // 2^63, exactly a float: i64 takes [-2^63, 2^63). Past a float's range, `value` is infinite.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    if !(-LIMIT..LIMIT).contains(&value) {
        return Err(out_of_range());
    }
    if value.fract() != 0.0 {
        return Err(format!("{RULE}; the number given has a fraction"));
    }
    // Whole and in range: the cast is exact.
    #[allow(clippy::cast_possible_truncation)]
    Ok(value as i64)
}

/// A requested `since` (unix seconds), checked: `Err` names the rule it breaks. An earlier one
/// than Stripe keeps is moved up to the retention limit (the answer's `since` says so).
pub fn requested_since(since: i64, now_s: i64) -> Result<i64, String> {
    if since > now_s {
        return Err("must not be in the future".to_owned());
    }
    Ok(since.max(now_s - RETENTION_SECONDS))
}

/// Runs one reconciliation as `holder` (names the instance in the SQLite lock row) from `since`
/// (unix seconds), or from `default_since` when `None`.
/// A reconciliation a caller asked for: run in its own task, audited with `audit`, counted in
/// `metrics`.
pub async fn run_for_caller(
    store: Store,
    client: StripeClient,
    clock: Clock,
    since: Option<i64>,
    audit: AuditEntry,
    metrics: &ReconcileMetrics,
) -> Result<ReconcileReport, ReconcileError> {
    let (job_store, holder) = (store.clone(), super::lock_holder(&audit));
    let job =
        async move { run(&job_store, &client, &clock, &holder, Trigger::Manual, since).await };
    let outcome_of = ReconcileError::outcome;
    let metrics = metrics.clone();
    let finish = move |result: &Result<_, _>| metrics.record(Trigger::Manual, result);
    super::run_for_caller(
        store,
        audit,
        job,
        outcome_of,
        ReconcileError::Internal,
        finish,
    )
    .await
}

pub async fn run(
    store: &Store,
    client: &StripeClient,
    clock: &Clock,
    holder: &str,
    trigger: Trigger,
    since: Option<i64>,
) -> Result<ReconcileReport, ReconcileError> {
    let started = clock.now();
    let started_at = clock.now_ms();
    let locked = async |lock: &mut SyncLock| {
        // Read under the lock, so it sees every run that finished before this one.
        for (run, stamped) in store
            .disown_coverage_after(
                started_at.saturating_add(STAMPED_AHEAD_MS),
                started_at.saturating_add(OVERLAP_SECONDS * 1000),
            )
            .await?
        {
            tracing::warn!(
                run = run.as_str(),
                covered_until = stamped,
                now = started_at,
                "a reconciliation whose coverage is after now (stamped while the wall clock was \
                 ahead, since set back, or dated by a clock in front of Stripe that far ahead of \
                 ours) no longer counts as covering anything: the default window starts from the \
                 last run before it"
            );
        }
        let covered = store.reconcile_coverage().await?;
        let now_s = started_at.div_euclid(1000);
        if since.is_none()
            && let Some((from, to)) = aged_out(covered, now_s)
        {
            tracing::warn!(
                from,
                to,
                "Stripe events created between these times (unix seconds) aged out of its 30-day \
                 retention before a reconciliation could list them; run the catalogue sync and \
                 check subscriptions and invoices in the Stripe dashboard"
            );
        }
        let since = since.unwrap_or_else(|| default_since(covered, now_s));
        let window = Window {
            since,
            started_at,
            continuous: continues(since, covered, now_s),
        };
        let events = run_locked(store, client, clock, lock, trigger, window).await?;
        Ok(ReconcileReport {
            events,
            since,
            duration_ms: u64::try_from(clock.now().saturating_duration_since(started).as_millis())
                .unwrap_or(u64::MAX),
        })
    };
    store
        .with_job_lock(Job::Reconcile, holder, clock, LOCK_TTL, locked)
        .await?
        .map_err(ReconcileError::InProgress)?
}

/// What a run lists: events from `since` (unix seconds), as of `started_at` (ms); `continuous`
/// when it reaches back to the coverage before it.
struct Window {
    since: i64,
    started_at: i64,
    continuous: bool,
}

async fn run_locked(
    store: &Store,
    client: &StripeClient,
    clock: &Clock,
    lock: &mut SyncLock,
    trigger: Trigger,
    window: Window,
) -> Result<ReconcileCounts, ReconcileError> {
    let run_id = uuid::Uuid::now_v7().to_string();
    let Window {
        since,
        started_at,
        continuous,
    } = window;
    store
        .start_reconcile_run(&run_id, trigger.as_str(), since, started_at, continuous)
        .await?;
    let mut progress = Progress::default();
    let walked = walk(store, client, clock, lock, &run_id, since, &mut progress).await;
    let (outcome, error) = Stop::outcome(&walked);
    let Progress {
        counts,
        last_event,
        left_behind,
        covered_until,
        ..
    } = progress;
    if left_behind > 0 {
        tracing::warn!(
            run = run_id,
            left_behind,
            "reconciliation left events for a later run, which lists this window again"
        );
    }
    store
        .record_reconcile_run(
            &run_id,
            &counts,
            last_event.as_deref(),
            left_behind == 0,
            covered_until,
            Some((clock.now_ms(), outcome, error.as_deref())),
        )
        .await?;
    walked.map(|()| counts).map_err(|stop| match stop {
        Stop::Upstream(error) => ReconcileError::Upstream {
            run_id,
            counts,
            error,
        },
        Stop::Internal(err) => err.into(),
    })
}

/// How far a run got: its counts, the last event it handled, how many of the events it
/// skipped a later run may yet apply (while any is, the run covers nothing), and how far its
/// listing reached.
#[derive(Default)]
struct Progress {
    counts: ReconcileCounts,
    last_event: Option<String>,
    left_behind: i64,
    /// Stripe's time (epoch ms, its `Date`) when it answered the run's first page: events are
    /// listed newest first and later pages (and a listing started again from a boundary) only
    /// go back in time, so the run lists every event Stripe had created by then. Our wall
    /// clock says nothing of that when it is wrong.
    covered_until: Option<i64>,
    /// Whether a page was answered yet.
    answered: bool,
}

/// Why applying a listed event failed, when the reason is the event's own: its object could
/// not be read (a later build may read it), Stripe refused the fetch of its object (a 4xx it
/// did not ask to retry, other than the key's 401 or 403), or the database refused its values
/// (a value out of what a column takes; U+0000, which PostgreSQL stores nowhere in text, never
/// gets this far: `objects::without_nul`). Stopping there would stop every later run there too,
/// short of every older event; skipped, it is left for a later run, which may apply it once the
/// cause is fixed: the window holds back to it until then, for at most the 30 days Stripe lists
/// an event, so no event keeps every run from covering for longer. `None` for anything else,
/// which would fail every event after it too and ends the run: an outage (the database away,
/// Stripe not answering after retries), or a key Stripe refuses (a restricted key without a
/// permission would otherwise have every event of that kind skipped, run after run, each run
/// answered 200).
fn own_failure(err: &WebhookError) -> Option<String> {
    match err {
        WebhookError::Unreadable(reason) => Some(reason.clone()),
        WebhookError::Upstream { error, .. }
            if !matches!(
                error,
                StripeError::Unavailable { .. } | StripeError::KeyRefused(_)
            ) =>
        {
            Some(err.to_string())
        }
        WebhookError::Store(cause) if store::is_refused_value(cause) => {
            Some(crate::error::causes(cause))
        }
        _ => None,
    }
}

/// Every page of events since `since`, each event applied as a webhook delivery would be; after
/// each page the lock is renewed and the run row shows the counts and the last event handled.
/// Only the types `webhook::apply` acts on are listed (`types[]`).
///
/// Events are listed newest first. When the event a page was to continue after is gone (400 on
/// `starting_after`: at the old end of a 30-day window, it aged out of Stripe's retention while
/// the run walked), the walk goes on with the events up to the second of the last one handled
/// (`created[lte]`), skipping those of that second it already handled, at most `MAX_RESTARTS`
/// times; then it fails as for any refused request.
async fn walk(
    store: &Store,
    client: &StripeClient,
    clock: &Clock,
    lock: &mut SyncLock,
    run_id: &str,
    since: i64,
    progress: &mut Progress,
) -> Result<(), Stop> {
    let mut resume: Option<Boundary> = None;
    let mut restarts = 0;
    loop {
        let mut filters = vec![("created[gte]", since.to_string())];
        if let Some(boundary) = &resume {
            filters.push(("created[lte]", boundary.created.to_string()));
        }
        filters.extend(
            webhook::APPLIED_EVENT_TYPES
                .iter()
                .map(|kind| ("types[]", (*kind).to_owned())),
        );
        let pages = Pages::<Event>::filtered(client, "events", filters);
        match walk_pages(
            store,
            client,
            clock,
            lock,
            run_id,
            pages,
            progress,
            &mut resume,
        )
        .await
        {
            Err(Stop::Upstream(StripeError::CursorGone(reason)))
                if restarts < MAX_RESTARTS && resume.is_some() =>
            {
                restarts += 1;
                tracing::warn!(
                    run = run_id,
                    restarts,
                    reason,
                    "the event a page of Stripe's event list was to start after is gone; \
                     listing on from the second of the last event handled"
                );
            }
            walked => return walked,
        }
    }
}

/// The second of the last event handled, and the events of that second handled so far: where a
/// walk goes on after its cursor vanished.
struct Boundary {
    created: i64,
    handled: std::collections::HashSet<String>,
}

#[allow(clippy::too_many_arguments)]
async fn walk_pages(
    store: &Store,
    client: &StripeClient,
    clock: &Clock,
    lock: &mut SyncLock,
    run_id: &str,
    mut pages: Pages<'_, Event>,
    progress: &mut Progress,
    boundary: &mut Option<Boundary>,
) -> Result<(), Stop> {
    let Progress {
        counts,
        last_event,
        left_behind,
        covered_until,
        answered,
    } = progress;
    while let Some(page) = pages.next().await.map_err(Stop::Upstream)? {
        if !*answered {
            *answered = true;
            *covered_until = pages.answered_at();
        }
        for event in &page {
            match boundary {
                Some(b) if b.created == event.created && b.handled.contains(&event.id) => continue,
                Some(b) if b.created == event.created => {
                    b.handled.insert(event.id.clone());
                }
                _ => {
                    *boundary = Some(Boundary {
                        created: event.created,
                        handled: std::iter::once(event.id.clone()).collect(),
                    });
                }
            }
            counts.seen += 1;
            match webhook::apply(store, Some(client), event, clock.now_ms()).await {
                Ok(Outcome::Applied) => counts.applied += 1,
                Ok(Outcome::Ignored | Outcome::Foreign(_)) => counts.ignored += 1,
                Ok(Outcome::Duplicate) => counts.already_applied += 1,
                Err(err) => {
                    let Some(reason) = own_failure(&err) else {
                        return Err(match err {
                            WebhookError::Upstream { error, .. } => Stop::Upstream(error),
                            err => Stop::Internal(anyhow::Error::new(err)),
                        });
                    };
                    tracing::warn!(
                        event = event.id,
                        reason,
                        "listed event skipped; a later run lists it again"
                    );
                    counts.ignored += 1;
                    *left_behind += 1;
                }
            }
            *last_event = Some(event.id.clone());
        }
        lock.renew(clock.now_ms()).await?;
        store
            .record_reconcile_run(
                run_id,
                counts,
                last_event.as_deref(),
                *left_behind == 0,
                *covered_until,
                None,
            )
            .await?;
    }
    Ok(())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    started_by: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    result: &'static str,
}

/// The results of `edgegate_stripe_reconcile_events`, in `ReconcileCounts`' order.
const EVENT_RESULTS: [&str; 3] = ["applied", "already_applied", "ignored"];

/// Reconciliation metrics: runs by trigger and outcome, listed events by what became of them.
#[derive(Clone, Debug, Default)]
pub struct ReconcileMetrics {
    runs: Family<RunLabels, Counter>,
    events: Family<EventLabels, Counter>,
}

impl ReconcileMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "stripe_reconcile_runs",
            "Stripe reconciliations, by who started them (manual, periodic) and outcome \
             (ok, in_progress, upstream_error, error)",
            self.runs.clone(),
        );
        registry.register(
            "stripe_reconcile_events",
            "Events listed by reconciliations, by result (applied, already_applied, ignored)",
            self.events.clone(),
        );
        // At 0 from the start (see `StripeMetrics::register`).
        for started_by in [Trigger::Manual, Trigger::Periodic] {
            for outcome in super::metrics::SYNC_OUTCOMES {
                drop(self.runs.get_or_create(&RunLabels {
                    started_by: started_by.as_str(),
                    outcome,
                }));
            }
        }
        for result in EVENT_RESULTS {
            drop(self.events.get_or_create(&EventLabels { result }));
        }
    }

    /// Counts one run; the events of a run that stopped midway are counted too.
    pub fn record(&self, trigger: Trigger, result: &Result<ReconcileReport, ReconcileError>) {
        let (outcome, counts) = match result {
            Ok(report) => ("ok", Some(report.events)),
            Err(ReconcileError::Upstream { counts, .. }) => ("upstream_error", Some(*counts)),
            Err(err) => (err.outcome(), None),
        };
        self.runs
            .get_or_create(&RunLabels {
                started_by: trigger.as_str(),
                outcome,
            })
            .inc();
        if let Some(counts) = counts {
            for (result, n) in EVENT_RESULTS.into_iter().zip([
                counts.applied,
                counts.already_applied,
                counts.ignored,
            ]) {
                self.events
                    .get_or_create(&EventLabels { result })
                    .inc_by(u64::try_from(n).unwrap_or(0));
            }
        }
    }
}

/// Runs a reconciliation every `interval` (plus up to a tenth of it at random, so a fleet
/// started together spreads out), from when the store is ready. The first one is timed from the
/// last periodic run of any instance: an interval after it, or soon when it is older than that (or there is none), so
/// instances restarted more often than the interval (deploys, secret changes) still run one.
/// Where another instance holds the lock the run is skipped (counted as `in_progress`). After a
/// failed run the next comes within the hour (`next_pause`), not an interval later. At start and
/// after each run, catalogue rows an earlier build wrote are rewritten by a sync
/// (`sync::RewriteOfEarlierBuilds`, which waits after failing), counted in `sync_metrics`.
pub fn spawn_periodic(
    store: Store,
    client: StripeClient,
    clock: Clock,
    interval: Duration,
    metrics: ReconcileMetrics,
    sync_metrics: StripeMetrics,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let holder = format!("periodic-{}", uuid::Uuid::new_v4());
        // Neither the last run nor a new one can be read or written before the schema is in
        // place (`serve --no-migrate` waiting for `edgegate migrate`): each would only warn.
        store.wait_until_ready().await;
        let mut rewrite = RewriteOfEarlierBuilds::new(interval);
        rewrite
            .check(&store, &client, &clock, &holder, &sync_metrics)
            .await;
        // Read and timed after the start's rewrite, which may take the sync's minutes: another
        // instance may have run meanwhile.
        let now_ms = clock.now_ms();
        let last = match store.last_periodic_reconcile(now_ms).await {
            Ok(last) => last,
            Err(err) => {
                // Unknown: run soon rather than an interval late; the run reports the database.
                tracing::warn!(
                    error = crate::error::causes(&err),
                    "cannot read when the last periodic Stripe reconciliation ran; running soon"
                );
                None
            }
        };
        let mut pause = first_pause(last, now_ms, interval, random_fraction());
        loop {
            tokio::time::sleep(pause).await;
            let result = run(&store, &client, &clock, &holder, Trigger::Periodic, None).await;
            metrics.record(Trigger::Periodic, &result);
            rewrite
                .check(&store, &client, &clock, &holder, &sync_metrics)
                .await;
            let failed = matches!(
                result,
                Err(ReconcileError::Upstream { .. } | ReconcileError::Internal(_))
            );
            pause = next_pause(interval, failed, random_fraction());
            match &result {
                Ok(report) => tracing::info!(
                    seen = report.events.seen,
                    applied = report.events.applied,
                    since = report.since,
                    "periodic Stripe reconciliation done"
                ),
                Err(ReconcileError::InProgress(_)) => {
                    tracing::debug!("periodic Stripe reconciliation skipped: another one runs");
                }
                Err(ReconcileError::Internal(err)) => tracing::warn!(
                    error = crate::error::causes(err),
                    retry_in_s = pause.as_secs(),
                    "periodic Stripe reconciliation failed; the next one retries"
                ),
                Err(err) => tracing::warn!(
                    error = format!("{err:#}"),
                    retry_in_s = pause.as_secs(),
                    "periodic Stripe reconciliation failed; the next one retries"
                ),
            }
        }
    })
}

/// The most a first run that is due is put off, so instances started together spread out.
const FIRST_RUN_SPREAD: Duration = Duration::from_secs(60);

/// How long after start the first periodic run comes: at `last` (ms) plus `interval`, or, when
/// that is past or no run is known, within a tenth of the interval (a minute at most); `fraction`
/// (0 to 1) picks where in that spread. A last run stamped more than [`STAMPED_AHEAD_MS`] after
/// now was stamped while the wall clock ran ahead, since set back: when it really ran is unknown,
/// so it counts as none (taken at its stamp it put the first run off by the day to it, and taken
/// as just run it held every start an interval, so a fleet restarted more often than that ran
/// none for the day). Never more than an interval and its spread.
fn first_pause(last: Option<i64>, now_ms: i64, interval: Duration, fraction: f64) -> Duration {
    let spread = (interval / 10).min(FIRST_RUN_SPREAD).mul_f64(fraction);
    let interval_ms = i64::try_from(interval.as_millis()).unwrap_or(i64::MAX);
    let last = last.filter(|&last| last <= now_ms.saturating_add(STAMPED_AHEAD_MS));
    match last.map(|last| last.saturating_add(interval_ms).saturating_sub(now_ms)) {
        Some(due_in) if due_in > 0 => {
            let due_in = u64::try_from(due_in.min(interval_ms)).unwrap_or(0);
            Duration::from_millis(due_in) + spread
        }
        _ => spread,
    }
}

/// The longest wait after a failed periodic run. A whole interval (up to 25 days) would leave
/// the events of a day's outage (Stripe away, the database refusing) to age out of Stripe's
/// 30-day retention before any run listed them again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(3600);

/// How long after a periodic run the next one comes: an interval, or after a failed one at most
/// `RETRY_AFTER_FAILURE`; lengthened by up to a tenth (`fraction`, 0 to 1), so a fleet spreads
/// out. One skipped because another instance ran (`InProgress`) is no failure: that run covers.
fn next_pause(interval: Duration, failed: bool, fraction: f64) -> Duration {
    let wait = if failed {
        interval.min(RETRY_AFTER_FAILURE)
    } else {
        interval
    };
    wait + wait.div_f64(10.0).mul_f64(fraction)
}

/// A random number from 0 to 1; a failing system RNG only costs the jitter.
fn random_fraction() -> f64 {
    let mut byte = [0u8; 2];
    let _ = aws_lc_rs::rand::fill(&mut byte);
    f64::from(u16::from_le_bytes(byte)) / f64::from(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_periodic_run_is_timed_from_the_last_one() {
        let hour = Duration::from_secs(3600);
        let now = 10_000_000_000;
        // None yet, or the last one an interval ago or more: soon, within a minute.
        assert_eq!(first_pause(None, now, hour, 0.0), Duration::ZERO);
        assert_eq!(first_pause(None, now, hour, 1.0), FIRST_RUN_SPREAD);
        assert_eq!(
            first_pause(Some(now - 3_600_000), now, hour, 0.5),
            FIRST_RUN_SPREAD / 2
        );
        assert_eq!(first_pause(Some(0), now, hour, 0.0), Duration::ZERO);
        // A recent one: an interval after it.
        assert_eq!(
            first_pause(Some(now - 600_000), now, hour, 0.0),
            Duration::from_secs(3000)
        );
        assert_eq!(
            first_pause(Some(now - 600_000), now, hour, 1.0),
            Duration::from_secs(3060)
        );
        // A short interval spreads over a tenth of it.
        let short = Duration::from_secs(60);
        assert_eq!(first_pause(None, now, short, 1.0), Duration::from_secs(6));
        // One stamped a day ahead of now (a wall clock set back since): as none, not the day to
        // its stamp and an interval more; one a second ahead (another instance's clock): an
        // interval at most.
        assert_eq!(
            first_pause(Some(now + 86_400_000), now, hour, 0.0),
            Duration::ZERO
        );
        assert_eq!(
            first_pause(Some(now + 86_400_000), now, hour, 1.0),
            FIRST_RUN_SPREAD
        );
        assert_eq!(
            first_pause(Some(now + 1_000), now, hour, 1.0),
            Duration::from_secs(3660)
        );
    }

    #[test]
    fn since_is_whole_unix_seconds_however_written() {
        for (json, seconds) in [
            ("1700000000", 1_700_000_000),
            ("-5", -5),
            ("0", 0),
            ("1700000000.0", 1_700_000_000),
            ("1.7e9", 1_700_000_000),
            ("1E+3", 1000),
            ("-0.0", 0),
            ("9223372036854775807", i64::MAX),
            ("-9223372036854775808", i64::MIN),
            (" 12 ", 12),
        ] {
            assert_eq!(since_seconds(json), Ok(seconds), "{json}");
        }
        for (json, named) in [
            ("1.5", "has a fraction"),
            ("1e-3", "has a fraction"),
            ("1e300", "out of range"),
            ("1e999", "out of range"),
            ("9223372036854775808", "out of range"),
            ("-9223372036854775809", "out of range"),
            ("18446744073709551616", "out of range"),
            ("9.3e18", "out of range"),
            (r#""1700000000""#, "a string"),
            ("true", "a boolean"),
            ("[1]", "an array"),
            ("{}", "an object"),
        ] {
            let message = since_seconds(json).unwrap_err();
            assert!(
                message.contains("integer of unix seconds"),
                "{json}: {message}"
            );
            assert!(message.contains(named), "{json}: {message}");
            assert!(!message.contains("1700000000"), "{json}: {message}");
        }
    }

    #[test]
    fn requested_since_is_checked_and_kept_within_retention() {
        let now = 2_000_000_000;
        assert_eq!(requested_since(now - 60, now), Ok(now - 60));
        assert_eq!(requested_since(0, now), Ok(now - RETENTION_SECONDS));
        assert!(requested_since(now + 1, now).is_err());
    }

    #[test]
    fn the_default_window_starts_an_hour_before_the_coverage_or_at_the_retention() {
        let now = 2_000_000_000;
        let oldest = now - RETENTION_SECONDS;
        assert_eq!(default_since(None, now), oldest);
        let covered_ms = (now - 7200) * 1000 + 999;
        assert_eq!(
            default_since(Some(covered_ms), now),
            now - 7200 - OVERLAP_SECONDS
        );
        assert_eq!(default_since(Some(oldest * 1000), now), oldest);
        // A coverage stamped ahead of the clock never starts the window after an hour ago.
        assert_eq!(
            default_since(Some((now + 86_400) * 1000), now),
            now - OVERLAP_SECONDS
        );
    }

    #[test]
    fn only_a_window_that_reaches_the_coverage_continues_it() {
        let now = 2_000_000_000;
        let covered = Some((now - 7200) * 1000);
        let default = default_since(covered, now);
        assert!(continues(default, covered, now));
        assert!(continues(default - 1, covered, now));
        assert!(!continues(default + 1, covered, now));
        assert!(!continues(now - 60, covered, now));
        // With nothing covered, only the whole retention starts the coverage.
        assert!(continues(now - RETENTION_SECONDS, None, now));
        assert!(!continues(now - RETENTION_SECONDS + 1, None, now));
    }

    #[test]
    fn a_default_window_moved_up_to_the_retention_names_the_events_lost() {
        let now = 2_000_000_000;
        let oldest = now - RETENTION_SECONDS;
        assert_eq!(aged_out(None, now), None);
        assert_eq!(aged_out(Some((now - 7200) * 1000), now), None);
        assert_eq!(aged_out(Some((oldest + OVERLAP_SECONDS) * 1000), now), None);
        let covered = oldest - 600;
        assert_eq!(
            aged_out(Some(covered * 1000), now),
            Some((covered - OVERLAP_SECONDS, oldest))
        );
    }

    #[test]
    fn jitter_stays_within_a_tenth() {
        let interval = Duration::from_secs(3600);
        for _ in 0..100 {
            let wait = next_pause(interval, false, random_fraction());
            assert!(wait >= interval && wait <= interval + Duration::from_secs(360));
        }
    }

    #[test]
    fn a_failed_periodic_run_is_retried_within_an_hour_whatever_the_interval() {
        let hour = Duration::from_secs(3600);
        let long = Duration::from_secs(25 * 86_400);
        assert_eq!(next_pause(long, false, 0.0), long);
        assert_eq!(next_pause(long, true, 0.0), hour);
        assert_eq!(next_pause(long, true, 1.0), hour + hour / 10);
        // An interval shorter than that is kept.
        let minute = Duration::from_secs(60);
        assert_eq!(next_pause(minute, true, 0.0), minute);
        assert_eq!(next_pause(minute, false, 1.0), minute + minute / 10);
    }
}
