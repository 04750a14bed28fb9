//! The outer bound on every store operation, whatever the backend does: an answer within
//! [`OpenOptions::operation_timeout`], at most [`OpenOptions::max_waiting`] operations waiting
//! at once (the rest refused at once), and on SQLite a check that the file at the store's path
//! is still the one opened. A store that hangs (PostgreSQL frozen, another process holding
//! SQLite's write lock) thus turns into a prompt `Unavailable`, which the call path refuses
//! on, instead of a call that hangs as long as the store does.
//!
//! The database's own limits (`busy_timeout`, `lock_timeout`, `statement_timeout`) make it
//! give up too, so that the writer does not stay stuck behind a lock after its callers left;
//! the writer also skips queued operations whose caller stopped waiting (see `engine`).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use audit::{ChainBreak, ChainVerifier, Event, EventBody};
use model::{AgentName, AgentStatus, TaskId, TaskStatus, UnixSeconds};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::{
    AgentRecord, ApprovalKey, ApprovalRecord, ApprovalStatus, AuditFilter, NewRevocation,
    OpenOptions, OperatorRecord, ProofSpend, Result, Revocation, SigningKeyRecord, Store,
    StoreError, TaskCalls, TaskRecord, WriterStats,
};

/// How recent a successful write must be for [`Store::ready`] to answer without writing.
const FRESH_WRITE: Duration = Duration::from_secs(5);

/// A store whose every operation is bounded in time and in number.
#[derive(Debug)]
pub(crate) struct Bounded<S> {
    inner: S,
    timeout: Duration,
    waiting: Semaphore,
    max_waiting: usize,
    file: Option<Arc<StoreFile>>,
    opened: Instant,
    /// Milliseconds after `opened` of the last write that reached the store, plus one (0:
    /// none yet).
    last_written: AtomicU64,
    /// The same for the last write that failed as `Unavailable`.
    last_failed: AtomicU64,
}

impl<S: Store> Bounded<S> {
    /// `inner` bounded as `options` say; `file` is the SQLite file to watch, if any.
    pub(crate) fn new(inner: S, options: &OpenOptions, file: Option<Arc<StoreFile>>) -> Bounded<S> {
        let max_waiting = options.max_waiting.clamp(1, Semaphore::MAX_PERMITS);
        Bounded {
            inner,
            timeout: options.operation_timeout,
            waiting: Semaphore::new(max_waiting),
            max_waiting,
            file,
            opened: Instant::now(),
            last_written: AtomicU64::new(0),
            last_failed: AtomicU64::new(0),
        }
    }

    /// Runs `operation` if fewer than the bound are waiting and the file was not replaced,
    /// for at most the timeout.
    async fn bounded<T>(&self, operation: impl Future<Output = Result<T>>) -> Result<T> {
        self.unreplaced()?;
        let _permit = self.permit()?;
        self.timed(operation).await
    }

    /// [`Bounded::bounded`] for a write, whose outcome readiness remembers. An answer
    /// (`Conflict`, `NotFound`) reached the store as much as a success did; a refusal by the
    /// bound did not reach it at all.
    async fn write<T>(&self, operation: impl Future<Output = Result<T>>) -> Result<T> {
        self.unreplaced()?;
        let _permit = self.permit()?;
        let result = self.timed(operation).await;
        let at = u64::try_from(self.opened.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1);
        match &result {
            Err(StoreError::Unavailable(_)) => self.last_failed.fetch_max(at, Ordering::Relaxed),
            _ => self.last_written.fetch_max(at, Ordering::Relaxed),
        };
        result
    }

    /// A place among the operations waiting for the store, or `Unavailable` at once.
    fn permit(&self) -> Result<SemaphorePermit<'_>> {
        self.waiting.try_acquire().map_err(|_| {
            StoreError::Unavailable(format!(
                "{} operations are already waiting for the store",
                self.max_waiting
            ))
        })
    }

    async fn timed<T>(&self, operation: impl Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.timeout, operation).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!(
                "the store did not answer within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }

    /// `Unavailable` once the file at the store's path was found to be another (or none).
    fn unreplaced(&self) -> Result<()> {
        match &self.file {
            Some(file) if file.replaced.load(Ordering::Relaxed) => Err(file.replaced_error()),
            _ => Ok(()),
        }
    }

    /// Looks at the file at the store's path now; from the first difference on, every
    /// operation fails.
    fn check_file(&self) -> Result<()> {
        match &self.file {
            Some(file) => file.check(),
            None => Ok(()),
        }
    }

    /// Whether a write reached the store within [`FRESH_WRITE`] and none failed since.
    fn wrote_lately(&self) -> bool {
        let written = self.last_written.load(Ordering::Relaxed);
        let failed = self.last_failed.load(Ordering::Relaxed);
        let now = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        let fresh = u64::try_from(FRESH_WRITE.as_millis()).unwrap_or(u64::MAX);
        written > failed && now.saturating_add(1).saturating_sub(written) < fresh
    }
}

/// The SQLite file a store opened, by device and inode, so that a file removed or replaced
/// under a running node is noticed: SQLite would go on writing to the unlinked inode (or to
/// its own open descriptors of the old file), and decisions would be durable nowhere anyone
/// looks. Checked by `ping` (at each catch-up), by `ready`, and by the writer before each
/// transaction (one `stat` per batch), so the next call after a removal fails closed.
#[derive(Debug)]
pub(crate) struct StoreFile {
    path: String,
    identity: FileIdentity,
    replaced: AtomicBool,
}

/// Device and inode where the platform has them; elsewhere only whether the file exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileIdentity {
    device: u64,
    inode: u64,
}

impl FileIdentity {
    fn of(path: &str) -> std::io::Result<FileIdentity> {
        let metadata = std::fs::metadata(path)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt as _;
            Ok(FileIdentity {
                device: metadata.dev(),
                inode: metadata.ino(),
            })
        }
        #[cfg(not(unix))]
        {
            let _ = metadata;
            Ok(FileIdentity {
                device: 0,
                inode: 0,
            })
        }
    }
}

impl StoreFile {
    /// The file at `path` as it is now, right after the store opened it.
    pub(crate) fn opened(path: &str) -> Result<StoreFile> {
        let identity = FileIdentity::of(path).map_err(|error| {
            StoreError::Unavailable(format!("cannot read the store file `{path}`: {error}"))
        })?;
        Ok(StoreFile {
            path: path.to_string(),
            identity,
            replaced: AtomicBool::new(false),
        })
    }

    /// Whether the path still names the file opened; from the first time it does not, never
    /// again.
    pub(crate) fn check(&self) -> Result<()> {
        if self.replaced.load(Ordering::Relaxed) {
            return Err(self.replaced_error());
        }
        match FileIdentity::of(&self.path) {
            Ok(identity) if identity == self.identity => Ok(()),
            // A file that cannot be looked at (a permission changed, say) is not proof of a
            // replacement, but no write can be trusted to land in it either: refuse, for now.
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                Err(StoreError::Unavailable(format!(
                    "cannot read the store file `{}`: {error}",
                    self.path
                )))
            }
            _ => {
                self.replaced.store(true, Ordering::Relaxed);
                tracing::error!(
                    path = %self.path,
                    "the store file was removed or replaced; refusing every operation until restarted"
                );
                Err(self.replaced_error())
            }
        }
    }

    fn replaced_error(&self) -> StoreError {
        StoreError::Unavailable(format!(
            "the store file `{}` was removed or replaced after remit opened it; restore it and \
             restart remit",
            self.path
        ))
    }
}

#[async_trait]
impl<S: Store> Store for Bounded<S> {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn revocation_signal(&self) -> Option<Arc<tokio::sync::Notify>> {
        self.inner.revocation_signal()
    }

    fn writer_stats(&self) -> WriterStats {
        self.inner.writer_stats()
    }

    async fn ping(&self) -> Result<()> {
        self.check_file()?;
        self.bounded(self.inner.ping()).await
    }

    async fn ready(&self, now_ms: i64) -> Result<()> {
        self.check_file()?;
        if self.wrote_lately() {
            return Ok(());
        }
        self.heartbeat(now_ms).await
    }

    async fn heartbeat(&self, now_ms: i64) -> Result<()> {
        self.write(self.inner.heartbeat(now_ms)).await
    }

    async fn insert_agent(&self, agent: &AgentRecord, event: EventBody) -> Result<Event> {
        self.write(self.inner.insert_agent(agent, event)).await
    }

    async fn get_agent(&self, name: &AgentName) -> Result<Option<AgentRecord>> {
        self.bounded(self.inner.get_agent(name)).await
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>> {
        self.bounded(self.inner.list_agents()).await
    }

    async fn set_agent_status(
        &self,
        name: &AgentName,
        status: AgentStatus,
        event: EventBody,
    ) -> Result<Event> {
        self.write(self.inner.set_agent_status(name, status, event))
            .await
    }

    async fn insert_operator(&self, operator: &OperatorRecord, event: EventBody) -> Result<Event> {
        self.write(self.inner.insert_operator(operator, event))
            .await
    }

    async fn operator_by_token_hash(
        &self,
        token_hash: &[u8; 32],
    ) -> Result<Option<OperatorRecord>> {
        self.bounded(self.inner.operator_by_token_hash(token_hash))
            .await
    }

    async fn count_operators(&self) -> Result<u64> {
        self.bounded(self.inner.count_operators()).await
    }

    async fn insert_signing_key(&self, key: &SigningKeyRecord, event: EventBody) -> Result<Event> {
        self.write(self.inner.insert_signing_key(key, event)).await
    }

    async fn rotate_signing_key(
        &self,
        new_key: &SigningKeyRecord,
        retired_at: UnixSeconds,
        publish_until: UnixSeconds,
        event: EventBody,
    ) -> Result<Event> {
        self.write(
            self.inner
                .rotate_signing_key(new_key, retired_at, publish_until, event),
        )
        .await
    }

    async fn signing_keys(&self, now: UnixSeconds) -> Result<Vec<SigningKeyRecord>> {
        self.bounded(self.inner.signing_keys(now)).await
    }

    async fn insert_task(&self, task: &TaskRecord, event: EventBody) -> Result<Event> {
        self.write(self.inner.insert_task(task, event)).await
    }

    async fn get_task(&self, id: &TaskId) -> Result<Option<TaskRecord>> {
        self.bounded(self.inner.get_task(id)).await
    }

    async fn finish_task(
        &self,
        id: &TaskId,
        to: TaskStatus,
        event: EventBody,
    ) -> Result<Option<Event>> {
        self.write(self.inner.finish_task(id, to, event)).await
    }

    async fn count_task_calls(&self, id: &TaskId) -> Result<TaskCalls> {
        self.bounded(self.inner.count_task_calls(id)).await
    }

    async fn settle_task_calls(&self, counts: &[(TaskId, TaskCalls)]) -> Result<()> {
        if counts.is_empty() {
            return Ok(());
        }
        self.write(self.inner.settle_task_calls(counts)).await
    }

    async fn add_denials(
        &self,
        denials: &[(String, i64)],
        since_ms: i64,
    ) -> Result<Vec<(String, u32)>> {
        self.write(self.inner.add_denials(denials, since_ms)).await
    }

    async fn clear_denials(&self, agent: &str) -> Result<()> {
        self.write(self.inner.clear_denials(agent)).await
    }

    async fn append_spending(&self, spend: ProofSpend, event: EventBody) -> Result<Event> {
        self.write(self.inner.append_spending(spend, event)).await
    }

    async fn insert_task_spending(
        &self,
        task: &TaskRecord,
        event: EventBody,
        spend: ProofSpend,
    ) -> Result<Event> {
        self.write(self.inner.insert_task_spending(task, event, spend))
            .await
    }

    async fn finish_task_spending(
        &self,
        id: &TaskId,
        to: TaskStatus,
        event: EventBody,
        spend: ProofSpend,
    ) -> Result<Option<Event>> {
        self.write(self.inner.finish_task_spending(id, to, event, spend))
            .await
    }

    async fn sweep_proof_spends(&self, before_iat: i64) -> Result<u64> {
        self.write(self.inner.sweep_proof_spends(before_iat)).await
    }

    async fn active_tasks_of_agent(&self, agent: &AgentName) -> Result<Vec<TaskId>> {
        self.bounded(self.inner.active_tasks_of_agent(agent)).await
    }

    async fn child_tasks(&self, parent: &TaskId) -> Result<Vec<TaskId>> {
        self.bounded(self.inner.child_tasks(parent)).await
    }

    async fn insert_revocation(
        &self,
        revocation: &NewRevocation,
        event: EventBody,
    ) -> Result<(Revocation, Event)> {
        self.write(self.inner.insert_revocation(revocation, event))
            .await
    }

    async fn revocations_after(&self, after: i64, limit: u32) -> Result<Vec<Revocation>> {
        self.bounded(self.inner.revocations_after(after, limit))
            .await
    }

    async fn insert_approval(&self, approval: &ApprovalRecord, event: EventBody) -> Result<Event> {
        self.write(self.inner.insert_approval(approval, event))
            .await
    }

    async fn get_approval(&self, id: &str) -> Result<Option<ApprovalRecord>> {
        self.bounded(self.inner.get_approval(id)).await
    }

    async fn list_approvals(
        &self,
        status: Option<ApprovalStatus>,
        limit: u32,
    ) -> Result<Vec<ApprovalRecord>> {
        self.bounded(self.inner.list_approvals(status, limit)).await
    }

    async fn decide_approval(
        &self,
        id: &str,
        approve: bool,
        by: &str,
        reason: &str,
        now: UnixSeconds,
        event: EventBody,
    ) -> Result<Option<ApprovalRecord>> {
        self.write(
            self.inner
                .decide_approval(id, approve, by, reason, now, event),
        )
        .await
    }

    async fn consume_approval(
        &self,
        call: ApprovalKey<'_>,
        now: UnixSeconds,
        event: EventBody,
    ) -> Result<Option<ApprovalRecord>> {
        self.write(self.inner.consume_approval(call, now, event))
            .await
    }

    async fn pending_approval_for(
        &self,
        call: ApprovalKey<'_>,
        now: UnixSeconds,
    ) -> Result<Option<ApprovalRecord>> {
        self.bounded(self.inner.pending_approval_for(call, now))
            .await
    }

    async fn append_events(&self, events: Vec<EventBody>) -> Result<Vec<Event>> {
        self.write(self.inner.append_events(events)).await
    }

    async fn events_after(&self, after_seq: u64, limit: u32) -> Result<Vec<Event>> {
        self.bounded(self.inner.events_after(after_seq, limit))
            .await
    }

    async fn query_events(&self, filter: &AuditFilter) -> Result<Vec<Event>> {
        self.bounded(self.inner.query_events(filter)).await
    }

    async fn verify_chain(&self, verifier: &mut ChainVerifier) -> Result<Result<(), ChainBreak>> {
        // Not bounded in time: the walk reads the whole log, however long. It still counts
        // toward the operations waiting, and refuses a replaced file.
        self.unreplaced()?;
        let _permit = self.permit()?;
        self.inner.verify_chain(verifier).await
    }
}
