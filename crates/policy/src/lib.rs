//! Policy-as-code for remit: the only crate that speaks Cedar. It loads and validates a
//! schema and policies, and answers "may this agent request this task?" and "may this
//! agent make this call?" with a decision, the policies that determined it and reasons.
//!
//! Decisions fail closed (an evaluation error denies), support step-up (`@step_up` forbids
//! turn a denial into `approval_required`) and stay flat as policies grow, because policies
//! are indexed by scope at load time and each decision evaluates only its slice. No IO
//! happens here except reading the policy directory and test files when asked to.

mod decide;
mod error;
mod load;
#[doc(hidden)]
pub mod synthetic;
mod testing;

use std::collections::HashMap;
use std::path::Path;

use cedar_policy_core::ast;
use model::{ActionClass, DecisionReport};

pub use error::PolicyError;
pub use testing::{Failure, TestReport, run_policy_tests};

/// Who is asking: the agent as remit registered it.
#[derive(Clone, Copy, Debug)]
pub struct AgentFacts<'a> {
    pub name: &'a str,
    pub spiffe_id: &'a str,
    pub owner: &'a str,
}

/// One requested scope of a task (`RequestTask` on `Tool::"<tool>"`).
#[derive(Clone, Copy, Debug)]
pub struct TaskRequest<'a> {
    pub agent: AgentFacts<'a>,
    pub tool: &'a str,
    pub actions: &'a [String],
    pub resources: &'a [String],
    pub intent: &'a str,
    pub ttl_seconds: i64,
    pub budget: i64,
    pub obo: Option<&'a str>,
    pub delegated: bool,
    /// Every requested scope is limited to `read` actions (a discovery task).
    pub read_only: bool,
    pub depth: i64,
    pub now: model::UnixSeconds,
}

/// One tool call: Cedar action = its class, resource = `Resource::"<tool>:<resource>"`.
#[derive(Clone, Copy, Debug)]
pub struct CallRequest<'a> {
    pub agent: AgentFacts<'a>,
    pub tool: &'a str,
    pub action: &'a str,
    pub resource: &'a str,
    pub class: ActionClass,
    pub sensitivity: &'a [String],
    /// The call's arguments as canonical JSON (`{}` when it has none), for policies that
    /// look inside them with `like`.
    pub arguments: &'a str,
    pub task: &'a str,
    pub intent: &'a str,
    pub obo: Option<&'a str>,
    pub depth: i64,
    /// The SPIFFE IDs of the agents that delegated this task, nearest first (empty for a
    /// task granted directly).
    pub delegators: &'a [String],
    pub approved: bool,
    pub bearer: bool,
    pub now: model::UnixSeconds,
}

/// A validated, indexed policy set. Immutable once built: reloading builds a new engine
/// and the caller swaps it in whole.
pub struct PolicyEngine {
    /// Per Cedar action: the slices of policies that can apply to it.
    index: HashMap<ast::EntityUID, load::ActionIndex>,
    /// Every policy, in load order (files by name, then position in the file).
    policies: Vec<load::Compiled>,
    /// Action entities from the schema, with their groups, added to each request (shared,
    /// not copied, into each request's entities).
    action_entities: HashMap<ast::EntityUID, std::sync::Arc<ast::Entity>>,
    /// Agent entities already built, by SPIFFE ID: see [`decide::AgentEntities`].
    agents: decide::AgentEntities,
    types: decide::Types,
    /// Static policies have no slots; the evaluator still wants a binding for them.
    empty_slots: ast::SlotEnv,
    /// The whole set as cedar-policy sees it, to check the evaluator against Cedar's own.
    #[cfg(test)]
    whole: cedar_policy::PolicySet,
}

// The gateway shares one engine across threads.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<PolicyEngine>();
};

impl std::fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEngine")
            .field("policies", &self.policy_count())
            .field("actions", &self.index.len())
            .finish_non_exhaustive()
    }
}

impl PolicyEngine {
    /// Load `dir`: exactly one `*.cedarschema` and every `*.cedar` file, in name order.
    /// Subdirectories (such as `tests/`) are not read.
    pub fn load_dir(dir: &Path) -> Result<PolicyEngine, PolicyError> {
        load::load_dir(dir)
    }

    /// Build from texts: `policies` are `(file name, text)` pairs; the file name gives
    /// default policy ids (`<stem>.<n>`) and error locations.
    pub fn from_sources(
        schema: &str,
        policies: &[(&str, &str)],
    ) -> Result<PolicyEngine, PolicyError> {
        load::build("schema.cedarschema", schema, policies)
    }

    pub fn policy_count(&self) -> usize {
        self.policies.len()
    }

    /// The ids of all policies, in load order.
    pub fn policy_ids(&self) -> Vec<String> {
        self.policies
            .iter()
            .map(|policy| policy.id.clone())
            .collect()
    }

    pub fn decide_task(&self, request: &TaskRequest<'_>) -> DecisionReport {
        self.decide(self.prepare_task(request), true)
    }

    pub fn decide_call(&self, request: &CallRequest<'_>) -> DecisionReport {
        self.decide(self.prepare_call(request), true)
    }

    /// [`PolicyEngine::decide_call`] against the whole policy set, unsliced: for the
    /// equivalence test and benchmarks.
    pub fn decide_call_unsliced(&self, request: &CallRequest<'_>) -> DecisionReport {
        self.decide(self.prepare_call(request), false)
    }

    /// [`PolicyEngine::decide_task`] against the whole policy set, unsliced.
    pub fn decide_task_unsliced(&self, request: &TaskRequest<'_>) -> DecisionReport {
        self.decide(self.prepare_task(request), false)
    }

    fn decide(&self, prepared: Result<decide::Prepared, String>, sliced: bool) -> DecisionReport {
        let prepared = match prepared {
            Ok(prepared) => prepared,
            // Fail closed: a request remit cannot even express is denied.
            Err(reason) => return DecisionReport::deny(reason),
        };
        let outcome = if sliced {
            let slices = self.slices_for(&prepared);
            self.outcome(&prepared, slices.into_iter().flatten().copied(), true)
        } else {
            self.outcome(&prepared, 0..self.policies.len() as u32, false)
        };
        self.report(&prepared, outcome)
    }
}

#[cfg(test)]
mod tests;
