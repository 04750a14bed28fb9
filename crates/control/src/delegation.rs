//! Delegation by RFC 8693 token exchange: an agent hands part of its task to another agent.
//! The subject token is the delegating agent's task token; the receiving agent proves its own
//! key with a DPoP proof. The child task only ever narrows: its scopes lie inside the
//! parent's, it ends no later, it spends no more than the parent has left, and the chain is no
//! deeper than configured. Revoking or completing any ancestor stops it on its next call,
//! because the call path checks every task in the chain.

use audit::kinds;
use credentials::{Actor, Confirmation, TaskClaims};
use model::{AgentName, Scope, ScopeSet, TaskId, TaskStatus};
use serde::{Deserialize, Serialize};
use serde_json::json;
use store::TaskRecord;

use crate::authority::{Authority, TaskAsk, refusal};
use crate::check::task_key;
use crate::compact::TokenJti;
use crate::error::{Error, Result};
use crate::random;
use crate::revocation::RevocationQuery;

pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";

/// The form of `POST /v1/token` (RFC 8693 §2.1, with remit's extensions).
#[derive(Clone, Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct TokenExchange {
    /// `urn:ietf:params:oauth:grant-type:token-exchange`.
    pub grant_type: String,
    /// The delegating agent's task token.
    pub subject_token: String,
    /// `urn:ietf:params:oauth:token-type:access_token` (or `…:jwt`).
    pub subject_token_type: String,
    /// The receiving agent's name (remit extension); its key signs the DPoP proof.
    #[schema(
        pattern = r"^[a-z0-9][a-z0-9._-]{0,63}$",
        min_length = 1,
        max_length = 64
    )]
    pub agent: String,
    /// Space-separated `tool:action` or `tool:action@resource-pattern`; default: the parent's.
    #[serde(default)]
    pub scope: Option<String>,
    /// Lifetime in seconds (remit extension); default: whatever the parent has left.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub ttl_seconds: Option<i64>,
    /// Calls the child may make (remit extension); default: what the parent has left.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub budget: Option<u32>,
    /// What the receiving agent is to do (remit extension; 1 to 1024 bytes of printable
    /// text); default: the parent's intent.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 1024)]
    pub intent: Option<String>,
}

/// The answer (RFC 8693 §2.2.1).
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Exchanged {
    #[schema(value_type = String)]
    #[serde(
        serialize_with = "crate::secret_serde::serialize",
        deserialize_with = "crate::secret_serde::deserialize"
    )]
    pub access_token: model::Secret<String>,
    pub issued_token_type: String,
    /// `DPoP`: the token is bound to the receiving agent's key.
    pub token_type: String,
    pub expires_in: i64,
    pub scope: String,
    pub task_id: String,
    pub depth: u32,
}

fn invalid(code: &'static str, message: impl Into<String>) -> Error {
    Error::bad_request(code, message)
}

/// Parses RFC 8693 `scope`: `tool:action` or `tool:action@resource-pattern`, space-separated.
pub fn parse_scope(text: &str) -> Result<ScopeSet> {
    let mut scopes: Vec<Scope> = Vec::new();
    for item in text.split_whitespace() {
        let (tool_action, resource) = match item.split_once('@') {
            Some((tool_action, resource)) => (tool_action, Some(resource)),
            None => (item, None),
        };
        let (tool, action) = tool_action.split_once(':').ok_or_else(|| {
            invalid(
                "invalid_scope",
                format!("scope item `{item}` is not `tool:action` or `tool:action@resource`"),
            )
        })?;
        let scope = Scope {
            tool: tool.to_string(),
            actions: vec![action.to_string()],
            resources: resource.map(|r| vec![r.to_string()]).unwrap_or_default(),
            classes: Vec::new(),
        };
        match scopes
            .iter_mut()
            .find(|s| s.tool == scope.tool && s.resources == scope.resources)
        {
            Some(existing) => existing.actions.extend(scope.actions),
            None => scopes.push(scope),
        }
    }
    let scopes = ScopeSet(scopes);
    scopes.validate()?;
    Ok(scopes)
}

/// The RFC 8693 `scope` string of a scope set (one item per action and resource pattern).
pub fn format_scope(scopes: &ScopeSet) -> String {
    let mut items = Vec::new();
    for scope in &scopes.0 {
        for action in &scope.actions {
            if scope.resources.is_empty() {
                items.push(format!("{}:{action}", scope.tool));
            }
            for resource in &scope.resources {
                items.push(format!("{}:{action}@{resource}", scope.tool));
            }
        }
    }
    items.join(" ")
}

impl Authority {
    /// RFC 8693 token exchange: a child task for `request.agent`, inside the subject token's.
    pub async fn exchange_token(
        &self,
        proof: Option<&str>,
        request: TokenExchange,
    ) -> Result<Exchanged> {
        let now = self.now();
        if request.grant_type != GRANT_TYPE {
            return Err(invalid(
                "unsupported_grant_type",
                format!("`grant_type` must be `{GRANT_TYPE}`"),
            ));
        }
        if request.subject_token_type != ACCESS_TOKEN_TYPE
            && request.subject_token_type != JWT_TOKEN_TYPE
        {
            return Err(invalid(
                "invalid_request",
                format!("`subject_token_type` must be `{ACCESS_TOKEN_TYPE}`"),
            ));
        }

        // The parent: a valid, unrevoked, active task.
        let parent = self
            .keys
            .verify_or_reload(
                self.store.as_ref(),
                &request.subject_token,
                now,
                self.clock.now_ms(),
            )
            .await
            .map_err(|e| {
                Error::bad_request(
                    "invalid_grant",
                    format!("the subject token is not valid: {e}"),
                )
            })?;
        let parent_key = task_key(&parent.task)?;
        let parent_state = self.task_state(parent_key).await?;
        let (_, parent_agent) = parent
            .sub
            .parse::<model::SpiffeId>()
            .map_err(|_| {
                invalid(
                    "invalid_grant",
                    "the subject token's subject is not an agent",
                )
            })?
            .parts();
        let query = RevocationQuery {
            token_jti: &TokenJti::from(parent.jti.as_str()),
            task: parent_key,
            ancestors: &parent_state.context.ancestors,
            agent: parent_agent.as_str(),
            owner: &parent_state.context.owner,
            issued_at: parent.iat,
        };
        if let Some(revoked) = self.revocations.check(&query) {
            return Err(invalid(
                "invalid_grant",
                format!(
                    "the subject token is revoked: {} `{}`",
                    revoked.kind.as_str(),
                    revoked.target
                ),
            ));
        }
        if parent_state.status != TaskStatus::Active || now >= parent_state.expires_at {
            return Err(invalid(
                "invalid_grant",
                format!("task `{}` is no longer active", parent.task),
            ));
        }

        // The receiving agent, by its proof.
        let agent_name: AgentName = request.agent.parse()?;
        let (agent, verified) = self
            .authenticate_agent(&agent_name, proof, "/v1/token", now)
            .await?;

        // Only narrower: scopes, lifetime, budget, depth.
        let scopes = match &request.scope {
            // RFC 8693 scope strings cannot name classes: a read-only parent's child is
            // read-only too.
            Some(text) if parent.scope.is_read_only() => ScopeSet(
                parse_scope(text)?
                    .0
                    .into_iter()
                    .map(Scope::read_only)
                    .collect(),
            ),
            Some(text) => parse_scope(text)?,
            None => parent.scope.clone(),
        };
        let widening = scopes.outside(&parent.scope);
        if !widening.is_empty() {
            let names: Vec<_> = widening
                .iter()
                .map(|s| format!("`{}`", format_scope(&ScopeSet(vec![(*s).clone()]))))
                .collect();
            return Err(invalid(
                "invalid_scope",
                format!(
                    "delegation cannot widen authority: {} lie outside the parent task's scopes",
                    names.join(", ")
                ),
            ));
        }
        let parent_left = parent_state.expires_at.min(parent.exp) - now;
        let ttl = request.ttl_seconds.unwrap_or(parent_left);
        if ttl < 1 || ttl > parent_left {
            return Err(invalid(
                "invalid_request",
                format!(
                    "delegation cannot outlive the parent: `ttl_seconds` must be between 1 and {parent_left}, not {ttl}"
                ),
            ));
        }
        // What the parent has left in the whole cluster, as the audit log counts it.
        let parent_calls = self.store.count_task_calls(&parent_key.task_id()).await?;
        let budget_left = parent_state.budget.saturating_sub(parent_calls.used);
        let budget = request.budget.unwrap_or(budget_left);
        if budget < 1 || budget > budget_left {
            return Err(invalid(
                "invalid_request",
                format!(
                    "delegation cannot spend more than the parent has left: `budget` must be between 1 and {budget_left}"
                ),
            ));
        }
        let depth = u32::from(parent_state.depth) + 1;
        if depth > self.settings.tasks.max_delegation_depth {
            return Err(invalid(
                "invalid_request",
                format!(
                    "delegation too deep: depth {depth} exceeds the maximum of {}",
                    self.settings.tasks.max_delegation_depth
                ),
            ));
        }
        let intent = request
            .intent
            .clone()
            .unwrap_or_else(|| parent_state.context.intent.to_string());
        crate::authority::validate_text("intent", &intent, crate::authority::MAX_INTENT_LEN)?;

        // Policy: the same RequestTask question, with the delegation in its context.
        let ask = TaskAsk {
            intent: &intent,
            ttl_seconds: ttl,
            budget,
            obo: parent_state.context.obo.as_deref(),
            delegated: true,
            depth,
            now,
        };
        let report = self.decide_scopes(&agent, &scopes, &ask);
        if !report.is_allow() {
            let event = self
                .event(kinds::TASK_REFUSED, agent.spiffe_id.as_str())
                .agent(agent.spiffe_id.as_str())
                .decision(report.decision.as_str())
                .detail(json!({ "parent": parent.task, "scopes": scopes, "depth": depth, "policies": report.policies, "reasons": report.reasons }));
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
            intent,
            scopes: scopes.clone(),
            obo: parent_state.context.obo.as_deref().map(str::to_string),
            parent: Some(parent.task.parse()?),
            depth,
            status: TaskStatus::Active,
            created_at: now,
            expires_at,
            budget,
            calls_used: 0,
            token_jti: jti.clone(),
            jkt: verified.jkt.clone(),
        };
        let act = Actor {
            sub: parent.sub.clone(),
            act: parent.act.clone().map(Box::new),
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
            scope: scopes.clone(),
            cnf: Confirmation {
                jkt: verified.jkt.clone(),
            },
            act: Some(act),
            obo: record.obo.clone(),
        };
        let token = self.keys.sign(&claims)?;
        let event = self
            .event(kinds::TASK_DELEGATED, parent.sub.as_str())
            .agent(agent.spiffe_id.as_str())
            .task(task_id.as_str())
            .decision("allow")
            .detail(json!({
                "parent": parent.task,
                "delegated_by": parent.sub,
                "scopes": scopes,
                "expires_at": expires_at,
                "budget": budget,
                "depth": depth,
                "jkt": record.jkt,
                "jti": claims.jti,
                "policies": report.policies,
            }));
        // The proof is spent with the grant, so that no other replica grants on it again.
        self.store
            .insert_task_spending(&record, event, crate::check::proof_spend(&verified))
            .await
            .map_err(crate::check::refuse_replayed)?;
        // The parent's own record of the hand-off, so that its timeline leads to the child.
        let handoff = self
            .event(kinds::DELEGATION, parent.sub.as_str())
            .agent(parent.sub.as_str())
            .task(parent.task.as_str())
            .detail(json!({ "child": task_id, "to": agent.spiffe_id, "scopes": scopes, "depth": depth }));
        self.store.append_events(vec![handoff]).await?;
        Ok(Exchanged {
            access_token: token,
            issued_token_type: ACCESS_TOKEN_TYPE.to_string(),
            token_type: "DPoP".to_string(),
            expires_in: ttl,
            scope: format_scope(&scopes),
            task_id: task_id.to_string(),
            depth,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_strings_round_trip() {
        let scopes =
            parse_scope("github:read_issue github:create_issue@acme/* jira:comment").unwrap();
        assert_eq!(scopes.0.len(), 3);
        assert_eq!(
            format_scope(&scopes),
            "github:read_issue github:create_issue@acme/* jira:comment"
        );
        assert!(parse_scope("github").is_err());
        assert!(parse_scope("").is_err());
    }
}
