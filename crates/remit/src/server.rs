//! The listener of `remit serve`: HTTP/1.1 and HTTP/2 (cleartext) connections from anyone who
//! can reach the port, so everything a client holds open before it has authenticated is
//! bounded. A connection must send its request's headers within `header_read_timeout`, a
//! kept-alive connection with no request in flight is closed after `idle_timeout`, at most
//! `max_connections` are open at once (one more is answered 503 and closed at once, without
//! reading it), and a connection's headers and read buffer are bounded by `max_header_bytes`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Result, bail};
use axum::body::{Body, Bytes};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tower::ServiceExt;

/// How long shutdown waits for requests in flight (a held approval, an SSE stream) to end.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Files kept free for everything that is not a client's connection (store, logs, listener).
const RESERVED_FILES: u64 = 256;
/// Concurrent HTTP/2 streams per connection: the cap on connections bounds clients, this
/// bounds what one connection can ask for at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 100;
/// The answer to a connection over the cap, written without reading anything from it.
const OVER_CAPACITY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
content-length: 73\r\nretry-after: 1\r\nconnection: close\r\n\r\n\
{\"error\":\"over_capacity\",\"message\":\"remit has no free connection; retry\"}";

/// `[server]`, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// Was `max_connections` written in the configuration? A default that the file limit
    /// cannot hold is lowered with a warning; a value someone chose stops start-up instead.
    pub max_connections_configured: bool,
    pub max_header_bytes: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_connections_configured: false,
            max_header_bytes: 16 * 1024,
        }
    }
}

impl ServerLimits {
    /// The open files `max_connections` needs: each connection may hold one upstream
    /// connection while its call is forwarded, besides its own.
    fn files_needed(max_connections: usize) -> u64 {
        (max_connections as u64).saturating_mul(2) + RESERVED_FILES
    }

    /// Makes sure the process may open the files the cap needs (`RLIMIT_NOFILE`): raises the
    /// soft limit up to the hard one when that is enough, lowers a default cap with a warning,
    /// and refuses a configured cap that cannot be honoured.
    pub fn fit_open_files(mut self) -> Result<ServerLimits> {
        let Some(allowed) = open_file_limit(Self::files_needed(self.max_connections)) else {
            return Ok(self);
        };
        let needed = Self::files_needed(self.max_connections);
        if allowed >= needed {
            return Ok(self);
        }
        let fits = (allowed.saturating_sub(RESERVED_FILES) / 2) as usize;
        if self.max_connections_configured || fits == 0 {
            bail!(
                "`server.max_connections` = {} needs {needed} open files (two per connection and {RESERVED_FILES} more), but this process may open at most {allowed} (RLIMIT_NOFILE); hint: lower `server.max_connections` to at most {fits}, or raise the limit (`ulimit -n`, systemd `LimitNOFILE=`)",
                self.max_connections
            );
        }
        tracing::warn!(
            "`server.max_connections` lowered from {} to {fits}: this process may open at most {allowed} files (RLIMIT_NOFILE), two per connection; raise the limit (`ulimit -n`, systemd `LimitNOFILE=`) to serve more",
            self.max_connections
        );
        self.max_connections = fits;
        Ok(self)
    }
}

/// The files this process may open, after raising the soft limit towards `wanted` as far as
/// the hard limit allows; `None` when unlimited or unknown.
#[cfg(unix)]
fn open_file_limit(wanted: u64) -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let current = limit.current?;
    if current >= wanted {
        return Some(current);
    }
    let raised = limit.maximum.map_or(wanted, |maximum| maximum.min(wanted));
    if raised > current
        && setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(raised),
                maximum: limit.maximum,
            },
        )
        .is_ok()
    {
        tracing::info!("raised the open file limit (RLIMIT_NOFILE) from {current} to {raised}");
        return Some(raised);
    }
    Some(current)
}

#[cfg(not(unix))]
fn open_file_limit(_wanted: u64) -> Option<u64> {
    None
}

/// Serves `app` on `listener` until `shutdown` completes, then lets requests in flight finish
/// (up to [`SHUTDOWN_GRACE`]).
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Each connection's watchdog times the headers (hyper's own timer would also cut an
        // idle keep-alive connection at the header timeout).
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .keep_alive_interval(limits.idle_timeout / 2)
        .keep_alive_timeout(limits.header_read_timeout);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut warned_full: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors (or another passing error): back off instead of
                    // spinning on a listener that stays readable.
                    tracing::warn!("cannot accept a connection: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            // Full: answer from the socket buffer and close, reading nothing.
            let _ = stream.try_write(OVER_CAPACITY);
            drop(stream);
            if warned_full.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
                tracing::warn!(
                    "{} connections open, the `server.max_connections` cap: refusing new ones",
                    limits.max_connections
                );
                warned_full = Some(Instant::now());
            }
            continue;
        };
        let activity = Arc::new(Activity::default());
        let io = TokioIo::new(Watched {
            stream,
            activity: Arc::clone(&activity),
        });
        let service = {
            let activity = Arc::clone(&activity);
            let app = app.clone();
            hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let guard = InFlight::start(Arc::clone(&activity));
                let response = app.clone().oneshot(request.map(Body::new));
                async move {
                    let response = response.await?;
                    Ok::<_, Infallible>(response.map(|body| Tracked {
                        body,
                        _guard: guard,
                    }))
                }
            })
        };
        let connection = graceful.watch(builder.serve_connection(io, service).into_owned());
        tokio::spawn(async move {
            let mut watchdog = Watchdog::new(limits, Instant::now());
            tokio::pin!(connection);
            loop {
                let deadline = watchdog.deadline(&activity, Instant::now());
                tokio::select! {
                    _ = &mut connection => break,
                    () = activity.changed.notified() => {}
                    () = sleep_until(deadline) => {
                        if watchdog.deadline(&activity, Instant::now()).is_some_and(|d| d <= Instant::now()) {
                            // No request in flight: closing loses nothing the server holds.
                            break;
                        }
                    }
                }
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "requests still in flight after {}s of shutdown are cut off",
            SHUTDOWN_GRACE.as_secs()
        );
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// What one connection is doing, shared by its socket, its requests and its watchdog.
#[derive(Debug, Default)]
struct Activity {
    bytes_read: AtomicU64,
    in_flight: AtomicUsize,
    /// Requests whose response has been sent (or dropped).
    finished: AtomicU64,
    /// Set while the watchdog waits for the first byte of the next request.
    awaiting_bytes: AtomicBool,
    changed: Notify,
}

/// Decides when a connection with no request in flight has waited too long: its first
/// request's headers get `header_read_timeout` from the accept; after a response, the
/// connection may sit idle for `idle_timeout`, and once the next request's first byte arrives
/// its headers get `header_read_timeout` again. (On HTTP/2, a ping or window update between
/// requests counts as a first byte, so an idle HTTP/2 connection goes at the header timeout.)
#[derive(Debug)]
struct Watchdog {
    limits: ServerLimits,
    accepted: Instant,
    seen_finished: u64,
    idle_since: Instant,
    bytes_at_idle: u64,
    request_started: Option<Instant>,
}

impl Watchdog {
    fn new(limits: ServerLimits, accepted: Instant) -> Watchdog {
        Watchdog {
            limits,
            accepted,
            seen_finished: 0,
            idle_since: accepted,
            bytes_at_idle: 0,
            request_started: None,
        }
    }

    /// When to close the connection, or `None` while a request is in flight.
    fn deadline(&mut self, activity: &Activity, now: Instant) -> Option<Instant> {
        if activity.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let finished = activity.finished.load(Ordering::Acquire);
        if finished == 0 {
            return Some(self.accepted + self.limits.header_read_timeout);
        }
        if finished != self.seen_finished {
            self.seen_finished = finished;
            self.idle_since = now;
            self.request_started = None;
            // Armed before the count is read, so that a byte arriving after it wakes us.
            activity.awaiting_bytes.store(true, Ordering::Release);
            self.bytes_at_idle = activity.bytes_read.load(Ordering::Acquire);
        }
        if self.request_started.is_none()
            && activity.bytes_read.load(Ordering::Acquire) != self.bytes_at_idle
        {
            self.request_started = Some(now);
        }
        Some(match self.request_started {
            Some(started) => started + self.limits.header_read_timeout,
            None => self.idle_since + self.limits.idle_timeout,
        })
    }
}

/// The client's socket, counting what it reads for the watchdog.
#[derive(Debug)]
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.stream).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.activity
                .bytes_read
                .fetch_add(read as u64, Ordering::AcqRel);
            if self.activity.awaiting_bytes.swap(false, Ordering::AcqRel) {
                self.activity.changed.notify_one();
            }
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// One request in flight, from its headers until its response body is gone.
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_one();
    }
}

/// A response body that ends its request's [`InFlight`] when hyper is done with it.
#[derive(Debug)]
struct Tracked {
    body: Body,
    _guard: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ServerLimits {
        ServerLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            ..ServerLimits::default()
        }
    }

    #[test]
    fn the_over_capacity_answer_is_well_formed() {
        let text = std::str::from_utf8(OVER_CAPACITY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"], "over_capacity");
    }

    /// The watchdog's clock, moved by hand: headers, idleness and requests in flight.
    #[test]
    fn the_watchdog_times_headers_and_idleness_apart() {
        let start = Instant::now();
        let activity = Activity::default();
        let mut watchdog = Watchdog::new(limits(), start);
        let second = |n: u64| start + Duration::from_secs(n);
        // A fresh connection has the header timeout from its accept, bytes or not.
        assert_eq!(watchdog.deadline(&activity, start), Some(second(10)));
        activity.bytes_read.store(20, Ordering::Release);
        assert_eq!(watchdog.deadline(&activity, second(5)), Some(second(10)));
        // A request in flight is never cut.
        activity.in_flight.store(1, Ordering::Release);
        assert_eq!(watchdog.deadline(&activity, second(30)), None);
        // Its response sent, the connection may idle for the idle timeout ...
        activity.in_flight.store(0, Ordering::Release);
        activity.finished.store(1, Ordering::Release);
        assert_eq!(watchdog.deadline(&activity, second(40)), Some(second(100)));
        assert!(activity.awaiting_bytes.load(Ordering::Acquire));
        assert_eq!(watchdog.deadline(&activity, second(70)), Some(second(100)));
        // ... and once the next request's first byte arrives, it has the header timeout.
        activity.bytes_read.store(21, Ordering::Release);
        assert_eq!(watchdog.deadline(&activity, second(80)), Some(second(90)));
        assert_eq!(watchdog.deadline(&activity, second(85)), Some(second(90)));
        // The next response starts a new idle period.
        activity.finished.store(2, Ordering::Release);
        assert_eq!(watchdog.deadline(&activity, second(86)), Some(second(146)));
    }

    #[test]
    fn requests_in_flight_are_counted_until_their_body_is_dropped() {
        let activity = Arc::new(Activity::default());
        let guard = InFlight::start(Arc::clone(&activity));
        let body = Tracked {
            body: Body::from("x"),
            _guard: guard,
        };
        assert_eq!(activity.in_flight.load(Ordering::Acquire), 1);
        drop(body);
        assert_eq!(activity.in_flight.load(Ordering::Acquire), 0);
        assert_eq!(activity.finished.load(Ordering::Acquire), 1);
    }
}
