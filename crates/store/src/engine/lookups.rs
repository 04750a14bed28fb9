//! The audit log's per-agent and per-task lookups, filled beside the writer in transactions
//! of their own that never take the chain lock.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use audit::GENESIS;
use sqlx::pool::PoolConnection;
use tokio::sync::oneshot;

use super::rows::{Fields, fetch_row};
use super::writer::{WriterCounters, discard_connection, kept_connection};
use super::{Arg, Backend, Conn, db_error};
use crate::{Result, StoreError};

/// How far the agent and task lookups of the audit log may lag the log: a task beside the
/// writer looks this often for events past the lookups' mark and fills them in. Queries read
/// the lag from the log itself, so it bounds their work, not what they see. Each fill
/// rewrites a leaf page per task in flight, however few events it adds: at 100 ms the fills
/// wrote twice as much to the disk as the log itself did, at 1 s under a third of what the
/// log did (docs/benchmarks-history.md).
const LOOKUP_INTERVAL: Duration = Duration::from_secs(1);
/// Most events one lookup fill takes in, so that a refill of a whole log (a lost lookup file)
/// runs as a series of short transactions.
const LOOKUP_CHUNK: i64 = 10_000;

/// Fills the audit log's per-agent and per-task lookups from the log, beside the writer and
/// never under the chain lock: the lookups are derived data, and a fill that held the lock
/// (as one did, in the writer) stalled every call's decision commit for its duration.
pub(super) struct Filler<B: Backend> {
    pub(super) backend: Arc<B>,
    pub(super) counters: Arc<WriterCounters>,
    /// Kept between fills; dropped after a failure.
    pub(super) conn: Option<PoolConnection<B::Db>>,
}

impl<B: Backend> Filler<B> {
    pub(super) async fn run(mut self, mut stopped: oneshot::Receiver<()>) {
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
            let at_head = fetch_row(
                &mut **conn,
                "SELECT (SELECT through_seq FROM audit_lookup_mark) AS mark, \
                 (SELECT COALESCE(MAX(seq), 0) FROM audit_events) AS head",
                vec![],
                |row| {
                    let fields = Fields::keyed_by_int(row, "audit lookup mark", "mark")?;
                    Ok(fields.int("mark")? == fields.int("head")?)
                },
            )
            .await?;
            if at_head == Some(true) {
                return Ok(false);
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
    let sql = "SELECT through_seq, through_hash FROM audit_lookup_mark";
    let (mut mark, mark_hash) = fetch_row(conn, sql, vec![], |row| {
        let fields = Fields::keyed_by_int(row, "audit lookup mark", "through_seq")?;
        Ok((fields.int("through_seq")?, fields.hash("through_hash")?))
    })
    .await?
    .ok_or_else(|| StoreError::Corrupt("the audit lookup mark is missing".to_string()))?;
    let matches_the_log = if mark == 0 {
        mark_hash == GENESIS
    } else {
        let sql = "SELECT seq, hash FROM audit_events WHERE seq = $1";
        let at_mark = fetch_row(conn, sql, vec![Arg::Int(mark)], |row| {
            Fields::keyed_by_int(row, "audit event", "seq")?.hash("hash")
        })
        .await?;
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
    let bound = fetch_row(
        conn,
        "SELECT seq, hash FROM audit_events WHERE seq > $1 AND seq <= $2 \
         ORDER BY seq DESC LIMIT 1",
        vec![Arg::Int(mark), Arg::Int(limit)],
        |row| {
            let fields = Fields::keyed_by_int(row, "audit event", "seq")?;
            Ok((fields.int("seq")?, fields.hash("hash")?))
        },
    )
    .await?;
    let Some((bound, bound_hash)) = bound else {
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
