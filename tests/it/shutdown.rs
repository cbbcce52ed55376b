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
        let client = if http2 {
            reqwest::Client::builder()
                .http2_prior_knowledge()
                .build()
                .unwrap()
        } else {
            reqwest::Client::new()
        };
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
