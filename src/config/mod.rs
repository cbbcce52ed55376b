//! Typed configuration, built once from the environment (and `.env`) and validated at start.
//!
//! Every variable of `CONTRACT.md` is read here, so a malformed value stops start-up before
//! anything listens. Errors name the variable and the rule, never the value. No other module reads the environment.

mod parse;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use url::Url;

use parse::Vars;
pub use parse::{ConfigError, MIN_HMAC_KEY_BYTES, is_e164};

/// Where the service keeps its state when `DATABASE_URL` is not set.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://edgegate.db";
/// Listen port when `PORT` is not set.
pub const DEFAULT_PORT: u16 = 8080;
/// How long one Twilio call may take.
pub const DEFAULT_TWILIO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one SMS send may take from the request's arrival at its route (the credential check,
/// the body and the row's reservation included) to Twilio's last answer: with the answer's and
/// the audit row's writes after it, inside the route's 30 s (`twilio::send` checks the sum).
pub const DEFAULT_SMS_SEND_BUDGET: Duration = Duration::from_secs(18);
/// The first backoff after a throttled or unsent Twilio call.
pub const DEFAULT_TWILIO_RETRY_DELAY: Duration = Duration::from_millis(500);
/// How long in-flight requests may take to finish after SIGTERM before the process exits.
pub const DEFAULT_SHUTDOWN_DRAIN: Duration = Duration::from_secs(25);
/// `HTTP_HEADER_READ_TIMEOUT_SECONDS`, `HTTP_IDLE_TIMEOUT_SECONDS`, `HTTP_MAX_CONNECTIONS`.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// The whole configuration of the service.
#[derive(Debug, Clone)]
pub struct Config {
    pub host: IpAddr,
    pub port: u16,
    pub tls: Option<TlsFiles>,
    pub database_url: DatabaseUrl,
    pub shutdown_drain: Duration,
    pub connections: ConnectionLimits,
    pub cors_allowed_origins: CorsOrigins,
    /// Request headers a browser may send beyond the built-in list (lowercase).
    pub cors_allowed_headers: Vec<String>,
    pub log_format: LogFormat,
    pub log_filter: String,
    pub jwt: JwtConfig,
    pub api_keys: ApiKeys,
    pub stripe: StripeConfig,
    pub twilio: TwilioConfig,
    pub sms: SmsConfig,
    pub public_url: Option<Url>,
    /// OpenTelemetry trace export over OTLP; `None` when no OTLP endpoint is set (or it is off).
    pub traces: Option<TraceExport>,
}

/// PEM files for serving HTTPS directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What a client may hold of the server: time to send a request head, time idle between
/// requests, and how many connections at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// From accept (TLS handshake included) to a whole request head; also bounds each later
    /// head on a keep-alive connection, from its first byte.
    pub header_read_timeout: Duration,
    /// A keep-alive connection with no request in flight is closed after this.
    pub idle_timeout: Duration,
    /// Open connections at most; past it, new clients wait in the kernel backlog.
    pub max_connections: usize,
    /// Whether `HTTP_MAX_CONNECTIONS` was set: a default cap the open-file limit cannot hold is
    /// lowered to fit (`server::raise_file_limit`), a set one stops start-up.
    pub max_connections_set: bool,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_set: false,
        }
    }
}

/// `url` as it is shown (`check`, `/admin/signing-keys`, `keys report`, logs, `Debug`): without
/// its query and fragment, written `?…` and `#…`, since a key may be passed there
/// (`…/jwks.json?apikey=sb_secret_…`); a user and password are refused at start already.
pub fn shown_url(url: &Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.set_fragment(None);
    let mut shown = shown.to_string();
    if url.query().is_some() {
        shown.push_str("?…");
    }
    if url.fragment().is_some() {
        shown.push_str("#…");
    }
    shown
}

/// A database location. Its `Debug` hides the password a Postgres URL may hold.
#[derive(Clone)]
pub struct DatabaseUrl(SecretString);

impl DatabaseUrl {
    pub fn expose(&self) -> &str {
        secrecy::ExposeSecret::expose_secret(&self.0)
    }

    pub fn is_postgres(&self) -> bool {
        self.expose().starts_with("postgres://") || self.expose().starts_with("postgresql://")
    }

    /// The URL with any password replaced (in its user part, or a query parameter such as
    /// `?password=`, which the PostgreSQL driver accepts too), for logs and `check` output.
    pub fn redacted(&self) -> String {
        let Ok(mut url) = Url::parse(self.expose()) else {
            return "(a URL that does not parse)".to_owned();
        };
        if url.password().is_some() {
            let _ = url.set_password(Some("REDACTED"));
        }
        let secret_key = |key: &str| key.to_ascii_lowercase().contains("password");
        if url.query_pairs().any(|(key, _)| secret_key(&key)) {
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(key, value)| {
                    let value = if secret_key(&key) {
                        "REDACTED".into()
                    } else {
                        value
                    };
                    (key.into_owned(), value.into_owned())
                })
                .collect();
            url.query_pairs_mut().clear().extend_pairs(pairs);
        }
        url.to_string()
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigins {
    Any,
    List(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Everything the credential layer needs. Its `Debug` shows `jwks_url` without its query.
#[derive(Clone)]
pub struct JwtConfig {
    pub supabase_url: Option<Url>,
    pub jwks_url: Option<Url>,
    /// Entries of `SUPABASE_JWKS`, kept as JSON; the key ring decides what each one is.
    pub inline_jwks: Vec<Redacted<serde_json::Value>>,
    pub legacy_secret: Option<SecretString>,
    /// `None` means `iss` is not checked (neither `JWT_ISSUERS` nor `SUPABASE_URL` set).
    pub issuers: Option<Vec<String>>,
    pub audiences: Vec<String>,
    pub leeway: Duration,
    pub jwks_cache_ttl: Duration,
    pub jwks_min_refresh: Duration,
    /// How long the legacy secret must go unused before revoking it is called safe.
    pub legacy_revocation_window: Duration,
}

impl fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtConfig")
            .field("supabase_url", &self.supabase_url.as_ref().map(shown_url))
            .field("jwks_url", &self.jwks_url.as_ref().map(shown_url))
            .field("inline_jwks", &self.inline_jwks)
            .field("legacy_secret", &self.legacy_secret)
            .field("issuers", &self.issuers)
            .field("audiences", &self.audiences)
            .field("leeway", &self.leeway)
            .field("jwks_cache_ttl", &self.jwks_cache_ttl)
            .field("jwks_min_refresh", &self.jwks_min_refresh)
            .field("legacy_revocation_window", &self.legacy_revocation_window)
            .finish()
    }
}

impl JwtConfig {
    /// `${SUPABASE_URL}/auth/v1`, the `iss` of the project's Supabase Auth tokens.
    pub fn auth_issuer(&self) -> Option<String> {
        self.supabase_url.as_ref().map(auth_issuer)
    }

    /// The project ref, `<ref>` of `https://<ref>.supabase.co`, when `SUPABASE_URL` is one.
    pub fn project_ref(&self) -> Option<&str> {
        let host = self.supabase_url.as_ref()?.host_str()?;
        let project_ref = host.strip_suffix(".supabase.co")?;
        (!project_ref.is_empty() && !project_ref.contains('.')).then_some(project_ref)
    }
}

fn auth_issuer(supabase_url: &Url) -> String {
    parse::join_path(supabase_url, "auth/v1")
        .as_str()
        .trim_end_matches('/')
        .to_owned()
}

/// The new opaque Supabase API keys, by name.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    pub secret: BTreeMap<String, SecretString>,
    pub publishable: BTreeMap<String, SecretString>,
}

/// The OTLP settings. Every variable is checked even when no endpoint is set, so a typo shows at
/// start and not on the day export is turned on; features not built in are refused only where
/// export is on.
fn trace_export<F: Fn(&str) -> Option<String>>(
    vars: &Vars<F>,
) -> Result<Option<TraceExport>, ConfigError> {
    let base = vars.url("OTEL_EXPORTER_OTLP_ENDPOINT", parse::UrlRule::Http)?;
    let traces = vars.url("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", parse::UrlRule::Http)?;
    let sdk_disabled = vars.boolean("OTEL_SDK_DISABLED")?;
    let disabled = vars.traces_exporter("OTEL_TRACES_EXPORTER", sdk_disabled)? || sdk_disabled;
    // Features not built in stop start-up only where spans would be exported without them: a
    // platform that sets them for every service (an OpenTelemetry operator, a shared env file)
    // must not stop an instance that exports nothing.
    let exporting = !disabled && (traces.is_some() || base.is_some());
    vars.otlp_protocol("OTEL_EXPORTER_OTLP_PROTOCOL", exporting)?;
    vars.otlp_protocol("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", exporting)?;
    // The signal's own headers win over the shared ones of the same name.
    let mut headers = vars.otlp_headers("OTEL_EXPORTER_OTLP_HEADERS")?;
    for (name, value) in vars.otlp_headers("OTEL_EXPORTER_OTLP_TRACES_HEADERS")? {
        headers.retain(|(existing, _)| *existing != name);
        headers.push((name, value));
    }
    let mut resource_attributes = vars.resource_attributes("OTEL_RESOURCE_ATTRIBUTES")?;
    // OTEL_SERVICE_NAME wins over a service.name among the attributes, which wins over ours.
    let named = resource_attributes
        .iter()
        .position(|(key, _)| key == "service.name")
        .map(|at| resource_attributes.remove(at).1);
    let service_name = vars
        .get_trimmed("OTEL_SERVICE_NAME")
        .or(named)
        .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned());
    let sampler = vars.sampler("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", exporting)?;
    vars.propagators("OTEL_PROPAGATORS", false)?;
    let max_queue_size = vars.number("OTEL_BSP_MAX_QUEUE_SIZE", 2_048, 1..=1_000_000)?;
    let max_export_batch_size = vars.number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512, 1..=100_000)?;
    let schedule_delay = vars.number("OTEL_BSP_SCHEDULE_DELAY", 5_000, 1..=600_000)?;
    let timeout = vars.number("OTEL_EXPORTER_OTLP_TIMEOUT", 10_000, 1..=600_000)?;
    let timeout = vars.number("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", timeout, 1..=600_000)?;
    let endpoint = match (traces, base) {
        (Some(traces), _) if exporting => traces,
        (None, Some(base)) if exporting => parse::join_path(&base, "v1/traces"),
        _ => return Ok(None),
    };
    let trace_context = vars.propagators("OTEL_PROPAGATORS", true)?;
    vars.otlp_compression("OTEL_EXPORTER_OTLP_COMPRESSION")?;
    vars.otlp_compression("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION")?;
    for name in [
        "OTEL_EXPORTER_OTLP_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_CLIENT_KEY",
        "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
    ] {
        vars.otlp_unsupported_file(name)?;
    }
    Ok(Some(TraceExport {
        endpoint,
        headers,
        service_name,
        resource_attributes,
        sampler,
        max_queue_size,
        // As the SDK does: a batch never exceeds the queue.
        max_export_batch_size: max_export_batch_size.min(max_queue_size),
        schedule_delay: Duration::from_millis(schedule_delay),
        export_timeout: Duration::from_millis(timeout),
        trace_context,
    }))
}

/// `OTEL_SERVICE_NAME` when unset.
pub const DEFAULT_SERVICE_NAME: &str = "edgegate";

/// `STRIPE_RECONCILE_INTERVAL_SECONDS` bounds, besides `0` (off): a minute to 25 days. A run's
/// default window reaches back to an hour before the previous run's start, which is the
/// interval plus up to a tenth of jitter (and the previous run's length) ago: 25 days keep that
/// (27.5 days and an hour) inside Stripe's 30-day event retention with two days to spare; a
/// longer interval would lose events for good.
const RECONCILE_INTERVAL_MIN: u64 = 60;
const RECONCILE_INTERVAL_MAX: u64 = 25 * 86_400;

#[derive(Debug, Clone)]
pub struct StripeConfig {
    pub secret_key: Option<SecretString>,
    pub webhook_secrets: Vec<SecretString>,
    pub api_base: Url,
    /// How often missed events are reconciled; `None` when off (`0`, or no secret key).
    pub reconcile_interval: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct TwilioConfig {
    pub account_sid: Option<String>,
    pub auth_token: Option<SecretString>,
    pub sender: Option<SmsSender>,
    pub api_base: Url,
    /// How long one call to Twilio may take. Not an environment variable: tests shorten it.
    pub request_timeout: Duration,
    /// The first pause before retrying a call Twilio throttled or never received; it doubles.
    pub retry_base_delay: Duration,
    /// How long one send may take from the request's arrival until Twilio's last answer; no call
    /// is started that could end after it. Not an environment variable: tests shorten it.
    pub send_budget: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SmsSender {
    From(String),
    MessagingService(String),
}

#[derive(Debug, Clone)]
pub struct SmsConfig {
    /// Empty means any E.164 number may be texted.
    pub allowed_prefixes: Vec<String>,
    pub max_per_recipient_per_hour: u32,
    pub max_per_minute: u32,
}

/// Where and how spans are exported: the standard `OTEL_*` variables, resolved.
#[derive(Debug, Clone)]
pub struct TraceExport {
    /// The full URL spans are POSTed to (`…/v1/traces` below `OTEL_EXPORTER_OTLP_ENDPOINT`, or
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as it is).
    pub endpoint: Url,
    /// Extra request headers, usually the collector's credentials: values are secrets.
    pub headers: Vec<(String, SecretString)>,
    pub service_name: String,
    /// `OTEL_RESOURCE_ATTRIBUTES`, but `service.name` (in `service_name`).
    pub resource_attributes: Vec<(String, String)>,
    pub sampler: TraceSampler,
    /// Ended spans waiting for export at most; past it, spans are dropped (and counted).
    pub max_queue_size: usize,
    pub max_export_batch_size: usize,
    /// How long a span waits at most before its batch is sent.
    pub schedule_delay: Duration,
    /// One export, retries included.
    pub export_timeout: Duration,
    /// W3C trace context is read from requests and written on outbound calls
    /// (`OTEL_PROPAGATORS` holds `tracecontext`, as by default); otherwise each request starts
    /// a trace of its own and outbound calls carry none.
    pub trace_context: bool,
}

/// `OTEL_TRACES_SAMPLER` with its argument (the ratio of the `traceidratio` samplers).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TraceSampler {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
    ParentBasedAlwaysOn,
    ParentBasedAlwaysOff,
    ParentBasedTraceIdRatio(f64),
}

/// Every variable of edgegate's own: the configuration's (docs/CONFIGURATION.md) and `keys
/// report`'s `EDGEGATE_SECRET_KEY`. A `.env` line that does not parse is named by the text before
/// its `=` only when that is one of these: the text can as well be a fragment of a pasted
/// secret.
pub(crate) const VARIABLES: &[&str] = &[
    "CORS_ALLOWED_HEADERS",
    "CORS_ALLOWED_ORIGINS",
    "DATABASE_URL",
    "EDGEGATE_SECRET_KEY",
    "HOST",
    "HTTP_HEADER_READ_TIMEOUT_SECONDS",
    "HTTP_IDLE_TIMEOUT_SECONDS",
    "HTTP_MAX_CONNECTIONS",
    "JWKS_CACHE_TTL_SECONDS",
    "JWKS_MIN_REFRESH_SECONDS",
    "JWT_AUDIENCES",
    "JWT_ISSUERS",
    "JWT_LEEWAY_SECONDS",
    "LEGACY_REVOCATION_WINDOW_SECONDS",
    "LOG_FORMAT",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_EXPORTER_OTLP_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_KEY",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
    "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_PROPAGATORS",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_SDK_DISABLED",
    "OTEL_SERVICE_NAME",
    "OTEL_TRACES_EXPORTER",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "PORT",
    "PUBLIC_URL",
    "RUST_LOG",
    "SHUTDOWN_DRAIN_SECONDS",
    "SMS_ALLOWED_PREFIXES",
    "SMS_MAX_PER_MINUTE",
    "SMS_MAX_PER_RECIPIENT_PER_HOUR",
    "STRIPE_API_BASE",
    "STRIPE_RECONCILE_INTERVAL_SECONDS",
    "STRIPE_SECRET_KEY",
    "STRIPE_WEBHOOK_SECRET",
    "SUPABASE_JWKS",
    "SUPABASE_JWKS_URL",
    "SUPABASE_JWT_SECRET",
    "SUPABASE_PUBLISHABLE_KEY",
    "SUPABASE_PUBLISHABLE_KEYS",
    "SUPABASE_SECRET_KEY",
    "SUPABASE_SECRET_KEYS",
    "SUPABASE_URL",
    "TLS_CERT_FILE",
    "TLS_KEY_FILE",
    "TWILIO_ACCOUNT_SID",
    "TWILIO_API_BASE",
    "TWILIO_AUTH_TOKEN",
    "TWILIO_FROM_NUMBER",
    "TWILIO_MESSAGING_SERVICE_SID",
];

/// The variable a `.env` line sets: the text before its `=` (after `export`), when it looks like
/// a name at all.
fn dotenv_name(line: &str) -> Option<&str> {
    let (name, _) = line
        .trim_start()
        .trim_start_matches("export ")
        .split_once('=')?;
    let name = name.trim();
    let plain = name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    (!name.is_empty() && name.len() <= 64 && plain).then_some(name)
}

/// A variable `.env` sets twice, with the numbers (from 1) of its first two lines. dotenvy keeps
/// the first value; a shell's `source`, docker compose and node's dotenv keep the last, so a file
/// written for one of them would run here with the other value. Lines inside a quoted value
/// are part of that value, not settings.
fn repeated_dotenv_variable(file: &str) -> Option<(&str, usize, usize)> {
    let file = file.strip_prefix('\u{feff}').unwrap_or(file);
    let mut open_quote = None;
    let mut first_lines = std::collections::HashMap::new();
    for (at, line) in file.lines().enumerate() {
        let starts_a_line = open_quote.is_none();
        open_quote = quote_open_after(line, open_quote);
        if !starts_a_line || line.trim_start().starts_with('#') {
            continue;
        }
        if let Some(name) = dotenv_name(line)
            && let Some(first) = first_lines.insert(name, at + 1)
        {
            return Some((name, first, at + 1));
        }
    }
    None
}

/// What is wrong with `.env`, in one line that gives the number of a line that does not parse
/// and the variable it sets, and never shows the line: its value may be a secret (dotenvy's own
/// message quotes it whole).
fn dotenv_error(err: &dotenvy::Error) -> ConfigError {
    // The name before `=` on a line, if it is a variable edgegate reads.
    let name_of = |line: &str| {
        dotenv_name(line)
            .filter(|name| VARIABLES.contains(name))
            .map(str::to_owned)
    };
    match err {
        dotenvy::Error::LineParse(text, _) => {
            let file = std::fs::read_to_string(".env").unwrap_or_default();
            let found = find_dotenv_line(&file, text);
            let name = match found {
                Some((_, line)) => name_of(line),
                None => name_of(text),
            };
            let rule = match (found.map(|(number, _)| number), name) {
                (Some(number), Some(name)) => {
                    format!("line {number}, the line of {name}, does not parse")
                }
                (Some(number), None) => format!("line {number} does not parse"),
                (None, Some(name)) => format!("the line of {name} does not parse"),
                (None, None) => "a line does not parse".to_owned(),
            };
            let why = found
                .and_then(|(number, _)| parse_failure(&file, number))
                .map(|why| format!(": {why}"))
                .unwrap_or_default();
            ConfigError::new(".env", format!("cannot be read: {rule} (not shown){why}"))
        }
        dotenvy::Error::Io(err) => {
            ConfigError::new(".env", format!("cannot be read: {}", err.kind()))
        }
        _ => ConfigError::new(".env", "cannot be read"),
    }
}

/// The number (from 1) and text of the line of `file` where the text dotenvy could not parse
/// starts. dotenvy gives the whole line (and the lines after it, when it leaves a quote open),
/// or only the value when the value is what breaks, but never a line number. The lines before
/// parsed, so the first line that starts with that text, or whose value does, is the one; a
/// line inside an earlier line's quoted value is none (its text is part of that value, perhaps
/// a secret's, and must not be taken for a variable's name).
fn find_dotenv_line<'f>(file: &'f str, text: &str) -> Option<(usize, &'f str)> {
    let start = text.lines().next()?.trim();
    if start.is_empty() {
        return None;
    }
    let file = file.strip_prefix('\u{feff}').unwrap_or(file);
    let mut open_quote = None;
    file.lines()
        .enumerate()
        .filter(|(_, line)| {
            let starts_a_line = open_quote.is_none();
            open_quote = quote_open_after(line, open_quote);
            starts_a_line
        })
        .filter(|(_, line)| !line.trim_start().starts_with('#'))
        .find(|(_, line)| {
            line.trim_start().starts_with(start)
                || line
                    .split_once('=')
                    .is_some_and(|(_, value)| value.trim_start().starts_with(start))
        })
        .map(|(at, line)| (at + 1, line))
}

/// A double quote, named: a double-quote character literal in this file would throw out the
/// tests that read its string literals (`tests/it/deploy.rs`) by splitting it at double quotes.
const DOUBLE: char = '\u{22}';

/// The quote a `.env` value left open at the end of `line` (a single or a double one), given
/// the one open before it: a value that starts with a quote runs to its closing one, across
/// lines; in double quotes a backslash escapes the next character, in single quotes nothing
/// does.
fn quote_open_after(line: &str, open: Option<char>) -> Option<char> {
    let rest = match open {
        Some(_) => line,
        None => {
            let (_, value) = line.split_once('=')?;
            if line.trim_start().starts_with('#') {
                return None;
            }
            let value = value.trim_start();
            let quote = value
                .chars()
                .next()
                .filter(|&c| matches!(c, DOUBLE | '\''))?;
            return quote_open_after(&value[1..], Some(quote));
        }
    };
    let quote = open?;
    let mut escaped = false;
    for c in rest.chars() {
        match c {
            '\\' if quote == DOUBLE && !escaped => escaped = true,
            c if c == quote && !escaped => return None,
            _ => escaped = false,
        }
    }
    Some(quote)
}

/// The logical lines of `.env` that set a variable: the number (from 1) of each one's first
/// line, that line, and its value as dotenvy reads it in (blanks after `=` left out, and the
/// lines a quoted value runs on over joined to it).
fn dotenv_entries(file: &str) -> Vec<(usize, &str, String)> {
    let file = file.strip_prefix('\u{feff}').unwrap_or(file);
    let mut entries: Vec<(usize, &str, String)> = Vec::new();
    let mut open_quote = None;
    for (at, line) in file.lines().enumerate() {
        let starts_a_line = open_quote.is_none();
        open_quote = quote_open_after(line, open_quote);
        if !starts_a_line {
            if let Some((_, _, value)) = entries.last_mut() {
                value.push('\n');
                value.push_str(line);
            }
            continue;
        }
        if line.trim_start().starts_with('#') {
            continue;
        }
        if let Some((_, value)) = line.split_once('=') {
            entries.push((at + 1, line, value.trim_start().to_owned()));
        }
    }
    entries
}

/// What, in a `.env` value, dotenvy would read otherwise than a shell's `source` does, or not
/// at all. The `$` rules are dotenvy 0.15's: a bare name runs over letters and digits only
/// (`$DB_PASSWORD` is `$DB` and `_PASSWORD`), the character after it is taken as plain text
/// (a closing quote too), a `$` before no name is dropped, and `${…}` is whatever it holds
/// taken as a name.
#[derive(Debug, PartialEq)]
enum ValueFault<'v> {
    /// A bare `$NAME` (the name as a shell reads it) that dotenvy ends elsewhere (`cut`), or
    /// after which it takes a quote, a backslash or a blank as plain text.
    BareName { name: &'v str, cut: bool },
    /// A `$` before no name (`$/`, `$$`, `$1`, `$` at the end), which dotenvy drops.
    Lone,
    /// A `${…}` holding more than a name (`${NAME:-default}`), which dotenvy reads as empty.
    NotAName,
    /// A quote, or `${`, not closed.
    Unclosed(char),
    /// A backslash before a character other than `\ ' " $`, a blank or `n`.
    Escape,
    /// A blank in an unquoted value, followed by more than a comment.
    Blank,
}

/// The first [`ValueFault`] of a `.env` value, as [`dotenv_entries`] gives it.
fn value_fault(value: &str) -> Option<ValueFault<'_>> {
    if value.starts_with('#') {
        return None;
    }
    let mut quote = None;
    let mut escaped = false;
    let mut resume_at = 0;
    for (at, c) in value.char_indices() {
        if at < resume_at {
            continue;
        }
        if escaped {
            if !matches!(c, '\\' | '\'' | DOUBLE | '$' | ' ' | 'n') {
                return Some(ValueFault::Escape);
            }
            escaped = false;
            continue;
        }
        match (quote, c) {
            (Some('\''), '\'') => quote = None,
            (Some('\''), _) => {}
            (_, '$') => match substitution_length(&value[at + 1..], quote.is_some()) {
                Ok(length) => resume_at = at + 1 + length,
                Err(fault) => return Some(fault),
            },
            (Some(_), DOUBLE) => quote = None,
            (_, '\\') => escaped = true,
            (None, DOUBLE | '\'') => quote = Some(c),
            (None, ' ' | '\t') => {
                let rest = value[at..].trim_start_matches([' ', '\t']);
                let comment_or_nothing = rest.is_empty() || rest.starts_with('#');
                return (!comment_or_nothing).then_some(ValueFault::Blank);
            }
            _ => {}
        }
    }
    quote.map(ValueFault::Unclosed)
}

/// The length of what follows a `$` that both dotenvy and a shell read as the same variable's
/// name (`NAME`, or `{NAME}`), or what is wrong with it. `quoted`: inside double quotes, where
/// a blank or a single quote after a name is plain text to a shell too.
fn substitution_length(rest: &str, quoted: bool) -> Result<usize, ValueFault<'_>> {
    if let Some(braced) = rest.strip_prefix('{') {
        let end = braced.find('}').ok_or(ValueFault::Unclosed('{'))?;
        return if shell_name_length(&braced[..end]) == end && end > 0 {
            Ok(end + 2)
        } else {
            Err(ValueFault::NotAName)
        };
    }
    let length = shell_name_length(rest);
    if length == 0 {
        return Err(ValueFault::Lone);
    }
    let dotenvy_length = rest
        .find(|c: char| !c.is_alphanumeric())
        .unwrap_or(rest.len());
    let after = &rest[length..];
    let plain_after = match after.chars().next() {
        Some(DOUBLE | '\\') => false,
        Some('\'') => quoted,
        // Unquoted, dotenvy cuts a line at a blank before `#` and drops its trailing blanks,
        // so blanks that only a comment or nothing follows are never read.
        Some(' ' | '\t') => {
            let tail = after.trim_start_matches([' ', '\t']);
            quoted || tail.is_empty() || tail.starts_with('#')
        }
        _ => true,
    };
    let cut = dotenvy_length != length;
    if cut || !plain_after {
        return Err(ValueFault::BareName {
            name: &rest[..length],
            cut,
        });
    }
    Ok(length)
}

/// The length of the variable name `text` starts with, by a shell's rule: an ASCII letter or
/// `_`, then letters, digits and `_`.
fn shell_name_length(text: &str) -> usize {
    if !text.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        return 0;
    }
    text.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(text.len())
}

/// Why line `number` of `.env` does not parse, in words, when it can be told.
fn parse_failure(file: &str, number: usize) -> Option<&'static str> {
    let Some((_, line, value)) = dotenv_entries(file)
        .into_iter()
        .find(|(at, _, _)| *at == number)
    else {
        return Some("it is not NAME=value");
    };
    // dotenvy's rule for a name: a letter or `_`, then letters, digits, `_` and `.`.
    let key = line
        .trim_start()
        .trim_start_matches("export ")
        .split_once('=')
        .map_or("", |(key, _)| key.trim());
    let is_key = key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if !is_key {
        return Some("the text before its = is not a variable name");
    }
    Some(match value_fault(&value)? {
        ValueFault::Unclosed('{') => "a ${ is not closed with }",
        ValueFault::Unclosed(_) => "a quote is not closed",
        ValueFault::Escape => {
            "a backslash comes before a character other than \\, ', \u{22}, $, a blank or n \
             (put the value in single quotes for a literal backslash)"
        }
        ValueFault::Blank => "an unquoted value holds a blank (quote the value)",
        _ => return None,
    })
}

/// A `$` in `.env` that dotenvy would read otherwise than a shell's `source` does, as the one
/// line that stops start-up: a password written `$DB_PASSWORD`, as the docs' comparison with
/// `source` allows, would otherwise be a wrong one, with nothing said. The line is given by
/// its number and its variable; the name after `$` is shown only when it is set: it could be a
/// fragment of a secret that holds a `$`. Lines of variables edgegate does not read, or that the
/// environment sets, are not its concern.
fn misread_substitution(file: &str) -> Option<ConfigError> {
    let entries = dotenv_entries(file);
    let is_set = |name: &str| {
        std::env::var_os(name).is_some()
            || entries
                .iter()
                .any(|(_, line, _)| dotenv_name(line) == Some(name))
    };
    entries.iter().find_map(|(number, line, value)| {
        // Only a line edgegate reads its value from: one of its variables that the environment
        // does not set already (the environment wins). A `.env` shared with other programs may
        // hold their lines, written for their readers.
        let name = dotenv_name(line)
            .filter(|name| VARIABLES.contains(name) && std::env::var_os(name).is_none())?;
        let place = format!("line {number}, the line of {name},");
        let rule = match value_fault(value)? {
            ValueFault::BareName { name, cut } => {
                let why = if cut {
                    "ends a bare name at the first character that is not a letter or digit, \
                     _ included"
                } else {
                    "takes a quote, backslash or blank right after a bare name as plain text"
                };
                if is_set(name) {
                    format!(
                        "{place} has ${name}, which edgegate would not read as a shell does \
                         (its .env reader {why}): write ${{{name}}}"
                    )
                } else {
                    format!(
                        "{place} has a $ before a name (not shown) that edgegate would not \
                         read as a shell does (its .env reader {why}): write ${{NAME}} for a \
                         variable, or put the value in single quotes for a literal $"
                    )
                }
            }
            ValueFault::Lone => format!(
                "{place} has a $ before no variable name, which edgegate's .env reader would \
                 drop: write \\$, or put the value in single quotes, for a literal $"
            ),
            ValueFault::NotAName => format!(
                "{place} has a ${{…}} that holds more than a variable name (a default, as in \
                 ${{NAME:-x}}), which edgegate's .env reader would read as empty: only \
                 ${{NAME}} is read; put the value in single quotes for a literal $"
            ),
            ValueFault::Unclosed(_) | ValueFault::Escape | ValueFault::Blank => return None,
        };
        Some(ConfigError::new(".env", rule))
    })
}

/// Adds the variables of `.env` in the working directory (if there is one; not from a folder
/// above it) to the process environment. A variable the environment already sets keeps its
/// value: the real environment wins. The CLI calls it before it parses its arguments, so an
/// option read from the environment (`EDGEGATE_SECRET_KEY`) finds `.env`'s value too.
///
/// Returns the names of the variables `.env` sets that the environment sets blank: blank reads
/// as unset, so `.env`'s value is hidden, a surprise worth a warning.
pub fn load_dotenv() -> Result<Vec<String>, ConfigError> {
    // A missing .env is normal; a malformed one is a configuration error.
    let file = match std::fs::read_to_string(".env") {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => {
            return Err(ConfigError::new(
                ".env",
                format!("cannot be read: {}", err.kind()),
            ));
        }
    };
    if let Some(err) = misread_substitution(&file) {
        return Err(err);
    }
    dotenvy::from_path(".env").map_err(|err| dotenv_error(&err))?;
    if let Some((name, first, second)) = repeated_dotenv_variable(&file) {
        // Named only when edgegate reads it: a pasted secret ending in `=` parses as a name.
        let what = if VARIABLES.contains(&name) {
            format!("sets {name} twice, on lines {first} and {second}")
        } else {
            format!("sets one name twice, on lines {first} and {second}")
        };
        return Err(ConfigError::new(
            ".env",
            format!(
                "{what}: keep one (edgegate would take the first value, a shell's source and \
                 docker compose the last)"
            ),
        ));
    }
    let blank = |value: &str| value.trim().is_empty();
    let hidden = dotenvy::from_path_iter(".env")
        .map_err(|err| dotenv_error(&err))?
        .filter_map(Result::ok)
        .filter(|(name, value)| {
            !blank(value) && std::env::var(name).is_ok_and(|in_environment| blank(&in_environment))
        })
        .map(|(name, _)| name)
        .collect();
    Ok(hidden)
}

/// `keys report --url`: a running edgegate's URL, by the rule of `SUPABASE_JWKS_URL`
/// (`https://`, or `http://` on loopback only): the `sb_secret_` key goes with the request.
pub fn report_url(text: &str) -> Result<Url, ConfigError> {
    const NAME: &str = "--url";
    let vars = Vars::new(|name: &str| (name == NAME).then(|| text.to_owned()));
    vars.url(NAME, parse::UrlRule::HttpsOrLoopback)?
        .ok_or_else(|| ConfigError::new(NAME, "must be an absolute http(s) URL"))
}

/// `keys report --url`'s key: `EDGEGATE_SECRET_KEY` from the environment (or `.env`, loaded
/// before), never a command-line flag, which `ps` and the shell's history would show.
pub fn report_secret_key() -> Option<SecretString> {
    std::env::var("EDGEGATE_SECRET_KEY")
        .ok()
        .filter(|value| !value.trim().is_empty())
        .map(SecretString::from)
}

/// A value that may hold secret material (an inline `oct` JWK does): `Debug` shows nothing of it.
#[derive(Clone)]
pub struct Redacted<T>(pub T);

impl<T> fmt::Debug for Redacted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl Config {
    /// `HOST` and `PORT` as the address to listen on; its `Display` writes an IPv6 host in
    /// brackets (`[::1]:24010`), as every line that shows it should.
    pub fn listen_address(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }

    /// Reads `.env` from the working directory (if any; not from a folder above it), then the
    /// process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        load_dotenv()?;
        Self::from_process_env()
    }

    /// The process environment alone (after [`load_dotenv`], `.env` is part of it).
    pub fn from_process_env() -> Result<Self, ConfigError> {
        Self::from_env_lookup(|name| std::env::var(name))
    }

    /// As [`Config::from_lookup`], from a source that can hold values that are not UTF-8 (the
    /// process environment): such a value is set but malformed, not unset.
    pub fn from_env_lookup(
        lookup: impl Fn(&str) -> Result<String, std::env::VarError>,
    ) -> Result<Self, ConfigError> {
        let not_unicode = std::cell::RefCell::new(None);
        let config = Self::from_lookup(|name| match lookup(name) {
            Ok(value) => Some(value),
            Err(std::env::VarError::NotPresent) => None,
            Err(std::env::VarError::NotUnicode(_)) => {
                not_unicode
                    .borrow_mut()
                    .get_or_insert_with(|| name.to_owned());
                None
            }
        });
        // Named first: read as unset, the value may have led to another error.
        match not_unicode.into_inner() {
            Some(name) => Err(ConfigError::new(&name, "must be valid UTF-8")),
            None => config,
        }
    }

    /// Builds the configuration from any source of variables (tests pass a map).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let vars = Vars::new(lookup);
        let supabase_url = vars.base_url("SUPABASE_URL", parse::UrlRule::HttpsOrLoopback)?;
        let jwks_url = match vars.url("SUPABASE_JWKS_URL", parse::UrlRule::HttpsOrLoopback)? {
            Some(url) => Some(url),
            None => supabase_url
                .as_ref()
                .map(|base| parse::join_path(base, "auth/v1/.well-known/jwks.json")),
        };
        let issuers = match vars.list("JWT_ISSUERS")? {
            Some(list) => Some(list),
            None => supabase_url
                .as_ref()
                .map(|base| vec![auth_issuer(base), "supabase".to_owned()]),
        };
        let jwks_cache_ttl = vars.seconds("JWKS_CACHE_TTL_SECONDS", 600, 30..=86_400)?;
        let jwks_min_refresh = vars.seconds("JWKS_MIN_REFRESH_SECONDS", 30, 1..=3_600)?;
        if jwks_min_refresh > jwks_cache_ttl {
            return Err(ConfigError::new(
                "JWKS_MIN_REFRESH_SECONDS",
                "must not exceed JWKS_CACHE_TTL_SECONDS",
            ));
        }
        let jwt = JwtConfig {
            supabase_url,
            jwks_url,
            inline_jwks: vars.jwks("SUPABASE_JWKS")?,
            legacy_secret: vars.legacy_secret("SUPABASE_JWT_SECRET")?,
            issuers,
            audiences: vars
                .list("JWT_AUDIENCES")?
                .unwrap_or_else(|| vec!["authenticated".to_owned()]),
            leeway: vars.seconds("JWT_LEEWAY_SECONDS", 30, 0..=300)?,
            jwks_cache_ttl,
            jwks_min_refresh,
            legacy_revocation_window: vars.seconds(
                "LEGACY_REVOCATION_WINDOW_SECONDS",
                86_400,
                1..=30 * 86_400,
            )?,
        };

        let api_keys = ApiKeys {
            secret: vars.api_keys("SUPABASE_SECRET_KEYS", "SUPABASE_SECRET_KEY", "sb_secret_")?,
            publishable: vars.api_keys(
                "SUPABASE_PUBLISHABLE_KEYS",
                "SUPABASE_PUBLISHABLE_KEY",
                "sb_publishable_",
            )?,
        };

        let stripe_secret_key = vars.secret_with_prefix(
            "STRIPE_SECRET_KEY",
            &["sk_live_", "sk_test_", "rk_live_", "rk_test_"],
        )?;
        let reconcile_interval = vars.seconds(
            "STRIPE_RECONCILE_INTERVAL_SECONDS",
            3_600,
            0..=RECONCILE_INTERVAL_MAX,
        )?;
        if (1..RECONCILE_INTERVAL_MIN).contains(&reconcile_interval.as_secs()) {
            return Err(ConfigError::new(
                "STRIPE_RECONCILE_INTERVAL_SECONDS",
                format!(
                    "must be 0 (off) or from {RECONCILE_INTERVAL_MIN} to {RECONCILE_INTERVAL_MAX}"
                ),
            ));
        }
        let stripe = StripeConfig {
            reconcile_interval: (stripe_secret_key.is_some() && !reconcile_interval.is_zero())
                .then_some(reconcile_interval),
            secret_key: stripe_secret_key,
            webhook_secrets: vars.secret_list_with_prefix("STRIPE_WEBHOOK_SECRET", "whsec_")?,
            api_base: vars
                .url("STRIPE_API_BASE", parse::UrlRule::HttpsOrLoopback)?
                .unwrap_or_else(|| parse::static_url("https://api.stripe.com/")),
        };

        let twilio = TwilioConfig {
            account_sid: vars.sid("TWILIO_ACCOUNT_SID", "AC")?,
            auth_token: vars.secret("TWILIO_AUTH_TOKEN")?,
            sender: match (
                vars.e164("TWILIO_FROM_NUMBER")?,
                vars.sid("TWILIO_MESSAGING_SERVICE_SID", "MG")?,
            ) {
                (Some(_), Some(_)) => {
                    return Err(ConfigError::new(
                        "TWILIO_FROM_NUMBER",
                        "set either it or TWILIO_MESSAGING_SERVICE_SID, not both",
                    ));
                }
                (Some(number), None) => Some(SmsSender::From(number)),
                (None, Some(sid)) => Some(SmsSender::MessagingService(sid)),
                (None, None) => None,
            },
            api_base: vars
                .url("TWILIO_API_BASE", parse::UrlRule::HttpsOrLoopback)?
                .unwrap_or_else(|| parse::static_url("https://api.twilio.com")),
            request_timeout: DEFAULT_TWILIO_TIMEOUT,
            retry_base_delay: DEFAULT_TWILIO_RETRY_DELAY,
            send_budget: DEFAULT_SMS_SEND_BUDGET,
        };
        if twilio.account_sid.is_some() != twilio.auth_token.is_some() {
            let missing = if twilio.account_sid.is_some() {
                "TWILIO_AUTH_TOKEN"
            } else {
                "TWILIO_ACCOUNT_SID"
            };
            return Err(ConfigError::new(
                missing,
                "must be set together with the other Twilio credential",
            ));
        }

        let sms = SmsConfig {
            allowed_prefixes: vars.e164_prefixes("SMS_ALLOWED_PREFIXES")?,
            max_per_recipient_per_hour: vars.number(
                "SMS_MAX_PER_RECIPIENT_PER_HOUR",
                5,
                1..=1_000,
            )?,
            max_per_minute: vars.number("SMS_MAX_PER_MINUTE", 60, 1..=100_000)?,
        };

        let tls = match (vars.path("TLS_CERT_FILE"), vars.path("TLS_KEY_FILE")) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "TLS_KEY_FILE",
                    "must be set when TLS_CERT_FILE is",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "TLS_CERT_FILE",
                    "must be set when TLS_KEY_FILE is",
                ));
            }
        };

        Ok(Config {
            host: vars
                .ip("HOST")?
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            port: vars.number("PORT", DEFAULT_PORT, 0..=u16::MAX)?,
            tls,
            database_url: vars.database_url("DATABASE_URL")?,
            shutdown_drain: vars.seconds(
                "SHUTDOWN_DRAIN_SECONDS",
                DEFAULT_SHUTDOWN_DRAIN.as_secs(),
                0..=300,
            )?,
            connections: ConnectionLimits {
                header_read_timeout: vars.seconds(
                    "HTTP_HEADER_READ_TIMEOUT_SECONDS",
                    DEFAULT_HEADER_READ_TIMEOUT.as_secs(),
                    1..=300,
                )?,
                idle_timeout: vars.seconds(
                    "HTTP_IDLE_TIMEOUT_SECONDS",
                    DEFAULT_IDLE_TIMEOUT.as_secs(),
                    1..=3_600,
                )?,
                max_connections: vars.number(
                    "HTTP_MAX_CONNECTIONS",
                    DEFAULT_MAX_CONNECTIONS,
                    1..=1_000_000,
                )?,
                max_connections_set: vars.get_trimmed("HTTP_MAX_CONNECTIONS").is_some(),
            },
            cors_allowed_origins: vars.cors_origins("CORS_ALLOWED_ORIGINS")?,
            cors_allowed_headers: vars.header_names("CORS_ALLOWED_HEADERS")?,
            log_format: vars.log_format("LOG_FORMAT")?,
            log_filter: vars.log_filter("RUST_LOG")?,
            jwt,
            api_keys,
            stripe,
            twilio,
            sms,
            public_url: vars.base_url("PUBLIC_URL", parse::UrlRule::Http)?,
            traces: trace_export(&vars)?,
        })
    }

    /// A configuration for tests and tools: every default, nothing configured.
    pub fn defaults() -> Self {
        Self::from_lookup(|_| None).expect("the defaults are valid")
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
impl DatabaseUrl {
    /// `raw`, unchecked, for tests of what takes a URL.
    pub(crate) fn unchecked(raw: &str) -> Self {
        Self(SecretString::from(raw.to_owned()))
    }
}
