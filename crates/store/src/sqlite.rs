//! SQLite, the embedded default: one file, WAL, `synchronous=FULL` so that a committed write
//! survives a power cut, and `BEGIN IMMEDIATE` so that two processes sharing the file (the
//! server and the CLI) queue for the write lock instead of failing on a lock upgrade.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};

use crate::engine::{self, Backend, Conn, SqlStore};
use crate::{OpenOptions, Result, SqliteSync, Store, StoreError, redact_url};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long a writer waits for another process's write lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Rows a connection's worker thread may hold ready for its reader.
const ROW_BUFFER: usize = 4096;

engine::impl_conn!(
    SqliteConnection,
    SqliteRow,
    anonymous_params = true,
    multi_statement = true,
    notify_revocation = None
);

#[derive(Debug)]
pub(crate) struct SqliteBackend {
    pool: SqlitePool,
}

#[async_trait]
impl Backend for SqliteBackend {
    type Db = sqlx::Sqlite;
    type Conn = SqliteConnection;

    const KIND: &'static str = "sqlite";

    fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    const INSERT_SKIPPING: (&'static str, &'static str) = ("INSERT OR IGNORE INTO", "");

    // `octet_length` and ordered aggregates need SQLite 3.44 (sqlx bundles a newer one).
    const PACKED_EVENTS_SQL: Option<&'static str> = Some(
        "SELECT group_concat(printf('%d %d %s %s %d:%s%d:%s%d:%s%d:%s%d:%s%d:%s', \
         seq, time_ms, hex(prev_hash), hex(hash), octet_length(kind), kind, \
         octet_length(actor), actor, ifnull(octet_length(agent), -1), ifnull(agent, ''), \
         ifnull(octet_length(task), -1), ifnull(task, ''), \
         ifnull(octet_length(decision), -1), ifnull(decision, ''), \
         octet_length(detail), detail), '' ORDER BY seq), max(seq) \
         FROM (SELECT * FROM audit_events WHERE seq >= $1 ORDER BY seq LIMIT 1000)",
    );

    async fn begin_write(
        &self,
        conn: &mut SqliteConnection,
    ) -> Result<Option<SqliteRow>, sqlx::Error> {
        // One round trip to the connection's worker thread: the statements run in order and
        // stop at the first error, so the head is read only once the write lock is held.
        conn.fetch_optional(concat!("BEGIN IMMEDIATE; ", engine::head_sql!()), vec![])
            .await
    }
}

/// Opens the database file `path` (from `url`), creating and migrating it as needed.
pub(crate) async fn open(url: &str, path: &str, options: &OpenOptions) -> Result<Arc<dyn Store>> {
    let bad_url = || StoreError::BadUrl(redact_url(url));
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    // `mode=rwc` is what sqlx's own URLs say for "create if missing", which remit always does;
    // any other parameter (an in-memory mode above all) is refused rather than ignored.
    let query_ok = query
        .split('&')
        .all(|pair| pair.is_empty() || pair == "mode=rwc");
    if path.is_empty() || path == ":memory:" || path.starts_with("file::memory:") || !query_ok {
        return Err(bad_url());
    }
    let pool = connect(path, options).await?;
    MIGRATOR.run(&pool).await.map_err(engine::migrate_error)?;
    Ok(Arc::new(SqlStore::start(SqliteBackend { pool })))
}

/// The pool of connections to the file at `path`, each set up as remit needs it.
async fn connect(path: &str, options: &OpenOptions) -> Result<sqlx::SqlitePool> {
    let connect = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(match options.sqlite_sync {
            SqliteSync::Full => SqliteSynchronous::Full,
            SqliteSync::Normal => SqliteSynchronous::Normal,
        })
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true)
        // Rows cross from the connection's worker thread through a bounded channel; a deep one
        // lets the worker run ahead of a reader (the chain verifier streams the whole table)
        // instead of the two threads waking each other every few rows.
        .row_buffer_size(ROW_BUFFER);
    let pool = SqlitePoolOptions::new()
        // One more than the readers need, for the writer task.
        .max_connections(options.max_connections.max(1) + 1)
        .acquire_timeout(options.connect_timeout)
        .connect_with(connect)
        .await
        .map_err(|error| StoreError::Unavailable(format!("cannot open `{path}`: {error}")))?;
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `PRAGMA synchronous` as a connection of the pool reads it: 1 is NORMAL, 2 is FULL.
    async fn synchronous_of(sync: SqliteSync) -> i64 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("remit.db");
        let options = OpenOptions {
            sqlite_sync: sync,
            ..OpenOptions::default()
        };
        let pool = connect(path.to_str().unwrap(), &options).await.unwrap();
        let (level,): (i64,) = sqlx::query_as("PRAGMA synchronous")
            .fetch_one(&pool)
            .await
            .unwrap();
        level
    }

    #[tokio::test]
    async fn commits_wait_for_the_disk_unless_told_otherwise() {
        assert_eq!(OpenOptions::default().sqlite_sync, SqliteSync::Full);
        assert_eq!(synchronous_of(SqliteSync::Full).await, 2);
        assert_eq!(synchronous_of(SqliteSync::Normal).await, 1);
    }
}
