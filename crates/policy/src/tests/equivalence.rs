//! Slicing must never change a decision: generated policy sets of every shape the index
//! distinguishes, and generated requests, decided sliced and unsliced, and checked against
//! Cedar's own authorizer on the whole set.

use super::*;

/// xorshift64*: deterministic, good enough to spread choices, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const AGENTS: usize = 12;
const OWNERS: usize = 4;
const TOOLS: usize = 6;
const PATHS: usize = 4;

fn owner_of(agent: usize) -> String {
    format!("o{}@example.org", agent % OWNERS)
}

fn spiffe(agent: usize) -> String {
    format!("spiffe://example.org/agent/a{agent}")
}

/// One policy of a random shape; `n` makes its `@id` unique.
fn policy(rng: &mut Rng, n: usize) -> String {
    let agent = rng.below(AGENTS);
    let principal = match rng.below(5) {
        0 | 1 => format!("principal == Agent::\"{}\"", spiffe(agent)),
        2 => format!("principal in Owner::\"{}\"", owner_of(agent)),
        3 => "principal is Agent".to_string(),
        _ => "principal".to_string(),
    };
    // Which actions, and whether the policy may speak of call-only attributes.
    let (action, call_only, task_only) = match rng.below(8) {
        0 => ("action".to_string(), false, false),
        1 => ("action in [Action::\"call\"]".to_string(), true, false),
        2 => (
            "action in [Action::\"write\", Action::\"admin\"]".to_string(),
            true,
            false,
        ),
        3 => ("action == Action::\"RequestTask\"".to_string(), false, true),
        _ => (
            format!(
                "action == Action::\"{}\"",
                rng.pick(&["read", "write", "admin"])
            ),
            true,
            false,
        ),
    };
    let tool = rng.below(TOOLS);
    let resource = if task_only {
        match rng.below(3) {
            0 => format!("resource == Tool::\"t{tool}\""),
            _ => "resource".to_string(),
        }
    } else {
        match rng.below(4) {
            0 => format!("resource in Tool::\"t{tool}\""),
            1 if call_only => format!("resource == Resource::\"t{tool}:p{}\"", rng.below(PATHS)),
            1 => "resource is Resource".to_string(),
            _ => "resource".to_string(),
        }
    };
    let mut conditions: Vec<String> = Vec::new();
    let common = [
        format!("context.depth > {}", rng.below(3)),
        format!("context.hour < {}", rng.below(24)),
        format!("principal.name == \"a{}\"", rng.below(AGENTS)),
        format!("context has obo && context.obo == \"u{}\"", rng.below(3)),
        // Overflows for the larger request times: an evaluation error.
        "context.time * 10000000000 > 0".to_string(),
    ];
    let calls = [
        "context.approved".to_string(),
        "!context.approved".to_string(),
        "context.sensitivity.contains(\"secret\")".to_string(),
        "context.bearer".to_string(),
        format!(
            "context.class == \"{}\"",
            rng.pick(&["read", "write", "admin"])
        ),
        format!("resource.path == \"p{}\"", rng.below(PATHS)),
    ];
    let tasks = [
        format!("context.ttl_seconds <= {}", 300 * (1 + rng.below(4))),
        format!("context.budget > {}", 50 * rng.below(4)),
        "context.wildcard_actions".to_string(),
        "context.delegated".to_string(),
    ];
    for _ in 0..rng.below(3) {
        let condition = if call_only && rng.chance(60) {
            rng.pick(&calls).clone()
        } else if task_only && rng.chance(60) {
            rng.pick(&tasks).clone()
        } else {
            let condition = rng.pick(&common).clone();
            if condition.contains("10000000000") && !rng.chance(15) {
                continue;
            }
            condition
        };
        conditions.push(condition);
    }
    let clause = |conditions: &[String]| conditions.join(" && ");
    let body = match conditions.len() {
        0 => String::new(),
        _ if rng.chance(20) => format!(" unless {{ {} }}", clause(&conditions)),
        _ => format!(" when {{ {} }}", clause(&conditions)),
    };
    let forbid = rng.chance(35);
    let annotations = match (forbid, rng.chance(50)) {
        (true, true) => format!("@id(\"p{n}\") @step_up(\"approve p{n}\")"),
        (true, false) => format!("@id(\"p{n}\") @reason(\"p{n} forbids\")"),
        (false, _) => format!("@id(\"p{n}\")"),
    };
    let effect = if forbid { "forbid" } else { "permit" };
    format!("{annotations}\n{effect} ({principal}, {action}, {resource}){body};\n")
}

#[test]
fn sliced_and_unsliced_decisions_agree() {
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let mut seen = std::collections::HashMap::new();
    let mut errors = 0;
    for round in 0..4 {
        let count = [40, 120, 300, 600][round];
        let text: String = (0..count).map(|n| policy(&mut rng, n)).collect();
        let engine = PolicyEngine::from_sources(SCHEMA, &[("generated.cedar", &text)])
            .unwrap_or_else(|error| panic!("generated policies do not load: {error}"));
        let sensitivities = [
            strings(&[]),
            strings(&["secret"]),
            strings(&["pii", "secret"]),
        ];
        let action_sets = [
            strings(&["get"]),
            strings(&["*"]),
            strings(&["get", "put_*"]),
        ];
        for _ in 0..1_000 {
            let agent = rng.below(AGENTS + 1); // one agent no policy names
            let name = format!("a{agent}");
            let spiffe_id = spiffe(agent);
            let owner = owner_of(agent);
            let facts = AgentFacts {
                name: &name,
                spiffe_id: &spiffe_id,
                owner: &owner,
            };
            let tool = format!("t{}", rng.below(TOOLS + 1));
            let obo = [None, Some("u0"), Some("u1")][rng.below(3)];
            let depth = rng.below(4) as i64;
            // Small times never overflow the generated `* 10000000000`; large ones do.
            let now = if rng.chance(85) {
                rng.below(900_000_000) as i64
            } else {
                NOW
            };
            let (sliced, unsliced) = if rng.chance(25) {
                let request = TaskRequest {
                    agent: facts,
                    tool: &tool,
                    actions: action_sets[rng.below(action_sets.len())],
                    resources: &[],
                    intent: "generated",
                    ttl_seconds: 300 * (1 + rng.below(5)) as i64,
                    budget: 50 * rng.below(5) as i64,
                    obo,
                    delegated: rng.chance(30),
                    read_only: rng.chance(30),
                    depth,
                    now,
                };
                agrees_with_cedar(&engine, &engine.prepare_task(&request).unwrap());
                (
                    engine.decide_task(&request),
                    engine.decide_task_unsliced(&request),
                )
            } else {
                let path = format!("p{}", rng.below(PATHS + 1));
                let request = CallRequest {
                    agent: facts,
                    tool: &tool,
                    action: "generated",
                    resource: &path,
                    class: *rng.pick(ActionClass::ALL),
                    sensitivity: sensitivities[rng.below(sensitivities.len())],
                    arguments: "{}",
                    task: "task-1",
                    intent: "generated",
                    obo,
                    depth,
                    delegators: &[],
                    approved: rng.chance(30),
                    bearer: rng.chance(30),
                    now,
                };
                agrees_with_cedar(&engine, &engine.prepare_call(&request).unwrap());
                (
                    engine.decide_call(&request),
                    engine.decide_call_unsliced(&request),
                )
            };
            assert_eq!(sliced, unsliced, "round {round}");
            *seen.entry(sliced.decision).or_insert(0) += 1;
            if sliced
                .reasons
                .iter()
                .any(|reason| reason.contains("failed to evaluate"))
            {
                errors += 1;
            }
        }
    }
    // The comparison only means something if every kind of outcome occurred often.
    for decision in [Decision::Allow, Decision::Deny, Decision::ApprovalRequired] {
        assert!(seen.get(&decision).copied().unwrap_or(0) > 100, "{seen:?}");
    }
    assert!(errors > 50, "only {errors} evaluation errors");
}
