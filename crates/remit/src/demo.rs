//! `remit demo`: the whole story against a fresh temporary store, through the real HTTP API
//! and the real gateway in front of a real (local) upstream, printing each step. It exits 0
//! only if every step behaved as it should, so it doubles as a smoke test of a build.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use control::clock::{Clock, SystemClock};
use control::{Authority, Grant, Operator, Settings};
use credentials::AgentKeyPair;
use parking_lot::Mutex;
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

/// What the demo's upstream saw: one line per request, with the credential it was sent.
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// A stand-in for an issue tracker's API: answers every request with a small JSON document and
/// remembers the request line and `Authorization` header it got.
async fn start_upstream(seen: Seen) -> Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot listen on loopback")?;
    let address = listener.local_addr()?;
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let seen = Arc::clone(&seen);
        async move {
            let authorization = request
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            seen.lock().push((
                format!("{} {}", request.method(), request.uri()),
                authorization,
            ));
            axum::Json(json!({ "issues": [{ "number": 7, "title": "login page is slow" }] }))
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(address)
}

fn demo_tools(upstream: std::net::SocketAddr) -> Result<Vec<gateway::RawTool>> {
    #[derive(serde::Deserialize)]
    struct File {
        tools: Vec<gateway::RawTool>,
    }
    let text = format!(
        r#"
[[tools]]
name = "github"
kind = "http"
upstream = "http://{upstream}"
auth = {{ bearer = "env:DEMO_GITHUB_TOKEN" }}
routes = [
  {{ method = "GET", path = "/repos/{{owner}}/{{repo}}/issues", action = "list_issues", class = "read", resource = "{{owner}}/{{repo}}" }},
  {{ method = "DELETE", path = "/repos/{{owner}}/{{repo}}", action = "delete_repo", class = "admin", resource = "{{owner}}/{{repo}}" }},
]
"#
    );
    Ok(toml::from_str::<File>(&text)?.tools)
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

    let seen: Seen = Arc::default();
    let upstream = start_upstream(Arc::clone(&seen)).await?;
    // The upstream credential exists only inside remit: the agent never receives it.
    let upstream_secret = format!("ghp_demo_{}", std::process::id());
    let catalog = gateway::Catalog::from_raw_with(&demo_tools(upstream)?, &|name| {
        (name == "DEMO_GITHUB_TOKEN").then(|| upstream_secret.clone())
    })?;

    println!(
        "remit demo: a fresh store at {store_url}, remit at {base}, an issue tracker at http://{upstream},"
    );
    println!("the built-in example policies\n");
    let clock = Arc::new(SystemClock);
    let authority = Authority::open(settings, clock.clone())
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let gateway =
        gateway::Gateway::new(Arc::clone(&authority), catalog, gateway::Limits::default())
            .map_err(|e| anyhow!("{e}"))?;
    let app = control::api::router(Arc::clone(&authority)).merge(gateway::router(gateway));
    let server = tokio::spawn(crate::server::serve(
        listener,
        app,
        crate::server::ServerLimits::default(),
        std::future::pending(),
    ));
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
            "scopes": [{ "tool": "github", "actions": ["list_issues"], "resources": ["acme/*"] }],
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
        "grant a task: github list_issues on acme/*, 5 minutes, 20 calls",
        &format!(
            "POST /v1/tasks -> 201: task {} (token bound to the agent's key, expires in {} s)",
            grant.task_id, grant.expires_in
        ),
    );

    // Every call goes through the gateway with the task token and a fresh proof.
    let call = |method: reqwest::Method, path: &'static str| {
        let url = format!("{base}{path}");
        let proof = agent_key.sign_proof(
            method.as_str(),
            &url,
            Some(grant.token.expose()),
            clock.now(),
            &unique("call"),
        );
        let request = http
            .request(method, &url)
            .header("authorization", format!("DPoP {}", grant.token.expose()));
        async move {
            let response = request
                .header("dpop", proof.map_err(|e| anyhow!("{e}"))?)
                .send()
                .await?;
            let status = response.status();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            Ok::<_, anyhow::Error>((status, body))
        }
    };

    // 3. A call inside the task's scope reaches the upstream, with remit's credential.
    let (status, body) = call(reqwest::Method::GET, "/http/github/repos/acme/api/issues").await?;
    let injected = seen
        .lock()
        .last()
        .is_some_and(|(_, auth)| *auth == format!("Bearer {upstream_secret}"));
    steps.report(
        status == 200 && injected,
        "GET /http/github/repos/acme/api/issues (list_issues, inside the scope)",
        &format!(
            "{status}: {body}\nthe upstream got `Authorization: Bearer ghp_demo_…` from remit; the agent never held it"
        ),
    );

    // 4. A call outside it is refused, and the upstream never hears of it.
    let before = seen.lock().len();
    let (status, body) = call(reqwest::Method::DELETE, "/http/github/repos/acme/api").await?;
    steps.report(
        status == 403 && body["error"] == "out_of_scope" && seen.lock().len() == before,
        "DELETE /http/github/repos/acme/api (delete_repo, not in the task's scopes)",
        &format!(
            "{status}: {}\nthe upstream received nothing",
            body["message"].as_str().unwrap_or("?")
        ),
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

    // 6. The very next call is refused; a call racing a revocation is not off-script, so
    // the agent stays active (containment's grace period for dead tokens).
    let (status, body) = call(reqwest::Method::GET, "/http/github/repos/acme/api/issues").await?;
    let agent: Value = http
        .get(format!("{base}/v1/agents/triage-bot"))
        .header("authorization", &admin)
        .send()
        .await?
        .json()
        .await?;
    let agent_status = agent["status"].as_str().unwrap_or("?").to_string();
    steps.report(
        status == 401
            && body["error"] == "revoked"
            && seen.lock().len() == before
            && agent_status == "active",
        "GET /http/github/repos/acme/api/issues again, right after the revocation",
        &format!(
            "{status}: {} ({})\nagent `triage-bot` is still {agent_status}: a call racing a revocation is refused, not quarantined",
            body["message"].as_str().unwrap_or("?"),
            body["error"].as_str().unwrap_or("?")
        ),
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
    let log = events.to_string();
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
        ok && !log.contains(&upstream_secret) && !log.contains(grant.token.expose()),
        "verify the hash-chained audit log (and that it holds no secret)",
        &format!(
            "{} events intact, head {}\n{}",
            report["checked"],
            report["head"].as_str().unwrap_or("?"),
            kinds.join(" -> ")
        ),
    );
    finish(steps, server)
}

fn finish(steps: Steps, server: tokio::task::JoinHandle<()>) -> Result<ExitCode> {
    server.abort();
    println!();
    if steps.failed > 0 {
        bail!("{} of {} steps did not behave", steps.failed, steps.number);
    }
    println!("every step behaved: {} of {}", steps.number, steps.number);
    Ok(ExitCode::SUCCESS)
}

/// A proof `jti` unique to this run.
fn unique(label: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("demo-{label}-{}-{n}", std::process::id())
}
