//! Per-connection deadlines: the request-head timeout and the keep-alive idle timeout.
//!
//! hyper has no idle timeout, and its HTTP/1 `header_read_timeout` starts again as soon as a
//! response is written, so it would also close every keep-alive connection idle for longer than
//! the head timeout (10 s), well before a proxy's own idle timeout. Both deadlines live here
//! instead, kept by the connection's IO ([`TimedIo`]) and moved by the service wrapper
//! ([`Tracked`]), which sees each request start and its handler end:
//!
//! - from accept, the TLS handshake and the first request head must arrive within
//!   `header_read_timeout`;
//! - while no request is in flight, the connection is closed after `idle_timeout`;
//! - on an idle HTTP/1 connection, the first byte of the next request starts
//!   `header_read_timeout` for that head (the earlier of the two deadlines wins);
//! - while a handler runs there is no deadline here: the route's own timeout applies; once it has
//!   answered, sending the answer counts as idle time, so a client that does not read it (an
//!   HTTP/1 client that never reads, an HTTP/2 client that never opens its flow-control window)
//!   is closed after `idle_timeout`. Every answer is small and buffered whole, so a client that
//!   reads at all has it well within that.
//!
//! An expired deadline makes the next read or write fail with `TimedOut`, and hyper closes the
//! connection. The cost is an atomic load per read and a lazily allocated timer per connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::http::{Request, Response, Version};
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::config::ConnectionLimits;

/// `deadline_ms` while a request is in flight.
const NO_DEADLINE: u64 = u64::MAX;

/// What one connection's IO and service share.
#[derive(Debug)]
pub(crate) struct ConnState {
    epoch: Instant,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    /// Requests whose handler has not answered yet; changed only under this lock, together
    /// with `deadline_ms`, so a request start and a response end on two HTTP/2 streams cannot
    /// leave an idle deadline set while a request runs.
    in_flight: Mutex<usize>,
    /// Milliseconds since `epoch`, or [`NO_DEADLINE`].
    deadline_ms: AtomicU64,
    /// An HTTP/1 request was served, so bytes on the idle connection start the next head.
    http1: AtomicBool,
    /// The IO task, woken when an idle deadline is set from another task (an HTTP/2 stream).
    waker: AtomicWaker,
}

impl ConnState {
    /// A connection accepted now: its first head is due within the header timeout.
    pub(crate) fn new(limits: &ConnectionLimits) -> Arc<Self> {
        let state = Self {
            epoch: Instant::now(),
            header_read_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
            in_flight: Mutex::new(0),
            deadline_ms: AtomicU64::new(NO_DEADLINE),
            http1: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        };
        state.deadline_ms.store(
            state.ms_after_now(limits.header_read_timeout),
            Ordering::Release,
        );
        Arc::new(state)
    }

    fn ms_after_now(&self, timeout: Duration) -> u64 {
        let at = self.epoch.elapsed().saturating_add(timeout).as_millis();
        u64::try_from(at).unwrap_or(NO_DEADLINE - 1)
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, usize> {
        // A count is always consistent; a panic elsewhere does not make it unusable.
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn deadline(&self) -> Option<Instant> {
        match self.deadline_ms.load(Ordering::Acquire) {
            NO_DEADLINE => None,
            ms => Some(self.epoch + Duration::from_millis(ms)),
        }
    }

    fn request_started(self: &Arc<Self>, version: Version) -> InFlight {
        let mut in_flight = self.in_flight();
        *in_flight += 1;
        self.deadline_ms.store(NO_DEADLINE, Ordering::Release);
        if version < Version::HTTP_2 {
            self.http1.store(true, Ordering::Relaxed);
        }
        InFlight(self.clone())
    }

    fn request_finished(&self) {
        let mut in_flight = self.in_flight();
        *in_flight = in_flight.saturating_sub(1);
        if *in_flight == 0 {
            self.deadline_ms
                .store(self.ms_after_now(self.idle_timeout), Ordering::Release);
            drop(in_flight);
            self.waker.wake();
        }
    }

    /// Bytes arrived: on an idle HTTP/1 connection they begin the next head.
    fn bytes_read(&self) {
        if !self.http1.load(Ordering::Relaxed)
            || self.deadline_ms.load(Ordering::Acquire) == NO_DEADLINE
        {
            return;
        }
        let in_flight = self.in_flight();
        if *in_flight == 0 {
            let head_due = self.ms_after_now(self.header_read_timeout);
            self.deadline_ms.fetch_min(head_due, Ordering::AcqRel);
        }
    }
}

/// Marks one request in flight until dropped (when its handler has answered, or with the
/// request's future if the connection ends first).
#[derive(Debug)]
struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// The connection's IO, failing with `TimedOut` once the connection's deadline has passed.
#[derive(Debug)]
pub(crate) struct TimedIo<T> {
    inner: T,
    state: Arc<ConnState>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<T> TimedIo<T> {
    pub(crate) fn new(inner: T, state: Arc<ConnState>) -> Self {
        Self {
            inner,
            state,
            timer: None,
        }
    }

    /// Called when the inner IO is not ready: fails if the deadline has passed, else arranges to
    /// be polled again when it passes or moves.
    fn pending_or_expired<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        self.state.waker.register(cx.waker());
        let Some(deadline) = self.state.deadline() else {
            return Poll::Pending;
        };
        let deadline = tokio::time::Instant::from_std(deadline);
        let timer = match &mut self.timer {
            Some(timer) => {
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                timer
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Err(timed_out()))
    }

    fn expired(&self) -> bool {
        self.state
            .deadline()
            .is_some_and(|deadline| Instant::now() >= deadline)
    }
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the connection's header-read or idle timeout passed",
    )
}

impl<T: AsyncRead + Unpin> AsyncRead for TimedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    // A client dripping bytes fast enough never lets the read go pending.
                    if this.expired() {
                        return Poll::Ready(Err(timed_out()));
                    }
                    this.state.bytes_read();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => this.pending_or_expired(cx),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TimedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending => this.pending_or_expired(cx),
            ready => ready,
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.pending_or_expired(cx),
            ready => ready,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.pending_or_expired(cx),
            ready => ready,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The service of one connection: counts requests in flight for [`ConnState`].
#[derive(Clone, Debug)]
pub(crate) struct Tracked<S> {
    inner: S,
    state: Arc<ConnState>,
}

impl<S> Tracked<S> {
    pub(crate) fn new(inner: S, state: Arc<ConnState>) -> Self {
        Self { inner, state }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> hyper::service::Service<Request<ReqBody>> for Tracked<S>
where
    S: hyper::service::Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn call(&self, req: Request<ReqBody>) -> Self::Future {
        let in_flight = self.state.request_started(req.version());
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await;
            // The handler is done: sending the answer is the connection's, under its idle
            // deadline (an HTTP/2 client that never opens its window must not hold it for ever).
            drop(in_flight);
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            max_connections: 1,
            max_connections_set: true,
        }
    }

    fn due_in(state: &ConnState) -> Option<Duration> {
        state
            .deadline()
            .map(|deadline| deadline.saturating_duration_since(Instant::now()))
    }

    #[test]
    fn deadlines_follow_the_requests_in_flight() {
        let state = ConnState::new(&limits());
        let head = due_in(&state).unwrap();
        assert!(head <= Duration::from_secs(10) && head > Duration::from_secs(9));

        let first = state.request_started(Version::HTTP_11);
        assert_eq!(state.deadline(), None, "no deadline while a request runs");
        let second = state.request_started(Version::HTTP_11);
        drop(first);
        assert_eq!(state.deadline(), None, "one request still runs");
        drop(second);
        let idle = due_in(&state).unwrap();
        assert!(idle > Duration::from_secs(70), "idle: {idle:?}");

        // The first byte of the next HTTP/1 head brings the deadline to the head timeout.
        state.bytes_read();
        let head = due_in(&state).unwrap();
        assert!(head <= Duration::from_secs(10), "next head: {head:?}");
    }

    #[test]
    fn bytes_on_an_idle_http2_connection_do_not_shorten_it() {
        let state = ConnState::new(&limits());
        drop(state.request_started(Version::HTTP_2));
        // Pings and settings arrive on an idle HTTP/2 connection; only the idle timeout applies.
        state.bytes_read();
        assert!(due_in(&state).unwrap() > Duration::from_secs(70));
    }
}
