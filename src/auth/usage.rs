//! Evidence for revocation: verifications counted per key in memory, flushed to the database in
//! hourly buckets, so every instance's traffic adds up and survives restarts. While the database
//! is away the counts stay in memory (bounded by `MAX_PENDING_BUCKETS`; what does not fit is
//! counted in `edgegate_key_usage_dropped_total`) and reach it once it is back.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::auth::callers::CallerTracker;
use crate::auth::{KeySource, Verified};
use crate::store::{KeyUsage, Store};

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

/// Counts verifications since the last flush.
#[derive(Debug)]
pub struct UsageTracker {
    pending: Mutex<Pending>,
    max_buckets: usize,
    /// Verifications not kept because the buffer was full.
    dropped: Counter,
    flush_failures: Counter,
    /// Who the legacy and API-key verifications came from, flushed with these counts.
    pub callers: CallerTracker,
}

impl Default for UsageTracker {
    fn default() -> Self {
        Self::with_max_buckets(MAX_PENDING_BUCKETS)
    }
}

/// The name a key's usage is recorded under: its kid, the API key's name, or empty for the
/// legacy secret (one secret, whatever `kid` its tokens carry). Stored in `key_usage_hourly` and
/// read back by the report, so it stays `""` where [`credential_name`] says `legacy`.
pub fn usage_kid(verified: &Verified) -> Arc<str> {
    static NONE: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(""));
    match (verified.source, &verified.kid) {
        (KeySource::LegacySecret, _) | (_, None) => Arc::clone(&NONE),
        (_, Some(kid)) => Arc::clone(kid),
    }
}

/// How metrics, log lines and the audit log name a credential: its kid, the API key's name, or
/// `legacy` for the legacy secret. Never the credential itself.
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
            pending: Mutex::new(Pending::default()),
            max_buckets,
            dropped: Counter::default(),
            flush_failures: Counter::default(),
            callers: CallerTracker::default(),
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

    pub fn record(&self, verified: &Verified, at_ms: i64) {
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
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        self.add(&mut pending, bucket, count);
    }

    /// Adds `count` to its bucket, or drops and counts it when a new bucket would not fit.
    fn add(&self, pending: &mut Pending, bucket: Bucket, count: Count) {
        let full = pending.len() >= self.max_buckets;
        match pending.get_mut(&bucket) {
            Some(held) => {
                held.verified += count.verified;
                held.first_ms = held.first_ms.min(count.first_ms);
                held.last_ms = held.last_ms.max(count.last_ms);
            }
            None if full => {
                self.dropped
                    .inc_by(u64::try_from(count.verified).unwrap_or(0));
            }
            None => {
                pending.insert(bucket, count);
            }
        }
    }

    /// The pending counts, and the earliest verification among them.
    fn take(&self) -> (Vec<KeyUsage>, Option<i64>) {
        let drained: Vec<_> = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        let first = drained.iter().map(|(_, count)| count.first_ms).min();
        let rows = drained
            .iter()
            .map(|(bucket, count)| row(bucket, count))
            .collect();
        (rows, first)
    }

    /// Writes the pending counts, callers included; on failure they are kept for the next flush.
    pub async fn flush(&self, store: &Store) -> anyhow::Result<()> {
        // The key counts first: they are the revocation verdict's evidence.
        let keys = self.flush_keys(store).await;
        let callers = self.callers.flush(store).await;
        keys.and(callers)
    }

    async fn flush_keys(&self, store: &Store) -> anyhow::Result<()> {
        let (rows, Some(first)) = self.take() else {
            return Ok(());
        };
        let written = match store.note_usage_evidence(first).await {
            Ok(()) => store.add_key_usage(&rows).await,
            Err(err) => Err(err),
        };
        if let Err(err) = written {
            self.flush_failures.inc();
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
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
                self.add(&mut pending, bucket, count);
            }
            return Err(err);
        }
        Ok(())
    }

    /// The earliest verification this instance counted and has not flushed yet (ms).
    pub fn first_pending_verification(&self) -> Option<i64> {
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.values().map(|count| count.first_ms).min()
    }

    /// Everything counted here and not yet flushed from the hour starting at `since_ms` on, one
    /// row per hour and key (the admin report's hourly bars keep each hour; its totals add them).
    pub fn pending_since(&self, since_ms: i64) -> Vec<KeyUsage> {
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending
            .iter()
            .filter(|(bucket, _)| bucket.hour_start_ms >= since_ms)
            .map(|(bucket, count)| row(bucket, count))
            .collect()
    }
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

/// Flushes every `FLUSH_INTERVAL` (every `FLUSH_RETRY` while flushes fail) until stopped.
pub fn spawn_flusher(tracker: std::sync::Arc<UsageTracker>, store: Store) -> Flusher {
    spawn_flusher_every(tracker, store, FLUSH_INTERVAL, FLUSH_RETRY)
}

/// `spawn_flusher` with its pauses given (tests shorten them).
pub fn spawn_flusher_every(
    tracker: std::sync::Arc<UsageTracker>,
    store: Store,
    interval: Duration,
    retry: Duration,
) -> Flusher {
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let join = tokio::spawn(async move {
        let mut pause = interval;
        loop {
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = stopped.changed() => return,
            }
            pause = match tracker.flush(&store).await {
                Ok(()) => interval,
                Err(err) => {
                    tracing::warn!(
                        error = crate::error::causes(&err),
                        "key usage not flushed; kept in memory, will retry"
                    );
                    retry
                }
            };
        }
    });
    Flusher { stop, join }
}

/// The running flusher.
#[derive(Debug)]
pub struct Flusher {
    stop: tokio::sync::watch::Sender<bool>,
    join: tokio::task::JoinHandle<()>,
}

impl Flusher {
    /// Stops it between two flushes, never inside one: a flush takes the counts from memory
    /// before it writes them, so one cut off mid-write would lose them.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.join.await;
    }

    /// Stops it at once, mid-flush or not (tests that look at what a dead instance leaves).
    pub fn abort(&self) {
        self.join.abort();
    }
}

/// The verdict on revoking the legacy secret, with the evidence behind it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct LegacyVerdict {
    pub legacy_revocation_safe: bool,
    pub reason: String,
}

/// Decides from usage over the window (database plus this instance's pending counts).
pub fn legacy_verdict(
    legacy_configured: bool,
    usage: &[KeyUsage],
    evidence_since_ms: Option<i64>,
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
        return verdict(
            false,
            format!(
                "{legacy} request(s) verified with the legacy secret in the last {window_text}"
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
