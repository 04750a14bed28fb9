//! `loadgen`: the load harness's tools (see `bench/run.sh`). A keep-alive HTTP/1.1 load
//! generator that can sign a fresh DPoP proof for every request (stock generators cannot), a
//! fast upstream answering small JSON and minimal MCP, a plain hyper reverse proxy to measure
//! forwarding alone, and the helpers the harness needs to act as an agent: key generation,
//! task grants, and the final table.

#![allow(
    clippy::expect_used,
    reason = "a load generator stops at its first setup failure"
)]

mod agent;
mod load;
mod proxy;
mod report;
mod upstream;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    about = "remit's load harness: generator, fast upstream, agent helpers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve a tiny JSON answer on every path and a minimal MCP responder on `/mcp`.
    Upstream {
        #[arg(long, default_value = "127.0.0.1:9100")]
        listen: String,
        /// Worker threads of the upstream's runtime.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// A plain reverse proxy on hyper, checking and recording nothing: what forwarding alone
    /// costs a Rust gateway, measured beside nginx.
    Proxy {
        #[arg(long, default_value = "127.0.0.1:9101")]
        listen: String,
        /// The upstream every request goes to, `http://host:port`.
        #[arg(long, default_value = "http://127.0.0.1:9100")]
        upstream: String,
        /// Worker threads of the proxy's runtime (remit's runtime has one per core).
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Write a new agent key: the private JWK and the public JWK to register.
    Keygen {
        #[arg(long, value_name = "FILE")]
        private: PathBuf,
        #[arg(long, value_name = "FILE")]
        public: PathBuf,
        #[arg(long, value_enum, default_value_t = Alg::Es256)]
        alg: Alg,
    },
    /// Ask remit for tasks (`POST /v1/tasks` with a proof) and write one token per line.
    Grant {
        /// remit's public URL, e.g. `http://127.0.0.1:8470`.
        #[arg(long)]
        remit: String,
        #[arg(long)]
        agent: String,
        /// The agent's private JWK.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The task's scopes, a JSON array of `{tool, actions, resources}`.
        #[arg(long)]
        scopes: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value_t = 10_000)]
        budget: u32,
        #[arg(long, default_value_t = 3600)]
        ttl: i64,
        /// Where the tokens go, one per line.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Keep connections busy for a while and report throughput and latency.
    Run(load::RunArgs),
    /// Print the table of a run's results (JSON lines written by `run --out`).
    Report {
        results: PathBuf,
        /// remit's resident memory at the end, in KiB (VmRSS).
        #[arg(long)]
        rss_kib: Option<u64>,
        /// remit's peak resident memory, in KiB (VmHWM).
        #[arg(long)]
        hwm_kib: Option<u64>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Alg {
    Es256,
    Ed25519,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Upstream { listen, threads } => {
            runtime(threads)?.block_on(upstream::serve(&listen))
        }
        Command::Proxy {
            listen,
            upstream,
            threads,
        } => runtime(threads)?.block_on(proxy::run(&listen, &upstream)),
        Command::Keygen {
            private,
            public,
            alg,
        } => agent::keygen(&private, &public, alg == Alg::Ed25519),
        Command::Grant {
            remit,
            agent,
            key,
            scopes,
            count,
            budget,
            ttl,
            out,
        } => runtime(1)?.block_on(agent::grant(&agent::GrantArgs {
            remit,
            agent,
            key,
            scopes,
            count,
            budget,
            ttl,
            out,
        })),
        Command::Run(args) => {
            let threads = args.threads;
            runtime(threads)?.block_on(load::run(args))
        }
        Command::Report {
            results,
            rss_kib,
            hwm_kib,
        } => report::print(&results, rss_kib, hwm_kib),
    }
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Binds `listen` (the `--listen` argument of `what`), which must be a loopback address: the
/// harness's servers have no authentication.
pub async fn listen_on_loopback(listen: &str, what: &str) -> Result<tokio::net::TcpListener> {
    let address: std::net::SocketAddr = listen.parse().context("`--listen`")?;
    if !address.ip().is_loopback() {
        anyhow::bail!("the {what} listens on loopback only");
    }
    tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))
}

/// `10s`, `500ms`, `2m` or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as `10s`"))?;
    let seconds = match unit {
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("`{text}`: use ms, s or m")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

/// CPU time (user + system) a process has used so far, from `/proc/PID/stat`.
pub fn cpu_seconds(pid: &str, clock_ticks: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it are fixed.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After `)`: state is field 3 of the whole line, utime 14, stime 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks)
}
