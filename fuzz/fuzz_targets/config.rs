//! The configuration parser, `Config::from_lookup`, with fuzzed values for the contract's
//! variables, then the credential layer built from the result (as `serve` does).
//!
//! Input: fields split at 0xFF; each field is one variable: its first byte picks the name
//! from [`VARIABLES`], the rest is the value (a later field for the same name wins).
//!
//! Oracles: an error names one of the variables and never repeats a value (checked with DEL, a
//! character no rule text holds: a message that contains one echoed a value); `Debug` of a
//! configuration never shows a secret (for `DATABASE_URL`: its password).
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use edgegate::Config;
use edgegate::auth::{Authenticator, settings_from};
use edgegate_fuzz::{SEPARATOR, text};
use libfuzzer_sys::fuzz_target;

/// Every variable of the contract's configuration table (some are read elsewhere or not yet;
/// they are fuzzed all the same, so a new rule is covered as soon as it exists), and every one
/// `Config::from_lookup` reads (`tests/it/deploy.rs` checks that none is missing).
const VARIABLES: &[&str] = &[
    "PORT",
    "HOST",
    "HTTP_HEADER_READ_TIMEOUT_SECONDS",
    "HTTP_IDLE_TIMEOUT_SECONDS",
    "HTTP_MAX_CONNECTIONS",
    "SHUTDOWN_DRAIN_SECONDS",
    "TLS_CERT_FILE",
    "TLS_KEY_FILE",
    "DATABASE_URL",
    "SUPABASE_URL",
    "SUPABASE_JWKS_URL",
    "SUPABASE_JWKS",
    "SUPABASE_JWT_SECRET",
    "JWT_ISSUERS",
    "JWT_AUDIENCES",
    "JWT_LEEWAY_SECONDS",
    "JWKS_CACHE_TTL_SECONDS",
    "JWKS_MIN_REFRESH_SECONDS",
    "LEGACY_REVOCATION_WINDOW_SECONDS",
    "SUPABASE_SECRET_KEYS",
    "SUPABASE_PUBLISHABLE_KEYS",
    "SUPABASE_SECRET_KEY",
    "SUPABASE_PUBLISHABLE_KEY",
    "EDGEGATE_SECRET_KEY",
    "STRIPE_SECRET_KEY",
    "STRIPE_WEBHOOK_SECRET",
    "STRIPE_API_BASE",
    "STRIPE_RECONCILE_INTERVAL_SECONDS",
    "TWILIO_ACCOUNT_SID",
    "TWILIO_AUTH_TOKEN",
    "TWILIO_FROM_NUMBER",
    "TWILIO_MESSAGING_SERVICE_SID",
    "TWILIO_API_BASE",
    "PUBLIC_URL",
    "SMS_ALLOWED_PREFIXES",
    "SMS_MAX_PER_RECIPIENT_PER_HOUR",
    "SMS_MAX_PER_MINUTE",
    "CORS_ALLOWED_ORIGINS",
    "CORS_ALLOWED_HEADERS",
    "LOG_FORMAT",
    "RUST_LOG",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
    "OTEL_EXPORTER_OTLP_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_KEY",
    "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_PROPAGATORS",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
];

/// Variables whose value is a secret, or holds one (a database URL's password).
const SECRETS: &[&str] = &[
    "DATABASE_URL",
    "SUPABASE_JWKS",
    "SUPABASE_JWT_SECRET",
    "SUPABASE_SECRET_KEYS",
    "SUPABASE_SECRET_KEY",
    "STRIPE_SECRET_KEY",
    "STRIPE_WEBHOOK_SECRET",
    "TWILIO_AUTH_TOKEN",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
];

fuzz_target!(|data: &[u8]| {
    let mut vars = BTreeMap::new();
    for field in data.split(|b| *b == SEPARATOR) {
        if let Some((&pick, value)) = field.split_first() {
            let name = VARIABLES[usize::from(pick) % VARIABLES.len()];
            vars.insert(name, text(value));
        }
    }
    match Config::from_lookup(|name| vars.get(name).cloned()) {
        Err(err) => {
            assert!(
                VARIABLES.contains(&err.variable.as_str()),
                "the error names no variable: {err}"
            );
            let message = err.to_string();
            assert!(
                !message.contains('\u{7f}'),
                "the error repeats a value: {message}"
            );
        }
        Ok(config) => {
            let debug = format!("{config:?}");
            for (name, value) in &vars {
                let Some(secret) = secret_part(name, value) else {
                    continue;
                };
                // The same text in another variable may show there (a host name, an issuer),
                // as that variable holds it, lowercased (header names in
                // CORS_ALLOWED_HEADERS), or, for a URL, as the URL writes it (a database
                // password percent-encoded in STRIPE_API_BASE's path, say).
                let shown_elsewhere = vars.iter().any(|(other, v)| {
                    other != name
                        && (v.contains(&secret)
                            || v.to_lowercase().contains(&secret)
                            || url::Url::parse(v.trim())
                                .is_ok_and(|url| url.as_str().contains(&secret)))
                });
                if !shown_elsewhere {
                    assert!(!debug.contains(&secret), "Debug shows {name}: {debug}");
                }
            }
            let _ = Authenticator::new(settings_from(&config), client().clone());
        }
    }
});

/// The part of a variable that must stay hidden: a database URL's password, any other secret's
/// whole value. Only values with `~` or `!` are checked, characters that no `Debug` punctuation
/// or default uses, so a match cannot be a coincidence with the rest of the output.
fn secret_part(name: &str, value: &str) -> Option<String> {
    if !SECRETS.contains(&name) {
        return None;
    }
    let secret = if name == "DATABASE_URL" {
        let mut url = url::Url::parse(value.trim()).ok()?;
        let password = url.password()?.to_owned();
        // Only the password is hidden: the same text elsewhere in the URL shows, by design.
        url.set_password(None).ok()?;
        if url.as_str().contains(&password) {
            return None;
        }
        password
    } else if name.ends_with("_HEADERS") {
        // `name=value,...`: the first header's value, as written (a percent-encoded one shows
        // decoded, if it shows).
        let (_, first) = value.split(',').next()?.split_once('=')?;
        let first = first.trim();
        // A header's name shows (lowercased): a value that is also a name, or part of one, is
        // not a leak.
        if first.contains('%') || value.to_lowercase().matches(&first.to_lowercase()).count() > 1 {
            return None;
        }
        first.to_owned()
    } else {
        value.trim().to_owned()
    };
    (secret.len() >= 8 && secret.contains(['~', '!'])).then_some(secret)
}

fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(reqwest::Client::new)
}
