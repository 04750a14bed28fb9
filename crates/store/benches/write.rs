//! Durable write throughput and chain verification rate, against DESIGN.md's budgets: task
//! grants ≥ 5,000/s on SQLite, audit appends ≥ 50,000 events/s, verification ≥ 500,000
//! events/s. Runs on a temporary SQLite file, and on PostgreSQL when
//! `REMIT_TEST_POSTGRES_URL` is set (in a schema of its own, dropped afterwards).
//!
//! `cargo bench -p store --bench write`; `REMIT_BENCH_SECONDS` changes the 5-second phases.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a benchmark stops at the first failure"
)]

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use audit::{ChainVerifier, Event, EventBody, kinds};
use hdrhistogram::Histogram;
use model::{AgentStatus, Owner, Scope, ScopeSet, SpiffeId, TaskId, TaskStatus, TrustDomain};
use store::{AgentRecord, Store, TaskRecord};

const WRITERS: usize = 64;
const VERIFY_AT_LEAST: u64 = 200_000;
const PAGE: u32 = 1_000;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let seconds = std::env::var("REMIT_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let phase = Duration::from_secs(seconds);

    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let sqlite = store::open(&url).await.unwrap();
    bench_store("sqlite", &sqlite, phase).await;
    drop(sqlite);

    match std::env::var("REMIT_TEST_POSTGRES_URL") {
        Ok(base) if !base.is_empty() => {
            let admin = sqlx::PgPool::connect(&base).await.unwrap();
            let schema = format!("remit_bench_{}", std::process::id());
            sqlx::raw_sql(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
            ))
            .execute(&admin)
            .await
            .unwrap();
            let separator = if base.contains('?') { '&' } else { '?' };
            let postgres = store::open(&format!(
                "{base}{separator}options=-c%20search_path%3D{schema}"
            ))
            .await
            .unwrap();
            bench_store("postgres", &postgres, phase).await;
            drop(postgres);
            sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE"))
                .execute(&admin)
                .await
                .unwrap();
        }
        _ => println!("postgres: skipped (set REMIT_TEST_POSTGRES_URL to include it)"),
    }
}

async fn bench_store(kind: &str, store: &Arc<dyn Store>, phase: Duration) {
    store
        .insert_agent(&agent(), event(kinds::AGENT_REGISTERED))
        .await
        .unwrap();

    let next_task = Arc::new(AtomicU64::new(0));
    let grants = drive(store, phase, 1, move |store| {
        let n = next_task.fetch_add(1, Ordering::Relaxed);
        async move {
            let task = task(n);
            let body = event(kinds::TASK_GRANTED)
                .agent("bench-bot")
                .task(task.id.as_str());
            store.insert_task(&task, body).await.unwrap();
        }
    })
    .await;
    report(
        kind,
        "task grants (insert_task + event)",
        "grants",
        &grants,
        Some(5_000.0),
    );

    let single = drive(store, phase, 1, |store| async move {
        store.append_events(vec![decision()]).await.unwrap();
    })
    .await;
    report(
        kind,
        "audit appends, 1 event per call",
        "events",
        &single,
        Some(50_000.0),
    );

    let batched = drive(store, phase, 100, |store| async move {
        store.append_events(vec![decision(); 100]).await.unwrap();
    })
    .await;
    report(
        kind,
        "audit appends, 100 events per call",
        "events",
        &batched,
        Some(50_000.0),
    );

    // Make sure there is enough chain to measure verification on.
    let mut total = grants.units + single.units + batched.units + 1;
    while total < VERIFY_AT_LEAST {
        total += store
            .append_events(vec![decision(); 1_000])
            .await
            .unwrap()
            .len() as u64;
    }

    let started = Instant::now();
    let mut verifier = ChainVerifier::default();
    let mut events: Vec<Event> = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    loop {
        let after = events.last().map_or(0, |e| e.seq);
        let page = store.events_after(after, PAGE).await.unwrap();
        if page.is_empty() {
            break;
        }
        for event in &page {
            verifier.push(event).unwrap();
        }
        events.extend(page);
    }
    let elapsed = started.elapsed();
    println!(
        "{kind:8} verify from the store (pages of {PAGE})       {:>9} events in {:>6.2} s = {:>10.0} events/s   target ≥ 500,000/s: {}",
        verifier.checked(),
        elapsed.as_secs_f64(),
        rate(verifier.checked(), elapsed),
        verdict(rate(verifier.checked(), elapsed), 500_000.0)
    );

    let started = Instant::now();
    let mut verifier = ChainVerifier::default();
    store.verify_chain(&mut verifier).await.unwrap().unwrap();
    let elapsed = started.elapsed();
    assert_eq!(verifier.checked(), events.len() as u64);
    println!(
        "{kind:8} verify from the store (Store::verify_chain)    {:>9} events in {:>6.2} s = {:>10.0} events/s   target ≥ 500,000/s: {}",
        verifier.checked(),
        elapsed.as_secs_f64(),
        rate(verifier.checked(), elapsed),
        verdict(rate(verifier.checked(), elapsed), 500_000.0)
    );

    let started = Instant::now();
    let checked = audit::verify(&events).unwrap();
    let elapsed = started.elapsed();
    println!(
        "{kind:8} verify in memory (ChainVerifier alone)        {:>9} events in {:>6.2} s = {:>10.0} events/s   target ≥ 500,000/s: {}",
        checked,
        elapsed.as_secs_f64(),
        rate(checked, elapsed),
        verdict(rate(checked, elapsed), 500_000.0)
    );
}

struct Run {
    calls: u64,
    units: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
}

/// Runs `call` from [`WRITERS`] concurrent tasks for `phase`, timing each call.
async fn drive<F, Fut>(store: &Arc<dyn Store>, phase: Duration, units_per_call: u64, call: F) -> Run
where
    F: Fn(Arc<dyn Store>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let call = Arc::new(call);
    let started = Instant::now();
    let deadline = started + phase;
    let workers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let store = store.clone();
            let call = call.clone();
            tokio::spawn(async move {
                let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
                let mut calls = 0u64;
                while Instant::now() < deadline {
                    let begun = Instant::now();
                    call(store.clone()).await;
                    latency.saturating_record(
                        u64::try_from(begun.elapsed().as_micros()).unwrap_or(u64::MAX),
                    );
                    calls += 1;
                }
                (calls, latency)
            })
        })
        .collect();
    let mut run = Run {
        calls: 0,
        units: 0,
        elapsed: Duration::ZERO,
        latency: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
    };
    for worker in workers {
        let (calls, latency) = worker.await.unwrap();
        run.calls += calls;
        run.latency.add(latency).unwrap();
    }
    run.elapsed = started.elapsed();
    run.units = run.calls * units_per_call;
    run
}

fn report(kind: &str, what: &str, unit: &str, run: &Run, target: Option<f64>) {
    let per_second = rate(run.units, run.elapsed);
    let target = target.map_or(String::new(), |t| {
        format!("   target ≥ {t:.0}/s: {}", verdict(per_second, t))
    });
    println!(
        "{kind:8} {what:44} {:>9} {unit} in {:>6.2} s = {:>10.0} {unit}/s   call latency µs p50 {} p99 {} max {}{target}",
        run.units,
        run.elapsed.as_secs_f64(),
        per_second,
        run.latency.value_at_quantile(0.5),
        run.latency.value_at_quantile(0.99),
        run.latency.max(),
    );
}

fn rate(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(f64::EPSILON)
}

fn verdict(rate: f64, target: f64) -> &'static str {
    if rate >= target { "met" } else { "MISSED" }
}

fn event(kind: &str) -> EventBody {
    EventBody::new(1_700_000_000_000, kind, "operator:bench")
}

fn decision() -> EventBody {
    EventBody::new(1_700_000_000_000, kinds::CALL_DECISION, "spiffe://example.org/agent/bench-bot")
        .agent("bench-bot")
        .task("task_aaaaaaaaaaaaaaaaaaaaaaaaaa")
        .decision("allow")
        .detail(serde_json::json!({"tool": "github", "action": "issues.read", "resource": "repo/remit/issues/1", "policies": ["p1"]}))
}

fn agent() -> AgentRecord {
    let name = "bench-bot".parse().unwrap();
    AgentRecord {
        spiffe_id: SpiffeId::for_agent(&TrustDomain::from_str("example.org").unwrap(), &name),
        name,
        owner: Owner::from_str("alice@example.org").unwrap(),
        status: AgentStatus::Active,
        keys: Vec::new(),
        created_at: 1_700_000_000,
    }
}

fn task(n: u64) -> TaskRecord {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&n.to_be_bytes());
    TaskRecord {
        id: TaskId::from_random(bytes),
        agent: "bench-bot".parse().unwrap(),
        owner: Owner::from_str("alice@example.org").unwrap(),
        intent: "benchmark".to_string(),
        scopes: ScopeSet(vec![Scope::new("github", &["issues.read"], &[])]),
        obo: None,
        parent: None,
        depth: 0,
        status: TaskStatus::Active,
        created_at: 1_700_000_000,
        expires_at: 1_700_000_300,
        budget: 100,
        calls_used: 0,
        token_jti: format!("jti-{n}"),
        jkt: "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I".to_string(),
    }
}
