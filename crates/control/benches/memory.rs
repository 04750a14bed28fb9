//! Memory of a node that holds 100,000 active tasks, every one of them used once (so that
//! their state and verified tokens sit in the call path's caches), and 10,000 revocations in
//! its index: the resident set of this process at each stage, read from /proc.
//!
//! The benchmark keeps none of the workload itself: each task's token is signed right before
//! its one call and dropped after it, so the resident set is the node's (runtime, store
//! connections, caches, revocation index, replay cache) and not the benchmark's.
//!
//! `cargo bench -p control --bench memory`; with `REMIT_BENCH_KEEP=/path/remit.db` the SQLite
//! store is written there and kept (to start `remit serve` on it afterwards).

#![allow(clippy::expect_used, reason = "a benchmark stops at its first failure")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use audit::{EventBody, kinds};
use control::clock::{Clock, SystemClock};
use control::{Authority, CallAttempt, Operator, Settings};
use credentials::{AgentKeyPair, Confirmation, TaskClaims};
use model::{ActionClass, Scope, ScopeSet, TaskId, TaskStatus};
use store::{AgentRecord, RevocationKind, TaskRecord};

const TASKS: usize = 100_000;
const REVOCATIONS: usize = 10_000;
const CONCURRENCY: usize = 64;
const BASE: &str = "http://127.0.0.1:8470";

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn report(stage: &str, baseline: u64) -> u64 {
    let rss = rss_kib();
    let delta = if baseline == 0 {
        String::new()
    } else {
        format!(
            " ({:+.1} MiB from start-up)",
            (rss as f64 - baseline as f64) / 1024.0
        )
    };
    println!("RSS {:.1} MiB{delta} {stage}", rss as f64 / 1024.0);
    rss
}

/// Task `i` as the grant path records it, and the claims of its token.
fn task(
    i: usize,
    now: i64,
    agent: &AgentRecord,
    jkt: &str,
    scopes: &ScopeSet,
) -> (TaskRecord, TaskClaims) {
    let mut random = [0u8; 16];
    random[..8].copy_from_slice(&(i as u64).to_be_bytes());
    random[8..].copy_from_slice(&(now as u64).to_be_bytes());
    let id = TaskId::from_random(random);
    // 32 hex digits, as the grant path's `jti`s are.
    let jti = format!("{i:016x}{now:016x}");
    let record = TaskRecord {
        id: id.clone(),
        agent: agent.name.clone(),
        owner: agent.owner.clone(),
        intent: "memory benchmark".into(),
        scopes: scopes.clone(),
        obo: None,
        parent: None,
        depth: 0,
        status: TaskStatus::Active,
        created_at: now,
        expires_at: now + 3600,
        budget: 10,
        calls_used: 0,
        token_jti: jti.clone(),
        jkt: jkt.to_string(),
    };
    let claims = TaskClaims {
        iss: BASE.into(),
        sub: agent.spiffe_id.to_string(),
        aud: BASE.into(),
        iat: now,
        nbf: now,
        exp: now + 3600,
        jti,
        task: id.to_string(),
        scope: scopes.clone(),
        cnf: Confirmation {
            jkt: jkt.to_string(),
        },
        act: None,
        obo: None,
    };
    (record, claims)
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = match std::env::var_os("REMIT_BENCH_KEEP") {
        Some(path) => {
            let path = std::path::PathBuf::from(path);
            for suffix in ["", "-wal", "-shm"] {
                let mut file = path.clone().into_os_string();
                file.push(suffix);
                let _ = std::fs::remove_file(file);
            }
            path
        }
        None => dir.path().join("memory.db"),
    };
    let mut settings = Settings::local(format!("sqlite://{}", path.display()));
    settings.public_url = BASE.into();
    let clock = Arc::new(SystemClock);
    let authority = Authority::open(settings, clock.clone())
        .await
        .expect("authority");
    // The periodic catch-up `remit serve` runs: it persists call counts and sweeps caches.
    let _sync = authority.spawn_sync();
    let admin = Operator::local("bench");
    let key = AgentKeyPair::generate_ed25519().expect("key");
    let jkt = key.public().thumbprint().to_string();
    let agent = authority
        .register_agent(
            &admin,
            "memory-bot",
            "bench@example.org",
            &[key.public().to_jwk()],
        )
        .await
        .expect("agent");
    let baseline = report("after start-up", 0);

    // 100,000 tasks granted (written as the grant path writes them).
    let started = Instant::now();
    let now = clock.now();
    let scopes = ScopeSet(vec![Scope::new("github", &["read_issue"], &["acme/*"])]);
    let mut writes = Vec::new();
    for i in 0..TASKS {
        let (record, _) = task(i, now, &agent, &jkt, &scopes);
        let store = Arc::clone(authority.store());
        let event = EventBody::new(now * 1000, kinds::TASK_GRANTED, agent.spiffe_id.as_str())
            .task(record.id.as_str());
        writes.push(tokio::spawn(async move {
            store.insert_task(&record, event).await
        }));
        if writes.len() == 1_000 {
            for write in writes.drain(..) {
                write.await.expect("join").expect("insert");
            }
        }
    }
    for write in writes {
        write.await.expect("join").expect("insert");
    }
    println!(
        "{TASKS} tasks written in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    report("with the tasks in the store, none seen yet", baseline);

    // 10,000 revocations (of other tokens), applied to the index.
    let started = Instant::now();
    let mut handles = Vec::new();
    for i in 0..REVOCATIONS {
        let authority = Arc::clone(&authority);
        let admin = admin.clone();
        handles.push(tokio::spawn(async move {
            authority
                .revoke(
                    &admin,
                    RevocationKind::Token,
                    &format!("revoked-jti-{i}"),
                    "memory benchmark",
                )
                .await
        }));
        if handles.len() == 500 {
            for handle in handles.drain(..) {
                handle.await.expect("join").expect("revoke");
            }
        }
    }
    for handle in handles {
        handle.await.expect("join").expect("revoke");
    }
    println!(
        "{REVOCATIONS} revocations in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    report("with the revocations indexed", baseline);

    // Use every task once so that its state and verified token are cached. Each token is
    // signed just before its call and dropped after it: the node keeps what it caches.
    let started = Instant::now();
    let key = Arc::new(key);
    let agent = Arc::new(agent);
    let scopes = Arc::new(scopes);
    let mut handles = Vec::new();
    for worker in 0..CONCURRENCY {
        let authority = Arc::clone(&authority);
        let key = Arc::clone(&key);
        let agent = Arc::clone(&agent);
        let scopes = Arc::clone(&scopes);
        let jkt = jkt.clone();
        let clock = clock.clone();
        handles.push(tokio::spawn(async move {
            let url = format!("{BASE}/http/github/read_issue");
            let mut allowed = 0usize;
            for i in (worker..TASKS).step_by(CONCURRENCY) {
                let (_, claims) = task(i, now, &agent, &jkt, &scopes);
                let token = authority.keys().sign(&claims).expect("token");
                let token = token.expose();
                let proof = key
                    .sign_proof("POST", &url, Some(token), clock.now(), &format!("m-{i}"))
                    .expect("proof");
                let attempt = CallAttempt {
                    token,
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
                allowed += usize::from(authority.authorize(&attempt).await.is_allow());
            }
            allowed
        }));
    }
    let mut allowed = 0;
    for handle in handles {
        allowed += handle.await.expect("worker");
    }
    println!(
        "{allowed} of {TASKS} first calls allowed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(allowed, TASKS, "every task's first call should be allowed");
    // Let the periodic catch-up write the call counts, then write once more behind them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    authority
        .store()
        .append_events(vec![EventBody::new(
            clock.now_ms(),
            kinds::CALL_DECISION,
            "memory benchmark",
        )])
        .await
        .expect("append");
    tokio::time::sleep(Duration::from_millis(500)).await;

    println!(
        "tasks cached: {}, revocations indexed: {}",
        authority.cached_tasks(),
        authority.revocation_count()
    );
    let after = report(
        &format!(
            "with {TASKS} active tasks (all used once: state and verified token cached) and {REVOCATIONS} revocations"
        ),
        baseline,
    );
    println!(
        "RSS: {:.1} MiB with {TASKS} active tasks (all used) and {REVOCATIONS} revocations; {:.1} MiB above the start-up baseline",
        after as f64 / 1024.0,
        (after.saturating_sub(baseline)) as f64 / 1024.0
    );
    if let Some(path) = std::env::var_os("REMIT_BENCH_KEEP") {
        println!("store kept at {}", std::path::Path::new(&path).display());
    }
}
