//! Caller usage rows: verifications per (source, kind, route, client) per hour, summed across
//! instances by upsert, like `key_usage_hourly`; and the hourly key rows the report draws bars from.

use anyhow::Context as _;

use super::engine::Upsert;
use super::{HourlyCount, KeyUsage, Store, hourly_batch};

/// A table of hourly counts that [`Store::prune_usage_day`] deletes old hours from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HourlyTable {
    /// `key_usage_hourly`: the revocation verdict's counts.
    Keys,
    /// `caller_usage_hourly`: who the legacy and API-key verifications came from.
    Callers,
}

impl HourlyTable {
    pub const ALL: [Self; 2] = [Self::Keys, Self::Callers];

    pub fn name(self) -> &'static str {
        match self {
            Self::Keys => "key_usage_hourly",
            Self::Callers => "caller_usage_hourly",
        }
    }
}

/// A day of hours: what one statement of [`Store::prune_usage_day`] deletes at most.
const DAY_MS: i64 = 86_400_000;

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

/// The caller rows of one window summed in the database, what the report reads instead of every
/// hourly row (a month of hours of a hundred callers is some 86,000 rows). Rows added here as
/// they are (an instance's unflushed ones) are summed with them by the report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallerSums {
    /// One row per caller (source, kind, route, client): the counts summed, the latest use, and
    /// as its hour the earliest one summed.
    pub callers: Vec<CallerUsage>,
    /// The legacy secret's rows summed per kind and hour (route and client empty): the hourly
    /// series per kind.
    pub legacy_hours: Vec<CallerUsage>,
    /// As `legacy_hours`, of the rows of the window's first hour last used before the window's
    /// start: in no number of the window, but in that hour's key count, which counts whole once
    /// used in the window. With `legacy_hours`, every caller of the window's hours.
    pub legacy_before_start: Vec<CallerUsage>,
}

impl CallerSums {
    /// Adds hourly rows as they are: each to the callers, and the legacy secret's to the hours.
    pub fn extend<'a>(&mut self, rows: impl IntoIterator<Item = &'a CallerUsage>) {
        for row in rows {
            if row.source == "legacy_secret" {
                self.legacy_hours.push(row.clone());
            }
            self.callers.push(row.clone());
        }
    }

    /// Adds hourly rows of the window's hours last used before its start to
    /// `legacy_before_start`.
    pub fn extend_before_start<'a>(&mut self, rows: impl IntoIterator<Item = &'a CallerUsage>) {
        self.legacy_before_start.extend(
            rows.into_iter()
                .filter(|row| row.source == "legacy_secret")
                .cloned(),
        );
    }
}

/// The statement of [`Store::add_caller_usage`] and its rows.
pub(super) fn caller_usage_batch(rows: &[CallerUsage]) -> anyhow::Result<Upsert<'_>> {
    let rows = rows.iter().map(|row| HourlyCount {
        hour_start_ms: row.hour_start_ms,
        key: vec![&row.source, &row.kind, &row.route, &row.client],
        verified_count: row.verified_count,
        last_verified_at_ms: row.last_verified_at_ms,
    });
    let key_columns = ["source", "kind", "route", "client"];
    hourly_batch("caller_usage_hourly", &key_columns, rows)
}

/// A row of [`Store::caller_usage_summed`]: summed per caller (`part` 0), per legacy kind and
/// hour (1), or per legacy kind of the first hour's rows last used before the window's start
/// (2).
#[derive(sqlx::FromRow)]
struct SummedRow {
    #[sqlx(flatten)]
    row: CallerUsage,
    part: i64,
}

impl Store {
    /// Adds counted callers; rows of the same hour and caller from every instance are summed.
    pub async fn add_caller_usage(&self, rows: &[CallerUsage]) -> anyhow::Result<()> {
        let upsert = caller_usage_batch(rows).context("recording caller usage")?;
        self.execute_upserts(&[upsert])
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

    /// The caller rows of the hours starting at or after `first_hour_ms` whose last use is at or
    /// after `since_ms`, summed per caller and, the legacy secret's, per kind and hour; and the
    /// legacy secret's rows of the first hour last used before `since_ms`, per kind (every other
    /// hour starts after `since_ms`, so its rows are all in the sums before). One statement, so
    /// the sums are of the same rows whatever a flush commits meanwhile; each part reads its
    /// hours from the primary key, which starts with `hour_start`, the last one hour only.
    pub async fn caller_usage_summed(
        &self,
        first_hour_ms: i64,
        since_ms: i64,
    ) -> anyhow::Result<CallerSums> {
        let sql = "SELECT MIN(hour_start) AS hour_start_ms, source, kind, route, client, \
                   CAST(SUM(verified_count) AS BIGINT) AS verified_count, \
                   MAX(last_verified_at) AS last_verified_at_ms, CAST(0 AS BIGINT) AS part \
                   FROM caller_usage_hourly WHERE hour_start >= $1 AND last_verified_at >= $2 \
                   GROUP BY source, kind, route, client \
                   UNION ALL \
                   SELECT hour_start, source, kind, '', '', \
                   CAST(SUM(verified_count) AS BIGINT), MAX(last_verified_at), CAST(1 AS BIGINT) \
                   FROM caller_usage_hourly WHERE hour_start >= $1 AND last_verified_at >= $2 \
                   AND source = 'legacy_secret' GROUP BY hour_start, source, kind \
                   UNION ALL \
                   SELECT hour_start, source, kind, '', '', \
                   CAST(SUM(verified_count) AS BIGINT), MAX(last_verified_at), CAST(2 AS BIGINT) \
                   FROM caller_usage_hourly WHERE hour_start = $1 AND last_verified_at < $2 \
                   AND source = 'legacy_secret' GROUP BY hour_start, source, kind";
        let rows: Vec<SummedRow> = with_pool!(self, |pool| {
            sqlx::query_as(sql)
                .bind(first_hour_ms)
                .bind(since_ms)
                .fetch_all(pool)
                .await
        })
        .context("reading caller usage")?;
        let mut sums = CallerSums::default();
        for SummedRow { row, part } in rows {
            match part {
                0 => sums.callers.push(row),
                1 => sums.legacy_hours.push(row),
                _ => sums.legacy_before_start.push(row),
            }
        }
        Ok(sums)
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

    /// Deletes the rows of `table` whose hour starts before `before_ms`, but only those of the
    /// first day of hours it holds (from its oldest hour on): a year of backlog is deleted a
    /// day per statement, so none holds SQLite's write lock (or PostgreSQL's row locks) for
    /// long. Returns the rows deleted; 0 once nothing before `before_ms` is left. Both bounds in
    /// one `WHERE`, so the statement is the same on both engines (no `LEAST`, no scalar `MIN`);
    /// the subquery reads the oldest hour from the primary key, which starts with `hour_start`.
    pub async fn prune_usage_day(&self, table: HourlyTable, before_ms: i64) -> anyhow::Result<u64> {
        let table = table.name();
        let sql = format!(
            "DELETE FROM {table} WHERE hour_start < $1 \
             AND hour_start < (SELECT MIN(hour_start) FROM {table}) + $2"
        );
        let deleted = self
            .execute(&sql, &[before_ms.into(), DAY_MS.into()])
            .await
            .with_context(|| format!("deleting {table} rows from before {before_ms}"))?;
        Ok(deleted)
    }
}
