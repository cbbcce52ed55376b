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
//! - while no request is in flight and every answer is sent, the connection is closed after
//!   `idle_timeout`;
//! - on an idle HTTP/1 connection, the first byte of the next request starts
//!   `header_read_timeout` for that head (the earlier of the two deadlines wins);
//! - while a handler runs there is no deadline here: the route's own timeout applies;
//! - at the start of a drain, a connection on which no request has come whole yet (its TLS
//!   handshake or its first head under way, or nothing sent) is given [`UNSTARTED_GRACE`] at
//!   most, instead of the rest of its header timeout: an HTTP/1 head hyper has begun reading is
//!   served if it comes whole by then, and one that never does (a client stalled mid-head) no
//!   longer holds the drain up to the header timeout ([`ConnState::close_if_unstarted`]). A
//!   connection hyper has read nothing of yet (its TLS handshake unfinished when the drain
//!   began) is not served: hyper's graceful shutdown ends it before its first read;
//! - once a handler has answered, its answer must be sent within `idle_timeout`, whatever else
//!   the connection does: a client that does not take it (an HTTP/1 client that never reads, an
//!   HTTP/2 client that never opens a stream's flow-control window) is closed then, even while
//!   other HTTP/2 streams come and go. Every answer is small and buffered whole, so a client that
//!   reads at all has it well within that. An answer counts as sent when hyper drops its body
//!   ([`Answer`]): after writing its end, or when the stream is reset. An HTTP/1 answer keeps
//!   that deadline until hyper's flush of it ends, though hyper may parse the next pipelined
//!   request before then (it does when a handler answered without reading its request's body:
//!   hyper reads that body after buffering the answer), a request whose handler waits for that
//!   flush ([`Tracked`]): hyper would buffer an answer with no body behind the unflushed one;
//! - a connection whose answer is being written (an HTTP/1 answer from its handler's end until
//!   hyper's flush of it ends, and any connection while a write finds the socket full) is not
//!   idle for a client waiting for a connection slot, so its answer is not cut, as long as its
//!   writes make progress: once they have found the socket full for `header_read_timeout` without
//!   a byte taken (a client that stopped reading), it is idle again (as nginx's `send_timeout`,
//!   but only for a waiting client), so connections that never read cannot keep others out for
//!   the idle timeout. Its deadline is the same, and it counts as idle since its last flush ended
//!   (for an HTTP/1 answer, once it is written, not from its handler's end). This assumes an
//!   answer's body is one frame, as every edgegate answer is (buffered whole): hyper flushes
//!   mid-body when a body has a frame still to come, which would clear the mark while hyper
//!   still holds part of that body;
//! - likewise an HTTP/2 answer not sent yet keeps its connection from being idle for a waiting
//!   client only while it makes progress: its handler's answer counts as progress when no other
//!   is unsent and none was given up unsent (its stream reset) within `header_read_timeout`,
//!   and so does a poll of its body that shows the client has opened its window for another
//!   16 KiB of it, or for all of it ([`Answer`]): its body is given in pieces of 16 KiB at most,
//!   its last byte apart, and hyper polls the first piece at once, window or not, the second as
//!   soon as it has handed h2 the first (one byte of window will do), and each next one, and
//!   the end past the last, only once the pieces before the one it handed over last are
//!   covered by the client's window. An answer with no body (a `HEAD`'s, a 204) is sent with its
//!   head whatever the window, and is not tracked. So a connection with no request in flight
//!   whose unsent answers have made no progress for `header_read_timeout` (a client that
//!   announces a window of 0, never opens it, opens it a few bytes at a time, or for all of an
//!   answer but its last byte) is idle, since their last progress. Its deadline stays the
//!   oldest unsent answer's due time. A client taking a large answer on a slow link makes
//!   progress at every 16 KiB it takes.
//!
//! An expired deadline makes the next read or write fail with `TimedOut`, and hyper closes the
//! connection. The cost is an atomic load per read, relaxed atomic loads and stores per write
//! and flush (a clock read only when a write finds the socket full, a lock only when a flush ends
//! an answer's writing), on HTTP/2 a poll of each 16 KiB piece of an answer's body and of its
//! end (an empty END_STREAM frame), with a clock read and a relaxed `fetch_max` at each poll
//! that is progress, and a lazily allocated timer per connection.
//!
//! ## Lingering close
//!
//! An HTTP/1 answer given before the request's body was read to its end (a 413 to a declared
//! length over the limit, refused as the head comes) leaves the client sending. Were the socket
//! closed then, with its bytes unread, the kernel would answer them with a reset, and a client
//! whose next write meets it may never read the answer (undici, the fetch of Node and so of
//! supabase-js, throws it away). So when hyper shuts such a connection down, its IO closes in
//! stages (RFC 9112 §9.6, nginx's `lingering_close`): the write side is shut (the client reads
//! the answer, then the end of file), then what the client still sends is read and thrown away
//! until it closes, for at most [`LINGER_TIME`] in all, [`LINGER_GAP`] without a byte, and
//! [`LINGER_BYTES`]; only then is the socket closed. The connection keeps its slot meanwhile (its
//! task has not ended), counts as idle for a client waiting for a slot, and holds the drain after
//! a stop signal no longer than these bounds.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::http::{Request, Response, Version};
use bytes::Bytes;
use futures_util::future::Either;
use futures_util::task::AtomicWaker;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::config::ConnectionLimits;

/// `deadline_ms` while a request is in flight and no answer waits to be sent.
const NO_DEADLINE: u64 = u64::MAX;

/// How long a drain waits for a connection's first request to come whole: a client on a slow
/// link finishing a large HTTP/1 head hyper has begun reading is served; one stalled mid-head,
/// or a TLS handshake that does not end, is closed then rather than at its header timeout.
pub(crate) const UNSTARTED_GRACE: Duration = Duration::from_secs(2);

/// How long a lingering close reads what the client still sends, at most (nginx's
/// `lingering_time` is 30 s; a client reads an answer already sent within a round trip).
pub(crate) const LINGER_TIME: Duration = Duration::from_secs(5);
/// How long a lingering close waits for the client's next bytes, at most (nginx's
/// `lingering_timeout` is 5 s).
pub(crate) const LINGER_GAP: Duration = Duration::from_secs(2);
/// How many bytes a lingering close reads and throws away, at most: 16 times the largest body
/// a route takes (the service-wide limit, 1 MiB), so a client sending a body of up to 16 MiB
/// (less what it sent before the answer) finishes it without a reset.
pub(crate) const LINGER_BYTES: u64 = 16 * 1024 * 1024;
/// What a lingering close reads at a time, into a buffer on the stack.
const LINGER_READ: usize = 8 * 1024;
/// Reads in one poll of a lingering close before it yields to the other tasks.
const LINGER_READS_A_POLL: usize = 64;

/// What a connection has under way; changed only under [`ConnState`]'s lock, together with
/// `deadline_ms`, so a request start and an answer's end on two HTTP/2 streams cannot leave an
/// idle deadline set while a request runs, nor lift an unsent answer's deadline.
#[derive(Debug, Default)]
struct Work {
    /// A request has come: the connection is a keep-alive one when nothing is under way.
    served: bool,
    /// Requests whose handler has not answered yet.
    in_flight: usize,
    /// Answers not sent yet, counted by when each is due (milliseconds since `epoch`).
    unsent: BTreeMap<u64, usize>,
    /// Bytes of the next HTTP/1 head have come while nothing was under way: the client is
    /// sending a request, so the connection is not idle though hyper has not parsed it yet.
    head_begun: bool,
    /// When the connection last became idle.
    idle_since: Option<Instant>,
    /// When the HTTP/1 answer hyper has not flushed yet is due (milliseconds since `epoch`): set
    /// at its handler's end, cleared when a flush ends. hyper may parse the next pipelined
    /// request before then (when it reads the body a handler left unread after buffering the
    /// answer), and that request's handler may not run until the flush ends, so the deadline
    /// stays this one while it is set, though a request is in flight.
    answer_due: Option<u64>,
    /// The connection is closing in stages: its answers are sent, its write side shut, and what
    /// the client still sends is read and thrown away (see the module's documentation).
    lingering: bool,
}

/// What one connection's IO and service share.
#[derive(Debug)]
pub(crate) struct ConnState {
    epoch: Instant,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    work: Mutex<Work>,
    /// Milliseconds since `epoch`, or [`NO_DEADLINE`].
    deadline_ms: AtomicU64,
    /// An HTTP/1 request was served, so bytes on the idle connection start the next head.
    http1: AtomicBool,
    /// The last HTTP/1 request's body has not been read to its end (yet): closing the connection
    /// now would reset it while the client may still be sending.
    body_unread: AtomicBool,
    /// An answer is being written: set when an HTTP/1 handler answers (before the connection
    /// counts as idle, so no waiting client can take its slot before hyper writes) and when a
    /// write or flush finds the socket full, cleared when a flush ends (everything hyper had is
    /// then in the kernel's buffer). A connection whose client is still taking its answer is not
    /// idle, unless its writes are stuck (`write_stuck_since`); its deadline stays the idle
    /// timeout. A store on the write path, no lock. (An answer's body is assumed to be one frame:
    /// see the module's documentation.)
    writing: AtomicBool,
    /// When an unsent (HTTP/2) answer last made progress (milliseconds since `epoch`): set as a
    /// handler answers with a body, no other answer unsent and none given up unsent within the
    /// header timeout (`abandoned_at`), and whenever hyper polls an unsent answer's body once
    /// the client's window covers another whole piece of it, or all of it (see [`Answer`]). A
    /// connection with no request in flight whose unsent answers have made none for
    /// `header_read_timeout` (a client that never opens its window) is idle for a waiting
    /// client, as one whose HTTP/1 writes are stuck. A relaxed `fetch_max` on the body's path,
    /// no lock.
    answer_progress: AtomicU64,
    /// When an HTTP/2 answer was last given up unsent (its stream reset) since the last progress
    /// (milliseconds since `epoch`, plus one), or 0: the next answer, if it comes within
    /// `header_read_timeout` of it, does not count as progress though no other is unsent.
    abandoned_at: AtomicU64,
    /// When a write first found the socket full with no write making progress since
    /// (milliseconds since `epoch`, plus one), or 0: reset by a write that makes progress and by
    /// the end of a flush. A connection whose writes have been stuck for `header_read_timeout`
    /// (a client that takes nothing holds its slot no longer than one that sends nothing) is idle
    /// though `writing`.
    write_stuck_since: AtomicU64,
    /// The IO task, woken when an idle deadline is set from another task (an HTTP/2 stream).
    waker: AtomicWaker,
    /// An HTTP/1 request that started while the answer before it was not flushed yet, waiting
    /// for that flush before its handler runs ([`Tracked`]); woken when a flush ends it.
    flush_waiter: AtomicWaker,
}

impl ConnState {
    /// A connection accepted now: its first head is due within the header timeout.
    pub(crate) fn new(limits: &ConnectionLimits) -> Arc<Self> {
        let state = Self {
            epoch: Instant::now(),
            header_read_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
            work: Mutex::new(Work::default()),
            deadline_ms: AtomicU64::new(NO_DEADLINE),
            http1: AtomicBool::new(false),
            body_unread: AtomicBool::new(false),
            writing: AtomicBool::new(false),
            write_stuck_since: AtomicU64::new(0),
            answer_progress: AtomicU64::new(0),
            abandoned_at: AtomicU64::new(0),
            waker: AtomicWaker::new(),
            flush_waiter: AtomicWaker::new(),
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

    /// Milliseconds since `epoch`.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(NO_DEADLINE - 1)
    }

    fn work(&self) -> std::sync::MutexGuard<'_, Work> {
        // The counts are always consistent; a panic elsewhere does not make them unusable.
        self.work.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the deadline after `work` changed: the oldest unsent answer's, else, while a
    /// request runs, the unflushed HTTP/1 answer's or none, else the idle timeout from now (the
    /// connection has just become idle), or the unflushed answer's due time if that is sooner.
    fn work_changed(&self, mut work: std::sync::MutexGuard<'_, Work>) {
        let deadline = match work.unsent.first_key_value() {
            Some((&due, _)) => due,
            None if work.in_flight > 0 => work.answer_due.unwrap_or(NO_DEADLINE),
            None => {
                work.idle_since = Some(Instant::now());
                let idle = self.ms_after_now(self.idle_timeout);
                work.answer_due.map_or(idle, |due| due.min(idle))
            }
        };
        self.deadline_ms.store(deadline, Ordering::Release);
        drop(work);
        if deadline != NO_DEADLINE {
            self.waker.wake();
        }
    }

    fn deadline(&self) -> Option<Instant> {
        match self.deadline_ms.load(Ordering::Acquire) {
            NO_DEADLINE => None,
            ms => Some(self.epoch + Duration::from_millis(ms)),
        }
    }

    /// A request started; with whether it is an HTTP/1 one that must wait for the flush of the
    /// answer before it ([`ConnState::answer_flushed`]) before its handler runs.
    fn request_started(self: &Arc<Self>, version: Version) -> (InFlight, bool) {
        let http1 = version < Version::HTTP_2;
        if http1 {
            self.http1.store(true, Ordering::Relaxed);
        }
        let mut work = self.work();
        work.served = true;
        work.head_begun = false;
        work.in_flight += 1;
        let wait = http1 && work.answer_due.is_some();
        self.work_changed(work);
        let in_flight = InFlight {
            state: self.clone(),
            http1_answered: false,
        };
        (in_flight, wait)
    }

    /// Ready once no HTTP/1 answer waits to be flushed: what a request hyper parsed before the
    /// flush of the answer before it waits for (see [`Tracked`]). Registers first, then looks,
    /// so a flush ending in between is not missed.
    fn answer_flushed(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.flush_waiter.register(cx.waker());
        if self.work().answer_due.is_some() {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    /// Whether nothing is under way on a connection that has served a request: an idle
    /// keep-alive connection, which the client is not waiting on (no request in flight, no answer
    /// unsent nor being written, unless its client has stopped taking it), nor sending a request
    /// on. A lingering one is idle: its answer is written.
    fn idle(&self, work: &Work) -> bool {
        work.lingering
            || work.served
                && work.in_flight == 0
                && (work.unsent.is_empty() || self.answers_stalled())
                && !work.head_begun
                && (!self.writing.load(Ordering::Relaxed) || self.write_stuck())
    }

    /// `header_read_timeout` in milliseconds: how long an answer is protected without progress.
    fn stall_ms(&self) -> u64 {
        u64::try_from(self.header_read_timeout.as_millis()).unwrap_or(NO_DEADLINE)
    }

    /// Whether the connection's writes have found the socket full, none making progress, for
    /// `header_read_timeout`.
    fn write_stuck(&self) -> bool {
        let since = self.write_stuck_since.load(Ordering::Relaxed);
        since != 0 && self.now_ms().saturating_add(1) >= since.saturating_add(self.stall_ms())
    }

    /// Whether the unsent answers have made no progress for `header_read_timeout`.
    fn answers_stalled(&self) -> bool {
        let last = self.answer_progress.load(Ordering::Relaxed);
        self.now_ms() >= last.saturating_add(self.stall_ms())
    }

    /// An unsent answer made progress: hyper handed h2 a chunk of it. (`fetch_max`: HTTP/2
    /// streams run on several threads, and a later time is never taken back.)
    fn answer_progressed(&self) {
        self.answer_progress
            .fetch_max(self.now_ms(), Ordering::Relaxed);
        if self.abandoned_at.load(Ordering::Relaxed) != 0 {
            self.abandoned_at.store(0, Ordering::Relaxed);
        }
    }

    /// A write found the socket full: the connection is writing, and stuck from now unless it
    /// already was.
    fn write_blocked(&self) {
        self.writing.store(true, Ordering::Relaxed);
        if self.write_stuck_since.load(Ordering::Relaxed) == 0 {
            self.write_stuck_since
                .store(self.now_ms().saturating_add(1), Ordering::Relaxed);
        }
    }

    /// A write made progress (the client takes its answer), or a flush ended.
    fn write_progressed(&self) {
        if self.write_stuck_since.load(Ordering::Relaxed) != 0 {
            self.write_stuck_since.store(0, Ordering::Relaxed);
        }
    }

    /// A flush ended: what hyper had to write is in the kernel's buffer. A connection that was
    /// writing an answer is idle from now, not from its handler's end: a client that took a
    /// minute to take its answer has not been idle for that minute.
    /// The mark is cleared under the lock, so `idle_since` cannot see the connection idle with
    /// the time its handler ended. A request hyper parsed before the flush has no deadline
    /// from now (its handler can run; the route's timeout applies).
    fn flushed(&self) {
        self.write_progressed();
        if !self.writing.load(Ordering::Relaxed) {
            return;
        }
        let mut work = self.work();
        if self.writing.swap(false, Ordering::Relaxed) {
            work.idle_since = Some(Instant::now());
            if work.answer_due.take().is_some() {
                if work.in_flight > 0 && work.unsent.is_empty() {
                    self.deadline_ms.store(NO_DEADLINE, Ordering::Release);
                }
                drop(work);
                self.flush_waiter.wake();
            }
        }
    }

    /// Since when the connection has been idle, when it is an idle keep-alive one.
    #[cfg(test)]
    fn idle_since(&self) -> Option<Instant> {
        self.idle_rank().map(|(_, since)| since)
    }

    /// Where the connection stands among the idle ones a waiting client may take the slot of,
    /// if it is one, the least first: whether it still holds an answer its client has not
    /// taken (unsent, or being written with its writes stuck: closing it cuts that answer), or
    /// lingering (closing it may reset its answer before the client reads it), where closing
    /// one with nothing under way costs its client a reconnect alone; then since when it has
    /// been idle (with answers unsent whose progress has stalled: since their last progress,
    /// or later). (Not its deadline: a head begun on it moves that earlier.)
    pub(crate) fn idle_rank(&self) -> Option<(bool, Instant)> {
        let work = self.work();
        if !self.idle(&work) {
            return None;
        }
        let holding =
            work.lingering || !work.unsent.is_empty() || self.writing.load(Ordering::Relaxed);
        if work.lingering || work.unsent.is_empty() {
            return work.idle_since.map(|since| (holding, since));
        }
        let last = Duration::from_millis(self.answer_progress.load(Ordering::Relaxed));
        let stalled = self.epoch + last;
        Some((
            holding,
            work.idle_since.map_or(stalled, |since| since.max(stalled)),
        ))
    }

    /// Closes the connection now if it is an idle keep-alive one (its IO fails at its next
    /// poll, as at its idle deadline); whether it was.
    pub(crate) fn close_if_idle(&self) -> bool {
        let work = self.work();
        if !self.idle(&work) {
            return false;
        }
        self.deadline_ms.store(0, Ordering::Release);
        drop(work);
        self.waker.wake();
        true
    }

    /// At the start of a drain: if no request has come whole on the connection yet (its TLS
    /// handshake, or its first request's head, still under way, or not begun), closes it once
    /// [`UNSTARTED_GRACE`] has passed, or at its header deadline if that is sooner: hyper,
    /// waiting for a first head, would keep it open until the head timeout, holding the drain,
    /// while a head that comes whole within the grace is still served (its request then runs
    /// as any other). Whether it had no request.
    pub(crate) fn close_if_unstarted(&self) -> bool {
        let work = self.work();
        if work.served {
            return false;
        }
        self.deadline_ms
            .fetch_min(self.ms_after_now(UNSTARTED_GRACE), Ordering::AcqRel);
        drop(work);
        self.waker.wake();
        true
    }

    /// Requests whose handler has not answered yet.
    pub(crate) fn requests_in_flight(&self) -> usize {
        self.work().in_flight
    }

    /// A request's handler ended (or its future was dropped). When an HTTP/1 handler answered,
    /// the connection is writing from now (before it counts as idle, so no waiting client can
    /// take its slot before hyper writes), and the answer is due within the idle timeout.
    fn request_finished(&self, http1_answered: bool) {
        let mut work = self.work();
        work.in_flight = work.in_flight.saturating_sub(1);
        if http1_answered {
            self.writing.store(true, Ordering::Relaxed);
            // An answer still unflushed before this one (none: requests wait for its flush)
            // keeps its due time.
            let due = self.ms_after_now(self.idle_timeout);
            work.answer_due.get_or_insert(due);
        }
        self.work_changed(work);
    }

    /// A handler answered with a body: its answer is due within the idle timeout from now. With
    /// no other answer unsent (and none given up unsent within the header timeout), its stall
    /// is counted from now; behind answers unsent, it is no progress of theirs (a client that
    /// asks again and again, taking nothing, must not keep them from stalling). (An answer with
    /// no body, a HEAD's or a 204, is sent with its head whatever the window: not tracked.)
    fn answer_unsent(self: &Arc<Self>) -> Unsent {
        let mut work = self.work();
        let due = self.ms_after_now(self.idle_timeout);
        // Nor after an answer given up unsent (a client resetting each stalled stream as it
        // asks again would otherwise have no other answer unsent at each new one).
        if work.unsent.is_empty() {
            let given_up = self.abandoned_at.swap(0, Ordering::Relaxed);
            if given_up == 0 || self.now_ms() >= given_up.saturating_add(self.stall_ms()) {
                self.answer_progressed();
            }
        }
        *work.unsent.entry(due).or_default() += 1;
        self.work_changed(work);
        Unsent {
            state: self.clone(),
            due,
            finished: false,
        }
    }

    /// An answer's body was dropped: sent, or (not `finished`) given up unsent, its stream
    /// reset, which is no progress: the next answer, within `header_read_timeout`, does not
    /// count as progress either.
    fn answer_sent(&self, due: u64, finished: bool) {
        if !finished {
            self.abandoned_at
                .store(self.now_ms().saturating_add(1), Ordering::Relaxed);
        }
        let mut work = self.work();
        if let Some(count) = work.unsent.get_mut(&due) {
            *count -= 1;
            if *count == 0 {
                work.unsent.remove(&due);
            }
        }
        self.work_changed(work);
    }

    /// hyper has shut the connection's write side: whether it is to linger, the last request's
    /// body being unread. If so it lingers from now, under its own bounds rather than the
    /// deadlines (a short header timeout must not cut it), and counts as idle since now.
    fn linger_begins(&self) -> bool {
        if !self.body_unread.swap(false, Ordering::AcqRel) {
            return false;
        }
        let mut work = self.work();
        work.lingering = true;
        work.idle_since = Some(Instant::now());
        self.deadline_ms.store(NO_DEADLINE, Ordering::Release);
        true
    }

    /// Bytes arrived: on an idle HTTP/1 connection they begin the next head.
    fn bytes_read(&self) {
        if !self.http1.load(Ordering::Relaxed)
            || self.deadline_ms.load(Ordering::Acquire) == NO_DEADLINE
        {
            return;
        }
        let mut work = self.work();
        if work.in_flight == 0 {
            work.head_begun = true;
            let head_due = self.ms_after_now(self.header_read_timeout);
            self.deadline_ms.fetch_min(head_due, Ordering::AcqRel);
        }
    }
}

/// Marks one request in flight until dropped (when its handler has answered, or with the
/// request's future if the connection ends first).
#[derive(Debug)]
struct InFlight {
    state: Arc<ConnState>,
    /// Its HTTP/1 handler answered: hyper is to write the answer.
    http1_answered: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.request_finished(self.http1_answered);
    }
}

/// Marks one answer not sent yet until dropped.
#[derive(Debug)]
struct Unsent {
    state: Arc<ConnState>,
    due: u64,
    /// Its body came to its end (or had none): dropped, it is sent, not given up.
    finished: bool,
}

impl Drop for Unsent {
    fn drop(&mut self) {
        self.state.answer_sent(self.due, self.finished);
    }
}

pin_project_lite::pin_project! {
    /// An HTTP/1 request's body, clearing the connection's `body_unread` once read to its end.
    pub(crate) struct Received<B> {
        #[pin]
        inner: B,
        // The connection's state, while the body is not read to its end.
        unread: Option<Arc<ConnState>>,
    }
}

impl<B> Received<B> {
    fn read(self: Pin<&mut Self>) {
        if let Some(state) = self.project().unread.take() {
            state.body_unread.store(false, Ordering::Release);
        }
    }
}

impl<B: Body> Body for Received<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let frame = ready!(self.as_mut().project().inner.poll_frame(cx));
        if frame.is_none() || self.inner.is_end_stream() {
            self.read();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// An answer's body, holding its [`Unsent`] mark until hyper drops it.
    ///
    /// On HTTP/2 each chunk is given in pieces of [`ANSWER_PIECE`] bytes at most, its last byte
    /// as a piece of its own, and a tracked answer's body says it has ended only once hyper has
    /// polled it past its last piece. hyper polls a body's first piece at once, window or not,
    /// hands it to h2, whole, once the stream has any send window (h2 keeps what the window
    /// does not cover), and polls the next piece at once. That one it hands over only once the
    /// stream has window beyond what h2 keeps, that is once the pieces before it are all
    /// covered by the client's window, and then polls the next. So a poll from the third on
    /// means the client has opened its window for the piece two before, and the poll past the
    /// last piece (a byte of its own) that it has opened it for the whole answer; hyper then
    /// ends the stream with an empty frame, which takes no window. Those polls are the
    /// answer's progress ([`ConnState`]'s `answer_progress`) when the piece two before was a
    /// whole [`ANSWER_PIECE`], or at the end: a client cannot make progress by opening its
    /// window a few bytes at a time, nor for all of a small answer but its last byte; a
    /// connection whose unsent answers make none for the header timeout is idle for a waiting
    /// client. The answer is finished (sent, not given up, when hyper drops the body) only at
    /// that end, or when the body fails (hyper resets the stream itself).
    pub(crate) struct Answer<B> {
        #[pin]
        inner: B,
        hold_back: bool,
        // What is left of the chunk being given in pieces (HTTP/2).
        held: Option<Bytes>,
        // Whether the last two pieces given (HTTP/2) were whole `ANSWER_PIECE`s: bit 0 the
        // last, bit 1 the one before it.
        whole: u8,
        // hyper has polled a tracked answer past its last piece (or it failed).
        ended: bool,
        unsent: Option<Unsent>,
    }
}

/// The largest piece of an HTTP/2 answer's chunk given to hyper at a time: h2's largest frame
/// by default, so a client taking a large answer on a slow link makes progress every 16 KiB.
const ANSWER_PIECE: usize = 16 * 1024;

impl<B> Body for Answer<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = self.as_mut().poll_answer(cx);
        let this = self.project();
        // HTTP/2 answers with a body only.
        let (Some(unsent), Poll::Ready(frame)) = (this.unsent, &polled) else {
            return polled;
        };
        let (progress, end) = match frame {
            // hyper resets the stream itself: not given up by the client.
            Some(Err(_)) => (false, true),
            Some(Ok(frame)) => match frame.data_ref() {
                // Polled once the piece two before is covered by the client's window.
                Some(piece) => {
                    let progress = *this.whole & 0b10 != 0;
                    *this.whole = (*this.whole << 1 | u8::from(piece.len() == ANSWER_PIECE)) & 0b11;
                    (progress, false)
                }
                // Past the last piece, as the end is.
                None if frame.is_trailers() => (true, true),
                None => (false, false),
            },
            // Polled once the last piece (a byte) is covered: the whole answer is.
            None => (true, true),
        };
        if progress {
            unsent.state.answer_progressed();
        }
        if end {
            unsent.finished = true;
            *this.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        if self.unsent.is_some() {
            // Polled past its last piece: see the type's documentation.
            return self.ended;
        }
        self.held.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        if let Some(held) = &self.held {
            let held = held.len() as u64;
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper + held);
            }
            hint.set_lower(hint.lower() + held);
        }
        hint
    }
}

impl<B> Answer<B>
where
    B: Body<Data = Bytes>,
{
    /// The body's next frame, each chunk given in pieces on HTTP/2.
    fn poll_answer(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        if let Some(rest) = this.held {
            let piece = next_piece(rest);
            if rest.is_empty() {
                *this.held = None;
            }
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
        loop {
            let frame = match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) if *this.hold_back => frame,
                other => return Poll::Ready(other),
            };
            return match frame.into_data() {
                // hyper would send it without window and poll again at once: no progress.
                Ok(data) if data.is_empty() => continue,
                Ok(mut data) => {
                    let piece = next_piece(&mut data);
                    if !data.is_empty() {
                        *this.held = Some(data);
                    }
                    Poll::Ready(Some(Ok(Frame::data(piece))))
                }
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            };
        }
    }
}

/// The next piece of an HTTP/2 answer's chunk, taken off `rest`: at most [`ANSWER_PIECE`]
/// bytes, and the last byte alone.
fn next_piece(rest: &mut Bytes) -> Bytes {
    let len = rest.len();
    rest.split_to(len.saturating_sub(1).clamp(1, ANSWER_PIECE).min(len))
}

/// The connection's IO, failing with `TimedOut` once the connection's deadline has passed.
#[derive(Debug)]
pub(crate) struct TimedIo<T> {
    inner: T,
    state: Arc<ConnState>,
    timer: Option<Pin<Box<Sleep>>>,
    /// Set once the write side is shut on a connection that lingers.
    linger: Option<Linger>,
}

/// A lingering close under way (see the module's documentation).
#[derive(Debug)]
struct Linger {
    /// When it ends whatever the client does.
    ends: tokio::time::Instant,
    /// The next byte's deadline: [`LINGER_GAP`] after the last one, and never after `ends`.
    gap: Pin<Box<Sleep>>,
    /// Bytes it may still read.
    left: u64,
    over: bool,
}

impl Linger {
    fn new() -> Self {
        let now = tokio::time::Instant::now();
        Self {
            ends: now + LINGER_TIME,
            gap: Box::pin(tokio::time::sleep_until(now + LINGER_GAP)),
            left: LINGER_BYTES,
            over: false,
        }
    }

    fn end(&mut self, why: &'static str) -> Poll<()> {
        self.over = true;
        tracing::debug!(read = LINGER_BYTES - self.left, why, "lingering close over");
        Poll::Ready(())
    }
}

impl<T> TimedIo<T> {
    pub(crate) fn new(inner: T, state: Arc<ConnState>) -> Self {
        Self {
            inner,
            state,
            timer: None,
            linger: None,
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

    /// Called when a write or flush is not ready: the client is taking an answer (so the
    /// connection is not idle, while its writes make progress) until a flush ends.
    fn write_pending<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        self.state.write_blocked();
        self.pending_or_expired(cx)
    }

    fn expired(&self) -> bool {
        self.state
            .deadline()
            .is_some_and(|deadline| Instant::now() >= deadline)
    }
}

impl<T: AsyncRead + Unpin> TimedIo<T> {
    /// Reads and throws away what the client sends until it closes, or one of the bounds is
    /// reached, or the connection's slot is taken for a waiting client.
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Self {
            inner,
            state,
            linger: Some(linger),
            ..
        } = self
        else {
            return Poll::Ready(());
        };
        if linger.over {
            return Poll::Ready(());
        }
        // Woken by `close_if_idle`.
        state.waker.register(cx.waker());
        let mut scratch = [0u8; LINGER_READ];
        for _ in 0..LINGER_READS_A_POLL {
            if state
                .deadline()
                .is_some_and(|deadline| Instant::now() >= deadline)
            {
                return linger.end("slot taken");
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut *inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return linger.end("end of file"),
                Poll::Ready(Ok(())) => {
                    linger.left = linger.left.saturating_sub(buf.filled().len() as u64);
                    let now = tokio::time::Instant::now();
                    if linger.left == 0 {
                        return linger.end("byte bound");
                    }
                    if now >= linger.ends {
                        return linger.end("time bound");
                    }
                    linger
                        .gap
                        .as_mut()
                        .reset((now + LINGER_GAP).min(linger.ends));
                }
                Poll::Ready(Err(_)) => return linger.end("read failed"),
                Poll::Pending => {
                    return match linger.gap.as_mut().poll(cx) {
                        Poll::Ready(()) if tokio::time::Instant::now() >= linger.ends => {
                            linger.end("time bound")
                        }
                        Poll::Ready(()) => linger.end("gap"),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
        // A client sending as fast as it can: the other tasks get their turn.
        cx.waker().wake_by_ref();
        Poll::Pending
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

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TimedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending => this.write_pending(cx),
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.state.write_progressed();
                }
                Poll::Ready(Ok(n))
            }
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
            Poll::Pending => this.write_pending(cx),
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.state.write_progressed();
                }
                Poll::Ready(Ok(n))
            }
            ready => ready,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.write_pending(cx),
            Poll::Ready(Ok(())) => {
                // What hyper (or TLS above it) had to write is in the kernel's buffer.
                this.state.flushed();
                Poll::Ready(Ok(()))
            }
            ready => ready,
        }
    }

    /// Shuts the write side, then, when the last request's body was left unread, lingers (see
    /// the module's documentation) before the connection is done and its socket closed.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.linger.is_none() {
            ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            if !this.state.linger_begins() {
                return Poll::Ready(Ok(()));
            }
            this.linger = Some(Linger::new());
        }
        ready!(this.poll_linger(cx));
        Poll::Ready(Ok(()))
    }
}

/// The service of one connection: counts requests in flight and answers not sent for
/// [`ConnState`].
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
    ReqBody: Body + Send + 'static,
    ResBody: Body,
    S: hyper::service::Service<Request<Received<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Answer<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn call(&self, req: Request<ReqBody>) -> Self::Future {
        let hold_back = req.version() >= Version::HTTP_2;
        let state = self.state.clone();
        let (mut in_flight, wait) = state.request_started(req.version());
        // An HTTP/1 body not read to its end when the connection closes makes it linger.
        let unread = !hold_back && !req.body().is_end_stream();
        state.body_unread.store(unread, Ordering::Release);
        let req = req.map(|inner| Received {
            inner,
            unread: unread.then(|| state.clone()),
        });
        // A request hyper parsed before the answer before it was flushed (it reads the body a
        // handler left unread after buffering the answer, and the next head with it) waits for
        // that flush, under that answer's deadline, before its handler runs: hyper buffers an
        // answer with no body (a HEAD's, a 204) behind an unflushed one, so a client that
        // pipelines such requests and never reads would otherwise have them all read, run and
        // buffered, each handler's end moving the deadline on. Waiting, it holds one answer and
        // one request, and is closed at that deadline. (A request behind an answer with a body
        // waits anyway: hyper polls its handler only once that body is written.)
        let response = if wait {
            let inner = self.inner.clone();
            let state = state.clone();
            Either::Left(async move {
                std::future::poll_fn(|cx| state.answer_flushed(cx)).await;
                inner.call(req).await
            })
        } else {
            Either::Right(self.inner.call(req))
        };
        Box::pin(async move {
            let response = response.await?;
            // The handler is done: its answer must be sent within the idle timeout (an HTTP/2
            // client that never opens its window must not hold it for ever). An HTTP/1 answer is
            // due from now until hyper's flush of it ends (`answer_due`,
            // kept even if hyper parses the next request meanwhile), and the connection is not
            // idle for a waiting client until then (`writing`): both set as the request ends
            // (hyper writes the answer in this task, after this future).
            // A body with nothing to send (a 204, a HEAD's) is sent with its head, whatever the
            // window: nothing to track (tracked, it would be no progress, and could make a
            // connection whose last progress is old look stalled until hyper drops it).
            let ended = response.body().is_end_stream();
            let unsent = (hold_back && !ended).then(|| state.answer_unsent());
            in_flight.http1_answered = !hold_back;
            drop(in_flight);
            Ok(response.map(|inner| Answer {
                inner,
                hold_back,
                held: None,
                whole: 0,
                ended: false,
                unsent,
            }))
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

        let first = state.request_started(Version::HTTP_11).0;
        assert_eq!(state.deadline(), None, "no deadline while a request runs");
        let second = state.request_started(Version::HTTP_11).0;
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

    /// A waker counting its wakes.
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_request_parsed_before_the_answer_before_it_is_flushed_waits_for_the_flush() {
        let state = ConnState::new(&limits());
        let (mut first, wait) = state.request_started(Version::HTTP_11);
        assert!(!wait, "nothing unflushed before the first request");
        first.http1_answered = true;
        drop(first);
        let (second, wait) = state.request_started(Version::HTTP_11);
        assert!(wait, "the answer before it is not flushed");
        let wakes = Arc::new(Wakes(std::sync::atomic::AtomicUsize::new(0)));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(state.answer_flushed(&mut cx).is_pending());
        state.flushed();
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "the flush wakes it");
        assert!(state.answer_flushed(&mut cx).is_ready());
        drop(second);
        // With every answer flushed, the next request runs at once; HTTP/2 streams never wait.
        let (third, wait) = state.request_started(Version::HTTP_11);
        assert!(!wait);
        drop(third);
        let fresh = ConnState::new(&limits());
        let (mut answered, _) = fresh.request_started(Version::HTTP_11);
        answered.http1_answered = true;
        drop(answered);
        assert!(!fresh.request_started(Version::HTTP_2).1);
    }

    #[test]
    fn an_unflushed_http1_answer_keeps_its_deadline_while_the_next_request_is_parsed() {
        let state = ConnState::new(&limits());
        let mut first = state.request_started(Version::HTTP_11).0;
        first.http1_answered = true;
        drop(first);
        let due = state.deadline().expect("the answer is due");
        assert!(state.idle_since().is_none(), "writing its answer");

        // hyper parses the next request before the answer is flushed: the deadline stands.
        let second = state.request_started(Version::HTTP_11).0;
        assert_eq!(state.deadline(), Some(due), "while the answer is unflushed");
        // Once it is flushed, the request's handler can run: no deadline here.
        state.flushed();
        assert_eq!(state.deadline(), None, "after the flush");
        drop(second);
        assert!(state.deadline().is_some());
    }

    #[test]
    fn an_unsent_answer_keeps_its_deadline_while_other_requests_come_and_go() {
        let state = ConnState::new(&limits());
        let first = state.request_started(Version::HTTP_2).0;
        let unsent = state.answer_unsent();
        drop(first);
        let due = state.deadline().expect("the unsent answer is due");

        // Another stream's request runs and finishes: the unsent answer's deadline stands.
        let second = state.request_started(Version::HTTP_2).0;
        assert_eq!(state.deadline(), Some(due), "while another request runs");
        std::thread::sleep(Duration::from_millis(5));
        drop(second);
        assert_eq!(
            state.deadline(),
            Some(due),
            "after another request finished"
        );

        // Once it is sent, the connection is idle from then.
        std::thread::sleep(Duration::from_millis(5));
        drop(unsent);
        assert!(
            state.deadline().unwrap() > due,
            "idle from the answer's end"
        );
    }

    #[test]
    fn only_an_unread_body_makes_a_connection_linger_and_it_lingers_as_an_idle_one() {
        let state = ConnState::new(&limits());
        drop(state.request_started(Version::HTTP_11));
        assert!(!state.linger_begins(), "every body was read");

        let in_flight = state.request_started(Version::HTTP_11).0;
        state.body_unread.store(true, Ordering::Release);
        drop(in_flight);
        // As hyper drains a little of the body, the next head's deadline is set.
        state.bytes_read();
        assert!(state.idle_since().is_none(), "a head begun is not idle");
        assert!(state.linger_begins());
        assert_eq!(state.deadline(), None, "the linger keeps its own bounds");
        assert!(
            state.idle_since().is_some(),
            "a waiting client may take its slot"
        );
        assert!(state.close_if_idle());
        assert!(state.deadline().unwrap() <= Instant::now());
        assert!(!state.linger_begins(), "once");
    }

    /// An HTTP/1 handler's answer is written after it returns: the connection is not idle for a
    /// waiting client until hyper's flush ends, nor while a write finds the socket full.
    #[tokio::test]
    async fn a_connection_writing_its_answer_is_not_idle_until_its_flush_ends() {
        use futures_util::FutureExt as _;
        use http_body_util::Empty;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let state = ConnState::new(&limits());
        let service = Tracked::new(
            hyper::service::service_fn(|_: Request<Received<Empty<Bytes>>>| async {
                Ok::<_, std::convert::Infallible>(Response::new(Empty::<Bytes>::new()))
            }),
            state.clone(),
        );
        let request = Request::new(Empty::<Bytes>::new());
        let answer = hyper::service::Service::call(&service, request)
            .await
            .unwrap();
        assert!(state.idle_since().is_none(), "answered, not written yet");
        assert!(!state.close_if_idle());

        let (mut client, server) = tokio::io::duplex(16);
        let mut io = TimedIo::new(server, state.clone());
        std::thread::sleep(Duration::from_millis(5));
        let flushing = Instant::now();
        io.flush().await.unwrap();
        let since = state.idle_since().expect("written");
        assert!(
            since >= flushing,
            "idle from its flush's end, not its handler's"
        );

        // The client's side is full: the write waits, and the connection is not idle.
        io.write_all(&[0; 16]).await.unwrap();
        assert!(io.write(&[0; 16]).now_or_never().is_none());
        assert!(state.idle_since().is_none(), "still writing");
        assert!(!state.close_if_idle());
        assert!(
            due_in(&state).unwrap() > Duration::from_secs(70),
            "idle deadline stands"
        );

        client.read_exact(&mut [0; 16]).await.unwrap();
        io.write_all(&[0; 16]).await.unwrap();
        io.flush().await.unwrap();
        assert!(state.close_if_idle(), "written: its slot may be taken");
        drop(answer);
    }

    /// A connection whose writes find the socket full is protected while they make progress, and
    /// idle again once they have made none for the header timeout (the client stopped reading).
    #[tokio::test]
    async fn a_connection_whose_writes_are_stuck_for_the_header_timeout_is_idle() {
        use futures_util::FutureExt as _;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let state = ConnState::new(&ConnectionLimits {
            header_read_timeout: Duration::from_secs(1),
            ..limits()
        });
        drop(state.request_started(Version::HTTP_11));
        let (mut client, server) = tokio::io::duplex(16);
        let mut io = TimedIo::new(server, state.clone());
        io.write_all(&[0; 16]).await.unwrap();
        assert!(io.write(&[0; 16]).now_or_never().is_none());
        assert!(state.idle_since().is_none(), "writing");

        // The client takes some: the write makes progress, and the clock starts again.
        std::thread::sleep(Duration::from_millis(700));
        client.read_exact(&mut [0; 16]).await.unwrap();
        io.write_all(&[0; 16]).await.unwrap();
        assert!(io.write(&[0; 16]).now_or_never().is_none());
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            state.idle_since().is_none(),
            "progress 500 ms ago (1.2 s after the first stall)"
        );

        // Nothing taken for the header timeout: a waiting client may take its slot.
        std::thread::sleep(Duration::from_millis(700));
        assert!(state.idle_since().is_some(), "stuck for 1.2 s");
        assert!(state.close_if_idle());
        assert!(io.write(&[0; 16]).await.is_err(), "closed");
    }

    /// An HTTP/2 answer hyper does not poll (its client never opens the stream's window) is
    /// protected for the header timeout from its last progress, as stuck HTTP/1 writes are: then
    /// the connection is idle for a waiting client, its deadline still the answer's due time.
    #[test]
    fn a_connection_whose_unsent_answers_make_no_progress_for_the_header_timeout_is_idle() {
        use futures_util::FutureExt as _;
        use http_body_util::{BodyExt as _, Full};

        // (Wide margins throughout: a loaded machine's sleeps overshoot.)
        let state = ConnState::new(&ConnectionLimits {
            header_read_timeout: Duration::from_millis(1000),
            ..limits()
        });
        let answer_of = |state: &Arc<ConnState>| Answer {
            inner: Full::new(Bytes::from_static(b"answer")),
            hold_back: true,
            held: None,
            whole: 0,
            ended: false,
            unsent: Some(state.answer_unsent()),
        };
        let in_flight = state.request_started(Version::HTTP_2).0;
        let mut answer = answer_of(&state);
        drop(in_flight);
        let due = state.deadline().expect("the answer is due");
        assert!(state.idle_since().is_none(), "answered just now");

        // hyper polls the first piece at once, window or not: no progress.
        let first = answer.frame().now_or_never().unwrap().unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "answe");
        std::thread::sleep(Duration::from_millis(1100));
        assert!(
            state.idle_since().is_some(),
            "stalled: the first poll is no progress"
        );
        // Nor the second, its last byte, which hyper polls as soon as it has handed h2 the
        // first (one byte of window will do).
        let second = answer.frame().now_or_never().unwrap().unwrap().unwrap();
        assert_eq!(second.into_data().unwrap(), "r");
        assert!(
            state.idle_since().is_some(),
            "stalled: the second poll is no progress"
        );
        // Nor is another answer behind it (a client asking again, taking nothing).
        let asked = state.request_started(Version::HTTP_2).0;
        let mut again = answer_of(&state);
        drop(asked);
        assert!(
            state.idle_since().is_some(),
            "a new answer is no progress of the stalled one"
        );

        // The third, past the last piece: the whole answer is covered by the client's window:
        // progress.
        let before = Instant::now();
        assert!(
            !answer.is_end_stream(),
            "not ended before hyper polls past its last piece"
        );
        assert!(answer.frame().now_or_never().unwrap().is_none());
        assert!(answer.is_end_stream());
        assert!(state.idle_since().is_none(), "progress just now");
        std::thread::sleep(Duration::from_millis(250));
        assert!(state.idle_since().is_none(), "progress 250 ms ago");

        // A request in flight keeps it busy, stalled or not.
        let other = state.request_started(Version::HTTP_2).0;
        assert!(state.idle_since().is_none(), "a request runs");
        assert!(!state.close_if_idle());
        drop(other);
        assert_eq!(
            state.deadline(),
            Some(due),
            "the first answer's due time stands"
        );

        // No progress for the header timeout: idle since its last progress, or later.
        std::thread::sleep(Duration::from_millis(1000));
        let since = state.idle_since().expect("stalled for 1,250 ms");
        assert!(
            since + Duration::from_millis(1) >= before,
            "{since:?} {before:?}"
        );
        assert!(state.close_if_idle());
        assert!(state.deadline().unwrap() <= Instant::now(), "closed now");
        drop(answer);
        assert!(again.frame().now_or_never().is_some());
        drop(again);
    }

    #[test]
    fn an_http2_answer_is_given_in_pieces_and_makes_progress_by_whole_pieces_and_at_its_end() {
        use futures_util::FutureExt as _;
        use http_body_util::{BodyExt as _, Full};

        let state = ConnState::new(&ConnectionLimits {
            header_read_timeout: Duration::from_millis(200),
            ..limits()
        });
        let answer_of = |len: usize, hold_back: bool| Answer {
            inner: Full::new(Bytes::from(vec![b'a'; len])),
            hold_back,
            held: None,
            whole: 0,
            ended: false,
            unsent: hold_back.then(|| state.answer_unsent()),
        };
        // Polled as hyper does, until the body says it has ended (past its last piece on
        // HTTP/2): each piece's length, and whether its poll was progress (the last stall, made
        // old, is gone). `None` for the poll past the last piece.
        let polls = |answer: &mut Answer<Full<Bytes>>| {
            let mut polls = Vec::new();
            while !answer.is_end_stream() {
                std::thread::sleep(Duration::from_millis(250));
                assert!(state.answers_stalled());
                let frame = answer.frame().now_or_never().unwrap();
                let piece = frame.map(|frame| frame.unwrap().into_data().unwrap().len());
                polls.push((piece, !state.answers_stalled()));
            }
            polls
        };
        let finished = |answer: &Answer<Full<Bytes>>| answer.unsent.as_ref().unwrap().finished;

        let mut large = answer_of(40_000, true);
        assert_eq!(
            polls(&mut large),
            [
                (Some(16_384), false),
                (Some(16_384), false),
                // The first whole piece is covered.
                (Some(7_231), true),
                // The second.
                (Some(1), true),
                // Not the third (not a whole piece): two before the end.
                (None, true),
            ]
        );
        assert!(finished(&large));
        // A small one makes progress only when it is covered whole.
        let mut small = answer_of(15, true);
        assert_eq!(
            polls(&mut small),
            [(Some(14), false), (Some(1), false), (None, true)]
        );
        assert!(finished(&small));
        let mut one = answer_of(1, true);
        assert_eq!(polls(&mut one), [(Some(1), false), (None, true)]);
        assert!(finished(&one));
        // Dropped before it is polled past its last piece (its stream reset): given up.
        let mut cut = answer_of(15, true);
        cut.frame().now_or_never().unwrap().unwrap().unwrap();
        cut.frame().now_or_never().unwrap().unwrap().unwrap();
        assert!(!finished(&cut) && !cut.is_end_stream());
        // HTTP/1: whole.
        let mut whole = answer_of(40_000, false);
        let frame = whole.frame().now_or_never().unwrap().unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap().len(), 40_000);
        assert!(whole.is_end_stream());
    }

    #[test]
    fn a_truly_idle_connection_gives_its_slot_up_before_one_whose_answer_is_stuck() {
        let limits = ConnectionLimits {
            header_read_timeout: Duration::from_millis(300),
            ..limits()
        };
        // Its HTTP/1 answer written to a socket that stays full: idle for a waiting client
        // once stuck for the header timeout, since its handler's end.
        let stuck = ConnState::new(&limits);
        drop(stuck.request_started(Version::HTTP_11));
        stuck.writing.store(true, Ordering::Relaxed);
        stuck.write_blocked();
        // An HTTP/2 answer its client never takes a piece of.
        let stalled = ConnState::new(&limits);
        let in_flight = stalled.request_started(Version::HTTP_2).0;
        let unsent = stalled.answer_unsent();
        drop(in_flight);
        std::thread::sleep(Duration::from_millis(500));
        // Then a keep-alive connection goes idle, answers sent: idle for less time.
        let idle = ConnState::new(&limits);
        drop(idle.request_started(Version::HTTP_11));
        std::thread::sleep(Duration::from_millis(10));

        let rank = |state: &ConnState| state.idle_rank().expect("idle for a waiting client");
        let (stuck, stalled, idle) = (rank(&stuck), rank(&stalled), rank(&idle));
        assert!(stuck.1 < idle.1 && stalled.1 < idle.1, "idle the longest");
        // Closing it costs its client a reconnect; closing the others cuts an answer.
        assert!(
            idle < stuck && idle < stalled,
            "{idle:?} {stuck:?} {stalled:?}"
        );
        drop(unsent);
    }

    #[test]
    fn only_a_connection_with_no_request_yet_is_closed_as_unstarted() {
        let state = ConnState::new(&limits());
        let in_flight = state.request_started(Version::HTTP_11).0;
        assert!(!state.close_if_unstarted(), "a request runs");
        assert_eq!(state.deadline(), None, "and keeps no deadline");
        drop(in_flight);
        assert!(!state.close_if_unstarted(), "served: hyper's to close");

        // No request yet (part of a first head, or nothing): closed once the grace is over,
        // not at the header timeout (limits(): longer than the grace).
        let fresh = ConnState::new(&limits());
        assert!(due_in(&fresh).unwrap() > UNSTARTED_GRACE);
        assert!(fresh.close_if_unstarted());
        let due = due_in(&fresh).unwrap();
        assert!(due <= UNSTARTED_GRACE && due > Duration::ZERO, "{due:?}");
        // Its head comes whole within the grace: the request runs with no deadline here.
        let in_flight = fresh.request_started(Version::HTTP_11).0;
        assert_eq!(fresh.deadline(), None);
        drop(in_flight);
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
