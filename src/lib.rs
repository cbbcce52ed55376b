//! edgegate: one service that takes over a Supabase project's Edge Functions and verifies the
//! legacy JWT secret and the new JWT signing keys side by side.
//!
//! `app(state)` builds the router with its middleware; `run(config, listener, shutdown)` serves it.

pub mod audit;
pub mod auth;
pub mod backoff;
pub mod body;
pub mod clock;
pub mod commands;
pub mod config;
pub mod credentials;
pub mod error;
pub mod json_text;
pub mod outbound;
pub mod routes;
pub mod server;
pub mod state;
pub mod store;
pub mod stripe;
pub mod telemetry;
pub mod twilio;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use tokio::net::TcpListener;

pub use config::Config;
pub use state::AppState;
pub use store::Store;

/// The whole HTTP application: every route behind the middleware stack.
pub fn app(state: AppState) -> Router {
    server::middleware::apply(routes::router(), &state)
}

/// Options of `run` beyond the configuration.
#[derive(Clone)]
pub struct RunOptions {
    /// Apply pending migrations before serving (the default; `serve --no-migrate` turns it off).
    pub migrate: bool,
    /// The acceptor already built from `config.tls` by the caller (the binary builds it first,
    /// to report unusable files as a configuration error), so the files are read once; `None`
    /// builds it from `config.tls` at start.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Notified to cut the drain short (the binary's second SIGTERM or SIGINT): the requests
    /// still in flight are dropped at once, the usage counts are still written (they are the
    /// legacy verdict's evidence), and [`run_with`] returns an error.
    pub cut_drain: Arc<tokio::sync::Notify>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            migrate: true,
            tls: None,
            cut_drain: Arc::new(tokio::sync::Notify::new()),
        }
    }
}

/// Opens the database, migrates it, and serves until `shutdown` resolves, then drains. An error
/// after a stop that left something undone: requests the drain dropped, steps after it cut off.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    run_with(config, listener, shutdown, RunOptions::default()).await
}

pub async fn run_with(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    options: RunOptions,
) -> anyhow::Result<()> {
    let mut shutdown = std::pin::pin!(shutdown);
    // A stop asked for while starting (connecting, waiting for another instance's migration
    // lock) ends it there.
    let started = tokio::select! {
        started = Started::start(config, listener, options, clock::Clock::system()) => started?,
        () = &mut shutdown => {
            tracing::info!("edgegate stopped before serving");
            return Ok(());
        }
    };
    started.serve(shutdown).await
}

/// Starts the service as [`run`] does (database, background tasks, HTTP on `listener`) in a task
/// of its own, for callers that keep working beside it (the integration tests).
pub async fn spawn(config: Config, listener: TcpListener) -> anyhow::Result<RunningApp> {
    spawn_with_clock(config, listener, clock::Clock::system()).await
}

/// As [`spawn`], reading time from `clock` (tests advance a manual one instead of sleeping).
pub async fn spawn_with_clock(
    config: Config,
    listener: TcpListener,
    clock: clock::Clock,
) -> anyhow::Result<RunningApp> {
    let started = Started::start(config, listener, RunOptions::default(), clock).await?;
    let state = started.state.clone();
    let address = started.address;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(started.serve(async {
        let _ = stopped.await;
    }));
    Ok(RunningApp {
        state,
        address,
        stop,
        task,
    })
}

/// The service started by [`spawn`].
pub struct RunningApp {
    state: AppState,
    address: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningApp {
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.address
    }

    /// What the handlers see (the same store, key ring, usage counts and metrics).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Stops as [`run`] does on its shutdown signal: drains, stops the background tasks, writes
    /// the usage counts and closes the database.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await.context("the service task failed")?
    }
}

/// What the steps after the drain (the last usage flush, waiting for SMS sends whose callers the
/// drain cut off, stopping the JWKS refresh, closing the database) may take beyond the drain's limit: they end at most this long after
/// `SHUTDOWN_DRAIN_SECONDS` has run from the stop signal, with whatever time the drain left
/// unused. With the default 25 s drain and the exit ([`telemetry::EXIT_AFTER_STOP`]: the last
/// spans and log lines), inside Fly's 30 s kill timeout (`fly.toml`), so the process ends by
/// itself and not by SIGKILL.
pub const AFTER_DRAIN: Duration = Duration::from_secs(3);
/// How long a JWKS refresh under way at shutdown is waited for.
const REFRESH_STOP: Duration = Duration::from_millis(500);

/// The service between start-up and serving: everything [`run`] and [`spawn`] share.
struct Started {
    state: AppState,
    listener: TcpListener,
    address: std::net::SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    refresh: Option<auth::RefreshTask>,
    flusher: auth::usage::Flusher,
    background: Vec<tokio::task::JoinHandle<()>>,
    cut_drain: Arc<tokio::sync::Notify>,
}

impl Started {
    async fn start(
        config: Config,
        listener: TcpListener,
        options: RunOptions,
        clock: clock::Clock,
    ) -> anyhow::Result<Self> {
        // Every HTTP/1.1 answer carries a `Date`, which hyper cannot write for a time before
        // 1970: each answer would end in a panic and an empty reply, `/healthz` too.
        clock::after_epoch(clock.wall())?;
        let tls = match options.tls {
            Some(acceptor) => Some(acceptor),
            None => config.tls.as_ref().map(server::load_tls).transpose()?,
        };
        // A PostgreSQL that does not answer yet (a restart during an outage) does not stop
        // start-up: credentials verify without it, so the service serves, and the migrations
        // are applied once it answers (until then the routes that need it answer 503).
        let (store, unreachable) =
            Store::connect_or_wait(&config.database_url, options.migrate).await?;
        let mut background = Vec::new();
        match unreachable {
            None if options.migrate => {
                warn_unknown_migrations(&store.migrate_reading_unknown().await?);
            }
            // `--no-migrate`: a database behind this binary would fail every query on a table or
            // column it lacks, so it is found now, said loudly, and watched until another
            // process (`edgegate migrate`, the next release's release_command) catches it up.
            None => {
                // One reading for both: a second, of the unknown ones, could fail after a
                // first that found none missing, and nothing read them again.
                let checked = store.read_migrations().await;
                let reported = match checked {
                    Ok(read) => {
                        warn_unknown_migrations(&read.unknown);
                        if read.missing == 0 {
                            None
                        } else {
                            report_missing_migrations(&store, read.missing);
                            Some(true)
                        }
                    }
                    Err(err) => {
                        tracing::warn!(
                            error = crate::error::causes(&err),
                            "cannot read which migrations the database has applied; not ready \
                             until they are read"
                        );
                        store.migrations_unread();
                        Some(false)
                    }
                };
                if let Some(read) = reported {
                    background.push(spawn_schema_watch(store.clone(), read));
                }
            }
            Some(cause) => {
                tracing::error!(
                    error = crate::error::causes(&cause),
                    "the database does not answer; serving without it until it does"
                );
                background.push(if options.migrate {
                    spawn_migration_retry(store.clone())
                } else {
                    store.migrations_unread();
                    spawn_schema_watch(store.clone(), false)
                });
            }
        }
        if config.jwt.issuers.is_none() {
            tracing::warn!(
                "neither JWT_ISSUERS nor SUPABASE_URL is set: the iss claim of tokens is not \
                 checked"
            );
        }
        let state = AppState::with_clock(config, store.clone(), clock);
        let refresh = state.auth.spawn_refresh();
        let flusher =
            auth::usage::spawn_flusher(state.usage.clone(), store.clone(), state.clock.clone());
        background.push(twilio::send::spawn_unanswered_sweeper(
            store.clone(),
            state.clock.clone(),
            state.config.twilio.send_budget,
        ));
        background.extend(twilio::recover::spawn_status_recovery(
            store,
            &state.twilio_http,
            &state.config,
            state.clock.clone(),
            state.sms_metrics.clone(),
        ));
        background.extend(spawn_reconciler(&state));
        let address = listener
            .local_addr()
            .context("reading the listen address")?;
        Ok(Self {
            state,
            listener,
            address,
            tls,
            refresh,
            flusher,
            background,
            cut_drain: options.cut_drain,
        })
    }

    /// Serves until `shutdown` resolves, drains, then stops the background tasks, writes the
    /// usage counts, waits for SMS sends whose callers are gone, and closes the database.
    async fn serve(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let store = self.state.store.clone();
        let usage = self.state.usage.clone();
        let sms_sends = self.state.sms_sends.clone();
        let clock = self.state.clock.clone();
        let config = &self.state.config;
        let (drain, connections) = (config.shutdown_drain, config.connections);
        tracing::info!(
            address = %self.address,
            tls = self.tls.is_some(),
            database = store.kind().as_str(),
            "edgegate listening"
        );
        if let Some(traces) = &config.traces {
            tracing::info!(
                endpoint = %crate::config::shown_url(&traces.endpoint),
                "exporting traces over OTLP"
            );
        }
        let app = app(self.state);
        // When the stop was asked for: the drain and the steps after it share one deadline
        // from then, so a drain that ended early leaves its time to the steps.
        let asked = std::sync::OnceLock::new();
        let shutdown = async {
            shutdown.await;
            let _ = asked.set(tokio::time::Instant::now());
        };
        // When the drain was cut short: the steps after it then get [`AFTER_DRAIN`] from then.
        let cut_at = std::sync::OnceLock::new();
        let cut = async {
            self.cut_drain.notified().await;
            let _ = cut_at.set(tokio::time::Instant::now());
        };
        let served = server::serve_with_limits(
            app,
            self.listener,
            self.tls,
            shutdown,
            cut,
            drain,
            connections,
        )
        .await
        .context("serving HTTP");
        let mut deadline = asked
            .get()
            .copied()
            .unwrap_or_else(tokio::time::Instant::now)
            + drain
            + AFTER_DRAIN;
        if let Some(&cut_at) = cut_at.get() {
            deadline = deadline.min(cut_at + AFTER_DRAIN);
        }
        // The usage counts first (with the SMS sends still under way): they are the legacy
        // verdict's evidence, and what is left of the kill timeout after the drain is short.
        // Whether their flush came to an end, written or failed: one the deadline cut off is
        // said lost below, since its own line then never comes.
        let usage_settled = std::sync::atomic::AtomicBool::new(false);
        // Whether they were written (a flush may end in a failure: its line says so).
        let usage_written = std::sync::atomic::AtomicBool::new(false);
        let finish = async {
            for task in self.background {
                task.abort();
            }
            let retiring = self.flusher.stop().await;
            // A send the drain cut its caller off from still records Twilio's answer (at most
            // the send's budget and its writes; the deadline bounds it in any case), at the same
            // time as the counts are written: neither waits for the other on a slow database.
            let (flushed, ()) = tokio::join!(
                async {
                    let flushed = usage.flush(&store).await;
                    usage_settled.store(true, std::sync::atomic::Ordering::Relaxed);
                    usage_written.store(flushed.is_ok(), std::sync::atomic::Ordering::Relaxed);
                    // Every count written: no hole for another instance to take this one's row
                    // for. Kept when they are lost, so the verdict heeds the hole.
                    if flushed.is_ok()
                        && let Err(err) = retiring.retire(&store, clock.now_ms()).await
                    {
                        tracing::warn!(
                            error = crate::error::causes(&err),
                            "this instance's key usage counts were written but its row in \
                             usage_writers stays: other instances will take them for lost, and \
                             the legacy verdict waits a whole window"
                        );
                    }
                    flushed
                },
                sms_sends.idle()
            );
            if let Err(err) = flushed {
                tracing::warn!(
                    error = crate::error::causes(&err),
                    "key usage lost at shutdown"
                );
            }
            if let Some(refresh) = self.refresh {
                // A fetch under way is not waited for: nothing will use what it brings.
                let _ = tokio::time::timeout(REFRESH_STOP, refresh.stop()).await;
            }
            store.close().await;
        };
        let steps_cut = tokio::time::timeout_at(deadline, finish).await.is_err();
        if !usage_settled.load(std::sync::atomic::Ordering::Relaxed) {
            // Its own line, the one operators look for (OPERATIONS.md, MIGRATION.md §4.1).
            tracing::warn!(
                error = "the database did not take them before the stop's deadline",
                "key usage lost at shutdown"
            );
        }
        if steps_cut {
            tracing::warn!(
                "the steps after the drain ran past the drain's limit plus {} s; stopped \
                 without finishing them",
                AFTER_DRAIN.as_secs()
            );
        }
        let drained = served?;
        // `edgegate stopped` says a clean stop: every request finished and every step after
        // the drain did. Anything else is a failure (exit 1), said in one line.
        let usage_lost = !usage_written.load(std::sync::atomic::Ordering::Relaxed);
        if let Some(failure) = stop_failure(
            drain,
            drained,
            cut_at.get().is_some(),
            steps_cut,
            usage_lost,
        ) {
            anyhow::bail!(failure);
        }
        tracing::info!("edgegate stopped");
        Ok(())
    }
}

/// What a stop left undone, when it did: requests the drain dropped (its time over, or cut
/// short by a second signal), steps after it cut off by their deadline.
fn stop_failure(
    drain: Duration,
    drained: server::Drained,
    cut: bool,
    steps_cut: bool,
    usage_lost: bool,
) -> Option<String> {
    let dropped = match drained.dropped_requests {
        0 => "no request was in flight".to_owned(),
        1 => "1 request still in flight was dropped".to_owned(),
        n => format!("{n} requests still in flight were dropped"),
    };
    let mut failures = Vec::new();
    if cut {
        failures.push(format!("the drain was cut short: {dropped}"));
    } else if drained.dropped_requests > 0 {
        failures.push(format!(
            "the drain's {} s ran out: {dropped}",
            drain.as_secs()
        ));
    }
    if steps_cut {
        // The counts' write is named only when they were not written (`key usage lost at
        // shutdown` says so too then).
        let unfinished = if usage_lost {
            "the last write of the key-usage counts, the SMS sends under way, the database's close"
        } else {
            "the SMS sends under way, the database's close; the key-usage counts were written"
        };
        failures.push(format!(
            "the steps after the drain ran past its limit plus {} s and were stopped \
             unfinished ({unfinished})",
            AFTER_DRAIN.as_secs()
        ));
    }
    (!failures.is_empty()).then(|| failures.join("; "))
}

/// The longest pause between two attempts to migrate a database that did not answer at start.
const MIGRATION_RETRY_MAX: Duration = Duration::from_secs(10);

/// Applies the migrations once the database answers, retrying with a capped backoff (each
/// attempt waits for a connection for a few seconds too); the store is ready from then on.
/// Aborted at shutdown with the other background tasks.
fn spawn_migration_retry(store: Store) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for attempt in 1u32.. {
            let pause =
                backoff::exponential(Duration::from_millis(500), attempt, MIGRATION_RETRY_MAX);
            tokio::time::sleep(backoff::equal_jitter(pause)).await;
            match store.migrate_reading_unknown().await {
                Ok(unknown) => {
                    tracing::info!("the database answers; migrations applied, serving it");
                    warn_unknown_migrations(&unknown);
                    return;
                }
                // Still away: expected during an outage. Anything else (a refused password, a
                // failing migration) will not clear by itself, but a fix may come without a
                // restart (a role granted, a database created): said as an error, and retried.
                Err(err) if store::is_unavailable(&err) => tracing::warn!(
                    error = crate::error::causes(&err),
                    attempt,
                    "the database still cannot be migrated; retrying"
                ),
                Err(err) => tracing::error!(
                    error = crate::error::causes(&err),
                    attempt,
                    "the database answers but cannot be migrated; the routes that need it \
                     answer 503 until it can; retrying"
                ),
            }
        }
    })
}

/// Warns of the applied migrations this build does not know, `unknown` (oldest first), if any
/// (a newer release's): served on purpose, since a rollback must start on the newer schema, but
/// the operator should know it is one, and that it is safe only while the newer release's
/// migrations were additive. Said once, at start or, where the database did not answer then,
/// once it does: from the versions a migration read under its lock
/// ([`Store::migrate_reading_unknown`]), or `serve --no-migrate`'s own reading
/// ([`Store::read_migrations`]).
fn warn_unknown_migrations(unknown: &[i64]) {
    if let Some(newest) = unknown.last() {
        let count = unknown.len();
        let migrations = if count == 1 {
            "migration"
        } else {
            "migrations"
        };
        tracing::warn!(
            count,
            newest,
            "the database has {count} applied {migrations} this build does not know, the newest \
             {newest}: a newer release migrated it. Expected only while a rolling deploy of a \
             newer release still starts this release's older Machines (a restart, a crash), or \
             after a rollback to this release (or a backup of a newer one restored), and safe \
             only while the newer release's migrations were additive (docs/DEPLOY.md, 6. Roll \
             back); otherwise deploy the newer release again, or fix forward"
        );
    }
}

/// How often `serve --no-migrate` reads the applied migrations again while the database lacks
/// some of the binary's (or could not be read): one small query.
const SCHEMA_RECHECK: Duration = Duration::from_secs(3);
/// How often a reading of the applied migrations that keeps failing is warned of.
const SCHEMA_WARN_EVERY: Duration = Duration::from_secs(60);

fn report_missing_migrations(store: &Store, missing: usize) {
    tracing::error!(
        missing,
        "the database lacks {missing} of this binary's {} migrations (serve --no-migrate): run \
         `edgegate migrate`; until then /readyz and the routes that need the database answer \
         503",
        store.shipped_migration_count()
    );
}

/// For `serve --no-migrate`: reads the applied migrations every [`SCHEMA_RECHECK`] until the
/// database has all of this binary's (migrated by another process); the store is ready from
/// then on. `read` when start-up has read them (and said that it lacks some, and warned of the
/// ones this build does not know): else the first reading that succeeds does both. Aborted at
/// shutdown with the other background tasks.
fn spawn_schema_watch(store: Store, mut read: bool) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last_warned = None::<std::time::Instant>;
        loop {
            tokio::time::sleep(SCHEMA_RECHECK).await;
            match store.read_migrations().await {
                Ok(now) => {
                    if !read {
                        warn_unknown_migrations(&now.unknown);
                    }
                    if now.missing == 0 {
                        if read {
                            tracing::info!(
                                "the database has this binary's migrations now; serving it"
                            );
                        }
                        return;
                    }
                    if !read {
                        report_missing_migrations(&store, now.missing);
                        read = true;
                    }
                }
                // Warned at most every minute (the reading is tried every 3 s).
                Err(err) if last_warned.is_none_or(|at| at.elapsed() >= SCHEMA_WARN_EVERY) => {
                    tracing::warn!(
                        error = crate::error::causes(&err),
                        "cannot read which migrations the database has applied; not ready \
                         until they are read"
                    );
                    last_warned = Some(std::time::Instant::now());
                }
                Err(_) => {}
            }
        }
    })
}

/// The periodic Stripe reconciliation, when `STRIPE_RECONCILE_INTERVAL_SECONDS` is on.
fn spawn_reconciler(state: &AppState) -> Option<tokio::task::JoinHandle<()>> {
    let interval = state.config.stripe.reconcile_interval?;
    let client = stripe::StripeClient::from_config(
        state.stripe_http.clone(),
        &state.config.stripe,
        state.stripe_retry,
    )?;
    Some(stripe::reconcile::spawn_periodic(
        state.store.clone(),
        client,
        state.clock.clone(),
        interval,
        state.reconcile_metrics.clone(),
        state.stripe_metrics.clone(),
    ))
}

/// Resolves on SIGTERM (Fly's kill signal) or SIGINT (Ctrl-C); see [`shutdown_signals`].
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    shutdown_signals().0
}

/// SIGTERM (Fly's kill signal) and SIGINT (Ctrl-C), listened for by one task from the moment
/// this is called, not when first polled (as PID 1 in a container, a signal that comes before a
/// handler is set is dropped by the kernel), until the process ends: the first future resolves
/// on the first signal (logged), the second with the name of the next one, which `main` takes to
/// cut the drain short ([`RunOptions::cut_drain`]). No signal between them goes unheard. Call it
/// within the runtime.
pub fn shutdown_signals() -> (
    impl Future<Output = ()> + Send + 'static,
    impl Future<Output = &'static str> + Send + 'static,
) {
    let (first_seen, first) = tokio::sync::oneshot::channel::<()>();
    let (second_seen, second) = tokio::sync::oneshot::channel::<&'static str>();
    let mut signals = Signals::new();
    tokio::spawn(async move {
        let name = signals.next().await;
        tracing::info!("{name} received");
        let _ = first_seen.send(());
        let _ = second_seen.send(signals.next().await);
    });
    let first = async move {
        if first.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let second = async move {
        match second.await {
            Ok(name) => name,
            Err(_) => std::future::pending().await,
        }
    };
    (first, second)
}

/// The name of the first SIGTERM or SIGINT, listened for from the moment this is called: for the
/// commands that end by themselves (`migrate`, `check`), which, with no handler, ignored both as
/// PID 1 in a container (the image's entrypoint) until `docker stop` killed them. Call it within
/// the runtime.
pub fn stop_signal() -> impl Future<Output = &'static str> + Send + 'static {
    let mut signals = Signals::new();
    async move { signals.next().await }
}

/// The stop signals' listeners, set when made.
struct Signals {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let listen = |kind: SignalKind, name: &str| {
                signal(kind)
                    .inspect_err(|err| tracing::error!(error = %err, "cannot listen for {name}"))
                    .ok()
            };
            Self {
                interrupt: listen(SignalKind::interrupt(), "SIGINT"),
                terminate: listen(SignalKind::terminate(), "SIGTERM"),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// The next signal's name; never, for a signal that could not be listened for.
    async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            async fn on(listener: &mut Option<tokio::signal::unix::Signal>) {
                let received = match listener {
                    Some(listener) => listener.recv().await.is_some(),
                    None => false,
                };
                if !received {
                    std::future::pending::<()>().await;
                }
            }
            tokio::select! {
                () = on(&mut self.interrupt) => "SIGINT",
                () = on(&mut self.terminate) => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        match tokio::signal::ctrl_c().await {
            Ok(()) => "Ctrl-C",
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for Ctrl-C");
                std::future::pending().await
            }
        }
    }
}
