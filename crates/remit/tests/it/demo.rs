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
}
