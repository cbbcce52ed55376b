//! The instances counting key usage (`usage_writers`): each notes itself after every flush and
//! deletes its row at a clean stop, so a row left behind tells of counts that never reached the
//! database (`auth::usage::Writer`); the last note of any of them (`usage_evidence.last_noted_at`)
//! tells how long none ran.

use anyhow::Context as _;

use super::Store;

/// The last note of any instance counting key usage: when, on its wall clock, and which.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct LastNote {
    pub noted_at_ms: i64,
    pub noted_by: String,
}

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

    /// Records the last note of any instance: `id`'s, at `now_ms`. The last written wins, so a
    /// stamp from a wall clock since set back is replaced at the next note. Written only where
    /// `usage_evidence` has its row. With none, either nothing is recorded yet, or
    /// `key_usage_hourly` holds counts from before `usage_evidence` existed (the evidence is
    /// then read from the oldest hour) and the row is written by the first flush that writes
    /// counts or a drop, or by a raise of the evidence's start: notes before it are not stamped.
    pub async fn note_usage_fleet(&self, id: &str, now_ms: i64) -> anyhow::Result<()> {
        let sql = "UPDATE usage_evidence SET last_noted_at = $2, last_noted_by = $1 WHERE id = 1";
        self.execute(sql, &[id.into(), now_ms.into()])
            .await
            .context("noting the last note of the instances counting key usage")?;
        Ok(())
    }

    /// The last note of any instance ([`Store::note_usage_fleet`]), if one was written.
    pub async fn usage_fleet_last_note(&self) -> anyhow::Result<Option<LastNote>> {
        let sql = "SELECT last_noted_at AS noted_at_ms, last_noted_by AS noted_by \
                   FROM usage_evidence WHERE id = 1 \
                   AND last_noted_at IS NOT NULL AND last_noted_by IS NOT NULL";
        let note = with_pool!(self, |pool| {
            sqlx::query_as(sql).fetch_optional(pool).await
        })
        .context("reading the last note of the instances counting key usage")?;
        Ok(note)
    }

    /// Whether `usage_evidence` has its row: written by the first flush of counts or of a drop,
    /// or a raise of the evidence's start, by a build that has the table; never deleted.
    pub async fn usage_evidence_row_exists(&self) -> anyhow::Result<bool> {
        let sql = "SELECT COUNT(*) FROM usage_evidence WHERE id = 1";
        let rows: i64 = with_pool!(self, |pool| sqlx::query_scalar(sql).fetch_one(pool).await)
            .context("reading key usage")?;
        Ok(rows > 0)
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

    /// Deletes instance `id`'s row: a clean stop wrote all its counts. With `stamp`, the time
    /// until which it did, that is the fleet's last note first ([`Store::note_usage_fleet`]):
    /// with no instance left running, the one started next reads from it how long none counted.
    /// Without, the note is left as it was (`auth::usage::Retiring::retire` says when).
    pub async fn retire_usage_writer(&self, id: &str, stamp: Option<i64>) -> anyhow::Result<()> {
        if let Some(now_ms) = stamp {
            self.note_usage_fleet(id, now_ms).await?;
        }
        let sql = "DELETE FROM usage_writers WHERE id = $1";
        self.execute(sql, &[id.into()])
            .await
            .context("deleting this instance from those counting key usage")?;
        Ok(())
    }
}
