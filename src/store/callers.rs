//! Caller usage rows: verifications per (source, kind, route, client) per hour, summed across
//! instances by upsert, like `key_usage_hourly`; and the hourly key rows the report draws bars from.

use anyhow::Context as _;

use super::{HourlyCount, KeyUsage, Store};

/// Verifications by one caller in one hour (or, read back over a period, summed).
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct CallerUsage {
    /// Start of the hour, epoch milliseconds (summed over a period: the earliest hour).
    pub hour_start_ms: i64,
    /// `legacy_secret` or `api_key`.
    pub source: String,
    /// `anon_key`, `service_role_key`, `user_session`, or the API key's id (`secret:NAME`,
    /// `publishable:NAME`; the bare name in rows of releases before the type was recorded).
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
        let rows = rows.iter().map(|row| HourlyCount {
            hour_start_ms: row.hour_start_ms,
            key: vec![&row.source, &row.kind, &row.route, &row.client],
            verified_count: row.verified_count,
            last_verified_at_ms: row.last_verified_at_ms,
        });
        let key_columns = ["source", "kind", "route", "client"];
        self.add_hourly("caller_usage_hourly", &key_columns, rows)
            .await
            .context("recording caller usage")
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
