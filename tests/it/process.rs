//! Running the `edgegate` binary as an operator would: a clean environment, signals, exit codes.

use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_edgegate");

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The binary with a clean environment (nothing of the developer's leaks in) plus `vars`.
pub fn edgegate(dir: &std::path::Path, vars: &[(&str, &str)]) -> Command {
    let mut command = Command::new(BIN);
    command
        .env_clear()
        .current_dir(dir)
        .env("HOST", "127.0.0.1")
        .env("RUST_LOG", "warn")
        // No periodic reconciliation unless a test sets it: see `TestDb::config`.
        .env("STRIPE_RECONCILE_INTERVAL_SECONDS", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in vars {
        command.env(name, value);
    }
    command
}

pub fn output(command: &mut Command) -> Output {
    command.output().expect("run edgegate")
}

pub async fn wait_healthy(port: u16) -> bool {
    let client = reqwest::Client::new();
    for _ in 0..300 {
        let url = format!("http://127.0.0.1:{port}/healthz");
        if let Ok(response) = client.get(url).send().await
            && response.status() == 200
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

pub fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

pub async fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    for _ in 0..500 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    panic!("edgegate did not exit within 10 s of the signal");
}

/// A server process that is killed if the test ends (or panics) while it still runs.
pub struct Server(Child);

impl std::ops::Deref for Server {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Server {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Server {
    /// Owns a process started some other way (its stderr, say, piped).
    pub fn from_child(child: Child) -> Self {
        Self(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A long-running server: its output goes to `log` in `dir`, so an unread pipe can never block it.
pub fn spawn_server(dir: &std::path::Path, log: &str, vars: &[(&str, &str)]) -> Server {
    spawn_logged(edgegate(dir, vars), dir, log)
}

/// Starts `command` (an edgegate server, possibly behind a wrapper such as `prlimit`) with its
/// stderr in `log` in `dir`.
pub fn spawn_logged(mut command: Command, dir: &std::path::Path, log: &str) -> Server {
    let file = std::fs::File::create(dir.join(log)).expect("create the log file");
    Server(
        command
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start edgegate"),
    )
}
