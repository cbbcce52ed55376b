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
        shared.append(line.as_bytes());
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
fn warnings_go_out_at_once_behind_what_is_pending() {
    let sink = Recorder::default();
    let shared: &'static Shared = Box::leak(Box::new(without_thread(&sink)));
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
        assert!(sink.writes().is_empty(), "{}", sink.text());
        tracing::warn!("third");
        let writes = sink.writes();
        assert_eq!(writes.len(), 1, "{}", sink.text());
        let text = sink.text();
        let order: Vec<_> = ["first", "second", "third"]
            .iter()
            .map(|word| text.find(word).unwrap_or_else(|| panic!("{word}: {text}")))
            .collect();
        assert!(order.is_sorted(), "{text}");
        tracing::info!("fourth");
        tracing::error!("fifth");
        assert_eq!(sink.writes().len(), 2, "{}", sink.text());
        assert!(sink.text().ends_with("fifth\n"), "{}", sink.text());
    });
}

#[test]
fn a_full_buffer_is_written_by_the_line_that_filled_it() {
    let sink = Recorder::default();
    let shared = without_thread(&sink);
    let line = [b'x'; 1023]
        .iter()
        .chain(b"\n")
        .copied()
        .collect::<Vec<u8>>();
    let lines_to_fill = MAX_PENDING / line.len();
    for _ in 0..lines_to_fill - 1 {
        shared.append(&line);
    }
    assert!(sink.writes().is_empty());
    shared.append(&line);
    assert_eq!(sink.writes().len(), 1);
    assert_eq!(sink.writes()[0].len(), MAX_PENDING);
    assert!(lock(&shared.pending).is_empty());
}

#[test]
fn unbatched_every_line_goes_out_at_once() {
    let sink = Recorder::default();
    let shared = Shared::new(Box::new(sink.clone()), false);
    shared.append(b"one\n");
    shared.append(b"two\n");
    assert_eq!(sink.writes(), [b"one\n".to_vec(), b"two\n".to_vec()]);
}

#[test]
fn write_through_sends_what_is_pending() {
    let sink = Recorder::default();
    let shared = without_thread(&sink);
    shared.append(b"pending\n");
    shared.write_through(&[]);
    assert_eq!(sink.text(), "pending\n");
    // Nothing pending: no empty write.
    shared.write_through(&[]);
    assert_eq!(sink.writes().len(), 1);
}
