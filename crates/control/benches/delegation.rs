//! Delegation under measurement: token exchanges per second (RFC 8693, durable, 64 concurrent
//! receiving agents), and the time from `POST /v1/revocations` of a root task to the first
//! denied call of its deepest descendant, three delegations down, while that descendant calls
//! in a tight loop.
//!
//! With `REMIT_TEST_POSTGRES_URL` set, also the time from a revocation taken on one replica to
//! the first denied call on another replica of the same PostgreSQL database, whose periodic
//! catch-up is held at a minute so that only `LISTEN/NOTIFY` can bring the news.
//!
//! `cargo bench -p control --bench delegation`

#![allow(clippy::expect_used, reason = "a benchmark stops at its first failure")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use control::clock::{Clock, SystemClock};
use control::delegation::{GRANT_TYPE, TokenExchange};
use control::{Authority, CallAttempt, Operator, Settings, TaskRequest};
use credentials::AgentKeyPair;
use model::ActionClass;
use serde_json::json;

const RECEIVERS: usize = 64;
const EXCHANGES_PER_RECEIVER: usize = 60;
const REVOCATION_ROUNDS: usize = 30;

static JTI: AtomicU64 = AtomicU64::new(0);

fn jti() -> String {
    format!("bench-{}", JTI.fetch_add(1, Ordering::Relaxed))
}

struct Node {
    authority: Arc<Authority>,
    base: String,
    clock: Arc<SystemClock>,
    admin_token: String,
    _dir: tempfile::TempDir,
}

async fn node() -> Node {
    let dir = tempfile::tempdir().expect("temporary directory");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listen");
    let address = listener.local_addr().expect("address");
    let mut settings = Settings::local(format!(
        "sqlite://{}",
        dir.path().join("delegation.db").display()
    ));
    settings.listen = address;
    settings.public_url = format!("http://{address}");
    // The tight loop calls with dead tokens on purpose; containment would quarantine it.
    settings.containment.dead_token = false;
    let base = settings.public_url.clone();
    let clock = Arc::new(SystemClock);
    let authority = Authority::open(settings, clock.clone())
        .await
        .expect("authority");
    let app = control::api::router(Arc::clone(&authority));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let (_, token) = authority
        .create_operator(&Operator::local("bench"), "bench", model::Role::Admin)
        .await
        .expect("operator");
    Node {
        authority,
        base,
        clock,
        admin_token: token.expose().clone(),
        _dir: dir,
    }
}

async fn agent(node: &Node, name: &str) -> AgentKeyPair {
    let key = AgentKeyPair::generate_ed25519().expect("key");
    node.authority
        .register_agent(
            &Operator::local("bench"),
            name,
            "bench@example.org",
            &[key.public().to_jwk()],
        )
        .await
        .expect("agent");
    key
}

async fn root_task(node: &Node, name: &str, key: &AgentKeyPair, budget: u32) -> (String, String) {
    let proof = key
        .sign_proof(
            "POST",
            &format!("{}/v1/tasks", node.base),
            None,
            node.clock.now(),
            &jti(),
        )
        .expect("proof");
    let request: TaskRequest = serde_json::from_value(json!({
        "agent": name, "intent": "delegation benchmark", "ttl_seconds": 3600, "budget": budget,
        "scopes": [{ "tool": "github", "actions": ["read_issue"], "resources": ["acme/*"] }],
    }))
    .expect("request");
    let grant = node
        .authority
        .request_task(Some(&proof), request)
        .await
        .expect("grant");
    (grant.task_id.to_string(), grant.token.expose().clone())
}

fn exchange_request(
    node: &Node,
    to: &str,
    key: &AgentKeyPair,
    subject: &str,
    budget: u32,
) -> (String, TokenExchange) {
    let proof = key
        .sign_proof(
            "POST",
            &format!("{}/v1/token", node.base),
            None,
            node.clock.now(),
            &jti(),
        )
        .expect("proof");
    let request = TokenExchange {
        grant_type: GRANT_TYPE.into(),
        subject_token: subject.into(),
        subject_token_type: "urn:ietf:params:oauth:token-type:access_token".into(),
        agent: to.into(),
        scope: Some("github:read_issue@acme/*".into()),
        ttl_seconds: None,
        budget: Some(budget),
        intent: None,
    };
    (proof, request)
}

async fn exchanges_per_second() {
    let node = node().await;
    let root_key = agent(&node, "root-bot").await;
    let (_, root_token) = root_task(&node, "root-bot", &root_key, 10_000).await;
    let mut work = Vec::new();
    for i in 0..RECEIVERS {
        let name = format!("receiver-{i}");
        let key = agent(&node, &name).await;
        let requests: Vec<_> = (0..EXCHANGES_PER_RECEIVER)
            .map(|_| exchange_request(&node, &name, &key, &root_token, 1))
            .collect();
        work.push(requests);
    }
    let started = Instant::now();
    let mut handles = Vec::new();
    for requests in work {
        let authority = Arc::clone(&node.authority);
        handles.push(tokio::spawn(async move {
            for (proof, request) in requests {
                authority
                    .exchange_token(Some(&proof), request)
                    .await
                    .expect("exchange");
            }
        }));
    }
    for handle in handles {
        handle.await.expect("worker");
    }
    let elapsed = started.elapsed();
    let total = RECEIVERS * EXCHANGES_PER_RECEIVER;
    println!(
        "token exchange: {total} exchanges by {RECEIVERS} concurrent receiving agents in {:.2} s = {:.0} exchanges/s (durable, SQLite, Ed25519 proofs)",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
}

/// Calls `url` with `token` in a loop, a fresh proof by `key` each time, until a call is
/// denied; returns the denial's code and how long after `revoked_at` was set it came.
fn call_until_denied(
    authority: Arc<Authority>,
    token: Arc<String>,
    key: AgentKeyPair,
    url: String,
    revoked_at: Arc<parking_lot::Mutex<Option<Instant>>>,
) -> tokio::task::JoinHandle<(&'static str, Option<Duration>)> {
    tokio::spawn(async move {
        loop {
            let proof = key
                .sign_proof("POST", &url, Some(&token), SystemClock.now(), &jti())
                .expect("proof");
            let attempt = CallAttempt {
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
            let verdict = authority.decide_unrecorded(&attempt).await;
            if !verdict.is_allow() {
                // A denial before the revocation is a broken benchmark: the caller reports it.
                let at = *revoked_at.lock();
                return (verdict.code, at.map(|at| at.elapsed()));
            }
            // A warm decision never waits, so without this the loop would hold its worker
            // thread against the tasks that bring the revocation (the API, a replica's
            // listener and catch-up).
            tokio::task::yield_now().await;
        }
    })
}

async fn revocation_to_denial() {
    let node = node().await;
    let http = reqwest::Client::new();
    let names = ["a-bot", "b-bot", "c-bot", "d-bot"];
    let mut keys = Vec::new();
    for name in names {
        keys.push(agent(&node, name).await);
    }
    let mut latencies = Vec::new();
    for _ in 0..REVOCATION_ROUNDS {
        // root -> child -> grandchild -> great-grandchild (depth 3, the default maximum).
        let (root_id, mut token) = root_task(&node, names[0], &keys[0], 10_000).await;
        for depth in 1..4 {
            let (proof, request) = exchange_request(
                &node,
                names[depth],
                &keys[depth],
                &token,
                10_000 - depth as u32,
            );
            token = node
                .authority
                .exchange_token(Some(&proof), request)
                .await
                .expect("exchange")
                .access_token
                .expose()
                .clone();
        }
        let deepest = Arc::new(token);
        let url = format!("{}/http/github/read_issue", node.base);
        // The deepest descendant calls in a tight loop, each call with a fresh proof.
        let revoked_at: Arc<parking_lot::Mutex<Option<Instant>>> = Arc::default();
        let proof_key =
            AgentKeyPair::from_private_jwk(keys[3].to_private_jwk().expose()).expect("key");
        let caller = call_until_denied(
            Arc::clone(&node.authority),
            deepest,
            proof_key,
            url.clone(),
            Arc::clone(&revoked_at),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        *revoked_at.lock() = Some(Instant::now());
        let response = http
            .post(format!("{}/v1/revocations", node.base))
            .bearer_auth(&node.admin_token)
            .json(&json!({ "kind": "task", "target": root_id, "reason": "benchmark" }))
            .send()
            .await
            .expect("revoke");
        assert_eq!(response.status(), 201);
        let (code, latency) = caller.await.expect("caller");
        assert_eq!(code, "revoked");
        latencies.push(latency.expect("denied only after the revocation was sent"));
    }
    latencies.sort();
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "revocation to denial, same node: POST /v1/revocations of the root sent -> first denied call of the depth-3 descendant: p50 {:.0} µs, max {:.0} µs over {REVOCATION_ROUNDS} rounds (includes the HTTP round trip and the durable revocation write)",
        micros(latencies[latencies.len() / 2]),
        micros(latencies[latencies.len() - 1]),
    );
    println!(
        "  other nodes and processes learn of it on their next catch-up: at most `sync_interval_ms` (100 ms by default) plus one store read"
    );
}

/// One replica on the PostgreSQL schema at `url`.
async fn replica(url: &str, sync: Duration) -> Arc<Authority> {
    let mut settings = Settings::local(url.to_string());
    settings.public_url = "http://127.0.0.1:8470".into();
    settings.sync_interval = sync;
    settings.containment.dead_token = false;
    Authority::open(settings, Arc::new(SystemClock))
        .await
        .expect("replica")
}

async fn revocation_across_replicas() {
    let Some(base) =
        store::testing::postgres_url("the revocation across PostgreSQL replicas benchmark")
    else {
        return;
    };
    let schema = store::testing::PostgresSchema::create(&base)
        .await
        .expect("schema");
    let first = replica(&schema.url, Duration::from_secs(60)).await;
    let second = replica(&schema.url, Duration::from_secs(60)).await;
    let sync = second.spawn_sync();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let admin = Operator::local("bench");
    let key = AgentKeyPair::generate_ed25519().expect("key");
    first
        .register_agent(
            &admin,
            "r-bot",
            "bench@example.org",
            &[key.public().to_jwk()],
        )
        .await
        .expect("agent");
    let url = "http://127.0.0.1:8470/http/github/read_issue";
    let mut latencies = Vec::new();
    for _ in 0..REVOCATION_ROUNDS {
        let proof = key
            .sign_proof(
                "POST",
                "http://127.0.0.1:8470/v1/tasks",
                None,
                SystemClock.now(),
                &jti(),
            )
            .expect("proof");
        let request: TaskRequest = serde_json::from_value(json!({
            "agent": "r-bot", "intent": "replica benchmark", "ttl_seconds": 3600, "budget": 10_000,
            "scopes": [{ "tool": "github", "actions": ["read_issue"], "resources": ["acme/*"] }],
        }))
        .expect("request");
        let grant = first
            .request_task(Some(&proof), request)
            .await
            .expect("grant");
        let token = Arc::new(grant.token.expose().clone());
        let revoked_at: Arc<parking_lot::Mutex<Option<Instant>>> = Arc::default();
        let proof_key = AgentKeyPair::from_private_jwk(key.to_private_jwk().expose()).expect("key");
        let caller = call_until_denied(
            Arc::clone(&second),
            token,
            proof_key,
            url.to_string(),
            Arc::clone(&revoked_at),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        *revoked_at.lock() = Some(Instant::now());
        first
            .revoke(
                &admin,
                store::RevocationKind::Task,
                grant.task_id.as_str(),
                "benchmark",
            )
            .await
            .expect("revoke");
        let (code, latency) = caller.await.expect("caller");
        assert_eq!(code, "revoked");
        latencies.push(latency.expect("denied only after the revocation was taken"));
    }
    sync.abort();
    latencies.sort();
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "revocation to denial, across replicas (PostgreSQL, periodic catch-up held at 60 s): revoke on one replica -> first denied call on the other: p50 {:.0} µs, max {:.0} µs over {REVOCATION_ROUNDS} rounds (includes the durable revocation write and LISTEN/NOTIFY)",
        micros(latencies[latencies.len() / 2]),
        micros(latencies[latencies.len() - 1]),
    );
    drop((first, second));
    schema.drop_schema().await.expect("drop schema");
}

#[tokio::main]
async fn main() {
    exchanges_per_second().await;
    revocation_to_denial().await;
    revocation_across_replicas().await;
}
