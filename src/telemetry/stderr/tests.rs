use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;

/// A sink that keeps each `write` apart, to count them.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

impl io::Write for Recorder {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().push(bytes.to_vec());
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Recorder {
    fn writes(&self) -> Vec<Vec<u8>> {
        self.0.lock().unwrap().clone()
    }

    fn text(&self) -> String {
        String::from_utf8(self.writes().concat()).unwrap()
    }
}

/// A batched writer with no flushing thread: nothing is written until something writes it.
fn without_thread(sink: &Recorder) -> Shared {
    Shared::new(Box::new(sink.clone()), true)
}

#[test]
fn info_lines_reach_the_sink_in_order_in_a_few_writes() {
    let sink = Recorder::default();
    let shared = start(Box::new(sink.clone()));
    let lines: Vec<String> = (0..200).map(|i| format!("line {i}\n")).collect();
    for line in &lines {
        shared.append(line.as_bytes(), false);
    }
    let expected = lines.concat();
    let started = Instant::now();
    while sink.text().len() < expected.len() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{}",
            sink.text()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(sink.text(), expected);
    // One write a line before: 200. The thread writes what came in its 2 ms: one batch here,
    // a few if this thread was descheduled between lines.
    let writes = sink.writes().len();
    assert!(writes <= 10, "{writes} writes for 200 lines");
}

#[test]
fn warnings_go_out_behind_what_is_pending_without_waiting_for_the_batch() {
    let sink = Recorder::default();
    let shared = start(Box::new(sink.clone()));
    let writer = BatchedStderr { shared };
    let subscriber = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(false)
        .without_time()
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        tracing::info!("first");
        tracing::debug!("not enabled");
        tracing::info!("second");
        tracing::warn!("third");
        // All three are out (the warning does not wait for the batch), in the log's order.
        let started = Instant::now();
        while !sink.text().contains("third") {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{}",
                sink.text()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let text = sink.text();
        let order: Vec<_> = ["first", "second", "third"]
            .iter()
            .map(|word| text.find(word).unwrap_or_else(|| panic!("{word}: {text}")))
            .collect();
        assert!(order.is_sorted(), "{text}");
        tracing::info!("fourth");
        tracing::error!("fifth");
        shared.flush_within(Duration::from_secs(10));
        assert!(sink.text().ends_with("fifth\n"), "{}", sink.text());
    });
}

/// A sink that takes nothing until it is let go: a stderr nobody reads.
struct Stalled(Arc<Mutex<bool>>, Recorder);

impl io::Write for Stalled {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        while !*self.0.lock().unwrap() {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.1.write(bytes)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_stalled_sink_makes_lines_dropped_and_counted_never_blocking_the_logger() {
    let sink = Recorder::default();
    let open = Arc::new(Mutex::new(false));
    let shared = start(Box::new(Stalled(open.clone(), sink.clone())));
    let line = [b'x'; 1023]
        .iter()
        .chain(b"\n")
        .copied()
        .collect::<Vec<u8>>();
    let before = LINES_DROPPED.get();
    let started = Instant::now();
    // The first batch is stuck in the sink; the next fills the buffer; the rest are dropped.
    for i in 0..3 * MAX_PENDING / line.len() {
        shared.append(&line, i % 10 == 0);
    }
    shared.flush_within(Duration::from_millis(50));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the logger waited for the sink"
    );
    let dropped = shared.dropped.load(Ordering::Relaxed);
    assert!(dropped >= (MAX_PENDING / line.len()) as u64, "{dropped}");
    assert!(LINES_DROPPED.get() - before >= dropped);
    assert!(lock(&shared.pending).len() <= MAX_PENDING);
    *open.lock().unwrap() = true;
    shared.flush_within(Duration::from_secs(10));
    assert!(sink.text().len() <= 2 * MAX_PENDING);
}

#[test]
fn unbatched_every_line_goes_out_at_once() {
    let sink = Recorder::default();
    let shared = Shared::new(Box::new(sink.clone()), false);
    shared.append(b"one\n", false);
    shared.append(b"two\n", false);
    assert_eq!(sink.writes(), [b"one\n".to_vec(), b"two\n".to_vec()]);
}

#[test]
fn write_through_sends_what_is_pending() {
    let sink = Recorder::default();
    let shared = without_thread(&sink);
    shared.append(b"pending\n", false);
    shared.write_through(&[]);
    assert_eq!(sink.text(), "pending\n");
    // Nothing pending: no empty write.
    shared.write_through(&[]);
    assert_eq!(sink.writes().len(), 1);
}
