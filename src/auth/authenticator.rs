//! [`Authenticator`]: the one entry point the HTTP layer calls for bearer tokens and API keys.

use crate::auth::cache::{TokenCache, TokenKey};
use crate::auth::callers::LegacyKind;
use crate::auth::error::{AuthError, Failure};
use crate::auth::jwks::{JwksConfig, JwksFetcher, RefetchOutcome, RefreshTask};
use crate::auth::keyring::{KeyRing, KeyRingHandle, KeySource};
use crate::auth::keys::{Alg, DroppedKey, LegacySecret, parse_inline_keys};
use crate::auth::metrics::{OkCounter, VerificationLabels, Verifications};
use crate::auth::usage::credential_name;
use crate::auth::verify::{
    Claims, MAX_TOKEN_BYTES, Verified, VerifySettings, unverified_alg, unverified_hs256_role,
    verify,
};
use crate::clock::Clock;
use aws_lc_rs::constant_time::verify_slices_are_equal;
use aws_lc_rs::digest::{SHA256, digest};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::Duration;

/// A token looked up in the cache: its fresh entry, or what verifying it takes.
enum Cached {
    Hit(Verified),
    Miss(Miss),
}

/// A cache miss: the token's key there (`None` when it cannot be cached), and the key ring and
/// time (Unix seconds) it is verified against.
struct Miss {
    key: Option<TokenKey>,
    ring: Arc<KeyRing>,
    now: i64,
}

/// Everything the credential layer needs, filled from the service configuration.
/// `Debug` redacts secrets, including `oct` members of inline JWKs.
#[derive(Clone)]
pub struct AuthSettings {
    /// `SUPABASE_JWT_SECRET` (HS256, used as raw bytes). Empty: HS256 tokens are refused.
    pub legacy_secrets: Vec<SecretString>,
    /// `SUPABASE_JWKS`: one JWK per element (see [`crate::auth::keys::parse_jwks_document`]).
    pub inline_jwks: Vec<Value>,
    /// JWKS location; `None` disables fetching.
    pub jwks_url: Option<url::Url>,
    /// Accepted `iss` values; `None`: not checked.
    pub issuers: Option<Vec<String>>,
    /// Accepted `aud` values.
    pub audiences: Vec<String>,
    /// Clock leeway for `exp`, `nbf`, `iat`.
    pub leeway: Duration,
    /// JWKS freshness when the server sends no `max-age` (`JWKS_CACHE_TTL_SECONDS`).
    pub cache_ttl: Duration,
    /// Least time between two JWKS fetches (`JWKS_MIN_REFRESH_SECONDS`).
    pub min_refresh: Duration,
    /// `SUPABASE_SECRET_KEYS`: (name, `sb_secret_…`).
    pub secret_api_keys: Vec<(String, SecretString)>,
    /// `SUPABASE_PUBLISHABLE_KEYS`: (name, `sb_publishable_…`).
    pub publishable_api_keys: Vec<(String, SecretString)>,
    /// Capacity of the verified-token cache; 0 disables it.
    pub token_cache_capacity: usize,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            legacy_secrets: Vec::new(),
            inline_jwks: Vec::new(),
            jwks_url: None,
            issuers: None,
            audiences: vec!["authenticated".to_owned()],
            leeway: Duration::from_secs(30),
            cache_ttl: Duration::from_secs(600),
            min_refresh: Duration::from_secs(30),
            secret_api_keys: Vec::new(),
            publishable_api_keys: Vec::new(),
            token_cache_capacity: 10_000,
        }
    }
}

impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Inline JWKs may hold `oct` secrets: show only their kid and kty.
        let inline: Vec<(Option<&str>, Option<&str>)> = self
            .inline_jwks
            .iter()
            .map(|j| {
                (
                    j.get("kid").and_then(Value::as_str),
                    j.get("kty").and_then(Value::as_str),
                )
            })
            .collect();
        let names = |keys: &[(String, SecretString)]| {
            keys.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>()
        };
        f.debug_struct("AuthSettings")
            .field("legacy_secrets", &self.legacy_secrets.len())
            .field("inline_jwks (kid, kty)", &inline)
            .field(
                "jwks_url",
                &self.jwks_url.as_ref().map(crate::config::shown_url),
            )
            .field("issuers", &self.issuers)
            .field("audiences", &self.audiences)
            .field("leeway", &self.leeway)
            .field("cache_ttl", &self.cache_ttl)
            .field("min_refresh", &self.min_refresh)
            .field("secret_api_keys", &names(&self.secret_api_keys))
            .field("publishable_api_keys", &names(&self.publishable_api_keys))
            .field("token_cache_capacity", &self.token_cache_capacity)
            .finish()
    }
}

/// Which of Supabase's two kinds of API key a key is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ApiKeyType {
    /// `sb_secret_…` (`SUPABASE_SECRET_KEYS`): `service_role`.
    Secret,
    /// `sb_publishable_…` (`SUPABASE_PUBLISHABLE_KEYS`): `anon`.
    Publishable,
}

impl ApiKeyType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Secret => "secret",
            Self::Publishable => "publishable",
        }
    }
}

/// How edgegate names an API key wherever it names one (the `kid` of metrics, log lines, the
/// audit log, `jwt-test` and the key listing; the stored usage rows; `edgegate keys report`):
/// `secret:NAME` or `publishable:NAME`. The type is part of it because Supabase names both of
/// its default keys `default`: after a leak, whether the secret one is used must show.
pub fn api_key_id(key_type: ApiKeyType, name: &str) -> String {
    format!("{}:{name}", key_type.as_str())
}

/// The type and name an API key's id ([`api_key_id`]) holds. A name without a type is what
/// releases before the type was recorded stored, publishable and secret keys of one name
/// together: its type is `None`.
pub fn parse_api_key_id(id: &str) -> (Option<ApiKeyType>, &str) {
    [ApiKeyType::Secret, ApiKeyType::Publishable]
        .into_iter()
        .find_map(|key_type| {
            id.strip_prefix(key_type.as_str())
                .and_then(|rest| rest.strip_prefix(':'))
                .map(|name| (Some(key_type), name))
        })
        .unwrap_or((None, id))
}

/// A configured API key as the key listing shows it; never the key itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKeyListing {
    /// Its name in `SUPABASE_SECRET_KEYS` / `SUPABASE_PUBLISHABLE_KEYS`.
    pub name: String,
    pub key_type: ApiKeyType,
    /// [`api_key_id`].
    pub id: String,
}

/// An API key kept only as its SHA-256, compared in constant time.
struct ApiKey {
    name: String,
    /// [`api_key_id`], shared with every credential it verifies.
    id: Arc<str>,
    digest: [u8; 32],
    key_type: ApiKeyType,
    ok_count: OkCounter,
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

/// The series of `edgegate_credential_verifications` a legacy API key in `apikey` beside the
/// credential that let the request in is counted in when no legacy secret can verify it: the
/// code it would get as the request's credential, under `kid="apikey_beside"` (the request itself
/// was answered). Made at start when no legacy secret is configured.
pub fn unverifiable_beside_labels() -> VerificationLabels {
    VerificationLabels {
        source: "legacy_secret",
        kid: "apikey_beside".to_owned(),
        alg: "HS256",
        outcome: "UNAUTHORIZED_LEGACY_JWT",
    }
}

/// Longest API key looked at; real ones are well under 100 bytes. A configured key longer than
/// this is refused at start (`src/config/`): no request could present it.
pub const MAX_API_KEY_BYTES: usize = 1024;

/// Verifies bearer tokens (with cache and JWKS refetch) and API keys.
pub struct Authenticator {
    ring: Arc<KeyRingHandle>,
    settings: VerifySettings,
    cache: TokenCache,
    fetcher: Option<JwksFetcher>,
    api_keys: Vec<ApiKey>,
    clock: Clock,
    inline_dropped: Vec<DroppedKey>,
    verifications: Verifications,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("settings", &self.settings)
            .field("fetcher", &self.fetcher)
            .field("api_keys", &self.api_keys.len())
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Builds the key ring from the settings. Nothing is fetched yet: call
    /// [`Authenticator::spawn_refresh`] (or [`JwksFetcher::refresh_now`]).
    pub fn new(settings: AuthSettings, client: reqwest::Client) -> Self {
        Self::with_clock(settings, client, Clock::system())
    }

    /// As [`Authenticator::new`], with an injected clock (tests).
    pub fn with_clock(settings: AuthSettings, client: reqwest::Client, clock: Clock) -> Self {
        let inline = parse_inline_keys(&settings.inline_jwks);
        let mut legacy: Vec<LegacySecret> = settings
            .legacy_secrets
            .iter()
            .filter(|s| !s.expose_secret().is_empty())
            .map(|s| LegacySecret::from_env_secret(s.expose_secret().as_bytes()))
            .collect();
        legacy.extend(inline.legacy);
        let ring = Arc::new(KeyRingHandle::new(KeyRing::new(legacy, inline.keys)));
        let fetcher = settings.jwks_url.clone().map(|url| {
            JwksFetcher::new(
                JwksConfig {
                    url,
                    ttl: settings.cache_ttl,
                    min_refresh: settings.min_refresh,
                },
                client,
                ring.clone(),
                clock.clone(),
            )
        });
        let api_keys = settings
            .secret_api_keys
            .iter()
            .map(|k| (k, ApiKeyType::Secret))
            .chain(
                settings
                    .publishable_api_keys
                    .iter()
                    .map(|k| (k, ApiKeyType::Publishable)),
            )
            .filter(|((_, key), _)| !key.expose_secret().is_empty())
            .map(|((name, key), key_type)| ApiKey {
                name: name.clone(),
                id: Arc::from(api_key_id(key_type, name)),
                digest: sha256(key.expose_secret().as_bytes()),
                key_type,
                ok_count: OkCounter::default(),
            })
            .collect();
        Self {
            ring,
            settings: VerifySettings {
                issuers: settings.issuers,
                audiences: settings.audiences,
                leeway: settings.leeway,
            },
            cache: TokenCache::new(settings.token_cache_capacity),
            fetcher,
            api_keys,
            clock,
            inline_dropped: inline.dropped,
            verifications: Verifications::default(),
        }
    }

    /// The key ring (for listings and readiness).
    pub fn key_ring(&self) -> &Arc<KeyRingHandle> {
        &self.ring
    }

    /// The configured API keys, secret ones first, each kind in its names' order.
    pub fn api_key_listing(&self) -> Vec<ApiKeyListing> {
        self.api_keys
            .iter()
            .map(|key| ApiKeyListing {
                name: key.name.clone(),
                key_type: key.key_type,
                id: key.id.to_string(),
            })
            .collect()
    }

    /// The JWKS fetcher, when a JWKS URL is configured.
    pub fn fetcher(&self) -> Option<&JwksFetcher> {
        self.fetcher.as_ref()
    }

    /// Inline JWKs that were refused at start, with reasons.
    pub fn inline_dropped(&self) -> &[DroppedKey] {
        &self.inline_dropped
    }

    /// Whether any credential can be verified now: a key in the ring (the legacy secret, an
    /// inline or fetched signing key) or an API key. `/readyz` and `check` both go by it.
    pub fn can_verify(&self) -> bool {
        self.ring.load().can_verify() || !self.api_keys.is_empty()
    }

    /// The verified-token cache.
    pub fn cache(&self) -> &TokenCache {
        &self.cache
    }

    /// Credentials checked, by source, kid, algorithm and outcome
    /// (`edgegate_credential_verifications`).
    pub fn verifications(&self) -> &Verifications {
        &self.verifications
    }

    /// Counts a credential that passed, in its key's series.
    pub fn count_verified(&self, verified: &Verified) {
        verified
            .ok_count
            .get_or_init(&self.verifications, || VerificationLabels {
                source: verified.source.as_str(),
                kid: credential_name(verified).to_owned(),
                alg: verified.alg,
                outcome: "ok",
            })
            .inc();
    }

    /// Counts a credential refused with `code`, under the source it would have had.
    pub fn count_refused(&self, source: &'static str, code: &'static str) {
        self.verifications
            .get_or_create(&VerificationLabels {
                source,
                kid: "unknown".to_owned(),
                alg: "unknown",
                outcome: code,
            })
            .inc();
    }

    /// Starts the background JWKS refresh (a fetch at once, then whenever due).
    pub fn spawn_refresh(&self) -> Option<RefreshTask> {
        self.fetcher.as_ref().map(JwksFetcher::spawn)
    }

    /// Verifies a bearer JWT: cache, then the key ring; an unknown kid asks the fetcher for
    /// one single-flight refetch and retries once if it happened or the ring changed meanwhile.
    pub async fn verify_bearer(&self, token: &str) -> Result<Verified, AuthError> {
        if token.is_empty() {
            return Err(AuthError::NoCredential);
        }
        // Before hashing, so an oversized token costs nothing.
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::InvalidFormat("token is too large"));
        }
        let Miss { key, ring, now } = match self.look_up(token) {
            Cached::Hit(hit) => return Ok(hit),
            Cached::Miss(miss) => miss,
        };
        let (ring, result) = match verify(&ring, &self.settings, token, now) {
            Err(AuthError::UnknownKid) => self.verify_after_unknown_kid(ring, token).await,
            other => (ring, other),
        };
        let verified = result.map_err(|e| match e {
            AuthError::UnknownKid if self.fetcher.is_some() && ring.fetched_info().is_none() => {
                AuthError::Asymmetric(Failure::NoKeySetYet)
            }
            AuthError::UnknownKid => AuthError::Asymmetric(Failure::UnknownKid),
            e => e,
        })?;
        if let Some(key) = key {
            self.cache.insert(&key, ring.generation(), &verified, now);
        }
        Ok(verified)
    }

    /// `token`'s entry in the cache when it is there and fresh; else what a verification of it
    /// is judged by and stored under.
    fn look_up(&self, token: &str) -> Cached {
        let key = self.cache.key(token);
        let ring = self.ring.load();
        let now = self.clock.unix_now();
        let leeway = i64::try_from(self.settings.leeway.as_secs()).unwrap_or(i64::MAX);
        match key
            .as_ref()
            .and_then(|key| self.cache.get(key, ring.generation(), now, leeway))
        {
            Some(hit) => Cached::Hit(hit),
            None => Cached::Miss(Miss { key, ring, now }),
        }
    }

    /// The legacy API key (`anon` or `service_role`, a JWT the legacy secret signed) sent in
    /// `apikey` beside the Bearer JWT that let a request in, as supabase-js sends its project key
    /// on every call: not the request's credential, but evidence that its client still needs the
    /// legacy secret (revoking it invalidates that key on Supabase). `None` for anything else,
    /// a token of a signing key included; an unknown `kid` starts no JWKS fetch.
    pub fn verify_legacy_beside(&self, token: &str) -> Option<Verified> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return None;
        }
        let verified = match self.look_up(token) {
            Cached::Hit(hit) => hit,
            Cached::Miss(Miss { key, ring, now }) => {
                let verified = verify(&ring, &self.settings, token, now).ok()?;
                if let Some(key) = key {
                    self.cache.insert(&key, ring.generation(), &verified, now);
                }
                verified
            }
        };
        (verified.source == KeySource::LegacySecret).then_some(verified)
    }

    /// A JWT sent in `apikey` with no Bearer that counted: only a legacy API key counts there,
    /// the anon or service_role key (an HS256 token with no `sub` that the legacy secret
    /// verifies), as on Supabase, whose gateway takes a project's keys in `apikey`, never a
    /// session. A signing key's token is refused before any key is looked up (an unknown `kid`
    /// there costs no JWKS fetch); a session, or what another key verified, after: both
    /// [`AuthError::InvalidApiKey`]. A legacy key the legacy secret does not verify (a wrong or
    /// revoked secret, expired) keeps its legacy code, the one the runbook counts. Anything else
    /// that fails matches no configured key either, [`AuthError::InvalidApiKey`] too: three
    /// parts that are no JWT, an `alg` outside the four (`none` included), a signing key's token
    /// whose header is refused (`jku`, `crit`, a malformed `kid`), which answered the Bearer's
    /// codes (`UNAUTHORIZED_INVALID_JWT_FORMAT`, `…_UNSUPPORTED_TOKEN_ALGORITHM`,
    /// `…_ASYMMETRIC_JWT`, counted under `source="signing_key"`).
    pub async fn verify_legacy_key(&self, token: &str) -> Result<Verified, AuthError> {
        if unverified_alg(token).is_some_and(|alg| alg != Alg::HS256) {
            return Err(AuthError::InvalidApiKey);
        }
        let verified = self.verify_bearer(token).await.map_err(|err| match err {
            AuthError::Legacy(_) | AuthError::LegacyRevoked => err,
            _ => AuthError::InvalidApiKey,
        })?;
        if verified.source == KeySource::LegacySecret
            && LegacyKind::of(&verified) != LegacyKind::UserSession
        {
            Ok(verified)
        } else {
            Err(AuthError::InvalidApiKey)
        }
    }

    /// The legacy API key (`anon` or `service_role`) sent in `apikey` beside the Bearer JWT that
    /// let a request in, when no legacy secret is configured (revoked, step 5 of the runbook), so
    /// [`Authenticator::verify_legacy_beside`] cannot verify it: its kind by what its claims say.
    /// Evidence that its client still ships a legacy key, which Supabase refuses once the legacy
    /// keys are disabled; never a verified use. `None` while a legacy secret is configured (what
    /// it does not verify is no legacy key of this project), and for anything that is not an
    /// HS256 JWT claiming `role` anon or service_role without a `sub`.
    pub fn unverifiable_legacy_beside(&self, token: &str) -> Option<LegacyKind> {
        if !self.ring.load().legacy_secrets().is_empty() {
            return None;
        }
        let (role, has_sub) = unverified_hs256_role(token)?;
        LegacyKind::api_key_by_claims(&role, has_sub)
    }

    /// Counts a legacy API key beside the request's credential that could not be verified
    /// ([`Authenticator::unverifiable_legacy_beside`]), in the series
    /// [`unverifiable_beside_labels`].
    pub fn count_unverifiable_beside(&self) {
        self.verifications
            .get_or_create(&unverifiable_beside_labels())
            .inc();
    }

    /// The unknown-kid path, apart from `verify_bearer`'s hot path: one refetch (single flight,
    /// within the cool-down), then one more look, also when the refetch was refused or failed
    /// but the ring changed since `ring`, the snapshot that lacked the kid, was read. Returns
    /// the snapshot the answer came from.
    pub(super) async fn verify_after_unknown_kid(
        &self,
        ring: Arc<KeyRing>,
        token: &str,
    ) -> (Arc<KeyRing>, Result<Verified, AuthError>) {
        let Some(fetcher) = &self.fetcher else {
            return (ring, Err(AuthError::UnknownKid));
        };
        match fetcher.on_unknown_kid().await {
            RefetchOutcome::Fetched | RefetchOutcome::Joined => {
                let ring = self.ring.load();
                let result = verify(&ring, &self.settings, token, self.clock.unix_now());
                (ring, result)
            }
            RefetchOutcome::Suppressed | RefetchOutcome::Failed => {
                // A fetch that ended after `ring` was read may be what put this one in the
                // cool-down: look once at the set it left.
                let current = self.ring.load();
                if current.generation() == ring.generation() {
                    return (ring, Err(AuthError::UnknownKid));
                }
                let result = verify(&current, &self.settings, token, self.clock.unix_now());
                (current, result)
            }
        }
    }

    /// Verifies an opaque API key from the `apikey` header. Secret keys (`service_role`) are
    /// refused when the request came from a browser (`has_origin`). Every configured key is
    /// compared, in constant time, whatever matches first.
    pub fn verify_api_key(&self, key: &str, has_origin: bool) -> Result<Verified, AuthError> {
        if key.is_empty() {
            return Err(AuthError::NoCredential);
        }
        if key.len() > MAX_API_KEY_BYTES {
            return Err(AuthError::InvalidApiKey);
        }
        let presented = sha256(key.as_bytes());
        let mut found: Option<&ApiKey> = None;
        for candidate in &self.api_keys {
            if verify_slices_are_equal(&candidate.digest, &presented).is_ok() && found.is_none() {
                found = Some(candidate);
            }
        }
        let found = found.ok_or(AuthError::InvalidApiKey)?;
        let secret = found.key_type == ApiKeyType::Secret;
        if secret && has_origin {
            return Err(AuthError::SecretKeyInBrowser);
        }
        let role = if secret { "service_role" } else { "anon" };
        let mut claims = Map::new();
        claims.insert("role".to_owned(), Value::String(role.to_owned()));
        Ok(Verified {
            source: KeySource::ApiKey,
            kid: Some(Arc::clone(&found.id)),
            alg: "opaque",
            role: Some(Arc::from(role)),
            sub: None,
            claims: Claims::new(&claims),
            exp: i64::MAX,
            nbf: None,
            ok_count: found.ok_count.clone(),
        })
    }
}
