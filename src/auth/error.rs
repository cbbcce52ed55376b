//! The credential layer's one error type, mapped onto the contract's 401 codes.

use thiserror::Error;

/// Why a token or key failed after its family (legacy or asymmetric) was known.
///
/// The text never quotes the token, a claim value chosen by the caller, or a secret:
/// the messages are safe to send to a client and to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Failure {
    /// The signature did not verify, or was malformed (wrong length, DER instead of P1363).
    #[error("signature is invalid")]
    BadSignature,
    /// The token's `alg` differs from the one the key is bound to.
    #[error("token algorithm does not match the key")]
    AlgorithmMismatch,
    /// An asymmetric token without a `kid`.
    #[error("token has no kid")]
    MissingKid,
    /// A `kid` that is not a short printable string.
    #[error("token kid is malformed")]
    MalformedKid,
    /// The `kid` is not in the key ring (even after a refetch, when one was allowed).
    #[error("no signing key matches the token's kid")]
    UnknownKid,
    /// As `UnknownKid`, while a JWKS URL is configured and no set was ever fetched from it:
    /// the operator's problem (a host down, a mistyped URL), not the token's.
    #[error("no signing key matches the token's kid: no key set has been fetched yet")]
    NoKeySetYet,
    /// The header carries `crit`, `jwk`, `jku`, `x5u` or `x5c`.
    #[error("token header uses a member that is not accepted")]
    RejectedHeader,
    /// The claims are not a JSON object, hold duplicate members, or a registered claim has the wrong type.
    #[error("token claims are malformed")]
    MalformedClaims,
    /// No `exp` claim.
    #[error("token has no exp claim")]
    MissingExp,
    /// `exp` is in the past (beyond the leeway).
    #[error("token has expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token is not valid yet")]
    NotYetValid,
    /// `iat` is in the future (beyond the leeway).
    #[error("token was issued in the future")]
    IssuedInFuture,
    /// `iss` is missing or not one of the accepted issuers.
    #[error("token issuer is not accepted")]
    WrongIssuer,
    /// `aud` shares no value with the accepted audiences.
    #[error("token audience is not accepted")]
    WrongAudience,
}

/// A credential was refused. Each variant maps to one contract code via [`AuthError::code`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AuthError {
    /// No credential was presented at all.
    #[error("no credential was presented")]
    NoCredential,
    /// An `sb_` key as the Bearer with no `apikey` beside it: no credential either (the
    /// contract counts such a Bearer only when it equals `apikey`), but one was sent, so the
    /// message says why it did not count.
    #[error("an sb_ key in Authorization counts only when the apikey header holds the same key")]
    UnpairedBearerKey,
    /// Not three base64url parts, too large, or a header that is not a strict JSON object.
    #[error("malformed JWT: {0}")]
    InvalidFormat(&'static str),
    /// `alg` outside ES256, RS256, EdDSA, HS256 (`none` in any casing included).
    #[error("token algorithm is not supported")]
    UnsupportedAlgorithm,
    /// An HS256 token while no legacy secret is configured.
    #[error("legacy JWT secret has been revoked; HS256 tokens are no longer accepted")]
    LegacyRevoked,
    /// An HS256 token that failed.
    #[error("invalid legacy JWT: {0}")]
    Legacy(Failure),
    /// An ES256/RS256/EdDSA token whose `kid` is not in the key ring. Kept apart from
    /// [`AuthError::Asymmetric`] so the caller can ask the JWKS fetcher for a refetch.
    #[error("invalid JWT: no signing key matches the token's kid")]
    UnknownKid,
    /// An ES256/RS256/EdDSA token that failed.
    #[error("invalid JWT: {0}")]
    Asymmetric(Failure),
    /// An `apikey` that matches no configured key.
    #[error("invalid API key")]
    InvalidApiKey,
    /// A secret API key sent by a browser (an `Origin` header was present).
    #[error("secret API keys cannot be used from a browser")]
    SecretKeyInBrowser,
    /// Two `apikey` headers: which one counts is not for edgegate to guess, as a proxy or
    /// another service in front of it may read the other.
    #[error("invalid API key: more than one apikey header")]
    RepeatedApiKey,
}

impl AuthError {
    /// The contract's error code (`sb-error-code` header and JSON `code`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::NoCredential | Self::UnpairedBearerKey => "UNAUTHORIZED_NO_AUTH_HEADER",
            Self::InvalidFormat(_) => "UNAUTHORIZED_INVALID_JWT_FORMAT",
            Self::UnsupportedAlgorithm => "UNAUTHORIZED_UNSUPPORTED_TOKEN_ALGORITHM",
            Self::LegacyRevoked | Self::Legacy(_) => "UNAUTHORIZED_LEGACY_JWT",
            Self::UnknownKid | Self::Asymmetric(_) => "UNAUTHORIZED_ASYMMETRIC_JWT",
            Self::InvalidApiKey | Self::SecretKeyInBrowser | Self::RepeatedApiKey => {
                "UNAUTHORIZED_INVALID_API_KEY"
            }
        }
    }

    /// A message for people; holds no token, claim value or secret.
    pub fn message(&self) -> String {
        self.to_string()
    }
}
