//! Generates deterministic policy sets and call requests for benchmarks: a synthetic
//! deployment whose policies grow with its agents and tools, as real ones do. Not part of
//! the policy API; `policy`'s and `control`'s benchmarks share it so that both measure the
//! same workload.

use model::ActionClass;

use crate::{AgentFacts, CallRequest};

/// The trust domain of the synthetic agents' SPIFFE IDs (`spiffe://example.org/agent/a<n>`).
pub const TRUST_DOMAIN: &str = "example.org";

/// A deployment of a given size: about one agent per ten policies and one tool per twenty,
/// so that policy sets grow the way deployments do: with agents and tools, while the
/// organisation-wide guardrails stay a handful.
#[derive(Clone, Copy, Debug)]
pub struct World {
    /// Number of policies.
    pub size: usize,
    /// Agents `a0`, `a1`, …, owned by `o<n % 10>@example.org`.
    pub agents: usize,
    /// Tools `t0`, `t1`, ….
    pub tools: usize,
}

impl World {
    pub fn new(size: usize) -> World {
        World {
            size,
            agents: (size / 10).max(3),
            tools: (size / 20).max(2),
        }
    }

    /// The name of agent `n`.
    pub fn agent_name(n: usize) -> String {
        format!("a{n}")
    }

    /// The owner of agent `n`.
    pub fn agent_owner(n: usize) -> String {
        format!("o{}@example.org", n % 10)
    }

    /// The name of tool `n`.
    pub fn tool_name(n: usize) -> String {
        format!("t{n}")
    }

    /// `size` policies as one Cedar text, each with an `@id("b<n>")`: six general policies
    /// (every request evaluates those of its action, sliced or not); the rest per agent or
    /// per tool, each with a condition on the context.
    pub fn policies(&self, rng: &mut Rng) -> String {
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
                    "{effect} (principal == Agent::\"spiffe://{TRUST_DOMAIN}/agent/a{agent}\", action == Action::\"{class}\", resource) when {{ {condition} }};"
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

    /// `count` call requests by random agents on random tools and resources, at random
    /// times of one day from `now`.
    pub fn requests(&self, rng: &mut Rng, count: usize, now: i64) -> Vec<OwnedCall> {
        (0..count)
            .map(|_| {
                let agent = rng.below(self.agents);
                OwnedCall {
                    agent,
                    name: World::agent_name(agent),
                    spiffe_id: format!("spiffe://{TRUST_DOMAIN}/agent/a{agent}"),
                    owner: World::agent_owner(agent),
                    tool: World::tool_name(rng.below(self.tools)),
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
                    now: now + (rng.below(86_400) as i64),
                }
            })
            .collect()
    }
}

/// The owned data behind one call request.
#[derive(Clone, Debug)]
pub struct OwnedCall {
    /// The agent's number in its [`World`].
    pub agent: usize,
    pub name: String,
    pub spiffe_id: String,
    pub owner: String,
    pub tool: String,
    pub resource: String,
    pub class: ActionClass,
    pub sensitivity: Vec<String>,
    pub depth: i64,
    pub approved: bool,
    pub bearer: bool,
    pub now: i64,
}

impl OwnedCall {
    /// The tool's own action name every synthetic call uses.
    pub const ACTION: &'static str = "update_issue";
    /// The task intent every synthetic call carries.
    pub const INTENT: &'static str = "triage new issues";

    pub fn request(&self) -> CallRequest<'_> {
        CallRequest {
            agent: AgentFacts {
                name: &self.name,
                spiffe_id: &self.spiffe_id,
                owner: &self.owner,
            },
            tool: &self.tool,
            action: Self::ACTION,
            resource: &self.resource,
            class: self.class,
            sensitivity: &self.sensitivity,
            arguments: "{}",
            task: "task-1",
            intent: Self::INTENT,
            obo: None,
            depth: self.depth,
            delegators: &[],
            approved: self.approved,
            bearer: self.bearer,
            now: self.now,
        }
    }
}

/// xorshift64*: deterministic workloads without a dependency.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (zero, which xorshift cannot leave, is replaced).
    pub fn new(seed: u64) -> Rng {
        Rng(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0
            .wrapping_mul(0x2545_F491_4F6C_DD1D)
            .checked_rem(n as u64)
            .unwrap_or(0) as usize
    }
}
