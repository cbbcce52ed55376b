//! Verified-token cache (the role of Envoy's `jwt_cache`): skips signature checks for tokens
//! seen recently.
//!
//! - Never holds a bearer credential: an entry is found by the SHA-256 of the token's last
//!   characters, which are signature, and confirmed by a keyed tag of everything before them
//!   ([`TokenKey`]): what the cache holds cannot be turned back into a token, and a lookup
//!   costs less than a hash of the whole token.
//! - Every hit re-checks `exp` and `nbf` (or `iat`, when later) against the current time.
//! - Entries remember the key-ring generation that verified them; when the generation changes
//!   (a key was added or removed) each shard empties itself on its next use, so a removed key
//!   stops vouching for cached tokens at once.
//! - Bounded, in entries and in the bytes of the claims they keep (a token's claims are its
//!   holder's to make large: Supabase's `user_metadata` is the user's own): a full shard first
//!   drops expired entries, then its oldest entry not served since it was last looked at
//!   (first in, first out with a second chance, "CLOCK"): a token in use
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
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::constant_time::verify_slices_are_equal;
use aws_lc_rs::digest::{SHA256, digest};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

const SHARDS: usize = 16;

/// How many bytes of claims text the cache keeps in all, by default: 10,000 entries of a
/// Supabase access token's usual 600 to 900 bytes fit, while tokens of 8 KiB (the most a
/// token may be) could otherwise hold 60 MiB.
pub const CLAIMS_BUDGET: usize = 16 * 1024 * 1024;

/// How many characters (bytes) at a token's end [`TokenKey`] hashes: the length of the shortest
/// signature of any accepted algorithm (HS256's 32 bytes in base64url; ES256 and EdDSA have
/// 86 characters, RS256 at least 342), so they are always signature: at least 254 bits of it
/// (a signature's last character carries 2 or 4 bits of padding).
const TAIL: usize = 43;

/// SHA-256 of a token's last [`TAIL`] characters: where its entry is.
type TailHash = [u8; 32];

/// The cache's key for one token, made by [`TokenCache::key`].
///
/// A token is `rest` followed by its `tail`, its last [`TAIL`] characters (all of it when it
/// is shorter), so the pair is the token exactly: two tokens differ in one or the other.
/// - `tail`: SHA-256 of the tail, which holds at least 254 bits of the signature of any token
///   the cache can hold. One-way: nothing in the cache gives anyone a tail.
/// - `rest`: the AES-256-GCM tag of `rest` (as associated data, nothing encrypted) under a key
///   drawn when the cache is made (one a process), with the tail's hash as nonce. Two texts
///   under the same nonce get the same tag only if GHASH, a polynomial in a secret point,
///   takes the same value on both: a chance of under 2⁻¹¹⁸ for any two texts of at most
///   8 KiB, however they were chosen, as long as the point stays secret. The tags never
///   leave the process (nor does anything computed from them but whether two are equal), so
///   a caller who knows a victim's signature but not the rest cannot make another `rest` with
///   its tag. Both together cost about half of hashing the whole token, less for longer
///   tokens (BENCHMARKS.md, eighteenth pass).
///
/// What this gives up against a SHA-256 of the whole token: someone who reads the process's
/// memory has the tag key, and GHASH is linear, so they can make a `rest` with any entry's
/// tag. They still need that entry's tail, which is nowhere in the process but in requests:
/// with it (HS256's whole signature; the last 43 characters of the others') they could be
/// answered as the cached token. Under the whole token's hash they needed the whole token,
/// or its whole signature and its header and payload rebuilt exactly from the entry.
#[derive(Clone, Copy)]
#[cfg_attr(test, derive(PartialEq, Eq))]
pub struct TokenKey {
    tail: TailHash,
    rest: [u8; 16],
}

/// The entries' hasher: foldhash under a per-process seed, cheaper than std's SipHash (with
/// the key-usage map's change, 0.6k instructions less a cache hit in callgrind). Its input is
/// a SHA-256 output, which the seed keeps a caller from aiming at a bucket, and only verified
/// tokens are inserted, so a caller cannot crowd one.
///
/// Entries are boxed, so that a slot is 40 bytes, not 184: under a stream of new tokens each
/// eviction leaves a tombstone, and once they fill a shard's table hashbrown doubles it (625
/// entries are more than half of a 1,024-slot table's 896), so every shard ends with 2,048
/// slots, nearly all of whose pages those 625 entries touch: inline, the tables alone were
/// 5.8 MiB for 10,000 entries; boxed, 1.3 MiB and the entries' own 1.5 (BENCHMARKS.md,
/// twenty-first pass).
type Entries = HashMap<TailHash, Box<Entry>, foldhash::fast::RandomState>;

/// A cached [`Verified`]: its strings and claims are shared, so serving it allocates nothing.
#[derive(Debug)]
struct Entry {
    /// The tag of the token's part before its tail ([`TokenKey`]): a lookup with the same
    /// tail and anything else before it misses.
    rest: [u8; 16],
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
    order: VecDeque<(TailHash, u64)>,
    next_seq: u64,
    /// The bytes of claims text its entries keep ([`Entry::claims_bytes`]).
    claims_bytes: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Self {
            generation: 0,
            entries: Entries::default(),
            earliest_exp: i64::MAX,
            order: VecDeque::new(),
            next_seq: 0,
            claims_bytes: 0,
        }
    }
}

impl Entry {
    /// What it counts against its shard's budget: its claims text, nearly all of what it
    /// keeps beyond its fixed size (its `sub` and `role` are copies of a part of it).
    fn claims_bytes(&self) -> usize {
        self.verified.claims.json().len()
    }
}

impl Shard {
    fn clear(&mut self, generation: u64) {
        self.entries.clear();
        self.generation = generation;
        self.earliest_exp = i64::MAX;
        self.order.clear();
        self.claims_bytes = 0;
    }

    fn remove(&mut self, hash: &TailHash) {
        if let Some(entry) = self.entries.remove(hash) {
            self.claims_bytes -= entry.claims_bytes();
        }
    }

    /// Makes room for one entry of `bytes` of claims: drops the entries expired at `now` if
    /// any may be, then, while still full (`per_shard` entries, or not `bytes` left of
    /// `budget`), the oldest entry not served since eviction last passed it.
    fn make_room(&mut self, per_shard: usize, budget: usize, bytes: usize, now: i64) {
        let full =
            |shard: &Self| shard.entries.len() >= per_shard || shard.claims_bytes + bytes > budget;
        if !full(self) {
            return;
        }
        if self.earliest_exp <= now {
            let mut freed = 0;
            self.entries.retain(|_, v| {
                let valid = v.verified.exp > now;
                if !valid {
                    freed += v.claims_bytes();
                }
                valid
            });
            self.claims_bytes -= freed;
            self.earliest_exp = self
                .entries
                .values()
                .map(|v| v.verified.exp)
                .min()
                .unwrap_or(i64::MAX);
        }
        // Ends: each turn drops an entry, skips a stale element, or clears one `used` flag
        // (set only by a hit), so at most twice the entries plus the stale elements; an empty
        // shard has room (the caller keeps no entry larger than `budget`).
        while !self.entries.is_empty() && full(self) {
            let Some((hash, seq)) = self.order.pop_front() else {
                // Cannot happen (every entry has its element); stay bounded regardless.
                let victim = self.entries.keys().next().copied();
                if let Some(victim) = victim {
                    self.remove(&victim);
                }
                continue;
            };
            match self.entries.get_mut(&hash) {
                Some(entry) if entry.seq == seq && entry.used => {
                    entry.used = false;
                    self.order.push_back((hash, seq));
                }
                Some(entry) if entry.seq == seq => {
                    self.remove(&hash);
                }
                _ => {}
            }
        }
    }

    /// Adds `entry` as the newest, keeping `order` within twice the entries.
    fn push(&mut self, hash: TailHash, mut entry: Box<Entry>, per_shard: usize) {
        entry.seq = self.next_seq;
        self.next_seq += 1;
        self.earliest_exp = self.earliest_exp.min(entry.verified.exp);
        self.order.push_back((hash, entry.seq));
        self.claims_bytes += entry.claims_bytes();
        if let Some(replaced) = self.entries.insert(hash, entry) {
            self.claims_bytes -= replaced.claims_bytes();
        }
        if self.order.len() > 2 * per_shard + 16 {
            let entries = &self.entries;
            self.order
                .retain(|(hash, seq)| entries.get(hash).is_some_and(|e| e.seq == *seq));
        }
    }
}

/// A bounded map from token to its verification result.
#[derive(Debug)]
pub struct TokenCache {
    per_shard: usize,
    /// The bytes of claims text a shard keeps at most.
    shard_budget: usize,
    shards: Vec<Mutex<Shard>>,
    hits: AtomicU64,
    /// The key of [`TokenKey`]'s tags, drawn when the cache is made (its `Debug` shows only
    /// the algorithm). `None` when the cache is off, or no random key could be drawn (which
    /// turns it off).
    tag_key: Option<LessSafeKey>,
}

impl TokenCache {
    /// A cache holding about `capacity` entries and [`CLAIMS_BUDGET`] bytes of claims; 0
    /// disables it.
    pub fn new(capacity: usize) -> Self {
        Self::with_claims_budget(capacity, CLAIMS_BUDGET)
    }

    /// A cache holding about `capacity` entries and at most `budget` bytes of claims text
    /// (each shard a sixteenth of it: a token whose claims are longer is not kept); 0
    /// disables it.
    pub fn with_claims_budget(capacity: usize, budget: usize) -> Self {
        let per_shard = capacity.div_ceil(SHARDS);
        let tag_key = (per_shard > 0).then(|| {
            let mut key = [0u8; 32];
            let drawn = aws_lc_rs::rand::fill(&mut key)
                .and_then(|()| UnboundKey::new(&AES_256_GCM, &key))
                .map(LessSafeKey::new);
            if drawn.is_err() {
                tracing::warn!("no random key for the verified-token cache: it is off");
            }
            drawn.ok()
        });
        Self {
            per_shard,
            shard_budget: budget / SHARDS,
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hits: AtomicU64::new(0),
            tag_key: tag_key.flatten(),
        }
    }

    /// The key `token` is cached under ([`TokenKey`]); `None` when the cache is off (and, in
    /// principle, if the tag could not be computed): the token is then verified every time.
    pub fn key(&self, token: &str) -> Option<TokenKey> {
        let tag_key = self.tag_key.as_ref()?;
        let (rest, tail) = token.as_bytes().split_at(token.len().saturating_sub(TAIL));
        let mut hash = [0u8; 32];
        hash.copy_from_slice(digest(&SHA256, tail).as_ref());
        let nonce = Nonce::try_assume_unique_for_key(&hash[..12]).ok()?;
        let tag = tag_key
            .seal_in_place_separate_tag(nonce, Aad::from(rest), &mut [])
            .ok()?;
        Some(TokenKey {
            tail: hash,
            rest: tag.as_ref().try_into().ok()?,
        })
    }

    fn shard(&self, hash: &TailHash) -> Option<std::sync::MutexGuard<'_, Shard>> {
        if self.per_shard == 0 {
            return None;
        }
        // A poisoned shard only means another thread panicked mid-update of a cache:
        // its content is still a valid map, so keep using it.
        let shard = self.shards.get(usize::from(hash[0]) % SHARDS)?;
        Some(shard.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The cached result for `key` if it was verified under `generation` and is still within
    /// `exp`/`nbf` at `now` (seconds) with `leeway` (seconds).
    pub fn get(&self, key: &TokenKey, generation: u64, now: i64, leeway: i64) -> Option<Verified> {
        let hash = &key.tail;
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
        // In constant time, so a caller with a victim's signature learns nothing of its tag.
        verify_slices_are_equal(&hit.rest, &key.rest).ok()?;
        if let Err(failure) = check_times(hit.verified.exp, hit.verified.nbf, now, leeway) {
            // An expired entry will never be served again; a not-yet-valid one may be later.
            if failure == Failure::Expired {
                shard.remove(hash);
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
    pub fn insert(&self, key: &TokenKey, generation: u64, verified: &Verified, now: i64) {
        let (per_shard, budget) = (self.per_shard, self.shard_budget);
        let bytes = verified.claims.json().len();
        if per_shard == 0 || bytes > budget {
            return;
        }
        let hash = key.tail;
        // Built before the lock, to keep the critical section short.
        let entry = Box::new(Entry {
            rest: key.rest,
            verified: verified.clone(),
            seq: 0,
            used: false,
        });
        let Some(mut shard) = self.shard(&hash) else {
            return;
        };
        if shard.generation != generation {
            if generation < shard.generation {
                return;
            }
            shard.clear(generation);
        }
        shard.make_room(per_shard, budget, bytes, now);
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
        let h = cache.key("a.b.c").expect("a key");
        cache.insert(&h, 1, &verified(1_000, None), 0);
        assert!(cache.get(&h, 1, 900, 0).is_some());
        assert!(
            cache.get(&h, 1, 1_000, 0).is_none(),
            "expired entry must not be served"
        );
        let h2 = cache.key("d.e.f").expect("a key");
        cache.insert(&h2, 1, &verified(10_000, Some(500)), 0);
        assert!(
            cache.get(&h2, 1, 100, 30).is_none(),
            "nbf in the future must not be served"
        );
        assert!(cache.get(&h2, 1, 480, 30).is_some());
    }

    #[test]
    fn a_hit_returns_what_was_verified() {
        let cache = TokenCache::new(100);
        let h = cache.key("a.b.c").expect("a key");
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
        cache.insert(&h, 1, &original, 0);
        assert_eq!(cache.get(&h, 1, 100, 0), Some(original));
        assert_eq!(cache.hits(), 1);
    }

    #[test]
    fn generation_change_empties() {
        let cache = TokenCache::new(100);
        let h = cache.key("a.b.c").expect("a key");
        cache.insert(&h, 1, &verified(1_000, None), 0);
        assert!(cache.get(&h, 2, 0, 0).is_none());
        assert!(
            cache.get(&h, 1, 0, 0).is_none(),
            "old entries are gone, not hidden"
        );
        // A late insert from a verification under the old generation is ignored.
        cache.insert(&h, 1, &verified(1_000, None), 0);
        assert!(cache.get(&h, 2, 0, 0).is_none());
    }

    #[test]
    fn a_slot_of_the_table_holds_a_pointer_not_the_entry() {
        // Every shard's table ends with 2,048 slots under churn (`Entries`), nearly all of
        // them resident: an entry inline (184 bytes a slot) made that 5.8 MiB.
        let slot = std::mem::size_of::<<Entries as IntoIterator>::Item>();
        assert!(slot <= 48, "a slot of the cache's table is {slot} bytes");
    }

    /// `count` keys of `cache` that all fall into one shard.
    fn same_shard(cache: &TokenCache, count: usize) -> Vec<TokenKey> {
        let shard = |k: &TokenKey| usize::from(k.tail[0]) % SHARDS;
        let first = shard(&cache.key("t0").expect("a key"));
        (0..)
            .map(|i| cache.key(&format!("t{i}")).expect("a key"))
            .filter(|k| shard(k) == first)
            .take(count)
            .collect()
    }

    #[test]
    fn a_full_shard_drops_what_expired_before_anything_valid() {
        // Four entries a shard; five hashes that share one.
        let cache = TokenCache::new(4 * SHARDS);
        let hashes = same_shard(&cache, 6);
        cache.insert(&hashes[0], 1, &verified(100, None), 0);
        for h in &hashes[1..4] {
            cache.insert(h, 1, &verified(10_000, None), 0);
        }
        // Full; at 500 the first has expired: it goes, the valid ones stay.
        cache.insert(&hashes[4], 1, &verified(10_000, None), 500);
        assert_eq!(cache.len(), 4);
        for h in &hashes[1..5] {
            assert!(
                cache.get(h, 1, 500, 0).is_some(),
                "a valid entry was dropped"
            );
        }
        // Full again and nothing expired: one valid entry makes room, the shard stays bounded.
        cache.insert(&hashes[5], 1, &verified(10_000, None), 600);
        assert_eq!(cache.len(), 4);
        assert!(cache.get(&hashes[5], 1, 600, 0).is_some());
        // Later all four have expired: they all go at the next insert.
        cache.insert(&hashes[0], 1, &verified(20_000, None), 15_000);
        assert_eq!(cache.len(), 1, "expired entries left behind");
        assert!(cache.get(&hashes[0], 1, 15_000, 0).is_some());
    }

    #[test]
    fn a_full_shard_evicts_its_oldest_unused_entry() {
        let cache = TokenCache::new(4 * SHARDS);
        let hashes = same_shard(&cache, 40);
        for h in &hashes[..4] {
            cache.insert(h, 1, &verified(10_000, None), 0);
        }
        // Never served: each new entry takes the place of the oldest.
        for (i, h) in hashes[4..].iter().enumerate() {
            cache.insert(h, 1, &verified(10_000, None), 0);
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
        let hashes = same_shard(&cache, 1_001);
        let (hot, stream) = hashes.split_first().unwrap();
        cache.insert(hot, 1, &verified(10_000, None), 0);
        for h in stream {
            assert!(
                cache.get(hot, 1, 0, 0).is_some(),
                "the token in use was evicted"
            );
            cache.insert(h, 1, &verified(10_000, None), 0);
        }
        assert_eq!(cache.len(), 4);
    }

    /// [`verified`] whose claims text is `size` bytes long.
    fn verified_of(size: usize, exp: i64) -> Verified {
        let mut v = verified(exp, None);
        let bare = v.claims.json().len() + r#","pad":"""#.len();
        let mut claims = Map::new();
        claims.insert("exp".into(), exp.into());
        claims.insert("pad".into(), "x".repeat(size - bare).into());
        v.claims = Claims::new(&claims);
        assert_eq!(v.claims.json().len(), size);
        v
    }

    /// The claims text the cache holds, summed over its entries (not its own count of it).
    fn held_bytes(cache: &TokenCache) -> usize {
        let shards = cache.shards.iter().map(|s| s.lock().expect("a shard"));
        shards
            .map(|s| {
                let held: usize = s
                    .entries
                    .values()
                    .map(|e| e.verified.claims.json().len())
                    .sum();
                assert_eq!(s.claims_bytes, held, "the shard's count of its claims");
                held
            })
            .sum()
    }

    /// The claims a token carries are the caller's to make large (Supabase's `user_metadata`
    /// is the user's own): the cache bounds their bytes as well as its entries.
    #[test]
    fn the_claims_a_shard_holds_are_bounded_in_bytes() {
        // Four entries a shard, or 2,000 bytes of claims: two of 900.
        let cache = TokenCache::with_claims_budget(4 * SHARDS, 2_000 * SHARDS);
        let keys = same_shard(&cache, 40);
        for (i, key) in keys.iter().enumerate() {
            cache.insert(key, 1, &verified_of(900, 10_000), 0);
            assert!(held_bytes(&cache) <= 2_000, "after {i}");
            assert!(cache.get(key, 1, 0, 0).is_some(), "the newest is kept");
        }
        assert_eq!(cache.len(), 2);
        // Small entries fill the shard up to its count again.
        let small = verified(10_000, None);
        for key in &keys[..4] {
            cache.insert(key, 1, &small, 0);
        }
        assert_eq!(cache.len(), 4);
        assert!(held_bytes(&cache) <= 2_000);
        // One larger than a shard's budget is not kept, and takes nothing out.
        cache.insert(&keys[10], 1, &verified_of(2_001, 10_000), 0);
        assert!(cache.get(&keys[10], 1, 0, 0).is_none());
        assert_eq!(cache.len(), 4);
    }

    #[test]
    fn a_token_in_use_survives_a_stream_of_large_ones() {
        let cache = TokenCache::with_claims_budget(64 * SHARDS, 4_000 * SHARDS);
        let keys = same_shard(&cache, 301);
        let (hot, stream) = keys.split_first().unwrap();
        cache.insert(hot, 1, &verified_of(1_000, 10_000), 0);
        for key in stream {
            assert!(
                cache.get(hot, 1, 0, 0).is_some(),
                "the token in use was evicted"
            );
            cache.insert(key, 1, &verified_of(1_000, 10_000), 0);
            assert!(held_bytes(&cache) <= 4_000);
        }
        assert_eq!(cache.len(), 4);
    }

    /// Every way out of a shard gives its bytes back: an expired hit, a sweep of expired
    /// entries, a token inserted again, a new generation.
    #[test]
    fn a_shard_counts_its_claims_through_every_removal() {
        let cache = TokenCache::with_claims_budget(4 * SHARDS, 2_000 * SHARDS);
        let keys = same_shard(&cache, 6);
        cache.insert(&keys[0], 1, &verified_of(500, 100), 0);
        assert!(cache.get(&keys[0], 1, 200, 0).is_none(), "expired");
        assert_eq!(held_bytes(&cache), 0);
        cache.insert(&keys[1], 1, &verified_of(500, 100), 0);
        cache.insert(&keys[2], 1, &verified_of(600, 10_000), 0);
        cache.insert(&keys[2], 1, &verified_of(700, 10_000), 0);
        assert_eq!(held_bytes(&cache), 1_200);
        // Full by bytes at 200: the expired entry is swept first, the valid one stays.
        cache.insert(&keys[3], 1, &verified_of(900, 10_000), 200);
        assert_eq!(held_bytes(&cache), 1_600);
        assert!(cache.get(&keys[2], 1, 200, 0).is_some());
        assert!(cache.get(&keys[1], 2, 200, 0).is_none(), "a new generation");
        assert_eq!(held_bytes(&cache), 0);
    }

    #[test]
    fn bounded() {
        let cache = TokenCache::new(32);
        for i in 0..1_000 {
            let key = cache.key(&format!("t{i}")).expect("a key");
            cache.insert(&key, 1, &verified(10_000, None), 0);
        }
        assert!(cache.len() <= 32, "len {}", cache.len());
        let off = TokenCache::new(0);
        assert!(off.key("x").is_none(), "a cache that is off keys nothing");
        off.insert(
            &cache.key("x").expect("a key"),
            1,
            &verified(10_000, None),
            0,
        );
        assert!(off.is_empty());
    }

    /// A signature's length in base64url, as long as the shortest an accepted algorithm makes.
    const SIG: &str = "MDEyMzQ1Njc4OWFiY2RlZmdoaWprbG1ub3BxcnN0dXY";

    #[test]
    fn a_key_stands_for_the_whole_token() {
        assert_eq!(SIG.len(), TAIL);
        let cache = TokenCache::new(100);
        let key = |t: &str| cache.key(t).expect("a key");
        let long = format!("h.p.{SIG}");
        assert!(key(&long) == key(&long), "one token, two keys");
        // Each differs from the others in one byte (the one before the tail among them), a
        // dot more, less or elsewhere, or its length; some are shorter than the tail.
        let mut tokens: Vec<String> = [
            "h.p.", "h.q.", "g.p.", "h.p,", "h.p", "hp.", "h..p.", "h.p..", ".", "", "x",
        ]
        .iter()
        .map(|rest| format!("{rest}{SIG}"))
        .collect();
        tokens.extend(["h.p.s", "h.p.t", "h.ps", "s", ".s", "", "."].map(str::to_owned));
        tokens.push(format!("h.p.{}x", &SIG[1..]));
        tokens.push(format!("{SIG}."));
        for (i, a) in tokens.iter().enumerate() {
            for b in &tokens[i + 1..] {
                assert!(key(a) != key(b), "{a:?} and {b:?} share a key");
            }
        }
        // Another process keys the same tail alike and the rest under its own key.
        let other = TokenCache::new(100).key(&long).expect("a key");
        assert_eq!(other.tail, key(&long).tail);
        assert_ne!(other.rest, key(&long).rest, "the tag key is not drawn");
    }

    #[test]
    fn a_known_signature_under_another_header_or_payload_misses() {
        let cache = TokenCache::new(100);
        let token = format!("eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ2In0.{SIG}");
        let token_key = cache.key(&token).expect("a key");
        cache.insert(&token_key, 1, &verified(10_000, None), 0);
        for forged in [
            format!("eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ3In0.{SIG}"),
            format!("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ2In0.{SIG}"),
            format!("eyJhbGciOiJFUzI1NiJ9eyJzdWIiOiJ2In0.{SIG}"),
            format!("eyJzdWIiOiJ2In0.{SIG}"),
            format!(".{SIG}"),
            SIG.to_owned(),
        ] {
            let forged_key = cache.key(&forged).expect("a key");
            assert_eq!(forged_key.tail, token_key.tail);
            assert!(
                cache.get(&forged_key, 1, 0, 0).is_none(),
                "{forged} was served the cached entry of another token"
            );
        }
        assert!(cache.get(&token_key, 1, 0, 0).is_some());
        assert_eq!(cache.hits(), 1);
    }

    /// [`TAIL`] characters at a token's end are all signature, whatever the algorithm (an
    /// algorithm added to [`Alg`] must be added here: the match has no catch-all). The
    /// verifier's own length checks are tested elsewhere for the others (`auth::tests`:
    /// Wycheproof's P1363 and Ed25519 vectors, signatures of wrong lengths among them;
    /// `fetched_set_drops_with_reasons`, RSA moduli under 2048 bits) and here for HMAC.
    #[test]
    fn every_accepted_algorithm_signs_at_least_the_tail() {
        use crate::auth::Alg;
        use crate::auth::tests::util::{
            LEGACY_SECRET, TestKey, b64, claims, hs256_token, now, ring, settings,
        };
        use crate::auth::verify::verify;
        use base64::Engine;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let hs256 = hs256_token(
            LEGACY_SECRET,
            r#"{"alg":"HS256","typ":"JWT"}"#,
            &claims(now()).to_string(),
        );
        for alg in [Alg::HS256, Alg::ES256, Alg::RS256, Alg::EdDSA] {
            let token = match alg {
                Alg::HS256 => hs256.clone(),
                Alg::ES256 => TestKey::es256("k").token(&claims(now())),
                Alg::RS256 => TestKey::rs256("k").token(&claims(now())),
                Alg::EdDSA => TestKey::eddsa("k").token(&claims(now())),
            };
            let signature = token.rsplit('.').next().unwrap_or_default();
            assert!(
                signature.len() >= TAIL,
                "{alg:?} signs with {} characters",
                signature.len()
            );
        }
        // And the verifier takes no shorter one: a MAC cut short (which some libraries
        // accept) is refused.
        let ring = ring(Some(LEGACY_SECRET), &[], &[]);
        assert!(verify(&ring, &settings(), &hs256, now()).is_ok());
        let (signed, mac) = hs256.rsplit_once('.').unwrap_or_default();
        let mac = URL_SAFE_NO_PAD.decode(mac).unwrap_or_default();
        for cut in [16, 31] {
            let short = format!("{signed}.{}", b64(&mac[..cut]));
            assert!(short.len() < hs256.len());
            assert!(
                verify(&ring, &settings(), &short, now()).is_err(),
                "a MAC of {cut} bytes was taken"
            );
        }
    }
}
