//! The one implementation of [`Store`](crate::Store), written once over a small [`Backend`] seam so
//! that SQLite and PostgreSQL behave identically: the group-commit writer, the audit chain's
//! sealing, the SQL both dialects share and defensive row decoding.
//!
//! Every write goes to one writer task per store. The writer takes whatever is queued (up to
//! [`MAX_BATCH`](writer::MAX_BATCH) operations), runs it all in one transaction that holds the
//! chain lock (`BEGIN IMMEDIATE` on SQLite, an advisory lock on PostgreSQL), reads the chain head
//! inside that transaction, seals each event after it, commits once and only then answers. Each
//! operation runs in its own savepoint so that one failure (a conflict, say) undoes only that
//! operation and does not advance the chain. A batch of nothing but appends (the call path's case)
//! needs no savepoint, since an append conflicts with nothing, and if it fails it is retried the
//! careful way. On SQLite, where each statement is a round trip to the connection's worker thread,
//! such a batch is one round trip when it is sealed after the head this writer last committed and
//! an insert guarded by the head read inside the transaction confirms it, and two (`BEGIN
//! IMMEDIATE` with the head read, then the inserts with the `COMMIT`) when another writer moved the
//! head.
//!
//! Beside the writer, a filler task keeps the audit log's per-agent and per-task lookups up
//! with the log, in transactions of its own that never take the chain lock (see
//! [`fill_lookups`](lookups)): a fill under that lock held up every call's decision commit.
//!
//! This file holds the seam itself ([`Conn`], [`Backend`]) and [`SqlStore`]; the rest is split
//! one job per file: [`writer`] (the writer task, its batches, the chain-lock timing, the
//! stats), [`append`] (sealing and the append fast paths, with their proof spends), [`ops`]
//! (each write operation and its statements), [`lookups`] (the lookup filler), [`rows`] (row
//! mapping and record decoding) and [`reads`] (the [`Store`](crate::Store) trait: the reads,
//! and the writes handed to the writer).

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use audit::Event;
use sqlx::pool::PoolConnection;
use tokio::sync::{mpsc, oneshot};

use crate::{ApprovalRecord, Result, StoreError};

mod append;
mod lookups;
mod ops;
mod reads;
mod rows;
mod writer;

use lookups::Filler;
use ops::{Outcome, WriteOp};
pub(crate) use rows::RowExt;
use writer::{Pending, QUEUE, Writer, WriterCounters};

/// Reads the chain head. Only meaningful inside the write transaction, after the chain lock.
/// A macro so that a backend can `concat!` it after its own `BEGIN`.
macro_rules! head_sql {
    () => {
        "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1"
    };
}
pub(crate) use head_sql;

/// A bind parameter, owned, so that one generic body can drive either backend's query type.
#[derive(Debug)]
pub(crate) enum Arg {
    Text(String),
    OptText(Option<String>),
    Int(i64),
    OptInt(Option<i64>),
    Bytes(Vec<u8>),
    Bool(bool),
}

/// What the engine needs from a connection: run a statement, fetch rows.
#[async_trait]
pub(crate) trait Conn: Send {
    type Row: RowExt + Send;
    /// Whether long statements should use `?` rather than `$n`. SQLite resolves each `$n`
    /// by scanning every parameter name, which makes binding a many-row `INSERT` quadratic.
    const ANONYMOUS_PARAMS: bool;
    /// Whether one query may hold several statements with parameters, run in order in one
    /// round trip and stopping at the first error, and whether parameters left unbound read
    /// as NULL. sqlx's SQLite driver does both, which saves the writer round trips to its
    /// worker thread; PostgreSQL's extended protocol does neither.
    const MULTI_STATEMENT: bool;
    /// A statement that tells other processes a revocation was written (delivered when the
    /// transaction commits), if the backend can.
    const NOTIFY_REVOCATION: Option<&'static str>;
    async fn execute(&mut self, sql: &str, args: Vec<Arg>) -> Result<u64, sqlx::Error>;
    /// Runs `sql` (several statements, no parameters) in one round trip.
    async fn execute_raw(&mut self, sql: &str) -> Result<(), sqlx::Error>;
    /// Streams the rows of `sql` to `each` until it returns `false` or the rows end, without
    /// collecting them.
    async fn for_each_row(
        &mut self,
        sql: &str,
        args: Vec<Arg>,
        each: &mut (dyn for<'r> FnMut(&'r Self::Row) -> bool + Send),
    ) -> Result<(), sqlx::Error>;
    async fn fetch_all(&mut self, sql: &str, args: Vec<Arg>)
    -> Result<Vec<Self::Row>, sqlx::Error>;
    async fn fetch_optional(
        &mut self,
        sql: &str,
        args: Vec<Arg>,
    ) -> Result<Option<Self::Row>, sqlx::Error>;
}

/// Binds owned [`Arg`]s to a concrete sqlx query.
macro_rules! bind_args {
    ($query:expr, $args:expr) => {{
        let mut query = $query;
        for arg in $args {
            query = match arg {
                $crate::engine::Arg::Text(value) => query.bind(value),
                $crate::engine::Arg::OptText(value) => query.bind(value),
                $crate::engine::Arg::Int(value) => query.bind(value),
                $crate::engine::Arg::OptInt(value) => query.bind(value),
                $crate::engine::Arg::Bytes(value) => query.bind(value),
                $crate::engine::Arg::Bool(value) => query.bind(value),
            };
        }
        query
    }};
}
pub(crate) use bind_args;

/// Implements [`Conn`] for a concrete sqlx connection type.
macro_rules! impl_conn {
    ($connection:ty, $row:ty, anonymous_params = $anonymous:literal, multi_statement = $multi:literal, notify_revocation = $notify:expr) => {
        #[async_trait::async_trait]
        impl $crate::engine::Conn for $connection {
            type Row = $row;
            const ANONYMOUS_PARAMS: bool = $anonymous;
            const MULTI_STATEMENT: bool = $multi;
            const NOTIFY_REVOCATION: Option<&'static str> = $notify;

            async fn execute_raw(&mut self, sql: &str) -> Result<(), sqlx::Error> {
                // A bare string has no arguments, which sqlx sends as a simple query: the
                // form in which PostgreSQL accepts several statements.
                sqlx::Executor::execute(&mut *self, sql).await.map(drop)
            }

            async fn for_each_row(
                &mut self,
                sql: &str,
                args: Vec<$crate::engine::Arg>,
                each: &mut (dyn for<'r> FnMut(&'r $row) -> bool + Send),
            ) -> Result<(), sqlx::Error> {
                use futures::TryStreamExt as _;
                let mut rows = $crate::engine::bind_args!(sqlx::query(sql), args).fetch(&mut *self);
                while let Some(row) = rows.try_next().await? {
                    if !each(&row) {
                        break;
                    }
                }
                Ok(())
            }

            async fn execute(
                &mut self,
                sql: &str,
                args: Vec<$crate::engine::Arg>,
            ) -> Result<u64, sqlx::Error> {
                let query = $crate::engine::bind_args!(sqlx::query(sql), args);
                Ok(query.execute(&mut *self).await?.rows_affected())
            }

            async fn fetch_all(
                &mut self,
                sql: &str,
                args: Vec<$crate::engine::Arg>,
            ) -> Result<Vec<$row>, sqlx::Error> {
                $crate::engine::bind_args!(sqlx::query(sql), args)
                    .fetch_all(&mut *self)
                    .await
            }

            async fn fetch_optional(
                &mut self,
                sql: &str,
                args: Vec<$crate::engine::Arg>,
            ) -> Result<Option<$row>, sqlx::Error> {
                $crate::engine::bind_args!(sqlx::query(sql), args)
                    .fetch_optional(&mut *self)
                    .await
            }
        }
    };
}
pub(crate) use impl_conn;

/// What differs between the dialects. Everything else is shared SQL (`$n` placeholders work
/// in both).
#[async_trait]
pub(crate) trait Backend: Send + Sync + 'static {
    type Db: sqlx::Database<Connection = Self::Conn>;
    type Conn: Conn + sqlx::Connection<Database = Self::Db>;

    /// `sqlite` or `postgres`.
    const KIND: &'static str;

    /// Connections for reads, and for the lookup fill.
    fn pool(&self) -> &sqlx::Pool<Self::Db>;

    /// Where the writer takes its connection from.
    fn write_pool(&self) -> &sqlx::Pool<Self::Db> {
        self.pool()
    }

    /// A query returning, for the events from sequence number `$1` on (a page of them, in order),
    /// one text value in the [`unpack_events`](rows::unpack_events) format and the page's last
    /// `seq`, or NULLs past the head. Where rows are expensive to hand over one by one (SQLite
    /// copies every column of every row out of its worker thread), one value per page lets the
    /// verifier go several times faster; the row-by-row path stays the authority whenever a page
    /// does not verify.
    const PACKED_EVENTS_SQL: Option<&'static str> = None;

    /// How an `INSERT … SELECT` that skips rows already present begins and ends. The shared
    /// form is `ON CONFLICT DO NOTHING`; SQLite's `INSERT OR IGNORE` means the same for the
    /// lookups' rows and, unlike it, lets SQLite keep no statement journal (a copy of every
    /// page the statement touches) for an insert of thousands of rows.
    const INSERT_SKIPPING: (&'static str, &'static str) = ("INSERT INTO", "ON CONFLICT DO NOTHING");

    /// Checked before each write transaction: whether the writes can still land where the
    /// store's readers (and everyone else) will look. SQLite checks that its file is still the
    /// one opened, so that no decision is committed into a file removed or replaced meanwhile.
    fn check_before_write(&self) -> Result<()> {
        Ok(())
    }

    /// Starts a transaction for [`fill_lookups`](lookups) that excludes every other fill of the
    /// same lookups but no writer of the chain.
    async fn begin_fill(&self, conn: &mut Self::Conn) -> Result<(), sqlx::Error>;

    /// Starts a write transaction that excludes every other writer of the same chain, in this
    /// process or another, then runs [`head_sql`] in it and returns its row (none for an empty
    /// chain), in as few round trips as the dialect allows.
    async fn begin_write(
        &self,
        conn: &mut Self::Conn,
    ) -> Result<Option<<Self::Conn as Conn>::Row>, sqlx::Error>;
}

/// A [`Store`](crate::Store) over one backend, with its writer task.
pub(crate) struct SqlStore<B: Backend> {
    backend: Arc<B>,
    writer: mpsc::Sender<Pending>,
    /// Written by the writer task, read for [`Store::writer_stats`](crate::Store::writer_stats).
    counters: Arc<WriterCounters>,
    /// See [`Store::revocation_signal`](crate::Store::revocation_signal).
    revocations: Option<Arc<tokio::sync::Notify>>,
    /// Dropped with the store, which ends the task that feeds `revocations`.
    _stop: Option<oneshot::Sender<()>>,
    /// Dropped with the store, which ends the task that fills the audit lookups.
    _stop_filler: oneshot::Sender<()>,
}

impl<B: Backend> fmt::Debug for SqlStore<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlStore")
            .field("kind", &B::KIND)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> SqlStore<B> {
    /// Starts the writer task and the lookup filler on the current Tokio runtime. They end
    /// when the store is dropped.
    pub(crate) fn start(backend: B) -> SqlStore<B> {
        let backend = Arc::new(backend);
        let (writer, queue) = mpsc::channel(QUEUE);
        let counters = Arc::new(WriterCounters::default());
        let task = Writer {
            backend: backend.clone(),
            counters: counters.clone(),
            conn: None,
            known_head: None,
        };
        tokio::spawn(task.run(queue));
        let (stop_filler, stopped) = oneshot::channel();
        let filler = Filler {
            backend: backend.clone(),
            counters: counters.clone(),
            conn: None,
        };
        tokio::spawn(filler.run(stopped));
        SqlStore {
            backend,
            writer,
            counters,
            revocations: None,
            _stop: None,
            _stop_filler: stop_filler,
        }
    }

    /// The store with a revocation signal, fed by a task that ends when `stop`'s sender (kept
    /// by the store) is dropped.
    pub(crate) fn with_revocation_signal(
        mut self,
        signal: Arc<tokio::sync::Notify>,
        stop: oneshot::Sender<()>,
    ) -> SqlStore<B> {
        self.revocations = Some(signal);
        self._stop = Some(stop);
        self
    }

    async fn write(&self, op: WriteOp) -> Result<Outcome> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(Pending { op, reply })
            .await
            .map_err(|_| writer_gone())?;
        answer.await.map_err(|_| writer_gone())?
    }

    /// A write whose answer is the audit event it committed.
    async fn write_event(&self, op: WriteOp) -> Result<Event> {
        match self.write(op).await? {
            Outcome::Event(event) => Ok(event),
            _ => Err(wrong_outcome()),
        }
    }

    /// A write whose answer is the approval it changed, if any.
    async fn write_approval(&self, op: WriteOp) -> Result<Option<ApprovalRecord>> {
        match self.write(op).await? {
            Outcome::Approval(approval) => Ok(approval),
            _ => Err(wrong_outcome()),
        }
    }

    async fn read(&self) -> Result<PoolConnection<B::Db>> {
        self.backend.pool().acquire().await.map_err(db_error)
    }
}

fn writer_gone() -> StoreError {
    StoreError::Unavailable("the store's writer task has stopped".to_string())
}

fn wrong_outcome() -> StoreError {
    StoreError::Unavailable("the store's writer answered a different operation".to_string())
}

/// Decoding problems mean the data is wrong; anything else means the database is unreachable
/// or refused, which the call path must treat as a reason to deny.
pub(crate) fn db_error(error: sqlx::Error) -> StoreError {
    match error {
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_) => StoreError::Corrupt(error.to_string()),
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// Migration failures: an unreachable database, or a schema this build does not know.
pub(crate) fn migrate_error(error: sqlx::migrate::MigrateError) -> StoreError {
    match error {
        sqlx::migrate::MigrateError::Execute(error) => db_error(error),
        other => StoreError::Corrupt(format!(
            "cannot migrate the database: {other} (hint: was it written by a newer remit?)"
        )),
    }
}

#[cfg(test)]
mod test_stores {
    use crate::sqlite::SqliteBackend;

    /// A store on a new SQLite file: the directory (kept alive by the caller), its URL, the
    /// store.
    pub(super) async fn sqlite_store()
    -> (tempfile::TempDir, String, std::sync::Arc<dyn crate::Store>) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("remit.db").display());
        let store = crate::open(&url).await.unwrap();
        (dir, url, store)
    }

    /// A store on a new SQLite file without the bound around it, so that a test can reach its
    /// writer's queue: the directory, the file's URL, the store.
    pub(super) async fn unbounded_sqlite()
    -> (tempfile::TempDir, String, super::SqlStore<SqliteBackend>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("remit.db").display().to_string();
        let url = format!("sqlite://{path}");
        let (store, _) = crate::sqlite::open_unbounded(&url, &path, &crate::OpenOptions::default())
            .await
            .unwrap();
        (dir, url, store)
    }
}
