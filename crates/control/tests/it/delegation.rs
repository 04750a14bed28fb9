//! DESIGN.md invariant 2: delegation never widens. Each widening attempt is refused; a
//! three-deep chain dies from the top on the next call at every level.

use control::delegation::{Exchanged, GRANT_TYPE, TokenExchange};
use model::{ActionClass, Decision};
use serde_json::json;
use store::RevocationKind;

use crate::harness::{Agent, BASE, Harness, unique};

pub async fn exchange(
    h: &Harness,
    to: &Agent,
    subject: &str,
    scope: Option<&str>,
    ttl: Option<i64>,
    budget: Option<u32>,
) -> control::Result<Exchanged> {
    let proof = to
        .key
        .sign_proof(
            "POST",
            &format!("{BASE}/v1/token"),
            None,
            h.now(),
            &unique("exchange"),
        )
        .unwrap();
    let request = TokenExchange {
        grant_type: GRANT_TYPE.into(),
        subject_token: subject.into(),
        subject_token_type: "urn:ietf:params:oauth:token-type:access_token".into(),
        agent: to.name.clone(),
        scope: scope.map(str::to_string),
        ttl_seconds: ttl,
        budget,
        intent: None,
    };
    h.authority.exchange_token(Some(&proof), request).await
}

/// A call with `token`, proved by `agent`'s key.
pub async fn call(h: &Harness, agent: &Agent, token: &str, action: &str) -> control::CallVerdict {
    let url = format!("{BASE}/http/github/{action}");
    let proof = agent
        .key
        .sign_proof("POST", &url, Some(token), h.now(), &unique("call"))
        .unwrap();
    h.attempt(
        token,
        Some(&proof),
        &url,
        "github",
        action,
        "acme/api",
        ActionClass::Read,
    )
    .await
}

#[tokio::test]
async fn a_delegated_task_is_narrower_and_carries_the_chain() {
    let h = Harness::new().await;
    let lead = h.agent("lead-bot", "alice@example.org").await;
    let helper = h.agent("helper-bot", "bob@example.org").await;
    let parent = h.grant(&lead).await;

    let child = exchange(
        &h,
        &helper,
        parent.token.expose(),
        Some("github:read_issue@acme/*"),
        Some(60),
        Some(5),
    )
    .await
    .unwrap();
    assert_eq!(
        (child.token_type.as_str(), child.depth, child.expires_in),
        ("DPoP", 1, 60)
    );
    assert_eq!(child.scope, "github:read_issue@acme/*");
    let claims = h
        .authority
        .keys()
        .verifier()
        .verify(child.access_token.expose(), h.now())
        .unwrap();
    assert_eq!(claims.sub, "spiffe://remit.local/agent/helper-bot");
    assert_eq!(
        claims.act.as_ref().unwrap().sub,
        "spiffe://remit.local/agent/lead-bot"
    );
    assert_eq!(claims.cnf.jkt, helper.key.public().thumbprint());

    assert!(
        call(&h, &helper, child.access_token.expose(), "read_issue")
            .await
            .is_allow()
    );
    assert_eq!(
        call(&h, &helper, child.access_token.expose(), "create_issue")
            .await
            .code,
        "out_of_scope"
    );
    // The child's token is bound to the helper's key, not the lead's.
    assert_eq!(
        call(&h, &lead, child.access_token.expose(), "read_issue")
            .await
            .code,
        "proof_key_mismatch"
    );

    let task = h
        .authority
        .get_task(&h.admin, &child.task_id)
        .await
        .unwrap();
    assert_eq!(
        (task.parent.unwrap().as_str(), task.depth),
        (parent.task_id.as_str(), 1)
    );
}

#[tokio::test]
async fn every_widening_attempt_is_refused() {
    let h = Harness::new().await;
    let lead = h.agent("lead-bot", "alice@example.org").await;
    let helper = h.agent("helper-bot", "bob@example.org").await;
    let parent = h
        .request(
            &lead,
            json!([{ "tool": "github", "actions": ["read_issue"], "resources": ["acme/*"] }]),
            Some(120),
            Some(10),
        )
        .await
        .unwrap();
    let subject = parent.token.expose();

    let refused = |result: control::Result<Exchanged>| result.map(|_| ()).unwrap_err();
    let error = refused(
        exchange(
            &h,
            &helper,
            subject,
            Some("github:create_issue@acme/*"),
            None,
            None,
        )
        .await,
    );
    assert_eq!(error.code, "invalid_scope", "{}", error.message);
    let error =
        refused(exchange(&h, &helper, subject, Some("github:read_issue"), None, None).await);
    assert_eq!(
        error.code, "invalid_scope",
        "any resource is wider than acme/*: {}",
        error.message
    );
    let error = refused(exchange(&h, &helper, subject, Some("jira:read_issue"), None, None).await);
    assert_eq!(error.code, "invalid_scope");
    let error = refused(exchange(&h, &helper, subject, None, Some(121), None).await);
    assert!(
        error.code == "invalid_request" && error.message.contains("outlive"),
        "{}",
        error.message
    );
    let error = refused(exchange(&h, &helper, subject, None, None, Some(11)).await);
    assert!(
        error.message.contains("more than the parent has left"),
        "{}",
        error.message
    );

    // Depth: the default maximum is 3 delegations.
    let mut token = subject.to_string();
    for depth in 1..=3 {
        let next = exchange(&h, &helper, &token, None, None, None)
            .await
            .unwrap();
        assert_eq!(next.depth, depth);
        token = next.access_token.expose().clone();
    }
    let error = refused(exchange(&h, &helper, &token, None, None, None).await);
    assert!(error.message.contains("too deep"), "{}", error.message);

    // Narrower in every way is fine, and a garbage subject is an invalid grant.
    assert!(
        exchange(
            &h,
            &helper,
            subject,
            Some("github:read_issue@acme/api"),
            Some(30),
            Some(1)
        )
        .await
        .is_ok()
    );
    assert_eq!(
        refused(exchange(&h, &helper, "x.y.z", None, None, None).await).code,
        "invalid_grant"
    );
}

#[tokio::test]
async fn revoking_the_root_stops_every_descendant_on_its_next_call() {
    for end in ["revoke", "complete"] {
        let h = Harness::new().await;
        let a = h.agent("a-bot", "alice@example.org").await;
        let b = h.agent("b-bot", "bob@example.org").await;
        let c = h.agent("c-bot", "carol@example.org").await;
        let root = h.grant(&a).await;
        let child = exchange(&h, &b, root.token.expose(), None, None, None)
            .await
            .unwrap();
        let grandchild = exchange(&h, &c, child.access_token.expose(), None, None, None)
            .await
            .unwrap();
        let levels = [
            (&a, root.token.expose().clone()),
            (&b, child.access_token.expose().clone()),
            (&c, grandchild.access_token.expose().clone()),
        ];
        for (agent, token) in &levels {
            assert!(call(&h, agent, token, "read_issue").await.is_allow());
        }

        match end {
            "revoke" => {
                h.authority
                    .revoke(
                        &h.admin,
                        RevocationKind::Task,
                        root.task_id.as_str(),
                        "incident",
                    )
                    .await
                    .unwrap();
            }
            _ => {
                let url = format!("{BASE}/v1/tasks/{}/complete", root.task_id);
                let proof = a
                    .key
                    .sign_proof(
                        "POST",
                        &url,
                        Some(root.token.expose()),
                        h.now(),
                        &unique("c"),
                    )
                    .unwrap();
                h.authority
                    .complete_task(root.task_id.as_str(), root.token.expose(), Some(&proof))
                    .await
                    .unwrap();
            }
        }
        for (agent, token) in &levels {
            let verdict = call(&h, agent, token, "read_issue").await;
            assert_eq!(
                (verdict.report.decision, verdict.code),
                (Decision::Deny, "revoked"),
                "{end}: {}",
                verdict.message
            );
            assert!(
                verdict.message.contains(root.task_id.as_str()),
                "{}",
                verdict.message
            );
        }
        // A revoked parent cannot be delegated from either.
        let error = exchange(&h, &c, root.token.expose(), None, None, None)
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(error.code, "invalid_grant", "{end}");
    }
}

#[tokio::test]
async fn policy_sees_the_delegation_chain() {
    let h = Harness::new().await;
    let lead = h.agent("lead-bot", "alice@example.org").await;
    let helper = h.agent("helper-bot", "bob@example.org").await;
    let mut policies: Vec<(&str, &str)> = control::EXAMPLE_POLICIES.to_vec();
    let extra = r#"@id("no-work-handed-down-from-lead")
forbid (principal, action in [Action::"call"], resource)
when { context.delegators.contains("spiffe://remit.local/agent/lead-bot") && context.depth >= 1 };"#;
    policies.push(("extra.cedar", extra));
    let engine = policy::PolicyEngine::from_sources(control::EXAMPLE_SCHEMA.1, &policies).unwrap();
    h.authority.swap_policy(engine);

    let parent = h.grant(&lead).await;
    let child = exchange(&h, &helper, parent.token.expose(), None, None, None)
        .await
        .unwrap();
    assert!(
        call(&h, &lead, parent.token.expose(), "read_issue")
            .await
            .is_allow()
    );
    let verdict = call(&h, &helper, child.access_token.expose(), "read_issue").await;
    assert_eq!(verdict.code, "policy_denied");
    assert_eq!(verdict.report.policies, ["no-work-handed-down-from-lead"]);
}

#[tokio::test]
async fn a_delegated_intent_is_bounded_like_a_granted_one() {
    let h = Harness::new().await;
    let lead = h.agent("lead-bot", "alice@example.org").await;
    let helper = h.agent("helper-bot", "bob@example.org").await;
    let parent = h.grant(&lead).await;
    for intent in [
        "x".repeat(1025),
        "line\u{0}break".to_string(),
        " ".to_string(),
    ] {
        let proof = helper
            .key
            .sign_proof(
                "POST",
                &format!("{BASE}/v1/token"),
                None,
                h.now(),
                &unique("exchange"),
            )
            .unwrap();
        let request = TokenExchange {
            grant_type: GRANT_TYPE.into(),
            subject_token: parent.token.expose().clone(),
            subject_token_type: "urn:ietf:params:oauth:token-type:access_token".into(),
            agent: helper.name.clone(),
            intent: Some(intent.clone()),
            ..TokenExchange::default()
        };
        let error = h
            .authority
            .exchange_token(Some(&proof), request)
            .await
            .unwrap_err();
        assert_eq!(error.code, "invalid_text", "{intent:?}: {error}");
    }
}
