//! The log's way to stderr: info and below in batches, warnings and errors at once.
//!
//! One `write` to stderr a request line cost `serve` a quarter of a `/healthz` request's CPU
//! time when stderr was a pipe, as it is under a container runtime or a log shipper (the reader
//! is woken at every line), and an eighth into a file (BENCHMARKS.md, sixth pass). Lines at info
//! and below are appended to a buffer that a thread of its own writes [`FLUSH_AFTER`] after the
//! first line lands in it, all of them in one `write`; a buffer past [`MAX_PENDING`] bytes is
//! written by the thread that filled it (so a stalled reader slows logging, as before, and
//! memory stays bounded). Warnings and errors are written at once, behind whatever is pending,
//! so the log's order is kept and a warning is out when its macro returns. [`flush`] (at
//! exit, and before a panic's message) writes what is pending. What a crash loses: the info
//! lines of its last [`FLUSH_AFTER`].

use std::io::{self, Write as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// How long the first line of a batch waits for others.
pub const FLUSH_AFTER: Duration = Duration::from_millis(2);
/// The most bytes pending: past it the line's own thread writes the batch.
pub const MAX_PENDING: usize = 256 * 1024;

/// Where the lines go: stderr, or in tests a buffer of their own.
type Sink = Box<dyn io::Write + Send>;

struct Shared {
    /// Whether a flushing thread runs; without one every line is written at once.
    batched: AtomicBool,
    /// Lines not written yet.
    pending: Mutex<Vec<u8>>,
    /// Signalled when `pending` stops being empty.
    ready: Condvar,
    /// The sink and a spare buffer that the batch is swapped into while it is written; held
    /// for every write, so batches and direct lines reach the sink in the order they were made.
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
            sink: Mutex::new((sink, Vec::with_capacity(capacity))),
        }
    }

    fn append(&self, line: &[u8]) {
        if !self.batched.load(Ordering::Relaxed) {
            return self.write_through(line);
        }
        let mut pending = lock(&self.pending);
        let was_empty = pending.is_empty();
        pending.extend_from_slice(line);
        let full = pending.len() >= MAX_PENDING;
        drop(pending);
        if full {
            self.write_through(&[]);
        } else if was_empty {
            self.ready.notify_one();
        }
    }

    /// Writes what is pending, then `line`.
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

    /// The flushing thread: waits for a first line, gives others [`FLUSH_AFTER`] to join it,
    /// writes them all.
    fn run(&self) {
        loop {
            let mut pending = lock(&self.pending);
            while pending.is_empty() {
                pending = self
                    .ready
                    .wait(pending)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            drop(pending);
            std::thread::sleep(FLUSH_AFTER);
            self.write_through(&[]);
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

/// Writes the lines still pending (before the process exits). Nothing if none was logged.
pub fn flush() {
    if let Some(shared) = STDERR.get() {
        shared.write_through(&[]);
    }
}

/// One event's line: tracing-subscriber formats it whole, then writes it with one `write_all`.
pub struct Line {
    shared: &'static Shared,
    at_once: bool,
}

impl io::Write for Line {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if self.at_once {
            self.shared.write_through(bytes);
        } else {
            self.shared.append(bytes);
        }
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
