//! A plain reverse proxy built on the libraries remit forwards with (hyper's HTTP/1.1 server,
//! hyper-util's pooled client), which checks nothing and records nothing: the harness's
//! measure of what forwarding alone costs a Rust gateway on the machine, beside nginx. Every
//! request goes to the one upstream with its path and query, both bodies streamed, hop-by-hop
//! headers dropped both ways. Loopback only.

use std::convert::Infallible;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName};
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

type Body = Either<Incoming, Full<Bytes>>;

/// Where requests go: the upstream's authority (over plain `http`).
#[derive(Debug)]
struct Upstream {
    authority: Authority,
    client: Client<HttpConnector, Incoming>,
}

/// Listens on `listen` and forwards every request to `upstream` (`http://host:port`).
pub async fn run(listen: &str, upstream: &str) -> Result<()> {
    let listener = crate::listen_on_loopback(listen, "proxy").await?;
    eprintln!(
        "proxy listening on {}, forwarding to {upstream}",
        listener.local_addr()?
    );
    serve(listener, upstream).await
}

/// Forwards every request that reaches `listener` to `upstream`, until the task is dropped.
pub async fn serve(listener: TcpListener, upstream: &str) -> Result<()> {
    let uri: Uri = upstream.parse().context("`--upstream`")?;
    let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
        bail!("`--upstream` must be a URL such as http://127.0.0.1:9100");
    };
    if *scheme != Scheme::HTTP || uri.path() != "/" {
        bail!("`--upstream` must be a plain http:// URL with no path");
    }
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let upstream = Arc::new(Upstream {
        authority: authority.clone(),
        client: Client::builder(TokioExecutor::new()).build(connector),
    });
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let upstream = Arc::clone(&upstream);
        tokio::spawn(async move {
            let service = service_fn(move |request| forward(Arc::clone(&upstream), request));
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn forward(
    upstream: Arc<Upstream>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (mut parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let target = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(upstream.authority.clone())
        .path_and_query(path)
        .build();
    let Ok(target) = target else {
        return Ok(status(StatusCode::BAD_REQUEST));
    };
    parts.uri = target;
    drop_hop_by_hop(&mut parts.headers);
    // The client names the upstream in `Host`, as nginx's `proxy_pass` does.
    parts.headers.remove(header::HOST);
    match upstream
        .client
        .request(Request::from_parts(parts, body))
        .await
    {
        Ok(response) => {
            let (mut head, body) = response.into_parts();
            drop_hop_by_hop(&mut head.headers);
            Ok(Response::from_parts(head, Either::Left(body)))
        }
        Err(_) => Ok(status(StatusCode::BAD_GATEWAY)),
    }
}

/// Removes the headers that describe one connection rather than the message (RFC 9110,
/// section 7.6.1): the fixed set and whatever `Connection` names. Written here rather than
/// taken from the gateway, whose list is the same: this proxy is the reference remit is
/// measured against, so it shares none of remit's code.
fn drop_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

fn status(code: StatusCode) -> Response<Body> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
    *response.status_mut() = code;
    response
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A proxy in front of `upstream`, on an ephemeral loopback port: its address.
    async fn proxy_to(upstream: std::net::SocketAddr) -> std::net::SocketAddr {
        let proxy = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let proxy_at = proxy.local_addr().expect("address");
        let target = format!("http://{upstream}");
        tokio::spawn(async move { serve(proxy, &target).await });
        proxy_at
    }

    /// The harness's upstream and a proxy in front of it: the proxy's address.
    async fn start() -> std::net::SocketAddr {
        let upstream = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let upstream_at = upstream.local_addr().expect("address");
        tokio::spawn(crate::upstream::serve_on(upstream));
        proxy_to(upstream_at).await
    }

    #[test]
    fn hop_by_hop_headers_are_dropped_and_the_rest_kept() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-private"),
            ("x-private", "one hop only"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic eA=="),
            ("content-type", "application/json"),
            ("authorization", "Bearer end-to-end"),
        ] {
            headers.append(
                HeaderName::from_static(name),
                value.parse().expect("a header value"),
            );
        }
        drop_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["authorization", "content-type"]);
    }

    #[tokio::test]
    async fn forwards_method_path_and_body() {
        let proxy = start().await;
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let request = Request::post(format!("http://{proxy}/mcp"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(
                br#"{"jsonrpc":"2.0","id":7,"method":"ping"}"#,
            )))
            .expect("request");
        let response = client.request(request).await.expect("answer");
        assert_eq!(response.status(), StatusCode::OK);
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let answer: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(answer["id"], 7, "the upstream's MCP answer: {answer}");
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_a_502() {
        // A port nothing listens on: bound, then closed.
        let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let nowhere = closed.local_addr().expect("address");
        drop(closed);
        let proxy_at = proxy_to(nowhere).await;
        let mut stream = tokio::net::TcpStream::connect(proxy_at)
            .await
            .expect("connect");
        stream
            .write_all(b"GET /x HTTP/1.1\r\nhost: p\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("read");
        assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    }

    #[tokio::test]
    async fn refuses_an_upstream_with_a_path_or_another_scheme() {
        for bad in [
            "http://127.0.0.1:1/api",
            "https://127.0.0.1:1",
            "127.0.0.1:1",
        ] {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let error = serve(listener, bad).await.expect_err(bad);
            assert!(error.to_string().contains("--upstream"), "{bad}: {error}");
        }
    }
}
