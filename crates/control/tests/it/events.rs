//! One audit event of each kind the control plane writes, as a snapshot: what the log keeps of
//! each action (actor, agent, task, decision, detail) is a contract with whoever reads it, so
//! a change to it shows up in review. Times, hashes and ids are filtered.

use std::collections::BTreeMap;

use model::{ActionClass, Role};
use serde_json::Value;
use store::{AuditFilter, RevocationKind};

use crate::approvals::{ARGS, attach, operator, required};
use crate::delegation::exchange;
use crate::harness::Harness;

#[tokio::test]
async fn one_event_of_each_kind() {
    let h = Harness::new().await;
    h.authority
        .create_operator(&h.admin, "carol", Role::Approver)
        .await
        .unwrap();
    let lead = h.agent("lead-bot", "alice@example.org").await;
    let helper = h.agent("helper-bot", "bob@example.org").await;

    // A grant, an allowed call, and a task policy refuses (a wildcard on a vault).
    let root = h.grant(&lead).await;
    assert!(
        h.call(&lead, &root, "read_issue", ActionClass::Read)
            .await
            .is_allow()
    );
    let refused = serde_json::json!([{ "tool": "vault", "actions": ["*"] }]);
    let error = h.request(&lead, refused, None, None).await.unwrap_err();
    assert_eq!(error.code, "task_refused");

    // A delegation down to the helper, then the root revoked.
    exchange(
        &h,
        &helper,
        root.token.expose(),
        Some("github:read_issue@acme/*"),
        Some(60),
        Some(3),
    )
    .await
    .unwrap();
    h.authority
        .revoke(
            &h.admin,
            RevocationKind::Task,
            root.task_id.as_str(),
            "incident 42",
        )
        .await
        .unwrap();

    // A step-up call: requested, approved, consumed; a second one denied.
    let (ops, grant) = crate::approvals::setup(&h).await;
    let approver = operator("carol", Role::Approver);
    let id = required(&attach(&h, &ops, &grant, ARGS).await);
    h.authority
        .decide_approval(&approver, &id, true, "change 7 is approved")
        .await
        .unwrap();
    assert!(attach(&h, &ops, &grant, ARGS).await.is_allow());
    let id = required(&attach(&h, &ops, &grant, ARGS).await);
    h.authority
        .decide_approval(&approver, &id, false, "not twice")
        .await
        .unwrap();

    // A task completed by its agent.
    let done = h.grant(&lead).await;
    let url = format!(
        "{}/v1/tasks/{}/complete",
        crate::harness::BASE,
        done.task_id
    );
    let proof = lead
        .key
        .sign_proof(
            "POST",
            &url,
            Some(done.token.expose()),
            h.now(),
            "complete-1",
        )
        .unwrap();
    h.authority
        .complete_task(done.task_id.as_str(), done.token.expose(), Some(&proof))
        .await
        .unwrap();

    // Ten denials within a minute quarantine an agent; an operator releases it.
    let noisy = h.agent("noisy-bot", "alice@example.org").await;
    let task = h.grant(&noisy).await;
    for _ in 0..10 {
        h.call(&noisy, &task, "delete_repo", ActionClass::Admin)
            .await;
    }
    h.authority
        .release_agent(&h.admin, "noisy-bot", "reviewed: a test")
        .await
        .unwrap();

    // An agent disabled, and the signing key rotated.
    h.authority
        .disable_agent(&h.admin, "helper-bot", "no longer needed")
        .await
        .unwrap();
    h.authority.rotate_keys(&h.admin).await.unwrap();

    let events = h
        .authority
        .audit_events(
            &h.admin,
            &AuditFilter {
                limit: store::QUERY_LIMIT_MAX,
                ..AuditFilter::default()
            },
        )
        .await
        .unwrap();
    let mut first: BTreeMap<String, Value> = BTreeMap::new();
    for event in &events {
        first
            .entry(event.body.kind.clone())
            .or_insert_with(|| serde_json::to_value(event).unwrap());
    }
    // Every kind the control plane writes; `call.outcome` is the gateway's (its tests snapshot
    // it), and nothing in this crate writes `operator.action`.
    let kinds: Vec<&str> = first.keys().map(String::as_str).collect();
    assert_eq!(
        kinds,
        [
            "agent.disabled",
            "agent.quarantined",
            "agent.registered",
            "agent.released",
            "approval.approved",
            "approval.consumed",
            "approval.denied",
            "approval.requested",
            "call.decision",
            "delegation",
            "key.created",
            "key.rotated",
            "operator.created",
            "revocation",
            "task.completed",
            "task.delegated",
            "task.granted",
            "task.refused",
            "task.revoked",
        ]
    );
    insta::with_settings!({ filters => store::testing::SNAPSHOT_FILTERS.to_vec() }, {
        insta::assert_json_snapshot!(first);
    });
}
