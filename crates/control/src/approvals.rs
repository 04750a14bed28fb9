//! Step-up approvals: when only `@step_up` forbid policies refuse a call, remit files an
//! approval bound to that exact call (task, tool, action, resource and the SHA-256 of its
//! canonical arguments) and answers `approval_required` with its id. An operator with the
//! `approver` (or `admin`) role approves or denies it; the same call retried before the
//! approval expires is evaluated again with `context.approved = true` and spends it, once.
//! Agents cannot approve: the admin API takes operator tokens only. The agent's owner cannot
//! either, unless configured.

use std::time::{Duration, Instant};

use audit::kinds;
use aws_lc_rs::digest;
use model::{Decision, DecisionReport, Role, TaskId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use store::{ApprovalKey, ApprovalRecord, ApprovalStatus};

use crate::authority::Authority;
use crate::check::{CallAttempt, Denial, TaskState, VerifiedToken};
use crate::error::{Error, ErrorKind, Result};
use crate::operators::Operator;
use crate::random;

/// Longest reason an approver may give.
pub const MAX_REASON_LEN: usize = 1024;
/// How often a held call looks for a decision.
const POLL: Duration = Duration::from_millis(200);

/// The rules, from `[approvals]` in the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApprovalRules {
    /// How long a filed approval may be decided and then used, in seconds.
    pub ttl_seconds: i64,
    /// Whether the operator named like the agent's owner may approve its calls. Off by
    /// default: an owner approving their own agent is no second pair of eyes.
    pub owner_may_approve: bool,
    /// How long a call that needs approval waits for a decision before answering, in
    /// seconds; 0 answers `approval_required` at once.
    pub hold_seconds: u64,
}

impl Default for ApprovalRules {
    fn default() -> Self {
        ApprovalRules {
            ttl_seconds: 600,
            owner_may_approve: false,
            hold_seconds: 0,
        }
    }
}

/// An approval as the API shows it. `status` is `expired` once `expires_at` has passed,
/// whatever was stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApprovalView {
    #[schema(example = "apr_0f3a…")]
    pub id: String,
    pub task: String,
    /// The calling agent's SPIFFE ID.
    pub agent: String,
    pub owner: String,
    pub tool: String,
    pub action: String,
    pub resource: String,
    /// SHA-256 (hex) of the call's canonical arguments: the approval covers these only.
    pub args_digest: String,
    /// `pending`, `approved`, `denied`, `consumed` or `expired`.
    #[schema(value_type = crate::api::ApprovalStatusName, example = "pending")]
    pub status: String,
    pub created_at: i64,
    pub expires_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<i64>,
}

/// The status an approval has at `now`.
fn effective_status(approval: &ApprovalRecord, now: i64) -> ApprovalStatus {
    match approval.status {
        ApprovalStatus::Pending | ApprovalStatus::Approved if now >= approval.expires_at => {
            ApprovalStatus::Expired
        }
        status => status,
    }
}

impl ApprovalView {
    pub fn at(approval: ApprovalRecord, now: i64) -> ApprovalView {
        ApprovalView {
            status: effective_status(&approval, now).as_str().to_string(),
            id: approval.id,
            task: approval.task.to_string(),
            agent: approval.agent.to_string(),
            owner: approval.owner.to_string(),
            tool: approval.tool,
            action: approval.action,
            resource: approval.resource,
            args_digest: approval.args_digest,
            created_at: approval.created_at,
            expires_at: approval.expires_at,
            decided_by: approval.decided_by,
            reason: approval.decision_reason,
            decided_at: approval.decided_at,
        }
    }
}

/// Lowercase hexadecimal SHA-256 of a call's arguments. The gateway hands them over as
/// canonical JSON, so equal arguments give equal digests.
pub fn args_digest(arguments: &str) -> String {
    let mut hash = [0u8; 32];
    hash.copy_from_slice(digest::digest(&digest::SHA256, arguments.as_bytes()).as_ref());
    audit::to_hex(&hash)
}

/// What a decision on a held call came to.
enum Held {
    Approved,
    Denied(Box<ApprovalRecord>),
    Undecided,
}

/// The call a step-up applies to, as the call path knows it.
pub(crate) struct StepUpCall<'a> {
    pub(crate) attempt: &'a CallAttempt<'a>,
    pub(crate) claims: &'a VerifiedToken,
    pub(crate) task: &'a TaskState,
    pub(crate) now: i64,
}

impl Authority {
    /// The call path's answer to `approval_required`: spend a matching approval (and allow
    /// if policy then allows), or file one (or reuse the pending one) and refuse with its id,
    /// holding the call for a decision first when configured. `evaluate(approved)` asks
    /// policy again with `context.approved` set.
    pub(crate) async fn step_up(
        &self,
        call: StepUpCall<'_>,
        first: DecisionReport,
        evaluate: &(impl Fn(bool) -> DecisionReport + Sync),
    ) -> std::result::Result<(DecisionReport, String), Denial> {
        let task: TaskId = call.claims.task.task_id();
        let digest = args_digest(call.attempt.arguments);
        let key = ApprovalKey {
            task: &task,
            tool: call.attempt.tool,
            action: call.attempt.action,
            resource: call.attempt.resource,
            args_digest: &digest,
        };
        if let Some(spent) = self.spend(&call, key, evaluate, call.now).await? {
            return Ok(spent);
        }
        let approval = self.file(&call, key, &first).await?;
        let rules = self.settings.approvals;
        if rules.hold_seconds > 0 {
            let hold = Duration::from_secs(rules.hold_seconds);
            match self.await_decision(&approval.id, hold).await? {
                Held::Approved => {
                    if let Some(spent) = self.spend(&call, key, evaluate, self.now()).await? {
                        return Ok(spent);
                    }
                }
                Held::Denied(denied) => {
                    let why = denied
                        .decision_reason
                        .as_deref()
                        .unwrap_or("no reason given");
                    let message = format!("approval `{}` was denied: {why}", denied.id);
                    return Err(Denial {
                        report: Some(DecisionReport {
                            decision: Decision::Deny,
                            policies: first.policies,
                            reasons: vec![message.clone()],
                        }),
                        approval: Some(denied.id),
                        ..Denial::new("approval_denied", message)
                    });
                }
                Held::Undecided => {}
            }
        }
        let why = if first.reasons.is_empty() {
            "a human must approve this exact call".to_string()
        } else {
            first.reasons.join("; ")
        };
        let message = format!(
            "approval required: {why}; approval `{}` is pending, retry the same call once an approver approves it",
            approval.id
        );
        Err(Denial {
            report: Some(first),
            approval: Some(approval.id),
            ..Denial::new("approval_required", message)
        })
    }

    /// Spends an approved approval of this exact call if policy allows the call once it is
    /// approved. `Ok(None)` when there is none to spend.
    async fn spend(
        &self,
        call: &StepUpCall<'_>,
        key: ApprovalKey<'_>,
        evaluate: &(impl Fn(bool) -> DecisionReport + Sync),
        now: i64,
    ) -> std::result::Result<Option<(DecisionReport, String)>, Denial> {
        let report = evaluate(true);
        if !report.is_allow() {
            // Approval would not help: something besides the step-up refuses the call.
            let message = if report.reasons.is_empty() {
                "policy denies this call even with a human's approval".to_string()
            } else {
                format!(
                    "policy denies this call even with a human's approval: {}",
                    report.reasons.join("; ")
                )
            };
            return Err(Denial {
                report: Some(report),
                ..Denial::new("policy_denied", message)
            });
        }
        let event = self
            .event(kinds::APPROVAL_CONSUMED, call.claims.subject())
            .agent(call.claims.subject())
            .task(key.task.as_str())
            .detail(json!({
                "tool": key.tool,
                "action": key.action,
                "resource": key.resource,
                "args_digest": key.args_digest,
                "decision": report.decision,
                "policies": report.policies,
            }));
        let spent = self
            .store
            .consume_approval(key, now, event)
            .await
            .map_err(Error::from)?;
        Ok(spent.map(|approval| (report, approval.id)))
    }

    /// The pending approval of this exact call, or a new one.
    async fn file(
        &self,
        call: &StepUpCall<'_>,
        key: ApprovalKey<'_>,
        report: &DecisionReport,
    ) -> std::result::Result<ApprovalRecord, Denial> {
        if let Some(pending) = self
            .store
            .pending_approval_for(key, call.now)
            .await
            .map_err(Error::from)?
        {
            return Ok(pending);
        }
        let approval = ApprovalRecord {
            id: random::hex_id::<16>("apr_")?,
            task: key.task.clone(),
            agent: call.claims.subject().parse().map_err(Error::from)?,
            owner: call.task.context.owner.parse().map_err(Error::from)?,
            tool: key.tool.to_string(),
            action: key.action.to_string(),
            resource: key.resource.to_string(),
            args_digest: key.args_digest.to_string(),
            status: ApprovalStatus::Pending,
            created_at: call.now,
            expires_at: call.now + self.settings.approvals.ttl_seconds,
            decided_by: None,
            decision_reason: None,
            decided_at: None,
        };
        let event = self
            .event(kinds::APPROVAL_REQUESTED, call.claims.subject())
            .agent(call.claims.subject())
            .task(key.task.as_str())
            .detail(json!({
                "approval": approval.id,
                "tool": approval.tool,
                "action": approval.action,
                "resource": approval.resource,
                "args_digest": approval.args_digest,
                "expires_at": approval.expires_at,
                "policies": report.policies,
                "reasons": report.reasons,
            }));
        self.store
            .insert_approval(&approval, event)
            .await
            .map_err(Error::from)?;
        Ok(approval)
    }

    /// Waits up to `hold` for a human to decide, looking every [`POLL`].
    async fn await_decision(&self, id: &str, hold: Duration) -> std::result::Result<Held, Denial> {
        let deadline = Instant::now() + hold;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Held::Undecided);
            }
            tokio::time::sleep(left.min(POLL)).await;
            let Some(approval) = self.store.get_approval(id).await.map_err(Error::from)? else {
                return Ok(Held::Undecided);
            };
            match effective_status(&approval, self.now()) {
                ApprovalStatus::Pending => {}
                ApprovalStatus::Approved => return Ok(Held::Approved),
                ApprovalStatus::Denied => return Ok(Held::Denied(Box::new(approval))),
                ApprovalStatus::Consumed | ApprovalStatus::Expired => {
                    return Ok(Held::Undecided);
                }
            }
        }
    }

    // The operators' side.

    /// Approvals, newest first: with `status`, only those that have it now (an expired one
    /// has status `expired`, whatever was stored).
    pub async fn list_approvals(
        &self,
        actor: &Operator,
        status: Option<ApprovalStatus>,
        limit: u32,
    ) -> Result<Vec<ApprovalView>> {
        actor.require(&[Role::Approver])?;
        let now = self.now();
        // Expiry is not written back, so expired approvals are found among all of them.
        let stored = match status {
            Some(ApprovalStatus::Expired) => None,
            other => other,
        };
        let approvals = self.store.list_approvals(stored, limit).await?;
        Ok(approvals
            .into_iter()
            .filter(|a| status.is_none_or(|s| effective_status(a, now) == s))
            .map(|a| ApprovalView::at(a, now))
            .collect())
    }

    pub async fn get_approval(&self, actor: &Operator, id: &str) -> Result<ApprovalView> {
        actor.require(&[Role::Approver])?;
        let approval = self.find_approval(id).await?;
        Ok(ApprovalView::at(approval, self.now()))
    }

    async fn find_approval(&self, id: &str) -> Result<ApprovalRecord> {
        if id.len() > 64 {
            return Err(Error::not_found(
                "approval_not_found",
                "no approval with that id",
            ));
        }
        self.store
            .get_approval(id)
            .await?
            .ok_or_else(|| Error::not_found("approval_not_found", format!("no approval `{id}`")))
    }

    /// Approves (`approve`) or denies a pending approval, with a reason. Needs the
    /// `approver` or `admin` role; the operator whose name is the agent's owner may deny but
    /// not approve, unless `approvals.owner_may_approve` is set.
    pub async fn decide_approval(
        &self,
        actor: &Operator,
        id: &str,
        approve: bool,
        reason: &str,
    ) -> Result<ApprovalView> {
        actor.require(&[Role::Approver])?;
        if reason.trim().is_empty()
            || reason.len() > MAX_REASON_LEN
            || reason.chars().any(|c| c.is_control() && c != '\n')
        {
            return Err(Error::bad_request(
                "invalid_text",
                format!("`reason` must be 1 to {MAX_REASON_LEN} bytes of printable text"),
            ));
        }
        let approval = self.find_approval(id).await?;
        if approve
            && !self.settings.approvals.owner_may_approve
            && actor.name.eq_ignore_ascii_case(approval.owner.as_str())
        {
            return Err(Error::forbidden(
                "approval_owner",
                format!(
                    "operator `{}` owns the agent and may not approve its calls; hint: another approver must, or set `approvals.owner_may_approve`",
                    actor.name
                ),
            ));
        }
        let now = self.now();
        match effective_status(&approval, now) {
            ApprovalStatus::Pending => {}
            ApprovalStatus::Expired => {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    "approval_expired",
                    format!("approval `{id}` has expired"),
                ));
            }
            status => {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    "approval_not_pending",
                    format!("approval `{id}` is already {status}"),
                ));
            }
        }
        let kind = if approve {
            kinds::APPROVAL_APPROVED
        } else {
            kinds::APPROVAL_DENIED
        };
        let event = self
            .event(kind, actor.actor())
            .agent(approval.agent.as_str())
            .task(approval.task.as_str())
            .detail(json!({
                "approval": approval.id,
                "reason": reason,
                "tool": approval.tool,
                "action": approval.action,
                "resource": approval.resource,
                "args_digest": approval.args_digest,
            }));
        let decided = self
            .store
            .decide_approval(id, approve, &actor.actor(), reason, now, event)
            .await?
            .ok_or_else(|| {
                // Decided by someone else, or expired, since it was read.
                Error::new(
                    ErrorKind::Conflict,
                    "approval_not_pending",
                    format!("approval `{id}` is no longer pending"),
                )
            })?;
        Ok(ApprovalView::at(decided, now))
    }
}
