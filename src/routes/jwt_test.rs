//! `jwt-test`: tells the caller which key verified its credential and with what claims.

use axum::Json;
use serde_json::{Value, json};

use crate::auth::extract::User;
use crate::extract::RawBody;

/// The body (what `functions.invoke` sends) is read and ignored, so a request is complete, and
/// counted as in flight, until its body has arrived.
pub async fn jwt_test(User(principal): User, RawBody(_body): RawBody) -> Json<Value> {
    let verified = principal.verified;
    Json(json!({
        "valid": true,
        "role": verified.role,
        "sub": verified.sub,
        "key": {
            "source": verified.source.as_str(),
            "kid": verified.kid,
            "alg": verified.alg,
        },
        "claims": verified.claims,
    }))
}
