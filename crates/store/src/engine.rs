//! The one implementation of [`Store`], written once over a small [`Backend`] seam so that
//! SQLite and PostgreSQL behave identically: the group-commit writer, the audit chain's
//! sealing, the SQL both dialects share and defensive row decoding.
//!
//! Every write goes to one writer task per store. The writer takes whatever is queued (up to
//! [`MAX_BATCH`] operations), runs it all in one transaction that holds the chain lock
//! (`BEGIN IMMEDIATE` on SQLite, an advisory lock on PostgreSQL), reads the chain head
//! inside that transaction, seals each event after it, commits once and only then answers.
//! Each operation runs in its own savepoint so that one failure (a conflict, say) undoes
//! only that operation and does not advance the chain. A batch of nothing but appends (the
//! call path's case) needs no savepoint, since an append conflicts with nothing, and if it
//! fails it is retried the careful way. On SQLite, where each statement is a round trip to
//! the connection's worker thread, such a batch is one round trip when it is sealed after the
//! head this writer last committed and an insert guarded by the head read inside the
//! transaction confirms it, and two (`BEGIN IMMEDIATE` with the head read, then the inserts
//! with the `COMMIT`) when another writer moved the head.
//!
//! Beside the writer, a filler task keeps the audit log's per-agent and per-task lookups up
//! with the log, in transactions of its own that never take the chain lock (see
//! [`fill_lookups`]): a fill under that lock held up every call's decision commit.

use std::fmt::{self, Display};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use audit::{ChainBreak, ChainVerifier, Detail, Event, EventBody, GENESIS, Hash, StoredEvent};
use model::{AgentName, AgentStatus, Secret, TaskId, TaskStatus, UnixSeconds};
use serde::de::DeserializeOwned;
use sqlx::pool::PoolConnection;
use sqlx::{ColumnIndex, Decode, Row, Type};
use tokio::sync::{mpsc, oneshot};

use crate::{
    AgentRecord, ApprovalKey, ApprovalRecord, ApprovalStatus, AuditFilter, NewRevocation,
    OperatorRecord, ProofSpend, Result, Revocation, RevocationKind, SigningKeyRecord, Store,
    StoreError, TaskCalls, TaskRecord, WriterStats,
};

/// Most operations one transaction carries. Bounds the time a batch holds the chain lock.
pub(crate) const MAX_BATCH: usize = 512;

/// Most yields the writer makes to let a batch grow before it starts the transaction. More
/// fill the batch closer to the number of callers but cost more than they gain: with 64
/// callers, 4 gave batches of 63 and 93,000 appends/s, 1 gave 52 and 103,000–115,000/s.
const MAX_YIELDS: usize = 2;

/// Queued operations before callers wait to enqueue: back pressure instead of unbounded memory.
const QUEUE: usize = 8192;

/// Most rows `query_events` returns, and what a zero limit means.
const QUERY_CAP: u32 = crate::QUERY_LIMIT_MAX;
/// Tasks per statement when a node settles its call counts (three parameters each), and
/// denials or agents per statement when it shares its containment counts.
const TASK_CALL_CHUNK: usize = 100;
/// How far the agent and task lookups of the audit log may lag the log: a task beside the
/// writer looks this often for events past the lookups' mark and fills them in. Queries read
/// the lag from the log itself, so it bounds their work, not what they see. Each fill
/// rewrites a leaf page per task in flight, however few events it adds: at 100 ms the fills
/// wrote twice as much to the disk as the log itself did, at 1 s under a third of what the
/// log did (BENCHMARKS.md).
const LOOKUP_INTERVAL: Duration = Duration::from_secs(1);
/// Most events one lookup fill takes in, so that a refill of a whole log (a lost lookup file)
/// runs as a series of short transactions.
const LOOKUP_CHUNK: i64 = 10_000;
const QUERY_DEFAULT: u32 = 100;

/// Most rows one page of `events_after` or `revocations_after` returns, and what a zero limit
/// means: pages large enough for fast verification and catch-up, small enough to hold.
const PAGE_CAP: u32 = 10_000;
const PAGE_DEFAULT: u32 = 1_000;

/// Rows per multi-row `INSERT` into `audit_events`. A few fixed sizes keep the number of
/// distinct statements (and so of prepared statements) small whatever the batch size.
const EVENT_CHUNKS: [usize; 4] = [128, 32, 8, 1];

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

    /// A query returning, for the events from sequence number `$1` on (a page of them, in
    /// order), one text value in the [`unpack_events`] format and the page's last `seq`, or
    /// NULLs past the head. Where
    /// rows are expensive to hand over one by one (SQLite copies every column of every row
    /// out of its worker thread), one value per page lets the verifier go several times
    /// faster; the row-by-row path stays the authority whenever a page does not verify.
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

    /// Starts a transaction for [`fill_lookups`] that excludes every other fill of the same
    /// lookups but no writer of the chain.
    async fn begin_fill(&self, conn: &mut Self::Conn) -> Result<(), sqlx::Error>;

    /// Starts a write transaction that excludes every other writer of the same chain, in this
    /// process or another, then runs [`head_sql`] in it and returns its row (none for an empty
    /// chain), in as few round trips as the dialect allows.
    async fn begin_write(
        &self,
        conn: &mut Self::Conn,
    ) -> Result<Option<<Self::Conn as Conn>::Row>, sqlx::Error>;
}

/// A [`Store`] over one backend, with its writer task.
pub(crate) struct SqlStore<B: Backend> {
    backend: Arc<B>,
    writer: mpsc::Sender<Pending>,
    /// Written by the writer task, read for [`Store::writer_stats`].
    counters: Arc<WriterCounters>,
    /// See [`Store::revocation_signal`].
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

/// A state change (with its audit event) or an append, queued for the writer.
#[derive(Debug)]
enum WriteOp {
    InsertAgent(AgentRecord, EventBody),
    SetAgentStatus(AgentName, AgentStatus, EventBody),
    InsertOperator(OperatorRecord, EventBody),
    InsertSigningKey(SigningKeyRecord, EventBody),
    RotateSigningKey {
        new_key: SigningKeyRecord,
        retired_at: UnixSeconds,
        publish_until: UnixSeconds,
        event: EventBody,
    },
    InsertTask(TaskRecord, EventBody),
    FinishTask(TaskId, TaskStatus, EventBody),
    SettleTaskCalls(Vec<(TaskId, TaskCalls)>),
    AddDenials(Vec<(String, i64)>, i64),
    ClearDenials(String),
    InsertRevocation(NewRevocation, EventBody),
    InsertApproval(Box<ApprovalRecord>, EventBody),
    DecideApproval {
        id: String,
        status: ApprovalStatus,
        by: String,
        reason: String,
        now: UnixSeconds,
        event: EventBody,
    },
    ConsumeApproval {
        call: OwnedCall,
        now: UnixSeconds,
        event: EventBody,
    },
    Append(Vec<EventBody>),
    /// See [`Store::heartbeat`].
    Heartbeat(i64),
    /// The operation (an append, a task's insert or end) with a DPoP proof spent in the same
    /// transaction, so that a second spend of the proof fails it: see [`ProofSpend`].
    Spending(ProofSpend, Box<WriteOp>),
    /// Forgets the spent proofs issued before this `iat`.
    SweepProofSpends(i64),
}

/// An [`ApprovalKey`] that can wait in the writer's queue.
#[derive(Debug)]
struct OwnedCall {
    task: String,
    tool: String,
    action: String,
    resource: String,
    args_digest: String,
}

impl OwnedCall {
    fn of(call: ApprovalKey<'_>) -> OwnedCall {
        OwnedCall {
            task: call.task.to_string(),
            tool: call.tool.to_string(),
            action: call.action.to_string(),
            resource: call.resource.to_string(),
            args_digest: call.args_digest.to_string(),
        }
    }

    fn args(&self) -> Vec<Arg> {
        vec![
            Arg::Text(self.task.clone()),
            Arg::Text(self.tool.clone()),
            Arg::Text(self.action.clone()),
            Arg::Text(self.resource.clone()),
            Arg::Text(self.args_digest.clone()),
        ]
    }
}

#[derive(Debug)]
enum Outcome {
    Event(Event),
    Finished(Option<Event>),
    Done,
    Revocation(Revocation, Event),
    Approval(Option<ApprovalRecord>),
    Events(Vec<Event>),
    /// Per agent, its stored denials in the window asked about.
    Denials(Vec<(String, u32)>),
    /// How many spent proofs a sweep forgot.
    Swept(u64),
}

impl Outcome {
    /// What this outcome committed that a reader of the log would take as done: the sequence
    /// numbers of its events, and the id of an approval it changed.
    fn committed(&self, seqs: &mut Vec<u64>, approvals: &mut Vec<String>) {
        match self {
            Outcome::Event(event) | Outcome::Revocation(_, event) => seqs.push(event.seq),
            Outcome::Finished(event) => seqs.extend(event.iter().map(|event| event.seq)),
            Outcome::Events(events) => seqs.extend(events.iter().map(|event| event.seq)),
            Outcome::Approval(approval) => {
                approvals.extend(approval.iter().map(|approval| approval.id.clone()));
            }
            Outcome::Done | Outcome::Denials(_) | Outcome::Swept(_) => {}
        }
    }
}

#[derive(Debug)]
struct Pending {
    op: WriteOp,
    reply: oneshot::Sender<Result<Outcome>>,
}

/// The chain head as read inside the current write transaction.
#[derive(Clone, Copy, Debug)]
struct Head {
    seq: u64,
    hash: Hash,
}

/// [`WriterStats`] as the writer counts them, durations in microseconds. Each counter stands
/// alone (relaxed), except that a counted lookup fill's time is seen with it.
#[derive(Debug, Default)]
struct WriterCounters {
    batches: AtomicU64,
    operations: AtomicU64,
    gathering_us: AtomicU64,
    committing_us: AtomicU64,
    chain_lock_held_us: AtomicU64,
    lookup_fills: AtomicU64,
    lookup_filling_us: AtomicU64,
}

impl WriterCounters {
    fn add_time(counter: &AtomicU64, since: Instant) {
        let micros = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
        counter.fetch_add(micros, Ordering::Relaxed);
    }

    fn snapshot(&self) -> WriterStats {
        let time = |counter: &AtomicU64| Duration::from_micros(counter.load(Ordering::Relaxed));
        WriterStats {
            batches: self.batches.load(Ordering::Relaxed),
            operations: self.operations.load(Ordering::Relaxed),
            gathering: time(&self.gathering_us),
            committing: time(&self.committing_us),
            chain_lock_held: time(&self.chain_lock_held_us),
            lookup_fills: self.lookup_fills.load(Ordering::Acquire),
            lookup_filling: time(&self.lookup_filling_us),
        }
    }
}

struct Writer<B: Backend> {
    backend: Arc<B>,
    counters: Arc<WriterCounters>,
    /// Kept across batches to keep its prepared statements warm; dropped after a failure.
    conn: Option<PoolConnection<B::Db>>,
    /// The chain head this writer last committed, which is still the head unless another
    /// process or replica wrote since: what the next batch is sealed after, speculatively.
    /// `None` after a failure.
    known_head: Option<Head>,
}

impl<B: Backend> Writer<B> {
    async fn run(mut self, mut queue: mpsc::Receiver<Pending>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);

        // `recv_many` waits for the first operation, then takes whatever else is queued:
        // operations that arrive while a commit is in flight share the next one.
        loop {
            let received = queue.recv_many(&mut batch, MAX_BATCH).await;
            if received == 0 {
                break;
            }
            let gathering = Instant::now();
            // Callers woken by the previous commit are runnable but may not have queued their
            // next operation yet. Yield to let them, again while each yield brings more (a
            // few times at most): under load the batch grows to hold them all; idle, this
            // costs one yield.
            for _ in 0..MAX_YIELDS {
                tokio::task::yield_now().await;
                let before = batch.len();
                while batch.len() < MAX_BATCH {
                    match queue.try_recv() {
                        Ok(pending) => batch.push(pending),
                        Err(_) => break,
                    }
                }
                if batch.len() == before || batch.len() == MAX_BATCH {
                    break;
                }
            }
            // A caller that stopped waiting (its timeout passed while the operation queued)
            // was told the store is unavailable: its operation must not happen after all.
            batch.retain(|pending| !pending.reply.is_closed());
            if batch.is_empty() {
                continue;
            }
            let (ops, replies): (Vec<_>, Vec<_>) = batch.drain(..).map(|p| (p.op, p.reply)).unzip();
            WriterCounters::add_time(&self.counters.gathering_us, gathering);
            self.counters.batches.fetch_add(1, Ordering::Relaxed);
            let operations = u64::try_from(ops.len()).unwrap_or(u64::MAX);
            self.counters
                .operations
                .fetch_add(operations, Ordering::Relaxed);
            let committing = Instant::now();
            let committed = self.commit(ops).await;
            WriterCounters::add_time(&self.counters.committing_us, committing);
            match committed {
                Ok(results) => {
                    let (mut seqs, mut approvals) = (Vec::new(), Vec::new());
                    for (reply, result) in replies.into_iter().zip(results) {
                        // A caller that gave up waiting while its operation committed was
                        // refused (a call decision among them: nothing was forwarded).
                        if let Err(Ok(outcome)) = reply.send(result) {
                            outcome.committed(&mut seqs, &mut approvals);
                        }
                    }
                    if !seqs.is_empty() || !approvals.is_empty() {
                        self.record_unanswered(seqs, approvals).await;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, operations = replies.len(), "store write batch failed");
                    for reply in replies {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
        }
    }

    /// Appends a `store.unanswered` event naming the events (and approvals) that committed
    /// after their callers had stopped waiting, so that the log does not read as if what they
    /// recorded (an allowed call, say) took effect: the caller was answered `Unavailable`.
    async fn record_unanswered(&mut self, seqs: Vec<u64>, approvals: Vec<String>) {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| {
                i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
            });
        let detail = Detail::object()
            .strs("approvals", &approvals)
            .value("events", &serde_json::json!(seqs))
            .str(
                "reason",
                "committed after its caller had stopped waiting and been told the store is unavailable",
            )
            .finish();
        let body = EventBody::new(now_ms, audit::kinds::STORE_UNANSWERED, "remit").detail(detail);
        if let Err(error) = self.commit(vec![WriteOp::Append(vec![body])]).await {
            tracing::warn!(%error, events = ?seqs, "cannot record events whose callers gave up");
        }
    }

    /// Runs one batch in one transaction. The outer error fails the whole batch; the inner
    /// results are per operation and final only once the commit succeeded.
    async fn commit(&mut self, ops: Vec<WriteOp>) -> Result<Vec<Result<Outcome>>> {
        self.backend.check_before_write()?;
        let conn = kept_connection(&mut self.conn, self.backend.write_pool()).await?;
        let held = &self.counters.chain_lock_held_us;
        let result =
            transaction(&*self.backend, &mut **conn, &mut self.known_head, ops, held).await;
        if result.is_err() {
            discard_connection(&mut self.conn);
        }
        result
    }
}

/// The connection a long-lived task keeps in `slot` (to keep its prepared statements warm),
/// taken from `pool` first if there is none.
async fn kept_connection<'a, DB: sqlx::Database>(
    slot: &'a mut Option<PoolConnection<DB>>,
    pool: &sqlx::Pool<DB>,
) -> Result<&'a mut PoolConnection<DB>> {
    Ok(match slot {
        Some(conn) => conn,
        None => slot.insert(pool.acquire().await.map_err(db_error)?),
    })
}

/// Closes the connection kept in `slot` after a failure: it may be mid-transaction or broken,
/// so it is never reused or returned to the pool.
fn discard_connection<DB: sqlx::Database>(slot: &mut Option<PoolConnection<DB>>) {
    if let Some(mut conn) = slot.take() {
        conn.close_on_drop();
    }
}

/// Fills the audit log's per-agent and per-task lookups from the log, beside the writer and
/// never under the chain lock: the lookups are derived data, and a fill that held the lock
/// (as one did, in the writer) stalled every call's decision commit for its duration.
struct Filler<B: Backend> {
    backend: Arc<B>,
    counters: Arc<WriterCounters>,
    /// Kept between fills; dropped after a failure.
    conn: Option<PoolConnection<B::Db>>,
}

impl<B: Backend> Filler<B> {
    async fn run(mut self, mut stopped: oneshot::Receiver<()>) {
        let mut tick = tokio::time::interval(LOOKUP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first fill always runs, to check the mark against the log before trusting it.
        let mut checked = false;
        loop {
            tokio::select! {
                _ = &mut stopped => return,
                _ = tick.tick() => {}
            }
            // Chunk after chunk until the lookups reach the log's head (a refill of a whole
            // log takes many), unless the store goes away meanwhile.
            loop {
                match self.fill(checked).await {
                    Ok(more) => {
                        checked = true;
                        if !more {
                            break;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot fill the audit lookups");
                        discard_connection(&mut self.conn);
                        break;
                    }
                }
                if !matches!(stopped.try_recv(), Err(oneshot::error::TryRecvError::Empty)) {
                    return;
                }
            }
        }
    }

    /// One fill, unless `checked` and the lookups are already at the log's head: whether more
    /// events wait past the new mark.
    async fn fill(&mut self, checked: bool) -> Result<bool> {
        let conn = kept_connection(&mut self.conn, self.backend.pool()).await?;
        if checked {
            let row = conn
                .fetch_optional(
                    "SELECT (SELECT through_seq FROM audit_lookup_mark) AS mark, \
                     (SELECT COALESCE(MAX(seq), 0) FROM audit_events) AS head",
                    vec![],
                )
                .await
                .map_err(db_error)?;
            if let Some(row) = row {
                let fields = Fields::keyed_by_int(&row, "audit lookup mark", "mark")?;
                if fields.int("mark")? == fields.int("head")? {
                    return Ok(false);
                }
            }
        }
        let filling = Instant::now();
        let filled = fill_lookups(&*self.backend, &mut **conn).await;
        WriterCounters::add_time(&self.counters.lookup_filling_us, filling);
        // Release: whoever sees this fill counted sees its time too.
        self.counters.lookup_fills.fetch_add(1, Ordering::Release);
        filled
    }
}

async fn transaction<B: Backend>(
    backend: &B,
    conn: &mut B::Conn,
    known_head: &mut Option<Head>,
    ops: Vec<WriteOp>,
    held: &AtomicU64,
) -> Result<Vec<Result<Outcome>>> {
    let expected = known_head.take();
    let ops = match expected {
        Some(expected) if B::Conn::MULTI_STATEMENT => {
            let _locked = ChainLockHeld::from_now(held);
            match appends_in_one_round_trip(conn, expected, ops).await {
                Ok((results, head)) => {
                    *known_head = Some(head);
                    return Ok(results);
                }
                Err(ops) => ops,
            }
        }
        _ => ops,
    };
    let mut head = begin(backend, conn).await?;
    let mut locked = ChainLockHeld::from_now(held);
    let ops = if ops.iter().all(|op| append_parts(op).is_some()) {
        let (spends, appends) = ops.into_iter().filter_map(into_append).unzip();
        match appends_only(conn, head, spends, appends).await {
            Ok((results, head)) => {
                *known_head = Some(head);
                return Ok(results);
            }
            Err((error, spends, appends)) => {
                // Rare: appends conflict with nothing and a proof is spent twice only by a
                // replay, so this is a replayed proof or the database failing, which the
                // careful path below meets again for the operation concerned alone. The
                // transaction may or may not still be open (the failed statement may have
                // been the COMMIT).
                tracing::debug!(%error, "store append batch failed; retrying each append alone");
                let _ = conn.execute("ROLLBACK", vec![]).await;
                drop(locked);
                head = begin(backend, conn).await?;
                locked = ChainLockHeld::from_now(held);
                spends
                    .into_iter()
                    .zip(appends)
                    .map(|(spend, bodies)| from_append(spend, bodies))
                    .collect()
            }
        }
    } else {
        ops
    };
    let mut results = Vec::with_capacity(ops.len());
    let mut ops = ops.into_iter().peekable();
    while let Some(op) = ops.next() {
        match op {
            WriteOp::Append(bodies) => {
                // Consecutive appends cannot conflict with anything, so they share one
                // savepoint and multi-row inserts; on the rare failure each is retried alone.
                let mut run = vec![bodies];
                while let Some(WriteOp::Append(_)) = ops.peek() {
                    if let Some(WriteOp::Append(bodies)) = ops.next() {
                        run.push(bodies);
                    }
                }
                append_run(conn, &mut head, run, &mut results).await?;
            }
            op => results.push(in_savepoint(conn, &mut head, op).await?),
        }
    }
    conn.execute("COMMIT", vec![]).await.map_err(db_error)?;
    drop(locked);
    *known_head = Some(head);
    Ok(results)
}

/// Adds the time from its creation (the moment the chain lock was granted) to its drop (the
/// transaction's end, however it ends) to the writer's `chain_lock_held` counter.
struct ChainLockHeld<'a> {
    counter: &'a AtomicU64,
    since: Instant,
}

impl<'a> ChainLockHeld<'a> {
    fn from_now(counter: &'a AtomicU64) -> ChainLockHeld<'a> {
        ChainLockHeld {
            counter,
            since: Instant::now(),
        }
    }
}

impl Drop for ChainLockHeld<'_> {
    fn drop(&mut self) {
        WriterCounters::add_time(self.counter, self.since);
    }
}

/// Adds up to [`LOOKUP_CHUNK`] events past the lookup mark to the agent and task lookups and
/// moves the mark, in one transaction that excludes other fills but no writer of the chain:
/// whether more events wait past the new mark.
///
/// The mark also keeps the hash of the event it stands at, which commits to the whole log up
/// to it. If the log no longer holds that event (restored from an older backup, say, or
/// replaced), the lookups describe another log: they are emptied and refilled from the start.
/// Until then a query may miss events through them but never returns a wrong one, since it
/// checks each event it finds against the log.
///
/// The fill sees a prefix of the log: on SQLite, one snapshot; on PostgreSQL, events commit
/// in `seq` order under the chain lock, so every event up to the bound read here is visible
/// to the statements after it.
async fn fill_lookups<B: Backend>(backend: &B, conn: &mut B::Conn) -> Result<bool> {
    backend.begin_fill(conn).await.map_err(db_error)?;
    let filled = fill_in_transaction::<B>(conn).await;
    let end = if filled.is_ok() { "COMMIT" } else { "ROLLBACK" };
    match conn.execute(end, vec![]).await {
        Ok(_) => filled,
        Err(error) => filled.and(Err(db_error(error))),
    }
}

/// The statements of [`fill_lookups`] inside its transaction.
async fn fill_in_transaction<B: Backend>(conn: &mut B::Conn) -> Result<bool> {
    let row = conn
        .fetch_optional(
            "SELECT through_seq, through_hash FROM audit_lookup_mark",
            vec![],
        )
        .await
        .map_err(db_error)?
        .ok_or_else(|| StoreError::Corrupt("the audit lookup mark is missing".to_string()))?;
    let (mut mark, mark_hash) = {
        let fields = Fields::keyed_by_int(&row, "audit lookup mark", "through_seq")?;
        (fields.int("through_seq")?, fields.hash("through_hash")?)
    };
    drop(row);
    let matches_the_log = if mark == 0 {
        mark_hash == GENESIS
    } else {
        let at_mark = conn
            .fetch_optional(
                "SELECT seq, hash FROM audit_events WHERE seq = $1",
                vec![Arg::Int(mark)],
            )
            .await
            .map_err(db_error)?
            .map(|row| Fields::keyed_by_int(&row, "audit event", "seq")?.hash("hash"))
            .transpose()?;
        at_mark == Some(mark_hash)
    };
    if !matches_the_log {
        tracing::warn!(
            through_seq = mark,
            "the audit lookups do not match the log; refilling them from the start"
        );
        for sql in [
            "DELETE FROM audit_agent_events",
            "DELETE FROM audit_task_events",
        ] {
            conn.execute(sql, vec![]).await.map_err(db_error)?;
        }
        mark = 0;
    }
    let limit = mark.saturating_add(LOOKUP_CHUNK);
    let Some(row) = conn
        .fetch_optional(
            "SELECT seq, hash FROM audit_events WHERE seq > $1 AND seq <= $2 \
             ORDER BY seq DESC LIMIT 1",
            vec![Arg::Int(mark), Arg::Int(limit)],
        )
        .await
        .map_err(db_error)?
    else {
        if mark == 0 {
            // Emptied above (or already empty): record the empty mark.
            conn.execute(
                "UPDATE audit_lookup_mark SET through_seq = 0, through_hash = $1",
                vec![Arg::Bytes(GENESIS.to_vec())],
            )
            .await
            .map_err(db_error)?;
        }
        return Ok(false);
    };
    let (bound, bound_hash) = {
        let fields = Fields::keyed_by_int(&row, "audit event", "seq")?;
        (fields.int("seq")?, fields.hash("hash")?)
    };
    drop(row);
    let (insert, skip) = B::INSERT_SKIPPING;
    for (table, column) in [
        ("audit_agent_events", "agent"),
        ("audit_task_events", "task"),
    ] {
        let sql = format!(
            "{insert} {table} ({column}, seq) SELECT {column}, seq FROM audit_events \
             WHERE seq > $1 AND seq <= $2 AND {column} IS NOT NULL {skip}"
        );
        conn.execute(&sql, vec![Arg::Int(mark), Arg::Int(bound)])
            .await
            .map_err(db_error)?;
    }
    conn.execute(
        "UPDATE audit_lookup_mark SET through_seq = $1, through_hash = $2",
        vec![Arg::Int(bound), Arg::Bytes(bound_hash.to_vec())],
    )
    .await
    .map_err(db_error)?;
    Ok(bound == limit)
}

/// Starts the write transaction and reads the chain head inside it.
async fn begin<B: Backend>(backend: &B, conn: &mut B::Conn) -> Result<Head> {
    let row = backend.begin_write(conn).await.map_err(db_error)?;
    let Some(row) = row else {
        return Ok(Head {
            seq: 0,
            hash: GENESIS,
        });
    };
    let fields = Fields::keyed_by_int(&row, "audit event", "seq")?;
    Ok(Head {
        seq: fields.u64("seq")?,
        hash: fields.hash("hash")?,
    })
}

/// The common case made cheaper still where one query may hold several statements (SQLite):
/// a batch of appends of up to [`GUARDED_CHUNKS`] × [`PADDED_ROWS`] events, sealed after the
/// head this writer last committed, in one round trip: `BEGIN IMMEDIATE`, one insert per
/// chunk of rows, each kept only if the head read inside the transaction is still the one
/// the chunk was sealed after (so a chunk after one that inserted nothing inserts nothing
/// either), the count each inserted, `COMMIT`. If another writer moved the head, nothing was
/// inserted (an empty transaction commits) and the operations come back for the usual path;
/// likewise on any error.
async fn appends_in_one_round_trip<C: Conn>(
    conn: &mut C,
    expected: Head,
    ops: Vec<WriteOp>,
) -> Result<(Vec<Result<Outcome>>, Head), Vec<WriteOp>> {
    let events_in = |op: &WriteOp| append_parts(op).map(|(_, events)| events);
    let Some(total) = ops.iter().map(events_in).sum::<Option<usize>>() else {
        return Err(ops);
    };
    if total == 0 || total > PADDED_ROWS * GUARDED_CHUNKS {
        return Err(ops);
    }
    let (spends, appends): (Vec<Option<ProofSpend>>, Vec<Vec<EventBody>>) =
        ops.into_iter().filter_map(into_append).unzip();
    let sizes: Vec<usize> = appends.iter().map(Vec::len).collect();
    let mut head = expected;
    let events = seal(&mut head, appends.into_iter().flatten());
    // Each chunk's guard is the head it was sealed after, as the guard reads it back: `seq`, a
    // space, the hash in SQLite's hexadecimal (none for an empty chain).
    let guard = |head: Head| {
        (head.seq > 0).then(|| format!("{} {}", head.seq, audit::to_hex_upper(&head.hash)))
    };
    let mut args = Vec::with_capacity(total.div_ceil(PADDED_ROWS) + events.len() * 10 + 2);
    // Spent proofs first, guarded by the same head: when it moved, they are not spent either.
    let spent = spends_json(&spends);
    if spent.is_some() {
        args.push(Arg::OptText(guard(expected)));
    }
    let mut before = expected;
    // The last chunk may be short: its padding rows' parameters stay unbound, as NULL.
    let built: Result<()> = events.chunks(PADDED_ROWS).try_for_each(|chunk| {
        args.push(Arg::OptText(guard(before)));
        for event in chunk {
            event_args(event, &mut args)?;
        }
        if let Some(last) = chunk.last() {
            before = Head {
                seq: last.seq,
                hash: last.hash,
            };
        }
        Ok(())
    });
    let inserted = match (built, spent) {
        (Ok(()), None) => conn.fetch_all(guarded_insert_sql(total), args).await.ok(),
        (Ok(()), Some(spent)) => {
            args.insert(1, Arg::Text(spent));
            let sql = guarded_insert_sql(total);
            let sql = format!(
                "BEGIN IMMEDIATE; {GUARDED_SPENDS_SQL}{}",
                sql.strip_prefix("BEGIN IMMEDIATE; ").unwrap_or(sql)
            );
            conn.fetch_all(&sql, args).await.ok()
        }
        (Err(_), _) => None,
    };
    // One `changes()` row per chunk.
    let inserted = inserted.map(|rows| {
        rows.iter()
            .map(|row| row.int_at(0).ok())
            .sum::<Option<i64>>()
    });
    let mut events = events.into_iter();
    if inserted == Some(i64::try_from(total).ok()) {
        let results = sizes
            .into_iter()
            .map(|size| Ok(Outcome::Events(events.by_ref().take(size).collect())))
            .collect();
        return Ok((results, head));
    }
    if inserted.is_none() {
        // An error: the transaction may still be open.
        let _ = conn.execute("ROLLBACK", vec![]).await;
    }
    let mut bodies = events.map(|event| event.body);
    Err(sizes
        .into_iter()
        .zip(spends)
        .map(|(size, spend)| from_append(spend, bodies.by_ref().take(size).collect()))
        .collect())
}

/// Chunks of [`PADDED_ROWS`] rows that [`appends_in_one_round_trip`] sends at most: enough
/// for a batch that carries a few milliseconds of deferred call outcomes under load.
const GUARDED_CHUNKS: usize = 4;

/// The room a padded insert has for a chunk of rows, the smallest that holds them: each
/// padding row still costs SQLite its parameters' clearing and a pass of the insert, which at
/// 128 rows was most of the insert's work for a batch of one event.
const PADDED_SHAPES: [usize; 6] = [4, 16, 32, 64, 96, PADDED_ROWS];

/// The index in [`PADDED_SHAPES`] of the shape that holds `rows` (at most [`PADDED_ROWS`]).
fn padded_shape(rows: usize) -> usize {
    PADDED_SHAPES
        .iter()
        .position(|&room| room >= rows)
        .unwrap_or(PADDED_SHAPES.len() - 1)
}

/// `rows` rows of ten anonymous parameters, for `VALUES`.
fn padded_values(rows: usize) -> String {
    vec![format!("({})", ["?"; 10].join(", ")); rows].join(", ")
}

/// [`appends_in_one_round_trip`]'s statements for `total` events (1 to [`GUARDED_CHUNKS`] ×
/// [`PADDED_ROWS`]): full chunks of [`PADDED_ROWS`] rows, the last one in its
/// [`PADDED_SHAPES`] shape. In each insert the guard comes first, so that its parameter is
/// the chunk's first one, and the padding rows' parameters of the last chunk, at the very end,
/// can stay unbound.
///
/// `OR ROLLBACK` keeps SQLite from keeping a statement journal (a copy of every page the
/// insert touches, made so that one failing row of a multi-row insert can be undone alone):
/// the transaction holds these inserts alone, so a failing row may take all of it. The guard
/// is a scalar subquery, evaluated once, rather than a join with the rows.
fn guarded_insert_sql(total: usize) -> &'static str {
    static SQL: OnceLock<Vec<Vec<String>>> = OnceLock::new();
    let all = SQL.get_or_init(|| {
        let insert = |rows: usize| {
            format!(
                "WITH head (unmoved) AS (SELECT ({}) IS ?) \
                 INSERT OR ROLLBACK INTO audit_events ({EVENT_COLUMNS}) \
                 SELECT batch.* FROM (VALUES {}) AS batch \
                 WHERE batch.column1 IS NOT NULL AND (SELECT unmoved FROM head); \
                 SELECT changes(); ",
                "SELECT seq || ' ' || hex(hash) FROM audit_events ORDER BY seq DESC LIMIT 1",
                padded_values(rows)
            )
        };
        let full = insert(PADDED_ROWS);
        (1..=GUARDED_CHUNKS)
            .map(|chunks| {
                PADDED_SHAPES
                    .iter()
                    .map(|&rows| {
                        let leading = full.repeat(chunks - 1);
                        format!("BEGIN IMMEDIATE; {leading}{}COMMIT", insert(rows))
                    })
                    .collect()
            })
            .collect()
    });
    let chunks = total.div_ceil(PADDED_ROWS).clamp(1, GUARDED_CHUNKS);
    let last_rows = total.saturating_sub((chunks - 1) * PADDED_ROWS);
    all.get(chunks - 1)
        .and_then(|shapes| shapes.get(padded_shape(last_rows)))
        .map_or("", String::as_str)
}

/// A batch of nothing but appends, the call path's common case: no savepoint (an append
/// conflicts with nothing, so there is nothing to undo alone), and on SQLite the last insert
/// and the COMMIT share one round trip. On failure the bodies come back, to be retried one
/// append per savepoint.
async fn appends_only<C: Conn>(
    conn: &mut C,
    mut head: Head,
    spends: Vec<Option<ProofSpend>>,
    appends: Vec<Vec<EventBody>>,
) -> Result<(Vec<Result<Outcome>>, Head), (StoreError, Vec<Option<ProofSpend>>, Vec<Vec<EventBody>>)>
{
    let sizes: Vec<usize> = appends.iter().map(Vec::len).collect();
    let events = seal(&mut head, appends.into_iter().flatten());
    let spent = match spends_json(&spends) {
        Some(spent) => insert_spends::<C>(conn, spent).await,
        None => Ok(()),
    };
    let inserted = match spent {
        Ok(()) => insert_events(conn, &events, C::MULTI_STATEMENT).await,
        Err(error) => Err(error),
    };
    let inserted = match inserted {
        Ok(()) if !C::MULTI_STATEMENT => conn
            .execute("COMMIT", vec![])
            .await
            .map(drop)
            .map_err(db_error),
        other => other,
    };
    let mut events = events.into_iter();
    match inserted {
        Ok(()) => Ok((
            sizes
                .into_iter()
                .map(|size| Ok(Outcome::Events(events.by_ref().take(size).collect())))
                .collect(),
            head,
        )),
        Err(error) => {
            let mut bodies = events.map(|event| event.body);
            let appends = sizes
                .into_iter()
                .map(|size| bodies.by_ref().take(size).collect())
                .collect();
            Err((error, spends, appends))
        }
    }
}

/// Runs one operation in its own savepoint. `Err` means the transaction itself failed.
async fn in_savepoint<C: Conn>(
    conn: &mut C,
    head: &mut Head,
    op: WriteOp,
) -> Result<Result<Outcome>> {
    conn.execute("SAVEPOINT remit_op", vec![])
        .await
        .map_err(db_error)?;
    let before = *head;
    let outcome = apply(conn, head, op).await;
    if outcome.is_err() {
        *head = before;
        conn.execute("ROLLBACK TO SAVEPOINT remit_op", vec![])
            .await
            .map_err(db_error)?;
    }
    conn.execute("RELEASE SAVEPOINT remit_op", vec![])
        .await
        .map_err(db_error)?;
    Ok(outcome)
}

async fn append_run<C: Conn>(
    conn: &mut C,
    head: &mut Head,
    run: Vec<Vec<EventBody>>,
    results: &mut Vec<Result<Outcome>>,
) -> Result<()> {
    let sizes: Vec<usize> = run.iter().map(Vec::len).collect();
    let before = *head;
    conn.execute("SAVEPOINT remit_run", vec![])
        .await
        .map_err(db_error)?;
    let events = seal(head, run.into_iter().flatten());
    match insert_events(conn, &events, false).await {
        Ok(()) => {
            conn.execute("RELEASE SAVEPOINT remit_run", vec![])
                .await
                .map_err(db_error)?;
            let mut events = events.into_iter();
            for size in sizes {
                results.push(Ok(Outcome::Events(events.by_ref().take(size).collect())));
            }
        }
        Err(_) => {
            *head = before;
            conn.execute("ROLLBACK TO SAVEPOINT remit_run", vec![])
                .await
                .map_err(db_error)?;
            conn.execute("RELEASE SAVEPOINT remit_run", vec![])
                .await
                .map_err(db_error)?;
            let mut bodies = events.into_iter().map(|event| event.body);
            for size in sizes {
                let op = WriteOp::Append(bodies.by_ref().take(size).collect());
                results.push(in_savepoint(conn, head, op).await?);
            }
        }
    }
    Ok(())
}

/// Chains `bodies` after `head`, advancing it.
fn seal(head: &mut Head, bodies: impl IntoIterator<Item = EventBody>) -> Vec<Event> {
    let bodies = bodies.into_iter();
    let mut events = Vec::with_capacity(bodies.size_hint().0);
    let mut scratch = Vec::new();
    for body in bodies {
        let event = Event::seal_in(head.seq + 1, head.hash, body, &mut scratch);
        *head = Head {
            seq: event.seq,
            hash: event.hash,
        };
        events.push(event);
    }
    events
}

async fn append_one<C: Conn>(conn: &mut C, head: &mut Head, body: EventBody) -> Result<Event> {
    let mut events = seal(head, [body]);
    insert_events(conn, &events, false).await?;
    events.pop().ok_or_else(wrong_outcome)
}

/// Inserts `events` in multi-row statements; with `commit`
/// (only where [`Conn::MULTI_STATEMENT`]) the last one also commits, in the same round trip.
async fn insert_events<C: Conn>(conn: &mut C, events: &[Event], commit: bool) -> Result<()> {
    let mut rest = events;
    while !rest.is_empty() {
        let (rows, padded) = if C::MULTI_STATEMENT {
            // A few statement shapes whatever the count: unbound parameters read as NULL and
            // the statement skips rows without a `seq`, so a short chunk needs no shape of
            // its own (and no prepare, and no eviction from the statement cache).
            (rest.len().min(PADDED_ROWS), true)
        } else {
            let rows = EVENT_CHUNKS
                .into_iter()
                .find(|&size| size <= rest.len())
                .unwrap_or(1);
            (rows, false)
        };
        let (chunk, tail) = rest.split_at(rows);
        let mut args = Vec::with_capacity(rows * 10);
        for event in chunk {
            event_args(event, &mut args)?;
        }
        let sql = if padded {
            padded_insert_sql(rows, commit && tail.is_empty())
        } else {
            insert_events_sql(rows, C::ANONYMOUS_PARAMS)
        };
        conn.execute(sql, args).await.map_err(db_error)?;
        rest = tail;
    }
    Ok(())
}

/// Rows in the one multi-row `INSERT` used where unbound parameters read as NULL.
const PADDED_ROWS: usize = 128;

fn padded_insert_sql(rows: usize, commit: bool) -> &'static str {
    static SQL: OnceLock<Vec<[String; 2]>> = OnceLock::new();
    let all = SQL.get_or_init(|| {
        PADDED_SHAPES
            .iter()
            .map(|&room| {
                let plain = format!(
                    "INSERT INTO audit_events ({EVENT_COLUMNS}) \
                     SELECT * FROM (VALUES {}) WHERE column1 IS NOT NULL",
                    padded_values(room)
                );
                let committing = format!("{plain}; COMMIT");
                [plain, committing]
            })
            .collect()
    });
    match all.get(padded_shape(rows)) {
        Some([_, committing]) if commit => committing,
        Some([plain, _]) => plain,
        None => "",
    }
}

fn insert_events_sql(rows: usize, anonymous: bool) -> &'static str {
    static NUMBERED: OnceLock<Vec<(usize, String)>> = OnceLock::new();
    static ANONYMOUS: OnceLock<Vec<(usize, String)>> = OnceLock::new();
    let build = || {
        EVENT_CHUNKS
            .iter()
            .map(|&rows| {
                let values: Vec<String> = (0..rows)
                    .map(|row| {
                        let params: Vec<String> = (1..=10)
                            .map(|col| {
                                if anonymous {
                                    "?".to_string()
                                } else {
                                    format!("${}", row * 10 + col)
                                }
                            })
                            .collect();
                        format!("({})", params.join(", "))
                    })
                    .collect();
                let sql = format!(
                    "INSERT INTO audit_events ({EVENT_COLUMNS}) VALUES {}",
                    values.join(", ")
                );
                (rows, sql)
            })
            .collect()
    };
    let all = if anonymous {
        ANONYMOUS.get_or_init(build)
    } else {
        NUMBERED.get_or_init(build)
    };
    all.iter()
        .find(|(size, _)| *size == rows)
        .map_or("", |(_, sql)| sql.as_str())
}

fn event_args(event: &Event, args: &mut Vec<Arg>) -> Result<()> {
    args.extend([
        Arg::Int(to_i64(event.seq, "audit event")?),
        Arg::Int(event.body.time_ms),
        Arg::Text(event.body.kind.clone()),
        Arg::Text(event.body.actor.clone()),
        Arg::OptText(event.body.agent.clone()),
        Arg::OptText(event.body.task.clone()),
        Arg::OptText(event.body.decision.clone()),
        Arg::Text(event.body.detail.as_str().to_owned()),
        Arg::Bytes(event.prev_hash.to_vec()),
        Arg::Bytes(event.hash.to_vec()),
    ]);
    Ok(())
}

fn to_i64(value: u64, what: &str) -> Result<i64> {
    i64::try_from(value)
        .map_err(|_| StoreError::Corrupt(format!("{what} number `{value}` is out of range")))
}

fn to_json(value: &impl serde::Serialize, what: &str) -> Result<String> {
    serde_json::to_string(value)
        .map_err(|error| StoreError::Corrupt(format!("cannot encode {what}: {error}")))
}

/// One operation's statements. Runs inside a savepoint: an error undoes them all.
async fn apply<C: Conn>(conn: &mut C, head: &mut Head, op: WriteOp) -> Result<Outcome> {
    match op {
        WriteOp::InsertAgent(agent, event) => {
            let args = vec![
                Arg::Text(agent.name.to_string()),
                Arg::Text(agent.spiffe_id.to_string()),
                Arg::Text(agent.owner.to_string()),
                Arg::Text(agent.status.as_str().to_string()),
                Arg::Text(to_json(&agent.keys, "agent keys")?),
                Arg::Int(agent.created_at),
            ];
            conn.execute(
                "INSERT INTO agents (name, spiffe_id, owner, status, keys, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
                args,
            )
            .await
            .map_err(|error| conflict_or(error, "agent", agent.name.as_str()))?;
            Ok(Outcome::Event(append_one(conn, head, event).await?))
        }
        WriteOp::SetAgentStatus(name, status, event) => {
            let args = vec![
                Arg::Text(status.as_str().to_string()),
                Arg::Text(name.to_string()),
            ];
            let changed = conn
                .execute("UPDATE agents SET status = $1 WHERE name = $2", args)
                .await
                .map_err(db_error)?;
            if changed == 0 {
                return Err(StoreError::NotFound {
                    what: "agent",
                    key: name.to_string(),
                });
            }
            Ok(Outcome::Event(append_one(conn, head, event).await?))
        }
        WriteOp::InsertOperator(operator, event) => {
            let args = vec![
                Arg::Text(operator.id.clone()),
                Arg::Text(operator.name.clone()),
                Arg::Text(operator.role.as_str().to_string()),
                Arg::Bytes(operator.token_hash.to_vec()),
                Arg::Int(operator.created_at),
                Arg::Bool(operator.disabled),
            ];
            conn.execute(
                "INSERT INTO operators (id, name, role, token_hash, created_at, disabled) VALUES ($1, $2, $3, $4, $5, $6)",
                args,
            )
            .await
            .map_err(|error| conflict_or(error, "operator", &operator.id))?;
            Ok(Outcome::Event(append_one(conn, head, event).await?))
        }
        WriteOp::InsertSigningKey(key, event) => {
            if key.retired_at.is_none() {
                let current = conn
                    .fetch_optional(
                        "SELECT kid FROM signing_keys WHERE retired_at IS NULL",
                        vec![],
                    )
                    .await
                    .map_err(db_error)?;
                if let Some(row) = current {
                    let kid = Fields::keyed_by_text(&row, "signing key", "kid")?.key;
                    return Err(StoreError::Conflict {
                        what: "current signing key",
                        key: kid,
                    });
                }
            }
            insert_signing_key(conn, &key, key.retired_at, key.publish_until).await?;
            announce_keys(conn).await?;
            Ok(Outcome::Event(append_one(conn, head, event).await?))
        }
        WriteOp::RotateSigningKey {
            new_key,
            retired_at,
            publish_until,
            event,
        } => {
            conn.execute(
                "UPDATE signing_keys SET retired_at = $1, publish_until = $2 WHERE retired_at IS NULL",
                vec![Arg::Int(retired_at), Arg::Int(publish_until)],
            )
            .await
            .map_err(db_error)?;
            // The new key is current whatever its record says: that is what rotating means.
            insert_signing_key(conn, &new_key, None, None).await?;
            announce_keys(conn).await?;
            Ok(Outcome::Event(append_one(conn, head, event).await?))
        }
        WriteOp::InsertTask(task, event) => {
            insert_task(conn, &task).await?;
            Ok(Outcome::Event(append_one(conn, head, event).await?))
        }
        WriteOp::FinishTask(id, to, event) => {
            let changed = if to == TaskStatus::Active {
                0
            } else {
                conn.execute(
                    "UPDATE tasks SET status = $1 WHERE id = $2 AND status = 'active'",
                    vec![
                        Arg::Text(to.as_str().to_string()),
                        Arg::Text(id.to_string()),
                    ],
                )
                .await
                .map_err(db_error)?
            };
            if changed == 0 {
                let exists = conn
                    .fetch_optional(
                        "SELECT id FROM tasks WHERE id = $1",
                        vec![Arg::Text(id.to_string())],
                    )
                    .await
                    .map_err(db_error)?;
                return match exists {
                    Some(_) => Ok(Outcome::Finished(None)),
                    None => Err(StoreError::NotFound {
                        what: "task",
                        key: id.to_string(),
                    }),
                };
            }
            Ok(Outcome::Finished(Some(
                append_one(conn, head, event).await?,
            )))
        }
        WriteOp::SettleTaskCalls(counts) => {
            settle_task_calls(conn, &counts).await?;
            Ok(Outcome::Done)
        }
        WriteOp::AddDenials(denials, since_ms) => Ok(Outcome::Denials(
            add_denials(conn, &denials, since_ms).await?,
        )),
        WriteOp::ClearDenials(agent) => {
            conn.execute(
                "DELETE FROM containment_denials WHERE agent = $1",
                vec![Arg::Text(agent)],
            )
            .await
            .map_err(db_error)?;
            Ok(Outcome::Done)
        }
        WriteOp::Heartbeat(now_ms) => {
            conn.execute(
                "UPDATE store_heartbeat SET written_ms = $1 WHERE id = 1",
                vec![Arg::Int(now_ms)],
            )
            .await
            .map_err(db_error)?;
            Ok(Outcome::Done)
        }
        WriteOp::InsertRevocation(revocation, event) => {
            let args = vec![
                Arg::Text(revocation.kind.as_str().to_string()),
                Arg::Text(revocation.target.clone()),
                Arg::Text(revocation.reason.clone()),
                Arg::Int(revocation.created_at),
            ];
            let row = conn
                .fetch_optional(
                    "INSERT INTO revocations (kind, target, reason, created_at) VALUES ($1, $2, $3, $4) RETURNING seq",
                    args,
                )
                .await
                .map_err(db_error)?
                .ok_or_else(wrong_outcome)?;
            let seq = Fields::keyed_by_int(&row, "revocation", "seq")?.int("seq")?;
            if let Some(notify) = C::NOTIFY_REVOCATION {
                conn.execute(notify, vec![]).await.map_err(db_error)?;
            }
            let event = append_one(conn, head, event).await?;
            let NewRevocation {
                kind,
                target,
                reason,
                created_at,
            } = revocation;
            Ok(Outcome::Revocation(
                Revocation {
                    seq,
                    kind,
                    target,
                    reason,
                    created_at,
                },
                event,
            ))
        }
        WriteOp::InsertApproval(approval, event) => {
            insert_approval(conn, &approval).await?;
            Ok(Outcome::Event(append_one(conn, head, event).await?))
        }
        WriteOp::DecideApproval {
            id,
            status,
            by,
            reason,
            now,
            event,
        } => {
            let changed = conn
                .execute(
                    "UPDATE approvals SET status = $1, decided_by = $2, decision_reason = $3, decided_at = $4 \
                     WHERE id = $5 AND status = 'pending' AND expires_at > $4",
                    vec![
                        Arg::Text(status.as_str().to_string()),
                        Arg::Text(by),
                        Arg::Text(reason),
                        Arg::Int(now),
                        Arg::Text(id.clone()),
                    ],
                )
                .await
                .map_err(db_error)?;
            if changed == 0 {
                return Ok(Outcome::Approval(None));
            }
            let approval = select_approval(conn, &id)
                .await?
                .ok_or_else(wrong_outcome)?;
            append_one(conn, head, event).await?;
            Ok(Outcome::Approval(Some(approval)))
        }
        WriteOp::ConsumeApproval {
            call,
            now,
            mut event,
        } => {
            // The writer holds the chain lock (in every process sharing the store), so the
            // row found here cannot be spent by anyone else before the update below; the
            // status condition on the update is a second guard.
            let sql = format!(
                "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE task = $1 AND tool = $2 AND action = $3 \
                 AND resource = $4 AND args_digest = $5 AND status = 'approved' AND expires_at > $6 \
                 ORDER BY created_at, id LIMIT 1"
            );
            let mut args = call.args();
            args.push(Arg::Int(now));
            let Some(row) = conn.fetch_optional(&sql, args).await.map_err(db_error)? else {
                return Ok(Outcome::Approval(None));
            };
            let mut approval = approval_from_row(&row)?;
            let changed = conn
                .execute(
                    "UPDATE approvals SET status = 'consumed' WHERE id = $1 AND status = 'approved'",
                    vec![Arg::Text(approval.id.clone())],
                )
                .await
                .map_err(db_error)?;
            if changed == 0 {
                return Ok(Outcome::Approval(None));
            }
            approval.status = ApprovalStatus::Consumed;
            let mut detail = event.detail.to_value();
            if let serde_json::Value::Object(fields) = &mut detail {
                fields.insert("approval".to_string(), approval.id.clone().into());
            }
            event.detail = Detail::from_value(&detail);
            append_one(conn, head, event).await?;
            Ok(Outcome::Approval(Some(approval)))
        }
        WriteOp::Append(bodies) => {
            let events = seal(head, bodies);
            insert_events(conn, &events, false).await?;
            Ok(Outcome::Events(events))
        }
        WriteOp::Spending(spend, op) => {
            let spent = spends_json(&[Some(spend)]).ok_or_else(wrong_outcome)?;
            insert_spends::<C>(conn, spent).await?;
            Box::pin(apply(conn, head, *op)).await
        }
        WriteOp::SweepProofSpends(before_iat) => {
            let removed = conn
                .execute(
                    "DELETE FROM proof_spends WHERE iat < $1",
                    vec![Arg::Int(before_iat)],
                )
                .await
                .map_err(db_error)?;
            Ok(Outcome::Swept(removed))
        }
    }
}

/// [`Store::settle_task_calls`]: one statement per chunk of tasks instead of a statement (and
/// a savepoint) per task, so that a busy node's counts do not hold the writer for long. Each
/// count replaces the stored one only if it reaches further into the log, so that counts
/// settled by several nodes, in any order, only move forward.
async fn settle_task_calls<C: Conn>(conn: &mut C, counts: &[(TaskId, TaskCalls)]) -> Result<()> {
    for chunk in counts.chunks(TASK_CALL_CHUNK) {
        let mut args = Vec::with_capacity(chunk.len() * 3);
        let mut rows = Vec::with_capacity(chunk.len());
        for (id, calls) in chunk {
            args.push(Arg::Text(id.to_string()));
            args.push(Arg::Int(i64::from(calls.used)));
            args.push(Arg::Int(to_i64(calls.through_seq, "audit event")?));
            rows.push(format!(
                "(${}, ${}, ${})",
                args.len() - 2,
                args.len() - 1,
                args.len()
            ));
        }
        let sql = format!(
            "UPDATE tasks SET calls_used = d.column2, calls_seq = d.column3 \
             FROM (VALUES {}) AS d WHERE tasks.id = d.column1 AND tasks.calls_seq < d.column3",
            rows.join(", ")
        );
        conn.execute(&sql, args).await.map_err(db_error)?;
    }
    Ok(())
}

/// Tells other processes that the signing keys changed, on the revocations' channel (delivered
/// when the transaction commits): a replica that hears it re-reads its keys as well as the
/// revocation feed, so that tokens signed with a new key verify there at once.
async fn announce_keys<C: Conn>(conn: &mut C) -> Result<()> {
    if let Some(notify) = C::NOTIFY_REVOCATION {
        conn.execute(notify, vec![]).await.map_err(db_error)?;
    }
    Ok(())
}

/// [`Store::add_denials`]: the new rows, the rows that left every window, then the sums for
/// the agents named, all in the writer's transaction so that each node's answer includes
/// every denial another node added before it.
async fn add_denials<C: Conn>(
    conn: &mut C,
    denials: &[(String, i64)],
    since_ms: i64,
) -> Result<Vec<(String, u32)>> {
    for chunk in denials.chunks(TASK_CALL_CHUNK) {
        let mut args = Vec::with_capacity(chunk.len() * 2);
        let mut rows = Vec::with_capacity(chunk.len());
        for (agent, time_ms) in chunk {
            args.push(Arg::Text(agent.clone()));
            args.push(Arg::Int(*time_ms));
            rows.push(format!("(${}, ${})", args.len() - 1, args.len()));
        }
        let sql = format!(
            "INSERT INTO containment_denials (agent, time_ms) VALUES {}",
            rows.join(", ")
        );
        conn.execute(&sql, args).await.map_err(db_error)?;
    }
    conn.execute(
        "DELETE FROM containment_denials WHERE time_ms < $1",
        vec![Arg::Int(since_ms)],
    )
    .await
    .map_err(db_error)?;
    let mut agents: Vec<&str> = denials.iter().map(|(agent, _)| agent.as_str()).collect();
    agents.sort_unstable();
    agents.dedup();
    let mut sums = Vec::with_capacity(agents.len());
    for chunk in agents.chunks(TASK_CALL_CHUNK) {
        let mut args = vec![Arg::Int(since_ms)];
        let mut names = Vec::with_capacity(chunk.len());
        for agent in chunk {
            args.push(Arg::Text((*agent).to_string()));
            names.push(format!("${}", args.len()));
        }
        let sql = format!(
            "SELECT agent, COUNT(*) AS denials FROM containment_denials \
             WHERE time_ms >= $1 AND agent IN ({}) GROUP BY agent ORDER BY agent",
            names.join(", ")
        );
        for row in conn.fetch_all(&sql, args).await.map_err(db_error)? {
            let fields = Fields::keyed_by_text(&row, "containment denials", "agent")?;
            let denials = fields.int("denials")?;
            sums.push((
                fields.key.clone(),
                u32::try_from(denials).unwrap_or(u32::MAX),
            ));
        }
    }
    Ok(sums)
}

/// Whether `op` can take an append fast path: an append, alone or spending a proof. Its spend
/// and its number of events.
fn append_parts(op: &WriteOp) -> Option<(Option<ProofSpend>, usize)> {
    match op {
        WriteOp::Append(bodies) => Some((None, bodies.len())),
        WriteOp::Spending(spend, op) => match &**op {
            WriteOp::Append(bodies) => Some((Some(*spend), bodies.len())),
            _ => None,
        },
        _ => None,
    }
}

/// An operation that [`append_parts`] accepts, taken apart.
fn into_append(op: WriteOp) -> Option<(Option<ProofSpend>, Vec<EventBody>)> {
    match op {
        WriteOp::Append(bodies) => Some((None, bodies)),
        WriteOp::Spending(spend, op) => match *op {
            WriteOp::Append(bodies) => Some((Some(spend), bodies)),
            _ => None,
        },
        _ => None,
    }
}

/// [`into_append`] undone.
fn from_append(spend: Option<ProofSpend>, bodies: Vec<EventBody>) -> WriteOp {
    match spend {
        Some(spend) => WriteOp::Spending(spend, Box::new(WriteOp::Append(bodies))),
        None => WriteOp::Append(bodies),
    }
}

/// The spent proofs among `spends` as one JSON array of `[iat, "digest"]` pairs, the one
/// parameter of the statements that insert them (one statement shape whatever their number),
/// or `None` when there are none.
fn spends_json(spends: &[Option<ProofSpend>]) -> Option<String> {
    let mut text = String::from("[");
    for spend in spends.iter().flatten() {
        if text.len() > 1 {
            text.push(',');
        }
        text.push_str(&format!(
            "[{},\"{}\"]",
            spend.iat,
            audit::to_hex(&spend.digest)
        ));
    }
    (text.len() > 1).then(|| text + "]")
}

/// Inserts the spent proofs of [`spends_json`] text: `Conflict` (`what` = `"proof"`) when one
/// of them was already spent, in this transaction or an earlier one.
async fn insert_spends<C: Conn>(conn: &mut C, spent: String) -> Result<()> {
    // SQLite, the dialect that runs several statements in one query, reads the pairs with
    // `json_each`; PostgreSQL with `jsonb_array_elements`.
    let sql = if C::MULTI_STATEMENT {
        "INSERT INTO proof_spends (iat, proof) \
         SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?)"
    } else {
        "INSERT INTO proof_spends (iat, proof) \
         SELECT (pair ->> 0)::bigint, pair ->> 1 FROM jsonb_array_elements($1::jsonb) AS pair"
    };
    conn.execute(sql, vec![Arg::Text(spent)])
        .await
        .map(drop)
        .map_err(|error| conflict_or(error, "proof", "already spent"))
}

/// [`insert_spends`] for [`appends_in_one_round_trip`] (SQLite): its first parameter is the
/// head the batch was sealed after, and nothing is inserted if the head moved. `OR ROLLBACK`
/// for the same reason as the events' inserts: a proof spent twice fails the whole batch,
/// which is then retried the careful way, operation by operation.
const GUARDED_SPENDS_SQL: &str = "WITH head (unmoved) AS (SELECT (SELECT seq || ' ' || hex(hash) \
     FROM audit_events ORDER BY seq DESC LIMIT 1) IS ?) \
     INSERT OR ROLLBACK INTO proof_spends (iat, proof) \
     SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?) \
     WHERE (SELECT unmoved FROM head); ";

async fn insert_approval<C: Conn>(conn: &mut C, approval: &ApprovalRecord) -> Result<()> {
    let args = vec![
        Arg::Text(approval.id.clone()),
        Arg::Text(approval.task.to_string()),
        Arg::Text(approval.agent.to_string()),
        Arg::Text(approval.owner.to_string()),
        Arg::Text(approval.tool.clone()),
        Arg::Text(approval.action.clone()),
        Arg::Text(approval.resource.clone()),
        Arg::Text(approval.args_digest.clone()),
        Arg::Text(approval.status.as_str().to_string()),
        Arg::Int(approval.created_at),
        Arg::Int(approval.expires_at),
        Arg::OptText(approval.decided_by.clone()),
        Arg::OptText(approval.decision_reason.clone()),
        Arg::OptInt(approval.decided_at),
    ];
    conn.execute(
        &format!(
            "INSERT INTO approvals ({APPROVAL_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
        ),
        args,
    )
    .await
    .map_err(|error| {
        if is_foreign_key_violation(&error) {
            StoreError::NotFound {
                what: "task",
                key: approval.task.to_string(),
            }
        } else {
            conflict_or(error, "approval", &approval.id)
        }
    })?;
    Ok(())
}

async fn select_approval<C: Conn>(conn: &mut C, id: &str) -> Result<Option<ApprovalRecord>> {
    let sql = format!("SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = $1");
    let row = conn
        .fetch_optional(&sql, vec![Arg::Text(id.to_string())])
        .await
        .map_err(db_error)?;
    row.as_ref().map(approval_from_row).transpose()
}

async fn insert_signing_key<C: Conn>(
    conn: &mut C,
    key: &SigningKeyRecord,
    retired_at: Option<UnixSeconds>,
    publish_until: Option<UnixSeconds>,
) -> Result<()> {
    let args = vec![
        Arg::Text(key.kid.clone()),
        Arg::Bytes(key.pkcs8.expose().clone()),
        Arg::Text(to_json(&key.public_jwk, "public JWK")?),
        Arg::Int(key.created_at),
        Arg::OptInt(retired_at),
        Arg::OptInt(publish_until),
    ];
    conn.execute(
        "INSERT INTO signing_keys (kid, pkcs8, public_jwk, created_at, retired_at, publish_until) VALUES ($1, $2, $3, $4, $5, $6)",
        args,
    )
    .await
    .map_err(|error| conflict_or(error, "signing key", &key.kid))?;
    Ok(())
}

async fn insert_task<C: Conn>(conn: &mut C, task: &TaskRecord) -> Result<()> {
    let args = vec![
        Arg::Text(task.id.to_string()),
        Arg::Text(task.agent.to_string()),
        Arg::Text(task.owner.to_string()),
        Arg::Text(task.intent.clone()),
        Arg::Text(to_json(&task.scopes, "task scopes")?),
        Arg::OptText(task.obo.clone()),
        Arg::OptText(task.parent.as_ref().map(TaskId::to_string)),
        Arg::Int(i64::from(task.depth)),
        Arg::Text(task.status.as_str().to_string()),
        Arg::Int(task.created_at),
        Arg::Int(task.expires_at),
        Arg::Int(i64::from(task.budget)),
        Arg::Int(i64::from(task.calls_used)),
        Arg::Text(task.token_jti.clone()),
        Arg::Text(task.jkt.clone()),
    ];
    let inserted = conn
        .execute(
            "INSERT INTO tasks (id, agent, owner, intent, scopes, obo, parent, depth, status, created_at, expires_at, budget, calls_used, token_jti, jkt) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
            args,
        )
        .await;
    match inserted {
        Ok(_) => Ok(()),
        Err(error) if is_foreign_key_violation(&error) => {
            // Name what is missing. PostgreSQL refuses statements after an error until the
            // savepoint is rolled back, so do that first (the caller's rollback repeats it).
            conn.execute("ROLLBACK TO SAVEPOINT remit_op", vec![])
                .await
                .map_err(db_error)?;
            let agent = conn
                .fetch_optional(
                    "SELECT name FROM agents WHERE name = $1",
                    vec![Arg::Text(task.agent.to_string())],
                )
                .await
                .map_err(db_error)?;
            match (agent, &task.parent) {
                (None, _) => Err(StoreError::NotFound {
                    what: "agent",
                    key: task.agent.to_string(),
                }),
                (Some(_), Some(parent)) => Err(StoreError::NotFound {
                    what: "parent task",
                    key: parent.to_string(),
                }),
                (Some(_), None) => Err(db_error(error)),
            }
        }
        Err(error) => Err(conflict_or(error, "task", task.id.as_str())),
    }
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_unique_violation())
}

fn is_foreign_key_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_foreign_key_violation())
}

fn conflict_or(error: sqlx::Error, what: &'static str, key: &str) -> StoreError {
    if is_unique_violation(&error) {
        StoreError::Conflict {
            what,
            key: key.to_string(),
        }
    } else {
        db_error(error)
    }
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

/// Typed column access shared by both backends' row types.
pub(crate) trait RowExt {
    fn text(&self, column: &str) -> Result<String, sqlx::Error>;
    fn opt_text(&self, column: &str) -> Result<Option<String>, sqlx::Error>;
    fn int(&self, column: &str) -> Result<i64, sqlx::Error>;
    fn opt_int(&self, column: &str) -> Result<Option<i64>, sqlx::Error>;
    fn bytes(&self, column: &str) -> Result<Vec<u8>, sqlx::Error>;
    fn boolean(&self, column: &str) -> Result<bool, sqlx::Error>;
    /// Borrowed access by position, for the verifier's hot loop: no allocation, no name lookup.
    fn str_at(&self, index: usize) -> Result<&str, sqlx::Error>;
    fn opt_str_at(&self, index: usize) -> Result<Option<&str>, sqlx::Error>;
    fn bytes_at(&self, index: usize) -> Result<&[u8], sqlx::Error>;
    fn int_at(&self, index: usize) -> Result<i64, sqlx::Error>;
    fn opt_int_at(&self, index: usize) -> Result<Option<i64>, sqlx::Error>;
}

impl<R> RowExt for R
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> bool: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> &'r str: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> &'r [u8]: Decode<'r, R::Database> + Type<R::Database>,
    usize: ColumnIndex<R>,
{
    fn text(&self, column: &str) -> Result<String, sqlx::Error> {
        self.try_get(column)
    }
    fn opt_text(&self, column: &str) -> Result<Option<String>, sqlx::Error> {
        self.try_get(column)
    }
    fn int(&self, column: &str) -> Result<i64, sqlx::Error> {
        self.try_get(column)
    }
    fn opt_int(&self, column: &str) -> Result<Option<i64>, sqlx::Error> {
        self.try_get(column)
    }
    fn bytes(&self, column: &str) -> Result<Vec<u8>, sqlx::Error> {
        self.try_get(column)
    }
    fn boolean(&self, column: &str) -> Result<bool, sqlx::Error> {
        self.try_get(column)
    }
    fn str_at(&self, index: usize) -> Result<&str, sqlx::Error> {
        self.try_get(index)
    }
    fn opt_str_at(&self, index: usize) -> Result<Option<&str>, sqlx::Error> {
        self.try_get(index)
    }
    fn bytes_at(&self, index: usize) -> Result<&[u8], sqlx::Error> {
        self.try_get(index)
    }
    fn int_at(&self, index: usize) -> Result<i64, sqlx::Error> {
        self.try_get(index)
    }
    fn opt_int_at(&self, index: usize) -> Result<Option<i64>, sqlx::Error> {
        self.try_get(index)
    }
}

/// Decodes one row's columns, turning any failure into `Corrupt` naming the record and key.
struct Fields<'r, R> {
    row: &'r R,
    what: &'static str,
    key: String,
}

impl<'r, R: RowExt> Fields<'r, R> {
    fn keyed_by_text(row: &'r R, what: &'static str, column: &str) -> Result<Self> {
        let key = row.text(column).map_err(|error| {
            StoreError::Corrupt(format!("{what} with unreadable `{column}`: {error}"))
        })?;
        Ok(Fields { row, what, key })
    }

    fn keyed_by_int(row: &'r R, what: &'static str, column: &str) -> Result<Self> {
        let key = row.int(column).map_err(|error| {
            StoreError::Corrupt(format!("{what} with unreadable `{column}`: {error}"))
        })?;
        Ok(Fields {
            row,
            what,
            key: key.to_string(),
        })
    }

    fn fail(&self, column: &str, problem: impl Display) -> StoreError {
        StoreError::Corrupt(format!(
            "{} `{}`, column `{column}`: {problem}",
            self.what, self.key
        ))
    }

    fn text(&self, column: &str) -> Result<String> {
        self.row
            .text(column)
            .map_err(|error| self.fail(column, error))
    }

    fn opt_text(&self, column: &str) -> Result<Option<String>> {
        self.row
            .opt_text(column)
            .map_err(|error| self.fail(column, error))
    }

    fn int(&self, column: &str) -> Result<i64> {
        self.row
            .int(column)
            .map_err(|error| self.fail(column, error))
    }

    fn opt_int(&self, column: &str) -> Result<Option<i64>> {
        self.row
            .opt_int(column)
            .map_err(|error| self.fail(column, error))
    }

    fn u32(&self, column: &str) -> Result<u32> {
        let value = self.int(column)?;
        u32::try_from(value)
            .map_err(|_| self.fail(column, format_args!("`{value}` is out of range")))
    }

    fn u64(&self, column: &str) -> Result<u64> {
        let value = self.int(column)?;
        u64::try_from(value)
            .map_err(|_| self.fail(column, format_args!("`{value}` is out of range")))
    }

    fn bytes(&self, column: &str) -> Result<Vec<u8>> {
        self.row
            .bytes(column)
            .map_err(|error| self.fail(column, error))
    }

    fn boolean(&self, column: &str) -> Result<bool> {
        self.row
            .boolean(column)
            .map_err(|error| self.fail(column, error))
    }

    fn hash(&self, column: &str) -> Result<Hash> {
        let bytes = self.bytes(column)?;
        Hash::try_from(bytes.as_slice())
            .map_err(|_| self.fail(column, format_args!("{} bytes, expected 32", bytes.len())))
    }

    fn parse<T: FromStr>(&self, column: &str) -> Result<T>
    where
        T::Err: Display,
    {
        self.text(column)?
            .parse()
            .map_err(|error| self.fail(column, error))
    }

    fn opt_parse<T: FromStr>(&self, column: &str) -> Result<Option<T>>
    where
        T::Err: Display,
    {
        self.opt_text(column)?
            .map(|text| text.parse().map_err(|error| self.fail(column, error)))
            .transpose()
    }

    fn json<T: DeserializeOwned>(&self, column: &str) -> Result<T> {
        serde_json::from_str(&self.text(column)?).map_err(|error| self.fail(column, error))
    }
}

fn agent_from_row(row: &impl RowExt) -> Result<AgentRecord> {
    let fields = Fields::keyed_by_text(row, "agent", "name")?;
    Ok(AgentRecord {
        name: fields.parse("name")?,
        spiffe_id: fields.parse("spiffe_id")?,
        owner: fields.parse("owner")?,
        status: fields.parse("status")?,
        keys: fields.json("keys")?,
        created_at: fields.int("created_at")?,
    })
}

fn operator_from_row(row: &impl RowExt) -> Result<OperatorRecord> {
    let fields = Fields::keyed_by_text(row, "operator", "id")?;
    Ok(OperatorRecord {
        id: fields.key.clone(),
        name: fields.text("name")?,
        role: fields.parse("role")?,
        token_hash: fields.hash("token_hash")?,
        created_at: fields.int("created_at")?,
        disabled: fields.boolean("disabled")?,
    })
}

fn signing_key_from_row(row: &impl RowExt) -> Result<SigningKeyRecord> {
    let fields = Fields::keyed_by_text(row, "signing key", "kid")?;
    Ok(SigningKeyRecord {
        kid: fields.key.clone(),
        pkcs8: Secret::new(fields.bytes("pkcs8")?),
        public_jwk: fields.json("public_jwk")?,
        created_at: fields.int("created_at")?,
        retired_at: fields.opt_int("retired_at")?,
        publish_until: fields.opt_int("publish_until")?,
    })
}

fn task_from_row(row: &impl RowExt) -> Result<TaskRecord> {
    let fields = Fields::keyed_by_text(row, "task", "id")?;
    Ok(TaskRecord {
        id: fields.parse("id")?,
        agent: fields.parse("agent")?,
        owner: fields.parse("owner")?,
        intent: fields.text("intent")?,
        scopes: fields.json("scopes")?,
        obo: fields.opt_text("obo")?,
        parent: fields.opt_parse("parent")?,
        depth: fields.u32("depth")?,
        status: fields.parse("status")?,
        created_at: fields.int("created_at")?,
        expires_at: fields.int("expires_at")?,
        budget: fields.u32("budget")?,
        calls_used: fields.u32("calls_used")?,
        token_jti: fields.text("token_jti")?,
        jkt: fields.text("jkt")?,
    })
}

fn revocation_from_row(row: &impl RowExt) -> Result<Revocation> {
    let fields = Fields::keyed_by_int(row, "revocation", "seq")?;
    let kind = fields.text("kind")?;
    Ok(Revocation {
        seq: fields.int("seq")?,
        kind: RevocationKind::parse(&kind)
            .ok_or_else(|| fields.fail("kind", format_args!("unknown kind `{kind}`")))?,
        target: fields.text("target")?,
        reason: fields.text("reason")?,
        created_at: fields.int("created_at")?,
    })
}

fn approval_from_row(row: &impl RowExt) -> Result<ApprovalRecord> {
    let fields = Fields::keyed_by_text(row, "approval", "id")?;
    let status = fields.text("status")?;
    Ok(ApprovalRecord {
        id: fields.key.clone(),
        task: fields.parse("task")?,
        agent: fields.parse("agent")?,
        owner: fields.parse("owner")?,
        tool: fields.text("tool")?,
        action: fields.text("action")?,
        resource: fields.text("resource")?,
        args_digest: fields.text("args_digest")?,
        status: ApprovalStatus::parse(&status)
            .ok_or_else(|| fields.fail("status", format_args!("unknown status `{status}`")))?,
        created_at: fields.int("created_at")?,
        expires_at: fields.int("expires_at")?,
        decided_by: fields.opt_text("decided_by")?,
        decision_reason: fields.opt_text("decision_reason")?,
        decided_at: fields.opt_int("decided_at")?,
    })
}

fn event_from_row(row: &impl RowExt) -> Result<Event> {
    let fields = Fields::keyed_by_int(row, "audit event", "seq")?;
    Ok(Event {
        seq: fields.u64("seq")?,
        body: EventBody {
            time_ms: fields.int("time_ms")?,
            kind: fields.text("kind")?,
            actor: fields.text("actor")?,
            agent: fields.opt_text("agent")?,
            task: fields.opt_text("task")?,
            decision: fields.opt_text("decision")?,
            detail: Detail::stored(fields.text("detail")?)
                .map_err(|error| fields.fail("detail", error))?,
        },
        prev_hash: fields.hash("prev_hash")?,
        hash: fields.hash("hash")?,
    })
}

/// An audit row as stored, borrowed from the row: what [`ChainVerifier::push_stored`] hashes.
/// Columns by position, in [`EVENT_COLUMNS`] order.
fn stored_event_from_row(row: &impl RowExt) -> Result<StoredEvent<'_>> {
    let seq = row.int_at(0).map_err(|error| {
        StoreError::Corrupt(format!("audit event with unreadable `seq`: {error}"))
    })?;
    let fail = |column: &str, problem: &dyn Display| {
        StoreError::Corrupt(format!("audit event `{seq}`, column `{column}`: {problem}"))
    };
    let hash = |index: usize, column: &str| -> Result<Hash> {
        let bytes = row.bytes_at(index).map_err(|error| fail(column, &error))?;
        Hash::try_from(bytes)
            .map_err(|_| fail(column, &format_args!("{} bytes, expected 32", bytes.len())))
    };
    Ok(StoredEvent {
        seq: u64::try_from(seq).map_err(|_| fail("seq", &"negative"))?,
        time_ms: row.int_at(1).map_err(|error| fail("time_ms", &error))?,
        kind: row.str_at(2).map_err(|error| fail("kind", &error))?,
        actor: row.str_at(3).map_err(|error| fail("actor", &error))?,
        agent: row.opt_str_at(4).map_err(|error| fail("agent", &error))?,
        task: row.opt_str_at(5).map_err(|error| fail("task", &error))?,
        decision: row
            .opt_str_at(6)
            .map_err(|error| fail("decision", &error))?,
        detail: row.str_at(7).map_err(|error| fail("detail", &error))?,
        prev_hash: hash(8, "prev_hash")?,
        hash: hash(9, "hash")?,
    })
}

/// Feeds the events of one packed page to `verifier`; `true` when the page held at least one
/// event, all in the expected format and all verified. The format, per event and with no
/// separator between events: `seq`, a space, `time_ms`, a space, `prev_hash` and `hash` in
/// hexadecimal each followed by a space, then `kind`, `actor`, `agent`, `task`, `decision`
/// and `detail`, each as its length in bytes (-1 for NULL), a colon and the bytes. Lengths
/// come from the database, so no content can be mistaken for framing.
fn unpack_events(page: &str, verifier: &mut ChainVerifier) -> bool {
    let mut rest = page;
    let mut any = false;
    while !rest.is_empty() {
        let Some(event) = unpack_event(&mut rest) else {
            return false;
        };
        if verifier.push_stored(&event).is_err() {
            return false;
        }
        any = true;
    }
    any
}

fn unpack_event<'a>(rest: &mut &'a str) -> Option<StoredEvent<'a>> {
    fn until<'a>(rest: &mut &'a str, separator: char) -> Option<&'a str> {
        let (value, tail) = rest.split_once(separator)?;
        *rest = tail;
        Some(value)
    }
    fn field<'a>(rest: &mut &'a str) -> Option<Option<&'a str>> {
        let len: i64 = until(rest, ':')?.parse().ok()?;
        if len == -1 {
            return Some(None);
        }
        let len = usize::try_from(len).ok()?;
        let value = rest.get(..len)?;
        *rest = rest.get(len..)?;
        Some(Some(value))
    }
    let seq = until(rest, ' ')?.parse().ok()?;
    let time_ms = until(rest, ' ')?.parse().ok()?;
    let prev_hash = audit::from_hex(until(rest, ' ')?)?;
    let hash = audit::from_hex(until(rest, ' ')?)?;
    Some(StoredEvent {
        seq,
        time_ms,
        kind: field(rest)??,
        actor: field(rest)??,
        agent: field(rest)?,
        task: field(rest)?,
        decision: field(rest)?,
        detail: field(rest)??,
        prev_hash,
        hash,
    })
}

const AGENT_COLUMNS: &str = "name, spiffe_id, owner, status, keys, created_at";
const OPERATOR_COLUMNS: &str = "id, name, role, token_hash, created_at, disabled";
const SIGNING_KEY_COLUMNS: &str = "kid, pkcs8, public_jwk, created_at, retired_at, publish_until";
const TASK_COLUMNS: &str = "id, agent, owner, intent, scopes, obo, parent, depth, status, created_at, expires_at, budget, calls_used, token_jti, jkt";
const APPROVAL_COLUMNS: &str = "id, task, agent, owner, tool, action, resource, args_digest, status, \
     created_at, expires_at, decided_by, decision_reason, decided_at";
const EVENT_COLUMNS: &str =
    "seq, time_ms, kind, actor, agent, task, decision, detail, prev_hash, hash";

fn page(limit: u32, default: u32, cap: u32) -> i64 {
    i64::from(if limit == 0 { default } else { limit.min(cap) })
}

fn ids(rows: Vec<impl RowExt>, what: &'static str) -> Result<Vec<TaskId>> {
    rows.iter()
        .map(|row| Fields::keyed_by_text(row, what, "id")?.parse("id"))
        .collect()
}

#[async_trait]
impl<B: Backend> Store for SqlStore<B> {
    fn kind(&self) -> &'static str {
        B::KIND
    }

    fn writer_stats(&self) -> WriterStats {
        self.counters.snapshot()
    }

    fn revocation_signal(&self) -> Option<Arc<tokio::sync::Notify>> {
        self.revocations.clone()
    }

    async fn ping(&self) -> Result<()> {
        let mut conn = self.read().await?;
        conn.fetch_optional("SELECT 1", vec![])
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn heartbeat(&self, now_ms: i64) -> Result<()> {
        match self.write(WriteOp::Heartbeat(now_ms)).await? {
            Outcome::Done => Ok(()),
            _ => Err(wrong_outcome()),
        }
    }

    async fn insert_agent(&self, agent: &AgentRecord, event: EventBody) -> Result<Event> {
        self.write_event(WriteOp::InsertAgent(agent.clone(), event))
            .await
    }

    async fn get_agent(&self, name: &AgentName) -> Result<Option<AgentRecord>> {
        let sql = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE name = $1");
        let row = self
            .read()
            .await?
            .fetch_optional(&sql, vec![Arg::Text(name.to_string())])
            .await
            .map_err(db_error)?;
        row.as_ref().map(agent_from_row).transpose()
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>> {
        let sql = format!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY name");
        let rows = self
            .read()
            .await?
            .fetch_all(&sql, vec![])
            .await
            .map_err(db_error)?;
        rows.iter().map(agent_from_row).collect()
    }

    async fn set_agent_status(
        &self,
        name: &AgentName,
        status: AgentStatus,
        event: EventBody,
    ) -> Result<Event> {
        self.write_event(WriteOp::SetAgentStatus(name.clone(), status, event))
            .await
    }

    async fn insert_operator(&self, operator: &OperatorRecord, event: EventBody) -> Result<Event> {
        self.write_event(WriteOp::InsertOperator(operator.clone(), event))
            .await
    }

    async fn operator_by_token_hash(
        &self,
        token_hash: &[u8; 32],
    ) -> Result<Option<OperatorRecord>> {
        let sql = format!("SELECT {OPERATOR_COLUMNS} FROM operators WHERE token_hash = $1");
        let row = self
            .read()
            .await?
            .fetch_optional(&sql, vec![Arg::Bytes(token_hash.to_vec())])
            .await
            .map_err(db_error)?;
        row.as_ref().map(operator_from_row).transpose()
    }

    async fn count_operators(&self) -> Result<u64> {
        let row = self
            .read()
            .await?
            .fetch_optional("SELECT COUNT(*) AS n FROM operators", vec![])
            .await
            .map_err(db_error)?;
        let row = row
            .ok_or_else(|| StoreError::Corrupt("counting operators returned no row".to_string()))?;
        let count = row.int("n").map_err(db_error)?;
        u64::try_from(count)
            .map_err(|_| StoreError::Corrupt(format!("operator count `{count}` is negative")))
    }

    async fn insert_signing_key(&self, key: &SigningKeyRecord, event: EventBody) -> Result<Event> {
        self.write_event(WriteOp::InsertSigningKey(key.clone(), event))
            .await
    }

    async fn rotate_signing_key(
        &self,
        new_key: &SigningKeyRecord,
        retired_at: UnixSeconds,
        publish_until: UnixSeconds,
        event: EventBody,
    ) -> Result<Event> {
        let op = WriteOp::RotateSigningKey {
            new_key: new_key.clone(),
            retired_at,
            publish_until,
            event,
        };
        self.write_event(op).await
    }

    async fn signing_keys(&self, now: UnixSeconds) -> Result<Vec<SigningKeyRecord>> {
        let sql = format!(
            "SELECT {SIGNING_KEY_COLUMNS} FROM signing_keys WHERE retired_at IS NULL OR publish_until > $1 \
             ORDER BY CASE WHEN retired_at IS NULL THEN 0 ELSE 1 END, retired_at DESC, created_at DESC, kid"
        );
        let rows = self
            .read()
            .await?
            .fetch_all(&sql, vec![Arg::Int(now)])
            .await
            .map_err(db_error)?;
        rows.iter().map(signing_key_from_row).collect()
    }

    async fn insert_task(&self, task: &TaskRecord, event: EventBody) -> Result<Event> {
        self.write_event(WriteOp::InsertTask(task.clone(), event))
            .await
    }

    async fn get_task(&self, id: &TaskId) -> Result<Option<TaskRecord>> {
        let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1");
        let row = self
            .read()
            .await?
            .fetch_optional(&sql, vec![Arg::Text(id.to_string())])
            .await
            .map_err(db_error)?;
        row.as_ref().map(task_from_row).transpose()
    }

    async fn finish_task(
        &self,
        id: &TaskId,
        to: TaskStatus,
        event: EventBody,
    ) -> Result<Option<Event>> {
        match self
            .write(WriteOp::FinishTask(id.clone(), to, event))
            .await?
        {
            Outcome::Finished(event) => Ok(event),
            _ => Err(wrong_outcome()),
        }
    }

    async fn count_task_calls(&self, id: &TaskId) -> Result<TaskCalls> {
        let row = self
            .read()
            .await?
            .fetch_optional(count_task_calls_sql(), vec![Arg::Text(id.to_string())])
            .await
            .map_err(db_error)?
            .ok_or_else(|| StoreError::NotFound {
                what: "task",
                key: id.to_string(),
            })?;
        let fields = Fields::keyed_by_int(&row, "task call count", "head")?;
        let used = [
            fields.int("used")?,
            fields.int("looked_up")?,
            fields.int("recent")?,
        ]
        .into_iter()
        .fold(0i64, i64::saturating_add);
        Ok(TaskCalls {
            used: u32::try_from(used).unwrap_or(u32::MAX),
            through_seq: fields.u64("head")?,
        })
    }

    async fn settle_task_calls(&self, counts: &[(TaskId, TaskCalls)]) -> Result<()> {
        if counts.is_empty() {
            return Ok(());
        }
        match self
            .write(WriteOp::SettleTaskCalls(counts.to_vec()))
            .await?
        {
            Outcome::Done => Ok(()),
            _ => Err(wrong_outcome()),
        }
    }

    async fn add_denials(
        &self,
        denials: &[(String, i64)],
        since_ms: i64,
    ) -> Result<Vec<(String, u32)>> {
        if denials.is_empty() {
            return Ok(Vec::new());
        }
        match self
            .write(WriteOp::AddDenials(denials.to_vec(), since_ms))
            .await?
        {
            Outcome::Denials(sums) => Ok(sums),
            _ => Err(wrong_outcome()),
        }
    }

    async fn clear_denials(&self, agent: &str) -> Result<()> {
        match self.write(WriteOp::ClearDenials(agent.to_string())).await? {
            Outcome::Done => Ok(()),
            _ => Err(wrong_outcome()),
        }
    }

    async fn active_tasks_of_agent(&self, agent: &AgentName) -> Result<Vec<TaskId>> {
        let rows = self
            .read()
            .await?
            .fetch_all(
                "SELECT id FROM tasks WHERE agent = $1 AND status = 'active' ORDER BY created_at, id",
                vec![Arg::Text(agent.to_string())],
            )
            .await
            .map_err(db_error)?;
        ids(rows, "task")
    }

    async fn child_tasks(&self, parent: &TaskId) -> Result<Vec<TaskId>> {
        let rows = self
            .read()
            .await?
            .fetch_all(
                "SELECT id FROM tasks WHERE parent = $1 AND status = 'active' ORDER BY created_at, id",
                vec![Arg::Text(parent.to_string())],
            )
            .await
            .map_err(db_error)?;
        ids(rows, "task")
    }

    async fn insert_revocation(
        &self,
        revocation: &NewRevocation,
        event: EventBody,
    ) -> Result<(Revocation, Event)> {
        match self
            .write(WriteOp::InsertRevocation(revocation.clone(), event))
            .await?
        {
            Outcome::Revocation(revocation, event) => Ok((revocation, event)),
            _ => Err(wrong_outcome()),
        }
    }

    async fn revocations_after(&self, after: i64, limit: u32) -> Result<Vec<Revocation>> {
        let rows = self
            .read()
            .await?
            .fetch_all(
                "SELECT seq, kind, target, reason, created_at FROM revocations WHERE seq > $1 ORDER BY seq LIMIT $2",
                vec![Arg::Int(after), Arg::Int(page(limit, PAGE_DEFAULT, PAGE_CAP))],
            )
            .await
            .map_err(db_error)?;
        rows.iter().map(revocation_from_row).collect()
    }

    async fn insert_approval(&self, approval: &ApprovalRecord, event: EventBody) -> Result<Event> {
        self.write_event(WriteOp::InsertApproval(Box::new(approval.clone()), event))
            .await
    }

    async fn get_approval(&self, id: &str) -> Result<Option<ApprovalRecord>> {
        let mut conn = self.read().await?;
        select_approval(&mut *conn, id).await
    }

    async fn list_approvals(
        &self,
        status: Option<ApprovalStatus>,
        limit: u32,
    ) -> Result<Vec<ApprovalRecord>> {
        let limit = page(limit, QUERY_DEFAULT, QUERY_CAP);
        let (sql, args) = match status {
            Some(status) => (
                format!(
                    "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE status = $1 \
                     ORDER BY created_at DESC, id LIMIT $2"
                ),
                vec![Arg::Text(status.as_str().to_string()), Arg::Int(limit)],
            ),
            None => (
                format!(
                    "SELECT {APPROVAL_COLUMNS} FROM approvals ORDER BY created_at DESC, id LIMIT $1"
                ),
                vec![Arg::Int(limit)],
            ),
        };
        let rows = self
            .read()
            .await?
            .fetch_all(&sql, args)
            .await
            .map_err(db_error)?;
        rows.iter().map(approval_from_row).collect()
    }

    async fn decide_approval(
        &self,
        id: &str,
        approve: bool,
        by: &str,
        reason: &str,
        now: UnixSeconds,
        event: EventBody,
    ) -> Result<Option<ApprovalRecord>> {
        let op = WriteOp::DecideApproval {
            id: id.to_string(),
            status: if approve {
                ApprovalStatus::Approved
            } else {
                ApprovalStatus::Denied
            },
            by: by.to_string(),
            reason: reason.to_string(),
            now,
            event,
        };
        self.write_approval(op).await
    }

    async fn consume_approval(
        &self,
        call: ApprovalKey<'_>,
        now: UnixSeconds,
        event: EventBody,
    ) -> Result<Option<ApprovalRecord>> {
        let op = WriteOp::ConsumeApproval {
            call: OwnedCall::of(call),
            now,
            event,
        };
        self.write_approval(op).await
    }

    async fn pending_approval_for(
        &self,
        call: ApprovalKey<'_>,
        now: UnixSeconds,
    ) -> Result<Option<ApprovalRecord>> {
        let sql = format!(
            "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE task = $1 AND tool = $2 AND action = $3 \
             AND resource = $4 AND args_digest = $5 AND status = 'pending' AND expires_at > $6 \
             ORDER BY created_at DESC, id LIMIT 1"
        );
        let mut args = OwnedCall::of(call).args();
        args.push(Arg::Int(now));
        let row = self
            .read()
            .await?
            .fetch_optional(&sql, args)
            .await
            .map_err(db_error)?;
        row.as_ref().map(approval_from_row).transpose()
    }

    async fn append_spending(&self, spend: ProofSpend, event: EventBody) -> Result<Event> {
        let op = WriteOp::Spending(spend, Box::new(WriteOp::Append(vec![event])));
        match self.write(op).await? {
            Outcome::Events(mut events) if events.len() == 1 => {
                events.pop().ok_or_else(wrong_outcome)
            }
            _ => Err(wrong_outcome()),
        }
    }

    async fn insert_task_spending(
        &self,
        task: &TaskRecord,
        event: EventBody,
        spend: ProofSpend,
    ) -> Result<Event> {
        let op = WriteOp::InsertTask(task.clone(), event);
        self.write_event(WriteOp::Spending(spend, Box::new(op)))
            .await
    }

    async fn finish_task_spending(
        &self,
        id: &TaskId,
        to: TaskStatus,
        event: EventBody,
        spend: ProofSpend,
    ) -> Result<Option<Event>> {
        let op = WriteOp::FinishTask(id.clone(), to, event);
        match self.write(WriteOp::Spending(spend, Box::new(op))).await? {
            Outcome::Finished(event) => Ok(event),
            _ => Err(wrong_outcome()),
        }
    }

    async fn sweep_proof_spends(&self, before_iat: i64) -> Result<u64> {
        match self.write(WriteOp::SweepProofSpends(before_iat)).await? {
            Outcome::Swept(removed) => Ok(removed),
            _ => Err(wrong_outcome()),
        }
    }

    async fn append_events(&self, events: Vec<EventBody>) -> Result<Vec<Event>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        match self.write(WriteOp::Append(events)).await? {
            Outcome::Events(events) => Ok(events),
            _ => Err(wrong_outcome()),
        }
    }

    async fn events_after(&self, after_seq: u64, limit: u32) -> Result<Vec<Event>> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2"
        );
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        let args = vec![
            Arg::Int(after),
            Arg::Int(page(limit, PAGE_DEFAULT, PAGE_CAP)),
        ];
        let rows = self
            .read()
            .await?
            .fetch_all(&sql, args)
            .await
            .map_err(db_error)?;
        rows.iter().map(event_from_row).collect()
    }

    async fn verify_chain(&self, verifier: &mut ChainVerifier) -> Result<Result<(), ChainBreak>> {
        if let Some(sql) = B::PACKED_EVENTS_SQL {
            // Two connections take turns, so that the database packs the next page while
            // this one is hashed.
            let mut connections = [self.read().await?, self.read().await?];
            // From the start, every row counts, whatever its number (see below).
            let mut from = match verifier.next_seq() {
                0 | 1 => i64::MIN,
                next => to_i64(next, "audit event")?,
            };
            let mut page = connections[0]
                .fetch_optional(sql, vec![Arg::Int(from)])
                .await;
            let mut turn = 0;
            loop {
                let start = verifier.clone();
                // An error (a SQLite too old for the query, say) leaves the rows below to it.
                let Ok(row) = page else { break };
                let Some(row) = row else { return Ok(Ok(())) };
                let (Ok(text), Ok(last)) = (row.opt_str_at(0), row.opt_int_at(1)) else {
                    break;
                };
                let (Some(text), Some(last)) = (text, last) else {
                    return Ok(Ok(()));
                };
                if last < from || last == i64::MAX {
                    break;
                }
                from = last + 1;
                turn = 1 - turn;
                let (next, verified) = tokio::join!(
                    connections[turn].fetch_optional(sql, vec![Arg::Int(from)]),
                    async { unpack_events(text, verifier) }
                );
                if !verified {
                    // Not the expected format, or a break somewhere in the page: the rows
                    // themselves say exactly what is wrong, from the start of the page.
                    *verifier = start;
                    break;
                }
                page = next;
            }
            drop(connections);
        }
        // One streamed query rather than pages: rows flow from the database while earlier
        // ones are hashed. From the start, every row counts, whatever its number, so that an
        // event slipped in below 1 is reported too.
        let (sql, args) = if verifier.next_seq() <= 1 {
            (
                format!("SELECT {EVENT_COLUMNS} FROM audit_events ORDER BY seq"),
                vec![],
            )
        } else {
            (
                format!("SELECT {EVENT_COLUMNS} FROM audit_events WHERE seq >= $1 ORDER BY seq"),
                vec![Arg::Int(to_i64(verifier.next_seq(), "audit event")?)],
            )
        };
        let mut outcome = Ok(Ok(()));
        let mut conn = self.read().await?;
        conn.for_each_row(&sql, args, &mut |row| {
            let pushed = stored_event_from_row(row).map(|event| verifier.push_stored(&event));
            let go_on = matches!(pushed, Ok(Ok(())));
            outcome = pushed;
            go_on
        })
        .await
        .map_err(db_error)?;
        outcome
    }

    async fn query_events(&self, filter: &AuditFilter) -> Result<Vec<Event>> {
        let limit = page(filter.limit, QUERY_DEFAULT, QUERY_CAP);
        let order = if filter.newest { "DESC" } else { "ASC" };
        let mut conn = self.read().await?;
        let mut events = if let Some((table, column, key)) = lookup_of(filter) {
            // Events up to the mark are found through the lookup table, the ones after it
            // (at most a lookup interval's worth) in the log itself. Both parts take the
            // same mark, so a concurrent fill changes neither answer.
            let mark = conn
                .fetch_optional("SELECT through_seq FROM audit_lookup_mark", vec![])
                .await
                .map_err(db_error)?
                .map(|row| {
                    Fields::keyed_by_int(&row, "audit lookup mark", "through_seq")?
                        .int("through_seq")
                })
                .transpose()?
                .unwrap_or(0);
            let mut args = vec![Arg::Text(key.to_string()), Arg::Int(mark)];
            let conditions = event_conditions(filter, "e.", Some(column), &mut args);
            args.push(Arg::Int(limit));
            // `e.{column} = $1` too: lookups that describe another log (until the filler
            // notices and refills them) may then miss events, but never return a wrong one.
            let indexed = format!(
                "SELECT {} FROM {table} l JOIN audit_events e ON e.seq = l.seq \
                 WHERE l.{column} = $1 AND e.{column} = $1 AND l.seq <= $2{conditions} \
                 ORDER BY l.seq {order} LIMIT ${}",
                prefixed_event_columns(),
                args.len()
            );
            let indexed = conn.fetch_all(&indexed, args).await.map_err(db_error)?;
            let mut args = vec![Arg::Text(key.to_string()), Arg::Int(mark)];
            let conditions = event_conditions(filter, "", Some(column), &mut args);
            args.push(Arg::Int(limit));
            let tail = format!(
                "SELECT {EVENT_COLUMNS} FROM audit_events \
                 WHERE {column} = $1 AND seq > $2{conditions} ORDER BY seq {order} LIMIT ${}",
                args.len()
            );
            let tail = conn.fetch_all(&tail, args).await.map_err(db_error)?;
            // Oldest first: the indexed part precedes the tail; newest first, the reverse.
            let (first, second) = if filter.newest {
                (tail, indexed)
            } else {
                (indexed, tail)
            };
            first
                .iter()
                .chain(second.iter())
                .take(usize::try_from(limit).unwrap_or(usize::MAX))
                .map(event_from_row)
                .collect::<Result<Vec<_>>>()?
        } else {
            let mut args = Vec::new();
            let conditions = event_conditions(filter, "", None, &mut args);
            args.push(Arg::Int(limit));
            let sql = format!(
                "SELECT {EVENT_COLUMNS} FROM audit_events WHERE TRUE{conditions} ORDER BY seq {order} LIMIT ${}",
                args.len()
            );
            conn.fetch_all(&sql, args)
                .await
                .map_err(db_error)?
                .iter()
                .map(event_from_row)
                .collect::<Result<Vec<_>>>()?
        };
        if filter.newest {
            events.reverse();
        }
        Ok(events)
    }
}

/// [`Store::count_task_calls`] in one statement, so that one snapshot answers every part: the
/// settled count, the head it reaches now, and the allowed calls recorded between the two —
/// found through the task lookup up to its mark and in the log itself after it (at most a
/// lookup interval's worth of events: each bound is one expression, so that the database
/// scans from the later of the two marks), like [`Store::query_events`]. A call is a
/// `call.decision` that allowed a tool call; a session check (`"check":"session"` in its
/// canonical detail, where a string value's quotes would be escaped) is not one.
fn count_task_calls_sql() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        let allowed = "e.kind = 'call.decision' AND e.decision = 'allow' \
                       AND e.detail NOT LIKE '%\"check\":\"session\"%'";
        format!(
            "SELECT t.calls_used AS used, h.head AS head, \
             (SELECT COUNT(*) FROM audit_task_events l JOIN audit_events e ON e.seq = l.seq \
              WHERE l.task = $1 AND e.task = $1 AND l.seq > t.calls_seq \
              AND l.seq <= CASE WHEN h.mark < h.head THEN h.mark ELSE h.head END \
              AND {allowed}) AS looked_up, \
             (SELECT COUNT(*) FROM audit_events e WHERE e.task = $1 \
              AND e.seq > CASE WHEN t.calls_seq > h.mark THEN t.calls_seq ELSE h.mark END \
              AND e.seq <= h.head AND {allowed}) AS recent \
             FROM tasks t, \
             (SELECT COALESCE((SELECT through_seq FROM audit_lookup_mark), 0) AS mark, \
              COALESCE((SELECT MAX(seq) FROM audit_events), 0) AS head) h \
             WHERE t.id = $1"
        )
    })
}

/// The lookup table that answers `filter`, if it names a task (the narrower) or an agent:
/// (table, its column, the value).
fn lookup_of(filter: &AuditFilter) -> Option<(&'static str, &'static str, &str)> {
    match (&filter.task, &filter.agent) {
        (Some(task), _) => Some(("audit_task_events", "task", task.as_str())),
        (None, Some(agent)) => Some(("audit_agent_events", "agent", agent.as_str())),
        (None, None) => None,
    }
}

/// ` AND …` for each condition of `filter` on the events (columns prefixed with `prefix`),
/// except the one the lookup already applies; the values are pushed onto `args`. Only the
/// conditions present reach the SQL, so each index stays usable.
fn event_conditions(
    filter: &AuditFilter,
    prefix: &str,
    looked_up: Option<&str>,
    args: &mut Vec<Arg>,
) -> String {
    let mut sql = String::new();
    let mut condition = |column: &str, operator: &str, arg: Arg| {
        args.push(arg);
        sql.push_str(&format!(" AND {prefix}{column} {operator} ${}", args.len()));
    };
    if let Some(agent) = filter.agent.as_ref().filter(|_| looked_up != Some("agent")) {
        condition("agent", "=", Arg::Text(agent.clone()));
    }
    if let Some(task) = filter.task.as_ref().filter(|_| looked_up != Some("task")) {
        condition("task", "=", Arg::Text(task.clone()));
    }
    if let Some(after) = filter.after_seq {
        condition(
            "seq",
            ">",
            Arg::Int(i64::try_from(after).unwrap_or(i64::MAX)),
        );
    }
    if let Some(since) = filter.since_ms {
        condition("time_ms", ">=", Arg::Int(since));
    }
    if let Some(until) = filter.until_ms {
        condition("time_ms", "<", Arg::Int(until));
    }
    sql
}

/// [`EVENT_COLUMNS`] of the table aliased `e`.
fn prefixed_event_columns() -> &'static str {
    static COLUMNS: OnceLock<String> = OnceLock::new();
    COLUMNS.get_or_init(|| {
        EVENT_COLUMNS
            .split(", ")
            .map(|column| format!("e.{column}"))
            .collect::<Vec<_>>()
            .join(", ")
    })
}

#[cfg(test)]
mod tests {
    use audit::{ChainVerifier, EventBody};
    use sqlx::Row as _;

    use super::{Backend as _, unpack_events};
    use crate::sqlite::SqliteBackend;

    /// A store on a new SQLite file: the directory (kept alive by the caller), its URL, the
    /// store.
    async fn sqlite_store() -> (tempfile::TempDir, String, std::sync::Arc<dyn crate::Store>) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("remit.db").display());
        let store = crate::open(&url).await.unwrap();
        (dir, url, store)
    }

    /// A store on a new SQLite file without the bound around it, so that a test can reach its
    /// writer's queue: the directory, the file's URL, the store.
    async fn unbounded_sqlite() -> (tempfile::TempDir, String, super::SqlStore<SqliteBackend>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("remit.db").display().to_string();
        let url = format!("sqlite://{path}");
        let (store, _) = crate::sqlite::open_unbounded(&url, &path, &crate::OpenOptions::default())
            .await
            .unwrap();
        (dir, url, store)
    }

    /// Queues `op` as a caller would, returning the receiver of its answer.
    async fn queue(
        store: &super::SqlStore<SqliteBackend>,
        op: super::WriteOp,
    ) -> tokio::sync::oneshot::Receiver<crate::Result<super::Outcome>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        store
            .writer
            .send(super::Pending { op, reply })
            .await
            .unwrap();
        answer
    }

    /// The kinds and actors of the events in the store, in order.
    async fn logged(store: &super::SqlStore<SqliteBackend>) -> Vec<(String, String)> {
        use crate::Store as _;
        store
            .events_after(0, 1_000)
            .await
            .unwrap()
            .into_iter()
            .map(|event| (event.body.kind, event.body.actor))
            .collect()
    }

    /// A caller whose timeout passed while its write was queued was told the store is
    /// unavailable: the writer must not perform the write after all.
    #[tokio::test]
    async fn the_writer_drops_a_write_whose_caller_gave_up() {
        use crate::Store as _;
        let (_dir, _url, store) = unbounded_sqlite().await;
        let given_up = queue(
            &store,
            super::WriteOp::Append(vec![EventBody::new(1, "call.decision", "gave-up")]),
        )
        .await;
        drop(given_up);
        store
            .append_events(vec![EventBody::new(2, "call.decision", "waited")])
            .await
            .unwrap();
        assert_eq!(
            logged(&store).await,
            [("call.decision".to_string(), "waited".to_string())]
        );
    }

    /// A caller that gave up while its write was already committing: the write lands, and
    /// the log says at once that its caller was refused.
    #[tokio::test]
    async fn a_write_committed_after_its_caller_gave_up_is_marked() {
        use crate::Store as _;
        let (_dir, url, store) = unbounded_sqlite().await;
        let mut lock = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        sqlx::raw_sql("BEGIN IMMEDIATE")
            .execute(&mut lock)
            .await
            .unwrap();
        let before = store.writer_stats().batches;
        let answer = queue(
            &store,
            super::WriteOp::Append(vec![EventBody::new(1, "call.decision", "gave-up")]),
        )
        .await;
        // The writer has taken the write into a batch (and waits for the lock) ...
        while store.writer_stats().batches == before {
            tokio::task::yield_now().await;
        }
        // ... when its caller gives up; then the lock goes.
        drop(answer);
        sqlx::Connection::close(lock).await.unwrap();
        store
            .append_events(vec![EventBody::new(2, "call.decision", "waited")])
            .await
            .unwrap();
        let events = store.events_after(0, 1_000).await.unwrap();
        let kinds: Vec<_> = events
            .iter()
            .map(|event| (event.body.kind.as_str(), event.body.actor.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("call.decision", "gave-up"),
                (audit::kinds::STORE_UNANSWERED, "remit"),
                ("call.decision", "waited"),
            ]
        );
        assert_eq!(
            events[1].body.detail.to_value()["events"],
            serde_json::json!([events[0].seq])
        );
    }

    /// The packed page is only an accelerator (any failure falls back to rows), so a broken
    /// query would go unnoticed by the chain tests: check that real SQLite output unpacks.
    #[tokio::test]
    async fn sqlite_packs_pages_that_verify() {
        let (_dir, url, store) = sqlite_store().await;
        let bodies: Vec<_> = (0..1_500)
            .map(|i| {
                // Spaces, colons, multi-byte text and absent fields must not upset the framing.
                let body = EventBody::new(1_700_000_000_000 - i, "call.decision", "a: b c")
                    .detail(serde_json::json!({"note": "é: 1 -1:x", "i": i}));
                if i % 2 == 0 {
                    body.agent("bot ü").decision("allow")
                } else {
                    body.task("")
                }
            })
            .collect();
        store.append_events(bodies).await.unwrap();
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        let sql = SqliteBackend::PACKED_EVENTS_SQL.unwrap();
        let mut verifier = ChainVerifier::default();
        for (from, last) in [(i64::MIN, 1_000), (1_001, 1_500)] {
            let row = sqlx::query(sql).bind(from).fetch_one(&pool).await.unwrap();
            let page: String = row.get(0);
            assert!(unpack_events(&page, &mut verifier));
            assert_eq!(row.get::<i64, _>(1), last);
        }
        assert_eq!(verifier.checked(), 1_500);
        let past_the_head = sqlx::query(sql)
            .bind(1_501i64)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(past_the_head.get::<Option<String>, _>(0), None);
    }

    /// The one-round-trip append is only a shortcut (any failure falls back to the careful
    /// path), so the chain tests cannot tell whether it works: drive it directly, across chunk
    /// sizes, then with a head that moved, which must insert nothing at all.
    #[tokio::test]
    async fn sqlite_appends_many_chunks_in_one_round_trip() {
        use super::{Head, PADDED_ROWS, WriteOp, appends_in_one_round_trip};
        let (_dir, url, store) = sqlite_store().await;
        let first = store
            .append_events(vec![EventBody::new(1, "call.decision", "remit")])
            .await
            .unwrap()
            .remove(0);
        let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        let ops = |count: usize| {
            (0..count)
                .map(|i| WriteOp::Append(vec![EventBody::new(i as i64, "call.outcome", "remit")]))
                .collect::<Vec<_>>()
        };
        let mut head = Head {
            seq: first.seq,
            hash: first.hash,
        };
        // Every shape of the last chunk, full and padded, alone and after full chunks.
        let counts = [
            1,
            4,
            5,
            16,
            17,
            33,
            64,
            65,
            97,
            PADDED_ROWS,
            PADDED_ROWS + 1,
        ];
        for count in counts
            .into_iter()
            .chain([2 * PADDED_ROWS + 96, 3 * PADDED_ROWS + 5])
        {
            let Ok((results, after)) = appends_in_one_round_trip(&mut conn, head, ops(count)).await
            else {
                panic!("{count} appends fell back to the careful path");
            };
            assert_eq!(results.len(), count);
            assert_eq!(after.seq, head.seq + count as u64);
            head = after;
        }
        // Sealed after a head that is no longer the head: nothing may be inserted.
        let stale = Head {
            seq: first.seq,
            hash: first.hash,
        };
        let refused = appends_in_one_round_trip(&mut conn, stale, ops(2 * PADDED_ROWS + 1)).await;
        assert!(matches!(refused, Err(ref ops) if ops.len() == 2 * PADDED_ROWS + 1));
        let mut verifier = ChainVerifier::default();
        assert_eq!(store.verify_chain(&mut verifier).await.unwrap(), Ok(()));
        assert_eq!(verifier.checked(), head.seq);
    }
}
