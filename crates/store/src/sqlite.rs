//! SQLite, the embedded default: one file, WAL, `synchronous=FULL` so that a committed write
//! survives a power cut, and `BEGIN IMMEDIATE` so that two processes sharing the file (the
//! server and the CLI) queue for the write lock instead of failing on a lock upgrade.
//!
//! The audit log's per-agent and per-task lookups live in a second file beside it,
//! `<file>-lookups`, attached as `lookups` to every connection except the writer's. They are
//! derived from the log, and SQLite locks a whole file for writing: in the log's file, every
//! fill would hold the chain lock and stall the call path's commits. Apart, the fill locks
//! only its own file, while it reads the log from a snapshot like any reader. A lost lookup
//! file is recreated and refilled from the log; one that no longer matches the log (the log
//! restored from a backup, say) is emptied and refilled (see `engine::lookups`).

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::ConnectOptions as _;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};

use crate::bounded::{Bounded, StoreFile};
use crate::engine::{self, Backend, Conn, SqlStore};
use crate::{OpenOptions, Result, SqliteSync, Store, StoreError, redact_url};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The lookup file's tables, created when the file is (it has no migrations of its own: it
/// can always be rebuilt from the log). Keep in step with ../migrations/postgres/0003 and 0004.
const LOOKUP_SCHEMA: &str = "\
    CREATE TABLE IF NOT EXISTS audit_agent_events (\
        agent TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (agent, seq)) WITHOUT ROWID; \
    CREATE TABLE IF NOT EXISTS audit_task_events (\
        task TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (task, seq)) WITHOUT ROWID; \
    CREATE TABLE IF NOT EXISTS audit_lookup_mark (\
        id INTEGER PRIMARY KEY NOT NULL CHECK (id = 1), \
        through_seq INTEGER NOT NULL, through_hash BLOB NOT NULL); \
    INSERT OR IGNORE INTO audit_lookup_mark (id, through_seq, through_hash) \
        VALUES (1, 0, zeroblob(32));";

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
    /// Readers and the lookup fill: the log with the lookup file attached.
    pool: SqlitePool,
    /// The writer's one connection, to the log alone: `BEGIN IMMEDIATE` locks every attached
    /// file, so a writer with the lookups attached would wait for each fill.
    write_pool: SqlitePool,
    /// The file opened, checked before every write transaction.
    file: Arc<StoreFile>,
}

#[async_trait]
impl Backend for SqliteBackend {
    type Db = sqlx::Sqlite;
    type Conn = SqliteConnection;

    const KIND: &'static str = "sqlite";

    fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    fn write_pool(&self) -> &SqlitePool {
        &self.write_pool
    }

    const INSERT_SKIPPING: (&'static str, &'static str) = ("INSERT OR IGNORE INTO", "");

    fn check_before_write(&self) -> Result<()> {
        self.file.check()
    }

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

    async fn begin_fill(&self, conn: &mut SqliteConnection) -> Result<(), sqlx::Error> {
        // A deferred transaction whose first statement writes the lookup file takes that
        // file's write lock (waiting out another process's fill) and no lock on the log,
        // whose snapshot the fill's first read of it then takes.
        conn.execute_raw("BEGIN; UPDATE lookups.audit_lookup_mark SET id = 1 WHERE id = 1")
            .await
    }

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
    let (store, file) = open_unbounded(url, path, options).await?;
    Ok(Arc::new(Bounded::new(store, options, Some(file))))
}

/// [`open`] without the bound around the store, and the file it opened.
pub(crate) async fn open_unbounded(
    url: &str,
    path: &str,
    options: &OpenOptions,
) -> Result<(SqlStore<SqliteBackend>, Arc<StoreFile>)> {
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
    if !options.create_if_missing && !std::path::Path::new(path).exists() {
        return Err(StoreError::Missing(path.to_string()));
    }
    // The writer's pool migrates: its connection has no lookup file attached, so the
    // migrations see the log's file alone.
    let write_pool = connect(path, options, 1, None).await?;
    MIGRATOR
        .run(&write_pool)
        .await
        .map_err(engine::migrate_error)?;
    let lookups = crate::sqlite_lookups_path(path);
    create_lookups(&lookups, options).await?;
    // One more than the readers need, for the lookup filler.
    let readers = options.max_connections.max(1) + 1;
    let pool = connect(path, options, readers, Some(lookups)).await?;
    // Taken once the file certainly exists (the writer's pool created it if it was missing).
    let file = Arc::new(StoreFile::opened(path)?);
    let backend = SqliteBackend {
        pool,
        write_pool,
        file: Arc::clone(&file),
    };
    Ok((SqlStore::start(backend), file))
}

/// Creates the lookup file at `path` and its tables where missing.
async fn create_lookups(path: &str, options: &OpenOptions) -> Result<()> {
    let unusable = |error: sqlx::Error| {
        StoreError::Unavailable(format!(
            "cannot use the audit lookup file `{path}`: {error} (it holds only what can be \
             rebuilt from the log: remove it and it is refilled)"
        ))
    };
    let mut conn = options_for(path, options)
        // Derived data: recreated whenever it is missing, even where the store itself may not
        // be created (an admin command's).
        .create_if_missing(true)
        // Derived data: a power cut may lose the last fills, which are simply done again.
        .synchronous(SqliteSynchronous::Normal)
        .connect()
        .await
        .map_err(unusable)?;
    conn.execute_raw(LOOKUP_SCHEMA).await.map_err(unusable)?;
    sqlx::Connection::close(conn).await.map_err(unusable)
}

/// How remit connects to the SQLite file at `path`.
fn options_for(path: &str, options: &OpenOptions) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(options.create_if_missing)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(match options.sqlite_sync {
            SqliteSync::Full => SqliteSynchronous::Full,
            SqliteSync::Normal => SqliteSynchronous::Normal,
        })
        // How long a statement waits for another process's lock before SQLite gives up: the
        // operation's own bound, so that the writer is not left waiting after its callers.
        .busy_timeout(options.operation_timeout)
        .foreign_keys(true)
        // Rows cross from the connection's worker thread through a bounded channel; a deep one
        // lets the worker run ahead of a reader (the chain verifier streams the whole table)
        // instead of the two threads waking each other every few rows.
        .row_buffer_size(ROW_BUFFER)
}

/// A pool of up to `size` connections to the file at `path`, each set up as remit needs it,
/// with the lookup file at `lookups` attached as `lookups` if given.
async fn connect(
    path: &str,
    options: &OpenOptions,
    size: u32,
    lookups: Option<String>,
) -> Result<sqlx::SqlitePool> {
    let mut pool = SqlitePoolOptions::new()
        .max_connections(size)
        .acquire_timeout(options.connect_timeout);
    if let Some(lookups) = lookups {
        pool = pool.after_connect(move |conn, _| {
            let lookups = lookups.clone();
            Box::pin(async move {
                sqlx::query("ATTACH DATABASE ? AS lookups")
                    .bind(lookups)
                    .execute(&mut *conn)
                    .await?;
                sqlx::query("PRAGMA lookups.synchronous = NORMAL")
                    .execute(&mut *conn)
                    .await?;
                Ok(())
            })
        });
    }
    pool.connect_with(options_for(path, options))
        .await
        .map_err(|error| StoreError::Unavailable(format!("cannot open `{path}`: {error}")))
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
        let pool = connect(path.to_str().unwrap(), &options, 1, None)
            .await
            .unwrap();
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
