//! The store under failure: a store that does not answer (its write lock held by another
//! process, a table locked on PostgreSQL) is `Unavailable` within the operation timeout rather
//! than as late as the lock is released; the operations waiting at once are bounded; an
//! operation whose caller gave up never reads in the log as if it took effect; and a SQLite
//! file removed or replaced under a running store is noticed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use audit::{EventBody, kinds};
use model::AgentName;
use store::{OpenOptions, Store, StoreError};

use crate::harness::TestDb;

/// A second store on the test's data, with a short timeout and `max_waiting`.
async fn bounded_store(db: &TestDb, timeout: Duration, max_waiting: usize) -> Arc<dyn Store> {
    let options = OpenOptions {
        operation_timeout: timeout,
        max_waiting,
        ..OpenOptions::default()
    };
    store::open_with(&db.url, &options).await.unwrap()
}

fn decision(actor: &str) -> EventBody {
    EventBody::new(1_700_000_000_000, kinds::CALL_DECISION, actor).decision("allow")
}

/// Fails the test instead of hanging it when the store does not bound the wait itself.
async fn within<T>(limit: Duration, operation: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, operation)
        .await
        .unwrap_or_else(|_| panic!("no answer within {limit:?}"))
}

/// `Unavailable` because the store did not answer in time: remit's own bound or the
/// database's limit (`busy_timeout`, `lock_timeout`, `statement_timeout`), whichever came first.
fn assert_timed_out<T: std::fmt::Debug>(result: store::Result<T>) {
    match result {
        Err(StoreError::Unavailable(message)) => assert!(
            ["did not answer within", "timeout", "locked", "busy"]
                .iter()
                .any(|says| message.contains(says)),
            "`{message}` is not a timeout"
        ),
        other => panic!("expected `Unavailable`, got {other:?}"),
    }
}

fn assert_unavailable<T: std::fmt::Debug>(result: store::Result<T>, says: &str) {
    match result {
        Err(StoreError::Unavailable(message)) => {
            assert!(message.contains(says), "`{message}` does not say `{says}`")
        }
        other => panic!("expected `Unavailable` saying `{says}`, got {other:?}"),
    }
}

/// Every event written by `actor` is named by a later `store.unanswered` event: a write that
/// committed after its caller was refused must not read as done.
async fn refused_writes_read_as_refused(store: &dyn Store, actor: &str) {
    let events = store.events_after(0, 10_000).await.unwrap();
    let unanswered: Vec<u64> = events
        .iter()
        .filter(|event| event.body.kind == kinds::STORE_UNANSWERED)
        .flat_map(|event| {
            event.body.detail.to_value()["events"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|seq| seq.as_u64())
        .collect();
    for event in events.iter().filter(|event| event.body.actor == actor) {
        assert!(
            unanswered.contains(&event.seq),
            "event {} of a refused write reads as done",
            event.seq
        );
    }
}

pub async fn a_held_write_lock_is_unavailable_within_the_timeout(db: &TestDb) {
    let timeout = Duration::from_millis(300);
    let store = bounded_store(db, timeout, 1024).await;
    store.append_events(vec![decision("before")]).await.unwrap();

    let held = db.raw.hold_writes().await;
    let started = Instant::now();
    let refused = within(
        Duration::from_secs(30),
        store.append_events(vec![decision("while-locked")]),
    )
    .await;
    let waited = started.elapsed();
    assert_timed_out(refused);
    assert!(
        waited < timeout + Duration::from_secs(1),
        "refused only after {waited:?}"
    );
    // What the lock does not cover still answers.
    store.ping().await.unwrap();
    held.release().await;

    store.append_events(vec![decision("after")]).await.unwrap();
    refused_writes_read_as_refused(&*store, "while-locked").await;
    assert!(crate::harness::verify(&*store).await.is_ok());
}

pub async fn the_operations_waiting_at_once_are_bounded(db: &TestDb) {
    let timeout = Duration::from_secs(1);
    let store = bounded_store(db, timeout, 2).await;
    let held = db.raw.hold_writes().await;
    // Three writes at once behind the lock: two may wait (for the timeout), the third is
    // refused at once rather than queueing behind a store that does not answer.
    let writes: Vec<_> = (0..3)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let started = Instant::now();
                let result = store.append_events(vec![decision("refused")]).await;
                (result, started.elapsed())
            })
        })
        .collect();
    let (mut waited, mut refused) = (0, 0);
    for write in writes {
        match within(Duration::from_secs(30), write).await.unwrap() {
            (Err(StoreError::Unavailable(message)), elapsed) if message.contains("waiting") => {
                assert_eq!(message, "2 operations are already waiting for the store");
                assert!(elapsed < timeout / 2, "refused only after {elapsed:?}");
                refused += 1;
            }
            (result, elapsed) => {
                assert_timed_out(result);
                assert!(elapsed >= timeout, "{elapsed:?}");
                waited += 1;
            }
        }
    }
    assert!(
        waited <= 2 && refused >= 1,
        "{waited} waited, {refused} refused"
    );
    held.release().await;
    store.append_events(vec![decision("after")]).await.unwrap();
    refused_writes_read_as_refused(&*store, "refused").await;
}

pub async fn ready_means_a_write_reaches_the_store(db: &TestDb) {
    let store = bounded_store(db, Duration::from_millis(300), 1024).await;
    store.ready(1).await.unwrap();
    let held = db.raw.hold_writes().await;
    // A write failed since the last that reached the store: not ready until one does again.
    assert_timed_out(store.append_events(vec![decision("while-locked")]).await);
    assert_timed_out(within(Duration::from_secs(30), store.ready(2)).await);
    held.release().await;
    store.ready(3).await.unwrap();
    refused_writes_read_as_refused(&*store, "while-locked").await;
}

/// SQLite alone: the file at the store's path is the store only while it is the file opened.
pub async fn a_removed_store_file_is_noticed(db: &TestDb) {
    let path = store::sqlite_path(&db.url).unwrap().to_string();
    db.store.ping().await.unwrap();
    std::fs::remove_file(&path).unwrap();
    // The writer looks before each transaction: the first write after the removal fails.
    assert_unavailable(
        db.store.append_events(vec![decision("first")]).await,
        "was removed or replaced",
    );
    assert_unavailable(db.store.ping().await, "was removed or replaced");
    // From then on nothing is written anywhere, the file back or not.
    std::fs::write(&path, b"").unwrap();
    assert_unavailable(
        db.store.append_events(vec![decision("after")]).await,
        "was removed or replaced",
    );
    assert_unavailable(db.store.ready(1).await, "was removed or replaced");
}

pub async fn a_replaced_store_file_is_noticed(db: &TestDb) {
    let path = store::sqlite_path(&db.url).unwrap().to_string();
    let other = format!("{path}.other");
    std::fs::copy(&path, &other).unwrap();
    std::fs::rename(&other, &path).unwrap();
    assert_unavailable(db.store.ready(1).await, "was removed or replaced");
    assert_unavailable(
        db.store
            .get_agent(&"nobody".parse::<AgentName>().unwrap())
            .await,
        "was removed or replaced",
    );
}

pub async fn a_missing_store_is_not_created_unless_asked(db: &TestDb) {
    let path = store::sqlite_path(&db.url).unwrap().to_string();
    let missing = format!("{path}.missing");
    let options = OpenOptions {
        create_if_missing: false,
        ..OpenOptions::default()
    };
    let url = format!("sqlite://{missing}");
    match store::open_with(&url, &options).await {
        Err(error @ StoreError::Missing(_)) => {
            assert_eq!(error.to_string(), format!("no store at `{missing}`"))
        }
        other => panic!("expected `Missing`, got {other:?}"),
    }
    assert!(!std::path::Path::new(&missing).exists());
    assert!(!std::path::Path::new(&store::sqlite_lookups_path(&missing)).exists());
    // An existing one opens as ever, and its lookup file (derived data) is recreated.
    std::fs::remove_file(store::sqlite_lookups_path(&path)).unwrap();
    store::open_with(&db.url, &options)
        .await
        .unwrap()
        .ping()
        .await
        .unwrap();
    assert!(std::path::Path::new(&store::sqlite_lookups_path(&path)).exists());
}
