//! The call path's edge: the gateway every tool call passes. It maps each HTTP or MCP request
//! to an action on a declared tool, asks `control::Authority::authorize` (token, proof,
//! revocation, rate limits, scope, policy, a durable audit record), and only then forwards
//! the call with the upstream credential injected.

mod caller;
pub mod catalog;
mod error;
mod forward;
mod http;
mod mcp;
pub mod metrics;
mod outcome;
pub mod rate;
mod scrub;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::{Method, header};
use axum::response::IntoResponse;
use axum::routing::{any, get};
use control::{Authority, CallAttempt, CallVerdict};
use serde_json::json;

pub use caller::{Presented, Scheme};
pub use catalog::{Catalog, CatalogError, Classified, RawTool, ToolKind, ToolSpec};
pub use error::Refusal;
pub use rate::{Limits, Rate, RateLimiter};

/// The gateway of one node: the control plane it asks, the tools it fronts.
#[derive(Debug)]
pub struct Gateway {
    authority: Arc<Authority>,
    catalog: Catalog,
    upstream: forward::Upstream,
    limiter: RateLimiter,
    metrics: metrics::Metrics,
    /// Where 401 challenges point (RFC 9728), built once: every refusal names it.
    metadata_url: String,
}

/// Path of the RFC 9728 metadata document.
pub const RESOURCE_METADATA_PATH: &str = "/.well-known/oauth-protected-resource";

impl Gateway {
    pub fn new(
        authority: Arc<Authority>,
        catalog: Catalog,
        limits: Limits,
    ) -> Result<Arc<Gateway>, String> {
        let upstream = forward::Upstream::new(&catalog.secrets())?;
        let metadata_url = authority.settings().url_of(RESOURCE_METADATA_PATH);
        Ok(Arc::new(Gateway {
            authority,
            catalog,
            upstream,
            limiter: RateLimiter::new(limits),
            metrics: metrics::Metrics::default(),
            metadata_url,
        }))
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn authority(&self) -> &Arc<Authority> {
        &self.authority
    }

    /// The metadata URL that 401 challenges point to.
    pub fn resource_metadata_url(&self) -> &str {
        &self.metadata_url
    }

    /// The public URL of a request path, as the caller's proof must name it in `htu`. The
    /// request's own `Host` header is never used: an attacker controls it.
    pub fn public_url(&self, path: &str) -> String {
        self.authority.settings().url_of(path)
    }

    /// Runs the call path for one action and records the decision (metrics and the audit
    /// log, durably, before anything is forwarded).
    pub async fn decide(
        &self,
        tool: &ToolSpec,
        presented: &Presented<'_>,
        method: &Method,
        url: &str,
        classified: &Classified,
        arguments: &str,
    ) -> CallVerdict {
        let started = Instant::now();
        let attempt = CallAttempt {
            action: &classified.action,
            resource: &classified.resource,
            class: classified.class,
            sensitivity: &classified.sensitivity,
            arguments,
            ..self.attempt(presented, tool.bearer_tokens, method, url, &tool.name)
        };
        let verdict = self.authority.authorize(&attempt).await;
        self.metrics.decision(
            verdict.report.decision.as_str(),
            &tool.name,
            verdict.code,
            started.elapsed(),
        );
        verdict
    }

    /// Authenticates the caller of a protocol message that calls no tool (MCP `initialize`,
    /// `tools/list`, notifications, a stream): token, proof, rate limit, revocation and task
    /// state, recorded like a decision, without scope, policy or budget. `action` names the
    /// message in the audit log.
    pub async fn decide_session(
        &self,
        tool: &ToolSpec,
        presented: &Presented<'_>,
        method: &Method,
        url: &str,
        action: &str,
    ) -> CallVerdict {
        let started = Instant::now();
        let attempt = CallAttempt {
            action,
            ..self.attempt(presented, tool.bearer_tokens, method, url, &tool.name)
        };
        let verdict = self.authority.authorize_session(&attempt).await;
        self.metrics.decision(
            verdict.report.decision.as_str(),
            &tool.name,
            verdict.code,
            started.elapsed(),
        );
        verdict
    }
}

impl Gateway {
    /// The attempt of one request by `presented`, before it names an action: a read of
    /// nothing with no arguments, which call sites narrow. A DPoP-bound token presented as a
    /// bearer token has no proof, whatever else the request carries; only a tool that
    /// accepts bearer tokens (`bearer_tokens`) lets that pass.
    fn attempt<'a>(
        &'a self,
        presented: &Presented<'a>,
        bearer_tokens: bool,
        method: &'a Method,
        url: &'a str,
        tool: &'a str,
    ) -> CallAttempt<'a> {
        let bearer = presented.scheme == Scheme::Bearer;
        CallAttempt {
            token: presented.token,
            proof: if bearer { None } else { presented.proof },
            bearer_allowed: bearer && bearer_tokens,
            method: method.as_str(),
            url,
            tool,
            action: "",
            resource: "",
            class: model::ActionClass::Read,
            sensitivity: &[],
            arguments: "{}",
            limiter: Some(&self.limiter),
        }
    }

    /// The largest request body `tool` takes: its own `max_body_bytes`, else the node's.
    pub fn body_limit(&self, tool: &ToolSpec) -> usize {
        tool.max_body_bytes
            .unwrap_or(self.authority.settings().max_body_bytes)
    }

    /// A request for a tool remit does not front. With credentials, the caller is
    /// authenticated and the attempt recorded and counted by the containment rules (probing
    /// for tools is off-script); either way the answer is 404 `tool_unknown`, unless the
    /// credentials themselves fail.
    pub(crate) async fn unknown_tool(
        &self,
        name: &str,
        headers: &axum::http::HeaderMap,
        method: &Method,
        url: &str,
    ) -> axum::response::Response {
        let metadata = self.resource_metadata_url();
        let not_found = || {
            Refusal::new(
                axum::http::StatusCode::NOT_FOUND,
                "tool_unknown",
                format!("no tool named `{name}`"),
                metadata,
            )
        };
        let Ok(presented) = caller::presented(headers, metadata) else {
            return not_found().into_response();
        };
        let attempt = CallAttempt {
            action: "unknown",
            class: model::ActionClass::Admin,
            ..self.attempt(&presented, false, method, url, name)
        };
        let verdict = self.authority.refuse_unknown_tool(&attempt).await;
        if verdict.code == "tool_unknown" {
            not_found().into_response()
        } else {
            Refusal::from_verdict(&verdict, metadata).into_response()
        }
    }

    /// A request to a declared tool that the gateway refuses before it names an action (a
    /// path it will not forward, a method the route does not take, a body over the limit or
    /// not JSON-RPC). With credentials, the caller is authenticated and the refusal recorded
    /// as a `call.decision` of `action` (mostly [`Early::action`]) with `code`; the caller
    /// then gets `answer`, unless its credentials themselves fail. Without credentials it
    /// gets `answer` and nothing is attributed to anyone.
    pub(crate) async fn refuse_early(
        &self,
        early: &Early<'_>,
        action: &str,
        code: &'static str,
        message: &str,
        answer: axum::response::Response,
    ) -> axum::response::Response {
        let metadata = self.resource_metadata_url();
        let Ok(presented) = caller::presented(early.headers, metadata) else {
            return answer;
        };
        let started = Instant::now();
        let attempt = CallAttempt {
            action,
            resource: early.path.trim_start_matches('/'),
            class: model::ActionClass::Admin,
            sensitivity: &early.tool.sensitivity,
            ..self.attempt(
                &presented,
                early.tool.bearer_tokens,
                early.method,
                early.url,
                &early.tool.name,
            )
        };
        let verdict = self.authority.refuse_request(&attempt, code, message).await;
        self.metrics.decision(
            verdict.report.decision.as_str(),
            &early.tool.name,
            verdict.code,
            started.elapsed(),
        );
        if verdict.code == code {
            answer
        } else {
            Refusal::from_verdict(&verdict, metadata).into_response()
        }
    }
}

/// A request to a declared tool, as far as the gateway read it before refusing it.
pub(crate) struct Early<'a> {
    pub(crate) tool: &'a ToolSpec,
    pub(crate) headers: &'a axum::http::HeaderMap,
    pub(crate) method: &'a Method,
    /// The public URL, for the proof's `htu`.
    pub(crate) url: &'a str,
    /// The path after the tool's name, as sent (`/files/../admin`; empty for MCP), which
    /// names the resource and, through [`Early::action`], the action.
    pub(crate) path: &'a str,
}

impl Early<'_> {
    /// The request's method and path, as unmatched HTTP routes are named: `GET /files/x`,
    /// or the method alone for MCP.
    pub(crate) fn action(&self) -> String {
        if self.path.is_empty() {
            self.method.to_string()
        } else {
            format!("{} {}", self.method, self.path)
        }
    }
}

/// The gateway's routes: `/mcp/{tool}`, `/http/{tool}/{*path}`, the RFC 9728 metadata and
/// `/metrics`. Merge into the control plane's router, which holds the fallback.
pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/mcp/{tool}", any(mcp::handle))
        .route("/http/{tool}", any(http::handle_root))
        .route("/http/{tool}/{*path}", any(http::handle))
        .route(RESOURCE_METADATA_PATH, get(resource_metadata))
        .route("/metrics", get(metrics))
        .with_state(gateway)
}

/// RFC 9728: what this protected resource is and how to call it.
async fn resource_metadata(State(gateway): State<Arc<Gateway>>) -> impl IntoResponse {
    let settings = gateway.authority.settings();
    axum::Json(json!({
        "resource": settings.public_url,
        "authorization_servers": [settings.public_url],
        "jwks_uri": settings.url_of("/.well-known/jwks.json"),
        "bearer_methods_supported": ["header"],
        "dpop_signing_alg_values_supported": ["ES256", "EdDSA"],
        "dpop_bound_access_tokens_required": true,
        "resource_name": "remit gateway",
    }))
}

async fn metrics(State(gateway): State<Arc<Gateway>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        gateway
            .metrics
            .render(&gateway.authority().store().writer_stats()),
    )
}
