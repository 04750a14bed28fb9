//! The grant path: who may get a task, what the token says, how it ends.

use control::ErrorKind;
use model::{ActionClass, Decision};
use serde_json::json;

use crate::harness::{BASE, Harness, github_scopes, unique};

#[tokio::test]
async fn a_grant_is_a_key_bound_jwt_svid() {
    let h = Harness::new().await;
    let agent = h.agent("triage-bot", "alice@example.org").await;
    let grant = h.grant(&agent).await;

    let claims = h
        .authority
        .keys()
        .verifier()
        .verify(grant.token.expose(), h.now())
        .unwrap();
    assert_eq!(claims.sub, "spiffe://remit.local/agent/triage-bot");
    assert_eq!(claims.iss, BASE);
    assert_eq!(claims.aud, BASE);
    assert_eq!(claims.task, grant.task_id.as_str());
    assert_eq!(claims.cnf.jkt, agent.key.public().thumbprint());
    assert_eq!(
        claims.exp - claims.iat,
        300,
        "the default lifetime is five minutes"
    );
    assert_eq!(
        serde_json::to_value(&claims.scope).unwrap(),
        github_scopes()
    );
    assert_eq!(grant.budget, 100);
}

#[tokio::test]
async fn the_grant_path_refuses_what_it_should() {
    let h = Harness::new().await;
    let agent = h.agent("triage-bot", "alice@example.org").await;
    let stranger = h.agent("other-bot", "bob@example.org").await;

    // A proof signed by another registered agent's key does not authenticate this agent.
    let request = serde_json::from_value(
        json!({ "agent": "triage-bot", "intent": "x", "scopes": github_scopes() }),
    )
    .unwrap();
    let error = h
        .authority
        .request_task(Some(&h.task_proof(&stranger)), request)
        .await
        .unwrap_err();
    assert_eq!(
        (error.kind, error.code),
        (ErrorKind::Unauthorized, "proof_key_unknown")
    );

    let request = serde_json::from_value(
        json!({ "agent": "triage-bot", "intent": "x", "scopes": github_scopes() }),
    )
    .unwrap();
    let error = h.authority.request_task(None, request).await.unwrap_err();
    assert_eq!(error.code, "proof_missing");

    let request = serde_json::from_value(
        json!({ "agent": "ghost", "intent": "x", "scopes": github_scopes() }),
    )
    .unwrap();
    let error = h
        .authority
        .request_task(Some(&h.task_proof(&agent)), request)
        .await
        .unwrap_err();
    assert_eq!(error.code, "agent_unknown");

    let error = h
        .request(&agent, github_scopes(), Some(3601), None)
        .await
        .unwrap_err();
    assert_eq!(
        (error.kind, error.code),
        (ErrorKind::BadRequest, "invalid_ttl")
    );
    let error = h
        .request(&agent, github_scopes(), None, Some(0))
        .await
        .unwrap_err();
    assert_eq!(error.code, "invalid_budget");
    let error = h.request(&agent, json!([]), None, None).await.unwrap_err();
    assert_eq!(error.code, "invalid_scope");

    // Policy: a wildcard on identity infrastructure is refused, naming the policy and why.
    let error = h
        .request(
            &agent,
            json!([{ "tool": "vault", "actions": ["*"] }]),
            None,
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(
        (error.kind, error.code),
        (ErrorKind::Forbidden, "task_refused")
    );
    let detail = error.detail.unwrap();
    assert_eq!(detail["policies"], json!(["task.no-wildcards-on-identity"]));
    assert!(detail["reasons"][0].as_str().unwrap().contains("wildcard"));

    // A disabled agent gets nothing.
    h.authority
        .disable_agent(&h.admin, "triage-bot", "test")
        .await
        .unwrap();
    let error = h
        .request(&agent, github_scopes(), None, None)
        .await
        .unwrap_err();
    assert_eq!(error.code, "agent_not_active");
}

#[tokio::test]
async fn a_completed_task_is_dead() {
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

    let url = format!("{BASE}/v1/tasks/{}/complete", grant.task_id);
    let token = grant.token.expose();
    let proof = agent
        .key
        .sign_proof("POST", &url, Some(token), h.now(), &unique("complete"))
        .unwrap();
    let task = h
        .authority
        .complete_task(grant.task_id.as_str(), token, Some(&proof))
        .await
        .unwrap();
    assert_eq!(task.status, model::TaskStatus::Completed);

    let verdict = h
        .call(&agent, &grant, "read_issue", ActionClass::Read)
        .await;
    assert_eq!(
        (verdict.report.decision, verdict.code),
        (Decision::Deny, "revoked")
    );

    let proof = agent
        .key
        .sign_proof("POST", &url, Some(token), h.now(), &unique("complete"))
        .unwrap();
    let error = h
        .authority
        .complete_task(grant.task_id.as_str(), token, Some(&proof))
        .await
        .unwrap_err();
    assert_eq!(error.code, "task_not_active");
}

#[tokio::test]
async fn only_the_tasks_own_key_can_complete_it() {
    let h = Harness::new().await;
    let agent = h.agent("triage-bot", "alice@example.org").await;
    let thief = h.agent("thief-bot", "mallory@example.org").await;
    let grant = h.grant(&agent).await;
    let url = format!("{BASE}/v1/tasks/{}/complete", grant.task_id);
    let token = grant.token.expose();
    let proof = thief
        .key
        .sign_proof("POST", &url, Some(token), h.now(), &unique("complete"))
        .unwrap();
    let error = h
        .authority
        .complete_task(grant.task_id.as_str(), token, Some(&proof))
        .await
        .unwrap_err();
    assert_eq!(error.kind, ErrorKind::Unauthorized);
    assert_eq!(
        h.call(&agent, &grant, "read_issue", ActionClass::Read)
            .await
            .report
            .decision,
        Decision::Allow
    );
}

#[tokio::test]
async fn rotation_keeps_old_tokens_verifiable() {
    let h = Harness::new().await;
    let agent = h.agent("triage-bot", "alice@example.org").await;
    let before = h.grant(&agent).await;
    let old_kid = h.authority.keys().current_kid();

    let new_kid = h.authority.rotate_keys(&h.admin).await.unwrap();
    assert_ne!(new_kid, old_kid);
    let bundle = h.authority.keys().bundle(60);
    let kids: Vec<_> = bundle["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect();
    assert!(
        kids.contains(&old_kid) && kids.contains(&new_kid),
        "{kids:?}"
    );
    assert!(
        bundle["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["use"] == "jwt-svid")
    );

    assert_eq!(
        h.call(&agent, &before, "read_issue", ActionClass::Read)
            .await
            .report
            .decision,
        Decision::Allow
    );
    let after = h.grant(&agent).await;
    let header = after.token.expose().split('.').next().unwrap().to_string();
    let header: serde_json::Value = serde_json::from_slice(&base64_decode(&header)).unwrap();
    assert_eq!(header["kid"], new_kid.as_str());

    // Once every token the old key signed has expired, it is no longer published.
    h.clock.advance_seconds(3600 + 30 + 1);
    h.authority.sync().await.unwrap();
    let bundle = h.authority.keys().bundle(60);
    assert_eq!(bundle["keys"].as_array().unwrap().len(), 1);
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .unwrap()
}

#[tokio::test]
async fn operators_act_within_their_role() {
    let h = Harness::new().await;
    let (_, auditor_token) = h
        .authority
        .create_operator(&h.admin, "auditor", model::Role::Auditor)
        .await
        .unwrap();
    let auditor = h
        .authority
        .authenticate_operator(auditor_token.expose())
        .await
        .unwrap();
    let key = credentials::AgentKeyPair::generate_p256().unwrap();
    let error = h
        .authority
        .register_agent(&auditor, "x", "alice@example.org", &[key.public().to_jwk()])
        .await
        .unwrap_err();
    assert_eq!(
        (error.kind, error.code),
        (ErrorKind::Forbidden, "operator_role")
    );
    assert!(h.authority.verify_audit(&auditor).await.unwrap().ok);

    let error = h
        .authority
        .authenticate_operator("remit_op_0000")
        .await
        .unwrap_err();
    assert_eq!(error.code, "operator_token_invalid");
}

#[tokio::test]
async fn registration_validates_names_owners_and_keys() {
    let h = Harness::new().await;
    let key = credentials::AgentKeyPair::generate_ed25519()
        .unwrap()
        .public()
        .to_jwk();
    let register = |name: &'static str, owner: &'static str, keys: Vec<serde_json::Value>| {
        let h = &h;
        async move {
            h.authority
                .register_agent(&h.admin, name, owner, &keys)
                .await
        }
    };
    assert_eq!(
        register("Bad Name", "alice@example.org", vec![key.clone()])
            .await
            .unwrap_err()
            .code,
        "invalid_name"
    );
    assert_eq!(
        register("bot", "", vec![key.clone()])
            .await
            .unwrap_err()
            .code,
        "invalid_name"
    );
    assert_eq!(
        register("bot", "alice@example.org", vec![])
            .await
            .unwrap_err()
            .code,
        "invalid_key"
    );
    let private = credentials::AgentKeyPair::generate_p256()
        .unwrap()
        .to_private_jwk();
    let private: serde_json::Value = serde_json::from_str(private.expose()).unwrap();
    assert_eq!(
        register("bot", "alice@example.org", vec![private])
            .await
            .unwrap_err()
            .code,
        "invalid_key"
    );
    let agent = register("bot", "alice@example.org", vec![key.clone()])
        .await
        .unwrap();
    assert_eq!(agent.spiffe_id.as_str(), "spiffe://remit.local/agent/bot");
    assert_eq!(
        register("bot", "alice@example.org", vec![key])
            .await
            .unwrap_err()
            .kind,
        ErrorKind::Conflict
    );
}
