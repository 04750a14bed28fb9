//! DESIGN.md invariant 4: when the store cannot be reached, remit denies with a clear error.
//! The store is a real PostgreSQL reached through a TCP relay that the test cuts, which is
//! what a network partition looks like from remit's side; or a store that holds calls up (its
//! write lock held by another connection, a table locked); or a SQLite file deleted while
//! serving.

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use model::{ActionClass, Decision};
use serde_json::json;

use crate::harness::Harness;

#[tokio::test]
async fn an_unreachable_store_denies_every_call() {
    let Some(base) = store::testing::postgres_url(
        "the PostgreSQL test `failclosed::an_unreachable_store_denies_every_call`",
    ) else {
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

/// A store that holds a call up (another process holds SQLite's write lock, or a table the
/// writer needs is locked on PostgreSQL) refuses the call within `store_timeout`, not when the
/// lock is released; `/readyz` says so meanwhile; and a decision whose caller was refused
/// never reads as an allowed call in the log.
async fn a_held_store_refuses_within_the_timeout(h: &Harness) {
    let agent = h.agent("triage-bot", "alice@example.org").await;
    let grant = h.grant(&agent).await;
    assert!(
        h.call(&agent, &grant, "read_issue", ActionClass::Read)
            .await
            .is_allow()
    );
    assert_eq!(crate::api::get_json(h, "/readyz").await.0, StatusCode::OK);

    let held = store::testing::HeldWrites::take(h.authority.settings().store_url.expose())
        .await
        .unwrap();
    let started = Instant::now();
    let verdict = tokio::time::timeout(
        Duration::from_secs(30),
        h.call(&agent, &grant, "read_issue", ActionClass::Read),
    )
    .await
    .expect("the call waited as long as the lock was held");
    let waited = started.elapsed();
    assert_eq!(
        (verdict.report.decision, verdict.code),
        (Decision::Deny, "store_unavailable")
    );
    // The harness's `store_timeout` is 500 ms.
    assert!(
        waited < Duration::from_millis(1500),
        "refused after {waited:?}"
    );

    let (status, body) = crate::api::get_json(h, "/readyz").await;
    assert_eq!(
        (status, &body["error"], &body["reason"]),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            &json!("store_unavailable"),
            &json!("store")
        ),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().starts_with("not ready: "),
        "{body}"
    );
    assert_eq!(
        crate::api::get_json(h, "/healthz").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(crate::api::get_json(h, "/livez").await.0, StatusCode::OK);

    held.release().await.unwrap();
    let (status, body) = crate::api::get_json(h, "/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        h.call(&agent, &grant, "read_issue", ActionClass::Read)
            .await
            .is_allow()
    );
    // Two allowed calls took effect; a third `allow` in the log must be marked unanswered.
    let events = h.authority.store().events_after(0, 10_000).await.unwrap();
    let unanswered: Vec<u64> = events
        .iter()
        .filter(|event| event.body.kind == audit::kinds::STORE_UNANSWERED)
        .flat_map(|event| {
            event.body.detail.to_value()["events"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|seq| seq.as_u64())
        .collect();
    let allowed = events
        .iter()
        .filter(|event| {
            event.body.kind == audit::kinds::CALL_DECISION
                && event.body.decision.as_deref() == Some("allow")
                && !unanswered.contains(&event.seq)
        })
        .count();
    assert_eq!(allowed, 2);
}

#[tokio::test]
async fn a_locked_sqlite_store_refuses_within_the_timeout() {
    let h = Harness::new().await;
    a_held_store_refuses_within_the_timeout(&h).await;
}

#[tokio::test]
async fn a_locked_postgres_table_refuses_within_the_timeout() {
    let Some(base) = store::testing::postgres_url(
        "the PostgreSQL test `failclosed::a_locked_postgres_table_refuses_within_the_timeout`",
    ) else {
        return;
    };
    let schema = store::testing::PostgresSchema::create(&base).await.unwrap();
    let h = Harness::with_store(schema.url.clone(), tempfile::tempdir().unwrap()).await;
    a_held_store_refuses_within_the_timeout(&h).await;
    drop(h);
    schema.drop_schema().await.unwrap();
}

/// A store file deleted while serving: the next write (the next call's decision) notices that
/// the path no longer names the file opened, and from then on calls fail closed instead of
/// being recorded in an unlinked file nobody will read; catch-ups and `/readyz` say so too.
#[tokio::test]
async fn a_deleted_sqlite_file_fails_closed() {
    let h = Harness::new().await;
    let agent = h.agent("triage-bot", "alice@example.org").await;
    let grant = h.grant(&agent).await;
    assert!(
        h.call(&agent, &grant, "read_issue", ActionClass::Read)
            .await
            .is_allow()
    );
    let url = h.authority.settings().store_url.clone();
    std::fs::remove_file(store::sqlite_path(url.expose()).unwrap()).unwrap();

    // The very next call: its decision would be written into the unlinked file.
    let verdict = h
        .call(&agent, &grant, "read_issue", ActionClass::Read)
        .await;
    assert_eq!(
        (verdict.report.decision, verdict.code),
        (Decision::Deny, "store_unavailable")
    );
    let error = h.authority.sync().await.unwrap_err();
    assert_eq!(error.code, "store_unavailable");
    let (status, body) = crate::api::get_json(&h, "/readyz").await;
    assert_eq!(
        (status, &body["reason"]),
        (StatusCode::SERVICE_UNAVAILABLE, &json!("store")),
        "{body}"
    );
}

/// `/readyz` answers 200 while the store takes writes, and says what it checked: the store,
/// the signing key, the policies.
#[tokio::test]
async fn ready_when_the_store_takes_writes() {
    let h = Harness::new().await;
    let (status, body) = crate::api::get_json(&h, "/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (&body["status"], &body["store"]),
        (&json!("ok"), &json!("sqlite"))
    );
    assert!(body["policies"].as_u64().unwrap() > 0, "{body}");
    assert_eq!(
        body["signing_key"].as_str().unwrap(),
        h.authority.keys().current_kid()
    );
}

/// Behind a store that does not answer, at most `store_max_waiting` calls wait for it: the
/// others are refused at once, so a stuck store cannot pile up every caller for the timeout.
#[tokio::test]
async fn calls_beyond_the_bound_are_refused_at_once() {
    let h = Harness::configured(|settings| settings.store_max_waiting = 2).await;
    let agent = h.agent("triage-bot", "alice@example.org").await;
    let grant = h.grant(&agent).await;
    assert!(
        h.call(&agent, &grant, "read_issue", ActionClass::Read)
            .await
            .is_allow()
    );
    let held = store::testing::HeldWrites::take(h.authority.settings().store_url.expose())
        .await
        .unwrap();
    let timed = || async {
        let started = Instant::now();
        let verdict = h
            .call(&agent, &grant, "read_issue", ActionClass::Read)
            .await;
        (verdict.code, started.elapsed())
    };
    let (first, second, third) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(timed(), timed(), timed())
    })
    .await
    .unwrap();
    held.release().await.unwrap();
    let answers = [first, second, third];
    assert!(
        answers.iter().all(|(code, _)| *code == "store_unavailable"),
        "{answers:?}"
    );
    // The harness's timeout is 500 ms: two waited for it, the third was refused at once.
    let at_once = answers
        .iter()
        .filter(|(_, elapsed)| *elapsed < Duration::from_millis(250))
        .count();
    assert!(at_once >= 1, "{answers:?}");
}

/// The PostgreSQL partition test's checks on SQLite: with the file's write lock held by
/// another connection, the call is denied as failing closed with no audit sequence, the grant
/// path is refused as unavailable too, and both work again once the lock is gone.
#[tokio::test]
async fn a_held_sqlite_store_denies_calls_and_grants() {
    let h = Harness::new().await;
    assert_eq!(h.authority.store().kind(), "sqlite");
    let agent = h.agent("triage-bot", "alice@example.org").await;
    let grant = h.grant(&agent).await;
    assert!(
        h.call(&agent, &grant, "read_issue", ActionClass::Read)
            .await
            .is_allow()
    );

    let held = store::testing::HeldWrites::take(h.authority.settings().store_url.expose())
        .await
        .unwrap();
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

    held.release().await.unwrap();
    assert!(
        h.call(&agent, &grant, "read_issue", ActionClass::Read)
            .await
            .is_allow()
    );
    h.request(&agent, crate::harness::github_scopes(), None, None)
        .await
        .unwrap();
}
