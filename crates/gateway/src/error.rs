//! How the gateway refuses: one type for every refusal, answered as HTTP (status, JSON body,
//! `WWW-Authenticate` with the RFC 9728 metadata URL, `Retry-After`) or, for MCP, as a
//! JSON-RPC error. Messages come from the call path's checks and never hold token bytes or
//! upstream secrets.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use control::CallVerdict;
use serde_json::{Value, json};

#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    pub retry_after: Option<u64>,
    /// For a 401: the `error` of the `WWW-Authenticate` challenge.
    pub challenge: Option<&'static str>,
    /// The RFC 9728 metadata URL named in challenges.
    pub resource_metadata: String,
    /// Extra fields for the body (decision, policies, reasons).
    pub detail: Option<Value>,
}

impl Refusal {
    pub fn new(
        status: StatusCode,
        code: &str,
        message: impl Into<String>,
        resource_metadata: &str,
    ) -> Refusal {
        Refusal {
            status,
            code: code.to_string(),
            message: message.into(),
            retry_after: None,
            challenge: (status == StatusCode::UNAUTHORIZED).then_some("invalid_token"),
            resource_metadata: resource_metadata.to_string(),
            detail: None,
        }
    }

    /// The answer to a verdict that is not an allow.
    pub fn from_verdict(verdict: &CallVerdict, resource_metadata: &str) -> Refusal {
        let code = verdict.code;
        let (status, challenge) = if code.starts_with("proof_") {
            (StatusCode::UNAUTHORIZED, Some("invalid_dpop_proof"))
        } else if code.starts_with("token_")
            || matches!(
                code,
                "revoked" | "task_unknown" | "task_expired" | "task_not_active"
            )
        {
            (StatusCode::UNAUTHORIZED, Some("invalid_token"))
        } else if matches!(code, "rate_limited" | "budget_exhausted") {
            (StatusCode::TOO_MANY_REQUESTS, None)
        } else if code == "store_unavailable" {
            (StatusCode::SERVICE_UNAVAILABLE, None)
        } else {
            (StatusCode::FORBIDDEN, None)
        };
        let retry_after = match code {
            "rate_limited" => verdict.retry_after.or(Some(1)),
            // A spent budget does not come back: the agent needs a new task.
            "budget_exhausted" => Some(60),
            _ => None,
        };
        Refusal {
            status,
            code: code.to_string(),
            message: verdict.message.clone(),
            retry_after,
            challenge,
            resource_metadata: resource_metadata.to_string(),
            detail: Some(match &verdict.approval {
                // The agent (or its human) quotes this id to an approver, then retries.
                Some(approval) => json!({
                    "decision": verdict.report.decision,
                    "policies": verdict.report.policies,
                    "reasons": verdict.report.reasons,
                    "approval_id": approval,
                }),
                None => json!({
                    "decision": verdict.report.decision,
                    "policies": verdict.report.policies,
                    "reasons": verdict.report.reasons,
                }),
            }),
        }
    }

    /// The JSON body (HTTP) or the `data` of a JSON-RPC error (MCP).
    pub fn body(&self) -> Value {
        let mut body = json!({ "error": self.code, "message": self.message });
        if let (Some(Value::Object(detail)), Value::Object(body)) = (&self.detail, &mut body) {
            for (key, value) in detail {
                body.entry(key.clone()).or_insert(value.clone());
            }
        }
        if let (Some(seconds), Value::Object(body)) = (self.retry_after, &mut body) {
            body.insert("retry_after".into(), json!(seconds));
        }
        body
    }

    pub fn www_authenticate(&self) -> Option<HeaderValue> {
        let error = self.challenge?;
        let description = self.message.replace(['"', '\\'], "'");
        let value = format!(
            "DPoP error=\"{error}\", error_description=\"{description}\", algs=\"ES256 EdDSA\", resource_metadata=\"{}\"",
            self.resource_metadata
        );
        HeaderValue::from_str(&value).ok()
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(challenge) = self.www_authenticate() {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, challenge);
        }
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
