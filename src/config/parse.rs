//! One function per kind of value, each with the rule it enforces. Values never reach an error.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use url::Url;

use crate::auth::authenticator::MAX_API_KEY_BYTES;

use super::{CorsOrigins, DEFAULT_DATABASE_URL, DatabaseUrl, LogFormat, Redacted, TraceSampler};

/// The members a JWK or a JWK set defines (RFC 7517 §4–5, RFC 7518 §6): a duplicate among these
/// is named in the message, any other name is the operator's value and is not.
const JWK_MEMBERS: &[&str] = &[
    "keys", "kty", "use", "key_ops", "alg", "kid", "x5u", "x5c", "x5t", "x5t#S256", "crv", "x",
    "y", "d", "n", "e", "p", "q", "dp", "dq", "qi", "oth", "r", "t", "k", "ext",
];

/// A configuration value that breaks its rule. Displays as one line: the variable and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable} {rule}")]
pub struct ConfigError {
    pub variable: String,
    pub rule: String,
}

impl ConfigError {
    pub fn new(variable: &str, rule: impl Into<String>) -> Self {
        Self {
            variable: variable.to_owned(),
            rule: rule.into(),
        }
    }
}

pub(super) enum UrlRule {
    /// `http://` or `https://`.
    Http,
    /// `https://`, or `http://` only when the host is a loopback address or `localhost`.
    HttpsOrLoopback,
}

pub(super) struct Vars<F> {
    lookup: F,
}

impl<F: Fn(&str) -> Option<String>> Vars<F> {
    pub(super) fn new(lookup: F) -> Self {
        Self { lookup }
    }

    /// The value, with an empty or all-blank value treated as unset (as `.env` files often hold).
    fn get(&self, name: &str) -> Option<String> {
        (self.lookup)(name).filter(|value| !value.trim().is_empty())
    }

    /// The value trimmed, when set.
    pub(super) fn get_trimmed(&self, name: &str) -> Option<String> {
        self.get(name).map(|raw| raw.trim().to_owned())
    }

    /// The value trimmed and lowercased, when set: the OpenTelemetry specification's enum values
    /// are case-insensitive.
    fn get_enum(&self, name: &str) -> Option<String> {
        self.get_trimmed(name).map(|raw| raw.to_ascii_lowercase())
    }

    /// `true` or `false`, any case (the OpenTelemetry specification's booleans); unset is false.
    pub(super) fn boolean(&self, name: &str) -> Result<bool, ConfigError> {
        match self.get_trimmed(name) {
            None => Ok(false),
            Some(raw) if raw.eq_ignore_ascii_case("true") => Ok(true),
            Some(raw) if raw.eq_ignore_ascii_case("false") => Ok(false),
            Some(_) => Err(ConfigError::new(name, "must be true or false")),
        }
    }

    /// Only `http/protobuf` is built in: gRPC would bring a second HTTP stack (tonic). The
    /// specification's other two are refused only when `exporting`.
    pub(super) fn otlp_protocol(&self, name: &str, exporting: bool) -> Result<(), ConfigError> {
        match self.get_enum(name).as_deref() {
            None | Some("http/protobuf") => Ok(()),
            Some("grpc" | "http/json") if !exporting => Ok(()),
            Some(_) => Err(ConfigError::new(
                name,
                "must be http/protobuf (grpc and http/json are not built in)",
            )),
        }
    }

    /// `OTEL_TRACES_EXPORTER`: whether it is `none`. `otlp` is the one built in; the
    /// specification's `zipkin` and `console` are accepted only where `sdk_disabled` turns every
    /// exporter off.
    pub(super) fn traces_exporter(
        &self,
        name: &str,
        sdk_disabled: bool,
    ) -> Result<bool, ConfigError> {
        match self.get_enum(name).as_deref() {
            None | Some("otlp") => Ok(false),
            Some("none") => Ok(true),
            Some("zipkin" | "console") if sdk_disabled => Ok(true),
            Some(_) => Err(ConfigError::new(
                name,
                "must be otlp or none (zipkin and console are not built in)",
            )),
        }
    }

    /// `OTEL_PROPAGATORS`: whether W3C trace context is read and written. Unset means the
    /// specification's default, `tracecontext,baggage`. `baggage` is accepted and not carried;
    /// `none` (alone) turns propagation off. A name outside the specification's list is refused
    /// at once; one of its propagators that is not built in (`b3`, `jaeger`…) only when
    /// `exporting` (a platform may set them for every service).
    pub(super) fn propagators(&self, name: &str, exporting: bool) -> Result<bool, ConfigError> {
        const NOT_BUILT_IN: [&str; 5] = ["b3", "b3multi", "jaeger", "xray", "ottrace"];
        let Some(raw) = self.get_trimmed(name) else {
            return Ok(true);
        };
        let list: Vec<String> = raw
            .split(',')
            .map(|item| item.trim().to_ascii_lowercase())
            .collect();
        if list == ["none"] {
            return Ok(false);
        }
        for item in &list {
            match item.as_str() {
                "tracecontext" | "baggage" => {}
                other if NOT_BUILT_IN.contains(&other) => {
                    if exporting {
                        return Err(ConfigError::new(
                            name,
                            "may hold tracecontext and baggage only (b3, b3multi, jaeger, xray \
                             and ottrace are not built in), or be none",
                        ));
                    }
                }
                _ => {
                    return Err(ConfigError::new(
                        name,
                        "must be a comma-separated list of tracecontext and baggage, or none",
                    ));
                }
            }
        }
        Ok(list.iter().any(|item| item == "tracecontext"))
    }

    /// An OTLP compression variable: `none` (what is done) or unset; `gzip` is not built in.
    pub(super) fn otlp_compression(&self, name: &str) -> Result<(), ConfigError> {
        match self.get_enum(name).as_deref() {
            None | Some("none") => Ok(()),
            Some(_) => Err(ConfigError::new(
                name,
                "must be none (compression is not built in)",
            )),
        }
    }

    /// An OTLP TLS file variable (a CA to trust, or a client certificate or key): not built in,
    /// so refused when set rather than silently ignored (the collector's certificate is checked
    /// against the system's roots; no client certificate is sent).
    pub(super) fn otlp_unsupported_file(&self, name: &str) -> Result<(), ConfigError> {
        match self.get_trimmed(name) {
            None => Ok(()),
            Some(_) => Err(ConfigError::new(
                name,
                "is not supported: the collector's certificate is checked against the system's \
                 roots and no client certificate is sent; unset it",
            )),
        }
    }

    /// `key=value,key2=value2` with percent-encoded values (the OpenTelemetry specification's
    /// format for its header and resource variables): each pair as `accept` keeps it (`None`
    /// refuses the variable with `rule`), a later key replacing an earlier one.
    fn percent_pairs<V>(
        &self,
        name: &str,
        rule: &str,
        accept: impl Fn(&str, String) -> Option<(String, V)>,
    ) -> Result<Vec<(String, V)>, ConfigError> {
        let Some(raw) = self.get(name) else {
            return Ok(Vec::new());
        };
        let rule = || ConfigError::new(name, rule);
        let mut pairs: Vec<(String, V)> = Vec::new();
        for pair in raw.split(',').filter(|pair| !pair.trim().is_empty()) {
            let (key, value) = pair.split_once('=').ok_or_else(rule)?;
            let value = percent_decode(value.trim()).ok_or_else(rule)?;
            let (key, value) = accept(key.trim(), value).ok_or_else(rule)?;
            pairs.retain(|(existing, _)| *existing != key);
            pairs.push((key, value));
        }
        Ok(pairs)
    }

    /// OTLP request headers: names are lowercased HTTP header names; values must be valid
    /// header values, and are secrets.
    pub(super) fn otlp_headers(
        &self,
        name: &str,
    ) -> Result<Vec<(String, SecretString)>, ConfigError> {
        self.percent_pairs(
            name,
            "must be comma-separated name=value pairs with header names and percent-encoded values",
            |key, value| {
                let key = key.to_ascii_lowercase();
                let valid = axum::http::HeaderName::from_bytes(key.as_bytes()).is_ok()
                    && axum::http::HeaderValue::from_str(&value).is_ok();
                valid.then(|| (key, SecretString::from(value)))
            },
        )
    }

    /// `OTEL_RESOURCE_ATTRIBUTES`: keys of printable ASCII.
    pub(super) fn resource_attributes(
        &self,
        name: &str,
    ) -> Result<Vec<(String, String)>, ConfigError> {
        self.percent_pairs(
            name,
            "must be comma-separated key=value pairs with percent-encoded values",
            |key, value| {
                let valid = !key.is_empty() && key.bytes().all(|b| b.is_ascii_graphic());
                valid.then(|| (key.to_owned(), value))
            },
        )
    }

    /// `OTEL_TRACES_SAMPLER`; the specification's samplers that are not built in (Jaeger's
    /// remote one, X-Ray's) are refused only when `exporting` (the default stands for them
    /// otherwise: nothing samples).
    pub(super) fn sampler(
        &self,
        name: &str,
        arg_name: &str,
        exporting: bool,
    ) -> Result<TraceSampler, ConfigError> {
        let ratio = || -> Result<f64, ConfigError> {
            let Some(raw) = self.get_trimmed(arg_name) else {
                return Ok(1.0);
            };
            raw.parse::<f64>()
                .ok()
                .filter(|ratio| (0.0..=1.0).contains(ratio))
                .ok_or_else(|| ConfigError::new(arg_name, "must be a number from 0 to 1"))
        };
        match self.get_enum(name).as_deref() {
            None | Some("parentbased_always_on") => Ok(TraceSampler::ParentBasedAlwaysOn),
            Some("always_on") => Ok(TraceSampler::AlwaysOn),
            Some("always_off") => Ok(TraceSampler::AlwaysOff),
            Some("traceidratio") => Ok(TraceSampler::TraceIdRatio(ratio()?)),
            Some("parentbased_always_off") => Ok(TraceSampler::ParentBasedAlwaysOff),
            Some("parentbased_traceidratio") => Ok(TraceSampler::ParentBasedTraceIdRatio(ratio()?)),
            Some("jaeger_remote" | "parentbased_jaeger_remote" | "xray") if !exporting => {
                Ok(TraceSampler::ParentBasedAlwaysOn)
            }
            Some(_) => Err(ConfigError::new(
                name,
                "must be always_on, always_off, traceidratio, parentbased_always_on, \
                 parentbased_always_off or parentbased_traceidratio (jaeger_remote, \
                 parentbased_jaeger_remote and xray are not built in)",
            )),
        }
    }

    pub(super) fn number<T>(
        &self,
        name: &str,
        default: T,
        range: RangeInclusive<T>,
    ) -> Result<T, ConfigError>
    where
        T: FromStr + PartialOrd + std::fmt::Display + Copy,
    {
        let Some(raw) = self.get(name) else {
            return Ok(default);
        };
        let rule = || {
            ConfigError::new(
                name,
                format!(
                    "must be a whole number from {} to {}",
                    range.start(),
                    range.end()
                ),
            )
        };
        let value: T = raw.trim().parse().map_err(|_| rule())?;
        if range.contains(&value) {
            Ok(value)
        } else {
            Err(rule())
        }
    }

    pub(super) fn seconds(
        &self,
        name: &str,
        default: u64,
        range: RangeInclusive<u64>,
    ) -> Result<Duration, ConfigError> {
        self.number(name, default, range).map(Duration::from_secs)
    }

    pub(super) fn ip(&self, name: &str) -> Result<Option<IpAddr>, ConfigError> {
        self.get(name)
            .map(|raw| {
                raw.trim()
                    .parse()
                    .map_err(|_| ConfigError::new(name, "must be an IPv4 or IPv6 address"))
            })
            .transpose()
    }

    /// A file path; whether the file exists is for the command that reads it to say.
    pub(super) fn path(&self, name: &str) -> Option<PathBuf> {
        self.get(name).map(|raw| PathBuf::from(raw.trim()))
    }

    pub(super) fn url(&self, name: &str, rule: UrlRule) -> Result<Option<Url>, ConfigError> {
        let Some(raw) = self.get(name) else {
            return Ok(None);
        };
        let url = Url::parse(raw.trim())
            .ok()
            .filter(|url| url.host_str().is_some_and(|host| !host.is_empty()))
            .ok_or_else(|| ConfigError::new(name, "must be an absolute http(s) URL"))?;
        if url.password().is_some() || !url.username().is_empty() {
            return Err(ConfigError::new(name, "must not carry credentials"));
        }
        match (url.scheme(), rule) {
            ("https", _) => Ok(Some(url)),
            ("http", UrlRule::Http) => Ok(Some(url)),
            ("http", UrlRule::HttpsOrLoopback) if crate::outbound::is_loopback(&url) => {
                Ok(Some(url))
            }
            ("http", UrlRule::HttpsOrLoopback) => Err(ConfigError::new(
                name,
                "must use https:// (http:// is allowed on loopback only)",
            )),
            _ => Err(ConfigError::new(name, "must be an absolute http(s) URL")),
        }
    }

    /// An http(s) URL that paths are appended to (`PUBLIC_URL` gets the status callback's,
    /// `SUPABASE_URL` the issuer's and the JWKS's): a query or a fragment, even an empty one,
    /// would swallow the path.
    pub(super) fn base_url(&self, name: &str, rule: UrlRule) -> Result<Option<Url>, ConfigError> {
        let url = self.url(name, rule)?;
        if url
            .as_ref()
            .is_some_and(|url| url.query().is_some() || url.fragment().is_some())
        {
            return Err(ConfigError::new(
                name,
                "must be a base URL without a query or fragment (no ? or #)",
            ));
        }
        Ok(url)
    }

    /// A comma-separated list; blank items are dropped, and a list with none left is an error.
    pub(super) fn list(&self, name: &str) -> Result<Option<Vec<String>>, ConfigError> {
        let Some(raw) = self.get(name) else {
            return Ok(None);
        };
        let items: Vec<String> = raw
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(str::to_owned)
            .collect();
        if items.is_empty() {
            return Err(ConfigError::new(
                name,
                "must be a comma-separated list with at least one item",
            ));
        }
        Ok(Some(items))
    }

    pub(super) fn secret(&self, name: &str) -> Result<Option<SecretString>, ConfigError> {
        Ok(self.get(name).map(|raw| SecretString::from(raw.trim())))
    }

    pub(super) fn legacy_secret(&self, name: &str) -> Result<Option<SecretString>, ConfigError> {
        match self.get(name) {
            Some(raw) if raw.trim().len() < MIN_HMAC_KEY_BYTES => Err(ConfigError::new(
                name,
                format!("must be at least {MIN_HMAC_KEY_BYTES} bytes long"),
            )),
            Some(raw) => Ok(Some(SecretString::from(raw.trim()))),
            None => Ok(None),
        }
    }

    pub(super) fn secret_with_prefix(
        &self,
        name: &str,
        prefixes: &[&str],
    ) -> Result<Option<SecretString>, ConfigError> {
        let Some(raw) = self.get(name) else {
            return Ok(None);
        };
        let raw = raw.trim();
        if !prefixes
            .iter()
            .any(|prefix| raw.starts_with(prefix) && raw.len() > prefix.len())
        {
            return Err(ConfigError::new(
                name,
                format!("must start with {}", prefixes.join(", ")),
            ));
        }
        Ok(Some(SecretString::from(raw)))
    }

    pub(super) fn secret_list_with_prefix(
        &self,
        name: &str,
        prefix: &str,
    ) -> Result<Vec<SecretString>, ConfigError> {
        let Some(items) = self.list(name)? else {
            return Ok(Vec::new());
        };
        items
            .into_iter()
            .map(|item| {
                if item.starts_with(prefix) && item.len() > prefix.len() {
                    Ok(SecretString::from(item))
                } else {
                    Err(ConfigError::new(
                        name,
                        format!("must be a comma-separated list of {prefix}… secrets"),
                    ))
                }
            })
            .collect()
    }

    /// A Twilio SID: the two-letter prefix then 32 hexadecimal digits.
    pub(super) fn sid(&self, name: &str, prefix: &str) -> Result<Option<String>, ConfigError> {
        let Some(raw) = self.get(name) else {
            return Ok(None);
        };
        let raw = raw.trim();
        let valid = raw.len() == prefix.len() + 32
            && raw.starts_with(prefix)
            && raw[prefix.len()..].bytes().all(|b| b.is_ascii_hexdigit());
        if !valid {
            return Err(ConfigError::new(
                name,
                format!("must be {prefix} followed by 32 hexadecimal digits"),
            ));
        }
        Ok(Some(raw.to_owned()))
    }

    pub(super) fn e164(&self, name: &str) -> Result<Option<String>, ConfigError> {
        let Some(raw) = self.get(name) else {
            return Ok(None);
        };
        let raw = raw.trim();
        if !is_e164(raw) {
            return Err(ConfigError::new(
                name,
                "must be an E.164 number: + then 2 to 15 digits, the first not 0",
            ));
        }
        Ok(Some(raw.to_owned()))
    }

    pub(super) fn e164_prefixes(&self, name: &str) -> Result<Vec<String>, ConfigError> {
        let Some(items) = self.list(name)? else {
            return Ok(Vec::new());
        };
        for item in &items {
            let digits = item.strip_prefix('+').unwrap_or_default();
            let valid = (1..=15).contains(&digits.len())
                && digits.bytes().all(|b| b.is_ascii_digit())
                && !digits.starts_with('0');
            if !valid {
                return Err(ConfigError::new(
                    name,
                    "must be comma-separated E.164 prefixes such as +1,+44",
                ));
            }
        }
        Ok(items)
    }

    pub(super) fn jwks(&self, name: &str) -> Result<Vec<Redacted<serde_json::Value>>, ConfigError> {
        let Some(raw) = self.get(name) else {
            return Ok(Vec::new());
        };
        let rule = || {
            ConfigError::new(
                name,
                "must be JSON: {\"keys\":[…]} or an array of JWK objects",
            )
        };
        let checked = crate::auth::json::from_slice_checked(raw.as_bytes()).map_err(|_| rule())?;
        // RFC 7517 §4 rejects a JWK with a member name twice. A fetched key with one is dropped
        // alone; the inline set is the operator's own, so the mistake stops start-up.
        // Named only when it is one of the JWK's own members: any other name is the value's.
        if let Some(member) = checked.duplicate {
            let said = if JWK_MEMBERS.contains(&member.as_str()) {
                format!("`{member}`")
            } else {
                "a member".to_owned()
            };
            return Err(ConfigError::new(
                name,
                format!(
                    "must not hold a member name twice in one JSON object (RFC 7517 §4), as it \
                     does {said}"
                ),
            ));
        }
        let keys = match checked.value {
            serde_json::Value::Array(keys) => keys,
            serde_json::Value::Object(mut object) => match object.remove("keys") {
                Some(serde_json::Value::Array(keys)) => keys,
                _ => return Err(rule()),
            },
            _ => return Err(rule()),
        };
        if keys
            .iter()
            .any(|key| !key.get("kty").is_some_and(serde_json::Value::is_string))
        {
            return Err(ConfigError::new(
                name,
                "must hold JWK objects, each with a \"kty\" string",
            ));
        }
        // An inline `oct` key is an HS256 secret: it gets the legacy secret's minimum length.
        if keys.iter().any(is_short_oct_key) {
            return Err(ConfigError::new(
                name,
                format!(
                    "must not hold an oct key shorter than {MIN_HMAC_KEY_BYTES} bytes \
                     (the minimum of SUPABASE_JWT_SECRET)"
                ),
            ));
        }
        // The key ring drops a key it cannot use and warns; a set it drops whole verifies
        // nothing, yet the ring it leaves is ready, so that is a configuration error. The
        // message gives the ring's own reason for the first key: a rule, never a value.
        let parsed = crate::auth::keys::parse_inline_keys(&keys);
        if parsed.keys.is_empty()
            && parsed.legacy.is_empty()
            && let Some(first) = parsed.dropped.first()
        {
            let dropped = match parsed.dropped.len() {
                1 => format!("its one key would be dropped: {}", first.reason),
                count => format!(
                    "all {count} of its keys would be dropped (the first: {})",
                    first.reason
                ),
            };
            return Err(ConfigError::new(
                name,
                format!("holds no usable key: {dropped}"),
            ));
        }
        Ok(keys.into_iter().map(Redacted).collect())
    }

    /// `NAME_KEYS` (a JSON map of name to key) merged with the singular `NAME_KEY` as "default".
    /// A key longer than a request's `apikey` may be is refused: it would be taken here and
    /// then refused on every request.
    pub(super) fn api_keys(
        &self,
        map_name: &str,
        single_name: &str,
        prefix: &str,
    ) -> Result<BTreeMap<String, SecretString>, ConfigError> {
        let mut keys = BTreeMap::new();
        if let Some(raw) = self.get(map_name) {
            let rule = || {
                ConfigError::new(
                    map_name,
                    format!("must be a JSON object of names to {prefix}… keys"),
                )
            };
            let map: BTreeMap<String, String> = serde_json::from_str(&raw).map_err(|_| rule())?;
            if map.is_empty() {
                return Err(rule());
            }
            for (name, key) in map {
                if name.trim().is_empty() || !key.starts_with(prefix) || key.len() <= prefix.len() {
                    return Err(rule());
                }
                if key.len() > MAX_API_KEY_BYTES {
                    return Err(ConfigError::new(
                        map_name,
                        format!("has a key, {name:?}, {}", too_long_for_a_request()),
                    ));
                }
                keys.insert(name, SecretString::from(key));
            }
        }
        if let Some(key) = self.secret_with_prefix(single_name, &[prefix])? {
            if key.expose_secret().len() > MAX_API_KEY_BYTES {
                return Err(ConfigError::new(
                    single_name,
                    format!("is {}", too_long_for_a_request()),
                ));
            }
            if keys.contains_key("default") {
                return Err(ConfigError::new(
                    single_name,
                    format!("conflicts with the \"default\" entry of {map_name}"),
                ));
            }
            keys.insert("default".to_owned(), key);
        }
        Ok(keys)
    }

    pub(super) fn database_url(&self, name: &str) -> Result<DatabaseUrl, ConfigError> {
        let raw = self
            .get(name)
            .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
        let raw = raw.trim();
        let is_sqlite = raw.starts_with("sqlite:") && raw.len() > "sqlite:".len();
        let is_postgres = (raw.starts_with("postgres://") || raw.starts_with("postgresql://"))
            && Url::parse(raw).is_ok_and(|url| url.host_str().is_some_and(|h| !h.is_empty()));
        if !is_sqlite && !is_postgres {
            return Err(ConfigError::new(
                name,
                "must be sqlite://PATH or postgres://USER@HOST/DB",
            ));
        }
        // The driver's own reading, as the store will connect with it (the value is not
        // shown: it may hold a password).
        let sqlite = is_sqlite.then(|| sqlx::sqlite::SqliteConnectOptions::from_str(raw));
        let usable = match &sqlite {
            Some(options) => options.is_ok(),
            None => sqlx::postgres::PgConnectOptions::from_str(raw).is_ok(),
        };
        if !usable {
            return Err(ConfigError::new(
                name,
                "has a parameter the database driver does not accept (such as sslmode or mode)",
            ));
        }
        // No path (`sqlite://`, `sqlite://?mode=memory`): SQLite gives each connection its own
        // anonymous database, so the migrations run on one and every other query finds no
        // tables. `sqlite::memory:` is named, and shared by the pool's connections.
        if let Some(Ok(options)) = &sqlite
            && options.get_filename().as_os_str().is_empty()
        {
            return Err(ConfigError::new(
                name,
                "must name a file after sqlite:// (or be sqlite::memory: for a database that \
                 lasts as long as the process)",
            ));
        }
        Ok(DatabaseUrl(SecretString::from(raw)))
    }

    pub(super) fn cors_origins(&self, name: &str) -> Result<CorsOrigins, ConfigError> {
        let Some(items) = self.list(name)? else {
            return Ok(CorsOrigins::Any);
        };
        if items.iter().any(|item| item == "*") {
            if items.len() > 1 {
                return Err(ConfigError::new(
                    name,
                    "must be * alone or a list of origins",
                ));
            }
            return Ok(CorsOrigins::Any);
        }
        let mut origins = Vec::with_capacity(items.len());
        for item in &items {
            let origin = Url::parse(item).ok().filter(|url| {
                matches!(url.scheme(), "http" | "https")
                    && url.host_str().is_some()
                    && url.username().is_empty()
                    && url.password().is_none()
                    && url.path() == "/"
                    && !item.ends_with('/')
                    && url.query().is_none()
                    && url.fragment().is_none()
            });
            let Some(origin) = origin else {
                return Err(ConfigError::new(
                    name,
                    "must be * or comma-separated origins like https://app.example.com",
                ));
            };
            // The URL parser takes `*` and `_` in a host name, but a browser's `Origin` holds a
            // real host, compared byte for byte: `https://*.example.com` would never match.
            if let Some(url::Host::Domain(host)) = origin.host()
                && !host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                return Err(ConfigError::new(
                    name,
                    "must name exact hosts: letters, digits, - and . only (no wildcard)",
                ));
            }
            // As a browser writes it in `Origin`, which is compared byte for byte: the scheme
            // and host in lower case, the host in ASCII (punycode), no default port.
            origins.push(origin.origin().ascii_serialization());
        }
        Ok(CorsOrigins::List(origins))
    }

    /// Comma-separated HTTP header names (RFC 9110 tokens), lowercased. `*` is refused: in
    /// `Access-Control-Allow-Headers` it would mean "any header", not a name.
    pub(super) fn header_names(&self, name: &str) -> Result<Vec<String>, ConfigError> {
        let Some(items) = self.list(name)? else {
            return Ok(Vec::new());
        };
        let is_token_char = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'+-.^_`|~".contains(&b);
        if items.iter().any(|item| !item.bytes().all(is_token_char)) {
            return Err(ConfigError::new(
                name,
                "must be comma-separated header names such as x-custom-header",
            ));
        }
        Ok(items
            .into_iter()
            .map(|item| item.to_ascii_lowercase())
            .collect())
    }

    pub(super) fn log_format(&self, name: &str) -> Result<LogFormat, ConfigError> {
        match self.get(name).as_deref().map(str::trim) {
            None | Some("pretty") => Ok(LogFormat::Pretty),
            Some("json") => Ok(LogFormat::Json),
            Some(_) => Err(ConfigError::new(name, "must be pretty or json")),
        }
    }

    pub(super) fn log_filter(&self, name: &str) -> Result<String, ConfigError> {
        let filter = self.get(name).unwrap_or_else(|| "info".to_owned());
        // tracing-subscriber splits at commas, then scans each directive trimmed but slices it
        // untrimmed: a blank before a multi-byte character panics (found by fuzzing). Trimmed
        // directives mean the same and are read safely.
        let filter = filter
            .split(',')
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(",");
        // Before tracing-subscriber builds the patterns, with no bound of its own.
        if !field_patterns_fit(&filter) {
            return Err(ConfigError::new(
                name,
                "has a field value pattern too large to match (over 1 MiB as an automaton, or \
                 4 MiB all together): write a shorter or simpler one",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&filter)
            .map_err(|_| ConfigError::new(name, "must be a valid tracing filter such as info"))?;
        // A bare word that is no level is a target to tracing-subscriber, kept at every level
        // while every other target is silenced: `warning` hid every line, errors included.
        if filter.split(',').any(is_misspelt_level) {
            return Err(ConfigError::new(
                name,
                "has a word that is no level but looks like a misspelt one: the levels are \
                 trace, debug, info, warn, error and off (a target named so is written \
                 target=level)",
            ));
        }
        Ok(filter)
    }
}

/// Whether a directive of `RUST_LOG` is a bare word (no `=`, `::` nor span `[`) that is no
/// level but likely meant one: a word for a level that tracing does not know (`warning`,
/// `fatal`, `verbose`…), or one within an edit of a level (two for words of four letters or
/// more: `inf`, `eror`, `debg`). Target names (`edgegate`, `hyper`, `sqlx`) are none of these.
fn is_misspelt_level(directive: &str) -> bool {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    const NOT_LEVELS: [&str; 11] = [
        "warning",
        "warnings",
        "err",
        "fatal",
        "crit",
        "critical",
        "notice",
        "information",
        "verbose",
        "all",
        "none",
    ];
    if directive.is_empty() || directive.contains(['=', '[', ':']) {
        return false;
    }
    let word = directive.to_ascii_lowercase();
    if LEVELS.contains(&word.as_str())
        || word.parse::<tracing::level_filters::LevelFilter>().is_ok()
    {
        return false;
    }
    let near = if word.chars().count() <= 3 { 1 } else { 2 };
    NOT_LEVELS.contains(&word.as_str())
        || LEVELS
            .iter()
            .any(|level| edit_distance(&word, level) <= near)
}

/// The Levenshtein distance between `a` and `b`, in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// The most memory one field value pattern of `RUST_LOG` may take as an automaton, and all of
/// them together.
const LOG_PATTERN_BYTES: usize = 1 << 20;
const LOG_PATTERNS_BYTES: usize = 4 << 20;

/// Whether every field value pattern of `filter` (`target[span{field=pattern}]=level`) fits
/// [`LOG_PATTERN_BYTES`], and all of them [`LOG_PATTERNS_BYTES`].
///
/// tracing-subscriber builds each pattern into a dense DFA with no bound, and a DFA can be
/// exponentially larger than its pattern: `[a-z]*a` followed by 19 `[a-z]`, 108 bytes of
/// `RUST_LOG`, took 6.7 s and 403 MiB, one `[a-z]` more twice that (found by the `config` fuzz
/// target), and start-up would hang on it. Each pattern is built here first with bounds, as
/// tracing-subscriber builds it (regex-automata's dense DFA, default settings).
///
/// tracing-subscriber splits the filter at commas, and takes a field's pattern from after the
/// field's first `=` up to its next `=` or the `}` that ends the field. The texts checked here
/// are a superset: after every `=`, up to the next `=`, `}` or the directive's end. One that is
/// not a regular expression at all is left to tracing-subscriber, which builds no DFA for it.
fn field_patterns_fit(filter: &str) -> bool {
    use regex_automata::dfa::dense;
    use regex_automata::nfa::thompson;

    let mut budget = LOG_PATTERNS_BYTES;
    for directive in filter.split(',') {
        let mut rest = directive;
        while let Some(at) = rest.find('=') {
            rest = &rest[at + 1..];
            let text = &rest[..rest.find(['=', '}']).unwrap_or(rest.len())];
            if regex_automata::util::syntax::parse(text).is_err() {
                continue;
            }
            let limit = Some(LOG_PATTERN_BYTES.min(budget));
            let built = dense::Builder::new()
                .configure(
                    dense::Config::new()
                        .determinize_size_limit(limit)
                        .dfa_size_limit(limit),
                )
                .thompson(thompson::Config::new().nfa_size_limit(limit))
                .build(text);
            match built {
                Ok(dfa) => budget = budget.saturating_sub(dfa.memory_usage()),
                Err(_) => return false,
            }
        }
    }
    true
}

/// The shortest HS256 secret taken, from `SUPABASE_JWT_SECRET` or an inline `oct` JWK.
pub const MIN_HMAC_KEY_BYTES: usize = 32;

/// An `oct` JWK whose `k` decodes to fewer than [`MIN_HMAC_KEY_BYTES`]. A `k` that is not
/// base64url at all is left to the key ring, which drops the key with its reason.
fn is_short_oct_key(jwk: &serde_json::Value) -> bool {
    use base64::Engine as _;
    jwk.get("kty").and_then(serde_json::Value::as_str) == Some("oct")
        && jwk
            .get("k")
            .and_then(serde_json::Value::as_str)
            .and_then(|k| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(k)
                    .ok()
            })
            .is_some_and(|k| k.len() < MIN_HMAC_KEY_BYTES)
}

/// `+` then 2 to 15 digits, the first not 0 (ITU-T E.164).
pub fn is_e164(number: &str) -> bool {
    number.strip_prefix('+').is_some_and(|digits| {
        (2..=15).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0')
    })
}

/// `%XX` escapes decoded; `None` for a broken escape or bytes that are not UTF-8.
fn percent_decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `base` with `path` appended below its own path (a base of `https://x.co/sub` keeps `/sub`).
pub(super) fn join_path(base: &Url, path: &str) -> Url {
    let mut url = base.clone();
    let joined = format!("{}/{}", base.path().trim_end_matches('/'), path);
    url.set_path(&joined);
    url
}

pub(super) fn static_url(url: &str) -> Url {
    Url::parse(url).expect("built-in URLs are valid")
}

/// Why an API key over [`MAX_API_KEY_BYTES`] is refused.
fn too_long_for_a_request() -> String {
    format!(
        "longer than {MAX_API_KEY_BYTES} bytes, the most a request's apikey header may hold: \
         no request could present it"
    )
}
