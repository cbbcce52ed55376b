//! Tests of the credential layer as a whole: Wycheproof vectors, attacks, key parsing,
//! rotation against an in-process JWKS host, API keys.

mod api_keys;
mod attacks;
mod keys_parsing;
mod rotation;
mod typed_json;
pub(super) mod util;
mod wycheproof;
