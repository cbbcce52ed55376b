//! The JWKS fetcher: keeps the fetched part of the key ring fresh.
//!
//! - One fetch at a time (single flight); a fetch takes at most [`FETCH_TIMEOUT`], reads at most
//!   [`MAX_JWKS_BYTES`] and [`MAX_JWKS_KEYS`](crate::auth::keys::MAX_JWKS_KEYS) keys.
//! - A failed or unusable answer never replaces the last good set (stale-if-error), until the
//!   set has been stale (past its freshness lifetime) for more than [`MAX_STALE`]: then the
//!   fetched keys are dropped, since keys that old may have been revoked long ago, and their
//!   ETag with them, so the next fetch asks for the whole set instead of a 304 that would keep
//!   the ring empty. A well-formed set replaces it whatever it holds, even no usable key:
//!   taking a key out of the JWKS is how it is revoked, and `{"keys":[]}` is what a project
//!   that revoked every signing key publishes.
//! - Freshness: `Cache-Control: max-age` less the answer's `Age`, clamped to [30 s, 1 h], else
//!   the configured TTL, with ±10 % jitter so a fleet does not fetch in lockstep. Failures back
//!   off exponentially from 5 s, capped at the least of the held set's freshness, the TTL and
//!   1 h, then jittered ±10 % (so up to 10 % past the cap), and never below `min_refresh`.
//! - `on_unknown_kid` refetches at most once per `min_refresh`; a caller during the cool-down is
//!   refused at once, and one that arrives while a fetch is running shares that fetch.
//! - `refresh_now` (the admin refresh) ignores the cool-down and the ETag (no `If-None-Match`),
//!   and answers from a fetch begun after it was called; calls that arrive while a fetch is
//!   running share the one that follows it.
//! - `JWKS fetched` is logged at INFO for the first set and for a set that differs from the one
//!   held (naming the kids added, removed and replaced); the same set again is at DEBUG.

use crate::auth::keyring::{FetchedInfo, KeyRingHandle};
use crate::auth::keys::{DroppedKey, JwksDocError, parse_fetched_entries, parse_jwks_document};
use crate::backoff;
use crate::clock::Clock;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::Instrument as _;
use url::Url;

/// Longest a single JWKS request may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS body read.
pub const MAX_JWKS_BYTES: usize = 64 * 1024;
/// How long the last good set keeps verifying while fetches fail, counted from the end of its
/// freshness lifetime (stale-if-error).
pub const MAX_STALE: Duration = Duration::from_secs(24 * 60 * 60);
/// Bounds applied to a server's `Cache-Control: max-age`.
pub const MAX_AGE_BOUNDS: (Duration, Duration) =
    (Duration::from_secs(30), Duration::from_secs(3600));
const BACKOFF_START: Duration = Duration::from_secs(5);

/// The client the JWKS is fetched with, apart from the one used for Stripe and Twilio: it never
/// follows a redirect, so a JWKS host cannot point edgegate's requests at another address.
pub fn http_client(url: Option<&Url>) -> reqwest::Client {
    crate::outbound::build(|| {
        crate::outbound::client_builder(Some("jwks"), url.as_slice()).timeout(FETCH_TIMEOUT)
    })
}

/// Fetcher settings. Its `Debug` shows `url` without its query, where a key may be.
#[derive(Clone)]
pub struct JwksConfig {
    /// The JWKS location.
    pub url: Url,
    /// Freshness when the server sends no usable `max-age`.
    pub ttl: Duration,
    /// Least time between two fetches (`JWKS_MIN_REFRESH_SECONDS`).
    pub min_refresh: Duration,
}

impl std::fmt::Debug for JwksConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksConfig")
            .field("url", &crate::config::shown_url(&self.url))
            .field("ttl", &self.ttl)
            .field("min_refresh", &self.min_refresh)
            .finish()
    }
}

/// Why a fetch produced no new key set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// Connection error or timeout.
    #[error("JWKS request failed: {0}")]
    Transport(String),
    /// A redirect: keys are taken only from the configured location, and a redirect is not
    /// followed (a JWKS host must not be able to point edgegate's requests elsewhere).
    #[error("JWKS answered HTTP {0}, a redirect, which is not followed")]
    Redirected(u16),
    /// The client passed in followed a redirect: the answer came from another URL.
    #[error("JWKS request was redirected to another URL")]
    RedirectFollowed,
    /// A status other than 200 (or 304 after `If-None-Match`).
    #[error("JWKS answered HTTP {0}")]
    Status(u16),
    /// The body exceeded [`MAX_JWKS_BYTES`].
    #[error("JWKS body exceeds {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    /// Not a usable JWKS document.
    #[error(transparent)]
    Document(#[from] JwksDocError),
}

impl FetchError {
    /// A transport failure with its causes ("… : tcp connect error: Connection refused"),
    /// which say more to an operator than reqwest's top-level message alone.
    fn transport(err: reqwest::Error) -> Self {
        let err = err.without_url();
        let mut message = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self::Transport(message)
    }
}

/// What a successful fetch did.
#[derive(Debug, Clone)]
pub struct FetchReport {
    /// Keys now in the fetched set.
    pub keys: usize,
    /// Keys refused from the document, with reasons.
    pub dropped: Vec<DroppedKey>,
    /// The server answered 304: the set is unchanged.
    pub not_modified: bool,
    /// Key ring generation after the fetch.
    pub generation: u64,
    /// Freshness lifetime chosen for the set.
    pub ttl: Duration,
}

/// Whether a fetch sends the set's validator (`If-None-Match` with its ETag), so that an
/// unchanged set costs the host a 304.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Validator {
    /// The scheduled and unknown-kid fetches.
    Send,
    /// The admin refresh, for urgent revocation: a host (or a cache in front of it) whose ETag
    /// did not change with its set answers 304 and keeps a removed key verifying, so it is not
    /// asked whether the set changed.
    Omit,
}

/// What [`JwksFetcher::on_unknown_kid`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefetchOutcome {
    /// This call fetched and the ring was updated: look the kid up again.
    Fetched,
    /// Another fetch was running; this call waited for it: look the kid up again.
    Joined,
    /// Within the cool-down: refused at once.
    Suppressed,
    /// The fetch failed; the ring is unchanged.
    Failed,
}

/// Counters for metrics; all updates are lock-free.
#[derive(Debug)]
pub struct JwksStats {
    fetch_ok: AtomicU64,
    fetch_failed: AtomicU64,
    refetch_suppressed: AtomicU64,
    unknown_kid_refetches: AtomicU64,
    last_success_unix: AtomicI64,
    stale: AtomicBool,
    expired: AtomicBool,
}

impl Default for JwksStats {
    fn default() -> Self {
        Self {
            fetch_ok: AtomicU64::new(0),
            fetch_failed: AtomicU64::new(0),
            refetch_suppressed: AtomicU64::new(0),
            unknown_kid_refetches: AtomicU64::new(0),
            last_success_unix: AtomicI64::new(i64::MIN),
            stale: AtomicBool::new(false),
            expired: AtomicBool::new(false),
        }
    }
}

/// A point-in-time copy of [`JwksStats`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct JwksStatsSnapshot {
    /// Successful fetches (200 or 304).
    pub fetches_ok: u64,
    /// Failed fetches.
    pub fetches_failed: u64,
    /// Unknown-kid refetches refused by the cool-down.
    pub refetches_suppressed: u64,
    /// Fetches started because of an unknown kid.
    pub unknown_kid_refetches: u64,
    /// Last successful fetch, Unix seconds.
    pub last_success_unix: Option<i64>,
    /// Age of the fetched set in seconds.
    pub key_set_age_seconds: Option<i64>,
    /// The set is past its freshness lifetime, or was never fetched, because fetches fail.
    pub stale: bool,
    /// The set went stale beyond [`MAX_STALE`] and its keys were dropped.
    pub expired: bool,
}

impl JwksStats {
    /// Copies the counters, with the key set's age (`None` before the first good fetch).
    pub fn snapshot(&self, key_set_age: Option<Duration>) -> JwksStatsSnapshot {
        let last = self.last_success_unix.load(Ordering::Relaxed);
        let last = (last != i64::MIN).then_some(last);
        JwksStatsSnapshot {
            fetches_ok: self.fetch_ok.load(Ordering::Relaxed),
            fetches_failed: self.fetch_failed.load(Ordering::Relaxed),
            refetches_suppressed: self.refetch_suppressed.load(Ordering::Relaxed),
            unknown_kid_refetches: self.unknown_kid_refetches.load(Ordering::Relaxed),
            last_success_unix: last,
            key_set_age_seconds: key_set_age
                .map(|age| i64::try_from(age.as_secs()).unwrap_or(i64::MAX)),
            stale: self.stale.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
        }
    }
}

/// State for the admin endpoint.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct JwksStatus {
    /// The JWKS location, without its query (`?…`), where a key may be, and its fragment.
    pub url: String,
    /// Counters.
    pub stats: JwksStatsSnapshot,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// The last failure, if the last attempt failed.
    pub last_error: Option<String>,
    /// Keys the last successful fetch refused, with reasons.
    pub dropped: Vec<DroppedKey>,
}

#[derive(Debug, Default)]
struct State {
    last_attempt: Option<Instant>,
    last_success: Option<Instant>,
    next_delay: Duration,
    consecutive_failures: u32,
    last_error: Option<String>,
    dropped: Vec<DroppedKey>,
}

struct Inner {
    cfg: JwksConfig,
    client: reqwest::Client,
    ring: Arc<KeyRingHandle>,
    clock: Clock,
    stats: JwksStats,
    /// Held for the whole of a fetch: the single flight.
    fetch_lock: Arc<tokio::sync::Mutex<()>>,
    state: Mutex<State>,
    /// Bumped after every fetch attempt, so waiters can join a running fetch.
    done: watch::Sender<u64>,
    /// The refresh (`refresh_now`) waiting for the fetch lock, which every refresh arriving
    /// meanwhile shares; taken out when its fetch begins.
    next_refresh: Mutex<Option<SharedFetch>>,
}

/// Where the result of a refresh is published for those sharing it; closed with no result when
/// its task ended without one (a panic, the runtime shutting down).
type SharedFetch = watch::Receiver<Option<Result<FetchReport, FetchError>>>;

/// Fetches the JWKS into a [`KeyRingHandle`]. Cheap to clone.
#[derive(Clone)]
pub struct JwksFetcher {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for JwksFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksFetcher")
            .field("url", &crate::config::shown_url(&self.inner.cfg.url))
            .finish_non_exhaustive()
    }
}

impl JwksFetcher {
    /// A fetcher that writes into `ring`. Nothing is fetched until asked or [`JwksFetcher::spawn`]ed.
    /// Redirects are refused whatever `client`'s policy (a redirected answer is a failure), but
    /// only a client that does not follow them ([`http_client`]) keeps the JWKS host from
    /// making edgegate send a request elsewhere.
    pub fn new(
        cfg: JwksConfig,
        client: reqwest::Client,
        ring: Arc<KeyRingHandle>,
        clock: Clock,
    ) -> Self {
        let (done, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                cfg,
                client,
                ring,
                clock,
                stats: JwksStats::default(),
                fetch_lock: Arc::new(tokio::sync::Mutex::new(())),
                state: Mutex::new(State::default()),
                done,
                next_refresh: Mutex::new(None),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state holds plain values that are always left consistent; a poisoned lock
        // (a panic elsewhere) does not make them unusable.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The counters.
    pub fn stats(&self) -> &JwksStats {
        &self.inner.stats
    }

    /// Counters plus failure details, for the admin endpoint.
    pub fn status(&self) -> JwksStatus {
        let state = self.state();
        // The age by the monotonic clock: the wall clock's, stepped by NTP, made a set fetched a
        // minute ago a day old (the alert on it fired) or kept an old one young.
        let now = self.inner.clock.now();
        let age = state
            .last_success
            .map(|at| now.saturating_duration_since(at));
        JwksStatus {
            url: crate::config::shown_url(&self.inner.cfg.url),
            stats: self.inner.stats.snapshot(age),
            consecutive_failures: state.consecutive_failures,
            last_error: state.last_error.clone(),
            dropped: state.dropped.clone(),
        }
    }

    fn in_cooldown(&self) -> bool {
        let now = self.inner.clock.now();
        self.state()
            .last_attempt
            .is_some_and(|t| now.saturating_duration_since(t) < self.inner.cfg.min_refresh)
    }

    /// Asks for a refetch because a token named a kid the ring does not hold. Returns at once
    /// (with [`RefetchOutcome::Suppressed`]) during the cool-down; never queues behind it.
    pub async fn on_unknown_kid(&self) -> RefetchOutcome {
        let mut done = self.inner.done.subscribe();
        done.borrow_and_update();
        let lock = self.inner.fetch_lock.clone();
        let guard = match lock.clone().try_lock_owned() {
            Ok(guard) => guard,
            Err(_) => {
                // A fetch is running: share it rather than start another. The holder may also
                // be the background task finding that nothing is due, which fetches nothing:
                // the lock then comes free with no fetch ended, and this caller asks itself.
                let waited = tokio::time::timeout(FETCH_TIMEOUT + Duration::from_secs(1), async {
                    tokio::select! {
                        biased;
                        changed = done.changed() => changed.ok().map(|()| None),
                        guard = lock.lock_owned() => Some(Some(guard)),
                    }
                })
                .await;
                match waited {
                    Ok(Some(Some(guard))) if !done.has_changed().unwrap_or(true) => guard,
                    Ok(Some(_)) => return RefetchOutcome::Joined,
                    Ok(None) | Err(_) => return RefetchOutcome::Failed,
                }
            }
        };
        if self.in_cooldown() {
            self.inner
                .stats
                .refetch_suppressed
                .fetch_add(1, Ordering::Relaxed);
            return RefetchOutcome::Suppressed;
        }
        self.inner
            .stats
            .unknown_kid_refetches
            .fetch_add(1, Ordering::Relaxed);
        if self.fetch_detached(guard).await.is_ok() {
            RefetchOutcome::Fetched
        } else {
            RefetchOutcome::Failed
        }
    }

    /// Holds the fetch lock as the background task's check does, for tests of those who wait.
    #[cfg(test)]
    pub(crate) async fn hold_fetch_lock(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.inner.fetch_lock.clone().lock_owned().await
    }

    /// Fetches now, for urgent revocation: ignores the cool-down and asks for the whole set
    /// ([`Validator::Omit`]), but still one fetch at a time.
    /// The answer comes from a fetch begun after the call (one under way may hold a set from
    /// before the key was removed). Calls that arrive while a fetch is under way share the one
    /// that follows it, so a burst of refreshes costs at most two fetches instead of queueing
    /// one each on the fetch lock, where they kept unknown-kid refetches and the scheduled
    /// refresh waiting behind them. The fetch runs in a task of its own, so a caller that stops
    /// waiting leaves it to finish for the others.
    pub async fn refresh_now(&self) -> Result<FetchReport, FetchError> {
        let mut shared = {
            let mut next = self
                .inner
                .next_refresh
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match next.as_ref() {
                // Not begun yet (it is taken out when it begins), and not ended without a result.
                Some(waiting) if waiting.has_changed().is_ok() => waiting.clone(),
                _ => {
                    let (publish, shared) = watch::channel(None);
                    *next = Some(shared.clone());
                    let fetcher = self.clone();
                    tokio::spawn(
                        async move {
                            let guard = fetcher.inner.fetch_lock.clone().lock_owned().await;
                            fetcher
                                .inner
                                .next_refresh
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .take();
                            let result = fetcher.fetch_locked(Validator::Omit).await;
                            drop(guard);
                            publish.send_replace(Some(result));
                        }
                        .in_current_span(),
                    );
                    shared
                }
            }
        };
        match shared.wait_for(Option::is_some).await {
            Ok(result) => result.clone().unwrap_or_else(|| unreachable!("waited for")),
            Err(_) => Err(FetchError::Transport(
                "the fetch ended without an answer (a panic, or the runtime shutting down)"
                    .to_owned(),
            )),
        }
    }

    /// One fetch in a task of its own, holding `guard` until it ends: a caller that stops
    /// waiting (a client that hung up, its request dropped) leaves the fetch to finish and
    /// record what it found, instead of cutting it off after it moved the schedule.
    async fn fetch_detached(
        &self,
        guard: tokio::sync::OwnedMutexGuard<()>,
    ) -> Result<FetchReport, FetchError> {
        let fetcher = self.clone();
        let fetch = tokio::spawn(
            async move {
                let result = fetcher.fetch_locked(Validator::Send).await;
                drop(guard);
                result
            }
            .in_current_span(),
        );
        match fetch.await {
            Ok(result) => result,
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            Err(_) => Err(FetchError::Transport(
                "the fetch was cancelled: the runtime is shutting down".to_owned(),
            )),
        }
    }

    /// Fetches if the set's freshness lifetime (or the failure backoff) has run out;
    /// `None` when not due. This is what the background task runs.
    pub async fn refresh_if_due(&self) -> Option<Result<FetchReport, FetchError>> {
        let _guard = self.inner.fetch_lock.lock().await;
        if !self.time_until_due().is_zero() {
            return None;
        }
        Some(self.fetch_locked(Validator::Send).await)
    }

    /// Time left until the next scheduled fetch (zero when due, or never fetched).
    pub fn time_until_due(&self) -> Duration {
        let state = self.state();
        match state.last_attempt {
            None => Duration::ZERO,
            Some(t) => {
                let elapsed = self.inner.clock.now().saturating_duration_since(t);
                state.next_delay.saturating_sub(elapsed)
            }
        }
    }

    /// Starts the background refresh: a fetch at once, then one whenever due.
    pub fn spawn(&self) -> RefreshTask {
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let fetcher = self.clone();
        let join = tokio::spawn(async move {
            let mut done = fetcher.inner.done.subscribe();
            loop {
                let wait = fetcher.time_until_due();
                if !wait.is_zero() {
                    tokio::select! {
                        _ = stop_rx.changed() => return,
                        // Someone else fetched: the schedule moved, recompute it.
                        _ = done.changed() => continue,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
                if *stop_rx.borrow() {
                    return;
                }
                if let Some(Err(e)) = fetcher.refresh_if_due().await {
                    tracing::warn!(error = %e, "JWKS refresh failed");
                }
                done.borrow_and_update();
            }
        });
        RefreshTask {
            stop: stop_tx,
            join: Some(join),
        }
    }

    /// One fetch; the caller holds `fetch_lock`.
    async fn fetch_locked(&self, validator: Validator) -> Result<FetchReport, FetchError> {
        let started = self.inner.clock.now();
        self.state().last_attempt = Some(started);
        let mut result = self.fetch_inner(validator).await;
        let mut state = self.state();
        match &mut result {
            Ok(report) => {
                state.consecutive_failures = 0;
                state.last_error = None;
                state.last_success = Some(started);
                // `min_refresh` is the least time between two fetches, whatever max-age said.
                state.next_delay = report.ttl.max(self.inner.cfg.min_refresh);
                // A 304 confirms the set, and the keys it drops with it.
                if report.not_modified {
                    report.dropped.clone_from(&state.dropped);
                } else {
                    // Warned of once while the set holds it: a key the last set dropped too
                    // (same kid, reason, origin and key material) is logged at DEBUG; another
                    // key under a dropped key's kid is warned of. Each of the last set's
                    // answers for one key only, so keys alike (no kid, the same reason) are told
                    // apart by how many there are: one more is warned of.
                    let mut before: Vec<&DroppedKey> = state.dropped.iter().collect();
                    for dropped in &report.dropped {
                        let known = before.iter().position(|seen| *seen == dropped);
                        if let Some(at) = known {
                            before.swap_remove(at);
                        }
                        crate::auth::keys::log_dropped(dropped, known.is_none());
                    }
                    state.dropped.clone_from(&report.dropped);
                }
                let stats = &self.inner.stats;
                stats.fetch_ok.fetch_add(1, Ordering::Relaxed);
                stats
                    .last_success_unix
                    .store(self.inner.clock.unix_now(), Ordering::Relaxed);
                stats.stale.store(false, Ordering::Relaxed);
                stats.expired.store(false, Ordering::Relaxed);
            }
            Err(e) => {
                let ring = self.inner.ring.load();
                state.consecutive_failures = state.consecutive_failures.saturating_add(1);
                state.last_error = Some(e.to_string());
                state.next_delay = self.backoff(
                    state.consecutive_failures,
                    ring.fetched_info().map(|info| info.ttl),
                );
                let stats = &self.inner.stats;
                stats.fetch_failed.fetch_add(1, Ordering::Relaxed);
                if state.last_success.is_none() {
                    // No set was ever fetched: every token of a fetched signing key (all but
                    // SUPABASE_JWKS's) is refused, as with a set gone stale, and it reads so (the
                    // runbook alerts on stale).
                    stats.stale.store(true, Ordering::Relaxed);
                }
                if let (Some(info), Some(last)) = (ring.fetched_info(), state.last_success) {
                    let age = self.inner.clock.now().saturating_duration_since(last);
                    stats.stale.store(age > info.ttl, Ordering::Relaxed);
                    // Counted from the end of the set's freshness: with a TTL near a day, the
                    // first scheduled refresh already comes more than MAX_STALE after the fetch.
                    let stale_for = age.saturating_sub(info.ttl);
                    if stale_for > MAX_STALE && ring.fetched_len() > 0 {
                        tracing::error!(
                            age_secs = age.as_secs(),
                            stale_secs = stale_for.as_secs(),
                            "JWKS stale beyond the limit: fetched keys dropped"
                        );
                        self.inner.ring.clear_fetched();
                        stats.expired.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
        drop(state);
        self.inner.done.send_modify(|n| *n = n.wrapping_add(1));
        result
    }

    /// The wait after `failures` failed fetches in a row: 5 s doubling, capped at the least of
    /// the held set's freshness (`held`: its `max-age`, already jittered ±10 % when it was
    /// fetched), the configured TTL and [`MAX_AGE_BOUNDS`]'s ceiling, then jittered ±10 % as the
    /// schedule is. Capped by the configured TTL alone, a day-long
    /// `JWKS_CACHE_TTL_SECONDS` (which a `max-age` overrides) let an outage of hours put the next
    /// fetch hours after the host came back.
    fn backoff(&self, failures: u32, held: Option<Duration>) -> Duration {
        let cap = held
            .map_or(self.inner.cfg.ttl, |ttl| ttl.min(self.inner.cfg.ttl))
            .min(MAX_AGE_BOUNDS.1);
        let step = backoff::exponential(BACKOFF_START, failures, cap);
        backoff::jitter(step).max(self.inner.cfg.min_refresh)
    }

    async fn fetch_inner(&self, validator: Validator) -> Result<FetchReport, FetchError> {
        let ring = self.inner.ring.load();
        let etag = match validator {
            Validator::Send => ring.fetched_info().and_then(|i| i.etag.clone()),
            Validator::Omit => None,
        };
        let mut request = self
            .inner
            .client
            .get(self.inner.cfg.url.clone())
            .timeout(FETCH_TIMEOUT);
        if let Some(etag) = &etag {
            request = request.header(reqwest::header::IF_NONE_MATCH, etag);
        }
        if validator == Validator::Omit {
            // The whole set, fresh: a cache on the way (a CDN in front of the host) is asked to
            // revalidate, not to answer with what it holds.
            request = request.header(reqwest::header::CACHE_CONTROL, "no-cache");
        }
        let response = crate::telemetry::send(request)
            .await
            .map_err(FetchError::transport)?;
        let status = response.status();
        if status.is_redirection() && status != reqwest::StatusCode::NOT_MODIFIED {
            return Err(FetchError::Redirected(status.as_u16()));
        }
        // The fragment is the client's own, never sent, and absent from the answer's URL.
        let (mut asked, mut answered) = (self.inner.cfg.url.clone(), response.url().clone());
        asked.set_fragment(None);
        answered.set_fragment(None);
        if answered != asked {
            // A client that follows redirects was passed in; refuse what it followed to.
            return Err(FetchError::RedirectFollowed);
        }
        let ttl = backoff::jitter(freshness(response.headers(), self.inner.cfg.ttl));
        let new_etag = response
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() <= 256)
            .map(str::to_owned);
        let info = |etag| FetchedInfo {
            fetched_at: self.inner.clock.wall(),
            fetched_instant: self.inner.clock.now(),
            etag,
            ttl,
        };

        if status == reqwest::StatusCode::NOT_MODIFIED
            && etag.is_some()
            && ring.fetched_info().is_some()
        {
            let generation = self.inner.ring.touch_fetched(info(new_etag.or(etag)));
            return Ok(FetchReport {
                keys: ring.fetched_len(),
                dropped: Vec::new(),
                not_modified: true,
                generation,
                ttl,
            });
        }
        if status != reqwest::StatusCode::OK {
            return Err(FetchError::Status(status.as_u16()));
        }
        let body = crate::outbound::read_capped(response, MAX_JWKS_BYTES)
            .await
            .map_err(|err| match err {
                crate::outbound::BodyError::TooLarge { .. } => FetchError::TooLarge,
                crate::outbound::BodyError::CutShort(err) => FetchError::transport(err),
            })?;
        let entries = parse_jwks_document(&body, false)?;
        let mut parsed = parse_fetched_entries(&entries);
        let (taken, overridden) = ring.without_overridden(parsed.keys);
        parsed.dropped.extend(overridden);
        let keys = taken.len();
        // Under the fetch lock nothing else changes the fetched keys: `ring` holds them still.
        let first = ring.fetched_info().is_none();
        let changes = ring.fetched_changes(&taken);
        let generation = self.inner.ring.replace_fetched(taken, info(new_etag));
        let dropped = parsed.dropped.len();
        if first || !changes.is_empty() {
            // The kids, comma-separated; no field when there are none.
            let kids = |kids: &[String]| (!kids.is_empty()).then(|| kids.join(","));
            tracing::info!(
                keys,
                dropped,
                generation,
                added = kids(&changes.added),
                removed = kids(&changes.removed),
                replaced = kids(&changes.replaced),
                "JWKS fetched"
            );
        } else {
            // The same set again (a fetch for an unknown kid, a host that sends no ETag):
            // routine, at up to one a `min_refresh`, and not what an operator looks for.
            tracing::debug!(keys, dropped, generation, "JWKS fetched");
        }
        Ok(FetchReport {
            keys,
            dropped: parsed.dropped,
            not_modified: false,
            generation,
            ttl,
        })
    }
}

/// Freshness from `Cache-Control: max-age` less the answer's `Age` (the time a cache in front of
/// the host has held it), clamped to [`MAX_AGE_BOUNDS`] (a `max-age` too large to represent is
/// the largest one); `no-cache`/`no-store` count as the lower bound; otherwise `default`.
pub fn freshness(headers: &reqwest::header::HeaderMap, default: Duration) -> Duration {
    let (lo, hi) = MAX_AGE_BOUNDS;
    let age = age(headers).unwrap_or(0);
    let mut found = None;
    for value in headers.get_all(reqwest::header::CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for directive in value.split(',') {
            let directive = directive.trim();
            let lower = directive.to_ascii_lowercase();
            if lower == "no-cache" || lower == "no-store" {
                return lo;
            }
            if let Some(secs) = lower.strip_prefix("max-age=")
                && let Some(secs) = delta_seconds(secs.trim_matches('"'))
            {
                found = Some(Duration::from_secs(secs.saturating_sub(age)).clamp(lo, hi));
            }
        }
    }
    found.unwrap_or(default)
}

/// A `max-age` value in seconds; `None` unless it is an integer. One too large to represent
/// counts as the largest one (RFC 9111 §1.2.2), so the upper bound applies to it.
fn delta_seconds(value: &str) -> Option<u64> {
    match value.parse::<u64>() {
        Ok(secs) => Some(secs),
        Err(err) if *err.kind() == std::num::IntErrorKind::PosOverflow => Some(u64::MAX),
        Err(_) => None,
    }
}

/// The `Age` header in seconds (RFC 9111 §5.1); `None` unless it is a non-negative integer. A
/// value too large to represent counts as the largest one (RFC 9111 §1.2.2).
fn age(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    let value = headers.get(reqwest::header::AGE)?.to_str().ok()?.trim();
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(value.parse().unwrap_or(u64::MAX))
}

/// The running background refresh. Dropping it stops the task too.
#[derive(Debug)]
pub struct RefreshTask {
    stop: watch::Sender<bool>,
    join: Option<tokio::task::JoinHandle<()>>,
}

impl RefreshTask {
    /// Stops the task and waits for it to end.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(join) = self.join.take() {
            let _ = join.await;
        }
    }
}

impl Drop for RefreshTask {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{AGE, CACHE_CONTROL, HeaderMap, HeaderValue};

    /// The fetcher's settings print their URL without its query, where a key may be (its
    /// derived `Debug` printed `?apikey=sb_secret_…` whole).
    #[test]
    fn settings_debug_without_the_urls_query() {
        let settings = JwksConfig {
            url: Url::parse("https://jwks.example.com/jwks.json?apikey=sb_secret_querysecret")
                .unwrap(),
            ttl: Duration::from_secs(600),
            min_refresh: Duration::from_secs(30),
        };
        let shown = format!("{settings:?}");
        assert!(!shown.contains("querysecret"), "{shown}");
        assert!(
            shown.contains("https://jwks.example.com/jwks.json?…"),
            "{shown}"
        );
    }

    #[test]
    fn max_age_is_clamped() {
        let ttl = Duration::from_secs(600);
        let mut h = HeaderMap::new();
        assert_eq!(freshness(&h, ttl), ttl);
        h.insert(CACHE_CONTROL, HeaderValue::from_static("public, max-age=5"));
        assert_eq!(freshness(&h, ttl), Duration::from_secs(30));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("max-age=86400"));
        assert_eq!(freshness(&h, ttl), Duration::from_secs(3600));
        h.insert(
            CACHE_CONTROL,
            HeaderValue::from_static("max-age=120, must-revalidate"),
        );
        assert_eq!(freshness(&h, ttl), Duration::from_secs(120));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        assert_eq!(freshness(&h, ttl), Duration::from_secs(30));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("max-age=banana"));
        assert_eq!(freshness(&h, ttl), ttl);
    }

    /// A `max-age` too large to represent is taken as the greatest one (RFC 9111 §1.2.2), so
    /// the upper clamp applies; it was taken as absent, and the configured TTL used.
    #[test]
    fn an_overflowing_max_age_is_the_greatest_one() {
        let ttl = Duration::from_secs(600);
        let with = |cc: &'static str, age: Option<&'static str>| {
            let mut h = HeaderMap::new();
            h.insert(CACHE_CONTROL, HeaderValue::from_static(cc));
            if let Some(age) = age {
                h.insert(AGE, HeaderValue::from_static(age));
            }
            freshness(&h, ttl)
        };
        let hi = MAX_AGE_BOUNDS.1;
        for cc in [
            "max-age=99999999999999999999999",
            "public, max-age=18446744073709551616",
            "max-age=\"99999999999999999999999\"",
            "MAX-AGE=99999999999999999999999",
        ] {
            assert_eq!(with(cc, None), hi, "{cc}");
            assert_eq!(with(cc, Some("3600")), hi, "{cc}, Age 3600");
        }
        assert_eq!(with("max-age=18446744073709551615", None), hi, "u64::MAX");
        assert_eq!(with("max-age=2147483648", None), hi, "2^31");
        // Still not delta-seconds: ignored, as before.
        for cc in ["max-age=-5", "max-age=1.5", "max-age=", "max-age=9e99"] {
            assert_eq!(with(cc, None), ttl, "{cc}");
        }
    }

    #[test]
    fn age_is_subtracted_from_max_age_before_the_clamp() {
        let ttl = Duration::from_secs(600);
        let with = |cc: &'static str, age: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(CACHE_CONTROL, HeaderValue::from_static(cc));
            h.insert(AGE, HeaderValue::from_static(age));
            freshness(&h, ttl)
        };
        assert_eq!(with("max-age=600", "120"), Duration::from_secs(480));
        assert_eq!(
            with("max-age=600", "590"),
            Duration::from_secs(30),
            "clamped up"
        );
        assert_eq!(
            with("max-age=600", "9000"),
            Duration::from_secs(30),
            "older than max-age"
        );
        assert_eq!(
            with("max-age=7200", "1800"),
            Duration::from_secs(3600),
            "clamped down"
        );
        for malformed in ["-5", "1.5", "+5", "banana", "", "10, 20"] {
            assert_eq!(
                with("max-age=300", malformed),
                Duration::from_secs(300),
                "Age {malformed:?} is ignored"
            );
        }
        assert_eq!(
            with("max-age=300", "99999999999999999999999"),
            Duration::from_secs(30),
            "too large to represent counts as very old"
        );
        assert_eq!(with("no-cache", "10"), Duration::from_secs(30));
        let mut h = HeaderMap::new();
        h.insert(AGE, HeaderValue::from_static("590"));
        assert_eq!(freshness(&h, ttl), ttl, "no max-age: the configured TTL");
    }
}
