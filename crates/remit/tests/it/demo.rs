//! `remit demo`, the README's first command, through the real binary.

use crate::support;

#[test]
fn the_demo_behaves_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let run = support::run(dir.path(), &["demo"]);
    assert_eq!(run.status, 0, "{}\n{}", run.stdout, run.stderr);
    for step in [
        "[ok  ]  1. register agent",
        "[ok  ]  2. grant a task",
        "[ok  ]  3. GET /http/github/repos/acme/api/issues",
        "[ok  ]  4. DELETE /http/github/repos/acme/api",
        "[ok  ]  5. revoke the task",
        "[ok  ]  6. GET /http/github/repos/acme/api/issues again",
        "[ok  ]  7. verify the hash-chained audit log",
        "every step behaved: 7 of 7",
    ] {
        assert!(
            run.stdout.contains(step),
            "missing `{step}` in:\n{}",
            run.stdout
        );
    }
    assert!(
        run.stdout.contains("403 Forbidden")
            && run.stdout.contains("401 Unauthorized: revoked")
            && run.stdout.contains("agent `triage-bot` is still active"),
        "{}",
        run.stdout
    );
    // The upstream credential is named, never printed.
    let mentions: Vec<_> = run.stdout.match_indices("ghp_demo_").collect();
    assert!(!mentions.is_empty());
    for (at, needle) in mentions {
        assert!(
            run.stdout[at + needle.len()..].starts_with('…'),
            "{}",
            run.stdout
        );
    }
    assert!(!run.stdout.contains("FAIL"));
    // The demo leaves nothing behind in the working directory.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    insta::with_settings!({ filters => store::testing::SNAPSHOT_FILTERS.to_vec() }, {
        insta::assert_snapshot!(outcome_last(&run.stdout));
    });
}

/// The demo's output with the one `call.outcome` of its event line moved to the end: step 3's
/// outcome is recorded once its answer has been read, so it races the steps after it and its
/// place in the log changes from run to run. Where it may be is checked here.
fn outcome_last(stdout: &str) -> String {
    let lines: Vec<String> = stdout
        .lines()
        .map(|line| {
            if !line.contains(" -> call.outcome") {
                return line.to_string();
            }
            let indent = &line[..line.len() - line.trim_start().len()];
            let kinds: Vec<&str> = line.trim_start().split(" -> ").collect();
            let outcome = kinds.iter().position(|kind| *kind == "call.outcome");
            let first_decision = kinds.iter().position(|kind| *kind == "call.decision");
            assert!(
                matches!((first_decision, outcome), (Some(d), Some(o)) if d < o),
                "a call's outcome before its decision: {line}"
            );
            let mut rest: Vec<&str> = kinds
                .into_iter()
                .filter(|kind| *kind != "call.outcome")
                .collect();
            rest.push("call.outcome");
            format!("{indent}{}", rest.join(" -> "))
        })
        .collect();
    lines.join("\n")
}
