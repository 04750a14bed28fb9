//! DESIGN.md invariant 4: when the store cannot be reached, remit denies with a clear error.
//! The store is a real PostgreSQL reached through a TCP relay that the test cuts, which is
//! what a network partition looks like from remit's side.

use model::{ActionClass, Decision};

use crate::harness::Harness;

#[tokio::test]
async fn an_unreachable_store_denies_every_call() {
    let Some(base) = store::testing::postgres_url() else {
        return;
    };
    let schema = store::testing::PostgresSchema::create(&base).await.unwrap();
    let relay = store::testing::Relay::start(store::testing::host_port(&schema.url))
        .await
        .unwrap();
    let url = relay.reroute(&schema.url);
    let h = Harness::with_store(url, tempfile::tempdir().unwrap()).await;
    assert_eq!(h.authority.store().kind(), "postgres");

    let agent = h.agent("triage-bot", "alice@example.org").await;
    let grant = h.grant(&agent).await;
    assert!(
        h.call(&agent, &grant, "read_issue", ActionClass::Read)
            .await
            .is_allow()
    );

    relay.cut();

    // The task is known to this node, the token verifies, the proof is fresh: only the
    // store is missing, and that alone denies.
    let verdict = h
        .call(&agent, &grant, "read_issue", ActionClass::Read)
        .await;
    assert_eq!(
        (verdict.report.decision, verdict.code),
        (Decision::Deny, "store_unavailable")
    );
    assert_eq!(verdict.audit_seq, None);
    assert!(
        verdict.message.contains("fails closed"),
        "{}",
        verdict.message
    );

    let error = h
        .request(&agent, crate::harness::github_scopes(), None, None)
        .await
        .unwrap_err();
    assert_eq!(
        (error.kind, error.code),
        (control::ErrorKind::Unavailable, "store_unavailable")
    );

    let (status, body) = crate::api::get_json(&h, "/healthz").await;
    assert_eq!(status, axum::http::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"], "store_unavailable");

    drop(h);
    schema.drop_schema().await.unwrap();
}
