//! The call path's decision, steps 1 to 7 together (token, proof, revocation, task state and
//! budget, scope, Cedar), through the real code: an `Authority` on a SQLite file, real agents
//! with real keys, real tasks granted through `Authority::request_task`, and the synthetic
//! policy sets of `policy::synthetic` at 10 to 10,000 policies swapped in afterwards.
//!
//! Each `decide_unrecorded` call is timed on its own, warm (every task has been seen once, so
//! its state and verified token are cached), with a fresh pre-signed proof per call. Three
//! modes: an ES256 proof per call (the default and the realistic worst case), an EdDSA proof
//! per call, and bearer mode (no proof: the token cache path without any signature check).
//! Then `authorize` (with the durable audit append) at 100 policies, 64 concurrent callers.
//!
//! `cargo bench -p control --bench decision`

#![allow(clippy::expect_used, reason = "a benchmark stops at its first failure")]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use control::clock::{Clock, SystemClock};
use control::{Authority, CallAttempt, Operator, Settings, TaskRequest};
use credentials::{AgentKeyPair, ProofCheck, ProofVerifier};
use hdrhistogram::Histogram;
use model::{Decision, Scope, ScopeSet};
use policy::PolicyEngine;
use policy::synthetic::{OwnedCall, Rng, World};

const SCHEMA: &str = include_str!("../../../policies/remit.cedarschema");
const SIZES: [usize; 4] = [10, 100, 1_000, 10_000];
const BASE: &str = "http://127.0.0.1:8470";
/// Timed calls per mode and size.
const ITERATIONS: usize = 20_000;
/// Distinct calls cycled through per mode.
const POOL: usize = 2_000;
/// Share of the pool that policy allows (the rest: denials and approvals required).
const ALLOWED_SHARE: f64 = 0.9;
/// Calls one task takes at most here: below the maximum budget of 10,000, with room to warm.
const CALLS_PER_TASK: usize = 9_000;
const CALLERS: usize = 64;
const CALLS_PER_CALLER: usize = 300;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Mode {
    Es256,
    EdDsa,
    Bearer,
    /// ES256 proofs through `authorize`, 64 callers at once.
    Authorize,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Es256 => "ES256 proof",
            Mode::EdDsa => "EdDSA proof",
            Mode::Bearer => "bearer",
            Mode::Authorize => "authorize",
        }
    }

    fn bearer(self) -> bool {
        self == Mode::Bearer
    }

    fn ed25519(self) -> bool {
        self == Mode::EdDsa
    }
}

struct Agent {
    p256: AgentKeyPair,
    ed25519: AgentKeyPair,
}

impl Agent {
    fn key(&self, mode: Mode) -> &AgentKeyPair {
        if mode.ed25519() {
            &self.ed25519
        } else {
            &self.p256
        }
    }
}

/// One planned call: which pool entry, on which task.
struct Planned {
    call: usize,
    task: usize,
}

struct Task {
    agent: usize,
    tool: String,
    token: String,
}

/// Calls of one mode, the tasks they use and the order they run in.
struct Plan {
    mode: Mode,
    pool: Vec<OwnedCall>,
    calls: Vec<Planned>,
    tasks: Vec<Task>,
}

#[derive(Default)]
struct Mix {
    counts: HashMap<&'static str, usize>,
}

impl Mix {
    fn add(&mut self, code: &'static str) {
        *self.counts.entry(code).or_default() += 1;
    }

    fn summary(&self) -> String {
        let allowed = self.counts.get("allowed").copied().unwrap_or(0);
        let denied = self.counts.get("policy_denied").copied().unwrap_or(0);
        let approval = self.counts.get("approval_required").copied().unwrap_or(0);
        format!("{allowed}/{denied}/{approval}")
    }

    /// Anything but a policy's own answer means the benchmark set itself up wrong.
    fn check(&self, what: &str) {
        for (code, count) in &self.counts {
            assert!(
                matches!(*code, "allowed" | "policy_denied" | "approval_required"),
                "{what}: {count} calls failed with `{code}`"
            );
        }
    }
}

#[tokio::main]
async fn main() {
    let clock = Arc::new(SystemClock);
    println!(
        "{ITERATIONS} timed decide_unrecorded calls per mode and size, one caller, warm; a fresh \
         pre-signed proof per call; pool of {POOL} distinct calls, ~{:.0}% allowed by policy",
        ALLOWED_SHARE * 100.0
    );
    let floor = proof_floor(clock.now());
    println!(
        "proof verify alone (credentials' ProofVerifier, same process): ES256 p50 {:.1} µs, EdDSA p50 {:.1} µs",
        micros(floor.0.value_at_quantile(0.5)),
        micros(floor.1.value_at_quantile(0.5)),
    );
    println!(
        "{:>8} {:<12} | {:>9} {:>9} {:>9} {:>17} | {:>10} {:>12} | decisions (allow/deny/approval)",
        "policies", "mode", "p50 µs", "p99 µs", "mean µs", "p99 no step-up µs", "tasks", "load ms"
    );
    let mut bearer_p50 = HashMap::new();
    let mut es256_p50 = HashMap::new();
    let mut eddsa_p50 = HashMap::new();
    for size in SIZES {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut settings = Settings::local(format!(
            "sqlite://{}",
            dir.path().join("decision.db").display()
        ));
        settings.public_url = BASE.into();
        settings.trust_domain = policy::synthetic::TRUST_DOMAIN
            .parse()
            .expect("trust domain");
        // The denials of the mix would quarantine the agents (ten within a minute by
        // default): this measures decisions, not containment.
        settings.containment.max_denials = 0;
        let authority = Authority::open(settings, clock.clone())
            .await
            .expect("authority");

        let world = World::new(size);
        let text = world.policies(&mut Rng::new(0x5EED ^ size as u64));
        let started = Instant::now();
        let engine =
            PolicyEngine::from_sources(SCHEMA, &[("bench.cedar", &text)]).expect("policies");
        let load_ms = started.elapsed().as_secs_f64() * 1e3;
        assert_eq!(engine.policy_count(), size);

        let mut modes = vec![Mode::Es256, Mode::EdDsa, Mode::Bearer];
        if size == 100 {
            modes.push(Mode::Authorize);
        }
        let raw = world.requests(&mut Rng::new(0xCA11 ^ size as u64), 10 * POOL, clock.now());
        let mut plans: Vec<Plan> = modes
            .iter()
            .map(|&mode| plan(&engine, &raw, mode, clock.now()))
            .collect();

        // Agents and tasks, granted under the built-in policies (their `RequestTask` rules)
        // before the synthetic set, which has none, is swapped in.
        let agents = register(&authority, &plans).await;
        for plan in &mut plans {
            grant(&authority, &agents, plan).await;
        }
        authority.swap_policy(engine);
        let plans: Vec<Arc<Plan>> = plans.into_iter().map(Arc::new).collect();

        for plan in &plans {
            if plan.mode == Mode::Authorize {
                continue;
            }
            warm(&authority, &agents, plan).await;
            let (histogram, decided, mix) = time(&authority, &agents, plan).await;
            mix.check(plan.mode.label());
            let p50 = micros(histogram.value_at_quantile(0.5));
            match plan.mode {
                Mode::Es256 => es256_p50.insert(size, p50),
                Mode::EdDsa => eddsa_p50.insert(size, p50),
                _ => bearer_p50.insert(size, p50),
            };
            println!(
                "{size:>8} {:<12} | {:>9.1} {:>9.1} {:>9.1} {:>17.1} | {:>10} {:>12.1} | {}",
                plan.mode.label(),
                p50,
                micros(histogram.value_at_quantile(0.99)),
                histogram.mean() / 1e3,
                micros(decided.value_at_quantile(0.99)),
                plan.tasks.len(),
                load_ms,
                mix.summary(),
            );
        }
        if let Some(plan) = plans.iter().find(|p| p.mode == Mode::Authorize) {
            warm(&authority, &agents, plan).await;
            concurrent(&authority, &agents, Arc::clone(plan), size).await;
        }
    }

    println!();
    println!("share of the decision's p50 that is the proof (mode p50 minus bearer p50):");
    for size in SIZES {
        let bearer = bearer_p50.get(&size).copied().unwrap_or(0.0);
        let es256 = es256_p50.get(&size).copied().unwrap_or(0.0);
        let eddsa = eddsa_p50.get(&size).copied().unwrap_or(0.0);
        println!(
            "{size:>8} policies: ES256 {:.1} of {es256:.1} µs ({:.0}%), EdDSA {:.1} of {eddsa:.1} µs ({:.0}%); the rest (token cache, revocation, task, scope, Cedar) {bearer:.1} µs",
            es256 - bearer,
            100.0 * (es256 - bearer) / es256,
            eddsa - bearer,
            100.0 * (eddsa - bearer) / eddsa,
        );
    }
}

/// The pool of one mode: calls as control will put them to policy (task depth 0, never
/// approved, bearer only in bearer mode), `ALLOWED_SHARE` of them allowed.
fn plan(engine: &PolicyEngine, raw: &[OwnedCall], mode: Mode, now: i64) -> Plan {
    let mut allowed = Vec::new();
    let mut refused = Vec::new();
    for call in raw {
        let mut call = call.clone();
        call.depth = 0;
        call.approved = false;
        call.bearer = mode.bearer();
        call.now = now;
        if engine.decide_call(&call.request()).decision == Decision::Allow {
            allowed.push(call);
        } else {
            refused.push(call);
        }
    }
    let want_allowed = ((POOL as f64) * ALLOWED_SHARE) as usize;
    let take_allowed = want_allowed.min(allowed.len());
    let take_refused = ((take_allowed as f64) * (1.0 - ALLOWED_SHARE) / ALLOWED_SHARE) as usize;
    let mut pool: Vec<OwnedCall> = allowed.into_iter().take(take_allowed).collect();
    pool.extend(refused.into_iter().take(take_refused));
    // Interleave allowed and refused calls deterministically.
    let mut rng = Rng::new(0xD1CE);
    for i in (1..pool.len()).rev() {
        pool.swap(i, rng.below(i + 1));
    }

    let count = if mode == Mode::Authorize {
        CALLERS * CALLS_PER_CALLER
    } else {
        ITERATIONS
    };
    // One task per agent and tool (one scope each), a new one every CALLS_PER_TASK calls.
    let mut tasks = Vec::new();
    let mut index: HashMap<(usize, String, usize), usize> = HashMap::new();
    let mut uses: HashMap<(usize, String), usize> = HashMap::new();
    let calls = (0..count)
        .map(|i| {
            let call = i % pool.len();
            let owned = &pool[call];
            let used = uses.entry((owned.agent, owned.tool.clone())).or_default();
            let slot = *used / CALLS_PER_TASK;
            *used += 1;
            let task = *index
                .entry((owned.agent, owned.tool.clone(), slot))
                .or_insert_with(|| {
                    tasks.push(Task {
                        agent: owned.agent,
                        tool: owned.tool.clone(),
                        token: String::new(),
                    });
                    tasks.len() - 1
                });
            Planned { call, task }
        })
        .collect();
    Plan {
        mode,
        pool,
        calls,
        tasks,
    }
}

/// Registers every agent the plans use, each with a P-256 and an Ed25519 key.
async fn register(authority: &Arc<Authority>, plans: &[Plan]) -> HashMap<usize, Arc<Agent>> {
    let mut numbers: Vec<usize> = plans
        .iter()
        .flat_map(|plan| plan.tasks.iter().map(|task| task.agent))
        .collect();
    numbers.sort_unstable();
    numbers.dedup();
    let admin = Operator::local("bench");
    let mut agents = HashMap::new();
    for chunk in numbers.chunks(64) {
        let mut handles = Vec::new();
        for &n in chunk {
            let agent = Arc::new(Agent {
                p256: AgentKeyPair::generate_p256().expect("key"),
                ed25519: AgentKeyPair::generate_ed25519().expect("key"),
            });
            agents.insert(n, Arc::clone(&agent));
            let authority = Arc::clone(authority);
            let admin = admin.clone();
            handles.push(tokio::spawn(async move {
                authority
                    .register_agent(
                        &admin,
                        &World::agent_name(n),
                        &World::agent_owner(n),
                        &[
                            agent.p256.public().to_jwk(),
                            agent.ed25519.public().to_jwk(),
                        ],
                    )
                    .await
            }));
        }
        for handle in handles {
            handle.await.expect("join").expect("register agent");
        }
    }
    agents
}

/// Grants the plan's tasks through the grant path, proven with the mode's key.
async fn grant(authority: &Arc<Authority>, agents: &HashMap<usize, Arc<Agent>>, plan: &mut Plan) {
    let url = format!("{BASE}/v1/tasks");
    let mode = plan.mode;
    for (chunk_index, chunk) in plan.tasks.chunks_mut(64).enumerate() {
        let mut handles = Vec::new();
        for (i, task) in chunk.iter().enumerate() {
            let agent = Arc::clone(&agents[&task.agent]);
            let proof = agent
                .key(mode)
                .sign_proof(
                    "POST",
                    &url,
                    None,
                    authority.now(),
                    &format!("grant-{mode:?}-{chunk_index}-{i}"),
                )
                .expect("proof");
            let request = TaskRequest {
                agent: World::agent_name(task.agent).parse().expect("agent name"),
                intent: OwnedCall::INTENT.to_string(),
                scopes: ScopeSet(vec![Scope::new(
                    &task.tool,
                    &[OwnedCall::ACTION],
                    &["repos/*"],
                )]),
                ttl_seconds: Some(3600),
                budget: Some(10_000),
                on_behalf_of: None,
                read_only: false,
            };
            let authority = Arc::clone(authority);
            handles.push(tokio::spawn(async move {
                authority.request_task(Some(&proof), request).await
            }));
        }
        for (task, handle) in chunk.iter_mut().zip(handles) {
            let grant = handle.await.expect("join").expect("grant");
            task.token = grant.token.expose().clone();
        }
    }
}

fn url_of(tool: &str) -> String {
    format!("{BASE}/mcp/{tool}")
}

/// A fresh proof for each planned call in `range` (none in bearer mode).
fn proofs(
    authority: &Authority,
    agents: &HashMap<usize, Arc<Agent>>,
    plan: &Plan,
    range: std::ops::Range<usize>,
    label: &str,
) -> Vec<Option<String>> {
    let now = authority.now();
    range
        .map(|i| {
            if plan.mode.bearer() {
                return None;
            }
            let task = &plan.tasks[plan.calls[i].task];
            let proof = agents[&task.agent]
                .key(plan.mode)
                .sign_proof(
                    "POST",
                    &url_of(&task.tool),
                    Some(&task.token),
                    now,
                    &format!("{label}-{i}"),
                )
                .expect("proof");
            Some(proof)
        })
        .collect()
}

fn attempt<'a>(
    plan: &'a Plan,
    planned: &Planned,
    proof: Option<&'a str>,
    url: &'a str,
) -> CallAttempt<'a> {
    let call = &plan.pool[planned.call];
    let task = &plan.tasks[planned.task];
    CallAttempt {
        token: &task.token,
        proof,
        bearer_allowed: plan.mode.bearer(),
        method: "POST",
        url,
        tool: &call.tool,
        action: OwnedCall::ACTION,
        resource: &call.resource,
        class: call.class,
        sensitivity: &call.sensitivity,
        arguments: "{}",
        limiter: None,
    }
}

/// One untimed call on every task: loads its state from the store and caches its token.
async fn warm(authority: &Authority, agents: &HashMap<usize, Arc<Agent>>, plan: &Plan) {
    let mut first: HashMap<usize, usize> = HashMap::new();
    for (i, planned) in plan.calls.iter().enumerate() {
        first.entry(planned.task).or_insert(i);
    }
    let mut firsts: Vec<usize> = first.into_values().collect();
    firsts.sort_unstable();
    let label = format!("warm-{:?}", plan.mode);
    let mut mix = Mix::default();
    for &i in &firsts {
        let proof = proofs(authority, agents, plan, i..i + 1, &label)
            .pop()
            .flatten();
        let planned = &plan.calls[i];
        let url = url_of(&plan.tasks[planned.task].tool);
        let verdict = authority
            .decide_unrecorded(&attempt(plan, planned, proof.as_deref(), &url))
            .await;
        mix.add(verdict.code);
    }
    mix.check(&format!("warm-up of {}", plan.mode.label()));
    assert!(
        authority.cached_tasks() >= plan.tasks.len(),
        "every task is cached"
    );
}

/// Times every planned call of the plan, one at a time. The second histogram leaves out the
/// calls that policy sends to step-up: those also ask the store for an approval to spend, so
/// they are a store round trip, not a decision alone.
async fn time(
    authority: &Authority,
    agents: &HashMap<usize, Arc<Agent>>,
    plan: &Plan,
) -> (Histogram<u64>, Histogram<u64>, Mix) {
    let label = format!("timed-{:?}", plan.mode);
    let proofs = proofs(authority, agents, plan, 0..plan.calls.len(), &label);
    let urls: Vec<String> = plan.tasks.iter().map(|task| url_of(&task.tool)).collect();
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram");
    let mut decided = histogram.clone();
    let mut mix = Mix::default();
    for (planned, proof) in plan.calls.iter().zip(&proofs) {
        let attempt = attempt(plan, planned, proof.as_deref(), &urls[planned.task]);
        let started = Instant::now();
        let verdict = authority.decide_unrecorded(&attempt).await;
        let elapsed = started.elapsed();
        histogram
            .record(elapsed.as_nanos().max(1) as u64)
            .expect("record");
        if verdict.code != "approval_required" {
            decided
                .record(elapsed.as_nanos().max(1) as u64)
                .expect("record");
        }
        mix.add(verdict.code);
    }
    (histogram, decided, mix)
}

/// `authorize` (decision and durable audit append) from 64 concurrent callers.
async fn concurrent(
    authority: &Arc<Authority>,
    agents: &HashMap<usize, Arc<Agent>>,
    plan: Arc<Plan>,
    size: usize,
) {
    let all = proofs(authority, agents, &plan, 0..plan.calls.len(), "authorize");
    let urls: Arc<Vec<String>> =
        Arc::new(plan.tasks.iter().map(|task| url_of(&task.tool)).collect());
    let all = Arc::new(all);
    let started = Instant::now();
    let mut handles = Vec::new();
    for caller in 0..CALLERS {
        let authority = Arc::clone(authority);
        let plan = Arc::clone(&plan);
        let all = Arc::clone(&all);
        let urls = Arc::clone(&urls);
        handles.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(CALLS_PER_CALLER);
            let mut codes = Vec::with_capacity(CALLS_PER_CALLER);
            for i in (caller..plan.calls.len()).step_by(CALLERS) {
                let planned = &plan.calls[i];
                let attempt = attempt(&plan, planned, all[i].as_deref(), &urls[planned.task]);
                let t = Instant::now();
                let verdict = authority.authorize(&attempt).await;
                latencies.push(t.elapsed());
                assert!(verdict.audit_seq.is_some(), "every decision is recorded");
                codes.push(verdict.code);
            }
            (latencies, codes)
        }));
    }
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram");
    let mut mix = Mix::default();
    for handle in handles {
        let (latencies, codes) = handle.await.expect("caller");
        for latency in latencies {
            histogram
                .record(latency.as_nanos().max(1) as u64)
                .expect("record");
        }
        for code in codes {
            mix.add(code);
        }
    }
    let elapsed = started.elapsed();
    mix.check("authorize");
    let calls = plan.calls.len();
    println!(
        "{size:>8} {:<12} | authorize with durable audit append, {CALLERS} concurrent callers, ES256 proofs: \
         {calls} calls in {:.2} s = {:.0} calls/s; latency p50 {:.0} µs, p99 {:.0} µs, mean {:.0} µs | {}",
        "authorize",
        elapsed.as_secs_f64(),
        calls as f64 / elapsed.as_secs_f64(),
        micros(histogram.value_at_quantile(0.5)),
        micros(histogram.value_at_quantile(0.99)),
        histogram.mean() / 1e3,
        mix.summary(),
    );
}

/// Fresh-proof verification alone with credentials' verifier, as a floor for the modes.
fn proof_floor(now: i64) -> (Histogram<u64>, Histogram<u64>) {
    let token = "a.task.token";
    let url = url_of("t0");
    let measure = |key: &AgentKeyPair| {
        let jkt = key.public().thumbprint().to_string();
        let proofs: Vec<String> = (0..ITERATIONS)
            .map(|i| {
                key.sign_proof("POST", &url, Some(token), now, &format!("floor-{i}"))
                    .expect("proof")
            })
            .collect();
        let verifier = ProofVerifier::new(60, 5, 2 * ITERATIONS);
        let check = ProofCheck {
            method: "POST",
            url: &url,
            access_token: Some(token),
            expected_jkt: Some(&jkt),
            now,
        };
        let mut histogram =
            Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram");
        for proof in &proofs {
            let started = Instant::now();
            let ok = verifier.verify(proof, &check).is_ok();
            histogram
                .record(started.elapsed().as_nanos().max(1) as u64)
                .expect("record");
            assert!(ok, "the floor's proofs verify");
        }
        histogram
    };
    (
        measure(&AgentKeyPair::generate_p256().expect("key")),
        measure(&AgentKeyPair::generate_ed25519().expect("key")),
    )
}

fn micros(nanos: u64) -> f64 {
    nanos as f64 / 1e3
}
