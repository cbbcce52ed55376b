//! The credential lines of `edgegate check`: the legacy secret, inline and fetched JWKS, and
//! API keys. Key ids, algorithms and names only: never a secret.

use std::time::Duration;

use crate::auth::{Authenticator, DroppedKey, KeyListing, KeyOrigin, KeySource, settings_from};
use crate::commands::CheckLine;
use crate::config::Config;

/// The credential lines, fetching the JWKS when a URL is configured.
pub async fn lines(config: &Config) -> Vec<CheckLine> {
    let auth = Authenticator::new(
        settings_from(config),
        crate::auth::jwks::http_client(config.jwt.jwks_url.as_ref()),
    );
    let mut lines = vec![legacy_line(config, &auth)];
    if !config.jwt.inline_jwks.is_empty() {
        let keys = signing_keys(&auth, KeyOrigin::Inline);
        let dropped = auth.inline_dropped();
        lines.push(CheckLine {
            item: "jwks (inline)",
            // A key someone wrote into SUPABASE_JWKS and that is not used is a mistake.
            ok: dropped.is_empty(),
            detail: format!("SUPABASE_JWKS: {}", describe(&keys, dropped)),
        });
    }
    if let Some(fetcher) = auth.fetcher() {
        let url = fetcher.status().url;
        // The fetch has its own 5 s limit; this bounds the whole call all the same.
        let fetched = tokio::time::timeout(Duration::from_secs(10), fetcher.refresh_now()).await;
        lines.push(match fetched {
            Ok(Ok(report)) => {
                let keys = signing_keys(&auth, KeyOrigin::Jwks);
                let verifies = auth.can_verify();
                let detail = if !keys.is_empty() || !report.dropped.is_empty() {
                    describe(&keys, &report.dropped)
                } else if !verifies {
                    "no signing keys published yet, and nothing else verifies a credential: \
                     /readyz answers 503 until a key is published, SUPABASE_JWT_SECRET is set \
                     or an API key is (SUPABASE_SECRET_KEYS, SUPABASE_PUBLISHABLE_KEYS)"
                        .to_owned()
                } else if config.jwt.legacy_secret.is_some() && config.jwt.inline_jwks.is_empty() {
                    "no signing keys published yet (only the legacy secret signs)".to_owned()
                } else {
                    "no signing keys published yet".to_owned()
                };
                // Keys published but none usable: tokens they sign would all be refused. A copy
                // of an inline key is usable: the inline key verifies what it signs.
                let usable =
                    !keys.is_empty() || report.dropped.iter().all(|key| key.same_as_inline);
                CheckLine {
                    item: "jwks",
                    ok: verifies && usable,
                    detail: format!("{url}: {detail}"),
                }
            }
            Ok(Err(err)) => CheckLine {
                item: "jwks",
                ok: false,
                detail: format!("{url}: {err}"),
            },
            Err(_) => CheckLine {
                item: "jwks",
                ok: false,
                detail: format!("{url}: no answer within 10 s"),
            },
        });
    }
    lines.push(api_keys_line(config));
    lines
}

/// Whether a JWKS-configured service can become ready: the rule of `/readyz`
/// (`routes::health::key_ring_check`): some key verifies (the legacy secret, an inline or a
/// fetched key) or an API key is configured.
fn signing_keys(auth: &Authenticator, origin: KeyOrigin) -> Vec<KeyListing> {
    auth.key_ring()
        .load()
        .listing()
        .into_iter()
        .filter(|key| key.source == KeySource::SigningKey && key.origin == origin)
        .collect()
}

fn legacy_line(config: &Config, auth: &Authenticator) -> CheckLine {
    let inline_secrets = auth
        .key_ring()
        .load()
        .legacy_secrets()
        .iter()
        .filter(|secret| secret.origin() == KeyOrigin::Inline)
        .count();
    // An inline oct key verifies HS256 as the legacy secret does (GET /admin/signing-keys
    // counts it as configured): with one, HS256 is not refused and the secret not revoked.
    let detail = match (config.jwt.legacy_secret.is_some(), inline_secrets) {
        (true, 0) => "SUPABASE_JWT_SECRET is set: HS256 tokens are verified".to_owned(),
        (true, oct) => format!(
            "SUPABASE_JWT_SECRET is set: HS256 tokens are verified; {oct} oct key(s) in \
             SUPABASE_JWKS also verify HS256"
        ),
        (false, 0) => {
            "SUPABASE_JWT_SECRET is not set: HS256 tokens are refused (legacy secret revoked)"
                .to_owned()
        }
        (false, oct) => format!(
            "SUPABASE_JWT_SECRET is not set, but {oct} oct key(s) in SUPABASE_JWKS verify HS256 \
             tokens as the legacy secret (not revoked until they are removed)"
        ),
    };
    CheckLine {
        item: "legacy secret",
        ok: true,
        detail,
    }
}

fn api_keys_line(config: &Config) -> CheckLine {
    let names = |keys: &std::collections::BTreeMap<String, secrecy::SecretString>| {
        if keys.is_empty() {
            "none".to_owned()
        } else {
            keys.keys().cloned().collect::<Vec<_>>().join(", ")
        }
    };
    CheckLine {
        item: "api keys",
        ok: true,
        detail: format!(
            "secret: {}; publishable: {}",
            names(&config.api_keys.secret),
            names(&config.api_keys.publishable)
        ),
    }
}

/// `2 keys: a1 (ES256), b2 (RS256); dropped 1: c3 (use is not sig)`.
fn describe(keys: &[KeyListing], dropped: &[DroppedKey]) -> String {
    let listed: Vec<String> = keys
        .iter()
        .map(|key| format!("{} ({})", key.kid.as_deref().unwrap_or("no kid"), key.alg))
        .collect();
    let mut out = format!(
        "{} key{}",
        keys.len(),
        if keys.len() == 1 { "" } else { "s" }
    );
    if !listed.is_empty() {
        out.push_str(&format!(": {}", listed.join(", ")));
    }
    if !dropped.is_empty() {
        let reasons: Vec<String> = dropped
            .iter()
            .map(|key| {
                format!(
                    "{} ({})",
                    key.kid.as_deref().unwrap_or("no kid"),
                    key.reason
                )
            })
            .collect();
        out.push_str(&format!(
            "; dropped {}: {}",
            dropped.len(),
            reasons.join("; ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_drops_are_listed_by_kid_alg_and_reason() {
        let key = |kid: &str, alg| KeyListing {
            source: KeySource::SigningKey,
            kid: Some(kid.to_owned()),
            alg,
            origin: KeyOrigin::Jwks,
        };
        let dropped = DroppedKey {
            kid: None,
            reason: "use is not sig".to_owned(),
            origin: KeyOrigin::Jwks,
            same_as_inline: false,
            material: Default::default(),
        };
        assert_eq!(
            describe(
                &[key("a1", "ES256"), key("b2", "RS256")],
                std::slice::from_ref(&dropped)
            ),
            "2 keys: a1 (ES256), b2 (RS256); dropped 1: no kid (use is not sig)"
        );
        assert_eq!(describe(&[key("a1", "EdDSA")], &[]), "1 key: a1 (EdDSA)");
        assert_eq!(
            describe(&[], &[dropped]),
            "0 keys; dropped 1: no kid (use is not sig)"
        );
    }
}
