//! `remit demo`: the whole grant path against a fresh temporary store, through the real HTTP
//! API and the real call-path check, printing each step. It exits 0 only if every step
//! behaved as it should, so it doubles as a smoke test of a build.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use control::clock::{Clock, SystemClock};
use control::{Authority, CallAttempt, Grant, Operator, Settings};
use credentials::AgentKeyPair;
use model::{ActionClass, Decision};
use serde_json::{Value, json};

struct Steps {
    failed: usize,
    number: usize,
}

impl Steps {
    fn report(&mut self, ok: bool, title: &str, detail: &str) {
        self.number += 1;
        let mark = if ok { "ok  " } else { "FAIL" };
        println!("[{mark}] {:>2}. {title}", self.number);
        for line in detail.lines() {
            println!("           {line}");
        }
        if !ok {
            self.failed += 1;
        }
    }
}

pub async fn run() -> Result<ExitCode> {
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let store_url = format!("sqlite://{}", dir.path().join("remit.db").display());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot listen on loopback")?;
    let address = listener.local_addr()?;
    let mut settings = Settings::local(store_url.clone());
    settings.listen = address;
    settings.public_url = format!("http://{address}");
    let base = settings.public_url.clone();

    println!(
        "remit demo: a fresh store at {store_url}, the API at {base}, the built-in example policies\n"
    );
    let clock = Arc::new(SystemClock);
    let authority = Authority::open(settings, clock.clone())
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let app = control::api::router(Arc::clone(&authority));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let http = reqwest::Client::new();
    let mut steps = Steps {
        failed: 0,
        number: 0,
    };

    // An operator to drive the admin API.
    let (_, operator_token) = authority
        .create_operator(&Operator::local("demo"), "demo-admin", model::Role::Admin)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let admin = format!("Bearer {}", operator_token.expose());

    // 1. Register an agent with its own key and an accountable owner.
    let agent_key = AgentKeyPair::generate_p256().map_err(|e| anyhow!("{e}"))?;
    let response = http
        .post(format!("{base}/v1/agents"))
        .header("authorization", &admin)
        .json(&json!({ "name": "triage-bot", "owner": "alice@example.org", "keys": [agent_key.public().to_jwk()] }))
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await?;
    steps.report(
        status == 201,
        "register agent `triage-bot`, owned by alice@example.org",
        &format!(
            "POST /v1/agents -> {status}: {}",
            body["spiffe_id"].as_str().unwrap_or("?")
        ),
    );

    // 2. The agent asks for a task, proving its key with a DPoP proof.
    let scopes = json!([{ "tool": "github", "actions": ["read_issue", "create_issue"], "resources": ["acme/*"] }]);
    let proof = agent_key
        .sign_proof(
            "POST",
            &format!("{base}/v1/tasks"),
            None,
            clock.now(),
            &unique("grant"),
        )
        .map_err(|e| anyhow!("{e}"))?;
    let response = http
        .post(format!("{base}/v1/tasks"))
        .header("dpop", proof)
        .json(&json!({
            "agent": "triage-bot",
            "intent": "triage new issues in acme/api",
            "scopes": scopes,
            "ttl_seconds": 300,
            "budget": 20,
        }))
        .send()
        .await?;
    let status = response.status();
    if status != 201 {
        let body: Value = response.json().await.unwrap_or(Value::Null);
        steps.report(
            false,
            "grant a task",
            &format!("POST /v1/tasks -> {status}: {body}"),
        );
        return finish(steps, server);
    }
    let grant: Grant = response.json().await?;
    steps.report(
        true,
        "grant a task: github read_issue/create_issue on acme/*, 5 minutes, 20 calls",
        &format!(
            "POST /v1/tasks -> 201: task {} (token bound to the agent's key, expires in {} s)",
            grant.task_id, grant.expires_in
        ),
    );

    let check = |action: &'static str, class: ActionClass| {
        let authority = Arc::clone(&authority);
        let token = grant.token.expose().clone();
        let key = &agent_key;
        let url = format!("{base}/http/github/repos/acme/api/{action}");
        let proof = key.sign_proof("POST", &url, Some(&token), clock.now(), &unique(action));
        async move {
            let proof = proof.map_err(|e| anyhow!("{e}"))?;
            let attempt = CallAttempt {
                token: &token,
                proof: Some(&proof),
                bearer_allowed: false,
                method: "POST",
                url: &url,
                tool: "github",
                action,
                resource: "acme/api",
                class,
                sensitivity: &[],
                arguments: "{}",
                limiter: None,
            };
            Ok::<_, anyhow::Error>(authority.authorize(&attempt).await)
        }
    };

    // 3. A call inside the task's scope is allowed.
    let verdict = check("read_issue", ActionClass::Read).await?;
    steps.report(
        verdict.report.decision == Decision::Allow,
        "call github read_issue on acme/api",
        &format!(
            "{} ({}), audit #{}",
            verdict.report.decision.as_str(),
            verdict.message,
            verdict.audit_seq.unwrap_or(0)
        ),
    );

    // 4. A call outside it is denied, with the reason.
    let verdict = check("delete_repo", ActionClass::Admin).await?;
    steps.report(
        verdict.report.decision == Decision::Deny && verdict.code == "out_of_scope",
        "call github delete_repo on acme/api (not in the task's scopes)",
        &describe(&verdict),
    );

    // 5. An operator revokes the task.
    let response = http
        .post(format!("{base}/v1/revocations"))
        .header("authorization", &admin)
        .json(&json!({ "kind": "task", "target": grant.task_id, "reason": "demo: incident response" }))
        .send()
        .await?;
    let status = response.status();
    steps.report(
        status == 201,
        "revoke the task",
        &format!("POST /v1/revocations -> {status}"),
    );

    // 6. The very next call is denied.
    let verdict = check("read_issue", ActionClass::Read).await?;
    steps.report(
        verdict.report.decision == Decision::Deny && verdict.code == "revoked",
        "call github read_issue again, right after the revocation",
        &describe(&verdict),
    );

    // 7. The audit chain verifies and holds every step.
    let response = http
        .get(format!("{base}/v1/audit/verify"))
        .header("authorization", &admin)
        .send()
        .await?;
    let report: Value = response.json().await?;
    let ok = report["ok"] == Value::Bool(true);
    let events = http
        .get(format!("{base}/v1/audit?limit=1000"))
        .header("authorization", &admin)
        .send()
        .await?
        .json::<Value>()
        .await?;
    let kinds: Vec<String> = events["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .filter_map(|e| e["kind"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    steps.report(
        ok,
        "verify the hash-chained audit log",
        &format!(
            "{} events intact, head {}\n{}",
            report["checked"],
            report["head"].as_str().unwrap_or("?"),
            kinds.join(" -> ")
        ),
    );
    finish(steps, server)
}

fn finish(steps: Steps, server: tokio::task::JoinHandle<std::io::Result<()>>) -> Result<ExitCode> {
    server.abort();
    println!();
    if steps.failed > 0 {
        bail!("{} of {} steps did not behave", steps.failed, steps.number);
    }
    println!("every step behaved: {} of {}", steps.number, steps.number);
    Ok(ExitCode::SUCCESS)
}

/// One line for a verdict: decision, message, code.
fn describe(verdict: &control::CallVerdict) -> String {
    format!(
        "{}: {} ({})",
        verdict.report.decision.as_str(),
        verdict.message,
        verdict.code
    )
}

/// A proof `jti` unique to this run.
fn unique(label: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("demo-{label}-{}-{n}", std::process::id())
}
