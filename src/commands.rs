//! What the CLI's subcommands do, apart from `serve` (see `run`).

pub mod jwt_check;
pub mod keys;
pub mod report;
pub mod token;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr as _;
use std::time::Duration;

use sqlx::sqlite::SqliteConnectOptions;

use crate::config::{Config, DatabaseUrl};
use crate::store::{BackendKind, SqliteServerAccess, Store};
use crate::twilio::client::TwilioApi;

/// `edgegate openapi`: the OpenAPI 3.1 document, as `GET /openapi.json` serves it.
pub fn openapi_document() -> String {
    crate::routes::openapi::document_json()
}

/// `edgegate migrate`: apply pending migrations and report the applied versions, and how many
/// of them this run applied.
pub async fn migrate(config: &Config) -> anyhow::Result<String> {
    let store = Store::connect(&config.database_url).await?;
    // Read under the migration lock: what another run applied while this one waited for it
    // is not counted as new here.
    let before = store.migrate_counting().await?;
    store.close().await;
    let applied = store.applied_once_migrated(&before);
    let new = applied
        .iter()
        .filter(|version| !before.contains(version))
        .count();
    Ok(format!(
        "migrated {} ({} migrations applied, {new} new, latest {})",
        config.database_url.redacted(),
        applied.len(),
        applied
            .last()
            .map_or_else(|| "none".to_owned(), i64::to_string)
    ))
}

/// One line of `edgegate check`.
#[derive(Debug)]
pub struct CheckLine {
    pub item: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// `edgegate check`: the configuration (already valid, or we would not be here) and each
/// dependency it names. Nothing printed holds a secret.
pub async fn check(config: &Config) -> Vec<CheckLine> {
    let mut lines = vec![CheckLine {
        item: "configuration",
        ok: true,
        detail: format!(
            "valid; listening on {}{}",
            config.listen_address(),
            if config.tls.is_some() { " (TLS)" } else { "" }
        ),
    }];
    lines.push(connections_line(config));
    if let Some(problem) = crate::outbound::ca_certificates_problem() {
        // A failure only where something configured is called over HTTPS.
        let needed = config.jwt.jwks_url.is_some()
            || config.stripe.secret_key.is_some()
            || config.twilio.account_sid.is_some()
            || config.traces.is_some();
        lines.push(CheckLine {
            item: "tls roots",
            ok: !needed,
            detail: format!(
                "{}: every HTTPS request would fail on the server's certificate{} ({problem})",
                crate::outbound::NO_CA_CERTIFICATES,
                if needed {
                    ""
                } else {
                    "; nothing configured makes one"
                }
            ),
        });
    }
    if let Some(files) = &config.tls {
        lines.push(match crate::server::load_tls(files) {
            Ok(_) => CheckLine {
                item: "tls",
                ok: true,
                detail: "TLS_CERT_FILE and TLS_KEY_FILE form a usable certificate and key"
                    .to_owned(),
            },
            // Only the outermost message: it names the variable, and what a parser says of a
            // key file is not printed.
            Err(err) => CheckLine {
                item: "tls",
                ok: false,
                detail: err.to_string(),
            },
        });
    }
    let database = async {
        let read = async {
            let store = Store::connect(&config.database_url).await?;
            store.ping().await?;
            // None where the table of migrations is not there yet; any other error reading
            // them (a grant left out, a damaged file) fails the line with its reason, where it
            // was shown as "0 migrations applied".
            let applied = store.applied_migrations().await?;
            let (differing, unknown) = if applied.is_empty() {
                (Vec::new(), Vec::new())
            } else {
                (
                    store.migrations_differing().await?,
                    store.migrations_unknown().await?,
                )
            };
            anyhow::Ok((store, applied.len(), differing, unknown))
        };
        let (store, applied, differing, unknown) =
            tokio::time::timeout(Duration::from_secs(10), read)
                .await
                .map_err(|_| anyhow::anyhow!("no answer within 10 s"))??;
        // Bounded apart: it reads every page, which takes longer than an answer does. A check
        // that runs out of time is left running in SQLite's thread (the store is not closed,
        // which would wait for it) until the process ends.
        let started = std::time::Instant::now();
        let quick_check = match tokio::time::timeout(QUICK_CHECK_WITHIN, store.quick_check()).await
        {
            Ok(checked) => {
                store.close().await;
                match (store.kind(), checked) {
                    (BackendKind::Postgres, _) => None,
                    (BackendKind::Sqlite, Ok(None)) => Some(QuickCheck::Passed(started.elapsed())),
                    (BackendKind::Sqlite, Ok(Some(complaint))) => {
                        Some(QuickCheck::Damaged(complaint))
                    }
                    // SQLite's answer to the check an error that says the file is damaged
                    // (SQLITE_CORRUPT, "database disk image is malformed"; SQLITE_NOTADB).
                    (BackendKind::Sqlite, Err(err)) if crate::store::is_sqlite_damage(&err) => {
                        Some(QuickCheck::Damaged(crate::error::causes(&err)))
                    }
                    // Any other (busy, a timeout, an I/O error) says nothing of the file.
                    (BackendKind::Sqlite, Err(err)) => {
                        Some(QuickCheck::Failed(crate::error::causes(&err)))
                    }
                }
            }
            Err(_) => Some(QuickCheck::Unfinished),
        };
        anyhow::Ok(DatabaseRead {
            applied,
            differing,
            unknown,
            quick_check,
        })
    };
    let access = sqlite_not_usable_by_server(&config.database_url);
    let unjudged = |mut line: CheckLine| {
        if let SqliteServerAccess::CannotTell(note) = &access {
            line.detail = format!("{}; {note}", line.detail);
        }
        line
    };
    lines.push(match sqlite_file(&config.database_url) {
        // Failed: a new deployment has no file at all (ok above), so an empty one is a restore or
        // a copy gone wrong, which serve would set up as a new database over it, and the data
        // the operator meant to serve is not there. Said before anything starts on it; not
        // opened, which would write SQLite's header into it.
        SqliteFile::Empty => CheckLine {
            item: "database",
            ok: false,
            detail: empty_sqlite_file(&config.database_url),
        },
        // Not there yet: the verdict is serve's, which creates the file in a directory that
        // exists and stops with "unable to open database file" where none does.
        SqliteFile::Missing => match missing_sqlite_directory(&config.database_url) {
            None if let Some(problem) = unwritable_sqlite_directory(&config.database_url) => {
                CheckLine {
                    item: "database",
                    ok: false,
                    detail: format!(
                        "{}: not there, and {problem}",
                        config.database_url.redacted()
                    ),
                }
            }
            // Run as root, which may create files anywhere: judged for the user it takes for
            // serve's and the image's (failed where neither may create it, said in a note where
            // only one may), as is a -wal or -shm of another user's left behind, which serve
            // stops on.
            None if let SqliteServerAccess::Refused(problem) = &access => CheckLine {
                item: "database",
                ok: false,
                detail: format!(
                    "{}: not there, and {problem}",
                    config.database_url.redacted()
                ),
            },
            None => unjudged(CheckLine {
                item: "database",
                ok: true,
                detail: format!(
                    "{}: not there yet; serve creates it and migrates it at start",
                    config.database_url.redacted()
                ),
            }),
            Some(problem) => CheckLine {
                item: "database",
                ok: false,
                detail: format!(
                    "{}: not there, and {problem}: serve cannot create it (create the \
                     directory first)",
                    config.database_url.redacted()
                ),
            },
        },
        // Judged for serve's user: `check` run as root may open what serve cannot, and create
        // the -wal and -shm where serve cannot (for the user it takes for serve's and the
        // image's, as a missing file's directory above).
        SqliteFile::Usable if let SqliteServerAccess::Refused(problem) = &access => CheckLine {
            item: "database",
            ok: false,
            detail: format!("{}: {problem}", config.database_url.redacted()),
        },
        SqliteFile::Usable => unjudged(database_line(&config.database_url, database.await)),
    });
    lines.extend(jwt_check::lines(config).await);
    lines.push(check_twilio(config, check_client(&config.twilio.api_base)).await);
    lines.push(check_stripe(config, check_client(&config.stripe.api_base)).await);
    if let Some(traces) = &config.traces {
        lines.push(check_traces(traces).await);
    }
    // Every detail, whichever check built it, goes through one escape: much of it is what a
    // dependency answered (Twilio's and Stripe's messages, a JWKS host's, a database's error).
    for line in &mut lines {
        line.detail = one_line(&line.detail);
    }
    lines
}

/// How long `check` lets SQLite's `PRAGMA quick_check` run.
const QUICK_CHECK_WITHIN: Duration = Duration::from_secs(60);

/// What `check` read of a database that answered.
struct DatabaseRead {
    applied: usize,
    /// Applied from another copy of a migration's file ([`Store::migrations_differing`]).
    differing: Vec<i64>,
    /// Applied and not shipped by this binary ([`Store::migrations_unknown`]).
    unknown: Vec<i64>,
    /// SQLite's only.
    quick_check: Option<QuickCheck>,
}

enum QuickCheck {
    /// `ok`, in this long.
    Passed(Duration),
    /// Its first complaint.
    Damaged(String),
    /// Not within [`QUICK_CHECK_WITHIN`].
    Unfinished,
    /// An error that says nothing of the file (busy, a timeout, an I/O error).
    Failed(String),
}

/// `check`'s database line for a database it opened.
fn database_line(url: &DatabaseUrl, read: anyhow::Result<DatabaseRead>) -> CheckLine {
    let shown = url.redacted();
    let (ok, detail) = match read {
        Err(err) => (false, format!("{shown}: {}", crate::error::causes(&err))),
        // Served until a query reads the damaged page: the tester's, far from what start-up
        // reads, was.
        Ok(DatabaseRead {
            quick_check: Some(QuickCheck::Damaged(complaint)),
            ..
        }) => (
            false,
            format!(
                "{shown} answers, but SQLite's PRAGMA quick_check finds the file damaged: \
                 {complaint}; edgegate serves it until a query reads what is damaged, and fails \
                 that query: restore the last good backup (docs/OPERATIONS.md, Backup and \
                 restore)"
            ),
        ),
        Ok(DatabaseRead {
            quick_check: Some(QuickCheck::Failed(error)),
            ..
        }) => (
            false,
            format!(
                "{shown} answers, but SQLite's PRAGMA quick_check failed: {error}; the file is \
                 not checked: run check again"
            ),
        ),
        // serve would migrate it, unless --no-migrate: then every query fails.
        Ok(DatabaseRead { applied: 0, .. }) => (
            false,
            format!(
                "{shown} answers; 0 migrations applied (serve applies them at start, not with \
                 --no-migrate; or run edgegate migrate)"
            ),
        ),
        // Another build's copy of a migration (an edited file, another branch's): migrate and
        // serve stop on it.
        Ok(DatabaseRead {
            applied, differing, ..
        }) if !differing.is_empty() => (
            false,
            format!(
                "{shown} answers; {applied} migrations applied, but {} {} {} applied from \
                 another copy of its file than this binary's (its checksum differs): migrate \
                 and serve refuse this database (\"was previously applied but has been \
                 modified\")",
                if differing.len() == 1 {
                    "migration"
                } else {
                    "migrations"
                },
                differing
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                if differing.len() == 1 { "was" } else { "were" },
            ),
        ),
        Ok(DatabaseRead {
            applied,
            unknown,
            quick_check,
            ..
        }) => {
            // Accepted (a rollback starts on the newer schema), and said.
            let unknown = unknown.last().map_or_else(String::new, |newest| {
                format!(
                    ", {} of them unknown to this build (the newest {newest}): a newer release \
                     migrated it, which is expected only while a rolling deploy still runs this \
                     release's older Machines or after a rollback, and safe only while its \
                     migrations were additive (docs/DEPLOY.md, 6. Roll back)",
                    unknown.len()
                )
            });
            let quick_check = match quick_check {
                Some(QuickCheck::Passed(took)) => {
                    format!("; PRAGMA quick_check ok ({:.1} s)", took.as_secs_f64())
                }
                Some(QuickCheck::Unfinished) => format!(
                    "; PRAGMA quick_check did not finish within {} s (a large file or a slow \
                     disk): the file is not checked (sqlite3 FILE 'PRAGMA quick_check' checks \
                     it)",
                    QUICK_CHECK_WITHIN.as_secs()
                ),
                Some(QuickCheck::Damaged(_) | QuickCheck::Failed(_)) | None => String::new(),
            };
            (
                true,
                format!("{shown} answers; {applied} migrations applied{unknown}{quick_check}"),
            )
        }
    };
    CheckLine {
        item: "database",
        ok,
        detail,
    }
}

/// `text` as one line of a terminal: control characters (C0, DEL, C1: a newline would print a
/// line that reads as another item's verdict, an escape sequence could rewrite the screen) and
/// invisible formatting ones (bidi overrides) are written out, `\n` or `\u{1b}`.
pub(crate) fn one_line(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            c if c.is_control() || crate::auth::keys::is_format_char(c) => {
                escaped.extend(c.escape_unicode());
            }
            c => escaped.push(c),
        }
    }
    escaped
}

/// The open-file rule `serve` applies before it listens (`server::fit_connections`), on the
/// limit `serve` would raise itself to, leaving this process's limit alone: a cap set by
/// `HTTP_MAX_CONNECTIONS` that does not fit stops `serve` (exit 2), so it fails here.
fn connections_line(config: &Config) -> CheckLine {
    use crate::server::{Fit, RESERVED_FILES, fit_connections, serve_file_limit};
    let limits = &config.connections;
    let limit = serve_file_limit();
    let limit_text = limit.map_or_else(
        || "no open-file limit".to_owned(),
        |limit| format!("open-file limit {limit}"),
    );
    let (ok, detail) = match fit_connections(limits, limit) {
        Ok(Fit::Holds) => (
            true,
            format!(
                "at most {} open connections; {limit_text}",
                limits.max_connections
            ),
        ),
        Ok(Fit::Lowered(fits)) => (
            true,
            format!(
                "at most {fits} open connections, not the default {}: the {limit_text} keeps \
                 {RESERVED_FILES} files for the database and outbound clients (raise it with \
                 ulimit -n, or set HTTP_MAX_CONNECTIONS)",
                limits.max_connections
            ),
        ),
        Err(err) => (false, format!("{err}; serve stops (exit 2)")),
    };
    CheckLine {
        item: "connections",
        ok,
        detail,
    }
}

/// What `check` and `keys report` find where `url` names a SQLite file, before they open it:
/// they read a database, and opening a file that is not there would create an empty one behind
/// a mistyped path, and opening an empty one would write SQLite's header into it (so that the
/// next `serve` no longer found it empty). `serve` and `migrate` do both on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SqliteFile {
    /// There with something in it, or not a file (PostgreSQL, a database in memory, a URL
    /// SQLite cannot use, which connecting reports).
    Usable,
    Missing,
    /// There, with 0 bytes ([`crate::store::is_empty_sqlite_database`]).
    Empty,
}

fn sqlite_file(url: &DatabaseUrl) -> SqliteFile {
    if url.is_postgres() {
        return SqliteFile::Usable;
    }
    let Ok(options) = SqliteConnectOptions::from_str(url.expose()) else {
        return SqliteFile::Usable;
    };
    let file = options.get_filename();
    if crate::store::is_in_memory_sqlite(file) {
        SqliteFile::Usable
    } else if !file.exists() {
        SqliteFile::Missing
    } else if crate::store::is_empty_sqlite_database(file) {
        SqliteFile::Empty
    } else {
        SqliteFile::Usable
    }
}

/// What `check`'s database line and `keys report` say of an empty SQLite file.
fn empty_sqlite_file(url: &DatabaseUrl) -> String {
    let Ok(options) = SqliteConnectOptions::from_str(url.expose()) else {
        return format!(
            "{}: exists but is empty (0 bytes), no database",
            url.redacted()
        );
    };
    let file = options.get_filename();
    // The -wal read, then the file again: one that serve or migrate began setting up since it
    // was found empty has its first page before its -wal holds anything, and is not taken for
    // an empty file beside a -wal (whose deletion this would advise).
    let advice = crate::store::empty_sqlite_database_advice(file);
    if !crate::store::is_empty_sqlite_database(file) {
        return format!(
            "{}: was empty (0 bytes) as this command began, and holds pages now (serve or \
             migrate setting it up beside it?): run it again",
            url.redacted()
        );
    }
    format!(
        "{}: exists but is empty (0 bytes), no database{advice}",
        url.redacted()
    )
}

/// An error when `url` names a SQLite file that is not there, or is empty ([`SqliteFile`]):
/// for commands that read a database and do not set one up.
pub(crate) fn absent_sqlite_database(url: &DatabaseUrl) -> anyhow::Result<()> {
    match sqlite_file(url) {
        SqliteFile::Usable => Ok(()),
        SqliteFile::Missing => Err(anyhow::anyhow!(
            "{}: no such file (serve and migrate create it; this command does not)",
            url.redacted()
        )),
        SqliteFile::Empty => Err(anyhow::anyhow!(empty_sqlite_file(url))),
    }
}

/// What keeps SQLite from creating the file `url` names: its directory is missing or is not a
/// directory. `None` when the directory is there (or for PostgreSQL, or a URL SQLite cannot use).
fn missing_sqlite_directory(url: &DatabaseUrl) -> Option<String> {
    if url.is_postgres() {
        return None;
    }
    let options = SqliteConnectOptions::from_str(url.expose()).ok()?;
    crate::store::missing_sqlite_directory(options.get_filename())
}

/// What keeps serve from creating the SQLite file `url` names in its directory, which exists.
fn unwritable_sqlite_directory(url: &DatabaseUrl) -> Option<String> {
    if url.is_postgres() {
        return None;
    }
    let options = SqliteConnectOptions::from_str(url.expose()).ok()?;
    crate::store::unwritable_sqlite_directory(options.get_filename())
}

/// What keeps serve, as the user it runs as, from reading and writing the SQLite file `url`
/// names and the files beside it, and from creating files in its directory (see
/// `store::sqlite_not_usable_by_server`); allowed for PostgreSQL, or a URL SQLite cannot use.
fn sqlite_not_usable_by_server(url: &DatabaseUrl) -> SqliteServerAccess {
    if url.is_postgres() {
        return SqliteServerAccess::Allowed;
    }
    match SqliteConnectOptions::from_str(url.expose()) {
        Ok(options) => crate::store::sqlite_not_usable_by_server(options.get_filename()),
        Err(_) => SqliteServerAccess::Allowed,
    }
}

/// The HTTP client `check` reaches the dependency at `target` with.
fn check_client(target: &url::Url) -> reqwest::Client {
    crate::outbound::build(|| {
        crate::outbound::client_builder(Some("check"), &[target]).timeout(Duration::from_secs(10))
    })
}

/// Twilio's account endpoint with the configured credentials (the token is never shown), and
/// which numbers may be texted.
async fn check_twilio(config: &Config, http: reqwest::Client) -> CheckLine {
    let Some(api) = TwilioApi::from_config(&http, &config.twilio) else {
        return CheckLine {
            item: "twilio",
            ok: true,
            detail: "not configured (send-sms answers 503)".to_owned(),
        };
    };
    let (ok, detail) = match api.fetch_account().await {
        Ok(account) => (
            true,
            format!(
                "account {} answers; status {}",
                api.account_sid(),
                account.status.as_deref().unwrap_or("unknown")
            ),
        ),
        Err(err) => (false, format!("account {}: {err}", api.account_sid())),
    };
    // Credentials without a sender: send-sms answers 503 NOT_CONFIGURED.
    let (ok, mut detail) = match config.twilio.sender {
        Some(_) => (ok, detail),
        None => (
            false,
            format!(
                "{detail}; neither TWILIO_FROM_NUMBER nor TWILIO_MESSAGING_SERVICE_SID is set: \
                 send-sms answers 503"
            ),
        ),
    };
    // SMS_ALLOWED_PREFIXES unset (or blank) lets any number be texted, which an operator who
    // meant to guard against SMS pumping should see.
    let prefixes = &config.sms.allowed_prefixes;
    if prefixes.is_empty() {
        detail.push_str("; any destination may be texted (SMS_ALLOWED_PREFIXES is not set)");
    } else {
        detail.push_str(&format!(
            "; only numbers starting with {} may be texted (SMS_ALLOWED_PREFIXES)",
            prefixes.join(", ")
        ));
    }
    if config.public_url.is_none() {
        detail.push_str(
            "; PUBLIC_URL is not set: messages are sent without a status callback \
             (twilio-status answers 503)",
        );
    }
    CheckLine {
        item: "twilio",
        ok,
        detail,
    }
}

/// The Stripe line of `check`: one call with the configured key (a product list, which the
/// documented restricted key can read), reporting the mode the key is in; with no key, which
/// endpoints answer 503, as the Twilio line says.
async fn check_stripe(config: &Config, http: reqwest::Client) -> CheckLine {
    let policy = crate::stripe::RetryPolicy {
        max_attempts: 2,
        attempt_timeout: Duration::from_secs(10),
        ..crate::stripe::RetryPolicy::default()
    };
    let Some(client) = crate::stripe::StripeClient::from_config(http, &config.stripe, policy)
    else {
        // The webhook needs only its own secret.
        let detail = if config.stripe.webhook_secrets.is_empty() {
            "not configured (sync-stripe-products-hardened, stripe-webhook and \
             /admin/stripe/reconcile answer 503)"
        } else {
            "STRIPE_SECRET_KEY is not set: sync-stripe-products-hardened and \
             /admin/stripe/reconcile answer 503 (stripe-webhook is configured)"
        };
        return CheckLine {
            item: "stripe",
            ok: true,
            detail: detail.to_owned(),
        };
    };
    let base = config.stripe.api_base.as_str();
    // Products for the sync, events for the reconciliation: a restricted key can have one
    // read permission without the other.
    let checked = match client.livemode().await {
        Ok(live) => client
            .can_list_events()
            .await
            .map(|()| live)
            .map_err(|err| format!("listing events (the reconciliation needs it): {err}")),
        Err(err) => Err(err.to_string()),
    };
    match checked {
        Ok(live) => CheckLine {
            item: "stripe",
            ok: true,
            detail: format!(
                "{base} accepts the key; {}",
                match live {
                    Some(true) => "live mode",
                    Some(false) => "test mode",
                    None => "mode unknown",
                }
            ),
        },
        Err(err) => CheckLine {
            item: "stripe",
            ok: false,
            detail: format!("{base}: {err}"),
        },
    }
}

/// The OTLP collector's line, while spans are exported: an export of no spans, as the exporter
/// sends them (a collector that cannot be reached, or refuses the headers, loses every span).
async fn check_traces(traces: &crate::config::TraceExport) -> CheckLine {
    let endpoint = crate::config::shown_url(&traces.endpoint);
    match crate::telemetry::check_collector(traces).await {
        Ok(()) => CheckLine {
            item: "traces",
            ok: true,
            detail: format!("{endpoint} accepts spans (OTLP http/protobuf)"),
        },
        Err(err) => CheckLine {
            item: "traces",
            ok: false,
            detail: format!("{endpoint}: {err}; spans would be lost"),
        },
    }
}

/// The URL `edgegate healthcheck` probes when given none: this instance, at the address it
/// listens on (`HOST`), or on loopback when that is every address.
pub fn default_health_url(config: &Config) -> String {
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let host = match config.host {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    // A socket address writes an IPv6 host in brackets.
    let address = SocketAddr::new(host, config.port);
    format!("{scheme}://{address}/healthz")
}

/// The URL `edgegate healthcheck URL` probes: a base URL (no path, or `/`) at `/healthz`, any
/// other URL as given.
pub fn health_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.has_host() && matches!(parsed.path(), "" | "/") => {
            parsed.set_path("/healthz");
            parsed.into()
        }
        _ => url.to_owned(),
    }
}

/// `healthcheck URL`'s argument: an absolute http(s) URL (clap reports a refusal as a usage
/// error, exit 2; reqwest said "builder error: relative URL without a base", exit 1).
pub fn parse_health_url(text: &str) -> Result<String, String> {
    match url::Url::parse(text) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {
            Ok(text.to_owned())
        }
        _ => Err("must be an absolute http(s) URL, such as http://127.0.0.1:8080".to_owned()),
    }
}

/// `edgegate healthcheck [URL]`: Ok when the URL answers 200 within 5 s.
pub async fn healthcheck(url: &str, loopback_default: bool) -> anyhow::Result<()> {
    // No proxy and no redirect: the question is whether this URL itself answers 200, and a
    // proxy from the environment cannot reach the container's own loopback.
    let client = || {
        reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(5))
    };
    // The certificate names the public host, not 127.0.0.1; only our own default probe skips it.
    // No CA certificate to load (an image without ca-certificates) still leaves HTTP to probe.
    let client = match client()
        .tls_danger_accept_invalid_certs(loopback_default)
        .build()
    {
        Ok(client) => client,
        Err(_) => client().tls_certs_only(std::iter::empty()).build()?,
    };
    let shown = shown_health_url(url);
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|err| anyhow::Error::new(err.without_url()).context(shown.clone()))?;
    anyhow::ensure!(
        response.status() == reqwest::StatusCode::OK,
        "{shown} answered {}",
        response.status()
    );
    Ok(())
}

/// `url` as `healthcheck` names it in a failure: without a user and password (written `…@`)
/// and without its query and fragment ([`crate::config::shown_url`]), which may hold a key.
fn shown_health_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return "the URL".to_owned();
    };
    let had_user = !parsed.username().is_empty() || parsed.password().is_some();
    // Neither fails on an http(s) URL with a host, which is all `parse_health_url` lets in.
    let _ = parsed.set_username("");
    let _ = parsed.set_password(None);
    let shown = crate::config::shown_url(&parsed);
    match (had_user, shown.split_once("://")) {
        (true, Some((scheme, rest))) => format!("{scheme}://…@{rest}"),
        _ => shown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database in memory is no file: sqlx names `sqlite::memory:` `file:sqlx-in-memory-N`,
    /// which was looked for in the working directory and found missing.
    #[test]
    fn a_database_in_memory_is_no_missing_file() {
        for url in ["sqlite::memory:", "sqlite://:memory:"] {
            assert_eq!(
                sqlite_file(&DatabaseUrl::unchecked(url)),
                SqliteFile::Usable,
                "{url}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let missing = format!("sqlite://{}/edgegate.db", dir.path().display());
        assert_eq!(
            sqlite_file(&DatabaseUrl::unchecked(&missing)),
            SqliteFile::Missing
        );
    }
}
