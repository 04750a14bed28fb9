//! The timeline of a scripted task, as a snapshot: the grant, each call with its decision and
//! reasons, a delegation and what the delegated task did, the revocation and its effect.

use model::ActionClass;
use store::RevocationKind;

use crate::delegation::{call, exchange};
use crate::harness::Harness;

#[tokio::test]
async fn the_timeline_of_a_scripted_task() {
    let h = Harness::new().await;
    let lead = h.agent("lead-bot", "alice@example.org").await;
    let helper = h.agent("helper-bot", "bob@example.org").await;
    let root = h.grant(&lead).await;
    call(&h, &lead, root.token.expose(), "read_issue").await;
    h.call(&lead, &root, "delete_repo", ActionClass::Admin)
        .await;
    let child = exchange(
        &h,
        &helper,
        root.token.expose(),
        Some("github:read_issue@acme/*"),
        Some(60),
        Some(3),
    )
    .await
    .unwrap();
    call(&h, &helper, child.access_token.expose(), "read_issue").await;
    h.authority
        .revoke(
            &h.admin,
            RevocationKind::Task,
            root.task_id.as_str(),
            "incident 42",
        )
        .await
        .unwrap();
    call(&h, &helper, child.access_token.expose(), "read_issue").await;

    let timeline = h
        .authority
        .timeline(&h.admin, root.task_id.as_str())
        .await
        .unwrap();
    assert!(
        timeline.windows(2).all(|w| w[0].seq < w[1].seq),
        "in audit order"
    );
    let text: Vec<String> = timeline
        .iter()
        .map(|entry| {
            let task = if entry.task == root.task_id.as_str() {
                "root "
            } else if entry.task == child.task_id {
                "child"
            } else {
                "?    "
            };
            let line = format!(
                "{task} {:<15} {:<6} {}",
                entry.kind,
                entry.decision.as_deref().unwrap_or("-"),
                entry.summary
            );
            line.replace(root.task_id.as_str(), "[ROOT]")
                .replace(&child.task_id, "[CHILD]")
        })
        .collect();
    insta::assert_snapshot!(text.join("\n"));

    // Unknown and malformed tasks are errors, and the timeline needs an auditor.
    assert_eq!(
        h.authority
            .timeline(&h.admin, "task_aaaaaaaaaaaaaaaaaaaaaaaaaa")
            .await
            .unwrap_err()
            .code,
        "task_not_found"
    );
    assert_eq!(
        h.authority
            .timeline(&h.admin, "nope")
            .await
            .unwrap_err()
            .code,
        "invalid_name"
    );
}
