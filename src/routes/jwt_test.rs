//! `jwt-test`: tells the caller which key verified its credential and with what claims.

use axum::Json;
use serde::Serialize;

use crate::auth::Claims;
use crate::body::RawBody;
use crate::credentials::User;

/// The answer, serialized straight from the verified credential (no intermediate JSON tree).
#[derive(Serialize, utoipa::ToSchema)]
pub struct JwtTestBody {
    valid: bool,
    role: Option<String>,
    sub: Option<String>,
    key: KeyBody,
    /// Every claim, as the token carries them (its payload's JSON); an API key has only `role`.
    #[schema(value_type = Object)]
    claims: Claims,
}

#[derive(Serialize, utoipa::ToSchema)]
struct KeyBody {
    #[schema(value_type = crate::auth::KeySource)]
    source: &'static str,
    kid: Option<String>,
    alg: &'static str,
}

/// The body (what `functions.invoke` sends) is read and ignored, so a request is complete, and
/// counted as in flight, until its body has arrived.
#[utoipa::path(
    method(get, post),
    path = "/functions/v1/jwt-test",
    tag = "functions",
    summary = "Which key verified the caller's credential, and its claims",
    description = "Any request body is read and ignored (what `functions.invoke` sends).",
    security(("bearer" = []), ("apikey" = [])),
    responses(
        (status = 200, description = "The credential is valid", body = JwtTestBody),
        crate::routes::openapi::UserErrors,
    )
)]
pub async fn jwt_test(User(principal): User, RawBody(_body): RawBody) -> Json<JwtTestBody> {
    let verified = principal.verified;
    Json(JwtTestBody {
        valid: true,
        role: verified.role,
        sub: verified.sub,
        key: KeyBody {
            source: verified.source.as_str(),
            kid: verified.kid,
            alg: verified.alg,
        },
        claims: verified.claims,
    })
}
