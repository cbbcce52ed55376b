//! Caller usage rows: verifications per (source, kind, route, client) per hour, summed across
//! instances by upsert, like `key_usage_hourly`; and the hourly key rows the report draws bars from.

use anyhow::Context as _;

use super::{Backend, KeyUsage, Store};

/// Verifications by one caller in one hour (or, read back over a period, summed).
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct CallerUsage {
    /// Start of the hour, epoch milliseconds (summed over a period: the earliest hour).
    pub hour_start_ms: i64,
    /// `legacy_secret` or `api_key`.
    pub source: String,
    /// `anon_key`, `service_role_key`, `user_session`, or the API key's name.
    pub kind: String,
    /// The matched route pattern.
    pub route: String,
    /// The client's name, or `other`.
    pub client: String,
    pub verified_count: i64,
    pub last_verified_at_ms: i64,
}

impl Store {
    /// Adds counted callers; rows of the same hour and caller from every instance are summed.
    pub async fn add_caller_usage(&self, rows: &[CallerUsage]) -> anyhow::Result<()> {
        let sql = "INSERT INTO caller_usage_hourly \
                   (hour_start, source, kind, route, client, verified_count, last_verified_at) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7) \
                   ON CONFLICT (hour_start, source, kind, route, client) DO UPDATE SET \
                   verified_count = caller_usage_hourly.verified_count + excluded.verified_count, \
                   last_verified_at = CASE \
                     WHEN excluded.last_verified_at > caller_usage_hourly.last_verified_at \
                     THEN excluded.last_verified_at ELSE caller_usage_hourly.last_verified_at END";
        with_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            for row in rows {
                sqlx::query(sql)
                    .bind(row.hour_start_ms)
                    .bind(&row.source)
                    .bind(&row.kind)
                    .bind(&row.route)
                    .bind(&row.client)
                    .bind(row.verified_count)
                    .bind(row.last_verified_at_ms)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await
        })
        .context("recording caller usage")?;
        Ok(())
    }

    /// Every hourly caller row of the hours starting at or after `since_ms`.
    pub async fn caller_usage_hours_since(
        &self,
        since_ms: i64,
    ) -> anyhow::Result<Vec<CallerUsage>> {
        let sql = "SELECT hour_start AS hour_start_ms, source, kind, route, client, \
                   verified_count, last_verified_at AS last_verified_at_ms \
                   FROM caller_usage_hourly WHERE hour_start >= $1 \
                   ORDER BY hour_start, source, kind, route, client";
        let rows = with_pool!(self, |pool| {
            sqlx::query_as(sql).bind(since_ms).fetch_all(pool).await
        })
        .context("reading caller usage")?;
        Ok(rows)
    }

    /// Every hourly key-usage row of the hours starting at or after `since_ms` (not summed).
    pub async fn key_usage_hours_since(&self, since_ms: i64) -> anyhow::Result<Vec<KeyUsage>> {
        let sql = "SELECT hour_start AS hour_start_ms, source, kid, alg, verified_count, \
                   last_verified_at AS last_verified_at_ms \
                   FROM key_usage_hourly WHERE hour_start >= $1 \
                   ORDER BY hour_start, source, kid, alg";
        let rows = with_pool!(self, |pool| {
            sqlx::query_as(sql).bind(since_ms).fetch_all(pool).await
        })
        .context("reading key usage")?;
        Ok(rows)
    }
}
