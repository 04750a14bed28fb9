//! A scripted session with the real binary: bootstrap an operator, register an agent, serve,
//! grant a task over HTTP, revoke it from the command line, read and verify the audit log,
//! validate and test policies — and check that no secret reached the server's log.

use std::path::Path;
use std::time::{Duration, Instant};

use credentials::AgentKeyPair;
use serde_json::{Value, json};

use crate::support::{self, Server, ok, run};

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn request_task(
    client: &reqwest::Client,
    base: &str,
    key: &AgentKeyPair,
    jti: &str,
) -> (u16, Value) {
    let proof = key
        .sign_proof("POST", &format!("{base}/v1/tasks"), None, now(), jti)
        .unwrap();
    let response = client
        .post(format!("{base}/v1/tasks"))
        .header("dpop", proof)
        .json(&json!({
            "agent": "triage-bot",
            "intent": "triage new issues in acme/api",
            "scopes": [{ "tool": "github", "actions": ["read_issue"], "resources": ["acme/*"] }],
        }))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn complete(
    client: &reqwest::Client,
    base: &str,
    key: &AgentKeyPair,
    task: &str,
    token: &str,
    jti: &str,
) -> (u16, Value) {
    let url = format!("{base}/v1/tasks/{task}/complete");
    let proof = key
        .sign_proof("POST", &url, Some(token), now(), jti)
        .unwrap();
    let response = client
        .post(&url)
        .header("authorization", format!("DPoP {token}"))
        .header("dpop", proof)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

fn write_key(dir: &Path, key: &AgentKeyPair) -> String {
    let path = dir.join("agent.jwk");
    std::fs::write(&path, key.public().to_jwk().to_string()).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn a_scripted_session() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("remit.toml"),
        "trust_domain = \"example.org\"\nsync_interval_ms = 50\n",
    )
    .unwrap();

    // The first start of `remit serve` creates the store; then an operator token, printed
    // once.
    support::create_store(d);
    let out = ok(
        d,
        &["operator", "create", "--role", "admin", "--name", "ci"],
    );
    let operator_token = out
        .lines()
        .find_map(|l| l.strip_prefix("token: "))
        .unwrap()
        .to_string();
    assert!(operator_token.starts_with("remit_op_"));

    // Register an agent from its public JWK.
    let key = AgentKeyPair::generate_p256().unwrap();
    let key_file = write_key(d, &key);
    let out = ok(
        d,
        &[
            "agent",
            "create",
            "triage-bot",
            "--owner",
            "alice@example.org",
            "--key",
            &key_file,
        ],
    );
    assert_eq!(out.trim(), "spiffe://example.org/agent/triage-bot");
    assert!(ok(d, &["agent", "list"]).contains("triage-bot\tactive\talice@example.org"));
    let shown: Value = serde_json::from_str(&ok(d, &["agent", "show", "triage-bot"])).unwrap();
    assert_eq!(shown["owner"], "alice@example.org");

    // Serve, and let the agent get a task over HTTP.
    let server = Server::start(d, &[]);
    let base = server.base.clone();
    let client = reqwest::Client::new();
    let (status, grant) = request_task(&client, &base, &key, "jti-1").await;
    assert_eq!(status, 201, "{grant}");
    let task = grant["task_id"].as_str().unwrap().to_string();
    let token = grant["token"].as_str().unwrap().to_string();

    // The admin API takes the operator token, not the agent's.
    let agents = client
        .get(format!("{base}/v1/agents"))
        .bearer_auth(&operator_token)
        .send()
        .await
        .unwrap();
    assert_eq!(agents.status(), 200);
    let refused = client
        .get(format!("{base}/v1/agents"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    // Revoke from the command line while the server runs; the server catches up.
    let out = ok(d, &["revoke", "task", &task, "--reason", "scripted"]);
    assert!(out.starts_with(&format!("revoked task {task}")), "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    let (status, body) = loop {
        n += 1;
        let (status, body) = complete(
            &client,
            &base,
            &key,
            &task,
            &token,
            &format!("complete-{n}"),
        )
        .await;
        if status != 200 || Instant::now() > deadline {
            break (status, body);
        }
    };
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"], "task_not_active");

    // A second task, completed by its agent.
    let (status, grant) = request_task(&client, &base, &key, "jti-2").await;
    assert_eq!(status, 201);
    let (status, done) = complete(
        &client,
        &base,
        &key,
        grant["task_id"].as_str().unwrap(),
        grant["token"].as_str().unwrap(),
        "c-2",
    )
    .await;
    assert_eq!((status, &done["status"]), (200, &json!("completed")));

    // Key rotation from the command line reaches the server's JWKS.
    let out = ok(d, &["keys", "rotate"]);
    assert!(out.starts_with("new signing key "), "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let jwks: Value = client
            .get(format!("{base}/.well-known/jwks.json"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if jwks["keys"].as_array().unwrap().len() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rotated key never reached the server: {jwks}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let log = server.stop();
    assert!(log.contains("remit listening on"), "{log}");
    for secret in [
        operator_token.as_str(),
        token.as_str(),
        grant["token"].as_str().unwrap(),
    ] {
        assert!(!log.contains(secret), "a secret reached the server log");
    }

    // The audit log: tail, and a verified chain.
    let tail = ok(d, &["audit", "tail", "-n", "3"]);
    let events: Vec<Value> = tail
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 3);
    assert!(
        events
            .windows(2)
            .all(|w| w[0]["seq"].as_u64() < w[1]["seq"].as_u64())
    );
    assert_eq!(events[2]["kind"], "key.rotated", "the newest event is last");
    let by_task = ok(d, &["audit", "tail", "--task", &task, "-n", "100"]);
    let kinds: Vec<String> = by_task
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(kinds, ["task.granted", "revocation", "task.revoked"]);
    let verify = ok(d, &["audit", "verify"]);
    assert!(verify.starts_with("audit chain intact: "), "{verify}");
    // A signed checkpoint of the head, kept in a file, holds against the log as it grows.
    let checkpoint = ok(d, &["audit", "checkpoint"]);
    assert_eq!(checkpoint.trim().split('.').count(), 3, "{checkpoint}");
    std::fs::write(d.join("checkpoint.jws"), &checkpoint).unwrap();
    ok(d, &["agent", "disable", "triage-bot"]);
    let verify = ok(d, &["audit", "verify", "--checkpoint", "checkpoint.jws"]);
    assert!(
        verify.contains("the log matches the signed checkpoint of event"),
        "{verify}"
    );
    let all = ok(d, &["audit", "tail", "-n", "1000"]);
    assert!(!all.contains(&operator_token) && !all.contains(&token));

    // Disabled above: the agent is listed so.
    assert!(ok(d, &["agent", "list"]).contains("triage-bot\tdisabled"));
}

/// The same binary on PostgreSQL: `--store postgres://…` and nothing else changes.
#[tokio::test]
async fn a_session_on_postgres() {
    let Some(base) =
        store::testing::postgres_url("the PostgreSQL test `cli::a_session_on_postgres`")
    else {
        return;
    };
    let schema = store::testing::PostgresSchema::create(&base).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store_flag = schema.url.as_str();

    // A schema remit never migrated holds no store, and an admin command does not make one.
    let refused = run(d, &["--store", store_flag, "audit", "verify"]);
    assert_eq!(refused.status, 1, "{}", refused.stderr);
    assert!(
        refused
            .stderr
            .starts_with("error: no store at `postgres://")
            && refused.stderr.contains("\nhint: `remit serve` creates it"),
        "{}",
        refused.stderr
    );
    let server = Server::start(d, &["--store", store_flag]);
    let out = ok(
        d,
        &[
            "--store", store_flag, "operator", "create", "--role", "admin",
        ],
    );
    let operator_token = out
        .lines()
        .find_map(|l| l.strip_prefix("token: "))
        .unwrap()
        .to_string();
    let key = AgentKeyPair::generate_ed25519().unwrap();
    let key_file = write_key(d, &key);
    ok(
        d,
        &[
            "--store",
            store_flag,
            "agent",
            "create",
            "triage-bot",
            "--owner",
            "alice@example.org",
            "--key",
            &key_file,
        ],
    );

    let base_url = server.base.clone();
    let client = reqwest::Client::new();
    let (status, grant) = request_task(&client, &base_url, &key, "pg-1").await;
    assert_eq!(status, 201, "{grant}");
    let task = grant["task_id"].as_str().unwrap();
    let revoked = client
        .post(format!("{base_url}/v1/revocations"))
        .bearer_auth(&operator_token)
        .json(&json!({ "kind": "task", "target": task, "reason": "postgres session" }))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 201);
    let (status, body) = complete(
        &client,
        &base_url,
        &key,
        task,
        grant["token"].as_str().unwrap(),
        "pg-c",
    )
    .await;
    assert_eq!((status, &body["error"]), (409, &json!("task_not_active")));
    let health: Value = client
        .get(format!("{base_url}/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["store"], "postgres");
    server.stop();

    let verify = ok(d, &["--store", store_flag, "audit", "verify"]);
    assert!(
        verify.starts_with("audit chain intact: 6 events"),
        "{verify}"
    );
    schema.drop_schema().await.unwrap();
}

#[test]
fn mistakes_get_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    support::create_store(d);
    let check = |args: &[&str], needle: &str| {
        let run = run(d, args);
        assert_eq!(run.status, 1, "remit {args:?}: {}", run.stderr);
        let first = run.stderr.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("error: ") && first.contains(needle),
            "remit {args:?}: {}",
            run.stderr
        );
    };
    check(
        &[
            "agent",
            "create",
            "Bad Name",
            "--owner",
            "alice@example.org",
            "--key",
            "missing.jwk",
        ],
        "missing.jwk",
    );
    std::fs::write(d.join("key.jwk"), "{\"kty\":\"RSA\"}").unwrap();
    check(
        &[
            "agent",
            "create",
            "bot",
            "--owner",
            "alice@example.org",
            "--key",
            "key.jwk",
        ],
        "RSA",
    );
    std::fs::write(d.join("key.jwk"), "not json").unwrap();
    check(
        &[
            "agent",
            "create",
            "bot",
            "--owner",
            "alice@example.org",
            "--key",
            "key.jwk",
        ],
        "not a JSON JWK",
    );
    check(&["agent", "show", "ghost"], "no agent named `ghost`");
    check(
        &["audit", "verify", "--checkpoint", "nowhere.jws"],
        "cannot read the checkpoint `nowhere.jws`",
    );
    std::fs::write(d.join("forged.jws"), "eyJhbGciOiJub25lIn0.e30.").unwrap();
    check(
        &["audit", "verify", "--checkpoint", "forged.jws"],
        "is not ES256",
    );
    check(&["revoke", "task", "nonsense"], "invalid task id");
    check(
        &["--store", "mysql://x", "agent", "list"],
        "invalid store URL",
    );
    check(
        &["--config", "nowhere.toml", "agent", "list"],
        "nowhere.toml",
    );
    std::fs::write(d.join("bad.toml"), "listen = 5\n").unwrap();
    check(&["--config", "bad.toml", "serve"], "bad.toml");
    std::fs::write(d.join("bad.toml"), "[tasks]\nmax_ttl_seconds = -1\n").unwrap();
    check(
        &["--config", "bad.toml", "serve"],
        "`tasks.max_ttl_seconds`",
    );

    // A bad policy stops validation naming the file and line.
    let policies = d.join("policies");
    std::fs::create_dir(&policies).unwrap();
    let repo_policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    std::fs::copy(
        repo_policies.join("remit.cedarschema"),
        policies.join("remit.cedarschema"),
    )
    .unwrap();
    std::fs::write(policies.join("bad.cedar"), "permit (principal, action, resource);\n\nforbid (principal, action == Action::\"wirte\", resource);\n").unwrap();
    check(&["policy", "validate", "policies"], "bad.cedar:3");
    let run = run(d, &["--policies", "policies", "serve"]);
    assert_eq!(run.status, 1);
    assert!(run.stderr.contains("bad.cedar:3"), "{}", run.stderr);
}

/// Admin commands never create a store: pointed at a path where there is none (a typo, the
/// wrong directory), each says which path it looked for and leaves nothing behind, instead of
/// reporting on an empty store it just made ("audit chain intact: 0 events").
#[test]
fn admin_commands_never_create_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let commands: [&[&str]; 8] = [
        &["--store", "sqlite://missing.db", "audit", "verify"],
        &["--store", "sqlite:missing.db", "audit", "tail"],
        &[
            "--store",
            "sqlite://missing.db",
            "operator",
            "create",
            "--role",
            "admin",
        ],
        &["--store", "sqlite://missing.db", "agent", "list"],
        &["--store", "sqlite://missing.db", "keys", "rotate"],
        &["--store", "sqlite://missing.db", "approvals", "list"],
        &["--store", "sqlite://missing.db", "revoke", "agent", "bot"],
        &["--store", "sqlite://missing.db", "audit", "checkpoint"],
    ];
    for args in commands {
        let run = run(d, args);
        assert_eq!(run.status, 1, "remit {args:?}: {}", run.stderr);
        let mut lines = run.stderr.lines();
        assert_eq!(
            lines.next(),
            Some("error: no store at `missing.db`"),
            "remit {args:?}: {}",
            run.stderr
        );
        assert!(
            lines
                .next()
                .unwrap_or_default()
                .starts_with("hint: `remit serve` creates it"),
            "remit {args:?}: {}",
            run.stderr
        );
    }
    // Without `--store`, the default path is named.
    let run = run(d, &["agent", "list"]);
    assert_eq!(run.status, 1);
    assert!(
        run.stderr.starts_with("error: no store at `remit.db`"),
        "{}",
        run.stderr
    );
    let left: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "admin commands created {left:?}");
}

/// `remit approvals` on the local store: an empty list, and clear refusals.
#[test]
fn approvals_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    support::create_store(d);
    assert_eq!(ok(d, &["approvals", "list"]), "");
    assert_eq!(
        ok(d, &["approvals", "list", "--status", "all", "--json"]),
        ""
    );
    let refused = run(d, &["approvals", "approve", "apr_00", "--reason", "ok"]);
    assert_eq!(refused.status, 1);
    assert!(
        refused.stderr.starts_with("error: no approval `apr_00`"),
        "{}",
        refused.stderr
    );
    let refused = run(d, &["approvals", "list", "--status", "maybe"]);
    assert_eq!(refused.status, 1);
    assert!(
        refused.stderr.contains("unknown approval status `maybe`"),
        "{}",
        refused.stderr
    );
    // The reason is required.
    assert_eq!(run(d, &["approvals", "deny", "apr_00"]).status, 2);
}

#[test]
fn the_shipped_policies_validate_and_pass_their_tests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = ok(&root, &["policy", "validate", "policies"]);
    assert!(out.contains("policies valid against the schema"), "{out}");
    let out = ok(&root, &["policy", "test", "policies"]);
    assert!(out.trim_end().ends_with(" passed, 0 failed"), "{out}");
}

#[test]
fn help_lists_every_command() {
    let out = support::ok(Path::new("."), &["--help"]);
    for command in [
        "serve",
        "demo",
        "operator",
        "agent",
        "keys",
        "approvals",
        "revoke",
        "audit",
        "policy",
    ] {
        assert!(out.contains(command), "{command} missing from --help");
    }
}

/// `remit serve` with a tool declared in remit.toml: an agent's call reaches a real upstream
/// through the gateway with the credential injected; an out-of-scope call never does.
#[tokio::test]
async fn the_gateway_through_the_binary() {
    use std::sync::{Arc, Mutex};
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let recorder = Arc::clone(&seen);
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_address = upstream.local_addr().unwrap();
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let recorder = Arc::clone(&recorder);
        async move {
            let auth = request
                .headers()
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            recorder
                .lock()
                .unwrap()
                .push(format!("{} {} {auth}", request.method(), request.uri()));
            axum::Json(json!({ "ok": true }))
        }
    });
    tokio::spawn(async move { axum::serve(upstream, app).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("upstream.key"), "s3cr3t-upstream-key\n").unwrap();
    std::fs::write(
        d.join("remit.toml"),
        format!(
            r#"
[[tools]]
name = "tracker"
kind = "http"
upstream = "http://{upstream_address}/api"
auth = {{ header = "X-Api-Key", value = "file:{}" }}
routes = [{{ method = "GET", path = "/issues/{{id}}", action = "read_issue", class = "read", resource = "{{id}}" }}]
"#,
            d.join("upstream.key").display()
        ),
    )
    .unwrap();
    let key = AgentKeyPair::generate_p256().unwrap();
    let key_file = write_key(d, &key);
    support::create_store(d);
    ok(
        d,
        &[
            "agent",
            "create",
            "triage-bot",
            "--owner",
            "alice@example.org",
            "--key",
            &key_file,
        ],
    );
    let server = Server::start(d, &[]);
    let base = server.base.clone();
    let client = reqwest::Client::new();

    let proof = key
        .sign_proof("POST", &format!("{base}/v1/tasks"), None, now(), "t-1")
        .unwrap();
    let grant: Value = client
        .post(format!("{base}/v1/tasks"))
        .header("dpop", proof)
        .json(&json!({ "agent": "triage-bot", "intent": "read one issue", "scopes": [{ "tool": "tracker", "actions": ["read_issue"], "resources": ["42"] }] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = grant["token"].as_str().unwrap();
    let call = |path: &str, jti: &str| {
        let url = format!("{base}{path}");
        let proof = key
            .sign_proof("GET", &url, Some(token), now(), jti)
            .unwrap();
        client
            .get(url)
            .header("authorization", format!("DPoP {token}"))
            .header("dpop", proof)
            .send()
    };
    let allowed = call("/http/tracker/issues/42", "c-1").await.unwrap();
    assert_eq!(allowed.status(), 200);
    let denied = call("/http/tracker/issues/43", "c-2").await.unwrap();
    assert_eq!(denied.status(), 403);
    let body: Value = denied.json().await.unwrap();
    assert_eq!(body["error"], "out_of_scope");
    assert_eq!(
        *seen.lock().unwrap(),
        ["GET /api/issues/42 "],
        "the upstream saw exactly the allowed call"
    );
    // The credential went in a header the upstream reads, not `Authorization`.
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "remit_decisions_total{outcome=\"allow\",tool=\"tracker\",reason=\"allowed\"} 1"
        ),
        "{metrics}"
    );
    let log = server.stop();
    assert!(log.contains("gateway fronting 1 tools"), "{log}");
    assert!(
        !log.contains("s3cr3t-upstream-key") && !log.contains(token),
        "a secret reached the server log"
    );

    // A tool whose credential cannot be read stops start-up with a clear line.
    std::fs::remove_file(d.join("upstream.key")).unwrap();
    let run = run(d, &["serve", "--listen", "127.0.0.1:0"]);
    assert_eq!(run.status, 1);
    assert!(
        run.stderr
            .starts_with("error: `tools`: tool `tracker`: cannot read the credential file"),
        "{}",
        run.stderr
    );
}

/// `remit serve` with `remit.toml` holding `body`: refused with exit code 1, its stderr. A
/// server that starts instead is killed, and the test fails rather than waits.
fn refused_start(d: &Path, body: &str) -> String {
    use std::io::Read;
    std::fs::write(d.join("remit.toml"), body).unwrap();
    let mut child = support::remit()
        .current_dir(d)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("remit serve started with:\n{body}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{body}\n{stderr}");
    stderr
}

/// Declarations that would start and then quietly break scoping or routing stop start-up,
/// each with one error line naming the tool and the route, and a hint.
#[test]
fn tool_declarations_that_would_misroute_stop_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tool = |upstream: &str, routes: &str| {
        format!(
            "[[tools]]\nname = \"tracker\"\nkind = \"http\"\nupstream = \"{upstream}\"\nroutes = [\n{routes}\n]\n"
        )
    };
    let get = r#"{ method = "GET", path = "/issues/{id}", action = "read_issue", class = "read", resource = "{id}" }"#;
    assert_eq!(
        refused_start(
            d,
            &tool(
                "http://127.0.0.1:9",
                r#"{ method = "GET", path = "/issues/{id}", action = "read_issue", class = "read", resource = "{nope}" }"#
            )
        ),
        "error: `tools`: tool `tracker`: route `GET /issues/{id}`: `resource` names `{nope}`, which is not a parameter of the path\n\
         hint: the path's parameters are `{id}`\n"
    );
    assert_eq!(
        refused_start(
            d,
            &tool(
                "http://127.0.0.1:9",
                &format!(
                    "{get},\n{}",
                    r#"{ method = "GET", path = "/issues/{number}", action = "read_other", class = "read" }"#
                )
            )
        ),
        "error: `tools`: tool `tracker`: route `GET /issues/{number}` is declared twice: `GET /issues/{id}` before it already takes every such request\n\
         hint: remove one of them\n"
    );
    assert_eq!(
        refused_start(
            d,
            &tool(
                "http://127.0.0.1:9",
                r#"{ method = "GRAB", path = "/issues/{id}", action = "read_issue", class = "read" }"#
            )
        ),
        "error: `tools`: tool `tracker`: route `GRAB /issues/{id}`: unknown method `GRAB`\n\
         hint: use GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, or `*` for any\n"
    );
    let stderr = refused_start(d, &tool("https://bot:hunter2@tracker.example.org", get));
    assert_eq!(
        stderr,
        "error: `tools`: tool `tracker`: `upstream` carries credentials (`[redacted]@tracker.example.org`)\n\
         hint: remove them from the URL and give them as `auth = { bearer = \"env:VAR\" }` or `{ header = …, value = \"file:PATH\" }`\n"
    );
    assert!(!stderr.contains("hunter2"));
}

#[test]
fn a_store_in_a_missing_directory_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let expected = "error: `store`: the directory `/no/such/dir` of `/no/such/dir/remit.db` does not exist\n\
                    hint: create it, or point `store` at a file in an existing directory\n";
    assert_eq!(
        refused_start(d, "store = \"sqlite:///no/such/dir/remit.db\"\n"),
        expected
    );
    // Admin commands settle the same configuration.
    let run = run(
        d,
        &["--store", "sqlite:///no/such/dir/remit.db", "agent", "list"],
    );
    assert_eq!((run.status, run.stderr.as_str()), (1, expected));
    // A file in the working directory, or one in a directory that exists, gets past the
    // directory check: an admin command then only says that there is no store there yet
    // (admin commands never create one).
    std::fs::write(d.join("remit.toml"), "").unwrap();
    let no_store = |store: &str, path: &str| {
        let refused = support::run(d, &["--store", store, "agent", "list"]);
        assert_eq!(refused.status, 1, "{}", refused.stderr);
        assert!(
            refused
                .stderr
                .starts_with(&format!("error: no store at `{path}`\n")),
            "{}",
            refused.stderr
        );
    };
    no_store("sqlite://here.db", "here.db");
    std::fs::create_dir(d.join("data")).unwrap();
    no_store("sqlite://data/remit.db", "data/remit.db");
}

/// A policy directory from scratch: what is missing is named with a hint, and
/// `remit policy init` writes a directory that validates and passes its tests.
#[test]
fn a_policy_directory_from_scratch() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("empty")).unwrap();
    let no_schema = "error: no `*.cedarschema` file in `empty`, so its policies cannot be validated\n\
                     hint: `remit policy init empty` writes the example schema and policies to start from\n";
    assert_eq!(refused_start(d, "policies = \"empty\"\n"), no_schema);
    std::fs::remove_file(d.join("remit.toml")).unwrap();
    let run_in = |args: &[&str]| {
        let run = run(d, args);
        (run.status, run.stdout, run.stderr)
    };
    assert_eq!(
        run_in(&["policy", "test", "empty"]),
        (1, String::new(), no_schema.to_string())
    );

    // A directory with policies and a schema but no tests.
    let repo_policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    for name in ["remit.cedarschema", "calls.cedar", "tasks.cedar"] {
        std::fs::copy(repo_policies.join(name), d.join("empty").join(name)).unwrap();
    }
    let (status, _, stderr) = run_in(&["policy", "test", "empty"]);
    assert_eq!(
        (status, stderr.as_str()),
        (
            1,
            "error: no tests: `empty/tests` is not a directory\n\
             hint: write `[[case]]` entries in `empty/tests/NAME.toml`, or start from the example that `remit policy init NEW_DIR` writes\n"
        )
    );

    // `init` creates the directory (and its parents) and writes the examples.
    let out = ok(d, &["policy", "init", "new/policies"]);
    assert_eq!(
        out,
        "wrote new/policies/remit.cedarschema\n\
         wrote new/policies/calls.cedar\n\
         wrote new/policies/tasks.cedar\n\
         wrote new/policies/tests/examples.toml\n\
         next: edit them, check them with `remit policy test new/policies`, and serve them with `policies = \"new/policies\"` in remit.toml\n"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("new/policies/calls.cedar")).unwrap(),
        std::fs::read_to_string(repo_policies.join("calls.cedar")).unwrap()
    );
    let out = ok(d, &["policy", "validate", "new/policies"]);
    assert!(out.contains("policies valid against the schema"), "{out}");
    let out = ok(d, &["policy", "test", "new/policies"]);
    assert!(out.trim_end().ends_with(" passed, 0 failed"), "{out}");
    assert!(!out.contains("FAIL"), "{out}");

    // It never overwrites: a second run, or a directory that holds one of its files, is
    // refused before anything is written.
    std::fs::write(d.join("new/policies/calls.cedar"), "// mine\n").unwrap();
    let (status, _, stderr) = run_in(&["policy", "init", "new/policies"]);
    assert_eq!(
        (status, stderr.as_str()),
        (
            1,
            "error: `new/policies/remit.cedarschema` already exists, and `remit policy init` never overwrites a file\n\
             hint: choose a new directory, or move the existing files away\n"
        )
    );
    std::fs::create_dir(d.join("partial")).unwrap();
    std::fs::write(d.join("partial/tasks.cedar"), "// mine\n").unwrap();
    let (status, _, stderr) = run_in(&["policy", "init", "partial"]);
    assert_eq!(status, 1);
    assert!(
        stderr.starts_with("error: `partial/tasks.cedar` already exists"),
        "{stderr}"
    );
    assert!(!d.join("partial/remit.cedarschema").exists());
    assert_eq!(
        std::fs::read_to_string(d.join("new/policies/calls.cedar")).unwrap(),
        "// mine\n"
    );
}
