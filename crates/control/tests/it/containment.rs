//! Containment: each rule quarantines the agent it names (status, every credential revoked,
//! no new grants, a webhook told, all audited), and an operator's release restores it.

use std::sync::{Arc, Mutex};

use control::containment::ContainmentRules;
use model::{ActionClass, AgentStatus};
use serde_json::Value;

use crate::harness::{Agent, BASE, Harness, github_scopes, unique};

async fn status(h: &Harness, name: &str) -> AgentStatus {
    h.authority.get_agent(&h.admin, name).await.unwrap().status
}

/// Checks the state of a quarantined agent, releases it, and checks that it works again.
async fn quarantined_then_released(h: &Harness, agent: &Agent, old: &control::Grant, rule: &str) {
    assert_eq!(
        status(h, &agent.name).await,
        AgentStatus::Quarantined,
        "{rule}"
    );
    assert_eq!(
        h.call(agent, old, "read_issue", ActionClass::Read)
            .await
            .code,
        "revoked",
        "{rule}: its tasks are revoked"
    );
    let error = h
        .request(agent, github_scopes(), None, None)
        .await
        .unwrap_err();
    assert_eq!(error.code, "agent_not_active", "{rule}: no new grants");

    let filter = store::AuditFilter {
        agent: Some(format!("spiffe://remit.local/agent/{}", agent.name)),
        limit: 1000,
        ..Default::default()
    };
    let events = h.authority.audit_events(&h.admin, &filter).await.unwrap();
    let quarantine = events
        .iter()
        .find(|e| e.body.kind == "agent.quarantined")
        .expect("a quarantine event");
    assert_eq!(
        (
            quarantine.body.actor.as_str(),
            &quarantine.body.detail.to_value()["rule"]
        ),
        ("remit", &Value::from(rule))
    );

    h.authority
        .release_agent(&h.admin, &agent.name, "investigated")
        .await
        .unwrap();
    assert_eq!(status(h, &agent.name).await, AgentStatus::Active);
    // Agent revocations cut tokens issued up to their second (JWT `iat` has no finer grain).
    h.clock.advance_seconds(1);
    let fresh = h.grant(agent).await;
    let verdict = h.call(agent, &fresh, "read_issue", ActionClass::Read).await;
    assert!(verdict.is_allow(), "{rule}: released: {verdict:?}");
    // Past the grace period of the quarantine's revocation, using the old credentials
    // again is off-script (the dead-token rule).
    h.clock
        .advance_seconds(ContainmentRules::default().dead_token_grace_seconds);
    assert_eq!(
        h.call(agent, old, "read_issue", ActionClass::Read)
            .await
            .code,
        "revoked",
        "{rule}: old credentials stay dead"
    );
    assert_eq!(
        status(h, &agent.name).await,
        AgentStatus::Quarantined,
        "{rule}"
    );
    h.authority
        .release_agent(&h.admin, &agent.name, "investigated twice")
        .await
        .unwrap();
}

#[tokio::test]
async fn too_many_denials_quarantine() {
    let h = Harness::configured(|s| {
        s.containment = ContainmentRules {
            max_denials: 3,
            window_seconds: 60,
            ..ContainmentRules::default()
        }
    })
    .await;
    let agent = h.agent("prober", "alice@example.org").await;
    let bystander = h.agent("bystander", "alice@example.org").await;
    let grant = h.grant(&agent).await;
    let other = h.grant(&bystander).await;
    for _ in 0..2 {
        assert_eq!(
            h.call(&agent, &grant, "delete_repo", ActionClass::Admin)
                .await
                .code,
            "out_of_scope"
        );
    }
    assert_eq!(
        status(&h, "prober").await,
        AgentStatus::Active,
        "below the threshold"
    );
    h.call(&agent, &grant, "delete_repo", ActionClass::Admin)
        .await;
    quarantined_then_released(&h, &agent, &grant, "denials").await;
    assert!(
        h.call(&bystander, &other, "read_issue", ActionClass::Read)
            .await
            .is_allow(),
        "another agent is untouched"
    );
}

#[tokio::test]
async fn a_dead_token_quarantines() {
    let h = Harness::new().await;
    let agent = h.agent("zombie", "alice@example.org").await;
    let grant = h.grant(&agent).await;
    let url = format!("{BASE}/v1/tasks/{}/complete", grant.task_id);
    let proof = agent
        .key
        .sign_proof(
            "POST",
            &url,
            Some(grant.token.expose()),
            h.now(),
            &unique("c"),
        )
        .unwrap();
    h.authority
        .complete_task(grant.task_id.as_str(), grant.token.expose(), Some(&proof))
        .await
        .unwrap();
    assert_eq!(
        status(&h, "zombie").await,
        AgentStatus::Active,
        "completing is not off-script"
    );
    // A retry right after completing races the end of the task: refused, not off-script.
    assert_eq!(
        h.call(&agent, &grant, "read_issue", ActionClass::Read)
            .await
            .code,
        "revoked"
    );
    assert_eq!(
        status(&h, "zombie").await,
        AgentStatus::Active,
        "a retry within the grace period is not off-script"
    );
    h.clock
        .advance_seconds(ContainmentRules::default().dead_token_grace_seconds - 1);
    h.call(&agent, &grant, "read_issue", ActionClass::Read)
        .await;
    assert_eq!(status(&h, "zombie").await, AgentStatus::Active);
    // Once the grace period is over, the token is long dead and its use is off-script.
    h.clock.advance_seconds(1);
    assert_eq!(
        h.call(&agent, &grant, "read_issue", ActionClass::Read)
            .await
            .code,
        "revoked"
    );
    quarantined_then_released(&h, &agent, &grant, "dead_token").await;
}

#[tokio::test]
async fn a_proof_whose_jwk_did_not_sign_it_is_bad_and_quarantines_nobody() {
    let h = Harness::new().await;
    let agent = h.agent("framed", "alice@example.org").await;
    let other = h.agent("other", "mallory@example.org").await;
    let grant = h.grant(&agent).await;
    let url = format!("{BASE}/http/github/read_issue");
    // Signed by the bound key, but naming another key in its header: whoever sent it has
    // shown nothing about who holds the token, so the agent must not be quarantined.
    let proof = agent
        .key
        .sign_proof(
            "POST",
            &url,
            Some(grant.token.expose()),
            h.now(),
            &unique("p"),
        )
        .unwrap();
    let (header, rest) = proof.split_once('.').unwrap();
    let mut header: Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header).unwrap(),
    )
    .unwrap();
    header["jwk"] = other.key.public().to_jwk();
    let header = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        header.to_string(),
    );
    let forged = format!("{header}.{rest}");
    let verdict = h
        .attempt(
            grant.token.expose(),
            Some(&forged),
            &url,
            "github",
            "read_issue",
            "acme/api",
            ActionClass::Read,
        )
        .await;
    assert_eq!(verdict.code, "proof_bad_signature");
    assert_eq!(status(&h, "framed").await, AgentStatus::Active);
    assert!(
        h.call(&agent, &grant, "read_issue", ActionClass::Read)
            .await
            .is_allow(),
        "the task lives on"
    );
}

#[tokio::test]
async fn a_proof_from_the_wrong_key_quarantines_the_tokens_agent() {
    let h = Harness::new().await;
    let agent = h.agent("leaky", "alice@example.org").await;
    let thief = h.agent("thief", "mallory@example.org").await;
    let grant = h.grant(&agent).await;
    let url = format!("{BASE}/http/github/read_issue");
    let proof = thief
        .key
        .sign_proof(
            "POST",
            &url,
            Some(grant.token.expose()),
            h.now(),
            &unique("p"),
        )
        .unwrap();
    let verdict = h
        .attempt(
            grant.token.expose(),
            Some(&proof),
            &url,
            "github",
            "read_issue",
            "acme/api",
            ActionClass::Read,
        )
        .await;
    assert_eq!(verdict.code, "proof_key_mismatch");
    quarantined_then_released(&h, &agent, &grant, "wrong_key").await;
}

#[tokio::test]
async fn probing_for_unknown_tools_quarantines() {
    let h = Harness::new().await;
    let agent = h.agent("explorer", "alice@example.org").await;
    let grant = h.grant(&agent).await;
    let url = format!("{BASE}/http/secrets-manager/x");
    let proof = agent
        .key
        .sign_proof(
            "GET",
            &url,
            Some(grant.token.expose()),
            h.now(),
            &unique("p"),
        )
        .unwrap();
    let attempt = control::CallAttempt {
        token: grant.token.expose(),
        proof: Some(&proof),
        bearer_allowed: false,
        method: "GET",
        url: &url,
        tool: "secrets-manager",
        action: "unknown",
        resource: "",
        class: ActionClass::Admin,
        sensitivity: &[],
        arguments: "{}",
        limiter: None,
    };
    assert_eq!(
        h.authority.refuse_unknown_tool(&attempt).await.code,
        "tool_unknown"
    );
    quarantined_then_released(&h, &agent, &grant, "unknown_tool").await;

    // A forged token never names an agent, so it cannot get anyone quarantined.
    let forged = control::CallAttempt {
        token: "e30.e30.c2ln",
        ..attempt
    };
    assert!(
        h.authority
            .refuse_unknown_tool(&forged)
            .await
            .code
            .starts_with("token_")
    );
    assert_eq!(status(&h, "explorer").await, AgentStatus::Active);
}

/// A request the gateway refuses before it names an action is recorded for the agent whose
/// token verified, with the gateway's code, and breaks no containment rule by itself; a
/// forged token is refused for what it is and names nobody.
#[tokio::test]
async fn early_refusals_are_recorded_for_their_agent_and_quarantine_nobody() {
    let h = Harness::new().await;
    let agent = h.agent("strayer", "alice@example.org").await;
    let grant = h.grant(&agent).await;
    let url = format!("{BASE}/http/github/files/%2e%2e/admin");
    let proof = agent
        .key
        .sign_proof(
            "GET",
            &url,
            Some(grant.token.expose()),
            h.now(),
            &unique("p"),
        )
        .unwrap();
    let attempt = control::CallAttempt {
        token: grant.token.expose(),
        proof: Some(&proof),
        bearer_allowed: false,
        method: "GET",
        url: &url,
        tool: "github",
        action: "GET /files/%2e%2e/admin",
        resource: "files/%2e%2e/admin",
        class: ActionClass::Admin,
        sensitivity: &[],
        arguments: "{}",
        limiter: None,
    };
    let verdict = h
        .authority
        .refuse_request(&attempt, "path_invalid", "dot segments are not allowed")
        .await;
    assert_eq!(verdict.code, "path_invalid");
    assert_eq!(verdict.message, "dot segments are not allowed");
    assert_eq!(verdict.agent.as_deref(), Some(grant.spiffe_id.as_str()));
    assert!(verdict.audit_seq.is_some());
    assert_eq!(status(&h, "strayer").await, AgentStatus::Active);

    let filter = store::AuditFilter {
        task: Some(grant.task_id.to_string()),
        limit: 1000,
        ..Default::default()
    };
    let events = h.authority.audit_events(&h.admin, &filter).await.unwrap();
    let decision = events
        .iter()
        .find(|e| e.body.kind == audit::kinds::CALL_DECISION)
        .expect("a recorded decision");
    assert_eq!(decision.body.decision.as_deref(), Some("deny"));
    let detail = decision.body.detail.to_value();
    assert_eq!(detail["code"], "path_invalid");
    assert_eq!(detail["action"], "GET /files/%2e%2e/admin");
    assert!(detail.get("check").is_none(), "{detail}");

    let forged = control::CallAttempt {
        token: "e30.e30.c2ln",
        ..attempt
    };
    let verdict = h
        .authority
        .refuse_request(&forged, "path_invalid", "dot segments are not allowed")
        .await;
    assert!(verdict.code.starts_with("token_"), "{}", verdict.code);
    assert_eq!(verdict.agent, None);
}

#[tokio::test]
async fn rules_can_be_turned_off_and_a_webhook_is_told() {
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = Arc::clone(&received);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let sink = Arc::clone(&sink);
            async move {
                sink.lock().unwrap().push(body);
                "ok"
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let h = Harness::configured(|s| {
        s.containment = ContainmentRules {
            dead_token: false,
            webhook: Some(model::Secret::new(hook)),
            ..ContainmentRules::default()
        };
    })
    .await;
    let agent = h.agent("watched", "alice@example.org").await;
    let thief = h.agent("thief", "mallory@example.org").await;
    let grant = h.grant(&agent).await;
    h.authority
        .revoke(
            &h.admin,
            store::RevocationKind::Task,
            grant.task_id.as_str(),
            "test",
        )
        .await
        .unwrap();
    assert_eq!(
        h.call(&agent, &grant, "read_issue", ActionClass::Read)
            .await
            .code,
        "revoked"
    );
    assert_eq!(
        status(&h, "watched").await,
        AgentStatus::Active,
        "the dead-token rule is off"
    );

    let fresh = h.grant(&agent).await;
    let url = format!("{BASE}/http/github/read_issue");
    let proof = thief
        .key
        .sign_proof(
            "POST",
            &url,
            Some(fresh.token.expose()),
            h.now(),
            &unique("p"),
        )
        .unwrap();
    h.attempt(
        fresh.token.expose(),
        Some(&proof),
        &url,
        "github",
        "read_issue",
        "acme/api",
        ActionClass::Read,
    )
    .await;
    assert_eq!(status(&h, "watched").await, AgentStatus::Quarantined);
    for _ in 0..50 {
        if !received.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let notices = received.lock().unwrap().clone();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!(notices[0]["agent"], "spiffe://remit.local/agent/watched");
    assert_eq!(notices[0]["rule"], "wrong_key");
    assert_eq!(notices[0]["owner"], "alice@example.org");
}

/// `max_denials` counts an agent's denials on every replica: each node adds its own to the
/// store's count at each catch-up and quarantines on the sum. Ten denials spread over three
/// replicas, none of which saw more than four, quarantine at the catch-up after the tenth;
/// before, each replica counted only its own, and 27 left the agent active.
async fn denials_spread_over_replicas_quarantine(cluster: crate::budgets::Cluster) {
    let nodes = &cluster.nodes;
    let agent = nodes[0].agent("prober", "alice@example.org").await;
    let grant = nodes[0].grant(&agent).await;
    let catch_up = || async {
        for node in nodes {
            node.authority.sync().await.unwrap();
        }
    };
    // Three rounds of one denial per replica, each followed by a catch-up everywhere (what
    // `sync_interval_ms` does in `serve`): nine denials, below the threshold of ten.
    for _ in 0..3 {
        for node in nodes {
            let verdict = node
                .call(&agent, &grant, "delete_repo", ActionClass::Admin)
                .await;
            assert_eq!(verdict.code, "out_of_scope");
        }
        catch_up().await;
    }
    assert_eq!(status(&nodes[0], "prober").await, AgentStatus::Active);
    let verdict = nodes[1]
        .call(&agent, &grant, "delete_repo", ActionClass::Admin)
        .await;
    assert_eq!(verdict.code, "out_of_scope");
    catch_up().await;
    assert_eq!(
        status(&nodes[2], "prober").await,
        AgentStatus::Quarantined,
        "the tenth denial, on any replica, quarantines within one catch-up"
    );
    // Every replica refuses the agent's task from its next catch-up with the revocation feed.
    catch_up().await;
    for node in nodes {
        let verdict = node
            .call(&agent, &grant, "read_issue", ActionClass::Read)
            .await;
        assert_eq!(verdict.code, "revoked");
    }
    // A released agent starts afresh everywhere: one more denial quarantines nobody.
    nodes[0]
        .authority
        .release_agent(&nodes[0].admin, "prober", "investigated")
        .await
        .unwrap();
    // Agent revocations cut tokens issued up to their second; each node's clock started a
    // little apart, and the quarantine took the time of whichever node noticed.
    for node in nodes {
        node.clock.advance_seconds(2);
    }
    let fresh = nodes[0].grant(&agent).await;
    let verdict = nodes[1]
        .call(&agent, &fresh, "delete_repo", ActionClass::Admin)
        .await;
    assert_eq!(verdict.code, "out_of_scope");
    catch_up().await;
    assert_eq!(status(&nodes[0], "prober").await, AgentStatus::Active);
    cluster.finish().await;
}

fn ten_denials(settings: &mut control::Settings) {
    settings.containment = ContainmentRules {
        max_denials: 10,
        window_seconds: 60,
        ..ContainmentRules::default()
    };
}

#[tokio::test]
async fn denials_spread_over_replicas_quarantine_on_sqlite() {
    let cluster = crate::budgets::Cluster::sqlite(3, ten_denials).await;
    denials_spread_over_replicas_quarantine(cluster).await;
}

#[tokio::test]
async fn denials_spread_over_replicas_quarantine_on_postgres() {
    let Some(cluster) = crate::budgets::Cluster::postgres(
        "containment::denials_spread_over_replicas_quarantine_on_postgres",
        3,
        ten_denials,
    )
    .await
    else {
        return;
    };
    denials_spread_over_replicas_quarantine(cluster).await;
}
