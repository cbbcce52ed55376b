//! Verified-token cache (the role of Envoy's `jwt_cache`): skips signature checks for tokens
//! seen recently.
//!
//! - Keyed by SHA-256 of the token, so the cache never holds a bearer credential.
//! - Every hit re-checks `exp`/`nbf` against the current time.
//! - Entries remember the key-ring generation that verified them; when the generation changes
//!   (a key was added or removed) each shard empties itself on its next use, so a removed key
//!   stops vouching for cached tokens at once.
//! - Bounded: a full shard first drops expired entries, then its oldest entry not served since
//!   it was last looked at (first in, first out with a second chance, "CLOCK"): a token in use
//!   survives a stream of new ones, which only replace each other. Each shard knows a lower
//!   bound of its entries' `exp`, so a full shard under churn (every token new, none expired)
//!   looks for expired entries only when one may exist, not on every insert.
//! - Compact: an entry keeps the claims as their JSON text (about a quarter of the memory of a
//!   parsed claims map), shared with the answers that write it out as it is
//!   ([`Claims`](crate::auth::Claims)); its kid, `role` and `sub` are shared too, so a hit
//!   copies and allocates nothing.
//!
//! Sharded mutexes keep the critical sections tiny and spread contention.

use crate::auth::error::Failure;
use crate::auth::verify::{Verified, check_times};
use aws_lc_rs::digest::{SHA256, digest};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

const SHARDS: usize = 16;

type TokenHash = [u8; 32];

/// The entries' hasher: foldhash under a per-process seed, cheaper than std's SipHash (with
/// the key-usage map's change, 0.6k instructions less a cache hit in callgrind). Its input is
/// a SHA-256 output, which the seed keeps a caller from aiming at a bucket, and only verified
/// tokens are inserted, so a caller cannot crowd one.
type Entries = HashMap<TokenHash, Entry, foldhash::fast::RandomState>;

/// A cached [`Verified`]: its strings and claims are shared, so serving it allocates nothing.
#[derive(Debug)]
struct Entry {
    verified: Verified,
    /// When it was inserted in its shard (matches its place in the shard's `order`).
    seq: u64,
    /// Served since eviction last looked at it: spared once.
    used: bool,
}

#[derive(Debug)]
struct Shard {
    generation: u64,
    entries: Entries,
    /// At most the smallest `exp` of `entries` (`i64::MAX` when there are none): no entry has
    /// expired before this time. Removals may leave it lower than the true minimum; a sweep
    /// makes it exact again.
    earliest_exp: i64,
    /// Entries by insertion, oldest first, as (hash, seq); an element whose entry is gone or
    /// was inserted again (another seq) is stale and skipped.
    order: VecDeque<(TokenHash, u64)>,
    next_seq: u64,
}

impl Default for Shard {
    fn default() -> Self {
        Self {
            generation: 0,
            entries: Entries::default(),
            earliest_exp: i64::MAX,
            order: VecDeque::new(),
            next_seq: 0,
        }
    }
}

impl Shard {
    fn clear(&mut self, generation: u64) {
        self.entries.clear();
        self.generation = generation;
        self.earliest_exp = i64::MAX;
        self.order.clear();
    }

    /// Makes room for one entry: drops the entries expired at `now` if any may be, then, if
    /// still full, the oldest entry not served since eviction last passed it.
    fn make_room(&mut self, per_shard: usize, now: i64) {
        if self.entries.len() < per_shard {
            return;
        }
        if self.earliest_exp <= now {
            self.entries.retain(|_, v| v.verified.exp > now);
            self.earliest_exp = self
                .entries
                .values()
                .map(|v| v.verified.exp)
                .min()
                .unwrap_or(i64::MAX);
        }
        // Ends: each turn drops an entry, skips a stale element, or clears one `used` flag
        // (set only by a hit), so at most twice the entries plus the stale elements.
        while self.entries.len() >= per_shard {
            let Some((hash, seq)) = self.order.pop_front() else {
                // Cannot happen (every entry has its element); stay bounded regardless.
                let victim = self.entries.keys().next().copied();
                if let Some(victim) = victim {
                    self.entries.remove(&victim);
                }
                continue;
            };
            match self.entries.get_mut(&hash) {
                Some(entry) if entry.seq == seq && entry.used => {
                    entry.used = false;
                    self.order.push_back((hash, seq));
                }
                Some(entry) if entry.seq == seq => {
                    self.entries.remove(&hash);
                }
                _ => {}
            }
        }
    }

    /// Adds `entry` as the newest, keeping `order` within twice the entries.
    fn push(&mut self, hash: TokenHash, mut entry: Entry, per_shard: usize) {
        entry.seq = self.next_seq;
        self.next_seq += 1;
        self.earliest_exp = self.earliest_exp.min(entry.verified.exp);
        self.order.push_back((hash, entry.seq));
        self.entries.insert(hash, entry);
        if self.order.len() > 2 * per_shard + 16 {
            let entries = &self.entries;
            self.order
                .retain(|(hash, seq)| entries.get(hash).is_some_and(|e| e.seq == *seq));
        }
    }
}

/// A bounded map from token hash to its verification result.
#[derive(Debug)]
pub struct TokenCache {
    per_shard: usize,
    shards: Vec<Mutex<Shard>>,
    hits: AtomicU64,
}

/// SHA-256 of a token: the cache key.
pub fn token_hash(token: &str) -> TokenHash {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, token.as_bytes()).as_ref());
    out
}

impl TokenCache {
    /// A cache holding about `capacity` entries; 0 disables it.
    pub fn new(capacity: usize) -> Self {
        let per_shard = capacity.div_ceil(SHARDS);
        Self {
            per_shard,
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hits: AtomicU64::new(0),
        }
    }

    fn shard(&self, hash: &TokenHash) -> Option<std::sync::MutexGuard<'_, Shard>> {
        if self.per_shard == 0 {
            return None;
        }
        // A poisoned shard only means another thread panicked mid-update of a cache:
        // its content is still a valid map, so keep using it.
        let shard = self.shards.get(usize::from(hash[0]) % SHARDS)?;
        Some(shard.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The cached result for `hash` if it was verified under `generation` and is still within
    /// `exp`/`nbf` at `now` (seconds) with `leeway` (seconds).
    pub fn get(
        &self,
        hash: &TokenHash,
        generation: u64,
        now: i64,
        leeway: i64,
    ) -> Option<Verified> {
        let mut shard = self.shard(hash)?;
        if generation > shard.generation {
            shard.clear(generation);
            return None;
        }
        if generation < shard.generation {
            // A caller still holding an older snapshot: nothing cached applies to it.
            return None;
        }
        let hit = shard.entries.get_mut(hash)?;
        if let Err(failure) = check_times(hit.verified.exp, hit.verified.nbf, now, leeway) {
            // An expired entry will never be served again; a not-yet-valid one may be later.
            if failure == Failure::Expired {
                shard.entries.remove(hash);
            }
            return None;
        }
        hit.used = true;
        let verified = hit.verified.clone();
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(verified)
    }

    /// How many lookups were answered from the cache.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Remembers a result verified under `generation` (ignored if the cache already moved on
    /// to a newer generation: the key that verified it may be gone).
    pub fn insert(&self, hash: TokenHash, generation: u64, verified: &Verified, now: i64) {
        let per_shard = self.per_shard;
        if per_shard == 0 {
            return;
        }
        // Built before the lock, to keep the critical section short.
        let entry = Entry {
            verified: verified.clone(),
            seq: 0,
            used: false,
        };
        let Some(mut shard) = self.shard(&hash) else {
            return;
        };
        if shard.generation != generation {
            if generation < shard.generation {
                return;
            }
            shard.clear(generation);
        }
        shard.make_room(per_shard, now);
        shard.push(hash, entry, per_shard);
    }

    /// Number of cached entries (all generations).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map_or(0, |s| s.entries.len()))
            .sum()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::keyring::KeySource;
    use crate::auth::verify::Claims;
    use serde_json::Map;

    fn verified(exp: i64, nbf: Option<i64>) -> Verified {
        let mut claims = Map::new();
        claims.insert("exp".into(), exp.into());
        if let Some(nbf) = nbf {
            claims.insert("nbf".into(), nbf.into());
        }
        Verified {
            source: KeySource::SigningKey,
            kid: Some("k".into()),
            alg: "ES256",
            role: None,
            sub: None,
            claims: Claims::new(&claims),
            exp,
            nbf,
            ok_count: Default::default(),
        }
    }

    #[test]
    fn hit_rechecks_exp_and_nbf() {
        let cache = TokenCache::new(100);
        let h = token_hash("a.b.c");
        cache.insert(h, 1, &verified(1_000, None), 0);
        assert!(cache.get(&h, 1, 900, 0).is_some());
        assert!(
            cache.get(&h, 1, 1_000, 0).is_none(),
            "expired entry must not be served"
        );
        let h2 = token_hash("d.e.f");
        cache.insert(h2, 1, &verified(10_000, Some(500)), 0);
        assert!(
            cache.get(&h2, 1, 100, 30).is_none(),
            "nbf in the future must not be served"
        );
        assert!(cache.get(&h2, 1, 480, 30).is_some());
    }

    #[test]
    fn a_hit_returns_what_was_verified() {
        let cache = TokenCache::new(100);
        let h = token_hash("a.b.c");
        let mut original = verified(10_000, Some(5));
        original.role = Some("authenticated".into());
        original.sub = Some("user-1".into());
        let mut claims = Map::new();
        claims.insert("exp".into(), 10_000.into());
        claims.insert(
            "app_metadata".into(),
            serde_json::json!({"providers": ["email"], "n": 1.5, "big": u64::MAX, "neg": -3}),
        );
        original.claims = Claims::new(&claims);
        cache.insert(h, 1, &original, 0);
        assert_eq!(cache.get(&h, 1, 100, 0), Some(original));
        assert_eq!(cache.hits(), 1);
    }

    #[test]
    fn generation_change_empties() {
        let cache = TokenCache::new(100);
        let h = token_hash("a.b.c");
        cache.insert(h, 1, &verified(1_000, None), 0);
        assert!(cache.get(&h, 2, 0, 0).is_none());
        assert!(
            cache.get(&h, 1, 0, 0).is_none(),
            "old entries are gone, not hidden"
        );
        // A late insert from a verification under the old generation is ignored.
        cache.insert(h, 1, &verified(1_000, None), 0);
        assert!(cache.get(&h, 2, 0, 0).is_none());
    }

    /// `count` token hashes that all fall into one shard.
    fn same_shard(count: usize) -> Vec<TokenHash> {
        let first = token_hash("t0");
        (0..)
            .map(|i| token_hash(&format!("t{i}")))
            .filter(|h| usize::from(h[0]) % SHARDS == usize::from(first[0]) % SHARDS)
            .take(count)
            .collect()
    }

    #[test]
    fn a_full_shard_drops_what_expired_before_anything_valid() {
        // Four entries a shard; five hashes that share one.
        let cache = TokenCache::new(4 * SHARDS);
        let hashes = same_shard(6);
        cache.insert(hashes[0], 1, &verified(100, None), 0);
        for h in &hashes[1..4] {
            cache.insert(*h, 1, &verified(10_000, None), 0);
        }
        // Full; at 500 the first has expired: it goes, the valid ones stay.
        cache.insert(hashes[4], 1, &verified(10_000, None), 500);
        assert_eq!(cache.len(), 4);
        for h in &hashes[1..5] {
            assert!(
                cache.get(h, 1, 500, 0).is_some(),
                "a valid entry was dropped"
            );
        }
        // Full again and nothing expired: one valid entry makes room, the shard stays bounded.
        cache.insert(hashes[5], 1, &verified(10_000, None), 600);
        assert_eq!(cache.len(), 4);
        assert!(cache.get(&hashes[5], 1, 600, 0).is_some());
        // Later all four have expired: they all go at the next insert.
        cache.insert(hashes[0], 1, &verified(20_000, None), 15_000);
        assert_eq!(cache.len(), 1, "expired entries left behind");
        assert!(cache.get(&hashes[0], 1, 15_000, 0).is_some());
    }

    #[test]
    fn a_full_shard_evicts_its_oldest_unused_entry() {
        let cache = TokenCache::new(4 * SHARDS);
        let hashes = same_shard(40);
        for h in &hashes[..4] {
            cache.insert(*h, 1, &verified(10_000, None), 0);
        }
        // Never served: each new entry takes the place of the oldest.
        for (i, h) in hashes[4..].iter().enumerate() {
            cache.insert(*h, 1, &verified(10_000, None), 0);
            assert!(
                cache.get(&hashes[i], 1, 0, 0).is_none(),
                "entry {i} should have been the one evicted"
            );
            for kept in &hashes[i + 1..=i + 4] {
                assert!(
                    cache.get(kept, 1, 0, 0).is_some(),
                    "a newer entry was evicted"
                );
            }
        }
    }

    #[test]
    fn a_token_in_use_survives_a_stream_of_new_ones() {
        let cache = TokenCache::new(4 * SHARDS);
        let hashes = same_shard(1_001);
        let (hot, stream) = hashes.split_first().unwrap();
        cache.insert(*hot, 1, &verified(10_000, None), 0);
        for h in stream {
            assert!(
                cache.get(hot, 1, 0, 0).is_some(),
                "the token in use was evicted"
            );
            cache.insert(*h, 1, &verified(10_000, None), 0);
        }
        assert_eq!(cache.len(), 4);
    }

    #[test]
    fn bounded() {
        let cache = TokenCache::new(32);
        for i in 0..1_000 {
            cache.insert(token_hash(&format!("t{i}")), 1, &verified(10_000, None), 0);
        }
        assert!(cache.len() <= 32, "len {}", cache.len());
        let off = TokenCache::new(0);
        off.insert(token_hash("x"), 1, &verified(10_000, None), 0);
        assert!(off.is_empty());
    }
}
