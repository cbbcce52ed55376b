//! `jwt-test`: tells the caller which key verified its credential and with what claims.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use std::sync::Arc;

use crate::auth::Claims;
use crate::body::RawBody;
use crate::credentials::User;
use crate::error::ApiError;

/// The answer, serialized straight from the verified credential (no intermediate JSON tree).
#[derive(utoipa::ToSchema)]
pub struct JwtTestBody {
    valid: bool,
    #[schema(value_type = Option<String>)]
    role: Option<Arc<str>>,
    #[schema(value_type = Option<String>)]
    sub: Option<Arc<str>>,
    key: KeyBody,
    /// Every claim, as the token carries them (its payload's JSON); an API key has only `role`.
    #[schema(value_type = Object)]
    claims: Claims,
}

#[derive(Serialize, utoipa::ToSchema)]
struct KeyBody {
    #[schema(value_type = crate::auth::KeySource)]
    source: &'static str,
    #[schema(value_type = Option<String>)]
    kid: Option<Arc<str>>,
    alg: &'static str,
}

/// Every member but `claims`, as serde_json writes them.
#[derive(Serialize)]
struct Head<'a> {
    valid: bool,
    role: &'a Option<Arc<str>>,
    sub: &'a Option<Arc<str>>,
    key: &'a KeyBody,
}

impl JwtTestBody {
    /// The JSON text: serde_json's for every member but `claims`, whose text (already JSON,
    /// checked when the token was read) is put in as it is, so no answer reads it again.
    fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        let claims = self.claims.json();
        let mut out = Vec::with_capacity(160 + claims.len());
        serde_json::to_writer(
            &mut out,
            &Head {
                valid: self.valid,
                role: &self.role,
                sub: &self.sub,
                key: &self.key,
            },
        )?;
        // The head is an object: its closing brace is its last byte.
        out.pop();
        out.extend_from_slice(b",\"claims\":");
        out.extend_from_slice(claims.as_bytes());
        out.push(b'}');
        Ok(out)
    }
}

impl IntoResponse for JwtTestBody {
    fn into_response(self) -> Response {
        match self.to_json() {
            Ok(body) => (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                body,
            )
                .into_response(),
            // Cannot happen (strings and booleans always serialize); answered as any
            // internal error rather than with a broken body.
            Err(error) => ApiError::Internal(error.into()).into_response(),
        }
    }
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
pub async fn jwt_test(User(principal): User, RawBody(_body): RawBody) -> JwtTestBody {
    let verified = principal.verified;
    JwtTestBody {
        valid: true,
        role: verified.role,
        sub: verified.sub,
        key: KeyBody {
            source: verified.source.as_str(),
            kid: verified.kid,
            alg: verified.alg,
        },
        claims: verified.claims,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;
    use serde_json::{Map, json};

    /// The answer as it was written before: serde_json's derived serialization, the claims
    /// a raw JSON value. What `to_json` must equal, byte for byte.
    fn reference(body: &JwtTestBody) -> String {
        #[derive(Serialize)]
        struct Answer<'a> {
            valid: bool,
            role: Option<&'a str>,
            sub: Option<&'a str>,
            key: &'a KeyBody,
            claims: Box<RawValue>,
        }
        serde_json::to_string(&Answer {
            valid: body.valid,
            role: body.role.as_deref(),
            sub: body.sub.as_deref(),
            key: &body.key,
            claims: RawValue::from_string(body.claims.json().to_owned()).expect("claims are JSON"),
        })
        .expect("serializes")
    }

    #[test]
    fn the_answer_is_serde_jsons_with_the_claims_as_they_are() {
        // Strings that need escaping, non-ASCII text, absent members, and claims both empty
        // and nested.
        let strings = [
            None,
            Some(String::new()),
            Some("authenticated".to_owned()),
            Some("quote \" backslash \\ newline \n tab \t nul \u{0} bell \u{7}".to_owned()),
            Some("ünïcødé ☃ 𝄞".to_owned()),
        ];
        let mut nested = Map::new();
        nested.insert("role".into(), json!("authenticated"));
        nested.insert(
            "amr".into(),
            json!([{"method": "password", "timestamp": 1}]),
        );
        nested.insert("text".into(), json!("a \"quoted\" \\ value\n"));
        let claims = [Claims::default(), Claims::new(&nested)];
        let mut seen = 0;
        for role in &strings {
            for sub in &strings {
                for kid in &strings {
                    for claims in &claims {
                        let body = JwtTestBody {
                            valid: true,
                            role: role.as_deref().map(Arc::from),
                            sub: sub.as_deref().map(Arc::from),
                            key: KeyBody {
                                source: "signing_key",
                                kid: kid.as_deref().map(Arc::from),
                                alg: "ES256",
                            },
                            claims: claims.clone(),
                        };
                        let ours =
                            String::from_utf8(body.to_json().expect("writes")).expect("UTF-8");
                        assert_eq!(ours, reference(&body));
                        seen += 1;
                    }
                }
            }
        }
        assert_eq!(seen, 5 * 5 * 5 * 2);
    }

    #[test]
    fn the_answer_is_json_with_its_content_type() {
        let body = JwtTestBody {
            valid: true,
            role: Some("anon".into()),
            sub: None,
            key: KeyBody {
                source: "legacy_secret",
                kid: None,
                alg: "HS256",
            },
            claims: Claims::default(),
        };
        let response = body.into_response();
        assert_eq!(response.status(), axum::http::StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            HeaderValue::from_static("application/json")
        );
    }
}
