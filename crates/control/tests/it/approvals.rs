//! Step-up approvals (DESIGN.md invariant 3): an approval authorizes one exact call, once,
//! before it expires, and only an operator with the approver role (not the agent, not by
//! default its owner) can give it.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use control::approvals::ApprovalView;
use control::{CallAttempt, CallVerdict, Operator};
use http_body_util::BodyExt;
use model::{ActionClass, Role};
use serde_json::{Value, json};
use store::{ApprovalStatus, AuditFilter};
use tower::ServiceExt;

use crate::harness::{Agent, BASE, Harness, unique};

const OWNER: &str = "alice@example.org";

pub(crate) fn operator(name: &str, role: Role) -> Operator {
    Operator {
        id: unique("op"),
        name: name.to_string(),
        role,
    }
}

/// An `ops-bot` holding a task scoped to `iam` `attach_policy`.
pub(crate) async fn setup(h: &Harness) -> (Agent, control::Grant) {
    let agent = h.agent("ops-bot", OWNER).await;
    let scopes = json!([{ "tool": "iam", "actions": ["attach_policy"] }]);
    let grant = h.request(&agent, scopes, None, None).await.unwrap();
    (agent, grant)
}

/// `attach_policy` on `roles/admin` with these (canonical) arguments and a fresh proof.
pub(crate) async fn attach(
    h: &Harness,
    agent: &Agent,
    grant: &control::Grant,
    arguments: &str,
) -> CallVerdict {
    let url = format!("{BASE}/mcp/iam");
    let token = grant.token.expose();
    let proof = agent
        .key
        .sign_proof("POST", &url, Some(token), h.now(), &unique("call"))
        .unwrap();
    let attempt = CallAttempt {
        token,
        proof: Some(&proof),
        bearer_allowed: false,
        method: "POST",
        url: &url,
        tool: "iam",
        action: "attach_policy",
        resource: "roles/admin",
        class: ActionClass::Write,
        sensitivity: &[],
        arguments,
        limiter: None,
    };
    h.authority.authorize(&attempt).await
}

pub(crate) const ARGS: &str = r#"{"policy":"ReadOnly","role":"auditor"}"#;
const OTHER_ARGS: &str = r#"{"policy":"AdministratorAccess","role":"auditor"}"#;

pub(crate) fn required(verdict: &CallVerdict) -> String {
    assert_eq!(verdict.code, "approval_required", "{verdict:?}");
    assert!(!verdict.is_allow());
    let id = verdict.approval.clone().expect("an approval id");
    assert!(id.starts_with("apr_"), "{id}");
    id
}

#[tokio::test]
async fn an_approval_lets_the_exact_call_pass_once() {
    let h = Harness::new().await;
    let (agent, grant) = setup(&h).await;
    let approver = operator("bob@example.org", Role::Approver);

    let first = attach(&h, &agent, &grant, ARGS).await;
    let id = required(&first);
    // The same call again reuses the pending approval rather than filing another.
    assert_eq!(required(&attach(&h, &agent, &grant, ARGS).await), id);
    let other_id = required(&attach(&h, &agent, &grant, OTHER_ARGS).await);
    assert_ne!(other_id, id, "other arguments, other approval");

    let pending = h
        .authority
        .list_approvals(&approver, Some(ApprovalStatus::Pending), 0)
        .await
        .unwrap();
    assert_eq!(pending.len(), 2);
    let view = pending.iter().find(|a| a.id == id).unwrap();
    assert_eq!(
        (
            view.tool.as_str(),
            view.action.as_str(),
            view.resource.as_str()
        ),
        ("iam", "attach_policy", "roles/admin")
    );
    assert_eq!(view.args_digest, control::approvals::args_digest(ARGS));
    assert_eq!(view.owner, OWNER);
    assert_eq!(view.task, grant.task_id.as_str());

    let approved = h
        .authority
        .decide_approval(&approver, &id, true, "change ticket OPS-1")
        .await
        .unwrap();
    assert_eq!(approved.status, "approved");

    // Other arguments are still refused while the approval for the first exists.
    assert_eq!(
        required(&attach(&h, &agent, &grant, OTHER_ARGS).await),
        other_id
    );
    // The exact call passes, once, and names the approval it spent.
    let passed = attach(&h, &agent, &grant, ARGS).await;
    assert!(passed.is_allow(), "{passed:?}");
    assert_eq!(passed.approval.as_deref(), Some(id.as_str()));
    assert!(passed.audit_seq.is_some());
    let again = attach(&h, &agent, &grant, ARGS).await;
    let new_id = required(&again);
    assert_ne!(new_id, id, "a spent approval is not reused");

    let spent = h.authority.get_approval(&approver, &id).await.unwrap();
    assert_eq!(spent.status, "consumed");

    // Requested, approved, consumed and the decisions are all in the audit log.
    let events = h
        .authority
        .audit_events(
            &h.admin,
            &AuditFilter {
                task: Some(grant.task_id.to_string()),
                limit: 1000,
                ..AuditFilter::default()
            },
        )
        .await
        .unwrap();
    let with = |kind: &str| {
        events
            .iter()
            .filter(|e| e.body.kind == kind && e.body.detail.to_value()["approval"] == id.as_str())
            .count()
    };
    assert_eq!(with(audit::kinds::APPROVAL_REQUESTED), 1);
    assert_eq!(with(audit::kinds::APPROVAL_APPROVED), 1);
    assert_eq!(with(audit::kinds::APPROVAL_CONSUMED), 1);
    let allowed: Vec<_> = events
        .iter()
        .filter(|e| {
            e.body.kind == audit::kinds::CALL_DECISION
                && e.body.decision.as_deref() == Some("allow")
        })
        .collect();
    assert_eq!(allowed.len(), 1);
    assert_eq!(allowed[0].body.detail.to_value()["approval"], id.as_str());
    let consumed = events
        .iter()
        .find(|e| e.body.kind == audit::kinds::APPROVAL_CONSUMED)
        .unwrap();
    assert!(consumed.seq < allowed[0].seq, "spent before the decision");
    assert_eq!(
        consumed.body.detail.to_value()["args_digest"],
        control::approvals::args_digest(ARGS)
    );
}

#[tokio::test]
async fn approvals_expire() {
    let h = Harness::configured(|s| s.approvals.ttl_seconds = 60).await;
    let (agent, grant) = setup(&h).await;
    let approver = operator("bob@example.org", Role::Approver);

    // Too late to decide.
    let id = required(&attach(&h, &agent, &grant, ARGS).await);
    h.clock.advance_seconds(61);
    let late = h
        .authority
        .decide_approval(&approver, &id, true, "ok")
        .await
        .unwrap_err();
    assert_eq!(late.code, "approval_expired", "{late}");
    let expired = h
        .authority
        .list_approvals(&approver, Some(ApprovalStatus::Expired), 0)
        .await
        .unwrap();
    assert_eq!(
        expired.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
        [id.as_str()]
    );

    // Approved in time, used too late.
    let id = required(&attach(&h, &agent, &grant, ARGS).await);
    h.authority
        .decide_approval(&approver, &id, true, "ok")
        .await
        .unwrap();
    h.clock.advance_seconds(61);
    let after = attach(&h, &agent, &grant, ARGS).await;
    assert_ne!(required(&after), id);
}

#[tokio::test]
async fn a_denied_approval_never_lets_the_call_pass() {
    let h = Harness::new().await;
    let (agent, grant) = setup(&h).await;
    let approver = operator("bob@example.org", Role::Approver);
    let id = required(&attach(&h, &agent, &grant, ARGS).await);
    let denied = h
        .authority
        .decide_approval(&approver, &id, false, "not during the freeze")
        .await
        .unwrap();
    assert_eq!(
        (denied.status.as_str(), denied.reason.as_deref()),
        ("denied", Some("not during the freeze"))
    );
    let after = attach(&h, &agent, &grant, ARGS).await;
    assert_ne!(required(&after), id);
    let twice = h
        .authority
        .decide_approval(&approver, &id, true, "changed my mind")
        .await
        .unwrap_err();
    assert_eq!(twice.code, "approval_not_pending");
    assert_eq!(
        h.authority
            .get_approval(&approver, &id)
            .await
            .unwrap()
            .status,
        "denied"
    );
}

#[tokio::test]
async fn only_approvers_other_than_the_owner_may_approve() {
    let h = Harness::new().await;
    let (agent, grant) = setup(&h).await;
    let id = required(&attach(&h, &agent, &grant, ARGS).await);

    let auditor = operator("carol@example.org", Role::Auditor);
    let refused = h
        .authority
        .decide_approval(&auditor, &id, true, "looks fine")
        .await
        .unwrap_err();
    assert_eq!(
        (refused.kind, refused.code),
        (control::ErrorKind::Forbidden, "operator_role")
    );
    let owner = operator(OWNER, Role::Approver);
    let refused = h
        .authority
        .decide_approval(&owner, &id, true, "my own bot")
        .await
        .unwrap_err();
    assert_eq!(
        (refused.kind, refused.code),
        (control::ErrorKind::Forbidden, "approval_owner")
    );
    let empty = h
        .authority
        .decide_approval(&operator("bob@example.org", Role::Approver), &id, true, " ")
        .await
        .unwrap_err();
    assert_eq!(empty.code, "invalid_text");
    let missing = h
        .authority
        .decide_approval(&owner, "apr_nope", false, "x")
        .await
        .unwrap_err();
    assert_eq!(missing.code, "approval_not_found");
    assert_eq!(
        h.authority.get_approval(&owner, &id).await.unwrap().status,
        "pending"
    );

    // Configured otherwise, the owner may.
    let h = Harness::configured(|s| s.approvals.owner_may_approve = true).await;
    let (agent, grant) = setup(&h).await;
    let id = required(&attach(&h, &agent, &grant, ARGS).await);
    h.authority
        .decide_approval(&operator(OWNER, Role::Approver), &id, true, "my own bot")
        .await
        .unwrap();
    assert!(attach(&h, &agent, &grant, ARGS).await.is_allow());
}

async fn send(h: &Harness, request: Request<Body>) -> (StatusCode, Value) {
    let response = control::api::router(h.authority.clone())
        .oneshot(request)
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn decide(id: &str, verb: &str, authorization: &str, reason: &str) -> Request<Body> {
    Request::post(format!("/v1/approvals/{id}/{verb}"))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, authorization)
        .body(Body::from(json!({ "reason": reason }).to_string()))
        .unwrap()
}

#[tokio::test]
async fn the_api_takes_operator_tokens_only() {
    let h = Harness::new().await;
    let (agent, grant) = setup(&h).await;
    let id = required(&attach(&h, &agent, &grant, ARGS).await);
    let bearer = |role: Role, name: &'static str| {
        let h = &h;
        async move {
            let (_, token) = h
                .authority
                .create_operator(&h.admin, name, role)
                .await
                .unwrap();
            format!("Bearer {}", token.expose())
        }
    };

    // The agent's own task token, with or without a proof, is no operator token.
    let url = format!("{BASE}/v1/approvals/{id}/approve");
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
    for scheme in ["Bearer", "DPoP"] {
        let mut request = decide(
            &id,
            "approve",
            &format!("{scheme} {}", grant.token.expose()),
            "approve myself",
        );
        request.headers_mut().insert("dpop", proof.parse().unwrap());
        let (status, body) = send(&h, request).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    }

    let auditor = bearer(Role::Auditor, "carol@example.org").await;
    let (status, body) = send(&h, decide(&id, "approve", &auditor, "ok")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("operator_role"))
    );
    let owner = bearer(Role::Approver, OWNER).await;
    let (status, body) = send(&h, decide(&id, "approve", &owner, "ok")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("approval_owner"))
    );

    let approver = bearer(Role::Approver, "bob@example.org").await;
    let list = Request::get("/v1/approvals?status=pending")
        .header(header::AUTHORIZATION, &approver)
        .body(Body::empty())
        .unwrap();
    let (status, body) = send(&h, list).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let listed: Vec<ApprovalView> = serde_json::from_value(body).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, id);

    let no_reason = Request::post(format!("/v1/approvals/{id}/approve"))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, &approver)
        .body(Body::from("{}"))
        .unwrap();
    let (status, body) = send(&h, no_reason).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_json"))
    );
    let (status, body) = send(&h, decide("apr_0000", "approve", &approver, "ok")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("approval_not_found"))
    );

    let (status, body) = send(&h, decide(&id, "approve", &approver, "ticket OPS-2")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "approved");
    assert_eq!(body["reason"], "ticket OPS-2");
    let (status, body) = send(&h, decide(&id, "deny", &approver, "too late")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::CONFLICT, Some("approval_not_pending"))
    );
    let bad_status = Request::get("/v1/approvals?status=maybe")
        .header(header::AUTHORIZATION, &approver)
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&h, bad_status).await.0, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_held_call_passes_when_approved_meanwhile() {
    let h = Harness::configured(|s| s.approvals.hold_seconds = 2).await;
    let (agent, grant) = setup(&h).await;
    let authority = h.authority.clone();
    let approver = tokio::spawn(async move {
        let bob = operator("bob@example.org", Role::Approver);
        tokio::time::sleep(Duration::from_millis(300)).await;
        for _ in 0..50 {
            let pending = authority
                .list_approvals(&bob, Some(ApprovalStatus::Pending), 0)
                .await
                .unwrap();
            if let Some(approval) = pending.first() {
                authority
                    .decide_approval(&bob, &approval.id, true, "approved while it waited")
                    .await
                    .unwrap();
                return approval.id.clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no approval was filed");
    });
    let started = std::time::Instant::now();
    let verdict = attach(&h, &agent, &grant, ARGS).await;
    let id = approver.await.unwrap();
    assert!(verdict.is_allow(), "{verdict:?}");
    assert_eq!(verdict.approval.as_deref(), Some(id.as_str()));
    assert!(started.elapsed() < Duration::from_secs(2));

    // Denied while held: refused with the approval's id.
    let authority = h.authority.clone();
    let denier = tokio::spawn(async move {
        let bob = operator("bob@example.org", Role::Approver);
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let pending = authority
                .list_approvals(&bob, Some(ApprovalStatus::Pending), 0)
                .await
                .unwrap();
            if let Some(approval) = pending.first() {
                authority
                    .decide_approval(&bob, &approval.id, false, "no")
                    .await
                    .unwrap();
                return approval.id.clone();
            }
        }
        panic!("no approval was filed");
    });
    let verdict = attach(&h, &agent, &grant, OTHER_ARGS).await;
    let id = denier.await.unwrap();
    assert_eq!(verdict.code, "approval_denied", "{verdict:?}");
    assert_eq!(verdict.approval.as_deref(), Some(id.as_str()));

    // Nobody decides: after the hold, `approval_required`.
    let started = std::time::Instant::now();
    let verdict = attach(&h, &agent, &grant, r#"{"x":1}"#).await;
    required(&verdict);
    assert!(started.elapsed() >= Duration::from_secs(2));
}
