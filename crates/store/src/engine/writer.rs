//! The group-commit writer task: its queue, how it gathers a batch, the one transaction
//! that carries it under the chain lock, and the counters behind [`crate::WriterStats`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use audit::{Detail, EventBody, GENESIS, Hash};
use sqlx::pool::PoolConnection;
use tokio::sync::{mpsc, oneshot};

use super::append::{
    append_parts, append_run, appends_in_one_round_trip, appends_only, from_append, in_savepoint,
    into_append,
};
use super::ops::{Outcome, WriteOp};
use super::rows::Fields;
use super::{Backend, Conn, db_error};
use crate::{Result, WriterStats};

/// Most operations one transaction carries. Bounds the time a batch holds the chain lock.
pub(crate) const MAX_BATCH: usize = 512;

/// Most yields the writer makes to let a batch grow before it starts the transaction. More
/// fill the batch closer to the number of callers but cost more than they gain: with 64
/// callers, 4 gave batches of 63 and 93,000 appends/s, 1 gave 52 and 103,000–115,000/s.
const MAX_YIELDS: usize = 2;

/// Queued operations before callers wait to enqueue: back pressure instead of unbounded memory.
pub(super) const QUEUE: usize = 8192;

#[derive(Debug)]
pub(super) struct Pending {
    pub(super) op: WriteOp,
    pub(super) reply: oneshot::Sender<Result<Outcome>>,
}

/// The chain head as read inside the current write transaction.
#[derive(Clone, Copy, Debug)]
pub(super) struct Head {
    pub(super) seq: u64,
    pub(super) hash: Hash,
}

/// [`WriterStats`] as the writer counts them, durations in microseconds. Each counter stands
/// alone (relaxed), except that a counted lookup fill's time is seen with it.
#[derive(Debug, Default)]
pub(super) struct WriterCounters {
    batches: AtomicU64,
    operations: AtomicU64,
    gathering_us: AtomicU64,
    committing_us: AtomicU64,
    chain_lock_held_us: AtomicU64,
    pub(super) lookup_fills: AtomicU64,
    pub(super) lookup_filling_us: AtomicU64,
}

impl WriterCounters {
    pub(super) fn add_time(counter: &AtomicU64, since: Instant) {
        let micros = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
        counter.fetch_add(micros, Ordering::Relaxed);
    }

    pub(super) fn snapshot(&self) -> WriterStats {
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

pub(super) struct Writer<B: Backend> {
    pub(super) backend: Arc<B>,
    pub(super) counters: Arc<WriterCounters>,
    /// Kept across batches to keep its prepared statements warm; dropped after a failure.
    pub(super) conn: Option<PoolConnection<B::Db>>,
    /// The chain head this writer last committed, which is still the head unless another
    /// process or replica wrote since: what the next batch is sealed after, speculatively.
    /// `None` after a failure.
    pub(super) known_head: Option<Head>,
}

impl<B: Backend> Writer<B> {
    pub(super) async fn run(mut self, mut queue: mpsc::Receiver<Pending>) {
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
pub(super) async fn kept_connection<'a, DB: sqlx::Database>(
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
pub(super) fn discard_connection<DB: sqlx::Database>(slot: &mut Option<PoolConnection<DB>>) {
    if let Some(mut conn) = slot.take() {
        conn.close_on_drop();
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

#[cfg(test)]
mod tests {
    use audit::EventBody;

    use super::Pending;
    use crate::engine::test_stores::unbounded_sqlite;
    use crate::engine::{Outcome, SqlStore, WriteOp};
    use crate::sqlite::SqliteBackend;

    /// Queues `op` as a caller would, returning the receiver of its answer.
    async fn queue(
        store: &SqlStore<SqliteBackend>,
        op: WriteOp,
    ) -> tokio::sync::oneshot::Receiver<crate::Result<Outcome>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        store.writer.send(Pending { op, reply }).await.unwrap();
        answer
    }

    /// The kinds and actors of the events in the store, in order.
    async fn logged(store: &SqlStore<SqliteBackend>) -> Vec<(String, String)> {
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
            WriteOp::Append(vec![EventBody::new(1, "call.decision", "gave-up")]),
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
            WriteOp::Append(vec![EventBody::new(1, "call.decision", "gave-up")]),
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
}
