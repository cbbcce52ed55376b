//! The `edgegate` command line. Everything it runs lives in the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edgegate::{Config, RunOptions, commands, telemetry};

#[derive(Parser)]
#[command(
    name = "edgegate",
    version,
    about = "Supabase Edge Functions, served by one Rust service"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve HTTP (the default); migrates the database first.
    Serve {
        /// Do not apply migrations before serving.
        #[arg(long)]
        no_migrate: bool,
    },
    /// Apply database migrations and exit (Fly's release_command).
    Migrate,
    /// Validate the configuration and reach each configured dependency.
    Check,
    /// Exit 0 when /healthz answers 200 (for images without curl).
    Healthcheck {
        /// The URL to probe; defaults to this instance on loopback.
        url: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("edgegate: invalid configuration: {err}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_logging(config.log_format, &config.log_filter);
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
    runtime.block_on(execute(
        cli.command.unwrap_or(Command::Serve { no_migrate: false }),
        config,
    ))
}

async fn execute(command: Command, config: Config) -> ExitCode {
    match command {
        Command::Serve { no_migrate } => {
            let address = (config.host, config.port);
            let listener = match tokio::net::TcpListener::bind(address).await {
                Ok(listener) => listener,
                Err(err) => {
                    eprintln!(
                        "edgegate: cannot listen on {}:{}: {err}",
                        address.0, address.1
                    );
                    return ExitCode::FAILURE;
                }
            };
            let options = RunOptions {
                migrate: !no_migrate,
            };
            match edgegate::run_with(config, listener, edgegate::shutdown_signal(), options).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("edgegate: {err:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Migrate => match commands::migrate(&config).await {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("edgegate: migration failed: {err:#}");
                ExitCode::FAILURE
            }
        },
        Command::Check => {
            let lines = commands::check(&config).await;
            for line in &lines {
                let mark = if line.ok { "ok  " } else { "FAIL" };
                println!("{mark} {:<14} {}", line.item, line.detail);
            }
            if lines.iter().all(|line| line.ok) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Healthcheck { url } => {
            let loopback_default = url.is_none();
            let url = url.unwrap_or_else(|| commands::default_health_url(&config));
            match commands::healthcheck(&url, loopback_default).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("edgegate: unhealthy: {err:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
