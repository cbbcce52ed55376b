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
}

impl Engine for sqlx::Sqlite {
    fn rows_affected(done: &sqlx::sqlite::SqliteQueryResult) -> u64 {
        done.rows_affected()
    }
}

impl Engine for sqlx::Postgres {
    fn rows_affected(done: &sqlx::postgres::PgQueryResult) -> u64 {
        done.rows_affected()
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

/// One value bound to a statement run through [`run`] or [`run_each`]: what the store's
/// plain writes need, so each is a SQL string and a list instead of per-engine code.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg<'a> {
    Text(Option<&'a str>),
    Int(Option<i64>),
    Bool(bool),
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

fn bind_all<'q, DB: Engine>(query: Query<'q, DB>, args: &[Arg<'_>]) -> Query<'q, DB> {
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

/// Runs `sql` once per entry of `rows`, all in one transaction.
pub(crate) async fn run_each<DB: Engine>(
    pool: &Pool<DB>,
    sql: &str,
    rows: &[Vec<Arg<'_>>],
) -> Result<(), sqlx::Error> {
    run_batches(pool, None, &[(sql, rows)]).await
}

/// Runs each statement once per entry of its rows, the statements in the order given, all in
/// one transaction: all of them are written or none. `prelude`, when given, runs first in the
/// same transaction (a `SET LOCAL` of its own bounds).
pub(crate) async fn run_batches<DB: Engine>(
    pool: &Pool<DB>,
    prelude: Option<&str>,
    batches: &[(&str, &[Vec<Arg<'_>>])],
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    if let Some(sql) = prelude {
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(tx.executor())
            .await?;
    }
    for &(sql, rows) in batches {
        for args in rows {
            let query = bind_all(sqlx::query(AssertSqlSafe(sql)), args);
            query.execute(tx.executor()).await?;
        }
    }
    tx.commit().await
}
