//! A task's budget, held across crashes and replicas. The audit log is the count: every
//! allowed tool call is a `call.decision` committed before the call is forwarded, so the
//! number of calls a task has made is what the store counts there (`Store::count_task_calls`),
//! on any node, after any crash. A node does not ask for every call: it counts when it has no
//! calls of the task left, and takes a lease of at most `max(1, budget / 20)` of the calls the
//! count leaves, which it then spends from memory. Before it counts it waits for its own calls
//! of the task to be recorded, so the count includes every call it allowed; what it cannot see
//! are the calls other nodes hold in their own leases, at most one lease each, which bounds
//! the overshoot of the cluster at `(nodes - 1) × max(1, budget / 20)` calls. A crash loses
//! nothing: the calls it made are in the log, and the unused rest of its lease was never
//! written anywhere.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use store::TaskCalls;

use crate::authority::Authority;
use crate::check::TaskState;
use crate::compact::TaskKey;
use crate::error::{Error, ErrorKind};

/// A lease is at most this share of the budget (and at least one call).
const LEASE_PARTS: u32 = 20;
/// How often a call that waits (for this node's own calls to be recorded, or for another
/// caller's count) looks again.
const WAIT_STEP: Duration = Duration::from_millis(1);

/// The budget is spent for good: the log holds `budget` allowed calls.
const EXHAUSTED: u64 = 1 << 63;
/// One caller is counting; the others wait for its lease.
const LEASING: u64 = 1 << 62;
/// Calls allowed from the lease whose decision is not yet recorded (bits 32 to 61).
const ONE_IN_FLIGHT: u64 = 1 << 32;
const IN_FLIGHT: u64 = (LEASING - 1) & !ALLOWANCE;
/// Calls left in the lease (bits 0 to 31).
const ALLOWANCE: u64 = u32::MAX as u64;

/// The most calls one lease of `budget` carries.
pub(crate) fn lease_size(budget: u32) -> u32 {
    (budget / LEASE_PARTS).max(1)
}

/// This node's share of one task's budget, in one word so that taking a call is one
/// compare-and-swap: calls left in the lease, calls taken and not yet recorded, and two flags.
#[derive(Debug, Default)]
pub(crate) struct Lease(AtomicU64);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Take {
    /// One call taken from the lease.
    Taken,
    /// The lease is empty and this caller must count and lease again.
    Lease,
    /// The lease is empty and another caller is leasing.
    Wait,
    Exhausted,
}

impl Lease {
    fn take(&self) -> Take {
        let mut outcome = Take::Exhausted;
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                if word & EXHAUSTED != 0 {
                    outcome = Take::Exhausted;
                    None
                } else if word & ALLOWANCE > 0 {
                    outcome = Take::Taken;
                    Some(word - 1 + ONE_IN_FLIGHT)
                } else if word & LEASING != 0 {
                    outcome = Take::Wait;
                    None
                } else {
                    outcome = Take::Lease;
                    Some(word | LEASING)
                }
            });
        outcome
    }

    fn in_flight(&self) -> u64 {
        (self.0.load(Ordering::Acquire) & IN_FLIGHT) / ONE_IN_FLIGHT
    }

    /// Ends a lease by its leasing caller: `calls` (at least one) granted, one of them taken
    /// by that caller; none granted means the budget is spent.
    fn grant(&self, calls: u32) {
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                let kept = word & IN_FLIGHT;
                Some(match calls.checked_sub(1) {
                    Some(left) => kept + ONE_IN_FLIGHT + u64::from(left),
                    None => kept | EXHAUSTED,
                })
            });
    }

    /// Ends a lease that failed: the next caller counts again.
    fn abandon(&self) {
        self.0.fetch_and(!LEASING, Ordering::AcqRel);
    }

    fn recorded(&self) {
        self.0.fetch_sub(ONE_IN_FLIGHT, Ordering::AcqRel);
    }
}

/// One call's hold on its task's budget, from the moment the call takes it until its decision
/// is recorded, or it is dropped unrecorded: until then the node does not count the task,
/// whose count would miss the call.
#[derive(Debug)]
pub(crate) struct BudgetHold(Arc<TaskState>);

impl Drop for BudgetHold {
    fn drop(&mut self) {
        self.0.lease.recorded();
    }
}

/// Clears the leasing flag if the leasing caller is dropped or fails before granting.
struct Leasing<'a>(Option<&'a Lease>);

impl Drop for Leasing<'_> {
    fn drop(&mut self) {
        if let Some(lease) = self.0.take() {
            lease.abandon();
        }
    }
}

impl Authority {
    /// Takes one call from the budget of `task` for a call that is otherwise allowed: from
    /// this node's lease, or from a new lease after counting the task's calls in the store.
    /// `None` when the budget is spent.
    pub(crate) async fn take_budget(
        &self,
        key: TaskKey,
        task: &Arc<TaskState>,
    ) -> Result<Option<BudgetHold>, Error> {
        let deadline = Instant::now() + self.settings.store_timeout;
        loop {
            match task.lease.take() {
                Take::Taken => return Ok(Some(BudgetHold(Arc::clone(task)))),
                Take::Exhausted => return Ok(None),
                Take::Wait => wait_until(deadline).await?,
                Take::Lease => return self.lease(key, task, deadline).await,
            }
        }
    }

    /// Counts the task's calls once this node's own are recorded, and leases what is left.
    async fn lease(
        &self,
        key: TaskKey,
        task: &Arc<TaskState>,
        deadline: Instant,
    ) -> Result<Option<BudgetHold>, Error> {
        let mut leasing = Leasing(Some(&task.lease));
        while task.lease.in_flight() > 0 {
            wait_until(deadline).await?;
        }
        let counted = self.store.count_task_calls(&key.task_id()).await?;
        self.count_to_settle(key, counted);
        let left = task.budget.saturating_sub(counted.used);
        leasing.0 = None;
        task.lease.grant(left.min(lease_size(task.budget)));
        Ok((left > 0).then(|| BudgetHold(Arc::clone(task))))
    }

    /// Keeps the newest count of each task, which the next catch-up settles in the store.
    fn count_to_settle(&self, key: TaskKey, counted: TaskCalls) {
        let mut counts = self.unsettled_calls.lock();
        let entry = counts.entry(key).or_insert(counted);
        if counted.through_seq > entry.through_seq {
            *entry = counted;
        }
    }

    /// Settles the counts taken since the last catch-up as each task's `calls_used`, in one
    /// write, so that later counts on any node start from them. A count that cannot be written
    /// is kept for the next catch-up, unless a newer one replaced it meanwhile.
    pub async fn flush_call_counts(&self) {
        let pending: Vec<(TaskKey, TaskCalls)> = self.unsettled_calls.lock().drain().collect();
        let counts: Vec<_> = pending
            .iter()
            .map(|(task, counted)| (task.task_id(), *counted))
            .collect();
        if let Err(error) = self.store.settle_task_calls(&counts).await {
            tracing::warn!(
                tasks = counts.len(),
                "could not settle the call counts: {error}"
            );
            if matches!(error, store::StoreError::Unavailable(_)) {
                for (task, counted) in pending {
                    self.count_to_settle(task, counted);
                }
            }
        }
    }
}

/// Sleeps one step, or fails closed once `deadline` has passed: the store is not answering
/// (this node's own calls are still unrecorded, or another caller's count has not come back).
async fn wait_until(deadline: Instant) -> Result<(), Error> {
    if Instant::now() >= deadline {
        return Err(Error::new(
            ErrorKind::Unavailable,
            "store_unavailable",
            "the store did not answer in time to count the task's calls, so remit refuses (fails closed)",
        ));
    }
    tokio::time::sleep(WAIT_STEP).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_a_twentieth_of_the_budget_and_at_least_one_call() {
        assert_eq!(lease_size(1), 1);
        assert_eq!(lease_size(30), 1);
        assert_eq!(lease_size(40), 2);
        assert_eq!(lease_size(100), 5);
        assert_eq!(lease_size(10_000), 500);
    }

    #[test]
    fn one_caller_leases_and_the_others_wait_for_it() {
        let lease = Lease::default();
        assert_eq!(lease.take(), Take::Lease);
        assert_eq!(lease.take(), Take::Wait);
        lease.grant(3);
        assert_eq!(lease.in_flight(), 1, "the leasing caller took one call");
        assert_eq!(lease.take(), Take::Taken);
        assert_eq!(lease.take(), Take::Taken);
        assert_eq!(lease.in_flight(), 3);
        assert_eq!(
            lease.take(),
            Take::Lease,
            "three calls granted, three taken"
        );
        lease.abandon();
        assert_eq!(
            lease.take(),
            Take::Lease,
            "a failed lease leaves the next caller to count"
        );
        for _ in 0..3 {
            lease.recorded();
        }
        assert_eq!(lease.in_flight(), 0);
        lease.grant(0);
        assert_eq!(lease.take(), Take::Exhausted);
        assert_eq!(lease.take(), Take::Exhausted);
    }
}
