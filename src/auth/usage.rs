//! Evidence for revocation: verifications counted per key in memory, flushed to the database in
//! hourly buckets, so every instance's traffic adds up and survives restarts. While the database
//! is away the counts stay in memory (bounded by `MAX_PENDING_BUCKETS`; what does not fit is
//! counted in `edgegate_key_usage_dropped_total`, and is a hole in the evidence the verdict
//! heeds) and reach it once it is back. Hours older than any window read ([`USAGE_KEPT`]) are
//! deleted hourly, by a pass the flusher runs beside its flushes ([`prune_usage`]).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use crate::auth::callers::{CallerKind, CallerTracker};
use crate::auth::{KeySource, Verified};
use crate::clock::Clock;
use crate::store::{CallerUsage, HourlyTable, KeyUsage, Store};

const HOUR_MS: i64 = 3_600_000;

/// How often counts reach the database; also done once more at shutdown.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(60);
/// After a failed flush, how soon the next one is tried: counts reach the database within
/// seconds of its return.
pub const FLUSH_RETRY: Duration = Duration::from_secs(5);
/// Distinct (hour, key) buckets held in memory at most. Only keys that verified a token make a
/// bucket, so this is hundreds of hours of outage for a handful of keys; past it, the
/// verifications of a new bucket are dropped and counted, never silently.
pub const MAX_PENDING_BUCKETS: usize = 10_000;

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Bucket {
    hour_start_ms: i64,
    source: KeySource,
    /// Shared with the credential's kid, so counting a verification copies no name.
    kid: Arc<str>,
    alg: &'static str,
}

/// The counts not flushed yet. Every verification adds to one, so the map hashes with
/// foldhash (seeded per process) instead of std's SipHash: its keys are the service's own
/// (keys the ring holds, whole hours), not values a caller chooses.
type Pending = HashMap<Bucket, Count, foldhash::fast::RandomState>;

#[derive(Clone, Copy, Debug, Default)]
struct Count {
    verified: i64,
    first_ms: i64,
    last_ms: i64,
}

/// What a tracker holds until the database has it.
#[derive(Debug, Default)]
struct Held {
    /// Counted since the last flush took its batch.
    pending: Pending,
    /// The batch a flush is writing. Still this instance's to report until the write commits
    /// (it is in the database then) or fails (it is back in `pending`): a report made while a
    /// write waits on a locked file or an exhausted pool would otherwise find it nowhere.
    flushing: Pending,
    /// Verifications dropped and not yet recorded in the database.
    dropped: Option<DroppedUsage>,
}

/// A flush's batch: the key counts as rows, the earliest verification among them, the callers.
type Batch = (Vec<KeyUsage>, Option<i64>, Vec<CallerUsage>);

/// How [`UsageTracker`] takes its two locks: the service waits for them ([`Wait`]); a test models
/// a flush or a request beginning at a given point with [`Try`], `None` where it would wait.
trait Locking: Copy {
    fn lock<T>(self, mutex: &Mutex<T>) -> Option<MutexGuard<'_, T>>;
}

/// Waits for the lock; never `None`.
#[derive(Clone, Copy)]
struct Wait;

impl Locking for Wait {
    fn lock<T>(self, mutex: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
        Some(mutex.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Takes the lock only if it is free.
#[cfg(test)]
#[derive(Clone, Copy)]
struct Try;

#[cfg(test)]
impl Locking for Try {
    fn lock<T>(self, mutex: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
        match mutex.try_lock() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}

/// Counts verifications since the last flush.
#[derive(Debug)]
pub struct UsageTracker {
    held: Mutex<Held>,
    /// One flush at a time, so there is one batch in flight.
    flush_turn: tokio::sync::Mutex<()>,
    max_buckets: usize,
    /// Verifications not kept because the buffer was full.
    dropped: Counter,
    flush_failures: Counter,
    /// Who the legacy and API-key verifications came from, flushed with these counts.
    pub callers: CallerTracker,
    /// Run by [`UsageTracker::record_with_caller`] between the caller's count and its key's.
    #[cfg(test)]
    between_writes: std::sync::OnceLock<fn(&UsageTracker)>,
    /// Run by [`UsageTracker::take_batch`] once it has taken the callers, before the key counts.
    #[cfg(test)]
    after_taking_callers: std::sync::OnceLock<fn(&UsageTracker)>,
}

impl Default for UsageTracker {
    fn default() -> Self {
        Self::with_max_buckets(MAX_PENDING_BUCKETS)
    }
}

/// The name a key's usage is recorded under: its kid, the API key's id (`secret:NAME` or
/// `publishable:NAME`, [`crate::auth::api_key_id`]), or empty for the legacy secret (one secret, whatever `kid` its tokens carry). Stored in `key_usage_hourly` and
/// read back by the report, so it stays `""` where [`credential_name`] says `legacy`.
pub fn usage_kid(verified: &Verified) -> Arc<str> {
    static NONE: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(""));
    match (verified.source, &verified.kid) {
        (KeySource::LegacySecret, _) | (_, None) => Arc::clone(&NONE),
        (_, Some(kid)) => Arc::clone(kid),
    }
}

/// How metrics, log lines and the audit log name a credential: its kid, the API key's id
/// (`secret:NAME` or `publishable:NAME`), or `legacy` for the legacy secret. Never the
/// credential itself.
pub fn credential_name(verified: &Verified) -> &str {
    match verified.source {
        KeySource::LegacySecret => "legacy",
        _ => verified.kid.as_deref().unwrap_or_default(),
    }
}

impl UsageTracker {
    /// A tracker that holds at most `max_buckets` distinct (hour, key) counts.
    pub fn with_max_buckets(max_buckets: usize) -> Self {
        Self {
            held: Mutex::new(Held::default()),
            flush_turn: tokio::sync::Mutex::new(()),
            max_buckets,
            dropped: Counter::default(),
            flush_failures: Counter::default(),
            callers: CallerTracker::default(),
            #[cfg(test)]
            between_writes: std::sync::OnceLock::new(),
            #[cfg(test)]
            after_taking_callers: std::sync::OnceLock::new(),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "key_usage_dropped",
            "Verifications left out of the key-usage evidence because the in-memory buffer was \
             full while the database was unavailable",
            self.dropped.clone(),
        );
        registry.register(
            "key_usage_flush_failures",
            "Key-usage flushes that failed (the counts were kept for the next one)",
            self.flush_failures.clone(),
        );
        self.callers.register(registry);
    }

    /// Verifications dropped so far because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// Counts a verification whose caller is not counted (a signing key's).
    pub fn record(&self, verified: &Verified, at_ms: i64) {
        let (bucket, count) = one_verification(verified, at_ms);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        self.add(&mut held, bucket, count);
    }

    /// Counts a legacy or API-key verification and its caller (`kind`, on the route pattern
    /// `route`, by `client`), so that a flush takes both or neither: the caller first, then the
    /// key counts' lock is taken before the callers' is let go, and a flush takes them in the
    /// same order ([`UsageTracker::take_batch`]). Each taken and let go on its own, a flush that
    /// took the counts between the two writes took one into its batch and left the other to the
    /// next, a legacy count under "no caller recorded" for up to a minute. The key counts' lock
    /// is taken last and held only to add the key, never while caller bookkeeping runs, so a
    /// signing key's verification ([`UsageTracker::record`]) never waits on it.
    pub fn record_with_caller(
        &self,
        verified: &Verified,
        kind: CallerKind<'_>,
        route: &str,
        client: &str,
        at_ms: i64,
    ) {
        self.callers.count_kind(kind);
        self.record_with_caller_by(Wait, verified, kind, route, client, at_ms)
            .expect("Wait never fails");
    }

    /// [`UsageTracker::record_with_caller`] past its metric, taking the locks by `lock`: `None`
    /// where it would wait for one. With [`Wait`] never `None`; a model of a request ([`Try`])
    /// is `None` before it wrote anything only where the callers' lock is busy (the tests hold
    /// no other), and would leave its caller counted without its key if the key counts' were.
    fn record_with_caller_by(
        &self,
        lock: impl Locking,
        verified: &Verified,
        kind: CallerKind<'_>,
        route: &str,
        client: &str,
        at_ms: i64,
    ) -> Option<()> {
        let (bucket, count) = one_verification(verified, at_ms);
        let mut callers = lock.lock(self.callers.counts())?;
        CallerTracker::record_in(&mut callers, kind, route, client, at_ms);
        #[cfg(test)]
        if let Some(between) = self.between_writes.get() {
            between(self);
        }
        let mut held = lock.lock(&self.held)?;
        drop(callers);
        self.add(&mut held, bucket, count);
        Some(())
    }

    /// Adds `count` to its bucket, or drops and counts it when a new bucket would not fit.
    fn add(&self, held: &mut Held, bucket: Bucket, count: Count) {
        let full = held.pending.len() >= self.max_buckets;
        match held.pending.get_mut(&bucket) {
            Some(sum) => {
                sum.verified += count.verified;
                sum.first_ms = sum.first_ms.min(count.first_ms);
                sum.last_ms = sum.last_ms.max(count.last_ms);
            }
            None if full => {
                self.dropped
                    .inc_by(u64::try_from(count.verified).unwrap_or(0));
                let drop = DroppedUsage {
                    count: count.verified,
                    last_dropped_at_ms: count.last_ms,
                };
                held.dropped = DroppedUsage::sum(held.dropped, Some(drop));
            }
            None => {
                held.pending.insert(bucket, count);
            }
        }
    }

    /// Moves the pending callers and key counts into the batch being flushed, the locks taken in
    /// the order a request takes them ([`UsageTracker::record_with_caller`]): the callers are
    /// taken under their lock, which is let go only once the key counts' is held, so a
    /// verification's key and its caller are in the same batch, and the key counts' lock is not
    /// held while the callers are settled. Returns the key counts as rows, the earliest
    /// verification among them, and the callers.
    fn take_batch(&self) -> Batch {
        self.take_batch_by(Wait).expect("Wait never fails")
    }

    /// [`UsageTracker::take_batch`], taking the locks by `lock`: `None` where it would wait for
    /// one. With [`Wait`] never `None`; a model of a flush ([`Try`]) is `None` before it took
    /// anything only where the callers' lock is busy (the tests hold no other), and would drop
    /// the callers it took if the key counts' were.
    fn take_batch_by(&self, lock: impl Locking) -> Option<Batch> {
        let mut callers = lock.lock(self.callers.counts())?;
        let caller_rows = CallerTracker::take_from(&mut callers);
        #[cfg(test)]
        if let Some(after) = self.after_taking_callers.get() {
            after(self);
        }
        let mut held = lock.lock(&self.held)?;
        drop(callers);
        let (rows, first) = Self::take_keys(&mut held);
        Some((rows, first, caller_rows))
    }

    /// Moves the pending key counts into the batch being flushed; returns them as rows, and the
    /// earliest verification among them.
    fn take_keys(held: &mut Held) -> (Vec<KeyUsage>, Option<i64>) {
        // `flushing` is empty here unless a flush was cut off mid-write. Whether that batch
        // reached the database is not known, so it is not written again: it is replaced, lost
        // as a cut-off flush's counts always were.
        held.flushing = std::mem::take(&mut held.pending);
        let first = held.flushing.values().map(|count| count.first_ms).min();
        let rows = held
            .flushing
            .iter()
            .map(|(bucket, count)| row(bucket, count))
            .collect();
        (rows, first)
    }

    /// Writes the pending counts, callers included; on failure they are kept for the next flush.
    pub async fn flush(&self, store: &Store) -> anyhow::Result<()> {
        let _turn = self.flush_turn.lock().await;
        // The dropped count first: it is the revocation verdict's evidence. Then the key counts
        // and their callers, in one transaction.
        let dropped = self.flush_dropped(store).await;
        let counts = self.flush_counts(store).await;
        let flushed = dropped.and(counts);
        // One flush, one failure, whichever of its writes failed.
        if flushed.is_err() {
            self.flush_failures.inc();
        }
        flushed
    }

    /// Records the verifications dropped since the last flush, so every instance's report (and
    /// the one read from the database) knows of the hole. They stay in memory until it is
    /// written: the report counts them meanwhile.
    async fn flush_dropped(&self, store: &Store) -> anyhow::Result<()> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner()).dropped;
        let Some(dropped) = held else {
            return Ok(());
        };
        store
            .note_dropped_usage(dropped.count, dropped.last_dropped_at_ms)
            .await?;
        // Drops counted during the write stay for the next flush.
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.dropped = held.dropped.and_then(|now| {
            let count = now.count - dropped.count;
            (count > 0).then_some(DroppedUsage { count, ..now })
        });
        Ok(())
    }

    /// Writes the key counts and the callers in one transaction ([`Store::add_usage`]), after
    /// noting since when they are counted: a report read from the database never finds key
    /// counts whose callers are still on their way (it would list them as having no caller
    /// recorded, and an operator dismiss a live client), not even when the callers' write fails
    /// or a stop's deadline cuts the flush off. On failure both are kept for the next flush.
    /// A verification's key and its caller are taken in one step ([`UsageTracker::take_batch`]),
    /// so they are in the same batch too.
    async fn flush_counts(&self, store: &Store) -> anyhow::Result<()> {
        let _callers_turn = self.callers.turn().await;
        let (rows, first, callers) = self.take_batch();
        if rows.is_empty() && callers.is_empty() {
            return Ok(());
        }
        let noted = match first {
            Some(first) => store.note_usage_evidence(first).await,
            None => Ok(()),
        };
        let written = match noted {
            Ok(()) => store.add_usage(&rows, &callers).await,
            Err(err) => Err(err),
        };
        let Err(err) = written else {
            // In the database now: no longer in flight, each in one step, so a report never
            // finds them in both places or in neither.
            self.held
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .flushing
                .clear();
            self.callers.written();
            return Ok(());
        };
        self.callers.restore(callers);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        // Back in `pending`, in the same step as they stop being in flight.
        held.flushing.clear();
        let first = first.unwrap_or(i64::MIN);
        for row in rows {
            let source = match row.source.as_str() {
                "legacy_secret" => KeySource::LegacySecret,
                "api_key" => KeySource::ApiKey,
                _ => KeySource::SigningKey,
            };
            let bucket = Bucket {
                hour_start_ms: row.hour_start_ms,
                source,
                kid: Arc::from(row.kid),
                alg: static_alg(&row.alg),
            };
            // The batch's earliest verification for each: what counts is the earliest.
            let count = Count {
                verified: row.verified_count,
                first_ms: first.max(row.hour_start_ms),
                last_ms: row.last_verified_at_ms,
            };
            self.add(&mut held, bucket, count);
        }
        Err(err)
    }

    /// The earliest verification this instance counted and the database does not have yet (ms).
    pub fn first_pending_verification(&self) -> Option<i64> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.unwritten().map(|(_, count)| count.first_ms).min()
    }

    /// Everything counted here that the database does not have yet (a batch being written
    /// included) from the hour starting at `since_ms` on, one row per hour and key (the admin
    /// report's hourly bars keep each hour; its totals add them).
    pub fn pending_since(&self, since_ms: i64) -> Vec<KeyUsage> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.unwritten()
            .filter(|(bucket, _)| bucket.hour_start_ms >= since_ms)
            .map(|(bucket, count)| row(bucket, count))
            .collect()
    }

    /// The verifications this instance dropped and the database does not know of yet.
    pub fn pending_dropped(&self) -> Option<DroppedUsage> {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).dropped
    }

    /// What this instance holds that the database does not have yet, keys and callers, from the
    /// hour starting at `since_ms` on.
    pub fn unflushed_since(&self, since_ms: i64) -> Unflushed {
        Unflushed {
            keys: self.pending_since(since_ms),
            callers: self.callers.pending_since(since_ms),
            first_verification: self.first_pending_verification(),
            dropped: self.pending_dropped(),
        }
    }
}

impl Held {
    /// Every count the database does not have yet: pending, and the batch being written (a
    /// bucket may be in both; the report adds rows of one hour and key).
    fn unwritten(&self) -> impl Iterator<Item = (&Bucket, &Count)> {
        self.pending.iter().chain(&self.flushing)
    }
}

/// An instance's counts the database does not have yet, read in one go.
#[derive(Clone, Debug, Default)]
pub struct Unflushed {
    pub keys: Vec<KeyUsage>,
    pub callers: Vec<crate::store::CallerUsage>,
    pub first_verification: Option<i64>,
    pub dropped: Option<DroppedUsage>,
}

/// Verifications left out of the usage evidence because an instance's buffer was full (a long
/// database outage): legacy use among them would not show.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DroppedUsage {
    /// How many, on every instance since counting began.
    pub count: i64,
    /// When the last of them was made (epoch ms).
    pub last_dropped_at_ms: i64,
}

impl DroppedUsage {
    /// Both together: their counts added, the later last drop.
    pub fn sum(a: Option<Self>, b: Option<Self>) -> Option<Self> {
        match (a, b) {
            (Some(a), Some(b)) => Some(Self {
                count: a.count + b.count,
                last_dropped_at_ms: a.last_dropped_at_ms.max(b.last_dropped_at_ms),
            }),
            (a, b) => a.or(b),
        }
    }
}

/// One verification of `verified`'s key at `at_ms`: its bucket and its count.
fn one_verification(verified: &Verified, at_ms: i64) -> (Bucket, Count) {
    let bucket = Bucket {
        hour_start_ms: at_ms - at_ms.rem_euclid(HOUR_MS),
        source: verified.source,
        kid: usage_kid(verified),
        alg: verified.alg,
    };
    let count = Count {
        verified: 1,
        first_ms: at_ms,
        last_ms: at_ms,
    };
    (bucket, count)
}

/// One bucket's count as the store keeps it.
fn row(bucket: &Bucket, count: &Count) -> KeyUsage {
    KeyUsage {
        hour_start_ms: bucket.hour_start_ms,
        source: bucket.source.as_str().to_owned(),
        kid: bucket.kid.to_string(),
        alg: bucket.alg.to_owned(),
        verified_count: count.verified,
        last_verified_at_ms: count.last_ms,
    }
}

fn static_alg(alg: &str) -> &'static str {
    match alg {
        "HS256" => "HS256",
        "ES256" => "ES256",
        "RS256" => "RS256",
        "EdDSA" => "EdDSA",
        _ => "opaque",
    }
}

/// How long hourly usage rows (`key_usage_hourly`, `caller_usage_hourly`) are kept: the longest
/// window anything reads, 30 days (`LEGACY_REVOCATION_WINDOW_SECONDS` and the report's window at
/// most), and a day. Older rows are deleted by the flusher ([`prune_usage`]).
pub const USAGE_KEPT: Duration = Duration::from_secs(31 * 86_400);

/// When, and how much, the flusher deletes usage rows older than [`USAGE_KEPT`].
#[derive(Clone, Copy, Debug)]
pub struct Pruning {
    /// At most one pass per this on the instance's clock; the first at the first flush.
    pub every: Duration,
    /// DELETE statements per table in one pass, each of a day of hours at most.
    pub statements_per_pass: usize,
}

impl Default for Pruning {
    /// Hourly, up to 100 days per table: a year's backlog (an edgegate that never pruned) is
    /// gone in four passes, a statement at a time.
    fn default() -> Self {
        Self {
            every: Duration::from_secs(3600),
            statements_per_pass: 100,
        }
    }
}

/// The pause between two statements of a pass: a writer waiting for SQLite's lock (its busy
/// handler sleeps up to 100 ms between tries, less at first) gets it before the next day goes.
const PRUNE_PAUSE: Duration = Duration::from_millis(50);

/// Deletes the usage rows whose hour starts more than [`USAGE_KEPT`] before `now_ms`, a day of
/// hours per statement and at most `statements_per_pass` statements per table; returns the rows
/// deleted. The evidence is first said to start, at the earliest, where the hours kept start
/// ([`Store::raise_usage_evidence`]): the hour the cutoff falls in is deleted whole, counts after
/// the cutoff with it. That is beyond every window normally, and after a wall clock that ran
/// ahead (pruning hours still in the window once it is set right) it keeps the verdict from
/// calling revocation safe until a whole window has passed after the hole. What is left of a
/// larger backlog goes at the next pass.
pub async fn prune_usage(
    store: &Store,
    now_ms: i64,
    statements_per_pass: usize,
) -> anyhow::Result<u64> {
    let (_never_sent, never) = tokio::sync::watch::channel(false);
    match prune_usage_until(store, now_ms, statements_per_pass, never).await? {
        PassEnd::Done(deleted) | PassEnd::Stopped(deleted) => Ok(deleted),
    }
}

/// How a pruning pass ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PassEnd {
    /// Every statement it had to run ran: the rows deleted.
    Done(u64),
    /// Stopped between two statements, with the rows deleted until then: what is left goes at a
    /// later pass (the next start's).
    Stopped(u64),
}

/// [`prune_usage`] that stops between two statements once `stopped` says so (or its sender is
/// gone), never inside one: a statement sent runs to its end whatever happens to its future
/// (SQLite's worker thread finishes it, PostgreSQL finishes it server-side), so a pass cut off by
/// dropping it would still delete a day after its stop.
async fn prune_usage_until(
    store: &Store,
    now_ms: i64,
    statements_per_pass: usize,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<PassEnd> {
    let kept_ms = i64::try_from(USAGE_KEPT.as_millis()).unwrap_or(i64::MAX);
    let before = now_ms.saturating_sub(kept_ms);
    let first_hour_kept = before.saturating_add((HOUR_MS - before.rem_euclid(HOUR_MS)) % HOUR_MS);
    let mut deleted = 0;
    // Before each statement: the stop may have come during the one before (a table's last).
    let stop_now = |stopped: &tokio::sync::watch::Receiver<bool>| {
        *stopped.borrow() || stopped.has_changed().is_err()
    };
    if stop_now(&stopped) {
        return Ok(PassEnd::Stopped(deleted));
    }
    store.raise_usage_evidence(first_hour_kept).await?;
    for table in HourlyTable::ALL {
        for _ in 0..statements_per_pass {
            if stop_now(&stopped) {
                return Ok(PassEnd::Stopped(deleted));
            }
            let rows = store.prune_usage_day(table, before).await?;
            if rows == 0 {
                break;
            }
            deleted += rows;
            tokio::select! {
                biased;
                // A sender gone is a stop too (the flusher's handle dropped).
                _ = stopped.wait_for(|stop| *stop) => return Ok(PassEnd::Stopped(deleted)),
                () = tokio::time::sleep(PRUNE_PAUSE) => {}
            }
        }
    }
    Ok(PassEnd::Done(deleted))
}

/// Takes in a pruning pass that ended: a pass done is counted in `passes` and, when it
/// succeeded, returns when it started (the next is due `Pruning::every` after); one stopped is
/// neither (it did not do what it had to). Either logs the rows it deleted.
fn pass_ended(
    ended: Result<(std::time::Instant, anyhow::Result<PassEnd>), tokio::task::JoinError>,
    passes: &tokio::sync::watch::Sender<u64>,
) -> Option<std::time::Instant> {
    let pass = ended
        .map_err(anyhow::Error::from)
        .and_then(|(started, pass)| Ok((started, pass?)));
    let (pruned_at, deleted, stopped) = match pass {
        Ok((started, PassEnd::Done(deleted))) => (Some(started), deleted, false),
        Ok((_, PassEnd::Stopped(deleted))) => (None, deleted, true),
        Err(err) => {
            tracing::warn!(
                error = crate::error::causes(&err),
                "old hourly usage rows not deleted; will retry after the next flush"
            );
            (None, 0, false)
        }
    };
    if deleted > 0 {
        tracing::info!(
            deleted,
            stopped,
            "deleted hourly usage rows older than 31 days (no window reads them)"
        );
    }
    if !stopped {
        passes.send_modify(|n| *n += 1);
    }
    pruned_at
}

/// Flushes every `FLUSH_INTERVAL` (every `FLUSH_RETRY` while flushes fail) until stopped, and
/// deletes usage rows past [`USAGE_KEPT`] hourly ([`Pruning::default`]).
pub fn spawn_flusher(tracker: std::sync::Arc<UsageTracker>, store: Store, clock: Clock) -> Flusher {
    spawn_flusher_pruning(
        tracker,
        store,
        clock,
        FLUSH_INTERVAL,
        FLUSH_RETRY,
        Pruning::default(),
    )
}

/// `spawn_flusher` with its pauses given (tests shorten them), on the system clock.
pub fn spawn_flusher_every(
    tracker: std::sync::Arc<UsageTracker>,
    store: Store,
    interval: Duration,
    retry: Duration,
) -> Flusher {
    spawn_flusher_pruning(
        tracker,
        store,
        Clock::system(),
        interval,
        retry,
        Pruning::default(),
    )
}

/// `spawn_flusher_every` with its clock and pruning given. A pass runs after a flush that
/// succeeded (the database answers), when `pruning.every` has passed on `clock` since the last
/// pass that succeeded and none is under way; a pass that fails is a WARN and is tried again
/// after the next flush. Flushes and notes keep their interval while a pass runs, however long.
pub fn spawn_flusher_pruning(
    tracker: std::sync::Arc<UsageTracker>,
    store: Store,
    clock: Clock,
    interval: Duration,
    retry: Duration,
    pruning: Pruning,
) -> Flusher {
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let (passes, prune_passes) = tokio::sync::watch::channel(0_u64);
    let mut writer = Writer::new();
    let writer_id = writer.id.clone();
    let join = tokio::spawn(async move {
        let mut pruned_at: Option<std::time::Instant> = None;
        // The pass under way, at most one, in a task of its own: flushes and notes keep their
        // interval while it runs (many statements on a large backlog or a slow database), or
        // other instances would take this one, after WRITER_GONE_AFTER, for one that ended
        // holding counts. A stop ends it between two statements and waits for that; an abort
        // drops it with this task (a statement already sent may still run to its end).
        let mut pruning_pass: tokio::task::JoinSet<(std::time::Instant, anyhow::Result<PassEnd>)> =
            tokio::task::JoinSet::new();
        // Noted at once, so an instance killed before its first flush is seen too. A database
        // not ready yet (`serve --no-migrate` before `edgegate migrate`) notes it after a flush.
        if let Err(err) = writer.note(&store, clock.now_ms()).await {
            tracing::debug!(error = crate::error::causes(&err), "instance not noted yet");
        }
        let next_flush = tokio::time::sleep(interval);
        tokio::pin!(next_flush);
        loop {
            tokio::select! {
                () = &mut next_flush => {}
                Some(ended) = pruning_pass.join_next(), if !pruning_pass.is_empty() => {
                    if let Some(started) = pass_ended(ended, &passes) {
                        pruned_at = Some(started);
                    }
                    continue;
                }
                // The pass under way stops between two statements: this waits for the one it
                // runs, if any (a day's DELETE, bounded by the pool's acquire timeout and
                // SQLite's busy timeout or PostgreSQL's statement timeout), not for the rest.
                _ = stopped.changed() => {
                    while let Some(ended) = pruning_pass.join_next().await {
                        pass_ended(ended, &passes);
                    }
                    return writer.silence_checked;
                }
            }
            let flushed = match tracker.flush(&store).await {
                Ok(()) => true,
                Err(err) => {
                    tracing::warn!(
                        error = crate::error::causes(&err),
                        "key usage not flushed; kept in memory, will retry"
                    );
                    false
                }
            };
            if flushed && let Err(err) = writer.beat(&store, clock.now_ms(), clock.now()).await {
                tracing::warn!(
                    error = crate::error::causes(&err),
                    "cannot check for instances that ended without writing their key usage; \
                     will retry after the next flush"
                );
            }
            let pause = if flushed { interval } else { retry };
            next_flush
                .as_mut()
                .reset(tokio::time::Instant::now() + pause);
            let due = pruned_at.is_none_or(|at| clock.now().duration_since(at) >= pruning.every);
            // Not after a stop was asked for: the next loop ends.
            let stopping = *stopped.borrow() || stopped.has_changed().is_err();
            if !flushed || !due || !pruning_pass.is_empty() || stopping {
                continue;
            }
            let started = clock.now();
            let (store, now_ms) = (store.clone(), clock.now_ms());
            let (statements, stop) = (pruning.statements_per_pass, stopped.clone());
            pruning_pass.spawn(async move {
                let pass = prune_usage_until(&store, now_ms, statements, stop).await;
                (started, pass)
            });
        }
    });
    Flusher {
        stop,
        join,
        prune_passes,
        writer_id,
    }
}

/// How long another instance's row in `usage_writers` may stay unnoted, timed on this
/// instance's own steady clock (never against the wall clock another machine stamped), before
/// its counts are taken for lost: five flushes. Also how old the fleet's last note may be at a
/// start before the time since is taken for one with no instance running
/// (`Writer::after_silence`): that one is read against another machine's wall clock.
pub const WRITER_GONE_AFTER: Duration = Duration::from_secs(300);

/// How long a row stays unnoted before its instance is taken for gone for good and the row is
/// deleted: until then every flush of the instances that watch it moves the evidence's start
/// up to their time, since the instance may still hold counts it cannot write (its database
/// away while others write) and end with them. Watched on an instance's
/// steady clock, or, once watched unnoted for [`WRITER_GONE_AFTER`], read from the row's own
/// stamp against the watcher's wall clock (no instance may live an hour to watch it: deploys,
/// restarts).
pub const WRITER_GONE_FOR_GOOD: Duration = Duration::from_secs(3600);

/// This instance among those counting key usage (`usage_writers`): noted after every flush,
/// deleted at a clean stop once the last counts are written. A row left unnoted is an instance
/// that holds counts it has not written, or ended holding them (killed, crashed, out of memory,
/// a failed last flush), or a database restored from a backup taken while instances ran, whose
/// counts since are gone: the counts have a hole the verdict cannot see. While such a row stays
/// unnoted past [`WRITER_GONE_AFTER`], every flush of this instance moves the evidence's start
/// to its own time ([`Store::raise_usage_evidence`]), so revocation is not called safe before a
/// whole window after the last of them; after [`WRITER_GONE_FOR_GOOD`] the row is deleted. A
/// clean stop leaves no row: the time no instance ran is found at the next start from the
/// fleet's last note ([`Writer::after_silence`]), which the stop stamps only if this instance
/// looked for such a time at its start ([`Retiring::retire`]).
#[derive(Debug)]
struct Writer {
    id: String,
    /// What this instance last wrote in its row (its wall clock, kept rising).
    noted: Option<i64>,
    /// Every other row seen: its value, and when (this instance's steady clock) that value was
    /// first read. A value that stays is a row not noted since.
    watched: HashMap<String, Watched>,
    /// Whether [`Writer::after_silence`] has run to its end (retried at every note until then).
    silence_checked: bool,
    /// Whether a failure to read or write the fleet's last note was logged.
    fleet_note_warned: bool,
}

#[derive(Debug)]
struct Watched {
    seen_at_ms: i64,
    since: std::time::Instant,
    warned: bool,
}

impl Writer {
    fn new() -> Self {
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            noted: None,
            watched: HashMap::new(),
            silence_checked: false,
            fleet_note_warned: false,
        }
    }

    /// Writes this instance's row, with a value other than the last one (a wall clock that
    /// stands or steps back still shows the instance alive), and the fleet's last note. Until
    /// it has once looked for a time when no instance ran ([`Writer::after_silence`]), it looks
    /// first, and stamps the fleet's last note only once it has (a stamp first would hide the
    /// gap). Neither failing keeps the row from being written (`serve --no-migrate` on a
    /// database without the last note's columns): a crash of this instance is still seen.
    async fn note(&mut self, store: &Store, now_ms: i64) -> anyhow::Result<()> {
        let value = self.noted.map_or(now_ms, |last| now_ms.max(last + 1));
        let mut unchecked = None;
        if !self.silence_checked {
            match self.after_silence(store, value).await {
                Ok(()) => self.silence_checked = true,
                Err(err) => unchecked = Some(err),
            }
        }
        store.note_usage_writer(&self.id, value).await?;
        // Said only once the database took this instance's row: a database away, or a schema
        // not there at all (`serve --no-migrate` before `migrate`, which start-up has named),
        // fails that write too, and is no news here.
        if let Some(err) = unchecked {
            self.fleet_note_failed(&err);
        }
        if self.silence_checked
            && let Err(err) = store.note_usage_fleet(&self.id, value).await
        {
            self.fleet_note_failed(&err);
        }
        self.noted = Some(value);
        Ok(())
    }

    /// Logs, once, that the fleet's last note could not be read or written.
    fn fleet_note_failed(&mut self, err: &anyhow::Error) {
        if std::mem::replace(&mut self.fleet_note_warned, true) {
            return;
        }
        tracing::warn!(
            error = crate::error::causes(err),
            "cannot read or write the last note of the instances counting key usage (a \
             database not migrated to this build?): a time when no instance ran is not found \
             at this start; this instance still notes itself, and retries at every note"
        );
    }

    /// At this instance's start, before it notes itself: a clean stop deletes its row, so with
    /// no instance left running nothing else tells of the time none counted (legacy use then
    /// was refused, never counted). The fleet's last note ([`Store::note_usage_fleet`]) more
    /// than [`WRITER_GONE_AFTER`] before `now_ms`, written by an instance that has no row any
    /// more, says none ran since: the evidence's start moves to `now_ms`. One whose writer still
    /// has a row says nothing: it runs (the fleet did not stop), or ended holding counts, which
    /// [`Writer::beat`] finds. No last note with a `usage_evidence` row (the first start of this
    /// build after an older one that has the table: the migration leaves the note NULL) and no
    /// other instance's row (the restore's mark aside) is taken for a gap too, of unknown length
    /// (the older build may have been stopped for days). A gap read across two machines' wall
    /// clocks: a clock set wrong by minutes takes a restart for a gap (a window waited for
    /// nothing), never the reverse unless it is behind by more than the gap less
    /// [`WRITER_GONE_AFTER`].
    async fn after_silence(&self, store: &Store, now_ms: i64) -> anyhow::Result<()> {
        let Some(last) = store.usage_fleet_last_note().await? else {
            return self.after_unknown_silence(store, now_ms).await;
        };
        let silent_ms = now_ms.saturating_sub(last.noted_at_ms);
        let gone_after_ms = i64::try_from(WRITER_GONE_AFTER.as_millis()).unwrap_or(i64::MAX);
        if silent_ms < gone_after_ms {
            return Ok(());
        }
        let rows = store.usage_writers_seen_before(&self.id, i64::MAX).await?;
        if rows.iter().any(|row| row.id == last.noted_by) {
            return Ok(());
        }
        store.raise_usage_evidence(now_ms).await?;
        tracing::warn!(
            silent_for_seconds = silent_ms / 1000,
            since = %crate::auth::legacy_report::utc(last.noted_at_ms),
            "no instance counted key usage for over 5 minutes (none ran: legacy use then was \
             never counted): the usage evidence starts again now, and revoking the legacy \
             secret is not called safe before a whole window after that"
        );
        Ok(())
    }

    /// [`Writer::after_silence`] with no last note: a gap unless `usage_evidence` has no row.
    /// Without one nothing is recorded yet, or only counts from a build before that table, whose
    /// stops no build recorded anywhere (not taken for a gap: docs/MIGRATION.md). Live rows of
    /// other instances in `usage_writers` prove nothing here: during a rolling deploy from an
    /// earlier build they show the fleet runs now, not that it ran during the time before (that
    /// fleet may have been stopped for days and started again, seeing no gap), and a row written
    /// by an instance whose own check has not completed yet proves nothing either. So the first
    /// start of this build waits a window once, and the note exists from then on.
    async fn after_unknown_silence(&self, store: &Store, now_ms: i64) -> anyhow::Result<()> {
        if !store.usage_evidence_row_exists().await? {
            return Ok(());
        }
        store.raise_usage_evidence(now_ms).await?;
        tracing::warn!(
            "no record of when an instance last counted key usage (the first start of this \
             build): the instances before it may have been stopped for any time (legacy use \
             then was never counted), so the usage evidence starts again now, and revoking the \
             legacy secret is not called safe before a whole window after that"
        );
        Ok(())
    }

    /// Notes this instance, then reads the others' rows: each unnoted for [`WRITER_GONE_AFTER`]
    /// (on `now`, this instance's steady clock), or written by the statement a restore runs
    /// (`seen_at` 0 or less: no instance writes that), moves the evidence's start to `now_ms`;
    /// one unnoted for [`WRITER_GONE_FOR_GOOD`], or the restore's, is then deleted.
    async fn beat(
        &mut self,
        store: &Store,
        now_ms: i64,
        now: std::time::Instant,
    ) -> anyhow::Result<()> {
        self.note(store, now_ms).await?;
        let rows = store.usage_writers_seen_before(&self.id, i64::MAX).await?;
        self.watched
            .retain(|id, _| rows.iter().any(|row| &row.id == id));
        let gone_for_good_ms = i64::try_from(WRITER_GONE_FOR_GOOD.as_millis()).unwrap_or(i64::MAX);
        let (mut lost, mut newly, mut gone) = (false, Vec::new(), Vec::new());
        for row in rows {
            // Marked by a restore: no instance writes 0.
            if row.seen_at_ms <= 0 {
                lost = true;
                newly.push(row.id.clone());
                gone.push(row);
                continue;
            }
            let fresh = Watched {
                seen_at_ms: row.seen_at_ms,
                since: now,
                warned: false,
            };
            let watched = self.watched.entry(row.id.clone()).or_insert(fresh);
            if watched.seen_at_ms != row.seen_at_ms {
                // Noted since it was last read: alive and written.
                *watched = Watched {
                    seen_at_ms: row.seen_at_ms,
                    since: now,
                    warned: false,
                };
            }
            let unnoted = now.saturating_duration_since(watched.since);
            if unnoted < WRITER_GONE_AFTER {
                continue;
            }
            // Still unnoted: the start keeps moving while it may hold counts.
            lost = true;
            if !watched.warned {
                newly.push(row.id.clone());
            }
            // Gone for good once watched unnoted for WRITER_GONE_FOR_GOOD, or, watched unnoted
            // for WRITER_GONE_AFTER (so not alive: a live instance changes its value at every
            // flush, whatever its clock), stamped that long before this instance's wall clock:
            // with deploys or restarts more often than an hour, no instance watches it that long.
            if unnoted >= WRITER_GONE_FOR_GOOD
                || now_ms.saturating_sub(row.seen_at_ms) >= gone_for_good_ms
            {
                gone.push(row);
            }
        }
        if !lost {
            return Ok(());
        }
        // The start first: a row deleted before it moved would be a hole no one sees.
        store.raise_usage_evidence(now_ms).await?;
        for id in &newly {
            if let Some(watched) = self.watched.get_mut(id) {
                watched.warned = true;
            }
        }
        if !newly.is_empty() {
            tracing::warn!(
                instances = newly.len(),
                "an instance has not written its key usage counts for 5 minutes (it ended \
                 holding them: killed, crashed, or the database was restored from a backup; or \
                 it cannot reach the database): the usage evidence starts again now, at every \
                 flush until it writes or an hour has passed, and revoking the legacy secret is \
                 not called safe before a whole window after that"
            );
        }
        for writer in &gone {
            store.forget_usage_writer(writer).await?;
            self.watched.remove(&writer.id);
        }
        if !gone.is_empty() {
            tracing::info!(
                instances = gone.len(),
                "instances that wrote no key usage counts for an hour (or marked by a restore) \
                 taken for gone for good; their rows deleted"
            );
        }
        Ok(())
    }
}

/// The running flusher.
#[derive(Debug)]
pub struct Flusher {
    stop: tokio::sync::watch::Sender<bool>,
    /// Ends with whether this instance looked for a time when no instance ran before its start.
    join: tokio::task::JoinHandle<bool>,
    prune_passes: tokio::sync::watch::Receiver<u64>,
    writer_id: String,
}

impl Flusher {
    /// This instance's id in `usage_writers`: a clean stop deletes it once its last counts are
    /// written ([`Retiring::retire`]).
    pub fn writer_id(&self) -> &str {
        &self.writer_id
    }

    /// How many pruning passes have ended, successful or not, a pass a stop ended not among
    /// them (tests wait on it).
    pub fn prune_passes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.prune_passes.clone()
    }

    /// Stops it between two flushes, never inside one: a flush takes the counts from memory
    /// before it writes them, so one cut off mid-write would lose them. A pruning pass under way
    /// stops between two of its statements: this waits for the one it runs, if any (a day of
    /// hours; the pool's acquire timeout and SQLite's busy timeout or PostgreSQL's statement
    /// timeout bound it), not for the rest, which goes at the next start's pass. Nothing is
    /// deleted once it returns. Returns this instance as it is to leave `usage_writers` once a
    /// clean stop has written its last counts.
    pub async fn stop(self) -> Retiring {
        let _ = self.stop.send(true);
        // A task that panicked or was aborted is taken for one that never looked.
        let looked_for_a_gap = match self.join.await {
            Ok(looked) => looked,
            Err(err) => {
                tracing::error!(
                    panicked = err.is_panic(),
                    "the key usage flusher ended early; this stop leaves the last note as it was"
                );
                false
            }
        };
        Retiring {
            writer_id: self.writer_id,
            looked_for_a_gap,
        }
    }

    /// Stops it at once, mid-flush or not (tests that look at what a dead instance leaves).
    pub fn abort(&self) {
        self.join.abort();
    }
}

/// An instance whose flusher has stopped, still in `usage_writers` until its last counts are
/// written ([`Retiring::retire`]).
#[derive(Debug)]
#[must_use = "retire() it once its last counts are written: a row left behind reads as counts lost"]
pub struct Retiring {
    writer_id: String,
    /// Whether [`Writer::after_silence`] ran to its end while the flusher ran.
    looked_for_a_gap: bool,
}

impl Retiring {
    /// Deletes this instance's row: a clean stop wrote all its counts, until `now_ms`. The
    /// fleet's last note is stamped first, with `now_ms`, only if this instance looked for a time
    /// when no instance ran before its start ([`Writer::after_silence`]): with none left running
    /// the next start reads from that note how long none counted. One that never looked (the
    /// database away at its start and back only for its stop, before its next note; a database
    /// without the note, `serve --no-migrate` on a release before it) would stamp away a gap
    /// before its start, the next start finding the note fresh: the note is left as it was (an
    /// earlier instance's, or a later one's that looked), so the next start finds the gap, and
    /// the row is deleted all the same: kept, it would tell of counts lost that were written.
    pub async fn retire(&self, store: &Store, now_ms: i64) -> anyhow::Result<()> {
        if !self.looked_for_a_gap {
            tracing::info!(
                "this instance never looked for a time when no instance ran before its start \
                 (the database was away, or has no record of the last note): its stop leaves \
                 the last note as it was, so the next start looks for that time"
            );
        }
        let stamp = self.looked_for_a_gap.then_some(now_ms);
        store.retire_usage_writer(&self.writer_id, stamp).await
    }
}

/// The verdict on revoking the legacy secret, with the evidence behind it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct LegacyVerdict {
    pub legacy_revocation_safe: bool,
    pub reason: String,
}

/// Decides from usage over the window (database plus this instance's pending counts), and the
/// verifications that were dropped instead of counted. `usage` is hourly rows, one per hour and
/// key as the report reads them (`legacy_report::window_rows`): the verdict counts the rows the
/// report's numbers count, so the two never disagree.
pub fn legacy_verdict(
    legacy_configured: bool,
    usage: &[KeyUsage],
    evidence_since_ms: Option<i64>,
    dropped: Option<DroppedUsage>,
    window: Duration,
    now: i64,
) -> LegacyVerdict {
    let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
    let window_text = humanize(window);
    // Rows are hourly; a key whose last use is before the window did not verify in it.
    let in_window = |source: &str| -> i64 {
        usage
            .iter()
            .filter(|u| u.source == source && u.last_verified_at_ms >= now - window_ms)
            .map(|u| u.verified_count)
            .sum()
    };
    let legacy = in_window("legacy_secret");
    // Only signing-key tokens show that Auth rotated and that edgegate verifies its new tokens:
    // API-key traffic says nothing of user sessions (and the report's own call is some).
    let signing = in_window("signing_key");
    let verdict = |safe: bool, reason: String| LegacyVerdict {
        legacy_revocation_safe: safe,
        reason,
    };
    if !legacy_configured {
        return verdict(
            true,
            "the legacy secret is not configured: HS256 tokens are already refused".to_owned(),
        );
    }
    if legacy > 0 {
        // Verifications, not requests: one request may carry two legacy credentials.
        return verdict(
            false,
            format!("{legacy} verification(s) with the legacy secret in the last {window_text}"),
        );
    }
    // A dropped verification may have been a legacy one: the window must pass after the last.
    if let Some(dropped) = dropped.filter(|d| d.last_dropped_at_ms >= now - window_ms) {
        let (count, last) = (dropped.count, dropped.last_dropped_at_ms);
        return verdict(
            false,
            format!(
                "{} verification{} left out of the usage evidence (its buffer was full while the \
                 database was away), the last at {} UTC: legacy use among them would not show; \
                 wait until {} UTC",
                crate::auth::legacy_report::thousands(count),
                if count == 1 { " was" } else { "s were" },
                crate::auth::legacy_report::utc(last),
                crate::auth::legacy_report::utc(last.saturating_add(window_ms)),
            ),
        );
    }
    if signing == 0 {
        return verdict(
            false,
            format!(
                "no request was verified with a signing key in the last {window_text}: clients may not have moved yet"
            ),
        );
    }
    let observed_long_enough = evidence_since_ms.is_some_and(|first| now - first >= window_ms);
    if !observed_long_enough {
        return verdict(
            false,
            format!(
                "usage has been recorded for less than {window_text}; wait until the whole window is covered"
            ),
        );
    }
    verdict(
        true,
        format!(
            "no legacy-verified request in the last {window_text}, and {signing} request(s) verified with signing keys"
        ),
    )
}

pub(crate) fn humanize(window: Duration) -> String {
    let secs = window.as_secs();
    if secs.is_multiple_of(3600) {
        format!("{} h", secs / 3600)
    } else if secs.is_multiple_of(60) {
        format!("{} min", secs / 60)
    } else {
        format!("{secs} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signing_key(kid: &str) -> Verified {
        Verified {
            source: KeySource::SigningKey,
            kid: Some(kid.into()),
            alg: "ES256",
            role: None,
            sub: None,
            claims: crate::auth::Claims::default(),
            exp: i64::MAX,
            nbf: None,
            ok_count: Default::default(),
        }
    }

    fn counted(tracker: &UsageTracker) -> i64 {
        tracker
            .pending_since(0)
            .iter()
            .map(|usage| usage.verified_count)
            .sum()
    }

    #[test]
    fn a_full_buffer_keeps_counting_held_keys_and_counts_what_it_drops() {
        let tracker = UsageTracker::with_max_buckets(2);
        let at = 10 * HOUR_MS;
        tracker.record(&signing_key("a"), at);
        tracker.record(&signing_key("b"), at);
        tracker.record(&signing_key("c"), at);
        tracker.record(&signing_key("c"), at + 1);
        // A held key still counts; a new hour of it is a new bucket and does not fit.
        tracker.record(&signing_key("a"), at + 2);
        tracker.record(&signing_key("a"), at + HOUR_MS);
        assert_eq!(counted(&tracker), 3);
        assert_eq!(tracker.dropped(), 3);
        let kids: Vec<String> = tracker
            .pending_since(0)
            .into_iter()
            .map(|u| u.kid)
            .collect();
        assert!(!kids.contains(&"c".to_owned()), "{kids:?}");
    }

    /// The admin report draws an hourly bar per key: counts held through a database outage keep
    /// their hours, not all put in the first one.
    #[test]
    fn pending_counts_keep_their_hours() {
        let tracker = UsageTracker::default();
        let at = 10 * HOUR_MS;
        tracker.record(&signing_key("a"), at + 5);
        tracker.record(&signing_key("a"), at + HOUR_MS + 5);
        tracker.record(&signing_key("a"), at + HOUR_MS + 6);
        let mut rows: Vec<(i64, i64)> = tracker
            .pending_since(0)
            .iter()
            .map(|row| (row.hour_start_ms, row.verified_count))
            .collect();
        rows.sort_unstable();
        assert_eq!(rows, [(at, 1), (at + HOUR_MS, 2)]);
        assert!(tracker.pending_since(at + HOUR_MS).len() == 1);
    }

    /// A dropped verification may have been a legacy one: revoking is not called safe until a
    /// whole window has passed after the last drop.
    #[test]
    fn a_drop_keeps_the_verdict_unsafe_for_a_whole_window_after_it() {
        let (window, now) = (Duration::from_secs(3600), 100 * HOUR_MS);
        let usage = [KeyUsage {
            hour_start_ms: now - HOUR_MS,
            source: "signing_key".to_owned(),
            kid: "a".to_owned(),
            alg: "ES256".to_owned(),
            verified_count: 5,
            last_verified_at_ms: now - 1,
        }];
        let judge = |last_dropped_at_ms| {
            let dropped = DroppedUsage {
                count: 3,
                last_dropped_at_ms,
            };
            legacy_verdict(true, &usage, Some(0), Some(dropped), window, now)
        };
        let inside = judge(now - HOUR_MS);
        assert!(!inside.legacy_revocation_safe);
        assert_eq!(
            inside.reason,
            "3 verifications were left out of the usage evidence (its buffer was full while the \
             database was away), the last at 1970-01-05 03:00 UTC: legacy use among them would \
             not show; wait until 1970-01-05 04:00 UTC"
        );
        assert!(judge(now - HOUR_MS - 1).legacy_revocation_safe);
    }

    /// The key and caller verifications in a batch.
    fn batch_counts((keys, _, callers): &Batch) -> (i64, i64) {
        let keys = keys.iter().map(|row| row.verified_count).sum();
        let callers = callers.iter().map(|row| row.verified_count).sum();
        (keys, callers)
    }

    /// A legacy or API-key verification counts its caller, then its key. A flush that began
    /// between the two took one into its batch and left the other to the next, so the database
    /// held a legacy count under "no caller recorded" until then (up to a minute). A flush
    /// beginning there now waits, and takes both in one batch. The flush is the service's
    /// ([`UsageTracker::take_batch_by`]), its locks tried instead of waited for.
    #[test]
    fn a_flush_between_a_keys_count_and_its_callers_takes_both_or_neither() {
        static BATCHES: Mutex<Vec<(i64, i64)>> = Mutex::new(Vec::new());
        fn flush_now(tracker: &UsageTracker) {
            if let Some(batch) = tracker.take_batch_by(Try) {
                BATCHES.lock().unwrap().push(batch_counts(&batch));
            }
        }
        let tracker = UsageTracker::default();
        tracker.between_writes.set(flush_now).expect("set once");
        let legacy = legacy_verification();
        let kind = CallerKind::of(&legacy).expect("a legacy caller");
        tracker.record_with_caller(&legacy, kind, "/rest/v1/{table}", "supabase-js", HOUR_MS);
        let after = tracker.take_batch_by(Try).expect("no lock is held now");
        BATCHES.lock().unwrap().push(batch_counts(&after));
        assert_eq!(
            *BATCHES.lock().unwrap(),
            [(1, 1)],
            "verifications of the key and of its caller in each batch"
        );
    }

    /// The other way round: a legacy verification counted while a flush is between taking the
    /// callers and taking the key counts waits for it, and lands in the next batch whole. The
    /// flush is the service's ([`UsageTracker::take_batch`]); the request is its locks tried.
    #[test]
    fn a_verification_during_a_flush_lands_in_one_batch() {
        static WAITED: Mutex<Vec<bool>> = Mutex::new(Vec::new());
        fn verify_now(tracker: &UsageTracker) {
            if !WAITED.lock().unwrap().is_empty() {
                return;
            }
            let legacy = legacy_verification();
            let kind = CallerKind::of(&legacy).expect("a legacy caller");
            let counted = tracker
                .record_with_caller_by(Try, &legacy, kind, "/rest/v1/{table}", "supabase-js", 5)
                .is_some();
            WAITED.lock().unwrap().push(!counted);
        }
        let tracker = UsageTracker::default();
        tracker
            .after_taking_callers
            .set(verify_now)
            .expect("set once");
        let mut batches = vec![batch_counts(&tracker.take_batch())];
        if WAITED.lock().unwrap().iter().all(|waited| *waited) {
            // It waited for the flush: it is counted once the flush let go.
            let legacy = legacy_verification();
            let kind = CallerKind::of(&legacy).expect("a legacy caller");
            tracker.record_with_caller(&legacy, kind, "/rest/v1/{table}", "supabase-js", 5);
        }
        batches.push(batch_counts(&tracker.take_batch()));
        assert_eq!(
            *WAITED.lock().unwrap(),
            [true],
            "the request waited for the flush"
        );
        assert_eq!(
            batches,
            [(0, 0), (1, 1)],
            "verifications of the key and of its caller in each batch"
        );
    }

    /// Both or neither holds only while the callers' lock is kept until the key counts' is
    /// taken, by a request and by a flush alike: let go a step earlier, a flush between the
    /// two took a caller without its key (or a key without its caller). Each taking of the key
    /// counts' lock says whether the callers' was held then.
    #[test]
    fn the_key_counts_lock_is_taken_with_the_callers_still_held() {
        #[derive(Clone, Copy)]
        struct Watch<'a> {
            tracker: &'a UsageTracker,
            seen: &'a Mutex<Vec<bool>>,
        }
        impl Locking for Watch<'_> {
            fn lock<T>(self, mutex: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
                let key_counts = std::ptr::from_ref(&self.tracker.held).cast::<()>();
                if std::ptr::from_ref(mutex).cast::<()>() == key_counts {
                    let callers_held = self.tracker.callers.counts().try_lock().is_err();
                    self.seen.lock().unwrap().push(callers_held);
                }
                Wait.lock(mutex)
            }
        }
        let tracker = UsageTracker::default();
        let seen = Mutex::new(Vec::new());
        let watch = Watch {
            tracker: &tracker,
            seen: &seen,
        };
        let legacy = legacy_verification();
        let kind = CallerKind::of(&legacy).expect("a legacy caller");
        tracker
            .record_with_caller_by(watch, &legacy, kind, "/rest/v1/{table}", "supabase-js", 5)
            .expect("Wait never fails");
        let batch = tracker.take_batch_by(watch).expect("Wait never fails");
        assert_eq!(batch_counts(&batch), (1, 1));
        assert_eq!(
            *seen.lock().unwrap(),
            [true, true],
            "the callers' lock held when the request, then the flush, took the key counts'"
        );
    }

    /// A signing key's verification takes the key counts' lock alone: it never waits for
    /// caller bookkeeping (a flush settling the callers, a request counting its caller), which
    /// is done with the key counts' lock free.
    #[test]
    fn a_signing_keys_count_never_waits_on_caller_work() {
        static FREE: Mutex<Vec<(&str, bool)>> = Mutex::new(Vec::new());
        fn free_at(tracker: &UsageTracker, step: &'static str) {
            let free = tracker.held.try_lock().is_ok();
            FREE.lock().unwrap().push((step, free));
        }
        let tracker = UsageTracker::default();
        tracker
            .between_writes
            .set(|tracker| free_at(tracker, "request"))
            .expect("set once");
        tracker
            .after_taking_callers
            .set(|tracker| free_at(tracker, "flush"))
            .expect("set once");
        let legacy = legacy_verification();
        let kind = CallerKind::of(&legacy).expect("a legacy caller");
        tracker.record_with_caller(&legacy, kind, "/rest/v1/{table}", "supabase-js", HOUR_MS);
        tracker.take_batch();
        assert_eq!(
            *FREE.lock().unwrap(),
            [("request", true), ("flush", true)],
            "the key counts' lock free while the callers are counted or taken"
        );
    }

    fn legacy_verification() -> Verified {
        Verified {
            source: KeySource::LegacySecret,
            kid: None,
            alg: "HS256",
            role: Some("anon".into()),
            ..signing_key("")
        }
    }

    /// One flush that fails is one failure, whatever it failed to write: with verifications
    /// dropped, both the note of the drop and the counts failed, and it was counted twice.
    #[tokio::test]
    async fn a_failed_flush_is_counted_once() {
        let config = crate::config::Config::from_lookup(|name| {
            (name == "DATABASE_URL").then(|| "sqlite::memory:".to_owned())
        })
        .unwrap();
        let store = Store::connect(&config.database_url).await.unwrap();
        store.close().await;
        let tracker = UsageTracker::with_max_buckets(1);
        tracker.record(&signing_key("a"), HOUR_MS);
        tracker.record(&signing_key("b"), HOUR_MS);
        assert_eq!(tracker.dropped(), 1);
        assert!(tracker.flush(&store).await.is_err());
        assert_eq!(
            tracker.flush_failures.get(),
            1,
            "failures counted for one flush"
        );
    }

    #[test]
    fn the_dropped_count_is_exported() {
        let tracker = UsageTracker::with_max_buckets(0);
        tracker.record(&signing_key("a"), 0);
        let mut registry = Registry::with_prefix("edgegate");
        tracker.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("edgegate_key_usage_dropped_total 1"),
            "{text}"
        );
    }
}
