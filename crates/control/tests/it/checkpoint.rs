//! Signed checkpoints close the two holes a hash chain leaves (DESIGN.md invariant 6): a cut-off
//! tail and a history rewritten with every hash recomputed both verify as an intact chain, and
//! both are named once the log is held against a checkpoint an auditor kept. On SQLite and
//! PostgreSQL, tampering through a connection of its own, as someone with database access would.

use audit::Event;
use control::{Checkpoint, ErrorKind, VerifyReport};

use crate::harness::Harness;

/// A harness on each backend, with the URL a tamperer would connect to, for the test named
/// `test` (its PostgreSQL half is skipped with a note naming it when no server is set).
async fn backends(test: &str) -> Vec<(Harness, String, Option<store::testing::PostgresSchema>)> {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("remit.db").display());
    let mut out = vec![(Harness::with_store(url.clone(), dir).await, url, None)];
    if let Some(base) =
        store::testing::postgres_url(&format!("the PostgreSQL half of `checkpoint::{test}`"))
    {
        let schema = store::testing::PostgresSchema::create(&base).await.unwrap();
        let url = schema.url.clone();
        let harness = Harness::with_store(url.clone(), tempfile::tempdir().unwrap()).await;
        out.push((harness, url, Some(schema)));
    }
    out
}

/// A few events, then a checkpoint of the head.
async fn events_then_checkpoint(h: &Harness) -> Checkpoint {
    for name in ["bot-a", "bot-b", "bot-c", "bot-d"] {
        h.agent(name, "alice@example.org").await;
    }
    let checkpoint = h.authority.audit_checkpoint(&h.admin).await.unwrap();
    assert!(checkpoint.seq >= 5, "{checkpoint:?}");
    checkpoint
}

async fn against(h: &Harness, checkpoint: &str) -> VerifyReport {
    h.authority
        .verify_audit_against(&h.admin, checkpoint)
        .await
        .unwrap()
}

async fn plain(h: &Harness) -> VerifyReport {
    h.authority.verify_audit(&h.admin).await.unwrap()
}

#[tokio::test]
async fn an_intact_log_matches_its_checkpoint_as_it_grows() {
    for (h, _, schema) in backends("an_intact_log_matches_its_checkpoint_as_it_grows").await {
        let checkpoint = events_then_checkpoint(&h).await;
        let report = against(&h, &checkpoint.checkpoint).await;
        assert!(report.ok, "{report:?}");
        assert_eq!(report.checkpoint_seq, Some(checkpoint.seq));
        // Later events and a key rotation do not invalidate a kept checkpoint.
        h.agent("bot-e", "alice@example.org").await;
        h.authority.rotate_keys(&h.admin).await.unwrap();
        let report = against(&h, &checkpoint.checkpoint).await;
        assert!(report.ok, "{report:?}");
        assert!(report.checked > checkpoint.seq);
        if let Some(schema) = schema {
            schema.drop_schema().await.unwrap();
        }
    }
}

#[tokio::test]
async fn a_cut_off_tail_is_named() {
    for (h, url, schema) in backends("a_cut_off_tail_is_named").await {
        let checkpoint = events_then_checkpoint(&h).await;
        let cut = checkpoint.seq - 1;
        store::testing::tamper(
            &url,
            &format!("DELETE FROM audit_events WHERE seq >= {cut}"),
        )
        .await
        .unwrap();
        // The chain alone cannot tell: what is left is a valid, shorter chain.
        assert!(plain(&h).await.ok);
        let report = against(&h, &checkpoint.checkpoint).await;
        assert!(!report.ok);
        assert_eq!(report.first_bad_seq, Some(cut), "{report:?}");
        let reason = report.reason.unwrap();
        assert!(reason.contains("deleted"), "{reason}");
        if let Some(schema) = schema {
            schema.drop_schema().await.unwrap();
        }
    }
}

#[tokio::test]
async fn a_history_rewritten_with_recomputed_hashes_is_named() {
    for (h, url, schema) in backends("a_history_rewritten_with_recomputed_hashes_is_named").await {
        let checkpoint = events_then_checkpoint(&h).await;
        let blob = |hash: &audit::Hash| {
            let hex = audit::to_hex(hash);
            if url.starts_with("sqlite:") {
                format!("X'{hex}'")
            } else {
                format!("decode('{hex}', 'hex')")
            }
        };
        // Change who registered event 2, then re-seal every event after it, as a tamperer who
        // knows the encoding would.
        let events = h.authority.store().events_after(0, 1000).await.unwrap();
        let mut prev = events[0].hash;
        let mut sql = String::new();
        for event in &events[1..] {
            let mut body = event.body.clone();
            if event.seq == 2 {
                body.actor = "operator:nobody".to_string();
            }
            let resealed = Event::seal(event.seq, prev, body);
            sql.push_str(&format!(
                "UPDATE audit_events SET actor = '{}', prev_hash = {}, hash = {} WHERE seq = {};\n",
                resealed.body.actor,
                blob(&resealed.prev_hash),
                blob(&resealed.hash),
                resealed.seq
            ));
            prev = resealed.hash;
        }
        store::testing::tamper(&url, &sql).await.unwrap();
        assert!(plain(&h).await.ok, "the rewritten chain is consistent");
        let report = against(&h, &checkpoint.checkpoint).await;
        assert!(!report.ok);
        assert_eq!(report.first_bad_seq, Some(checkpoint.seq), "{report:?}");
        let reason = report.reason.unwrap();
        assert!(reason.contains("rewritten"), "{reason}");
        if let Some(schema) = schema {
            schema.drop_schema().await.unwrap();
        }
    }
}

#[tokio::test]
async fn a_checkpoint_remit_did_not_sign_is_refused() {
    let h = Harness::new().await;
    let other = Harness::new().await;
    let checkpoint = events_then_checkpoint(&h).await;
    let foreign = events_then_checkpoint(&other).await;
    let parts: Vec<&str> = checkpoint.checkpoint.split('.').collect();
    let forged_payload = format!(
        "{}.{}.{}",
        parts[0],
        foreign.checkpoint.split('.').nth(1).unwrap(),
        parts[2]
    );
    for (what, text) in [
        ("another remit's", foreign.checkpoint.clone()),
        ("a payload swapped in", forged_payload),
        ("not a JWS", "hello".to_string()),
    ] {
        let error = h
            .authority
            .verify_audit_against(&h.admin, &text)
            .await
            .expect_err(what);
        assert_eq!(
            (error.kind, error.code),
            (ErrorKind::BadRequest, "invalid_checkpoint"),
            "{what}: {error}"
        );
    }
}
