//! The HTTP gateway (`/http/{tool}/{*path}`) in front of a real upstream started by the test,
//! which records every request it sees: DESIGN.md invariant 1 (nothing reaches an upstream
//! without every requirement) and invariant 5 (upstream credentials never reach an agent).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use bytes::Bytes;
use control::Grant;
use gateway::{Limits, Rate};
use parking_lot::Mutex;
use reqwest::Method;
use serde_json::{Value, json};
use store::{AuditFilter, RevocationKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::{Agent, Remit, unique};

/// The credential remit injects; it must never come back to an agent.
const SECRET: &str = "ghp_s3cr3tUPSTREAMtoken7f9a2c";
const DOWN_SECRET: &str = "down-api-key-0b1e";

/// One request as the upstream saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    query: Option<String>,
    headers: HeaderMap,
    body: Bytes,
}

/// A real HTTP upstream on loopback.
struct Upstream {
    base: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start() -> Upstream {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let app = Router::new()
            .route(
                "/repos/{owner}/{repo}/issues",
                get(issues).post(create_issue),
            )
            .route(
                "/repos/{owner}/{repo}",
                delete(|| async { StatusCode::NO_CONTENT }),
            )
            .route("/echo-headers", get(echo_headers))
            .route("/redirect", get(redirect))
            .route("/large", get(large))
            .route("/secrets/{name}", get(|| async { "the secret" }))
            .layer(middleware::from_fn_with_state(Arc::clone(&seen), record))
            // Uploads of several MB are the point of one test.
            .layer(DefaultBodyLimit::disable());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Upstream { base, seen, server }
    }

    fn count(&self) -> usize {
        self.seen.lock().len()
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Records the request, body included, before the route handles it.
async fn record(
    State(seen): State<Arc<Mutex<Vec<Seen>>>>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    seen.lock().push(Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    next.run(Request::from_parts(parts, Body::from(body))).await
}

async fn issues(request: Request) -> impl IntoResponse {
    axum::Json(
        json!({ "path": request.uri().path(), "query": request.uri().query(), "issues": [1, 2, 3] }),
    )
}

async fn create_issue(body: Bytes) -> impl IntoResponse {
    (
        StatusCode::CREATED,
        axum::Json(json!({ "received": body.len() })),
    )
}

/// Echoes every request header, in the body and in response headers.
async fn echo_headers(headers: HeaderMap) -> Response {
    let echoed: serde_json::Map<String, Value> = headers
        .iter()
        .map(|(name, value)| (name.to_string(), json!(value.to_str().unwrap_or(""))))
        .collect();
    let authorization = headers.get(header::AUTHORIZATION).cloned();
    let mut response = axum::Json(Value::Object(echoed)).into_response();
    if let Some(value) = authorization {
        response
            .headers_mut()
            .insert("x-echo-authorization", value.clone());
        response.headers_mut().insert(
            "x-debug",
            format!("auth was {}", value.to_str().unwrap())
                .parse()
                .unwrap(),
        );
    }
    response
}

/// A redirect that carries the credential it received.
async fn redirect(headers: HeaderMap) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .unwrap()
        .to_str()
        .unwrap();
    let token = authorization.trim_start_matches("Bearer ");
    let location = format!("/repos/octo/hello/issues?token={token}");
    (StatusCode::FOUND, [(header::LOCATION, location)], "moved").into_response()
}

/// Several MB in chunks whose boundaries cut through the credential.
async fn large(headers: HeaderMap) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let body = large_body(&authorization);
    let chunks: Vec<Result<Bytes, Infallible>> = body
        .chunks(8191)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    Body::from_stream(futures::stream::iter(chunks)).into_response()
}

/// Filler with the whole header value and the bare credential spliced in every 50 kB or so.
fn large_body(authorization: &str) -> Vec<u8> {
    let token = authorization.trim_start_matches("Bearer ");
    let mut body = Vec::with_capacity(5 << 20);
    let mut i = 0u64;
    while body.len() < 4 << 20 {
        body.extend_from_slice(format!("line {i}: lorem ipsum dolor sit amet\n").as_bytes());
        if i % 1000 == 7 {
            body.extend_from_slice(format!("auth={authorization};raw={token}\n").as_bytes());
        }
        i += 1;
    }
    body
}

fn tools(upstream: &str, down: &str) -> String {
    format!(
        r#"
[[tools]]
name = "gh"
kind = "http"
upstream = "{upstream}"
auth = {{ bearer = "env:UPSTREAM_TOKEN" }}
routes = [
  {{ method = "GET", path = "/repos/{{owner}}/{{repo}}/issues", action = "list_issues", class = "read", resource = "{{owner}}/{{repo}}" }},
  {{ method = "DELETE", path = "/repos/{{owner}}/{{repo}}", action = "delete_repo", class = "admin", resource = "{{owner}}/{{repo}}" }},
  {{ method = "POST", path = "/repos/{{owner}}/{{repo}}/issues", action = "create_issue", class = "write", resource = "{{owner}}/{{repo}}" }},
  {{ method = "GET", path = "/echo-headers", action = "echo_headers", class = "read" }},
  {{ method = "GET", path = "/redirect", action = "redirect", class = "read" }},
  {{ method = "GET", path = "/large", action = "download", class = "read" }},
]

[[tools]]
name = "gh-uploads"
kind = "http"
upstream = "{upstream}"
auth = {{ bearer = "env:UPSTREAM_TOKEN" }}
max_body_bytes = 4194304
routes = [{{ method = "POST", path = "/repos/{{owner}}/{{repo}}/issues", action = "create_issue", class = "write", resource = "{{owner}}/{{repo}}" }}]

[[tools]]
name = "gh-small"
kind = "http"
upstream = "{upstream}"
auth = {{ bearer = "env:UPSTREAM_TOKEN" }}
max_body_bytes = 2048
routes = [{{ method = "POST", path = "/repos/{{owner}}/{{repo}}/issues", action = "create_issue", class = "write", resource = "{{owner}}/{{repo}}" }}]

[[tools]]
name = "gh-bearer"
kind = "http"
upstream = "{upstream}"
auth = {{ bearer = "env:UPSTREAM_TOKEN" }}
bearer_tokens = true
routes = [
  {{ method = "GET", path = "/repos/{{owner}}/{{repo}}/issues", action = "list_issues", class = "read", resource = "{{owner}}/{{repo}}" }},
  {{ method = "GET", path = "/secrets/{{name}}", action = "read_secret", class = "read", sensitivity = ["secret"], resource = "{{name}}" }},
]

[[tools]]
name = "down"
kind = "http"
upstream = "{down}/base"
auth = {{ header = "X-Api-Key", value = "env:DOWN_KEY" }}
routes = [{{ method = "GET", path = "/ping", action = "ping", class = "read" }}]

[[tools]]
name = "notes"
kind = "mcp"
upstream = "{upstream}/mcp"
"#
    )
}

fn scopes() -> Value {
    json!([
        { "tool": "gh", "actions": ["list_issues", "create_issue", "echo_headers", "redirect", "download"],
          "resources": ["octo/*", "echo-headers", "redirect", "large"] },
        { "tool": "gh-uploads", "actions": ["create_issue"] },
        { "tool": "gh-small", "actions": ["create_issue"] },
        { "tool": "gh-bearer", "actions": ["list_issues", "read_secret"] },
        { "tool": "down", "actions": ["ping"] },
    ])
}

/// A loopback address nothing listens on.
async fn closed_port() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{address}")
}

/// remit with the test tools in front of a fresh upstream, and an agent holding a task.
struct Setup {
    upstream: Upstream,
    remit: Remit,
    agent: Agent,
    grant: Grant,
    client: reqwest::Client,
    down: String,
}

impl Setup {
    async fn start() -> Setup {
        Setup::start_with(Limits::default(), None).await
    }

    async fn start_with(limits: Limits, store_url: Option<String>) -> Setup {
        let upstream = Upstream::start().await;
        let down = closed_port().await;
        let env = [("UPSTREAM_TOKEN", SECRET), ("DOWN_KEY", DOWN_SECRET)];
        let remit = Remit::start_with(&tools(&upstream.base, &down), &env, limits, store_url).await;
        let agent = remit.agent("triage-bot").await;
        let grant = remit.grant(&agent, scopes()).await;
        // Redirects must reach the agent as they are: nothing may follow them on its behalf.
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Setup {
            upstream,
            remit,
            agent,
            grant,
            client,
            down,
        }
    }

    /// A request with the task token and a fresh proof for this method and path.
    fn call(&self, method: Method, path_and_query: &str) -> reqwest::RequestBuilder {
        self.call_as(&self.agent, &self.grant, method, path_and_query)
    }

    fn call_as(
        &self,
        agent: &Agent,
        grant: &Grant,
        method: Method,
        path_and_query: &str,
    ) -> reqwest::RequestBuilder {
        let path = path_and_query.split('?').next().unwrap();
        let proof = self.remit.proof(
            agent,
            method.as_str(),
            &format!("{}{path}", self.remit.base),
            grant,
        );
        self.client
            .request(method, format!("{}{path_and_query}", self.remit.base))
            .header("authorization", format!("DPoP {}", grant.token.expose()))
            .header("dpop", proof)
    }

    fn bearer(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .get(format!("{}{path}", self.remit.base))
            .header(
                "authorization",
                format!("Bearer {}", self.grant.token.expose()),
            )
    }

    /// Audit events of `task` of one kind, waiting briefly for outcomes recorded after the
    /// response ended.
    async fn events(&self, task: &str, kind: &str, at_least: usize) -> Vec<audit::Event> {
        let filter = AuditFilter {
            task: Some(task.to_string()),
            limit: 1000,
            ..AuditFilter::default()
        };
        for _ in 0..100 {
            let events: Vec<audit::Event> = self
                .remit
                .authority
                .store()
                .query_events(&filter)
                .await
                .unwrap()
                .into_iter()
                .filter(|e| e.body.kind == kind)
                .collect();
            if events.len() >= at_least {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("fewer than {at_least} `{kind}` events for task {task}");
    }
}

/// Sends one request and checks its status and error code.
async fn check(name: &str, request: reqwest::RequestBuilder, status: u16, code: &str) -> Value {
    let response = request.send().await.unwrap();
    let got = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(
        (got, body["error"].as_str()),
        (status, Some(code)),
        "{name}: {body}"
    );
    body
}

fn all_headers(headers: &reqwest::header::HeaderMap) -> String {
    headers
        .iter()
        .map(|(name, value)| format!("{name}: {}\n", String::from_utf8_lossy(value.as_bytes())))
        .collect()
}

#[tokio::test]
async fn an_allowed_get_reaches_the_upstream_with_its_query_and_the_credential() {
    let s = Setup::start().await;
    let response = s
        .call(
            Method::GET,
            "/http/gh/repos/octo/hello/issues?state=open&page=2",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Credentials exist, so the body is scrubbed and its length may change.
    assert_eq!(response.headers().get(header::CONTENT_LENGTH), None);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({ "path": "/repos/octo/hello/issues", "query": "state=open&page=2", "issues": [1, 2, 3] })
    );

    let seen = s.upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("GET", "/repos/octo/hello/issues")
    );
    assert_eq!(seen[0].query.as_deref(), Some("state=open&page=2"));
    assert_eq!(
        seen[0]
            .headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .collect::<Vec<_>>(),
        [&format!("Bearer {SECRET}")]
    );
    assert_eq!(
        seen[0].headers[header::HOST],
        s.upstream.base.trim_start_matches("http://")
    );
}

#[tokio::test]
async fn a_denied_delete_answers_403_and_the_upstream_sees_nothing() {
    let s = Setup::start().await;
    let body = check(
        "delete",
        s.call(Method::DELETE, "/http/gh/repos/octo/hello"),
        403,
        "out_of_scope",
    )
    .await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("`delete_repo` on `octo/hello`"),
        "{body}"
    );
    assert_eq!(body["decision"], "deny");
    assert_eq!(s.upstream.count(), 0);
}

#[tokio::test]
async fn unknown_tools_and_mcp_tools_are_not_found_on_http() {
    let s = Setup::start().await;
    check(
        "unknown",
        s.call(Method::GET, "/http/nope/x"),
        404,
        "tool_unknown",
    )
    .await;
    check(
        "mcp tool",
        s.call(Method::GET, "/http/notes/x"),
        404,
        "tool_unknown",
    )
    .await;
    assert_eq!(s.upstream.count(), 0);
}

#[tokio::test]
async fn the_agents_credentials_and_hop_by_hop_headers_never_travel_upstream() {
    let s = Setup::start().await;
    let path = "/http/gh/echo-headers";
    let proof = s.remit.proof(
        &s.agent,
        "GET",
        &format!("{}{path}", s.remit.base),
        &s.grant,
    );
    // Raw HTTP/1.1, so that exactly these headers reach remit.
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: attacker.example\r\nAuthorization: DPoP {token}\r\nDPoP: {proof}\r\n\
         Cookie: session=agent-cookie\r\nConnection: close, X-Hop-Only\r\nX-Hop-Only: hop\r\nKeep-Alive: timeout=5\r\n\
         Proxy-Authorization: Basic YWdlbnQ6cHc=\r\nTE: trailers\r\nUpgrade: websocket\r\nX-Api-Key: agent-supplied\r\n\
         X-Agent-Note: kept\r\n\r\n",
        token = s.grant.token.expose()
    );
    let (status, _) = raw(&s.remit.base, &request).await;
    assert_eq!(status, 200);

    let seen = s.upstream.seen();
    assert_eq!(seen.len(), 1);
    let headers = &seen[0].headers;
    for name in [
        "dpop",
        "cookie",
        "connection",
        "x-hop-only",
        "keep-alive",
        "proxy-authorization",
        "te",
        "upgrade",
    ] {
        assert!(
            !headers.contains_key(name),
            "`{name}` reached the upstream: {headers:?}"
        );
    }
    assert_eq!(
        headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .collect::<Vec<_>>(),
        [&format!("Bearer {SECRET}")]
    );
    assert_eq!(
        headers[header::HOST],
        s.upstream.base.trim_start_matches("http://")
    );
    assert_eq!(headers["x-agent-note"], "kept");
    assert_eq!(
        headers["x-api-key"], "agent-supplied",
        "only the tool's own credential header is replaced"
    );
    let text = format!("{headers:?}");
    assert!(
        !text.contains(s.grant.token.expose()) && !text.contains(&proof),
        "the agent's token or proof reached the upstream"
    );
}

#[tokio::test]
async fn a_header_credential_replaces_the_agents_header_of_that_name() {
    // The `down` tool injects `X-Api-Key`; here it points at the live upstream instead.
    let upstream = Upstream::start().await;
    let toml = format!(
        r#"
[[tools]]
name = "keyed"
kind = "http"
upstream = "{}"
auth = {{ header = "X-Api-Key", value = "env:KEY" }}
routes = [{{ method = "GET", path = "/echo-headers", action = "echo_headers", class = "read" }}]
"#,
        upstream.base
    );
    let remit = Remit::start(&toml, &[("KEY", DOWN_SECRET)]).await;
    let agent = remit.agent("keyed-bot").await;
    let grant = remit
        .grant(
            &agent,
            json!([{ "tool": "keyed", "actions": ["echo_headers"] }]),
        )
        .await;
    let url = format!("{}/http/keyed/echo-headers", remit.base);
    let response = reqwest::Client::new()
        .get(&url)
        .header("authorization", format!("DPoP {}", grant.token.expose()))
        .header("dpop", remit.proof(&agent, "GET", &url, &grant))
        .header("x-api-key", "agent-supplied")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.text().await.unwrap();
    assert!(
        !body.contains(DOWN_SECRET) && body.contains("\"x-api-key\":\"[redacted]\""),
        "{body}"
    );
    let seen = upstream.seen();
    assert_eq!(
        seen[0]
            .headers
            .get_all("x-api-key")
            .iter()
            .collect::<Vec<_>>(),
        [DOWN_SECRET]
    );
    assert!(
        !seen[0].headers.contains_key(header::AUTHORIZATION),
        "the agent's token reached the upstream"
    );
}

#[tokio::test]
async fn dot_segments_are_refused_before_anything_is_decided() {
    let s = Setup::start().await;
    let path = "/http/gh/repos/octo/hello/../../../echo-headers";
    let proof = s.remit.proof(
        &s.agent,
        "GET",
        &format!("{}{path}", s.remit.base),
        &s.grant,
    );
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: DPoP {}\r\nDPoP: {proof}\r\nConnection: close\r\n\r\n",
        s.grant.token.expose()
    );
    let (status, body) = raw(&s.remit.base, &request).await;
    assert_eq!(status, 400);
    assert!(body.contains("\"error\":\"path_invalid\""), "{body}");
    assert_eq!(s.upstream.count(), 0);
}

#[tokio::test]
async fn refusals_before_routing_are_recorded_for_the_agent() {
    let s = Setup::start().await;
    let path = "/http/gh/files/%2e%2E/admin";
    let proof = s.remit.proof(
        &s.agent,
        "GET",
        &format!("{}{path}", s.remit.base),
        &s.grant,
    );
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: DPoP {}\r\nDPoP: {proof}\r\nConnection: close\r\n\r\n",
        s.grant.token.expose()
    );
    let (status, body) = raw(&s.remit.base, &request).await;
    assert_eq!(status, 400);
    assert!(body.contains("\"error\":\"path_invalid\""), "{body}");
    // A route the tool's catalog does not know is decided (and refused) as an `admin` action.
    check(
        "unknown route",
        s.call(Method::GET, "/http/gh/nowhere"),
        403,
        "out_of_scope",
    )
    .await;

    let decisions = s
        .events(s.grant.task_id.as_str(), audit::kinds::CALL_DECISION, 2)
        .await;
    let seen: Vec<(String, String, Option<String>)> = decisions
        .iter()
        .map(|event| {
            let detail = event.body.detail.to_value();
            (
                detail["action"].as_str().unwrap().to_string(),
                detail["code"].as_str().unwrap().to_string(),
                event.body.decision.clone(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (
                "GET /files/%2e%2E/admin".to_string(),
                "path_invalid".to_string(),
                Some("deny".to_string())
            ),
            (
                "GET /nowhere".to_string(),
                "out_of_scope".to_string(),
                Some("deny".to_string())
            ),
        ]
    );
    for event in &decisions {
        assert_eq!(
            event.body.agent.as_deref(),
            Some(s.grant.spiffe_id.as_str())
        );
        assert_eq!(event.body.detail.to_value()["tool"], "gh");
        assert_eq!(event.body.detail.to_value()["class"], "admin");
    }
    assert_eq!(
        decisions[0].body.detail.to_value()["resource"],
        "files/%2e%2E/admin"
    );

    // Without credentials the refusal stays what it was, and nothing is recorded.
    let anonymous = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let (status, body) = raw(&s.remit.base, &anonymous).await;
    assert_eq!(status, 400);
    assert!(body.contains("\"error\":\"path_invalid\""), "{body}");
    // Forged credentials are refused for what they are, and attributed to nobody.
    let forged = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: DPoP forged\r\nDPoP: forged\r\nConnection: close\r\n\r\n"
    );
    let (status, body) = raw(&s.remit.base, &forged).await;
    assert_eq!(status, 401, "{body}");
    let everything = s
        .remit
        .authority
        .store()
        .query_events(&AuditFilter {
            limit: 1000,
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    let decided: Vec<&audit::Event> = everything
        .iter()
        .filter(|e| e.body.kind == audit::kinds::CALL_DECISION)
        .collect();
    assert_eq!(decided.len(), 3, "{decided:?}");
    assert_eq!(decided[2].body.agent, None);
    assert_eq!(decided[2].body.actor, "unauthenticated");
    assert_eq!(s.upstream.count(), 0);
}

/// Posts `body` in chunks of 8 KiB, without a `Content-Length`.
async fn post_chunked(s: &Setup, path: &str, body: &[u8]) -> (u16, Value) {
    let url = format!("{}{path}", s.remit.base);
    let proof = s.remit.proof(&s.agent, "POST", &url, &s.grant);
    let headers = [
        ("authorization", format!("DPoP {}", s.grant.token.expose())),
        ("dpop", proof),
        ("content-type", "application/octet-stream".to_string()),
    ];
    let chunks = body.chunks(8 * 1024).map(Bytes::copy_from_slice).collect();
    let (status, headers, body) =
        crate::harness::send_chunked("POST", &url, &headers, chunks).await;
    if status == 413 {
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    }
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_and_never_reaches_the_upstream() {
    let s = Setup::start().await;
    let path = "/http/gh/repos/octo/hello/issues";
    // Over the node's `max_body_bytes` (64 KiB by default), with a declared length ...
    let body = check(
        "declared",
        s.call(Method::POST, path).body(vec![b'x'; 100 * 1024]),
        413,
        "body_too_large",
    )
    .await;
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("65536 bytes") && message.contains("`gh`"),
        "{message}"
    );
    // ... and chunked, without one: counted as it streams, refused before anything is sent.
    let (status, body) = post_chunked(&s, path, &vec![b'y'; 100 * 1024]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("body_too_large")),
        "{body}"
    );
    assert_eq!(s.upstream.count(), 0, "the upstream saw an oversize body");

    // A chunked body within the limit is forwarded whole, with its length.
    let small: Vec<u8> = (0..30_000u32).map(|i| (i % 251) as u8).collect();
    let (status, body) = post_chunked(&s, path, &small).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["received"], small.len());
    let seen = s.upstream.seen();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].body == small, "the body changed on the way");
    assert_eq!(seen[0].headers[header::CONTENT_LENGTH], "30000");
    assert!(!seen[0].headers.contains_key(header::TRANSFER_ENCODING));

    let decisions = s
        .events(s.grant.task_id.as_str(), audit::kinds::CALL_DECISION, 3)
        .await;
    let codes: Vec<Value> = decisions
        .iter()
        .map(|e| e.body.detail.to_value()["code"].clone())
        .collect();
    assert_eq!(codes, ["body_too_large", "body_too_large", "allowed"]);
    assert!(
        decisions
            .iter()
            .all(|e| e.body.agent.as_deref() == Some(s.grant.spiffe_id.as_str()))
    );
}

#[tokio::test]
async fn a_tools_own_body_limit_overrides_the_nodes() {
    let s = Setup::start().await;
    let path = "/http/gh-small/repos/octo/hello/issues";
    // Far below the node's 64 KiB, above the tool's 2 KiB: declared and chunked.
    check(
        "declared",
        s.call(Method::POST, path).body(vec![b'x'; 3000]),
        413,
        "body_too_large",
    )
    .await;
    let (status, body) = post_chunked(&s, path, &[b'y'; 3000]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("body_too_large")),
        "{body}"
    );
    assert_eq!(s.upstream.count(), 0);
    let response = s
        .call(Method::POST, path)
        .body(vec![b'z'; 2000])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(s.upstream.count(), 1);
}

/// One raw HTTP/1.1 exchange: the status and the body text.
async fn raw(base: &str, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer.split(' ').nth(1).unwrap().parse().unwrap();
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn the_credential_never_reaches_the_agent_in_headers_or_bodies() {
    let s = Setup::start().await;
    let response = s
        .call(Method::GET, "/http/gh/echo-headers")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let headers = all_headers(response.headers());
    let body = response.text().await.unwrap();
    // The upstream did see it and echoed it: the scrubbing below is what kept it out.
    let seen = s.upstream.seen();
    assert_eq!(
        seen[0].headers[header::AUTHORIZATION],
        format!("Bearer {SECRET}").as_str()
    );
    assert!(!headers.contains(SECRET), "{headers}");
    assert!(
        headers.contains("x-echo-authorization: [redacted]\n"),
        "{headers}"
    );
    assert!(
        headers.contains("x-debug: auth was [redacted]\n"),
        "{headers}"
    );
    assert!(!body.contains(SECRET), "{body}");
    let echoed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echoed["authorization"], "[redacted]");
}

#[tokio::test]
async fn redirects_are_scrubbed_and_not_followed() {
    let s = Setup::start().await;
    let response = s
        .call(Method::GET, "/http/gh/redirect")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FOUND);
    let location = response.headers()[header::LOCATION]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(location, "/repos/octo/hello/issues?token=[redacted]");
    assert_eq!(response.text().await.unwrap(), "moved");
    let seen = s.upstream.seen();
    assert_eq!(
        seen.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(),
        ["/redirect"],
        "remit followed the redirect"
    );
}

#[tokio::test]
async fn a_large_streamed_body_is_scrubbed_across_chunk_boundaries() {
    let s = Setup::start().await;
    let response = s.call(Method::GET, "/http/gh/large").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers().get(header::CONTENT_LENGTH), None);
    let body = response.bytes().await.unwrap();

    let sent = String::from_utf8(large_body(&format!("Bearer {SECRET}"))).unwrap();
    let expected = sent
        .replace(&format!("Bearer {SECRET}"), "[redacted]")
        .replace(SECRET, "[redacted]");
    let occurrences = sent.matches(SECRET).count();
    assert!(
        sent.len() > 4 << 20 && occurrences > 100,
        "{occurrences} occurrences in {} bytes",
        sent.len()
    );
    assert_eq!(body.len(), expected.len());
    assert!(
        body == expected.as_bytes(),
        "the scrubbed body differs from the expected one"
    );
    assert_eq!(expected.matches("[redacted]").count(), occurrences);
}

#[tokio::test]
async fn a_posted_body_of_several_megabytes_arrives_intact() {
    let s = Setup::start().await;
    // Within the tool's own `max_body_bytes` (4 MiB), far over the node's 64 KiB.
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let response = s
        .call(Method::POST, "/http/gh-uploads/repos/octo/hello/issues")
        .body(payload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["received"], payload.len());
    let seen = s.upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(
        seen[0].headers[header::CONTENT_LENGTH],
        payload.len().to_string().as_str()
    );
    assert!(seen[0].body == payload, "the body changed on the way");
}

#[tokio::test]
async fn without_credentials_to_scrub_the_content_length_passes() {
    let upstream = Upstream::start().await;
    let toml = format!(
        r#"
[[tools]]
name = "open"
kind = "http"
upstream = "{}"
routes = [{{ method = "GET", path = "/repos/{{owner}}/{{repo}}/issues", action = "list_issues", class = "read" }}]
"#,
        upstream.base
    );
    let remit = Remit::start(&toml, &[]).await;
    let agent = remit.agent("open-bot").await;
    let grant = remit
        .grant(
            &agent,
            json!([{ "tool": "open", "actions": ["list_issues"] }]),
        )
        .await;
    let url = format!("{}/http/open/repos/a/b/issues", remit.base);
    let response = reqwest::Client::new()
        .get(&url)
        .header("authorization", format!("DPoP {}", grant.token.expose()))
        .header("dpop", remit.proof(&agent, "GET", &url, &grant))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let length: usize = response.headers()[header::CONTENT_LENGTH]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(response.bytes().await.unwrap().len(), length);
    // No tool credential: the agent's token still stays with remit.
    assert!(
        !upstream.seen()[0]
            .headers
            .contains_key(header::AUTHORIZATION)
    );
}

#[tokio::test]
async fn an_unreachable_upstream_answers_502_without_secret_or_address() {
    let s = Setup::start().await;
    let response = s.call(Method::GET, "/http/down/ping").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let headers = all_headers(response.headers());
    let text = response.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["error"], "upstream_unavailable");
    let port = s.down.rsplit(':').next().unwrap();
    for leak in [DOWN_SECRET, SECRET, port, "/base", "127.0.0.1"] {
        assert!(
            !text.contains(leak) && !headers.contains(leak),
            "`{leak}` leaked: {headers}{text}"
        );
    }

    let outcome = &s
        .events(s.grant.task_id.as_str(), audit::kinds::CALL_OUTCOME, 1)
        .await[0];
    assert_eq!(outcome.body.detail.to_value()["status"], 502);
    assert_eq!(outcome.body.detail.to_value()["upstream_reached"], false);
    let metrics = s
        .client
        .get(format!("{}/metrics", s.remit.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("remit_upstream_errors_total{tool=\"down\"} 1\n"),
        "{metrics}"
    );
}

/// DESIGN.md invariant 1: each request misses exactly one requirement and is refused with
/// its own code, and the upstream sees none of them.
#[tokio::test]
async fn no_request_missing_one_requirement_reaches_the_upstream() {
    let s = Setup::start().await;
    let base = &s.remit.base;
    let path = "/http/gh/repos/octo/hello/issues";
    let url = format!("{base}{path}");
    let token = s.grant.token.expose().to_string();
    let dpop = |proof: String| {
        s.client
            .get(&url)
            .header("authorization", format!("DPoP {token}"))
            .header("dpop", proof)
    };

    let intruder = s.remit.agent("intruder").await;
    let by_other_key = intruder
        .key
        .sign_proof("GET", &url, Some(&token), s.remit.now(), &unique("p"))
        .unwrap();
    let for_other_url = s
        .agent
        .key
        .sign_proof(
            "GET",
            &format!("{base}/http/gh/repos/octo/other/issues"),
            Some(&token),
            s.remit.now(),
            &unique("p"),
        )
        .unwrap();
    let for_other_method = s
        .agent
        .key
        .sign_proof("POST", &url, Some(&token), s.remit.now(), &unique("p"))
        .unwrap();

    // A jti already accepted once (on a call that scope then refused) is spent.
    let spent = unique("spent");
    let elsewhere = format!("{base}/http/gh/repos/elsewhere/x/issues");
    let first = s
        .agent
        .key
        .sign_proof("GET", &elsewhere, Some(&token), s.remit.now(), &spent)
        .unwrap();
    let pre = s
        .client
        .get(&elsewhere)
        .header("authorization", format!("DPoP {token}"))
        .header("dpop", first);
    check("spending the jti", pre, 403, "out_of_scope").await;
    let replayed = s
        .agent
        .key
        .sign_proof("GET", &url, Some(&token), s.remit.now(), &spent)
        .unwrap();

    let garbage = "not.a.token";
    let garbage_proof = s
        .agent
        .key
        .sign_proof("GET", &url, Some(garbage), s.remit.now(), &unique("p"))
        .unwrap();
    // A character in the middle of the signature: the last one may hold only padding bits.
    let mut tampered = token.clone().into_bytes();
    let at = tampered.len() - 20;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let tampered_proof = s
        .agent
        .key
        .sign_proof("GET", &url, Some(&tampered), s.remit.now(), &unique("p"))
        .unwrap();

    let revoked = s.remit.grant(&s.agent, scopes()).await;
    s.remit
        .authority
        .revoke(
            &s.remit.admin,
            RevocationKind::Task,
            revoked.task_id.as_str(),
            "test",
        )
        .await
        .unwrap();
    let completed = s.remit.grant(&s.agent, scopes()).await;
    let complete_url = format!("{base}/v1/tasks/{}/complete", completed.task_id);
    let complete_proof = s.remit.proof(&s.agent, "POST", &complete_url, &completed);
    s.remit
        .authority
        .complete_task(
            completed.task_id.as_str(),
            completed.token.expose(),
            Some(&complete_proof),
        )
        .await
        .unwrap();

    let table: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        ("no token", s.client.get(&url), 401, "token_missing"),
        (
            "token without proof",
            s.client
                .get(&url)
                .header("authorization", format!("DPoP {token}")),
            401,
            "proof_missing",
        ),
        (
            "proof by another key",
            dpop(by_other_key),
            401,
            "proof_key_mismatch",
        ),
        (
            "proof for another URL",
            dpop(for_other_url),
            401,
            "proof_wrong_url",
        ),
        (
            "proof for another method",
            dpop(for_other_method),
            401,
            "proof_wrong_method",
        ),
        ("replayed proof", dpop(replayed), 401, "proof_replayed"),
        (
            "garbage token",
            s.client
                .get(&url)
                .header("authorization", format!("DPoP {garbage}"))
                .header("dpop", garbage_proof),
            401,
            "token_malformed",
        ),
        (
            "tampered token",
            s.client
                .get(&url)
                .header("authorization", format!("DPoP {tampered}"))
                .header("dpop", tampered_proof),
            401,
            "token_bad_signature",
        ),
        (
            "revoked task",
            s.call_as(&s.agent, &revoked, Method::GET, path),
            401,
            "revoked",
        ),
        // Completing a task revokes it, so that every node learns of it through the feed.
        (
            "completed task",
            s.call_as(&s.agent, &completed, Method::GET, path),
            401,
            "revoked",
        ),
        (
            "out-of-scope action",
            s.call(Method::DELETE, "/http/gh/repos/octo/hello"),
            403,
            "out_of_scope",
        ),
        (
            "out-of-scope resource",
            s.call(Method::GET, "/http/gh/repos/other/repo/issues"),
            403,
            "out_of_scope",
        ),
        (
            "cedar forbid: bearer near secrets",
            s.bearer("/http/gh-bearer/secrets/db"),
            403,
            "policy_denied",
        ),
        (
            "bearer on a tool without bearer tokens",
            s.bearer(path),
            401,
            "proof_missing",
        ),
    ];
    for (name, request, status, code) in table {
        let body = check(name, request, status, code).await;
        if name.starts_with("cedar") {
            assert_eq!(
                body["policies"],
                json!(["call.no-bearer-near-secrets"]),
                "{body}"
            );
        }
    }
    assert_eq!(
        s.upstream.count(),
        0,
        "a refused request reached the upstream: {:?}",
        s.upstream.seen()
    );

    // The same request with every requirement met passes, so the table above can fail.
    let proof = s.remit.proof(&s.agent, "GET", &url, &s.grant);
    let response = dpop(proof.clone()).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(s.upstream.count(), 1);
    // The very proof that just passed is spent.
    check("the same proof again", dpop(proof), 401, "proof_replayed").await;
    assert_eq!(s.upstream.count(), 1);
}

#[tokio::test]
async fn a_revocation_bites_on_the_very_next_call() {
    let s = Setup::start().await;
    let path = "/http/gh/repos/octo/hello/issues";
    assert_eq!(
        s.call(Method::GET, path).send().await.unwrap().status(),
        StatusCode::OK
    );
    s.remit
        .authority
        .revoke(
            &s.remit.admin,
            RevocationKind::Task,
            s.grant.task_id.as_str(),
            "compromised",
        )
        .await
        .unwrap();
    let body = check(
        "after revocation",
        s.call(Method::GET, path),
        401,
        "revoked",
    )
    .await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains(s.grant.task_id.as_str()),
        "{body}"
    );
    assert_eq!(s.upstream.count(), 1);
}

#[tokio::test]
async fn a_bearer_tool_accepts_task_tokens_without_proof_and_records_the_mode() {
    let s = Setup::start().await;
    let response = s
        .bearer("/http/gh-bearer/repos/octo/hello/issues")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("\"issues\":[1,2,3]")
    );
    let seen = s.upstream.seen();
    assert_eq!(
        seen[0].headers[header::AUTHORIZATION],
        format!("Bearer {SECRET}").as_str()
    );

    let decisions = s
        .events(s.grant.task_id.as_str(), audit::kinds::CALL_DECISION, 1)
        .await;
    assert_eq!(decisions[0].body.detail.to_value()["mode"], "bearer");
    assert_eq!(decisions[0].body.decision.as_deref(), Some("allow"));
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let limits = Limits {
        per_agent: Rate {
            per_second: 100.0,
            burst: 100,
        },
        per_task: Rate {
            per_second: 0.001,
            burst: 2,
        },
    };
    let s = Setup::start_with(limits, None).await;
    let path = "/http/gh/repos/octo/hello/issues";
    for _ in 0..2 {
        assert_eq!(
            s.call(Method::GET, path).send().await.unwrap().status(),
            StatusCode::OK
        );
    }
    let response = s.call(Method::GET, path).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = response.headers()[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1, "{retry_after}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(s.upstream.count(), 2);
}

#[tokio::test]
async fn the_outcome_is_recorded_after_the_body_and_metrics_show_the_decisions() {
    let s = Setup::start().await;
    let response = s
        .call(Method::GET, "/http/gh/repos/octo/hello/issues?x=1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let length = response.bytes().await.unwrap().len();
    check(
        "denied",
        s.call(Method::DELETE, "/http/gh/repos/octo/hello"),
        403,
        "out_of_scope",
    )
    .await;

    let task = s.grant.task_id.as_str();
    let outcomes = s.events(task, audit::kinds::CALL_OUTCOME, 1).await;
    assert_eq!(
        outcomes.len(),
        1,
        "a denied call has no outcome: {outcomes:?}"
    );
    let outcome = &outcomes[0];
    let decisions = s.events(task, audit::kinds::CALL_DECISION, 2).await;
    let allowed = decisions
        .iter()
        .find(|e| e.body.decision.as_deref() == Some("allow"))
        .unwrap();
    assert_eq!(outcome.body.detail.to_value()["audit_seq"], allowed.seq);
    assert!(outcome.seq > allowed.seq);
    assert_eq!(outcome.body.detail.to_value()["tool"], "gh");
    assert_eq!(outcome.body.detail.to_value()["action"], "list_issues");
    assert_eq!(outcome.body.detail.to_value()["status"], 200);
    assert_eq!(outcome.body.detail.to_value()["bytes"], length);
    assert_eq!(outcome.body.detail.to_value()["complete"], true);
    assert!(outcome.body.detail.to_value()["duration_ms"].is_u64());
    assert_eq!(
        outcome.body.agent.as_deref(),
        Some(s.grant.spiffe_id.as_str())
    );
    assert!(!serde_json::to_string(&outcomes).unwrap().contains(SECRET));
    // The event as the log keeps it, as a snapshot. Its place in the log races the denied
    // call's decision, and its duration is the machine's: both are checked above, not kept.
    let mut kept = serde_json::to_value(outcome).unwrap();
    kept["seq"] = json!("[SEQ]");
    kept["detail"]["audit_seq"] = json!("[SEQ of the decision]");
    kept["detail"]["duration_ms"] = json!("[DURATION]");
    insta::with_settings!({ filters => store::testing::SNAPSHOT_FILTERS.to_vec() }, {
        insta::assert_json_snapshot!("call_outcome_event", kept);
    });

    let metrics = s
        .client
        .get(format!("{}/metrics", s.remit.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "remit_decisions_total{outcome=\"allow\",tool=\"gh\",reason=\"allowed\"} 1\n",
        "remit_decisions_total{outcome=\"deny\",tool=\"gh\",reason=\"out_of_scope\"} 1\n",
        "remit_upstream_seconds_count{tool=\"gh\"} 1\n",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in:\n{metrics}");
    }
    // The store writer's counters: at least the two decisions and the outcome went through it.
    let counter = |name: &str| -> f64 {
        let prefix = format!("{name} ");
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
            .parse()
            .unwrap()
    };
    assert!(counter("remit_store_write_operations_total") >= 3.0);
    assert!(counter("remit_store_write_batches_total") >= 1.0);
    assert!(counter("remit_store_write_committing_seconds_total") > 0.0);
}

#[tokio::test]
async fn challenges_point_at_the_protected_resource_metadata() {
    let s = Setup::start().await;
    let metadata_url = format!("{}/.well-known/oauth-protected-resource", s.remit.base);
    let metadata: Value = s
        .client
        .get(&metadata_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(metadata["resource"], s.remit.base.as_str());

    let response = s
        .client
        .get(format!("{}/http/gh/repos/octo/hello/issues", s.remit.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let challenge = response.headers()[header::WWW_AUTHENTICATE]
        .to_str()
        .unwrap()
        .to_string();
    assert!(challenge.starts_with("DPoP "), "{challenge}");
    assert!(
        challenge.contains(&format!("resource_metadata=\"{metadata_url}\"")),
        "{challenge}"
    );
    assert_eq!(s.upstream.count(), 0);
}

/// DESIGN.md invariant 4 through the gateway: a store that cannot be written denies the call,
/// and the upstream sees nothing. PostgreSQL behind a TCP relay that the test cuts.
#[tokio::test]
async fn an_unreachable_store_denies_and_forwards_nothing() {
    let Some(server) = store::testing::postgres_url(
        "the PostgreSQL test `http::an_unreachable_store_denies_and_forwards_nothing`",
    ) else {
        return;
    };
    let schema = store::testing::PostgresSchema::create(&server)
        .await
        .unwrap();
    let relay = store::testing::Relay::start(store::testing::host_port(&schema.url))
        .await
        .unwrap();
    let s = Setup::start_with(Limits::default(), Some(relay.reroute(&schema.url))).await;
    assert_eq!(s.remit.authority.store().kind(), "postgres");
    let path = "/http/gh/repos/octo/hello/issues";
    assert_eq!(
        s.call(Method::GET, path).send().await.unwrap().status(),
        StatusCode::OK
    );

    relay.cut();
    let body = check(
        "store gone",
        s.call(Method::GET, path),
        503,
        "store_unavailable",
    )
    .await;
    assert!(
        body["message"].as_str().unwrap().contains("fails closed"),
        "{body}"
    );
    assert_eq!(s.upstream.count(), 1);

    drop(s);
    schema.drop_schema().await.unwrap();
}

/// Containment through the gateway: probing for a tool remit does not front is off-script; the
/// agent is quarantined and its task dies with it.
#[tokio::test]
async fn probing_for_tools_quarantines_the_agent() {
    let upstream = Upstream::start().await;
    let down = closed_port().await;
    let env = [("UPSTREAM_TOKEN", SECRET), ("DOWN_KEY", DOWN_SECRET)];
    let remit = Remit::start_contained(&tools(&upstream.base, &down), &env).await;
    let agent = remit.agent("prober").await;
    let grant = remit.grant(&agent, scopes()).await;
    let client = reqwest::Client::new();
    let call = |path: &str| {
        let url = format!("{}{path}", remit.base);
        let proof = remit.proof(&agent, "GET", &url, &grant);
        client
            .get(url)
            .header("authorization", format!("DPoP {}", grant.token.expose()))
            .header("dpop", proof)
    };
    check("probe", call("/http/secrets/list"), 404, "tool_unknown").await;
    let status = remit
        .authority
        .get_agent(&remit.admin, "prober")
        .await
        .unwrap()
        .status;
    assert_eq!(status, model::AgentStatus::Quarantined);
    check(
        "after",
        call("/http/gh/repos/acme/api/issues"),
        401,
        "revoked",
    )
    .await;
    assert_eq!(upstream.count(), 0);
}

#[tokio::test]
async fn a_step_up_call_answers_403_with_an_approval_id_and_passes_once_approved() {
    let upstream = Upstream::start().await;
    let tools = format!(
        r#"
[[tools]]
name = "iam"
kind = "http"
upstream = "{}"
auth = {{ bearer = "env:UPSTREAM_TOKEN" }}
routes = [
  {{ method = "POST", path = "/repos/{{owner}}/{{repo}}/issues", action = "attach_policy", class = "write", resource = "{{owner}}/{{repo}}" }},
]
"#,
        upstream.base
    );
    let remit = Remit::start(&tools, &[("UPSTREAM_TOKEN", SECRET)]).await;
    let agent = remit.agent("ops-bot").await;
    let grant = remit
        .grant(
            &agent,
            json!([{ "tool": "iam", "actions": ["attach_policy"] }]),
        )
        .await;
    let client = reqwest::Client::new();
    let call = || {
        let url = format!("{}/http/iam/repos/octo/roles/issues", remit.base);
        let proof = remit.proof(&agent, "POST", &url, &grant);
        client
            .post(url)
            .header("authorization", format!("DPoP {}", grant.token.expose()))
            .header("dpop", proof)
            .body("{}")
    };

    let refused = check("first", call(), 403, "approval_required").await;
    let id = refused["approval_id"].as_str().unwrap().to_string();
    assert!(id.starts_with("apr_"), "{refused}");
    assert_eq!(refused["decision"], "approval_required");
    assert_eq!(upstream.count(), 0);
    // Asking again before anyone decided reuses the same approval.
    let again = check("again", call(), 403, "approval_required").await;
    assert_eq!(again["approval_id"], id.as_str());

    remit
        .authority
        .decide_approval(&remit.admin, &id, true, "change ticket OPS-1")
        .await
        .unwrap();
    let response = call().send().await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(upstream.count(), 1);
    // Spent: the same request needs a new approval.
    let next = check("after", call(), 403, "approval_required").await;
    assert_ne!(next["approval_id"], id.as_str());
    assert_eq!(upstream.count(), 1);
}

/// What an agent sees of a refusal: the status, the headers that tell it what to do next,
/// and the `{"error","message",…}` body.
pub(crate) async fn refusal(response: reqwest::Response) -> Value {
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|value| json!(value.to_str().unwrap()))
            .unwrap_or(Value::Null)
    };
    let (www_authenticate, retry_after) = (header("www-authenticate"), header("retry-after"));
    let body: Value = response.json().await.unwrap_or(Value::Null);
    json!({
        "status": status,
        "www-authenticate": www_authenticate,
        "retry-after": retry_after,
        "body": body,
    })
}

/// The refusal bodies of the HTTP gateway, one of each kind an agent meets most, as a
/// snapshot: a change to what an agent is told shows up in review.
#[tokio::test]
async fn the_http_refusals_an_agent_sees() {
    let limits = Limits {
        per_agent: Rate {
            per_second: 1000.0,
            burst: 1000,
        },
        per_task: Rate {
            per_second: 0.0001,
            burst: 2,
        },
    };
    let s = Setup::start_with(limits, None).await;
    let path = "/http/gh/repos/octo/hello/issues";
    let mut refusals = serde_json::Map::new();

    let scoped = s.remit.grant(&s.agent, scopes()).await;
    let response = s
        .call_as(
            &s.agent,
            &scoped,
            Method::DELETE,
            "/http/gh/repos/octo/hello",
        )
        .send()
        .await
        .unwrap();
    refusals.insert("out_of_scope".into(), refusal(response).await);

    let revoked = s.remit.grant(&s.agent, scopes()).await;
    s.remit
        .authority
        .revoke(
            &s.remit.admin,
            RevocationKind::Task,
            revoked.task_id.as_str(),
            "incident 42",
        )
        .await
        .unwrap();
    let response = s
        .call_as(&s.agent, &revoked, Method::GET, path)
        .send()
        .await
        .unwrap();
    refusals.insert("revoked".into(), refusal(response).await);

    let response = s
        .client
        .get(format!("{}{path}", s.remit.base))
        .header("authorization", format!("DPoP {}", s.grant.token.expose()))
        .send()
        .await
        .unwrap();
    refusals.insert("proof_missing".into(), refusal(response).await);

    // A burst of two per task: the third call is refused.
    let limited = s.remit.grant(&s.agent, scopes()).await;
    for _ in 0..2 {
        let response = s
            .call_as(&s.agent, &limited, Method::GET, path)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    let response = s
        .call_as(&s.agent, &limited, Method::GET, path)
        .send()
        .await
        .unwrap();
    let limited = refusal(response).await;
    refusals.insert("rate_limited".into(), limited);

    let spent = s.remit.grant_with_budget(&s.agent, scopes(), 1).await;
    let response = s
        .call_as(&s.agent, &spent, Method::GET, path)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let response = s
        .call_as(&s.agent, &spent, Method::GET, path)
        .send()
        .await
        .unwrap();
    refusals.insert("budget_exhausted".into(), refusal(response).await);

    let response = s.call(Method::GET, "/http/nope/x").send().await.unwrap();
    refusals.insert("tool_unknown".into(), refusal(response).await);

    insta::with_settings!({ filters => store::testing::SNAPSHOT_FILTERS.to_vec() }, {
        insta::assert_json_snapshot!(Value::Object(refusals));
    });
    // Three allowed calls reached the upstream, no refused one.
    assert_eq!(s.upstream.count(), 3);
}
