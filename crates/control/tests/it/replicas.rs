//! Two replicas on one PostgreSQL: a revocation taken through one is denied by the other on
//! its next call, within milliseconds, through `LISTEN/NOTIFY` — the periodic catch-up is set
//! to a minute here, so that only the notification can explain a prompt denial.

use std::time::{Duration, Instant};

use model::ActionClass;
use store::RevocationKind;

use crate::harness::Harness;

#[tokio::test]
async fn a_revocation_on_one_replica_bites_on_the_other_at_once() {
    let Some(base) = store::testing::postgres_url(
        "the PostgreSQL test `replicas::a_revocation_on_one_replica_bites_on_the_other_at_once`",
    ) else {
        return;
    };
    let schema = store::testing::PostgresSchema::create(&base).await.unwrap();
    let slow = |settings: &mut control::Settings| settings.sync_interval = Duration::from_secs(60);
    let first =
        Harness::with_store_configured(schema.url.clone(), tempfile::tempdir().unwrap(), slow)
            .await;
    let second =
        Harness::with_store_configured(schema.url.clone(), tempfile::tempdir().unwrap(), slow)
            .await;
    // The first tick of a Tokio interval fires at once; after it, only a notification can
    // bring news within the next minute.
    let sync = second.authority.spawn_sync();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let agent = first.agent("triage-bot", "alice@example.org").await;
    // A budget that polling for five seconds cannot spend, so that only a revocation denies.
    let grant = first
        .request(&agent, crate::harness::github_scopes(), None, Some(1_000))
        .await
        .unwrap();
    assert!(
        second
            .call(&agent, &grant, "read_issue", ActionClass::Read)
            .await
            .is_allow(),
        "the second replica serves the task the first one granted"
    );

    first
        .authority
        .revoke(
            &first.admin,
            RevocationKind::Task,
            grant.task_id.as_str(),
            "replica test",
        )
        .await
        .unwrap();
    let revoked = Instant::now();
    let mut verdict = second
        .call(&agent, &grant, "read_issue", ActionClass::Read)
        .await;
    while verdict.is_allow() && revoked.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
        verdict = second
            .call(&agent, &grant, "read_issue", ActionClass::Read)
            .await;
    }
    assert_eq!(verdict.code, "revoked", "{verdict:?}");
    assert!(
        revoked.elapsed() < Duration::from_secs(5),
        "the other replica learned of the revocation only after {:?}",
        revoked.elapsed()
    );
    sync.abort();
    drop((first, second));
    schema.drop_schema().await.unwrap();
}

/// Two replicas on one store: on SQLite (two processes on one file behave the same) and, when
/// configured, on PostgreSQL.
async fn two_replicas(store_url: String) -> (Harness, Harness) {
    let slow = |settings: &mut control::Settings| settings.sync_interval = Duration::from_secs(60);
    let first =
        Harness::with_store_configured(store_url.clone(), tempfile::tempdir().unwrap(), slow).await;
    let second =
        Harness::with_store_configured(store_url, tempfile::tempdir().unwrap(), slow).await;
    (first, second)
}

/// `case` on two SQLite replicas, then on two PostgreSQL ones; the PostgreSQL half is skipped
/// with a note naming `test` when no server is set.
async fn on_sqlite_and_postgres<F, Fut>(test: &str, case: F)
where
    F: Fn(Harness, Harness) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("remit.db").display());
    let (first, second) = two_replicas(url).await;
    case(first, second).await;
    let Some(base) =
        store::testing::postgres_url(&format!("the PostgreSQL half of `replicas::{test}`"))
    else {
        return;
    };
    let schema = store::testing::PostgresSchema::create(&base).await.unwrap();
    let (first, second) = two_replicas(schema.url.clone()).await;
    case(first, second).await;
    drop_when_idle(schema).await;
}

/// Drops a test schema once the dropped replicas' background tasks have let go of it: a
/// lookup fill still finishing can make `DROP SCHEMA` deadlock with it, once.
async fn drop_when_idle(schema: store::testing::PostgresSchema) {
    let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", schema.name);
    for attempt in 0.. {
        match store::testing::tamper(&schema.url, &sql).await {
            Ok(()) => return,
            Err(error) if attempt < 5 => {
                eprintln!("retrying the schema's drop: {error}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => panic!("cannot drop the test schema: {error}"),
        }
    }
}

/// The same DPoP proof sent to two replicas, whose replay caches know nothing of each other:
/// the store spends it with the first decision or grant, and the second replica refuses it as
/// `proof_replayed`, records the refusal, and forwards or grants nothing.
#[tokio::test]
async fn a_proof_is_accepted_once_whichever_replica_receives_it() {
    on_sqlite_and_postgres(
        "a_proof_is_accepted_once_whichever_replica_receives_it",
        |first, second| async move {
            let agent = first.agent("triage-bot", "alice@example.org").await;
            let ask = || -> control::TaskRequest {
                serde_json::from_value(serde_json::json!({
                    "agent": agent.name,
                    "intent": "triage new issues",
                    "scopes": crate::harness::github_scopes(),
                }))
                .unwrap()
            };

            // A grant.
            let proof = first.task_proof(&agent);
            let grant = first
                .authority
                .request_task(Some(&proof), ask())
                .await
                .unwrap();
            let again = second
                .authority
                .request_task(Some(&proof), ask())
                .await
                .unwrap_err();
            assert_eq!(again.code, "proof_replayed", "{again:?}");

            // A call.
            let url = format!("{}/http/github/read_issue", crate::harness::BASE);
            let token = grant.token.expose();
            let proof = agent
                .key
                .sign_proof("POST", &url, Some(token), first.now(), "one-call")
                .unwrap();
            let attempt = |h: &Harness| {
                let (token, proof, url) = (token.to_string(), proof.clone(), url.clone());
                let authority = h.authority.clone();
                async move {
                    let attempt = control::CallAttempt {
                        token: &token,
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
                        limiter: None,
                    };
                    authority.authorize(&attempt).await
                }
            };
            let allowed = attempt(&first).await;
            assert!(allowed.is_allow(), "{allowed:?}");
            let replayed = attempt(&second).await;
            assert_eq!(replayed.code, "proof_replayed", "{replayed:?}");
            assert!(!replayed.is_allow());
            assert!(replayed.audit_seq.is_some(), "the refusal is recorded");
            // The node that accepted it refuses it too, from its replay cache.
            assert_eq!(attempt(&first).await.code, "proof_replayed");

            // A delegation (token exchange) and a completion.
            let helper = first.agent("helper-bot", "alice@example.org").await;
            let exchange = || control::delegation::TokenExchange {
                grant_type: control::delegation::GRANT_TYPE.into(),
                subject_token: token.into(),
                subject_token_type: "urn:ietf:params:oauth:token-type:access_token".into(),
                agent: helper.name.clone(),
                scope: Some("github:read_issue@acme/*".into()),
                ttl_seconds: None,
                budget: Some(1),
                intent: None,
            };
            let proof = helper
                .key
                .sign_proof(
                    "POST",
                    &format!("{}/v1/token", crate::harness::BASE),
                    None,
                    first.now(),
                    "one-exchange",
                )
                .unwrap();
            first
                .authority
                .exchange_token(Some(&proof), exchange())
                .await
                .unwrap();
            let again = second
                .authority
                .exchange_token(Some(&proof), exchange())
                .await
                .unwrap_err();
            assert_eq!(again.code, "proof_replayed", "{again:?}");

            let complete = format!(
                "{}/v1/tasks/{}/complete",
                crate::harness::BASE,
                grant.task_id
            );
            let proof = agent
                .key
                .sign_proof(
                    "POST",
                    &complete,
                    Some(token),
                    first.now(),
                    "one-completion",
                )
                .unwrap();
            let again = {
                first
                    .authority
                    .complete_task(grant.task_id.as_str(), token, Some(&proof))
                    .await
                    .unwrap();
                second
                    .authority
                    .complete_task(grant.task_id.as_str(), token, Some(&proof))
                    .await
                    .unwrap_err()
            };
            assert_eq!(again.code, "proof_replayed", "{again:?}");

            let kinds: Vec<String> = first
                .authority
                .store()
                .events_after(0, 0)
                .await
                .unwrap()
                .into_iter()
                .map(|event| event.body.kind)
                .collect();
            let count = |kind: &str| kinds.iter().filter(|k| *k == kind).count();
            assert_eq!(count("task.granted"), 1, "{kinds:?}");
            assert_eq!(count("task.delegated"), 1, "{kinds:?}");
            assert_eq!(count("task.completed"), 1, "{kinds:?}");
        },
    )
    .await;
}

/// A key rotated on one replica: a token it signs with the new key verifies on the other at
/// once, without waiting for the other's periodic catch-up (a minute here), because a replica
/// that meets an unknown `kid` re-reads the keys; at most once a second, so that made-up
/// `kid`s cost one read of the store a second and no more.
#[tokio::test]
async fn a_key_rotated_on_one_replica_verifies_on_the_other_at_once() {
    on_sqlite_and_postgres(
        "a_key_rotated_on_one_replica_verifies_on_the_other_at_once",
        |first, second| async move {
            let agent = first.agent("triage-bot", "alice@example.org").await;
            let before = first.grant(&agent).await;
            assert!(
                second
                    .call(&agent, &before, "read_issue", ActionClass::Read)
                    .await
                    .is_allow()
            );

            // A token from another deployment names a key nobody here knows: one re-read.
            let stranger = Harness::new().await;
            let alien = stranger.agent("triage-bot", "alice@example.org").await;
            let foreign = stranger.grant(&alien).await;
            let refused = second
                .call(&alien, &foreign, "read_issue", ActionClass::Read)
                .await;
            assert_eq!(refused.code, "token_unknown_kid", "{refused:?}");

            let kid = first.authority.rotate_keys(&first.admin).await.unwrap();
            let after = first.grant(&agent).await;
            // Within the second after the stranger's re-read, the keys are not read again.
            let early = second
                .call(&agent, &after, "read_issue", ActionClass::Read)
                .await;
            assert_eq!(early.code, "token_unknown_kid", "{early:?}");
            second.clock.advance_seconds(1);
            let verdict = second
                .call(&agent, &after, "read_issue", ActionClass::Read)
                .await;
            assert!(verdict.is_allow(), "{verdict:?}");
            assert_eq!(second.authority.keys().current_kid(), kid);
            // Tokens signed before the rotation still verify everywhere.
            assert!(
                second
                    .call(&agent, &before, "read_issue", ActionClass::Read)
                    .await
                    .is_allow()
            );
        },
    )
    .await;
}

/// On PostgreSQL a rotation is announced like a revocation (`NOTIFY`): a replica whose
/// periodic catch-up is a minute away signs with the new key within moments.
#[tokio::test]
async fn a_rotation_is_announced_to_the_other_replicas() {
    let Some(base) = store::testing::postgres_url(
        "the PostgreSQL test `replicas::a_rotation_is_announced_to_the_other_replicas`",
    ) else {
        return;
    };
    let schema = store::testing::PostgresSchema::create(&base).await.unwrap();
    let (first, second) = two_replicas(schema.url.clone()).await;
    let sync = second.authority.spawn_sync();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let kid = first.authority.rotate_keys(&first.admin).await.unwrap();
    let rotated = Instant::now();
    while second.authority.keys().current_kid() != kid && rotated.elapsed() < Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        second.authority.keys().current_kid(),
        kid,
        "the other replica did not hear of the rotation within 5 s"
    );
    sync.abort();
    let _ = sync.await;
    drop((first, second));
    drop_when_idle(schema).await;
}

/// The store forgets spent proofs once no node would accept them anyway (older than a
/// proof's lifetime plus the clock skews), and keeps the recent ones.
#[tokio::test]
async fn spent_proofs_are_forgotten_once_too_old_to_accept() {
    let h = Harness::new().await;
    let agent = h.agent("triage-bot", "alice@example.org").await;
    let old = h.grant(&agent).await;
    assert!(
        h.call(&agent, &old, "read_issue", ActionClass::Read)
            .await
            .is_allow()
    );
    h.clock.advance_seconds(200);
    let recent = h.grant(&agent).await;
    assert!(
        h.call(&agent, &recent, "read_issue", ActionClass::Read)
            .await
            .is_allow()
    );
    h.authority.sync().await.unwrap();
    // What the sync left: the grant's and the call's proofs of the last 95 seconds.
    let left = h
        .authority
        .store()
        .sweep_proof_spends(i64::MAX)
        .await
        .unwrap();
    assert_eq!(left, 2);
}
