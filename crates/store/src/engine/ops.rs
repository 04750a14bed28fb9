//! The write operations the writer runs ([`WriteOp`]), what each answers ([`Outcome`]), and
//! the statements of each, run by [`apply`] inside the batch's transaction.

use audit::{Detail, Event, EventBody};
use model::{AgentName, AgentStatus, TaskId, TaskStatus, UnixSeconds};

use super::append::{append_one, insert_events, insert_spends, seal, spends_json};
use super::rows::{APPROVAL_COLUMNS, Fields, approval_from_row, fetch_row, to_i64, to_json};
use super::writer::Head;
use super::{Arg, Conn, db_error, wrong_outcome};
use crate::{
    AgentRecord, ApprovalKey, ApprovalRecord, ApprovalStatus, NewRevocation, OperatorRecord,
    ProofSpend, Result, Revocation, SigningKeyRecord, StoreError, TaskCalls, TaskRecord,
};

/// Tasks per statement when a node settles its call counts (three parameters each), and
/// denials or agents per statement when it shares its containment counts.
const TASK_CALL_CHUNK: usize = 100;

/// A state change (with its audit event) or an append, queued for the writer.
#[derive(Debug)]
pub(super) enum WriteOp {
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
    /// See [`Store::heartbeat`](crate::Store::heartbeat).
    Heartbeat(i64),
    /// The operation (an append, a task's insert or end) with a DPoP proof spent in the same
    /// transaction, so that a second spend of the proof fails it: see [`ProofSpend`].
    Spending(ProofSpend, Box<WriteOp>),
    /// Forgets the spent proofs issued before this `iat`.
    SweepProofSpends(i64),
}

/// An [`ApprovalKey`] that can wait in the writer's queue.
#[derive(Debug)]
pub(super) struct OwnedCall {
    task: String,
    tool: String,
    action: String,
    resource: String,
    args_digest: String,
}

impl OwnedCall {
    pub(super) fn of(call: ApprovalKey<'_>) -> OwnedCall {
        OwnedCall {
            task: call.task.to_string(),
            tool: call.tool.to_string(),
            action: call.action.to_string(),
            resource: call.resource.to_string(),
            args_digest: call.args_digest.to_string(),
        }
    }

    pub(super) fn args(&self) -> Vec<Arg> {
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
pub(super) enum Outcome {
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
    pub(super) fn committed(&self, seqs: &mut Vec<u64>, approvals: &mut Vec<String>) {
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

/// One operation's statements. Runs inside a savepoint: an error undoes them all.
pub(super) async fn apply<C: Conn>(conn: &mut C, head: &mut Head, op: WriteOp) -> Result<Outcome> {
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
                let sql = "SELECT kid FROM signing_keys WHERE retired_at IS NULL";
                let current = fetch_row(conn, sql, vec![], |row| {
                    Ok(Fields::keyed_by_text(row, "signing key", "kid")?.key)
                })
                .await?;
                if let Some(kid) = current {
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
                let sql = "SELECT id FROM tasks WHERE id = $1";
                let exists =
                    fetch_row(conn, sql, vec![Arg::Text(id.to_string())], |_| Ok(())).await?;
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
            let seq = fetch_row(
                conn,
                "INSERT INTO revocations (kind, target, reason, created_at) VALUES ($1, $2, $3, $4) RETURNING seq",
                args,
                |row| Fields::keyed_by_int(row, "revocation", "seq")?.int("seq"),
            )
            .await?
            .ok_or_else(wrong_outcome)?;
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
            let Some(mut approval) = fetch_row(conn, &sql, args, approval_from_row).await? else {
                return Ok(Outcome::Approval(None));
            };
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

/// [`Store::settle_task_calls`](crate::Store::settle_task_calls): one statement per chunk of tasks
/// instead of a statement (and a savepoint) per task, so that a busy node's counts do not hold the
/// writer for long. Each count replaces the stored one only if it reaches further into the log, so
/// that counts settled by several nodes, in any order, only move forward.
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

/// [`Store::add_denials`](crate::Store::add_denials): the new rows, the rows that left every
/// window, then the sums for the agents named, all in the writer's transaction so that each node's
/// answer includes every denial another node added before it.
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

pub(super) async fn select_approval<C: Conn>(
    conn: &mut C,
    id: &str,
) -> Result<Option<ApprovalRecord>> {
    let sql = format!("SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = $1");
    fetch_row(
        conn,
        &sql,
        vec![Arg::Text(id.to_string())],
        approval_from_row,
    )
    .await
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
            let sql = "SELECT name FROM agents WHERE name = $1";
            let args = vec![Arg::Text(task.agent.to_string())];
            let agent = fetch_row(conn, sql, args, |_| Ok(())).await?;
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

pub(super) fn conflict_or(error: sqlx::Error, what: &'static str, key: &str) -> StoreError {
    if is_unique_violation(&error) {
        StoreError::Conflict {
            what,
            key: key.to_string(),
        }
    } else {
        db_error(error)
    }
}
