//! The command line: every subcommand and flag, and the environment variables remit reads
//! (named here once).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Environment variables remit reads.
pub mod env {
    pub const CONFIG: &str = "REMIT_CONFIG";
    pub const STORE: &str = "REMIT_STORE";
    pub const LOG: &str = "RUST_LOG";
}

#[derive(Debug, Parser)]
#[command(
    name = "remit",
    version,
    about = "Task-scoped credentials, per-call policy checks and a hash-chained audit log for AI agents"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args, Clone)]
pub struct Global {
    /// Configuration file (default: `remit.toml` when present).
    #[arg(long, global = true, env = env::CONFIG, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Store URL: `sqlite://PATH` or `postgres://…` (default: `sqlite://remit.db`).
    #[arg(long, global = true, env = env::STORE, value_name = "URL")]
    pub store: Option<String>,
    /// Directory with the Cedar schema and policies (default: the built-in examples).
    #[arg(long, global = true, value_name = "DIR")]
    pub policies: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the control plane (API on `127.0.0.1:8470` by default).
    Serve(ServeArgs),
    /// Run a whole scenario against a fresh temporary store and print each step.
    Demo,
    /// Manage operators (humans and CI on the admin API).
    #[command(subcommand)]
    Operator(OperatorCommand),
    /// Register and manage agents.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Manage the task-token signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// List, approve and deny step-up approvals (calls held for a human).
    #[command(subcommand)]
    Approvals(ApprovalsCommand),
    /// Revoke a token (by `jti`), a task, an agent or an owner.
    Revoke(RevokeArgs),
    /// Read and verify the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Validate and test Cedar policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// The URL agents dial (token `iss`/`aud`, proof `htu`); default `http://<listen>`.
    #[arg(long, value_name = "URL")]
    pub public_url: Option<String>,
    /// SPIFFE trust domain of issued identities.
    #[arg(long, value_name = "DOMAIN")]
    pub trust_domain: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum OperatorCommand {
    /// Create an operator and print its token once.
    Create {
        #[arg(long, value_enum)]
        role: RoleArg,
        /// A name for the audit log.
        #[arg(long, default_value = "operator")]
        name: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RoleArg {
    Admin,
    Approver,
    Auditor,
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Register an agent with its owner and public key.
    Create {
        name: String,
        /// The accountable owner (required), e.g. `alice@example.org`.
        #[arg(long)]
        owner: String,
        /// A file holding the agent's public JWK (P-256 or Ed25519); repeat for several keys.
        #[arg(long = "key", value_name = "FILE", required = true)]
        keys: Vec<PathBuf>,
    },
    /// List agents.
    List,
    /// Show one agent.
    Show { name: String },
    /// Disable an agent: no new tasks; its credentials die on their next use.
    Disable {
        name: String,
        #[arg(long, default_value = "disabled by an operator")]
        reason: String,
    },
    /// Release a quarantined agent: it may ask for tasks again.
    Release {
        name: String,
        #[arg(long, default_value = "released by an operator")]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// List approvals, newest first (pending ones by default).
    List {
        /// `pending`, `approved`, `denied`, `consumed`, `expired` or `all`.
        #[arg(long, default_value = "pending")]
        status: String,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Approve a pending approval: the exact call it names may pass once.
    Approve {
        id: String,
        /// Why, for the audit log.
        #[arg(long)]
        reason: String,
    },
    /// Deny a pending approval.
    Deny {
        id: String,
        /// Why, for the audit log.
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate a new signing key; the old one stays published until its tokens expire.
    Rotate,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    #[arg(value_enum)]
    pub kind: RevokeKind,
    /// The `jti`, task id, agent name or owner.
    pub target: String,
    #[arg(long, default_value = "revoked by an operator")]
    pub reason: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RevokeKind {
    Token,
    Task,
    Agent,
    Owner,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Walk the hash chain; name the first bad sequence number if any.
    Verify {
        /// A checkpoint from `remit audit checkpoint`, kept since: the log must still reach
        /// its event, with the same hash (shows a cut-off tail or a rewritten history).
        #[arg(long, value_name = "FILE")]
        checkpoint: Option<PathBuf>,
    },
    /// Sign the chain's current head and print the checkpoint (one line) to keep outside
    /// remit's store.
    Checkpoint,
    /// What a task did, in order, with every task delegated from it.
    Timeline {
        task: String,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the latest events, one JSON object per line.
    Tail {
        /// How many events.
        #[arg(short = 'n', long, default_value_t = 20)]
        count: u32,
        /// Only this agent's events (name or SPIFFE ID).
        #[arg(long)]
        agent: Option<String>,
        /// Only this task's events.
        #[arg(long)]
        task: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Parse and validate a policy directory against its schema.
    Validate { dir: PathBuf },
    /// Run the test files (`DIR/tests/*.toml`) of a policy directory.
    Test { dir: PathBuf },
    /// Write the example schema, policies and a test file into DIR, to start from (never
    /// overwrites a file).
    Init { dir: PathBuf },
}
