//! The key ring: an immutable snapshot of every key edgegate trusts, swapped atomically.
//!
//! Verification loads the current snapshot without a lock and never waits on the network;
//! the JWKS fetcher builds a new snapshot and swaps it in, bumping the generation so that
//! caches keyed on it (the verified-token cache) drop what the old keys vouched for.

use crate::auth::keys::{
    DroppedKey, KeyMaterial, KeyOrigin, LegacySecret, VerifyingKey, dropped_key,
};
use crate::auth::metrics::OkCounter;
use arc_swap::ArcSwap;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Which kind of credential vouched for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum KeySource {
    /// An asymmetric JWT signing key (inline or fetched JWKS).
    SigningKey,
    /// The legacy HS256 JWT secret.
    LegacySecret,
    /// An opaque `sb_secret_…` / `sb_publishable_…` API key.
    ApiKey,
}

impl KeySource {
    /// The contract's name: `signing_key`, `legacy_secret` or `api_key`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SigningKey => "signing_key",
            Self::LegacySecret => "legacy_secret",
            Self::ApiKey => "api_key",
        }
    }
}

/// What is known about the fetched JWKS currently in the ring.
#[derive(Debug, Clone)]
pub struct FetchedInfo {
    /// When the set was last fetched (or confirmed unchanged with a 304).
    pub fetched_at: SystemTime,
    /// Monotonic twin of `fetched_at`, for age computations.
    pub fetched_instant: Instant,
    /// The response's `ETag`, sent back as `If-None-Match`; `None` once the keys are dropped.
    pub etag: Option<String>,
    /// The freshness lifetime used for this set (after clamping and jitter).
    pub ttl: Duration,
}

/// One row of the admin key listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyListing {
    /// `signing_key` or `legacy_secret`.
    pub source: KeySource,
    /// The key's kid, if any.
    pub kid: Option<String>,
    /// The one algorithm the key verifies.
    pub alg: &'static str,
    /// `env`, `inline` or `jwks`.
    pub origin: KeyOrigin,
}

/// How a fetched key set differs from the one held, by kid, each list sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchedChanges {
    /// Kids the held set lacks.
    pub added: Vec<String>,
    /// Kids held that the fetched set lacks.
    pub removed: Vec<String>,
    /// Kids in both, with another key or algorithm.
    pub replaced: Vec<String>,
}

impl FetchedChanges {
    /// The same keys under the same kids.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.replaced.is_empty()
    }
}

/// An immutable snapshot of the trusted keys.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    legacy: Vec<LegacySecret>,
    /// Where the legacy secrets' verifications are counted (one series for them all: a token
    /// does not tell which secret signed it). Shared by every ring that replaces this one.
    legacy_ok: OkCounter,
    inline: HashMap<String, Arc<VerifyingKey>>,
    fetched: HashMap<String, Arc<VerifyingKey>>,
    fetched_info: Option<FetchedInfo>,
    generation: u64,
}

impl KeyRing {
    /// A ring from the configuration alone (no fetched keys yet), generation 0.
    pub fn new(legacy: Vec<LegacySecret>, inline: Vec<VerifyingKey>) -> Self {
        let inline = inline
            .into_iter()
            .map(|k| (k.kid.to_string(), Arc::new(k)))
            .collect();
        Self {
            legacy,
            legacy_ok: OkCounter::default(),
            inline,
            fetched: HashMap::new(),
            fetched_info: None,
            generation: 0,
        }
    }

    /// The asymmetric key for `kid`: inline keys (set by the operator) win over fetched ones.
    pub fn find(&self, kid: &str) -> Option<&VerifyingKey> {
        self.inline
            .get(kid)
            .or_else(|| self.fetched.get(kid))
            .map(Arc::as_ref)
    }

    /// The HS256 secrets; empty means the legacy secret is revoked.
    pub fn legacy_secrets(&self) -> &[LegacySecret] {
        &self.legacy
    }

    /// Where the legacy secrets' verifications are counted.
    pub fn legacy_ok(&self) -> &OkCounter {
        &self.legacy_ok
    }

    /// Changes whenever the trusted key set is replaced.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Metadata of the fetched set, if one was ever fetched.
    pub fn fetched_info(&self) -> Option<&FetchedInfo> {
        self.fetched_info.as_ref()
    }

    /// Number of fetched keys in the ring.
    pub fn fetched_len(&self) -> usize {
        self.fetched.len()
    }

    /// True when at least one key of any kind is present (readiness).
    pub fn can_verify(&self) -> bool {
        !self.legacy.is_empty() || !self.inline.is_empty() || !self.fetched.is_empty()
    }

    /// Splits fetched `keys` into those the ring takes and those an inline key with the same kid
    /// overrides, reported as dropped with the reason. Inline keys are the operator's and win
    /// (a fetched key never displaces one), so a fetched key under their kid verifies nothing:
    /// listed beside the inline key it would read as trusted, with the inline key's counts.
    pub fn without_overridden(
        &self,
        keys: Vec<VerifyingKey>,
    ) -> (Vec<VerifyingKey>, Vec<DroppedKey>) {
        let mut overridden = Vec::new();
        let kept = keys
            .into_iter()
            .filter(|key| {
                let Some(inline) = self.inline.get(&*key.kid) else {
                    return true;
                };
                let same = inline.alg == key.alg && inline.fingerprint == key.fingerprint;
                let reason = if same {
                    format!(
                        "the same key as the inline key {} ({}) from SUPABASE_JWKS, listed there",
                        inline.kid,
                        inline.alg.as_str()
                    )
                } else {
                    format!(
                        "overridden by the inline key {} ({}) from SUPABASE_JWKS: a fetched key \
                         never displaces an inline one, so tokens this key signs are refused",
                        inline.kid,
                        inline.alg.as_str()
                    )
                };
                let material = KeyMaterial::of_key(key);
                let mut dropped =
                    dropped_key(Some(key.kid.to_string()), &reason, key.origin, material);
                dropped.same_as_inline = same;
                overridden.push(dropped);
                false
            })
            .collect();
        (kept, overridden)
    }

    /// Every trusted key, for the admin endpoint: legacy secrets, then inline, then fetched keys,
    /// each group sorted by kid.
    pub fn listing(&self) -> Vec<KeyListing> {
        let mut out: Vec<KeyListing> = self
            .legacy
            .iter()
            .map(|s| KeyListing {
                source: KeySource::LegacySecret,
                kid: s.kid.clone(),
                alg: "HS256",
                origin: s.origin,
            })
            .collect();
        for group in [&self.inline, &self.fetched] {
            let mut keys: Vec<_> = group.values().collect();
            keys.sort_by(|a, b| a.kid.cmp(&b.kid));
            out.extend(keys.into_iter().map(|k| KeyListing {
                source: KeySource::SigningKey,
                kid: Some(k.kid.to_string()),
                alg: k.alg.as_str(),
                origin: k.origin,
            }));
        }
        out
    }

    /// How the fetched `keys` differ from the fetched keys held, by kid (see [`FetchedChanges`]).
    pub fn fetched_changes(&self, keys: &[VerifyingKey]) -> FetchedChanges {
        let mut changes = FetchedChanges::default();
        for key in keys {
            match self.fetched.get(&*key.kid) {
                None => changes.added.push(key.kid.to_string()),
                Some(held) if held.alg != key.alg || held.fingerprint != key.fingerprint => {
                    changes.replaced.push(key.kid.to_string());
                }
                Some(_) => {}
            }
        }
        changes.removed = self
            .fetched
            .keys()
            .filter(|kid| !keys.iter().any(|key| &*key.kid == kid.as_str()))
            .cloned()
            .collect();
        for kids in [
            &mut changes.added,
            &mut changes.removed,
            &mut changes.replaced,
        ] {
            kids.sort_unstable();
        }
        changes
    }

    fn fetched_fingerprint(&self) -> Vec<(&str, &str, &[u8])> {
        let mut fp: Vec<_> = self
            .fetched
            .values()
            .map(|k| (&*k.kid, k.alg.as_str(), k.fingerprint.as_slice()))
            .collect();
        fp.sort_unstable();
        fp
    }
}

/// The shared, atomically swapped current [`KeyRing`].
#[derive(Debug)]
pub struct KeyRingHandle {
    current: ArcSwap<KeyRing>,
}

impl KeyRingHandle {
    /// Starts from `ring`.
    pub fn new(ring: KeyRing) -> Self {
        Self {
            current: ArcSwap::from_pointee(ring),
        }
    }

    /// The current snapshot (lock-free).
    pub fn load(&self) -> Arc<KeyRing> {
        self.current.load_full()
    }

    /// Replaces the fetched keys and their metadata. The generation is bumped when the set of
    /// (kid, alg, public key) differs from the current one; a refresh that brings the same
    /// keys only updates the metadata, so the token cache survives routine refreshes.
    /// A key under an inline key's kid is never held (see [`KeyRing::without_overridden`]).
    /// Returns the new generation.
    pub fn replace_fetched(&self, keys: Vec<VerifyingKey>, info: FetchedInfo) -> u64 {
        let fetched: HashMap<String, Arc<VerifyingKey>> = keys
            .into_iter()
            .map(|k| (k.kid.to_string(), Arc::new(k)))
            .collect();
        self.swap(|old| {
            let mut ring = old.clone();
            ring.fetched = fetched.clone();
            ring.fetched.retain(|kid, _| !old.inline.contains_key(kid));
            ring.fetched_info = Some(info.clone());
            if ring.fetched_fingerprint() != old.fetched_fingerprint() {
                ring.generation = old.generation.wrapping_add(1);
            }
            ring
        })
    }

    /// Updates only the metadata (a 304 Not Modified answer).
    pub fn touch_fetched(&self, info: FetchedInfo) -> u64 {
        self.swap(|old| {
            let mut ring = old.clone();
            ring.fetched_info = Some(info.clone());
            ring
        })
    }

    /// Drops every fetched key (the set went stale beyond the allowed limit). Bumps the
    /// generation if any key was dropped. The ETag goes too: it names a set the ring no longer
    /// holds, and a 304 to it would "confirm" the empty ring.
    pub fn clear_fetched(&self) -> u64 {
        self.swap(|old| {
            let mut ring = old.clone();
            if !ring.fetched.is_empty() {
                ring.fetched.clear();
                ring.generation = old.generation.wrapping_add(1);
            }
            if let Some(info) = &mut ring.fetched_info {
                info.etag = None;
            }
            ring
        })
    }

    fn swap(&self, f: impl Fn(&KeyRing) -> KeyRing) -> u64 {
        let prev = self.current.rcu(|old| Arc::new(f(old)));
        // `rcu` returns the snapshot it replaced; read back the one now current.
        drop(prev);
        self.current.load().generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::keys::parse_fetched_keys;
    use serde_json::json;

    fn info() -> FetchedInfo {
        FetchedInfo {
            fetched_at: SystemTime::now(),
            fetched_instant: Instant::now(),
            etag: None,
            ttl: Duration::from_secs(600),
        }
    }

    fn ed_jwk(kid: &str, x_byte: u8) -> serde_json::Value {
        // 32 bytes that aws-lc accepts as an Ed25519 public key; signatures are not needed here.
        let mut x = [0u8; 32];
        x[0] = x_byte;
        use base64::Engine;
        json!({"kty":"OKP","crv":"Ed25519","kid":kid,
            "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(x)})
    }

    #[test]
    fn generation_bumps_only_when_the_set_changes() {
        let handle = KeyRingHandle::new(KeyRing::default());
        let keys = |jwks: &[serde_json::Value]| parse_fetched_keys(jwks).keys;
        let a = ed_jwk("a", 0x3b);
        let b = ed_jwk("b", 0x3b);
        assert_eq!(
            keys(std::slice::from_ref(&a)).len(),
            1,
            "test key must parse"
        );
        assert_eq!(
            handle.replace_fetched(keys(std::slice::from_ref(&a)), info()),
            1
        );
        assert_eq!(
            handle.replace_fetched(keys(std::slice::from_ref(&a)), info()),
            1,
            "same set"
        );
        assert_eq!(
            handle.replace_fetched(keys(&[a.clone(), b.clone()]), info()),
            2,
            "key added"
        );
        assert_eq!(
            handle.replace_fetched(keys(std::slice::from_ref(&a)), info()),
            3,
            "key removed"
        );
        let a2 = ed_jwk("a", 0x3c);
        assert_eq!(
            handle.replace_fetched(keys(&[a2]), info()),
            4,
            "same kid, new key material"
        );
        assert_eq!(handle.clear_fetched(), 5);
        assert_eq!(handle.clear_fetched(), 5, "nothing left to drop");
        assert!(handle.load().find("a").is_none());
    }

    /// The changes name the kids added, removed and given another key; the same keys again
    /// are no change (what decides whether `JWKS fetched` is at INFO).
    #[test]
    fn fetched_changes_name_the_kids_added_removed_and_replaced() {
        let handle = KeyRingHandle::new(KeyRing::default());
        let keys = |jwks: &[serde_json::Value]| parse_fetched_keys(jwks).keys;
        let held = [ed_jwk("a", 0x3b), ed_jwk("b", 0x3b), ed_jwk("c", 0x3b)];
        handle.replace_fetched(keys(&held), info());
        let ring = handle.load();
        assert!(ring.fetched_changes(&keys(&held)).is_empty());
        let changes = ring.fetched_changes(&keys(&[
            ed_jwk("e", 0x3b),
            ed_jwk("c", 0x3b),
            ed_jwk("b", 0x3c),
            ed_jwk("d", 0x3b),
        ]));
        assert_eq!(
            changes,
            FetchedChanges {
                added: vec!["d".to_owned(), "e".to_owned()],
                removed: vec!["a".to_owned()],
                replaced: vec!["b".to_owned()],
            }
        );
        assert_eq!(
            KeyRing::default().fetched_changes(&keys(&held)).added,
            ["a", "b", "c"]
        );
    }

    /// A fetched key under an inline key's kid is never held, even when handed to the ring: the
    /// listing shows the inline key alone, and the fetcher reports the other as overridden.
    #[test]
    fn a_fetched_key_never_joins_an_inline_one_with_its_kid() {
        let inline = crate::auth::keys::parse_inline_keys(&[ed_jwk("a", 0x3b)]).keys;
        let handle = KeyRingHandle::new(KeyRing::new(Vec::new(), inline));
        let fetched = parse_fetched_keys(&[ed_jwk("a", 0x3c), ed_jwk("b", 0x3c)]).keys;
        let (taken, overridden) = handle.load().without_overridden(fetched);
        assert_eq!(overridden.len(), 1);
        assert_eq!(overridden[0].kid.as_deref(), Some("a"));
        assert!(!overridden[0].same_as_inline);
        assert_eq!(taken.len(), 1);

        let all = parse_fetched_keys(&[ed_jwk("a", 0x3c), ed_jwk("b", 0x3c)]).keys;
        handle.replace_fetched(all, info());
        let listed: Vec<(Option<String>, KeyOrigin)> = handle
            .load()
            .listing()
            .into_iter()
            .map(|key| (key.kid, key.origin))
            .collect();
        assert_eq!(
            listed,
            [
                (Some("a".to_owned()), KeyOrigin::Inline),
                (Some("b".to_owned()), KeyOrigin::Jwks)
            ]
        );
        assert_eq!(handle.load().fetched_len(), 1);
    }
}
