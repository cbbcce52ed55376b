//! What the SQL written once for both engines needs of an engine, as one bound: `DB: Engine`.
//!
//! sqlx states "this engine can bind a `String`" as a bound on `String`, which Rust does not carry
//! from a trait to its users, so generic code would repeat a long `where` clause per function.
//! Here each need is a supertrait of `Engine` (which Rust does carry), met by blanket impls.

use sqlx::database::HasStatementCache;
use sqlx::{
    AssertSqlSafe, Database, Encode, Executor, IntoArguments, PgConnection, Pool, SqliteConnection,
    Type,
};

/// A statement being built on engine `DB`.
pub(crate) type Query<'q, DB> = sqlx::query::Query<'q, DB, <DB as Database>::Arguments>;

/// SQLite or PostgreSQL, seen by the SQL both accept.
pub(crate) trait Engine:
    Database<Arguments: IntoArguments<Self>, Connection: Execute<Self>>
    + HasStatementCache
    + BindValue<bool>
    + BindValue<i64>
    + BindValue<Option<i64>>
    + for<'a> BindValue<&'a str>
    + BindValue<Option<String>>
    + for<'a> BindValue<&'a String>
    + for<'a> BindValue<&'a Option<String>>
{
    /// Rows a statement wrote (sqlx has no engine-neutral accessor).
    fn rows_affected(done: &Self::QueryResult) -> u64;

    /// Writes the placeholder of the statement's `index`th value (from 1), in a statement whose
    /// values are all bound in order.
    fn push_placeholder(sql: &mut String, index: usize);
}

impl Engine for sqlx::Sqlite {
    fn rows_affected(done: &sqlx::sqlite::SqliteQueryResult) -> u64 {
        done.rows_affected()
    }

    /// `?`, bound by position: sqlx reads a numbered placeholder's number from SQLite's
    /// `sqlite3_bind_parameter_name`, which walks the statement's list of names for every value,
    /// so binding n numbered values takes time in n²: 43 % of a 4,000-row flush's time at 250
    /// rows to a statement.
    fn push_placeholder(sql: &mut String, _index: usize) {
        sql.push('?');
    }
}

impl Engine for sqlx::Postgres {
    fn rows_affected(done: &sqlx::postgres::PgQueryResult) -> u64 {
        done.rows_affected()
    }

    fn push_placeholder(sql: &mut String, index: usize) {
        use std::fmt::Write as _;
        let _ = write!(sql, "${index}");
    }
}

/// An engine's connection (a transaction derefs to one) as the executor of a statement.
pub(crate) trait Execute<DB: Database> {
    fn executor(&mut self) -> impl Executor<'_, Database = DB>;
}

impl Execute<sqlx::Sqlite> for SqliteConnection {
    fn executor(&mut self) -> impl Executor<'_, Database = sqlx::Sqlite> {
        self
    }
}

impl Execute<sqlx::Postgres> for PgConnection {
    fn executor(&mut self) -> impl Executor<'_, Database = sqlx::Postgres> {
        self
    }
}

/// The engine can bind a `T`.
pub(crate) trait BindValue<T>: Database {
    fn bind_to<'q>(query: Query<'q, Self>, value: T) -> Query<'q, Self>;
}

impl<DB: Database, T: for<'t> Encode<'t, DB> + Type<DB>> BindValue<T> for DB {
    fn bind_to<'q>(query: Query<'q, Self>, value: T) -> Query<'q, Self> {
        query.bind(value)
    }
}

/// `query.bind_value(x)`: `bind` for generic code, where only `DB: Engine` is known.
pub(crate) trait BindExt<DB> {
    fn bind_value<T>(self, value: T) -> Self
    where
        DB: BindValue<T>;
}

impl<'q, DB: Database> BindExt<DB> for Query<'q, DB> {
    fn bind_value<T>(self, value: T) -> Self
    where
        DB: BindValue<T>,
    {
        DB::bind_to(self, value)
    }
}

/// One value bound to a statement run through [`run`] or [`run_upserts`]: what the store's
/// plain writes need, so each is a SQL string and a list instead of per-engine code.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg<'a> {
    Text(Option<&'a str>),
    Int(Option<i64>),
    Bool(bool),
}

impl Arg<'_> {
    /// About the bytes the value takes in a statement's message to PostgreSQL: its length word,
    /// its format code, its bytes.
    fn wire_size(&self) -> usize {
        6 + match *self {
            Self::Text(text) => text.map_or(0, str::len),
            Self::Int(int) => int.map_or(0, |_| 8),
            Self::Bool(_) => 1,
        }
    }
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(text: &'a str) -> Self {
        Self::Text(Some(text))
    }
}

impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(text: Option<&'a str>) -> Self {
        Self::Text(text)
    }
}

impl From<i64> for Arg<'_> {
    fn from(int: i64) -> Self {
        Self::Int(Some(int))
    }
}

impl From<Option<i64>> for Arg<'_> {
    fn from(int: Option<i64>) -> Self {
        Self::Int(int)
    }
}

impl From<bool> for Arg<'_> {
    fn from(flag: bool) -> Self {
        Self::Bool(flag)
    }
}

pub(super) fn bind_all<'q, DB: Engine>(query: Query<'q, DB>, args: &[Arg<'_>]) -> Query<'q, DB> {
    args.iter().fold(query, |query, arg| match *arg {
        Arg::Text(Some(text)) => query.bind_value(text),
        Arg::Text(None) => query.bind_value(None::<String>),
        Arg::Int(int) => query.bind_value(int),
        Arg::Bool(flag) => query.bind_value(flag),
    })
}

/// Runs the store's own statement `sql` with `args`; returns the rows it wrote.
pub(crate) async fn run<DB: Engine>(
    pool: &Pool<DB>,
    sql: &str,
    args: &[Arg<'_>],
) -> Result<u64, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let query = bind_all(sqlx::query(AssertSqlSafe(sql)), args);
    Ok(DB::rows_affected(&query.execute(conn.executor()).await?))
}

/// The most values one statement of [`run_upserts`] binds: far under SQLite's limit (32,766
/// variables since 3.32; the bundled SQLite is newer) and PostgreSQL's (65,535).
const MAX_BINDS_PER_STATEMENT: usize = 4_000;

/// The most rows one statement of [`run_upserts`] writes: a few hundred, so that a flush of
/// thousands is a few dozen statements, each of a size both engines parse and plan at once.
const MAX_ROWS_PER_STATEMENT: usize = 250;

/// The most bytes of values one statement of [`run_upserts`] sends, about: a bound on one
/// message's size whatever the values' lengths (250 caller rows with long client names and
/// routes are some 40 KiB). It was 8 KiB while sqlx 0.9.0 left Nagle's algorithm on, which
/// held a larger message's tail for the server's delayed acknowledgement (40 ms a statement);
/// with `TCP_NODELAY` set again (0.9.1), 8 KiB and no bound measured the same on loopback
/// (BENCHMARKS.md), and fewer statements are fewer round trips through a distant pooler.
const MAX_BYTES_PER_STATEMENT: usize = 64 * 1024;

/// Rows written by [`run_upserts`]: `{head} VALUES (…), (…), … {tail}`, as many rows to a
/// statement as fit its bounds, each row's values bound in the order of `head`'s columns.
/// No two rows of one statement may hit the same conflict target: PostgreSQL refuses an
/// `ON CONFLICT DO UPDATE` that would update a row twice (21000).
pub(crate) struct Upsert<'a> {
    /// `INSERT INTO table (columns)`.
    pub(crate) head: String,
    /// `ON CONFLICT (…) DO UPDATE SET …`, written against the table's name and `excluded`.
    pub(crate) tail: String,
    /// Every row's values, all of the same length.
    pub(crate) rows: Vec<Vec<Arg<'a>>>,
}

impl Upsert<'_> {
    /// The statement of `count` rows of `width` values each, bound in order.
    fn statement<DB: Engine>(&self, count: usize, width: usize) -> String {
        let mut sql = String::with_capacity(self.head.len() + self.tail.len() + count * width * 7);
        sql.push_str(&self.head);
        sql.push_str(" VALUES ");
        for row in 0..count {
            sql.push_str(if row == 0 { "(" } else { ", (" });
            for column in 0..width {
                if column > 0 {
                    sql.push_str(", ");
                }
                DB::push_placeholder(&mut sql, row * width + column + 1);
            }
            sql.push(')');
        }
        sql.push(' ');
        sql.push_str(&self.tail);
        sql
    }

    /// The rows in groups of one statement each, in order: as many as fit its bounds.
    fn statements(&self) -> impl Iterator<Item = &[Vec<Arg<'_>>]> {
        let mut rest = self.rows.as_slice();
        std::iter::from_fn(move || {
            let (mut count, mut binds, mut bytes) = (0, 0, 0);
            for row in rest {
                let size: usize = row.iter().map(Arg::wire_size).sum();
                let fits = count < MAX_ROWS_PER_STATEMENT
                    && binds + row.len() <= MAX_BINDS_PER_STATEMENT
                    && bytes + size <= MAX_BYTES_PER_STATEMENT;
                if count > 0 && !fits {
                    break;
                }
                (count, binds, bytes) = (count + 1, binds + row.len(), bytes + size);
            }
            let (statement, after) = rest.split_at(count);
            rest = after;
            (count > 0).then_some(statement)
        })
    }
}

/// Writes each upsert's rows, the upserts in the order given and each one's rows in theirs,
/// up to a few hundred rows to a statement (fewer if their values are long), all in one
/// transaction: all of them are written or none.
/// `prelude`, when given, runs first in the same transaction (a `SET LOCAL` of its own bounds).
pub(crate) async fn run_upserts<DB: Engine>(
    pool: &Pool<DB>,
    prelude: Option<&str>,
    upserts: &[Upsert<'_>],
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    if let Some(sql) = prelude {
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(tx.executor())
            .await?;
    }
    for upsert in upserts {
        for rows in upsert.statements() {
            let width = rows[0].len();
            debug_assert!(rows.iter().all(|row| row.len() == width));
            let sql = upsert.statement::<DB>(rows.len(), width);
            // Only a full statement's text surely comes back flush after flush: one of any
            // other count of rows (a flush's last, one cut short by long values) is not kept
            // prepared, where each count would take a place in each connection's cache (100
            // statements) and push out those the store runs all the time. On PostgreSQL it
            // costs a round trip more than a kept statement found in the cache (parse, then
            // run), one fewer than a kept one that is new (parse, close the one pushed out,
            // run); a deployment whose flushes keep the same small count pays the one more.
            let query = bind_all(sqlx::query(AssertSqlSafe(sql)), &rows.concat())
                .persistent(rows.len() == MAX_ROWS_PER_STATEMENT);
            query.execute(tx.executor()).await?;
        }
    }
    tx.commit().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upsert(rows: Vec<Vec<Arg<'static>>>) -> Upsert<'static> {
        Upsert {
            head: "INSERT INTO t (a, b)".into(),
            tail: "ON CONFLICT (a) DO NOTHING".into(),
            rows,
        }
    }

    fn sizes(upsert: &Upsert<'_>) -> Vec<usize> {
        upsert.statements().map(<[_]>::len).collect()
    }

    #[test]
    fn rows_go_to_statements_up_to_each_bound_in_order() {
        let row = || vec![Arg::Int(Some(1)), Arg::Text(Some("a"))];
        let rows = |n: usize| (0..n).map(|_| row()).collect::<Vec<_>>();
        assert_eq!(sizes(&upsert(rows(0))), Vec::<usize>::new());
        assert_eq!(sizes(&upsert(rows(1))), [1]);
        assert_eq!(sizes(&upsert(rows(250))), [250]);
        assert_eq!(sizes(&upsert(rows(251))), [250, 1]);
        assert_eq!(sizes(&upsert(rows(501))), [250, 250, 1]);
        // The values' bound: rows of 20 values, 200 to a statement.
        let wide = (0..450)
            .map(|_| vec![Arg::Bool(true); 20])
            .collect::<Vec<_>>();
        assert_eq!(sizes(&upsert(wide)), [200, 200, 50]);
        // The bytes' bound: rows of about 20 KiB, three to a statement; a row larger than the
        // bound goes alone rather than not at all.
        let long: &'static str = Box::leak("x".repeat(20 * 1024).into_boxed_str());
        let huge: &'static str = Box::leak("x".repeat(100 * 1024).into_boxed_str());
        let mixed = vec![
            vec![Arg::Text(Some(long))],
            vec![Arg::Text(Some(long))],
            vec![Arg::Text(Some(long))],
            vec![Arg::Text(Some(long))],
            vec![Arg::Text(Some(huge))],
            vec![Arg::Text(Some(long))],
        ];
        assert_eq!(sizes(&upsert(mixed)), [3, 1, 1, 1]);
    }

    #[test]
    fn a_statement_has_a_placeholder_for_each_value() {
        let rows = vec![vec![Arg::Int(Some(1)), Arg::Int(Some(2))]; 3];
        let sql = upsert(rows).statement::<sqlx::Postgres>(3, 2);
        assert_eq!(
            sql,
            "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4), ($5, $6) ON CONFLICT (a) DO NOTHING"
        );
    }
}
