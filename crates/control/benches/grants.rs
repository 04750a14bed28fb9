//! Task grants per second, durable: the whole grant path (proof verification, Cedar, token
//! signing, the task and its audit event committed) driven by 64 concurrent agents against
//! a SQLite file and, when `REMIT_TEST_POSTGRES_URL` is set, PostgreSQL.
//!
//! `cargo bench -p control --bench grants`

#![allow(clippy::expect_used, reason = "a benchmark stops at its first failure")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use control::clock::{Clock, SystemClock};
use control::{Authority, Operator, Settings, TaskRequest};
use credentials::AgentKeyPair;
use serde_json::json;

const AGENTS: usize = 64;
const PROOFS_PER_AGENT: usize = 250;

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let sqlite = format!("sqlite://{}", dir.path().join("grants.db").display());
    run("sqlite", sqlite).await;
    match store::testing::postgres_url("the PostgreSQL half of the grants benchmark") {
        Some(url) => {
            let schema = store::testing::PostgresSchema::create(&url)
                .await
                .expect("postgres reachable");
            run("postgres", schema.url.clone()).await;
            schema.drop_schema().await.expect("drop schema");
        }
        None => println!("postgres: skipped (set REMIT_TEST_POSTGRES_URL)"),
    }
}

async fn run(label: &str, store_url: String) {
    let mut settings = Settings::local(store_url);
    settings.public_url = "http://127.0.0.1:8470".into();
    settings.proofs.replay_capacity = 1_000_000;
    let clock = Arc::new(SystemClock);
    let authority = Authority::open(settings, clock.clone())
        .await
        .expect("authority");
    let admin = Operator::local("bench");
    let url = "http://127.0.0.1:8470/v1/tasks";

    // Agents and their proofs are prepared before the clock starts: signing proofs is the
    // agents' work, not remit's.
    let mut workers = Vec::new();
    for i in 0..AGENTS {
        let key = AgentKeyPair::generate_p256().expect("key");
        let name = format!("bench-{i}");
        authority
            .register_agent(&admin, &name, "bench@example.org", &[key.public().to_jwk()])
            .await
            .expect("agent");
        let now = clock.now();
        let proofs: Vec<String> = (0..PROOFS_PER_AGENT)
            .map(|n| {
                key.sign_proof("POST", url, None, now, &format!("{label}-{i}-{n}"))
                    .expect("proof")
            })
            .collect();
        workers.push((name, proofs));
    }

    let started = Instant::now();
    let mut handles = Vec::new();
    for (name, proofs) in workers {
        let authority = Arc::clone(&authority);
        handles.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(proofs.len());
            for proof in proofs {
                let request: TaskRequest = serde_json::from_value(json!({
                    "agent": name,
                    "intent": "benchmark",
                    "scopes": [{ "tool": "github", "actions": ["read_issue"], "resources": ["acme/*"] }],
                }))
                .expect("request");
                let t = Instant::now();
                authority.request_task(Some(&proof), request).await.expect("grant");
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut histogram = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    for handle in handles {
        for latency in handle.await.expect("worker") {
            histogram
                .record(latency.as_micros() as u64)
                .expect("record");
        }
    }
    let elapsed = started.elapsed();
    let grants = AGENTS * PROOFS_PER_AGENT;
    println!(
        "{label}: {grants} grants by {AGENTS} concurrent agents in {:.2} s = {:.0} grants/s (latency p50 {} µs, p99 {} µs)",
        elapsed.as_secs_f64(),
        grants as f64 / elapsed.as_secs_f64(),
        histogram.value_at_quantile(0.5),
        histogram.value_at_quantile(0.99),
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
}
