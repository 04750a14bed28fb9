//! Two replicas on one PostgreSQL: a revocation taken through one is denied by the other on
//! its next call, within milliseconds, through `LISTEN/NOTIFY` — the periodic catch-up is set
//! to a minute here, so that only the notification can explain a prompt denial.

use std::time::{Duration, Instant};

use model::ActionClass;
use store::RevocationKind;

use crate::harness::Harness;

#[tokio::test]
async fn a_revocation_on_one_replica_bites_on_the_other_at_once() {
    let Some(base) = store::testing::postgres_url() else {
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
