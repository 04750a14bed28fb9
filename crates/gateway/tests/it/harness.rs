//! A running remit (control plane and gateway on one loopback port) with a fresh SQLite
//! store, and helpers to act as an agent: keys, task grants, proofs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use control::clock::{Clock, SystemClock};
use control::{Authority, Grant, Operator, Settings, TaskRequest};
use credentials::AgentKeyPair;
use gateway::{Catalog, Gateway, Limits, RawTool};
use serde_json::{Value, json};

pub struct Remit {
    /// `http://127.0.0.1:PORT`, also the public URL (token audience, proof `htu` base).
    pub base: String,
    pub authority: Arc<Authority>,
    pub gateway: Arc<Gateway>,
    pub admin: Operator,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

pub struct Agent {
    pub name: String,
    pub key: AgentKeyPair,
}

pub fn unique(label: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!("{label}-{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Parses `[[tools]]` declarations with `env` standing in for the process environment.
pub fn catalog(tools_toml: &str, env: &[(&str, &str)]) -> Catalog {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        tools: Vec<RawTool>,
    }
    let file: File = toml::from_str(tools_toml).unwrap();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Catalog::from_raw_with(&file.tools, &|name| {
        env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    })
    .unwrap()
}

impl Remit {
    pub async fn start(tools_toml: &str, env: &[(&str, &str)]) -> Remit {
        Remit::start_with(tools_toml, env, Limits::default(), None).await
    }

    /// With the default containment rules on (quarantine on off-script behaviour).
    pub async fn start_contained(tools_toml: &str, env: &[(&str, &str)]) -> Remit {
        Remit::start_inner(tools_toml, env, Limits::default(), None, true, |_| {}).await
    }

    /// With explicit rate limits and, optionally, a store URL (default: a fresh SQLite file).
    pub async fn start_with(
        tools_toml: &str,
        env: &[(&str, &str)],
        limits: Limits,
        store_url: Option<String>,
    ) -> Remit {
        Remit::start_inner(tools_toml, env, limits, store_url, false, |_| {}).await
    }

    /// On `store_url` (default: a fresh SQLite file), with settings adjusted by `adjust`.
    pub async fn start_configured(
        tools_toml: &str,
        env: &[(&str, &str)],
        store_url: Option<String>,
        adjust: impl FnOnce(&mut Settings),
    ) -> Remit {
        Remit::start_inner(tools_toml, env, Limits::default(), store_url, false, adjust).await
    }

    async fn start_inner(
        tools_toml: &str,
        env: &[(&str, &str)],
        limits: Limits,
        store_url: Option<String>,
        contained: bool,
        adjust: impl FnOnce(&mut Settings),
    ) -> Remit {
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let store_url = store_url
            .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("remit.db").display()));
        let mut settings = Settings::local(store_url);
        settings.listen = address;
        settings.public_url = format!("http://{address}");
        settings.store_timeout = std::time::Duration::from_millis(500);
        // Most of these tests exercise one check at a time, and containment would quarantine
        // their agent after a stolen proof or a dead token; `start_contained` keeps it on.
        if !contained {
            settings.containment = control::containment::ContainmentRules {
                max_denials: 0,
                unknown_tool: false,
                dead_token: false,
                wrong_key: false,
                ..Default::default()
            };
        }
        adjust(&mut settings);
        let base = settings.public_url.clone();
        let authority = Authority::open(settings, Arc::new(SystemClock))
            .await
            .unwrap();
        let gateway =
            Gateway::new(Arc::clone(&authority), catalog(tools_toml, env), limits).unwrap();
        let app = control::api::router(Arc::clone(&authority))
            .merge(gateway::router(Arc::clone(&gateway)));
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Remit {
            base,
            authority,
            gateway,
            admin: Operator::local("test"),
            server,
            _dir: dir,
        }
    }

    pub fn now(&self) -> i64 {
        SystemClock.now()
    }

    pub async fn agent(&self, name: &str) -> Agent {
        let key = AgentKeyPair::generate_p256().unwrap();
        self.authority
            .register_agent(
                &self.admin,
                name,
                "alice@example.org",
                &[key.public().to_jwk()],
            )
            .await
            .unwrap();
        Agent {
            name: name.to_string(),
            key,
        }
    }

    /// A task with these scopes (a JSON array of `{tool, actions, resources}`).
    pub async fn grant(&self, agent: &Agent, scopes: Value) -> Grant {
        self.grant_request(agent, json!({ "scopes": scopes })).await
    }

    /// A task with these scopes and a budget of `budget` calls.
    pub async fn grant_with_budget(&self, agent: &Agent, scopes: Value, budget: u32) -> Grant {
        self.grant_request(agent, json!({ "scopes": scopes, "budget": budget }))
            .await
    }

    /// A task for `agent` with the fields of `fields` (scopes, budget, …) in its request.
    async fn grant_request(&self, agent: &Agent, fields: Value) -> Grant {
        let proof = agent
            .key
            .sign_proof(
                "POST",
                &format!("{}/v1/tasks", self.base),
                None,
                self.now(),
                &unique("grant"),
            )
            .unwrap();
        let mut request = json!({ "agent": agent.name, "intent": "gateway test" });
        if let (Some(request), Value::Object(fields)) = (request.as_object_mut(), fields) {
            request.extend(fields);
        }
        let request: TaskRequest = serde_json::from_value(request).unwrap();
        self.authority
            .request_task(Some(&proof), request)
            .await
            .unwrap()
    }

    /// A fresh proof for one request (`url` without query string).
    pub fn proof(&self, agent: &Agent, method: &str, url: &str, grant: &Grant) -> String {
        agent
            .key
            .sign_proof(
                method,
                url,
                Some(grant.token.expose()),
                self.now(),
                &unique("call"),
            )
            .unwrap()
    }
}

impl Drop for Remit {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Sends `chunks` as a body without a declared length (HTTP/1.1 chunked transfer encoding,
/// which reqwest cannot send without its streaming feature) and returns the answer's status,
/// headers and body.
pub async fn send_chunked(
    method: &str,
    url: &str,
    headers: &[(&str, String)],
    chunks: Vec<bytes::Bytes>,
) -> (u16, http::HeaderMap, bytes::Bytes) {
    use http_body_util::BodyExt;
    let frames = futures::stream::iter(
        chunks
            .into_iter()
            .map(|chunk| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(chunk))),
    );
    let mut request = http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let request = request
        .body(http_body_util::StreamBody::new(frames))
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let response = client.request(request).await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

/// The `call.decision` events of `task`, oldest first.
pub async fn decisions(remit: &Remit, task: &str) -> Vec<audit::Event> {
    let filter = store::AuditFilter {
        task: Some(task.to_string()),
        limit: 1000,
        ..Default::default()
    };
    remit
        .authority
        .store()
        .query_events(&filter)
        .await
        .unwrap()
        .into_iter()
        .filter(|event| event.body.kind == audit::kinds::CALL_DECISION)
        .collect()
}
