//! The `edgegate` command line. Everything it runs lives in the library.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Parser, Subcommand, ValueEnum};
use edgegate::auth::Alg;
use edgegate::clock::Clock;
use edgegate::commands::keys::KeyOutput;
use edgegate::commands::token::{MintOptions, Signer};
use edgegate::{Config, RunOptions, commands, telemetry};

/// What `--help` of the top command and of the commands that read the configuration ends with.
const ENVIRONMENT_HELP: &str = "\
Configuration: from the environment, and from ./.env (the environment wins); every variable
with its default and range in docs/CONFIGURATION.md. Operations: docs/OPERATIONS.md.

Exit codes: 0 success; 1 a runtime failure or a failed check; 2 a configuration or usage error
(one line naming the variable or argument and the rule it breaks).";

#[derive(Parser)]
#[command(
    name = "edgegate",
    version,
    about = "Supabase Edge Functions, served by one Rust service",
    after_help = ENVIRONMENT_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve HTTP (the default); migrates the database first.
    #[command(after_help = ENVIRONMENT_HELP)]
    Serve {
        /// Do not apply migrations before serving.
        #[arg(long)]
        no_migrate: bool,
    },
    /// Apply database migrations and exit (Fly's release_command).
    #[command(after_help = ENVIRONMENT_HELP)]
    Migrate,
    /// Validate the configuration and reach each configured dependency.
    #[command(after_help = ENVIRONMENT_HELP)]
    Check,
    /// JWT signing keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Tokens for local testing.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Exit 0 when /healthz answers 200 (for images without curl).
    Healthcheck {
        /// An instance's base URL (its /healthz is probed) or a full URL to probe; defaults to
        /// this instance on loopback.
        #[arg(value_parser = commands::parse_health_url)]
        url: Option<String>,
    },
    /// Print the OpenAPI 3.1 document (the same as GET /openapi.json).
    #[command(
        after_help = "Regenerate the committed copy: cargo run -- openapi > docs/openapi.json"
    )]
    Openapi,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a new private JWK (the format Supabase imports) and its public JWKS.
    #[command(after_help = "\
Output (stdout only; nothing is logged):
  line 1  the private JWK, as `supabase gen signing-key` prints it: import it in the
          dashboard, or put it in a JSON array in supabase/signing_keys.json for the
          Supabase CLI. It is a secret: keep it out of logs and version control.
  line 2  the public JWKS {\"keys\":[…]}: what SUPABASE_JWKS accepts.
--output private or public prints only that line (public alone: the private key is lost).

Examples:
  edgegate keys generate --alg ES256 > key.txt
  head -n1 key.txt > private.jwk.json
  edgegate keys generate --alg EdDSA --output private > private.jwk.json")]
    Generate {
        /// The signing algorithm.
        #[arg(long, value_enum, ignore_case = true)]
        alg: AlgArg,
        /// What to print: the private JWK, the public JWKS, or both, one line each.
        #[arg(long, value_enum, default_value_t = OutputArg::Both)]
        output: OutputArg,
    },
    /// Who still uses which key: legacy usage by kind, route and client, with hourly bars.
    #[command(after_help = "\
Reads GET /admin/signing-keys of a running edgegate when --url is given (https://, or http://
on loopback only), with the sb_secret_ key in EDGEGATE_SECRET_KEY (from the environment or .env,
never the command line); else reads the database DATABASE_URL names (flushed counts only: each
instance writes its counts every 60 s). From the database, the verdict's window is this
environment's LEGACY_REVOCATION_WINDOW_SECONDS (default 24 h): set it as the servers have it.

Examples:
  EDGEGATE_SECRET_KEY=sb_secret_... edgegate keys report --url https://my-edgegate.fly.dev
  DATABASE_URL=postgres://... edgegate keys report --window 7d")]
    Report {
        /// A running edgegate to ask, e.g. https://my-edgegate.fly.dev (a path is kept).
        #[arg(long)]
        url: Option<String>,
        /// The span of the usage: 24h, 90m, 7d (at most 30d); default: the revocation window.
        #[arg(long, value_parser = commands::report::parse_window)]
        window: Option<Duration>,
        /// The report's "now", epoch milliseconds (tests).
        #[arg(long, hide = true)]
        now_ms: Option<i64>,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a token shaped like Supabase's, signed with a private JWK or the legacy secret.
    #[command(
        group(ArgGroup::new("signer").required(true).args(["jwk", "legacy"])),
        after_help = "\
Claims:
  with --sub, or for a role other than anon and service_role: a Supabase Auth access token
    (iss ${SUPABASE_URL}/auth/v1, else the first of JWT_ISSUERS, else \"supabase\";
    aud the first of JWT_AUDIENCES, \"authenticated\" by default; a random UUID sub when
    --sub is not given)
  anon or service_role without --sub: a legacy API key,
    {\"iss\":\"supabase\",\"ref\",\"role\",\"iat\",\"exp\"} (ref from SUPABASE_URL)
  an iss that JWT_ISSUERS leaves out is replaced by the first it lists

Examples:
  edgegate token mint --role authenticated --sub 8f1c… --jwk private.jwk.json
  edgegate token mint --role service_role --ttl 15m --legacy
  edgegate token mint --role authenticated --jwk supabase/signing_keys.json")]
    Mint {
        /// The `role` claim: authenticated, anon, service_role or a custom role.
        #[arg(long, value_parser = commands::token::parse_role)]
        role: String,
        /// The `sub` claim (a user id).
        #[arg(long)]
        sub: Option<String>,
        /// Lifetime: 30s, 15m, 1h, 7d or a number of seconds.
        #[arg(long, default_value = "1h", value_parser = commands::token::parse_ttl)]
        ttl: Duration,
        /// A private JWK file: one JWK, {"keys":[…]} or an array (the first key signs).
        #[arg(long, value_name = "FILE")]
        jwk: Option<PathBuf>,
        /// Sign HS256 with the legacy secret, SUPABASE_JWT_SECRET.
        #[arg(long)]
        legacy: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum AlgArg {
    #[value(name = "ES256")]
    Es256,
    #[value(name = "RS256")]
    Rs256,
    #[value(name = "EdDSA")]
    EdDsa,
}

impl From<AlgArg> for Alg {
    fn from(alg: AlgArg) -> Self {
        match alg {
            AlgArg::Es256 => Alg::ES256,
            AlgArg::Rs256 => Alg::RS256,
            AlgArg::EdDsa => Alg::EdDSA,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputArg {
    Private,
    Public,
    Both,
}

impl From<OutputArg> for KeyOutput {
    fn from(output: OutputArg) -> Self {
        match output {
            OutputArg::Private => KeyOutput::Private,
            OutputArg::Public => KeyOutput::Public,
            OutputArg::Both => KeyOutput::Both,
        }
    }
}

/// mimalloc instead of glibc's malloc: the request path allocates small, short-lived buffers
/// (headers, JSON, log lines, trace spans), which it serves with fewer instructions
/// (BENCHMARKS.md, "Allocator"). Built to commit its arenas as it uses them
/// (`.cargo/config.toml`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Transparent huge pages off for this process, whatever the host's setting: with THP
    // "always", each 2 MiB region mimalloc touches becomes resident whole (BENCHMARKS.md,
    // "Allocator"). A kernel without the setting changes nothing; nothing to report then.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    // `.env` before the arguments, so that what it sets (EDGEGATE_SECRET_KEY too) is there for
    // every command. Its error waits until a command that reads it runs (`openapi`, `keys
    // generate` and `--help` do not).
    let dotenv = edgegate::config::load_dotenv();
    let cli = Cli::parse();
    // The document depends on the code alone: no configuration, no runtime.
    if let Some(Command::Openapi) = cli.command {
        return print_openapi();
    }
    let command = cli.command.unwrap_or(Command::Serve { no_migrate: false });
    // A command that does not read the configuration runs whatever it holds; the log settings
    // are still taken from it when it is valid, else the defaults are.
    let lenient = || Config::from_process_env().or_else(|_| Config::from_lookup(|_| None));
    let loaded = match reads(&command) {
        Reads::Configuration => {
            dotenv.and_then(|hidden| Config::from_process_env().map(|config| (config, hidden)))
        }
        Reads::DotEnv => dotenv.and_then(|hidden| lenient().map(|config| (config, hidden))),
        Reads::Nothing => lenient().map(|config| (config, Vec::new())),
    };
    let (config, hidden_by_blank) = match loaded {
        Ok(loaded) => loaded,
        Err(err) => {
            eprintln!("edgegate: invalid configuration: {err}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("edgegate: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    // A server's request lines go out in batches; the other commands print their own lines
    // between log lines, in order.
    let batched = matches!(command, Command::Serve { .. });
    // Inside the runtime: the span exporter's task runs on it.
    let exporter = {
        let _runtime = runtime.enter();
        match telemetry::init(
            config.log_format,
            &config.log_filter,
            config.traces.as_ref(),
            batched,
        ) {
            Ok(exporter) => exporter,
            Err(err) => {
                eprintln!(
                    "edgegate: invalid configuration: {}",
                    edgegate::error::causes(&err)
                );
                return ExitCode::from(2);
            }
        }
    };
    for name in hidden_by_blank {
        tracing::warn!(
            "{name} is set but blank in the environment, which wins over .env: its value in \
             .env is not used"
        );
    }
    let (code, exit_by) = runtime.block_on(async {
        let code = execute(command, config).await;
        // After the drain: the spans of the last requests go out too. From here every step
        // shares one deadline, so that a hung collector, a stderr nobody reads and a stuck
        // blocking thread, together, still end the process inside the kill timeout.
        let exit_by = tokio::time::Instant::now() + telemetry::EXIT_AFTER_STOP;
        if let Some(exporter) = exporter {
            exporter.shutdown(exit_by).await;
        }
        (code, exit_by.into_std())
    });
    telemetry::flush_logs_by(exit_by);
    // Dropping a runtime waits for its blocking threads without end: a DNS lookup still running
    // for an abandoned JWKS refresh or database reconnect would hold the exit past Fly's kill
    // timeout. They get what is left until the deadline.
    runtime.shutdown_timeout(exit_by.saturating_duration_since(std::time::Instant::now()));
    code
}

/// What of the environment a command reads.
#[derive(Clone, Copy)]
enum Reads {
    /// The whole configuration: a malformed variable or `.env` stops it (exit 2).
    Configuration,
    /// Only `.env`, for a variable outside the configuration (`EDGEGATE_SECRET_KEY`).
    DotEnv,
    /// Neither: a malformed variable is no concern of it.
    Nothing,
}

fn reads(command: &Command) -> Reads {
    match command {
        // The token's issuer and audience come from the configuration, and --legacy's secret.
        Command::Serve { .. } | Command::Migrate | Command::Check | Command::Token { .. } => {
            Reads::Configuration
        }
        // With no URL: this instance's address (HOST, PORT, TLS_*).
        Command::Healthcheck { url: None } => Reads::Configuration,
        Command::Healthcheck { url: Some(_) } | Command::Openapi => Reads::Nothing,
        Command::Keys {
            command: KeysCommand::Generate { .. },
        } => Reads::Nothing,
        // With no URL: the database DATABASE_URL names, and LEGACY_REVOCATION_WINDOW_SECONDS.
        Command::Keys {
            command: KeysCommand::Report { url: None, .. },
        } => Reads::Configuration,
        Command::Keys {
            command: KeysCommand::Report { url: Some(_), .. },
        } => Reads::DotEnv,
    }
}

fn print_openapi() -> ExitCode {
    write_stdout(commands::openapi_document(), ExitCode::SUCCESS)
}

/// Writes `text` to stdout, then exits with `code`. A reader that stopped early (`edgegate
/// openapi | head -c 10`) ends the output, not the command: Rust ignores SIGPIPE, so writing to
/// a closed pipe is an error, which `print!` turns into a panic (exit 101). Restoring SIGPIPE's
/// default action instead would kill `serve` on a write to a socket or pipe whose reader went.
fn write_stdout(text: impl AsRef<[u8]>, code: ExitCode) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_ref())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => code,
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => code,
        Err(err) => {
            eprintln!("edgegate: cannot write to stdout: {err}");
            ExitCode::FAILURE
        }
    }
}

/// A file-size limit (RLIMIT_FSIZE, `ulimit -f`) reached sends SIGXFSZ, whose default action
/// ends the process with no word (the SQLite -wal file grown past the limit under load). Listened
/// for instead (the handler stays for the process's life), the write fails with EFBIG, which
/// SQLite reports as a disk I/O error: a 503 for the request, as on a full disk, or a migration
/// that fails saying so.
fn survive_file_size_limit() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let xfsz = SignalKind::from_raw(rustix::process::Signal::XFSZ.as_raw());
        if let Err(err) = signal(xfsz) {
            tracing::warn!(error = %err, "cannot listen for SIGXFSZ");
        }
    }
}

async fn execute(command: Command, mut config: Config) -> ExitCode {
    survive_file_size_limit();
    match command {
        Command::Serve { no_migrate } => {
            if let Err(err) = edgegate::server::raise_file_limit(&mut config.connections) {
                telemetry::flush_logs();
                eprintln!("edgegate: invalid configuration: {err}");
                return ExitCode::from(2);
            }
            // Files that hold no usable certificate and key are a configuration error, found
            // before anything starts (only the outermost message: it names the variable).
            let tls = match config
                .tls
                .as_ref()
                .map(edgegate::server::load_tls)
                .transpose()
            {
                Ok(tls) => tls,
                Err(err) => {
                    telemetry::flush_logs();
                    eprintln!("edgegate: invalid configuration: {err}");
                    return ExitCode::from(2);
                }
            };
            let address = config.listen_address();
            let listener = match tokio::net::TcpListener::bind(address).await {
                Ok(listener) => listener,
                Err(err) => {
                    telemetry::flush_logs();
                    eprintln!("edgegate: cannot listen on {address}: {err}");
                    return ExitCode::FAILURE;
                }
            };
            // Once the first signal has begun the drain, a second one cuts it short: the
            // requests still in flight are dropped, the usage counts still written, exit 1.
            let cut_drain = std::sync::Arc::new(tokio::sync::Notify::new());
            let options = RunOptions {
                migrate: !no_migrate,
                tls,
                cut_drain: cut_drain.clone(),
            };
            let (shutdown, second) = edgegate::shutdown_signals();
            tokio::spawn(async move {
                let name = second.await;
                tracing::warn!(
                    "{name} received again: the drain, if still under way, is cut short (the \
                     requests still in flight dropped, the usage counts still written)"
                );
                cut_drain.notify_one();
            });
            match edgegate::run_with(config, listener, shutdown, options).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    // Behind the last log lines, and not waiting for a stderr nobody reads:
                    // the exit's deadline bounds it with them.
                    telemetry::print_after_logs(&format!(
                        "edgegate: {}\n",
                        edgegate::error::causes(&err)
                    ));
                    ExitCode::FAILURE
                }
            }
        }
        Command::Migrate if on_fly_release_machine() && !config.database_url.is_postgres() => {
            eprintln!(
                "edgegate: DATABASE_URL must name a PostgreSQL database on Fly's release Machine \
                 (RELEASE_COMMAND is set): a SQLite file there is thrown away with the Machine, \
                 and every instance would serve its own; set it with `fly secrets set`, or remove \
                 release_command to run on SQLite"
            );
            ExitCode::from(2)
        }
        Command::Migrate => {
            let stop = edgegate::stop_signal();
            let migrated = tokio::select! {
                migrated = commands::migrate(&config) => migrated,
                name = stop => {
                    eprintln!(
                        "edgegate: migration stopped by {name} before it finished: the \
                         migrations applied before stay applied, one under way is rolled back \
                         (each is whole or not at all); run `edgegate migrate` again"
                    );
                    return ExitCode::FAILURE;
                }
            };
            match migrated {
                Ok(summary) => write_stdout(format!("{summary}\n"), ExitCode::SUCCESS),
                Err(err) => {
                    eprintln!(
                        "edgegate: migration failed: {}",
                        edgegate::error::causes(&err)
                    );
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check => {
            let stop = edgegate::stop_signal();
            let lines = tokio::select! {
                lines = commands::check(&config) => lines,
                name = stop => {
                    eprintln!("edgegate: check stopped by {name} before it finished");
                    return ExitCode::FAILURE;
                }
            };
            let mut printed = String::new();
            for line in &lines {
                let mark = if line.ok { "ok  " } else { "FAIL" };
                let _ = writeln!(printed, "{mark} {:<14} {}", line.item, line.detail);
            }
            let code = if lines.iter().all(|line| line.ok) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
            write_stdout(&printed, code)
        }
        Command::Keys {
            command: KeysCommand::Generate { alg, output },
        } => {
            // Whole, then written: a closed stdout is then one place's concern.
            let mut printed = Vec::new();
            match commands::keys::generate(alg.into(), output.into(), &mut printed) {
                Ok(()) => write_stdout(&printed, ExitCode::SUCCESS),
                Err(err) => {
                    eprintln!(
                        "edgegate: cannot generate a key: {}",
                        edgegate::error::causes(&err)
                    );
                    ExitCode::FAILURE
                }
            }
        }
        Command::Keys {
            command:
                KeysCommand::Report {
                    url,
                    window,
                    now_ms,
                },
        } => {
            let now_ms = now_ms.unwrap_or_else(|| Clock::system().now_ms());
            let url = match url.as_deref().map(edgegate::config::report_url).transpose() {
                Ok(url) => url,
                Err(err) => {
                    eprintln!("edgegate: invalid configuration: {err}");
                    return ExitCode::from(2);
                }
            };
            let view = match (url, edgegate::config::report_secret_key()) {
                (Some(url), Some(key)) => commands::report::from_api(&url, &key, window).await,
                (Some(_), None) => {
                    eprintln!(
                        "edgegate: invalid configuration: EDGEGATE_SECRET_KEY must be set (an sb_secret_ key) to read the report from --url"
                    );
                    return ExitCode::from(2);
                }
                (None, _) => commands::report::from_database(&config, window, now_ms).await,
            };
            match view {
                Ok(view) => {
                    write_stdout(commands::report::render(&view, now_ms), ExitCode::SUCCESS)
                }
                Err(err) => {
                    eprintln!(
                        "edgegate: cannot read the report: {}",
                        edgegate::error::causes(&err)
                    );
                    ExitCode::FAILURE
                }
            }
        }
        Command::Token {
            command:
                TokenCommand::Mint {
                    role,
                    sub,
                    ttl,
                    jwk,
                    legacy: _,
                },
        } => {
            let options = MintOptions {
                role,
                sub,
                ttl,
                // clap's "signer" group makes exactly one of --jwk and --legacy present.
                signer: jwk.map_or(Signer::Legacy, Signer::Jwk),
            };
            if matches!(options.signer, Signer::Legacy) && config.jwt.legacy_secret.is_none() {
                eprintln!(
                    "edgegate: invalid configuration: SUPABASE_JWT_SECRET must be set: --legacy \
                     signs with the legacy JWT secret (set it in the environment or .env)"
                );
                return ExitCode::from(2);
            }
            match commands::token::mint(&config, &options, Clock::system().unix_now()) {
                Ok(token) => write_stdout(format!("{token}\n"), ExitCode::SUCCESS),
                Err(err) => {
                    eprintln!(
                        "edgegate: cannot mint a token: {}",
                        edgegate::error::causes(&err)
                    );
                    ExitCode::FAILURE
                }
            }
        }
        Command::Openapi => print_openapi(),
        Command::Healthcheck { url } => {
            let loopback_default = url.is_none();
            let url = url.map_or_else(
                || commands::default_health_url(&config),
                |url| commands::health_url(&url),
            );
            match commands::healthcheck(&url, loopback_default).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("edgegate: unhealthy: {}", edgegate::error::causes(&err));
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Fly sets `RELEASE_COMMAND=1` on the temporary Machine that runs `release_command`.
fn on_fly_release_machine() -> bool {
    std::env::var_os("RELEASE_COMMAND").is_some_and(|value| !value.is_empty())
}
