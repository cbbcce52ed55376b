//! Graceful shutdown: in-flight requests finish, new connections are refused, the drain is bounded.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use edgegate::server::middleware::Limits;
use edgegate::{AppState, routes};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};

use crate::support::{TestDb, serve};

/// A route that reports when it has started and finishes only when the test releases it.
fn gated_router(entered: Arc<Notify>, release: Arc<Semaphore>) -> Router<AppState> {
    routes::router().route(
        "/test/gated",
        get(move || {
            let (entered, release) = (entered.clone(), release.clone());
            async move {
                entered.notify_one();
                let _permit = release.acquire().await;
                "finished"
            }
        }),
    )
}

/// Waits until connecting to `addr` is refused (the listener is closed), within a bounded time.
async fn until_refused(addr: std::net::SocketAddr) -> bool {
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn in_flight_requests_finish_after_the_signal_while_new_connections_are_refused() {
    let db = TestDb::sqlite();
    let state = AppState::new(db.config(&[]), db.store().await);
    let (entered, release) = (Arc::new(Notify::new()), Arc::new(Semaphore::new(0)));
    let mut server = serve(
        gated_router(entered.clone(), release.clone()),
        &state,
        Limits::default(),
        Duration::from_secs(30),
    )
    .await;

    let in_flight = tokio::spawn({
        let (client, url) = (server.client.clone(), server.url("/test/gated"));
        async move { client.get(url).send().await }
    });
    entered.notified().await;

    server.begin_shutdown();
    assert!(
        until_refused(server.addr).await,
        "new connections still accepted"
    );
    assert!(
        !server.task.is_finished(),
        "the server stopped before its request finished"
    );

    release.add_permits(1);
    let response = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "finished");
    tokio::time::timeout(Duration::from_secs(5), &mut server.task)
        .await
        .expect("serve returns once drained")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn the_drain_is_bounded() {
    let db = TestDb::sqlite();
    let state = AppState::new(db.config(&[]), db.store().await);
    let (entered, release) = (Arc::new(Notify::new()), Arc::new(Semaphore::new(0)));
    let mut server = serve(
        gated_router(entered.clone(), release),
        &state,
        Limits::default(),
        Duration::from_millis(300),
    )
    .await;
    let stuck = tokio::spawn({
        let (client, url) = (server.client.clone(), server.url("/test/gated"));
        async move { client.get(url).send().await }
    });
    entered.notified().await;
    server.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(10), &mut server.task)
        .await
        .expect("serve gives up on a request that never finishes")
        .unwrap()
        .unwrap();
    stuck.abort();
}

/// Set when the value is dropped: the handler that held it has stopped running.
struct Dropped(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Dropped {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A route whose handler never finishes, and marks `stopped` when it is dropped.
fn endless_router(
    entered: Arc<Notify>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
) -> Router<AppState> {
    routes::router().route(
        "/test/endless",
        get(move || {
            let guard = Dropped(stopped.clone());
            let entered = entered.clone();
            async move {
                let _guard = guard;
                entered.notify_one();
                std::future::pending::<()>().await;
                "never"
            }
        }),
    )
}

/// When the drain ends, the requests still running are stopped (their handlers dropped, their
/// connections closed) before `serve` returns, so nothing of theirs runs on while the store
/// closes and the last spans are exported; over HTTP/1.1 and HTTP/2 alike.
#[tokio::test]
async fn requests_still_running_when_the_drain_ends_are_stopped_before_serve_returns() {
    for http2 in [false, true] {
        let db = TestDb::sqlite();
        let state = AppState::new(db.config(&[]), db.store().await);
        let entered = Arc::new(Notify::new());
        let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut server = serve(
            endless_router(entered.clone(), stopped.clone()),
            &state,
            Limits::default(),
            Duration::from_millis(300),
        )
        .await;
        let client = crate::support::plain_client(http2);
        let stuck = tokio::spawn({
            let url = server.url("/test/endless");
            async move { client.get(url).send().await }
        });
        entered.notified().await;
        server.begin_shutdown();
        let started = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(10), &mut server.task)
            .await
            .expect("serve gives up on a request that never finishes")
            .unwrap()
            .unwrap();
        // The drain (300 ms), then the stop (at most 1 s), with room for a loaded machine: the
        // handler's drop flag below, not the time, is what shows the request was stopped.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "http2: {http2}: serve took {:?}",
            started.elapsed()
        );
        assert!(
            stopped.load(std::sync::atomic::Ordering::SeqCst),
            "the handler still runs after serve returned (http2: {http2})"
        );
        let answer = tokio::time::timeout(Duration::from_secs(2), stuck)
            .await
            .unwrap_or_else(|_| panic!("the connection stayed open (http2: {http2})"))
            .unwrap();
        assert!(answer.is_err(), "http2: {http2}: {answer:?}");
    }
}

/// Writes `GET /healthz` on `stream` and reads until the end of the answer's head and body (a
/// `content-length` one): whether it came with status 200.
async fn healthz_over<S>(stream: &mut S) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: edgegate\r\n\r\n")
        .await
        .unwrap();
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    while !data.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    }
    data.starts_with(b"HTTP/1.1 200")
}

/// Whether the server closed `stream` (an end of file or a reset) within `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt as _;
    let mut buf = [0u8; 1024];
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, read).await.is_ok()
}

/// A connection on which no request has come whole yet (nothing sent; the first request's head
/// only in part, longer or shorter than HTTP/2's 24-byte preface; over TLS, a handshake never
/// begun) has no request to finish: the drain closes it within `UNSTARTED_GRACE` (2 s), not at
/// its header timeout. Each held the whole drain (hyper waits for a first request's head, here
/// until the 60 s head timeout): the stop took the drain's 20 s.
#[tokio::test]
async fn a_connection_with_no_whole_request_yet_does_not_hold_the_drain() {
    use crate::support::Running;
    use tokio::io::AsyncWriteExt as _;

    let dir = tempfile::tempdir().unwrap();
    let (certified, cert_path, key_path) = crate::support::self_signed_localhost(dir.path());
    let tls_vars = [
        ("TLS_CERT_FILE", cert_path.to_str().unwrap()),
        ("TLS_KEY_FILE", key_path.to_str().unwrap()),
    ];
    for tls in [false, true] {
        let mut vars = vec![
            ("HTTP_HEADER_READ_TIMEOUT_SECONDS", "60"),
            ("SHUTDOWN_DRAIN_SECONDS", "20"),
        ];
        if tls {
            vars.extend(tls_vars);
        }
        let mut server = Running::start(&vars).await;
        let port = server.port;
        let mut held = Vec::new();
        for sent in [
            &b""[..],
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
            b"GET /healthz HT",
        ] {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            if !tls {
                stream.write_all(sent).await.unwrap();
            }
            held.push(stream);
        }
        // A whole request on a connection made after them: answered once the service serves,
        // which accepts in order, so the held connections are accepted by then.
        let mut probe = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let answered = if tls {
            let client = crate::support::trusting(&certified);
            let mut stream = tokio_rustls::TlsConnector::from(Arc::new(client))
                .connect("localhost".try_into().unwrap(), probe)
                .await
                .expect("TLS handshake");
            healthz_over(&mut stream).await
        } else {
            healthz_over(&mut probe).await
        };
        assert!(answered, "tls: {tls}: /healthz not answered");
        // Let the connections' tasks read what was sent.
        tokio::time::sleep(Duration::from_millis(100)).await;

        let stopping = std::time::Instant::now();
        let stopped = tokio::time::timeout(Duration::from_secs(10), server.stop())
            .await
            .unwrap_or_else(|_| panic!("tls: {tls}: the drain waited for heads that never came"))
            .unwrap();
        let took = stopping.elapsed();
        // Nothing was in flight: a clean stop. Well under the 20 s drain, with room for a
        // loaded machine (it takes milliseconds).
        stopped.unwrap_or_else(|err| panic!("tls: {tls}: {err:#}"));
        assert!(took < Duration::from_secs(5), "tls: {tls}: took {took:?}");
        for (at, stream) in held.iter_mut().enumerate() {
            assert!(
                closed_within(stream, Duration::from_secs(2)).await,
                "tls: {tls}: connection {at} left open"
            );
        }
    }
}

/// A first request whose head was under way when the drain began, and comes whole within the
/// grace, is served: a client on a slow link still sending a large head is not cut off (closing
/// every connection with no whole request at once reset it).
#[tokio::test]
async fn a_first_head_that_comes_whole_within_the_grace_is_served_during_the_drain() {
    use crate::support::Running;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let mut server = Running::start(&[("SHUTDOWN_DRAIN_SECONDS", "20")]).await;
    let port = server.port;
    let mut slow = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Served in order of acceptance: once this is answered, the slow one was accepted too.
    let mut probe = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    assert!(healthz_over(&mut probe).await, "/healthz not answered");
    tokio::time::sleep(Duration::from_millis(100)).await;

    let stopped = server.stop();
    // The drain has begun; the head comes whole well within the 2 s grace.
    tokio::time::sleep(Duration::from_millis(500)).await;
    slow.write_all(b"connection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        matches!(read, Ok(Ok(_))) && answer.starts_with("HTTP/1.1 200"),
        "the head finished during the drain was not served: {read:?}: {answer:?}"
    );
    tokio::time::timeout(Duration::from_secs(10), stopped)
        .await
        .expect("the stop did not end")
        .unwrap()
        .expect("a clean stop");
}
