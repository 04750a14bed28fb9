//! Forwarding to upstreams: one pooled HTTP client (HTTP/1.1 and HTTP/2, TLS through rustls
//! with aws-lc-rs and the system's roots), and the request and response rules every tool
//! call follows: the agent's credentials and hop-by-hop headers never travel upstream, the
//! tool's credential is injected, and no upstream credential travels back — not in headers,
//! not in redirects, not in bodies (scrubbed as they stream, across chunk boundaries).

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::catalog::UpstreamAuth;
use crate::scrub::{Needles, StreamScrubber};

pub(crate) type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// How long an upstream, HTTP or MCP, may take to send its response head: a tool call whose
/// answer is one JSON body sends its head only when the tool is done, so this is also how
/// long a tool may work. The body then streams for as long as it needs: downloads and SSE
/// streams may be long, and the agent can hang up at any time.
pub(crate) const HEAD_TIMEOUT: Duration = Duration::from_secs(60);

/// RFC 9110 §7.6.1: headers that describe one connection, never the message.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

#[derive(Debug)]
pub(crate) struct Upstream {
    pub(crate) client: Client<Connector, Body>,
    /// Every spelling of every tool's credential, shared with each answer's scrubber, not
    /// copied into it.
    pub(crate) needles: Arc<Needles>,
}

impl Upstream {
    /// `secrets` are the tools' credentials as sent upstream ([`crate::Catalog::secrets`]).
    pub(crate) fn new(secrets: &[&str]) -> Result<Upstream, String> {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| format!("cannot load the system's TLS roots: {e}"))?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Upstream {
            client,
            needles: Arc::new(Needles::new(secrets)),
        })
    }

    /// True when some tool has a credential, so that answers must be scrubbed.
    pub(crate) fn scrubbing(&self) -> bool {
        !self.needles.is_empty()
    }

    /// The headers sent upstream: the agent's, minus everything that authenticates the agent
    /// to remit (its token, proof and cookies), hop-by-hop headers and `Host` (the client
    /// sets it from the upstream URL), plus the tool's credential, which replaces any
    /// header of the same name the agent sent.
    pub(crate) fn request_headers(&self, incoming: &HeaderMap, auth: &UpstreamAuth) -> HeaderMap {
        let named = connection_named(incoming);
        let mut out = HeaderMap::with_capacity(incoming.len() + 2);
        for (name, value) in incoming {
            let dropped = is_hop_by_hop(name)
                || named.contains(name)
                || name == header::HOST
                || name == header::AUTHORIZATION
                || name == header::COOKIE
                || name == "dpop"
                // remit answered any `Expect: 100-continue` itself by reading the body.
                || name == header::EXPECT;
            if !dropped {
                out.append(name.clone(), value.clone());
            }
        }
        if self.scrubbing() {
            // A compressed body cannot be scrubbed as it streams: ask for it uncompressed.
            out.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        if let Some((name, value)) = auth.header() {
            out.insert(name, value);
        }
        out
    }

    /// The headers returned to the agent: no hop-by-hop headers, no cookies (the agent never
    /// sends cookies upstream, and an upstream session opened with remit's credential is
    /// that credential), no `Content-Length` when the body is scrubbed (its length may
    /// change), and every value that holds a credential — a `Location` above all — redacted.
    pub(crate) fn response_headers(&self, incoming: &HeaderMap) -> HeaderMap {
        let named = connection_named(incoming);
        let scrubbing = self.scrubbing();
        let mut out = HeaderMap::with_capacity(incoming.len());
        for (name, value) in incoming {
            let dropped = is_hop_by_hop(name)
                || named.contains(name)
                || name == header::SET_COOKIE
                || (scrubbing && name == header::CONTENT_LENGTH);
            if dropped {
                continue;
            }
            match self.needles.scrub(value.as_bytes()) {
                Cow::Borrowed(_) => {
                    out.append(name.clone(), value.clone());
                }
                Cow::Owned(scrubbed) => {
                    // The replacement is visible ASCII, so this holds; if not, drop the header.
                    if let Ok(value) = HeaderValue::from_bytes(&scrubbed) {
                        out.append(name.clone(), value);
                    }
                }
            }
        }
        out
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// Headers named in `Connection` are hop-by-hop too (RFC 9110 §7.6.1).
fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect()
}

/// Why a request body was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BodyRefused {
    /// Over the limit: declared so, or counted so as it streamed.
    TooLarge,
    /// The body broke off or was not valid framing.
    Unreadable,
}

impl BodyRefused {
    pub(crate) fn status(self) -> http::StatusCode {
        match self {
            BodyRefused::TooLarge => http::StatusCode::PAYLOAD_TOO_LARGE,
            BodyRefused::Unreadable => http::StatusCode::BAD_REQUEST,
        }
    }

    pub(crate) fn code(self) -> &'static str {
        match self {
            BodyRefused::TooLarge => "body_too_large",
            BodyRefused::Unreadable => "body_invalid",
        }
    }

    pub(crate) fn message(self, limit: usize, tool: &str) -> String {
        match self {
            BodyRefused::TooLarge => {
                format!("the request body is larger than {limit} bytes, the limit of tool `{tool}`")
            }
            BodyRefused::Unreadable => "the request body could not be read".to_string(),
        }
    }
}

/// Whether the body declares a length (`Content-Length`, known to the server before a byte
/// is read) over `limit`.
pub(crate) fn declared_over(body: &Body, limit: usize) -> bool {
    HttpBody::size_hint(body)
        .exact()
        .is_some_and(|length| length > u64::try_from(limit).unwrap_or(u64::MAX))
}

/// Reads a whole request body, counting bytes as they arrive and stopping at the first one
/// over `limit`: a chunked body is refused as soon as it outgrows the limit, without being
/// held beyond it.
pub(crate) async fn read_limited(body: Body, limit: usize) -> Result<Bytes, BodyRefused> {
    if declared_over(&body, limit) {
        return Err(BodyRefused::TooLarge);
    }
    match http_body_util::BodyExt::collect(http_body_util::Limited::new(body, limit)).await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(BodyRefused::TooLarge),
        Err(_) => Err(BodyRefused::Unreadable),
    }
}

/// An HTTP tool's request body, held to `limit` bytes before the upstream is contacted. A
/// declared length over the limit is refused before a byte is read; a declared length within
/// it streams through, still counted (a body longer than it declared fails the upstream
/// request rather than pass); a body without a declared length (chunked) is read whole, up to
/// the limit, so that an oversize one never reaches the upstream, and forwarded with its
/// length.
pub(crate) async fn bounded_body(body: Body, limit: usize) -> Result<Body, BodyRefused> {
    match HttpBody::size_hint(&body).exact() {
        Some(_) if declared_over(&body, limit) => Err(BodyRefused::TooLarge),
        Some(_) => Ok(Body::new(http_body_util::Limited::new(body, limit))),
        None => read_limited(body, limit).await.map(Body::from),
    }
}

/// How a response body ended, for the outcome record.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BodyEnd {
    /// Bytes sent to the agent.
    pub(crate) bytes: u64,
    /// The upstream's body ended normally (false: it failed or the agent hung up).
    pub(crate) complete: bool,
}

type OnEnd = Box<dyn FnOnce(BodyEnd) + Send>;

/// An upstream response body on its way to the agent: scrubbed when credentials exist,
/// counted, and reported once when it ends, fails or is dropped.
pub(crate) struct Relayed<B> {
    inner: B,
    scrubber: Option<StreamScrubber>,
    trailers: Option<HeaderMap>,
    done: bool,
    bytes: u64,
    on_end: Option<OnEnd>,
    upstream: Option<Arc<Needles>>,
}

impl<B> std::fmt::Debug for Relayed<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relayed")
            .field("done", &self.done)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl<B> Relayed<B> {
    pub(crate) fn new(
        inner: B,
        upstream: &Upstream,
        on_end: impl FnOnce(BodyEnd) + Send + 'static,
    ) -> Relayed<B> {
        let scrubbing = upstream.scrubbing();
        Relayed {
            inner,
            scrubber: scrubbing.then(|| StreamScrubber::new(&upstream.needles)),
            trailers: None,
            done: false,
            bytes: 0,
            on_end: Some(Box::new(on_end)),
            upstream: scrubbing.then(|| Arc::clone(&upstream.needles)),
        }
    }

    fn end(&mut self, complete: bool) {
        self.done = true;
        if let Some(on_end) = self.on_end.take() {
            on_end(BodyEnd {
                bytes: self.bytes,
                complete,
            });
        }
    }

    fn flush(&mut self) -> Bytes {
        self.scrubber
            .as_mut()
            .map(StreamScrubber::finish)
            .unwrap_or_default()
    }

    fn scrub_trailers(&self, trailers: HeaderMap) -> HeaderMap {
        let Some(needles) = &self.upstream else {
            return trailers;
        };
        let mut out = HeaderMap::with_capacity(trailers.len());
        for (name, value) in &trailers {
            if let Cow::Borrowed(_) = needles.scrub(value.as_bytes()) {
                out.append(name.clone(), value.clone());
            }
        }
        out
    }
}

impl<B> HttpBody for Relayed<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(trailers) = this.trailers.take() {
                this.end(true);
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(frame) => frame,
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let data = match &mut this.scrubber {
                            Some(scrubber) => scrubber.push(&data),
                            None => data,
                        };
                        if data.is_empty() {
                            continue;
                        }
                        this.bytes += data.len() as u64;
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Err(frame) => {
                        let Ok(trailers) = frame.into_trailers() else {
                            continue;
                        };
                        // Trailers come last: release what the scrubber still holds first.
                        this.trailers = Some(this.scrub_trailers(trailers));
                        let tail = this.flush();
                        if !tail.is_empty() {
                            this.bytes += tail.len() as u64;
                            return Poll::Ready(Some(Ok(Frame::data(tail))));
                        }
                    }
                },
                Some(Err(error)) => {
                    // What the scrubber holds back is dropped: the body is broken anyway.
                    this.end(false);
                    return Poll::Ready(Some(Err(error)));
                }
                None => {
                    let tail = this.flush();
                    this.bytes += tail.len() as u64;
                    this.end(true);
                    if !tail.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(tail))));
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // A scrubbed body may change length; an unscrubbed one keeps the upstream's.
        if self.scrubber.is_some() {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

impl<B> Drop for Relayed<B> {
    fn drop(&mut self) {
        // Dropped before its end: the agent hung up, or the server never polled an empty
        // body (a `HEAD`, a `204`), which `Incoming` reports as ended.
        if self.on_end.is_some() {
            self.end(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(secrets: &[&str]) -> Upstream {
        Upstream::new(secrets).unwrap()
    }

    #[test]
    fn request_headers_drop_the_agents_credentials_and_hop_by_hop_headers() {
        let upstream = upstream(&["Bearer up"]);
        let auth = UpstreamAuth::Header {
            name: header::AUTHORIZATION,
            value: model::Secret::new("Bearer up".to_string()),
        };
        let mut incoming = HeaderMap::new();
        for (name, value) in [
            ("authorization", "DPoP agent-token"),
            ("dpop", "proof"),
            ("cookie", "session=1"),
            ("host", "evil.example"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic x"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("transfer-encoding", "chunked"),
            ("accept-encoding", "gzip"),
            ("x-kept", "yes"),
        ] {
            incoming.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        let out = upstream.request_headers(&incoming, &auth);
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["accept-encoding", "x-kept", "authorization"]);
        assert_eq!(out[header::AUTHORIZATION], "Bearer up");
        assert!(out[header::AUTHORIZATION].is_sensitive());
        assert_eq!(out[header::ACCEPT_ENCODING], "identity");
    }

    #[test]
    fn response_headers_redact_credentials_and_drop_length_when_scrubbing() {
        let upstream = upstream(&["Bearer up-secret"]);
        let mut incoming = HeaderMap::new();
        for (name, value) in [
            ("location", "https://x.example/?t=up-secret"),
            ("x-echo", "Bearer up-secret"),
            ("content-length", "10"),
            ("set-cookie", "s=1"),
            ("connection", "close"),
            ("content-type", "text/plain"),
        ] {
            incoming.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        let out = upstream.response_headers(&incoming);
        assert_eq!(out[header::LOCATION], "https://x.example/?t=[redacted]");
        assert_eq!(out["x-echo"], "[redacted]");
        assert_eq!(out.len(), 3, "{out:?}");
        assert_eq!(out[header::CONTENT_TYPE], "text/plain");

        let plain = Upstream::new(&[]).unwrap();
        assert_eq!(
            plain.response_headers(&incoming)[header::CONTENT_LENGTH],
            "10"
        );
    }
}
