//! Unit tests of the policy crate: policy text + request → decision, load errors, the
//! shipped policies and their tests, and sliced against unsliced evaluation.

use std::path::{Path, PathBuf};

use model::{ActionClass, Decision, DecisionReport};

use super::*;

const SCHEMA: &str = include_str!("../../../policies/remit.cedarschema");

/// 2023-11-14T22:13:20Z.
const NOW: i64 = 1_700_000_000;

const TRIAGE: AgentFacts<'static> = AgentFacts {
    name: "triage-bot",
    spiffe_id: "spiffe://example.org/agent/triage-bot",
    owner: "alice@example.org",
};

fn engine(policies: &str) -> PolicyEngine {
    PolicyEngine::from_sources(SCHEMA, &[("test.cedar", policies)])
        .unwrap_or_else(|error| panic!("policies do not load: {error}"))
}

fn load_error(policies: &str) -> String {
    match PolicyEngine::from_sources(SCHEMA, &[("tools.cedar", policies)]) {
        Ok(_) => panic!("policies loaded but should not:\n{policies}"),
        Err(error) => error.to_string(),
    }
}

enum Ask {
    Call(CallRequest<'static>),
    Task(TaskRequest<'static>),
}

fn call(class: ActionClass, tool: &'static str, resource: &'static str) -> CallRequest<'static> {
    CallRequest {
        agent: TRIAGE,
        tool,
        action: "do_something",
        resource,
        class,
        sensitivity: &[],
        arguments: "{}",
        delegators: &[],
        task: "task-1",
        intent: "triage new issues",
        obo: None,
        depth: 0,
        approved: false,
        bearer: false,
        now: NOW,
    }
}

fn task(tool: &'static str, actions: &'static [String]) -> TaskRequest<'static> {
    TaskRequest {
        agent: TRIAGE,
        tool,
        actions,
        resources: &[],
        intent: "triage new issues",
        ttl_seconds: 300,
        budget: 100,
        obo: None,
        delegated: false,
        read_only: false,
        depth: 0,
        now: NOW,
    }
}

fn strings(values: &[&str]) -> &'static [String] {
    Box::leak(
        values
            .iter()
            .map(|value| value.to_string())
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    )
}

/// Decide `ask` under `policies`, sliced and unsliced (which must agree), and check the
/// decision and its determining policies.
#[track_caller]
fn check(policies: &str, ask: Ask, decision: Decision, determining: &[&str]) -> DecisionReport {
    let engine = engine(policies);
    let (sliced, unsliced) = match &ask {
        Ask::Call(request) => (
            engine.decide_call(request),
            engine.decide_call_unsliced(request),
        ),
        Ask::Task(request) => (
            engine.decide_task(request),
            engine.decide_task_unsliced(request),
        ),
    };
    assert_eq!(sliced, unsliced, "sliced and unsliced decisions differ");
    let prepared = match &ask {
        Ask::Call(request) => engine.prepare_call(request),
        Ask::Task(request) => engine.prepare_task(request),
    };
    agrees_with_cedar(&engine, &prepared.unwrap());
    assert_eq!(
        (sliced.decision, sliced.policies.as_slice()),
        (
            decision,
            determining
                .iter()
                .map(|id| id.to_string())
                .collect::<Vec<_>>()
                .as_slice()
        ),
        "reasons: {:?}",
        sliced.reasons
    );
    sliced
}

/// remit evaluates policies itself (to see errors, and for speed); Cedar's own authorizer
/// must find the same satisfied and erroring policies on the whole set.
#[track_caller]
fn agrees_with_cedar(engine: &PolicyEngine, prepared: &decide::Prepared) {
    use std::collections::BTreeSet;
    let outcome = engine.outcome(prepared, 0..engine.policy_count() as u32, false);
    let response = cedar_policy::Authorizer::new().is_authorized(
        &cedar_policy::Request::from(prepared.request.clone()),
        &engine.whole,
        &cedar_policy::Entities::from(prepared.entities.clone()),
    );
    let ids = |positions: &mut dyn Iterator<Item = u32>| -> BTreeSet<String> {
        positions
            .map(|position| engine.policies[position as usize].id.clone())
            .collect()
    };
    let errored: BTreeSet<String> = response
        .diagnostics()
        .errors()
        .map(
            |cedar_policy::AuthorizationError::PolicyEvaluationError(error)| {
                error.policy_id().to_string()
            },
        )
        .collect();
    assert_eq!(
        errored,
        ids(&mut outcome.errors.iter().map(|(position, _)| *position))
    );
    let reason: BTreeSet<String> = response
        .diagnostics()
        .reason()
        .map(ToString::to_string)
        .collect();
    let (permits, forbids) = (
        ids(&mut outcome.permits.iter().copied()),
        ids(&mut outcome.forbids.iter().copied()),
    );
    match response.decision() {
        cedar_policy::Decision::Allow => assert_eq!((reason, forbids), (permits, BTreeSet::new())),
        cedar_policy::Decision::Deny if forbids.is_empty() => {
            assert_eq!((reason, permits), (BTreeSet::new(), BTreeSet::new()))
        }
        cedar_policy::Decision::Deny => assert_eq!(reason, forbids),
    }
}

#[test]
fn a_permit_allows_with_its_reason() {
    let report = check(
        r#"@reason("reads are fine") permit (principal, action == Action::"read", resource);"#,
        Ask::Call(call(ActionClass::Read, "github", "repos/acme/api")),
        Decision::Allow,
        &["test.1"],
    );
    assert_eq!(report.reasons, ["reads are fine"]);
}

#[test]
fn default_ids_count_policies_per_file_and_reasons_fall_back() {
    let report = check(
        r#"
        permit (principal, action == Action::"write", resource);
        permit (principal, action == Action::"read", resource);
        "#,
        Ask::Call(call(ActionClass::Read, "github", "repos/acme/api")),
        Decision::Allow,
        &["test.2"],
    );
    assert_eq!(report.reasons, ["policy `test.2` permits this"]);
}

#[test]
fn a_forbid_denies_with_its_reason() {
    let policies = r#"
        @id("anything") permit (principal, action, resource);
        @id("no-deletes")
        @reason("deletes are never allowed")
        forbid (principal, action in [Action::"call"], resource) when { context.action == "delete" };
        @id("quiet-forbid") forbid (principal, action, resource) when { context.depth > 5 };
    "#;
    let mut request = call(ActionClass::Admin, "github", "repos/acme/api");
    request.action = "delete";
    let report = check(
        policies,
        Ask::Call(request),
        Decision::Deny,
        &["no-deletes"],
    );
    assert_eq!(report.reasons, ["deletes are never allowed"]);

    request.depth = 6;
    let report = check(
        policies,
        Ask::Call(request),
        Decision::Deny,
        &["no-deletes", "quiet-forbid"],
    );
    assert_eq!(
        report.reasons,
        [
            "deletes are never allowed",
            "policy `quiet-forbid` forbids this"
        ]
    );
}

#[test]
fn nothing_permitted_is_denied() {
    let report = check(
        r#"permit (principal, action == Action::"read", resource);"#,
        Ask::Call(call(ActionClass::Write, "github", "repos/acme/api")),
        Decision::Deny,
        &[],
    );
    assert_eq!(
        report.reasons,
        [r#"no policy permits `write` on `Resource::"github:repos/acme/api"`"#]
    );
}

const STEP_UP: &str = r#"
    @id("changes") permit (principal, action in [Action::"write", Action::"admin"], resource);
    @id("iam-needs-approval")
    @step_up("changing iam needs a human's approval")
    forbid (principal, action in [Action::"write", Action::"admin"], resource in Tool::"iam")
    unless { context.approved };
"#;

#[test]
fn step_up_forbids_ask_for_approval_and_approval_lifts_them() {
    let mut request = call(ActionClass::Write, "iam", "roles/ci");
    let report = check(
        STEP_UP,
        Ask::Call(request),
        Decision::ApprovalRequired,
        &["iam-needs-approval"],
    );
    assert_eq!(report.reasons, ["changing iam needs a human's approval"]);

    request.approved = true;
    check(STEP_UP, Ask::Call(request), Decision::Allow, &["changes"]);
}

#[test]
fn step_up_with_a_plain_forbid_is_a_denial() {
    let policies = format!(
        r#"{STEP_UP}
        @id("no-bearer") @reason("no bearer tokens near secrets")
        forbid (principal, action, resource) when {{ context has bearer && context.bearer }};"#
    );
    let mut request = call(ActionClass::Write, "iam", "roles/ci");
    request.bearer = true;
    let report = check(
        &policies,
        Ask::Call(request),
        Decision::Deny,
        &["iam-needs-approval", "no-bearer"],
    );
    assert_eq!(
        report.reasons,
        [
            "changing iam needs a human's approval",
            "no bearer tokens near secrets"
        ]
    );
}

#[test]
fn step_up_without_a_permit_is_a_denial() {
    // Approving would lift the forbid but leave nothing that permits the call.
    let policies = r#"
        @id("reads") permit (principal, action == Action::"read", resource);
        @id("iam-needs-approval") @step_up("changing iam needs approval")
        forbid (principal, action == Action::"write", resource in Tool::"iam") unless { context.approved };
    "#;
    let report = check(
        policies,
        Ask::Call(call(ActionClass::Write, "iam", "roles/ci")),
        Decision::Deny,
        &["iam-needs-approval"],
    );
    assert_eq!(report.reasons.len(), 2, "{:?}", report.reasons);
    assert!(
        report.reasons[1].starts_with("no policy permits `write`"),
        "{:?}",
        report.reasons
    );
}

#[test]
fn an_erroring_forbid_denies_instead_of_being_skipped() {
    // Cedar alone would skip the overflowing forbid and allow; remit must deny.
    let policies = r#"
        @id("anything") permit (principal, action, resource);
        @id("overflow") forbid (principal, action, resource)
        when { context.time * 10000000000 > 0 };
    "#;
    let report = check(
        policies,
        Ask::Call(call(ActionClass::Read, "github", "repos/acme/api")),
        Decision::Deny,
        &["overflow"],
    );
    assert_eq!(report.reasons.len(), 1);
    assert!(
        report.reasons[0].starts_with("policy `overflow` failed to evaluate"),
        "{report:?}"
    );
    assert!(report.reasons[0].contains("overflow"), "{report:?}");
}

#[test]
fn an_erroring_permit_denies_even_when_another_permits() {
    let policies = r#"
        @id("anything") permit (principal, action, resource);
        @id("overflow") permit (principal, action == Action::"RequestTask", resource)
        when { context.budget * 100000000000000000 > 0 };
    "#;
    check(
        policies,
        Ask::Task(task("github", strings(&["get_issue"]))),
        Decision::Deny,
        &["overflow"],
    );
}

#[test]
fn an_erroring_step_up_forbid_is_not_an_approval() {
    let policies = format!(
        r#"{STEP_UP}
        @id("overflow") @step_up("odd") forbid (principal, action, resource)
        when {{ context.depth + 9223372036854775807 > 0 }};"#
    );
    let mut request = call(ActionClass::Write, "iam", "roles/ci");
    request.depth = 1;
    check(
        &policies,
        Ask::Call(request),
        Decision::Deny,
        &["overflow", "iam-needs-approval"],
    );
}

#[test]
fn context_and_entities_reach_the_policies() {
    let policies = r#"
        @id("night-shift") permit (principal, action == Action::"read", resource)
        when { context.hour == 22 && context.time == 1700000000 };
        @id("owner") permit (principal in Owner::"alice@example.org", action == Action::"write", resource)
        when { principal.name == "triage-bot" && principal.owner == "alice@example.org"
               && principal.spiffe_id like "spiffe://example.org/*" };
        @id("resource") permit (principal, action == Action::"admin", resource)
        when { resource.tool == "github" && resource.path == "repos/acme/api"
               && context.tool == "github" && context.class == "admin" && context.action == "do_something"
               && context.task == "task-1" && context.intent like "triage*" };
        @id("obo") forbid (principal, action, resource) when { context has obo && context.obo == "mallory" };
        @id("sensitive") forbid (principal, action, resource) when { context has sensitivity && context.sensitivity.contains("pii") };
    "#;
    check(
        policies,
        Ask::Call(call(ActionClass::Read, "github", "x")),
        Decision::Allow,
        &["night-shift"],
    );
    let mut request = call(ActionClass::Read, "github", "x");
    request.now = NOW + 3_600;
    check(policies, Ask::Call(request), Decision::Deny, &[]);
    check(
        policies,
        Ask::Call(call(ActionClass::Write, "github", "x")),
        Decision::Allow,
        &["owner"],
    );
    let mut request = call(ActionClass::Write, "github", "x");
    request.agent.owner = "bob@example.org";
    check(policies, Ask::Call(request), Decision::Deny, &[]);
    let request = call(ActionClass::Admin, "github", "repos/acme/api");
    check(policies, Ask::Call(request), Decision::Allow, &["resource"]);
    let mut request = call(ActionClass::Admin, "github", "repos/acme/api");
    request.obo = Some("mallory");
    check(policies, Ask::Call(request), Decision::Deny, &["obo"]);
    let mut request = call(ActionClass::Admin, "github", "repos/acme/api");
    request.sensitivity = strings(&["pii"]);
    check(policies, Ask::Call(request), Decision::Deny, &["sensitive"]);
}

#[test]
fn an_agent_entity_is_reused_only_while_its_facts_are_the_same() {
    // One engine, so that its cache of agent entities is in play from call to call.
    let engine = engine(
        r#"
        @id("alice") permit (principal in Owner::"alice@example.org", action, resource)
        when { principal.name == "triage-bot" };
        "#,
    );
    let decide = |agent: AgentFacts<'static>| {
        let mut request = call(ActionClass::Read, "github", "x");
        request.agent = agent;
        engine.decide_call(&request).decision
    };
    assert_eq!(decide(TRIAGE), Decision::Allow);
    assert_eq!(decide(TRIAGE), Decision::Allow);
    // The same SPIFFE ID with another owner or name is not served the cached entity.
    let moved = AgentFacts {
        owner: "bob@example.org",
        ..TRIAGE
    };
    assert_eq!(decide(moved), Decision::Deny);
    let renamed = AgentFacts {
        name: "other-bot",
        ..TRIAGE
    };
    assert_eq!(decide(renamed), Decision::Deny);
    assert_eq!(decide(TRIAGE), Decision::Allow);
    assert_eq!(engine.agents.len(), 1);

    // Bounded: past its capacity the cache starts over instead of growing.
    let ids: Vec<&'static str> = (0..decide::AgentEntities::CAPACITY + 5)
        .map(|i| &*format!("spiffe://example.org/agent/bot-{i}").leak())
        .collect();
    for id in ids {
        let agent = AgentFacts {
            spiffe_id: id,
            ..TRIAGE
        };
        assert_eq!(decide(agent), Decision::Allow);
    }
    assert!(engine.agents.len() <= decide::AgentEntities::CAPACITY);
}

#[test]
fn task_requests_see_their_scope() {
    let policies = r#"
        @id("bounded") permit (principal, action == Action::"RequestTask", resource == Tool::"github")
        when { context.ttl_seconds <= 600 && context.budget <= 100 && resource.name == "github"
               && context.actions.contains("get_issue") && !context.delegated && context.depth == 0 };
        @id("wildcards") forbid (principal, action == Action::"RequestTask", resource)
        when { context.wildcard_actions || context.wildcard_resources };
    "#;
    let actions = strings(&["get_issue"]);
    check(
        policies,
        Ask::Task(task("github", actions)),
        Decision::Allow,
        &["bounded"],
    );
    check(
        policies,
        Ask::Task(task("gitlab", actions)),
        Decision::Deny,
        &[],
    );
    let mut request = task("github", actions);
    request.ttl_seconds = 601;
    check(policies, Ask::Task(request), Decision::Deny, &[]);
    let mut request = task("github", actions);
    request.resources = strings(&["repos/*"]);
    check(policies, Ask::Task(request), Decision::Deny, &["wildcards"]);
    check(
        policies,
        Ask::Task(task("github", strings(&["get_issue", "list_*"]))),
        Decision::Deny,
        &["wildcards"],
    );
}

#[test]
fn a_syntax_error_names_file_and_line() {
    let error = load_error(
        "permit (principal, action, resource);\n\npermit (principal action, resource);\n",
    );
    assert!(error.starts_with("tools.cedar:3: "), "{error}");
}

#[test]
fn an_unknown_action_names_file_line_and_a_hint() {
    let error = load_error(
        "permit (principal, action, resource);\n\n\n\nforbid (principal, action == Action::\"wirte\", resource);\n",
    );
    assert!(
        error.starts_with(r#"tools.cedar:5: unrecognized action `Action::"wirte"`"#),
        "{error}"
    );
    assert!(
        error.contains(r#"hint: did you mean `Action::"write"`?"#),
        "{error}"
    );
    assert!(!error.contains('\n'), "{error}");
}

#[test]
fn a_wrong_attribute_names_file_and_line() {
    let error = load_error(
        "permit (principal, action, resource);\npermit (principal, action == Action::\"read\", resource)\nwhen { principal.nmae == \"x\" };\n",
    );
    assert!(error.starts_with("tools.cedar:3: "), "{error}");
    assert!(error.contains("nmae"), "{error}");
}

#[test]
fn errors_point_into_the_right_file() {
    let error = PolicyEngine::from_sources(
        SCHEMA,
        &[
            ("a.cedar", "permit (principal, action, resource);\n"),
            (
                "b.cedar",
                "\n\npermit (principal, action, resource) when { context.nope };\n",
            ),
        ],
    )
    .err()
    .map(|error| error.to_string())
    .unwrap_or_default();
    assert!(error.starts_with("b.cedar:3: "), "{error}");
}

#[test]
fn a_schema_error_names_the_schema() {
    let error = PolicyEngine::from_sources("entity Agent;\nentity Tool {\n name: Strin\n};", &[])
        .err()
        .map(|error| error.to_string())
        .unwrap_or_default();
    assert!(error.starts_with("schema.cedarschema:3: "), "{error}");
}

#[test]
fn duplicate_ids_are_refused() {
    let error = PolicyEngine::from_sources(
        SCHEMA,
        &[
            ("a.cedar", "permit (principal, action, resource);\n@id(\"x\") permit (principal, action, resource);"),
            ("b.cedar", "\n\n@id(\"x\")\nforbid (principal, action, resource);"),
        ],
    )
    .err()
    .map(|error| error.to_string())
    .unwrap_or_default();
    assert_eq!(
        error,
        "b.cedar:3: duplicate policy id `x`, first used at `a.cedar:2`; hint: give each policy its own `@id(\"…\")`"
    );
    // An explicit id may also collide with a generated one.
    let error = PolicyEngine::from_sources(
        SCHEMA,
        &[("a.cedar", "permit (principal, action, resource);\n@id(\"a.1\") permit (principal, action, resource);")],
    )
    .err()
    .map(|error| error.to_string())
    .unwrap_or_default();
    assert!(
        error.starts_with("a.cedar:2: duplicate policy id `a.1`"),
        "{error}"
    );
}

fn shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

#[test]
fn the_shipped_policies_load_and_pass_their_tests() {
    let engine = PolicyEngine::load_dir(&shipped()).unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(engine.policy_count(), 7);
    for id in engine.policy_ids() {
        assert!(
            id.starts_with("task.") || id.starts_with("call."),
            "`{id}` has no `@id`"
        );
    }
    let report = run_policy_tests(&engine, &shipped().join("tests"))
        .unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(report.failures, [], "failures");
    assert!(report.passed >= 12, "{report:?}");
}

/// A directory of its own under the system's temporary directory, emptied first.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("remit-policy-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn load_dir_needs_exactly_one_schema_and_names_files_in_errors() {
    let dir = scratch("schemas");
    std::fs::write(
        dir.join("ok.cedar"),
        "permit (principal, action, resource);",
    )
    .unwrap();
    let error = PolicyEngine::load_dir(&dir)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(error.starts_with("no `*.cedarschema` file in"), "{error}");

    std::fs::write(dir.join("remit.cedarschema"), SCHEMA).unwrap();
    std::fs::write(
        dir.join("bad.cedar"),
        "\npermit (principal, action == Action::\"wirte\", resource);",
    )
    .unwrap();
    let error = PolicyEngine::load_dir(&dir)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        error.starts_with(&format!(
            "{}:2: unrecognized action",
            dir.join("bad.cedar").display()
        )),
        "{error}"
    );

    std::fs::remove_file(dir.join("bad.cedar")).unwrap();
    let engine = PolicyEngine::load_dir(&dir).unwrap();
    assert_eq!(engine.policy_ids(), ["ok.1"]);

    std::fs::write(dir.join("other.cedarschema"), SCHEMA).unwrap();
    let error = PolicyEngine::load_dir(&dir)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(error.starts_with("more than one schema in"), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Run one test file's text against the shipped policies.
fn run_cases(text: &str) -> Result<TestReport, String> {
    let engine = PolicyEngine::load_dir(&shipped()).unwrap();
    let mut report = TestReport::default();
    testing::run_file(&engine, "cases.toml", text, &mut report)
        .map_err(|error| error.to_string())?;
    Ok(report)
}

#[test]
fn policy_tests_report_failures() {
    let report = run_cases(
        r#"
        [[case]]
        name = "wrongly expected"
        kind = "call"
        agent = "triage-bot"
        owner = "alice@example.org"
        tool = "iam"
        action = "attach_role_policy"
        class = "write"
        resource = "roles/ci"
        hour = 3
        expect = "allow"
        expect_policies = ["call.change"]
        "#,
    )
    .unwrap();
    assert_eq!(report.passed, 0);
    assert_eq!(
        report.failures,
        [Failure {
            file: "cases.toml".into(),
            case: "wrongly expected".into(),
            expected: "allow by [`call.change`]".into(),
            got: "approval_required by [`call.approve-identity`]".into(),
            reasons: vec![
                "changes to identity infrastructure (`iam`, `vault`) need a human's approval of the exact call".into()
            ],
        }]
    );
}

#[test]
fn bad_policy_tests_name_file_and_case() {
    let case = |extra: &str| {
        format!(
            "[[case]]\nname = \"c\"\nkind = \"call\"\nagent = \"a\"\nowner = \"o\"\ntool = \"t\"\n\
             action = \"x\"\nresource = \"r\"\nexpect = \"allow\"\n{extra}\n"
        )
    };
    let error = run_cases(&case("class = \"read\"\ncolour = \"blue\"")).unwrap_err();
    assert!(
        error.starts_with("cases.toml: case `c`: unknown field `colour`"),
        "{error}"
    );
    let error = run_cases(&case("class = \"reed\"")).unwrap_err();
    assert!(error.starts_with("cases.toml: case `c`: "), "{error}");
    assert!(error.contains("`reed`"), "{error}");
    let error = run_cases(&case("class = \"read\"\nbudget = 4")).unwrap_err();
    assert_eq!(
        error,
        "cases.toml: case `c`: `budget` only apply to `task` cases; hint: a call names one `action` and `resource`"
    );
    let error = run_cases(&case("class = \"read\"\nhour = 24")).unwrap_err();
    assert!(error.contains("`hour` must be 0 to 23"), "{error}");
    let error = run_cases(&case("class = \"read\"\nexpect_policies = 3")).unwrap_err();
    assert!(error.starts_with("cases.toml: case `c`: "), "{error}");
    let error = run_cases(&(case("").replace("allow", "maybe") + "class = \"read\"")).unwrap_err();
    assert!(error.contains("unknown expectation `maybe`"), "{error}");
    let error = run_cases("[[case]]\nkind = \"call\"").unwrap_err();
    assert!(
        error.starts_with("cases.toml: case `#1`: missing field"),
        "{error}"
    );
    let error = run_cases("[[cases]]\n").unwrap_err();
    assert!(error.starts_with("cases.toml: "), "{error}");
}

mod equivalence;
