//! MCP through the gateway: a real MCP server (rmcp's streamable HTTP service, on loopback)
//! behind remit, and an agent speaking MCP JSON-RPC over HTTP with a fresh DPoP proof on every
//! request. Answers are parsed with rmcp's model types, so they must be valid MCP.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::middleware::Next;
use control::Grant;
use http_body_util::BodyExt;
use parking_lot::Mutex;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, GetPromptRequestParams,
    GetPromptResponse, GetPromptResult, ListPromptsResult, ListResourcesResult, ListToolsResult,
    PaginatedRequestParams, ReadResourceRequestParams, ReadResourceResponse, ReadResourceResult,
    ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::{Value, json};

use crate::harness::{Agent, Remit};

pub(crate) const SECRET: &str = "sk-upstream-4f9a1c";

/// What the MCP server saw of one HTTP request.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub(crate) authorization: Option<String>,
    pub(crate) dpop: bool,
    session: Option<String>,
    pub(crate) body: String,
}

/// A small file server: three tools of three classes, a resource, a prompt, and a tool that
/// echoes the HTTP headers it received.
#[derive(Clone)]
struct Files;

fn model<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).unwrap()
}

impl ServerHandler for Files {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(model::<ServerCapabilities>(
            json!({ "tools": {}, "resources": {}, "prompts": {} }),
        ))
    }

    async fn list_tools(
        &self,
        _: Option<PaginatedRequestParams>,
        _: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let schema = json!({ "type": "object", "properties": { "path": { "type": "string" } } });
        let tools: Vec<Value> = ["read_file", "write_file", "delete_all", "echo_headers"]
            .iter()
            .map(|name| json!({ "name": name, "description": format!("{name} on the test server"), "inputSchema": schema }))
            .collect();
        Ok(model(json!({ "tools": tools })))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let text = match request.name.as_ref() {
            "echo_headers" => {
                let parts = context.extensions.get::<http::request::Parts>().unwrap();
                parts
                    .headers
                    .iter()
                    .map(|(name, value)| format!("{name}: {}\n", value.to_str().unwrap_or("?")))
                    .collect()
            }
            name => {
                let path = request
                    .arguments
                    .as_ref()
                    .and_then(|a| a.get("path"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                format!("{name} {path}: done")
            }
        };
        Ok(CallToolResult::success(vec![ContentBlock::text(text)]).into())
    }

    async fn list_resources(
        &self,
        _: Option<PaginatedRequestParams>,
        _: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        Ok(model(
            json!({ "resources": [{ "uri": "file:///notes.txt", "name": "notes" }] }),
        ))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let result: ReadResourceResult =
            model(json!({ "contents": [{ "uri": request.uri, "text": "the notes" }] }));
        Ok(result.into())
    }

    async fn list_prompts(
        &self,
        _: Option<PaginatedRequestParams>,
        _: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, ErrorData> {
        Ok(model(json!({ "prompts": [{ "name": "summarize" }] })))
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        _: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, ErrorData> {
        let result: GetPromptResult = model(
            json!({ "messages": [{ "role": "user", "content": { "type": "text", "text": format!("prompt {}", request.name) } }] }),
        );
        Ok(result.into())
    }
}

pub(crate) struct Upstream {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    /// `json`: answer POSTs with `application/json` (stateless) instead of SSE with sessions.
    async fn start(json: bool) -> Upstream {
        let mut config = StreamableHttpServerConfig::default();
        config.legacy_session_mode = !json;
        config.json_response = json;
        let service: StreamableHttpService<Files, LocalSessionManager> =
            StreamableHttpService::new(|| Ok(Files), Default::default(), config);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let app =
            axum::Router::new()
                .nest_service("/mcp", service)
                .layer(axum::middleware::from_fn(
                    move |request: Request, next: Next| {
                        let record = Arc::clone(&record);
                        async move {
                            let (parts, body) = request.into_parts();
                            let bytes = body.collect().await.unwrap().to_bytes();
                            let header = |name: &str| {
                                parts
                                    .headers
                                    .get(name)
                                    .map(|v| v.to_str().unwrap().to_string())
                            };
                            record.lock().push(Seen {
                                authorization: header("authorization"),
                                dpop: parts.headers.contains_key("dpop"),
                                session: header("mcp-session-id"),
                                body: String::from_utf8_lossy(&bytes).into_owned(),
                            });
                            next.run(Request::from_parts(parts, Body::from(bytes)))
                                .await
                        }
                    },
                ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Upstream {
            url: format!("http://{address}/mcp"),
            seen,
        }
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.seen.lock().clone()
    }

    pub(crate) fn saw(&self, text: &str) -> bool {
        self.seen().iter().any(|seen| seen.body.contains(text))
    }
}

fn tools_toml(upstream: &Upstream) -> String {
    format!(
        r#"
[[tools]]
name = "vault"
kind = "mcp"
upstream = "{}"
auth = {{ bearer = "env:VAULT_TOKEN" }}
mcp_tools = {{ read_file = {{ class = "read", resource = "path" }}, write_file = "write", delete_all = "admin", echo_headers = "read" }}
"#,
        upstream.url
    )
}

/// An agent's MCP session through remit.
struct Session<'a> {
    remit: &'a Remit,
    agent: &'a Agent,
    grant: Grant,
    url: String,
    http: reqwest::Client,
    session: Option<String>,
    next_id: i64,
}

/// One answer: HTTP status, content type, and the JSON-RPC messages it carried.
struct Answer {
    status: u16,
    content_type: String,
    session: Option<String>,
    messages: Vec<Value>,
    headers: reqwest::header::HeaderMap,
}

impl Answer {
    /// The message answering `id`.
    fn reply(&self, id: i64) -> &Value {
        self.messages
            .iter()
            .find(|m| m["id"] == json!(id))
            .unwrap_or_else(|| panic!("no answer to {id} in {:?}", self.messages))
    }
}

impl<'a> Session<'a> {
    async fn open(remit: &'a Remit, agent: &'a Agent, actions: &[&str]) -> Session<'a> {
        let grant = remit
            .grant(agent, json!([{ "tool": "vault", "actions": actions }]))
            .await;
        Session {
            remit,
            agent,
            grant,
            url: format!("{}/mcp/vault", remit.base),
            http: reqwest::Client::new(),
            session: None,
            next_id: 1,
        }
    }

    fn request(&self, method: reqwest::Method) -> reqwest::RequestBuilder {
        let proof = self
            .remit
            .proof(self.agent, method.as_str(), &self.url, &self.grant);
        let mut request = self
            .http
            .request(method, &self.url)
            .header(
                "authorization",
                format!("DPoP {}", self.grant.token.expose()),
            )
            .header("dpop", proof)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2025-06-18");
        if let Some(session) = &self.session {
            request = request.header("mcp-session-id", session);
        }
        request
    }

    async fn post(&mut self, body: &Value) -> Answer {
        let response = self
            .request(reqwest::Method::POST)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let answer = read(response, body).await;
        if let Some(session) = &answer.session {
            self.session = Some(session.clone());
        }
        answer
    }

    /// Sends one request and returns its answer (`result` or `error`).
    async fn rpc(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let answer = self
            .post(&json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }))
            .await;
        assert_eq!(answer.status, 200, "{method}: {:?}", answer.messages);
        answer.reply(id).clone()
    }

    async fn initialize(&mut self) -> Answer {
        let answer = self
            .post(&json!({ "jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": { "name": "remit-test", "version": "1.0" } } }))
            .await;
        assert_eq!(answer.status, 200, "{:?}", answer.messages);
        let initialized: ServerConfig = model(answer.reply(0)["result"].clone());
        assert!(initialized.capabilities.tools.is_some());
        let notified = self
            .post(&json!({ "jsonrpc": "2.0", "method": "notifications/initialized" }))
            .await;
        assert_eq!(notified.status, 202);
        answer
    }

    async fn tool_names(&mut self) -> Vec<String> {
        let listed: ListToolsResult =
            model(self.rpc("tools/list", json!({})).await["result"].clone());
        listed
            .tools
            .iter()
            .map(|tool| tool.name.to_string())
            .collect()
    }

    async fn call(&mut self, name: &str, arguments: Value) -> Value {
        self.rpc(
            "tools/call",
            json!({ "name": name, "arguments": arguments }),
        )
        .await
    }
}

/// Reads a JSON or SSE answer; an SSE answer is read until every request in `sent` has its
/// reply (the stream may stay open).
async fn read(mut response: reqwest::Response, sent: &Value) -> Answer {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let content_type = headers
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let session = headers
        .get("mcp-session-id")
        .map(|v| v.to_str().unwrap().to_string());
    let ids: Vec<Value> = match sent {
        Value::Array(items) => items.iter().filter_map(|m| m.get("id").cloned()).collect(),
        message => message.get("id").cloned().into_iter().collect(),
    };
    let mut messages = Vec::new();
    if content_type.starts_with("text/event-stream") {
        let mut text = String::new();
        while !ids
            .iter()
            .all(|id| messages.iter().any(|m: &Value| &m["id"] == id))
        {
            let Some(chunk) = response.chunk().await.unwrap() else {
                break;
            };
            text.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = text.find("\n\n") {
                let event: String = text.drain(..end + 2).collect();
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if !data.is_empty() && !data.join("").is_empty() {
                    messages.push(serde_json::from_str(&data.join("\n")).unwrap());
                }
            }
        }
    } else {
        let bytes = response.bytes().await.unwrap();
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Array(items)) => messages = items,
            Ok(value) => messages.push(value),
            Err(_) => {}
        }
    }
    Answer {
        status,
        content_type,
        session,
        messages,
        headers,
    }
}

pub(crate) async fn setup(json: bool) -> (Upstream, Remit) {
    let upstream = Upstream::start(json).await;
    let remit = Remit::start(&tools_toml(&upstream), &[("VAULT_TOKEN", SECRET)]).await;
    (upstream, remit)
}

#[tokio::test]
async fn the_tool_list_is_filtered_and_an_allowed_call_passes_over_sse_with_its_session() {
    let (upstream, remit) = setup(false).await;
    let agent = remit.agent(&crate::harness::unique("reader")).await;
    let mut session = Session::open(&remit, &agent, &["read_file"]).await;
    let initialized = session.initialize().await;
    assert!(
        initialized.content_type.starts_with("text/event-stream"),
        "{}",
        initialized.content_type
    );
    let session_id = initialized
        .session
        .clone()
        .expect("the MCP server's session id reaches the agent");

    assert_eq!(session.tool_names().await, ["read_file"]);
    let called = session
        .call("read_file", json!({ "path": "notes.txt" }))
        .await;
    let result: CallToolResult = model(called["result"].clone());
    assert_eq!(
        result.content[0].as_text().unwrap().text,
        "read_file notes.txt: done"
    );

    let seen = upstream.seen();
    assert_eq!(
        seen.len(),
        4,
        "initialize, initialized, tools/list, tools/call: {seen:?}"
    );
    for request in &seen {
        assert_eq!(
            request.authorization.as_deref(),
            Some(format!("Bearer {SECRET}").as_str()),
            "remit injects the upstream credential"
        );
        assert!(!request.dpop, "the agent's proof stays with remit");
    }
    assert!(
        seen[1..]
            .iter()
            .all(|request| request.session.as_deref() == Some(session_id.as_str())),
        "the session id travels back up"
    );
}

#[tokio::test]
async fn json_answers_are_filtered_too() {
    let (_upstream, remit) = setup(true).await;
    let agent = remit.agent(&crate::harness::unique("reader")).await;
    let mut session = Session::open(&remit, &agent, &["read_file", "write_file"]).await;
    let initialized = session.initialize().await;
    assert!(
        initialized.content_type.starts_with("application/json"),
        "{}",
        initialized.content_type
    );
    assert_eq!(session.tool_names().await, ["read_file", "write_file"]);
}

#[tokio::test]
async fn a_call_outside_the_scopes_is_a_json_rpc_error_the_server_never_sees() {
    let (upstream, remit) = setup(false).await;
    let agent = remit.agent(&crate::harness::unique("reader")).await;
    let mut session = Session::open(&remit, &agent, &["read_file"]).await;
    session.initialize().await;
    let denied = session
        .call("write_file", json!({ "path": "notes.txt" }))
        .await;
    assert_eq!(denied["error"]["code"], -32003, "{denied}");
    assert_eq!(denied["error"]["data"]["error"], "out_of_scope");
    assert!(
        denied["error"]["message"]
            .as_str()
            .unwrap()
            .contains("outside the task's scopes"),
        "{denied}"
    );
    assert!(!upstream.saw("write_file"));
}

#[tokio::test]
async fn a_call_policy_denies_carries_its_policies_and_reasons() {
    let (upstream, remit) = setup(false).await;
    let agent = remit.agent(&crate::harness::unique("admin")).await;
    let mut session = Session::open(&remit, &agent, &["read_file", "delete_all"]).await;
    session.initialize().await;
    let denied = session.call("delete_all", json!({})).await;
    assert_eq!(denied["error"]["code"], -32003, "{denied}");
    assert_eq!(denied["error"]["data"]["error"], "approval_required");
    assert_eq!(
        denied["error"]["data"]["policies"],
        json!(["call.approve-identity"])
    );
    assert!(
        !denied["error"]["data"]["reasons"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(!upstream.saw("delete_all"));
    // Listing filters by scope only: a tool policy may still refuse stays listed.
    assert_eq!(session.tool_names().await, ["read_file", "delete_all"]);
}

#[tokio::test]
async fn resources_and_prompts_are_decided_per_item() {
    let (upstream, remit) = setup(false).await;
    let agent = remit.agent(&crate::harness::unique("reader")).await;
    let mut session = Session::open(&remit, &agent, &["resources/read"]).await;
    session.initialize().await;
    let listed: ListResourcesResult =
        model(session.rpc("resources/list", json!({})).await["result"].clone());
    assert_eq!(listed.resources.len(), 1);
    let read = session
        .rpc("resources/read", json!({ "uri": "file:///notes.txt" }))
        .await;
    let read: ReadResourceResult = model(read["result"].clone());
    assert_eq!(read.contents.len(), 1);
    let prompt = session
        .rpc("prompts/get", json!({ "name": "summarize" }))
        .await;
    assert_eq!(prompt["error"]["data"]["error"], "out_of_scope", "{prompt}");
    assert!(!upstream.saw("prompts/get"));
}

#[tokio::test]
async fn the_upstream_credential_never_reaches_the_agent() {
    let (upstream, remit) = setup(false).await;
    let agent = remit.agent(&crate::harness::unique("reader")).await;
    let mut session = Session::open(&remit, &agent, &["echo_headers"]).await;
    session.initialize().await;
    let echoed = session.call("echo_headers", json!({})).await;
    let text = echoed.to_string();
    assert!(
        upstream
            .seen()
            .iter()
            .any(|s| s.body.contains("echo_headers")),
        "the call reached the server"
    );
    assert!(text.contains("authorization: [redacted]"), "{text}");
    assert!(!text.contains(SECRET), "{text}");
    assert!(
        !text.contains("dpop"),
        "the agent's proof was not forwarded: {text}"
    );
}

#[tokio::test]
async fn json_answers_never_carry_the_upstream_credential_either() {
    let (_upstream, remit) = setup(true).await;
    let agent = remit.agent(&crate::harness::unique("reader")).await;
    let mut session = Session::open(&remit, &agent, &["echo_headers", "read_file"]).await;
    session.initialize().await;
    // Escaped newlines around it: the answer is parsed, scrubbed and written again.
    let echoed = session.call("echo_headers", json!({})).await.to_string();
    assert!(echoed.contains("authorization: [redacted]"), "{echoed}");
    assert!(!echoed.contains(SECRET), "{echoed}");
    // Nothing escaped anywhere in the answer: only the credential sends it the careful way.
    let read = session.call("read_file", json!({ "path": SECRET })).await;
    assert_eq!(
        read["result"]["content"][0]["text"], "read_file [redacted]: done",
        "{read}"
    );
    // An answer that needs nothing arrives whole.
    let read = session
        .call("read_file", json!({ "path": "notes.txt" }))
        .await;
    assert_eq!(
        read["result"]["content"][0]["text"], "read_file notes.txt: done",
        "{read}"
    );
}

#[tokio::test]
async fn revocation_between_two_calls_denies_the_second() {
    let (upstream, remit) = setup(false).await;
    let agent = remit.agent(&crate::harness::unique("reader")).await;
    let mut session = Session::open(&remit, &agent, &["read_file"]).await;
    session.initialize().await;
    session.call("read_file", json!({ "path": "a" })).await;
    remit
        .authority
        .revoke(
            &remit.admin,
            store::RevocationKind::Task,
            session.grant.task_id.as_ref(),
            "test",
        )
        .await
        .unwrap();
    let answer = session.post(&json!({ "jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": { "name": "read_file", "arguments": { "path": "b" } } })).await;
    assert_eq!(answer.status, 401);
    assert_eq!(answer.messages[0]["error"], "revoked");
    assert!(
        answer
            .headers
            .get("www-authenticate")
            .unwrap()
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );
    assert!(!upstream.saw("\"b\""));
}

#[tokio::test]
async fn a_request_without_a_token_gets_401_pointing_at_the_metadata() {
    let (upstream, remit) = setup(false).await;
    let response = reqwest::Client::new()
        .post(format!("{}/mcp/vault", remit.base))
        .header("content-type", "application/json")
        .body(json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/list" }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let challenge = response
        .headers()
        .get("www-authenticate")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(challenge.starts_with("DPoP "), "{challenge}");
    assert!(
        challenge.contains(&format!(
            "resource_metadata=\"{}/.well-known/oauth-protected-resource\"",
            remit.base
        )),
        "{challenge}"
    );
    assert!(challenge.contains(remit.gateway.resource_metadata_url()));
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn a_proof_is_spent_by_one_request() {
    let (upstream, remit) = setup(false).await;
    let agent = remit.agent(&crate::harness::unique("reader")).await;
    let session = Session::open(&remit, &agent, &["read_file"]).await;
    let proof = remit.proof(&agent, "POST", &session.url, &session.grant);
    let ping = json!({ "jsonrpc": "2.0", "id": 1, "method": "ping" }).to_string();
    let send = || {
        session
            .http
            .post(&session.url)
            .header(
                "authorization",
                format!("DPoP {}", session.grant.token.expose()),
            )
            .header("dpop", &proof)
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .body(ping.clone())
            .send()
    };
    let first = send().await.unwrap();
    assert_ne!(first.status(), 401);
    let replayed = send().await.unwrap();
    assert_eq!(replayed.status(), 401);
    assert_eq!(
        replayed.json::<Value>().await.unwrap()["error"],
        "proof_replayed"
    );
    assert_eq!(upstream.seen().len(), 1);
}

#[tokio::test]
async fn a_batch_of_two_calls_is_refused_without_reaching_the_server() {
    let (upstream, remit) = setup(false).await;
    let agent = remit.agent(&crate::harness::unique("reader")).await;
    let mut session = Session::open(&remit, &agent, &["read_file"]).await;
    session.initialize().await;
    let call = |id: i64| json!({ "jsonrpc": "2.0", "id": id, "method": "tools/call", "params": { "name": "read_file", "arguments": { "path": "x" } } });
    let answer = session.post(&json!([call(21), call(22)])).await;
    assert_eq!(answer.status, 200);
    for id in [21, 22] {
        let reply = answer.reply(id);
        assert_eq!(reply["error"]["code"], -32600, "{reply}");
        assert!(
            reply["error"]["message"]
                .as_str()
                .unwrap()
                .contains("batches of calls are not supported")
        );
    }
    assert!(
        !upstream
            .seen()
            .iter()
            .any(|s| s.body.contains("tools/call"))
    );
    // Nothing in it passed: recorded as a refusal, not as an allowed session message.
    let decided = decided(&session).await;
    let (action, code, detail) = decided.last().unwrap();
    assert_eq!(
        (action.as_str(), code.as_str()),
        ("batch:tools/call", "invalid_request")
    );
    assert!(detail.get("check").is_none(), "{detail}");
}

/// The `call.decision` events of the session's task, each as (action, code, detail).
async fn decided(session: &Session<'_>) -> Vec<(String, String, Value)> {
    crate::harness::decisions(session.remit, session.grant.task_id.as_str())
        .await
        .into_iter()
        .map(|event| {
            assert_eq!(
                event.body.agent.as_deref(),
                Some(session.grant.spiffe_id.as_str()),
                "{event:?}"
            );
            let detail = event.body.detail.to_value();
            let field = |name: &str| detail[name].as_str().unwrap_or_default().to_string();
            (field("action"), field("code"), detail)
        })
        .collect()
}

#[tokio::test]
async fn a_tool_call_without_an_id_is_decided_as_the_call_it_is() {
    let (upstream, remit) = setup(false).await;
    let agent = remit.agent(&crate::harness::unique("reader")).await;
    let mut session = Session::open(&remit, &agent, &["read_file"]).await;
    // `notifications/initialized` (no id) still passes on the caller's authentication alone.
    session.initialize().await;
    assert!(upstream.saw("notifications/initialized"));

    // Out of scope, shaped as a notification: refused, answered at the HTTP level with an
    // id-less JSON-RPC error, and never forwarded.
    let denied = session
        .post(&json!({ "jsonrpc": "2.0", "method": "tools/call", "params": { "name": "write_file", "arguments": { "path": "x" } } }))
        .await;
    assert_eq!(denied.status, 403, "{:?}", denied.messages);
    let error = &denied.messages[0];
    assert_eq!(error["id"], Value::Null, "{error}");
    assert_eq!(error["error"]["code"], -32003, "{error}");
    assert_eq!(error["error"]["data"]["error"], "out_of_scope", "{error}");
    assert!(!upstream.saw("write_file"));

    // In scope, shaped as a notification: decided as the call, then forwarded.
    let allowed = session
        .post(&json!({ "jsonrpc": "2.0", "method": "tools/call", "params": { "name": "read_file", "arguments": { "path": "quiet.txt" } } }))
        .await;
    assert!(
        !matches!(allowed.status, 401 | 403 | 429),
        "{}: {:?}",
        allowed.status,
        allowed.messages
    );
    assert!(upstream.saw("quiet.txt"), "the allowed call was forwarded");

    let decided = decided(&session).await;
    let find = |action: &str| {
        decided
            .iter()
            .find(|(a, _, _)| a == action)
            .unwrap_or_else(|| panic!("no decision on `{action}` in {decided:?}"))
    };
    let (_, code, detail) = find("write_file");
    assert_eq!(code, "out_of_scope");
    assert_eq!(detail["class"], "write", "{detail}");
    assert!(
        detail.get("check").is_none(),
        "a call, not a session check: {detail}"
    );
    let (_, code, detail) = find("read_file");
    assert_eq!(code, "allowed");
    assert_eq!(detail["resource"], "quiet.txt", "{detail}");
    assert!(
        detail.get("check").is_none(),
        "a call, not a session check: {detail}"
    );
    let (_, code, detail) = find("notifications/initialized");
    assert_eq!(code, "allowed");
    assert_eq!(detail["check"], "session", "{detail}");
}

#[tokio::test]
async fn refusals_before_any_message_is_decided_are_recorded_for_the_agent() {
    let (upstream, remit) = setup(false).await;
    let agent = remit.agent(&crate::harness::unique("reader")).await;
    let mut session = Session::open(&remit, &agent, &["read_file"]).await;

    let put = session.request(reqwest::Method::PUT).send().await.unwrap();
    assert_eq!(put.status(), 405);
    assert_eq!(put.headers()["allow"], "GET, POST, DELETE");
    assert_eq!(
        put.json::<Value>().await.unwrap()["error"],
        "method_not_allowed"
    );

    let garbled = session
        .request(reqwest::Method::POST)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(garbled.status(), 400);
    assert_eq!(
        garbled.json::<Value>().await.unwrap()["error"]["code"],
        -32700
    );

    let empty = session.post(&json!([])).await;
    assert_eq!(empty.status, 400);
    assert_eq!(empty.messages[0]["error"]["code"], -32600);

    let decided = decided(&session).await;
    let codes: Vec<(&str, &str)> = decided
        .iter()
        .map(|(action, code, _)| (action.as_str(), code.as_str()))
        .collect();
    assert_eq!(
        codes,
        [
            ("PUT", "method_not_allowed"),
            ("POST", "parse_error"),
            ("POST", "invalid_request")
        ]
    );
    for (_, _, detail) in &decided {
        assert_eq!(detail["tool"], "vault", "{detail}");
        assert_eq!(detail["class"], "admin", "{detail}");
    }
    assert!(upstream.seen().is_empty());

    // Forged credentials are refused for what they are, and attributed to nobody.
    let forged = reqwest::Client::new()
        .put(&session.url)
        .header("authorization", "DPoP not-a-token")
        .header("dpop", "not-a-proof")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
    let everything = remit
        .authority
        .store()
        .query_events(&store::AuditFilter {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    let unattributed: Vec<_> = everything
        .iter()
        .filter(|e| e.body.kind == audit::kinds::CALL_DECISION && e.body.agent.is_none())
        .collect();
    assert_eq!(unattributed.len(), 1, "{unattributed:?}");
    assert_eq!(unattributed[0].body.actor, "unauthenticated");
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_before_the_server_sees_anything() {
    let (upstream, remit) = setup(false).await;
    let agent = remit.agent(&crate::harness::unique("reader")).await;
    let mut session = Session::open(&remit, &agent, &["read_file"]).await;
    // Over the node's `max_body_bytes` (64 KiB by default), with a declared length.
    let big = "x".repeat(100 * 1024);
    let call = |path: &str| json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": { "name": "read_file", "arguments": { "path": path } } });
    let answer = session.post(&call(&big)).await;
    assert_eq!(answer.status, 413);
    assert_eq!(answer.messages[0]["id"], Value::Null);
    assert_eq!(answer.messages[0]["error"]["code"], -32600);
    let message = answer.messages[0]["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("65536 bytes") && message.contains("`vault`"),
        "{message}"
    );

    // The same body in chunks, without a length: counted as it streams.
    let text = call(&big).to_string();
    let chunks = text
        .as_bytes()
        .chunks(8 * 1024)
        .map(bytes::Bytes::copy_from_slice)
        .collect();
    let proof = remit.proof(&agent, "POST", &session.url, &session.grant);
    let headers = [
        (
            "authorization",
            format!("DPoP {}", session.grant.token.expose()),
        ),
        ("dpop", proof),
        ("content-type", "application/json".to_string()),
        ("accept", "application/json, text/event-stream".to_string()),
    ];
    let (status, _, body) =
        crate::harness::send_chunked("POST", &session.url, &headers, chunks).await;
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], -32600, "{body}");
    assert!(upstream.seen().is_empty());

    let codes: Vec<String> = decided(&session)
        .await
        .into_iter()
        .map(|(_, code, _)| code)
        .collect();
    assert_eq!(codes, ["body_too_large", "body_too_large"]);
}

#[tokio::test]
async fn a_tools_own_body_limit_overrides_the_nodes() {
    let upstream = Upstream::start(false).await;
    let toml = format!("{}max_body_bytes = 2048\n", tools_toml(&upstream));
    let remit = Remit::start(&toml, &[("VAULT_TOKEN", SECRET)]).await;
    let agent = remit.agent(&crate::harness::unique("reader")).await;
    let mut session = Session::open(&remit, &agent, &["read_file"]).await;
    session.initialize().await;
    let called = session
        .call("read_file", json!({ "path": "a".repeat(1000) }))
        .await;
    assert!(called.get("result").is_some(), "{called}");
    // Far below the node's 64 KiB, above the tool's 2 KiB.
    let path = "b".repeat(3000);
    let answer = session
        .post(&json!({ "jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": { "name": "read_file", "arguments": { "path": path } } }))
        .await;
    assert_eq!(answer.status, 413, "{:?}", answer.messages);
    assert!(!upstream.saw(&path));
}

/// The `call.outcome` event of the first call of `action`, once the batched outcomes are
/// written.
async fn outcome_of(remit: &Remit, action: &str) -> audit::Event {
    for _ in 0..100 {
        let filter = store::AuditFilter {
            limit: 1000,
            ..Default::default()
        };
        let events = remit
            .authority
            .audit_events(&remit.admin, &filter)
            .await
            .unwrap();
        if let Some(outcome) = events.into_iter().find(|e| {
            e.body.kind == audit::kinds::CALL_OUTCOME
                && e.body.detail.to_value()["action"] == action
        }) {
            return outcome;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("no outcome for `{action}`");
}

/// The keys every `call.outcome` carries, HTTP and MCP alike.
const OUTCOME_KEYS: [&str; 8] = [
    "action",
    "audit_seq",
    "bytes",
    "complete",
    "duration_ms",
    "status",
    "tool",
    "upstream_reached",
];

#[tokio::test]
async fn every_forwarded_call_records_its_outcome() {
    let (_upstream, remit) = setup(false).await;
    let agent = remit.agent(&crate::harness::unique("reader")).await;
    let mut session = Session::open(&remit, &agent, &["read_file"]).await;
    session.initialize().await;
    session.call("read_file", json!({ "path": "a" })).await;
    let call = outcome_of(&remit, "read_file").await;
    let detail = call.body.detail.to_value();
    let keys: Vec<&str> = detail
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys, OUTCOME_KEYS,
        "the same shape as an HTTP call's outcome"
    );
    assert_eq!(detail["tool"], "vault");
    assert_eq!(detail["status"], 200);
    assert!(detail["duration_ms"].is_u64());
    assert!(detail["bytes"].as_u64().unwrap() > 0, "{detail}");
    assert_eq!(detail["complete"], true);
    assert_eq!(detail["upstream_reached"], true);
    assert_eq!(
        call.body.actor,
        format!("spiffe://remit.local/agent/{}", agent.name)
    );

    // It names the call's decision, and was written after it, in milliseconds.
    let decisions = remit
        .authority
        .audit_events(
            &remit.admin,
            &store::AuditFilter {
                limit: 1000,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let decision = decisions
        .iter()
        .find(|e| {
            e.body.kind == audit::kinds::CALL_DECISION
                && e.body.detail.to_value()["action"] == "read_file"
        })
        .expect("the call's decision");
    assert_eq!(detail["audit_seq"], decision.seq);
    assert!(call.body.time_ms >= decision.body.time_ms);
    assert!(call.body.time_ms - decision.body.time_ms < 60_000);
}

#[tokio::test]
async fn an_unreachable_mcp_server_is_recorded_as_not_reached() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let down = format!("http://{}/mcp", listener.local_addr().unwrap());
    drop(listener);
    let remit = Remit::start(
        &format!(
            r#"
[[tools]]
name = "vault"
kind = "mcp"
upstream = "{down}"
auth = {{ bearer = "env:VAULT_TOKEN" }}
mcp_tools = {{ read_file = {{ class = "read", resource = "path" }} }}
"#
        ),
        &[("VAULT_TOKEN", SECRET)],
    )
    .await;
    let agent = remit.agent(&crate::harness::unique("reader")).await;
    let mut session = Session::open(&remit, &agent, &["read_file"]).await;
    let answer = session
        .post(&json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": { "name": "read_file", "arguments": { "path": "a" } } }))
        .await;
    assert_eq!(answer.status, 502);
    let detail = outcome_of(&remit, "read_file").await.body.detail.to_value();
    assert_eq!(detail["upstream_reached"], false, "{detail}");
    assert_eq!(detail["complete"], false);
    assert_eq!(detail["bytes"], 0);
    assert_eq!(detail["status"], 502);
}

/// The refusals of the MCP gateway, one of each kind an agent meets most, as a snapshot: a
/// message refused alone is a JSON-RPC error in a 200 answer; a request refused whole
/// (token, proof, revocation, rate, unknown tool) is an HTTP error with a JSON body.
#[tokio::test]
async fn the_mcp_refusals_an_agent_sees() {
    let upstream = Upstream::start(false).await;
    let limits = gateway::Limits {
        per_agent: gateway::Rate {
            per_second: 1000.0,
            burst: 1000,
        },
        per_task: gateway::Rate {
            per_second: 0.0001,
            burst: 4,
        },
    };
    let remit = Remit::start_with(
        &tools_toml(&upstream),
        &[("VAULT_TOKEN", SECRET)],
        limits,
        None,
    )
    .await;
    let agent = remit.agent(&crate::harness::unique("reader")).await;
    let mut refusals = serde_json::Map::new();
    let rpc_error =
        |answer: &Answer, id: i64| json!({ "status": answer.status, "message": answer.reply(id) });
    let call = |id: i64, name: &str| {
        json!({ "jsonrpc": "2.0", "id": id, "method": "tools/call",
                "params": { "name": name, "arguments": { "path": "notes.txt" } } })
    };

    let mut scoped = Session::open(&remit, &agent, &["read_file"]).await;
    scoped.initialize().await;
    let answer = scoped.post(&call(7, "write_file")).await;
    refusals.insert("out_of_scope".into(), rpc_error(&answer, 7));

    let mut spent = Session::open(&remit, &agent, &["read_file"]).await;
    spent.grant = remit
        .grant_with_budget(
            &agent,
            json!([{ "tool": "vault", "actions": ["read_file"] }]),
            1,
        )
        .await;
    spent.initialize().await;
    let allowed = spent.post(&call(7, "read_file")).await;
    assert!(
        allowed.reply(7).get("result").is_some(),
        "{:?}",
        allowed.messages
    );
    let answer = spent.post(&call(8, "read_file")).await;
    refusals.insert("budget_exhausted".into(), rpc_error(&answer, 8));

    let revoked = Session::open(&remit, &agent, &["read_file"]).await;
    remit
        .authority
        .revoke(
            &remit.admin,
            store::RevocationKind::Task,
            revoked.grant.task_id.as_ref(),
            "incident 42",
        )
        .await
        .unwrap();
    let response = revoked
        .request(reqwest::Method::POST)
        .header("content-type", "application/json")
        .body(call(1, "read_file").to_string())
        .send()
        .await
        .unwrap();
    refusals.insert("revoked".into(), crate::http::refusal(response).await);

    let response = reqwest::Client::new()
        .post(&scoped.url)
        .header(
            "authorization",
            format!("DPoP {}", scoped.grant.token.expose()),
        )
        .header("content-type", "application/json")
        .body(call(1, "read_file").to_string())
        .send()
        .await
        .unwrap();
    refusals.insert("proof_missing".into(), crate::http::refusal(response).await);

    // A burst of four requests per task; the loop stops at the first refusal.
    let limited = Session::open(&remit, &agent, &["read_file"]).await;
    let mut answer = None;
    for _ in 0..8 {
        let response = limited
            .request(reqwest::Method::POST)
            .header("content-type", "application/json")
            .body(json!({ "jsonrpc": "2.0", "id": 1, "method": "ping" }).to_string())
            .send()
            .await
            .unwrap();
        if response.status() == reqwest::StatusCode::TOO_MANY_REQUESTS {
            answer = Some(crate::http::refusal(response).await);
            break;
        }
    }
    let limited = answer.expect("no request was rate limited");
    refusals.insert("rate_limited".into(), limited);

    let unknown = format!("{}/mcp/nope", remit.base);
    let response = reqwest::Client::new()
        .post(&unknown)
        .header(
            "authorization",
            format!("DPoP {}", scoped.grant.token.expose()),
        )
        .header("dpop", remit.proof(&agent, "POST", &unknown, &scoped.grant))
        .header("content-type", "application/json")
        .body(call(1, "read_file").to_string())
        .send()
        .await
        .unwrap();
    refusals.insert("tool_unknown".into(), crate::http::refusal(response).await);

    insta::with_settings!({ filters => store::testing::SNAPSHOT_FILTERS.to_vec() }, {
        insta::assert_json_snapshot!(Value::Object(refusals));
    });
    assert!(!upstream.saw("write_file"));
}
