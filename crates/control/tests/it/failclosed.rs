//! DESIGN.md invariant 4: when the store cannot be reached, remit denies with a clear error.
//! The store is a real PostgreSQL reached through a TCP relay that the test cuts, which is
//! what a network partition looks like from remit's side.

use std::sync::Arc;

use model::{ActionClass, Decision};
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::harness::Harness;

/// Forwards TCP connections to `target` until cut.
struct Relay {
    address: String,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Relay {
    async fn start(target: String) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let registry = Arc::clone(&tasks);
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let pipe = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                registry.lock().push(pipe);
            }
        });
        tasks.lock().push(accept);
        Relay { address, tasks }
    }

    /// Drops every connection and stops accepting: the store is gone.
    fn cut(&self) {
        for task in self.tasks.lock().drain(..) {
            task.abort();
        }
    }
}

/// `url` with its host and port replaced by `address`.
fn through(url: &str, address: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let at = rest.find('@').map_or(0, |i| i + 1);
    let end = rest[at..].find(['/', '?']).map_or(rest.len(), |i| at + i);
    format!("{scheme}://{}{address}{}", &rest[..at], &rest[end..])
}

fn target_of(url: &str) -> String {
    let rest = url.split_once("://").unwrap().1;
    let at = rest.find('@').map_or(0, |i| i + 1);
    let end = rest[at..].find(['/', '?']).map_or(rest.len(), |i| at + i);
    rest[at..end].to_string()
}

#[tokio::test]
async fn an_unreachable_store_denies_every_call() {
    let Some(base) = store::testing::postgres_url() else {
        return;
    };
    let schema = store::testing::PostgresSchema::create(&base).await.unwrap();
    let relay = Relay::start(target_of(&schema.url)).await;
    let url = through(&schema.url, &relay.address);
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

#[test]
fn urls_are_rerouted_through_the_relay() {
    let url = "postgres://postgres@127.0.0.1:5432/test?options=x";
    assert_eq!(target_of(url), "127.0.0.1:5432");
    assert_eq!(
        through(url, "127.0.0.1:9"),
        "postgres://postgres@127.0.0.1:9/test?options=x"
    );
    assert_eq!(through("postgres://db:5432/x", "h:1"), "postgres://h:1/x");
}
