//! The `edgegate` binary as an operator runs it: start-up, signals, exit codes, subcommands.

use crate::process::{
    BIN, edgegate, free_port, output, signal, spawn_server, wait_exit, wait_healthy,
};
use crate::support::TestDb;
use sqlx::Connection as _;

/// `edgegate check` in `dir` with `vars`: asserts that it exits with `code`, and returns its
/// stdout.
fn check_exits(dir: &std::path::Path, vars: &[(&str, &str)], code: i32) -> String {
    let out = output(edgegate(dir, vars).arg("check"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(code), "{stdout}");
    stdout
}

/// The line of `check`'s `stdout` that reports on the database.
fn database_line(stdout: &str) -> &str {
    stdout
        .lines()
        .find(|l| l.contains("database"))
        .unwrap_or_else(|| panic!("{stdout}"))
}

async fn serve_then_signal(signal_name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = spawn_server(dir.path(), "server.log", &[("PORT", &port.to_string())]);
    assert!(wait_healthy(port).await, "edgegate never answered /healthz");
    let ready = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    assert!(
        dir.path().join("edgegate.db").exists(),
        "default SQLite file not created"
    );

    signal(&child, signal_name);
    let status = wait_exit(&mut child).await;
    assert_eq!(status.code(), Some(0), "exit status after {signal_name}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[tokio::test]
async fn with_no_configuration_it_serves_on_sqlite_and_exits_0_on_sigterm() {
    serve_then_signal("TERM").await;
}

#[tokio::test]
async fn sigint_also_shuts_down_cleanly() {
    serve_then_signal("INT").await;
}

/// `held.db` in `dir` made and migrated, so that a process started on it waits for the lock
/// inside its migration (`sqlite::migrate`), not before it makes the file: a process starting
/// on a file not there yet (or with no pages) takes the lock first to set the file up.
fn migrated_held_db(dir: &std::path::Path) {
    let migrated = output(edgegate(dir, &[("DATABASE_URL", "sqlite://held.db")]).arg("migrate"));
    assert!(migrated.status.success(), "{migrated:?}");
    assert!(std::fs::metadata(dir.join("held.db")).unwrap().len() > 0);
}

/// A new folder with `held.db`'s migration lock held in it (drop the file to free it), the
/// database made and migrated first when `set_up` ([`migrated_held_db`]), else not there.
fn held_migration_lock(set_up: bool) -> (tempfile::TempDir, std::fs::File) {
    let dir = tempfile::tempdir().unwrap();
    if set_up {
        migrated_held_db(dir.path());
    }
    let lock = std::fs::File::create(dir.path().join("held.db.migrate-lock")).unwrap();
    lock.lock().unwrap();
    (dir, lock)
}

/// Waits (at most 10 s) for `log` in `dir` to contain `said`; whether it did.
async fn log_says(dir: &std::path::Path, log: &str, said: &str) -> bool {
    for _ in 0..100 {
        if std::fs::read_to_string(dir.join(log))
            .unwrap_or_default()
            .contains(said)
        {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    false
}

/// What the migration wait (inside `sqlite::migrate`) says after 2 s.
const MIGRATION_WAIT_SAID: &str = "waiting for another process's migrations";
/// What the wait to set up a new database file says after 2 s: not the migration wait's words
/// (a `--no-migrate` process waits there too, which applies none).
const SET_UP_WAIT_SAID: &str = "waiting to set up the new database file";

/// A stop asked for while start-up waits (here for another process's SQLite migration lock)
/// ends the process at once, cleanly: as PID 1 in a container, a SIGTERM that comes before a
/// handler is set is dropped by the kernel, and the instance is killed later with no drain.
/// Both waits: inside the migration, on a database set up already, and before a new file is
/// made (no `held.db` yet).
#[tokio::test]
async fn sigterm_during_start_up_stops_it_cleanly() {
    for (set_up, said) in [(true, MIGRATION_WAIT_SAID), (false, SET_UP_WAIT_SAID)] {
        let (dir, lock) = held_migration_lock(set_up);
        let port = free_port().to_string();
        let vars = [
            ("DATABASE_URL", "sqlite://held.db"),
            ("PORT", port.as_str()),
            ("RUST_LOG", "info"),
        ];
        let mut child = spawn_server(dir.path(), "server.log", &vars);
        let log = || std::fs::read_to_string(dir.path().join("server.log")).unwrap();
        // Said after 2 s of waiting.
        assert!(log_says(dir.path(), "server.log", said).await, "{}", log());
        assert!(
            child.try_wait().unwrap().is_none(),
            "it did not wait for the lock"
        );
        assert_eq!(dir.path().join("held.db").exists(), set_up, "{}", log());
        assert_eq!(log().contains(MIGRATION_WAIT_SAID), set_up, "{}", log());

        signal(&child, "TERM");
        let status = wait_exit(&mut child).await;
        let log = log();
        assert_eq!(status.code(), Some(0), "{status:?}: {log}");
        assert!(log.contains("stopped before serving"), "{log}");
        drop(lock);
    }
}

/// `migrate` (Fly's release command) waiting for another process's migration lock stops at a
/// SIGTERM or SIGINT and says so, exit 1: it set no handler, so as PID 1 in a container (the
/// image's entrypoint) both signals were ignored, Ctrl-C did nothing and `docker stop` killed it
/// after its timeout. Both waits, as for `serve` above.
#[tokio::test]
async fn a_signal_stops_migrate_waiting_for_the_lock() {
    use crate::process::spawn_logged;
    for name in ["TERM", "INT"] {
        for (set_up, said) in [(true, MIGRATION_WAIT_SAID), (false, SET_UP_WAIT_SAID)] {
            let (dir, lock) = held_migration_lock(set_up);
            let vars = [("DATABASE_URL", "sqlite://held.db")];
            let mut command = edgegate(dir.path(), &vars);
            command.arg("migrate");
            let mut child = spawn_logged(command, dir.path(), "migrate.log");
            let log = || std::fs::read_to_string(dir.path().join("migrate.log")).unwrap();
            assert!(log_says(dir.path(), "migrate.log", said).await, "{}", log());
            assert!(child.try_wait().unwrap().is_none(), "it did not wait");
            assert_eq!(dir.path().join("held.db").exists(), set_up, "{}", log());
            assert_eq!(log().contains(MIGRATION_WAIT_SAID), set_up, "{}", log());

            signal(&child, name);
            let status = wait_exit(&mut child).await;
            let log = log();
            assert_eq!(status.code(), Some(1), "SIG{name}: {status:?}: {log}");
            assert!(log.contains("stopped by SIG"), "{log}");
            drop(lock);
        }
    }
}

/// A process that waited 2 s or more to set up a new database file says, once it has the lock,
/// that it sets the file up only when it does: when the process that held the lock set the file
/// up meanwhile (this test, as serve or migrate would: the file given its first page), it says
/// that one did. It said "setting up the database file" either way.
#[tokio::test]
async fn after_the_set_up_wait_it_says_whether_it_sets_the_file_up() {
    use crate::process::spawn_logged;
    for set_up_meanwhile in [true, false] {
        let (dir, lock) = held_migration_lock(false);
        let vars = [("DATABASE_URL", "sqlite://held.db"), ("RUST_LOG", "info")];
        let mut command = edgegate(dir.path(), &vars);
        command.arg("migrate");
        let mut child = spawn_logged(command, dir.path(), "migrate.log");
        let log = || std::fs::read_to_string(dir.path().join("migrate.log")).unwrap();
        assert!(
            log_says(dir.path(), "migrate.log", SET_UP_WAIT_SAID).await,
            "{}",
            log()
        );
        if set_up_meanwhile {
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(dir.path().join("held.db"))
                .create_if_missing(true)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
            let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
            pool.close().await;
            assert!(std::fs::metadata(dir.path().join("held.db")).unwrap().len() > 0);
        }
        drop(lock);
        let status = wait_exit(&mut child).await;
        let log = log();
        assert!(status.success(), "{log}");
        assert_eq!(
            log.contains("the migration lock is taken; setting up the database file"),
            !set_up_meanwhile,
            "{log}"
        );
        assert_eq!(
            log.contains(
                "the migration lock is taken; the process that held it set the database file up"
            ),
            set_up_meanwhile,
            "{log}"
        );
    }
}

/// One request to jwt-test with a user session signed by the legacy `secret`, answered 200: a
/// use of the legacy secret, counted in memory until the next flush.
async fn use_legacy_secret(port: u16, secret: &str) {
    let claims = edgegate::auth::mint::user_claims(
        "supabase",
        "authenticated",
        "user-1",
        crate::support::now_ms() / 1000,
        3600,
    );
    let token = edgegate::auth::mint::legacy_token(secret.as_bytes(), &claims, None);
    let response = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/functions/v1/jwt-test"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// At SIGTERM the usage counts are written and the process ends by itself, well inside Fly's
/// kill timeout, even while a JWKS fetch hangs on a host that accepts and never answers.
#[tokio::test]
async fn a_hanging_jwks_fetch_does_not_hold_up_the_stop() {
    let host = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/auth/v1/.well-known/jwks.json",
        host.local_addr().unwrap()
    );
    let (fetching, fetched) = tokio::sync::oneshot::channel();
    let held = tokio::spawn(async move {
        let (connection, _) = host.accept().await.unwrap();
        let _ = fetching.send(());
        std::future::pending::<()>().await;
        drop(connection);
    });
    let secret = "super-secret-jwt-token-with-at-least-32-characters-long";
    let db = TestDb::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let vars = [
        ("PORT", port.to_string()),
        ("DATABASE_URL", db.url.clone()),
        ("SUPABASE_JWKS_URL", url),
        ("SUPABASE_JWT_SECRET", secret.to_owned()),
        ("SHUTDOWN_DRAIN_SECONDS", "0".to_owned()),
    ];
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut child = spawn_server(dir.path(), "server.log", &vars);
    assert!(wait_healthy(port).await, "edgegate never answered /healthz");
    fetched.await.unwrap();
    use_legacy_secret(port, secret).await;

    signal(&child, "TERM");
    let stopping = std::time::Instant::now();
    let status = wait_exit(&mut child).await;
    let took = stopping.elapsed();
    assert_eq!(status.code(), Some(0));
    // The fetch's own timeout is 5 s: not waited for (the refresh gets 500 ms to stop; the
    // margin is for a loaded machine, and stays under the 5 s a wait for the fetch would take).
    assert!(took < std::time::Duration::from_millis(4_500), "{took:?}");
    let store = db.store().await;
    let usage = store.key_usage_since(0).await.unwrap();
    assert!(
        usage
            .iter()
            .any(|row| row.source == "legacy_secret" && row.verified_count == 1),
        "{usage:?}"
    );
    held.abort();
}

/// A connection of the test's own that holds the SQLite file at `url` locked (`BEGIN
/// EXCLUSIVE`) until it is dropped.
async fn lock_sqlite_file(url: &str) -> sqlx::SqliteConnection {
    let mut holder = sqlx::SqliteConnection::connect(url).await.unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut holder)
        .await
        .unwrap();
    holder
}

/// Whatever stalls after the drain, the process ends within the drain's limit and the steps'
/// budget: here a database locked by another process (the last usage flush waits on it), an
/// OTLP collector that takes the connection and never answers (the last span export), and a
/// stderr nobody reads (the last log lines), all at once. Each step once had a wait of its own
/// (up to 3 s, 2 s for the log, 1 s for spans, 2 s for the log again, 0.5 s for the runtime's
/// threads), past Fly's kill timeout together.
#[tokio::test]
async fn the_stop_ends_within_its_budget_when_the_database_collector_and_stderr_all_stall() {
    use std::time::{Duration, Instant};

    let collector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", collector.local_addr().unwrap());
    let holding = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((connection, _)) = collector.accept().await {
            held.push(connection);
        }
    });
    let secret = "super-secret-jwt-token-with-at-least-32-characters-long";
    let db = TestDb::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let port_text = port.to_string();
    let vars = [
        ("PORT", port_text.as_str()),
        ("DATABASE_URL", db.url.as_str()),
        ("SUPABASE_JWT_SECRET", secret),
        ("SHUTDOWN_DRAIN_SECONDS", "0"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("LOG_FORMAT", "json"),
        ("RUST_LOG", "info"),
    ];
    // stderr is piped and never read.
    let mut child = crate::process::Server::from_child(
        edgegate(dir.path(), &vars)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start edgegate"),
    );
    assert!(wait_healthy(port).await, "edgegate never answered /healthz");
    // A pipe holds 64 KiB; each request's line repeats its long id: 600 of them fill it.
    let client = reqwest::Client::new();
    let id = "x".repeat(128);
    for _ in 0..600 {
        let answer = client
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .header("x-request-id", &id)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    // A count the last flush must write, into a file another process holds locked.
    use_legacy_secret(port, secret).await;
    let _holder = lock_sqlite_file(&db.url).await;

    signal(&child, "TERM");
    let stopping = Instant::now();
    let status = wait_exit(&mut child).await;
    let took = stopping.elapsed();
    // The last usage flush, waiting on the locked file, was cut off: not a clean stop.
    assert_eq!(status.code(), Some(1));
    // The drain is 0 s; the margin is for a loaded machine.
    let budget = edgegate::AFTER_DRAIN + edgegate::telemetry::EXIT_AFTER_STOP;
    assert!(
        took < budget + Duration::from_secs(2),
        "exited {took:?} after SIGTERM, budget {budget:?}"
    );
    holding.abort();
}

/// Counts the last flush could not write before the stop's deadline cut it off are said lost,
/// in the line OPERATIONS.md and MIGRATION.md tell operators to look for before trusting the
/// legacy verdict: the flush's future was dropped by the deadline before it could say so, and
/// the stop logged only that its steps were cut.
#[tokio::test]
async fn usage_the_deadline_cut_off_from_the_database_is_said_lost() {
    let secret = "super-secret-jwt-token-with-at-least-32-characters-long";
    let db = TestDb::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let port_text = port.to_string();
    let vars = [
        ("PORT", port_text.as_str()),
        ("DATABASE_URL", db.url.as_str()),
        ("SUPABASE_JWT_SECRET", secret),
        ("SHUTDOWN_DRAIN_SECONDS", "0"),
        ("LOG_FORMAT", "json"),
        ("RUST_LOG", "info"),
    ];
    let mut child =
        crate::process::spawn_logged(edgegate(dir.path(), &vars), dir.path(), "server.log");
    assert!(wait_healthy(port).await, "edgegate never answered /healthz");
    // A count the last flush must write, into a file another process holds locked.
    use_legacy_secret(port, secret).await;
    let _holder = lock_sqlite_file(&db.url).await;

    signal(&child, "TERM");
    let status = wait_exit(&mut child).await;
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    let lost = log
        .lines()
        .find(|line| line.contains("key usage lost at shutdown"))
        .unwrap_or_else(|| panic!("no `key usage lost at shutdown` line in:\n{log}"));
    assert!(lost.contains("WARN"), "{lost}");
}

#[test]
fn a_malformed_variable_stops_start_up_with_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = output(&mut edgegate(
        dir.path(),
        &[("STRIPE_SECRET_KEY", "pk_live_x")],
    ));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("STRIPE_SECRET_KEY"), "{stderr}");
    assert!(!stderr.contains("pk_live_x"), "the value leaked: {stderr}");
    assert!(
        !dir.path().join("edgegate.db").exists(),
        "nothing may start"
    );
}

#[test]
fn a_dotenv_file_is_read() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".env"), "SMS_MAX_PER_MINUTE=zero\n").unwrap();
    let out = output(edgegate(dir.path(), &[]).arg("check"));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SMS_MAX_PER_MINUTE"));
}

/// A `.env` line that does not parse is named by its variable, never shown: its value may be
/// a secret (and, with an unclosed quote, run on over several lines).
#[test]
fn a_dotenv_line_that_does_not_parse_is_named_not_shown() {
    let dir = tempfile::tempdir().unwrap();
    for line in [
        "SUPABASE_JWT_SECRET=\"super-secret-legacy-hs256-value-0123456789\nPORT=8080\n",
        "export STRIPE_SECRET_KEY=sk_live_abc\\qdef-secret\n",
    ] {
        std::fs::write(dir.path().join(".env"), line).unwrap();
        let out = output(edgegate(dir.path(), &[]).arg("check"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(!stderr.contains("secret"), "{stderr}");
        let name = if line.contains("JWT") {
            "SUPABASE_JWT_SECRET"
        } else {
            "STRIPE_SECRET_KEY"
        };
        assert!(stderr.contains(name) && stderr.contains(".env"), "{stderr}");
    }
}

/// Only the working directory's `.env` is read, not one in a folder above it.
#[test]
fn a_dotenv_file_above_the_working_directory_is_not_read() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".env"), "SMS_MAX_PER_MINUTE=zero\n").unwrap();
    let below = dir.path().join("sub/deeper");
    std::fs::create_dir_all(&below).unwrap();
    // check fails a database file that migrate has not made.
    let migrated = output(edgegate(&below, &[]).arg("migrate"));
    assert!(migrated.status.success(), "{migrated:?}");
    let out = output(edgegate(&below, &[]).arg("check"));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn migrate_and_check_report_on_the_database() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let vars = [("DATABASE_URL", db.url.as_str())];
    let out = output(edgegate(dir.path(), &vars).arg("migrate"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every shipped migration, however many later issues add.
    let shipped = edgegate::store::shipped_migrations()[0].1.len();
    let applied = format!("{shipped} migrations applied, {shipped} new");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&applied));

    let out = output(edgegate(dir.path(), &vars).arg("check"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("ok") && l.contains("database")),
        "{stdout}"
    );
}

#[test]
fn check_fails_and_hides_the_password_when_the_database_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("postgres://app:hunter2hunter2@127.0.0.1:{port}/app");
    let out = output(edgegate(dir.path(), &[("DATABASE_URL", &url)]).arg("check"));
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains("database")),
        "{stdout}"
    );
    assert!(!stdout.contains("hunter2hunter2"), "{stdout}");
}

#[tokio::test]
async fn healthcheck_exits_0_only_when_healthz_answers() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let out = output(edgegate(dir.path(), &[("PORT", &port)]).arg("healthcheck"));
    assert_eq!(out.status.code(), Some(1), "nothing listens yet");

    let mut child = spawn_server(dir.path(), "server.log", &[("PORT", &port)]);
    assert!(wait_healthy(port.parse().unwrap()).await);
    let out = output(edgegate(dir.path(), &[("PORT", &port)]).arg("healthcheck"));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = output(
        edgegate(dir.path(), &[])
            .arg("healthcheck")
            .arg(format!("http://127.0.0.1:{port}/nope")),
    );
    assert_eq!(out.status.code(), Some(1), "a 404 is not healthy");
    // A base URL is probed at /healthz, as the contract says.
    for base in [
        format!("http://127.0.0.1:{port}"),
        format!("http://127.0.0.1:{port}/"),
    ] {
        let out = output(edgegate(dir.path(), &[]).arg("healthcheck").arg(&base));
        assert_eq!(
            out.status.code(),
            Some(0),
            "{base}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    signal(&child, "TERM");
    assert_eq!(wait_exit(&mut child).await.code(), Some(0));
}

/// A failed `healthcheck` names the URL it probed without the user, password or query the
/// operator may have put in it, whether the server answered or could not be reached.
#[tokio::test]
async fn healthcheck_failures_name_the_url_without_its_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let mut child = spawn_server(dir.path(), "server.log", &[("PORT", &port)]);
    assert!(wait_healthy(port.parse().unwrap()).await);
    let closed = free_port();
    for (url, said) in [
        (
            format!("http://probe:SEKRITpw@127.0.0.1:{port}/nope?token=SEKRITq#SEKRITf"),
            format!("http://…@127.0.0.1:{port}/nope?…#… answered 404 Not Found"),
        ),
        (
            format!("http://probe:SEKRITpw@127.0.0.1:{closed}/healthz?token=SEKRITq"),
            format!("http://…@127.0.0.1:{closed}/healthz?…: "),
        ),
    ] {
        let out = output(edgegate(dir.path(), &[]).arg("healthcheck").arg(&url));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(&said), "{stderr}");
        assert!(!stderr.contains("SEKRIT"), "{stderr}");
    }
    signal(&child, "TERM");
    assert_eq!(wait_exit(&mut child).await.code(), Some(0));
}

/// TLS files that hold no usable certificate and key are a configuration error: `serve` stops
/// with exit 2 and one line naming the variable, `check` fails their line.
#[test]
fn unusable_tls_files_are_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("notpem.txt");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let junk = junk.to_str().unwrap();
    let port = free_port().to_string();
    let vars = [
        ("TLS_CERT_FILE", junk),
        ("TLS_KEY_FILE", junk),
        ("PORT", port.as_str()),
    ];
    let out = output(edgegate(dir.path(), &vars).arg("serve"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let last = stderr.trim_end().lines().last().unwrap_or_default();
    assert!(last.contains("TLS_CERT_FILE"), "{stderr}");
    let stdout = check_exits(dir.path(), &vars, 1);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains("TLS_CERT_FILE")),
        "{stdout}"
    );
}

/// The TLS files are read by the commands that use them: `migrate` (Fly's release machine has
/// no certificate mount) runs without them, `serve` stops with exit 2 naming the variable and
/// `check` fails their line.
#[test]
fn missing_tls_files_stop_serve_and_check_only() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let vars = [
        ("TLS_CERT_FILE", "/definitely/not/cert.pem"),
        ("TLS_KEY_FILE", "/definitely/not/key.pem"),
        ("PORT", port.as_str()),
    ];
    let out = output(edgegate(dir.path(), &vars).arg("migrate"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let out = output(edgegate(dir.path(), &vars).arg("serve"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let last = stderr.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.contains("TLS_CERT_FILE must name a readable file"),
        "{stderr}"
    );
    let stdout = check_exits(dir.path(), &vars, 1);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains("TLS_CERT_FILE")),
        "{stdout}"
    );
}

/// Without a URL, `healthcheck` probes the address the server listens on (`HOST`), loopback
/// when that is every address: a container bound to `::1` alone is healthy too.
#[tokio::test]
async fn healthcheck_probes_the_host_the_server_listens_on() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let vars = [("HOST", "::1"), ("PORT", port.as_str())];
    let mut child = spawn_server(dir.path(), "server.log", &vars);
    let mut last = None;
    for _ in 0..100 {
        let out = output(edgegate(dir.path(), &vars).arg("healthcheck"));
        if out.status.success() {
            last = None;
            break;
        }
        last = Some(String::from_utf8_lossy(&out.stderr).into_owned());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    signal(&child, "TERM");
    assert_eq!(wait_exit(&mut child).await.code(), Some(0));
    assert_eq!(last, None, "healthcheck never passed");
}

/// The server turns transparent huge pages off for itself (the kernel's per-process flag, which
/// `/proc/PID/status` shows as `THP_enabled`): with the host's THP set to "always", the
/// allocator's regions would otherwise become resident 2 MiB at a time.
#[tokio::test]
async fn the_server_runs_without_transparent_huge_pages() {
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    if !own.contains("THP_enabled:") {
        assert!(
            !crate::support::in_ci(),
            "CI=true and this kernel's /proc/PID/status has no THP_enabled line"
        );
        crate::support::skipped("this kernel's /proc/PID/status has no THP_enabled line");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = spawn_server(dir.path(), "server.log", &[("PORT", &port.to_string())]);
    assert!(wait_healthy(port).await, "edgegate never answered /healthz");
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let thp = status
        .lines()
        .find_map(|line| line.strip_prefix("THP_enabled:"))
        .map(str::trim);
    signal(&child, "TERM");
    assert_eq!(wait_exit(&mut child).await.code(), Some(0));
    assert_eq!(thp, Some("0"), "{status}");
}

/// mimalloc is built to commit its arenas as it uses them, not whole at their first use
/// (`.cargo/config.toml`): eagerly committed arenas kept ~3 MiB more resident (BENCHMARKS.md,
/// twenty-second pass). mimalloc prints the options it runs with when `MIMALLOC_VERBOSE` is set;
/// the environment has no `MIMALLOC_ARENA_EAGER_COMMIT`, so what it prints is the build's default.
#[test]
fn the_allocator_commits_its_arenas_lazily_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let out = output(edgegate(dir.path(), &[("MIMALLOC_VERBOSE", "1")]).arg("openapi"));
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let value = stderr
        .lines()
        .find_map(|line| line.split_once("option 'arena_eager_commit':"))
        .map(|(_, value)| value.trim());
    assert_eq!(value, Some("0"), "{stderr}");
}

/// `EDGEGATE_SECRET_KEY` in `.env` is read by `keys report --url` like every other variable, and
/// the real environment still wins over `.env`.
#[tokio::test]
async fn keys_report_reads_its_secret_key_from_dotenv_and_the_environment_wins() {
    let key = "sb_secret_0123456789abcdefghijklmn";
    let server_dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let keys = format!(r#"{{"ops":"{key}"}}"#);
    let vars = [
        ("PORT", port.as_str()),
        ("SUPABASE_SECRET_KEYS", keys.as_str()),
    ];
    let mut child = spawn_server(server_dir.path(), "server.log", &vars);
    assert!(wait_healthy(port.parse().unwrap()).await);

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        format!("EDGEGATE_SECRET_KEY={key}\n"),
    )
    .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let report = |vars: &[(&str, &str)]| {
        output(edgegate(dir.path(), vars).args(["keys", "report", "--url", &url]))
    };
    let out = report(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("Key usage over the last"), "{stdout}");

    let out = report(&[(
        "EDGEGATE_SECRET_KEY",
        "sb_secret_not-the-key-of-this-server",
    )]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the environment's key wins: {stderr}"
    );
    assert!(stderr.contains("UNAUTHORIZED_INVALID_API_KEY"), "{stderr}");
    signal(&child, "TERM");
    assert_eq!(wait_exit(&mut child).await.code(), Some(0));
}

/// A proxy in the environment (`HTTP_PROXY`, `ALL_PROXY`) is not used to reach this machine:
/// the proxy cannot reach the container's loopback, and `keys report --url http://127.0.0.1…`
/// would show it the secret key in plain text.
#[tokio::test]
async fn healthcheck_and_keys_report_reach_loopback_without_the_proxy() {
    let key = "sb_secret_0123456789abcdefghijklmn";
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let keys = format!(r#"{{"ops":"{key}"}}"#);
    let vars = [
        ("PORT", port.as_str()),
        ("SUPABASE_SECRET_KEYS", keys.as_str()),
    ];
    let mut child = spawn_server(dir.path(), "server.log", &vars);
    assert!(wait_healthy(port.parse().unwrap()).await);
    // Accepts nothing: a client that goes through it waits until its own timeout.
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    proxy.set_nonblocking(true).unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    let proxied = [
        ("PORT", port.as_str()),
        ("HTTP_PROXY", proxy_url.as_str()),
        ("HTTPS_PROXY", proxy_url.as_str()),
        ("ALL_PROXY", proxy_url.as_str()),
        ("EDGEGATE_SECRET_KEY", key),
    ];
    let health = output(edgegate(dir.path(), &proxied).arg("healthcheck"));
    let url = format!("http://127.0.0.1:{port}");
    let report = output(edgegate(dir.path(), &proxied).args(["keys", "report", "--url", &url]));
    signal(&child, "TERM");
    assert_eq!(wait_exit(&mut child).await.code(), Some(0));
    assert!(proxy.accept().is_err(), "a loopback call went to the proxy");
    assert_eq!(
        health.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );
    assert_eq!(
        report.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
}

/// `healthcheck` asks whether `/healthz` answers 200: a redirect to a healthy server is not that
/// answer.
#[tokio::test]
async fn healthcheck_follows_no_redirect() {
    use std::io::{Read as _, Write as _};
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let mut child = spawn_server(dir.path(), "server.log", &[("PORT", &port)]);
    assert!(wait_healthy(port.parse().unwrap()).await);
    let redirecting = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/healthz", redirecting.local_addr().unwrap());
    let answer = format!(
        "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{port}/healthz\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let server = std::thread::spawn(move || {
        let (mut stream, _) = redirecting.accept().unwrap();
        let _ = stream.read(&mut [0u8; 4096]);
        stream.write_all(answer.as_bytes()).unwrap();
    });
    let out = output(edgegate(dir.path(), &[]).arg("healthcheck").arg(&url));
    server.join().unwrap();
    signal(&child, "TERM");
    assert_eq!(wait_exit(&mut child).await.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("302"), "{stderr}");
}

/// A variable set to "" in the real environment hides its `.env` value (the environment wins,
/// and blank reads as unset): start-up says so, naming the variable and never the value.
#[test]
fn an_empty_variable_hiding_its_dotenv_value_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        "STRIPE_WEBHOOK_SECRET=whsec_hiddenvalue123\nSMS_MAX_PER_MINUTE=30\n",
    )
    .unwrap();
    let out = output(edgegate(dir.path(), &[("STRIPE_WEBHOOK_SECRET", "")]).arg("migrate"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let warned: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("WARN") && line.contains(".env"))
        .collect();
    assert_eq!(warned.len(), 1, "{stderr}");
    assert!(warned[0].contains("STRIPE_WEBHOOK_SECRET"), "{stderr}");
    assert!(!stderr.contains("hiddenvalue"), "{stderr}");
}

/// A value that is not UTF-8 is malformed, not unset: exit 2 naming the variable, not its value.
#[test]
fn a_variable_that_is_not_utf8_stops_start_up() {
    use std::os::unix::ffi::OsStrExt as _;
    let dir = tempfile::tempdir().unwrap();
    let value = std::ffi::OsStr::from_bytes(b"postgres://app:hunter2\xff@db.internal/app");
    let out = output(
        edgegate(dir.path(), &[])
            .env("DATABASE_URL", value)
            .arg("check"),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("DATABASE_URL") && stderr.contains("UTF-8"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
    assert!(
        !dir.path().join("edgegate.db").exists(),
        "nothing may start"
    );
}

/// `edgegate check` under an open-file limit that `serve` refuses to start under fails the same
/// rule (and leaves the limit alone: it only reports).
#[test]
fn check_fails_a_connection_cap_the_file_limit_cannot_hold() {
    let dir = tempfile::tempdir().unwrap();
    let migrated = output(edgegate(dir.path(), &[]).arg("migrate"));
    assert!(migrated.status.success(), "{migrated:?}");
    let under_limit = |vars: &[(&str, &str)], command: &str| {
        let plain = edgegate(dir.path(), vars);
        // `ulimit -n` in sh sets the soft and the hard limit: serve cannot raise it.
        let mut shell = std::process::Command::new("sh");
        shell
            .args([
                "-c",
                &format!("ulimit -n 1024 && exec \"$0\" {command}"),
                BIN,
            ])
            .env_clear()
            .current_dir(dir.path());
        for (name, value) in plain.get_envs() {
            if let Some(value) = value {
                shell.env(name, value);
            }
        }
        output(&mut shell)
    };
    let vars = [("HTTP_MAX_CONNECTIONS", "1000000"), ("PORT", "0")];
    let served = under_limit(&vars, "serve");
    let stderr = String::from_utf8_lossy(&served.stderr);
    assert_eq!(served.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("HTTP_MAX_CONNECTIONS"), "{stderr}");

    let checked = under_limit(&vars, "check");
    let stdout = String::from_utf8_lossy(&checked.stdout);
    assert_eq!(checked.status.code(), Some(1), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains("HTTP_MAX_CONNECTIONS")),
        "{stdout}"
    );

    let checked = under_limit(&[("HTTP_MAX_CONNECTIONS", "512")], "check");
    let stdout = String::from_utf8_lossy(&checked.stdout);
    assert_eq!(checked.status.code(), Some(0), "{stdout}");
}

/// `check` fails a database that applied one of this binary's migrations from another copy of
/// its file (an edited migration, a build of another branch), naming the version: `migrate` and
/// `serve` refuse it ("was previously applied but has been modified"), and check said `ok`.
/// On PostgreSQL the earlier copies of the two migrations edited after they shipped are not
/// such a difference: `migrate` accepts them.
#[tokio::test]
async fn check_fails_a_database_that_applied_another_copy_of_a_migration() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    db.store().await.close().await;
    let set_checksum = async |version: i64, hex: &str| {
        let sql = "UPDATE _sqlx_migrations SET checksum = {bytes} WHERE version = $1";
        if db.is_postgres() {
            let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
            let sql = sql.replace("{bytes}", &format!("decode('{hex}', 'hex')"));
            let query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(version);
            query.execute(&mut conn).await.unwrap();
        } else {
            let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            let sql = sql.replace("{bytes}", &format!("X'{hex}'"));
            let query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(version);
            query.execute(&mut conn).await.unwrap();
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let vars = [("DATABASE_URL", db.url.as_str())];
    let database_line = |out: &std::process::Output| {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        stdout
            .lines()
            .find(|l| l.contains("database"))
            .unwrap_or_else(|| panic!("{stdout}"))
            .to_owned()
    };

    if db.is_postgres() {
        set_checksum(
            20261206000001,
            "6d7c119528410dbf990ea4298a8fe861a7634ee3cd38cb9f4376bf66\
             beb16b76f4a290d8210f6247fe1516602e9d9551",
        )
        .await;
        let out = output(edgegate(dir.path(), &vars).arg("check"));
        let database = database_line(&out);
        assert_eq!(out.status.code(), Some(0), "{database}");
        assert!(database.starts_with("ok"), "{database}");
        // Taken as this binary's by migrate, saying so (at info).
        let out = output(
            edgegate(dir.path(), &vars)
                .env("RUST_LOG", "info")
                .arg("migrate"),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert!(
            stderr.contains("migration 20261206000001 was applied from an earlier copy"),
            "{stderr}"
        );
    }

    set_checksum(20261206000001, "00").await;
    let out = output(edgegate(dir.path(), &vars).arg("check"));
    let database = database_line(&out);
    assert_eq!(out.status.code(), Some(1), "{database}");
    assert!(
        database.starts_with("FAIL") && database.contains("20261206000001"),
        "{database}"
    );
    assert!(database.contains("refuse"), "{database}");
    let out = output(edgegate(dir.path(), &vars).arg("migrate"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("20261206000001 was previously applied but has been modified"),
        "{stderr}"
    );
}

/// `edgegate check` run as a role made for it (PostgreSQL), granted `grants` (`{role}` names it),
/// and the test's schema and the role dropped after it.
async fn check_as_a_new_role(
    db: &TestDb,
    dir: &std::path::Path,
    grants: &[&str],
) -> std::process::Output {
    let role = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let run = async |admin: &mut sqlx::PgConnection, sql: String| {
        sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .execute(admin)
            .await
            .unwrap_or_else(|err| panic!("{sql}: {err}"));
    };
    run(&mut admin, format!("CREATE ROLE {role} NOLOGIN")).await;
    for grant in grants {
        run(&mut admin, grant.replace("{role}", &role)).await;
    }
    let as_role = db.url.replace(
        "options=-c%20search_path",
        &format!("options=-c%20role%3D{role}%20-c%20search_path"),
    );
    assert_ne!(as_role, db.url, "the role is not in the URL");
    let out = output(edgegate(dir, &[("DATABASE_URL", as_role.as_str())]).arg("check"));
    let drop_schema =
        "DO $$ BEGIN EXECUTE format('DROP SCHEMA %I CASCADE', current_schema()); END $$";
    run(&mut admin, drop_schema.to_owned()).await;
    run(&mut admin, format!("DROP ROLE {role}")).await;
    admin.close().await.unwrap();
    out
}

/// `check` fails the database line with the reason when the applied migrations cannot be read:
/// every error reading them was shown as "0 migrations applied" (serve would migrate it), which
/// only a database never migrated, with no table of migrations, is. Here on PostgreSQL a role
/// that may not read the table ("permission denied", a grant left out), on SQLite a table of
/// migrations that is not sqlx's (no `success` column).
#[tokio::test]
async fn check_fails_with_the_reason_when_the_applied_migrations_cannot_be_read() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    db.store().await.close().await;
    let dir = tempfile::tempdir().unwrap();
    let (out, reason) = if db.is_postgres() {
        // USAGE on the schema, nothing on its tables.
        let usage = "DO $$ BEGIN EXECUTE format('GRANT USAGE ON SCHEMA %I TO {role}', \
                     current_schema()); END $$";
        let out = check_as_a_new_role(&db, dir.path(), &[usage]).await;
        (out, "permission denied for table _sqlx_migrations")
    } else {
        let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
        sqlx::raw_sql(
            "ALTER TABLE _sqlx_migrations RENAME TO sqlx_migrations_kept; \
             CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        conn.close().await.unwrap();
        let out = output(edgegate(dir.path(), &[("DATABASE_URL", db.url.as_str())]).arg("check"));
        (out, "no such column: success")
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let database = database_line(&stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(database.starts_with("FAIL"), "{database}");
    assert!(
        database.contains("reading applied migrations") && database.contains(reason),
        "{database}"
    );
    assert!(!database.contains("0 migrations applied"), "{database}");
}

/// On PostgreSQL a role not granted USAGE on the schema never finds it on its search_path, so
/// its reading of the migrations table fails as for a table not there (42P01): `check` said "0
/// migrations applied" (serve would migrate it), where the reason is the grant left out. It
/// fails the database line with that reason now.
#[tokio::test]
async fn check_fails_with_the_reason_when_the_role_may_not_use_the_schema() {
    let db = crate::postgres_db!();
    db.store().await.close().await;
    let dir = tempfile::tempdir().unwrap();
    // Nothing granted, not even USAGE on the schema.
    let out = check_as_a_new_role(&db, dir.path(), &[]).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let database = database_line(&stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(database.starts_with("FAIL"), "{database}");
    assert!(
        database.contains("reading applied migrations") && database.contains("USAGE"),
        "{database}"
    );
    assert!(!database.contains("0 migrations applied"), "{database}");
}

/// `check` and `keys report` do not create a SQLite file that is not there (a mistyped path):
/// check says serve would, report fails naming it; and check fails a database no migration has
/// prepared.
#[tokio::test]
async fn check_and_report_do_not_create_a_missing_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let vars = [("DATABASE_URL", "sqlite://edgegat.db")];
    let stdout = check_exits(dir.path(), &vars, 0);
    assert!(
        stdout.lines().any(|l| l.starts_with("ok")
            && l.contains("database")
            && l.contains("edgegat.db: not there yet")),
        "{stdout}"
    );
    let out = output(edgegate(dir.path(), &vars).args(["keys", "report"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("edgegat.db"), "{stderr}");
    assert!(
        !dir.path().join("edgegat.db").exists(),
        "a file was left behind"
    );

    // A database no migration has run on: serve would migrate it, check says so and fails. (An
    // empty file is another line: see `restore::an_empty_database_file_is_warned_of_and_failed_by_check`.)
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("edgegat.db").display()
    );
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE t (x BIGINT)")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let stdout = check_exits(dir.path(), &vars, 1);
    let database = database_line(&stdout);
    assert!(
        database.starts_with("FAIL") && database.contains("0 migrations applied"),
        "{stdout}"
    );
    assert!(database.contains("migrate"), "{database}");
}

/// The embedded default on a fresh machine (no DATABASE_URL, no file yet): `check` passes, says
/// that `serve` makes the file, and makes none itself. A new user may well run it first.
#[test]
fn check_on_a_fresh_machine_passes_for_the_default_database_it_does_not_create() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = check_exits(dir.path(), &[], 0);
    let database = database_line(&stdout);
    assert!(
        database.starts_with("ok") && database.contains("serve creates"),
        "{database}"
    );
    assert!(!dir.path().join("edgegate.db").exists(), "a file was made");
}

/// `keys report --url` sends the secret key over plain http to loopback only (exit 2 naming
/// --url otherwise), and keeps the path of a URL behind a prefix.
#[test]
fn keys_report_refuses_plain_http_off_loopback_and_keeps_a_path_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let key = "sb_secret_0123456789abcdefghijklmn";
    let vars = [("EDGEGATE_SECRET_KEY", key)];
    // Not loopback, yet nothing leaves this host were it ever used: 0.0.0.0 connects locally.
    let out =
        output(edgegate(dir.path(), &vars).args(["keys", "report", "--url", "http://0.0.0.0:1"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--url"), "{stderr}");
    assert!(!stderr.contains(key), "{stderr}");

    // Nothing listens there: the error names the endpoint that was asked.
    let port = free_port();
    for url in [
        format!("http://127.0.0.1:{port}/edge"),
        format!("http://127.0.0.1:{port}/edge/"),
    ] {
        let out = output(edgegate(dir.path(), &vars).args(["keys", "report", "--url", &url]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!("127.0.0.1:{port}/edge/admin/signing-keys ")),
            "{url}: {stderr}"
        );
    }
}

/// `keys report --url` follows no redirect: reqwest drops `Authorization` on a redirect to
/// another host but not `apikey`, so the secret key went wherever a 302 pointed (here another
/// port, in plain http). The 302 is reported as it came, naming its target.
#[test]
fn keys_report_follows_no_redirect_with_the_secret_key() {
    use std::io::{Read as _, Write as _};
    use std::net::TcpListener;
    let dir = tempfile::tempdir().unwrap();
    let key = "sb_secret_0123456789abcdefghijklmn";
    let elsewhere = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = format!(
        "http://localhost:{}/stolen",
        elsewhere.local_addr().unwrap().port()
    );
    elsewhere.set_nonblocking(true).unwrap();
    let redirecting = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://127.0.0.1:{}",
        redirecting.local_addr().unwrap().port()
    );
    let answer = format!(
        "HTTP/1.1 302 Found\r\nLocation: {target}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let server = std::thread::spawn(move || {
        let (mut stream, _) = redirecting.accept().unwrap();
        let mut head = [0u8; 4096];
        let _ = stream.read(&mut head);
        stream.write_all(answer.as_bytes()).unwrap();
    });
    let out = output(
        edgegate(dir.path(), &[("EDGEGATE_SECRET_KEY", key)])
            .args(["keys", "report", "--url", &url]),
    );
    server.join().unwrap();
    let mut received = Vec::new();
    if let Ok((mut stream, _)) = elsewhere.accept() {
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let _ = stream.read_to_end(&mut received);
    }
    assert!(
        !String::from_utf8_lossy(&received).contains(key),
        "the secret key was sent to the redirect's target"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("302") && stderr.contains(&target),
        "{stderr}"
    );
    assert!(!stderr.contains(key), "{stderr}");
}

/// A server on 127.0.0.1 that reads one request and sends `answer`, an HTTP/1.1 answer with
/// `status` and a JSON `body`; its URL.
fn answering_once(status: &str, body: &serde_json::Value) -> (String, std::thread::JoinHandle<()>) {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let body = body.to_string();
    let answer = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut head = [0u8; 4096];
        let _ = stream.read(&mut head);
        stream.write_all(answer.as_bytes()).unwrap();
    });
    (url, server)
}

/// What the server answered is printed with its control characters written out, as `check`
/// prints a dependency's answer: the table's cells, the reason and an error's code and message
/// (an escape sequence could write to the clipboard, OSC 52, or move the cursor, and a `\r\n` in
/// the reason printed a verdict line of its own, "Revoking the legacy secret: safe.").
#[test]
fn keys_report_prints_what_the_server_answered_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let key = "sb_secret_0123456789abcdefghijklmn";
    let forged =
        "all good \u{1b}]52;c;ZWNobyBoaQ==\u{7}\u{1b}[2J\r\nRevoking the legacy secret: safe.";
    let report = serde_json::json!({
        "usage_window_seconds": 86_400,
        "legacy_revocation_safe": false,
        "reason": forged,
        "legacy_usage": [{
            "kind": "anon_key", "route": "/x\u{1b}[1A", "client": "\u{1b}[31mred\u{1b}[0m",
            "count": 1, "last_seen": 1_796_117_000_000_i64,
        }],
        "api_key_usage": [],
        "legacy_kinds": [],
        "usage_hourly": {"first_hour_ms": 1_796_112_000_000_i64, "series": [{
            "source": "signing_key", "key": "k\u{1b}[5m", "alg": "ES256\u{202e}", "kind": null,
            "count": 1, "last_seen": 1_796_117_000_000_i64, "hourly": [1],
        }]},
    });
    let refusal = serde_json::json!({"code": "X\u{1b}[31m", "message": forged});
    for (status, body) in [("200 OK", &report), ("401 Unauthorized", &refusal)] {
        let (url, server) = answering_once(status, body);
        let out = output(
            edgegate(dir.path(), &[("EDGEGATE_SECRET_KEY", key)])
                .args(["keys", "report", "--url", &url]),
        );
        server.join().unwrap();
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !printed.contains(['\u{1b}', '\u{7}', '\r', '\u{202e}']),
            "{status}: {printed:?}"
        );
        assert!(
            !printed
                .lines()
                .any(|line| line.starts_with("Revoking the legacy secret: safe")),
            "{status}: {printed}"
        );
        assert!(printed.contains("\\u{1b}]52;c;"), "{status}: {printed}");
    }
}

/// A query on `--url` (a key passed as `?apikey=sb_secret_…`) is not echoed: every message of
/// the command shows the endpoint without it, as `check` shows the JWKS URL (the error repeated
/// it twice, reqwest's own message naming the URL whole).
#[test]
fn keys_report_messages_show_its_url_without_the_query() {
    let dir = tempfile::tempdir().unwrap();
    let vars = [("EDGEGATE_SECRET_KEY", "sb_secret_0123456789abcdefghijklmn")];
    let leaked = "sb_secret_leakme";
    let report = |base: &str| {
        let url = format!("{base}/?apikey={leaked}#{leaked}");
        let out = output(edgegate(dir.path(), &vars).args(["keys", "report", "--url", &url]));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(!stderr.contains("leakme"), "{stderr}");
        assert!(stderr.contains("/admin/signing-keys?…#… "), "{stderr}");
        stderr
    };
    let nobody = report(&format!("http://127.0.0.1:{}", free_port()));
    assert!(nobody.contains("did not answer"), "{nobody}");
    let refusal = serde_json::json!({"code": "UNAUTHORIZED_INVALID_API_KEY", "message": "no"});
    for (status, body, says) in [
        ("401 Unauthorized", refusal, "answered 401"),
        ("302 Found", serde_json::json!({}), "answered 302"),
        (
            "200 OK",
            serde_json::json!([]),
            "did not answer with the report",
        ),
    ] {
        let (base, server) = answering_once(status, &body);
        let stderr = report(&base);
        server.join().unwrap();
        assert!(stderr.contains(says), "{stderr}");
    }
}

/// The secret key of `keys report --url` comes from the environment only: a flag would put it in
/// `ps`, `/proc/*/cmdline` and the shell's history (a hidden `--secret-key` was one).
#[test]
fn keys_report_takes_no_secret_key_flag() {
    let dir = tempfile::tempdir().unwrap();
    let key = "sb_secret_CLIFLAGVALUE0123456789ab";
    let url = format!("http://127.0.0.1:{}", free_port());
    let out = output(edgegate(dir.path(), &[]).args([
        "keys",
        "report",
        "--url",
        &url,
        "--secret-key",
        key,
    ]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--secret-key"), "{stderr}");
    assert!(!stderr.contains(key), "{stderr}");
}

/// A reader that stops early (`| head`) ends the output, not the process with a panic: the
/// command exits as it would have.
#[test]
fn a_closed_stdout_is_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let migrated = output(edgegate(dir.path(), &[]).arg("migrate"));
    assert!(migrated.status.success(), "{migrated:?}");
    for (args, code) in [
        (vec!["openapi"], 0),
        (vec!["check"], 0),
        (vec!["keys", "generate", "--alg", "ES256"], 0),
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = output(edgegate(dir.path(), &[]).args(&args).stdout(writer));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// `sqlite://` with no path (or only parameters after it) opens an anonymous database per
/// connection: the server started, /readyz said ready, and every query answered 500 (`no such
/// table`). It stops start-up as any malformed value does; `sqlite::memory:` still serves.
#[tokio::test]
async fn a_sqlite_url_without_a_path_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    for url in ["sqlite://", "sqlite://?mode=memory", "sqlite:?mode=rwc"] {
        let mut child = spawn_server(
            dir.path(),
            "server.log",
            &[("DATABASE_URL", url), ("PORT", "0")],
        );
        let mut status = None;
        for _ in 0..500 {
            status = child.try_wait().unwrap();
            if status.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
        assert_eq!(status.and_then(|s| s.code()), Some(2), "{url}: {log}");
        assert_eq!(log.trim_end().lines().count(), 1, "{url}: {log}");
        assert!(
            log.contains("DATABASE_URL") && log.contains("sqlite::memory:"),
            "{url}: {log}"
        );
    }

    let secret = "super-secret-jwt-token-with-at-least-32-characters-long";
    let port = free_port();
    let vars = [
        ("DATABASE_URL", "sqlite::memory:"),
        ("PORT", &port.to_string()),
        ("SUPABASE_JWT_SECRET", secret),
    ];
    let mut child = spawn_server(dir.path(), "memory.log", &vars);
    assert!(wait_healthy(port).await, "sqlite::memory: no longer serves");
    let claims = edgegate::auth::mint::api_key_claims(
        "",
        "service_role",
        crate::support::now_ms() / 1000,
        3600,
    );
    let token = edgegate::auth::mint::legacy_token(secret.as_bytes(), &claims, None);
    let keys = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/admin/signing-keys"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(keys.status(), 200, "a query on sqlite::memory: failed");
    signal(&child, "TERM");
    assert_eq!(wait_exit(&mut child).await.code(), Some(0));
}

/// A PostgreSQL that cannot be reached is reported by host and port with the cause: `connection
/// refused` (sqlx's pool said only that it timed out, after 3 s), or the server's own message
/// without the source line of PostgreSQL it comes from. Never the password or the whole URL.
/// `migrate` and `check` fail on a server that does not answer; `serve` waits for it (see
/// `outage::serve_starts_while_postgres_is_down_and_migrates_once_it_answers`) but fails on
/// one that refuses it.
#[test]
fn postgres_connection_failures_name_the_host_and_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let refused = free_port();
    let url = format!("postgres://app:hunter2hunter2@127.0.0.1:{refused}/app");
    let vars = [("DATABASE_URL", url.as_str()), ("PORT", "0")];
    let expected = format!(
        "connecting to PostgreSQL at 127.0.0.1:{refused} (DATABASE_URL): connection refused"
    );
    let out = output(edgegate(dir.path(), &vars).arg("migrate"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
    let stdout = check_exits(dir.path(), &vars, 1);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains(&expected)),
        "{stdout}"
    );
    assert!(!stdout.contains("hunter2"), "{stdout}");

    // A server that refuses the role, as PostgreSQL does: its message carries the line of
    // PostgreSQL's source it comes from, which means nothing to the operator.
    let server = fake_postgres_refusing_the_role();
    let url = format!("postgres://app:hunter2hunter2@{server}/app");
    for command in ["migrate", "serve"] {
        let vars = [("DATABASE_URL", url.as_str()), ("PORT", "0")];
        let out = output(edgegate(dir.path(), &vars).arg(command));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "connecting to PostgreSQL at {server} (DATABASE_URL): role \"app\" does not exist"
            )),
            "{command}: {stderr}"
        );
        assert!(!stderr.contains("at line"), "{command}: {stderr}");
        assert!(!stderr.contains("hunter2"), "{command}: {stderr}");
    }
}

/// A PostgreSQL server that declines TLS and answers every start-up message with the FATAL
/// error PostgreSQL sends for an unknown role, source file and line included.
fn fake_postgres_refusing_the_role() -> std::net::SocketAddr {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            loop {
                let mut length = [0u8; 4];
                if stream.read_exact(&mut length).is_err() {
                    break;
                }
                let mut body = vec![0u8; (u32::from_be_bytes(length) as usize).saturating_sub(4)];
                if stream.read_exact(&mut body).is_err() {
                    break;
                }
                // SSLRequest and GSSENCRequest: declined with one byte.
                if matches!(body.get(..4), Some([4, 210, 22, 47] | [4, 210, 22, 48])) {
                    let _ = stream.write_all(b"N");
                    continue;
                }
                let mut fields = Vec::new();
                for (kind, value) in [
                    (b'S', "FATAL"),
                    (b'V', "FATAL"),
                    (b'C', "28000"),
                    (b'M', "role \"app\" does not exist"),
                    (b'F', "miscinit.c"),
                    (b'L', "768"),
                    (b'R', "InitializeSessionUserId"),
                ] {
                    fields.push(kind);
                    fields.extend_from_slice(value.as_bytes());
                    fields.push(0);
                }
                fields.push(0);
                let mut message = vec![b'E'];
                message.extend_from_slice(&(fields.len() as u32 + 4).to_be_bytes());
                message.extend_from_slice(&fields);
                let _ = stream.write_all(&message);
                break;
            }
        }
    });
    address
}

/// `check` on a SQLite file that is not there gives the verdict `serve` would reach: ok when
/// the file's directory exists (serve creates the file), FAIL naming the directory when it does
/// not (serve stops there, SQLite's "unable to open database file").
#[test]
fn check_passes_a_missing_sqlite_file_only_where_serve_can_create_it() {
    let dir = tempfile::tempdir().unwrap();
    let vars = [("DATABASE_URL", "sqlite://data/edgegate.db")];
    let stdout = check_exits(dir.path(), &vars, 1);
    let database = database_line(&stdout);
    assert!(
        database.starts_with("FAIL") && database.contains("directory data does not exist"),
        "{database}"
    );
    let served = output(edgegate(dir.path(), &vars).args(["serve"]).env("PORT", "0"));
    assert_eq!(served.status.code(), Some(1), "serve fails there too");

    std::fs::create_dir(dir.path().join("data")).unwrap();
    let stdout = check_exits(dir.path(), &vars, 0);
    let database = database_line(&stdout);
    assert!(
        database.starts_with("ok")
            && database.contains("data/edgegate.db")
            && database.contains("not there yet; serve creates it"),
        "{database}"
    );
    assert!(
        !dir.path().join("data/edgegate.db").exists(),
        "check made the file"
    );
}

/// `migrate` and `serve` on a SQLite file whose directory is missing explain it as `check` does
/// (they said "(code: 14) unable to open database file").
#[test]
fn migrate_and_serve_explain_a_missing_sqlite_directory() {
    let dir = tempfile::tempdir().unwrap();
    let vars = [("DATABASE_URL", "sqlite://data/edgegate.db"), ("PORT", "0")];
    for command in ["migrate", "serve"] {
        let out = output(edgegate(dir.path(), &vars).arg(command));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command}: {stderr}");
        assert!(
            stderr.contains("its directory data does not exist")
                && stderr.contains("create the directory first"),
            "{command}: {stderr}"
        );
    }
}

/// `check` has a Stripe line when Stripe is not configured, as it has a Twilio line: the
/// endpoints that answer 503 are named.
#[test]
fn check_says_when_stripe_is_not_configured() {
    let dir = tempfile::tempdir().unwrap();
    let stripe_line = |vars: &[(&str, &str)]| {
        let out = output(edgegate(dir.path(), vars).arg("check"));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(out.status.code(), Some(0), "{stdout}");
        stdout
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some("stripe"))
            .unwrap_or_else(|| panic!("no stripe line: {stdout}"))
            .to_owned()
    };
    let line = stripe_line(&[]);
    assert!(
        line.starts_with("ok")
            && line.contains("not configured")
            && line.contains("stripe-webhook"),
        "{line}"
    );
    let line = stripe_line(&[("STRIPE_WEBHOOK_SECRET", "whsec_0123456789abcdef")]);
    assert!(
        line.starts_with("ok")
            && line.contains("STRIPE_SECRET_KEY is not set")
            && line.contains("sync-stripe-products-hardened")
            && !line.contains("whsec_"),
        "{line}"
    );
}

/// `keys report --window` out of bounds states the bounds of the window (1 second to 30d), not
/// those of `token mint --ttl`.
#[test]
fn keys_report_window_errors_state_the_window_bounds() {
    let dir = tempfile::tempdir().unwrap();
    for window in ["0", "31d"] {
        let out = output(edgegate(dir.path(), &[]).args(["keys", "report", "--window", window]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{window}: {stderr}");
        assert!(
            stderr.contains("must be between 1 second and 30 days (30d)"),
            "{window}: {stderr}"
        );
        assert!(!stderr.contains("10 years"), "{window}: {stderr}");
    }
}

/// `migrate` says how many of the applied migrations it applied itself: a second run applies
/// none, and said the same as the first.
#[test]
fn migrate_says_how_many_migrations_were_new() {
    let dir = tempfile::tempdir().unwrap();
    let shipped = edgegate::store::shipped_migrations()[0].1.len();
    let first = output(edgegate(dir.path(), &[]).arg("migrate"));
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(first.status.success(), "{first:?}");
    assert!(
        stdout.contains(&format!("{shipped} migrations applied, {shipped} new")),
        "{stdout}"
    );
    let again = output(edgegate(dir.path(), &[]).arg("migrate"));
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success(), "{again:?}");
    assert!(
        stdout.contains(&format!("{shipped} migrations applied, 0 new")),
        "{stdout}"
    );
}

/// Migrations run at once by several processes (three releases, a release and a start-up) are
/// each counted by the one that applied them: every run counted the versions missing before it
/// waited for the migration lock, so each of three said all of them were new.
#[tokio::test]
async fn concurrent_migrate_runs_count_each_new_migration_once() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let shipped = edgegate::store::shipped_migrations()[0].1.len();
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let url = db.url.clone();
            std::thread::spawn(move || {
                let dir = tempfile::tempdir().unwrap();
                output(edgegate(dir.path(), &[("DATABASE_URL", url.as_str())]).arg("migrate"))
            })
        })
        .collect();
    let mut new = 0;
    for run in runs {
        let out = run.join().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{out:?}");
        let count = stdout
            .split(" new")
            .next()
            .and_then(|head| head.rsplit(' ').next())
            .and_then(|count| count.parse::<usize>().ok())
            .unwrap_or_else(|| panic!("{stdout}"));
        new += count;
    }
    assert_eq!(new, shipped, "new migrations counted over the three runs");
}

/// `token mint --jwk` given the public half of `keys generate` (its line 2) says that it is a
/// public key and where the private one is, not that `key_ops` lacks `sign`.
#[test]
fn token_mint_with_a_public_jwk_points_to_the_private_one() {
    let dir = tempfile::tempdir().unwrap();
    for alg in ["ES256", "RS256", "EdDSA"] {
        let generated = output(edgegate(dir.path(), &[]).args(["keys", "generate", "--alg", alg]));
        assert!(generated.status.success(), "{generated:?}");
        let stdout = String::from_utf8(generated.stdout).unwrap();
        let public = stdout.lines().nth(1).unwrap();
        std::fs::write(dir.path().join("pub.json"), public).unwrap();
        let out = output(edgegate(dir.path(), &[]).args([
            "token",
            "mint",
            "--role",
            "authenticated",
            "--jwk",
            "pub.json",
        ]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{alg}: {stderr}");
        assert!(
            stderr.contains("pub.json")
                && stderr.contains("a public key")
                && stderr.contains("line 1 of `edgegate keys generate`"),
            "{alg}: {stderr}"
        );
    }
}

/// A `.env` line that does not parse is given by its number, and its text is never shown.
#[test]
fn a_dotenv_line_that_does_not_parse_is_given_by_its_number() {
    for (text, number, name) in [
        ("# settings\nPORT=8080\nsecret words sk_live_abc\n", 3, None),
        (
            "PORT=8080\n\nSTRIPE_SECRET_KEY=sk_live_abc\\qsecret\n",
            3,
            Some("STRIPE_SECRET_KEY"),
        ),
        (
            "PORT=8080\nSUPABASE_JWT_SECRET=\"secret-that-never-ends\nHOST=::1\n",
            2,
            Some("SUPABASE_JWT_SECRET"),
        ),
    ] {
        let stderr = refused_dotenv(text);
        assert!(
            stderr.contains(".env") && stderr.contains(&format!("line {number}")),
            "{text:?}: {stderr}"
        );
        if let Some(name) = name {
            assert!(stderr.contains(name), "{text:?}: {stderr}");
        }
        assert!(!stderr.contains("secret"), "{stderr}");
    }
}

/// A `$` in `.env` that dotenvy would read otherwise than a shell's `source` stops start-up,
/// naming the line and the form both read alike, never the value: with DB_PASSWORD=s3cret,
/// dotenvy read `p:$DB_PASSWORD@h` as `p:_PASSWORD@h` (it ends a bare name at `_`) and
/// refused `"x$MYVAR"` with no reason (it took the closing quote after a bare name as text).
#[test]
fn a_dotenv_substitution_a_shell_reads_otherwise_is_refused() {
    let vars = [("DB_PASSWORD", "s3cret"), ("MYVAR", "v")];
    for (text, line, fix) in [
        (
            "PORT=8080\nDATABASE_URL=postgres://app:$DB_PASSWORD@db/app\n",
            "line 2, the line of DATABASE_URL,",
            "write ${DB_PASSWORD}",
        ),
        (
            "JWT_ISSUERS=\"x$MYVAR\"\n",
            "line 1, the line of JWT_ISSUERS,",
            "write ${MYVAR}",
        ),
        (
            "JWT_ISSUERS=a$/b\n",
            "line 1, the line of JWT_ISSUERS,",
            "\\$",
        ),
        (
            "JWT_ISSUERS=${MYVAR:-x}\n",
            "line 1, the line of JWT_ISSUERS,",
            "${NAME}",
        ),
    ] {
        let stderr = refused_dotenv_with(text, &vars);
        assert!(
            stderr.contains(".env") && stderr.contains(line) && stderr.contains(fix),
            "{text:?}: {stderr}"
        );
        assert!(!stderr.contains("s3cret"), "{stderr}");
    }
    // A name that is not set may be a fragment of a secret holding `$`: it is not shown.
    let stderr = refused_dotenv("SUPABASE_JWT_SECRET=abc$de_fgh0123456789abcdef0123456789\n");
    assert!(stderr.contains("line 1"), "{stderr}");
    assert!(!stderr.contains("de_fgh"), "{stderr}");

    // Read alike by both: blanks and a comment after a bare name (dotenvy drops them before it
    // reads the value). Not edgegate's concern: a line of a variable it does not read (a `.env`
    // shared with docker compose), or one the environment sets (the environment wins).
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        "JWT_ISSUERS=$MYVAR # the issuer\nJWT_AUDIENCES=$MYVAR \n\
         POSTGRES_PASSWORD=${PG_PASS:-x}\nLOG_FORMAT=${MYVAR:-json}\n",
    )
    .unwrap();
    let vars = [("MYVAR", "v"), ("LOG_FORMAT", "json")];
    let out = output(edgegate(dir.path(), &vars).arg("check"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(!stderr.contains(".env"), "{stderr}");
}

/// `edgegate check` in a folder whose `.env` holds `text`, which it refuses: its one line of
/// stderr (the exit code is 2, a configuration error, and the message one line).
fn refused_dotenv(text: &str) -> String {
    refused_dotenv_with(text, &[])
}

/// As [`refused_dotenv`], with `vars` in the environment.
fn refused_dotenv_with(text: &str, vars: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".env"), text).unwrap();
    let out = output(edgegate(dir.path(), vars).arg("check"));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    stderr
}

/// A variable set twice in `.env` stops start-up naming it and both lines: edgegate took the
/// first value, where a shell's `source`, docker compose and node's dotenv take the last.
#[test]
fn a_variable_set_twice_in_dotenv_is_refused_naming_both_lines() {
    let text = "# settings\nPORT=8080\nNOTE=\"two\nPORT=lines\"\n\nexport PORT=9090\n";
    let stderr = refused_dotenv(text);
    assert!(
        stderr.contains(".env")
            && stderr.contains("PORT")
            && stderr.contains("lines 2 and 6")
            && !stderr.contains("9090"),
        "{stderr}"
    );
}

/// The text before `=` on a line that does not parse is named only when it is a variable
/// edgegate reads: a pasted secret's fragment was printed as "the line of <fragment>".
#[test]
fn a_dotenv_line_that_does_not_parse_names_only_a_variable_edgegate_reads() {
    let fragment = "c2VjcmV0c2VjcmV0U1VQRVJTRUNSRVQ";
    let stderr = refused_dotenv(&format!("PORT=8080\n{fragment}==\"bad\n"));
    assert!(stderr.contains("line 2"), "{stderr}");
    assert!(!stderr.contains(fragment), "{stderr}");
}

/// A pasted secret on a line of its own, `…==` (a name and an empty value to dotenvy), twice:
/// the refusal names the two lines, not the "name" (it printed `sets c2VjcmV0… twice`).
#[test]
fn a_repeated_dotenv_name_is_named_only_when_edgegate_reads_it() {
    let fragment = "c2VjcmV0c2VjcmV0U1VQRVJTRUNSRVQ";
    let stderr = refused_dotenv(&format!("{fragment}==\nPORT=8080\n{fragment}==\n"));
    assert!(stderr.contains("lines 1 and 3"), "{stderr}");
    assert!(!stderr.contains(fragment), "{stderr}");
}

/// Stripe and Twilio each get their own client: a Stripe fake on this machine (no proxy for
/// it) does not send Twilio's calls around the operator's `HTTPS_PROXY`, which may be the only
/// way out of the Machine.
#[tokio::test]
async fn a_loopback_stripe_base_does_not_take_the_proxy_away_from_twilio() {
    use std::io::{BufRead as _, Write as _};
    let key = "sb_secret_0123456789abcdefghijklmn";
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let keys = format!(r#"{{"ops":"{key}"}}"#);
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    // Takes one connection, reads its first line and refuses it.
    let seen = std::thread::spawn(move || {
        proxy.set_nonblocking(true).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut stream = loop {
            match proxy.accept() {
                Ok((stream, _)) => break stream,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(_) => return None,
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(stream.try_clone().unwrap())
            .read_line(&mut line)
            .ok()?;
        let _ = stream.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n");
        Some(line)
    });
    let vars = [
        ("PORT", port.as_str()),
        ("SUPABASE_SECRET_KEYS", keys.as_str()),
        ("STRIPE_SECRET_KEY", "sk_test_proxy"),
        ("STRIPE_API_BASE", "http://127.0.0.1:9/"),
        ("TWILIO_ACCOUNT_SID", "ACaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
        ("TWILIO_AUTH_TOKEN", "proxytoken"),
        ("TWILIO_FROM_NUMBER", "+15005550006"),
        ("TWILIO_API_BASE", "https://api.twilio.invalid"),
        ("HTTPS_PROXY", proxy_url.as_str()),
    ];
    let mut child = spawn_server(dir.path(), "server.log", &vars);
    assert!(wait_healthy(port.parse().unwrap()).await);
    let answer = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/functions/v1/send-sms"))
        .header("apikey", key)
        .json(&serde_json::json!({"to": "+12025550123", "body": "hello"}))
        .send()
        .await
        .unwrap();
    let status = answer.status();
    signal(&child, "TERM");
    assert_eq!(wait_exit(&mut child).await.code(), Some(0));
    let line = seen.join().unwrap();
    assert_eq!(
        line.as_deref().map(str::trim_end),
        Some("CONNECT api.twilio.invalid:443 HTTP/1.1"),
        "Twilio's call did not go through the proxy (send-sms answered {status})"
    );
}

/// Whether the server on `port` comes to hold `bytes` bytes of request bodies being read (its
/// metric), within about 5 s: the requests that sent them are then in flight.
async fn bodies_buffered(port: u16, bytes: usize) -> bool {
    let buffered = format!("edgegate_http_request_body_bytes_buffered {bytes}\n");
    for _ in 0..250 {
        let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metrics.contains(&buffered) {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    false
}

/// A second SIGINT or SIGTERM during the drain stops the process at once, the requests still in
/// flight cut, and says so: exit 1, as the drain was not let run (it was ignored, and the
/// process waited out the whole 20 s drain for a request whose body never came).
#[tokio::test]
async fn a_second_signal_during_the_drain_stops_at_once_with_exit_1() {
    use tokio::io::AsyncWriteExt;

    let secret = "super-secret-jwt-token-with-at-least-32-characters-long";
    let db = TestDb::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let vars = [
        ("PORT", port.to_string()),
        ("DATABASE_URL", db.url.clone()),
        ("SUPABASE_JWT_SECRET", secret.to_owned()),
        ("RUST_LOG", "info".to_owned()),
        ("LOG_FORMAT", "json".to_owned()),
        ("STRIPE_WEBHOOK_SECRET", "whsec_drain".to_owned()),
        ("SHUTDOWN_DRAIN_SECONDS", "20".to_owned()),
    ];
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut child = spawn_server(dir.path(), "server.log", &vars);
    assert!(wait_healthy(port).await, "edgegate never answered /healthz");
    // A legacy token's use, counted in memory until the next flush: the evidence a cut drain
    // must still write.
    use_legacy_secret(port, secret).await;
    // A webhook whose body never ends: in flight until the route's 30 s, past the drain.
    let now = crate::support::now_ms() / 1000;
    let mut held = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let head = format!(
        "POST /functions/v1/stripe-webhook HTTP/1.1\r\nHost: edgegate\r\n\
         stripe-signature: t={now},v1={}\r\ncontent-length: 100\r\n\r\n{{",
        "ab".repeat(32)
    );
    held.write_all(head.as_bytes()).await.unwrap();
    let log = dir.path().join("server.log");
    let logged = |text: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(text)
    };
    // The request is in flight once its handler reads the body (the metric says 1 byte).
    assert!(
        bodies_buffered(port, 1).await,
        "the webhook's body is being read"
    );

    signal(&child, "INT");
    let mut draining = false;
    for _ in 0..250 {
        if logged("draining") {
            draining = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(draining, "the drain started");
    signal(&child, "TERM");
    let status = wait_exit(&mut child).await;
    assert_eq!(status.code(), Some(1));
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("SIGTERM received again"), "{log}");
    assert!(log.contains("drain cut short"), "{log}");
    // The process's own last line, after the log's.
    assert!(
        log.trim_end()
            .ends_with("edgegate: the drain was cut short: 1 request still in flight was dropped"),
        "{log}"
    );
    drop(held);
    let usage = db.store().await.key_usage_since(0).await.unwrap();
    assert!(
        usage
            .iter()
            .any(|row| row.source == "legacy_secret" && row.verified_count == 1),
        "the legacy use was not written: {usage:?}"
    );
}

/// `serve --no-migrate` on a database behind the binary's migrations says so at start-up, and
/// `/readyz` answers 503 with the reason (it answered 200 while every route that needs the
/// database failed with 500 "no such table") until a `migrate` run by another process catches
/// it up; then it is ready without a restart.
#[tokio::test]
async fn serve_without_migrating_is_not_ready_until_another_process_migrates() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let vars = [("DATABASE_URL", db.url.as_str()), ("PORT", port.as_str())];
    let mut command = edgegate(dir.path(), &vars);
    command.args(["serve", "--no-migrate"]);
    let _server = crate::process::spawn_logged(command, dir.path(), "server.log");
    assert!(wait_healthy(port.parse().unwrap()).await);
    let shipped = edgegate::store::shipped_migrations()[0].1.len();
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(
        log.lines().any(|line| line.contains("ERROR")
            && line.contains(&format!("{shipped} of"))
            && line.contains("edgegate migrate")),
        "{log}"
    );
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    let ready = reqwest::get(&readyz).await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    let database = &body["checks"]["database"];
    assert_eq!(database["ok"], false, "{body}");
    assert!(
        database["error"]
            .as_str()
            .is_some_and(|error| error.contains("migrat")),
        "{body}"
    );

    let out = output(edgegate(dir.path(), &vars).arg("migrate"));
    assert!(out.status.success(), "{out:?}");
    let mut status = 0;
    for _ in 0..150 {
        status = reqwest::get(&readyz).await.unwrap().status().as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "never ready within 15 s of the migration");
}

/// `serve --no-migrate` on a database not migrated yet leaves it alone in the background too:
/// the SMS sweep, the SMS status recovery and the periodic Stripe reconciliation wait for the
/// schema, rather than warning every minute of a table that does not exist (the error at
/// start-up has said what is missing and what to run).
#[tokio::test]
async fn serve_without_migrating_runs_no_background_work_on_a_schema_not_there() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let vars = [
        ("DATABASE_URL", db.url.as_str()),
        ("PORT", port.as_str()),
        ("TWILIO_ACCOUNT_SID", "AC0123456789abcdef0123456789abcdef"),
        ("TWILIO_AUTH_TOKEN", "f1e2d3c4b5a6978812345678abcdef90"),
        ("TWILIO_FROM_NUMBER", "+15005550006"),
        // Never reached: nothing may run on this schema.
        ("TWILIO_API_BASE", "http://127.0.0.1:9/"),
        ("STRIPE_SECRET_KEY", "sk_test_background0123456789"),
        ("STRIPE_API_BASE", "http://127.0.0.1:9/"),
        // The shortest: the first run comes within 6 s of start.
        ("STRIPE_RECONCILE_INTERVAL_SECONDS", "60"),
    ];
    let mut command = edgegate(dir.path(), &vars);
    command.args(["serve", "--no-migrate"]);
    let _server = crate::process::spawn_logged(command, dir.path(), "server.log");
    assert!(wait_healthy(port.parse().unwrap()).await);
    tokio::time::sleep(std::time::Duration::from_secs(7)).await;
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    let lacking = |line: &&str| line.contains("does not exist") || line.contains("no such table");
    let noise: Vec<&str> = log.lines().filter(lacking).collect();
    assert!(noise.is_empty(), "{noise:#?}");
}

/// A database ahead of the binary (a release rolled back after its migration) is served ready:
/// `migrate` tolerates it on purpose, and so does `serve --no-migrate`.
#[tokio::test]
async fn serve_without_migrating_is_ready_on_a_database_ahead_of_the_binary() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    db.store().await.close().await;
    let later = "INSERT INTO _sqlx_migrations (version, description, success, checksum, \
                 execution_time) VALUES (99990101000000, 'a later release', TRUE, {bytes}, 0)";
    if db.is_postgres() {
        let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
        let sql = later.replace("{bytes}", "decode('00', 'hex')");
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
            .unwrap();
    } else {
        let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
        let sql = later.replace("{bytes}", "X'00'");
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let vars = [("DATABASE_URL", db.url.as_str()), ("PORT", port.as_str())];
    let mut command = edgegate(dir.path(), &vars);
    command.args(["serve", "--no-migrate"]);
    let _server = crate::process::spawn_logged(command, dir.path(), "server.log");
    assert!(wait_healthy(port.parse().unwrap()).await);
    let ready = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
}

/// `serve` that waits for another process's migrations (sqlx's migration lock held, as by an
/// `edgegate migrate` on another Machine) says so within seconds, rather than nothing for the
/// whole wait, and serves once the lock is let go. On a database of its own: the lock is per
/// database, and the tests beside it migrate theirs.
#[tokio::test]
async fn serve_says_it_waits_for_another_process_s_migrations() {
    use futures_util::FutureExt as _;
    let Some(db) = TestDb::postgres_database().await else {
        crate::support::skipped("PostgreSQL only (TEST_POSTGRES_URL)");
        return;
    };
    let outcome = std::panic::AssertUnwindSafe(wait_behind_the_migration_lock(&db))
        .catch_unwind()
        .await;
    db.drop_database().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn wait_behind_the_migration_lock(db: &TestDb) {
    use sqlx::migrate::Migrate as _;
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    holder.lock().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    says_it_waits_then_serves(dir.path(), &db.url, async move {
        holder.unlock().await.unwrap();
        holder.close().await.unwrap();
    })
    .await;
}

/// The same on SQLite, whose migration lock is a file beside the database's: the wait was
/// silent there (nothing logged, /healthz not answering), so an operator whose container's
/// health check failed had no line to tell why.
#[tokio::test]
async fn serve_says_it_waits_for_another_process_s_sqlite_migrations() {
    // Set up first: on a file not there yet, the lock is waited for before the file is made
    // (and that wait is not the migration's).
    let (dir, lock) = held_migration_lock(true);
    says_it_waits_then_serves(dir.path(), "sqlite://held.db", async move { drop(lock) }).await;
}

/// `serve` on `database_url` in `dir` says within 5 s that it waits for another process's
/// migrations; once `release` lets the lock go, it serves.
async fn says_it_waits_then_serves(
    dir: &std::path::Path,
    database_url: &str,
    release: impl std::future::Future<Output = ()>,
) {
    let port = free_port();
    let port_text = port.to_string();
    let vars = [("DATABASE_URL", database_url), ("PORT", port_text.as_str())];
    let mut command = edgegate(dir, &vars);
    command.arg("serve");
    let _server = crate::process::spawn_logged(command, dir, "server.log");
    let said = async {
        loop {
            let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            if log.contains("waiting for another process's migrations") {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    let waited = tokio::time::timeout(std::time::Duration::from_secs(5), said).await;
    let log = std::fs::read_to_string(dir.join("server.log")).unwrap();
    assert!(
        waited.is_ok(),
        "nothing said of the wait within 5 s: {log:?}"
    );
    release.await;
    assert!(
        wait_healthy(port).await,
        "not serving once the lock was let go"
    );
}

/// No CA certificates to load (`SSL_CERT_FILE` naming no file and `SSL_CERT_DIR` an empty
/// folder, as in an image without ca-certificates): `serve` still starts and says why its HTTPS
/// requests will fail, `check` says so as a failed line, and `healthcheck` still probes over
/// HTTP. Each built its HTTP clients with a fallback (`reqwest::Client::new()`) that panics on the
/// very error that made the first build fail: `serve` and `check` ended with exit code 101.
#[tokio::test]
async fn without_ca_certificates_serve_starts_and_says_why_https_will_fail() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("no-certs");
    std::fs::create_dir(&empty).unwrap();
    let missing = dir.path().join("missing.pem");
    let (missing, empty) = (missing.to_str().unwrap(), empty.to_str().unwrap());
    let no_roots = [("SSL_CERT_FILE", missing), ("SSL_CERT_DIR", empty)];
    let port = free_port();
    let port_text = port.to_string();
    let mut vars = no_roots.to_vec();
    vars.push(("PORT", &port_text));
    let mut child = spawn_server(dir.path(), "server.log", &vars);
    let healthy = wait_healthy(port).await;
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(healthy, "edgegate never answered /healthz: {log}");
    assert!(log.contains("CA certificates"), "{log}");

    let probe = output(
        edgegate(dir.path(), &no_roots).args(["healthcheck", &format!("http://127.0.0.1:{port}")]),
    );
    assert_eq!(probe.status.code(), Some(0), "{probe:?}");

    signal(&child, "TERM");
    assert_eq!(wait_exit(&mut child).await.code(), Some(0));

    // A failed line where something configured is called over HTTPS (here a JWKS on a port
    // where nothing listens, which fails too); a remark where nothing is.
    let check = output(edgegate(dir.path(), &no_roots).arg("check"));
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(0), "{check:?}");
    assert!(stdout.contains("nothing configured makes one"), "{stdout}");
    let mut vars = no_roots.to_vec();
    vars.push(("SUPABASE_URL", "https://127.0.0.1:9"));
    let check = output(edgegate(dir.path(), &vars).arg("check"));
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{check:?}");
    let roots = stdout.lines().find(|line| line.contains("tls roots"));
    assert!(
        roots.is_some_and(|line| line.starts_with("FAIL") && line.contains("CA certificates")),
        "{stdout}"
    );
}

/// A SQLite file to be made in a directory edgegate cannot write to (here a read-only
/// filesystem; in the image a volume owned by another user, or `--read-only`): `check` fails its
/// database line and `serve` stops, both naming the directory and why. `check` said `ok … not
/// there yet; serve creates it`, and serve stopped with SQLite's "(code: 14) unable to open
/// database file", naming neither.
#[tokio::test]
async fn a_database_directory_that_cannot_be_written_is_named_by_check_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    let Some(mount) = crate::outage::Tmpfs::mount(&ro, "size=1m,ro") else {
        return;
    };
    let url = format!("sqlite://{}/edgegate.db", ro.display());
    let vars = [("DATABASE_URL", url.as_str())];
    let check = output(edgegate(dir.path(), &vars).arg("check"));
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{check:?}");
    let line = stdout.lines().find(|line| line.contains("database"));
    assert!(
        line.is_some_and(|line| line.starts_with("FAIL")
            && line.contains(&format!("{} cannot be written to", ro.display()))
            && line.contains("Read-only file system")),
        "{stdout}"
    );
    let port = free_port().to_string();
    let serve = output(edgegate(dir.path(), &[vars[0], ("PORT", &port)]).arg("serve"));
    let stderr = String::from_utf8_lossy(&serve.stderr);
    assert_eq!(serve.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot be written to"), "{stderr}");
    drop(mount);
}

/// A file-size limit (`ulimit -f`, RLIMIT_FSIZE) reached fails the write, which edgegate reports,
/// instead of ending the process: SIGXFSZ's default action killed it with no word (exit status
/// 153, the SQLite -wal file grown past the limit under load).
#[tokio::test]
async fn a_file_size_limit_reached_fails_the_write_instead_of_killing_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = std::process::Command::new("prlimit");
    command
        .arg("--fsize=32768")
        .arg(BIN)
        .arg("migrate")
        .env_clear()
        .current_dir(dir.path())
        .env("DATABASE_URL", "sqlite://edgegate.db");
    let Ok(migrated) = command.output() else {
        assert!(!crate::support::in_ci(), "CI=true and prlimit cannot run");
        crate::support::skipped("prlimit (util-linux) is not installed");
        return;
    };
    let stderr = String::from_utf8_lossy(&migrated.stderr);
    assert_eq!(migrated.status.code(), Some(1), "{migrated:?}");
    assert!(stderr.contains("migration failed"), "{stderr}");
}

/// edgegate serving with `SHUTDOWN_DRAIN_SECONDS=drain`, and `held` Stripe webhooks in flight on
/// it: each sent its head and the first byte of a 100-byte body, which its handler is reading
/// (until the route's 30 s). The connections, to finish the bodies or leave them.
async fn serve_with_webhooks_in_flight(
    dir: &std::path::Path,
    drain: &str,
    held: usize,
) -> (crate::process::Server, u16, Vec<tokio::net::TcpStream>) {
    use tokio::io::AsyncWriteExt;

    let port = free_port();
    let port_text = port.to_string();
    let vars = [
        ("PORT", port_text.as_str()),
        ("RUST_LOG", "info"),
        ("STRIPE_WEBHOOK_SECRET", "whsec_drain"),
        ("SHUTDOWN_DRAIN_SECONDS", drain),
    ];
    let child = spawn_server(dir, "server.log", &vars);
    assert!(wait_healthy(port).await, "edgegate never answered /healthz");
    let now = crate::support::now_ms() / 1000;
    let head = format!(
        "POST /functions/v1/stripe-webhook HTTP/1.1\r\nHost: edgegate\r\n\
         stripe-signature: t={now},v1={}\r\ncontent-length: 100\r\n\r\n{{",
        "ab".repeat(32)
    );
    let mut connections = Vec::new();
    for _ in 0..held {
        let mut connection = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        connection.write_all(head.as_bytes()).await.unwrap();
        connections.push(connection);
    }
    // In flight once their handlers read the bodies (the metric counts a byte each).
    assert!(
        bodies_buffered(port, held).await,
        "the webhooks' bodies are being read"
    );
    (child, port, connections)
}

/// A drain whose time ran out with requests still in flight is no clean stop: they were
/// dropped, their clients answered nothing. Exit 1, the last line saying how many, and no
/// `edgegate stopped` (which says a clean stop). It exited 0 after `edgegate stopped`, as a
/// stop that finished everything.
#[tokio::test]
async fn a_drain_that_runs_out_with_requests_in_flight_exits_1_saying_how_many() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, _port, held) = serve_with_webhooks_in_flight(dir.path(), "1", 2).await;

    signal(&child, "TERM");
    let status = wait_exit(&mut child).await;
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("drain period over"), "{log}");
    assert!(!log.contains("edgegate stopped"), "{log}");
    // The process's own last line, after the log's.
    assert!(
        log.trim_end().ends_with(
            "edgegate: the drain's 1 s ran out: 2 requests still in flight were dropped"
        ),
        "{log}"
    );
    drop(held);
}

/// A drain in which every request finished is a clean stop, exit 0, though a request was in
/// flight at the signal.
#[tokio::test]
async fn a_drain_in_which_every_request_finishes_exits_0() {
    use tokio::io::AsyncWriteExt;

    let dir = tempfile::tempdir().unwrap();
    let (mut child, _port, mut held) = serve_with_webhooks_in_flight(dir.path(), "20", 1).await;

    signal(&child, "TERM");
    let log = dir.path().join("server.log");
    let mut draining = false;
    for _ in 0..250 {
        if std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("draining")
        {
            draining = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(draining, "the drain started");
    // The rest of the body: the webhook is answered (its signature does not verify).
    held[0].write_all(&[b' '; 99]).await.unwrap();
    let status = wait_exit(&mut child).await;
    let log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("edgegate stopped"), "{log}");
    assert!(!log.contains("drain period over"), "{log}");
}
