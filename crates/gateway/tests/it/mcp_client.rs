//! MCP end to end with a real MCP client library: the official Python SDK (`mcp`, run from the
//! virtual environment named by `REMIT_TEST_PYTHON`) talks to remit, which fronts a real MCP
//! server (rmcp's streamable HTTP service). The SDK drives the protocol; the script
//! `tests/python/dpop_client.py` only signs a fresh DPoP proof for each of its HTTP requests.

use serde_json::{Value, json};

use crate::harness::unique;
use crate::mcp::{SECRET, setup};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/dpop_client.py");

#[tokio::test]
async fn the_official_python_sdk_lists_calls_and_is_refused_through_remit() {
    let Some(python) = store::testing::python(
        "the Python test `mcp_client::the_official_python_sdk_lists_calls_and_is_refused_through_remit`",
    ) else {
        return;
    };
    let (upstream, remit) = setup(false).await;
    let agent = remit.agent(&unique("python")).await;
    let grant = remit
        .grant(
            &agent,
            json!([{ "tool": "vault", "actions": ["read_file"] }]),
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let jwk = dir.path().join("agent.jwk");
    std::fs::write(&jwk, agent.key.to_private_jwk().expose()).unwrap();

    let run = tokio::process::Command::new(&python)
        .arg(SCRIPT)
        .arg(&remit.base)
        .arg("vault")
        .arg(grant.token.expose())
        .arg(&jwk)
        .args(["--allowed", "read_file", "--denied", "write_file"])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(60), run)
        .await
        .expect("the Python client finishes within a minute")
        .unwrap_or_else(|error| panic!("{python} could not be run: {error}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the Python client failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let answer: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|error| panic!("not one JSON object ({error}):\n{stdout}\n{stderr}"));

    assert_eq!(answer["tools"], json!(["read_file"]), "{answer}");
    assert_eq!(
        answer["allowed"],
        json!({ "text": ["read_file notes.txt: done"], "is_error": false }),
        "{answer}"
    );
    let denied = &answer["denied"];
    assert_eq!(denied["code"], -32003, "{answer}");
    assert_eq!(denied["data"]["error"], "out_of_scope", "{answer}");
    assert!(
        denied["message"]
            .as_str()
            .is_some_and(|m| m.contains("outside the task's scopes")),
        "{answer}"
    );
    // Every HTTP request the SDK made (its POSTs, its GET stream, the session's DELETE) carried
    // a proof for its own method, and remit accepted each one.
    let http = answer["http"].as_array().unwrap();
    assert!(
        http.iter().all(|request| request["status"]
            .as_u64()
            .is_some_and(|s| (200..300).contains(&s))),
        "{answer}"
    );
    for method in ["POST", "GET", "DELETE"] {
        assert!(
            http.iter().any(|request| request["method"] == method),
            "{method}: {answer}"
        );
    }

    assert!(
        upstream.saw("read_file"),
        "the allowed call reached the server"
    );
    assert!(
        !upstream.saw("write_file"),
        "the denied call never reached the server"
    );
    let seen = upstream.seen();
    assert!(!seen.is_empty());
    for request in &seen {
        assert_eq!(
            request.authorization.as_deref(),
            Some(format!("Bearer {SECRET}").as_str()),
            "remit injects the upstream credential: {seen:?}"
        );
        assert!(!request.dpop, "the agent's proof stays with remit");
    }
    assert!(
        !stdout.contains(SECRET) && !stderr.contains(SECRET),
        "the upstream secret never reaches the client: {stdout}\n{stderr}"
    );
    println!("{stdout}");
}
