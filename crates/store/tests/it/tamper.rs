//! Security invariant 6 on both backends: editing, deleting, inserting or reordering audit
//! events behind the store's back is detected, at the first sequence number touched.

use audit::{BreakReason, ChainBreak, kinds};

use crate::harness::{TestDb, event, verify, verify_paged, verify_read, verify_stored};

/// Ten intact events, checked before each test tampers with them.
async fn ten_events(db: &TestDb) {
    let bodies: Vec<_> = (0..10)
        .map(|i| {
            event(kinds::CALL_DECISION)
                .agent("bot")
                .decision("allow")
                .detail(serde_json::json!({"call": i}))
        })
        .collect();
    db.store.append_events(bodies).await.unwrap();
    assert_eq!(verify(db.store.as_ref()).await, Ok(10));
}

async fn broken_at(db: &TestDb) -> ChainBreak {
    verify(db.store.as_ref()).await.unwrap_err()
}

pub async fn edited_detail(db: &TestDb) {
    ten_events(db).await;
    db.raw
        .execute(r#"UPDATE audit_events SET detail = '{"call":99}' WHERE seq = 4"#)
        .await;
    assert_eq!(
        broken_at(db).await,
        ChainBreak {
            seq: 4,
            reason: BreakReason::Content
        }
    );
}

pub async fn detail_respelled_with_the_same_meaning(db: &TestDb) {
    ten_events(db).await;
    // The stored text is what was hashed, so a respelling is an edit even where it parses to
    // the same value: reported by remit's verification and by the events read back (which
    // carry the stored text), while events received as JSON through the API (parsed, then
    // re-encoded) still verify.
    db.raw
        .execute(r#"UPDATE audit_events SET detail = '{ "call": 3 }' WHERE seq = 4"#)
        .await;
    assert_eq!(
        verify_stored(db.store.as_ref()).await,
        Err(ChainBreak {
            seq: 4,
            reason: BreakReason::Content
        })
    );
    assert_eq!(
        verify_read(db.store.as_ref()).await,
        Err(ChainBreak {
            seq: 4,
            reason: BreakReason::Content
        })
    );
    assert_eq!(verify_paged(db.store.as_ref()).await, Ok(10));
}

pub async fn event_numbered_zero(db: &TestDb) {
    ten_events(db).await;
    // Below the first number, where a reader starting after 0 would never look.
    db.raw
        .execute(
            "INSERT INTO audit_events (seq, time_ms, kind, actor, agent, task, decision, detail, prev_hash, hash) \
             SELECT 0, time_ms, kind, actor, agent, task, decision, detail, prev_hash, hash FROM audit_events WHERE seq = 1",
        )
        .await;
    assert_eq!(
        verify_stored(db.store.as_ref()).await,
        Err(ChainBreak {
            seq: 0,
            reason: BreakReason::Sequence {
                expected: 1,
                found: 0
            }
        })
    );
}

pub async fn edited_actor(db: &TestDb) {
    ten_events(db).await;
    db.raw
        .execute("UPDATE audit_events SET actor = 'someone-else' WHERE seq = 7")
        .await;
    assert_eq!(
        broken_at(db).await,
        ChainBreak {
            seq: 7,
            reason: BreakReason::Content
        }
    );
}

pub async fn deleted_event(db: &TestDb) {
    ten_events(db).await;
    db.raw
        .execute("DELETE FROM audit_events WHERE seq = 5")
        .await;
    let broken = broken_at(db).await;
    assert_eq!(broken.seq, 5);
    assert_eq!(
        broken.reason,
        BreakReason::Sequence {
            expected: 5,
            found: 6
        }
    );
}

pub async fn forged_event_appended(db: &TestDb) {
    ten_events(db).await;
    // A forger who links to the real head but cannot produce a matching hash.
    db.raw
        .execute(
            "INSERT INTO audit_events (seq, time_ms, kind, actor, agent, task, decision, detail, prev_hash, hash) \
             SELECT 11, time_ms, kind, 'forger', agent, task, decision, detail, hash, hash FROM audit_events WHERE seq = 10",
        )
        .await;
    assert_eq!(
        broken_at(db).await,
        ChainBreak {
            seq: 11,
            reason: BreakReason::Content
        }
    );
}

pub async fn forged_event_replacing_one(db: &TestDb) {
    ten_events(db).await;
    // Event 3 deleted and replaced by a copy of event 4's content under number 3.
    db.raw
        .execute("DELETE FROM audit_events WHERE seq = 3")
        .await;
    db.raw
        .execute(
            "INSERT INTO audit_events (seq, time_ms, kind, actor, agent, task, decision, detail, prev_hash, hash) \
             SELECT 3, time_ms, kind, actor, agent, task, decision, detail, prev_hash, hash FROM audit_events WHERE seq = 4",
        )
        .await;
    assert_eq!(
        broken_at(db).await,
        ChainBreak {
            seq: 3,
            reason: BreakReason::PrevHash
        }
    );
}

pub async fn swapped_events(db: &TestDb) {
    ten_events(db).await;
    // Events 5 and 6 trade places, each keeping its own content and hashes.
    db.raw
        .execute("UPDATE audit_events SET seq = -6 WHERE seq = 6")
        .await;
    db.raw
        .execute("UPDATE audit_events SET seq = 6 WHERE seq = 5")
        .await;
    db.raw
        .execute("UPDATE audit_events SET seq = 5 WHERE seq = -6")
        .await;
    assert_eq!(
        broken_at(db).await,
        ChainBreak {
            seq: 5,
            reason: BreakReason::PrevHash
        }
    );
}
