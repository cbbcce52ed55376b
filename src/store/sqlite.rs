//! The embedded backend: one SQLite file in WAL mode, created on first run.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

/// The embedded migrations. A database that has a newer migration than this binary knows is
/// accepted, so rolling back to an older release works while migrations stay additive.
pub(super) fn migrator() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!("./migrations/sqlite");
    migrator.set_ignore_missing(true);
    migrator
}

pub(super) async fn connect(url: &str) -> anyhow::Result<SqlitePool> {
    let options = SqliteConnectOptions::from_str(url)
        .context("DATABASE_URL is not a usable SQLite location")?
        .create_if_missing(true)
        // WAL lets readers run beside the single writer; NORMAL is durable in WAL mode.
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        // Writers from other connections or processes wait instead of failing at once.
        .busy_timeout(Duration::from_secs(5));
    SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .context("opening the SQLite database")
}
