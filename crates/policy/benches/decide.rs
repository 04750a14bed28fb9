//! How decision time grows with the number of policies, sliced against unsliced, so that
//! the "policy evaluation stays flat" budget in DESIGN.md is held by a measurement.
//!
//! Run: `cargo bench -p policy --bench decide`. Each request is timed on its own and
//! recorded in a histogram; p50 and p99 are printed in µs per policy-set size.

use std::error::Error;
use std::hint::black_box;
use std::time::Instant;

use hdrhistogram::Histogram;
use model::{ActionClass, Decision};
use policy::{AgentFacts, CallRequest, PolicyEngine};

const SCHEMA: &str = include_str!("../../../policies/remit.cedarschema");
const SIZES: [usize; 4] = [10, 100, 1_000, 10_000];
/// 2023-11-14T22:13:20Z.
const NOW: i64 = 1_700_000_000;

fn main() -> Result<(), Box<dyn Error>> {
    println!(
        "{:>8} {:>7} {:>6} {:>9} | {:>12} {:>12} | {:>12} {:>12} | decisions (allow/deny/approval)",
        "policies",
        "agents",
        "tools",
        "load ms",
        "sliced p50",
        "sliced p99",
        "full p50",
        "full p99"
    );
    for size in SIZES {
        let world = World::new(size);
        let text = world.policies(&mut Rng(0x5EED ^ size as u64));
        let started = Instant::now();
        let engine = PolicyEngine::from_sources(SCHEMA, &[("bench.cedar", &text)])?;
        let load_ms = started.elapsed().as_secs_f64() * 1e3;
        assert_eq!(engine.policy_count(), size);

        let requests = world.requests(&mut Rng(0xCA11 ^ size as u64), 2_000);
        let mut decisions = [0usize; 3];
        let sliced = measure(&requests, 20_000, |request| {
            let report = engine.decide_call(request);
            decisions[match report.decision {
                Decision::Allow => 0,
                Decision::Deny => 1,
                Decision::ApprovalRequired => 2,
            }] += 1;
            black_box(report);
        })?;
        // Unsliced evaluation costs about a microsecond per policy: bound the total work.
        let full_iterations = (2_000_000 / size).clamp(200, 20_000);
        let full = measure(&requests, full_iterations, |request| {
            black_box(engine.decide_call_unsliced(request));
        })?;
        println!(
            "{size:>8} {:>7} {:>6} {load_ms:>9.1} | {:>9.1} µs {:>9.1} µs | {:>9.1} µs {:>9.1} µs | {}/{}/{}",
            world.agents,
            world.tools,
            micros(sliced.value_at_quantile(0.5)),
            micros(sliced.value_at_quantile(0.99)),
            micros(full.value_at_quantile(0.5)),
            micros(full.value_at_quantile(0.99)),
            decisions[0],
            decisions[1],
            decisions[2],
        );
    }
    Ok(())
}

/// Time `iterations` decisions (after a warm-up), cycling through `requests`.
fn measure(
    requests: &[Owned],
    iterations: usize,
    mut decide: impl FnMut(&CallRequest<'_>),
) -> Result<Histogram<u64>, Box<dyn Error>> {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    for owned in requests.iter().take(iterations.min(200)) {
        decide(&owned.request());
    }
    for i in 0..iterations {
        let owned = &requests[i % requests.len()];
        let request = owned.request();
        let started = Instant::now();
        decide(&request);
        histogram.record(started.elapsed().as_nanos().max(1) as u64)?;
    }
    Ok(histogram)
}

fn micros(nanos: u64) -> f64 {
    nanos as f64 / 1e3
}

/// A deployment of a given size: about one agent per ten policies and one tool per twenty,
/// so that policy sets grow the way deployments do: with agents and tools, while the
/// organisation-wide guardrails stay a handful.
struct World {
    size: usize,
    agents: usize,
    tools: usize,
}

impl World {
    fn new(size: usize) -> World {
        World {
            size,
            agents: (size / 10).max(3),
            tools: (size / 20).max(2),
        }
    }

    /// Six general policies (every request evaluates those of its action, sliced or not);
    /// the rest per agent or per tool, each with a condition on the context.
    fn policies(&self, rng: &mut Rng) -> String {
        let general = [
            r#"permit (principal, action == Action::"read", resource);"#,
            r#"forbid (principal, action in [Action::"call"], resource) when { context.bearer && context.sensitivity.contains("secret") };"#,
            r#"@step_up("approve admin actions") forbid (principal, action == Action::"admin", resource) unless { context.approved };"#,
            r#"forbid (principal, action in [Action::"call"], resource) when { context.depth > 3 };"#,
            r#"permit (principal, action == Action::"write", resource) when { context.hour >= 8 && context.hour < 20 };"#,
        ];
        let general_count = 6.min(self.size);
        let mut text = String::new();
        for n in 0..self.size {
            let policy = if n < general_count {
                general[n % general.len()].to_string()
            } else if rng.below(2) == 0 {
                let agent = rng.below(self.agents);
                let class = ["read", "write", "admin"][rng.below(3)];
                let effect = if rng.below(4) == 0 {
                    "forbid"
                } else {
                    "permit"
                };
                let condition = match rng.below(4) {
                    0 => format!("context.tool == \"t{}\"", rng.below(self.tools)),
                    1 => format!("context.hour < {}", 6 + rng.below(18)),
                    2 => format!(
                        "context.intent like \"*{}*\"",
                        ["triage", "deploy", "audit"][rng.below(3)]
                    ),
                    _ => "!context.bearer".to_string(),
                };
                format!(
                    "{effect} (principal == Agent::\"spiffe://example.org/agent/a{agent}\", action == Action::\"{class}\", resource) when {{ {condition} }};"
                )
            } else {
                let tool = rng.below(self.tools);
                let effect = if rng.below(3) == 0 {
                    "forbid"
                } else {
                    "permit"
                };
                let (action, condition) = match rng.below(4) {
                    0 => (
                        "action in [Action::\"write\", Action::\"admin\"]",
                        format!("principal.owner == \"o{}@example.org\"", rng.below(10)),
                    ),
                    1 => (
                        "action == Action::\"write\"",
                        format!("resource.path like \"repos/r{}/*\"", rng.below(20)),
                    ),
                    2 => ("action", format!("context.depth > {}", rng.below(3))),
                    _ => (
                        "action in [Action::\"call\"]",
                        format!(
                            "context.sensitivity.contains(\"{}\")",
                            ["pii", "secret"][rng.below(2)]
                        ),
                    ),
                };
                format!(
                    "{effect} (principal, {action}, resource in Tool::\"t{tool}\") when {{ {condition} }};"
                )
            };
            text.push_str(&format!("@id(\"b{n}\")\n{policy}\n"));
        }
        text
    }

    fn requests(&self, rng: &mut Rng, count: usize) -> Vec<Owned> {
        (0..count)
            .map(|_| {
                let agent = rng.below(self.agents);
                Owned {
                    name: format!("a{agent}"),
                    spiffe_id: format!("spiffe://example.org/agent/a{agent}"),
                    owner: format!("o{}@example.org", agent % 10),
                    tool: format!("t{}", rng.below(self.tools)),
                    resource: format!("repos/r{}/issues/{}", rng.below(20), rng.below(100)),
                    class: ActionClass::ALL[rng.below(3)],
                    sensitivity: match rng.below(4) {
                        0 => vec!["pii".to_string()],
                        1 => vec!["secret".to_string()],
                        _ => Vec::new(),
                    },
                    depth: rng.below(5) as i64,
                    approved: rng.below(5) == 0,
                    bearer: rng.below(3) == 0,
                    now: NOW + (rng.below(86_400) as i64),
                }
            })
            .collect()
    }
}

/// The owned data behind one call request.
struct Owned {
    name: String,
    spiffe_id: String,
    owner: String,
    tool: String,
    resource: String,
    class: ActionClass,
    sensitivity: Vec<String>,
    depth: i64,
    approved: bool,
    bearer: bool,
    now: i64,
}

impl Owned {
    fn request(&self) -> CallRequest<'_> {
        CallRequest {
            agent: AgentFacts {
                name: &self.name,
                spiffe_id: &self.spiffe_id,
                owner: &self.owner,
            },
            tool: &self.tool,
            action: "update_issue",
            resource: &self.resource,
            class: self.class,
            sensitivity: &self.sensitivity,
            arguments: "{}",
            task: "task-1",
            intent: "triage new issues",
            obo: None,
            depth: self.depth,
            approved: self.approved,
            bearer: self.bearer,
            now: self.now,
        }
    }
}

/// xorshift64*: deterministic workloads without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n as u64) as usize
    }
}
