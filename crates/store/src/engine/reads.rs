//! The [`Store`] trait over [`SqlStore`]: the reads, answered here from a pool connection, and
//! the writes, each handed to the writer as one [`WriteOp`].

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use audit::{ChainBreak, ChainVerifier, Event, EventBody};
use model::{AgentName, AgentStatus, TaskId, TaskStatus, UnixSeconds};

use super::ops::{Outcome, OwnedCall, WriteOp, select_approval};
use super::rows::{
    AGENT_COLUMNS, APPROVAL_COLUMNS, EVENT_COLUMNS, Fields, OPERATOR_COLUMNS, RowExt,
    SIGNING_KEY_COLUMNS, TASK_COLUMNS, agent_from_row, approval_from_row, event_from_row,
    fetch_row, operator_from_row, revocation_from_row, signing_key_from_row, stored_event_from_row,
    task_from_row, to_i64, unpack_events,
};
use super::{Arg, Backend, Conn, SqlStore, db_error, wrong_outcome};
use crate::{
    AgentRecord, ApprovalKey, ApprovalRecord, ApprovalStatus, AuditFilter, NewRevocation,
    OperatorRecord, ProofSpend, Result, Revocation, SigningKeyRecord, Store, StoreError, TaskCalls,
    TaskRecord, WriterStats,
};

/// Most rows `query_events` returns, and what a zero limit means.
const QUERY_CAP: u32 = crate::QUERY_LIMIT_MAX;

const QUERY_DEFAULT: u32 = 100;

/// Most rows one page of `events_after` or `revocations_after` returns, and what a zero limit
/// means: pages large enough for fast verification and catch-up, small enough to hold.
const PAGE_CAP: u32 = 10_000;
const PAGE_DEFAULT: u32 = 1_000;

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
        let args = vec![Arg::Text(name.to_string())];
        fetch_row(&mut *self.read().await?, &sql, args, agent_from_row).await
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
        let args = vec![Arg::Bytes(token_hash.to_vec())];
        fetch_row(&mut *self.read().await?, &sql, args, operator_from_row).await
    }

    async fn count_operators(&self) -> Result<u64> {
        let sql = "SELECT COUNT(*) AS n FROM operators";
        let count = fetch_row(&mut *self.read().await?, sql, vec![], |row| {
            row.int("n").map_err(db_error)
        })
        .await?
        .ok_or_else(|| StoreError::Corrupt("counting operators returned no row".to_string()))?;
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
        let args = vec![Arg::Text(id.to_string())];
        fetch_row(&mut *self.read().await?, &sql, args, task_from_row).await
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
        let args = vec![Arg::Text(id.to_string())];
        fetch_row(
            &mut *self.read().await?,
            count_task_calls_sql(),
            args,
            |row| {
                let fields = Fields::keyed_by_int(row, "task call count", "head")?;
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
            },
        )
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: "task",
            key: id.to_string(),
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
        fetch_row(&mut *self.read().await?, &sql, args, approval_from_row).await
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
            let sql = "SELECT through_seq FROM audit_lookup_mark";
            let mark = fetch_row(&mut *conn, sql, vec![], |row| {
                Fields::keyed_by_int(row, "audit lookup mark", "through_seq")?.int("through_seq")
            })
            .await?
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
