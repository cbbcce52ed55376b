//! The production backend: PostgreSQL (Supabase's own, or Fly Postgres).

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The embedded migrations. A database that has a newer migration than this binary knows is
/// accepted, so rolling back to an older release works while migrations stay additive.
pub(super) fn migrator() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!("./migrations/postgres");
    migrator.set_ignore_missing(true);
    migrator
}

/// The longest a query waits for a connection, connecting included.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

pub(super) async fn connect(url: &str) -> anyhow::Result<PgPool> {
    let options =
        PgConnectOptions::from_str(url).context("DATABASE_URL is not a usable Postgres URL")?;
    // Fly's proxy and Supabase's pooler drop long-lived and idle connections; recycle ours first.
    // Through an outage: every idle connection is pinged before use (a dead one is dropped and
    // a new one opened), and acquiring gives up after a few seconds, so a request answers 5xx
    // promptly while the database is away and the same pool serves again once it is back.
    PgPoolOptions::new()
        .max_connections(10)
        .min_connections(0)
        .max_lifetime(Duration::from_secs(600))
        .idle_timeout(Duration::from_secs(300))
        .test_before_acquire(true)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await
        .context("connecting to PostgreSQL")
}
