//! The call-path decision: the library function the gateway calls for every tool call. It runs
//! DESIGN.md's steps 1 to 8 in order — token, proof, revocation, task state and budget, scope,
//! Cedar, durable audit — and fails closed: any error is a denial with its reason.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use audit::kinds;
use aws_lc_rs::digest;
use credentials::{ProofCheck, TaskClaims};
use model::{ActionClass, Decision, DecisionReport, ScopeSet, SpiffeId, TaskStatus};
use parking_lot::RwLock;
use serde::Serialize;

use crate::authority::Authority;
use crate::budget::{BudgetHold, Lease};
use crate::compact::{Interner, TaskKey, Thumbprint, TokenJti};
use crate::error::Error;
use crate::revocation::RevocationQuery;

/// Verified tokens kept by hash until they expire, so a token's signature is checked once.
const TOKEN_CACHE_CAPACITY: usize = 250_000;
/// Longest ancestor chain walked when loading a delegated task.
const MAX_CHAIN: usize = 16;
/// Longest token accepted before any parsing.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// One tool call as the gateway sees it.
#[derive(Clone, Copy, Debug)]
pub struct CallAttempt<'a> {
    /// The task token from `Authorization: DPoP …` (or `Bearer …`).
    pub token: &'a str,
    /// The `DPoP` header, if any.
    pub proof: Option<&'a str>,
    /// The tool accepts bearer task tokens (no proof): declared per tool, off by default.
    pub bearer_allowed: bool,
    /// HTTP method and public URL of the request, for the proof's `htm` and `htu`.
    pub method: &'a str,
    pub url: &'a str,
    pub tool: &'a str,
    pub action: &'a str,
    pub resource: &'a str,
    pub class: ActionClass,
    pub sensitivity: &'a [String],
    /// The call's arguments as canonical JSON (`{}` when none), shown to policy.
    pub arguments: &'a str,
    /// Admission control (rate limits), consulted once the caller is authenticated.
    pub limiter: Option<&'a dyn CallLimiter>,
}

/// Rate limits or any other admission rule the gateway applies per agent and task. It is
/// asked only after the token and proof verified, so nobody can spend another agent's
/// allowance with forged credentials.
pub trait CallLimiter: Send + Sync + std::fmt::Debug {
    /// `Err(seconds)` refuses the call and says when to retry.
    fn admit(&self, agent: &str, task: &str, now_ms: i64) -> Result<(), u64>;
}

/// How the caller proved possession.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProofMode {
    Dpop,
    Bearer,
}

impl ProofMode {
    /// As serialized: `dpop` or `bearer`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProofMode::Dpop => "dpop",
            ProofMode::Bearer => "bearer",
        }
    }
}

/// The answer for one call, already recorded in the audit log.
#[derive(Clone, Debug, Serialize)]
pub struct CallVerdict {
    pub report: DecisionReport,
    /// `allowed`, or the stable code of the first check that failed.
    pub code: &'static str,
    pub message: String,
    pub task: Option<String>,
    pub agent: Option<String>,
    pub mode: Option<ProofMode>,
    /// Sequence number of the audit event recording this decision (absent when the store
    /// could not be reached, in which case the call is denied).
    pub audit_seq: Option<u64>,
    /// Time spent deciding (steps 1 to 7), in microseconds.
    pub decision_micros: u64,
    /// For `rate_limited`: when the caller may try again, in seconds.
    pub retry_after: Option<u64>,
    /// The step-up approval this call filed or waits on (`approval_required`,
    /// `approval_denied`), or the one it spent (an allowed call).
    pub approval: Option<String>,
    /// For `revoked`: when the revocation that ended the credential was taken (Unix
    /// seconds), so that containment can tell a retry racing it from the use of a long-dead
    /// token. Never serialized.
    #[serde(skip)]
    pub ended_at: Option<i64>,
    /// What the call path keeps of the verified token (its scopes, for filtering what a
    /// caller is shown), whenever the token verified. Never serialized.
    #[serde(skip)]
    pub claims: Option<Arc<VerifiedToken>>,
    /// The call's hold on its task's budget, released once the decision is recorded.
    #[serde(skip)]
    pub(crate) budget: Option<Arc<BudgetHold>>,
    /// The DPoP proof an allowed call spends in the store with its decision, so that no
    /// other replica accepts it again.
    #[serde(skip)]
    pub(crate) proof_spend: Option<store::ProofSpend>,
}

/// What the call path keeps of a verified task token, cached by the token's hash until it
/// expires: only what later calls check, ids as the bytes they encode, and the agent, its
/// key's thumbprint and the scope set shared by every token that repeats them (80 bytes per
/// token, three of them pointers to shared values). `iss` and `aud` were checked against
/// this node's own values and are not kept, nor is `nbf` (the token was valid when it was
/// verified and stays so until `exp`).
#[derive(Debug)]
pub struct VerifiedToken {
    /// The token's `scope` claim.
    pub scope: Arc<ScopeSet>,
    pub(crate) agent: Arc<TokenAgent>,
    pub(crate) task: TaskKey,
    pub(crate) jti: TokenJti,
    /// `cnf.jkt`: a proof must come from the key of this thumbprint.
    pub(crate) jkt: Arc<Thumbprint>,
    pub(crate) iat: i64,
    pub(crate) exp: i64,
}

impl VerifiedToken {
    /// The agent's SPIFFE ID (`sub`).
    pub fn subject(&self) -> &str {
        &self.agent.spiffe_id
    }

    /// The task the token is for.
    pub fn task(&self) -> String {
        self.task.text().as_str().to_string()
    }

    pub fn expires_at(&self) -> i64 {
        self.exp
    }
}

/// The agent side of a token, the same for every token of that agent and delegation chain.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TokenAgent {
    pub(crate) spiffe_id: Box<str>,
    /// The agent's name, when `spiffe_id` is an agent SPIFFE ID (a call is refused otherwise).
    pub(crate) name: Option<Box<str>>,
    /// The delegating agents of the token's `act` claim, nearest first.
    pub(crate) delegators: Box<[String]>,
}

/// How far the call path goes for one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Check {
    /// Every step: the attempt is a tool call.
    Call,
    /// Steps 1 to 4 only (token, proof, rate limit, revocation, task state): the attempt
    /// is a protocol message that acts on nothing (an MCP `initialize`, `tools/list`,
    /// notification), so scope, policy and budget do not apply to it.
    Session,
}

impl CallVerdict {
    pub fn is_allow(&self) -> bool {
        self.report.decision == Decision::Allow
    }
}

pub(crate) struct Denial {
    pub(crate) code: &'static str,
    pub(crate) message: String,
    pub(crate) report: Option<DecisionReport>,
    pub(crate) retry_after: Option<u64>,
    pub(crate) approval: Option<String>,
    pub(crate) ended_at: Option<i64>,
}

impl Denial {
    pub(crate) fn new(code: &'static str, message: impl Into<String>) -> Denial {
        Denial {
            code,
            message: message.into(),
            report: None,
            retry_after: None,
            approval: None,
            ended_at: None,
        }
    }
}

impl From<Error> for Denial {
    fn from(error: Error) -> Denial {
        Denial::new(error.code, error.message)
    }
}

/// What steps 1 to 7 hand to the record of an allowed attempt.
struct Allowed {
    claims: Arc<VerifiedToken>,
    mode: ProofMode,
    report: DecisionReport,
    /// The step-up approval the call spent.
    approval: Option<String>,
    /// The call's hold on its task's budget (none for a session message).
    budget: Option<BudgetHold>,
    /// The proof to spend with the decision (none in bearer mode).
    proof_spend: Option<store::ProofSpend>,
}

/// What the call path needs to know about a task beyond its token, loaded once per node.
#[derive(Debug)]
pub(crate) struct TaskState {
    /// Owner, intent, on-behalf-of user and ancestors, shared by the tasks that have the
    /// same ones.
    pub(crate) context: Arc<TaskContext>,
    pub(crate) expires_at: i64,
    /// This node's lease of the budget (`crate::budget`).
    pub(crate) lease: Lease,
    pub(crate) budget: u32,
    /// At most `MAX_CHAIN`.
    pub(crate) depth: u16,
    pub(crate) status: TaskStatus,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TaskContext {
    pub(crate) owner: Box<str>,
    pub(crate) intent: Box<str>,
    pub(crate) obo: Option<Box<str>>,
    /// The task's ancestors, nearest first (empty for a task that was not delegated).
    pub(crate) ancestors: Box<[TaskKey]>,
}

#[derive(Debug, Default)]
pub(crate) struct TaskCache {
    tasks: RwLock<HashMap<TaskKey, Arc<TaskState>>>,
    contexts: Interner<TaskContext>,
}

impl TaskCache {
    pub(crate) fn purge_expired(&self, now: i64) {
        self.tasks.write().retain(|_, task| task.expires_at > now);
        self.contexts.sweep();
    }

    pub(crate) fn len(&self) -> usize {
        self.tasks.read().len()
    }
}

#[derive(Debug, Default)]
pub(crate) struct TokenCache {
    tokens: RwLock<HashMap<[u8; 32], Arc<VerifiedToken>>>,
    agents: Interner<TokenAgent>,
    thumbprints: Interner<Thumbprint>,
    scopes: Interner<ScopeSet>,
}

impl TokenCache {
    fn get(&self, hash: &[u8; 32]) -> Option<Arc<VerifiedToken>> {
        self.tokens.read().get(hash).cloned()
    }

    /// What is kept of `claims`, or `None` for claims no token remit issues can carry (a
    /// task id or key thumbprint in another form), which are refused rather than cached.
    fn compact(&self, claims: &TaskClaims) -> Option<VerifiedToken> {
        let name = claims
            .sub
            .parse::<SpiffeId>()
            .ok()
            .map(|id| id.parts().1.as_str().into());
        let agent = TokenAgent {
            spiffe_id: claims.sub.as_str().into(),
            name,
            delegators: delegators_of(claims).into(),
        };
        Some(VerifiedToken {
            scope: self.scopes.intern(&claims.scope),
            agent: self.agents.intern(&agent),
            task: TaskKey::parse(&claims.task)?,
            jti: TokenJti::from(claims.jti.as_str()),
            jkt: self
                .thumbprints
                .intern(&Thumbprint::parse(&claims.cnf.jkt)?),
            iat: claims.iat,
            exp: claims.exp,
        })
    }

    /// Caches a verified token unless the cache is full. Expired entries are swept by the
    /// periodic sync, never here: a sweep of a full map under the write lock would stall
    /// every reader on the call path.
    fn insert(&self, hash: [u8; 32], token: Arc<VerifiedToken>) {
        let mut map = self.tokens.write();
        if map.len() < TOKEN_CACHE_CAPACITY {
            map.insert(hash, token);
        }
    }

    pub(crate) fn purge_expired(&self, now: i64) {
        self.tokens.write().retain(|_, token| token.exp > now);
        self.agents.sweep();
        self.thumbprints.sweep();
        self.scopes.sweep();
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    out
}

/// What the store keeps of a verified proof to refuse it on every replica once spent: its
/// `iat` and the SHA-256 of the key's thumbprint and its `jti` (the replay cache's key).
pub(crate) fn proof_spend(proof: &credentials::VerifiedProof) -> store::ProofSpend {
    store::ProofSpend {
        iat: proof.iat,
        digest: sha256(format!("{}.{}", proof.jkt, proof.jti).as_bytes()),
    }
}

/// A write that spent a proof, refused by the store because another write (on this node or
/// another replica) spent it first: `proof_replayed`, as the replay cache answers.
pub(crate) fn refuse_replayed(error: store::StoreError) -> Error {
    match error {
        store::StoreError::Conflict { what: "proof", .. } => Error::unauthorized(
            "proof_replayed",
            credentials::ProofError::Replayed.to_string(),
        ),
        other => other.into(),
    }
}

impl Authority {
    /// Decides one tool call and records the decision durably before returning. Anything
    /// but `Decision::Allow` means: do not forward.
    pub async fn authorize(&self, attempt: &CallAttempt<'_>) -> CallVerdict {
        let verdict = self.decide_timed(attempt, Check::Call).await;
        let verdict = self.record(attempt, verdict, Check::Call).await;
        self.contain(&verdict, false).await;
        verdict
    }

    /// Authenticates the caller of a protocol message that is not a tool call (MCP
    /// `initialize`, `ping`, `tools/list`, notifications, an SSE stream): token, proof (its
    /// `jti` consumed), rate limit, revocation and task state, but no scope, policy or
    /// budget, since the message acts on nothing. `attempt.action` names the message for
    /// the audit record. Recorded like [`Authority::authorize`]; an allow means only that
    /// the message may pass: every tool call in it still needs its own decision.
    pub async fn authorize_session(&self, attempt: &CallAttempt<'_>) -> CallVerdict {
        let verdict = self.decide_timed(attempt, Check::Session).await;
        let verdict = self.record(attempt, verdict, Check::Session).await;
        self.contain(&verdict, false).await;
        verdict
    }

    /// Appends the decision to the audit log; a write failure turns it into a denial. An
    /// allowed call spends its proof in the same write, so that a proof is forwarded once
    /// by the whole cluster: when another replica spent it first, the call is recorded and
    /// answered as `proof_replayed` instead.
    pub(crate) async fn record(
        &self,
        attempt: &CallAttempt<'_>,
        mut verdict: CallVerdict,
        check: Check,
    ) -> CallVerdict {
        let event = self.decision_event(attempt, &verdict, check);
        // Step 8: the decision is durable before anything is forwarded. If it cannot be
        // written, nothing is forwarded.
        let written = match verdict.proof_spend.take() {
            Some(spend) if verdict.is_allow() => {
                match self.store.append_spending(spend, event).await {
                    Err(store::StoreError::Conflict { what: "proof", .. }) => {
                        let replayed = credentials::ProofError::Replayed;
                        verdict.report = DecisionReport::deny(replayed.to_string());
                        verdict.code = replayed.code();
                        verdict.message = replayed.to_string();
                        verdict.approval = None;
                        let event = self.decision_event(attempt, &verdict, check);
                        self.store
                            .append_events(vec![event])
                            .await
                            .map(|mut events| events.pop().map(|event| event.seq))
                    }
                    written => written.map(|event| Some(event.seq)),
                }
            }
            _ => self
                .store
                .append_events(vec![event])
                .await
                .map(|events| events.first().map(|e| e.seq)),
        };
        // Either way the call's hold on the budget ends here: a count of the task's calls from
        // now on sees whether it was recorded.
        drop(verdict.budget.take());
        match written {
            Ok(seq) => verdict.audit_seq = seq,
            Err(error) => {
                tracing::warn!("audit write failed, denying the call: {error}");
                verdict.report =
                    DecisionReport::deny("the audit log cannot be written, so the call is refused");
                verdict.code = "store_unavailable";
                verdict.message =
                    "the store cannot be reached, so remit refuses (fails closed)".to_string();
                return verdict;
            }
        }
        verdict
    }

    /// The `call.decision` event recording `verdict`.
    fn decision_event(
        &self,
        attempt: &CallAttempt<'_>,
        verdict: &CallVerdict,
        check: Check,
    ) -> audit::EventBody {
        // Field by field, keys in byte order, so that no map is built on the call path.
        let mut detail = audit::Detail::object().str("action", attempt.action);
        if let Some(approval) = &verdict.approval {
            detail = detail.str("approval", approval);
        }
        // Marks a session check, so that an auditor does not read it as a tool call.
        if check == Check::Session {
            detail = detail.str("check", "session");
        }
        let detail = detail
            .str("class", attempt.class.as_str())
            .str("code", verdict.code)
            .opt_str("mode", verdict.mode.map(ProofMode::as_str))
            .strs("policies", &verdict.report.policies)
            .strs("reasons", &verdict.report.reasons)
            .str("resource", attempt.resource)
            .str("tool", attempt.tool)
            .finish();
        let mut event = audit::EventBody::new(
            self.clock.now_ms(),
            kinds::CALL_DECISION,
            verdict
                .agent
                .clone()
                .unwrap_or_else(|| "unauthenticated".to_string()),
        )
        .decision(verdict.report.decision.as_str())
        .detail(detail);
        if let Some(agent) = &verdict.agent {
            event = event.agent(agent.clone());
        }
        if let Some(task) = &verdict.task {
            event = event.task(task.clone());
        }
        event
    }

    /// Steps 1 to 7 alone: nothing is recorded, so nothing may be forwarded on this answer.
    /// It exists so that benchmarks can time the decision apart from the durable write;
    /// the gateway calls [`Authority::authorize`]. An allowed call does take from this node's
    /// lease of the budget, though the task's count in the log does not grow.
    #[doc(hidden)]
    pub async fn decide_unrecorded(&self, attempt: &CallAttempt<'_>) -> CallVerdict {
        let mut verdict = self.decide_timed(attempt, Check::Call).await;
        verdict.budget = None;
        verdict
    }

    pub(crate) async fn decide_timed(
        &self,
        attempt: &CallAttempt<'_>,
        check: Check,
    ) -> CallVerdict {
        let started = Instant::now();
        let now = self.now();
        let mut verdict = match self.decide(attempt, now, check).await {
            Ok(Allowed {
                claims,
                mode,
                report,
                approval,
                budget,
                proof_spend,
            }) => CallVerdict {
                code: "allowed",
                message: "allowed".to_string(),
                report,
                task: Some(claims.task()),
                agent: Some(claims.subject().to_string()),
                mode: Some(mode),
                audit_seq: None,
                decision_micros: 0,
                retry_after: None,
                approval,
                ended_at: None,
                claims: Some(claims),
                budget: budget.map(Arc::new),
                proof_spend,
            },
            Err((denial, claims)) => CallVerdict {
                report: denial
                    .report
                    .unwrap_or_else(|| DecisionReport::deny(denial.message.clone())),
                code: denial.code,
                message: denial.message,
                task: claims.as_ref().map(|c| c.task()),
                agent: claims.as_ref().map(|c| c.subject().to_string()),
                mode: None,
                audit_seq: None,
                decision_micros: 0,
                retry_after: denial.retry_after,
                approval: denial.approval,
                ended_at: denial.ended_at,
                claims,
                budget: None,
                proof_spend: None,
            },
        };
        verdict.decision_micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        verdict
    }

    /// Steps 1 to 7. Returns the claims whenever the token verified, for the audit record.
    async fn decide(
        &self,
        attempt: &CallAttempt<'_>,
        now: i64,
        check: Check,
    ) -> Result<Allowed, (Denial, Option<Arc<VerifiedToken>>)> {
        // 1. The token, verified once and then cached by its hash until it expires.
        if attempt.token.len() > MAX_TOKEN_BYTES {
            return Err((
                Denial::new("token_oversized", "the token is larger than remit accepts"),
                None,
            ));
        }
        let hash = sha256(attempt.token.as_bytes());
        let claims = match self.tokens.get(&hash) {
            Some(claims) => {
                let skew = self.settings.max_skew_seconds;
                if now > claims.exp.saturating_add(skew) {
                    return Err((
                        Denial::new("token_expired", "the token has expired"),
                        Some(claims),
                    ));
                }
                claims
            }
            None => {
                let claims = self
                    .keys
                    .verify_or_reload(self.store.as_ref(), attempt.token, now, self.clock.now_ms())
                    .await
                    .map_err(|e| (Denial::new(e.code(), e.to_string()), None))?;
                let compact = self.tokens.compact(&claims).ok_or_else(|| {
                    let denial = Denial::new(
                        "token_malformed",
                        "the token's task or key binding is not in the form remit issues",
                    );
                    (denial, None)
                })?;
                let claims = Arc::new(compact);
                self.tokens.insert(hash, Arc::clone(&claims));
                claims
            }
        };
        let fail = |denial: Denial| (denial, Some(Arc::clone(&claims)));

        // 2. The proof of possession, bound to the token's key and to this request.
        let mut spend = None;
        let mode = match attempt.proof {
            Some(proof) => {
                let expected_jkt = claims.jkt.encode();
                let check = ProofCheck {
                    method: attempt.method,
                    url: attempt.url,
                    access_token: Some(attempt.token),
                    expected_jkt: Some(&expected_jkt),
                    now,
                };
                let verified = self
                    .proofs
                    .verify(proof, &check)
                    .map_err(|e| fail(Denial::new(e.code(), e.to_string())))?;
                spend = Some(proof_spend(&verified));
                ProofMode::Dpop
            }
            None if attempt.bearer_allowed => ProofMode::Bearer,
            None => {
                return Err(fail(Denial::new(
                    "proof_missing",
                    "a `DPoP` proof signed by the token's key is required",
                )));
            }
        };

        // Admission: rate limits per agent and task, now that both are authenticated.
        let task_id = claims.task.text();
        let task_id = task_id.as_str();
        if let Some(limiter) = attempt.limiter
            && let Err(retry_after) = limiter.admit(claims.subject(), task_id, self.clock.now_ms())
        {
            let denial = Denial {
                retry_after: Some(retry_after),
                ..Denial::new(
                    "rate_limited",
                    format!("too many calls; retry in {retry_after} s"),
                )
            };
            return Err(fail(denial));
        }

        // 3 and 4. Revocation of the token, its task chain, its agent or owner; task state.
        let task = self
            .task_state(claims.task)
            .await
            .map_err(|e| fail(e.into()))?;
        let agent_name = claims.agent.name.as_deref().ok_or_else(|| {
            fail(Denial::new(
                "token_malformed",
                "the token's subject is not an agent SPIFFE ID",
            ))
        })?;
        let query = RevocationQuery {
            token_jti: &claims.jti,
            task: claims.task,
            ancestors: &task.context.ancestors,
            agent: agent_name,
            owner: &task.context.owner,
            issued_at: claims.iat,
        };
        if let Some(revoked) = self.revocations.check(&query) {
            let message = format!("revoked: {} `{}`", revoked.kind.as_str(), revoked.target);
            let denial = Denial {
                ended_at: Some(revoked.at),
                ..Denial::new("revoked", message)
            };
            return Err(fail(denial));
        }
        if task.status != TaskStatus::Active {
            return Err(fail(Denial::new(
                "task_not_active",
                format!("task `{task_id}` is {}", task.status),
            )));
        }
        if now >= task.expires_at {
            return Err(fail(Denial::new(
                "task_expired",
                format!("task `{task_id}` has expired"),
            )));
        }

        if check == Check::Session {
            let report = DecisionReport::allow(
                Vec::new(),
                vec!["the caller is authenticated; the message calls no tool".to_string()],
            );
            return Ok(Allowed {
                claims: Arc::clone(&claims),
                mode,
                report,
                approval: None,
                budget: None,
                proof_spend: spend,
            });
        }

        // 6. Scope: the call must lie inside the token's scopes.
        if !claims.scope.permits_call(
            attempt.tool,
            attempt.action,
            attempt.resource,
            attempt.class,
        ) {
            let message = format!(
                "`{}` on `{}` of tool `{}` is outside the task's scopes",
                attempt.action, attempt.resource, attempt.tool
            );
            return Err(fail(Denial::new("out_of_scope", message)));
        }

        // 7. Policy, with the task's context.
        let evaluate = |approved: bool| {
            self.policy.load().decide_call(&policy::CallRequest {
                agent: policy::AgentFacts {
                    name: agent_name,
                    spiffe_id: claims.subject(),
                    owner: &task.context.owner,
                },
                tool: attempt.tool,
                action: attempt.action,
                resource: attempt.resource,
                class: attempt.class,
                sensitivity: attempt.sensitivity,
                arguments: attempt.arguments,
                task: task_id,
                intent: &task.context.intent,
                obo: task.context.obo.as_deref(),
                depth: i64::from(task.depth),
                delegators: &claims.agent.delegators,
                approved,
                bearer: mode == ProofMode::Bearer,
                now,
            })
        };
        let mut report = evaluate(false);
        let mut approval = None;
        // Only `@step_up` policies refuse: a human's approval of this exact call may lift
        // them, once.
        if report.decision == Decision::ApprovalRequired {
            let call = crate::approvals::StepUpCall {
                attempt,
                claims: &claims,
                task: &task,
                now,
            };
            let (approved, id) = self.step_up(call, report, &evaluate).await.map_err(fail)?;
            report = approved;
            approval = Some(id);
        }
        // 4. The budget is taken only by a call that is otherwise allowed.
        if !report.is_allow() {
            let message = denial_sentence(&report);
            let denial = Denial {
                report: Some(report),
                ..Denial::new("policy_denied", message)
            };
            return Err(fail(denial));
        }
        let Some(budget) = self
            .take_budget(claims.task, &task)
            .await
            .map_err(|e| fail(e.into()))?
        else {
            return Err(fail(Denial::new(
                "budget_exhausted",
                format!(
                    "task `{task_id}` has used all {} calls of its budget",
                    task.budget
                ),
            )));
        };
        Ok(Allowed {
            claims: Arc::clone(&claims),
            mode,
            report,
            approval,
            budget: Some(budget),
            proof_spend: spend,
        })
    }

    /// The task's state on this node, loaded from the store on first sight.
    pub(crate) async fn task_state(&self, task: TaskKey) -> Result<Arc<TaskState>, Error> {
        if let Some(state) = self.tasks.tasks.read().get(&task) {
            return Ok(Arc::clone(state));
        }
        let id = task.task_id();
        let record = self
            .store
            .get_task(&id)
            .await?
            .ok_or_else(|| Error::unauthorized("task_unknown", format!("no task `{id}`")))?;
        let mut ancestors = Vec::new();
        let mut parent = record.parent.clone();
        while let Some(id) = parent {
            // The task itself is the first link of the chain.
            if ancestors.len() + 1 >= MAX_CHAIN {
                return Err(Error::forbidden(
                    "delegation_too_deep",
                    "the task's delegation chain is too long",
                ));
            }
            // Every id in the store was issued by remit, so each has a key; fail closed if not.
            let key = TaskKey::parse(id.as_str())
                .ok_or_else(|| Error::unauthorized("task_unknown", format!("no task `{id}`")))?;
            ancestors.push(key);
            parent = self.store.get_task(&id).await?.and_then(|t| t.parent);
        }
        let context = self.tasks.contexts.intern(&TaskContext {
            owner: record.owner.as_str().into(),
            intent: record.intent.into(),
            obo: record.obo.map(String::into_boxed_str),
            ancestors: ancestors.into_boxed_slice(),
        });
        let state = Arc::new(TaskState {
            context,
            expires_at: record.expires_at,
            lease: Lease::default(),
            budget: record.budget,
            depth: u16::try_from(record.depth).unwrap_or(u16::MAX),
            status: record.status,
        });
        let mut tasks = self.tasks.tasks.write();
        Ok(Arc::clone(tasks.entry(task).or_insert(state)))
    }

    /// How many tasks this node holds in memory (for the memory benchmark and metrics).
    pub fn cached_tasks(&self) -> usize {
        self.tasks.len()
    }

    /// How many revocations this node holds in memory.
    pub fn revocation_count(&self) -> usize {
        self.revocations.len()
    }
}

/// The key of the task named `task`, refused as the store would refuse it: a malformed id
/// as such, an id in a form remit never issues as an unknown task.
pub(crate) fn task_key(task: &str) -> Result<TaskKey, Error> {
    let id: model::TaskId = task.parse()?;
    TaskKey::parse(id.as_str())
        .ok_or_else(|| Error::unauthorized("task_unknown", format!("no task `{id}`")))
}

/// The delegating agents recorded in a token's `act` claim, nearest first.
fn delegators_of(claims: &TaskClaims) -> Vec<String> {
    let mut out = Vec::new();
    let mut actor = claims.act.as_ref();
    while let Some(current) = actor {
        out.push(current.sub.clone());
        actor = current.act.as_deref();
    }
    out
}

fn denial_sentence(report: &DecisionReport) -> String {
    if report.reasons.is_empty() {
        "policy denies this call".to_string()
    } else {
        format!("policy denies this call: {}", report.reasons.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The memory budget of a node (BENCHMARKS.md, "Memory") rests on these sizes: a field
    /// added to either should be a deliberate choice.
    #[test]
    fn cache_entries_stay_small() {
        assert_eq!(size_of::<VerifiedToken>(), 80);
        assert_eq!(size_of::<TaskState>(), 32);
    }
}
