//! Containment: agents that go off-script are quarantined automatically. Rules from the
//! configuration — N denials within T seconds, calls to tools that do not exist, use of a
//! completed or revoked task's token, a proof from the wrong key — quarantine the agent: its
//! status becomes `quarantined`, every credential it holds is revoked at once, new grants are
//! refused, and an optional webhook is told. Only an operator's release restores it. Every
//! step is in the audit log.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use audit::kinds;
use model::{AgentName, AgentStatus, SpiffeId};
use parking_lot::Mutex;
use serde_json::json;
use store::{AgentRecord, RevocationKind};

use crate::authority::Authority;
use crate::check::{CallAttempt, CallVerdict, Check};
use crate::error::{Error, ErrorKind, Result};
use crate::operators::Operator;

/// The rules, from `[containment]` in the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainmentRules {
    /// Quarantine after this many denied calls (out of scope, or refused by policy) …
    pub max_denials: u32,
    /// … within this many seconds. `max_denials = 0` turns the rule off.
    pub window_seconds: i64,
    /// A call to a tool remit does not front.
    pub unknown_tool: bool,
    /// A call with the token of a completed or revoked task …
    pub dead_token: bool,
    /// … more than this many seconds after it ended: a retry racing a revocation or a
    /// completion is refused without counting as off-script.
    pub dead_token_grace_seconds: i64,
    /// A call whose proof is signed by a key other than the token's.
    pub wrong_key: bool,
    /// Told (POST, JSON) of every quarantine; best effort, never delays the call path. Its
    /// URL often carries a token (in its path or query), so it is held as a secret.
    pub webhook: Option<model::Secret<String>>,
}

impl Default for ContainmentRules {
    fn default() -> Self {
        ContainmentRules {
            max_denials: 10,
            window_seconds: 60,
            unknown_tool: true,
            dead_token: true,
            dead_token_grace_seconds: 30,
            wrong_key: true,
            webhook: None,
        }
    }
}

/// Denials a node keeps for the store while the store cannot take them: beyond this many, the
/// oldest are dropped (the local windows still count them).
const MAX_UNSHARED: usize = 10_000;

/// Per-agent denial windows, and the denials not yet added to the store's count.
#[derive(Debug, Default)]
pub(crate) struct Containment {
    denials: Mutex<HashMap<String, VecDeque<i64>>>,
    /// (agent, time) of each denial counted here since the last catch-up.
    unshared: Mutex<Vec<(String, i64)>>,
}

impl Containment {
    /// Records a denial at `now_ms`; true when the agent crossed the threshold.
    fn count_denial(&self, rules: &ContainmentRules, agent: &str, now_ms: i64) -> bool {
        if rules.max_denials == 0 {
            return false;
        }
        self.unshare(vec![(agent.to_string(), now_ms)]);
        let mut denials = self.denials.lock();
        let window = denials.entry(agent.to_string()).or_default();
        window.push_back(now_ms);
        while window
            .front()
            .is_some_and(|&t| now_ms - t > rules.window_seconds * 1000)
        {
            window.pop_front();
        }
        window.len() >= rules.max_denials as usize
    }

    fn forget(&self, agent: &str) {
        self.denials.lock().remove(agent);
        self.unshared.lock().retain(|(denied, _)| denied != agent);
    }

    /// Queues denials for the store, keeping the newest [`MAX_UNSHARED`].
    fn unshare(&self, denials: Vec<(String, i64)>) {
        let mut unshared = self.unshared.lock();
        unshared.extend(denials);
        let excess = unshared.len().saturating_sub(MAX_UNSHARED);
        unshared.drain(..excess);
    }
}

/// Which rule a verdict breaks at `now` (Unix seconds), if any.
fn rule_broken(
    rules: &ContainmentRules,
    verdict: &CallVerdict,
    unknown_tool: bool,
    now: i64,
) -> Option<&'static str> {
    // A token whose revocation is younger than the grace period is refused all the same,
    // but its use is a race, not evidence: the agent may not have heard yet.
    let within_grace = verdict
        .ended_at
        .is_some_and(|ended| now.saturating_sub(ended) < rules.dead_token_grace_seconds);
    match verdict.code {
        _ if unknown_tool && rules.unknown_tool => Some("unknown_tool"),
        "revoked" | "task_not_active" if rules.dead_token && !within_grace => Some("dead_token"),
        "proof_key_mismatch" if rules.wrong_key => Some("wrong_key"),
        _ => None,
    }
}

impl Authority {
    /// Feeds one recorded verdict to the rules; quarantines its agent when one breaks.
    /// Only verdicts whose token verified name an agent, so nobody can quarantine another
    /// agent with forged credentials.
    pub(crate) async fn contain(&self, verdict: &CallVerdict, unknown_tool: bool) {
        let Some(agent) = verdict.agent.as_deref() else {
            return;
        };
        let rules = &self.settings.containment;
        let now = self.clock.now_ms().div_euclid(1000);
        let rule = match rule_broken(rules, verdict, unknown_tool, now) {
            Some(rule) => Some(rule),
            None if matches!(verdict.code, "out_of_scope" | "policy_denied")
                && self
                    .containment
                    .count_denial(rules, agent, self.clock.now_ms()) =>
            {
                Some("denials")
            }
            None => None,
        };
        if let Some(rule) = rule {
            let reason = match rule {
                "denials" => format!(
                    "{} denied calls within {} s",
                    rules.max_denials, rules.window_seconds
                ),
                "unknown_tool" => "a call to a tool remit does not front".to_string(),
                "dead_token" => format!(
                    "a call with the token of an ended task ({})",
                    verdict.message
                ),
                _ => "a proof signed by a key other than the token's".to_string(),
            };
            if let Err(error) = self.quarantine(agent, rule, &reason).await {
                tracing::warn!(agent, rule, "quarantine failed: {error}");
            }
        }
    }

    /// Adds the denials counted here since the last catch-up to the store's count, which every
    /// node adds to, and quarantines each agent whose sum over the window reaches
    /// `max_denials`: the rule then counts what an agent did on every replica, and quarantines
    /// it at the latest one catch-up (`sync_interval_ms`) after the denial that reached the
    /// threshold, wherever that was. Agents with no new denial here need no look: the node that
    /// counts the next denial of theirs asks. Called with each catch-up ([`Authority::sync`]).
    pub async fn share_denials(&self) {
        let rules = &self.settings.containment;
        let denials = std::mem::take(&mut *self.containment.unshared.lock());
        if denials.is_empty() || rules.max_denials == 0 {
            return;
        }
        let since_ms = self
            .clock
            .now_ms()
            .saturating_sub(rules.window_seconds.saturating_mul(1000));
        let sums = match self.store.add_denials(&denials, since_ms).await {
            Ok(sums) => sums,
            Err(error) => {
                tracing::warn!(
                    denials = denials.len(),
                    "could not add the denials to the store's count: {error}"
                );
                if matches!(error, store::StoreError::Unavailable(_)) {
                    self.containment.unshare(denials);
                }
                return;
            }
        };
        for (agent, denials) in sums {
            if denials < rules.max_denials {
                continue;
            }
            let reason = format!(
                "{} denied calls within {} s",
                rules.max_denials, rules.window_seconds
            );
            if let Err(error) = self.quarantine(&agent, "denials", &reason).await {
                tracing::warn!(agent, "quarantine failed: {error}");
            }
        }
    }

    /// The call path for a request to a tool remit does not front: the caller is
    /// authenticated (so the attempt is attributed), the call is refused as `tool_unknown`,
    /// recorded, and counted against the agent by the `unknown_tool` rule.
    pub async fn refuse_unknown_tool(&self, attempt: &CallAttempt<'_>) -> CallVerdict {
        let message = format!("no tool named `{}`", attempt.tool);
        self.refuse_authenticated(attempt, "tool_unknown", &message, true)
            .await
    }

    /// The call path for a request the gateway refuses before it names an action (a path it
    /// will not forward, a method the route does not take, a body over the limit, a body that
    /// is not JSON-RPC): the caller is authenticated, so that the refusal is attributed to its
    /// agent, and the refusal is recorded with `code` and `message`. Credentials that fail
    /// are refused and recorded for that reason instead, and attributed to nobody unless the
    /// token verified.
    pub async fn refuse_request(
        &self,
        attempt: &CallAttempt<'_>,
        code: &'static str,
        message: &str,
    ) -> CallVerdict {
        self.refuse_authenticated(attempt, code, message, false)
            .await
    }

    async fn refuse_authenticated(
        &self,
        attempt: &CallAttempt<'_>,
        code: &'static str,
        message: &str,
        unknown_tool: bool,
    ) -> CallVerdict {
        let mut verdict = self.decide_timed(attempt, Check::Session).await;
        if verdict.is_allow() {
            verdict.report = model::DecisionReport::deny(message.to_string());
            verdict.code = code;
            verdict.message = message.to_string();
        }
        let authenticated = verdict.code == code;
        let verdict = self.record(attempt, verdict, Check::Call).await;
        self.contain(&verdict, unknown_tool && authenticated).await;
        verdict
    }

    /// Quarantines an agent (by SPIFFE ID): status, revocation of everything it holds, event,
    /// webhook. Idempotent: an agent that is not active is left as it is.
    pub async fn quarantine(&self, agent: &str, rule: &str, reason: &str) -> Result<()> {
        let name = match agent.parse::<SpiffeId>() {
            Ok(id) => id.parts().1,
            Err(_) => agent.parse::<AgentName>()?,
        };
        let Some(record) = self.store.get_agent(&name).await? else {
            return Ok(());
        };
        if record.status != AgentStatus::Active {
            return Ok(());
        }
        let event = self
            .event(kinds::AGENT_QUARANTINED, "remit")
            .agent(record.spiffe_id.as_str())
            .detail(json!({ "rule": rule, "reason": reason }));
        self.store
            .set_agent_status(&name, AgentStatus::Quarantined, event)
            .await?;
        let system = Operator::system();
        self.revoke(
            &system,
            RevocationKind::Agent,
            name.as_str(),
            &format!("quarantined: {reason}"),
        )
        .await?;
        self.containment.forget(agent);
        // A released agent starts afresh on every node, as it does here.
        if let Err(error) = self.store.clear_denials(record.spiffe_id.as_str()).await {
            tracing::warn!(agent, "could not clear the stored denials: {error}");
        }
        tracing::warn!(agent = %record.spiffe_id, rule, "agent quarantined: {reason}");
        if let Some(url) = self.settings.containment.webhook.clone() {
            let body = json!({
                "event": "agent.quarantined",
                "agent": record.spiffe_id,
                "owner": record.owner,
                "rule": rule,
                "reason": reason,
                "time_ms": self.clock.now_ms(),
            });
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build();
                let sent = match client {
                    Ok(client) => client
                        .post(url.expose())
                        .json(&body)
                        .send()
                        .await
                        .map(|r| r.status().is_success()),
                    Err(error) => Err(error),
                };
                if !matches!(sent, Ok(true)) {
                    tracing::warn!("the quarantine webhook did not accept the notice");
                }
            });
        }
        Ok(())
    }

    /// An operator's release of a quarantined agent: it may ask for tasks again. Credentials
    /// revoked by the quarantine stay revoked.
    pub async fn release_agent(
        &self,
        actor: &Operator,
        name: &str,
        reason: &str,
    ) -> Result<AgentRecord> {
        actor.require(&[])?;
        crate::authority::validate_text("reason", reason, crate::authority::MAX_AGENT_REASON_LEN)?;
        let mut agent = self.get_agent(actor, name).await?;
        if agent.status != AgentStatus::Quarantined {
            return Err(Error::new(
                ErrorKind::Conflict,
                "agent_not_quarantined",
                format!(
                    "agent `{}` is {}, not quarantined",
                    agent.name, agent.status
                ),
            ));
        }
        let event = self
            .event(kinds::AGENT_RELEASED, actor.actor())
            .agent(agent.spiffe_id.as_str())
            .detail(json!({ "reason": reason }));
        self.store
            .set_agent_status(&agent.name, AgentStatus::Active, event)
            .await?;
        agent.status = AgentStatus::Active;
        Ok(agent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denials_count_within_the_window_only() {
        let rules = ContainmentRules {
            max_denials: 3,
            window_seconds: 10,
            ..ContainmentRules::default()
        };
        let containment = Containment::default();
        assert!(!containment.count_denial(&rules, "a", 0));
        assert!(!containment.count_denial(&rules, "a", 1_000));
        // The first denial has left the window by now.
        assert!(!containment.count_denial(&rules, "a", 10_500));
        assert!(containment.count_denial(&rules, "a", 11_000));
        assert!(!containment.count_denial(&rules, "b", 11_000));
        let off = ContainmentRules {
            max_denials: 0,
            ..rules
        };
        assert!(!containment.count_denial(&off, "c", 0));
    }

    fn verdict(code: &'static str, ended_at: Option<i64>) -> CallVerdict {
        CallVerdict {
            report: model::DecisionReport::deny(code),
            code,
            message: code.to_string(),
            task: None,
            agent: Some("spiffe://remit.local/agent/bot".to_string()),
            mode: None,
            audit_seq: None,
            decision_micros: 0,
            retry_after: None,
            approval: None,
            ended_at,
            claims: None,
            budget: None,
            proof_spend: None,
        }
    }

    #[test]
    fn rules_map_codes() {
        let rules = ContainmentRules::default();
        let broken = |rules: &ContainmentRules, code, unknown| {
            rule_broken(rules, &verdict(code, None), unknown, 1_000)
        };
        assert_eq!(broken(&rules, "revoked", false), Some("dead_token"));
        assert_eq!(broken(&rules, "task_not_active", false), Some("dead_token"));
        assert_eq!(
            broken(&rules, "proof_key_mismatch", false),
            Some("wrong_key")
        );
        assert_eq!(broken(&rules, "tool_unknown", true), Some("unknown_tool"));
        assert_eq!(broken(&rules, "out_of_scope", false), None);
        assert_eq!(broken(&rules, "proof_bad_signature", false), None);
        let lenient = ContainmentRules {
            dead_token: false,
            ..rules
        };
        assert_eq!(broken(&lenient, "revoked", false), None);
    }

    #[test]
    fn a_dead_token_counts_only_after_the_grace_period() {
        let rules = ContainmentRules::default();
        let grace = rules.dead_token_grace_seconds;
        let revoked_at = |at| verdict("revoked", Some(at));
        assert_eq!(rule_broken(&rules, &revoked_at(1_000), false, 1_000), None);
        assert_eq!(
            rule_broken(&rules, &revoked_at(1_000), false, 1_000 + grace - 1),
            None
        );
        assert_eq!(
            rule_broken(&rules, &revoked_at(1_000), false, 1_000 + grace),
            Some("dead_token")
        );
        let no_grace = ContainmentRules {
            dead_token_grace_seconds: 0,
            ..rules
        };
        assert_eq!(
            rule_broken(&no_grace, &revoked_at(1_000), false, 1_000),
            Some("dead_token")
        );
    }
}
