//! A fast upstream, so that the upstream is never the bottleneck: a small constant JSON answer
//! for any path, and on `/mcp` a minimal MCP streamable-HTTP server answering in JSON
//! (`initialize` with an `Mcp-Session-Id`, notifications, `ping`, `tools/list`, `tools/call`).
//! No authentication; loopback only.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// About the size of a small REST answer.
const JSON_ANSWER: &[u8] =
    br#"{"id":42,"title":"Flaky test on main","state":"open","labels":["ci"],"comments":3}"#;

static SESSIONS: AtomicU64 = AtomicU64::new(0);

pub async fn serve(listen: &str) -> Result<()> {
    let listener = crate::listen_on_loopback(listen, "upstream").await?;
    eprintln!("upstream listening on {}", listener.local_addr()?);
    serve_on(listener).await
}

/// Answers every connection that reaches `listener`, until the task is dropped.
pub async fn serve_on(listener: tokio::net::TcpListener) -> Result<()> {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service_fn(answer))
                .await;
        });
    }
}

async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.uri().path().starts_with("/mcp") {
        return Ok(mcp(request).await);
    }
    // Read whatever was sent, then answer the same small document.
    let _ = request.into_body().collect().await;
    Ok(json_response(
        StatusCode::OK,
        Bytes::from_static(JSON_ANSWER),
        None,
    ))
}

async fn mcp(request: Request<Incoming>) -> Response<Full<Bytes>> {
    match *request.method() {
        Method::POST => {}
        Method::DELETE => return json_response(StatusCode::OK, Bytes::new(), None),
        _ => return json_response(StatusCode::METHOD_NOT_ALLOWED, Bytes::new(), None),
    }
    let Ok(body) = request.into_body().collect().await else {
        return json_response(StatusCode::BAD_REQUEST, Bytes::new(), None);
    };
    let Ok(message) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
        return rpc_error(Value::Null, -32700, "parse error");
    };
    let id = message.get("id").cloned();
    let method = message.get("method").and_then(Value::as_str).unwrap_or("");
    let Some(id) = id else {
        // A notification (or a response from the client): accepted, no answer.
        return json_response(StatusCode::ACCEPTED, Bytes::new(), None);
    };
    let (result, session) = match method {
        "initialize" => (
            json!({
                "protocolVersion": "2025-06-18",
                "capabilities": { "tools": {} },
                "serverInfo": { "name": "loadgen-upstream", "version": "1" },
            }),
            Some(format!("s{}", SESSIONS.fetch_add(1, Ordering::Relaxed))),
        ),
        "ping" => (json!({}), None),
        "tools/list" => (
            json!({ "tools": [{
                "name": "lookup",
                "description": "returns a small JSON document",
                "inputSchema": { "type": "object", "properties": { "id": { "type": "string" } } },
            }] }),
            None,
        ),
        "tools/call" => (
            json!({
                "content": [{ "type": "text", "text": "{\"id\":42,\"state\":\"open\"}" }],
                "isError": false,
            }),
            None,
        ),
        _ => return rpc_error(id, -32601, "method not found"),
    };
    let body = json!({ "jsonrpc": "2.0", "id": id, "result": result });
    json_response(StatusCode::OK, Bytes::from(body.to_string()), session)
}

fn rpc_error(id: Value, code: i64, message: &str) -> Response<Full<Bytes>> {
    let body = json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": message } });
    json_response(StatusCode::OK, Bytes::from(body.to_string()), None)
}

fn json_response(
    status: StatusCode,
    body: Bytes,
    session: Option<String>,
) -> Response<Full<Bytes>> {
    let mut builder = Response::builder().status(status);
    if !body.is_empty() {
        builder = builder.header("content-type", "application/json");
    }
    if let Some(session) = session {
        builder = builder.header("mcp-session-id", session);
    }
    builder
        .body(Full::new(body))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}
