//! Policy tests written by policy authors: TOML files of requests and the decisions they
//! expect, run against an engine so that a policy change that breaks an intended decision
//! is caught before it is deployed.

use std::path::{Path, PathBuf};

use model::{ActionClass, Decision, DecisionReport};
use serde::Deserialize;

use crate::{AgentFacts, CallRequest, PolicyEngine, PolicyError, TaskRequest};

/// The outcome of a run: how many cases passed, and each that did not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestReport {
    pub passed: usize,
    pub failures: Vec<Failure>,
}

/// A case whose decision was not the expected one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub file: String,
    pub case: String,
    /// The expected decision, followed by the expected policies when the case names them.
    pub expected: String,
    pub got: String,
    /// The reasons the engine gave for what it decided.
    pub reasons: Vec<String>,
}

/// Time used when a case names neither `time` nor `hour`: 2023-11-14T22:13:20Z.
const DEFAULT_TIME: i64 = 1_700_000_000;

/// Run every `*.toml` file in `dir` (in name order) against `engine`.
pub fn run_policy_tests(engine: &PolicyEngine, dir: &Path) -> Result<TestReport, PolicyError> {
    let mut files: Vec<PathBuf> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        if path.is_file() && path.extension().is_some_and(|ext| ext == "toml") {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(PolicyError::BadTest {
            file: dir.display().to_string(),
            case: None,
            reason: "no `*.toml` test files; hint: add `[[case]]` entries in a `.toml` file".into(),
        });
    }
    files.sort();
    let mut report = TestReport::default();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        run_file(engine, &path.display().to_string(), &text, &mut report)?;
    }
    Ok(report)
}

/// Run the cases of one test file's text; `file` names it in failures and errors.
pub(crate) fn run_file(
    engine: &PolicyEngine,
    file: &str,
    text: &str,
    report: &mut TestReport,
) -> Result<(), PolicyError> {
    let bad = |case: Option<&str>, reason: String| PolicyError::BadTest {
        file: file.to_string(),
        case: case.map(str::to_string),
        reason: one_line(&reason),
    };
    let parsed: TestFile = toml::from_str(text).map_err(|error| bad(None, error.to_string()))?;
    if parsed.case.is_empty() {
        return Err(bad(None, "no `[[case]]` entries".into()));
    }
    for (position, value) in parsed.case.into_iter().enumerate() {
        let name = value
            .get("name")
            .and_then(|name| name.as_str())
            .map_or_else(|| format!("#{}", position + 1), str::to_string);
        let raw: RawCase = value
            .try_into()
            .map_err(|error: toml::de::Error| bad(Some(&name), error.to_string()))?;
        let decided = raw
            .decide(engine)
            .map_err(|reason| bad(Some(&name), reason))?;
        let expected_decision =
            parse_decision(&raw.expect).map_err(|reason| bad(Some(&name), reason))?;
        let mut passed = decided.decision == expected_decision;
        if let Some(expected) = &raw.expect_policies {
            passed &= sorted(expected) == sorted(&decided.policies);
        }
        if passed {
            report.passed += 1;
        } else {
            report.failures.push(Failure {
                file: file.to_string(),
                case: name,
                expected: describe(expected_decision, raw.expect_policies.as_deref()),
                got: describe(
                    decided.decision,
                    raw.expect_policies
                        .as_ref()
                        .map(|_| decided.policies.as_slice()),
                ),
                reasons: decided.reasons,
            });
        }
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    #[serde(default)]
    case: Vec<toml::Value>,
}

/// One `[[case]]`: the fields of both kinds, checked against its `kind` after parsing.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    #[expect(
        dead_code,
        reason = "read from the raw table so that errors can name the case"
    )]
    name: String,
    kind: String,
    agent: String,
    owner: String,
    spiffe_id: Option<String>,
    tool: String,
    intent: Option<String>,
    obo: Option<String>,
    depth: Option<i64>,
    time: Option<i64>,
    hour: Option<i64>,
    // Calls.
    action: Option<String>,
    class: Option<String>,
    resource: Option<String>,
    sensitivity: Option<Vec<String>>,
    arguments: Option<String>,
    task: Option<String>,
    approved: Option<bool>,
    bearer: Option<bool>,
    // Tasks.
    actions: Option<Vec<String>>,
    resources: Option<Vec<String>>,
    ttl_seconds: Option<i64>,
    budget: Option<i64>,
    delegated: Option<bool>,
    read_only: Option<bool>,
    // Expectations.
    expect: String,
    expect_policies: Option<Vec<String>>,
}

impl RawCase {
    fn decide(&self, engine: &PolicyEngine) -> Result<DecisionReport, String> {
        let spiffe_id = match &self.spiffe_id {
            Some(id) => id.clone(),
            None => format!("spiffe://example.org/agent/{}", self.agent),
        };
        let agent = AgentFacts {
            name: &self.agent,
            spiffe_id: &spiffe_id,
            owner: &self.owner,
        };
        let now = match (self.time, self.hour) {
            (time, Some(hour)) if (0..24).contains(&hour) => {
                let time = time.unwrap_or(DEFAULT_TIME);
                time - time.rem_euclid(86_400) + hour * 3_600
            }
            (_, Some(hour)) => return Err(format!("`hour` must be 0 to 23, not `{hour}`")),
            (time, None) => time.unwrap_or(DEFAULT_TIME),
        };
        let intent = self.intent.as_deref().unwrap_or("policy test");
        let depth = self.depth.unwrap_or(0);
        let present = |fields: &[(&str, bool)]| -> Vec<String> {
            fields
                .iter()
                .filter(|(_, set)| *set)
                .map(|(name, _)| format!("`{name}`"))
                .collect()
        };
        match self.kind.as_str() {
            "call" => {
                let foreign = present(&[
                    ("actions", self.actions.is_some()),
                    ("resources", self.resources.is_some()),
                    ("ttl_seconds", self.ttl_seconds.is_some()),
                    ("budget", self.budget.is_some()),
                    ("delegated", self.delegated.is_some()),
                    ("read_only", self.read_only.is_some()),
                ]);
                if !foreign.is_empty() {
                    return Err(format!(
                        "{} only apply to `task` cases; hint: a call names one `action` and `resource`",
                        foreign.join(", ")
                    ));
                }
                let required = |value: &Option<String>, field: &str| {
                    value
                        .clone()
                        .ok_or_else(|| format!("a `call` case needs `{field}`"))
                };
                let action = required(&self.action, "action")?;
                let resource = required(&self.resource, "resource")?;
                let class: ActionClass = required(&self.class, "class")?
                    .parse()
                    .map_err(|error: model::IdError| error.to_string())?;
                let sensitivity = self.sensitivity.clone().unwrap_or_default();
                Ok(engine.decide_call(&CallRequest {
                    agent,
                    tool: &self.tool,
                    action: &action,
                    resource: &resource,
                    class,
                    sensitivity: &sensitivity,
                    arguments: self.arguments.as_deref().unwrap_or("{}"),
                    task: self.task.as_deref().unwrap_or("task-under-test"),
                    intent,
                    obo: self.obo.as_deref(),
                    depth,
                    delegators: &[],
                    approved: self.approved.unwrap_or(false),
                    bearer: self.bearer.unwrap_or(false),
                    now,
                }))
            }
            "task" => {
                let foreign = present(&[
                    ("action", self.action.is_some()),
                    ("class", self.class.is_some()),
                    ("resource", self.resource.is_some()),
                    ("sensitivity", self.sensitivity.is_some()),
                    ("arguments", self.arguments.is_some()),
                    ("task", self.task.is_some()),
                    ("approved", self.approved.is_some()),
                    ("bearer", self.bearer.is_some()),
                ]);
                if !foreign.is_empty() {
                    return Err(format!(
                        "{} only apply to `call` cases; hint: a task names `actions` and `resources`",
                        foreign.join(", ")
                    ));
                }
                let actions = self
                    .actions
                    .clone()
                    .ok_or_else(|| "a `task` case needs `actions`".to_string())?;
                let resources = self.resources.clone().unwrap_or_default();
                Ok(engine.decide_task(&TaskRequest {
                    agent,
                    tool: &self.tool,
                    actions: &actions,
                    resources: &resources,
                    intent,
                    ttl_seconds: self.ttl_seconds.unwrap_or(300),
                    budget: self.budget.unwrap_or(100),
                    obo: self.obo.as_deref(),
                    delegated: self.delegated.unwrap_or(false),
                    read_only: self.read_only.unwrap_or(false),
                    depth,
                    now,
                }))
            }
            other => Err(format!(
                "unknown kind `{other}`; hint: use `call` or `task`"
            )),
        }
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> PolicyError + '_ {
    move |source| PolicyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn parse_decision(text: &str) -> Result<Decision, String> {
    match text {
        "allow" => Ok(Decision::Allow),
        "deny" => Ok(Decision::Deny),
        "approval_required" => Ok(Decision::ApprovalRequired),
        other => Err(format!(
            "unknown expectation `{other}`; hint: use `allow`, `deny` or `approval_required`"
        )),
    }
}

fn describe(decision: Decision, policies: Option<&[String]>) -> String {
    match policies {
        None => decision.as_str().to_string(),
        Some(policies) => {
            let names: Vec<String> = sorted(policies)
                .iter()
                .map(|id| format!("`{id}`"))
                .collect();
            format!("{} by [{}]", decision.as_str(), names.join(", "))
        }
    }
}

fn sorted(ids: &[String]) -> Vec<String> {
    let mut ids = ids.to_vec();
    ids.sort();
    ids
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
