//! `jwt-test`: tells the caller which key verified its credential and with what claims.

use axum::Json;
use serde_json::{Value, json};

use crate::auth::extract::User;

pub async fn jwt_test(User(principal): User) -> Json<Value> {
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
