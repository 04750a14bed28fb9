//! MCP tools: `/mcp/{tool}` fronts an MCP server speaking the streamable HTTP transport. Every
//! HTTP request is authenticated once (its proof is verified and spent once); every tool call,
//! resource read and prompt inside it is decided on its own; `tools/list` answers are filtered
//! to what the task may call; answers (JSON or SSE) are scrubbed of upstream secrets.
//!
//! Batches (removed from MCP in 2025-06-18) pass when they hold at most one message that needs
//! a decision: a request proof can be spent only once, so a second tool call in the same batch
//! is refused with a JSON-RPC error and never reaches the upstream.

mod stream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use control::CallVerdict;
use http_body_util::{BodyExt, Limited};
use model::ActionClass;
use serde_json::{Value, json};

use crate::caller::{self, Presented};
use crate::catalog::{Classified, ToolKind, ToolSpec};
use crate::error::Refusal;
use crate::forward::read_limited;
use crate::{Early, Gateway};

/// Largest JSON answer (or SSE event) read from an upstream before it is filtered.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// How long an upstream may take to send its response head.
const UPSTREAM_HEAD_TIMEOUT: Duration = Duration::from_secs(60);

/// JSON-RPC error codes remit answers with.
const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const INVALID_PARAMS: i64 = -32602;
/// The call is outside the task's scopes or policy denies it.
const CALL_DENIED: i64 = -32003;
/// The task's budget is spent or the caller is over its rate.
const CALL_LIMITED: i64 = -32004;

/// Headers an agent's request may carry to the upstream. Everything else (its
/// `Authorization`, `DPoP`, `Cookie`, hop-by-hop headers) stays with remit.
const REQUEST_HEADERS: [&str; 5] = [
    "accept",
    "content-type",
    "mcp-session-id",
    "mcp-protocol-version",
    "last-event-id",
];
/// Headers of the upstream's answer passed back to the agent.
const RESPONSE_HEADERS: [&str; 4] = [
    "content-type",
    "mcp-session-id",
    "mcp-protocol-version",
    "cache-control",
];

/// Methods that act on nothing: they pass once the caller is authenticated.
const DISCOVERY: [&str; 6] = [
    "initialize",
    "ping",
    "tools/list",
    "resources/list",
    "resources/templates/list",
    "prompts/list",
];

/// The prefix of the methods that are notifications by the MCP specification: they act on
/// nothing and pass once the caller is authenticated, with or without an `id`.
const NOTIFICATIONS: &str = "notifications/";

/// Verdict codes that refuse one message but leave its caller authenticated (token, proof,
/// revocation and task state all passed): the other messages of the request may proceed.
const ITEM_CODES: [&str; 5] = [
    "out_of_scope",
    "policy_denied",
    "approval_required",
    "approval_denied",
    "budget_exhausted",
];

pub(crate) async fn handle(
    State(gateway): State<Arc<Gateway>>,
    Path(tool): Path<String>,
    request: Request,
) -> Response {
    let metadata = gateway.resource_metadata_url();
    let (parts, body) = request.into_parts();
    let Some(tool) = gateway
        .catalog()
        .get(&tool)
        .filter(|t| t.kind == ToolKind::Mcp)
        .cloned()
    else {
        let url = gateway.public_url(parts.uri.path());
        return gateway
            .unknown_tool(&tool, &parts.headers, &parts.method, &url)
            .await;
    };
    let url = gateway.public_url(parts.uri.path());
    let early = Early {
        tool: &tool,
        headers: &parts.headers,
        method: &parts.method,
        url: &url,
        path: "",
    };
    if !matches!(parts.method, Method::POST | Method::GET | Method::DELETE) {
        let message = "MCP takes POST, GET and DELETE";
        let mut answer = Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            message,
            metadata,
        )
        .into_response();
        answer
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, POST, DELETE"));
        return gateway
            .refuse_early(
                &early,
                &early.action(),
                "method_not_allowed",
                message,
                answer,
            )
            .await;
    }
    let presented = match caller::presented(&parts.headers, metadata) {
        Ok(presented) => presented,
        Err(refusal) => return refusal.into_response(),
    };
    let call = Call {
        gateway: &gateway,
        tool: &tool,
        presented: &presented,
        method: &parts.method,
        url: &url,
        headers: &parts.headers,
        early: &early,
    };
    match parts.method {
        Method::POST => call.post(body).await,
        // GET opens the server's SSE stream (or resumes one); DELETE ends the session.
        Method::GET => call.session_message("stream/open").await,
        _ => call.session_message("session/end").await,
    }
}

/// One HTTP request to an MCP tool.
struct Call<'a> {
    gateway: &'a Gateway,
    tool: &'a ToolSpec,
    presented: &'a Presented<'a>,
    method: &'a Method,
    url: &'a str,
    headers: &'a HeaderMap,
    /// The request as far as it was read, for refusals before any message is decided.
    early: &'a Early<'a>,
}

/// What one JSON-RPC message needs before it may pass.
enum Need {
    /// Nothing beyond an authenticated caller.
    Session,
    /// A decision of its own.
    Decision {
        classified: Classified,
        arguments: String,
    },
    /// Refused here, never forwarded.
    Refused { code: i64, message: String },
}

impl Call<'_> {
    async fn post(&self, body: Body) -> Response {
        let limit = self.gateway.body_limit(self.tool);
        let bytes = match read_limited(body, limit).await {
            Ok(bytes) => bytes,
            Err(refused) => {
                let message = refused.message(limit, &self.tool.name);
                let answer = rpc_refusal(refused.status(), INVALID_REQUEST, &message);
                return self.refuse(refused.code(), &message, answer).await;
            }
        };
        let Ok(parsed) = serde_json::from_slice::<Value>(&bytes) else {
            let message = "the body is not JSON";
            let answer = rpc_refusal(StatusCode::BAD_REQUEST, PARSE_ERROR, message);
            return self.refuse("parse_error", message, answer).await;
        };
        let (batch, messages) = match parsed {
            Value::Array(messages) if messages.is_empty() => {
                let message = "an empty batch";
                let answer = rpc_refusal(StatusCode::BAD_REQUEST, INVALID_REQUEST, message);
                return self.refuse("invalid_request", message, answer).await;
            }
            Value::Array(messages) => (true, messages),
            message => (false, vec![message]),
        };
        let mut needs: Vec<Need> = messages.iter().map(|message| self.need(message)).collect();

        // One proof, one verification: the request is decided once, on its only tool call
        // if it has one, else as a session message.
        let decisions = needs
            .iter()
            .filter(|need| matches!(need, Need::Decision { .. }))
            .count();
        if decisions > 1 {
            for need in &mut needs {
                if matches!(need, Need::Decision { .. }) {
                    *need = Need::Refused {
                        code: INVALID_REQUEST,
                        message:
                            "batches of calls are not supported: send each call in its own request"
                                .into(),
                    };
                }
            }
        }
        if needs
            .iter()
            .all(|need| matches!(need, Need::Refused { .. }))
        {
            // Nothing in the request may pass: recorded as the refusal it is, not as a
            // session message.
            let reason = needs
                .iter()
                .find_map(|need| match need {
                    Need::Refused { message, .. } => Some(message.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            let action = summary(&messages);
            let answer = sort(batch, messages, needs, None).map_or_else(
                |answer| answer,
                |(_, errors)| json_response(StatusCode::OK, shape(batch, errors)),
            );
            return self
                .gateway
                .refuse_early(self.early, &action, "invalid_request", &reason, answer)
                .await;
        }
        let decided = needs
            .iter()
            .position(|need| matches!(need, Need::Decision { .. }));
        let verdict = match decided.and_then(|i| needs.get(i)) {
            Some(Need::Decision {
                classified,
                arguments,
            }) => {
                self.gateway
                    .decide(
                        self.tool,
                        self.presented,
                        self.method,
                        self.url,
                        classified,
                        arguments,
                    )
                    .await
            }
            _ => {
                self.gateway
                    .decide_session(
                        self.tool,
                        self.presented,
                        self.method,
                        self.url,
                        &summary(&messages),
                    )
                    .await
            }
        };
        let action = match decided.and_then(|i| needs.get(i)) {
            Some(Need::Decision { classified, .. }) => classified.action.clone(),
            _ => summary(&messages),
        };
        if !verdict.is_allow() {
            if !ITEM_CODES.contains(&verdict.code) {
                // The caller itself is refused (token, proof, revocation, rate, store): the
                // answer is HTTP, so that MCP clients see a 401 and its challenge.
                return Refusal::from_verdict(&verdict, self.gateway.resource_metadata_url())
                    .into_response();
            }
            if let Some(need) = decided.and_then(|i| needs.get_mut(i)) {
                let refusal = Refusal::from_verdict(&verdict, self.gateway.resource_metadata_url());
                let code = if refusal.status == StatusCode::TOO_MANY_REQUESTS {
                    CALL_LIMITED
                } else {
                    CALL_DENIED
                };
                *need = Need::Refused {
                    code,
                    message: refusal.message.clone(),
                };
                // Keep the whole refusal body for the error's `data`.
                let data = refusal.body();
                return self
                    .forward_post(
                        batch,
                        messages,
                        needs,
                        Some(data),
                        &verdict,
                        &action,
                        &bytes,
                    )
                    .await;
            }
        }
        self.forward_post(batch, messages, needs, None, &verdict, &action, &bytes)
            .await
    }

    /// A request refused before any of its messages is decided, authenticated and recorded.
    async fn refuse(&self, code: &'static str, message: &str, answer: Response) -> Response {
        self.gateway
            .refuse_early(self.early, &self.early.action(), code, message, answer)
            .await
    }

    /// Classifies one JSON-RPC message.
    fn need(&self, message: &Value) -> Need {
        let Some(object) = message.as_object() else {
            return Need::Refused {
                code: INVALID_REQUEST,
                message: "a JSON-RPC message is an object".into(),
            };
        };
        let method = object.get("method").and_then(Value::as_str);
        let params = object.get("params");
        let name = || params.and_then(|p| p.get("name")).and_then(Value::as_str);
        // The method decides, never the presence of an `id`: a `tools/call` shaped as a
        // notification is still a tool call, and an upstream may well execute it.
        match method {
            // Responses from the client (to sampling, elicitation, roots) act on no tool.
            None if object.contains_key("result") || object.contains_key("error") => Need::Session,
            None => Need::Refused {
                code: INVALID_REQUEST,
                message: "a JSON-RPC message needs a `method`".into(),
            },
            // Notifications by the specification's own name, and methods that act on nothing.
            Some(method) if method.starts_with(NOTIFICATIONS) || DISCOVERY.contains(&method) => {
                Need::Session
            }
            Some("tools/call") => {
                let Some(name) = name() else {
                    return Need::Refused {
                        code: INVALID_PARAMS,
                        message: "`tools/call` needs `params.name`".into(),
                    };
                };
                let arguments = params.and_then(|p| p.get("arguments"));
                let classified = self.tool.classify_mcp_tool(name, arguments);
                let mut canonical = String::new();
                audit::canonical_json(arguments.unwrap_or(&json!({})), &mut canonical);
                Need::Decision {
                    classified,
                    arguments: canonical,
                }
            }
            Some("resources/read") => {
                let Some(uri) = params.and_then(|p| p.get("uri")).and_then(Value::as_str) else {
                    return Need::Refused {
                        code: INVALID_PARAMS,
                        message: "`resources/read` needs `params.uri`".into(),
                    };
                };
                self.read_decision("resources/read", uri, params)
            }
            Some("prompts/get") => {
                let Some(name) = name() else {
                    return Need::Refused {
                        code: INVALID_PARAMS,
                        message: "`prompts/get` needs `params.name`".into(),
                    };
                };
                self.read_decision(name, "", params.and_then(|p| p.get("arguments")))
            }
            // Anything else may act on the server (subscriptions, log levels, methods of later
            // protocol versions): it fails closed as an `admin` action named after the method.
            Some(method) => Need::Decision {
                classified: Classified {
                    action: method.to_string(),
                    class: ActionClass::Admin,
                    resource: String::new(),
                    sensitivity: self.tool.sensitivity.clone(),
                },
                arguments: canonical(params),
            },
        }
    }

    fn read_decision(&self, action: &str, resource: &str, arguments: Option<&Value>) -> Need {
        Need::Decision {
            classified: Classified {
                action: action.to_string(),
                class: ActionClass::Read,
                resource: resource.to_string(),
                sensitivity: self.tool.sensitivity.clone(),
            },
            arguments: canonical(arguments),
        }
    }

    /// Forwards what may pass and answers the rest with JSON-RPC errors.
    #[expect(
        clippy::too_many_arguments,
        reason = "one request's parts, passed once"
    )]
    async fn forward_post(
        &self,
        batch: bool,
        messages: Vec<Value>,
        needs: Vec<Need>,
        denial_data: Option<Value>,
        verdict: &CallVerdict,
        action: &str,
        original: &Bytes,
    ) -> Response {
        let (passing, errors) = match sort(batch, messages, needs, denial_data) {
            Ok(sorted) => sorted,
            Err(answer) => return answer,
        };
        let body = if batch {
            Bytes::from(Value::Array(passing).to_string())
        } else {
            // A single message passes byte for byte.
            original.clone()
        };
        let filter = self.tools_filter(verdict);
        let started = Instant::now();
        let upstream = match self.send(Method::POST, Body::from(body)).await {
            Ok(upstream) => upstream,
            Err(response) => {
                self.outcome(verdict, action, response.status(), started);
                return response;
            }
        };
        self.answer(upstream, filter, batch, errors, verdict, action, started)
            .await
    }

    /// GET (the server's stream) and DELETE (end of session): authenticate, then forward.
    async fn session_message(&self, action: &str) -> Response {
        let verdict = self
            .gateway
            .decide_session(self.tool, self.presented, self.method, self.url, action)
            .await;
        if !verdict.is_allow() {
            return Refusal::from_verdict(&verdict, self.gateway.resource_metadata_url())
                .into_response();
        }
        let filter = self.tools_filter(&verdict);
        let started = Instant::now();
        match self.send(self.method.clone(), Body::empty()).await {
            Ok(upstream) => {
                self.answer(
                    upstream,
                    filter,
                    false,
                    Vec::new(),
                    &verdict,
                    action,
                    started,
                )
                .await
            }
            Err(response) => {
                self.outcome(&verdict, action, response.status(), started);
                response
            }
        }
    }

    /// The tools this task may call, for filtering `tools/list` answers: the scope ceiling
    /// (a scope of this tool naming the MCP tool or `*` and allowing its class, whatever its
    /// resources).
    fn tools_filter(&self, verdict: &CallVerdict) -> ToolsFilter {
        let allowed = verdict.claims.as_ref().map(|claims| {
            claims
                .scope
                .0
                .iter()
                .filter(|scope| scope.tool == self.tool.name)
                .flat_map(|scope| {
                    scope
                        .actions
                        .iter()
                        .map(|action| (action.clone(), scope.classes.clone()))
                })
                .collect::<Vec<_>>()
        });
        ToolsFilter {
            allowed: allowed.unwrap_or_default(),
            classes: self
                .tool
                .mcp_tools
                .iter()
                .map(|(name, entry)| (name.clone(), entry.class))
                .collect(),
        }
    }

    async fn send(
        &self,
        method: Method,
        body: Body,
    ) -> Result<http::Response<hyper::body::Incoming>, Response> {
        let mut request = http::Request::builder()
            .method(method)
            .uri(self.tool.upstream.clone());
        if let Some(headers) = request.headers_mut() {
            for name in REQUEST_HEADERS {
                for value in self.headers.get_all(name) {
                    headers.append(HeaderName::from_static(name), value.clone());
                }
            }
            if let Some((name, value)) = self.tool.auth.header() {
                headers.insert(name, value);
            }
        }
        let request = request
            .body(body)
            .map_err(|_| upstream_failure("the upstream request could not be built"))?;
        let started = Instant::now();
        let result = tokio::time::timeout(
            UPSTREAM_HEAD_TIMEOUT,
            self.gateway.upstream.client.request(request),
        )
        .await;
        let failed = !matches!(result, Ok(Ok(_)));
        self.gateway
            .metrics
            .upstream(&self.tool.name, started.elapsed(), failed);
        match result {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => {
                tracing::warn!(tool = %self.tool.name, "mcp upstream unreachable: {error}");
                Err(upstream_failure("the MCP server cannot be reached"))
            }
            Err(_) => Err(upstream_failure("the MCP server did not answer in time")),
        }
    }

    /// Turns the upstream's answer into the agent's: filtered, scrubbed, with the errors of
    /// refused messages added in the same content type.
    #[expect(
        clippy::too_many_arguments,
        reason = "one request's parts, passed once"
    )]
    async fn answer(
        &self,
        upstream: http::Response<hyper::body::Incoming>,
        filter: ToolsFilter,
        batch: bool,
        errors: Vec<Value>,
        verdict: &CallVerdict,
        action: &str,
        started: Instant,
    ) -> Response {
        let (parts, body) = upstream.into_parts();
        let scrubber = Scrubber::new(&self.gateway.upstream.secrets);
        if parts.status == StatusCode::UNAUTHORIZED {
            // The upstream refused remit's own credential; its challenge would mislead the
            // agent's MCP client into an authorization flow with the wrong server.
            self.outcome(verdict, action, parts.status, started);
            return upstream_failure("the MCP server refused remit's credential");
        }
        let mut headers = HeaderMap::new();
        for name in RESPONSE_HEADERS {
            for value in parts.headers.get_all(name) {
                if value.to_str().is_ok_and(|text| !scrubber.finds(text)) {
                    headers.append(HeaderName::from_static(name), value.clone());
                }
            }
        }
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if content_type.starts_with("text/event-stream") {
            let outcome = Outcome::new(self, verdict, action, parts.status, started);
            let events = stream::filter(body, filter, scrubber, errors, outcome);
            let mut response = Response::new(Body::from_stream(events));
            *response.status_mut() = parts.status;
            *response.headers_mut() = headers;
            return response;
        }
        let bytes = match Limited::new(body, MAX_RESPONSE_BYTES).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => {
                self.outcome(verdict, action, StatusCode::BAD_GATEWAY, started);
                return upstream_failure("the MCP server's answer is too large or broken");
            }
        };
        self.outcome(verdict, action, parts.status, started);
        let status = if parts.status == StatusCode::ACCEPTED && !errors.is_empty() {
            StatusCode::OK
        } else {
            parts.status
        };
        // A JSON answer goes back as JSON: as it came when it needs nothing (the common case),
        // else filtered, scrubbed and joined by remit's own errors. Anything else is text,
        // scrubbed as such.
        let json = if errors.is_empty() && scrubber.passes_unchanged(&bytes) {
            Some(bytes.clone())
        } else {
            match serde_json::from_slice::<Value>(&bytes) {
                Ok(mut value) => {
                    filter.apply(&mut value);
                    scrubber.value(&mut value);
                    let body = match (value, errors.is_empty()) {
                        (value, true) => value,
                        (Value::Array(mut items), false) => {
                            items.extend(errors);
                            Value::Array(items)
                        }
                        (value, false) => {
                            let mut items = vec![value];
                            items.extend(errors);
                            shape(batch, items)
                        }
                    };
                    Some(Bytes::from(body.to_string()))
                }
                Err(_) if bytes.is_empty() && !errors.is_empty() => {
                    Some(Bytes::from(shape(batch, errors).to_string()))
                }
                Err(_) => None,
            }
        };
        let body = match json {
            Some(json) => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                json
            }
            None => Bytes::from(scrubber.text(&String::from_utf8_lossy(&bytes))),
        };
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        response
    }

    fn outcome(&self, verdict: &CallVerdict, action: &str, status: StatusCode, started: Instant) {
        Outcome::new(self, verdict, action, status, started).finish();
    }
}

/// The key of a `tools/list` result's tool array, which [`ToolsFilter`] narrows.
const TOOLS_KEY: &str = "tools";

/// Keeps only the tools a task may call in `tools/list` results.
#[derive(Debug, Clone)]
pub(crate) struct ToolsFilter {
    /// Action names (or `*`) the task's scopes grant on this tool, each with the classes its
    /// scope allows (empty: every class).
    allowed: Vec<(String, Vec<ActionClass>)>,
    /// The class of each declared MCP tool; undeclared tools are `admin`.
    classes: std::collections::HashMap<String, ActionClass>,
}

impl ToolsFilter {
    fn permits(&self, name: &str) -> bool {
        let class = self
            .classes
            .get(name)
            .copied()
            .unwrap_or(ActionClass::Admin);
        self.allowed.iter().any(|(action, classes)| {
            (action == "*" || action == name) && (classes.is_empty() || classes.contains(&class))
        })
    }

    /// Filters every JSON-RPC response in `value` whose result lists tools. Any result with a
    /// `tools` array is one, whatever the stream it arrives on (a resumed stream may replay
    /// an earlier answer), so the match is on shape, not on the request's id.
    pub(crate) fn apply(&self, value: &mut Value) {
        match value {
            Value::Array(items) => items.iter_mut().for_each(|item| self.apply(item)),
            Value::Object(object) => {
                if let Some(Value::Array(tools)) =
                    object.get_mut("result").and_then(|r| r.get_mut(TOOLS_KEY))
                {
                    tools.retain(|tool| {
                        tool.get("name")
                            .and_then(Value::as_str)
                            .is_some_and(|name| self.permits(name))
                    });
                }
            }
            _ => {}
        }
    }
}

/// Replaces upstream credentials in anything going back to the agent.
#[derive(Debug, Clone)]
pub(crate) struct Scrubber {
    needles: Arc<[String]>,
}

const REDACTED: &str = "[redacted]";

impl Scrubber {
    /// `secrets` are `Upstream::secrets`: every spelling of every credential (with and
    /// without its scheme, escaped and encoded), longest first, so that a secret containing
    /// another is replaced whole.
    fn new(secrets: &Arc<[String]>) -> Scrubber {
        Scrubber {
            needles: Arc::clone(secrets),
        }
    }

    fn finds(&self, text: &str) -> bool {
        self.needles
            .iter()
            .any(|needle| text.contains(needle.as_str()))
    }

    /// Whether a JSON text may go back to the agent byte for byte: it is one JSON value, no
    /// string and no key in it holds a credential (compared after unescaping, as [`value`]
    /// compares), and no key is `tools` (a result [`ToolsFilter`] may narrow). Checked in one
    /// pass that builds no tree; an answer that fails it (invalid JSON included) takes the
    /// careful path, which parses, filters, scrubs and writes it out again.
    ///
    /// [`value`]: Scrubber::value
    pub(crate) fn passes_unchanged(&self, json: &[u8]) -> bool {
        let mut deserializer = serde_json::Deserializer::from_slice(json);
        let scan = Scan {
            scrubber: self,
            key: false,
        };
        serde::de::DeserializeSeed::deserialize(scan, &mut deserializer).is_ok()
            && deserializer.end().is_ok()
    }

    pub(crate) fn text(&self, text: &str) -> String {
        let mut out = text.to_string();
        for needle in self.needles.iter() {
            if out.contains(needle.as_str()) {
                out = out.replace(needle.as_str(), REDACTED);
            }
        }
        out
    }

    /// Scrubs every string and key of a JSON value, after JSON unescaping, so that an escaped
    /// secret cannot slip past a byte comparison.
    pub(crate) fn value(&self, value: &mut Value) {
        if self.needles.is_empty() {
            return;
        }
        match value {
            Value::String(text) if self.finds(text) => *text = self.text(text),
            Value::Array(items) => items.iter_mut().for_each(|item| self.value(item)),
            Value::Object(object) => {
                if object.keys().any(|key| self.finds(key)) {
                    let entries = std::mem::take(object);
                    for (key, value) in entries {
                        object.insert(self.text(&key), value);
                    }
                }
                object.values_mut().for_each(|item| self.value(item));
            }
            _ => {}
        }
    }
}

/// [`Scrubber::passes_unchanged`]'s walk over a JSON value (`key: false`) or an object's key
/// (`key: true`). It fails (and so stops) at the first string or key that needs the careful
/// path: a credential in either, or a key naming a tool list.
#[derive(Clone, Copy)]
struct Scan<'a> {
    scrubber: &'a Scrubber,
    key: bool,
}

impl<'de> serde::de::DeserializeSeed<'de> for Scan<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Scan<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<(), E> {
        if (self.key && text == TOOLS_KEY) || self.scrubber.finds(text) {
            Err(E::custom("the answer needs rewriting"))
        } else {
            Ok(())
        }
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        while items.next_element_seed(self)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut entries: A) -> Result<(), A::Error> {
        let key = Scan { key: true, ..self };
        let value = Scan { key: false, ..self };
        while entries.next_key_seed(key)?.is_some() {
            entries.next_value_seed(value)?;
        }
        Ok(())
    }
}

/// The outcome of a forwarded request, recorded once its answer is complete (`call.outcome`
/// in the audit log), off the response path: the decision was already durable.
pub(crate) struct Outcome {
    authority: Arc<control::Authority>,
    agent: Option<String>,
    task: Option<String>,
    tool: String,
    action: String,
    status: u16,
    started: Instant,
}

impl Outcome {
    fn new(
        call: &Call<'_>,
        verdict: &CallVerdict,
        action: &str,
        status: StatusCode,
        started: Instant,
    ) -> Outcome {
        Outcome {
            authority: Arc::clone(call.gateway.authority()),
            agent: verdict.agent.clone(),
            task: verdict.task.clone(),
            tool: call.tool.name.clone(),
            action: action.to_string(),
            status: status.as_u16(),
            started,
        }
    }

    pub(crate) fn finish(self) {
        let duration_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let time_ms = self.authority.now().saturating_mul(1000);
        let mut event = audit::EventBody::new(
            time_ms,
            audit::kinds::CALL_OUTCOME,
            self.agent
                .clone()
                .unwrap_or_else(|| "unauthenticated".into()),
        )
        .detail(
            audit::Detail::object()
                .str("action", &self.action)
                .u64("duration_ms", duration_ms)
                .u64("status", self.status.into())
                .str("tool", &self.tool)
                .finish(),
        );
        if let Some(agent) = self.agent {
            event = event.agent(agent);
        }
        if let Some(task) = self.task {
            event = event.task(task);
        }
        self.authority.record_later(event);
    }
}

/// Splits a request's messages into those that pass and remit's JSON-RPC errors for those
/// refused; when none passes, `Err` holds the whole answer.
#[expect(
    clippy::result_large_err,
    reason = "the answer is built once per request, and `Err` ends it"
)]
fn sort(
    batch: bool,
    messages: Vec<Value>,
    needs: Vec<Need>,
    denial_data: Option<Value>,
) -> Result<(Vec<Value>, Vec<Value>), Response> {
    let mut errors = Vec::new();
    let mut passing = Vec::new();
    // Refusals of messages without an `id` (shaped as notifications), which JSON-RPC
    // would leave unanswered: with id `null`, sent only when nothing else in the request
    // is answered, so that the client learns of the refusal all the same.
    let mut unanswered: Vec<(i64, Value)> = Vec::new();
    for (message, need) in messages.into_iter().zip(needs) {
        match need {
            Need::Refused {
                code,
                message: text,
            } => {
                let data = denial_data
                    .clone()
                    .filter(|_| code == CALL_DENIED || code == CALL_LIMITED);
                match message.get("id") {
                    Some(id) => errors.push(rpc_error(id.clone(), code, &text, data)),
                    None if message.get("method").is_none() => {
                        errors.push(rpc_error(Value::Null, code, &text, data));
                    }
                    None => unanswered.push((code, rpc_error(Value::Null, code, &text, data))),
                }
            }
            Need::Session | Need::Decision { .. } => passing.push(message),
        }
    }
    let answered = !errors.is_empty()
        || passing
            .iter()
            .any(|m| m.get("method").is_some() && m.get("id").is_some());
    if !answered && let Some((code, _)) = unanswered.first() {
        // MCP: input that is not a request and is not accepted gets an HTTP error status,
        // its body a JSON-RPC error without an id.
        let status = match *code {
            CALL_DENIED => StatusCode::FORBIDDEN,
            CALL_LIMITED => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::BAD_REQUEST,
        };
        errors.extend(unanswered.into_iter().map(|(_, error)| error));
        if passing.is_empty() {
            return Err(json_response(status, shape(batch, errors)));
        }
    }
    if passing.is_empty() {
        return Err(json_response(StatusCode::OK, shape(batch, errors)));
    }
    Ok((passing, errors))
}

/// A short name for a request that calls no tool, for the audit record.
fn summary(messages: &[Value]) -> String {
    let first = messages
        .iter()
        .find_map(|m| m.get("method").and_then(Value::as_str))
        .unwrap_or("response");
    if messages.len() > 1 {
        format!("batch:{first}")
    } else {
        first.to_string()
    }
}

fn canonical(value: Option<&Value>) -> String {
    let mut out = String::new();
    audit::canonical_json(value.unwrap_or(&json!({})), &mut out);
    out
}

fn rpc_error(id: Value, code: i64, message: &str, data: Option<Value>) -> Value {
    let mut error = json!({ "code": code, "message": message });
    if let (Some(data), Some(object)) = (data, error.as_object_mut()) {
        object.insert("data".into(), data);
    }
    json!({ "jsonrpc": "2.0", "id": id, "error": error })
}

fn shape(batch: bool, mut items: Vec<Value>) -> Value {
    if !batch && items.len() == 1 {
        items.remove(0)
    } else {
        Value::Array(items)
    }
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

/// A request that cannot be read as JSON-RPC: an error without an id.
fn rpc_refusal(status: StatusCode, code: i64, message: &str) -> Response {
    json_response(status, rpc_error(Value::Null, code, message, None))
}

fn upstream_failure(message: &str) -> Response {
    (
        StatusCode::BAD_GATEWAY,
        axum::Json(json!({ "error": "upstream_failed", "message": message })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "sk-upstream-77";

    fn scrubber() -> Scrubber {
        // Every spelling of the secret, as the gateway's upstream client derives them.
        let upstream = crate::forward::Upstream::new(vec![format!("Bearer {SECRET}")]);
        Scrubber::new(&upstream.expect("upstream client").secrets)
    }

    #[test]
    fn answers_that_need_nothing_pass_unchanged() {
        let scrubber = scrubber();
        for clean in [
            r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"{\"id\":42}"}]}}"#,
            r#"{"jsonrpc": "2.0", "id": 7, "result": {"isError": false, "n": [1, -2, 3.5e3, null, true]}}"#,
            r#"[{"jsonrpc":"2.0","id":1,"result":{}},{"jsonrpc":"2.0","id":2,"error":{"code":-1,"message":"tool\n"}}]"#,
            r#"{"result":{"toolsets":"sk-upstream"}}"#,
            r#""a string""#,
        ] {
            assert!(scrubber.passes_unchanged(clean.as_bytes()), "{clean}");
        }
    }

    #[test]
    fn answers_with_a_credential_a_tool_list_or_no_json_take_the_careful_path() {
        let scrubber = scrubber();
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        for needs in [
            // The credential in a value, plain, inside a longer string, escaped, nested.
            format!(r#"{{"result":{{"text":"{SECRET}"}}}}"#),
            format!(r#"{{"result":{{"text":"header: Bearer {SECRET}\n"}}}}"#),
            r#"{"result":{"text":"\u0073k-upstream-77"}}"#.to_string(),
            format!(r#"{{"a":[1,{{"b":["x","{SECRET}"]}}]}}"#),
            // The credential as a key, plain and escaped.
            format!(r#"{{"{SECRET}":1}}"#),
            r#"{"sk-upstream-\u0037\u0037":1}"#.to_string(),
            // A tool list, at any depth and however the key is spelled.
            r#"{"result":{"tools":[]}}"#.to_string(),
            r#"[{"id":1,"result":{"tool\u0073":[{"name":"x"}]}}]"#.to_string(),
            // Not one JSON value.
            String::new(),
            "not json".to_string(),
            r#"{"a":1"#.to_string(),
            r#"{"a":1} {"b":2}"#.to_string(),
            deep,
        ] {
            assert!(!scrubber.passes_unchanged(needs.as_bytes()), "{needs}");
        }
    }
}
