//! `edgegate token mint`: a token for local testing, shaped like Supabase's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::ExposeSecret as _;
use serde_json::Value;

use crate::auth::mint::{SigningKey, api_key_claims, legacy_token, user_claims};
use crate::config::Config;

/// Longest `--ttl` accepted: ten years, as long as Supabase's legacy API keys live.
pub const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 86_400);

/// What signs the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signer {
    /// A private JWK file: one JWK, `{"keys":[…]}` or an array (the first key is used).
    Jwk(PathBuf),
    /// The legacy HS256 secret, `SUPABASE_JWT_SECRET`.
    Legacy,
}

/// The options of `token mint`.
#[derive(Debug, Clone)]
pub struct MintOptions {
    pub role: String,
    pub sub: Option<String>,
    pub ttl: Duration,
    pub signer: Signer,
}

/// `--role`: any text but a blank one (clap reports a refusal as a usage error, exit 2).
pub fn parse_role(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        return Err("must not be empty".to_owned());
    }
    Ok(text.to_owned())
}

/// Parses `30s`, `15m`, `1h`, `7d` or a number of seconds (1 s to ten years).
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = parse_span(text)?;
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err("must be between 1 second and 10 years".to_owned());
    }
    Ok(ttl)
}

/// `30s`, `15m`, `1h`, `7d` or a number of seconds, zero included: each option that takes a
/// span states its own bounds.
pub(crate) fn parse_span(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().last() {
        Some((at, unit @ ('s' | 'm' | 'h' | 'd'))) => (&text[..at], unit),
        _ => (text, 's'),
    };
    let scale = match unit {
        'm' => 60,
        'h' => 3_600,
        'd' => 86_400,
        _ => 1,
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .map(Duration::from_secs)
        .ok_or_else(|| "expected 30s, 15m, 1h, 7d or a number of seconds".to_owned())
}

/// The claims of a minted token.
///
/// With `--sub`, or for any role but `anon` and `service_role`: a Supabase Auth access token
/// (`iss` `${SUPABASE_URL}/auth/v1`, else the first of `JWT_ISSUERS`, else `supabase`; `aud`
/// the first of `JWT_AUDIENCES`, `authenticated` by default; a random UUID `sub` when none is
/// given).
/// For `anon` and `service_role` without `--sub`: a legacy API key's claims,
/// `{"iss":"supabase","ref","role","iat","exp"}` (`ref` only when `SUPABASE_URL` names a
/// `<ref>.supabase.co` project).
/// An `iss` that `JWT_ISSUERS` leaves out is replaced by the first it lists: the token is for
/// this service, and would be refused otherwise.
pub fn claims(config: &Config, options: &MintOptions, now: i64) -> Value {
    let ttl = i64::try_from(options.ttl.as_secs()).unwrap_or(i64::MAX);
    let jwt = &config.jwt;
    let accepted = |usual: String| match &jwt.issuers {
        Some(issuers) if !issuers.contains(&usual) => issuers.first().cloned().unwrap_or(usual),
        _ => usual,
    };
    let api_key_role = matches!(options.role.as_str(), "anon" | "service_role");
    match &options.sub {
        None if api_key_role => {
            let mut claims = api_key_claims(
                jwt.project_ref().unwrap_or_default(),
                &options.role,
                now,
                ttl,
            );
            if let Some(claims) = claims.as_object_mut() {
                if jwt.project_ref().is_none() {
                    claims.remove("ref");
                }
                claims.insert("iss".into(), accepted("supabase".to_owned()).into());
            }
            claims
        }
        sub => {
            let issuer = jwt
                .auth_issuer()
                .or_else(|| jwt.issuers.as_ref()?.first().cloned())
                .unwrap_or_else(|| "supabase".to_owned());
            let sub = sub
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let mut claims = user_claims(&accepted(issuer), &options.role, &sub, now, ttl);
            if let Some(audience) = jwt.audiences.first() {
                claims["aud"] = audience.as_str().into();
            }
            claims
        }
    }
}

/// Mints the token `options` describe.
pub fn mint(config: &Config, options: &MintOptions, now: i64) -> anyhow::Result<String> {
    if options.role.trim().is_empty() {
        anyhow::bail!("--role must not be empty");
    }
    let claims = claims(config, options, now);
    match &options.signer {
        Signer::Legacy => {
            let secret = config.jwt.legacy_secret.as_ref().ok_or_else(|| {
                anyhow::anyhow!(
                    "SUPABASE_JWT_SECRET is not set: --legacy signs with the legacy JWT secret \
                     (set it in the environment or .env)"
                )
            })?;
            Ok(legacy_token(
                secret.expose_secret().as_bytes(),
                &claims,
                None,
            ))
        }
        Signer::Jwk(path) => load_private_jwk(path)?.token(&claims),
    }
}

/// Reads a private JWK file: a single JWK, `{"keys":[…]}` or an array such as the Supabase
/// CLI's `signing_keys.json`, of which the first key is used.
pub fn load_private_jwk(path: &Path) -> anyhow::Result<SigningKey> {
    let shown = path.display();
    let bytes = std::fs::read(path).map_err(|err| anyhow::anyhow!("cannot read {shown}: {err}"))?;
    // The parser's message gives a line and column, never the file's text.
    let document = crate::auth::json::from_slice_strict(&bytes)
        .map_err(|err| anyhow::anyhow!("{shown} is not JSON: {err}"))?;
    let jwk = match &document {
        Value::Object(object) => match object.get("keys") {
            Some(Value::Array(keys)) => keys.first(),
            Some(_) => anyhow::bail!("{shown}: keys is not an array"),
            None => Some(&document),
        },
        Value::Array(keys) => keys.first(),
        _ => anyhow::bail!("{shown} holds neither a JWK, {{\"keys\":[…]}} nor an array of JWKs"),
    };
    let jwk = jwk.ok_or_else(|| anyhow::anyhow!("{shown} holds no key"))?;
    SigningKey::from_private_jwk(jwk).map_err(|err| anyhow::anyhow!("{shown}: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Alg;
    use serde_json::json;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Config {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        Config::from_lookup(|name| vars.get(name).cloned()).unwrap()
    }

    fn options(role: &str, sub: Option<&str>) -> MintOptions {
        MintOptions {
            role: role.to_owned(),
            sub: sub.map(str::to_owned),
            ttl: Duration::from_secs(3600),
            signer: Signer::Legacy,
        }
    }

    #[test]
    fn ttls_take_a_unit_or_plain_seconds() {
        let secs = |text| parse_ttl(text).map(|ttl| ttl.as_secs());
        assert_eq!(secs("30s"), Ok(30));
        assert_eq!(secs("15m"), Ok(900));
        assert_eq!(secs("1h"), Ok(3_600));
        assert_eq!(secs("7d"), Ok(604_800));
        assert_eq!(secs("90"), Ok(90));
        assert_eq!(secs("3650d"), Ok(MAX_TTL.as_secs()));
        for bad in [
            "",
            "h",
            "0",
            "0s",
            "-5",
            "1.5h",
            "1w",
            "3651d",
            "99999999999999999999d",
        ] {
            assert!(parse_ttl(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn user_tokens_take_the_issuer_from_supabase_url_when_accepted() {
        let now = 1_800_000_000;
        let project = config(&[("SUPABASE_URL", "https://abcd.supabase.co")]);
        let claims = claims(&project, &options("authenticated", Some("u1")), now);
        assert_eq!(claims["iss"], "https://abcd.supabase.co/auth/v1");
        assert_eq!(claims["sub"], "u1");
        assert_eq!(claims["aud"], "authenticated");
        assert_eq!(claims["role"], "authenticated");
        assert_eq!(
            (claims["iat"].as_i64(), claims["exp"].as_i64()),
            (Some(now), Some(now + 3600))
        );

        let listed = config(&[("JWT_ISSUERS", "https://first/auth/v1,supabase")]);
        let claims = super::claims(&listed, &options("authenticated", None), now);
        assert_eq!(claims["iss"], "https://first/auth/v1");
        let sub = uuid::Uuid::parse_str(claims["sub"].as_str().unwrap()).unwrap();
        assert_eq!(sub.get_version_num(), 4);

        let nothing = super::claims(&config(&[]), &options("editor", Some("u")), now);
        assert_eq!(nothing["iss"], "supabase");
        assert_eq!(nothing["role"], "editor");
    }

    /// A minted token passes the checks of a server with the same configuration: `iss` from
    /// `JWT_ISSUERS` when it leaves out the usual one, `aud` from `JWT_AUDIENCES`.
    #[tokio::test]
    async fn minted_tokens_pass_the_issuer_and_audience_checks_of_the_same_config() {
        let now = crate::clock::Clock::system().unix_now();
        let config = config(&[
            ("SUPABASE_URL", "https://abcd.supabase.co"),
            ("JWT_ISSUERS", "https://other/auth/v1"),
            ("JWT_AUDIENCES", "app"),
            ("SUPABASE_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
        ]);
        let auth = crate::auth::Authenticator::new(
            crate::auth::settings_from(&config),
            reqwest::Client::new(),
        );
        for (role, sub) in [
            ("authenticated", Some("u1")),
            ("anon", None),
            ("service_role", None),
        ] {
            let token = mint(&config, &options(role, sub), now).unwrap();
            let verified = auth.verify_bearer(&token).await;
            assert!(verified.is_ok(), "{role}: {verified:?}");
            let claims = super::claims(&config, &options(role, sub), now);
            assert_eq!(claims["iss"], "https://other/auth/v1", "{role}");
            if sub.is_some() {
                assert_eq!(claims["aud"], "app", "{role}");
            }
        }
    }

    #[test]
    fn anon_and_service_role_without_sub_look_like_legacy_api_keys() {
        let now = 1_800_000_000;
        let project = config(&[("SUPABASE_URL", "https://abcd.supabase.co")]);
        let claims = claims(&project, &options("service_role", None), now);
        assert_eq!(
            claims,
            json!({"iss": "supabase", "ref": "abcd", "role": "service_role",
                   "iat": now, "exp": now + 3600})
        );
        let local = super::claims(&config(&[]), &options("anon", None), now);
        assert_eq!(
            local,
            json!({"iss": "supabase", "role": "anon", "iat": now, "exp": now + 3600})
        );
        let with_sub = super::claims(&project, &options("anon", Some("u")), now);
        assert_eq!(with_sub["aud"], "authenticated");
    }

    #[test]
    fn legacy_without_the_secret_names_the_variable() {
        let err = mint(&config(&[]), &options("anon", None), 1).unwrap_err();
        assert!(err.to_string().contains("SUPABASE_JWT_SECRET"), "{err}");
        let empty_role = mint(&config(&[]), &options(" ", None), 1).unwrap_err();
        assert!(empty_role.to_string().contains("--role"), "{empty_role}");
    }

    #[test]
    fn jwk_files_hold_one_jwk_a_jwks_or_an_array() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate(Alg::ES256).unwrap();
        let private: Value =
            serde_json::from_str(key.private_jwk().unwrap().expose_secret()).unwrap();
        let other: Value = serde_json::from_str(
            SigningKey::generate(Alg::RS256)
                .unwrap()
                .private_jwk()
                .unwrap()
                .expose_secret(),
        )
        .unwrap();
        for (name, document) in [
            ("one.json", private.clone()),
            (
                "jwks.json",
                json!({"keys": [private.clone(), other.clone()]}),
            ),
            ("array.json", json!([private.clone(), other])),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, document.to_string()).unwrap();
            let loaded = load_private_jwk(&path).unwrap();
            assert_eq!(loaded.kid(), key.kid(), "{name}");
            assert_eq!(loaded.public_jwk(), key.public_jwk(), "{name}");
        }

        let d = private["d"].as_str().unwrap().to_owned();
        for (name, text, reason) in [
            ("empty.json", "[]".to_owned(), "holds no key"),
            ("text.json", format!("not json {d}"), "is not JSON"),
            ("number.json", "42".to_owned(), "holds neither"),
            (
                "keys.json",
                r#"{"keys":{}}"#.to_owned(),
                "keys is not an array",
            ),
            (
                "public.json",
                key.public_jwk().to_string(),
                "this is a public key",
            ),
            (
                "dup.json",
                format!(r#"{{"d":"{d}","d":"{d}"}}"#),
                "is not JSON",
            ),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            let err = load_private_jwk(&path).unwrap_err().to_string();
            assert!(err.contains(reason), "{name}: {err}");
            assert!(err.contains(name), "{name}: the path is named: {err}");
            assert!(!err.contains(&d), "{name}: d leaked: {err}");
        }
        let missing = load_private_jwk(&dir.path().join("absent.json")).unwrap_err();
        assert!(missing.to_string().contains("cannot read"), "{missing}");
    }
}
