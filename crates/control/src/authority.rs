//! The grant path and the admin operations: the one place that turns a validated request into
//! store writes, audit events and credentials. The HTTP API and the command line both call it,
//! so they cannot drift apart.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use audit::{ChainVerifier, EventBody, kinds};
use credentials::{AgentKey, Confirmation, ProofCheck, ProofVerifier, TaskClaims, TokenVerifier};
use model::{
    AgentName, AgentStatus, DecisionReport, Owner, Role, ScopeSet, Secret, SpiffeId, TaskId,
    TaskStatus,
};
use policy::PolicyEngine;
use serde::{Deserialize, Serialize};
use serde_json::json;
use store::{
    AgentRecord, AuditFilter, NewRevocation, OperatorRecord, Revocation, RevocationKind, Store,
    TaskRecord,
};

use crate::check::{TaskCache, TokenCache};
use crate::clock::Clock;
use crate::error::{Error, ErrorKind, Result};
use crate::keyring::KeyRing;
use crate::operators::{self, Operator};
use crate::random;
use crate::revocation::RevocationIndex;
use crate::settings::Settings;

const MAX_KEYS_PER_AGENT: usize = 8;
pub(crate) const MAX_INTENT_LEN: usize = 1024;
const MAX_REASON_LEN: usize = 1024;
/// An agent's disable or release reason: short enough that `agent disabled: <reason>` is
/// still a valid revocation reason.
pub(crate) const MAX_AGENT_REASON_LEN: usize = 1000;

/// The control plane: settings, store, policy, keys and the in-memory indexes of one node.
#[derive(Debug)]
pub struct Authority {
    pub(crate) settings: Settings,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) policy: ArcSwap<PolicyEngine>,
    pub(crate) keys: KeyRing,
    pub(crate) proofs: ProofVerifier,
    pub(crate) revocations: RevocationIndex,
    pub(crate) tokens: TokenCache,
    pub(crate) tasks: TaskCache,
    pub(crate) containment: crate::containment::Containment,
    /// The newest count of each task's calls this node took, not yet settled in the store.
    pub(crate) unsettled_calls:
        parking_lot::Mutex<std::collections::HashMap<crate::compact::TaskKey, store::TaskCalls>>,
    /// Events that need not be durable before anything proceeds (call outcomes), appended in
    /// batches a few milliseconds apart.
    deferred: Arc<parking_lot::Mutex<Vec<EventBody>>>,
    /// When (seconds) this node last swept the store's spent proofs.
    last_proof_sweep: std::sync::atomic::AtomicI64,
}

/// How often a node sweeps the spent proofs that no node accepts any more.
const PROOF_SWEEP_SECONDS: i64 = 10;

/// How long deferred events wait for company before they are appended together.
const DEFER_WINDOW: std::time::Duration = std::time::Duration::from_millis(5);

/// What an agent sends to `POST /v1/tasks`.
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskRequest {
    /// The requesting agent's name; the DPoP proof must be signed by one of its keys.
    #[schema(value_type = String, example = "triage-bot", pattern = r"^[a-z0-9][a-z0-9._-]{0,63}$", max_length = 64)]
    pub agent: AgentName,
    /// What the agent means to do, in a sentence (1 to 1024 bytes of printable text). Policy
    /// and the audit log see it.
    #[schema(min_length = 1, max_length = 1024)]
    pub intent: String,
    /// 1 to 32 scopes.
    #[schema(value_type = Vec<model::Scope>, min_items = 1, max_items = 32)]
    pub scopes: ScopeSet,
    /// Lifetime in seconds (default 300, at most `tasks.max_ttl_seconds`, 3600 by default).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub ttl_seconds: Option<i64>,
    /// How many tool calls the task may make (default 100, at most `tasks.max_budget`,
    /// 10,000 by default).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub budget: Option<u32>,
    /// The user the agent acts for, if any: an identity such as an email address.
    #[serde(default)]
    #[schema(
        pattern = r"^[^\s\x00-\x1f\x7f-\x9f]+$",
        min_length = 1,
        max_length = 256
    )]
    pub on_behalf_of: Option<String>,
    /// Limit every scope to `read` actions: a discovery task. Widening it later takes a new
    /// task request, which policy evaluates again.
    #[serde(default)]
    pub read_only: bool,
}

/// A granted task and its token.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Grant {
    #[schema(value_type = String)]
    pub task_id: TaskId,
    /// Compact JWS (ES256), a SPIFFE JWT-SVID bound to the proving key (`cnf.jkt`).
    #[schema(value_type = String)]
    #[serde(
        serialize_with = "crate::secret_serde::serialize",
        deserialize_with = "crate::secret_serde::deserialize"
    )]
    pub token: Secret<String>,
    /// Always `DPoP`: present it as `Authorization: DPoP <token>` with a fresh proof.
    pub token_type: String,
    pub expires_at: i64,
    pub expires_in: i64,
    #[schema(value_type = String)]
    pub spiffe_id: SpiffeId,
    pub scopes: ScopeSet,
    pub budget: u32,
}

/// What a task request asks for besides its scopes, as policy sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TaskAsk<'a> {
    pub(crate) intent: &'a str,
    pub(crate) ttl_seconds: i64,
    pub(crate) budget: u32,
    pub(crate) obo: Option<&'a str>,
    pub(crate) delegated: bool,
    pub(crate) depth: u32,
    pub(crate) now: i64,
}

/// The result of walking the audit chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VerifyReport {
    pub ok: bool,
    /// Events that verified before the first break (all of them when `ok`).
    pub checked: u64,
    /// Hash of the last verified event.
    pub head: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_bad_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The sequence number of the signed checkpoint the log was held against, if one was
    /// given (`GET /v1/audit/verify?checkpoint=…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_seq: Option<u64>,
}

impl Authority {
    /// Opens the store, loads policy and keys, and catches up with revocations.
    pub async fn open(settings: Settings, clock: Arc<dyn Clock>) -> Result<Arc<Authority>> {
        let options = store::OpenOptions {
            connect_timeout: settings.store_timeout,
            operation_timeout: settings.store_timeout,
            max_waiting: settings.store_max_waiting,
            create_if_missing: settings.store_create,
            sqlite_sync: settings.store_sync,
            ..Default::default()
        };
        let store = store::open_with(settings.store_url.expose(), &options).await?;
        let policy = match &settings.policy_dir {
            Some(dir) => load_policies(dir)?,
            None => crate::examples::engine()?,
        };
        Self::with_parts(settings, store, policy, clock).await
    }

    pub async fn with_parts(
        settings: Settings,
        store: Arc<dyn Store>,
        policy: PolicyEngine,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Authority>> {
        let now = clock.now();
        let verifier = TokenVerifier::new(
            settings.issuer(),
            settings.audience(),
            settings.max_skew_seconds,
        );
        let keys = KeyRing::load_or_create(store.as_ref(), verifier, now).await?;
        let proofs = ProofVerifier::new(
            settings.proofs.max_age_seconds,
            settings.proofs.max_future_seconds,
            settings.proofs.replay_capacity,
        );
        let authority = Authority {
            settings,
            store,
            clock,
            policy: ArcSwap::from_pointee(policy),
            keys,
            proofs,
            revocations: RevocationIndex::default(),
            tokens: TokenCache::default(),
            tasks: TaskCache::default(),
            containment: Default::default(),
            unsettled_calls: Default::default(),
            deferred: Default::default(),
            last_proof_sweep: Default::default(),
        };
        authority
            .revocations
            .catch_up(authority.store.as_ref())
            .await?;
        Ok(Arc::new(authority))
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    /// The node's clock in milliseconds, for what the edges record.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    pub fn keys(&self) -> &KeyRing {
        &self.keys
    }

    pub fn policy(&self) -> Arc<PolicyEngine> {
        self.policy.load_full()
    }

    /// Replaces the policy set atomically; requests in flight finish on the old one.
    pub fn swap_policy(&self, engine: PolicyEngine) {
        self.policy.store(Arc::new(engine));
    }

    /// One round of catching up with what other processes wrote: revocations, keys, and
    /// forgetting expired cache entries; and of telling them: call counts to settle, denials
    /// to add to containment's count. Called periodically by `serve`. It first pings the
    /// store, which on SQLite notices a store file removed or replaced since it was opened:
    /// from then on every operation, the call path's included, fails closed.
    pub async fn sync(&self) -> Result<()> {
        self.store.ping().await?;
        let now = self.now();
        self.revocations.catch_up(self.store.as_ref()).await?;
        self.keys.reload(self.store.as_ref(), now).await?;
        self.tokens.purge_expired(now);
        self.tasks.purge_expired(now);
        self.flush_call_counts().await;
        self.share_denials().await;
        self.sweep_spent_proofs(now).await;
        Ok(())
    }

    /// Every [`PROOF_SWEEP_SECONDS`], forgets the spent proofs that no node accepts any more:
    /// issued longer ago than a proof's lifetime plus the clock skew allowed between nodes.
    async fn sweep_spent_proofs(&self, now: i64) {
        let last = self
            .last_proof_sweep
            .load(std::sync::atomic::Ordering::Acquire);
        if now.saturating_sub(last) < PROOF_SWEEP_SECONDS {
            return;
        }
        self.last_proof_sweep
            .store(now, std::sync::atomic::Ordering::Release);
        let proofs = &self.settings.proofs;
        let before = now
            .saturating_sub(proofs.max_age_seconds)
            .saturating_sub(proofs.max_future_seconds)
            .saturating_sub(self.settings.max_skew_seconds);
        if let Err(error) = self.store.sweep_proof_spends(before).await {
            tracing::warn!("could not forget the spent proofs: {error}");
        }
    }

    /// Runs [`Authority::sync`] every `sync_interval` until the process ends, and catches up
    /// with revocations and signing keys at once whenever the store signals a change
    /// (PostgreSQL `LISTEN/NOTIFY`), so that a revocation taken, or a key rotated, on another
    /// replica bites here within milliseconds rather than at the next tick.
    pub fn spawn_sync(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let authority = Arc::clone(self);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(authority.settings.sync_interval);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let signal = authority.store.revocation_signal();
            loop {
                let signalled = match &signal {
                    Some(signal) => tokio::select! {
                        _ = interval.tick() => false,
                        _ = signal.notified() => true,
                    },
                    None => {
                        interval.tick().await;
                        false
                    }
                };
                let caught_up = if signalled {
                    let store = authority.store.as_ref();
                    match authority.revocations.catch_up(store).await {
                        Ok(_) => authority.keys.reload(store, authority.now()).await,
                        Err(error) => Err(error),
                    }
                } else {
                    authority.sync().await
                };
                if let Err(error) = caught_up {
                    tracing::warn!(code = error.code, "catch-up with the store failed: {error}");
                }
            }
        })
    }

    /// Appends `event` soon, batched with others: for records that follow an action already
    /// decided and recorded durably (a call's outcome), so that they cost the writer one
    /// append per batch instead of one per call.
    pub fn record_later(&self, event: EventBody) {
        let first = {
            let mut deferred = self.deferred.lock();
            deferred.push(event);
            deferred.len() == 1
        };
        // The first event of a batch schedules its append; later ones ride along.
        if first && let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let deferred = Arc::clone(&self.deferred);
            let store = Arc::clone(&self.store);
            runtime.spawn(async move {
                tokio::time::sleep(DEFER_WINDOW).await;
                let batch = std::mem::take(&mut *deferred.lock());
                if !batch.is_empty()
                    && let Err(error) = store.append_events(batch).await
                {
                    tracing::warn!("could not record deferred events: {error}");
                }
            });
        }
    }

    /// Appends whatever is deferred now (at shutdown).
    pub async fn flush_deferred(&self) {
        let batch = std::mem::take(&mut *self.deferred.lock());
        if !batch.is_empty()
            && let Err(error) = self.store.append_events(batch).await
        {
            tracing::warn!("could not record deferred events: {error}");
        }
    }

    pub(crate) fn event(&self, kind: &str, actor: impl Into<String>) -> EventBody {
        EventBody::new(self.clock.now_ms(), kind, actor)
    }

    // Operators.

    /// Creates an operator and returns its token, which is shown once and stored hashed.
    pub async fn create_operator(
        &self,
        actor: &Operator,
        name: &str,
        role: Role,
    ) -> Result<(OperatorRecord, Secret<String>)> {
        actor.require(&[])?;
        if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
            return Err(Error::bad_request(
                "invalid_name",
                format!("invalid operator name `{name}`: 1 to 128 printable characters"),
            ));
        }
        let token = Secret::new(random::hex_id::<32>(operators::TOKEN_PREFIX)?);
        let record = OperatorRecord {
            id: random::hex_id::<6>("op_")?,
            name: name.to_string(),
            role,
            token_hash: operators::token_hash(token.expose()),
            created_at: self.now(),
            disabled: false,
        };
        let event = self
            .event(kinds::OPERATOR_CREATED, actor.actor())
            .detail(json!({ "id": record.id, "name": record.name, "role": role }));
        self.store.insert_operator(&record, event).await?;
        Ok((record, token))
    }

    /// Finds the operator a bearer token belongs to. The lookup is by SHA-256 of a 256-bit
    /// random token, so its timing tells an attacker nothing about valid tokens.
    pub async fn authenticate_operator(&self, token: &str) -> Result<Operator> {
        operators::check_token_shape(token)?;
        let found = self
            .store
            .operator_by_token_hash(&operators::token_hash(token))
            .await?;
        match found {
            Some(record) if !record.disabled => Ok(Operator {
                id: record.id,
                name: record.name,
                role: record.role,
            }),
            _ => Err(Error::unauthorized(
                "operator_token_invalid",
                "the operator token is not valid",
            )),
        }
    }

    // Agents.

    pub async fn register_agent(
        &self,
        actor: &Operator,
        name: &str,
        owner: &str,
        keys: &[serde_json::Value],
    ) -> Result<AgentRecord> {
        actor.require(&[])?;
        let name: AgentName = name.parse()?;
        let owner: Owner = owner.parse()?;
        if keys.is_empty() || keys.len() > MAX_KEYS_PER_AGENT {
            return Err(Error::bad_request(
                "invalid_key",
                format!(
                    "an agent needs 1 to {MAX_KEYS_PER_AGENT} public keys (P-256 or Ed25519 JWKs)"
                ),
            ));
        }
        let keys = keys
            .iter()
            .map(AgentKey::from_jwk)
            .collect::<Result<Vec<_>, _>>()?;
        let record = AgentRecord {
            spiffe_id: SpiffeId::for_agent(&self.settings.trust_domain, &name),
            name,
            owner,
            status: AgentStatus::Active,
            keys: keys.iter().map(AgentKey::to_jwk).collect(),
            created_at: self.now(),
        };
        let thumbprints: Vec<_> = keys.iter().map(|k| k.thumbprint().to_string()).collect();
        let event = self
            .event(kinds::AGENT_REGISTERED, actor.actor())
            .agent(record.spiffe_id.as_str())
            .detail(json!({ "name": record.name, "owner": record.owner, "keys": thumbprints }));
        self.store.insert_agent(&record, event).await?;
        Ok(record)
    }

    pub async fn list_agents(&self, actor: &Operator) -> Result<Vec<AgentRecord>> {
        actor.require(&[Role::Auditor, Role::Approver])?;
        Ok(self.store.list_agents().await?)
    }

    pub async fn get_agent(&self, actor: &Operator, name: &str) -> Result<AgentRecord> {
        actor.require(&[Role::Auditor, Role::Approver])?;
        let name: AgentName = name.parse()?;
        self.store
            .get_agent(&name)
            .await?
            .ok_or_else(|| Error::not_found("agent_not_found", format!("no agent named `{name}`")))
    }

    /// Disables an agent: no new tasks, and every credential it holds dies on its next use.
    pub async fn disable_agent(
        &self,
        actor: &Operator,
        name: &str,
        reason: &str,
    ) -> Result<AgentRecord> {
        actor.require(&[])?;
        // Checked before anything is written: the revocation below must not fail on it after
        // the agent is already disabled.
        validate_text("reason", reason, MAX_AGENT_REASON_LEN)?;
        let mut agent = self.get_agent(actor, name).await?;
        let event = self
            .event(kinds::AGENT_DISABLED, actor.actor())
            .agent(agent.spiffe_id.as_str())
            .detail(json!({ "reason": reason }));
        self.store
            .set_agent_status(&agent.name, AgentStatus::Disabled, event)
            .await?;
        self.revoke(
            actor,
            RevocationKind::Agent,
            agent.name.as_str(),
            &format!("agent disabled: {reason}"),
        )
        .await?;
        agent.status = AgentStatus::Disabled;
        Ok(agent)
    }

    // Tasks.

    /// The grant path: authenticate the agent by its proof, ask policy, record, sign.
    pub async fn request_task(
        &self,
        proof: Option<&str>,
        mut request: TaskRequest,
    ) -> Result<Grant> {
        let now = self.now();
        if request.read_only {
            request.scopes = ScopeSet(
                request
                    .scopes
                    .0
                    .into_iter()
                    .map(model::Scope::read_only)
                    .collect(),
            );
        }
        let limits = self.settings.tasks;
        let ttl = request.ttl_seconds.unwrap_or(limits.default_ttl_seconds);
        let budget = request.budget.unwrap_or(limits.default_budget);
        validate_text("intent", &request.intent, MAX_INTENT_LEN)?;
        request.scopes.validate()?;
        if !(1..=limits.max_ttl_seconds).contains(&ttl) {
            return Err(Error::bad_request(
                "invalid_ttl",
                format!(
                    "`ttl_seconds` must be between 1 and {} (the configured maximum), not {ttl}",
                    limits.max_ttl_seconds
                ),
            ));
        }
        if !(1..=limits.max_budget).contains(&budget) {
            return Err(Error::bad_request(
                "invalid_budget",
                format!(
                    "`budget` must be between 1 and {}, not {budget}",
                    limits.max_budget
                ),
            ));
        }
        let obo = match &request.on_behalf_of {
            Some(user) => Some(user.parse::<Owner>().map_err(|_| {
                Error::bad_request(
                    "invalid_obo",
                    format!(
                        "invalid `on_behalf_of` `{user}`: a user identity such as an email address"
                    ),
                )
            })?),
            None => None,
        };

        let (agent, verified) = self
            .authenticate_agent(&request.agent, proof, "/v1/tasks", now)
            .await?;

        let ask = TaskAsk {
            intent: &request.intent,
            ttl_seconds: ttl,
            budget,
            obo: obo.as_ref().map(Owner::as_str),
            delegated: false,
            depth: 0,
            now,
        };
        let report = self.decide_scopes(&agent, &request.scopes, &ask);
        if !report.is_allow() {
            let event = self
                .event(kinds::TASK_REFUSED, agent.spiffe_id.as_str())
                .agent(agent.spiffe_id.as_str())
                .decision(report.decision.as_str())
                .detail(json!({
                    "intent": request.intent,
                    "scopes": request.scopes,
                    "ttl_seconds": ttl,
                    "budget": budget,
                    "policies": report.policies,
                    "reasons": report.reasons,
                }));
            self.store.append_events(vec![event]).await?;
            return Err(refusal(&report));
        }

        let task_id = TaskId::from_random(random::bytes::<16>()?);
        let jti = random::hex_id::<16>("")?;
        let expires_at = now + ttl;
        let record = TaskRecord {
            id: task_id.clone(),
            agent: agent.name.clone(),
            owner: agent.owner.clone(),
            intent: request.intent.clone(),
            scopes: request.scopes.clone(),
            obo: obo.as_ref().map(|o| o.to_string()),
            parent: None,
            depth: 0,
            status: TaskStatus::Active,
            created_at: now,
            expires_at,
            budget,
            calls_used: 0,
            token_jti: jti.clone(),
            jkt: verified.jkt.clone(),
        };
        let claims = TaskClaims {
            iss: self.settings.issuer().to_string(),
            sub: agent.spiffe_id.to_string(),
            aud: self.settings.audience().to_string(),
            iat: now,
            nbf: now,
            exp: expires_at,
            jti,
            task: task_id.to_string(),
            scope: request.scopes.clone(),
            cnf: Confirmation {
                jkt: verified.jkt.clone(),
            },
            act: None,
            obo: record.obo.clone(),
        };
        let token = self.keys.sign(&claims)?;
        let event = self
            .event(kinds::TASK_GRANTED, agent.spiffe_id.as_str())
            .agent(agent.spiffe_id.as_str())
            .task(task_id.as_str())
            .decision("allow")
            .detail(json!({
                "intent": record.intent,
                "scopes": record.scopes,
                "expires_at": expires_at,
                "budget": budget,
                "obo": record.obo,
                "jkt": record.jkt,
                "jti": claims.jti,
                "kid": self.keys.current_kid(),
                "policies": report.policies,
            }));
        // The proof is spent with the grant, so that no other replica grants on it again.
        self.store
            .insert_task_spending(&record, event, crate::check::proof_spend(&verified))
            .await
            .map_err(crate::check::refuse_replayed)?;
        Ok(Grant {
            task_id,
            token,
            token_type: "DPoP".to_string(),
            expires_at,
            expires_in: ttl,
            spiffe_id: agent.spiffe_id,
            scopes: request.scopes,
            budget,
        })
    }

    /// Authenticates an agent by a DPoP proof (no access token) for `path`, signed by one of
    /// its registered keys, and requires it to be active.
    pub(crate) async fn authenticate_agent(
        &self,
        name: &AgentName,
        proof: Option<&str>,
        path: &str,
        now: i64,
    ) -> Result<(AgentRecord, credentials::VerifiedProof)> {
        let agent = self.store.get_agent(name).await?.ok_or_else(|| {
            Error::unauthorized(
                "agent_unknown",
                format!("no agent named `{name}` is registered"),
            )
        })?;
        let proof = proof.ok_or_else(|| {
            Error::unauthorized(
                "proof_missing",
                "this request needs a `DPoP` proof header signed by the agent's registered key",
            )
        })?;
        let htu = self.settings.url_of(path);
        let check = ProofCheck {
            method: "POST",
            url: &htu,
            access_token: None,
            expected_jkt: None,
            now,
        };
        let verified = self
            .proofs
            .verify(proof, &check)
            .map_err(|e| Error::unauthorized(e.code(), e.to_string()))?;
        let registered = agent
            .keys
            .iter()
            .filter_map(|jwk| AgentKey::from_jwk(jwk).ok())
            .any(|key| constant_time_eq(key.thumbprint(), &verified.jkt));
        if !registered {
            return Err(Error::unauthorized(
                "proof_key_unknown",
                format!(
                    "the proof is not signed by a key registered for agent `{}`",
                    agent.name
                ),
            ));
        }
        if agent.status != AgentStatus::Active {
            return Err(Error::forbidden(
                "agent_not_active",
                format!("agent `{}` is {}", agent.name, agent.status),
            ));
        }
        Ok((agent, verified))
    }

    /// Asks policy the `RequestTask` question once per scope; the first refusal answers.
    pub(crate) fn decide_scopes(
        &self,
        agent: &AgentRecord,
        scopes: &ScopeSet,
        ask: &TaskAsk<'_>,
    ) -> DecisionReport {
        let engine = self.policy.load();
        let facts = policy::AgentFacts {
            name: agent.name.as_str(),
            spiffe_id: agent.spiffe_id.as_str(),
            owner: agent.owner.as_str(),
        };
        let mut allowed = DecisionReport::allow(Vec::new(), Vec::new());
        for scope in &scopes.0 {
            let report = engine.decide_task(&policy::TaskRequest {
                agent: facts,
                tool: &scope.tool,
                actions: &scope.actions,
                resources: &scope.resources,
                intent: ask.intent,
                ttl_seconds: ask.ttl_seconds,
                budget: i64::from(ask.budget),
                obo: ask.obo,
                delegated: ask.delegated,
                read_only: scopes.is_read_only(),
                depth: i64::from(ask.depth),
                now: ask.now,
            });
            if !report.is_allow() {
                return report;
            }
            allowed.policies.extend(report.policies);
            allowed.reasons.extend(report.reasons);
        }
        allowed.policies.sort();
        allowed.policies.dedup();
        allowed
    }

    pub async fn get_task(&self, actor: &Operator, id: &str) -> Result<TaskRecord> {
        actor.require(&[Role::Auditor, Role::Approver])?;
        let id: TaskId = id.parse()?;
        let mut task = self
            .store
            .get_task(&id)
            .await?
            .ok_or_else(|| Error::not_found("task_not_found", format!("no task `{id}`")))?;
        // Every node's calls, as the audit log counts them, rather than the last settled count.
        task.calls_used = self.store.count_task_calls(&id).await?.used;
        Ok(task)
    }

    /// Ends a task at its agent's request. The caller proves possession of the task token.
    pub async fn complete_task(
        &self,
        id: &str,
        token: &str,
        proof: Option<&str>,
    ) -> Result<TaskRecord> {
        let now = self.now();
        let id: TaskId = id.parse()?;
        let claims = self
            .keys
            .verify_or_reload(self.store.as_ref(), token, now, self.clock.now_ms())
            .await
            .map_err(|e| Error::unauthorized(e.code(), e.to_string()))?;
        let proof = proof.ok_or_else(|| {
            Error::unauthorized("proof_missing", "completing a task needs a `DPoP` proof")
        })?;
        let htu = self.settings.url_of(&format!("/v1/tasks/{id}/complete"));
        let check = ProofCheck {
            method: "POST",
            url: &htu,
            access_token: Some(token),
            expected_jkt: Some(&claims.cnf.jkt),
            now,
        };
        let verified = self
            .proofs
            .verify(proof, &check)
            .map_err(|e| Error::unauthorized(e.code(), e.to_string()))?;
        if claims.task != id.as_str() {
            return Err(Error::forbidden(
                "task_mismatch",
                format!("the token is for task `{}`, not `{id}`", claims.task),
            ));
        }
        let event = self
            .event(kinds::TASK_COMPLETED, claims.sub.as_str())
            .agent(claims.sub.as_str())
            .task(id.as_str());
        let spend = crate::check::proof_spend(&verified);
        let finished = self
            .store
            .finish_task_spending(&id, TaskStatus::Completed, event, spend)
            .await
            .map_err(crate::check::refuse_replayed)?;
        if finished.is_none() {
            let task = self.store.get_task(&id).await?;
            let status = task.map_or(TaskStatus::Expired, |t| t.status);
            return Err(Error::new(
                ErrorKind::Conflict,
                "task_not_active",
                format!("task `{id}` is already {status}"),
            ));
        }
        // The feed carries the end of the task to every node; this node applies it now.
        let revocation = NewRevocation {
            kind: RevocationKind::Task,
            target: id.to_string(),
            reason: "task completed".to_string(),
            created_at: now,
        };
        let event = self
            .event(kinds::REVOCATION, claims.sub.as_str())
            .agent(claims.sub.as_str())
            .task(id.as_str())
            .detail(json!({
                "kind": "task", "target": id, "reason": "task completed",
            }));
        let (revocation, _) = self.store.insert_revocation(&revocation, event).await?;
        self.revocations.apply(&revocation);
        self.store
            .get_task(&id)
            .await?
            .ok_or_else(|| Error::not_found("task_not_found", format!("no task `{id}`")))
    }

    // Revocation.

    /// Revokes a token (by `jti`), a task (and its descendants), an agent or an owner. Applied
    /// to this node before returning, so the very next call is denied.
    pub async fn revoke(
        &self,
        actor: &Operator,
        kind: RevocationKind,
        target: &str,
        reason: &str,
    ) -> Result<Revocation> {
        actor.require(&[])?;
        validate_text("reason", reason, MAX_REASON_LEN)?;
        let now = self.now();
        let mut event = self.event(kinds::REVOCATION, actor.actor());
        match kind {
            RevocationKind::Token => validate_text("token id", target, 128)?,
            RevocationKind::Task => {
                let id: TaskId = target.parse()?;
                let task =
                    self.store.get_task(&id).await?.ok_or_else(|| {
                        Error::not_found("task_not_found", format!("no task `{id}`"))
                    })?;
                event = event
                    .task(id.as_str())
                    .agent(SpiffeId::for_agent(&self.settings.trust_domain, &task.agent).as_str());
            }
            RevocationKind::Agent => {
                let name: AgentName = target.parse()?;
                let agent = self.store.get_agent(&name).await?.ok_or_else(|| {
                    Error::not_found("agent_not_found", format!("no agent named `{name}`"))
                })?;
                event = event.agent(agent.spiffe_id.as_str());
            }
            RevocationKind::Owner => {
                target.parse::<Owner>()?;
            }
        }
        let revocation = NewRevocation {
            kind,
            target: target.to_string(),
            reason: reason.to_string(),
            created_at: now,
        };
        let event = event.detail(json!({ "kind": kind, "target": target, "reason": reason }));
        let (revocation, _) = self.store.insert_revocation(&revocation, event).await?;
        self.revocations.apply(&revocation);
        if kind == RevocationKind::Task {
            let id: TaskId = target.parse()?;
            let event = self
                .event(kinds::TASK_REVOKED, actor.actor())
                .task(id.as_str())
                .detail(json!({ "reason": reason }));
            self.store
                .finish_task(&id, TaskStatus::Revoked, event)
                .await?;
        }
        Ok(revocation)
    }

    // Keys.

    pub async fn rotate_keys(&self, actor: &Operator) -> Result<String> {
        actor.require(&[])?;
        let publish_for = self.settings.tasks.max_ttl_seconds + self.settings.max_skew_seconds;
        self.keys
            .rotate(self.store.as_ref(), &actor.actor(), self.now(), publish_for)
            .await
    }

    // Audit.

    pub async fn audit_events(
        &self,
        actor: &Operator,
        filter: &AuditFilter,
    ) -> Result<Vec<audit::Event>> {
        actor.require(&[Role::Auditor])?;
        Ok(self.store.query_events(filter).await?)
    }

    /// Walks the whole chain from the first event and reports the first break. The store
    /// streams its rows and hashes them as stored (`Store::verify_chain`), which is several
    /// times faster than reading events and re-encoding each `detail`.
    pub async fn verify_audit(&self, actor: &Operator) -> Result<VerifyReport> {
        actor.require(&[Role::Auditor])?;
        let mut verifier = ChainVerifier::default();
        let broken = self.store.verify_chain(&mut verifier).await?.err();
        Ok(VerifyReport {
            ok: broken.is_none(),
            checked: verifier.checked(),
            head: audit::to_hex(&verifier.head()),
            first_bad_seq: broken.as_ref().map(|broken| broken.seq),
            reason: broken.map(|broken| broken.reason.to_string()),
            checkpoint_seq: None,
        })
    }
}

/// Loads and validates the Cedar schema and policies in `dir`.
pub fn load_policies(dir: &Path) -> Result<PolicyEngine> {
    PolicyEngine::load_dir(dir).map_err(|e| Error::bad_request("invalid_policy", e.to_string()))
}

pub(crate) fn validate_text(what: &str, text: &str, max: usize) -> Result<()> {
    if text.trim().is_empty()
        || text.len() > max
        || text.chars().any(|c| c.is_control() && c != '\n')
    {
        return Err(Error::bad_request(
            "invalid_text",
            format!("`{what}` must be 1 to {max} bytes of printable text"),
        ));
    }
    Ok(())
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// A 403 naming the policies that refused and why.
pub(crate) fn refusal(report: &DecisionReport) -> Error {
    let why = if report.reasons.is_empty() {
        "no policy permits it".to_string()
    } else {
        report.reasons.join("; ")
    };
    Error::forbidden("task_refused", format!("policy refused the task: {why}")).with_detail(json!({
        "decision": report.decision,
        "policies": report.policies,
        "reasons": report.reasons,
    }))
}
