//! Signature checks of cache misses made back to back, one batch a worker thread.
//!
//! A check (35–60 µs for ES256 and EdDSA, 15 for RS256) runs code and tables that an HTTP request's
//! own work (parsing, the answer, the socket calls) does not touch, and the other way round: made
//! one request at a time, each half finds its caches and branch history cold after the other. So a
//! miss queues its check on its worker thread and yields once; the first of the queued requests to
//! run again then makes every check queued on that thread in a row (up to [`MAX_BATCH`]), and the
//! others find theirs done. Under load the requests read in one turn of the runtime share a batch,
//! which takes 4–7 % off a fresh token's CPU time (BENCHMARKS.md, twenty-third pass), at the price
//! of a longer tail at saturation. A request alone has nobody to share with, and the yield costs it
//! ~3 % (the runtime polls its sockets once more before resuming it): so a thread batches while its
//! last batch held two checks or more, and otherwise checks at once, trying a batch again every
//! [`PROBE_EVERY`] misses to notice that the load came back. An HMAC check (the legacy secret's
//! HS256, ~2 µs) is shorter than what the yield costs (~1 µs more a request, measured): a token
//! whose signature is no longer than HS256's is checked at once.
//!
//! A check is the same [`verify`] call, with the same `now` and settings, that the request would
//! have made itself, against the key ring current when it is made (as before batching: a refresh
//! that lands while a request waits is seen by its check), so batching changes when a check is
//! made, never its result. The queue holds weak references: a request dropped while waiting (its
//! client went away) leaves nothing to check and nothing held beyond its slot, which the next batch
//! on that thread clears. A request that the runtime moved to another thread meanwhile makes its
//! own check if nobody has (and one that is being made elsewhere waits for it under the check's
//! lock, at most one check long).

use crate::auth::error::AuthError;
use crate::auth::keyring::{KeyRing, KeyRingHandle};
use crate::auth::verify::{Verified, VerifySettings, verify};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// The most checks one request makes for others before answering its own caller: bounds how
/// long one poll of a task holds its worker thread (32 ES256 checks, ~2 ms).
pub const MAX_BATCH: usize = 32;

/// While batches hold single checks, one miss in this many tries a batch again.
pub const PROBE_EVERY: u32 = 16;

/// The length of an HS256 signature in base64url (32 bytes); ES256 and EdDSA signatures have
/// 86 characters, RS256 ones at least 342.
const HMAC_SIGNATURE: usize = 43;

/// Whether `token`'s check is long enough to be worth a batch: its signature (the part after
/// its last dot) is longer than an HMAC's. Only a question of cost: any token is checked the
/// same way, in a batch or not.
fn worth_a_batch(token: &str) -> bool {
    token
        .rfind('.')
        .is_some_and(|dot| token.len() - dot - 1 > HMAC_SIGNATURE)
}

thread_local! {
    /// Checks queued on this thread and not yet made.
    static QUEUED: RefCell<VecDeque<Weak<Check>>> = const { RefCell::new(VecDeque::new()) };
    /// Whether this thread's last batch held two checks or more.
    static SHARED: Cell<bool> = const { Cell::new(false) };
    /// Misses on this thread until the next try of a batch (when the last one was not shared).
    static UNTIL_PROBE: Cell<u32> = const { Cell::new(0) };
}

/// Whether a miss on this thread should wait for a batch: yes while batches are shared, and
/// on every [`PROBE_EVERY`]th miss otherwise (the first included).
fn batching() -> bool {
    if SHARED.get() {
        return true;
    }
    let until = UNTIL_PROBE.get();
    UNTIL_PROBE.set(until.checked_sub(1).unwrap_or(PROBE_EVERY - 1));
    until == 0
}

/// Remembers that a batch of `made` checks was made on this thread.
fn made_batch(made: usize) {
    SHARED.set(made >= 2);
    if made >= 2 {
        UNTIL_PROBE.set(PROBE_EVERY - 1);
    }
}

/// One token's check, with everything it is made with.
pub struct Check {
    token: Box<str>,
    keys: Arc<KeyRingHandle>,
    settings: Arc<VerifySettings>,
    now: i64,
    state: Mutex<State>,
}

type Outcome = (Arc<KeyRing>, Result<Verified, AuthError>);

enum State {
    Queued,
    Made(Outcome),
    Taken,
}

impl Check {
    /// A check of `token` against the current ring of `keys` and `settings` at `now`, not
    /// queued yet.
    pub fn new(
        token: &str,
        keys: Arc<KeyRingHandle>,
        settings: Arc<VerifySettings>,
        now: i64,
    ) -> Arc<Self> {
        Arc::new(Self {
            token: token.into(),
            keys,
            settings,
            now,
            state: Mutex::new(State::Queued),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave a `State` half written: keep using it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the check if nobody has; returns whether this call made it.
    fn make(&self) -> bool {
        let mut state = self.state();
        if !matches!(*state, State::Queued) {
            return false;
        }
        *state = State::Made(self.verify());
        true
    }

    fn verify(&self) -> Outcome {
        let ring = self.keys.load();
        let result = verify(&ring, &self.settings, &self.token, self.now);
        (ring, result)
    }

    /// The check's result, made now if it has not been, and the key ring it was made with.
    fn take(&self) -> Outcome {
        let mut state = self.state();
        match std::mem::replace(&mut *state, State::Taken) {
            State::Made(outcome) => outcome,
            // Never taken twice (one owner, which takes it once): check again regardless.
            State::Queued | State::Taken => self.verify(),
        }
    }

    /// Whether the check has been made and not yet taken (for tests).
    #[cfg(test)]
    fn is_made(&self) -> bool {
        matches!(*self.state(), State::Made(_))
    }
}

/// Queues `check` on this thread.
fn queue(check: &Arc<Check>) {
    QUEUED.with(|q| q.borrow_mut().push_back(Arc::downgrade(check)));
}

/// Makes the checks queued on this thread, oldest first, up to [`MAX_BATCH`] of them;
/// returns how many it made (those dropped or made elsewhere are skipped, not counted).
fn make_queued() -> usize {
    let mut made = 0;
    while made < MAX_BATCH {
        // The queue is not borrowed during a check: nothing a check does queues one, but a
        // borrow held across it would turn any such change into a panic.
        let Some(next) = QUEUED.with(|q| q.borrow_mut().pop_front()) else {
            break;
        };
        if let Some(check) = next.upgrade() {
            made += usize::from(check.make());
        }
    }
    made
}

/// How many checks are queued on this thread (for tests).
#[cfg(test)]
fn queued() -> usize {
    QUEUED.with(|q| q.borrow().len())
}

/// Checks `token`: in this thread's next batch ([`in_batch`]) if its check is long and
/// batches are shared, else at once. Returns the result and the key ring it was made with.
pub async fn check(
    token: &str,
    keys: &Arc<KeyRingHandle>,
    settings: &Arc<VerifySettings>,
    now: i64,
) -> Outcome {
    if !worth_a_batch(token) || !batching() {
        let ring = keys.load();
        let result = verify(&ring, settings, token, now);
        return (ring, result);
    }
    let check = Check::new(token, Arc::clone(keys), Arc::clone(settings), now);
    in_batch(&check).await;
    check.take()
}

/// Queues `check`, yields once so that the other requests ready on this thread can queue
/// theirs, then makes the batch (in which an earlier request may have made `check` already);
/// returns how many checks this call made.
async fn in_batch(check: &Arc<Check>) -> usize {
    queue(check);
    tokio::task::yield_now().await;
    let made = make_queued();
    if made > 0 {
        made_batch(made);
    }
    made
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::keyring::FetchedInfo;
    use crate::auth::keys::parse_fetched_keys;
    use crate::auth::tests::util::{
        LEGACY_SECRET, TestKey, claims, hs256_token, now, ring, settings,
    };
    use std::time::{Duration, Instant, SystemTime};

    fn fetched_info() -> FetchedInfo {
        FetchedInfo {
            fetched_at: SystemTime::now(),
            fetched_instant: Instant::now(),
            etag: None,
            ttl: Duration::from_secs(600),
        }
    }

    fn check_of(key: &TestKey, keys: &Arc<KeyRingHandle>, sub: &str) -> Arc<Check> {
        let mut c = claims(now());
        c["sub"] = sub.into();
        Check::new(
            &key.token(&c),
            Arc::clone(keys),
            Arc::new(settings()),
            now(),
        )
    }

    /// A key ring handle holding `key` inline.
    fn keys_of(key: &TestKey) -> Arc<KeyRingHandle> {
        Arc::new(KeyRingHandle::new(ring(None, &[key.public_jwk()], &[])))
    }

    #[test]
    fn one_pass_makes_every_check_queued_on_the_thread() {
        let key = TestKey::es256("k");
        let keys = keys_of(&key);
        let checks: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|s| check_of(&key, &keys, s))
            .collect();
        checks.iter().for_each(queue);
        assert_eq!(make_queued(), 3);
        assert_eq!(queued(), 0);
        for (check, sub) in checks.iter().zip(["a", "b", "c"]) {
            assert!(check.is_made(), "{sub} was not checked in the pass");
            let (_, result) = check.take();
            assert_eq!(result.expect("verified").sub.as_deref(), Some(sub));
        }
    }

    #[test]
    fn a_pass_makes_at_most_a_batch() {
        let key = TestKey::eddsa("k");
        let keys = keys_of(&key);
        let checks: Vec<_> = (0..MAX_BATCH + 2)
            .map(|i| check_of(&key, &keys, &i.to_string()))
            .collect();
        checks.iter().for_each(queue);
        assert_eq!(make_queued(), MAX_BATCH);
        assert_eq!(queued(), 2);
        assert!(
            checks[..MAX_BATCH].iter().all(|c| c.is_made()),
            "oldest first"
        );
        assert_eq!(make_queued(), 2);
    }

    #[test]
    fn a_dropped_request_leaves_nothing_to_check() {
        let key = TestKey::es256("k");
        let keys = keys_of(&key);
        let kept = check_of(&key, &keys, "kept");
        let dropped = check_of(&key, &keys, "dropped");
        queue(&dropped);
        queue(&kept);
        drop(dropped);
        assert_eq!(
            make_queued(),
            1,
            "only the request still waiting is checked"
        );
        assert_eq!(queued(), 0, "the dropped request's slot is cleared");
        assert!(kept.is_made());
    }

    #[test]
    fn a_refresh_that_lands_while_a_request_waits_is_seen_by_its_check() {
        let key = TestKey::es256("new");
        let keys = Arc::new(KeyRingHandle::new(KeyRing::default()));
        let check = check_of(&key, &keys, "u");
        queue(&check);
        // The JWKS fetch that brings the token's key finishes before the batch is made.
        keys.replace_fetched(parse_fetched_keys(&[key.public_jwk()]).keys, fetched_info());
        assert_eq!(make_queued(), 1);
        let (used, result) = check.take();
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(used.generation(), keys.load().generation());
    }

    #[test]
    fn a_check_nobody_made_is_made_by_its_owner() {
        // Its request was moved to a thread whose queue does not hold it.
        let key = TestKey::rs256("k");
        let keys = keys_of(&key);
        let check = check_of(&key, &keys, "moved");
        let (used, result) = check.take();
        assert_eq!(result.expect("verified").sub.as_deref(), Some("moved"));
        assert!(
            Arc::ptr_eq(&used, &keys.load()),
            "made with the current ring"
        );
        queue(&check);
        assert_eq!(make_queued(), 0, "a check already taken is not made again");
    }

    #[test]
    fn only_checks_longer_than_an_hmac_are_batched() {
        let es = TestKey::es256("k").token(&claims(now()));
        let hs = hs256_token(LEGACY_SECRET, r#"{"alg":"HS256"}"#, "{}");
        assert!(worth_a_batch(&es));
        assert!(!worth_a_batch(&hs));
        for token in ["", "no dots", "a.b.", "a.b.c"] {
            assert!(!worth_a_batch(token), "{token}");
        }
        assert!(worth_a_batch(&format!("a.b.{}", "s".repeat(44))));
    }

    #[test]
    fn a_thread_batches_while_its_batches_are_shared_and_probes_otherwise() {
        // A new thread tries a batch on its first miss.
        let tries = |n: u32| (0..n).filter(|_| batching()).count();
        std::thread::spawn(move || {
            assert!(batching(), "the first miss tries a batch");
            made_batch(1);
            assert_eq!(
                tries(PROBE_EVERY - 1),
                0,
                "checks at once after a lone batch"
            );
            assert!(batching(), "tries again after PROBE_EVERY misses");
            made_batch(3);
            assert_eq!(tries(50), 50, "every miss waits while batches are shared");
            made_batch(1);
            assert_eq!(tries(2 * PROBE_EVERY), 2, "back to probing");
        })
        .join()
        .expect("the test thread");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn requests_ready_together_share_one_batch() {
        let key = TestKey::es256("k");
        let keys = keys_of(&key);
        let settings = Arc::new(settings());
        let tokens: Vec<String> = (0..4)
            .map(|i| {
                let mut c = claims(now());
                c["sub"] = format!("user-{i}").into();
                key.token(&c)
            })
            .collect();
        // Each request records how many checks it made.
        let tasks: Vec<_> = tokens
            .into_iter()
            .map(|token| {
                let (keys, settings) = (Arc::clone(&keys), Arc::clone(&settings));
                tokio::spawn(async move {
                    let check = Check::new(&token, keys, settings, now());
                    let made = in_batch(&check).await;
                    (made, check.take().1.expect("verified").sub)
                })
            })
            .collect();
        let mut made = Vec::new();
        for (i, task) in tasks.into_iter().enumerate() {
            let (n, sub) = task.await.expect("task");
            assert_eq!(sub.as_deref(), Some(format!("user-{i}").as_str()));
            made.push(n);
        }
        made.sort_unstable();
        assert_eq!(
            made,
            [0, 0, 0, 4],
            "the first to resume checks for all four"
        );
    }
}
