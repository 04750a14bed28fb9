//! Behaviour both backends must share: records round-trip, conflicts and absences are answers,
//! every state change lands in the audit chain with it, and concurrent writers keep one chain.

use std::sync::Arc;
use std::time::Duration;

use audit::{EventBody, kinds};
use model::{AgentStatus, Role, Secret, TaskStatus};
use store::{
    ApprovalKey, ApprovalRecord, ApprovalStatus, AuditFilter, NewRevocation, OperatorRecord,
    RevocationKind, SigningKeyRecord, Store, StoreError, TaskCalls, TaskRecord,
};

use crate::harness::{TestDb, agent, all_events, event, eventually, task, task_id, verify};

pub async fn agents(db: &TestDb) {
    let store = &db.store;
    let bot = agent("triage-bot");
    let registered = store
        .insert_agent(&bot, event(kinds::AGENT_REGISTERED).agent("triage-bot"))
        .await
        .unwrap();
    assert_eq!(registered.seq, 1);
    store
        .insert_agent(&agent("alpha"), event(kinds::AGENT_REGISTERED))
        .await
        .unwrap();

    assert_eq!(store.get_agent(&bot.name).await.unwrap(), Some(bot.clone()));
    assert_eq!(
        store.get_agent(&"nobody".parse().unwrap()).await.unwrap(),
        None
    );
    let names: Vec<_> = store
        .list_agents()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.name.to_string())
        .collect();
    assert_eq!(names, ["alpha", "triage-bot"]);

    let again = store
        .insert_agent(&bot, event(kinds::AGENT_REGISTERED))
        .await
        .unwrap_err();
    assert!(
        matches!(&again, StoreError::Conflict { what: "agent", key } if key == "triage-bot"),
        "{again:?}"
    );
    assert_eq!(again.to_string(), "agent `triage-bot` already exists");

    store
        .set_agent_status(
            &bot.name,
            AgentStatus::Quarantined,
            event(kinds::AGENT_DISABLED),
        )
        .await
        .unwrap();
    assert_eq!(
        store.get_agent(&bot.name).await.unwrap().unwrap().status,
        AgentStatus::Quarantined
    );
    let missing = store
        .set_agent_status(&"ghost".parse().unwrap(), AgentStatus::Disabled, event("x"))
        .await;
    assert!(
        matches!(missing, Err(StoreError::NotFound { what: "agent", .. })),
        "{missing:?}"
    );

    let kinds: Vec<_> = all_events(store.as_ref())
        .await
        .into_iter()
        .map(|e| e.body.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            kinds::AGENT_REGISTERED,
            kinds::AGENT_REGISTERED,
            kinds::AGENT_DISABLED
        ]
    );
}

fn operator(id: &str, hash_byte: u8) -> OperatorRecord {
    OperatorRecord {
        id: id.to_string(),
        name: format!("{id} (CI)"),
        role: Role::Approver,
        token_hash: [hash_byte; 32],
        created_at: 1_700_000_000,
        disabled: false,
    }
}

pub async fn operators(db: &TestDb) {
    let store = &db.store;
    assert_eq!(store.count_operators().await.unwrap(), 0);
    let op = operator("op-1", 7);
    store
        .insert_operator(&op, event(kinds::OPERATOR_CREATED))
        .await
        .unwrap();
    assert_eq!(
        store.operator_by_token_hash(&[7; 32]).await.unwrap(),
        Some(op.clone())
    );
    assert_eq!(store.operator_by_token_hash(&[8; 32]).await.unwrap(), None);
    assert_eq!(store.count_operators().await.unwrap(), 1);

    let same_id = store
        .insert_operator(&operator("op-1", 9), event(kinds::OPERATOR_CREATED))
        .await;
    assert!(
        matches!(
            same_id,
            Err(StoreError::Conflict {
                what: "operator",
                ..
            })
        ),
        "{same_id:?}"
    );
    let same_token = store
        .insert_operator(&operator("op-2", 7), event(kinds::OPERATOR_CREATED))
        .await;
    assert!(
        matches!(
            same_token,
            Err(StoreError::Conflict {
                what: "operator",
                ..
            })
        ),
        "{same_token:?}"
    );
    assert_eq!(store.count_operators().await.unwrap(), 1);
}

fn signing_key(kid: &str, created_at: i64) -> SigningKeyRecord {
    SigningKeyRecord {
        kid: kid.to_string(),
        pkcs8: Secret::new(format!("pkcs8 of {kid}").into_bytes()),
        public_jwk: serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid, "x": "x", "y": "y"}),
        created_at,
        retired_at: None,
        publish_until: None,
    }
}

fn kids(keys: &[SigningKeyRecord]) -> Vec<&str> {
    keys.iter().map(|k| k.kid.as_str()).collect()
}

pub async fn signing_keys(db: &TestDb) {
    let store = &db.store;
    assert!(store.signing_keys(0).await.unwrap().is_empty());
    store
        .insert_signing_key(&signing_key("k1", 100), event(kinds::KEY_CREATED))
        .await
        .unwrap();
    let keys = store.signing_keys(200).await.unwrap();
    assert_eq!(kids(&keys), ["k1"]);
    assert_eq!(keys[0].pkcs8.expose(), b"pkcs8 of k1");
    assert_eq!(keys[0].public_jwk["kid"], "k1");

    // Only one key signs at a time.
    let second = store
        .insert_signing_key(&signing_key("k2", 150), event(kinds::KEY_CREATED))
        .await;
    assert!(
        matches!(&second, Err(StoreError::Conflict { what: "current signing key", key }) if key == "k1"),
        "{second:?}"
    );

    store
        .rotate_signing_key(
            &signing_key("k2", 300),
            300,
            1_000,
            event(kinds::KEY_ROTATED),
        )
        .await
        .unwrap();
    assert_eq!(kids(&store.signing_keys(500).await.unwrap()), ["k2", "k1"]);
    let retired = store.signing_keys(500).await.unwrap().remove(1);
    assert_eq!(
        (retired.retired_at, retired.publish_until),
        (Some(300), Some(1_000))
    );
    // Published until `publish_until`, not at it.
    assert_eq!(kids(&store.signing_keys(1_000).await.unwrap()), ["k2"]);

    // A rotation that fails (the kid exists) leaves the current key current: the retirement
    // before the failing insert is rolled back with it.
    let clash = store
        .rotate_signing_key(
            &signing_key("k1", 400),
            400,
            2_000,
            event(kinds::KEY_ROTATED),
        )
        .await;
    assert!(
        matches!(
            clash,
            Err(StoreError::Conflict {
                what: "signing key",
                ..
            })
        ),
        "{clash:?}"
    );
    let keys = store.signing_keys(500).await.unwrap();
    assert_eq!(kids(&keys), ["k2", "k1"]);
    assert_eq!(keys[0].retired_at, None);

    store
        .rotate_signing_key(&signing_key("k3", 600), 600, 900, event(kinds::KEY_ROTATED))
        .await
        .unwrap();
    assert_eq!(
        kids(&store.signing_keys(800).await.unwrap()),
        ["k3", "k2", "k1"]
    );
    assert_eq!(kids(&store.signing_keys(950).await.unwrap()), ["k3", "k1"]);
}

pub async fn tasks(db: &TestDb) {
    let store = &db.store;
    store
        .insert_agent(&agent("bot"), event(kinds::AGENT_REGISTERED))
        .await
        .unwrap();
    let parent = task(1, "bot");
    store
        .insert_task(&parent, event(kinds::TASK_GRANTED))
        .await
        .unwrap();
    assert_eq!(
        store.get_task(&parent.id).await.unwrap(),
        Some(parent.clone())
    );
    assert_eq!(store.get_task(&task_id(99)).await.unwrap(), None);

    let mut child = task(2, "bot");
    child.parent = Some(parent.id.clone());
    child.depth = 1;
    child.obo = None;
    store
        .insert_task(&child, event(kinds::TASK_GRANTED))
        .await
        .unwrap();
    assert_eq!(
        store.get_task(&child.id).await.unwrap(),
        Some(child.clone())
    );
    assert_eq!(
        store.child_tasks(&parent.id).await.unwrap(),
        [child.id.clone()]
    );
    assert_eq!(
        store
            .active_tasks_of_agent(&"bot".parse().unwrap())
            .await
            .unwrap(),
        [parent.id.clone(), child.id.clone()]
    );

    let duplicate = store.insert_task(&parent, event(kinds::TASK_GRANTED)).await;
    assert!(
        matches!(duplicate, Err(StoreError::Conflict { what: "task", .. })),
        "{duplicate:?}"
    );
    let stranger = store
        .insert_task(&task(3, "nobody"), event(kinds::TASK_GRANTED))
        .await;
    assert!(
        matches!(&stranger, Err(StoreError::NotFound { what: "agent", key }) if key == "nobody"),
        "{stranger:?}"
    );
    let mut orphan = task(4, "bot");
    orphan.parent = Some(task_id(98));
    let orphan = store.insert_task(&orphan, event(kinds::TASK_GRANTED)).await;
    assert!(
        matches!(
            orphan,
            Err(StoreError::NotFound {
                what: "parent task",
                ..
            })
        ),
        "{orphan:?}"
    );

    let before = all_events(store.as_ref()).await.len();
    let finished = store
        .finish_task(
            &child.id,
            TaskStatus::Completed,
            event(kinds::TASK_COMPLETED),
        )
        .await
        .unwrap();
    assert_eq!(finished.unwrap().body.kind, kinds::TASK_COMPLETED);
    assert_eq!(
        store.get_task(&child.id).await.unwrap().unwrap().status,
        TaskStatus::Completed
    );
    assert!(store.child_tasks(&parent.id).await.unwrap().is_empty());
    assert_eq!(
        store
            .active_tasks_of_agent(&"bot".parse().unwrap())
            .await
            .unwrap(),
        std::slice::from_ref(&parent.id)
    );

    // Only an active task moves, and only once.
    let again = store
        .finish_task(&child.id, TaskStatus::Revoked, event(kinds::TASK_COMPLETED))
        .await
        .unwrap();
    assert_eq!(again, None);
    assert_eq!(
        store.get_task(&child.id).await.unwrap().unwrap().status,
        TaskStatus::Completed
    );
    let unknown = store
        .finish_task(
            &task_id(97),
            TaskStatus::Completed,
            event(kinds::TASK_COMPLETED),
        )
        .await;
    assert!(
        matches!(unknown, Err(StoreError::NotFound { what: "task", .. })),
        "{unknown:?}"
    );
    assert_eq!(all_events(store.as_ref()).await.len(), before + 1);
}

/// One `call.decision` of `task`, as the call path writes it.
fn call_decision(task: &TaskRecord, decision: &str, code: &str, session: bool) -> EventBody {
    let mut detail = serde_json::json!({"action": "read_issue", "code": code, "tool": "github"});
    if session {
        detail["check"] = "session".into();
    }
    EventBody::new(
        1_700_000_000_000,
        kinds::CALL_DECISION,
        "spiffe://example.org/agent/bot",
    )
    .agent("spiffe://example.org/agent/bot")
    .task(task.id.as_str())
    .decision(decision)
    .detail(detail)
}

pub async fn task_calls(db: &TestDb) {
    let store = &db.store;
    store
        .insert_agent(&agent("bot"), event(kinds::AGENT_REGISTERED))
        .await
        .unwrap();
    let granted = task(1, "bot");
    let other = task(2, "bot");
    for task in [&granted, &other] {
        store
            .insert_task(task, event(kinds::TASK_GRANTED))
            .await
            .unwrap();
    }
    let count = |task: &TaskRecord| {
        let (store, id) = (store.clone(), task.id.clone());
        async move { store.count_task_calls(&id).await.unwrap() }
    };
    assert_eq!(
        count(&granted).await,
        TaskCalls {
            used: 0,
            through_seq: 3
        }
    );

    // Only allowed tool calls of the task count: not denials, session checks, outcomes, or
    // another task's calls, even one whose reason quotes a session check.
    let mut quoting = call_decision(&other, "allow", "allowed", false);
    quoting.detail = audit::Detail::from_value(&serde_json::json!({
        "code": "allowed", "reasons": ["\"check\":\"session\""]
    }));
    store
        .append_events(vec![
            call_decision(&granted, "allow", "allowed", false),
            call_decision(&granted, "deny", "out_of_scope", false),
            call_decision(&granted, "allow", "allowed", true),
            call_decision(&other, "allow", "allowed", false),
            quoting,
            EventBody::new(1_700_000_000_001, "call.outcome", "remit").task(granted.id.as_str()),
            call_decision(&granted, "allow", "allowed", false),
        ])
        .await
        .unwrap();
    let counted = count(&granted).await;
    assert_eq!(
        counted,
        TaskCalls {
            used: 2,
            through_seq: 10
        }
    );
    assert_eq!(count(&other).await.used, 2);

    // A settled count is where later counts start; an older one never replaces it, and a
    // task that does not exist is skipped.
    store
        .settle_task_calls(&[(granted.id.clone(), counted), (task_id(9), counted)])
        .await
        .unwrap();
    store
        .settle_task_calls(&[(
            granted.id.clone(),
            TaskCalls {
                used: 1,
                through_seq: 5,
            },
        )])
        .await
        .unwrap();
    store.settle_task_calls(&[]).await.unwrap();
    let stored = store.get_task(&granted.id).await.unwrap().unwrap();
    assert_eq!(stored.calls_used, 2);
    let fills = store.writer_stats().lookup_fills;
    store
        .append_events(vec![
            call_decision(&granted, "allow", "allowed", false),
            call_decision(&granted, "allow", "allowed", false),
        ])
        .await
        .unwrap();
    assert_eq!(
        count(&granted).await.used,
        4,
        "from the log after the lookup mark"
    );
    // Once the lookups hold the new calls, the count finds them there instead.
    assert!(eventually(|| async { store.writer_stats().lookup_fills > fills }).await);
    assert_eq!(
        count(&granted).await,
        TaskCalls {
            used: 4,
            through_seq: 12
        },
        "through the task lookup"
    );
    store
        .settle_task_calls(&[(
            granted.id.clone(),
            TaskCalls {
                used: 4,
                through_seq: 12,
            },
        )])
        .await
        .unwrap();
    assert_eq!(count(&granted).await.used, 4, "settled, nothing after");

    let unknown = store.count_task_calls(&task_id(9)).await;
    assert!(
        matches!(unknown, Err(StoreError::NotFound { what: "task", .. })),
        "{unknown:?}"
    );
    // Counting and settling calls are not audited state changes: the calls are.
    assert_eq!(all_events(store.as_ref()).await.len(), 12);
}

pub async fn containment_denials(db: &TestDb) {
    let store = &db.store;
    let (a, b) = (
        "spiffe://example.org/agent/a",
        "spiffe://example.org/agent/b",
    );
    let denials = |list: &[(&str, i64)]| -> Vec<(String, i64)> {
        list.iter()
            .map(|(agent, t)| (agent.to_string(), *t))
            .collect()
    };
    let sums = |list: &[(&str, u32)]| -> Vec<(String, u32)> {
        list.iter()
            .map(|(agent, n)| (agent.to_string(), *n))
            .collect()
    };
    assert_eq!(
        store
            .add_denials(&denials(&[(a, 1_000), (b, 1_500), (a, 2_000)]), 0)
            .await
            .unwrap(),
        sums(&[(a, 2), (b, 1)])
    );
    // Only the agents named are answered, and denials before the window are forgotten.
    assert_eq!(
        store
            .add_denials(&denials(&[(a, 3_000)]), 1_500)
            .await
            .unwrap(),
        sums(&[(a, 2)])
    );
    assert_eq!(
        store
            .add_denials(&denials(&[(b, 3_500)]), 1_500)
            .await
            .unwrap(),
        sums(&[(b, 2)])
    );
    // Concurrent adders (several nodes) all land, and the last answer sees them all.
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .add_denials(&[(b.to_string(), 4_000 + i)], 1_500)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut most = 0;
    for handle in handles {
        most = most.max(handle.await.unwrap()[0].1);
    }
    assert_eq!(most, 22);

    store.clear_denials(b).await.unwrap();
    assert_eq!(
        store
            .add_denials(&denials(&[(b, 5_000), (a, 5_000)]), 1_500)
            .await
            .unwrap(),
        sums(&[(a, 3), (b, 1)])
    );
    assert!(store.add_denials(&[], 0).await.unwrap().is_empty());
    assert!(all_events(store.as_ref()).await.is_empty());
}

fn revocation(kind: RevocationKind, target: &str) -> NewRevocation {
    NewRevocation {
        kind,
        target: target.to_string(),
        reason: format!("revoke {target}"),
        created_at: 1_700_000_100,
    }
}

pub async fn revocation_feed(db: &TestDb) {
    let store = &db.store;
    assert!(store.revocations_after(0, 100).await.unwrap().is_empty());
    let mut written = Vec::new();
    for (kind, target) in [
        (RevocationKind::Token, "jti-1"),
        (RevocationKind::Task, "task_x"),
        (RevocationKind::Agent, "bot"),
        (RevocationKind::Owner, "alice@example.org"),
    ] {
        let (stored, audit) = store
            .insert_revocation(&revocation(kind, target), event(kinds::REVOCATION))
            .await
            .unwrap();
        assert_eq!((stored.kind, stored.target.as_str()), (kind, target));
        assert_eq!(audit.body.kind, kinds::REVOCATION);
        written.push(stored);
    }
    assert!(
        written.windows(2).all(|pair| pair[0].seq < pair[1].seq),
        "{written:?}"
    );
    assert_eq!(store.revocations_after(0, 0).await.unwrap(), written);
    assert_eq!(
        store.revocations_after(written[1].seq, 100).await.unwrap(),
        written[2..]
    );
    assert_eq!(store.revocations_after(0, 1).await.unwrap(), written[..1]);
    assert!(
        store
            .revocations_after(written[3].seq, 100)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn group_commit_keeps_one_chain(db: &TestDb) {
    let store = &db.store;
    let writers: Vec<_> = (0..20)
        .map(|writer| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                for call in 0..25 {
                    // Mix single events and small batches; each call is one operation.
                    let bodies: Vec<_> = (0..1 + call % 3)
                        .map(|i| {
                            event(kinds::CALL_DECISION)
                                .agent(format!("agent-{writer}"))
                                .detail(serde_json::json!({"call": call, "i": i}))
                        })
                        .collect();
                    let events = store.append_events(bodies.clone()).await.unwrap();
                    assert_eq!(
                        events.iter().map(|e| e.body.clone()).collect::<Vec<_>>(),
                        bodies
                    );
                    assert!(
                        events.windows(2).all(|pair| pair[1].seq == pair[0].seq + 1),
                        "a call's events are contiguous"
                    );
                    mine.extend(events);
                }
                mine
            })
        })
        .collect();
    let mut returned = Vec::new();
    for writer in writers {
        returned.extend(writer.await.unwrap());
    }
    let expected: u64 = (0..25u64).map(|call| 1 + call % 3).sum::<u64>() * 20;
    assert_eq!(verify(store.as_ref()).await, Ok(expected));
    // What each caller was told is exactly what was stored.
    returned.sort_by_key(|e| e.seq);
    assert_eq!(returned, all_events(store.as_ref()).await);
}

pub async fn writer_stats_count_every_operation(db: &TestDb) {
    let store = &db.store;
    let before = store.writer_stats();
    let writers: Vec<_> = (0..8)
        .map(|writer| {
            let store = store.clone();
            tokio::spawn(async move {
                for call in 0..10 {
                    let body = event(kinds::CALL_DECISION)
                        .agent(format!("agent-{writer}"))
                        .detail(serde_json::json!({ "call": call }));
                    store.append_events(vec![body]).await.unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let after = store.writer_stats();
    assert_eq!(
        after.operations - before.operations,
        80,
        "one operation per append"
    );
    let batches = after.batches - before.batches;
    assert!(
        (1..=80).contains(&batches),
        "{batches} batches for 80 operations"
    );
    assert!(after.committing > before.committing);
    let held = after.chain_lock_held - before.chain_lock_held;
    assert!(
        held > Duration::ZERO && held <= after.committing - before.committing,
        "the chain lock was held {held:?} of {:?} committing",
        after.committing - before.committing
    );
    // The lookup filler takes these events in within its interval. That fill is counted,
    // with its time.
    assert!(
        eventually(|| async { store.writer_stats().lookup_fills > before.lookup_fills }).await,
        "no lookup fill was counted"
    );
    let filled = store.writer_stats();
    assert_eq!(
        filled.operations, after.operations,
        "a fill is not an operation"
    );
    assert!(filled.lookup_filling > before.lookup_filling);
}

/// Whether the audit lookups are at the log's head.
async fn lookups_at_the_head(db: &TestDb) -> bool {
    let mark = db
        .raw
        .number("SELECT through_seq FROM audit_lookup_mark")
        .await;
    let head = db
        .raw
        .number("SELECT COALESCE(MAX(seq), 0) FROM audit_events")
        .await;
    mark == head
}

/// Whether the audit lookups reach the log's head within 10 s.
async fn lookups_reach_the_head(db: &TestDb) -> bool {
    eventually(|| lookups_at_the_head(db)).await
}

/// The seqs of the events a query for `task` returns, all of them.
async fn seqs_of_task(store: &dyn store::Store, task: &str) -> Vec<u64> {
    let mut seqs = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .query_events(&AuditFilter {
                task: Some(task.into()),
                after_seq: after,
                limit: 1_000,
                ..Default::default()
            })
            .await
            .unwrap();
        let Some(last) = page.last() else {
            return seqs;
        };
        after = Some(last.seq);
        seqs.extend(page.iter().map(|e| e.seq));
    }
}

pub async fn a_lookup_fill_never_holds_up_the_writer(db: &TestDb) {
    // A fill that takes its time (held here by the test, with the lock every fill takes)
    // must not delay a single commit of the chain: that is the call path's decision record.
    let store = &db.store;
    let held = db.raw.hold_lookups().await;
    let appends = async {
        for i in 0..20 {
            let body = event(kinds::CALL_DECISION)
                .agent("alpha")
                .task(format!("task_{}", i % 2));
            store.append_events(vec![body]).await.unwrap();
        }
    };
    let waited = tokio::time::timeout(std::time::Duration::from_secs(3), appends).await;
    assert!(waited.is_ok(), "appends waited for the lookup fill's lock");
    // Meanwhile the queries find the events in the log's tail.
    assert_eq!(seqs_of_task(store.as_ref(), "task_1").await.len(), 10);
    held.release().await;
    assert!(
        lookups_reach_the_head(db).await,
        "the lookups never caught up"
    );
    assert_eq!(
        db.raw
            .number("SELECT COUNT(*) FROM audit_task_events WHERE task = 'task_1'")
            .await,
        10
    );
}

pub async fn lookups_that_do_not_match_the_log_are_refilled(db: &TestDb) {
    // More events than one fill takes in, so that the refill runs in several transactions.
    let store = &db.store;
    for round in 0..250u64 {
        let bodies = (0..100u64)
            .map(|i| {
                event(kinds::CALL_DECISION)
                    .agent("alpha")
                    .task(format!("task_{}", (round * 100 + i) % 7))
            })
            .collect();
        store.append_events(bodies).await.unwrap();
    }
    assert!(
        lookups_reach_the_head(db).await,
        "the lookups never caught up"
    );
    let expected = seqs_of_task(store.as_ref(), "task_3").await;
    assert_eq!(expected.len(), (0..25_000).filter(|i| i % 7 == 3).count());

    // The lookups now describe another log (as they would beside a log restored from an
    // older backup): the mark's hash is not the hash of the event it stands at, and a row
    // claims an event for a task that event does not name.
    db.raw
        .execute(
            "UPDATE audit_lookup_mark SET through_hash = \
             (SELECT hash FROM audit_events WHERE seq = 1)",
        )
        .await;
    db.raw
        .execute("INSERT INTO audit_task_events (task, seq) VALUES ('ghost', 2)")
        .await;
    assert!(
        seqs_of_task(store.as_ref(), "ghost").await.is_empty(),
        "a lookup row returned an event the log does not give that task"
    );

    // The next fill notices, empties the lookups and refills them from the start.
    store
        .append_events(vec![event(kinds::CALL_DECISION).task("task_3")])
        .await
        .unwrap();
    let refilled = eventually(|| async {
        let ghosts = db
            .raw
            .number("SELECT COUNT(*) FROM audit_task_events WHERE task = 'ghost'")
            .await;
        ghosts == 0 && lookups_at_the_head(db).await
    })
    .await;
    assert!(refilled, "the lookups were never refilled");
    assert_eq!(
        db.raw
            .number("SELECT COUNT(*) FROM audit_task_events WHERE task = 'task_3'")
            .await,
        i64::try_from(expected.len()).unwrap() + 1
    );
    let mut after = seqs_of_task(store.as_ref(), "task_3").await;
    assert_eq!(after.pop(), Some(25_001));
    assert_eq!(after, expected);
}

/// SQLite only: the lookups there live in a file of their own.
pub async fn a_lost_lookup_file_is_rebuilt(db: &TestDb) {
    let store = &db.store;
    let bodies = (0..300)
        .map(|i| event(kinds::CALL_DECISION).task(format!("task_{}", i % 3)))
        .collect();
    store.append_events(bodies).await.unwrap();
    assert!(
        lookups_reach_the_head(db).await,
        "the lookups never caught up"
    );
    let expected = seqs_of_task(store.as_ref(), "task_1").await;
    assert_eq!(expected.len(), 100);

    let lookups = store::sqlite_lookups_path(store::sqlite_path(&db.url).unwrap());
    for suffix in ["", "-wal", "-shm"] {
        match std::fs::remove_file(format!("{lookups}{suffix}")) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => panic!("{error}"),
            _ => {}
        }
    }
    let reopened = store::open(&db.url).await.unwrap();
    assert!(std::path::Path::new(&lookups).exists(), "not recreated");
    assert_eq!(seqs_of_task(reopened.as_ref(), "task_1").await, expected);
    let file = sqlx::SqlitePool::connect_with(
        sqlx::sqlite::SqliteConnectOptions::new().filename(&lookups),
    )
    .await
    .unwrap();
    let refilled = eventually(|| async {
        let mark: i64 = sqlx::query_scalar("SELECT through_seq FROM audit_lookup_mark")
            .fetch_one(&file)
            .await
            .unwrap();
        mark == 300
    })
    .await;
    assert!(refilled, "the new lookup file was never filled");
    let rows: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM audit_task_events WHERE task = 'task_1'")
            .fetch_one(&file)
            .await
            .unwrap();
    assert_eq!(rows, 100);
    assert_eq!(seqs_of_task(reopened.as_ref(), "task_1").await, expected);
}

pub async fn a_failing_append_does_not_sink_its_batch(db: &TestDb) {
    // A trigger that refuses one actor's events stands in for an append the database
    // rejects; the appends queued with it must still commit, on one unbroken chain.
    if db.is_postgres() {
        db.raw
            .execute(
                "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN IF NEW.actor = 'poison' THEN RAISE EXCEPTION 'poisoned'; END IF; RETURN NEW; END $$; \
                 CREATE TRIGGER refuse_poison BEFORE INSERT ON audit_events \
                 FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
            )
            .await;
    } else {
        db.raw
            .execute(
                "CREATE TRIGGER refuse_poison BEFORE INSERT ON audit_events \
                 WHEN NEW.actor = 'poison' BEGIN SELECT RAISE(ABORT, 'poisoned'); END",
            )
            .await;
    }
    let calls: Vec<_> = (0..40)
        .map(|call| {
            let store = db.store.clone();
            tokio::spawn(async move {
                let actor = if call == 17 {
                    "poison"
                } else {
                    "operator:op-1"
                };
                let body = audit::EventBody::new(1_700_000_000_000, kinds::CALL_DECISION, actor)
                    .detail(serde_json::json!({"call": call}));
                store.append_events(vec![body]).await
            })
        })
        .collect();
    let mut committed = 0;
    for (call, handle) in calls.into_iter().enumerate() {
        let result = handle.await.unwrap();
        if call == 17 {
            assert!(result.is_err(), "the refused append reports its failure");
        } else {
            assert_eq!(result.unwrap().len(), 1);
            committed += 1;
        }
    }
    assert_eq!(verify(db.store.as_ref()).await, Ok(committed));
}

pub async fn the_writer_chains_onto_the_stored_head(db: &TestDb) {
    // The writer may remember the head it last wrote, but the chain continues from the head
    // as stored: here the last event is removed behind its back (what a restore from an older
    // backup does), and the next append takes its place instead of leaving a gap.
    let store = &db.store;
    for _ in 0..3 {
        store
            .append_events(vec![event(kinds::CALL_DECISION)])
            .await
            .unwrap();
    }
    db.raw
        .execute("DELETE FROM audit_events WHERE seq = 3")
        .await;
    let appended = store
        .append_events(vec![event(kinds::CALL_DECISION)])
        .await
        .unwrap();
    assert_eq!(appended[0].seq, 3);
    assert_eq!(verify(store.as_ref()).await, Ok(3));
}

pub async fn each_state_change_writes_one_event(db: &TestDb) {
    let store = &db.store;
    let count = || async { all_events(store.as_ref()).await.len() };
    let last = || async { all_events(store.as_ref()).await.pop() };

    let event = store
        .insert_agent(&agent("bot"), crate::harness::event("a"))
        .await
        .unwrap();
    assert_eq!((count().await, last().await), (1, Some(event)));
    let event = store
        .set_agent_status(
            &"bot".parse().unwrap(),
            AgentStatus::Disabled,
            crate::harness::event("b"),
        )
        .await
        .unwrap();
    assert_eq!((count().await, last().await), (2, Some(event)));
    let event = store
        .insert_operator(&operator("op", 1), crate::harness::event("c"))
        .await
        .unwrap();
    assert_eq!((count().await, last().await), (3, Some(event)));
    let event = store
        .insert_signing_key(&signing_key("k1", 1), crate::harness::event("d"))
        .await
        .unwrap();
    assert_eq!((count().await, last().await), (4, Some(event)));
    let event = store
        .rotate_signing_key(&signing_key("k2", 2), 2, 3, crate::harness::event("e"))
        .await
        .unwrap();
    assert_eq!((count().await, last().await), (5, Some(event)));
    let event = store
        .insert_task(&task(1, "bot"), crate::harness::event("f"))
        .await
        .unwrap();
    assert_eq!((count().await, last().await), (6, Some(event)));
    let event = store
        .finish_task(&task_id(1), TaskStatus::Revoked, crate::harness::event("g"))
        .await
        .unwrap();
    assert_eq!((count().await, last().await), (7, event));
    let (_, event) = store
        .insert_revocation(
            &revocation(RevocationKind::Task, "t"),
            crate::harness::event("h"),
        )
        .await
        .unwrap();
    assert_eq!((count().await, last().await.as_ref()), (8, Some(&event)));

    // Failures write nothing and do not advance the chain.
    assert!(
        store
            .insert_agent(&agent("bot"), crate::harness::event("x"))
            .await
            .is_err()
    );
    assert!(
        store
            .insert_operator(&operator("op", 2), crate::harness::event("x"))
            .await
            .is_err()
    );
    assert!(
        store
            .insert_task(&task(1, "bot"), crate::harness::event("x"))
            .await
            .is_err()
    );
    assert!(
        store
            .insert_signing_key(&signing_key("k3", 4), crate::harness::event("x"))
            .await
            .is_err()
    );
    assert_eq!(
        store
            .finish_task(
                &task_id(1),
                TaskStatus::Completed,
                crate::harness::event("x")
            )
            .await
            .unwrap(),
        None
    );
    assert_eq!(count().await, 8);
    let next = store
        .append_events(vec![crate::harness::event("y")])
        .await
        .unwrap();
    assert_eq!(next[0].seq, 9);
    assert_eq!(next[0].prev_hash, event.hash);
    assert_eq!(verify(store.as_ref()).await, Ok(9));
}

/// A failing operation in the same batch as succeeding ones fails alone.
async fn conflicts_in_one_batch(store: &Arc<dyn Store>) {
    store
        .insert_agent(&agent("dup"), event(kinds::AGENT_REGISTERED))
        .await
        .unwrap();
    let attempts: Vec<_> = (0..30)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                if i % 3 == 0 {
                    store
                        .insert_agent(&agent("dup"), event(kinds::AGENT_REGISTERED))
                        .await
                        .map(|_| ())
                } else {
                    store
                        .append_events(vec![event(kinds::CALL_DECISION)])
                        .await
                        .map(|_| ())
                }
            })
        })
        .collect();
    let mut conflicts = 0;
    for attempt in attempts {
        match attempt.await.unwrap() {
            Ok(()) => {}
            Err(StoreError::Conflict { .. }) => conflicts += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(conflicts, 10);
    assert_eq!(verify(store.as_ref()).await, Ok(21));
}

pub async fn query_filters(db: &TestDb) {
    let store = &db.store;
    conflicts_in_one_batch(store).await;
    let base = 21;
    let mut bodies = Vec::new();
    for i in 0..30i64 {
        let mut body =
            event(kinds::CALL_DECISION).decision(if i % 2 == 0 { "allow" } else { "deny" });
        body.time_ms = 1_800_000_000_000 + i * 1_000;
        body = body.agent(if i % 3 == 0 { "alpha" } else { "beta" });
        if i % 5 == 0 {
            body = body.task("task_five");
        }
        bodies.push(body);
    }
    store.append_events(bodies).await.unwrap();
    let query = |filter: AuditFilter| {
        let store = store.clone();
        async move {
            store
                .query_events(&filter)
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.seq - base)
                .collect::<Vec<u64>>()
        }
    };
    let alpha = query(AuditFilter {
        agent: Some("alpha".into()),
        limit: 100,
        ..Default::default()
    })
    .await;
    assert_eq!(alpha, [1, 4, 7, 10, 13, 16, 19, 22, 25, 28]);
    let five = query(AuditFilter {
        task: Some("task_five".into()),
        limit: 100,
        ..Default::default()
    })
    .await;
    assert_eq!(five, [1, 6, 11, 16, 21, 26]);
    let both = query(AuditFilter {
        agent: Some("alpha".into()),
        task: Some("task_five".into()),
        limit: 100,
        ..Default::default()
    })
    .await;
    assert_eq!(both, [1, 16]);
    let window = AuditFilter {
        since_ms: Some(1_800_000_010_000),
        until_ms: Some(1_800_000_013_000),
        limit: 100,
        ..Default::default()
    };
    assert_eq!(query(window).await, [11, 12, 13]);
    let after = AuditFilter {
        agent: Some("beta".into()),
        after_seq: Some(base + 25),
        limit: 100,
        ..Default::default()
    };
    assert_eq!(query(after).await, [26, 27, 29, 30]);
    let limited = AuditFilter {
        agent: Some("beta".into()),
        limit: 3,
        ..Default::default()
    };
    assert_eq!(query(limited).await, [2, 3, 5]);
    assert!(
        query(AuditFilter {
            agent: Some("nobody".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .is_empty()
    );

    // Once the filler has filled the agent and task lookups (within its interval), the same
    // queries are answered through them; events appended after that are found in the log's
    // tail, and one answer joins both parts in order.
    let head = i64::try_from(base + 30).unwrap();
    let filled = eventually(|| async {
        db.raw
            .number("SELECT through_seq FROM audit_lookup_mark")
            .await
            >= head
    })
    .await;
    assert!(filled, "the filler never filled the audit lookups");
    assert!(
        db.raw
            .number("SELECT COUNT(*) FROM audit_task_events WHERE task = 'task_five'")
            .await
            >= 6
    );
    let mut later = Vec::new();
    for i in 30..36i64 {
        let body = event(kinds::CALL_DECISION)
            .agent(if i % 3 == 0 { "alpha" } else { "beta" })
            .task("task_five");
        later.push(body);
    }
    store.append_events(later).await.unwrap();
    let five = query(AuditFilter {
        task: Some("task_five".into()),
        limit: 100,
        ..Default::default()
    })
    .await;
    assert_eq!(five, [1, 6, 11, 16, 21, 26, 31, 32, 33, 34, 35, 36]);
    let alpha = query(AuditFilter {
        agent: Some("alpha".into()),
        limit: 100,
        ..Default::default()
    })
    .await;
    assert_eq!(alpha, [1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 34]);
    let both = query(AuditFilter {
        agent: Some("alpha".into()),
        task: Some("task_five".into()),
        limit: 100,
        ..Default::default()
    })
    .await;
    assert_eq!(both, [1, 16, 31, 34]);
    // Limits and order across the two parts, oldest and newest first.
    let oldest = query(AuditFilter {
        task: Some("task_five".into()),
        limit: 7,
        ..Default::default()
    })
    .await;
    assert_eq!(oldest, [1, 6, 11, 16, 21, 26, 31]);
    let newest = query(AuditFilter {
        task: Some("task_five".into()),
        limit: 8,
        newest: true,
        ..Default::default()
    })
    .await;
    assert_eq!(newest, [21, 26, 31, 32, 33, 34, 35, 36]);
    let after = query(AuditFilter {
        agent: Some("beta".into()),
        after_seq: Some(base + 25),
        limit: 100,
        ..Default::default()
    })
    .await;
    assert_eq!(after, [26, 27, 29, 30, 32, 33, 35, 36]);
    let window = query(AuditFilter {
        agent: Some("beta".into()),
        since_ms: Some(1_800_000_010_000),
        until_ms: Some(1_800_000_013_000),
        limit: 100,
        ..Default::default()
    })
    .await;
    assert_eq!(window, [11, 12]);
    let base = base + 6;

    // Limit 0 means 100; more than 1,000 means 1,000.
    let many: Vec<_> = (0..1_100).map(|_| event(kinds::CALL_DECISION)).collect();
    store.append_events(many).await.unwrap();
    assert_eq!(
        store
            .query_events(&AuditFilter::default())
            .await
            .unwrap()
            .len(),
        100
    );
    let capped = store
        .query_events(&AuditFilter {
            limit: 5_000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(capped.len(), 1_000);
    assert_eq!(capped[0].seq, 1);
    // The newest events, still in sequence order.
    let newest = store
        .query_events(&AuditFilter {
            limit: 3,
            newest: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let seqs: Vec<_> = newest.iter().map(|e| e.seq).collect();
    let last = base + 30 + 1_100;
    assert_eq!(seqs, [last - 2, last - 1, last]);
    assert_eq!(verify(store.as_ref()).await, Ok(last));
}

/// Two stores on the same data (the server and the CLI, or two replicas) append concurrently
/// and still produce one chain, because each transaction reads the head it extends.
pub async fn two_stores_share_one_chain(db: &TestDb) {
    let other = store::open(&db.url).await.unwrap();
    let mut writers = Vec::new();
    for (index, store) in [db.store.clone(), other.clone()].into_iter().enumerate() {
        for writer in 0..4 {
            let store = store.clone();
            writers.push(tokio::spawn(async move {
                for call in 0..25 {
                    let detail =
                        serde_json::json!({"store": index, "writer": writer, "call": call});
                    store
                        .append_events(vec![event(kinds::CALL_DECISION).detail(detail)])
                        .await
                        .unwrap();
                }
            }));
        }
    }
    for writer in writers {
        writer.await.unwrap();
    }
    assert_eq!(verify(db.store.as_ref()).await, Ok(200));
    assert_eq!(verify(other.as_ref()).await, Ok(200));
}

/// Batches across the sizes where SQLite's one-round-trip append changes shape (one chunk of
/// 128 rows, several, more than it takes), from two stores over the same data so that the
/// head moves under each of them and guards fail part-way through a many-chunk batch.
pub async fn large_batches_keep_one_chain_across_stores(db: &TestDb) {
    let other = store::open(&db.url).await.unwrap();
    let sizes = [1usize, 127, 128, 129, 256, 300, 512, 513, 600];
    let mut writers = Vec::new();
    for (index, store) in [db.store.clone(), other.clone()].into_iter().enumerate() {
        for writer in 0..2 {
            let store = store.clone();
            writers.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                for (call, size) in sizes.into_iter().enumerate() {
                    let bodies: Vec<_> = (0..size)
                        .map(|i| {
                            event(kinds::CALL_OUTCOME).detail(serde_json::json!({
                                "store": index, "writer": writer, "call": call, "i": i
                            }))
                        })
                        .collect();
                    let events = store.append_events(bodies.clone()).await.unwrap();
                    assert_eq!(
                        events.iter().map(|e| e.body.clone()).collect::<Vec<_>>(),
                        bodies
                    );
                    assert!(events.windows(2).all(|pair| pair[1].seq == pair[0].seq + 1));
                    mine.extend(events);
                }
                mine
            }));
        }
    }
    let mut returned = Vec::new();
    for writer in writers {
        returned.extend(writer.await.unwrap());
    }
    let expected = sizes.iter().sum::<usize>() as u64 * 4;
    assert_eq!(verify(db.store.as_ref()).await, Ok(expected));
    assert_eq!(verify(other.as_ref()).await, Ok(expected));
    returned.sort_by_key(|e| e.seq);
    assert_eq!(returned, all_events(db.store.as_ref()).await);
}

pub async fn reopen_continues_the_chain(db: &TestDb) {
    let first = store::open(&db.url).await.unwrap();
    first
        .insert_agent(&agent("bot"), event(kinds::AGENT_REGISTERED))
        .await
        .unwrap();
    first
        .append_events(vec![event(kinds::CALL_DECISION); 3])
        .await
        .unwrap();
    drop(first);
    let second = store::open(&db.url).await.unwrap();
    assert_eq!(
        second.get_agent(&"bot".parse().unwrap()).await.unwrap(),
        Some(agent("bot"))
    );
    let next = second
        .append_events(vec![event(kinds::CALL_DECISION)])
        .await
        .unwrap();
    assert_eq!(next[0].seq, 5);
    assert_eq!(verify(second.as_ref()).await, Ok(5));
    assert_eq!(
        second.kind(),
        if db.is_postgres() {
            "postgres"
        } else {
            "sqlite"
        }
    );
    second.ping().await.unwrap();
}

fn approval(id: &str, task: u8, digest: &str, expires_at: i64) -> ApprovalRecord {
    ApprovalRecord {
        id: id.to_string(),
        task: task_id(task),
        agent: "spiffe://example.org/agent/ops-bot".parse().unwrap(),
        owner: "alice@example.org".parse().unwrap(),
        tool: "iam".to_string(),
        action: "attach_policy".to_string(),
        resource: "roles/admin".to_string(),
        args_digest: digest.to_string(),
        status: ApprovalStatus::Pending,
        created_at: 1_700_000_000,
        expires_at,
        decided_by: None,
        decision_reason: None,
        decided_at: None,
    }
}

fn call<'a>(task: &'a model::TaskId, digest: &'a str) -> ApprovalKey<'a> {
    ApprovalKey {
        task,
        tool: "iam",
        action: "attach_policy",
        resource: "roles/admin",
        args_digest: digest,
    }
}

async fn with_task(store: &Arc<dyn Store>) -> model::TaskId {
    store
        .insert_agent(&agent("ops-bot"), event(kinds::AGENT_REGISTERED))
        .await
        .unwrap();
    let task = task(1, "ops-bot");
    store
        .insert_task(&task, event(kinds::TASK_GRANTED))
        .await
        .unwrap();
    task.id
}

pub async fn approvals(db: &TestDb) {
    let store = &db.store;
    let task = with_task(store).await;
    let now = 1_700_000_100;
    let filed = approval("apr_01", 1, "d1", now + 600);
    let before = all_events(store.as_ref()).await.len();
    let event_written = store
        .insert_approval(&filed, event(kinds::APPROVAL_REQUESTED).task(task.as_str()))
        .await
        .unwrap();
    assert_eq!(event_written.body.kind, kinds::APPROVAL_REQUESTED);
    assert_eq!(all_events(store.as_ref()).await.len(), before + 1);
    assert_eq!(
        store.get_approval("apr_01").await.unwrap(),
        Some(filed.clone())
    );
    assert_eq!(store.get_approval("apr_none").await.unwrap(), None);
    let again = store
        .insert_approval(&filed, event(kinds::APPROVAL_REQUESTED))
        .await;
    assert!(
        matches!(
            &again,
            Err(StoreError::Conflict {
                what: "approval",
                ..
            })
        ),
        "{again:?}"
    );
    let orphan = store
        .insert_approval(
            &approval("apr_02", 9, "d1", now + 600),
            event(kinds::APPROVAL_REQUESTED),
        )
        .await;
    assert!(
        matches!(&orphan, Err(StoreError::NotFound { what: "task", .. })),
        "{orphan:?}"
    );

    // A pending approval is found for the exact call only, and not once it expired.
    let found = store
        .pending_approval_for(call(&task, "d1"), now)
        .await
        .unwrap();
    assert_eq!(found.map(|a| a.id), Some("apr_01".to_string()));
    let other = store
        .pending_approval_for(call(&task, "d2"), now)
        .await
        .unwrap();
    assert_eq!(other, None);
    let late = store
        .pending_approval_for(call(&task, "d1"), now + 600)
        .await
        .unwrap();
    assert_eq!(late, None);

    // Nothing to consume while it is pending.
    let count = all_events(store.as_ref()).await.len();
    let early = store
        .consume_approval(call(&task, "d1"), now, event(kinds::APPROVAL_CONSUMED))
        .await
        .unwrap();
    assert_eq!(early, None);
    assert_eq!(all_events(store.as_ref()).await.len(), count, "no event");

    // Approve: who, why and when are recorded with one event; a second decision changes nothing.
    let approved = store
        .decide_approval(
            "apr_01",
            true,
            "operator:op_1",
            "change ticket 42",
            now + 10,
            event(kinds::APPROVAL_APPROVED),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(approved.status, ApprovalStatus::Approved);
    assert_eq!(approved.decided_by.as_deref(), Some("operator:op_1"));
    assert_eq!(
        approved.decision_reason.as_deref(),
        Some("change ticket 42")
    );
    assert_eq!(approved.decided_at, Some(now + 10));
    assert_eq!(all_events(store.as_ref()).await.len(), count + 1);
    let twice = store
        .decide_approval(
            "apr_01",
            false,
            "operator:op_2",
            "no",
            now + 11,
            event(kinds::APPROVAL_DENIED),
        )
        .await
        .unwrap();
    assert_eq!(twice, None);
    let unknown = store
        .decide_approval(
            "apr_none",
            true,
            "operator:op_1",
            "x",
            now,
            event(kinds::APPROVAL_APPROVED),
        )
        .await
        .unwrap();
    assert_eq!(unknown, None);
    assert_eq!(all_events(store.as_ref()).await.len(), count + 1);
    assert_eq!(
        store
            .pending_approval_for(call(&task, "d1"), now)
            .await
            .unwrap(),
        None
    );

    // Other arguments do not spend it; the exact call does, once, and its event names it.
    assert_eq!(
        store
            .consume_approval(call(&task, "d2"), now + 20, event(kinds::APPROVAL_CONSUMED))
            .await
            .unwrap(),
        None
    );
    let spent = store
        .consume_approval(call(&task, "d1"), now + 20, event(kinds::APPROVAL_CONSUMED))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(spent.id, "apr_01");
    assert_eq!(spent.status, ApprovalStatus::Consumed);
    let last = all_events(store.as_ref()).await.pop().unwrap();
    assert_eq!(last.body.kind, kinds::APPROVAL_CONSUMED);
    assert_eq!(last.body.detail.to_value()["approval"], "apr_01");
    assert_eq!(
        store
            .consume_approval(call(&task, "d1"), now + 21, event(kinds::APPROVAL_CONSUMED))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store.get_approval("apr_01").await.unwrap().unwrap().status,
        ApprovalStatus::Consumed
    );

    // Expiry: an approved approval past its time is not spent, a pending one not decided.
    store
        .insert_approval(
            &approval("apr_03", 1, "d3", now + 60),
            event(kinds::APPROVAL_REQUESTED),
        )
        .await
        .unwrap();
    store
        .decide_approval(
            "apr_03",
            true,
            "operator:op_1",
            "ok",
            now + 30,
            event(kinds::APPROVAL_APPROVED),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store
            .consume_approval(call(&task, "d3"), now + 60, event(kinds::APPROVAL_CONSUMED))
            .await
            .unwrap(),
        None
    );
    store
        .insert_approval(
            &approval("apr_04", 1, "d4", now + 60),
            event(kinds::APPROVAL_REQUESTED),
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .decide_approval(
                "apr_04",
                true,
                "operator:op_1",
                "ok",
                now + 61,
                event(kinds::APPROVAL_APPROVED)
            )
            .await
            .unwrap(),
        None
    );

    // A denied approval is never spent.
    store
        .insert_approval(
            &approval("apr_05", 1, "d5", now + 600),
            event(kinds::APPROVAL_REQUESTED),
        )
        .await
        .unwrap();
    let denied = store
        .decide_approval(
            "apr_05",
            false,
            "operator:op_1",
            "not during the freeze",
            now,
            event(kinds::APPROVAL_DENIED),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(denied.status, ApprovalStatus::Denied);
    assert_eq!(
        store
            .consume_approval(call(&task, "d5"), now, event(kinds::APPROVAL_CONSUMED))
            .await
            .unwrap(),
        None
    );

    // Listing: by stored status, newest first.
    let ids = |list: Vec<ApprovalRecord>| list.into_iter().map(|a| a.id).collect::<Vec<_>>();
    let pending = store
        .list_approvals(Some(ApprovalStatus::Pending), 0)
        .await
        .unwrap();
    assert_eq!(ids(pending), ["apr_04"]);
    assert_eq!(store.list_approvals(None, 0).await.unwrap().len(), 4);
    assert_eq!(store.list_approvals(None, 2).await.unwrap().len(), 2);
    assert_eq!(verify(store.as_ref()).await.map(|n| n > 0), Ok(true));
}

pub async fn approval_is_spent_once_under_race(db: &TestDb) {
    let store = &db.store;
    let task = with_task(store).await;
    let now = 1_700_000_100;
    store
        .insert_approval(
            &approval("apr_race", 1, "d1", now + 600),
            event(kinds::APPROVAL_REQUESTED),
        )
        .await
        .unwrap();
    store
        .decide_approval(
            "apr_race",
            true,
            "operator:op_1",
            "ok",
            now,
            event(kinds::APPROVAL_APPROVED),
        )
        .await
        .unwrap()
        .unwrap();
    // Consumers on two stores over the same data: two writers, as two replicas would have.
    let other = store::open(&db.url).await.unwrap();
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let store = if i % 2 == 0 {
                Arc::clone(store)
            } else {
                Arc::clone(&other)
            };
            let task = task.clone();
            tokio::spawn(async move {
                store
                    .consume_approval(call(&task, "d1"), now + 1, event(kinds::APPROVAL_CONSUMED))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut winners = 0;
    for racer in racers {
        if racer.await.unwrap().is_some() {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
    let consumed = all_events(store.as_ref())
        .await
        .into_iter()
        .filter(|e| e.body.kind == kinds::APPROVAL_CONSUMED)
        .count();
    assert_eq!(consumed, 1);
    drop(other);
}

fn spend(iat: i64, n: u8) -> store::ProofSpend {
    store::ProofSpend {
        iat,
        digest: [n; 32],
    }
}

/// A proof is spent once across every store on the same data (the replicas of a cluster): a
/// second spend is a `proof` conflict that writes nothing, whichever store tries it, whether
/// it rides with an append, a task's insert or its end, and whether it meets the first spend
/// in an earlier transaction or in the same batch. Proofs too old to be accepted are swept.
pub async fn a_proof_is_spent_once_across_stores(db: &TestDb) {
    let other = store::open(&db.url).await.unwrap();
    let stores = [db.store.clone(), other.clone()];
    fn refused<T>(result: Result<T, StoreError>) -> bool {
        matches!(result, Err(StoreError::Conflict { what: "proof", .. }))
    }

    stores[0]
        .append_spending(spend(1_000, 1), event(kinds::CALL_DECISION))
        .await
        .unwrap();
    assert!(refused(
        stores[1]
            .append_spending(spend(1_000, 1), event(kinds::CALL_DECISION))
            .await
    ));
    // The same key and `jti` at another `iat` is another proof.
    stores[1]
        .append_spending(spend(1_001, 1), event(kinds::CALL_DECISION))
        .await
        .unwrap();
    assert_eq!(verify(db.store.as_ref()).await, Ok(2));

    // Many concurrent calls on both stores, each with a proof of its own, and eight replays
    // of one proof among them: batches that hold a replay fall back to the careful path, and
    // only the replays are refused.
    let mut writers = Vec::new();
    for round in 0..4u8 {
        for (index, store) in stores.iter().enumerate() {
            for writer in 0..8u8 {
                let store = store.clone();
                writers.push(tokio::spawn(async move {
                    let unique = spend(2_000 + i64::from(round), 10 + writer * 2 + index as u8);
                    let own = store.append_spending(unique, event(kinds::CALL_DECISION));
                    let replay =
                        store.append_spending(spend(3_000, 2), event(kinds::CALL_DECISION));
                    let (own, replay) = tokio::join!(own, replay);
                    own.unwrap();
                    replay.is_ok()
                }));
            }
        }
    }
    let mut accepted = 0;
    for writer in writers {
        accepted += usize::from(writer.await.unwrap());
    }
    assert_eq!(
        accepted, 1,
        "one replayed proof was accepted {accepted} times"
    );
    assert_eq!(verify(db.store.as_ref()).await, Ok(2 + 64 + 1));

    // The grant path: a task is inserted, or ended, with its proof spent.
    insert_parent_agent(db).await;
    let first = task(1, "triage-bot");
    let before = verify(db.store.as_ref()).await.unwrap();
    stores[0]
        .insert_task_spending(&first, event(kinds::TASK_GRANTED), spend(4_000, 3))
        .await
        .unwrap();
    let second = task(2, "triage-bot");
    assert!(refused(
        stores[1]
            .insert_task_spending(&second, event(kinds::TASK_GRANTED), spend(4_000, 3))
            .await
    ));
    assert_eq!(stores[0].get_task(&second.id).await.unwrap(), None);
    assert!(refused(
        stores[1]
            .finish_task_spending(
                &first.id,
                TaskStatus::Completed,
                event(kinds::TASK_COMPLETED),
                spend(4_000, 3),
            )
            .await
    ));
    assert_eq!(
        stores[0].get_task(&first.id).await.unwrap().unwrap().status,
        TaskStatus::Active
    );
    stores[1]
        .finish_task_spending(
            &first.id,
            TaskStatus::Completed,
            event(kinds::TASK_COMPLETED),
            spend(4_001, 3),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(verify(db.store.as_ref()).await, Ok(before + 2));

    // Swept proofs are forgotten; later ones are kept.
    assert_eq!(db.store.sweep_proof_spends(2_000).await.unwrap(), 2);
    stores[1]
        .append_spending(spend(1_000, 1), event(kinds::CALL_DECISION))
        .await
        .unwrap();
    assert!(refused(
        stores[0]
            .append_spending(spend(3_000, 2), event(kinds::CALL_DECISION))
            .await
    ));
}

async fn insert_parent_agent(db: &TestDb) {
    db.store
        .insert_agent(&agent("triage-bot"), event(kinds::AGENT_REGISTERED))
        .await
        .unwrap();
}
