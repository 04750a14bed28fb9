//! The OpenAPI document held against the real server: schemathesis (from the virtual
//! environment named by `REMIT_TEST_PYTHON`, `tests/python/requirements.txt`) reads
//! `/openapi.json` from a spawned `remit serve`, generates valid and invalid requests for
//! every operation, sends them with an admin operator's token, and fails on any 5xx and on
//! any status, content type or body that the document does not describe.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{self, Server, ok};

/// Examples per operation and phase: enough to walk every documented constraint (the
/// coverage phase tries each bound and pattern on its own), few enough that the run stays
/// well under two minutes on two cores.
const MAX_EXAMPLES: &str = "25";

/// What is checked: the server never fails, and every answer is the one documented.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance";

/// Longer than a run takes on a loaded machine; a hung run is killed and fails.
const RUN_TIMEOUT: Duration = Duration::from_secs(240);

#[test]
fn every_answer_is_the_documented_one() {
    let Some(python) = store::testing::python(
        "the schemathesis test `openapi::every_answer_is_the_documented_one`",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    support::create_store(d);
    let created = ok(d, &["operator", "create", "--role", "admin"]);
    let token = created
        .lines()
        .find_map(|line| line.strip_prefix("token: "))
        .unwrap_or_else(|| panic!("no token in:\n{created}"))
        .trim()
        .to_string();
    let server = Server::start(d, &[]);

    let output = d.join("schemathesis.txt");
    let mut child = Command::new(&python)
        .args([
            "-c",
            "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())",
        ])
        .arg("run")
        .arg(format!("{}/openapi.json", server.base))
        .arg("--header")
        .arg(format!("Authorization: Bearer {token}"))
        .args(["--checks", CHECKS])
        .args(["--max-examples", MAX_EXAMPLES])
        // One fixed seed: a run is repeatable, and a failure names what reproduces it.
        .args(["--seed", "1"])
        // One worker: with two, hypothesis (describing its strategies' lambdas) parsed source
        // with `ast` from two threads at once, which CPython 3.11 does not support, and a run
        // once failed with "AST constructor recursion depth mismatch" in the tool itself.
        .args(["--workers", "1"])
        .args(["--request-timeout", "10"])
        .env("NO_COLOR", "1")
        .current_dir(d)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&output).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|error| panic!("{python} could not be run: {error}"));
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let report = std::fs::read_to_string(&output).unwrap_or_default();
    let log = server.stop();
    let status = status
        .unwrap_or_else(|| panic!("schemathesis did not finish within {RUN_TIMEOUT:?}:\n{report}"));
    assert!(
        status.success(),
        "schemathesis found answers the document does not describe ({status}):\n{report}\n\
         the server's log ends:\n{}",
        tail(&log, 40)
    );
    // The run reached every operation of the document, and printed no operator token.
    let operations: usize = control::api::openapi()
        .paths
        .paths
        .values()
        .map(|item| {
            [&item.get, &item.post, &item.put, &item.delete, &item.patch]
                .iter()
                .filter(|operation| operation.is_some())
                .count()
        })
        .sum();
    assert!(
        report.contains(&format!("Tested: {operations}\n")),
        "not all {operations} operations were tested:\n{report}"
    );
    assert!(!report.contains(&token), "the token was printed:\n{report}");
    println!("{report}");
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
