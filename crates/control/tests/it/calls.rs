//! The call-path decision: each step denies on its own, the very next call after a
//! revocation is denied, and every decision is in the audit log without secrets.

use control::clock::Clock;
use model::{ActionClass, Decision};
use serde_json::json;
use store::RevocationKind;

use crate::harness::{BASE, Harness, unique};

#[tokio::test]
async fn inside_the_scope_allowed_outside_denied() {
    let h = Harness::new().await;
    let agent = h.agent("triage-bot", "alice@example.org").await;
    let grant = h.grant(&agent).await;

    let verdict = h
        .call(&agent, &grant, "read_issue", ActionClass::Read)
        .await;
    assert_eq!(
        (verdict.report.decision, verdict.code),
        (Decision::Allow, "allowed")
    );
    assert_eq!(verdict.report.policies, vec!["call.read"]);
    assert!(verdict.audit_seq.is_some());

    let verdict = h
        .call(&agent, &grant, "delete_repo", ActionClass::Admin)
        .await;
    assert_eq!(
        (verdict.report.decision, verdict.code),
        (Decision::Deny, "out_of_scope")
    );

    let url = format!("{BASE}/http/github/read_issue");
    let token = grant.token.expose();
    let proof = agent
        .key
        .sign_proof("POST", &url, Some(token), h.now(), &unique("p"))
        .unwrap();
    let verdict = h
        .attempt(
            token,
            Some(&proof),
            &url,
            "github",
            "read_issue",
            "other-org/api",
            ActionClass::Read,
        )
        .await;
    assert_eq!(
        verdict.code, "out_of_scope",
        "a resource outside the patterns is out of scope"
    );
}

#[tokio::test]
async fn each_revocation_kind_bites_on_the_next_call() {
    for kind in [
        RevocationKind::Token,
        RevocationKind::Task,
        RevocationKind::Agent,
        RevocationKind::Owner,
    ] {
        let h = Harness::new().await;
        let agent = h.agent("triage-bot", "alice@example.org").await;
        let grant = h.grant(&agent).await;
        assert_eq!(
            h.call(&agent, &grant, "read_issue", ActionClass::Read)
                .await
                .report
                .decision,
            Decision::Allow
        );

        let claims = h
            .authority
            .keys()
            .verifier()
            .verify(grant.token.expose(), h.now())
            .unwrap();
        let target = match kind {
            RevocationKind::Token => claims.jti.clone(),
            RevocationKind::Task => grant.task_id.to_string(),
            RevocationKind::Agent => "triage-bot".to_string(),
            RevocationKind::Owner => "alice@example.org".to_string(),
        };
        h.authority
            .revoke(&h.admin, kind, &target, "incident")
            .await
            .unwrap();

        let verdict = h
            .call(&agent, &grant, "read_issue", ActionClass::Read)
            .await;
        assert_eq!(
            (verdict.report.decision, verdict.code),
            (Decision::Deny, "revoked"),
            "{kind:?}"
        );
        assert!(verdict.message.contains(&target), "{}", verdict.message);
    }
}

/// The call path caches each verified token and shares what tokens have in common (agent,
/// key thumbprint, scopes, owner, intent): tokens that share all of it must still be told
/// apart, and a cached token must still be checked in full.
#[tokio::test]
async fn tokens_that_share_cached_values_are_still_told_apart() {
    let h = Harness::new().await;
    let agent = h.agent("triage-bot", "alice@example.org").await;
    let thief = h.agent("thief-bot", "mallory@example.org").await;
    let first = h.grant(&agent).await;
    let second = h.grant(&agent).await;
    for grant in [&first, &second] {
        let verdict = h.call(&agent, grant, "read_issue", ActionClass::Read).await;
        assert!(verdict.is_allow(), "{}", verdict.message);
        assert_eq!(verdict.task.as_deref(), Some(grant.task_id.as_str()));
    }

    h.authority
        .revoke(
            &h.admin,
            RevocationKind::Task,
            first.task_id.as_str(),
            "incident",
        )
        .await
        .unwrap();
    assert!(
        h.call(&agent, &second, "read_issue", ActionClass::Read)
            .await
            .is_allow()
    );

    // The cached second token still wants proofs from its own key, each used once.
    let token = second.token.expose();
    let url = format!("{BASE}/http/github/read_issue");
    let call = |proof: String| {
        let (h, url) = (&h, url.clone());
        async move {
            h.attempt(
                token,
                Some(&proof),
                &url,
                "github",
                "read_issue",
                "acme/api",
                ActionClass::Read,
            )
            .await
            .code
        }
    };
    let proof = agent
        .key
        .sign_proof("POST", &url, Some(token), h.now(), &unique("p"))
        .unwrap();
    assert_eq!(call(proof.clone()).await, "allowed");
    assert_eq!(call(proof).await, "proof_replayed");
    // Last but one: a proof by another key quarantines the agent (containment).
    let stolen = thief
        .key
        .sign_proof("POST", &url, Some(token), h.now(), &unique("p"))
        .unwrap();
    assert_eq!(call(stolen).await, "proof_key_mismatch");

    // The first task's revocation is found before the agent's.
    let verdict = h
        .call(&agent, &first, "read_issue", ActionClass::Read)
        .await;
    assert_eq!(verdict.code, "revoked");
    assert!(
        verdict.message.contains(first.task_id.as_str()),
        "{}",
        verdict.message
    );
}

#[tokio::test]
async fn a_revocation_written_by_another_process_arrives_with_the_catch_up() {
    let h = Harness::new().await;
    let agent = h.agent("triage-bot", "alice@example.org").await;
    let grant = h.grant(&agent).await;
    // Another process (the CLI) writes to the same store; this node learns of it on sync.
    let revocation = store::NewRevocation {
        kind: RevocationKind::Task,
        target: grant.task_id.to_string(),
        reason: "from the CLI".into(),
        created_at: h.now(),
    };
    let event = audit::EventBody::new(h.clock.now_ms(), audit::kinds::REVOCATION, "operator:local");
    h.authority
        .store()
        .insert_revocation(&revocation, event)
        .await
        .unwrap();
    assert_eq!(
        h.call(&agent, &grant, "read_issue", ActionClass::Read)
            .await
            .report
            .decision,
        Decision::Allow
    );
    h.authority.sync().await.unwrap();
    assert_eq!(
        h.call(&agent, &grant, "read_issue", ActionClass::Read)
            .await
            .code,
        "revoked"
    );
}

#[tokio::test]
async fn a_disabled_agent_loses_its_tasks() {
    let h = Harness::new().await;
    let agent = h.agent("triage-bot", "alice@example.org").await;
    let grant = h.grant(&agent).await;
    h.authority
        .disable_agent(&h.admin, "triage-bot", "compromised")
        .await
        .unwrap();
    assert_eq!(
        h.call(&agent, &grant, "read_issue", ActionClass::Read)
            .await
            .code,
        "revoked"
    );
}

#[tokio::test]
async fn budget_and_expiry_end_a_task() {
    let h = Harness::new().await;
    let agent = h.agent("triage-bot", "alice@example.org").await;
    let scopes = json!([{ "tool": "github", "actions": ["read_issue"] }]);
    let grant = h
        .request(&agent, scopes.clone(), Some(60), Some(2))
        .await
        .unwrap();
    assert!(
        h.call(&agent, &grant, "read_issue", ActionClass::Read)
            .await
            .is_allow()
    );
    assert!(
        h.call(&agent, &grant, "read_issue", ActionClass::Read)
            .await
            .is_allow()
    );
    let verdict = h
        .call(&agent, &grant, "read_issue", ActionClass::Read)
        .await;
    assert_eq!(
        (verdict.report.decision, verdict.code),
        (Decision::Deny, "budget_exhausted")
    );
    // The count reaches the store with the next catch-up, in one batch.
    let stored = |id: model::TaskId| {
        let authority = h.authority.clone();
        async move {
            authority
                .store()
                .get_task(&id)
                .await
                .unwrap()
                .unwrap()
                .calls_used
        }
    };
    assert_eq!(stored(grant.task_id.clone()).await, 0);
    h.authority.sync().await.unwrap();
    assert_eq!(stored(grant.task_id.clone()).await, 2);

    let grant = h.request(&agent, scopes, Some(60), None).await.unwrap();
    h.clock.advance_seconds(59);
    assert!(
        h.call(&agent, &grant, "read_issue", ActionClass::Read)
            .await
            .is_allow()
    );
    h.clock.advance_seconds(1);
    let verdict = h
        .call(&agent, &grant, "read_issue", ActionClass::Read)
        .await;
    assert_eq!(verdict.report.decision, Decision::Deny);
    assert_eq!(verdict.code, "task_expired");
    h.clock.advance_seconds(60);
    let verdict = h
        .call(&agent, &grant, "read_issue", ActionClass::Read)
        .await;
    assert_eq!(
        verdict.code, "token_expired",
        "past the skew the cached token itself is refused"
    );
}

#[tokio::test]
async fn the_proof_is_bound_to_key_request_and_moment() {
    let h = Harness::new().await;
    let agent = h.agent("triage-bot", "alice@example.org").await;
    let thief = h.agent("thief-bot", "mallory@example.org").await;
    let grant = h.grant(&agent).await;
    let token = grant.token.expose();
    let url = format!("{BASE}/http/github/read_issue");
    let call = |proof: Option<String>| {
        let h = &h;
        let url = url.clone();
        async move {
            h.attempt(
                token,
                proof.as_deref(),
                &url,
                "github",
                "read_issue",
                "acme/api",
                ActionClass::Read,
            )
            .await
        }
    };

    assert_eq!(call(None).await.code, "proof_missing");
    let elsewhere = agent
        .key
        .sign_proof(
            "POST",
            &format!("{BASE}/http/github/other"),
            Some(token),
            h.now(),
            &unique("p"),
        )
        .unwrap();
    assert_eq!(call(Some(elsewhere)).await.code, "proof_wrong_url");
    let proof = agent
        .key
        .sign_proof("POST", &url, Some(token), h.now(), &unique("p"))
        .unwrap();
    assert!(call(Some(proof.clone())).await.is_allow());
    assert_eq!(call(Some(proof)).await.code, "proof_replayed");
    let stale = agent
        .key
        .sign_proof("POST", &url, Some(token), h.now() - 120, &unique("p"))
        .unwrap();
    assert_eq!(call(Some(stale)).await.code, "proof_iat_too_old");

    // Last: a proof by another key means the token got out, which quarantines its agent.
    let stolen = thief
        .key
        .sign_proof("POST", &url, Some(token), h.now(), &unique("p"))
        .unwrap();
    assert_eq!(call(Some(stolen)).await.code, "proof_key_mismatch");
    let agent_now = h.authority.get_agent(&h.admin, "triage-bot").await.unwrap();
    assert_eq!(agent_now.status, model::AgentStatus::Quarantined);
}

#[tokio::test]
async fn identity_infrastructure_changes_need_approval() {
    let h = Harness::new().await;
    let agent = h.agent("ops-bot", "alice@example.org").await;
    let scopes = json!([{ "tool": "iam", "actions": ["list_roles", "attach_policy"] }]);
    let grant = h.request(&agent, scopes, None, None).await.unwrap();
    let url = format!("{BASE}/http/iam/x");
    let token = grant.token.expose();
    let proof = agent
        .key
        .sign_proof("POST", &url, Some(token), h.now(), &unique("p"))
        .unwrap();
    let read = h
        .attempt(
            token,
            Some(&proof),
            &url,
            "iam",
            "list_roles",
            "roles",
            ActionClass::Read,
        )
        .await;
    assert!(read.is_allow(), "{read:?}");
    let proof = agent
        .key
        .sign_proof("POST", &url, Some(token), h.now(), &unique("p"))
        .unwrap();
    let write = h
        .attempt(
            token,
            Some(&proof),
            &url,
            "iam",
            "attach_policy",
            "roles/admin",
            ActionClass::Write,
        )
        .await;
    assert_eq!(
        (write.report.decision, write.code),
        (Decision::ApprovalRequired, "approval_required")
    );
    assert_eq!(write.report.policies, vec!["call.approve-identity"]);
}

#[tokio::test]
async fn every_decision_is_audited_and_no_secret_reaches_the_log() {
    let h = Harness::new().await;
    let (_, operator_token) = h
        .authority
        .create_operator(&h.admin, "ops", model::Role::Admin)
        .await
        .unwrap();
    let agent = h.agent("triage-bot", "alice@example.org").await;
    let grant = h.grant(&agent).await;
    h.call(&agent, &grant, "read_issue", ActionClass::Read)
        .await;
    h.call(&agent, &grant, "delete_repo", ActionClass::Admin)
        .await;
    h.attempt(
        "not-a-token",
        None,
        BASE,
        "github",
        "read_issue",
        "acme/api",
        ActionClass::Read,
    )
    .await;
    h.authority
        .revoke(
            &h.admin,
            RevocationKind::Task,
            grant.task_id.as_str(),
            "done",
        )
        .await
        .unwrap();

    let filter = store::AuditFilter {
        limit: 1000,
        ..Default::default()
    };
    let events = h.authority.audit_events(&h.admin, &filter).await.unwrap();
    let kinds: Vec<_> = events.iter().map(|e| e.body.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "key.created",
            "operator.created",
            "agent.registered",
            "task.granted",
            "call.decision",
            "call.decision",
            "call.decision",
            "revocation",
            "task.revoked",
        ]
    );
    let codes: Vec<_> = events
        .iter()
        .filter(|e| e.body.kind == "call.decision")
        .map(|e| e.body.detail.to_value()["code"].clone())
        .collect();
    assert_eq!(
        codes,
        [
            json!("allowed"),
            json!("out_of_scope"),
            json!("token_malformed")
        ]
    );

    let log = serde_json::to_string(&events).unwrap();
    let token = grant.token.expose();
    let signature = token.rsplit('.').next().unwrap();
    for secret in [
        token.as_str(),
        signature,
        operator_token.expose().as_str(),
        agent.key.to_private_jwk().expose().as_str(),
    ] {
        assert!(!log.contains(secret), "a secret reached the audit log");
    }
    let private: serde_json::Value =
        serde_json::from_str(agent.key.to_private_jwk().expose()).unwrap();
    assert!(!log.contains(private["d"].as_str().unwrap()));
    assert!(h.authority.verify_audit(&h.admin).await.unwrap().ok);
}

/// Admits a fixed number of calls, then asks the caller to come back in 7 s.
#[derive(Debug)]
struct Allowance(
    std::sync::atomic::AtomicU32,
    std::sync::Mutex<Vec<(String, String)>>,
);

impl control::CallLimiter for Allowance {
    fn admit(&self, agent: &str, task: &str, _now_ms: i64) -> Result<(), u64> {
        self.1
            .lock()
            .unwrap()
            .push((agent.to_string(), task.to_string()));
        let left = self.0.load(std::sync::atomic::Ordering::SeqCst);
        if left == 0 {
            return Err(7);
        }
        self.0.store(left - 1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test]
async fn the_limiter_is_asked_with_the_verified_identity_and_can_refuse() {
    let h = Harness::new().await;
    let agent = h.agent("triage-bot", "alice@example.org").await;
    let grant = h.grant(&agent).await;
    let limiter = Allowance(1.into(), Default::default());
    let url = format!("{BASE}/http/github/read_issue");
    let token = grant.token.expose();
    let mut verdicts = Vec::new();
    for n in 0..2 {
        let proof = agent
            .key
            .sign_proof("POST", &url, Some(token), h.now(), &format!("limit-{n}"))
            .unwrap();
        let attempt = control::CallAttempt {
            token,
            proof: Some(&proof),
            bearer_allowed: false,
            method: "POST",
            url: &url,
            tool: "github",
            action: "read_issue",
            resource: "acme/api",
            class: ActionClass::Read,
            sensitivity: &[],
            arguments: "{}",
            limiter: Some(&limiter),
        };
        verdicts.push(h.authority.authorize(&attempt).await);
    }
    assert!(verdicts[0].is_allow());
    assert_eq!(
        (verdicts[1].code, verdicts[1].retry_after),
        ("rate_limited", Some(7))
    );
    let asked = limiter.1.lock().unwrap().clone();
    assert_eq!(
        asked[0],
        (
            "spiffe://remit.local/agent/triage-bot".to_string(),
            grant.task_id.to_string()
        )
    );

    // A forged token never reaches the limiter.
    let before = limiter.1.lock().unwrap().len();
    let forged = control::CallAttempt {
        token: "e30.e30.c2ln",
        proof: None,
        bearer_allowed: true,
        method: "POST",
        url: &url,
        tool: "github",
        action: "read_issue",
        resource: "acme/api",
        class: ActionClass::Read,
        sensitivity: &[],
        arguments: "{}",
        limiter: Some(&limiter),
    };
    assert!(
        h.authority
            .authorize(&forged)
            .await
            .code
            .starts_with("token_")
    );
    assert_eq!(limiter.1.lock().unwrap().len(), before);
}

/// Read and write kept apart: a read-only discovery task may look at everything on `iam` and
/// change nothing; changing something takes a new task request, which policy evaluates.
#[tokio::test]
async fn a_read_only_task_discovers_and_changes_nothing() {
    let h = Harness::new().await;
    let agent = h.agent("ops-bot", "alice@example.org").await;
    let wildcard = json!([{ "tool": "iam", "actions": ["*"] }]);
    let refused = h
        .request(&agent, wildcard.clone(), None, None)
        .await
        .unwrap_err();
    assert_eq!(
        refused.code, "task_refused",
        "a wildcard on iam is refused unless read-only"
    );

    let request: control::TaskRequest = serde_json::from_value(json!({
        "agent": "ops-bot", "intent": "map the roles", "scopes": wildcard, "read_only": true,
    }))
    .unwrap();
    let grant = h
        .authority
        .request_task(Some(&h.task_proof(&agent)), request)
        .await
        .unwrap();
    assert_eq!(grant.scopes.0[0].classes, [model::ActionClass::Read]);
    let url = format!("{BASE}/http/iam/x");
    let token = grant.token.expose();
    let call = |action: &'static str, class: ActionClass| {
        let proof = agent
            .key
            .sign_proof("POST", &url, Some(token), h.now(), &unique("ro"))
            .unwrap();
        let h = &h;
        let url = url.clone();
        async move {
            h.attempt(
                token,
                Some(&proof),
                &url,
                "iam",
                action,
                "roles/admin",
                class,
            )
            .await
        }
    };
    assert!(call("list_roles", ActionClass::Read).await.is_allow());
    let write = call("attach_policy", ActionClass::Write).await;
    assert_eq!(
        write.code, "out_of_scope",
        "not even a step-up: the task cannot write at all"
    );

    // Widening takes a new request, which policy evaluates (here: a step-up on each write).
    let wider = h
        .request(
            &agent,
            json!([{ "tool": "iam", "actions": ["attach_policy"] }]),
            None,
            None,
        )
        .await
        .unwrap();
    let url = format!("{BASE}/http/iam/x");
    let proof = agent
        .key
        .sign_proof(
            "POST",
            &url,
            Some(wider.token.expose()),
            h.now(),
            &unique("w"),
        )
        .unwrap();
    let verdict = h
        .attempt(
            wider.token.expose(),
            Some(&proof),
            &url,
            "iam",
            "attach_policy",
            "roles/admin",
            ActionClass::Write,
        )
        .await;
    assert_eq!(verdict.code, "approval_required");
}
