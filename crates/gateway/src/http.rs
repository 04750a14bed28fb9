//! HTTP tools: `/http/{tool}/{*path}`. Each request is classified through the tool's route
//! table, decided by the call path (durably recorded before anything moves), and only then
//! forwarded with the tool's credential; the answer streams back scrubbed of credentials and
//! its outcome is appended to the audit log when the body ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, Uri, Version, header};
use axum::response::{IntoResponse, Response};
use control::CallVerdict;

use crate::catalog::{Classified, ToolKind, ToolSpec};
use crate::error::Refusal;
use crate::forward::{BodyEnd, HEAD_TIMEOUT, Relayed, bounded_body};
use crate::outcome::{CallOutcome, Ending};
use crate::{Early, Gateway, caller};

/// Where the route's path starts, after `/http/`.
const PREFIX: &str = "/http/";

pub(crate) async fn handle_root(state: State<Arc<Gateway>>, request: Request) -> Response {
    proxy(state, request).await
}

pub(crate) async fn handle(state: State<Arc<Gateway>>, request: Request) -> Response {
    proxy(state, request).await
}

async fn proxy(State(gateway): State<Arc<Gateway>>, request: Request) -> Response {
    let metadata = gateway.resource_metadata_url();
    let (parts, body) = request.into_parts();
    // The raw path, not axum's percent-decoded parameters: the upstream receives exactly
    // what was classified and what the proof's `htu` names.
    let (tool_name, path) = split_path(parts.uri.path());
    let tool = match gateway.catalog().get(tool_name) {
        Some(tool) if tool.kind == ToolKind::Http => Arc::clone(tool),
        _ => {
            let url = gateway.public_url(parts.uri.path());
            return gateway
                .unknown_tool(tool_name, &parts.headers, &parts.method, &url)
                .await;
        }
    };
    let url = gateway.public_url(parts.uri.path());
    let relative = format!("/{path}");
    let early = Early {
        tool: &tool,
        headers: &parts.headers,
        method: &parts.method,
        url: &url,
        path: &relative,
    };
    if let Err(reason) = check_path(path) {
        let answer = Refusal::new(StatusCode::BAD_REQUEST, "path_invalid", &reason, metadata)
            .into_response();
        return gateway
            .refuse_early(&early, &early.action(), "path_invalid", &reason, answer)
            .await;
    }
    let presented = match caller::presented(&parts.headers, metadata) {
        Ok(presented) => presented,
        Err(refusal) => return refusal.into_response(),
    };
    // Held to the limit before anything is decided or forwarded (see `bounded_body`).
    let limit = gateway.body_limit(&tool);
    let body = match bounded_body(body, limit).await {
        Ok(body) => body,
        Err(refused) => {
            let message = refused.message(limit, &tool.name);
            let answer =
                Refusal::new(refused.status(), refused.code(), &message, metadata).into_response();
            return gateway
                .refuse_early(&early, &early.action(), refused.code(), &message, answer)
                .await;
        }
    };
    let classified = tool.classify_http(&parts.method, &relative);
    let verdict = gateway
        .decide(&tool, &presented, &parts.method, &url, &classified, "{}")
        .await;
    tracing::debug!(tool = %tool.name, action = %classified.action, code = verdict.code, "http call decided");
    if !verdict.is_allow() {
        return Refusal::from_verdict(&verdict, metadata).into_response();
    }
    // Allowed, so the decision is already durable in the audit log: forward.
    let call = Call {
        gateway: Arc::clone(&gateway),
        tool: Arc::clone(&tool),
        classified,
        verdict,
        started: Instant::now(),
    };
    let Some(target) = upstream_uri(&tool.upstream, path, parts.uri.query()) else {
        let message = "the request path cannot be appended to the tool's upstream URL";
        call.record(
            StatusCode::BAD_REQUEST,
            BodyEnd {
                bytes: 0,
                complete: false,
            },
            Duration::ZERO,
            false,
        );
        return Refusal::new(StatusCode::BAD_REQUEST, "path_invalid", message, metadata)
            .into_response();
    };
    let mut upstream_request = axum::http::Request::new(body);
    *upstream_request.method_mut() = parts.method.clone();
    *upstream_request.uri_mut() = target;
    // The client negotiates the upstream's version itself (ALPN for TLS).
    *upstream_request.version_mut() = Version::HTTP_11;
    *upstream_request.headers_mut() = gateway.upstream.request_headers(&parts.headers, &tool.auth);

    let answer = tokio::time::timeout(
        HEAD_TIMEOUT,
        gateway.upstream.client.request(upstream_request),
    )
    .await;
    let head_latency = call.started.elapsed();
    let response = match answer {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => {
            // The error names neither the credential nor the URL; keep it out of the answer.
            tracing::warn!(tool = %tool.name, "upstream request failed: {error}");
            return call.unavailable(
                head_latency,
                format!("the upstream of tool `{}` cannot be reached", tool.name),
                metadata,
            );
        }
        Err(_) => {
            tracing::warn!(tool = %tool.name, "upstream did not answer within {} s", HEAD_TIMEOUT.as_secs());
            let message = format!(
                "the upstream of tool `{}` did not answer within {} s",
                tool.name,
                HEAD_TIMEOUT.as_secs()
            );
            return call.unavailable(head_latency, message, metadata);
        }
    };
    let (head, upstream_body) = response.into_parts();
    if gateway.upstream.scrubbing()
        && is_encoded(&head.headers)
        && !hyper::body::Body::is_end_stream(&upstream_body)
    {
        // Compressed bytes cannot be scrubbed as they stream, and remit asked for none.
        let message = format!(
            "the upstream of tool `{}` sent a compressed body, which remit cannot check for credentials",
            tool.name
        );
        return call.unavailable(head_latency, message, metadata);
    }
    gateway.metrics.upstream(&tool.name, head_latency, false);
    let status = head.status;
    let headers = gateway.upstream.response_headers(&head.headers);
    let body = Relayed::new(upstream_body, &gateway.upstream, move |end| {
        let took = call.started.elapsed();
        call.record(status, end, took, true);
    });
    let mut response = Response::new(Body::new(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// An allowed call on its way, with what its outcome record needs.
struct Call {
    gateway: Arc<Gateway>,
    tool: Arc<ToolSpec>,
    classified: Classified,
    verdict: CallVerdict,
    started: Instant,
}

impl Call {
    /// A 502 for an upstream that failed before its response head.
    fn unavailable(self, head_latency: Duration, message: String, metadata: &str) -> Response {
        self.gateway
            .metrics
            .upstream(&self.tool.name, head_latency, true);
        self.record(
            StatusCode::BAD_GATEWAY,
            BodyEnd {
                bytes: 0,
                complete: false,
            },
            head_latency,
            false,
        );
        Refusal::new(
            StatusCode::BAD_GATEWAY,
            "upstream_unavailable",
            message,
            metadata,
        )
        .into_response()
    }

    /// Records the call's `call.outcome` (see [`CallOutcome`]).
    fn record(self, status: StatusCode, end: BodyEnd, took: Duration, reached: bool) {
        let Call {
            gateway,
            tool,
            classified,
            verdict,
            ..
        } = self;
        CallOutcome::new(
            gateway.authority(),
            &verdict,
            &tool.name,
            &classified.action,
        )
        .finish(Ending {
            status: status.as_u16(),
            bytes: end.bytes,
            complete: end.complete,
            upstream_reached: reached,
            took,
        });
    }
}

/// `/http/github/repos/x` → (`github`, `repos/x`).
fn split_path(path: &str) -> (&str, &str) {
    let rest = path.strip_prefix(PREFIX).unwrap_or_default();
    rest.split_once('/').unwrap_or((rest, ""))
}

/// Refuses paths whose meaning an upstream could change after classification: dot segments
/// (which servers collapse) and encoded separators (which some decode), so that `files/../admin`
/// can never be classified as a read of `files` and reach `/admin`.
fn check_path(path: &str) -> Result<(), String> {
    for segment in path.split('/') {
        if is_dot_segment(segment) {
            return Err(format!(
                "the path segment `{segment}` is not allowed: send the path without dot segments"
            ));
        }
        let encoded = |escape: &[u8]| {
            segment
                .as_bytes()
                .windows(3)
                .any(|window| window.eq_ignore_ascii_case(escape))
        };
        if encoded(b"%2f") || encoded(b"%5c") || segment.contains('\\') {
            return Err("encoded `/` and `\\` are not allowed in paths".to_string());
        }
    }
    Ok(())
}

/// `.` or `..`, each dot written as itself or as `%2e` in either case (without allocating:
/// this runs for every segment of every call).
fn is_dot_segment(segment: &str) -> bool {
    let mut rest = segment;
    let mut dots = 0;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('.') {
            rest = after;
        } else if rest
            .get(..3)
            .is_some_and(|dot| dot.eq_ignore_ascii_case("%2e"))
        {
            rest = &rest[3..];
        } else {
            return false;
        }
        dots += 1;
    }
    dots == 1 || dots == 2
}

/// The tool's base URL, the request's path and its query, as sent.
fn upstream_uri(base: &Uri, path: &str, query: Option<&str>) -> Option<Uri> {
    let mut target = base.path().trim_end_matches('/').to_string();
    target.push('/');
    target.push_str(path);
    if let Some(query) = query {
        target.push('?');
        target.push_str(query);
    }
    let mut builder = Uri::builder().path_and_query(target);
    if let Some(scheme) = base.scheme() {
        builder = builder.scheme(scheme.clone());
    }
    if let Some(authority) = base.authority() {
        builder = builder.authority(authority.clone());
    }
    builder.build().ok()
}

fn is_encoded(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|value| !value.as_bytes().eq_ignore_ascii_case(b"identity"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_tool_and_rest() {
        assert_eq!(
            split_path("/http/github/repos/a/b"),
            ("github", "repos/a/b")
        );
        assert_eq!(split_path("/http/github"), ("github", ""));
        assert_eq!(split_path("/http/github/"), ("github", ""));
    }

    #[test]
    fn paths_an_upstream_could_reinterpret_are_refused() {
        for bad in [
            "files/../admin",
            "files/%2e%2E/admin",
            "./x",
            "a%2Fb",
            "a%5cb",
            "a\\b",
            "x/.",
            "%2E",
            ".%2e/x",
            "a/%2e.",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
        for good in [
            "",
            "repos/a/b",
            "a..b/c",
            "a%20b",
            ".well-known/x",
            "...",
            "%2e%2e%2e",
            "%2",
            "é.",
            ".é",
        ] {
            assert!(check_path(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn upstream_urls_keep_base_path_and_query() {
        let base: Uri = "https://api.example/v3/".parse().unwrap();
        assert_eq!(
            upstream_uri(&base, "repos/a", Some("x=1&y=2"))
                .unwrap()
                .to_string(),
            "https://api.example/v3/repos/a?x=1&y=2"
        );
        let base: Uri = "http://127.0.0.1:9".parse().unwrap();
        assert_eq!(
            upstream_uri(&base, "", None).unwrap().to_string(),
            "http://127.0.0.1:9/"
        );
    }
}
