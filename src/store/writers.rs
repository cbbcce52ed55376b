//! The instances counting key usage (`usage_writers`): each notes itself after every flush and
//! deletes its row at a clean stop, so a row left behind tells of counts that never reached the
//! database (`auth::usage::Writer`).

use anyhow::Context as _;

use super::Store;

/// An instance whose row was last noted at `seen_at_ms`, on its clock.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct UsageWriter {
    pub id: String,
    pub seen_at_ms: i64,
}

impl Store {
    /// Notes that instance `id` has written its counts, at `now_ms`.
    pub async fn note_usage_writer(&self, id: &str, now_ms: i64) -> anyhow::Result<()> {
        let sql = "INSERT INTO usage_writers (id, seen_at) VALUES ($1, $2) \
                   ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at";
        self.execute(sql, &[id.into(), now_ms.into()])
            .await
            .context("noting this instance among those counting key usage")?;
        Ok(())
    }

    /// The instances other than `id` last noted before `before_ms`.
    pub async fn usage_writers_seen_before(
        &self,
        id: &str,
        before_ms: i64,
    ) -> anyhow::Result<Vec<UsageWriter>> {
        let sql = "SELECT id, seen_at AS seen_at_ms FROM usage_writers \
                   WHERE id <> $1 AND seen_at < $2 ORDER BY seen_at, id";
        let rows = with_pool!(self, |pool| {
            sqlx::query_as(sql)
                .bind(id)
                .bind(before_ms)
                .fetch_all(pool)
                .await
        })
        .context("reading the instances counting key usage")?;
        Ok(rows)
    }

    /// Deletes the row of `writer`, unless it was noted again since it was read.
    pub async fn forget_usage_writer(&self, writer: &UsageWriter) -> anyhow::Result<()> {
        let sql = "DELETE FROM usage_writers WHERE id = $1 AND seen_at = $2";
        self.execute(sql, &[writer.id.as_str().into(), writer.seen_at_ms.into()])
            .await
            .context("deleting an instance from those counting key usage")?;
        Ok(())
    }

    /// Deletes instance `id`'s row: a clean stop wrote all its counts.
    pub async fn retire_usage_writer(&self, id: &str) -> anyhow::Result<()> {
        let sql = "DELETE FROM usage_writers WHERE id = $1";
        self.execute(sql, &[id.into()])
            .await
            .context("deleting this instance from those counting key usage")?;
        Ok(())
    }
}
