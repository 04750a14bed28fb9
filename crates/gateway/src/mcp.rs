//! MCP tools: `/mcp/{tool}` fronts an MCP server speaking the streamable HTTP transport. Every
//! HTTP request is authenticated once (its proof is verified and spent once); every tool call,
//! resource read and prompt inside it is decided on its own; `tools/list` answers are filtered
//! to what the task may call; answers (JSON or SSE) are scrubbed of upstream secrets.
//!
//! Batches (removed from MCP in 2025-06-18) pass when they hold at most one message that needs
//! a decision: a request proof can be spent only once, so a second tool call in the same batch
//! is refused with a JSON-RPC error and never reaches the upstream.
//!
//! This file is the request's journey (read, decide once, forward, answer, record the
//! outcome); `classify` says what each message needs, `rpc` builds remit's own JSON-RPC
//! answers, `tools` narrows `tools/list` results, `stream` passes SSE answers event by event,
//! and `crate::scrub` removes upstream secrets.

mod classify;
mod rpc;
mod stream;
mod tools;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use control::CallVerdict;
use http_body_util::{BodyExt, Limited};
use serde_json::{Value, json};

use self::classify::{Need, summary};
use self::rpc::{
    CALL_DENIED, CALL_LIMITED, INVALID_REQUEST, PARSE_ERROR, json_response, rpc_refusal, shape,
    sort,
};
pub(crate) use self::tools::TOOLS_KEY;
use self::tools::ToolsFilter;
use crate::caller::{self, Presented};
use crate::catalog::{ToolKind, ToolSpec};
use crate::error::Refusal;
use crate::forward::{HEAD_TIMEOUT, read_limited};
use crate::outcome::{CallOutcome, Ending};
use crate::scrub::JsonScrubber;
use crate::{Early, Gateway};

/// Largest JSON answer (or SSE event) read from an upstream before it is filtered.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

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
        let mut needs: Vec<Need> = messages
            .iter()
            .map(|message| Need::of(self.tool, message))
            .collect();

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
                self.outcome(verdict, action, started, unreached(&response));
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
                self.outcome(&verdict, action, started, unreached(&response));
                response
            }
        }
    }

    /// The tools this task may call, for filtering `tools/list` answers: those its scopes
    /// permit calling on some resource.
    fn tools_filter(&self, verdict: &CallVerdict) -> ToolsFilter {
        let scopes = verdict
            .claims
            .as_ref()
            .map(|claims| Arc::clone(&claims.scope))
            .unwrap_or_default();
        ToolsFilter::new(self.tool, scopes)
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
        let result =
            tokio::time::timeout(HEAD_TIMEOUT, self.gateway.upstream.client.request(request)).await;
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
        let scrubber = JsonScrubber::new(&self.gateway.upstream.needles);
        if parts.status == StatusCode::UNAUTHORIZED {
            // The upstream refused remit's own credential; its challenge would mislead the
            // agent's MCP client into an authorization flow with the wrong server.
            self.outcome(verdict, action, started, replaced(parts.status));
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
            let outcome = self.call_outcome(verdict, action);
            let events = stream::filter(
                body,
                filter,
                scrubber,
                errors,
                (outcome, parts.status.as_u16(), started),
            );
            let mut response = Response::new(Body::from_stream(events));
            *response.status_mut() = parts.status;
            *response.headers_mut() = headers;
            return response;
        }
        let bytes = match Limited::new(body, MAX_RESPONSE_BYTES).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => {
                self.outcome(verdict, action, started, replaced(StatusCode::BAD_GATEWAY));
                return upstream_failure("the MCP server's answer is too large or broken");
            }
        };
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
        self.outcome(
            verdict,
            action,
            started,
            Ending {
                status: parts.status.as_u16(),
                bytes: u64::try_from(body.len()).unwrap_or(u64::MAX),
                complete: true,
                upstream_reached: true,
                took: Duration::ZERO,
            },
        );
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        response
    }

    fn call_outcome(&self, verdict: &CallVerdict, action: &str) -> CallOutcome {
        CallOutcome::new(self.gateway.authority(), verdict, &self.tool.name, action)
    }

    /// Records the request's `call.outcome`, timed from `started`.
    fn outcome(&self, verdict: &CallVerdict, action: &str, started: Instant, ending: Ending) {
        self.call_outcome(verdict, action).finish(Ending {
            took: started.elapsed(),
            ..ending
        });
    }
}

/// The ending of a request whose upstream was never reached: remit answered it (502, 504).
fn unreached(response: &Response) -> Ending {
    Ending {
        upstream_reached: false,
        ..replaced(response.status())
    }
}

/// The ending of a request the upstream answered, but whose answer remit replaced with an
/// error of its own (the upstream refused remit's credential, or its answer was too large).
fn replaced(status: StatusCode) -> Ending {
    Ending {
        status: status.as_u16(),
        bytes: 0,
        complete: false,
        upstream_reached: true,
        took: Duration::ZERO,
    }
}

fn upstream_failure(message: &str) -> Response {
    (
        StatusCode::BAD_GATEWAY,
        axum::Json(json!({ "error": "upstream_failed", "message": message })),
    )
        .into_response()
}
