//! A task's timeline: what an investigator needs to see what an agent did and why. It gathers,
//! in audit order, the task's grant, every call with its decision and reasons, approvals,
//! delegations (and, recursively, what each delegated task did) and revocations.

use std::collections::BTreeMap;

use audit::Event;
use model::{Role, TaskId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use store::AuditFilter;

use crate::authority::Authority;
use crate::error::{Error, Result};
use crate::operators::Operator;

/// Most events a timeline gathers per task (the store's page cap).
const PER_TASK: u32 = 1_000;
/// Most tasks a timeline follows through delegations.
const MAX_TASKS: usize = 64;

/// One line of a timeline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TimelineEntry {
    pub seq: u64,
    pub time_ms: i64,
    pub task: String,
    pub kind: String,
    pub actor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// A sentence for a human.
    pub summary: String,
    /// The event's detail, as recorded.
    #[schema(value_type = Object)]
    pub detail: Value,
}

fn text<'a>(detail: &'a Value, key: &str) -> &'a str {
    detail.get(key).and_then(Value::as_str).unwrap_or("")
}

fn list(detail: &Value, key: &str) -> String {
    detail
        .get(key)
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
}

/// A one-line account of an event, by kind.
pub fn summarize(event: &Event) -> String {
    let d = &event.body.detail.to_value();
    let decision = event.body.decision.as_deref().unwrap_or("");
    match event.body.kind.as_str() {
        "task.granted" => format!(
            "granted: \"{}\", scopes {}, budget {}",
            text(d, "intent"),
            d["scopes"],
            d["budget"]
        ),
        "task.delegated" => format!(
            "delegated from task {} by {}, scopes {}, depth {}",
            text(d, "parent"),
            text(d, "delegated_by"),
            d["scopes"],
            d["depth"]
        ),
        "delegation" => format!(
            "delegated to {} as task {}",
            text(d, "to"),
            text(d, "child")
        ),
        "task.refused" => format!("refused: {}", list(d, "reasons")),
        "call.decision" => {
            let why = list(d, "reasons");
            let what = format!(
                "{} {} on `{}` of {}",
                text(d, "class"),
                text(d, "action"),
                text(d, "resource"),
                text(d, "tool")
            );
            if decision == "allow" {
                format!("call {what}: allowed ({})", list(d, "policies"))
            } else {
                format!("call {what}: {decision} ({}): {why}", text(d, "code"))
            }
        }
        "call.outcome" => format!(
            "outcome of {} on {}: status {}, {} bytes in {} ms",
            text(d, "action"),
            text(d, "tool"),
            d["status"],
            d["bytes"],
            d["duration_ms"]
        ),
        "revocation" => format!(
            "revoked {} `{}`: {}",
            text(d, "kind"),
            text(d, "target"),
            text(d, "reason")
        ),
        "task.revoked" => format!("task revoked: {}", text(d, "reason")),
        "task.completed" => "completed by its agent".to_string(),
        kind if kind.starts_with("approval.") => format!(
            "{}: approval {} {}",
            kind,
            text(d, "approval"),
            text(d, "reason")
        )
        .trim_end()
        .to_string(),
        kind => kind.to_string(),
    }
}

impl Authority {
    /// The timeline of `task` and of every task delegated from it, in audit order.
    pub async fn timeline(&self, actor: &Operator, task: &str) -> Result<Vec<TimelineEntry>> {
        actor.require(&[Role::Auditor])?;
        let id: TaskId = task.parse()?;
        if self.store.get_task(&id).await?.is_none() {
            return Err(Error::not_found(
                "task_not_found",
                format!("no task `{id}`"),
            ));
        }
        let mut events: BTreeMap<u64, Event> = BTreeMap::new();
        let mut pending = vec![id.to_string()];
        let mut seen = Vec::new();
        while let Some(task) = pending.pop() {
            if seen.contains(&task) || seen.len() >= MAX_TASKS {
                continue;
            }
            let filter = AuditFilter {
                task: Some(task.clone()),
                limit: PER_TASK,
                ..AuditFilter::default()
            };
            for event in self.store.query_events(&filter).await? {
                if event.body.kind == "delegation" {
                    pending.push(text(&event.body.detail.to_value(), "child").to_string());
                }
                events.insert(event.seq, event);
            }
            seen.push(task);
        }
        Ok(events
            .into_values()
            .map(|event| TimelineEntry {
                seq: event.seq,
                time_ms: event.body.time_ms,
                task: event.body.task.clone().unwrap_or_default(),
                summary: summarize(&event),
                kind: event.body.kind,
                actor: event.body.actor,
                decision: event.body.decision,
                detail: event.body.detail.to_value(),
            })
            .collect())
    }
}
