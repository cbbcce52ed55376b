use std::collections::HashMap;

use secrecy::ExposeSecret;

use super::*;

fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Config::from_lookup(|name| map.get(name).cloned())
}

/// Asserts the variable is refused, that the message names it, and that it never holds the value.
fn refused(name: &str, value: &str) -> ConfigError {
    let err = config(&[(name, value)]).expect_err(&format!("{name}={value} must be refused"));
    assert_eq!(err.variable, name);
    let line = err.to_string();
    assert!(line.starts_with(name), "{line}");
    assert!(!line.contains('\n'), "one line: {line}");
    // A value that is itself a fragment of the rule's fixed text (say `sk_live_`) cannot leak.
    if value.len() >= 4 && !err.rule.contains(value) {
        assert!(!line.contains(value), "the message leaks the value: {line}");
    }
    err
}

#[test]
fn nothing_set_gives_the_contract_defaults() {
    let config = config(&[]).unwrap();
    assert_eq!(config.port, 8080);
    assert_eq!(config.host.to_string(), "0.0.0.0");
    assert_eq!(config.database_url.expose(), "sqlite://edgegate.db");
    assert!(config.tls.is_none());
    assert_eq!(config.jwt.issuers, None);
    assert_eq!(config.jwt.audiences, vec!["authenticated"]);
    assert_eq!(config.jwt.leeway, Duration::from_secs(30));
    assert_eq!(config.jwt.jwks_cache_ttl, Duration::from_secs(600));
    assert_eq!(config.jwt.jwks_min_refresh, Duration::from_secs(30));
    assert_eq!(config.jwt.jwks_url, None);
    assert_eq!(config.stripe.api_base.as_str(), "https://api.stripe.com/");
    assert_eq!(config.twilio.api_base.as_str(), "https://api.twilio.com/");
    assert_eq!(config.sms.max_per_recipient_per_hour, 5);
    assert_eq!(config.sms.max_per_minute, 60);
    assert_eq!(config.cors_allowed_origins, CorsOrigins::Any);
    assert_eq!(config.log_format, LogFormat::Pretty);
    assert_eq!(config.shutdown_drain, Duration::from_secs(25));
    assert_eq!(
        config.jwt.legacy_revocation_window,
        Duration::from_secs(86_400)
    );
}

#[test]
fn supabase_url_derives_issuers_and_jwks_url() {
    let config = config(&[("SUPABASE_URL", "https://abcd.supabase.co")]).unwrap();
    assert_eq!(
        config.jwt.jwks_url.unwrap().as_str(),
        "https://abcd.supabase.co/auth/v1/.well-known/jwks.json"
    );
    assert_eq!(
        config.jwt.issuers.unwrap(),
        vec!["https://abcd.supabase.co/auth/v1", "supabase"]
    );
}

#[test]
fn the_auth_issuer_and_project_ref_come_from_supabase_url() {
    let jwt = config(&[("SUPABASE_URL", "https://abcd.supabase.co/")])
        .unwrap()
        .jwt;
    assert_eq!(
        jwt.auth_issuer().as_deref(),
        Some("https://abcd.supabase.co/auth/v1")
    );
    assert_eq!(jwt.project_ref(), Some("abcd"));

    let local = config(&[("SUPABASE_URL", "http://127.0.0.1:54321")])
        .unwrap()
        .jwt;
    assert_eq!(
        local.auth_issuer().as_deref(),
        Some("http://127.0.0.1:54321/auth/v1")
    );
    assert_eq!(local.project_ref(), None);
    assert_eq!(config(&[]).unwrap().jwt.auth_issuer(), None);
    // Paths are appended to it: a query or a fragment would end up in the issuer.
    for base in ["https://abcd.supabase.co?", "https://abcd.supabase.co/#x"] {
        let err = refused("SUPABASE_URL", base);
        assert!(err.rule.contains("no ? or #"), "{err}");
    }
}

#[test]
fn explicit_issuers_and_jwks_url_win() {
    let config = config(&[
        ("SUPABASE_URL", "https://abcd.supabase.co"),
        ("SUPABASE_JWKS_URL", "http://127.0.0.1:9999/jwks.json"),
        ("JWT_ISSUERS", "a, b"),
    ])
    .unwrap();
    assert_eq!(
        config.jwt.jwks_url.unwrap().as_str(),
        "http://127.0.0.1:9999/jwks.json"
    );
    assert_eq!(config.jwt.issuers.unwrap(), vec!["a", "b"]);
}

#[test]
fn urls_must_be_absolute_http() {
    refused("SUPABASE_URL", "abcd.supabase.co");
    refused("STRIPE_API_BASE", "ftp://example.com");
    refused("TWILIO_API_BASE", "not a url");
    refused("PUBLIC_URL", "https://");
}

#[test]
fn urls_must_not_carry_credentials() {
    refused("STRIPE_API_BASE", "https://user:pass@api.example.com");
}

#[test]
fn jwks_url_needs_https_except_on_loopback() {
    let err = refused("SUPABASE_JWKS_URL", "http://example.com/jwks.json");
    assert!(err.rule.contains("https"));
    refused("SUPABASE_URL", "http://abcd.supabase.co");
    assert!(config(&[("SUPABASE_JWKS_URL", "http://localhost:1/j")]).is_ok());
    assert!(config(&[("SUPABASE_JWKS_URL", "http://[::1]:1/j")]).is_ok());
}

/// Stripe's and Twilio's credentials go to their API bases: in plain http only to a local fake
/// (what the variables are for), never across a network.
#[test]
fn api_bases_need_https_except_on_loopback() {
    for name in ["STRIPE_API_BASE", "TWILIO_API_BASE"] {
        let err = refused(name, "http://proxy.example.com/");
        assert!(err.rule.contains("https"), "{name}: {err}");
        assert!(config(&[(name, "http://127.0.0.1:1")]).is_ok(), "{name}");
        assert!(
            config(&[(name, "https://proxy.example.com")]).is_ok(),
            "{name}"
        );
    }
}

#[test]
fn stripe_secret_key_prefixes() {
    let err = refused("STRIPE_SECRET_KEY", "pk_live_x");
    assert!(err.rule.contains("sk_live_"));
    refused("STRIPE_SECRET_KEY", "sk_live_");
    for good in ["sk_live_abc", "sk_test_abc", "rk_live_abc", "rk_test_abc"] {
        let config = config(&[("STRIPE_SECRET_KEY", good)]).unwrap();
        assert_eq!(config.stripe.secret_key.unwrap().expose_secret(), good);
    }
}

#[test]
fn stripe_webhook_secrets_are_a_whsec_list() {
    refused("STRIPE_WEBHOOK_SECRET", "whsec_a,secret_b");
    let config = config(&[("STRIPE_WEBHOOK_SECRET", "whsec_a, whsec_b")]).unwrap();
    let secrets: Vec<_> = config
        .stripe
        .webhook_secrets
        .iter()
        .map(|s| s.expose_secret().to_owned())
        .collect();
    assert_eq!(secrets, vec!["whsec_a", "whsec_b"]);
}

#[test]
fn twilio_sender_is_e164_or_a_messaging_service() {
    refused("TWILIO_FROM_NUMBER", "5551234567");
    refused("TWILIO_FROM_NUMBER", "+0123456");
    refused("TWILIO_FROM_NUMBER", "+1234567890123456");
    refused("TWILIO_MESSAGING_SERVICE_SID", "MG123");
    let ok = config(&[("TWILIO_FROM_NUMBER", "+15005550006")]).unwrap();
    assert_eq!(
        ok.twilio.sender,
        Some(SmsSender::From("+15005550006".into()))
    );
    let both = config(&[
        ("TWILIO_FROM_NUMBER", "+15005550006"),
        (
            "TWILIO_MESSAGING_SERVICE_SID",
            "MG0123456789abcdef0123456789abcdef",
        ),
    ]);
    assert_eq!(both.unwrap_err().variable, "TWILIO_FROM_NUMBER");
}

#[test]
fn twilio_credentials_come_in_pairs() {
    refused("TWILIO_ACCOUNT_SID", "AC0123");
    let err = config(&[("TWILIO_ACCOUNT_SID", "AC0123456789abcdef0123456789abcdef")]).unwrap_err();
    assert_eq!(err.variable, "TWILIO_AUTH_TOKEN");
    let err = config(&[("TWILIO_AUTH_TOKEN", "0123456789abcdef0123456789abcdef")]).unwrap_err();
    assert_eq!(err.variable, "TWILIO_ACCOUNT_SID");
}

#[test]
fn sms_prefixes_are_e164_prefixes() {
    refused("SMS_ALLOWED_PREFIXES", "+1,44");
    refused("SMS_ALLOWED_PREFIXES", "+1a");
    let ok = config(&[("SMS_ALLOWED_PREFIXES", "+1, +44")]).unwrap();
    assert_eq!(ok.sms.allowed_prefixes, vec!["+1", "+44"]);
}

#[test]
fn inline_jwks_must_be_a_key_set() {
    refused("SUPABASE_JWKS", "{not json");
    refused("SUPABASE_JWKS", r#"{"keys":{}}"#);
    refused("SUPABASE_JWKS", r#"[{"k":"abc"}]"#);
    refused("SUPABASE_JWKS", "42");
    // 32 bytes: as long as the legacy secret must be.
    let k32 = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY";
    let set = config(&[(
        "SUPABASE_JWKS",
        &format!(r#"{{"keys":[{{"kty":"oct","k":"{k32}"}}]}}"#),
    )])
    .unwrap();
    assert_eq!(set.jwt.inline_jwks.len(), 1);
    let bare = config(&[(
        "SUPABASE_JWKS",
        &format!(r#"[{{"kty":"oct","k":"{k32}"}},{{"kty":"RSA"}}]"#),
    )])
    .unwrap();
    assert_eq!(bare.jwt.inline_jwks.len(), 2);
}

#[test]
fn inline_oct_keys_need_32_bytes() {
    // One byte, then 31: an HMAC secret that short can be brute-forced from one token.
    for k in ["YQ", "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZQ"] {
        let err = refused(
            "SUPABASE_JWKS",
            &format!(r#"[{{"kty":"oct","kid":"hs","k":"{k}"}}]"#),
        );
        assert!(err.rule.contains("32 bytes"), "{err}");
    }
}

/// A set whose every key the key ring would drop verifies nothing: it is refused at start-up,
/// with the key ring's reason for the first key, not served with a warning.
#[test]
fn inline_jwks_without_a_usable_key_is_refused() {
    for jwks in [
        r#"{"keys":[{"kty":"EC","crv":"P-256","x":"bad","y":"bad","kid":"k1","alg":"ES256"}]}"#,
        r#"[{"kty":"EC","crv":"P-256","x":"eA","y":"eQ","d":"ZA","kid":"k1"}]"#,
        r#"[{"kty":"RSA","n":"AQAB","e":"AQAB"},{"kty":"EC"}]"#,
    ] {
        let err = refused("SUPABASE_JWKS", jwks);
        assert!(err.rule.contains("no usable key"), "{err}");
        let keys = match serde_json::from_str(jwks).unwrap() {
            serde_json::Value::Array(keys) => keys,
            set => set["keys"].as_array().unwrap().clone(),
        };
        let reason = &crate::auth::keys::parse_inline_keys(&keys).dropped[0].reason;
        assert!(err.rule.contains(reason.as_str()), "{err}");
    }
    // One usable key keeps the set: the others are dropped with a warning when the key ring
    // is built.
    let key = crate::auth::mint::SigningKey::generate_with_kid(crate::auth::Alg::ES256, "good")
        .unwrap()
        .public_jwk();
    let mixed = serde_json::json!([key, {"kty": "EC", "kid": "bad"}]).to_string();
    let set = config(&[("SUPABASE_JWKS", &mixed)]).unwrap();
    assert_eq!(set.jwt.inline_jwks.len(), 2);
}

/// A member name twice in one object of `SUPABASE_JWKS` stops start-up, naming the member
/// (RFC 7517 §4 rejects such a JWK): the set is the operator's own, so a mistake in it is
/// refused whole, not dropped with a warning as a fetched key is. It was taken, the last of two
/// equal members winning.
#[test]
fn inline_jwks_with_a_duplicate_member_is_refused() {
    let key = crate::auth::mint::SigningKey::generate_with_kid(crate::auth::Alg::ES256, "good")
        .unwrap()
        .public_jwk()
        .to_string();
    let other = crate::auth::mint::SigningKey::generate_with_kid(crate::auth::Alg::ES256, "dm")
        .unwrap()
        .public_jwk()
        .to_string();
    let twice = other.replacen('{', r#"{"kty":"EC","#, 1);
    let deep = other.replacen('{', r#"{"ext":[{"b":1,"b":2}],"#, 1);
    for (jwks, member) in [
        (format!("[{twice}]"), "`kty`"),
        (format!(r#"{{"keys":[{key},{twice}]}}"#), "`kty`"),
        // A name that is not a JWK member is the value's own: not repeated.
        (format!("[{key},{deep}]"), "a member"),
        (format!(r#"{{"keys":[{key}],"keys":[]}}"#), "`keys`"),
    ] {
        let err = refused("SUPABASE_JWKS", &jwks);
        assert!(
            err.rule.contains("member name twice") && err.rule.ends_with(&format!("does {member}")),
            "{err}"
        );
    }
    assert!(config(&[("SUPABASE_JWKS", &format!("[{key},{other}]"))]).is_ok());
}

#[test]
fn connection_limits_have_defaults_and_ranges() {
    let defaults = config(&[]).unwrap().connections;
    assert_eq!(defaults, ConnectionLimits::default());
    assert_eq!(defaults.header_read_timeout, Duration::from_secs(10));
    assert_eq!(defaults.idle_timeout, Duration::from_secs(75));
    assert_eq!(defaults.max_connections, 4096);
    let set = config(&[
        ("HTTP_HEADER_READ_TIMEOUT_SECONDS", "2"),
        ("HTTP_IDLE_TIMEOUT_SECONDS", "30"),
        ("HTTP_MAX_CONNECTIONS", "100"),
    ])
    .unwrap()
    .connections;
    assert_eq!(
        set,
        ConnectionLimits {
            header_read_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(30),
            max_connections: 100,
            max_connections_set: true,
        }
    );
    refused("HTTP_HEADER_READ_TIMEOUT_SECONDS", "0");
    refused("HTTP_HEADER_READ_TIMEOUT_SECONDS", "ten");
    refused("HTTP_IDLE_TIMEOUT_SECONDS", "0");
    refused("HTTP_IDLE_TIMEOUT_SECONDS", "86400");
    refused("HTTP_MAX_CONNECTIONS", "0");
    refused("HTTP_MAX_CONNECTIONS", "-5");
}

#[test]
fn api_key_maps_are_json_with_the_right_prefix() {
    refused("SUPABASE_SECRET_KEYS", "sb_secret_abc");
    refused(
        "SUPABASE_SECRET_KEYS",
        r#"{"default":"sb_publishable_abc"}"#,
    );
    refused("SUPABASE_PUBLISHABLE_KEYS", r#"{"web":"sb_secret_abc"}"#);
    refused("SUPABASE_PUBLISHABLE_KEY", "pk_abc");
    let ok = config(&[
        ("SUPABASE_SECRET_KEYS", r#"{"backend":"sb_secret_abc"}"#),
        ("SUPABASE_SECRET_KEY", "sb_secret_def"),
        ("SUPABASE_PUBLISHABLE_KEY", "sb_publishable_ghi"),
    ])
    .unwrap();
    let names: Vec<_> = ok.api_keys.secret.keys().cloned().collect();
    assert_eq!(names, vec!["backend", "default"]);
    assert_eq!(ok.api_keys.publishable.len(), 1);
    let clash = config(&[
        ("SUPABASE_SECRET_KEYS", r#"{"default":"sb_secret_abc"}"#),
        ("SUPABASE_SECRET_KEY", "sb_secret_def"),
    ]);
    assert_eq!(clash.unwrap_err().variable, "SUPABASE_SECRET_KEY");
}

/// A key longer than the 1024 bytes a request's `apikey` may hold could never be presented:
/// it was taken at start and then refused on every request, 401 UNAUTHORIZED_INVALID_API_KEY.
#[test]
fn an_api_key_longer_than_a_request_may_present_is_refused() {
    let long = |prefix: &str| format!("{prefix}{}", "k".repeat(1025 - prefix.len()));
    let fits = format!("sb_secret_{}", "k".repeat(1024 - "sb_secret_".len()));
    config(&[("SUPABASE_SECRET_KEY", &fits)]).unwrap();
    for (name, value) in [
        (
            "SUPABASE_SECRET_KEYS",
            format!(
                r#"{{"ops":"sb_secret_abc","too-long":"{}"}}"#,
                long("sb_secret_")
            ),
        ),
        (
            "SUPABASE_PUBLISHABLE_KEYS",
            format!(r#"{{"too-long":"{}"}}"#, long("sb_publishable_")),
        ),
        ("SUPABASE_SECRET_KEY", long("sb_secret_")),
        ("SUPABASE_PUBLISHABLE_KEY", long("sb_publishable_")),
    ] {
        let line = refused(name, &value).to_string();
        assert!(line.contains("1024 bytes"), "{line}");
        if name.ends_with("KEYS") {
            assert!(line.contains("too-long") && !line.contains("ops"), "{line}");
        }
    }
}

#[test]
fn legacy_secret_needs_32_bytes() {
    refused("SUPABASE_JWT_SECRET", "too-short-secret");
    let ok = config(&[(
        "SUPABASE_JWT_SECRET",
        "super-secret-jwt-token-with-at-least-32-characters-long",
    )])
    .unwrap();
    assert!(ok.jwt.legacy_secret.is_some());
}

#[test]
fn numbers_must_be_in_range() {
    refused("PORT", "70000");
    refused("PORT", "http");
    refused("JWT_LEEWAY_SECONDS", "301");
    refused("JWKS_CACHE_TTL_SECONDS", "5");
    refused("JWKS_MIN_REFRESH_SECONDS", "0");
    refused("SMS_MAX_PER_RECIPIENT_PER_HOUR", "0");
    refused("SMS_MAX_PER_MINUTE", "-1");
    refused("SHUTDOWN_DRAIN_SECONDS", "3600");
    refused("LEGACY_REVOCATION_WINDOW_SECONDS", "0");
    let err = config(&[
        ("JWKS_CACHE_TTL_SECONDS", "60"),
        ("JWKS_MIN_REFRESH_SECONDS", "120"),
    ])
    .unwrap_err();
    assert_eq!(err.variable, "JWKS_MIN_REFRESH_SECONDS");
}

#[test]
fn host_must_be_an_ip_address() {
    refused("HOST", "example.com");
    assert_eq!(config(&[("HOST", "::1")]).unwrap().host.to_string(), "::1");
}

#[test]
fn database_url_is_sqlite_or_postgres() {
    refused("DATABASE_URL", "mysql://root@localhost/db");
    refused("DATABASE_URL", "postgres://");
    // Options the driver refuses are found at start, not when connecting (exit 2, not 1).
    refused("DATABASE_URL", "postgres://u@127.0.0.1:1/db?sslmode=bogus");
    refused("DATABASE_URL", "sqlite://x.db?mode=bogus");
    // No path: an anonymous database per connection, none of them migrated but the first.
    for no_path in ["sqlite://", "sqlite://?mode=memory", "sqlite:?mode=rwc"] {
        let err = refused("DATABASE_URL", no_path);
        assert!(err.rule.contains("sqlite::memory:"), "{err}");
    }
    for memory in ["sqlite::memory:", "sqlite://:memory:"] {
        let config = config(&[("DATABASE_URL", memory)]).unwrap();
        assert_eq!(config.database_url.expose(), memory);
    }
    let pg = config(&[("DATABASE_URL", "postgres://u:hunter22@db.internal:5432/app")]).unwrap();
    assert!(pg.database_url.is_postgres());
    let shown = format!("{:?}", pg.database_url);
    assert!(!shown.contains("hunter22"), "{shown}");
    assert!(shown.contains("db.internal"), "{shown}");
}

#[test]
fn tls_files_come_in_pairs() {
    let cert = tempfile::NamedTempFile::new().unwrap();
    let path = cert.path().to_str().unwrap();
    assert_eq!(
        config(&[("TLS_CERT_FILE", path)]).unwrap_err().variable,
        "TLS_KEY_FILE"
    );
    assert_eq!(
        config(&[("TLS_KEY_FILE", path)]).unwrap_err().variable,
        "TLS_CERT_FILE"
    );
    // Whether they exist is for `serve` and `check` to say: `migrate` runs without the mount.
    let absent = "/definitely/not/here.pem";
    let absent = config(&[("TLS_CERT_FILE", absent), ("TLS_KEY_FILE", absent)]).unwrap();
    assert!(absent.tls.is_some());
    let both = config(&[("TLS_CERT_FILE", path), ("TLS_KEY_FILE", path)]).unwrap();
    assert!(both.tls.is_some());
}

#[test]
fn cors_origins_are_star_or_origins() {
    refused("CORS_ALLOWED_ORIGINS", "https://app.example.com/path");
    refused("CORS_ALLOWED_ORIGINS", "*,https://app.example.com");
    refused("CORS_ALLOWED_ORIGINS", "app.example.com");
    refused("CORS_ALLOWED_ORIGINS", "https://user@app.example.com");
    refused("CORS_ALLOWED_ORIGINS", "https://app.example.com#x");
    // A browser's `Origin` never holds a pattern: a wildcard host would never match.
    let err = refused("CORS_ALLOWED_ORIGINS", "https://*.example.com");
    assert!(err.rule.contains("no wildcard"), "{err}");
    refused(
        "CORS_ALLOWED_ORIGINS",
        "https://app.example.com,https://app_1.example.com",
    );
    // Kept as a browser sends them in `Origin` (the comparison is byte for byte): the host in
    // lower case and in ASCII, no default port.
    let ok = config(&[(
        "CORS_ALLOWED_ORIGINS",
        "https://App.Example.com,http://localhost:3000,https://b.example.com:443,\
         http://c.example.com:80,https://bücher.example,HTTPS://d.example.com:8443",
    )])
    .unwrap();
    assert_eq!(
        ok.cors_allowed_origins,
        CorsOrigins::List(vec![
            "https://app.example.com".into(),
            "http://localhost:3000".into(),
            "https://b.example.com".into(),
            "http://c.example.com".into(),
            "https://xn--bcher-kva.example".into(),
            "https://d.example.com:8443".into(),
        ])
    );
    let ok = config(&[(
        "CORS_ALLOWED_ORIGINS",
        "http://127.0.0.1:5173,http://[::1]:5173",
    )])
    .unwrap();
    assert_eq!(
        ok.cors_allowed_origins,
        CorsOrigins::List(vec![
            "http://127.0.0.1:5173".into(),
            "http://[::1]:5173".into(),
        ])
    );
}

#[test]
fn cors_allowed_headers_are_header_names() {
    assert!(config(&[]).unwrap().cors_allowed_headers.is_empty());
    refused("CORS_ALLOWED_HEADERS", "*");
    refused("CORS_ALLOWED_HEADERS", "x-good,x bad");
    refused("CORS_ALLOWED_HEADERS", "x-tenant:1");
    refused("CORS_ALLOWED_HEADERS", "x-caf\u{e9}");
    refused("CORS_ALLOWED_HEADERS", ",");
    let ok = config(&[("CORS_ALLOWED_HEADERS", "X-Tenant-Id, x-feature_flag")]).unwrap();
    assert_eq!(
        ok.cors_allowed_headers,
        vec!["x-tenant-id", "x-feature_flag"]
    );
}

#[test]
fn log_settings_are_checked() {
    refused("LOG_FORMAT", "xml");
    refused("RUST_LOG", "info,[=");
    let ok = config(&[("LOG_FORMAT", "json"), ("RUST_LOG", "edgegate=debug")]).unwrap();
    assert_eq!(ok.log_format, LogFormat::Json);
}

/// A bare word that is no level is a target to tracing-subscriber: `RUST_LOG=warning` kept every
/// line of a target named `warning` (none), so it silenced the logs, errors included, and
/// start-up went on. A likely misspelt level is refused; target names are kept.
#[test]
fn rust_log_refuses_a_misspelt_level_rather_than_silence_every_line() {
    for filter in [
        "inf",
        "warning",
        "WARNING",
        "Information",
        "eror",
        "debg",
        "trac",
        "fatal",
        "critical",
        "verbose",
        "all",
        "none",
        "edgegate=debug,warning",
        "of",
    ] {
        let err = refused("RUST_LOG", filter);
        assert!(err.rule.contains("level"), "{filter}: {err}");
        // One line as the others: a source line's indentation is not part of it.
        assert!(!err.to_string().contains("  "), "{filter}: {err}");
    }
    for filter in [
        "info",
        "INFO",
        "Warn",
        "off",
        "edgegate",
        "hyper",
        "sqlx",
        "tower_http",
        "edgegate::auth",
        "info,edgegate",
        "warn,hyper=info",
    ] {
        assert!(config(&[("RUST_LOG", filter)]).is_ok(), "{filter}");
    }
}

/// Found by the `config` fuzz target: tracing-subscriber trims a directive for its scan but
/// slices the untrimmed text, so a blank before a multi-byte character panicked at start-up.
#[test]
fn log_filter_with_blanks_before_non_ascii_is_read_not_a_panic() {
    refused("RUST_LOG", "info, a\u{e9}[");
    let ok = config(&[("RUST_LOG", "info, \u{e9}t\u{e9}=debug ")]).unwrap();
    assert_eq!(ok.log_filter, "info,\u{e9}t\u{e9}=debug");
}

/// Found by the `config` fuzz target (a 10 s timeout): tracing-subscriber builds a field value
/// pattern into a DFA with no bound, exponential in the pattern for some (each `[a-z]` after
/// `[a-z]*a` doubles it). Refused before it is built, not a start-up that hangs.
#[test]
fn log_filter_field_patterns_are_bounded() {
    let pattern = |classes: usize| format!("[a-z]*a{}", "[a-z]".repeat(classes));
    // 221 KiB as a DFA: kept, as tracing-subscriber reads it.
    let fits = format!("info,[request{{route={}}}]=debug", pattern(10));
    assert_eq!(config(&[("RUST_LOG", &fits)]).unwrap().log_filter, fits);
    let too_large = |filter: &str| {
        let err = refused("RUST_LOG", filter);
        assert!(err.rule.contains("too large"), "{err}");
    };
    // 4 times larger, over the 1 MiB bound, wherever the directive stands.
    too_large(&format!("[{{x={}}}]", pattern(12)));
    too_large(&format!("warn, edgegate[{{x={}}}]=debug", pattern(12)));
    // 19 patterns that fit one by one are over the 4 MiB bound together; 18 are not.
    let many = |count: usize| vec![format!("[{{x={}}}]", pattern(10)); count].join(",");
    too_large(&many(19));
    assert!(config(&[("RUST_LOG", &many(18))]).is_ok());
    // Not patterns (levels, literals, numbers): built as before.
    let plain = "edgegate=debug,[{status=200}],[{ok=true}],[request{route=/v1/jwt-test}]=trace";
    assert_eq!(config(&[("RUST_LOG", plain)]).unwrap().log_filter, plain);
}

#[test]
fn blank_values_count_as_unset() {
    let config = config(&[("STRIPE_SECRET_KEY", ""), ("PORT", "  ")]).unwrap();
    assert!(config.stripe.secret_key.is_none());
    assert_eq!(config.port, 8080);
}

#[test]
fn debug_output_redacts_every_secret() {
    // (variable, value, the part of the value that must never show)
    let secrets = [
        (
            "SUPABASE_JWT_SECRET",
            "legacy-secret-value-0123456789abcdef",
            "legacy-secret-value",
        ),
        (
            "STRIPE_SECRET_KEY",
            "sk_live_stripesecretvalue",
            "stripesecretvalue",
        ),
        (
            "STRIPE_WEBHOOK_SECRET",
            "whsec_webhooksecretvalue",
            "webhooksecretvalue",
        ),
        (
            "TWILIO_AUTH_TOKEN",
            "twiliotokenvalue0123456789abcdef",
            "twiliotokenvalue",
        ),
        (
            "SUPABASE_SECRET_KEY",
            "sb_secret_apikeyvalue",
            "apikeyvalue",
        ),
        (
            "SUPABASE_PUBLISHABLE_KEY",
            "sb_publishable_pubvalue",
            "pubvalue",
        ),
        (
            "DATABASE_URL",
            "postgres://app:dbpasswordvalue@db/app",
            "dbpasswordvalue",
        ),
        (
            "OTEL_EXPORTER_OTLP_HEADERS",
            "x-honeycomb-team=otlpheadervalue",
            "otlpheadervalue",
        ),
    ];
    let mut vars: Vec<(&str, &str)> = secrets
        .iter()
        .map(|(name, value, _)| (*name, *value))
        .collect();
    vars.push(("TWILIO_ACCOUNT_SID", "AC0123456789abcdef0123456789abcdef"));
    vars.push(("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"));
    vars.push((
        "SUPABASE_JWKS",
        r#"[{"kty":"oct","k":"aW5saW5lb2N0c2VjcmV0dmFsdWUtMDEyMzQ1Njc4OWFi"}]"#,
    ));
    let shown = format!("{:?}", config(&vars).unwrap());
    for (name, _, secret_part) in secrets {
        assert!(
            !shown.contains(secret_part),
            "{name} leaks through Debug: {shown}"
        );
    }
    assert!(!shown.contains("aW5saW5lb2N0c2VjcmV0dmFsdWU"), "{shown}");
}

#[test]
fn reconcile_interval_defaults_to_an_hour_with_a_stripe_key() {
    let key = ("STRIPE_SECRET_KEY", "sk_test_x");
    assert_eq!(config(&[]).unwrap().stripe.reconcile_interval, None);
    assert_eq!(
        config(&[key]).unwrap().stripe.reconcile_interval,
        Some(Duration::from_secs(3600))
    );
    let every_ten_minutes = config(&[key, ("STRIPE_RECONCILE_INTERVAL_SECONDS", "600")]).unwrap();
    assert_eq!(
        every_ten_minutes.stripe.reconcile_interval,
        Some(Duration::from_secs(600))
    );
    let off = config(&[key, ("STRIPE_RECONCILE_INTERVAL_SECONDS", "0")]).unwrap();
    assert_eq!(off.stripe.reconcile_interval, None);
    refused("STRIPE_RECONCILE_INTERVAL_SECONDS", "59");
    refused("STRIPE_RECONCILE_INTERVAL_SECONDS", "2592001");
    // With its jitter (a tenth) and the window's hour of overlap, a run must still reach back
    // no further than Stripe's 30-day event retention.
    refused("STRIPE_RECONCILE_INTERVAL_SECONDS", "2592000");
    refused("STRIPE_RECONCILE_INTERVAL_SECONDS", "2160001");
    let longest = config(&[key, ("STRIPE_RECONCILE_INTERVAL_SECONDS", "2160000")]).unwrap();
    let longest = longest.stripe.reconcile_interval.unwrap().as_secs();
    let reach = longest + longest / 10 + crate::stripe::reconcile::OVERLAP_SECONDS as u64;
    assert!(reach < crate::stripe::reconcile::RETENTION_SECONDS as u64);
    refused("STRIPE_RECONCILE_INTERVAL_SECONDS", "hourly");
}

#[test]
fn no_otlp_endpoint_means_no_trace_export() {
    assert!(config(&[]).unwrap().traces.is_none());
    // The other OTEL variables alone turn nothing on.
    let config = config(&[
        ("OTEL_SERVICE_NAME", "api"),
        ("OTEL_TRACES_SAMPLER", "always_on"),
    ])
    .unwrap();
    assert!(config.traces.is_none());
}

#[test]
fn resource_attributes_are_key_value_pairs_and_service_name_is_ordered() {
    let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
    let traces = |extra: &[(&'static str, &'static str)]| {
        let mut vars = vec![endpoint];
        vars.extend_from_slice(extra);
        config(&vars).unwrap().traces.unwrap()
    };
    let t = traces(&[(
        "OTEL_RESOURCE_ATTRIBUTES",
        "a=1, b = x%20y ,a=2,,service.name=svc",
    )]);
    assert_eq!(
        t.resource_attributes,
        vec![
            ("b".to_owned(), "x y".to_owned()),
            ("a".to_owned(), "2".to_owned())
        ]
    );
    assert_eq!(
        t.service_name, "svc",
        "the attributes' service.name over the default"
    );
    let t = traces(&[
        ("OTEL_RESOURCE_ATTRIBUTES", "service.name=svc"),
        ("OTEL_SERVICE_NAME", "named"),
    ]);
    assert_eq!(
        t.service_name, "named",
        "OTEL_SERVICE_NAME over the attributes'"
    );
    assert!(t.resource_attributes.is_empty());
    for bad in ["novalue", "=1", "a b=1", "a=%zz"] {
        refused("OTEL_RESOURCE_ATTRIBUTES", bad);
    }
}

#[test]
fn otlp_endpoint_gets_the_traces_path_and_the_contract_defaults() {
    let traces = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")])
        .unwrap()
        .traces
        .unwrap();
    assert_eq!(traces.endpoint.as_str(), "http://127.0.0.1:4318/v1/traces");
    assert_eq!(traces.service_name, "edgegate");
    assert_eq!(traces.sampler, TraceSampler::ParentBasedAlwaysOn);
    assert_eq!(traces.max_queue_size, 2_048);
    assert_eq!(traces.max_export_batch_size, 512);
    assert_eq!(traces.schedule_delay, Duration::from_secs(5));
    assert_eq!(traces.export_timeout, Duration::from_secs(10));
    assert!(traces.headers.is_empty());

    let below_a_path = config(&[(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "https://collector.example.com/otlp/",
    )])
    .unwrap()
    .traces
    .unwrap();
    assert_eq!(
        below_a_path.endpoint.as_str(),
        "https://collector.example.com/otlp/v1/traces"
    );
}

#[test]
fn the_traces_endpoint_is_used_as_it_is_and_wins() {
    let traces = config(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
        (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://127.0.0.1:9/spans",
        ),
    ])
    .unwrap()
    .traces
    .unwrap();
    assert_eq!(traces.endpoint.as_str(), "http://127.0.0.1:9/spans");
}

#[test]
fn trace_export_can_be_turned_off_with_an_endpoint_set() {
    let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
    assert!(
        config(&[endpoint, ("OTEL_SDK_DISABLED", "TRUE")])
            .unwrap()
            .traces
            .is_none()
    );
    assert!(
        config(&[endpoint, ("OTEL_TRACES_EXPORTER", "none")])
            .unwrap()
            .traces
            .is_none()
    );
    assert!(
        config(&[endpoint, ("OTEL_SDK_DISABLED", "false")])
            .unwrap()
            .traces
            .is_some()
    );
    refused("OTEL_SDK_DISABLED", "yes");
    refused("OTEL_TRACES_EXPORTER", "jaeger");
}

#[test]
fn otlp_settings_are_checked_even_without_an_endpoint() {
    refused("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318");
    refused(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "grpc://127.0.0.1:4317",
    );
    refused(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "https://user:pass@collector.example.com",
    );
    refused("OTEL_EXPORTER_OTLP_PROTOCOL", "grcp");
    refused("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/xml");
    refused("OTEL_TRACES_SAMPLER", "parentbased_always");
    refused("OTEL_BSP_MAX_QUEUE_SIZE", "0");
    refused("OTEL_BSP_SCHEDULE_DELAY", "soon");
    refused("OTEL_EXPORTER_OTLP_TIMEOUT", "-1");
    assert!(config(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]).is_ok());
}

/// What the specification defines but edgegate does not build in (gRPC, JSON, Jaeger's and
/// X-Ray's samplers, Zipkin's exporter) stops start-up only where spans would be exported: a
/// platform that sets it for every service must not stop an instance that exports nothing.
#[test]
fn features_not_built_in_are_refused_only_where_spans_are_exported() {
    let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
    let not_built_in = [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
        ("OTEL_TRACES_SAMPLER", "jaeger_remote"),
        ("OTEL_TRACES_SAMPLER", "parentbased_jaeger_remote"),
        ("OTEL_TRACES_SAMPLER", "xray"),
    ];
    for (name, value) in not_built_in {
        for off in [
            vec![("OTEL_SDK_DISABLED", "true"), endpoint],
            vec![("OTEL_TRACES_EXPORTER", "none"), endpoint],
            vec![],
        ] {
            let mut vars = off.clone();
            vars.push((name, value));
            let config = config(&vars)
                .unwrap_or_else(|err| panic!("{name}={value} with {off:?} refused: {err}"));
            assert!(config.traces.is_none());
        }
        let err = config(&[endpoint, (name, value)])
            .expect_err(&format!("{name}={value} must be refused while exporting"));
        assert_eq!(err.variable, name);
    }
    for exporter in ["zipkin", "console"] {
        let disabled = [("OTEL_SDK_DISABLED", "true"), endpoint];
        let mut vars = disabled.to_vec();
        vars.push(("OTEL_TRACES_EXPORTER", exporter));
        assert!(config(&vars).unwrap().traces.is_none(), "{exporter}");
        refused("OTEL_TRACES_EXPORTER", exporter);
    }
}

/// The specification's enum values are case-insensitive, as OTEL_PROPAGATORS and
/// OTEL_SDK_DISABLED already were.
#[test]
fn otel_enum_values_are_read_in_any_case() {
    let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
    let traces = |vars: &[(&str, &str)]| {
        let mut all = vec![endpoint];
        all.extend_from_slice(vars);
        config(&all)
            .unwrap_or_else(|err| panic!("{vars:?}: {err}"))
            .traces
    };
    let sampler = traces(&[("OTEL_TRACES_SAMPLER", "ALWAYS_ON")])
        .unwrap()
        .sampler;
    assert_eq!(sampler, TraceSampler::AlwaysOn);
    let sampler = traces(&[
        ("OTEL_TRACES_SAMPLER", "ParentBased_TraceIdRatio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0.5"),
    ])
    .unwrap()
    .sampler;
    assert_eq!(sampler, TraceSampler::ParentBasedTraceIdRatio(0.5));
    assert!(traces(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "HTTP/PROTOBUF")]).is_some());
    assert!(traces(&[("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "Http/Protobuf")]).is_some());
    assert!(traces(&[("OTEL_EXPORTER_OTLP_COMPRESSION", "NONE")]).is_some());
    assert!(traces(&[("OTEL_TRACES_EXPORTER", "OTLP")]).is_some());
    assert!(traces(&[("OTEL_TRACES_EXPORTER", "None")]).is_none());
    // Not built in, in whatever case, is still refused while exporting.
    let err = config(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "GRPC")]).unwrap_err();
    assert_eq!(err.variable, "OTEL_EXPORTER_OTLP_PROTOCOL");
}

#[test]
fn samplers_and_their_ratio() {
    let sampler = |vars: &[(&str, &str)]| {
        let mut all = vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")];
        all.extend_from_slice(vars);
        config(&all).unwrap().traces.unwrap().sampler
    };
    assert_eq!(
        sampler(&[("OTEL_TRACES_SAMPLER", "always_on")]),
        TraceSampler::AlwaysOn
    );
    assert_eq!(
        sampler(&[("OTEL_TRACES_SAMPLER", "parentbased_always_off")]),
        TraceSampler::ParentBasedAlwaysOff
    );
    assert_eq!(
        sampler(&[("OTEL_TRACES_SAMPLER", "traceidratio")]),
        TraceSampler::TraceIdRatio(1.0)
    );
    assert_eq!(
        sampler(&[
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ]),
        TraceSampler::ParentBasedTraceIdRatio(0.25)
    );
    let err = config(&[
        ("OTEL_TRACES_SAMPLER", "traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
    ])
    .unwrap_err();
    assert_eq!(err.variable, "OTEL_TRACES_SAMPLER_ARG");
}

#[test]
fn otlp_headers_are_decoded_merged_and_never_shown() {
    let traces = config(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
        (
            "OTEL_EXPORTER_OTLP_HEADERS",
            "Authorization=Basic%20c2VjcmV0aGVhZGVy, x-tenant=shared",
        ),
        ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-tenant=traces"),
    ])
    .unwrap()
    .traces
    .unwrap();
    let headers: Vec<(&str, &str)> = traces
        .headers
        .iter()
        .map(|(name, value)| (name.as_str(), value.expose_secret()))
        .collect();
    assert_eq!(
        headers,
        vec![
            ("authorization", "Basic c2VjcmV0aGVhZGVy"),
            ("x-tenant", "traces")
        ]
    );
    assert!(!format!("{traces:?}").contains("c2VjcmV0aGVhZGVy"));

    refused("OTEL_EXPORTER_OTLP_HEADERS", "no-equals-sign-secretvalue");
    refused("OTEL_EXPORTER_OTLP_HEADERS", "bad header=secretvalue");
    refused("OTEL_EXPORTER_OTLP_HEADERS", "x-key=secretvalue%zz");
    refused("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-key=secret%0Avalue");
}

#[test]
fn a_database_password_given_as_a_query_parameter_is_redacted() {
    let config = config(&[(
        "DATABASE_URL",
        "postgres://app@db:5432/edgegate?sslmode=require&password=querysecretvalue",
    )])
    .unwrap();
    let shown = config.database_url.redacted();
    assert!(!shown.contains("querysecretvalue"), "{shown}");
    assert!(shown.contains("sslmode=require"), "{shown}");
    assert!(shown.contains("password=REDACTED"), "{shown}");
    assert!(!format!("{config:?}").contains("querysecretvalue"));
}

/// SUPABASE_JWKS_URL may carry a key in its query (`?apikey=sb_secret_…`): it is shown, and
/// debug-printed, without its query and fragment.
#[test]
fn a_jwks_url_is_shown_without_its_query_or_fragment() {
    let config = config(&[(
        "SUPABASE_JWKS_URL",
        "https://jwks.example.com/auth/v1/.well-known/jwks.json?apikey=sb_secret_querysecretvalue#querysecretvalue",
    )])
    .unwrap();
    let url = config.jwt.jwks_url.as_ref().unwrap();
    assert_eq!(
        super::shown_url(url),
        "https://jwks.example.com/auth/v1/.well-known/jwks.json?…#…"
    );
    assert!(!format!("{config:?}").contains("querysecretvalue"));
    let plain = Url::parse("https://jwks.example.com/jwks.json").unwrap();
    assert_eq!(
        super::shown_url(&plain),
        "https://jwks.example.com/jwks.json"
    );
}

#[test]
fn public_url_has_no_query_or_fragment() {
    // The status callback URL is PUBLIC_URL with a path appended: a query or fragment would
    // swallow it.
    let err = refused("PUBLIC_URL", "https://edge.example.com/?env=prod");
    assert!(err.rule.contains("query"), "{}", err.rule);
    refused("PUBLIC_URL", "https://edge.example.com/#top");
    refused("PUBLIC_URL", "https://edge.example.com/?");
    let config = config(&[("PUBLIC_URL", "https://example.com/edge/")]).unwrap();
    assert_eq!(
        config.public_url.unwrap().as_str(),
        "https://example.com/edge/"
    );
}

/// A line inside an earlier line's quoted value is not a line of its own: the finder named a
/// piece of the secret (`sup3rS3cretSecondHalf`, from the value's second line) as the variable
/// of the line that does not parse, and gave the wrong line.
#[test]
fn a_dotenv_line_inside_a_quoted_value_is_not_taken_for_the_broken_one() {
    let file = "SUPABASE_JWT_SECRET=\"first-half\nsup3rS3cretSecondHalf=tail is here\"\nOPTS=tail is here\n";
    assert_eq!(
        find_dotenv_line(file, "tail is here"),
        Some((3, "OPTS=tail is here"))
    );
    let escaped = "NOTE=\"hello\\\"\nx y is fine\"\nB=x y\n";
    assert_eq!(find_dotenv_line(escaped, "x y"), Some((3, "B=x y")));
    let single = "A='one\nB=two x'\nC=two x\n";
    assert_eq!(find_dotenv_line(single, "two x"), Some((3, "C=two x")));
}

/// The standard OTLP variables for compression and TLS files are not built in: set, they stop
/// start-up naming the variable, rather than being ignored (spans sent uncompressed, or over a
/// TLS the operator thinks is pinned or mutual when it is not).
#[test]
fn otlp_compression_and_tls_files_are_refused_not_ignored() {
    const ENDPOINT: (&str, &str) = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
    let cases = [
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip"),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/etc/otel/file.pem"),
        (
            "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
            "/etc/otel/file.pem",
        ),
        ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/etc/otel/file.pem"),
        ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "/etc/otel/file.pem"),
        (
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            "/etc/otel/file.pem",
        ),
        (
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
            "/etc/otel/file.pem",
        ),
    ];
    for (name, value) in cases {
        // Where spans would be exported: refused, naming the variable.
        let err = config(&[ENDPOINT, (name, value)])
            .expect_err(&format!("{name}={value} must be refused while exporting"));
        assert_eq!(err.variable, name);
        assert!(err.to_string().starts_with(name), "{err}");
        // Where nothing is exported (no endpoint, or export turned off): no reason to stop.
        assert!(
            config(&[(name, value)]).is_ok(),
            "{name} without an endpoint"
        );
        let off = ("OTEL_SDK_DISABLED", "true");
        assert!(
            config(&[ENDPOINT, off, (name, value)]).is_ok(),
            "{name} with export off"
        );
    }
    for name in [
        "OTEL_EXPORTER_OTLP_COMPRESSION",
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
    ] {
        assert!(config(&[ENDPOINT, (name, "none")]).is_ok(), "{name}=none");
    }
}

#[test]
fn otel_propagators_turn_trace_context_on_or_off_and_refuse_what_is_not_built_in() {
    const ENDPOINT: (&str, &str) = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
    let trace_context = |value: Option<&str>| {
        let mut vars = vec![ENDPOINT];
        vars.extend(value.map(|value| ("OTEL_PROPAGATORS", value)));
        config(&vars).unwrap().traces.unwrap().trace_context
    };
    assert!(trace_context(None), "the default is tracecontext,baggage");
    assert!(trace_context(Some("tracecontext,baggage")));
    assert!(trace_context(Some(" TraceContext ")));
    assert!(!trace_context(Some("none")));
    assert!(!trace_context(Some("baggage")));
    // Not built in: refused where spans are exported, not where nothing is.
    for value in ["b3", "tracecontext,b3multi", "jaeger", "xray", "ottrace"] {
        let err = config(&[ENDPOINT, ("OTEL_PROPAGATORS", value)]).expect_err(&format!(
            "OTEL_PROPAGATORS={value} must be refused while exporting"
        ));
        assert_eq!(err.variable, "OTEL_PROPAGATORS");
        assert!(config(&[("OTEL_PROPAGATORS", value)]).is_ok(), "{value}");
    }
    // Not a propagator at all: a typo, refused either way.
    refused("OTEL_PROPAGATORS", "tracecontxt");
    refused("OTEL_PROPAGATORS", "none,tracecontext");
}

/// The list a `.env` error names variables from holds every variable the configuration reads
/// and every one docs/CONFIGURATION.md lists (but `RELEASE_COMMAND`, which Fly sets).
#[test]
fn the_variable_list_holds_every_variable_read_or_documented() {
    let asked = std::cell::RefCell::new(std::collections::BTreeSet::new());
    // Unset, then set (to values that reach the variables read only beside others).
    let set: HashMap<&str, &str> = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
        ("TWILIO_ACCOUNT_SID", "AC0123456789abcdef0123456789abcdef"),
        ("TWILIO_AUTH_TOKEN", "f1e2d3c4b5a6978812345678abcdef90"),
        ("STRIPE_SECRET_KEY", "sk_test_0123456789"),
    ]
    .into_iter()
    .collect();
    let _ = Config::from_lookup(|name| {
        asked.borrow_mut().insert(name.to_owned());
        None
    });
    let _ = Config::from_lookup(|name| {
        asked.borrow_mut().insert(name.to_owned());
        set.get(name).map(|value| (*value).to_owned())
    });
    let docs = include_str!("../../docs/CONFIGURATION.md");
    let documented = docs
        .lines()
        .filter_map(|line| line.strip_prefix("| "))
        .filter_map(|line| line.split('|').next())
        .flat_map(|cell| cell.split('`').skip(1).step_by(2))
        .filter(|name| {
            name.starts_with(|c: char| c.is_ascii_uppercase())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        })
        .filter(|name| *name != "RELEASE_COMMAND")
        .map(str::to_owned)
        .collect::<Vec<_>>();
    assert!(documented.len() > 40, "{documented:?}");
    for name in asked.into_inner().iter().chain(&documented) {
        assert!(
            VARIABLES.contains(&name.as_str()),
            "{name} is not in VARIABLES"
        );
    }
}

#[test]
fn a_variable_set_twice_in_dotenv_is_found_outside_quoted_values() {
    assert_eq!(
        repeated_dotenv_variable("A=1\nB=\"x\nA=2\"\n# A=3\nexport A = 4\n"),
        Some(("A", 1, 5))
    );
    assert_eq!(repeated_dotenv_variable("A=1\nB='x\nA=2'\nC=3\n"), None);
}

/// The `$` forms dotenvy reads as a shell's `source` does pass; the others are told apart.
#[test]
fn a_dotenv_substitution_is_checked_against_a_shells_reading() {
    for value in [
        "x$MYVAR",
        "\"x${DB_PASSWORD}\"",
        "p:${DB_PASSWORD}@h",
        "\"$HOME/x\"",
        "$A$B",
        "'p$_$$x'",
        "\"$A it's\"",
        "\\$DB_PASSWORD",
        "${A} # note",
        "#$_x",
        // dotenvy cuts the comment and the trailing blanks off before it reads the value.
        "$A # note",
        "$HOME ",
        "x$HOME\t",
        "\"$A \"",
    ] {
        assert_eq!(value_fault(value), None, "{value}");
    }
    let bare = |name, cut| Some(ValueFault::BareName { name, cut });
    assert_eq!(value_fault("p:$DB_PASSWORD@h"), bare("DB_PASSWORD", true));
    assert_eq!(value_fault("\"x$MYVAR\""), bare("MYVAR", false));
    assert_eq!(value_fault("$MYVAR\\n"), bare("MYVAR", false));
    assert_eq!(value_fault("x$A 'b'"), bare("A", false));
    assert_eq!(value_fault("$Aé"), bare("A", true));
    assert_eq!(value_fault("a$/b"), Some(ValueFault::Lone));
    assert_eq!(value_fault("p@$$w0rd"), Some(ValueFault::Lone));
    assert_eq!(value_fault("x$"), Some(ValueFault::Lone));
    assert_eq!(value_fault("${A:-x}"), Some(ValueFault::NotAName));
    assert_eq!(value_fault("${}"), Some(ValueFault::NotAName));
    assert_eq!(value_fault("${A"), Some(ValueFault::Unclosed('{')));
    assert_eq!(value_fault("\"abc"), Some(ValueFault::Unclosed('\u{22}')));
    assert_eq!(value_fault("a\\qb"), Some(ValueFault::Escape));
    assert_eq!(value_fault("a b"), Some(ValueFault::Blank));
}
