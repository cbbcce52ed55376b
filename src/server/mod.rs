//! Serving: the accept loop (plain TCP or TLS), connection limits, graceful shutdown, and the
//! middleware stack.

mod conn;
mod files;
pub mod middleware;
mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use futures_util::FutureExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

pub use crate::config::ConnectionLimits;
pub use files::{Fit, RESERVED_FILES, fit_connections, raise_file_limit, serve_file_limit};
pub use tls::load_tls;

use conn::{ConnState, Received, TimedIo, Tracked};

/// The largest request head (request line and headers) read over HTTP/1: what a connection may
/// make the server buffer before it has a request. Over it, hyper answers 431. hyper's
/// `max_buf_size`, which this sets, caps the HTTP/1 write buffer too (its default, about 400 KB,
/// for both), which bounds only a body written in several chunks: hyper reads a connection's
/// next request only once the answer before it is written whole to the socket (or once it has
/// read the body of a request whose handler answered without reading it: the next request then
/// waits for the flush, under the answer's deadline, see `conn`), so a client that pipelines
/// requests and reads none of the answers makes the server hold one answer and what it has read
/// of the requests behind it (this much at most). HTTP/2's header list (names and values, and 32
/// bytes a header) keeps h2's default, 16 KiB: each of a connection's [`MAX_CONCURRENT_STREAMS`]
/// streams holds its headers while its request runs.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// HTTP/2 streams one connection may have open at once; a stream past it is refused
/// (`REFUSED_STREAM`, which a client may retry). Each stream is a request that may hold a body
/// up to its route's limit, so this multiplies what one connection can make the server hold
/// (all requests' bodies together are bounded by `body::BODY_BUDGET` besides). 32
/// is more than a page has in flight to one API (a browser queues what is past the limit on the
/// connection, where over HTTP/1.1 it would wait for one of 6 connections), a third of the 100
/// it was.
pub const MAX_CONCURRENT_STREAMS: u32 = 32;
/// How often an HTTP/2 connection is pinged, and how long the answer may take, so a peer that
/// vanished does not hold its connection until the idle timeout.
pub const HTTP2_KEEP_ALIVE: Duration = Duration::from_secs(20);

/// How a drain ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// Requests whose handlers still ran when the drain ended (its time over, or cut short):
    /// stopped then, their clients answered nothing. 0 when every request finished.
    pub dropped_requests: usize,
}

/// Serves `app` on `listener` with the default [`ConnectionLimits`]; see [`serve_with_limits`].
pub async fn serve(
    app: Router,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> std::io::Result<Drained> {
    serve_with_limits(
        app,
        listener,
        tls,
        shutdown,
        std::future::pending(),
        drain,
        ConnectionLimits::default(),
    )
    .await
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting (the listener is
/// closed, so new connections are refused) and lets in-flight requests finish for up to `drain`,
/// or until `cut_drain` resolves; then stops what still runs and says how many requests that
/// dropped.
/// At most `limits.max_connections` connections are open at once: past it, the loop stops
/// accepting until one closes, and new clients wait in the kernel's backlog.
pub async fn serve_with_limits(
    app: Router,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
    cut_drain: impl Future<Output = ()>,
    drain: Duration,
    limits: ConnectionLimits,
) -> std::io::Result<Drained> {
    let graceful = GracefulShutdown::new();
    let (tasks, mut tasks_ended) = Tasks::new();
    let builder = builder(tasks.clone());
    let service = TowerToHyperService::new(
        app.map_request(|req: Request<Received<Incoming>>| req.map(Body::new)),
    );
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let open = OpenConnections::default();
    let mut backoff = AcceptBackoff::default();
    tokio::pin!(shutdown);
    loop {
        // A free slot now, or none: then the client is accepted first and waits for one, so
        // that an idle connection is closed for a client that is there, never in advance.
        let free = slots.clone().try_acquire_owned().ok();
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => {
                    backoff.reset();
                    pair
                }
                Err(err) => {
                    let pause = backoff.failed(&err);
                    tokio::select! {
                        () = tokio::time::sleep(pause) => continue,
                        () = &mut shutdown => break,
                    }
                }
            },
            () = &mut shutdown => break,
        };
        let slot = match free {
            Some(slot) => slot,
            None => match slot_for_waiting_client(&slots, &open, &mut shutdown).await {
                Some(slot) => slot,
                None => break,
            },
        };
        let _ = stream.set_nodelay(true);
        let state = ConnState::new(&limits);
        open.add(&state, limits.max_connections);
        let io = TimedIo::new(stream, state.clone());
        let service = Tracked::new(service.clone(), state);
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let head_timeout = limits.header_read_timeout;
        tasks.spawn(async move {
            // Held until the connection ends: a free slot is what lets the loop accept again.
            let _slot = slot;
            let served = match tls {
                None => {
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
                    watcher.watch(conn.into_owned()).await
                }
                Some(acceptor) => {
                    // The IO's own deadline covers the handshake; this bound is the backstop.
                    let stream = match tokio::time::timeout(head_timeout, acceptor.accept(io)).await
                    {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(err)) => {
                            tracing::debug!(%peer, error = %err, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    watcher.watch(conn.into_owned()).await
                }
            };
            if let Err(err) = served {
                tracing::debug!(%peer, error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    // Its executor is a handle on the tasks, which would keep `tasks.stop` waiting.
    drop(builder);
    // hyper closes an idle keep-alive connection at once, but waits for a connection's first
    // request head once begun (and the TLS handshake before it is not its to end) up to the
    // head timeout: a client stalled mid-head would hold the drain for nothing. Such a
    // connection gets `UNSTARTED_GRACE` for its request to come whole, then is closed.
    let awaiting_first_request = open.close_unstarted();
    tracing::info!(
        in_flight_connections = graceful.count(),
        awaiting_first_request,
        grace_seconds = conn::UNSTARTED_GRACE.as_secs(),
        drain_seconds = drain.as_secs(),
        "shutting down: no new connections, draining"
    );
    let ended = tokio::select! {
        drained = tokio::time::timeout(drain, graceful.shutdown()) => {
            drained.is_err().then_some("drain period over; closing the connections still open")
        }
        () = cut_drain => Some("drain cut short; closing the connections still open"),
    };
    let mut drained = Drained::default();
    if let Some(why) = ended {
        // What the stop below drops; a connection only lingering, or waiting for its client to
        // take an answer, drops no request.
        drained.dropped_requests = open.requests_in_flight();
        tracing::warn!(dropped_requests = drained.dropped_requests, "{why}");
    }
    // Whatever still runs (connections, and HTTP/2 streams, each a task of its own) is dropped
    // now, before the caller closes the store and sends the last spans.
    tasks.stop(&mut tasks_ended).await;
    Ok(drained)
}

/// A slot for a client accepted while every slot was taken (it waits for no more than that one
/// accept; the clients after it wait in the kernel's backlog): an idle keep-alive connection,
/// nothing under way and its client not waiting on it (no answer still being written to it,
/// unless its client has taken none of it for the header timeout), gives its slot up, as nginx
/// closes its idle connections, rather than keep the new client waiting up to the idle timeout.
/// Looked for again while waiting: a connection busy now may be idle later. `None` at shutdown.
async fn slot_for_waiting_client(
    slots: &Arc<Semaphore>,
    open: &OpenConnections,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let wait = slots.clone().acquire_owned();
    tokio::pin!(wait);
    loop {
        if let Some(slot) = (&mut wait).now_or_never() {
            // The semaphore is never closed.
            return slot.ok();
        }
        open.close_longest_idle();
        tokio::select! {
            slot = &mut wait => return slot.ok(),
            () = tokio::time::sleep(IDLE_CHECK) => {}
            () = shutdown.as_mut() => return None,
        }
    }
}

/// How often, while every connection slot is taken, an idle keep-alive connection is looked for.
const IDLE_CHECK: Duration = Duration::from_millis(100);

/// The open connections' states, to close the longest-idle keep-alive connection when every
/// slot is taken. Entries of ended connections are dropped as the list grows, so it holds at
/// most twice the connection limit.
#[derive(Default)]
struct OpenConnections(std::sync::Mutex<Vec<std::sync::Weak<ConnState>>>);

impl OpenConnections {
    fn list(&self) -> std::sync::MutexGuard<'_, Vec<std::sync::Weak<ConnState>>> {
        // A list of weak references is consistent whatever panicked while it was held.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, state: &Arc<ConnState>, max_connections: usize) {
        let mut list = self.list();
        if list.len() >= max_connections.saturating_mul(2) {
            list.retain(|state| state.strong_count() > 0);
        }
        list.push(Arc::downgrade(state));
    }

    /// Gives every connection on which no request has come whole yet `UNSTARTED_GRACE` at most
    /// for it (see [`ConnState::close_if_unstarted`]); how many there were.
    fn close_unstarted(&self) -> usize {
        let list = self.list();
        list.iter()
            .filter_map(std::sync::Weak::upgrade)
            .filter(|state| state.close_if_unstarted())
            .count()
    }

    /// Requests whose handler has not answered yet, on every open connection.
    fn requests_in_flight(&self) -> usize {
        let list = self.list();
        list.iter()
            .filter_map(std::sync::Weak::upgrade)
            .map(|state| state.requests_in_flight())
            .sum()
    }

    /// Closes the keep-alive connection idle the longest, if one is, one holding no answer
    /// its client has not taken first ([`ConnState::idle_rank`]).
    fn close_longest_idle(&self) {
        let longest = {
            let mut list = self.list();
            list.retain(|state| state.strong_count() > 0);
            list.iter()
                .filter_map(std::sync::Weak::upgrade)
                .filter_map(|state| state.idle_rank().map(|rank| (rank, state)))
                .min_by_key(|(rank, _)| *rank)
        };
        if let Some((_, state)) = longest {
            state.close_if_idle();
        }
    }
}

/// The tasks serving connections, and the HTTP/2 streams hyper spawns for them (this is its
/// executor): stopped all at once when the drain ends.
#[derive(Clone)]
struct Tasks {
    /// Becomes `true` when every task must stop.
    stop: watch::Receiver<bool>,
    stopping: Arc<watch::Sender<bool>>,
    /// Held by each task while it runs: the channel closes once the last one has ended.
    alive: mpsc::Sender<()>,
}

impl Tasks {
    /// How long the stopped tasks may take to be dropped (each is dropped at its next poll).
    const STOP_WAIT: Duration = Duration::from_secs(1);

    fn new() -> (Self, mpsc::Receiver<()>) {
        let (stopping, stop) = watch::channel(false);
        let (alive, ended) = mpsc::channel(1);
        let tasks = Self {
            stop,
            stopping: Arc::new(stopping),
            alive,
        };
        (tasks, ended)
    }

    /// Runs `task` until it ends or [`Tasks::stop`] drops it.
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut stop = self.stop.clone();
        let alive = self.alive.clone();
        tokio::spawn(async move {
            let _alive = alive;
            tokio::select! {
                () = task => {}
                _ = stop.wait_for(|stop| *stop) => {}
            }
        });
    }

    /// Drops every task still running and waits (boundedly) until each has been dropped.
    async fn stop(self, ended: &mut mpsc::Receiver<()>) {
        let Self {
            stopping, alive, ..
        } = self;
        stopping.send_replace(true);
        drop(alive);
        // `None` once every task's sender is gone. The builder's clones of `Tasks` are gone with
        // the loop; a task that ignores being dropped past the bound is left to the runtime.
        let _ = tokio::time::timeout(Self::STOP_WAIT, ended.recv()).await;
    }
}

impl<F> hyper::rt::Executor<F> for Tasks
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        self.spawn(async move {
            future.await;
        });
    }
}

/// hyper's settings. HTTP/1 gets no timer on purpose: with one, hyper's `header_read_timeout`
/// (30 s unless set) also closes idle keep-alive connections; the deadlines are kept by
/// [`conn`] instead. `pipeline_flush` stays off: it would batch pipelined answers, and it also
/// lifts the cap on a connection's write buffer, so a client that pipelines and never reads
/// could make the server hold every answer (`tests/it/hostile.rs`).
fn builder(tasks: Tasks) -> Builder<Tasks> {
    let mut builder = Builder::new(tasks);
    builder
        .http1()
        .header_read_timeout(None)
        .max_buf_size(MAX_HEAD_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(HTTP2_KEEP_ALIVE)
        .keep_alive_timeout(HTTP2_KEEP_ALIVE)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    builder
}

/// Pauses after failed accepts. Out of file descriptors (or kernel memory) the listener fails at
/// once on every call, so the pause doubles up to a second; a client that gave up before we
/// accepted it costs nothing. Logged at most once per second, with the count of failures since.
#[derive(Debug, Default)]
struct AcceptBackoff {
    pause: Duration,
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    fn reset(&mut self) {
        self.pause = Duration::ZERO;
    }

    fn failed(&mut self, err: &std::io::Error) -> Duration {
        use std::io::ErrorKind;
        if matches!(
            err.kind(),
            ErrorKind::ConnectionAborted
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionRefused
        ) {
            return Duration::ZERO;
        }
        self.pause = (self.pause * 2).clamp(Self::FIRST, Self::MAX);
        self.unlogged += 1;
        let now = Instant::now();
        if self
            .last_logged
            .is_none_or(|last| now.duration_since(last) >= Duration::from_secs(1))
        {
            tracing::warn!(
                error = %err,
                failures = self.unlogged,
                pause_ms = self.pause.as_millis(),
                "accept failed; pausing before the next accept"
            );
            self.last_logged = Some(now);
            self.unlogged = 0;
        }
        self.pause
    }
}
