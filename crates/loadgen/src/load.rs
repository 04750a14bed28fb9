//! The generator: `--connections` HTTP/1.1 keep-alive connections, each sending its next request
//! as soon as the previous answer has been read (closed loop), for `--warmup` then `--duration`.
//! Each request's latency (request written to answer fully read) goes into an HDR histogram.
//!
//! In `dpop` mode every request carries a fresh proof (unique `jti`, current `iat`, `ath` of the
//! token, `htu` the URL without query), signed inline on the generator's own threads just
//! before the request is sent; the signing is outside the timed span, and its cost is reported
//! per request so that the reader knows how much of the shared CPU the client took.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use credentials::AgentKeyPair;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::json;

use crate::agent::{now, read_key};
use crate::parse_duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// No credentials (direct to the upstream, nginx).
    Plain,
    /// `Authorization: Bearer <task token>`, no proof.
    Bearer,
    /// `Authorization: DPoP <task token>` and a fresh `DPoP` proof per request.
    Dpop,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The full URL to call, e.g. `http://127.0.0.1:8470/http/fast/repos/acme/api/issues`.
    #[arg(long)]
    url: String,
    #[arg(long, default_value = "GET")]
    method: String,
    /// A request body (sent with `Content-Type: application/json`).
    #[arg(long)]
    body: Option<String>,
    /// Speak MCP: `initialize` once per connection, then POST `tools/call` of this tool.
    #[arg(long, value_name = "TOOL")]
    mcp_tool: Option<String>,
    /// The `arguments` of each `tools/call`, as JSON.
    #[arg(long, default_value = "{}")]
    mcp_arguments: String,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    warmup: Duration,
    #[arg(long, value_enum, default_value_t = Mode::Plain)]
    mode: Mode,
    /// The agent's private JWK (`dpop` mode).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Task tokens, one per line; connection `i` uses token `i mod n`.
    #[arg(long, value_name = "FILE")]
    tokens: Option<PathBuf>,
    /// Worker threads of the generator.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// What this run measures, for the table (`direct`, `nginx`, `remit bearer`, …).
    #[arg(long, default_value = "run")]
    label: String,
    /// The table's section (`http`, `mcp`).
    #[arg(long, default_value = "http")]
    group: String,
    /// Append the result as one JSON line to this file.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Processes whose CPU time is sampled over the measured window (repeatable).
    #[arg(long = "server-pid", value_name = "PID")]
    server_pids: Vec<String>,
    /// Clock ticks per second of `/proc/PID/stat` (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100.0)]
    clock_ticks: f64,
}

/// What one run measured: one line of the results file.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Outcome {
    pub group: String,
    pub label: String,
    pub mode: String,
    pub connections: usize,
    pub seconds: f64,
    pub requests: u64,
    pub errors: u64,
    pub reconnects: u64,
    pub rps: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// Client time spent signing proofs, per request (µs).
    pub sign_us: f64,
    /// The generator's CPU time per request (µs), signing included.
    pub client_cpu_us: f64,
    /// CPU time per request of the `--server-pid` processes together (µs).
    pub server_cpu_us: f64,
    /// Share of the machine's cores the generator used over the window.
    pub client_cores: f64,
    pub server_cores: f64,
    /// Cores busy on the whole machine over the window (`/proc/stat`), whoever used them.
    #[serde(default)]
    pub machine_cores: f64,
    pub error_kinds: BTreeMap<String, u64>,
    pub error_sample: String,
}

struct Plan {
    authority: String,
    path_and_query: String,
    /// The proof's `htu`: the URL without query or fragment.
    htu: String,
    method: Method,
    body: Bytes,
    mcp: bool,
    initialize: Bytes,
    mode: Mode,
    key: Option<AgentKeyPair>,
    tokens: Vec<String>,
    nonce: String,
    measure_from: Instant,
    end: Instant,
}

#[derive(Default)]
struct Stats {
    histogram: Option<Histogram<u64>>,
    ok: u64,
    errors: u64,
    reconnects: u64,
    sign: Duration,
    signed: u64,
    error_kinds: BTreeMap<String, u64>,
    error_sample: String,
}

impl Stats {
    fn error(&mut self, kind: String, sample: &str) {
        self.errors += 1;
        if self.error_sample.is_empty() {
            self.error_sample = sample.chars().take(300).collect();
        }
        *self.error_kinds.entry(kind).or_default() += 1;
    }
}

pub async fn run(args: RunArgs) -> Result<()> {
    let rest = args
        .url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("`--url` must be an http:// URL"))?;
    let (authority, path_and_query) = match rest.find('/') {
        Some(at) => (rest[..at].to_string(), rest[at..].to_string()),
        None => (rest.to_string(), "/".to_string()),
    };
    let path = path_and_query
        .split(['?', '#'])
        .next()
        .unwrap_or("/")
        .to_string();
    let htu = format!("http://{authority}{path}");
    let method: Method = args.method.parse().context("`--method`")?;
    let key = match (args.mode, &args.key) {
        (Mode::Dpop, Some(path)) => Some(read_key(path)?),
        (Mode::Dpop, None) => bail!("`--mode dpop` needs `--key`"),
        _ => None,
    };
    let tokens: Vec<String> = match &args.tokens {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read `{}`", path.display()))?
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .map(str::to_string)
            .collect(),
        None => Vec::new(),
    };
    if args.mode != Mode::Plain && tokens.is_empty() {
        bail!("`--mode bearer|dpop` needs `--tokens`");
    }
    let (method, body) = match &args.mcp_tool {
        Some(tool) => {
            let arguments: serde_json::Value =
                serde_json::from_str(&args.mcp_arguments).context("`--mcp-arguments`")?;
            let call = json!({
                "jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": { "name": tool, "arguments": arguments },
            });
            (Method::POST, Bytes::from(call.to_string()))
        }
        None => (
            method,
            args.body.clone().map(Bytes::from).unwrap_or_default(),
        ),
    };
    let initialize = json!({
        "jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": { "name": "loadgen", "version": "1" },
        },
    });
    let start = Instant::now();
    let plan = Arc::new(Plan {
        authority,
        path_and_query,
        htu,
        method,
        body,
        mcp: args.mcp_tool.is_some(),
        initialize: Bytes::from(initialize.to_string()),
        mode: args.mode,
        key,
        tokens,
        nonce: format!("{}-{}", std::process::id(), now()),
        measure_from: start + args.warmup,
        end: start + args.warmup + args.duration,
    });

    let mut tasks = Vec::with_capacity(args.connections);
    for index in 0..args.connections {
        tasks.push(tokio::spawn(drive(Arc::clone(&plan), index)));
    }
    // CPU of the generator and of the servers, over the measured window only.
    tokio::time::sleep_until(plan.measure_from.into()).await;
    let cpu = |pid: &str| crate::cpu_seconds(pid, args.clock_ticks).unwrap_or(0.0);
    let client_before = cpu("self");
    let servers_before: f64 = args.server_pids.iter().map(|p| cpu(p)).sum();
    let machine_before = machine_busy(args.clock_ticks);
    tokio::time::sleep_until(plan.end.into()).await;
    let client_cpu = cpu("self") - client_before;
    let server_cpu = args.server_pids.iter().map(|p| cpu(p)).sum::<f64>() - servers_before;
    let machine_cpu = machine_busy(args.clock_ticks) - machine_before;

    let mut total = Stats {
        histogram: Some(new_histogram()?),
        ..Stats::default()
    };
    for task in tasks {
        let stats = task.await.context("a connection task failed")?;
        if let (Some(all), Some(one)) = (total.histogram.as_mut(), stats.histogram.as_ref()) {
            all.add(one).map_err(|e| anyhow!("histogram: {e}"))?;
        }
        total.ok += stats.ok;
        total.errors += stats.errors;
        total.reconnects += stats.reconnects;
        total.sign += stats.sign;
        total.signed += stats.signed;
        for (kind, count) in stats.error_kinds {
            *total.error_kinds.entry(kind).or_default() += count;
        }
        if total.error_sample.is_empty() {
            total.error_sample = stats.error_sample;
        }
    }
    let histogram = total.histogram.take().unwrap_or(new_histogram()?);
    let seconds = args.duration.as_secs_f64();
    let requests = total.ok + total.errors;
    let per_request = |cpu: f64| {
        if requests == 0 {
            0.0
        } else {
            cpu * 1e6 / requests as f64
        }
    };
    let outcome = Outcome {
        group: args.group.clone(),
        label: args.label.clone(),
        mode: format!("{:?}", args.mode).to_lowercase(),
        connections: args.connections,
        seconds,
        requests: total.ok,
        errors: total.errors,
        reconnects: total.reconnects,
        rps: total.ok as f64 / seconds,
        p50_us: histogram.value_at_quantile(0.50),
        p90_us: histogram.value_at_quantile(0.90),
        p99_us: histogram.value_at_quantile(0.99),
        p999_us: histogram.value_at_quantile(0.999),
        max_us: histogram.max(),
        sign_us: if total.signed == 0 {
            0.0
        } else {
            total.sign.as_secs_f64() * 1e6 / total.signed as f64
        },
        client_cpu_us: per_request(client_cpu),
        server_cpu_us: per_request(server_cpu),
        client_cores: client_cpu / seconds,
        server_cores: server_cpu / seconds,
        machine_cores: machine_cpu / seconds,
        error_kinds: total.error_kinds,
        error_sample: total.error_sample,
    };
    println!(
        "{:<5} {:<22} {:>9.0} req/s  p50 {:>6} µs  p99 {:>6} µs  errors {}  sign {:.1} µs/req  client CPU {:.1} µs/req  server CPU {:.1} µs/req  cores busy: client {:.2}, server {:.2}, machine {:.2}",
        outcome.group,
        outcome.label,
        outcome.rps,
        outcome.p50_us,
        outcome.p99_us,
        outcome.errors,
        outcome.sign_us,
        outcome.client_cpu_us,
        outcome.server_cpu_us,
        outcome.client_cores,
        outcome.server_cores,
        outcome.machine_cores,
    );
    if outcome.errors > 0 {
        println!(
            "      errors by kind: {:?}; first: {}",
            outcome.error_kinds, outcome.error_sample
        );
    }
    if let Some(path) = &args.out {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open `{}`", path.display()))?;
        writeln!(file, "{}", serde_json::to_string(&outcome)?)?;
    }
    Ok(())
}

/// CPU seconds the whole machine has spent busy (everything but idle and I/O wait).
fn machine_busy(clock_ticks: f64) -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = stat.lines().next() else {
        return 0.0;
    };
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|field| field.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …
    let busy: f64 = ticks
        .iter()
        .enumerate()
        .filter(|(index, _)| *index != 3 && *index != 4 && *index < 8)
        .map(|(_, value)| value)
        .sum();
    busy / clock_ticks
}

fn new_histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 60_000_000, 3).map_err(|e| anyhow!("histogram: {e}"))
}

async fn connect(plan: &Plan) -> Result<SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(&plan.authority).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// One connection's closed loop.
async fn drive(plan: Arc<Plan>, index: usize) -> Stats {
    let mut stats = Stats {
        histogram: new_histogram().ok(),
        ..Stats::default()
    };
    let authorization = plan
        .tokens
        .get(index % plan.tokens.len().max(1))
        .and_then(|token| {
            let scheme = if plan.mode == Mode::Bearer {
                "Bearer"
            } else {
                "DPoP"
            };
            HeaderValue::from_str(&format!("{scheme} {token}")).ok()
        });
    let token = plan.tokens.get(index % plan.tokens.len().max(1)).cloned();
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    let mut session: Option<HeaderValue> = None;
    let mut sequence: u64 = 0;
    while Instant::now() < plan.end {
        let mut reusable = None;
        if let Some(mut previous) = sender.take() {
            if previous.ready().await.is_ok() {
                reusable = Some(previous);
            } else {
                stats.reconnects += 1;
            }
        }
        let mut live = match reusable {
            Some(live) => live,
            None => {
                session = None;
                match connect(&plan).await {
                    Ok(live) => live,
                    Err(error) => {
                        if Instant::now() >= plan.measure_from {
                            stats.error("connect".into(), &error.to_string());
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                }
            }
        };
        if plan.mcp && session.is_none() {
            sequence += 1;
            let request = build(
                &plan,
                &plan.initialize,
                authorization.as_ref(),
                token.as_deref(),
                None,
                index,
                sequence,
                &mut stats,
            );
            match exchange(&mut live, request).await {
                Ok((status, headers, _)) if status.is_success() => {
                    session = Some(
                        headers
                            .get("mcp-session-id")
                            .cloned()
                            .unwrap_or(HeaderValue::from_static("none")),
                    );
                    sender = Some(live);
                }
                Ok((status, _, body)) => {
                    stats.error(
                        format!("initialize {}", status.as_u16()),
                        &String::from_utf8_lossy(&body),
                    );
                    sender = Some(live);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(error) => stats.error("initialize".into(), &error.to_string()),
            }
            continue;
        }
        sequence += 1;
        let signed = Instant::now();
        let request = build(
            &plan,
            &plan.body,
            authorization.as_ref(),
            token.as_deref(),
            session.as_ref(),
            index,
            sequence,
            &mut stats,
        );
        let started = Instant::now();
        let measured = started >= plan.measure_from && started < plan.end;
        if measured && plan.mode == Mode::Dpop {
            stats.sign += started - signed;
            stats.signed += 1;
        }
        let result = exchange(&mut live, request).await;
        let took = started.elapsed();
        match result {
            Ok((status, _, body)) => {
                sender = Some(live);
                let rpc_error = plan.mcp && contains(&body, b"\"error\"");
                if !measured {
                    continue;
                }
                if status.is_success() && !rpc_error {
                    stats.ok += 1;
                    if let Some(histogram) = stats.histogram.as_mut() {
                        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
                        let _ = histogram.record(micros.max(1));
                    }
                } else {
                    let kind = if rpc_error {
                        "jsonrpc error".to_string()
                    } else {
                        format!("status {}", status.as_u16())
                    };
                    stats.error(kind, &String::from_utf8_lossy(&body));
                }
            }
            Err(error) => {
                if measured {
                    stats.error("transport".into(), &error.to_string());
                }
            }
        }
    }
    stats
}

#[expect(clippy::too_many_arguments, reason = "one request's parts")]
fn build(
    plan: &Plan,
    body: &Bytes,
    authorization: Option<&HeaderValue>,
    token: Option<&str>,
    session: Option<&HeaderValue>,
    index: usize,
    sequence: u64,
    stats: &mut Stats,
) -> Request<Full<Bytes>> {
    let method = if plan.mcp {
        Method::POST
    } else {
        plan.method.clone()
    };
    let mut request = Request::new(Full::new(body.clone()));
    *request.method_mut() = method.clone();
    *request.uri_mut() = plan
        .path_and_query
        .parse()
        .unwrap_or_else(|_| hyper::Uri::from_static("/"));
    let headers = request.headers_mut();
    if let Ok(host) = HeaderValue::from_str(&plan.authority) {
        headers.insert(hyper::header::HOST, host);
    }
    if !body.is_empty() {
        headers.insert(
            hyper::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    if plan.mcp {
        headers.insert(
            hyper::header::ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream"),
        );
        headers.insert(
            HeaderName::from_static("mcp-protocol-version"),
            HeaderValue::from_static("2025-06-18"),
        );
        if let Some(session) = session {
            headers.insert(HeaderName::from_static("mcp-session-id"), session.clone());
        }
    }
    if plan.mode != Mode::Plain
        && let Some(authorization) = authorization
    {
        headers.insert(hyper::header::AUTHORIZATION, authorization.clone());
    }
    if plan.mode == Mode::Dpop
        && let Some(key) = &plan.key
    {
        let jti = format!("{}-{index}-{sequence}", plan.nonce);
        match key.sign_proof(method.as_str(), &plan.htu, token, now(), &jti) {
            Ok(proof) => {
                if let Ok(value) = HeaderValue::from_str(&proof) {
                    headers.insert(HeaderName::from_static("dpop"), value);
                }
            }
            Err(error) => stats.error("signing".into(), &error.to_string()),
        }
    }
    request
}

type Answer = (hyper::StatusCode, hyper::HeaderMap, Bytes);

async fn exchange(
    sender: &mut SendRequest<Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> Result<Answer> {
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await?.to_bytes();
    Ok((parts.status, parts.headers, bytes))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}
