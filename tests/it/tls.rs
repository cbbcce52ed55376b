//! HTTPS served by edgegate itself, with a certificate made for the test.

use tokio::net::TcpListener;

use crate::support::TestDb;

#[tokio::test]
async fn with_tls_files_set_the_same_app_is_served_over_https() {
    let (_db, _dir, certified, config) = with_tls_files();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(edgegate::run(config, listener, async move {
        let _ = stopped.await;
    }));

    let response = https_get(&certified, port, "/healthz").await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers().contains_key("x-request-id"),
        "same middleware stack"
    );

    let plain = reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await;
    assert!(
        plain.is_err() || plain.is_ok_and(|r| r.status() != 200),
        "plain HTTP must not be served on the TLS port"
    );

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_acceptor_built_by_the_caller_is_served_without_reading_the_files_again() {
    let (_db, _dir, certified, config) = with_tls_files();
    let files = config.tls.clone().unwrap();
    let acceptor = edgegate::server::load_tls(&files).unwrap();
    // Replaced between the binary's check and the start: what was checked is what is served.
    std::fs::write(&files.cert, "not a certificate").unwrap();
    std::fs::write(&files.key, "not a key").unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let options = edgegate::RunOptions {
        tls: Some(acceptor),
        ..edgegate::RunOptions::default()
    };
    let server = tokio::spawn(edgegate::run_with(
        config,
        listener,
        async move {
            let _ = stopped.await;
        },
        options,
    ));
    let response = https_get(&certified, port, "/healthz").await;
    assert_eq!(response.status(), 200);
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn unreadable_tls_files_stop_start_up() {
    let db = TestDb::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let config = db.config(&[
        ("TLS_CERT_FILE", junk.to_str().unwrap()),
        ("TLS_KEY_FILE", junk.to_str().unwrap()),
    ]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = edgegate::run(config, listener, std::future::pending())
        .await
        .expect_err("junk PEM files must be refused");
    assert!(format!("{err:#}").contains("TLS_CERT_FILE"), "{err:#}");
}

/// GETs `path` over HTTPS from the server on `port`, trusting only `certified`, retrying while
/// the server starts.
async fn https_get(
    certified: &rcgen::CertifiedKey<rcgen::KeyPair>,
    port: u16,
    path: &str,
) -> reqwest::Response {
    let root = reqwest::Certificate::from_pem(certified.cert.pem().as_bytes()).unwrap();
    let client = reqwest::Client::builder()
        .tls_certs_only([root])
        .resolve("localhost", ([127, 0, 0, 1], port).into())
        .build()
        .unwrap();
    let mut answered = None;
    for _ in 0..100 {
        match client
            .get(format!("https://localhost:{port}{path}"))
            .send()
            .await
        {
            Ok(response) => {
                answered = Some(response);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
    answered.expect("the HTTPS endpoint never answered")
}

/// A SQLite database and a configuration whose TLS files hold a new certificate for localhost.
fn with_tls_files() -> (
    TestDb,
    tempfile::TempDir,
    rcgen::CertifiedKey<rcgen::KeyPair>,
    edgegate::Config,
) {
    let db = TestDb::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let (certified, cert_path, key_path) = crate::support::self_signed_localhost(dir.path());
    let config = db.config(&[
        ("TLS_CERT_FILE", cert_path.to_str().unwrap()),
        ("TLS_KEY_FILE", key_path.to_str().unwrap()),
    ]);
    (db, dir, certified, config)
}

/// A TLS file that is there but cannot be read says so, with the system's reason: a key file
/// the service's user may not read was reported as holding "no readable PEM private key", which
/// sends an operator to check the key rather than its permissions.
#[test]
fn a_tls_file_that_cannot_be_read_says_why() {
    let (_db, _dir, _, config) = with_tls_files();
    let files = config.tls.unwrap();
    // Any read of it at offset 0 fails, for root too (who reads a file whatever its mode).
    let unreadable = std::path::PathBuf::from("/proc/self/mem");
    for (name, files) in [
        (
            "TLS_KEY_FILE",
            edgegate::config::TlsFiles {
                key: unreadable.clone(),
                ..files.clone()
            },
        ),
        (
            "TLS_CERT_FILE",
            edgegate::config::TlsFiles {
                cert: unreadable.clone(),
                ..files.clone()
            },
        ),
    ] {
        let Err(err) = edgegate::server::load_tls(&files) else {
            panic!("{name}: an unreadable file was accepted");
        };
        let shown = err.to_string();
        assert!(
            shown.starts_with(&format!("{name} cannot be read: ")),
            "{shown}"
        );
    }
}
