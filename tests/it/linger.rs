//! Lingering close, over real sockets: a client still sending a body the server refused (413 to
//! a declared length over the route's limit) reads the whole answer before its connection is
//! reset, as undici (supabase-js's fetch) needs, and a client that never stops sending is cut
//! off within the linger bounds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::Running;

/// What the clients declare: 8 MiB, over every route's limit (1 MiB at most).
const DECLARED: usize = 8 * 1024 * 1024;
/// What they write at a time.
const CHUNK: usize = 64 * 1024;
/// edgegate's bounds (`server::conn`): in all, and between two reads (16 MiB read is the third).
const LINGER_TIME: Duration = Duration::from_secs(5);
const LINGER_GAP: Duration = Duration::from_secs(2);
/// What the tests give a bound beyond its nominal value (a loaded CI machine).
const SLACK: Duration = Duration::from_secs(2);

fn head(path: &str, length: usize) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: edgegate\r\ncontent-type: application/json\r\n\
         content-length: {length}\r\n\r\n"
    )
}

/// Reads one HTTP/1.1 answer with a `content-length` body: its status and body, or what went
/// wrong (an end of file or an error before it was whole).
async fn read_answer<R: AsyncRead + Unpin>(reader: &mut R) -> Result<(u16, String), String> {
    let mut data = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..at + 4]).into_owned();
            let length = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if data.len() >= at + 4 + length {
                let body = String::from_utf8_lossy(&data[at + 4..at + 4 + length]).into_owned();
                return Ok((head[9..12].parse().unwrap(), body));
            }
        }
        match reader.read(&mut buf).await {
            Ok(0) => return Err(format!("end of file after {} bytes", data.len())),
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(err) => return Err(format!("{err} after {} bytes", data.len())),
        }
    }
}

/// Sends a head declaring [`DECLARED`] bytes to `path`, then the body in [`CHUNK`]s (a pause
/// after each, as a client on a network sends it), and only then reads the answer, as undici
/// does in effect: a write that fails (a reset) before the answer was read fails the request
/// (`Failed to send a request` in supabase-js) though the answer came. Returns the answer's
/// body, or what the client saw instead.
async fn upload<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    path: &str,
) -> Result<String, String> {
    let sending = async {
        stream.write_all(head(path, DECLARED).as_bytes()).await?;
        let chunk = vec![b'a'; CHUNK];
        let mut sent = 0;
        while sent < DECLARED {
            stream.write_all(&chunk).await.map_err(|err| {
                std::io::Error::new(err.kind(), format!("{err} after {sent} bytes of body"))
            })?;
            sent += CHUNK;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        stream.flush().await
    };
    tokio::time::timeout(Duration::from_secs(20), sending)
        .await
        .map_err(|_| "the body not sent within 20 s".to_owned())?
        .map_err(|err| format!("a write failed before the answer was read: {err}"))?;
    let (status, body) = tokio::time::timeout(Duration::from_secs(5), read_answer(&mut stream))
        .await
        .map_err(|_| "no answer within 5 s".to_owned())?
        .map_err(|err| format!("no whole answer: {err}"))?;
    let json: Value =
        serde_json::from_str(&body).map_err(|err| format!("{status}, not JSON ({err}): {body}"))?;
    if status != 413 || json["code"] != "PAYLOAD_TOO_LARGE" {
        return Err(format!("{status} {body}"));
    }
    Ok(body)
}

/// Uploads 8 MiB to routes whose limit is 1 MiB, `tries` times over `connect`'s streams, and
/// fails with every try that did not read its 413.
async fn every_upload_reads_its_413<S, F>(tries: usize, connect: impl Fn() -> F)
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: std::future::Future<Output = S>,
{
    let mut failed = Vec::new();
    for try_ in 0..tries {
        let path = if try_ % 2 == 0 {
            "/functions/v1/jwt-test"
        } else {
            "/functions/v1/send-sms"
        };
        if let Err(err) = upload(connect().await, path).await {
            failed.push(format!("try {try_} ({path}): {err}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {tries} uploads over the limit did not read their 413:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

/// An 8 MiB body to a 1 MiB route is refused as its head comes, while the client is still
/// sending: it reads the whole 413 and its JSON before any reset. When the server closed at once,
/// the client's next write met a reset, before it read the answer, in most tries (undici then
/// throws the answer away: 7 of 10 such requests from supabase-js ended as network errors).
#[tokio::test]
async fn linger_a_body_refused_while_it_is_sent_is_answered_before_any_reset() {
    let server = Running::start(&[]).await;
    let port = server.port;
    every_upload_reads_its_413(20, || async move {
        TcpStream::connect(("127.0.0.1", port)).await.unwrap()
    })
    .await;
}

/// The same over edgegate's own TLS: the close lingers under the TLS stream as well.
#[tokio::test]
async fn linger_a_body_refused_while_it_is_sent_over_tls_is_answered_before_any_reset() {
    let dir = tempfile::tempdir().unwrap();
    let (certified, cert_path, key_path) = crate::support::self_signed_localhost(dir.path());
    let server = Running::start(&[
        ("TLS_CERT_FILE", cert_path.to_str().unwrap()),
        ("TLS_KEY_FILE", key_path.to_str().unwrap()),
    ])
    .await;
    let mut client = crate::support::trusting(&certified);
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let port = server.port;
    every_upload_reads_its_413(10, || {
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            connector
                .connect("localhost".try_into().unwrap(), tcp)
                .await
                .expect("TLS handshake")
        }
    })
    .await;
}

/// How a client that goes on sending after its 413 ends: how long after the answer its writes
/// began to fail, and how much it had sent by then (`None`: still open after `limit`).
async fn keep_sending(port: u16, pause: Duration, limit: Duration) -> Option<(Duration, usize)> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    writer
        .write_all(head("/functions/v1/send-sms", DECLARED).as_bytes())
        .await
        .unwrap();
    let answer = tokio::spawn(async move {
        let answer = read_answer(&mut reader).await;
        (answer, Instant::now())
    });
    let chunk = vec![b'a'; if pause.is_zero() { CHUNK } else { 4096 }];
    let mut sent = 0;
    let started = Instant::now();
    while started.elapsed() < limit + LINGER_TIME {
        if writer.write_all(&chunk).await.is_err() {
            let (answer, answered) = answer.await.unwrap();
            let (status, _) = answer.expect("the answer before the close");
            assert_eq!(status, 413);
            return Some((answered.elapsed(), sent));
        }
        sent += chunk.len();
        tokio::time::sleep(pause).await;
    }
    None
}

/// A client that declares 8 MiB and never stops sending (past what it declared) is cut off:
/// one sending as fast as it can once the server has read 16 MiB after the answer, one trickling
/// 40 KB/s after 5 s in all; one that stops sending (and never closes) after 2 s without data.
#[tokio::test]
async fn linger_a_client_that_never_stops_sending_is_disconnected_within_the_bound() {
    let server = Running::start(&[]).await;
    let port = server.port;
    let limit = LINGER_TIME + SLACK;
    let fast = keep_sending(port, Duration::ZERO, limit);
    let trickle = keep_sending(port, Duration::from_millis(100), limit);
    let stops = async {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (mut reader, mut writer) = stream.into_split();
        writer
            .write_all(head("/functions/v1/send-sms", DECLARED).as_bytes())
            .await
            .unwrap();
        writer.write_all(&vec![b'a'; 100_000]).await.unwrap();
        let (status, _) = read_answer(&mut reader).await.expect("an answer");
        assert_eq!(status, 413);
        tokio::time::sleep(LINGER_GAP + SLACK).await;
        // The server has closed: the first byte is answered with a reset, the next one fails.
        let mut failed = false;
        for _ in 0..10 {
            if writer.write_all(b"a").await.is_err() {
                failed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        failed
    };
    let (fast, trickle, stops) = tokio::join!(fast, trickle, stops);
    let (fast_after, fast_sent) = fast.expect("a fast sender was never cut off");
    let (trickle_after, trickle_sent) = trickle.expect("a trickling sender was never cut off");
    eprintln!(
        "fast sender cut off {fast_after:?} after its answer ({fast_sent} bytes sent); \
         trickling sender {trickle_after:?} ({trickle_sent} bytes)"
    );
    assert!(fast_after < limit, "{fast_after:?}");
    assert!(trickle_after < limit, "{trickle_after:?}");
    assert!(
        stops,
        "a client silent after its answer was still open {:?} later",
        LINGER_GAP + SLACK
    );
}

/// A client refused 413 that goes on trickling its body (4 KiB every 100 ms) on a lingering
/// connection; the task ends when a write fails, with when that was.
async fn lingering_client(port: u16) -> tokio::task::JoinHandle<Instant> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    writer
        .write_all(head("/functions/v1/send-sms", DECLARED).as_bytes())
        .await
        .unwrap();
    writer.write_all(&vec![b'a'; 100_000]).await.unwrap();
    let (status, _) = read_answer(&mut reader).await.expect("an answer");
    assert_eq!(status, 413);
    tokio::spawn(async move {
        let _reader = reader;
        while writer.write_all(&[b'a'; 4096]).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Instant::now()
    })
}

/// A stop signal's drain (25 s by default) waits for a lingering connection no longer than its
/// bound, 5 s.
#[tokio::test]
async fn linger_a_lingering_connection_holds_the_drain_no_longer_than_its_bound() {
    let mut server = Running::start(&[]).await;
    let port = server.port;
    let client = lingering_client(port).await;
    let stopping = Instant::now();
    let server = server.stop();
    tokio::time::timeout(LINGER_TIME + SLACK, server)
        .await
        .expect("the drain waited past the linger bound")
        .unwrap()
        .unwrap();
    eprintln!("stopped {:?} after the signal", stopping.elapsed());
    let cut = tokio::time::timeout(SLACK, client)
        .await
        .expect("the lingering client is cut off")
        .unwrap();
    assert!(cut.duration_since(stopping) < LINGER_TIME + SLACK);
}

/// A lingering connection keeps its slot, and at the cap gives it up to a waiting client as an
/// idle keep-alive connection does.
#[tokio::test]
async fn linger_at_the_connection_cap_a_lingering_connection_gives_its_slot_up() {
    let server = Running::start(&[("HTTP_MAX_CONNECTIONS", "1")]).await;
    let client = lingering_client(server.port).await;
    let asked = Instant::now();
    let mut fresh = TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap();
    fresh
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: edgegate\r\n\r\n")
        .await
        .unwrap();
    let (status, _) = tokio::time::timeout(LINGER_GAP, read_answer(&mut fresh))
        .await
        .expect("the waiting client got the lingering connection's slot")
        .unwrap();
    assert_eq!(status, 200);
    eprintln!(
        "a waiting client answered {:?} after it asked",
        asked.elapsed()
    );
    let cut = tokio::time::timeout(SLACK, client)
        .await
        .expect("the lingering client is cut off")
        .unwrap();
    assert!(cut.duration_since(asked) < LINGER_GAP);
}
