//! `jwt-test`: tells the caller which key verified its credential and with what claims.

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

use crate::auth::Claims;
use crate::body::IgnoredBody;
use crate::credentials::User;
use crate::json_text::push_json_string;

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

/// The key that verified the credential.
#[derive(utoipa::ToSchema)]
struct KeyBody {
    #[schema(value_type = crate::auth::KeySource)]
    source: &'static str,
    /// The key that verified, as `GET /admin/signing-keys` names it: a signing key's kid, an
    /// API key's type and name (`secret:NAME`, `publishable:NAME`), an inline `oct` key's kid
    /// for `legacy_secret`, and null for `SUPABASE_JWT_SECRET`, whatever `kid` the token's
    /// header carries.
    #[schema(value_type = Option<String>)]
    kid: Option<Arc<str>>,
    alg: &'static str,
}

impl JwtTestBody {
    /// The JSON text, written as serde_json would write the members in this order (strings
    /// escaped as it escapes them, absent ones `null`), with `claims` (already JSON, checked
    /// when the token was read) put in as it is, so no answer reads it again.
    fn to_json(&self) -> String {
        let claims = self.claims.json();
        let mut out = String::with_capacity(160 + claims.len());
        out.push_str(if self.valid {
            "{\"valid\":true"
        } else {
            "{\"valid\":false"
        });
        out.push_str(",\"role\":");
        push_optional(&mut out, self.role.as_deref());
        out.push_str(",\"sub\":");
        push_optional(&mut out, self.sub.as_deref());
        out.push_str(",\"key\":{\"source\":");
        push_json_string(&mut out, self.key.source);
        out.push_str(",\"kid\":");
        push_optional(&mut out, self.key.kid.as_deref());
        out.push_str(",\"alg\":");
        push_json_string(&mut out, self.key.alg);
        out.push_str("},\"claims\":");
        out.push_str(claims);
        out.push('}');
        out
    }
}

/// A string member's value, or `null`.
fn push_optional(out: &mut String, text: Option<&str>) {
    match text {
        Some(text) => push_json_string(out, text),
        None => out.push_str("null"),
    }
}

impl IntoResponse for JwtTestBody {
    fn into_response(self) -> Response {
        let mut response = Response::new(Body::from(self.to_json()));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}

/// The body (what `functions.invoke` sends) is read and ignored, so a request is complete, and
/// counted as in flight, until its body has arrived; none of it is kept.
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
pub async fn jwt_test(User(principal): User, _body: IgnoredBody) -> JwtTestBody {
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
    use serde::Serialize;
    use serde_json::value::RawValue;
    use serde_json::{Map, json};

    /// The answer as it was written before: serde_json's derived serialization, the claims
    /// a raw JSON value. What `to_json` must equal, byte for byte.
    fn reference(body: &JwtTestBody) -> String {
        #[derive(Serialize)]
        struct Key<'a> {
            source: &'a str,
            kid: Option<&'a str>,
            alg: &'a str,
        }
        #[derive(Serialize)]
        struct Answer<'a> {
            valid: bool,
            role: Option<&'a str>,
            sub: Option<&'a str>,
            key: Key<'a>,
            claims: Box<RawValue>,
        }
        serde_json::to_string(&Answer {
            valid: body.valid,
            role: body.role.as_deref(),
            sub: body.sub.as_deref(),
            key: Key {
                source: body.key.source,
                kid: body.key.kid.as_deref(),
                alg: body.key.alg,
            },
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
        for valid in [true, false] {
            for role in &strings {
                for sub in &strings {
                    for kid in &strings {
                        for claims in &claims {
                            let body = JwtTestBody {
                                valid,
                                role: role.as_deref().map(Arc::from),
                                sub: sub.as_deref().map(Arc::from),
                                key: KeyBody {
                                    source: "signing_key",
                                    kid: kid.as_deref().map(Arc::from),
                                    alg: "ES256",
                                },
                                claims: claims.clone(),
                            };
                            assert_eq!(body.to_json(), reference(&body));
                            seen += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(seen, 2 * 5 * 5 * 5 * 2);
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
