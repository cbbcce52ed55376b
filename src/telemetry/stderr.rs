//! The log's way to stderr: lines in batches, written by a thread of its own, never by the
//! thread that logs.
//!
//! One `write` to stderr a request line cost `serve` a quarter of a `/healthz` request's CPU
//! time when stderr was a pipe, as it is under a container runtime or a log shipper (the reader
//! is woken at every line), and an eighth into a file (BENCHMARKS.md, sixth pass). Lines are
//! appended to a buffer that a thread of its own writes [`FLUSH_AFTER`] after the first line
//! lands in it, all of them in one `write`; a warning or an error wakes that thread at once, so
//! it is written behind whatever is pending, in the log's order, without the wait. A request's
//! thread never writes to stderr itself: when the reader stalls (Docker's blocking log mode, a
//! stuck shipper, a full pipe), the buffer fills up to [`MAX_PENDING`] bytes and the lines past
//! it are dropped and counted (`edgegate_log_lines_dropped_total`), and once stderr takes lines
//! again a warning says how many were lost ("N log lines dropped"). Logging is lossy then, but
//! requests are never held by the log, and memory stays bounded. [`flush`] (at exit, and before
//! a panic's message) waits up to [`FLUSH_WAIT`] for what is pending to be written. What a crash
//! loses: the lines of its last [`FLUSH_AFTER`].

use std::cell::Cell;
use std::io::{self, Write as _};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, LazyLock, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// How long the first line of a batch waits for others.
pub const FLUSH_AFTER: Duration = Duration::from_millis(2);
/// The most bytes pending: lines past it are dropped (one line longer than this is kept when
/// nothing else is pending).
pub const MAX_PENDING: usize = 256 * 1024;
/// The longest [`flush`] waits for stderr to take what is pending.
pub const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// Lines dropped because the buffer was full, since the process started, in every app's
/// registry.
static LINES_DROPPED: LazyLock<Counter> = LazyLock::new(Counter::default);

/// Adds `edgegate_log_lines_dropped_total` to `registry`.
pub(super) fn register(registry: &mut Registry) {
    registry.register(
        "log_lines_dropped",
        "Log lines dropped because stderr did not take them (its reader stalled) and the 256 KiB \
         log buffer was full",
        LINES_DROPPED.clone(),
    );
}

thread_local! {
    /// Set on the flushing thread while it logs the dropped-lines notice: that line is kept.
    static NOTICE: Cell<bool> = const { Cell::new(false) };
}

/// Where the lines go: stderr, or in tests a buffer of their own.
type Sink = Box<dyn io::Write + Send>;

struct Shared {
    /// Whether a flushing thread runs; without one every line is written at once.
    batched: AtomicBool,
    /// Lines not written yet.
    pending: Mutex<Vec<u8>>,
    /// Signalled when `pending` stops being empty, and when a line must go out without
    /// waiting (`urgent`).
    ready: Condvar,
    /// A warning or an error (or a [`flush`]) is pending: the batch goes out without waiting.
    urgent: AtomicBool,
    /// Lines dropped since the last notice.
    dropped: AtomicU64,
    /// The sink and a spare buffer that the batch is swapped into while it is written; held
    /// for every write, so batches reach the sink in the order they were made.
    sink: Mutex<(Sink, Vec<u8>)>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while a lock was held leaves whole lines (each append is one `extend`).
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn new(sink: Sink, batched: bool) -> Self {
        // Room for a full batch in each buffer, so that batching never reallocates.
        let capacity = if batched { MAX_PENDING } else { 0 };
        Self {
            batched: AtomicBool::new(batched),
            pending: Mutex::new(Vec::with_capacity(capacity)),
            ready: Condvar::new(),
            urgent: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            sink: Mutex::new((sink, Vec::with_capacity(capacity))),
        }
    }

    /// Adds `line` to the batch (`urgent`: the batch goes out now), or drops it when the batch
    /// is full. Unbatched, writes it.
    fn append(&self, line: &[u8], urgent: bool) {
        if !self.batched.load(Ordering::Relaxed) {
            return self.write_through(line);
        }
        let mut pending = lock(&self.pending);
        let capped = !NOTICE.get();
        if capped && !pending.is_empty() && pending.len() + line.len() > MAX_PENDING {
            // stderr is not taking lines as fast as they come: lose this one, not the
            // request's time.
            drop(pending);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            LINES_DROPPED.inc();
            return;
        }
        let was_empty = pending.is_empty();
        pending.extend_from_slice(line);
        drop(pending);
        if urgent {
            self.urgent.store(true, Ordering::Relaxed);
            self.ready.notify_one();
        } else if was_empty {
            self.ready.notify_one();
        }
    }

    /// Writes what is pending, then `line` (blocking while the sink does).
    fn write_through(&self, line: &[u8]) {
        let mut sink = lock(&self.sink);
        let (sink, batch) = &mut *sink;
        std::mem::swap(&mut *lock(&self.pending), batch);
        batch.extend_from_slice(line);
        if !batch.is_empty() {
            // Nowhere to report a failed write to: the log is where it would go.
            let _ = sink.write_all(batch).and_then(|()| sink.flush());
            batch.clear();
        }
        // A batch that grew far past the bound (one huge line) does not stay allocated.
        batch.shrink_to(MAX_PENDING);
    }

    /// Waits up to `wait` for what is pending to be written by the flushing thread, without
    /// ever writing (a stalled reader would hold the caller). Unbatched, nothing is pending.
    fn flush_within(&self, wait: Duration) {
        if !self.batched.load(Ordering::Relaxed) {
            return self.write_through(&[]);
        }
        let deadline = Instant::now() + wait;
        loop {
            // The sink free and nothing pending: every line so far is written.
            if let Ok(_sink) = self.sink.try_lock()
                && lock(&self.pending).is_empty()
            {
                return;
            }
            if Instant::now() >= deadline {
                return;
            }
            self.urgent.store(true, Ordering::Relaxed);
            self.ready.notify_one();
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The flushing thread: waits for a first line, gives others [`FLUSH_AFTER`] to join it
    /// (unless one is urgent), writes them all; then says how many lines were dropped, if any.
    fn run(&self) {
        loop {
            let mut pending = lock(&self.pending);
            while pending.is_empty() {
                pending = self
                    .ready
                    .wait(pending)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            let deadline = Instant::now() + FLUSH_AFTER;
            while !self.urgent.load(Ordering::Relaxed) {
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    break;
                };
                pending = self
                    .ready
                    .wait_timeout(pending, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            drop(pending);
            self.urgent.store(false, Ordering::Relaxed);
            self.write_through(&[]);
            self.report_dropped();
        }
    }

    /// Once stderr took a batch again: a warning, in the log's own format, that lines were lost.
    /// The warning itself is never dropped (it goes past the buffer's limit by its one line):
    /// by now the buffer has usually filled again while the batch was written, and a dropped
    /// notice would count itself as the one line lost.
    fn report_dropped(&self) {
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            NOTICE.set(true);
            tracing::warn!(
                dropped,
                "{dropped} log lines dropped: stderr did not take them (its reader stalled) \
                 and the log buffer was full"
            );
            NOTICE.set(false);
        }
    }
}

/// The log's writer (a tracing-subscriber [`MakeWriter`]): see the module's documentation.
#[derive(Clone, Copy)]
pub struct BatchedStderr {
    shared: &'static Shared,
}

static STDERR: OnceLock<&'static Shared> = OnceLock::new();

impl BatchedStderr {
    /// The process's one writer to stderr, batched or not as the first call asks (a server
    /// batches; a command that prints its own lines between log lines does not). Batched, the
    /// first call starts the flushing thread and makes a panic write what is pending before its
    /// message.
    pub fn get(batched: bool) -> Self {
        let shared = *STDERR.get_or_init(|| {
            if !batched {
                return Box::leak(Box::new(Shared::new(Box::new(io::stderr()), false)));
            }
            let shared = start(Box::new(io::stderr()));
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                flush();
                previous(info);
            }));
            shared
        });
        Self { shared }
    }
}

/// A writer to `sink` with its flushing thread (once per process: both live until it exits).
fn start(sink: Sink) -> &'static Shared {
    let shared: &'static Shared = Box::leak(Box::new(Shared::new(sink, true)));
    let started = std::thread::Builder::new()
        .name("log-flush".into())
        .spawn(move || shared.run());
    if started.is_err() {
        // No thread (a resource limit): every line is written at once, as without batching.
        shared.batched.store(false, Ordering::Relaxed);
    }
    shared
}

/// Writes the lines still pending (before the process exits), waiting at most [`FLUSH_WAIT`]
/// for stderr to take them. Nothing if none was logged.
pub fn flush() {
    flush_by(Instant::now() + FLUSH_WAIT);
}

/// As [`flush`], waiting for stderr until `deadline` at the latest (the exit's, which the last
/// span export shares).
pub fn flush_by(deadline: Instant) {
    if let Some(shared) = STDERR.get() {
        shared.flush_within(deadline.saturating_duration_since(Instant::now()));
    }
}

/// Writes `text` to stderr behind the log lines pending, by the flushing thread, so that a stderr
/// nobody reads does not hold the caller as `eprint!` would (past the buffer's bound it is
/// dropped, as a log line is); [`flush`] waits for it with them.
pub fn print(text: &str) {
    match STDERR.get() {
        Some(shared) => shared.append(text.as_bytes(), true),
        None => eprint!("{text}"),
    }
}

/// One event's line: tracing-subscriber formats it whole, then writes it with one `write_all`.
pub struct Line {
    shared: &'static Shared,
    at_once: bool,
}

impl io::Write for Line {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.shared.append(bytes, self.at_once);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchedStderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            shared: self.shared,
            at_once: true,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line {
        Line {
            shared: self.shared,
            // Levels compare by verbosity: WARN and ERROR are "at most" WARN.
            at_once: *meta.level() <= Level::WARN,
        }
    }
}

#[cfg(test)]
mod tests;
