//! The credential layer: legacy HS256 secrets, Supabase JWT signing keys (JWKS) and opaque
//! API keys, verified side by side.
//!
//! File map: [`keys`] parses JWKs, [`keyring`] holds the trusted keys as an atomically swapped
//! snapshot, [`verify`] checks one token against a snapshot, [`jwks`] refreshes the fetched
//! keys, [`cache`] remembers verified tokens, [`Authenticator`] ties them together.
//!
//! Wiring, in short:
//! ```no_run
//! # async fn demo(settings: edgegate::auth::AuthSettings) {
//! let auth = edgegate::auth::Authenticator::new(settings, reqwest::Client::new());
//! let _refresh = auth.spawn_refresh(); // keep it; dropping it stops the refresh
//! match auth.verify_bearer("eyJ...").await {
//!     Ok(verified) => println!("{:?} {:?}", verified.source, verified.role),
//!     Err(e) => println!("401 {}: {}", e.code(), e.message()),
//! }
//! # }
//! ```

pub mod authenticator;
pub mod cache;
pub mod callers;
pub(crate) mod compact;
pub mod error;
pub(crate) mod json;
pub mod jwks;
pub mod keyring;
pub mod keys;
pub mod legacy_report;
pub mod metrics;
pub mod mint;
pub mod usage;
pub mod verify;

pub use authenticator::{
    ApiKeyListing, ApiKeyType, AuthSettings, Authenticator, api_key_id, parse_api_key_id,
};
pub use error::{AuthError, Failure};
pub use jwks::{
    JwksFetcher, JwksStats, JwksStatsSnapshot, JwksStatus, RefetchOutcome, RefreshTask,
};
pub use keyring::{KeyListing, KeyRing, KeyRingHandle, KeySource};
pub use keys::{Alg, DroppedKey, KeyOrigin};
pub use verify::{Claims, Verified, VerifySettings, verify};

/// The credential layer's settings, taken from the service configuration.
pub fn settings_from(config: &crate::config::Config) -> AuthSettings {
    let jwt = &config.jwt;
    let named = |keys: &std::collections::BTreeMap<String, secrecy::SecretString>| {
        keys.iter()
            .map(|(name, key)| (name.clone(), key.clone()))
            .collect()
    };
    AuthSettings {
        legacy_secrets: jwt.legacy_secret.iter().cloned().collect(),
        inline_jwks: jwt.inline_jwks.iter().map(|key| key.0.clone()).collect(),
        jwks_url: jwt.jwks_url.clone(),
        issuers: jwt.issuers.clone(),
        audiences: jwt.audiences.clone(),
        leeway: jwt.leeway,
        cache_ttl: jwt.jwks_cache_ttl,
        min_refresh: jwt.jwks_min_refresh,
        secret_api_keys: named(&config.api_keys.secret),
        publishable_api_keys: named(&config.api_keys.publishable),
        ..AuthSettings::default()
    }
}

#[cfg(test)]
mod tests;
