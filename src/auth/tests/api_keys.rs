//! Opaque API keys: constant-time match, role by kind, secret keys refused from browsers.

use crate::auth::error::AuthError;
use crate::auth::{
    ApiKeyType, AuthSettings, Authenticator, KeySource, api_key_id, parse_api_key_id,
};
use secrecy::SecretString;

const SECRET: &str = "sb_secret_N7UND0UgjKTVK-Uodkm0Hg_xSvEMPvz";
const SECRET_2: &str = "sb_secret_second-key-for-rotation-000000";
const PUBLISHABLE: &str = "sb_publishable_ZGVtby1wdWJsaXNoYWJsZS1rZXk";

fn auth() -> Authenticator {
    Authenticator::new(
        AuthSettings {
            secret_api_keys: vec![
                ("default".into(), SecretString::from(SECRET.to_owned())),
                ("rotated".into(), SecretString::from(SECRET_2.to_owned())),
            ],
            publishable_api_keys: vec![("web".into(), SecretString::from(PUBLISHABLE.to_owned()))],
            ..AuthSettings::default()
        },
        reqwest::Client::new(),
    )
}

#[test]
fn secret_key_is_service_role_named_by_its_type_and_name() {
    let v = auth().verify_api_key(SECRET, false).expect("secret key");
    assert_eq!(v.source, KeySource::ApiKey);
    assert_eq!(v.role.as_deref(), Some("service_role"));
    assert_eq!(v.kid.as_deref(), Some("secret:default"));
    assert!(
        !format!("{v:?}").contains(SECRET),
        "the key never appears in the result"
    );
    assert_eq!(
        auth().verify_api_key(SECRET_2, false).map(|v| v.kid),
        Ok(Some("secret:rotated".into()))
    );
}

#[test]
fn secret_key_from_a_browser_is_refused() {
    let r = auth().verify_api_key(SECRET, true);
    assert_eq!(r, Err(AuthError::SecretKeyInBrowser));
    assert_eq!(r.map_err(|e| e.code()), Err("UNAUTHORIZED_INVALID_API_KEY"));
}

#[test]
fn publishable_key_is_anon_even_from_a_browser() {
    let v = auth()
        .verify_api_key(PUBLISHABLE, true)
        .expect("publishable key");
    assert_eq!(
        (v.role.as_deref(), v.kid.as_deref()),
        (Some("anon"), Some("publishable:web"))
    );
}

#[test]
fn unknown_keys_are_refused() {
    let a = auth();
    for key in [
        &SECRET[..SECRET.len() - 1],
        "sb_secret_",
        "sb_publishable_x",
        "x",
        &format!("{SECRET} "),
        &"k".repeat(5000),
    ] {
        let r = a.verify_api_key(key, false);
        assert_eq!(
            r.map_err(|e| e.code()),
            Err("UNAUTHORIZED_INVALID_API_KEY"),
            "{key:?}"
        );
    }
    assert_eq!(
        a.verify_api_key("", false).map_err(|e| e.code()),
        Err("UNAUTHORIZED_NO_AUTH_HEADER")
    );
    let none = Authenticator::new(AuthSettings::default(), reqwest::Client::new());
    assert_eq!(
        none.verify_api_key(SECRET, false),
        Err(AuthError::InvalidApiKey)
    );
}

/// Supabase names both its default keys `default`: the id every view names a key by carries
/// its type, and a bare name (what earlier releases stored) reads back typeless.
#[test]
fn an_api_key_id_carries_its_type_and_reads_back() {
    for key_type in [ApiKeyType::Secret, ApiKeyType::Publishable] {
        for name in ["default", "a:b", ""] {
            let id = api_key_id(key_type, name);
            assert_eq!(parse_api_key_id(&id), (Some(key_type), name), "{id}");
        }
    }
    assert_eq!(api_key_id(ApiKeyType::Secret, "default"), "secret:default");
    assert_eq!(parse_api_key_id("default"), (None, "default"));
    assert_eq!(parse_api_key_id("secretive"), (None, "secretive"));
    let listed: Vec<(String, ApiKeyType, String)> = auth()
        .api_key_listing()
        .into_iter()
        .map(|key| (key.name, key.key_type, key.id))
        .collect();
    assert_eq!(
        listed,
        [
            (
                "default".into(),
                ApiKeyType::Secret,
                "secret:default".into()
            ),
            (
                "rotated".into(),
                ApiKeyType::Secret,
                "secret:rotated".into()
            ),
            (
                "web".into(),
                ApiKeyType::Publishable,
                "publishable:web".into()
            ),
        ]
    );
}
