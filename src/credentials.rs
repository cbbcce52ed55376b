//! Credential extractors: a handler's signature states the access it needs.
//!
//! `User` accepts any valid credential of the contract's *user* kind; `ServiceRole` also demands
//! the `service_role` role (a secret API key counts as one).

use axum::extract::{FromRequestParts, MatchedPath};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue};

use crate::auth::callers::{CallerKind, LegacyKind, client_name};
use crate::auth::usage::credential_name;
use crate::auth::{AuthError, Verified};
use crate::clock::Clock;
use crate::error::ApiError;
use crate::server::middleware::{APIKEY, REQUEST_ID};
use crate::state::AppState;
use crate::store::AuditEntry;

/// Who made the request, as established by its credential.
#[derive(Clone, Debug)]
pub struct Principal {
    pub verified: Verified,
    /// The request's `x-request-id` (kept as the header value: read only by the audit log).
    pub request_id: Option<HeaderValue>,
}

impl Principal {
    /// An audit row for an action this principal took.
    pub fn audit(&self, clock: &Clock, action: &str, outcome: &str) -> AuditEntry {
        AuditEntry::new(
            clock.now_ms(),
            self.request_id
                .as_ref()
                .and_then(|id| id.to_str().ok())
                .map(str::to_owned),
            self.verified.source.as_str(),
            credential_name(&self.verified),
            action,
            outcome,
        )
    }
}

/// Any valid credential: a JWT (legacy or signing key) or an API key.
#[derive(Clone, Debug)]
pub struct User(pub Principal);

/// A valid credential whose role is `service_role`.
#[derive(Clone, Debug)]
pub struct ServiceRole(pub Principal);

/// The credential a request presents, per the contract: a Bearer JWT wins over `apikey`; a
/// Bearer that starts with `sb_` counts only when it equals `apikey`.
#[derive(Debug, PartialEq, Eq)]
pub enum Presented<'a> {
    /// A Bearer JWT.
    Jwt(&'a str),
    /// An `sb_` key in `apikey`.
    ApiKey(&'a str),
    /// A JWT in `apikey`: counts only as a legacy anon or service_role key
    /// ([`crate::auth::Authenticator::verify_legacy_key`]).
    LegacyKey(&'a str),
}

pub fn presented(headers: &HeaderMap) -> Result<Presented<'_>, AuthError> {
    // Read only where it can count: a Bearer JWT wins over `apikey`, whatever `apikey` holds.
    // A header sent twice is refused, not read once: which copy counts is not for edgegate to
    // guess, as a proxy or another service in front of it may read the other (RFC 9110 §5.3:
    // neither is a list).
    let apikey = || {
        let mut values = headers.get_all(&APIKEY).iter();
        match (values.next(), values.next()) {
            (Some(_), Some(_)) => Err(AuthError::RepeatedApiKey),
            (Some(value), None) => Ok(Some(
                value.to_str().map_err(|_| AuthError::InvalidApiKey)?.trim(),
            )
            .filter(|key| !key.is_empty())),
            (None, _) => Ok(None),
        }
    };
    let mut authorizations = headers.get_all(axum::http::header::AUTHORIZATION).iter();
    let authorization = authorizations.next();
    if authorizations.next().is_some() {
        return Err(AuthError::InvalidFormat(
            "more than one Authorization header",
        ));
    }
    if let Some(authorization) = authorization {
        let value = authorization
            .to_str()
            .map_err(|_| AuthError::InvalidFormat("Authorization is not Bearer <token>"))?;
        // The scheme is what comes before the first space, so `Bearer` is the value's first
        // six bytes (in any case) followed by a space; the token is the rest.
        let token = match value.as_bytes().get(..7) {
            Some([scheme @ .., b' ']) if scheme.eq_ignore_ascii_case(b"bearer") => &value[7..],
            // `Bearer ` with no token, its trailing space trimmed by HTTP, or no value at all.
            _ if value.eq_ignore_ascii_case("bearer") || value.trim().is_empty() => "",
            _ => {
                return Err(AuthError::InvalidFormat(
                    "Authorization is not Bearer <token>",
                ));
            }
        };
        let token = token.trim();
        // An empty Bearer is no credential: fall through to apikey.
        if !token.is_empty() && !token.starts_with("sb_") {
            return Ok(Presented::Jwt(token));
        }
        match apikey()? {
            Some(key) if key == token => return Ok(Presented::ApiKey(token)),
            None if !token.is_empty() => return Err(AuthError::UnpairedBearerKey),
            // An sb_ Bearer that differs from apikey does not count; fall through to apikey.
            _ => {}
        }
    }
    match apikey()? {
        Some(key) if key.starts_with("sb_") => Ok(Presented::ApiKey(key)),
        // A legacy anon or service_role key is itself a JWT.
        Some(key) if key.split('.').count() == 3 => Ok(Presented::LegacyKey(key)),
        // Neither an opaque key nor a JWT: it matches no configured key.
        Some(_) => Err(AuthError::InvalidApiKey),
        None => Err(AuthError::NoCredential),
    }
}

/// The `apikey` sent beside the Bearer JWT that counted (supabase-js sends its project key there
/// on every call): not a credential of the request, but what its client would lose if that key
/// stopped working. `None` when `apikey` is what counted, or is absent or unreadable.
fn apikey_beside<'a>(headers: &'a HeaderMap, presented: &Presented<'_>) -> Option<&'a str> {
    let Presented::Jwt(token) = presented else {
        return None;
    };
    // Two `apikey` headers are no evidence of either: which one the client meant is not guessed.
    let mut values = headers.get_all(&APIKEY).iter();
    let (Some(key), None) = (values.next(), values.next()) else {
        return None;
    };
    let key = key.to_str().ok()?.trim();
    (!key.is_empty() && key != *token).then_some(key)
}

/// Counts the key `apikey` held beside the Bearer that let the request in, when it is a legacy
/// API key or a configured new one: the evidence that a client still needs the legacy secret, or
/// has moved to the new keys, whatever its users' sessions are signed with. With no legacy secret
/// configured, a legacy API key there cannot be verified: it is counted as unverifiable
/// ([`record_unverifiable_beside`]). Anything else held there (a wrong or unknown key, a session
/// token) is not looked at further: it let nothing in. Counted at `now_ms`, the request's one
/// reading of the clock.
fn record_beside(parts: &Parts, state: &AppState, presented: &Presented<'_>, now_ms: i64) {
    let Some(key) = apikey_beside(&parts.headers, presented) else {
        return;
    };
    let verified = if key.starts_with("sb_") {
        let has_origin = parts.headers.contains_key(axum::http::header::ORIGIN);
        state.auth.verify_api_key(key, has_origin).ok()
    } else {
        // With no legacy secret nothing can verify it: read once, for what it claims to be.
        if let Some(kind) = state.auth.unverifiable_legacy_beside(key) {
            record_unverifiable_beside(parts, state, kind, now_ms);
            None
        } else {
            state.auth.verify_legacy_beside(key)
        }
    };
    if let Some(verified) = verified {
        record_usage(parts, state, &verified, now_ms);
        state.auth.count_verified(&verified);
    }
}

/// A legacy API key (by what its claims say) beside the credential that let the request in,
/// after the legacy secret was revoked: the client still ships it, and Supabase refuses it once
/// the legacy keys are disabled. Counted where the runbook looks after revocation, in the
/// `UNAUTHORIZED_LEGACY_JWT` series of `edgegate_credential_verifications` (as
/// `kid="apikey_beside"`) and by caller (`anon_key_unverified`, `service_role_key_unverified`),
/// never as a verified use: not in the key usage the verdict reads, nor in
/// `edgegate_legacy_verifications`. Nothing of the key is kept.
fn record_unverifiable_beside(parts: &Parts, state: &AppState, kind: LegacyKind, now_ms: i64) {
    state.auth.count_unverifiable_beside();
    record_caller_as(parts, state, CallerKind::UnverifiedLegacy(kind), now_ms);
}

/// The source a failed credential would have had, for metrics.
/// Every source and code a refused credential is counted under ([`failed_source`],
/// [`AuthError::code`]): their series of `edgegate_credential_verifications` are made at start.
pub(crate) const REFUSED_SERIES: [(&str, &str); 7] = [
    ("none", "UNAUTHORIZED_NO_AUTH_HEADER"),
    ("none", "UNAUTHORIZED_INVALID_JWT_FORMAT"),
    ("none", "UNAUTHORIZED_UNSUPPORTED_TOKEN_ALGORITHM"),
    ("none", "UNAUTHORIZED_INVALID_API_KEY"),
    ("legacy_secret", "UNAUTHORIZED_LEGACY_JWT"),
    ("signing_key", "UNAUTHORIZED_ASYMMETRIC_JWT"),
    ("api_key", "UNAUTHORIZED_INVALID_API_KEY"),
];

fn failed_source(presented: &Result<Presented<'_>, AuthError>, err: &AuthError) -> &'static str {
    match (presented, err) {
        (Ok(Presented::ApiKey(_)), _) => "api_key",
        (_, AuthError::LegacyRevoked | AuthError::Legacy(_)) => "legacy_secret",
        (_, AuthError::UnknownKid | AuthError::Asymmetric(_)) => "signing_key",
        _ => "none",
    }
}

/// Fills in the request span's credential fields in one update: the JSON log format re-reads
/// and rewrites a span's fields on each update, so two `record` calls cost twice.
///
/// Recorded through the dispatcher on the current span's id, rather than on a `Span` handle
/// from `Span::current()`, whose making and dropping cost a reference on the span and one on
/// the dispatcher each request (callgrind: 0.5k instructions).
fn record_credential(source: &str, kid: Option<&str>) {
    tracing::dispatcher::get_default(|dispatch| {
        let current = dispatch.current_span();
        let (Some(id), Some(meta)) = (current.id(), current.metadata()) else {
            return;
        };
        let fields = meta.fields();
        let (Some(source_field), Some(kid_field)) = (
            fields.field("edgegate.credential.source"),
            fields.field("edgegate.credential.kid"),
        ) else {
            return;
        };
        let values = [
            (&source_field, Some(&source as &dyn tracing::Value)),
            (
                &kid_field,
                kid.as_ref().map(|kid| kid as &dyn tracing::Value),
            ),
        ];
        dispatch.record(id, &tracing::span::Record::new(&fields.value_set(&values)));
    });
}

/// Counts the verification's key and, for a legacy or API-key credential, who presented it, under
/// the route pattern (never the raw path, which the caller chooses), both at `now_ms`, so both
/// land in one hour (read twice, an hour's turn between the reads put the key in one hour and its
/// caller in the next, listed as legacy use with no caller recorded). The key's count and the
/// caller's are written together, so a flush takes both or neither
/// ([`crate::auth::usage::UsageTracker::record_with_caller`]). A signing key's verification
/// counts its key alone, never waiting on caller bookkeeping.
fn record_usage(parts: &Parts, state: &AppState, verified: &Verified, now_ms: i64) {
    match CallerKind::of(verified) {
        Some(kind) => {
            let client = client_name(&parts.headers);
            let route = route_of(parts);
            state
                .usage
                .record_with_caller(verified, kind, route, &client, now_ms);
        }
        None => state.usage.record(verified, now_ms),
    }
}

/// Counts the request's caller as `kind`, under the route pattern, at `now_ms`.
fn record_caller_as(parts: &Parts, state: &AppState, kind: CallerKind<'_>, now_ms: i64) {
    let client = client_name(&parts.headers);
    state
        .usage
        .callers
        .record(kind, route_of(parts), &client, now_ms);
}

/// The request's route pattern, never its raw path (which the caller chooses).
fn route_of(parts: &Parts) -> &str {
    parts
        .extensions
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
}

impl FromRequestParts<AppState> for User {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let presented = presented(&parts.headers);
        let result = match &presented {
            Ok(Presented::Jwt(token)) => state.auth.verify_bearer(token).await,
            Ok(Presented::LegacyKey(key)) => state.auth.verify_legacy_key(key).await,
            Ok(Presented::ApiKey(key)) => state
                .auth
                .verify_api_key(key, parts.headers.contains_key(axum::http::header::ORIGIN)),
            Err(err) => Err(err.clone()),
        };
        match result {
            Ok(verified) => {
                // One reading for the key's count, its caller and the key beside.
                let now_ms = state.clock.now_ms();
                record_usage(parts, state, &verified, now_ms);
                let kid = credential_name(&verified);
                // Names of the credential for the request's log lines, never the credential.
                record_credential(
                    verified.source.as_str(),
                    Some(kid).filter(|k| !k.is_empty()),
                );
                state.auth.count_verified(&verified);
                if let Ok(presented) = &presented {
                    record_beside(parts, state, presented, now_ms);
                }
                let request_id = parts.headers.get(&REQUEST_ID).cloned();
                Ok(User(Principal {
                    verified,
                    request_id,
                }))
            }
            Err(err) => {
                let source = failed_source(&presented, &err);
                record_credential(source, None);
                state.auth.count_refused(source, err.code());
                tracing::debug!(code = err.code(), reason = %err, "credential refused");
                Err(err.into())
            }
        }
    }
}

impl FromRequestParts<AppState> for ServiceRole {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let User(principal) = User::from_request_parts(parts, state).await?;
        if principal.verified.role.as_deref() == Some("service_role") {
            Ok(ServiceRole(principal))
        } else {
            Err(ApiError::ForbiddenRole(
                "this endpoint needs the service_role role".to_owned(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every refusal is counted in a series made at start.
    #[test]
    fn every_refusal_is_counted_under_a_series_made_at_start() {
        use crate::auth::Failure;
        let jwt_errors = [
            AuthError::NoCredential,
            AuthError::UnpairedBearerKey,
            AuthError::InvalidFormat("x"),
            AuthError::UnsupportedAlgorithm,
            AuthError::LegacyRevoked,
            AuthError::Legacy(Failure::Expired),
            AuthError::UnknownKid,
            AuthError::Asymmetric(Failure::Expired),
            AuthError::InvalidApiKey,
            AuthError::SecretKeyInBrowser,
            AuthError::RepeatedApiKey,
        ];
        let api_key_errors = [
            AuthError::InvalidApiKey,
            AuthError::SecretKeyInBrowser,
            AuthError::RepeatedApiKey,
        ];
        let cases = jwt_errors
            .iter()
            .flat_map(|err| {
                [
                    (Ok(Presented::Jwt("x")), err),
                    (Err(AuthError::NoCredential), err),
                ]
            })
            .chain(
                api_key_errors
                    .iter()
                    .map(|err| (Ok(Presented::ApiKey("x")), err)),
            );
        for (presented, err) in cases {
            let series = (failed_source(&presented, err), err.code());
            assert!(REFUSED_SERIES.contains(&series), "{series:?}");
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    #[test]
    fn a_bearer_jwt_wins_over_apikey() {
        let h = headers(&[
            ("authorization", "Bearer a.b.c"),
            ("apikey", "sb_publishable_x"),
        ]);
        assert_eq!(presented(&h), Ok(Presented::Jwt("a.b.c")));
    }

    /// An `apikey` that is not text (obs-text bytes, which HTTP allows in a value) does not
    /// count when a Bearer JWT wins over it; it is refused only when it is what would count.
    #[test]
    fn a_bearer_jwt_wins_over_an_unreadable_apikey() {
        let h = headers(&[("authorization", "Bearer a.b.c"), ("apikey", "sb_é")]);
        assert_eq!(presented(&h), Ok(Presented::Jwt("a.b.c")));
        let sb = headers(&[("authorization", "Bearer sb_secret_x"), ("apikey", "sb_é")]);
        assert_eq!(presented(&sb), Err(AuthError::InvalidApiKey));
        let alone = headers(&[("apikey", "sb_é")]);
        assert_eq!(presented(&alone), Err(AuthError::InvalidApiKey));
    }

    /// Two `Authorization` or two `apikey` headers are refused, whatever their order: read once,
    /// the first counted, and a publishable key then a secret one let in `anon` while the other
    /// order let in `service_role`.
    #[test]
    fn a_credential_header_sent_twice_is_refused() {
        for (name, first, second, code) in [
            (
                "authorization",
                "Bearer a.b.c",
                "Bearer d.e.f",
                "UNAUTHORIZED_INVALID_JWT_FORMAT",
            ),
            (
                "apikey",
                "sb_publishable_x",
                "sb_secret_y",
                "UNAUTHORIZED_INVALID_API_KEY",
            ),
            (
                "apikey",
                "sb_secret_y",
                "sb_publishable_x",
                "UNAUTHORIZED_INVALID_API_KEY",
            ),
        ] {
            let mut h = HeaderMap::new();
            let name = axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap();
            h.append(&name, first.parse().unwrap());
            h.append(&name, second.parse().unwrap());
            let err = presented(&h).unwrap_err();
            assert_eq!(err.code(), code, "{name}: {first}, {second}");
            assert!(err.message().contains("more than one"), "{}", err.message());
        }
        // A Bearer JWT still wins over `apikey`, sent once or twice.
        let mut h = headers(&[("authorization", "Bearer a.b.c")]);
        h.append("apikey", "sb_publishable_x".parse().unwrap());
        h.append("apikey", "sb_secret_y".parse().unwrap());
        assert_eq!(presented(&h), Ok(Presented::Jwt("a.b.c")));
        // and neither copy is counted as the key the client uses beside it.
        let jwt = presented(&h).unwrap();
        assert_eq!(apikey_beside(&h, &jwt), None);
        let once = headers(&[
            ("authorization", "Bearer a.b.c"),
            ("apikey", "sb_publishable_x"),
        ]);
        assert_eq!(
            apikey_beside(&once, &presented(&once).unwrap()),
            Some("sb_publishable_x")
        );
    }

    #[test]
    fn an_sb_bearer_counts_only_when_it_equals_apikey() {
        let same = headers(&[
            ("authorization", "Bearer sb_secret_x"),
            ("apikey", "sb_secret_x"),
        ]);
        assert_eq!(presented(&same), Ok(Presented::ApiKey("sb_secret_x")));
        // Still no credential (the same code), with a message that says why.
        let alone = headers(&[("authorization", "Bearer sb_secret_x")]);
        assert_eq!(presented(&alone), Err(AuthError::UnpairedBearerKey));
        let err = presented(&alone).unwrap_err();
        assert_eq!(err.code(), "UNAUTHORIZED_NO_AUTH_HEADER");
        assert_eq!(
            err.message(),
            "an sb_ key in Authorization counts only when the apikey header holds the same key"
        );
        let other = headers(&[
            ("authorization", "Bearer sb_secret_x"),
            ("apikey", "sb_publishable_y"),
        ]);
        assert_eq!(presented(&other), Ok(Presented::ApiKey("sb_publishable_y")));
    }

    #[test]
    fn apikey_alone_is_an_api_key_or_a_legacy_key_jwt() {
        let new = headers(&[("apikey", "sb_publishable_x")]);
        assert_eq!(presented(&new), Ok(Presented::ApiKey("sb_publishable_x")));
        let legacy = headers(&[("apikey", "eyJ.a.b")]);
        assert_eq!(presented(&legacy), Ok(Presented::LegacyKey("eyJ.a.b")));
        // Neither: an apikey that matches no configured key, not a malformed JWT.
        let neither = headers(&[("apikey", "foo")]);
        assert_eq!(presented(&neither), Err(AuthError::InvalidApiKey));
    }

    /// A Bearer with no token, or an `Authorization` with no value, is no credential: the
    /// `apikey` rule applies. HTTP trims the trailing space of `Bearer `, so a server sees
    /// `Bearer` alone.
    #[test]
    fn an_empty_bearer_leaves_the_apikey_to_count() {
        for value in ["Bearer ", "Bearer", "bearer   ", "", "  ", "         "] {
            let with_key = headers(&[("authorization", value), ("apikey", "sb_publishable_x")]);
            assert_eq!(
                presented(&with_key),
                Ok(Presented::ApiKey("sb_publishable_x")),
                "{value:?}"
            );
            let alone = headers(&[("authorization", value)]);
            assert_eq!(presented(&alone), Err(AuthError::NoCredential), "{value:?}");
        }
    }

    #[test]
    fn malformed_or_missing_authorization() {
        assert_eq!(presented(&headers(&[])), Err(AuthError::NoCredential));
        let basic = headers(&[("authorization", "Basic dXNlcjpwYXNz")]);
        assert!(matches!(
            presented(&basic),
            Err(AuthError::InvalidFormat(_))
        ));
        let bare = headers(&[("authorization", "eyJ.a.b")]);
        assert!(matches!(presented(&bare), Err(AuthError::InvalidFormat(_))));
        let lower = headers(&[("authorization", "bearer a.b.c")]);
        assert_eq!(presented(&lower), Ok(Presented::Jwt("a.b.c")));
    }

    /// The scheme is everything before the first space, compared without case; the token is
    /// the rest, trimmed.
    #[test]
    fn the_scheme_ends_at_the_first_space() {
        for (value, expected) in [
            ("BEARER a.b.c", Some("a.b.c")),
            ("Bearer   a.b.c  ", Some("a.b.c")),
            ("Bearer a.b c", Some("a.b c")),
            ("Bearer\ta.b.c", None),
            ("Bearerx a.b.c", None),
            ("Bear er a.b.c", None),
            (" Bearer a.b.c", None),
            ("Bearez a.b.c", None),
        ] {
            let map = headers(&[("authorization", value)]);
            let found = presented(&map);
            match expected {
                Some(token) => assert_eq!(found, Ok(Presented::Jwt(token)), "{value:?}"),
                None => assert!(
                    matches!(found, Err(AuthError::InvalidFormat(_))),
                    "{value:?}: {found:?}"
                ),
            }
        }
    }
}
