//! The only crate with SQL. One [`Store`] interface, two implementations with identical
//! behaviour: SQLite (the embedded default) and PostgreSQL (for several replicas). Every
//! state change is written in the same transaction as the audit event that records it, and
//! writes are group-committed so that durability stays cheap.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use audit::{Event, EventBody};
// The workspace's one `redact_url`, for the store's own messages (`crate::redact_url`).
use model::redact_url;
use model::{
    AgentName, AgentStatus, Owner, Role, ScopeSet, Secret, SpiffeId, TaskId, TaskStatus,
    UnixSeconds,
};
use serde::{Deserialize, Serialize};

mod bounded;
mod engine;
mod postgres;
mod sqlite;
#[cfg(feature = "testing")]
pub mod testing;

/// Errors a store reports. `Unavailable` is the one the call path turns into a fail-closed
/// denial; the others are answers.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("{what} `{key}` already exists")]
    Conflict { what: &'static str, key: String },
    #[error("{what} `{key}` not found")]
    NotFound { what: &'static str, key: String },
    #[error("invalid store URL `{0}`: expected `sqlite://PATH` or `postgres://…`")]
    BadUrl(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// Opened with [`OpenOptions::create_if_missing`] off where there is no store: no SQLite
    /// file at the path, or a PostgreSQL schema that remit never migrated.
    #[error("no store at `{0}`")]
    Missing(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A registered agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub name: AgentName,
    pub spiffe_id: SpiffeId,
    pub owner: Owner,
    pub status: AgentStatus,
    /// Public JWKs (P-256 or Ed25519), as registered. Never private keys.
    pub keys: Vec<serde_json::Value>,
    pub created_at: UnixSeconds,
}

/// An operator: a human or CI with a role on the admin API. Only the token's hash is kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OperatorRecord {
    pub id: String,
    pub name: String,
    pub role: Role,
    /// SHA-256 of the operator token.
    #[serde(skip)]
    pub token_hash: [u8; 32],
    pub created_at: UnixSeconds,
    pub disabled: bool,
}

/// A signing key for task tokens. The private half is PKCS#8 DER in a redacting type.
#[derive(Clone, Debug)]
pub struct SigningKeyRecord {
    pub kid: String,
    pub pkcs8: Secret<Vec<u8>>,
    /// The public JWK as published in the JWKS.
    pub public_jwk: serde_json::Value,
    pub created_at: UnixSeconds,
    /// When it stopped signing; `None` for the current key.
    pub retired_at: Option<UnixSeconds>,
    /// Published until every token it signed has expired.
    pub publish_until: Option<UnixSeconds>,
}

/// A task: the unit of just-in-time authority.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: TaskId,
    pub agent: AgentName,
    pub owner: Owner,
    pub intent: String,
    pub scopes: ScopeSet,
    pub obo: Option<String>,
    pub parent: Option<TaskId>,
    pub depth: u32,
    pub status: TaskStatus,
    pub created_at: UnixSeconds,
    pub expires_at: UnixSeconds,
    pub budget: u32,
    /// Allowed calls as last settled ([`Store::settle_task_calls`]); the audit log holds every
    /// call since, which [`Store::count_task_calls`] adds.
    pub calls_used: u32,
    /// `jti` of the token issued for the task.
    pub token_jti: String,
    /// Thumbprint (RFC 7638) of the key the token is bound to.
    pub jkt: String,
}

/// A task's allowed tool calls counted from the audit log (see [`Store::count_task_calls`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCalls {
    /// Allowed calls recorded up to `through_seq`.
    pub used: u32,
    /// The audit sequence number the count reaches (the head when it was taken).
    pub through_seq: u64,
}

/// What a revocation names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationKind {
    /// A token, by `jti`.
    Token,
    /// A task (and so every task delegated from it).
    Task,
    /// An agent, by name: every task it holds, now and later, until released.
    Agent,
    /// An owner: every agent it owns.
    Owner,
}

impl RevocationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationKind::Token => "token",
            RevocationKind::Task => "task",
            RevocationKind::Agent => "agent",
            RevocationKind::Owner => "owner",
        }
    }

    pub fn parse(text: &str) -> Option<RevocationKind> {
        match text {
            "token" => Some(RevocationKind::Token),
            "task" => Some(RevocationKind::Task),
            "agent" => Some(RevocationKind::Agent),
            "owner" => Some(RevocationKind::Owner),
            _ => None,
        }
    }
}

/// A revocation as requested.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewRevocation {
    pub kind: RevocationKind,
    pub target: String,
    pub reason: String,
    pub created_at: UnixSeconds,
}

/// A revocation as stored, with its place in the revocation feed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Revocation {
    pub seq: i64,
    pub kind: RevocationKind,
    pub target: String,
    pub reason: String,
    pub created_at: UnixSeconds,
}

/// Where a step-up approval stands. `Expired` is never stored by remit itself: an approval
/// whose `expires_at` has passed is expired whatever its stored status, and views say so.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalStatus {
    /// Filed, waiting for a human.
    Pending,
    /// A human approved: the exact call may pass once.
    Approved,
    /// A human refused: the call never passes on this approval.
    Denied,
    /// Spent by the one call it allowed.
    Consumed,
    Expired,
}

impl ApprovalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalStatus::Pending => "pending",
            ApprovalStatus::Approved => "approved",
            ApprovalStatus::Denied => "denied",
            ApprovalStatus::Consumed => "consumed",
            ApprovalStatus::Expired => "expired",
        }
    }

    pub fn parse(text: &str) -> Option<ApprovalStatus> {
        match text {
            "pending" => Some(ApprovalStatus::Pending),
            "approved" => Some(ApprovalStatus::Approved),
            "denied" => Some(ApprovalStatus::Denied),
            "consumed" => Some(ApprovalStatus::Consumed),
            "expired" => Some(ApprovalStatus::Expired),
            _ => None,
        }
    }
}

impl std::fmt::Display for ApprovalStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A step-up approval: a human's leave for one exact call (task, tool, action, resource and
/// the SHA-256 of its canonical arguments), usable once before `expires_at`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApprovalRecord {
    /// `apr_` and 16 random bytes in hexadecimal.
    pub id: String,
    pub task: TaskId,
    /// The calling agent's SPIFFE ID.
    pub agent: SpiffeId,
    /// The agent's accountable owner, who may not approve unless configured to.
    pub owner: Owner,
    pub tool: String,
    pub action: String,
    pub resource: String,
    /// Lowercase hexadecimal SHA-256 of the call's canonical arguments JSON.
    pub args_digest: String,
    pub status: ApprovalStatus,
    pub created_at: UnixSeconds,
    pub expires_at: UnixSeconds,
    /// The operator (`operator:<id>`) who approved or denied.
    pub decided_by: Option<String>,
    pub decision_reason: Option<String>,
    pub decided_at: Option<UnixSeconds>,
}

/// The exact call an approval is bound to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApprovalKey<'a> {
    pub task: &'a TaskId,
    pub tool: &'a str,
    pub action: &'a str,
    pub resource: &'a str,
    pub args_digest: &'a str,
}

/// Most rows one `query_events` or `list_approvals` returns, whatever limit is asked: the API
/// refuses a larger `limit` rather than answer with fewer rows than asked.
pub const QUERY_LIMIT_MAX: u32 = 1_000;

/// A DPoP proof spent by the write it rides with (a call's decision, a grant, a task's
/// completion): the store refuses a second spend of the same proof with
/// [`StoreError::Conflict`] (`what` = `"proof"`), whichever process or replica tries it, so
/// that a proof is accepted once by the whole cluster. The row is kept until
/// [`Store::sweep_proof_spends`] removes proofs too old to be accepted anyway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProofSpend {
    /// The proof's `iat`, in seconds: a proof is identified by its bytes, so a replay carries
    /// the same one, and the spends of one moment sit together in the store's index.
    pub iat: i64,
    /// SHA-256 of the signing key's RFC 7638 thumbprint, `.` and the proof's `jti`.
    pub digest: [u8; 32],
}

/// Which audit events to return, newest last.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditFilter {
    pub agent: Option<String>,
    pub task: Option<String>,
    /// Events with `seq` greater than this.
    pub after_seq: Option<u64>,
    /// Events at or after this time (milliseconds).
    pub since_ms: Option<i64>,
    /// Events before this time (milliseconds).
    pub until_ms: Option<i64>,
    /// At most this many: 0 means 100, and the store caps it at 1,000.
    pub limit: u32,
    /// Take the newest matching events rather than the oldest (still returned oldest first).
    #[serde(default)]
    pub newest: bool,
}

/// What a store's writer has done since the store was opened: counters for `/metrics`.
/// Every write of a store instance passes through its one writer (group commit), the call
/// path's one serial stage, so these say how close a node is to its write ceiling: the rates
/// of `gathering` and `committing` add up to the share of time the writer is busy, and
/// `operations / batches` is the batch size. The audit lookups are filled beside the writer,
/// by a task of their own that never holds the chain lock; it is counted here too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Transactions run for queued operations (lookup fills not included).
    pub batches: u64,
    /// Operations those transactions carried.
    pub operations: u64,
    /// Time from a batch's first operation to the start of its transaction, while the writer
    /// lets the batch grow.
    pub gathering: Duration,
    /// Time running batches, from the start of the transaction to its commit (or failure).
    pub committing: Duration,
    /// Of `committing`, the time the writer held the chain lock (from the moment the lock was
    /// granted to the commit that released it): what every other writer of the chain, on
    /// this node or another replica, waits for. On SQLite's one-round-trip append the wait
    /// for the lock cannot be told apart and is counted too.
    pub chain_lock_held: Duration,
    /// Transactions that filled the per-agent and per-task audit lookups.
    pub lookup_fills: u64,
    /// Time those took, beside the writer (they exclude each other, not the writer).
    pub lookup_filling: Duration,
}

/// The one storage interface. Each method that changes state takes the audit event that
/// records the change and commits both together or neither.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// `sqlite` or `postgres`.
    fn kind(&self) -> &'static str;

    /// Woken (one permit at a time) when some process may have written a revocation or changed
    /// the signing keys, so that a node catches up with both at once instead of at its next
    /// periodic catch-up: PostgreSQL's
    /// `LISTEN/NOTIFY`. `None` where the backend has no such signal (SQLite, whose processes
    /// share one file and poll). A hint only: the periodic catch-up stays the safety net.
    fn revocation_signal(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }

    /// What this store's writer has done since the store was opened.
    fn writer_stats(&self) -> WriterStats;

    /// A cheap round trip, for health checks and fail-closed probes. On SQLite it also checks
    /// that the file at the store's path is still the one opened (see [`Store::ready`]).
    async fn ping(&self) -> Result<()>;

    /// Whether the store takes writes now: the file is still the one opened (SQLite), and a
    /// write reached the store within the last few seconds with none failing since, or else
    /// a heartbeat written now (`now_ms`) reaches it. For readiness probes.
    async fn ready(&self, now_ms: i64) -> Result<()> {
        self.heartbeat(now_ms).await
    }

    /// Rewrites one row, through the writer like every write, that nothing else reads: the
    /// cheapest write that proves a write reaches the store. Records no audit event.
    async fn heartbeat(&self, now_ms: i64) -> Result<()>;

    // Agents.
    async fn insert_agent(&self, agent: &AgentRecord, event: EventBody) -> Result<Event>;
    async fn get_agent(&self, name: &AgentName) -> Result<Option<AgentRecord>>;
    async fn list_agents(&self) -> Result<Vec<AgentRecord>>;
    /// `NotFound` when there is no such agent.
    async fn set_agent_status(
        &self,
        name: &AgentName,
        status: AgentStatus,
        event: EventBody,
    ) -> Result<Event>;

    // Operators.
    async fn insert_operator(&self, operator: &OperatorRecord, event: EventBody) -> Result<Event>;
    async fn operator_by_token_hash(&self, token_hash: &[u8; 32])
    -> Result<Option<OperatorRecord>>;
    async fn count_operators(&self) -> Result<u64>;

    // Signing keys.
    /// `Conflict` when `key` is current (no `retired_at`) while another key is current.
    async fn insert_signing_key(&self, key: &SigningKeyRecord, event: EventBody) -> Result<Event>;
    /// Retires the current key (if any) with `publish_until` and inserts `new_key` as
    /// current, atomically.
    async fn rotate_signing_key(
        &self,
        new_key: &SigningKeyRecord,
        retired_at: UnixSeconds,
        publish_until: UnixSeconds,
        event: EventBody,
    ) -> Result<Event>;
    /// Every key still published at `now`: the current one and retired ones whose
    /// `publish_until` is later than `now`. Current key first.
    async fn signing_keys(&self, now: UnixSeconds) -> Result<Vec<SigningKeyRecord>>;

    // Tasks.
    async fn insert_task(&self, task: &TaskRecord, event: EventBody) -> Result<Event>;
    async fn get_task(&self, id: &TaskId) -> Result<Option<TaskRecord>>;
    /// Moves an `active` task to `to`. `Ok(None)` when the task was not active (nothing
    /// written, no event); `NotFound` when there is no such task.
    async fn finish_task(
        &self,
        id: &TaskId,
        to: TaskStatus,
        event: EventBody,
    ) -> Result<Option<Event>>;
    /// The task's allowed tool calls as the audit log records them (every `call.decision`
    /// that allowed a tool call, session checks not included), counted in one snapshot up to
    /// the head it names: `calls_used` as last settled plus the calls recorded after it. A
    /// read, never a write; `NotFound` when there is no such task.
    async fn count_task_calls(&self, id: &TaskId) -> Result<TaskCalls>;
    /// Stores counts taken by [`Store::count_task_calls`] as each task's `calls_used`, so that
    /// later counts start from them; a count older than the one stored is ignored, as are
    /// tasks that do not exist. One write of a few statements, group-committed like every
    /// write, with no audit event: the calls themselves are audited.
    async fn settle_task_calls(&self, counts: &[(TaskId, TaskCalls)]) -> Result<()>;
    /// Ids of every active task of `agent`.
    async fn active_tasks_of_agent(&self, agent: &AgentName) -> Result<Vec<TaskId>>;
    /// Ids of the active tasks whose parent is `parent`.
    async fn child_tasks(&self, parent: &TaskId) -> Result<Vec<TaskId>>;

    // Containment.
    /// Adds denied calls (agent SPIFFE ID, time in milliseconds) that containment's
    /// `max_denials` rule counts, forgets those before `since_ms`, and answers, for each agent
    /// named in `denials`, how many of its denials since `since_ms` the store holds, from
    /// every node. No audit event: the calls themselves are audited.
    async fn add_denials(
        &self,
        denials: &[(String, i64)],
        since_ms: i64,
    ) -> Result<Vec<(String, u32)>>;
    /// Forgets every stored denial of `agent` (at quarantine: a released agent starts afresh).
    async fn clear_denials(&self, agent: &str) -> Result<()>;

    // Revocations.
    async fn insert_revocation(
        &self,
        revocation: &NewRevocation,
        event: EventBody,
    ) -> Result<(Revocation, Event)>;
    /// The revocation feed: revocations with `seq` greater than `after`, in order; at most
    /// `limit` (0 means 1,000; capped at 10,000).
    async fn revocations_after(&self, after: i64, limit: u32) -> Result<Vec<Revocation>>;

    // Approvals.
    /// Files an approval. `Conflict` when the id exists; `NotFound` when its task does not.
    async fn insert_approval(&self, approval: &ApprovalRecord, event: EventBody) -> Result<Event>;
    async fn get_approval(&self, id: &str) -> Result<Option<ApprovalRecord>>;
    /// Approvals with this stored status (any when `None`), newest first; at most `limit` (0
    /// means 100; capped at 1,000).
    async fn list_approvals(
        &self,
        status: Option<ApprovalStatus>,
        limit: u32,
    ) -> Result<Vec<ApprovalRecord>>;
    /// Approves or denies a pending approval that has not expired at `now`, recording who and
    /// why. `Ok(None)` (nothing written, no event) when there is no such approval, it is no
    /// longer pending, or it has expired.
    async fn decide_approval(
        &self,
        id: &str,
        approve: bool,
        by: &str,
        reason: &str,
        now: UnixSeconds,
        event: EventBody,
    ) -> Result<Option<ApprovalRecord>>;
    /// Spends one approved, unexpired approval bound to exactly this call: it becomes
    /// `consumed` and the event is written with its id set as `detail.approval`. Atomic, so
    /// that of concurrent callers (in this process or another) only one spends it. `Ok(None)`
    /// (nothing written) when none matches.
    async fn consume_approval(
        &self,
        call: ApprovalKey<'_>,
        now: UnixSeconds,
        event: EventBody,
    ) -> Result<Option<ApprovalRecord>>;
    /// The newest pending, unexpired approval bound to exactly this call, so that a retried
    /// call reuses it instead of filing another.
    async fn pending_approval_for(
        &self,
        call: ApprovalKey<'_>,
        now: UnixSeconds,
    ) -> Result<Option<ApprovalRecord>>;

    // Proofs.
    /// [`Store::append_events`] of one event that spends `spend` in the same transaction:
    /// `Conflict` (`what` = `"proof"`, nothing written) when the proof was already spent.
    async fn append_spending(&self, spend: ProofSpend, event: EventBody) -> Result<Event>;
    /// [`Store::insert_task`] that spends `spend` in the same transaction (`Conflict` with
    /// `what` = `"proof"` when it was already spent).
    async fn insert_task_spending(
        &self,
        task: &TaskRecord,
        event: EventBody,
        spend: ProofSpend,
    ) -> Result<Event>;
    /// [`Store::finish_task`] that spends `spend` in the same transaction (`Conflict` with
    /// `what` = `"proof"` when it was already spent); the proof is spent even when the task
    /// was no longer active.
    async fn finish_task_spending(
        &self,
        id: &TaskId,
        to: TaskStatus,
        event: EventBody,
        spend: ProofSpend,
    ) -> Result<Option<Event>>;
    /// Forgets the spent proofs issued before `before_iat` (seconds), which no verifier
    /// accepts any more: how many were removed.
    async fn sweep_proof_spends(&self, before_iat: i64) -> Result<u64>;

    // Audit.
    /// Appends events that record decisions rather than state changes (refusals, calls).
    /// Group-committed with concurrent writers; returns once durable.
    async fn append_events(&self, events: Vec<EventBody>) -> Result<Vec<Event>>;
    /// Events with `seq` greater than `after_seq`, in order, at most `limit` (0 means 1,000;
    /// capped at 10,000): the pages an investigator verifies the chain with.
    async fn events_after(&self, after_seq: u64, limit: u32) -> Result<Vec<Event>>;
    /// Events matching every condition of `filter`, oldest first; page with `after_seq`.
    async fn query_events(&self, filter: &AuditFilter) -> Result<Vec<Event>>;
    /// Verifies the chain as stored, from `verifier`'s next sequence number to the head (the
    /// whole chain, rows numbered below 1 included, for a fresh verifier), in one pass: each
    /// row's fields go to [`audit::ChainVerifier::push_stored`] as stored, `detail` hashed as
    /// its stored text and never parsed. `Ok(Err(_))` names the first event that breaks the
    /// chain; an outer error is the store's (unreachable, or a row that cannot be decoded).
    async fn verify_chain(
        &self,
        verifier: &mut audit::ChainVerifier,
    ) -> Result<Result<(), audit::ChainBreak>>;
}

/// How [`open_with`] connects.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// How long to wait for a connection, at start-up and on every later acquire. Short,
    /// because a store that cannot be reached must turn into a prompt fail-closed denial.
    pub connect_timeout: std::time::Duration,
    /// How long any one operation may take, from the call to its answer (waiting for the
    /// writer and for locks included) before it fails as `Unavailable`; also the database's
    /// own limit (SQLite `busy_timeout`, PostgreSQL `lock_timeout`, and `statement_timeout`
    /// in write transactions). The chain walk ([`Store::verify_chain`]) alone is not bounded
    /// by it, since a long log takes as long as it takes to read.
    pub operation_timeout: std::time::Duration,
    /// Most operations that may wait for the store at once; any more fail as `Unavailable`
    /// at once instead of queueing behind a store that does not answer.
    pub max_waiting: usize,
    /// Create the store when it is missing (`serve` and `demo`): the SQLite file, or remit's
    /// tables in the PostgreSQL schema. Otherwise a missing store is [`StoreError::Missing`]
    /// and nothing is created.
    pub create_if_missing: bool,
    /// Connections kept for reads; the writer task uses one more at a time.
    pub max_connections: u32,
    /// What a SQLite commit waits for; PostgreSQL's is its server's `synchronous_commit`.
    pub sqlite_sync: SqliteSync,
}

/// What a SQLite commit, an audited call decision's included, waits for before it counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SqliteSync {
    /// The write-ahead log is flushed to the disk at every commit (`synchronous = FULL`): a
    /// committed event survives a crash of remit and of the machine, power loss included.
    #[default]
    Full,
    /// The log is written at every commit and flushed to the disk only at checkpoints
    /// (`synchronous = NORMAL`): a committed event survives a crash of remit (it is in the
    /// operating system's keeping), but the last commits before a power loss or a kernel
    /// crash may be lost, and the chain then ends early (a signed checkpoint shows it).
    Normal,
}

impl SqliteSync {
    /// As `remit.toml` spells it.
    pub fn parse(value: &str) -> Option<SqliteSync> {
        match value {
            "full" => Some(SqliteSync::Full),
            "normal" => Some(SqliteSync::Normal),
            _ => None,
        }
    }
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            connect_timeout: std::time::Duration::from_secs(5),
            operation_timeout: std::time::Duration::from_secs(5),
            max_waiting: 1024,
            create_if_missing: true,
            max_connections: 8,
            sqlite_sync: SqliteSync::Full,
        }
    }
}

/// Opens (and migrates) the store named by `url`: `sqlite://PATH` or `sqlite:PATH` (the file
/// is created if missing, unless [`OpenOptions::create_if_missing`] says not to; in-memory databases are refused because remit is durable), or
/// `postgres://…` / `postgresql://…` (connection parameters as libpq URLs take them, e.g.
/// `?options=-c%20search_path%3Dremit` to use a schema other than `public`).
pub async fn open(url: &str) -> Result<Arc<dyn Store>> {
    open_with(url, &OpenOptions::default()).await
}

/// [`open`] with explicit connection settings.
pub async fn open_with(url: &str, options: &OpenOptions) -> Result<Arc<dyn Store>> {
    if let Some(path) = sqlite_path(url) {
        sqlite::open(url, path, options).await
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        postgres::open(url, options).await
    } else {
        Err(StoreError::BadUrl(redact_url(url)))
    }
}

/// The file a `sqlite://PATH` or `sqlite:PATH` URL names (with its query), or `None` for any
/// other URL.
pub fn sqlite_path(url: &str) -> Option<&str> {
    url.strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
}

/// The file that holds the audit log's per-agent and per-task lookups for the SQLite file at
/// `path`: derived data, recreated and refilled from the log whenever it is missing.
pub fn sqlite_lookups_path(path: &str) -> String {
    format!("{path}-lookups")
}
